//! Fault matrix, cancellation row: SIGTERM (the run's `CancellationToken`,
//! which is what the binary's SIGTERM/Ctrl-C handler cancels) at every step
//! boundary of the set protocol, over a local directory and a real OpenSSH
//! server, 200 runs each; then the real binary SIGTERMed at random moments.
//!
//! After every run, file by file: a `manifest.json` never stands without both
//! data files beside it at the manifest's sizes; a cancelled run leaves no
//! entry at all in its node directory; a run that was not cancelled in time is
//! a complete set of exactly three files; and the outcome says which.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;

use etcd_backup_agent::backup::{self, Cause};
use etcd_backup_agent::config::{Config, DestinationConfig, Environment};
use etcd_backup_agent::store::destination::{
    Destination, DestinationError, DirEntry, DirSync, Durability, LocalDir, SftpDir, Upload,
};
use etcd_backup_proto::Manifest;
use etcd_backup_tests::agent::{spawn_backup, AgentConfig};
use etcd_backup_tests::etcd::{write_history, EtcdServer};
use etcd_backup_tests::files_below;
use etcd_backup_tests::fixtures::kubeadm_tree;
use etcd_backup_tests::sftp_setup::sshd_destination_yaml;
use etcd_backup_tests::sshd::{ClientKey, KeyKind, SshOptions, SshServer};

/// Cancellation runs per destination.
const RUNS: usize = 200;

/// When, relative to the n-th destination operation, the token is cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timing {
    /// Before the operation reaches the destination (it never does).
    Before,
    /// The instant the operation was handed to the destination (polled
    /// once, no chance yet to finish unless it did at once).
    Started,
    /// While the destination is carrying it out (started, then the run
    /// yielded once, so it may be half-way or done but not yet seen).
    During,
    /// Right after it answered, before the run sees the answer.
    After,
}

const TIMINGS: [Timing; 4] = [
    Timing::Before,
    Timing::Started,
    Timing::During,
    Timing::After,
];

/// The fault: which operation, when, and whether it fired.
struct Fault {
    at: usize,
    timing: Timing,
    ops: AtomicUsize,
    fired: AtomicBool,
    cancel: CancellationToken,
}

impl Fault {
    /// Runs one destination operation `op`, cancelling around it when it is
    /// the chosen one.
    async fn around<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, DestinationError>>,
    ) -> Result<T, DestinationError> {
        let n = self.ops.fetch_add(1, Ordering::SeqCst) + 1;
        if n != self.at {
            return op.await;
        }
        self.fired.store(true, Ordering::SeqCst);
        match self.timing {
            Timing::Before => {
                self.cancel.cancel();
                std::future::pending().await
            }
            Timing::Started => {
                let mut op = std::pin::pin!(op);
                let first =
                    std::future::poll_fn(|cx| std::task::Poll::Ready(op.as_mut().poll(cx))).await;
                self.cancel.cancel();
                match first {
                    std::task::Poll::Ready(r) => r,
                    std::task::Poll::Pending => op.await,
                }
            }
            Timing::During => {
                let mut op = std::pin::pin!(op);
                // Start it (one poll), then cancel while it is outstanding.
                let first = tokio::select! {
                    biased;
                    r = &mut op => Some(r),
                    () = tokio::task::yield_now() => None,
                };
                self.cancel.cancel();
                match first {
                    Some(r) => r,
                    None => op.await,
                }
            }
            Timing::After => {
                let r = op.await;
                self.cancel.cancel();
                r
            }
        }
    }
}

/// A destination that forwards to a real one and injects [`Fault`].
struct Faulty {
    inner: Box<dyn Destination>,
    fault: Arc<Fault>,
}

struct FaultyUpload {
    inner: Box<dyn Upload>,
    fault: Arc<Fault>,
}

#[async_trait]
impl Upload for FaultyUpload {
    async fn write(&mut self, buf: &[u8]) -> Result<(), DestinationError> {
        let fault = self.fault.clone();
        fault.around(self.inner.write(buf)).await
    }

    async fn finish(self: Box<Self>) -> Result<u64, DestinationError> {
        let fault = self.fault.clone();
        fault.around(self.inner.finish()).await
    }
}

