//! Applying the retention policy to a destination: which sets go (see
//! [`crate::policy::retention`]), and removing them so that an interrupted prune never
//! leaves a set that looks complete: `manifest.json` is deleted first.
//!
//! Only names this agent writes are deleted: a complete set's manifest and
//! the files it lists, and the `.partial` files of a set. Everything else the
//! catalog finds is left alone and reported (see [`crate::store::catalog`]).

use chrono::{DateTime, Utc};

use etcd_backup_proto::{SetTimestamp, MANIFEST_FILE_NAME};

use crate::config::Config;
use crate::policy::retention::{self, Decision, Reason};
use crate::store::catalog::{self, CatalogError, LeftoverKind, MANIFEST_BEING_REMOVED};
use crate::store::destination::{Destination, DestinationError};

/// What a prune decided and did.
#[derive(Debug, Clone, Default)]
pub struct PruneReport {
    /// Every set, newest first, kept or not, with reasons.
    pub decisions: Vec<Decision>,
    /// Set directories removed (or that would be, in a dry run).
    pub removed_sets: Vec<String>,
    /// Stale leftovers of this agent's own runs removed (or that would be).
    pub removed_leftovers: Vec<String>,
    /// Entries this agent does not remove, as `(path, why)`: newer-format
    /// sets, sets with files it did not write, and anything else it did not
    /// make.
    pub left_alone: Vec<(String, String)>,
    /// Removals that failed; the rest went on.
    pub errors: Vec<String>,
    /// What became of the node's packs (paged sets).
    pub packs: PackCollection,
}

/// Garbage collection of a node's packs, restic's way: a pack goes only
/// when no complete set names it, every manifest was read, and it is older
/// than `stale_partial_after` (a run in flight may be about to name it).
#[derive(Debug, Clone, Default)]
pub struct PackCollection {
    /// Packs removed (or that would be, in a dry run), as paths.
    pub removed: Vec<String>,
    /// Their bytes.
    pub removed_bytes: u64,
    /// Stale `.pack.partial` files of runs that did not finish, removed.
    pub removed_partials: Vec<String>,
    /// Packs a complete set names.
    pub referenced: usize,
    /// Packs no set names yet, kept as younger than `stale_partial_after`
    /// (or of unknown age).
    pub young: usize,
    /// Why nothing was collected at all, when so (an unreadable manifest).
    pub blocked: Option<String>,
    /// Entries of the packs directory this agent did not write: left alone.
    pub foreign: Vec<String>,
}

/// Decides and (unless `dry_run`) removes, for one node.
///
/// The plan is made from one scan and carried out once; every name deleted
/// is one the plan holds: a complete set's manifest and the files it lists,
/// and the `.partial` names this agent writes for a set.
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
    // Sets this agent must not remove still count as sets, so the rules (and
    // "the newest is never removed") see the real history.
    let newer: Vec<SetTimestamp> = cat.newer_format().filter_map(|l| l.timestamp).collect();
    let protected: Vec<SetTimestamp> = cat
        .sets
        .iter()
        .filter(|s| cat.holds_unrecognised(&s.id.dir()))
        .map(|s| s.id.timestamp)
        .chain(newer.iter().copied())
        .collect();
    let stamps: Vec<SetTimestamp> = cat
        .sets
        .iter()
        .map(|s| s.id.timestamp)
        .chain(newer.iter().copied())
        .collect();
    let mut decisions = retention::decide(&config.retention, &stamps, now);
    for d in decisions
        .iter_mut()
        .filter(|d| protected.contains(&d.timestamp))
    {
        d.keep = true;
        d.reasons.insert(0, Reason::NotUnderstood);
    }
    let mut report = PruneReport::default();
    let own_partials = |dir: &str| -> Vec<String> {
        cat.leftovers
            .iter()
            .filter(|l| l.dir == dir && l.kind == LeftoverKind::OwnPartial)
            .flat_map(|l| l.files.iter().cloned())
            .collect()
    };
    for d in decisions.iter().filter(|d| !d.keep) {
        let Some(set) = cat.sets.iter().find(|s| s.id.timestamp == d.timestamp) else {
            continue;
        };
        let dir = set.id.dir();
        if !dry_run {
            let data: Vec<String> = set
                .manifest
                .files
                .iter()
                .map(|f| f.stored_name().to_string())
                .collect();
            if let Err(e) = remove_set(dest, &dir, &data, &own_partials(&dir)).await {
                report.errors.push(format!("{dir}: {e}"));
                continue;
            }
        }
        report.removed_sets.push(dir);
    }
    let complete_dirs: Vec<String> = cat.sets.iter().map(|s| s.id.dir()).collect();
    let own: Vec<&catalog::Leftover> = cat
        .leftovers
        .iter()
        .filter(|l| l.kind == LeftoverKind::OwnPartial)
        .collect();
    let candidates: Vec<retention::Leftover> = own
        .iter()
        .map(|l| retention::Leftover {
            path: l.dir.clone(),
            modified: l.modified,
            set_timestamp: l.timestamp,
        })
        .collect();
    for stale in
        retention::stale_leftovers(&config.retention, &candidates, in_progress.as_ref(), now)
    {
        let Some(found) = own.iter().find(|l| l.dir == stale.path) else {
            continue;
        };
        // A set removed above took its partials with it.
        if report.removed_sets.contains(&found.dir) {
            continue;
        }
        if !dry_run {
            let keep_dir = complete_dirs.contains(&found.dir);
            if let Err(e) = remove_files(dest, &found.dir, &found.files, !keep_dir).await {
                report.errors.push(format!("{}: {e}", found.dir));
                continue;
            }
        }
        report.removed_leftovers.push(found.dir.clone());
    }
    report.left_alone = cat
        .leftovers
        .iter()
        .filter(|l| l.needs_attention())
        .map(|l| (l.dir.clone(), l.why.clone()))
        .collect();
    report.decisions = decisions;
    let removed = report.removed_sets.clone();
    report.packs = collect_packs(
        dest,
        config,
        node,
        now,
        in_progress,
        dry_run,
        &removed,
        &mut report.errors,
    )
    .await?;
    for f in &report.packs.foreign {
        report.left_alone.push((
            f.clone(),
            "not a pack this agent writes (64 hex digits and .pack, or a run's .pack.partial): never removed".into(),
        ));
    }
    Ok(report)
}

