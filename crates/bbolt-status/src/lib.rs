//! What `etcdctl snapshot status -w json` reports for a snapshot, computed by reading
//! the snapshot's bbolt file directly, so a backup can record and check it without
//! etcd's tools on the node.
//!
//! etcd (3.4's `etcdctl`, 3.5's `etcdutl`) opens the file with bbolt and, in key order
//! over the top-level buckets, feeds a CRC-32C (Castagnoli) with each bucket's name and
//! then every key and value its `ForEach` yields (a nested bucket yields its key and a
//! nil value, and is not descended into). `totalKey` counts those `ForEach` entries,
//! `revision` is the main revision of the last key of the `key` bucket, and `totalSize`
//! is the meta page's high water mark times the page size. The names of top-level
//! buckets are hashed but not counted.
//!
//! Two ways in, sharing one tree walk:
//! - [`status_of`] / [`status_of_file`] seek to the pages the tree reaches, one page at a
//!   time, so memory stays small whatever the file size.
//! - [`StreamingStatus`] is fed the snapshot as it streams past (to an SFTP server, say)
//!   and writes a 32-byte summary per page to an unlinked temporary file; the tree is
//!   walked in key order at the end. Its memory is the same whatever the file size.
//!
//! Both read bbolt's on-disk format as etcd-io/bbolt writes it (little-endian): pages of
//! `page_size` bytes with a 16-byte header (id, flags, count, overflow), two meta pages
//! (the valid one with the higher transaction id wins, as in bbolt), branch and leaf
//! pages, inline buckets inside leaf values, and overflow pages. The 32-byte SHA-256
//! trailer etcd appends to a snapshot is ignored. A structurally broken file is an
//! [`StatusError::Corrupt`] naming the page and offset, never a panic.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

mod spill;
use spill::{Kind, Record, Spill, SpillReader};

/// What `etcdctl snapshot status -w json` prints for a snapshot (etcd 3.4 and
/// 3.5; 3.6 adds a `version` field, which deserializing ignores). It is stored
/// in `manifest.json`, so the type lives in `proto`.
pub use etcd_backup_proto::SnapshotStatus;

/// Why a snapshot's status could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The snapshot file could not be opened.
    #[error("cannot open snapshot {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Reading (or seeking in) the snapshot failed; retrying may help.
    #[error("cannot read the snapshot at byte {offset}: {source}")]
    Read {
        /// Where the read started.
        offset: u64,
        /// What the reader said.
        source: io::Error,
    },
    /// Reading (or seeking in) the snapshot file failed; retrying may help.
    #[error("cannot read snapshot {path} at byte {offset}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Where the read started.
        offset: u64,
        /// What the OS said.
        source: io::Error,
    },
    /// The bytes are not a well-formed bbolt database: the snapshot is damaged,
    /// truncated or not a snapshot at all. Reading it again will not help.
    #[error("the snapshot is not a valid bbolt database: {0}; take a new snapshot")]
    Corrupt(#[from] Corruption),
    /// [`StreamingStatus`] could not create, write or read the unlinked temporary
    /// files it keeps its page summaries in.
    #[error(
        "cannot {action} the temporary files of the snapshot status in {} (the \
         directory TMPDIR names, else /tmp): {source}; they need about 40 bytes per \
         page of the snapshot (1% of its size): make that directory writable with \
         room to spare, or set TMPDIR to one that is",
        dir.display()
    )]
    Spill {
        /// The directory the files are created in ([`std::env::temp_dir`]).
        dir: PathBuf,
        /// "create", "write" or "read".
        action: &'static str,
        /// What the OS said.
        source: io::Error,
    },
}

impl StatusError {
    /// Whether the file itself is broken (as opposed to reading it having failed).
    pub fn is_corrupt(&self) -> bool {
        matches!(self, StatusError::Corrupt(_))
    }
}

/// Where in the file a structural problem was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// The meta page in use (page 0 or 1).
    Meta(u64),
    /// A branch or leaf page, by page id.
    Page(u64),
    /// The page of an inline bucket, stored in a leaf value that starts at byte
    /// `offset` of page `page`.
    Inline {
        /// The leaf page holding the bucket.
        page: u64,
        /// Where the bucket's value starts in that page.
        offset: u64,
    },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Meta(id) => write!(f, "meta page {id}"),
            Location::Page(id) => write!(f, "page {id}"),
            Location::Inline { page, offset } => {
                write!(f, "the inline bucket at byte {offset} of page {page}")
            }
        }
    }
}

/// Why one meta page is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaProblem {
    /// The file ends before the meta page does.
    #[error("the file ends before it")]
    Missing,
    /// The magic number is not bbolt's.
    #[error("magic {found:#010x} is not bbolt's 0xed0cdaed")]
    BadMagic {
        /// The magic found.
        found: u32,
    },
    /// The format version is not 2.
    #[error("format version {found}, expected 2")]
    BadVersion {
        /// The version found.
        found: u32,
    },
    /// The FNV-64a checksum does not match the meta page's contents.
    #[error("checksum {stored:#018x} does not match its contents ({computed:#018x})")]
    BadChecksum {
        /// The checksum stored in the page.
        stored: u64,
        /// The checksum of the page's contents.
        computed: u64,
    },
    /// The page size is not one this reader supports.
    #[error("page size {page_size} is not a power of two from 512 bytes to 16 MiB")]
    BadPageSize {
        /// The page size found.
        page_size: u32,
    },
    /// With meta page 0 unusable, no valid meta page was found where bbolt looks for
    /// the second one (1 KiB, 2 KiB, … 16 MiB into the file).
    #[error("no valid meta page at any offset bbolt tries (1 KiB to 16 MiB)")]
    NotFound,
}

/// A structural problem in the bbolt file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// The file is shorter than a meta page.
    #[error("the file is {len} bytes, too short to hold a bbolt meta page")]
    TooShort {
        /// The file's length.
        len: u64,
    },
    /// Neither meta page is usable.
    #[error("neither meta page is valid (page 0: {meta0}; page 1: {meta1})")]
    NoValidMeta {
        /// What is wrong with meta page 0.
        meta0: MetaProblem,
        /// What is wrong with meta page 1.
        meta1: MetaProblem,
    },
    /// The file is shorter than the meta page says the database is.
    #[error(
        "the file holds {len} bytes of pages but the meta page says {high_water_mark} pages \
         of {page_size} bytes ({expected} bytes); it is truncated"
    )]
    Truncated {
        /// Bytes of pages in the file (the digest trailer not counted).
        len: u64,
        /// What the meta page implies.
        expected: u64,
        /// The page size.
        page_size: u64,
        /// The meta page's high water mark (pages in use).
        high_water_mark: u64,
    },
    /// A page reference points past the end of the database.
    #[error(
        "{from} refers to page {pgid} (with {overflow} overflow pages), beyond the high \
         water mark {high_water_mark}"
    )]
    PageOutOfRange {
        /// The page referred to.
        pgid: u64,
        /// Its overflow count, if its header was read.
        overflow: u32,
        /// Pages in use.
        high_water_mark: u64,
        /// Where the reference is.
        from: Location,
    },
    /// A page's header names another page id.
    #[error("page {pgid} identifies itself as page {found}")]
    PageIdMismatch {
        /// The page read.
        pgid: u64,
        /// The id in its header.
        found: u64,
    },
    /// A page the tree refers to is not a branch or leaf page.
    #[error("{from} refers to page {pgid}, which is not a branch or leaf page{}", flags_note(*.flags))]
    NotATreePage {
        /// The page referred to.
        pgid: u64,
        /// Its flags, when known.
        flags: Option<u16>,
        /// Where the reference is.
        from: Location,
    },
    /// A page with overflow spans more than this reader accepts.
    #[error("page {pgid} spans {span} bytes ({overflow} overflow pages), over the limit of {MAX_PAGE_SPAN}")]
    PageTooLarge {
        /// The page.
        pgid: u64,
        /// Its overflow count.
        overflow: u32,
        /// Its size in bytes.
        span: u64,
    },
    /// An element, key or value lies outside its page.
    #[error("{at}: {what} at bytes {start}..{end} lies outside the {size}-byte page")]
    OutOfBounds {
        /// The page.
        at: Location,
        /// What was being read, e.g. "leaf element 3".
        what: String,
        /// Where it starts.
        start: u64,
        /// Where it ends.
        end: u64,
        /// The page's size.
        size: u64,
    },
    /// A branch page with no children.
    #[error("page {pgid} is a branch page with no elements")]
    EmptyBranch {
        /// The page.
        pgid: u64,
    },
    /// An inline bucket's page is not a leaf page.
    #[error("{at}: flags {flags:#x}, but an inline bucket's page must be a leaf page")]
    InlineNotLeaf {
        /// The inline page.
        at: Location,
        /// Its flags.
        flags: u16,
    },
    /// A bucket's value is too short for a bucket header (and inline page header).
    #[error("{at}: element {index} is a bucket but its value has only {len} bytes")]
    BadBucketHeader {
        /// The page holding the bucket.
        at: Location,
        /// The element's index.
        index: u16,
        /// The value's length.
        len: u64,
    },
    /// A page (or its overflow) is reachable twice: a cycle or a shared subtree.
    #[error(
        "{from} refers to page {pgid}, but the tree already reached it or a page \
         overlapping it (a cycle or a shared subtree)"
    )]
    ReachedTwice {
        /// The page.
        pgid: u64,
        /// The second reference.
        from: Location,
    },
    /// The tree is deeper than any real bbolt tree.
    #[error("page {pgid} is {depth} levels down a bucket's tree, deeper than the limit of {MAX_TREE_DEPTH}")]
    TooDeep {
        /// The page.
        pgid: u64,
        /// Its depth.
        depth: usize,
    },
    /// The keys and values of a leaf page's elements overlap (they add up to more
    /// than the page).
    #[error("{at}: the keys and values of its elements overlap (element {index} goes past {size} bytes in all)")]
    OverlappingElements {
        /// The page.
        at: Location,
        /// The first element past the page's size.
        index: u16,
        /// The page's size.
        size: u64,
    },
    /// Pages with overflow overlap each other far more than in any real database (a
    /// stream of made-up page headers); this page was not read.
    #[error("page {pgid} overlaps too many other pages with overflow; it was not read")]
    OverlappingOverflow {
        /// The page.
        pgid: u64,
    },
    /// An entry of the root bucket is not a bucket; etcd's status fails on it too.
    #[error("{at}: element {index} of the root bucket is a key/value pair, not a bucket")]
    NotABucket {
        /// The page.
        at: Location,
        /// The element's index.
        index: u16,
    },
    /// A key in etcd's `key` bucket is too short to be a revision; etcd's status
    /// would crash on it.
    #[error(
        "{at}: a key of {len} bytes in the \"key\" bucket is not a revision (17 bytes or more)"
    )]
    BadRevisionKey {
        /// The page.
        at: Location,
        /// The shortest key's length.
        len: u16,
    },
}

