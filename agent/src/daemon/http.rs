//! The local HTTP endpoint: trigger a backup, see runs, health, metrics.
//!
//! JSON everywhere; every error is an [`ErrorResponse`] with the right status.
//! `POST` can require a bearer token (compared in constant time) and is
//! rate-limited per client ([`TriggerLimiter`]); health and metrics stay open
//! so probes and Prometheus need no secret. `GET /v1/openapi.json` describes
//! it all; tests hold that document to the routes and types served here.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::connect_info::ConnectInfo;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::handler::Handler;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::{Extension, Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use etcd_backup_proto::api::{ErrorResponse, Readiness, RunList, RunRecord, RunState, Trigger};

use crate::daemon::metrics::Metrics;
use crate::daemon::runner::{RunHandle, Runner, StartError};

/// Largest request body accepted (the API takes none; this bounds abuse).
pub const MAX_BODY: usize = 4096;

/// How long the body of an authorised `POST` may take to arrive whole once
/// its headers are in; a slower one is answered `408` and the connection
/// closed, so a client that sends a `Content-Length` and then stalls holds
/// its connection no longer than the header timeout would.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Most clients the trigger rate limit remembers at once. Only clients whose
/// trigger started a run are remembered, and runs are one at a time, so
/// reaching this takes that many runs within one `http.trigger_min_interval`.
pub const MAX_LIMITED_CLIENTS: usize = 1024;

/// The OpenAPI 3.1 document of [`router`]; `info.version` is filled in when served.
const OPENAPI: &str = include_str!("openapi.json");

/// What readiness is made of, set by the daemon as it learns things.
#[derive(Debug, Default)]
pub struct ReadyFlags {
    /// etcd answered a status call (the latest probe, or a successful run).
    pub etcd: AtomicBool,
    /// The destination was reached at least once.
    pub destination: AtomicBool,
}

/// What the handlers share.
pub struct AppState {
    /// The single-flight gate and run history.
    pub runner: Arc<Runner>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// SHA-256 of the bearer token, when `POST` requires one.
    pub token_sha256: Option<[u8; 32]>,
    /// Readiness inputs.
    pub ready: Arc<ReadyFlags>,
    /// This node's complete sets, newest first, from the last catalog scan.
    pub sets: Arc<std::sync::RwLock<Vec<etcd_backup_proto::api::SetSummary>>>,
    /// The per-client rate limit of `POST /v1/backups`.
    pub limiter: TriggerLimiter,
}

/// At most one accepted trigger per client (peer IP address) per interval.
///
/// A trigger is "accepted" when it started a run; a `409` (run in progress),
/// `401` or `400` costs nothing. The limiter also serialises the admission of
/// HTTP triggers, so the order of answers stays: `503` shutting down, `409`
/// in progress, `429` too soon, then the run starts.
///
/// Memory is bounded: expired entries are dropped on every accepted trigger,
/// and at most [`MAX_LIMITED_CLIENTS`] live ones are kept. When that many
/// distinct clients started runs within one interval, new clients are refused
/// until the oldest entry expires: the limit fails closed, never open.
#[derive(Debug)]
pub struct TriggerLimiter {
    interval: Duration,
    ledger: Mutex<Ledger>,
}

/// Why a trigger did not start a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The runner refused (in progress, shutting down).
    Start(StartError),
    /// This client started a run less than the interval ago.
    TooSoon {
        /// How long until the client may trigger again.
        retry_after: Duration,
        /// The run this client started last.
        run_id: String,
    },
    /// The limiter is full of clients that are all still limited.
    Full {
        /// How long until the oldest entry expires.
        retry_after: Duration,
    },
}

/// Per client: when its last accepted trigger came, and the run it started.
#[derive(Debug, Default)]
struct Ledger {
    entries: HashMap<IpAddr, (Instant, String)>,
}

impl Ledger {
    /// Whether `client` may start a run at `now`; drops expired entries.
    fn check(&mut self, interval: Duration, client: IpAddr, now: Instant) -> Result<(), Refusal> {
        if let Some((at, run_id)) = self.entries.get(&client) {
            let free_at = *at + interval;
            if now < free_at {
                return Err(Refusal::TooSoon {
                    retry_after: free_at - now,
                    run_id: run_id.clone(),
                });
            }
        }
        self.entries.retain(|_, (at, _)| now < *at + interval);
        if self.entries.len() >= MAX_LIMITED_CLIENTS {
            let oldest = self
                .entries
                .values()
                .map(|(at, _)| *at)
                .min()
                .unwrap_or(now);
            return Err(Refusal::Full {
                retry_after: (oldest + interval).saturating_duration_since(now),
            });
        }
        Ok(())
    }

