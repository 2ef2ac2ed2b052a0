//! The admin UI, used in headless Chromium as a person would: pages at a desktop and a phone
//! size checked by axe-core, paging and live tails, a deploy by upload, a replay of parked
//! messages; and, over plain HTTP, sign-in and roles.

mod common;

use std::time::Duration;

use common::Server;
use common::browser::Browser;
use serde_json::{Value, json};

/// axe-core 4.14.1 from npm (MPL-2.0), run inside the pages.
const AXE: &str = include_str!("browser-assets/axe.min.js");

const DESKTOP: (u32, u32) = (1280, 800);
const PHONE: (u32, u32) = (390, 844);

/// Opens `url` and waits until its scripts ran.
async fn open(browser: &Browser, url: &str) {
    browser.goto(url).await;
    browser
        .wait_for(
            "document.readyState === 'complete' && !!window.htmx",
            Duration::from_secs(10),
        )
        .await;
}

/// axe-core's serious and critical violations on the open page.
async fn serious_violations(browser: &Browser) -> Value {
    if browser.eval("return !!window.axe;").await != true {
        browser.eval(&format!("{AXE}\nreturn true;")).await;
    }
    browser
        .eval_async(
            "const result = await axe.run(document, {resultTypes: ['violations']});
             return result.violations
               .filter(v => v.impact === 'serious' || v.impact === 'critical')
               .map(v => ({id: v.id, help: v.help, nodes: v.nodes.map(n => n.target.join(' '))}));",
        )
        .await
}

/// The text of the rows' first cells in the events table.
async fn first_cells(browser: &Browser) -> Vec<String> {
    let cells = browser
        .eval("return [...document.querySelectorAll('#events tbody tr')].map(row => row.cells[0].textContent.trim());")
        .await;
    cells
        .as_array()
        .unwrap()
        .iter()
        .map(|cell| cell.as_str().unwrap().to_owned())
        .collect()
}

/// Waits until the events table starts at `place`.
async fn wait_for_first_row(browser: &Browser, place: &str) {
    browser
        .wait_for(
            &format!(
                "document.querySelector('#events tbody tr').cells[0].textContent === '{place}'"
            ),
            Duration::from_secs(10),
        )
        .await;
}

/// Clicks the link or button whose text is `text`.
async fn click_text(browser: &Browser, text: &str) {
    let clicked = browser
        .eval(&format!(
            "const element = [...document.querySelectorAll('a, button')].find(e => e.textContent.trim() === {text:?});
             if (!element) return false; element.click(); return true;"
        ))
        .await;
    assert_eq!(clicked, true, "nothing reads {text:?}");
}

