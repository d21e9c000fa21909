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
pub mod unchanged;

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

/// The catalog's summaries the API serves, kept fresh by [`keep_catalog`].
type SetSummaries = Arc<std::sync::RwLock<Vec<etcd_backup_proto::api::SetSummary>>>;

/// Runs the daemon on an already-bound listener until `shutdown` completes
/// (tests pass a listener on port 0 and their own shutdown future).
///
/// Start-up (`Daemon::start`), serving (`Servers::start`), the background
/// tasks (catalog, readiness, the schedules, the start-up run), then on
/// `shutdown` the drain (`Daemon::shut_down`).
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
    let token_sha256 = read_token(&config)?;
    let rescan = Arc::new(tokio::sync::Notify::new());
    let daemon = Daemon::start(config, rescan.clone());
    let sets: SetSummaries = Arc::new(std::sync::RwLock::new(Vec::new()));
    tracing::info!(
        listen = ?listener.local_addr().ok(),
        schedule = %schedule.describe(),
        destination = %daemon.config.destination().describe(),
        node = %daemon.config.node_name,
        cluster = %daemon.config.cluster_name,
        coordination = daemon.config.daemon.coordination.as_str(),
        version = crate::backup::AGENT_VERSION,
        "etcd-backup-agent started"
    );

    // HTTP: up until everything else is done, so runs stay visible during drain.
    let servers = Servers::start(
        &daemon,
        token_sha256,
        sets.clone(),
        listener,
        metrics_listener,
    );
    daemon.spawn_catalog_and_readiness(sets, rescan, &schedule);
    daemon.spawn_backup_scheduler(schedule.clone());
    if let Some(drills) = daemon.config.daemon.drill_schedule.clone() {
        daemon.spawn_drill_scheduler(drills);
    }
    daemon.spawn_start_up_run(schedule);

    shutdown.await;
    daemon.shut_down(servers).await
}

/// `daemon.token_file`'s token, as the SHA-256 the API compares against.
fn read_token(config: &Config) -> Result<Option<[u8; 32]>, DaemonError> {
    let Some(path) = &config.daemon.token_file else {
        return Ok(None);
    };
    let token = std::fs::read_to_string(path).map_err(|source| DaemonError::Token {
        path: path.clone(),
        source,
    })?;
    Ok(Some(http::token_digest(token.trim())))
}

/// What the daemon's tasks share, from start-up to shutdown.
struct Daemon {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    ready: Arc<ReadyFlags>,
    runner: Arc<Runner>,
    /// Cancelled at shutdown: the schedules and background tasks stop.
    stop: CancellationToken,
    /// Every background task, waited for at shutdown.
    tasks: TaskTracker,
}

