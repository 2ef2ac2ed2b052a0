//! The HTTP API: axum routes over the store, JSON errors, auth, SSE, OpenAPI and metrics.
//!
//! Every route is registered through `utoipa_axum`, so the router and the OpenAPI document are
//! built from the same list and cannot drift apart.

pub mod auth;
mod cluster;
mod connectors;
pub mod error;
mod forward;
mod groups;
pub mod openapi;
mod operations;
mod projections;
pub mod raft;
mod sharders;
mod streams;
mod subscriptions;
pub mod tls;
mod ui;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::cluster::node::{Node, NodeConfig};
use crate::metrics::{Metrics, RouteLabels};
use crate::processing::{Processing, ProcessingHost};
use crate::projections::component::Runtime;
use crate::sandbox::Sandbox;
use crate::store::{Store, StoreOptions};
pub use auth::{Role, Tokens};
pub use cluster::node_status;

/// Largest request body; [`error::read_whole_body`] enforces it.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
/// How long shutdown waits for open requests before it closes the store anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What every handler reaches, behind one `Arc`: axum clones the state for each request.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl std::ops::Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

pub struct Services {
    pub store: Store,
    /// The Wasm projections, groups and sharders, where this node runs them.
    pub processing: ProcessingHost,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the server shuts down; ends long-lived responses such as SSE.
    pub shutdown: CancellationToken,
    pub data_dir: PathBuf,
    /// Interval of the comment lines that keep idle SSE connections alive.
    pub heartbeat: Duration,
    /// The cluster this server is a node of, if any.
    pub node: Option<Arc<Node>>,
    openapi: Arc<String>,
}

impl Services {
    /// The projections, groups and sharders, or `421` naming the leader, which runs them.
    pub fn processing(&self) -> Result<Processing, error::ApiError> {
        Ok(self.processing.get()?)
    }
}

/// The routes and the OpenAPI document describing exactly them. Each route is declared in the
/// router of the role it needs, whose layer checks the caller's token; the document states the
/// same role on every operation.
fn routes(tokens: &Arc<Tokens>) -> (Router<AppState>, serde_json::Value) {
    let public = OpenApiRouter::new()
        .routes(routes!(operations::health))
        .routes(routes!(operations::openapi));
    let reader = OpenApiRouter::new()
        .routes(routes!(streams::read_all))
        .routes(routes!(streams::read_stream))
        .routes(routes!(streams::get_metadata))
        .routes(routes!(subscriptions::subscribe_all))
        .routes(routes!(subscriptions::subscribe_stream))
        .routes(routes!(projections::list))
        .routes(routes!(projections::status))
        .routes(routes!(projections::get_state))
        .routes(routes!(projections::get_rows))
        .routes(routes!(projections::get_row))
        .routes(routes!(projections::get_config))
        .routes(routes!(projections::partitions))
        .routes(routes!(projections::parked))
        .routes(routes!(sharders::list))
        .routes(routes!(sharders::download))
        .routes(routes!(sharders::shard))
        .routes(routes!(groups::list))
        .routes(routes!(groups::info))
        .routes(routes!(groups::parked))
        .routes(routes!(operations::info))
        .routes(routes!(operations::metrics))
        .routes(routes!(cluster::status))
        .routes(routes!(connectors::list))
        .routes(routes!(connectors::get));
    let writer = OpenApiRouter::new()
        .routes(routes!(streams::append))
        .routes(routes!(streams::put_metadata))
        .routes(routes!(groups::pull))
        .routes(routes!(groups::subscribe))
        .routes(routes!(groups::ack))
        .routes(routes!(groups::nack))
        .routes(routes!(groups::commit));
    let admin = OpenApiRouter::new()
        .routes(routes!(streams::delete_stream))
        .routes(routes!(projections::deploy, projections::delete))
        .routes(routes!(projections::start))
        .routes(routes!(projections::stop))
        .routes(routes!(projections::reset))
        .routes(routes!(projections::rebuild, projections::cancel_rebuild))
        .routes(routes!(projections::put_config))
        .routes(routes!(projections::skip))
        .routes(routes!(sharders::deploy, sharders::delete))
        .routes(routes!(groups::put, groups::delete))
        .routes(routes!(groups::replay_parked))
        .routes(routes!(cluster::add_learner))
        .routes(routes!(cluster::set_voters))
        .routes(routes!(cluster::remove_member))
        .routes(routes!(connectors::put, connectors::delete))
        .routes(routes!(connectors::start))
        .routes(routes!(connectors::stop))
        .routes(routes!(connectors::reset));
    let (router, document) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(public)
        .merge(auth::guard(reader, Role::Reader, tokens))
        .merge(auth::guard(writer, Role::Writer, tokens))
        .merge(auth::guard(admin, Role::Admin, tokens))
        .split_for_parts();
    (router, openapi::document(document))
}

