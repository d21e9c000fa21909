//! The HTTP API of the real agent binary against its own OpenAPI document:
//! every status the API can answer is produced for real and its body checked
//! against the document's JSON schema; then schemathesis fuzzes the API from
//! the document.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use etcd_backup_tests::agent::{AgentConfig, AgentDaemon};
use etcd_backup_tests::etcd::{real_snapshot_db, EtcdServer};
use etcd_backup_tests::fake_etcd::{FakeEtcd, Tamper};
use etcd_backup_tests::free_port;
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// The JSON pointer escape of one path segment.
fn escape(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// Checks answers against the document the agent serves.
struct Spec {
    doc: Value,
    checked: Vec<(String, String, u16)>,
}

impl Spec {
    async fn fetch(http: &reqwest::Client, base: &str) -> Self {
        let r = http
            .get(format!("{base}/v1/openapi.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "application/json");
        let doc: Value = r.json().await.unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        Self {
            doc,
            checked: Vec::new(),
        }
    }

    /// The response object for `status` of `method path`, `$ref` followed;
    /// for paths or methods the document does not list, its `NotFound` or
    /// `MethodNotAllowed` response.
    fn response(&self, path: &str, method: &Method, status: StatusCode) -> (String, Value) {
        let op = format!("/paths/{}/{}", escape(path), method.as_str().to_lowercase());
        let mut pointer = if self.doc.pointer(&op).is_none() {
            let named = match status {
                StatusCode::NOT_FOUND => "NotFound",
                StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
                other => panic!("{method} {path} is not documented and answered {other}"),
            };
            format!("/components/responses/{named}")
        } else {
            format!("{op}/responses/{}", status.as_u16())
        };
        loop {
            let r = self
                .doc
                .pointer(&pointer)
                .unwrap_or_else(|| panic!("{method} {path}: status {status} is not documented"));
            match r.get("$ref").and_then(Value::as_str) {
                Some(target) => pointer = target.trim_start_matches('#').to_string(),
                None => return (pointer, r.clone()),
            }
        }
    }

    /// Asserts that `r` is a documented answer of `method path` (`path` as
    /// written in the document): status, required headers, and the JSON body
    /// against the schema. Returns the body.
    async fn check(&mut self, path: &str, method: Method, r: reqwest::Response) -> Value {
        let status = r.status();
        let (pointer, response) = self.response(path, &method, status);
        for (name, h) in response["headers"].as_object().into_iter().flatten() {
            if h["required"] == true {
                let v = r
                    .headers()
                    .get(name.as_str())
                    .unwrap_or_else(|| panic!("{method} {path} {status}: no {name} header"));
                let v = v.to_str().unwrap();
                if h["schema"]["type"] == "integer" {
                    let n: u64 = v.parse().unwrap_or_else(|_| panic!("{name}: {v:?}"));
                    assert!(n >= h["schema"]["minimum"].as_u64().unwrap_or(0));
                }
            }
        }
        let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
        let text = r.text().await.unwrap();
        let content = &response["content"];
        let body = if content.get("application/json").is_some() {
            assert_eq!(content_type, "application/json", "{method} {path} {status}");
            let body: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{method} {path} {status}: {e}: {text}"));
            let mut schema = self.doc.clone();
            // A URI fragment: braces of path templates percent-encoded.
            let fragment = pointer.replace('{', "%7B").replace('}', "%7D");
            schema["$ref"] = format!("#{fragment}/content/application~1json/schema").into();
            let validator = jsonschema::draft202012::options()
                .should_validate_formats(true)
                .build(&schema)
                .expect("the document's schemas compile");
            let errors: Vec<String> = validator
                .iter_errors(&body)
                .map(|e| e.to_string())
                .collect();
            assert!(
                errors.is_empty(),
                "{method} {path} {status}: body does not match {pointer}: {errors:?}\n{body:#}"
            );
            body
        } else {
            let media = content.as_object().unwrap().keys().next().unwrap();
            assert!(content_type.starts_with(media.as_str()), "{content_type}");
            Value::String(text)
        };
        self.checked
            .push((path.to_string(), method.to_string(), status.as_u16()));
        body
    }
}

fn daemon_yaml(port: u16, token: &Path, extra: &str) -> String {
    format!(
        "schedule: \"@daily\"\nrun_on_start: never\nshutdown_grace: 3s\nhttp:\n  listen: 127.0.0.1:{port}\n  token_file: {}\n{extra}",
        token.display()
    )
}

/// The agent daemon on a free port, backing up `etcd` into `work/backups`,
/// with the token `s3cret` (in `work/token`, also returned) and `extra` under `http:`.
fn start_with_token(etcd: &EtcdServer, work: &Path, extra: &str) -> (AgentDaemon, PathBuf) {
    let token = work.join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let port = free_port();
    let mut cfg = AgentConfig::new(etcd, &work.join("backups"));
    cfg.extra = daemon_yaml(port, &token, extra);
    (AgentDaemon::start(&cfg.write(work), port), token)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_of_the_real_agent_matches_its_openapi_document() {
    let etcd = EtcdServer::start();
    assert!(etcd.etcdctl(&["put", "/k", "v"]).status.success());
    let work = tempfile::tempdir().unwrap();
    let (agent, token) = start_with_token(&etcd, work.path(), "  trigger_min_interval: 3s\n");
    let http = reqwest::Client::new();
    let mut spec = Spec::fetch(&http, &agent.base).await;
    let url = |p: &str| agent.url(p);
    let bearer = "Bearer s3cret";
    let post = |query: &str| {
        http.post(url(&format!("/v1/backups{query}")))
            .header("authorization", bearer)
    };

    // Readiness comes once etcd answered and the destination was reached.
    let start = Instant::now();
    loop {
        let r = http.get(url("/readyz")).send().await.unwrap();
        let ok = r.status() == StatusCode::OK;
        spec.check("/readyz", Method::GET, r).await;
        if ok {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for path in ["/healthz", "/metrics", "/v1/openapi.json", "/v1/backups"] {
        let r = http.get(url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        spec.check(path, Method::GET, r).await;
    }

    let r = http.post(url("/v1/backups")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    spec.check("/v1/backups", Method::POST, r).await;

    let r = post("?wait=true").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let run = spec.check("/v1/backups", Method::POST, r).await;
    assert_eq!(run["state"], "succeeded");
    // Every optional field of a successful run is there and checked.
    for field in ["finished_at", "set", "location", "revision"] {
        assert!(run.get(field).is_some(), "{field} missing: {run}");
    }
    assert!(!run["stages"].as_array().unwrap().is_empty());
    let id = run["id"].as_str().unwrap().to_string();

    let r = post("").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let limited = spec.check("/v1/backups", Method::POST, r).await;
    assert_eq!(limited["run_id"], id.as_str());

    // The list, once the catalog was rescanned after the run, shows the set.
    let start = Instant::now();
    loop {
        let r = http.get(url("/v1/backups")).send().await.unwrap();
        let list = spec.check("/v1/backups", Method::GET, r).await;
        if !list["sets"].as_array().unwrap().is_empty() {
            assert_eq!(list["runs"][0]["id"], id.as_str());
            // AgentConfig's default layout; `list` and the API say which.
            assert_eq!(list["sets"][0]["layout"], "none", "{list}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = http
        .get(url(&format!("/v1/backups/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    spec.check("/v1/backups/{id}", Method::GET, r).await;
    let r = http.get(url("/v1/backups/nope")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    spec.check("/v1/backups/{id}", Method::GET, r).await;

    // The server answers 413 without reading the body and closes that
    // connection: send it on a client of its own, so the shared pool never
    // hands the closed connection to the next request.
    let r = reqwest::Client::new()
        .post(url("/v1/backups"))
        .header("authorization", bearer)
        .body(vec![b'x'; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    spec.check("/v1/backups", Method::POST, r).await;
    // A body that stalls after its first byte: 408 once 5 s have passed.
    let stalled = tokio_stream::StreamExt::chain(
        tokio_stream::iter([Ok::<_, std::io::Error>(b"{".to_vec())]),
        tokio_stream::pending(),
    );
    let r = reqwest::Client::new()
        .post(url("/v1/backups"))
        .header("authorization", bearer)
        .body(reqwest::Body::wrap_stream(stalled))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_TIMEOUT);
    spec.check("/v1/backups", Method::POST, r).await;
    for (query, body) in [("?wait=maybe", ""), ("?force=1", ""), ("", "{\"a\": 1}")] {
        let r = post(query).body(body).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{query} {body}");
        spec.check("/v1/backups", Method::POST, r).await;
    }
    let r = http.delete(url("/v1/backups")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    spec.check("/v1/backups", Method::DELETE, r).await;
    let r = http.get(url("/v2/anything")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    spec.check("/v2/anything", Method::GET, r).await;
    assert_eq!(agent.stop(Duration::from_secs(15)), Some(0));

    // A member whose stream stalls: a run stays in progress, then fails.
    let fake = FakeEtcd::start(real_snapshot_db(100).await, Tamper::Stall);
    let port = free_port();
    // Its own destination: a run that started in the same second as the last
    // one above would find that set's directory taken and fail at once.
    let mut cfg = AgentConfig::for_endpoint(&fake.url, None, &work.path().join("stalled-backups"));
    cfg.stall_timeout = "2s".into();
    cfg.extra = daemon_yaml(port, &token, "  trigger_min_interval: 1s\n");
    let stalled = work.path().join("stalled");
    std::fs::create_dir(&stalled).unwrap();
    let agent = AgentDaemon::start(&cfg.write(&stalled), port);
    let post = |query: &str| {
        http.post(agent.url(&format!("/v1/backups{query}")))
            .header("authorization", bearer)
            .send()
    };
    let r = post("").await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let running = spec.check("/v1/backups", Method::POST, r).await;
    assert_eq!(running["state"], "running");
    let r = post("").await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let busy = spec.check("/v1/backups", Method::POST, r).await;
    assert_eq!(busy["run_id"], running["id"]);
    let r = post("?wait=true").await.unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let failed = spec.check("/v1/backups", Method::POST, r).await;
    assert_eq!(failed["state"], "failed");
    assert!(failed.get("failed_stage").is_some() && failed.get("error").is_some());

    // Shutting down: no new runs (503) while the second one drains. The
    // last accepted trigger is stall_timeout (2 s) old, past the 1 s interval.
    let r = post("").await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "{}",
        r.text().await.unwrap()
    );
    agent.terminate();
    let start = Instant::now();
    loop {
        let r = post("").await.unwrap();
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            spec.check("/v1/backups", Method::POST, r).await;
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(2), "{}", r.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(agent.stop(Duration::from_secs(15)), Some(0));

    // Every documented status of the trigger was seen.
    let mut post_statuses: Vec<u16> = spec
        .checked
        .iter()
        .filter(|(p, m, _)| p == "/v1/backups" && m == "POST")
        .map(|c| c.2)
        .collect();
    post_statuses.sort();
    post_statuses.dedup();
    let mut documented: Vec<u16> = spec.doc["paths"]["/v1/backups"]["post"]["responses"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.parse().unwrap())
        .collect();
    documented.sort();
    assert_eq!(post_statuses, documented);
}

/// The schemathesis release scripts/test installs into /opt/schemathesis.
const SCHEMATHESIS_VERSION: &str = "4.32.5";

/// `schemathesis` on PATH, or where scripts/test installs it; a panic with
/// what to run when it is missing (never a skip).
fn schemathesis() -> std::path::PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("schemathesis"))
            .find(|f| f.is_file())
    });
    let found = on_path.or_else(|| {
        let venv = std::path::PathBuf::from("/opt/schemathesis/bin/schemathesis");
        venv.is_file().then_some(venv)
    });
    let bin = found.unwrap_or_else(|| {
        panic!(
            "`schemathesis` is not installed; run scripts/test (it installs schemathesis=={SCHEMATHESIS_VERSION} from PyPI into /opt/schemathesis)"
        )
    });
    let out = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .expect("run schemathesis --version");
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.contains(SCHEMATHESIS_VERSION),
        "{} is {version:?}; scripts/test pins {SCHEMATHESIS_VERSION}",
        bin.display()
    );
    bin
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_and_no_schema_violation_in_the_real_agent() {
    let schemathesis = schemathesis();
    let etcd = EtcdServer::start();
    assert!(etcd.etcdctl(&["put", "/k", "v"]).status.success());
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let (agent, _) = start_with_token(&etcd, work.path(), "");
    // Ready first: a 503 from /readyz before etcd was probed is no fault.
    let http = reqwest::Client::new();
    let start = Instant::now();
    while http
        .get(agent.url("/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        != StatusCode::OK
    {
        assert!(start.elapsed() < Duration::from_secs(20), "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // With the token, so POSTs start real backups (then meet the rate limit).
    let t = Instant::now();
    let out = tokio::process::Command::new(&schemathesis)
        .args(["run", &agent.url("/v1/openapi.json"), "--url", &agent.base])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        .args(["--header", "Authorization: Bearer s3cret"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", "200", "--seed", "1", "--workers", "1"])
        .args(["--request-timeout", "60", "--generation-database", "none"])
        .arg("--no-color")
        .current_dir(work.path())
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{stderr}\nagent log:\n{}",
        agent.logs()
    );
    // It ran every operation and a fair number of cases.
    assert!(stdout.contains("Tested: 6"), "{stdout}");
    let generated: u64 = stdout
        .lines()
        .find_map(|l| l.trim().split_once(" generated, "))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no case count in:\n{stdout}"));
    assert!(generated >= 100, "only {generated} cases:\n{stdout}");
    eprintln!(
        "schemathesis: {generated} cases in {:.1} s, no issues",
        t.elapsed().as_secs_f64()
    );
    // Its triggers reached the agent: at least one real backup was taken.
    assert!(!etcd_backup_tests::complete_sets(&dest).is_empty());
    assert_eq!(agent.stop(Duration::from_secs(15)), Some(0));
}
