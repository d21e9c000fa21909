//! The SFTP connection itself, against a real OpenSSH server: host-key
//! algorithms negotiated as OpenSSH's client does (a server holding ed25519,
//! RSA and ECDSA keys, trusted through any one of them), and a server that
//! stalls mid-upload costing one `io_timeout`, with the clean-up done over a
//! fresh connection.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use etcd_backup_tests::agent::{backup, spawn_backup};
use etcd_backup_tests::etcd::EtcdServer;
use etcd_backup_tests::sftp_setup::{backups, Login, SftpSetup, Trust, QUICK_TIMEOUTS};
use etcd_backup_tests::sshd::{
    assert_refused_before_login, ClientKey, KeyKind, SshOptions, SshServer,
};
use etcd_backup_tests::{complete_sets, files_below, wait_for};

const ALL_KINDS: [KeyKind; 3] = [KeyKind::Ed25519, KeyKind::Rsa, KeyKind::Ecdsa];

/// A server holding an ed25519, an RSA and an ECDSA host key at once.
fn three_key_server(key: &ClientKey) -> SshServer {
    let sshd = SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        host_key: KeyKind::Ed25519,
        extra_host_keys: vec![KeyKind::Rsa, KeyKind::Ecdsa],
        ..SshOptions::default()
    });
    assert_eq!(sshd.host_key_kinds(), ALL_KINDS);
    sshd
}

#[test]
fn each_host_key_of_a_multi_key_server_is_trusted_alone_in_known_hosts_or_as_a_pin() {
    let etcd = EtcdServer::start();
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = three_key_server(&key);
    let logins = || sshd.log().matches("Accepted publickey").count();
    // Logins per run, by how the server was trusted.
    let mut per_run = Vec::new();
    for kind in ALL_KINDS {
        let line = sshd.known_hosts_line_of(kind);
        assert!(line.contains(kind.key_type()), "{line}");
        // Plain and hashed known_hosts lines naming only this key, then a pin
        // of only this key's fingerprint.
        let hashed = {
            let lines = sshd.hashed_known_hosts_line();
            // hashed_known_hosts_line hashes the main key's line; swap in
            // this kind's key after the hashed host field.
            let host_field = lines.split(' ').next().unwrap().to_string();
            format!("{host_field} {}", sshd.host_key_line_of(kind))
        };
        for trust in [
            Trust::KnownHosts(format!("# only the {kind:?} key\n{line}\n")),
            Trust::KnownHosts(format!("{hashed}\n")),
            Trust::Fingerprint(sshd.fingerprint_of(kind)),
        ] {
            let what = match &trust {
                Trust::KnownHosts(l) => format!("known_hosts {l:?}"),
                Trust::Fingerprint(fp) => format!("pin {fp}"),
            };
            let s = SftpSetup::new();
            let before = logins();
            let run = backup(&s.write(&s.config(
                &etcd,
                &sshd,
                trust,
                Login::Key(&key, None),
                QUICK_TIMEOUTS,
            )));
            assert_eq!(run.code, 0, "{kind:?} via {what}:\n{}", run.stderr);
            per_run.push((what, logins() - before));
            // Sets are named by the second; keep runs apart.
            std::thread::sleep(Duration::from_millis(1100));
        }
    }
    assert_eq!(complete_sets(&backups(&sshd)).len(), per_run.len());
    // A pin that did not match the first key presented cost extra key
    // exchanges, never an extra login: every run logged in as often as the
    // first (known_hosts) one, and no login failed.
    let first = per_run[0].1;
    assert!(first > 0);
    assert!(per_run.iter().all(|(_, n)| *n == first), "{per_run:?}");
    assert!(!sshd.log().contains("Failed"), "{}", sshd.log());
}

