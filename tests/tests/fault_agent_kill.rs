//! Fault matrix, agent-killed row: `etcd-backup-agent backup` SIGKILLed while
//! the snapshot uploads (to a local directory and to a real OpenSSH server),
//! so no clean-up runs. What it leaves is this agent's own leftover, and the
//! documented rules (docs/stored-sets.md, "What the agent may delete") apply to it:
//!
//! - right away: `list --include-partial` shows it as `own_partial`;
//!   `prune --dry-run` plans nothing (younger than `stale_partial_after`, it
//!   may belong to a run still writing); the next backup succeeds beside it
//!   and leaves it byte for byte;
//! - once its timestamp and last write are older than `stale_partial_after`
//!   (1m, the smallest allowed): `prune --dry-run` plans to remove it and
//!   nothing else, and removes nothing; the next backup succeeds and its
//!   clean-up removes the leftover, and only it.
//!
//! The etcd stream goes through a relay capped at 2 MiB/s, so with 8 MiB in
//! etcd the upload lasts seconds and the kill lands mid-upload.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use etcd_backup_proto::api::{LeftoverKind, SetList};
use etcd_backup_tests::agent::{backup, run_agent, spawn_backup, AgentConfig};
use etcd_backup_tests::etcd::{fill_incompressible, EtcdServer};
use etcd_backup_tests::relay::{Relay, RelayOptions, Shape};
use etcd_backup_tests::sftp_setup::sshd_destination_yaml;
use etcd_backup_tests::sshd::{ClientKey, KeyKind, SshOptions, SshServer};
use etcd_backup_tests::{complete_sets, files_below, wait_for};

const FILL_MIB: usize = 8;
const RATE: u64 = 2 << 20;
const STALE: Duration = Duration::from_secs(60);

/// A file's name and bytes.
type Contents = Vec<(String, Vec<u8>)>;

/// One destination under test.
struct Case {
    name: &'static str,
    /// The destination's base as a path on this machine.
    base: PathBuf,
    config: PathBuf,
    /// Set once the agent was killed: the leftover's set timestamp, its
    /// files' contents, and when it was killed.
    leftover: Option<(String, Contents, Instant)>,
}

impl Case {
    fn node_dir(&self) -> PathBuf {
        self.base.join("test/master-0")
    }

    fn config_arg(&self) -> &str {
        self.config.to_str().unwrap()
    }

    fn leftover_files(&self) -> Contents {
        let (ts, _, _) = self.leftover.as_ref().unwrap();
        let dir = self.node_dir().join(ts);
        files_below(&dir)
            .into_iter()
            .map(|f| {
                let bytes = std::fs::read(dir.join(&f)).unwrap();
                (f, bytes)
            })
            .collect()
    }

    fn list(&self) -> SetList {
        let run = run_agent(&[
            "list",
            "--config",
            self.config_arg(),
            "--include-partial",
            "-o",
            "json",
        ]);
        run.assert_code(0);
        serde_json::from_str(&run.stdout).unwrap()
    }

    fn dry_run(&self) -> String {
        let run = run_agent(&["prune", "--config", self.config_arg(), "--dry-run"]);
        run.assert_code(0);
        run.stdout
    }
}

/// Runs `backup` and SIGKILLs it once the partial snapshot is growing.
fn kill_mid_upload(case: &mut Case, work: &Path) {
    let log = work.join(format!("{}-killed.log", case.name));
    let mut child = spawn_backup(&case.config, &log);
    let base = case.base.clone();
    let partial = || {
        files_below(&base)
            .into_iter()
            .find(|f| f.ends_with(".db.partial"))
            .map(|f| {
                (
                    std::fs::metadata(base.join(&f))
                        .map(|m| m.len())
                        .unwrap_or(0),
                    f,
                )
            })
    };
    wait_for(
        "a growing partial snapshot",
        Duration::from_secs(60),
        || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "{}: the agent exited ({status}) before the upload was under way:\n{}",
                    case.name,
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let (first, _) = partial()?;
            std::thread::sleep(Duration::from_millis(100));
            let (second, _) = partial()?;
            (first > 0 && second > first).then_some(())
        },
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    // The server finishes what it received: let the size settle.
    std::thread::sleep(Duration::from_millis(300));
    let (size, file) = partial().expect("the partial snapshot is left");
    assert!(size > 0, "{}", case.name);
    let ts = file.split('/').nth(2).unwrap().to_string();
    // Exactly one file: the snapshot's partial, in its set directory.
    assert_eq!(
        files_below(&case.node_dir()),
        vec![format!("{ts}/snapshot_{ts}.db.partial")],
        "{}",
        case.name
    );
    case.leftover = Some((ts, Vec::new(), killed));
    let files = case.leftover_files();
    case.leftover.as_mut().unwrap().1 = files;
}

