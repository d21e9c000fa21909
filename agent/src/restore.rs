//! Restoring: a verified snapshot handed to the platform's own tool
//! (`etcdutl snapshot restore`, or `etcdctl snapshot restore` where etcd 3.4
//! has no etcdutl), and the restore drill that proves a set restores into a
//! member that serves it.
//!
//! A restore bumps the store's revision and marks it compacted by default
//! (`--bump-revision N --mark-compacted`, etcd #16028): Kubernetes clients
//! (informers, watch caches, resourceVersions) never see a revision repeat or
//! go back in time. The drill takes the same path.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::source::etcd::SnapshotVerifier;

/// Why a restore could not be done.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The data dir exists and holds something.
    #[error("data dir {path} is not empty; restore into a new or empty directory (move the old one aside first)")]
    DataDirNotEmpty {
        /// The data dir.
        path: PathBuf,
    },
    /// Neither etcdutl nor etcdctl is installed.
    #[error("neither etcdutl nor etcdctl is on PATH; install the etcd client tools of your etcd's version")]
    NoTool,
    /// The restore tool's version could not be read from `<tool> version`.
    #[error("cannot tell the version of {tool} (`{tool} version` said: {said}); revisions are bumped only by etcdutl 3.5.10 or later or etcdctl 3.4.27 or later; pass --no-bump-revision to restore without")]
    UnknownToolVersion {
        /// The tool.
        tool: &'static str,
        /// What it printed (or why it could not run), on one line.
        said: String,
    },
    /// The restore tool is too old for `--bump-revision`/`--mark-compacted`.
    #[error("{tool} {found} cannot bump the revision (--bump-revision and --mark-compacted need {BUMP_NEEDS}); install a newer etcd client, or pass --no-bump-revision for a plain etcd that no Kubernetes uses (its clients may then see revisions go back in time)")]
    ToolTooOld {
        /// The tool.
        tool: &'static str,
        /// Its version.
        found: ToolVersion,
    },
    /// The snapshot file failed its digest check.
    #[error("snapshot {path} failed its check: {detail}")]
    BadSnapshot {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The restore tool failed.
    #[error("{tool} snapshot restore failed ({status}); its output is above")]
    ToolFailed {
        /// The tool.
        tool: String,
        /// Its exit status.
        status: String,
    },
    /// A local file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Refuses an existing non-empty data dir.
///
/// # Errors
/// [`RestoreError::DataDirNotEmpty`], or an unreadable directory.
pub fn check_data_dir(path: &Path) -> Result<(), RestoreError> {
    match std::fs::read_dir(path) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                Err(RestoreError::DataDirNotEmpty {
                    path: path.to_path_buf(),
                })
            } else {
                Ok(())
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RestoreError::Io {
            op: "cannot read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Checks a local snapshot file's etcd digest trailer.
///
/// # Errors
/// [`RestoreError::BadSnapshot`], read failures.
pub fn check_snapshot_file(path: &Path) -> Result<(), RestoreError> {
    use std::io::Read;
    if crate::encryption::is_age_file(path).unwrap_or(false) {
        return Err(RestoreError::BadSnapshot {
            path: path.to_path_buf(),
            detail: "the file is age-encrypted; restore the set with --identity FILE instead, or decrypt it first (age -d -i KEYFILE -o snapshot.db FILE)".to_string(),
        });
    }
    if is_zstd_file(path).unwrap_or(false) {
        return Err(RestoreError::BadSnapshot {
            path: path.to_path_buf(),
            detail: "the file is zstd-compressed; restore the set by name instead (restore decompresses it), or decompress it first (zstd -d FILE -o snapshot.db)".to_string(),
        });
    }
    let mut f = std::fs::File::open(path).map_err(|source| RestoreError::Io {
        op: "cannot open",
        path: path.to_path_buf(),
        source,
    })?;
    let mut v = SnapshotVerifier::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|source| RestoreError::Io {
            op: "cannot read",
            path: path.to_path_buf(),
            source,
        })?;
        if n == 0 {
            break;
        }
        v.update(&buf[..n]);
    }
    v.finish()
        .map(|_| ())
        .map_err(|e| RestoreError::BadSnapshot {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
}

/// Whether `path` starts with zstd's frame magic number.
fn is_zstd_file(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    let mut head = Vec::with_capacity(ZSTD_MAGIC.len());
    std::fs::File::open(path)?
        .take(ZSTD_MAGIC.len() as u64)
        .read_to_end(&mut head)?;
    Ok(head == ZSTD_MAGIC)
}

/// The default `--bump-revision`: 1,000,000,000, OpenShift's choice when it
/// knows nothing better. A restore cannot know how many revisions the lost
/// cluster made after the backup; one billion outlasts about 11 days of
/// 1,000 writes a second (far more than a control plane's rate, and far
/// older than a set one restores), and etcd's 64-bit revision leaves room
/// for billions of such restores.
pub const DEFAULT_BUMP_REVISION: u64 = 1_000_000_000;

/// The tools that know `--bump-revision` and `--mark-compacted`.
pub const BUMP_NEEDS: &str = "etcdutl 3.5.10 or later, or etcdctl 3.4.27 or later";

/// How a restore treats the store's revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bump {
    /// `--bump-revision N --mark-compacted`: the member starts N revisions
    /// above the snapshot's, everything below marked compacted.
    By(u64),
    /// `--no-bump-revision`: the member starts at the snapshot's revision.
    Off,
}

impl Bump {
    /// The revision a member restored from a snapshot at `snapshot_revision`
    /// starts at.
    pub fn start_revision(self, snapshot_revision: i64) -> i64 {
        match self {
            Bump::By(n) => snapshot_revision.saturating_add(i64::try_from(n).unwrap_or(i64::MAX)),
            // An empty keyspace has revision 0 in the file; etcd reports 1.
            Bump::Off => snapshot_revision.max(1),
        }
    }
}

/// A restore tool's version, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ToolVersion {
    /// 3.
    pub major: u32,
    /// 4 or 5.
    pub minor: u32,
    /// The patch release.
    pub patch: u32,
}

impl std::fmt::Display for ToolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl ToolVersion {
    /// Reads `<tool> version: X.Y.Z` from what `<tool> version` prints.
    pub fn parse_output(tool: &str, output: &str) -> Option<Self> {
        let prefix = format!("{tool} version:");
        let line = output
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))?;
        let mut parts = line.trim().splitn(3, '.');
        let mut number = || -> Option<u32> {
            let digits: String = parts
                .next()?
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        };
        Some(Self {
            major: number()?,
            minor: number()?,
            patch: number()?,
        })
    }

    /// Whether `snapshot restore` of this version knows `--bump-revision`
    /// and `--mark-compacted`: added in 3.5.10 (etcdutl, and etcdctl 3.5's
    /// deprecated restore) and backported to etcdctl 3.4.27.
    pub fn can_bump(self) -> bool {
        let v = (self.major, self.minor, self.patch);
        v >= (3, 5, 10) || ((3, 4, 27)..(3, 5, 0)).contains(&v)
    }
}

