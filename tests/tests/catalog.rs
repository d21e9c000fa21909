//! Stored sets: `list` shows the complete ones, `verify` catches any changed
//! byte on either destination, `fetch` hands over only verified files in the
//! layout `cluster-restore.sh` expects, and refuses to present a set the
//! script cannot use as one.

use std::path::{Path, PathBuf};

use etcd_backup_proto::api::SetList;
use etcd_backup_proto::{FileKind, Manifest};
use etcd_backup_tests::agent::{backup, run_agent, AgentConfig};
use etcd_backup_tests::etcd::{snapshot_status, EtcdServer};
use etcd_backup_tests::fixtures::{kubeadm_tree, openshift_tree, tar_gz_entries};
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

/// One backup with an OpenShift resources tree, to `cfg`'s destination, whose
/// files live below `files_root` on this machine.
fn store(etcd: &EtcdServer, work: &Path, mut cfg: AgentConfig, files_root: &Path) -> Stored {
    let root = work.join("etc-kubernetes");
    std::fs::create_dir_all(&root).unwrap();
    let expected_tar = openshift_tree(&root);
    cfg.layout = "openshift".into();
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
    assert!(
        run.stdout.contains(&format!(
            "{} is a cluster-restore.sh directory",
            out.display()
        )),
        "{}",
        run.stdout
    );
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

    // A corrupted snapshot leaves nothing behind: no directory that looks
    // like a set with one file missing, nothing in an existing directory.
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
    assert!(run.stderr.contains("nothing was written"), "{}", run.stderr);
    assert!(!out2.exists(), "{:?}", files_below(&out2));
    std::fs::create_dir(&out2).unwrap();
    let run = run_agent(&[
        "fetch",
        "--config",
        config,
        &ts.to_string(),
        "--to",
        out2.to_str().unwrap(),
    ]);
    run.assert_code(1);
    assert_eq!(
        std::fs::read_dir(&out2).unwrap().count(),
        0,
        "{:?}",
        files_below(&out2)
    );
    assert_eq!(
        std::fs::read_dir(work.path())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".etcd-backup-fetch-"))
            .count(),
        0,
        "the staging directory was removed"
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

/// `fetch --snapshot-only` into a new `out`: exit 0, the snapshot alone,
/// restorable by the real etcdutl/etcdctl, and said not to be a
/// cluster-restore.sh directory.
fn fetch_snapshot_only(config: &Path, out: &Path, manifest: &Manifest) {
    let run = run_agent(&[
        "fetch",
        "--config",
        config.to_str().unwrap(),
        "latest",
        "--snapshot-only",
        "--to",
        out.to_str().unwrap(),
    ]);
    run.assert_code(0);
    assert!(
        run.stdout.contains(&format!(
            "{} holds the snapshot only and is not a cluster-restore.sh directory",
            out.display()
        )),
        "{}",
        run.stdout
    );
    let snapshot = manifest.timestamp.snapshot_file_name();
    assert_eq!(files_below(out), vec![snapshot.clone()]);
    let status = snapshot_status(&out.join(&snapshot));
    assert_eq!(
        status["totalSize"].as_u64().unwrap() + 32,
        manifest.file(FileKind::Snapshot).unwrap().size
    );
}

/// The refusal: exit 1, the reason, `etcd-backup-agent restore` and
/// `--snapshot-only` named, and nothing written (a new DIR is not created,
/// an existing empty one stays empty).
fn assert_fetch_refused(config: &Path, out: &Path, reason: &str) {
    for existing in [false, true] {
        if existing {
            std::fs::create_dir(out).unwrap();
        }
        let run = run_agent(&[
            "fetch",
            "--config",
            config.to_str().unwrap(),
            "latest",
            "--to",
            out.to_str().unwrap(),
        ]);
        run.assert_code(1);
        for needle in [
            "cluster-restore.sh cannot use it",
            "static_kuberesources_*.tar.gz from an OpenShift master",
            "etcd-backup-agent restore",
            "--snapshot-only",
            reason,
        ] {
            assert!(run.stderr.contains(needle), "{needle}: {}", run.stderr);
        }
        assert!(
            !run.stdout.contains("is a cluster-restore.sh directory"),
            "{}",
            run.stdout
        );
        if existing {
            assert_eq!(std::fs::read_dir(out).unwrap().count(), 0);
            std::fs::remove_dir(out).unwrap();
        } else {
            assert!(!out.exists(), "{:?}", files_below(out));
        }
    }
}