fn flags_note(flags: Option<u16>) -> String {
    match flags {
        Some(flags) => format!(" (flags {flags:#x})"),
        None => " (or its header names another page)".to_owned(),
    }
}

/// The largest page, overflow included, either reader accepts (etcd values are at most
/// a few MiB); a larger one is [`Corruption::PageTooLarge`].
pub const MAX_PAGE_SPAN: u64 = 64 << 20;

/// The deepest a bucket's tree may be; real bbolt trees are a handful of levels.
pub const MAX_TREE_DEPTH: usize = 64;

const MAGIC: u32 = 0xED0C_DAED;
const FORMAT_VERSION: u32 = 2;
const PAGE_HEADER: usize = 16;
/// Branch and leaf elements are both 16 bytes.
const ELEMENT: usize = 16;
/// The meta struct follows the page header; its checksum covers the first 56 bytes.
const META_END: usize = PAGE_HEADER + 64;
const META_CHECKSUMMED: usize = 56;
const BUCKET_HEADER: usize = 16;
const BRANCH_FLAG: u16 = 0x01;
const LEAF_FLAG: u16 = 0x02;
const BUCKET_ELEMENT_FLAG: u32 = 0x01;
const MIN_PAGE_SIZE: u32 = 512;
const MAX_PAGE_SIZE: u32 = 16 << 20;
/// bbolt looks for the second meta page at 1024 << i for i in 0..=14 when the first
/// is unreadable.
const LAST_META_PROBE: u32 = 14;
const DIGEST_TRAILER: u64 = 32;
/// etcd's `key` bucket: keys are 8-byte main revision, '_', 8-byte sub revision.
const KEY_BUCKET: &[u8] = b"key";
const REVISION_KEY_LEN: u16 = 17;

/// How many bytes of a snapshot of `len` bytes are bbolt pages: etcd appends a SHA-256
/// digest when `len % 512 == 32` (the same test etcd's restore uses).
fn data_len(len: u64) -> u64 {
    if len % 512 == DIGEST_TRAILER {
        len - DIGEST_TRAILER
    } else {
        len
    }
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn fnv64a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A page header; callers pass at least `PAGE_HEADER` bytes.
#[derive(Debug, Clone, Copy)]
struct Header {
    id: u64,
    flags: u16,
    count: u16,
    overflow: u32,
}

fn header(page: &[u8]) -> Header {
    Header {
        id: le_u64(page, 0),
        flags: le_u16(page, 8),
        count: le_u16(page, 10),
        overflow: le_u32(page, 12),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    page_size: u32,
    root: u64,
    high_water_mark: u64,
    txid: u64,
}

/// Validates a meta page as bbolt does (magic, version, checksum) plus a sane page size.
fn parse_meta(page: &[u8]) -> Result<Meta, MetaProblem> {
    let m = page
        .get(PAGE_HEADER..META_END)
        .ok_or(MetaProblem::Missing)?;
    let magic = le_u32(m, 0);
    if magic != MAGIC {
        return Err(MetaProblem::BadMagic { found: magic });
    }
    let version = le_u32(m, 4);
    if version != FORMAT_VERSION {
        return Err(MetaProblem::BadVersion { found: version });
    }
    let stored = le_u64(m, META_CHECKSUMMED);
    let computed = fnv64a(&m[..META_CHECKSUMMED]);
    if stored != computed {
        return Err(MetaProblem::BadChecksum { stored, computed });
    }
    let page_size = le_u32(m, 8);
    if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
        return Err(MetaProblem::BadPageSize { page_size });
    }
    Ok(Meta {
        page_size,
        // m[12..16] are flags; m[24..32] the root bucket's sequence; m[32..40] the freelist.
        root: le_u64(m, 16),
        high_water_mark: le_u64(m, 40),
        txid: le_u64(m, 48),
    })
}

/// The meta page bbolt would use: the valid one with the higher txid (page 0 on a tie).
fn choose_meta(
    meta0: Result<Meta, MetaProblem>,
    meta1: Result<Meta, MetaProblem>,
) -> Result<(u64, Meta), Corruption> {
    match (meta0, meta1) {
        (Ok(a), Ok(b)) if b.txid > a.txid => Ok((1, b)),
        (Ok(a), _) => Ok((0, a)),
        (Err(_), Ok(b)) => Ok((1, b)),
        (Err(meta0), Err(meta1)) => Err(Corruption::NoValidMeta { meta0, meta1 }),
    }
}

/// What a leaf page (or an inline bucket's page) adds to the hash when it is part of a
/// top-level bucket. Kept for every leaf page of a stream, so it is small.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct LeafStats {
    /// CRC-32C of every key and value (only the key for nested buckets), in order.
    crc: u32,
    /// Bytes that went into `crc`: at most the page's size (elements may not overlap).
    len: u32,
    /// Elements: what `ForEach` yields.
    count: u16,
    /// The shortest key's length (saturated), to refuse what etcd would crash on.
    shortest_key: u16,
    /// Main revision in the last key's first 8 bytes (meaningful in the `key` bucket).
    last_main: i64,
}

/// A nested bucket found in a leaf page, needed when that page turns out to be part of
/// the root bucket (its entries are the top-level buckets).
#[derive(Debug, Clone, PartialEq, Eq)]
struct BucketEntry {
    name: Box<[u8]>,
    root: Result<BucketRoot, Corruption>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BucketRoot {
    /// The bucket's tree starts at this page.
    Page(u64),
    /// A small bucket stored inline; its one leaf page, summarised.
    Inline(LeafStats),
}

/// The bucket entries of a leaf page that has any.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Buckets {
    entries: Box<[BucketEntry]>,
    /// The first element that is a plain key/value pair, if any.
    first_plain: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LeafSummary {
    stats: LeafStats,
    /// `None` when no element is a bucket.
    buckets: Option<Box<Buckets>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PageNode {
    Branch(Box<[u64]>),
    Leaf(LeafSummary),
}

fn out_of_bounds(at: Location, what: String, start: u64, len: u64, size: usize) -> Corruption {
    Corruption::OutOfBounds {
        at,
        what,
        start,
        end: start.saturating_add(len),
        size: size as u64,
    }
}

/// The bytes `start..start + len` of `page`, or where they fail to fit.
fn slice(
    page: &[u8],
    start: u64,
    len: u64,
    at: Location,
    what: impl FnOnce() -> String,
) -> Result<&[u8], Corruption> {
    match start.checked_add(len) {
        Some(end) if end <= page.len() as u64 => Ok(&page[start as usize..end as usize]),
        _ => Err(out_of_bounds(at, what(), start, len, page.len())),
    }
}

/// The 16-byte element `index` of a branch or leaf page.
fn element<'a>(
    page: &'a [u8],
    index: u16,
    kind: &str,
    at: Location,
) -> Result<&'a [u8], Corruption> {
    let start = (PAGE_HEADER + ELEMENT * usize::from(index)) as u64;
    slice(page, start, ELEMENT as u64, at, || {
        format!("{kind} element {index}")
    })
}

/// Parses a branch or leaf page (`page` is the whole page, overflow included).
fn parse_tree_page(pgid: u64, page: &[u8], head: Header) -> Result<PageNode, Corruption> {
    let at = Location::Page(pgid);
    if head.flags == BRANCH_FLAG {
        if head.count == 0 {
            return Err(Corruption::EmptyBranch { pgid });
        }
        let mut children = Vec::with_capacity(usize::from(head.count));
        for index in 0..head.count {
            let e = element(page, index, "branch", at)?;
            let key_start =
                PAGE_HEADER as u64 + ELEMENT as u64 * u64::from(index) + u64::from(le_u32(e, 0));
            slice(page, key_start, u64::from(le_u32(e, 4)), at, || {
                format!("key of branch element {index}")
            })?;
            children.push(le_u64(e, 8));
        }
        Ok(PageNode::Branch(children.into_boxed_slice()))
    } else {
        scan_leaf(page, head.count, at, true).map(PageNode::Leaf)
    }
}

