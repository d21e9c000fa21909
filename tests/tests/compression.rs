//! Snapshot compression (`compression: zstd`): the snapshot is stored as
//! `snapshot_<ts>.db.zst`, which the reference `zstd -d` turns into the exact
//! snapshot the manifest describes; `list` shows it; `verify` decompresses
//! and checks everything, and catches a changed byte; `fetch` writes the
//! plain `snapshot_<ts>.db` (a cluster-restore.sh directory); `restore` and
//! `drill` go through the real etcdctl. With encryption too (over SFTP to a
//! real sshd), the snapshot is compressed, then encrypted: `.db.zst.age`.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use etcd_backup_proto::{Compression, FileKind, Manifest};
use etcd_backup_tests::agent::{backup, run_agent, AgentConfig, AgentRun};
use etcd_backup_tests::etcd::{
    dump, restore_and_start, snapshot_status, write_history, EtcdServer, EtcdVersion,
};
use etcd_backup_tests::fixtures::openshift_tree;
use etcd_backup_tests::sftp_setup::sshd_destination_yaml;
use etcd_backup_tests::sshd::{ClientKey, KeyKind, SshOptions, SshServer};
use etcd_backup_tests::{assert_cluster_restore_dir, complete_sets, files_below, require_tool};

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `zstd -d -c file`: the decompressed bytes, or the tool's error.
fn zstd_decompress(file: &Path) -> Result<Vec<u8>, String> {
    require_tool("zstd", "zstd");
    let out = Command::new("zstd")
        .args(["-d", "-q", "-c"])
        .arg(file)
        .output()
        .expect("run zstd -d");
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A real etcd with history, and the config of an agent that backs it up
/// (openshift layout) with `extra` added.
struct Fixture {
    _etcd: EtcdServer,
    work: tempfile::TempDir,
    config: PathBuf,
    dest: PathBuf,
    keyspace: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Fixture {
    async fn new(extra: &str, destination_yaml: Option<String>, dest: Option<PathBuf>) -> Self {
        let etcd = EtcdServer::start();
        let mut client = etcd.client().await;
        write_history(&mut client, "/registry/pods/openshift-etcd", 400).await;
        // Kubernetes objects are JSON or protobuf with much repetition.
        for i in 0..200 {
            let value = format!(
                "{{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{{\"name\":\"cm-{i}\",\"namespace\":\"openshift-config\"}},\"data\":{{\"payload\":\"{}\"}}}}",
                "abcdefgh".repeat(100)
            );
            client
                .put(
                    format!("/registry/configmaps/openshift-config/cm-{i}"),
                    value,
                    None,
                )
                .await
                .unwrap();
        }
        let keyspace = dump(&mut client).await;
        let work = tempfile::tempdir().unwrap();
        let root = work.path().join("etc-kubernetes");
        std::fs::create_dir_all(&root).unwrap();
        openshift_tree(&root);
        let dest = dest.unwrap_or_else(|| work.path().join("backups"));
        let mut cfg = AgentConfig::new(&etcd, &dest);
        cfg.layout = "openshift".into();
        cfg.root = Some(root);
        cfg.destination_yaml = destination_yaml;
        cfg.extra = extra.to_string();
        let config = cfg.write(work.path());
        Self {
            _etcd: etcd,
            work,
            config,
            dest,
            keyspace,
        }
    }

    fn run(&self, args: &[&str]) -> AgentRun {
        let mut all = vec![args[0], "--config", self.config.to_str().unwrap()];
        all.extend_from_slice(&args[1..]);
        run_agent(&all)
    }

    /// Takes one backup; returns the set's directory and its manifest.
    fn backup(&self) -> (PathBuf, Manifest) {
        backup(&self.config).assert_code(0);
        let sets = complete_sets(&self.dest);
        assert_eq!(sets.len(), 1, "{:?}", files_below(&self.dest));
        let set_dir = self.dest.join(&sets[0]);
        let manifest =
            serde_json::from_slice(&std::fs::read(set_dir.join("manifest.json")).unwrap()).unwrap();
        (set_dir, manifest)
    }

    /// `restore latest` into a new data dir as member `m0`, plus `extra`;
    /// returns the run and the port to start the member on.
    fn restore(&self, data_dir: &Path, extra: &[&str]) -> (AgentRun, u16) {
        let port = etcd_backup_tests::free_port();
        let peer = format!("http://127.0.0.1:{port}");
        let cluster = format!("m0={peer}");
        let mut args = vec![
            "restore",
            "latest",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--name",
            "m0",
            "--initial-cluster",
            &cluster,
            "--initial-advertise-peer-urls",
            &peer,
        ];
        args.extend_from_slice(EtcdVersion::from_env().restore_args());
        args.extend_from_slice(extra);
        (self.run(&args), port)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compressed_set_round_trips_through_every_command_and_the_zstd_tool() {
    let f = Fixture::new("compression: zstd\ncompression_level: 3\n", None, None).await;
    let (set_dir, m) = f.backup();
    let ts = m.timestamp;

    // Stored: the snapshot compressed, the tarball as is.
    let mut stored: Vec<String> = files_below(&set_dir);
    stored.sort();
    let mut want = vec![
        "manifest.json".to_string(),
        format!("{}.zst", ts.snapshot_file_name()),
        ts.resources_file_name(),
    ];
    want.sort();
    assert_eq!(stored, want);
    assert_eq!(m.format_version, 3);
    let c = m.compression.as_ref().expect("compression recorded");
    assert_eq!((c.algorithm, c.level), (Compression::Zstd, 3));
    let snap = m.file(FileKind::Snapshot).unwrap();
    assert_eq!(snap.compression, Some(Compression::Zstd));
    let tar = m.file(FileKind::Resources).unwrap();
    assert_eq!((tar.compression, tar.plaintext.is_none()), (None, true));

    // The reference tool decompresses the stored file to the snapshot the
    // manifest describes, which the real etcdctl reads.
    let stored_snap = set_dir.join(&snap.name);
    let compressed = std::fs::read(&stored_snap).unwrap();
    assert_eq!(compressed.len() as u64, snap.size);
    assert_eq!(sha256_hex(&compressed), snap.sha256);
    let plain = zstd_decompress(&stored_snap).unwrap();
    let p = snap.plaintext.as_ref().expect("plaintext recorded");
    assert_eq!(p.name, ts.snapshot_file_name());
    assert_eq!(plain.len() as u64, p.size);
    assert_eq!(sha256_hex(&plain), p.sha256);
    assert!(
        compressed.len() * 2 < plain.len(),
        "{} of {}",
        compressed.len(),
        plain.len()
    );
    let by_hand = f.work.path().join("by-hand.db");
    std::fs::write(&by_hand, &plain).unwrap();
    let status = snapshot_status(&by_hand);
    let recorded = m.snapshot_status.unwrap();
    assert_eq!(status["hash"].as_u64().unwrap(), u64::from(recorded.hash));
    assert_eq!(status["revision"].as_i64().unwrap(), recorded.revision);
    assert_eq!(status["totalKey"].as_u64().unwrap(), recorded.total_key);

    // list shows it, as JSON and in the table.
    let run = f.run(&["list", "-o", "json"]);
    run.assert_code(0);
    let list: etcd_backup_proto::api::SetList = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(list.sets[0].compression, "zstd");
    assert!(!list.sets[0].encrypted);
    let run = f.run(&["list"]);
    run.assert_code(0);
    let mut lines = run.stdout.lines();
    let column = lines.next().unwrap().find("COMPRESSION").unwrap();
    let row = lines.next().unwrap();
    assert_eq!(
        row[column..].split_whitespace().next(),
        Some("zstd"),
        "{}",
        run.stdout
    );

    // verify decompresses and checks the plaintext too.
    let run = f.run(&["verify", "latest"]);
    run.assert_code(0);
    assert!(
        run.stdout
            .contains(&format!("ok      {}.zst  (", ts.snapshot_file_name())),
        "{}",
        run.stdout
    );
    assert_eq!(
        run.stdout.matches("decompressed and checked").count(),
        1,
        "{}",
        run.stdout
    );

    // fetch writes the plain snapshot, a cluster-restore.sh directory.
    let out = f.work.path().join("fetched");
    let run = f.run(&["fetch", "latest", "--to", out.to_str().unwrap()]);
    run.assert_code(0);
    assert_cluster_restore_dir(&run.stdout, &out, &ts);
    assert!(std::fs::read(out.join(ts.snapshot_file_name())).unwrap() == plain);
    assert!(
        std::fs::read(out.join(ts.resources_file_name())).unwrap()
            == std::fs::read(set_dir.join(&tar.name)).unwrap()
    );

    // restore (real etcdctl/etcdutl) and drill serve the keyspace backed up.
    let data_dir = f.work.path().join("restored-member");
    let (run, port) = f.restore(&data_dir, &[]);
    run.assert_code(0);
    let member = EtcdServer::start_on(data_dir, "m0", port);
    assert_eq!(dump(&mut member.client().await).await, f.keyspace);
    drop(member);
    let restored = restore_and_start(&by_hand, &f.work.path().join("zstd-d"));
    assert_eq!(dump(&mut restored.client().await).await, f.keyspace);
    drop(restored);
    let run = f.run(&["drill"]);
    run.assert_code(0);
    assert!(run.stdout.contains("drill passed"), "{}", run.stdout);

    // A stored .zst handed to restore --snapshot is named for what it is.
    let (run, _) = {
        let port = etcd_backup_tests::free_port();
        let peer = format!("http://127.0.0.1:{port}");
        let data_dir = f.work.path().join("from-zst");
        let cluster = format!("m0={peer}");
        let mut args = vec![
            "restore",
            "--snapshot",
            stored_snap.to_str().unwrap(),
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--name",
            "m0",
            "--initial-cluster",
            &cluster,
            "--initial-advertise-peer-urls",
            &peer,
        ];
        args.extend_from_slice(EtcdVersion::from_env().restore_args());
        (f.run(&args), port)
    };
    run.assert_code(1);
    assert!(run.stderr.contains("zstd-compressed"), "{}", run.stderr);
    assert!(!f.work.path().join("from-zst").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_byte_in_a_compressed_snapshot_is_caught_and_never_fetched() {
    let f = Fixture::new("compression: zstd\n", None, None).await;
    let (set_dir, m) = f.backup();
    assert_eq!(
        m.compression.as_ref().unwrap().level,
        1,
        "the default level"
    );
    let snap = m.file(FileKind::Snapshot).unwrap();
    let path = set_dir.join(&snap.name);
    let mut bytes = std::fs::read(&path).unwrap();
    // zstd itself must refuse a change to its content checksum (the frame's
    // last 4 bytes), whatever the data.
    let mut bad_checksum = bytes.clone();
    *bad_checksum.last_mut().unwrap() ^= 0x01;
    let bad_checksum_path = f.work.path().join("bad-checksum.zst");
    std::fs::write(&bad_checksum_path, &bad_checksum).unwrap();
    assert!(zstd_decompress(&bad_checksum_path).is_err());
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let run = f.run(&["verify", "latest"]);
    run.assert_code(1);
    assert!(
        run.stdout
            .contains(&format!("BAD     {}: sha256 is", snap.name)),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr.contains("does not match its manifest"),
        "{}",
        run.stderr
    );
    // The reference tool agrees (zstd's own checksum, or a damaged block),
    // unless the flipped bit is one zstd's decoder never reads (its
    // entropy-coded streams have padding bits): then it restores the
    // untouched snapshot, and only the stored file's hash, which the agent
    // checks, shows the change.
    let plain = snap.plaintext.as_ref().expect("plaintext recorded");
    if let Ok(restored) = zstd_decompress(&path) {
        assert_eq!(sha256_hex(&restored), plain.sha256);
    }

    let out = f.work.path().join("fetched");
    let run = f.run(&["fetch", "latest", "--to", out.to_str().unwrap()]);
    run.assert_code(1);
    assert!(!out.exists(), "{:?}", files_below(&out));
    let run = f.run(&["drill"]);
    run.assert_code(1);
}

#[tokio::test(flavor = "multi_thread")]
async fn compression_with_encryption_over_sftp_stores_db_zst_age_and_round_trips() {
    require_tool("age-keygen", "age");
    let work = tempfile::tempdir().unwrap();
    let identity = work.path().join("age-key.txt");
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&identity)
        .output()
        .unwrap();
    assert!(out.status.success());
    let public = String::from_utf8(
        Command::new("age-keygen")
            .arg("-y")
            .arg(&identity)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();

    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        ..SshOptions::default()
    });
    let base = sshd.sftp_root.join("backups");
    let f = Fixture::new(
        &format!("compression: zstd\nencryption:\n  recipients: [\"{public}\"]\n"),
        Some(sshd_destination_yaml(&sshd, &key, &base)),
        Some(base.clone()),
    )
    .await;
    let (set_dir, m) = f.backup();
    let ts = m.timestamp;
    let mut stored = files_below(&set_dir);
    stored.sort();
    let mut want = vec![
        "manifest.json".to_string(),
        format!("{}.zst.age", ts.snapshot_file_name()),
        format!("{}.age", ts.resources_file_name()),
    ];
    want.sort();
    assert_eq!(stored, want);
    assert_eq!(m.format_version, 3);
    assert!(m.encryption.is_some() && m.compression.is_some());

    // age -d, then zstd -d: the snapshot the manifest describes.
    let snap = m.file(FileKind::Snapshot).unwrap();
    let sealed = set_dir.join(&snap.name);
    assert_eq!(sha256_hex(&std::fs::read(&sealed).unwrap()), snap.sha256);
    let decrypted = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&identity)
        .arg(&sealed)
        .output()
        .unwrap();
    assert!(decrypted.status.success());
    assert!(decrypted.stdout.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]));
    let zst = work.path().join("snapshot.db.zst");
    std::fs::write(&zst, &decrypted.stdout).unwrap();
    let plain = zstd_decompress(&zst).unwrap();
    let p = snap.plaintext.as_ref().unwrap();
    assert_eq!(
        (plain.len() as u64, sha256_hex(&plain)),
        (p.size, p.sha256.clone())
    );

    // Without a key: the ciphertext is checked, and fetch hands it over as stored.
    let run = f.run(&["verify", "latest"]);
    run.assert_code(0);
    assert!(
        run.stdout.contains("compressed inside its encryption"),
        "{}",
        run.stdout
    );
    let id = identity.to_str().unwrap();
    let run = f.run(&["verify", "latest", "--identity", id]);
    run.assert_code(0);
    assert!(
        run.stdout.contains("decrypted, decompressed and checked"),
        "{}",
        run.stdout
    );
    let as_stored = f.work.path().join("as-stored");
    let run = f.run(&["fetch", "latest", "--to", as_stored.to_str().unwrap()]);
    run.assert_code(0);
    assert!(
        as_stored.join(&snap.name).exists(),
        "{:?}",
        files_below(&as_stored)
    );
    assert!(run.stdout.contains("zstd -d"), "{}", run.stdout);

    // With the key: the plain snapshot, byte for byte.
    let out = f.work.path().join("fetched");
    let run = f.run(&[
        "fetch",
        "latest",
        "--to",
        out.to_str().unwrap(),
        "--identity",
        id,
    ]);
    run.assert_code(0);
    assert!(std::fs::read(out.join(ts.snapshot_file_name())).unwrap() == plain);
    assert!(out.join(ts.resources_file_name()).exists());

    let data_dir = f.work.path().join("restored-member");
    let (run, port) = f.restore(&data_dir, &["--identity", id]);
    run.assert_code(0);
    let member = EtcdServer::start_on(data_dir, "m0", port);
    assert_eq!(dump(&mut member.client().await).await, f.keyspace);
    drop(member);
    let run = f.run(&["drill", "--identity", id]);
    run.assert_code(0);
    assert!(run.stdout.contains("drill passed"), "{}", run.stdout);

    // A changed byte in the sealed, compressed file is caught with and without the key.
    let mut bytes = std::fs::read(&sealed).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&sealed, &bytes).unwrap();
    let run = f.run(&["verify", "latest"]);
    run.assert_code(1);
    assert!(
        run.stdout.contains(&format!("BAD     {}", snap.name)),
        "{}",
        run.stdout
    );
    let run = f.run(&["verify", "latest", "--identity", id]);
    run.assert_code(1);
    assert!(run.stdout.contains("cannot decrypt"), "{}", run.stdout);
}

