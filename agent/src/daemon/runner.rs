//! One backup at a time: the single-flight gate every trigger goes through,
//! and the memory of recent runs the HTTP API shows.
//!
//! A trigger asks [`Runner::start`]; it gets a new run, or the id of the run
//! already in progress. Each run is a task with a span carrying its id, so every
//! log line of the run names it, and updates the metrics when it ends.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use etcd_backup_proto::api::{
    DestinationRecord, DestinationResultKind, RunRecord, RunSkipReason, RunState, StageRecord,
    Trigger,
};
use etcd_backup_proto::FileKind;

use crate::backup::{self, Outcome};
use crate::config::Config;
use crate::daemon::metrics::{Metrics, SuccessFigures};
use crate::daemon::unchanged::{self, CurrentSet, Verdict};
use crate::store::catalog::ManifestCache;

/// Finished runs kept in memory for `GET /v1/backups`.
pub const HISTORY: usize = 50;

/// Why a run was not started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// Another run is in progress.
    #[error("backup {id} is already in progress")]
    InProgress {
        /// The run in progress.
        id: String,
    },
    /// The daemon is shutting down.
    #[error("the agent is shutting down and starts no new backups")]
    ShuttingDown,
}

/// A run that was started (or is in progress), with a way to wait for its end.
#[derive(Debug, Clone)]
pub struct RunHandle {
    /// The run as it was when the handle was made.
    pub record: RunRecord,
    done: watch::Receiver<Option<RunRecord>>,
}

impl RunHandle {
    /// Waits for the run to finish and returns its final record.
    pub async fn finished(mut self) -> RunRecord {
        loop {
            if let Some(r) = self.done.borrow_and_update().clone() {
                return r;
            }
            if self.done.changed().await.is_err() {
                // The run task is gone without a word: report what we have.
                let mut r = self.record.clone();
                r.state = RunState::Failed;
                r.error = Some("the run ended without reporting a result".into());
                return r;
            }
        }
    }
}

struct State {
    accepting: bool,
    current: Option<RunHandle>,
    history: VecDeque<RunRecord>,
}

/// The single-flight gate and run history.
pub struct Runner {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    next_id: AtomicU64,
    tracker: TaskTracker,
    /// Cancels the run in progress (when shutdown's grace runs out).
    abort: CancellationToken,
    /// Called after every run with whether it succeeded (readiness, catalog refresh).
    on_finish: Box<dyn Fn(bool) + Send + Sync>,
    /// The manifests `skip_unchanged`'s checks have read, per destination.
    unchanged_caches: Mutex<Vec<ManifestCache>>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").finish_non_exhaustive()
    }
}

impl Runner {
    /// A runner for `config`, reporting to `metrics`.
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        on_finish: impl Fn(bool) + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            metrics,
            state: Mutex::new(State {
                accepting: true,
                current: None,
                history: VecDeque::new(),
            }),
            next_id: AtomicU64::new(1),
            tracker: TaskTracker::new(),
            abort: CancellationToken::new(),
            on_finish: Box::new(on_finish),
            unchanged_caches: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data; keep serving it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a run unless one is in progress or the daemon is shutting down.
    ///
    /// # Errors
    /// [`StartError::InProgress`] with the running id, [`StartError::ShuttingDown`].
    pub fn start(self: &Arc<Self>, trigger: Trigger) -> Result<RunHandle, StartError> {
        let mut state = self.lock();
        if !state.accepting {
            return Err(StartError::ShuttingDown);
        }
        if let Some(current) = &state.current {
            return Err(StartError::InProgress {
                id: current.record.id.clone(),
            });
        }
        let started_at = Utc::now();
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", started_at.format("%Y%m%dT%H%M%SZ"));
        let record = RunRecord {
            id: id.clone(),
            state: RunState::Running,
            trigger,
            started_at,
            finished_at: None,
            attempts: 0,
            stages: Vec::new(),
            set: None,
            location: None,
            revision: None,
            failed_stage: None,
            error: None,
            skip_reason: None,
            destinations: Vec::new(),
        };
        let (tx, rx) = watch::channel(None);
        let handle = RunHandle {
            record: record.clone(),
            done: rx,
        };
        state.current = Some(handle.clone());
        drop(state);

        self.metrics.run_started(started_at);
        let runner = Arc::clone(self);
        let span = tracing::info_span!("run", id = %id, trigger = trigger.as_str());
        self.tracker.spawn(
            async move {
                tracing::info!("backup started");
                if let Some((revision, sets)) = runner.unchanged(trigger).await {
                    let finished = runner.finish_skipped(record, revision, &sets);
                    let _ = tx.send(Some(finished));
                    return;
                }
                let t = Instant::now();
                let outcome =
                    backup::run_with_retries(&runner.config, &runner.abort.child_token()).await;
                runner.retention_failed(&outcome.retention_errors);
                let finished = runner.finish(record, outcome, t.elapsed());
                let _ = tx.send(Some(finished));
            }
            .instrument(span),
        );
        Ok(handle)
    }

