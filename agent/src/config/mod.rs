//! The agent's configuration file (YAML): parsed, defaulted and validated in
//! one place, completely, before anything is started.
//!
//! Parsing happens in two steps. [`RawConfig`] mirrors the file exactly (serde,
//! unknown keys rejected); [`Config::from_raw`] then checks every value and turns
//! it into the typed [`Config`] the rest of the agent uses. Every problem found is
//! reported with its field path, all at once, so a person fixes the file in one go.
//!
//! This file holds the types and the shared checks; each section's validator
//! is a file beside it (`etcd`, `resources`, `destination`, `daemon`,
//! `encryption`, `compression`, `retention`, `retry`, `log`). Config may import only `policy`,
//! `encryption` and the workspace crates: it is data the rest of the agent reads.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use etcd_backup_proto::is_valid_name_component;

mod compression;
mod daemon;
mod destination;
mod encryption;
mod etcd;
mod log;
mod resources;
mod retention;
mod retry;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid YAML of the expected shape, or a value is invalid.
    #[error("invalid config file {path}:\n{}", FieldErrors(.errors))]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Every problem found, each naming its field path.
        errors: Vec<FieldError>,
    },
}

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `etcd.endpoints[0]`; `.` for the document.
    pub field: String,
    /// What is wrong and, where it helps, what to do.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

struct FieldErrors<'a>(&'a [FieldError]);

impl fmt::Display for FieldErrors<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// The file as written, before validation. Unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    node_name: Option<String>,
    cluster_name: Option<String>,
    etcd: Option<RawEtcd>,
    resources: Option<RawResources>,
    destination: Option<RawDestination>,
    destinations: Option<Vec<RawNamedDestination>>,
    retry: Option<RawRetry>,
    log: Option<RawLog>,
    schedule: Option<String>,
    timezone: Option<String>,
    jitter: Option<String>,
    run_on_start: Option<String>,
    coordination: Option<String>,
    skip_unchanged: Option<bool>,
    http: Option<RawHttp>,
    shutdown_grace: Option<String>,
    retention: Option<RawRetention>,
    drill_schedule: Option<String>,
    #[serde(default, deserialize_with = "present")]
    encryption: Option<Option<RawEncryption>>,
    compression: Option<String>,
    compression_level: Option<i64>,
    snapshot_format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEncryption {
    recipients: Option<Vec<String>>,
    recipients_file: Option<PathBuf>,
    identity_file: Option<PathBuf>,
    page_id_key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    keep_last: Option<u32>,
    keep_hourly: Option<u32>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
    keep_monthly: Option<u32>,
    max_age: Option<String>,
    stale_partial_after: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<String>,
    token_file: Option<PathBuf>,
    metrics_listen: Option<String>,
    trigger_min_interval: Option<String>,
    allow_unauthenticated_remote: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    endpoints: Option<Vec<String>>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    dial_timeout: Option<String>,
    stall_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    layout: Option<String>,
    root: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    /// `Some(None)` for a key given with no value (`local:`), so the error can
    /// name the missing `path` rather than claim there is no destination.
    #[serde(default, deserialize_with = "present")]
    local: Option<Option<RawLocal>>,
    #[serde(default, deserialize_with = "present")]
    sftp: Option<Option<RawSftp>>,
    #[serde(default, deserialize_with = "present")]
    s3: Option<Option<RawS3>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawS3 {
    endpoint: Option<String>,
    region: Option<String>,
    bucket: Option<String>,
    prefix: Option<String>,
    path_style: Option<bool>,
    access_key_id_file: Option<PathBuf>,
    secret_access_key_file: Option<PathBuf>,
    session_token_file: Option<PathBuf>,
    storage_class: Option<String>,
    ca_file: Option<PathBuf>,
    allow_plaintext_http: Option<bool>,
}

/// One entry of `destinations:`: a name and exactly one kind.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamedDestination {
    name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    local: Option<Option<RawLocal>>,
    #[serde(default, deserialize_with = "present")]
    sftp: Option<Option<RawSftp>>,
    #[serde(default, deserialize_with = "present")]
    s3: Option<Option<RawS3>>,
}

