//! The daemon's HTTP API: request and response bodies, all JSON.
//!
//! `POST /v1/backups` answers a [`RunRecord`] (202, or 200/500 with
//! `?wait=true`); `GET /v1/backups` a [`RunList`]; `GET /v1/backups/{id}` a
//! [`RunRecord`]; every error an [`ErrorResponse`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Started and not finished.
    Running,
    /// Finished with a complete, verified set.
    Succeeded,
    /// Finished without a set; `error` says why.
    Failed,
    /// Finished with a complete set at some destinations and none at the
    /// others; `destinations` says which, `error` why.
    Partial,
    /// Finished without storing a set, on purpose: `skip_reason` says why;
    /// `set` and `revision` name the set that is already current.
    Skipped,
}

/// Why a run the daemon started itself stored no set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunSkipReason {
    /// `skip_unchanged`: etcd's revision equalled the newest complete set's
    /// at every destination, so a new set would have been identical.
    Unchanged,
}

impl RunSkipReason {
    /// The name used in JSON, logs and the `reason` label of
    /// `etcd_backup_skipped_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunSkipReason::Unchanged => "unchanged",
        }
    }
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The cron schedule.
    Schedule,
    /// `POST /v1/backups`.
    Http,
    /// `run_on_start` after the daemon started.
    Startup,
}

impl Trigger {
    /// The name used in JSON, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Http => "http",
            Trigger::Startup => "startup",
        }
    }
}

/// How one stage of a run went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// `connect`, `snapshot`, `resources`, `upload` or `manifest`.
    pub stage: String,
    /// Bytes moved in the stage (0 where that means nothing).
    pub bytes: u64,
    /// Wall time of the stage.
    pub duration_seconds: f64,
}

/// One backup run, as the daemon remembers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Unique within the daemon's lifetime; appears in every log line of the run.
    pub id: String,
    /// Where the run is.
    pub state: RunState,
    /// What started it.
    pub trigger: Trigger,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it finished, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// Attempts made so far (retries included).
    pub attempts: u32,
    /// Stages of the successful attempt, in order.
    #[serde(default)]
    pub stages: Vec<StageRecord>,
    /// The complete set, `<cluster>/<node>/<ts>`, once it exists; for a
    /// skipped run, the set that was already current (at the first destination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
    /// Where the set is, destination included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// etcd revision recorded in the manifest (for a skipped run, etcd's
    /// revision, which the current set holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// The stage a failed run stopped at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_stage: Option<String>,
    /// Why the run failed (or, when partial, which destinations failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why a `skipped` run stored no set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_reason: Option<RunSkipReason>,
    /// How each configured destination ended, in configuration order,
    /// once the run has finished.
    #[serde(default)]
    pub destinations: Vec<DestinationRecord>,
}

/// How one destination's copy of a run's set ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationRecord {
    /// The configured name (`default` for a single `destination:`).
    pub name: String,
    /// Whether its copy is complete.
    pub result: DestinationResultKind,
    /// The stage it failed at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `succeeded` or `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestinationResultKind {
    /// The destination holds the complete set.
    Succeeded,
    /// The destination holds none of it.
    Failed,
}

/// `GET /v1/backups`: recent runs, newest first, and the node's stored sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunList {
    /// At most the daemon's history bound, newest first.
    pub runs: Vec<RunRecord>,
    /// This node's complete sets at the destination, newest first, as of the
    /// last catalog scan (after start-up and after each run).
    #[serde(default)]
    pub sets: Vec<SetSummary>,
}

