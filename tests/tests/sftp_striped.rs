//! Striped SFTP (`destination.sftp.streams` > 1) against a real OpenSSH
//! server through a delaying relay: sets stored and read back byte for byte
//! over several sessions, restored with etcdctl to the same keyspace; one
//! session killed mid-upload failing the run cleanly (no manifest, no
//! partial) with the next run succeeding; servers that limit sessions
//! (`MaxSessions 1`, a single connection) still served.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_backup_proto::Manifest;
use etcd_backup_tests::agent::{backup, run_agent, spawn_backup, AgentConfig, AgentRun};
use etcd_backup_tests::etcd::{dump, restore_and_start, write_history, EtcdServer};
use etcd_backup_tests::relay::{Relay, RelayOptions, Shape};
use etcd_backup_tests::sshd::{ClientKey, KeyKind, SshOptions, SshServer};
use etcd_backup_tests::{complete_sets, files_below, wait_for};
use sha2::{Digest, Sha256};

const STREAMS: usize = 4;

/// An sshd trusting `key`, with `MaxSessions`/`MaxStartups` as given.
fn server(key: &ClientKey, max_sessions: Option<u32>, max_startups: Option<u32>) -> SshServer {
    SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        max_sessions,
        max_startups,
        ..SshOptions::default()
    })
}

/// Both directions delayed by `delay`, each connection capped at `rate`.
fn relay(sshd: &SshServer, delay: Duration, rate: Option<u64>) -> Relay {
    let shape = Shape { rate, delay };
    Relay::start(
        sshd.addr(),
        RelayOptions {
            up: shape,
            down: shape,
        },
    )
}

/// A config backing `etcd` up through `relay` to `sshd` under `dest`,
/// `streams` sessions per file.
fn config(
    work: &Path,
    etcd: &EtcdServer,
    sshd: &SshServer,
    relay: &Relay,
    key: &ClientKey,
    dest: &Path,
    streams: usize,
) -> PathBuf {
    let known_hosts = work.join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("{}\n", sshd.known_hosts_line_at(relay.addr.port())),
    )
    .unwrap();
    let mut cfg = AgentConfig::new(etcd, &work.join("unused-local"));
    cfg.destination_yaml = Some(format!(
        "destination:\n  sftp:\n    host: 127.0.0.1\n    port: {}\n    user: {}\n    path: {}\n    known_hosts_file: {}\n    private_key_file: {}\n    connect_timeout: 10s\n    io_timeout: 10s\n    streams: {streams}\n",
        relay.addr.port(),
        SshServer::key_user(),
        dest.display(),
        known_hosts.display(),
        key.private_key.display(),
    ));
    cfg.write(work)
}

/// etcd holding `mib` MiB of incompressible values plus some history.
async fn filled_etcd(mib: usize) -> EtcdServer {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    write_history(&mut client, "/registry/pods/default", 200).await;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    // Rewritten keys: the snapshot keeps every revision, a range of the
    // keyspace (under gRPC's 4 MiB) only the last.
    for i in 0..mib {
        let value: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        client
            .put(format!("/registry/big/{}", i % 2), value, None)
            .await
            .unwrap();
    }
    etcd
}

fn sha256_hex(file: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(file).unwrap()))
}

fn logins(sshd: &SshServer) -> usize {
    sshd.log().matches("Accepted publickey").count()
}

fn manifest(dest: &Path, set: &str) -> Manifest {
    serde_json::from_slice(&std::fs::read(dest.join(set).join("manifest.json")).unwrap()).unwrap()
}

