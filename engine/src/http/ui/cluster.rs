//! The cluster: members, the leader and each member's lag.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use maud::html;

use super::{Nav, Session, Shared, count, page};

pub async fn show(State(ui): Shared, session: Session, headers: HeaderMap) -> Response {
    let cluster = ui.get(&session, "/cluster").await;
    let body = html! {
        h1 { "Cluster" }
        div #cluster data-live hx-get="/ui/cluster" hx-trigger="live" hx-select="#cluster" hx-swap="outerHTML" {
            @match &cluster {
                Err(failure) if failure.not_found() => p { "This server is a single node, not part of a cluster." },
                Err(failure) => (failure.render()),
                Ok(cluster) => {
                    dl.cards {
                        div { dt { "This node" } dd { (cluster["node_id"]) } }
                        div { dt { "Leader" } dd { @match cluster["leader"].as_u64() { Some(id) => (id), None => "none (an election is running)" } } }
                        div { dt { "Term" } dd { (cluster["term"]) } }
                    }
                    div.scroll { table {
                        thead { tr { th scope="col" .num { "Id" } th scope="col" { "Address" } th scope="col" { "Role" } th scope="col" .num { "Applied" } th scope="col" .num { "Lag" } } }
                        tbody { @for member in cluster["members"].as_array().into_iter().flatten() { tr {
                            td.num { (member["id"]) }
                            td { (member["url"].as_str().unwrap_or("")) }
                            td { (member["role"].as_str().unwrap_or("")) }
                            td.num { (member["applied"].as_u64().map(count).unwrap_or_default()) }
                            td.num { (member["lag"].as_u64().map(count).unwrap_or_default()) }
                        } } }
                    } }
                }
            }
        }
    };
    page(&headers, "Cluster", Nav::Cluster, &session, &ui, body)
}
