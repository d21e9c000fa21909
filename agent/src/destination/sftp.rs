//! An SFTP server, over russh and russh-sftp.
//!
//! The server's host key is checked before anything else happens (a
//! known_hosts entry or a pinned fingerprint; there is no way to skip it), so
//! credentials are never offered to a host we do not know. Secrets are read
//! from files at connect time and live only as long as the handshake needs.
//!
//! Uploads stream: each `write` queues SFTP write requests, many in flight at
//! once (like OpenSSH's own client), so throughput is not bound by round trips.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKeyBase64};
use russh_sftp::client::SftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::sync::OnceCell;

use super::{components, DestinationError, DirEntry, Upload};
use crate::config::{HostKeyCheck, SftpAuth, SftpConfig};
use crate::known_hosts::{sha256_fingerprint, KnownHosts, Verdict};

/// SFTP write requests in flight at once. With [`WRITE_LEN`] that is 4 MiB
/// unacknowledged, twice OpenSSH's 2 MiB session window: the server's window
/// never runs dry, and no more than that waits in our memory (measured in
/// BENCHMARKS.md: 64 x 255 KiB was no faster and cost 15 MiB more RSS).
const WRITES_IN_FLIGHT: usize = 16;
/// Bytes per SFTP write request. OpenSSH's sftp-server accepts messages up to
/// 256 KiB; fewer, larger writes cost the server fewer syscalls and replies.
const WRITE_LEN: u32 = 255 * 1024;
/// Reads in flight when streaming a file back.
const READS_IN_FLIGHT: usize = 64;
/// SSH channel window we grant the server (matters for downloads).
const WINDOW: u32 = 16 << 20;

/// A directory on an SFTP server. Connects on first use; one connection per
/// value, so a retry that makes a new value gets a fresh connection.
pub struct SftpDir {
    config: SftpConfig,
    conn: OnceCell<Connection>,
    /// Directories known to exist, so each is created or checked once.
    dirs: Mutex<HashSet<String>>,
}

struct Connection {
    sftp: Arc<SftpSession>,
    // Dropping the handle closes the SSH connection.
    _ssh: russh::client::Handle<HostKeyChecker>,
}

impl std::fmt::Debug for SftpDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SftpDir")
            .field("location", &self.location(""))
            .finish_non_exhaustive()
    }
}

/// Why the server's host key was refused, filled in by the handler.
type Rejection = Arc<Mutex<Option<String>>>;

struct HostKeyChecker {
    host: String,
    port: u16,
    check: HostKeyCheck,
    known_hosts: Option<KnownHosts>,
    rejection: Rejection,
}

impl HostKeyChecker {
    fn verdict(&self, key_type: &str, blob: &[u8]) -> Result<(), String> {
        let (host, port) = (&self.host, self.port);
        let fingerprint = sha256_fingerprint(blob);
        match (&self.check, &self.known_hosts) {
            (HostKeyCheck::Fingerprint(pinned), _) => {
                if *pinned == fingerprint {
                    Ok(())
                } else {
                    Err(format!(
                        "SFTP host key for {host}:{port} is {key_type} {fingerprint}, but destination.sftp.host_key_fingerprint pins {pinned}; \
                         if the server's key was rotated on purpose, update the pinned fingerprint, otherwise someone may be intercepting the connection"
                    ))
                }
            }
            (HostKeyCheck::KnownHosts(path), Some(kh)) => {
                let path = path.display();
                match kh.check(host, port, key_type, blob) {
                    Verdict::Trusted { .. } => Ok(()),
                    Verdict::Revoked { line } => Err(format!(
                        "SFTP host key for {host}:{port} ({key_type} {fingerprint}) is marked @revoked in {path} line {line}; refusing to connect"
                    )),
                    Verdict::Changed { lines, same_type } => {
                        let lines = lines.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                        let what = if same_type {
                            "does not match"
                        } else {
                            "is of a type not listed in"
                        };
                        Err(format!(
                            "SFTP host key for {host}:{port} ({key_type} {fingerprint}) {what} {path} line(s) {lines}; \
                             if the key was rotated on purpose, update the known_hosts file, otherwise someone may be intercepting the connection"
                        ))
                    }
                    Verdict::Unknown => Err(format!(
                        "SFTP host {host}:{port} is not in {path} (it presented {key_type} {fingerprint}); \
                         add its key after checking it with the server's administrator, e.g. `ssh-keyscan -p {port} {host}`"
                    )),
                }
            }
            (HostKeyCheck::KnownHosts(path), None) => Err(format!(
                "known_hosts file {} was not loaded",
                path.display()
            )),
        }
    }
}

