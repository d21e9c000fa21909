//! The image, run as the DaemonSet runs it.
//!
//! `scripts/image --local-bases` (run by `scripts/test`) builds the real
//! Dockerfile with buildah and unpacks the final image into
//! `target/image/rootfs` (`ETCD_BACKUP_IMAGE_DIR` overrides the directory).
//! Each test starts that root file system under bubblewrap with exactly what
//! the rendered overlay gives the agent's container: its command, its
//! environment (NODE_NAME from the downward API), uid 0 with every capability
//! dropped and no new privileges, a read-only root, the host's network, and
//! each volumeMount (hostPath, ConfigMap, Secret read-only where the manifest
//! says so; emptyDir as a fresh directory, or tmpfs for `medium: Memory`).
//! Against a real TLS etcd and a real sshd on loopback it checks the daemon,
//! `trigger`, `drill` and `restore` from inside the image, for both overlays.
//!
//! What the sandbox cannot emulate (docs/development.md, "The image"): cgroup limits,
//! the kubelet's probes (the test polls the same endpoint), seccomp
//! RuntimeDefault and SCC admission.
//!
//! Missing tools or a missing image fail the tests with what to run; nothing
//! is skipped.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use etcd_backup_tests::etcd::{EtcdServer, EtcdVersion, DEFAULT_BUMP_REVISION};
use etcd_backup_tests::pod::{
    agent_config_text, agent_container, daemonset, expand, pod_mounts, point_at_test_servers,
    real_master, render, repo, run_ok, tool, write_file, yaml, EmptyDirMedium, Platform, NODE,
    OVERLAYS,
};
use etcd_backup_tests::sshd::{ClientKey, KeyKind, SshOptions, SshServer};
use etcd_backup_tests::tls::TlsFiles;
use etcd_backup_tests::{complete_sets, files_below, free_port, wait_for};

/// The unpacked image: its root file system and OCI config.
struct Image {
    rootfs: PathBuf,
    entrypoint: Vec<String>,
    env: Vec<String>,
    workdir: String,
    user: String,
}

fn image() -> Image {
    let dir = std::env::var_os("ETCD_BACKUP_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo().join("target"))
                .join("image")
        });
    let config = dir.join("inspect.json");
    let rootfs = dir.join("rootfs");
    assert!(
        config.is_file() && rootfs.join("usr/local/bin/etcd-backup-agent").is_file(),
        "no built image in {}: run `scripts/image --local-bases` first (scripts/test does)",
        dir.display()
    );
    let inspect: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let cfg = &inspect["OCIv1"]["config"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    Image {
        rootfs,
        entrypoint: strings(&cfg["Entrypoint"]),
        env: strings(&cfg["Env"]),
        workdir: cfg["WorkingDir"].as_str().unwrap_or("/").to_string(),
        user: cfg["User"].as_str().unwrap_or_default().to_string(),
    }
}

fn bwrap() -> PathBuf {
    tool(
        "bwrap",
        "run scripts/test, or `apt-get install bubblewrap` (Debian's package)",
    )
}

/// One master and the agent's pod on it, for one overlay: the host's files,
/// the volumes' contents, and the bubblewrap arguments that mount them.
struct Pod {
    work: tempfile::TempDir,
    /// The bwrap arguments up to (not including) the command.
    sandbox: Vec<OsString>,
    /// The container's command: the image's entrypoint and the DaemonSet's args.
    command: Vec<String>,
    /// emptyDir volumes by mount path: host directory.
    scratch: Vec<(String, PathBuf)>,
    /// The SFTP server's base directory for sets.
    base: PathBuf,
    expected_paths: Vec<String>,
}

/// What in the overlay's config differs from a real master: where etcd, the
/// SFTP server and the agent's listeners are, who logs in, and a schedule
/// short enough for a test.
struct Site<'a> {
    servers: &'a Servers,
    api_port: u16,
    metrics_port: u16,
    schedule: &'a str,
}

/// What the pod talks to: a real etcd with TLS client-certificate auth, and
/// a real sshd that accepts a freshly made client key.
struct Servers {
    tls: TlsFiles,
    etcd: EtcdServer,
    key: ClientKey,
    sshd: SshServer,
}

impl Servers {
    fn start() -> Self {
        let tls = TlsFiles::generate();
        let etcd = EtcdServer::start_tls(tls.clone());
        let key = ClientKey::generate(KeyKind::Ed25519, None);
        let sshd = SshServer::start(SshOptions {
            authorized_keys: vec![key.public_line.clone()],
            ..SshOptions::default()
        });
        Servers {
            tls,
            etcd,
            key,
            sshd,
        }
    }

    /// The servers, with the agent's listeners on free ports.
    fn site<'a>(&'a self, schedule: &'a str) -> Site<'a> {
        Site {
            servers: self,
            api_port: free_port(),
            metrics_port: free_port(),
            schedule,
        }
    }
}

