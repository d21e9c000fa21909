//! An SFTP server, over russh and russh-sftp.
//!
//! The server's host key is checked before anything else happens (a
//! known_hosts entry or a pinned fingerprint; there is no way to skip it), so
//! credentials are never offered to a host we do not know. Secrets are read
//! from files at connect time and live only as long as the handshake needs.
//!
//! The host-key algorithms offered in key exchange follow what the operator
//! trusts, as OpenSSH's client does: the types known_hosts lists for the host
//! come first, so a server with several host keys presents the trusted one.
//! A pinned fingerprint names no type, so a server whose first key does not
//! match is asked again for each key type not yet seen.
//!
//! Uploads stream: each `write` queues SFTP write requests, many in flight at
//! once (like OpenSSH's own client), so throughput is not bound by round trips.
//!
//! A connection that timed out or failed is dropped, never waited on again:
//! the next operation (typically the clean-up of a failed run) opens a fresh
//! one, so a stalled server costs one `io_timeout`, not one per operation.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PrivateKeyWithHashAlg, PublicKeyBase64};
use russh_sftp::client::SftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};

mod stripe;

use stripe::Lane;
pub use stripe::StripeOver;

use super::range;
use super::sftp_version::{Seen, Sniffer};
use super::{components, DestinationError, DirEntry, DirSync, Durability, Upload};
use crate::config::{HostKeyCheck, SftpAuth, SftpConfig};
use etcd_backup_known_hosts::{sha256_fingerprint, KnownHosts, Verdict};

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
/// The extension that makes a server sync a file to disk.
const FSYNC: &str = "fsync@openssh.com";

/// Host-key algorithms the agent accepts, in the order it prefers them when
/// nothing says otherwise. RSA is signed with SHA-2; the legacy SHA-1
/// `ssh-rsa` signature comes last, for a server that offers nothing else.
const HOST_KEY_ALGORITHMS: &[Algorithm] = &[
    Algorithm::Ed25519,
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP256,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP384,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP521,
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha512),
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha256),
    },
    Algorithm::Rsa { hash: None },
];

/// The key type (as known_hosts and fingerprints name it) that signs with
/// host-key algorithm `a`: every RSA signature name is an `ssh-rsa` key.
fn key_type_of(a: &Algorithm) -> &'static str {
    match a {
        Algorithm::Ed25519 => "ssh-ed25519",
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP256,
        } => "ecdsa-sha2-nistp256",
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP384,
        } => "ecdsa-sha2-nistp384",
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP521,
        } => "ecdsa-sha2-nistp521",
        Algorithm::Rsa { .. } => "ssh-rsa",
        _ => "",
    }
}

/// The order to offer host-key algorithms in when known_hosts lists
/// `trusted` key types for the host, as OpenSSH orders them: those types
/// first (in the default order), then the rest, so a server with none of
/// them still presents a key that is then refused with a clear message. SHA-1
/// `ssh-rsa` stays last either way.
fn host_key_preference(trusted: &[&str]) -> Vec<Algorithm> {
    let legacy = |a: &Algorithm| matches!(a, Algorithm::Rsa { hash: None });
    let (first, rest): (Vec<Algorithm>, Vec<Algorithm>) = HOST_KEY_ALGORITHMS
        .iter()
        .filter(|a| !legacy(a))
        .cloned()
        .partition(|a| trusted.contains(&key_type_of(a)));
    first
        .into_iter()
        .chain(rest)
        .chain(HOST_KEY_ALGORITHMS.iter().filter(|a| legacy(a)).cloned())
        .collect()
}

