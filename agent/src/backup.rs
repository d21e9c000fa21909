//! One backup run: the set protocol that makes a backup either complete and
//! verified, or absent.
//!
//! 1. Plan the static-pod resources (fails fast on a missing manifest).
//! 2. Ask the local etcd member who it is.
//! 3. Stream the snapshot into `snapshot_<ts>.db.partial`, checking etcd's digest.
//! 4. Stream the resources tarball into `static_kuberesources_<ts>.tar.gz.partial`.
//! 5. Rename both to their final names, then sync the set directory, so
//!    the renames are durable before anything names the files.
//! 6. Write `manifest.json` last (itself through a partial name and a rename):
//!    its presence is what makes the set complete. Sync the set directory
//!    again before reporting success. A destination that cannot sync a
//!    directory gets a manifest that says so (`"durability": "files_synced"`).
//!
//! A run that fails at any step removes everything it wrote, so the
//! destination never holds a set that looks complete but is not.

use std::fmt;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use etcd_backup_proto::{
    Compression, DurabilityLevel, FileKind, Manifest, ManifestCompression, ManifestEncryption,
    ManifestEtcd, ManifestFile, PlaintextFile, SetId, SetTimestamp, MANIFEST_FILE_NAME,
    MANIFEST_FORMAT_COMPRESSED, MANIFEST_FORMAT_ENCRYPTED, MANIFEST_FORMAT_PAGED,
    MANIFEST_FORMAT_PLAIN, ZST_SUFFIX,
};

use crate::config::Config;
use crate::encryption::AGE_SUFFIX;
use crate::source::etcd::{
    EtcdError, EtcdMember, MemberInfo, SnapshotSource, SnapshotVerifier, VerifyError,
};
use crate::source::resources::{self, ResourcesError};
use crate::store::compressing::{CompressError, Compressing};
use crate::store::destination::{
    rename_outcome, Destination, DestinationError, DirSync, Durability, Upload,
};
use crate::store::fanout::{Lost, Tee};
use crate::store::paged::writer::{PagedOutcome, PagedWriter, Previous};
use crate::store::paged::{Coding, PageCutter, PageIdScheme, PagedError};
use crate::store::sealing::SealingUpload;

/// Snapshot bytes gathered before each destination write: one SFTP write
/// request's worth (255 KiB) and then some. Larger batches saved nothing
/// measurable and cost memory in every stage that holds one (compression,
/// encryption, each destination's queue): 1 MiB batches took a backup with
/// zstd, age and 8 SFTP streams from 28 to 31.5 MiB of peak RSS.
const WRITE_BATCH: usize = 256 << 10;

/// etcd's snapshot messages (32 KiB each) a paged run reads ahead.
const PREFETCH_CHUNKS: usize = 64;

/// The agent's version, recorded in every manifest.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The step of a run, used to say where a run failed and to label metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Connecting to etcd and asking for its status.
    Connect,
    /// Streaming the snapshot.
    Snapshot,
    /// Checking the snapshot's digest.
    Verify,
    /// Bundling the static-pod resources.
    Resources,
    /// Storing data files at the destination.
    Upload,
    /// Writing the manifest.
    Manifest,
}

impl Stage {
    /// The name used in logs, records and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Snapshot => "snapshot",
            Stage::Verify => "verify",
            Stage::Resources => "resources",
            Stage::Upload => "upload",
            Stage::Manifest => "manifest",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong, by the system it came from.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// etcd could not be reached or its stream failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The snapshot's digest did not check out.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The static-pod resources could not be bundled.
    #[error(transparent)]
    Resources(#[from] ResourcesError),
    /// The destination failed.
    #[error(transparent)]
    Destination(#[from] DestinationError),
    /// zstd could not compress the snapshot.
    #[error(transparent)]
    Compress(#[from] CompressError),
    /// A paged snapshot could not be cut or stored.
    #[error(transparent)]
    Paged(#[from] PagedError),
    /// The run was cancelled (shutdown, or Ctrl-C) before it finished.
    #[error("cancelled before the set was complete; the files this run wrote were removed")]
    Cancelled,
    /// A set with this run's name exists already.
    #[error(
        "backup set {location} already exists; another run started in the same second, try again"
    )]
    SetExists {
        /// The set's location.
        location: String,
    },
    /// An operation got no definite answer (a timeout, a dropped
    /// connection, a server error): it may have been carried out. The run
    /// looked at the destination; `found` says what it saw, and what was
    /// done about it.
    #[error("{error}; the operation may have been carried out all the same: {found}")]
    Unanswered {
        /// The ambiguous error.
        error: DestinationError,
        /// What a look at the destination showed, and what the run did.
        found: String,
    },
}

/// A failed run: the stage, and why.
#[derive(Debug, thiserror::Error)]
#[error("backup failed at stage {stage}: {cause}{}{}", not_removed_note(.not_removed), destinations_note(.destinations))]
pub struct BackupError {
    /// Where it failed.
    pub stage: Stage,
    /// Why (boxed: errors travel in `Result`s and should stay small).
    #[source]
    pub cause: Box<Cause>,
    /// Files of the run its clean-up could not remove (they are `.partial`
    /// names or files of an incomplete set, which later clean-up handles).
    pub not_removed: Vec<String>,
    /// How each destination ended (all failed), in configuration order;
    /// empty when the run failed before it knew its destinations.
    pub destinations: Vec<DestinationOutcome>,
}

/// With several destinations, what happened at each.
fn destinations_note(destinations: &[DestinationOutcome]) -> String {
    if destinations.len() < 2 {
        return String::new();
    }
    let each: Vec<String> = destinations.iter().map(ToString::to_string).collect();
    format!("; destinations: {}", each.join("; "))
}

/// How one destination's copy of a run's set ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationOutcome {
    /// The configured name (`default` for `destination:`).
    pub name: String,
    /// Where it is, for people (no secrets).
    pub location: String,
    /// Whether its copy is complete.
    pub result: DestinationResult,
}

/// Whether a destination's copy is complete, or why it is absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestinationResult {
    /// The copy is complete: its manifest is written.
    Succeeded {
        /// Whether the destination synced the files (the manifest's `durable`).
        durable: bool,
    },
    /// The copy is absent (what was written is removed, or left as
    /// `.partial` names for prune when the destination could not be reached).
    Failed {
        /// Where it failed.
        stage: Stage,
        /// Why, for people.
        error: String,
    },
}

impl DestinationOutcome {
    /// Whether this destination's copy is complete.
    pub fn succeeded(&self) -> bool {
        matches!(self.result, DestinationResult::Succeeded { .. })
    }
}

impl fmt::Display for DestinationOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.result {
            DestinationResult::Succeeded { .. } => {
                write!(f, "{} ({}) succeeded", self.name, self.location)
            }
            DestinationResult::Failed { stage, error } => write!(
                f,
                "{} ({}) failed at stage {stage}: {error}",
                self.name, self.location
            ),
        }
    }
}

fn not_removed_note(paths: &[String]) -> String {
    if paths.is_empty() {
        String::new()
    } else {
        format!(
            "; these files of the run could not be removed and are left for the next clean-up: {}",
            paths.join(", ")
        )
    }
}

impl BackupError {
    fn new(stage: Stage, cause: impl Into<Cause>) -> Self {
        Self {
            stage,
            cause: Box::new(cause.into()),
            not_removed: Vec::new(),
            destinations: Vec::new(),
        }
    }

    /// Whether a fresh attempt may succeed (a connection or I/O hiccup), as
    /// opposed to a problem a person must fix or a corrupt stream.
    pub fn is_transient(&self) -> bool {
        match &*self.cause {
            Cause::Etcd(e) => e.is_transient(),
            Cause::Destination(e) => e.is_transient(),
            // A digest mismatch means the bytes changed on the way; a fresh
            // snapshot over a fresh connection is the right next step.
            Cause::Verify(_) => true,
            Cause::Resources(_) => false,
            Cause::Compress(_) => false,
            Cause::Paged(PagedError::Destination(e)) => e.is_transient(),
            Cause::Paged(_) => false,
            Cause::SetExists { .. } => true,
            Cause::Cancelled => false,
            Cause::Unanswered { error, .. } => error.is_transient(),
        }
    }
}

/// How one stage went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageReport {
    /// The stage.
    pub stage: Stage,
    /// Bytes moved (0 where that means nothing).
    pub bytes: u64,
    /// How long it took.
    pub duration: Duration,
}

/// A complete, verified set.
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// Where the set is, relative to the destination's base.
    pub set: SetId,
    /// The destination and set, for people.
    pub location: String,
    /// The manifest as written.
    pub manifest: Manifest,
    /// Each stage in order.
    pub stages: Vec<StageReport>,
    /// How each destination ended, in configuration order: at least one
    /// succeeded; when some failed, the run is partial.
    pub destinations: Vec<DestinationOutcome>,
}

impl BackupReport {
    /// Whether some destination's copy is missing.
    pub fn is_partial(&self) -> bool {
        self.destinations.iter().any(|d| !d.succeeded())
    }
}

/// Runs a backup with the configured retries: an attempt that fails on
/// something that may pass (a connection, a timeout, a corrupted stream) is
/// retried after an exponential, jittered delay, with a fresh destination
/// connection and a fresh snapshot. Host-key, authentication and configuration
/// problems fail at once.
///
/// Cancelling `cancel` stops the run at once; what it wrote is removed.
/// After a run that stored its set, retention is applied at each destination
/// holding it, over the same connection.
pub async fn run_with_retries(config: &Config, cancel: &CancellationToken) -> Outcome {
    let retry = config.retry;
    let mut attempt = 1;
    loop {
        // A fresh connection to every destination for each attempt; one
        // that cannot even be opened fails on its own.
        let mut opened = Vec::with_capacity(config.destinations.len());
        let mut open_errors = Vec::with_capacity(config.destinations.len());
        for d in &config.destinations {
            match crate::store::destination::open(&d.config).await {
                Ok(dest) => {
                    opened.push(Some(dest));
                    open_errors.push(None);
                }
                Err(e) => {
                    opened.push(None);
                    open_errors.push(Some(e));
                }
            }
        }
        let targets = config
            .destinations
            .iter()
            .zip(&opened)
            .zip(open_errors)
            .map(|((d, dest), error)| match (dest, error) {
                (Some(dest), _) => Target::new(&d.name, dest.as_ref()),
                (None, error) => Target::unopened(&d.name, d.config.describe(), error),
            })
            .collect();
        let result = run_targets(config, targets, cancel).await;
        match result {
            Err(e) if e.is_transient() && attempt < retry.attempts && !cancel.is_cancelled() => {
                let delay = backoff(&retry, attempt, rand::random::<f64>());
                tracing::warn!(
                    attempt,
                    of = retry.attempts,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %e,
                    "backup attempt failed; retrying with a fresh snapshot"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => {
                        return Outcome {
                            result: Err(BackupError::new(e.stage, Cause::Cancelled)),
                            attempts: attempt,
                            retention_errors: Vec::new(),
                        };
                    }
                }
                attempt += 1;
            }
            result => {
                // Retention at each destination that holds the new set, over
                // the connection the run used.
                let mut retention_errors = Vec::new();
                if let Ok(report) = &result {
                    for d in report.destinations.iter().filter(|d| d.succeeded()) {
                        let Some(dest) = config
                            .destinations
                            .iter()
                            .position(|c| c.name == d.name)
                            .and_then(|i| opened[i].as_deref())
                        else {
                            continue;
                        };
                        let t = Instant::now();
                        if let Err(e) = crate::store::prune::after_backup(config, dest).await {
                            retention_errors.push((d.name.clone(), e));
                        }
                        tracing::debug!(
                            destination = %d.name,
                            elapsed_ms = t.elapsed().as_millis() as u64,
                            "retention applied"
                        );
                    }
                }
                return Outcome {
                    result,
                    attempts: attempt,
                    retention_errors,
                };
            }
        }
    }
}

/// What [`run_with_retries`] ends with.
#[derive(Debug)]
pub struct Outcome {
    /// The last attempt's result.
    pub result: Result<BackupReport, BackupError>,
    /// Attempts made, the last included.
    pub attempts: u32,
    /// Destinations where applying retention after the run failed, and why
    /// (the run's set is complete there all the same).
    pub retention_errors: Vec<(String, String)>,
}

/// The delay after failed attempt `attempt` (1-based): the initial delay
/// doubled per attempt, capped, then scaled into `[d/2, d]` by `unit` in
/// `[0, 1)` so agents that failed together do not retry together.
pub fn backoff(retry: &crate::config::RetryConfig, attempt: u32, unit: f64) -> Duration {
    retry.backoff(attempt, unit)
}

/// Runs one backup against the configured etcd member.
///
/// # Errors
/// [`BackupError`] naming the stage; nothing complete-looking is left behind.
pub async fn run(
    config: &Config,
    dest: &dyn Destination,
    cancel: &CancellationToken,
) -> Result<BackupReport, BackupError> {
    let name = &config.default_destination().name;
    run_targets(config, vec![Target::new(name, dest)], cancel).await
}

