//! Rebuilding a paged set's snapshot: the page index read in order, the
//! segments it names read from the packs several at once (a distant store
//! is not read one round trip at a time), decoded, their pages handed out
//! in order, then the tail. The caller checks the result against the
//! manifest (size, SHA-256, etcd's digest), as for a snapshot file.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use tokio::io::{AsyncRead, AsyncReadExt};

use etcd_backup_proto::{ManifestFile, ManifestPages, SetId};

use super::{
    check_manifest_pages, decode_segment, download_index, packs_dir, IndexRecords, Location,
    PagedError, Record, SEGMENT_PAGES,
};
use crate::encryption::Identities;
use crate::store::destination::{Destination, DestinationError};

/// The most ranges a destination may ask to keep open at once
/// ([`Destination::ranges_in_flight`]); a window reads half of what it asks
/// for, and 3 windows (`WINDOWS_IN_FLIGHT`) are read at once: what their
/// segments hold (stored and decoded bytes) stays within the agent's
/// memory budget.
pub const READS_IN_FLIGHT: usize = 8;

/// Windows read at once: the next ones are read while one's pages are
/// handed out.
const WINDOWS_IN_FLIGHT: usize = 3;

/// Runs of pages one window holds at most (a few bytes each).
const WINDOW_RUNS: usize = 1 << 14;

/// A segment's decoded pages, shared by the runs of pages that need them.
type SegmentFuture<'a> = Shared<BoxFuture<'a, Result<Bytes, Arc<String>>>>;

/// The key of a segment: its pack, offset and stored length (what
/// [`same_segment`] compares).
type SegmentKey = (u32, u64, u32);

fn segment_key(at: &Location) -> SegmentKey {
    (at.pack, at.offset, at.len)
}

/// Consecutive runs of pages that need at most a few distinct segments:
/// the unit read at once. A snapshot whose pages alternate between a few
/// segments (an older set's pages around the newer ones) is read a few
/// segments per round trip, as one whose pages follow each other.
struct Window {
    runs: Vec<Run>,
    /// Its distinct segments, in order of first use.
    segments: Vec<Location>,
}

/// Consecutive pages of one segment.
struct Run {
    at: Location,
    slots: Vec<u16>,
}

/// The manifest's pages of a snapshot entry, checked.
///
/// # Errors
/// [`PagedError::Damaged`] when the entry is not a paged snapshot or its
/// pages name something outside the node's packs.
pub fn pages_of<'e>(entry: &'e ManifestFile, set: &SetId) -> Result<&'e ManifestPages, PagedError> {
    let pages = entry.pages.as_deref().ok_or_else(|| PagedError::Damaged {
        what: format!("{} of set {set} is not a paged snapshot", entry.name),
    })?;
    check_manifest_pages(pages, &set.dir())?;
    Ok(pages)
}