/// The run succeeded and stored one complete set whose files match the
/// manifest's sizes and SHA-256s byte for byte; returns the set.
fn assert_one_good_set(run: &AgentRun, dest: &Path) -> String {
    run.assert_code(0);
    let sets = complete_sets(dest);
    assert_eq!(sets.len(), 1, "{sets:?}");
    let m = manifest(dest, &sets[0]);
    for f in &m.files {
        let stored = dest.join(&sets[0]).join(&f.name);
        assert_eq!(
            std::fs::metadata(&stored).unwrap().len(),
            f.size,
            "{}",
            f.name
        );
        assert_eq!(sha256_hex(&stored), f.sha256, "{}", f.name);
    }
    sets[0].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_striped_backup_over_a_delayed_link_is_byte_identical_and_fetched_striped_restores_the_keyspace(
) {
    let work = tempfile::tempdir().unwrap();
    let etcd = filled_etcd(24).await;
    let before = dump(&mut etcd.client().await).await;
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = server(&key, None, None);
    let link = relay(&sshd, Duration::from_millis(10), None);
    let dest = sshd.sftp_root.join("backups");
    let cfg = config(work.path(), &etcd, &sshd, &link, &key, &dest, STREAMS);

    let run = backup(&cfg);
    let set = assert_one_good_set(&run, &dest);
    // The backup's control connection came with one connection per stream
    // (logged in together); retention's pass after it reads only manifests
    // (under the striping threshold), over the same control connection.
    let n = logins(&sshd);
    assert_eq!(n, STREAMS + 1, "{n} logins:\n{}", sshd.log());
    let m = manifest(&dest, &set);
    let snap = m.files.iter().find(|f| f.name.ends_with(".db")).unwrap();
    assert!(snap.size > 24 << 20, "{}", snap.size);

    // Read back striped: verify checks every hash, fetch writes the files.
    let config = cfg.to_str().unwrap();
    run_agent(&["verify", "--config", config, "latest"]).assert_code(0);
    let out = work.path().join("fetched");
    run_agent(&[
        "fetch",
        "--config",
        config,
        "latest",
        "--snapshot-only",
        "--to",
        out.to_str().unwrap(),
    ])
    .assert_code(0);
    let fetched = out.join(&snap.name);
    assert!(
        std::fs::read(&fetched).unwrap()
            == std::fs::read(dest.join(&set).join(&snap.name)).unwrap(),
        "the fetched snapshot differs from the stored one"
    );
    assert_eq!(sha256_hex(&fetched), snap.sha256);

    // etcdctl restores the fetched file to the keyspace backed up.
    let restored = restore_and_start(&fetched, work.path());
    let after = dump(&mut restored.client().await).await;
    assert_eq!(after.len(), before.len());
    assert!(after == before, "restored keyspace differs from the source");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_striped_session_killed_mid_upload_fails_the_run_cleanly_and_the_next_run_succeeds() {
    let work = tempfile::tempdir().unwrap();
    let etcd = filled_etcd(64).await;
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = server(&key, None, None);
    // 4 MB/s per connection: the 64 MiB snapshot takes seconds over four.
    let link = relay(&sshd, Duration::from_millis(5), Some(4_000_000));
    let dest = sshd.sftp_root.join("backups");
    let cfg = config(work.path(), &etcd, &sshd, &link, &key, &dest, STREAMS);

    let log = work.path().join("agent.log");
    let mut agent = spawn_backup(&cfg, &log);
    wait_for("an upload in progress", Duration::from_secs(60), || {
        if let Some(status) = agent.try_wait().unwrap() {
            panic!(
                "the agent ended ({status}) before a session was killed:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        files_below(&dest).into_iter().find(|f| {
            f.ends_with(".db.partial")
                && std::fs::metadata(dest.join(f))
                    .map(|m| m.len() > 8 << 20)
                    .unwrap_or(false)
        })
    });
    // One SFTP session per stream plus the control one; the newest is a
    // stream's.
    let sessions = sshd.sftp_session_pids();
    assert_eq!(sessions.len(), 1 + STREAMS, "{sessions:?}");
    let victim = *sessions.last().unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = wait_for("the agent to exit", Duration::from_secs(60), || {
        agent.try_wait().unwrap()
    });
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stage upload"), "{stderr}");
    assert!(!stderr.contains("could not be removed"), "{stderr}");
    // Nothing of the run is left: no manifest, no partial.
    assert_eq!(files_below(&dest), Vec::<String>::new());
    assert!(complete_sets(&dest).is_empty());

    // The next run opens fresh sessions and stores a good set.
    std::thread::sleep(Duration::from_secs(1));
    let run = backup(&cfg);
    assert_one_good_set(&run, &dest);
}

/// A backup through a server that limits sessions: what it left to look at.
struct Limited {
    sshd: SshServer,
    run: AgentRun,
    cfg: PathBuf,
    _link: Relay,
    _key: ClientKey,
    _etcd: EtcdServer,
    _work: tempfile::TempDir,
}

/// Backs 8 MiB of values up over `streams` streams, through a 10 ms relay
/// letting `connections` through at once (any number when `None`), to sshd
/// with `MaxSessions` `max_sessions`; the run must store one good set.
async fn limited_backup(
    max_sessions: Option<u32>,
    connections: Option<usize>,
    streams: usize,
) -> Limited {
    let work = tempfile::tempdir().unwrap();
    let etcd = filled_etcd(8).await;
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = server(&key, max_sessions, None);
    let link = relay(&sshd, Duration::from_millis(10), None);
    if let Some(n) = connections {
        link.limit_connections(n);
    }
    let dest = sshd.sftp_root.join("backups");
    let cfg = config(work.path(), &etcd, &sshd, &link, &key, &dest, streams);
    let run = backup(&cfg);
    assert_one_good_set(&run, &dest);
    Limited {
        sshd,
        run,
        cfg,
        _link: link,
        _key: key,
        _etcd: etcd,
        _work: work,
    }
}

/// SFTP sessions sshd started: the streams' and the control connection's.
fn sftp_sessions(sshd: &SshServer) -> usize {
    sshd.log().matches("subsystem 'sftp'").count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_with_max_sessions_1_still_gets_every_stream_over_its_own_connection() {
    let b = limited_backup(Some(1), None, STREAMS).await;
    // One session per connection is all the streams need: no warning.
    let n = logins(&b.sshd);
    assert_eq!(n, STREAMS + 1, "{n} logins:\n{}", b.sshd.log());
    assert!(!b.run.stderr.contains("MaxSessions"), "{}", b.run.stderr);
    run_agent(&["verify", "--config", b.cfg.to_str().unwrap(), "latest"]).assert_code(0);
}

/// More streams than the agent logs in at once (8): the rest ride as
/// further channels on those connections, so the logins stay at 8.
#[tokio::test(flavor = "multi_thread")]
async fn more_streams_than_logins_at_once_ride_as_channels_of_the_same_connections() {
    let b = limited_backup(None, None, 12).await;
    assert_eq!(logins(&b.sshd), 8 + 1, "{}", b.sshd.log());
    // Twelve stream sessions and the control session.
    assert_eq!(sftp_sessions(&b.sshd), 12 + 1, "{}", b.sshd.log());
    assert!(!b.run.stderr.contains("MaxSessions"), "{}", b.run.stderr);
}

/// The same with `MaxSessions 1`: the channels beyond the first on each
/// connection are refused, and those streams get connections of their own.
#[tokio::test(flavor = "multi_thread")]
async fn more_streams_than_logins_at_once_with_max_sessions_1_get_connections_of_their_own() {
    let b = limited_backup(Some(1), None, 12).await;
    assert_eq!(logins(&b.sshd), 12 + 1, "{}", b.sshd.log());
    assert!(!b.run.stderr.contains("MaxSessions"), "{}", b.run.stderr);
    run_agent(&["verify", "--config", b.cfg.to_str().unwrap(), "latest"]).assert_code(0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_allowing_one_connection_gets_the_streams_as_channels_of_it() {
    let b = limited_backup(None, Some(1), STREAMS).await;
    assert!(!b.run.stderr.contains("MaxSessions"), "{}", b.run.stderr);
    // Every stream and the control session: channels of that connection.
    assert!(sftp_sessions(&b.sshd) > STREAMS, "{}", b.sshd.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_allowing_one_connection_with_max_sessions_1_gets_one_session_and_one_warning() {
    let b = limited_backup(Some(1), Some(1), STREAMS).await;
    let warnings: Vec<&str> = b
        .run
        .stderr
        .lines()
        .filter(|l| l.contains("destination.sftp.streams"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", b.run.stderr);
    assert!(
        warnings[0].contains("WARN")
            && warnings[0].contains("MaxSessions")
            && warnings[0].contains("MaxStartups"),
        "{}",
        warnings[0]
    );
    run_agent(&["verify", "--config", b.cfg.to_str().unwrap(), "latest"]).assert_code(0);
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_1_uses_one_session_as_before() {
    let work = tempfile::tempdir().unwrap();
    let etcd = filled_etcd(4).await;
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = server(&key, None, None);
    let link = relay(&sshd, Duration::ZERO, None);
    let dest = sshd.sftp_root.join("backups");
    let cfg = config(work.path(), &etcd, &sshd, &link, &key, &dest, 1);

    let run = backup(&cfg);
    assert_one_good_set(&run, &dest);
    // One SFTP session per connection, however many connections the run
    // opened.
    assert_eq!(
        sshd.log().matches("subsystem 'sftp'").count(),
        logins(&sshd),
        "{}",
        sshd.log()
    );
}
