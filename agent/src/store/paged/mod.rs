//! Paged snapshot sets (`snapshot_format: paged`): the snapshot cut at
//! bbolt's page boundaries, each page stored once in the node's packs.
//!
//! A set's page index (`pages_<ts>.idx`) has one record per page of its
//! snapshot: the page's id and where it is (a pack, a segment in it, a slot
//! in the segment). A segment is up to [`SEGMENT_PAGES`] pages, stored as
//! they are, or as one zstd frame, then as one age file when encrypting; a
//! pack is segments one after another, named by its SHA-256
//! (`<cluster>/<node>/packs/<sha256>.pack`). A backup compares each page
//! with the previous set's page at the same position (bbolt rewrites a
//! changed page, and leaves an unchanged one where it is), then by id with
//! all its pages ([`known`]); pages found are referenced, the others
//! appended to new packs. A set depends on packs,
//! never on another set. docs/backup-set-format.md#paged-sets specifies it
//! all; [`writer`] writes sets, [`reader`] rebuilds their snapshots.

pub mod known;
pub mod reader;
pub mod writer;

use std::io::{Read, Write};

use etcd_backup_proto::{ManifestPages, PageIds, PACKS_DIR};

use crate::config::CompressionConfig;
use crate::encryption::{EncryptionConfig, Identities, PageIdKey};
use crate::store::destination::DestinationError;

/// Most pages in one segment (1 MiB of 4 KiB pages): large enough that a
/// restore reads a distant store in few requests, small enough that one
/// changed page costs little to read back.
pub const SEGMENT_PAGES: usize = 256;

/// A pack is closed once it holds this many bytes (and at the end of a run).
pub const PACK_TARGET: u64 = 16 << 20;

/// The first bytes of a page index, once decompressed.
pub const INDEX_MAGIC: &[u8; 8] = b"EBAPIDX1";

/// Bytes per index record: id (16), pack (4), segment offset (8), segment
/// length (4), slot (2), all little-endian.
pub const RECORD_LEN: usize = 34;

/// The index header: magic, page size (u32), record length (u16).
const HEADER_LEN: usize = 8 + 4 + 2;

/// zstd level of the page index (always compressed: its locations repeat).
const INDEX_LEVEL: i32 = 3;

/// The smallest and largest page sizes bbolt files are accepted with.
const PAGE_SIZES: std::ops::RangeInclusive<usize> = 512..=65536;

/// bbolt's magic number, in every meta page.
const BBOLT_MAGIC: u32 = 0xED0C_DAED;

/// Why a paged set could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum PagedError {
    /// The destination failed.
    #[error(transparent)]
    Destination(#[from] DestinationError),
    /// The snapshot is not a bbolt file whose pages can be cut.
    #[error("the snapshot cannot be cut into pages: {why}; store it with snapshot_format: full")]
    NotPaged {
        /// What is wrong.
        why: String,
    },
    /// A page index, pack or segment is not what its manifest says.
    #[error("{what}")]
    Damaged {
        /// What was found, and where.
        what: String,
    },
    /// Compressing, encrypting or a local temporary file failed.
    #[error("{what}: {source}")]
    Local {
        /// What was being done.
        what: &'static str,
        /// What failed.
        source: std::io::Error,
    },
    /// The identities given cannot decrypt a segment.
    #[error("{message}")]
    Identity {
        /// What is wrong and what to do.
        message: String,
    },
}

/// Where a page is: pack `pack` (its position in the manifest's pack list),
/// the segment at `offset` (`len` bytes as stored), page `slot` in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    /// Position of the pack in the manifest's `packs`.
    pub pack: u32,
    /// Byte offset of the segment in the pack.
    pub offset: u64,
    /// Bytes of the segment as stored.
    pub len: u32,
    /// Which page of the segment's plaintext.
    pub slot: u16,
}