/// Summarises the elements of a leaf page. With `buckets`, bucket elements are also
/// decoded (their inline pages summarised, without looking further down), so the page
/// can serve as part of the root bucket.
fn scan_leaf(
    page: &[u8],
    count: u16,
    at: Location,
    buckets: bool,
) -> Result<LeafSummary, Corruption> {
    let mut stats = LeafStats {
        shortest_key: u16::MAX,
        count,
        ..LeafStats::default()
    };
    let mut entries = Vec::new();
    let mut first_plain = None;
    // In a real page keys and values do not overlap, so they add up to less than the
    // page; holding corrupt pages to that bounds the work to the page's size.
    let mut consumed = 0u64;
    for index in 0..count {
        let e = element(page, index, "leaf", at)?;
        let flags = le_u32(e, 0);
        let key_start =
            PAGE_HEADER as u64 + ELEMENT as u64 * u64::from(index) + u64::from(le_u32(e, 4));
        let key_len = u64::from(le_u32(e, 8));
        let value_len = u64::from(le_u32(e, 12));
        let key = slice(page, key_start, key_len, at, || {
            format!("key of leaf element {index}")
        })?;
        let value = slice(page, key_start + key_len, value_len, at, || {
            format!("value of leaf element {index}")
        })?;
        consumed += key_len + value_len;
        if consumed > page.len() as u64 {
            return Err(Corruption::OverlappingElements {
                at,
                index,
                size: page.len() as u64,
            });
        }
        stats.crc = crc32c::crc32c_append(stats.crc, key);
        // `consumed` is at most the page's size, itself at most MAX_PAGE_SPAN.
        stats.len += key.len() as u32;
        if flags & BUCKET_ELEMENT_FLAG != 0 {
            // ForEach yields a nested bucket as its key with a nil value.
            if buckets {
                let value_at = key_start + key_len;
                entries.push(BucketEntry {
                    name: key.into(),
                    root: bucket_root(value, at, index, value_at),
                });
            }
        } else {
            stats.crc = crc32c::crc32c_append(stats.crc, value);
            stats.len += value.len() as u32;
            first_plain.get_or_insert(index);
        }
        stats.shortest_key = stats
            .shortest_key
            .min(u16::try_from(key.len()).unwrap_or(u16::MAX));
        stats.last_main = match key.get(..8) {
            Some(main) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(main);
                i64::from_be_bytes(a)
            }
            None => 0,
        };
    }
    let buckets = (!entries.is_empty()).then(|| {
        Box::new(Buckets {
            entries: entries.into_boxed_slice(),
            first_plain,
        })
    });
    Ok(LeafSummary { stats, buckets })
}

/// Decodes a bucket value: header (root pgid, sequence), then the page if inline.
fn bucket_root(
    value: &[u8],
    at: Location,
    index: u16,
    value_at: u64,
) -> Result<BucketRoot, Corruption> {
    let bad_header = || Corruption::BadBucketHeader {
        at,
        index,
        len: value.len() as u64,
    };
    if value.len() < BUCKET_HEADER {
        return Err(bad_header());
    }
    let root = le_u64(value, 0);
    if root != 0 {
        return Ok(BucketRoot::Page(root));
    }
    let inline = &value[BUCKET_HEADER..];
    if inline.len() < PAGE_HEADER {
        return Err(bad_header());
    }
    let page = match at {
        Location::Page(page) | Location::Meta(page) | Location::Inline { page, .. } => page,
    };
    let inline_at = Location::Inline {
        page,
        offset: value_at,
    };
    let head = header(inline);
    if head.flags != LEAF_FLAG {
        return Err(Corruption::InlineNotLeaf {
            at: inline_at,
            flags: head.flags,
        });
    }
    scan_leaf(inline, head.count, inline_at, false).map(|leaf| BucketRoot::Inline(leaf.stats))
}

/// Where the walk gets pages from: the file itself, or the summaries of a stream.
trait PageSource {
    /// Page `pgid` (below the high water mark) as a branch or leaf. Once its overflow
    /// is known, and before reading further, the page's blocks are claimed in `seen`.
    fn load(
        &mut self,
        pgid: u64,
        from: Location,
        high_water_mark: u64,
        seen: &mut Seen,
    ) -> Result<PageNode, StatusError>;
}

/// One bit per page: reached by the walk already. Claiming a page's overflow blocks too
/// means no byte is read twice, so the walk's work is bounded by the file's size.
struct Seen(Vec<u64>);

impl Seen {
    fn new(pages: u64) -> Self {
        Seen(vec![0; pages.div_ceil(64) as usize])
    }

    /// Marks `pgid ..= pgid + overflow` (already checked to be below the high water mark).
    fn claim(&mut self, pgid: u64, overflow: u32, from: Location) -> Result<(), Corruption> {
        for block in pgid..=pgid + u64::from(overflow) {
            let (word, bit) = ((block / 64) as usize, 1u64 << (block % 64));
            if self.0[word] & bit != 0 {
                return Err(Corruption::ReachedTwice { pgid, from });
            }
            self.0[word] |= bit;
        }
        Ok(())
    }
}

/// Checks a page's header the way both sources do.
fn check_header(
    pgid: u64,
    head: Header,
    from: Location,
    high_water_mark: u64,
    page_size: u64,
) -> Result<u64, Corruption> {
    if head.id != pgid {
        return Err(Corruption::PageIdMismatch {
            pgid,
            found: head.id,
        });
    }
    if head.flags != BRANCH_FLAG && head.flags != LEAF_FLAG {
        return Err(Corruption::NotATreePage {
            pgid,
            flags: Some(head.flags),
            from,
        });
    }
    check_span(pgid, head.overflow, from, high_water_mark, page_size)
}

/// The page's size in bytes, if it ends below the high water mark and is not too big.
fn check_span(
    pgid: u64,
    overflow: u32,
    from: Location,
    high_water_mark: u64,
    page_size: u64,
) -> Result<u64, Corruption> {
    if pgid + u64::from(overflow) >= high_water_mark {
        return Err(Corruption::PageOutOfRange {
            pgid,
            overflow,
            high_water_mark,
            from,
        });
    }
    let span = (u64::from(overflow) + 1) * page_size;
    if span > MAX_PAGE_SPAN {
        return Err(Corruption::PageTooLarge {
            pgid,
            overflow,
            span,
        });
    }
    Ok(span)
}

/// Walks the tree in key order, as etcd's status does, and adds things up.
struct Walk<S> {
    source: S,
    high_water_mark: u64,
    seen: Seen,
    hash: u32,
    total_key: u64,
    revision: i64,
}

impl<S: PageSource> Walk<S> {
    fn load(&mut self, pgid: u64, from: Location, depth: usize) -> Result<PageNode, StatusError> {
        if depth >= MAX_TREE_DEPTH {
            return Err(Corruption::TooDeep { pgid, depth }.into());
        }
        if pgid >= self.high_water_mark {
            return Err(Corruption::PageOutOfRange {
                pgid,
                overflow: 0,
                high_water_mark: self.high_water_mark,
                from,
            }
            .into());
        }
        self.source
            .load(pgid, from, self.high_water_mark, &mut self.seen)
    }

    /// The root bucket's tree: its entries are the top-level buckets.
    fn root_tree(&mut self, pgid: u64, from: Location, depth: usize) -> Result<(), StatusError> {
        match self.load(pgid, from, depth)? {
            PageNode::Branch(children) => {
                for &child in children.iter() {
                    self.root_tree(child, Location::Page(pgid), depth + 1)?;
                }
            }
            PageNode::Leaf(leaf) => {
                let at = Location::Page(pgid);
                let Some(buckets) = leaf.buckets else {
                    if leaf.stats.count > 0 {
                        return Err(Corruption::NotABucket { at, index: 0 }.into());
                    }
                    return Ok(());
                };
                if let Some(index) = buckets.first_plain {
                    return Err(Corruption::NotABucket { at, index }.into());
                }
                for entry in buckets.entries.iter() {
                    self.hash = crc32c::crc32c_combine(
                        self.hash,
                        crc32c::crc32c(&entry.name),
                        entry.name.len(),
                    );
                    let is_key = &*entry.name == KEY_BUCKET;
                    match entry.root.clone()? {
                        BucketRoot::Page(root) => self.bucket_tree(root, at, 0, is_key)?,
                        BucketRoot::Inline(stats) => self.add_leaf(stats, at, is_key)?,
                    }
                }
            }
        }
        Ok(())
    }

    /// A top-level bucket's tree: every leaf element is hashed and counted.
    fn bucket_tree(
        &mut self,
        pgid: u64,
        from: Location,
        depth: usize,
        is_key: bool,
    ) -> Result<(), StatusError> {
        match self.load(pgid, from, depth)? {
            PageNode::Branch(children) => {
                for &child in children.iter() {
                    self.bucket_tree(child, Location::Page(pgid), depth + 1, is_key)?;
                }
                Ok(())
            }
            PageNode::Leaf(leaf) => self.add_leaf(leaf.stats, Location::Page(pgid), is_key),
        }
    }

    fn add_leaf(
        &mut self,
        stats: LeafStats,
        at: Location,
        is_key: bool,
    ) -> Result<(), StatusError> {
        if stats.count == 0 {
            return Ok(());
        }
        if is_key {
            if stats.shortest_key < REVISION_KEY_LEN {
                return Err(Corruption::BadRevisionKey {
                    at,
                    len: stats.shortest_key,
                }
                .into());
            }
            self.revision = stats.last_main;
        }
        self.hash = crc32c::crc32c_combine(self.hash, stats.crc, stats.len as usize);
        self.total_key += u64::from(stats.count);
        Ok(())
    }
}

