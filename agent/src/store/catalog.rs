//! What a destination holds: complete sets (those with a valid
//! `manifest.json` this agent fully understands) and leftovers: everything
//! else found in a node's directory.
//!
//! Only a parsed, consistent manifest makes a set complete. A leftover is one
//! of three kinds ([`LeftoverKind`]): this agent's own `.partial` files of a run
//! that did not finish (the only kind ever removed, once stale); a set with a
//! newer manifest `format_version` (kept, and counted as a set for retention
//! and the age metrics); and anything else, which is reported and never
//! removed: restic's rule, "never delete what cannot be proven ours".

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;

pub use etcd_backup_proto::api::LeftoverKind;
use etcd_backup_proto::{
    Manifest, SetId, SetTimestamp, MANIFEST_FILE_NAME, MANIFEST_FORMAT_VERSION,
};

use crate::store::destination::{Destination, DestinationError, DirEntry};

/// Largest manifest read; a real one is about 1 KiB.
const MAX_MANIFEST: u64 = 1 << 20;

/// Why the catalog could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Listing or reading failed.
    #[error(transparent)]
    Destination(#[from] DestinationError),
    /// The set asked for does not exist (or is not complete).
    #[error("no complete backup set {wanted} for node {node} in {location}{hint}")]
    NotFound {
        /// What was asked for.
        wanted: String,
        /// The node searched.
        node: String,
        /// The destination.
        location: String,
        /// What exists instead.
        hint: String,
    },
    /// The set name given is not a timestamp or `latest`.
    #[error("{given:?} is not a backup set: give `latest`, a set timestamp such as 2026-11-24_120000, or <cluster>/<node>/<timestamp>")]
    BadSetName {
        /// What was given.
        given: String,
    },
}

/// A complete set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogSet {
    /// Where it is.
    pub id: SetId,
    /// Its manifest.
    pub manifest: Manifest,
}

/// An entry of a node's directory that is not a complete set, or a
/// complete set that also holds files no complete set has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// The set directory it belongs to (or, when the entry is not a
    /// directory, its path).
    pub dir: String,
    /// The node whose directory holds it.
    pub node: String,
    /// Whether the agent may remove it.
    pub kind: LeftoverKind,
    /// The set's timestamp, from the directory name.
    pub timestamp: Option<SetTimestamp>,
    /// Files in it (names only).
    pub files: Vec<String>,
    /// Newest modification time among them, when the destination reports it.
    pub modified: Option<DateTime<Utc>>,
    /// Why it is not complete.
    pub why: String,
    /// For [`LeftoverKind::NewerFormat`]: when the set finished, as far as
    /// its manifest says (its `finished_at`, else the set's timestamp).
    pub finished_at: Option<DateTime<Utc>>,
}

impl Leftover {
    /// Whether the agent never removes it and an admin should look at it.
    pub fn needs_attention(&self) -> bool {
        self.kind != LeftoverKind::OwnPartial
    }
}

/// Everything found for the nodes scanned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    /// Complete sets, oldest first.
    pub sets: Vec<CatalogSet>,
    /// Leftovers, oldest first.
    pub leftovers: Vec<Leftover>,
    /// Set directories whose `manifest.json` could not be read as a
    /// manifest this agent understands (damaged, foreign, or a newer
    /// format), with why: such a set may need any pack, so packs are not
    /// collected while one exists.
    pub unreadable_manifests: Vec<(String, String)>,
}

impl CatalogSet {
    /// The summary `list` and the API show.
    pub fn summary(&self) -> etcd_backup_proto::api::SetSummary {
        let m = &self.manifest;
        let size = |k| m.file(k).map(|f| f.size);
        etcd_backup_proto::api::SetSummary {
            set: self.id.dir(),
            node: self.id.node.clone(),
            timestamp: self.id.timestamp,
            finished_at: m.finished_at,
            snapshot_bytes: size(etcd_backup_proto::FileKind::Snapshot).unwrap_or(0),
            format: if m.files.iter().any(|f| f.pages.is_some()) {
                "paged"
            } else {
                "full"
            }
            .to_string(),
            added_bytes: m
                .files
                .iter()
                .map(|f| f.pages.as_ref().map_or(f.size, |p| p.added_bytes))
                .sum(),
            resources_bytes: size(etcd_backup_proto::FileKind::Resources),
            revision: m.revision(),
            total_key: m.snapshot_status.map(|s| s.total_key),
            encrypted: m.encryption.is_some(),
            compression: m
                .compression
                .as_ref()
                .map_or("none", |c| c.algorithm.as_str())
                .to_string(),
            layout: m.resources_layout.clone(),
            durable: m.durable,
            rollout_in_progress: m.rollout_in_progress.clone(),
        }
    }
}

