//! The static-pod resources tarball holds exactly what the layout names, with
//! modes and mtimes kept, and never follows a symlink out of the root.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use etcd_backup_proto::{FileKind, Manifest};
use etcd_backup_tests::agent::{backup, run_agent, AgentConfig};
use etcd_backup_tests::etcd::EtcdServer;
use etcd_backup_tests::fixtures::{
    gnu_tar_comparison_tree, gunzip, kubeadm_tree, openshift_tree, tar_gz_entries, tar_gz_headers,
};
use etcd_backup_tests::{complete_sets, files_below};
use sha2::{Digest, Sha256};

struct Bundled {
    manifest: Manifest,
    tarball: std::path::PathBuf,
    _work: tempfile::TempDir,
}

fn back_up_tree(
    etcd: &EtcdServer,
    layout: &str,
    build: impl FnOnce(&std::path::Path) -> Vec<String>,
) -> (Bundled, Vec<String>, std::path::PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("etc-kubernetes");
    std::fs::create_dir(&root).unwrap();
    let expected = build(&root);
    let dest = work.path().join("backups");
    let mut cfg = AgentConfig::new(etcd, &dest);
    cfg.layout = layout.into();
    cfg.root = Some(root.clone());
    backup(&cfg.write(work.path())).assert_code(0);
    let sets = complete_sets(&dest);
    assert_eq!(sets.len(), 1, "{:?}", files_below(&dest));
    let set_dir = dest.join(&sets[0]);
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(set_dir.join("manifest.json")).unwrap()).unwrap();
    let entry = manifest
        .file(FileKind::Resources)
        .expect("resources in manifest")
        .clone();
    let tarball = set_dir.join(&entry.name);
    assert_eq!(
        entry.name,
        format!("static_kuberesources_{}.tar.gz", manifest.timestamp)
    );
    let bytes = std::fs::read(&tarball).unwrap();
    assert_eq!(entry.size, bytes.len() as u64);
    assert_eq!(entry.sha256, hex::encode(Sha256::digest(&bytes)));
    assert_eq!(
        std::fs::metadata(&tarball).unwrap().permissions().mode() & 0o777,
        0o600
    );
    (
        Bundled {
            manifest,
            tarball,
            _work: work,
        },
        expected,
        root,
    )
}

#[test]
fn openshift_layout_takes_the_live_revisions_only() {
    let etcd = EtcdServer::start();
    let (b, expected, root) = back_up_tree(&etcd, "openshift", openshift_tree);
    assert_eq!(b.manifest.resources_layout, "openshift");
    let entries = tar_gz_entries(&b.tarball);
    let mut paths: Vec<String> = entries.iter().map(|e| e.path.clone()).collect();
    paths.sort();
    assert_eq!(paths, expected);

    // The encryption config of the live kube-apiserver revision came along.
    let enc = entries
        .iter()
        .find(|e| e.path == "static-pod-resources/kube-apiserver-pod-7/secrets/encryption-config/encryption-config")
        .unwrap();
    assert_eq!(enc.content, b"kind: EncryptionConfiguration\n");

    // Modes and mtimes are kept.
    for e in entries.iter().filter(|e| e.kind == 'f') {
        let meta = std::fs::symlink_metadata(root.join(&e.path)).unwrap();
        assert_eq!(e.mode, meta.mode() & 0o7777, "{}", e.path);
        assert_eq!(e.mtime, meta.mtime() as u64, "{}", e.path);
        assert_eq!(
            e.content,
            std::fs::read(root.join(&e.path)).unwrap(),
            "{}",
            e.path
        );
    }
    assert!(entries.iter().any(|e| e.kind == 'f' && e.mode == 0o600));
    assert!(entries.iter().any(|e| e.kind == 'f' && e.mode == 0o644));

    // The symlink out of the root is stored as a link, not followed.
    let link = entries
        .iter()
        .find(|e| e.path.ends_with("/outside"))
        .unwrap();
    assert_eq!(link.kind, 'l');
    assert_eq!(link.link.as_deref(), Some("/etc"));
    assert!(
        !entries.iter().any(|e| e.path.contains("outside/")),
        "followed the symlink"
    );
}

#[test]
fn kubeadm_layout_takes_manifests_pki_and_the_encryption_config() {
    let etcd = EtcdServer::start();
    let (b, expected, _root) = back_up_tree(&etcd, "kubeadm", kubeadm_tree);
    assert_eq!(b.manifest.resources_layout, "kubeadm");
    let mut paths: Vec<String> = tar_gz_entries(&b.tarball)
        .into_iter()
        .map(|e| e.path)
        .collect();
    paths.sort();
    assert_eq!(paths, expected);
}

