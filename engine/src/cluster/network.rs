//! Raft's messages between nodes, over HTTP on the API's port.
//!
//! Votes and answers are JSON. Entries travel as the log holds them, after a JSON header, so a
//! batch is neither re-encoded nor inflated on its way to followers. A snapshot streams its rows
//! after a JSON header. A node that cannot be reached, or answers with an error, is reported
//! unreachable: openraft backs off and retries.

use std::collections::BTreeMap;
use std::io;

use bytes::Bytes;
use futures::StreamExt;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf};
use openraft::{OptionalSend, RaftNetworkV2};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::log_store::{decode_entry, encode_entry};
use super::state_machine::SnapshotFile;
use super::{LogId, Member, TypeConfig, Vote};

pub const APPEND_PATH: &str = "/raft/append";
pub const VOTE_PATH: &str = "/raft/vote";
pub const PRE_VOTE_PATH: &str = "/raft/pre-vote";
pub const SNAPSHOT_PATH: &str = "/raft/snapshot";
pub const READ_INDEX_PATH: &str = "/raft/read-index";
/// The slowest rate an append's bytes are expected to be sent, received and synced at.
const APPEND_BYTES_PER_SECOND: f64 = 10.0 * 1024.0 * 1024.0;
/// The header a node sends the cluster's secret in.
pub const SECRET_HEADER: &str = "refract-cluster-secret";

/// Opens connections to the other nodes.
#[derive(Clone)]
pub struct Network {
    client: reqwest::Client,
    secret: Option<String>,
    /// Where to reach some nodes instead of their member URL, by id.
    routes: BTreeMap<u64, String>,
}

impl Network {
    /// Talks to the other nodes, sending them `secret` when the cluster has one, and reaching
    /// the nodes in `routes` at the URL given there.
    pub fn new(secret: Option<String>, routes: BTreeMap<u64, String>) -> Network {
        Network {
            client: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(1))
                .build()
                .expect("an HTTP client"),
            secret,
            routes,
        }
    }

    /// The URL this node reaches node `id` at, whose member URL is `url`.
    pub fn route<'a>(&'a self, id: u64, url: &'a str) -> &'a str {
        self.routes.get(&id).map_or(url, String::as_str)
    }

    /// Node `id`, whose member URL is `url`, as this node reaches it.
    fn peer(&self, id: u64, url: &str) -> Peer {
        Peer {
            url: self.route(id, url).trim_end_matches('/').to_owned(),
            client: self.client.clone(),
            secret: self.secret.clone(),
        }
    }

    /// Asks the leader `id` (member URL `url`) for the log index a linearizable read must see
    /// applied; the leader confirms with a majority that it still leads before it answers.
    pub async fn read_index(&self, id: u64, url: &str) -> Result<u64, String> {
        let timeout = std::time::Duration::from_secs(2);
        self.peer(id, url)
            .post::<u64>(READ_INDEX_PATH, Vec::new().into(), Some(timeout))
            .await
            .map_err(|error| error.to_string())
    }
}

/// Another node, as the leader (or a candidate) talks to it.
pub struct Peer {
    url: String,
    client: reqwest::Client,
    secret: Option<String>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &Member) -> Peer {
        self.peer(target, &node.url)
    }
}

/// What precedes the entries of an append.
#[derive(Serialize, Deserialize)]
struct AppendHeader {
    vote: Vote,
    prev_log_id: Option<LogId>,
    leader_commit: Option<LogId>,
}

/// What precedes a snapshot's rows.
#[derive(Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub vote: Vote,
    pub meta: SnapshotMetaOf<TypeConfig>,
}

impl Peer {
    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: reqwest::Body,
        timeout: Option<std::time::Duration>,
    ) -> Result<T, RPCError<TypeConfig>> {
        let mut request = self.client.post(format!("{}{path}", self.url)).body(body);
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        if let Some(secret) = &self.secret {
            request = request.header(SECRET_HEADER, secret);
        }
        let response = request
            .send()
            .await
            .map_err(|error| Unreachable::new(&error))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|error| NetworkError::new(&error))?;
        if !status.is_success() {
            let message = format!("{status}: {}", String::from_utf8_lossy(&bytes));
            return Err(Unreachable::from_string(message).into());
        }
        serde_json::from_slice::<Result<T, serde_json::Value>>(&bytes)
            .map_err(|error| NetworkError::new(&error))?
            // The other node answered with an error of its own (it is shutting down).
            .map_err(|error| Unreachable::from_string(error.to_string()).into())
    }
}