impl Location {
    /// Why this location is not one of `packs` (a manifest's list), if it
    /// is not: a pack number beyond the list, an empty segment or one past
    /// the pack's end, or a slot no segment holds.
    pub fn fault(&self, packs: &[etcd_backup_proto::PackRef]) -> Option<String> {
        let end = self.offset.saturating_add(u64::from(self.len));
        match packs.get(self.pack as usize) {
            None => Some(format!(
                "names pack #{}, but the manifest lists {} packs",
                self.pack,
                packs.len()
            )),
            Some(p) if self.len == 0 || end > p.size => Some(format!(
                "names bytes {}..{end} of pack {}, which holds {}",
                self.offset, p.name, p.size
            )),
            Some(_) if self.slot as usize >= SEGMENT_PAGES => Some(format!(
                "names page {} of a segment, which holds at most {SEGMENT_PAGES}",
                self.slot
            )),
            Some(_) => None,
        }
    }
}

/// One index record: a page's id and where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The page id ([`PageIdScheme`]).
    pub id: [u8; 16],
    /// Where the page is.
    pub at: Location,
}

impl Record {
    /// Appends the record's [`RECORD_LEN`] bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.at.pack.to_le_bytes());
        out.extend_from_slice(&self.at.offset.to_le_bytes());
        out.extend_from_slice(&self.at.len.to_le_bytes());
        out.extend_from_slice(&self.at.slot.to_le_bytes());
    }

    /// Reads a record from its [`RECORD_LEN`] bytes.
    pub fn decode(b: &[u8; RECORD_LEN]) -> Self {
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[..16]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&b[20..28]);
        Self {
            id,
            at: Location {
                pack: u32_at(16),
                offset: u64::from_le_bytes(off),
                len: u32_at(28),
                slot: u16::from_le_bytes([b[32], b[33]]),
            },
        }
    }
}

/// How page ids are computed: the SHA-256 of the page for unencrypted sets,
/// an HMAC with the node's key for encrypted ones (first 16 bytes of either).
#[derive(Debug, Clone)]
pub enum PageIdScheme {
    /// [`PageIds::Sha256`].
    Sha256,
    /// [`PageIds::HmacSha256`] with this key.
    Keyed(PageIdKey),
}

impl PageIdScheme {
    /// The scheme a configuration writes with: keyed when encrypting.
    pub fn for_config(encryption: Option<&EncryptionConfig>) -> Self {
        match encryption.and_then(|e| e.page_id_key.clone()) {
            Some(key) => PageIdScheme::Keyed(key),
            None => PageIdScheme::Sha256,
        }
    }

    /// The id of one page.
    pub fn id(&self, page: &[u8]) -> [u8; 16] {
        match self {
            PageIdScheme::Sha256 => {
                use sha2::Digest;
                let full = sha2::Sha256::digest(page);
                let mut out = [0u8; 16];
                out.copy_from_slice(&full[..16]);
                out
            }
            PageIdScheme::Keyed(key) => key.mac16(page),
        }
    }

    /// What the manifest records: the scheme, and the key's fingerprint.
    pub fn describe(&self) -> (PageIds, Option<String>) {
        match self {
            PageIdScheme::Sha256 => (PageIds::Sha256, None),
            PageIdScheme::Keyed(key) => (PageIds::HmacSha256, Some(key.fingerprint())),
        }
    }
}

/// How segments are stored: compressed, then encrypted, each when configured.
#[derive(Debug, Clone)]
pub struct Coding {
    /// zstd, and its level.
    pub compression: Option<CompressionConfig>,
    /// age, to these recipients.
    pub encryption: Option<EncryptionConfig>,
}

