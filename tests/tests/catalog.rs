//! Stored sets: `list` shows the complete ones, `verify` catches any changed
//! byte on either destination, `fetch` hands over only verified files in the
//! layout `cluster-restore.sh` expects.

use std::path::{Path, PathBuf};

use etcd_backup_proto::api::SetList;
use etcd_backup_proto::{FileKind, Manifest};
use etcd_backup_tests::agent::{backup, run_agent, AgentConfig};
use etcd_backup_tests::etcd::{snapshot_status, EtcdServer};
use etcd_backup_tests::fixtures::{kubeadm_tree, tar_gz_entries};
use etcd_backup_tests::sshd::{ClientKey, KeyKind, SshOptions, SshServer};
use etcd_backup_tests::{complete_sets, files_below};

fn flip_byte(file: &Path, at: usize) {
    let mut bytes = std::fs::read(file).unwrap();
    let at = at.min(bytes.len() - 1);
    bytes[at] ^= 0x20;
    std::fs::write(file, bytes).unwrap();
}

struct Stored {
    config: PathBuf,
    /// Where the set's files are on this machine's disk.
    set_dir: PathBuf,
    manifest: Manifest,
    expected_tar: Vec<String>,
}

/// One backup with a kubeadm resources tree, to `cfg`'s destination, whose
/// files live below `files_root` on this machine.
fn store(etcd: &EtcdServer, work: &Path, mut cfg: AgentConfig, files_root: &Path) -> Stored {
    let root = work.join("etc-kubernetes");
    std::fs::create_dir_all(&root).unwrap();
    let expected_tar = kubeadm_tree(&root);
    cfg.layout = "kubeadm".into();
    cfg.root = Some(root);
    let config = cfg.write(work);
    backup(&config).assert_code(0);
    let sets = complete_sets(files_root);
    assert_eq!(sets.len(), 1, "{:?}", files_below(files_root));
    let set_dir = files_root.join(&sets[0]);
    let manifest =
        serde_json::from_slice(&std::fs::read(set_dir.join("manifest.json")).unwrap()).unwrap();
    let _ = etcd;
    Stored {
        config,
        set_dir,
        manifest,
        expected_tar,
    }
}

fn verify(config: &Path, set: &str) -> etcd_backup_tests::agent::AgentRun {
    run_agent(&["verify", "--config", config.to_str().unwrap(), set])
}

/// Flips a byte in each file in turn: verify names that file and what differs,
/// and passes again once the byte is back.
fn verify_catches_each_flip(s: &Stored) {
    let config = &s.config;
    let ok = verify(config, "latest");
    ok.assert_code(0);
    assert!(ok.stdout.contains("is intact"), "{}", ok.stdout);
    for entry in &s.manifest.files {
        let file = s.set_dir.join(&entry.name);
        let original = std::fs::read(&file).unwrap();
        flip_byte(&file, original.len() / 2);
        let bad = verify(config, "latest");
        bad.assert_code(1);
        assert!(
            bad.stdout
                .contains(&format!("BAD     {}: sha256 is", entry.name)),
            "{}",
            bad.stdout
        );
        if entry.kind == FileKind::Snapshot {
            assert!(bad.stdout.contains("etcd digest trailer"), "{}", bad.stdout);
        }
        assert!(
            bad.stderr.contains("does not match its manifest"),
            "{}",
            bad.stderr
        );
        std::fs::write(&file, &original).unwrap();
    }
    // A truncated file makes the set incomplete (the catalog compares the
    // stored sizes with the manifest's), named with its size.
    let snap = s.manifest.file(FileKind::Snapshot).unwrap();
    let file = s.set_dir.join(&snap.name);
    let original = std::fs::read(&file).unwrap();
    std::fs::write(&file, &original[..original.len() - 100]).unwrap();
    let bad = verify(config, &s.manifest.timestamp.to_string());
    bad.assert_code(1);
    assert!(
        bad.stderr.contains(&format!(
            "that set is incomplete: {} holds {} bytes, the manifest says {}",
            snap.name,
            original.len() - 100,
            original.len()
        )),
        "{}",
        bad.stderr
    );
    std::fs::write(&file, &original).unwrap();
    verify(config, &s.manifest.timestamp.to_string()).assert_code(0);
}

#[test]
fn verify_catches_a_changed_byte_in_each_file_of_a_local_set() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let s = store(&etcd, work.path(), AgentConfig::new(&etcd, &dest), &dest);
    verify_catches_each_flip(&s);
}