/// The restore tool found on PATH: `etcdutl` (etcd 3.5+) or `etcdctl` (3.4),
/// and its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreTool {
    /// `etcdutl` or `etcdctl`.
    pub name: &'static str,
    /// What `<name> version` reported; `None` when it said nothing readable.
    pub version: Option<ToolVersion>,
}

impl RestoreTool {
    /// Finds the tool (`etcdutl` first) and asks it its version.
    ///
    /// # Errors
    /// [`RestoreError::NoTool`].
    pub async fn find() -> Result<(Self, String), RestoreError> {
        let on_path = |name: &str| {
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
                .unwrap_or(false)
        };
        let name = if on_path("etcdutl") {
            "etcdutl"
        } else if on_path("etcdctl") {
            "etcdctl"
        } else {
            return Err(RestoreError::NoTool);
        };
        let said = match tokio::process::Command::new(name)
            .arg("version")
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null())
            .output()
            .await
        {
            Ok(out) => {
                let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&out.stderr));
                text
            }
            Err(e) => format!("cannot run it: {e}"),
        };
        let version = ToolVersion::parse_output(name, &said);
        Ok((Self { name, version }, said))
    }

    /// [`find`](Self::find), refusing a tool that cannot do `bump`.
    ///
    /// # Errors
    /// [`RestoreError::NoTool`], [`RestoreError::ToolTooOld`],
    /// [`RestoreError::UnknownToolVersion`].
    pub async fn for_bump(bump: Bump) -> Result<Self, RestoreError> {
        let (tool, said) = Self::find().await?;
        if bump == Bump::Off {
            return Ok(tool);
        }
        match tool.version {
            Some(v) if v.can_bump() => Ok(tool),
            Some(found) => Err(RestoreError::ToolTooOld {
                tool: tool.name,
                found,
            }),
            None => Err(RestoreError::UnknownToolVersion {
                tool: tool.name,
                said: said.split_whitespace().collect::<Vec<_>>().join(" "),
            }),
        }
    }

    /// `etcdutl 3.5.16`.
    pub fn describe(&self) -> String {
        match self.version {
            Some(v) => format!("{} {v}", self.name),
            None => self.name.to_string(),
        }
    }
}

