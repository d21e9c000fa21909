//! A throwaway OpenSSH server on loopback, with its own host key, and client
//! key pairs made by `ssh-keygen`.
//!
//! [`SshServer::start`] runs the real `/usr/sbin/sshd -D -e` on a free
//! 127.0.0.1 port with a config in its own temporary directory. Every user
//! authenticates against the same `authorized_keys` file there; the sftp
//! subsystem is `internal-sftp` without a chroot, so SFTP paths are absolute
//! paths on this machine, such as [`SshServer::sftp_root`].
//!
//! [`SshServer::kill_all`] SIGKILLs the listener and every per-connection
//! process it forked, so a transfer in progress dies mid-stream, and
//! [`SshServer::restart`] brings the same server (port, host key, config) back.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::agent::AgentRun;
use crate::{files_below, free_port, require_tool, wait_for};

/// The dedicated local account for password authentication. `scripts/test`
/// creates it when missing (`useradd` + `chpasswd`).
pub const PASSWORD_ACCOUNT: &str = "etcdbackuptest";

/// The password `scripts/test` gives [`PASSWORD_ACCOUNT`].
pub const PASSWORD_ACCOUNT_PASSWORD: &str = "etcd-backup-test-Passw0rd";

/// How long sshd gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A key algorithm, for host keys and client keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyKind {
    /// `ssh-ed25519`.
    #[default]
    Ed25519,
    /// `ecdsa-sha2-nistp256` (256 bits).
    Ecdsa,
    /// `ssh-rsa` (3072 bits).
    Rsa,
}

impl KeyKind {
    /// The algorithm name that starts a public key line.
    pub fn key_type(self) -> &'static str {
        match self {
            KeyKind::Ed25519 => "ssh-ed25519",
            KeyKind::Ecdsa => "ecdsa-sha2-nistp256",
            KeyKind::Rsa => "ssh-rsa",
        }
    }

    fn keygen_args(self) -> &'static [&'static str] {
        match self {
            KeyKind::Ed25519 => &["-t", "ed25519"],
            KeyKind::Ecdsa => &["-t", "ecdsa", "-b", "256"],
            KeyKind::Rsa => &["-t", "rsa", "-b", "3072"],
        }
    }
}