impl Coding {
    /// Stores one segment's pages (blocking: run it off the async threads).
    ///
    /// # Errors
    /// zstd or age failed.
    pub fn encode(&self, plain: &[u8]) -> Result<Vec<u8>, PagedError> {
        let local = |what| move |source| PagedError::Local { what, source };
        let compressed;
        let body: &[u8] = match &self.compression {
            None => plain,
            Some(c) => {
                compressed = zstd::bulk::compress(plain, c.level)
                    .map_err(local("cannot compress a segment"))?;
                &compressed
            }
        };
        let Some(enc) = &self.encryption else {
            return Ok(body.to_vec());
        };
        let encryptor = enc.encryptor().map_err(|e| PagedError::Local {
            what: "cannot encrypt a segment",
            source: std::io::Error::other(e.to_string()),
        })?;
        let mut out = Vec::with_capacity(body.len() + 512);
        let mut w = encryptor
            .wrap_output(&mut out)
            .map_err(local("cannot encrypt a segment"))?;
        w.write_all(body)
            .map_err(local("cannot encrypt a segment"))?;
        w.finish().map_err(local("cannot encrypt a segment"))?;
        Ok(out)
    }
}

/// Reads one stored segment back into its pages: decrypts with
/// `identities` when `encrypted`, decompresses when `compressed`, and
/// refuses more than `max_plain` bytes.
///
/// # Errors
/// [`PagedError::Damaged`] for a segment that does not decode,
/// [`PagedError::Identity`] when the identities cannot decrypt it.
pub fn decode_segment(
    stored: Vec<u8>,
    compressed: bool,
    encrypted: bool,
    identities: Option<&Identities>,
    max_plain: usize,
    what: &dyn Fn() -> String,
) -> Result<Vec<u8>, PagedError> {
    let damaged = |why: String| PagedError::Damaged {
        what: format!("{}: {why}", what()),
    };
    let decrypted;
    let body: Vec<u8> = if encrypted {
        let Some(ids) = identities else {
            return Err(PagedError::Identity {
                message: format!(
                    "{} is encrypted; pass --identity FILE with the private key of one of the set's recipients",
                    what()
                ),
            });
        };
        let decryptor = age::Decryptor::new(&stored[..])
            .map_err(|e| damaged(format!("cannot decrypt: {e}")))?;
        let mut r = match decryptor.decrypt(ids.iter()) {
            Ok(r) => r,
            Err(
                e @ (age::DecryptError::NoMatchingKeys | age::DecryptError::KeyDecryptionFailed),
            ) => {
                return Err(PagedError::Identity {
                    message: format!(
                        "{}: {e}; the identity in {} is not one of the set's recipients",
                        what(),
                        ids.path.display()
                    ),
                })
            }
            Err(e) => return Err(damaged(format!("cannot decrypt: {e}"))),
        };
        let mut out = Vec::new();
        let limit = if compressed {
            max_plain + 4096 + max_plain / 8
        } else {
            max_plain
        };
        (&mut r)
            .take(limit as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| damaged(format!("cannot decrypt: {e}")))?;
        if out.len() > limit {
            return Err(damaged("it decrypts to more than a segment holds".into()));
        }
        decrypted = out;
        decrypted
    } else {
        stored
    };
    if !compressed {
        return Ok(body);
    }
    zstd::bulk::decompress(&body, max_plain)
        .map_err(|e| damaged(format!("cannot decompress (zstd): {e}")))
}

/// bbolt's page size, from the first meta page at the start of a snapshot.
///
/// # Errors
/// [`PagedError::NotPaged`] when `head` is not a bbolt meta page.
pub fn page_size_of(head: &[u8]) -> Result<usize, PagedError> {
    if head.len() < 28 {
        return Err(PagedError::NotPaged {
            why: format!("it is only {} bytes long", head.len()),
        });
    }
    let u32_at = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    if u32_at(16) != BBOLT_MAGIC {
        return Err(PagedError::NotPaged {
            why: "its first page is not a bbolt meta page (no bbolt magic)".into(),
        });
    }
    let size = u32_at(24) as usize;
    if !size.is_power_of_two() || !PAGE_SIZES.contains(&size) {
        return Err(PagedError::NotPaged {
            why: format!(
                "its meta page says pages are {size} bytes, not a power of two from 512 to 65536"
            ),
        });
    }
    Ok(size)
}