#[test]
fn missing_static_pod_manifest_is_named_and_nothing_is_written() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("etc-kubernetes");
    std::fs::create_dir(&root).unwrap();
    openshift_tree(&root);
    std::fs::remove_file(root.join("manifests/kube-scheduler-pod.yaml")).unwrap();
    let dest = work.path().join("backups");
    let mut cfg = AgentConfig::new(&etcd, &dest);
    cfg.layout = "openshift".into();
    cfg.root = Some(root.clone());
    let run = backup(&cfg.write(work.path()));
    run.assert_code(1);
    assert!(run.stderr.contains("stage resources"), "{}", run.stderr);
    assert!(
        run.stderr.contains(
            &root
                .join("manifests/kube-scheduler-pod.yaml")
                .display()
                .to_string()
        ),
        "{}",
        run.stderr
    );
    assert!(files_below(&dest).is_empty(), "{:?}", files_below(&dest));
}

#[test]
fn revision_directory_that_is_a_symlink_out_of_root_is_refused() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("etc-kubernetes");
    std::fs::create_dir(&root).unwrap();
    openshift_tree(&root);
    let outside = work.path().join("outside-rev");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), "not for the backup").unwrap();
    let rev = root.join("static-pod-resources/etcd-pod-2");
    std::fs::remove_dir_all(&rev).unwrap();
    std::os::unix::fs::symlink(&outside, &rev).unwrap();
    let dest = work.path().join("backups");
    let mut cfg = AgentConfig::new(&etcd, &dest);
    cfg.layout = "openshift".into();
    cfg.root = Some(root);
    let run = backup(&cfg.write(work.path()));
    run.assert_code(1);
    assert!(run.stderr.contains("etcd-pod-2"), "{}", run.stderr);
    assert!(run.stderr.contains("symbolic link"), "{}", run.stderr);
    assert!(files_below(&dest).is_empty());
}

/// What `cluster-backup.sh` runs, on the same tree and paths: GNU tar, with
/// `--sort=name` so its walk has the agent's (sorted) order.
fn gnu_tar_czf(root: &std::path::Path, paths: &[String], out: &std::path::Path) {
    etcd_backup_tests::require_tool("tar", "tar");
    let status = std::process::Command::new("tar")
        .arg("-cpzf")
        .arg(out)
        .arg("--sort=name")
        .arg("-C")
        .arg(root)
        .args(paths)
        .status()
        .expect("run GNU tar");
    assert!(status.success(), "GNU tar failed: {status}");
}

#[test]
fn tarball_headers_are_the_ones_gnu_tar_writes_entry_by_entry() {
    let etcd = EtcdServer::start();
    let (b, top_level, root) = back_up_tree(&etcd, "openshift", gnu_tar_comparison_tree);
    let gnu = b._work.path().join("gnu.tar.gz");
    gnu_tar_czf(&root, &top_level, &gnu);
    let ours = tar_gz_headers(&b.tarball);
    let theirs = tar_gz_headers(&gnu);

    // The fixture has what the comparison is about, in GNU tar's own archive.
    for (what, found) in [
        (
            "a directory with a trailing /",
            theirs
                .iter()
                .any(|h| h.kind == '5' && h.path.ends_with('/')),
        ),
        (
            "a 0755 file",
            theirs.iter().any(|h| h.kind == '0' && h.mode == 0o755),
        ),
        (
            "a 0600 file",
            theirs.iter().any(|h| h.kind == '0' && h.mode == 0o600),
        ),
        (
            "a 0644 file",
            theirs.iter().any(|h| h.kind == '0' && h.mode == 0o644),
        ),
        ("a symlink", theirs.iter().any(|h| h.kind == '2')),
        ("a hard link", theirs.iter().any(|h| h.kind == '1')),
        (
            "a path over 100 bytes",
            theirs.iter().any(|h| h.path.len() > 100),
        ),
        (
            "a link target over 100 bytes",
            theirs
                .iter()
                .any(|h| h.link.as_ref().is_some_and(|l| l.len() > 100)),
        ),
        (
            "a symlink with a long name and a long target",
            theirs.iter().any(|h| {
                h.kind == '2'
                    && h.path.len() > 100
                    && h.link.as_ref().is_some_and(|l| l.len() > 100)
            }),
        ),
        (
            "a hard link to a path over 100 bytes",
            theirs
                .iter()
                .any(|h| h.kind == '1' && h.link.as_ref().is_some_and(|l| l.len() > 100)),
        ),
        (
            "root/root",
            theirs
                .iter()
                .any(|h| h.uid == 0 && h.uname == "root" && h.gname == "root"),
        ),
        (
            "an owner with no name",
            theirs
                .iter()
                .any(|h| h.uid == 424_242 && h.uname.is_empty()),
        ),
    ] {
        assert!(found, "the fixture lacks {what}: {theirs:#?}");
    }

    for (i, (o, t)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(
            o, t,
            "entry {i} differs (left: the agent's, right: GNU tar's)"
        );
    }
    assert_eq!(
        ours.len(),
        theirs.len(),
        "entry counts differ; the agent's: {:#?}\nGNU tar's: {:#?}",
        ours.iter().map(|h| &h.path).collect::<Vec<_>>(),
        theirs.iter().map(|h| &h.path).collect::<Vec<_>>()
    );

    // Field by field equal is the point; byte for byte (long-name entries,
    // checksum spelling, end-of-archive padding) shows nothing was missed.
    let (ours, theirs) = (gunzip(&b.tarball), gunzip(&gnu));
    assert_eq!(ours.len(), theirs.len(), "uncompressed lengths differ");
    if let Some(at) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
        let block = at / 512 * 512;
        panic!(
            "uncompressed archives first differ at byte {at} (block at {block}):\nours:   {:?}\ntheirs: {:?}",
            String::from_utf8_lossy(&ours[block..block + 512]),
            String::from_utf8_lossy(&theirs[block..block + 512])
        );
    }
}