/// Runs one backup to several destinations, each given with its name: one
/// etcd read, every destination written at once.
///
/// # Errors
/// As [`run`], when every destination failed.
pub async fn run_to(
    config: &Config,
    dests: &[(&str, &dyn Destination)],
    cancel: &CancellationToken,
) -> Result<BackupReport, BackupError> {
    let targets = dests
        .iter()
        .map(|(name, dest)| Target::new(name, *dest))
        .collect();
    run_targets(config, targets, cancel).await
}

async fn run_targets(
    config: &Config,
    targets: Vec<Target<'_>>,
    cancel: &CancellationToken,
) -> Result<BackupReport, BackupError> {
    let names: Vec<(String, String)> = targets
        .iter()
        .map(|t| (t.name.clone(), t.location()))
        .collect();
    let result = run_once(config, targets, cancel).await;
    // A run that failed before it knew its destinations failed at each.
    result.map_err(|mut e| {
        if e.destinations.is_empty() {
            e.destinations = names
                .into_iter()
                .map(|(name, location)| DestinationOutcome {
                    name,
                    location,
                    result: DestinationResult::Failed {
                        stage: e.stage,
                        error: e.cause.to_string(),
                    },
                })
                .collect();
        }
        e
    })
}

async fn run_once(
    config: &Config,
    targets: Vec<Target<'_>>,
    cancel: &CancellationToken,
) -> Result<BackupReport, BackupError> {
    let started_at = Utc::now();
    // Plan first: a missing manifest is a configuration problem, found before
    // etcd is asked for anything.
    let plan =
        resources::plan(&config.resources).map_err(|e| BackupError::new(Stage::Resources, e))?;
    let t = Instant::now();
    let mut member = tokio::select! {
        m = EtcdMember::connect(&config.etcd) => m.map_err(|e| BackupError::new(Stage::Connect, e))?,
        _ = cancel.cancelled() => return Err(BackupError::new(Stage::Connect, Cause::Cancelled)),
    };
    let connect_time = t.elapsed();
    let mut run = Run::new(config, targets, started_at, plan);
    run.stages.push(StageReport {
        stage: Stage::Connect,
        bytes: 0,
        duration: connect_time,
    });
    run.execute(&mut member, cancel).await
}

/// Runs one backup from any snapshot source (a double in unit tests).
///
/// # Errors
/// As [`run`].
pub async fn run_with_source(
    config: &Config,
    source: &mut dyn SnapshotSource,
    dest: &dyn Destination,
) -> Result<BackupReport, BackupError> {
    let started_at = Utc::now();
    let plan =
        resources::plan(&config.resources).map_err(|e| BackupError::new(Stage::Resources, e))?;
    let name = &config.default_destination().name;
    Run::new(config, vec![Target::new(name, dest)], started_at, plan)
        .execute(source, &CancellationToken::new())
        .await
}

/// One destination's part of a run: its own durability, its own files, its
/// own manifest, its own clean-up.
struct Target<'a> {
    name: String,
    /// `None` when the destination could not even be opened.
    dest: Option<&'a dyn Destination>,
    /// Where it is, for people.
    describe: String,
    /// Every path this run created there, so a failure can remove them all.
    created: Vec<String>,
    /// Set when whether this destination's manifest exists cannot be found
    /// out: clean-up then deletes nothing there, since a manifest may name
    /// the data files.
    keep: bool,
    /// Whether the destination syncs what it stores, asked before writing.
    durability: Durability,
    /// Where and why it failed, once it has.
    failed: Option<(Stage, String)>,
    /// The failure itself, until it becomes the run's error.
    error: Option<BackupError>,
    /// A paged snapshot's packs and index here, once stored.
    paged: Option<PagedOutcome>,
}

impl<'a> Target<'a> {
    fn new(name: &str, dest: &'a dyn Destination) -> Self {
        Self {
            name: name.to_string(),
            dest: Some(dest),
            describe: dest.describe(),
            created: Vec::new(),
            keep: false,
            durability: Durability::Synced,
            failed: None,
            error: None,
            paged: None,
        }
    }

    fn unopened(name: &str, describe: String, error: Option<DestinationError>) -> Self {
        let mut t = Self {
            name: name.to_string(),
            dest: None,
            describe,
            created: Vec::new(),
            keep: false,
            durability: Durability::Synced,
            failed: None,
            error: None,
            paged: None,
        };
        let error = error.unwrap_or_else(|| DestinationError::Connect {
            location: t.describe.clone(),
            detail: "not opened".into(),
        });
        t.fail(Stage::Upload, error);
        t
    }

    fn location(&self) -> String {
        self.describe.clone()
    }

    fn live(&self) -> Option<&'a dyn Destination> {
        if self.failed.is_some() {
            None
        } else {
            self.dest
        }
    }

    fn fail(&mut self, stage: Stage, cause: impl Into<Cause>) {
        let cause = cause.into();
        if self.failed.is_none() {
            self.failed = Some((stage, cause.to_string()));
            self.error = Some(BackupError::new(stage, cause));
        }
    }
}

struct Run<'a> {
    config: &'a Config,
    /// The destinations, in configuration order.
    targets: Vec<Target<'a>>,
    /// Destinations the fan-out lost during a write, not yet failed here.
    lost: Lost,
    started_at: DateTime<Utc>,
    set: SetId,
    plan: Option<resources::Plan>,
    stages: Vec<StageReport>,
    /// The step in progress, for a cancellation's error.
    stage: Stage,
    /// What `etcdctl snapshot status` reports for the stored snapshot.
    snapshot_status: Option<etcd_backup_proto::SnapshotStatus>,
}

impl<'a> Run<'a> {
    fn new(
        config: &'a Config,
        targets: Vec<Target<'a>>,
        started_at: DateTime<Utc>,
        plan: Option<resources::Plan>,
    ) -> Self {
        let set = SetId {
            cluster: config.cluster_name.clone(),
            node: config.node_name.clone(),
            timestamp: SetTimestamp::new(started_at),
        };
        Self {
            config,
            targets,
            lost: Lost::default(),
            started_at,
            set,
            plan,
            stages: Vec::new(),
            stage: Stage::Connect,
            snapshot_status: None,
        }
    }

    async fn execute(
        mut self,
        source: &mut dyn SnapshotSource,
        cancel: &CancellationToken,
    ) -> Result<BackupReport, BackupError> {
        let outcome = tokio::select! {
            r = self.steps(source) => Some(r),
            _ = cancel.cancelled() => None,
        };
        // The steps future is gone here, so `self.stage` says where it stopped.
        let result = outcome.unwrap_or_else(|| Err(BackupError::new(self.stage, Cause::Cancelled)));
        match result {
            Ok(manifest) => {
                for i in 0..self.targets.len() {
                    let Some((stage, error)) = self.targets[i].failed.clone() else {
                        continue;
                    };
                    let t = &self.targets[i];
                    tracing::warn!(set = %self.set, destination = %t.name, stage = %stage, error = %error, "this destination failed; removing what this run wrote there");
                    let not_removed = self.clean_up(i).await;
                    if !not_removed.is_empty() {
                        if let Some((_, error)) = self.targets[i].failed.as_mut() {
                            error.push_str(&not_removed_note(&not_removed));
                        }
                    }
                }
                let destinations = self.outcomes();
                let first = self
                    .targets
                    .iter()
                    .find(|t| t.failed.is_none())
                    .map_or_else(String::new, Target::location);
                Ok(BackupReport {
                    location: format!("{first}/{}", self.set.dir()),
                    set: self.set,
                    manifest,
                    stages: self.stages,
                    destinations,
                })
            }
            Err(mut e) => {
                tracing::warn!(set = %self.set, stage = %e.stage, error = %e, "backup failed; removing what this run wrote");
                // A failure of the run as a whole fails every destination
                // still going; each keeps its own reason otherwise.
                let (stage, text) = (e.stage, e.cause.to_string());
                for t in &mut self.targets {
                    if t.failed.is_none() {
                        t.failed = Some((stage, text.clone()));
                    }
                }
                let several = self.targets.len() > 1;
                for i in 0..self.targets.len() {
                    let not_removed = self.clean_up(i).await;
                    if several && !not_removed.is_empty() {
                        if let Some((_, error)) = self.targets[i].failed.as_mut() {
                            error.push_str(&not_removed_note(&not_removed));
                        }
                    }
                    e.not_removed.extend(not_removed);
                }
                e.destinations = self.outcomes();
                Err(e)
            }
        }
    }

    /// Each destination's outcome, in configuration order.
    fn outcomes(&self) -> Vec<DestinationOutcome> {
        self.targets
            .iter()
            .map(|t| DestinationOutcome {
                name: t.name.clone(),
                location: t.location(),
                result: match &t.failed {
                    None => DestinationResult::Succeeded {
                        durable: t.durability == Durability::Synced,
                    },
                    Some((stage, error)) => DestinationResult::Failed {
                        stage: *stage,
                        error: error.clone(),
                    },
                },
            })
            .collect()
    }