/// Cuts a stream into whole pages; the bytes after the last whole page are
/// the tail.
#[derive(Debug, Default)]
pub struct PageCutter {
    page_size: Option<usize>,
    buf: Vec<u8>,
}

impl PageCutter {
    /// Takes the next bytes; returns the whole pages they complete (a
    /// multiple of the page size, maybe empty).
    ///
    /// # Errors
    /// The start of the stream is not a bbolt file.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<u8>, PagedError> {
        self.buf.extend_from_slice(bytes);
        let size = match self.page_size {
            Some(s) => s,
            None if self.buf.len() < 28 => return Ok(Vec::new()),
            None => {
                let s = page_size_of(&self.buf)?;
                self.page_size = Some(s);
                s
            }
        };
        let whole = self.buf.len() / size * size;
        let rest = self.buf.split_off(whole);
        Ok(std::mem::replace(&mut self.buf, rest))
    }

    /// The page size, once known.
    pub fn page_size(&self) -> Option<usize> {
        self.page_size
    }

    /// The tail: what follows the last whole page.
    ///
    /// # Errors
    /// The stream ended before its first page size could be read.
    pub fn finish(self) -> Result<(usize, Vec<u8>), PagedError> {
        match self.page_size {
            Some(s) => Ok((s, self.buf)),
            None => Err(PagedError::NotPaged {
                why: format!("it is only {} bytes long", self.buf.len()),
            }),
        }
    }
}

/// The index's header bytes.
fn index_header(page_size: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(INDEX_MAGIC);
    h.extend_from_slice(&page_size.to_le_bytes());
    h.extend_from_slice(&(RECORD_LEN as u16).to_le_bytes());
    h
}

/// Reads a page index from a local file (downloaded, its SHA-256 checked)
/// on a blocking thread, and hands its records over in batches, checking
/// the header and that it holds exactly `pages` records.
pub struct IndexRecords {
    rx: tokio::sync::mpsc::Receiver<Result<Vec<Record>, PagedError>>,
    batch: std::vec::IntoIter<Record>,
    done: bool,
}

/// Records per batch handed from the decoding thread.
const RECORD_BATCH: usize = 4096;

impl IndexRecords {
    /// Starts decoding `file`, the index of a set with `pages` pages of
    /// `page_size` bytes; `what` names it in errors.
    pub fn start(file: std::fs::File, page_size: u32, pages: u64, what: String) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let sent = decode_index(file, page_size, pages, &what, |batch| {
                tx.blocking_send(Ok(batch)).is_ok()
            });
            if let Err(e) = sent {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Self {
            rx,
            batch: Vec::new().into_iter(),
            done: false,
        }
    }

    /// The next record; `None` after the last.
    ///
    /// # Errors
    /// The index is damaged.
    pub async fn next(&mut self) -> Result<Option<Record>, PagedError> {
        loop {
            if let Some(r) = self.batch.next() {
                return Ok(Some(r));
            }
            if self.done {
                return Ok(None);
            }
            match self.rx.recv().await {
                Some(Ok(batch)) => self.batch = batch.into_iter(),
                Some(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                None => self.done = true,
            }
        }
    }
}

/// Decodes `file`, the page index of a set with `pages` pages of
/// `page_size` bytes (`what` names it in errors), handing its records to
/// `each` in batches (4096 records), in page order, until `each`
/// returns `false`. Blocking: run it off the async threads.
///
/// # Errors
/// [`PagedError::Damaged`]: the header is not that of such an index, or it
/// holds fewer or more than `pages` records, or does not decompress.
pub fn decode_index(
    file: std::fs::File,
    page_size: u32,
    pages: u64,
    what: &str,
    mut each: impl FnMut(Vec<Record>) -> bool,
) -> Result<(), PagedError> {
    let damaged = |why: String| PagedError::Damaged {
        what: format!("page index {what}: {why}"),
    };
    let mut r = zstd::stream::read::Decoder::new(std::io::BufReader::new(file))
        .map_err(|e| damaged(format!("cannot decompress: {e}")))?;
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header)
        .map_err(|e| damaged(format!("cannot read its header: {e}")))?;
    if header[..] != index_header(page_size)[..] {
        return Err(damaged(format!(
            "its header is not that of an index of {page_size}-byte pages"
        )));
    }
    let mut left = pages;
    let mut rec = [0u8; RECORD_LEN];
    while left > 0 {
        let n = left.min(RECORD_BATCH as u64) as usize;
        let mut batch = Vec::with_capacity(n);
        for _ in 0..n {
            r.read_exact(&mut rec).map_err(|e| {
                damaged(format!(
                    "it ends after {} of its {pages} records ({e})",
                    pages - left + batch.len() as u64
                ))
            })?;
            batch.push(Record::decode(&rec));
        }
        left -= n as u64;
        if !each(batch) {
            return Ok(());
        }
    }
    let mut extra = [0u8; 1];
    match r.read(&mut extra) {
        Ok(0) => Ok(()),
        Ok(_) => Err(damaged(format!("it holds more than its {pages} records"))),
        Err(e) => Err(damaged(format!("cannot decompress its end: {e}"))),
    }
}