/// The SSH client's settings: window, keepalives, the cipher order, and the
/// host-key algorithms to offer.
fn ssh_config(algorithms: Vec<Algorithm>) -> russh::client::Config {
    russh::client::Config {
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
            key: std::borrow::Cow::Owned(algorithms),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The host-key algorithms left to ask for when the server has already
/// presented keys of the `seen` types (for a pinned fingerprint, whose type
/// is unknown).
fn host_key_algorithms_not_seen(seen: &[(String, String)]) -> Vec<Algorithm> {
    HOST_KEY_ALGORITHMS
        .iter()
        .filter(|a| !seen.iter().any(|(t, _)| t == key_type_of(a)))
        .cloned()
        .collect()
}

/// A directory on an SFTP server. Connects on first use and keeps that
/// connection until an operation on it times out or fails at the connection
/// level; the next operation then opens a fresh one (once: if that fails too,
/// later operations fail at once instead of each waiting out
/// `connect_timeout`). A retry that makes a new value starts afresh.
pub struct SftpDir {
    config: SftpConfig,
    conn: tokio::sync::Mutex<Slot>,
    /// Directories known to exist, so each is created or checked once.
    dirs: Mutex<HashSet<String>>,
    /// Further SFTP sessions for striped transfers (`streams` > 1), kept
    /// from one file to the next.
    lanes: tokio::sync::Mutex<Vec<Arc<Lane>>>,
    /// How those sessions reach the server.
    stripe_over: StripeOver,
    /// The further session of the control connection that ranged reads go
    /// over when they do not go over `lanes` (see `range_lane`).
    range_lane: tokio::sync::Mutex<Option<Arc<Lane>>>,
    /// Whose turn among `lanes` the next ranged read is.
    range_turn: std::sync::atomic::AtomicUsize,
    /// Files recently opened for ranged reads, kept open for the next
    /// range of the same file on the same session (see `open_range_on_lane`).
    range_handles: Mutex<stripe::RangeHandles>,
    /// Whether the server refused the session for ranged reads: they go
    /// over the control session from then on, without asking again.
    range_lane_refused: AtomicBool,
    /// Whether fewer sessions than `streams` could be opened, and that was
    /// warned about.
    warned_lanes: AtomicBool,
    /// Whether the server's refusal to open a file being written from a
    /// second session has been warned about.
    warned_reopen: AtomicBool,
    /// Further sessions to open at most: what the server allowed when it
    /// refused one (not asked again for more in this run).
    lane_cap: std::sync::atomic::AtomicUsize,
    /// Whether a TCP connection to the server has been made (or refused):
    /// the striped sessions start logging in only once the first one, the
    /// control connection, is in, so a server that takes one connection
    /// at a time takes that one.
    dialed: tokio::sync::watch::Sender<Dial>,
}

/// How the first TCP connection to the server went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dial {
    Pending,
    Up,
    Failed,
}

/// The connection an [`SftpDir`] uses next.
enum Slot {
    /// None yet (or the last one was dropped).
    Empty,
    /// In use; replaced when marked broken.
    Live(Arc<Connection>),
    /// A fresh connection after a broken one could not be made either; the
    /// text says why.
    Down(String),
}

struct Connection {
    sftp: Arc<SftpSession>,
    /// Whether the server offers `fsync@openssh.com` as russh-sftp uses it,
    /// so that flushing a file syncs it on the server.
    fsync: bool,
    /// Whether this connection has warned that its sets are not durable.
    warned_not_durable: AtomicBool,
    /// Set when an operation on this connection timed out or failed at the
    /// connection level: nothing more is sent over it.
    broken: AtomicBool,
    /// Dropping the handle closes the SSH connection; striped transfers may
    /// open further channels on it.
    ssh: russh::client::Handle<HostKeyChecker>,
}

impl Connection {
    fn mark_broken(&self) {
        if !self.broken.swap(true, Ordering::Relaxed) {
            tracing::debug!("SFTP connection marked broken; the next operation opens a fresh one");
        }
    }

    fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for SftpDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SftpDir")
            .field("location", &self.location(""))
            .finish_non_exhaustive()
    }
}

/// What the handler saw of the server's host key in one handshake.
#[derive(Default)]
struct Observed {
    /// The presented key's type and SHA-256 fingerprint.
    presented: Option<(String, String)>,
    /// Why it was refused.
    rejection: Option<String>,
}

