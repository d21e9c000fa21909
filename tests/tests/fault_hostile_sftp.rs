//! Fault matrix, hostile-server row: an SFTP server that lies. Its listings
//! hold `..`, `../x`, `../../escape`, absolute names and names with `/` and
//! NUL, all readable as hostile bytes; one set's manifest names
//! `../../escape` and an absolute path. `list`, `verify` and `fetch --to`
//! against it create, truncate or delete nothing outside `--to` (canary files
//! beside `--to`, in its parents and exactly where the escapes point are
//! compared by bytes and mtime; no new entry appears), the intact set still
//! verifies and fetches exactly its two data files, and the lying set is refused
//! with a message naming the bad name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use etcd_backup_proto::api::SetList;
use etcd_backup_proto::Manifest;
use etcd_backup_tests::agent::{backup, run_agent_in, AgentConfig, AgentRun};
use etcd_backup_tests::etcd::EtcdServer;
use etcd_backup_tests::fixtures::openshift_tree;
use etcd_backup_tests::hostile::{HostileSftp, HOSTILE_BYTES};
use etcd_backup_tests::{complete_sets, files_below};

/// The lying set's timestamp (older than the real one, so `latest` is real).
const LYING_TS: &str = "2020-06-01_000000";

/// Every entry below `dir` except `skip`: bytes (or `dir`/`link` marks) and
/// mtime (files and links), links not followed.
fn state(dir: &Path, skip: &[&Path]) -> BTreeMap<PathBuf, (Vec<u8>, SystemTime)> {
    fn walk(dir: &Path, skip: &[&Path], out: &mut BTreeMap<PathBuf, (Vec<u8>, SystemTime)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if skip.contains(&p.as_path()) {
                continue;
            }
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let mtime = meta.modified().unwrap();
            if meta.is_dir() {
                // A directory's mtime moves when --to is made in it; its
                // entries are compared one by one instead.
                out.insert(p.clone(), (b"dir".to_vec(), SystemTime::UNIX_EPOCH));
                walk(&p, skip, out);
            } else if meta.file_type().is_symlink() {
                out.insert(p.clone(), (b"link".to_vec(), mtime));
            } else {
                out.insert(p.clone(), (std::fs::read(&p).unwrap(), mtime));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, skip, &mut out);
    out
}

/// No file below `dir` holds the server's hostile bytes.
fn assert_no_hostile_bytes(dir: &Path, case: &str) {
    for f in files_below(dir) {
        let bytes = std::fs::read(dir.join(&f)).unwrap_or_default();
        assert!(
            !bytes
                .windows(HOSTILE_BYTES.len())
                .any(|w| w == HOSTILE_BYTES),
            "{case}: {f} holds what the lying server sent"
        );
    }
}

/// Runs the agent with `cwd` as its working directory, so relative escapes
/// would land inside the sandbox.
fn agent_in(cwd: &Path, args: &[&str]) -> AgentRun {
    let run = run_agent_in(Some(cwd), args);
    eprintln!(
        "{}: exit {}: {}",
        args[0],
        run.code,
        run.stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or("")
    );
    run
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in files_below(from) {
        std::fs::copy(from.join(&f), to.join(&f)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_sftp_server_cannot_make_list_verify_or_fetch_touch_anything_outside_to() {
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("k8s");
    openshift_tree(&root);
    // A real set, made locally, then served by the lying server.
    let seed = work.path().join("seed");
    let mut cfg = AgentConfig::new(&etcd, &seed);
    cfg.layout = "openshift".into();
    cfg.root = Some(root.clone());
    let seed_cfg_dir = work.path().join("seed-config");
    std::fs::create_dir(&seed_cfg_dir).unwrap();
    backup(&cfg.write(&seed_cfg_dir)).assert_code(0);
    let sets = complete_sets(&seed);
    assert_eq!(sets.len(), 1);
    let real_ts = sets[0].rsplit('/').next().unwrap().to_string();
    let real = seed.join(&sets[0]);

    let server = HostileSftp::start();
    let node = server.root.join("backups/test/master-0");
    copy_dir(&real, &node.join(&real_ts));

    // The sandbox: --to is sandbox/p1/p2/to; canaries everywhere an escape
    // could land, named as the lies and the manifest's names point.
    let sandbox = work.path().join("sandbox");
    let p2 = sandbox.join("p1/p2");
    std::fs::create_dir_all(&p2).unwrap();
    let abs_escape = sandbox.join("abs-escape");
    for (i, c) in [
        sandbox.join("canary"),
        sandbox.join("p1/canary"),
        sandbox.join("p1/escape"), // to/../../escape
        p2.join("canary"),
        p2.join("x"),         // to/../x
        sandbox.join("p1/y"), // the ../../y of a lie
        abs_escape.clone(),   // the manifest's absolute name
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(c, format!("canary {i}\n")).unwrap();
    }

    // The lying set: the real files, but a manifest naming escapes.
    let lying = node.join(LYING_TS);
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(real.join("manifest.json")).unwrap()).unwrap();
    std::fs::create_dir_all(&lying).unwrap();
    let mut v = serde_json::to_value(&m).unwrap();
    v["timestamp"] = LYING_TS.into();
    let hostile_names = ["../../escape".to_string(), abs_escape.display().to_string()];
    for (i, f) in m.files.iter().enumerate() {
        std::fs::copy(
            real.join(&f.name),
            lying.join(f.name.replace(&real_ts, LYING_TS)),
        )
        .unwrap();
        v["files"][i]["name"] = hostile_names[i].clone().into();
    }
    std::fs::write(lying.join("manifest.json"), serde_json::to_vec(&v).unwrap()).unwrap();

    let mut sftp_cfg = AgentConfig::new(&etcd, &work.path().join("unused"));
    sftp_cfg.destination_yaml = Some(server.destination_yaml("backups"));
    let cfg_dir = work.path().join("sftp-config");
    std::fs::create_dir(&cfg_dir).unwrap();
    let config = sftp_cfg.write(&cfg_dir);
    let config = config.to_str().unwrap();

    let to = p2.join("to");
    let to2 = p2.join("to2");
    let before = state(&sandbox, &[&to, &to2]);
    let check = |case: &str| {
        eprintln!("{case}: checked the sandbox");
        assert_eq!(
            state(&sandbox, &[&to, &to2]),
            before,
            "{case}: something outside --to was created, changed or deleted"
        );
        assert_no_hostile_bytes(&sandbox, case);
    };
    let failed_clearly = |run: &AgentRun, case: &str| {
        assert!(
            run.stderr.lines().any(|l| l.starts_with("error:")),
            "{case}: exit {} without a clear message:\nstdout:\n{}\nstderr:\n{}",
            run.code,
            run.stdout,
            run.stderr
        );
    };

    // list: the real set is listed; the lying one is not a complete set.
    let run = agent_in(
        &p2,
        &[
            "list",
            "--config",
            config,
            "--include-partial",
            "-o",
            "json",
        ],
    );
    check("list");
    match run.code {
        0 => {
            let list: SetList = serde_json::from_str(&run.stdout).unwrap();
            let complete: Vec<String> = list.sets.iter().map(|s| s.timestamp.to_string()).collect();
            assert_eq!(complete, vec![real_ts.clone()], "{}", run.stdout);
        }
        1 => failed_clearly(&run, "list"),
        other => panic!("list exit {other}: {}", run.stderr),
    }

    // The intact set verifies, and fetches exactly its three files.
    let run = agent_in(&p2, &["verify", "--config", config, &real_ts]);
    check("verify real");
    run.assert_code(0);
    let run = agent_in(
        &p2,
        &[
            "fetch",
            "--config",
            config,
            &real_ts,
            "--to",
            to.to_str().unwrap(),
        ],
    );
    check("fetch real");
    run.assert_code(0);
    // cluster-restore.sh's directory: the two data files, no manifest.
    let data: Vec<String> = files_below(&real)
        .into_iter()
        .filter(|f| f != "manifest.json")
        .collect();
    assert_eq!(files_below(&to), data);
    for f in data {
        assert_eq!(
            std::fs::read(to.join(&f)).unwrap(),
            std::fs::read(real.join(&f)).unwrap(),
            "{f}"
        );
    }

    // The lying set is refused, naming the bad name, and writes nothing.
    let run = agent_in(&p2, &["verify", "--config", config, LYING_TS]);
    check("verify lying");
    assert_eq!(run.code, 1, "verify of the lying set: {}", run.stdout);
    failed_clearly(&run, "verify lying");
    assert!(
        run.stderr.contains("../../escape") || run.stderr.contains("abs-escape"),
        "the message names the bad name: {}",
        run.stderr
    );
    let run = agent_in(
        &p2,
        &[
            "fetch",
            "--config",
            config,
            LYING_TS,
            "--to",
            to2.to_str().unwrap(),
        ],
    );
    check("fetch lying");
    assert_eq!(run.code, 1, "fetch of the lying set: {}", run.stdout);
    failed_clearly(&run, "fetch lying");
    assert_eq!(files_below(&to2), Vec::<String>::new());
    // The server's own tree is as it was (the commands only read).
    assert_eq!(files_below(&node.join(&real_ts)), files_below(&real));
    eprintln!("server log:\n{}", server.log());
}
