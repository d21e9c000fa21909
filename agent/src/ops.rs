//! The operator commands on stored sets: `list`, `verify`, `fetch`. Each
//! prints for people (or JSON) and returns the process exit code.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;

use etcd_backup_proto::api::{LeftoverKind, SetList};

use crate::catalog::{self, CatalogSet};
use crate::commands::{Output, EXIT_FAILURE, EXIT_USAGE};
use crate::config::Config;
use crate::destination::{self, Destination};
use crate::encryption::{load_identities, Identities};
use crate::verify::{self, FileReport};

/// Sizes for people: 1.1 GiB, 4.2 KiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_FAILURE)
}

async fn open(config: &Config) -> Result<Box<dyn Destination>, ExitCode> {
    destination::open(&config.destination)
        .await
        .map_err(|e| fail(format!("cannot open the destination: {e}")))
}

/// `list`.
pub async fn list(
    config: &Config,
    node: Option<&str>,
    include_partial: bool,
    output: Output,
) -> ExitCode {
    let dest = match open(config).await {
        Ok(d) => d,
        Err(code) => return code,
    };
    let cat = match catalog::scan(dest.as_ref(), &config.cluster_name, node).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let list = SetList {
        sets: cat.sets.iter().rev().map(CatalogSet::summary).collect(),
        leftovers: if include_partial {
            cat.leftovers
                .iter()
                .rev()
                .map(catalog::Leftover::summary)
                .collect()
        } else {
            Vec::new()
        },
    };
    match output {
        Output::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&list).expect("a list always serializes")
            );
        }
        Output::Table => {
            println!(
                "{:<19}  {:<20}  {:>10}  {:>10}  {:>10}  {:>8}  {:<9}  {:<9}  {:<7}  SET",
                "TIME (UTC)",
                "NODE",
                "SNAPSHOT",
                "RESOURCES",
                "REVISION",
                "KEYS",
                "ENCRYPTED",
                "LAYOUT",
                "DURABLE"
            );
            for s in &list.sets {
                println!(
                    "{:<19}  {:<20}  {:>10}  {:>10}  {:>10}  {:>8}  {:<9}  {:<9}  {:<7}  {}",
                    s.timestamp.as_datetime().format("%Y-%m-%d %H:%M:%S"),
                    s.node,
                    human_bytes(s.snapshot_bytes),
                    s.resources_bytes.map_or("-".to_string(), human_bytes),
                    s.revision,
                    s.total_key.map_or("-".to_string(), |k| k.to_string()),
                    if s.encrypted { "age" } else { "no" },
                    if s.layout.is_empty() { "-" } else { &s.layout },
                    if s.durable { "yes" } else { "no" },
                    s.set
                );
            }
            if list.sets.is_empty() {
                eprintln!(
                    "no complete sets for {} in {}",
                    node.map_or("any node".to_string(), |n| format!("node {n}")),
                    dest.describe()
                );
            }
            for l in &list.leftovers {
                let what = match l.kind {
                    LeftoverKind::OwnPartial => "partial",
                    LeftoverKind::NewerFormat => "newer",
                    LeftoverKind::Unrecognised => "unknown",
                };
                println!(
                    "{what:<8} {}  ({}; {} file(s))",
                    l.dir,
                    l.why,
                    l.files.len()
                );
            }
            let attention = cat.leftovers.iter().filter(|l| l.needs_attention()).count();
            if attention > 0 && !include_partial {
                eprintln!(
                    "{attention} entr{} this agent did not write or does not understand (never removed); see `list --include-partial`",
                    if attention == 1 { "y" } else { "ies" }
                );
            }
        }
    }
    ExitCode::SUCCESS
}

/// Progress for people: a bar on a terminal, a line per file otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    current: Mutex<String>,
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:40} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            current: Mutex::new(String::new()),
        }
    }

    fn update(&self, name: &str, done: u64, total: u64) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if *current != name {
            *current = name.to_string();
            match &self.bar {
                Some(bar) => {
                    bar.reset();
                    bar.set_length(total);
                    bar.set_message(name.to_string());
                }
                None => eprintln!("reading {name} ({})", human_bytes(total)),
            }
        }
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Where the private key to decrypt sets with comes from: `--identity`
/// (and `--identity-passphrase-file`), else `encryption.identity_file`.
#[derive(Debug, Clone, Default)]
pub struct IdentityArgs {
    /// `--identity FILE`.
    pub identity: Option<PathBuf>,
    /// `--identity-passphrase-file FILE`.
    pub passphrase_file: Option<PathBuf>,
}

