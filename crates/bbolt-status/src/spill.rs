//! Where [`StreamingStatus`](crate::StreamingStatus) keeps its page summaries: two
//! unlinked temporary files, so its memory stays the same whatever the database size.
//!
//! - The record file holds one fixed-size [`Record`] per block of the stream, at
//!   `pgid * RECORD` (a block that is no branch or leaf page reads back as zeros:
//!   absent). Pages arrive in file order, so records are gathered in a small buffer
//!   and written in runs; a page with overflow completes after the blocks it spans
//!   and its record is patched into the buffer, or written on its own.
//! - The side file holds what does not fit a record, appended: the children of a
//!   branch page (8 bytes each), and the raw bytes of the few pages that need more
//!   than a summary (a leaf with bucket elements, as the root bucket's, or a page
//!   that failed to parse), which [`finish`](crate::StreamingStatus::finish) parses
//!   again to get the same result.
//!
//! Both files are unlinked as soon as they are created (`tempfile::tempfile`), so
//! nothing is left behind whatever way the process ends; what is read back at the
//! end is served from the page cache, which is not the process's memory.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{LeafStats, StatusError};

/// Bytes per record: kept on disk for every branch or leaf page of the stream.
pub(crate) const RECORD: usize = 32;

/// How many bytes each buffer gathers before it is written, and how many bytes of
/// records are read at a time at the end.
const BUFFER: usize = 64 << 10;

/// What the record of a page says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// No branch or leaf page starts at this block.
    Absent = 0,
    /// A leaf without bucket elements: its summary is in the record.
    Leaf = 1,
    /// A branch page: `count` children at `offset` in the side file.
    Branch = 2,
    /// `len` raw bytes of the page at `offset` in the side file, to parse again.
    Raw = 3,
    /// The page spans more than [`MAX_PAGE_SPAN`](crate::MAX_PAGE_SPAN).
    TooLarge = 4,
    /// Overlapping pages with overflow were over the budget; the page was not read.
    OverlappingOverflow = 5,
    /// The page's overflow runs past the end of the stream.
    PastEnd = 6,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0 => Kind::Absent,
            1 => Kind::Leaf,
            2 => Kind::Branch,
            3 => Kind::Raw,
            4 => Kind::TooLarge,
            5 => Kind::OverlappingOverflow,
            6 => Kind::PastEnd,
            _ => return None,
        })
    }
}

/// One page's record. Layout (little-endian): kind u8, 1 unused byte, count u16,
/// shortest key u16, 2 unused bytes, CRC u32, length u32, overflow u32, 4 unused
/// bytes, then the last key's main revision (a leaf) or the side-file offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub kind: Kind,
    pub overflow: u32,
    /// A leaf's summary; for a branch, `count` is its children; for raw bytes,
    /// `len` is their length.
    pub stats: LeafStats,
    /// Where the side-file bytes of a branch or raw page start.
    pub offset: u64,
}

impl Record {
    pub fn new(kind: Kind, overflow: u32) -> Self {
        Record {
            kind,
            overflow,
            stats: LeafStats::default(),
            offset: 0,
        }
    }

    pub(crate) fn encode(&self) -> [u8; RECORD] {
        let mut r = [0u8; RECORD];
        r[0] = self.kind as u8;
        r[2..4].copy_from_slice(&self.stats.count.to_le_bytes());
        r[4..6].copy_from_slice(&self.stats.shortest_key.to_le_bytes());
        r[8..12].copy_from_slice(&self.stats.crc.to_le_bytes());
        r[12..16].copy_from_slice(&self.stats.len.to_le_bytes());
        r[16..20].copy_from_slice(&self.overflow.to_le_bytes());
        let last = match self.kind {
            Kind::Leaf => self.stats.last_main.to_le_bytes(),
            _ => self.offset.to_le_bytes(),
        };
        r[24..32].copy_from_slice(&last);
        r
    }

    pub(crate) fn decode(r: &[u8]) -> Option<Self> {
        let kind = Kind::from_byte(r[0])?;
        let last = crate::le_u64(r, 24);
        let stats = LeafStats {
            crc: crate::le_u32(r, 8),
            len: crate::le_u32(r, 12),
            count: crate::le_u16(r, 2),
            shortest_key: crate::le_u16(r, 4),
            last_main: if kind == Kind::Leaf { last as i64 } else { 0 },
        };
        Some(Record {
            kind,
            overflow: crate::le_u32(r, 16),
            stats,
            offset: if kind == Kind::Leaf { 0 } else { last },
        })
    }
}

/// The two files, and what is waiting to be written to them.
#[derive(Debug)]
struct Files {
    records: File,
    side: File,
    /// Records of pages `base..` not yet written (zeros where no page was seen).
    pending: Vec<u8>,
    base: u64,
    /// Side-file bytes from `side_written` on, not yet written.
    side_pending: Vec<u8>,
    side_written: u64,
}

/// The spill files of one stream, or why they could not be used. After the first
/// failure nothing more is written and [`finish`](Spill::finish) reports it.
#[derive(Debug)]
pub(crate) struct Spill {
    dir: PathBuf,
    files: Option<Files>,
    failure: Option<StatusError>,
}

/// The error for a failure to create, write or read the spill files.
pub(crate) fn spill_error(dir: &Path, action: &'static str, source: io::Error) -> StatusError {
    StatusError::Spill {
        dir: dir.to_owned(),
        action,
        source,
    }
}

