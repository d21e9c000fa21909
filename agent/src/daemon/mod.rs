//! `etcd-backup-agent run`, the DaemonSet's process: the run loop in this file
//! wires the [`runner`] (one backup at a time), the scheduler, [`coordination`]
//! (does this member lead?), the [`http`] API with readiness, [`metrics`] and
//! shutdown together. It may import `backup`, `restore`, `store`, `source`,
//! `config`, `policy` and below; never the commands.
//!
//! With `coordination: leader`, a scheduled start (and the start-up run,
//! which is scheduled work too) first asks the local etcd member whether it
//! leads ([`crate::daemon::coordination`]); HTTP-triggered runs never ask.
//!
//! Shutdown: SIGTERM or SIGINT stops the scheduler and makes `POST` answer
//! 503; a run in progress gets `shutdown_grace` to finish, then is cancelled
//! (it removes what it wrote); then the HTTP server stops and the process exits 0.

pub mod coordination;
pub mod http;
pub mod metrics;
pub mod runner;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use etcd_backup_proto::api::Trigger;

use crate::config::{Config, Coordination, RunOnStart};
use crate::daemon::coordination::{member_hex, Leadership};
use crate::daemon::http::{AppState, ReadyFlags};
use crate::daemon::metrics::{Metrics, SkipReason};
use crate::daemon::runner::{Runner, StartError};
use crate::policy::schedule::{run_scheduler, SystemClock};
use crate::source::etcd::{EtcdMember, SnapshotSource};
use crate::store::catalog::CatalogError;
use crate::store::destination;

/// How often readiness re-asks etcd for its status.
const PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// How long an aborted run may take to remove what it wrote.
const CLEANUP_GRACE: Duration = Duration::from_secs(5);
/// The longest the catalog goes without a rescan (it is also rescanned after
/// every run, and every schedule interval when that is shorter), so a node
/// that does not back up itself (a follower in leader mode) still sees the
/// cluster's newest set.
const CATALOG_RESCAN: Duration = Duration::from_secs(300);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// `run` needs a schedule.
    #[error("schedule: required for `run` (e.g. schedule: \"0 * * * *\"); for a single backup use `backup`")]
    NoSchedule,
    /// The HTTP address could not be bound.
    #[error("cannot listen on {addr} (http.listen): {source}; is another agent already running on this node, or is the port taken?")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The token file could not be read.
    #[error("cannot read http.token_file {path}: {source}")]
    Token {
        /// The file.
        path: std::path::PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// Waits for SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers, Ctrl-C is still there.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs the daemon until a shutdown signal.
///
/// # Errors
/// [`DaemonError`] for problems found while starting; a run's failure is not
/// an error of the daemon (it is logged, counted and shown in the API).
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let listener = bind(config.daemon.listen).await?;
    let metrics_listener = match config.daemon.metrics_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    run_on(config, listener, metrics_listener, shutdown_signal()).await
}

async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, DaemonError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Bind { addr, source })
}

