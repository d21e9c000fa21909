//! Proving a stored set is what its manifest says: `verify` streams every file
//! back and checks size and SHA-256, the snapshot's etcd digest trailer and its
//! snapshot status; `fetch` does the same while writing the files locally,
//! under temporary names until each has passed.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use etcd_backup_proto::{FileKind, ManifestFile};

use crate::catalog::CatalogSet;
use crate::destination::{Destination, DestinationError};
use crate::etcd::SnapshotVerifier;

/// What was found for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    /// File name in the set.
    pub name: String,
    /// Bytes read back.
    pub size: u64,
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
}

const READ_CHUNK: usize = 1 << 20;

/// Streams one file of `set` back, checking it against `entry`; every chunk
/// is also handed to `sink` (fetch writes it; verify passes a no-op), and
/// `progress` gets the running byte count.
///
/// # Errors
/// Read failures of the destination and failures of `sink`.
pub async fn check_file(
    dest: &dyn Destination,
    set: &CatalogSet,
    entry: &ManifestFile,
    mut sink: impl FnMut(&[u8]) -> Result<(), CheckError>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<FileReport, CheckError> {
    let path = set.id.file(&entry.name);
    let mut reader = dest.open(&path).await?;
    let mut sha = Sha256::new();
    let is_snapshot = entry.kind == FileKind::Snapshot;
    let mut digest = is_snapshot.then(SnapshotVerifier::new);
    let mut status = (is_snapshot && set.manifest.snapshot_status.is_some())
        .then(crate::snapshot_status::StreamingStatus::new);
    let mut size = 0u64;
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|source| DestinationError::Io {
                op: "cannot read",
                location: format!("{}/{path}", dest.describe()),
                source,
            })?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        sha.update(chunk);
        if let Some(d) = digest.as_mut() {
            d.update(chunk);
        }
        if let Some(st) = status.as_mut() {
            st.update(chunk);
        }
        sink(chunk)?;
        size += n as u64;
        progress(size);
    }
    let mut problems = Vec::new();
    if size != entry.size {
        problems.push(format!(
            "size is {size} bytes, the manifest says {}",
            entry.size
        ));
    }
    let actual = hex::encode(sha.finalize());
    if actual != entry.sha256 {
        problems.push(format!(
            "sha256 is {actual}, the manifest says {}",
            entry.sha256
        ));
    }
    if let Some(d) = digest {
        if let Err(e) = d.finish() {
            problems.push(format!("etcd digest trailer: {e}"));
        }
    }
    if let (Some(st), Some(want)) = (status, set.manifest.snapshot_status) {
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
    Ok(FileReport {
        name: entry.name.clone(),
        size,
        problems,
    })
}

/// Checks every file of `set`.
///
/// # Errors
/// As [`check_file`].
pub async fn verify_set(
    dest: &dyn Destination,
    set: &CatalogSet,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<Vec<FileReport>, CheckError> {
    let mut reports = Vec::new();
    for entry in &set.manifest.files {
        let name = entry.name.clone();
        let total = entry.size;
        let report =
            check_file(dest, set, entry, |_| Ok(()), &|n| progress(&name, n, total)).await?;
        reports.push(report);
    }
    Ok(reports)
}

/// Downloads and checks every file of `set` into `dir`. Each file is written as
/// `<name>.partial`, synced, checked, and only then renamed to `<name>`; a file
/// that fails its check is deleted. Returns the reports and the final paths of
/// the files that passed.
///
/// # Errors
/// As [`check_file`].
pub async fn fetch_set(
    dest: &dyn Destination,
    set: &CatalogSet,
    dir: &Path,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<(Vec<FileReport>, Vec<PathBuf>), CheckError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut reports = Vec::new();
    let mut written = Vec::new();
    for entry in &set.manifest.files {
        let final_path = dir.join(&entry.name);
        let partial = dir.join(format!(
            "{}{}",
            entry.name,
            etcd_backup_proto::PARTIAL_SUFFIX
        ));
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
