//! Backups to S3 on a real three-node Garage cluster (`replication_factor =
//! 3`): the whole life of a set (backup, list, verify, fetch, restore with the
//! real etcdctl, drill, retention and prune), a Garage node killed mid-upload
//! (quorum holds) and two (the run fails at `upload`, and prune leaves
//! nothing of it), credentials and buckets that are wrong, and two agents
//! racing for one set name. The bucket is always looked at with rclone, never
//! with the agent's own S3 client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_backup_proto::api::SetList;
use etcd_backup_proto::FileKind;
use etcd_backup_tests::agent::{
    agent_bin, backup, finish_backup, run_agent, AgentConfig, AgentRun,
};
use etcd_backup_tests::assert_cluster_restore_dir;
use etcd_backup_tests::etcd::{
    dump, slow_etcd, snapshot_status, write_history, EtcdCluster, EtcdServer, EtcdVersion,
};
use etcd_backup_tests::fixtures::{openshift_tree, tar_gz_entries};
use etcd_backup_tests::garage::{GarageCluster, Rclone};
use etcd_backup_tests::relay::Relay;
use etcd_backup_tests::s3_setup::{
    assert_stored_as_manifest_says, complete_sets_in, s3_config, s3_destination_yaml,
    stored_manifest, wait_mid_upload,
};

/// The key prefix every test stores under.
const PREFIX: &str = "backups";

/// The objects below `PREFIX` by rclone, relative to it.
fn objects(rclone: &Rclone, bucket: &str) -> Vec<String> {
    rclone.list(bucket, PREFIX)
}

fn list_json(config: &Path, extra: &[&str]) -> SetList {
    let mut args = vec!["list", "--config", config.to_str().unwrap(), "-o", "json"];
    args.extend_from_slice(extra);
    let run = run_agent(&args);
    run.assert_code(0);
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("list -o json printed no set list ({e}): {}", run.stdout))
}

fn agent(config: &Path, args: &[&str]) -> AgentRun {
    let mut all = vec![args[0], "--config", config.to_str().unwrap()];
    all.extend_from_slice(&args[1..]);
    run_agent(&all)
}

