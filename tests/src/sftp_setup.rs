//! An agent config that backs up to an [`SshServer`]: how the agent trusts
//! the server and logs in, with its secret files in a work directory of its
//! own.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::agent::AgentConfig;
use crate::etcd::EtcdServer;
use crate::sshd::{ClientKey, SshServer};

/// Timeouts short enough for tests, long enough for a loaded machine.
pub const QUICK_TIMEOUTS: &str = "    connect_timeout: 5s\n    io_timeout: 10s\n";

/// How the agent is told to trust the server.
pub enum Trust {
    /// These `known_hosts` lines, in a file.
    KnownHosts(String),
    /// `host_key_fingerprint`.
    Fingerprint(String),
}

/// How the agent logs in.
pub enum Login<'a> {
    /// A private key, with an optional passphrase (written to a file).
    Key(&'a ClientKey, Option<&'a str>),
    /// A user and password (written to a file).
    Password(String, String),
}

/// A work directory for one agent config and its secret files.
pub struct SftpSetup {
    work: tempfile::TempDir,
}

impl Default for SftpSetup {
    fn default() -> Self {
        Self::new()
    }
}

impl SftpSetup {
    /// A new, empty work directory.
    pub fn new() -> Self {
        Self {
            work: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// The work directory.
    pub fn dir(&self) -> &Path {
        self.work.path()
    }

    /// Writes `content` to `name` in the work directory, mode 0600.
    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.work.path().join(name);
        std::fs::write(&p, content).expect("write a secret file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
            .expect("chmod a secret file");
        p
    }

    /// A config backing up `etcd` to `sshd` under [`backups`], with
    /// `timeouts` (YAML lines of `destination.sftp`, such as
    /// [`QUICK_TIMEOUTS`]).
    pub fn config(
        &self,
        etcd: &EtcdServer,
        sshd: &SshServer,
        trust: Trust,
        login: Login,
        timeouts: &str,
    ) -> AgentConfig {
        let mut cfg = AgentConfig::new(etcd, &self.work.path().join("unused-local"));
        let trust = match trust {
            Trust::KnownHosts(lines) => format!(
                "    known_hosts_file: {}\n",
                self.file("known_hosts", &lines).display()
            ),
            Trust::Fingerprint(fp) => format!("    host_key_fingerprint: \"{fp}\"\n"),
        };
        let (user, login) = match login {
            Login::Key(key, passphrase) => {
                let mut s = format!("    private_key_file: {}\n", key.private_key.display());
                if let Some(p) = passphrase {
                    s += &format!(
                        "    private_key_passphrase_file: {}\n",
                        self.file("passphrase", &format!("{p}\n")).display()
                    );
                }
                (SshServer::key_user(), s)
            }
            Login::Password(user, password) => (
                user,
                format!(
                    "    password_file: {}\n",
                    self.file("password", &format!("{password}\n")).display()
                ),
            ),
        };
        cfg.destination_yaml = Some(format!(
            "destination:\n  sftp:\n    host: 127.0.0.1\n    port: {}\n    user: {user}\n    path: {}\n{trust}{login}{timeouts}",
            sshd.port,
            backups(sshd).display()
        ));
        cfg
    }

    /// Writes `cfg` into the work directory; returns its path.
    pub fn write(&self, cfg: &AgentConfig) -> PathBuf {
        cfg.write(self.work.path())
    }
}

/// The `destination:` YAML for an SFTP server on 127.0.0.1:`port`, logging
/// in as `user` with `private_key`, trusting the `known_hosts` file, storing
/// under `path`, with [`QUICK_TIMEOUTS`].
pub fn destination_yaml(
    port: u16,
    user: &str,
    path: &Path,
    known_hosts: &Path,
    private_key: &Path,
) -> String {
    format!(
        "destination:\n  sftp:\n    host: 127.0.0.1\n    port: {port}\n    user: {user}\n    path: {}\n    known_hosts_file: {}\n    private_key_file: {}\n{QUICK_TIMEOUTS}",
        path.display(),
        known_hosts.display(),
        private_key.display()
    )
}

/// [`destination_yaml`] for `sshd`, its known_hosts file and the key user,
/// storing under `path`.
pub fn sshd_destination_yaml(sshd: &SshServer, key: &ClientKey, path: &Path) -> String {
    destination_yaml(
        sshd.port,
        &SshServer::key_user(),
        path,
        &sshd.known_hosts_file(),
        &key.private_key,
    )
}

/// Where [`SftpSetup::config`] puts the sets: `<sftp_root>/backups`.
pub fn backups(sshd: &SshServer) -> PathBuf {
    sshd.sftp_root.join("backups")
}