impl RawNamedDestination {
    /// The name, and the destination as `destination:` would hold it.
    fn split(self) -> (Option<String>, RawDestination) {
        (
            self.name,
            RawDestination {
                local: self.local,
                sftp: self.sftp,
                s3: self.s3,
            },
        )
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSftp {
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    path: Option<String>,
    known_hosts_file: Option<PathBuf>,
    host_key_fingerprint: Option<String>,
    private_key_file: Option<PathBuf>,
    private_key_passphrase_file: Option<PathBuf>,
    password_file: Option<PathBuf>,
    connect_timeout: Option<String>,
    io_timeout: Option<String>,
    require_fsync: Option<bool>,
    streams: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    attempts: Option<u32>,
    initial_delay: Option<String>,
    max_delay: Option<String>,
}

fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocal {
    path: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

/// Defaults, in one place.
pub mod defaults {
    use std::time::Duration;

    /// `cluster_name` when none is given.
    pub const CLUSTER_NAME: &str = "default";
    /// `etcd.dial_timeout`.
    pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
    /// `etcd.stall_timeout`.
    pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);
    /// `resources.root`: where the host's `/etc/kubernetes` is mounted.
    pub const RESOURCES_ROOT: &str = "/etc/kubernetes";
    /// `log.level`.
    pub const LOG_LEVEL: &str = "info";
    /// `destination.sftp.port`.
    pub const SFTP_PORT: u16 = 22;
    /// `destination.sftp.connect_timeout`.
    pub const SFTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    /// `destination.sftp.io_timeout`.
    pub const SFTP_IO_TIMEOUT: Duration = Duration::from_secs(60);
    /// `destination.sftp.streams`: SFTP sessions each file is striped over
    /// (docs/sftp.md says how this was chosen).
    pub const SFTP_STREAMS: u32 = 16;
    /// The largest `destination.sftp.streams` accepted.
    pub const SFTP_STREAMS_MAX: u32 = 32;
    /// `destination.s3.region`: what S3-compatible stores without regions
    /// (Garage, MinIO, Ceph RGW) accept by default.
    pub const S3_REGION: &str = "us-east-1";
    /// `retry.attempts`: attempts in all, the first included.
    pub const RETRY_ATTEMPTS: u32 = 3;
    /// `retry.initial_delay`.
    pub const RETRY_INITIAL_DELAY: Duration = Duration::from_secs(5);
    /// `retry.max_delay`.
    pub const RETRY_MAX_DELAY: Duration = Duration::from_secs(60);
    /// `http.listen`: loopback only, so with the pod on the host network the
    /// trigger is reachable from this master alone. 10290 is outside the ranges
    /// OpenShift and kubeadm control planes use (2379-2380, 6443, 9000-9999,
    /// 10250-10259, 22623-22624, 30000-32767).
    pub const HTTP_LISTEN: &str = "127.0.0.1:10290";
    /// `shutdown_grace`: under Kubernetes' default 30 s termination grace.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);
    /// `http.trigger_min_interval`: long enough that a client looping on
    /// `POST` cannot start back-to-back runs, short enough that nobody waits
    /// for it by hand.
    pub const TRIGGER_MIN_INTERVAL: Duration = Duration::from_secs(5);
    /// `compression_level` with `compression: zstd`: zstd's fastest level.
    /// On one core of the 2-core test machine it compressed a JSON-valued
    /// etcd snapshot at 750-830 MB/s and random data at 3 GB/s, well ahead
    /// of etcd's snapshot stream (280-340 MB/s); zstd's own default, 3, ran
    /// at 380 MB/s, too close to it (docs/configuration.md#compression).
    pub const COMPRESSION_LEVEL: i32 = 1;
    /// `skip_unchanged`: a scheduled run stores no set identical to the
    /// newest one (docs/daemon.md#unchanged-etcd-skipped-runs).
    pub const SKIP_UNCHANGED: bool = true;
}

pub use compression::{CompressionConfig, LEVELS as COMPRESSION_LEVELS};

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's name: the second path component of every set it writes.
    pub node_name: String,
    /// The cluster's name: the first path component of every set.
    pub cluster_name: String,
    /// How to reach the local etcd member.
    pub etcd: EtcdConfig,
    /// Which static-pod resources to bundle.
    pub resources: ResourcesConfig,
    /// Where backup sets are stored: `destinations:` in order, or the one
    /// `destination:` named [`DEFAULT_DESTINATION_NAME`]. Never empty; the
    /// first is the one commands use without `--destination`.
    pub destinations: Vec<NamedDestination>,
    /// How failed attempts are retried.
    pub retry: RetryConfig,
    /// Logging.
    pub log: LogConfig,
    /// What the daemon (`run`) needs beyond a single backup.
    pub daemon: DaemonConfig,
    /// Which sets `prune` (and the daemon after each success) removes.
    pub retention: crate::policy::retention::RetentionPolicy,
    /// `encryption`: when set, data files are stored age-encrypted.
    pub encryption: Option<crate::encryption::EncryptionConfig>,
    /// `compression` (with `compression_level`): when set, the snapshot is
    /// stored compressed (`snapshot_<ts>.db.zst`), before any encryption.
    /// `None` for `compression: none`, the default, because OpenShift's
    /// `cluster-restore.sh` wants a plain `snapshot_<ts>.db`.
    pub compression: Option<CompressionConfig>,
    /// `snapshot_format`: how the snapshot is stored.
    pub snapshot_format: SnapshotFormat,
}

/// `snapshot_format`: how a set stores its snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotFormat {
    /// One file per set, `snapshot_<ts>.db` (`.zst`, `.age`): the default.
    #[default]
    Full,
    /// Pages in the node's packs, each stored once, located by the set's
    /// page index (docs/backup-set-format.md#paged-sets).
    Paged,
}

impl SnapshotFormat {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotFormat::Full => "full",
            SnapshotFormat::Paged => "paged",
        }
    }
}

/// The daemon's settings: schedule, HTTP endpoint, shutdown.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// `schedule` in `timezone`; required by `run`, unused by `backup`.
    pub schedule: Option<crate::policy::schedule::Schedule>,
    /// `jitter`: random delay added to each scheduled start.
    pub jitter: Duration,
    /// `run_on_start`.
    pub run_on_start: RunOnStart,
    /// `coordination`: which masters back up on a scheduled start.
    pub coordination: Coordination,
    /// `http.listen`.
    pub listen: std::net::SocketAddr,
    /// `http.token_file`: when set, `POST` needs `Authorization: Bearer <token>`.
    pub token_file: Option<PathBuf>,
    /// `http.metrics_listen`: a second listener serving only `/metrics`,
    /// `/healthz` and `/readyz`, for Prometheus and kubelet probes, which reach
    /// a host-network pod on the node's address rather than loopback.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `http.trigger_min_interval`: at most one accepted `POST` per client
    /// (peer address) in this interval; zero disables the limit.
    pub trigger_min_interval: Duration,
    /// `shutdown_grace`: how long a run in progress may take after SIGTERM.
    pub shutdown_grace: Duration,
    /// `drill_schedule` (in `timezone`): when the daemon drills the newest set.
    pub drill_schedule: Option<crate::policy::schedule::Schedule>,
    /// `skip_unchanged`: a run the daemon starts itself (schedule,
    /// `run_on_start`) stores no set when etcd's revision is the newest
    /// complete set's at every destination ([`crate::daemon::unchanged`]).
    pub skip_unchanged: bool,
}

