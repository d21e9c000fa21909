//! No lock-in for paged sets (`snapshot_format: paged`): `scripts/reassemble`
//! (Python's standard library and the reference `zstd` and `age` tools, no
//! agent) rebuilds the snapshot of each set the real agent stored in a local
//! destination, from the set's page index and the node's packs, byte for byte
//! what the agent's own `fetch` writes; plain, and compressed and encrypted
//! with keyed page ids. A changed byte in a pack, a pack name that is a path,
//! and an encrypted set without an identity are refused, leaving no output.
//! `scripts/page-diff`, the bench's count of pages new by content, is
//! checked on crafted bbolt-shaped files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

use etcd_backup_proto::{FileKind, Manifest, ManifestPages};
use etcd_backup_tests::agent::{backup, run_agent, AgentConfig};
use etcd_backup_tests::etcd::{fill_incompressible, write_history, EtcdServer};
use etcd_backup_tests::{complete_sets, files_below, require_tool};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/reassemble")
}

/// `scripts/reassemble SET_DIR OUT_FILE [--identity FILE]`.
fn reassemble(set_dir: &Path, out: &Path, identity: Option<&Path>) -> Output {
    require_tool("python3", "python3");
    require_tool("zstd", "zstd");
    let mut cmd = Command::new(script());
    cmd.arg(set_dir).arg(out);
    if let Some(id) = identity {
        cmd.arg("--identity").arg(id);
    }
    cmd.output().expect("run scripts/reassemble")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

fn pages(manifest: &Manifest) -> &ManifestPages {
    manifest
        .file(FileKind::Snapshot)
        .and_then(|f| f.pages.as_deref())
        .expect("a paged snapshot entry")
}

/// An age identity file and its public key, made by the reference `age-keygen`.
fn age_keygen(dir: &Path) -> (PathBuf, String) {
    require_tool("age-keygen", "age");
    let identity = dir.join("age-identity.txt");
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&identity)
        .output()
        .expect("run age-keygen");
    assert!(out.status.success(), "{}", text(&out));
    let out = Command::new("age-keygen")
        .arg("-y")
        .arg(&identity)
        .output()
        .expect("run age-keygen -y");
    assert!(out.status.success(), "{}", text(&out));
    (
        identity,
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
    )
}

/// Two paged sets of a real etcd (keys written between them) in a local
/// destination, the agent configured with `extra`; each rebuilt by the
/// script and fetched by the agent, which must agree byte for byte. Returns
/// the destination and the sets' directories and manifests, oldest first.
async fn two_sets_rebuilt_as_fetch_does(
    work: &Path,
    extra: &str,
    identity: Option<&Path>,
) -> (EtcdServer, Vec<(PathBuf, Manifest)>) {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    write_history(&mut client, "/registry/pods/default", 300).await;
    // 3 MiB of values in overflow pages: several segments of 256 pages.
    fill_incompressible(&mut client, 3, 7).await;
    let dest = work.join("backups");
    let mut cfg = AgentConfig::new(&etcd, &dest);
    cfg.extra = format!("snapshot_format: paged\n{extra}");
    let config = cfg.write(work);
    backup(&config).assert_code(0);
    write_history(&mut client, "/registry/leases/kube-node-lease", 120).await;
    // Sets are named by the second their run started.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    backup(&config).assert_code(0);

    let mut sets: Vec<(PathBuf, Manifest)> = complete_sets(&dest)
        .into_iter()
        .map(|s| {
            let dir = dest.join(s);
            let m =
                serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
            (dir, m)
        })
        .collect();
    sets.sort_by_key(|(_, m)| m.timestamp);
    assert_eq!(sets.len(), 2, "{:?}", files_below(&dest));
    let (first, second) = (pages(&sets[0].1), pages(&sets[1].1));
    assert_eq!(sets[1].1.format_version, 4);
    assert_eq!(second.compared_with, Some(sets[0].1.timestamp));
    assert!(
        second.new_pages < second.pages && first.pages > 256,
        "the second set must reference pages of the first, in several segments: {first:?} {second:?}"
    );
    assert!(
        second.packs.iter().any(|p| first.packs.contains(p)),
        "the second set names none of the first set's packs: {second:?}"
    );

    for (i, (set_dir, manifest)) in sets.iter().enumerate() {
        let ts = manifest.timestamp.to_string();
        let fetched = work.join(format!("fetched-{i}"));
        let mut args = vec![
            "fetch",
            "--config",
            config.to_str().unwrap(),
            &ts,
            "--to",
            fetched.to_str().unwrap(),
            "--snapshot-only",
        ];
        if let Some(id) = identity {
            args.extend(["--identity", id.to_str().unwrap()]);
        }
        run_agent(&args).assert_code(0);
        let by_agent = fetched.join(manifest.timestamp.snapshot_file_name());

        let out = work.join(format!("rebuilt-{i}.db"));
        let run = reassemble(set_dir, &out, identity);
        assert_eq!(run.status.code(), Some(0), "{}", text(&run));
        let entry = manifest.file(FileKind::Snapshot).unwrap();
        assert_eq!(sha256_file(&out), sha256_file(&by_agent), "set {ts}");
        assert_eq!(sha256_file(&out), entry.sha256, "set {ts}");
        assert_eq!(std::fs::metadata(&out).unwrap().len(), entry.size);
        assert!(!work.join(format!("rebuilt-{i}.db.partial")).exists());
    }
    (etcd, sets)
}