/// Runs the daemon on an already-bound listener until `shutdown` completes
/// (tests pass a listener on port 0 and their own shutdown future).
///
/// # Errors
/// As [`run`].
pub async fn run_on(
    config: Config,
    listener: tokio::net::TcpListener,
    metrics_listener: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), DaemonError> {
    let schedule = config
        .daemon
        .schedule
        .clone()
        .ok_or(DaemonError::NoSchedule)?;
    let token_sha256 = match &config.daemon.token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path).map_err(|source| DaemonError::Token {
                path: path.clone(),
                source,
            })?;
            Some(http::token_digest(token.trim()))
        }
        None => None,
    };
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::with_coordination(
        crate::backup::AGENT_VERSION,
        config.daemon.coordination,
    ));
    let ready = Arc::new(ReadyFlags::default());
    let rescan = Arc::new(tokio::sync::Notify::new());
    let runner = {
        let ready = ready.clone();
        let rescan = rescan.clone();
        Runner::new(config.clone(), metrics.clone(), move |succeeded| {
            if succeeded {
                ready.etcd.store(true, Ordering::Relaxed);
                ready.destination.store(true, Ordering::Relaxed);
            }
            rescan.notify_one();
        })
    };
    let sets = Arc::new(std::sync::RwLock::new(Vec::new()));
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let addr = listener.local_addr().ok();
    tracing::info!(
        listen = ?addr,
        schedule = %schedule.describe(),
        destination = %config.destination.describe(),
        node = %config.node_name,
        cluster = %config.cluster_name,
        coordination = config.daemon.coordination.as_str(),
        version = crate::backup::AGENT_VERSION,
        "etcd-backup-agent started"
    );

    // HTTP: up until everything else is done, so runs stay visible during drain.
    let server_stop = CancellationToken::new();
    let state = Arc::new(AppState {
        runner: runner.clone(),
        metrics: metrics.clone(),
        token_sha256,
        ready: ready.clone(),
        sets: sets.clone(),
        limiter: http::TriggerLimiter::new(config.daemon.trigger_min_interval),
    });
    let server = {
        let server_stop = server_stop.clone();
        tokio::spawn(
            http::serve(listener, http::router(state.clone()), async move {
                server_stop.cancelled().await
            })
            .instrument(tracing::info_span!("http")),
        )
    };
    let metrics_server = metrics_listener.map(|l| {
        tracing::info!(listen = ?l.local_addr().ok(), "serving /metrics, /healthz and /readyz");
        let server_stop = server_stop.clone();
        tokio::spawn(
            http::serve(l, http::metrics_router(state.clone()), async move {
                server_stop.cancelled().await
            })
            .instrument(tracing::info_span!("metrics_http")),
        )
    });

    let rescan_every = schedule
        .interval_at(Utc::now())
        .map_or(CATALOG_RESCAN, |i| i.min(CATALOG_RESCAN))
        .max(Duration::from_secs(1));
    tasks.spawn(
        keep_catalog(
            config.clone(),
            metrics.clone(),
            sets,
            rescan,
            rescan_every,
            stop.clone(),
        )
        .instrument(tracing::info_span!("catalog")),
    );
    tasks.spawn(
        probe_readiness(config.clone(), ready.clone(), stop.clone())
            .instrument(tracing::info_span!("readiness")),
    );

    {
        let runner = runner.clone();
        let metrics_next = metrics.clone();
        let metrics_skip = metrics.clone();
        let metrics_end = metrics.clone();
        let jitter = config.daemon.jitter;
        let stop = stop.clone();
        let schedule = schedule.clone();
        let config = config.clone();
        let checks = tasks.clone();
        let check_stop = stop.clone();
        tasks.spawn(
            async move {
                run_scheduler(
                    schedule,
                    jitter,
                    Arc::new(SystemClock),
                    move |next| metrics_next.set_next_run(Some(next)),
                    move |at| match config.daemon.coordination {
                        Coordination::PerNode => fire_scheduled(&runner, &metrics_skip, at),
                        // The check talks to etcd; the scheduler must not wait for it.
                        Coordination::Leader => {
                            let (config, runner, metrics, stop) = (
                                config.clone(),
                                runner.clone(),
                                metrics_skip.clone(),
                                check_stop.clone(),
                            );
                            checks.spawn(
                                async move {
                                    tokio::select! {
                                        go = leader_may_back_up(&config, &metrics, at) => {
                                            if go {
                                                fire_scheduled(&runner, &metrics, at);
                                            }
                                        }
                                        () = stop.cancelled() => {}
                                    }
                                }
                                .instrument(tracing::info_span!("leader_check", scheduled = %at)),
                            );
                        }
                    },
                    stop,
                )
                .await;
                metrics_end.set_next_run(None);
            }
            .instrument(tracing::info_span!("scheduler")),
        );
    }

    if let Some(drills) = config.daemon.drill_schedule.clone() {
        let config = config.clone();
        let metrics = metrics.clone();
        let stop = stop.clone();
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let drill_tasks = tasks.clone();
        tasks.spawn(
            async move {
                run_scheduler(
                    drills,
                    Duration::ZERO,
                    Arc::new(SystemClock),
                    |_| {},
                    move |at| {
                        if busy.swap(true, Ordering::SeqCst) {
                            tracing::warn!(scheduled = %at, "restore drill skipped: the previous one is still running");
                            return;
                        }
                        let (config, metrics, busy) = (config.clone(), metrics.clone(), busy.clone());
                        drill_tasks.spawn(
                            async move {
                                let identities = match crate::restore::config_identities(&config) {
                                    Ok(i) => i,
                                    Err(e) => {
                                        tracing::error!(error = %e, "restore drill failed");
                                        busy.store(false, Ordering::SeqCst);
                                        return;
                                    }
                                };
                                match crate::restore::run_drill(&config, &config.node_name, "latest", identities.as_ref()).await {
                                    Ok(d) if d.problems.is_empty() => {
                                        metrics.drill_succeeded(Utc::now());
                                        tracing::info!(set = %d.set, revision = d.revision, keys = d.keys, "restore drill passed");
                                    }
                                    Ok(d) => tracing::error!(set = %d.set, problems = ?d.problems, "restore drill failed"),
                                    Err(e) => tracing::error!(error = %e, "restore drill failed"),
                                }
                                busy.store(false, Ordering::SeqCst);
                            }
                            .instrument(tracing::info_span!("drill")),
                        );
                    },
                    stop,
                )
                .await;
            }
            .instrument(tracing::info_span!("drill_scheduler")),
        );
    }

    {
        let runner = runner.clone();
        let config = config.clone();
        let ready = ready.clone();
        let schedule = schedule.clone();
        let metrics_start = metrics.clone();
        tasks.spawn(
            async move {
                let start = match config.daemon.run_on_start {
                    RunOnStart::Never => false,
                    RunOnStart::Always => true,
                    RunOnStart::WhenStale => {
                        let now = Utc::now();
                        let interval = schedule.interval_at(now).unwrap_or(Duration::ZERO);
                        // In leader mode any node's set counts: a restarted
                        // master need not back up when another took the tick.
                        let newest = match config.daemon.coordination {
                            Coordination::PerNode => newest_complete_set(&config).await,
                            Coordination::Leader => newest_complete_set_of_cluster(&config).await,
                        };
                        match newest {
                            Ok(newest) => {
                                ready.destination.store(true, Ordering::Relaxed);
                                let stale = newest.is_none_or(|ts| {
                                    (now - ts).to_std().unwrap_or(Duration::ZERO) > interval
                                });
                                tracing::info!(newest = ?newest.map(|t| t.to_rfc3339()), interval_s = interval.as_secs(), stale, coordination = config.daemon.coordination.as_str(), "checked the newest backup");
                                stale
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot list this node's backups; backing up now");
                                true
                            }
                        }
                    }
                };
                let start = start
                    && match config.daemon.coordination {
                        Coordination::PerNode => true,
                        Coordination::Leader => {
                            leader_may_back_up(&config, &metrics_start, Utc::now()).await
                        }
                    };
                if start {
                    if let Err(e) = runner.start(Trigger::Startup) {
                        tracing::info!(reason = %e, "no start-up backup");
                    }
                }
            }
            .instrument(tracing::info_span!("run_on_start")),
        );
    }

    shutdown.await;
    tracing::info!(
        grace_s = config.daemon.shutdown_grace.as_secs_f64(),
        "shutting down: no new backups"
    );
    runner.stop_accepting();
    stop.cancel();
    tasks.close();
    let drained = runner
        .drain(config.daemon.shutdown_grace, CLEANUP_GRACE)
        .await;
    tasks.wait().await;
    server_stop.cancel();
    let served = server.await;
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    tracing::info!(clean = drained, "stopped");
    match served {
        Ok(Err(e)) => Err(DaemonError::Serve(e)),
        _ => Ok(()),
    }
}

