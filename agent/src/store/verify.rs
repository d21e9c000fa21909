//! Proving a stored set is what its manifest says: `verify` streams every file
//! back and checks size and SHA-256, the snapshot's etcd digest trailer and its
//! snapshot status; `fetch` does the same while writing the files locally,
//! under temporary names until each has passed. A compressed snapshot is
//! decompressed on the way (after decrypting, when also encrypted), so its
//! content gets every check and `fetch` writes the plain `snapshot_<ts>.db`.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use etcd_backup_proto::{FileKind, ManifestFile};

use crate::encryption::Identities;
use crate::source::etcd::SnapshotVerifier;
use crate::store::catalog::CatalogSet;
use crate::store::compressing::Decompressor;
use crate::store::destination::{Destination, DestinationError};

/// What was found for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    /// File name in the set.
    pub name: String,
    /// Bytes read back (as stored).
    pub size: u64,
    /// Whether the file was decrypted and its plaintext checked too.
    pub decrypted: bool,
    /// Whether the file was decompressed and its plaintext checked too.
    pub decompressed: bool,
    /// Everything that differs from the manifest; empty when the file is good.
    pub problems: Vec<String>,
}

impl FileReport {
    /// Whether the file matches its manifest entry.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Why checking could not be completed (as opposed to finding a mismatch).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Reading from the destination failed.
    #[error(transparent)]
    Destination(#[from] DestinationError),
    /// Writing the local copy failed.
    #[error("cannot write {path}: {source}")]
    Local {
        /// The local file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A manifest names a file that is not one of its set's own names; no
    /// file was opened, created or removed for it.
    #[error(transparent)]
    BadName(#[from] etcd_backup_proto::InvalidFileName),
    /// The zstd decompressor could not be set up.
    #[error("{file}: cannot set up zstd to decompress it: {source}")]
    Decompress {
        /// The stored file.
        file: String,
        /// What zstd said.
        source: std::io::Error,
    },
    /// The identity given cannot decrypt the set.
    #[error("{file}: {message}")]
    Identity {
        /// The stored file.
        file: String,
        /// What is wrong and what to do.
        message: String,
    },
}

const READ_CHUNK: usize = 1 << 20;

/// Reads `reader` to its end in chunks, handing each to `each`.
async fn read_all<R: AsyncRead + Unpin>(
    reader: &mut R,
    mut each: impl FnMut(&[u8]) -> Result<(), CheckError>,
) -> Result<(), std::io::Error> {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if let Err(e) = each(&buf[..n]) {
            // Carried out through the io::Error channel and unwrapped by the caller.
            return Err(std::io::Error::other(SinkFailed(Some(e))));
        }
    }
}

/// A sink failure carried through `read_all`'s io::Error.
#[derive(Debug)]
struct SinkFailed(Option<CheckError>);

impl std::fmt::Display for SinkFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sink failed")
    }
}

impl std::error::Error for SinkFailed {}

/// The sink's error, if `e` carries one.
fn sink_error(e: &mut std::io::Error) -> Option<CheckError> {
    e.get_mut()
        .and_then(|inner| inner.downcast_mut::<SinkFailed>())
        .and_then(|s| s.0.take())
}

/// Compares what was read with the manifest's size and SHA-256; `what`
/// prefixes the problems ("decrypted " for a plaintext).
fn compare(
    what: &str,
    size: u64,
    sha: Sha256,
    want_size: u64,
    want_sha256: &str,
    problems: &mut Vec<String>,
) {
    if size != want_size {
        problems.push(format!(
            "{what}size is {size} bytes, the manifest says {want_size}"
        ));
    }
    let actual = hex::encode(sha.finalize());
    if actual != want_sha256 {
        problems.push(format!(
            "{what}sha256 is {actual}, the manifest says {want_sha256}"
        ));
    }
}

/// The checks made on a file's content (the plaintext, when encrypted).
struct ContentChecks {
    sha: Sha256,
    size: u64,
    digest: Option<SnapshotVerifier>,
    status: Option<etcd_backup_bbolt_status::StreamingStatus>,
}

