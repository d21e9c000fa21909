//! End-to-end harness: real etcd, real `etcdctl`, the real agent binary.
//!
//! Every helper starts its process on free loopback ports (127.0.0.1 only), in
//! its own temporary directory, and kills it when dropped. A missing tool is a
//! panic with the package to install, never a skipped test.
//!
//! # Layout
//! - [`etcd`]: a throwaway etcd member (plain or TLS) or cluster, `etcdctl`,
//!   keyspace dumps.
//! - [`tls`]: a CA, server and client certificates made on the fly.
//! - [`agent`]: the agent binary, config files for it, its runs, and the daemon
//!   as a child process.
//! - [`fake_etcd`]: a gRPC Maintenance server that serves a tampered snapshot.
//! - [`fixtures`]: `/etc/kubernetes` trees in the OpenShift and kubeadm shapes.
//! - [`k8s_objects`]: Kubernetes-like objects in the API server's protobuf
//!   storage form, for the compression benchmark, and the updates
//!   `etcd-churn` makes to them for the incremental one.
//! - [`relay`]: a TCP relay with a rate cap and a one-way delay per direction.
//! - [`http_relay`]: an HTTP relay that forwards a chosen request and loses
//!   the server's answer to it.
//! - [`hostile`]: a lying SFTP server (paramiko): hostile names in listings.
//! - [`pod`]: the rendered manifests and a master's file system, to run the
//!   agent as the DaemonSet does.
//! - [`sftp_setup`]: an agent config backing up to an sshd (trust, login,
//!   secret files).
//! - [`garage`]: a throwaway three-node Garage cluster (S3) with a bucket and
//!   a key, and rclone to look at it.
//! - [`s3_setup`]: an agent config backing up to a Garage cluster.
//! - [`moto`]: a throwaway moto S3 server, a second S3 store (one that
//!   honours `If-None-Match` on creates).
//! - [`sshd`]: a throwaway OpenSSH server with its own host key and client keys
//!   (optionally with a shim as its `Subsystem sftp`, e.g. `sftp-reply-shim`,
//!   which loses the reply to one rename).
//! - [`proftpd`]: ProFTPD's mod_sftp, a second real SFTP server, with
//!   configurable extensions.
//! - [`ranges`]: ranged reads of a destination checked against the bytes
//!   written: edges, boundaries, several at once, past the end.
//! - [`tmpfs`]: a size-limited tmpfs, to fill a destination's disk.

pub mod agent;
pub mod etcd;
pub mod fake_etcd;
pub mod fixtures;
pub mod garage;
pub mod hostile;
pub mod http_relay;
pub mod k8s_objects;
pub mod moto;
pub mod pod;
pub mod proftpd;
pub mod ranges;
pub mod relay;
pub mod s3_setup;
pub mod sftp_setup;
pub mod sshd;
pub mod tls;
pub mod tmpfs;

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Panics with an install hint when `tool` is not on `PATH`.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed; run scripts/test (it installs the `{package}` package) or `apt-get install {package}`"
    );
}

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls the async `f` until it returns `Some`, or panics after `timeout`
/// naming `what`.
pub async fn wait_for_async<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of `series` (name and labels, exactly as exposed) in a
/// Prometheus text exposition; panics with the text when it is missing.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{series} not in:\n{text}"))
        .parse()
        .unwrap()
}

/// Asserts that `fetch` said it wrote a cluster-restore.sh directory (its
/// `stdout`) and that `out` holds exactly the plain snapshot and resources
/// tarball of set `ts`, as cluster-restore.sh wants them.
pub fn assert_cluster_restore_dir(stdout: &str, out: &Path, ts: &etcd_backup_proto::SetTimestamp) {
    assert!(
        stdout.contains("is a cluster-restore.sh directory"),
        "{stdout}"
    );
    let mut names = files_below(out);
    names.sort();
    let mut want = vec![ts.snapshot_file_name(), ts.resources_file_name()];
    want.sort();
    assert_eq!(names, want);
}

/// Every regular file below `dir`, as paths relative to it, sorted.
pub fn files_below(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The directories holding a `manifest.json` below `dir`: the complete sets.
pub fn complete_sets(dir: &Path) -> Vec<String> {
    files_below(dir)
        .into_iter()
        .filter_map(|f| f.strip_suffix("/manifest.json").map(str::to_string))
        .collect()
}

/// A `destinations:` section from named single-destination sections: each
/// `(name, yaml)` pair's `yaml` is a `destination:` section (as
/// [`sftp_setup::sshd_destination_yaml`] or
/// [`s3_setup::garage_destination_yaml`] write it), which becomes the entry
/// `- name: <name>` with the same kind and keys, in the order given.
pub fn destinations_yaml(entries: &[(&str, String)]) -> String {
    let mut out = String::from("destinations:\n");
    for (name, yaml) in entries {
        let body = yaml
            .strip_prefix("destination:\n")
            .unwrap_or_else(|| panic!("not a destination: section:\n{yaml}"));
        out += &format!("  - name: {name}\n");
        for line in body.lines() {
            out += &format!("  {line}\n");
        }
    }
    out
}
