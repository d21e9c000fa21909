//! `restore` and `drill`: a verified snapshot handed to the platform's restore tool, or restored into a throwaway member.

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;
use crate::encryption::Identities;
use crate::restore::{Bump, RestoreError, RestoreTool};
use crate::store::catalog::CatalogSet;
use crate::store::verify;

use super::{
    fail, find, identities, note_compression, note_encryption, note_rollout, open, print_reports,
    IdentityArgs, Progress,
};
use crate::commands::EXIT_USAGE;

/// Where `restore` takes its snapshot from.
#[derive(Debug, Clone)]
pub enum SnapshotSourceArg {
    /// A stored set, fetched and verified first.
    Set(String),
    /// A local file, its digest checked first.
    File(std::path::PathBuf),
}

/// Fetches and verifies `wanted` into a new temporary directory beside
/// `near`, returning the directory (removed on drop) and the snapshot's path.
async fn fetch_snapshot(
    config: &Config,
    node: &str,
    wanted: &str,
    near: &Path,
    ids: Option<&Identities>,
) -> Result<(tempfile::TempDir, std::path::PathBuf, CatalogSet), ExitCode> {
    let dest = open(config).await?;
    let set = find(config, dest.as_ref(), node, wanted).await?;
    note_rollout(&set);
    if let Some(why) = verify::missing_identity(&set, ids) {
        eprintln!("error: {why}");
        return Err(ExitCode::from(EXIT_USAGE));
    }
    let parent = near
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    // The fetched files sit beside the data dir (same filesystem, same care);
    // a missing parent is created, as the restore tool would.
    if let Err(e) = std::fs::create_dir_all(parent) {
        return Err(fail(format!("cannot create {}: {e}", parent.display())));
    }
    let tmp = tempfile::Builder::new()
        .prefix(".etcd-backup-fetch-")
        .tempdir_in(parent)
        .map_err(|e| {
            fail(format!(
                "cannot create a temporary directory in {}: {e}",
                parent.display()
            ))
        })?;
    println!("fetching {}/{}", dest.describe(), set.id.dir());
    let progress = Progress::new();
    note_encryption(&set, ids, "");
    note_compression(&set, ids);
    let result = verify::fetch_set(dest.as_ref(), &set, tmp.path(), ids, None, &|n, d, t| {
        progress.update(n, d, t)
    })
    .await;
    progress.finish();
    let (reports, _) = result.map_err(fail)?;
    if !print_reports(&reports) {
        return Err(fail(format!(
            "set {} does not match its manifest; not restoring it",
            set.id.dir()
        )));
    }
    let snap = set
        .manifest
        .file(etcd_backup_proto::FileKind::Snapshot)
        .ok_or_else(|| fail(format!("set {} has no snapshot", set.id.dir())))?;
    let snap = verify::local_path(tmp.path(), &set, snap, ids.is_some()).map_err(fail)?;
    Ok((tmp, snap, set))
}

/// `restore`.
pub async fn restore(
    config: &Config,
    node: &str,
    source: SnapshotSourceArg,
    target: &crate::restore::RestoreTarget,
    bump: Bump,
    id: &IdentityArgs,
) -> ExitCode {
    if let Err(e) = crate::restore::check_data_dir(&target.data_dir) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    // Before anything is fetched or created: a tool that cannot bump is a
    // usage error (install a newer one, or say --no-bump-revision).
    let tool = match RestoreTool::for_bump(bump).await {
        Ok(t) => t,
        Err(e @ (RestoreError::ToolTooOld { .. } | RestoreError::UnknownToolVersion { .. })) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => return fail(e),
    };
    let ids = match identities(config, id) {
        Ok(i) => i,
        Err(code) => return code,
    };
    let (_tmp, snapshot, status) = match source {
        SnapshotSourceArg::File(f) => {
            if let Err(e) = crate::restore::check_snapshot_file(&f) {
                return fail(e);
            }
            (None, f, None)
        }
        SnapshotSourceArg::Set(wanted) => {
            match fetch_snapshot(config, node, &wanted, &target.data_dir, ids.as_ref()).await {
                Ok((tmp, snap, set)) => (Some(tmp), snap, set.manifest.snapshot_status),
                Err(code) => return code,
            }
        }
    };
    // The snapshot's revision: the manifest's, or read from the file.
    let snapshot_revision = match status {
        Some(st) => st.revision,
        None => match etcd_backup_bbolt_status::status_of_file(&snapshot) {
            Ok(st) => st.revision,
            Err(e) => return fail(format!("cannot read {}: {e}", snapshot.display())),
        },
    };
    if let Err(e) = crate::restore::run_restore(&snapshot, target, tool, bump, false).await {
        return fail(e);
    }
    let start = bump.start_revision(snapshot_revision);
    let how = match bump {
        Bump::By(n) => {
            format!("the snapshot's {snapshot_revision} + {n}, everything below marked compacted")
        }
        Bump::Off => "the snapshot's own, not bumped (--no-bump-revision)".to_string(),
    };
    tracing::info!(
        data_dir = %target.data_dir.display(),
        tool = %tool.describe(),
        snapshot_revision,
        start_revision = start,
        "restored"
    );
    println!(
        "restored into {} with {}; the member starts at revision {start} ({how})",
        target.data_dir.display(),
        tool.describe()
    );
    println!(
        "start etcd with --name {} --data-dir {} and the same --initial-cluster",
        target.name,
        target.data_dir.display()
    );
    ExitCode::SUCCESS
}

/// `drill`.
pub async fn drill(config: &Config, node: &str, wanted: &str, id: &IdentityArgs) -> ExitCode {
    let ids = match identities(config, id) {
        Ok(i) => i,
        Err(code) => return code,
    };
    match crate::restore::run_drill(config, node, wanted, ids.as_ref()).await {
        Ok(d) => {
            let bumped = match d.bump {
                Bump::By(n) => format!("bumped by {n}, below it compacted"),
                Bump::Off => format!(
                    "not bumped: {} cannot ({} can), as restore would refuse without --no-bump-revision",
                    d.tool,
                    crate::restore::BUMP_NEEDS
                ),
            };
            println!(
                "restored {} with {} into a throwaway member: revision {} ({bumped}), {} keys",
                d.set, d.tool, d.revision, d.keys
            );
            if d.problems.is_empty() {
                println!("drill passed: the set restores and serves its data");
                ExitCode::SUCCESS
            } else {
                for p in &d.problems {
                    eprintln!("drill: {p}");
                }
                fail(format!("drill failed for {}", d.set))
            }
        }
        Err(e) => fail(e),
    }
}