/// A scheduled instant arrived: start a backup, or count the skip when one
/// is in progress.
pub fn fire_scheduled(runner: &Arc<Runner>, metrics: &Metrics, at: DateTime<Utc>) {
    match runner.start(Trigger::Schedule) {
        Ok(h) => tracing::info!(scheduled = %at, run = %h.record.id, "scheduled backup started"),
        Err(StartError::InProgress { id }) => {
            metrics.skipped(SkipReason::InProgress);
            tracing::warn!(scheduled = %at, running = %id, "scheduled backup skipped: a backup is in progress");
        }
        Err(StartError::ShuttingDown) => {}
    }
}

/// `coordination: leader`: whether this node takes the scheduled start at
/// `at` (the start-up run passes its own start). Asks the local etcd member,
/// bounded by `etcd.dial_timeout`; a follower (or a member that knows no
/// leader) counts the skip and logs the leader's id. When the member cannot
/// be asked, the answer is yes: the run then fails at `connect` and is
/// alerted on, rather than skipped silently.
pub async fn leader_may_back_up(config: &Config, metrics: &Metrics, at: DateTime<Utc>) -> bool {
    let leadership = crate::daemon::coordination::check(&config.etcd).await;
    match &leadership {
        Leadership::Leader { member_id } => tracing::info!(
            scheduled = %at,
            member = %member_hex(*member_id),
            "this node's etcd member is the leader: it takes the backup"
        ),
        Leadership::Follower { member_id, leader } => {
            metrics.skipped(SkipReason::NotLeader);
            tracing::info!(
                scheduled = %at,
                member = %member_hex(*member_id),
                leader = %member_hex(*leader),
                "scheduled backup skipped: this node's etcd member is not the leader (coordination: leader)"
            );
        }
        Leadership::NoLeader { member_id } => {
            metrics.skipped(SkipReason::NotLeader);
            tracing::info!(
                scheduled = %at,
                member = %member_hex(*member_id),
                leader = "none",
                "scheduled backup skipped: this node's etcd member knows no leader (an election, or cut off from the majority)"
            );
        }
        Leadership::Unknown { error } => tracing::warn!(
            scheduled = %at,
            error = %error,
            "cannot ask the local etcd member whether it leads; backing up anyway, so a failure is recorded as a failed run"
        ),
    }
    leadership.backs_up()
}

