//! What reaches stable storage, and in what order: the local destination's
//! syscalls, and those of OpenSSH's SFTP server storing a set, as `strace`
//! sees them; ProFTPD's answer to a directory sync; and a full SFTP disk
//! reported with what the server says is free.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use etcd_backup_tests::agent::{agent_bin, backup, AgentConfig};
use etcd_backup_tests::etcd::EtcdServer;
use etcd_backup_tests::fixtures::kubeadm_tree;
use etcd_backup_tests::sftp_setup::{backups, Login, SftpSetup, Trust, QUICK_TIMEOUTS};
use etcd_backup_tests::sshd::{ClientKey, KeyKind, SshOptions, SshServer};
use etcd_backup_tests::tmpfs::Tmpfs;
use etcd_backup_tests::{complete_sets, files_below, require_tool};

/// One traced syscall that succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    /// fsync or fdatasync of the file or directory at this path.
    Sync(PathBuf),
    /// rename, renameat or renameat2.
    Rename(PathBuf, PathBuf),
    /// mkdir or mkdirat.
    Mkdir(PathBuf),
    /// link or linkat: how OpenSSH's sftp-server renames a regular file
    /// (link to the new name, then unlink the old one).
    Link(PathBuf, PathBuf),
    /// unlink or unlinkat.
    Unlink(PathBuf),
    /// openat of a path for writing, creating it (`O_CREAT`).
    Create(PathBuf),
    /// openat of an existing path for writing (no `O_CREAT`).
    OpenWrite(PathBuf),
}

/// A call and the trace lines where it started and returned.
#[derive(Debug, Clone)]
struct Event {
    call: Call,
    /// The process (or thread) that made it.
    pid: String,
    start: usize,
    end: usize,
}

/// The first `<...>` of `s`: the path `strace -y` shows for a descriptor.
fn fd_path(s: &str) -> Option<PathBuf> {
    let open = s.find('<')?;
    let close = open + s[open..].find('>')?;
    Some(PathBuf::from(&s[open + 1..close]))
}

/// The quoted strings of `s` (paths; the agent's need no escapes).
fn quoted(s: &str) -> Vec<PathBuf> {
    s.split('"').skip(1).step_by(2).map(PathBuf::from).collect()
}

fn parse_call(name: &str, args: &str) -> Option<Call> {
    match name {
        "fsync" | "fdatasync" => fd_path(args).map(Call::Sync),
        "rename" | "renameat" | "renameat2" => {
            let q = quoted(args);
            (q.len() >= 2).then(|| Call::Rename(q[0].clone(), q[1].clone()))
        }
        "mkdir" | "mkdirat" => quoted(args).first().cloned().map(Call::Mkdir),
        "link" | "linkat" => {
            let q = quoted(args);
            (q.len() >= 2).then(|| Call::Link(q[0].clone(), q[1].clone()))
        }
        "unlink" | "unlinkat" => quoted(args).first().cloned().map(Call::Unlink),
        "openat" if args.contains("O_WRONLY") || args.contains("O_RDWR") => {
            let path = quoted(args).first().cloned();
            if args.contains("O_CREAT") {
                path.map(Call::Create)
            } else {
                path.map(Call::OpenWrite)
            }
        }
        _ => None,
    }
}

