//! Where backup sets are stored, behind one trait.
//!
//! A destination knows nothing about sets or manifests: it stores files under
//! relative `/`-separated paths below its base, streams them in and out, renames
//! and deletes them. The set protocol (partial names, rename, manifest last)
//! lives in [`crate::backup`], so every destination gets it right the same way.

#[cfg(test)]
pub(crate) mod faulty;
mod local;
mod range;
mod s3;
mod sftp;
mod sftp_version;

use async_trait::async_trait;
use tokio::io::AsyncRead;

pub use local::LocalDir;
pub use range::{read_ranges, ByteRange};
pub use s3::{S3Dir, PARTS_IN_FLIGHT, PART_SIZE};
pub use sftp::{SftpDir, StripeOver};

use crate::config::DestinationConfig;

/// Why a destination operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// An I/O operation failed.
    #[error("{op} {location}: {source}")]
    Io {
        /// What was being done, e.g. "cannot create".
        op: &'static str,
        /// The full location (destination base and path).
        location: String,
        /// What the OS or server said.
        source: std::io::Error,
    },
    /// A rename target already exists; nothing was overwritten.
    #[error("cannot rename to {location}: it already exists, and existing backups are never overwritten")]
    AlreadyExists {
        /// The full location of the existing file.
        location: String,
    },
    /// The stored file's size differs from the bytes sent.
    #[error("{location} holds {stored} bytes after writing {sent}; the destination lost data")]
    SizeMismatch {
        /// The full location.
        location: String,
        /// Bytes sent.
        sent: u64,
        /// Bytes stored.
        stored: u64,
    },
    /// No SSH/SFTP session could be set up (network, timeout, protocol).
    #[error("cannot connect to {location}: {detail}")]
    Connect {
        /// The destination.
        location: String,
        /// What went wrong.
        detail: String,
    },
    /// The server's host key is not trusted; nothing was sent to it.
    #[error("{detail}")]
    HostKey {
        /// The server's host.
        host: String,
        /// The server's port.
        port: u16,
        /// What was presented and what to do.
        detail: String,
    },
    /// The server refused our credentials, or they could not be loaded.
    #[error("SFTP authentication as {user} on {host}:{port} failed: {detail}")]
    Auth {
        /// The login user.
        user: String,
        /// The server's host.
        host: String,
        /// The server's port.
        port: u16,
        /// What failed and what to check.
        detail: String,
    },
    /// A secret file from the config could not be read.
    #[error("cannot read {field} {path}: {source}")]
    Secret {
        /// The config field.
        field: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A write refused because the destination is out of space or over a
    /// quota (ENOSPC, EDQUOT, or an SFTP server's generic `Failure` on a
    /// write, which is how OpenSSH's server reports both). Permanent: each
    /// retry would stream the whole snapshot from etcd again for nothing.
    #[error("{op} {location}: {detail}; the destination may be full or over its quota: make room (or raise the quota), then back up again; not retried, since every attempt re-reads the whole snapshot from etcd")]
    Full {
        /// What was being done, e.g. "cannot write".
        op: &'static str,
        /// The full location.
        location: String,
        /// What the OS or server said.
        detail: String,
    },
    /// The server cannot sync what it stores to disk, and
    /// `destination.sftp.require_fsync` says not to store sets it may lose.
    #[error("{location} does not offer fsync@openssh.com, so files it stores may be lost if the server crashes before its disk catches up; enable the extension on the server (OpenSSH's sftp-server has it since 6.5; ProFTPD: `SFTPExtensions +fsync`), or set destination.sftp.require_fsync: false to store sets there anyway, recorded as not durable")]
    NotDurable {
        /// The server.
        location: String,
    },
    /// An S3 request failed: the operation, the object (bucket, key,
    /// endpoint and access key id; never the secret) and what the store said.
    #[error("{op} {location}: {detail}")]
    S3 {
        /// What was being done, e.g. "cannot upload a part of".
        op: &'static str,
        /// `s3://<bucket>/<key> at <endpoint> (access key id K)`.
        location: String,
        /// The store's answer and what to do.
        detail: String,
        /// Whether it may pass (5xx, throttling, timeouts, connections),
        /// after the per-request retries ran out.
        transient: bool,
    },
    /// A path that is not a plain relative path below the base.
    #[error("refusing path {path:?}: not a relative path below the destination's base")]
    BadPath {
        /// The rejected path.
        path: String,
    },
    /// A ranged read asked for bytes past the end of the file: whatever
    /// named the range (an index, a manifest) does not describe this file.
    #[error("cannot read {len} bytes at offset {offset} of {location}: the file holds only {size} bytes; it is truncated, or not the file that named this range expected")]
    OutOfRange {
        /// The full location.
        location: String,
        /// The first byte asked for.
        offset: u64,
        /// How many bytes were asked for.
        len: u64,
        /// The file's size.
        size: u64,
    },
}

