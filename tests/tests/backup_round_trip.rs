//! A backup taken from a real etcd restores, with the real `etcdctl`, to the
//! same keyspace; TLS works; failures to reach etcd are clear and leave nothing.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use etcd_backup_proto::{FileKind, Manifest};
use etcd_backup_tests::agent::{backup, run_agent, run_agent_with_tmpdir, AgentConfig};
use etcd_backup_tests::etcd::{
    dump, restore_and_start, snapshot_status, write_history, EtcdServer,
};
use etcd_backup_tests::tls::TlsFiles;
use etcd_backup_tests::{complete_sets, files_below, free_port};
use sha2::{Digest, Sha256};

fn read_manifest(set_dir: &std::path::Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(set_dir.join("manifest.json")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_restores_to_an_identical_keyspace() {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    write_history(&mut client, "/registry/configmaps/default", 600).await;
    client
        .put("/registry/big", vec![b'z'; 300_000], None)
        .await
        .unwrap();
    let before = dump(&mut client).await;
    assert!(
        before.len() > 400,
        "fixture wrote too little: {}",
        before.len()
    );

    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let config = AgentConfig::new(&etcd, &dest).write(work.path());
    let run = backup(&config);
    run.assert_code(0);

    let sets = complete_sets(&dest);
    assert_eq!(sets.len(), 1, "{:?}", files_below(&dest));
    assert!(sets[0].starts_with("test/master-0/"), "{}", sets[0]);
    let set_dir = dest.join(&sets[0]);
    let manifest = read_manifest(&set_dir);
    let ts = manifest.timestamp.to_string();
    assert_eq!(sets[0], format!("test/master-0/{ts}"));
    assert_eq!(
        files_below(&set_dir),
        vec!["manifest.json".to_string(), format!("snapshot_{ts}.db")]
    );

    // The manifest describes the file exactly, and the member it came from.
    let snap = manifest.file(FileKind::Snapshot).unwrap();
    let bytes = std::fs::read(set_dir.join(&snap.name)).unwrap();
    assert_eq!(snap.size, bytes.len() as u64);
    assert_eq!(snap.sha256, hex::encode(Sha256::digest(&bytes)));
    let status: serde_json::Value =
        serde_json::from_slice(&etcd.etcdctl(&["endpoint", "status", "-w", "json"]).stdout)
            .unwrap();
    let header = &status[0]["Status"]["header"];
    assert_eq!(
        manifest.etcd.cluster_id,
        format!("{:016x}", header["cluster_id"].as_u64().unwrap())
    );
    assert_eq!(
        manifest.etcd.member_id,
        format!("{:016x}", header["member_id"].as_u64().unwrap())
    );
    assert_eq!(
        manifest.etcd.version,
        status[0]["Status"]["version"].as_str().unwrap()
    );
    assert_eq!(manifest.etcd.revision, header["revision"].as_i64().unwrap());
    assert_eq!(manifest.resources_layout, "none");

    // etcdctl accepts the file, digest trailer and all, and reports exactly
    // the status the agent computed while the snapshot streamed.
    let st = snapshot_status(&set_dir.join(&snap.name));
    assert_eq!(st["revision"].as_i64().unwrap(), manifest.etcd.revision);
    assert_eq!(st["totalSize"].as_u64().unwrap() + 32, snap.size);
    assert_status_matches(&manifest, &st);
    assert_eq!(manifest.etcd.live_keys, Some(before.len() as u64));

    // Restore with etcdctl, start etcd on it, read everything back.
    let restored = restore_and_start(&set_dir.join(&snap.name), work.path());
    let mut rclient = restored.client().await;
    let after = dump(&mut rclient).await;
    assert_eq!(after.len(), before.len());
    assert!(after == before, "restored keyspace differs from the source");

    // The stdout summary names the set.
    assert!(run.stdout.contains(&sets[0]), "{}", run.stdout);
}

fn assert_status_matches(manifest: &Manifest, etcdctl: &serde_json::Value) {
    let ms = manifest
        .snapshot_status
        .expect("the manifest records the snapshot status");
    assert_eq!(
        u64::from(ms.hash),
        etcdctl["hash"].as_u64().unwrap(),
        "hash"
    );
    assert_eq!(
        ms.revision,
        etcdctl["revision"].as_i64().unwrap(),
        "revision"
    );
    assert_eq!(
        ms.total_key,
        etcdctl["totalKey"].as_u64().unwrap(),
        "totalKey"
    );
    assert_eq!(
        ms.total_size,
        etcdctl["totalSize"].as_u64().unwrap(),
        "totalSize"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_status_after_compaction_and_defrag_equals_etcdctl() {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    write_history(&mut client, "/registry/events/default", 1500).await;
    client
        .put("/registry/huge", vec![b'h'; 500_000], None)
        .await
        .unwrap();
    let rev = client
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert!(etcd
        .etcdctl(&["compaction", "--physical", &rev.to_string()])
        .status
        .success());
    assert!(etcd.etcdctl(&["defrag"]).status.success());
    write_history(&mut client, "/registry/events/after", 100).await;

    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    backup(&AgentConfig::new(&etcd, &dest).write(work.path())).assert_code(0);
    let set = dest.join(complete_sets(&dest).pop().unwrap());
    let manifest = read_manifest(&set);
    let st = snapshot_status(&set.join(&manifest.files[0].name));
    assert_status_matches(&manifest, &st);
    // The revision etcd reports for the snapshot is the one the agent read from it.
    assert!(manifest.snapshot_status.unwrap().revision >= manifest.etcd.revision);
}

/// Many small keys make a tall tree: the status the agent computes while the
/// snapshot streams (its page summaries spilled to a temporary file) must still be
/// exactly etcdctl's, free pages (left by compaction without defrag) and all.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_status_of_many_small_keys_equals_etcdctl() {
    use etcd_client::{Txn, TxnOp};
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    const KEYS: usize = 48_000;
    // etcd takes at most 128 operations in one transaction.
    for batch in 0..KEYS / 120 {
        let ops: Vec<TxnOp> = (0..120)
            .map(|i| {
                let n = batch * 120 + i;
                TxnOp::put(
                    format!("/registry/leases/kube-node-lease/node-{n:06}"),
                    format!("holder-{n}-{}", "r".repeat(n % 40)),
                    None,
                )
            })
            .collect();
        client.txn(Txn::new().and_then(ops)).await.unwrap();
    }
    // Some history, and a fifth of the keys deleted; compacting it all away
    // leaves the pages it held free.
    write_history(&mut client, "/registry/leases/kube-node-lease/node-0", 900).await;
    let deleted = client
        .delete(
            "/registry/leases/kube-node-lease/node-01",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap()
        .deleted();
    assert_eq!(deleted, 10_000);
    let compact_at = client
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert!(etcd
        .etcdctl(&["compaction", &compact_at.to_string()])
        .status
        .success());
    write_history(&mut client, "/registry/events/after", 300).await;

    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    backup(&AgentConfig::new(&etcd, &dest).write(work.path())).assert_code(0);
    let set = dest.join(complete_sets(&dest).pop().unwrap());
    let manifest = read_manifest(&set);
    let st = snapshot_status(&set.join(&manifest.files[0].name));
    assert_status_matches(&manifest, &st);
    // The `key` bucket holds at least the 38,000 revisions left after compaction
    // (each a 16-byte element, a 17-byte key and a 50-byte-plus value): over 3.1 MB,
    // so over 760 leaf pages of 4 KiB, more than one branch page (123 children at
    // most for 17-byte keys) can hold: at least two levels of branch pages.
    let status = manifest.snapshot_status.unwrap();
    assert!(status.total_key > 38_000, "{status:?}");
    assert!(status.total_size > 4 << 20, "{status:?}");
}

/// The status keeps its page summaries in TMPDIR: when that cannot be written,
/// the backup still stores the snapshot (checked against etcd's digest) without a
/// status, and `verify` fails; both say which directory and that TMPDIR picks it.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_writable_tmpdir_the_status_is_left_out_and_verify_says_where() {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    write_history(&mut client, "/registry/pods/default", 200).await;
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let config = AgentConfig::new(&etcd, &dest).write(work.path());
    let config = config.to_str().unwrap();
    let missing = work.path().join("no-such-tmp");

    let run = run_agent_with_tmpdir(&missing, &["backup", "--config", config]);
    run.assert_code(0);
    let set = dest.join(complete_sets(&dest).pop().unwrap());
    let manifest = read_manifest(&set);
    assert_eq!(manifest.snapshot_status, None);
    let said = format!(
        "cannot create the temporary files of the snapshot status in {}",
        missing.display()
    );
    assert!(
        run.stderr.contains(&said) && run.stderr.contains("TMPDIR"),
        "{}",
        run.stderr
    );
    // Without a status in the manifest there is nothing to compare.
    run_agent_with_tmpdir(&missing, &["verify", "--config", config, "latest"]).assert_code(0);

    std::fs::remove_dir_all(&set).unwrap();
    backup(Path::new(config)).assert_code(0);
    let run = run_agent_with_tmpdir(&missing, &["verify", "--config", config, "latest"]);
    run.assert_code(1);
    let out = format!("{}{}", run.stdout, run.stderr);
    assert!(out.contains(&said) && out.contains("TMPDIR"), "{out}");
    run_agent(&["verify", "--config", config, "latest"]).assert_code(0);
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_over_tls_with_client_certificate() {
    let tls = TlsFiles::generate();
    let etcd = EtcdServer::start_tls(tls);
    let mut client = etcd.client().await;
    write_history(&mut client, "/tls", 50).await;
    let before = dump(&mut client).await;

    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let config = AgentConfig::new(&etcd, &dest).write(work.path());
    backup(&config).assert_code(0);
    let sets = complete_sets(&dest);
    assert_eq!(sets.len(), 1);
    let manifest = read_manifest(&dest.join(&sets[0]));
    assert!(manifest.etcd.endpoint.starts_with("https://127.0.0.1:"));
    let snap = dest.join(&sets[0]).join(&manifest.files[0].name);
    let restored = restore_and_start(&snap, work.path());
    assert!(dump(&mut restored.client().await).await == before);
}

#[test]
fn wrong_ca_fails_with_a_clear_message_and_writes_nothing() {
    let tls = TlsFiles::generate();
    let etcd = EtcdServer::start_tls(tls.clone());
    let work = tempfile::tempdir().unwrap();
    let wrong_ca = work.path().join("wrong-ca.crt");
    std::fs::write(&wrong_ca, TlsFiles::unrelated_ca_pem()).unwrap();
    let dest = work.path().join("backups");
    let mut cfg = AgentConfig::new(&etcd, &dest);
    cfg.tls = Some((wrong_ca, tls.client_cert.clone(), tls.client_key.clone()));
    let run = backup(&cfg.write(work.path()));
    run.assert_code(1);
    assert!(run.stderr.contains("stage connect"), "{}", run.stderr);
    assert!(run.stderr.contains(&etcd.client_url), "{}", run.stderr);
    assert!(run.stderr.contains("etcd.ca_file"), "{}", run.stderr);
    assert!(
        run.stderr.to_lowercase().contains("certificate"),
        "{}",
        run.stderr
    );
    assert!(files_below(&dest).is_empty(), "{:?}", files_below(&dest));
}

#[test]
fn refused_connection_fails_fast_and_writes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let cfg = AgentConfig::for_endpoint(&endpoint, None, &dest);
    let run = backup(&cfg.write(work.path()));
    run.assert_code(1);
    assert!(run.stderr.contains(&endpoint), "{}", run.stderr);
    assert!(
        run.stderr.to_lowercase().contains("refused"),
        "{}",
        run.stderr
    );
    assert!(
        run.elapsed < Duration::from_secs(5),
        "took {:?}",
        run.elapsed
    );
    assert!(files_below(&dest).is_empty());
}

#[test]
fn silent_etcd_fails_within_the_dial_timeout() {
    // Accepts TCP connections and never says anything, like a hung member.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept() {
            let _ = s.flush();
            held.push(s);
            if held.len() > 8 {
                break;
            }
        }
    });
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let mut cfg = AgentConfig::for_endpoint(&endpoint, None, &dest);
    cfg.dial_timeout = "2s".into();
    let run = backup(&cfg.write(work.path()));
    run.assert_code(1);
    assert!(
        run.stderr.contains("did not answer within 2s"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains(&endpoint), "{}", run.stderr);
    // Connecting and the status call each get the dial timeout at most.
    assert!(
        run.elapsed < Duration::from_secs(2 * 2 + 3),
        "took {:?}",
        run.elapsed
    );
    assert!(files_below(&dest).is_empty());
    drop(holder);
}