impl Pod {
    fn new(image: &Image, dir: &str, platform: Platform, site: &Site) -> Self {
        let servers = site.servers;
        let objects = render(dir);
        let ds = daemonset(&objects);
        let work = tempfile::tempdir().unwrap();
        let host = work.path().join("host");
        let (expected_paths, secret) =
            real_master(&host, platform, &servers.tls, &servers.key, &servers.sshd);
        let mut config = yaml(&agent_config_text(&objects));
        let base = point_at_test_servers(&mut config, &servers.etcd.client_url, &servers.sshd);
        config["http"]["listen"] = format!("127.0.0.1:{}", site.api_port).into();
        config["http"]["metrics_listen"] = format!("127.0.0.1:{}", site.metrics_port).into();
        config["schedule"] = site.schedule.into();
        config["jitter"] = "0s".into();
        config["run_on_start"] = "never".into();
        config["log"]["format"] = "text".into();
        let config_text = serde_norway::to_string(&config).unwrap();

        // A copy of the image's file system per pod, as a runtime gives each
        // container its own: mount points made below do not leak between
        // tests, and the shared unpacked image stays as built.
        let rootfs = work.path().join("rootfs");
        run_ok(
            Command::new("cp").arg("-a").arg(&image.rootfs).arg(&rootfs),
            "copy the image's root file system",
        );

        let c = agent_container(&ds);
        let mut sandbox: Vec<OsString> = Vec::new();
        // The root is bound writable only so that bwrap can make the mount
        // points; --remount-ro at the end makes it read-only, as
        // readOnlyRootFilesystem does.
        let sc = c
            .security_context
            .as_ref()
            .expect("a container securityContext");
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_user, Some(0));
        let drop: Vec<String> = sc
            .capabilities
            .as_ref()
            .and_then(|c| c.drop.clone())
            .unwrap_or_default();
        assert_eq!(drop, ["ALL"]);
        assert!(sc.capabilities.as_ref().unwrap().add.is_none());
        for a in [
            "--die-with-parent",
            "--new-session",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            // uid 0 as runAsUser says, no capabilities at all; bwrap always
            // sets no_new_privs (allowPrivilegeEscalation: false).
            "--cap-drop",
            "ALL",
            "--clearenv",
            "--bind",
        ] {
            push(&mut sandbox, a);
        }
        push(&mut sandbox, &rootfs);
        push(&mut sandbox, "/");
        for a in ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm"] {
            push(&mut sandbox, a);
        }
        // What the kubelet adds to every container, read-only here (in a real
        // pod they are writable; the agent must not need that).
        for f in ["/etc/hosts", "/etc/resolv.conf"] {
            if Path::new(f).exists() {
                for a in ["--ro-bind", f, f] {
                    push(&mut sandbox, a);
                }
            }
        }

        let volumes_dir = work.path().join("volumes");
        let mut scratch = Vec::new();
        for m in pod_mounts(&host, &volumes_dir, &objects, &ds, &secret) {
            match m.empty_dir {
                Some(EmptyDirMedium::Memory) => {
                    push(&mut sandbox, "--tmpfs");
                    push(&mut sandbox, &m.mount_path);
                    continue;
                }
                Some(EmptyDirMedium::Disk) => {
                    scratch.push((m.mount_path.clone(), m.source.clone()))
                }
                None => {}
            }
            push(
                &mut sandbox,
                if m.read_only { "--ro-bind" } else { "--bind" },
            );
            push(&mut sandbox, &m.source);
            push(&mut sandbox, &m.mount_path);
        }
        // The overlay's config, with what differs from a real master.
        write_file(
            &volumes_dir.join("config/config.yaml"),
            config_text.as_bytes(),
            0o644,
        );
        push(&mut sandbox, "--remount-ro");
        push(&mut sandbox, "/");
        // The image's environment, then the container's (NODE_NAME).
        for e in &image.env {
            let (k, v) = e.split_once('=').unwrap();
            for a in ["--setenv", k, v] {
                push(&mut sandbox, a);
            }
        }
        for e in c.env.as_deref().unwrap_or_default() {
            let value = expand(&format!("$({})", e.name), c);
            for a in ["--setenv", &e.name, &value] {
                push(&mut sandbox, a);
            }
        }
        push(&mut sandbox, "--chdir");
        push(&mut sandbox, &image.workdir);

        let mut command = image.entrypoint.clone();
        command.extend(c.args.clone().unwrap_or_default());
        assert_eq!(
            c.command, None,
            "the container keeps the image's entrypoint"
        );
        Pod {
            work,
            sandbox,
            command,
            scratch,
            base,
            expected_paths,
        }
    }

    /// A command in the agent's container, as `kubectl exec` runs one: the
    /// same file system, user and environment.
    fn exec(&self, args: &[&str]) -> Command {
        self.exec_program(&self.command[0], args)
    }

    /// Another program of the image, in the agent's container.
    fn exec_program(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(bwrap());
        cmd.args(&self.sandbox)
            .arg(program)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// The container's own process: its entrypoint and the DaemonSet's args.
    fn start(&self) -> Child {
        let log = std::fs::File::create(self.work.path().join("agent.log")).unwrap();
        Command::new(bwrap())
            .args(&self.sandbox)
            .args(&self.command)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start bwrap")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.work.path().join("agent.log")).unwrap_or_default()
    }

    /// The host directory behind the emptyDir mounted at `mount_path`.
    fn scratch(&self, mount_path: &str) -> &Path {
        &self
            .scratch
            .iter()
            .find(|(m, _)| m == mount_path)
            .unwrap_or_else(|| panic!("no emptyDir mounted at {mount_path}"))
            .1
    }
}