impl ContentChecks {
    fn new(is_snapshot: bool, want_status: bool) -> Self {
        Self {
            sha: Sha256::new(),
            size: 0,
            digest: is_snapshot.then(SnapshotVerifier::new),
            status: (is_snapshot && want_status)
                .then(etcd_backup_bbolt_status::StreamingStatus::new),
        }
    }

    fn update(&mut self, chunk: &[u8]) {
        self.sha.update(chunk);
        self.size += chunk.len() as u64;
        if let Some(d) = self.digest.as_mut() {
            d.update(chunk);
        }
        if let Some(st) = self.status.as_mut() {
            st.update(chunk);
        }
    }

    /// Compares with what the manifest says; `what` prefixes size and hash problems.
    fn finish(
        self,
        what: &str,
        size: u64,
        sha256: &str,
        status: Option<etcd_backup_proto::SnapshotStatus>,
        problems: &mut Vec<String>,
    ) {
        compare(what, self.size, self.sha, size, sha256, problems);
        if let Some(d) = self.digest {
            if let Err(e) = d.finish() {
                problems.push(format!("etcd digest trailer: {e}"));
            }
        }
        if let (Some(st), Some(want)) = (self.status, status) {
            match st.finish() {
                Ok(got) => {
                    if got != want {
                        problems.push(format!(
                            "snapshot status is hash {} revision {} keys {} size {}, the manifest says hash {} revision {} keys {} size {}",
                            got.hash, got.revision, got.total_key, got.total_size, want.hash, want.revision, want.total_key, want.total_size
                        ));
                    }
                }
                Err(e) => problems.push(format!("snapshot status: {e}")),
            }
        }
    }
}

/// A failure inside [`Content::feed`]: the sink's, or zstd's.
enum FeedError {
    Sink(CheckError),
    Zstd(std::io::Error),
}

impl From<std::io::Error> for FeedError {
    fn from(e: std::io::Error) -> Self {
        FeedError::Zstd(e)
    }
}

/// A file's content as it is read: decompressed first when the file is
/// compressed, then checked and handed to the sink.
struct Content {
    checks: ContentChecks,
    decompressor: Option<Decompressor>,
    /// Why decompressing stopped, when the stream was damaged; nothing more
    /// reaches the checks or the sink after that.
    broken: Option<String>,
    /// The plaintext size the manifest records: a compressed stream that
    /// decompresses to more is cut off there, so a small altered file cannot
    /// fill the disk `fetch` writes to.
    limit: u64,
}

impl Content {
    fn new(entry: &ManifestFile, checks: ContentChecks) -> Result<Self, CheckError> {
        let decompressor = match entry.compression {
            None => None,
            Some(etcd_backup_proto::Compression::Zstd) => Some(Decompressor::new().map_err(
                |source| CheckError::Decompress {
                    file: entry.name.clone(),
                    source,
                },
            )?),
        };
        Ok(Self {
            checks,
            decompressor,
            broken: None,
            limit: entry.plaintext.as_ref().map_or(u64::MAX, |p| p.size),
        })
    }

    fn feed(
        &mut self,
        chunk: &[u8],
        sink: &mut impl FnMut(&[u8]) -> Result<(), CheckError>,
    ) -> Result<(), CheckError> {
        if self.broken.is_some() {
            return Ok(());
        }
        let checks = &mut self.checks;
        let Some(d) = self.decompressor.as_mut() else {
            checks.update(chunk);
            return sink(chunk);
        };
        let limit = self.limit;
        let result = d.feed(chunk, |plain| {
            if checks.size + plain.len() as u64 > limit {
                return Err(FeedError::Zstd(std::io::Error::other(format!(
                    "it decompresses to more than the {limit} bytes the manifest records"
                ))));
            }
            checks.update(plain);
            sink(plain).map_err(FeedError::Sink)
        });
        match result {
            Ok(()) => Ok(()),
            Err(FeedError::Sink(e)) => Err(e),
            Err(FeedError::Zstd(e)) => {
                self.broken = Some(format!(
                    "cannot decompress after {} plaintext bytes: {e}",
                    checks.size
                ));
                Ok(())
            }
        }
    }