struct HostKeyChecker {
    host: String,
    port: u16,
    check: HostKeyCheck,
    known_hosts: Option<KnownHosts>,
    observed: Arc<Mutex<Observed>>,
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
                let (key_type, blob) = (key.algorithm().as_str().to_string(), key.public_key_bytes());
                if let Ok(mut o) = self.observed.lock() {
                    o.presented = Some((key_type.clone(), sha256_fingerprint(&blob)));
                }
                self.verdict(&key_type, &blob)
            }
            russh::keys::PublicKeyOrCertificate::Certificate(_) => Err(format!(
                "SFTP host {}:{} presented a host certificate; only plain host keys (known_hosts entries or a pinned fingerprint) are supported",
                self.host, self.port
            )),
        };
        match result {
            Ok(()) => Ok(true),
            Err(why) => {
                if let Ok(mut o) = self.observed.lock() {
                    o.rejection = Some(why);
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
            conn: tokio::sync::Mutex::new(Slot::Empty),
            dirs: Mutex::new(HashSet::new()),
            lanes: tokio::sync::Mutex::new(Vec::new()),
            stripe_over: StripeOver::Connections,
            range_lane: tokio::sync::Mutex::new(None),
            range_turn: std::sync::atomic::AtomicUsize::new(0),
            range_handles: Mutex::new(stripe::RangeHandles::default()),
            range_lane_refused: AtomicBool::new(false),
            warned_lanes: AtomicBool::new(false),
            warned_reopen: AtomicBool::new(false),
            lane_cap: std::sync::atomic::AtomicUsize::new(usize::MAX),
            dialed: tokio::sync::watch::channel(Dial::Pending).0,
        }
    }

    /// Stripes over further channels of one connection, or over further
    /// connections (the default), for measuring one against the other.
    #[must_use]
    pub fn stripe_over(mut self, over: StripeOver) -> Self {
        self.stripe_over = over;
        self
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

    /// The connection to use: the current one, or a fresh one when there is
    /// none or the current one is broken. Callers wait for one connection
    /// attempt at a time, each bounded by `connect_timeout`.
    async fn conn(&self) -> Result<Arc<Connection>, DestinationError> {
        let mut slot = self.conn.lock().await;
        let replacing = match &*slot {
            Slot::Live(c) if !c.is_broken() => return Ok(c.clone()),
            Slot::Live(_) => true,
            Slot::Empty => false,
            Slot::Down(detail) => {
                return Err(DestinationError::Connect {
                    location: self.location(""),
                    detail: format!(
                        "{detail} (a fresh connection after a stalled or failed one could not be \
                         made; not tried again in this run)"
                    ),
                })
            }
        };
        // Drop the broken connection: whatever it still waits for is given up.
        *slot = Slot::Empty;
        if replacing {
            tracing::info!(
                location = %self.location(""),
                "the SFTP connection stalled or failed; opening a fresh one"
            );
        }
        let result = tokio::time::timeout(self.config.connect_timeout, self.connect())
            .await
            .unwrap_or_else(|_| {
                Err(DestinationError::Connect {
                    location: self.location(""),
                    detail: format!(
                        "no SSH session within {:?} (destination.sftp.connect_timeout)",
                        self.config.connect_timeout
                    ),
                })
            });
        match result {
            Ok(c) => {
                let c = Arc::new(c);
                *slot = Slot::Live(c.clone());
                Ok(c)
            }
            Err(e) => {
                if replacing {
                    *slot = Slot::Down(e.to_string());
                }
                Err(e)
            }
        }
    }

    /// TCP, key exchange and the host-key check, trying again for a pinned
    /// fingerprint while the server has key types not yet seen.
    async fn handshake(
        &self,
        known_hosts: Option<&KnownHosts>,
    ) -> Result<russh::client::Handle<HostKeyChecker>, DestinationError> {
        let c = &self.config;
        // Key types the server presented that did not match the pin, with
        // their fingerprints.
        let mut seen: Vec<(String, String)> = Vec::new();
        loop {
            let algorithms = match (&c.host_key, known_hosts) {
                (HostKeyCheck::KnownHosts(_), Some(kh)) => {
                    host_key_preference(&kh.key_types_for(&c.host, c.port))
                }
                _ => host_key_algorithms_not_seen(&seen),
            };
            if algorithms.is_empty() {
                return Err(self.pin_mismatch(&seen));
            }
            tracing::debug!(
                location = %self.location(""),
                offered = %algorithms.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(","),
                "SSH key exchange"
            );
            let observed: Arc<Mutex<Observed>> = Arc::default();
            let handler = HostKeyChecker {
                host: c.host.clone(),
                port: c.port,
                check: c.host_key.clone(),
                known_hosts: known_hosts.cloned(),
                observed: observed.clone(),
            };
            let ssh_config = ssh_config(algorithms);
            let socket = match tokio::net::TcpStream::connect((c.host.as_str(), c.port)).await {
                Ok(s) => s,
                Err(e) => {
                    self.dialed.send_if_modified(|d| {
                        let first = *d == Dial::Pending;
                        if first {
                            *d = Dial::Failed;
                        }
                        first
                    });
                    return Err(DestinationError::Connect {
                        location: self.location(""),
                        detail: e.to_string(),
                    });
                }
            };
            self.dialed.send_if_modified(|d| {
                let first = *d != Dial::Up;
                *d = Dial::Up;
                first
            });
            if let Err(e) = socket.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let err =
                match russh::client::connect_stream(Arc::new(ssh_config), socket, handler).await {
                    Ok(h) => return Ok(h),
                    Err(e) => e,
                };
            let observed = std::mem::take(&mut *observed.lock().unwrap_or_else(|p| p.into_inner()));
            match (observed.rejection, observed.presented, &c.host_key) {
                // Not the pinned key: ask for the server's other key types
                // (at most one attempt per type; a server presenting a type
                // it was not asked for ends the search).
                (Some(_), Some(presented), HostKeyCheck::Fingerprint(_)) => {
                    if !seen.iter().any(|(t, _)| *t == presented.0) {
                        seen.push(presented);
                    } else {
                        return Err(self.pin_mismatch(&seen));
                    }
                    if seen.len() >= HOST_KEY_ALGORITHMS.len() {
                        return Err(self.pin_mismatch(&seen));
                    }
                }
                (Some(why), _, _) => {
                    return Err(DestinationError::HostKey {
                        host: c.host.clone(),
                        port: c.port,
                        detail: why,
                    })
                }
                // The server has no key of a type not seen yet.
                (None, _, _)
                    if !seen.is_empty()
                        && matches!(
                            err,
                            russh::Error::NoCommonAlgo {
                                kind: russh::AlgorithmKind::Key,
                                ..
                            }
                        ) =>
                {
                    return Err(self.pin_mismatch(&seen))
                }
                (None, _, _) => {
                    return Err(DestinationError::Connect {
                        location: self.location(""),
                        detail: russh_error_text(&err),
                    })
                }
            }
        }
    }

    /// The refusal when no key the server presented matches the pin.
    fn pin_mismatch(&self, seen: &[(String, String)]) -> DestinationError {
        let c = &self.config;
        let (host, port) = (&c.host, c.port);
        let pinned = match &c.host_key {
            HostKeyCheck::Fingerprint(p) => p.as_str(),
            HostKeyCheck::KnownHosts(_) => "",
        };
        let presented = seen
            .iter()
            .map(|(t, fp)| format!("{t} {fp}"))
            .collect::<Vec<_>>();
        let what = match presented.as_slice() {
            [one] => format!("SFTP host key for {host}:{port} is {one}"),
            many => format!(
                "SFTP host {host}:{port} presented the host keys {}, none of them the pinned one",
                many.join(", ")
            ),
        };
        DestinationError::HostKey {
            host: host.clone(),
            port,
            detail: format!(
                "{what}, but destination.sftp.host_key_fingerprint pins {pinned}; \
                 if the server's key was rotated on purpose, update the pinned fingerprint, \
                 otherwise someone may be intercepting the connection"
            ),
        }
    }

    /// Logs in as `destination.sftp.user` with the configured password or key.
    async fn authenticate(
        &self,
        ssh: &mut russh::client::Handle<HostKeyChecker>,
    ) -> Result<(), DestinationError> {
        let c = &self.config;
        let connect_err = |detail: String| DestinationError::Connect {
            location: self.location(""),
            detail,
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
        Ok(())
    }

    /// TCP, key exchange, the host-key check and login: an SSH connection
    /// with no channel yet.
    async fn login(&self) -> Result<russh::client::Handle<HostKeyChecker>, DestinationError> {
        let c = &self.config;
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
        let mut ssh = self.handshake(known_hosts.as_ref()).await?;
        self.authenticate(&mut ssh).await?;
        Ok(ssh)
    }

    /// A new session channel on `ssh` running the `sftp` subsystem.
    async fn sftp_channel(
        &self,
        ssh: &russh::client::Handle<HostKeyChecker>,
    ) -> Result<russh::ChannelStream<russh::client::Msg>, DestinationError> {
        let connect_err = |detail: String| DestinationError::Connect {
            location: self.location(""),
            detail,
        };
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
        Ok(channel.into_stream())
    }

    /// The russh-sftp settings every session uses.
    fn sftp_config(&self) -> russh_sftp::client::Config {
        russh_sftp::client::Config {
            max_packet_len: 256 * 1024 + 1024,
            max_concurrent_reads: READS_IN_FLIGHT,
            max_concurrent_writes: WRITES_IN_FLIGHT,
            max_write_packet_len: WRITE_LEN,
            request_timeout_secs: self.config.io_timeout.as_secs().max(1),
        }
    }

    async fn connect(&self) -> Result<Connection, DestinationError> {
        let connect_err = |detail: String| DestinationError::Connect {
            location: self.location(""),
            detail,
        };
        let ssh = self.login().await?;
        let channel = self.sftp_channel(&ssh).await?;
        // russh-sftp keeps the server's extensions to itself; the sniffer
        // reads them off the VERSION packet on its way in.
        let seen = Seen::default();
        let stream = Sniffer::new(channel, seen.clone());
        let sftp = SftpSession::new_with_config(stream, self.sftp_config())
            .await
            .map_err(|e| connect_err(format!("SFTP handshake failed: {e}")))?;
        let fsync = match seen.get() {
            // The test russh-sftp applies before its flush sends fsync.
            Some(Ok(v)) => v.offers(FSYNC, "1"),
            Some(Err(why)) => {
                tracing::warn!(location = %self.location(""), error = %why, "cannot read the SFTP server's extensions; treating it as one without fsync@openssh.com");
                false
            }
            None => false,
        };
        tracing::debug!(location = %self.location(""), fsync, "SFTP session established");
        Ok(Connection {
            sftp: Arc::new(sftp),
            fsync,
            warned_not_durable: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            ssh,
        })
    }

    /// Bounds one SFTP operation on `conn` by `io_timeout`; a timeout or a
    /// connection-level failure marks `conn` broken, so the next operation
    /// uses a fresh connection instead of waiting on this one again.
    async fn timed<T>(
        &self,
        conn: &Connection,
        op: &'static str,
        path: &str,
        fut: impl std::future::Future<Output = Result<T, russh_sftp::client::error::Error>>,
    ) -> Result<T, DestinationError> {
        let io_timeout = self.config.io_timeout;
        let result = match tokio::time::timeout(io_timeout, fut).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => {
                if breaks_connection(&e) {
                    conn.mark_broken();
                }
                sftp_io_error(e, io_timeout)
            }
            Err(_) => {
                conn.mark_broken();
                timeout_error(io_timeout)
            }
        };
        Err(DestinationError::Io {
            op,
            location: self.location(path),
            source: result,
        })
    }

    /// Whether reading `path` over the striped sessions pays for opening
    /// them: files of [`stripe::STRIPE_READ_MIN`] bytes or more. Manifests,
    /// small tarballs and the like are read over the control session alone,
    /// so `list`, `prune` and the manifest reads of `verify` never log in
    /// `streams` more times. One stat round trip decides.
    async fn worth_striping(
        &self,
        conn: &Connection,
        path: &str,
    ) -> Result<bool, DestinationError> {
        let attrs = self
            .timed(
                conn,
                "cannot stat",
                path,
                conn.sftp.metadata(self.remote(path)),
            )
            .await?;
        Ok(attrs.size.unwrap_or(u64::MAX) >= stripe::STRIPE_READ_MIN)
    }

    /// A ranged read over the control session, for a server that lets no
    /// further session open: the OPEN and a STAT sent together, then the
    /// file read from `offset` as [`super::Destination::open`] reads it (its
    /// reads run ahead of the range, and what they bring beyond it is
    /// dropped).
    async fn open_range_on_control(
        &self,
        path: &str,
        conn: Arc<Connection>,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError> {
        let remote = self.remote(path);
        let (file, attrs) = tokio::join!(
            self.timed(&conn, "cannot open", path, conn.sftp.open(remote.clone())),
            self.timed(&conn, "cannot stat", path, conn.sftp.metadata(remote)),
        );
        let mut file = file?;
        let size = attrs?.size;
        if let Some(size) =
            size.filter(|&size| offset.checked_add(len).is_none_or(|end| end > size))
        {
            return Err(DestinationError::OutOfRange {
                location: self.location(path),
                offset,
                len,
                size,
            });
        }
        // A seek from the start sends nothing: the next read asks there.
        tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(offset))
            .await
            .map_err(|source| DestinationError::Io {
                op: "cannot seek in",
                location: self.location(path),
                source,
            })?;
        Ok(Box::new(range::Exact::new(
            SftpReader {
                file,
                conn,
                io_timeout: self.config.io_timeout,
            },
            self.location(path),
            offset,
            len,
        )))
    }

    /// Creates `path` (its directories first), exclusively, mode 0600:
    /// over the striped sessions when `striped` and the server let any open,
    /// else over the control session alone.
    async fn create_file(
        &self,
        path: &str,
        striped: bool,
    ) -> Result<Box<dyn Upload>, DestinationError> {
        let parts = components(path)?;
        self.ensure_dir(&parts[..parts.len() - 1].join("/")).await?;
        let conn = self.conn().await?;
        // The file is created over the control connection, striped or not:
        // a clean-up deletes over that same session, which the server
        // answers in order, so a create still in flight when a run is
        // cancelled is carried out before the clean-up's delete, never
        // after it. (Created over a lane, its own session, it could land
        // after the delete and be left behind.) Lanes only open it.
        let attrs = FileAttributes {
            permissions: Some(0o600),
            ..FileAttributes::empty()
        };
        let create = self.timed(
            &conn,
            "cannot create",
            path,
            conn.sftp.open_with_flags_and_attributes(
                self.remote(path),
                OpenFlags::CREATE | OpenFlags::EXCLUDE | OpenFlags::WRITE,
                attrs,
            ),
        );
        let (file, lanes) = if striped {
            let (file, lanes) = tokio::join!(create, self.lanes(&conn, usize::MAX));
            (file?, lanes)
        } else {
            (create.await?, Vec::new())
        };
        let upload = SftpUpload {
            file,
            conn,
            remote: self.remote(path),
            location: self.location(path),
            io_timeout: self.config.io_timeout,
            written: 0,
        };
        if lanes.is_empty() {
            return Ok(Box::new(upload));
        }
        self.create_striped(path, upload, lanes).await
    }

    /// Creates every missing directory of `dir` (a relative path, `""` for
    /// the base itself), mode 0700, in two round trips however deep: every
    /// level's mkdir sent at once, top down (servers answer one session's
    /// requests in order), then the new ones' mode set and the others
    /// checked to be directories, at once too. Anything unexpected (a
    /// server that answered out of order, a race with another agent) is
    /// settled one level at a time by [`Self::ensure_dir_in_turn`].
    async fn ensure_dir(&self, dir: &str) -> Result<(), DestinationError> {
        let conn = self.conn().await?;
        let todo: Vec<String> = self
            .dir_levels(dir)?
            .into_iter()
            .filter(|rel| !self.dirs.lock().map(|d| d.contains(rel)).unwrap_or(false))
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let made = futures_util::future::join_all(todo.iter().map(|rel| {
            self.timed(
                &conn,
                "cannot create directory",
                rel,
                conn.sftp.create_dir(self.remote(rel)),
            )
        }))
        .await;
        if conn.is_broken() {
            return self.ensure_dir_in_turn(dir).await;
        }
        let checked =
            futures_util::future::join_all(todo.iter().zip(&made).map(|(rel, made)| async {
                if made.is_ok() {
                    self.tighten_new_dir(&conn, rel).await.map(|()| true)
                } else {
                    self.timed(
                        &conn,
                        "cannot stat",
                        rel,
                        conn.sftp.metadata(self.remote(rel)),
                    )
                    .await
                    .map(|attrs| attrs.is_dir())
                }
            }))
            .await;
        if checked.iter().all(|c| matches!(c, Ok(true))) {
            if let Ok(mut d) = self.dirs.lock() {
                d.extend(todo);
            }
            return Ok(());
        }
        self.ensure_dir_in_turn(dir).await
    }

    /// Sets mode 0700 on `rel`, a directory this agent just made: the
    /// high-level mkdir sends no mode, so the server's umask decided it, and
    /// the directory is still empty.
    async fn tighten_new_dir(&self, conn: &Connection, rel: &str) -> Result<(), DestinationError> {
        let attrs = FileAttributes {
            permissions: Some(0o700),
            ..FileAttributes::empty()
        };
        self.timed(
            conn,
            "cannot set the mode of",
            rel,
            conn.sftp.set_metadata(self.remote(rel), attrs),
        )
        .await
    }

    /// `""` (the base) and every prefix of `dir`, top down.
    fn dir_levels(&self, dir: &str) -> Result<Vec<String>, DestinationError> {
        let mut levels = vec![String::new()];
        if !dir.is_empty() {
            let mut prefix = String::new();
            for part in components(dir)? {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(part);
                levels.push(prefix.clone());
            }
        }
        Ok(levels)
    }

    /// [`Self::ensure_dir`] one level at a time: stat, and create what is
    /// missing, with the errors that say which level and why.
    async fn ensure_dir_in_turn(&self, dir: &str) -> Result<(), DestinationError> {
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
                .timed(
                    &conn,
                    "cannot stat",
                    &rel,
                    conn.sftp.metadata(remote.clone()),
                )
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
                    if let Err(e) = self
                        .timed(&conn, "cannot create directory", &rel, mkdir)
                        .await
                    {
                        if conn.is_broken() {
                            return Err(e);
                        }
                        // Lost a race with another agent creating the same
                        // directory: fine if it is a directory now.
                        let now = self
                            .timed(
                                &conn,
                                "cannot stat",
                                &rel,
                                conn.sftp.metadata(remote.clone()),
                            )
                            .await;
                        if !now.map(|a| a.is_dir()).unwrap_or(false) {
                            return Err(e);
                        }
                    }
                    self.tighten_new_dir(&conn, &rel).await?;
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
    crate::error_chain::chain(e)
}

/// The error for an SFTP request that got no answer within `io_timeout`,
/// naming the setting (russh-sftp's own request timeout says only "Timeout").
fn timeout_error(io_timeout: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "no answer from the server within {io_timeout:?} (destination.sftp.io_timeout), \
             so the connection was dropped; if the server is slow rather than stuck, raise \
             destination.sftp.io_timeout"
        ),
    )
}

