//! The cluster as a node sees it: members, leader, term, and how far each member got.

use axum::Json;
use axum::extract::State;
use openraft::async_runtime::WatchReceiver;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::streams::Consistency;

/// Makes a read linearizable when asked: on a node of a cluster, once this returns, the node
/// has applied everything acknowledged before it was called. A single node always has.
pub async fn linearize(state: &AppState, consistency: Option<Consistency>) -> Result<(), ApiError> {
    match (&state.node, consistency.unwrap_or_default()) {
        (Some(node), Consistency::Linearizable) => Ok(node.linearize().await?),
        _ => Ok(()),
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ClusterStatus)]
pub struct Status {
    /// This node's id.
    pub node_id: u64,
    /// The leader this node knows of, if any.
    pub leader: Option<u64>,
    /// Where the leader's API listens.
    pub leader_url: Option<String>,
    /// The term this node is in.
    pub term: u64,
    pub members: Vec<Member>,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ClusterMember)]
pub struct Member {
    pub id: u64,
    pub url: String,
    /// `leader`, `follower` (a voter) or `learner` (a replica that does not vote).
    pub role: &'static str,
    /// The last log index the member holds (this node's own: applied), as far as this node
    /// knows: a follower knows only its own.
    pub applied: Option<u64>,
    /// Entries the member is behind the leader's log, as far as this node knows.
    pub lag: Option<u64>,
}

/// The cluster's members, leader and term, as this node sees them (404 on a single node).
#[utoipa::path(get, path = "/cluster", tag = "operations",
    responses((status = 200, body = Status), (status = 404, body = ErrorBody)))]
pub async fn status(State(state): State<AppState>) -> Result<Json<Status>, ApiError> {
    let node = state.node.as_ref().ok_or_else(|| {
        ApiError::not_found("this server is a single node, not part of a cluster")
    })?;
    let metrics = node.raft.metrics().borrow_watched().clone();
    let membership = metrics.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let last_log_index = metrics.last_log_index;
    let leader_url = metrics
        .current_leader
        .and_then(|leader| membership.get_node(&leader))
        .map(|member| member.url.clone());
    let members = membership
        .nodes()
        .map(|(id, member)| {
            let role = if Some(*id) == metrics.current_leader {
                "leader"
            } else if voters.contains(id) {
                "follower"
            } else {
                "learner"
            };
            let applied = if *id == node.id {
                metrics.last_applied.map(|log_id| log_id.index)
            } else {
                metrics
                    .replication
                    .as_ref()
                    .and_then(|replication| replication.get(id).cloned().flatten())
                    .map(|log_id| log_id.index)
            };
            let lag = match (metrics.replication.as_ref(), last_log_index) {
                (Some(_), Some(last)) => Some(last.saturating_sub(applied.unwrap_or(0))),
                _ => None,
            };
            Member {
                id: *id,
                url: member.url.clone(),
                role,
                applied,
                lag,
            }
        })
        .collect();
    Ok(Json(Status {
        node_id: node.id,
        leader: metrics.current_leader,
        leader_url,
        term: metrics.current_term,
        members,
    }))
}
