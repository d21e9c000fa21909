//! What the agent may delete, on a real destination (a local directory and a
//! real OpenSSH server): after a successful backup and after `prune`, every
//! entry of a node's directory that the agent cannot prove is its own stays,
//! byte for byte, and is reported by `list --include-partial`, `prune` and
//! `etcd_backup_unrecognised_entries`; only its own stale `.partial` files go.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use etcd_backup_proto::api::{LeftoverKind, SetList};
use etcd_backup_proto::{Manifest, SetTimestamp};
use etcd_backup_tests::agent::{backup, run_agent, AgentConfig, AgentDaemon};
use etcd_backup_tests::etcd::EtcdServer;
use etcd_backup_tests::fixtures::kubeadm_tree;
use etcd_backup_tests::sftp_setup::sshd_destination_yaml;
use etcd_backup_tests::sshd::{ClientKey, KeyKind, SshOptions, SshServer};
use etcd_backup_tests::{complete_sets, metric, wait_for_async};

/// 2020-01-01: older than any `stale_partial_after`.
fn long_ago() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_577_836_800)
}

/// Sets the modification time of every file below `dir` (links untouched).
fn age_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        if meta.is_dir() {
            age_files(&e.path());
        } else if meta.is_file() {
            std::fs::File::options()
                .write(true)
                .open(e.path())
                .unwrap()
                .set_modified(long_ago())
                .unwrap();
        }
    }
}

/// Everything below `dir` without following links: file contents, and
/// `-> target` for a link.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                out.insert(rel, format!("-> {}", target.display()).into_bytes());
            } else if meta.is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                walk(base, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Copies the real set `src` to `<node_dir>/<ts>` with its files renamed;
/// `edit` changes the manifest (as JSON) before it is written.
fn copy_set(src: &Path, node_dir: &Path, ts: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(src.join("manifest.json")).unwrap()).unwrap();
    let dir = node_dir.join(ts);
    std::fs::create_dir_all(&dir).unwrap();
    let mut m2 = m.clone();
    m2.timestamp = ts.parse().unwrap();
    for f in &mut m2.files {
        let name = f.name.replace(&m.timestamp.to_string(), ts);
        std::fs::copy(src.join(&f.name), dir.join(&name)).unwrap();
        f.name = name;
    }
    let mut v = serde_json::to_value(&m2).unwrap();
    edit(&mut v);
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&v).unwrap()).unwrap();
}

/// The entries planted in a node's directory, and what `list` must say of each.
struct Planted {
    /// Entry name in the node directory, the kind and a phrase of its `why`.
    entries: Vec<(&'static str, LeftoverKind, &'static str)>,
    /// The agent's own stale leftover, which must go.
    own_stale: &'static str,
    /// A directory outside the destination that a planted link points to.
    outside: PathBuf,
}

/// Plants every case the agent must leave alone in `node_dir`, beside the
/// real set `real`, all written long ago.
fn plant(node_dir: &Path, real: &Path, outside: &Path) -> Planted {
    let snap = |ts: &str| format!("snapshot_{ts}.db");
    let tar = |ts: &str| format!("static_kuberesources_{ts}.tar.gz");
    let real_files: Vec<PathBuf> = std::fs::read_dir(real)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let real_snapshot = real_files
        .iter()
        .find(|p| p.to_string_lossy().ends_with(".db"))
        .unwrap();
    let real_tar = real_files
        .iter()
        .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
        .unwrap();

    // A set written by a newer agent (a downgrade must not touch it).
    copy_set(real, node_dir, "2020-01-01_000000", |v| {
        v["format_version"] = 99.into();
    });
    // An intact snapshot whose tarball is missing.
    copy_set(real, node_dir, "2020-01-02_000000", |_| {});
    std::fs::remove_file(
        node_dir
            .join("2020-01-02_000000")
            .join(tar("2020-01-02_000000")),
    )
    .unwrap();
    // An operator's own copy.
    let manual = node_dir.join("pre-upgrade-manual-copy");
    std::fs::create_dir_all(&manual).unwrap();
    std::fs::copy(real_snapshot, manual.join("snapshot.db")).unwrap();
    // A manifest that is not JSON.
    copy_set(real, node_dir, "2020-01-03_000000", |_| {});
    std::fs::write(
        node_dir.join("2020-01-03_000000/manifest.json"),
        b"{ not json",
    )
    .unwrap();
    // cluster-backup.sh's own layout: snapshot and tarball, no manifest.
    let cbs = node_dir.join("2020-01-04_000000");
    std::fs::create_dir_all(&cbs).unwrap();
    std::fs::copy(real_snapshot, cbs.join(snap("2020-01-04_000000"))).unwrap();
    std::fs::copy(real_tar, cbs.join(tar("2020-01-04_000000"))).unwrap();
    // A link named like a set, to a directory outside holding what would
    // pass for the agent's own partial.
    std::fs::create_dir_all(outside).unwrap();
    std::fs::write(outside.join("snapshot_2020-01-05_000000.db.partial"), b"x").unwrap();
    std::os::unix::fs::symlink(outside, node_dir.join("2020-01-05_000000")).unwrap();
    // The agent's partial beside a name it never writes.
    let mixed = node_dir.join("2020-01-07_000000");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::write(mixed.join("snapshot_2020-01-07_000000.db.partial"), b"x").unwrap();
    std::fs::write(mixed.join("notes.txt"), b"keep me").unwrap();
    // The one thing that may go: a crashed run's own partial.
    let own = node_dir.join("2020-01-06_000000");
    std::fs::create_dir_all(&own).unwrap();
    std::fs::write(own.join("snapshot_2020-01-06_000000.db.partial"), b"x").unwrap();
    age_files(node_dir);
    age_files(outside);
    Planted {
        entries: vec![
            (
                "2020-01-01_000000",
                LeftoverKind::NewerFormat,
                "format_version 99 is newer",
            ),
            (
                "2020-01-02_000000",
                LeftoverKind::Unrecognised,
                "is in the manifest but not in the set",
            ),
            (
                "pre-upgrade-manual-copy",
                LeftoverKind::Unrecognised,
                "not a set timestamp",
            ),
            (
                "2020-01-03_000000",
                LeftoverKind::Unrecognised,
                "manifest.json is not valid",
            ),
            (
                "2020-01-04_000000",
                LeftoverKind::Unrecognised,
                "cluster-backup.sh",
            ),
            (
                "2020-01-05_000000",
                LeftoverKind::Unrecognised,
                "neither a directory nor a regular file",
            ),
            ("2020-01-07_000000", LeftoverKind::Unrecognised, "notes.txt"),
        ],
        own_stale: "2020-01-06_000000",
        outside: outside.to_path_buf(),
    }
}