/// Loads the identities to decrypt with, if any were given or configured.
fn identities(config: &Config, args: &IdentityArgs) -> Result<Option<Identities>, ExitCode> {
    let result = match &args.identity {
        Some(path) => load_identities(path, args.passphrase_file.as_deref()).map(Some),
        None => crate::restore::config_identities(config),
    };
    result.map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_USAGE)
    })
}

/// Says what a set's encryption means for the command at hand.
fn note_encryption(set: &CatalogSet, ids: Option<&Identities>, without: &str) {
    match (&set.manifest.encryption, ids) {
        (Some(enc), None) => println!(
            "set {} is encrypted ({}) to: {}; {without}",
            set.id.dir(),
            enc.scheme,
            enc.recipients.join(", ")
        ),
        (Some(_), Some(ids)) => println!(
            "set {} is encrypted; decrypting with {}",
            set.id.dir(),
            ids.path.display()
        ),
        (None, Some(_)) => println!(
            "set {} is not encrypted; the identity is not needed",
            set.id.dir()
        ),
        (None, None) => {}
    }
}

fn print_reports(reports: &[FileReport]) -> bool {
    let mut all_ok = true;
    for r in reports {
        if r.ok() {
            let how = if r.decrypted {
                ", decrypted and checked"
            } else {
                ""
            };
            println!("ok      {}  ({}{how})", r.name, human_bytes(r.size));
        } else {
            all_ok = false;
            for p in &r.problems {
                println!("BAD     {}: {p}", r.name);
            }
        }
    }
    all_ok
}

async fn find(
    config: &Config,
    dest: &dyn Destination,
    node: &str,
    wanted: &str,
) -> Result<CatalogSet, ExitCode> {
    catalog::find(dest, &config.cluster_name, node, wanted)
        .await
        .map_err(|e| match e {
            catalog::CatalogError::BadSetName { .. } => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_USAGE)
            }
            other => fail(other),
        })
}

