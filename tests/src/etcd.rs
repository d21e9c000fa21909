//! A throwaway etcd member on loopback, and `etcdctl`, of either etcd the
//! tests run: Debian 12's 3.4.23 (`/usr/bin`) or Debian 13's 3.5.16, which
//! `scripts/test` unpacks into a cache directory (`ensure_etcd35` in
//! `scripts/lib/common.sh`). `ETCD_VERSION` (`3.4`, the default, or `3.5`)
//! picks the one a test run uses; a test that needs a particular one, or one
//! member of each, names it with [`EtcdVersion`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, TlsOptions};
use tempfile::TempDir;

use crate::relay::{Relay, RelayOptions, Shape};
use crate::tls::TlsFiles;
use crate::{free_port, require_tool, wait_for};

/// `restore`'s default `--bump-revision` (the agent's `DEFAULT_BUMP_REVISION`).
pub const DEFAULT_BUMP_REVISION: i64 = 1_000_000_000;

/// Which etcd (server, `etcdctl`, `etcdutl`) a member or a tool is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdVersion {
    /// Debian 12's etcd 3.4.23 on `PATH` (`/usr/bin`): no `etcdutl`, and an
    /// `etcdctl` too old for `--bump-revision`.
    V3_4,
    /// Debian 13's etcd 3.5.16 (`etcd`, `etcdctl`, `etcdutl`) in
    /// `$ETCD35_BIN`, by default
    /// `${ETCD_BACKUP_TOOL_CACHE:-/var/cache/etcd-backup-agent}/etcd-3.5.16/bin`.
    V3_5,
}

impl EtcdVersion {
    /// The version `ETCD_VERSION` selects for this test run: `3.4` (also when
    /// unset) or `3.5`. Any other value is a mistake, and panics.
    pub fn from_env() -> Self {
        match std::env::var("ETCD_VERSION").as_deref() {
            Err(_) | Ok("" | "3.4") => Self::V3_4,
            Ok("3.5") => Self::V3_5,
            Ok(other) => panic!("ETCD_VERSION={other}: the tests run etcd 3.4 or 3.5"),
        }
    }

    /// `3.4.23` or `3.5.16`: what `etcd --version` reports.
    pub fn full(self) -> &'static str {
        match self {
            Self::V3_4 => "3.4.23",
            Self::V3_5 => "3.5.16",
        }
    }

    /// The directory holding this version's binaries; `None` for 3.4, which
    /// is found on `PATH`.
    fn bin_dir(self) -> Option<PathBuf> {
        match self {
            Self::V3_4 => None,
            Self::V3_5 => Some(match std::env::var_os("ETCD35_BIN") {
                Some(dir) => PathBuf::from(dir),
                None => PathBuf::from(
                    std::env::var_os("ETCD_BACKUP_TOOL_CACHE")
                        .unwrap_or_else(|| "/var/cache/etcd-backup-agent".into()),
                )
                .join("etcd-3.5.16/bin"),
            }),
        }
    }

    /// The program to run for `tool` (`etcd`, `etcdctl`, `etcdutl`) of this
    /// version; panics, saying how to get it, when it is not there.
    pub fn tool(self, tool: &str) -> PathBuf {
        match self.bin_dir() {
            None => {
                let package = if tool == "etcd" {
                    "etcd-server"
                } else {
                    "etcd-client"
                };
                require_tool(tool, package);
                PathBuf::from(tool)
            }
            Some(dir) => {
                let path = dir.join(tool);
                assert!(
                    path.is_file(),
                    "{} is not there: etcd {} is unpacked by scripts/test (ensure_etcd35 in scripts/lib/common.sh); run it, or set ETCD35_BIN to a directory with etcd, etcdctl and etcdutl {}",
                    path.display(),
                    self.full(),
                    self.full()
                );
                path
            }
        }
    }

    /// What the agent's `restore` is given besides the set and the member
    /// with this version's tools: `--no-bump-revision` with 3.4.23, whose
    /// etcdctl is too old to bump (restore refuses it otherwise); nothing
    /// with 3.5.16, which restores Kubernetes-safe by default.
    pub fn restore_args(self) -> &'static [&'static str] {
        match self {
            Self::V3_4 => &["--no-bump-revision"],
            Self::V3_5 => &[],
        }
    }

    /// The revision a member restored by the agent's `restore` with
    /// [`restore_args`](Self::restore_args) starts at, from a snapshot at
    /// `snapshot_revision`.
    pub fn restored_revision(self, snapshot_revision: i64) -> i64 {
        match self {
            Self::V3_4 => snapshot_revision,
            Self::V3_5 => snapshot_revision + DEFAULT_BUMP_REVISION,
        }
    }

    /// `PATH` for a process (the agent) that should find this version's
    /// `etcd`, `etcdctl` and `etcdutl` first.
    pub fn path_env(self) -> OsString {
        let current = std::env::var_os("PATH").unwrap_or_default();
        match self.bin_dir() {
            None => current,
            Some(dir) => {
                let mut dirs = vec![dir];
                dirs.extend(std::env::split_paths(&current));
                std::env::join_paths(dirs).expect("PATH entries without ':'")
            }
        }
    }
}

