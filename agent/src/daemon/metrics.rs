//! Prometheus metrics, registered once at start-up behind typed handles.
//!
//! Every label value comes from a closed set ([`Trigger`], [`Stage`],
//! success/failure, a skip reason, an artifact), never from error text, and
//! every combination is created at start so counters exist at 0 before the
//! first event (`increase()` and absence alerts then work from the start).
//!
//! The `destination` label's values are the configured destination names
//! (`default` for a single `destination:`): a bounded set the configuration
//! fixes, every series created at start. It is on what describes one
//! destination's copy: its last success, its failures, its results, its sets
//! and unrecognised entries, its not-durable sets. What describes the run
//! (its start, its result, duration, sizes, revision) has no such label.
//!
//! One exception: `etcd_backup_cluster_last_success_timestamp_seconds` is
//! labelled with the node that took the cluster's newest set, a name read from
//! the destination. It has exactly one series once a set exists and none
//! before (a 0 would claim a backup from 1970); when another node takes the
//! newest set, the old series is removed before the new one is set.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use etcd_backup_proto::api::Trigger;

use crate::backup::{DestinationOutcome, DestinationResult, Stage};
use crate::config::Coordination;

/// Buckets of `etcd_backup_duration_seconds`: 1 s to 1 h.
const DURATION_BUCKETS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];

const TRIGGERS: [Trigger; 3] = [Trigger::Schedule, Trigger::Http, Trigger::Startup];
/// The `result` label values of `etcd_backup_runs_total` and
/// `etcd_backup_duration_seconds`: `partial` when some destinations hold
/// the set and others do not.
const RESULTS: [&str; 3] = ["success", "partial", "failure"];
/// The `result` label values of `etcd_backup_destination_runs_total`.
const DESTINATION_RESULTS: [&str; 2] = ["success", "failure"];
/// The `stage` label values of `etcd_backup_failures_total`.
pub const FAILURE_STAGES: [&str; 7] = [
    "connect",
    "snapshot",
    "verify",
    "resources",
    "upload",
    "manifest",
    "retention",
];

/// Why a scheduled start did not run a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// A run was already in progress.
    InProgress,
    /// `coordination: leader`, and this node's etcd member is not the leader
    /// (or knows no leader, during an election).
    NotLeader,
    /// `skip_unchanged`: etcd's revision was the newest complete set's at
    /// every destination, so the run stored no identical set.
    Unchanged,
}

impl SkipReason {
    const ALL: [SkipReason; 3] = [
        SkipReason::InProgress,
        SkipReason::NotLeader,
        SkipReason::Unchanged,
    ];