impl DestinationError {
    /// Whether trying again later may succeed: I/O failures that look like a
    /// connection or a momentary condition, not a refusal.
    pub fn is_transient(&self) -> bool {
        match self {
            DestinationError::Io { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::InvalidInput
                    | std::io::ErrorKind::InvalidData
                    | std::io::ErrorKind::Unsupported
            ),
            DestinationError::Connect { .. } => true,
            DestinationError::S3 { transient, .. } => *transient,
            _ => false,
        }
    }

    /// Whether the destination definitely did not carry the operation out:
    /// it answered, and said no and why (the file exists, permission denied,
    /// no such file, a bad path, a refused login). Everything else is
    /// ambiguous: a timeout, a dropped connection, a server error, a reply
    /// cut off, or a failure after the operation took effect (a local
    /// rename whose directory could not be synced) may come after the
    /// destination did what was asked. A caller that must know looks (lists,
    /// stats, HEADs) before it decides; it never takes such an error as a
    /// "no".
    pub fn is_refusal(&self) -> bool {
        use std::io::ErrorKind as K;
        match self {
            DestinationError::Io { source, .. } => matches!(
                source.kind(),
                K::PermissionDenied
                    | K::NotFound
                    | K::AlreadyExists
                    | K::InvalidInput
                    | K::Unsupported
                    | K::ReadOnlyFilesystem
                    | K::NotADirectory
                    | K::IsADirectory
                    | K::DirectoryNotEmpty
                    | K::StorageFull
                    | K::QuotaExceeded
            ),
            DestinationError::AlreadyExists { .. }
            | DestinationError::Full { .. }
            | DestinationError::HostKey { .. }
            | DestinationError::Auth { .. }
            | DestinationError::Secret { .. }
            | DestinationError::NotDurable { .. }
            | DestinationError::BadPath { .. }
            | DestinationError::OutOfRange { .. } => true,
            // No session was set up, so nothing was sent.
            DestinationError::Connect { .. } => true,
            // The file was stored, with another size than sent.
            DestinationError::SizeMismatch { .. } => false,
            // A 4xx answer with its reason is a refusal; 5xx, throttling,
            // timeouts and connections are not, whatever the retries did.
            DestinationError::S3 { transient, .. } => !*transient,
        }
    }
}

/// Whether the OS says a write failed for lack of space or quota.
pub(crate) fn is_out_of_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// "N free of M", in the units an admin reads, for a disk-full message.
pub(crate) fn space_text(available: u64, total: u64) -> String {
    fn human(b: u64) -> String {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = b as f64;
        let mut u = 0;
        while v >= 1024.0 && u < UNITS.len() - 1 {
            v /= 1024.0;
            u += 1;
        }
        if u == 0 {
            format!("{b} B")
        } else {
            format!("{v:.1} {}", UNITS[u])
        }
    }
    format!("{} free of {}", human(available), human(total))
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The entry's name (one path component).
    pub name: String,
    /// Whether it is a directory (never true for a symbolic link to one: a
    /// listing does not follow links).
    pub is_dir: bool,
    /// Whether it is a regular file (not a symbolic link, device or socket).
    pub is_file: bool,
    /// Size in bytes (0 for directories).
    pub size: u64,
    /// Last modification, when the destination reports it.
    pub modified: Option<std::time::SystemTime>,
}