impl russh::client::Handler for HostKeyChecker {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let result = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => {
                self.verdict(key.algorithm().as_str(), &key.public_key_bytes())
            }
            russh::keys::PublicKeyOrCertificate::Certificate(_) => Err(format!(
                "SFTP host {}:{} presented a host certificate; only plain host keys (known_hosts entries or a pinned fingerprint) are supported",
                self.host, self.port
            )),
        };
        match result {
            Ok(()) => Ok(true),
            Err(why) => {
                if let Ok(mut slot) = self.rejection.lock() {
                    *slot = Some(why);
                }
                Ok(false)
            }
        }
    }
}

fn read_secret(field: &'static str, path: &std::path::Path) -> Result<String, DestinationError> {
    let text = std::fs::read_to_string(path).map_err(|source| DestinationError::Secret {
        field,
        path: path.to_path_buf(),
        source,
    })?;
    // One trailing newline is what editors and `echo` add; it is not part of the secret.
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    Ok(text.to_string())
}

impl SftpDir {
    /// A destination for `config`; nothing is contacted until first use.
    pub fn new(config: SftpConfig) -> Self {
        Self {
            config,
            conn: OnceCell::new(),
            dirs: Mutex::new(HashSet::new()),
        }
    }

    fn location(&self, path: &str) -> String {
        let c = &self.config;
        if path.is_empty() {
            format!("sftp://{}@{}:{}{}", c.user, c.host, c.port, c.path)
        } else {
            format!(
                "sftp://{}@{}:{}{}",
                c.user,
                c.host,
                c.port,
                self.remote(path)
            )
        }
    }

    /// The server-side path of a relative path.
    fn remote(&self, path: &str) -> String {
        let base = self.config.path.trim_end_matches('/');
        if path.is_empty() {
            if base.is_empty() {
                "/".to_string()
            } else {
                base.to_string()
            }
        } else if base.is_empty() && self.config.path.starts_with('/') {
            format!("/{path}")
        } else {
            format!("{base}/{path}")
        }
    }

    async fn conn(&self) -> Result<&Connection, DestinationError> {
        self.conn
            .get_or_try_init(|| async {
                tokio::time::timeout(self.config.connect_timeout, self.connect())
                    .await
                    .map_err(|_| DestinationError::Connect {
                        location: self.location(""),
                        detail: format!(
                            "no SSH session within {:?} (destination.sftp.connect_timeout)",
                            self.config.connect_timeout
                        ),
                    })?
            })
            .await
    }