/// Runs `ssh-keygen` to write a new key pair at `path` and `path.pub`.
fn keygen(kind: KeyKind, passphrase: &str, comment: &str, path: &Path) {
    require_tool("ssh-keygen", "openssh-client");
    let out = Command::new("ssh-keygen")
        .arg("-q")
        .args(kind.keygen_args())
        .arg("-N")
        .arg(passphrase)
        .arg("-C")
        .arg(comment)
        .arg("-f")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen {kind:?} {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client key pair made with `ssh-keygen` in its own temporary directory,
/// which lives as long as this value.
pub struct ClientKey {
    /// The private key, in OpenSSH format (encrypted when made with a
    /// passphrase).
    pub private_key: PathBuf,
    /// The public key file (`private_key` + `.pub`).
    pub public_key: PathBuf,
    /// The public key line, such as `ssh-ed25519 AAAA... etcd-backup-test`.
    pub public_line: String,
    /// The algorithm.
    pub kind: KeyKind,
    /// The passphrase the private key is encrypted with, if any.
    pub passphrase: Option<String>,
    _dir: TempDir,
}

impl ClientKey {
    /// Makes a new key pair (RSA: 3072 bits, ECDSA: 256 bits), encrypted with
    /// `passphrase` when given.
    pub fn generate(kind: KeyKind, passphrase: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let private_key = dir.path().join("id_test");
        keygen(
            kind,
            passphrase.unwrap_or(""),
            "etcd-backup-test",
            &private_key,
        );
        let public_key = dir.path().join("id_test.pub");
        let public_line = fs::read_to_string(&public_key)
            .expect("read public key")
            .trim()
            .to_string();
        Self {
            private_key,
            public_key,
            public_line,
            kind,
            passphrase: passphrase.map(str::to_string),
            _dir: dir,
        }
    }
}

/// What [`SshServer::start`] sets up.
#[derive(Clone, Debug, Default)]
pub struct SshOptions {
    /// Public key lines written to the `authorized_keys` file every user
    /// shares.
    pub authorized_keys: Vec<String>,
    /// The host key's algorithm (default Ed25519).
    pub host_key: KeyKind,
    /// Further host keys the server holds at the same time (one per kind),
    /// so it offers several host-key algorithms in key exchange.
    pub extra_host_keys: Vec<KeyKind>,
    /// Makes `sftp_root` writable by [`SshServer::password_account`] (and the
    /// temporary directory traversable by it). Panics if the account is
    /// missing.
    pub password_user: bool,
    /// `MaxSessions` (session channels per connection); `None`: 100.
    pub max_sessions: Option<u32>,
    /// `MaxStartups` (connections not yet logged in at once, beyond which
    /// sshd drops new ones); `None`: 100.
    pub max_startups: Option<u32>,
    /// The command sshd runs as its `Subsystem sftp` (a shim in front of
    /// the real sftp-server, e.g.); `None`: `internal-sftp`.
    pub sftp_subsystem: Option<String>,
}

/// A running `sshd` on 127.0.0.1; killed (with every session) on drop, and
/// its directory removed.
pub struct SshServer {
    /// The port sshd listens on (127.0.0.1 only).
    pub port: u16,
    /// A directory the SFTP user may write into (absolute path).
    pub sftp_root: PathBuf,
    /// The private host key.
    pub host_key: PathBuf,
    /// Every host key the server holds (`host_key` first), by kind.
    host_keys: Vec<(KeyKind, PathBuf)>,
    /// Holds the config, keys, log and `sftp_root`; removed on drop.
    pub dir: TempDir,
    sshd: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    /// `MaxSessions` and `MaxStartups` as written to the config.
    limits: (u32, u32),
    /// `Subsystem sftp`'s command.
    sftp_subsystem: String,
}

/// Why sshd did not come up.
enum LaunchError {
    /// The port was taken between `free_port` and sshd's bind.
    PortTaken,
    /// Anything else; the message says what.
    Other(String),
}

impl SshServer {
    /// Generates a host key, writes the config and starts sshd; returns once
    /// it listens and sends its `SSH-2.0-` banner. Panics with sshd's log if
    /// it does not start within 20 s.
    pub fn start(opts: SshOptions) -> Self {
        let sshd = absolute_tool("sshd", "openssh-server");
        require_tool("ssh-keygen", "openssh-client");
        let dir = tempfile::tempdir().expect("tempdir");
        let host_key = dir.path().join("ssh_host_key");
        keygen(opts.host_key, "", "etcd-backup-test-host", &host_key);
        let mut host_keys = vec![(opts.host_key, host_key.clone())];
        for &kind in &opts.extra_host_keys {
            assert!(
                host_keys.iter().all(|(k, _)| *k != kind),
                "one host key per kind: {kind:?} twice"
            );
            let path = dir
                .path()
                .join(format!("ssh_host_{kind:?}_key").to_lowercase());
            keygen(kind, "", "etcd-backup-test-host", &path);
            host_keys.push((kind, path));
        }

        let authorized_keys = dir.path().join("authorized_keys");
        let mut keys = String::new();
        for line in &opts.authorized_keys {
            keys.push_str(line.trim());
            keys.push('\n');
        }
        fs::write(&authorized_keys, keys).expect("write authorized_keys");
        fs::set_permissions(&authorized_keys, fs::Permissions::from_mode(0o600))
            .expect("chmod authorized_keys");

        let sftp_root = dir.path().join("sftp");
        fs::create_dir(&sftp_root).expect("create sftp root");
        if opts.password_user {
            let (name, _) = Self::password_account();
            let (uid, gid) = account_ids(&name).expect("password account ids");
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
                .expect("chmod sshd tempdir");
            std::os::unix::fs::chown(&sftp_root, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to {name}: {e}", sftp_root.display()));
        }

        let mut server = Self {
            port: 0,
            sftp_root,
            host_key,
            host_keys,
            config: dir.path().join("sshd_config"),
            dir,
            sshd,
            child: None,
            limits: (
                opts.max_sessions.unwrap_or(100),
                opts.max_startups.unwrap_or(100),
            ),
            sftp_subsystem: opts
                .sftp_subsystem
                .clone()
                .unwrap_or_else(|| "internal-sftp".into()),
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            server.port = free_port();
            server.write_config();
            match server.launch() {
                Ok(()) => return server,
                Err(LaunchError::PortTaken) if attempts < 5 => continue,
                Err(LaunchError::PortTaken) => panic!(
                    "sshd could not bind a free port in {attempts} attempts; log:\n{}",
                    server.log()
                ),
                Err(LaunchError::Other(why)) => panic!("{why}"),
            }
        }
    }

    /// Starts sshd again on the same port with the same host key and config,
    /// after [`kill_all`](Self::kill_all) (it kills first if still running).
    pub fn restart(&mut self) {
        self.kill_all();
        match self.launch() {
            Ok(()) => {}
            Err(LaunchError::PortTaken) => panic!(
                "sshd could not bind port {} again on restart; log:\n{}",
                self.port,
                self.log()
            ),
            Err(LaunchError::Other(why)) => panic!("restart: {why}"),
        }
    }

    /// SIGKILLs the listening sshd and every process it forked (the
    /// per-connection sshd processes and their internal-sftp sessions), so a
    /// transfer in progress dies mid-stream. Returns once they are all dead
    /// and the port refuses connections.
    ///
    /// The per-connection children call `setsid()`, so they are not in the
    /// listener's process group: they are found through the parent links in
    /// `/proc/<pid>/stat`, after the listener is stopped (SIGSTOP) so it cannot
    /// fork more, and each one found is stopped too until a scan finds nothing
    /// new; then all of them are killed at once.
    pub fn kill_all(&mut self) {
        let victims = self.kill_processes();
        wait_for(
            "the killed sshd session processes to die",
            Duration::from_secs(10),
            || victims.iter().all(|&p| !alive(p)).then_some(()),
        );
        let addr = self.addr();
        wait_for(
            &format!("sshd's port {} to close", self.port),
            Duration::from_secs(10),
            || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                    .is_err()
                    .then_some(())
            },
        );
    }

    /// Stops and kills the listener and its descendants; returns the pids
    /// killed besides the listener. Never panics (used by `Drop`).
    fn kill_processes(&mut self) -> BTreeSet<u32> {
        let Some(mut child) = self.child.take() else {
            return BTreeSet::new();
        };
        let root = child.id();
        let mut victims = BTreeSet::new();
        if child.try_wait().ok().flatten().is_none() {
            signal("STOP", &[root]);
            wait_stopped(&[root]);
            // Freeze the whole tree before killing anything: a killed parent
            // would orphan its children to init and break the ppid links.
            for _ in 0..100 {
                let new: Vec<u32> = descendants(root)
                    .into_iter()
                    .filter(|p| !victims.contains(p))
                    .collect();
                if new.is_empty() {
                    break;
                }
                signal("STOP", &new);
                wait_stopped(&new);
                victims.extend(new);
            }
            let mut all: Vec<u32> = victims.iter().copied().collect();
            all.push(root);
            signal("KILL", &all);
        }
        let _ = child.kill();
        let _ = child.wait();
        victims
    }

    /// The processes sshd has forked (per-connection sshd processes and
    /// sftp sessions), found through `/proc` parent links.
    pub fn session_pids(&self) -> Vec<u32> {
        match &self.child {
            Some(c) => descendants(c.id()),
            None => Vec::new(),
        }
    }

    /// The processes serving one SFTP session each (with `internal-sftp`,
    /// the child sshd forks per session channel): the leaves of sshd's
    /// process tree, oldest (lowest pid) first. SIGKILLing one ends that
    /// session alone, its connection's other channels and other
    /// connections going on.
    pub fn sftp_session_pids(&self) -> Vec<u32> {
        let all = self.session_pids();
        let table = process_table();
        all.iter()
            .copied()
            .filter(|&p| !table.iter().any(|&(_, ppid, _)| ppid == p))
            .collect()
    }

    /// The listening sshd's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's public host key line, `<type> <base64>` (no host field,
    /// no comment).
    pub fn host_key_line(&self) -> String {
        public_key_line(&self.host_key)
    }

    /// The host keys the server holds, by kind (the main one first).
    pub fn host_key_kinds(&self) -> Vec<KeyKind> {
        self.host_keys.iter().map(|(k, _)| *k).collect()
    }

    /// The private key file of the host key of `kind`; panics if the server
    /// holds none.
    fn host_key_of(&self, kind: KeyKind) -> &Path {
        self.host_keys
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, p)| p.as_path())
            .unwrap_or_else(|| panic!("the server holds no {kind:?} host key"))
    }

    /// [`host_key_line`](Self::host_key_line) of the host key of `kind`.
    pub fn host_key_line_of(&self, kind: KeyKind) -> String {
        public_key_line(self.host_key_of(kind))
    }

    /// A `known_hosts` line naming only the host key of `kind`.
    pub fn known_hosts_line_of(&self, kind: KeyKind) -> String {
        format!("[127.0.0.1]:{} {}", self.port, self.host_key_line_of(kind))
    }

    /// [`fingerprint`](Self::fingerprint) of the host key of `kind`.
    pub fn fingerprint_of(&self, kind: KeyKind) -> String {
        fingerprint_of_file(&self.host_key_of(kind).with_extension("pub"))
    }

    /// SIGSTOPs every session process sshd has forked (not the listener,
    /// which goes on accepting and forking new sessions) and returns their
    /// pids once they are stopped: a transfer in progress stalls without the
    /// connection closing, as on a hung server. [`resume`](Self::resume)
    /// continues them; drop kills them either way.
    pub fn stop_sessions(&self) -> Vec<u32> {
        let pids = self.session_pids();
        signal("STOP", &pids);
        wait_stopped(&pids);
        pids
    }

    /// SIGSTOPs the listener too: new connections are accepted by the kernel
    /// but never answered. Returns its pid.
    pub fn stop_listener(&self) -> u32 {
        let pid = self.pid().expect("sshd is not running");
        signal("STOP", &[pid]);
        wait_stopped(&[pid]);
        pid
    }

    /// SIGCONTs `pids` (from [`stop_sessions`](Self::stop_sessions) or
    /// [`stop_listener`](Self::stop_listener)).
    pub fn resume(&self, pids: &[u32]) {
        signal("CONT", pids);
    }

    /// A `known_hosts` line for this server: `[127.0.0.1]:PORT <type> <base64>`.
    pub fn known_hosts_line(&self) -> String {
        self.known_hosts_line_at(self.port)
    }

    /// The known_hosts line trusting this server's host key at `port` on
    /// 127.0.0.1: a relay in front of the server.
    pub fn known_hosts_line_at(&self, port: u16) -> String {
        format!("[127.0.0.1]:{port} {}", self.host_key_line())
    }

    /// [`known_hosts_line`](Self::known_hosts_line) hashed by
    /// `ssh-keygen -H`: `|1|<salt>|<hash> <type> <base64>` (a new salt on
    /// every call).
    pub fn hashed_known_hosts_line(&self) -> String {
        let (_, hashed) = ssh_keygen_on_file("-H", "known_hosts", &self.known_hosts_line());
        hashed
            .lines()
            .find(|l| l.starts_with("|1|"))
            .unwrap_or_else(|| panic!("ssh-keygen -H wrote no hashed line: {hashed:?}"))
            .to_string()
    }

    /// Writes [`known_hosts_line`](Self::known_hosts_line) to a
    /// `known_hosts` file in the server's directory and returns its path.
    pub fn known_hosts_file(&self) -> PathBuf {
        let file = self.dir.path().join("known_hosts");
        fs::write(&file, format!("{}\n", self.known_hosts_line())).expect("write known_hosts");
        file
    }

    /// The host key's fingerprint, `SHA256:...`, as `ssh-keygen -l -E sha256`
    /// prints it.
    pub fn fingerprint(&self) -> String {
        fingerprint_of_file(&self.host_key.with_extension("pub"))
    }

    /// The user for key authentication: the current user (root in CI).
    pub fn key_user() -> String {
        let out = Command::new("id")
            .arg("-un")
            .stdin(Stdio::null())
            .output()
            .expect("run id -un");
        assert!(out.status.success(), "id -un failed");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Name and password of the local account for password authentication.
    /// Panics, saying to run `scripts/test`, if the account is missing.
    pub fn password_account() -> (String, String) {
        assert!(
            account_ids(PASSWORD_ACCOUNT).is_some(),
            "the local account `{PASSWORD_ACCOUNT}` for the SFTP password tests is missing; \
             run scripts/test (it creates it with useradd and chpasswd)"
        );
        if let Ok(shadow) = fs::read_to_string("/etc/shadow") {
            let hash = shadow
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{PASSWORD_ACCOUNT}:")))
                .and_then(|rest| rest.split(':').next())
                .unwrap_or("");
            assert!(
                !(hash.is_empty() || hash.starts_with('!') || hash.starts_with('*')),
                "the local account `{PASSWORD_ACCOUNT}` has no usable password; \
                 run scripts/test (it sets it with chpasswd)"
            );
        }
        (
            PASSWORD_ACCOUNT.to_string(),
            PASSWORD_ACCOUNT_PASSWORD.to_string(),
        )
    }

    /// sshd's log so far (every start and restart).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("sshd.log")
    }

    fn write_config(&self) {
        let dir = self.dir.path();
        let mut config = format!(
            "ListenAddress 127.0.0.1\n\
             Port {port}\n\
             {host_keys}\
             PidFile {pid}\n\
             AuthorizedKeysFile {keys}\n\
             StrictModes no\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication yes\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin yes\n\
             UsePAM no\n\
             Subsystem sftp {sftp_subsystem}\n\
             LogLevel VERBOSE\n\
             MaxStartups {max_startups}\n\
             MaxSessions {max_sessions}\n",
            port = self.port,
            max_sessions = self.limits.0,
            max_startups = self.limits.1,
            sftp_subsystem = self.sftp_subsystem,
            host_keys = self
                .host_keys
                .iter()
                .map(|(_, p)| format!("HostKey {}\n", p.display()))
                .collect::<String>(),
            pid = dir.join("sshd.pid").display(),
            keys = dir.join("authorized_keys").display(),
        );
        // OpenSSH 9.8+ penalizes addresses whose connections fail; the tests
        // kill sessions on purpose from 127.0.0.1, so turn that off where the
        // option exists.
        let with_penalties = format!("{config}PerSourcePenalties no\n");
        fs::write(&self.config, &with_penalties).expect("write sshd_config");
        if self.config_test().is_err() {
            fs::write(&self.config, &config).expect("write sshd_config");
            if let Err(e) = self.config_test() {
                config.push_str("# rejected by sshd -t\n");
                panic!("sshd -t rejects the generated config:\n{e}\n{config}");
            }
        }
    }

    /// `sshd -t`: checks the config and keys without starting.
    fn config_test(&self) -> Result<(), String> {
        ensure_privsep_dir();
        let out = Command::new(&self.sshd)
            .arg("-t")
            .arg("-f")
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .expect("run sshd -t");
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Spawns `sshd -D -e -f CONFIG` and waits until it listens and answers
    /// with its banner.
    fn launch(&mut self) -> Result<(), LaunchError> {
        ensure_privsep_dir();
        let log_start = fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0) as usize;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open sshd log");
        let child = Command::new(&self.sshd)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.sshd.display()));
        self.child = Some(child);

        let listening = format!("Server listening on 127.0.0.1 port {}", self.port);
        let started = Instant::now();
        loop {
            let status = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            let log = self.log();
            let this_run = log.get(log_start..).unwrap_or(&log);
            if let Some(status) = status {
                self.child = None;
                if this_run.contains("Address already in use")
                    || this_run.contains("Cannot bind any address")
                {
                    return Err(LaunchError::PortTaken);
                }
                return Err(LaunchError::Other(format!(
                    "sshd exited at start ({status}); log:\n{log}"
                )));
            }
            // The log line proves it is our sshd that bound the port; the
            // banner proves it accepts and speaks SSH.
            if this_run.contains(&listening) && banner(self.addr()).is_some() {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                self.kill_processes();
                return Err(LaunchError::Other(format!(
                    "sshd did not start listening on port {} within {START_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        self.kill_processes();
    }
}

/// `<type> <base64>` of the public half (`private.pub`) of a key made by
/// `ssh-keygen` (no comment).
fn public_key_line(private: &Path) -> String {
    let pubkey = fs::read_to_string(private.with_extension("pub")).expect("read public host key");
    let mut fields = pubkey.split_whitespace();
    let (Some(kind), Some(blob)) = (fields.next(), fields.next()) else {
        panic!("malformed public host key: {pubkey:?}");
    };
    format!("{kind} {blob}")
}

/// A public key file's fingerprint, `SHA256:...`, as `ssh-keygen -l -E
/// sha256` prints it.
fn fingerprint_of_file(public: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(public)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen -l");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ssh-keygen -l: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.split_whitespace()
        .find(|f| f.starts_with("SHA256:"))
        .unwrap_or_else(|| panic!("no SHA256 fingerprint in {text:?}"))
        .to_string()
}

/// Asserts that `run` was refused before authenticating to `sshd`: exit 1,
/// the message names host and port and `wanted`, nothing reached the server,
/// sshd saw no login attempt, and the failure was not retried.
pub fn assert_refused_before_login(run: &AgentRun, sshd: &SshServer, wanted: &str) {
    run.assert_code(1);
    assert!(
        run.stderr.contains(&format!("127.0.0.1:{}", sshd.port)),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(wanted),
        "{wanted:?} not in:\n{}",
        run.stderr
    );
    assert!(
        files_below(&sshd.sftp_root).is_empty(),
        "{:?}",
        files_below(&sshd.sftp_root)
    );
    let log = sshd.log();
    assert!(
        !log.contains("Accepted") && !log.contains("Failed"),
        "the client tried to log in:\n{log}"
    );
    assert!(
        run.elapsed < Duration::from_secs(4),
        "a host-key failure was retried: {:?}",
        run.elapsed
    );
}

/// Runs `ssh-keygen FLAG -f FILE` on a temporary `name` holding `line`;
/// returns what it printed and what the file holds afterwards.
pub(crate) fn ssh_keygen_on_file(flag: &str, name: &str, line: &str) -> (String, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join(name);
    fs::write(&file, format!("{}\n", line.trim())).expect("write the key file");
    let out = Command::new("ssh-keygen")
        .arg(flag)
        .arg("-f")
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen {flag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = fs::read_to_string(&file).expect("read the key file back");
    (
        String::from_utf8(out.stdout).expect("ssh-keygen prints ASCII"),
        after,
    )
}

/// The `SSH-2.0-...` line a server sends first, if it sends one within 2 s.
pub fn banner(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while buf.len() < 255 && !buf.ends_with(b"\n") {
        match stream.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
    line.starts_with("SSH-2.0-").then_some(line)
}

/// `tool` as an absolute path (sshd refuses to start from a relative one).
fn absolute_tool(tool: &str, package: &str) -> PathBuf {
    require_tool(tool, package);
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(tool))
                .find(|f| f.is_file())
        })
        .map(|f| fs::canonicalize(&f).unwrap_or(f))
        .filter(|f| f.is_absolute())
        .unwrap_or_else(|| panic!("`{tool}` is not on PATH as an absolute path"))
}

/// The uid and gid of a local account, from `/etc/passwd`.
fn account_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        if f.next()? != name {
            return None;
        }
        let _password = f.next()?;
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    })
}

