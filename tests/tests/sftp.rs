//! Backups over SFTP to a real OpenSSH server: every supported way to log in,
//! every way a host key can be wrong, a server killed mid-upload, retries, and
//! a set that restores with the real `etcdctl`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_backup_agent::config::{HostKeyCheck, SftpAuth, SftpConfig};
use etcd_backup_agent::store::destination::{Destination, SftpDir};
use etcd_backup_proto::{FileKind, Manifest};
use etcd_backup_tests::agent::{agent_bin, backup, AgentConfig};
use etcd_backup_tests::etcd::{dump, restore_and_start, write_history, EtcdServer};
use etcd_backup_tests::relay::{Relay, RelayOptions, Shape};
use etcd_backup_tests::sftp_setup::{backups, Login, SftpSetup, Trust, QUICK_TIMEOUTS};
use etcd_backup_tests::sshd::{
    assert_refused_before_login, ClientKey, KeyKind, SshOptions, SshServer,
};
use etcd_backup_tests::{complete_sets, files_below, ranges, wait_for};
use tokio::io::AsyncReadExt;

fn manifest(set_dir: &Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(set_dir.join("manifest.json")).unwrap()).unwrap()
}

fn key_server(keys: &[&ClientKey]) -> SshServer {
    SshServer::start(SshOptions {
        authorized_keys: keys.iter().map(|k| k.public_line.clone()).collect(),
        ..SshOptions::default()
    })
}

/// One key, an sshd trusting only it, and an agent config backing `etcd` up
/// there: logging in with the key, trusting sshd's known_hosts line, quick
/// timeouts. The key must outlive the runs (the config names its file).
struct KeySetup {
    key: ClientKey,
    sshd: SshServer,
    s: SftpSetup,
    cfg: AgentConfig,
}

fn key_setup(etcd: &EtcdServer) -> KeySetup {
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = key_server(&[&key]);
    let s = SftpSetup::new();
    let cfg = s.config(
        etcd,
        &sshd,
        Trust::KnownHosts(sshd.known_hosts_line()),
        Login::Key(&key, None),
        QUICK_TIMEOUTS,
    );
    KeySetup { key, sshd, s, cfg }
}

#[tokio::test(flavor = "multi_thread")]
async fn set_uploaded_over_sftp_restores_to_the_same_keyspace() {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    write_history(&mut client, "/registry/secrets/kube-system", 400).await;
    let before = dump(&mut client).await;

    let KeySetup {
        key: _key,
        sshd,
        s,
        cfg,
    } = key_setup(&etcd);
    let run = backup(&s.write(&cfg));
    run.assert_code(0);
    assert!(
        run.stdout.contains(&format!(
            "sftp://{}@127.0.0.1:{}",
            SshServer::key_user(),
            sshd.port
        )),
        "{}",
        run.stdout
    );

    let sets = complete_sets(&backups(&sshd));
    assert_eq!(sets.len(), 1, "{:?}", files_below(&backups(&sshd)));
    let set_dir = backups(&sshd).join(&sets[0]);
    let m = manifest(&set_dir);
    let snap = m.file(FileKind::Snapshot).unwrap();
    assert_eq!(
        std::fs::metadata(set_dir.join(&snap.name)).unwrap().len(),
        snap.size
    );
    assert!(files_below(&backups(&sshd))
        .iter()
        .all(|f| !f.ends_with(".partial")));

    // Private modes on the server: 0700 directories, 0600 files.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for dir in [backups(&sshd), backups(&sshd).join("test"), set_dir.clone()] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    for f in files_below(&set_dir) {
        assert_eq!(mode(&set_dir.join(&f)), 0o600, "{f}");
    }

    let restored = restore_and_start(&set_dir.join(&snap.name), s.dir());
    assert!(
        dump(&mut restored.client().await).await == before,
        "restored keyspace differs"
    );
}