/// Opens the snapshot of a paged set as one stream of its bytes.
/// `compressed` and `encrypted` say how its segments are stored (the
/// manifest's `compression` and `encryption`).
///
/// # Errors
/// The page index cannot be read or is not what the manifest says. Later
/// failures (a pack that cannot be read, a segment that does not decode)
/// end the stream with an error naming them.
pub async fn open_snapshot<'a>(
    dest: &'a dyn Destination,
    set: &SetId,
    pages: &ManifestPages,
    compressed: bool,
    encrypted: bool,
    identities: Option<&'a Identities>,
) -> Result<Box<dyn AsyncRead + Send + Unpin + 'a>, PagedError> {
    check_manifest_pages(pages, &set.dir())?;
    if encrypted && identities.is_none() {
        return Err(PagedError::Identity {
            message: format!(
                "the snapshot of set {set} is encrypted; pass --identity FILE with the private key of one of its recipients, or set encryption.identity_file"
            ),
        });
    }
    let index_path = set.file(&pages.index.name);
    let file = download_index(dest, &index_path, pages).await?;
    let records = IndexRecords::start(file, pages.page_size, pages.pages, index_path);
    let tail = hex::decode(&pages.tail).map_err(|_| PagedError::Damaged {
        what: format!("the manifest of set {set} has a tail that is not hex"),
    })?;
    let ctx = Arc::new(Ctx {
        packs_dir: packs_dir(&set.cluster, &set.node),
        packs: pages.packs.clone(),
        page_size: pages.page_size as usize,
        compressed,
        encrypted,
        segments_read: AtomicU64::new(0),
        windows: AtomicU64::new(0),
    });
    let counts = ctx.clone();

    // Records → runs of pages of one segment.
    let runs = Box::pin(stream::unfold(
        (records, None::<Record>),
        |(mut records, mut held)| async move {
            let first = match held.take() {
                Some(r) => r,
                None => match records.next().await {
                    Ok(Some(r)) => r,
                    Ok(None) => return None,
                    Err(e) => return Some((Err(e), (records, None))),
                },
            };
            let mut run = Run {
                at: first.at,
                slots: vec![first.at.slot],
            };
            loop {
                match records.next().await {
                    Ok(Some(r))
                        if same_segment(&r.at, &run.at) && run.slots.len() < SEGMENT_PAGES =>
                    {
                        run.slots.push(r.at.slot);
                    }
                    Ok(Some(r)) => {
                        held = Some(r);
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => return Some((Err(e), (records, None))),
                }
            }
            Some((Ok(run), (records, held)))
        },
    ));

    // Runs → windows that read at most `per_window` segments the window
    // before did not use (those it did are not read again), and use at
    // most `most_segments` (their decoded bytes are held meanwhile). A
    // segment of newer pages is used sparsely, a page here and there,
    // across much of the snapshot: it is carried from window to window
    // instead of taking a read each time.
    let per_window = (dest.ranges_in_flight().clamp(1, READS_IN_FLIGHT) / 2).max(1);
    let most_segments = 2 * per_window + 4;
    let windows = stream::unfold(
        (runs, None::<Run>, Vec::<Location>::new(), false),
        move |(mut runs, mut held, prev, done)| async move {
            if done && held.is_none() {
                return None;
            }
            let mut window = Window {
                runs: Vec::new(),
                segments: Vec::new(),
            };
            let mut reads = 0;
            loop {
                let run = match held.take() {
                    Some(r) => r,
                    None => match runs.next().await {
                        Some(Ok(r)) => r,
                        Some(Err(e)) => return Some((Err(e), (runs, None, Vec::new(), true))),
                        None => {
                            if window.runs.is_empty() {
                                return None;
                            }
                            let segments = window.segments.clone();
                            return Some((Ok(window), (runs, None, segments, true)));
                        }
                    },
                };
                let new_segment = !window.segments.iter().any(|s| same_segment(s, &run.at));
                let read = new_segment && !prev.iter().any(|s| same_segment(s, &run.at));
                if (read && reads == per_window)
                    || (new_segment && window.segments.len() == most_segments)
                    || window.runs.len() == WINDOW_RUNS
                {
                    let segments = window.segments.clone();
                    return Some((Ok(window), (runs, Some(run), segments, false)));
                }
                if new_segment {
                    window.segments.push(run.at);
                }
                if read {
                    reads += 1;
                }
                window.runs.push(run);
            }
        },
    );

    // Windows → their pages: each window's segments read at once (those
    // the window before also used are not read again), the next windows'
    // read while this one's pages are handed out.
    let mut recent: HashMap<SegmentKey, SegmentFuture<'a>> = HashMap::new();
    let pages_out = windows
        .map(move |window| {
            let window = match window {
                Ok(w) => w,
                Err(e) => return async move { Err(to_io(e.to_string())) }.boxed(),
            };
            let mut segments: HashMap<SegmentKey, SegmentFuture<'a>> = HashMap::new();
            for at in &window.segments {
                let key = segment_key(at);
                let f = recent.get(&key).cloned().unwrap_or_else(|| {
                    read_segment(dest, ctx.clone(), *at, identities)
                        .boxed()
                        .shared()
                });
                segments.insert(key, f);
            }
            recent.clone_from(&segments);
            ctx.windows.fetch_add(1, Ordering::Relaxed);
            let ctx = ctx.clone();
            async move {
                // Each segment's read starts now, all at once.
                let read = futures_util::future::join_all(
                    segments
                        .iter()
                        .map(|(key, f)| f.clone().map(move |r| (*key, r))),
                )
                .await;
                let mut plain: HashMap<SegmentKey, Bytes> = HashMap::new();
                for (key, r) in read {
                    plain.insert(key, r.map_err(|e| to_io(e.to_string()))?);
                }
                drop(segments);
                let mut out = Vec::with_capacity(window.runs.len());
                for run in &window.runs {
                    let seg = &plain[&segment_key(&run.at)];
                    out.push(run_pages(&ctx, run, seg)?);
                }
                Ok(stream::iter(out.into_iter().map(Ok::<_, std::io::Error>)))
            }
            .boxed()
        })
        .buffered(WINDOWS_IN_FLIGHT)
        .try_flatten()
        .chain(stream::once(async move {
            tracing::debug!(
                segments_read = counts.segments_read.load(Ordering::Relaxed),
                windows = counts.windows.load(Ordering::Relaxed),
                packs = counts.packs.len(),
                "paged snapshot reassembled"
            );
            Ok(Bytes::from(tail))
        }))
        .boxed();
    Ok(Box::new(tokio_util::io::StreamReader::new(pages_out)))
}

