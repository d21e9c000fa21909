//! Retention on a real destination: `prune --dry-run` says what would go and
//! why, `prune` removes exactly that, stale leftovers go, fresh ones stay, the
//! newest set always stays, and a backup applies the policy after it succeeds.

use std::path::Path;
use std::time::Duration;

use etcd_backup_proto::{Manifest, SetTimestamp};
use etcd_backup_tests::agent::{backup, run_agent, AgentConfig};
use etcd_backup_tests::etcd::EtcdServer;
use etcd_backup_tests::{complete_sets, files_below};

/// Copies the real set at `src` (below `dest`) to a set with timestamp `ts`,
/// renaming its files and rewriting its manifest to match.
fn clone_set(dest: &Path, src: &str, ts: SetTimestamp) -> String {
    let src_dir = dest.join(src);
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(src_dir.join("manifest.json")).unwrap()).unwrap();
    let rel = format!("{}/{}/{ts}", m.cluster, m.node);
    let dir = dest.join(&rel);
    std::fs::create_dir_all(&dir).unwrap();
    let mut m2 = m.clone();
    m2.timestamp = ts;
    for f in &mut m2.files {
        let new_name = f.name.replace(&m.timestamp.to_string(), &ts.to_string());
        std::fs::copy(src_dir.join(&f.name), dir.join(&new_name)).unwrap();
        f.name = new_name;
    }
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&m2).unwrap(),
    )
    .unwrap();
    rel
}

fn ts_hours_ago(h: i64) -> SetTimestamp {
    SetTimestamp::new(chrono::Utc::now() - chrono::Duration::hours(h))
}

#[test]
fn prune_dry_run_then_prune_keeps_exactly_what_the_policy_says() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let mut cfg = AgentConfig::new(&etcd, &dest);
    let config = cfg.write(work.path());
    backup(&config).assert_code(0);
    let real = complete_sets(&dest).pop().unwrap();
    let mut made = Vec::new();
    for h in 1..=9 {
        made.push(clone_set(&dest, &real, ts_hours_ago(h * 3)));
    }
    assert_eq!(complete_sets(&dest).len(), 10);
    // Leftovers: one from a crash long ago, one that could still be running.
    let old = dest.join("test/master-0/2020-01-01_000000");
    std::fs::create_dir_all(&old).unwrap();
    let old_file = old.join("snapshot_2020-01-01_000000.db.partial");
    std::fs::write(&old_file, b"x").unwrap();
    // Written long ago, too: a leftover is stale only when both its set time
    // and its last write are older than stale_partial_after.
    let long_ago = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_577_836_800);
    std::fs::File::options()
        .write(true)
        .open(&old_file)
        .unwrap()
        .set_modified(long_ago)
        .unwrap();
    let fresh_ts = ts_hours_ago(0);
    let fresh = dest.join(format!("test/master-0/{fresh_ts}"));
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::write(fresh.join(format!("snapshot_{fresh_ts}.db.partial")), b"x").unwrap();

    cfg.extra = "retention:\n  keep_last: 3\n  stale_partial_after: 1h\n".into();
    let config = cfg.write(work.path());
    let before = files_below(&dest);
    let dry = run_agent(&["prune", "--config", config.to_str().unwrap(), "--dry-run"]);
    dry.assert_code(0);
    assert_eq!(files_below(&dest), before, "a dry run removed something");
    assert_eq!(
        dry.stdout.matches("would remove").count(),
        7 + 1,
        "{}",
        dry.stdout
    );
    assert!(dry.stdout.contains("keep_last (1 of 3)"), "{}", dry.stdout);
    assert!(
        dry.stdout.contains("not kept by any rule"),
        "{}",
        dry.stdout
    );
    assert!(dry.stdout.contains("2020-01-01_000000"), "{}", dry.stdout);

    let run = run_agent(&["prune", "--config", config.to_str().unwrap()]);
    run.assert_code(0);
    let left = complete_sets(&dest);
    let mut want = vec![real.clone(), made[0].clone(), made[1].clone()];
    want.sort();
    assert_eq!(left, want);
    assert!(!old.exists(), "the stale leftover stayed");
    assert!(
        fresh.exists(),
        "a leftover younger than stale_partial_after was removed"
    );
}

#[test]
fn the_newest_set_survives_any_policy() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let mut cfg = AgentConfig::new(&etcd, &dest);
    backup(&cfg.write(work.path())).assert_code(0);
    let real = complete_sets(&dest).pop().unwrap();
    // Move the only real set far into the past, then prune with max_age 1h.
    let old = clone_set(&dest, &real, ts_hours_ago(24 * 30));
    let _ = clone_set(&dest, &real, ts_hours_ago(24 * 31));
    std::fs::remove_dir_all(dest.join(&real)).unwrap();
    cfg.extra = "retention:\n  max_age: 1h\n".into();
    let run = run_agent(&[
        "prune",
        "--config",
        cfg.write(work.path()).to_str().unwrap(),
    ]);
    run.assert_code(0);
    assert_eq!(complete_sets(&dest), vec![old]);
    assert!(
        run.stdout.contains("newest set (never removed)"),
        "{}",
        run.stdout
    );
}

#[test]
fn a_successful_backup_applies_retention() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let mut cfg = AgentConfig::new(&etcd, &dest);
    cfg.extra = "retention:\n  keep_last: 2\n".into();
    let config = cfg.write(work.path());
    for _ in 0..3 {
        backup(&config).assert_code(0);
        std::thread::sleep(Duration::from_millis(1100));
    }
    assert_eq!(complete_sets(&dest).len(), 2, "{:?}", files_below(&dest));
}

#[test]
fn bad_retention_values_are_config_errors() {
    let work = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::for_endpoint("http://127.0.0.1:1", None, &work.path().join("b"));
    for (extra, field) in [
        ("retention:\n  max_age: soon\n", "retention.max_age"),
        (
            "retention:\n  stale_partial_after: 1s\n",
            "retention.stale_partial_after",
        ),
        ("retention:\n  keep_yearly: 3\n", "retention.keep_yearly"),
    ] {
        cfg.extra = extra.into();
        let run = run_agent(&[
            "check-config",
            "--config",
            cfg.write(work.path()).to_str().unwrap(),
        ]);
        assert_eq!(run.code, 2, "{extra}: {}", run.stderr);
        assert!(
            run.stderr.contains(&format!("  {field}: ")),
            "{extra}: {}",
            run.stderr
        );
    }
}