/// Collects the node's packs that no complete set names (see
/// [`PackCollection`]). The packs are listed first, then every manifest is
/// read again (after the removals above; in a dry run, without the sets
/// that would go): a pack named by any set then complete is kept.
#[allow(clippy::too_many_arguments)]
async fn collect_packs(
    dest: &dyn Destination,
    config: &Config,
    node: &str,
    now: DateTime<Utc>,
    in_progress: Option<SetTimestamp>,
    dry_run: bool,
    removed_sets: &[String],
    errors: &mut Vec<String>,
) -> Result<PackCollection, CatalogError> {
    let mut out = PackCollection::default();
    let dir = crate::store::paged::packs_dir(&config.cluster_name, node);
    let listing = dest.list(&dir).await?;
    if listing.is_empty() {
        return Ok(out);
    }
    let cat = catalog::scan(dest, &config.cluster_name, Some(node)).await?;
    let mut referenced = std::collections::HashSet::new();
    for set in cat
        .sets
        .iter()
        .filter(|s| !(dry_run && removed_sets.contains(&s.id.dir())))
    {
        for f in &set.manifest.files {
            if let Some(p) = &f.pages {
                referenced.extend(p.packs.iter().map(|p| p.name.clone()));
            }
        }
    }
    // A set being removed (its manifest renamed away) names nothing any
    // more; one whose manifest cannot be read might name anything.
    if let Some((set, why)) = cat.unreadable_manifests.first() {
        out.blocked = Some(format!(
            "{} set(s) have a manifest this agent cannot read ({set}: {why}), and any of them may need any pack; no pack was collected: repair or remove the set (or upgrade the agent), then prune again",
            cat.unreadable_manifests.len()
        ));
    }
    let stale = config.retention.stale_partial_after;
    let old_enough = |e: &crate::store::destination::DirEntry| {
        e.modified.is_some_and(|m| {
            now.signed_duration_since(DateTime::<Utc>::from(m))
                .to_std()
                .is_ok_and(|age| age > stale)
        })
    };
    for e in &listing {
        let path = format!("{dir}/{}", e.name);
        if !e.is_file {
            out.foreign.push(path);
            continue;
        }
        if etcd_backup_proto::is_pack_partial_name(&e.name) {
            let of_run_in_progress =
                in_progress.is_some_and(|ts| e.name.starts_with(&format!("{ts}_")));
            if old_enough(e) && !of_run_in_progress && out.blocked.is_none() {
                if !dry_run {
                    if let Err(err) = dest.delete(&path).await {
                        errors.push(format!("{path}: {err}"));
                        continue;
                    }
                }
                out.removed_partials.push(path);
            } else {
                out.young += 1;
            }
            continue;
        }
        if !etcd_backup_proto::is_pack_name(&e.name) {
            out.foreign.push(path);
            continue;
        }
        if referenced.contains(&e.name) {
            out.referenced += 1;
            continue;
        }
        if !old_enough(e) {
            out.young += 1;
            continue;
        }
        if out.blocked.is_some() {
            continue;
        }
        if !dry_run {
            if let Err(err) = dest.delete(&path).await {
                errors.push(format!("{path}: {err}"));
                continue;
            }
        }
        out.removed_bytes += e.size;
        out.removed.push(path);
    }
    Ok(out)
}