#[async_trait]
impl Destination for Faulty {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn create(&self, path: &str) -> Result<Box<dyn Upload>, DestinationError> {
        let inner = self.fault.around(self.inner.create(path)).await?;
        Ok(Box::new(FaultyUpload {
            inner,
            fault: self.fault.clone(),
        }))
    }
    // The manifest goes the way the destination sends small files (on
    // SFTP, over the control session), as in a real run.
    async fn create_small(&self, path: &str) -> Result<Box<dyn Upload>, DestinationError> {
        let inner = self.fault.around(self.inner.create_small(path)).await?;
        Ok(Box::new(FaultyUpload {
            inner,
            fault: self.fault.clone(),
        }))
    }
    async fn rename(&self, from: &str, to: &str) -> Result<(), DestinationError> {
        self.fault.around(self.inner.rename(from, to)).await
    }
    // The set directory's syncs after the renames are steps of the protocol.
    async fn sync_dir(&self, dir: &str) -> Result<DirSync, DestinationError> {
        self.fault.around(self.inner.sync_dir(dir)).await
    }
    async fn durability(&self) -> Result<Durability, DestinationError> {
        self.inner.durability().await
    }
    async fn claim(&self, dir: &str) -> Result<(), DestinationError> {
        self.fault.around(self.inner.claim(dir)).await
    }
    async fn list(&self, dir: &str) -> Result<Vec<DirEntry>, DestinationError> {
        self.fault.around(self.inner.list(dir)).await
    }
    async fn open(
        &self,
        path: &str,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError> {
        self.inner.open(path).await
    }
    async fn open_range(
        &self,
        path: &str,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError> {
        self.inner.open_range(path, offset, len).await
    }
    // Clean-up runs after the cancellation: not counted, never faulted.
    async fn delete(&self, path: &str) -> Result<(), DestinationError> {
        self.inner.delete(path).await
    }
    async fn remove_dir(&self, path: &str) -> Result<(), DestinationError> {
        self.inner.remove_dir(path).await
    }
}

/// Where sets land on this machine, and how to make a config for node `node`.
struct Target {
    /// `<base>` as a local path (the SFTP server's directory for SFTP).
    base: PathBuf,
    /// The `destination:` YAML section.
    destination_yaml: String,
}

fn config_text(etcd: &EtcdServer, root: &Path, node: &str, target: &Target) -> String {
    format!(
        "node_name: {node}\ncluster_name: c\netcd:\n  endpoints: [\"{}\"]\n  dial_timeout: 5s\nresources:\n  layout: kubeadm\n  root: {}\n{}",
        etcd.client_url,
        root.display(),
        target.destination_yaml
    )
}

fn parse(text: &str) -> Config {
    Config::parse(
        text,
        &Environment {
            node_name: None,
            hostname: None,
        },
    )
    .unwrap_or_else(|e| panic!("config {text}: {e:?}"))
}

async fn open_destination(cfg: &Config) -> Box<dyn Destination> {
    match cfg.destination() {
        DestinationConfig::Local { path } => Box::new(LocalDir::open(path).await.unwrap()),
        DestinationConfig::Sftp(c) => Box::new(SftpDir::new(c.clone())),
        #[allow(unreachable_patterns)]
        other => panic!("unexpected destination {other:?}"),
    }
}

/// Every `manifest.json` below `base` has both data files beside it at the
/// manifest's sizes; returns the manifests' directories.
fn assert_no_manifest_without_data(base: &Path, case: &str) -> Vec<PathBuf> {
    let mut sets = Vec::new();
    for f in files_below(base) {
        let Some(dir) = f.strip_suffix("manifest.json") else {
            continue;
        };
        let dir = base.join(dir);
        let m: Manifest =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap())
                .unwrap_or_else(|e| panic!("{case}: {} unparsable: {e}", dir.display()));
        assert_eq!(m.files.len(), 2, "{case}: {m:?}");
        for file in &m.files {
            let meta = std::fs::metadata(dir.join(&file.name)).unwrap_or_else(|e| {
                panic!(
                    "{case}: manifest in {} without its {}: {e}; beside it: {:?}",
                    dir.display(),
                    file.name,
                    files_below(&dir)
                )
            });
            assert_eq!(meta.len(), file.size, "{case}: {} size", file.name);
        }
        sets.push(dir);
    }
    sets
}

/// Tallies of one destination's runs.
#[derive(Default, Debug)]
struct Tally {
    runs: usize,
    cancelled: usize,
    completed: usize,
    /// Destination operations of an untouched run.
    #[allow(dead_code)] // printed
    max_ops: usize,
}

/// Runs `RUNS` cancelled backups against `target`, cancelling around
/// operation 1, 2, … of each run in every timing, round after round.
async fn cancellation_matrix(etcd: &EtcdServer, root: &Path, target: &Target) -> Tally {
    // An untouched run first: how many operations a run makes.
    let probe = one_run(etcd, root, target, "probe", usize::MAX, Timing::After).await;
    assert!(probe.1, "the untouched run must complete");
    let max_ops = probe.0;
    assert!(
        max_ops >= 9,
        "a run makes at least 9 destination operations, saw {max_ops}"
    );
    let mut tally = Tally {
        max_ops,
        ..Tally::default()
    };
    let mut i = 0;
    'outer: loop {
        for at in 1..=max_ops + 1 {
            for timing in TIMINGS {
                if tally.runs == RUNS {
                    break 'outer;
                }
                i += 1;
                let (_, completed) =
                    one_run(etcd, root, target, &format!("n{i}"), at, timing).await;
                tally.runs += 1;
                if completed {
                    tally.completed += 1;
                } else {
                    tally.cancelled += 1;
                }
            }
        }
    }
    tally
}