/// Flips the middle byte of the first set's first pack (every byte of it
/// belongs to a page of that set): the script must exit 1 naming the pack,
/// and leave neither the output nor its partial.
fn damaged_pack_is_named(work: &Path, sets: &[(PathBuf, Manifest)], identity: Option<&Path>) {
    let (set_dir, manifest) = &sets[0];
    let name = &pages(manifest).packs[0].name;
    let pack = set_dir.parent().unwrap().join("packs").join(name);
    let mut bytes = std::fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&pack, &bytes).unwrap();
    let out = work.join("damaged.db");
    let run = reassemble(set_dir, &out, identity);
    assert_eq!(run.status.code(), Some(1), "{}", text(&run));
    assert!(
        String::from_utf8_lossy(&run.stderr).contains(&format!("pack {name}")),
        "{}",
        text(&run)
    );
    assert!(!out.exists() && !work.join("damaged.db.partial").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn reassemble_rebuilds_plain_paged_sets_as_fetch_does_and_names_a_damaged_pack() {
    let work = tempfile::tempdir().unwrap();
    let (_etcd, sets) = two_sets_rebuilt_as_fetch_does(work.path(), "", None).await;
    assert!(sets[0].1.compression.is_none() && sets[0].1.encryption.is_none());

    // A manifest that names a path for a pack is refused before any read.
    let (set_dir, manifest) = &sets[1];
    let hostile = set_dir.parent().unwrap().join("2000-01-01_000000");
    std::fs::create_dir(&hostile).unwrap();
    let mut m = serde_json::to_value(manifest).unwrap();
    m["timestamp"] = "2000-01-01_000000".into();
    m["files"][0]["name"] = "snapshot_2000-01-01_000000.db".into();
    let index = pages(manifest).index.name.clone();
    m["files"][0]["pages"]["index"]["name"] = "pages_2000-01-01_000000.idx".into();
    m["files"][0]["pages"]["packs"][0]["name"] = "../../../outside.pack".into();
    std::fs::copy(
        set_dir.join(&index),
        hostile.join("pages_2000-01-01_000000.idx"),
    )
    .unwrap();
    std::fs::write(hostile.join("manifest.json"), m.to_string()).unwrap();
    let out = work.path().join("hostile.db");
    let run = reassemble(&hostile, &out, None);
    assert_eq!(run.status.code(), Some(1), "{}", text(&run));
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("not a pack name"),
        "{}",
        text(&run)
    );
    assert!(!out.exists());

    damaged_pack_is_named(work.path(), &sets, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn reassemble_rebuilds_compressed_encrypted_paged_sets_as_fetch_does_and_names_a_damaged_pack(
) {
    require_tool("age", "age");
    let work = tempfile::tempdir().unwrap();
    let (identity, recipient) = age_keygen(work.path());
    let key = work.path().join("page-id.key");
    std::fs::write(&key, "c2VjcmV0LXBhZ2UtaWQta2V5LWZvci10aGUtdGVzdHMh\n").unwrap();
    let extra = format!(
        "compression: zstd\nencryption:\n  recipients: [\"{recipient}\"]\n  page_id_key_file: {}\n",
        key.display()
    );
    let (_etcd, sets) = two_sets_rebuilt_as_fetch_does(work.path(), &extra, Some(&identity)).await;
    let m = &sets[1].1;
    assert!(m.compression.is_some() && m.encryption.is_some());
    assert_eq!(pages(m).page_ids, etcd_backup_proto::PageIds::HmacSha256);

    // Without the identity: a usage error, and nothing written.
    let out = work.path().join("no-identity.db");
    let run = reassemble(&sets[1].0, &out, None);
    assert_eq!(run.status.code(), Some(2), "{}", text(&run));
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("--identity"),
        "{}",
        text(&run)
    );
    assert!(!out.exists() && !work.path().join("no-identity.db.partial").exists());

    damaged_pack_is_named(work.path(), &sets, Some(&identity));
}

/// A bbolt-shaped page: header (its number, flags, overflow), then `fill`.
fn bbolt_page(number: u64, flags: u16, overflow: u32, fill: u8) -> Vec<u8> {
    let mut p = vec![fill; 4096];
    p[..8].copy_from_slice(&number.to_le_bytes());
    p[8..10].copy_from_slice(&flags.to_le_bytes());
    p[10..12].copy_from_slice(&0u16.to_le_bytes());
    p[12..16].copy_from_slice(&overflow.to_le_bytes());
    p
}

#[test]
fn page_diff_counts_pages_moved_and_new_by_content_and_their_kinds() {
    require_tool("python3", "python3");
    let work = tempfile::tempdir().unwrap();
    // Older: meta, a leaf, a two-page leaf (its overflow page), a branch.
    let older: Vec<u8> = [
        bbolt_page(0, 0x04, 0, 1),
        bbolt_page(1, 0x02, 0, 2),
        bbolt_page(2, 0x02, 1, 3),
        vec![4; 4096],
        bbolt_page(4, 0x01, 0, 5),
    ]
    .concat();
    // Newer: the meta page changed; page 1 the same; the two-page leaf
    // rewritten (both pages new); the older page 3 (the overflow page's
    // bytes) now at position 4, moved, not new.
    let newer: Vec<u8> = [
        bbolt_page(0, 0x04, 0, 9),
        bbolt_page(1, 0x02, 0, 2),
        bbolt_page(2, 0x02, 1, 6),
        vec![7; 4096],
        vec![4; 4096],
    ]
    .concat();
    let (a, b) = (work.path().join("a.db"), work.path().join("b.db"));
    std::fs::write(&a, older).unwrap();
    std::fs::write(&b, newer).unwrap();
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/page-diff"))
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("5 pages; differ from the page at their position: 4 (80.00 %); of these found elsewhere in the older file: 1; new by content: 3 (60.00 %)"),
        "{t}"
    );
    assert!(
        t.contains("leaf 1") && t.contains("leaf-overflow 1") && t.contains("meta 1"),
        "{t}"
    );
    let one = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/page-diff"))
        .arg(&a)
        .output()
        .unwrap();
    assert!(
        !one.status.success() && text(&one).contains("at least two snapshots"),
        "{}",
        text(&one)
    );
}