fn push(args: &mut Vec<OsString>, a: impl AsRef<std::ffi::OsStr>) {
    args.push(a.as_ref().to_os_string());
}

fn output_text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The status code of `GET path` on 127.0.0.1:port, or None.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

struct Running(Child);
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn in_the_image_each_overlay_becomes_ready_backs_up_on_schedule_and_on_trigger() {
    let image = image();
    // The image as built: non-root by default (the DaemonSet runs it as uid 0
    // without capabilities), the agent as its entrypoint.
    assert_eq!(image.user, "65532:65532");
    assert_eq!(image.entrypoint, ["etcd-backup-agent"]);
    for (dir, platform) in OVERLAYS {
        let servers = Servers::start();
        let out =
            servers
                .etcd
                .etcdctl(&["put", "/kubernetes.io/configmaps/default/in-image", "v1"]);
        assert!(out.status.success(), "{}", output_text(&out));
        let site = servers.site("@every 15s");
        let (api_port, metrics_port) = (site.api_port, site.metrics_port);
        let pod = Pod::new(&image, dir, platform, &site);
        let daemon = Running(pod.start());

        // Where the kubelet's probes go: the loopback API listener.
        wait_for(
            &format!("{dir}: /readyz on the loopback listener"),
            Duration::from_secs(60),
            || (http_status(api_port, "/readyz") == Some(200)).then_some(()),
        );
        assert_eq!(http_status(api_port, "/healthz"), Some(200), "{dir}");
        // Prometheus's: the metrics listener.
        assert_eq!(http_status(metrics_port, "/metrics"), Some(200), "{dir}");

        // The schedule's first tick (at most 15 s away) makes a set.
        let first = wait_for(
            &format!("{dir}: a scheduled backup in the image\n{}", pod.log()),
            Duration::from_secs(90),
            || complete_sets(&pod.base).into_iter().next(),
        );
        assert!(
            first.starts_with(&format!("my-cluster/{NODE}/")),
            "{dir}: {first}"
        );

        // Past the scheduled run's last step and its second (set names have
        // one-second resolution), so the trigger starts a run of its own.
        std::thread::sleep(Duration::from_secs(2));
        // `kubectl exec ... -- etcd-backup-agent trigger`: the distroless image
        // has no curl, so the agent asks its own daemon.
        let out = pod
            .exec(&["trigger", "--config", "/etc/etcd-backup/config.yaml"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{dir}: trigger\n{}\n{}",
            output_text(&out),
            pod.log()
        );
        let run: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{dir}: trigger's answer: {e}\n{}", output_text(&out)));
        assert_eq!(run["trigger"], "http", "{dir}: {}", output_text(&out));
        assert_eq!(run["state"], "succeeded", "{dir}: {}", output_text(&out));
        let sets = complete_sets(&pod.base);
        assert_eq!(
            sets.len(),
            2,
            "{dir}: {:?}\ntrigger: {}\nagent: {}",
            files_below(&pod.base),
            output_text(&out),
            pod.log()
        );

        // Both sets hold this master's resources, found through the mounts.
        for set in &sets {
            let set_dir = pod.base.join(set);
            let tarball = std::fs::read_dir(&set_dir)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
                .expect("a resources tarball");
            let trim = |p: &str| p.trim_end_matches('/').to_string();
            let mut paths: Vec<String> = etcd_backup_tests::fixtures::tar_gz_entries(&tarball)
                .iter()
                .map(|e| trim(&e.path))
                .collect();
            paths.sort();
            let mut expected: Vec<String> = pod.expected_paths.iter().map(|p| trim(p)).collect();
            expected.sort();
            assert_eq!(paths, expected, "{dir}: {set}");
        }
        drop(daemon);
        assert!(
            !pod.log().contains("Read-only file system"),
            "{dir}: the agent tried to write outside its volumes:\n{}",
            pod.log()
        );
    }
}

#[test]
fn in_the_image_drill_and_restore_work_with_the_etcd_tools_it_carries() {
    let image = image();
    for (dir, platform) in OVERLAYS {
        let servers = Servers::start();
        for i in 0..20 {
            let out = servers.etcd.etcdctl(&[
                "put",
                &format!("/registry/secrets/ns/s{i}"),
                &format!("value-{i}"),
            ]);
            assert!(out.status.success(), "{}", output_text(&out));
        }
        let site = servers.site("@hourly");
        let pod = Pod::new(&image, dir, platform, &site);
        let config = "/etc/etcd-backup/config.yaml";
        let out = pod.exec(&["backup", "--config", config]).output().unwrap();
        assert!(out.status.success(), "{dir}: backup\n{}", output_text(&out));

        // The etcd tools the image carries, as `kubectl exec` sees them: the
        // local etcd base is etcd 3.5.16 with etcdutl, as the real etcd
        // image (3.5) carries it (scripts/image --local-bases).
        for (tool, version) in [
            ("etcd", "--version"),
            ("etcdctl", "version"),
            ("etcdutl", "version"),
        ] {
            let out = pod
                .exec_program(&format!("/usr/local/bin/{tool}"), &[version])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{dir}: {tool} {version}\n{}",
                output_text(&out)
            );
            let first = String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            assert!(
                first.to_lowercase() == format!("{tool} version: 3.5.16"),
                "{dir}: the image's {tool} says {first:?}"
            );
        }

        // drill: fetch, verify, restore with the image's etcd tools and start
        // a throwaway member, all inside the container.
        let out = pod
            .exec(&["drill", "--config", config, "latest"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{dir}: drill\n{}", output_text(&out));

        // restore into the container's scratch volume, then start a member on
        // the restored data dir outside and read the keys back.
        // The DaemonSet's one writable volume, the emptyDir at /tmp.
        let tmp = "/tmp";
        let peer_port = free_port();
        let peer = format!("http://127.0.0.1:{peer_port}");
        let data_dir = format!("{tmp}/restored");
        let out = pod
            .exec(&[
                "restore",
                "--config",
                config,
                "latest",
                "--data-dir",
                &data_dir,
                "--name",
                "restored",
                "--initial-cluster",
                &format!("restored={peer}"),
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{dir}: restore\n{}",
            output_text(&out)
        );
        // Restored Kubernetes-safe by the image's etcdutl: the revision
        // bumped by the default billion.
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains("with etcdutl 3.5.16; the member starts at revision")
                && said.contains(&format!(
                    "+ {DEFAULT_BUMP_REVISION}, everything below marked compacted"
                )),
            "{dir}: {said}"
        );
        let restored = EtcdServer::start_version_on(
            EtcdVersion::V3_5,
            pod.scratch(tmp).join("restored"),
            "restored",
            peer_port,
        );
        let out = restored.etcdctl(&["get", "/registry/secrets/ns/s7", "-w", "json"]);
        let got: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{dir}: {}", output_text(&out)));
        assert!(
            got["header"]["revision"].as_i64() > Some(DEFAULT_BUMP_REVISION),
            "{dir}: {got}"
        );
        let out = restored.etcdctl(&["get", "/registry/secrets/ns/s7", "--print-value-only"]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "value-7",
            "{dir}: {}",
            output_text(&out)
        );
    }
}

#[test]
fn in_the_image_a_write_outside_the_manifests_volumes_fails() {
    // The sandbox must be able to fail: a destination on the image's own
    // (read-only) file system is refused by the kernel, as in the pod.
    let image = image();
    let (dir, platform) = OVERLAYS[0];
    let servers = Servers::start();
    let site = servers.site("@hourly");
    let pod = Pod::new(&image, dir, platform, &site);
    // A config of its own that stores sets in /var/backups, where the pod
    // has no volume: passed through the writable scratch volume.
    let mut config =
        yaml(&std::fs::read_to_string(pod.work.path().join("volumes/config/config.yaml")).unwrap());
    let mut local = serde_norway::Mapping::new();
    local.insert(
        "local".into(),
        serde_norway::to_value(serde_norway::Mapping::from_iter([(
            "path".into(),
            "/var/backups".into(),
        )]))
        .unwrap(),
    );
    config["destination"] = serde_norway::Value::Mapping(local);
    config.as_mapping_mut().unwrap().remove("retention");
    std::fs::write(
        pod.scratch("/tmp").join("outside.yaml"),
        serde_norway::to_string(&config).unwrap(),
    )
    .unwrap();
    let out = pod
        .exec(&["backup", "--config", "/tmp/outside.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{}",
        output_text(&out)
    );
    // And nothing reached the image's file system.
    assert!(!pod
        .work
        .path()
        .join("rootfs/var/backups/my-cluster")
        .exists());
}