#[test]
fn ecdsa_rsa_and_passphrase_protected_keys_log_in() {
    let etcd = EtcdServer::start();
    let ecdsa = ClientKey::generate(KeyKind::Ecdsa, None);
    let rsa = ClientKey::generate(KeyKind::Rsa, None);
    let locked = ClientKey::generate(KeyKind::Ed25519, Some("correct horse"));
    let sshd = key_server(&[&ecdsa, &rsa, &locked]);
    for (key, passphrase) in [
        (&ecdsa, None),
        (&rsa, None),
        (&locked, Some("correct horse")),
    ] {
        let s = SftpSetup::new();
        // The key's own work before the login (bcrypt-pbkdf for the locked
        // key, an RSA signature) runs in a debug build on a loaded CI
        // machine: a connect timeout fit for production, not the quick one.
        let cfg = s.config(
            &etcd,
            &sshd,
            Trust::KnownHosts(sshd.known_hosts_line()),
            Login::Key(key, passphrase),
            "    connect_timeout: 30s\n    io_timeout: 30s\n",
        );
        backup(&s.write(&cfg)).assert_code(0);
        // Sets are named by the second; keep runs apart.
        std::thread::sleep(Duration::from_millis(1100));
    }
    assert_eq!(complete_sets(&backups(&sshd)).len(), 3);
    // RSA signed with SHA-2, not the legacy ssh-rsa (SHA-1).
    let log = sshd.log();
    assert!(
        log.contains("Accepted publickey") && log.contains("RSA SHA256:"),
        "{log}"
    );

    // The locked key without its passphrase fails with a hint, and is not retried.
    let s = SftpSetup::new();
    let mut cfg = s.config(
        &etcd,
        &sshd,
        Trust::KnownHosts(sshd.known_hosts_line()),
        Login::Key(&locked, None),
        QUICK_TIMEOUTS,
    );
    cfg.retry_attempts = 3;
    cfg.retry_initial_delay = "5s".into();
    let run = backup(&s.write(&cfg));
    run.assert_code(1);
    assert!(
        run.stderr.contains("private_key_passphrase_file"),
        "{}",
        run.stderr
    );
    assert!(
        run.elapsed < Duration::from_secs(4),
        "an auth failure was retried: {:?}",
        run.elapsed
    );
}

#[test]
fn password_read_from_a_file_logs_in() {
    let etcd = EtcdServer::start();
    let sshd = SshServer::start(SshOptions {
        password_user: true,
        ..SshOptions::default()
    });
    let (user, password) = SshServer::password_account();
    let s = SftpSetup::new();
    let cfg = s.config(
        &etcd,
        &sshd,
        Trust::KnownHosts(sshd.known_hosts_line()),
        Login::Password(user.clone(), password.clone()),
        QUICK_TIMEOUTS,
    );
    let config = s.write(&cfg);
    let run = backup(&config);
    run.assert_code(0);
    assert_eq!(complete_sets(&backups(&sshd)).len(), 1);
    // The password never appears in the agent's output or its config.
    assert!(!run.stderr.contains(&password) && !run.stdout.contains(&password));
    assert!(!std::fs::read_to_string(&config)
        .unwrap()
        .contains(&password));

    // A wrong password: refused, named, not retried.
    std::fs::write(s.dir().join("password"), "not-the-password\n").unwrap();
    let mut cfg = cfg;
    cfg.retry_attempts = 3;
    cfg.retry_initial_delay = "5s".into();
    let run = backup(&s.write(&cfg));
    run.assert_code(1);
    assert!(
        run.stderr.contains(&format!(
            "SFTP authentication as {user} on 127.0.0.1:{}",
            sshd.port
        )),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("password_file"), "{}", run.stderr);
    assert!(
        run.elapsed < Duration::from_secs(4),
        "an auth failure was retried: {:?}",
        run.elapsed
    );
}

#[test]
fn hashed_known_hosts_and_a_pinned_fingerprint_are_trusted() {
    let etcd = EtcdServer::start();
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = key_server(&[&key]);
    let s = SftpSetup::new();
    let other = ClientKey::generate(KeyKind::Ed25519, None);
    // A hashed line among unrelated entries, as ~/.ssh/known_hosts looks.
    let lines = format!(
        "# managed by hand\nbackup.example.com {}\n{}\n",
        other.public_line,
        sshd.hashed_known_hosts_line()
    );
    let cfg = s.config(
        &etcd,
        &sshd,
        Trust::KnownHosts(lines),
        Login::Key(&key, None),
        QUICK_TIMEOUTS,
    );
    backup(&s.write(&cfg)).assert_code(0);
    std::thread::sleep(Duration::from_millis(1100));
    let cfg = s.config(
        &etcd,
        &sshd,
        Trust::Fingerprint(sshd.fingerprint()),
        Login::Key(&key, None),
        QUICK_TIMEOUTS,
    );
    backup(&s.write(&cfg)).assert_code(0);
    assert_eq!(complete_sets(&backups(&sshd)).len(), 2);
}

