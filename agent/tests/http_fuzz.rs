//! Property tests of the HTTP API: arbitrary requests never get a 5xx (the
//! one exception: `POST /v1/backups?wait=true` whose backup failed answers
//! 500 with the failed run's record) and never crash the server; every error
//! is a JSON `ErrorResponse`.
//!
//! Backups here point at an etcd endpoint where nothing listens, so a run that
//! a request starts fails at once at `connect` and is recognisable as such.
//! The in-process part drives the real router with `tower::ServiceExt::oneshot`;
//! the socket part sends raw, often malformed, HTTP/1.1 to the real server.
//! `PROPTEST_CASES` changes the number of cases of both.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use axum::Router;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

use etcd_backup_agent::config::{Config, Environment};
use etcd_backup_agent::daemon::http::{self, AppState, ReadyFlags, TriggerLimiter};
use etcd_backup_agent::daemon::metrics::Metrics;
use etcd_backup_agent::daemon::runner::Runner;
use etcd_backup_proto::api::{ErrorResponse, RunRecord, RunState};

const TOKEN: &str = "fuzz-token";

struct Env {
    rt: tokio::runtime::Runtime,
    /// API router without a token, with a token, and the metrics-only router.
    routers: Vec<Router>,
    _dir: tempfile::TempDir,
}

fn env() -> Env {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on a port just freed: runs fail at connect, at once.
    let etcd = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let text = format!(
        "node_name: n\netcd:\n  endpoints: [\"http://{etcd}\"]\n  dial_timeout: 2s\nresources:\n  layout: none\ndestination:\n  local:\n    path: {}\nretry:\n  attempts: 1\n",
        dir.path().display()
    );
    let config = Arc::new(
        Config::parse(
            &text,
            &Environment {
                node_name: None,
                hostname: None,
            },
        )
        .unwrap(),
    );
    let state = |token: Option<&str>| {
        let metrics = Arc::new(Metrics::new("fuzz"));
        // Ready, so /readyz answers 200: its 503 is readiness, not a fault.
        let ready = Arc::new(ReadyFlags::default());
        ready.etcd.store(true, std::sync::atomic::Ordering::Relaxed);
        ready
            .destination
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Arc::new(AppState {
            runner: Runner::new(config.clone(), metrics.clone(), |_| {}),
            metrics,
            token_sha256: token.map(http::token_digest),
            ready,
            sets: Arc::default(),
            limiter: TriggerLimiter::new(Duration::from_secs(5)),
        })
    };
    let routers = vec![
        http::router(state(None)),
        http::router(state(Some(TOKEN))),
        http::metrics_router(state(None)),
    ];
    Env {
        rt,
        routers,
        _dir: dir,
    }
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        6 => prop::sample::select(vec![
            Method::GET,
            Method::GET,
            Method::GET,
            Method::POST,
            Method::POST,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
            Method::OPTIONS,
            Method::TRACE,
            Method::CONNECT,
        ]),
        1 => "[A-Z]{1,12}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
    ]
}

/// Percent-encodes every byte outside unreserved characters and `/`.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn path() -> impl Strategy<Value = String> {
    let routes = prop::sample::select(vec![
        "/v1/backups",
        "/v1/backups/",
        "/v1/backups/1",
        "/v1/openapi.json",
        "/healthz",
        "/readyz",
        "/metrics",
        "/",
        "/v1",
        "/v1/",
    ]);
    prop_oneof![
        3 => routes.clone().prop_map(str::to_string),
        // A real prefix with junk after it: unicode, traversal, encodings.
        4 => (
            routes,
            prop_oneof![
                Just("/..".to_string()),
                Just("/../../etc/passwd".to_string()),
                Just("/%2e%2e/%2e%2e".to_string()),
                Just("/%2F%2F".to_string()),
                Just("/%FF%FE".to_string()),
                Just("/%00".to_string()),
                Just("%".to_string()),
                Just("/%zz".to_string()),
                Just("//".to_string()),
                "\\PC{0,40}".prop_map(|s| format!("/{}", encode(&s))),
                // Any bytes, percent-encoded: often not UTF-8 once decoded.
                prop::collection::vec(any::<u8>(), 1..20).prop_map(|b| {
                    b.iter().map(|b| format!("%{b:02X}")).collect::<String>()
                }).prop_map(|s| format!("/{s}")),
                "[a-zA-Z0-9%._~!$&'()*+,;=:@/-]{0,60}",
            ],
        )
            .prop_map(|(r, junk)| format!("{r}{junk}")),
        // A run id of any bytes, percent-encoded.
        2 => prop::collection::vec(any::<u8>(), 0..40).prop_map(|b| {
            let id: String = b.iter().map(|b| format!("%{b:02X}")).collect();
            format!("/v1/backups/{id}")
        }),
        // Very long.
        1 => (1usize..20_000).prop_map(|n| format!("/v1/backups/{}", "a".repeat(n))),
        1 => "(/[a-zA-Z0-9%._~-]{0,20}){0,8}",
    ]
}

