//! Fault matrix, etcd row: the local etcd member is SIGKILLed while its
//! snapshot streams to the destination. The stream goes through a relay
//! capped at 4 MiB/s, so with 16 MiB in etcd "mid-stream" lasts seconds and
//! the kill lands once the partial snapshot exists and is growing.
//!
//! - etcd stays down: exit 1 after every configured attempt (3), the last
//!   failing at connect or snapshot, nothing left at the destination;
//! - etcd comes back (same data dir and ports) within the retry window: a
//!   later attempt succeeds, the set verifies with `etcd-backup-agent verify`
//!   and restores with `etcdctl` to the same keyspace.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use etcd_backup_tests::agent::{run_agent, spawn_backup, AgentConfig};
use etcd_backup_tests::etcd::{fill_incompressible, restore_and_start, EtcdServer};
use etcd_backup_tests::relay::{Relay, RelayOptions, Shape};
use etcd_backup_tests::{complete_sets, files_below, wait_for};
use sha2::{Digest, Sha256};

/// MiB of values put into etcd.
const FILL_MIB: usize = 16;

/// The relay's cap, etcd to agent.
const RATE: u64 = 4 << 20;

/// Every key with the SHA-256 of its value, read one key at a time (the
/// values add up to more than one gRPC message may carry).
async fn keyspace(etcd: &EtcdServer) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut client = etcd.client().await;
    let keys = client
        .get(
            "",
            Some(
                etcd_client::GetOptions::new()
                    .with_all_keys()
                    .with_keys_only(),
            ),
        )
        .await
        .expect("list keys");
    let mut out = Vec::new();
    for kv in keys.kvs() {
        let r = client.get(kv.key(), None).await.expect("get");
        let value = r.kvs().first().expect("the key is there").value();
        out.push((kv.key().to_vec(), Sha256::digest(value).to_vec()));
    }
    out
}

fn client_addr(etcd: &EtcdServer) -> SocketAddr {
    etcd.client_url
        .trim_start_matches("http://")
        .parse()
        .expect("client address")
}

fn capped_relay(etcd: &EtcdServer) -> Relay {
    Relay::start(
        client_addr(etcd),
        RelayOptions {
            up: Shape::default(),
            down: Shape {
                rate: Some(RATE),
                delay: Duration::ZERO,
            },
        },
    )
}

/// Waits until a `.db.partial` below `dest` exists and grew between two
/// looks; returns its size then.
fn wait_for_growing_partial(dest: &Path, child: &mut Child, log: &Path) -> u64 {
    let size = || {
        files_below(dest)
            .iter()
            .find(|f| f.ends_with(".db.partial"))
            .and_then(|f| std::fs::metadata(dest.join(f)).ok())
            .map(|m| m.len())
    };
    wait_for(
        "a growing partial snapshot",
        Duration::from_secs(60),
        || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the agent exited ({status}) before the snapshot streamed:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            let first = size()?;
            std::thread::sleep(Duration::from_millis(100));
            let second = size()?;
            (first > 0 && second > first).then_some(second)
        },
    )
}

fn wait_exit(child: &mut Child) -> i32 {
    wait_for("the agent to exit", Duration::from_secs(120), || {
        child.try_wait().unwrap()
    })
    .code()
    .unwrap_or(-1)
}

struct Fixture {
    etcd: EtcdServer,
    relay: Relay,
    work: tempfile::TempDir,
    dest: PathBuf,
}

async fn fixture() -> Fixture {
    let etcd = EtcdServer::start();
    fill_incompressible(&mut etcd.client().await, FILL_MIB, 0x2545_F491_4F6C_DD1D).await;
    let relay = capped_relay(&etcd);
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("dest");
    Fixture {
        etcd,
        relay,
        work,
        dest,
    }
}

fn config(f: &Fixture, attempts: u32, delay: &str) -> PathBuf {
    let mut cfg = AgentConfig::for_endpoint(&f.relay.http_url(), None, &f.dest);
    cfg.retry_attempts = attempts;
    cfg.retry_initial_delay = delay.into();
    cfg.dial_timeout = "2s".into();
    cfg.write(f.work.path())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_mid_stream_and_gone_fails_after_every_attempt_and_leaves_nothing() {
    let mut f = fixture().await;
    let config = config(&f, 3, "1s");
    let log = f.work.path().join("agent.log");
    let mut child = spawn_backup(&config, &log);
    let t = Instant::now();
    let at = wait_for_growing_partial(&f.dest, &mut child, &log);
    f.etcd.kill();
    let code = wait_exit(&mut child);
    let stderr = std::fs::read_to_string(&log).unwrap();
    eprintln!("killed at {at} bytes; exit {code} after {:?}", t.elapsed());
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        stderr.matches("retrying with a fresh snapshot").count(),
        2,
        "three attempts in all:\n{stderr}"
    );
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line:\n{stderr}"));
    assert!(
        error.contains("at stage connect") || error.contains("at stage snapshot"),
        "{error}"
    );
    assert_eq!(files_below(&f.dest), Vec::<String>::new(), "{stderr}");
    let node = f.dest.join("test/master-0");
    let entries: Vec<_> = std::fs::read_dir(&node)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(entries.is_empty(), "{entries:?} left in {}", node.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_mid_stream_and_back_within_the_retry_window_gives_a_set_that_verifies_and_restores(
) {
    let mut f = fixture().await;
    let before = keyspace(&f.etcd).await;
    // Backoff 2 s then 4 s (jittered into [d/2, d]): etcd is back well
    // within the six attempts.
    let config = config(&f, 6, "2s");
    let log = f.work.path().join("agent.log");
    let mut child = spawn_backup(&config, &log);
    let at = wait_for_growing_partial(&f.dest, &mut child, &log);
    f.etcd.kill();
    f.etcd.restart();
    let code = wait_exit(&mut child);
    let stderr = std::fs::read_to_string(&log).unwrap();
    eprintln!("killed at {at} bytes, restarted; exit {code}");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("retrying with a fresh snapshot"),
        "the first attempt must have failed:\n{stderr}"
    );
    let sets = complete_sets(&f.dest);
    assert_eq!(sets.len(), 1, "{sets:?}");
    let set = f.dest.join(&sets[0]);
    let files = files_below(&set);
    assert_eq!(files.len(), 2, "snapshot and manifest only: {files:?}");
    assert!(files.iter().all(|f| !f.ends_with(".partial")), "{files:?}");
    let ts = sets[0].rsplit('/').next().unwrap();
    run_agent(&["verify", "--config", config.to_str().unwrap(), ts]).assert_code(0);
    let snapshot = set.join(format!("snapshot_{ts}.db"));
    let restored = restore_and_start(&snapshot, f.work.path());
    let after = keyspace(&restored).await;
    assert_eq!(after.len(), FILL_MIB * 16);
    assert!(after == before, "the restored keyspace differs");
}