/// A set taken while the installer has laid out a static-pod revision newer
/// than the live manifest's is still taken, and marked: in the manifest,
/// `list` (table and JSON); `fetch latest --clean` passes it over for the
/// newest clean set; once the newer revision is gone, sets are clean again.
#[test]
fn a_set_taken_mid_rollout_is_marked_listed_and_passed_over_by_fetch_clean() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("etc-kubernetes");
    std::fs::create_dir(&root).unwrap();
    openshift_tree(&root);
    let dest = work.path().join("backups");
    let mut cfg = AgentConfig::new(&etcd, &dest);
    cfg.layout = "openshift".into();
    cfg.root = Some(root.clone());
    let config = cfg.write(work.path());
    let newest_manifest = || -> Manifest {
        let set = complete_sets(&dest).pop().unwrap();
        serde_json::from_slice(&std::fs::read(dest.join(set).join("manifest.json")).unwrap())
            .unwrap()
    };
    let back_up = || {
        // Set names have a resolution of one second.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        backup(&config).assert_code(0);
        newest_manifest()
    };

    // The fixture lays out one revision beyond the live one for every pod.
    let marked = back_up();
    assert_eq!(
        marked.rollout_in_progress,
        [
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "etcd"
        ]
    );
    let newer = [
        "kube-apiserver-pod-8",
        "kube-controller-manager-pod-6",
        "kube-scheduler-pod-4",
        "etcd-pod-3",
    ];
    for dir in newer {
        std::fs::remove_dir_all(root.join("static-pod-resources").join(dir)).unwrap();
    }
    let clean = back_up();
    assert!(clean.rollout_in_progress.is_empty(), "{clean:?}");
    let json = std::fs::read_to_string(
        dest.join(complete_sets(&dest).pop().unwrap())
            .join("manifest.json"),
    )
    .unwrap();
    assert!(!json.contains("rollout_in_progress"), "{json}");

    // kube-apiserver's installer lays out revision 8 again.
    std::fs::create_dir_all(root.join("static-pod-resources/kube-apiserver-pod-8/configmaps"))
        .unwrap();
    let again = back_up();
    assert_eq!(again.rollout_in_progress, ["kube-apiserver"]);

    let list = run_agent(&["list", "--config", config.to_str().unwrap(), "-o", "json"]);
    list.assert_code(0);
    let list: etcd_backup_proto::api::SetList = serde_json::from_str(&list.stdout).unwrap();
    let marks: Vec<Vec<String>> = list
        .sets
        .iter()
        .map(|s| s.rollout_in_progress.clone())
        .collect();
    assert_eq!(marks.len(), 3);
    assert_eq!(marks[0], ["kube-apiserver"]);
    assert!(marks[1].is_empty());
    assert_eq!(marks[2].len(), 4);
    let table = run_agent(&["list", "--config", config.to_str().unwrap()]);
    table.assert_code(0);
    let mut lines = table.stdout.lines();
    let column = lines.next().unwrap().find("ROLLOUT").unwrap();
    let values: Vec<&str> = lines
        .map(|l| l[column..].split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        values,
        [
            "kube-apiserver",
            "-",
            "kube-apiserver,kube-controller-manager,kube-scheduler,etcd"
        ],
        "{}",
        table.stdout
    );

    // fetch latest --clean: the clean set in the middle, not the newest.
    let out = work.path().join("fetched");
    let run = run_agent(&[
        "fetch",
        "--config",
        config.to_str().unwrap(),
        "latest",
        "--clean",
        "--to",
        out.to_str().unwrap(),
    ]);
    run.assert_code(0);
    assert!(
        out.join(format!("snapshot_{}.db", clean.timestamp))
            .is_file(),
        "{}{}",
        run.stdout,
        run.stderr
    );
    assert!(!run.stderr.contains("mid-rollout"), "{}", run.stderr);
    // Plain latest is the marked set, with a warning.
    let out = work.path().join("fetched-latest");
    let run = run_agent(&[
        "fetch",
        "--config",
        config.to_str().unwrap(),
        "latest",
        "--to",
        out.to_str().unwrap(),
    ]);
    run.assert_code(0);
    assert!(out
        .join(format!("snapshot_{}.db", again.timestamp))
        .is_file());
    assert!(
        run.stderr
            .contains("was taken while kube-apiserver was mid-rollout"),
        "{}",
        run.stderr
    );
    // --clean names no set of its own.
    let run = run_agent(&[
        "fetch",
        "--config",
        config.to_str().unwrap(),
        &again.timestamp.to_string(),
        "--clean",
        "--to",
        work.path().join("never").to_str().unwrap(),
    ]);
    run.assert_code(2);
    assert!(run.stderr.contains("--clean"), "{}", run.stderr);
}