/// Downloads a set's page index into an anonymous temporary file, checking
/// its size and SHA-256 against the manifest.
///
/// # Errors
/// Read failures, [`PagedError::Damaged`] when it is not what the manifest says.
pub async fn download_index(
    dest: &dyn crate::store::destination::Destination,
    path: &str,
    pages: &ManifestPages,
) -> Result<std::fs::File, PagedError> {
    use sha2::Digest;
    use tokio::io::AsyncReadExt;
    let location = format!("{}/{path}", dest.describe());
    let mut reader = dest.open(path).await?;
    let file = tempfile::tempfile().map_err(|source| PagedError::Local {
        what: "cannot create a temporary file for a page index",
        source,
    })?;
    let mut out =
        std::io::BufWriter::new(file.try_clone().map_err(|source| PagedError::Local {
            what: "cannot create a temporary file for a page index",
            source,
        })?);
    let mut sha = sha2::Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|source| DestinationError::Io {
                op: "cannot read",
                location: location.clone(),
                source,
            })?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > pages.index.size {
            break;
        }
        sha.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|source| PagedError::Local {
                what: "cannot write a page index to a temporary file",
                source,
            })?;
    }
    out.flush().map_err(|source| PagedError::Local {
        what: "cannot write a page index to a temporary file",
        source,
    })?;
    drop(out);
    let got = hex::encode(sha.finalize());
    if size != pages.index.size || got != pages.index.sha256 {
        return Err(PagedError::Damaged {
            what: format!(
                "page index {location} is not what its manifest says ({} bytes and SHA-256 {} expected{}); run `etcd-backup-agent verify` on the set",
                pages.index.size,
                pages.index.sha256,
                if size > pages.index.size {
                    ", and it is longer".to_string()
                } else {
                    format!(", {size} bytes and {got} found")
                }
            ),
        });
    }
    let mut file = file;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0)).map_err(|source| {
        PagedError::Local {
            what: "cannot rewind a page index's temporary file",
            source,
        }
    })?;
    Ok(file)
}

/// Checks every record of a page index (a local file whose size and
/// SHA-256 were checked, as [`download_index`] leaves it) against its
/// manifest, without reading a pack: each record names a pack of the
/// manifest's list, a range inside that pack, and a slot a segment can
/// hold. `what` names the index in errors.
///
/// # Errors
/// [`PagedError::Damaged`] naming the first record that does not fit.
pub async fn check_index_locations(
    file: std::fs::File,
    pages: &ManifestPages,
    what: String,
) -> Result<(), PagedError> {
    let mut records = IndexRecords::start(file, pages.page_size, pages.pages, what.clone());
    let mut n = 0u64;
    while let Some(r) = records.next().await? {
        let at = r.at;
        let fault = at.fault(&pages.packs);
        if let Some(fault) = fault {
            return Err(PagedError::Damaged {
                what: format!("page index {what}: the record of page {n} {fault}"),
            });
        }
        n += 1;
    }
    Ok(())
}

