//! Restores that work, with the etcd `ETCD_VERSION` selects (scripts/test
//! runs this binary with 3.4.23 and with 3.5.16): a whole control plane
//! restored from one member's set with the agent's `restore` (the real
//! etcdutl/etcdctl underneath), exactly as docs/restore.md says, is one
//! healthy cluster with every key, value and the (bumped, on 3.5) revision;
//! the drill proves a set restores, bump included where the tool can; bad
//! inputs are refused.

use std::path::Path;

use etcd_backup_proto::Manifest;
use etcd_backup_tests::agent::{backup, run_agent, AgentConfig};
use etcd_backup_tests::etcd::{
    dump, write_history, EtcdCluster, EtcdServer, EtcdVersion, DEFAULT_BUMP_REVISION,
};
use etcd_backup_tests::{complete_sets, free_port};

fn manifest_of(dest: &Path) -> (String, Manifest) {
    let set = complete_sets(dest).pop().expect("a complete set");
    let m = serde_json::from_slice(&std::fs::read(dest.join(&set).join("manifest.json")).unwrap())
        .unwrap();
    (set, m)
}

/// docs/restore.md's "A whole control plane" steps: `restore` of the same
/// set (named, not `latest`) on each of three members, one name and peer URL
/// each, one shared `--initial-cluster` and token, then all three started.
#[tokio::test(flavor = "multi_thread")]
async fn a_whole_control_plane_restored_from_one_set_is_one_healthy_cluster_with_the_keyspace_and_the_bumped_revision(
) {
    let version = EtcdVersion::from_env();
    let work = tempfile::tempdir().unwrap();
    let source = EtcdCluster::start(EtcdCluster::plan(3, &work.path().join("source")));
    let mut client = source.client(0).await;
    write_history(&mut client, "/registry/pods/default", 500).await;
    client
        .put("/registry/big", vec![b'q'; 200_000], None)
        .await
        .unwrap();
    let before = dump(&mut client).await;
    let revision = client
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();

    // Back up from member 1 (a follower or the leader: either must do).
    let dest = work.path().join("backups");
    let cfg = AgentConfig::for_endpoint(&source.members[1].client_url(), None, &dest);
    let config = cfg.write(work.path());
    backup(&config).assert_code(0);
    let (set, m) = manifest_of(&dest);
    assert_eq!(m.etcd.live_keys, Some(before.len() as u64));
    assert_eq!(m.snapshot_status.unwrap().revision, revision);
    drop(source);

    // Restore three fresh members from that one set.
    let start = version.restored_revision(revision);
    let targets = EtcdCluster::plan(3, &work.path().join("restored"));
    let initial = EtcdCluster::initial_cluster(&targets);
    for t in &targets {
        let peer = t.peer_url();
        let mut args = vec![
            "restore",
            "--config",
            config.to_str().unwrap(),
            &set,
            "--data-dir",
            t.data_dir.to_str().unwrap(),
            "--name",
            &t.name,
            "--initial-cluster",
            &initial,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster-token",
            "restored-cluster",
        ];
        args.extend_from_slice(version.restore_args());
        let run = run_agent(&args);
        run.assert_code(0);
        assert!(
            run.stdout
                .contains(&format!("the member starts at revision {start} ")),
            "{}",
            run.stdout
        );
    }
    let restored = EtcdCluster::start(targets);
    let health = restored.etcdctl(&["endpoint", "health"]);
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    // One leader, the same for every member, and it is one of them.
    let statuses: Vec<_> = (0..3)
        .map(|i| {
            restored
                .status(i)
                .unwrap_or_else(|| panic!("member {i} answers"))
        })
        .collect();
    let leader = statuses[0].leader;
    assert!(
        statuses.iter().all(|s| s.leader == leader)
            && statuses.iter().filter(|s| s.member_id == leader).count() == 1,
        "{statuses:?}"
    );
    for i in 0..3 {
        let mut c = restored.client(i).await;
        let after = dump(&mut c).await;
        assert_eq!(after.len(), before.len(), "member {i}");
        assert!(after == before, "member {i} serves a different keyspace");
        let serializable = etcd_client::GetOptions::new().with_serializable();
        let rev = c
            .get("x", Some(serializable))
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        assert_eq!(rev, start, "member {i} revision (etcd {})", version.full());
    }
}

