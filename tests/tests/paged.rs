//! Paged snapshot sets (`snapshot_format: paged`) end to end, with real etcd,
//! etcdctl, sshd and Garage: sets on a local directory, over SFTP and on S3,
//! plain and with zstd and age, rebuild byte for byte the snapshot their
//! manifest describes: on etcd 3.4 the very bytes `etcdctl snapshot save`
//! gives at that moment (on 3.5, whose snapshots never repeat, one of the
//! same revision and keys); they restore to the keyspace backed up, each
//! later set adding only the pages that changed; a run
//! killed while it writes packs leaves no complete set naming a missing
//! pack; manifests and page indexes naming packs outside the node's packs
//! are refused; clusters with different page id keys share no page ids;
//! several destinations each get their own packs from one read of etcd.
//! scripts/test runs the round trips again with etcd 3.5.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use etcd_backup_proto::{FileKind, Manifest, ManifestPages};
use etcd_backup_tests::agent::{
    backup, finish_backup, run_agent, spawn_backup, AgentConfig, AgentRun,
};
use etcd_backup_tests::etcd::{
    dump, fill_incompressible, restore_and_start, slow_etcd, snapshot_rpcs, snapshot_status,
    write_history, EtcdServer, EtcdVersion,
};
use etcd_backup_tests::fixtures::openshift_tree;
use etcd_backup_tests::garage::{GarageCluster, Rclone};
use etcd_backup_tests::s3_setup::garage_destination_yaml;
use etcd_backup_tests::sftp_setup::sshd_destination_yaml;
use etcd_backup_tests::sshd::{ClientKey, KeyKind, SshOptions, SshServer};
use etcd_backup_tests::{
    assert_cluster_restore_dir, complete_sets, destinations_yaml, files_below, free_port,
    require_tool, wait_for,
};

/// The index header (magic, page size, record length) and record length.
const INDEX_HEADER: usize = 14;
const RECORD: usize = 34;

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An age key pair made by the reference `age-keygen`.
struct AgeKey {
    identity: PathBuf,
    public: String,
}

fn age_keygen(dir: &Path) -> AgeKey {
    require_tool("age-keygen", "age");
    let identity = dir.join("age-identity.txt");
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&identity)
        .output()
        .expect("run age-keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("age-keygen")
        .arg("-y")
        .arg(&identity)
        .output()
        .expect("run age-keygen -y");
    assert!(out.status.success());
    AgeKey {
        identity,
        public: String::from_utf8(out.stdout).unwrap().trim().to_string(),
    }
}

/// A page id key file of 32 random-looking bytes, base64 as the docs say.
fn page_id_key(dir: &Path, name: &str, seed: u8) -> PathBuf {
    let p = dir.join(name);
    let material: String = (0..44u8)
        .map(|i| char::from(b'A' + (i.wrapping_mul(7).wrapping_add(seed) % 26)))
        .collect();
    std::fs::write(&p, format!("{material}\n")).unwrap();
    p
}

/// How a config stores its pages.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Flavor {
    /// Neither compressed nor encrypted.
    Plain,
    /// `compression: zstd`, `encryption:` to an age recipient, with an
    /// identity file and a page id key file.
    Sealed,
}

/// The top-level YAML a paged config of `flavor` adds.
fn paged_yaml(flavor: Flavor, age: &AgeKey, key_file: &Path) -> String {
    match flavor {
        Flavor::Plain => "snapshot_format: paged\n".into(),
        Flavor::Sealed => format!(
            "snapshot_format: paged\ncompression: zstd\nencryption:\n  recipients: [\"{}\"]\n  identity_file: {}\n  page_id_key_file: {}\n",
            age.public,
            age.identity.display(),
            key_file.display()
        ),
    }
}

/// Where a config's sets are, read back without the agent: a directory
/// (a local destination, or an sshd's SFTP root) or a Garage bucket prefix
/// read with rclone.
enum Store {
    Dir(PathBuf),
    Garage {
        rclone: Rclone,
        bucket: String,
        prefix: String,
    },
}

impl Store {
    /// The complete sets, `<cluster>/<node>/<ts>`, oldest first.
    fn sets(&self) -> Vec<String> {
        let mut sets = match self {
            Store::Dir(d) => complete_sets(d),
            Store::Garage {
                rclone,
                bucket,
                prefix,
            } => etcd_backup_tests::s3_setup::complete_sets_in(&rclone.list(bucket, prefix)),
        };
        sets.sort();
        sets
    }

    /// A stored file's bytes, by its path below the destination's root.
    fn read(&self, path: &str) -> Vec<u8> {
        match self {
            Store::Dir(d) => std::fs::read(d.join(path))
                .unwrap_or_else(|e| panic!("read {}: {e}", d.join(path).display())),
            Store::Garage {
                rclone,
                bucket,
                prefix,
            } => rclone.cat(bucket, &format!("{prefix}/{path}")),
        }
    }

