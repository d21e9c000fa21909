//! Writing a paged set's snapshot at one destination: pages the previous
//! set holds (at the same position, or elsewhere: [`super::known`]) are
//! referenced, the others appended to new packs; the page index records
//! where each page is.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use etcd_backup_proto::{ManifestPages, PackRef, SetId, SetTimestamp, StoredFile};

use super::{
    download_index, known::KnownPages, packs_dir, Coding, IndexEncoder, Location, PageIdScheme,
    PagedError, Record, PACK_TARGET, SEGMENT_PAGES,
};
use crate::store::catalog::CatalogSet;
use crate::store::destination::{recorded, Destination, DestinationError, Upload};

/// Most index records held back while the segment they wait for fills.
const MAX_PENDING: usize = 1 << 16;

/// Records handed to the index encoder at once.
const INDEX_BATCH: usize = 4096;

/// The set a run compares its pages with: its records, by position and by
/// id.
pub struct Previous {
    /// Its timestamp, recorded in the new manifest for information.
    pub set: SetTimestamp,
    /// Its page size.
    pub page_size: u32,
    /// Its records.
    pub known: KnownPages,
    /// Its packs, by position.
    pub packs: Vec<PackRef>,
}

/// How a page of the snapshot was found among the previous set's.
#[derive(Debug, Clone, Copy)]
enum Found {
    /// At the same position.
    InPlace(Record),
    /// Elsewhere, by its id.
    Moved(Record),
}

impl Found {
    fn record(&self) -> &Record {
        match self {
            Self::InPlace(r) | Self::Moved(r) => r,
        }
    }
}

/// Why `set` cannot serve as the previous set of a run that writes with
/// `coding` and `ids`; `None` when it can.
pub fn incomparable(set: &CatalogSet, coding: &Coding, ids: &PageIdScheme) -> Option<String> {
    let m = &set.manifest;
    let pages = m
        .file(etcd_backup_proto::FileKind::Snapshot)
        .and_then(|f| f.pages.as_deref())?;
    let (scheme, key) = ids.describe();
    if pages.page_ids != scheme || pages.page_id_key != key {
        return Some(
            "its page ids were computed another way (another scheme or page id key)".into(),
        );
    }
    if m.compression.is_some() != coding.compression.is_some() {
        return Some("it was stored with another compression".into());
    }
    let mut theirs: Vec<&str> = m
        .encryption
        .as_ref()
        .map(|e| e.recipients.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let ours_owned = coding
        .encryption
        .as_ref()
        .map(|e| e.recipient_texts())
        .unwrap_or_default();
    let mut ours: Vec<&str> = ours_owned.iter().map(String::as_str).collect();
    theirs.sort_unstable();
    ours.sort_unstable();
    if theirs != ours {
        return Some("it was encrypted to other recipients (a set references only pages its own recipients can decrypt)".into());
    }
    None
}

/// Finds the newest complete paged set of `cluster`/`node` at `dest` that
/// the run can compare with, and starts reading its index. `None`, with
/// the reason logged, when there is none or it cannot be read: every page
/// is then new, which costs space, never correctness.
pub async fn previous(
    dest: &dyn Destination,
    cluster: &str,
    node: &str,
    coding: &Coding,
    ids: &PageIdScheme,
) -> Option<Previous> {
    let started = std::time::Instant::now();
    let is_paged = |s: &CatalogSet| {
        s.manifest
            .file(etcd_backup_proto::FileKind::Snapshot)
            .is_some_and(|f| f.pages.is_some())
    };
    let set = match crate::store::catalog::find_newest(dest, cluster, node, is_paged).await {
        Ok(Some(set)) => set,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(destination = %dest.describe(), error = %e, "cannot list the node's sets to find pages already stored; every page is stored anew");
            return None;
        }
    };
    let set = &set;
    if let Some(why) = incomparable(set, coding, ids) {
        tracing::info!(destination = %dest.describe(), set = %set.id, "the newest paged set is not compared with: {why}; every page is stored anew");
        return None;
    }
    let pages = set
        .manifest
        .file(etcd_backup_proto::FileKind::Snapshot)
        .and_then(|f| f.pages.as_deref())?;
    if let Err(e) = super::check_manifest_pages(pages, &set.id.dir()) {
        tracing::warn!(destination = %dest.describe(), set = %set.id, error = %e, "the newest paged set is not compared with; every page is stored anew");
        return None;
    }
    let path = set.id.file(&pages.index.name);
    let (page_size, count) = (pages.page_size, pages.pages);
    let known = match download_index(dest, &path, pages).await {
        Ok(file) => {
            tokio::task::spawn_blocking(move || KnownPages::build(file, page_size, count, &path))
                .await
                .unwrap_or_else(|e| {
                    Err(PagedError::Local {
                        what: "cannot read the previous set's page index",
                        source: std::io::Error::other(e),
                    })
                })
        }
        Err(e) => Err(e),
    };
    match known {
        Ok(known) => {
            tracing::debug!(destination = %dest.describe(), set = %set.id, elapsed_ms = started.elapsed().as_millis() as u64, "previous paged set found, its page index read");
            Some(Previous {
                set: set.id.timestamp,
                page_size,
                known,
                packs: pages.packs.clone(),
            })
        }
        Err(e) => {
            tracing::warn!(destination = %dest.describe(), set = %set.id, error = %e, "cannot read the newest paged set's page index; every page is stored anew");
            None
        }
    }
}