/// A file being written. Dropping it without [`Upload::finish`] abandons the
/// file where it is; the caller removes it.
#[async_trait]
pub trait Upload: Send {
    /// Appends bytes.
    ///
    /// # Errors
    /// Write failures.
    async fn write(&mut self, buf: &[u8]) -> Result<(), DestinationError>;

    /// Makes the file durable and closes it, then checks that the stored size
    /// equals the bytes written, and returns that size.
    ///
    /// # Errors
    /// Flush, sync and close failures; [`DestinationError::SizeMismatch`].
    async fn finish(self: Box<Self>) -> Result<u64, DestinationError>;
}

/// A place to store files. Paths are relative, `/`-separated, below the base.
#[async_trait]
pub trait Destination: Send + Sync {
    /// Where this is, for messages and the run record (never with secrets).
    fn describe(&self) -> String;

    /// Creates a new file for writing, with its parent directories (mode 0700);
    /// the file is mode 0600. Fails if the file exists.
    ///
    /// # Errors
    /// I/O failures.
    async fn create(&self, path: &str) -> Result<Box<dyn Upload>, DestinationError>;

    /// [`Self::create`] for a file known to be small (a manifest): a
    /// destination that spreads large files over several sessions or parts
    /// writes this one the simplest way, in the fewest round trips.
    ///
    /// # Errors
    /// As [`Self::create`].
    async fn create_small(&self, path: &str) -> Result<Box<dyn Upload>, DestinationError> {
        self.create(path).await
    }

    /// Renames `from` to `to`, refusing to replace an existing `to`.
    ///
    /// # Errors
    /// [`DestinationError::AlreadyExists`], I/O failures.
    async fn rename(&self, from: &str, to: &str) -> Result<(), DestinationError>;

    /// Lists a directory; a missing directory lists as empty.
    ///
    /// # Errors
    /// I/O failures.
    async fn list(&self, dir: &str) -> Result<Vec<DirEntry>, DestinationError>;

    /// Opens a file for reading.
    ///
    /// # Errors
    /// I/O failures, including a missing file.
    async fn open(&self, path: &str)
        -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError>;