/// The successful calls in an `strace -f -y` output, in order of their
/// start, with interrupted calls (`<unfinished ...>` / `<... resumed>`)
/// joined per thread.
fn parse_trace(text: &str) -> Vec<Event> {
    let mut events = Vec::new();
    // Per thread: the call in progress, as (name, args so far, start line).
    let mut pending: HashMap<&str, (String, String, usize)> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        let (name, args, start, result) = if let Some(resumed) = rest.strip_prefix("<... ") {
            let Some((name, args, start)) = pending.remove(pid) else {
                continue;
            };
            let tail = resumed.split_once("resumed>").map_or("", |(_, t)| t);
            let (more, result) = tail.rsplit_once(" = ").unwrap_or((tail, ""));
            (name, format!("{args}{more}"), start, result.to_string())
        } else {
            let Some((name, args)) = rest.split_once('(') else {
                continue;
            };
            if let Some(head) = args.strip_suffix("<unfinished ...>") {
                pending.insert(pid, (name.to_string(), head.to_string(), i));
                continue;
            }
            let (args, result) = args.rsplit_once(" = ").unwrap_or((args, ""));
            (name.to_string(), args.to_string(), i, result.to_string())
        };
        // 0, or a descriptor for openat; never -1 (failed) or ? (cut off).
        if result
            .trim_start()
            .starts_with(|c: char| c.is_ascii_digit())
        {
            if let Some(call) = parse_call(&name, &args) {
                events.push(Event {
                    call,
                    pid: pid.to_string(),
                    start,
                    end: i,
                });
            }
        }
    }
    events.sort_by_key(|e| e.start);
    events
}