/// Whether an SFTP error means the connection itself is unusable (no answer,
/// the session or channel gone), as opposed to the server refusing one
/// request.
fn breaks_connection(e: &russh_sftp::client::error::Error) -> bool {
    use russh_sftp::client::error::Error as E;
    match e {
        E::Timeout | E::IO(_) | E::UnexpectedBehavior(_) | E::UnexpectedPacket => true,
        E::Status(s) => matches!(
            s.status_code,
            StatusCode::NoConnection | StatusCode::ConnectionLost
        ),
        E::Limited(_) => false,
    }
}

/// [`breaks_connection`] for the `std::io::Error`s that russh-sftp's file
/// reads and writes return.
fn io_breaks_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    if let Some(inner) = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<russh_sftp::client::error::Error>())
    {
        return breaks_connection(inner);
    }
    matches!(
        e.kind(),
        K::TimedOut
            | K::BrokenPipe
            | K::ConnectionAborted
            | K::ConnectionReset
            | K::UnexpectedEof
            | K::NotConnected
    )
}

fn sftp_io_error(e: russh_sftp::client::error::Error, io_timeout: Duration) -> std::io::Error {
    use russh_sftp::client::error::Error as E;
    use std::io::ErrorKind as K;
    if matches!(e, E::Timeout) {
        return timeout_error(io_timeout);
    }
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
        self.create_file(path, self.config.streams > 1).await
    }

    async fn create_small(&self, path: &str) -> Result<Box<dyn Upload>, DestinationError> {
        self.create_file(path, false).await
    }

    async fn rename(&self, from: &str, to: &str) -> Result<(), DestinationError> {
        let conn = self.conn().await?;
        // SFTP v3 rename refuses an existing target on OpenSSH, but not every
        // server agrees; check first so nothing is ever replaced.
        let exists = self
            .timed(
                &conn,
                "cannot check",
                to,
                conn.sftp.try_exists(self.remote(to)),
            )
            .await?;
        if exists {
            return Err(DestinationError::AlreadyExists {
                location: self.location(to),
            });
        }
        self.timed(
            &conn,
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
            .timed(
                &conn,
                "cannot list",
                dir,
                conn.sftp.read_dir(self.remote(dir)),
            )
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
        if self.config.streams > 1 && self.worth_striping(&conn, path).await? {
            let lanes = self.lanes(&conn, stripe::READ_LANES).await;
            if !lanes.is_empty() {
                return self.open_striped(path, conn, lanes).await;
            }
        }
        let file = self
            .timed(
                &conn,
                "cannot open",
                path,
                conn.sftp.open(self.remote(path)),
            )
            .await?;
        Ok(Box::new(SftpReader {
            file,
            conn,
            io_timeout: self.config.io_timeout,
        }))
    }

    async fn open_range(
        &self,
        path: &str,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError> {
        components(path)?;
        let conn = self.conn().await?;
        match self.range_lane(&conn).await {
            Ok(lane) => self.open_range_on_lane(path, conn, lane, offset, len).await,
            Err(e) => {
                if !self.range_lane_refused.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        location = %self.location(""),
                        error = %e,
                        "no second SFTP session for ranged reads (OpenSSH limits sessions per connection with MaxSessions, ProFTPD with SFTPMaxChannels); reading ranges over the one session, whose reads of a file run ahead of what a range needs; raise the limit on the server to read ranges in fewer bytes"
                    );
                }
                self.open_range_on_control(path, conn, offset, len).await
            }
        }
    }

    async fn delete(&self, path: &str) -> Result<(), DestinationError> {
        components(path)?;
        let conn = self.conn().await?;
        match self
            .timed(
                &conn,
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
                &conn,
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

    async fn warm_up(&self) {
        self.warm_lanes().await;
    }

    async fn sync_dir(&self, dir: &str) -> Result<DirSync, DestinationError> {
        components(dir)?;
        let conn = self.conn().await?;
        if !conn.fsync {
            return Ok(DirSync::Unsupported(format!(
                "the server does not offer {FSYNC}"
            )));
        }
        // OpenSSH's sftp-server opens a directory read-only as it opens a
        // file (open(2) allows it) and fsyncs that handle on
        // fsync@openssh.com, which makes the directory's entries, the
        // renames, durable. A server that refuses either answers with a
        // status: the directory cannot be synced there. A timeout or a lost
        // connection says nothing about that, and fails the call.
        let unsupported = |e: DestinationError, what: &str| {
            if conn.is_broken() {
                Err(e)
            } else {
                Ok(DirSync::Unsupported(format!("{what}: {e}")))
            }
        };
        let handle = match self
            .timed(
                &conn,
                "cannot open directory for syncing",
                dir,
                conn.sftp.open(self.remote(dir)),
            )
            .await
        {
            Ok(h) => h,
            Err(e) => return unsupported(e, "the server would not open the directory"),
        };
        let synced = self
            .timed(&conn, "cannot sync directory", dir, handle.sync_all())
            .await;
        // Dropping the handle closes it without waiting for the answer:
        // nothing was written through it.
        drop(handle);
        match synced {
            Ok(()) => Ok(DirSync::Synced),
            Err(e) => unsupported(e, "the server would not sync the directory"),
        }
    }

    async fn durability(&self) -> Result<Durability, DestinationError> {
        let conn = self.conn().await?;
        if conn.fsync {
            return Ok(Durability::Synced);
        }
        if self.config.require_fsync {
            return Err(DestinationError::NotDurable {
                location: self.location(""),
            });
        }
        if !conn.warned_not_durable.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                location = %self.location(""),
                "the SFTP server does not offer fsync@openssh.com, and destination.sftp.require_fsync is false: sets stored there are recorded as not durable (\"durable\": false), since a crash of the server may lose them"
            );
        }
        Ok(Durability::NotSynced)
    }
}

