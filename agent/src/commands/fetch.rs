//! `fetch`: a verified set downloaded into a directory, moved into place only when all of it matched.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::Config;
use crate::store::catalog::CatalogSet;
use crate::store::verify;

use super::{
    fail, find, identities, note_compression, note_encryption, note_rollout, open, print_reports,
    IdentityArgs, Progress,
};
use crate::commands::{EXIT_FAILURE, EXIT_USAGE};

/// What `fetch` was asked for, beyond the set.
#[derive(Debug, Clone, Default)]
pub struct FetchArgs {
    /// `--to DIR`.
    pub to: PathBuf,
    /// `--force`: write into a non-empty DIR.
    pub force: bool,
    /// `--snapshot-only`: the snapshot alone, whatever the set holds.
    pub snapshot_only: bool,
    /// `--clean`: with `latest`, the newest set not taken mid-rollout.
    pub clean: bool,
}

/// `fetch`. Everything is downloaded and checked in a temporary directory
/// first and moved into DIR only when all of it matched, so a failed fetch
/// leaves DIR as it was (and does not create it).
pub async fn fetch(
    config: &Config,
    node: &str,
    wanted: &str,
    args: &FetchArgs,
    id: &IdentityArgs,
) -> ExitCode {
    let to = args.to.as_path();
    if args.clean && wanted != "latest" {
        eprintln!("error: --clean picks the newest set not taken mid-rollout; give `latest` with it, not {wanted:?}");
        return ExitCode::from(EXIT_USAGE);
    }
    let ids = match identities(config, id) {
        Ok(i) => i,
        Err(code) => return code,
    };
    let to_exists = match target_exists(to, args.force) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let dest = match open(config).await {
        Ok(d) => d,
        Err(code) => return code,
    };
    let found = if args.clean {
        crate::store::catalog::find_latest_clean(dest.as_ref(), &config.cluster_name, node)
            .await
            .map_err(fail)
    } else {
        find(config, dest.as_ref(), node, wanted).await
    };
    let set = match found {
        Ok(s) => s,
        Err(code) => return code,
    };
    note_rollout(&set);
    if !args.snapshot_only {
        if let Err(why) = verify::restore_script_ready(&set) {
            return fail(why);
        }
    }
    let staging = match staging_dir(to, to_exists) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let what = if args.snapshot_only {
        "the snapshot of "
    } else {
        ""
    };
    println!(
        "fetching {what}{}/{} into {}",
        dest.describe(),
        set.id.dir(),
        to.display()
    );
    note_encryption(
        &set,
        ids.as_ref(),
        "the files are written as stored (.age), which cluster-restore.sh cannot use; pass --identity FILE to write them decrypted",
    );
    note_compression(&set, ids.as_ref());
    let only = args
        .snapshot_only
        .then_some(etcd_backup_proto::FileKind::Snapshot);
    let progress = Progress::new();
    let result = verify::fetch_set(
        dest.as_ref(),
        &set,
        staging.path(),
        ids.as_ref(),
        only,
        &|n, d, t| progress.update(n, d, t),
    )
    .await;
    progress.finish();
    let (reports, staged) = match result {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if !print_reports(&reports) {
        eprintln!(
            "error: set {} does not match its manifest; nothing was written to {}",
            set.id.dir(),
            to.display()
        );
        return ExitCode::from(EXIT_FAILURE);
    }
    let written = match move_into_place(staging, &staged, to, to_exists) {
        Ok(w) => w,
        Err(e) => return fail(e),
    };
    for p in &written {
        println!("wrote   {}", p.display());
    }
    let encrypted_as_stored = set.manifest.encryption.is_some() && ids.is_none();
    let compressed = set.manifest.compression.is_some();
    say_what_was_fetched(
        &set,
        to,
        args.snapshot_only,
        encrypted_as_stored,
        compressed,
    );
    ExitCode::SUCCESS
}

/// Moves the fetched files from `staging` into `to`: the whole directory is
/// renamed to `to` when `to` did not exist, else each file is renamed into it
/// (the snapshot last). On an error, what was moved is removed again.
fn move_into_place(
    staging: tempfile::TempDir,
    staged: &[PathBuf],
    to: &Path,
    to_exists: bool,
) -> Result<Vec<PathBuf>, String> {
    let finals: Vec<PathBuf> = staged
        .iter()
        .filter_map(|p| p.file_name().map(|n| to.join(n)))
        .collect();
    if !to_exists {
        let path = staging.keep();
        return match std::fs::rename(&path, to) {
            Ok(()) => Ok(finals),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&path);
                Err(format!(
                    "cannot move the fetched files to {}: {e}",
                    to.display()
                ))
            }
        };
    }
    // The manifest lists the snapshot first; it goes in last, so DIR never
    // holds a snapshot without the rest.
    let mut moved = Vec::new();
    for (from, dest) in staged.iter().zip(&finals).rev() {
        if let Err(e) = std::fs::rename(from, dest) {
            for m in &moved {
                let _ = std::fs::remove_file(m);
            }
            return Err(format!(
                "cannot move {} into {}: {e}",
                from.display(),
                to.display()
            ));
        }
        moved.push(dest.clone());
    }
    if let Ok(d) = std::fs::File::open(to) {
        let _ = d.sync_all();
    }
    drop(staging);
    Ok(finals)
}