/// Checks the file is long enough for the chosen meta page, then walks the tree.
fn compute<S: PageSource>(
    source: S,
    meta_page: u64,
    meta: Meta,
    page_size: u64,
    data_len: u64,
) -> Result<SnapshotStatus, StatusError> {
    let expected = meta.high_water_mark.checked_mul(page_size);
    if expected.is_none_or(|expected| expected > data_len) {
        return Err(Corruption::Truncated {
            len: data_len,
            expected: expected.unwrap_or(u64::MAX),
            page_size,
            high_water_mark: meta.high_water_mark,
        }
        .into());
    }
    // The high water mark is at most data_len / page_size, so the bitmap is small.
    let mut walk = Walk {
        source,
        high_water_mark: meta.high_water_mark,
        seen: Seen::new(meta.high_water_mark),
        hash: 0,
        total_key: 0,
        revision: 0,
    };
    walk.root_tree(meta.root, Location::Meta(meta_page), 0)?;
    Ok(SnapshotStatus {
        hash: walk.hash,
        revision: walk.revision,
        total_key: walk.total_key,
        total_size: meta.high_water_mark * page_size,
    })
}

/// Computes `etcdctl snapshot status` for a snapshot read through `reader`.
///
/// Reads the meta pages, then only the pages the tree reaches, one at a time: memory is
/// one page (at most [`MAX_PAGE_SPAN`]) plus a bit per page, whatever the file size.
///
/// # Errors
///
/// [`StatusError::Read`] when reading or seeking fails, and [`StatusError::Corrupt`]
/// when the file is not a well-formed bbolt database (bad magic or meta checksum,
/// truncated, a page out of range or malformed, a cycle).
pub fn status_of<R: Read + Seek>(mut reader: R) -> Result<SnapshotStatus, StatusError> {
    let len = reader
        .seek(SeekFrom::End(0))
        .map_err(|source| StatusError::Read { offset: 0, source })?;
    let data_len = data_len(len);
    if data_len < META_END as u64 {
        return Err(Corruption::TooShort { len }.into());
    }
    let mut head = [0u8; META_END];
    read_at(&mut reader, 0, &mut head)?;
    let meta0 = parse_meta(&head);
    let (page_size, meta1) = match meta0 {
        Ok(meta) => {
            let page_size = u64::from(meta.page_size);
            let meta1 = if page_size + META_END as u64 <= data_len {
                read_at(&mut reader, page_size, &mut head)?;
                parse_meta(&head)
            } else {
                Err(MetaProblem::Missing)
            };
            (page_size, meta1)
        }
        Err(_) => {
            let mut found = None;
            for probe in 0..=LAST_META_PROBE {
                let at = 1024u64 << probe;
                if at + META_END as u64 > data_len {
                    break;
                }
                read_at(&mut reader, at, &mut head)?;
                if let Ok(meta) = parse_meta(&head) {
                    if u64::from(meta.page_size) == at {
                        found = Some(meta);
                        break;
                    }
                }
            }
            match found {
                Some(meta) => (u64::from(meta.page_size), Ok(meta)),
                None => (0, Err(MetaProblem::NotFound)),
            }
        }
    };
    let (meta_page, meta) = choose_meta(meta0, meta1)?;
    let source = FilePages {
        reader,
        page_size,
        buf: Vec::new(),
    };
    compute(source, meta_page, meta, page_size, data_len)
}

/// Computes `etcdctl snapshot status` for the snapshot file at `path`.
///
/// # Errors
///
/// As [`status_of`], with [`StatusError::Open`] and [`StatusError::ReadFile`] naming
/// the file.
pub fn status_of_file(path: &Path) -> Result<SnapshotStatus, StatusError> {
    let file = std::fs::File::open(path).map_err(|source| StatusError::Open {
        path: path.to_owned(),
        source,
    })?;
    status_of(file).map_err(|e| match e {
        StatusError::Read { offset, source } => StatusError::ReadFile {
            path: path.to_owned(),
            offset,
            source,
        },
        other => other,
    })
}

fn read_at<R: Read + Seek>(reader: &mut R, offset: u64, buf: &mut [u8]) -> Result<(), StatusError> {
    reader
        .seek(SeekFrom::Start(offset))
        .and_then(|_| reader.read_exact(buf))
        .map_err(|source| StatusError::Read { offset, source })
}

/// Pages read from the file on demand.
struct FilePages<R> {
    reader: R,
    page_size: u64,
    buf: Vec<u8>,
}

impl<R: Read + Seek> PageSource for FilePages<R> {
    fn load(
        &mut self,
        pgid: u64,
        from: Location,
        high_water_mark: u64,
        seen: &mut Seen,
    ) -> Result<PageNode, StatusError> {
        // pgid < high_water_mark, and high_water_mark * page_size fits the file.
        let offset = pgid * self.page_size;
        let mut head = [0u8; PAGE_HEADER];
        read_at(&mut self.reader, offset, &mut head)?;
        let head = header(&head);
        let span = check_header(pgid, head, from, high_water_mark, self.page_size)?;
        seen.claim(pgid, head.overflow, from)?;
        self.buf.resize(span as usize, 0);
        read_at(&mut self.reader, offset, &mut self.buf)?;
        Ok(parse_tree_page(pgid, &self.buf, head)?)
    }
}

/// Computes the status of a snapshot while it streams past, without keeping it.
///
/// Pages arrive in file order but etcd hashes in key order, so each branch or leaf page
/// is summarised as it completes (leaf: CRC-32C and length of its keys and values,
/// element count, shortest key, last key's revision; branch: its children) and
/// [`finish`](Self::finish) walks the summaries in key order, joining the CRCs with
/// CRC-32C's combine. Free pages are summarised too and simply never reached. A page's
/// header is never trusted to skip the blocks after it (a free page may claim overflow
/// blocks since reused), so every block is also read as a possible page of its own.
///
/// The summaries go to two unlinked temporary files in [`std::env::temp_dir`] (the
/// directory `TMPDIR` names, else `/tmp`), so memory does not grow with the database;
/// nothing is left behind however the process ends. If they cannot be created or
/// written, [`finish`](Self::finish) returns [`StatusError::Spill`] saying where;
/// [`try_new`](Self::try_new) reports a failure to create them at once.
///
/// # Memory
///
/// Bounded, whatever the database size:
/// - Two 64 KiB buffers of summaries on their way to the files, and at
///   [`finish`](Self::finish) one 64 KiB buffer of summaries read back (what is
///   read comes through the page cache, which is not the process's memory).
/// - The bytes of a page with overflow while it arrives (no more than
///   [`MAX_PAGE_SPAN`], held in a buffer at most twice that), and otherwise one page.
///   An etcd value is at most a few MiB, so for a real database this is a few MiB
///   at most, and one page for values of a few KiB.
/// - Only while meta page 0 is invalid (never in a snapshot etcd sent intact), up to
///   16 MiB kept to find meta page 1.
/// - At [`finish`](Self::finish), one bit per page (256 KiB for 8 GiB of 4 KiB
///   pages), and the children of the branch pages on the path being walked.
///
/// # Disk
///
/// 32 bytes per page of the stream (up to its last branch or leaf page), plus 8 bytes
/// per child of each branch page and a copy of the few pages that hold bucket
/// entries or fail to parse: about 40 bytes per 4 KiB page of a real database, 1% of
/// its size (some 80 MiB for etcd's 8 GiB quota).
#[derive(Debug)]
pub struct StreamingStatus {
    /// Bytes fed so far.
    received: u64,
    /// Bytes from the start of the stream until the page size is known.
    head: Vec<u8>,
    /// 0 until the page size is known.
    page_size: u64,
    /// The next offset (1024 << probe) to look for meta page 1 at, while meta page 0 is invalid.
    probe: u32,
    /// No meta page was found where bbolt looks; the rest of the stream is ignored.
    lost: bool,
    meta0: Option<Result<Meta, MetaProblem>>,
    meta1: Option<Result<Meta, MetaProblem>>,
    /// Bytes from block `window_base` on; block = page-size slice of the stream.
    window: Vec<u8>,
    window_base: u64,
    /// The next block to complete.
    next_block: u64,
    /// First blocks of the pages with overflow still arriving.
    pending_firsts: BTreeSet<u64>,
    /// The same pages by last block, soonest first: `Reverse((last, first))`.
    pending_ends: BinaryHeap<Reverse<(u64, u64)>>,
    /// Bytes of pages with overflow parsed so far; see `overflow_budget`.
    overflow_parsed: u64,
    /// The page summaries.
    spill: Spill,
}

/// Records what the walk needs of page `pgid` (spanning `overflow` more blocks, whose
/// bytes are `bytes`), parsed as `node`.
fn store_page(
    spill: &mut Spill,
    pgid: u64,
    overflow: u32,
    bytes: &[u8],
    node: Result<PageNode, Corruption>,
) {
    let record = match node {
        Ok(PageNode::Leaf(LeafSummary {
            stats,
            buckets: None,
        })) => Record {
            stats,
            ..Record::new(Kind::Leaf, overflow)
        },
        Ok(PageNode::Branch(children)) => {
            let list: Vec<u8> = children.iter().flat_map(|c| c.to_le_bytes()).collect();
            Record {
                // A branch page has at most u16::MAX elements.
                stats: LeafStats {
                    count: children.len() as u16,
                    ..LeafStats::default()
                },
                offset: spill.append(&list),
                ..Record::new(Kind::Branch, overflow)
            }
        }
        Err(Corruption::PageTooLarge { .. }) => Record::new(Kind::TooLarge, overflow),
        Err(Corruption::OverlappingOverflow { .. }) => {
            Record::new(Kind::OverlappingOverflow, overflow)
        }
        // A leaf with bucket entries, or a page that failed to parse: rare, and
        // parsing the same bytes again at the end gives the same result.
        _ => Record {
            // At most MAX_PAGE_SPAN bytes.
            stats: LeafStats {
                len: bytes.len() as u32,
                ..LeafStats::default()
            },
            offset: spill.append(bytes),
            ..Record::new(Kind::Raw, overflow)
        },
    };
    spill.put(pgid, &record);
}