/// What `snapshot restore` is told.
#[derive(Debug, Clone)]
pub struct RestoreTarget {
    /// `--data-dir`.
    pub data_dir: PathBuf,
    /// `--name`.
    pub name: String,
    /// `--initial-cluster`.
    pub initial_cluster: String,
    /// `--initial-advertise-peer-urls`.
    pub initial_advertise_peer_urls: String,
    /// `--initial-cluster-token`, when given.
    pub initial_cluster_token: Option<String>,
}

/// Runs the real restore tool on a checked snapshot, bumping the revision
/// as `bump` says (the caller chose `tool` with [`RestoreTool::for_bump`]).
///
/// # Errors
/// [`RestoreError::ToolFailed`], the tool could not be started.
pub async fn run_restore(
    snapshot: &Path,
    target: &RestoreTarget,
    tool: RestoreTool,
    bump: Bump,
    quiet: bool,
) -> Result<(), RestoreError> {
    let tool = tool.name;
    let mut cmd = tokio::process::Command::new(tool);
    cmd.arg("snapshot")
        .arg("restore")
        .arg(snapshot)
        .arg("--data-dir")
        .arg(&target.data_dir)
        .arg("--name")
        .arg(&target.name)
        .arg("--initial-cluster")
        .arg(&target.initial_cluster)
        .arg("--initial-advertise-peer-urls")
        .arg(&target.initial_advertise_peer_urls)
        .stdin(Stdio::null());
    if let Some(t) = &target.initial_cluster_token {
        cmd.arg("--initial-cluster-token").arg(t);
    }
    if let Bump::By(n) = bump {
        cmd.arg("--bump-revision")
            .arg(n.to_string())
            .arg("--mark-compacted");
    }
    if tool == "etcdctl" {
        cmd.env("ETCDCTL_API", "3");
    }
    if quiet {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    }
    tracing::info!(tool, snapshot = %snapshot.display(), data_dir = %target.data_dir.display(), ?bump, "restoring");
    let out = cmd.output().await.map_err(|source| RestoreError::Io {
        op: "cannot run",
        path: PathBuf::from(tool),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        if quiet {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        }
        Err(RestoreError::ToolFailed {
            tool: tool.to_string(),
            status: out.status.to_string(),
        })
    }
}

/// A throwaway etcd member on loopback, killed on drop.
pub struct DrillMember {
    child: tokio::process::Child,
    /// Its client URL.
    pub client_url: String,
}

fn free_loopback_port() -> Result<u16, RestoreError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| RestoreError::Io {
            op: "cannot find a free port on",
            path: PathBuf::from("127.0.0.1"),
            source,
        })
}