/// `run_on_start`: whether the daemon backs up right after it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOnStart {
    /// When the newest complete set of this node is older than one schedule
    /// interval, or there is none.
    WhenStale,
    /// Always.
    Always,
    /// Never; wait for the schedule.
    Never,
}

/// `coordination`: which masters back up when the schedule fires (and at
/// start-up). HTTP-triggered backups and the `backup` command run on any
/// master in either mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coordination {
    /// Every master backs up on its schedule.
    PerNode,
    /// Only the master whose etcd member is the raft leader at that moment
    /// backs up; the others skip and count it.
    Leader,
}

impl Coordination {
    /// The name used in the config file and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Coordination::PerNode => "per_node",
            Coordination::Leader => "leader",
        }
    }
}

/// `etcd:`
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// The local member first; the snapshot is taken from `endpoints[0]` only.
    pub endpoints: Vec<Url>,
    /// Client TLS, present when the endpoints use `https`.
    pub tls: Option<EtcdTls>,
    /// How long connecting and the first status call may take.
    pub dial_timeout: Duration,
    /// A snapshot stream that sends nothing for this long fails.
    pub stall_timeout: Duration,
}

/// Client TLS material for etcd, as file paths; read when connecting.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// CA bundle that signed etcd's serving certificate.
    pub ca_file: PathBuf,
    /// Client certificate and key, when etcd requires client certificates.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Which tree of static-pod resources to bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// OpenShift 4: the `static-pod-resources/<name>-pod-N` revisions the live manifests use.
    Openshift,
    /// kubeadm: `manifests/*.yaml`, `pki/**` and the encryption provider config.
    Kubeadm,
    /// No tarball.
    None,
}

impl Layout {
    /// The name used in the config file and the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Openshift => "openshift",
            Layout::Kubeadm => "kubeadm",
            Layout::None => "none",
        }
    }
}

/// `resources:`
#[derive(Debug, Clone)]
pub struct ResourcesConfig {
    /// Which files to take.
    pub layout: Layout,
    /// Where the host's `/etc/kubernetes` is mounted.
    pub root: PathBuf,
}

/// The name `destination:` (a single destination) goes by in results,
/// metric labels and `--destination`.
pub const DEFAULT_DESTINATION_NAME: &str = "default";

/// The longest destination name accepted (it is a metric label value).
pub const DESTINATION_NAME_MAX: usize = 32;

/// One configured destination and its name.
#[derive(Debug, Clone)]
pub struct NamedDestination {
    /// `destinations[i].name` (`default` for `destination:`): lower-case
    /// letters, digits and `-`, unique, used as the `destination` metric label.
    pub name: String,
    /// Where and how.
    pub config: DestinationConfig,
}

impl Config {
    /// The first configured destination: the one commands use without
    /// `--destination`.
    pub fn default_destination(&self) -> &NamedDestination {
        &self.destinations[0]
    }

    /// The first configured destination's settings.
    pub fn destination(&self) -> &DestinationConfig {
        &self.default_destination().config
    }

    /// The destination `--destination NAME` names, or the first one when no
    /// name is given.
    ///
    /// # Errors
    /// An unknown name, with the configured names listed.
    pub fn named_destination(&self, name: Option<&str>) -> Result<&NamedDestination, String> {
        let Some(name) = name else {
            return Ok(self.default_destination());
        };
        self.destinations
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| {
                format!(
                    "no destination named {name:?} is configured; the configured destinations are: {}",
                    self.destination_names().join(", ")
                )
            })
    }

    /// This configuration with only the destination `name` (the first
    /// without one): what a command given `--destination` works on.
    ///
    /// # Errors
    /// As [`Config::named_destination`].
    pub fn only_destination(mut self, name: Option<&str>) -> Result<Config, String> {
        let chosen = self.named_destination(name)?.clone();
        self.destinations = vec![chosen];
        Ok(self)
    }

    /// The configured destinations' names, in order.
    pub fn destination_names(&self) -> Vec<&str> {
        self.destinations.iter().map(|d| d.name.as_str()).collect()
    }
}

/// `destination:`, exactly one of its kinds.
#[derive(Debug, Clone)]
pub enum DestinationConfig {
    /// `destination.local`: a directory on this machine.
    Local {
        /// Base directory; sets go below `<path>/<cluster>/<node>/`.
        path: PathBuf,
    },
    /// `destination.sftp`: a directory on an SFTP server.
    Sftp(SftpConfig),
    /// `destination.s3`: a bucket (and prefix) of an S3-compatible store.
    S3(S3Config),
}

impl DestinationConfig {
    /// Where sets go, for people (no secrets).
    pub fn describe(&self) -> String {
        match self {
            DestinationConfig::Local { path } => format!("local:{}", path.display()),
            DestinationConfig::Sftp(s) => {
                format!("sftp://{}@{}:{}{}", s.user, s.host, s.port, s.path)
            }
            DestinationConfig::S3(s) => s.describe(),
        }
    }
}

