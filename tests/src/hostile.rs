//! A lying SFTP server: paramiko (Debian's `python3-paramiko`, which
//! `scripts/test` installs) serving a real directory, whose every listing
//! also holds parent references (`..`, `../x`, `../../escape`), absolute
//! names and names with `/` and NUL, and which serves any such path as a
//! small file of hostile bytes. Runs on a free 127.0.0.1 port with its own
//! ed25519 host key; accepts any public key; killed on drop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{require_tool, wait_for};

/// The server's program, written to its temporary directory at start.
const SCRIPT: &str = include_str!("hostile/sftp_server.py");

/// The Python with Debian's packages (not a pyenv or venv one on PATH).
const PYTHON: &str = "/usr/bin/python3";

/// What a lie reads as, byte for byte.
pub const HOSTILE_BYTES: &[u8] = b"hostile bytes: a client wrote what a lying server sent\n";

/// A running lying SFTP server.
pub struct HostileSftp {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The directory it serves as `/`.
    pub root: PathBuf,
    /// A known_hosts file naming its host key for `[127.0.0.1]:port`.
    pub known_hosts: PathBuf,
    /// A private key to log in with (any key is accepted).
    pub client_key: PathBuf,
    child: Child,
    _stdin: ChildStdin,
    _dir: TempDir,
}

impl HostileSftp {
    /// Starts the server on a new empty root. Panics, naming the package,
    /// when paramiko is missing.
    pub fn start() -> Self {
        require_tool("ssh-keygen", "openssh-client");
        let ok = Command::new(PYTHON)
            .args(["-c", "import paramiko"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "{PYTHON} cannot import paramiko; run scripts/test (it installs python3-paramiko) or `apt-get install python3-paramiko`"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("sftp_server.py");
        std::fs::write(&script, SCRIPT).expect("write the server script");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("create root");
        let host_key = keygen(dir.path(), "host_key");
        let client_key = keygen(dir.path(), "client_key");
        let port_file = dir.path().join("port");
        let log = std::fs::File::create(dir.path().join("server.log")).expect("log");
        let mut child = Command::new(PYTHON)
            .arg(&script)
            .arg(&root)
            .arg(&host_key)
            .arg(&port_file)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the lying SFTP server");
        let stdin = child.stdin.take().expect("stdin");
        let port: u16 = wait_for("the lying SFTP server", Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the lying SFTP server exited ({status}): {}",
                    std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
                );
            }
            std::fs::read_to_string(&port_file)
                .ok()?
                .trim()
                .parse()
                .ok()
        });
        let pubkey = std::fs::read_to_string(host_key.with_extension("pub")).expect("host key");
        let mut fields = pubkey.split_whitespace();
        let line = format!(
            "[127.0.0.1]:{port} {} {}\n",
            fields.next().expect("key type"),
            fields.next().expect("key blob")
        );
        let known_hosts = dir.path().join("known_hosts");
        std::fs::File::create(&known_hosts)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .expect("write known_hosts");
        Self {
            port,
            root,
            known_hosts,
            client_key,
            child,
            _stdin: stdin,
            _dir: dir,
        }
    }

    /// The agent's `destination:` section for this server, storing below
    /// `/<path>` of its root.
    pub fn destination_yaml(&self, path: &str) -> String {
        format!(
            "destination:\n  sftp:\n    host: 127.0.0.1\n    port: {}\n    user: test\n    path: /{path}\n    known_hosts_file: {}\n    private_key_file: {}\n    connect_timeout: 5s\n    io_timeout: 10s\n    require_fsync: false\n",
            self.port,
            self.known_hosts.display(),
            self.client_key.display()
        )
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("server.log")).unwrap_or_default()
    }
}

fn keygen(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "hostile-test", "-f"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen");
    assert!(out.status.success(), "ssh-keygen: {out:?}");
    path
}

impl Drop for HostileSftp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