/// While young: listed as own partial, not planned for removal, kept by the
/// next backup.
fn young_phase(case: &Case) {
    let (ts, files, _) = case.leftover.as_ref().unwrap();
    let list = case.list();
    assert!(list.sets.is_empty(), "{}: {list:?}", case.name);
    assert_eq!(list.leftovers.len(), 1, "{}: {list:?}", case.name);
    let l = &list.leftovers[0];
    assert!(l.dir.ends_with(ts.as_str()), "{}: {l:?}", case.name);
    assert_eq!(l.kind, LeftoverKind::OwnPartial, "{}: {l:?}", case.name);
    assert_eq!(
        l.files,
        vec![format!("snapshot_{ts}.db.partial")],
        "{}",
        case.name
    );

    let plan = case.dry_run();
    assert!(
        !plan.contains("would remove "),
        "{}: a young leftover is never planned for removal:\n{plan}",
        case.name
    );
    assert!(
        plan.contains("0 leftover(s) would be removed"),
        "{}: {plan}",
        case.name
    );
    assert_eq!(
        &case.leftover_files(),
        files,
        "{}: dry run touched it",
        case.name
    );

    backup(&case.config).assert_code(0);
    assert_eq!(complete_sets(&case.base).len(), 1, "{}", case.name);
    assert_eq!(
        &case.leftover_files(),
        files,
        "{}: the young leftover stays",
        case.name
    );
}

/// Once stale: planned for removal alone, then removed by the next backup.
fn stale_phase(case: &Case) {
    let (ts, files, _) = case.leftover.as_ref().unwrap();
    let sets_before = complete_sets(&case.base);
    let plan = case.dry_run();
    let planned: Vec<&str> = plan
        .lines()
        .filter(|l| l.starts_with("would remove"))
        .collect();
    assert_eq!(planned.len(), 1, "{}: {plan}", case.name);
    assert!(
        planned[0].contains(&format!("test/master-0/{ts}"))
            && planned[0].contains("leftover older than stale_partial_after"),
        "{}: {plan}",
        case.name
    );
    assert_eq!(
        &case.leftover_files(),
        files,
        "{}: dry run removed it",
        case.name
    );

    backup(&case.config).assert_code(0);
    let sets = complete_sets(&case.base);
    assert_eq!(sets.len(), 2, "{}: {sets:?}", case.name);
    assert!(
        sets_before.iter().all(|s| sets.contains(s)),
        "{}",
        case.name
    );
    assert!(
        !case.node_dir().join(ts).exists(),
        "{}: the stale leftover is removed: {:?}",
        case.name,
        files_below(&case.node_dir())
    );
    for s in &sets {
        assert_eq!(
            files_below(&case.base.join(s)).len(),
            2,
            "{}: {s}",
            case.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_upload_leaves_its_own_partial_which_is_kept_while_young_and_removed_once_stale(
) {
    let etcd = EtcdServer::start();
    fill_incompressible(&mut etcd.client().await, FILL_MIB, 0x9E37_79B9_7F4A_7C15).await;
    let target: SocketAddr = etcd
        .client_url
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let relay = Relay::start(
        target,
        RelayOptions {
            up: Shape::default(),
            down: Shape {
                rate: Some(RATE),
                delay: Duration::ZERO,
            },
        },
    );
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        ..SshOptions::default()
    });
    let work = tempfile::tempdir().unwrap();
    let config = |name: &str, base: &Path, destination_yaml: Option<String>| {
        let mut cfg = AgentConfig::for_endpoint(&relay.http_url(), None, base);
        cfg.destination_yaml = destination_yaml;
        cfg.extra = "retention:\n  stale_partial_after: 1m\n".into();
        let dir = work.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        cfg.write(&dir)
    };
    let local_base = work.path().join("dest");
    let sftp_base = sshd.sftp_root.join("backups");
    let sftp_yaml = sshd_destination_yaml(&sshd, &key, &sftp_base);
    let mut cases = [
        Case {
            name: "local",
            config: config("local", &local_base, None),
            base: local_base,
            leftover: None,
        },
        Case {
            name: "sftp",
            config: config("sftp", &sftp_base, Some(sftp_yaml)),
            base: sftp_base,
            leftover: None,
        },
    ];
    tokio::task::block_in_place(|| {
        for case in &mut cases {
            kill_mid_upload(case, work.path());
            young_phase(case);
        }
        // Both the set timestamp (before the kill) and the last write (the
        // kill) must be older than stale_partial_after.
        let killed = cases
            .iter()
            .map(|c| c.leftover.as_ref().unwrap().2)
            .max()
            .unwrap();
        let wait = (STALE + Duration::from_secs(3)).saturating_sub(killed.elapsed());
        eprintln!("waiting {wait:?} for the leftovers to turn stale");
        std::thread::sleep(wait);
        for case in &cases {
            stale_phase(case);
        }
    });
}