/// `destination.sftp:`. Secrets are file paths; their contents are read when
/// connecting and never kept in this struct, printed or logged.
#[derive(Debug, Clone)]
pub struct SftpConfig {
    /// Server host name or address.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Login user.
    pub user: String,
    /// Base directory on the server.
    pub path: String,
    /// How the server's host key is checked.
    pub host_key: HostKeyCheck,
    /// How we authenticate.
    pub auth: SftpAuth,
    /// TCP connect, SSH handshake and authentication together.
    pub connect_timeout: Duration,
    /// Any single SFTP request, or a write that makes no progress, for this long fails.
    pub io_timeout: Duration,
    /// Refuse to back up to a server that cannot sync files to disk
    /// (`fsync@openssh.com`); when false, such sets are stored and recorded
    /// as not durable.
    pub require_fsync: bool,
    /// SFTP sessions each file is written and read over at once, each
    /// carrying its own byte ranges; 1 is one session, as before striping.
    pub streams: u32,
}

/// `destination.s3:`. The credentials are file paths; their contents are
/// read when the destination is opened and never kept here, printed or logged.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// The store's URL (`http://` or `https://`, no path).
    pub endpoint: url::Url,
    /// The region requests are signed for.
    pub region: String,
    /// The bucket.
    pub bucket: String,
    /// Key prefix every set is stored below (no leading or trailing `/`).
    pub prefix: Option<String>,
    /// Path-style URLs (`<endpoint>/<bucket>/<key>`) instead of
    /// virtual-hosted ones (`<bucket>.<host>/<key>`).
    pub path_style: bool,
    /// A file holding the access key id.
    pub access_key_id_file: PathBuf,
    /// A file holding the secret access key.
    pub secret_access_key_file: PathBuf,
    /// A file holding a session token, for temporary (STS-issued) keys;
    /// sent, signed, as `x-amz-security-token`. Read again for each run,
    /// so a token refreshed in the file is picked up.
    pub session_token_file: Option<PathBuf>,
    /// Sent as `x-amz-storage-class` when objects are created.
    pub storage_class: Option<String>,
    /// PEM certificates trusted for `https` besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// `allow_plaintext_http`: an `http://` endpoint is accepted without
    /// `encryption:` (the data then crosses the network in clear).
    pub allow_plaintext_http: bool,
    /// `retry:`, applied to each S3 request that fails transiently.
    pub retry: RetryConfig,
}

impl S3Config {
    /// `s3://<bucket>/<prefix> at <endpoint>`, for people (no secrets).
    pub fn describe(&self) -> String {
        format!(
            "s3://{}/{} at {}",
            self.bucket,
            self.prefix.as_deref().unwrap_or(""),
            self.endpoint.as_str().trim_end_matches('/')
        )
    }
}

/// Which host keys are trusted. There is deliberately no "accept any".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyCheck {
    /// Entries of an OpenSSH known_hosts file.
    KnownHosts(PathBuf),
    /// One pinned key, by its `SHA256:` fingerprint.
    Fingerprint(String),
}

/// How the agent logs in to the SFTP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SftpAuth {
    /// A private key file (ed25519, ECDSA or RSA), optionally encrypted.
    PrivateKey {
        /// The key file.
        key_file: PathBuf,
        /// A file holding the key's passphrase.
        passphrase_file: Option<PathBuf>,
    },
    /// A file holding the password (one trailing newline is ignored).
    Password(PathBuf),
}

/// `retry:`: how a failed attempt is retried. Only failures that may pass
/// (connections, timeouts) are retried; each retry takes a fresh snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryConfig {
    /// Attempts in all, the first included; 1 disables retries.
    pub attempts: u32,
    /// Delay before the second attempt; doubled for each further one.
    pub initial_delay: Duration,
    /// Upper bound of a delay.
    pub max_delay: Duration,
}

/// `log:`
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A `tracing` filter directive such as `info` or `etcd_backup_agent=debug`;
    /// `RUST_LOG`, when set, wins.
    pub level: String,
    /// Human-readable lines or one JSON object per line.
    pub format: LogFormat,
}

/// `log.format`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where defaults that depend on the machine come from, so tests can fix them.
#[derive(Debug, Clone)]
pub struct Environment {
    /// `$NODE_NAME`, set by the DaemonSet from the downward API.
    pub node_name: Option<String>,
    /// The machine's host name.
    pub hostname: Option<String>,
}

impl Environment {
    /// The environment of this process.
    pub fn from_process() -> Self {
        Self {
            node_name: std::env::var("NODE_NAME").ok().filter(|s| !s.is_empty()),
            hostname: gethostname::gethostname().into_string().ok(),
        }
    }
}

