//! Backups to ProFTPD's mod_sftp, a second real SFTP server: the ordinary
//! round trip (backup, list, verify, fetch, a restore with the real etcd
//! tools), and a server that cannot sync (`SFTPExtensions -fsync`): refused
//! by default, stored and recorded as not durable with `require_fsync: false`.
//! With fsync, ProFTPD syncs files but refuses to open a directory to sync
//! it, so its sets are recorded `"durability": "files_synced"`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_backup_proto::{DurabilityLevel, FileKind, Manifest};
use etcd_backup_tests::agent::{backup, run_agent, AgentConfig, AgentDaemon};
use etcd_backup_tests::etcd::{dump, restore_and_start, write_history, EtcdServer};
use etcd_backup_tests::proftpd::{ProftpdOptions, ProftpdServer};
use etcd_backup_tests::sftp_setup::destination_yaml;
use etcd_backup_tests::sshd::{ClientKey, KeyKind};
use etcd_backup_tests::{complete_sets, files_below, free_port, metric, wait_for_async};

/// A ProFTPD server that lets `key` in, with `SFTPExtensions` as given.
fn server(key: &ClientKey, extensions: Option<&str>) -> ProftpdServer {
    ProftpdServer::start(ProftpdOptions {
        authorized_keys: vec![key.public_line.clone()],
        extensions: extensions.map(str::to_string),
    })
}

/// A config backing up `etcd` to `server` under `<sftp_root>/backups`, with
/// `require_fsync` set when given (left to its default otherwise).
fn config(
    work: &Path,
    etcd: &EtcdServer,
    server: &ProftpdServer,
    key: &ClientKey,
    require_fsync: Option<bool>,
) -> AgentConfig {
    let known_hosts = work.join("known_hosts");
    std::fs::write(&known_hosts, format!("{}\n", server.known_hosts_line())).unwrap();
    let mut cfg = AgentConfig::new(etcd, &work.join("unused-local"));
    cfg.destination_yaml = Some(format!(
        "{}{}",
        destination_yaml(
            server.port,
            &ProftpdServer::user(),
            &backups(server),
            &known_hosts,
            &key.private_key,
        ),
        require_fsync.map_or(String::new(), |r| format!("    require_fsync: {r}\n")),
    ));
    cfg
}

fn backups(server: &ProftpdServer) -> PathBuf {
    server.sftp_root.join("backups")
}

fn location(server: &ProftpdServer) -> String {
    format!("sftp://{}@127.0.0.1:{}", ProftpdServer::user(), server.port)
}