impl Leftover {
    /// The summary `list --include-partial` shows.
    pub fn summary(&self) -> etcd_backup_proto::api::LeftoverSummary {
        etcd_backup_proto::api::LeftoverSummary {
            dir: self.dir.clone(),
            kind: self.kind,
            files: self.files.clone(),
            modified: self.modified,
            why: self.why.clone(),
        }
    }
}

impl Catalog {
    /// The newest complete set.
    pub fn latest(&self) -> Option<&CatalogSet> {
        self.sets.last()
    }

    /// The newest complete set not taken mid-rollout (its manifest's
    /// `rollout_in_progress` empty).
    pub fn latest_clean(&self) -> Option<&CatalogSet> {
        self.sets
            .iter()
            .rev()
            .find(|s| s.manifest.rollout_in_progress.is_empty())
    }

    /// Sets with a newer `format_version`: never removed, and counted as
    /// sets by retention and the age metrics, so a downgraded agent neither
    /// prunes around them nor reports the backups as missing.
    pub fn newer_format(&self) -> impl Iterator<Item = &Leftover> {
        self.leftovers
            .iter()
            .filter(|l| l.kind == LeftoverKind::NewerFormat)
    }

    /// Entries an admin should look at (never removed), of `node`.
    pub fn needing_attention(&self, node: &str) -> usize {
        self.leftovers
            .iter()
            .filter(|l| l.node == node && l.needs_attention())
            .count()
    }

    /// Whether `dir`, a complete set, also holds something this agent did
    /// not write, so retention must leave it alone.
    pub fn holds_unrecognised(&self, dir: &str) -> bool {
        self.leftovers
            .iter()
            .any(|l| l.dir == dir && l.kind == LeftoverKind::Unrecognised)
    }
}

/// Reads a small file whole.
///
/// # Errors
/// Destination failures; a file larger than `limit`.
pub async fn read_small(
    dest: &dyn Destination,
    path: &str,
    limit: u64,
) -> Result<Vec<u8>, DestinationError> {
    let reader = dest.open(path).await?;
    let mut buf = Vec::new();
    reader
        .take(limit + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(|source| DestinationError::Io {
            op: "cannot read",
            location: format!("{}/{path}", dest.describe()),
            source,
        })?;
    if buf.len() as u64 > limit {
        return Err(DestinationError::Io {
            op: "refusing to read",
            location: format!("{}/{path}", dest.describe()),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than {limit} bytes"),
            ),
        });
    }
    Ok(buf)
}

/// The name a set's manifest gets while the set is removed: the set stops
/// being complete at once, and what is left stays provably this agent's.
pub const MANIFEST_BEING_REMOVED: &str = "manifest.json.partial";

/// Whether a set without `manifest.json` is one this agent was removing (or
/// finishing): its `manifest.json.partial` is a manifest this agent reads,
/// written for this set, and lists every file that is not a `.partial` one.
async fn being_removed(
    dest: &dyn Destination,
    id: &SetId,
    listing: &[DirEntry],
    foreign: &[String],
) -> bool {
    if !listing.iter().any(|e| e.name == MANIFEST_BEING_REMOVED) {
        return false;
    }
    let Ok(bytes) = read_small(dest, &id.file(MANIFEST_BEING_REMOVED), MAX_MANIFEST).await else {
        return false;
    };
    let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) else {
        return false;
    };
    m.format_version <= MANIFEST_FORMAT_VERSION
        && m.cluster == id.cluster
        && m.node == id.node
        && m.timestamp == id.timestamp
        && foreign
            .iter()
            .all(|n| m.files.iter().any(|f| f.stored_name() == n))
}