/// A running etcd member; killed and its data removed on drop.
pub struct EtcdServer {
    child: Option<Child>,
    /// Holds the data dir and logs; removed on drop.
    pub dir: TempDir,
    /// The member's name.
    pub name: String,
    /// `http(s)://127.0.0.1:<port>`.
    pub client_url: String,
    /// `http://127.0.0.1:<port>`.
    pub peer_url: String,
    /// The data directory.
    pub data_dir: PathBuf,
    /// TLS material, when the member serves https.
    pub tls: Option<TlsFiles>,
    /// Which etcd it is.
    pub version: EtcdVersion,
}

impl EtcdServer {
    /// Starts a fresh single-member cluster over plain http, of the etcd
    /// `ETCD_VERSION` selects.
    pub fn start() -> Self {
        Self::start_version(EtcdVersion::from_env())
    }

    /// [`start`](Self::start) with etcd `version`, whatever `ETCD_VERSION` says.
    pub fn start_version(version: EtcdVersion) -> Self {
        Self::launch(version, None, None)
    }

    /// Starts a fresh single-member cluster that serves https and requires
    /// client certificates signed by `tls`'s CA.
    pub fn start_tls(tls: TlsFiles) -> Self {
        Self::launch(EtcdVersion::from_env(), Some(tls), None)
    }

    /// Starts a member on an existing data dir (one made by `etcdctl snapshot
    /// restore` with `name` and `peer_port`).
    pub fn start_on(data_dir: PathBuf, name: &str, peer_port: u16) -> Self {
        Self::start_version_on(EtcdVersion::from_env(), data_dir, name, peer_port)
    }

    /// [`start_on`](Self::start_on) with etcd `version`.
    pub fn start_version_on(
        version: EtcdVersion,
        data_dir: PathBuf,
        name: &str,
        peer_port: u16,
    ) -> Self {
        Self::launch(version, None, Some((data_dir, name.to_string(), peer_port)))
    }