/// When this node's newest set finished, if it has one: a complete set as
/// the catalog defines it (the one definition), or a newer-format set.
///
/// # Errors
/// The destination could not be opened, listed or its manifests read.
pub async fn newest_complete_set(config: &Config) -> Result<Option<DateTime<Utc>>, CatalogError> {
    newest_finished(config, Some(&config.node_name)).await
}

/// When the cluster's newest set (of any node) finished, if any.
///
/// # Errors
/// As [`newest_complete_set`].
pub async fn newest_complete_set_of_cluster(
    config: &Config,
) -> Result<Option<DateTime<Utc>>, CatalogError> {
    newest_finished(config, None).await
}

async fn newest_finished(
    config: &Config,
    node: Option<&str>,
) -> Result<Option<DateTime<Utc>>, CatalogError> {
    let dest = destination::open(&config.destination).await?;
    let cat = crate::store::catalog::scan(dest.as_ref(), &config.cluster_name, node).await?;
    Ok(finished_times(&cat).map(|(_, at)| at).max())
}

/// Scans the cluster's sets at start, after every run and every
/// `rescan_every`: this node's for the API, `etcd_backup_sets` and the seeded
/// last success; every node's for `etcd_backup_cluster_last_success_timestamp_seconds`.
async fn keep_catalog(
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    sets: Arc<std::sync::RwLock<Vec<etcd_backup_proto::api::SetSummary>>>,
    rescan: Arc<tokio::sync::Notify>,
    rescan_every: Duration,
    stop: CancellationToken,
) {
    // Each rescan lists the sets of every node but reads only new manifests.
    let mut cache = crate::store::catalog::ManifestCache::default();
    loop {
        let scanned = match destination::open(&config.destination).await {
            Ok(dest) => crate::store::catalog::scan_cached(
                dest.as_ref(),
                &config.cluster_name,
                None,
                &mut cache,
            )
            .await
            .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match scanned {
            Ok(cat) => {
                if let Some((node, at)) = cluster_newest(&cat) {
                    metrics.set_cluster_last_success(node, at);
                }
                let own: Vec<&crate::store::catalog::CatalogSet> = cat
                    .sets
                    .iter()
                    .filter(|s| s.id.node == config.node_name)
                    .collect();
                metrics.set_sets(own.len());
                metrics.set_unrecognised(cat.needing_attention(&config.node_name));
                if let Some(at) = finished_times(&cat)
                    .filter(|(node, _)| *node == config.node_name)
                    .map(|(_, at)| at)
                    .max()
                {
                    metrics.seed_last_success(at);
                }
                let summaries = own.iter().rev().map(|s| s.summary()).collect();
                if let Ok(mut s) = sets.write() {
                    *s = summaries;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot scan the cluster's backup sets"),
        }
        tokio::select! {
            _ = rescan.notified() => {}
            _ = tokio::time::sleep(rescan_every) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// When each set finished, with its node: complete sets, and sets with a
/// newer manifest format (a downgraded agent still has those backups).
fn finished_times(
    cat: &crate::store::catalog::Catalog,
) -> impl Iterator<Item = (&str, DateTime<Utc>)> + '_ {
    cat.sets
        .iter()
        .map(|s| (s.id.node.as_str(), s.manifest.finished_at))
        .chain(
            cat.newer_format()
                .filter_map(|l| Some((l.node.as_str(), l.finished_at?))),
        )
}

/// The set that finished last, of any node (ties: the later node name, so
/// every agent picks the same one).
fn cluster_newest(cat: &crate::store::catalog::Catalog) -> Option<(&str, DateTime<Utc>)> {
    finished_times(cat).max_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)))
}

async fn probe_readiness(config: Arc<Config>, ready: Arc<ReadyFlags>, stop: CancellationToken) {
    loop {
        let etcd_ok = match EtcdMember::connect(&config.etcd).await {
            Ok(mut m) => m.member_info().await.is_ok(),
            Err(_) => false,
        };
        if ready.etcd.swap(etcd_ok, Ordering::Relaxed) != etcd_ok {
            tracing::info!(etcd_ok, "etcd readiness changed");
        }
        if !ready.destination.load(Ordering::Relaxed) {
            let reached = match destination::open(&config.destination).await {
                Ok(d) => d.list("").await.is_ok(),
                Err(_) => false,
            };
            if reached {
                ready.destination.store(true, Ordering::Relaxed);
                tracing::info!("destination reached");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Environment;

    #[tokio::test]
    async fn a_scheduled_start_during_a_run_is_skipped_and_counted() {
        // A member that accepts connections and never answers keeps the run busy.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let text = format!(
            "node_name: n\netcd:\n  endpoints: [\"http://{addr}\"]\n  dial_timeout: 30s\nresources:\n  layout: none\ndestination:\n  local:\n    path: {}\nretry:\n  attempts: 1\n",
            tmp.path().display()
        );
        let env = Environment {
            node_name: None,
            hostname: None,
        };
        let config = Arc::new(Config::parse(&text, &env).unwrap());
        let metrics = Arc::new(Metrics::new("test"));
        let runner = Runner::new(config, metrics.clone(), |_| {});
        let at = Utc::now();
        fire_scheduled(&runner, &metrics, at);
        assert!(runner.current().is_some());
        fire_scheduled(&runner, &metrics, at);
        fire_scheduled(&runner, &metrics, at);
        let text = metrics.encode();
        assert!(
            text.contains("etcd_backup_skipped_total{reason=\"in_progress\"} 2"),
            "{text}"
        );
        assert!(text.contains("etcd_backup_in_progress 1"), "{text}");
        assert_eq!(runner.list().len(), 1);
        assert!(
            runner
                .drain(Duration::from_millis(10), Duration::from_secs(5))
                .await
        );
        drop(silent);
    }
}