impl Default for StreamingStatus {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamingStatus {
    /// A builder that has seen no bytes. If its temporary files cannot be created,
    /// [`finish`](Self::finish) says so; see [`try_new`](Self::try_new).
    pub fn new() -> Self {
        Self::new_in(&std::env::temp_dir())
    }

    /// As [`new`](Self::new), with the temporary files in `dir`.
    fn new_in(dir: &Path) -> Self {
        Self::with_spill(Spill::create_in(dir).unwrap_or_else(|e| Spill::failed(dir, e)))
    }

    /// A builder that has seen no bytes, or the error if its temporary files cannot
    /// be created.
    ///
    /// # Errors
    ///
    /// [`StatusError::Spill`] naming the directory.
    pub fn try_new() -> Result<Self, StatusError> {
        Ok(Self::with_spill(Spill::create_in(&std::env::temp_dir())?))
    }

    fn with_spill(spill: Spill) -> Self {
        StreamingStatus {
            received: 0,
            head: Vec::new(),
            page_size: 0,
            probe: 0,
            lost: false,
            meta0: None,
            meta1: None,
            window: Vec::new(),
            window_base: 0,
            next_block: 0,
            pending_firsts: BTreeSet::new(),
            pending_ends: BinaryHeap::new(),
            overflow_parsed: 0,
            spill,
        }
    }

    /// Bytes this builder holds in memory (its buffers' capacities), for tests.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.head.capacity()
            + self.window.capacity()
            + self.pending_firsts.len() * 16
            + self.pending_ends.capacity() * 16
            + self.spill.heap_bytes()
    }

    /// The failure to create or write the temporary files so far, if any: the same
    /// error [`finish`](Self::finish) will return.
    pub fn spill_failure(&self) -> Option<&StatusError> {
        self.spill.failure()
    }

    /// Feeds the next bytes of the snapshot, exactly as written to the file, in any
    /// chunk sizes.
    pub fn update(&mut self, mut chunk: &[u8]) {
        self.received += chunk.len() as u64;
        while self.page_size == 0 && !self.lost && !chunk.is_empty() {
            let room = (1024usize << LAST_META_PROBE) + META_END - self.head.len();
            let take = chunk.len().min(room);
            self.head.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            self.find_page_size();
            if self.page_size != 0 {
                let head = std::mem::take(&mut self.head);
                self.feed_blocks(&head);
            } else if take == room {
                self.lost = true;
                self.head = Vec::new();
            }
        }
        if self.page_size != 0 && !chunk.is_empty() {
            self.feed_blocks(chunk);
        }
    }

    /// Looks for the page size in the head, as bbolt does: meta page 0, else a valid
    /// meta page at 1 KiB, 2 KiB, … 16 MiB.
    fn find_page_size(&mut self) {
        if self.meta0.is_none() {
            if self.head.len() < META_END {
                return;
            }
            let meta0 = parse_meta(&self.head);
            if let Ok(meta) = meta0 {
                self.page_size = u64::from(meta.page_size);
            }
            self.meta0 = Some(meta0);
            if self.page_size != 0 {
                return;
            }
        }
        while self.probe <= LAST_META_PROBE {
            let at = 1024usize << self.probe;
            let Some(candidate) = self.head.get(at..at + META_END) else {
                return;
            };
            // parse_meta wants the page start; the candidate's header is its first 16 bytes.
            if let Ok(meta) = parse_meta(candidate) {
                if meta.page_size as usize == at {
                    self.page_size = at as u64;
                    self.meta1 = Some(Ok(meta));
                    return;
                }
            }
            self.probe += 1;
        }
        self.lost = true;
        self.head = Vec::new();
    }

    fn feed_blocks(&mut self, bytes: &[u8]) {
        self.window.extend_from_slice(bytes);
        let page_size = self.page_size as usize;
        loop {
            let start = (self.next_block - self.window_base) as usize * page_size;
            if start + page_size > self.window.len() {
                break;
            }
            self.complete_block(self.next_block, start);
            self.next_block += 1;
        }
        // Drop what no page still needs, once that is at least half the buffer, so
        // the copying stays proportional to the bytes fed.
        let keep_from = self
            .pending_firsts
            .first()
            .copied()
            .unwrap_or(self.next_block);
        let dead = (keep_from - self.window_base) as usize * page_size;
        if dead > 0 && dead * 2 >= self.window.len() {
            self.window.drain(..dead);
            self.window_base = keep_from;
        }
    }

    /// Block `block` is complete at `self.window[start..start + page_size]`.
    fn complete_block(&mut self, block: u64, start: usize) {
        let page_size = self.page_size as usize;
        let bytes = &self.window[start..start + page_size];
        if block == 1 && self.meta1.is_none() {
            self.meta1 = Some(parse_meta(bytes));
        }
        let head = header(bytes);
        if head.id == block && (head.flags == BRANCH_FLAG || head.flags == LEAF_FLAG) {
            if head.overflow == 0 {
                let node = parse_tree_page(block, bytes, head);
                store_page(&mut self.spill, block, 0, bytes, node);
            } else {
                let span = (u64::from(head.overflow) + 1) * self.page_size;
                if span > MAX_PAGE_SPAN {
                    let too_large = Corruption::PageTooLarge {
                        pgid: block,
                        overflow: head.overflow,
                        span,
                    };
                    store_page(&mut self.spill, block, head.overflow, &[], Err(too_large));
                } else {
                    self.pending_firsts.insert(block);
                    let last = block + u64::from(head.overflow);
                    self.pending_ends.push(Reverse((last, block)));
                }
            }
        }
        while let Some(&Reverse((last, first))) = self.pending_ends.peek() {
            if last != block {
                break;
            }
            self.pending_ends.pop();
            self.pending_firsts.remove(&first);
            let from = (first - self.window_base) as usize * page_size;
            let page = &self.window[from..start + page_size];
            let head = header(page);
            let span = page.len() as u64;
            let node = if self.overflow_parsed + span > self.overflow_budget() {
                Err(Corruption::OverlappingOverflow { pgid: first })
            } else {
                self.overflow_parsed += span;
                parse_tree_page(first, page, head)
            };
            store_page(&mut self.spill, first, head.overflow, page, node);
        }
    }

    /// How many bytes of pages with overflow are worth parsing. Any byte is parsed once
    /// as part of a page without overflow; pages with overflow may overlap (a free
    /// page's stale header can claim blocks since reused), but in a real database not
    /// by much. Without a limit, made-up headers that all claim 64 MiB would make the
    /// work grow with the square of the stream.
    fn overflow_budget(&self) -> u64 {
        4 * self.received + 2 * MAX_PAGE_SPAN
    }

    /// Computes the status once the last byte has been fed.
    ///
    /// # Errors
    ///
    /// [`StatusError::Corrupt`] when the stream is not a well-formed bbolt database, as
    /// for [`status_of`].
    pub fn finish(mut self) -> Result<SnapshotStatus, StatusError> {
        let data_len = data_len(self.received);
        let Some(meta0) = self.meta0.take() else {
            return Err(Corruption::TooShort { len: self.received }.into());
        };
        if self.page_size == 0 {
            return Err(Corruption::NoValidMeta {
                meta0: meta0.err().unwrap_or(MetaProblem::Missing),
                meta1: MetaProblem::NotFound,
            }
            .into());
        }
        let meta1 = self.meta1.take().unwrap_or(Err(MetaProblem::Missing));
        let (meta_page, meta) = choose_meta(meta0, meta1)?;
        // Pages whose overflow runs past the end of the stream.
        for Reverse((last, first)) in std::mem::take(&mut self.pending_ends) {
            let overflow = u32::try_from(last - first).unwrap_or(u32::MAX);
            self.spill.put(first, &Record::new(Kind::PastEnd, overflow));
        }
        let source = StreamPages {
            spill: self.spill.finish()?,
            page_size: self.page_size,
        };
        compute(source, meta_page, meta, self.page_size, data_len)
    }
}

