//! A bucket (and key prefix) of an S3-compatible object store.
//!
//! The file-like [`Destination`] trait maps onto S3 without renaming big
//! objects on the server (docs/s3.md):
//! - a `X.partial` file is buffered one part at a time; from its first full
//!   part on it is a multipart upload **for the final key X**, whose parts
//!   upload while the next fills. `finish` checks the parts' sizes on the
//!   server but does not complete the upload; a file smaller than one part
//!   is kept in memory instead. Both wait, pending, for the rename.
//! - `rename(X.partial, X)` completes that upload (or puts the small
//!   content), conditionally: an existing `X` is never overwritten. Renaming
//!   an existing object (prune marking a set as being removed) copies it and
//!   deletes the original.
//! - listing shows in-progress uploads for `X` as files `X.partial`, so the
//!   catalog and prune treat a killed run's uploads as its partial files;
//!   deleting `X.partial` aborts them. Such a file is as old as the upload's
//!   newest part (ListParts), not as its start: an upload a run is still
//!   feeding stays young however long it takes, as a growing file does.
//! - [`super::Destination::claim`] starts the manifest's upload before anything
//!   else and refuses a set where anything else is found: two agents never
//!   write the same set.

mod client;
#[cfg(test)]
mod fake_http;
mod sign;
mod xml;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use etcd_backup_proto::{MANIFEST_FILE_NAME, PARTIAL_SUFFIX};
use futures_util::TryStreamExt;
use reqwest::{Method, StatusCode};
use tokio::io::AsyncRead;
use tokio::task::JoinHandle;

use self::client::{Client, Req};
use super::range::Exact;
use super::{components, DestinationError, DirEntry, Durability, Upload};
use crate::config::S3Config;

/// Bytes per part of a multipart upload (S3 wants at least 5 MiB for every
/// part but the last).
pub const PART_SIZE: usize = 5 * 1024 * 1024;

/// Parts of one file uploading at once while the next one fills. A file
/// being written holds at most `PART_SIZE × (PARTS_IN_FLIGHT + 1)` bytes of
/// parts, 10 MiB: part buffers allocated once per file and reused, part
/// after part. A small file (the manifest) holds one buffer of the size of
/// its first write (at least 64 KiB) instead.
pub const PARTS_IN_FLIGHT: usize = 1;

/// S3's limit on the parts of one upload.
const MAX_PARTS: u32 = 10_000;

/// The first buffer of a file; a file that outgrows it moves to a part
/// buffer of [`PART_SIZE`] from its [`PartPool`].
const SMALL_BUFFER: usize = 64 * 1024;

/// One file's part buffers, each of exactly [`PART_SIZE`] bytes, allocated
/// once and reused part after part: a part's buffer comes back when its
/// request is done (the last [`Bytes`] of it dropped). At most
/// `PARTS_IN_FLIGHT + 1` exist (one filling, the rest uploading), so a long
/// file does not allocate and free a part-sized block per part, which glibc
/// serves from the heap once its mmap threshold has risen and which then
/// stays resident, fragmented.
#[derive(Clone, Default)]
struct PartPool(Arc<Mutex<Vec<Vec<u8>>>>);

impl PartPool {
    /// A free part buffer (empty, capacity [`PART_SIZE`]).
    fn take(&self) -> Vec<u8> {
        let reused = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        reused.unwrap_or_else(|| Vec::with_capacity(PART_SIZE))
    }

    /// `buf`'s bytes as the body of a part; the buffer returns to the pool
    /// when the last copy of the [`Bytes`] is dropped.
    fn part(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(PoolBuf {
            buf,
            pool: self.clone(),
        })
    }
}

/// A part buffer on loan from a [`PartPool`].
struct PoolBuf {
    buf: Vec<u8>,
    pool: PartPool,
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut free = self
            .pool
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buf.capacity() == PART_SIZE && free.len() <= PARTS_IN_FLIGHT {
            free.push(buf);
        }
    }
}

/// What a finished `.partial` file is, until its rename.
enum Pending {
    /// Smaller than one part: the bytes, put at the rename.
    Small(Bytes),
    /// A multipart upload for the final key, all parts uploaded.
    Multipart {
        upload_id: String,
        parts: Vec<(u32, String)>,
        /// The bytes written (and found stored in the parts).
        size: u64,
    },
    /// The set's claim: the manifest's multipart upload, started by
    /// [`super::Destination::claim`], no part yet.
    Claimed { upload_id: String },
}

/// Pending files by their `.partial` path.
type PendingMap = Arc<Mutex<HashMap<String, Pending>>>;

/// Stores sets as objects `<prefix>/<cluster>/<node>/<ts>/<file>` of a bucket.
pub struct S3Dir {
    client: Arc<Client>,
    prefix: Option<String>,
    pending: PendingMap,
}

/// Objects and uploads directly below a prefix.
#[derive(Default)]
struct Scan {
    objects: Vec<xml::Object>,
    uploads: Vec<xml::Upload>,
    prefixes: Vec<String>,
    /// When each upload (by id) last took a part, for the uploads that have
    /// any; filled by [`S3Dir::age_uploads`], which a plain scan skips.
    last_part: HashMap<String, std::time::SystemTime>,
}