/// Neither the agent's output nor its logs carry `secret`.
fn assert_secret_not_shown(run: &AgentRun, secret: &str) {
    assert!(
        !run.stdout.contains(secret) && !run.stderr.contains(secret),
        "the secret key was printed:\nstdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_set_on_garage_lists_verifies_fetches_restores_drills_and_is_pruned_by_retention() {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    write_history(&mut client, "/registry/configmaps/openshift-etcd", 400).await;
    let before = dump(&mut client).await;
    let revision = client
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let garage = GarageCluster::start(3);
    let rclone = garage.rclone();
    let bucket = garage.bucket.clone();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("etc-kubernetes");
    std::fs::create_dir_all(&root).unwrap();
    let mut expected_tar = openshift_tree(&root);
    expected_tar.sort();
    let mut cfg = s3_config(&etcd, &garage, PREFIX);
    cfg.layout = "openshift".into();
    cfg.root = Some(root);
    let config = cfg.write(work.path());

    let run = backup(&config);
    run.assert_code(0);
    assert_secret_not_shown(&run, garage.secret());

    // In the bucket: <prefix>/<cluster>/<node>/<ts>/<file>, nothing else, no
    // multipart upload left open.
    let stored = objects(&rclone, &bucket);
    let sets = complete_sets_in(&stored);
    assert_eq!(sets.len(), 1, "{stored:?}");
    let set = &sets[0];
    let m = stored_manifest(&rclone, &bucket, PREFIX, set);
    let ts = m.timestamp;
    assert_eq!(*set, format!("test/master-0/{ts}"));
    let mut want = vec![
        format!("{set}/manifest.json"),
        format!("{set}/{}", ts.snapshot_file_name()),
        format!("{set}/{}", ts.resources_file_name()),
    ];
    want.sort();
    assert_eq!(stored, want);
    let files = assert_stored_as_manifest_says(&rclone, &bucket, PREFIX, set, &m);
    assert!(
        rclone.multipart_uploads(&bucket).is_empty(),
        "multipart uploads left open: {:?}",
        rclone.multipart_uploads(&bucket)
    );

    // list
    let snap = m.file(FileKind::Snapshot).unwrap();
    let list = list_json(&config, &[]);
    assert_eq!(list.sets.len(), 1, "{list:?}");
    assert_eq!(list.sets[0].node, "master-0");
    assert_eq!(list.sets[0].set, *set);
    assert_eq!(list.sets[0].timestamp, ts);
    assert_eq!(list.sets[0].snapshot_bytes, snap.size);
    assert!(list.leftovers.is_empty(), "{list:?}");

    // verify: intact, then a changed byte in the stored snapshot (put back
    // by rclone) is caught and named.
    let ok = agent(&config, &["verify", "latest"]);
    ok.assert_code(0);
    assert!(ok.stdout.contains("is intact"), "{}", ok.stdout);
    let snap_key = format!("{PREFIX}/{set}/{}", snap.name);
    let mut flipped = files[&snap.name].clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x20;
    let flipped_file = work.path().join("flipped.db");
    std::fs::write(&flipped_file, &flipped).unwrap();
    rclone_copyto(&rclone, &flipped_file, &bucket, &snap_key);
    let bad = agent(&config, &["verify", "latest"]);
    bad.assert_code(1);
    assert!(
        bad.stdout
            .contains(&format!("BAD     {}: sha256 is", snap.name)),
        "{}",
        bad.stdout
    );
    let good_file = work.path().join("good.db");
    std::fs::write(&good_file, &files[&snap.name]).unwrap();
    rclone_copyto(&rclone, &good_file, &bucket, &snap_key);
    agent(&config, &["verify", &ts.to_string()]).assert_code(0);

    // fetch: the cluster-restore.sh layout, accepted by the real etcdctl.
    let out = work.path().join("fetched");
    let run = agent(&config, &["fetch", "latest", "--to", out.to_str().unwrap()]);
    run.assert_code(0);
    assert_cluster_restore_dir(&run.stdout, &out, &ts);
    let status = snapshot_status(&out.join(ts.snapshot_file_name()));
    assert_eq!(status["totalSize"].as_u64().unwrap() + 32, snap.size);
    assert_eq!(status["revision"].as_i64().unwrap(), revision);
    let mut tar: Vec<String> = tar_gz_entries(&out.join(ts.resources_file_name()))
        .into_iter()
        .map(|e| e.path)
        .collect();
    tar.sort();
    assert_eq!(tar, expected_tar);

    // restore (the real etcdctl underneath) into a fresh member: the same
    // keyspace and revision.
    let targets = EtcdCluster::plan(1, &work.path().join("restored"));
    let initial = EtcdCluster::initial_cluster(&targets);
    let t = &targets[0];
    let version = EtcdVersion::from_env();
    let peer = t.peer_url();
    let mut args = vec![
        "restore",
        "latest",
        "--data-dir",
        t.data_dir.to_str().unwrap(),
        "--name",
        &t.name,
        "--initial-cluster",
        &initial,
        "--initial-advertise-peer-urls",
        &peer,
    ];
    args.extend_from_slice(version.restore_args());
    agent(&config, &args).assert_code(0);
    let restored = EtcdCluster::start(targets);
    let mut c = restored.client(0).await;
    assert!(dump(&mut c).await == before, "restored keyspace differs");
    let rev = c.get("x", None).await.unwrap().header().unwrap().revision();
    assert_eq!(rev, version.restored_revision(revision));
    drop(restored);

    // drill
    let run = agent(&config, &["drill"]);
    run.assert_code(0);
    assert!(run.stdout.contains("drill passed"), "{}", run.stdout);
    assert!(
        run.stdout.contains(&format!("{} keys", before.len())),
        "{}",
        run.stdout
    );

    // Retention: a second set with keep_last: 1 removes the first one,
    // every object of it.
    std::thread::sleep(Duration::from_millis(1100));
    cfg.extra = "retention:\n  keep_last: 1\n".into();
    let config = cfg.write(work.path());
    backup(&config).assert_code(0);
    let stored = objects(&rclone, &bucket);
    let sets = complete_sets_in(&stored);
    assert_eq!(sets.len(), 1, "{stored:?}");
    assert_ne!(sets[0], *set);
    assert!(
        stored.iter().all(|o| !o.starts_with(&format!("{set}/"))),
        "the pruned set left objects: {stored:?}"
    );
    let run = agent(&config, &["prune"]);
    run.assert_code(0);
    assert_eq!(objects(&rclone, &bucket), stored, "prune removed more");
    let second = stored_manifest(&rclone, &bucket, PREFIX, &sets[0]);
    assert_stored_as_manifest_says(&rclone, &bucket, PREFIX, &sets[0], &second);
}

/// `rclone copyto file garage:<bucket>/<key>`.
fn rclone_copyto(rclone: &Rclone, file: &Path, bucket: &str, key: &str) {
    let out = rclone.run(&[
        "copyto",
        file.to_str().unwrap(),
        &format!("garage:{bucket}/{key}"),
    ]);
    assert!(
        out.status.success(),
        "rclone copyto: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// MiB of incompressible values for the kill tests: with etcd behind a relay
/// capped at [`SLOW_RATE`], the snapshot takes about 8 s to stream, so a kill
/// lands mid-upload.
const FILL_MIB: usize = 48;
const SLOW_RATE: u64 = 6 << 20;

/// An etcd with [`FILL_MIB`] of values behind a relay capped at
/// [`SLOW_RATE`], and a config backing it up to `garage` through the relay.
async fn slow_source(garage: &GarageCluster, work: &Path) -> (EtcdServer, Relay, PathBuf) {
    let (etcd, relay) = slow_etcd(FILL_MIB, SLOW_RATE).await;
    let mut cfg = AgentConfig::for_endpoint(&relay.http_url(), None, &work.join("unused"));
    cfg.destination_yaml = Some(etcd_backup_tests::s3_setup::garage_destination_yaml(
        garage, PREFIX,
    ));
    cfg.stall_timeout = "60s".into();
    cfg.extra = "retention:\n  stale_partial_after: 1m\n".into();
    let config = cfg.write(work);
    (etcd, relay, config)
}

/// Starts a backup in the background, its logs to `log`.
fn spawn_backup(config: &Path, log: &Path) -> Child {
    Command::new(agent_bin())
        .args(["backup", "--config", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .env_remove("NODE_NAME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_garage_node_killed_mid_upload_the_backup_completes_on_quorum_and_verifies() {
    let mut garage = GarageCluster::start(3);
    let rclone = garage.rclone();
    let bucket = garage.bucket.clone();
    let work = tempfile::tempdir().unwrap();
    let (_etcd, _relay, config) = slow_source(&garage, work.path()).await;
    let log = work.path().join("agent.log");

    let started = Instant::now();
    let mut child = spawn_backup(&config, &log);
    wait_mid_upload(&rclone, &bucket, &mut child, &log);
    // Node 0 serves the agent's endpoint; a replica goes away.
    garage.kill(2);
    let run = finish_backup(child, &log, started);
    run.assert_code(0);

    // With node 2 still down: the set is complete, as its manifest says,
    // and verifies.
    let stored = objects(&rclone, &bucket);
    let sets = complete_sets_in(&stored);
    assert_eq!(sets.len(), 1, "{stored:?}");
    let m = stored_manifest(&rclone, &bucket, PREFIX, &sets[0]);
    assert!(m.file(FileKind::Snapshot).unwrap().size > (FILL_MIB as u64) << 20);
    assert_stored_as_manifest_says(&rclone, &bucket, PREFIX, &sets[0], &m);
    agent(&config, &["verify", "latest"]).assert_code(0);
    assert!(rclone.multipart_uploads(&bucket).is_empty());

    // And once the node is back, too.
    garage.restart(2);
    agent(&config, &["verify", "latest"]).assert_code(0);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_garage_nodes_killed_mid_upload_fail_the_run_at_upload_and_prune_leaves_nothing() {
    let mut garage = GarageCluster::start(3);
    let rclone = garage.rclone();
    let bucket = garage.bucket.clone();
    let work = tempfile::tempdir().unwrap();
    let (_etcd, _relay, config) = slow_source(&garage, work.path()).await;
    let log = work.path().join("agent.log");

    let started = Instant::now();
    let mut child = spawn_backup(&config, &log);
    wait_mid_upload(&rclone, &bucket, &mut child, &log);
    garage.kill(1);
    garage.kill(2);
    let killed = Instant::now();
    let run = finish_backup(child, &log, started);
    run.assert_code(1);
    assert!(run.stderr.contains("stage upload"), "{}", run.stderr);
    assert_secret_not_shown(&run, garage.secret());

    garage.restart(1);
    garage.restart(2);
    let left = objects(&rclone, &bucket);
    assert!(
        complete_sets_in(&left).is_empty(),
        "a failed run left a manifest: {left:?}"
    );
    let uploads = rclone.multipart_uploads(&bucket);
    eprintln!("left by the failed run: objects {left:?}, multipart uploads {uploads:?}");
    if !left.is_empty() || !uploads.is_empty() {
        // What is left is a leftover to `list --include-partial`, never a set.
        let list = list_json(&config, &["--include-partial"]);
        assert!(list.sets.is_empty(), "{list:?}");
        assert!(!list.leftovers.is_empty(), "{list:?}");
    }

    // Once older than stale_partial_after (1m, the least allowed), prune
    // removes every object and aborts every multipart upload of the failed
    // run.
    let wait = Duration::from_secs(63).saturating_sub(killed.elapsed());
    eprintln!("waiting {wait:?} for the leftovers to turn stale");
    std::thread::sleep(wait);
    let run = agent(&config, &["prune"]);
    run.assert_code(0);
    assert_eq!(objects(&rclone, &bucket), Vec::<String>::new());
    assert_eq!(rclone.multipart_uploads(&bucket), Vec::<String>::new());
    let list = list_json(&config, &["--include-partial"]);
    assert!(
        list.sets.is_empty() && list.leftovers.is_empty(),
        "{list:?}"
    );
}

/// A slow backup (40 MiB at 300 KiB/s: about 2 min 15 s of streaming,
/// a 5 MiB part every 17 s or so) with `stale_partial_after: 1m`; a `prune`
/// from the command line 75 s after the snapshot's upload was first seen,
/// when the set's claim and that upload were both *started* more than a
/// minute before.
/// The upload is aged by its newest part, so prune leaves it alone, and the
/// run completes a set that verifies. (Aged by its start, as before, prune
/// aborted both uploads and the run failed.)
#[tokio::test(flavor = "multi_thread")]
async fn prune_while_a_slow_upload_runs_past_stale_partial_after_leaves_it_and_the_set_completes() {
    let garage = GarageCluster::start(3);
    let rclone = garage.rclone();
    let bucket = garage.bucket.clone();
    let work = tempfile::tempdir().unwrap();
    let (_etcd, relay) = slow_etcd(40, 300 << 10).await;
    let mut cfg = AgentConfig::for_endpoint(&relay.http_url(), None, &work.path().join("unused"));
    cfg.destination_yaml = Some(etcd_backup_tests::s3_setup::garage_destination_yaml(
        &garage, PREFIX,
    ));
    cfg.stall_timeout = "60s".into();
    cfg.extra = "retention:\n  stale_partial_after: 1m\n".into();
    let config = cfg.write(work.path());
    let log = work.path().join("agent.log");

    let started = Instant::now();
    let mut child = spawn_backup(&config, &log);
    wait_mid_upload(&rclone, &bucket, &mut child, &log);
    // Both uploads were started before this moment; 75 s on, both are older
    // than stale_partial_after by their start, with a minute of streaming
    // still to come.
    std::thread::sleep(Duration::from_secs(75));
    let pruned_after = started.elapsed();
    assert!(
        child.try_wait().unwrap().is_none(),
        "the backup finished before the prune; the test needs a slower source:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let uploads_before = rclone.multipart_uploads(&bucket);
    assert!(
        uploads_before.iter().any(|k| k.ends_with("/manifest.json"))
            && uploads_before.iter().any(|k| k.contains("/snapshot_")),
        "the claim and the snapshot's upload are open: {uploads_before:?}"
    );
    let listed = agent(&config, &["list", "--include-partial", "-o", "json"]);
    eprintln!("before the prune: {}", listed.stdout);
    let pruned = agent(&config, &["prune"]);
    eprintln!("prune: {}\n{}", pruned.stdout, pruned.stderr);
    pruned.assert_code(0);
    assert_eq!(
        rclone.multipart_uploads(&bucket),
        uploads_before,
        "prune aborted a live upload:\n{}\n{}",
        pruned.stdout,
        pruned.stderr
    );

    let run = finish_backup(child, &log, started);
    run.assert_code(0);
    assert!(
        run.elapsed > pruned_after,
        "the backup ran past the prune: {:?}",
        run.elapsed
    );
    let stored = objects(&rclone, &bucket);
    let sets = complete_sets_in(&stored);
    assert_eq!(sets.len(), 1, "{stored:?}");
    let m = stored_manifest(&rclone, &bucket, PREFIX, &sets[0]);
    assert!(m.file(FileKind::Snapshot).unwrap().size >= 40 << 20);
    assert_stored_as_manifest_says(&rclone, &bucket, PREFIX, &sets[0], &m);
    agent(&config, &["verify", "latest"]).assert_code(0);
    assert!(rclone.multipart_uploads(&bucket).is_empty());
}

#[test]
fn a_wrong_secret_key_or_a_missing_bucket_fails_at_once_naming_the_key_and_the_bucket() {
    let etcd = EtcdServer::start();
    let garage = GarageCluster::start(3);
    let rclone = garage.rclone();
    let work = tempfile::tempdir().unwrap();

    // A wrong secret for the right key id.
    let wrong_secret = "0".repeat(64);
    let wrong_file = work.path().join("wrong-secret");
    std::fs::write(&wrong_file, format!("{wrong_secret}\n")).unwrap();
    let mut cfg = s3_config(&etcd, &garage, PREFIX);
    cfg.destination_yaml = Some(s3_destination_yaml(
        &garage.endpoint(),
        &garage.bucket,
        PREFIX,
        &garage.access_key_id_file,
        &wrong_file,
    ));
    cfg.retry_attempts = 3;
    cfg.retry_initial_delay = "5s".into();
    let config = cfg.write(work.path());
    let run = backup(&config);
    run.assert_code(1);
    assert!(run.stderr.contains(&garage.key_id), "{}", run.stderr);
    assert!(run.stderr.contains(&garage.bucket), "{}", run.stderr);
    assert!(
        !run.stderr.contains("retrying"),
        "a permission error was retried:\n{}",
        run.stderr
    );
    assert_secret_not_shown(&run, &wrong_secret);
    assert_secret_not_shown(&run, garage.secret());
    assert_eq!(objects(&rclone, &garage.bucket), Vec::<String>::new());
    assert_eq!(
        rclone.multipart_uploads(&garage.bucket),
        Vec::<String>::new()
    );

    // The right key, a bucket that does not exist.
    cfg.destination_yaml = Some(s3_destination_yaml(
        &garage.endpoint(),
        "no-such-bucket",
        PREFIX,
        &garage.access_key_id_file,
        &garage.secret_access_key_file,
    ));
    let config = cfg.write(work.path());
    let run = backup(&config);
    run.assert_code(1);
    assert!(run.stderr.contains("no-such-bucket"), "{}", run.stderr);
    assert!(
        !run.stderr.contains("retrying"),
        "a missing bucket was retried:\n{}",
        run.stderr
    );
    assert_secret_not_shown(&run, garage.secret());
    // rclone agrees that it is missing (and the agent made no bucket).
    let out = rclone.run(&["lsf", "garage:no-such-bucket"]);
    assert!(!out.status.success(), "no-such-bucket exists");
}

#[test]
fn two_agents_racing_for_one_set_name_one_wins_and_nothing_is_overwritten() {
    // Two members of different clusters (different data, different cluster
    // ids) backed up under the same cluster and node name: the same set
    // name when both runs start in the same second.
    let a = EtcdServer::start();
    let b = EtcdServer::start();
    for (etcd, tag) in [(&a, "a"), (&b, "b")] {
        for i in 0..200 {
            assert!(etcd
                .etcdctl(&["put", &format!("/registry/{tag}/{i}"), &tag.repeat(2000)])
                .status
                .success());
        }
    }
    let garage = GarageCluster::start(3);
    let rclone = garage.rclone();
    let bucket = garage.bucket.clone();
    let work = tempfile::tempdir().unwrap();
    let configs: Vec<PathBuf> = [(&a, "a"), (&b, "b")]
        .iter()
        .map(|(etcd, name)| {
            let dir = work.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            s3_config(etcd, &garage, PREFIX).write(&dir)
        })
        .collect();

    // Start both at the same moment, early in a second; runs that still got
    // two different set names (both succeed) are tried again.
    for attempt in 1..=5 {
        let now = chrono::Utc::now();
        let into_second = Duration::from_nanos(u64::from(now.timestamp_subsec_nanos()));
        std::thread::sleep(Duration::from_secs(1) - into_second + Duration::from_millis(50));
        let children: Vec<_> = configs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let log = work.path().join(format!("agent-{attempt}-{i}.log"));
                (spawn_backup(c, &log), log, Instant::now())
            })
            .collect();
        let runs: Vec<AgentRun> = children
            .into_iter()
            .map(|(child, log, started)| finish_backup(child, &log, started))
            .collect();
        let stored = objects(&rclone, &bucket);
        let sets = complete_sets_in(&stored);
        let codes: Vec<i32> = runs.iter().map(|r| r.code).collect();
        if codes == [0, 0] {
            assert_eq!(sets.len(), 2, "two successes, but {stored:?}");
            eprintln!("attempt {attempt}: the runs got different set names {sets:?}; again");
            let out = rclone.run(&["purge", &format!("garage:{bucket}/{PREFIX}")]);
            assert!(out.status.success());
            continue;
        }
        let winner = match codes[..] {
            [0, 1] => 0,
            [1, 0] => 1,
            _ => panic!("wanted one success and one failure, got {codes:?}: {runs:#?}"),
        };
        let loser = &runs[1 - winner];
        eprintln!("the losing run's logs:\n{}", loser.stderr);
        assert_eq!(sets.len(), 1, "{stored:?}");
        let set = &sets[0];
        let m = stored_manifest(&rclone, &bucket, PREFIX, set);
        let winner_etcd = [&a, &b][winner];
        assert_eq!(
            m.etcd.endpoint, winner_etcd.client_url,
            "the stored manifest is not the winner's"
        );
        // Every stored object of the set is the winner's, byte for byte.
        assert_stored_as_manifest_says(&rclone, &bucket, PREFIX, set, &m);
        let mut want: Vec<String> = m
            .files
            .iter()
            .map(|f| format!("{set}/{}", f.name))
            .collect();
        want.push(format!("{set}/manifest.json"));
        want.sort();
        assert_eq!(stored, want);
        agent(&configs[winner], &["verify", "latest"]).assert_code(0);
        assert_eq!(rclone.multipart_uploads(&bucket), Vec::<String>::new());
        return;
    }
    panic!("five attempts never started two runs in the same second");
}
