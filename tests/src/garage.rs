//! A throwaway Garage cluster (an S3-compatible object store) on loopback, and
//! rclone as an independent S3 client to look at its buckets.
//!
//! [`GarageCluster::start`] runs `nodes` real `garage server` processes, each
//! on its own free 127.0.0.1 ports (RPC, S3 API, admin API) with its own
//! metadata and data directories (sqlite metadata), `replication_factor = 3`
//! and a shared random `rpc_secret`. It connects them (`garage node connect`),
//! applies a layout that gives every node its own zone and the same capacity,
//! then creates a bucket and a key with the `garage` CLI and allows the key to
//! read, write and own the bucket. The key id and secret are written to 0600
//! files for the agent's `access_key_id_file` and `secret_access_key_file`.
//!
//! The `garage` binary comes from `GARAGE_BIN`, or else from the cache where
//! `scripts/test` builds it (`ensure_garage` in `scripts/lib/common.sh`). A
//! missing binary is a panic naming `scripts/test`, never a skipped test.
//!
//! [`Rclone`] writes an rclone config (type s3, provider Other, path style)
//! for the cluster and runs `rclone lsf -R`, `rclone cat` and `rclone backend
//! list-multipart-uploads`, so tests check the bucket without the agent's own
//! S3 client.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{free_port, require_tool};

/// The Garage version `scripts/test` installs.
pub const GARAGE_VERSION: &str = "2.5.0";

/// The S3 region the cluster answers for.
pub const REGION: &str = "garage";

/// The bucket [`GarageCluster::start`] creates.
pub const BUCKET: &str = "etcd-backups";

/// How long a cluster gets to form, and a restarted node to rejoin.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The `garage` binary: `GARAGE_BIN`, or the cache `scripts/test` fills
/// (`${ETCD_BACKUP_TOOL_CACHE:-/var/cache/etcd-backup-agent}/garage-2.5.0/bin/garage`).
/// Panics naming `scripts/test` when it is missing.
pub fn garage_bin() -> PathBuf {
    let path = match std::env::var_os("GARAGE_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("ETCD_BACKUP_TOOL_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/cache/etcd-backup-agent"));
            cache
                .join(format!("garage-{GARAGE_VERSION}"))
                .join("bin/garage")
        }
    };
    assert!(
        path.is_file(),
        "Garage {GARAGE_VERSION} is not installed at {}; run scripts/test (its ensure_garage builds it \
         once with `cargo install --locked garage --version {GARAGE_VERSION}` into the tool cache), \
         or set GARAGE_BIN to a garage {GARAGE_VERSION} binary",
        path.display()
    );
    path
}

/// 32 random bytes, hex: an `rpc_secret` or an admin token.
fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    hex::encode(bytes)
}

/// Writes `content` to `path`, mode 0600.
fn write_private(path: &Path, content: &str) {
    std::fs::write(path, content).expect("write a private file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod a private file");
}

/// One `garage server` of a [`GarageCluster`].
pub struct GarageNode {
    child: Option<Child>,
    /// Its directory: `garage.toml`, `meta/`, `data/`, `garage.log`.
    pub dir: PathBuf,
    /// `127.0.0.1:<port>`: RPC between nodes.
    pub rpc_addr: String,
    /// The S3 API port.
    pub s3_port: u16,
    /// The admin API port.
    pub admin_port: u16,
    /// Its node id (hex), known once it has started.
    pub id: String,
}

impl GarageNode {
    fn config(&self) -> PathBuf {
        self.dir.join("garage.toml")
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("garage.log")).unwrap_or_default()
    }

    /// `http://127.0.0.1:<s3 port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("garage.log"))
            .expect("open the garage log");
        let child = Command::new(garage_bin())
            .arg("-c")
            .arg(self.config())
            .arg("server")
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file"))
            .stderr(log)
            .spawn()
            .expect("start garage server");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

/// A running Garage cluster with a bucket and a key; every node is killed and
/// every directory removed on drop.
pub struct GarageCluster {
    /// The nodes; node 0 serves [`GarageCluster::endpoint`].
    pub nodes: Vec<GarageNode>,
    /// The bucket the key may read, write and own ([`BUCKET`]).
    pub bucket: String,
    /// The access key id (`GK…`).
    pub key_id: String,
    secret: String,
    /// A 0600 file holding the access key id.
    pub access_key_id_file: PathBuf,
    /// A 0600 file holding the secret access key.
    pub secret_access_key_file: PathBuf,
    dir: TempDir,
}