/// Files a set whose manifest was read: complete (and, if it also holds
/// names this agent did not write or partials, a leftover too), a newer
/// format, or a problem.
fn record(
    catalog: &mut Catalog,
    mut found: Leftover,
    id: SetId,
    ts: SetTimestamp,
    listing: &[DirEntry],
    read: ManifestRead,
) {
    match read {
        ManifestRead::Complete(m) => {
            let known = |n: &str| {
                n == MANIFEST_FILE_NAME
                    || ts.is_own_partial(n)
                    || m.files.iter().any(|f| f.stored_name() == n)
            };
            let foreign = names(listing.iter().filter(|f| !known(&f.name)));
            let partials = names(listing.iter().filter(|f| ts.is_own_partial(&f.name)));
            if !foreign.is_empty() {
                found.why = format!(
                    "a complete set that also holds {}, which this agent did not write; retention leaves this set alone",
                    foreign.join(", ")
                );
                catalog.leftovers.push(found);
            } else if !partials.is_empty() {
                found.kind = LeftoverKind::OwnPartial;
                found.files = partials;
                found.why = "partial files inside a complete set".into();
                catalog.leftovers.push(found);
            }
            catalog.sets.push(CatalogSet { id, manifest: *m });
        }
        ManifestRead::Newer {
            format_version,
            finished_at,
        } => {
            found.kind = LeftoverKind::NewerFormat;
            found.finished_at = finished_at.or(Some(ts.as_datetime()));
            found.why = format!(
                "manifest format_version {format_version} is newer than this agent understands ({MANIFEST_FORMAT_VERSION}); kept and counted as a set; upgrade the agent to read it"
            );
            catalog
                .unreadable_manifests
                .push((found.dir.clone(), found.why.clone()));
            catalog.leftovers.push(found);
        }
        ManifestRead::Problem(why) => {
            found.why = why;
            catalog
                .unreadable_manifests
                .push((found.dir.clone(), found.why.clone()));
            catalog.leftovers.push(found);
        }
    }
}

/// The names of `entries`, for messages and plans.
fn names<'a>(entries: impl Iterator<Item = &'a DirEntry>) -> Vec<String> {
    entries.map(|e| e.name.clone()).collect()
}

/// What a set's `manifest.json` says about the set.
enum ManifestRead {
    /// A manifest this agent understands, and the set matches it.
    Complete(Box<Manifest>),
    /// A newer `format_version`: not read further.
    Newer {
        /// The version found.
        format_version: u32,
        /// Its `finished_at`, when that is still where this agent looks.
        finished_at: Option<DateTime<Utc>>,
    },
    /// Not valid, or the set does not match it.
    Problem(String),
}

fn read_manifest(bytes: &[u8], id: &SetId, listing: &[DirEntry]) -> ManifestRead {
    /// Only the version first: a newer manifest may not parse as this one.
    #[derive(serde::Deserialize)]
    struct Version {
        format_version: u32,
    }
    #[derive(serde::Deserialize)]
    struct Finished {
        finished_at: DateTime<Utc>,
    }
    let version = match serde_json::from_slice::<Version>(bytes) {
        Ok(v) => v.format_version,
        Err(e) => return ManifestRead::Problem(format!("manifest.json is not valid: {e}")),
    };
    if version > MANIFEST_FORMAT_VERSION {
        return ManifestRead::Newer {
            format_version: version,
            finished_at: serde_json::from_slice::<Finished>(bytes)
                .ok()
                .map(|f| f.finished_at),
        };
    }
    let m = match serde_json::from_slice::<Manifest>(bytes) {
        Ok(m) => m,
        Err(e) => return ManifestRead::Problem(format!("manifest.json is not valid: {e}")),
    };
    match manifest_problem(&m, id, listing) {
        None => ManifestRead::Complete(Box::new(m)),
        Some(why) => ManifestRead::Problem(why),
    }
}