    /// With `skip_unchanged`, for a run the daemon started itself: etcd's
    /// revision and each destination's current set when no destination
    /// needs a new set; `None` (back up) otherwise, or when that cannot be
    /// found out.
    async fn unchanged(&self, trigger: Trigger) -> Option<(i64, Vec<CurrentSet>)> {
        if !self.config.daemon.skip_unchanged
            || !matches!(trigger, Trigger::Schedule | Trigger::Startup)
        {
            return None;
        }
        // Runs are one at a time: the caches are taken for the check and
        // put back after it (lost, harmlessly, if it is cancelled).
        let mut caches = std::mem::take(
            &mut *self
                .unchanged_caches
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let verdict = tokio::select! {
            v = unchanged::check(&self.config, &mut caches) => v,
            () = self.abort.cancelled() => return None,
        };
        *self
            .unchanged_caches
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = caches;
        match verdict {
            Verdict::Unchanged { revision, sets } => Some((revision, sets)),
            Verdict::Changed { destination, why } => {
                tracing::info!(destination = %destination, reason = %why, "a new set is needed (skip_unchanged): backing up");
                None
            }
            Verdict::Unknown { error } => {
                tracing::warn!(error = %error, "cannot tell whether etcd changed since the newest complete set (skip_unchanged); backing up");
                None
            }
        }
    }

    /// A run that stored nothing because every destination's newest set
    /// already holds etcd's `revision`.
    fn finish_skipped(
        &self,
        mut record: RunRecord,
        revision: i64,
        sets: &[CurrentSet],
    ) -> RunRecord {
        let now = Utc::now();
        record.finished_at = Some(now);
        record.state = RunState::Skipped;
        record.skip_reason = Some(RunSkipReason::Unchanged);
        record.revision = Some(revision);
        record.set = sets.first().map(|s| s.set.clone());
        let names: Vec<&str> = sets.iter().map(|s| s.destination.as_str()).collect();
        self.metrics.run_skipped_unchanged(now, &names);
        let current: Vec<String> = sets
            .iter()
            .map(|s| format!("{}: {}", s.destination, s.set))
            .collect();
        tracing::info!(
            revision,
            sets = %current.join(", "),
            "backup skipped: etcd's revision is the newest complete set's at every destination (skip_unchanged)"
        );
        {
            let mut state = self.lock();
            state.current = None;
            state.history.push_front(record.clone());
            state.history.truncate(HISTORY);
        }
        (self.on_finish)(true);
        record
    }

    /// Retention ran at each destination that holds the run's set (see
    /// [`backup::run_with_retries`]); a failure is logged and counted, the
    /// run itself stays a success (its set is complete).
    fn retention_failed(&self, errors: &[(String, String)]) {
        for (name, e) in errors {
            self.metrics.retention_failed(name);
            tracing::error!(destination = %name, error = %e, "applying retention failed");
        }
    }

    fn finish(&self, mut record: RunRecord, outcome: Outcome, took: Duration) -> RunRecord {
        let now = Utc::now();
        record.finished_at = Some(now);
        record.attempts = outcome.attempts;
        match outcome.result {
            Ok(report) => {
                record.state = if report.is_partial() {
                    RunState::Partial
                } else {
                    RunState::Succeeded
                };
                record.destinations = destination_records(&report.destinations);
                if report.is_partial() {
                    let failed: Vec<&backup::DestinationOutcome> = report
                        .destinations
                        .iter()
                        .filter(|d| !d.succeeded())
                        .collect();
                    record.failed_stage = failed.first().and_then(|d| match &d.result {
                        backup::DestinationResult::Failed { stage, .. } => {
                            Some(stage.as_str().to_string())
                        }
                        backup::DestinationResult::Succeeded { .. } => None,
                    });
                    record.error = Some(partial_message(&report.destinations));
                }
                record.stages = report
                    .stages
                    .iter()
                    .map(|s| StageRecord {
                        stage: s.stage.as_str().to_string(),
                        bytes: s.bytes,
                        duration_seconds: s.duration.as_secs_f64(),
                    })
                    .collect();
                record.set = Some(report.set.dir());
                record.location = Some(report.location.clone());
                record.revision = Some(report.manifest.revision());
                let size = |kind| report.manifest.file(kind).map(|f| f.size);
                self.metrics.run_succeeded(
                    record.trigger,
                    took,
                    now,
                    &SuccessFigures {
                        snapshot_bytes: size(FileKind::Snapshot).unwrap_or(0),
                        resources_bytes: size(FileKind::Resources),
                        revision: report.manifest.revision(),
                        rollout_in_progress: !report.manifest.rollout_in_progress.is_empty(),
                    },
                    &report.destinations,
                );
                if report.is_partial() {
                    tracing::error!(set = %report.location, took_ms = took.as_millis() as u64, error = %partial_message(&report.destinations), "backup partial: some destinations hold the set, others do not");
                } else {
                    tracing::info!(set = %report.location, took_ms = took.as_millis() as u64, "backup succeeded");
                }
            }
            Err(e) => {
                record.state = RunState::Failed;
                record.failed_stage = Some(e.stage.as_str().to_string());
                record.error = Some(e.to_string());
                record.destinations = destination_records(&e.destinations);
                self.metrics
                    .run_failed(record.trigger, took, e.stage, &e.destinations);
                tracing::error!(stage = %e.stage, error = %e, "backup failed");
            }
        }
        {
            let mut state = self.lock();
            state.current = None;
            state.history.push_front(record.clone());
            state.history.truncate(HISTORY);
        }
        (self.on_finish)(matches!(
            record.state,
            RunState::Succeeded | RunState::Partial
        ));
        record
    }

    /// The run in progress, if any.
    pub fn current(&self) -> Option<RunHandle> {
        self.lock().current.clone()
    }

    /// A run by id: in progress or remembered.
    pub fn get(&self, id: &str) -> Option<RunRecord> {
        let state = self.lock();
        if let Some(c) = state.current.as_ref().filter(|c| c.record.id == id) {
            return Some(c.record.clone());
        }
        state.history.iter().find(|r| r.id == id).cloned()
    }

    /// Recent runs, newest first (the one in progress first of all).
    pub fn list(&self) -> Vec<RunRecord> {
        let state = self.lock();
        state
            .current
            .iter()
            .map(|c| c.record.clone())
            .chain(state.history.iter().cloned())
            .collect()
    }

    /// Refuses new runs from now on.
    pub fn stop_accepting(&self) {
        self.lock().accepting = false;
    }

    /// Whether new runs are still accepted (not shutting down).
    pub fn is_accepting(&self) -> bool {
        self.lock().accepting
    }

    /// Waits for the run in progress for up to `grace`; then cancels it (it
    /// removes what it wrote) and waits for that clean-up for up to
    /// `cleanup`. Returns whether everything ended in time.
    pub async fn drain(&self, grace: Duration, cleanup: Duration) -> bool {
        self.stop_accepting();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return true;
        }
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "shutdown grace expired; aborting the backup in progress"
        );
        self.abort.cancel();
        if tokio::time::timeout(cleanup, self.tracker.wait())
            .await
            .is_ok()
        {
            return true;
        }
        tracing::error!("the aborted backup did not finish its clean-up in time");
        false
    }
}

/// The API's view of each destination's outcome.
fn destination_records(outcomes: &[backup::DestinationOutcome]) -> Vec<DestinationRecord> {
    outcomes
        .iter()
        .map(|d| match &d.result {
            backup::DestinationResult::Succeeded { .. } => DestinationRecord {
                name: d.name.clone(),
                result: DestinationResultKind::Succeeded,
                stage: None,
                error: None,
            },
            backup::DestinationResult::Failed { stage, error } => DestinationRecord {
                name: d.name.clone(),
                result: DestinationResultKind::Failed,
                stage: Some(stage.as_str().to_string()),
                error: Some(error.clone()),
            },
        })
        .collect()
}

/// What a partial run says: which destinations failed and why, and which
/// hold the set.
pub fn partial_message(outcomes: &[backup::DestinationOutcome]) -> String {
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|d| !d.succeeded())
        .map(ToString::to_string)
        .collect();
    let succeeded: Vec<&str> = outcomes
        .iter()
        .filter(|d| d.succeeded())
        .map(|d| d.name.as_str())
        .collect();
    format!(
        "the set is complete at {} but not at every destination: {}",
        succeeded.join(", "),
        failed.join("; ")
    )
}