impl Spill {
    /// Creates the two unlinked files in `dir`.
    pub fn create_in(dir: &Path) -> Result<Self, StatusError> {
        let create = || tempfile::tempfile_in(dir).map_err(|e| spill_error(dir, "create", e));
        Ok(Spill {
            dir: dir.to_owned(),
            files: Some(Files {
                records: create()?,
                side: create()?,
                pending: Vec::new(),
                base: 0,
                side_pending: Vec::new(),
                side_written: 0,
            }),
            failure: None,
        })
    }

    /// A spill that failed to be created: `finish` reports `failure`.
    pub fn failed(dir: &Path, failure: StatusError) -> Self {
        Spill {
            dir: dir.to_owned(),
            files: None,
            failure: Some(failure),
        }
    }

    /// Bytes held in memory, for tests.
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        self.files.as_ref().map_or(0, |files| {
            files.pending.capacity() + files.side_pending.capacity()
        })
    }

    /// The failure so far, if any.
    pub fn failure(&self) -> Option<&StatusError> {
        self.failure.as_ref()
    }

    fn fail(&mut self, e: io::Error) {
        self.files = None;
        self.failure
            .get_or_insert(spill_error(&self.dir, "write", e));
    }

    /// Appends `bytes` to the side file; returns where they start.
    pub fn append(&mut self, bytes: &[u8]) -> u64 {
        let Some(files) = self.files.as_mut() else {
            return 0;
        };
        let at = files.side_written + files.side_pending.len() as u64;
        files.side_pending.extend_from_slice(bytes);
        if files.side_pending.len() >= BUFFER {
            if let Err(e) = files
                .side
                .write_all_at(&files.side_pending, files.side_written)
            {
                self.fail(e);
                return 0;
            }
            files.side_written += files.side_pending.len() as u64;
            files.side_pending.clear();
            files.side_pending.shrink_to(BUFFER);
        }
        at
    }

    /// Writes the record of page `pgid` (each page is recorded at most once).
    pub fn put(&mut self, pgid: u64, record: &Record) {
        let Some(files) = self.files.as_mut() else {
            return;
        };
        let bytes = record.encode();
        if pgid < files.base {
            // A page with overflow, completed after its run of records was written.
            if let Err(e) = files.records.write_all_at(&bytes, pgid * RECORD as u64) {
                self.fail(e);
            }
            return;
        }
        let index = (pgid - files.base) as usize;
        if index >= BUFFER / RECORD && index * RECORD >= files.pending.len() {
            // Past what the buffer holds: write it, and start a new run here.
            if let Err(e) = files
                .records
                .write_all_at(&files.pending, files.base * RECORD as u64)
            {
                self.fail(e);
                return;
            }
            files.pending.clear();
            files.base = pgid;
            files.pending.extend_from_slice(&bytes);
            return;
        }
        let at = index * RECORD;
        if files.pending.len() < at + RECORD {
            files.pending.resize(at + RECORD, 0);
        }
        files.pending[at..at + RECORD].copy_from_slice(&bytes);
    }

    /// Writes what is pending and hands the files over for reading.
    pub fn finish(mut self) -> Result<SpillReader, StatusError> {
        if let Some(failure) = self.failure.take() {
            return Err(failure);
        }
        let Some(files) = self.files.take() else {
            return Err(spill_error(
                &self.dir,
                "write",
                io::Error::other("no files"),
            ));
        };
        files
            .records
            .write_all_at(&files.pending, files.base * RECORD as u64)
            .and_then(|()| {
                files
                    .side
                    .write_all_at(&files.side_pending, files.side_written)
            })
            .map_err(|e| spill_error(&self.dir, "write", e))?;
        Ok(SpillReader {
            dir: self.dir,
            records: files.records,
            side: files.side,
            cache: Vec::new(),
            cache_base: 0,
        })
    }
}

/// Reads the records and side bytes back, a buffer of records at a time.
pub(crate) struct SpillReader {
    dir: PathBuf,
    records: File,
    side: File,
    /// Records of pages `cache_base..`, as read (shorter at the end of the file).
    cache: Vec<u8>,
    cache_base: u64,
}

impl SpillReader {
    /// The record of page `pgid`.
    pub fn record(&mut self, pgid: u64) -> Result<Record, StatusError> {
        let per_buffer = (BUFFER / RECORD) as u64;
        let in_cache = pgid >= self.cache_base
            && (pgid - self.cache_base + 1) * RECORD as u64 <= self.cache.len() as u64;
        if !in_cache {
            let base = pgid - pgid % per_buffer;
            self.cache.resize(BUFFER, 0);
            let got = read_up_to(&self.records, &mut self.cache, base * RECORD as u64)
                .map_err(|e| spill_error(&self.dir, "read", e))?;
            self.cache.truncate(got);
            self.cache_base = base;
        }
        let at = ((pgid - self.cache_base) * RECORD as u64) as usize;
        let absent = Record::new(Kind::Absent, 0);
        match self.cache.get(at..at + RECORD) {
            Some(bytes) => Record::decode(bytes).ok_or_else(|| {
                spill_error(
                    &self.dir,
                    "read",
                    io::Error::new(io::ErrorKind::InvalidData, "unknown record kind"),
                )
            }),
            None => Ok(absent),
        }
    }

    /// A read error naming the spill directory.
    pub fn error(&self, source: io::Error) -> StatusError {
        spill_error(&self.dir, "read", source)
    }

    /// `len` bytes of the side file at `offset`.
    pub fn side(&self, offset: u64, len: usize) -> Result<Vec<u8>, StatusError> {
        let mut bytes = vec![0u8; len];
        self.side
            .read_exact_at(&mut bytes, offset)
            .map_err(|e| spill_error(&self.dir, "read", e))?;
        Ok(bytes)
    }
}

/// Reads into `buf` from `offset` until it is full or the file ends; returns how
/// many bytes were read.
fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