#[test]
fn the_parser_joins_interrupted_calls_and_keeps_only_successes() {
    let trace = "\
10 mkdir(\"/d/a\", 0700) = 0
11 fsync(7</d/a/x.partial> <unfinished ...>
10 openat(AT_FDCWD</>, \"/d/a/x.partial\", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0600) = 7</d/a/x.partial>
11 <... fsync resumed>) = 0
10 renameat2(AT_FDCWD</>, \"/d/a/x.partial\", AT_FDCWD</>, \"/d/a/x\", RENAME_NOREPLACE) = 0
10 rename(\"/d/a/y.partial\", \"/d/a/y\") = -1 ENOENT (No such file or directory)
12 fsync(8</d/a>) = 0
";
    let events = parse_trace(trace);
    let calls: Vec<&Call> = events.iter().map(|e| &e.call).collect();
    assert_eq!(
        calls,
        [
            &Call::Mkdir("/d/a".into()),
            &Call::Sync("/d/a/x.partial".into()),
            &Call::Create("/d/a/x.partial".into()),
            &Call::Rename("/d/a/x.partial".into(), "/d/a/x".into()),
            &Call::Sync("/d/a".into()),
        ]
    );
    assert_eq!((events[1].start, events[1].end), (1, 3));
    assert_eq!(events[1].pid, "11");
}

#[test]
fn a_local_backup_syncs_each_file_before_its_rename_each_directory_after_and_the_manifest_last() {
    require_tool("strace", "strace");
    let etcd = EtcdServer::start();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("k8s");
    kubeadm_tree(&root);
    // Not there yet: the agent creates the destination and every directory
    // below it.
    let dest = work.path().join("dest");
    let mut cfg = AgentConfig::new(&etcd, &dest);
    cfg.layout = "kubeadm".into();
    cfg.root = Some(root);
    let config = cfg.write(work.path());
    let trace_file = work.path().join("trace");
    let out = Command::new("strace")
        .args(["-f", "-y", "-qq", "-s", "4096", "-o"])
        .arg(&trace_file)
        .args([
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2,openat,mkdir,mkdirat",
        ])
        .arg(agent_bin())
        .args(["backup", "--config", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run strace");
    let trace = std::fs::read_to_string(&trace_file).unwrap_or_default();
    assert!(
        out.status.success(),
        "backup under strace failed:\n{}\n{trace}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sets = complete_sets(&dest);
    assert_eq!(sets.len(), 1, "{:?}", files_below(&dest));
    let set_dir = dest.join(&sets[0]);

    // The destination and its parent, the test's directory.
    let events: Vec<Event> = parse_trace(&trace)
        .into_iter()
        .filter(|e| match &e.call {
            Call::Sync(p)
            | Call::Mkdir(p)
            | Call::Rename(p, _)
            | Call::Link(p, _)
            | Call::Unlink(p)
            | Call::Create(p)
            | Call::OpenWrite(p) => p.starts_with(work.path()),
        })
        .collect();
    let dump = || {
        events
            .iter()
            .map(|e| format!("{:>5}-{:<5} {:?}", e.start, e.end, e.call))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let renames: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e.call, Call::Rename(..)))
        .collect();
    let names: Vec<String> = renames
        .iter()
        .map(|e| match &e.call {
            Call::Rename(from, to) => {
                assert_eq!(
                    from.as_os_str().to_string_lossy(),
                    format!("{}.partial", to.display()),
                    "{}",
                    dump()
                );
                assert_eq!(to.parent(), Some(set_dir.as_path()), "{}", dump());
                to.file_name().unwrap().to_string_lossy().into_owned()
            }
            _ => unreachable!(),
        })
        .collect();
    // Both data files, then the manifest, last of all.
    assert_eq!(names.len(), 3, "{}", dump());
    assert!(names[0].starts_with("snapshot_"), "{}", dump());
    assert!(names[1].starts_with("static_kuberesources_"), "{}", dump());
    assert_eq!(names[2], "manifest.json", "{}", dump());

    let synced = |path: &Path, after: usize, before: usize| {
        events
            .iter()
            .any(|e| e.call == Call::Sync(path.to_path_buf()) && e.start > after && e.end < before)
    };
    for (n, r) in renames.iter().enumerate() {
        let Call::Rename(from, _) = &r.call else {
            unreachable!()
        };
        // The file's content reached the disk before it got its final name.
        assert!(
            synced(from, 0, r.start),
            "{} was not synced before its rename\n{}",
            from.display(),
            dump()
        );
        // The directory entry reached the disk before the next step
        // (the next rename, or the end of the run).
        let next = renames.get(n + 1).map_or(usize::MAX, |e| e.start);
        assert!(
            synced(&set_dir, r.end, next),
            "{} was not synced after the rename of {}\n{}",
            set_dir.display(),
            from.display(),
            dump()
        );
    }

    // Every directory the agent made is recorded in its parent on disk
    // before anything is published into it.
    let mkdirs: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e.call, Call::Mkdir(_)))
        .collect();
    let made: Vec<&Path> = mkdirs
        .iter()
        .map(|e| match &e.call {
            Call::Mkdir(p) => p.as_path(),
            _ => unreachable!(),
        })
        .collect();
    assert!(made.contains(&dest.as_path()), "{}", dump());
    assert!(made.contains(&set_dir.as_path()), "{}", dump());
    for e in mkdirs {
        let Call::Mkdir(dir) = &e.call else {
            unreachable!()
        };
        let parent = dir.parent().unwrap();
        assert!(
            synced(parent, e.end, renames[0].start),
            "{} was not synced after {} was made\n{}",
            parent.display(),
            dir.display(),
            dump()
        );
    }
}

/// `strace -f` attached to a running process and everything it forks
/// from then on; detached (and its output complete) by [`Tracer::finish`].
struct Tracer {
    child: std::process::Child,
    out: PathBuf,
}

impl Tracer {
    /// Attaches to `pid`; returns once the kernel says it is traced.
    fn attach(pid: u32, out: &Path) -> Self {
        require_tool("strace", "strace");
        let child = Command::new("strace")
            .args(["-f", "-y", "-qq", "-s", "4096", "-o"])
            .arg(out)
            .args([
                "-e",
                "trace=fsync,fdatasync,rename,renameat,renameat2,link,linkat,unlink,unlinkat,openat",
                "-p",
                &pid.to_string(),
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("start strace");
        let status = format!("/proc/{pid}/status");
        let started = std::time::Instant::now();
        loop {
            let text = std::fs::read_to_string(&status).unwrap_or_default();
            let tracer = text
                .lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .map(|v| v.trim().to_string());
            if tracer.is_some_and(|t| t != "0") {
                break;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "strace did not attach to {pid}: {text}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Self {
            child,
            out: out.to_path_buf(),
        }
    }

    /// Detaches (SIGTERM: strace lets its tracees go and flushes) and
    /// returns the trace.
    fn finish(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

/// OpenSSH's sftp-server (sshd's internal-sftp, traced with `strace -f`)
/// while the agent stores a set with its default 16 streams: every session
/// that wrote the snapshot synced it before its rename (not lane 0's alone),
/// and the set directory was synced after the data files' renames (before
/// the manifest was created) and after the manifest's, so no rename that
/// publishes the set can be undone by a crash of the server. The run
/// waits for the answer to that last sync before it reports success.
#[tokio::test(flavor = "multi_thread")]
async fn an_sftp_backup_syncs_every_lane_of_each_file_and_the_set_directory_after_its_renames() {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    // About 6 MiB of snapshot: several 256 KiB stripe blocks per lane.
    let value = vec![b'v'; 64 * 1024];
    for i in 0..96 {
        client
            .put(format!("/registry/big/{i:03}"), value.clone(), None)
            .await
            .unwrap();
    }
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        ..SshOptions::default()
    });
    let base = backups(&sshd);
    let s = SftpSetup::new();
    let cfg = s.config(
        &etcd,
        &sshd,
        Trust::KnownHosts(sshd.known_hosts_line()),
        Login::Key(&key, None),
        QUICK_TIMEOUTS,
    );
    let config = s.write(&cfg);
    let work = tempfile::tempdir().unwrap();
    let tracer = Tracer::attach(sshd.pid().expect("sshd runs"), &work.path().join("trace"));
    let run = backup(&config);
    // The sessions end with the agent; give their processes a moment to
    // exit before detaching.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let trace = tracer.finish();
    run.assert_code(0);
    let sets = complete_sets(&base);
    assert_eq!(sets.len(), 1, "{:?}", files_below(&base));
    let set_dir = base.join(&sets[0]);
    let manifest: etcd_backup_proto::Manifest =
        serde_json::from_str(&std::fs::read_to_string(set_dir.join("manifest.json")).unwrap())
            .unwrap();
    assert!(manifest.durable && manifest.durability.is_none());

    let events: Vec<Event> = parse_trace(&trace)
        .into_iter()
        .filter(|e| match &e.call {
            Call::Sync(p)
            | Call::Mkdir(p)
            | Call::Rename(p, _)
            | Call::Link(p, _)
            | Call::Unlink(p)
            | Call::Create(p)
            | Call::OpenWrite(p) => p.starts_with(&base),
        })
        .collect();
    let dump = || {
        events
            .iter()
            .map(|e| format!("{:>6} {:>5}-{:<5} {:?}", e.pid, e.start, e.end, e.call))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // A rename is done when its old name is gone: sftp-server links the new
    // name, then unlinks the old (or calls rename(2) where links fail).
    let renamed = |name: &str| -> (usize, usize) {
        let to = set_dir.join(name);
        let from = PathBuf::from(format!("{}.partial", to.display()));
        let start = events
            .iter()
            .find(|e| {
                e.call == Call::Link(from.clone(), to.clone())
                    || e.call == Call::Rename(from.clone(), to.clone())
            })
            .unwrap_or_else(|| panic!("no rename of {}\n{}", from.display(), dump()));
        let end = match start.call {
            Call::Link(..) => {
                events
                    .iter()
                    .find(|e| e.start > start.end && e.call == Call::Unlink(from.clone()))
                    .unwrap_or_else(|| {
                        panic!("{} linked but never unlinked\n{}", from.display(), dump())
                    })
                    .end
            }
            _ => start.end,
        };
        (start.start, end)
    };
    let dir_synced = |after: usize, before: usize| {
        events
            .iter()
            .any(|e| e.call == Call::Sync(set_dir.clone()) && e.start > after && e.end < before)
    };
    let opened = |path: &Path| {
        events
            .iter()
            .find(|e| {
                e.call == Call::Create(path.to_path_buf())
                    || e.call == Call::OpenWrite(path.to_path_buf())
            })
            .unwrap_or_else(|| panic!("{} never opened\n{}", path.display(), dump()))
            .start
    };

    let snapshot = &manifest
        .file(etcd_backup_proto::FileKind::Snapshot)
        .unwrap()
        .name;
    let data: Vec<String> = manifest.files.iter().map(|f| f.name.clone()).collect();
    let manifest_created = opened(&set_dir.join("manifest.json.partial"));
    for name in &data {
        let (_, done) = renamed(name);
        assert!(
            done < manifest_created,
            "{name} renamed after the manifest was begun\n{}",
            dump()
        );
        assert!(
            dir_synced(done, manifest_created),
            "{} was not synced after the rename of {name}, before the manifest\n{}",
            set_dir.display(),
            dump()
        );
    }
    let (_, manifest_done) = renamed("manifest.json");
    assert!(
        dir_synced(manifest_done, usize::MAX),
        "{} was not synced after the manifest's rename\n{}",
        set_dir.display(),
        dump()
    );

    // The control session created the snapshot's file, and wrote nothing
    // through that handle: every striping session opened it (without
    // creating it), wrote its blocks, and synced it before its rename;
    // several did (the default streams stripe it).
    let partial = set_dir.join(format!("{snapshot}.partial"));
    let (rename_start, _) = renamed(snapshot);
    let creators: Vec<&str> = events
        .iter()
        .filter(|e| e.call == Call::Create(partial.clone()))
        .map(|e| e.pid.as_str())
        .collect();
    assert_eq!(creators.len(), 1, "created once\n{}", dump());
    let writers: std::collections::BTreeSet<&str> = events
        .iter()
        .filter(|e| e.call == Call::OpenWrite(partial.clone()))
        .map(|e| e.pid.as_str())
        .collect();
    assert!(
        writers.len() > 1,
        "the snapshot was written by {} session(s); the test needs it striped\n{}",
        writers.len(),
        dump()
    );
    assert!(
        !writers.contains(creators[0]),
        "the session that created the snapshot's file opened it again\n{}",
        dump()
    );
    for pid in &writers {
        assert!(
            events.iter().any(|e| e.pid == *pid
                && e.call == Call::Sync(partial.clone())
                && e.end < rename_start),
            "session {pid} wrote {} but never synced it before its rename\n{}",
            partial.display(),
            dump()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_sftp_disk_fails_at_once_and_says_how_much_is_free() {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    // A snapshot of about 4 MiB, into 1 MiB.
    let value = vec![b'v'; 64 * 1024];
    for i in 0..64 {
        client
            .put(format!("/registry/big/{i:03}"), value.clone(), None)
            .await
            .unwrap();
    }
    let key = ClientKey::generate(KeyKind::Ed25519, None);
    let sshd = SshServer::start(SshOptions {
        authorized_keys: vec![key.public_line.clone()],
        ..SshOptions::default()
    });
    let base = backups(&sshd);
    std::fs::create_dir_all(&base).unwrap();
    let _disk = Tmpfs::mount_at(&base, 1 << 20);
    let s = SftpSetup::new();
    let mut cfg = s.config(
        &etcd,
        &sshd,
        Trust::KnownHosts(sshd.known_hosts_line()),
        Login::Key(&key, None),
        QUICK_TIMEOUTS,
    );
    cfg.retry_attempts = 3;
    cfg.retry_initial_delay = "5s".into();
    let run = backup(&s.write(&cfg));
    run.assert_code(1);
    for wanted in ["stage upload", "may be full", "free of 1.0 MiB"] {
        assert!(
            run.stderr.contains(wanted),
            "{wanted:?} not in:\n{}",
            run.stderr
        );
    }
    assert!(
        !run.stderr.contains("retrying"),
        "a full disk was retried:\n{}",
        run.stderr
    );
    // The partial was removed again: the disk is as empty as it was.
    assert!(complete_sets(&base).is_empty());
    assert!(files_below(&base).is_empty(), "{:?}", files_below(&base));
}