    fn as_str(self) -> &'static str {
        match self {
            SkipReason::InProgress => "in_progress",
            SkipReason::NotLeader => "not_leader",
            SkipReason::Unchanged => "unchanged",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    trigger: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
    destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestinationLabels {
    destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestinationResultLabels {
    destination: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ArtifactLabels {
    artifact: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

type TimestampGauge = Gauge<f64, AtomicU64>;

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    /// The configured destination names, in order.
    destinations: Vec<String>,
    last_success: Family<DestinationLabels, TimestampGauge>,
    last_unchanged: Family<DestinationLabels, TimestampGauge>,
    last_attempt: TimestampGauge,
    last_size: Family<ArtifactLabels, Gauge>,
    last_revision: Gauge,
    runs: Family<RunLabels, Counter>,
    destination_runs: Family<DestinationResultLabels, Counter>,
    failures: Family<StageLabels, Counter>,
    skipped: Family<ReasonLabels, Counter>,
    duration: Family<ResultLabels, Histogram, fn() -> Histogram>,
    in_progress: Gauge,
    next_run: TimestampGauge,
    sets: Family<DestinationLabels, Gauge>,
    unrecognised: Family<DestinationLabels, Gauge>,
    last_drill_success: TimestampGauge,
    cluster_last_success: Family<NodeLabels, TimestampGauge>,
    /// The node whose series `cluster_last_success` holds, if any.
    cluster_node: Mutex<Option<String>>,
    http_rate_limited: Counter,
    not_durable_sets: Family<DestinationLabels, Counter>,
    rollout_in_progress_sets: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

fn seconds(at: DateTime<Utc>) -> f64 {
    at.timestamp_millis() as f64 / 1000.0
}

impl Metrics {
    /// Registers every metric for an agent in `coordination: per_node` mode;
    /// `version` labels the build-info metric.
    pub fn new(version: &str) -> Self {
        Self::with_coordination(version, Coordination::PerNode)
    }

    /// Registers every metric; `version` labels the build-info metric and
    /// `coordination` the mode metric, so alert rules can tell modes apart.
    pub fn with_coordination(version: &str, coordination: Coordination) -> Self {
        Self::with_destinations(
            version,
            coordination,
            &[crate::config::DEFAULT_DESTINATION_NAME],
        )
    }

    /// Registers every metric, with a series per destination name (the
    /// configured ones) wherever the `destination` label is.
    pub fn with_destinations(
        version: &str,
        coordination: Coordination,
        destinations: &[&str],
    ) -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            destinations: destinations.iter().map(|d| (*d).to_string()).collect(),
            last_success: Family::default(),
            last_unchanged: Family::default(),
            last_attempt: TimestampGauge::default(),
            last_size: Family::default(),
            last_revision: Gauge::default(),
            runs: Family::default(),
            destination_runs: Family::default(),
            failures: Family::default(),
            skipped: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            in_progress: Gauge::default(),
            next_run: TimestampGauge::default(),
            sets: Family::default(),
            unrecognised: Family::default(),
            last_drill_success: TimestampGauge::default(),
            cluster_last_success: Family::default(),
            cluster_node: Mutex::new(None),
            http_rate_limited: Counter::default(),
            not_durable_sets: Family::default(),
            rollout_in_progress_sets: Counter::default(),
            registry: Registry::default(),
        };
        m.register_run_metrics(&mut registry);
        m.register_store_and_mode_metrics(&mut registry, version, coordination);
        m.create_series();
        Metrics { registry, ..m }
    }

    /// The metrics of backup runs: outcomes, sizes, durations, the schedule.
    fn register_run_metrics(&self, registry: &mut Registry) {
        registry.register(
            "etcd_backup_last_success_timestamp_seconds",
            "Unix time the newest complete set at each destination finished (0 until the first)",
            self.last_success.clone(),
        );
        registry.register(
            "etcd_backup_last_unchanged_timestamp_seconds",
            "Unix time a scheduled run last found the newest complete set at each destination holding etcd's current revision and stored nothing (skip_unchanged; 0 until the first): that set was current then",
            self.last_unchanged.clone(),
        );
        registry.register(
            "etcd_backup_last_attempt_timestamp_seconds",
            "Unix time the newest backup run started (0 until the first)",
            self.last_attempt.clone(),
        );
        registry.register(
            "etcd_backup_last_size_bytes",
            "Size of each file of the newest successful backup",
            self.last_size.clone(),
        );
        registry.register(
            "etcd_backup_last_revision",
            "etcd revision recorded by the newest successful backup",
            self.last_revision.clone(),
        );
        registry.register(
            "etcd_backup_runs",
            "Backup runs by trigger and result: success (every destination), partial (some), failure (none)",
            self.runs.clone(),
        );
        registry.register(
            "etcd_backup_destination_runs",
            "Each destination's outcome of each backup run: success (its copy is complete) or failure",
            self.destination_runs.clone(),
        );
        registry.register(
            "etcd_backup_failures",
            "Destinations a backup run (or the retention after it) failed at, by stage: a run that fails before any destination (connect, snapshot) counts once per destination",
            self.failures.clone(),
        );
        registry.register(
            "etcd_backup_skipped",
            "Scheduled backups that stored no set, by reason: in_progress, not_leader, unchanged",
            self.skipped.clone(),
        );
        registry.register(
            "etcd_backup_duration_seconds",
            "Wall time of backup runs, retries included",
            self.duration.clone(),
        );
        registry.register(
            "etcd_backup_in_progress",
            "1 while a backup run is in progress",
            self.in_progress.clone(),
        );
        registry.register(
            "etcd_backup_next_run_timestamp_seconds",
            "Unix time of the next scheduled backup (0 when none is scheduled)",
            self.next_run.clone(),
        );
    }

    /// The metrics of what the destination holds, drills, the API, the mode and the build.
    fn register_store_and_mode_metrics(
        &self,
        registry: &mut Registry,
        version: &str,
        coordination: Coordination,
    ) {
        registry.register(
            "etcd_backup_sets",
            "Complete backup sets of this node at each destination, as of the last scan",
            self.sets.clone(),
        );
        registry.register(
            "etcd_backup_unrecognised_entries",
            "Entries in this node's directory at each destination that the agent never removes: newer-format sets, damaged or incomplete sets, and anything it did not write (see list --include-partial), as of the last scan",
            self.unrecognised.clone(),
        );
        registry.register(
            "etcd_backup_last_drill_success_timestamp_seconds",
            "When the newest passing restore drill finished (0 until the first; drills run with drill_schedule)",
            self.last_drill_success.clone(),
        );
        registry.register(
            "etcd_backup_cluster_last_success_timestamp_seconds",
            "When the cluster's newest complete backup set finished, whichever node took it (label node); no series until a set exists",
            self.cluster_last_success.clone(),
        );
        registry.register(
            "etcd_backup_coordination",
            "Which masters back up on schedule (coordination): per_node or leader",
            Info::new(vec![("mode", coordination.as_str().to_string())]),
        );
        registry.register(
            "etcd_backup_http_rate_limited",
            "POST /v1/backups requests refused with 429 because the client triggered a run less than http.trigger_min_interval ago",
            self.http_rate_limited.clone(),
        );
        registry.register(
            "etcd_backup_not_durable_sets",
            "Sets stored on an SFTP server without fsync@openssh.com (allowed by destination.sftp.require_fsync: false) and recorded \"durable\": false: a crash of the server may lose them",
            self.not_durable_sets.clone(),
        );
        registry.register(
            "etcd_backup_rollout_in_progress_sets",
            "Sets taken while a static pod was mid-rollout on the node (a revision directory newer than the live manifest's; rollout_in_progress in the manifest): their resources may not match etcd",
            self.rollout_in_progress_sets.clone(),
        );
        registry.register(
            "etcd_backup_agent_build",
            "The agent's build",
            Info::new(vec![("version", version.to_string())]),
        );
    }

    /// Every labelled series from the closed label sets, at zero, so alert
    /// rules see them before the first run.
    fn create_series(&self) {
        for d in &self.destinations {
            let destination = || DestinationLabels {
                destination: d.clone(),
            };
            let _ = self.last_success.get_or_create(&destination());
            let _ = self.last_unchanged.get_or_create(&destination());
            let _ = self.sets.get_or_create(&destination());
            let _ = self.unrecognised.get_or_create(&destination());
            let _ = self.not_durable_sets.get_or_create(&destination());
            for result in DESTINATION_RESULTS {
                let _ = self
                    .destination_runs
                    .get_or_create(&DestinationResultLabels {
                        destination: d.clone(),
                        result,
                    });
            }
            for stage in FAILURE_STAGES {
                let _ = self.failures.get_or_create(&StageLabels {
                    stage,
                    destination: d.clone(),
                });
            }
        }
        for trigger in TRIGGERS {
            for result in RESULTS {
                let _ = self.runs.get_or_create(&RunLabels {
                    trigger: trigger.as_str(),
                    result,
                });
            }
        }
        for reason in SkipReason::ALL {
            let _ = self.skipped.get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            });
        }
        for artifact in ["snapshot", "resources"] {
            let _ = self.last_size.get_or_create(&ArtifactLabels { artifact });
        }
        for result in RESULTS {
            let _ = self.duration.get_or_create(&ResultLabels { result });
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// A run started at `at`.
    pub fn run_started(&self, at: DateTime<Utc>) {
        self.last_attempt.set(seconds(at));
        self.in_progress.set(1);
    }

    /// A run finished with a complete set at one destination at least
    /// (partial when not at all of them, as `destinations` says).
    pub fn run_succeeded(
        &self,
        trigger: Trigger,
        took: Duration,
        finished: DateTime<Utc>,
        outcome: &SuccessFigures,
        destinations: &[DestinationOutcome],
    ) {
        self.in_progress.set(0);
        let result = if destinations.iter().all(DestinationOutcome::succeeded) {
            "success"
        } else {
            "partial"
        };
        self.runs
            .get_or_create(&RunLabels {
                trigger: trigger.as_str(),
                result,
            })
            .inc();
        self.duration
            .get_or_create(&ResultLabels { result })
            .observe(took.as_secs_f64());
        self.last_size
            .get_or_create(&ArtifactLabels {
                artifact: "snapshot",
            })
            .set(i64::try_from(outcome.snapshot_bytes).unwrap_or(i64::MAX));
        self.last_size
            .get_or_create(&ArtifactLabels {
                artifact: "resources",
            })
            .set(i64::try_from(outcome.resources_bytes.unwrap_or(0)).unwrap_or(i64::MAX));
        self.last_revision.set(outcome.revision);
        if outcome.rollout_in_progress {
            self.rollout_in_progress_sets.inc();
        }
        self.destinations_finished(Some(finished), destinations);
    }

    /// A run finished without a set anywhere; `stage` is where the run
    /// failed, `destinations` where each destination did.
    pub fn run_failed(
        &self,
        trigger: Trigger,
        took: Duration,
        stage: Stage,
        destinations: &[DestinationOutcome],
    ) {
        self.in_progress.set(0);
        self.runs
            .get_or_create(&RunLabels {
                trigger: trigger.as_str(),
                result: "failure",
            })
            .inc();
        self.duration
            .get_or_create(&ResultLabels { result: "failure" })
            .observe(took.as_secs_f64());
        if destinations.is_empty() {
            // Failed before it knew its destinations: failed at each.
            for d in &self.destinations {
                self.destination_failed(d, stage.as_str());
            }
        }
        self.destinations_finished(None, destinations);
    }

    /// Each destination's part of a finished run.
    fn destinations_finished(
        &self,
        finished: Option<DateTime<Utc>>,
        destinations: &[DestinationOutcome],
    ) {
        for d in destinations {
            match (&d.result, finished) {
                (DestinationResult::Succeeded { durable }, Some(at)) => {
                    let labels = DestinationLabels {
                        destination: d.name.clone(),
                    };
                    self.last_success.get_or_create(&labels).set(seconds(at));
                    if !durable {
                        self.not_durable_sets.get_or_create(&labels).inc();
                    }
                    self.destination_runs
                        .get_or_create(&DestinationResultLabels {
                            destination: d.name.clone(),
                            result: "success",
                        })
                        .inc();
                }
                (DestinationResult::Failed { stage, .. }, _) => {
                    self.destination_failed(&d.name, stage.as_str());
                }
                (DestinationResult::Succeeded { .. }, None) => {}
            }
        }
    }

    fn destination_failed(&self, destination: &str, stage: &'static str) {
        self.failures
            .get_or_create(&StageLabels {
                stage,
                destination: destination.to_string(),
            })
            .inc();
        self.destination_runs
            .get_or_create(&DestinationResultLabels {
                destination: destination.to_string(),
                result: "failure",
            })
            .inc();
    }

    /// Applying retention at `destination` after a successful run failed.
    pub fn retention_failed(&self, destination: &str) {
        self.failures
            .get_or_create(&StageLabels {
                stage: "retention",
                destination: destination.to_string(),
            })
            .inc();
    }

    /// A run the daemon started itself (it counted in
    /// [`Metrics::run_started`]) found etcd unchanged since the newest
    /// complete set at each of `destinations` and ended at `at` without
    /// storing one: the skip is counted and each destination's set is
    /// recorded as current at `at`.
    pub fn run_skipped_unchanged(&self, at: DateTime<Utc>, destinations: &[&str]) {
        self.in_progress.set(0);
        self.skipped(SkipReason::Unchanged);
        for d in destinations {
            self.last_unchanged
                .get_or_create(&DestinationLabels {
                    destination: (*d).to_string(),
                })
                .set(seconds(at));
        }
    }

    /// A scheduled start was skipped.
    pub fn skipped(&self, reason: SkipReason) {
        self.skipped
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// The newest complete set at the destination finished at `at`: a daemon
    /// that starts after a restart reports that, not 0, so staleness alerts
    /// see the real age of the newest backup. Never moves the gauge back.
    pub fn seed_last_success(&self, destination: &str, at: DateTime<Utc>) {
        let s = seconds(at);
        let gauge = self.last_success.get_or_create(&DestinationLabels {
            destination: destination.to_string(),
        });
        if gauge.get() < s {
            gauge.set(s);
        }
    }

    /// The cluster's newest complete set (of any node) was taken by `node` and
    /// finished at `at`. Keeps exactly one series: a series of another node is
    /// removed first, so a scrape never sees two (at worst, in between, none).
    pub fn set_cluster_last_success(&self, node: &str, at: DateTime<Utc>) {
        // A panic while holding the lock leaves a plain Option; keep using it.
        let mut current = self.cluster_node.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_deref() != Some(node) {
            if let Some(old) = current.take() {
                self.cluster_last_success.remove(&NodeLabels { node: old });
            }
            *current = Some(node.to_string());
        }
        self.cluster_last_success
            .get_or_create(&NodeLabels {
                node: node.to_string(),
            })
            .set(seconds(at));
    }

    /// A trigger was refused by the rate limit.
    pub fn http_rate_limited(&self) {
        self.http_rate_limited.inc();
    }

    /// A restore drill passed at `at`.
    pub fn drill_succeeded(&self, at: DateTime<Utc>) {
        self.last_drill_success.set(seconds(at));
    }

    /// How many complete sets this node has at `destination`.
    pub fn set_sets(&self, destination: &str, n: usize) {
        self.sets
            .get_or_create(&DestinationLabels {
                destination: destination.to_string(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// How many entries of this node's directory the agent leaves alone
    /// because it cannot prove they are its own.
    pub fn set_unrecognised(&self, destination: &str, n: usize) {
        self.unrecognised
            .get_or_create(&DestinationLabels {
                destination: destination.to_string(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The next scheduled start; `None` clears it.
    pub fn set_next_run(&self, at: Option<DateTime<Utc>>) {
        self.next_run.set(at.map(seconds).unwrap_or(0.0));
    }
}

/// The figures of a successful run that metrics report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuccessFigures {
    /// Size of the snapshot file.
    pub snapshot_bytes: u64,
    /// Size of the resources tarball, when the layout makes one.
    pub resources_bytes: Option<u64>,
    /// etcd revision in the manifest.
    pub revision: i64,
    /// Whether the set was taken mid-rollout (the manifest's
    /// `rollout_in_progress` is not empty).
    pub rollout_in_progress: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(name: &str, durable: bool) -> DestinationOutcome {
        DestinationOutcome {
            name: name.into(),
            location: format!("local:/{name}"),
            result: DestinationResult::Succeeded { durable },
        }
    }

    fn failed(name: &str, stage: Stage) -> DestinationOutcome {
        DestinationOutcome {
            name: name.into(),
            location: format!("local:/{name}"),
            result: DestinationResult::Failed {
                stage,
                error: "connection reset".into(),
            },
        }
    }

    #[test]
    fn a_partial_run_moves_each_destination_on_its_own() {
        let m = Metrics::with_destinations("0", Coordination::PerNode, &["sftp", "s3"]);
        let text = m.encode();
        for d in ["sftp", "s3"] {
            for series in [
                format!("etcd_backup_last_success_timestamp_seconds{{destination=\"{d}\"}}"),
                format!("etcd_backup_failures_total{{stage=\"upload\",destination=\"{d}\"}}"),
                format!(
                    "etcd_backup_destination_runs_total{{destination=\"{d}\",result=\"failure\"}}"
                ),
                format!("etcd_backup_sets{{destination=\"{d}\"}}"),
            ] {
                assert_eq!(value(&text, &series), 0.0, "{series}");
            }
        }
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        m.run_succeeded(
            Trigger::Schedule,
            Duration::from_secs(3),
            t0,
            &SuccessFigures {
                snapshot_bytes: 1,
                resources_bytes: None,
                revision: 7,
                rollout_in_progress: false,
            },
            &[failed("sftp", Stage::Upload), ok("s3", true)],
        );
        let text = m.encode();
        let v = |s: &str| value(&text, s);
        assert_eq!(
            v("etcd_backup_runs_total{trigger=\"schedule\",result=\"partial\"}"),
            1.0
        );
        assert_eq!(
            v("etcd_backup_runs_total{trigger=\"schedule\",result=\"success\"}"),
            0.0
        );
        assert_eq!(
            v("etcd_backup_last_success_timestamp_seconds{destination=\"s3\"}"),
            1_800_000_000.0
        );
        assert_eq!(
            v("etcd_backup_last_success_timestamp_seconds{destination=\"sftp\"}"),
            0.0
        );
        assert_eq!(
            v("etcd_backup_failures_total{stage=\"upload\",destination=\"sftp\"}"),
            1.0
        );
        assert_eq!(
            v("etcd_backup_failures_total{stage=\"upload\",destination=\"s3\"}"),
            0.0
        );
        assert_eq!(
            v("etcd_backup_destination_runs_total{destination=\"s3\",result=\"success\"}"),
            1.0
        );
        assert_eq!(
            v("etcd_backup_destination_runs_total{destination=\"sftp\",result=\"failure\"}"),
            1.0
        );
        // A run that fails before any destination fails at each.
        m.run_failed(
            Trigger::Schedule,
            Duration::from_secs(1),
            Stage::Connect,
            &[],
        );
        let text = m.encode();
        for d in ["sftp", "s3"] {
            assert_eq!(
                value(
                    &text,
                    &format!("etcd_backup_failures_total{{stage=\"connect\",destination=\"{d}\"}}")
                ),
                1.0
            );
        }
    }

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .unwrap_or_else(|| panic!("{series} not in:\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn every_series_exists_at_zero_before_the_first_run() {
        let m = Metrics::new("1.2.3");
        let text = m.encode();
        assert_eq!(
            value(
                &text,
                "etcd_backup_last_success_timestamp_seconds{destination=\"default\"}"
            ),
            0.0
        );
        assert_eq!(
            value(&text, "etcd_backup_last_attempt_timestamp_seconds"),
            0.0
        );
        assert_eq!(
            value(
                &text,
                "etcd_backup_runs_total{trigger=\"schedule\",result=\"failure\"}"
            ),
            0.0
        );
        assert_eq!(
            value(
                &text,
                "etcd_backup_failures_total{stage=\"retention\",destination=\"default\"}"
            ),
            0.0
        );
        assert_eq!(
            value(&text, "etcd_backup_skipped_total{reason=\"in_progress\"}"),
            0.0
        );
        assert_eq!(
            value(&text, "etcd_backup_skipped_total{reason=\"not_leader\"}"),
            0.0
        );
        assert_eq!(
            value(&text, "etcd_backup_coordination_info{mode=\"per_node\"}"),
            1.0
        );
        // No set yet: no cluster series at all rather than a 0 from 1970.
        assert!(
            !text.contains("etcd_backup_cluster_last_success_timestamp_seconds{"),
            "{text}"
        );
        assert_eq!(
            value(&text, "etcd_backup_last_size_bytes{artifact=\"resources\"}"),
            0.0
        );
        assert_eq!(
            value(
                &text,
                "etcd_backup_duration_seconds_count{result=\"success\"}"
            ),
            0.0
        );
        assert_eq!(value(&text, "etcd_backup_in_progress"), 0.0);
        assert_eq!(
            value(
                &text,
                "etcd_backup_unrecognised_entries{destination=\"default\"}"
            ),
            0.0
        );
        assert_eq!(value(&text, "etcd_backup_http_rate_limited_total"), 0.0);
        assert_eq!(
            value(&text, "etcd_backup_rollout_in_progress_sets_total"),
            0.0
        );
        assert_eq!(
            value(
                &text,
                "etcd_backup_not_durable_sets_total{destination=\"default\"}"
            ),
            0.0
        );
        assert_eq!(
            value(&text, "etcd_backup_agent_build_info{version=\"1.2.3\"}"),
            1.0
        );
        assert!(
            text.contains(
                "etcd_backup_duration_seconds_bucket{le=\"3600.0\",result=\"success\"} 0"
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_success_and_a_failure_move_the_right_series() {
        let m = Metrics::new("0");
        let t0 = DateTime::from_timestamp(1_800_000_000, 500_000_000).unwrap();
        m.run_started(t0);
        assert_eq!(value(&m.encode(), "etcd_backup_in_progress"), 1.0);
        m.run_succeeded(
            Trigger::Http,
            Duration::from_secs(3),
            t0 + chrono::Duration::seconds(3),
            &SuccessFigures {
                snapshot_bytes: 20512,
                resources_bytes: Some(471),
                revision: 42,
                rollout_in_progress: true,
            },
            &[ok("default", true)],
        );
        m.run_started(t0 + chrono::Duration::seconds(60));
        m.run_failed(
            Trigger::Schedule,
            Duration::from_secs(70),
            Stage::Upload,
            &[failed("default", Stage::Upload)],
        );
        m.skipped(SkipReason::InProgress);
        m.http_rate_limited();
        m.http_rate_limited();
        m.set_next_run(Some(t0 + chrono::Duration::seconds(3600)));
        let text = m.encode();
        assert_eq!(
            value(
                &text,
                "etcd_backup_last_success_timestamp_seconds{destination=\"default\"}"
            ),
            1_800_000_003.5
        );
        assert_eq!(
            value(&text, "etcd_backup_last_attempt_timestamp_seconds"),
            1_800_000_060.5
        );
        assert_eq!(
            value(&text, "etcd_backup_last_size_bytes{artifact=\"snapshot\"}"),
            20512.0
        );
        assert_eq!(value(&text, "etcd_backup_last_revision"), 42.0);
        assert_eq!(
            value(
                &text,
                "etcd_backup_runs_total{trigger=\"http\",result=\"success\"}"
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "etcd_backup_runs_total{trigger=\"schedule\",result=\"failure\"}"
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "etcd_backup_failures_total{stage=\"upload\",destination=\"default\"}"
            ),
            1.0
        );
        assert_eq!(
            value(&text, "etcd_backup_skipped_total{reason=\"in_progress\"}"),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "etcd_backup_duration_seconds_count{result=\"failure\"}"
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "etcd_backup_duration_seconds_bucket{le=\"60.0\",result=\"failure\"}"
            ),
            0.0
        );
        assert_eq!(
            value(
                &text,
                "etcd_backup_duration_seconds_bucket{le=\"120.0\",result=\"failure\"}"
            ),
            1.0
        );
        assert_eq!(
            value(&text, "etcd_backup_next_run_timestamp_seconds"),
            1_800_003_600.5
        );
        assert_eq!(value(&text, "etcd_backup_in_progress"), 0.0);
        assert_eq!(value(&text, "etcd_backup_http_rate_limited_total"), 2.0);
        // That success was taken mid-rollout; the next one is clean.
        assert_eq!(
            value(&text, "etcd_backup_rollout_in_progress_sets_total"),
            1.0
        );
        // That success was durable.
        assert_eq!(
            value(
                &text,
                "etcd_backup_not_durable_sets_total{destination=\"default\"}"
            ),
            0.0
        );
        m.run_succeeded(
            Trigger::Schedule,
            Duration::from_secs(3),
            t0 + chrono::Duration::seconds(120),
            &SuccessFigures {
                snapshot_bytes: 20512,
                resources_bytes: None,
                revision: 43,
                rollout_in_progress: false,
            },
            &[ok("default", false)],
        );
        assert_eq!(
            value(
                &m.encode(),
                "etcd_backup_not_durable_sets_total{destination=\"default\"}"
            ),
            1.0
        );
        assert_eq!(
            value(&m.encode(), "etcd_backup_rollout_in_progress_sets_total"),
            1.0
        );
    }

    fn cluster_series(text: &str) -> Vec<&str> {
        text.lines()
            .filter(|l| l.starts_with("etcd_backup_cluster_last_success_timestamp_seconds{"))
            .collect()
    }

    #[test]
    fn the_cluster_series_follows_the_node_that_took_the_newest_set_and_stays_one() {
        let m = Metrics::with_coordination("0", Coordination::Leader);
        assert_eq!(
            value(
                &m.encode(),
                "etcd_backup_coordination_info{mode=\"leader\"}"
            ),
            1.0
        );
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        m.set_cluster_last_success("master-0", t0);
        m.set_cluster_last_success("master-0", t0 + chrono::Duration::seconds(60));
        let text = m.encode();
        assert_eq!(
            cluster_series(&text),
            [
                "etcd_backup_cluster_last_success_timestamp_seconds{node=\"master-0\"} 1800000060.0"
            ]
        );
        m.set_cluster_last_success("master-2", t0 + chrono::Duration::seconds(120));
        let text = m.encode();
        assert_eq!(
            cluster_series(&text),
            [
                "etcd_backup_cluster_last_success_timestamp_seconds{node=\"master-2\"} 1800000120.0"
            ]
        );
        m.set_cluster_last_success("master-0", t0 + chrono::Duration::seconds(180));
        assert_eq!(
            cluster_series(&m.encode()),
            [
                "etcd_backup_cluster_last_success_timestamp_seconds{node=\"master-0\"} 1800000180.0"
            ]
        );
    }

    #[test]
    fn a_skip_because_unchanged_is_counted_ends_the_run_and_marks_each_set_current() {
        let m = Metrics::with_destinations("1.2.3", Coordination::PerNode, &["local", "s3"]);
        let text = m.encode();
        assert_eq!(
            value(&text, "etcd_backup_skipped_total{reason=\"unchanged\"}"),
            0.0
        );
        for d in ["local", "s3"] {
            assert_eq!(
                value(
                    &text,
                    &format!("etcd_backup_last_unchanged_timestamp_seconds{{destination=\"{d}\"}}")
                ),
                0.0
            );
        }
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        m.run_started(t0);
        m.run_skipped_unchanged(t0 + chrono::Duration::seconds(2), &["local", "s3"]);
        let text = m.encode();
        assert_eq!(value(&text, "etcd_backup_in_progress"), 0.0);
        assert_eq!(
            value(&text, "etcd_backup_skipped_total{reason=\"unchanged\"}"),
            1.0
        );
        for d in ["local", "s3"] {
            assert_eq!(
                value(
                    &text,
                    &format!("etcd_backup_last_unchanged_timestamp_seconds{{destination=\"{d}\"}}")
                ),
                1_800_000_002.0
            );
            // No set was stored: the last success does not move.
            assert_eq!(
                value(
                    &text,
                    &format!("etcd_backup_last_success_timestamp_seconds{{destination=\"{d}\"}}")
                ),
                0.0
            );
        }
        assert_eq!(
            value(
                &text,
                "etcd_backup_runs_total{trigger=\"schedule\",result=\"success\"}"
            ),
            0.0
        );
    }
}