/// An index record whose page waits for its segment to be stored.
enum Pending {
    Done(Record),
    New { id: [u8; 16], slot: u16 },
}

/// A pack being written.
struct OpenPack {
    number: u32,
    partial: String,
    upload: Box<dyn Upload>,
    size: u64,
    sha: Sha256,
}

/// What a paged snapshot left at a destination.
#[derive(Debug, Clone)]
pub struct PagedOutcome {
    /// The manifest's `pages` (its index named without `.partial`).
    pub pages: ManifestPages,
    /// `<set>/pages_<ts>.idx.partial`, to be renamed with the set's files.
    pub index_partial: String,
}

/// Writes one destination's packs and page index.
pub struct PagedWriter<'a> {
    dest: &'a dyn Destination,
    set: SetId,
    packs_dir: String,
    coding: Arc<Coding>,
    page_size: usize,
    previous: Option<Previous>,
    /// Previous pack number → this set's number.
    mapped: Vec<Option<u32>>,
    packs: Vec<PackRef>,
    open: Option<OpenPack>,
    packs_started: u32,
    segment: Vec<u8>,
    seg_pages: usize,
    pending: Vec<Pending>,
    ready: Vec<Record>,
    index: IndexEncoder,
    index_upload: Box<dyn Upload>,
    index_partial: String,
    index_sha: Sha256,
    index_size: u64,
    pages: u64,
    new_pages: u64,
    /// Pages found among the previous set's at another position.
    moved_pages: u64,
    added_bytes: u64,
}

impl<'a> PagedWriter<'a> {
    /// Starts writing set `set`'s pages of `page_size` bytes at `dest`;
    /// creates its page index. Every path it creates is pushed to `created`.
    ///
    /// # Errors
    /// The index cannot be created.
    pub async fn start(
        dest: &'a dyn Destination,
        set: &SetId,
        page_size: usize,
        coding: Arc<Coding>,
        previous: Option<Previous>,
        created: &mut Vec<String>,
    ) -> Result<Self, PagedError> {
        let previous = previous.filter(|p| {
            let same = p.page_size as usize == page_size;
            if !same {
                tracing::info!(set = %p.set, "the previous paged set has {}-byte pages, this snapshot {page_size}-byte ones; every page is stored anew", p.page_size);
            }
            same
        });
        let index_partial =
            crate::store::destination::partial(&set.file(&set.timestamp.page_index_file_name()));
        let index_upload =
            recorded(created, index_partial.clone(), dest.create(&index_partial)).await?;
        let mapped = previous
            .as_ref()
            .map_or_else(Vec::new, |p| vec![None; p.packs.len()]);
        Ok(Self {
            dest,
            packs_dir: packs_dir(&set.cluster, &set.node),
            set: set.clone(),
            coding,
            page_size,
            previous,
            mapped,
            packs: Vec::new(),
            open: None,
            packs_started: 0,
            segment: Vec::with_capacity(SEGMENT_PAGES * page_size),
            seg_pages: 0,
            pending: Vec::new(),
            ready: Vec::new(),
            index: IndexEncoder::new(page_size as u32)?,
            index_upload,
            index_partial,
            index_sha: Sha256::new(),
            index_size: 0,
            pages: 0,
            new_pages: 0,
            moved_pages: 0,
            added_bytes: 0,
        })
    }