#[test]
fn verify_catches_a_changed_byte_in_each_file_of_an_sftp_set() {
    let etcd = EtcdServer::start();
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        ..SshOptions::default()
    });
    let work = tempfile::tempdir().unwrap();
    let known_hosts = work.path().join("known_hosts");
    std::fs::write(&known_hosts, sshd.known_hosts_line()).unwrap();
    let base = sshd.sftp_root.join("backups");
    let mut cfg = AgentConfig::new(&etcd, &work.path().join("unused"));
    cfg.destination_yaml = Some(format!(
        "destination:\n  sftp:\n    host: 127.0.0.1\n    port: {}\n    user: {}\n    path: {}\n    known_hosts_file: {}\n    private_key_file: {}\n",
        sshd.port,
        SshServer::key_user(),
        base.display(),
        known_hosts.display(),
        key.private_key.display()
    ));
    let s = store(&etcd, work.path(), cfg, &base);
    verify_catches_each_flip(&s);
}

#[test]
fn fetch_hands_over_verified_files_in_the_cluster_restore_layout() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let s = store(&etcd, work.path(), AgentConfig::new(&etcd, &dest), &dest);
    let ts = s.manifest.timestamp;
    let out = work.path().join("restore-here");
    let config = s.config.to_str().unwrap();

    let run = run_agent(&[
        "fetch",
        "--config",
        config,
        "latest",
        "--to",
        out.to_str().unwrap(),
    ]);
    run.assert_code(0);
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![ts.snapshot_file_name(), ts.resources_file_name()]
    );
    // The real tools accept what fetch wrote.
    let status = snapshot_status(&out.join(ts.snapshot_file_name()));
    assert_eq!(
        status["totalSize"].as_u64().unwrap() + 32,
        s.manifest.files[0].size
    );
    let mut tar: Vec<String> = tar_gz_entries(&out.join(ts.resources_file_name()))
        .into_iter()
        .map(|e| e.path)
        .collect();
    tar.sort();
    assert_eq!(tar, s.expected_tar);

    // A non-empty target needs --force.
    let run = run_agent(&[
        "fetch",
        "--config",
        config,
        "latest",
        "--to",
        out.to_str().unwrap(),
    ]);
    run.assert_code(2);
    assert!(run.stderr.contains("is not empty"), "{}", run.stderr);

    // A corrupted snapshot is never left under its final name.
    flip_byte(&s.set_dir.join(ts.snapshot_file_name()), 1000);
    let out2 = work.path().join("second");
    let run = run_agent(&[
        "fetch",
        "--config",
        config,
        &ts.to_string(),
        "--to",
        out2.to_str().unwrap(),
    ]);
    run.assert_code(1);
    let left: Vec<String> = files_below(&out2);
    assert_eq!(
        left,
        vec![ts.resources_file_name()],
        "only the good file may be kept"
    );

    // Unknown sets and bad names are named.
    let run = run_agent(&[
        "fetch",
        "--config",
        config,
        "2001-01-01_000000",
        "--to",
        work.path().join("x").to_str().unwrap(),
    ]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("newest complete set is"),
        "{}",
        run.stderr
    );
    let run = run_agent(&["verify", "--config", config, "yesterday"]);
    run.assert_code(2);
}

#[test]
fn list_shows_complete_sets_and_leftovers_only_on_request() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let mut cfg = AgentConfig::new(&etcd, &dest);
    let config0 = cfg.write(work.path());
    backup(&config0).assert_code(0);
    let other = work.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    cfg.node_name = "master-1".into();
    backup(&cfg.write(&other)).assert_code(0);
    // A crashed run's leftover for master-0.
    let leftover = dest.join("test/master-0/2020-01-01_000000");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(
        leftover.join("snapshot_2020-01-01_000000.db.partial"),
        b"half",
    )
    .unwrap();

    let list = |args: &[&str]| -> SetList {
        let mut all = vec!["list", "--config", config0.to_str().unwrap(), "-o", "json"];
        all.extend_from_slice(args);
        let run = run_agent(&all);
        run.assert_code(0);
        serde_json::from_str(&run.stdout).unwrap()
    };
    let mine = list(&[]);
    assert_eq!(mine.sets.len(), 1);
    assert_eq!(mine.sets[0].node, "master-0");
    assert!(mine.leftovers.is_empty());
    assert!(mine.sets[0].snapshot_bytes > 0);
    let all = list(&["--all-nodes"]);
    let mut nodes: Vec<&str> = all.sets.iter().map(|s| s.node.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["master-0", "master-1"]);
    let other_node = list(&["--node", "master-1"]);
    assert_eq!(other_node.sets.len(), 1);
    let with_partial = list(&["--include-partial"]);
    assert_eq!(with_partial.leftovers.len(), 1);
    assert!(with_partial.leftovers[0].why.contains("no manifest.json"));

    let table = run_agent(&["list", "--config", config0.to_str().unwrap()]);
    table.assert_code(0);
    assert!(table.stdout.starts_with("TIME (UTC)"), "{}", table.stdout);
    assert!(table.stdout.contains(&mine.sets[0].set), "{}", table.stdout);
    assert!(!table.stdout.contains("2020-01-01"), "{}", table.stdout);
}