    async fn connect(&self) -> Result<Connection, DestinationError> {
        let c = &self.config;
        let connect_err = |detail: String| DestinationError::Connect {
            location: self.location(""),
            detail,
        };
        let known_hosts = match &c.host_key {
            HostKeyCheck::KnownHosts(path) => {
                Some(
                    KnownHosts::load(path).map_err(|e| DestinationError::HostKey {
                        host: c.host.clone(),
                        port: c.port,
                        detail: e.to_string(),
                    })?,
                )
            }
            HostKeyCheck::Fingerprint(_) => None,
        };
        let rejection: Rejection = Arc::default();
        let handler = HostKeyChecker {
            host: c.host.clone(),
            port: c.port,
            check: c.host_key.clone(),
            known_hosts,
            rejection: rejection.clone(),
        };
        let ssh_config = russh::client::Config {
            window_size: WINDOW,
            maximum_packet_size: 65535,
            channel_buffer_size: 64,
            nodelay: true,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            inactivity_timeout: None,
            preferred: russh::Preferred {
                cipher: std::borrow::Cow::Borrowed(&[
                    russh::cipher::AES_128_GCM,
                    russh::cipher::AES_256_GCM,
                    russh::cipher::CHACHA20_POLY1305,
                    russh::cipher::AES_256_CTR,
                    russh::cipher::AES_128_CTR,
                ]),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut ssh =
            match russh::client::connect(Arc::new(ssh_config), (c.host.as_str(), c.port), handler)
                .await
            {
                Ok(h) => h,
                Err(e) => {
                    if let Some(why) = rejection.lock().ok().and_then(|mut r| r.take()) {
                        return Err(DestinationError::HostKey {
                            host: c.host.clone(),
                            port: c.port,
                            detail: why,
                        });
                    }
                    return Err(connect_err(russh_error_text(&e)));
                }
            };

        let auth =
            match &c.auth {
                SftpAuth::Password(file) => {
                    let password = read_secret("destination.sftp.password_file", file)?;
                    ssh.authenticate_password(c.user.clone(), password).await
                }
                SftpAuth::PrivateKey {
                    key_file,
                    passphrase_file,
                } => {
                    let passphrase = match passphrase_file {
                        Some(p) => Some(read_secret(
                            "destination.sftp.private_key_passphrase_file",
                            p,
                        )?),
                        None => None,
                    };
                    let key = russh::keys::load_secret_key(key_file, passphrase.as_deref())
                        .map_err(|e| DestinationError::Auth {
                            user: c.user.clone(),
                            host: c.host.clone(),
                            port: c.port,
                            detail: format!(
                            "cannot load private key {} (destination.sftp.private_key_file): {e}{}",
                            key_file.display(),
                            if passphrase_file.is_none() {
                                "; if the key is encrypted, set private_key_passphrase_file"
                            } else {
                                ""
                            }
                        ),
                        })?;
                    let hash = if key.algorithm().is_rsa() {
                        // rsa-sha2-512/256 when the server says it takes them.
                        ssh.best_supported_rsa_hash()
                            .await
                            .ok()
                            .flatten()
                            .flatten()
                            .or(Some(HashAlg::Sha256))
                    } else {
                        None
                    };
                    ssh.authenticate_publickey(
                        c.user.clone(),
                        PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                    )
                    .await
                }
            }
            .map_err(|e| connect_err(format!("during authentication: {}", russh_error_text(&e))))?;
        if !auth.success() {
            let how = match &c.auth {
                SftpAuth::Password(_) => "the password in destination.sftp.password_file",
                SftpAuth::PrivateKey { .. } => "the key in destination.sftp.private_key_file (is its public key in the user's authorized_keys?)",
            };
            return Err(DestinationError::Auth {
                user: c.user.clone(),
                host: c.host.clone(),
                port: c.port,
                detail: format!("the server rejected {how}"),
            });
        }

        let channel = ssh.channel_open_session().await.map_err(|e| {
            connect_err(format!(
                "cannot open an SSH session channel: {}",
                russh_error_text(&e)
            ))
        })?;
        channel.request_subsystem(true, "sftp").await.map_err(|e| {
            connect_err(format!(
                "the server refused the sftp subsystem: {}",
                russh_error_text(&e)
            ))
        })?;
        let sftp_config = russh_sftp::client::Config {
            max_packet_len: 256 * 1024 + 1024,
            max_concurrent_reads: READS_IN_FLIGHT,
            max_concurrent_writes: WRITES_IN_FLIGHT,
            max_write_packet_len: WRITE_LEN,
            request_timeout_secs: c.io_timeout.as_secs().max(1),
        };
        let sftp = SftpSession::new_with_config(channel.into_stream(), sftp_config)
            .await
            .map_err(|e| connect_err(format!("SFTP handshake failed: {e}")))?;
        tracing::debug!(location = %self.location(""), "SFTP session established");
        Ok(Connection {
            sftp: Arc::new(sftp),
            _ssh: ssh,
        })
    }

    fn sftp_error(
        &self,
        op: &'static str,
        path: &str,
        e: russh_sftp::client::error::Error,
    ) -> DestinationError {
        DestinationError::Io {
            op,
            location: self.location(path),
            source: sftp_io_error(e),
        }
    }

    /// Bounds one SFTP operation by `io_timeout`.
    async fn timed<T>(
        &self,
        op: &'static str,
        path: &str,
        fut: impl std::future::Future<Output = Result<T, russh_sftp::client::error::Error>>,
    ) -> Result<T, DestinationError> {
        match tokio::time::timeout(self.config.io_timeout, fut).await {
            Ok(r) => r.map_err(|e| self.sftp_error(op, path, e)),
            Err(_) => Err(DestinationError::Io {
                op,
                location: self.location(path),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no answer within {:?} (destination.sftp.io_timeout)",
                        self.config.io_timeout
                    ),
                ),
            }),
        }
    }