/// One run of node `node` with the fault at operation `at`; returns the
/// operations it made and whether it completed. Asserts the destination.
async fn one_run(
    etcd: &EtcdServer,
    root: &Path,
    target: &Target,
    node: &str,
    at: usize,
    timing: Timing,
) -> (usize, bool) {
    let cfg = parse(&config_text(etcd, root, node, target));
    let cancel = CancellationToken::new();
    let fault = Arc::new(Fault {
        at,
        timing,
        ops: AtomicUsize::new(0),
        fired: AtomicBool::new(false),
        cancel: cancel.clone(),
    });
    let dest = Faulty {
        inner: open_destination(&cfg).await,
        fault: fault.clone(),
    };
    let result = tokio::time::timeout(Duration::from_secs(60), backup::run(&cfg, &dest, &cancel))
        .await
        .unwrap_or_else(|_| panic!("{node}: run with fault at op {at} {timing:?} hung"));
    let case = format!("{node}: cancel {timing:?} op {at}");
    let fired = fault.fired.load(Ordering::SeqCst);
    let node_dir = target.base.join("c").join(node);
    let sets = assert_no_manifest_without_data(&target.base, &case);
    let entries: Vec<String> = std::fs::read_dir(&node_dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let completed = match result {
        Ok(report) => {
            assert!(
                !fired || timing != Timing::Before,
                "{case}: completed although cancelled before an operation"
            );
            let set_dir = target.base.join(report.set.dir());
            assert!(sets.contains(&set_dir), "{case}: no manifest");
            assert_eq!(entries, vec![report.set.timestamp.to_string()], "{case}");
            let ts = report.set.timestamp;
            let mut want = vec![
                "manifest.json".to_string(),
                ts.snapshot_file_name(),
                ts.resources_file_name(),
            ];
            want.sort();
            assert_eq!(files_below(&set_dir), want, "{case}");
            for f in &report.manifest.files {
                assert_eq!(
                    std::fs::metadata(set_dir.join(&f.name)).unwrap().len(),
                    f.size,
                    "{case}: {}",
                    f.name
                );
            }
            true
        }
        Err(e) => {
            assert!(fired, "{case}: failed without a fault: {e}");
            assert!(matches!(*e.cause, Cause::Cancelled), "{case}: {e}");
            assert!(e.not_removed.is_empty(), "{case}: {e}");
            assert!(
                entries.is_empty(),
                "{case}: the cancelled run left {entries:?} in {}: {:?}",
                node_dir.display(),
                files_below(&node_dir)
            );
            false
        }
    };
    if !fired {
        assert!(
            completed,
            "{case}: the fault never fired, yet the run failed"
        );
    }
    (fault.ops.load(Ordering::SeqCst), completed)
}

fn local_target(dir: &Path) -> Target {
    let base = dir.join("dest");
    Target {
        destination_yaml: format!("destination:\n  local:\n    path: {}\n", base.display()),
        base,
    }
}

fn sftp_target(sshd: &SshServer, key: &ClientKey) -> Target {
    let base = sshd.sftp_root.join("backups");
    Target {
        destination_yaml: sshd_destination_yaml(sshd, key, &base),
        base,
    }
}

async fn small_etcd() -> EtcdServer {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    write_history(&mut client, "/registry/configmaps/default", 50).await;
    etcd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_at_every_step_of_the_set_protocol_never_leaves_a_manifest_or_a_trace_locally() {
    let etcd = small_etcd().await;
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("k8s");
    kubeadm_tree(&root);
    let target = local_target(work.path());
    let t = Instant::now();
    let tally = cancellation_matrix(&etcd, &root, &target).await;
    eprintln!("local: {tally:?} in {:?}", t.elapsed());
    assert_eq!(tally.runs, RUNS);
    assert!(tally.cancelled >= RUNS / 2, "{tally:?}");
    assert!(tally.completed >= 1, "{tally:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_at_every_step_of_the_set_protocol_never_leaves_a_manifest_or_a_trace_over_sftp() {
    let etcd = small_etcd().await;
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        ..SshOptions::default()
    });
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("k8s");
    kubeadm_tree(&root);
    let target = sftp_target(&sshd, &key);
    let t = Instant::now();
    let tally = cancellation_matrix(&etcd, &root, &target).await;
    eprintln!("sftp: {tally:?} in {:?}", t.elapsed());
    assert_eq!(tally.runs, RUNS);
    assert!(tally.cancelled >= RUNS / 2, "{tally:?}");
    assert!(tally.completed >= 1, "{tally:?}");
}

/// Real-process runs per destination.
const PROCESS_RUNS: usize = 30;

/// Whether `pid` has a handler installed for SIGTERM (`SigCgt` in
/// /proc/<pid>/status), i.e. the agent will cancel rather than die.
fn catches_sigterm(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (15 - 1)) != 0)
}