fn lock(p: &PendingMap) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
    // A panic while holding the lock cannot leave the map half-changed.
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl S3Dir {
    /// Reads the credentials and sets up the client; nothing is sent yet
    /// ([`super::Destination::durability`] is the first request of a run).
    ///
    /// # Errors
    /// Unreadable credential or CA files.
    pub fn new(config: &S3Config) -> Result<Self, DestinationError> {
        Ok(Self {
            client: Arc::new(Client::new(config)?),
            prefix: config.prefix.clone(),
            pending: PendingMap::default(),
        })
    }

    /// The object key of destination path `path`.
    fn key(&self, path: &str) -> Result<String, DestinationError> {
        components(path)?;
        Ok(key_of(self.prefix.as_deref(), path))
    }

    /// The key prefix a listing of `dir` uses (`""` for the bucket's root
    /// without a prefix).
    fn dir_prefix(&self, dir: &str) -> Result<String, DestinationError> {
        if dir.is_empty() {
            return Ok(self
                .prefix
                .as_ref()
                .map(|p| format!("{p}/"))
                .unwrap_or_default());
        }
        Ok(format!("{}/", self.key(dir)?))
    }

    /// Lists objects and in-progress uploads directly below `prefix`.
    async fn scan(&self, prefix: &str) -> Result<Scan, DestinationError> {
        let c = &self.client;
        let mut scan = Scan::default();
        let mut token: Option<String> = None;
        loop {
            let mut req = Req::new("cannot list", Method::GET, None)
                .query("list-type", "2")
                .query("prefix", prefix)
                .query("delimiter", "/");
            if let Some(t) = &token {
                req = req.query("continuation-token", t.clone());
            }
            let text = c.text(&req).await.map_err(|e| at_prefix(e, c, prefix))?;
            let page = xml::list_objects(&text).map_err(|e| c.bad_xml(req.op, Some(prefix), e))?;
            scan.objects.extend(page.objects);
            scan.prefixes.extend(page.prefixes);
            match page.next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let mut marker: Option<(String, String)> = None;
        loop {
            let mut req = Req::new("cannot list uploads below", Method::GET, None)
                .query("uploads", "")
                .query("prefix", prefix)
                .query("delimiter", "/");
            if let Some((k, u)) = &marker {
                req = req.query("key-marker", k.clone());
                if !u.is_empty() {
                    req = req.query("upload-id-marker", u.clone());
                }
            }
            let text = c.text(&req).await.map_err(|e| at_prefix(e, c, prefix))?;
            let page = xml::list_uploads(&text).map_err(|e| c.bad_xml(req.op, Some(prefix), e))?;
            scan.uploads.extend(page.uploads);
            scan.prefixes.extend(page.prefixes);
            match page.next {
                Some(m) if Some(&m) != marker.as_ref() => marker = Some(m),
                _ => break,
            }
        }
        Ok(scan)
    }

    /// Looks up when each upload of `scan` last took a part, and drops the
    /// uploads that are gone by the time it asks (completed or aborted since
    /// the listing). An upload is aged by its newest part, not its start,
    /// so prune never takes a live one for a dead one: a run streaming a
    /// large snapshot over a slow link adds a part every few seconds.
    ///
    /// # Errors
    /// Request failures: a listing that cannot say how old an upload is
    /// fails, rather than show it older than it may be.
    async fn age_uploads(&self, scan: &mut Scan) -> Result<(), DestinationError> {
        let mut gone = Vec::new();
        for u in &scan.uploads {
            match upload_parts(&self.client, &u.key, &u.upload_id).await? {
                None => gone.push(u.upload_id.clone()),
                Some(Parts {
                    newest: Some(t), ..
                }) => {
                    scan.last_part.insert(u.upload_id.clone(), t);
                }
                Some(_) => {}
            }
        }
        scan.uploads.retain(|u| !gone.contains(&u.upload_id));
        Ok(())
    }

    /// In-progress uploads whose key is exactly `key`.
    async fn uploads_of(&self, key: &str) -> Result<Vec<String>, DestinationError> {
        let c = &self.client;
        let mut ids = Vec::new();
        let mut marker: Option<(String, String)> = None;
        loop {
            let mut req = Req::new("cannot list uploads of", Method::GET, None)
                .query("uploads", "")
                .query("prefix", key);
            if let Some((k, u)) = &marker {
                req = req.query("key-marker", k.clone());
                if !u.is_empty() {
                    req = req.query("upload-id-marker", u.clone());
                }
            }
            let text = c.text(&req).await.map_err(|e| at_prefix(e, c, key))?;
            let page = xml::list_uploads(&text).map_err(|e| c.bad_xml(req.op, Some(key), e))?;
            ids.extend(
                page.uploads
                    .into_iter()
                    .filter(|u| u.key == key)
                    .map(|u| u.upload_id),
            );
            match page.next {
                Some(m) if Some(&m) != marker.as_ref() => marker = Some(m),
                _ => break,
            }
        }
        Ok(ids)
    }

    /// Whether object `key` exists.
    async fn exists(&self, key: &str) -> Result<bool, DestinationError> {
        Ok(self.stored_size(key).await?.is_some())
    }

    /// The size of object `key`, `None` when it does not exist.
    async fn stored_size(&self, key: &str) -> Result<Option<u64>, DestinationError> {
        let req = Req::new("cannot check", Method::HEAD, Some(key));
        match self.client.send(&req).await {
            Ok(r) => Ok(Some(
                r.headers()
                    .get(reqwest::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )),
            Err(f) if f.is(StatusCode::NOT_FOUND) => Ok(None),
            Err(f) => Err(self.client.error(req.op, Some(key), f)),
        }
    }

    /// The ETag (unquoted) and size of object `key`, `None` when it does
    /// not exist.
    async fn head(&self, key: &str) -> Result<Option<(String, u64)>, DestinationError> {
        let req = Req::new("cannot check", Method::HEAD, Some(key));
        match self.client.send(&req).await {
            Ok(r) => {
                let h = r.headers();
                let etag = h
                    .get(reqwest::header::ETAG)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .trim_matches('"')
                    .to_string();
                let size = h
                    .get(reqwest::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                Ok(Some((etag, size)))
            }
            Err(f) if f.is(StatusCode::NOT_FOUND) => Ok(None),
            Err(f) => Err(self.client.error(req.op, Some(key), f)),
        }
    }

    /// A conditional create of `key` (a PUT with `If-None-Match: *`, or a
    /// multipart completion), never sent again blind: after an attempt
    /// without a definite answer (a timeout, a dropped connection, a 5xx,
    /// a 412 or NoSuchUpload that a lost first attempt may have caused) a
    /// HEAD of the key says what happened. The object with this create's
    /// ETag is this create's: done. Another object is someone else's:
    /// [`DestinationError::AlreadyExists`]. No object: sent again, at most
    /// `retry.attempts` times in all. When even the HEAD fails, the error
    /// stays ambiguous (transient) for the caller to look again.
    async fn create_checked<F, Fut>(
        &self,
        key: &str,
        ours: &Ours,
        send: F,
    ) -> Result<(), DestinationError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), Conditional>>,
    {
        let c = &self.client;
        let attempts = c.attempts().max(1);
        let mut attempt = 1;
        loop {
            let error = match send().await {
                Ok(()) => return Ok(()),
                Err(Conditional::Failed(e)) if e.is_refusal() => return Err(e),
                Err(Conditional::Exists) => DestinationError::AlreadyExists {
                    location: c.location(Some(key)),
                },
                Err(Conditional::Gone(e) | Conditional::Failed(e)) => e,
            };
            let found = match self.head(key).await {
                Ok(found) => found,
                Err(head) => {
                    tracing::warn!(key, error = %error, head = %head, "a conditional create got no definite answer, and the object cannot be looked at");
                    return Err(ambiguous(error));
                }
            };
            match found {
                Some((etag, size)) if ours.matches(&etag, size) => {
                    tracing::warn!(key, error = %error, etag, "a conditional create got no definite answer; looked: the object is in place with this upload's ETag, so it was carried out");
                    return Ok(());
                }
                Some((etag, _)) => {
                    tracing::warn!(key, etag, expected = ?ours.etag, "the key holds another object than this upload's");
                    return Err(DestinationError::AlreadyExists {
                        location: c.location(Some(key)),
                    });
                }
                None if matches!(error, DestinationError::AlreadyExists { .. }) => {
                    // 412, yet nothing there: deleted meanwhile; try again.
                }
                None if error.is_refusal() => return Err(error),
                None => {}
            }
            if attempt >= attempts {
                return Err(ambiguous(error));
            }
            let delay = c.backoff(attempt);
            tracing::warn!(key, attempt, of = attempts, error = %error, "looked: the object is not there; sending the create again");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// Makes `pending` the object `key`, unless `key` exists.
    async fn publish(&self, key: &str, pending: Pending) -> Result<(), DestinationError> {
        let c = &self.client;
        let exists = || DestinationError::AlreadyExists {
            location: c.location(Some(key)),
        };
        if self.exists(key).await? {
            if let Pending::Multipart { upload_id, .. } | Pending::Claimed { upload_id } = &pending
            {
                abort(c, key, upload_id).await;
            }
            return Err(exists());
        }
        match pending {
            Pending::Small(bytes) => {
                let ours = Ours {
                    etag: Some(format!("{:x}", md5::compute(&bytes))),
                    size: bytes.len() as u64,
                };
                self.create_checked(key, &ours, || put(c, key, bytes.clone()))
                    .await
            }
            Pending::Multipart {
                upload_id,
                parts,
                size,
            } => {
                let ours = Ours {
                    etag: multipart_etag(&parts),
                    size,
                };
                let done = self
                    .create_checked(key, &ours, || complete(c, key, &upload_id, &parts))
                    .await;
                if matches!(done, Err(DestinationError::AlreadyExists { .. })) {
                    abort(c, key, &upload_id).await;
                }
                done
            }
            Pending::Claimed { upload_id } => {
                abort(c, key, &upload_id).await;
                Err(DestinationError::S3 {
                    op: "cannot complete",
                    location: c.location(Some(key)),
                    detail: "nothing was written to it".into(),
                    transient: false,
                })
            }
        }
    }
}

/// `<prefix>/<path>`, or `path` without a prefix.
/// The error for a missing object, as a missing file is one.
fn no_such_object(location: &str) -> DestinationError {
    DestinationError::Io {
        op: "cannot open",
        location: location.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such object"),
    }
}

fn out_of_range(location: &str, offset: u64, len: u64, size: u64) -> DestinationError {
    DestinationError::OutOfRange {
        location: location.to_string(),
        offset,
        len,
        size,
    }
}

/// `bytes FIRST-LAST/SIZE` (SIZE may be `*`, unknown).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let (range, size) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let size = match size {
        "*" => None,
        s => Some(s.parse().ok()?),
    };
    Some((first.parse().ok()?, last.parse().ok()?, size))
}

fn key_of(prefix: Option<&str>, path: &str) -> String {
    match prefix {
        Some(p) => format!("{p}/{path}"),
        None => path.to_string(),
    }
}

/// Names the listed prefix in a listing's error.
fn at_prefix(e: DestinationError, c: &Client, prefix: &str) -> DestinationError {
    match e {
        DestinationError::S3 {
            op,
            detail,
            transient,
            ..
        } => DestinationError::S3 {
            op,
            location: c.location(Some(prefix)),
            detail,
            transient,
        },
        e => e,
    }
}

/// What a conditional create of this run stores, to recognise it by.
struct Ours {
    /// The ETag S3 gives it, when it can be known (MD5-based ETags).
    etag: Option<String>,
    /// Its size.
    size: u64,
}

impl Ours {
    /// Whether an object with `etag` and `size` is this create's.
    fn matches(&self, etag: &str, size: u64) -> bool {
        match &self.etag {
            Some(e) => e.eq_ignore_ascii_case(etag) && size == self.size,
            // Without a known ETag, a size alone proves nothing.
            None => false,
        }
    }
}

/// The ETag S3 gives the object a multipart upload completes into: the MD5
/// of the parts' binary MD5s (their ETags as the uploads answered), then
/// `-N`. `None` when a part's ETag is not an MD5 (SSE-KMS).
fn multipart_etag(parts: &[(u32, String)]) -> Option<String> {
    let mut md5 = md5::Context::new();
    for (_, etag) in parts {
        let digest = hex::decode(etag.trim_matches('"')).ok()?;
        if digest.len() != 16 {
            return None;
        }
        md5.consume(&digest);
    }
    Some(format!("{:x}-{}", md5.finalize(), parts.len()))
}

/// `e` marked as not a refusal: a create whose outcome is unknown.
fn ambiguous(e: DestinationError) -> DestinationError {
    match e {
        DestinationError::S3 {
            op,
            location,
            detail,
            ..
        } => DestinationError::S3 {
            op,
            location,
            detail: format!("{detail}; it may have been carried out all the same"),
            transient: true,
        },
        DestinationError::AlreadyExists { location } => DestinationError::S3 {
            op: "cannot create",
            location,
            detail: "the store answered 412 (it exists), yet nothing could be found there".into(),
            transient: true,
        },
        e => e,
    }
}

/// A conditional create's outcome besides success.
enum Conditional {
    /// The key exists (412): nothing was overwritten.
    Exists,
    /// The upload is gone (NoSuchUpload): completed or aborted already.
    Gone(DestinationError),
    /// Anything else.
    Failed(DestinationError),
}

async fn put(c: &Client, key: &str, bytes: Bytes) -> Result<(), Conditional> {
    let mut req = Req::new("cannot store", Method::PUT, Some(key))
        .header("if-none-match", "*")
        .body(bytes);
    if let Some(class) = c.storage_class() {
        req = req.header("x-amz-storage-class", class);
    }
    match c.send_once_only(&req).await {
        Ok(_) => Ok(()),
        Err(f) if f.is(StatusCode::PRECONDITION_FAILED) => Err(Conditional::Exists),
        Err(f) => Err(Conditional::Failed(c.error(req.op, Some(key), f))),
    }
}

async fn complete(
    c: &Client,
    key: &str,
    upload_id: &str,
    parts: &[(u32, String)],
) -> Result<(), Conditional> {
    let req = Req::new("cannot complete the upload of", Method::POST, Some(key))
        .query("uploadId", upload_id)
        .header("if-none-match", "*")
        .header("content-type", "application/xml")
        .body(xml::complete_body(parts))
        .idle_only();
    let text = match c.send_text_once_only(&req).await {
        Ok(t) => t,
        Err(f) if f.is(StatusCode::PRECONDITION_FAILED) => return Err(Conditional::Exists),
        Err(f) if f.code_is("NoSuchUpload") => {
            return Err(Conditional::Gone(c.error(req.op, Some(key), f)))
        }
        Err(f) => return Err(Conditional::Failed(c.error(req.op, Some(key), f))),
    };
    // A 200 answer may still carry an error.
    match xml::expect_root(&text, "CompleteMultipartUploadResult") {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.code == "PreconditionFailed" => Err(Conditional::Exists),
        Ok(Err(e)) => {
            let transient = matches!(e.code.as_str(), "InternalError" | "SlowDown");
            Err(Conditional::Failed(DestinationError::S3 {
                op: req.op,
                location: c.location(Some(key)),
                detail: format!("{}: {}", e.code, e.message),
                transient,
            }))
        }
        Err(e) => Err(Conditional::Failed(c.bad_xml(req.op, Some(key), e))),
    }
}

/// Aborts an upload, logging a failure (prune finds what is left).
async fn abort(c: &Client, key: &str, upload_id: &str) {
    if let Err(e) = try_abort(c, key, upload_id).await {
        tracing::warn!(error = %e, "could not abort a multipart upload; prune aborts it once stale");
    }
}

async fn try_abort(c: &Client, key: &str, upload_id: &str) -> Result<(), DestinationError> {
    let req = Req::new("cannot abort the upload of", Method::DELETE, Some(key))
        .query("uploadId", upload_id);
    match c.send(&req).await {
        Ok(_) => Ok(()),
        Err(f) if f.is(StatusCode::NOT_FOUND) => Ok(()),
        Err(f) => Err(c.error(req.op, Some(key), f)),
    }
}

async fn create_upload(c: &Client, key: &str) -> Result<String, DestinationError> {
    let mut req =
        Req::new("cannot start the upload of", Method::POST, Some(key)).query("uploads", "");
    if let Some(class) = c.storage_class() {
        req = req.header("x-amz-storage-class", class);
    }
    let text = c.text(&req).await?;
    xml::upload_id(&text).map_err(|e| c.bad_xml(req.op, Some(key), e))
}

async fn upload_part(
    c: Arc<Client>,
    key: String,
    upload_id: String,
    number: u32,
    bytes: Bytes,
) -> Result<(u32, String), DestinationError> {
    let req = Req::new("cannot upload a part of", Method::PUT, Some(&key))
        .query("partNumber", number.to_string())
        .query("uploadId", upload_id)
        .body(bytes);
    let resp = c
        .send(&req)
        .await
        .map_err(|f| c.error(req.op, Some(&key), f))?;
    let etag = resp
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| DestinationError::S3 {
            op: req.op,
            location: c.location(Some(&key)),
            detail: "the answer has no ETag".into(),
            transient: false,
        })?;
    Ok((number, etag))
}

/// What ListParts says of an upload, every page read.
struct Parts {
    /// The sum of the part sizes the server stores.
    size: u64,
    /// When the newest part was uploaded (`None`: no part yet).
    newest: Option<std::time::SystemTime>,
}

/// Reads every page of ListParts for an upload; `None` when the store
/// answers NoSuchUpload (it was completed or aborted since).
async fn upload_parts(
    c: &Client,
    key: &str,
    upload_id: &str,
) -> Result<Option<Parts>, DestinationError> {
    let mut parts = Parts {
        size: 0,
        newest: None,
    };
    let mut marker: Option<String> = None;
    loop {
        let mut req = Req::new("cannot list the parts of", Method::GET, Some(key))
            .query("uploadId", upload_id);
        if let Some(m) = &marker {
            req = req.query("part-number-marker", m.clone());
        }
        let text = match c.send_text(&req).await {
            Ok(t) => t,
            Err(f) if f.code_is("NoSuchUpload") => return Ok(None),
            Err(f) => return Err(c.error(req.op, Some(key), f)),
        };
        let page = xml::list_parts(&text).map_err(|e| c.bad_xml(req.op, Some(key), e))?;
        parts.size += page.parts.iter().map(|(_, s)| s).sum::<u64>();
        parts.newest = parts.newest.max(page.newest);
        match page.next {
            Some(m) if Some(&m) != marker.as_ref() => marker = Some(m),
            _ => break,
        }
    }
    Ok(Some(parts))
}

/// The sum of the part sizes the server stores for an upload this run is
/// finishing; an upload that is gone is an error.
async fn stored_size(c: &Client, key: &str, upload_id: &str) -> Result<u64, DestinationError> {
    match upload_parts(c, key, upload_id).await? {
        Some(parts) => Ok(parts.size),
        None => Err(DestinationError::S3 {
            op: "cannot list the parts of",
            location: c.location(Some(key)),
            detail: format!("the store has no upload {upload_id} (NoSuchUpload): it was completed or aborted by someone else while this run wrote it"),
            transient: false,
        }),
    }
}

#[async_trait]
impl super::Destination for S3Dir {
    fn describe(&self) -> String {
        self.client.describe().to_string()
    }

    async fn create(&self, path: &str) -> Result<Box<dyn Upload>, DestinationError> {
        let final_path = path.strip_suffix(PARTIAL_SUFFIX);
        let key = self.key(final_path.unwrap_or(path))?;
        let claimed = match lock(&self.pending).remove(path) {
            Some(Pending::Claimed { upload_id }) => Some(upload_id),
            Some(other) => {
                lock(&self.pending).insert(path.to_string(), other);
                return Err(DestinationError::AlreadyExists {
                    location: self.client.location(Some(&key)),
                });
            }
            None => None,
        };
        Ok(Box::new(S3Upload {
            dest: S3Dir {
                client: self.client.clone(),
                prefix: self.prefix.clone(),
                pending: self.pending.clone(),
            },
            path: path.to_string(),
            partial: final_path.is_some(),
            key,
            buf: Vec::new(),
            pool: PartPool::default(),
            upload_id: claimed.clone(),
            claimed: claimed.is_some(),
            next_part: 1,
            in_flight: std::collections::VecDeque::new(),
            parts: Vec::new(),
            written: 0,
            done: false,
        }))
    }

    async fn rename(&self, from: &str, to: &str) -> Result<(), DestinationError> {
        let to_key = self.key(to)?;
        let from_key = self.key(from)?;
        let pending = lock(&self.pending).remove(from);
        if let Some(pending) = pending {
            if from.strip_suffix(PARTIAL_SUFFIX) != Some(to) {
                // The upload was started for `from` without its suffix.
                lock(&self.pending).insert(from.to_string(), pending);
                return Err(DestinationError::BadPath {
                    path: format!("{from} -> {to}"),
                });
            }
            return self.publish(&to_key, pending).await;
        }
        // An existing object: copy, then delete the original.
        let c = &self.client;
        if !self.exists(&from_key).await? {
            return Err(DestinationError::Io {
                op: "cannot rename",
                location: c.location(Some(&from_key)),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such object"),
            });
        }
        if self.exists(&to_key).await? {
            return Err(DestinationError::AlreadyExists {
                location: c.location(Some(&to_key)),
            });
        }
        let source = format!("/{}/{}", c.bucket(), sign::uri_encode(&from_key, true));
        let mut req = Req::new("cannot copy into", Method::PUT, Some(&to_key))
            .header("x-amz-copy-source", source)
            .header("if-none-match", "*");
        if let Some(class) = c.storage_class() {
            req = req.header("x-amz-storage-class", class);
        }
        let text = match c.send_text(&req).await {
            Ok(t) => t,
            Err(f) if f.is(StatusCode::PRECONDITION_FAILED) => {
                return Err(DestinationError::AlreadyExists {
                    location: c.location(Some(&to_key)),
                })
            }
            Err(f) => return Err(c.error(req.op, Some(&to_key), f)),
        };
        match xml::expect_root(&text, "CopyObjectResult") {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(DestinationError::S3 {
                    op: req.op,
                    location: c.location(Some(&to_key)),
                    detail: format!("{}: {}", e.code, e.message),
                    transient: matches!(e.code.as_str(), "InternalError" | "SlowDown"),
                })
            }
            Err(e) => return Err(c.bad_xml(req.op, Some(&to_key), e)),
        }
        delete_object(c, &from_key).await
    }

    async fn list(&self, dir: &str) -> Result<Vec<DirEntry>, DestinationError> {
        let prefix = self.dir_prefix(dir)?;
        let mut scan = self.scan(&prefix).await?;
        self.age_uploads(&mut scan).await?;
        Ok(entries(&prefix, scan))
    }

    async fn open(
        &self,
        path: &str,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError> {
        let key = self.key(path)?;
        let c = &self.client;
        let req = Req::new("cannot read", Method::GET, Some(&key));
        let resp = match c.send(&req).await {
            Ok(r) => r,
            Err(f) if f.is(StatusCode::NOT_FOUND) => {
                return Err(DestinationError::Io {
                    op: "cannot open",
                    location: c.location(Some(&key)),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such object"),
                })
            }
            Err(f) => return Err(c.error(req.op, Some(&key), f)),
        };
        let stream = resp.bytes_stream().map_err(std::io::Error::other);
        Ok(Box::new(tokio_util::io::StreamReader::new(stream)))
    }

    async fn open_range(
        &self,
        path: &str,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError> {
        let key = self.key(path)?;
        let c = &self.client;
        let location = c.location(Some(&key));
        let end = match offset.checked_add(len) {
            // No byte range names zero bytes (nor bytes past u64): a HEAD
            // says whether the object is there and long enough.
            Some(end) if len > 0 => end,
            _ => {
                let size = self
                    .stored_size(&key)
                    .await?
                    .ok_or_else(|| no_such_object(&location))?;
                if offset.checked_add(len).is_some_and(|end| end <= size) {
                    return Ok(Box::new(tokio::io::empty()));
                }
                return Err(out_of_range(&location, offset, len, size));
            }
        };
        let req = Req::new("cannot read", Method::GET, Some(&key))
            .header("range", format!("bytes={offset}-{}", end - 1));
        let resp = match c.send(&req).await {
            Ok(r) => r,
            Err(f) if f.is(StatusCode::NOT_FOUND) => return Err(no_such_object(&location)),
            // The object ends before `offset`; its size, for the message.
            Err(f) if f.is(StatusCode::RANGE_NOT_SATISFIABLE) => {
                let size = self
                    .stored_size(&key)
                    .await?
                    .ok_or_else(|| no_such_object(&location))?;
                return Err(out_of_range(&location, offset, len, size));
            }
            Err(f) => return Err(c.error(req.op, Some(&key), f)),
        };
        let header = |name| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_range = header(reqwest::header::CONTENT_RANGE);
        let length = header(reqwest::header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        let bad_answer = |detail: String| DestinationError::S3 {
            op: "cannot read",
            location: location.clone(),
            detail,
            transient: false,
        };
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let parsed = content_range.as_deref().and_then(parse_content_range);
                match parsed {
                    Some((first, last, _)) if (first, last) == (offset, end - 1) => {}
                    // The object ends inside the range: the store sent what
                    // there is.
                    Some((first, _, Some(size))) if first == offset && size < end => {
                        return Err(out_of_range(&location, offset, len, size))
                    }
                    _ => {
                        return Err(bad_answer(format!(
                            "asked for bytes {offset}-{}, the store answered 206 with Content-Range {:?}; is this endpoint an S3-compatible store?",
                            end - 1,
                            content_range.as_deref().unwrap_or("(none)")
                        )))
                    }
                }
                if length.is_some_and(|l| l != len) {
                    return Err(bad_answer(format!(
                        "asked for {len} bytes, the store answered 206 with Content-Length {}",
                        length.unwrap_or_default()
                    )));
                }
            }
            // A store that ignores `Range` sends the whole object: right
            // only when that is the range.
            _ => match length {
                Some(size) if size < end => return Err(out_of_range(&location, offset, len, size)),
                Some(size) if offset == 0 && size == len => {}
                _ => {
                    return Err(bad_answer(format!(
                        "asked for bytes {offset}-{}, the store answered {} with the whole object: it ignores the Range header, which ranged reads need (every S3 API honours it)",
                        end - 1,
                        resp.status()
                    )))
                }
            },
        }
        let stream = resp.bytes_stream().map_err(std::io::Error::other);
        Ok(Box::new(Exact::new(
            tokio_util::io::StreamReader::new(stream),
            location,
            offset,
            len,
        )))
    }

    async fn delete(&self, path: &str) -> Result<(), DestinationError> {
        let key = self.key(path)?;
        let c = &self.client;
        delete_object(c, &key).await?;
        if let Some(final_path) = path.strip_suffix(PARTIAL_SUFFIX) {
            let final_key = self.key(final_path)?;
            let dropped = lock(&self.pending).remove(path);
            if let Some(Pending::Multipart { upload_id, .. } | Pending::Claimed { upload_id }) =
                dropped
            {
                try_abort(c, &final_key, &upload_id).await?;
            }
            for id in self.uploads_of(&final_key).await? {
                try_abort(c, &final_key, &id).await?;
            }
        }
        Ok(())
    }

    async fn remove_dir(&self, _path: &str) -> Result<(), DestinationError> {
        // S3 has no directories: a prefix exists while objects below it do.
        Ok(())
    }

    async fn durability(&self) -> Result<Durability, DestinationError> {
        // A one-key listing below the prefix, not HeadBucket: a bucket policy
        // that allows listing only below the prefix (docs/s3.md) denies
        // HeadBucket, and a listing's error body says what is wrong.
        let c = &self.client;
        let prefix = self.dir_prefix("")?;
        let req = Req::new("cannot use", Method::GET, None)
            .query("list-type", "2")
            .query("prefix", prefix.clone())
            .query("max-keys", "1");
        match c.send_text(&req).await {
            Ok(_) => Ok(Durability::Synced),
            Err(f) => {
                let (k, b, e) = (c.key_id(), c.bucket(), c.endpoint());
                let detail = if f.code_is("NoSuchBucket") || f.is(StatusCode::NOT_FOUND) {
                    format!("bucket {b} does not exist at {e} (access key id {k}): create it or fix destination.s3.bucket")
                } else if f.code_is("InvalidAccessKeyId") || f.detail.contains("No such key") {
                    format!("access key id {k} is not known at {e} ({}): check destination.s3.access_key_id_file", f.detail)
                } else if f.code_is("SignatureDoesNotMatch")
                    || f.detail.to_ascii_lowercase().contains("signature")
                {
                    format!("the secret access key of access key id {k} is wrong ({}): check destination.s3.secret_access_key_file", f.detail)
                } else if f.is(StatusCode::FORBIDDEN) {
                    format!("access key id {k} is not allowed to use bucket {b} at {e} ({}): check the key and the bucket policy (docs/s3.md)", f.detail)
                } else {
                    return Err(c.error(req.op, Some(&prefix), f));
                };
                Err(DestinationError::S3 {
                    op: req.op,
                    location: format!("s3://{b}/{prefix}"),
                    detail,
                    transient: false,
                })
            }
        }
    }

    async fn claim(&self, dir: &str) -> Result<(), DestinationError> {
        let c = &self.client;
        let manifest_path = format!("{dir}/{MANIFEST_FILE_NAME}");
        let key = self.key(&manifest_path)?;
        let upload_id = create_upload(c, &key).await?;
        let partial = format!("{manifest_path}{PARTIAL_SUFFIX}");
        lock(&self.pending).insert(
            partial.clone(),
            Pending::Claimed {
                upload_id: upload_id.clone(),
            },
        );
        let refuse = |why: String| {
            tracing::warn!(set = dir, "{why}");
            DestinationError::AlreadyExists {
                location: c.location(Some(&self.dir_prefix(dir).unwrap_or_default())),
            }
        };
        let give_up = |e: DestinationError| async {
            lock(&self.pending).remove(&partial);
            abort(c, &key, &upload_id).await;
            e
        };
        let prefix = self.dir_prefix(dir)?;
        let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
        loop {
            let scan = match self.scan(&prefix).await {
                Ok(s) => s,
                Err(e) => return Err(give_up(e).await),
            };
            match contest(&scan, &key, &upload_id) {
                Contest::Alone => return Ok(()),
                Contest::Taken(others) => {
                    return Err(give_up(refuse(format!(
                        "the set already holds {others} other object(s) or upload(s): another agent is writing it, or something is there"
                    )))
                    .await)
                }
                Contest::Lost => {
                    return Err(give_up(refuse(
                        "another agent claimed the same set at the same moment and goes first".into(),
                    ))
                    .await)
                }
                Contest::Won if tokio::time::Instant::now() < deadline => {
                    // The other claimants see this claim first in the same
                    // order and give theirs up; wait for that.
                    tokio::time::sleep(CLAIM_POLL).await;
                }
                Contest::Won => {
                    return Err(give_up(refuse(
                        "another agent's claim on the same set stayed: it is writing the set".into(),
                    ))
                    .await)
                }
            }
        }
    }
}

/// How long a claim that goes first in a tie waits for the others to give
/// theirs up, and how often it looks.
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
const CLAIM_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// What a set's listing says about this run's claim on it.
#[derive(Debug, PartialEq, Eq)]
enum Contest {
    /// Only this claim: the set is this run's.
    Alone,
    /// Objects, directories or other uploads than claims are there.
    Taken(usize),
    /// Other claims too, and one of them goes first.
    Lost,
    /// Other claims too, but this one goes first: wait until they are gone.
    Won,
}

/// Claims are the manifest's uploads; among several, the smallest upload id
/// goes first: every claimant sees the same ids, so they agree. A claim is
/// only ever kept when it is [`Contest::Alone`], so a claimant that saw no
/// other claim and one that goes first by id can never both keep theirs.
fn contest(scan: &Scan, manifest_key: &str, upload_id: &str) -> Contest {
    let others: Vec<&xml::Upload> = scan
        .uploads
        .iter()
        .filter(|u| u.upload_id != upload_id)
        .collect();
    let foreign = scan.objects.len()
        + scan.prefixes.len()
        + others.iter().filter(|u| u.key != manifest_key).count();
    if foreign > 0 {
        return Contest::Taken(foreign);
    }
    if others.is_empty() {
        Contest::Alone
    } else if others.iter().any(|u| u.upload_id.as_str() < upload_id) {
        Contest::Lost
    } else {
        Contest::Won
    }
}

async fn delete_object(c: &Client, key: &str) -> Result<(), DestinationError> {
    let req = Req::new("cannot delete", Method::DELETE, Some(key));
    match c.send(&req).await {
        Ok(_) => Ok(()),
        Err(f) if f.is(StatusCode::NOT_FOUND) => Ok(()),
        Err(f) => Err(c.error(req.op, Some(key), f)),
    }
}

/// A listing of `prefix` as directory entries: common prefixes are
/// directories, objects files, and an in-progress upload for `X` the file
/// `X.partial` (size 0, modified when it last took a part, or when it
/// started if it has none yet) unless an object of that name exists.
fn entries(prefix: &str, scan: Scan) -> Vec<DirEntry> {
    // The one-component name of `key` directly below `prefix`, if it is one.
    let child = |key: &str| -> Option<String> {
        key.strip_prefix(prefix)
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .map(str::to_string)
    };
    let mut by_name: std::collections::BTreeMap<String, DirEntry> = Default::default();
    for p in scan.prefixes {
        let Some(name) = p.strip_suffix('/').and_then(child) else {
            continue;
        };
        by_name.insert(
            name.clone(),
            DirEntry {
                name,
                is_dir: true,
                is_file: false,
                size: 0,
                modified: None,
            },
        );
    }
    for o in scan.objects {
        let Some(name) = child(&o.key) else {
            continue;
        };
        by_name.insert(
            name.clone(),
            DirEntry {
                name,
                is_dir: false,
                is_file: true,
                size: o.size,
                modified: o.last_modified,
            },
        );
    }
    for u in scan.uploads {
        let Some(name) = child(&u.key) else {
            continue;
        };
        let name = format!("{name}{PARTIAL_SUFFIX}");
        let active = u.initiated.max(scan.last_part.get(&u.upload_id).copied());
        match by_name.get_mut(&name) {
            Some(e) if !e.is_file || e.size > 0 => {}
            // Several uploads for one key: the latest activity counts.
            Some(e) => e.modified = e.modified.max(active),
            None => {
                by_name.insert(
                    name.clone(),
                    DirEntry {
                        name,
                        is_dir: false,
                        is_file: true,
                        size: 0,
                        modified: active,
                    },
                );
            }
        }
    }
    by_name.into_values().collect()
}

/// A file being written: parts upload in the background while the next
/// fills, at most [`PARTS_IN_FLIGHT`] at once.
struct S3Upload {
    dest: S3Dir,
    /// The path as created (`X.partial`, usually).
    path: String,
    /// Whether `path` is a `.partial` name, published by its rename.
    partial: bool,
    /// The final key.
    key: String,
    /// The part filling: a small buffer first, then one from `pool`.
    buf: Vec<u8>,
    pool: PartPool,
    upload_id: Option<String>,
    /// Whether the upload is the set's claim (the manifest's).
    claimed: bool,
    next_part: u32,
    in_flight: std::collections::VecDeque<JoinHandle<Result<(u32, String), DestinationError>>>,
    parts: Vec<(u32, String)>,
    written: u64,
    /// Finished, or its upload handed on: nothing to abort on drop.
    done: bool,
}

impl S3Upload {
    /// Sends the buffer as the next part, waiting first while
    /// [`PARTS_IN_FLIGHT`] are uploading.
    async fn send_part(&mut self) -> Result<(), DestinationError> {
        let c = self.dest.client.clone();
        let upload_id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let id = create_upload(&c, &self.key).await?;
                self.upload_id = Some(id.clone());
                id
            }
        };
        if self.next_part > MAX_PARTS {
            return Err(DestinationError::S3 {
                op: "cannot upload a part of",
                location: c.location(Some(&self.key)),
                detail: format!(
                    "the file is larger than S3's {MAX_PARTS} parts of {PART_SIZE} bytes"
                ),
                transient: false,
            });
        }
        while self.in_flight.len() >= PARTS_IN_FLIGHT {
            self.wait_oldest().await?;
        }
        let buf = std::mem::take(&mut self.buf);
        let bytes = if buf.capacity() == PART_SIZE {
            self.pool.part(buf)
        } else {
            Bytes::from(buf)
        };
        let n = self.next_part;
        self.next_part += 1;
        self.in_flight.push_back(tokio::spawn(upload_part(
            c,
            self.key.clone(),
            upload_id,
            n,
            bytes,
        )));
        Ok(())
    }

    async fn wait_oldest(&mut self) -> Result<(), DestinationError> {
        let Some(h) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let part = h.await.map_err(|e| DestinationError::S3 {
            op: "cannot upload a part of",
            location: self.dest.client.location(Some(&self.key)),
            detail: format!("the upload task failed: {e}"),
            transient: false,
        })??;
        self.parts.push(part);
        Ok(())
    }
}