impl io::Write for StreamingStatus {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Page summaries of a finished stream, read back from its spill files.
struct StreamPages {
    spill: SpillReader,
    page_size: u64,
}

impl PageSource for StreamPages {
    fn load(
        &mut self,
        pgid: u64,
        from: Location,
        high_water_mark: u64,
        seen: &mut Seen,
    ) -> Result<PageNode, StatusError> {
        let record = self.spill.record(pgid)?;
        if record.kind == Kind::Absent {
            return Err(Corruption::NotATreePage {
                pgid,
                flags: None,
                from,
            }
            .into());
        }
        let overflow = record.overflow;
        let span = check_span(pgid, overflow, from, high_water_mark, self.page_size)?;
        seen.claim(pgid, overflow, from)?;
        let node = match record.kind {
            Kind::Absent | Kind::Leaf => Ok(PageNode::Leaf(LeafSummary {
                stats: record.stats,
                buckets: None,
            })),
            Kind::Branch => {
                let count = usize::from(record.stats.count);
                let list = self.spill.side(record.offset, count * 8)?;
                let children = list.chunks_exact(8).map(|c| le_u64(c, 0)).collect();
                Ok(PageNode::Branch(children))
            }
            Kind::Raw => {
                let bytes = self.spill.side(record.offset, record.stats.len as usize)?;
                if bytes.len() < PAGE_HEADER {
                    return Err(self.spill.error(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a page copy is too short",
                    )));
                }
                parse_tree_page(pgid, &bytes, header(&bytes))
            }
            Kind::TooLarge => Err(Corruption::PageTooLarge {
                pgid,
                overflow,
                span,
            }),
            Kind::OverlappingOverflow => Err(Corruption::OverlappingOverflow { pgid }),
            Kind::PastEnd => Err(Corruption::PageOutOfRange {
                pgid,
                overflow,
                high_water_mark,
                from: Location::Page(pgid),
            }),
        };
        Ok(node?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::io::Cursor;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    /// Snapshots taken from a real etcd 3.4 with `etcdctl snapshot save`, with what
    /// `etcdctl snapshot status -w json` printed for each.
    const FIXTURES: &[&str] = &[
        "empty",
        "few-keys",
        "many-keys",
        "compacted-defragged",
        "big-values",
        "deep-tree",
    ];

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/snapshots")
    }

    fn fixture(name: &str) -> (Vec<u8>, SnapshotStatus) {
        let dir = fixture_dir();
        let gz = std::fs::read(dir.join(format!("{name}.db.gz"))).unwrap();
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut bytes)
            .unwrap();
        let json = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
        (bytes, serde_json::from_str(&json).unwrap())
    }

    fn stream(bytes: &[u8], chunk: usize) -> Result<SnapshotStatus, StatusError> {
        let mut status = StreamingStatus::new();
        for piece in bytes.chunks(chunk.max(1)) {
            status.update(piece);
        }
        status.finish()
    }

