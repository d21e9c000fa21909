//! Several destinations of different kinds in one run: a real OpenSSH server
//! (`offsite`, SFTP) and a real three-node Garage cluster (`odf`, S3), fed
//! from one snapshot read of a real etcd (counted on etcd's own `/metrics`).
//! Both copies complete and checked independently (the SFTP files on disk,
//! the objects with rclone); sshd killed in the middle of a run under the
//! daemon (the S3 copy complete and verified, the SFTP copy without a
//! manifest, the run partial in the run record and the metrics); and two
//! Garage nodes killed in the middle of a CLI run (the SFTP copy complete,
//! no S3 set, and that destination's prune aborting what was left open).

use std::path::Path;
use std::time::{Duration, Instant};

use etcd_backup_proto::api::{DestinationResultKind, RunRecord, RunState};
use etcd_backup_proto::{FileKind, Manifest};
use etcd_backup_tests::agent::{
    assert_partial_run_metrics, backup, finish_backup, run_agent, spawn_backup, AgentConfig,
    AgentDaemon, AgentRun,
};
use etcd_backup_tests::etcd::{
    slow_etcd, snapshot_rpcs, snapshot_status, write_history, EtcdServer,
};
use etcd_backup_tests::garage::{GarageCluster, Rclone};
use etcd_backup_tests::s3_setup::{
    assert_stored_as_manifest_says, complete_sets_in, garage_destination_yaml, sha256_hex,
    stored_manifest, wait_mid_upload,
};
use etcd_backup_tests::sftp_setup::{backups, sshd_destination_yaml};
use etcd_backup_tests::sshd::{ClientKey, KeyKind, SshOptions, SshServer};
use etcd_backup_tests::{complete_sets, destinations_yaml, files_below, free_port, wait_for};

/// The key prefix in the bucket.
const PREFIX: &str = "backups";

/// MiB of incompressible values, and the rate (bytes a second) the relay in
/// front of etcd passes them at: the snapshot streams for about 8 s, so a
/// server killed once its upload is seen dies mid-run.
const FILL_MIB: usize = 48;
const SLOW_RATE: u64 = 6 << 20;

fn key_server(key: &ClientKey) -> SshServer {
    SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        ..SshOptions::default()
    })
}

/// `destinations:` with `sshd` named `offsite` first and `garage` named
/// `odf` second.
fn sftp_and_s3(sshd: &SshServer, key: &ClientKey, garage: &GarageCluster) -> String {
    destinations_yaml(&[
        ("offsite", sshd_destination_yaml(sshd, key, &backups(sshd))),
        ("odf", garage_destination_yaml(garage, PREFIX)),
    ])
}

fn cli(config: &Path, args: &[&str]) -> AgentRun {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", config.to_str().unwrap()]);
    run_agent(&all)
}

fn objects(rclone: &Rclone, bucket: &str) -> Vec<String> {
    rclone.list(bucket, PREFIX)
}

/// The manifest of the SFTP copy `set_dir`, every file it lists on disk
/// with its size and sha256.
fn assert_sftp_copy_complete(set_dir: &Path) -> Manifest {
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(set_dir.join("manifest.json")).unwrap()).unwrap();
    for f in &m.files {
        let bytes = std::fs::read(set_dir.join(&f.name)).unwrap();
        assert_eq!(bytes.len() as u64, f.size, "{}", f.name);
        assert_eq!(sha256_hex(&bytes), f.sha256, "{}", f.name);
    }
    m
}

