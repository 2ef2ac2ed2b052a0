//! What clients ask a server before anything else (its supported methods, its cluster), and the
//! services Refract does its own way: EventStoreDB's JavaScript projections and operations.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::Context;
use super::convert::{TICKS_PER_MILLISECOND, host_and_port, uuid_message};
use super::proto::event_store::client::Empty;
use super::proto::event_store::client::gossip::{self, gossip_server, member_info::VNodeState};
use super::proto::event_store::client::operations::{self as ops, operations_server};
use super::proto::event_store::client::projections::{self as proj, projections_server};
use super::proto::event_store::client::server_features::{
    SupportedMethod, SupportedMethods, server_features_server,
};
use crate::http::Role;

/// The EventStoreDB version whose client protocol is served: clients pick features by it.
const PROTOCOL_VERSION: &str = "24.10.0";

/// Answers anyone, as EventStoreDB does: clients ask before they authenticate, and the answer
/// tells nothing of the data.
pub struct Features;

#[tonic::async_trait]
impl server_features_server::ServerFeatures for Features {
    async fn get_supported_methods(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<SupportedMethods>, Status> {
        const STREAMS: &str = "event_store.client.streams.streams";
        const PERSISTENT: &str =
            "event_store.client.persistent_subscriptions.persistentsubscriptions";
        let method = |service: &str, name: &str, features: &[&str]| SupportedMethod {
            method_name: name.to_owned(),
            service_name: service.to_owned(),
            features: features.iter().map(|feature| feature.to_string()).collect(),
        };
        let both = ["stream", "all"];
        let methods = vec![
            method(STREAMS, "read", &[]),
            method(STREAMS, "append", &[]),
            method(STREAMS, "delete", &[]),
            method(STREAMS, "tombstone", &[]),
            method(STREAMS, "batchappend", &[]),
            method(PERSISTENT, "create", &both),
            method(PERSISTENT, "update", &both),
            method(PERSISTENT, "delete", &both),
            method(PERSISTENT, "read", &both),
            method(PERSISTENT, "getinfo", &both),
            method(PERSISTENT, "replayparked", &both),
            method(PERSISTENT, "list", &both),
            method(PERSISTENT, "restartsubsystem", &[]),
            method("event_store.client.gossip.gossip", "read", &[]),
            method(
                "event_store.client.server_features.serverfeatures",
                "getsupportedmethods",
                &[],
            ),
        ];
        Ok(Response::new(SupportedMethods {
            methods,
            event_store_server_version: PROTOCOL_VERSION.to_owned(),
        }))
    }
}

/// The cluster as EventStoreDB's gossip shows it: the members, the leader among them.
pub struct Gossip(pub Arc<Context>);

#[tonic::async_trait]
impl gossip_server::Gossip for Gossip {
    async fn read(&self, request: Request<Empty>) -> Result<Response<gossip::ClusterInfo>, Status> {
        self.0.authorize(&request, Role::Reader)?;
        let time_stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| {
                elapsed.as_millis() as i64 * TICKS_PER_MILLISECOND
            });
        let member = |id: u64, state: VNodeState, host: String, port: u16| gossip::MemberInfo {
            instance_id: Some(uuid_message(uuid::Uuid::from_u64_pair(0, id), false)),
            time_stamp,
            state: state as i32,
            is_alive: true,
            http_end_point: Some(gossip::EndPoint {
                address: host,
                port: u32::from(port),
            }),
        };
        let members = match &self.0.node {
            Some(node) => crate::http::node_status(node)
                .members
                .into_iter()
                .filter_map(|member_of| {
                    let (host, port) = host_and_port(&member_of.url)?;
                    let state = match member_of.role {
                        "leader" => VNodeState::Leader,
                        "follower" => VNodeState::Follower,
                        _ => VNodeState::ReadOnlyReplica,
                    };
                    Some(member(member_of.id, state, host, port))
                })
                .collect(),
            // One node: the address the client reached it by.
            None => {
                let (host, port) = request
                    .extensions()
                    .get::<axum::http::uri::Authority>()
                    .and_then(|authority| Some((authority.host(), authority.port_u16()?)))
                    .map(|(host, port)| {
                        (
                            host.trim_start_matches('[')
                                .trim_end_matches(']')
                                .to_owned(),
                            port,
                        )
                    })
                    .unwrap_or_else(|| ("127.0.0.1".to_owned(), 2113));
                vec![member(1, VNodeState::Leader, host, port)]
            }
        };
        Ok(Response::new(gossip::ClusterInfo { members }))
    }
}

