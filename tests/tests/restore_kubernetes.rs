//! Restores that Kubernetes survives, each test on the etcd it names
//! (whatever `ETCD_VERSION` says): with etcd 3.5.16's etcdutl, `restore`
//! bumps the revision and marks everything below it compacted, so no client
//! of the old cluster sees time run backwards; with Debian 12's etcdctl
//! 3.4.23, too old for that, `restore` refuses before touching anything.

use std::path::Path;
use std::time::Duration;

use etcd_backup_proto::Manifest;
use etcd_backup_tests::agent::{backup, run_agent_with_etcd, AgentConfig};
use etcd_backup_tests::etcd::{
    dump, write_history, EtcdServer, EtcdVersion, DEFAULT_BUMP_REVISION,
};
use etcd_backup_tests::{complete_sets, files_below, free_port};
use etcd_client::WatchOptions;

fn manifest_of(dest: &Path) -> (String, Manifest) {
    let set = complete_sets(dest).pop().expect("a complete set");
    let m = serde_json::from_slice(&std::fs::read(dest.join(&set).join("manifest.json")).unwrap())
        .unwrap();
    (set, m)
}

/// `restore` of `source` (a set name, or `--snapshot FILE`) into `data_dir`
/// as the single member `r` on `peer_port`, with etcd `version`'s tools.
fn restore(
    version: EtcdVersion,
    config: &Path,
    source: &[&str],
    data_dir: &Path,
    peer_port: u16,
    extra: &[&str],
) -> etcd_backup_tests::agent::AgentRun {
    let peer = format!("http://127.0.0.1:{peer_port}");
    let cluster = format!("r={peer}");
    let mut args = vec!["restore", "--config", config.to_str().unwrap()];
    args.extend_from_slice(source);
    args.extend_from_slice(&[
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--name",
        "r",
        "--initial-cluster",
        &cluster,
        "--initial-advertise-peer-urls",
        &peer,
    ]);
    args.extend_from_slice(extra);
    run_agent_with_etcd(version, &args)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_on_etcd_3_5_starts_a_billion_revisions_up_with_old_revisions_compacted_and_the_keyspace_whole(
) {
    let v = EtcdVersion::V3_5;
    let etcd = EtcdServer::start_version(v);
    let mut client = etcd.client().await;
    write_history(&mut client, "/registry/configmaps/default", 300).await;
    let before = dump(&mut client).await;
    let revision = client
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let config = AgentConfig::new(&etcd, &dest).write(work.path());
    backup(&config).assert_code(0);
    let (set, m) = manifest_of(&dest);
    assert_eq!(m.snapshot_status.unwrap().revision, revision);
    drop(etcd);

    // The default: --bump-revision 1000000000 --mark-compacted.
    let bumped = revision + DEFAULT_BUMP_REVISION;
    let data_dir = work.path().join("restored");
    let peer_port = free_port();
    let run = restore(v, &config, &[&set], &data_dir, peer_port, &[]);
    run.assert_code(0);
    assert!(
        run.stdout.contains(&format!(
            "with etcdutl 3.5.16; the member starts at revision {bumped} (the snapshot's {revision} + {DEFAULT_BUMP_REVISION}, everything below marked compacted)"
        )),
        "{}",
        run.stdout
    );
    let member = EtcdServer::start_version_on(v, data_dir, "r", peer_port);
    let mut c = member.client().await;
    let header_revision = |r: &etcd_client::GetResponse| r.header().unwrap().revision();
    assert_eq!(header_revision(&c.get("x", None).await.unwrap()), bumped);
    assert!(
        dump(&mut c).await == before,
        "the restored keyspace differs"
    );

    // A watch from a revision the old cluster had is told it was compacted
    // (ErrCompacted), at the bumped revision.
    let mut watch = c
        .watch(
            "/registry/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision - 10),
            ),
        )
        .await
        .unwrap();
    let cancelled = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let resp = watch.message().await.unwrap().expect("a watch response");
            assert!(resp.events().is_empty(), "events from before the restore");
            if resp.canceled() {
                return resp;
            }
        }
    })
    .await
    .expect("the watch is cancelled as compacted within 10 s");
    assert_eq!(cancelled.compact_revision(), bumped);
    // A read at an old revision: the same ErrCompacted.
    let err = c
        .get(
            "x",
            Some(etcd_client::GetOptions::new().with_revision(revision)),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("required revision has been compacted"),
        "{err}"
    );

    // A new write lands above the bumped revision.
    let put = c.put("/registry/new", "after", None).await.unwrap();
    assert_eq!(put.header().unwrap().revision(), bumped + 1);
    drop(member);

    // --bump-revision N sets it; a local --snapshot file is read for its revision.
    let snapshot = dest.join(&set).join(&m.files[0].name);
    let data_dir = work.path().join("restored-small-bump");
    let peer_port = free_port();
    let run = restore(
        v,
        &config,
        &["--snapshot", snapshot.to_str().unwrap()],
        &data_dir,
        peer_port,
        &["--bump-revision", "4242"],
    );
    run.assert_code(0);
    let small = revision + 4242;
    assert!(
        run.stdout.contains(&format!(
            "the member starts at revision {small} (the snapshot's {revision} + 4242,"
        )),
        "{}",
        run.stdout
    );
    let member = EtcdServer::start_version_on(v, data_dir, "r", peer_port);
    let mut c = member.client().await;
    assert_eq!(header_revision(&c.get("x", None).await.unwrap()), small);
    assert!(dump(&mut c).await == before);
}

#[test]
fn restore_with_etcdctl_3_4_23_refuses_to_bump_with_exit_2_and_touches_nothing() {
    let v = EtcdVersion::V3_4;
    let etcd = EtcdServer::start_version(v);
    assert!(etcd.etcdctl(&["put", "/k", "v"]).status.success());
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let config = AgentConfig::new(&etcd, &dest).write(work.path());
    backup(&config).assert_code(0);
    let (set, m) = manifest_of(&dest);
    let stored_before = files_below(&dest);

    // The data dir's parent does not exist either: restore would create it
    // to fetch the set beside it.
    let parent = work.path().join("new");
    let data_dir = parent.join("data");
    let run = restore(v, &config, &["latest"], &data_dir, free_port(), &[]);
    run.assert_code(2);
    for said in [
        "etcdctl 3.4.23",
        "etcdctl 3.4.27 or later",
        "--no-bump-revision",
    ] {
        assert!(run.stderr.contains(said), "{said}: {}", run.stderr);
    }
    assert!(
        !parent.exists(),
        "a refused restore created {}",
        parent.display()
    );
    assert_eq!(files_below(&dest), stored_before);
    // An explicit N is refused alike.
    let run = restore(
        v,
        &config,
        &["latest"],
        &data_dir,
        free_port(),
        &["--bump-revision", "10"],
    );
    run.assert_code(2);
    assert!(!parent.exists());

    // --no-bump-revision restores at the snapshot's own revision, and says so.
    let revision = m.snapshot_status.unwrap().revision;
    let peer_port = free_port();
    let run = restore(
        v,
        &config,
        &[&set],
        &data_dir,
        peer_port,
        &["--no-bump-revision"],
    );
    run.assert_code(0);
    assert!(
        run.stdout.contains(&format!(
            "the member starts at revision {revision} (the snapshot's own, not bumped (--no-bump-revision))"
        )),
        "{}",
        run.stdout
    );
    let member = EtcdServer::start_version_on(v, data_dir, "r", peer_port);
    let out = member.etcdctl(&["get", "/k", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["header"]["revision"].as_i64(), Some(revision));
}
