//! Applying the retention policy to a destination: which sets go (see
//! [`crate::retention`]), and removing them so that an interrupted prune never
//! leaves a set that looks complete: `manifest.json` is deleted first.

use chrono::{DateTime, Utc};

use etcd_backup_proto::{SetTimestamp, MANIFEST_FILE_NAME, PARTIAL_SUFFIX};

use crate::catalog::{self, CatalogError};
use crate::config::Config;
use crate::destination::{Destination, DestinationError};
use crate::retention::{self, Decision};

/// What a prune decided and did.
#[derive(Debug, Clone, Default)]
pub struct PruneReport {
    /// Every complete set, newest first, kept or not, with reasons.
    pub decisions: Vec<Decision>,
    /// Set directories removed (or that would be, in a dry run).
    pub removed_sets: Vec<String>,
    /// Stale leftovers removed (or that would be).
    pub removed_leftovers: Vec<String>,
    /// Removals that failed; the rest went on.
    pub errors: Vec<String>,
}

/// Decides and (unless `dry_run`) removes, for one node.
///
/// # Errors
/// The catalog could not be read; failures of single removals are collected
/// in [`PruneReport::errors`] instead.
pub async fn prune(
    dest: &dyn Destination,
    config: &Config,
    node: &str,
    now: DateTime<Utc>,
    in_progress: Option<SetTimestamp>,
    dry_run: bool,
) -> Result<PruneReport, CatalogError> {
    let cat = catalog::scan(dest, &config.cluster_name, Some(node)).await?;
    let stamps: Vec<SetTimestamp> = cat.sets.iter().map(|s| s.id.timestamp).collect();
    let decisions = retention::decide(&config.retention, &stamps, now);
    let mut report = PruneReport::default();
    for d in decisions.iter().filter(|d| !d.keep) {
        let Some(set) = cat.sets.iter().find(|s| s.id.timestamp == d.timestamp) else {
            continue;
        };
        let dir = set.id.dir();
        if !dry_run {
            if let Err(e) = remove_set(dest, &dir).await {
                report.errors.push(format!("{dir}: {e}"));
                continue;
            }
        }
        report.removed_sets.push(dir);
    }
    let complete_dirs: Vec<String> = cat.sets.iter().map(|s| s.id.dir()).collect();
    let leftovers: Vec<retention::Leftover> = cat
        .leftovers
        .iter()
        .map(|l| retention::Leftover {
            path: l.dir.clone(),
            modified: l.modified,
            set_timestamp: l.timestamp,
        })
        .collect();
    for stale in
        retention::stale_leftovers(&config.retention, &leftovers, in_progress.as_ref(), now)
    {
        let inside_complete = complete_dirs.contains(&stale.path);
        if !dry_run {
            let result = if inside_complete {
                remove_partials(dest, &stale.path).await
            } else {
                remove_dir_and_files(dest, &stale.path).await
            };
            if let Err(e) = result {
                report.errors.push(format!("{}: {e}", stale.path));
                continue;
            }
        }
        report.removed_leftovers.push(stale.path.clone());
    }
    report.decisions = decisions;
    Ok(report)
}

/// Deletes a complete set: the manifest first, so from that moment on the set
/// is a leftover, never a complete set with missing files.
async fn remove_set(dest: &dyn Destination, dir: &str) -> Result<(), DestinationError> {
    dest.delete(&format!("{dir}/{MANIFEST_FILE_NAME}")).await?;
    remove_dir_and_files(dest, dir).await
}

async fn remove_dir_and_files(dest: &dyn Destination, dir: &str) -> Result<(), DestinationError> {
    let files = dest.list(dir).await?;
    // A manifest, should a leftover have one, goes first here too.
    let mut names: Vec<&str> = files
        .iter()
        .filter(|f| !f.is_dir)
        .map(|f| f.name.as_str())
        .collect();
    names.sort_by_key(|n| *n != MANIFEST_FILE_NAME);
    for name in names {
        dest.delete(&format!("{dir}/{name}")).await?;
    }
    dest.remove_dir(dir).await
}

async fn remove_partials(dest: &dyn Destination, dir: &str) -> Result<(), DestinationError> {
    for f in dest.list(dir).await? {
        if !f.is_dir && f.name.ends_with(PARTIAL_SUFFIX) {
            dest.delete(&format!("{dir}/{}", f.name)).await?;
        }
    }
    Ok(())
}