    /// Where the previous set holds each of the pages with ids `ids`,
    /// the next ones of the snapshot: at the same position, else anywhere
    /// by id, else nowhere. A record naming a range the previous set's
    /// manifest does not have ends the comparison, as does a temporary file
    /// that cannot be read: this batch and the rest are stored anew (the
    /// previous set, and with it its packs, is let go).
    async fn find_batch(&mut self, ids: &[[u8; 16]]) -> Vec<Option<Found>> {
        let Some(mut prev) = self.previous.take() else {
            return vec![None; ids.len()];
        };
        let wanted = ids.to_vec();
        let looked = tokio::task::spawn_blocking(move || {
            let mut found = Vec::with_capacity(wanted.len());
            let mut failure = None;
            for id in &wanted {
                let here = match prev.known.next_in_order() {
                    Ok(Some(r)) if r.id == *id => Ok(Some(Found::InPlace(r))),
                    Ok(_) => prev.known.find(id).map(|r| r.map(Found::Moved)),
                    Err(e) => Err(e),
                };
                let here = match here {
                    Ok(here) => here,
                    Err(e) => {
                        failure = Some(format!("the previous set's pages cannot be read on ({e})"));
                        break;
                    }
                };
                if let Some(found) = &here {
                    if let Some(fault) = found.record().at.fault(&prev.packs) {
                        failure = Some(format!("the previous set's page index {fault}"));
                        break;
                    }
                }
                found.push(here);
            }
            (prev, found, failure)
        })
        .await;
        let (prev, mut found, failure) = match looked {
            Ok(looked) => looked,
            Err(e) => {
                tracing::warn!(error = %e, "the previous set's pages cannot be looked up; the rest of the pages are stored anew");
                return vec![None; ids.len()];
            }
        };
        if let Some(why) = failure {
            tracing::warn!(set = %prev.set, "{why}; the rest of the pages are stored anew");
            // Their packs go with the previous set: none of this batch's
            // finds can be referenced.
            found.clear();
        } else {
            self.previous = Some(prev);
        }
        found.resize(ids.len(), None);
        found
    }

    /// This set's number for the previous set's pack `n`.
    fn map_pack(&mut self, n: u32) -> u32 {
        if let Some(m) = self.mapped[n as usize] {
            return m;
        }
        let prev = self
            .previous
            .as_ref()
            .expect("a previous record came from a previous set");
        let pack = prev.packs[n as usize].clone();
        // The same pack may be listed twice (identical content).
        let m = match self.packs.iter().position(|p| p.name == pack.name) {
            Some(i) => i as u32,
            None => {
                self.packs.push(pack);
                (self.packs.len() - 1) as u32
            }
        };
        self.mapped[n as usize] = Some(m);
        m
    }

    /// Takes whole pages and their ids (one per page).
    ///
    /// # Errors
    /// Destination, compression and encryption failures.
    pub async fn add(
        &mut self,
        pages: &[u8],
        ids: &[[u8; 16]],
        created: &mut Vec<String>,
    ) -> Result<(), PagedError> {
        let found = self.find_batch(ids).await;
        for ((page, id), found) in pages.chunks(self.page_size).zip(ids).zip(found) {
            self.pages += 1;
            if let Some(found) = found {
                if matches!(found, Found::Moved(_)) {
                    self.moved_pages += 1;
                }
                let prev = found.record();
                let at = Location {
                    pack: self.map_pack(prev.at.pack),
                    ..prev.at
                };
                let r = Record { id: *id, at };
                if self.seg_pages == 0 {
                    self.ready.push(r);
                } else {
                    self.pending.push(Pending::Done(r));
                }
            } else {
                self.segment.extend_from_slice(page);
                self.pending.push(Pending::New {
                    id: *id,
                    slot: self.seg_pages as u16,
                });
                self.seg_pages += 1;
                self.new_pages += 1;
                if self.seg_pages == SEGMENT_PAGES {
                    self.flush_segment(created).await?;
                }
            }
            if self.pending.len() >= MAX_PENDING {
                self.flush_segment(created).await?;
            }
            if self.ready.len() >= INDEX_BATCH {
                self.write_index().await?;
            }
        }
        Ok(())
    }

