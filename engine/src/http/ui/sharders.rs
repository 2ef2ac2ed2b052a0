//! Sharders: the list, uploads, and a form that shows where events would go.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use maud::html;

use super::{Nav, Session, Shared, encode, page, removal};
use crate::http::Role;

const SAMPLE_EVENTS: &str = r#"[
  {"stream": "order-1", "type": "OrderPlaced", "data": {"customer_id": "c-1"}},
  {"stream": "order-2", "type": "OrderPlaced", "data": {"customer_id": "c-2"}}
]"#;

pub async fn show(State(ui): Shared, session: Session, headers: HeaderMap) -> Response {
    let sharders = ui.get(&session, "/sharders").await;
    let names: Vec<String> = sharders
        .as_ref()
        .ok()
        .and_then(|list| list.as_array())
        .into_iter()
        .flatten()
        .filter_map(|sharder| sharder["name"].as_str().map(str::to_owned))
        .collect();
    let body = html! {
        h1 { "Sharders" }
        @match &sharders {
            Err(failure) => (failure.render()),
            Ok(list) => {
                @if names.is_empty() { p { "No sharders yet." } } @else {
                    div.scroll { table {
                        thead { tr { th scope="col" { "Name" } th scope="col" { "Component SHA-256" } @if session.can(Role::Admin) { th scope="col" { "Actions" } } } }
                        tbody { @for sharder in list.as_array().into_iter().flatten() {
                            @let name = sharder["name"].as_str().unwrap_or("");
                            tr {
                                td { (name) }
                                td { code { (sharder["wasm_sha256"].as_str().unwrap_or("")) } }
                                @if session.can(Role::Admin) {
                                    td { (removal("Delete", &format!("/sharders/{}", encode(name)), &format!("Delete the sharder {name}?"), "/ui/sharders")) }
                                }
                            }
                        } }
                    } }
                }
            }
        }
        @if !names.is_empty() {
            section aria-labelledby="evaluate-heading" {
                h2 #evaluate-heading { "Evaluate" }
                form.stack data-api method="post" data-path="/sharders/{name}/shard" data-then="show" {
                    label for="evaluate-name" { "Sharder" }
                    select #evaluate-name name="name" data-in="path" {
                        @for name in &names { option value=(name) { (name) } }
                    }
                    label for="evaluate-shards" { "Shards" }
                    input #evaluate-shards name="shards" data-in="query" type="number" min="1" value="8" required;
                    label for="evaluate-events" { "Events (JSON array of {stream, type, data, metadata})" }
                    textarea #evaluate-events name="events" data-in="body" rows="8" required { (SAMPLE_EVENTS) }
                    button type="submit" { "Evaluate" }
                    output #shards-result {}
                }
            }
        }
        @if session.can(Role::Admin) {
            section aria-labelledby="upload-heading" {
                h2 #upload-heading { "Upload a sharder" }
                form.stack data-api method="put" data-path="/sharders/{name}" {
                    label for="sharder-name" { "Name" }
                    input #sharder-name name="name" data-in="path" type="text" required;
                    label for="sharder-file" { "Component (.wasm)" }
                    input #sharder-file name="component" data-in="body" type="file" accept=".wasm,application/wasm" required;
                    button type="submit" { "Upload" }
                    output {}
                }
            }
        }
    };
    page(&headers, "Sharders", Nav::Sharders, &session, &ui, body)
}