/// What the binary did with one SIGTERM.
#[derive(Default, Debug)]
struct ProcessTally {
    cancelled: usize,
    completed: usize,
}

/// Runs `etcd-backup-agent backup` `PROCESS_RUNS` times against `target`,
/// SIGTERMing it at moments spread over an untouched run's duration (counted
/// from when it catches SIGTERM), and asserts each outcome and what is left.
fn sigterm_the_binary(etcd: &EtcdServer, root: &Path, target: &Target) -> ProcessTally {
    let work = tempfile::tempdir().unwrap();
    let run = |node: &str, delay: Option<Duration>| -> (i32, String, Duration) {
        let mut cfg = AgentConfig::new(etcd, &target.base);
        cfg.node_name = node.to_string();
        cfg.cluster_name = "c".into();
        cfg.layout = "kubeadm".into();
        cfg.root = Some(root.to_path_buf());
        cfg.destination_yaml = Some(target.destination_yaml.clone());
        cfg.retry_attempts = 3;
        let dir = work.path().join(node);
        std::fs::create_dir(&dir).unwrap();
        let config = cfg.write(&dir);
        let mut child = spawn_backup(&config, &dir.join("stderr"));
        let pid = child.id();
        // Polled every 200 µs: an untouched run takes tens of milliseconds.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !catches_sigterm(pid) && child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the agent never caught SIGTERM");
            std::thread::sleep(Duration::from_micros(200));
        }
        let started = Instant::now();
        if let Some(d) = delay {
            std::thread::sleep(d);
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline + Duration::from_secs(30),
                "the agent never exited"
            );
            std::thread::sleep(Duration::from_micros(200));
        };
        let took = started.elapsed();
        (
            status.code().unwrap_or(-1),
            std::fs::read_to_string(dir.join("stderr")).unwrap(),
            took,
        )
    };
    // The shortest of three untouched runs: the first one warms caches.
    let untouched = (0..3)
        .map(|k| {
            let (code, stderr, took) = run(&format!("untouched{k}"), None);
            assert_eq!(code, 0, "{stderr}");
            took
        })
        .min()
        .unwrap();
    eprintln!("an untouched run takes {untouched:?} after it catches SIGTERM");
    let mut tally = ProcessTally::default();
    for i in 0..PROCESS_RUNS {
        // Evenly over [0, 0.9 × untouched), with the sub-millisecond part of
        // the clock as jitter so repeated runs probe different instants.
        let jitter = Duration::from_nanos(u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
                % 1_000_000,
        ));
        let delay = untouched.mul_f64(0.9 * i as f64 / PROCESS_RUNS as f64) + jitter;
        let node = format!("p{i}");
        let (code, stderr, _) = run(&node, Some(delay));
        let case = format!("{node}: SIGTERM after {delay:?}");
        assert_no_manifest_without_data(&target.base, &case);
        let node_dir = target.base.join("c").join(&node);
        let left = files_below(&node_dir);
        let entries = std::fs::read_dir(&node_dir)
            .map(|rd| rd.count())
            .unwrap_or(0);
        match code {
            0 => {
                tally.completed += 1;
                assert_eq!(entries, 1, "{case}: {left:?}");
                assert_eq!(left.len(), 3, "{case}: {left:?}");
                assert!(left.iter().any(|f| f.ends_with("/manifest.json")), "{case}");
            }
            1 => {
                tally.cancelled += 1;
                assert!(stderr.contains("cancelled"), "{case}: {stderr}");
                assert!(
                    !stderr.contains("retrying"),
                    "{case}: a cancelled run is not retried: {stderr}"
                );
                assert_eq!(entries, 0, "{case}: left {left:?}\n{stderr}");
            }
            other => panic!("{case}: exit {other}\n{stderr}"),
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_sigtermed_at_random_moments_exits_1_and_leaves_nothing_locally_or_over_sftp() {
    let etcd = small_etcd().await;
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        ..SshOptions::default()
    });
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("k8s");
    kubeadm_tree(&root);
    for target in [local_target(work.path()), sftp_target(&sshd, &key)] {
        let t = Instant::now();
        let tally = tokio::task::block_in_place(|| sigterm_the_binary(&etcd, &root, &target));
        eprintln!("{}: {tally:?} in {:?}", target.base.display(), t.elapsed());
        assert!(tally.cancelled >= PROCESS_RUNS / 3, "{tally:?}");
    }
}