    /// Stores the segment being filled, and resolves the records waiting for it.
    async fn flush_segment(&mut self, created: &mut Vec<String>) -> Result<(), PagedError> {
        if self.seg_pages == 0 {
            return Ok(());
        }
        let plain = std::mem::take(&mut self.segment);
        let coding = self.coding.clone();
        let (stored, mut plain) = tokio::task::spawn_blocking(move || {
            coding.encode(&plain).map(|stored| (stored, plain))
        })
        .await
        .map_err(|e| PagedError::Local {
            what: "cannot store a segment",
            source: std::io::Error::other(e),
        })??;
        plain.clear();
        self.segment = plain;
        if self.open.is_none() {
            self.open_pack(created).await?;
        }
        let pack = self.open.as_mut().expect("a pack is open");
        let offset = pack.size;
        let len = u32::try_from(stored.len()).map_err(|_| PagedError::Local {
            what: "cannot store a segment",
            source: std::io::Error::other("a segment grew past 4 GiB"),
        })?;
        pack.upload.write(&stored).await?;
        pack.sha.update(&stored);
        pack.size += stored.len() as u64;
        let number = pack.number;
        for p in self.pending.drain(..) {
            self.ready.push(match p {
                Pending::Done(r) => r,
                Pending::New { id, slot } => Record {
                    id,
                    at: Location {
                        pack: number,
                        offset,
                        len,
                        slot,
                    },
                },
            });
        }
        self.seg_pages = 0;
        if self.open.as_ref().is_some_and(|p| p.size >= PACK_TARGET) {
            self.close_pack(created).await?;
        }
        Ok(())
    }

    async fn open_pack(&mut self, created: &mut Vec<String>) -> Result<(), PagedError> {
        let n = self.packs_started;
        self.packs_started += 1;
        let partial = format!(
            "{}/{}",
            self.packs_dir,
            self.set.timestamp.pack_partial_name(n)
        );
        let upload = recorded(created, partial.clone(), self.dest.create(&partial)).await?;
        self.packs.push(PackRef {
            name: String::new(),
            size: 0,
        });
        self.open = Some(OpenPack {
            number: (self.packs.len() - 1) as u32,
            partial,
            upload,
            size: 0,
            sha: Sha256::new(),
        });
        Ok(())
    }