    /// Adds what is wrong with the content to `problems`: a damaged or
    /// truncated compressed stream, else the content checks' findings.
    fn finish(
        self,
        what: &str,
        size: u64,
        sha256: &str,
        status: Option<etcd_backup_proto::SnapshotStatus>,
        problems: &mut Vec<String>,
    ) {
        if let Some(why) = self.broken {
            problems.push(why);
            return;
        }
        if let Some(d) = &self.decompressor {
            if let Err(e) = d.finish() {
                problems.push(format!("cannot decompress: {e}"));
                return;
            }
        }
        self.checks.finish(what, size, sha256, status, problems);
    }
}

/// How decrypting a file ended.
enum Decrypted {
    /// The whole plaintext was read.
    Done,
    /// The header could not be read or no identity unwrapped its key.
    Header(age::DecryptError),
    /// The payload failed (damaged, truncated, or the read failed).
    Payload(std::io::Error),
    /// The sink failed.
    Sink(CheckError),
}

/// An `AsyncRead` that hashes and counts what passes, and remembers whether
/// the error it passed on came from the destination.
struct Counting<'a, R> {
    inner: R,
    sha: &'a mut Sha256,
    size: &'a mut u64,
    failed: &'a mut bool,
    progress: &'a (dyn Fn(u64) + Sync),
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<'_, R> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        match &r {
            std::task::Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                this.sha.update(new);
                *this.size += new.len() as u64;
                (this.progress)(*this.size);
            }
            std::task::Poll::Ready(Err(_)) => *this.failed = true,
            std::task::Poll::Pending => {}
        }
        r
    }
}

/// A file checked without decrypting: a plain file gets every check; a
/// compressed one is decompressed, and its stored bytes and its plaintext
/// are checked; an encrypted one, without a key, gets its ciphertext's size
/// and hash checked.
async fn check_unencrypted(
    mut reader: Box<dyn AsyncRead + Send + Unpin + '_>,
    set: &CatalogSet,
    entry: &ManifestFile,
    want_status: bool,
    mut sink: impl FnMut(&[u8]) -> Result<(), CheckError>,
    progress: &(dyn Fn(u64) + Sync),
    read_error: &(dyn Fn(std::io::Error) -> CheckError + Sync),
) -> Result<FileReport, CheckError> {
    let is_snapshot = entry.kind == FileKind::Snapshot;
    let mut problems = Vec::new();
    if entry.is_encrypted() || entry.compression.is_none() {
        // The content is the stored bytes (or out of reach without a key).
        let mut checks = ContentChecks::new(is_snapshot && entry.plaintext.is_none(), want_status);
        let result = read_all(&mut reader, |chunk| {
            checks.update(chunk);
            progress(checks.size);
            sink(chunk)
        })
        .await;
        if let Err(mut e) = result {
            return Err(sink_error(&mut e).unwrap_or_else(|| read_error(e)));
        }
        let size = checks.size;
        checks.finish(
            "",
            entry.size,
            &entry.sha256,
            set.manifest.snapshot_status,
            &mut problems,
        );
        return Ok(FileReport {
            name: entry.name.clone(),
            size,
            decrypted: false,
            decompressed: false,
            problems,
        });
    }
    let Some(plain) = entry.plaintext.as_ref() else {
        // The catalog refuses such a manifest; say so rather than guess.
        problems.push("compressed, but the manifest names no plaintext to check".into());
        return Ok(FileReport {
            name: entry.name.clone(),
            size: 0,
            decrypted: false,
            decompressed: false,
            problems,
        });
    };
    let mut stored_sha = Sha256::new();
    let mut stored_size = 0u64;
    let mut content = Content::new(entry, ContentChecks::new(is_snapshot, want_status))?;
    let result = read_all(&mut reader, |chunk| {
        stored_sha.update(chunk);
        stored_size += chunk.len() as u64;
        progress(stored_size);
        content.feed(chunk, &mut sink)
    })
    .await;
    if let Err(mut e) = result {
        return Err(sink_error(&mut e).unwrap_or_else(|| read_error(e)));
    }
    compare(
        "",
        stored_size,
        stored_sha,
        entry.size,
        &entry.sha256,
        &mut problems,
    );
    let mut content_problems = Vec::new();
    content.finish(
        "decompressed ",
        plain.size,
        &plain.sha256,
        set.manifest.snapshot_status,
        &mut content_problems,
    );
    // A damaged stream is worth naming beside a wrong hash; a plaintext
    // mismatch follows from it and is not.
    if problems.is_empty()
        || content_problems
            .iter()
            .any(|p| p.starts_with("cannot decompress"))
    {
        problems.extend(content_problems);
    }
    Ok(FileReport {
        name: entry.name.clone(),
        size: stored_size,
        decrypted: false,
        decompressed: true,
        problems,
    })
}