#[tokio::test(flavor = "multi_thread")]
async fn sftp_and_s3_in_one_run_both_complete_from_one_snapshot_read() {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    write_history(&mut client, "/registry/multi", 200).await;
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = key_server(&key);
    let garage = GarageCluster::start(3);
    let rclone = garage.rclone();
    let bucket = garage.bucket.clone();
    let work = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::new(&etcd, &work.path().join("unused"));
    cfg.destination_yaml = Some(sftp_and_s3(&sshd, &key, &garage));
    let config = cfg.write(work.path());
    let remote = backups(&sshd);

    let before = snapshot_rpcs(&etcd).await;
    let run = backup(&config);
    run.assert_code(0);
    assert_eq!(
        snapshot_rpcs(&etcd).await - before,
        1.0,
        "one run, one snapshot read"
    );
    assert!(run.stdout.contains("destination offsite"), "{}", run.stdout);
    assert!(run.stdout.contains("destination odf"), "{}", run.stdout);
    assert!(!run.stdout.contains("FAILED"), "{}", run.stdout);

    // The same set at both: on the SFTP server's disk, and in the bucket by
    // rclone, each as its own manifest says, with no multipart upload open.
    let sets = complete_sets(&remote);
    assert_eq!(sets.len(), 1, "{:?}", files_below(&remote));
    let stored = objects(&rclone, &bucket);
    assert_eq!(complete_sets_in(&stored), sets, "{stored:?}");
    let on_sftp = assert_sftp_copy_complete(&remote.join(&sets[0]));
    let on_s3 = stored_manifest(&rclone, &bucket, PREFIX, &sets[0]);
    let bytes = assert_stored_as_manifest_says(&rclone, &bucket, PREFIX, &sets[0], &on_s3);
    assert_eq!(on_sftp.files, on_s3.files);
    assert_eq!(stored.len(), on_s3.files.len() + 1, "{stored:?}");
    assert_eq!(
        rclone.multipart_uploads(&bucket),
        Vec::<String>::new(),
        "multipart uploads left open"
    );
    let snap = on_s3.file(FileKind::Snapshot).unwrap();
    assert_eq!(
        std::fs::read(remote.join(&sets[0]).join(&snap.name)).unwrap(),
        bytes[&snap.name]
    );

    // Each copy verifies on its own and is what `list` shows there.
    for name in ["offsite", "odf"] {
        let run = cli(&config, &["verify", "latest", "--destination", name]);
        run.assert_code(0);
        assert!(run.stdout.contains("is intact"), "{name}: {}", run.stdout);
        let run = cli(&config, &["list", "--destination", name, "-o", "json"]);
        run.assert_code(0);
        assert!(run.stdout.contains(&sets[0]), "{name}: {}", run.stdout);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sshd_killed_mid_run_leaves_the_s3_copy_complete_and_the_run_partial_in_every_report() {
    let (etcd, relay) = slow_etcd(FILL_MIB, SLOW_RATE).await;
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let mut sshd = key_server(&key);
    let garage = GarageCluster::start(3);
    let rclone = garage.rclone();
    let bucket = garage.bucket.clone();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cfg = AgentConfig::for_endpoint(&relay.http_url(), None, &work.path().join("unused"));
    cfg.stall_timeout = "60s".into();
    cfg.destination_yaml = Some(sftp_and_s3(&sshd, &key, &garage));
    cfg.extra = format!(
        "schedule: \"0 * * * *\"\nrun_on_start: never\nshutdown_grace: 3s\nhttp:\n  listen: 127.0.0.1:{port}\n"
    );
    let config = cfg.write(work.path());
    let daemon = AgentDaemon::start(&config, port);
    let remote = backups(&sshd);

    let http = reqwest::Client::new();
    let before = snapshot_rpcs(&etcd).await;
    let post = tokio::spawn({
        let url = daemon.url("/v1/backups?wait=true");
        let http = http.clone();
        async move {
            let r = http.post(url).send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        }
    });
    // Mid-upload at both: the snapshot's `.partial` file on the SFTP
    // server past 8 MiB (of about 48) and its multipart upload open in the
    // bucket.
    wait_for(
        "the snapshot being uploaded to both destinations",
        Duration::from_secs(60),
        || {
            let sftp = files_below(&remote).into_iter().any(|f| {
                f.ends_with(".db.partial")
                    && std::fs::metadata(remote.join(&f))
                        .map(|m| m.len() > 8 << 20)
                        .unwrap_or(false)
            });
            let s3 = rclone
                .multipart_uploads(&bucket)
                .iter()
                .any(|k| k.contains("/snapshot_"));
            (sftp && s3).then_some(())
        },
    );
    sshd.kill_all();
    let (status, body) = tokio::time::timeout(Duration::from_secs(180), post)
        .await
        .expect("the run ends")
        .unwrap();
    assert_eq!(status.as_u16(), 500, "{body}\n{}", daemon.logs());
    let record: RunRecord = serde_json::from_str(&body).unwrap();
    assert_eq!(record.state, RunState::Partial, "{body}");
    assert_eq!(
        snapshot_rpcs(&etcd).await - before,
        1.0,
        "one run, one snapshot read"
    );
    let by_name: Vec<(&str, DestinationResultKind, Option<&str>)> = record
        .destinations
        .iter()
        .map(|d| (d.name.as_str(), d.result, d.stage.as_deref()))
        .collect();
    assert_eq!(
        by_name,
        [
            ("offsite", DestinationResultKind::Failed, Some("upload")),
            ("odf", DestinationResultKind::Succeeded, None),
        ],
        "{body}"
    );
    assert!(
        record.error.as_deref().unwrap().contains("offsite"),
        "{body}"
    );

    // The S3 copy is complete, as its manifest says (read by rclone), with
    // no multipart upload open, and verifies; fetched, the real etcdctl
    // accepts its snapshot.
    let set = record.set.clone().unwrap();
    let stored = objects(&rclone, &bucket);
    assert_eq!(complete_sets_in(&stored), vec![set.clone()], "{stored:?}");
    let m = stored_manifest(&rclone, &bucket, PREFIX, &set);
    let snap = m.file(FileKind::Snapshot).unwrap();
    assert!(snap.size > (FILL_MIB as u64) << 20, "{m:?}");
    assert_stored_as_manifest_says(&rclone, &bucket, PREFIX, &set, &m);
    assert_eq!(rclone.multipart_uploads(&bucket), Vec::<String>::new());
    cli(&config, &["verify", "latest", "--destination", "odf"]).assert_code(0);
    let out = work.path().join("fetched");
    cli(
        &config,
        &[
            "fetch",
            "latest",
            "--snapshot-only",
            "--to",
            out.to_str().unwrap(),
            "--destination",
            "odf",
        ],
    )
    .assert_code(0);
    let status = snapshot_status(&out.join(m.timestamp.snapshot_file_name()));
    assert_eq!(status["totalSize"].as_u64().unwrap() + 32, snap.size);
    assert_eq!(status["revision"].as_i64().unwrap(), m.etcd.revision);

    // The SFTP copy is absent: no manifest, at most `.partial` names left
    // for that destination's prune.
    assert!(complete_sets(&remote).is_empty());
    let left = files_below(&remote);
    assert!(left.iter().all(|f| f.ends_with(".partial")), "{left:?}");

    // Metrics per destination.
    assert_partial_run_metrics(&daemon, "odf", "offsite");
    daemon.stop(Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_garage_nodes_killed_mid_run_leave_the_sftp_copy_complete_and_prune_aborts_the_upload()
{
    let (etcd, relay) = slow_etcd(FILL_MIB, SLOW_RATE).await;
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = key_server(&key);
    let mut garage = GarageCluster::start(3);
    let rclone = garage.rclone();
    let bucket = garage.bucket.clone();
    let work = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::for_endpoint(&relay.http_url(), None, &work.path().join("unused"));
    cfg.stall_timeout = "60s".into();
    cfg.destination_yaml = Some(sftp_and_s3(&sshd, &key, &garage));
    cfg.extra = "retention:\n  stale_partial_after: 1m\n".into();
    let config = cfg.write(work.path());
    let remote = backups(&sshd);
    let log = work.path().join("agent.log");

    let before = snapshot_rpcs(&etcd).await;
    let started = Instant::now();
    let mut child = spawn_backup(&config, &log);
    wait_mid_upload(&rclone, &bucket, &mut child, &log);
    // Node 0 serves the agent's endpoint; without two of three replicas
    // Garage cannot store a block.
    garage.kill(1);
    garage.kill(2);
    let killed = Instant::now();
    let run = finish_backup(child, &log, started);
    run.assert_code(1);
    assert!(run.stderr.contains("backup partial"), "{}", run.stderr);
    assert!(
        run.stderr.contains("complete at offsite")
            && run.stderr.contains("odf (")
            && run.stderr.contains("failed at stage upload"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains(garage.secret()), "{}", run.stderr);
    assert_eq!(
        snapshot_rpcs(&etcd).await - before,
        1.0,
        "one run, one snapshot read"
    );

    // The SFTP copy is complete and verifies.
    let sets = complete_sets(&remote);
    assert_eq!(sets.len(), 1, "{:?}", files_below(&remote));
    let m = assert_sftp_copy_complete(&remote.join(&sets[0]));
    assert!(m.file(FileKind::Snapshot).unwrap().size > (FILL_MIB as u64) << 20);
    cli(&config, &["verify", "latest", "--destination", "offsite"]).assert_code(0);

    // With the nodes back: no set in the bucket. Once what the run left is
    // older than stale_partial_after (1m, the least allowed), `prune
    // --destination odf` removes every object and aborts every multipart
    // upload of it, and leaves the SFTP copy alone.
    garage.restart(1);
    garage.restart(2);
    let left = objects(&rclone, &bucket);
    assert!(
        complete_sets_in(&left).is_empty(),
        "a failed destination holds a manifest: {left:?}"
    );
    eprintln!(
        "left at odf: objects {left:?}, multipart uploads {:?}",
        rclone.multipart_uploads(&bucket)
    );
    let wait = Duration::from_secs(63).saturating_sub(killed.elapsed());
    eprintln!("waiting {wait:?} for the leftovers to turn stale");
    std::thread::sleep(wait);
    cli(&config, &["prune", "--destination", "odf"]).assert_code(0);
    assert_eq!(objects(&rclone, &bucket), Vec::<String>::new());
    assert_eq!(rclone.multipart_uploads(&bucket), Vec::<String>::new());
    assert_eq!(complete_sets(&remote), sets);
    cli(&config, &["verify", "latest", "--destination", "offsite"]).assert_code(0);
}
