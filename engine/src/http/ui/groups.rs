//! Consumer groups: the list, the settings form, and each group's consumers and parked messages.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use maud::{Markup, html};
use serde_json::Value;

use super::{Nav, Session, Shared, count, encode, page, pretty, removal};
use crate::http::Role;

pub async fn list(State(ui): Shared, session: Session, headers: HeaderMap) -> Response {
    let groups = ui.get(&session, "/groups").await;
    let body = html! {
        h1 { "Consumer groups" }
        div #groups data-live hx-get="/ui/groups" hx-trigger="live" hx-select="#groups" hx-swap="outerHTML" {
            @match &groups {
                Err(failure) => (failure.render()),
                Ok(list) => (table(list, &session)),
            }
        }
        @if session.can(Role::Admin) {
            section aria-labelledby="create-heading" {
                h2 #create-heading { "Create or update a group" }
                (settings_form(None))
            }
        }
    };
    page(&headers, "Groups", Nav::Groups, &session, &ui, body)
}

/// Every group with its figures.
pub fn table(list: &Value, session: &Session) -> Markup {
    let groups = list.as_array().cloned().unwrap_or_default();
    html! {
        @if groups.is_empty() {
            p {
                "No consumer groups yet."
                @if session.can(Role::Admin) { " " a href="/ui/groups#create-heading" { "Create one" } "." }
            }
        } @else {
            div.scroll {
                table {
                    thead { tr {
                        th scope="col" { "Stream" } th scope="col" { "Group" } th scope="col" { "Strategy" }
                        th scope="col" { "Status" } th scope="col" .num { "Ready" } th scope="col" .num { "In flight" }
                        th scope="col" .num { "Parked" } th scope="col" .num { "Delivered" } th scope="col" .num { "Consumers" }
                    } }
                    tbody {
                        @for group in &groups {
                            @let stream = group["stream"].as_str().unwrap_or("");
                            @let name = group["group"].as_str().unwrap_or("");
                            tr {
                                td { a href=(super::streams::stream_url(stream)) { (stream) } }
                                td { a href={ "/ui/groups/" (encode(stream)) "/" (encode(name)) } { (name) } }
                                td { (strategy_name(&group["settings"]["strategy"])) }
                                td { (group["status"].as_str().unwrap_or("")) }
                                td.num { (count(group["ready"].as_u64().unwrap_or(0))) }
                                td.num { (count(group["in_flight"].as_u64().unwrap_or(0))) }
                                td.num { (count(group["parked"].as_u64().unwrap_or(0))) }
                                td.num { (count(group["delivered"].as_u64().unwrap_or(0))) }
                                td.num { (group["consumers"].as_array().map_or(0, Vec::len)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn strategy_name(strategy: &Value) -> String {
    match strategy {
        Value::String(name) => name.clone(),
        Value::Object(map) => match (map.get("sharded"), map.get("partitioned")) {
            (Some(sharder), _) => format!("sharded by {}", sharder.as_str().unwrap_or("")),
            (_, Some(partitioned)) => format!(
                "partitioned by {} into {}",
                partitioned["sharder"].as_str().unwrap_or(""),
                partitioned["partitions"]
            ),
            _ => strategy.to_string(),
        },
        other => other.to_string(),
    }
}

/// The settings form: empty to create a group, filled with `info`'s settings to update one.
fn settings_form(info: Option<&Value>) -> Markup {
    let settings = info.map(|info| &info["settings"]);
    let setting = |name: &str| -> Option<String> {
        settings.and_then(|settings| match &settings[name] {
            Value::Null => None,
            Value::String(text) => Some(text.clone()),
            other => Some(other.to_string()),
        })
    };
    let strategy = settings.map(|settings| &settings["strategy"]);
    let (kind, sharder, partitions) = match strategy {
        Some(Value::String(name)) => (name.clone(), None, None),
        Some(Value::Object(map)) if map.contains_key("sharded") => (
            "sharded".to_owned(),
            map["sharded"].as_str().map(str::to_owned),
            None,
        ),
        Some(Value::Object(map)) if map.contains_key("partitioned") => (
            "partitioned".to_owned(),
            map["partitioned"]["sharder"].as_str().map(str::to_owned),
            map["partitioned"]["partitions"].as_u64(),
        ),
        _ => ("round_robin".to_owned(), None, None),
    };
    let numbers = [
        ("message_timeout_ms", "Message timeout (ms)"),
        ("max_retry_count", "Max retries"),
        ("live_buffer_size", "Live buffer"),
        ("read_batch_size", "Read batch"),
        ("history_buffer_size", "History buffer"),
        ("checkpoint_after_ms", "Checkpoint after (ms)"),
        ("min_checkpoint_count", "Min checkpoint count"),
        ("max_checkpoint_count", "Max checkpoint count"),
        ("max_subscriber_count", "Max consumers (0: any)"),
    ];
    let stream = info.and_then(|info| info["stream"].as_str());
    let group = info.and_then(|info| info["group"].as_str());
    html! {
        form.grid data-api data-kind="group" method="put" data-path="/groups/{stream}/{group}" data-then="/ui/groups/{stream}/{group}" {
            label for="group-stream" { "Stream (a stream, $ce-…, or $all)" }
            input #group-stream name="stream" data-in="path" type="text" required value=[stream] readonly[stream.is_some()];
            label for="group-name" { "Group" }
            input #group-name name="group" data-in="path" type="text" required value=[group] readonly[group.is_some()];
            label for="group-start" { "Start from (start, end or a number)" }
            input #group-start name="start_from" data-in="json" data-type="position" type="text" value=[setting("start_from")] placeholder="end";
            label for="group-strategy" { "Strategy" }
            select #group-strategy name="strategy" {
                @for option in ["round_robin", "dispatch_to_single", "pinned", "pinned_by_correlation", "sharded", "partitioned"] {
                    option value=(option) selected[kind == option] { (option) }
                }
            }
            label for="group-sharder" { "Sharder (sharded, partitioned)" }
            input #group-sharder name="sharder" type="text" value=[sharder];
            label for="group-partitions" { "Partitions (partitioned)" }
            input #group-partitions name="partitions" type="number" min="1" max="1024" value=[partitions];
            label for="group-resolve" { "Resolve links" }
            select #group-resolve name="resolve_links" data-in="json" data-type="bool" {
                option value="true" selected[setting("resolve_links").as_deref() != Some("false")] { "yes" }
                option value="false" selected[setting("resolve_links").as_deref() == Some("false")] { "no" }
            }
            @for (name, label) in numbers {
                label for={ "group-" (name) } { (label) }
                input id={ "group-" (name) } name=(name) data-in="json" data-type="number" type="number" min="0" value=[setting(name)];
            }
            label for="group-stream-prefix" { "Stream prefix ($all)" }
            input #group-stream-prefix name="stream_prefix" data-in="json" type="text" value=[setting("stream_prefix")];
            label for="group-type-prefix" { "Type prefix ($all)" }
            input #group-type-prefix name="type_prefix" data-in="json" type="text" value=[setting("type_prefix")];
            div.submit {
                button type="submit" { @if info.is_some() { "Update group" } @else { "Create group" } }
                output {}
            }
        }
    }
}

#[derive(serde::Deserialize)]
pub struct DetailQuery {
    /// `stats`: the figures alone, for their live refresh.
    part: Option<String>,
}

pub async fn detail(
    State(ui): Shared,
    session: Session,
    headers: HeaderMap,
    Path((stream, group)): Path<(String, String)>,
    axum::extract::Query(query): axum::extract::Query<DetailQuery>,
) -> Response {
    let base = format!("/groups/{}/{}", encode(&stream), encode(&group));
    let info = ui.get(&session, &base).await;
    let title = format!("{stream} :: {group}");
    let stats = html! {
        div #stats data-live hx-get={ "/ui" (base) "?part=stats" } hx-trigger="live" hx-swap="outerHTML" {
            @match &info {
                Err(failure) => (failure.render()),
                Ok(info) => (stats(info)),
            }
        }
    };
    if query.part.as_deref() == Some("stats") {
        return page(&headers, &title, Nav::Groups, &session, &ui, stats);
    }
    let info = match &info {
        Ok(info) => info,
        Err(failure) => {
            // The page of a group that is not there answers as the API does.
            let body = html! { h1 { "Group " code { (title) } } (stats) };
            let mut response = page(&headers, &title, Nav::Groups, &session, &ui, body);
            *response.status_mut() = failure.status;
            return response;
        }
    };
    let parked = ui.get(&session, &format!("{base}/parked?limit=100")).await;
    let body = html! {
        h1 { "Group " code { (title) } }
        (stats)
        section aria-labelledby="parked-heading" {
            h2 #parked-heading { "Parked messages" }
            @if session.can(Role::Admin) {
                form.toolbar data-api method="post" data-path={ (base) "/replay-parked" } {
                    label for="stop-at" { "Replay at most (empty: all)" }
                    input #stop-at name="stop_at" data-in="query" type="number" min="0";
                    button type="submit" { "Replay parked" }
                    output {}
                }
            }
            @match &parked {
                Err(failure) => (failure.render()),
                Ok(list) => (parked_list(list)),
            }
        }
        @if session.can(Role::Admin) {
            section aria-labelledby="settings-heading" {
                h2 #settings-heading { "Settings" }
                (settings_form(Some(info)))
                p.actions { (removal("Delete group", &base, &format!("Delete the group {group} of {stream}?"), "/ui/groups")) }
            }
        } @else {
            section aria-labelledby="settings-heading" {
                h2 #settings-heading { "Settings" }
                pre { code { (pretty(&info["settings"])) } }
            }
        }
    };
    page(&headers, &title, Nav::Groups, &session, &ui, body)
}

fn stats(info: &Value) -> Markup {
    let consumers = info["consumers"].as_array().cloned().unwrap_or_default();
    let partitions = info["partitions"].as_array().cloned().unwrap_or_default();
    let position = |value: &Value| value.as_u64().map(count).unwrap_or_else(|| "none".into());
    html! {
        @if let Some(message) = info["message"].as_str() {
            p.failure role="alert" { (message) }
        }
        dl.cards {
            div { dt { "Status" } dd { (info["status"].as_str().unwrap_or("")) } }
            div { dt { "Strategy" } dd { (strategy_name(&info["settings"]["strategy"])) } }
            div { dt { "Ready" } dd #ready { (count(info["ready"].as_u64().unwrap_or(0))) } }
            div { dt { "In flight" } dd #in-flight { (count(info["in_flight"].as_u64().unwrap_or(0))) } }
            div { dt { "Parked" } dd #parked-count { (count(info["parked"].as_u64().unwrap_or(0))) } }
            div { dt { "Delivered" } dd { (count(info["delivered"].as_u64().unwrap_or(0))) } }
            div { dt { "Checkpoint" } dd { (position(&info["checkpoint"])) } }
            div { dt { "Last known" } dd { (position(&info["last_known"])) } }
        }
        h2 { "Consumers" }
        @if consumers.is_empty() { p { "No consumers connected." } } @else {
            div.scroll { table {
                thead { tr { th scope="col" { "Name" } th scope="col" .num { "In flight" } th scope="col" .num { "Acked" } th scope="col" .num { "Nacked" } } }
                tbody { @for consumer in &consumers { tr {
                    td { (consumer["name"].as_str().unwrap_or("")) }
                    td.num { (count(consumer["in_flight"].as_u64().unwrap_or(0))) }
                    td.num { (count(consumer["acked"].as_u64().unwrap_or(0))) }
                    td.num { (count(consumer["nacked"].as_u64().unwrap_or(0))) }
                } } }
            } }
        }
        @if !partitions.is_empty() {
            h2 { "Partitions" }
            div.scroll { table {
                thead { tr { th scope="col" .num { "Partition" } th scope="col" { "Owner" } th scope="col" .num { "Committed" } th scope="col" .num { "Lag" } } }
                tbody { @for partition in &partitions { tr {
                    td.num { (partition["partition"]) }
                    td { (partition["owner"].as_str().unwrap_or("none")) }
                    td.num { (position(&partition["committed"])) }
                    td.num { (count(partition["lag"].as_u64().unwrap_or(0))) }
                } } }
            } }
        }
    }
}

fn parked_list(list: &Value) -> Markup {
    let parked = list.as_array().cloned().unwrap_or_default();
    html! {
        @if parked.is_empty() { p #no-parked { "Nothing parked." } } @else {
            div.scroll { table #parked {
                thead { tr { th scope="col" .num { "#" } th scope="col" { "Event" } th scope="col" { "Reason" } th scope="col" { "JSON" } } }
                tbody { @for message in &parked {
                    @let event = &message["event"];
                    @let stream = event["stream"].as_str().unwrap_or("");
                    tr {
                        td.num { (message["revision"].as_u64().unwrap_or(0)) }
                        td { a href=(super::streams::stream_url(stream)) { (stream) } " #" (event["revision"].as_u64().unwrap_or(0)) " " (event["type"].as_str().unwrap_or("")) }
                        td { (message["reason"].as_str().unwrap_or("")) }
                        td { details { summary { "JSON" } pre { code { (pretty(event)) } } } }
                    }
                } }
            } }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategies_are_named() {
        assert_eq!(strategy_name(&json!("pinned")), "pinned");
        assert_eq!(strategy_name(&json!({"sharded": "s"})), "sharded by s");
        assert_eq!(
            strategy_name(&json!({"partitioned": {"sharder": "s", "partitions": 4}})),
            "partitioned by s into 4"
        );
    }
}
