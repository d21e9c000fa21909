//! The real `etcd-backup-agent` binary, its config files and its runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::etcd::{EtcdServer, EtcdVersion};
use crate::{free_port, metric, wait_for};

/// The agent binary, built once per test process with the workspace's cargo.
///
/// `ETCD_BACKUP_AGENT_BIN` overrides it (to test an installed binary).
pub fn agent_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("ETCD_BACKUP_AGENT_BIN") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "etcd-backup-agent",
            "--bin",
            "etcd-backup-agent",
            "--message-format=json",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit());
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("run cargo build for the agent binary");
        assert!(
            out.status.success(),
            "cargo build of etcd-backup-agent failed"
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["reason"] == "compiler-artifact" && v["target"]["name"] == "etcd-backup-agent"
            })
            .find_map(|v| v["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no etcd-backup-agent executable")
    })
    .clone()
}

/// What the agent's config file says; rendered to YAML by [`AgentConfig::yaml`].
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `node_name`.
    pub node_name: String,
    /// `cluster_name`.
    pub cluster_name: String,
    /// `etcd.endpoints`.
    pub endpoints: Vec<String>,
    /// `etcd.ca_file`, `etcd.cert_file`, `etcd.key_file`.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// `etcd.dial_timeout`.
    pub dial_timeout: String,
    /// `etcd.stall_timeout`.
    pub stall_timeout: String,
    /// `resources.layout`.
    pub layout: String,
    /// `resources.root`.
    pub root: Option<PathBuf>,
    /// `destination.local.path`.
    pub destination: PathBuf,
    /// The whole `destination:` section, replacing `local` (for SFTP).
    pub destination_yaml: Option<String>,
    /// `retry.attempts` (1: fail at once, which keeps failure tests fast).
    pub retry_attempts: u32,
    /// `retry.initial_delay`.
    pub retry_initial_delay: String,
    /// Any further top-level YAML (schedule, http, shutdown_grace, …).
    pub extra: String,
}

impl AgentConfig {
    /// A config that backs up `etcd` (no resources) into `destination`.
    pub fn new(etcd: &EtcdServer, destination: &Path) -> Self {
        let tls = etcd.tls.as_ref().map(|t| {
            (
                t.ca_cert.clone(),
                t.client_cert.clone(),
                t.client_key.clone(),
            )
        });
        Self::for_endpoint(&etcd.client_url, tls, destination)
    }

    /// A config for any endpoint.
    pub fn for_endpoint(
        endpoint: &str,
        tls: Option<(PathBuf, PathBuf, PathBuf)>,
        destination: &Path,
    ) -> Self {
        Self {
            node_name: "master-0".into(),
            cluster_name: "test".into(),
            endpoints: vec![endpoint.to_string()],
            tls,
            dial_timeout: "5s".into(),
            stall_timeout: "10s".into(),
            layout: "none".into(),
            root: None,
            destination: destination.to_path_buf(),
            destination_yaml: None,
            retry_attempts: 1,
            retry_initial_delay: "1s".into(),
            extra: String::new(),
        }
    }

    /// The YAML text.
    pub fn yaml(&self) -> String {
        let mut y = format!(
            "node_name: {}\ncluster_name: {}\netcd:\n  endpoints: [{}]\n  dial_timeout: {}\n  stall_timeout: {}\n",
            self.node_name,
            self.cluster_name,
            self.endpoints
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", "),
            self.dial_timeout,
            self.stall_timeout
        );
        if let Some((ca, cert, key)) = &self.tls {
            y += &format!(
                "  ca_file: {}\n  cert_file: {}\n  key_file: {}\n",
                ca.display(),
                cert.display(),
                key.display()
            );
        }
        y += &format!("resources:\n  layout: {}\n", self.layout);
        if let Some(root) = &self.root {
            y += &format!("  root: {}\n", root.display());
        }
        match &self.destination_yaml {
            Some(d) => y += d,
            None => {
                y += &format!(
                    "destination:\n  local:\n    path: {}\n",
                    self.destination.display()
                )
            }
        }
        y += &format!(
            "retry:\n  attempts: {}\n  initial_delay: {}\n  max_delay: {}\n",
            self.retry_attempts, self.retry_initial_delay, self.retry_initial_delay
        );
        y += &self.extra;
        y
    }

    /// Writes the YAML to `dir/config.yaml` and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let p = dir.join("config.yaml");
        std::fs::write(&p, self.yaml()).expect("write config");
        p
    }
}