/// Builds the application: routes, fallbacks, limits, auth and request metrics; on a node of a
/// cluster, the routes of Raft's messages too.
#[allow(clippy::too_many_arguments)]
pub fn app(
    store: Store,
    processing: ProcessingHost,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    node: Option<Arc<Node>>,
    config: ServeConfig,
) -> Router {
    let raft_routes = node.as_ref().map(|node| {
        let secret = config
            .cluster
            .as_ref()
            .and_then(|cluster| cluster.secret.clone());
        raft::routes(node.clone(), secret)
    });
    let forwards = config
        .cluster
        .as_ref()
        .is_some_and(|cluster| cluster.forward_writes);
    let forwarder = node
        .clone()
        .filter(|_| forwards)
        .map(|node| Arc::new(forward::Forwarder::new(node)));
    let tokens = Arc::new(config.tokens);
    let cors = cors(config.cors_origins);
    let (router, document) = routes(&tokens);
    let openapi =
        Arc::new(serde_json::to_string_pretty(&document).expect("the OpenAPI document serialises"));
    let state = AppState(Arc::new(Services {
        store,
        processing,
        metrics: metrics.clone(),
        shutdown,
        data_dir: config.data_dir,
        heartbeat: config.sse_heartbeat,
        node,
        openapi,
    }));
    let grpc = crate::grpc::routes(crate::grpc::Context {
        store: state.store.clone(),
        processing: state.processing.clone(),
        shutdown: state.shutdown.clone(),
        node: state.node.clone(),
        tokens: tokens.clone(),
    });
    let tokens_for_ui = tokens.clone();
    let api = router
        .fallback(error::no_route)
        .method_not_allowed_fallback(error::wrong_method)
        .layer(middleware::from_fn_with_state(tokens, auth::admit))
        .layer(tower::util::option_layer(forwarder.map(|forwarder| {
            middleware::from_fn_with_state(forwarder, forward::forward_to_leader)
        })))
        .layer(middleware::from_fn(error::read_whole_body));
    // The UI calls the API below the request metrics, so its own reads do not count as the
    // API's traffic; its routes sit beside the API's and add nothing to their requests.
    let ui = ui::routes(
        api.clone().with_state(state.clone()),
        state.clone(),
        tokens_for_ui,
    );
    let app = api
        .layer(middleware::from_fn_with_state(metrics, record_request))
        // Outermost: a preflight is answered before auth, which it carries no token for.
        .layer(tower::util::option_layer(cors))
        .with_state(state)
        .merge(ui);
    // Added after the layers, which then leave them alone: EventStoreDB's gRPC calls stream
    // (the layers buffer bodies) and check callers themselves; Raft's messages are checked by
    // their own (the cluster's secret), and an append or a snapshot may exceed a request's
    // size limit.
    let app = app.merge(grpc);
    match raft_routes {
        Some(raft_routes) => app.merge(raft_routes),
        None => app,
    }
}

/// CORS for pages of `origins`: the API's methods and headers, and `Last-Event-ID` so an
/// `EventSource` resumes where it was. Bearer tokens travel in a header, so no credentials.
fn cors(origins: Vec<HeaderValue>) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::ACCEPT,
                HeaderName::from_static("expected-revision"),
                HeaderName::from_static("last-event-id"),
            ])
            .max_age(Duration::from_secs(3600)),
    )
}

async fn record_request(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    let labels = RouteLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    metrics.record_request(&labels, started.elapsed());
    response
}

/// What `refract serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub tokens: Tokens,
    pub store: StoreOptions,
    /// Interval of SSE heartbeat comments.
    pub sse_heartbeat: Duration,
    /// Limits for Wasm guests.
    pub sandbox: Sandbox,
    /// Threads a partitioned projection's batches run on (1: in log order on one).
    pub partition_workers: usize,
    /// Web origins whose pages may call the API (CORS).
    pub cors_origins: Vec<HeaderValue>,
    /// Run as a node of a cluster; `None`: a single node.
    pub cluster: Option<ClusterOptions>,
    /// Serve HTTPS (and gRPC over TLS) with this certificate; `None`: plain HTTP and h2c.
    pub tls: Option<tls::TlsFiles>,
}

/// A node's place in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// This node's id, unique in the cluster and never reused.
    pub node_id: u64,
    /// The other voters, by id: the `host:port` their API listens on.
    pub peers: std::collections::BTreeMap<u64, String>,
    /// Other nodes reached through another `host:port` than their URL (a proxy), by id.
    pub routes: std::collections::BTreeMap<u64, String>,
    /// A node of an existing cluster to join as a learner, instead of forming one.
    pub join: Option<String>,
    /// Where the other nodes reach this one; `None`: `http://` and the listening address.
    pub advertise_url: Option<String>,
    pub snapshots: crate::cluster::node::SnapshotTuning,
    /// What nodes show each other; Raft's routes refuse a message without it. Without one,
    /// they take messages from loopback only.
    pub secret: Option<String>,
    /// Pass what only the leader answers on to it, instead of answering `421`.
    pub forward_writes: bool,
}