    /// The files below `dir` (relative to the destination's root).
    fn files(&self, dir: &str) -> Vec<String> {
        match self {
            Store::Dir(d) => files_below(&d.join(dir)),
            Store::Garage {
                rclone,
                bucket,
                prefix,
            } => rclone.list(bucket, &format!("{prefix}/{dir}")),
        }
    }

    fn manifest(&self, set: &str) -> Manifest {
        serde_json::from_slice(&self.read(&format!("{set}/manifest.json"))).unwrap()
    }
}

fn pages_of(m: &Manifest) -> &ManifestPages {
    m.file(FileKind::Snapshot)
        .unwrap()
        .pages
        .as_deref()
        .expect("a paged set's snapshot entry has pages")
}

/// `etcd-backup-agent <command> --config <config> <args…>`.
fn agent(config: &Path, command: &str, args: &[&str]) -> AgentRun {
    let mut all = vec![command, "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    run_agent(&all)
}

/// What `etcdctl snapshot save` wrote: the file, digest trailer and all.
struct Saved {
    path: PathBuf,
    bytes: Vec<u8>,
}

/// `etcdctl snapshot save` of `etcd` now, into `dir`.
fn etcdctl_snapshot(etcd: &EtcdServer, dir: &Path) -> Saved {
    let path = dir.join(format!("etcdctl-{}.db", free_port()));
    let out = etcd.etcdctl(&["snapshot", "save", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&path).unwrap();
    Saved { path, bytes }
}

/// Whether two snapshots of an etcd nobody writes to are the same bytes:
/// etcd 3.4 commits nothing for a snapshot, so they are; etcd 3.5 commits
/// its consistent index for each one (a new bbolt transaction, so other
/// meta pages), so they never are.
fn snapshots_repeat() -> bool {
    EtcdVersion::from_env() == EtcdVersion::V3_4
}

/// Asserts that the snapshot file `rebuilt` is the one etcdctl `saved` at
/// the same moment: the very bytes where snapshots repeat, else the same
/// revision and keys (etcdctl's `snapshot status` of each); and that its
/// trailer is etcd's digest of the rest.
fn assert_same_snapshot(label: &str, rebuilt: &Path, saved: &Saved) {
    let bytes = std::fs::read(rebuilt).unwrap();
    let (db, trailer) = bytes.split_at(bytes.len() - 32);
    assert_eq!(trailer, &Sha256::digest(db)[..], "{label}: etcd's digest");
    if snapshots_repeat() {
        assert!(
            bytes == saved.bytes,
            "{label}: the rebuilt snapshot differs from etcdctl's"
        );
    } else {
        let (ours, theirs) = (snapshot_status(rebuilt), snapshot_status(&saved.path));
        for field in ["revision", "totalKey"] {
            assert_eq!(ours[field], theirs[field], "{label}: {field}");
        }
    }
}

/// The page ids of a page index: zstd-decompressed, after the header, the
/// first 16 bytes of each record.
fn index_ids(index: &[u8], dir: &Path) -> Vec<[u8; 16]> {
    let raw = unzstd(index, dir);
    assert_eq!(&raw[..8], b"EBAPIDX1");
    assert_eq!((raw.len() - INDEX_HEADER) % RECORD, 0);
    raw[INDEX_HEADER..]
        .chunks(RECORD)
        .map(|r| r[..16].try_into().unwrap())
        .collect()
}

/// `zstd -d` of `bytes` with the real zstd tool.
fn unzstd(bytes: &[u8], dir: &Path) -> Vec<u8> {
    zstd_tool(&["-d", "-q", "-c"], bytes, dir)
}

fn zstd_tool(args: &[&str], bytes: &[u8], dir: &Path) -> Vec<u8> {
    require_tool("zstd", "zstd");
    let input = dir.join(format!("zstd-in-{}", free_port()));
    std::fs::write(&input, bytes).unwrap();
    let out = Command::new("zstd")
        .args(args)
        .arg(&input)
        .output()
        .expect("run zstd");
    std::fs::remove_file(&input).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Writes between backups as a control plane does: new keys, updates,
/// deletions, then the API server's compaction (physical, so etcd has
/// finished writing when it returns).
async fn churn(etcd: &EtcdServer, round: usize) {
    let mut client = etcd.client().await;
    for i in 0..60 {
        client
            .put(
                format!("/registry/pods/default/p{round}-{i:03}"),
                format!("status-{round}-{i}-{}", "s".repeat(i * 7)),
                None,
            )
            .await
            .unwrap();
    }
    for i in (0..800).step_by(37) {
        client
            .put(
                format!("/registry/configmaps/default/{i:05}"),
                format!("updated-in-{round}"),
                None,
            )
            .await
            .unwrap();
    }
    for i in (round..800).step_by(53) {
        client
            .delete(format!("/registry/configmaps/default/{i:05}"), None)
            .await
            .unwrap();
    }
    let rev = client
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let out = etcd.etcdctl(&["compaction", "--physical", &rev.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The data the round trips start from: history, and 2 MiB of values that
/// do not change (overflow pages a later set references).
async fn seed(etcd: &EtcdServer) {
    let mut client = etcd.client().await;
    write_history(&mut client, "/registry/configmaps/default", 800).await;
    fill_incompressible(&mut client, 2, 0x9E37_79B9_7F4A_7C15).await;
}

/// One config of a round trip: its label, config file, flavor and store.
struct Leg {
    label: String,
    config: PathBuf,
    flavor: Flavor,
    store: Store,
    sets: Vec<String>,
}

/// Three paged backups of `etcd` by each leg, with churn between them.
/// After each: the set's manifest describes exactly the bytes etcdctl
/// saves at that moment (on etcd 3.4; see [`snapshots_repeat`]); `fetch`
/// rebuilds them byte for byte (a
/// cluster-restore.sh directory with the tarball); etcdctl accepts the
/// file, and it restores to the keyspace backed up; `verify` and
/// `verify --full` pass. Later sets compare with the set before and add
/// few pages.
async fn round_trips(etcd: &EtcdServer, legs: &mut [Leg], work: &Path) {
    seed(etcd).await;
    let version = EtcdVersion::from_env();
    for round in 0..3 {
        if round > 0 {
            churn(etcd, round).await;
        }
        for leg in legs.iter() {
            let run = backup(&leg.config);
            run.assert_code(0);
        }
        // Nothing is written between the backups and this.
        let saved = etcdctl_snapshot(etcd, work);
        let keyspace = dump(&mut etcd.client().await).await;
        for leg in legs.iter_mut() {
            let label = format!("{} round {round}", leg.label);
            let sets = leg.store.sets();
            assert_eq!(sets.len(), round + 1, "{label}: {sets:?}");
            let set = sets.last().unwrap().clone();
            let m = leg.store.manifest(&set);
            let ts = m.timestamp.to_string();
            let snap = m.file(FileKind::Snapshot).unwrap();
            let pages = pages_of(&m);
            println!(
                "{label}: pages {} new_pages {} added_bytes {} packs {} (snapshot {} bytes)",
                pages.pages,
                pages.new_pages,
                pages.added_bytes,
                pages.packs.len(),
                snap.size
            );
            // The manifest describes the snapshot etcdctl saves right now.
            if snapshots_repeat() {
                assert_eq!(snap.size, saved.bytes.len() as u64, "{label}");
                assert_eq!(snap.sha256, sha256_hex(&saved.bytes), "{label}");
            }
            assert_eq!(
                pages.pages * u64::from(pages.page_size) + pages.tail.len() as u64 / 2,
                snap.size,
                "{label}"
            );
            assert_eq!(pages.page_size, 4096, "{label}");
            assert_eq!(
                pages.page_ids == etcd_backup_proto::PageIds::HmacSha256,
                leg.flavor == Flavor::Sealed,
                "{label}"
            );
            // The set directory holds the index, never the snapshot.
            let stored = leg.store.files(&set);
            assert!(
                stored.contains(&m.timestamp.page_index_file_name()),
                "{label}: {stored:?}"
            );
            assert!(
                !stored.iter().any(|f| f.starts_with("snapshot_")),
                "{label}: {stored:?}"
            );
            // Every pack it names is stored, at its size, named by its
            // checksum; sealed packs hold age files.
            let packs_dir = format!("{}/packs", set.rsplit_once('/').unwrap().0);
            for p in &pages.packs {
                let bytes = leg.store.read(&format!("{packs_dir}/{}", p.name));
                assert_eq!(bytes.len() as u64, p.size, "{label}: {}", p.name);
                assert_eq!(format!("{}.pack", sha256_hex(&bytes)), p.name, "{label}");
                assert_eq!(
                    bytes.starts_with(b"age-encryption.org/v1\n"),
                    leg.flavor == Flavor::Sealed,
                    "{label}: {}",
                    p.name
                );
            }
            // Nothing else is left there: no partial or staged pack.
            let leftovers: Vec<String> = leg
                .store
                .files(&packs_dir)
                .into_iter()
                .filter(|f| !etcd_backup_proto::is_pack_name(f))
                .collect();
            assert!(leftovers.is_empty(), "{label}: {leftovers:?}");
            if round == 0 {
                assert_eq!(pages.new_pages, pages.pages, "{label}");
                assert_eq!(pages.compared_with, None, "{label}");
            } else {
                let before = leg.store.manifest(&leg.sets[round - 1]);
                assert_eq!(pages.compared_with, Some(before.timestamp), "{label}");
                // How many pages a round rewrites depends on where bbolt
                // put its writes and its freelist (119 to 152 of about 700
                // pages seen here): well under half, when every page an
                // older set holds at its position is referenced.
                assert!(
                    pages.new_pages > 0 && pages.new_pages * 2 < pages.pages,
                    "{label}: {} new pages of {}",
                    pages.new_pages,
                    pages.pages
                );
                let first_manifest = leg.store.manifest(&leg.sets[0]);
                let first = pages_of(&first_manifest);
                assert!(
                    pages.added_bytes * 3 < first.added_bytes,
                    "{label}: added {} bytes, the first set {}",
                    pages.added_bytes,
                    first.added_bytes
                );
            }

            // fetch: the snapshot rebuilt byte for byte, with the tarball.
            let out = work.join(format!("fetched-{}-{round}", leg.label));
            let run = agent(&leg.config, "fetch", &[&ts, "--to", out.to_str().unwrap()]);
            run.assert_code(0);
            assert_cluster_restore_dir(&run.stdout, &out, &m.timestamp);
            let file = out.join(m.timestamp.snapshot_file_name());
            let fetched = std::fs::read(&file).unwrap();
            assert_eq!(sha256_hex(&fetched), snap.sha256, "{label}");
            assert_eq!(
                pages.tail,
                hex::encode(&fetched[fetched.len() - 32..]),
                "{label}"
            );
            assert_same_snapshot(&label, &file, &saved);
            let st = snapshot_status(&file);
            let recorded = m.snapshot_status.expect("a snapshot status");
            assert_eq!(
                st["hash"].as_u64().unwrap(),
                u64::from(recorded.hash),
                "{label}"
            );
            assert_eq!(
                st["revision"].as_i64().unwrap(),
                recorded.revision,
                "{label}"
            );

            // It restores (the real etcdctl) to the keyspace backed up.
            let restored = restore_and_start(&file, &out);
            let after = dump(&mut restored.client().await).await;
            assert!(after == keyspace, "{label}: the restored keyspace differs");
            drop(restored);

            for args in [vec![ts.as_str()], vec![ts.as_str(), "--full"]] {
                let run = agent(&leg.config, "verify", &args);
                run.assert_code(0);
            }
            leg.sets.push(set);
        }
    }

    // The agent's restore reads the newest set straight from its pages.
    for leg in legs.iter() {
        let set = leg.sets.last().unwrap();
        let data_dir = work.join(format!("agent-restore-{}", leg.label));
        let peer_port = free_port();
        let peer = format!("http://127.0.0.1:{peer_port}");
        let cluster = format!("m0={peer}");
        let mut args = vec![
            set.as_str(),
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--name",
            "m0",
            "--initial-cluster",
            &cluster,
            "--initial-advertise-peer-urls",
            &peer,
        ];
        args.extend_from_slice(version.restore_args());
        agent(&leg.config, "restore", &args).assert_code(0);
        let restored = EtcdServer::start_version_on(version, data_dir, "m0", peer_port);
        let after = dump(&mut restored.client().await).await;
        assert!(
            after == dump(&mut etcd.client().await).await,
            "{}: the agent's restore differs",
            leg.label
        );
    }
    // Every set still verifies in full once newer ones reference its packs.
    for leg in legs.iter() {
        for set in &leg.sets {
            agent(&leg.config, "verify", &[set, "--full"]).assert_code(0);
        }
    }
}

/// A config of `flavor` backing up `etcd` with an OpenShift tree, to
/// `destination_yaml` (a local directory `local` when `None`).
fn leg_config(
    etcd: &EtcdServer,
    work: &Path,
    label: &str,
    flavor: Flavor,
    destination_yaml: Option<String>,
    local: &Path,
) -> PathBuf {
    let dir = work.join(format!("config-{label}"));
    std::fs::create_dir_all(&dir).unwrap();
    let root = dir.join("etc-kubernetes");
    std::fs::create_dir_all(&root).unwrap();
    openshift_tree(&root);
    let age = age_keygen(&dir);
    let key = page_id_key(&dir, "page-id.key", 1);
    let mut cfg = AgentConfig::new(etcd, local);
    cfg.layout = "openshift".into();
    cfg.root = Some(root);
    cfg.destination_yaml = destination_yaml;
    cfg.extra = paged_yaml(flavor, &age, &key);
    cfg.write(&dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn paged_round_trips_on_a_local_destination_plain_and_compressed_encrypted() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let mut legs: Vec<Leg> = [Flavor::Plain, Flavor::Sealed]
        .into_iter()
        .map(|flavor| {
            let label = format!("local-{flavor:?}").to_lowercase();
            let dest = work.path().join(format!("backups-{label}"));
            Leg {
                config: leg_config(&etcd, work.path(), &label, flavor, None, &dest),
                label,
                flavor,
                store: Store::Dir(dest),
                sets: Vec::new(),
            }
        })
        .collect();
    round_trips(&etcd, &mut legs, work.path()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn paged_round_trips_over_sftp_plain_and_compressed_encrypted() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        ..SshOptions::default()
    });
    let mut legs: Vec<Leg> = [Flavor::Plain, Flavor::Sealed]
        .into_iter()
        .map(|flavor| {
            let label = format!("sftp-{flavor:?}").to_lowercase();
            let base = sshd.sftp_root.join(&label);
            let yaml = sshd_destination_yaml(&sshd, &key, &base);
            Leg {
                config: leg_config(&etcd, work.path(), &label, flavor, Some(yaml), &base),
                label,
                flavor,
                store: Store::Dir(base),
                sets: Vec::new(),
            }
        })
        .collect();
    round_trips(&etcd, &mut legs, work.path()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn paged_round_trips_on_garage_plain_and_compressed_encrypted() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let garage = GarageCluster::start(3);
    let mut legs: Vec<Leg> = [Flavor::Plain, Flavor::Sealed]
        .into_iter()
        .map(|flavor| {
            let label = format!("s3-{flavor:?}").to_lowercase();
            let yaml = garage_destination_yaml(&garage, &label);
            Leg {
                config: leg_config(
                    &etcd,
                    work.path(),
                    &label,
                    flavor,
                    Some(yaml),
                    &work.path().join("unused"),
                ),
                flavor,
                store: Store::Garage {
                    rclone: garage.rclone(),
                    bucket: garage.bucket.clone(),
                    prefix: label.clone(),
                },
                label,
                sets: Vec::new(),
            }
        })
        .collect();
    round_trips(&etcd, &mut legs, work.path()).await;
}

/// The pack names below `<cluster>/<node>/packs` of a directory store that
/// are complete packs (not `.partial`).
fn stored_packs(dest: &Path, node_dir: &str) -> Vec<String> {
    files_below(&dest.join(node_dir).join("packs"))
        .into_iter()
        .filter(|f| etcd_backup_proto::is_pack_name(f))
        .collect()
}

/// Asserts every complete set in `dest` names only packs that are stored,
/// and that `verify` and `verify --full` pass on it.
fn assert_every_set_whole(dest: &Path, config: &Path) {
    for set in complete_sets(dest) {
        let m: Manifest =
            serde_json::from_slice(&std::fs::read(dest.join(&set).join("manifest.json")).unwrap())
                .unwrap();
        let node_dir = set.rsplit_once('/').unwrap().0;
        let stored = stored_packs(dest, node_dir);
        for p in &pages_of(&m).packs {
            assert!(
                stored.contains(&p.name),
                "set {set} names pack {}, which is missing",
                p.name
            );
        }
        agent(config, "verify", &[&set]).assert_code(0);
        agent(config, "verify", &[&set, "--full"]).assert_code(0);
    }
}

/// A run SIGKILLed after it stored a new pack, mid-snapshot: it leaves no
/// complete set (none naming a pack that is not there), every set listed
/// still verifies, and the next run stores a set that rebuilds the
/// snapshot etcdctl saves.
#[tokio::test(flavor = "multi_thread")]
async fn a_paged_run_killed_while_writing_packs_leaves_only_whole_sets_and_the_next_run_succeeds() {
    // 24 MiB of values that do not compress, streamed at 8 MiB/s through
    // the relay: a run takes seconds.
    let (etcd, relay) = slow_etcd(24, 8 << 20).await;
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let age = age_keygen(work.path());
    let key = page_id_key(work.path(), "page-id.key", 3);
    let mut cfg = AgentConfig::new(&etcd, &dest);
    cfg.extra = paged_yaml(Flavor::Plain, &age, &key);
    let direct = cfg.write(work.path());
    backup(&direct).assert_code(0);
    let first = complete_sets(&dest);
    assert_eq!(first.len(), 1);
    let node_dir = "test/master-0";
    let packs_before = stored_packs(&dest, node_dir);

    // New values for every key: every page of the next run is new.
    fill_incompressible(&mut etcd.client().await, 24, 0x2545_F491_4F6C_DD1D).await;
    let slow_dir = work.path().join("slow");
    std::fs::create_dir_all(&slow_dir).unwrap();
    let mut slow = AgentConfig::for_endpoint(&relay.http_url(), None, &dest);
    slow.extra = cfg.extra.clone();
    slow.stall_timeout = "60s".into();
    let slow_config = slow.write(&slow_dir);
    let log = slow_dir.join("agent.log");
    let started = Instant::now();
    let mut child = spawn_backup(&slow_config, &log);
    let new_pack = wait_for(
        "a new pack stored mid-run",
        Duration::from_secs(120),
        || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the run ended ({status}) before a new pack was stored:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            stored_packs(&dest, node_dir)
                .into_iter()
                .find(|p| !packs_before.contains(p))
        },
    );
    child.kill().unwrap();
    let run = finish_backup(child, &log, started);
    assert_eq!(run.code, -1, "SIGKILLed:\n{}", run.stderr);
    println!("killed after pack {new_pack} was stored");
    assert!(
        run.stderr
            .lines()
            .all(|l| !l.contains("snapshot pages stored")),
        "the run was killed before its pages were all stored:\n{}",
        run.stderr
    );

    // Only the first set is complete; it and its packs are whole.
    assert_eq!(complete_sets(&dest), first, "{:?}", files_below(&dest));
    assert_every_set_whole(&dest, &direct);

    // The next run (a second later: sets are named by the second)
    // succeeds, and rebuilds exactly what etcdctl saves.
    std::thread::sleep(Duration::from_millis(1100));
    backup(&direct).assert_code(0);
    let sets = complete_sets(&dest);
    assert_eq!(sets.len(), 2, "{sets:?}");
    assert_every_set_whole(&dest, &direct);
    let saved = etcdctl_snapshot(&etcd, work.path());
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(dest.join(&sets[1]).join("manifest.json")).unwrap())
            .unwrap();
    let out = work.path().join("fetched");
    agent(
        &direct,
        "fetch",
        &[&sets[1], "--to", out.to_str().unwrap(), "--snapshot-only"],
    )
    .assert_code(0);
    let file = out.join(m.timestamp.snapshot_file_name());
    assert_eq!(
        sha256_hex(&std::fs::read(&file).unwrap()),
        m.file(FileKind::Snapshot).unwrap().sha256
    );
    assert_same_snapshot("after the kill", &file, &saved);
}

/// Runs `fetch` and `verify --full` (and `verify` unless `quick_too` is
/// false) of `set`: each must fail naming `why`, and fetch must leave no
/// snapshot behind.
fn assert_refused(config: &Path, set: &str, work: &Path, case: &str, why: &str, quick_too: bool) {
    let out = work.join(format!("fetched-{case}"));
    let run = agent(
        config,
        "fetch",
        &[set, "--to", out.to_str().unwrap(), "--snapshot-only"],
    );
    assert_ne!(run.code, 0, "{case}: fetch passed:\n{}", run.stdout);
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(said.contains(why), "{case}: fetch said:\n{said}");
    assert!(
        files_below(&out).is_empty(),
        "{case}: fetch left {:?}",
        files_below(&out)
    );
    let mut checks = vec![vec![set, "--full"]];
    if quick_too {
        checks.push(vec![set]);
    }
    for args in checks {
        let run = agent(config, "verify", &args);
        assert_ne!(
            run.code, 0,
            "{case}: verify {args:?} passed:\n{}",
            run.stdout
        );
        let said = format!("{}{}", run.stdout, run.stderr);
        assert!(said.contains(why), "{case}: verify {args:?} said:\n{said}");
    }
}

/// A manifest naming a pack outside the node's packs directory (a path
/// up and out, an absolute path, a name that is no pack name) is refused
/// by `fetch` and `verify` with the reason, even with a copy of the real
/// pack waiting there (it is never read); a page index naming a pack
/// beyond the manifest's list is refused with the reason.
#[tokio::test(flavor = "multi_thread")]
async fn manifests_and_page_indexes_naming_packs_outside_the_nodes_packs_are_refused() {
    let etcd = EtcdServer::start();
    seed(&etcd).await;
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let age = age_keygen(work.path());
    let key = page_id_key(work.path(), "page-id.key", 5);
    let mut cfg = AgentConfig::new(&etcd, &dest);
    cfg.extra = paged_yaml(Flavor::Plain, &age, &key);
    let config = cfg.write(work.path());
    backup(&config).assert_code(0);
    let set = complete_sets(&dest).pop().unwrap();
    let manifest_path = dest.join(&set).join("manifest.json");
    let original = std::fs::read_to_string(&manifest_path).unwrap();
    let m: Manifest = serde_json::from_str(&original).unwrap();
    let pages = pages_of(&m).clone();
    assert_eq!(pages.packs.len(), 1, "the fixture fits one pack");
    let pack = pages.packs[0].name.clone();
    let packs_dir = dest.join("test/master-0/packs");
    agent(&config, "verify", &[&set, "--full"]).assert_code(0);

    // The real pack moves out of the node's packs, to where each hostile
    // name points: only reading outside could rebuild the snapshot.
    let outside_rel = dest.join("test/other/packs");
    std::fs::create_dir_all(&outside_rel).unwrap();
    std::fs::rename(packs_dir.join(&pack), outside_rel.join(&pack)).unwrap();
    let absolute = work.path().join("elsewhere").join(&pack);
    std::fs::create_dir_all(absolute.parent().unwrap()).unwrap();
    std::fs::copy(outside_rel.join(&pack), &absolute).unwrap();
    let not_hex = format!("{}.pack", "g".repeat(64));
    std::fs::copy(outside_rel.join(&pack), packs_dir.join(&not_hex)).unwrap();
    let upper = format!("{}.pack", pack.trim_end_matches(".pack").to_uppercase());
    std::fs::copy(outside_rel.join(&pack), packs_dir.join(&upper)).unwrap();
    for (case, name) in [
        ("up-and-out", format!("../../other/packs/{pack}")),
        ("absolute", absolute.display().to_string()),
        ("not-hex", not_hex.clone()),
        ("upper-case", upper.clone()),
        ("no-suffix", pack.trim_end_matches(".pack").to_string()),
    ] {
        std::fs::write(&manifest_path, original.replace(&pack, &name)).unwrap();
        assert_refused(&config, &set, work.path(), case, "not a pack name", true);
    }
    std::fs::write(&manifest_path, &original).unwrap();
    std::fs::rename(outside_rel.join(&pack), packs_dir.join(&pack)).unwrap();
    agent(&config, "verify", &[&set, "--full"]).assert_code(0);

    // A page index whose record names pack #7 of a one-pack manifest (the
    // manifest's checksum of the index updated to match).
    let index_path = dest.join(&set).join(&pages.index.name);
    let stored_index = std::fs::read(&index_path).unwrap();
    let mut raw = unzstd(&stored_index, work.path());
    let at = INDEX_HEADER + 5 * RECORD + 16;
    raw[at..at + 4].copy_from_slice(&7u32.to_le_bytes());
    let hostile = zstd_tool(&["-q", "-c"], &raw, work.path());
    std::fs::write(&index_path, &hostile).unwrap();
    let mut m2: serde_json::Value = serde_json::from_str(&original).unwrap();
    let entry = m2["files"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|f| f["pages"].is_object())
        .unwrap();
    entry["pages"]["index"]["size"] = serde_json::json!(hostile.len());
    entry["pages"]["index"]["sha256"] = serde_json::json!(sha256_hex(&hostile));
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&m2).unwrap()).unwrap();
    assert_refused(
        &config,
        &set,
        work.path(),
        "index-pack-7",
        "names pack #7, but the manifest lists 1 packs",
        true,
    );
}

/// Two clusters with different page id keys backing up identical data:
/// not one page id in common (the store cannot tell their pages are the
/// same), while the snapshots are the very same bytes.
#[tokio::test(flavor = "multi_thread")]
async fn two_clusters_with_different_page_id_keys_share_no_page_ids_for_identical_data() {
    let etcd = EtcdServer::start();
    seed(&etcd).await;
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let age = age_keygen(work.path());
    let mut ids = Vec::new();
    let mut shas = Vec::new();
    let mut fingerprints = Vec::new();
    for (cluster, seed) in [("alpha", 11u8), ("beta", 12u8)] {
        let dir = work.path().join(cluster);
        std::fs::create_dir_all(&dir).unwrap();
        let key = page_id_key(&dir, "page-id.key", seed);
        let mut cfg = AgentConfig::new(&etcd, &dest);
        cfg.cluster_name = cluster.into();
        cfg.extra = paged_yaml(Flavor::Sealed, &age, &key);
        backup(&cfg.write(&dir)).assert_code(0);
        let set = complete_sets(&dest.join(cluster)).pop().unwrap();
        let set_dir = dest.join(cluster).join(set);
        let m: Manifest =
            serde_json::from_slice(&std::fs::read(set_dir.join("manifest.json")).unwrap()).unwrap();
        let pages = pages_of(&m);
        assert_eq!(pages.page_ids, etcd_backup_proto::PageIds::HmacSha256);
        fingerprints.push(pages.page_id_key.clone().expect("a key fingerprint"));
        let index = std::fs::read(set_dir.join(&pages.index.name)).unwrap();
        let these = index_ids(&index, work.path());
        assert_eq!(these.len() as u64, pages.pages);
        assert!(these.len() > 500, "{} pages", these.len());
        ids.push(these.into_iter().collect::<HashSet<_>>());
        shas.push(m.file(FileKind::Snapshot).unwrap().sha256.clone());
    }
    assert_eq!(shas[0], shas[1], "the two backups saw the same bytes");
    assert_ne!(fingerprints[0], fingerprints[1]);
    let shared = ids[0].intersection(&ids[1]).count();
    assert_eq!(shared, 0, "{shared} page ids in common");
}

/// Two destinations at once (a local directory and an sshd): one read of
/// etcd per run; each destination compares with its own sets and holds
/// its own packs, so one added in the second run stores every page while
/// the other adds few; both sets rebuild the same snapshot and verify.
#[tokio::test(flavor = "multi_thread")]
async fn several_destinations_each_get_their_own_packs_from_one_read_of_etcd() {
    let etcd = EtcdServer::start();
    seed(&etcd).await;
    let work = tempfile::tempdir().unwrap();
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        ..SshOptions::default()
    });
    let local = work.path().join("local");
    let remote = sshd.sftp_root.join("backups");
    let local_yaml = format!("destination:\n  local:\n    path: {}\n", local.display());
    let remote_yaml = sshd_destination_yaml(&sshd, &key, &remote);
    let age = age_keygen(work.path());
    let page_key = page_id_key(work.path(), "page-id.key", 7);
    let config = |entries: &[(&str, String)], name: &str| {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = AgentConfig::new(&etcd, &local);
        cfg.destination_yaml = Some(destinations_yaml(entries));
        cfg.extra = paged_yaml(Flavor::Sealed, &age, &page_key);
        cfg.write(&dir)
    };
    let one = config(&[("near", local_yaml.clone())], "one");
    let both = config(&[("near", local_yaml), ("far", remote_yaml)], "both");

    backup(&one).assert_code(0);
    churn(&etcd, 1).await;
    std::thread::sleep(Duration::from_millis(1100));
    let reads = snapshot_rpcs(&etcd).await;
    backup(&both).assert_code(0);
    assert_eq!(snapshot_rpcs(&etcd).await, reads + 1.0, "one read of etcd");
    let saved = etcdctl_snapshot(&etcd, work.path());

    let near_sets = complete_sets(&local);
    let far_sets = complete_sets(&remote);
    assert_eq!(near_sets.len(), 2, "{near_sets:?}");
    assert_eq!(far_sets.len(), 1, "{far_sets:?}");
    assert_eq!(near_sets[1], far_sets[0]);
    let set = far_sets[0].clone();
    let read = |d: &Path, s: &str| -> Manifest {
        serde_json::from_slice(&std::fs::read(d.join(s).join("manifest.json")).unwrap()).unwrap()
    };
    let (near, far) = (read(&local, &set), read(&remote, &set));
    let (np, fp) = (pages_of(&near), pages_of(&far));
    println!(
        "near: pages {} new_pages {} added_bytes {}; far: pages {} new_pages {} added_bytes {}",
        np.pages, np.new_pages, np.added_bytes, fp.pages, fp.new_pages, fp.added_bytes
    );
    assert_eq!(
        np.compared_with,
        Some(read(&local, &near_sets[0]).timestamp)
    );
    assert_eq!(fp.compared_with, None);
    assert_eq!(fp.new_pages, fp.pages);
    assert!(
        np.new_pages * 2 < np.pages,
        "{} of {}",
        np.new_pages,
        np.pages
    );
    for (m, dir) in [(&near, &local), (&far, &remote)] {
        assert_eq!(
            m.file(FileKind::Snapshot).unwrap().sha256,
            near.file(FileKind::Snapshot).unwrap().sha256
        );
        let stored = stored_packs(dir, "test/master-0");
        for p in &pages_of(m).packs {
            assert!(
                stored.contains(&p.name),
                "{} missing in {}",
                p.name,
                dir.display()
            );
        }
    }
    // The far destination's packs are its own: every one it names is there.
    let far_packs: HashSet<_> = fp.packs.iter().map(|p| p.name.clone()).collect();
    assert_eq!(
        stored_packs(&remote, "test/master-0")
            .into_iter()
            .collect::<HashSet<_>>(),
        far_packs
    );
    for name in ["near", "far"] {
        agent(&both, "verify", &[&set, "--full", "--destination", name]).assert_code(0);
        let out = work.path().join(format!("fetched-{name}"));
        agent(
            &both,
            "fetch",
            &[
                &set,
                "--destination",
                name,
                "--to",
                out.to_str().unwrap(),
                "--snapshot-only",
            ],
        )
        .assert_code(0);
        let file = out.join(near.timestamp.snapshot_file_name());
        assert_eq!(
            sha256_hex(&std::fs::read(&file).unwrap()),
            near.file(FileKind::Snapshot).unwrap().sha256
        );
        assert_same_snapshot(name, &file, &saved);
    }
}