/// Why a manifest does not make its set complete, if it doesn't.
fn manifest_problem(m: &Manifest, id: &SetId, listing: &[DirEntry]) -> Option<String> {
    if m.cluster != id.cluster || m.node != id.node || m.timestamp != id.timestamp {
        return Some(format!(
            "manifest names {}/{}/{}, but it is stored in {}",
            m.cluster,
            m.node,
            m.timestamp,
            id.dir()
        ));
    }
    if m.files.is_empty() {
        return Some("manifest lists no files".into());
    }
    for f in &m.files {
        if let Err(e) = id.timestamp.check_file_name(&f.name, false) {
            return Some(e.to_string());
        }
        if let Some(pages) = &f.pages {
            if let Some(why) = paged_problem(m, f, pages, id, listing) {
                return Some(why);
            }
            continue;
        }
        let Some(stored) = listing.iter().find(|e| e.name == f.name) else {
            return Some(format!("{} is in the manifest but not in the set", f.name));
        };
        if stored.size != f.size {
            return Some(format!(
                "{} holds {} bytes, the manifest says {}: the file was truncated or changed after the set was written",
                f.name, stored.size, f.size
            ));
        }
        // fetch writes a decrypted or decompressed file under this name: it
        // must be the stored name without `.age` and `.zst`, never a path of
        // the manifest's choosing.
        let transformed = f.is_encrypted() || f.compression.is_some();
        match (&f.plaintext, transformed) {
            (Some(p), true) => {
                let expected = f.expected_plaintext_name();
                if expected != Some(p.name.as_str()) {
                    return Some(format!(
                        "{}: the manifest names its plaintext {:?}; only {:?} is accepted",
                        f.name,
                        p.name,
                        expected.unwrap_or(
                            "(a name ending in .zst or .zst.age, for a compressed file)"
                        )
                    ));
                }
            }
            (None, true) => {
                return Some(format!(
                    "{}: the manifest gives no plaintext for an encrypted or compressed file",
                    f.name
                ))
            }
            (Some(_), false) => {
                return Some(format!(
                    "{}: the manifest gives a plaintext for a file stored as is",
                    f.name
                ))
            }
            (None, false) => {}
        }
        if f.compression.is_some() && f.kind != etcd_backup_proto::FileKind::Snapshot {
            return Some(format!("{}: only the snapshot is ever compressed", f.name));
        }
    }
    // A paged snapshot's packs are stored as the manifest's compression and
    // encryption say; its own entry names the plain snapshot.
    let paged = m.files.iter().any(|f| f.pages.is_some());
    let encrypted = m.files.iter().any(|f| f.is_encrypted()) || (paged && m.encryption.is_some());
    if encrypted != m.encryption.is_some() {
        return Some("the manifest's encryption and its files' names disagree".into());
    }
    if !paged && m.files.iter().any(|f| f.compression.is_some()) != m.compression.is_some() {
        return Some("the manifest's compression and its files' compression disagree".into());
    }
    None
}

/// Why a paged snapshot's entry does not make its set complete, if it doesn't.
fn paged_problem(
    m: &Manifest,
    f: &etcd_backup_proto::ManifestFile,
    pages: &etcd_backup_proto::ManifestPages,
    id: &SetId,
    listing: &[DirEntry],
) -> Option<String> {
    if m.format_version < etcd_backup_proto::MANIFEST_FORMAT_PAGED {
        return Some(format!(
            "{}: pages in a manifest of format_version {}",
            f.name, m.format_version
        ));
    }
    if f.kind != etcd_backup_proto::FileKind::Snapshot
        || f.name != id.timestamp.snapshot_file_name()
        || f.compression.is_some()
        || f.plaintext.is_some()
    {
        return Some(format!(
            "{}: only the plain snapshot, snapshot_{}.db, is ever paged",
            f.name, id.timestamp
        ));
    }
    if pages.index.name != id.timestamp.page_index_file_name() {
        return Some(format!(
            "the manifest names the page index {:?}; only {:?} is accepted",
            pages.index.name,
            id.timestamp.page_index_file_name()
        ));
    }
    if let Err(e) = crate::store::paged::check_manifest_pages(pages, &id.dir()) {
        return Some(e.to_string());
    }
    let Some(stored) = listing.iter().find(|e| e.name == pages.index.name) else {
        return Some(format!(
            "{} is in the manifest but not in the set",
            pages.index.name
        ));
    };
    if stored.size != pages.index.size {
        return Some(format!(
            "{} holds {} bytes, the manifest says {}: the file was truncated or changed after the set was written",
            pages.index.name, stored.size, pages.index.size
        ));
    }
    None
}

/// Manifests already read, by set directory: a complete set's manifest never
/// changes, so a daemon that rescans the catalog reads each one once.
#[derive(Debug, Default)]
pub struct ManifestCache {
    by_dir: std::collections::HashMap<String, Vec<u8>>,
}