#[test]
fn a_key_the_multi_key_server_does_not_hold_is_refused_whatever_its_type() {
    let etcd = EtcdServer::start();
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = three_key_server(&key);
    let config = |s: &SftpSetup, trust| {
        let mut cfg = s.config(&etcd, &sshd, trust, Login::Key(&key, None), QUICK_TIMEOUTS);
        // Three attempts with a long back-off: a retry would show in the time.
        cfg.retry_attempts = 3;
        cfg.retry_initial_delay = "5s".into();
        s.write(&cfg)
    };

    // Another key of each type under this server's name: the server presents
    // its own key of that type, which does not match.
    for kind in ALL_KINDS {
        let impostor = ClientKey::generate(kind, None);
        let s = SftpSetup::new();
        let trust = Trust::KnownHosts(format!(
            "[127.0.0.1]:{} {}\n",
            sshd.port, impostor.public_line
        ));
        assert_refused_before_login(&backup(&config(&s, trust)), &sshd, "does not match");
    }

    // A type the server has no key of: it presents its preferred one, which
    // is of a type not listed.
    let s = SftpSetup::new();
    let p384 = {
        // A real ECDSA P-384 key, which the server does not hold.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p384");
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", "", "-f"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        std::fs::read_to_string(path.with_extension("pub")).unwrap()
    };
    assert!(p384.starts_with("ecdsa-sha2-nistp384 "), "{p384}");
    let trust = Trust::KnownHosts(format!("[127.0.0.1]:{} {}", sshd.port, p384.trim()));
    assert_refused_before_login(
        &backup(&config(&s, trust)),
        &sshd,
        "is of a type not listed in",
    );

    // A pin of no key of the server's: every key it holds was asked for and
    // is named in the refusal.
    let s = SftpSetup::new();
    let wrong = etcd_backup_known_hosts::sha256_fingerprint(b"not the server's key");
    let run = backup(&config(&s, Trust::Fingerprint(wrong.clone())));
    assert_refused_before_login(&run, &sshd, &wrong);
    for kind in ALL_KINDS {
        let presented = format!("{} {}", kind.key_type(), sshd.fingerprint_of(kind));
        assert!(
            run.stderr.contains(&presented),
            "{presented:?} not in:\n{}",
            run.stderr
        );
    }
    assert!(
        run.stderr.contains("someone may be intercepting"),
        "{}",
        run.stderr
    );
}

/// Fills etcd with ~200 MiB, so that an upload is still going when the test
/// stops the server.
async fn big_etcd() -> EtcdServer {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    let value = vec![b's'; 1024 * 1024];
    for i in 0..200 {
        client
            .put(format!("/registry/big/{i:04}"), value.clone(), None)
            .await
            .unwrap();
    }
    etcd
}

const STALL_IO_TIMEOUT: Duration = Duration::from_secs(3);
const STALL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The functional bound on a stalled run: one io_timeout, one fresh
/// connection, and slack for a loaded machine (not a benchmark).
const STALL_BOUND: Duration = Duration::from_secs(3 + 5 + 10);

/// How a stalled run ended.
struct Stalled {
    code: Option<i32>,
    stderr: String,
    /// From the SIGSTOP to the agent's exit.
    after_stop: Duration,
    /// Logins sshd had accepted when it was stopped (the control connection
    /// and, with `destination.sftp.streams` > 1, one per stream).
    logins_at_stop: usize,
}

/// Starts `backup`, waits until the snapshot's partial on the server holds
/// 20 MiB, calls `stop` (which SIGSTOPs processes of `sshd` and returns their
/// pids), and waits for the agent to exit. The stopped processes are
/// resumed afterwards.
fn backup_stalled_by(sshd: &SshServer, config: &Path, stop: impl FnOnce() -> Vec<u32>) -> Stalled {
    let log = config.with_file_name("agent.log");
    let mut agent = spawn_backup(config, &log);
    let root = backups(sshd);
    wait_for("an upload in progress", Duration::from_secs(60), || {
        if let Some(status) = agent.try_wait().unwrap() {
            panic!(
                "the agent ended ({status}) before the server was stopped:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        files_below(&root).into_iter().find(|f| {
            f.ends_with(".db.partial")
                && std::fs::metadata(root.join(f))
                    .map(|m| m.len() > 20 << 20)
                    .unwrap_or(false)
        })
    });
    let logins_at_stop = sshd.log().matches("Accepted publickey").count();
    let stopped = stop();
    let t = Instant::now();
    let status = wait_for("the agent to exit", Duration::from_secs(120), || {
        agent.try_wait().unwrap()
    });
    let after_stop = t.elapsed();
    sshd.resume(&stopped);
    let stderr = std::fs::read_to_string(&log).unwrap();
    eprintln!(
        "the stalled run ended {after_stop:?} after the SIGSTOP; its last line: {}",
        stderr.lines().last().unwrap_or("")
    );
    Stalled {
        code: status.code(),
        stderr,
        after_stop,
        logins_at_stop,
    }
}

