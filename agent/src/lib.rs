//! etcd-backup-agent: an on-node agent that takes verified etcd snapshots and
//! the node's static-pod resources, and stores them as atomic backup sets.
//!
//! # Layout
//! Folders follow a backup's data flow; each folder's `mod.rs` says what lives
//! there and what it may import.
//! - [`source`]: where the bytes come from: the local [`etcd`](source::etcd)
//!   member (status, the snapshot stream and its digest check) and the
//!   static-pod [`resources`](source::resources) (which files, the streamed tar.gz).
//! - [`store`]: where sets are kept: the [`destination`](store::destination)
//!   trait (a local directory, SFTP, S3; whole files or byte ranges), age [`sealing`](store::sealing) of an
//!   upload, the [`catalog`](store::catalog) (the one definition of a complete
//!   set), [`verify`](store::verify) (a set streamed back against its manifest)
//!   and [`prune`](store::prune) (retention applied, deleting only names the agent writes).
//! - [`backup`]: one run, the set protocol (partial names, rename, manifest last),
//!   retries, cancellation.
//! - [`restore`]: the platform's restore tool on a verified snapshot; the drill member.
//! - [`daemon`]: `run`: the run loop wiring the single-flight
//!   [`runner`](daemon::runner), the scheduler, [`coordination`](daemon::coordination)
//!   (`coordination: leader`), [`unchanged`](daemon::unchanged) (`skip_unchanged`:
//!   a scheduled run stores nothing when etcd's revision is the newest set's),
//!   the local [`http`](daemon::http) API (with its
//!   OpenAPI document, `openapi.json` beside it) and Prometheus
//!   [`metrics`](daemon::metrics).
//! - [`commands`]: the command-line verbs, one file each (`backup`/`trigger`,
//!   `list`, `verify`, `fetch`, `prune`, `restore`/`drill`), their exit codes
//!   and output formats.
//! - [`cli`]: the command line and logging set-up; `main.rs` only calls it.
//! - [`config`]: the YAML config file, parsed and validated completely up front.
//! - [`policy`]: decisions without I/O: the [`schedule`](policy::schedule) (cron
//!   in a time zone, jitter) and [`retention`](policy::retention) (which sets to keep).
//! - [`encryption`]: age keys: recipients parsed from the config, identities to
//!   read sets back with.
//! - [`error_chain`]: an error and its causes on one line.
//!
//! Two parsers are crates of their own under `crates/`, with their tests and
//! fixtures, depending on nothing of the agent: `etcd-backup-bbolt-status` (what
//! `etcdctl snapshot status` reports, read from the snapshot's bbolt pages or
//! computed as it streams) and `etcd-backup-known-hosts` (whether an SFTP
//! server's host key is trusted, by OpenSSH's known_hosts rules).
//!
//! Imports go downwards only: cli → commands → daemon → backup/restore → store →
//! source → config → policy/encryption → error_chain and the workspace crates;
//! `tests/layers.rs` fails on an upward import or a cycle.

pub mod backup;
pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod encryption;
pub mod error_chain;
pub mod policy;
pub mod restore;
pub mod source;
pub mod store;