    /// The destinations still going, by index.
    fn live(&self) -> Vec<(usize, &'a dyn Destination)> {
        self.targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.live().map(|d| (i, d)))
            .collect()
    }

    /// The run's error once every destination has failed: the first
    /// destination's own (with one destination, exactly its error).
    fn all_failed(&mut self) -> BackupError {
        self.targets
            .iter_mut()
            .find_map(|t| t.error.take())
            .unwrap_or_else(|| {
                BackupError::new(
                    Stage::Upload,
                    DestinationError::Connect {
                        location: "every destination".into(),
                        detail: "failed".into(),
                    },
                )
            })
    }

    /// Fails destination `i` at `stage`; the others go on.
    fn fail(&mut self, i: usize, stage: Stage, cause: impl Into<Cause>) {
        let several = self.targets.len() > 1;
        let t = &mut self.targets[i];
        let cause = cause.into();
        if several {
            tracing::warn!(destination = %t.name, stage = %stage, error = %cause, "destination failed; the run goes on with the others");
        }
        t.fail(stage, cause);
    }

    /// Ok while some destination is still going.
    fn any_left(&mut self) -> Result<(), BackupError> {
        if self.live().is_empty() {
            Err(self.all_failed())
        } else {
            Ok(())
        }
    }

    /// After a write to the fan-out: fails the destinations it lost; the
    /// write's own error is the run's only when it was no destination's.
    fn settle<T>(&mut self, result: Result<T, Cause>) -> Result<T, BackupError> {
        for (i, e) in self.lost.take() {
            self.fail(i, Stage::Upload, e);
        }
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                if self.live().is_empty() {
                    Err(self.all_failed())
                } else {
                    Err(BackupError::new(Stage::Upload, e))
                }
            }
        }
    }

    async fn steps(&mut self, source: &mut dyn SnapshotSource) -> Result<Manifest, BackupError> {
        let ts = self.set.timestamp;
        // Before anything is written: a destination that cannot sync, where
        // the configuration requires it, fails the run here, with nothing
        // to clean up.
        // Each destination on its own: one that fails here is left out.
        // Meanwhile the destinations get ready for the snapshot (SFTP logs
        // its striped sessions in), so that overlaps these steps.
        let coding = std::sync::Arc::new(Coding {
            compression: self.config.compression,
            encryption: self.config.encryption.clone(),
        });
        let ids = std::sync::Arc::new(PageIdScheme::for_config(self.config.encryption.as_ref()));
        let (cluster, node) = (self.set.cluster.clone(), self.set.node.clone());
        let paged = self.config.snapshot_format == crate::config::SnapshotFormat::Paged;
        let live = self.live();
        let warm_up = futures_util::future::join_all(live.iter().map(|(_, d)| d.warm_up()));
        let checks = async {
            for (i, dest) in live.iter().copied() {
                match dest.durability().await {
                    Ok(d) => self.targets[i].durability = d,
                    Err(e) => {
                        self.fail(i, Stage::Upload, e);
                        continue;
                    }
                }
                let set_exists = Cause::SetExists {
                    location: format!("{}/{}", dest.describe(), self.set.dir()),
                };
                match dest.list(&self.set.dir()).await {
                    Ok(existing) if existing.is_empty() => {}
                    Ok(_) => {
                        self.fail(i, Stage::Upload, set_exists);
                        continue;
                    }
                    Err(e) => {
                        self.fail(i, Stage::Upload, e);
                        continue;
                    }
                }
                // Where a second writer is not refused by exclusive creates
                // (S3), the destination claims the set; the claim is released
                // by clean-up through the manifest's partial name.
                let dir = self.set.dir();
                let claim = partial(&self.set.file(MANIFEST_FILE_NAME));
                match self.recorded(i, claim, dest.claim(&dir)).await {
                    Ok(()) => {}
                    Err(DestinationError::AlreadyExists { .. }) => {
                        self.fail(i, Stage::Upload, set_exists);
                    }
                    Err(e) => self.fail(i, Stage::Upload, e),
                }
            }
        };
        // A paged run's previous set at each destination (its manifest and
        // page index: round trips a distant store would otherwise add to
        // the run) is looked up meanwhile too.
        let previous = async {
            if !paged {
                return Vec::new();
            }
            futures_util::future::join_all(live.iter().map(|(i, d)| {
                let (cluster, node, coding, ids) = (&cluster, &node, &coding, &ids);
                async move {
                    let found =
                        crate::store::paged::writer::previous(*d, cluster, node, coding, ids).await;
                    (*i, found)
                }
            }))
            .await
        };
        let ready = Instant::now();
        let (_, (), previous) = tokio::join!(warm_up, checks, previous);
        tracing::debug!(
            elapsed_ms = ready.elapsed().as_millis() as u64,
            "destinations ready (sessions, checks, previous sets)"
        );
        self.any_left()?;

        let t = Instant::now();
        let member = source
            .member_info()
            .await
            .map_err(|e| BackupError::new(Stage::Connect, e))?;
        tracing::info!(
            endpoint = %member.endpoint,
            cluster_id = %format!("{:016x}", member.cluster_id),
            member_id = %format!("{:016x}", member.member_id),
            version = %member.version,
            revision = member.revision,
            db_size = member.db_size,
            "connected to etcd"
        );
        self.add_time(Stage::Connect, t.elapsed());

        self.stage = Stage::Snapshot;
        let snapshot = match self.config.snapshot_format {
            crate::config::SnapshotFormat::Full => self.snapshot(source, ts).await?,
            crate::config::SnapshotFormat::Paged => {
                self.snapshot_paged(source, ts, coding, ids, previous)
                    .await?
            }
        };
        // The keys a restore must serve: counted on the member at the
        // snapshot's exact revision (read from the snapshot itself).
        let live_keys = match self.snapshot_status {
            Some(st) => source.count_keys_at(st.revision).await.unwrap_or(None),
            None => None,
        };
        let mut files = vec![snapshot];
        if let Some(plan) = self.plan.take() {
            self.stage = Stage::Resources;
            files.push(self.resources(plan, ts).await?);
        }

        self.stage = Stage::Upload;
        let t = Instant::now();
        // Each destination renames the set's files at once (on SFTP, their
        // requests share round trips). A path is recorded before its rename
        // (so a cancelled run still removes it), and dropped again only when
        // the destination refused the rename. A rename without a definite
        // answer may have been carried out: the run looks, and goes on when
        // the file is in place with its size.
        // A paged snapshot's file is its page index, one per destination.
        for (i, dest) in self.live() {
            let renames: Vec<(String, String, u64)> = files
                .iter()
                .map(|f| match (f.kind, &self.targets[i].paged) {
                    (FileKind::Snapshot, Some(p)) => (
                        p.index_partial.clone(),
                        self.set.file(&p.pages.index.name),
                        p.pages.index.size,
                    ),
                    _ => {
                        let final_path = self.set.file(&f.name);
                        (partial(&final_path), final_path, f.size)
                    }
                })
                .collect();
            let created = &mut self.targets[i].created;
            created.extend(renames.iter().map(|(_, to, _)| to.clone()));
            // A paged set's packs directory is listed meanwhile (below).
            let packs = self.targets[i]
                .paged
                .as_ref()
                .map(|_| crate::store::paged::packs_dir(&self.set.cluster, &self.set.node));
            let (results, packs_listing) = tokio::join!(
                futures_util::future::join_all(
                    renames.iter().map(|(from, to, _)| dest.rename(from, to)),
                ),
                async {
                    match &packs {
                        Some(packs) => Some(dest.list(packs).await),
                        None => None,
                    }
                }
            );
            let mut refused: Option<Cause> = None;
            for ((from, to, size), result) in renames.iter().zip(results) {
                match result {
                    Ok(()) => {}
                    Err(e) if e.is_refusal() => {
                        self.targets[i].created.retain(|p| p != to);
                        refused.get_or_insert(e.into());
                    }
                    Err(e) => match rename_outcome(dest, from, to, *size).await {
                        Ok(found) => {
                            tracing::warn!(set = %self.set, destination = %self.targets[i].name, error = %e, "a rename got no answer; {found}");
                        }
                        Err(found) => {
                            refused.get_or_insert(Cause::Unanswered { error: e, found });
                        }
                    },
                }
            }
            if let Some(e) = refused {
                self.fail(i, Stage::Upload, e);
                continue;
            }
            // Every pack a paged set names is there, at its size, before
            // its manifest says so (a prune or another run on this node
            // may have removed an older one meanwhile); and durable.
            if let (Some(paged), Some(packs), Some(listing)) =
                (&self.targets[i].paged, &packs, packs_listing)
            {
                let missing = match listing {
                    Ok(listing) => paged.pages.packs.iter().find_map(|p| {
                        match listing.iter().find(|e| e.name == p.name) {
                            Some(e) if e.size == p.size => None,
                            Some(e) => Some(format!(
                                "pack {} holds {} bytes, {} expected",
                                p.name, e.size, p.size
                            )),
                            None => Some(format!("pack {} is gone", p.name)),
                        }
                    }),
                    Err(e) => Some(format!("the packs directory cannot be listed ({e})")),
                };
                if let Some(why) = missing {
                    self.fail(
                        i,
                        Stage::Upload,
                        PagedError::Damaged {
                            what: format!("{why} in {}/{packs} before the manifest was written (removed by a prune or another run meanwhile?); no manifest names it, so what the run wrote is removed: back up again", dest.describe()),
                        },
                    );
                    continue;
                }
            }
            // The set directory and the packs directory are synced together.
            let sync_packs = packs.filter(|_| self.targets[i].durability == Durability::Synced);
            let (set_synced, packs_synced) =
                tokio::join!(self.sync_set_dir(i, dest, false), async {
                    match &sync_packs {
                        Some(packs) => Some(dest.sync_dir(packs).await),
                        None => None,
                    }
                });
            if let Err(e) = set_synced {
                self.fail(i, Stage::Upload, e);
                continue;
            }
            // A set directory that cannot be synced made the set not
            // durable already; its packs directory is then not asked about.
            if self.targets[i].durability == Durability::Synced {
                match packs_synced {
                    None | Some(Ok(DirSync::Synced)) => {}
                    Some(Ok(DirSync::Unsupported(answer))) => {
                        tracing::warn!(destination = %dest.describe(), answer = %answer, "the destination cannot sync the packs directory; the manifest records the set as not durable");
                        self.targets[i].durability = Durability::FilesOnly;
                    }
                    Some(Err(e)) => self.fail(i, Stage::Upload, e),
                }
            }
        }
        self.any_left()?;
        self.add_time(Stage::Upload, t.elapsed());
        tracing::debug!(
            elapsed_ms = t.elapsed().as_millis() as u64,
            "the set's files are in place (renamed and synced)"
        );

        let mut manifest = self.manifest(&member, files);
        manifest.etcd.live_keys = live_keys;
        manifest.snapshot_status = self.snapshot_status;
        self.stage = Stage::Manifest;
        self.write_manifests(manifest).await
    }

    /// Syncs the set directory at destination `i`, so the renames into it
    /// survive a crash of the destination's host. A destination that
    /// answers it cannot sync a directory is recorded as syncing files only
    /// (its manifest then says so); one that never synced anything is not
    /// asked.
    ///
    /// After the manifest (`manifest_written`), whose copy already says the
    /// set is durable, a refusal fails the run instead: a set is never
    /// called durable when it is not.
    async fn sync_set_dir(
        &mut self,
        i: usize,
        dest: &dyn Destination,
        manifest_written: bool,
    ) -> Result<(), DestinationError> {
        if self.targets[i].durability != Durability::Synced {
            return Ok(());
        }
        match dest.sync_dir(&self.set.dir()).await? {
            DirSync::Synced => {}
            DirSync::Unsupported(answer) if manifest_written => {
                return Err(DestinationError::Io {
                    op: "cannot sync the set directory",
                    location: format!("{}/{}", dest.describe(), self.set.dir()),
                    source: std::io::Error::new(
                        std::io::ErrorKind::Unsupported,
                        format!("{answer}, though it synced the same directory before the manifest was written"),
                    ),
                });
            }
            DirSync::Unsupported(answer) => {
                tracing::warn!(
                    destination = %dest.describe(),
                    set = %self.set,
                    answer = %answer,
                    "the destination cannot sync the set directory, so a crash of its host may undo the renames that publish the set; the manifest records it as not durable (\"durability\": \"files_synced\")"
                );
                self.targets[i].durability = Durability::FilesOnly;
            }
        }
        Ok(())
    }

    fn add_time(&mut self, stage: Stage, d: Duration) {
        if let Some(s) = self.stages.iter_mut().find(|s| s.stage == stage) {
            s.duration += d;
        } else {
            self.stages.push(StageReport {
                stage,
                bytes: 0,
                duration: d,
            });
        }
    }

    /// Records `path` at destination `i` before the operation that may
    /// create it, so a run cancelled while the destination is carrying it
    /// out (the file exists, the answer never came) still removes it. A
    /// refusal the destination answers created nothing of ours: the record
    /// is dropped again, so an existing file of the same name is never
    /// removed. Any other error (a timeout, a dropped connection) may come
    /// after the file was created: the record stays.
    async fn recorded<T>(
        &mut self,
        i: usize,
        path: String,
        op: impl std::future::Future<Output = Result<T, DestinationError>>,
    ) -> Result<T, DestinationError> {
        crate::store::destination::recorded(&mut self.targets[i].created, path, op).await
    }

    /// Creates `path` at every destination still going; those that refuse
    /// are failed at `stage`.
    async fn create_each(
        &mut self,
        path: &str,
        stage: Stage,
    ) -> Result<Vec<(usize, Box<dyn Upload>)>, BackupError> {
        let mut uploads = Vec::new();
        for (i, dest) in self.live() {
            match self.recorded(i, path.to_string(), dest.create(path)).await {
                Ok(up) => uploads.push((i, up)),
                Err(e) => self.fail(i, stage, e),
            }
        }
        self.any_left()?;
        Ok(uploads)
    }

    async fn snapshot(
        &mut self,
        source: &mut dyn SnapshotSource,
        ts: SetTimestamp,
    ) -> Result<ManifestFile, BackupError> {
        let t = Instant::now();
        let name = ts.snapshot_file_name();
        let compression = self.config.compression;
        let stored_name = self.stored_name(&name, compression.is_some());
        let path = partial(&self.set.file(&stored_name));
        let mut stream = source
            .snapshot()
            .await
            .map_err(|e| BackupError::new(Stage::Snapshot, e))?;
        let mut up = self.create_sink(&path).await?;
        if let Some(c) = &compression {
            up.compress =
                Some(Compressing::new(c).map_err(|e| BackupError::new(Stage::Upload, e))?);
        }
        let mut verifier = SnapshotVerifier::new();
        // What `etcdctl snapshot status` would say, computed from the same
        // bytes as they pass, so no second read of the stored file is needed.
        let mut status = etcd_backup_bbolt_status::StreamingStatus::new();
        // etcd sends 32 KiB messages; handing the destination larger writes
        // means fewer requests (and acknowledgements) on the way out.
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        while let Some(chunk) = stream
            .next_chunk()
            .await
            .map_err(|e| BackupError::new(Stage::Snapshot, e))?
        {
            verifier.update(&chunk);
            status.update(&chunk);
            batch.extend_from_slice(&chunk);
            if batch.len() >= WRITE_BATCH {
                let written = up.write(&batch).await;
                self.settle(written)?;
                batch.clear();
            }
        }
        if !batch.is_empty() {
            let written = up.write(&batch).await;
            self.settle(written)?;
        }
        drop(batch);
        // Check before making the file durable: a bad stream never gets a
        // final name, and the partial is removed by the caller.
        let verified = verifier
            .finish()
            .map_err(|e| BackupError::new(Stage::Verify, e))?;
        // etcd's digest checked out, so a bbolt file that cannot be walked is
        // etcd's own problem: record that loudly, but the backup is still the
        // exact bytes etcd sent.
        let status = match status.finish() {
            Ok(s) => Some(s),
            Err(e) if e.is_corrupt() => {
                tracing::error!(error = %e, "the snapshot's bbolt structure could not be read; no snapshot status recorded");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "no snapshot status recorded");
                None
            }
        };
        self.snapshot_status = status;
        let finished = up.finish().await;
        let stored = self.settle(finished)?;
        tracing::info!(
            bytes = stored.size,
            plaintext_bytes = stored.plaintext_size,
            encrypted = stored.encrypted,
            compression = stored.compression.map_or("none", Compression::as_str),
            sha256 = %stored.sha256.as_deref().unwrap_or(&verified.file_sha256),
            plaintext_sha256 = %verified.file_sha256,
            etcd_digest = %verified.etcd_digest,
            elapsed_ms = t.elapsed().as_millis() as u64,
            "snapshot stored and its etcd digest verified"
        );
        self.stages.push(StageReport {
            stage: Stage::Snapshot,
            bytes: stored.size,
            duration: t.elapsed(),
        });
        Ok(stored.entry(name, FileKind::Snapshot, verified.file_sha256))
    }

    /// The snapshot as pages (`snapshot_format: paged`): each destination
    /// compares every page with its previous set's page at the same
    /// position and stores only the others, in new packs; one read of etcd
    /// for all. Returns the snapshot's entry (its plain name, size and
    /// SHA-256); each destination's packs and index are in its target.
    async fn snapshot_paged(
        &mut self,
        source: &mut dyn SnapshotSource,
        ts: SetTimestamp,
        coding: std::sync::Arc<Coding>,
        ids: std::sync::Arc<PageIdScheme>,
        mut previous: Vec<(usize, Option<Previous>)>,
    ) -> Result<ManifestFile, BackupError> {
        let t = Instant::now();
        let mut stream = source
            .snapshot()
            .await
            .map_err(|e| BackupError::new(Stage::Snapshot, e))?;
        // etcd's stream is read ahead while pages are hashed, compared and
        // stored (a few MiB at most), so neither waits for the other.
        let (chunks_tx, mut chunks) = tokio::sync::mpsc::channel(PREFETCH_CHUNKS);
        tokio::spawn(async move {
            loop {
                let next = stream.next_chunk().await;
                let end = !matches!(next, Ok(Some(_)));
                if chunks_tx.send(next).await.is_err() || end {
                    return;
                }
            }
        });
        let mut verifier = SnapshotVerifier::new();
        let mut status = etcd_backup_bbolt_status::StreamingStatus::new();
        let mut cutter = PageCutter::default();
        let mut writers: Vec<(usize, PagedWriter<'a>)> = Vec::new();
        let mut started = false;
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        let mut total = 0u64;
        loop {
            let chunk = chunks
                .recv()
                .await
                .unwrap_or(Ok(None))
                .map_err(|e| BackupError::new(Stage::Snapshot, e))?;
            let end = chunk.is_none();
            if let Some(chunk) = &chunk {
                verifier.update(chunk);
                status.update(chunk);
                total += chunk.len() as u64;
                batch.extend_from_slice(chunk);
            }
            if batch.len() < WRITE_BATCH && !end {
                continue;
            }
            let pages = cutter
                .push(&batch)
                .map_err(|e| BackupError::new(Stage::Snapshot, e))?;
            batch.clear();
            if !started {
                if let Some(size) = cutter.page_size() {
                    started = true;
                    for (i, prev) in previous.drain(..) {
                        let Some(dest) = self.targets[i].live() else {
                            continue;
                        };
                        let created = &mut self.targets[i].created;
                        match PagedWriter::start(
                            dest,
                            &self.set,
                            size,
                            coding.clone(),
                            prev,
                            created,
                        )
                        .await
                        {
                            Ok(w) => writers.push((i, w)),
                            Err(e) => self.fail(i, Stage::Upload, e),
                        }
                    }
                    self.any_left()?;
                }
            }
            if !pages.is_empty() {
                let page_size = cutter
                    .page_size()
                    .expect("pages were cut, so their size is known");
                let scheme = ids.clone();
                let (pages, page_ids) = tokio::task::spawn_blocking(move || {
                    let page_ids: Vec<[u8; 16]> =
                        pages.chunks(page_size).map(|p| scheme.id(p)).collect();
                    (pages, page_ids)
                })
                .await
                .map_err(|e| {
                    BackupError::new(
                        Stage::Upload,
                        PagedError::Local {
                            what: "cannot compute page ids",
                            source: std::io::Error::other(e),
                        },
                    )
                })?;
                let mut failed = Vec::new();
                for (k, (i, w)) in writers.iter_mut().enumerate() {
                    if let Err(e) = w
                        .add(&pages, &page_ids, &mut self.targets[*i].created)
                        .await
                    {
                        failed.push((k, *i, e));
                    }
                }
                for (k, i, e) in failed.into_iter().rev() {
                    writers.remove(k);
                    self.fail(i, Stage::Upload, e);
                }
                self.any_left()?;
            }
            if end {
                break;
            }
        }
        drop(batch);
        let verified = verifier
            .finish()
            .map_err(|e| BackupError::new(Stage::Verify, e))?;
        self.snapshot_status = match status.finish() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "the snapshot's bbolt structure could not be read; no snapshot status recorded");
                None
            }
        };
        let (_, tail) = cutter
            .finish()
            .map_err(|e| BackupError::new(Stage::Snapshot, e))?;
        let mut added = 0u64;
        for (i, w) in writers {
            let created = &mut self.targets[i].created;
            match w.finish(&tail, &ids, created).await {
                Ok(outcome) => {
                    tracing::info!(
                        destination = %self.targets[i].name,
                        pages = outcome.pages.pages,
                        new_pages = outcome.pages.new_pages,
                        added_bytes = outcome.pages.added_bytes,
                        packs = outcome.pages.packs.len(),
                        compared_with = %outcome.pages.compared_with.map_or_else(|| "none".to_string(), |s| s.to_string()),
                        "snapshot pages stored"
                    );
                    added = added.max(outcome.pages.added_bytes);
                    self.targets[i].paged = Some(outcome);
                }
                Err(e) => self.fail(i, Stage::Upload, e),
            }
        }
        self.any_left()?;
        tracing::info!(
            bytes = total,
            sha256 = %verified.file_sha256,
            etcd_digest = %verified.etcd_digest,
            elapsed_ms = t.elapsed().as_millis() as u64,
            "paged snapshot stored and its etcd digest verified"
        );
        self.stages.push(StageReport {
            stage: Stage::Snapshot,
            bytes: added,
            duration: t.elapsed(),
        });
        Ok(ManifestFile {
            name: ts.snapshot_file_name(),
            kind: FileKind::Snapshot,
            size: total,
            sha256: verified.file_sha256,
            compression: None,
            plaintext: None,
            pages: None,
        })
    }

    async fn resources(
        &mut self,
        plan: resources::Plan,
        ts: SetTimestamp,
    ) -> Result<ManifestFile, BackupError> {
        let t = Instant::now();
        let name = ts.resources_file_name();
        // Gzip already: never compressed again.
        let stored_name = self.stored_name(&name, false);
        let path = partial(&self.set.file(&stored_name));
        let mut up = self.create_sink(&path).await?;
        let (mut rx, handle) = resources::spawn_archive(plan);
        let mut hasher = Sha256::new();
        let mut upload_error = None;
        while let Some(chunk) = rx.recv().await {
            hasher.update(&chunk);
            let written = up.write(&chunk).await;
            if let Err(e) = self.settle(written) {
                upload_error = Some(e);
                break;
            }
        }
        // Stops the archive thread if the upload failed.
        drop(rx);
        let archived = handle.await.map_err(|e| {
            BackupError::new(
                Stage::Resources,
                ResourcesError::Io {
                    op: "finish",
                    path: self.config.resources.root.clone(),
                    source: std::io::Error::other(e),
                },
            )
        })?;
        if let Some(e) = upload_error {
            return Err(e);
        }
        let stats = archived.map_err(|e| BackupError::new(Stage::Resources, e))?;
        let finished = up.finish().await;
        let stored = self.settle(finished)?;
        tracing::info!(
            bytes = stored.size,
            plaintext_bytes = stored.plaintext_size,
            entries = stats.entries,
            content_bytes = stats.content_bytes,
            elapsed_ms = t.elapsed().as_millis() as u64,
            "static-pod resources stored"
        );
        self.stages.push(StageReport {
            stage: Stage::Resources,
            bytes: stored.size,
            duration: t.elapsed(),
        });
        Ok(stored.entry(name, FileKind::Resources, hex::encode(hasher.finalize())))
    }

    /// The name a data file is stored under: with `.zst` when compressed,
    /// then `.age` when encrypting.
    fn stored_name(&self, name: &str, compressed: bool) -> String {
        let zst = if compressed { ZST_SUFFIX } else { "" };
        let age = if self.config.encryption.is_some() {
            AGE_SUFFIX
        } else {
            ""
        };
        format!("{name}{zst}{age}")
    }

    /// Creates a data file, encrypting what is written to it when configured.
    async fn create_sink(&mut self, path: &str) -> Result<Sink, BackupError> {
        let uploads = self.create_each(path, Stage::Upload).await?;
        let location = match uploads.as_slice() {
            [(i, _)] => format!("{}/{path}", self.targets[*i].describe),
            _ => format!("{path} at each destination"),
        };
        let up: Box<dyn Upload> = Box::new(Tee::new(uploads, self.lost.clone()));
        let out = match &self.config.encryption {
            None => Out::Plain(up),
            Some(enc) => {
                let sealed = SealingUpload::new(up, enc, &location)
                    .await
                    .map_err(|e| BackupError::new(Stage::Upload, e))?;
                Out::Sealed(Box::new(sealed))
            }
        };
        Ok(Sink {
            compress: None,
            out,
            location,
        })
    }

    /// The manifest, `durable` as if every destination synced; each
    /// destination's copy says what it did.
    fn manifest(&self, member: &MemberInfo, files: Vec<ManifestFile>) -> Manifest {
        Manifest {
            format_version: match (&self.config.compression, &self.config.encryption) {
                (Some(_), _) => MANIFEST_FORMAT_COMPRESSED,
                (None, Some(_)) => MANIFEST_FORMAT_ENCRYPTED,
                (None, None) => MANIFEST_FORMAT_PLAIN,
            },
            encryption: self.config.encryption.as_ref().map(|e| ManifestEncryption {
                scheme: crate::encryption::SCHEME.to_string(),
                recipients: e.recipient_texts(),
            }),
            compression: self.config.compression.map(|c| ManifestCompression {
                algorithm: c.algorithm,
                level: c.level,
            }),
            cluster: self.set.cluster.clone(),
            node: self.set.node.clone(),
            timestamp: self.set.timestamp,
            started_at: self.started_at,
            finished_at: Utc::now(),
            agent_version: AGENT_VERSION.to_string(),
            etcd: ManifestEtcd {
                endpoint: member.endpoint.clone(),
                cluster_id: format!("{:016x}", member.cluster_id),
                member_id: format!("{:016x}", member.member_id),
                version: member.version.clone(),
                revision: member.revision,
                db_size: member.db_size,
                live_keys: None,
            },
            resources_layout: self.config.resources.layout.as_str().to_string(),
            files,
            snapshot_status: None,
            durable: true,
            // Looked at once the resources are stored: a rollout that began
            // during the run marks the set too.
            rollout_in_progress: resources::rollout_in_progress(&self.config.resources),
            durability: None,
        }
    }

    /// Writes each destination's manifest (its own `durable`); returns the
    /// first successful destination's.
    async fn write_manifests(&mut self, manifest: Manifest) -> Result<Manifest, BackupError> {
        let t = Instant::now();
        let final_path = self.set.file(MANIFEST_FILE_NAME);
        let path = partial(&final_path);
        let mut written: Option<(Manifest, u64)> = None;
        for (i, dest) in self.live() {
            let mut own = manifest.clone();
            if let Some(p) = &self.targets[i].paged {
                own.format_version = MANIFEST_FORMAT_PAGED;
                for f in &mut own.files {
                    if f.kind == FileKind::Snapshot {
                        f.pages = Some(Box::new(p.pages.clone()));
                    }
                }
            }
            own.durable = self.targets[i].durability == Durability::Synced;
            own.durability = match self.targets[i].durability {
                Durability::Synced => None,
                Durability::FilesOnly => Some(DurabilityLevel::FilesSynced),
                Durability::NotSynced => Some(DurabilityLevel::NotSynced),
            };
            let mut json = serde_json::to_vec_pretty(&own).expect("a manifest always serializes");
            json.push(b'\n');
            let mut up = match self
                .recorded(i, path.clone(), dest.create_small(&path))
                .await
            {
                Ok(up) => up,
                Err(e) => {
                    self.fail(i, Stage::Manifest, e);
                    continue;
                }
            };
            let stored = async {
                up.write(&json).await?;
                up.finish().await
            }
            .await;
            let renamed = match stored {
                Ok(_) => {
                    self.recorded(i, final_path.clone(), dest.rename(&path, &final_path))
                        .await
                }
                Err(e) => {
                    self.fail(i, Stage::Manifest, e);
                    continue;
                }
            };
            let renamed = match renamed {
                Err(e) if !e.is_refusal() => {
                    // The manifest may be in place: look before deciding.
                    match manifest_outcome(dest, &self.set.dir(), &json).await {
                        ManifestFound::InPlace(found) => {
                            tracing::warn!(set = %self.set, destination = %self.targets[i].name, error = %e, "the manifest's rename got no answer; {found}");
                            Ok(())
                        }
                        ManifestFound::Absent(found) => Err(Cause::Unanswered { error: e, found }),
                        ManifestFound::Unknown(found) => {
                            let kept = self.targets[i].created.join(", ");
                            self.targets[i].keep = true;
                            Err(Cause::Unanswered {
                                error: e,
                                found: format!("{found}, so the set may be complete: nothing of it is deleted, since the manifest may name its files (kept: {kept}); run `etcd-backup-agent verify` on the set: if it verifies it is a good backup, if it is not listed, remove its directory by hand"),
                            })
                        }
                    }
                }
                other => other.map_err(Cause::from),
            };
            // The manifest's rename is durable before the run says so.
            let renamed = match renamed {
                Ok(()) => self.sync_set_dir(i, dest, true).await.map_err(Cause::from),
                Err(e) => Err(e),
            };
            match renamed {
                Ok(()) => {
                    if written.is_none() {
                        written = Some((own, json.len() as u64));
                    }
                }
                Err(e) => self.fail(i, Stage::Manifest, e),
            }
        }
        self.any_left()?;
        let (manifest, bytes) =
            written.expect("a destination is left, so one manifest was written");
        self.stages.push(StageReport {
            stage: Stage::Manifest,
            bytes,
            duration: t.elapsed(),
        });
        Ok(manifest)
    }

    /// Removes everything this run wrote, manifest first, so that even an
    /// interrupted clean-up never leaves a set that looks complete. The data
    /// files go only once the set directory shows neither the manifest nor
    /// its partial name (whose removal stops a rename still on its way):
    /// a manifest never names files that are gone. Returns the paths it
    /// could not remove.
    async fn clean_up(&mut self, i: usize) -> Vec<String> {
        let paths = std::mem::take(&mut self.targets[i].created);
        let Some(dest) = self.targets[i].dest else {
            return Vec::new();
        };
        if self.targets[i].keep {
            // The manifest's fate is unknown: the run's error says so.
            return Vec::new();
        }
        let dir = self.set.dir();
        let manifest = self.set.file(MANIFEST_FILE_NAME);
        let manifest_partial = partial(&manifest);
        let (mut first, data): (Vec<String>, Vec<String>) = paths
            .into_iter()
            .partition(|p| *p == manifest || *p == manifest_partial);
        first.sort_by_key(|p| *p != manifest);
        first.dedup();
        let mut failed = Vec::new();
        for p in &first {
            if let Err(e) = dest.delete(p).await {
                tracing::warn!(path = %p, error = %e, "could not remove a file of the failed run");
                failed.push(p.clone());
            }
        }
        if first.contains(&manifest) || !failed.is_empty() {
            let name = MANIFEST_FILE_NAME;
            let partial_name = partial(MANIFEST_FILE_NAME);
            let still = match dest.list(&dir).await {
                Ok(entries) => entries
                    .iter()
                    .find(|e| e.name == name || e.name == partial_name)
                    .map(|e| format!("{} is still there", e.name)),
                Err(e) => Some(format!("the set directory cannot be read ({e})")),
            };
            if let Some(why) = still {
                tracing::warn!(set = %self.set, "{why}: the data files of the failed run are kept, so that no manifest names files that are gone");
                failed.extend(data);
                return failed;
            }
            failed.clear();
        }
        for p in data {
            if let Err(e) = dest.delete(&p).await {
                tracing::warn!(path = %p, error = %e, "could not remove a file of the failed run");
                failed.push(p);
            }
        }
        if !failed.is_empty() {
            // A delete whose answer was lost may have been carried out.
            if let Ok(entries) = dest.list(&dir).await {
                failed.retain(|p| {
                    let name = p.rsplit('/').next().unwrap_or(p);
                    entries.iter().any(|e| e.name == name)
                });
            }
        }
        if let Err(e) = dest.remove_dir(&dir).await {
            tracing::debug!(set = %self.set, error = %e, "set directory not removed");
        }
        failed
    }
}