    /// `client` started `run_id` at `now` (after a successful [`Ledger::check`]).
    fn record(&mut self, client: IpAddr, now: Instant, run_id: String) {
        self.entries.insert(client, (now, run_id));
    }
}

impl TriggerLimiter {
    /// A limiter for `interval` (`http.trigger_min_interval`); zero disables it.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            ledger: Mutex::new(Ledger::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ledger> {
        // Plain data: a panic elsewhere while holding it leaves it usable.
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many clients are remembered now.
    pub fn tracked(&self) -> usize {
        self.lock().entries.len()
    }

    /// Starts a run for `client` through `runner` unless the runner refuses
    /// or `client` started one less than the interval ago.
    ///
    /// # Errors
    /// [`Refusal`]: why no run was started.
    pub fn admit(&self, client: IpAddr, runner: &Arc<Runner>) -> Result<RunHandle, Refusal> {
        let client = client.to_canonical();
        // Held until the run is started (no await): admissions are serial.
        let mut ledger = self.lock();
        // The runner's own order first, so a busy or stopping agent answers as
        // it did before there was a limit.
        if !runner.is_accepting() {
            return Err(Refusal::Start(StartError::ShuttingDown));
        }
        if let Some(current) = runner.current() {
            return Err(Refusal::Start(StartError::InProgress {
                id: current.record.id,
            }));
        }
        let now = Instant::now();
        if !self.interval.is_zero() {
            ledger.check(self.interval, client, now)?;
        }
        let handle = runner.start(Trigger::Http).map_err(Refusal::Start)?;
        if !self.interval.is_zero() {
            ledger.record(client, now, handle.record.id.clone());
        }
        Ok(handle)
    }
}

/// Whole seconds, rounded up, at least 1: the `Retry-After` value for `d`.
pub fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("token_required", &self.token_sha256.is_some())
            .field("limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of a token, the form [`AppState::token_sha256`] holds: comparing
/// fixed-length digests in constant time leaks neither content nor length.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn error(status: StatusCode, message: impl Into<String>, run_id: Option<String>) -> Response {
    (
        status,
        Json(ErrorResponse {
            error: message.into(),
            run_id,
        }),
    )
        .into_response()
}

/// A router and the list of what it routes, built together so the list
/// cannot leave a route out; tests hold the OpenAPI document to the list.
struct Api {
    router: Router<Arc<AppState>>,
    routes: Vec<(&'static str, Method)>,
}

impl Api {
    fn new() -> Self {
        Self {
            router: Router::new(),
            routes: Vec::new(),
        }
    }

    /// Routes `method` on `path` to `handler` (a `GET` answers `HEAD` too).
    fn route<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, Arc<AppState>>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone())
            .unwrap_or_else(|_| panic!("axum cannot route {method}"));
        self.router = self.router.route(path, on(filter, handler));
        self.routes.push((path, method));
        self
    }
}

/// Health, readiness and metrics: on both listeners.
fn open_routes() -> Api {
    Api::new()
        .route(Method::GET, "/healthz", healthz)
        .route(Method::GET, "/readyz", readyz)
        .route(Method::GET, "/metrics", metrics)
}

/// Everything the API listener serves.
fn api_routes() -> Api {
    open_routes()
        .route(Method::GET, "/v1/backups", list_runs)
        .route(Method::POST, "/v1/backups", start_run)
        .route(Method::GET, "/v1/backups/{id}", get_run)
        .route(Method::GET, "/v1/openapi.json", openapi)
}

/// Every (path, method) [`router`] serves, paths in axum's `{param}` form,
/// which is also OpenAPI's. `HEAD` is implied by `GET` and not listed.
pub fn routes() -> Vec<(&'static str, Method)> {
    api_routes().routes
}

/// JSON answers for unknown paths and wrong methods, the body limit, and the state.
fn finish(routes: Router<Arc<AppState>>, not_found: &'static str, state: Arc<AppState>) -> Router {
    routes
        .fallback(move || async move { error(StatusCode::NOT_FOUND, not_found, None) })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this path",
                None,
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// The API's routes.
pub fn router(state: Arc<AppState>) -> Router {
    finish(
        api_routes().router,
        "no such path; GET /v1/openapi.json describes the API",
        state,
    )
}

/// The read-only routes for `http.metrics_listen`: metrics and health, no
/// trigger and no run details, so exposing it on the node's address gives
/// nothing away and lets nobody start a backup.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    finish(
        open_routes().router,
        "this listener serves only /metrics, /healthz and /readyz",
        state,
    )
}