#[test]
fn drill_passes_for_a_good_set_with_the_bump_restore_takes_and_fails_when_the_data_differs() {
    let version = EtcdVersion::from_env();
    let etcd = EtcdServer::start();
    for i in 0..40 {
        assert!(etcd
            .etcdctl(&["put", &format!("/k/{i}"), "v"])
            .status
            .success());
    }
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let config = AgentConfig::new(&etcd, &dest).write(work.path());
    backup(&config).assert_code(0);
    let run = run_agent(&["drill", "--config", config.to_str().unwrap()]);
    run.assert_code(0);
    assert!(run.stdout.contains("40 keys"), "{}", run.stdout);
    assert!(run.stdout.contains("drill passed"), "{}", run.stdout);
    // The path restore takes: bumped with 3.5.16's etcdutl; 3.4.23's etcdctl
    // cannot, and the drill says so.
    let (_, m) = manifest_of(&dest);
    let snapshot_revision = m.snapshot_status.unwrap().revision;
    let said = match version {
        EtcdVersion::V3_5 => format!(
            "with etcdutl 3.5.16 into a throwaway member: revision {} (bumped by {DEFAULT_BUMP_REVISION}, below it compacted)",
            snapshot_revision + DEFAULT_BUMP_REVISION
        ),
        EtcdVersion::V3_4 => format!(
            "with etcdctl 3.4.23 into a throwaway member: revision {snapshot_revision} (not bumped: etcdctl 3.4.23 cannot"
        ),
    };
    assert!(run.stdout.contains(&said), "{said}\n{}", run.stdout);

    // A manifest (one without a snapshot status, which verify would compare
    // first) promising a newer revision: the member restored with the bump
    // is below it, and the drill says by how much it expected.
    let (set, mut m) = manifest_of(&dest);
    let good = m.clone();
    m.snapshot_status = None;
    m.etcd.revision = snapshot_revision + 5;
    std::fs::write(
        dest.join(&set).join("manifest.json"),
        serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();
    let run = run_agent(&["drill", "--config", config.to_str().unwrap(), "latest"]);
    run.assert_code(1);
    let bump = match version {
        EtcdVersion::V3_5 => format!(" + {DEFAULT_BUMP_REVISION} (the bump)"),
        EtcdVersion::V3_4 => String::new(),
    };
    let want = format!(
        "revision is {}, older than the manifest's {}{bump}",
        version.restored_revision(snapshot_revision),
        snapshot_revision + 5
    );
    assert!(run.stderr.contains(&want), "{want}\n{}", run.stderr);
    std::fs::write(
        dest.join(&set).join("manifest.json"),
        serde_json::to_vec(&good).unwrap(),
    )
    .unwrap();

    // A manifest that promises other data: the drill notices.
    let (set, mut m) = manifest_of(&dest);
    m.etcd.live_keys = Some(41);
    std::fs::write(
        dest.join(&set).join("manifest.json"),
        serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();
    let run = run_agent(&["drill", "--config", config.to_str().unwrap(), "latest"]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("40 keys, the manifest says 41"),
        "{}",
        run.stderr
    );
}

#[test]
fn restore_refuses_a_used_data_dir_and_a_damaged_snapshot() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let config = AgentConfig::new(&etcd, &dest).write(work.path());
    backup(&config).assert_code(0);
    let peer = format!("http://127.0.0.1:{}", free_port());
    let restore = |extra: &[&str], data_dir: &Path| {
        let mut args = vec![
            "restore",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--name",
            "r",
        ];
        let ic = format!("r={peer}");
        let owned = [
            "--initial-cluster".to_string(),
            ic,
            "--initial-advertise-peer-urls".to_string(),
            peer.clone(),
        ];
        args.extend(owned.iter().map(String::as_str));
        args.extend_from_slice(EtcdVersion::from_env().restore_args());
        args.extend_from_slice(extra);
        run_agent(&args)
    };
    let used = work.path().join("used");
    std::fs::create_dir_all(used.join("member")).unwrap();
    let run = restore(&[], &used);
    run.assert_code(2);
    assert!(run.stderr.contains("is not empty"), "{}", run.stderr);

    let (set, m) = manifest_of(&dest);
    let snap = dest.join(&set).join(&m.files[0].name);
    let damaged = work.path().join("damaged.db");
    let mut bytes = std::fs::read(&snap).unwrap();
    bytes[4096 + 100] ^= 1;
    std::fs::write(&damaged, bytes).unwrap();
    let fresh = work.path().join("fresh");
    let run = restore(&["--snapshot", damaged.to_str().unwrap()], &fresh);
    run.assert_code(1);
    assert!(run.stderr.contains("digest mismatch"), "{}", run.stderr);
    assert!(!fresh.exists(), "a refused restore created the data dir");

    // The good file restores.
    let run = restore(&["--snapshot", snap.to_str().unwrap()], &fresh);
    run.assert_code(0);
    assert!(fresh.join("member").is_dir());
}