/// A run's pages out of its segment's decoded bytes: a view of them when
/// the run's pages follow each other there (every set's first write, and
/// most pages after), else a copy in the run's order.
fn run_pages(ctx: &Ctx, run: &Run, plain: &Bytes) -> std::io::Result<Bytes> {
    let ps = ctx.page_size;
    let page = |slot: u16| {
        let start = slot as usize * ps;
        if start + ps <= plain.len() {
            Ok(start..start + ps)
        } else {
            Err(to_io(format!(
                "pack {} segment at {}: the index names page {slot}, which the segment does not hold",
                ctx.pack_name(run.at.pack),
                run.at.offset
            )))
        }
    };
    let first = run.slots[0];
    let consecutive = run
        .slots
        .iter()
        .enumerate()
        .all(|(k, &s)| usize::from(s) == usize::from(first) + k);
    if consecutive {
        let start = page(first)?.start;
        let last = page(*run.slots.last().expect("a run has a page"))?;
        return Ok(plain.slice(start..last.end));
    }
    let mut out = BytesMut::with_capacity(run.slots.len() * ps);
    for &slot in &run.slots {
        out.extend_from_slice(&plain[page(slot)?]);
    }
    Ok(out.freeze())
}

fn same_segment(a: &Location, b: &Location) -> bool {
    segment_key(a) == segment_key(b)
}

fn to_io(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

/// What reading segments needs.
struct Ctx {
    packs_dir: String,
    packs: Vec<etcd_backup_proto::PackRef>,
    page_size: usize,
    compressed: bool,
    encrypted: bool,
    /// Segments read, and windows they were read in (logged at the end).
    segments_read: AtomicU64,
    windows: AtomicU64,
}

impl Ctx {
    fn pack_name(&self, n: u32) -> String {
        self.packs
            .get(n as usize)
            .map_or_else(|| format!("#{n} (not in the manifest)"), |p| p.name.clone())
    }
}

/// Reads and decodes one segment.
async fn read_segment(
    dest: &dyn Destination,
    ctx: Arc<Ctx>,
    at: Location,
    identities: Option<&Identities>,
) -> Result<Bytes, Arc<String>> {
    let fail = |m: String| Arc::new(m);
    if let Some(fault) = at.fault(&ctx.packs) {
        return Err(fail(format!("the page index {fault}")));
    }
    ctx.segments_read.fetch_add(1, Ordering::Relaxed);
    let name = &ctx.packs[at.pack as usize].name;
    let path = format!("{}/{name}", ctx.packs_dir);
    let mut stored = Vec::with_capacity(at.len as usize);
    let read = async {
        let mut r = dest.open_range(&path, at.offset, u64::from(at.len)).await?;
        r.read_to_end(&mut stored)
            .await
            .map_err(|source| DestinationError::Io {
                op: "cannot read",
                location: format!("{}/{path}", dest.describe()),
                source,
            })?;
        Ok::<(), DestinationError>(())
    };
    read.await.map_err(|e| fail(e.to_string()))?;
    if stored.len() != at.len as usize {
        return Err(fail(format!(
            "{}/{path}: {} bytes read at {}, {} expected",
            dest.describe(),
            stored.len(),
            at.offset,
            at.len
        )));
    }
    let max_plain = SEGMENT_PAGES * ctx.page_size;
    let (compressed, encrypted) = (ctx.compressed, ctx.encrypted);
    let what = || format!("segment at {} of pack {name}", at.offset);
    let plain = decode_segment(stored, compressed, encrypted, identities, max_plain, &what)
        .map_err(|e| fail(e.to_string()))?;
    if plain.len() % ctx.page_size != 0 {
        return Err(fail(format!(
            "{}: it holds {} bytes, not whole pages",
            what(),
            plain.len()
        )));
    }
    Ok(Bytes::from(plain))
}