fn query() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        Just("wait=true".to_string()),
        Just("wait=false".to_string()),
        Just("wait=maybe".to_string()),
        Just("wait=".to_string()),
        Just("wait".to_string()),
        Just("wait=true&wait=false".to_string()),
        Just("wait=%74rue".to_string()),
        Just("force=1".to_string()),
        "[a-zA-Z0-9%=&._~+-]{0,80}",
        "\\PC{0,30}".prop_map(|s| encode(&s)),
    ])
}

fn authorization() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop::option::of(prop_oneof![
        Just(format!("Bearer {TOKEN}").into_bytes()),
        Just(format!("Bearer  {TOKEN} ").into_bytes()),
        Just(format!("bearer {TOKEN}").into_bytes()),
        Just(b"Bearer".to_vec()),
        Just(b"Bearer ".to_vec()),
        Just(b"Basic Zm9vOmJhcg==".to_vec()),
        "Bearer [ -~]{0,200}".prop_map(String::into_bytes),
        prop::collection::vec(header_byte(), 0..64),
    ])
}

/// What a header value may hold: visible ASCII, tabs and obs-text (control
/// bytes never get past an HTTP parser; the socket test sends those).
fn header_byte() -> impl Strategy<Value = u8> {
    prop_oneof![20 => 0x20u8..0x7f, 2 => 0x80u8..=0xff, 1 => Just(b'\t')]
}

#[derive(Debug, Clone)]
struct Fuzz {
    target: usize,
    method: Method,
    path: String,
    query: Option<String>,
    authorization: Option<Vec<u8>>,
    content_type: Option<String>,
    content_length: Option<u64>,
    extra: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    peer: SocketAddr,
}

fn request() -> impl Strategy<Value = Fuzz> {
    let body = prop_oneof![
        Just(Vec::new()),
        Just(b"{}".to_vec()),
        Just(b" \n\t".to_vec()),
        Just(b"{\"wait\": true}".to_vec()),
        prop::collection::vec(any::<u8>(), 0..512),
        (4000usize..6000).prop_map(|n| vec![b'x'; n]),
    ];
    let content_type = prop::option::of(prop_oneof![
        Just("application/json".to_string()),
        Just("text/plain".to_string()),
        Just("application/x-www-form-urlencoded".to_string()),
        Just("multipart/form-data; boundary=x".to_string()),
        "[ -~]{0,40}",
    ]);
    let extra = prop::collection::vec(
        (
            "[a-zA-Z0-9-]{1,20}",
            prop::collection::vec(header_byte(), 0..100),
        ),
        0..4,
    );
    let peer = (any::<[u8; 3]>(), any::<u16>(), any::<bool>()).prop_map(|(o, port, v6)| {
        if v6 {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))
        } else {
            SocketAddr::from(([127, o[0], o[1], o[2]], port))
        }
    });
    // One in three is a trigger (POST /v1/backups) with arbitrary details,
    // so the trigger's answers are reached, not only 404 and 405.
    let target = (
        0usize..3,
        prop_oneof![2 => method(), 1 => Just(Method::POST)],
        prop_oneof![2 => path(), 1 => Just("/v1/backups".to_string())],
        query(),
        authorization(),
    );
    (
        target,
        (
            content_type,
            prop::option::of(0u64..10_000),
            extra,
            body,
            peer,
        ),
    )
        .prop_map(
            |(
                (target, method, path, query, authorization),
                (content_type, content_length, extra, body, peer),
            )| Fuzz {
                target,
                method,
                path,
                query,
                authorization,
                content_type,
                content_length,
                extra,
                body,
                peer,
            },
        )
}

fn build(f: &Fuzz) -> Option<Request<Body>> {
    let uri = match &f.query {
        Some(q) => format!("{}?{q}", f.path),
        None => f.path.clone(),
    };
    // What no HTTP parser would let through never reaches the router.
    let uri: Uri = uri.parse().ok()?;
    let mut req = Request::builder().method(f.method.clone()).uri(uri);
    let headers = req.headers_mut()?;
    if let Some(a) = &f.authorization {
        headers.insert(header::AUTHORIZATION, HeaderValue::from_bytes(a).ok()?);
    }
    if let Some(t) = &f.content_type {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(t).ok()?);
    }
    if let Some(n) = f.content_length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    for (name, value) in &f.extra {
        let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(value).ok()?;
        headers.append(name, value);
    }
    let mut req = req.body(Body::from(f.body.clone())).ok()?;
    req.extensions_mut().insert(ConnectInfo(f.peer));
    Some(req)
}

/// The one 500 allowed: a failed backup's record, for `?wait=true`.
fn is_failed_backup(f: &Fuzz, body: &[u8]) -> bool {
    f.method == Method::POST
        && f.target != 2
        && f.path == "/v1/backups"
        && serde_json::from_slice::<RunRecord>(body).is_ok_and(|r| {
            r.state == RunState::Failed && r.failed_stage.as_deref() == Some("connect")
        })
}