    /// Creates every missing directory of `dir` (a relative path, `""` for
    /// the base itself), mode 0700.
    async fn ensure_dir(&self, dir: &str) -> Result<(), DestinationError> {
        let conn = self.conn().await?;
        let mut prefix = String::new();
        // The base itself may need creating too, on a fresh server.
        let mut todo = vec![String::new()];
        let parts = if dir.is_empty() {
            Vec::new()
        } else {
            components(dir)?
        };
        for part in parts {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            todo.push(prefix.clone());
        }
        for rel in todo {
            if self.dirs.lock().map(|d| d.contains(&rel)).unwrap_or(false) {
                continue;
            }
            let remote = self.remote(&rel);
            match self
                .timed("cannot stat", &rel, conn.sftp.metadata(remote.clone()))
                .await
            {
                Ok(attrs) if attrs.is_dir() => {}
                Ok(_) => {
                    return Err(DestinationError::Io {
                        op: "cannot use directory",
                        location: self.location(&rel),
                        source: std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            "exists and is not a directory",
                        ),
                    })
                }
                Err(DestinationError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    let mkdir = conn.sftp.create_dir(remote.clone());
                    if let Err(e) = self.timed("cannot create directory", &rel, mkdir).await {
                        // Lost a race with another agent creating the same
                        // directory: fine if it is a directory now.
                        let now = self
                            .timed("cannot stat", &rel, conn.sftp.metadata(remote.clone()))
                            .await;
                        if !now.map(|a| a.is_dir()).unwrap_or(false) {
                            return Err(e);
                        }
                    }
                    // The high-level mkdir sends no mode, so the server's umask
                    // decided it; the directory is still empty, tighten it now.
                    let attrs = FileAttributes {
                        permissions: Some(0o700),
                        ..FileAttributes::empty()
                    };
                    self.timed(
                        "cannot set the mode of",
                        &rel,
                        conn.sftp.set_metadata(remote, attrs),
                    )
                    .await?;
                }
                Err(e) => return Err(e),
            }
            if let Ok(mut d) = self.dirs.lock() {
                d.insert(rel);
            }
        }
        Ok(())
    }
}

fn russh_error_text(e: &russh::Error) -> String {
    crate::etcd::chain(e)
}

fn sftp_io_error(e: russh_sftp::client::error::Error) -> std::io::Error {
    use russh_sftp::client::error::Error as E;
    use std::io::ErrorKind as K;
    let kind = match &e {
        E::Status(s) => match s.status_code {
            StatusCode::NoSuchFile => K::NotFound,
            StatusCode::PermissionDenied => K::PermissionDenied,
            StatusCode::NoConnection | StatusCode::ConnectionLost => K::ConnectionAborted,
            StatusCode::OpUnsupported => K::Unsupported,
            StatusCode::BadMessage => K::InvalidData,
            _ => K::Other,
        },
        E::Timeout => K::TimedOut,
        E::IO(_) => K::ConnectionAborted,
        _ => K::Other,
    };
    std::io::Error::new(kind, e.to_string())
}

#[async_trait]
impl super::Destination for SftpDir {
    fn describe(&self) -> String {
        self.location("")
    }

    async fn create(&self, path: &str) -> Result<Box<dyn Upload>, DestinationError> {
        let parts = components(path)?;
        self.ensure_dir(&parts[..parts.len() - 1].join("/")).await?;
        let conn = self.conn().await?;
        let attrs = FileAttributes {
            permissions: Some(0o600),
            ..FileAttributes::empty()
        };
        let file = self
            .timed(
                "cannot create",
                path,
                conn.sftp.open_with_flags_and_attributes(
                    self.remote(path),
                    OpenFlags::CREATE | OpenFlags::EXCLUDE | OpenFlags::WRITE,
                    attrs,
                ),
            )
            .await?;
        Ok(Box::new(SftpUpload {
            file,
            sftp: conn.sftp.clone(),
            remote: self.remote(path),
            location: self.location(path),
            io_timeout: self.config.io_timeout,
            written: 0,
        }))
    }

    async fn rename(&self, from: &str, to: &str) -> Result<(), DestinationError> {
        let conn = self.conn().await?;
        // SFTP v3 rename refuses an existing target on OpenSSH, but not every
        // server agrees; check first so nothing is ever replaced.
        let exists = self
            .timed("cannot check", to, conn.sftp.try_exists(self.remote(to)))
            .await?;
        if exists {
            return Err(DestinationError::AlreadyExists {
                location: self.location(to),
            });
        }
        self.timed(
            "cannot rename into",
            to,
            conn.sftp.rename(self.remote(from), self.remote(to)),
        )
        .await
    }