/// A level of the set's path that is a file on the server: the pipelined
/// mkdirs cannot make it, the level-by-level walk names it, the run fails,
/// and the file is left as it was.
#[test]
fn a_file_where_a_set_directory_belongs_fails_the_run_and_is_left_alone() {
    let etcd = EtcdServer::start();
    let KeySetup {
        key: _key,
        sshd,
        s,
        cfg,
    } = key_setup(&etcd);
    let cluster_dir = backups(&sshd).join(&cfg.cluster_name);
    std::fs::create_dir_all(&cluster_dir).unwrap();
    let blocker = cluster_dir.join(&cfg.node_name);
    std::fs::write(&blocker, "not a directory\n").unwrap();

    let run = backup(&s.write(&cfg));
    run.assert_code(1);
    assert!(
        run.stderr.contains("exists and is not a directory")
            && run
                .stderr
                .contains(&format!("{}/{}", cfg.cluster_name, cfg.node_name)),
        "{}",
        run.stderr
    );
    assert_eq!(
        std::fs::read_to_string(&blocker).unwrap(),
        "not a directory\n"
    );
    assert!(complete_sets(&backups(&sshd)).is_empty());
}

#[test]
fn unknown_host_key_is_refused_before_logging_in() {
    let etcd = EtcdServer::start();
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = key_server(&[&key]);
    let s = SftpSetup::new();
    let other = ClientKey::generate(KeyKind::Ed25519, None);
    let lines = format!("backup.example.com {}\n", other.public_line);
    let mut cfg = s.config(
        &etcd,
        &sshd,
        Trust::KnownHosts(lines),
        Login::Key(&key, None),
        QUICK_TIMEOUTS,
    );
    cfg.retry_attempts = 3;
    cfg.retry_initial_delay = "5s".into();
    assert_refused_before_login(&backup(&s.write(&cfg)), &sshd, "is not in");
}