fn check(f: &Fuzz, status: StatusCode, headers: &header::HeaderMap, body: &[u8]) {
    assert!(
        status.as_u16() < 500
            || (status == StatusCode::INTERNAL_SERVER_ERROR && is_failed_backup(f, body)),
        "{status} for {f:?}: {}",
        String::from_utf8_lossy(body)
    );
    if f.method == Method::HEAD {
        return;
    }
    if let Some(n) = headers.get(header::CONTENT_LENGTH) {
        assert_eq!(n.to_str().unwrap(), body.len().to_string(), "{f:?}");
    }
    if status.is_client_error() {
        assert_eq!(
            headers[header::CONTENT_TYPE],
            "application/json",
            "{status} {f:?}"
        );
        let e: ErrorResponse = serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!(
                "{status} body is not an ErrorResponse ({e}) for {f:?}: {}",
                String::from_utf8_lossy(body)
            )
        });
        assert!(!e.error.is_empty());
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        let secs: u64 = headers[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=5).contains(&secs), "Retry-After {secs}");
    }
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default)
}

#[test]
fn arbitrary_requests_to_the_router_get_no_5xx_and_json_errors() {
    let env = env();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: cases(5000),
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let sent = std::cell::Cell::new(0u32);
    let by_status = std::cell::RefCell::new(std::collections::BTreeMap::<u16, u32>::new());
    let result = runner.run(&request(), |f| {
        let Some(req) = build(&f) else {
            return Ok(());
        };
        let router = env.routers[f.target].clone();
        let (status, headers, body) = env.rt.block_on(async move {
            let r = router.oneshot(req).await.expect("infallible");
            let (parts, body) = r.into_parts();
            let body = axum::body::to_bytes(body, 16 << 20)
                .await
                .expect("a response body that can be read");
            (parts.status, parts.headers, body)
        });
        check(&f, status, &headers, &body);
        sent.set(sent.get() + 1);
        *by_status.borrow_mut().entry(status.as_u16()).or_default() += 1;
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (sent, by_status) = (sent.get(), by_status.into_inner());
    eprintln!("{sent} requests reached the router; answers by status: {by_status:?}");
    // The generators reach the interesting answers, not just 404s.
    for status in [200, 202, 400, 401, 404, 405, 413, 429] {
        assert!(
            by_status.contains_key(&status),
            "no {status} in {by_status:?}"
        );
    }
}

/// Raw HTTP/1.1 bytes, often malformed: a request line, headers (with
/// lying or doubled Content-Length), a body; then the client stops writing.
fn raw_request() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        3 => (
            prop::sample::select(vec!["GET", "POST", "HEAD", "DELETE", "POST"]),
            prop::sample::select(vec![
                "/v1/backups",
                "/v1/backups?wait=true",
                "/v1/backups/x",
                "/healthz",
                "/metrics",
                "/v1/openapi.json",
                "/../v1/backups",
                "*",
                "http://127.0.0.1/v1/backups",
            ]),
        )
            .prop_map(|(m, p)| format!("{m} {p} HTTP/1.1\r\n").into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..100),
    ];
    let headers = prop::collection::vec(
        prop_oneof![
            (0u64..100_000).prop_map(|n| format!("Content-Length: {n}\r\n")),
            Just("Content-Length: -1\r\n".to_string()),
            Just("Content-Length: 3\r\nContent-Length: 4\r\n".to_string()),
            Just("Transfer-Encoding: chunked\r\n".to_string()),
            Just(format!("Authorization: Bearer {TOKEN}\r\n")),
            Just("Expect: 100-continue\r\n".to_string()),
            "[a-zA-Z-]{1,10}: [ -~]{0,30}\r\n",
            "[ -~]{0,40}\r\n",
        ],
        0..5,
    );
    let body = prop::collection::vec(any::<u8>(), 0..200);
    (line, headers, body).prop_map(|(line, headers, body)| {
        let mut r = line;
        r.extend_from_slice(b"Host: 127.0.0.1\r\n");
        for h in headers {
            r.extend_from_slice(h.as_bytes());
        }
        r.extend_from_slice(b"\r\n");
        r.extend_from_slice(&body);
        r
    })
}

#[test]
fn raw_malformed_http_gets_no_5xx_and_the_server_keeps_serving() {
    let env = env();
    let (addr, server) = env.rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let router = env.routers[0].clone();
        let server = tokio::spawn(http::serve(l, router, std::future::pending()));
        (addr, server)
    });
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: cases(500),
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&raw_request(), |bytes| {
        let answer = env.rt.block_on(async {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            // The server may close early; what it answers is what counts.
            let _ = s.write_all(&bytes).await;
            let _ = s.shutdown().await;
            let mut out = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
            assert!(read.is_ok(), "no answer nor close within 10 s");
            out
        });
        // Each answer on the connection (pipelined ones too) is below 500
        // unless it is a failed backup's record (runs fail at connect here).
        let text = String::from_utf8_lossy(&answer);
        for status_line in text.split("\r\n").filter(|l| l.starts_with("HTTP/1.")) {
            let code: u16 = status_line
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
            prop_assert!(
                code < 500 || (code == 500 && text.contains("\"failed_stage\":\"connect\"")),
                "{status_line} for {:?}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Still serving after all that.
    env.rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        assert!(
            out.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    });
    assert!(!server.is_finished());
}
