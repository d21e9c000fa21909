//! etcd-backup-agent: an on-node agent that takes verified etcd snapshots and
//! the node's static-pod resources, and stores them as atomic backup sets.
//!
//! # Layout
//! - [`config`]: the YAML config file, parsed and validated completely up front.
//! - [`etcd`]: the local etcd member: status, and the snapshot stream with its
//!   digest check ([`etcd::SnapshotVerifier`]).
//! - [`resources`]: which static-pod files to bundle, and the streamed tar.gz.
//! - [`destination`]: where sets are stored, one trait; a local directory, SFTP.
//! - [`encryption`]: age keys: recipients parsed from the config, identities to
//!   read sets back with; [`sealing`] encrypts an upload as it streams.
//! - [`known_hosts`]: whether an SFTP server's host key is trusted (OpenSSH
//!   known_hosts rules, or a pinned fingerprint).
//! - [`backup`]: one run, the set protocol (partial names, rename, manifest last),
//!   retries, cancellation.
//! - [`retention`]: which sets to keep and which leftovers to remove, decided without I/O.
//! - [`schedule`]: when scheduled backups fire: cron in a time zone, jitter, the scheduler loop.
//! - [`runner`]: one backup at a time; the runs the API shows.
//! - [`coordination`]: `coordination: leader`: whether this master's etcd member
//!   leads, which decides whether it takes a scheduled backup.
//! - [`metrics`]: Prometheus metrics behind typed handles.
//! - [`http`]: the local HTTP API (trigger with its rate limit, runs, health,
//!   metrics) and its OpenAPI document (`openapi.json` beside it).
//! - [`daemon`]: `run`: scheduler, HTTP, readiness and shutdown wired together.
//! - [`catalog`]: which complete sets and leftovers a destination holds.
//! - [`verify`]: streaming a set back against its manifest (`verify`, `fetch`).
//! - [`prune`]: applying retention to a destination, deleting only names the
//!   agent writes (manifest renamed away first).
//! - [`commands`]: what the command-line verbs share (exit codes, output formats).
//! - [`ops`]: the operator commands on stored sets (`list`, `verify`, `fetch`, `prune`).
//! - [`restore`]: the platform's restore tool on a verified snapshot; the drill member.
//! - [`snapshot_status`]: what `etcdctl snapshot status` reports, read from the
//!   snapshot's bbolt file (or computed as it streams), without etcd's tools.
//! - [`cli`]: the command line and logging set-up; `main.rs` only calls it.
//! - [`error_chain`]: an error and its causes on one line (imports nothing of the agent).
//!
//! Modules import downwards only, never in a cycle; `tests/layers.rs` checks it.

pub mod backup;
pub mod catalog;
pub mod cli;
pub mod commands;
pub mod config;
pub mod coordination;
pub mod daemon;
pub mod destination;
pub mod encryption;
pub mod error_chain;
pub mod etcd;
pub mod http;
pub mod known_hosts;
pub mod metrics;
pub mod ops;
pub mod prune;
pub mod resources;
pub mod restore;
pub mod retention;
pub mod runner;
pub mod schedule;
pub mod sealing;
pub mod snapshot_status;
pub mod verify;