/// What one listener allows a connection: the figures docs/http-api.md gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// A request's headers must arrive whole within this time after the
    /// connection is accepted, or it is closed (slowloris). Connections serve
    /// one request each (no keep-alive), so this is also the idle timeout.
    pub header_read_timeout: Duration,
    /// Connections served at once; one more is closed as soon as it is
    /// accepted, so idle clients cannot use up the process's file descriptors
    /// (the other listener and the etcd connection need theirs).
    pub max_connections: usize,
    /// Connections served at once for one peer address; one more from that
    /// address is closed as soon as it is accepted. One client (one address)
    /// can then hold at most this many of [`ConnectionLimits::max_connections`],
    /// and Prometheus, scraping from another address, still gets in.
    pub max_per_peer: usize,
}

impl ConnectionLimits {
    /// 10 s for the headers, 128 connections per listener, 8 per peer address.
    pub const DEFAULT: Self = Self {
        header_read_timeout: Duration::from_secs(10),
        max_connections: 128,
        max_per_peer: 8,
    };

    /// The limits for the API listener (`http.listen`) bound to `addr`. On
    /// loopback every client is this node itself (the kubelet's probes,
    /// `trigger`, an admin's `curl`), all from one address, so a cap per
    /// address would only turn the node's own requests away (a volley of
    /// POSTs gets its 409s, not closed connections): there only the total
    /// cap applies. Elsewhere (a token-protected remote listener) the
    /// [`ConnectionLimits::DEFAULT`] caps hold.
    pub fn api(addr: std::net::SocketAddr) -> Self {
        if addr.ip().is_loopback() {
            Self {
                max_per_peer: Self::DEFAULT.max_connections,
                ..Self::DEFAULT
            }
        } else {
            Self::DEFAULT
        }
    }
}

/// Why a connection was closed as soon as it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crowded {
    /// Its peer address already has [`ConnectionLimits::max_per_peer`] open.
    Peer,
    /// The listener already serves [`ConnectionLimits::max_connections`].
    Listener,
}

/// The connections a listener serves, counted in total and per peer address.
#[derive(Debug)]
struct Slots {
    limits: ConnectionLimits,
    open: Mutex<OpenConnections>,
}

#[derive(Debug, Default)]
struct OpenConnections {
    total: usize,
    /// Peers with at least one open connection (so at most `total` entries).
    by_peer: HashMap<IpAddr, usize>,
}

/// One served connection's place in [`Slots`], given back when dropped.
#[derive(Debug)]
struct Slot {
    slots: Arc<Slots>,
    peer: IpAddr,
}

impl Slots {
    fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            open: Mutex::new(OpenConnections::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, OpenConnections> {
        // Plain counters: a panic elsewhere while holding it leaves them usable.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a connection from `peer` (IPv4-mapped IPv6 counts as the
    /// IPv4 address), unless its address or the listener is full.
    fn take(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Crowded> {
        let peer = peer.to_canonical();
        let mut open = self.lock();
        let mine = open.by_peer.get(&peer).copied().unwrap_or(0);
        if mine >= self.limits.max_per_peer {
            return Err(Crowded::Peer);
        }
        if open.total >= self.limits.max_connections {
            return Err(Crowded::Listener);
        }
        open.total += 1;
        open.by_peer.insert(peer, mine + 1);
        Ok(Slot {
            slots: self.clone(),
            peer,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.by_peer.remove(&self.peer);
            }
        }
    }
}

/// Serves `router` on an already-bound listener until `shutdown` completes,
/// within [`ConnectionLimits::DEFAULT`]. Handlers see the peer's address (the
/// rate limit's client).
///
/// # Errors
/// Accept-loop I/O failures.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, router, shutdown, ConnectionLimits::DEFAULT).await
}

/// [`serve`] with the given limits. On `shutdown` it stops accepting and
/// waits for the requests in progress to be answered.
///
/// # Errors
/// Accept-loop I/O failures other than a momentary one (a connection reset
/// before it was accepted, out of file descriptors: those are logged and the
/// loop goes on after a pause).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: ConnectionLimits,
) -> std::io::Result<()> {
    let slots = Slots::new(limits);
    let connections = tokio_util::task::TaskTracker::new();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept an HTTP connection; trying again in 100ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let slot = match slots.take(peer.ip()) {
            Ok(slot) => slot,
            Err(Crowded::Peer) => {
                tracing::debug!(%peer, max = limits.max_per_peer, "HTTP connection refused: too many open from this address");
                drop(stream);
                continue;
            }
            Err(Crowded::Listener) => {
                tracing::debug!(%peer, max = limits.max_connections, "HTTP connection refused: too many open");
                drop(stream);
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(
            router.clone().layer(Extension(ConnectInfo(peer))),
        );
        let stop = stop.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .keep_alive(false);
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = builder.serve_connection(io, service);
            tokio::pin!(conn);
            // On shutdown an idle connection closes at once; a request in
            // progress is answered first.
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
            drop(slot);
        });
    }
    stop.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartParams {
    #[serde(default)]
    wait: bool,
}

/// `None` when the request may go on, else the 401 to answer.
fn unauthorized(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let want = state.token_sha256.as_ref()?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| token_digest(t.trim()));
    match given {
        Some(g) if bool::from(g.ct_eq(want)) => None,
        _ => {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token: send `Authorization: Bearer <token>` with the token from http.token_file",
                None,
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Some(r)
        }
    }
}