/// Deletes a complete set. The manifest is first renamed to
/// `manifest.json.partial`, so from that moment on the set is a leftover,
/// never a complete set with missing files, and one the catalog can prove is
/// this agent's (that file lists what is left); then the files the manifest
/// lists and this agent's partials of the set go, the manifest last, then
/// the directory.
async fn remove_set(
    dest: &dyn Destination,
    dir: &str,
    data: &[String],
    partials: &[String],
) -> Result<(), DestinationError> {
    let being_removed = format!("{dir}/{MANIFEST_BEING_REMOVED}");
    if partials.iter().any(|p| p == MANIFEST_BEING_REMOVED) {
        // A stale one is in the way of the rename; it is ours (a partial name).
        dest.delete(&being_removed).await?;
    }
    dest.rename(&format!("{dir}/{MANIFEST_FILE_NAME}"), &being_removed)
        .await?;
    let files: Vec<String> = data
        .iter()
        .chain(partials.iter().filter(|p| *p != MANIFEST_BEING_REMOVED))
        .cloned()
        .chain([MANIFEST_BEING_REMOVED.to_string()])
        .collect();
    remove_files(dest, dir, &files, true).await
}

/// Deletes exactly `names` in `dir`, then the directory when `and_dir` (which
/// fails, leaving it, should it hold anything else by now).
async fn remove_files(
    dest: &dyn Destination,
    dir: &str,
    names: &[String],
    and_dir: bool,
) -> Result<(), DestinationError> {
    for name in names {
        dest.delete(&format!("{dir}/{name}")).await?;
    }
    if and_dir {
        dest.remove_dir(dir).await?;
    }
    Ok(())
}

/// Applies retention at one destination after a run that stored a complete
/// set there (the daemon or `backup`; each destination that succeeded is
/// pruned on its own, over the run's own connection), logging what went;
/// the caller counts a failure.
///
/// # Errors
/// The destination or its catalog could not be read, or some removals failed
/// (summarised).
pub async fn after_backup(
    config: &Config,
    dest: &dyn crate::store::destination::Destination,
) -> Result<PruneReport, String> {
    let report = prune(dest, config, &config.node_name, Utc::now(), None, false)
        .await
        .map_err(|e| e.to_string())?;
    let (kept, _) = retention::counts(&report.decisions);
    if !report.left_alone.is_empty() {
        tracing::warn!(
            entries = report.left_alone.len(),
            first = %report.left_alone[0].0,
            why = %report.left_alone[0].1,
            "the destination holds entries this agent did not write or does not understand; they are never removed: see `list --include-partial` and the runbook's EtcdBackupUnrecognisedEntries"
        );
    }
    if !report.removed_sets.is_empty()
        || !report.removed_leftovers.is_empty()
        || !report.packs.removed.is_empty()
    {
        tracing::info!(
            kept,
            removed = report.removed_sets.len(),
            removed_leftovers = report.removed_leftovers.len(),
            removed_packs = report.packs.removed.len(),
            removed_pack_bytes = report.packs.removed_bytes,
            "retention applied"
        );
    }
    if let Some(why) = &report.packs.blocked {
        return Err(why.clone());
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
    use crate::store::destination::faulty::{Faults, Faulty};
    use crate::store::destination::LocalDir;

    #[tokio::test]
    async fn an_interrupted_prune_never_leaves_a_complete_looking_set() {
        let tmp = tempfile::tempdir().unwrap();
        crate::store::catalog::test_sets::write_set(tmp.path(), "2026-01-01_000000");
        crate::store::catalog::test_sets::write_set(tmp.path(), "2026-01-02_000000");
        let text = format!(
            "node_name: n\ncluster_name: c\netcd:\n  endpoints: [\"http://127.0.0.1:1\"]\nresources:\n  layout: none\ndestination:\n  local:\n    path: {}\nretention:\n  keep_last: 1\n",
            tmp.path().display()
        );
        let env = Environment {
            node_name: None,
            hostname: None,
        };
        let config = Config::parse(&text, &env).unwrap();
        // The manifest's rename goes through, the snapshot's delete fails.
        let dest = Faulty::new(
            LocalDir::open(tmp.path()).await.unwrap(),
            Faults {
                deletes_fail_from: 1,
                ..Faults::default()
            },
        );
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
        assert!(cat.leftovers[0].why.contains("was removing"), "{cat:?}");
        assert_eq!(cat.leftovers[0].kind, LeftoverKind::OwnPartial);
        let half = tmp.path().join("c/n/2026-01-01_000000");
        assert!(half.join("snapshot_2026-01-01_000000.db").exists());

        // What is left is provably this agent's, so the next prune, once it
        // is stale, finishes the job.
        let later = Utc::now() + chrono::Duration::hours(2);
        let report = prune(&dest.inner, &config, "n", later, None, false)
            .await
            .unwrap();
        assert_eq!(report.removed_leftovers, ["c/n/2026-01-01_000000"]);
        assert!(report.errors.is_empty(), "{report:?}");
        assert!(!half.exists());
    }
}
