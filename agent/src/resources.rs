//! The node's static-pod resources, bundled into `static_kuberesources_<ts>.tar.gz`.
//!
//! [`plan`] decides what goes in (and fails early, before etcd is touched, when
//! something the layout needs is missing). [`spawn_archive`] then streams the
//! tar.gz through a small bounded channel, so the tarball is never held whole.
//!
//! Paths inside the archive are relative to `resources.root` (the host's
//! `/etc/kubernetes`), exactly as `tar -C /etc/kubernetes …` gives them, which is
//! what OpenShift's `cluster-restore.sh` expects. Symbolic links are stored as
//! links and never followed, so nothing outside the root can get in.

use std::io::Write;
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use crate::config::{Layout, ResourcesConfig};

/// The static pods whose current revision OpenShift's `cluster-backup.sh` saves.
pub const OPENSHIFT_STATIC_PODS: [&str; 4] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "etcd",
];

/// The host path that `resources.root` stands for inside the pod.
const HOST_ROOT: &str = "/etc/kubernetes";

/// Why the resources could not be bundled.
#[derive(Debug, thiserror::Error)]
pub enum ResourcesError {
    /// A static-pod manifest the layout needs does not exist.
    #[error("static-pod manifest {path} not found; is resources.root ({root}) the host's /etc/kubernetes, and is resources.layout ({layout}) right for this node?")]
    MissingManifest {
        /// The manifest's path.
        path: PathBuf,
        /// The configured root.
        root: PathBuf,
        /// The configured layout.
        layout: &'static str,
    },
    /// An OpenShift manifest does not name a `static-pod-resources/<name>-pod-N` revision.
    #[error("{manifest} does not reference a static-pod-resources/{name}-pod-<revision> directory; cannot tell which revision is live")]
    NoRevision {
        /// The manifest read.
        manifest: PathBuf,
        /// The static pod.
        name: String,
    },
    /// A path the layout needs is not a directory (missing, a file, or a symlink).
    #[error("{path} is not a directory inside resources.root (missing, or a symbolic link, which is never followed)")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// `--encryption-provider-config` points outside the mounted root.
    #[error("kube-apiserver's --encryption-provider-config is {value}, outside {HOST_ROOT}; only files below {HOST_ROOT} (resources.root) can be backed up: move the file there")]
    OutsideRoot {
        /// The flag's value.
        value: String,
    },
    /// A path resolves outside the root through a symbolic link.
    #[error(
        "{path} resolves outside resources.root through a symbolic link; refusing to follow it"
    )]
    Escape {
        /// The path.
        path: PathBuf,
    },
    /// Reading a file or writing the archive failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The reader of the archive went away (the upload failed).
    #[error("archive stream closed before the tarball was complete")]
    Aborted,
}

/// What goes into the tarball: top-level paths relative to the root, walked
/// recursively when they are directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The root everything is relative to.
    pub root: PathBuf,
    /// Relative paths, in archive order.
    pub paths: Vec<String>,
}

/// Totals of a written archive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArchiveStats {
    /// Entries written (files, directories, links).
    pub entries: u64,
    /// Bytes of file content read.
    pub content_bytes: u64,
}

/// Decides what the tarball holds; `None` for `layout: none`.
///
/// # Errors
/// A missing manifest or revision directory, an escape through a symlink.
pub fn plan(config: &ResourcesConfig) -> Result<Option<Plan>, ResourcesError> {
    let root = &config.root;
    let paths = match config.layout {
        Layout::None => return Ok(None),
        Layout::Openshift => openshift_paths(root)?,
        Layout::Kubeadm => kubeadm_paths(root)?,
    };
    let canonical_root = std::fs::canonicalize(root).map_err(|source| ResourcesError::Io {
        op: "resolve",
        path: root.clone(),
        source,
    })?;
    for rel in &paths {
        // The walk itself never follows links, but a link among the
        // components of a top-level path would take it elsewhere.
        let full = root.join(rel);
        let resolved = std::fs::canonicalize(&full).map_err(|source| ResourcesError::Io {
            op: "resolve",
            path: full.clone(),
            source,
        })?;
        if !resolved.starts_with(&canonical_root) {
            return Err(ResourcesError::Escape { path: full });
        }
    }
    Ok(Some(Plan {
        root: root.clone(),
        paths,
    }))
}