fn finished_response(record: RunRecord) -> Response {
    let status = if record.state == RunState::Succeeded {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    (status, Json(record)).into_response()
}

async fn start_run(
    State(state): State<Arc<AppState>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    params: Result<Query<StartParams>, QueryRejection>,
    body: Body,
) -> Response {
    // The token before anything else, the body included: a client without
    // it makes the agent read nothing more than its headers.
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    let body = read_small_body(&headers, body).await;
    let wait = match wait_without_body(params, body) {
        Ok(wait) => wait,
        Err(r) => return *r,
    };
    // Without connection info (a router driven in-process) all callers are
    // one client.
    let client = peer.map_or(
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        |Extension(ConnectInfo(a))| a.ip(),
    );
    let started = match admit(&state, client) {
        Ok(started) => started,
        Err(r) => return *r,
    };
    match started {
        Ok(handle) if wait => finished_response(handle.finished().await),
        Ok(handle) => (StatusCode::ACCEPTED, Json(handle.record)).into_response(),
        Err(StartError::InProgress { id }) if wait => match state.runner.current() {
            Some(current) => finished_response(current.finished().await),
            // Finished between the two looks: answer with its record.
            None => match state.runner.get(&id) {
                Some(r) => finished_response(r),
                None => error(
                    StatusCode::CONFLICT,
                    "a backup was in progress and is gone; try again",
                    Some(id),
                ),
            },
        },
        Err(e @ StartError::InProgress { .. }) => {
            let StartError::InProgress { id } = &e else {
                unreachable!()
            };
            let id = id.clone();
            error(
                StatusCode::CONFLICT,
                format!("{e}; poll GET /v1/backups/{id}, or POST with ?wait=true to wait for it"),
                Some(id),
            )
        }
        Err(e @ StartError::ShuttingDown) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), None)
        }
    }
}

/// Why a request body was not read.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    /// More than [`MAX_BODY`] bytes (announced or sent).
    #[error("the request body is larger than {MAX_BODY} bytes")]
    TooLarge,
    /// Not whole within [`BODY_READ_TIMEOUT`].
    #[error("the request body did not arrive within {} s", BODY_READ_TIMEOUT.as_secs())]
    TooSlow,
    /// The connection failed while it was read.
    #[error("the request body could not be read: {0}")]
    Broken(axum::Error),
}

/// The body, at most [`MAX_BODY`] bytes read within [`BODY_READ_TIMEOUT`];
/// a larger `Content-Length` is refused before a byte of it is read.
async fn read_small_body(headers: &HeaderMap, body: Body) -> Result<Bytes, BodyError> {
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(BodyError::TooLarge);
    }
    let read = async {
        let mut stream = body.into_data_stream();
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(BodyError::Broken)?;
            if out.len() + chunk.len() > MAX_BODY {
                return Err(BodyError::TooLarge);
            }
            out.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(out))
    };
    tokio::time::timeout(BODY_READ_TIMEOUT, read)
        .await
        .unwrap_or(Err(BodyError::TooSlow))
}

/// The query's `wait` flag, if the request has no body (or `{}`); else the
/// `400`, `408` or `413` to answer with.
fn wait_without_body(
    params: Result<Query<StartParams>, QueryRejection>,
    body: Result<Bytes, BodyError>,
) -> Result<bool, Box<Response>> {
    let wait = match params {
        Ok(Query(p)) => p.wait,
        Err(e) => {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "bad query: {}; the only parameter is wait=true|false",
                    e.body_text()
                ),
                None,
            )))
        }
    };
    match body {
        Ok(b) if b.iter().all(u8::is_ascii_whitespace) || b.as_ref() == b"{}" => {}
        Ok(_) => {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "this endpoint takes no request body (or {})",
                None,
            )))
        }
        Err(e) => {
            let status = match e {
                BodyError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                BodyError::TooSlow => StatusCode::REQUEST_TIMEOUT,
                BodyError::Broken(_) => StatusCode::BAD_REQUEST,
            };
            return Err(Box::new(error(
                status,
                format!("{e}; this endpoint takes no request body (or {{}})"),
                None,
            )));
        }
    }
    Ok(wait)
}