    /// Finishes the open pack and renames it to its checksum's name.
    async fn close_pack(&mut self, created: &mut Vec<String>) -> Result<(), PagedError> {
        let Some(pack) = self.open.take() else {
            return Ok(());
        };
        let stored = pack.upload.finish().await?;
        if stored != pack.size {
            return Err(DestinationError::SizeMismatch {
                location: format!("{}/{}", self.dest.describe(), pack.partial),
                sent: pack.size,
                stored,
            }
            .into());
        }
        let name = format!(
            "{}{}",
            hex::encode(pack.sha.finalize()),
            etcd_backup_proto::PACK_SUFFIX
        );
        let path = format!("{}/{name}", self.packs_dir);
        let mut from = pack.partial.clone();
        let mut renamed = recorded(
            created,
            path.clone(),
            self.dest.rename(&pack.partial, &path),
        )
        .await;
        if let (Err(DestinationError::BadPath { .. }), Some(staged)) = (
            &renamed,
            pack.partial.strip_suffix(etcd_backup_proto::PARTIAL_SUFFIX),
        ) {
            // A destination that publishes an upload only under the name it
            // was started for (S3: the multipart upload's key) refuses to
            // give it another. Publish it there, then rename that.
            let staged = staged.to_string();
            recorded(
                created,
                staged.clone(),
                self.dest.rename(&pack.partial, &staged),
            )
            .await?;
            from = staged;
            renamed = recorded(created, path.clone(), self.dest.rename(&from, &path)).await;
        }
        match renamed {
            Ok(()) => {}
            Err(DestinationError::AlreadyExists { .. }) => {
                // A pack is named by its SHA-256: the one there holds these
                // very bytes (a segment stored before, unencrypted). Use it.
                if let Err(e) = self.dest.delete(&from).await {
                    tracing::warn!(path = %from, error = %e, "could not remove a pack whose twin was already stored");
                }
            }
            Err(e) if e.is_refusal() => return Err(e.into()),
            Err(e) => {
                let found =
                    crate::store::destination::rename_outcome(self.dest, &from, &path, pack.size)
                        .await;
                match found {
                    Ok(found) => {
                        tracing::warn!(error = %e, "a pack's rename got no answer; {found}")
                    }
                    Err(found) => {
                        return Err(PagedError::Damaged {
                            what: format!("the rename of pack {path} got no answer ({e}); {found}"),
                        })
                    }
                }
            }
        }
        self.packs[pack.number as usize] = PackRef {
            name,
            size: pack.size,
        };
        self.added_bytes += pack.size;
        Ok(())
    }

    async fn write_index(&mut self) -> Result<(), PagedError> {
        if self.ready.is_empty() {
            return Ok(());
        }
        let bytes = self.index.add(&self.ready)?;
        self.ready.clear();
        self.store_index_bytes(bytes).await
    }

    async fn store_index_bytes(&mut self, bytes: Vec<u8>) -> Result<(), PagedError> {
        if !bytes.is_empty() {
            self.index_upload.write(&bytes).await?;
            self.index_sha.update(&bytes);
            self.index_size += bytes.len() as u64;
        }
        Ok(())
    }

    /// Stores what is left (the last segment, the open pack, the index)
    /// and returns the manifest's `pages`; `tail` is what followed the last
    /// whole page.
    ///
    /// # Errors
    /// Destination, compression and encryption failures.
    pub async fn finish(
        mut self,
        tail: &[u8],
        ids: &PageIdScheme,
        created: &mut Vec<String>,
    ) -> Result<PagedOutcome, PagedError> {
        self.flush_segment(created).await?;
        self.close_pack(created).await?;
        self.write_index().await?;
        if self.index.records() != self.pages {
            return Err(PagedError::Damaged {
                what: format!(
                    "internal error: {} index records for {} pages",
                    self.index.records(),
                    self.pages
                ),
            });
        }
        let index = std::mem::replace(&mut self.index, IndexEncoder::new(self.page_size as u32)?);
        let last = index.finish()?;
        self.store_index_bytes(last).await?;
        let stored = self.index_upload.finish().await?;
        if stored != self.index_size {
            return Err(DestinationError::SizeMismatch {
                location: format!("{}/{}", self.dest.describe(), self.index_partial),
                sent: self.index_size,
                stored,
            }
            .into());
        }
        let (page_ids, page_id_key) = ids.describe();
        self.added_bytes += self.index_size;
        tracing::debug!(
            destination = %self.dest.describe(),
            pages = self.pages,
            new = self.new_pages,
            found_elsewhere = self.moved_pages,
            "paged snapshot stored: pages new, and pages the previous set holds at another position"
        );
        Ok(PagedOutcome {
            pages: ManifestPages {
                index: StoredFile {
                    name: self.set.timestamp.page_index_file_name(),
                    size: self.index_size,
                    sha256: hex::encode(self.index_sha.finalize()),
                },
                page_size: self.page_size as u32,
                pages: self.pages,
                tail: hex::encode(tail),
                page_ids,
                page_id_key,
                new_pages: self.new_pages,
                added_bytes: self.added_bytes,
                compared_with: self.previous.as_ref().map(|p| p.set),
                packs: self.packs,
            },
            index_partial: self.index_partial,
        })
    }

    /// Where this writer's packs go.
    pub fn packs_dir(&self) -> &str {
        &self.packs_dir
    }
}