/// A file being read back: marks the connection broken when a read times
/// out or the connection fails, and names `io_timeout` in a timeout.
struct SftpReader {
    file: russh_sftp::client::fs::File,
    conn: Arc<Connection>,
    io_timeout: Duration,
}

impl AsyncRead for SftpReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.file).poll_read(cx, buf) {
            Poll::Ready(Err(e)) => {
                Poll::Ready(Err(connection_failure(&this.conn, this.io_timeout, e)))
            }
            other => other,
        }
    }
}

/// Marks `conn` broken when `e` means the connection is unusable, and names
/// `io_timeout` when it was a timeout.
fn connection_failure(
    conn: &Connection,
    io_timeout: Duration,
    e: std::io::Error,
) -> std::io::Error {
    if io_breaks_connection(&e) {
        conn.mark_broken();
    }
    if e.kind() == std::io::ErrorKind::TimedOut {
        timeout_error(io_timeout)
    } else {
        e
    }
}

/// The [`DestinationError::Full`] for a write `e` the server refused for
/// lack of room, with what `statvfs@openssh.com` says about the file system
/// holding `remote` when the server offers it and answers within
/// `io_timeout`. Shared by one-session and striped uploads.
async fn out_of_space(
    conn: &Connection,
    io_timeout: Duration,
    remote: &str,
    location: &str,
    e: std::io::Error,
) -> DestinationError {
    let free = tokio::time::timeout(io_timeout, conn.sftp.fs_info(remote.to_string()))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
        .map(|st| {
            let unit = st.fragment_size.max(1);
            super::space_text(
                st.blocks_avail.saturating_mul(unit),
                st.blocks.saturating_mul(unit),
            )
        });
    let detail = match free {
        Some(free) => format!("the server answered {e} ({free})"),
        None => format!("the server answered {e}"),
    };
    DestinationError::Full {
        op: "cannot write",
        location: location.to_string(),
        detail,
    }
}

