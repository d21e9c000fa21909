//! Restoring: a verified snapshot handed to the platform's own tool
//! (`etcdutl snapshot restore`, or `etcdctl snapshot restore` where etcd 3.4
//! has no etcdutl), and the restore drill that proves a set restores into a
//! member that serves it.

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

/// The restore tool found on PATH: `etcdutl` (etcd 3.5+) or `etcdctl` (3.4).
pub fn restore_tool() -> Result<&'static str, RestoreError> {
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
            .unwrap_or(false)
    };
    if on_path("etcdutl") {
        Ok("etcdutl")
    } else if on_path("etcdctl") {
        Ok("etcdctl")
    } else {
        Err(RestoreError::NoTool)
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

/// Runs the real restore tool on a checked snapshot.
///
/// # Errors
/// [`RestoreError::NoTool`], [`RestoreError::ToolFailed`].
pub async fn run_restore(
    snapshot: &Path,
    target: &RestoreTarget,
    quiet: bool,
) -> Result<(), RestoreError> {
    let tool = restore_tool()?;
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
    if tool == "etcdctl" {
        cmd.env("ETCDCTL_API", "3");
    }
    if quiet {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    }
    tracing::info!(tool, snapshot = %snapshot.display(), data_dir = %target.data_dir.display(), "restoring");
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
    /// Restores `snapshot` into `work/data` and starts etcd on it, on free
    /// loopback ports.
    ///
    /// # Errors
    /// Restore failures; etcd not installed.
    pub async fn start(snapshot: &Path, work: &Path) -> Result<Self, RestoreError> {
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
        run_restore(snapshot, &target, true).await?;
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
    let mut member = DrillMember::start(&snapshot, work.path())
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
    match m.snapshot_status {
        // An empty keyspace has revision 0 in the file; etcd reports at least 1.
        Some(st) if info.revision != st.revision.max(1) => problems.push(format!(
            "revision is {}, the manifest says {}",
            info.revision, st.revision
        )),
        None if info.revision < m.etcd.revision => problems.push(format!(
            "revision is {}, older than the manifest's {}",
            info.revision, m.etcd.revision
        )),
        _ => {}
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
        problems,
    })
}
