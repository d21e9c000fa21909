//! A rename the server carried out whose reply never came back: the run
//! must look before it decides, and leave a complete set that verifies,
//! never a lone manifest or an orphan data file.
//!
//! SSH is encrypted, so no relay on the wire can pick one SFTP request: the
//! reply is dropped inside sshd, by `sftp-reply-shim` set as its
//! `Subsystem sftp`, in front of the real OpenSSH `sftp-server`. The agent's
//! `io_timeout` then expires on the rename, as when a connection dies after
//! the server acted. On S3 (Garage over plain HTTP) an HTTP relay picks the
//! multipart completion and loses the store's answer to it.

use std::path::Path;

use etcd_backup_tests::agent::{backup, run_agent, AgentConfig, AgentRun};
use etcd_backup_tests::etcd::{fill_incompressible, EtcdServer};
use etcd_backup_tests::files_below;
use etcd_backup_tests::garage::GarageCluster;
use etcd_backup_tests::http_relay::{HttpReplyDropper, Rule};
use etcd_backup_tests::moto::MotoServer;
use etcd_backup_tests::s3_setup::{complete_sets_in, s3_destination_yaml};
use etcd_backup_tests::sftp_setup::{backups, Login, SftpSetup, Trust};
use etcd_backup_tests::sshd::{ClientKey, KeyKind, SshOptions, SshServer};

const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";

/// Backs `etcd` up over SFTP through an sshd whose sftp-server loses the
/// reply to the first rename into a name ending in `suffix`. Returns the
/// run, the set's files and `verify latest`'s run, and whether the reply
/// was dropped.
fn backup_losing_the_reply_to_a_rename_into(suffix: &str) -> (AgentRun, Vec<String>, AgentRun) {
    assert!(
        Path::new(SFTP_SERVER).exists(),
        "{SFTP_SERVER} is missing: install openssh-sftp-server"
    );
    let etcd = EtcdServer::start();
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("dropped");
    let sshd = SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        sftp_subsystem: Some(format!(
            "{} {suffix} {} {SFTP_SERVER}",
            env!("CARGO_BIN_EXE_sftp-reply-shim"),
            marker.display()
        )),
        ..SshOptions::default()
    });
    // The rename waits io_timeout for its lost reply.
    let timeouts = "    connect_timeout: 5s\n    io_timeout: 3s\n";
    let s = SftpSetup::new();
    let cfg = s.config(
        &etcd,
        &sshd,
        Trust::KnownHosts(sshd.known_hosts_line()),
        Login::Key(&key, None),
        timeouts,
    );
    let config = s.write(&cfg);
    let run = backup(&config);
    assert!(
        marker.exists(),
        "the shim never saw a rename into *{suffix}: {}\n{}",
        run.stderr,
        sshd.log()
    );
    let files = files_below(&backups(&sshd));
    let verify = run_agent(&["verify", "--config", config.to_str().unwrap(), "latest"]);
    (run, files, verify)
}

#[test]
fn sftp_manifest_rename_done_but_its_reply_lost_is_found_in_place_and_the_set_kept() {
    let (run, files, verify) = backup_losing_the_reply_to_a_rename_into("manifest.json");
    run.assert_code(0);
    assert!(
        run.stderr
            .contains("the manifest's rename got no answer; looked: "),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("so the set is complete"),
        "{}",
        run.stderr
    );
    verify.assert_code(0);
    assert_eq!(
        files
            .iter()
            .filter(|f| f.ends_with("manifest.json"))
            .count(),
        1
    );
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files.iter().all(|f| !f.ends_with(".partial")), "{files:?}");
}

#[test]
fn sftp_snapshot_rename_done_but_its_reply_lost_is_found_in_place_and_the_run_goes_on() {
    let (run, files, verify) = backup_losing_the_reply_to_a_rename_into(".db");
    run.assert_code(0);
    assert!(
        run.stderr.contains("a rename got no answer; looked: "),
        "{}",
        run.stderr
    );
    verify.assert_code(0);
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(
        files.iter().any(|f| f.ends_with("manifest.json")),
        "{files:?}"
    );
    assert!(files.iter().all(|f| !f.ends_with(".partial")), "{files:?}");
}

/// An S3 store the agent backs up to through the relay.
enum Store {
    /// A three-node Garage cluster: ignores `If-None-Match` on creates.
    Garage(GarageCluster),
    /// moto: honours `If-None-Match: *` on PUT and on completions.
    Moto(MotoServer),
}

impl Store {
    fn start(moto: bool) -> Self {
        if moto {
            Store::Moto(MotoServer::start())
        } else {
            Store::Garage(GarageCluster::start(3))
        }
    }

    fn endpoint(&self) -> String {
        match self {
            Store::Garage(g) => g.endpoint(),
            Store::Moto(m) => m.endpoint(),
        }
    }

