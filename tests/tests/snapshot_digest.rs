//! A snapshot stream that does not carry etcd's digest, or carries a wrong one,
//! is refused, and the failed run leaves nothing behind. The stream comes from
//! a fake Maintenance server serving a real snapshot, since real etcd never
//! sends a bad digest.

use std::sync::OnceLock;

use etcd_backup_tests::agent::{backup, AgentConfig, AgentRun};
use etcd_backup_tests::etcd::real_snapshot_db;
use etcd_backup_tests::fake_etcd::{FakeEtcd, Tamper};
use etcd_backup_tests::{complete_sets, files_below};

/// A real bbolt database (without trailer) from a real etcd, made once.
fn real_db() -> Vec<u8> {
    static DB: OnceLock<Vec<u8>> = OnceLock::new();
    DB.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(real_snapshot_db(200))
    })
    .clone()
}

fn run_against(tamper: Tamper, stall_timeout: &str) -> (AgentRun, tempfile::TempDir) {
    let db = real_db();
    let fake = FakeEtcd::start(db, tamper);
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let mut cfg = AgentConfig::for_endpoint(&fake.url, None, &dest);
    cfg.stall_timeout = stall_timeout.into();
    let run = backup(&cfg.write(work.path()));
    (run, work)
}

fn assert_nothing_left(work: &tempfile::TempDir) {
    let dest = work.path().join("backups");
    assert!(complete_sets(&dest).is_empty());
    assert!(
        files_below(&dest).is_empty(),
        "left behind: {:?}",
        files_below(&dest)
    );
}

#[test]
fn untampered_stream_from_the_fake_is_accepted() {
    // Proves the fake speaks the protocol right, so the refusals below are
    // about the tampering and nothing else.
    let (run, work) = run_against(Tamper::None, "10s");
    run.assert_code(0);
    let sets = complete_sets(&work.path().join("backups"));
    assert_eq!(sets.len(), 1);
}

#[test]
fn flipped_byte_is_a_digest_mismatch() {
    let (run, work) = run_against(Tamper::FlipByte(5000), "10s");
    run.assert_code(1);
    assert!(run.stderr.contains("stage verify"), "{}", run.stderr);
    assert!(
        run.stderr.contains("snapshot digest mismatch"),
        "{}",
        run.stderr
    );
    assert_nothing_left(&work);
}

#[test]
fn missing_digest_is_refused() {
    let (run, work) = run_against(Tamper::NoDigest, "10s");
    run.assert_code(1);
    assert!(run.stderr.contains("stage verify"), "{}", run.stderr);
    assert!(run.stderr.contains("trailer"), "{}", run.stderr);
    assert_nothing_left(&work);
}

#[test]
fn wrong_digest_is_refused() {
    let (run, work) = run_against(Tamper::WrongDigest, "10s");
    run.assert_code(1);
    assert!(
        run.stderr.contains("snapshot digest mismatch"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains(&"0".repeat(64)), "{}", run.stderr);
    assert_nothing_left(&work);
}

#[test]
fn stalled_stream_fails_after_the_stall_timeout() {
    let (run, work) = run_against(Tamper::Stall, "1s");
    run.assert_code(1);
    assert!(run.stderr.contains("stage snapshot"), "{}", run.stderr);
    assert!(run.stderr.contains("sent nothing for 1s"), "{}", run.stderr);
    assert_nothing_left(&work);
}