impl ManifestCache {
    /// How many manifests are held.
    pub fn len(&self) -> usize {
        self.by_dir.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.by_dir.is_empty()
    }
}

/// Scans `<cluster>/<node>` (or every node of the cluster when `node` is None).
///
/// # Errors
/// Destination failures while listing or reading manifests.
pub async fn scan(
    dest: &dyn Destination,
    cluster: &str,
    node: Option<&str>,
) -> Result<Catalog, CatalogError> {
    scan_cached(dest, cluster, node, &mut ManifestCache::default()).await
}

/// [`scan`], reading only the manifests `cache` does not hold yet. The
/// directories are listed every time (a set that lost its manifest or gained
/// partial files is seen); entries of directories no longer found are dropped.
///
/// # Errors
/// As [`scan`].
pub async fn scan_cached(
    dest: &dyn Destination,
    cluster: &str,
    node: Option<&str>,
    cache: &mut ManifestCache,
) -> Result<Catalog, CatalogError> {
    let mut seen = std::collections::HashMap::new();
    let nodes: Vec<String> = match node {
        Some(n) => vec![n.to_string()],
        None => dest
            .list(cluster)
            .await?
            .into_iter()
            .filter(|e| e.is_dir)
            .map(|e| e.name)
            .collect(),
    };
    let mut catalog = Catalog::default();
    let cached = std::mem::take(&mut cache.by_dir);
    for node in nodes {
        let node_dir = format!("{cluster}/{node}");
        let entries = dest.list(&node_dir).await?;
        // Each entry needs its own round trips (a listing, maybe a
        // manifest): several at once, so a destination far away with many
        // sets is not read one round trip at a time. In order all the same.
        let looked: Vec<Result<Looked, CatalogError>> = futures_util::stream::iter(entries)
            .map(|entry| look_at(dest, cluster, &node, &node_dir, entry, &cached))
            .buffered(SCAN_AT_ONCE)
            .collect()
            .await;
        for l in looked {
            match l? {
                Looked::Packs => {}
                Looked::Leftover(found) => catalog.leftovers.push(found),
                Looked::Set {
                    found,
                    id,
                    ts,
                    listing,
                    bytes,
                } => {
                    let read = read_manifest(&bytes, &id, &listing);
                    seen.insert(found.dir.clone(), bytes);
                    record(&mut catalog, found, id, ts, &listing, read);
                }
            }
        }
    }
    cache.by_dir = seen;
    catalog
        .sets
        .sort_by(|a, b| (a.id.timestamp, &a.id.node).cmp(&(b.id.timestamp, &b.id.node)));
    catalog
        .leftovers
        .sort_by(|a, b| (a.timestamp, &a.dir).cmp(&(b.timestamp, &b.dir)));
    Ok(catalog)
}

/// The newest complete set of `cluster`/`node` for which `wanted` holds,
/// looking at the node's set directories newest first, a few (8) at
/// a time, and no further than the first batch that holds one: a run
/// that needs only its newest set (a paged run's previous set) does not
/// read every manifest of a long retention, round trip after round trip.
/// A set that is not complete is passed over, as [`scan`] does.
///
/// # Errors
/// The node's directory, or one of the set directories looked at, cannot
/// be read.
pub async fn find_newest(
    dest: &dyn Destination,
    cluster: &str,
    node: &str,
    wanted: impl Fn(&CatalogSet) -> bool,
) -> Result<Option<CatalogSet>, CatalogError> {
    let node_dir = format!("{cluster}/{node}");
    let mut entries: Vec<(SetTimestamp, DirEntry)> = dest
        .list(&node_dir)
        .await?
        .into_iter()
        .filter(|e| e.is_dir)
        .filter_map(|e| Some((e.name.parse().ok()?, e)))
        .collect();
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    let none = std::collections::HashMap::new();
    for batch in entries.chunks(SCAN_AT_ONCE) {
        let looked = futures_util::future::join_all(
            batch
                .iter()
                .map(|(_, e)| look_at(dest, cluster, node, &node_dir, e.clone(), &none)),
        )
        .await;
        let mut catalog = Catalog::default();
        for l in looked {
            if let Looked::Set {
                found,
                id,
                ts,
                listing,
                bytes,
            } = l?
            {
                let read = read_manifest(&bytes, &id, &listing);
                record(&mut catalog, found, id, ts, &listing, read);
            }
        }
        catalog
            .sets
            .sort_by_key(|s| std::cmp::Reverse(s.id.timestamp));
        if let Some(set) = catalog.sets.into_iter().find(|s| wanted(s)) {
            return Ok(Some(set));
        }
    }
    Ok(None)
}