/// What a look at the set directory says about a manifest whose rename
/// got no definite answer.
enum ManifestFound {
    /// `manifest.json` holds exactly the bytes written: the set is complete.
    InPlace(String),
    /// `manifest.json` is not there: the rename did not happen.
    Absent(String),
    /// It could not be found out, or something else is there.
    Unknown(String),
}

/// Looks for the manifest after its rename got no definite answer, and
/// reads it back: only the exact bytes this run wrote make the set complete.
async fn manifest_outcome(dest: &dyn Destination, dir: &str, json: &[u8]) -> ManifestFound {
    let path = format!("{dir}/{MANIFEST_FILE_NAME}");
    let entries = match dest.list(dir).await {
        Ok(e) => e,
        Err(e) => {
            return ManifestFound::Unknown(format!(
                "the set directory could not be read to find out ({e})"
            ))
        }
    };
    if !entries.iter().any(|e| e.name == MANIFEST_FILE_NAME) {
        return ManifestFound::Absent(format!(
            "looked: {path} is not there, so the set is not complete; what the run wrote is removed"
        ));
    }
    let read = async {
        let mut r = dest.open(&path).await?;
        let mut stored = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut r, &mut stored)
            .await
            .map_err(|source| DestinationError::Io {
                op: "cannot read",
                location: path.clone(),
                source,
            })?;
        Ok::<_, DestinationError>(stored)
    };
    match read.await {
        Ok(stored) if stored == json => ManifestFound::InPlace(format!(
            "looked: {path} is in place with the {} bytes this run wrote, so the set is complete",
            json.len()
        )),
        Ok(stored) => ManifestFound::Unknown(format!(
            "looked: {path} is there but holds {} bytes other than the {} this run wrote",
            stored.len(),
            json.len()
        )),
        Err(e) => ManifestFound::Unknown(format!(
            "{path} is listed but could not be read back to find out ({e})"
        )),
    }
}

