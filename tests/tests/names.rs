//! Names from a manifest are checked against the set naming scheme before any
//! local file operation: a tampered manifest that names a path outside the
//! set makes the set incomplete, and `fetch`, `verify` and `restore` touch
//! nothing for it.

use std::collections::BTreeMap;
use std::path::Path;

use etcd_backup_proto::Manifest;
use etcd_backup_tests::agent::{backup, run_agent, AgentConfig};
use etcd_backup_tests::complete_sets;
use etcd_backup_tests::etcd::{EtcdServer, EtcdVersion};

/// Every file below `dir` with its content.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    etcd_backup_tests::files_below(dir)
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(dir.join(&f)).unwrap();
            (f, bytes)
        })
        .collect()
}

#[test]
fn a_tampered_manifest_naming_a_path_outside_the_set_is_refused_and_nothing_is_touched() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let cfg = AgentConfig::new(&etcd, &dest);
    let config = cfg.write(work.path());
    backup(&config).assert_code(0);
    let set = dest.join(complete_sets(&dest).pop().unwrap());
    let manifest_path = set.join("manifest.json");
    let mut m: Manifest = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let ts = m.timestamp.to_string();
    // The snapshot moved one level up, and the manifest pointing there: the
    // name resolves to a real file (of the right size and hash) outside the set.
    let snap = m.files[0].name.clone();
    std::fs::rename(set.join(&snap), set.parent().unwrap().join(&snap)).unwrap();
    m.files[0].name = format!("../{snap}");
    std::fs::write(&manifest_path, serde_json::to_vec(&m).unwrap()).unwrap();
    // A file the fetch must not create or overwrite, beside the output directory.
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(work.path().join(&snap), b"not yours").unwrap();
    let before = contents(work.path());

    let config = config.to_str().unwrap();
    let data_dir = out.join("data").to_str().unwrap().to_string();
    let listed = run_agent(&["list", "--config", config, "--include-partial"]);
    listed.assert_code(0);
    assert!(
        listed.stdout.contains(&format!(
            "refusing file name \"../{snap}\" in backup set {ts}"
        )),
        "{}",
        listed.stdout
    );
    for args in [
        vec![
            "fetch",
            "--config",
            config,
            ts.as_str(),
            "--to",
            out.to_str().unwrap(),
        ],
        vec!["verify", "--config", config, ts.as_str()],
        vec![
            "restore",
            "--config",
            config,
            ts.as_str(),
            "--data-dir",
            data_dir.as_str(),
            "--name",
            "m0",
            "--initial-cluster",
            "m0=http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
        ]
        .into_iter()
        .chain(EtcdVersion::from_env().restore_args().iter().copied())
        .collect(),
        vec!["drill", "--config", config, ts.as_str()],
    ] {
        let run = run_agent(&args);
        assert_ne!(run.code, 0, "{args:?}: {}{}", run.stdout, run.stderr);
        assert!(
            run.stderr
                .contains("that set is incomplete: refusing file name"),
            "{args:?}: {}",
            run.stderr
        );
        assert_eq!(contents(work.path()), before, "{args:?} touched a file");
    }
}