/// `tar -tzvf file` as GNU tar prints it (names with bytes that are not
/// UTF-8 shown octal-escaped, `caf\351.yaml`).
fn gnu_tar_listing(file: &std::path::Path) -> String {
    let out = std::process::Command::new("tar")
        .arg("-tzvf")
        .arg(file)
        .env("LC_ALL", "C")
        .env("TZ", "UTC")
        .output()
        .expect("run GNU tar");
    assert!(out.status.success(), "tar -tzvf failed: {out:?}");
    String::from_utf8(out.stdout).expect("tar escapes what it lists")
}

#[test]
fn names_that_are_not_utf8_are_archived_byte_for_byte_as_gnu_tar_does() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let etcd = EtcdServer::start();
    let (b, top_level, root) = back_up_tree(&etcd, "openshift", |root| {
        openshift_tree(root);
        let rev = root.join("static-pod-resources/kube-apiserver-pod-7");
        let name = |bytes: &[u8]| OsStr::from_bytes(bytes).to_owned();
        // Latin-1 names, as a file copied from an old system might have.
        let file = rev.join("configmaps").join(name(b"caf\xe9.yaml"));
        std::fs::write(&file, "latin-1: true\n").unwrap();
        let dir = rev.join(name(b"secrets/\xff\xfe-dir"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tls.key"), "KEY").unwrap();
        std::fs::write(dir.join(name(b"\xe9t\xe9.key")), "KEY2").unwrap();
        // A link whose name and target are not UTF-8, a hard link to the
        // Latin-1 file, and a name longer than tar's 100-byte field.
        std::os::unix::fs::symlink(
            name(b"caf\xe9.yaml"),
            rev.join("configmaps").join(name(b"link-\xe9")),
        )
        .unwrap();
        std::fs::hard_link(&file, rev.join("configmaps").join(name(b"hard-\xe9"))).unwrap();
        let long: Vec<u8> = b"n\xe9".repeat(60).into_iter().chain(*b".yaml").collect();
        std::fs::write(rev.join("configmaps").join(name(&long)), "long\n").unwrap();
        [
            "kube-apiserver-pod-7",
            "kube-controller-manager-pod-5",
            "kube-scheduler-pod-3",
            "etcd-pod-2",
        ]
        .iter()
        .map(|d| format!("static-pod-resources/{d}"))
        .collect()
    });
    let gnu = b._work.path().join("gnu.tar.gz");
    gnu_tar_czf(&root, &top_level, &gnu);

    // Every name is there, as GNU tar lists its own archive.
    let (ours, theirs) = (gnu_tar_listing(&b.tarball), gnu_tar_listing(&gnu));
    for shown in [
        "configmaps/caf\\351.yaml",
        "secrets/\\377\\376-dir/",
        "secrets/\\377\\376-dir/tls.key",
        "secrets/\\377\\376-dir/\\351t\\351.key",
        "configmaps/link-\\351 -> caf\\351.yaml",
        "configmaps/hard-\\351 link to static-pod-resources/kube-apiserver-pod-7/configmaps/caf\\351.yaml",
        &format!("configmaps/{}.yaml", "n\\351".repeat(60)),
    ] {
        assert!(theirs.contains(shown), "GNU tar lists no {shown}:\n{theirs}");
        assert!(ours.contains(shown), "the agent's tarball lacks {shown}:\n{ours}");
    }
    assert_eq!(ours, theirs, "tar -tzvf listings differ");
    // And byte for byte.
    assert!(
        gunzip(&b.tarball) == gunzip(&gnu),
        "the uncompressed archives differ"
    );
}