/// A data file being written: compressed first when configured, then as
/// is or encrypted on the way.
struct Sink {
    /// zstd in front of `out`, for the snapshot with `compression: zstd`.
    compress: Option<Compressing>,
    out: Out,
    /// The destination and path, for errors.
    location: String,
}

/// Where a sink's (compressed) bytes go.
enum Out {
    Plain(Box<dyn Upload>),
    Sealed(Box<SealingUpload>),
}

/// A data file as stored.
struct Stored {
    /// Bytes stored.
    size: u64,
    /// SHA-256 of the stored bytes when they are not the plaintext
    /// (compressed, encrypted or both).
    sha256: Option<String>,
    /// Plaintext bytes written.
    plaintext_size: u64,
    /// Whether the stored file is age-encrypted.
    encrypted: bool,
    /// How it was compressed.
    compression: Option<Compression>,
}

impl Stored {
    /// The manifest entry, given the plaintext's name and SHA-256.
    fn entry(self, name: String, kind: FileKind, plaintext_sha256: String) -> ManifestFile {
        let Some(sha256) = self.sha256 else {
            return ManifestFile {
                name,
                kind,
                size: self.size,
                sha256: plaintext_sha256,
                compression: None,
                plaintext: None,
                pages: None,
            };
        };
        let zst = if self.compression.is_some() {
            ZST_SUFFIX
        } else {
            ""
        };
        let age = if self.encrypted { AGE_SUFFIX } else { "" };
        ManifestFile {
            name: format!("{name}{zst}{age}"),
            kind,
            size: self.size,
            sha256,
            compression: self.compression,
            plaintext: Some(PlaintextFile {
                name,
                size: self.plaintext_size,
                sha256: plaintext_sha256,
            }),
            pages: None,
        }
    }
}

impl Out {
    async fn write(&mut self, buf: &[u8]) -> Result<(), DestinationError> {
        match self {
            Out::Plain(up) => up.write(buf).await,
            Out::Sealed(up) => up.write(buf).await,
        }
    }
}

impl Sink {
    async fn write(&mut self, buf: &[u8]) -> Result<(), Cause> {
        match self.compress.as_mut() {
            None => self.out.write(buf).await?,
            Some(c) => {
                let compressed = c.write(buf).await?;
                if !compressed.is_empty() {
                    self.out.write(compressed).await?;
                }
            }
        }
        Ok(())
    }

    async fn finish(self) -> Result<Stored, Cause> {
        let Sink {
            compress,
            mut out,
            location,
        } = self;
        let compressed = match compress {
            None => None,
            Some(c) => {
                let (last, done) = c.finish().await?;
                if !last.is_empty() {
                    out.write(&last).await?;
                }
                Some(done)
            }
        };
        let compression = compressed.as_ref().map(|_| Compression::Zstd);
        match out {
            Out::Plain(up) => {
                let size = up.finish().await?;
                Ok(match compressed {
                    None => Stored {
                        size,
                        sha256: None,
                        plaintext_size: size,
                        encrypted: false,
                        compression,
                    },
                    Some(c) => {
                        if c.size != size {
                            return Err(DestinationError::SizeMismatch {
                                location,
                                sent: c.size,
                                stored: size,
                            }
                            .into());
                        }
                        Stored {
                            size,
                            sha256: Some(c.sha256),
                            plaintext_size: c.plaintext_size,
                            encrypted: false,
                            compression,
                        }
                    }
                })
            }
            Out::Sealed(up) => {
                let sealed = up.finish().await?;
                Ok(Stored {
                    size: sealed.size,
                    sha256: Some(sealed.sha256),
                    plaintext_size: compressed.map_or(sealed.plaintext_size, |c| c.plaintext_size),
                    encrypted: true,
                    compression,
                })
            }
        }
    }
}