impl Config {
    /// Reads, parses and validates the config file at `path`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read, [`ConfigError::Invalid`]
    /// with every problem found otherwise.
    pub fn load(path: &Path, env: &Environment) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, env).map_err(|errors| ConfigError::Invalid {
            path: path.to_path_buf(),
            errors,
        })
    }

    /// Parses and validates config text.
    ///
    /// # Errors
    /// Every problem found, each with its field path.
    pub fn parse(text: &str, env: &Environment) -> Result<Self, Vec<FieldError>> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            let de = serde_norway::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let field = e.path().to_string();
                let field = if field.is_empty() { ".".into() } else { field };
                // the YAML parser prefixes its own idea of the path; ours is better.
                let message = e.into_inner().to_string();
                let message = match message.split_once(": ") {
                    Some((prefix, rest)) if field.starts_with(prefix) => rest.to_string(),
                    _ => message,
                };
                vec![FieldError { field, message }]
            })?
        };
        Self::from_raw(raw, env)
    }

    /// Validates a parsed file and applies defaults.
    ///
    /// # Errors
    /// Every problem found, each with its field path.
    pub fn from_raw(mut raw: RawConfig, env: &Environment) -> Result<Self, Vec<FieldError>> {
        let mut v = Validator::default();

        let node_name = match raw.node_name.take().or_else(|| env.node_name.clone()) {
            Some(n) => Some(n),
            None => env.hostname.clone(),
        };
        let node_name = match node_name {
            Some(n) => v.name_component("node_name", n),
            None => {
                v.error(
                    "node_name",
                    "not set, $NODE_NAME is empty and the host name is unknown; set node_name",
                );
                None
            }
        };
        let cluster_name = v.name_component(
            "cluster_name",
            raw.cluster_name
                .take()
                .unwrap_or_else(|| defaults::CLUSTER_NAME.to_string()),
        );
        expand_node_name(&mut raw, node_name.as_deref().unwrap_or(""), &mut v);

        let etcd = v.etcd(raw.etcd.unwrap_or_default());
        let resources = v.resources(raw.resources.unwrap_or_default());
        v.encryption_given = raw.encryption.is_some();
        let mut destinations = v.destinations(raw.destination, raw.destinations);
        let retry = v.retry(raw.retry.unwrap_or_default());
        for d in destinations.iter_mut().flatten() {
            if let DestinationConfig::S3(s3) = &mut d.config {
                s3.retry = retry;
            }
        }
        let log = v.log(raw.log.unwrap_or_default());
        let retention = v.retention(raw.retention.unwrap_or_default());
        let encryption = raw.encryption.and_then(|e| v.encryption(e));
        let compression = v.compression(raw.compression, raw.compression_level);
        let snapshot_format = v.snapshot_format(raw.snapshot_format, encryption.as_ref());
        let drill_schedule = raw.drill_schedule.and_then(|expr| {
            match crate::policy::schedule::Schedule::parse(&expr, raw.timezone.as_deref()) {
                Ok(s) => Some(s),
                Err(crate::policy::schedule::ScheduleError::TimeZone { .. }) => None, // reported for `schedule`
                Err(e) => {
                    v.error("drill_schedule", e.to_string());
                    None
                }
            }
        });
        let coordination = v.coordination(raw.coordination);
        let daemon = v.daemon(
            raw.schedule,
            raw.timezone,
            raw.jitter,
            raw.run_on_start,
            raw.http.unwrap_or_default(),
            raw.shutdown_grace,
        );

        if !v.errors.is_empty() {
            return Err(v.errors);
        }
        // Every None above pushed an error, so these are all Some here.
        match (node_name, cluster_name, etcd, resources, destinations) {
            (
                Some(node_name),
                Some(cluster_name),
                Some(etcd),
                Some(resources),
                Some(destinations),
            ) => Ok(Config {
                node_name,
                cluster_name,
                etcd,
                resources,
                destinations,
                retry,
                log,
                daemon: DaemonConfig {
                    drill_schedule,
                    coordination,
                    skip_unchanged: raw.skip_unchanged.unwrap_or(defaults::SKIP_UNCHANGED),
                    ..daemon
                },
                retention,
                encryption,
                compression,
                snapshot_format,
            }),
            _ => Err(vec![FieldError {
                field: ".".into(),
                message: "internal error: a field failed validation without a message".into(),
            }]),
        }
    }
}

/// `${NODE_NAME}` in one path field.
fn expand_one(field: &str, path: &mut Option<PathBuf>, node: &str, v: &mut Validator) {
    let Some(p) = path.as_mut() else { return };
    let Some(text) = p.to_str() else { return };
    if !text.contains("${") {
        return;
    }
    let expanded = text.replace("${NODE_NAME}", node);
    if expanded.contains("${") {
        v.error(
            field,
            format!("{text:?}: only ${{NODE_NAME}} is expanded in paths"),
        );
        return;
    }
    *p = PathBuf::from(expanded);
}

/// `${NODE_NAME}` in one destination's file paths, `at` its key path.
fn expand_destination(
    at: &str,
    local: &mut Option<Option<RawLocal>>,
    sftp: &mut Option<Option<RawSftp>>,
    s3: &mut Option<Option<RawS3>>,
    node: &str,
    v: &mut Validator,
) {
    if let Some(Some(l)) = local.as_mut() {
        expand_one(&format!("{at}.local.path"), &mut l.path, node, v);
    }
    if let Some(Some(s)) = sftp.as_mut() {
        expand_one(
            &format!("{at}.sftp.known_hosts_file"),
            &mut s.known_hosts_file,
            node,
            v,
        );
        expand_one(
            &format!("{at}.sftp.private_key_file"),
            &mut s.private_key_file,
            node,
            v,
        );
        expand_one(
            &format!("{at}.sftp.private_key_passphrase_file"),
            &mut s.private_key_passphrase_file,
            node,
            v,
        );
        expand_one(
            &format!("{at}.sftp.password_file"),
            &mut s.password_file,
            node,
            v,
        );
    }
    if let Some(Some(s)) = s3.as_mut() {
        expand_one(
            &format!("{at}.s3.access_key_id_file"),
            &mut s.access_key_id_file,
            node,
            v,
        );
        expand_one(
            &format!("{at}.s3.secret_access_key_file"),
            &mut s.secret_access_key_file,
            node,
            v,
        );
        expand_one(&format!("{at}.s3.ca_file"), &mut s.ca_file, node, v);
        expand_one(
            &format!("{at}.s3.session_token_file"),
            &mut s.session_token_file,
            node,
            v,
        );
    }
}

