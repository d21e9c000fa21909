//! One backup run: the set protocol that makes a backup either complete and
//! verified, or absent.
//!
//! 1. Plan the static-pod resources (fails fast on a missing manifest).
//! 2. Ask the local etcd member who it is.
//! 3. Stream the snapshot into `snapshot_<ts>.db.partial`, checking etcd's digest.
//! 4. Stream the resources tarball into `static_kuberesources_<ts>.tar.gz.partial`.
//! 5. Rename both to their final names.
//! 6. Write `manifest.json` last (itself through a partial name and a rename):
//!    its presence is what makes the set complete.
//!
//! A run that fails at any step removes everything it wrote, so the
//! destination never holds a set that looks complete but is not.

use std::fmt;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use etcd_backup_proto::{
    FileKind, Manifest, ManifestEtcd, ManifestFile, SetId, SetTimestamp, MANIFEST_FILE_NAME,
    MANIFEST_FORMAT_VERSION, PARTIAL_SUFFIX,
};

use crate::config::Config;
use crate::destination::{Destination, DestinationError, Upload};
use crate::etcd::{
    EtcdError, EtcdMember, MemberInfo, SnapshotSource, SnapshotVerifier, VerifyError,
};
use crate::resources::{self, ResourcesError};

/// The agent's version, recorded in every manifest.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The step of a run, used to say where a run failed and to label metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Connecting to etcd and asking for its status.
    Connect,
    /// Streaming the snapshot.
    Snapshot,
    /// Checking the snapshot's digest.
    Verify,
    /// Bundling the static-pod resources.
    Resources,
    /// Storing data files at the destination.
    Upload,
    /// Writing the manifest.
    Manifest,
}

impl Stage {
    /// The name used in logs, records and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Snapshot => "snapshot",
            Stage::Verify => "verify",
            Stage::Resources => "resources",
            Stage::Upload => "upload",
            Stage::Manifest => "manifest",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong, by the system it came from.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// etcd could not be reached or its stream failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The snapshot's digest did not check out.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The static-pod resources could not be bundled.
    #[error(transparent)]
    Resources(#[from] ResourcesError),
    /// The destination failed.
    #[error(transparent)]
    Destination(#[from] DestinationError),
    /// A set with this run's name exists already.
    #[error(
        "backup set {location} already exists; another run started in the same second, try again"
    )]
    SetExists {
        /// The set's location.
        location: String,
    },
}

/// A failed run: the stage, and why.
#[derive(Debug, thiserror::Error)]
#[error("backup failed at stage {stage}: {cause}")]
pub struct BackupError {
    /// Where it failed.
    pub stage: Stage,
    /// Why.
    #[source]
    pub cause: Cause,
}

impl BackupError {
    fn new(stage: Stage, cause: impl Into<Cause>) -> Self {
        Self {
            stage,
            cause: cause.into(),
        }
    }

    /// Whether a fresh attempt may succeed (a connection or I/O hiccup), as
    /// opposed to a problem a person must fix or a corrupt stream.
    pub fn is_transient(&self) -> bool {
        match &self.cause {
            Cause::Etcd(e) => e.is_transient(),
            Cause::Destination(e) => e.is_transient(),
            Cause::Verify(_) | Cause::Resources(_) => false,
            Cause::SetExists { .. } => true,
        }
    }
}

/// How one stage went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageReport {
    /// The stage.
    pub stage: Stage,
    /// Bytes moved (0 where that means nothing).
    pub bytes: u64,
    /// How long it took.
    pub duration: Duration,
}

/// A complete, verified set.
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// Where the set is, relative to the destination's base.
    pub set: SetId,
    /// The destination and set, for people.
    pub location: String,
    /// The manifest as written.
    pub manifest: Manifest,
    /// Each stage in order.
    pub stages: Vec<StageReport>,
}

/// Runs one backup against the configured etcd member.
///
/// # Errors
/// [`BackupError`] naming the stage; nothing complete-looking is left behind.
pub async fn run(config: &Config, dest: &dyn Destination) -> Result<BackupReport, BackupError> {
    let started_at = Utc::now();
    // Plan first: a missing manifest is a configuration problem, found before
    // etcd is asked for anything.
    let plan =
        resources::plan(&config.resources).map_err(|e| BackupError::new(Stage::Resources, e))?;
    let t = Instant::now();
    let mut member = EtcdMember::connect(&config.etcd)
        .await
        .map_err(|e| BackupError::new(Stage::Connect, e))?;
    let connect_time = t.elapsed();
    let mut run = Run::new(config, dest, started_at, plan);
    run.stages.push(StageReport {
        stage: Stage::Connect,
        bytes: 0,
        duration: connect_time,
    });
    run.execute(&mut member).await
}