/// Applies retention after a successful run of the daemon or `backup`,
/// logging what went; the caller counts a failure.
///
/// # Errors
/// The destination or its catalog could not be read, or some removals failed
/// (summarised).
pub async fn after_backup(config: &Config) -> Result<PruneReport, String> {
    let dest = crate::destination::open(&config.destination)
        .await
        .map_err(|e| e.to_string())?;
    let report = prune(
        dest.as_ref(),
        config,
        &config.node_name,
        Utc::now(),
        None,
        false,
    )
    .await
    .map_err(|e| e.to_string())?;
    let (kept, _) = retention::counts(&report.decisions);
    if !report.removed_sets.is_empty() || !report.removed_leftovers.is_empty() {
        tracing::info!(
            kept,
            removed = report.removed_sets.len(),
            removed_leftovers = report.removed_leftovers.len(),
            "retention applied"
        );
    }
    if report.errors.is_empty() {
        Ok(report)
    } else {
        Err(format!(
            "{} removal(s) failed: {}",
            report.errors.len(),
            report.errors.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Environment;
    use crate::destination::{DirEntry, LocalDir, Upload};
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncRead;

    /// A local directory whose deletes fail from the n-th on, as a connection
    /// that drops in the middle of a prune.
    struct DeletesFailFrom {
        inner: LocalDir,
        from: usize,
        deletes: AtomicUsize,
    }

    #[async_trait]
    impl Destination for DeletesFailFrom {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        async fn create(&self, path: &str) -> Result<Box<dyn Upload>, DestinationError> {
            self.inner.create(path).await
        }
        async fn rename(&self, from: &str, to: &str) -> Result<(), DestinationError> {
            self.inner.rename(from, to).await
        }
        async fn list(&self, dir: &str) -> Result<Vec<DirEntry>, DestinationError> {
            self.inner.list(dir).await
        }
        async fn open(
            &self,
            path: &str,
        ) -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError> {
            self.inner.open(path).await
        }
        async fn delete(&self, path: &str) -> Result<(), DestinationError> {
            if self.deletes.fetch_add(1, Ordering::SeqCst) + 1 >= self.from {
                return Err(DestinationError::Io {
                    op: "cannot delete",
                    location: path.to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "connection reset",
                    ),
                });
            }
            self.inner.delete(path).await
        }
        async fn remove_dir(&self, path: &str) -> Result<(), DestinationError> {
            self.inner.remove_dir(path).await
        }
    }

    #[tokio::test]
    async fn an_interrupted_prune_never_leaves_a_complete_looking_set() {
        let tmp = tempfile::tempdir().unwrap();
        crate::catalog::test_sets::write_set(tmp.path(), "2026-01-01_000000");
        crate::catalog::test_sets::write_set(tmp.path(), "2026-01-02_000000");
        let text = format!(
            "node_name: n\ncluster_name: c\netcd:\n  endpoints: [\"http://127.0.0.1:1\"]\nresources:\n  layout: none\ndestination:\n  local:\n    path: {}\nretention:\n  keep_last: 1\n",
            tmp.path().display()
        );
        let env = Environment {
            node_name: None,
            hostname: None,
        };
        let config = Config::parse(&text, &env).unwrap();
        // The manifest delete goes through, the snapshot's fails.
        let dest = DeletesFailFrom {
            inner: LocalDir::open(tmp.path()).await.unwrap(),
            from: 2,
            deletes: AtomicUsize::new(0),
        };
        let now: DateTime<Utc> = "2026-02-01T00:00:00Z".parse().unwrap();
        let report = prune(&dest, &config, "n", now, None, false).await.unwrap();
        assert_eq!(report.errors.len(), 1, "{report:?}");
        assert!(report.removed_sets.is_empty());
        let cat = catalog::scan(&dest.inner, "c", Some("n")).await.unwrap();
        let complete: Vec<String> = cat
            .sets
            .iter()
            .map(|s| s.id.timestamp.to_string())
            .collect();
        assert_eq!(
            complete,
            ["2026-01-02_000000"],
            "the half-deleted set must not look complete"
        );
        assert_eq!(cat.leftovers.len(), 1);
        assert!(cat.leftovers[0].why.contains("no manifest.json"));
        assert!(tmp
            .path()
            .join("c/n/2026-01-01_000000/snapshot_2026-01-01_000000.db")
            .exists());
    }
}