    fn destination_yaml(&self, endpoint: &str) -> String {
        let (bucket, id, secret) = match self {
            Store::Garage(g) => (
                g.bucket.as_str(),
                &g.access_key_id_file,
                &g.secret_access_key_file,
            ),
            Store::Moto(m) => (
                etcd_backup_tests::moto::BUCKET,
                &m.access_key_id_file,
                &m.secret_access_key_file,
            ),
        };
        s3_destination_yaml(endpoint, bucket, PREFIX, id, secret)
    }

    /// The objects below [`PREFIX`] (relative to it) and the multipart
    /// uploads still open.
    fn objects_and_uploads(&self) -> (Vec<String>, Vec<String>) {
        match self {
            Store::Garage(g) => {
                let rclone = g.rclone();
                (
                    rclone.list(&g.bucket, PREFIX),
                    rclone.multipart_uploads(&g.bucket),
                )
            }
            Store::Moto(m) => m.objects_and_uploads(PREFIX),
        }
    }
}

/// Backs `etcd` (holding `mib` MiB: over 5 makes the snapshot a multipart
/// upload, 0 a single PUT) up to `store` through an HTTP relay that loses
/// the answer to the first request `rule` picks. Returns the run, the
/// objects left under the prefix, `verify latest`'s run, and the request
/// whose answer was lost.
async fn s3_backup_losing_the_reply_to(
    moto: bool,
    mib: usize,
    rule: Rule,
) -> (AgentRun, Vec<String>, AgentRun, String) {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    if mib > 0 {
        fill_incompressible(&mut client, mib, 23).await;
    }
    let store = Store::start(moto);
    let target: std::net::SocketAddr = store
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let relay = HttpReplyDropper::start(target, rule);
    let work = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::new(&etcd, &work.path().join("unused-local"));
    cfg.destination_yaml = Some(store.destination_yaml(&relay.http_url()));
    let config = cfg.write(work.path());
    let run = tokio::task::spawn_blocking(move || backup(&config))
        .await
        .unwrap();
    let dropped = relay.dropped().unwrap_or_else(|| {
        panic!(
            "the relay never saw the request to drop the answer of:\n{}",
            run.stderr
        )
    });
    let config = work.path().join("config.yaml");
    let verify = run_agent(&["verify", "--config", config.to_str().unwrap(), "latest"]);
    let (objects, uploads) = store.objects_and_uploads();
    assert!(uploads.is_empty(), "uploads left open: {uploads:?}");
    (run, objects, verify, dropped)
}

const PREFIX: &str = "lost-replies";

/// A CompleteMultipartUpload (`POST <key>?uploadId=…`) of a key ending in `suffix`.
fn completion_of(suffix: &'static str) -> Rule {
    Box::new(move |method, target| {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        method == "POST" && path.ends_with(suffix) && query.contains("uploadId=")
    })
}

/// A PutObject (not a part) of a key ending in `suffix`.
fn put_of(suffix: &'static str) -> Rule {
    Box::new(move |method, target| {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        method == "PUT" && path.ends_with(suffix) && !query.contains("uploadId=")
    })
}

/// One row: the run succeeds, having found its own object by ETag; the
/// store holds the complete set (snapshot and manifest) and nothing else,
/// and it verifies.
async fn lost_reply_row(moto: bool, mib: usize, rule: Rule, what: &str) {
    let (run, objects, verify, dropped) = s3_backup_losing_the_reply_to(moto, mib, rule).await;
    assert!(dropped.contains(what), "{dropped}");
    run.assert_code(0);
    assert!(
        run.stderr
            .contains("the object is in place with this upload's ETag"),
        "{}",
        run.stderr
    );
    assert_eq!(objects.len(), 2, "{objects:?}");
    assert_eq!(complete_sets_in(&objects).len(), 1, "{objects:?}");
    verify.assert_code(0);
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_snapshot_completion_done_but_its_reply_lost_is_found_by_etag_on_garage() {
    lost_reply_row(false, 7, completion_of(".db"), ".db?uploadId=").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_manifest_completion_done_but_its_reply_lost_is_found_by_etag_on_garage() {
    lost_reply_row(
        false,
        0,
        completion_of("manifest.json"),
        "manifest.json?uploadId=",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_snapshot_put_done_but_its_reply_lost_is_found_by_md5_on_garage() {
    lost_reply_row(false, 0, put_of(".db"), ".db HTTP").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_snapshot_completion_done_but_its_reply_lost_is_found_by_etag_on_moto() {
    lost_reply_row(true, 7, completion_of(".db"), ".db?uploadId=").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_manifest_completion_done_but_its_reply_lost_is_found_by_etag_on_moto() {
    lost_reply_row(
        true,
        0,
        completion_of("manifest.json"),
        "manifest.json?uploadId=",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_snapshot_put_done_but_its_reply_lost_is_found_by_md5_not_refused_by_its_own_412_on_moto(
) {
    lost_reply_row(true, 0, put_of(".db"), ".db HTTP").await;
}