    /// Opens `len` bytes of file `path`, starting at byte `offset`, for
    /// reading: a piece of a pack file, read without the rest of it. The
    /// reader yields exactly `len` bytes, or fails: a file shorter than
    /// `offset + len` is [`DestinationError::OutOfRange`] (naming the file,
    /// the range and the file's size) when that is known at opening, and an
    /// [`std::io::ErrorKind::UnexpectedEof`] read error when the file
    /// turns out shorter while being read; never a short read. A zero
    /// length is allowed (an empty reader, once the file is found to be at
    /// least `offset` bytes long).
    ///
    /// Each destination reads a range its own way, in few round trips: a
    /// seek on a local file; on SFTP the range's reads all in flight at
    /// once, over a session kept for ranged reads (or the striped sessions,
    /// `streams` > 1), on a handle kept open for the file's next ranges
    /// (only the first range of a file sends an OPEN, with a STAT beside
    /// it): ranged reads are for files that never change once written;
    /// on S3 one GET with a `Range` header, retried as every GET. Several ranges may be open at once on one destination, and are
    /// read concurrently; [`read_ranges`] runs a list of them so.
    ///
    /// # Errors
    /// I/O failures, including a missing file;
    /// [`DestinationError::OutOfRange`].
    async fn open_range(
        &self,
        path: &str,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError>;

    /// How many ranges a reader of many (a paged set's packs) keeps open
    /// at once here: enough to hide a distant store's round trips, and no
    /// more where there are none to hide (each holds its bytes meanwhile).
    fn ranges_in_flight(&self) -> usize {
        8
    }

    /// Deletes a file; a missing file is not an error.
    ///
    /// # Errors
    /// I/O failures.
    async fn delete(&self, path: &str) -> Result<(), DestinationError>;

    /// Removes an empty directory; a missing directory is not an error.
    ///
    /// # Errors
    /// I/O failures, including a directory that is not empty.
    async fn remove_dir(&self, path: &str) -> Result<(), DestinationError>;

    /// Whether files this destination stores are synced to stable storage
    /// before it reports them stored. Asked once per run, before anything is
    /// written.
    ///
    /// # Errors
    /// [`DestinationError::NotDurable`] when the destination cannot sync and
    /// the configuration requires it; connection failures.
    async fn durability(&self) -> Result<Durability, DestinationError> {
        Ok(Durability::Synced)
    }

    /// Claims the set directory `dir` for this run, before anything is
    /// written to it, refusing when another writer has it. Local and SFTP
    /// destinations need nothing here (their exclusive creates already
    /// refuse a second writer); on S3, where conditional creates are not
    /// honoured by every store, it starts the manifest's upload and then
    /// checks that nothing else is in the set. A run's clean-up releases its
    /// claim by deleting `<dir>/manifest.json.partial`.
    ///
    /// # Errors
    /// [`DestinationError::AlreadyExists`] when the set is someone else's;
    /// request failures.
    async fn claim(&self, dir: &str) -> Result<(), DestinationError> {
        let _ = dir;
        Ok(())
    }

    /// Makes the entries of directory `dir` durable: the renames that
    /// published files in it survive a crash of the destination's host.
    /// A run calls it after the data files' renames and again after the
    /// manifest's, before it reports success. Local directories are synced
    /// by every rename already and S3 has no directories, so both answer
    /// [`DirSync::Synced`] without a request; SFTP opens the directory and
    /// sends `fsync@openssh.com` on that handle.
    ///
    /// # Errors
    /// Failures that leave it unknown whether the entries are durable
    /// (timeouts, lost connections); a server that answers that it cannot
    /// sync a directory is [`DirSync::Unsupported`], not an error.
    async fn sync_dir(&self, dir: &str) -> Result<DirSync, DestinationError> {
        let _ = dir;
        Ok(DirSync::Synced)
    }

    /// Gets ready for the large file a run is about to write, alongside the
    /// run's first steps (which the caller runs concurrently with this):
    /// SFTP logs its striped sessions in while the control connection logs
    /// in, instead of after it. Nothing here fails a run: what could not be
    /// made ready is tried again, and reported, when the file is created.
    async fn warm_up(&self) {}
}

/// How far a destination's "stored" can be trusted after a crash of its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every file is synced before it is reported stored.
    Synced,
    /// Files are synced, but the directory holding them could not be (an
    /// SFTP server that syncs files but refuses to open or sync a
    /// directory): after a crash of the server the renames that published
    /// the set may be undone, its files back under `.partial` names or its
    /// manifest gone.
    FilesOnly,
    /// The destination cannot sync (an SFTP server without
    /// `fsync@openssh.com`, allowed by `require_fsync: false`): a crash of the
    /// server may lose what it acknowledged.
    NotSynced,
}

/// What [`Destination::sync_dir`] could do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirSync {
    /// The directory's entries are on stable storage.
    Synced,
    /// The destination answered that it cannot sync a directory; the text
    /// is its answer, for the log.
    Unsupported(String),
}

/// The temporary name a file is written under.
pub fn partial(path: &str) -> String {
    format!("{path}{}", etcd_backup_proto::PARTIAL_SUFFIX)
}

/// Looks for a data file after its rename got no definite answer: `Ok`
/// (saying what was found) when `to` is in place with `size` bytes and
/// `from` is gone, `Err` with what was found otherwise.
pub async fn rename_outcome(
    dest: &dyn Destination,
    from: &str,
    to: &str,
    size: u64,
) -> Result<String, String> {
    let (dir, to_name) = to.rsplit_once('/').unwrap_or(("", to));
    let from_name = from.rsplit('/').next().unwrap_or(from);
    let entries = dest.list(dir).await.map_err(|e| {
        format!("the set directory could not be read to find out ({e}); no manifest was written, so what the run wrote is removed")
    })?;
    let stored = entries.iter().find(|e| e.name == to_name).map(|e| e.size);
    let left = entries.iter().any(|e| e.name == from_name);
    match (stored, left) {
        (Some(s), false) if s == size => Ok(format!(
            "looked: {to} is in place with its {size} bytes, so the rename was carried out"
        )),
        (Some(s), _) => Err(format!(
            "looked: {to} holds {s} bytes, {size} expected{}; no manifest was written, so what the run wrote is removed",
            if left { format!(", and {from} is still there") } else { String::new() }
        )),
        (None, _) => Err(format!(
            "looked: {to} is not there, so the rename was not carried out; what the run wrote is removed"
        )),
    }
}

