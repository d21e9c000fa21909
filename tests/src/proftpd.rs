//! ProFTPD's `mod_sftp` on loopback: a second real SFTP server, written
//! independently of OpenSSH, with its own host key and a configurable set of
//! SFTP extensions (`SFTPExtensions -fsync` makes a server that cannot sync).
//!
//! [`ProftpdServer::start`] runs the real `/usr/sbin/proftpd -n` (foreground)
//! on a free 127.0.0.1 port with a config, host key, scoreboard, pid file and
//! logs in its own temporary directory, and nothing else: no FTP listener, no
//! file in a system path. Clients log in as the current user (root in CI)
//! with keys from [`crate::sshd::ClientKey`], listed in an RFC 4716
//! authorized-keys file (`ssh-keygen -e`), the format mod_sftp reads. There
//! is no chroot, so SFTP paths are absolute paths on this machine, such as
//! [`ProftpdServer::sftp_root`]. The server and every session it forked are
//! killed on drop.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::sshd::{banner, descendants, signal};
use crate::{free_port, require_tool};

/// Where Debian's proftpd-mod-crypto installs mod_sftp.
const MOD_SFTP: &str = "/usr/lib/proftpd/mod_sftp.so";
/// The server binary (proftpd-core).
const PROFTPD: &str = "/usr/sbin/proftpd";
/// How long ProFTPD gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// What [`ProftpdServer::start`] sets up.
#[derive(Clone, Debug, Default)]
pub struct ProftpdOptions {
    /// OpenSSH public key lines of the clients that may log in (converted to
    /// RFC 4716 for mod_sftp).
    pub authorized_keys: Vec<String>,
    /// The value of `SFTPExtensions`, such as `-fsync`; `None` keeps
    /// mod_sftp's defaults (which include `fsync@openssh.com`).
    pub extensions: Option<String>,
}

/// A running ProFTPD with mod_sftp on 127.0.0.1; killed (with every session)
/// on drop, and its directory removed.
pub struct ProftpdServer {
    /// The port mod_sftp listens on (127.0.0.1 only).
    pub port: u16,
    /// A directory the SFTP user may write into (absolute path).
    pub sftp_root: PathBuf,
    /// Holds the config, keys, logs and `sftp_root`; removed on drop.
    pub dir: TempDir,
    host_key: PathBuf,
    child: Option<Child>,
}