pub use crate::store::destination::partial;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Environment;
    use crate::source::etcd::SnapshotStream;
    use crate::store::destination::faulty::{Faults, Faulty, Op};
    use crate::store::destination::LocalDir;
    use async_trait::async_trait;

    /// An in-memory member serving a fake database with a correct digest.
    struct MemorySource {
        stream: Vec<u8>,
    }

    impl MemorySource {
        fn new(pages: usize) -> Self {
            let mut stream: Vec<u8> = (0..pages * 512).map(|i| (i % 253) as u8).collect();
            let digest = Sha256::digest(&stream);
            stream.extend_from_slice(&digest);
            Self { stream }
        }
    }

    struct Chunks(std::vec::IntoIter<Vec<u8>>);

    #[async_trait]
    impl SnapshotStream for Chunks {
        async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, EtcdError> {
            Ok(self.0.next())
        }
    }

    #[async_trait]
    impl SnapshotSource for MemorySource {
        async fn member_info(&mut self) -> Result<MemberInfo, EtcdError> {
            Ok(MemberInfo {
                endpoint: "memory://".into(),
                cluster_id: 1,
                member_id: 2,
                version: "3.5.0".into(),
                revision: 9,
                db_size: (self.stream.len() - 32) as i64,
                leader: 2,
            })
        }

        async fn snapshot(&mut self) -> Result<Box<dyn SnapshotStream>, EtcdError> {
            let chunks: Vec<Vec<u8>> = self.stream.chunks(1000).map(<[u8]>::to_vec).collect();
            Ok(Box::new(Chunks(chunks.into_iter())))
        }
    }

    #[tokio::test]
    async fn a_run_cancelled_while_a_create_or_rename_is_unanswered_leaves_nothing() {
        // Three creates (snapshot, tarball, manifest partials) and three
        // renames (the two data files, then the manifest).
        let cases = (1..=3).map(|n| (n, 0)).chain((1..=3).map(|n| (0, n)));
        for (creates_at, renames_at) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let root = kubeadm_root(tmp.path());
            let base = tmp.path().join("dest");
            let cfg = config(&base, Some(&root));
            let dest = Faulty::new(
                LocalDir::open(&base).await.unwrap(),
                Faults {
                    create_silent_at: creates_at,
                    rename_silent_at: renames_at,
                    ..Faults::default()
                },
            );
            let cancel = CancellationToken::new();
            let stop = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                stop.cancel();
            });
            let plan = resources::plan(&cfg.resources).unwrap();
            let err = Run::new(&cfg, vec![Target::new("default", &dest)], Utc::now(), plan)
                .execute(&mut MemorySource::new(4), &cancel)
                .await
                .unwrap_err();
            let case = format!("create {creates_at}, rename {renames_at}");
            assert!(matches!(*err.cause, Cause::Cancelled), "{case}: {err}");
            assert!(err.not_removed.is_empty(), "{case}: {err}");
            assert!(
                all_files(&base).is_empty(),
                "{case}: left {:?}",
                all_files(&base)
            );
        }
    }

    /// A bbolt-shaped stream: a meta page naming `page_size`, then pages
    /// whose bytes come from `seed(page number)`, then etcd's digest.
    fn bbolt_source(pages: usize, page_size: usize, seed: impl Fn(usize) -> u8) -> MemorySource {
        let mut stream = vec![0u8; page_size];
        stream[16..20].copy_from_slice(&0xED0C_DAEDu32.to_le_bytes());
        stream[20..24].copy_from_slice(&2u32.to_le_bytes());
        stream[24..28].copy_from_slice(&(page_size as u32).to_le_bytes());
        // bbolt's meta pages change with every transaction.
        stream[64] = seed(0);
        // Each page unique to its position and seed (a page found at
        // another position is referenced, not stored again).
        for p in 1..pages {
            let s = seed(p);
            let start = stream.len();
            stream.extend((0..page_size).map(|i| (i as u8).wrapping_mul(31) ^ s ^ (p as u8)));
            stream[start..start + 4].copy_from_slice(&(p as u32).to_le_bytes());
            stream[start + 4] = s;
        }
        let digest = Sha256::digest(&stream);
        stream.extend_from_slice(&digest);
        MemorySource { stream }
    }

    /// Runs a paged backup of `source` at second `at` and returns its
    /// catalog entry.
    async fn paged_run(
        cfg: &Config,
        dest: &dyn Destination,
        source: &mut MemorySource,
        at: i64,
    ) -> crate::store::catalog::CatalogSet {
        let started = DateTime::<Utc>::from_timestamp(1_800_000_000 + at, 0).unwrap();
        let report = Run::new(cfg, vec![Target::new("default", dest)], started, None)
            .execute(source, &CancellationToken::new())
            .await
            .unwrap();
        crate::store::catalog::scan(dest, "c", None)
            .await
            .unwrap()
            .sets
            .into_iter()
            .find(|s| s.id.timestamp == report.set.timestamp)
            .unwrap()
    }

    fn paged_config(base: &std::path::Path, extra: &str) -> Config {
        let text = format!(
            "node_name: n\ncluster_name: c\netcd:\n  endpoints: [\"http://127.0.0.1:1\"]\nresources:\n  layout: none\ndestination:\n  local:\n    path: {}\nsnapshot_format: paged\n{extra}",
            base.display()
        );
        Config::parse(
            &text,
            &Environment {
                node_name: None,
                hostname: None,
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_paged_set_stores_only_changed_pages_and_rebuilds_byte_for_byte() {
        use crate::store::verify::{fetch_set, verify_set};
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("dest");
        let key = tmp.path().join("page-id.key");
        std::fs::write(&key, "k".repeat(40)).unwrap();
        let id = age::x25519::Identity::generate();
        let id_file = tmp.path().join("id.txt");
        std::fs::write(
            &id_file,
            format!(
                "{}\n",
                age::secrecy::ExposeSecret::expose_secret(&id.to_string())
            ),
        )
        .unwrap();
        for (name, extra) in [
            ("plain", String::new()),
            ("zstd", "compression: zstd\n".to_string()),
            (
                "zstd+age",
                format!(
                    "compression: zstd\nencryption:\n  recipients: [\"{}\"]\n  page_id_key_file: {}\n",
                    id.to_public(),
                    key.display()
                ),
            ),
        ] {
            let base = base.join(name);
            let cfg = paged_config(&base, &extra);
            let dest = LocalDir::open(&base).await.unwrap();
            let ids = cfg
                .encryption
                .as_ref()
                .map(|_| crate::encryption::load_identities(&id_file, None).unwrap());
            // 700 pages of 4 KiB: three packs' worth of segments uncompressed.
            let mut first = bbolt_source(700, 4096, |_| 1);
            let one = paged_run(&cfg, &dest, &mut first, 0).await;
            // Ten pages changed, 20 appended.
            let mut second = bbolt_source(720, 4096, |p| if p % 70 == 5 || p >= 700 { 2 } else { 1 });
            let two = paged_run(&cfg, &dest, &mut second, 1).await;
            let pages = |s: &crate::store::catalog::CatalogSet| {
                s.manifest.files[0].pages.as_deref().unwrap().clone()
            };
            let (p1, p2) = (pages(&one), pages(&two));
            assert_eq!(one.manifest.format_version, MANIFEST_FORMAT_PAGED, "{name}");
            assert_eq!((p1.pages, p1.new_pages), (700, 700), "{name}");
            assert_eq!((p2.pages, p2.new_pages), (720, 30), "{name}");
            assert_eq!(p2.compared_with, Some(one.id.timestamp), "{name}");
            assert_eq!(p2.tail.len(), 64, "{name}: etcd's digest is the tail");
            let packed = |p: &etcd_backup_proto::ManifestPages| p.added_bytes - p.index.size;
            assert!(
                packed(&p2) * 10 < packed(&p1),
                "{name}: {} vs {}",
                packed(&p2),
                packed(&p1)
            );
            assert_eq!(p2.page_ids == etcd_backup_proto::PageIds::HmacSha256, cfg.encryption.is_some());
            for (set, source) in [(&one, &first), (&two, &second)] {
                let reports = verify_set(&dest, set, ids.as_ref(), true, &|_, _, _| {})
                    .await
                    .unwrap();
                assert!(reports.iter().all(|r| r.ok()), "{name}: {reports:?}");
                let out = tmp.path().join(format!("out-{name}-{}", set.id.timestamp));
                std::fs::create_dir(&out).unwrap();
                let (reports, written) = fetch_set(&dest, set, &out, ids.as_ref(), None, &|_, _, _| {})
                    .await
                    .unwrap();
                assert!(reports.iter().all(|r| r.ok()), "{name}: {reports:?}");
                assert_eq!(written[0], out.join(set.id.timestamp.snapshot_file_name()));
                assert!(std::fs::read(&written[0]).unwrap() == source.stream, "{name}");
            }
            // Flipped bytes in a pack: verify (quick) names the pack,
            // --full cannot rebuild the snapshot. (Sixteen of them: one
            // flipped bit of zstd data may fall where it changes nothing.)
            let packs = base.join("c/n/packs");
            let pack = packs.join(&p1.packs[0].name);
            let mut bytes = std::fs::read(&pack).unwrap();
            let mid = bytes.len() / 2;
            for b in &mut bytes[mid..mid + 16] {
                *b ^= 0x5a;
            }
            std::fs::write(&pack, &bytes).unwrap();
            let reports = verify_set(&dest, &one, ids.as_ref(), false, &|_, _, _| {})
                .await
                .unwrap();
            let bad: Vec<_> = reports.iter().filter(|r| !r.ok()).collect();
            assert_eq!(bad.len(), 1, "{name}: {reports:?}");
            assert!(bad[0].problems[0].contains("not the pack its name says"), "{name}: {bad:?}");
            let full = verify_set(&dest, &one, ids.as_ref(), true, &|_, _, _| {}).await;
            assert!(
                full.as_ref().is_err() || full.as_ref().unwrap().iter().filter(|r| !r.ok()).count() >= 2,
                "{name}: {full:?}"
            );
        }
    }

    /// A bbolt-like stream whose page `k` (after the meta page, which holds
    /// `meta`) holds `contents[k - 1]` and a pattern: pages with the same
    /// content are the same bytes, wherever they are.
    fn page_source(page_size: usize, meta: u8, contents: &[u32]) -> MemorySource {
        let mut stream = bbolt_source(1, page_size, |_| meta).stream;
        stream.truncate(page_size);
        for c in contents {
            let mut page: Vec<u8> = (0..page_size).map(|i| (i as u8).wrapping_mul(31)).collect();
            page[..4].copy_from_slice(&c.to_le_bytes());
            stream.extend_from_slice(&page);
        }
        let digest = Sha256::digest(&stream);
        stream.extend_from_slice(&digest);
        MemorySource { stream }
    }

    #[tokio::test]
    async fn pages_moved_to_other_positions_are_referenced_not_stored_again_and_rebuild_byte_for_byte(
    ) {
        use crate::store::verify::fetch_set;
        let tmp = tempfile::tempdir().unwrap();
        for (name, extra) in [("plain", ""), ("zstd", "compression: zstd\n")] {
            let base = tmp.path().join(name);
            let cfg = paged_config(&base, extra);
            let dest = LocalDir::open(&base).await.unwrap();
            let first: Vec<u32> = (0..1200).collect();
            let one = paged_run(&cfg, &dest, &mut page_source(4096, 1, &first), 0).await;
            // As after a compaction: the second half's pages moved by 7
            // positions, two stretches swapped, 10 pages new, the rest in
            // place (and the meta page changed).
            let mut second = first.clone();
            second[600..].rotate_left(7);
            let (a, b) = second.split_at_mut(300);
            a[..100].swap_with_slice(&mut b[..100]);
            for (k, c) in second.iter_mut().skip(50).step_by(117).take(10).enumerate() {
                *c = 10_000 + k as u32;
            }
            let mut source = page_source(4096, 2, &second);
            let two = paged_run(&cfg, &dest, &mut source, 1).await;
            let p = two.manifest.files[0].pages.as_deref().unwrap();
            assert_eq!((p.pages, p.new_pages), (1201, 11), "{name}");
            assert_eq!(p.compared_with, Some(one.id.timestamp), "{name}");
            let out = tmp.path().join(format!("out-{name}"));
            std::fs::create_dir(&out).unwrap();
            let (reports, written) = fetch_set(&dest, &two, &out, None, None, &|_, _, _| {})
                .await
                .unwrap();
            assert!(reports.iter().all(|r| r.ok()), "{name}: {reports:?}");
            assert!(
                std::fs::read(&written[0]).unwrap() == source.stream,
                "{name}"
            );
        }
    }

    #[tokio::test]
    async fn a_previous_index_naming_a_range_its_manifest_lacks_ends_the_comparison_and_the_set_still_rebuilds(
    ) {
        use crate::store::paged::{decode_index, IndexEncoder};
        use crate::store::verify::fetch_set;
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("dest");
        let cfg = paged_config(&base, "");
        let dest = LocalDir::open(&base).await.unwrap();
        let first: Vec<u32> = (0..600).collect();
        let one = paged_run(&cfg, &dest, &mut page_source(4096, 1, &first), 0).await;
        // The first set's index rewritten (its manifest made to match) with
        // page 10's record naming a pack the manifest does not list: in the
        // first batch of pages compared, after pages that matched.
        let set_dir = base.join(one.id.dir());
        let mut pages = one.manifest.files[0].pages.as_deref().unwrap().clone();
        let index = set_dir.join(&pages.index.name);
        let mut records = Vec::new();
        decode_index(
            std::fs::File::open(&index).unwrap(),
            pages.page_size,
            pages.pages,
            "test",
            |batch| {
                records.extend(batch);
                true
            },
        )
        .unwrap();
        records[10].at.pack = 99;
        let mut enc = IndexEncoder::new(pages.page_size).unwrap();
        let mut bytes = enc.add(&records).unwrap();
        bytes.extend(enc.finish().unwrap());
        std::fs::write(&index, &bytes).unwrap();
        pages.index.size = bytes.len() as u64;
        pages.index.sha256 = hex::encode(Sha256::digest(&bytes));
        let mut manifest = one.manifest.clone();
        manifest.files[0].pages = Some(Box::new(pages));
        std::fs::write(
            set_dir.join(MANIFEST_FILE_NAME),
            serde_json::to_vec_pretty(&manifest).unwrap(),
        )
        .unwrap();

        let mut source = page_source(4096, 2, &first);
        let two = paged_run(&cfg, &dest, &mut source, 1).await;
        let p = two.manifest.files[0].pages.as_deref().unwrap();
        // Every page from the first batch on is stored anew.
        assert_eq!((p.pages, p.new_pages), (601, 601));
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let (reports, written) = fetch_set(&dest, &two, &out, None, None, &|_, _, _| {})
            .await
            .unwrap();
        assert!(reports.iter().all(|r| r.ok()), "{reports:?}");
        assert!(std::fs::read(&written[0]).unwrap() == source.stream);
    }

    #[tokio::test]
    async fn a_set_whose_pages_alternate_between_older_sets_packs_reads_each_segment_once() {
        use crate::store::destination::faulty::{Faults, Faulty};
        let tmp = tempfile::tempdir().unwrap();
        let cfg = paged_config(tmp.path(), "");
        let local = LocalDir::open(tmp.path()).await.unwrap();
        // Four sets, each changing a page in every 37 (a different one each
        // time), spread over the whole snapshot: the newest set's pages
        // alternate between the first set's segments and three sparse ones.
        let pages = 3000;
        let mut sets = Vec::new();
        let mut last = None;
        for round in 0..4u8 {
            let mut source = bbolt_source(pages, 4096, |p| {
                (0..=round)
                    .filter(|r| p % 37 == usize::from(*r) * 9 + 1)
                    .map(|r| r + 2)
                    .max()
                    .unwrap_or(1)
            });
            sets.push(paged_run(&cfg, &local, &mut source, i64::from(round)).await);
            last = Some(source);
        }
        let newest = sets.last().unwrap();
        let p = newest.manifest.files[0].pages.as_deref().unwrap();
        assert!(p.packs.len() >= 4, "{:?}", p.packs);
        assert!(p.new_pages < pages as u64 / 20, "{}", p.new_pages);

        // Read as from a distant store: 8 ranges at once.
        let dest = Faulty::new(
            LocalDir::open(tmp.path()).await.unwrap(),
            Faults {
                ranges_in_flight: Some(8),
                ..Faults::default()
            },
        );
        let mut reader =
            crate::store::paged::reader::open_snapshot(&dest, &newest.id, p, false, false, None)
                .await
                .unwrap();
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut got)
            .await
            .unwrap();
        assert!(
            got == last.unwrap().stream,
            "the snapshot rebuilt byte for byte"
        );
        let ranges = dest.ranges_read();
        let distinct: std::collections::HashSet<_> = ranges.iter().cloned().collect();
        assert_eq!(
            ranges.len(),
            distinct.len(),
            "a segment was read twice: {ranges:?}"
        );
    }

    #[tokio::test]
    async fn prune_collects_only_packs_no_complete_set_names_and_only_when_every_manifest_reads() {
        use crate::store::prune::prune;
        use crate::store::verify::verify_set;
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("dest");
        let cfg = paged_config(&base, "retention:\n  keep_last: 1\n");
        let dest = LocalDir::open(&base).await.unwrap();
        // Three sets: the second changes every page, the third a tenth of
        // them; so only the first set names the first pack.
        let mut sets = Vec::new();
        for round in 0..3u8 {
            let mut src = bbolt_source(600, 4096, move |p| match round {
                0 => 1,
                1 => 2,
                _ if p % 10 == 0 => 3,
                _ => 2,
            });
            sets.push(paged_run(&cfg, &dest, &mut src, i64::from(round)).await);
        }
        let packs_of = |s: &crate::store::catalog::CatalogSet| -> Vec<String> {
            s.manifest.files[0]
                .pages
                .as_ref()
                .unwrap()
                .packs
                .iter()
                .map(|p| p.name.clone())
                .collect()
        };
        let packs_dir = base.join("c/n/packs");
        let on_disk = || -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(&packs_dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        assert_eq!(on_disk().len(), 3, "{:?}", on_disk());
        // Beside the packs: files this agent did not write, and a pack of a
        // run in flight.
        let foreign = ["notes.txt".to_string(), format!("{}.pack", "A".repeat(64))];
        for f in &foreign {
            std::fs::write(packs_dir.join(f), b"x").unwrap();
        }
        let in_flight = format!("{}_0.pack.partial", SetTimestamp::new(Utc::now()));
        std::fs::write(packs_dir.join(&in_flight), b"x").unwrap();
        // As an S3 run leaves a pack between its two renames.
        let staged = format!("{}_1.pack", SetTimestamp::new(Utc::now()));
        std::fs::write(packs_dir.join(&staged), b"x").unwrap();

        // Young packs are never collected: a run may be about to name them.
        let r = prune(&dest, &cfg, "n", Utc::now(), None, false)
            .await
            .unwrap();
        assert_eq!(r.removed_sets.len(), 2, "{r:?}");
        assert!(r.packs.removed.is_empty(), "{:?}", r.packs);
        assert_eq!(r.packs.referenced + r.packs.young, 5, "{:?}", r.packs);

        // A set whose manifest cannot be read stops collection outright.
        let odd = base.join("c/n/2027-01-01_000000");
        std::fs::create_dir_all(&odd).unwrap();
        std::fs::write(odd.join("manifest.json"), b"{ not json").unwrap();
        let later = Utc::now() + chrono::Duration::days(2);
        let r = prune(&dest, &cfg, "n", later, None, true).await.unwrap();
        assert!(
            r.packs.blocked.as_deref().unwrap().contains("cannot read"),
            "{:?}",
            r.packs
        );
        assert!(r.packs.removed.is_empty());
        let err = crate::store::prune::after_backup(&cfg, &dest).await;
        assert!(
            err.is_err(),
            "a blocked collection counts as a retention failure"
        );
        std::fs::remove_dir_all(&odd).unwrap();

        // Old enough, every manifest read: what only the removed sets named goes.
        let dry = prune(&dest, &cfg, "n", later, None, true).await.unwrap();
        let r = prune(&dest, &cfg, "n", later, None, false).await.unwrap();
        assert_eq!(
            dry.packs.removed, r.packs.removed,
            "the dry run shows what goes"
        );
        assert_eq!(
            r.packs.removed,
            packs_of(&sets[0])
                .iter()
                .map(|p| format!("c/n/packs/{p}"))
                .collect::<Vec<_>>(),
            "{:?}",
            r.packs
        );
        let mut gone = r.packs.removed_partials.clone();
        gone.sort();
        assert_eq!(
            gone,
            [
                format!("c/n/packs/{in_flight}"),
                format!("c/n/packs/{staged}")
            ]
        );
        let mut left = packs_of(&sets[2]);
        left.extend(foreign.iter().cloned());
        left.sort();
        left.dedup();
        assert_eq!(on_disk(), left);
        assert_eq!(r.packs.foreign.len(), 2, "{:?}", r.packs);
        let reports = verify_set(&dest, &sets[2], None, true, &|_, _, _| {})
            .await
            .unwrap();
        assert!(reports.iter().all(|r| r.ok()), "{reports:?}");
    }

    fn config(dest: &std::path::Path, root: Option<&std::path::Path>) -> Config {
        let resources = match root {
            Some(r) => format!("resources:\n  layout: kubeadm\n  root: {}\n", r.display()),
            None => "resources:\n  layout: none\n".to_string(),
        };
        let text = format!(
            "node_name: n\ncluster_name: c\netcd:\n  endpoints: [\"http://127.0.0.1:1\"]\n{resources}destination:\n  local:\n    path: {}\n",
            dest.display()
        );
        Config::parse(
            &text,
            &Environment {
                node_name: None,
                hostname: None,
            },
        )
        .unwrap()
    }

    fn kubeadm_root(dir: &std::path::Path) -> std::path::PathBuf {
        let root = dir.join("k8s");
        std::fs::create_dir_all(root.join("manifests")).unwrap();
        std::fs::create_dir_all(root.join("pki")).unwrap();
        std::fs::write(
            root.join("manifests/kube-apiserver.yaml"),
            "- kube-apiserver\n",
        )
        .unwrap();
        std::fs::write(root.join("pki/ca.crt"), "CA").unwrap();
        root
    }

    fn all_files(dir: &std::path::Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered_within_half() {
        let r = crate::config::RetryConfig {
            attempts: 10,
            initial_delay: Duration::from_secs(5),
            max_delay: Duration::from_secs(60),
        };
        assert_eq!(backoff(&r, 1, 0.999_999).as_secs(), 4); // just under 5s
        assert_eq!(backoff(&r, 1, 0.0), Duration::from_millis(2500));
        assert_eq!(backoff(&r, 2, 0.0), Duration::from_secs(5));
        assert_eq!(backoff(&r, 3, 0.0), Duration::from_secs(10));
        assert_eq!(backoff(&r, 5, 0.0), Duration::from_secs(30));
        assert_eq!(backoff(&r, 6, 0.0), Duration::from_secs(30));
        assert_eq!(backoff(&r, 40, 1.0), Duration::from_secs(60));
        for attempt in 1..8 {
            for unit in [0.0, 0.3, 0.7, 0.99] {
                let d = backoff(&r, attempt, unit);
                assert!(d >= Duration::from_millis(2500) && d <= Duration::from_secs(60));
            }
        }
    }

    #[tokio::test]
    async fn complete_set_has_both_files_and_the_manifest_last() {
        let tmp = tempfile::tempdir().unwrap();
        let root = kubeadm_root(tmp.path());
        let base = tmp.path().join("dest");
        let cfg = config(&base, Some(&root));
        let dest = LocalDir::open(&base).await.unwrap();
        let mut source = MemorySource::new(8);
        let report = run_with_source(&cfg, &mut source, &dest).await.unwrap();
        let ts = report.set.timestamp;
        let files = all_files(&base.join(report.set.dir()));
        assert_eq!(
            files,
            vec![
                "manifest.json".to_string(),
                ts.snapshot_file_name(),
                ts.resources_file_name()
            ]
        );
        let m = &report.manifest;
        assert_eq!(m.files[0].size, source.stream.len() as u64);
        assert_eq!(
            m.files[0].sha256,
            hex::encode(Sha256::digest(&source.stream))
        );
        assert_eq!(
            (m.etcd.revision, m.etcd.member_id.as_str()),
            (9, "0000000000000002")
        );
        let stages: Vec<&str> = report.stages.iter().map(|s| s.stage.as_str()).collect();
        assert_eq!(
            stages,
            ["connect", "snapshot", "resources", "upload", "manifest"]
        );
    }

    #[tokio::test]
    async fn each_destination_gets_its_own_complete_copy_or_none_from_one_read() {
        let tmp = tempfile::tempdir().unwrap();
        let root = kubeadm_root(tmp.path());
        let (a, b, c) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("c"),
        );
        let cfg = config(&a, Some(&root));
        let good = LocalDir::open(&a).await.unwrap();
        let broken = Faulty::new(
            LocalDir::open(&b).await.unwrap(),
            Faults {
                rename_fails_at: 2,
                ..Faults::default()
            },
        );
        let unsynced = Faulty::new(
            LocalDir::open(&c).await.unwrap(),
            Faults {
                unsynced_required: Some(false),
                ..Faults::default()
            },
        );
        let targets = vec![
            Target::new("a", &good),
            Target::new("b", &broken),
            Target::new("c", &unsynced),
        ];
        let mut source = MemorySource::new(64);
        let plan = resources::plan(&cfg.resources).unwrap();
        let report = Run::new(&cfg, targets, Utc::now(), plan)
            .execute(&mut source, &CancellationToken::new())
            .await
            .unwrap();
        assert!(report.is_partial());
        let names: Vec<(&str, bool)> = report
            .destinations
            .iter()
            .map(|d| (d.name.as_str(), d.succeeded()))
            .collect();
        assert_eq!(names, [("a", true), ("b", false), ("c", true)]);
        match &report.destinations[1].result {
            DestinationResult::Failed { stage, error } => {
                assert_eq!(*stage, Stage::Upload);
                assert!(error.contains("connection reset"), "{error}");
            }
            other => panic!("b: {other:?}"),
        }
        assert_eq!(
            report.destinations[2].result,
            DestinationResult::Succeeded { durable: false }
        );
        // The failed destination holds nothing of the run; the others the
        // same files, byte for byte, each with its own manifest.
        assert!(all_files(&b).is_empty(), "{:?}", all_files(&b));
        let dir = report.set.dir();
        assert_eq!(all_files(&a.join(&dir)), all_files(&c.join(&dir)));
        let snapshot = report.set.timestamp.snapshot_file_name();
        let stored = std::fs::read(a.join(&dir).join(&snapshot)).unwrap();
        assert_eq!(stored, source.stream);
        assert_eq!(std::fs::read(c.join(&dir).join(&snapshot)).unwrap(), stored);
        let manifest = |d: &std::path::Path| {
            std::fs::read_to_string(d.join(&dir).join(MANIFEST_FILE_NAME)).unwrap()
        };
        assert!(!manifest(&a).contains("durable"), "{}", manifest(&a));
        assert!(
            manifest(&c).contains("\"durable\": false"),
            "{}",
            manifest(&c)
        );
    }

    #[tokio::test]
    async fn when_every_destination_fails_the_run_fails_and_names_each() {
        let tmp = tempfile::tempdir().unwrap();
        let root = kubeadm_root(tmp.path());
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let cfg = config(&a, Some(&root));
        let faults = Faults {
            rename_fails_at: 1,
            ..Faults::default()
        };
        let one = Faulty::new(LocalDir::open(&a).await.unwrap(), faults);
        let two = Faulty::new(
            LocalDir::open(&b).await.unwrap(),
            Faults {
                unsynced_required: Some(true),
                ..Faults::default()
            },
        );
        let plan = resources::plan(&cfg.resources).unwrap();
        let err = Run::new(
            &cfg,
            vec![Target::new("one", &one), Target::new("two", &two)],
            Utc::now(),
            plan,
        )
        .execute(&mut MemorySource::new(8), &CancellationToken::new())
        .await
        .unwrap_err();
        assert_eq!(err.stage, Stage::Upload);
        let text = err.to_string();
        assert!(text.contains("one ("), "{text}");
        assert!(
            text.contains("two (") && text.contains("require_fsync"),
            "{text}"
        );
        assert!(err.destinations.iter().all(|d| !d.succeeded()));
        assert!(all_files(&a).is_empty(), "{:?}", all_files(&a));
        assert!(all_files(&b).is_empty(), "{:?}", all_files(&b));
    }

    #[tokio::test]
    async fn a_destination_that_cannot_sync_is_refused_before_writing_or_recorded_not_durable() {
        let tmp = tempfile::tempdir().unwrap();
        let root = kubeadm_root(tmp.path());
        let base = tmp.path().join("dest");
        let cfg = config(&base, Some(&root));

        let refused = Faulty::new(
            LocalDir::open(&base).await.unwrap(),
            Faults {
                unsynced_required: Some(true),
                ..Faults::default()
            },
        );
        let err = run_with_source(&cfg, &mut MemorySource::new(4), &refused)
            .await
            .unwrap_err();
        assert_eq!(err.stage, Stage::Upload);
        assert!(!err.is_transient(), "retrying cannot make a server sync");
        assert!(
            err.to_string().contains("destination.sftp.require_fsync"),
            "{err}"
        );
        assert!(all_files(&base).is_empty(), "{:?}", all_files(&base));

        let allowed = Faulty::new(
            LocalDir::open(&base).await.unwrap(),
            Faults {
                unsynced_required: Some(false),
                ..Faults::default()
            },
        );
        let report = run_with_source(&cfg, &mut MemorySource::new(4), &allowed)
            .await
            .unwrap();
        assert!(!report.manifest.durable);
        // An optional field older readers may ignore: not a format change.
        assert_eq!(report.manifest.format_version, MANIFEST_FORMAT_PLAIN);
        let stored =
            std::fs::read_to_string(base.join(report.set.dir()).join(MANIFEST_FILE_NAME)).unwrap();
        assert!(stored.contains("\"durable\": false"), "{stored}");

        // A destination that syncs writes no `durable` field at all.
        let synced = tempfile::tempdir().unwrap();
        let cfg = config(synced.path(), Some(&root));
        let dest = LocalDir::open(synced.path()).await.unwrap();
        let report = run_with_source(&cfg, &mut MemorySource::new(4), &dest)
            .await
            .unwrap();
        assert!(report.manifest.durable);
        let stored = std::fs::read_to_string(
            synced
                .path()
                .join(report.set.dir())
                .join(MANIFEST_FILE_NAME),
        )
        .unwrap();
        assert!(!stored.contains("durable"), "{stored}");
    }

    #[tokio::test]
    async fn a_set_directory_that_cannot_be_synced_is_recorded_files_synced_not_durable() {
        let tmp = tempfile::tempdir().unwrap();
        let root = kubeadm_root(tmp.path());
        let base = tmp.path().join("dest");
        let cfg = config(&base, Some(&root));
        let dest = Faulty::new(
            LocalDir::open(&base).await.unwrap(),
            Faults {
                dir_sync_refused_from: 1,
                ..Faults::default()
            },
        );
        let report = run_with_source(&cfg, &mut MemorySource::new(4), &dest)
            .await
            .unwrap();
        assert!(!report.manifest.durable);
        assert_eq!(
            report.manifest.durability,
            Some(DurabilityLevel::FilesSynced)
        );
        assert_eq!(
            report.destinations[0].result,
            DestinationResult::Succeeded { durable: false }
        );
        let stored =
            std::fs::read_to_string(base.join(report.set.dir()).join(MANIFEST_FILE_NAME)).unwrap();
        assert!(stored.contains("\"durable\": false"), "{stored}");
        assert!(
            stored.contains("\"durability\": \"files_synced\""),
            "{stored}"
        );
    }

    #[tokio::test]
    async fn a_set_directory_sync_that_fails_fails_the_run_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = kubeadm_root(tmp.path());
        // 1: after the data renames; 2: after the manifest's, which already
        // says durable, so a refusal there fails the run as a reset does.
        let cases = [
            ("reset after the data renames", Stage::Upload, 1, 0),
            ("reset after the manifest", Stage::Manifest, 2, 0),
            ("refused after the manifest", Stage::Manifest, 0, 2),
        ];
        for (case, stage, fails_at, refused_from) in cases {
            let base = tmp.path().join(case.replace(' ', "_"));
            let cfg = config(&base, Some(&root));
            let dest = Faulty::new(
                LocalDir::open(&base).await.unwrap(),
                Faults {
                    dir_sync_fails_at: fails_at,
                    dir_sync_refused_from: refused_from,
                    ..Faults::default()
                },
            );
            let err = run_with_source(&cfg, &mut MemorySource::new(4), &dest)
                .await
                .unwrap_err();
            assert_eq!(err.stage, stage, "{case}: {err}");
            assert!(
                err.to_string().contains("sync"),
                "{case}: the error does not name the sync: {err}"
            );
            assert!(
                all_files(&base).is_empty(),
                "{case}: {:?}",
                all_files(&base)
            );
        }
    }

    #[tokio::test]
    async fn a_compressed_snapshot_is_stored_as_db_zst_and_reads_back_as_the_plain_stream() {
        use crate::store::verify::{fetch_set, verify_set};
        let tmp = tempfile::tempdir().unwrap();
        let root = kubeadm_root(tmp.path());
        let base = tmp.path().join("dest");
        let mut cfg = config(&base, Some(&root));
        cfg.compression = Some(crate::config::CompressionConfig {
            algorithm: Compression::Zstd,
            level: 1,
        });
        let dest = LocalDir::open(&base).await.unwrap();
        let mut source = MemorySource::new(4096);
        let report = run_with_source(&cfg, &mut source, &dest).await.unwrap();
        let m = &report.manifest;
        let ts = report.set.timestamp;
        assert_eq!(m.format_version, MANIFEST_FORMAT_COMPRESSED);
        assert_eq!(
            m.compression,
            Some(ManifestCompression {
                algorithm: Compression::Zstd,
                level: 1
            })
        );
        let snap = &m.files[0];
        assert_eq!(snap.name, format!("{}.zst", ts.snapshot_file_name()));
        assert_eq!(snap.compression, Some(Compression::Zstd));
        let plain = snap.plaintext.as_ref().unwrap();
        assert_eq!(plain.name, ts.snapshot_file_name());
        assert_eq!(plain.size, source.stream.len() as u64);
        assert_eq!(plain.sha256, hex::encode(Sha256::digest(&source.stream)));
        let stored_path = base.join(report.set.dir()).join(&snap.name);
        let stored = std::fs::read(&stored_path).unwrap();
        assert!(stored.len() * 4 < source.stream.len(), "{}", stored.len());
        assert_eq!(snap.sha256, hex::encode(Sha256::digest(&stored)));
        assert!(zstd::stream::decode_all(&stored[..]).unwrap() == source.stream);
        // The tarball is gzip already: stored as is.
        assert_eq!(m.files[1].name, ts.resources_file_name());
        assert_eq!(m.files[1].compression, None);
        assert!(m.files[1].plaintext.is_none());

        let set = crate::store::catalog::scan(&dest, "c", None)
            .await
            .unwrap()
            .sets
            .remove(0);
        assert_eq!(set.summary().compression, "zstd");
        let reports = verify_set(&dest, &set, None, true, &|_, _, _| {})
            .await
            .unwrap();
        assert!(reports.iter().all(|r| r.ok()), "{reports:?}");
        assert!(reports[0].decompressed);
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let (reports, written) = fetch_set(&dest, &set, &out, None, None, &|_, _, _| {})
            .await
            .unwrap();
        assert!(reports.iter().all(|r| r.ok()), "{reports:?}");
        assert_eq!(written[0], out.join(ts.snapshot_file_name()));
        assert!(std::fs::read(&written[0]).unwrap() == source.stream);

        // One flipped byte in the middle of the stored file.
        let mut bad = stored.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x01;
        std::fs::write(&stored_path, &bad).unwrap();
        let reports = verify_set(&dest, &set, None, true, &|_, _, _| {})
            .await
            .unwrap();
        assert!(!reports[0].ok());
        assert!(
            reports[0].problems[0].starts_with("sha256 is "),
            "{:?}",
            reports[0].problems
        );
        let out = tmp.path().join("out2");
        std::fs::create_dir(&out).unwrap();
        let (reports, written) = fetch_set(&dest, &set, &out, None, None, &|_, _, _| {})
            .await
            .unwrap();
        assert!(!reports[0].ok());
        assert!(!written.contains(&out.join(ts.snapshot_file_name())));
        assert!(!out.join(ts.snapshot_file_name()).exists());

        // A valid frame of far more than the manifest's plaintext (a server
        // swapping files after listing) is cut off at the recorded size.
        let bomb = zstd::stream::encode_all(&vec![0u8; source.stream.len() * 8][..], 1).unwrap();
        std::fs::write(&stored_path, &bomb).unwrap();
        let out = tmp.path().join("out3");
        std::fs::create_dir(&out).unwrap();
        let seen = std::sync::atomic::AtomicU64::new(0);
        let (reports, _) = fetch_set(&dest, &set, &out, None, None, &|_, _, _| {
            let partial = out.join(format!("{}.partial", ts.snapshot_file_name()));
            if let Ok(m) = std::fs::metadata(partial) {
                seen.fetch_max(m.len(), std::sync::atomic::Ordering::Relaxed);
            }
        })
        .await
        .unwrap();
        assert!(
            reports[0]
                .problems
                .iter()
                .any(|p| p.contains("decompresses to more than")),
            "{:?}",
            reports[0].problems
        );
        assert!(seen.into_inner() <= source.stream.len() as u64);
        assert!(!out.join(ts.snapshot_file_name()).exists());
    }

    #[tokio::test]
    async fn failure_while_publishing_removes_everything_the_run_wrote() {
        for fail_at in 1..=3 {
            let tmp = tempfile::tempdir().unwrap();
            let root = kubeadm_root(tmp.path());
            let base = tmp.path().join("dest");
            let cfg = config(&base, Some(&root));
            let dest = Faulty::new(
                LocalDir::open(&base).await.unwrap(),
                Faults {
                    rename_fails_at: fail_at,
                    ..Faults::default()
                },
            );
            let err = run_with_source(&cfg, &mut MemorySource::new(4), &dest)
                .await
                .unwrap_err();
            let want = if fail_at == 3 {
                Stage::Manifest
            } else {
                Stage::Upload
            };
            assert_eq!(err.stage, want, "rename {fail_at}");
            assert!(err.is_transient(), "a reset connection is worth a retry");
            assert!(
                all_files(&base).is_empty(),
                "rename {fail_at}: left {:?}",
                all_files(&base)
            );
        }
    }

    /// The invariant of the set protocol at a destination: either a set
    /// whose manifest names exactly the files there, each with its size and
    /// SHA-256 (it verifies), or nothing of the run at all. `Ok` says which.
    fn complete_or_nothing(base: &std::path::Path) -> Result<&'static str, String> {
        let files = all_files(base);
        if files.is_empty() {
            return Ok("nothing");
        }
        let Some(manifest_path) = files.iter().find(|f| f.ends_with("/manifest.json")) else {
            return Err(format!("data files without a manifest: {files:?}"));
        };
        let dir = manifest_path.trim_end_matches("manifest.json");
        let manifest: Manifest =
            serde_json::from_slice(&std::fs::read(base.join(manifest_path)).unwrap())
                .map_err(|e| format!("{manifest_path}: {e}"))?;
        let mut want: Vec<String> = manifest
            .files
            .iter()
            .map(|f| format!("{dir}{}", f.name))
            .collect();
        want.push(manifest_path.clone());
        want.sort();
        if want != files {
            return Err(format!("manifest names {want:?}, found {files:?}"));
        }
        for f in &manifest.files {
            let bytes = std::fs::read(base.join(format!("{dir}{}", f.name))).unwrap();
            if bytes.len() as u64 != f.size || hex::encode(Sha256::digest(&bytes)) != f.sha256 {
                return Err(format!("{} does not match its manifest entry", f.name));
            }
        }
        Ok("complete")
    }

    /// One run against a destination that loses the reply to the n-th
    /// `op` after carrying it out (and, for deletes, refuses the manifest's
    /// rename with a reset so that clean-up runs). `None` when the run
    /// never made that many calls.
    async fn with_lost_reply(
        op: Op,
        n: usize,
        blind: bool,
    ) -> Option<(
        Result<BackupReport, BackupError>,
        Result<&'static str, String>,
    )> {
        let tmp = tempfile::tempdir().unwrap();
        let root = kubeadm_root(tmp.path());
        let base = tmp.path().join("dest");
        let cfg = config(&base, Some(&root));
        let dest = Faulty::new(
            LocalDir::open(&base).await.unwrap(),
            Faults {
                reply_lost: Some((op, n)),
                blind_after_lost: blind,
                rename_fails_at: if op == Op::Delete { 3 } else { 0 },
                ..Faults::default()
            },
        );
        let result = run_with_source(&cfg, &mut MemorySource::new(4), &dest).await;
        if !dest.reply_was_lost() {
            return None;
        }
        Some((result, complete_or_nothing(&base)))
    }

    #[tokio::test]
    async fn a_reply_lost_after_any_operation_leaves_a_complete_set_or_nothing() {
        for op in Op::ALL {
            let mut fired = 0;
            for n in 1..=64 {
                let Some((result, left)) = with_lost_reply(op, n, false).await else {
                    break;
                };
                fired += 1;
                let case = format!("{op:?} #{n}");
                let left = left.unwrap_or_else(|e| panic!("{case}: {e}"));
                match (&result, op) {
                    // A rename carried out is found in place: the run goes on.
                    (Ok(report), Op::Rename) => {
                        assert_eq!(left, "complete", "{case}: {}", report.location);
                    }
                    (Ok(_), _) => panic!("{case}: a lost reply must fail the run"),
                    (Err(e), _) => {
                        assert_eq!(left, "nothing", "{case}: {e}");
                        assert!(e.not_removed.is_empty(), "{case}: {e}");
                    }
                }
            }
            assert!(fired > 0, "{op:?}: the fault never fired");
        }
    }

    #[tokio::test]
    async fn a_lost_reply_to_the_manifest_rename_keeps_the_set_when_it_cannot_be_checked() {
        // The three renames: two data files, then the manifest.
        let (result, left) = with_lost_reply(Op::Rename, 3, true).await.unwrap();
        let err = result.unwrap_err();
        assert_eq!(err.stage, Stage::Manifest, "{err}");
        assert_eq!(left, Ok("complete"), "{err}");
        let text = err.to_string();
        assert!(text.contains("may be complete"), "{text}");
        assert!(text.contains("verify"), "{text}");
        // A data file's rename: no manifest exists, so all of it goes.
        for n in 1..=2 {
            let (result, left) = with_lost_reply(Op::Rename, n, true).await.unwrap();
            let err = result.unwrap_err();
            assert_eq!(left, Ok("nothing"), "rename {n}: {err}");
            assert!(err.to_string().contains("could not be read"), "{err}");
        }
    }
}