fn read_manifest(root: &Path, name: &str, layout: Layout) -> Result<String, ResourcesError> {
    let path = root.join("manifests").join(name);
    std::fs::read_to_string(&path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ResourcesError::MissingManifest {
                path: path.clone(),
                root: root.to_path_buf(),
                layout: layout.as_str(),
            }
        } else {
            ResourcesError::Io {
                op: "read",
                path: path.clone(),
                source,
            }
        }
    })
}

fn require_dir(path: &Path) -> Result<(), ResourcesError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        _ => Err(ResourcesError::NotADirectory {
            path: path.to_path_buf(),
        }),
    }
}

/// The first `static-pod-resources/<name>-pod-<digits>` in a manifest, as
/// `cluster-backup.sh` finds it with grep.
fn revision_dir(manifest: &str, name: &str) -> Option<String> {
    let needle = format!("static-pod-resources/{name}-pod-");
    let mut rest = manifest;
    while let Some(at) = rest.find(&needle) {
        let after = &rest[at + needle.len()..];
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        if !digits.is_empty() {
            return Some(format!("static-pod-resources/{name}-pod-{digits}"));
        }
        rest = after;
    }
    None
}

fn openshift_paths(root: &Path) -> Result<Vec<String>, ResourcesError> {
    let mut paths = Vec::new();
    for name in OPENSHIFT_STATIC_PODS {
        let file = format!("{name}-pod.yaml");
        let text = read_manifest(root, &file, Layout::Openshift)?;
        let rel = revision_dir(&text, name).ok_or_else(|| ResourcesError::NoRevision {
            manifest: root.join("manifests").join(&file),
            name: name.to_string(),
        })?;
        require_dir(&root.join(&rel))?;
        paths.push(rel);
    }
    Ok(paths)
}

/// The value of `--encryption-provider-config` in a kube-apiserver manifest,
/// written either as `--flag=value` or as `--flag` followed by `value`.
fn encryption_provider_config(manifest: &str) -> Option<String> {
    const FLAG: &str = "--encryption-provider-config";
    let tokens: Vec<&str> = manifest
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .map(|t| t.trim_matches(|c| c == '"' || c == '\''))
        .filter(|t| !t.is_empty() && *t != "-")
        .collect();
    for (i, t) in tokens.iter().enumerate() {
        if let Some(v) = t.strip_prefix(FLAG) {
            if let Some(v) = v.strip_prefix('=') {
                return Some(v.to_string());
            }
            if v.is_empty() {
                return tokens.get(i + 1).map(|s| (*s).to_string());
            }
        }
    }
    None
}