impl ProftpdServer {
    /// Makes a host key, writes the config and starts ProFTPD; returns once
    /// it listens and sends its `SSH-2.0-` banner. Panics with its logs if
    /// it does not start within 20 s, and with the package to install if
    /// ProFTPD or mod_sftp is missing.
    pub fn start(opts: ProftpdOptions) -> Self {
        assert!(
            Path::new(PROFTPD).is_file(),
            "{PROFTPD} is not installed; run scripts/test (it installs the `proftpd-core` package) or `apt-get install proftpd-core`"
        );
        assert!(
            Path::new(MOD_SFTP).is_file(),
            "{MOD_SFTP} is not installed; run scripts/test (it installs the `proftpd-mod-crypto` package) or `apt-get install proftpd-mod-crypto`"
        );
        require_tool("ssh-keygen", "openssh-client");
        let dir = tempfile::tempdir().expect("tempdir");
        let host_key = dir.path().join("ssh_host_ed25519_key");
        keygen_host_key(&host_key);

        let mut rfc4716 = String::new();
        for line in &opts.authorized_keys {
            rfc4716.push_str(&to_rfc4716(line));
        }
        let authorized_keys = dir.path().join("authorized_keys");
        fs::write(&authorized_keys, rfc4716).expect("write authorized_keys");

        let sftp_root = dir.path().join("sftp");
        fs::create_dir(&sftp_root).expect("create sftp root");
        let mut server = Self {
            port: 0,
            sftp_root,
            dir,
            host_key,
            child: None,
        };
        for attempt in 1.. {
            server.port = free_port();
            server.write_config(&opts);
            match server.launch() {
                Ok(()) => return server,
                Err(PortTaken) if attempt < 5 => continue,
                Err(PortTaken) => panic!(
                    "proftpd could not bind a free port in {attempt} attempts; log:\n{}",
                    server.log()
                ),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// A `known_hosts` line for this server: `[127.0.0.1]:PORT <type> <base64>`.
    pub fn known_hosts_line(&self) -> String {
        let pubkey =
            fs::read_to_string(self.host_key.with_extension("pub")).expect("read public host key");
        let fields: Vec<&str> = pubkey.split_whitespace().take(2).collect();
        assert_eq!(fields.len(), 2, "malformed public host key: {pubkey:?}");
        format!("[127.0.0.1]:{} {} {}", self.port, fields[0], fields[1])
    }

    /// The user clients log in as: the current user.
    pub fn user() -> String {
        crate::sshd::SshServer::key_user()
    }

    /// The server's own output, its system log and mod_sftp's log so far.
    pub fn log(&self) -> String {
        ["proftpd.out", "system.log", "sftp.log"]
            .iter()
            .map(|f| {
                format!(
                    "--- {f}\n{}",
                    fs::read_to_string(self.dir.path().join(f)).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The SFTP requests the server received so far, in order, as mod_sftp
    /// traces them: `OPEN /path …`, `WRITE <handle> <offset> <len>`,
    /// `EXTENDED fsync@openssh.com`, `CLOSE <handle>`, `RENAME …`.
    pub fn requests(&self) -> Vec<String> {
        fs::read_to_string(self.dir.path().join("trace.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                l.split_once("received request: ")
                    .map(|(_, r)| r.to_string())
            })
            .collect()
    }

    fn write_config(&self, opts: &ProftpdOptions) {
        let d = self.dir.path();
        let mut config = format!(
            "# Written by the etcd-backup-agent tests: SFTP only, on loopback.\n\
             ServerType standalone\n\
             ServerName \"etcd-backup-test\"\n\
             DefaultAddress 127.0.0.1\n\
             SocketBindTight on\n\
             UseIPv6 off\n\
             Port {port}\n\
             User root\n\
             Group root\n\
             RootLogin on\n\
             UseFtpUsers off\n\
             RequireValidShell off\n\
             UseReverseDNS off\n\
             WtmpLog off\n\
             DelayEngine off\n\
             TransferLog none\n\
             ScoreboardFile {d}/proftpd.scoreboard\n\
             PidFile {d}/proftpd.pid\n\
             SystemLog {d}/system.log\n\
             MaxInstances 100\n\
             Umask 077\n\
             AuthOrder mod_auth_unix.c\n\
             <IfModule mod_auth_pam.c>\n  AuthPAM off\n</IfModule>\n\
             ModulePath /usr/lib/proftpd\n\
             LoadModule mod_sftp.c\n\
             SFTPEngine on\n\
             SFTPLog {d}/sftp.log\n\
             TraceLog {d}/trace.log\n\
             Trace sftp:7\n\
             SFTPHostKey {host_key}\n\
             SFTPAuthorizedUserKeys file:{d}/authorized_keys\n\
             SFTPAuthMethods publickey\n\
             SFTPCompression off\n",
            port = self.port,
            d = d.display(),
            host_key = self.host_key.display(),
        );
        if let Some(ext) = &opts.extensions {
            config.push_str(&format!("SFTPExtensions {ext}\n"));
        }
        let path = d.join("proftpd.conf");
        fs::write(&path, &config).expect("write proftpd.conf");
        let out = Command::new(PROFTPD)
            .args(["-t", "-c"])
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .expect("run proftpd -t");
        assert!(
            out.status.success(),
            "proftpd -t rejects the generated config:\n{}{}\n{config}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Spawns `proftpd -n -c CONFIG` and waits until it listens and answers
    /// with its banner.
    fn launch(&mut self) -> Result<(), PortTaken> {
        let out_path = self.dir.path().join("proftpd.out");
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)
            .expect("open proftpd output");
        let child = Command::new(PROFTPD)
            .arg("-n")
            .arg("-c")
            .arg(self.dir.path().join("proftpd.conf"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone output"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {PROFTPD}: {e}"));
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                let log = self.log();
                if log.contains("Address already in use") {
                    return Err(PortTaken);
                }
                panic!("proftpd exited at start ({status}); log:\n{log}");
            }
            // Our own process answers: the pid file names it, and the port
            // speaks SSH.
            let ours = fs::read_to_string(self.dir.path().join("proftpd.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
                == self.child.as_ref().map(Child::id);
            if ours {
                if let Some(line) = banner(([127, 0, 0, 1], self.port).into()) {
                    assert!(line.contains("mod_sftp"), "not mod_sftp: {line}");
                    return Ok(());
                }
            }
            if started.elapsed() > START_TIMEOUT {
                self.kill();
                panic!(
                    "proftpd did not start listening on port {} within {START_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server and every session process it forked.
    fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let root = child.id();
        signal("STOP", &[root]);
        let mut all = descendants(root);
        all.push(root);
        signal("KILL", &all);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ProftpdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// ProFTPD reported the port as taken.
struct PortTaken;

fn keygen_host_key(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519"])
        .args(["-N", "", "-C", "etcd-backup-test-proftpd", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An OpenSSH public key line in RFC 4716 form (`ssh-keygen -e`).
fn to_rfc4716(line: &str) -> String {
    crate::sshd::ssh_keygen_on_file("-e", "key.pub", line).0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sshd::{ClientKey, KeyKind};

    /// The extensions OpenSSH's `sftp -vvv` says the server offers.
    fn offered_extensions(server: &ProftpdServer, key: &ClientKey) -> String {
        require_tool("sftp", "openssh-client");
        let known_hosts = server.dir.path().join("known_hosts");
        fs::write(&known_hosts, format!("{}\n", server.known_hosts_line())).unwrap();
        let out = Command::new("sftp")
            .args(["-vvv", "-F", "/dev/null", "-o", "BatchMode=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args(["-o", "GlobalKnownHostsFile=/dev/null"])
            .args(["-o", "StrictHostKeyChecking=yes"])
            .args(["-o", "IdentitiesOnly=yes"])
            .arg("-i")
            .arg(&key.private_key)
            .arg("-P")
            .arg(server.port.to_string())
            .args(["-b", "/dev/null"])
            .arg(format!("{}@127.0.0.1", ProftpdServer::user()))
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .expect("run sftp");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "sftp against proftpd failed:\n{stderr}\n{}",
            server.log()
        );
        stderr
            .lines()
            .filter(|l| l.contains("Server supports extension"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_real_client_logs_in_and_sees_fsync_unless_it_is_switched_off() {
        let key = ClientKey::generate(KeyKind::Ed25519, None);
        let server = ProftpdServer::start(ProftpdOptions {
            authorized_keys: vec![key.public_line.clone()],
            extensions: None,
        });
        let offered = offered_extensions(&server, &key);
        assert!(
            offered.contains("\"fsync@openssh.com\" revision 1"),
            "{offered}"
        );
        assert!(
            offered.contains("\"statvfs@openssh.com\" revision 2"),
            "{offered}"
        );

        let without = ProftpdServer::start(ProftpdOptions {
            authorized_keys: vec![key.public_line.clone()],
            extensions: Some("-fsync".into()),
        });
        let offered = offered_extensions(&without, &key);
        assert!(!offered.contains("fsync@openssh.com"), "{offered}");
        assert!(
            offered.contains("\"statvfs@openssh.com\" revision 2"),
            "{offered}"
        );

        // A key that is not listed is refused.
        let stranger = ClientKey::generate(KeyKind::Ed25519, None);
        let known_hosts = server.dir.path().join("known_hosts");
        let out = Command::new("sftp")
            .args(["-F", "/dev/null", "-o", "BatchMode=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args(["-o", "IdentitiesOnly=yes", "-i"])
            .arg(&stranger.private_key)
            .arg("-P")
            .arg(server.port.to_string())
            .args(["-b", "/dev/null"])
            .arg(format!("{}@127.0.0.1", ProftpdServer::user()))
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "an unlisted key logged in");
    }
}
