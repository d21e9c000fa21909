//! Fault matrix, disk-full row: the destination's filesystem (a size-limited
//! tmpfs: the local directory itself, or the directory a real OpenSSH server
//! stores into) fills up while the snapshot, the tarball or the manifest is
//! written. Each run exits 1 at once (no retry, though `retry.attempts` is
//! 3), says the destination may be full, and leaves nothing of itself there.

use std::path::{Path, PathBuf};

use etcd_backup_proto::Manifest;
use etcd_backup_tests::agent::{backup, AgentConfig};
use etcd_backup_tests::etcd::{fill_incompressible, EtcdServer};
use etcd_backup_tests::fixtures::kubeadm_tree;
use etcd_backup_tests::sftp_setup::sshd_destination_yaml;
use etcd_backup_tests::sshd::{ClientKey, KeyKind, SshOptions, SshServer};
use etcd_backup_tests::tmpfs::{pages, Tmpfs, PAGE};
use etcd_backup_tests::{complete_sets, files_below};

/// Where the run fails.
#[derive(Clone, Copy, Debug)]
enum Step {
    Snapshot,
    Tarball,
    Manifest,
}

/// What a complete set's files take: (snapshot, tarball, manifest) bytes.
struct SetSizes {
    snapshot: u64,
    tarball: u64,
    manifest: u64,
}

impl SetSizes {
    /// A filesystem size that runs out during `step` (in whole pages).
    fn failing_at(&self, step: Step) -> u64 {
        PAGE * match step {
            Step::Snapshot => pages(self.snapshot) / 2,
            Step::Tarball => pages(self.snapshot),
            Step::Manifest => pages(self.snapshot) + pages(self.tarball),
        }
    }

    /// Exactly enough for the whole set.
    fn fitting(&self) -> u64 {
        PAGE * (pages(self.snapshot) + pages(self.tarball) + pages(self.manifest))
    }
}

/// Backs up once to a plain directory and measures the set.
fn measure(etcd: &EtcdServer, root: &Path, work: &Path) -> SetSizes {
    let dest = work.join("measure");
    let mut cfg = AgentConfig::new(etcd, &dest);
    cfg.layout = "kubeadm".into();
    cfg.root = Some(root.to_path_buf());
    let dir = work.join("measure-config");
    std::fs::create_dir(&dir).unwrap();
    backup(&cfg.write(&dir)).assert_code(0);
    let sets = complete_sets(&dest);
    assert_eq!(sets.len(), 1, "{sets:?}");
    let set = dest.join(&sets[0]);
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(set.join("manifest.json")).unwrap()).unwrap();
    SetSizes {
        snapshot: m.files[0].size,
        tarball: m.files[1].size,
        manifest: std::fs::metadata(set.join("manifest.json")).unwrap().len(),
    }
}

/// The expected failure's file and stage, as the message names them.
fn expected(step: Step) -> (&'static str, &'static str) {
    match step {
        Step::Snapshot => ("snapshot_", "stage upload"),
        Step::Tarball => ("static_kuberesources_", "stage upload"),
        Step::Manifest => ("manifest.json.partial", "stage manifest"),
    }
}

/// Runs one backup into `store` (the tmpfs) with `destination_yaml`
/// (`None`: local at `store`), and asserts the disk-full outcome for `step`,
/// or success when `step` is `None`.
fn run_into(
    etcd: &EtcdServer,
    root: &Path,
    store: &Path,
    destination_yaml: Option<String>,
    step: Option<Step>,
    config_dir: &Path,
) {
    let mut cfg = AgentConfig::new(etcd, store);
    cfg.layout = "kubeadm".into();
    cfg.root = Some(root.to_path_buf());
    cfg.destination_yaml = destination_yaml;
    cfg.retry_attempts = 3;
    cfg.retry_initial_delay = "1s".into();
    std::fs::create_dir_all(config_dir).unwrap();
    let run = backup(&cfg.write(config_dir));
    let case = format!("{step:?} into {}", store.display());
    let Some(step) = step else {
        run.assert_code(0);
        assert_eq!(complete_sets(store).len(), 1, "{case}");
        assert_eq!(
            files_below(store).len(),
            3,
            "{case}: {:?}",
            files_below(store)
        );
        return;
    };
    run.assert_code(1);
    let error = run
        .stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("{case}: no error line:\n{}", run.stderr));
    let (file, stage) = expected(step);
    assert!(error.contains("may be full"), "{case}: {error}");
    assert!(error.contains(file), "{case}: wanted {file} in {error}");
    assert!(error.contains(stage), "{case}: wanted {stage} in {error}");
    assert!(
        !run.stderr.contains("retrying"),
        "{case}: a full disk was retried:\n{}",
        run.stderr
    );
    assert_eq!(
        run.stderr.matches("backup failed; removing").count(),
        1,
        "{case}: exactly one attempt:\n{}",
        run.stderr
    );
    // Nothing of the run: no file at all, and no set directory.
    assert_eq!(files_below(store), Vec::<String>::new(), "{case}");
    let node = store.join("test").join("master-0");
    let entries: Vec<_> = std::fs::read_dir(&node)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        entries.is_empty(),
        "{case}: {entries:?} left in {}",
        node.display()
    );
}

struct Fixture {
    etcd: EtcdServer,
    work: tempfile::TempDir,
    root: PathBuf,
    sizes: SetSizes,
}

async fn fixture() -> Fixture {
    let etcd = EtcdServer::start();
    fill_incompressible(&mut etcd.client().await, 2, 0x9E37_79B9_7F4A_7C15).await;
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("k8s");
    kubeadm_tree(&root);
    let sizes = measure(&etcd, &root, work.path());
    assert!(
        pages(sizes.snapshot) >= 64,
        "the snapshot must span many pages: {}",
        sizes.snapshot
    );
    Fixture {
        etcd,
        work,
        root,
        sizes,
    }
}

const STEPS: [Step; 3] = [Step::Snapshot, Step::Tarball, Step::Manifest];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_local_disk_at_each_step_fails_once_says_so_and_leaves_nothing() {
    let f = fixture().await;
    for step in STEPS {
        let fs = Tmpfs::mount(f.sizes.failing_at(step));
        let dir = f.work.path().join(format!("local-{step:?}"));
        run_into(&f.etcd, &f.root, &fs.path, None, Some(step), &dir);
    }
    // The control: one page more for the manifest and the same set fits.
    let fs = Tmpfs::mount(f.sizes.fitting());
    let dir = f.work.path().join("local-fits");
    run_into(&f.etcd, &f.root, &fs.path, None, None, &dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sftp_server_disk_at_each_step_fails_once_says_so_and_leaves_nothing() {
    let f = fixture().await;
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        ..SshOptions::default()
    });
    let cases = STEPS
        .iter()
        .map(|s| (Some(*s), f.sizes.failing_at(*s)))
        .chain([(None, f.sizes.fitting())]);
    for (i, (step, size)) in cases.enumerate() {
        let store = sshd.sftp_root.join(format!("backups{i}"));
        std::fs::create_dir(&store).unwrap();
        let fs = Tmpfs::mount_at(&store, size);
        let yaml = sshd_destination_yaml(&sshd, &key, &store);
        let dir = f.work.path().join(format!("sftp-{i}"));
        run_into(&f.etcd, &f.root, &fs.path, Some(yaml), step, &dir);
        drop(fs);
    }
}