fn list_json(config: &Path) -> serde_json::Value {
    let run = run_agent(&["list", "--config", config.to_str().unwrap(), "-o", "json"]);
    run.assert_code(0);
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_set_on_proftpd_is_listed_verified_fetched_and_restores_to_the_same_keyspace() {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    write_history(&mut client, "/registry/configmaps/default", 300).await;
    let before = dump(&mut client).await;
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let server = server(&key, None);
    let work = tempfile::tempdir().unwrap();
    let config = config(work.path(), &etcd, &server, &key, None).write(work.path());

    let run = backup(&config);
    run.assert_code(0);
    assert!(run.stdout.contains(&location(&server)), "{}", run.stdout);
    // ProFTPD (AllowOverwrite off, its default) refuses to open the partial
    // from a second session: the default streams fall back to the sessions
    // that could open it, with one warning that says what to change.
    assert_eq!(
        run.stderr.matches("AllowOverwrite on").count(),
        1,
        "{}",
        run.stderr
    );
    // A server with fsync@openssh.com: nothing to warn about.
    assert!(!run.stderr.contains("fsync@openssh.com"), "{}", run.stderr);

    let root = backups(&server);
    let sets = complete_sets(&root);
    assert_eq!(sets.len(), 1, "{:?}", files_below(&root));
    assert!(files_below(&root).iter().all(|f| !f.ends_with(".partial")));
    let set_dir = root.join(&sets[0]);
    let text = std::fs::read_to_string(set_dir.join("manifest.json")).unwrap();
    // ProFTPD syncs files but not directories: it refuses to open the set
    // directory as a file, so the renames that publish the set cannot be
    // synced. The set is stored, recorded as files synced only, with one
    // warning that gives the server's answer.
    let m: Manifest = serde_json::from_str(&text).unwrap();
    assert!(!m.durable, "{text}");
    assert_eq!(m.durability, Some(DurabilityLevel::FilesSynced), "{text}");
    let warnings: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("cannot sync the set directory"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", run.stderr);
    eprintln!("ProFTPD's answer to the directory sync: {}", warnings[0]);
    assert!(
        run.stdout
            .contains("the server would not sync the set directory"),
        "{}",
        run.stdout
    );
    let dir = set_dir.display().to_string();
    let all = server.requests();
    let on_dir: Vec<&String> = all
        .iter()
        .filter(|r| r.ends_with(&dir) || r.contains(&format!("{dir} ")))
        .collect();
    eprintln!("ProFTPD's requests on the set directory: {on_dir:#?}");
    let snap = m.file(FileKind::Snapshot).unwrap();
    assert_eq!(
        std::fs::metadata(set_dir.join(&snap.name)).unwrap().len(),
        snap.size
    );

    // Each file, the manifest's partial included, was synced on the server
    // after its last write, and before it was closed and renamed.
    let requests = server.requests();
    for name in [snap.name.as_str(), "manifest.json"] {
        let partial = format!("{}.partial", set_dir.join(name).display());
        let at = |prefix: &str| {
            requests
                .iter()
                .position(|r| r.starts_with(prefix) && r.contains(&partial))
                .unwrap_or_else(|| panic!("no {prefix} of {partial} in {requests:#?}"))
        };
        let (open, rename) = (at("OPEN "), at("RENAME "));
        let between = &requests[open..rename];
        let last_write = between.iter().rposition(|r| r.starts_with("WRITE "));
        let fsync = between
            .iter()
            .rposition(|r| r == "EXTENDED fsync@openssh.com");
        let close = between.iter().rposition(|r| r.starts_with("CLOSE "));
        assert!(
            matches!((last_write, fsync, close), (Some(w), Some(f), Some(c)) if w < f && f < c),
            "{name}: not written, synced, closed, renamed in that order: {between:#?}"
        );
    }

    let list = list_json(&config);
    assert_eq!(list["sets"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["sets"][0]["set"], sets[0].as_str(), "{list}");
    assert_eq!(list["sets"][0]["durable"], false, "{list}");

    run_agent(&["verify", "--config", config.to_str().unwrap(), "latest"]).assert_code(0);

    let fetched = work.path().join("fetched");
    run_agent(&[
        "fetch",
        "--config",
        config.to_str().unwrap(),
        "latest",
        "--to",
        fetched.to_str().unwrap(),
        "--snapshot-only",
    ])
    .assert_code(0);
    let restored = restore_and_start(&fetched.join(&snap.name), work.path());
    assert!(
        dump(&mut restored.client().await).await == before,
        "the keyspace restored from ProFTPD differs"
    );
}

#[test]
fn proftpd_without_fsync_is_refused_by_default_and_nothing_is_written() {
    let etcd = EtcdServer::start();
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let server = server(&key, Some("-fsync"));
    let work = tempfile::tempdir().unwrap();
    let mut cfg = config(work.path(), &etcd, &server, &key, None);
    // Refusing is permanent: a retry would be refused the same way.
    cfg.retry_attempts = 3;
    cfg.retry_initial_delay = "5s".into();
    let run = backup(&cfg.write(work.path()));
    run.assert_code(1);
    for wanted in [
        "stage upload",
        location(&server).as_str(),
        "does not offer fsync@openssh.com",
        "destination.sftp.require_fsync",
    ] {
        assert!(
            run.stderr.contains(wanted),
            "{wanted:?} not in:\n{}",
            run.stderr
        );
    }
    assert!(
        run.elapsed < Duration::from_secs(4),
        "a refusal was retried: {:?}",
        run.elapsed
    );
    // Not a file, not a directory.
    let left: Vec<_> = std::fs::read_dir(&server.sftp_root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn proftpd_without_fsync_and_require_fsync_false_stores_sets_marked_not_durable() {
    let etcd = EtcdServer::start();
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let server = server(&key, Some("-fsync"));
    let work = tempfile::tempdir().unwrap();
    let mut cfg = config(work.path(), &etcd, &server, &key, Some(false));
    let port = free_port();
    // Runs only when asked to.
    cfg.extra = format!(
        "schedule: \"0 0 1 1 *\"\nrun_on_start: never\nhttp:\n  listen: 127.0.0.1:{port}\n"
    );
    let config = cfg.write(work.path());
    let daemon = AgentDaemon::start(&config, port);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();

    let record: serde_json::Value = http
        .post(daemon.url("/v1/backups?wait=true"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(record["state"], "succeeded", "{record}\n{}", daemon.logs());

    // One WARN line, naming the server and the setting.
    let logs = daemon.logs();
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("fsync@openssh.com"))
        .collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert!(warnings[0].contains(&location(&server)), "{}", warnings[0]);
    assert!(
        warnings[0].contains("destination.sftp.require_fsync"),
        "{}",
        warnings[0]
    );

    let root = backups(&server);
    let sets = complete_sets(&root);
    assert_eq!(sets.len(), 1, "{:?}", files_below(&root));
    let text = std::fs::read_to_string(root.join(&sets[0]).join("manifest.json")).unwrap();
    assert!(text.contains("\"durable\": false"), "{text}");
    let m: Manifest = serde_json::from_str(&text).unwrap();
    assert!(!m.durable);
    // The server was never asked to sync what it cannot.
    let requests = server.requests();
    assert!(
        requests.iter().any(|r| r.starts_with("RENAME ")),
        "{requests:#?}"
    );
    assert!(
        !requests.iter().any(|r| r.contains("fsync")),
        "{requests:#?}"
    );

    let metrics = http
        .get(daemon.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(
            &metrics,
            "etcd_backup_not_durable_sets_total{destination=\"default\"}"
        ),
        1.0,
        "{metrics}"
    );

    // The API's set summaries and `list` say so too.
    let summary = wait_for_async(
        "the set in the API's summaries",
        Duration::from_secs(20),
        || {
            let http = http.clone();
            let url = daemon.url("/v1/backups");
            async move {
                let runs: serde_json::Value = http.get(url).send().await.ok()?.json().await.ok()?;
                runs["sets"].as_array()?.first().cloned()
            }
        },
    )
    .await;
    assert_eq!(summary["durable"], false, "{summary}");
    assert_eq!(list_json(&config)["sets"][0]["durable"], false);
    let table = run_agent(&["list", "--config", config.to_str().unwrap()]);
    table.assert_code(0);
    let mut lines = table.stdout.lines();
    let column = lines.next().unwrap().find("DURABLE").unwrap();
    let row = lines.next().unwrap();
    assert_eq!(
        row[column..].split_whitespace().next(),
        Some("no"),
        "{}",
        table.stdout
    );

    // Nothing crashed, so the set itself is whole.
    run_agent(&["verify", "--config", config.to_str().unwrap(), "latest"]).assert_code(0);

    // `backup` says so too, with one WARN line for its one connection.
    // (Sets are named by the second; keep this one apart.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let run = backup(&config);
    run.assert_code(0);
    assert!(run.stdout.contains("not durable"), "{}", run.stdout);
    let warnings = run
        .stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("fsync@openssh.com"))
        .count();
    assert_eq!(warnings, 1, "{}", run.stderr);
    assert_eq!(complete_sets(&root).len(), 2, "{:?}", files_below(&root));
}