fn projections_differ<T>() -> Result<T, Status> {
    Err(Status::unimplemented(
        "Refract's projections are WebAssembly components, not EventStoreDB's JavaScript ones: \
         deploy them with PUT /projections/{name} (or `refract projection deploy`); the \
         built-in $by_category, $by_event_type, $by_correlation_id and $stream_by_category \
         run without being created",
    ))
}

fn operation_differs<T>(what: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{what} is not an operation of Refract: {}",
        match what {
            "scavenging" => "deleted and truncated events are removed as they are written over",
            "merging indexes" => "its indexes are tables of its store, kept up to date",
            "shutting down over the API" => "stop the process (SIGTERM) instead",
            _ => "its cluster is run through /cluster (Raft) instead",
        }
    )))
}

/// Refusals only, to anyone: nothing is done or told.
pub struct Operations;

#[tonic::async_trait]
impl operations_server::Operations for Operations {
    async fn start_scavenge(
        &self,
        _: Request<ops::StartScavengeReq>,
    ) -> Result<Response<ops::ScavengeResp>, Status> {
        operation_differs("scavenging")
    }
    async fn stop_scavenge(
        &self,
        _: Request<ops::StopScavengeReq>,
    ) -> Result<Response<ops::ScavengeResp>, Status> {
        operation_differs("scavenging")
    }
    async fn shutdown(&self, _: Request<Empty>) -> Result<Response<Empty>, Status> {
        operation_differs("shutting down over the API")
    }
    async fn merge_indexes(&self, _: Request<Empty>) -> Result<Response<Empty>, Status> {
        operation_differs("merging indexes")
    }
    async fn resign_node(&self, _: Request<Empty>) -> Result<Response<Empty>, Status> {
        operation_differs("resigning a node")
    }
    async fn set_node_priority(
        &self,
        _: Request<ops::SetNodePriorityReq>,
    ) -> Result<Response<Empty>, Status> {
        operation_differs("setting a node's priority")
    }
    async fn restart_persistent_subscriptions(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Empty>, Status> {
        operation_differs("restarting persistent subscriptions")
    }
}

/// Refusals only, to anyone: nothing is done or told.
pub struct Projections;

type Statistics = Pin<Box<dyn Stream<Item = Result<proj::StatisticsResp, Status>> + Send>>;

#[tonic::async_trait]
impl projections_server::Projections for Projections {
    async fn create(
        &self,
        _: Request<proj::CreateReq>,
    ) -> Result<Response<proj::CreateResp>, Status> {
        projections_differ()
    }
    async fn update(
        &self,
        _: Request<proj::UpdateReq>,
    ) -> Result<Response<proj::UpdateResp>, Status> {
        projections_differ()
    }
    async fn delete(
        &self,
        _: Request<proj::DeleteReq>,
    ) -> Result<Response<proj::DeleteResp>, Status> {
        projections_differ()
    }
    type StatisticsStream = Statistics;
    async fn statistics(
        &self,
        _: Request<proj::StatisticsReq>,
    ) -> Result<Response<Statistics>, Status> {
        projections_differ()
    }
    async fn disable(
        &self,
        _: Request<proj::DisableReq>,
    ) -> Result<Response<proj::DisableResp>, Status> {
        projections_differ()
    }
    async fn enable(
        &self,
        _: Request<proj::EnableReq>,
    ) -> Result<Response<proj::EnableResp>, Status> {
        projections_differ()
    }
    async fn reset(&self, _: Request<proj::ResetReq>) -> Result<Response<proj::ResetResp>, Status> {
        projections_differ()
    }
    async fn state(&self, _: Request<proj::StateReq>) -> Result<Response<proj::StateResp>, Status> {
        projections_differ()
    }
    async fn result(
        &self,
        _: Request<proj::ResultReq>,
    ) -> Result<Response<proj::ResultResp>, Status> {
        projections_differ()
    }
    async fn restart_subsystem(&self, _: Request<Empty>) -> Result<Response<Empty>, Status> {
        projections_differ()
    }
}