/// Replaces `${NODE_NAME}` in every file path of the config with this node's
/// name, so one ConfigMap can name per-node files (OpenShift's client
/// certificate is `etcd-peer-<node>.crt`). Any other `${...}` is an error.
fn expand_node_name(raw: &mut RawConfig, node: &str, v: &mut Validator) {
    if let Some(e) = raw.etcd.as_mut() {
        expand_one("etcd.ca_file", &mut e.ca_file, node, v);
        expand_one("etcd.cert_file", &mut e.cert_file, node, v);
        expand_one("etcd.key_file", &mut e.key_file, node, v);
    }
    if let Some(r) = raw.resources.as_mut() {
        expand_one("resources.root", &mut r.root, node, v);
    }
    if let Some(d) = raw.destination.as_mut() {
        expand_destination("destination", &mut d.local, &mut d.sftp, &mut d.s3, node, v);
    }
    for (i, d) in raw.destinations.iter_mut().flatten().enumerate() {
        expand_destination(
            &format!("destinations[{i}]"),
            &mut d.local,
            &mut d.sftp,
            &mut d.s3,
            node,
            v,
        );
    }
    if let Some(h) = raw.http.as_mut() {
        expand_one("http.token_file", &mut h.token_file, node, v);
    }
    if let Some(Some(e)) = raw.encryption.as_mut() {
        expand_one(
            "encryption.recipients_file",
            &mut e.recipients_file,
            node,
            v,
        );
        expand_one("encryption.identity_file", &mut e.identity_file, node, v);
    }
}

#[derive(Default)]
struct Validator {
    errors: Vec<FieldError>,
    /// `encryption:` is in the file (valid or not): data files leave the
    /// node as ciphertext, so a plain-HTTP S3 endpoint carries no secret.
    encryption_given: bool,
}