    #[test]
    fn snapshot_status_equals_etcdctl_on_every_fixture() {
        for name in FIXTURES {
            let (bytes, expected) = fixture(name);
            assert_eq!(
                bytes.len() % 512,
                32,
                "{name}: fixture should have etcd's digest trailer"
            );
            let got = status_of(Cursor::new(&bytes)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got, expected, "{name}: status_of");

            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("{name}.db"));
            std::fs::write(&path, &bytes).unwrap();
            assert_eq!(
                status_of_file(&path).unwrap(),
                expected,
                "{name}: status_of_file"
            );
        }
    }

    #[test]
    fn snapshot_status_streaming_equals_etcdctl_in_any_chunk_size() {
        for name in FIXTURES {
            let (bytes, expected) = fixture(name);
            for chunk in [1, 7, 4096, 65536, bytes.len()] {
                let got = stream(&bytes, chunk).unwrap_or_else(|e| panic!("{name}/{chunk}: {e}"));
                assert_eq!(got, expected, "{name}: chunks of {chunk}");
            }
            let mut writer = StreamingStatus::new();
            io::copy(&mut Cursor::new(&bytes), &mut writer).unwrap();
            assert_eq!(writer.finish().unwrap(), expected, "{name}: io::Write");
        }
    }

    #[test]
    fn snapshot_status_ignores_a_missing_digest_trailer() {
        for name in FIXTURES {
            let (bytes, expected) = fixture(name);
            let bare = &bytes[..bytes.len() - 32];
            assert_eq!(status_of(Cursor::new(bare)).unwrap(), expected, "{name}");
            assert_eq!(stream(bare, 4096).unwrap(), expected, "{name}");
        }
    }

    #[test]
    fn snapshot_status_serializes_with_etcdctl_field_names() {
        for name in FIXTURES {
            let (_, expected) = fixture(name);
            let etcdctl: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(fixture_dir().join(format!("{name}.json"))).unwrap(),
            )
            .unwrap();
            assert_eq!(serde_json::to_value(expected).unwrap(), etcdctl, "{name}");
        }
    }

    #[test]
    fn snapshot_status_fixtures_cover_overflow_pages_and_tall_trees() {
        // What the fixtures are for: check they still contain it.
        let (bytes, _) = fixture("big-values");
        let max_overflow = page_headers(&bytes).map(|(_, h)| h.overflow).max().unwrap();
        assert!(
            max_overflow >= 24,
            "a 100 KiB value spans 25 pages: {max_overflow}"
        );

        let (bytes, _) = fixture("deep-tree");
        let depth = key_bucket_depth(&bytes);
        assert!(
            depth >= 3,
            "branch over branch over leaf, got depth {depth}"
        );
    }

    /// Headers of the pages of a 4 KiB-page file whose id matches their position.
    fn page_headers(bytes: &[u8]) -> impl Iterator<Item = (u64, Header)> + '_ {
        bytes
            .chunks_exact(4096)
            .enumerate()
            .map(|(i, page)| (i as u64, header(page)))
            .filter(|(i, h)| h.id == *i)
    }

    fn root_entries(bytes: &[u8]) -> (u64, Vec<BucketEntry>) {
        let meta = parse_meta(bytes).unwrap();
        let page = &bytes[meta.root as usize * 4096..][..4096];
        let PageNode::Leaf(leaf) = parse_tree_page(meta.root, page, header(page)).unwrap() else {
            panic!("root bucket is not one leaf");
        };
        (meta.root, leaf.buckets.unwrap().entries.into_vec())
    }

    fn key_bucket_root(bytes: &[u8]) -> u64 {
        let (_, entries) = root_entries(bytes);
        let key = entries.iter().find(|e| &*e.name == KEY_BUCKET).unwrap();
        match key.root.clone().unwrap() {
            BucketRoot::Page(root) => root,
            BucketRoot::Inline(_) => panic!("key bucket is inline"),
        }
    }

    fn key_bucket_depth(bytes: &[u8]) -> usize {
        let mut pgid = key_bucket_root(bytes);
        let mut depth = 1;
        loop {
            let page = &bytes[pgid as usize * 4096..][..4096];
            match parse_tree_page(pgid, page, header(page)).unwrap() {
                PageNode::Branch(children) => {
                    pgid = children[0];
                    depth += 1;
                }
                PageNode::Leaf(_) => return depth,
            }
        }
    }

    fn both(
        bytes: &[u8],
    ) -> (
        Result<SnapshotStatus, StatusError>,
        Result<SnapshotStatus, StatusError>,
    ) {
        (status_of(Cursor::new(bytes)), stream(bytes, 4096))
    }

    fn corruption(result: Result<SnapshotStatus, StatusError>) -> Corruption {
        match result {
            Err(StatusError::Corrupt(c)) => c,
            other => panic!("expected a corruption error, got {other:?}"),
        }
    }

    #[test]
    fn snapshot_status_streaming_memory_does_not_grow_with_the_database() {
        use synthetic::*;
        // A bucket of 40,000 leaf pages (1 KiB) under four levels of branch pages,
        // 41 MB in all: the summaries alone were 1.6 MB when kept in memory.
        let leaves = 40_000u64;
        let keys: Vec<Vec<u8>> = (0..leaves).map(|i| revision(i + 1, 0)).collect();
        let mut pages = Vec::new();
        // (index of the first key under it, page id): the leaves are pages 3, 4, ...
        let mut level: Vec<(usize, u64)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let value = format!("value {i:0>600}");
            let id = 3 + i as u64;
            pages.push(leaf(id, &[(0, key, value.as_bytes())]));
            level.push((i, id));
        }
        let mut next_id = 3 + leaves;
        while level.len() > 1 {
            let mut above = Vec::new();
            for group in level.chunks(20) {
                let children: Vec<(&[u8], u64)> =
                    group.iter().map(|&(k, id)| (&keys[k][..], id)).collect();
                pages.push(branch(next_id, &children));
                above.push((group[0].0, next_id));
                next_id += 1;
            }
            level = above;
        }
        pages.insert(0, leaf(2, &[(1, b"key", &bucket_at(level[0].1))]));
        let bytes = db(2, &pages);
        let expected = status_of(Cursor::new(&bytes)).unwrap();
        assert_eq!(expected.total_key, leaves);
        assert_eq!(expected.revision, leaves as i64);

        let mut status = StreamingStatus::try_new().unwrap();
        let mut most = 0;
        for piece in bytes.chunks(32 << 10) {
            status.update(piece);
            most = most.max(status.heap_bytes());
        }
        assert!(
            most <= 256 << 10,
            "{most} bytes held while streaming {} bytes",
            bytes.len()
        );
        assert_eq!(status.finish().unwrap(), expected);
    }

    #[test]
    fn snapshot_status_streaming_says_which_directory_its_files_could_not_go_to() {
        let (bytes, _) = fixture("few-keys");
        let missing = tempfile::tempdir().unwrap().path().join("gone");
        let mut status = StreamingStatus::new_in(&missing);
        let failure = status.spill_failure().expect("no failure").to_string();
        status.update(&bytes);
        let e = status.finish().unwrap_err();
        assert!(!e.is_corrupt());
        let message = e.to_string();
        assert_eq!(message, failure);
        assert!(
            message.starts_with(&format!(
                "cannot create the temporary files of the snapshot status in {}",
                missing.display()
            )) && message.contains("TMPDIR"),
            "{message}"
        );
    }

    #[test]
    fn spill_records_round_trip() {
        let stats = LeafStats {
            crc: 0xdead_beef,
            len: 4000,
            count: 17,
            shortest_key: 3,
            last_main: -5,
        };
        for record in [
            spill::Record {
                stats,
                ..spill::Record::new(Kind::Leaf, 9)
            },
            spill::Record {
                stats: LeafStats {
                    count: 300,
                    ..LeafStats::default()
                },
                offset: 1 << 40,
                ..spill::Record::new(Kind::Branch, 0)
            },
            spill::Record::new(Kind::PastEnd, u32::MAX),
        ] {
            assert_eq!(spill::Record::decode(&record.encode()), Some(record));
        }
        assert_eq!(spill::Record::decode(&[7; spill::RECORD]), None);
    }

    #[test]
    fn crc32c_combine_equals_the_crc_of_the_concatenation() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let a: Vec<u8> = (0..rng.random_range(0..300))
                .map(|_| rng.random())
                .collect();
            let b: Vec<u8> = (0..rng.random_range(0..5000))
                .map(|_| rng.random())
                .collect();
            let whole = crc32c::crc32c(&[a.as_slice(), b.as_slice()].concat());
            let joined = crc32c::crc32c_combine(crc32c::crc32c(&a), crc32c::crc32c(&b), b.len());
            assert_eq!(joined, whole, "{} + {} bytes", a.len(), b.len());
        }
    }

    #[test]
    fn snapshot_status_falls_back_to_meta_page_1_when_meta_page_0_is_damaged() {
        let (mut bytes, expected) = fixture("many-keys");
        bytes[16 + 40] ^= 0x01; // meta 0's high water mark: checksum no longer matches
        let (file, streamed) = both(&bytes);
        assert_eq!(file.unwrap(), expected);
        assert_eq!(streamed.unwrap(), expected);

        let (mut bytes, expected) = fixture("few-keys");
        bytes[16..20].copy_from_slice(&0u32.to_le_bytes()); // meta 0's magic
        let (file, streamed) = both(&bytes);
        assert_eq!(file.unwrap(), expected);
        assert_eq!(streamed.unwrap(), expected);
    }

    #[test]
    fn snapshot_status_rejects_damage_to_both_meta_pages() {
        let (mut bytes, _) = fixture("few-keys");
        bytes[16] ^= 0xff; // meta 0 magic
        bytes[4096 + 16 + 4] = 3; // meta 1 version
        let (file, streamed) = both(&bytes);
        for result in [file, streamed] {
            let c = corruption(result);
            assert!(
                matches!(
                    &c,
                    Corruption::NoValidMeta {
                        meta0: MetaProblem::BadMagic { .. },
                        ..
                    }
                ),
                "{c}"
            );
        }
        // With meta 0 valid, meta 1 is read where the page size says.
        let (mut bytes, _) = fixture("few-keys");
        bytes[16 + 8] ^= 0x10; // meta 0 checksum now wrong
        bytes[4096 + 16 + 4] = 3; // meta 1 version
        let c = corruption(status_of(Cursor::new(&bytes)));
        assert_eq!(
            c,
            Corruption::NoValidMeta {
                meta0: MetaProblem::BadChecksum {
                    stored: le_u64(&bytes, 16 + 56),
                    computed: fnv64a(&bytes[16..16 + 56]),
                },
                meta1: MetaProblem::NotFound,
            }
        );
        assert!(c.to_string().contains("checksum"), "{c}");
        let message = StatusError::from(c).to_string();
        assert!(message.contains("take a new snapshot"), "{message}");
    }

    #[test]
    fn snapshot_status_rejects_truncated_files() {
        let (bytes, _) = fixture("many-keys");
        for len in [
            0,
            1,
            79,
            80,
            4096,
            4096 + 80,
            8192,
            100_000,
            bytes.len() - 33,
            bytes.len() - 4096 - 32,
        ] {
            let (file, streamed) = both(&bytes[..len]);
            let c = corruption(file);
            corruption(streamed);
            if len > 8192 {
                assert!(matches!(c, Corruption::Truncated { .. }), "{len}: {c}");
            }
        }
    }

    #[test]
    fn snapshot_status_names_the_page_of_an_element_outside_it() {
        let (mut bytes, _) = fixture("few-keys");
        let (root, _) = root_entries(&bytes);
        let element0 = root as usize * 4096 + PAGE_HEADER;
        bytes[element0 + 4..element0 + 8].copy_from_slice(&0xFFFF_FF00u32.to_le_bytes());
        let (file, streamed) = both(&bytes);
        for result in [file, streamed] {
            match corruption(result) {
                Corruption::OutOfBounds { at, what, .. } => {
                    assert_eq!(at, Location::Page(root));
                    assert_eq!(what, "key of leaf element 0");
                }
                other => panic!("{other}"),
            }
        }
    }

    #[test]
    fn snapshot_status_rejects_cycles_and_references_out_of_range() {
        let (bytes, _) = fixture("deep-tree");
        let key_root = key_bucket_root(&bytes);
        let first_child = |bytes: &mut Vec<u8>, pgid: u64| {
            let at = key_root as usize * 4096 + PAGE_HEADER + 8;
            bytes[at..at + 8].copy_from_slice(&pgid.to_le_bytes());
        };

        let mut cyclic = bytes.clone();
        first_child(&mut cyclic, key_root);
        let (file, streamed) = both(&cyclic);
        for result in [file, streamed] {
            assert_eq!(
                corruption(result),
                Corruption::ReachedTwice {
                    pgid: key_root,
                    from: Location::Page(key_root)
                }
            );
        }

        let mut beyond = bytes.clone();
        first_child(&mut beyond, 1 << 40);
        let (file, streamed) = both(&beyond);
        for result in [file, streamed] {
            assert!(matches!(
                corruption(result),
                Corruption::PageOutOfRange {
                    pgid: 0x100_0000_0000,
                    ..
                }
            ));
        }

        let mut meta = bytes.clone();
        first_child(&mut meta, 1);
        let (file, streamed) = both(&meta);
        for result in [file, streamed] {
            assert!(matches!(
                corruption(result),
                Corruption::NotATreePage { pgid: 1, .. }
            ));
        }

        let mut huge = bytes.clone();
        let overflow = key_root as usize * 4096 + 12;
        huge[overflow..overflow + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let (file, streamed) = both(&huge);
        corruption(file);
        corruption(streamed);
    }

    #[test]
    fn snapshot_status_never_panics_on_random_corruption() {
        let originals: Vec<(Vec<u8>, SnapshotStatus)> =
            ["few-keys", "empty", "compacted-defragged", "big-values"]
                .iter()
                .map(|name| fixture(name))
                .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let (mut errors, mut statuses) = (0, 0);
        for round in 0..2000 {
            // Mostly the small files, so the test stays quick.
            let which = if round % 10 < 7 {
                round % 2
            } else {
                2 + round % 2
            };
            let (original, _) = &originals[which];
            let mut bytes = original.clone();
            match rng.random_range(0..4) {
                0 => {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] ^= 1 << rng.random_range(0..8);
                }
                1 => {
                    for _ in 0..rng.random_range(2..40) {
                        let at = rng.random_range(0..bytes.len());
                        bytes[at] = rng.random();
                    }
                }
                2 => {
                    // Structure lives in the first bytes of pages: aim there.
                    let page = rng.random_range(0..bytes.len() / 4096);
                    let at = page * 4096 + rng.random_range(0..64);
                    bytes[at] = rng.random();
                }
                _ => {
                    let len = rng.random_range(0..bytes.len());
                    bytes.truncate(len);
                }
            }
            let chunk = [1, 7, 4096, 65536][rng.random_range(0..4)];
            let chunk = if chunk == 1 && bytes.len() > 50_000 {
                7
            } else {
                chunk
            };
            let file = catch_unwind(AssertUnwindSafe(|| status_of(Cursor::new(&bytes))))
                .unwrap_or_else(|_| panic!("status_of panicked in round {round}"));
            let streamed = catch_unwind(AssertUnwindSafe(|| stream(&bytes, chunk)))
                .unwrap_or_else(|_| panic!("streaming panicked in round {round}"));
            match (&file, &streamed) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "round {round}");
                    statuses += 1;
                }
                (Err(_), Err(_)) => errors += 1,
                _ => panic!("round {round}: file {file:?} but stream {streamed:?}"),
            }
        }
        assert!(
            errors > 100 && statuses > 100,
            "{errors} errors, {statuses} statuses"
        );
    }

    /// Builds small bbolt files by hand, for what real etcd snapshots never contain.
    mod synthetic {
        use super::*;

        pub const PAGE: usize = 1024;

        pub fn meta(id: u64, root: u64, high_water_mark: u64, txid: u64) -> Vec<u8> {
            let mut p = vec![0u8; PAGE];
            p[..8].copy_from_slice(&id.to_le_bytes());
            p[8..10].copy_from_slice(&0x04u16.to_le_bytes());
            let m = &mut p[PAGE_HEADER..META_END];
            m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            m[4..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
            m[8..12].copy_from_slice(&(PAGE as u32).to_le_bytes());
            m[16..24].copy_from_slice(&root.to_le_bytes());
            m[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
            m[40..48].copy_from_slice(&high_water_mark.to_le_bytes());
            m[48..56].copy_from_slice(&txid.to_le_bytes());
            let sum = fnv64a(&m[..56]);
            m[56..64].copy_from_slice(&sum.to_le_bytes());
            p
        }

        /// A leaf page body (header + elements + data), unpadded, for `id`.
        pub fn leaf(id: u64, elements: &[(u32, &[u8], &[u8])]) -> Vec<u8> {
            let mut p = vec![0u8; PAGE_HEADER + ELEMENT * elements.len()];
            p[..8].copy_from_slice(&id.to_le_bytes());
            p[8..10].copy_from_slice(&LEAF_FLAG.to_le_bytes());
            p[10..12].copy_from_slice(&(elements.len() as u16).to_le_bytes());
            for (i, (flags, key, value)) in elements.iter().enumerate() {
                let e = PAGE_HEADER + ELEMENT * i;
                let pos = (p.len() - e) as u32;
                p[e..e + 4].copy_from_slice(&flags.to_le_bytes());
                p[e + 4..e + 8].copy_from_slice(&pos.to_le_bytes());
                p[e + 8..e + 12].copy_from_slice(&(key.len() as u32).to_le_bytes());
                p[e + 12..e + 16].copy_from_slice(&(value.len() as u32).to_le_bytes());
                p.extend_from_slice(key);
                p.extend_from_slice(value);
            }
            p
        }

        pub fn branch(id: u64, children: &[(&[u8], u64)]) -> Vec<u8> {
            let mut p = vec![0u8; PAGE_HEADER + ELEMENT * children.len()];
            p[..8].copy_from_slice(&id.to_le_bytes());
            p[8..10].copy_from_slice(&BRANCH_FLAG.to_le_bytes());
            p[10..12].copy_from_slice(&(children.len() as u16).to_le_bytes());
            for (i, (key, child)) in children.iter().enumerate() {
                let e = PAGE_HEADER + ELEMENT * i;
                let pos = (p.len() - e) as u32;
                p[e..e + 4].copy_from_slice(&pos.to_le_bytes());
                p[e + 4..e + 8].copy_from_slice(&(key.len() as u32).to_le_bytes());
                p[e + 8..e + 16].copy_from_slice(&child.to_le_bytes());
                p.extend_from_slice(key);
            }
            p
        }

        pub fn bucket_at(root: u64) -> Vec<u8> {
            let mut v = root.to_le_bytes().to_vec();
            v.extend_from_slice(&[0; 8]);
            v
        }

        pub fn inline_bucket(elements: &[(u32, &[u8], &[u8])]) -> Vec<u8> {
            let mut v = bucket_at(0);
            v.extend_from_slice(&leaf(0, elements));
            v
        }

        /// Meta pages at 0 and 1, then `pages` (each padded to a page) from page 2.
        pub fn db(root: u64, pages: &[Vec<u8>]) -> Vec<u8> {
            let high_water_mark = 2 + pages.len() as u64;
            let mut f = meta(0, root, high_water_mark, 2);
            f.extend(meta(1, root, high_water_mark, 1));
            for p in pages {
                let mut p = p.clone();
                assert!(p.len() <= PAGE);
                p.resize(PAGE, 0);
                f.extend(p);
            }
            f
        }

        pub fn revision(main: u64, sub: u64) -> Vec<u8> {
            let mut k = main.to_be_bytes().to_vec();
            k.push(b'_');
            k.extend_from_slice(&sub.to_be_bytes());
            k
        }
    }

    #[test]
    fn snapshot_status_hashes_nested_buckets_as_key_only_and_inline_buckets_in_order() {
        use synthetic::*;
        let (k1, k2, k3) = (revision(5, 0), revision(7, 1), revision(9, 0));
        let mut tomb = k3.clone();
        tomb.push(b't');
        let nested = bucket_at(9);
        let alarm = inline_bucket(&[(0, b"a1", b"v1")]);
        let empty = inline_bucket(&[]);
        let root = leaf(
            2,
            &[
                (1, b"alarm", &alarm),
                (1, b"empty", &empty),
                (1, b"key", &bucket_at(3)),
                (1, b"meta", &bucket_at(6)),
            ],
        );
        // The key bucket: a branch over two leaves.
        let key_branch = branch(3, &[(&k1, 4), (&k3, 5)]);
        let key_leaf1 = leaf(4, &[(0, &k1, b"one"), (0, &k2, b"two")]);
        let key_leaf2 = leaf(5, &[(0, &tomb, b"gone")]);
        let meta_leaf = leaf(
            6,
            &[(0, b"consistent_index", b"12345678"), (1, b"sub", &nested)],
        );
        let bytes = db(2, &[root, key_branch, key_leaf1, key_leaf2, meta_leaf]);

        let mut hashed = Vec::new();
        for part in [
            &b"alarm"[..],
            b"a1",
            b"v1",
            b"empty",
            b"key",
            &k1,
            b"one",
            &k2,
            b"two",
            &tomb,
            b"gone",
            b"meta",
            b"consistent_index",
            b"12345678",
            b"sub",
        ] {
            hashed.extend_from_slice(part);
        }
        let expected = SnapshotStatus {
            hash: crc32c::crc32c(&hashed),
            revision: 9,
            total_key: 6,
            total_size: 7 * PAGE as u64,
        };
        let (file, streamed) = both(&bytes);
        assert_eq!(file.unwrap(), expected);
        assert_eq!(streamed.unwrap(), expected);
        assert_eq!(stream(&bytes, 1).unwrap(), expected);
    }

    #[test]
    fn snapshot_status_follows_overflow_pages_and_skips_empty_leaves() {
        use synthetic::*;
        let big = vec![b'x'; 2500];
        let mut data = leaf(4, &[(0, b"big", &big), (0, b"small", b"s")]);
        data[12..16].copy_from_slice(&2u32.to_le_bytes()); // 3 pages
        data.resize(3 * PAGE, 0);
        let root = leaf(2, &[(1, b"data", &bucket_at(3))]);
        let branch = branch(3, &[(b"a", 7), (b"big", 4)]);
        let empty = leaf(7, &[]);
        let mut pages = vec![root, branch];
        pages.extend(data.chunks(PAGE).map(<[u8]>::to_vec));
        pages.push(empty);
        let bytes = db(2, &pages);
        let expected = SnapshotStatus {
            hash: crc32c::crc32c(&[&b"data"[..], b"big", &big, b"small", b"s"].concat()),
            revision: 0,
            total_key: 2,
            total_size: 8 * PAGE as u64,
        };
        let (file, streamed) = both(&bytes);
        assert_eq!(file.unwrap(), expected);
        assert_eq!(streamed.unwrap(), expected);
        assert_eq!(stream(&bytes, 1000).unwrap(), expected);
    }

    #[test]
    fn snapshot_status_rejects_what_etcdctl_rejects() {
        use synthetic::*;
        // A plain key/value pair at the top level: etcd's status fails on it.
        let root = leaf(2, &[(1, b"a", &inline_bucket(&[])), (0, b"stray", b"v")]);
        let (file, streamed) = both(&db(2, &[root]));
        for result in [file, streamed] {
            assert_eq!(
                corruption(result),
                Corruption::NotABucket {
                    at: Location::Page(2),
                    index: 1
                }
            );
        }
        // A key in the key bucket too short to be a revision: etcd's status crashes.
        let key = inline_bucket(&[(0, b"short", b"v")]);
        let root = leaf(2, &[(1, b"key", &key)]);
        let (file, streamed) = both(&db(2, &[root]));
        for result in [file, streamed] {
            assert!(matches!(
                corruption(result),
                Corruption::BadRevisionKey { len: 5, .. }
            ));
        }
        // An inline bucket whose page is a branch.
        let mut bad_inline = inline_bucket(&[(0, b"k", b"v")]);
        bad_inline[BUCKET_HEADER + 8] = BRANCH_FLAG as u8;
        let root = leaf(2, &[(1, b"b", &bad_inline)]);
        let (file, streamed) = both(&db(2, &[root]));
        for result in [file, streamed] {
            assert!(matches!(
                corruption(result),
                Corruption::InlineNotLeaf {
                    at: Location::Inline { page: 2, .. },
                    flags: 1
                }
            ));
        }
        // A bucket value too short for its header.
        let root = leaf(2, &[(1, b"b", b"short")]);
        let (file, streamed) = both(&db(2, &[root]));
        for result in [file, streamed] {
            assert!(matches!(
                corruption(result),
                Corruption::BadBucketHeader { len: 5, .. }
            ));
        }
    }

    #[test]
    fn snapshot_status_rejects_trees_deeper_than_the_limit() {
        use synthetic::*;
        // Page 2 is the root bucket; a chain of branch pages 3..=70 ends at leaf 71.
        let mut pages = vec![leaf(2, &[(1, b"data", &bucket_at(3))])];
        for id in 3..71 {
            pages.push(branch(id, &[(b"k", id + 1)]));
        }
        pages.push(leaf(71, &[(0, b"k", b"v")]));
        let (file, streamed) = both(&db(2, &pages));
        for result in [file, streamed] {
            assert!(matches!(
                corruption(result),
                Corruption::TooDeep {
                    depth: MAX_TREE_DEPTH,
                    ..
                }
            ));
        }
    }

    #[test]
    fn snapshot_status_reports_io_errors_as_read_errors() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        impl Seek for Failing {
            fn seek(&mut self, _: SeekFrom) -> io::Result<u64> {
                Ok(1 << 20)
            }
        }
        let e = status_of(Failing).unwrap_err();
        assert!(matches!(e, StatusError::Read { offset: 0, .. }), "{e}");
        assert!(!e.is_corrupt());
        let e = status_of_file(Path::new("/nonexistent/snapshot.db")).unwrap_err();
        assert!(matches!(e, StatusError::Open { .. }), "{e}");
    }
}