/// The planted part of `tree(node_dir)`: every path below a planted entry.
fn planted_tree(node_dir: &Path, p: &Planted) -> BTreeMap<String, Vec<u8>> {
    let mut t: BTreeMap<String, Vec<u8>> = tree(node_dir)
        .into_iter()
        .filter(|(k, _)| p.entries.iter().any(|(e, _, _)| k.starts_with(e)))
        .collect();
    for (k, v) in tree(&p.outside) {
        t.insert(format!("outside/{k}"), v);
    }
    t
}

/// The sets below `base` with a manifest, other than the planted ones.
fn real_sets(base: &Path) -> Vec<String> {
    complete_sets(base)
        .into_iter()
        .filter(|s| !s.contains("/2020-01-"))
        .collect()
}

fn list(config: &Path) -> SetList {
    let run = run_agent(&[
        "list",
        "--config",
        config.to_str().unwrap(),
        "--include-partial",
        "-o",
        "json",
    ]);
    run.assert_code(0);
    serde_json::from_str(&run.stdout).unwrap()
}

/// Every planted entry is listed with its kind and reason; the own stale
/// leftover is gone.
fn assert_reported(list: &SetList, p: &Planted) {
    for (name, kind, why) in &p.entries {
        let found = list
            .leftovers
            .iter()
            .find(|l| l.dir == format!("test/master-0/{name}"))
            .unwrap_or_else(|| panic!("{name} not listed: {list:#?}"));
        assert_eq!(found.kind, *kind, "{found:?}");
        assert!(found.why.contains(why), "{name}: {found:?}");
    }
    assert!(
        !list.leftovers.iter().any(|l| l.dir.ends_with(p.own_stale)),
        "{list:#?}"
    );
}

