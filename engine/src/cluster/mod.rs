//! Replication: Refract's types for openraft, and its storage on the write-ahead log.
//!
//! In a cluster the write-ahead log is the Raft log: one entry per group-commit batch, numbered
//! by openraft from 0 and stamped with the term of the leader that wrote it (classic Raft leader
//! ids: one leader per term, so a log id is a term and an index, as the log's header holds).

pub mod log_store;
pub mod network;
pub mod node;
pub mod state_machine;

use std::fmt;

use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// The types a Refract cluster runs openraft with.
    pub TypeConfig:
        D = Proposal,
        R = Applied,
        NodeId = u64,
        Node = Member,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
        AsyncRuntime = openraft_rt_tokio::TokioRuntime,
);

/// A log id: the term of the leader that wrote the entry, and its index.
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// The vote a node keeps: the term it is in, whom it voted for, whether that leader is elected.
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// An entry of the replicated log.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// The voters and learners of a cluster.
pub type Membership = openraft::Membership<u64, Member>;

/// A node as the cluster's membership records it: where its API (and Raft traffic) listens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub url: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

/// A batch of the writer, proposed by a node: applied on every node, answered on the proposer,
/// which knows its batch again by `(proposer, sequence)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub proposer: u64,
    pub sequence: u64,
    /// The batch as the single node logs it: its operations and the time it was stamped with.
    pub batch: Vec<u8>,
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "batch {} of node {} ({} bytes)",
            self.sequence,
            self.proposer,
            self.batch.len()
        )
    }
}

/// What applying an entry answers openraft with. The proposer's callers get their own typed
/// answers from the writer, so this only says the entry was applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied;