/// Runs one backup from any snapshot source (a double in unit tests).
///
/// # Errors
/// As [`run`].
pub async fn run_with_source(
    config: &Config,
    source: &mut dyn SnapshotSource,
    dest: &dyn Destination,
) -> Result<BackupReport, BackupError> {
    let started_at = Utc::now();
    let plan =
        resources::plan(&config.resources).map_err(|e| BackupError::new(Stage::Resources, e))?;
    Run::new(config, dest, started_at, plan)
        .execute(source)
        .await
}

struct Run<'a> {
    config: &'a Config,
    dest: &'a dyn Destination,
    started_at: DateTime<Utc>,
    set: SetId,
    plan: Option<resources::Plan>,
    /// Every path this run created, so a failure can remove them all.
    created: Vec<String>,
    stages: Vec<StageReport>,
}

impl<'a> Run<'a> {
    fn new(
        config: &'a Config,
        dest: &'a dyn Destination,
        started_at: DateTime<Utc>,
        plan: Option<resources::Plan>,
    ) -> Self {
        let set = SetId {
            cluster: config.cluster_name.clone(),
            node: config.node_name.clone(),
            timestamp: SetTimestamp::new(started_at),
        };
        Self {
            config,
            dest,
            started_at,
            set,
            plan,
            created: Vec::new(),
            stages: Vec::new(),
        }
    }

    async fn execute(
        mut self,
        source: &mut dyn SnapshotSource,
    ) -> Result<BackupReport, BackupError> {
        match self.steps(source).await {
            Ok(manifest) => Ok(BackupReport {
                location: format!("{}/{}", self.dest.describe(), self.set.dir()),
                set: self.set,
                manifest,
                stages: self.stages,
            }),
            Err(e) => {
                tracing::warn!(set = %self.set, stage = %e.stage, error = %e, "backup failed; removing what this run wrote");
                self.clean_up().await;
                Err(e)
            }
        }
    }

    async fn steps(&mut self, source: &mut dyn SnapshotSource) -> Result<Manifest, BackupError> {
        let ts = self.set.timestamp;
        let existing = self
            .dest
            .list(&self.set.dir())
            .await
            .map_err(|e| BackupError::new(Stage::Upload, e))?;
        if !existing.is_empty() {
            return Err(BackupError::new(
                Stage::Upload,
                Cause::SetExists {
                    location: format!("{}/{}", self.dest.describe(), self.set.dir()),
                },
            ));
        }

        let t = Instant::now();
        let member = source
            .member_info()
            .await
            .map_err(|e| BackupError::new(Stage::Connect, e))?;
        tracing::info!(
            endpoint = %member.endpoint,
            cluster_id = %format!("{:016x}", member.cluster_id),
            member_id = %format!("{:016x}", member.member_id),
            version = %member.version,
            revision = member.revision,
            db_size = member.db_size,
            "connected to etcd"
        );
        self.add_time(Stage::Connect, t.elapsed());

        let snapshot = self.snapshot(source, ts).await?;
        let mut files = vec![snapshot];
        if let Some(plan) = self.plan.take() {
            files.push(self.resources(plan, ts).await?);
        }

        let t = Instant::now();
        for f in &files {
            let final_path = self.set.file(&f.name);
            self.dest
                .rename(&partial(&final_path), &final_path)
                .await
                .map_err(|e| BackupError::new(Stage::Upload, e))?;
            self.created.push(final_path);
        }
        self.add_time(Stage::Upload, t.elapsed());

        let manifest = self.manifest(&member, files);
        self.write_manifest(&manifest).await?;
        Ok(manifest)
    }

    fn add_time(&mut self, stage: Stage, d: Duration) {
        if let Some(s) = self.stages.iter_mut().find(|s| s.stage == stage) {
            s.duration += d;
        } else {
            self.stages.push(StageReport {
                stage,
                bytes: 0,
                duration: d,
            });
        }
    }

    async fn create(&mut self, path: &str, stage: Stage) -> Result<Box<dyn Upload>, BackupError> {
        let up = self
            .dest
            .create(path)
            .await
            .map_err(|e| BackupError::new(stage, e))?;
        self.created.push(path.to_string());
        Ok(up)
    }

    async fn snapshot(
        &mut self,
        source: &mut dyn SnapshotSource,
        ts: SetTimestamp,
    ) -> Result<ManifestFile, BackupError> {
        let t = Instant::now();
        let name = ts.snapshot_file_name();
        let path = partial(&self.set.file(&name));
        let mut stream = source
            .snapshot()
            .await
            .map_err(|e| BackupError::new(Stage::Snapshot, e))?;
        let mut up = self.create(&path, Stage::Upload).await?;
        let mut verifier = SnapshotVerifier::new();
        while let Some(chunk) = stream
            .next_chunk()
            .await
            .map_err(|e| BackupError::new(Stage::Snapshot, e))?
        {
            verifier.update(&chunk);
            up.write(&chunk)
                .await
                .map_err(|e| BackupError::new(Stage::Upload, e))?;
        }
        // Check before making the file durable: a bad stream never gets a
        // final name, and the partial is removed by the caller.
        let verified = verifier
            .finish()
            .map_err(|e| BackupError::new(Stage::Verify, e))?;
        let stored = up
            .finish()
            .await
            .map_err(|e| BackupError::new(Stage::Upload, e))?;
        tracing::info!(
            bytes = stored,
            sha256 = %verified.file_sha256,
            etcd_digest = %verified.etcd_digest,
            elapsed_ms = t.elapsed().as_millis() as u64,
            "snapshot stored and its etcd digest verified"
        );
        self.stages.push(StageReport {
            stage: Stage::Snapshot,
            bytes: stored,
            duration: t.elapsed(),
        });
        Ok(ManifestFile {
            name,
            kind: FileKind::Snapshot,
            size: stored,
            sha256: verified.file_sha256,
        })
    }