#[test]
fn changed_host_key_is_refused_before_logging_in() {
    let etcd = EtcdServer::start();
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = key_server(&[&key]);
    let s = SftpSetup::new();
    // The server's name with somebody else's key: what an attacker would present.
    let impostor = ClientKey::generate(KeyKind::Ed25519, None);
    let lines = format!("[127.0.0.1]:{} {}\n", sshd.port, impostor.public_line);
    let mut cfg = s.config(
        &etcd,
        &sshd,
        Trust::KnownHosts(lines),
        Login::Key(&key, None),
        QUICK_TIMEOUTS,
    );
    cfg.retry_attempts = 3;
    cfg.retry_initial_delay = "5s".into();
    assert_refused_before_login(&backup(&s.write(&cfg)), &sshd, "does not match");

    let wrong_fp = etcd_backup_known_hosts::sha256_fingerprint(b"not the server's key");
    let mut cfg = s.config(
        &etcd,
        &sshd,
        Trust::Fingerprint(wrong_fp.clone()),
        Login::Key(&key, None),
        QUICK_TIMEOUTS,
    );
    cfg.retry_attempts = 3;
    let run = backup(&s.write(&cfg));
    assert_refused_before_login(&run, &sshd, &wrong_fp);
    assert!(run.stderr.contains(&sshd.fingerprint()), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn sshd_killed_mid_upload_leaves_no_complete_set_and_the_next_run_succeeds() {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    // ~300 MiB, so the upload takes long enough to be cut in the middle.
    let value = vec![b'k'; 1024 * 1024];
    for i in 0..300 {
        client
            .put(format!("/registry/big/{i:04}"), value.clone(), None)
            .await
            .unwrap();
    }
    let KeySetup {
        key: _key,
        mut sshd,
        s,
        cfg,
    } = key_setup(&etcd);
    let config = s.write(&cfg);

    let started = Instant::now();
    let agent = Command::new(agent_bin())
        .args(["backup", "--config", config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let root = backups(&sshd);
    wait_for("an upload in progress", Duration::from_secs(30), || {
        files_below(&root).into_iter().find(|f| {
            f.ends_with(".db.partial")
                && std::fs::metadata(root.join(f))
                    .map(|m| m.len() > 20 << 20)
                    .unwrap_or(false)
        })
    });
    sshd.kill_all();
    let out = agent.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stage upload"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // Whatever is left is a partial, never a set that looks complete.
    assert!(complete_sets(&root).is_empty());
    let left = files_below(&root);
    assert!(left.iter().all(|f| f.ends_with(".partial")), "{left:?}");

    sshd.restart();
    std::thread::sleep(Duration::from_millis(1100));
    backup(&config).assert_code(0);
    let sets = complete_sets(&root);
    assert_eq!(sets.len(), 1, "{:?}", files_below(&root));
    let m = manifest(&root.join(&sets[0]));
    let snap = m.file(FileKind::Snapshot).unwrap();
    assert!(snap.size > 300 << 20);
}

#[test]
fn a_server_that_comes_back_is_reached_by_a_retry_with_a_fresh_snapshot() {
    let etcd = EtcdServer::start();
    let KeySetup {
        key: _key,
        mut sshd,
        s,
        mut cfg,
    } = key_setup(&etcd);
    cfg.retry_attempts = 4;
    cfg.retry_initial_delay = "2s".into();
    let config = s.write(&cfg);
    sshd.kill_all();

    let launched = chrono::Utc::now();
    let agent = Command::new(agent_bin())
        .args(["backup", "--config", config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    sshd.restart();
    let out = agent.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("retrying with a fresh snapshot"),
        "{stderr}"
    );
    let sets = complete_sets(&backups(&sshd));
    assert_eq!(sets.len(), 1);
    // The set comes from the later attempt: it started after the back-off
    // (at least half the 2 s initial delay) that followed the first failure.
    let m = manifest(&backups(&sshd).join(&sets[0]));
    let waited = m.started_at - launched;
    assert!(
        waited >= chrono::Duration::milliseconds(900),
        "{waited:?}\n{stderr}"
    );
}

/// A destination on `sshd` below [`backups`], logging in with `key`, over
/// `streams` sessions.
fn sftp_dir(sshd: &SshServer, key: &ClientKey, streams: u32) -> SftpDir {
    sftp_dir_at(sshd, key, streams, sshd.port, sshd.known_hosts_file())
}

/// [`sftp_dir`] reaching `sshd` at `port` (a relay in front of it),
/// trusting the host keys in `known_hosts`.
fn sftp_dir_at(
    sshd: &SshServer,
    key: &ClientKey,
    streams: u32,
    port: u16,
    known_hosts: std::path::PathBuf,
) -> SftpDir {
    SftpDir::new(SftpConfig {
        host: "127.0.0.1".into(),
        port,
        user: SshServer::key_user(),
        path: backups(sshd).display().to_string(),
        host_key: HostKeyCheck::KnownHosts(known_hosts),
        auth: SftpAuth::PrivateKey {
            key_file: key.private_key.clone(),
            passphrase_file: None,
        },
        connect_timeout: Duration::from_secs(10),
        io_timeout: Duration::from_secs(20),
        require_fsync: true,
        streams,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranged_reads_return_exactly_the_bytes_asked_for_over_one_session_and_over_striped_ones() {
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = key_server(&[&key]);
    std::fs::create_dir_all(backups(&sshd).join("packs")).unwrap();
    // Longer than what one ranged read keeps in flight (32 requests of
    // 255 KiB), so the whole file is a range read in several windows.
    let data = ranges::pattern(10 << 20);
    std::fs::write(backups(&sshd).join("packs/p1"), &data).unwrap();
    // Where reads are split into requests, and where the first window of
    // requests in flight ends.
    const READ_LEN: u64 = 255 * 1024;
    let boundaries = [READ_LEN, 7 * READ_LEN, 32 * READ_LEN];

    for streams in [1, 4] {
        let dest = sftp_dir(&sshd, &key, streams);
        ranges::assert_ranged_reads(&dest, "packs/p1", &data, &boundaries).await;
        if streams == 1 {
            // Every range went over one session beside the control one,
            // not a session (or a login) per range.
            assert_eq!(sshd.sftp_session_pids().len(), 2, "streams 1");
        }

        // The file cut short after the range was opened: the read fails
        // where the data ends; it does not end early as if complete.
        let cut = format!("packs/cut{streams}");
        std::fs::write(backups(&sshd).join(&cut), &data).unwrap();
        let mut reader = dest.open_range(&cut, 1 << 20, 8 << 20).await.unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(backups(&sshd).join(&cut))
            .unwrap()
            .set_len(3 << 20)
            .unwrap();
        let mut got = Vec::new();
        let e = reader.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
        assert!(
            e.to_string()
                .contains(&format!("ended at byte {}", 3 << 20)),
            "{e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranged_reads_work_over_the_one_session_a_server_allowing_no_second_one_lets_open() {
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        max_sessions: Some(1),
        ..SshOptions::default()
    });
    std::fs::create_dir_all(backups(&sshd).join("packs")).unwrap();
    let data = ranges::pattern(3 << 20);
    std::fs::write(backups(&sshd).join("packs/p1"), &data).unwrap();
    let dest = sftp_dir(&sshd, &key, 1);
    ranges::assert_ranged_reads(&dest, "packs/p1", &data, &[255 * 1024, 2 << 20]).await;
    assert_eq!(sshd.sftp_session_pids().len(), 1, "one session");
}

/// Reads `len` bytes at `offset` of `path` with one ranged read.
async fn read_range(dest: &SftpDir, path: &str, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let mut reader = dest
        .open_range(path, offset, len)
        .await
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    reader
        .read_to_end(&mut got)
        .await
        .map_err(|e| e.to_string())?;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_read_by_ranges_is_opened_once_and_its_handle_kept_for_the_next_ranges() {
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = key_server(&[&key]);
    let packs = backups(&sshd).join("packs");
    std::fs::create_dir_all(&packs).unwrap();
    let data = ranges::pattern(3 << 20);
    // More files than the destination keeps open (16).
    for n in 0..17 {
        std::fs::write(packs.join(format!("p{n}")), &data).unwrap();
    }
    let dest = sftp_dir(&sshd, &key, 1);
    let first = read_range(&dest, "packs/p0", 0, 1 << 20).await.unwrap();
    assert_eq!(first, data[..1 << 20]);

    // Gone from the directory, the file still reads through the handle
    // kept open: the next range sends no OPEN (which would fail now).
    std::fs::remove_file(packs.join("p0")).unwrap();
    let next = read_range(&dest, "packs/p0", 1 << 20, 2 << 20)
        .await
        .unwrap();
    assert_eq!(next, data[1 << 20..]);

    // Sixteen other files opened since: p0's handle was let go (closed),
    // so its next range opens the file again, and finds it gone.
    for n in 1..17 {
        let got = read_range(&dest, &format!("packs/p{n}"), 4096, 4096)
            .await
            .unwrap();
        assert_eq!(got, data[4096..8192], "p{n}");
    }
    let gone = read_range(&dest, "packs/p0", 0, 4096).await.unwrap_err();
    assert!(gone.contains("packs/p0"), "{gone}");
    // p16, opened last, is still kept.
    std::fs::remove_file(packs.join("p16")).unwrap();
    let kept = read_range(&dest, "packs/p16", 0, 4096).await.unwrap();
    assert_eq!(kept, data[..4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_striped_create_cut_off_in_flight_is_gone_after_the_clean_up_delete_though_its_sessions_lag(
) {
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = key_server(&[&key]);
    let relay = Relay::start(sshd.addr(), RelayOptions::default());
    let work = tempfile::tempdir().unwrap();
    let known_hosts = work.path().join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("{}\n", sshd.known_hosts_line_at(relay.addr.port())),
    )
    .unwrap();
    let dest = sftp_dir_at(&sshd, &key, 2, relay.addr.port(), known_hosts);
    // The control connection logs in over a quick path; every connection
    // after it (the striping sessions) is slow toward the server, so what
    // a striping session sends reaches the server well after what the
    // control connection sends later.
    dest.list("").await.unwrap();
    let lag = Duration::from_millis(400);
    relay.set_options(RelayOptions {
        up: Shape {
            rate: None,
            delay: lag,
        },
        down: Shape::default(),
    });
    // A striped file written and read back: the sessions are logged in.
    let data = ranges::pattern(3 << 20);
    let mut up = dest.create("c/n/warm").await.unwrap();
    up.write(&data).await.unwrap();
    assert_eq!(up.finish().await.unwrap(), data.len() as u64);
    assert_eq!(
        std::fs::read(backups(&sshd).join("c/n/warm")).unwrap(),
        data
    );
    assert!(
        relay.open_connections() >= 3,
        "{}",
        relay.open_connections()
    );

    // A create cut off while its striping sessions' requests are on the
    // way, then the clean-up's delete (over the control connection), as a
    // cancelled run does.
    let path = "c/n/cut.partial";
    let cut = tokio::time::timeout(lag / 4, dest.create(path)).await;
    assert!(cut.is_err(), "the create finished before the sessions' lag");
    dest.delete(path).await.unwrap();
    // Every request sent has reached the server long since.
    tokio::time::sleep(lag * 3).await;
    let left: Vec<String> = dest
        .list("c/n")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(left, ["warm"], "the cut-off create left a file behind");
}