/// Set directories of one node looked at concurrently by [`scan_cached`].
const SCAN_AT_ONCE: usize = 8;

/// What one entry of a node's directory turned out to be.
enum Looked {
    /// The node's packs directory (paged sets): not a set; prune's
    /// collection looks at it.
    Packs,
    Leftover(Leftover),
    Set {
        found: Leftover,
        id: SetId,
        ts: SetTimestamp,
        listing: Vec<DirEntry>,
        bytes: Vec<u8>,
    },
}

/// Looks at one entry of `node_dir`: lists it and reads its manifest
/// (unless `cached` holds it).
async fn look_at(
    dest: &dyn Destination,
    cluster: &str,
    node: &str,
    node_dir: &str,
    entry: DirEntry,
    cached: &std::collections::HashMap<String, Vec<u8>>,
) -> Result<Looked, CatalogError> {
    let dir = format!("{node_dir}/{}", entry.name);
    let timestamp: Option<SetTimestamp> = entry.name.parse().ok();
    let mut found = Leftover {
        dir: dir.clone(),
        node: node.to_string(),
        kind: LeftoverKind::Unrecognised,
        timestamp,
        files: Vec::new(),
        modified: entry.modified.map(DateTime::<Utc>::from),
        why: String::new(),
        finished_at: None,
    };
    if entry.is_dir && entry.name == etcd_backup_proto::PACKS_DIR {
        return Ok(Looked::Packs);
    }
    if !entry.is_dir {
        found.why = if entry.is_file {
            "a file, not a set directory: this agent writes no files here".into()
        } else {
            "neither a directory nor a regular file (a symbolic link?): never followed or removed"
                .into()
        };
        return Ok(Looked::Leftover(found));
    }
    let Some(ts) = timestamp else {
        found.why = "the directory name is not a set timestamp (YYYY-MM-DD_HHMMSS), so this agent did not make it".into();
        return Ok(Looked::Leftover(found));
    };
    let id = SetId {
        cluster: cluster.to_string(),
        node: node.to_string(),
        timestamp: ts,
    };
    // The manifest is read while the directory is listed (on a distant
    // store, one wait instead of two); what was read counts only if the
    // listing holds the manifest.
    let read = async {
        match cached.get(&dir) {
            Some(b) => Ok(b.clone()),
            None => read_small(dest, &id.file(MANIFEST_FILE_NAME), MAX_MANIFEST).await,
        }
    };
    let (listing, bytes) = tokio::join!(dest.list(&dir), read);
    let listing = listing?;
    found.files = listing.iter().map(|e| e.name.clone()).collect();
    found.modified = listing
        .iter()
        .filter_map(|e| e.modified)
        .max()
        .map(DateTime::<Utc>::from)
        .or(found.modified);
    let odd = names(listing.iter().filter(|e| !e.is_file));
    if !odd.is_empty() {
        found.why = format!(
            "holds {}, which is not a regular file; this agent writes only regular files in a set",
            odd.join(", ")
        );
        return Ok(Looked::Leftover(found));
    }
    if !listing.iter().any(|f| f.name == MANIFEST_FILE_NAME) {
        let foreign = names(listing.iter().filter(|f| !ts.is_own_partial(&f.name)));
        if foreign.is_empty() {
            found.kind = LeftoverKind::OwnPartial;
            found.why =
                "no manifest.json: a run of this agent that did not finish (only its .partial files)".into();
        } else if being_removed(dest, &id, &listing, &foreign).await {
            found.kind = LeftoverKind::OwnPartial;
            found.why = "no manifest.json: a set this agent was removing (its manifest, renamed to manifest.json.partial, lists the files left)".into();
        } else {
            found.why = format!(
                "no manifest.json, and it holds {}, which this agent names so only after it is complete (a run cut off between its renames, or a copy made by hand or by cluster-backup.sh)",
                foreign.join(", ")
            );
        }
        return Ok(Looked::Leftover(found));
    }
    let bytes = bytes?;
    Ok(Looked::Set {
        found,
        id,
        ts,
        listing,
        bytes,
    })
}