/// The rate limit's verdict for `client`: a started run (or the runner's
/// refusal), or the `429` to answer with.
fn admit(
    state: &AppState,
    client: IpAddr,
) -> Result<Result<crate::daemon::runner::RunHandle, StartError>, Box<Response>> {
    let started = match state.limiter.admit(client, &state.runner) {
        Ok(handle) => Ok(handle),
        Err(Refusal::Start(e)) => Err(e),
        Err(Refusal::TooSoon {
            retry_after,
            run_id,
        }) => {
            state.metrics.http_rate_limited();
            let secs = retry_after_secs(retry_after);
            return Err(Box::new(too_many(
                secs,
                format!(
                    "too many backup triggers: {} started backup {run_id} less than {} ago (http.trigger_min_interval); retry in {secs} s, or follow that run with GET /v1/backups/{run_id}",
                    client.to_canonical(),
                    humantime::format_duration(state.limiter.interval),
                ),
                Some(run_id),
            )));
        }
        Err(Refusal::Full { retry_after }) => {
            state.metrics.http_rate_limited();
            let secs = retry_after_secs(retry_after);
            return Err(Box::new(too_many(
                secs,
                format!(
                    "too many backup triggers: more than {MAX_LIMITED_CLIENTS} clients started backups within {} (http.trigger_min_interval); retry in {secs} s",
                    humantime::format_duration(state.limiter.interval),
                ),
                None,
            )));
        }
    };
    Ok(started)
}

/// `429` with `Retry-After: secs`.
fn too_many(secs: u64, message: String, run_id: Option<String>) -> Response {
    let mut r = error(StatusCode::TOO_MANY_REQUESTS, message, run_id);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

async fn list_runs(State(state): State<Arc<AppState>>) -> Response {
    let sets = state.sets.read().map(|s| s.clone()).unwrap_or_default();
    Json(RunList {
        runs: state.runner.list(),
        sets,
    })
    .into_response()
}

async fn get_run(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let Ok(Path(id)) = id else {
        // Not UTF-8 once percent-decoded: no run has such an id.
        return error(
            StatusCode::NOT_FOUND,
            "no backup run with that id (it is not valid percent-encoded UTF-8)",
            None,
        );
    };
    match state.runner.get(&id) {
        Some(r) => Json(r).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no backup run {id:?} (the agent remembers its last runs since it started)"),
            None,
        ),
    }
}

async fn healthz() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let etcd = state.ready.etcd.load(Ordering::Relaxed);
    let destination = state.ready.destination.load(Ordering::Relaxed);
    let body = Readiness {
        ready: etcd && destination,
        config: true,
        etcd,
        destination,
    };
    let status = if body.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// The OpenAPI document with this build's version.