    async fn resources(
        &mut self,
        plan: resources::Plan,
        ts: SetTimestamp,
    ) -> Result<ManifestFile, BackupError> {
        let t = Instant::now();
        let name = ts.resources_file_name();
        let path = partial(&self.set.file(&name));
        let mut up = self.create(&path, Stage::Upload).await?;
        let (mut rx, handle) = resources::spawn_archive(plan);
        let mut hasher = Sha256::new();
        let mut sent = 0u64;
        let mut upload_error = None;
        while let Some(chunk) = rx.recv().await {
            hasher.update(&chunk);
            sent += chunk.len() as u64;
            if let Err(e) = up.write(&chunk).await {
                upload_error = Some(e);
                break;
            }
        }
        // Stops the archive thread if the upload failed.
        drop(rx);
        let archived = handle.await.map_err(|e| {
            BackupError::new(
                Stage::Resources,
                ResourcesError::Io {
                    op: "finish",
                    path: self.config.resources.root.clone(),
                    source: std::io::Error::other(e),
                },
            )
        })?;
        if let Some(e) = upload_error {
            return Err(BackupError::new(Stage::Upload, e));
        }
        let stats = archived.map_err(|e| BackupError::new(Stage::Resources, e))?;
        let stored = up
            .finish()
            .await
            .map_err(|e| BackupError::new(Stage::Upload, e))?;
        debug_assert_eq!(stored, sent);
        tracing::info!(
            bytes = stored,
            entries = stats.entries,
            content_bytes = stats.content_bytes,
            elapsed_ms = t.elapsed().as_millis() as u64,
            "static-pod resources stored"
        );
        self.stages.push(StageReport {
            stage: Stage::Resources,
            bytes: stored,
            duration: t.elapsed(),
        });
        Ok(ManifestFile {
            name,
            kind: FileKind::Resources,
            size: stored,
            sha256: hex::encode(hasher.finalize()),
        })
    }

    fn manifest(&self, member: &MemberInfo, files: Vec<ManifestFile>) -> Manifest {
        Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            cluster: self.set.cluster.clone(),
            node: self.set.node.clone(),
            timestamp: self.set.timestamp,
            started_at: self.started_at,
            finished_at: Utc::now(),
            agent_version: AGENT_VERSION.to_string(),
            etcd: ManifestEtcd {
                endpoint: member.endpoint.clone(),
                cluster_id: format!("{:016x}", member.cluster_id),
                member_id: format!("{:016x}", member.member_id),
                version: member.version.clone(),
                revision: member.revision,
                db_size: member.db_size,
            },
            resources_layout: self.config.resources.layout.as_str().to_string(),
            files,
        }
    }

    async fn write_manifest(&mut self, manifest: &Manifest) -> Result<(), BackupError> {
        let t = Instant::now();
        let err = |e| BackupError::new(Stage::Manifest, e);
        let mut json = serde_json::to_vec_pretty(manifest).expect("a manifest always serializes");
        json.push(b'\n');
        let final_path = self.set.file(MANIFEST_FILE_NAME);
        let path = partial(&final_path);
        let mut up = self.create(&path, Stage::Manifest).await?;
        up.write(&json).await.map_err(err)?;
        up.finish().await.map_err(err)?;
        self.dest.rename(&path, &final_path).await.map_err(err)?;
        self.created.push(final_path);
        self.stages.push(StageReport {
            stage: Stage::Manifest,
            bytes: json.len() as u64,
            duration: t.elapsed(),
        });
        Ok(())
    }

    /// Removes everything this run wrote, manifest first, so that even an
    /// interrupted clean-up never leaves a set that looks complete.
    async fn clean_up(&mut self) {
        let mut paths = std::mem::take(&mut self.created);
        paths.sort_by_key(|p| !p.ends_with(MANIFEST_FILE_NAME));
        for p in paths {
            if let Err(e) = self.dest.delete(&p).await {
                tracing::warn!(path = %p, error = %e, "could not remove a file of the failed run; retention removes it later");
            }
        }
        if let Err(e) = self.dest.remove_dir(&self.set.dir()).await {
            tracing::debug!(set = %self.set, error = %e, "set directory not removed");
        }
    }
}

/// The temporary name a file is written under.
pub fn partial(path: &str) -> String {
    format!("{path}{PARTIAL_SUFFIX}")
}
