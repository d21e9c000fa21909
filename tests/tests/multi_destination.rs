//! Several destinations in one run: a local directory and a real OpenSSH
//! server, fed from one snapshot read of a real etcd (counted on etcd's own
//! `/metrics`: `grpc_server_started_total` of `Maintenance/Snapshot`), each
//! copy complete or absent on its own, `--destination` on the commands, and
//! a run the SFTP server dies in the middle of: partial, reported per
//! destination by the CLI, the HTTP API and the metrics.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_backup_proto::api::{DestinationResultKind, RunRecord, RunState};
use etcd_backup_proto::{FileKind, Manifest};
use etcd_backup_tests::agent::{
    assert_partial_run_metrics, backup, run_agent, AgentConfig, AgentDaemon,
};
use etcd_backup_tests::etcd::{snapshot_rpcs, write_history, EtcdServer};
use etcd_backup_tests::sftp_setup::backups;
use etcd_backup_tests::sshd::{ClientKey, KeyKind, SshOptions, SshServer};
use etcd_backup_tests::{complete_sets, files_below, free_port, wait_for};

fn key_server(key: &ClientKey) -> SshServer {
    SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        ..SshOptions::default()
    })
}

fn manifest(set_dir: &Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(set_dir.join("manifest.json")).unwrap()).unwrap()
}

/// `destinations:` with a local directory named `local` and `sshd` named
/// `offsite`, in that order.
fn destinations_yaml(local: &Path, sshd: &SshServer, key: &ClientKey) -> String {
    format!(
        "destinations:\n  - name: local\n    local:\n      path: {}\n  - name: offsite\n    sftp:\n      host: 127.0.0.1\n      port: {}\n      user: {}\n      path: {}\n      known_hosts_file: {}\n      private_key_file: {}\n      connect_timeout: 5s\n      io_timeout: 10s\n",
        local.display(),
        sshd.port,
        SshServer::key_user(),
        backups(sshd).display(),
        sshd.known_hosts_file().display(),
        key.private_key.display()
    )
}

fn cli(config: &Path, args: &[&str]) -> etcd_backup_tests::agent::AgentRun {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", config.to_str().unwrap()]);
    run_agent(&all)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_read_two_complete_copies_commands_per_destination_and_a_partial_run() {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    write_history(&mut client, "/registry/multi", 200).await;
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let mut sshd = key_server(&key);
    let work = tempfile::tempdir().unwrap();
    let local = work.path().join("local");
    let mut cfg = AgentConfig::new(&etcd, &local);
    cfg.destination_yaml = Some(destinations_yaml(&local, &sshd, &key));
    let config = cfg.write(work.path());
    let remote = backups(&sshd);

    let before = snapshot_rpcs(&etcd).await;
    let run = backup(&config);
    run.assert_code(0);
    assert_eq!(
        snapshot_rpcs(&etcd).await - before,
        1.0,
        "one run, one snapshot read"
    );
    assert!(run.stdout.contains("destination local"), "{}", run.stdout);
    assert!(run.stdout.contains("destination offsite"), "{}", run.stdout);

    // The same set at both, byte for byte, each with its own manifest.
    let sets = complete_sets(&local);
    assert_eq!(sets.len(), 1, "{:?}", files_below(&local));
    assert_eq!(complete_sets(&remote), sets);
    let (ml, mr) = (
        manifest(&local.join(&sets[0])),
        manifest(&remote.join(&sets[0])),
    );
    let snap = ml.file(FileKind::Snapshot).unwrap();
    assert_eq!(snap, mr.file(FileKind::Snapshot).unwrap());
    assert_eq!(
        std::fs::read(local.join(&sets[0]).join(&snap.name)).unwrap(),
        std::fs::read(remote.join(&sets[0]).join(&snap.name)).unwrap()
    );

    // Every command reads the first destination unless told otherwise.
    for name in ["local", "offsite"] {
        let run = cli(&config, &["verify", "latest", "--destination", name]);
        run.assert_code(0);
        assert!(run.stdout.contains("ok "), "{name}: {}", run.stdout);
        let run = cli(&config, &["list", "--destination", name, "-o", "json"]);
        run.assert_code(0);
        assert!(run.stdout.contains(&sets[0]), "{name}: {}", run.stdout);
        let out = work.path().join(format!("fetched-{name}"));
        let run = cli(
            &config,
            &[
                "fetch",
                "latest",
                "--snapshot-only",
                "--to",
                out.to_str().unwrap(),
                "--destination",
                name,
            ],
        );
        run.assert_code(0);
        let fetched: Vec<PathBuf> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(fetched.len(), 1, "{fetched:?}");
        assert_eq!(
            std::fs::read(&fetched[0]).unwrap(),
            std::fs::read(local.join(&sets[0]).join(&snap.name)).unwrap()
        );
        cli(&config, &["prune", "--dry-run", "--destination", name]).assert_code(0);
    }
    // Only `offsite` holds this leftover; prune without --destination
    // works on the first destination and leaves it.
    let stray = remote.join("test/master-0/2020-01-01_000000");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("snapshot_2020-01-01_000000.db.partial"), b"x").unwrap();
    filetime_old(&stray.join("snapshot_2020-01-01_000000.db.partial"));
    cli(&config, &["prune"]).assert_code(0);
    assert!(stray.exists());
    cli(&config, &["prune", "--destination", "offsite"]).assert_code(0);
    assert!(!stray.join("snapshot_2020-01-01_000000.db.partial").exists());

    // A restore drill from the SFTP copy: restored into a throwaway etcd,
    // it serves the keys.
    let run = cli(&config, &["drill", "latest", "--destination", "offsite"]);
    run.assert_code(0);
    assert!(run.stdout.contains(&sets[0]), "{}", run.stdout);

    let data_dir = work.path().join("restored");
    for args in [
        vec!["verify", "latest"],
        vec!["drill", "latest"],
        vec![
            "restore",
            "latest",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--name",
            "m0",
            "--initial-cluster",
            "m0=http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
        ],
    ] {
        let mut args = args;
        args.extend(["--destination", "nope"]);
        let run = cli(&config, &args);
        run.assert_code(2);
        assert!(
            run.stderr.contains("\"nope\"") && run.stderr.contains("local, offsite"),
            "{args:?}: {}",
            run.stderr
        );
    }
    assert!(!data_dir.exists());

    // The SFTP server gone: the local copy is made, the run is partial.
    sshd.kill_all();
    std::thread::sleep(Duration::from_millis(1100));
    let before = snapshot_rpcs(&etcd).await;
    let run = backup(&config);
    run.assert_code(1);
    assert_eq!(snapshot_rpcs(&etcd).await - before, 1.0);
    assert!(run.stderr.contains("backup partial"), "{}", run.stderr);
    assert!(
        run.stderr.contains("complete at local") && run.stderr.contains("offsite ("),
        "{}",
        run.stderr
    );
    assert_eq!(complete_sets(&local).len(), 2);
    assert_eq!(complete_sets(&remote), sets);
    cli(&config, &["verify", "latest", "--destination", "local"]).assert_code(0);
}