/// One complete set, as `list` and the API show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetSummary {
    /// `<cluster>/<node>/<timestamp>`.
    pub set: String,
    /// The node that took it.
    pub node: String,
    /// Its timestamp.
    pub timestamp: crate::SetTimestamp,
    /// When the run finished.
    pub finished_at: DateTime<Utc>,
    /// Snapshot size in bytes as stored; for a paged set, the plain
    /// snapshot's (its logical size).
    pub snapshot_bytes: u64,
    /// How the snapshot is stored: `full` or `paged` (`full` when an older
    /// agent's answer does not say).
    #[serde(default = "format_full")]
    pub format: String,
    /// Bytes the set added at its destination: every file of a full set; a
    /// paged set's new packs, its page index and its other files.
    #[serde(default)]
    pub added_bytes: u64,
    /// Resources tarball size, when the set has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources_bytes: Option<u64>,
    /// etcd revision.
    pub revision: i64,
    /// Keys in the snapshot, when the manifest records its status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_key: Option<u64>,
    /// Whether the data files are encrypted (an identity is needed to restore).
    #[serde(default)]
    pub encrypted: bool,
    /// How the snapshot is compressed: `zstd` (stored as `.db.zst`), or
    /// `none`, also when an older agent's answer does not say.
    #[serde(default = "compression_none")]
    pub compression: String,
    /// The static-pod resources layout the set was taken with (`openshift`,
    /// `kubeadm`, `none`): only `openshift` sets are cluster-restore.sh
    /// directories. Empty when an older agent's answer does not say.
    #[serde(default)]
    pub layout: String,
    /// Whether the destination synced the set's files before publishing it
    /// (the manifest's `durable`); true when an older agent's answer does
    /// not say.
    #[serde(default = "crate::manifest::durable_default")]
    pub durable: bool,
    /// The static pods that were mid-rollout when the set was taken (the
    /// manifest's `rollout_in_progress`); empty for a clean set, also when
    /// an older agent's answer does not say.
    #[serde(default)]
    pub rollout_in_progress: Vec<String>,
}

fn format_full() -> String {
    "full".to_string()
}

fn compression_none() -> String {
    "none".to_string()
}

/// What a leftover is, which decides whether the agent may remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeftoverKind {
    /// A set directory holding only `.partial` files this agent writes for
    /// that set (a run that did not finish), or such files inside a complete
    /// set: removed once older than `stale_partial_after`.
    OwnPartial,
    /// A set whose manifest has a newer `format_version` than this agent
    /// reads: never removed, and counted as a set for retention and alerts.
    NewerFormat,
    /// Anything else: never removed, reported and counted by
    /// `etcd_backup_unrecognised_entries`.
    Unrecognised,
}

/// An entry of a node's directory that is not a complete set, or a complete
/// set that also holds files this agent did not write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftoverSummary {
    /// The directory (or, for an entry that is not a directory, its path).
    pub dir: String,
    /// Whether the agent may remove it.
    pub kind: LeftoverKind,
    /// Files in it.
    pub files: Vec<String>,
    /// Newest modification time, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified: Option<DateTime<Utc>>,
    /// Why it is not complete.
    pub why: String,
}

/// `list -o json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetList {
    /// Complete sets, newest first.
    pub sets: Vec<SetSummary>,
    /// Leftovers, only with `--include-partial`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leftovers: Vec<LeftoverSummary>,
}

/// Every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// What went wrong and what to do.
    pub error: String,
    /// The run concerned (the one in progress, for a 409).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
}

/// `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    /// All checks passed.
    pub ready: bool,
    /// The config was loaded and validated.
    pub config: bool,
    /// etcd answered a status call.
    pub etcd: bool,
    /// The destination was reached at least once.
    pub destination: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_record_json_shape() {
        let r = RunRecord {
            id: "r-1".into(),
            state: RunState::Running,
            trigger: Trigger::Http,
            started_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            finished_at: None,
            attempts: 1,
            stages: vec![],
            set: None,
            location: None,
            revision: None,
            failed_stage: None,
            error: None,
            skip_reason: None,
            destinations: Vec::new(),
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["state"], "running");
        assert_eq!(v["trigger"], "http");
        assert!(v.get("error").is_none());
        let back: RunRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }
}