/// Streams one file of `set` back, checking it against `entry`. Every chunk
/// of content is handed to `sink` (fetch writes it; verify passes a no-op):
/// the plaintext when the file can be turned into it (not encrypted, or
/// `identities` given; decompressed when compressed), else the bytes as
/// stored. `progress` gets the running count of stored bytes read.
///
/// Without identities, an encrypted file's ciphertext size and SHA-256 are
/// checked; with them, it is also decrypted (and decompressed), and the
/// plaintext's size and SHA-256, the etcd digest and the snapshot status are
/// checked. A compressed file that is not encrypted is always decompressed
/// and checked both ways.
///
/// # Errors
/// Read failures of the destination, failures of `sink`, and identities that
/// cannot decrypt the file ([`CheckError::Identity`]).
pub async fn check_file(
    dest: &dyn Destination,
    set: &CatalogSet,
    entry: &ManifestFile,
    identities: Option<&Identities>,
    mut sink: impl FnMut(&[u8]) -> Result<(), CheckError>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<FileReport, CheckError> {
    set.id.timestamp.check_file_name(&entry.name, false)?;
    let path = set.id.file(&entry.name);
    let location = format!("{}/{path}", dest.describe());
    let read_error = |source| {
        CheckError::Destination(DestinationError::Io {
            op: "cannot read",
            location: location.clone(),
            source,
        })
    };
    let want_status = set.manifest.snapshot_status.is_some();
    if let Some(pages) = entry.pages.as_deref() {
        return check_paged(dest, set, entry, pages, identities, sink, progress).await;
    }
    let reader = dest.open(&path).await?;
    let is_snapshot = entry.kind == FileKind::Snapshot;
    let mut problems = Vec::new();

    let (Some(plain), Some(ids)) = (entry.plaintext.as_ref(), identities) else {
        return check_unencrypted(reader, set, entry, want_status, sink, progress, &read_error)
            .await;
    };

    let mut cipher_sha = Sha256::new();
    let mut cipher_size = 0u64;
    let mut read_failed = false;
    let mut content = Content::new(entry, ContentChecks::new(is_snapshot, want_status))?;
    let recipients = set
        .manifest
        .encryption
        .as_ref()
        .map(|e| e.recipients.clone())
        .unwrap_or_default();
    let outcome = {
        let counting = Counting {
            inner: reader,
            sha: &mut cipher_sha,
            size: &mut cipher_size,
            failed: &mut read_failed,
            progress,
        };
        let input = tokio::io::BufReader::with_capacity(READ_CHUNK, counting).compat();
        match age::Decryptor::new_async_buffered(input).await {
            Err(e) => Decrypted::Header(e),
            Ok(decryptor) => match decryptor.decrypt_async(ids.iter()) {
                Err(e) => Decrypted::Header(e),
                Ok(reader) => {
                    let mut plaintext = reader.compat();
                    let result =
                        read_all(&mut plaintext, |chunk| content.feed(chunk, &mut sink)).await;
                    match result {
                        Ok(()) => Decrypted::Done,
                        Err(mut e) => match sink_error(&mut e) {
                            Some(s) => Decrypted::Sink(s),
                            None => Decrypted::Payload(e),
                        },
                    }
                }
            },
        }
    };
    match outcome {
        Decrypted::Done => {}
        Decrypted::Sink(e) => return Err(e),
        Decrypted::Header(age::DecryptError::Io(e)) | Decrypted::Payload(e) if read_failed => {
            return Err(read_error(e));
        }
        Decrypted::Header(
            e @ (age::DecryptError::NoMatchingKeys | age::DecryptError::KeyDecryptionFailed),
        ) => {
            return Err(CheckError::Identity {
                file: entry.name.clone(),
                message: crate::encryption::explain_decrypt_error(&e, ids, &recipients),
            });
        }
        // A damaged header or payload is a finding about the file.
        Decrypted::Header(e) => problems.push(format!("cannot decrypt: {e}")),
        Decrypted::Payload(e) => problems.push(format!(
            "cannot decrypt after {} plaintext bytes: {e}",
            content.checks.size
        )),
    }
    compare(
        "",
        cipher_size,
        cipher_sha,
        entry.size,
        &entry.sha256,
        &mut problems,
    );
    let decompressed = entry.compression.is_some();
    if problems.is_empty() {
        content.finish(
            if decompressed {
                "decrypted and decompressed "
            } else {
                "decrypted "
            },
            plain.size,
            &plain.sha256,
            set.manifest.snapshot_status,
            &mut problems,
        );
    }
    Ok(FileReport {
        name: entry.name.clone(),
        size: cipher_size,
        decrypted: true,
        decompressed,
        problems,
    })
}

/// [`check_file`] for a paged snapshot: rebuilt from its packs and checked
/// as the plain snapshot it must be (size, SHA-256, etcd's digest, status).
async fn check_paged(
    dest: &dyn Destination,
    set: &CatalogSet,
    entry: &ManifestFile,
    pages: &etcd_backup_proto::ManifestPages,
    identities: Option<&Identities>,
    sink: impl FnMut(&[u8]) -> Result<(), CheckError>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<FileReport, CheckError> {
    use crate::store::paged::PagedError;
    let m = &set.manifest;
    let (compressed, encrypted) = (m.compression.is_some(), m.encryption.is_some());
    let reader = match crate::store::paged::reader::open_snapshot(
        dest, &set.id, pages, compressed, encrypted, identities,
    )
    .await
    {
        Ok(r) => r,
        Err(PagedError::Destination(e)) => return Err(e.into()),
        Err(PagedError::Identity { message }) => {
            return Err(CheckError::Identity {
                file: entry.name.clone(),
                message,
            })
        }
        Err(e) => {
            return Ok(FileReport {
                name: entry.name.clone(),
                size: 0,
                decrypted: false,
                decompressed: false,
                problems: vec![e.to_string()],
            })
        }
    };
    let location = format!(
        "{}/{} (the snapshot's pages in {})",
        dest.describe(),
        set.id.file(&entry.name),
        crate::store::paged::packs_dir(&set.id.cluster, &set.id.node)
    );
    let read_error = |source| {
        CheckError::Destination(DestinationError::Io {
            op: "cannot rebuild",
            location: location.clone(),
            source,
        })
    };
    let want_status = m.snapshot_status.is_some();
    let mut report =
        check_unencrypted(reader, set, entry, want_status, sink, progress, &read_error).await?;
    report.decrypted = encrypted;
    report.decompressed = compressed;
    Ok(report)
}

/// Checks a paged snapshot without rebuilding it: its page index and every
/// pack it names, each at its size and checksum (a pack's name is its
/// SHA-256), read back whole, and every record of the index naming a range
/// of a pack the manifest lists. One report for the index, one for the packs.
///
/// # Errors
/// Read failures other than a missing file (reported as a problem).
pub async fn check_packs(
    dest: &dyn Destination,
    set: &CatalogSet,
    pages: &etcd_backup_proto::ManifestPages,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<Vec<FileReport>, CheckError> {
    let mut reports = Vec::new();
    let index = ManifestFile {
        name: pages.index.name.clone(),
        kind: FileKind::Resources,
        size: pages.index.size,
        sha256: pages.index.sha256.clone(),
        compression: None,
        plaintext: None,
        pages: None,
    };
    let index_name = index.name.clone();
    reports.push(
        check_file(dest, set, &index, None, |_| Ok(()), &|n| {
            progress(&index_name, n, pages.index.size)
        })
        .await?,
    );
    if let Err(e) = crate::store::paged::check_manifest_pages(pages, &set.id.dir()) {
        reports.push(FileReport {
            name: "packs".into(),
            size: 0,
            decrypted: false,
            decompressed: false,
            problems: vec![e.to_string()],
        });
        return Ok(reports);
    }
    let dir = crate::store::paged::packs_dir(&set.id.cluster, &set.id.node);
    let listing = dest.list(&dir).await?;
    let total: u64 = pages.packs.iter().map(|p| p.size).sum();
    let mut problems = Vec::new();
    let mut done = 0u64;
    let mut seen = std::collections::HashSet::new();
    for pack in &pages.packs {
        if !seen.insert(pack.name.as_str()) {
            continue;
        }
        let Some(found) = listing.iter().find(|e| e.name == pack.name) else {
            problems.push(format!("pack {} is missing from {dir}", pack.name));
            continue;
        };
        if found.size != pack.size {
            problems.push(format!(
                "pack {} holds {} bytes, the manifest says {}",
                pack.name, found.size, pack.size
            ));
            continue;
        }
        let path = format!("{dir}/{}", pack.name);
        let mut r = dest.open(&path).await?;
        let mut sha = Sha256::new();
        let mut size = 0u64;
        let result = read_all(&mut r, |chunk| {
            sha.update(chunk);
            size += chunk.len() as u64;
            progress("packs", done + size, total);
            Ok(())
        })
        .await;
        if let Err(source) = result {
            return Err(CheckError::Destination(DestinationError::Io {
                op: "cannot read",
                location: format!("{}/{path}", dest.describe()),
                source,
            }));
        }
        done += size;
        let want = pack.name.trim_end_matches(etcd_backup_proto::PACK_SUFFIX);
        let got = hex::encode(sha.finalize());
        if size != pack.size || got != want {
            problems.push(format!(
                "pack {} holds {size} bytes with SHA-256 {got}: not the pack its name says",
                pack.name
            ));
        }
    }
    // Every record of the index (when it is what the manifest says) names
    // a range of a pack the manifest lists.
    if reports[0].problems.is_empty() {
        let index_path = set.id.file(&pages.index.name);
        let checked = match crate::store::paged::download_index(dest, &index_path, pages).await {
            Ok(file) => {
                crate::store::paged::check_index_locations(file, pages, index_path.clone()).await
            }
            Err(e) => Err(e),
        };
        match checked {
            Ok(()) => {}
            Err(crate::store::paged::PagedError::Destination(e)) => return Err(e.into()),
            Err(e) => problems.push(e.to_string()),
        }
    }
    reports.push(FileReport {
        name: format!("{} packs", seen.len()),
        size: done,
        decrypted: false,
        decompressed: false,
        problems,
    });
    Ok(reports)
}

/// Why `set` cannot be restored without a key: it is encrypted and no
/// identities were given. `None` when it can.
pub fn missing_identity(set: &CatalogSet, identities: Option<&Identities>) -> Option<String> {
    match (&set.manifest.encryption, identities) {
        (Some(enc), None) => Some(format!(
            "set {} is encrypted to {}; pass --identity FILE with the private key of one of them (an age identity file or an SSH private key), or set encryption.identity_file",
            set.id.dir(),
            enc.recipients.join(", ")
        )),
        _ => None,
    }
}

/// Why OpenShift's `cluster-restore.sh` cannot take a set's directory as it
/// is. The script needs the snapshot (`snapshot_<ts>.db`) and the
/// static-pod resources of an OpenShift master
/// (`static_kuberesources_<ts>.tar.gz`), both in plain form; given a
/// directory without the tarball, it stops etcd and moves the data directory
/// away before it fails, leaving the node half restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotForRestoreScript {
    /// The set was taken with a layout other than `openshift`.
    #[error("set {set} was taken with resources.layout: {layout} ({what}), so cluster-restore.sh cannot use it: it needs static_kuberesources_*.tar.gz from an OpenShift master (resources.layout: openshift); restore the snapshot with `etcd-backup-agent restore` instead, or pass --snapshot-only to fetch the snapshot alone")]
    Layout {
        /// `<cluster>/<node>/<timestamp>`.
        set: String,
        /// The manifest's `resources_layout`.
        layout: String,
        /// What that layout means for the set.
        what: &'static str,
    },
    /// The manifest names no resources tarball.
    #[error("set {set} lists no static-pod resources tarball in its manifest, so cluster-restore.sh cannot use it: it needs static_kuberesources_*.tar.gz from an OpenShift master; restore the snapshot with `etcd-backup-agent restore` instead, or pass --snapshot-only to fetch the snapshot alone")]
    NoResources {
        /// `<cluster>/<node>/<timestamp>`.
        set: String,
    },
}

/// Whether the files of `set`, once fetched in plain form, make a directory
/// `cluster-restore.sh` accepts: an `openshift` layout with a resources
/// tarball. (Encryption is the other condition; it depends on the key at
/// hand, so the caller checks it.)
///
/// # Errors
/// Why the script cannot use the set.
pub fn restore_script_ready(set: &CatalogSet) -> Result<(), NotForRestoreScript> {
    let layout = set.manifest.resources_layout.as_str();
    if layout != "openshift" {
        let what = match layout {
            "none" => "no static-pod resources",
            "kubeadm" => "kubeadm's manifests and pki, not an OpenShift master's resources",
            _ => "a layout this agent does not know",
        };
        return Err(NotForRestoreScript::Layout {
            set: set.id.dir(),
            layout: layout.to_string(),
            what,
        });
    }
    if set
        .manifest
        .file(etcd_backup_proto::FileKind::Resources)
        .is_none()
    {
        return Err(NotForRestoreScript::NoResources { set: set.id.dir() });
    }
    Ok(())
}

/// The name `fetch` gives a file locally: its plaintext name when it is
/// written in plain form (not encrypted, or decrypted with `decrypting`;
/// decompressed when compressed), else its stored name.
pub fn local_name(entry: &ManifestFile, decrypting: bool) -> &str {
    if decrypting || !entry.is_encrypted() {
        entry.plaintext_name()
    } else {
        &entry.name
    }
}

/// Where `fetch` puts `entry` of `set` in `dir`: only after both its stored
/// and its local name pass the set naming scheme
/// ([`etcd_backup_proto::SetTimestamp::check_file_name`]), whatever the
/// manifest or the server's listing say.
///
/// # Errors
/// [`CheckError::BadName`].
pub fn local_path(
    dir: &Path,
    set: &CatalogSet,
    entry: &ManifestFile,
    decrypting: bool,
) -> Result<PathBuf, CheckError> {
    let ts = set.id.timestamp;
    ts.check_file_name(&entry.name, false)?;
    let name = local_name(entry, decrypting);
    ts.check_file_name(name, false)?;
    Ok(dir.join(name))
}

/// Checks every file of `set`. A paged snapshot's index and packs are
/// checked at their sizes and checksums; with `full`, it is also rebuilt
/// and checked as the snapshot it must be.
///
/// # Errors
/// As [`check_file`].
pub async fn verify_set(
    dest: &dyn Destination,
    set: &CatalogSet,
    identities: Option<&Identities>,
    full: bool,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<Vec<FileReport>, CheckError> {
    let mut reports = Vec::new();
    for entry in &set.manifest.files {
        if let Some(pages) = entry.pages.as_deref() {
            // Rebuilt only with --full, and only when it can be read
            // (an encrypted set without a key gets its packs checked).
            let readable = identities.is_some() || set.manifest.encryption.is_none();
            reports.extend(check_packs(dest, set, pages, progress).await?);
            if !(full && readable) {
                continue;
            }
        }
        let name = entry.name.clone();
        let total = entry.size;
        let report = check_file(dest, set, entry, identities, |_| Ok(()), &|n| {
            progress(&name, n, total)
        })
        .await?;
        reports.push(report);
    }
    Ok(reports)
}

/// Downloads and checks every file of `set` into `dir`. Each file is written as
/// `<name>.partial`, synced, checked, and only then renamed to `<name>`; a file
/// that fails its check is deleted. With `identities`, encrypted files are
/// written decrypted, under their plaintext names (`snapshot_<ts>.db`);
/// without, as stored. A compressed file is written decompressed whenever
/// it can be read (not encrypted, or decrypted). With `only`, just the file of that kind. Returns the
/// reports and the final paths of the files that passed.
///
/// # Errors
/// As [`check_file`].
pub async fn fetch_set(
    dest: &dyn Destination,
    set: &CatalogSet,
    dir: &Path,
    identities: Option<&Identities>,
    only: Option<etcd_backup_proto::FileKind>,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<(Vec<FileReport>, Vec<PathBuf>), CheckError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut reports = Vec::new();
    let mut written = Vec::new();
    let wanted = set
        .manifest
        .files
        .iter()
        .filter(|f| only.is_none_or(|k| f.kind == k));
    for entry in wanted {
        let final_path = local_path(dir, set, entry, identities.is_some())?;
        let local_name = local_name(entry, identities.is_some());
        let partial = dir.join(format!("{local_name}{}", etcd_backup_proto::PARTIAL_SUFFIX));
        let local = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CheckError::Local { path, source }
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .map_err(local(&partial))?;
        let name = entry.name.clone();
        let total = entry.size;
        let result = check_file(
            dest,
            set,
            entry,
            identities,
            |chunk| file.write_all(chunk).map_err(local(&partial)),
            &|n| progress(&name, n, total),
        )
        .await;
        let report = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        if report.ok() {
            file.sync_all().map_err(local(&partial))?;
            drop(file);
            if final_path.exists() {
                std::fs::remove_file(&final_path).map_err(local(&final_path))?;
            }
            std::fs::rename(&partial, &final_path).map_err(local(&final_path))?;
            written.push(final_path);
        } else {
            drop(file);
            let _ = std::fs::remove_file(&partial);
        }
        reports.push(report);
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok((reports, written))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::destination::LocalDir;

    #[tokio::test]
    async fn fetch_refuses_a_manifest_name_outside_the_naming_scheme_before_touching_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        crate::store::catalog::test_sets::write_set(&store, "2026-01-01_000000");
        let dest = LocalDir::open(&store).await.unwrap();
        let good = crate::store::catalog::scan(&dest, "c", None)
            .await
            .unwrap()
            .sets[0]
            .clone();
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(tmp.path().join("victim"), b"keep").unwrap();
        // As if a hostile server had both listed and served these names.
        for bad in [
            "../victim",
            "/etc/passwd",
            "snapshot_2026-01-01_000000.db\0",
            "victim",
        ] {
            let mut set = good.clone();
            set.manifest.files[0].name = bad.to_string();
            let err = fetch_set(&dest, &set, &out, None, None, &|_, _, _| {})
                .await
                .unwrap_err();
            assert!(matches!(err, CheckError::BadName(_)), "{bad:?}: {err}");
            assert!(err.to_string().contains("refusing file name"), "{err}");
            assert!(verify_set(&dest, &set, None, true, &|_, _, _| {})
                .await
                .is_err());
            assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "{bad:?}");
            assert_eq!(std::fs::read(tmp.path().join("victim")).unwrap(), b"keep");
        }
        // An encrypted entry's plaintext name is checked as well.
        let mut set = good.clone();
        set.manifest.files[0].name = "snapshot_2026-01-01_000000.db.age".into();
        set.manifest.files[0].plaintext = Some(etcd_backup_proto::PlaintextFile {
            name: "../victim".into(),
            size: 2,
            sha256: "00".into(),
        });
        let err = local_path(&out, &set, &set.manifest.files[0], true).unwrap_err();
        assert!(matches!(err, CheckError::BadName(_)), "{err}");
    }
}