/// Sends `sig` (a name such as `KILL`) to `pids` with the shell's `kill`
/// builtin (no unsafe code, no procps needed). Gone pids are ignored.
pub(crate) fn signal(sig: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("kill -s {sig} \"$@\" 2>/dev/null; exit 0"))
        .arg("sh")
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `(pid, ppid, state)` of every process, from `/proc/<pid>/stat`.
fn process_table() -> Vec<(u32, u32, char)> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let (ppid, state) = stat(pid)?;
            Some((pid, ppid, state))
        })
        .collect()
}

/// `(ppid, state)` of one process; the command name in parentheses may hold
/// spaces or parentheses, so parse after the last `)`.
fn stat(pid: u32) -> Option<(u32, char)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Every descendant of `root` (children, their children, ...), sorted.
pub(crate) fn descendants(root: u32) -> Vec<u32> {
    let table = process_table();
    let mut found = BTreeSet::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid, _) in &table {
            if ppid == parent && pid != root && found.insert(pid) {
                frontier.push(pid);
            }
        }
    }
    found.into_iter().collect()
}

/// Whether `pid` is still running (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    matches!(stat(pid), Some((_, state)) if state != 'Z' && state != 'X')
}

/// Waits (up to 2 s) until every pid is stopped, dead or gone.
fn wait_stopped(pids: &[u32]) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let settled = pids
            .iter()
            .all(|&p| matches!(stat(p), None | Some((_, 'T' | 't' | 'Z' | 'X'))));
        if settled {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// sshd (even `sshd -t`) refuses to run without its privilege separation
/// directory, which only the init system's unit creates: a machine where sshd
/// was installed but never started as a service has none.
fn ensure_privsep_dir() {
    if !Path::new("/run/sshd").is_dir() {
        fs::create_dir_all("/run/sshd").expect("create sshd's privsep dir /run/sshd");
        fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755))
            .expect("chmod /run/sshd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Output;

    /// The OpenSSH client options every test uses: no user config, only the
    /// given known_hosts file, strict host key checking, only the given key.
    fn client_opts(cmd: &mut Command, known_hosts: &Path) {
        cmd.arg("-F")
            .arg("/dev/null")
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args(["-o", "GlobalKnownHostsFile=/dev/null"])
            .args(["-o", "StrictHostKeyChecking=yes"])
            .args(["-o", "IdentitiesOnly=yes"])
            .args(["-o", "ConnectTimeout=10"])
            .env_remove("SSH_AUTH_SOCK");
    }

    fn sftp_cmd(
        server: &SshServer,
        key: &ClientKey,
        known_hosts: &Path,
        batch: &Path,
        extra: &[&str],
    ) -> Command {
        require_tool("sftp", "openssh-client");
        let mut cmd = Command::new("sftp");
        client_opts(&mut cmd, known_hosts);
        cmd.args(["-o", "BatchMode=yes"])
            .args(extra)
            .arg("-i")
            .arg(&key.private_key)
            .arg("-P")
            .arg(server.port.to_string())
            .arg("-b")
            .arg(batch)
            .arg(format!("{}@127.0.0.1", SshServer::key_user()))
            .stdin(Stdio::null());
        cmd
    }

    /// `sftp -b` with `put local remote`.
    fn sftp_put(
        server: &SshServer,
        key: &ClientKey,
        known_hosts: &Path,
        local: &Path,
        remote: &Path,
    ) -> Output {
        let tmp = tempfile::tempdir().unwrap();
        let batch = tmp.path().join("batch");
        fs::write(
            &batch,
            format!("put {} {}\n", local.display(), remote.display()),
        )
        .unwrap();
        sftp_cmd(server, key, known_hosts, &batch, &[])
            .output()
            .expect("run sftp")
    }

    fn assert_ok(what: &str, out: &Output, server: &SshServer) {
        assert!(
            out.status.success(),
            "{what} failed ({}):\nstdout: {}\nstderr: {}\nsshd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            server.log()
        );
    }

    fn upload_roundtrip(server: &SshServer, key: &ClientKey, known_hosts: &Path, name: &str) {
        let tmp = tempfile::tempdir().unwrap();
        let local = tmp.path().join("payload");
        let body = format!("payload for {name}\n").repeat(1000);
        fs::write(&local, &body).unwrap();
        let remote = server.sftp_root.join(name);
        let out = sftp_put(server, key, known_hosts, &local, &remote);
        assert_ok(&format!("sftp put {name}"), &out, server);
        assert_eq!(fs::read_to_string(&remote).unwrap(), body);
    }

    #[test]
    fn key_auth_upload_works_and_host_key_is_pinned() {
        let key = ClientKey::generate(KeyKind::Ed25519, None);
        assert!(key.public_line.starts_with("ssh-ed25519 AAAA"));
        let server = SshServer::start(SshOptions {
            authorized_keys: vec![key.public_line.clone()],
            ..SshOptions::default()
        });
        assert!(server.sftp_root.is_absolute());
        assert!(server.host_key_line().starts_with("ssh-ed25519 AAAA"));
        assert_eq!(server.host_key_line().split(' ').count(), 2);
        assert_eq!(
            server.known_hosts_line(),
            format!("[127.0.0.1]:{} {}", server.port, server.host_key_line())
        );
        let known_hosts = server.known_hosts_file();
        upload_roundtrip(&server, &key, &known_hosts, "plain.bin");

        // The hashed line works just as well.
        let hashed = server.hashed_known_hosts_line();
        assert!(hashed.starts_with("|1|"), "{hashed}");
        assert!(hashed.ends_with(&server.host_key_line()), "{hashed}");
        let tmp = tempfile::tempdir().unwrap();
        let hashed_file = tmp.path().join("known_hosts_hashed");
        fs::write(&hashed_file, format!("{hashed}\n")).unwrap();
        upload_roundtrip(&server, &key, &hashed_file, "hashed.bin");

        // Another server's key for this host:port is refused.
        let other = SshServer::start(SshOptions::default());
        let wrong = tmp.path().join("known_hosts_wrong");
        fs::write(
            &wrong,
            format!("[127.0.0.1]:{} {}\n", server.port, other.host_key_line()),
        )
        .unwrap();
        let local = tmp.path().join("x");
        fs::write(&local, "x").unwrap();
        let out = sftp_put(&server, &key, &wrong, &local, &server.sftp_root.join("x"));
        assert!(!out.status.success(), "a wrong host key was accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!server.sftp_root.join("x").exists());

        // An unauthorized client key is refused.
        let stranger = ClientKey::generate(KeyKind::Ed25519, None);
        let out = sftp_put(
            &server,
            &stranger,
            &known_hosts,
            &local,
            &server.sftp_root.join("x"),
        );
        assert!(!out.status.success(), "an unauthorized key was accepted");
        assert!(!server.sftp_root.join("x").exists());
    }

    /// The fingerprint is what the real client sees (`ssh -v` prints "Server
    /// host key: <type> SHA256:...").
    fn client_seen_fingerprint(server: &SshServer, key: &ClientKey) -> String {
        require_tool("ssh", "openssh-client");
        let mut cmd = Command::new("ssh");
        client_opts(&mut cmd, &server.known_hosts_file());
        let out = cmd
            .args(["-v", "-o", "BatchMode=yes", "-T"])
            .arg("-i")
            .arg(&key.private_key)
            .arg("-p")
            .arg(server.port.to_string())
            .arg(format!("{}@127.0.0.1", SshServer::key_user()))
            .arg("true")
            .stdin(Stdio::null())
            .output()
            .expect("run ssh");
        assert_ok("ssh true", &out, server);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr
            .lines()
            .find(|l| l.contains("Server host key:"))
            .unwrap_or_else(|| panic!("no 'Server host key' in ssh -v output:\n{stderr}"));
        line.split_whitespace()
            .find(|f| f.starts_with("SHA256:"))
            .unwrap()
            .to_string()
    }

    #[test]
    fn every_key_kind_works_and_fingerprints_match() {
        for kind in [KeyKind::Ed25519, KeyKind::Ecdsa, KeyKind::Rsa] {
            let key = ClientKey::generate(kind, None);
            assert!(
                key.public_line
                    .starts_with(&format!("{} AAAA", kind.key_type())),
                "{kind:?}: {}",
                key.public_line
            );
            let server = SshServer::start(SshOptions {
                authorized_keys: vec![key.public_line.clone()],
                host_key: kind,
                ..SshOptions::default()
            });
            assert!(
                server.host_key_line().starts_with(kind.key_type()),
                "{kind:?}: {}",
                server.host_key_line()
            );
            let fp = server.fingerprint();
            assert!(fp.starts_with("SHA256:") && fp.len() == 50, "{fp}");
            assert_eq!(client_seen_fingerprint(&server, &key), fp, "{kind:?}");
            upload_roundtrip(
                &server,
                &key,
                &server.known_hosts_file(),
                &format!("{kind:?}.bin"),
            );
        }
    }

    #[test]
    fn one_server_holds_several_host_keys_and_offers_each() {
        require_tool("ssh-keyscan", "openssh-client");
        let server = SshServer::start(SshOptions {
            host_key: KeyKind::Ed25519,
            extra_host_keys: vec![KeyKind::Rsa, KeyKind::Ecdsa],
            ..SshOptions::default()
        });
        let kinds = [KeyKind::Ed25519, KeyKind::Rsa, KeyKind::Ecdsa];
        assert_eq!(server.host_key_kinds(), kinds);
        assert_eq!(
            server.host_key_line_of(KeyKind::Ed25519),
            server.host_key_line()
        );
        assert_eq!(
            server.fingerprint_of(KeyKind::Ed25519),
            server.fingerprint()
        );
        let mut fingerprints = BTreeSet::new();
        for kind in kinds {
            // What the real client fetches when it asks for this type only.
            let out = Command::new("ssh-keyscan")
                .args(["-p", &server.port.to_string(), "-t"])
                .arg(match kind {
                    KeyKind::Ed25519 => "ed25519",
                    KeyKind::Ecdsa => "ecdsa",
                    KeyKind::Rsa => "rsa",
                })
                .arg("127.0.0.1")
                .stdin(Stdio::null())
                .output()
                .expect("run ssh-keyscan");
            let scanned = String::from_utf8_lossy(&out.stdout);
            let line = server.known_hosts_line_of(kind);
            assert!(line.starts_with(&format!(
                "[127.0.0.1]:{} {} AAAA",
                server.port,
                kind.key_type()
            )));
            assert!(
                scanned.lines().any(|l| l.trim() == line),
                "{kind:?}: {line:?} not in ssh-keyscan's {scanned:?}"
            );
            let fp = server.fingerprint_of(kind);
            assert!(fp.starts_with("SHA256:"), "{fp}");
            fingerprints.insert(fp);
        }
        assert_eq!(fingerprints.len(), 3);
    }

    #[test]
    fn passphrase_keys_are_encrypted() {
        let key = ClientKey::generate(KeyKind::Ed25519, Some("s3cret phrase"));
        assert_eq!(key.passphrase.as_deref(), Some("s3cret phrase"));
        let derive = |pass: &str| {
            Command::new("ssh-keygen")
                .args(["-y", "-P", pass, "-f"])
                .arg(&key.private_key)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        };
        assert!(!derive("wrong").status.success());
        let out = derive("s3cret phrase");
        assert!(out.status.success());
        let derived = String::from_utf8_lossy(&out.stdout);
        let blob = |l: &str| l.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        assert_eq!(blob(&derived), blob(&key.public_line));
    }

    #[test]
    fn kill_all_kills_an_active_transfer_and_restart_serves_again() {
        let key = ClientKey::generate(KeyKind::Ed25519, None);
        let mut server = SshServer::start(SshOptions {
            authorized_keys: vec![key.public_line.clone()],
            ..SshOptions::default()
        });
        let known_hosts = server.known_hosts_file();
        let pid_before = server.pid().unwrap();

        // 32 MiB at 4 Mbit/s would take over a minute.
        let tmp = tempfile::tempdir().unwrap();
        let local = tmp.path().join("big");
        let mut data = vec![0u8; 32 << 20];
        fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut data)
            .unwrap();
        fs::write(&local, &data).unwrap();
        let remote = server.sftp_root.join("big");
        let batch = tmp.path().join("batch");
        fs::write(
            &batch,
            format!("put {} {}\n", local.display(), remote.display()),
        )
        .unwrap();
        let mut client = sftp_cmd(&server, &key, &known_hosts, &batch, &["-l", "4096"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sftp");

        wait_for(
            "the upload to start arriving",
            Duration::from_secs(20),
            || {
                if let Some(status) = client.try_wait().unwrap() {
                    let mut stderr = String::new();
                    let _ = client.stderr.take().unwrap().read_to_string(&mut stderr);
                    panic!(
                        "sftp ended ({status}) before the kill: {stderr}\nsshd log:\n{}",
                        server.log()
                    );
                }
                fs::metadata(&remote)
                    .ok()
                    .filter(|m| m.len() > 64 * 1024)
                    .map(|_| ())
            },
        );
        let sessions = server.session_pids();
        assert!(
            !sessions.is_empty(),
            "no session processes found under sshd"
        );
        let before_kill = Instant::now();
        server.kill_all();
        assert!(before_kill.elapsed() < Duration::from_secs(5));
        for p in &sessions {
            assert!(!alive(*p), "session process {p} survived kill_all");
        }
        assert!(server.pid().is_none());
        assert!(
            TcpStream::connect_timeout(&server.addr(), Duration::from_secs(1)).is_err(),
            "the port still accepts connections after kill_all"
        );

        let status = wait_for("the sftp client to notice", Duration::from_secs(15), || {
            client.try_wait().unwrap()
        });
        let mut stderr = String::new();
        client
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(
            !status.success(),
            "sftp succeeded despite kill_all: {stderr}"
        );
        let arrived = fs::metadata(&remote).unwrap().len();
        assert!(
            arrived < data.len() as u64,
            "the whole file arrived ({arrived} bytes) before the kill"
        );
        // Nothing keeps writing after the kill.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(fs::metadata(&remote).unwrap().len(), arrived);

        server.restart();
        assert_ne!(server.pid(), Some(pid_before));
        // Same port and host key: the old known_hosts file still verifies.
        upload_roundtrip(&server, &key, &known_hosts, "after-restart.bin");
        let log = server.log();
        assert_eq!(
            log.matches(&format!(
                "Server listening on 127.0.0.1 port {}",
                server.port
            ))
            .count(),
            2,
            "{log}"
        );
    }

    #[test]
    fn password_account_can_upload_with_a_password() {
        let (user, password) = SshServer::password_account();
        let server = SshServer::start(SshOptions {
            password_user: true,
            ..SshOptions::default()
        });
        let tmp = tempfile::tempdir().unwrap();
        // The real client, with the password from an askpass program
        // (sftp -b would force BatchMode, which forbids passwords).
        let askpass = tmp.path().join("askpass");
        fs::write(&askpass, format!("#!/bin/sh\necho '{password}'\n")).unwrap();
        fs::set_permissions(&askpass, fs::Permissions::from_mode(0o755)).unwrap();
        let local = tmp.path().join("payload");
        fs::write(&local, "password upload\n").unwrap();
        let remote = server.sftp_root.join("by-password.txt");

        require_tool("sftp", "openssh-client");
        let mut cmd = Command::new("sftp");
        client_opts(&mut cmd, &server.known_hosts_file());
        let mut child = cmd
            .args(["-o", "PreferredAuthentications=password"])
            .args(["-o", "PubkeyAuthentication=no"])
            .args(["-o", "NumberOfPasswordPrompts=1"])
            .arg("-P")
            .arg(server.port.to_string())
            .arg(format!("{user}@127.0.0.1"))
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sftp");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            writeln!(stdin, "put {} {}", local.display(), remote.display()).unwrap();
            writeln!(stdin, "bye").unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert_ok("sftp with a password", &out, &server);
        assert_eq!(
            fs::read_to_string(&remote).unwrap_or_default(),
            "password upload\n",
            "stderr: {}\nsshd log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            server.log()
        );
        let (uid, _) = account_ids(&user).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(&remote).unwrap().uid(), uid);
        assert!(
            server
                .log()
                .contains(&format!("Accepted password for {user}")),
            "{}",
            server.log()
        );

        // A wrong password is refused.
        fs::write(&askpass, "#!/bin/sh\necho wrong-password\n").unwrap();
        let mut cmd = Command::new("sftp");
        client_opts(&mut cmd, &server.known_hosts_file());
        let out = cmd
            .args(["-o", "PreferredAuthentications=password"])
            .args(["-o", "PubkeyAuthentication=no"])
            .args(["-o", "NumberOfPasswordPrompts=1"])
            .arg("-P")
            .arg(server.port.to_string())
            .arg(format!("{user}@127.0.0.1"))
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "a wrong password was accepted");
    }
}
