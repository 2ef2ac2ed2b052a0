//! EventStoreDB's gRPC API, the protocol of its official clients, on the HTTP API's port:
//! streams and `$all` ([`streams`]), persistent subscriptions as Refract's consumer groups
//! ([`persistent`]), and what clients ask a server first ([`server`]: supported methods,
//! gossip; operations and projections, which Refract does its own way, answer UNIMPLEMENTED).
//!
//! Its routes are merged beside the HTTP API's layers, not under them: they buffer bodies,
//! which would break streaming calls. Callers are checked here instead, with the same tokens
//! and roles.

// tonic's service traits answer `Status` by value; helpers answer it the same way.
#![allow(clippy::result_large_err)]

mod convert;
mod filter;
mod persistent;
pub mod proto;
mod server;
mod streams;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::ConnectInfo;
use base64::Engine as _;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::cluster::node::Node;
use crate::http::{Role, Tokens};
use crate::processing::{Processing, ProcessingHost};
use crate::store::Store;
use proto::event_store::client::{
    gossip::gossip_server::GossipServer, operations::operations_server::OperationsServer,
    persistent_subscriptions::persistent_subscriptions_server::PersistentSubscriptionsServer,
    projections::projections_server::ProjectionsServer,
    server_features::server_features_server::ServerFeaturesServer,
    streams::streams_server::StreamsServer,
};

/// Largest message a call may carry, as EventStoreDB's clients allow (17 MiB: one event of
/// 16 MiB and its envelope).
pub const MAX_MESSAGE_BYTES: usize = 17 * 1024 * 1024;
/// Most bytes of events one append may carry.
pub const MAX_APPEND_BYTES: usize = 64 * 1024 * 1024;

/// What the services reach.
pub struct Context {
    pub store: Store,
    pub processing: ProcessingHost,
    /// Cancelled when the server shuts down; ends subscriptions.
    pub shutdown: CancellationToken,
    pub node: Option<Arc<Node>>,
    pub tokens: Arc<Tokens>,
}

impl Context {
    /// Lets a call through with a token of `needed` or above (`authorization: Bearer TOKEN`, or
    /// Basic with the token as password, as EventStoreDB's connection strings give it); without
    /// configured tokens, only from loopback, as the HTTP API.
    fn authorize<T>(&self, request: &tonic::Request<T>, needed: Role) -> Result<(), Status> {
        if self.tokens.is_empty() {
            let peer = request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|info| info.0.ip().to_canonical());
            return match peer {
                Some(ip) if !ip.is_loopback() => {
                    Err(convert::access_denied(Status::permission_denied(
                        "no tokens are configured, so only loopback clients are accepted",
                    )))
                }
                _ => Ok(()),
            };
        }
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        let token = header.and_then(presented_token).ok_or_else(|| {
            convert::access_denied(Status::unauthenticated(
                "an authorization: Bearer token is required (or Basic, with the token as the \
                 password)",
            ))
        })?;
        let role = self.tokens.role_of(&token).ok_or_else(|| {
            convert::access_denied(Status::unauthenticated("the token is not valid"))
        })?;
        if role < needed {
            return Err(convert::access_denied(Status::permission_denied(format!(
                "this needs the {} role; the token has {}",
                needed.name(),
                role.name()
            ))));
        }
        Ok(())
    }

    /// EventStoreDB's `requires-leader: true` (its clients send it unless told to prefer
    /// followers): a follower of a cluster answers with where the leader is, as for writes.
    fn check_leader<T>(&self, request: &tonic::Request<T>) -> Result<(), Status> {
        let required = request
            .metadata()
            .get("requires-leader")
            .is_some_and(|value| value == "true");
        match &self.node {
            Some(node) if required && !node.is_leader() => Err(convert::store_status(
                crate::store::StoreError::NotLeader {
                    leader_url: node.leader_url(),
                },
                "$all",
            )),
            _ => Ok(()),
        }
    }

    fn processing(&self) -> Result<Processing, Status> {
        self.processing
            .get()
            .map_err(|error| convert::store_status(error, "$all"))
    }
}

/// The token of an `authorization` value: a bearer token, or a Basic password.
fn presented_token(header: &str) -> Option<String> {
    if let Some(token) = header.strip_prefix("Bearer ") {
        return Some(token.trim().to_owned());
    }
    let encoded = header.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':')
        .map(|(_, password)| password.to_owned())
}

/// The answers a task sends to a streaming call, as tonic takes them.
fn channel_stream<T: Send + 'static>(
    receiver: mpsc::Receiver<Result<T, Status>>,
) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>> {
    Box::pin(futures::stream::unfold(
        receiver,
        |mut receiver| async move { receiver.recv().await.map(|item| (item, receiver)) },
    ))
}

/// Sends `item` to the client; false when the client left, or the server is stopping (which
/// the client is told) while it waited for a slow client.
async fn send_or_stop<T>(
    sender: &mpsc::Sender<Result<T, Status>>,
    item: Result<T, Status>,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        sent = sender.send(item) => sent.is_ok(),
        () = shutdown.cancelled() => {
            let _ = sender.try_send(Err(convert::shutting_down()));
            false
        }
    }
}

/// The gRPC services as routes to merge into the server's router.
pub fn routes(context: Context) -> axum::Router {
    let context = Arc::new(context);
    let mut routes = tonic::service::Routes::builder();
    routes
        .add_service(
            StreamsServer::new(streams::Streams(context.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            PersistentSubscriptionsServer::new(persistent::PersistentSubscriptions::new(
                context.clone(),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(ServerFeaturesServer::new(server::Features))
        .add_service(GossipServer::new(server::Gossip(context.clone())))
        .add_service(OperationsServer::new(server::Operations))
        .add_service(ProjectionsServer::new(server::Projections));
    // Paths that are not gRPC's fall through to the HTTP API's own fallback.
    routes
        .routes()
        .into_axum_router()
        .reset_fallback()
        .layer(axum::middleware::map_request(keep_authority))
}

/// Keeps the address the client called in the request, where gossip finds it: the services see
/// the request's headers and extensions, not its URI.
async fn keep_authority(mut request: axum::extract::Request) -> axum::extract::Request {
    if let Some(authority) = request.uri().authority().cloned() {
        request.extensions_mut().insert(authority);
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_as_bearer_or_basic_password() {
        assert_eq!(
            presented_token("Bearer abc12345 ").as_deref(),
            Some("abc12345")
        );
        // base64("admin:abc12345")
        assert_eq!(
            presented_token("Basic YWRtaW46YWJjMTIzNDU=").as_deref(),
            Some("abc12345")
        );
        assert_eq!(presented_token("Basic !!!"), None);
        assert_eq!(presented_token("Token abc"), None);
    }
}