/// Records `path` in `created` before `op` that may create it, so a run
/// cut off while the destination carries it out still removes it; the
/// record is dropped again only on a refusal (the destination answered,
/// and created nothing of ours). Any other error (a timeout, a dropped
/// connection) may come after the file was created: the record stays.
pub async fn recorded<T>(
    created: &mut Vec<String>,
    path: String,
    op: impl std::future::Future<Output = Result<T, DestinationError>>,
) -> Result<T, DestinationError> {
    created.push(path.clone());
    let result = op.await;
    if let Err(e) = &result {
        if e.is_refusal() {
            if let Some(at) = created.iter().rposition(|p| *p == path) {
                created.remove(at);
            }
        }
    }
    result
}

/// Opens the configured destination.
///
/// # Errors
/// When the destination cannot be set up (e.g. the base cannot be created).
pub async fn open(config: &DestinationConfig) -> Result<Box<dyn Destination>, DestinationError> {
    match config {
        DestinationConfig::Local { path } => Ok(Box::new(LocalDir::open(path).await?)),
        DestinationConfig::Sftp(c) => Ok(Box::new(SftpDir::new(c.clone()))),
        DestinationConfig::S3(c) => Ok(Box::new(S3Dir::new(c)?)),
    }
}

/// Splits a relative path into its components, refusing anything that could
/// leave the base: absolute paths, `..`, `.`, empty components.
///
/// # Errors
/// [`DestinationError::BadPath`].
pub fn components(path: &str) -> Result<Vec<&str>, DestinationError> {
    let parts: Vec<&str> = path.split('/').collect();
    if path.is_empty()
        || parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\0'))
    {
        return Err(DestinationError::BadPath {
            path: path.to_string(),
        });
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_permanent() {
        use std::io::Write;
        // /dev/full answers every write with ENOSPC, as a full filesystem does.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let e = f
            .write_all(&[0u8; 4096])
            .and_then(|()| f.flush())
            .unwrap_err();
        assert!(is_out_of_space(&e), "{e:?}");
        let full = DestinationError::Full {
            op: "cannot write",
            location: "local:/b/x".into(),
            detail: e.to_string(),
        };
        assert!(!full.is_transient());
        assert!(full.to_string().contains("may be full"), "{full}");
        let reset = DestinationError::Io {
            op: "cannot write",
            location: "x".into(),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"),
        };
        assert!(reset.is_transient());
    }

    #[test]
    fn only_an_answered_no_is_a_refusal_timeouts_and_resets_are_ambiguous() {
        let io = |kind| DestinationError::Io {
            op: "cannot rename into",
            location: "x".into(),
            source: std::io::Error::new(kind, "what the server said"),
        };
        use std::io::ErrorKind as K;
        for kind in [K::NotFound, K::PermissionDenied, K::AlreadyExists] {
            assert!(io(kind).is_refusal(), "{kind:?}");
        }
        for kind in [
            K::TimedOut,
            K::ConnectionReset,
            K::ConnectionAborted,
            K::BrokenPipe,
            K::UnexpectedEof,
            K::Other,
        ] {
            assert!(!io(kind).is_refusal(), "{kind:?}");
        }
        let s3 = |transient| DestinationError::S3 {
            op: "cannot complete the upload of",
            location: "s3://b/k".into(),
            detail: "d".into(),
            transient,
        };
        assert!(s3(false).is_refusal(), "a 4xx answer");
        assert!(!s3(true).is_refusal(), "a 5xx, a timeout or a reset");
        assert!(DestinationError::AlreadyExists {
            location: "x".into()
        }
        .is_refusal());
    }

    #[test]
    fn components_refuse_escapes() {
        assert_eq!(components("a/b/c").unwrap(), vec!["a", "b", "c"]);
        for bad in ["", "/a", "a/", "a//b", "../a", "a/./b", "a/../../b"] {
            assert!(components(bad).is_err(), "{bad:?}");
        }
    }
}