/// `verify`.
pub async fn verify(config: &Config, node: &str, wanted: &str, id: &IdentityArgs) -> ExitCode {
    let ids = match identities(config, id) {
        Ok(i) => i,
        Err(code) => return code,
    };
    let dest = match open(config).await {
        Ok(d) => d,
        Err(code) => return code,
    };
    let set = match find(config, dest.as_ref(), node, wanted).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    println!("verifying {}/{}", dest.describe(), set.id.dir());
    note_encryption(
        &set,
        ids.as_ref(),
        "checking the stored ciphertext only (pass --identity FILE to also decrypt and check the plaintext)",
    );
    let progress = Progress::new();
    let result = verify::verify_set(dest.as_ref(), &set, ids.as_ref(), &|n, d, t| {
        progress.update(n, d, t)
    })
    .await;
    progress.finish();
    match result {
        Ok(reports) => {
            if print_reports(&reports) {
                println!("set {} is intact", set.id.dir());
                ExitCode::SUCCESS
            } else {
                eprintln!("error: set {} does not match its manifest", set.id.dir());
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(e) => fail(e),
    }
}

/// What `fetch` was asked for, beyond the set.
#[derive(Debug, Clone, Default)]
pub struct FetchArgs {
    /// `--to DIR`.
    pub to: PathBuf,
    /// `--force`: write into a non-empty DIR.
    pub force: bool,
    /// `--snapshot-only`: the snapshot alone, whatever the set holds.
    pub snapshot_only: bool,
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
    let ids = match identities(config, id) {
        Ok(i) => i,
        Err(code) => return code,
    };
    let to_exists = match std::fs::read_dir(to) {
        Ok(mut entries) => {
            if entries.next().is_some() && !args.force {
                eprintln!(
                    "error: {} is not empty; fetch into an empty directory, or pass --force to write into it",
                    to.display()
                );
                return ExitCode::from(EXIT_USAGE);
            }
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return fail(format!("cannot use {}: {e}", to.display())),
    };
    let dest = match open(config).await {
        Ok(d) => d,
        Err(code) => return code,
    };
    let set = match find(config, dest.as_ref(), node, wanted).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    if !args.snapshot_only {
        if let Err(why) = verify::restore_script_ready(&set) {
            return fail(why);
        }
    }
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
            return fail(format!("cannot create {}: {e}", parent.display()));
        }
        tempfile::Builder::new()
            .prefix(".etcd-backup-fetch-")
            .tempdir_in(parent)
    };
    let staging = match staging {
        Ok(t) => t,
        Err(e) => {
            return fail(format!(
                "cannot create a temporary directory for {}: {e}",
                to.display()
            ))
        }
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
    if args.snapshot_only {
        println!(
            "snapshot of set {} fetched and verified; {} holds the snapshot only and is not a cluster-restore.sh directory: restore it with `etcd-backup-agent restore --snapshot FILE` (or etcdutl snapshot restore){}",
            set.id.dir(),
            to.display(),
            if encrypted_as_stored {
                ", after decrypting it with age -d -i KEYFILE"
            } else {
                ""
            }
        );
    } else if encrypted_as_stored {
        println!(
            "set {} fetched and its ciphertext verified; {} is not a cluster-restore.sh directory while the files are encrypted: decrypt each file with age -d -i KEYFILE, or fetch again with --identity FILE",
            set.id.dir(),
            to.display()
        );
    } else {
        println!(
            "set {} fetched and verified; {} is a cluster-restore.sh directory: cluster-restore.sh {}",
            set.id.dir(),
            to.display(),
            to.display()
        );
    }
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

/// `prune`.
pub async fn prune(config: &Config, node: &str, dry_run: bool) -> ExitCode {
    let dest = match open(config).await {
        Ok(d) => d,
        Err(code) => return code,
    };
    if !config.retention.is_enabled() {
        println!("retention: no keep_* rule and no max_age configured; complete sets are all kept");
    }
    let report = match crate::prune::prune(
        dest.as_ref(),
        config,
        node,
        chrono::Utc::now(),
        None,
        dry_run,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let verb = if dry_run { "would remove" } else { "removed" };
    for d in &report.decisions {
        let reasons: Vec<String> = d.reasons.iter().map(ToString::to_string).collect();
        let what = if d.keep {
            "keep".to_string()
        } else {
            verb.to_string()
        };
        println!(
            "{what:<12} {}/{node}/{}  ({})",
            config.cluster_name,
            d.timestamp,
            reasons.join(", ")
        );
    }
    for l in &report.removed_leftovers {
        println!(
            "{verb:<12} {l}  (leftover older than stale_partial_after {})",
            crate::retention::format_duration(config.retention.stale_partial_after)
        );
    }
    for (dir, why) in &report.left_alone {
        println!("{:<12} {dir}  ({why})", "leave alone");
    }
    let (kept, removed) = crate::retention::counts(&report.decisions);
    println!(
        "{kept} set(s) kept, {removed} {}, {} leftover(s) {}",
        if dry_run {
            "would be removed"
        } else {
            "removed"
        },
        report.removed_leftovers.len(),
        if dry_run {
            "would be removed"
        } else {
            "removed"
        }
    );
    if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        for e in &report.errors {
            eprintln!("error: {e}");
        }
        ExitCode::from(EXIT_FAILURE)
    }
}

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
    id: &IdentityArgs,
) -> ExitCode {
    if let Err(e) = crate::restore::check_data_dir(&target.data_dir) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let ids = match identities(config, id) {
        Ok(i) => i,
        Err(code) => return code,
    };
    let (_tmp, snapshot) = match source {
        SnapshotSourceArg::File(f) => {
            if let Err(e) = crate::restore::check_snapshot_file(&f) {
                return fail(e);
            }
            (None, f)
        }
        SnapshotSourceArg::Set(wanted) => {
            match fetch_snapshot(config, node, &wanted, &target.data_dir, ids.as_ref()).await {
                Ok((tmp, snap, _)) => (Some(tmp), snap),
                Err(code) => return code,
            }
        }
    };
    match crate::restore::run_restore(&snapshot, target, false).await {
        Ok(()) => {
            println!(
                "restored into {}; start etcd with --name {} --data-dir {} and the same --initial-cluster",
                target.data_dir.display(),
                target.name,
                target.data_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// `drill`.
pub async fn drill(config: &Config, node: &str, wanted: &str, id: &IdentityArgs) -> ExitCode {
    let ids = match identities(config, id) {
        Ok(i) => i,
        Err(code) => return code,
    };
    match crate::restore::run_drill(config, node, wanted, ids.as_ref()).await {
        Ok(d) => {
            println!(
                "restored {} into a throwaway member: revision {}, {} keys",
                d.set, d.revision, d.keys
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