#[async_trait]
impl Upload for S3Upload {
    async fn write(&mut self, mut buf: &[u8]) -> Result<(), DestinationError> {
        while !buf.is_empty() {
            let room = PART_SIZE - self.buf.len();
            let take = room.min(buf.len());
            if self.buf.len() + take > self.buf.capacity() {
                // A file's first write gets a buffer of its own size (at
                // least SMALL_BUFFER): all a small file (the manifest) needs.
                // A file that outgrows it moves to a part buffer.
                if self.buf.capacity() == 0 && take < PART_SIZE {
                    self.buf.reserve_exact(take.max(SMALL_BUFFER));
                } else {
                    let mut part = self.pool.take();
                    part.extend_from_slice(&self.buf);
                    self.buf = part;
                }
            }
            self.buf.extend_from_slice(&buf[..take]);
            self.written += take as u64;
            buf = &buf[take..];
            if self.buf.len() == PART_SIZE {
                self.send_part().await?;
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, DestinationError> {
        let pending = if self.upload_id.is_none() {
            Pending::Small(Bytes::from(std::mem::take(&mut self.buf)))
        } else {
            if !self.buf.is_empty() || self.next_part == 1 {
                self.send_part().await?;
            }
            while !self.in_flight.is_empty() {
                self.wait_oldest().await?;
            }
            let upload_id = self.upload_id.clone().unwrap_or_default();
            let stored = stored_size(&self.dest.client, &self.key, &upload_id).await?;
            if stored != self.written {
                return Err(DestinationError::SizeMismatch {
                    location: self.dest.client.location(Some(&self.key)),
                    sent: self.written,
                    stored,
                });
            }
            let mut parts = std::mem::take(&mut self.parts);
            parts.sort_by_key(|(n, _)| *n);
            Pending::Multipart {
                upload_id,
                parts,
                size: self.written,
            }
        };
        self.done = true;
        if self.partial {
            lock(&self.dest.pending).insert(self.path.clone(), pending);
        } else {
            self.dest.publish(&self.key, pending).await?;
        }
        Ok(self.written)
    }
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        for h in &self.in_flight {
            h.abort();
        }
        if self.done {
            return;
        }
        // Abandoned (a failed or cancelled run): abort the upload on the
        // server without blocking here; the run's clean-up (deleting the
        // `.partial` name) aborts it too, and prune any that is left.
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        if self.claimed {
            // The claim stays the run's until its clean-up.
            lock(&self.dest.pending).insert(self.path.clone(), Pending::Claimed { upload_id });
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let c = self.dest.client.clone();
            let key = self.key.clone();
            rt.spawn(async move { abort(&c, &key, &upload_id).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn content_ranges_are_read_with_and_without_a_size() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some((0, 99, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        for bad in [
            "",
            "bytes */1000",
            "items 0-1/2",
            "bytes 0-x/3",
            "bytes 0-1",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn keys_are_the_prefix_and_the_path() {
        assert_eq!(key_of(Some("etcd/prod"), "c/n/t/f"), "etcd/prod/c/n/t/f");
        assert_eq!(key_of(None, "c/n/t/f"), "c/n/t/f");
    }

    #[test]
    fn a_listing_shows_uploads_as_partial_files_and_prefixes_as_dirs() {
        let t = |s| Some(UNIX_EPOCH + Duration::from_secs(s));
        let scan = Scan {
            objects: vec![
                xml::Object {
                    key: "p/c/n/t/snapshot.db".into(),
                    size: 10,
                    last_modified: t(5),
                },
                xml::Object {
                    key: "p/c/n/t/".into(),
                    size: 0,
                    last_modified: t(1),
                },
            ],
            uploads: vec![
                xml::Upload {
                    key: "p/c/n/t/manifest.json".into(),
                    upload_id: "a".into(),
                    initiated: t(7),
                },
                xml::Upload {
                    key: "p/c/n/t/manifest.json".into(),
                    upload_id: "b".into(),
                    initiated: t(9),
                },
                xml::Upload {
                    key: "p/c/n/t/sub/x".into(),
                    upload_id: "c".into(),
                    initiated: t(9),
                },
            ],
            prefixes: vec!["p/c/n/t/sub/".into(), "p/c/n/t/sub/".into()],
            last_part: HashMap::new(),
        };
        let listed = entries("p/c/n/t/", scan);
        let names: Vec<(&str, bool, u64)> = listed
            .iter()
            .map(|e| (e.name.as_str(), e.is_dir, e.size))
            .collect();
        assert_eq!(
            names,
            [
                ("manifest.json.partial", false, 0),
                ("snapshot.db", false, 10),
                ("sub", true, 0),
            ]
        );
        assert_eq!(listed[0].modified, t(9));
    }

    #[test]
    fn an_upload_is_as_old_as_its_newest_part_not_its_start() {
        let t = |s| Some(UNIX_EPOCH + Duration::from_secs(s));
        let up = |key: &str, id: &str, at| xml::Upload {
            key: key.into(),
            upload_id: id.into(),
            initiated: t(at),
        };
        let scan = Scan {
            uploads: vec![
                // Started at 100, a part at 5000: a run still streaming.
                up("p/t/snapshot.db", "s", 100),
                // A claim takes no part until its manifest is written.
                up("p/t/manifest.json", "m", 90),
            ],
            last_part: [("s".to_string(), t(5000).unwrap())].into(),
            ..Scan::default()
        };
        let listed = entries("p/t/", scan);
        let ages: Vec<(&str, Option<std::time::SystemTime>)> = listed
            .iter()
            .map(|e| (e.name.as_str(), e.modified))
            .collect();
        assert_eq!(
            ages,
            [
                ("manifest.json.partial", t(90)),
                ("snapshot.db.partial", t(5000)),
            ]
        );
    }

    #[test]
    fn of_two_claims_seen_together_exactly_one_goes_first() {
        let up = |key: &str, id: &str| xml::Upload {
            key: key.into(),
            upload_id: id.into(),
            initiated: None,
        };
        let m = "p/c/n/t/manifest.json";
        let both = Scan {
            uploads: vec![up(m, "b2"), up(m, "a1")],
            ..Scan::default()
        };
        assert_eq!(contest(&both, m, "a1"), Contest::Won);
        assert_eq!(contest(&both, m, "b2"), Contest::Lost);
        let alone = Scan {
            uploads: vec![up(m, "b2")],
            ..Scan::default()
        };
        assert_eq!(contest(&alone, m, "b2"), Contest::Alone);
        let data = Scan {
            uploads: vec![up(m, "a1"), up("p/c/n/t/snapshot.db", "z")],
            ..Scan::default()
        };
        assert_eq!(contest(&data, m, "a1"), Contest::Taken(1));
        let object = Scan {
            uploads: vec![up(m, "a1")],
            objects: vec![xml::Object {
                key: "p/c/n/t/x".into(),
                size: 1,
                last_modified: None,
            }],
            ..Scan::default()
        };
        assert_eq!(contest(&object, m, "a1"), Contest::Taken(1));
    }

    #[test]
    fn a_part_buffer_comes_back_to_the_pool_when_its_bytes_are_dropped() {
        let pool = PartPool::default();
        let mut buf = pool.take();
        assert_eq!(buf.capacity(), PART_SIZE);
        buf.extend_from_slice(b"part one");
        let first = buf.as_ptr();
        let bytes = pool.part(buf);
        let copy = bytes.clone();
        drop(bytes);
        // Still in use by the copy: a new buffer.
        let other = pool.take();
        assert_ne!(other.as_ptr(), first);
        assert_eq!(&copy[..], b"part one");
        drop(copy);
        // Back, emptied, and handed out again.
        let again = pool.take();
        assert_eq!(again.as_ptr(), first);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), PART_SIZE);
    }

    #[test]
    fn the_pool_keeps_no_more_than_the_buffers_one_file_uses() {
        let pool = PartPool::default();
        let parts: Vec<Bytes> = (0..PARTS_IN_FLIGHT + 3)
            .map(|_| pool.part(pool.take()))
            .collect();
        drop(parts);
        assert_eq!(lock_free(&pool).len(), PARTS_IN_FLIGHT + 1);
    }

    fn lock_free(pool: &PartPool) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        pool.0.lock().unwrap()
    }
}