    /// Starts a member and waits for it. A port that [`free_port`] found free
    /// can be taken by another test before etcd binds it: etcd then exits at
    /// once, and the member is started again on new ports (three tries).
    fn launch(
        version: EtcdVersion,
        tls: Option<TlsFiles>,
        existing: Option<(PathBuf, String, u16)>,
    ) -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_launch(version, tls.clone(), existing.clone()) {
                Ok(server) => return server,
                Err(log) => last = log,
            }
        }
        panic!("etcd could not bind its ports in three tries; its last log:\n{last}");
    }

    fn try_launch(
        version: EtcdVersion,
        tls: Option<TlsFiles>,
        existing: Option<(PathBuf, String, u16)>,
    ) -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{}", free_port());
        let (data_dir, name, peer_port) = match existing {
            Some(e) => e,
            None => (
                dir.path().join("data"),
                "test-member".to_string(),
                free_port(),
            ),
        };
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let child = spawn_etcd(
            version,
            dir.path(),
            &data_dir,
            &name,
            &client_url,
            &peer_url,
            tls.as_ref(),
        );
        let mut server = Self {
            child: Some(child),
            dir,
            name,
            client_url,
            peer_url,
            data_dir,
            tls,
            version,
        };
        server.wait_ready()?;
        Ok(server)
    }

    /// Waits until the member answers. Err (its log) when it exited because a
    /// port was taken; panics with its log if it exits for another reason or
    /// does not answer within 30 s.
    fn wait_ready(&mut self) -> Result<(), String> {
        let start = std::time::Instant::now();
        let mut tries = 0u32;
        loop {
            tries += 1;
            let out = self.etcdctl(&["endpoint", "health"]);
            if out.status.success() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log = self.log();
                if log.contains("address already in use") {
                    return Err(log);
                }
                panic!("etcd exited ({status}) before it answered; its log:\n{log}");
            }
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "etcd did not answer within 30 s (etcdctl: {stderr}); its log:\n{}",
                self.log()
            );
            if tries % 40 == 0 {
                eprintln!("still waiting for etcd: {stderr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The member's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Runs `etcdctl` (API v3, of the member's version) against this member.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let mut cmd = etcdctl_command_of(self.version);
        cmd.arg("--endpoints").arg(&self.client_url);
        if let Some(t) = &self.tls {
            cmd.arg("--cacert")
                .arg(&t.ca_cert)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        cmd.args(args).output().expect("run etcdctl")
    }

    /// An etcd-client connected to this member.
    pub async fn client(&self) -> Client {
        let mut opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
        if let Some(t) = &self.tls {
            opts = opts.with_tls(
                TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(
                        std::fs::read(&t.ca_cert).unwrap(),
                    ))
                    .identity(etcd_client::Identity::from_pem(
                        std::fs::read(&t.client_cert).unwrap(),
                        std::fs::read(&t.client_key).unwrap(),
                    )),
            );
        }
        Client::connect([self.client_url.as_str()], Some(opts))
            .await
            .expect("connect to test etcd")
    }

    /// Stops the member (SIGKILL) now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the member again (after [`kill`](Self::kill); it kills first
    /// if still running) on the same data dir, name and client and peer
    /// ports, and waits until it answers. Panics with its log if it does not
    /// come back (a port taken meanwhile included).
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(spawn_etcd(
            self.version,
            self.dir.path(),
            &self.data_dir,
            &self.name,
            &self.client_url,
            &self.peer_url,
            self.tls.as_ref(),
        ));
        if let Err(log) = self.wait_ready() {
            panic!("etcd could not bind its old ports again; its log:\n{log}");
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `etcd` for a member; its output is appended to `dir/etcd.log`.
fn spawn_etcd(
    version: EtcdVersion,
    dir: &Path,
    data_dir: &Path,
    name: &str,
    client_url: &str,
    peer_url: &str,
    tls: Option<&TlsFiles>,
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("etcd.log"))
        .expect("log file");
    let mut cmd = Command::new(version.tool("etcd"));
    cmd.arg("--name")
        .arg(name)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen-client-urls")
        .arg(client_url)
        .arg("--advertise-client-urls")
        .arg(client_url)
        .arg("--listen-peer-urls")
        .arg(peer_url)
        .arg("--initial-advertise-peer-urls")
        .arg(peer_url)
        .arg("--initial-cluster")
        .arg(format!("{name}={peer_url}"))
        .arg("--listen-metrics-urls")
        .arg(format!("http://127.0.0.1:{}", free_port()))
        .arg("--logger=zap")
        .arg("--log-outputs=stderr")
        .env_remove("ETCD_UNSUPPORTED_ARCH")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    if let Some(t) = tls {
        cmd.arg("--cert-file")
            .arg(&t.server_cert)
            .arg("--key-file")
            .arg(&t.server_key)
            .arg("--trusted-ca-file")
            .arg(&t.ca_cert)
            .arg("--client-cert-auth");
    }
    cmd.spawn().expect("start etcd")
}

/// `etcdctl` of the etcd `ETCD_VERSION` selects, with API v3 selected and
/// no environment leaking in.
pub fn etcdctl_command() -> Command {
    etcdctl_command_of(EtcdVersion::from_env())
}

/// [`etcdctl_command`] of etcd `version`.
pub fn etcdctl_command_of(version: EtcdVersion) -> Command {
    let mut cmd = Command::new(version.tool("etcdctl"));
    cmd.env("ETCDCTL_API", "3")
        .env_remove("ETCDCTL_ENDPOINTS")
        .env_remove("ETCDCTL_CACERT")
        .env_remove("ETCDCTL_CERT")
        .env_remove("ETCDCTL_KEY")
        .stdin(Stdio::null());
    cmd
}

/// Every key and value, in key order.
pub async fn dump(client: &mut Client) -> Vec<(Vec<u8>, Vec<u8>)> {
    let resp = client
        .get(vec![0u8], Some(GetOptions::new().with_from_key()))
        .await
        .expect("range over the keyspace");
    resp.kvs()
        .iter()
        .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
        .collect()
}

/// Writes about `mib` MiB of values that do not compress (64 KiB of
/// xorshift letters each, seeded by `seed`) under `/registry/secrets/default/`,
/// so a snapshot takes measurable time to stream through a rate-capped relay
/// and fills a small disk predictably.
pub async fn fill_incompressible(client: &mut Client, mib: usize, seed: u64) {
    let mut x = seed | 1;
    for i in 0..mib * 16 {
        let value: String = (0..64 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'a' + (x % 26) as u8)
            })
            .collect();
        client
            .put(format!("/registry/secrets/default/s{i:04}"), value, None)
            .await
            .expect("put");
    }
}