async fn deploy_fixtures(server: &Server) {
    for n in 0..3 {
        let (status, body) = server
            .post(
                &format!("/streams/order-{n}"),
                json!([{"type": "OrderPlaced", "data": {"customer_id": format!("c-{n}"), "total": n},
                        "metadata": {"$correlationId": format!("corr-{n}")}}]),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = server
        .put("/groups/order-0/billing", json!({"start_from": "start"}))
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = server
        .deploy_sharder("by-customer", common::guest("shard-by-customer"))
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = server
        .deploy("counter", common::guest("event-counter"), "")
        .await;
    assert_eq!(status, 201, "{body}");
    // No broker answers there: the connector shows as not connected, with the error.
    let (status, body) = server
        .put(
            "/connectors/orders-out",
            json!({"kind": "kafka-sink", "bootstrap_servers": "127.0.0.1:9", "topic": "orders",
                   "partitioning": {"sharder": "by-customer"}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

/// Every page, at a desktop and a phone size: no serious accessibility violation, nothing wider
/// than the phone's screen, a screenshot of each; and the keyboard reaches the content first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_passes_axe_at_desktop_and_phone_sizes() {
    let server = Server::start();
    deploy_fixtures(&server).await;
    let pages = [
        ("dashboard", "/ui"),
        ("all", "/ui/streams"),
        ("stream", "/ui/streams/order-0"),
        ("projections", "/ui/projections"),
        ("projection", "/ui/projections/counter"),
        ("system-projection", "/ui/projections/%24by_category"),
        ("groups", "/ui/groups"),
        ("group", "/ui/groups/order-0/billing"),
        ("sharders", "/ui/sharders"),
        ("connectors", "/ui/connectors"),
        ("cluster", "/ui/cluster"),
    ];
    let browser = Browser::start().await;
    for (size_name, (width, height)) in [("desktop", DESKTOP), ("phone", PHONE)] {
        browser.viewport(width, height).await;
        for (name, path) in pages {
            open(&browser, &server.url(path)).await;
            let violations = serious_violations(&browser).await;
            assert_eq!(violations, json!([]), "{path} at {size_name}");
            let overflow = browser
                .eval("return document.documentElement.scrollWidth - window.innerWidth;")
                .await;
            assert!(
                overflow.as_i64().unwrap() <= 0,
                "{path} is {overflow} px wider than the {size_name} screen"
            );
            browser.screenshot(&format!("{name}-{size_name}")).await;
        }
    }

    // The sharder's evaluate form shows where the sample events go.
    open(&browser, &server.url("/ui/sharders")).await;
    click_text(&browser, "Evaluate").await;
    browser
        .wait_for(
            "document.querySelector('#shards-result').className === 'success'",
            Duration::from_secs(10),
        )
        .await;
    let shards = browser
        .eval("return JSON.parse(document.querySelector('#shards-result').textContent);")
        .await;
    let (_, expected) = server
        .post(
            "/sharders/by-customer/shard?shards=8",
            json!([{"stream": "order-1", "type": "OrderPlaced", "data": {"customer_id": "c-1"}},
                   {"stream": "order-2", "type": "OrderPlaced", "data": {"customer_id": "c-2"}}]),
        )
        .await;
    assert_eq!(shards, expected);

    // With tokens, the sign-in page (checked too) keeps the token for the session, and the
    // pages show the role with a way out.
    let guarded = Server::start_with(&["--token", "writer:writer-token-1"]);
    open(&browser, &guarded.url("/ui/streams")).await;
    assert_eq!(browser.eval("return location.pathname;").await, "/ui/login");
    let violations = serious_violations(&browser).await;
    assert_eq!(violations, json!([]), "/ui/login");
    browser.type_into("#token", "writer-token-1").await;
    click_text(&browser, "Sign in").await;
    browser
        .wait_for(
            "location.pathname === '/ui/streams' && !!document.querySelector('.signout')",
            Duration::from_secs(10),
        )
        .await;
    let role = browser
        .eval("return document.querySelector('.signout .role').textContent;")
        .await;
    assert_eq!(role, "writer");
    browser.screenshot("signed-in-desktop").await;

    // The keyboard: the first Tab reaches "Skip to content", which moves focus to the page's
    // content; the next ones walk the navigation in order.
    browser.viewport(DESKTOP.0, DESKTOP.1).await;
    open(&browser, &server.url("/ui")).await;
    browser.press("\u{E004}").await;
    let focused = browser
        .eval("return document.activeElement.textContent;")
        .await;
    assert_eq!(focused, "Skip to content");
    browser.press("\u{E007}").await;
    browser
        .wait_for(
            "document.activeElement.id === 'main'",
            Duration::from_secs(5),
        )
        .await;
    open(&browser, &server.url("/ui")).await;
    browser.press("\u{E004}\u{E004}\u{E004}\u{E004}").await;
    let focused = browser
        .eval("return document.activeElement.getAttribute('href');")
        .await;
    assert_eq!(
        focused, "/ui/streams",
        "Tab walks the skip link, the brand, then the navigation in order"
    );
    browser.close().await;
}

/// A stream pages newest-first and oldest-first, `$all` filters by stream prefix, "Expand all"
/// opens every event, and with the live tail on an append shows up without a reload (as does
/// the dashboard's head position).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_page_both_ways_and_tail_live() {
    let server = Server::start();
    server.append_n("order-7", 45).await;
    server.append_n("cust-1", 2).await;
    let browser = Browser::start().await;
    browser.viewport(DESKTOP.0, DESKTOP.1).await;

    open(&browser, &server.url("/ui/streams/order-7")).await;
    let newest: Vec<String> = (25..45).rev().map(|n| n.to_string()).collect();
    assert_eq!(first_cells(&browser).await, newest);
    click_text(&browser, "Next page").await;
    wait_for_first_row(&browser, "24").await;
    let older: Vec<String> = (5..25).rev().map(|n| n.to_string()).collect();
    assert_eq!(first_cells(&browser).await, older);
    click_text(&browser, "Previous page").await;
    wait_for_first_row(&browser, "44").await;
    assert_eq!(first_cells(&browser).await, newest);
    click_text(&browser, "Oldest").await;
    wait_for_first_row(&browser, "0").await;
    click_text(&browser, "Next page").await;
    wait_for_first_row(&browser, "20").await;
    let forward: Vec<String> = (20..40).map(|n| n.to_string()).collect();
    assert_eq!(first_cells(&browser).await, forward);
    click_text(&browser, "Previous page").await;
    browser
        .wait_for(
            "location.search.includes('from=0')",
            Duration::from_secs(10),
        )
        .await;
    let oldest: Vec<String> = (0..20).map(|n| n.to_string()).collect();
    assert_eq!(first_cells(&browser).await, oldest);
    click_text(&browser, "Next page").await;
    wait_for_first_row(&browser, "20").await;
    browser.screenshot("stream-paged").await;

    click_text(&browser, "Expand all").await;
    let closed = browser
        .eval(
            "return [...document.querySelectorAll('#events details')].filter(d => !d.open).length;",
        )
        .await;
    assert_eq!(closed, 0);
    let shown = browser
        .eval("return document.querySelector('#events details pre').textContent;")
        .await;
    assert!(shown.as_str().unwrap().contains("\"n\": 20"), "{shown}");

    // `$all` filtered by stream prefix, from the filter form.
    open(&browser, &server.url("/ui/streams")).await;
    browser.type_into("#stream-prefix", "cust").await;
    click_text(&browser, "Show").await;
    browser
        .wait_for(
            "location.search.includes('stream_prefix=cust')",
            Duration::from_secs(10),
        )
        .await;
    let streams = browser
        .eval("return [...document.querySelectorAll('#events tbody tr')].map(row => row.cells[1].querySelector('a').textContent);")
        .await;
    assert_eq!(streams, json!(["cust-1", "cust-1"]));

    // The live tail: an append appears in the same page.
    open(&browser, &server.url("/ui/streams/order-7?live=1")).await;
    browser
        .eval("window.sameDocument = true; return true;")
        .await;
    // An event opened by hand stays open across the refresh, and keeps the focus.
    browser
        .eval("document.querySelector('#events tr[data-key=\"44\"] summary').focus(); document.querySelector('#events tr[data-key=\"44\"] summary').click(); return true;")
        .await;
    server
        .post(
            "/streams/order-7",
            json!([{"type": "LiveArrival", "data": {}}]),
        )
        .await;
    browser
        .wait_for(
            "window.sameDocument === true && document.querySelector('#events tbody tr').textContent.includes('LiveArrival')",
            Duration::from_secs(10),
        )
        .await;
    let still_open = browser
        .eval("return document.querySelector('#events tr[data-key=\"44\"] details').open;")
        .await;
    assert_eq!(still_open, true);
    let focused = browser
        .eval("return document.activeElement.closest('tr').dataset.key;")
        .await;
    assert_eq!(focused, "44", "the focus stays on the event it was on");
    browser.screenshot("stream-live").await;

    open(&browser, &server.url("/ui")).await;
    browser
        .eval("window.sameDocument = true; return true;")
        .await;
    let head = server.get("/info").await.1["head_position"]
        .as_u64()
        .unwrap();
    server.append_n("order-8", 3).await;
    browser
        .wait_for(
            &format!(
                "window.sameDocument === true && document.querySelector('#head-position').textContent === '{}'",
                head + 3
            ),
            Duration::from_secs(10),
        )
        .await;
    browser.close().await;
}

/// A projection deployed by uploading its `.wasm` in the page goes to its own page, whose
/// progress bar reaches 100% and whose state shows every event counted; a rebuild started
/// from the page switches in with the same digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_deployed_by_upload_reaches_full_progress() {
    let server = Server::start();
    for _ in 0..20 {
        server.append_n("load-1", 1000).await;
    }
    let component = tempfile::Builder::new().suffix(".wasm").tempfile().unwrap();
    std::fs::write(component.path(), common::guest("event-counter")).unwrap();

    let browser = Browser::start().await;
    browser.viewport(DESKTOP.0, DESKTOP.1).await;
    open(&browser, &server.url("/ui/projections")).await;
    browser.type_into("#deploy-name", "uploaded").await;
    browser
        .type_into("#deploy-file", component.path().to_str().unwrap())
        .await;
    click_text(&browser, "Deploy").await;
    browser
        .wait_for(
            "location.pathname === '/ui/projections/uploaded'",
            Duration::from_secs(30),
        )
        .await;
    browser
        .wait_for(
            "document.querySelector('#status .percent').textContent === '100%'",
            Duration::from_secs(60),
        )
        .await;
    browser.screenshot("projection-deployed").await;
    // The state the page shows counts every event.
    open(&browser, &server.url("/ui/projections/uploaded")).await;
    let state = browser
        .eval("return document.querySelector('[aria-labelledby=state-heading] pre').textContent;")
        .await;
    let state: Value = serde_json::from_str(state.as_str().unwrap()).unwrap();
    assert_eq!(state["count"], 20_000, "{state}");
    let digest = browser
        .eval("return document.querySelector('#digest').textContent;")
        .await;
    assert_eq!(digest.as_str().unwrap().len(), 64, "{digest}");

    // A rebuild from the page ends with the same state, switched in, at 100%.
    click_text(&browser, "Rebuild").await;
    browser
        .wait_for(
            "document.querySelector('#flash').textContent === 'Rebuild: done'",
            Duration::from_secs(10),
        )
        .await;
    browser
        .wait_for(
            "!document.querySelector('#status .rebuild') && document.querySelector('#status .percent').textContent === '100%'",
            Duration::from_secs(60),
        )
        .await;
    let (_, status) = server.get("/projections/uploaded").await;
    assert_eq!(status["status"], "running", "{status}");
    assert_eq!(status["position"], 20_000, "{status}");
    assert!(status.get("rebuild").is_none(), "{status}");
    assert_eq!(status["digest"], digest);
    browser.close().await;
}

/// A group created from its form; a message parked by a consumer shows with its reason, and
/// "Replay parked" sends it to the consumers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_message_is_replayed_from_the_group_page() {
    let server = Server::start();
    server.append_n("pay-1", 3).await;
    let browser = Browser::start().await;
    browser.viewport(PHONE.0, PHONE.1).await;
    open(&browser, &server.url("/ui/groups")).await;
    browser.type_into("#group-stream", "pay-1").await;
    browser.type_into("#group-name", "settle").await;
    browser.type_into("#group-start", "start").await;
    browser.type_into("#group-max_retry_count", "3").await;
    click_text(&browser, "Create group").await;
    browser
        .wait_for(
            "location.pathname === '/ui/groups/pay-1/settle'",
            Duration::from_secs(10),
        )
        .await;
    let (_, info) = server.get("/groups/pay-1/settle").await;
    assert_eq!(info["settings"]["max_retry_count"], 3, "{info}");
    assert_eq!(info["settings"]["start_from"], "start", "{info}");

    let mut messages = Vec::new();
    while messages.len() < 3 {
        let (status, body) = server
            .post(
                "/groups/pay-1/settle/pull?consumer=worker&max=3&wait_ms=2000",
                json!(null),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        messages.extend(body["messages"].as_array().unwrap().iter().cloned());
    }
    let ack_id = |n: usize| messages[n]["ack_id"].clone();
    let (status, body) = server
        .post(
            "/groups/pay-1/settle/nack",
            json!({"ack_ids": [ack_id(1)], "action": "park", "reason": "card declined"}),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (status, _) = server
        .post(
            "/groups/pay-1/settle/ack",
            json!({"ack_ids": [ack_id(0), ack_id(2)]}),
        )
        .await;
    assert_eq!(status, 204);

    open(&browser, &server.url("/ui/groups/pay-1/settle")).await;
    browser
        .wait_for(
            "document.querySelector('#parked-count').textContent === '1'",
            Duration::from_secs(10),
        )
        .await;
    let reason = browser
        .eval("return document.querySelector('#parked tbody tr').cells[2].textContent;")
        .await;
    assert_eq!(reason, "card declined");
    browser.screenshot("group-parked-phone").await;
    click_text(&browser, "Replay parked").await;
    browser
        .wait_for(
            "document.querySelector('#flash').textContent === 'Replay parked: done'",
            Duration::from_secs(10),
        )
        .await;

    let (status, body) = server
        .post(
            "/groups/pay-1/settle/pull?consumer=worker&max=3&wait_ms=5000",
            json!(null),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let again = body["messages"].as_array().unwrap();
    assert_eq!(again.len(), 1, "{body}");
    assert_eq!(again[0]["event"]["id"], messages[1]["event"]["id"]);
    browser.close().await;
}

/// Signing in keeps the token in a session cookie; a page shows only what the role may do;
/// actions need the UI's header and the role the API asks for.
#[tokio::test]
async fn sign_in_and_roles() {
    let server = Server::start_with(&[
        "--token",
        "reader:reader-token-1",
        "--token",
        "admin:admin-token-1",
    ]);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    let response = http
        .get(server.url("/ui/projections"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    assert_eq!(
        response.headers()["location"],
        "/ui/login?next=%2Fui%2Fprojections"
    );
    let response = http.get(server.url("/")).send().await.unwrap();
    assert_eq!(response.headers()["location"], "/ui");
    let plain = Server::start();
    for missing in ["/ui/projections/nope", "/ui/groups/nope/none"] {
        let response = plain.http.get(plain.url(missing)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{missing}");
        assert!(response.text().await.unwrap().contains("role=\"alert\""));
    }

    let sign_in = |token: &'static str| {
        http.post(server.url("/ui/login"))
            .form(&[("token", token), ("next", "/ui/projections")])
            .send()
    };
    let refused = sign_in("wrong-token-1").await.unwrap();
    assert_eq!(refused.status(), 401);
    assert!(refused.headers().get("set-cookie").is_none());
    let cookie_of = |response: &reqwest::Response| {
        let cookie = response.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        assert!(!cookie.contains("Expires") && !cookie.contains("Max-Age"));
        cookie.split(';').next().unwrap().to_owned()
    };
    let reader = sign_in("reader-token-1").await.unwrap();
    assert_eq!(reader.status(), 303);
    assert_eq!(reader.headers()["location"], "/ui/projections");
    let reader = cookie_of(&reader);
    let admin = cookie_of(&sign_in("admin-token-1").await.unwrap());

    let page = |cookie: String, path: &'static str| {
        let request = http.get(server.url(path)).header("cookie", cookie);
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    let as_reader = page(reader.clone(), "/ui/projections/%24by_category").await;
    let as_admin = page(admin.clone(), "/ui/projections/%24by_category").await;
    assert!(as_reader.contains("$by_category") && !as_reader.contains(">Reset<"));
    assert!(as_admin.contains(">Reset<") && as_admin.contains(">Stop<"));
    let as_reader = page(reader.clone(), "/ui/projections").await;
    assert!(!as_reader.contains("Deploy a projection"));
    assert!(
        page(admin.clone(), "/ui/projections")
            .await
            .contains("Deploy a projection")
    );

    // Actions: the UI's header is required, then the API's own role check answers.
    let act = |cookie: &str, header: bool| {
        let mut request = http
            .post(server.url("/ui/api/streams/ui-1"))
            .header("cookie", cookie)
            .json(&json!([{"type": "Made", "data": {}}]));
        if header {
            request = request.header("x-refract-ui", "1");
        }
        request.send()
    };
    let response = act(&admin, false).await.unwrap();
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "forbidden");
    assert_eq!(act(&reader, true).await.unwrap().status(), 403);
    assert_eq!(act(&admin, true).await.unwrap().status(), 200);
    let read = http
        .get(server.url("/ui/api/streams/ui-1"))
        .header("cookie", &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    let anonymous = http
        .get(server.url("/ui/api/streams/ui-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    // Another site's pages can neither sign a visitor in or out, nor act, nor frame the UI.
    let forged = http
        .post(server.url("/ui/login"))
        .header("sec-fetch-site", "cross-site")
        .form(&[("token", "admin-token-1")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    assert!(forged.headers().get("set-cookie").is_none());
    let forged = http
        .post(server.url("/ui/api/streams/ui-1"))
        .header("cookie", &admin)
        .header("x-refract-ui", "1")
        .header("origin", "http://elsewhere.example")
        .json(&json!([{"type": "Forged", "data": {}}]))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    let page = http
        .get(server.url("/ui"))
        .header("cookie", &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    let policy = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    let events: Value = http
        .get(server.url("/ui/api/streams/ui-1"))
        .header("cookie", &reader)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(events["events"].as_array().unwrap().len(), 1, "{events}");

    // Signing out drops the cookie.
    let out = http
        .post(server.url("/ui/logout"))
        .header("cookie", &admin)
        .send()
        .await
        .unwrap();
    assert!(
        out.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}
