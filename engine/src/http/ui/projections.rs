//! Projections: the list with deploys by upload, and each one's status, progress, state and rows.

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::Value;

use super::{
    Nav, Session, Shared, action, count, encode, figure, filled, page, pretty, removal, seconds,
};
use crate::http::Role;

/// The status as a badge whose class colours it.
pub fn status_badge(projection: &Value) -> Markup {
    let status = projection["status"].as_str().unwrap_or("unknown");
    html! { span class={ "badge " (status) } { (status) } }
}

fn progress_bar(label: &str, progress: f64, eta: Option<f64>) -> Markup {
    let percent = (progress.clamp(0.0, 1.0) * 100.0).floor();
    html! {
        div.progress {
            progress value=(format!("{:.4}", progress.clamp(0.0, 1.0))) max="1" aria-label=(label) {}
            span.percent { (percent) "%" }
            @if let Some(eta) = eta { span.sub { " ETA " (seconds(eta)) } }
        }
    }
}

pub async fn list(State(ui): Shared, session: Session, headers: HeaderMap) -> Response {
    let projections = ui.get(&session, "/projections").await;
    let table = html! {
        div #projections data-live hx-get="/ui/projections" hx-trigger="live" hx-select="#projections" hx-swap="outerHTML" {
            @match &projections {
                Err(failure) => (failure.render()),
                Ok(list) => (table(list)),
            }
        }
    };
    let body = html! {
        h1 { "Projections" }
        (table)
        @if session.can(Role::Admin) { (deploy_form()) }
    };
    page(
        &headers,
        "Projections",
        Nav::Projections,
        &session,
        &ui,
        body,
    )
}

fn table(list: &Value) -> Markup {
    let empty = Vec::new();
    html! {
        div.scroll {
            table {
                thead { tr {
                    th scope="col" { "Name" } th scope="col" { "Kind" } th scope="col" { "Status" }
                    th scope="col" .num { "Position" } th scope="col" { "Progress" }
                    th scope="col" .num { "Events/s" } th scope="col" { "Fault" }
                } }
                tbody {
                    @for projection in list.as_array().unwrap_or(&empty) {
                        @let name = projection["name"].as_str().unwrap_or("");
                        tr {
                            td { a href={ "/ui/projections/" (encode(name)) } { (name) } }
                            td { (projection["kind"].as_str().unwrap_or("")) }
                            td { (status_badge(projection)) }
                            td.num { (count(projection["position"].as_u64().unwrap_or(0))) " / " (count(projection["head_position"].as_u64().unwrap_or(0))) }
                            td { (progress_bar(&format!("Progress of {name}"), projection["progress"].as_f64().unwrap_or(0.0), projection["eta_seconds"].as_f64())) }
                            td.num { (figure(projection["events_per_second"].as_f64().unwrap_or(0.0))) }
                            td { @if let Some(message) = projection["fault"]["message"].as_str() { span.failure { (message) } } }
                        }
                    }
                }
            }
        }
    }
}

fn deploy_form() -> Markup {
    html! {
        section aria-labelledby="deploy-heading" {
            h2 #deploy-heading { "Deploy a projection" }
            form.stack data-api method="put" data-path="/projections/{name}" data-then="/ui/projections/{name}" {
                label for="deploy-name" { "Name" }
                input #deploy-name name="name" data-in="path" type="text" required;
                label for="deploy-file" { "Component (.wasm)" }
                input #deploy-file name="component" data-in="body" type="file" accept=".wasm,application/wasm" required;
                label for="deploy-mode" { "Mode" }
                select #deploy-mode name="mode" data-in="query" {
                    option value="continuous" { "continuous" }
                    option value="one_time" { "one time" }
                }
                label for="deploy-on-error" { "On a failing event" }
                select #deploy-on-error name="on_error" data-in="query" {
                    option value="stop" { "stop" }
                    option value="skip" { "skip" }
                    option value="park" { "park" }
                }
                label.check { input name="emit" data-in="query" type="checkbox" value="true"; " May emit events" }
                label.check { input name="enabled" data-in="query" type="checkbox" value="true" checked; " Start now" }
                label.check { input name="rebuild" data-in="query" type="checkbox" value="true" checked; " Rebuild beside the running version (an update)" }
                button type="submit" { "Deploy" }
                output {}
            }
        }
    }
}

#[derive(Deserialize, Default)]
pub struct DetailQuery {
    partition: Option<String>,
    partition_prefix: Option<String>,
    /// The partition the list continues after.
    partition_after: Option<String>,
    table: Option<String>,
    row_prefix: Option<String>,
    /// The key the rows continue after.
    row_after: Option<String>,
    /// `status`: the status region alone, for its live refresh.
    part: Option<String>,
}