#[test]
fn bad_compression_settings_are_refused_before_anything_runs() {
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    for (extra, says) in [
        (
            "compression: gzip\n",
            "compression: \"gzip\" is not a compression this agent knows; use `zstd`",
        ),
        (
            "compression: zstd\ncompression_level: 22\n",
            "compression_level: 22 is outside 1..=7",
        ),
        (
            "compression_level: 3\n",
            "compression_level: is set, but compression is none",
        ),
    ] {
        let mut cfg = AgentConfig::for_endpoint("http://127.0.0.1:1", None, &dest);
        cfg.extra = extra.to_string();
        let config = cfg.write(work.path());
        let run = run_agent(&["check-config", "--config", config.to_str().unwrap()]);
        run.assert_code(2);
        assert!(run.stderr.contains(says), "{extra:?}: {}", run.stderr);
        let run = backup(&config);
        run.assert_code(2);
        assert!(!dest.exists(), "nothing was written for {extra:?}");
    }
    let mut cfg = AgentConfig::for_endpoint("http://127.0.0.1:1", None, &dest);
    cfg.extra = "compression: zstd\n".into();
    let config = cfg.write(work.path());
    let run = run_agent(&["check-config", "--config", config.to_str().unwrap()]);
    run.assert_code(0);
    assert!(
        run.stdout.contains("snapshot compressed with zstd level 1"),
        "{}",
        run.stdout
    );
}