/// How a run of the binary ended.
#[derive(Debug)]
pub struct AgentRun {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error (the logs).
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl AgentRun {
    /// Panics with the output unless the exit code is `code`.
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "agent exited {} (wanted {code})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

/// The agent binary with `args`, no stdin, `RUST_LOG` and `NODE_NAME` unset,
/// and the etcd tools (`etcdutl`/`etcdctl`, `etcd` for a drill) of the
/// version `ETCD_VERSION` selects first on its `PATH`.
fn agent_command(args: &[&str]) -> Command {
    agent_command_with(EtcdVersion::from_env(), args)
}

/// [`agent_command`] finding etcd `version`'s tools.
fn agent_command_with(version: EtcdVersion, args: &[&str]) -> Command {
    let mut cmd = Command::new(agent_bin());
    cmd.env("PATH", version.path_env());
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("NODE_NAME")
        .stdin(Stdio::null());
    cmd
}

/// Runs the agent binary with `args`, no stdin, `RUST_LOG` unset.
pub fn run_agent(args: &[&str]) -> AgentRun {
    run_agent_in(None, args)
}

/// [`run_agent`] with etcd `version`'s tools on the agent's `PATH`, whatever
/// `ETCD_VERSION` says.
pub fn run_agent_with_etcd(version: EtcdVersion, args: &[&str]) -> AgentRun {
    run(agent_command_with(version, args))
}

/// [`run_agent`] in working directory `cwd` (this process's when `None`).
pub fn run_agent_in(cwd: Option<&Path>, args: &[&str]) -> AgentRun {
    let mut cmd = agent_command(args);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    run(cmd)
}

/// [`run_agent`] with `TMPDIR` set to `tmpdir`.
pub fn run_agent_with_tmpdir(tmpdir: &Path, args: &[&str]) -> AgentRun {
    let mut cmd = agent_command(args);
    cmd.env("TMPDIR", tmpdir);
    run(cmd)
}

fn run(mut cmd: Command) -> AgentRun {
    let start = Instant::now();
    let out = cmd.output().expect("run etcd-backup-agent");
    AgentRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// Starts `etcd-backup-agent backup --config <config>` in the background,
/// its logs to the file `log`, its standard output discarded, so a test can
/// signal or stall it mid-run.
pub fn spawn_backup(config: &Path, log: &Path) -> Child {
    agent_command(&["backup", "--config", config.to_str().expect("utf-8 path")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("create the agent's log file"))
        .spawn()
        .expect("start etcd-backup-agent backup")
}

/// Waits for a [`spawn_backup`] (or any agent child) started at `started`:
/// its exit code, its standard output if piped, and its `log`.
pub fn finish_backup(agent: Child, log: &Path, started: Instant) -> AgentRun {
    let out = agent
        .wait_with_output()
        .expect("wait for etcd-backup-agent");
    AgentRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: std::fs::read_to_string(log).unwrap_or_default(),
        elapsed: started.elapsed(),
    }
}

/// `etcd-backup-agent backup --config <config>`.
pub fn backup(config: &Path) -> AgentRun {
    run_agent(&["backup", "--config", config.to_str().expect("utf-8 path")])
}

/// The agent's daemon (`etcd-backup-agent run`) as a child process on
/// `127.0.0.1:<port>`; killed on drop unless [`AgentDaemon::stop`]ped.
pub struct AgentDaemon {
    child: Option<Child>,
    /// `http://127.0.0.1:<port>`: the API, `/metrics` included.
    pub base: String,
    /// Where its standard error (the logs) goes.
    pub log: PathBuf,
    /// The directory of the config and log, when [`AgentDaemon::start_on_free_port`] made it.
    _dir: Option<tempfile::TempDir>,
}

impl AgentDaemon {
    /// Runs the binary on `config`, whose `http.listen` is `127.0.0.1:<port>`,
    /// and waits until the port accepts connections.
    pub fn start(config: &Path, port: u16) -> Self {
        let log = config.with_extension("log");
        let file = std::fs::File::create(&log).expect("daemon log file");
        let child = Command::new(agent_bin())
            .args(["run", "--config", config.to_str().expect("utf-8 path")])
            .env_remove("RUST_LOG")
            .env_remove("NODE_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start etcd-backup-agent run");
        let mut d = Self {
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            log,
            _dir: None,
        };
        wait_for("the daemon's port", Duration::from_secs(30), || {
            if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("the daemon exited with {status}:\n{}", d.logs());
            }
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        d
    }

    /// Runs `config` plus an `http.listen` on a free port (so `config.extra`
    /// must not have an `http:` section), with its config file and log in a
    /// new temporary directory.
    pub fn start_on_free_port(config: &AgentConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut config = config.clone();
        config.extra += &format!("http:\n  listen: 127.0.0.1:{port}\n");
        let mut d = Self::start(&config.write(dir.path()), port);
        d._dir = Some(dir);
        d
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The logs so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM (the daemon then drains and exits).
    pub fn terminate(&self) {
        if let Some(c) = &self.child {
            Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .expect("kill -TERM");
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit code.
    pub fn stop(mut self, timeout: Duration) -> Option<i32> {
        self.terminate();
        let mut child = self.child.take()?;
        let status = wait_for("the daemon to exit", timeout, || {
            child.try_wait().expect("wait for the daemon")
        });
        status.code()
    }

    /// Stops the daemon (SIGKILL) now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for AgentDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// After one run triggered over HTTP that was partial (destination `failed`
/// failed at stage `upload`, destination `held` stored the set): waits for
/// the daemon's catalog rescan to count `held`'s set, then checks every
/// per-destination series of that outcome.
pub fn assert_partial_run_metrics(daemon: &AgentDaemon, held: &str, failed: &str) {
    let text = wait_for("the catalog rescan", Duration::from_secs(30), || {
        let out = Command::new("curl")
            .args(["-sS", &daemon.url("/metrics")])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (metric(
            &text,
            &format!("etcd_backup_sets{{destination=\"{held}\"}}"),
        ) == 1.0)
            .then_some(text)
    });
    let last_success = |d: &str| {
        metric(
            &text,
            &format!("etcd_backup_last_success_timestamp_seconds{{destination=\"{d}\"}}"),
        )
    };
    assert!(last_success(held) > 0.0, "{held}'s last success\n{text}");
    assert_eq!(last_success(failed), 0.0, "{failed}'s last success");
    for (series, want) in [
        (
            format!("etcd_backup_failures_total{{stage=\"upload\",destination=\"{failed}\"}}"),
            1.0,
        ),
        (
            format!("etcd_backup_failures_total{{stage=\"upload\",destination=\"{held}\"}}"),
            0.0,
        ),
        (
            "etcd_backup_runs_total{trigger=\"http\",result=\"partial\"}".to_string(),
            1.0,
        ),
        (
            format!(
                "etcd_backup_destination_runs_total{{destination=\"{failed}\",result=\"failure\"}}"
            ),
            1.0,
        ),
        (
            format!(
                "etcd_backup_destination_runs_total{{destination=\"{held}\",result=\"success\"}}"
            ),
            1.0,
        ),
        (format!("etcd_backup_sets{{destination=\"{failed}\"}}"), 0.0),
    ] {
        assert_eq!(metric(&text, &series), want, "{series}");
    }
}