impl RaftNetworkV2<TypeConfig> for Peer {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let body = encode_append(&rpc).map_err(|error| NetworkError::new(&error))?;
        // openraft gives an append a heartbeat's time; one catching a follower up carries many
        // batches, which the follower must receive and sync before it answers.
        let transfer =
            std::time::Duration::from_secs_f64(body.len() as f64 / APPEND_BYTES_PER_SECOND);
        self.post(APPEND_PATH, body.into(), Some(option.soft_ttl() + transfer))
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let body = serde_json::to_vec(&rpc).map_err(|error| NetworkError::new(&error))?;
        self.post(VOTE_PATH, body.into(), Some(option.soft_ttl()))
            .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let body = serde_json::to_vec(&rpc).map_err(|error| NetworkError::new(&error))?;
        self.post(PRE_VOTE_PATH, body.into(), Some(option.soft_ttl()))
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let header = SnapshotHeader {
            vote,
            meta: snapshot.meta,
        };
        let header = frame(
            &serde_json::to_vec(&header)
                .map_err(|error| StreamingError::Network(NetworkError::new(&error)))?,
        );
        let rows = tokio::fs::File::open(&snapshot.snapshot.path)
            .await
            .map_err(|error| StreamingError::Network(NetworkError::new(&error)))?;
        let body = futures::stream::once(async move { Ok::<_, io::Error>(Bytes::from(header)) })
            .chain(tokio_util::io::ReaderStream::new(rows));
        // A snapshot takes as long as it takes; a cancelled replication stops it.
        let sent = self.post::<SnapshotResponse<TypeConfig>>(
            SNAPSHOT_PATH,
            reqwest::Body::wrap_stream(body),
            None,
        );
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            answer = sent => answer.map_err(|error| match error {
                RPCError::Unreachable(error) => StreamingError::Unreachable(error),
                RPCError::Network(error) => StreamingError::Network(error),
                RPCError::Timeout(error) => StreamingError::Timeout(error),
                RPCError::RemoteError(error) => {
                    StreamingError::Unreachable(Unreachable::from_string(error.to_string()))
                }
            }),
        }
    }
}

/// A length-prefixed JSON header.
fn frame(header: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + header.len());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(header);
    out
}

/// Splits a length-prefixed JSON header from what follows it.
pub fn unframe<T: DeserializeOwned>(body: &[u8]) -> io::Result<(T, &[u8])> {
    let invalid = |message: &str| io::Error::new(io::ErrorKind::InvalidData, message.to_owned());
    let length = body
        .get(..4)
        .ok_or_else(|| invalid("a message without its header"))?;
    let length = u32::from_le_bytes(length.try_into().expect("4 bytes")) as usize;
    let header = body
        .get(4..4 + length)
        .ok_or_else(|| invalid("a message cut short in its header"))?;
    let header = serde_json::from_slice(header).map_err(io::Error::other)?;
    Ok((header, &body[4 + length..]))
}

/// An append as it travels: its header, then each entry as term, index, payload length and
/// the payload as the log keeps it.
pub fn encode_append(rpc: &AppendEntriesRequest<TypeConfig>) -> io::Result<Vec<u8>> {
    let header = AppendHeader {
        vote: rpc.vote,
        prev_log_id: rpc.prev_log_id,
        leader_commit: rpc.leader_commit,
    };
    let mut out = frame(&serde_json::to_vec(&header).map_err(io::Error::other)?);
    let mut payload = Vec::new();
    for entry in &rpc.entries {
        encode_entry(entry, &mut payload)?;
        out.extend_from_slice(&entry.log_id.leader_id.term.to_le_bytes());
        out.extend_from_slice(&entry.log_id.index.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
    }
    Ok(out)
}

pub fn decode_append(body: &[u8]) -> io::Result<AppendEntriesRequest<TypeConfig>> {
    let (header, mut rest) = unframe::<AppendHeader>(body)?;
    let mut entries = Vec::new();
    while !rest.is_empty() {
        let fixed = rest.get(..20).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "an entry cut short in its header",
            )
        })?;
        let number = |at: usize| u64::from_le_bytes(fixed[at..at + 8].try_into().expect("8"));
        let (term, index) = (number(0), number(8));
        let length = u32::from_le_bytes(fixed[16..20].try_into().expect("4")) as usize;
        let payload = rest
            .get(20..20 + length)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "an entry cut short"))?;
        entries.push(decode_entry(term, index, payload)?);
        rest = &rest[20 + length..];
    }
    Ok(AppendEntriesRequest {
        vote: header.vote,
        prev_log_id: header.prev_log_id,
        entries,
        leader_commit: header.leader_commit,
    })
}

#[cfg(test)]
mod tests {
    use openraft::EntryPayload;

    use super::*;
    use crate::cluster::{Entry, Proposal, log_store};

    #[test]
    fn an_append_arrives_as_it_left() {
        let rpc = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(log_store::log_id(2, 9)),
            entries: vec![
                Entry {
                    log_id: log_store::log_id(3, 10),
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: log_store::log_id(3, 11),
                    payload: EntryPayload::Normal(Proposal {
                        proposer: 1,
                        sequence: 77,
                        batch: vec![1, 2, 3],
                    }),
                },
            ],
            leader_commit: Some(log_store::log_id(2, 8)),
        };
        let decoded = decode_append(&encode_append(&rpc).unwrap()).unwrap();
        assert_eq!(decoded.vote, rpc.vote);
        assert_eq!(decoded.prev_log_id, rpc.prev_log_id);
        assert_eq!(decoded.entries, rpc.entries);
        assert_eq!(decoded.leader_commit, rpc.leader_commit);
        let bytes = encode_append(&rpc).unwrap();
        assert!(decode_append(&bytes[..bytes.len() - 1]).is_err());
    }
}