fn only_manifest(dest: &Path) -> (PathBuf, Manifest) {
    let sets = complete_sets(dest);
    assert_eq!(sets.len(), 1, "{:?}", files_below(dest));
    let dir = dest.join(&sets[0]);
    let m = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    (dir, m)
}

#[test]
fn fetch_refuses_sets_cluster_restore_sh_cannot_use_unless_snapshot_only() {
    let etcd = EtcdServer::start();
    for layout in ["none", "kubeadm"] {
        let work = tempfile::tempdir().unwrap();
        let dest = work.path().join("backups");
        let mut cfg = AgentConfig::new(&etcd, &dest);
        cfg.layout = layout.into();
        if layout == "kubeadm" {
            let root = work.path().join("etc-kubernetes");
            std::fs::create_dir_all(&root).unwrap();
            kubeadm_tree(&root);
            cfg.root = Some(root);
        }
        let config = cfg.write(work.path());
        backup(&config).assert_code(0);
        let (_, manifest) = only_manifest(&dest);
        let reason = format!("resources.layout: {layout}");
        assert_fetch_refused(&config, &work.path().join("fetched"), &reason);
        fetch_snapshot_only(&config, &work.path().join("snapshot-only"), &manifest);
    }

    // An openshift set whose manifest lists no tarball is refused too.
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let s = store(&etcd, work.path(), AgentConfig::new(&etcd, &dest), &dest);
    let manifest_path = s.set_dir.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["files"]
        .as_array_mut()
        .unwrap()
        .retain(|f| f["kind"] != "resources");
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    std::fs::remove_file(s.set_dir.join(s.manifest.timestamp.resources_file_name())).unwrap();
    verify(&s.config, "latest").assert_code(0);
    assert_fetch_refused(
        &s.config,
        &work.path().join("fetched"),
        "lists no static-pod resources tarball",
    );
}

#[test]
fn fetch_snapshot_only_of_an_openshift_set_takes_the_snapshot_alone() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let s = store(&etcd, work.path(), AgentConfig::new(&etcd, &dest), &dest);
    fetch_snapshot_only(&s.config, &work.path().join("snapshot-only"), &s.manifest);
}

#[test]
fn list_shows_each_sets_layout_in_the_table_and_json() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let root = work.path().join("etc-kubernetes");
    std::fs::create_dir_all(&root).unwrap();
    openshift_tree(&root);
    let mut config = PathBuf::new();
    for (i, layout) in ["none", "openshift"].into_iter().enumerate() {
        let mut cfg = AgentConfig::new(&etcd, &dest);
        cfg.node_name = format!("master-{i}");
        cfg.layout = layout.into();
        cfg.root = Some(root.clone());
        let dir = work.path().join(layout);
        std::fs::create_dir_all(&dir).unwrap();
        config = cfg.write(&dir);
        backup(&config).assert_code(0);
    }
    let run = run_agent(&[
        "list",
        "--config",
        config.to_str().unwrap(),
        "--all-nodes",
        "-o",
        "json",
    ]);
    run.assert_code(0);
    let list: SetList = serde_json::from_str(&run.stdout).unwrap();
    let mut layouts: Vec<(String, String)> = list
        .sets
        .iter()
        .map(|s| (s.node.clone(), s.layout.clone()))
        .collect();
    layouts.sort();
    assert_eq!(
        layouts,
        [
            ("master-0".to_string(), "none".to_string()),
            ("master-1".to_string(), "openshift".to_string())
        ]
    );
    let raw: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(raw["sets"][0]["layout"].is_string(), "{raw}");

    let table = run_agent(&["list", "--config", config.to_str().unwrap(), "--all-nodes"]);
    table.assert_code(0);
    let mut lines = table.stdout.lines();
    let header = lines.next().unwrap();
    let column = header.find("LAYOUT").unwrap_or_else(|| panic!("{header}"));
    for line in lines {
        let value = line[column..].split_whitespace().next().unwrap();
        let want = if line.contains("master-0") {
            "none"
        } else {
            "openshift"
        };
        assert_eq!(value, want, "{}", table.stdout);
    }
}