/// Makes a file older than any leftover threshold.
fn filetime_old(path: &Path) {
    let status = std::process::Command::new("touch")
        .args(["-d", "2020-01-01 00:00:00", path.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn sshd_killed_mid_run_leaves_the_local_copy_complete_and_the_run_partial_in_every_report() {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    // ~200 MiB, so the upload takes long enough to be cut in the middle.
    let value = vec![b'k'; 1024 * 1024];
    for i in 0..200 {
        client
            .put(format!("/registry/big/{i:04}"), value.clone(), None)
            .await
            .unwrap();
    }
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let mut sshd = key_server(&key);
    let work = tempfile::tempdir().unwrap();
    let local = work.path().join("local");
    let port = free_port();
    let mut cfg = AgentConfig::new(&etcd, &local);
    cfg.destination_yaml = Some(destinations_yaml(&local, &sshd, &key));
    cfg.extra = format!(
        "schedule: \"0 * * * *\"\nrun_on_start: never\nshutdown_grace: 3s\nhttp:\n  listen: 127.0.0.1:{port}\n"
    );
    let config = cfg.write(work.path());
    let daemon = AgentDaemon::start(&config, port);
    let remote = backups(&sshd);

    let http = reqwest::Client::new();
    let before = snapshot_rpcs(&etcd).await;
    let post = tokio::spawn({
        let url = daemon.url("/v1/backups?wait=true");
        let http = http.clone();
        async move {
            let r = http.post(url).send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        }
    });
    wait_for(
        "an SFTP upload in progress",
        Duration::from_secs(60),
        || {
            files_below(&remote).into_iter().find(|f| {
                f.ends_with(".db.partial")
                    && std::fs::metadata(remote.join(f))
                        .map(|m| m.len() > 20 << 20)
                        .unwrap_or(false)
            })
        },
    );
    sshd.kill_all();
    let (status, body) = tokio::time::timeout(Duration::from_secs(120), post)
        .await
        .expect("the run ends")
        .unwrap();
    assert_eq!(status.as_u16(), 500, "{body}\n{}", daemon.logs());
    let record: RunRecord = serde_json::from_str(&body).unwrap();
    assert_eq!(record.state, RunState::Partial, "{body}");
    assert_eq!(snapshot_rpcs(&etcd).await - before, 1.0);
    let by_name: Vec<(&str, DestinationResultKind, Option<&str>)> = record
        .destinations
        .iter()
        .map(|d| (d.name.as_str(), d.result, d.stage.as_deref()))
        .collect();
    assert_eq!(
        by_name,
        [
            ("local", DestinationResultKind::Succeeded, None),
            ("offsite", DestinationResultKind::Failed, Some("upload")),
        ],
        "{body}"
    );
    assert!(
        record.error.as_deref().unwrap().contains("offsite"),
        "{body}"
    );

    // The local copy is complete and verifies; the SFTP one is absent:
    // no manifest, at most `.partial` names left for prune.
    let sets = complete_sets(&local);
    assert_eq!(sets, vec![record.set.clone().unwrap()]);
    cli(&config, &["verify", "latest", "--destination", "local"]).assert_code(0);
    assert!(complete_sets(&remote).is_empty());
    let left = files_below(&remote);
    assert!(left.iter().all(|f| f.ends_with(".partial")), "{left:?}");

    // Metrics per destination.
    assert_partial_run_metrics(&daemon, "local", "offsite");
    daemon.stop(Duration::from_secs(15));
}