    async fn list(&self, dir: &str) -> Result<Vec<DirEntry>, DestinationError> {
        if !dir.is_empty() {
            components(dir)?;
        }
        let conn = self.conn().await?;
        let entries = match self
            .timed("cannot list", dir, conn.sftp.read_dir(self.remote(dir)))
            .await
        {
            Ok(rd) => rd,
            Err(DestinationError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(Vec::new())
            }
            Err(e) => return Err(e),
        };
        let mut out: Vec<DirEntry> = entries
            .filter(|e| e.file_name() != "." && e.file_name() != "..")
            .map(|e| {
                let meta = e.metadata();
                // SFTP's READDIR reports what lstat(2) does: links unfollowed.
                DirEntry {
                    name: e.file_name(),
                    is_dir: meta.is_dir(),
                    is_file: meta.file_type().is_file(),
                    size: if meta.is_dir() { 0 } else { meta.len() },
                    modified: meta.modified().ok(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn open(
        &self,
        path: &str,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError> {
        components(path)?;
        let conn = self.conn().await?;
        let file = self
            .timed("cannot open", path, conn.sftp.open(self.remote(path)))
            .await?;
        Ok(Box::new(file))
    }

    async fn delete(&self, path: &str) -> Result<(), DestinationError> {
        components(path)?;
        let conn = self.conn().await?;
        match self
            .timed(
                "cannot delete",
                path,
                conn.sftp.remove_file(self.remote(path)),
            )
            .await
        {
            Err(DestinationError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(())
            }
            other => other,
        }
    }

    async fn remove_dir(&self, path: &str) -> Result<(), DestinationError> {
        components(path)?;
        let conn = self.conn().await?;
        let result = match self
            .timed(
                "cannot remove directory",
                path,
                conn.sftp.remove_dir(self.remote(path)),
            )
            .await
        {
            Err(DestinationError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(())
            }
            other => other,
        };
        if let Ok(mut d) = self.dirs.lock() {
            d.remove(path);
        }
        result
    }
}

struct SftpUpload {
    file: russh_sftp::client::fs::File,
    sftp: Arc<SftpSession>,
    remote: String,
    location: String,
    io_timeout: Duration,
    written: u64,
}

impl SftpUpload {
    fn io(&self, op: &'static str, source: std::io::Error) -> DestinationError {
        DestinationError::Io {
            op,
            location: self.location.clone(),
            source,
        }
    }

    /// A failed write: OpenSSH's server answers a write on a full disk (or
    /// over a quota) with the generic `SSH_FX_FAILURE`, so that is read as
    /// [`DestinationError::Full`]; anything else stays an I/O error.
    fn write_error(&self, e: std::io::Error) -> DestinationError {
        use russh_sftp::client::error::Error as E;
        let inner = e.get_ref().and_then(|inner| inner.downcast_ref::<E>());
        let failure = inner.is_some_and(
            |inner| matches!(inner, E::Status(s) if s.status_code == StatusCode::Failure),
        ) || (inner.is_none() && is_failure_status(&e));
        if failure || super::is_out_of_space(&e) {
            DestinationError::Full {
                op: "cannot write",
                location: self.location.clone(),
                detail: format!("the server answered {e}"),
            }
        } else {
            self.io("cannot write", e)
        }
    }

    fn timeout(&self) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no progress within {:?} (destination.sftp.io_timeout)",
                self.io_timeout
            ),
        )
    }
}

/// Whether `e` is a write's `SSH_FX_FAILURE` answer as russh-sftp's file
/// writer hands it on: it keeps only the status's message, as a plain
/// `io::Error::other`, so the message OpenSSH's server sends with that code
/// ("Failure") is all there is to recognise it by.
fn is_failure_status(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Other
        && e.get_ref()
            .is_some_and(|inner| inner.to_string().eq_ignore_ascii_case("failure"))
}

#[async_trait]
impl Upload for SftpUpload {
    async fn write(&mut self, buf: &[u8]) -> Result<(), DestinationError> {
        match tokio::time::timeout(self.io_timeout, self.file.write_all(buf)).await {
            Ok(Ok(())) => {
                self.written += buf.len() as u64;
                Ok(())
            }
            Ok(Err(e)) => Err(self.write_error(e)),
            Err(_) => Err(self.io("cannot write", self.timeout())),
        }
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, DestinationError> {
        // flush waits for every write to be acknowledged, then asks the server
        // to fsync (fsync@openssh.com) when it supports that.
        match tokio::time::timeout(self.io_timeout, self.file.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.write_error(e)),
            Err(_) => return Err(self.io("cannot write", self.timeout())),
        }
        match tokio::time::timeout(self.io_timeout, self.file.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.io("cannot close", e)),
            Err(_) => return Err(self.io("cannot close", self.timeout())),
        }
        let stored =
            match tokio::time::timeout(self.io_timeout, self.sftp.metadata(self.remote.clone()))
                .await
            {
                Ok(Ok(attrs)) => attrs.size.unwrap_or(0),
                Ok(Err(e)) => return Err(self.io("cannot stat", sftp_io_error(e))),
                Err(_) => return Err(self.io("cannot stat", self.timeout())),
            };
        if stored != self.written {
            return Err(DestinationError::SizeMismatch {
                location: self.location.clone(),
                sent: self.written,
                stored,
            });
        }
        Ok(stored)
    }
}