impl GarageCluster {
    /// Starts `nodes` Garage servers (at least 3: `replication_factor = 3`),
    /// connects them, applies a layout with each node in its own zone,
    /// creates [`BUCKET`] and a key allowed to read, write and own it, and
    /// waits until every node serves the bucket over S3.
    ///
    /// A port that [`free_port`] found free can be taken by another test
    /// before Garage binds it: the node then exits at once, and the whole
    /// cluster is started again on new ports (three tries).
    pub fn start(nodes: usize) -> Self {
        assert!(nodes >= 3, "replication_factor = 3 needs at least 3 nodes");
        require_tool("rclone", "rclone");
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(nodes) {
                Ok(cluster) => return cluster,
                Err(logs) => last = logs,
            }
        }
        panic!("Garage could not bind its ports in three tries; the last logs:\n{last}");
    }

    /// [`GarageCluster::start`] once; Err (the node logs) when a node exited
    /// because a port was taken.
    fn try_start(nodes: usize) -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let rpc_secret = random_hex();
        let mut members = Vec::new();
        for i in 0..nodes {
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).expect("create a node dir");
            let node = GarageNode {
                child: None,
                rpc_addr: format!("127.0.0.1:{}", free_port()),
                s3_port: free_port(),
                admin_port: free_port(),
                id: String::new(),
                dir: node_dir,
            };
            let toml = format!(
                "metadata_dir = \"{meta}\"\n\
                 data_dir = \"{data}\"\n\
                 db_engine = \"sqlite\"\n\
                 metadata_fsync = false\n\
                 data_fsync = false\n\
                 replication_factor = 3\n\
                 rpc_bind_addr = \"{rpc}\"\n\
                 rpc_public_addr = \"{rpc}\"\n\
                 rpc_secret = \"{rpc_secret}\"\n\
                 bootstrap_peers = []\n\
                 \n\
                 [s3_api]\n\
                 s3_region = \"{REGION}\"\n\
                 api_bind_addr = \"127.0.0.1:{s3}\"\n\
                 \n\
                 [admin]\n\
                 api_bind_addr = \"127.0.0.1:{admin}\"\n\
                 admin_token = \"{token}\"\n",
                meta = node.dir.join("meta").display(),
                data = node.dir.join("data").display(),
                rpc = node.rpc_addr,
                s3 = node.s3_port,
                admin = node.admin_port,
                token = random_hex(),
            );
            write_private(&node.config(), &toml);
            members.push(node);
        }
        let mut cluster = Self {
            nodes: members,
            bucket: BUCKET.to_string(),
            key_id: String::new(),
            secret: String::new(),
            access_key_id_file: dir.path().join("access_key_id"),
            secret_access_key_file: dir.path().join("secret_access_key"),
            dir,
        };
        for node in &mut cluster.nodes {
            node.spawn();
        }
        for i in 0..nodes {
            let waiting = Instant::now();
            let id = loop {
                let out = cluster.garage(i, &["node", "id", "-q"]);
                if out.status.success() {
                    break String::from_utf8_lossy(&out.stdout).into_owned();
                }
                for j in 0..nodes {
                    if let Some(status) = cluster.nodes[j].exited() {
                        if cluster.nodes[j].log().contains("in use") {
                            return Err(cluster.logs());
                        }
                        panic!("garage node {j} exited ({status}):\n{}", cluster.logs());
                    }
                }
                assert!(
                    waiting.elapsed() < READY_TIMEOUT,
                    "garage node {i} gave no node id within {READY_TIMEOUT:?}: {}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    cluster.logs()
                );
                std::thread::sleep(Duration::from_millis(100));
            };
            let id = id.trim();
            cluster.nodes[i].id = id.split('@').next().unwrap_or(id).to_string();
        }
        for i in 1..nodes {
            let peer = format!("{}@{}", cluster.nodes[i].id, cluster.nodes[i].rpc_addr);
            cluster.wait_ok(0, &["node", "connect", &peer], "node connect");
        }
        for i in 0..nodes {
            let id = cluster.nodes[i].id.clone();
            cluster.garage_ok(
                0,
                &[
                    "layout",
                    "assign",
                    "-z",
                    &format!("zone{i}"),
                    "-c",
                    "1G",
                    &id,
                ],
            );
        }
        cluster.garage_ok(0, &["layout", "apply", "--version", "1"]);
        cluster.wait_all_healthy();
        cluster.garage_ok(0, &["bucket", "create", BUCKET]);
        let key = cluster.garage_ok(0, &["key", "create", "etcd-backup-agent"]);
        cluster.key_id = field(&key, "Key ID:");
        cluster.secret = field(&key, "Secret key:");
        cluster.garage_ok(
            0,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                BUCKET,
                "--key",
                "etcd-backup-agent",
            ],
        );
        write_private(
            &cluster.access_key_id_file,
            &format!("{}\n", cluster.key_id),
        );
        write_private(
            &cluster.secret_access_key_file,
            &format!("{}\n", cluster.secret),
        );
        for i in 0..nodes {
            cluster.wait_serving(i);
        }
        Ok(cluster)
    }

    /// The S3 endpoint of node 0: `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        self.nodes[0].endpoint()
    }

    /// The region, [`REGION`].
    pub fn region(&self) -> &str {
        REGION
    }

    /// The secret access key (for tests that check it is never printed).
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// A temporary directory of the cluster's own, for files tests write.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every node's log, headed by its number.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("---- garage node {i} ----\n{}", n.log()))
            .collect()
    }

    /// Runs the `garage` CLI against node `node` with `args`.
    pub fn garage(&self, node: usize, args: &[&str]) -> Output {
        Command::new(garage_bin())
            .arg("-c")
            .arg(self.nodes[node].config())
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run the garage CLI")
    }

    /// [`GarageCluster::garage`], panicking with its output and the node
    /// logs unless it succeeds; returns its standard output.
    pub fn garage_ok(&self, node: usize, args: &[&str]) -> String {
        let out = self.garage(node, args);
        assert!(
            out.status.success(),
            "garage {} failed: {}{}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Retries `garage args` on `node` until it succeeds (the node is still
    /// starting); panics with the node logs after [`READY_TIMEOUT`] or when
    /// a node process exits.
    fn wait_ok(&mut self, node: usize, args: &[&str], what: &str) -> String {
        let start = Instant::now();
        loop {
            let out = self.garage(node, args);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            self.assert_running();
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "garage node {node}: `garage {}` ({what}) still failing after {READY_TIMEOUT:?}: {}\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn assert_running(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(status) = self.nodes[i].exited() {
                panic!("garage node {i} exited ({status}):\n{}", self.logs());
            }
        }
    }

    /// Waits until `garage status` on every running node shows every running
    /// node among the healthy ones (nodes killed by [`GarageCluster::kill`]
    /// may be listed as failed).
    fn wait_all_healthy(&mut self) {
        let start = Instant::now();
        loop {
            let running: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].child.is_some())
                .collect();
            let mut last = None;
            for &i in &running {
                let out = self.garage(i, &["status"]);
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let healthy = text.split("==== FAILED NODES").next().unwrap_or_default();
                let ok = out.status.success()
                    && running
                        .iter()
                        .all(|&j| healthy.contains(&self.nodes[j].id[..16]));
                if !ok {
                    last = Some(format!(
                        "node {i}: {text}{}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                    break;
                }
            }
            let Some(last) = last else {
                return;
            };
            self.assert_running();
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "the Garage cluster did not become healthy within {READY_TIMEOUT:?}; last `garage status`:\n{last}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until node `node` lists the bucket over S3 with the key.
    fn wait_serving(&mut self, node: usize) {
        let rclone = Rclone::for_node(self, node);
        let start = Instant::now();
        loop {
            let out = rclone.run(&["lsf", &format!("garage:{}", self.bucket)]);
            if out.status.success() {
                return;
            }
            self.assert_running();
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "garage node {node} does not serve bucket {} over S3 after {READY_TIMEOUT:?}: {}\n{}",
                self.bucket,
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs node `node` (it stays down until [`GarageCluster::restart`]).
    pub fn kill(&mut self, node: usize) {
        self.nodes[node].kill();
    }

    /// Starts node `node` again on its directories and RPC address (which
    /// the other nodes know it by), and waits until the cluster is healthy
    /// and the node serves the bucket again. A port another process took
    /// while the node was down (free ports come from the ephemeral range,
    /// where outgoing connections get theirs too): the S3 and admin APIs of
    /// a node other than 0 (whose endpoint the agent and rclone use) move to
    /// new free ports; the RPC port is waited for.
    pub fn restart(&mut self, node: usize) {
        assert!(
            self.nodes[node].child.is_none(),
            "garage node {node} is running"
        );
        let deadline = Instant::now() + READY_TIMEOUT;
        for attempt in 1.. {
            self.free_ports_of(node, deadline);
            self.nodes[node].spawn();
            std::thread::sleep(Duration::from_millis(300));
            let exited = self.nodes[node]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some();
            if !exited {
                break;
            }
            self.nodes[node].child = None;
            assert!(
                attempt < 5 && self.nodes[node].log().contains("Address already in use"),
                "garage node {node} exited on restart:\n{}",
                self.logs()
            );
        }
        self.wait_all_healthy();
        self.wait_serving(node);
    }

    /// Makes node `node`'s ports bindable before it starts again (see
    /// [`GarageCluster::restart`]).
    fn free_ports_of(&mut self, node: usize, deadline: Instant) {
        let bindable = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if node != 0 {
            let n = &mut self.nodes[node];
            let mut toml = std::fs::read_to_string(n.config()).expect("read garage.toml");
            for port in [&mut n.s3_port, &mut n.admin_port] {
                if !bindable(*port) {
                    let new = free_port();
                    toml = toml.replace(
                        &format!("127.0.0.1:{port}\""),
                        &format!("127.0.0.1:{new}\""),
                    );
                    *port = new;
                }
            }
            write_private(&n.config(), &toml);
        }
        let rpc: u16 = self.nodes[node]
            .rpc_addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("an RPC port");
        while !bindable(rpc) {
            assert!(
                Instant::now() < deadline,
                "garage node {node}'s RPC port {rpc} is still taken by another process"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// [`Rclone`] for node 0's endpoint with the cluster's key.
    pub fn rclone(&self) -> Rclone {
        Rclone::for_node(self, 0)
    }
}

impl Drop for GarageCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

/// The value after `label` on its line of `text` (`garage key create`'s
/// `Key ID:` and `Secret key:`).
fn field(text: &str, label: &str) -> String {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| panic!("no `{label}` in the garage CLI's output:\n{text}"))
}

/// rclone with a config (in its own temporary directory, 0600) for one
/// Garage node's S3 endpoint and the cluster's key; the remote is `garage:`.
pub struct Rclone {
    dir: TempDir,
}

impl Rclone {
    /// For node `node` of `cluster`, with the cluster's key.
    pub fn for_node(cluster: &GarageCluster, node: usize) -> Self {
        Self::new(
            &cluster.nodes[node].endpoint(),
            &cluster.key_id,
            &cluster.secret,
        )
    }

    /// For `endpoint`, region [`REGION`], path-style, with this key.
    pub fn new(endpoint: &str, key_id: &str, secret: &str) -> Self {
        require_tool("rclone", "rclone");
        let dir = tempfile::tempdir().expect("tempdir");
        write_private(
            &dir.path().join("rclone.conf"),
            &format!(
                "[garage]\ntype = s3\nprovider = Other\nendpoint = {endpoint}\nregion = {REGION}\n\
                 force_path_style = true\naccess_key_id = {key_id}\nsecret_access_key = {secret}\n"
            ),
        );
        Self { dir }
    }

    /// The config file (`--config`).
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("rclone.conf")
    }

    /// Runs `rclone --config <config> args`, without the environment's
    /// `AWS_*` and `RCLONE_*` variables (an `AWS_CA_BUNDLE` makes rclone's S3
    /// client fail even for plain http; the config file says everything).
    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("rclone");
        for (k, _) in std::env::vars_os() {
            let k_str = k.to_string_lossy();
            if k_str.starts_with("AWS_") || k_str.starts_with("RCLONE_") {
                cmd.env_remove(&k);
            }
        }
        cmd.arg("--config")
            .arg(self.config())
            .args(["--low-level-retries", "2", "--retries", "1"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run rclone")
    }

    fn run_ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "rclone {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// `rclone lsf -R --files-only garage:<bucket>/<path>`: every object
    /// below `path` (`""` for the whole bucket), relative to it, sorted.
    pub fn list(&self, bucket: &str, path: &str) -> Vec<String> {
        let target = format!("garage:{bucket}/{path}");
        let out = self.run_ok(&["lsf", "-R", "--files-only", &target]);
        let mut names: Vec<String> = String::from_utf8_lossy(&out)
            .lines()
            .map(str::to_string)
            .collect();
        names.sort();
        names
    }

    /// `rclone cat garage:<bucket>/<key>`: an object's bytes.
    pub fn cat(&self, bucket: &str, key: &str) -> Vec<u8> {
        self.run_ok(&["cat", &format!("garage:{bucket}/{key}")])
    }

    /// `rclone backend list-multipart-uploads garage:<bucket>`: the keys of
    /// the incomplete multipart uploads in the bucket.
    pub fn multipart_uploads(&self, bucket: &str) -> Vec<String> {
        let out = self.run_ok(&[
            "backend",
            "list-multipart-uploads",
            &format!("garage:{bucket}"),
        ]);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!(
                "rclone list-multipart-uploads printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out)
            )
        });
        let mut keys = Vec::new();
        if let Some(buckets) = v.as_object() {
            for uploads in buckets.values() {
                for u in uploads.as_array().into_iter().flatten() {
                    keys.push(u["Key"].as_str().unwrap_or_default().to_string());
                }
            }
        }
        keys.sort();
        keys
    }
}