/// Runs the server until SIGTERM or Ctrl-C, then drains requests and closes the store.
/// Prints `refract listening on http://ADDRESS` on stdout once it accepts connections.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    serve_until(config, shutdown_signal(), |address| {
        println!("refract listening on {scheme}://{address}");
    })
    .await
}

/// Runs the server until `stop` completes. `ready` is called with the bound address.
pub async fn serve_until(
    config: ServeConfig,
    stop: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    let started = Instant::now();
    let metrics = Arc::new(Metrics::new());
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener.local_addr()?;
    let tls = config
        .tls
        .as_ref()
        .map(tls::TlsFiles::server_config)
        .transpose()?;
    let cannot_open = || format!("cannot open the store in {}", config.data_dir.display());
    let (store, node) = match &config.cluster {
        None => {
            let store = Store::open(&config.data_dir, config.store.clone(), metrics.clone())
                .with_context(cannot_open)?;
            (store, None)
        }
        Some(cluster) => {
            let url = match &cluster.advertise_url {
                Some(url) => url.trim_end_matches('/').to_owned(),
                None if address.ip().is_unspecified() => anyhow::bail!(
                    "listening on {address}, which other nodes cannot reach: give \
                     --advertise-url (as the other nodes name this one in --peer)"
                ),
                None => format!("http://{address}"),
            };
            let node_config = NodeConfig {
                id: cluster.node_id,
                url,
                peers: cluster
                    .peers
                    .iter()
                    .map(|(id, address)| (*id, format!("http://{address}")))
                    .collect(),
                routes: cluster
                    .routes
                    .iter()
                    .map(|(id, address)| (*id, format!("http://{address}")))
                    .collect(),
                secret: cluster.secret.clone(),
                join: cluster.join.is_some(),
                snapshots: cluster.snapshots,
            };
            let node = Node::start(
                &node_config,
                &config.data_dir,
                config.store.clone(),
                metrics.clone(),
            )
            .await
            .with_context(cannot_open)?;
            (node.store.clone(), Some(Arc::new(node)))
        }
    };
    let runtime = Runtime::new(config.data_dir.join("compiled"), config.sandbox)
        .context("cannot start the WebAssembly runtime")?
        .with_partition_workers(config.partition_workers);
    let processing = match &node {
        None => ProcessingHost::single(&store, &runtime).await?,
        Some(node) => ProcessingHost::on_leader(node.clone(), runtime),
    };
    if config.tokens.is_empty() {
        tracing::warn!("no tokens configured: only loopback clients are accepted");
    }
    if !config.store.durable {
        tracing::warn!("fsync is off: acknowledged appends can be lost on a power failure");
    }
    tracing::info!(
        %address,
        data_dir = %config.data_dir.display(),
        head_position = store.head(),
        startup_ms = started.elapsed().as_millis() as u64,
        "refract is listening"
    );
    let shutdown = CancellationToken::new();
    let join = config
        .cluster
        .as_ref()
        .and_then(|cluster| cluster.join.clone());
    let app = app(
        store.clone(),
        processing.clone(),
        metrics,
        shutdown.clone(),
        node.clone(),
        config,
    );
    ready(address);
    if let (Some(node), Some(join)) = (&node, join) {
        tokio::spawn(join_cluster(join, node.id, node.url.clone()));
    }
    let stopping = shutdown.clone();
    // Tapping each connection (with nothing) gives a listener of our own the connect info
    // that axum gives a bare TcpListener.
    let incoming = tls::Incoming::new(listener, tls)?.tap_io(|_| {});
    let server = axum::serve(
        incoming,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        stop.await;
        tracing::info!("shutting down: finishing open requests");
        stopping.cancel();
    });
    tokio::select! {
        result = server => result.context("the HTTP server failed")?,
        () = async { shutdown.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            tracing::warn!("open requests did not finish in time; closing anyway");
        }
    }
    // A cluster node without a majority cannot commit the groups' last checkpoints: what they
    // would record is in the log already, or is delivered again.
    if tokio::time::timeout(SHUTDOWN_GRACE, processing.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("projections and groups did not stop in time; stopping anyway");
    }
    match node {
        Some(node) => node.shutdown().await,
        None => store.shutdown().await,
    }
    tracing::info!("stopped");
    Ok(())
}

/// Asks a cluster to take this node as a learner, until it does.
async fn join_cluster(cluster: String, id: u64, url: String) {
    let client = match crate::client::Client::new(&cluster, None) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot join the cluster");
            return;
        }
    };
    loop {
        match client.add_learner(id, &url).await {
            Ok(_) => {
                tracing::info!(%cluster, "joined the cluster as a learner");
                return;
            }
            Err(error) => {
                tracing::warn!(%cluster, error = %format!("{error:#}"), "cannot join the cluster yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