/// The API listener's task and the optional metrics listener's, stopped last.
struct Servers {
    stop: CancellationToken,
    api: tokio::task::JoinHandle<std::io::Result<()>>,
    metrics: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Servers {
    /// Serves the API on `listener` (and `/metrics`, `/healthz`, `/readyz` on
    /// `metrics_listener`, if given) until [`Daemon::shut_down`] stops them.
    fn start(
        daemon: &Daemon,
        token_sha256: Option<[u8; 32]>,
        sets: SetSummaries,
        listener: tokio::net::TcpListener,
        metrics_listener: Option<tokio::net::TcpListener>,
    ) -> Self {
        let stop = CancellationToken::new();
        let state = Arc::new(AppState {
            runner: daemon.runner.clone(),
            metrics: daemon.metrics.clone(),
            token_sha256,
            ready: daemon.ready.clone(),
            sets,
            limiter: http::TriggerLimiter::new(daemon.config.daemon.trigger_min_interval),
        });
        let api = {
            let stop = stop.clone();
            let limits = listener
                .local_addr()
                .map_or(http::ConnectionLimits::DEFAULT, http::ConnectionLimits::api);
            tokio::spawn(
                http::serve_with(
                    listener,
                    http::router(state.clone()),
                    async move { stop.cancelled().await },
                    limits,
                )
                .instrument(tracing::info_span!("http")),
            )
        };
        let metrics = metrics_listener.map(|l| {
            tracing::info!(listen = ?l.local_addr().ok(), "serving /metrics, /healthz and /readyz");
            let stop = stop.clone();
            tokio::spawn(
                http::serve(l, http::metrics_router(state.clone()), async move {
                    stop.cancelled().await
                })
                .instrument(tracing::info_span!("metrics_http")),
            )
        });
        Self { stop, api, metrics }
    }
}

impl Daemon {
    /// Metrics, readiness flags and the single-flight runner; a finished
    /// successful run marks etcd and the destination ready, and any finished
    /// run asks for a catalog rescan.
    fn start(config: Config, rescan: Arc<tokio::sync::Notify>) -> Self {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::with_destinations(
            crate::backup::AGENT_VERSION,
            config.daemon.coordination,
            &config.destination_names(),
        ));
        let ready = Arc::new(ReadyFlags::default());
        let runner = {
            let ready = ready.clone();
            Runner::new(config.clone(), metrics.clone(), move |succeeded| {
                if succeeded {
                    ready.etcd.store(true, Ordering::Relaxed);
                    ready.destination.store(true, Ordering::Relaxed);
                }
                rescan.notify_one();
            })
        };
        Self {
            config,
            metrics,
            ready,
            runner,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// The catalog rescans (at least as often as the schedule fires, at most
    /// every [`CATALOG_RESCAN`]) and the readiness probe.
    fn spawn_catalog_and_readiness(
        &self,
        sets: SetSummaries,
        rescan: Arc<tokio::sync::Notify>,
        schedule: &crate::policy::schedule::Schedule,
    ) {
        let rescan_every = schedule
            .interval_at(Utc::now())
            .map_or(CATALOG_RESCAN, |i| i.min(CATALOG_RESCAN))
            .max(Duration::from_secs(1));
        self.tasks.spawn(
            keep_catalog(
                self.config.clone(),
                self.metrics.clone(),
                sets,
                rescan,
                rescan_every,
                self.stop.clone(),
            )
            .instrument(tracing::info_span!("catalog")),
        );
        self.tasks.spawn(
            probe_readiness(self.config.clone(), self.ready.clone(), self.stop.clone())
                .instrument(tracing::info_span!("readiness")),
        );
    }

    /// The backup schedule: each instant starts a run (after asking etcd
    /// whether this member leads, with `coordination: leader`).
    fn spawn_backup_scheduler(&self, schedule: crate::policy::schedule::Schedule) {
        let runner = self.runner.clone();
        let metrics_next = self.metrics.clone();
        let metrics_skip = self.metrics.clone();
        let metrics_end = self.metrics.clone();
        let jitter = self.config.daemon.jitter;
        let stop = self.stop.clone();
        let config = self.config.clone();
        let checks = self.tasks.clone();
        let check_stop = self.stop.clone();
        self.tasks.spawn(
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
                            checks.spawn(
                                leader_then_fire(
                                    config.clone(),
                                    runner.clone(),
                                    metrics_skip.clone(),
                                    check_stop.clone(),
                                    at,
                                )
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

    /// `daemon.drill_schedule`: a restore drill of the newest set at each
    /// instant, skipped while the previous one still runs.
    fn spawn_drill_scheduler(&self, drills: crate::policy::schedule::Schedule) {
        let config = self.config.clone();
        let metrics = self.metrics.clone();
        let stop = self.stop.clone();
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let drill_tasks = self.tasks.clone();
        self.tasks.spawn(
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
                        drill_tasks.spawn(
                            scheduled_drill(config.clone(), metrics.clone(), busy.clone())
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

    /// `daemon.run_on_start`: a backup right away, always or when the newest
    /// complete set is older than the schedule's interval.
    fn spawn_start_up_run(&self, schedule: crate::policy::schedule::Schedule) {
        let runner = self.runner.clone();
        let config = self.config.clone();
        let ready = self.ready.clone();
        let metrics = self.metrics.clone();
        self.tasks.spawn(
            async move {
                let start = start_up_run_wanted(&config, &ready, &schedule).await
                    && match config.daemon.coordination {
                        Coordination::PerNode => true,
                        Coordination::Leader => {
                            leader_may_back_up(&config, &metrics, Utc::now()).await
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

    /// No new runs; the one in progress gets `shutdown_grace`; the tasks
    /// stop; the servers go last, so runs stay visible during the drain.
    async fn shut_down(self, servers: Servers) -> Result<(), DaemonError> {
        tracing::info!(
            grace_s = self.config.daemon.shutdown_grace.as_secs_f64(),
            "shutting down: no new backups"
        );
        self.runner.stop_accepting();
        self.stop.cancel();
        self.tasks.close();
        let drained = self
            .runner
            .drain(self.config.daemon.shutdown_grace, CLEANUP_GRACE)
            .await;
        self.tasks.wait().await;
        servers.stop.cancel();
        let served = servers.api.await;
        if let Some(m) = servers.metrics {
            let _ = m.await;
        }
        tracing::info!(clean = drained, "stopped");
        match served {
            Ok(Err(e)) => Err(DaemonError::Serve(e)),
            _ => Ok(()),
        }
    }
}

/// With `coordination: leader`: start the scheduled run only if this member
/// leads (or leadership is unknown), unless shutdown comes first.
async fn leader_then_fire(
    config: Arc<Config>,
    runner: Arc<Runner>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    at: DateTime<Utc>,
) {
    tokio::select! {
        go = leader_may_back_up(&config, &metrics, at) => {
            if go {
                fire_scheduled(&runner, &metrics, at);
            }
        }
        () = stop.cancelled() => {}
    }
}

/// One scheduled restore drill of the newest set; clears `busy` when done.
async fn scheduled_drill(
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    busy: Arc<std::sync::atomic::AtomicBool>,
) {
    let identities = match crate::restore::config_identities(&config) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "restore drill failed");
            busy.store(false, Ordering::SeqCst);
            return;
        }
    };
    match crate::restore::run_drill(&config, &config.node_name, "latest", identities.as_ref()).await
    {
        Ok(d) if d.problems.is_empty() => {
            metrics.drill_succeeded(Utc::now());
            tracing::info!(set = %d.set, revision = d.revision, keys = d.keys, "restore drill passed");
        }
        Ok(d) => tracing::error!(set = %d.set, problems = ?d.problems, "restore drill failed"),
        Err(e) => tracing::error!(error = %e, "restore drill failed"),
    }
    busy.store(false, Ordering::SeqCst);
}

/// Whether `run_on_start` asks for a backup now. With `when_stale`, a
/// destination that answers marks it ready; one that does not means a backup.
async fn start_up_run_wanted(
    config: &Config,
    ready: &ReadyFlags,
    schedule: &crate::policy::schedule::Schedule,
) -> bool {
    match config.daemon.run_on_start {
        RunOnStart::Never => false,
        RunOnStart::Always => true,
        RunOnStart::WhenStale => {
            let now = Utc::now();
            let interval = schedule.interval_at(now).unwrap_or(Duration::ZERO);
            // In leader mode any node's set counts: a restarted
            // master need not back up when another took the tick.
            let newest = match config.daemon.coordination {
                Coordination::PerNode => newest_complete_set(config).await,
                Coordination::Leader => newest_complete_set_of_cluster(config).await,
            };
            match newest {
                Ok(newest) => {
                    ready.destination.store(true, Ordering::Relaxed);
                    let stale = newest
                        .is_none_or(|ts| (now - ts).to_std().unwrap_or(Duration::ZERO) > interval);
                    tracing::info!(newest = ?newest.map(|t| t.to_rfc3339()), interval_s = interval.as_secs(), stale, coordination = config.daemon.coordination.as_str(), "checked the newest backup");
                    stale
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list this node's backups; backing up now");
                    true
                }
            }
        }
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

/// The newest set's finish time at the destination whose newest is oldest:
/// with several destinations, a run is due as soon as one of them is stale
/// (`None` when one holds no set at all).
async fn newest_finished(
    config: &Config,
    node: Option<&str>,
) -> Result<Option<DateTime<Utc>>, CatalogError> {
    let mut oldest_newest: Option<Option<DateTime<Utc>>> = None;
    for d in &config.destinations {
        let dest = destination::open(&d.config).await?;
        let cat = crate::store::catalog::scan(dest.as_ref(), &config.cluster_name, node).await?;
        let newest = finished_times(&cat).map(|(_, at)| at).max();
        oldest_newest = Some(match oldest_newest {
            None => newest,
            Some(seen) => seen.min(newest),
        });
    }
    Ok(oldest_newest.flatten())
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
    // Each rescan lists the sets of every node but reads only new
    // manifests; one cache per destination.
    let mut caches: Vec<crate::store::catalog::ManifestCache> = config
        .destinations
        .iter()
        .map(|_| crate::store::catalog::ManifestCache::default())
        .collect();
    loop {
        let mut cluster: Option<(String, DateTime<Utc>)> = None;
        for (i, (d, cache)) in config.destinations.iter().zip(&mut caches).enumerate() {
            let scanned = match destination::open(&d.config).await {
                Ok(dest) => crate::store::catalog::scan_cached(
                    dest.as_ref(),
                    &config.cluster_name,
                    None,
                    cache,
                )
                .await
                .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let cat = match scanned {
                Ok(cat) => cat,
                Err(e) => {
                    tracing::warn!(destination = %d.name, error = %e, "cannot scan the cluster's backup sets");
                    continue;
                }
            };
            if let Some((node, at)) = cluster_newest(&cat) {
                if cluster.as_ref().is_none_or(|(_, seen)| at > *seen) {
                    cluster = Some((node.to_string(), at));
                }
            }
            let own: Vec<&crate::store::catalog::CatalogSet> = cat
                .sets
                .iter()
                .filter(|s| s.id.node == config.node_name)
                .collect();
            metrics.set_sets(&d.name, own.len());
            metrics.set_unrecognised(&d.name, cat.needing_attention(&config.node_name));
            if let Some(at) = finished_times(&cat)
                .filter(|(node, _)| *node == config.node_name)
                .map(|(_, at)| at)
                .max()
            {
                metrics.seed_last_success(&d.name, at);
            }
            // The API lists the sets of the first destination, the one
            // commands use by default.
            if i == 0 {
                let summaries = own.iter().rev().map(|s| s.summary()).collect();
                if let Ok(mut s) = sets.write() {
                    *s = summaries;
                }
            }
        }
        if let Some((node, at)) = cluster {
            metrics.set_cluster_last_success(&node, at);
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
            // Ready once any destination answers: the agent can store sets
            // there; a destination that does not shows in its metrics.
            let mut reached = false;
            for d in &config.destinations {
                reached = match destination::open(&d.config).await {
                    Ok(d) => d.list("").await.is_ok(),
                    Err(_) => false,
                };
                if reached {
                    break;
                }
            }
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