/// Whether DIR exists (it must be empty unless `--force`).
fn target_exists(to: &Path, force: bool) -> Result<bool, ExitCode> {
    match std::fs::read_dir(to) {
        Ok(mut entries) => {
            if entries.next().is_some() && !force {
                eprintln!(
                    "error: {} is not empty; fetch into an empty directory, or pass --force to write into it",
                    to.display()
                );
                return Err(ExitCode::from(EXIT_USAGE));
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(fail(format!("cannot use {}: {e}", to.display()))),
    }
}

/// A temporary directory on DIR's filesystem to fetch into.
fn staging_dir(to: &Path, to_exists: bool) -> Result<tempfile::TempDir, ExitCode> {
    // The staging directory is on DIR's filesystem (inside DIR when it
    // exists, beside it when not), so moving the files in is a rename.
    let staging = if to_exists {
        tempfile::Builder::new()
            .prefix(".etcd-backup-fetch-")
            .tempdir_in(to)
    } else {
        let parent = to
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."));
        if let Err(e) = std::fs::create_dir_all(parent) {
            return Err(fail(format!("cannot create {}: {e}", parent.display())));
        }
        tempfile::Builder::new()
            .prefix(".etcd-backup-fetch-")
            .tempdir_in(parent)
    };
    staging.map_err(|e| {
        fail(format!(
            "cannot create a temporary directory for {}: {e}",
            to.display()
        ))
    })
}

/// What the fetched directory is good for: cluster-restore.sh, or not yet.
fn say_what_was_fetched(
    set: &CatalogSet,
    to: &Path,
    snapshot_only: bool,
    encrypted_as_stored: bool,
    compressed: bool,
) {
    // What turns a file fetched as stored into the plain one.
    let decode = match (encrypted_as_stored, compressed) {
        (true, true) => {
            ", after decrypting it with age -d -i KEYFILE and decompressing it with zstd -d"
        }
        (true, false) => ", after decrypting it with age -d -i KEYFILE",
        (false, _) => "",
    };
    if snapshot_only {
        println!(
            "snapshot of set {} fetched and verified; {} holds the snapshot only and is not a cluster-restore.sh directory: restore it with `etcd-backup-agent restore --snapshot FILE` (or etcdutl snapshot restore){}",
            set.id.dir(),
            to.display(),
            decode
        );
    } else if encrypted_as_stored {
        println!(
            "set {} fetched and its ciphertext verified; {} is not a cluster-restore.sh directory while the files are encrypted: decrypt each file with age -d -i KEYFILE{}, or fetch again with --identity FILE",
            set.id.dir(),
            to.display(),
            if compressed {
                " (then the snapshot with zstd -d)"
            } else {
                ""
            }
        );
    } else {
        println!(
            "set {} fetched and verified; {} is a cluster-restore.sh directory: cluster-restore.sh {}",
            set.id.dir(),
            to.display(),
            to.display()
        );
    }
}