/// `<cluster>/<node>/packs`.
pub fn packs_dir(cluster: &str, node: &str) -> String {
    format!("{cluster}/{node}/{PACKS_DIR}")
}

/// Checks what a manifest says of its pages before anything is read for
/// it: pack names are pack names (so no path below the node's packs can be
/// named), and the page size is one bbolt uses.
///
/// # Errors
/// [`PagedError::Damaged`] naming the problem.
pub fn check_manifest_pages(pages: &ManifestPages, set: &str) -> Result<(), PagedError> {
    let damaged = |why: String| PagedError::Damaged {
        what: format!("the manifest of set {set} {why}; nothing was read for it"),
    };
    if let Some(bad) = pages
        .packs
        .iter()
        .find(|p| !etcd_backup_proto::is_pack_name(&p.name))
    {
        return Err(damaged(format!(
            "names pack {:?}, which is not a pack name (64 hex digits and .pack, inside the node's packs directory)",
            bad.name
        )));
    }
    let size = pages.page_size as usize;
    if !size.is_power_of_two() || !PAGE_SIZES.contains(&size) {
        return Err(damaged(format!("gives a page size of {size}")));
    }
    if pages.tail.len() >= 2 * size || hex::decode(&pages.tail).is_err() {
        return Err(damaged(
            "has a tail that is not hex of less than a page".into(),
        ));
    }
    Ok(())
}

/// Compresses the index as it is written: the header first, then records.
pub struct IndexEncoder {
    encoder: zstd::stream::write::Encoder<'static, Vec<u8>>,
    records: u64,
}

impl IndexEncoder {
    /// An index of `page_size`-byte pages.
    ///
    /// # Errors
    /// zstd cannot be set up.
    pub fn new(page_size: u32) -> Result<Self, PagedError> {
        let local = |source| PagedError::Local {
            what: "cannot compress the page index",
            source,
        };
        let mut encoder =
            zstd::stream::write::Encoder::new(Vec::new(), INDEX_LEVEL).map_err(local)?;
        encoder.include_checksum(true).map_err(local)?;
        encoder.write_all(&index_header(page_size)).map_err(local)?;
        Ok(Self {
            encoder,
            records: 0,
        })
    }

    /// Adds records; returns compressed bytes ready to be stored (maybe none).
    ///
    /// # Errors
    /// zstd failed.
    pub fn add(&mut self, records: &[Record]) -> Result<Vec<u8>, PagedError> {
        let mut raw = Vec::with_capacity(records.len() * RECORD_LEN);
        for r in records {
            r.encode(&mut raw);
        }
        self.records += records.len() as u64;
        self.encoder
            .write_all(&raw)
            .map_err(|source| PagedError::Local {
                what: "cannot compress the page index",
                source,
            })?;
        Ok(std::mem::take(self.encoder.get_mut()))
    }