fn stall_timeouts() -> String {
    format!(
        "    connect_timeout: {}s\n    io_timeout: {}s\n",
        STALL_CONNECT_TIMEOUT.as_secs(),
        STALL_IO_TIMEOUT.as_secs()
    )
}

/// A big etcd, an sshd that trusts a new key, and a config backing up to it
/// with the stall tests' short timeouts. The etcd, the key's files and the
/// work directory must live as long as the test.
async fn stall_setup() -> (EtcdServer, ClientKey, SshServer, SftpSetup, PathBuf) {
    let etcd = big_etcd().await;
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        ..SshOptions::default()
    });
    let s = SftpSetup::new();
    let config = s.write(&s.config(
        &etcd,
        &sshd,
        Trust::KnownHosts(sshd.known_hosts_line()),
        Login::Key(&key, None),
        &stall_timeouts(),
    ));
    (etcd, key, sshd, s, config)
}

impl Stalled {
    /// The run failed (exit 1) within [`STALL_BOUND`] of the stall.
    fn assert_failed_within_bound(&self) {
        assert_eq!(self.code, Some(1), "{}", self.stderr);
        assert!(
            self.after_stop < STALL_BOUND,
            "took {:?} after the stall (bound {STALL_BOUND:?}):\n{}",
            self.after_stop,
            self.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_session_costs_one_io_timeout_and_the_partials_go_over_a_fresh_connection() {
    let (_etcd, _key, sshd, _setup, config) = stall_setup().await;

    let run = backup_stalled_by(&sshd, &config, || {
        let pids = sshd.stop_sessions();
        assert!(!pids.is_empty(), "no session processes under sshd");
        pids
    });
    run.assert_failed_within_bound();
    assert!(run.stderr.contains("stage upload"), "{}", run.stderr);
    assert!(
        run.stderr.contains("destination.sftp.io_timeout")
            && run.stderr.contains(&format!("{STALL_IO_TIMEOUT:?}")),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("could not be removed"),
        "{}",
        run.stderr
    );

    // The clean-up logged in again: a fresh session, not a stalled one.
    let log = sshd.log();
    assert!(run.logins_at_stop >= 1, "{log}");
    assert_eq!(
        log.matches("Accepted publickey").count(),
        run.logins_at_stop + 1,
        "{log}"
    );
    // Nothing of the run is left: no file at all, and the set directory is
    // gone from the node's directory.
    let root = backups(&sshd);
    assert_eq!(files_below(&root), Vec::<String>::new());
    let node_dir = root.join("test").join("master-0");
    let left: Vec<_> = std::fs::read_dir(&node_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?} in {}", node_dir.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_session_and_listener_still_end_the_run_in_bounded_time_naming_what_is_left() {
    let (_etcd, _key, sshd, _setup, config) = stall_setup().await;

    let run = backup_stalled_by(&sshd, &config, || {
        let mut pids = vec![sshd.stop_listener()];
        pids.extend(sshd.stop_sessions());
        pids
    });
    run.assert_failed_within_bound();
    assert!(
        run.stderr.contains("destination.sftp.io_timeout"),
        "{}",
        run.stderr
    );
    // The fresh connection for the clean-up could not be made, and the run
    // says which of its files are left.
    assert!(
        run.stderr.contains("destination.sftp.connect_timeout"),
        "{}",
        run.stderr
    );
    let root = backups(&sshd);
    let left = files_below(&root);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].ends_with(".db.partial"), "{left:?}");
    assert!(
        run.stderr.contains("could not be removed") && run.stderr.contains(&left[0]),
        "{:?} not reported as left:\n{}",
        left[0],
        run.stderr
    );
    // No login after the stall.
    assert_eq!(
        sshd.log().matches("Accepted publickey").count(),
        run.logins_at_stop
    );
}