impl DrillMember {
    /// Restores `snapshot` into `work/data` with `tool`, bumping as `bump`
    /// says, and starts etcd on it, on free loopback ports.
    ///
    /// # Errors
    /// Restore failures; etcd not installed.
    pub async fn start(
        snapshot: &Path,
        work: &Path,
        tool: RestoreTool,
        bump: Bump,
    ) -> Result<Self, RestoreError> {
        let peer = format!("http://127.0.0.1:{}", free_loopback_port()?);
        let client_url = format!("http://127.0.0.1:{}", free_loopback_port()?);
        let metrics = format!("http://127.0.0.1:{}", free_loopback_port()?);
        let target = RestoreTarget {
            data_dir: work.join("data"),
            name: "drill".into(),
            initial_cluster: format!("drill={peer}"),
            initial_advertise_peer_urls: peer.clone(),
            initial_cluster_token: Some("etcd-backup-drill".into()),
        };
        run_restore(snapshot, &target, tool, bump, true).await?;
        let log =
            std::fs::File::create(work.join("etcd.log")).map_err(|source| RestoreError::Io {
                op: "cannot create",
                path: work.join("etcd.log"),
                source,
            })?;
        let log_err = log.try_clone().map_err(|source| RestoreError::Io {
            op: "cannot open",
            path: work.join("etcd.log"),
            source,
        })?;
        let child = tokio::process::Command::new("etcd")
            .arg("--name")
            .arg("drill")
            .arg("--data-dir")
            .arg(&target.data_dir)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("drill={peer}"))
            .arg("--listen-metrics-urls")
            .arg(&metrics)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| RestoreError::Io {
                op: "cannot start",
                path: PathBuf::from("etcd"),
                source,
            })?;
        Ok(Self { child, client_url })
    }

    /// Waits until the member answers a status call, up to `timeout`.
    pub async fn wait_ready(
        &mut self,
        timeout: Duration,
    ) -> Option<crate::source::etcd::MemberInfo> {
        use crate::source::etcd::SnapshotSource;
        let config = crate::config::EtcdConfig {
            endpoints: vec![url::Url::parse(&self.client_url).ok()?],
            tls: None,
            dial_timeout: Duration::from_secs(2),
            stall_timeout: Duration::from_secs(10),
        };
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return None;
            }
            if let Ok(mut m) = crate::source::etcd::EtcdMember::connect(&config).await {
                if let Ok(info) = m.member_info().await {
                    return Some(info);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    /// Whether a read at `revision` is refused as compacted, as a watch
    /// from there is: what the old cluster's clients meet after a bumped
    /// restore. `Err` for any other failure.
    pub async fn compacted_at(&self, revision: i64) -> Result<bool, String> {
        let mut client = etcd_client::Client::connect([self.client_url.as_str()], None)
            .await
            .map_err(|e| e.to_string())?;
        match client
            .get(
                vec![0u8],
                Some(
                    etcd_client::GetOptions::new()
                        .with_from_key()
                        .with_count_only()
                        .with_revision(revision),
                ),
            )
            .await
        {
            Ok(_) => Ok(false),
            // etcd's rpctypes.ErrCompacted, a gRPC OutOfRange status.
            Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::OutOfRange => {
                Ok(true)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Live keys at the member's current revision.
    pub async fn count_keys(&self) -> Result<i64, String> {
        let mut client = etcd_client::Client::connect([self.client_url.as_str()], None)
            .await
            .map_err(|e| e.to_string())?;
        let resp = client
            .get(
                vec![0u8],
                Some(
                    etcd_client::GetOptions::new()
                        .with_from_key()
                        .with_count_only(),
                ),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(resp.count())
    }
}

/// What a drill found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillOutcome {
    /// The set drilled.
    pub set: String,
    /// The restored member's revision.
    pub revision: i64,
    /// Keys it serves.
    pub keys: i64,
    /// The tool that restored it (`etcdutl 3.5.16`).
    pub tool: String,
    /// The bump applied; [`Bump::Off`] when the tool is too old for it.
    pub bump: Bump,
    /// What differs from the manifest; empty when the drill passed.
    pub problems: Vec<String>,
}

/// The identities of `encryption.identity_file`, if configured.
///
/// # Errors
/// The file cannot be read or holds no usable key.
pub fn config_identities(
    config: &crate::config::Config,
) -> Result<Option<crate::encryption::Identities>, crate::encryption::IdentityError> {
    match config
        .encryption
        .as_ref()
        .and_then(|e| e.identity_file.as_ref())
    {
        Some(path) => crate::encryption::load_identities(path, None).map(Some),
        None => Ok(None),
    }
}

/// Fetches and verifies `wanted`, restores it into a temporary data dir,
/// starts a throwaway member on loopback, and compares what it serves with
/// the manifest. Everything is removed afterwards.
///
/// # Errors
/// A message for people: the set could not be found, fetched, verified,
/// restored, or the member did not come up.
pub async fn run_drill(
    config: &crate::config::Config,
    node: &str,
    wanted: &str,
    identities: Option<&crate::encryption::Identities>,
) -> Result<DrillOutcome, String> {
    let work = tempfile::Builder::new()
        .prefix("etcd-backup-drill-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let dest = crate::store::destination::open(config.destination())
        .await
        .map_err(|e| format!("cannot open the destination: {e}"))?;
    let set = crate::store::catalog::find(dest.as_ref(), &config.cluster_name, node, wanted)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(why) = crate::store::verify::missing_identity(&set, identities) {
        return Err(why);
    }
    let files = work.path().join("set");
    std::fs::create_dir(&files).map_err(|e| format!("cannot create {}: {e}", files.display()))?;
    let (reports, _) = crate::store::verify::fetch_set(
        dest.as_ref(),
        &set,
        &files,
        identities,
        None,
        &|_, _, _| {},
    )
    .await
    .map_err(|e| e.to_string())?;
    let bad: Vec<String> = reports
        .iter()
        .flat_map(|r| r.problems.iter().map(move |p| format!("{}: {p}", r.name)))
        .collect();
    if !bad.is_empty() {
        return Err(format!(
            "set {} does not match its manifest: {}",
            set.id.dir(),
            bad.join("; ")
        ));
    }
    let m = &set.manifest;
    let snapshot = m
        .file(etcd_backup_proto::FileKind::Snapshot)
        .ok_or_else(|| format!("set {} has no snapshot", set.id.dir()))?;
    let snapshot = crate::store::verify::local_path(&files, &set, snapshot, identities.is_some())
        .map_err(|e| e.to_string())?;
    // The path `restore` takes: bumped, unless the tool cannot (then the
    // drill says so, as `restore` would refuse without --no-bump-revision).
    let (tool, _) = RestoreTool::find().await.map_err(|e| e.to_string())?;
    let bump = match tool.version {
        Some(v) if v.can_bump() => Bump::By(DEFAULT_BUMP_REVISION),
        _ => Bump::Off,
    };
    let mut member = DrillMember::start(&snapshot, work.path(), tool, bump)
        .await
        .map_err(|e| e.to_string())?;
    let Some(info) = member.wait_ready(Duration::from_secs(60)).await else {
        let log = std::fs::read_to_string(work.path().join("etcd.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        return Err(format!(
            "the restored member did not start or answer within 60s; the end of its log: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    };
    let mut problems = Vec::new();
    let bumped = match bump {
        Bump::By(n) => format!(" + {n} (the bump)"),
        Bump::Off => String::new(),
    };
    match m.snapshot_status {
        Some(st) if info.revision != bump.start_revision(st.revision) => problems.push(format!(
            "revision is {}, the manifest says {}{bumped}",
            info.revision, st.revision
        )),
        None if info.revision < bump.start_revision(m.etcd.revision) => problems.push(format!(
            "revision is {}, older than the manifest's {}{bumped}",
            info.revision, m.etcd.revision
        )),
        _ => {}
    }
    if bump != Bump::Off {
        // Below the bumped revision everything must read as compacted.
        let old = m
            .snapshot_status
            .map_or(m.etcd.revision, |st| st.revision)
            .max(1);
        match member.compacted_at(old).await {
            Ok(true) => {}
            Ok(false) => problems.push(format!(
                "a read at the snapshot's revision {old} was served; it should be compacted"
            )),
            Err(e) => problems.push(format!(
                "a read at the snapshot's revision {old} failed other than as compacted: {e}"
            )),
        }
    }
    let keys = member
        .count_keys()
        .await
        .map_err(|e| format!("the restored member does not serve reads: {e}"))?;
    if let Some(want) = m.etcd.live_keys {
        if u64::try_from(keys).ok() != Some(want) {
            problems.push(format!("{keys} keys, the manifest says {want}"));
        }
    }
    Ok(DrillOutcome {
        set: set.id.dir(),
        revision: info.revision,
        keys,
        tool: tool.describe(),
        bump,
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_versions_are_read_from_what_version_prints() {
        let v = ToolVersion::parse_output("etcdutl", "etcdutl version: 3.5.16\nAPI version: 3.5\n");
        assert_eq!(v.map(|v| v.to_string()).as_deref(), Some("3.5.16"));
        let v = ToolVersion::parse_output("etcdctl", "etcdctl version: 3.4.23\nAPI version: 3.4\n");
        assert_eq!(v.map(|v| v.to_string()).as_deref(), Some("3.4.23"));
        let v = ToolVersion::parse_output("etcdctl", "etcdctl version: 3.6.0-rc.1\n");
        assert_eq!(v.map(|v| v.to_string()).as_deref(), Some("3.6.0"));
        assert_eq!(
            ToolVersion::parse_output("etcdutl", "Error: unknown command"),
            None
        );
        assert_eq!(
            ToolVersion::parse_output("etcdutl", "etcdctl version: 3.5.16"),
            None
        );
    }

    #[test]
    fn bump_needs_etcd_3_4_27_or_3_5_10() {
        let v = |s: &str| {
            ToolVersion::parse_output("etcdutl", &format!("etcdutl version: {s}")).unwrap()
        };
        for old in ["3.4.23", "3.4.26", "3.5.0", "3.5.9", "3.3.27"] {
            assert!(!v(old).can_bump(), "{old}");
        }
        for new in ["3.4.27", "3.4.35", "3.5.10", "3.5.16", "3.6.0", "4.0.0"] {
            assert!(v(new).can_bump(), "{new}");
        }
    }

    #[test]
    fn the_restored_member_starts_at_the_snapshots_revision_plus_the_bump() {
        assert_eq!(Bump::By(1_000_000_000).start_revision(1234), 1_000_001_234);
        assert_eq!(Bump::Off.start_revision(1234), 1234);
        assert_eq!(Bump::Off.start_revision(0), 1);
    }
}