pub async fn detail(
    State(ui): Shared,
    session: Session,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(query): Query<DetailQuery>,
) -> Response {
    let base = format!("/projections/{}", encode(&name));
    let here = format!("/ui{base}");
    let live = query.part.as_deref() == Some("status");
    let status = if live {
        // The list's entry: the same status without the digest, which hashes the whole state.
        ui.get(&session, "/projections").await.and_then(|list| {
            list.as_array()
                .and_then(|list| list.iter().find(|status| status["name"] == name.as_str()))
                .cloned()
                .ok_or(super::Failure {
                    status: axum::http::StatusCode::NOT_FOUND,
                    message: format!("no projection {name}"),
                })
        })
    } else {
        ui.get(&session, &base).await
    };
    let status_region = html! {
        div #status data-live hx-get={ (here) "?part=status" } hx-trigger="live" hx-swap="outerHTML" {
            @match &status {
                Err(failure) => (failure.render()),
                Ok(status) => (status_view(status)),
            }
        }
    };
    if live {
        return page(
            &headers,
            &name,
            Nav::Projections,
            &session,
            &ui,
            status_region,
        );
    }
    let body = match &status {
        Err(failure) => html! { h1 { "Projection " code { (name) } } (failure.render()) },
        Ok(status) => {
            let wasm = status["kind"] == "wasm";
            let explorer = if wasm {
                Some(explorer(&ui, &session, &base, &here, &query).await)
            } else {
                None
            };
            let parked = if wasm {
                Some(ui.get(&session, &format!("{base}/parked?limit=50")).await)
            } else {
                None
            };
            html! {
                h1 { "Projection " code { (name) } }
                (status_region)
                dl.facts {
                    @if let Some(sha) = status["wasm_sha256"].as_str() { dt { "Component SHA-256" } dd { code { (sha) } } }
                    @if let Some(digest) = status["digest"].as_str() { dt { "State digest (on loading the page)" } dd { code #digest { (digest) } } }
                }
                @if session.can(Role::Admin) { (actions(&base, &name, status)) }
                @if let Some(explorer) = explorer { (explorer) }
                @if let Some(Ok(parked)) = &parked {
                    @if parked.as_array().is_some_and(|list| !list.is_empty()) {
                        section aria-labelledby="parked-heading" {
                            h2 #parked-heading { "Parked events" }
                            ul.parked {
                                @for entry in parked.as_array().into_iter().flatten() {
                                    li {
                                        "#" (entry["revision"].as_u64().unwrap_or(0)) ": "
                                        code { (entry["reason"]["error"].as_str().unwrap_or("")) }
                                        " (" (entry["event"]["stream"].as_str().unwrap_or("")) " #" (entry["event"]["revision"].as_u64().unwrap_or(0)) ")"
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    let mut response = page(&headers, &name, Nav::Projections, &session, &ui, body);
    if let Err(failure) = &status {
        // The page of a projection that is not there answers as the API does.
        *response.status_mut() = failure.status;
    }
    response
}

fn status_view(status: &Value) -> Markup {
    let rebuild = &status["rebuild"];
    html! {
        dl.cards {
            div { dt { "Status" } dd { (status_badge(status)) } }
            div { dt { "Kind" } dd { (status["kind"].as_str().unwrap_or("")) ", " (status["mode"].as_str().unwrap_or("")) } }
            div { dt { "Version" } dd { (status["version"].as_u64().unwrap_or(0)) } }
            div { dt { "Position" } dd { (count(status["position"].as_u64().unwrap_or(0))) " / " (count(status["head_position"].as_u64().unwrap_or(0))) } }
            div { dt { "Events/s" } dd { (figure(status["events_per_second"].as_f64().unwrap_or(0.0))) } }
            div { dt { "Processed" } dd { (count(status["events_processed"].as_u64().unwrap_or(0))) } }
        }
        (progress_bar("Progress", status["progress"].as_f64().unwrap_or(0.0), status["eta_seconds"].as_f64()))
        @if let Some(message) = status["fault"]["message"].as_str() {
            p.failure role="alert" { "Faulted at position " (status["fault"]["position"].as_u64().unwrap_or(0)) ": " (message) }
        }
        @if rebuild.is_object() {
            section.rebuild aria-label="Rebuild" {
                h2 { "Rebuilding version " (rebuild["version"].as_u64().unwrap_or(0)) }
                p { (status_badge(rebuild)) " at " (count(rebuild["position"].as_u64().unwrap_or(0))) ", " (figure(rebuild["events_per_second"].as_f64().unwrap_or(0.0))) " events/s" }
                (progress_bar("Rebuild progress", rebuild["progress"].as_f64().unwrap_or(0.0), rebuild["eta_seconds"].as_f64()))
                @if let Some(message) = rebuild["fault"]["message"].as_str() {
                    p.failure role="alert" { (message) }
                }
            }
        }
    }
}

fn actions(base: &str, name: &str, status: &Value) -> Markup {
    let faulted = status["fault"]["position"].as_u64();
    html! {
        section aria-labelledby="actions-heading" {
            h2 #actions-heading { "Actions" }
            p.actions {
                (action("Start", "POST", &format!("{base}/start"), None))
                (action("Stop", "POST", &format!("{base}/stop"), None))
                @if status["kind"] == "wasm" {
                    (action("Rebuild", "POST", &format!("{base}/rebuild"), None))
                }
                @if status["rebuild"].is_object() {
                    (action("Cancel rebuild", "DELETE", &format!("{base}/rebuild"), None))
                }
                (action("Reset", "POST", &format!("{base}/reset"), Some(&format!("Reset {name}? Its state and read models are dropped and rebuilt from position 0."))))
                @if let Some(position) = faulted {
                    (action("Skip the failing event", "POST", &format!("{base}/skip?position={position}"), Some("Skip the event the projection faulted on?")))
                }
                @if status["kind"] == "wasm" {
                    (removal("Delete", base, &format!("Delete the projection {name}?"), "/ui/projections"))
                }
            }
        }
    }
}

/// State by partition and table rows, each with a prefix search.
async fn explorer(
    ui: &super::Ui,
    session: &Session,
    base: &str,
    here: &str,
    query: &DetailQuery,
) -> Markup {
    let partition_prefix = filled(&query.partition_prefix).unwrap_or("");
    let partitions = ui
        .get(
            session,
            &format!(
                "{base}/partitions?limit=50&prefix={}{}",
                encode(partition_prefix),
                after_parameter(filled(&query.partition_after)),
            ),
        )
        .await;
    let state_path = match filled(&query.partition) {
        Some(partition) => format!("{base}/state?partition={}", encode(partition)),
        None => format!("{base}/state"),
    };
    let state = ui.get(session, &state_path).await;
    let rows = match filled(&query.table) {
        Some(table) => Some(
            ui.get(
                session,
                &format!(
                    "{base}/tables/{}?limit=50&prefix={}{}",
                    encode(table),
                    encode(filled(&query.row_prefix).unwrap_or("")),
                    after_parameter(filled(&query.row_after)),
                ),
            )
            .await,
        ),
        None => None,
    };
    html! {
        section aria-labelledby="state-heading" {
            h2 #state-heading { "State" }
            form.toolbar method="get" action=(here) {
                label for="partition-prefix" { "Partitions starting with" }
                input #partition-prefix name="partition_prefix" type="search" value=(partition_prefix);
                button type="submit" { "Search" }
            }
            @match &partitions {
                Ok(page) => {
                    @let keys = page["partitions"].as_array().cloned().unwrap_or_default();
                    @if keys.is_empty() {
                        p { "No partitions" @if !partition_prefix.is_empty() { " starting with " code { (partition_prefix) } } "." }
                    } @else {
                        ul.partitions {
                            @for key in &keys {
                                @let key = key.as_str().unwrap_or("");
                                li { a href={ (here) "?partition=" (encode(key)) "&partition_prefix=" (encode(partition_prefix)) } {
                                    @if key.is_empty() { "(the un-partitioned state)" } @else { (key) }
                                } }
                            }
                        }
                    }
                }
                Err(failure) => (failure.render()),
            }
            @if let Ok(Some(next)) = partitions.as_ref().map(|page| page["next"].as_str()) {
                p.paging { a href={ (here) "?partition_prefix=" (encode(partition_prefix)) "&partition_after=" (encode(next)) } { "More partitions" } }
            }
            h3 { @match filled(&query.partition) { Some(partition) => { "Partition " code { (partition) } }, None => "Un-partitioned state" } }
            @match &state {
                Ok(state) => pre { code { (pretty(state)) } },
                Err(failure) if failure.not_found() => p { "No state." },
                Err(failure) => (failure.render()),
            }
        }
        section aria-labelledby="rows-heading" {
            h2 #rows-heading { "Table rows" }
            form.toolbar method="get" action=(here) {
                label for="table" { "Table" }
                input #table name="table" type="text" required value=[filled(&query.table)];
                label for="row-prefix" { "Keys starting with" }
                input #row-prefix name="row_prefix" type="search" value=[filled(&query.row_prefix)];
                button type="submit" { "Show rows" }
            }
            @match &rows {
                None => {},
                Some(Err(failure)) => (failure.render()),
                Some(Ok(page)) => {
                    @let list = page["rows"].as_array().cloned().unwrap_or_default();
                    @if list.is_empty() { p { "No rows." } } @else {
                        div.scroll {
                            table {
                                thead { tr { th scope="col" { "Key" } th scope="col" { "Value" } } }
                                tbody {
                                    @for row in &list {
                                        tr {
                                            td { code { (row["key"].as_str().unwrap_or("")) } }
                                            td { pre { code { @match row.get("value_base64") {
                                                Some(Value::String(bytes)) => { "base64: " (bytes) },
                                                _ => (pretty(&row["value"])),
                                            } } } }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if let Some(Ok(Some(next))) = rows.as_ref().map(|rows| rows.as_ref().map(|page| page["next"].as_str())) {
                p.paging { a href={ (here) "?table=" (encode(filled(&query.table).unwrap_or(""))) "&row_prefix=" (encode(filled(&query.row_prefix).unwrap_or(""))) "&row_after=" (encode(next)) } { "More rows" } }
            }
        }
    }
}

/// `&after=KEY` to continue a list after a key, or nothing for its start.
fn after_parameter(after: Option<&str>) -> String {
    after.map_or(String::new(), |after| format!("&after={}", encode(after)))
}