fn kubeadm_paths(root: &Path) -> Result<Vec<String>, ResourcesError> {
    let manifests_dir = root.join("manifests");
    require_dir(&manifests_dir)?;
    let apiserver = read_manifest(root, "kube-apiserver.yaml", Layout::Kubeadm)?;
    let mut names = Vec::new();
    let rd = std::fs::read_dir(&manifests_dir).map_err(|source| ResourcesError::Io {
        op: "list",
        path: manifests_dir.clone(),
        source,
    })?;
    for entry in rd {
        let entry = entry.map_err(|source| ResourcesError::Io {
            op: "list",
            path: manifests_dir.clone(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && name.ends_with(".yaml") {
            names.push(format!("manifests/{name}"));
        }
    }
    names.sort();
    let mut paths = names;
    require_dir(&root.join("pki"))?;
    paths.push("pki".to_string());
    if let Some(value) = encryption_provider_config(&apiserver) {
        let rel = Path::new(&value)
            .strip_prefix(HOST_ROOT)
            .ok()
            .and_then(|p| p.to_str())
            .filter(|p| !p.is_empty() && !p.split('/').any(|c| c == ".."))
            .ok_or_else(|| ResourcesError::OutsideRoot {
                value: value.clone(),
            })?
            .to_string();
        let covered = paths
            .iter()
            .any(|p| rel == *p || rel.starts_with(&format!("{p}/")));
        if !covered {
            let full = root.join(&rel);
            if !full.is_file() {
                return Err(ResourcesError::Io {
                    op: "read the encryption provider config",
                    path: full,
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a file"),
                });
            }
            paths.push(rel);
        }
    }
    Ok(paths)
}

/// Writes the planned tree as tar.gz into `out`.
///
/// # Errors
/// Read failures, and write failures of `out`.
pub fn write_archive<W: Write>(plan: &Plan, out: W) -> Result<(W, ArchiveStats), ResourcesError> {
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut builder = tar::Builder::new(gz);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    let mut stats = ArchiveStats::default();
    for rel in &plan.paths {
        append_tree(&mut builder, &plan.root, rel, &mut stats)?;
    }
    let archive_err = |source| ResourcesError::Io {
        op: "write the archive for",
        path: plan.root.clone(),
        source,
    };
    let gz = builder.into_inner().map_err(archive_err)?;
    let out = gz.finish().map_err(archive_err)?;
    Ok((out, stats))
}

fn append_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    rel: &str,
    stats: &mut ArchiveStats,
) -> Result<(), ResourcesError> {
    let full = root.join(rel);
    let meta = std::fs::symlink_metadata(&full).map_err(|source| ResourcesError::Io {
        op: "stat",
        path: full.clone(),
        source,
    })?;
    let ft = meta.file_type();
    if !(ft.is_dir() || ft.is_file() || ft.is_symlink()) {
        tracing::warn!(path = %full.display(), "skipping special file (socket, fifo or device)");
        return Ok(());
    }
    builder
        .append_path_with_name(&full, rel)
        .map_err(|source| ResourcesError::Io {
            op: "archive",
            path: full.clone(),
            source,
        })?;
    stats.entries += 1;
    if ft.is_file() {
        stats.content_bytes += meta.len();
    }
    if ft.is_dir() {
        let mut children: Vec<String> = std::fs::read_dir(&full)
            .map_err(|source| ResourcesError::Io {
                op: "list",
                path: full.clone(),
                source,
            })?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| ResourcesError::Io {
                op: "list",
                path: full.clone(),
                source,
            })?
            .into_iter()
            .filter_map(|n| n.into_string().ok())
            .collect();
        children.sort();
        for child in children {
            append_tree(builder, root, &format!("{rel}/{child}"), stats)?;
        }
    }
    Ok(())
}

/// A `Write` that hands fixed-size chunks to an async reader through a bounded
/// channel, blocking the writer when the reader falls behind.
struct ChannelWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

const CHUNK: usize = 256 * 1024;

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "archive reader gone"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Starts writing the archive on a blocking thread. Chunks arrive on the
/// receiver (at most a few in flight); the handle yields the totals, or the
/// error that stopped the archive. Dropping the receiver stops the writer.
pub fn spawn_archive(
    plan: Plan,
) -> (
    mpsc::Receiver<Vec<u8>>,
    tokio::task::JoinHandle<Result<ArchiveStats, ResourcesError>>,
) {
    let (tx, rx) = mpsc::channel(4);
    let span = tracing::Span::current();
    let handle = tokio::task::spawn_blocking(move || {
        let _enter = span.enter();
        let writer = ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        };
        match write_archive(&plan, writer) {
            Ok((mut w, stats)) => {
                w.flush().map_err(|_| ResourcesError::Aborted)?;
                Ok(stats)
            }
            Err(ResourcesError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::BrokenPipe =>
            {
                Err(ResourcesError::Aborted)
            }
            Err(e) => Err(e),
        }
    });
    (rx, handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_dir_takes_the_first_numbered_reference() {
        let m = "volumes:\n- hostPath:\n    path: /etc/kubernetes/static-pod-resources/kube-apiserver-certs\n- hostPath:\n    path: /etc/kubernetes/static-pod-resources/kube-apiserver-pod-7\n";
        assert_eq!(
            revision_dir(m, "kube-apiserver").as_deref(),
            Some("static-pod-resources/kube-apiserver-pod-7")
        );
        assert_eq!(revision_dir(m, "etcd"), None);
        assert_eq!(revision_dir("static-pod-resources/etcd-pod-", "etcd"), None);
    }

    #[test]
    fn encryption_flag_in_both_spellings() {
        let eq = "    - --advertise-address=1.2.3.4\n    - --encryption-provider-config=/etc/kubernetes/enc/enc.yaml\n";
        assert_eq!(
            encryption_provider_config(eq).as_deref(),
            Some("/etc/kubernetes/enc/enc.yaml")
        );
        let split = "command: [\"kube-apiserver\", \"--encryption-provider-config\", \"/etc/kubernetes/enc.yaml\"]";
        assert_eq!(
            encryption_provider_config(split).as_deref(),
            Some("/etc/kubernetes/enc.yaml")
        );
        assert_eq!(encryption_provider_config("- --secure-port=6443"), None);
    }
}
