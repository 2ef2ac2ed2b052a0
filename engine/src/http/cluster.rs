//! The cluster as a node sees it: members, leader, term, and how far each member got.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use openraft::async_runtime::WatchReceiver;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ApiPath, ErrorBody, LimitedBody, check_media_type};
use super::streams::Consistency;
use crate::cluster::node::Node;
use crate::metrics::{ClusterSample, MemberSample};

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
    Ok(Json(node_status(node)))
}

/// The cluster as `node` sees it.
pub fn node_status(node: &Node) -> Status {
    let metrics = node.raft.metrics().borrow_watched().clone();
    let membership = metrics.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let last_log_index = metrics.last_log_index;
    let leader_url = node.leader_url();
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
            let lag = match (metrics.replication.as_ref(), last_log_index, applied) {
                (Some(_), Some(last), Some(applied)) => Some(last.saturating_sub(applied)),
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
    Status {
        node_id: node.id,
        leader: metrics.current_leader,
        leader_url,
        term: metrics.current_term,
        members,
    }
}

/// The same, as `/metrics` reports it.
pub(super) fn sample(node: &Node) -> ClusterSample {
    let status = node_status(node);
    ClusterSample {
        node_id: status.node_id,
        term: status.term,
        members: status
            .members
            .into_iter()
            .map(|member| MemberSample {
                id: member.id,
                role: member.role,
                applied: member.applied,
                lag: member.lag,
            })
            .collect(),
    }
}

#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewLearner {
    /// The node's id: unique in the cluster, never reused.
    pub id: u64,
    /// Where the node's API listens, as the other nodes reach it: an http(s) URL with a host.
    #[schema(pattern = "^https?://[^/?#]+")]
    pub url: String,
}

#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Voters {
    /// The voters from now on; each must be a member already.
    #[schema(min_items = 1)]
    pub ids: Vec<u64>,
}

fn parse_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    check_media_type(headers, "application/json", |media| {
        media == "application/json"
    })?;
    serde_json::from_slice(body)
        .map_err(|error| ApiError::invalid(format!("invalid body: {error}")))
}

fn node(state: &AppState) -> Result<&crate::cluster::node::Node, ApiError> {
    state
        .node
        .as_deref()
        .ok_or_else(|| ApiError::not_found("this server is a single node, not part of a cluster"))
}

/// Adds a node as a learner (a read replica that does not vote); answers once it has caught up.
#[utoipa::path(post, path = "/cluster/learners", tag = "operations", request_body = NewLearner,
    responses((status = 200, body = Status), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 421, body = ErrorBody)))]
pub async fn add_learner(
    State(state): State<AppState>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Status>, ApiError> {
    let node = node(&state)?;
    let learner: NewLearner = parse_body(&headers, &body)?;
    let url = reqwest::Url::parse(&learner.url)
        .map_err(|error| ApiError::invalid(format!("url {:?}: {error}", learner.url)))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(ApiError::invalid("url must be an http(s) URL with a host"));
    }
    let url = learner.url.trim_end_matches('/').to_owned();
    node.add_learner(learner.id, url).await?;
    status(State(state)).await
}

/// Sets the cluster's voters (promoting learners, demoting voters to learners).
#[utoipa::path(post, path = "/cluster/voters", tag = "operations", request_body = Voters,
    responses((status = 200, body = Status), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 421, body = ErrorBody)))]
pub async fn set_voters(
    State(state): State<AppState>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Status>, ApiError> {
    let node = node(&state)?;
    let voters: Voters = parse_body(&headers, &body)?;
    if voters.ids.is_empty() {
        return Err(ApiError::invalid("a cluster needs at least one voter"));
    }
    node.set_voters(voters.ids.into_iter().collect()).await?;
    status(State(state)).await
}

/// Takes a node out of the cluster (out of the voters first if it is one).
#[utoipa::path(delete, path = "/cluster/members/{id}", tag = "operations",
    params(("id" = u64, Path, description = "The node's id")),
    responses((status = 200, body = Status), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 421, body = ErrorBody)))]
pub async fn remove_member(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<Status>, ApiError> {
    node(&state)?.remove_member(id).await?;
    status(State(state)).await
}