struct SftpUpload {
    file: russh_sftp::client::fs::File,
    /// Kept alive while the upload is; marked broken when a write stalls.
    conn: Arc<Connection>,
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
    /// [`DestinationError::Full`], with the free space when the server
    /// answers `statvfs@openssh.com`; anything else stays an I/O error.
    ///
    /// russh-sftp passes a status answer to a pipelined write on as its
    /// message text only (an `Other` error that is not one of its typed
    /// errors, which carry connection loss and timeouts). A server refusing
    /// a write to a file it let us create, after accepting earlier writes,
    /// has no room (disk, quota, file size limit) whatever its status code,
    /// so such an answer counts as full too.
    async fn write_error(&self, e: std::io::Error) -> DestinationError {
        use russh_sftp::client::error::Error as E;
        let e = connection_failure(&self.conn, self.io_timeout, e);
        let typed = e.get_ref().and_then(|inner| inner.downcast_ref::<E>());
        let failure = match typed {
            Some(E::Status(s)) => s.status_code == StatusCode::Failure,
            Some(_) => false,
            None => {
                e.kind() == std::io::ErrorKind::Other
                    && e.get_ref().is_some()
                    // russh-sftp's text for a reply of the wrong type.
                    && e.to_string() != "unexpected response packet"
            }
        };
        if failure || super::is_out_of_space(&e) {
            out_of_space(&self.conn, self.io_timeout, &self.remote, &self.location, e).await
        } else {
            self.io("cannot write", e)
        }
    }

