//! The local HTTP endpoint: trigger a backup, see runs, health, metrics.
//!
//! JSON everywhere; every error is an [`ErrorResponse`] with the right status.
//! `POST` can require a bearer token (compared in constant time); health and
//! metrics stay open so probes and Prometheus need no secret.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use etcd_backup_proto::api::{ErrorResponse, Readiness, RunList, RunRecord, RunState, Trigger};

use crate::metrics::Metrics;
use crate::runner::{Runner, StartError};

/// Largest request body accepted (the API takes none; this bounds abuse).
pub const MAX_BODY: usize = 4096;

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
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("token_required", &self.token_sha256.is_some())
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

/// Health, readiness and metrics: on both listeners.
fn open_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
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
    let routes = open_routes()
        .route("/v1/backups", get(list_runs).post(start_run))
        .route("/v1/backups/{id}", get(get_run));
    finish(routes, "no such path; see the README for the API", state)
}

/// The read-only routes for `http.metrics_listen`: metrics and health, no
/// trigger and no run details, so exposing it on the node's address gives
/// nothing away and lets nobody start a backup.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    finish(
        open_routes(),
        "this listener serves only /metrics, /healthz and /readyz",
        state,
    )
}

/// Serves `router` on an already-bound listener until `shutdown` completes.
///
/// # Errors
/// Accept-loop I/O failures.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
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
    headers: HeaderMap,
    params: Result<Query<StartParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    let wait = match params {
        Ok(Query(p)) => p.wait,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "bad query: {}; the only parameter is wait=true|false",
                    e.body_text()
                ),
                None,
            )
        }
    };
    match body {
        Ok(b) if b.iter().all(u8::is_ascii_whitespace) || b.as_ref() == b"{}" => {}
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "this endpoint takes no request body (or {})",
                None,
            )
        }
        Err(e) => {
            return error(
                e.status(),
                format!(
                    "request body rejected: {} (at most {MAX_BODY} bytes)",
                    e.body_text()
                ),
                None,
            )
        }
    }
    match state.runner.start(Trigger::Http) {
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

async fn list_runs(State(state): State<Arc<AppState>>) -> Response {
    let sets = state.sets.read().map(|s| s.clone()).unwrap_or_default();
    Json(RunList {
        runs: state.runner.list(),
        sets,
    })
    .into_response()
}

async fn get_run(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
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