/// The newest complete set of `node` not taken mid-rollout (`fetch latest
/// --clean`).
///
/// # Errors
/// [`CatalogError::NotFound`] (saying how many newer sets were marked), or
/// the destination cannot be read.
pub async fn find_latest_clean(
    dest: &dyn Destination,
    cluster: &str,
    node: &str,
) -> Result<CatalogSet, CatalogError> {
    let catalog = scan(dest, cluster, Some(node)).await?;
    catalog
        .latest_clean()
        .cloned()
        .ok_or_else(|| CatalogError::NotFound {
            wanted: "latest --clean".to_string(),
            node: node.to_string(),
            location: dest.describe(),
            hint: match catalog.latest() {
                Some(latest) => format!(
                    "; all {} complete sets were taken mid-rollout, the newest {}",
                    catalog.sets.len(),
                    latest.id.timestamp
                ),
                None => "; it has no complete sets (see `list --all-nodes`)".to_string(),
            },
        })
}

/// Finds one complete set of `node`: `latest`, a timestamp, or a full
/// `<cluster>/<node>/<timestamp>` path (which then decides cluster and node).
///
/// # Errors
/// [`CatalogError::BadSetName`], [`CatalogError::NotFound`], destination failures.
pub async fn find(
    dest: &dyn Destination,
    cluster: &str,
    node: &str,
    wanted: &str,
) -> Result<CatalogSet, CatalogError> {
    let (cluster, node, ts) = match wanted.split('/').collect::<Vec<_>>().as_slice() {
        ["latest"] => (cluster.to_string(), node.to_string(), None),
        [ts] => (cluster.to_string(), node.to_string(), Some(*ts)),
        [c, n, ts] => (c.to_string(), n.to_string(), Some(*ts)),
        _ => {
            return Err(CatalogError::BadSetName {
                given: wanted.to_string(),
            })
        }
    };
    let ts: Option<SetTimestamp> = match ts {
        Some(t) => Some(t.parse().map_err(|_| CatalogError::BadSetName {
            given: wanted.to_string(),
        })?),
        None => None,
    };
    let catalog = scan(dest, &cluster, Some(&node)).await?;
    let found = match ts {
        None => catalog.latest().cloned(),
        Some(ts) => catalog.sets.iter().find(|s| s.id.timestamp == ts).cloned(),
    };
    found.ok_or_else(|| {
        let incomplete = catalog
            .leftovers
            .iter()
            .find(|l| ts.is_some() && l.timestamp == ts);
        let hint = match (catalog.latest(), incomplete) {
            (_, Some(l)) => format!("; that set is incomplete: {}", l.why),
            (Some(latest), None) => format!("; the newest complete set is {}", latest.id.timestamp),
            (None, None) => "; it has no complete sets (see `list --all-nodes`)".to_string(),
        };
        CatalogError::NotFound {
            wanted: wanted.to_string(),
            node: node.clone(),
            location: dest.describe(),
            hint,
        }
    })
}