impl Validator {
    /// Records a problem; only the first per field, since later ones are
    /// usually consequences of it (an unexpanded path that then cannot be read).
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        let field = field.into();
        if self.errors.iter().any(|e| e.field == field) {
            return;
        }
        self.errors.push(FieldError {
            field,
            message: message.into(),
        });
    }

    fn name_component(&mut self, field: &str, value: String) -> Option<String> {
        if is_valid_name_component(&value) {
            Some(value)
        } else {
            self.error(
                field,
                format!(
                    "{value:?} cannot be used as a directory name: it must be non-empty, \
                     at most 253 bytes, without '/', '\\' or control characters, \
                     and must not start with '.'"
                ),
            );
            None
        }
    }

    fn duration(&mut self, field: &str, value: Option<String>, default: Duration) -> Duration {
        let Some(text) = value else { return default };
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d.is_zero() => {
                self.error(
                    field,
                    format!("{text:?} is zero; give a positive duration such as \"10s\""),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.error(
                    field,
                    format!("invalid duration {text:?}: {e}; use a number with a unit, such as \"10s\", \"2m\" or \"1h\""),
                );
                default
            }
        }
    }

    /// A file that must exist and be readable now, so a typo fails at start-up
    /// rather than at the first backup.
    fn readable_file(&mut self, field: &str, path: &Path) {
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {
                if let Err(e) = std::fs::File::open(path) {
                    self.error(field, format!("cannot read {}: {e}", path.display()));
                }
            }
            Ok(_) => self.error(field, format!("{} is not a regular file", path.display())),
            Err(e) => self.error(field, format!("cannot read {}: {e}", path.display())),
        }
    }

    fn required_text(&mut self, field: &str, value: Option<String>, what: &str) -> Option<String> {
        match value {
            Some(v) if !v.trim().is_empty() => Some(v),
            _ => {
                self.error(field, format!("required: {what}"));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Environment {
        Environment {
            node_name: None,
            hostname: Some("host-a".into()),
        }
    }

    fn errors(text: &str) -> Vec<FieldError> {
        Config::parse(text, &env()).expect_err("config was accepted")
    }

    fn fields(text: &str) -> Vec<String> {
        errors(text).into_iter().map(|e| e.field).collect()
    }

    const MINIMAL: &str = "etcd:\n  endpoints: [\"http://127.0.0.1:2379\"]\nresources:\n  layout: none\ndestination:\n  local:\n    path: /tmp/x\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, &env()).unwrap();
        assert_eq!(c.node_name, "host-a");
        assert_eq!(c.cluster_name, "default");
        assert_eq!(c.etcd.dial_timeout, Duration::from_secs(10));
        assert_eq!(c.etcd.stall_timeout, Duration::from_secs(60));
        assert!(c.etcd.tls.is_none());
        assert_eq!(c.resources.layout, Layout::None);
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.compression, None);
    }

    #[test]
    fn skip_unchanged_is_on_by_default_and_takes_a_boolean_only() {
        let with = |extra: &str| format!("{MINIMAL}{extra}");
        assert!(
            Config::parse(&with(""), &env())
                .unwrap()
                .daemon
                .skip_unchanged
        );
        let c = Config::parse(
            &with(
                "skip_unchanged: false
",
            ),
            &env(),
        )
        .unwrap();
        assert!(!c.daemon.skip_unchanged);
        let c = Config::parse(
            &with(
                "skip_unchanged: true
",
            ),
            &env(),
        )
        .unwrap();
        assert!(c.daemon.skip_unchanged);
        for bad in [
            "skip_unchanged: maybe
",
            "skip_unchanged: 1
",
        ] {
            let errs = errors(&with(bad));
            assert_eq!(errs.len(), 1, "{bad:?}: {errs:?}");
            assert_eq!(errs[0].field, "skip_unchanged", "{bad:?}");
            assert!(
                errs[0].message.contains("invalid type") && errs[0].message.contains("boolean"),
                "{bad:?}: {}",
                errs[0].message
            );
        }
    }

    #[test]
    fn compression_is_none_by_default_and_zstd_takes_a_level_in_range() {
        let with = |extra: &str| format!("{MINIMAL}{extra}");
        let c = Config::parse(&with("compression: none\n"), &env()).unwrap();
        assert_eq!(c.compression, None);
        let c = Config::parse(&with("compression: zstd\n"), &env()).unwrap();
        let z = c.compression.unwrap();
        assert_eq!(z.algorithm, etcd_backup_proto::Compression::Zstd);
        assert_eq!(z.level, defaults::COMPRESSION_LEVEL);
        let c = Config::parse(&with("compression: zstd\ncompression_level: 7\n"), &env()).unwrap();
        assert_eq!(c.compression.unwrap().level, 7);

        for (extra, field, says) in [
            (
                "compression: gzip\n",
                "compression",
                "\"gzip\" is not a compression this agent knows; use `zstd`",
            ),
            ("compression: ZSTD\n", "compression", "use `zstd`"),
            (
                "compression: zstd\ncompression_level: 0\n",
                "compression_level",
                "0 is outside 1..=7",
            ),
            (
                "compression: zstd\ncompression_level: 22\n",
                "compression_level",
                "22 is outside 1..=7",
            ),
            (
                "compression: zstd\ncompression_level: -5\n",
                "compression_level",
                "-5 is outside",
            ),
            (
                "compression: zstd\ncompression_level: 99999999999\n",
                "compression_level",
                "is outside",
            ),
            (
                "compression_level: 3\n",
                "compression_level",
                "compression is none; set `compression: zstd`",
            ),
            (
                "compression: zstd\ncompression_level: fast\n",
                "compression_level",
                "invalid type",
            ),
        ] {
            let errs = errors(&with(extra));
            assert_eq!(errs.len(), 1, "{extra:?}: {errs:?}");
            assert_eq!(errs[0].field, field, "{extra:?}");
            assert!(
                errs[0].message.contains(says),
                "{extra:?}: {}",
                errs[0].message
            );
        }
    }

    #[test]
    fn node_name_prefers_file_then_env_then_hostname() {
        let e = Environment {
            node_name: Some("from-env".into()),
            hostname: Some("host-a".into()),
        };
        assert_eq!(Config::parse(MINIMAL, &e).unwrap().node_name, "from-env");
        let text = format!("node_name: master-0\n{MINIMAL}");
        assert_eq!(Config::parse(&text, &e).unwrap().node_name, "master-0");
    }

    #[test]
    fn bad_url_names_its_index() {
        let errs = errors("etcd:\n  endpoints: [\"http://127.0.0.1:2379\", \"htp://x\"]\ndestination:\n  local:\n    path: /tmp/x\nresources:\n  layout: none\n");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "etcd.endpoints[1]");
        assert!(
            errs[0].message.contains("invalid URL \"htp://x\""),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn unknown_keys_are_errors_with_their_path() {
        let errs = errors(&MINIMAL.replace("  layout: none", "  layout: none\n  rooot: /x"));
        assert_eq!(errs[0].field, "resources.rooot", "{errs:?}");
        assert!(
            errs[0].message.contains("unknown field `rooot`"),
            "{errs:?}"
        );
        let errs = errors(&format!("{MINIMAL}extra: 1\n"));
        assert!(
            errs[0].message.contains("unknown field `extra`"),
            "{errs:?}"
        );
    }

    #[test]
    fn wrong_types_name_the_field() {
        let errs = errors(&MINIMAL.replace("[\"http://127.0.0.1:2379\"]", "5"));
        assert_eq!(errs[0].field, "etcd.endpoints", "{errs:?}");
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let text = "node_name: ../evil\ncluster_name: \"\"\netcd:\n  endpoints: [\"ftp://x:1\"]\n  dial_timeout: ten\n  stall_timeout: 0s\nresources:\n  layout: windows\ndestination: {}\nlog:\n  format: xml\n";
        let f = fields(text);
        for want in [
            "node_name",
            "cluster_name",
            "etcd.endpoints[0]",
            "etcd.dial_timeout",
            "etcd.stall_timeout",
            "resources.layout",
            "destination",
            "log.format",
        ] {
            assert!(f.iter().any(|x| x == want), "{want} missing from {f:?}");
        }
    }

    #[test]
    fn https_needs_a_ca_and_a_full_client_pair() {
        let text = MINIMAL.replace("http://", "https://");
        assert_eq!(fields(&text), vec!["etcd.ca_file"]);
        let text = MINIMAL.replace(
            "  endpoints: [\"http://127.0.0.1:2379\"]",
            "  endpoints: [\"https://127.0.0.1:2379\"]\n  ca_file: /nonexistent/ca.crt\n  cert_file: /nonexistent/c.crt",
        );
        let f = fields(&text);
        assert!(f.contains(&"etcd.ca_file".to_string()), "{f:?}");
        assert!(f.contains(&"etcd.cert_file".to_string()), "{f:?}");
        assert!(f.contains(&"etcd.key_file".to_string()), "{f:?}");
    }

    #[test]
    fn missing_resources_root_is_reported() {
        let text = MINIMAL.replace(
            "  layout: none",
            "  layout: kubeadm\n  root: /nonexistent/etc/kubernetes",
        );
        assert_eq!(fields(&text), vec!["resources.root"]);
    }

    #[test]
    fn daemon_keys_have_defaults_and_name_their_fields() {
        let c = Config::parse(&format!("{MINIMAL}schedule: \"0 * * * *\"\n"), &env()).unwrap();
        assert!(c.daemon.schedule.is_some());
        assert_eq!(c.daemon.listen.to_string(), "127.0.0.1:10290");
        assert_eq!(c.daemon.run_on_start, RunOnStart::WhenStale);
        assert_eq!(c.daemon.coordination, Coordination::PerNode);
        assert_eq!(c.daemon.shutdown_grace, Duration::from_secs(25));
        assert_eq!(c.daemon.jitter, Duration::ZERO);
        assert!(c.daemon.metrics_listen.is_none());
        assert_eq!(c.daemon.trigger_min_interval, Duration::from_secs(5));
        let off = format!("{MINIMAL}http:\n  trigger_min_interval: 0s\n");
        assert_eq!(
            Config::parse(&off, &env())
                .unwrap()
                .daemon
                .trigger_min_interval,
            Duration::ZERO
        );
        let minute = format!("{MINIMAL}http:\n  trigger_min_interval: 1m\n");
        assert_eq!(
            Config::parse(&minute, &env())
                .unwrap()
                .daemon
                .trigger_min_interval,
            Duration::from_secs(60)
        );
        // `backup` needs no schedule.
        assert!(Config::parse(MINIMAL, &env())
            .unwrap()
            .daemon
            .schedule
            .is_none());

        for (extra, field) in [
            ("schedule: \"0 * *\"\n", "schedule"),
            ("schedule: \"0 * * * *\"\ntimezone: Mars/Base\n", "timezone"),
            ("timezone: UTC\n", "timezone"),
            ("schedule: \"@hourly\"\njitter: 2h\n", "jitter"),
            ("run_on_start: sometimes\n", "run_on_start"),
            ("coordination: raft\n", "coordination"),
            ("coordination: Leader\n", "coordination"),
            ("http:\n  listen: localhost\n", "http.listen"),
            (
                "http:\n  metrics_listen: 127.0.0.1:10290\n",
                "http.metrics_listen",
            ),
            (
                "http:\n  token_file: /nonexistent/token\n",
                "http.token_file",
            ),
            ("shutdown_grace: forever\n", "shutdown_grace"),
            (
                "http:\n  trigger_min_interval: often\n",
                "http.trigger_min_interval",
            ),
            ("http:\n  port: 1\n", "http.port"),
        ] {
            let f = fields(&format!("{MINIMAL}{extra}"));
            assert_eq!(f, vec![field.to_string()], "{extra}");
        }
    }

    #[test]
    fn coordination_takes_per_node_or_leader_and_names_the_allowed_values() {
        for (text, want) in [
            ("coordination: per_node\n", Coordination::PerNode),
            ("coordination: leader\n", Coordination::Leader),
        ] {
            let c = Config::parse(&format!("{MINIMAL}{text}"), &env()).unwrap();
            assert_eq!(c.daemon.coordination, want, "{text}");
        }
        let errs = errors(&format!("{MINIMAL}coordination: everyone\n"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            errs[0].to_string(),
            "coordination: unknown value \"everyone\"; expected per_node or leader"
        );
    }

    #[test]
    fn node_name_is_expanded_in_file_paths_and_nothing_else_is() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.crt", "etcd-peer-master-3.crt", "etcd-peer-master-3.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let d = dir.path().display();
        let text = format!(
            "node_name: master-3\netcd:\n  endpoints: [\"https://127.0.0.1:2379\"]\n  ca_file: {d}/ca.crt\n  cert_file: {d}/etcd-peer-${{NODE_NAME}}.crt\n  key_file: {d}/etcd-peer-${{NODE_NAME}}.key\nresources:\n  layout: none\ndestination:\n  local:\n    path: /backups/${{NODE_NAME}}\n"
        );
        let c = Config::parse(&text, &env()).unwrap();
        let tls = c.etcd.tls.unwrap();
        let (cert, _) = tls.client.unwrap();
        assert_eq!(cert, dir.path().join("etcd-peer-master-3.crt"));
        match &c.destinations[0].config {
            DestinationConfig::Local { path } => {
                assert_eq!(*path, PathBuf::from("/backups/master-3"))
            }
            other => panic!("{other:?}"),
        }
        let bad = text.replace("${NODE_NAME}.key", "${HOSTNAME}.key");
        assert_eq!(fields(&bad), vec!["etcd.key_file"]);
    }

    #[test]
    fn endpoint_must_have_port_and_no_path() {
        assert_eq!(
            fields(&MINIMAL.replace("127.0.0.1:2379", "127.0.0.1")),
            vec!["etcd.endpoints[0]"]
        );
        assert_eq!(
            fields(&MINIMAL.replace("127.0.0.1:2379", "127.0.0.1:2379/v3")),
            vec!["etcd.endpoints[0]"]
        );
    }
}