pub fn openapi_document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc: serde_json::Value =
            serde_json::from_str(OPENAPI).expect("openapi.json is valid JSON (unit-tested)");
        doc["info"]["version"] = crate::backup::AGENT_VERSION.into();
        doc.to_string()
    })
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi_document(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Environment};
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    /// A state whose runs back up from `etcd` into a temp dir.
    fn state(
        etcd: &str,
        dial_timeout: &str,
        dir: &std::path::Path,
        interval: Duration,
        token: Option<&str>,
    ) -> Arc<AppState> {
        let text = format!(
            "node_name: n\netcd:\n  endpoints: [\"{etcd}\"]\n  dial_timeout: {dial_timeout}\nresources:\n  layout: none\ndestination:\n  local:\n    path: {}\nretry:\n  attempts: 1\n",
            dir.display()
        );
        let env = Environment {
            node_name: None,
            hostname: None,
        };
        let config = Arc::new(Config::parse(&text, &env).unwrap());
        let metrics = Arc::new(Metrics::new("test"));
        Arc::new(AppState {
            runner: Runner::new(config, metrics.clone(), |_| {}),
            metrics,
            token_sha256: token.map(token_digest),
            ready: Arc::new(ReadyFlags::default()),
            sets: Arc::default(),
            limiter: TriggerLimiter::new(interval),
        })
    }

    /// Serves `router` on 127.0.0.1:0 within `limits`.
    async fn serve_on_loopback(router: Router, limits: ConnectionLimits) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_with(l, router, std::future::pending(), limits));
        addr
    }

    /// A whole `GET path` over a fresh connection; the raw response.
    async fn raw_get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
        out
    }

    /// How long until the server closes `s`, sending `trickle` (when not
    /// empty) every 100 ms meanwhile; `None` if it is still open after 5 s.
    async fn closed_after(s: &mut tokio::net::TcpStream, trickle: &[u8]) -> Option<Duration> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if !trickle.is_empty() && s.write_all(trickle).await.is_err() {
                return Some(start.elapsed());
            }
            let mut buf = [0u8; 512];
            match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
                Ok(Ok(_)) | Err(_) => {}
            }
        }
        None
    }

    #[tokio::test]
    async fn slowloris_and_idle_connections_are_cut_after_the_header_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        let st = state(&refused_endpoint(), "1s", tmp.path(), Duration::ZERO, None);
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_millis(600),
            max_connections: 8,
            max_per_peer: 8,
        };
        let addr = serve_on_loopback(metrics_router(st), limits).await;
        // Headers trickled a line every 100 ms never complete.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut slow, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let cut = closed_after(&mut slow, b"X-Slow: 1\r\n").await;
        assert!(
            cut.is_some_and(|c| c >= Duration::from_millis(500) && c < Duration::from_secs(2)),
            "{cut:?}"
        );
        // A connection that sends nothing is cut as well.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let cut = closed_after(&mut idle, b"").await;
        assert!(cut.is_some_and(|c| c < Duration::from_secs(2)), "{cut:?}");
        // A whole request is still answered.
        assert!(raw_get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn a_loopback_api_listener_caps_only_the_total_a_remote_one_each_address_too() {
        let loopback = ConnectionLimits::api("127.0.0.1:10290".parse().unwrap());
        assert_eq!(loopback.max_per_peer, loopback.max_connections);
        assert_eq!(
            loopback.max_connections,
            ConnectionLimits::DEFAULT.max_connections
        );
        let remote = ConnectionLimits::api("10.0.0.5:10290".parse().unwrap());
        assert_eq!(remote.max_per_peer, ConnectionLimits::DEFAULT.max_per_peer);
        assert!(remote.max_per_peer < remote.max_connections);
    }

    #[tokio::test]
    async fn the_connection_cap_holds_and_the_api_listener_stays_responsive() {
        use tokio::io::AsyncWriteExt;
        let tmp = tempfile::tempdir().unwrap();
        let st = state(&refused_endpoint(), "1s", tmp.path(), Duration::ZERO, None);
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 4,
            max_per_peer: 4,
        };
        let metrics_addr = serve_on_loopback(metrics_router(st.clone()), limits).await;
        let api_addr = serve_on_loopback(router(st), limits).await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(tokio::net::TcpStream::connect(metrics_addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // One connection more is closed unanswered.
        let mut extra = tokio::net::TcpStream::connect(metrics_addr).await.unwrap();
        let _ = extra
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let cut = closed_after(&mut extra, b"").await;
        assert!(cut.is_some_and(|c| c < Duration::from_secs(1)), "{cut:?}");
        // The API listener has slots of its own.
        assert!(raw_get(api_addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 200"));
        // A freed slot is served again.
        drop(idle.pop());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(raw_get(metrics_addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 200"));
    }

    /// A connection to `addr` from the loopback address `from` (127.0.0.2
    /// and the like stand for other hosts).
    async fn connect_from(from: [u8; 4], addr: SocketAddr) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::from((Ipv4Addr::from(from), 0)))
            .unwrap();
        socket.connect(addr).await.unwrap()
    }

    /// Whether the server closes `s` within `limit` (sending nothing).
    async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 512];
        matches!(
            tokio::time::timeout(limit, s.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// A whole `GET path` from `from`; the raw response.
    async fn raw_get_from(from: [u8; 4], addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = connect_from(from, addr).await;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
        out
    }

    #[tokio::test]
    async fn one_address_gets_its_share_of_connections_and_others_still_get_in() {
        use tokio::io::AsyncWriteExt;
        let tmp = tempfile::tempdir().unwrap();
        let st = state(&refused_endpoint(), "1s", tmp.path(), Duration::ZERO, None);
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 6,
            max_per_peer: 2,
        };
        let addr = serve_on_loopback(metrics_router(st), limits).await;
        // One address opens 20 connections and sends half a request on each.
        let mut held = Vec::new();
        for _ in 0..20 {
            let mut s = connect_from([127, 0, 0, 1], addr).await;
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n").await;
            held.push(s);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut open = 0;
        for s in &mut held {
            if !closed_within(s, Duration::from_millis(200)).await {
                open += 1;
            }
        }
        assert_eq!(open, 2, "the address holds exactly its share");
        // Other addresses are served meanwhile, up to the listener's cap.
        assert!(raw_get_from([127, 0, 0, 2], addr, "/metrics")
            .await
            .starts_with("HTTP/1.1 200"));
        let mut others = Vec::new();
        for last in 3..=6 {
            others.push(connect_from([127, 0, 0, last], addr).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut late = connect_from([127, 0, 0, 7], addr).await;
        assert!(
            closed_within(&mut late, Duration::from_secs(1)).await,
            "the listener is full"
        );
        drop(others);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(raw_get_from([127, 0, 0, 7], addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 200"));
    }

    /// An etcd endpoint where nothing listens: runs fail at once (connect).
    fn refused_endpoint() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: serde_json::Value,
    }

    async fn call(
        router: &Router,
        method: Method,
        uri: &str,
        client: &str,
        token: Option<&str>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let mut req = req.body(Body::empty()).unwrap();
        let peer: SocketAddr = format!("{client}:40000")
            .parse()
            .or_else(|_| format!("[{client}]:40000").parse())
            .unwrap();
        req.extensions_mut().insert(ConnectInfo(peer));
        let r = router.clone().oneshot(req).await.unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn until_idle(state: &AppState) {
        if let Some(h) = state.runner.current() {
            h.finished().await;
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(4200)), 5);
    }

    #[test]
    fn the_ledger_allows_one_trigger_per_interval_per_client() {
        let interval = Duration::from_secs(5);
        let (a, b) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        let mut l = Ledger::default();
        assert_eq!(l.check(interval, a, t0), Ok(()));
        l.record(a, t0, "r1".into());
        assert_eq!(
            l.check(interval, a, t0 + Duration::from_millis(4500)),
            Err(Refusal::TooSoon {
                retry_after: Duration::from_millis(500),
                run_id: "r1".into()
            })
        );
        assert_eq!(l.check(interval, b, t0 + Duration::from_secs(1)), Ok(()));
        assert_eq!(l.check(interval, a, t0 + interval), Ok(()));
        // The expired entry was dropped by that check.
        assert!(l.entries.is_empty());
    }

    #[test]
    fn the_ledger_stays_bounded_and_fails_closed_when_full() {
        let interval = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut l = Ledger::default();
        for i in 0..MAX_LIMITED_CLIENTS {
            let ip = IpAddr::V4(Ipv4Addr::from(0x7f00_0000 + i as u32 + 1));
            let at = t0 + Duration::from_millis(i as u64);
            assert_eq!(l.check(interval, ip, at), Ok(()), "client {i}");
            l.record(ip, at, format!("r{i}"));
        }
        let newcomer = IpAddr::V4(Ipv4Addr::new(127, 9, 9, 9));
        // Full of live entries: a new client waits for the oldest to expire.
        assert_eq!(
            l.check(interval, newcomer, t0 + Duration::from_secs(2)),
            Err(Refusal::Full {
                retry_after: Duration::from_secs(3)
            })
        );
        assert_eq!(l.entries.len(), MAX_LIMITED_CLIENTS);
        // Once the oldest expired there is room again, and the expired went.
        let later = t0 + interval + Duration::from_millis(10);
        assert_eq!(l.check(interval, newcomer, later), Ok(()));
        assert_eq!(l.entries.len(), MAX_LIMITED_CLIENTS - 11);
        assert_eq!(l.check(interval, newcomer, t0 + 2 * interval), Ok(()));
        assert!(l.entries.is_empty());
    }

    #[tokio::test]
    async fn a_second_trigger_within_the_interval_gets_429_with_retry_after() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(
            &refused_endpoint(),
            "2s",
            dir.path(),
            Duration::from_secs(5),
            None,
        );
        let app = router(state.clone());
        let first = call(&app, Method::POST, "/v1/backups", "127.0.0.1", None).await;
        assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
        let id = first.body["id"].as_str().unwrap().to_string();
        until_idle(&state).await;

        for (client, uri) in [
            ("127.0.0.1", "/v1/backups"),
            ("127.0.0.1", "/v1/backups?wait=true"),
            // The same client over IPv6-mapped IPv4.
            ("::ffff:127.0.0.1", "/v1/backups"),
        ] {
            let r = call(&app, Method::POST, uri, client, None).await;
            assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{client} {uri}");
            let secs: u64 = r.headers[header::RETRY_AFTER]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=5).contains(&secs), "Retry-After {secs}");
            let e: ErrorResponse = serde_json::from_value(r.body).unwrap();
            assert_eq!(e.run_id.as_deref(), Some(id.as_str()));
            assert!(e.error.contains("http.trigger_min_interval"), "{}", e.error);
            assert!(
                e.error.contains(&format!("retry in {secs} s")),
                "{}",
                e.error
            );
        }
        assert!(state
            .metrics
            .encode()
            .contains("etcd_backup_http_rate_limited_total 3\n"));
        // Another client is not limited by the first one.
        let other = call(&app, Method::POST, "/v1/backups", "127.0.0.2", None).await;
        assert_eq!(other.status, StatusCode::ACCEPTED, "{}", other.body);
        until_idle(&state).await;
        assert_eq!(state.limiter.tracked(), 2);
        assert_eq!(state.runner.list().len(), 2);
    }

    #[tokio::test]
    async fn auth_comes_first_then_shutdown_and_in_progress_then_the_limit() {
        // A member that accepts connections and never answers keeps a run busy.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let etcd = format!("http://{}", silent.local_addr().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let state = state(
            &etcd,
            "30s",
            dir.path(),
            Duration::from_secs(60),
            Some("t0k"),
        );
        let app = router(state.clone());
        let post = |token| call(&app, Method::POST, "/v1/backups", "127.0.0.1", token);

        assert_eq!(post(None).await.status, StatusCode::UNAUTHORIZED);
        let first = post(Some("t0k")).await;
        assert_eq!(first.status, StatusCode::ACCEPTED);
        // Busy and rate-limited at once: the run in progress is the answer.
        let busy = post(Some("t0k")).await;
        assert_eq!(busy.status, StatusCode::CONFLICT);
        assert_eq!(busy.body["run_id"], first.body["id"]);
        assert_eq!(post(Some("wrong")).await.status, StatusCode::UNAUTHORIZED);
        assert!(state
            .metrics
            .encode()
            .contains("etcd_backup_http_rate_limited_total 0\n"));

        // Stopping: 503 comes before the limit too.
        state.runner.stop_accepting();
        assert_eq!(
            post(Some("t0k")).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(
            state
                .runner
                .drain(Duration::from_millis(10), Duration::from_secs(5))
                .await
        );
        assert_eq!(
            post(Some("t0k")).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        drop(silent);
    }

    #[tokio::test]
    async fn a_zero_interval_disables_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(&refused_endpoint(), "2s", dir.path(), Duration::ZERO, None);
        let app = router(state.clone());
        for _ in 0..3 {
            let r = call(&app, Method::POST, "/v1/backups", "127.0.0.1", None).await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
            until_idle(&state).await;
        }
        assert_eq!(state.limiter.tracked(), 0);
    }

    fn document() -> serde_json::Value {
        serde_json::from_str(OPENAPI).unwrap()
    }

    #[test]
    fn the_openapi_document_lists_exactly_the_routes_served() {
        let doc = document();
        let mut documented: Vec<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| *k != "parameters")
                    .map(move |m| (path.clone(), m.to_uppercase()))
            })
            .collect();
        let mut served: Vec<(String, String)> = routes()
            .into_iter()
            .map(|(p, m)| (p.to_string(), m.to_string()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
    }

    #[test]
    fn every_reference_in_the_openapi_document_resolves() {
        fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(r) = m.get("$ref").and_then(|r| r.as_str()) {
                        out.push(r.to_string());
                    }
                    m.values().for_each(|v| refs(v, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let doc = document();
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.len() > 10);
        for r in all {
            let pointer = r.strip_prefix('#').expect("local references only");
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
        let text = OPENAPI;
        for status in ["401", "404", "409", "413", "429", "500"] {
            assert!(text.contains(&format!("\"{status}\"")), "{status}");
        }
        assert!(doc["components"]["responses"]["MethodNotAllowed"].is_object());
        assert_eq!(
            doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
            "bearer"
        );
    }

    #[tokio::test]
    async fn documented_methods_are_routed_and_others_answer_405_as_json() {
        let dir = tempfile::tempdir().unwrap();
        // A token, so probing POST starts no run.
        let state = state(
            &refused_endpoint(),
            "2s",
            dir.path(),
            Duration::from_secs(5),
            Some("t"),
        );
        let app = router(state.clone());
        let doc = document();
        let all = [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
            Method::OPTIONS,
            Method::TRACE,
        ];
        for (path, ops) in doc["paths"].as_object().unwrap() {
            let uri = path.replace("{id}", "some-id");
            for method in &all {
                let r = call(&app, method.clone(), &uri, "127.0.0.1", None).await;
                let listed = ops.get(method.as_str().to_lowercase()).is_some();
                if listed {
                    assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
                    let fallback = r.body["error"]
                        .as_str()
                        .is_some_and(|e| e.starts_with("no such path"));
                    assert!(!fallback, "{method} {uri} is not routed");
                } else {
                    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
                    let e: ErrorResponse = serde_json::from_value(r.body).unwrap();
                    assert!(e.error.contains("method not allowed"));
                }
            }
        }
        assert!(state.runner.list().is_empty());
    }

    #[tokio::test]
    async fn the_document_is_served_with_this_version_on_the_api_listener_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(&refused_endpoint(), "2s", dir.path(), Duration::ZERO, None);
        let r = call(
            &router(state.clone()),
            Method::GET,
            "/v1/openapi.json",
            "127.0.0.1",
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.headers[header::CONTENT_TYPE], "application/json");
        let mut want = document();
        want["info"]["version"] = crate::backup::AGENT_VERSION.into();
        assert_eq!(r.body, want);
        let r = call(
            &metrics_router(state),
            Method::GET,
            "/v1/openapi.json",
            "127.0.0.1",
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
}