/// Sets written straight to a local directory, for unit tests.
#[cfg(test)]
pub(crate) mod test_sets {
    /// A complete set `c/n/<ts>` (a 2-byte snapshot and its manifest) below `base`.
    pub fn write_set(base: &std::path::Path, ts: &str) {
        let dir = base.join("c/n").join(ts);
        std::fs::create_dir_all(&dir).unwrap();
        let snap = format!("snapshot_{ts}.db");
        std::fs::write(dir.join(&snap), b"db").unwrap();
        let m = serde_json::json!({
            "format_version": 1, "cluster": "c", "node": "n", "timestamp": ts,
            "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:01Z",
            "agent_version": "0", "resources_layout": "none",
            "etcd": {"endpoint": "e", "cluster_id": "1", "member_id": "2", "version": "3.5.0", "revision": 1, "db_size": 2},
            "files": [{"name": snap, "kind": "snapshot", "size": 2, "sha256": "00"}]
        });
        std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::destination::LocalDir;

    #[tokio::test]
    async fn a_set_whose_stored_size_differs_from_its_manifest_is_not_complete() {
        let tmp = tempfile::tempdir().unwrap();
        test_sets::write_set(tmp.path(), "2026-01-01_000000");
        let dest = LocalDir::open(tmp.path()).await.unwrap();
        assert_eq!(scan(&dest, "c", None).await.unwrap().sets.len(), 1);
        let snap = tmp
            .path()
            .join("c/n/2026-01-01_000000/snapshot_2026-01-01_000000.db");
        std::fs::write(&snap, b"d").unwrap();
        let cat = scan(&dest, "c", None).await.unwrap();
        assert!(cat.sets.is_empty());
        assert_eq!(cat.leftovers[0].kind, LeftoverKind::Unrecognised);
        assert!(
            cat.leftovers[0]
                .why
                .contains("holds 1 bytes, the manifest says 2"),
            "{cat:?}"
        );
    }

    #[tokio::test]
    async fn find_newest_looks_newest_first_across_batches_and_passes_over_what_is_not_complete() {
        let tmp = tempfile::tempdir().unwrap();
        // More sets than one batch looks at (8), the oldest first.
        let stamps: Vec<String> = (1..=10).map(|d| format!("2026-01-{d:02}_000000")).collect();
        for ts in &stamps {
            test_sets::write_set(tmp.path(), ts);
        }
        // Newer than all: a run's partial files, and a set that lost a file.
        let partial = tmp.path().join("c/n/2026-02-01_000000");
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(partial.join("manifest.json.partial"), b"{}").unwrap();
        test_sets::write_set(tmp.path(), "2026-02-02_000000");
        std::fs::remove_file(
            tmp.path()
                .join("c/n/2026-02-02_000000/snapshot_2026-02-02_000000.db"),
        )
        .unwrap();
        let dest = LocalDir::open(tmp.path()).await.unwrap();

        let newest = find_newest(&dest, "c", "n", |_| true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(newest.id.timestamp.to_string(), stamps[9]);
        // Wanted only in the oldest set, in the second batch.
        let oldest = find_newest(&dest, "c", "n", |s| s.id.timestamp.to_string() == stamps[0])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(oldest.id.timestamp.to_string(), stamps[0]);
        assert!(find_newest(&dest, "c", "n", |_| false)
            .await
            .unwrap()
            .is_none());
        // A node with no directory has no sets.
        assert!(find_newest(&dest, "c", "other", |_| true)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn a_cached_scan_reads_each_manifest_once_and_still_sees_what_changed() {
        let tmp = tempfile::tempdir().unwrap();
        test_sets::write_set(tmp.path(), "2026-01-01_000000");
        test_sets::write_set(tmp.path(), "2026-01-02_000000");
        let dest = LocalDir::open(tmp.path()).await.unwrap();
        let mut cache = ManifestCache::default();
        let cat = scan_cached(&dest, "c", None, &mut cache).await.unwrap();
        assert_eq!(cat.sets.len(), 2);
        assert_eq!(cache.len(), 2);

        // A manifest changed after it was read is not read again (a complete
        // set's manifest never changes); an uncached scan does read it.
        let first = tmp.path().join("c/n/2026-01-01_000000/manifest.json");
        std::fs::write(&first, b"{").unwrap();
        let cat = scan_cached(&dest, "c", None, &mut cache).await.unwrap();
        assert_eq!(cat.sets.len(), 2);
        let fresh = scan(&dest, "c", None).await.unwrap();
        assert_eq!(fresh.sets.len(), 1);
        assert!(fresh.leftovers[0].why.contains("not valid"));

        // What the listing shows still counts: a deleted manifest makes a
        // leftover, a removed set is forgotten, a new one is read.
        std::fs::remove_file(&first).unwrap();
        std::fs::remove_dir_all(tmp.path().join("c/n/2026-01-02_000000")).unwrap();
        test_sets::write_set(tmp.path(), "2026-01-03_000000");
        let cat = scan_cached(&dest, "c", None, &mut cache).await.unwrap();
        assert_eq!(cat.sets.len(), 1);
        assert_eq!(cat.sets[0].id.timestamp.to_string(), "2026-01-03_000000");
        assert_eq!(cat.leftovers.len(), 1);
        assert_eq!(cache.len(), 1);
    }
}