    /// The error for a step that got no answer within `io_timeout`; the
    /// connection is not used again.
    fn timeout(&self) -> std::io::Error {
        self.conn.mark_broken();
        timeout_error(self.io_timeout)
    }
}

#[async_trait]
impl Upload for SftpUpload {
    async fn write(&mut self, buf: &[u8]) -> Result<(), DestinationError> {
        match tokio::time::timeout(self.io_timeout, self.file.write_all(buf)).await {
            Ok(Ok(())) => {
                self.written += buf.len() as u64;
                Ok(())
            }
            Ok(Err(e)) => Err(self.write_error(e).await),
            Err(_) => Err(self.io("cannot write", self.timeout())),
        }
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, DestinationError> {
        // flush waits for every write to be acknowledged, then asks the server
        // to fsync (fsync@openssh.com) when it offers that: always, unless
        // durability() allowed a server without it (require_fsync: false),
        // and the set then says "durable": false.
        match tokio::time::timeout(self.io_timeout, self.file.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.write_error(e).await),
            Err(_) => return Err(self.io("cannot write", self.timeout())),
        }
        match tokio::time::timeout(self.io_timeout, self.file.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let e = connection_failure(&self.conn, self.io_timeout, e);
                return Err(self.io("cannot close", e));
            }
            Err(_) => return Err(self.io("cannot close", self.timeout())),
        }
        let stored = match tokio::time::timeout(
            self.io_timeout,
            self.conn.sftp.metadata(self.remote.clone()),
        )
        .await
        {
            Ok(Ok(attrs)) => attrs.size.unwrap_or(0),
            Ok(Err(e)) => {
                if breaks_connection(&e) {
                    self.conn.mark_broken();
                }
                return Err(self.io("cannot stat", sftp_io_error(e, self.io_timeout)));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(algorithms: &[Algorithm]) -> Vec<String> {
        algorithms.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn host_key_preference_puts_the_trusted_types_first_and_sha1_rsa_last() {
        assert_eq!(
            names(&host_key_preference(&["ssh-rsa"])),
            [
                "rsa-sha2-512",
                "rsa-sha2-256",
                "ssh-ed25519",
                "ecdsa-sha2-nistp256",
                "ecdsa-sha2-nistp384",
                "ecdsa-sha2-nistp521",
                "ssh-rsa"
            ]
        );
        assert_eq!(
            names(&host_key_preference(&[
                "ecdsa-sha2-nistp384",
                "ssh-ed25519"
            ])),
            [
                "ssh-ed25519",
                "ecdsa-sha2-nistp384",
                "ecdsa-sha2-nistp256",
                "ecdsa-sha2-nistp521",
                "rsa-sha2-512",
                "rsa-sha2-256",
                "ssh-rsa"
            ]
        );
        // Nothing known (or only types the agent cannot use): the default order.
        for trusted in [&[][..], &["ssh-future@example.com"][..]] {
            assert_eq!(
                names(&host_key_preference(trusted)),
                names(HOST_KEY_ALGORITHMS),
                "{trusted:?}"
            );
        }
    }

    #[test]
    fn every_supported_algorithm_is_offered_and_maps_to_its_key_type() {
        for a in HOST_KEY_ALGORITHMS {
            let t = key_type_of(a);
            assert!(!t.is_empty(), "{a}");
            // What known_hosts lists for a key of that type puts it first.
            assert_eq!(key_type_of(&host_key_preference(&[t])[0]), t, "{a}");
        }
    }

    #[test]
    fn a_pin_asks_again_only_for_key_types_not_yet_seen() {
        let seen = |types: &[&str]| -> Vec<(String, String)> {
            types
                .iter()
                .map(|t| (t.to_string(), "SHA256:x".to_string()))
                .collect()
        };
        assert_eq!(
            names(&host_key_algorithms_not_seen(&[])),
            names(HOST_KEY_ALGORITHMS)
        );
        assert_eq!(
            names(&host_key_algorithms_not_seen(&seen(&[
                "ssh-ed25519",
                "ssh-rsa"
            ]))),
            [
                "ecdsa-sha2-nistp256",
                "ecdsa-sha2-nistp384",
                "ecdsa-sha2-nistp521"
            ]
        );
        let all: Vec<&str> = HOST_KEY_ALGORITHMS.iter().map(key_type_of).collect();
        assert!(host_key_algorithms_not_seen(&seen(&all)).is_empty());
    }

    #[test]
    fn a_timeout_names_the_setting_and_breaks_the_connection() {
        use russh_sftp::client::error::Error as E;
        let e = sftp_io_error(E::Timeout, Duration::from_secs(3));
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        let text = e.to_string();
        assert!(text.contains("destination.sftp.io_timeout"), "{text}");
        assert!(text.contains("3s"), "{text}");
        assert!(breaks_connection(&E::Timeout));
        assert!(breaks_connection(&E::IO("broken pipe".into())));
        // russh-sftp's file reads and writes wrap the error in std::io::Error.
        assert!(io_breaks_connection(&std::io::Error::from(E::Timeout)));
        assert!(io_breaks_connection(&std::io::Error::from(E::IO(
            "x".into()
        ))));
        // A refusal of one request leaves the connection usable.
        let refused = E::Status(russh_sftp::protocol::Status {
            id: 1,
            status_code: StatusCode::PermissionDenied,
            error_message: "denied".into(),
            language_tag: "en".into(),
        });
        assert!(!breaks_connection(&refused));
        assert!(!io_breaks_connection(&std::io::Error::from(refused)));
    }
}
