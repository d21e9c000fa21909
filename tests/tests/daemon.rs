//! The daemon: the HTTP API against a real etcd and a real destination, the
//! metrics it exposes, `run_on_start`, and shutdown of the real binary.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_backup_agent::config::{Config, Environment};
use etcd_backup_agent::daemon;
use etcd_backup_proto::api::{ErrorResponse, Readiness, RunList, RunRecord, RunState, Trigger};
use etcd_backup_proto::{FileKind, Manifest};
use etcd_backup_tests::agent::{agent_bin, AgentConfig, AgentDaemon};
use etcd_backup_tests::etcd::{real_snapshot_db, EtcdServer};
use etcd_backup_tests::fake_etcd::{FakeEtcd, Tamper};
use etcd_backup_tests::{complete_sets, files_below, free_port, metric, wait_for, wait_for_async};
use reqwest::StatusCode;
use tokio::sync::oneshot;

/// A daemon running in this process on a port-0 listener.
struct Daemon {
    base: String,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), daemon::DaemonError>>,
}

impl Daemon {
    async fn start(cfg: &AgentConfig) -> Self {
        let env = Environment {
            node_name: None,
            hostname: None,
        };
        let config = Config::parse(&cfg.yaml(), &env).expect("test config is valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon::run_on(config, listener, None, async {
            let _ = rx.await;
        }));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let d = Self {
            base,
            http,
            stop: Some(tx),
            task,
        };
        for _ in 0..100 {
            if let Ok(r) = d.http.get(d.url("/healthz")).send().await {
                if r.status() == StatusCode::OK {
                    return d;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("daemon did not answer /healthz");
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, query: &str) -> (StatusCode, serde_json::Value) {
        let r = self
            .http
            .post(self.url(&format!("/v1/backups{query}")))
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap())
    }

    async fn run(&self, id: &str) -> RunRecord {
        self.http
            .get(self.url(&format!("/v1/backups/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn metrics(&self) -> String {
        let r = self.http.get(self.url("/metrics")).send().await.unwrap();
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"));
        r.text().await.unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("daemon stopped in time")
            .unwrap()
            .unwrap();
    }
}

/// Hourly schedule, no start-up run: only the API starts backups.
fn daemon_config(etcd_url: &str, dest: &Path) -> AgentConfig {
    let mut cfg = AgentConfig::for_endpoint(etcd_url, None, dest);
    cfg.extra = "schedule: \"0 * * * *\"\nrun_on_start: never\nshutdown_grace: 3s\n".into();
    cfg
}

#[tokio::test(flavor = "multi_thread")]
async fn trigger_then_poll_to_success_and_readiness() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let d = Daemon::start(&daemon_config(&etcd.client_url, &dest)).await;

    // Ready once etcd answered and the destination was reached.
    let ready = wait_for_async("readiness", Duration::from_secs(30), || async {
        let r = d.http.get(d.url("/readyz")).send().await.ok()?;
        (r.status() == StatusCode::OK).then_some(())?;
        r.json::<Readiness>().await.ok()
    })
    .await;
    assert!(ready.ready && ready.etcd && ready.destination && ready.config);

    let (status, body) = d.post("").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let started: RunRecord = serde_json::from_value(body).unwrap();
    assert_eq!(started.state, RunState::Running);
    assert_eq!(started.trigger, Trigger::Http);

    let done = wait_for_async("the run to end", Duration::from_secs(30), || async {
        let r = d.run(&started.id).await;
        (r.state != RunState::Running).then_some(r)
    })
    .await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    assert!(done.finished_at.unwrap() >= done.started_at);
    assert_eq!(done.attempts, 1);
    let stages: Vec<&str> = done.stages.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(stages, ["connect", "snapshot", "upload", "manifest"]);
    let set = done.set.clone().unwrap();
    assert_eq!(complete_sets(&dest), vec![set.clone()]);
    let snap_stage = &done.stages[1];
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(dest.join(&set).join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(snap_stage.bytes, m.file(FileKind::Snapshot).unwrap().size);
    assert!(done.location.unwrap().starts_with("local:"));

    let list: RunList = d
        .http
        .get(d.url("/v1/backups"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.runs.len(), 1);
    assert_eq!(list.runs[0].id, started.id);

    let r = d.http.get(d.url("/v1/backups/nope")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let e: ErrorResponse = r.json().await.unwrap();
    assert!(e.error.contains("nope"));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_true_answers_200_on_success_and_500_on_failure_and_metrics_follow() {
    let mut etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let mut cfg = daemon_config(&etcd.client_url, &dest);
    cfg.dial_timeout = "1s".into();
    // Three triggers in a few seconds, from one client.
    cfg.extra += "http:\n  trigger_min_interval: 0s\n";
    let d = Daemon::start(&cfg).await;

    let before = metric(
        &d.metrics().await,
        "etcd_backup_last_attempt_timestamp_seconds",
    );
    assert_eq!(before, 0.0);
    let t0 = chrono::Utc::now().timestamp() as f64;
    let (status, body) = d.post("?wait=true").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ok: RunRecord = serde_json::from_value(body).unwrap();
    assert_eq!(ok.state, RunState::Succeeded);

    let text = d.metrics().await;
    let success_at = metric(
        &text,
        "etcd_backup_last_success_timestamp_seconds{destination=\"default\"}",
    );
    assert!(
        success_at >= t0 && success_at <= t0 + 30.0,
        "{success_at} vs {t0}"
    );
    let set = dest.join(ok.set.as_ref().unwrap());
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(set.join("manifest.json")).unwrap()).unwrap();
    let snap = m.file(FileKind::Snapshot).unwrap();
    let on_disk = std::fs::metadata(set.join(&snap.name)).unwrap().len();
    assert_eq!(
        metric(&text, "etcd_backup_last_size_bytes{artifact=\"snapshot\"}"),
        on_disk as f64
    );
    assert_eq!(
        metric(&text, "etcd_backup_last_revision"),
        m.snapshot_status.unwrap().revision as f64
    );
    assert_eq!(
        metric(
            &text,
            "etcd_backup_runs_total{trigger=\"http\",result=\"success\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "etcd_backup_runs_total{trigger=\"http\",result=\"failure\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(
            &text,
            "etcd_backup_duration_seconds_count{result=\"success\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "etcd_backup_in_progress"), 0.0);
    assert_eq!(
        metric(&text, "etcd_backup_agent_build_info{version=\"0.1.0\"}"),
        1.0
    );
    let next = metric(&text, "etcd_backup_next_run_timestamp_seconds");
    assert!(
        next > t0 && next <= t0 + 3600.0 && next % 3600.0 == 0.0,
        "next run {next}"
    );

    // etcd gone: the next run fails at connect, and ?wait=true says 500.
    etcd.kill();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = d.post("?wait=true").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let failed: RunRecord = serde_json::from_value(body).unwrap();
    assert_eq!(failed.state, RunState::Failed);
    assert_eq!(failed.failed_stage.as_deref(), Some("connect"));
    assert!(
        failed.error.as_ref().unwrap().contains("etcd"),
        "{failed:?}"
    );

    let text = d.metrics().await;
    let failures = metric(
        &text,
        "etcd_backup_runs_total{trigger=\"http\",result=\"failure\"}",
    );
    if failures != 1.0 {
        // Seen once in a full parallel run and never reproduced: the run
        // history says which runs were counted.
        let runs = d.http.get(d.url("/v1/backups")).send().await.unwrap();
        panic!(
            "{failures} failed HTTP runs counted, 1 expected; the runs: {}",
            runs.text().await.unwrap()
        );
    }
    assert_eq!(
        metric(
            &text,
            "etcd_backup_failures_total{stage=\"connect\",destination=\"default\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "etcd_backup_failures_total{stage=\"upload\",destination=\"default\"}"
        ),
        0.0
    );
    // The success timestamp stays where the success left it; the attempt moved on.
    assert_eq!(
        metric(
            &text,
            "etcd_backup_last_success_timestamp_seconds{destination=\"default\"}"
        ),
        success_at
    );
    assert!(metric(&text, "etcd_backup_last_attempt_timestamp_seconds") > before);
    assert_eq!(complete_sets(&dest).len(), 1);

    // The documented one-liner: curl exits non-zero exactly when there is no new backup.
    let curl = Command::new("curl")
        .args(["-fsS", "-XPOST", &d.url("/v1/backups?wait=true")])
        .output()
        .expect("curl");
    assert!(!curl.status.success());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_posts_start_exactly_one_run() {
    // A stream that stalls keeps the one run busy for the whole volley.
    let db = real_db().await;
    let fake = FakeEtcd::start(db, Tamper::Stall);
    let work = tempfile::tempdir().unwrap();
    let mut cfg = daemon_config(&fake.url, &work.path().join("backups"));
    cfg.stall_timeout = "4s".into();
    let d = Daemon::start(&cfg).await;

    let mut volley = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let http = d.http.clone();
        let url = d.url("/v1/backups");
        volley.spawn(async move {
            let r = http.post(url).send().await.unwrap();
            (r.status(), r.json::<serde_json::Value>().await.unwrap())
        });
    }
    let mut accepted = Vec::new();
    let mut conflicts = Vec::new();
    while let Some(r) = volley.join_next().await {
        let (status, body) = r.unwrap();
        match status {
            StatusCode::ACCEPTED => accepted.push(body["id"].as_str().unwrap().to_string()),
            StatusCode::CONFLICT => conflicts.push(body["run_id"].as_str().unwrap().to_string()),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(conflicts.len(), 49);
    assert!(conflicts.iter().all(|id| *id == accepted[0]));

    // ?wait=true on a busy agent waits for the run in progress: here it fails (stall).
    let (status, body) = d.post("?wait=true").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["id"].as_str().unwrap(), accepted[0]);
    let list: RunList = d
        .http
        .get(d.url("/v1/backups"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.runs.len(), 1);
    d.stop().await;
}

async fn real_db() -> Vec<u8> {
    real_snapshot_db(100).await
}

#[tokio::test(flavor = "multi_thread")]
async fn token_bodies_paths_and_methods_are_checked() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let token_file = work.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let mut cfg = daemon_config(&etcd.client_url, &work.path().join("backups"));
    cfg.extra += &format!("http:\n  token_file: {}\n", token_file.display());
    let d = Daemon::start(&cfg).await;
    let post = |auth: Option<&str>| {
        let mut r = d.http.post(d.url("/v1/backups?wait=true"));
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        r.send()
    };

    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic czNjcmV0LXRva2Vu"),
        Some("Bearer s3cret-tokenX"),
    ] {
        let r = post(auth).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let e: ErrorResponse = r.json().await.unwrap();
        assert!(e.error.contains("bearer token"));
    }
    assert!(files_below(&work.path().join("backups")).is_empty());
    let r = post(Some("Bearer s3cret-token")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Health, readiness, metrics and reads stay open.
    for path in ["/healthz", "/metrics", "/v1/backups"] {
        let r = d.http.get(d.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }

    let r = d.http.get(d.url("/v2/everything")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.json::<ErrorResponse>().await.is_ok());
    let r = d.http.delete(d.url("/v1/backups")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(r.json::<ErrorResponse>().await.is_ok());
    let r = d.http.put(d.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);

    let big = vec![b'x'; 64 * 1024];
    // A client of its own: the server closes this connection after the 413,
    // and a shared pool could hand it to the next request.
    let r = reqwest::Client::new()
        .post(d.url("/v1/backups"))
        .header("Authorization", "Bearer s3cret-token")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.json::<ErrorResponse>().await.is_ok());
    let r = d
        .http
        .post(d.url("/v1/backups?wait=maybe"))
        .header("Authorization", "Bearer s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Headers beyond hyper's limits are refused, not buffered.
    let huge = "h".repeat(512 * 1024);
    let r = d
        .http
        .get(d.url("/healthz"))
        .header("X-Huge", huge)
        .send()
        .await;
    assert!(r.map(|r| r.status().is_client_error()).unwrap_or(true));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn run_on_start_backs_up_when_stale_or_always_and_not_when_fresh_or_never() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let startup_runs = |runs: &[RunRecord]| {
        runs.iter()
            .filter(|r| r.trigger == Trigger::Startup)
            .count()
    };

    async fn runs_after(d: &Daemon, settle: Duration) -> Vec<RunRecord> {
        tokio::time::sleep(settle).await;
        let list: RunList = d
            .http
            .get(d.url("/v1/backups"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for r in &list.runs {
            if r.state == RunState::Running {
                d.http
                    .get(d.url(&format!("/v1/backups/{}", r.id)))
                    .send()
                    .await
                    .unwrap();
            }
        }
        list.runs
    }

    // Nothing stored yet: when_stale backs up at once.
    let mut cfg = daemon_config(&etcd.client_url, &dest);
    cfg.extra = "schedule: \"0 * * * *\"\nrun_on_start: when_stale\n".into();
    let d = Daemon::start(&cfg).await;
    let runs = runs_after(&d, Duration::from_millis(1500)).await;
    assert_eq!(startup_runs(&runs), 1, "{runs:?}");
    d.stop().await;
    assert_eq!(complete_sets(&dest).len(), 1);

    // A set from seconds ago is fresh for an hourly schedule.
    let d = Daemon::start(&cfg).await;
    let runs = runs_after(&d, Duration::from_millis(1500)).await;
    assert_eq!(startup_runs(&runs), 0, "{runs:?}");
    // A restarted agent reports the stored set's time, not 0, and lists it.
    let text = d.metrics().await;
    let seeded = metric(
        &text,
        "etcd_backup_last_success_timestamp_seconds{destination=\"default\"}",
    );
    assert!(
        seeded > chrono::Utc::now().timestamp() as f64 - 60.0,
        "{seeded}"
    );
    assert_eq!(
        metric(&text, "etcd_backup_sets{destination=\"default\"}"),
        1.0
    );
    let list: RunList = d
        .http
        .get(d.url("/v1/backups"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.sets.len(), 1);
    d.stop().await;

    // always: a run even so. etcd is unchanged since the stored set, so
    // (skip_unchanged, the default) the run stores nothing and says why.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cfg.extra = "schedule: \"0 * * * *\"\nrun_on_start: always\n".into();
    let d = Daemon::start(&cfg).await;
    let runs = runs_after(&d, Duration::from_millis(1500)).await;
    assert_eq!(startup_runs(&runs), 1, "{runs:?}");
    assert_eq!(runs[0].state, RunState::Skipped, "{runs:?}");
    d.stop().await;
    assert_eq!(complete_sets(&dest).len(), 1);
    // With skip_unchanged: false it stores a set.
    cfg.extra = "schedule: \"0 * * * *\"\nrun_on_start: always\nskip_unchanged: false\n".into();
    let d = Daemon::start(&cfg).await;
    let runs = runs_after(&d, Duration::from_millis(1500)).await;
    assert_eq!(startup_runs(&runs), 1, "{runs:?}");
    d.stop().await;
    assert_eq!(complete_sets(&dest).len(), 2);

    // A newest directory that holds a manifest.json is not a backup unless
    // the catalog says the set is complete: when_stale backs up.
    for set in complete_sets(&dest) {
        std::fs::write(dest.join(set).join("manifest.json"), b"{").unwrap();
    }
    cfg.extra = "schedule: \"0 * * * *\"\nrun_on_start: when_stale\n".into();
    let d = Daemon::start(&cfg).await;
    let runs = runs_after(&d, Duration::from_millis(1500)).await;
    assert_eq!(startup_runs(&runs), 1, "{runs:?}");
    d.stop().await;

    // never, with nothing stored for another node: no run.
    let mut other = daemon_config(&etcd.client_url, &dest);
    other.node_name = "master-9".into();
    other.extra = "schedule: \"0 * * * *\"\nrun_on_start: never\n".into();
    let d = Daemon::start(&other).await;
    let runs = runs_after(&d, Duration::from_millis(1500)).await;
    assert!(runs.is_empty(), "{runs:?}");
    d.stop().await;
}

#[test]
fn sigterm_during_a_slow_backup_exits_within_the_grace_and_leaves_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(real_db());
    let fake = FakeEtcd::start(db, Tamper::Stall);
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let port = free_port();
    let mut cfg = AgentConfig::for_endpoint(&fake.url, None, &dest);
    cfg.stall_timeout = "60s".into();
    cfg.extra = format!(
        "schedule: \"0 * * * *\"\nrun_on_start: never\nshutdown_grace: 2s\nhttp:\n  listen: 127.0.0.1:{port}\n"
    );
    let config = cfg.write(work.path());
    let mut child = Command::new(agent_bin())
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/v1/backups");
    wait_for(
        "the daemon to accept a backup",
        Duration::from_secs(20),
        || {
            let out = Command::new("curl")
                .args([
                    "-sS",
                    "-XPOST",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &url,
                ])
                .output()
                .ok()?;
            (String::from_utf8_lossy(&out.stdout) == "202").then_some(())
        },
    );
    // The stalled stream has written part of the snapshot.
    wait_for("a partial snapshot", Duration::from_secs(10), || {
        files_below(&dest)
            .into_iter()
            .find(|f| f.ends_with(".db.partial"))
    });
    let t = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    // New runs are refused while it drains.
    let out = Command::new("curl")
        .args([
            "-sS",
            "-XPOST",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ])
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        code == "503" || code == "000",
        "POST during shutdown answered {code}"
    );
    let status = wait_for("the daemon to exit", Duration::from_secs(15), || {
        child.try_wait().unwrap()
    });
    let elapsed = t.elapsed();
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        elapsed >= Duration::from_millis(1900),
        "did not wait for the grace: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(2 + 5),
        "took {elapsed:?}\n{stderr}"
    );
    assert!(stderr.contains("shutdown grace expired"), "{stderr}");
    assert!(complete_sets(&dest).is_empty());
    assert!(
        files_below(&dest).is_empty(),
        "left: {:?}",
        files_below(&dest)
    );
    // Every line of the run carries its id.
    let run_lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("backup started") || l.contains("backup failed"))
        .collect();
    assert!(
        !run_lines.is_empty() && run_lines.iter().all(|l| l.contains("run{id=")),
        "{stderr}"
    );
}

#[test]
fn run_without_a_schedule_is_a_usage_error() {
    let work = tempfile::tempdir().unwrap();
    let cfg = AgentConfig::for_endpoint("http://127.0.0.1:1", None, &work.path().join("b"));
    let run = etcd_backup_tests::agent::run_agent(&[
        "run",
        "--config",
        cfg.write(work.path()).to_str().unwrap(),
    ]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("schedule: required for `run`"),
        "{}",
        run.stderr
    );
}

#[test]
fn the_binary_serves_metrics_apart_and_trigger_reports_the_result() {
    let mut etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let (api, metrics_port) = (free_port(), free_port());
    let token = work.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let mut cfg = AgentConfig::new(&etcd, &dest);
    cfg.dial_timeout = "1s".into();
    cfg.extra = format!(
        "schedule: \"@daily\"\nrun_on_start: never\nhttp:\n  listen: 127.0.0.1:{api}\n  metrics_listen: 127.0.0.1:{metrics_port}\n  token_file: {}\n  trigger_min_interval: 0s\n",
        token.display()
    );
    let config = cfg.write(work.path());
    let config = config.to_str().unwrap();
    let mut child = Command::new(agent_bin())
        .args(["run", "--config", config])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let m = format!("http://127.0.0.1:{metrics_port}");
    wait_for("the metrics listener", Duration::from_secs(20), || {
        (curl(&[&format!("{m}/healthz")]) == "200").then_some(())
    });

    let run = etcd_backup_tests::agent::run_agent(&["trigger", "--config", config]);
    run.assert_code(0);
    let record: RunRecord = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(record.state, RunState::Succeeded);
    assert_eq!(complete_sets(&dest), vec![record.set.clone().unwrap()]);

    // The metrics listener shows metrics and health, and nothing else.
    let text = Command::new("curl")
        .args(["-sS", &format!("{m}/metrics")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert_eq!(
        metric(
            &text,
            "etcd_backup_runs_total{trigger=\"http\",result=\"success\"}"
        ),
        1.0
    );
    assert_eq!(curl(&[&format!("{m}/readyz")]), "200");
    assert_eq!(curl(&["-XPOST", &format!("{m}/v1/backups")]), "404");
    assert_eq!(curl(&[&format!("{m}/v1/backups")]), "404");
    // The API listener wants the token for POST.
    assert_eq!(
        curl(&["-XPOST", &format!("http://127.0.0.1:{api}/v1/backups")]),
        "401"
    );

    etcd.kill();
    let run = etcd_backup_tests::agent::run_agent(&["trigger", "--config", config]);
    run.assert_code(1);
    assert!(run.stderr.contains("500"), "{}", run.stderr);
    assert!(
        run.stderr.contains("\"state\": \"failed\""),
        "{}",
        run.stderr
    );

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = wait_for("the daemon to exit", Duration::from_secs(15), || {
        child.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(0));
    let run = etcd_backup_tests::agent::run_agent(&["trigger", "--config", config]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("is `etcd-backup-agent run` running"),
        "{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scheduled_drill_restores_the_newest_set_and_sets_its_metric() {
    let etcd = EtcdServer::start();
    assert!(etcd.etcdctl(&["put", "/k", "v"]).status.success());
    let work = tempfile::tempdir().unwrap();
    let mut cfg = daemon_config(&etcd.client_url, &work.path().join("backups"));
    // Every minute: the first drill comes within 60 s of the start.
    cfg.extra =
        "schedule: \"@daily\"\nrun_on_start: always\ndrill_schedule: \"* * * * *\"\n".into();
    let d = Daemon::start(&cfg).await;
    assert_eq!(
        metric(
            &d.metrics().await,
            "etcd_backup_last_drill_success_timestamp_seconds"
        ),
        0.0
    );
    let start = Instant::now();
    loop {
        let v = metric(
            &d.metrics().await,
            "etcd_backup_last_drill_success_timestamp_seconds",
        );
        if v > 0.0 {
            assert!(v >= chrono::Utc::now().timestamp() as f64 - 120.0);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(110),
            "no drill passed in time"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    d.stop().await;
}

/// A whole `GET path` to `127.0.0.1:port` from the loopback address `from`
/// (127.0.0.2 and the like stand for other hosts): the status, and how long
/// the answer took; `None` when there was none within 1 s.
async fn get_from(from: [u8; 4], port: u16, path: &str) -> (Option<u16>, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let exchange = async {
        let socket = tokio::net::TcpSocket::new_v4().ok()?;
        socket.bind(std::net::SocketAddr::from((from, 0))).ok()?;
        let mut s = socket
            .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut text = Vec::new();
        s.read_to_end(&mut text).await.ok()?;
        String::from_utf8_lossy(&text)
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let status = tokio::time::timeout(Duration::from_secs(1), exchange)
        .await
        .ok()
        .flatten();
    (status, started.elapsed())
}

/// One slow-header client connection, kept up until `stop`: it sends half a
/// request, then a header line a second; when the agent closes it, it
/// counts that and connects again a second later. `held` counts the
/// connections that stayed open for more than a second.
async fn slow_header_client(
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    held: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    closed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while !stop.load(SeqCst) {
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
        let mut counted = false;
        let mut buf = [0u8; 256];
        while !stop.load(SeqCst) {
            match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                // Closed (or answered, which a slow header never is).
                Ok(_) => break,
                Err(_) => {
                    if !counted {
                        counted = true;
                        held.fetch_add(1, SeqCst);
                    }
                    if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                        break;
                    }
                }
            }
        }
        if counted {
            held.fetch_sub(1, SeqCst);
        }
        closed.fetch_add(1, SeqCst);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_address_holding_300_slow_connections_starves_neither_probes_nor_scrapes_nor_the_schedule(
) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let (api, metrics_port) = (free_port(), free_port());
    let mut cfg = AgentConfig::new(&etcd, &dest);
    cfg.extra = format!(
        "schedule: \"@every 10s\"\njitter: 0s\nrun_on_start: never\nhttp:\n  listen: 127.0.0.1:{api}\n  metrics_listen: 127.0.0.1:{metrics_port}\n"
    );
    let daemon = AgentDaemon::start(&cfg.write(work.path()), api);
    wait_for_async("the metrics listener", Duration::from_secs(20), || async {
        (get_from([127, 0, 0, 2], metrics_port, "/healthz").await.0 == Some(200)).then_some(())
    })
    .await;

    // One address (127.0.0.1) opens 300 connections to the metrics listener,
    // the one on the node's address, and keeps them coming.
    let stop = Arc::new(AtomicBool::new(false));
    let (held, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..300)
        .map(|_| {
            tokio::spawn(slow_header_client(
                metrics_port,
                stop.clone(),
                held.clone(),
                closed.clone(),
            ))
        })
        .collect();

    // Meanwhile, for 25 s (two scheduled runs and more): the kubelet's probes
    // on the loopback listener, Prometheus from another address on the
    // metrics listener, every answer within 1 s.
    let start = Instant::now();
    let (mut slowest, mut checks, mut most_held) = (Duration::ZERO, 0, 0);
    while start.elapsed() < Duration::from_secs(25) {
        for (from, port, path, want) in [
            ([127, 0, 0, 1], api, "/healthz", Some(200)),
            ([127, 0, 0, 1], api, "/readyz", None),
            ([127, 0, 0, 2], metrics_port, "/metrics", Some(200)),
            ([127, 0, 0, 2], metrics_port, "/healthz", Some(200)),
        ] {
            let (status, took) = get_from(from, port, path).await;
            assert!(
                status.is_some(),
                "{path} on port {port} from {from:?} gave no answer within 1 s under load ({} attacker connections held, {} closed)\n{}",
                held.load(SeqCst),
                closed.load(SeqCst),
                daemon.logs()
            );
            if let Some(want) = want {
                assert_eq!(status, Some(want), "{path} on port {port}");
            }
            slowest = slowest.max(took);
            checks += 1;
        }
        most_held = most_held.max(held.load(SeqCst));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let refused = closed.load(SeqCst);
    stop.store(true, SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    eprintln!(
        "{checks} probe and scrape answers under load, slowest {slowest:?}; the attacking address held at most {most_held} connections, {refused} were closed by the agent"
    );
    // The load was real and the agent held that address to its share.
    assert!(
        (1..=8).contains(&most_held),
        "the one address held {most_held} connections at once"
    );
    assert!(refused >= 292, "only {refused} connections were refused");

    // The schedule went on: scheduled runs completed sets meanwhile.
    let r = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    let scheduled = metric(
        &text,
        "etcd_backup_runs_total{trigger=\"schedule\",result=\"success\"}",
    );
    assert!(scheduled >= 1.0, "{text}");
    assert!(!complete_sets(&dest).is_empty());
    assert_eq!(daemon.stop(Duration::from_secs(15)), Some(0));
}

/// Sends `request` to `addr` and reads the answer's status line: the status
/// and how long it took, or `None` after `limit`.
async fn raw_exchange(
    addr: &str,
    request: &[u8],
    limit: Duration,
) -> (Option<u16>, Duration, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let status = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.windows(2).any(|w| w == b"\r\n") {
                break;
            }
        }
    })
    .await
    .ok()
    .and_then(|()| {
        String::from_utf8_lossy(&got)
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    });
    (status, started.elapsed(), s)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_is_checked_before_the_body_and_the_body_is_bounded_in_size_and_time() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let token_file = work.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let dest = work.path().join("backups");
    let mut cfg = daemon_config(&etcd.client_url, &dest);
    cfg.extra += &format!("http:\n  token_file: {}\n", token_file.display());
    let d = Daemon::start(&cfg).await;
    let addr = d.base.trim_start_matches("http://").to_string();
    let head = |auth: &str, length: &str| {
        format!("POST /v1/backups HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {length}\r\n\r\n")
    };
    let good = "Authorization: Bearer s3cret-token\r\n";

    // No token: 401 at once, though the announced body never comes.
    for auth in ["", "Authorization: Bearer wrong\r\n"] {
        let mut request = head(auth, "4000").into_bytes();
        request.extend_from_slice(b"{\"partial\":");
        let (status, took, _conn) = raw_exchange(&addr, &request, Duration::from_secs(3)).await;
        assert_eq!(status, Some(401), "{auth:?}: answered in {took:?}");
    }
    // A body larger than 4 KiB, announced: 413 before any of it is sent.
    let (status, _, _conn) = raw_exchange(
        &addr,
        head(good, "10000000").as_bytes(),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(status, Some(413));
    // Sent without a length (chunked, never ending): 413 once 4 KiB are in.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let request = format!(
            "POST /v1/backups HTTP/1.1\r\nHost: x\r\n{good}Transfer-Encoding: chunked\r\n\r\n"
        );
        let (mut status, _, mut conn) =
            raw_exchange(&addr, request.as_bytes(), Duration::from_millis(100)).await;
        let mut sent = 0;
        while status.is_none() && sent < 64 * 1024 {
            let chunk = format!("400\r\n{}\r\n", " ".repeat(1024));
            if conn.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
            sent += 1024;
            let mut buf = [0u8; 64];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(100), conn.read(&mut buf)).await
            {
                status = String::from_utf8_lossy(&buf[..n])
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok());
            }
        }
        assert_eq!(
            status,
            Some(413),
            "an endless body is cut off (after {sent} bytes sent)"
        );
        assert!(sent <= 8 * 1024, "{sent} bytes were read");
    }
    // The token, then a body that stalls: 408 after 5 s, not never.
    let mut request = head(good, "100").into_bytes();
    request.extend_from_slice(b"{");
    let (status, took, _conn) = raw_exchange(&addr, &request, Duration::from_secs(15)).await;
    assert_eq!(status, Some(408), "after {took:?}");
    assert!(took >= Duration::from_secs(4), "{took:?}");

    // None of these started a run; a right one still does.
    assert!(files_below(&dest).is_empty());
    let mut request = head(good, "2").into_bytes();
    request.extend_from_slice(b"{}");
    let (status, _, _conn) = raw_exchange(&addr, &request, Duration::from_secs(5)).await;
    assert_eq!(status, Some(202));
    d.stop().await;
}

// ---------------------------------------------------------------------------
// skip_unchanged
// ---------------------------------------------------------------------------

const SKIPPED_UNCHANGED: &str = "etcd_backup_skipped_total{reason=\"unchanged\"}";
const SCHEDULED_OK: &str = "etcd_backup_runs_total{trigger=\"schedule\",result=\"success\"}";
const LAST_UNCHANGED: &str =
    "etcd_backup_last_unchanged_timestamp_seconds{destination=\"default\"}";

/// A run every 2 s, none at start-up; `extra` is added to the config.
fn every_two_seconds(etcd_url: &str, dest: &Path, extra: &str) -> AgentConfig {
    let mut cfg = AgentConfig::for_endpoint(etcd_url, None, dest);
    cfg.extra = format!(
        "schedule: \"@every 2s\"\njitter: 0s\nrun_on_start: never\nshutdown_grace: 3s\nhttp:\n  trigger_min_interval: 0s\n{extra}"
    );
    cfg
}

/// The manifest of a set directory under `dest`.
fn manifest_of(dest: &Path, set: &str) -> Manifest {
    serde_json::from_slice(&std::fs::read(dest.join(set).join("manifest.json")).unwrap()).unwrap()
}

/// etcd's store revision, as `etcdctl endpoint status` reports it.
fn etcd_revision(etcd: &EtcdServer) -> i64 {
    let out = etcd.etcdctl(&["endpoint", "status", "-w", "json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["Status"]["header"]["revision"].as_i64().unwrap()
}

async fn runs(d: &Daemon) -> Vec<RunRecord> {
    let list: RunList = d
        .http
        .get(d.url("/v1/backups"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list.runs
}

/// Waits until `series` reaches at least `n`.
async fn metric_reaches(d: &Daemon, series: &str, n: f64) -> String {
    wait_for_async(series, Duration::from_secs(40), || async {
        let text = d.metrics().await;
        (metric(&text, series) >= n).then_some(text)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduled_runs_skip_while_etcd_is_unchanged_and_store_after_a_write_and_http_always_stores(
) {
    let etcd = EtcdServer::start();
    for i in 0..20 {
        let out = etcd.etcdctl(&["put", &format!("/registry/k{i}"), "v"]);
        assert!(out.status.success(), "{out:?}");
    }
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let d = Daemon::start(&every_two_seconds(&etcd.client_url, &dest, "")).await;

    // The first scheduled run stores a set: there was none.
    metric_reaches(&d, SCHEDULED_OK, 1.0).await;
    let first = complete_sets(&dest);
    assert_eq!(first.len(), 1, "{first:?}");
    let revision = etcd_revision(&etcd);
    let m = manifest_of(&dest, &first[0]);
    assert_eq!(m.revision(), revision, "{m:?}");

    // No write since: the next scheduled runs are skipped, counted, recorded.
    let text = metric_reaches(&d, SKIPPED_UNCHANGED, 2.0).await;
    assert_eq!(metric(&text, SCHEDULED_OK), 1.0, "{text}");
    assert!(
        metric(&text, LAST_UNCHANGED) >= m.finished_at.timestamp() as f64,
        "{text}"
    );
    assert_eq!(metric(&text, "etcd_backup_in_progress"), 0.0, "{text}");
    assert_eq!(complete_sets(&dest), first);
    let skipped: Vec<RunRecord> = runs(&d)
        .await
        .into_iter()
        .filter(|r| r.state == RunState::Skipped)
        .collect();
    assert!(skipped.len() >= 2, "{skipped:?}");
    for r in &skipped {
        assert_eq!(r.trigger, Trigger::Schedule);
        assert_eq!(
            r.skip_reason,
            Some(etcd_backup_proto::api::RunSkipReason::Unchanged)
        );
        assert_eq!(r.revision, Some(revision));
        assert_eq!(r.set.as_deref(), Some(first[0].as_str()));
        assert!(r.finished_at.is_some());
    }

    // An HTTP-triggered run with etcd unchanged stores a set all the same.
    let (status, body) = d.post("?wait=true").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let posted: RunRecord = serde_json::from_value(body).unwrap();
    assert_eq!(posted.state, RunState::Succeeded, "{posted:?}");
    assert_eq!(posted.revision, Some(revision));
    let after_http = complete_sets(&dest);
    assert_eq!(after_http.len(), 2, "{after_http:?}");
    assert!(after_http.contains(posted.set.as_ref().unwrap()));

    // The schedule keeps skipping: the HTTP set is the newest and current.
    let skips = metric(&d.metrics().await, SKIPPED_UNCHANGED);
    metric_reaches(&d, SKIPPED_UNCHANGED, skips + 1.0).await;
    assert_eq!(complete_sets(&dest), after_http);

    // A write: the next scheduled run stores a set holding it.
    let out = etcd.etcdctl(&["put", "/registry/changed", "v2"]);
    assert!(out.status.success(), "{out:?}");
    let written = etcd_revision(&etcd);
    assert_eq!(written, revision + 1);
    let text = metric_reaches(&d, SCHEDULED_OK, 2.0).await;
    assert_eq!(metric(&text, SCHEDULED_OK), 2.0, "{text}");
    let sets = complete_sets(&dest);
    assert_eq!(sets.len(), 3, "{sets:?}");
    let newest = sets.iter().max().unwrap();
    assert_eq!(manifest_of(&dest, newest).revision(), written);
    // ... and after it, skips again.
    let skips = metric(&d.metrics().await, SKIPPED_UNCHANGED);
    metric_reaches(&d, SKIPPED_UNCHANGED, skips + 1.0).await;
    assert_eq!(complete_sets(&dest).len(), 3);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn skip_unchanged_false_stores_every_scheduled_run() {
    let etcd = EtcdServer::start();
    let out = etcd.etcdctl(&["put", "/registry/k", "v"]);
    assert!(out.status.success(), "{out:?}");
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let d = Daemon::start(&every_two_seconds(
        &etcd.client_url,
        &dest,
        "skip_unchanged: false\n",
    ))
    .await;
    let text = metric_reaches(&d, SCHEDULED_OK, 3.0).await;
    assert_eq!(metric(&text, SKIPPED_UNCHANGED), 0.0, "{text}");
    assert_eq!(metric(&text, LAST_UNCHANGED), 0.0, "{text}");
    assert!(complete_sets(&dest).len() >= 3);
    assert!(runs(&d).await.iter().all(|r| r.state != RunState::Skipped));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_newest_set_or_an_unreachable_etcd_never_causes_a_skip() {
    let mut etcd = EtcdServer::start();
    let out = etcd.etcdctl(&["put", "/registry/k", "v"]);
    assert!(out.status.success(), "{out:?}");
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let mut cfg = every_two_seconds(&etcd.client_url, &dest, "");
    cfg.dial_timeout = "1s".into();
    let d = Daemon::start(&cfg).await;
    metric_reaches(&d, SCHEDULED_OK, 1.0).await;
    metric_reaches(&d, SKIPPED_UNCHANGED, 1.0).await;

    // A set directory newer than the complete one, its manifest damaged:
    // its revision cannot be known, so the schedule stores again.
    let set = complete_sets(&dest).pop().unwrap();
    let (node_dir, _) = set.rsplit_once('/').unwrap();
    let damaged = dest.join(node_dir).join("2999-01-01_000000");
    std::fs::create_dir_all(&damaged).unwrap();
    std::fs::write(damaged.join("manifest.json"), b"{").unwrap();
    let text = metric_reaches(&d, SCHEDULED_OK, 2.0).await;
    let skips = metric(&text, SKIPPED_UNCHANGED);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let text = d.metrics().await;
    assert_eq!(metric(&text, SKIPPED_UNCHANGED), skips, "{text}");
    assert!(metric(&text, SCHEDULED_OK) >= 3.0, "{text}");
    std::fs::remove_dir_all(&damaged).unwrap();
    metric_reaches(&d, SKIPPED_UNCHANGED, skips + 1.0).await;

    // etcd gone: the check cannot ask it, so the run goes ahead and fails
    // at connect, counted as a failure, never as a skip.
    etcd.kill();
    let skips = metric(&d.metrics().await, SKIPPED_UNCHANGED);
    let text = metric_reaches(
        &d,
        "etcd_backup_runs_total{trigger=\"schedule\",result=\"failure\"}",
        1.0,
    )
    .await;
    assert_eq!(metric(&text, SKIPPED_UNCHANGED), skips, "{text}");
    assert!(
        metric(
            &text,
            "etcd_backup_failures_total{stage=\"connect\",destination=\"default\"}"
        ) >= 1.0,
        "{text}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_without_the_current_set_gets_a_scheduled_run() {
    let etcd = EtcdServer::start();
    let out = etcd.etcdctl(&["put", "/registry/k", "v"]);
    assert!(out.status.success(), "{out:?}");
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let mut cfg = every_two_seconds(&etcd.client_url, &a, "");
    cfg.destination_yaml = Some(format!(
        "destinations:\n  - name: a\n    local:\n      path: {}\n  - name: b\n    local:\n      path: {}\n",
        a.display(),
        b.display()
    ));
    let d = Daemon::start(&cfg).await;
    metric_reaches(&d, SCHEDULED_OK, 1.0).await;
    let text = metric_reaches(&d, SKIPPED_UNCHANGED, 1.0).await;
    for name in ["a", "b"] {
        let series =
            format!("etcd_backup_last_unchanged_timestamp_seconds{{destination=\"{name}\"}}");
        assert!(metric(&text, &series) > 1.7e9, "{text}");
    }
    let set = complete_sets(&b).pop().unwrap();
    assert_eq!(complete_sets(&a), std::slice::from_ref(&set));

    // b loses its set: etcd is unchanged, but b holds no current set, so
    // the schedule stores one (at both destinations, from one read of etcd).
    std::fs::remove_dir_all(b.join(&set)).unwrap();
    let text = metric_reaches(&d, SCHEDULED_OK, 2.0).await;
    assert_eq!(metric(&text, SCHEDULED_OK), 2.0, "{text}");
    assert_eq!(complete_sets(&b).len(), 1);
    assert_eq!(complete_sets(&a).len(), 2);
    // Then both are current again.
    let skips = metric(&d.metrics().await, SKIPPED_UNCHANGED);
    metric_reaches(&d, SKIPPED_UNCHANGED, skips + 1.0).await;
    assert_eq!(complete_sets(&b).len(), 1);
    d.stop().await;
}
