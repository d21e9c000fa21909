//! Rebuilding a paged set's snapshot: the page index read in order, the
//! segments it names read from the packs several at once (a distant store
//! is not read one round trip at a time), decoded, their pages handed out
//! in order, then the tail. The caller checks the result against the
//! manifest (size, SHA-256, etcd's digest), as for a snapshot file.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::stream::{self, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt};

use etcd_backup_proto::{ManifestFile, ManifestPages, SetId};

use super::{
    check_manifest_pages, decode_segment, download_index, packs_dir, IndexRecords, Location,
    PagedError, Record, SEGMENT_PAGES,
};
use crate::encryption::Identities;
use crate::store::destination::{Destination, DestinationError};

/// Segments read at once at most, whatever the destination asks for
/// ([`Destination::ranges_in_flight`]): what they hold (a segment's stored
/// and decoded bytes each) stays within the agent's memory budget.
pub const READS_IN_FLIGHT: usize = 8;

/// Decoded segments kept for pages that come back to them.
const CACHED_SEGMENTS: usize = 4;

/// A segment's decoded pages, shared by the runs of pages that need them.
type SegmentFuture<'a> = Shared<BoxFuture<'a, Result<Bytes, Arc<String>>>>;

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
    });

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

    // Runs → their pages, reading segments several at once, each once
    // while it is among the recent ones.
    let mut recent: VecDeque<(u32, u64)> = VecDeque::new();
    let mut cache: HashMap<(u32, u64), SegmentFuture<'a>> = HashMap::new();
    let pages_out = runs
        .map(move |run| {
            let run = match run {
                Ok(r) => r,
                Err(e) => return async move { Err(to_io(e.to_string())) }.boxed(),
            };
            let key = (run.at.pack, run.at.offset);
            let segment = match cache.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let f = read_segment(dest, ctx.clone(), run.at, identities).boxed().shared();
                    cache.insert(key, f.clone());
                    recent.push_back(key);
                    if recent.len() > CACHED_SEGMENTS {
                        if let Some(old) = recent.pop_front() {
                            cache.remove(&old);
                        }
                    }
                    f
                }
            };
            let ctx = ctx.clone();
            async move {
                let plain = segment.await.map_err(|e| to_io(e.to_string()))?;
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
                // Pages in the segment's own order (every set's first
                // write, and most pages after): a view of it, no copy.
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
            .boxed()
        })
        .buffered(dest.ranges_in_flight().clamp(1, READS_IN_FLIGHT))
        .chain(stream::once(async move { Ok(Bytes::from(tail)) }))
        .boxed();
    Ok(Box::new(tokio_util::io::StreamReader::new(pages_out)))
}

fn same_segment(a: &Location, b: &Location) -> bool {
    a.pack == b.pack && a.offset == b.offset && a.len == b.len
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