/// The whole sequence on one destination whose node directory is `node_dir`
/// on this machine: backup, plant, backup (retention applies), list, prune.
fn leaves_alone_what_is_not_its_own(mut cfg: AgentConfig, work: &Path, node_dir: &Path) {
    let root = work.join("etc-kubernetes");
    std::fs::create_dir_all(&root).unwrap();
    kubeadm_tree(&root);
    cfg.layout = "kubeadm".into();
    cfg.root = Some(root);
    cfg.extra = "retention:\n  keep_last: 1\n  stale_partial_after: 1h\n".into();
    let config = cfg.write(work);
    backup(&config).assert_code(0);
    let base = node_dir.parent().unwrap().parent().unwrap();
    let first = real_sets(base);
    assert_eq!(first.len(), 1);
    let planted = plant(node_dir, &base.join(&first[0]), &work.join("outside"));
    let before = planted_tree(node_dir, &planted);
    assert!(before.len() > 12, "{before:?}");

    // A successful backup applies retention and removes stale leftovers.
    std::thread::sleep(Duration::from_millis(1100));
    backup(&config).assert_code(0);
    assert_eq!(
        planted_tree(node_dir, &planted),
        before,
        "backup touched them"
    );
    assert!(
        !node_dir.join(planted.own_stale).exists(),
        "the agent's own stale partial stayed"
    );
    let sets = real_sets(base);
    assert_eq!(
        sets.len(),
        1,
        "keep_last: 1 removes the older real set: {sets:?}"
    );
    assert_ne!(sets, first);
    assert_reported(&list(&config), &planted);

    for dry in [true, false] {
        let mut args = vec!["prune", "--config", config.to_str().unwrap()];
        if dry {
            args.push("--dry-run");
        }
        let run = run_agent(&args);
        run.assert_code(0);
        assert_eq!(
            planted_tree(node_dir, &planted),
            before,
            "prune touched them"
        );
        for (name, _, _) in &planted.entries {
            assert!(
                run.stdout
                    .contains(&format!("leave alone  test/master-0/{name}")),
                "{name}: {}",
                run.stdout
            );
        }
        assert!(
            run.stdout
                .contains("keep         test/master-0/2020-01-01_000000  (not fully understood"),
            "{}",
            run.stdout
        );
    }
    assert_eq!(real_sets(base), sets);
}

#[tokio::test(flavor = "multi_thread")]
async fn local_cleanup_and_prune_leave_alone_what_the_agent_did_not_write() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let cfg = AgentConfig::new(&etcd, &dest);
    let (w, d) = (work.path().to_path_buf(), dest.clone());
    tokio::task::spawn_blocking(move || {
        leaves_alone_what_is_not_its_own(cfg, &w, &d.join("test/master-0"))
    })
    .await
    .unwrap();

    // The daemon counts them: the 7 entries, the newer-format set among them.
    let mut daemon_cfg = AgentConfig::new(&etcd, &dest);
    daemon_cfg.extra = "schedule: \"0 * * * *\"\nrun_on_start: never\n".into();
    let daemon = AgentDaemon::start_on_free_port(&daemon_cfg);
    let url = daemon.url("/metrics");
    let count = wait_for_async(
        "etcd_backup_unrecognised_entries{destination=\"default\"}",
        Duration::from_secs(20),
        || {
            let url = url.clone();
            async move {
                let text = reqwest::get(url).await.ok()?.text().await.ok()?;
                let n = metric(
                    &text,
                    "etcd_backup_unrecognised_entries{destination=\"default\"}",
                );
                (n > 0.0).then_some(n)
            }
        },
    )
    .await;
    assert_eq!(count, 7.0);
}

#[test]
fn sftp_cleanup_and_prune_leave_alone_what_the_agent_did_not_write() {
    let etcd = EtcdServer::start();
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        ..SshOptions::default()
    });
    let work = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::new(&etcd, &work.path().join("unused-local"));
    let base = sshd.sftp_root.join("backups");
    cfg.destination_yaml = Some(sshd_destination_yaml(&sshd, &key, &base));
    leaves_alone_what_is_not_its_own(cfg, work.path(), &base.join("test/master-0"));
}

#[test]
fn newer_format_sets_count_as_sets_for_retention() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let mut cfg = AgentConfig::new(&etcd, &dest);
    backup(&cfg.write(work.path())).assert_code(0);
    let real = dest.join(complete_sets(&dest).pop().unwrap());
    let node_dir = dest.join("test/master-0");
    let hours_ago =
        |h| SetTimestamp::new(chrono::Utc::now() - chrono::Duration::hours(h)).to_string();
    let (newer, mid, old) = (hours_ago(1), hours_ago(2), hours_ago(3));
    copy_set(&real, &node_dir, &newer, |v| {
        v["format_version"] = 99.into()
    });
    copy_set(&real, &node_dir, &mid, |_| {});
    copy_set(&real, &node_dir, &old, |_| {});
    std::fs::remove_dir_all(&real).unwrap();

    // keep_last: 2 over the real history: the newer-format set (the newest,
    // never removed) and the 2-hour-old one; the agent does not keep two of
    // the sets it reads as if the newer one did not exist.
    cfg.extra = "retention:\n  keep_last: 2\n".into();
    let run = run_agent(&[
        "prune",
        "--config",
        cfg.write(work.path()).to_str().unwrap(),
    ]);
    run.assert_code(0);
    assert!(
        run.stdout.contains(&format!(
            "keep         test/master-0/{newer}  (not fully understood by this agent, never removed (see list --include-partial), newest set (never removed), keep_last (1 of 2))"
        )),
        "{}",
        run.stdout
    );
    let mut left = complete_sets(&dest);
    left.sort();
    let mut want = vec![
        format!("test/master-0/{mid}"),
        format!("test/master-0/{newer}"),
    ];
    want.sort();
    assert_eq!(left, want, "{}", run.stdout);
}