    /// Records added so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Ends the stream; returns its last bytes.
    ///
    /// # Errors
    /// zstd failed.
    pub fn finish(self) -> Result<Vec<u8>, PagedError> {
        self.encoder.finish().map_err(|source| PagedError::Local {
            what: "cannot compress the page index",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_their_bytes() {
        let r = Record {
            id: [7; 16],
            at: Location {
                pack: 3,
                offset: 1 << 40,
                len: 123_456,
                slot: 255,
            },
        };
        let mut b = Vec::new();
        r.encode(&mut b);
        assert_eq!(b.len(), RECORD_LEN);
        assert_eq!(Record::decode(&b.try_into().unwrap()), r);
    }

    fn meta(page_size: u32) -> Vec<u8> {
        let mut m = vec![0u8; page_size as usize];
        m[16..20].copy_from_slice(&BBOLT_MAGIC.to_le_bytes());
        m[20..24].copy_from_slice(&2u32.to_le_bytes());
        m[24..28].copy_from_slice(&page_size.to_le_bytes());
        m
    }

    #[test]
    fn the_cutter_takes_the_page_size_from_the_meta_page_and_keeps_the_tail() {
        let mut stream = meta(4096);
        stream.extend(std::iter::repeat_n(9u8, 4096 * 2));
        stream.extend([1u8; 32]);
        let mut c = PageCutter::default();
        let mut pages = Vec::new();
        for chunk in stream.chunks(1000) {
            pages.extend(c.push(chunk).unwrap());
        }
        let (size, tail) = c.finish().unwrap();
        assert_eq!(size, 4096);
        assert_eq!(pages.len(), 3 * 4096);
        assert_eq!(tail, vec![1u8; 32]);
    }

    #[test]
    fn a_stream_that_is_not_bbolt_is_refused() {
        let mut c = PageCutter::default();
        let e = c.push(&[0u8; 8192]).unwrap_err();
        assert!(e.to_string().contains("not a bbolt meta page"), "{e}");
        let mut m = meta(4096);
        m[24..28].copy_from_slice(&3000u32.to_le_bytes());
        let e = PageCutter::default().push(&m).unwrap_err();
        assert!(e.to_string().contains("3000"), "{e}");
    }

    #[test]
    fn keyed_ids_differ_by_key_and_plain_ids_are_the_sha256() {
        use sha2::Digest;
        let page = vec![5u8; 4096];
        let plain = PageIdScheme::Sha256.id(&page);
        assert_eq!(plain[..], sha2::Sha256::digest(&page)[..16]);
        let a = PageIdScheme::Keyed(PageIdKey::from_material(&[1; 32])).id(&page);
        let b = PageIdScheme::Keyed(PageIdKey::from_material(&[2; 32])).id(&page);
        assert_ne!(a, b);
        assert_ne!(a, plain);
    }

    #[test]
    fn segments_round_trip_compressed_and_not() {
        let plain: Vec<u8> = (0..8192u32).map(|i| (i % 7) as u8).collect();
        for compression in [
            None,
            Some(CompressionConfig {
                algorithm: etcd_backup_proto::Compression::Zstd,
                level: 1,
            }),
        ] {
            let coded = Coding {
                compression,
                encryption: None,
            };
            let stored = coded.encode(&plain).unwrap();
            let back = decode_segment(stored, compression.is_some(), false, None, 8192, &|| {
                "s".into()
            })
            .unwrap();
            assert_eq!(back, plain);
        }
        let stored = Coding {
            compression: Some(CompressionConfig {
                algorithm: etcd_backup_proto::Compression::Zstd,
                level: 1,
            }),
            encryption: None,
        }
        .encode(&plain)
        .unwrap();
        let e =
            decode_segment(stored, true, false, None, 4096, &|| "segment x".into()).unwrap_err();
        assert!(
            e.to_string().starts_with("segment x: cannot decompress"),
            "{e}"
        );
    }

    #[test]
    fn pack_names_from_a_manifest_must_be_pack_names() {
        let mut pages = ManifestPages {
            index: etcd_backup_proto::StoredFile {
                name: "pages_x.idx".into(),
                size: 1,
                sha256: "00".into(),
            },
            page_size: 4096,
            pages: 1,
            tail: "00".repeat(32),
            page_ids: PageIds::Sha256,
            page_id_key: None,
            new_pages: 1,
            added_bytes: 1,
            compared_with: None,
            packs: vec![etcd_backup_proto::PackRef {
                name: format!("{}.pack", "a".repeat(64)),
                size: 1,
            }],
        };
        check_manifest_pages(&pages, "c/n/t").unwrap();
        for bad in [
            "../../other/packs/x.pack".to_string(),
            "A".repeat(64) + ".pack",
            "x".into(),
        ] {
            pages.packs[0].name = bad.clone();
            let e = check_manifest_pages(&pages, "c/n/t").unwrap_err();
            assert!(e.to_string().contains("not a pack name"), "{bad}: {e}");
        }
    }
}
