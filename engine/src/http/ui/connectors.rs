//! Connectors: each one's status, rate and last error, with its actions, and a form to define
//! one.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use maud::{Markup, html};
use serde_json::Value;

use super::{Nav, Session, Shared, action, count, encode, figure, page, removal};
use crate::http::Role;

const SAMPLE_DEFINITION: &str = r#"{
  "kind": "kafka-sink",
  "bootstrap_servers": "localhost:9092",
  "topic": "orders",
  "source": "$all",
  "stream_prefix": "order-",
  "start_from": "start",
  "partitioning": "stream",
  "compression": "zstd"
}"#;

pub async fn show(State(ui): Shared, session: Session, headers: HeaderMap) -> Response {
    let connectors = ui.get(&session, "/connectors").await;
    let admin = session.can(Role::Admin);
    let body = html! {
        h1 { "Connectors" }
        div #connectors data-live hx-get="/ui/connectors" hx-trigger="live" hx-select="#connectors" hx-swap="outerHTML" {
            @match &connectors {
                Err(failure) => (failure.render()),
                Ok(list) if list.as_array().is_none_or(Vec::is_empty) => p { "No connectors yet." },
                Ok(list) => (table(list, admin)),
            }
        }
        @if admin {
            section aria-labelledby="define-heading" {
                h2 #define-heading { "Define a connector" }
                form.stack data-api method="put" data-path="/connectors/{name}" {
                    label for="connector-name" { "Name" }
                    input #connector-name name="name" data-in="path" type="text" required;
                    label for="connector-definition" { "Definition (JSON)" }
                    textarea #connector-definition name="definition" data-in="body" rows="10" required { (SAMPLE_DEFINITION) }
                    button type="submit" { "Save connector" }
                    output {}
                }
            }
        }
    };
    page(&headers, "Connectors", Nav::Connectors, &session, &ui, body)
}

fn table(list: &Value, admin: bool) -> Markup {
    let empty = Vec::new();
    html! {
        div.scroll { table {
            thead { tr {
                th scope="col" { "Name" } th scope="col" { "Kind" } th scope="col" { "Topic" }
                th scope="col" { "Status" } th scope="col" { "Progress" } th scope="col" .num { "Lag" }
                th scope="col" .num { "Events/s" } th scope="col" { "Last error" }
                @if admin { th scope="col" { "Actions" } }
            } }
            tbody { @for connector in list.as_array().unwrap_or(&empty) {
                @let name = connector["name"].as_str().unwrap_or("");
                @let status = connector["status"].as_str().unwrap_or("unknown");
                @let base = format!("/connectors/{}", encode(name));
                tr {
                    td { (name) }
                    td { (connector["kind"].as_str().unwrap_or("")) }
                    td { (connector["topic"].as_str().unwrap_or("")) }
                    td {
                        span class={ "badge " (status) } { (status) }
                        @if status == "running" && connector["connected"] != true { " " span.sub { "(not connected)" } }
                    }
                    td { (progress(connector)) }
                    td.num { (count(connector["lag"].as_u64().unwrap_or(0))) }
                    td.num { (figure(connector["events_per_second"].as_f64().unwrap_or(0.0))) }
                    td { @if let Some(error) = connector["last_error"].as_str() { span.failure { (error) } } }
                    @if admin {
                        td { p.actions {
                            @if status == "running" {
                                (action("Stop", "POST", &format!("{base}/stop"), None))
                            } @else {
                                (action("Start", "POST", &format!("{base}/start"), None))
                            }
                            (action("Reset", "POST", &format!("{base}/reset"), Some(&format!("Reset {name}? It begins again from its start_from."))))
                            (removal("Delete", &base, &format!("Delete the connector {name}? What it wrote stays."), "/ui/connectors"))
                        } }
                    }
                }
            } }
        } }
    }
}

/// A sink's position, or a source's next offset per partition.
fn progress(connector: &Value) -> Markup {
    let offsets = connector["offsets"]
        .as_object()
        .filter(|offsets| !offsets.is_empty());
    html! {
        @if let Some(position) = connector["position"].as_u64() {
            "position " (count(position))
        } @else if let Some(offsets) = offsets {
            @for (partition, offset) in offsets {
                span.sub { (partition) ": " (count(offset.as_u64().unwrap_or(0))) " " }
            }
        } @else {
            "—"
        }
    }
}