/// Writes `n` keys under `prefix`, overwrites every third and deletes every
/// fifth, so the snapshot holds history, not just a flat keyspace.
pub async fn write_history(client: &mut Client, prefix: &str, n: usize) {
    for i in 0..n {
        client
            .put(
                format!("{prefix}/{i:05}"),
                format!("value-{i}-{}", "x".repeat(i % 97)),
                None,
            )
            .await
            .expect("put");
    }
    for i in (0..n).step_by(3) {
        client
            .put(format!("{prefix}/{i:05}"), format!("overwritten-{i}"), None)
            .await
            .expect("overwrite");
    }
    for i in (0..n).step_by(5) {
        client
            .delete(format!("{prefix}/{i:05}"), None)
            .await
            .expect("delete");
    }
}

/// `etcdctl snapshot status -w json` of a snapshot file (`etcdutl`'s on
/// 3.5, where etcdctl's is deprecated), of the etcd `ETCD_VERSION` selects.
pub fn snapshot_status(file: &Path) -> serde_json::Value {
    let version = EtcdVersion::from_env();
    let mut cmd = match version {
        EtcdVersion::V3_4 => etcdctl_command_of(version),
        EtcdVersion::V3_5 => {
            let mut cmd = Command::new(version.tool("etcdutl"));
            cmd.stdin(Stdio::null());
            cmd
        }
    };
    let out = cmd
        .args(["snapshot", "status", "-w", "json"])
        .arg(file)
        .output()
        .expect("run etcdctl snapshot status");
    assert!(
        out.status.success(),
        "etcdctl snapshot status {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("snapshot status json")
}

/// Restores `snapshot` with the real `etcdctl snapshot restore` (`etcdutl`
/// on 3.5, where etcdctl's is deprecated) of the etcd `ETCD_VERSION`
/// selects, into a new data dir, and starts a member of that version on it.
pub fn restore_and_start(snapshot: &Path, work: &Path) -> EtcdServer {
    let version = EtcdVersion::from_env();
    let name = "restored";
    let peer_port = free_port();
    let data_dir = work.join("restored-data");
    let mut cmd = match version {
        EtcdVersion::V3_4 => etcdctl_command_of(version),
        EtcdVersion::V3_5 => {
            let mut cmd = Command::new(version.tool("etcdutl"));
            cmd.stdin(Stdio::null());
            cmd
        }
    };
    let out = cmd
        .args(["snapshot", "restore"])
        .arg(snapshot)
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--name")
        .arg(name)
        .arg("--initial-cluster")
        .arg(format!("{name}=http://127.0.0.1:{peer_port}"))
        .arg("--initial-advertise-peer-urls")
        .arg(format!("http://127.0.0.1:{peer_port}"))
        .output()
        .expect("run snapshot restore");
    assert!(
        out.status.success(),
        "snapshot restore {} (etcd {}): {}",
        snapshot.display(),
        version.full(),
        String::from_utf8_lossy(&out.stderr)
    );
    EtcdServer::start_version_on(version, data_dir, name, peer_port)
}

/// One member of a multi-member cluster on loopback.
pub struct MemberSpec {
    /// `--name`.
    pub name: String,
    /// `--data-dir`.
    pub data_dir: PathBuf,
    /// Client port on 127.0.0.1.
    pub client_port: u16,
    /// Peer port on 127.0.0.1.
    pub peer_port: u16,
}

impl MemberSpec {
    /// `http://127.0.0.1:<client_port>`.
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// `http://127.0.0.1:<peer_port>`.
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// `etcdctl endpoint status` of one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    /// The member's id.
    pub member_id: u64,
    /// The leader's id as this member sees it (0: none known).
    pub leader: u64,
    /// The raft term: unchanged means no election happened in between.
    pub raft_term: u64,
}

/// A cluster of several etcd members on loopback; all killed on drop.
pub struct EtcdCluster {
    children: Vec<Child>,
    /// Logs live here.
    pub dir: TempDir,
    /// The members.
    pub members: Vec<MemberSpec>,
    /// Which etcd they are.
    pub version: EtcdVersion,
}

impl EtcdCluster {
    /// `n` fresh members named m0, m1, … with data dirs in a temp dir.
    pub fn plan(n: usize, dir: &Path) -> Vec<MemberSpec> {
        (0..n)
            .map(|i| MemberSpec {
                name: format!("m{i}"),
                data_dir: dir.join(format!("m{i}")),
                client_port: free_port(),
                peer_port: free_port(),
            })
            .collect()
    }

    /// `m0=http://127.0.0.1:p0,m1=…`.
    pub fn initial_cluster(members: &[MemberSpec]) -> String {
        members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts every member (on fresh or restored data dirs), of the etcd
    /// `ETCD_VERSION` selects, and waits until the cluster reports healthy.
    pub fn start(members: Vec<MemberSpec>) -> Self {
        Self::start_version(EtcdVersion::from_env(), members)
    }

    /// [`start`](Self::start) with etcd `version`.
    pub fn start_version(version: EtcdVersion, members: Vec<MemberSpec>) -> Self {
        let etcd = version.tool("etcd");
        let dir = tempfile::tempdir().expect("tempdir");
        let initial = Self::initial_cluster(&members);
        let mut children = Vec::new();
        for m in &members {
            let log =
                std::fs::File::create(dir.path().join(format!("{}.log", m.name))).expect("log");
            let child = Command::new(&etcd)
                .arg("--name")
                .arg(&m.name)
                .arg("--data-dir")
                .arg(&m.data_dir)
                .arg("--listen-client-urls")
                .arg(m.client_url())
                .arg("--advertise-client-urls")
                .arg(m.client_url())
                .arg("--listen-peer-urls")
                .arg(m.peer_url())
                .arg("--initial-advertise-peer-urls")
                .arg(m.peer_url())
                .arg("--initial-cluster")
                .arg(&initial)
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--listen-metrics-urls")
                .arg(format!("http://127.0.0.1:{}", free_port()))
                .arg("--logger=zap")
                .arg("--log-outputs=stderr")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start etcd member");
            children.push(child);
        }
        let cluster = Self {
            children,
            dir,
            members,
            version,
        };
        let endpoints = cluster.endpoints();
        wait_for(
            "the etcd cluster to be healthy",
            Duration::from_secs(60),
            || {
                let out = etcdctl_command_of(version)
                    .arg("--endpoints")
                    .arg(&endpoints)
                    .args(["endpoint", "health"])
                    .output()
                    .ok()?;
                out.status.success().then_some(())
            },
        );
        cluster
    }

    /// Every client URL, comma-separated.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(MemberSpec::client_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `etcdctl` against every member.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        etcdctl_command_of(self.version)
            .arg("--endpoints")
            .arg(self.endpoints())
            .args(args)
            .output()
            .expect("run etcdctl")
    }

    /// What member `i` says of itself and its leader (`etcdctl endpoint
    /// status` against it alone); `None` when it does not answer.
    pub fn status(&self, i: usize) -> Option<MemberStatus> {
        let out = etcdctl_command_of(self.version)
            .arg("--endpoints")
            .arg(self.members[i].client_url())
            .args(["--command-timeout=2s", "endpoint", "status", "-w", "json"])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let s = &v[0]["Status"];
        Some(MemberStatus {
            member_id: s["header"]["member_id"].as_u64()?,
            leader: s["leader"].as_u64()?,
            raft_term: s["raftTerm"].as_u64()?,
        })
    }

    /// Stops member `i` (SIGKILL) now; the others keep running.
    pub fn kill(&mut self, i: usize) {
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
    }

    /// A client of member `i` only.
    pub async fn client(&self, i: usize) -> Client {
        Client::connect([self.members[i].client_url()], None)
            .await
            .expect("connect to member")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A real bbolt database (without etcd's digest trailer), `keys` keys of
/// growing size, saved from a throwaway member with the real `etcdctl`.
pub async fn real_snapshot_db(keys: usize) -> Vec<u8> {
    let etcd = EtcdServer::start();
    let mut client = etcd.client().await;
    for i in 0..keys {
        client
            .put(format!("/k/{i}"), "v".repeat(i * 10), None)
            .await
            .expect("put");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("s.db");
    let out = etcdctl_command()
        .arg("--endpoints")
        .arg(&etcd.client_url)
        .args(["snapshot", "save"])
        .arg(&file)
        .output()
        .expect("run etcdctl snapshot save");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut bytes = std::fs::read(&file).expect("read snapshot");
    assert_eq!(bytes.len() % 512, 32, "etcdctl keeps the trailer");
    bytes.truncate(bytes.len() - 32);
    bytes
}

/// An etcd holding `mib` MiB of incompressible values, behind a [`Relay`]
/// capping what it sends to `rate` bytes a second, so a snapshot of it
/// streams for about `mib` MiB / `rate` and a fault can land mid-run. Point
/// the agent at [`Relay::http_url`].
pub async fn slow_etcd(mib: usize, rate: u64) -> (EtcdServer, Relay) {
    let etcd = EtcdServer::start();
    fill_incompressible(&mut etcd.client().await, mib, 0x5851_F42D_4C95_7F2D).await;
    let target: std::net::SocketAddr = etcd
        .client_url
        .trim_start_matches("http://")
        .parse()
        .expect("etcd's client URL is http://127.0.0.1:<port>");
    let relay = Relay::start(
        target,
        RelayOptions {
            up: Shape::default(),
            down: Shape {
                rate: Some(rate),
                delay: Duration::ZERO,
            },
        },
    );
    (etcd, relay)
}

/// How many Snapshot RPCs `etcd` has started, from its own `/metrics` (the
/// gRPC server counter etcd registers for every method, at 0 from start):
/// how often the agent read a snapshot.
pub async fn snapshot_rpcs(etcd: &EtcdServer) -> f64 {
    let text = reqwest::get(format!("{}/metrics", etcd.client_url))
        .await
        .expect("etcd's /metrics")
        .text()
        .await
        .expect("etcd's /metrics body");
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("grpc_server_started_total{")
                && l.contains("grpc_method=\"Snapshot\"")
                && l.contains("grpc_service=\"etcdserverpb.Maintenance\"")
        })
        .unwrap_or_else(|| panic!("no Snapshot counter in etcd's metrics:\n{text}"));
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line}"))
}
