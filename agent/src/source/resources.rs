//! The node's static-pod resources, bundled into `static_kuberesources_<ts>.tar.gz`.
//!
//! [`plan`] decides what goes in (and fails early, before etcd is touched, when
//! something the layout needs is missing). [`spawn_archive`] then streams the
//! tar.gz through a small bounded channel, so the tarball is never held whole.
//!
//! Paths inside the archive are relative to `resources.root` (the host's
//! `/etc/kubernetes`), exactly as `tar -C /etc/kubernetes …` gives them, which is
//! what OpenShift's `cluster-restore.sh` expects. Symbolic links are stored as
//! links and never followed, so nothing outside the root can get in. The
//! headers are the ones GNU `tar -cpzf` writes (the tool `cluster-backup.sh`
//! uses), so the platform's restore script gets exactly what it is used to.

use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
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
    /// Relative paths, in archive order. Names below them are walked as the
    /// bytes they are: a name that is not UTF-8 is archived as it is, as GNU
    /// tar does.
    pub paths: Vec<PathBuf>,
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

fn openshift_paths(root: &Path) -> Result<Vec<PathBuf>, ResourcesError> {
    let mut paths = Vec::new();
    for name in OPENSHIFT_STATIC_PODS {
        let file = format!("{name}-pod.yaml");
        let text = read_manifest(root, &file, Layout::Openshift)?;
        let rel = revision_dir(&text, name).ok_or_else(|| ResourcesError::NoRevision {
            manifest: root.join("manifests").join(&file),
            name: name.to_string(),
        })?;
        require_dir(&root.join(&rel))?;
        paths.push(PathBuf::from(rel));
    }
    Ok(paths)
}

/// The static pods of the layout that are mid-rollout on this node: a
/// `static-pod-resources/<name>-pod-<N>` directory newer than the revision
/// the live manifest names means the installer has laid out a revision the
/// kubelet is not running yet (OpenShift's `cluster-backup.sh` refuses to
/// back up then, or with `--force` marks the set `__POSSIBLY_DIRTY__`): the
/// bundled resources may not match etcd. Only the `openshift` layout has
/// revisions; the others are never mid-rollout here. Where the revisions
/// cannot be read, the pod is counted as mid-rollout (a warning is logged):
/// a set is marked when in doubt, never called clean.
pub fn rollout_in_progress(config: &ResourcesConfig) -> Vec<String> {
    if config.layout != Layout::Openshift {
        return Vec::new();
    }
    let dir = config.root.join("static-pod-resources");
    let listing: Option<Vec<String>> = match std::fs::read_dir(&dir) {
        Ok(rd) => Some(
            rd.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
        ),
        Err(e) => {
            tracing::warn!(path = %dir.display(), error = %e, "cannot list the static-pod revisions; the set is marked as taken mid-rollout");
            None
        }
    };
    let mut pods = Vec::new();
    for name in OPENSHIFT_STATIC_PODS {
        let manifest = config
            .root
            .join("manifests")
            .join(format!("{name}-pod.yaml"));
        let live = std::fs::read_to_string(&manifest)
            .ok()
            .and_then(|text| revision_dir(&text, name))
            .and_then(|rel| revision_number(&rel, name));
        let (Some(entries), Some(live)) = (&listing, live) else {
            tracing::warn!(pod = name, manifest = %manifest.display(), "cannot tell the live static-pod revision; the set is marked as taken mid-rollout");
            pods.push(name.to_string());
            continue;
        };
        let newest = entries
            .iter()
            .filter_map(|n| revision_number(&format!("static-pod-resources/{n}"), name))
            .max();
        if newest.is_some_and(|n| n > live) {
            pods.push(name.to_string());
        }
    }
    pods
}

/// N of `static-pod-resources/<name>-pod-<N>`.
fn revision_number(rel: &str, name: &str) -> Option<u64> {
    let digits = rel.strip_prefix(&format!("static-pod-resources/{name}-pod-"))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
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

fn kubeadm_paths(root: &Path) -> Result<Vec<PathBuf>, ResourcesError> {
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
        // As bytes: a manifest whose name is not UTF-8 is taken all the same.
        let name = entry.file_name();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && name.as_bytes().ends_with(b".yaml") {
            names.push(Path::new("manifests").join(name));
        }
    }
    names.sort();
    let mut paths = names;
    require_dir(&root.join("pki"))?;
    paths.push(PathBuf::from("pki"));
    if let Some(value) = encryption_provider_config(&apiserver) {
        let rel = Path::new(&value)
            .strip_prefix(HOST_ROOT)
            .ok()
            .and_then(|p| p.to_str())
            .filter(|p| !p.is_empty() && !p.split('/').any(|c| c == ".."))
            .map(PathBuf::from)
            .ok_or_else(|| ResourcesError::OutsideRoot {
                value: value.clone(),
            })?;
        let covered = paths.iter().any(|p| rel.starts_with(p));
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

/// Writes the planned tree as tar.gz into `out`, with headers exactly as GNU
/// `tar -cpzf` writes them (see `GnuArchive`).
///
/// # Errors
/// Read failures, and write failures of `out`.
pub fn write_archive<W: Write>(plan: &Plan, out: W) -> Result<(W, ArchiveStats), ResourcesError> {
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut archive = GnuArchive::new(gz);
    let mut stats = ArchiveStats::default();
    for rel in &plan.paths {
        append_tree(&mut archive, &plan.root, rel, &mut stats)?;
    }
    let gz = archive.finish().map_err(|source| ResourcesError::Io {
        op: "write the archive for",
        path: plan.root.clone(),
        source,
    })?;
    let out = gz.finish().map_err(|source| ResourcesError::Io {
        op: "write the archive for",
        path: plan.root.clone(),
        source,
    })?;
    Ok((out, stats))
}

fn append_tree<W: Write>(
    archive: &mut GnuArchive<W>,
    root: &Path,
    rel: &Path,
    stats: &mut ArchiveStats,
) -> Result<(), ResourcesError> {
    let full = root.join(rel);
    let io_err = |op: &'static str| {
        let path = full.clone();
        move |source| ResourcesError::Io { op, path, source }
    };
    let meta = std::fs::symlink_metadata(&full).map_err(io_err("stat"))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        archive.directory(rel, &meta).map_err(io_err("archive"))?;
    } else if ft.is_symlink() {
        let target = std::fs::read_link(&full).map_err(io_err("read the link"))?;
        archive
            .symlink(rel, &meta, target.as_os_str().as_bytes())
            .map_err(io_err("archive"))?;
    } else if ft.is_file() {
        let file = std::fs::File::open(&full).map_err(io_err("open"))?;
        if archive.file(rel, &meta, file).map_err(io_err("archive"))? {
            stats.content_bytes += meta.len();
        }
    } else {
        tracing::warn!(path = %full.display(), "skipping special file (socket, fifo or device)");
        return Ok(());
    }
    stats.entries += 1;
    if ft.is_dir() {
        // Names as bytes, sorted bytewise (`tar --sort=name`'s order); none
        // is left out for not being UTF-8.
        let mut children: Vec<std::ffi::OsString> = std::fs::read_dir(&full)
            .map_err(io_err("list"))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_err("list"))?;
        children.sort();
        for child in children {
            append_tree(archive, root, &rel.join(child), stats)?;
        }
    }
    Ok(())
}

/// GNU tar's record size: `tar -c` pads the archive to a multiple of 20 blocks.
const GNU_RECORD: u64 = 20 * 512;

/// The length of a header's name and link-name fields; longer names go into
/// a `././@LongLink` entry before the header, as GNU tar does.
const NAME_FIELD: usize = 100;

/// A tar stream whose headers are byte for byte what GNU tar 1.x writes in its
/// default (GNU) format for `tar -cp`: `ustar  \0` magic; permission bits only
/// in `mode`; numeric ids and the owners' names (looked up like GNU tar does,
/// through the system's user and group database; empty when unknown);
/// directories named with a trailing `/`; symlinks stored as links with size
/// 0; a second name of a hard-linked file stored as a hard link; names and
/// link targets over 100 bytes in `././@LongLink` entries (`L`, `K`); the
/// checksum written as GNU tar writes it; the end padded to a full record.
/// `cluster-restore.sh` unpacks it with GNU tar, so it gets what
/// `cluster-backup.sh` would have given it.
struct GnuArchive<W: Write> {
    builder: tar::Builder<CountingWriter<W>>,
    users: std::collections::HashMap<u32, Vec<u8>>,
    groups: std::collections::HashMap<u32, Vec<u8>>,
    /// First archived name of each multiply-linked file, by (device, inode).
    hard_links: std::collections::HashMap<(u64, u64), PathBuf>,
}

impl<W: Write> GnuArchive<W> {
    fn new(out: W) -> Self {
        Self {
            builder: tar::Builder::new(CountingWriter {
                inner: out,
                written: 0,
            }),
            users: std::collections::HashMap::new(),
            groups: std::collections::HashMap::new(),
            hard_links: std::collections::HashMap::new(),
        }
    }

    /// The user name GNU tar would record for `uid`.
    fn user_name(&mut self, uid: u32) -> Vec<u8> {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name.into_bytes())
                    .unwrap_or_default()
            })
            .clone()
    }

    /// The group name GNU tar would record for `gid`.
    fn group_name(&mut self, gid: u32) -> Vec<u8> {
        self.groups
            .entry(gid)
            .or_insert_with(|| {
                nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
                    .ok()
                    .flatten()
                    .map(|g| g.name.into_bytes())
                    .unwrap_or_default()
            })
            .clone()
    }

    /// A header for an entry of `meta`, everything but its names set.
    fn header(&mut self, kind: tar::EntryType, meta: &std::fs::Metadata, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(meta.mode() & 0o7777);
        h.set_uid(meta.uid().into());
        h.set_gid(meta.gid().into());
        h.set_size(size);
        h.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
        let (user, group) = (self.user_name(meta.uid()), self.group_name(meta.gid()));
        self.set_owner_names(&mut h, &user, &group);
        h
    }

    fn set_owner_names(&self, h: &mut tar::Header, user: &[u8], group: &[u8]) {
        if let Some(gnu) = h.as_gnu_mut() {
            copy_field(&mut gnu.uname, user);
            copy_field(&mut gnu.gname, group);
        }
    }

    /// Writes a `././@LongLink` entry of `kind` (`L` for a name, `K` for a
    /// link target) carrying `name`, NUL-terminated, as GNU tar does: mode
    /// 0644, owner 0 with uid 0's and gid 0's names, mtime 0.
    fn long_name(&mut self, kind: u8, name: &[u8]) -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(name.len() as u64 + 1);
        h.set_mtime(0);
        let (user, group) = (self.user_name(0), self.group_name(0));
        self.set_owner_names(&mut h, &user, &group);
        if let Some(gnu) = h.as_gnu_mut() {
            copy_field(&mut gnu.name, b"././@LongLink");
        }
        set_gnu_checksum(&mut h);
        self.builder.append(&h, name.chain(&[0u8][..]))
    }

    /// Names `h` (and its link target), writing long-name entries first when
    /// they do not fit, then writes it and `data`.
    fn append(
        &mut self,
        mut h: tar::Header,
        name: &[u8],
        link: Option<&[u8]>,
        data: impl std::io::Read,
    ) -> std::io::Result<()> {
        if let Some(link) = link {
            if link.len() > NAME_FIELD {
                self.long_name(b'K', link)?;
            }
        }
        if name.len() > NAME_FIELD {
            self.long_name(b'L', name)?;
        }
        if let Some(gnu) = h.as_gnu_mut() {
            copy_field(&mut gnu.name, name);
            if let Some(link) = link {
                copy_field(&mut gnu.linkname, link);
            }
        }
        set_gnu_checksum(&mut h);
        self.builder.append(&h, data)
    }

    /// If `meta` is a further name of a file already archived, writes a hard
    /// link to the first name and returns true.
    fn hard_link(&mut self, rel: &Path, meta: &std::fs::Metadata) -> std::io::Result<bool> {
        if meta.nlink() < 2 {
            return Ok(false);
        }
        match self.hard_links.get(&(meta.dev(), meta.ino())) {
            Some(first) => {
                let first = first.clone();
                let h = self.header(tar::EntryType::Link, meta, 0);
                self.append(
                    h,
                    rel.as_os_str().as_bytes(),
                    Some(first.as_os_str().as_bytes()),
                    std::io::empty(),
                )?;
                Ok(true)
            }
            None => {
                self.hard_links
                    .insert((meta.dev(), meta.ino()), rel.to_path_buf());
                Ok(false)
            }
        }
    }

    fn directory(&mut self, rel: &Path, meta: &std::fs::Metadata) -> std::io::Result<()> {
        let h = self.header(tar::EntryType::Directory, meta, 0);
        let mut name = rel.as_os_str().as_bytes().to_vec();
        name.push(b'/');
        self.append(h, &name, None, std::io::empty())
    }

    fn symlink(
        &mut self,
        rel: &Path,
        meta: &std::fs::Metadata,
        target: &[u8],
    ) -> std::io::Result<()> {
        if self.hard_link(rel, meta)? {
            return Ok(());
        }
        let h = self.header(tar::EntryType::Symlink, meta, 0);
        self.append(
            h,
            rel.as_os_str().as_bytes(),
            Some(target),
            std::io::empty(),
        )
    }

    /// Writes a regular file's entry and content; false when it was written
    /// as a hard link to an earlier name (no content).
    fn file(
        &mut self,
        rel: &Path,
        meta: &std::fs::Metadata,
        file: std::fs::File,
    ) -> std::io::Result<bool> {
        if self.hard_link(rel, meta)? {
            return Ok(false);
        }
        let size = meta.len();
        let h = self.header(tar::EntryType::Regular, meta, size);
        self.append(
            h,
            rel.as_os_str().as_bytes(),
            None,
            ExactReader {
                inner: file,
                left: size,
            },
        )?;
        Ok(true)
    }

    /// Ends the archive (two zero blocks, then zeros to a full record).
    fn finish(self) -> std::io::Result<W> {
        let mut out = self.builder.into_inner()?;
        let pad = (GNU_RECORD - out.written % GNU_RECORD) % GNU_RECORD;
        std::io::copy(&mut std::io::repeat(0).take(pad), &mut out)?;
        Ok(out.inner)
    }
}

/// Copies `value` into a fixed header field, truncated to fit and
/// NUL-padded, as GNU tar does (a field filled to its end has no NUL).
fn copy_field(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
    field[n..].fill(0);
}

/// Sets the header checksum the way GNU tar writes it: six octal digits, NUL,
/// space (the tar crate writes seven digits and a NUL, equally valid but not
/// the same bytes).
fn set_gnu_checksum(h: &mut tar::Header) {
    h.as_old_mut().cksum = *b"        ";
    let sum: u32 = h.as_bytes().iter().map(|b| u32::from(*b)).sum();
    let field = format!("{sum:06o}\0 ");
    h.as_old_mut().cksum.copy_from_slice(field.as_bytes());
}

/// Reads exactly `left` bytes of a file: a file that grew is cut at the size
/// in its header, one that shrank is an error (the header is already out).
struct ExactReader<R> {
    inner: R,
    left: u64,
}

impl<R: std::io::Read> std::io::Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the file shrank by {} bytes while it was archived",
                    self.left
                ),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Counts what goes through, for the final record padding.
struct CountingWriter<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(data)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
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

    /// The raw 512-byte headers of an uncompressed archive, long-name entries
    /// included, with the entry bytes that follow skipped.
    fn raw_headers(tar: &[u8]) -> Vec<[u8; 512]> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 512 <= tar.len() && tar[at..at + 512].iter().any(|b| *b != 0) {
            let h: [u8; 512] = tar[at..at + 512].try_into().unwrap();
            let size = tar::Header::from_byte_slice(&h).size().unwrap();
            out.push(h);
            at += 512 + size.div_ceil(512) as usize * 512;
        }
        out
    }

    fn archive_of(build: impl FnOnce(&Path)) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("top")).unwrap();
        build(&dir.path().join("top"));
        let plan = Plan {
            root: dir.path().to_path_buf(),
            paths: vec!["top".into()],
        };
        let (gz, _) = write_archive(&plan, Vec::new()).unwrap();
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut tar)
            .unwrap();
        tar
    }

    #[test]
    fn headers_carry_permission_bits_only_gnu_magic_and_gnu_checksum_spelling() {
        use std::os::unix::fs::PermissionsExt;
        let tar = archive_of(|top| {
            std::fs::write(top.join("key"), "k").unwrap();
            std::fs::set_permissions(top.join("key"), std::fs::Permissions::from_mode(0o600))
                .unwrap();
        });
        assert_eq!(tar.len() % 10240, 0, "padded to GNU tar's record");
        let headers = raw_headers(&tar);
        assert_eq!(headers.len(), 2);
        for h in &headers {
            assert_eq!(&h[257..265], b"ustar  \0");
            let header = tar::Header::from_byte_slice(h);
            assert_eq!(header.mode().unwrap() & !0o7777, 0, "no file-type bits");
            // Six octal digits, NUL, space; and the sum right.
            assert_eq!(&h[154..156], b"\0 ");
            let stored = u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8);
            assert_eq!(stored.unwrap(), header.cksum().unwrap());
        }
        assert_eq!(&headers[0][..5], b"top/\0", "a directory ends with /");
        assert_eq!(&headers[0][100..108], b"0000755\0");
        assert_eq!(&headers[1][..8], b"top/key\0");
        assert_eq!(&headers[1][100..108], b"0000600\0");
    }

    #[test]
    fn long_names_and_targets_go_in_longlink_entries_link_first() {
        let name = "n".repeat(120);
        let target = "t".repeat(130);
        let tar = archive_of(|top| {
            std::os::unix::fs::symlink(&target, top.join(&name)).unwrap();
        });
        let headers = raw_headers(&tar);
        let kinds: Vec<u8> = headers.iter().map(|h| h[156]).collect();
        assert_eq!(kinds, b"5KL2");
        for h in &headers[1..3] {
            assert_eq!(&h[..14], b"././@LongLink\0");
            assert_eq!(&h[100..108], b"0000644\0");
        }
        // The field holds the first 100 bytes, as GNU tar leaves it.
        assert_eq!(
            &headers[3][..100],
            format!("top/{name}").as_bytes()[..100].as_ref()
        );
        let mut archive = tar::Archive::new(&tar[..]);
        let entries: Vec<(String, Option<String>)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.link_name().unwrap().map(|l| l.display().to_string()),
                )
            })
            .collect();
        assert_eq!(entries[1], (format!("top/{name}"), Some(target)));
    }

    #[test]
    fn a_second_name_of_a_file_is_stored_as_a_hard_link_to_the_first() {
        let tar = archive_of(|top| {
            std::fs::write(top.join("a"), "content").unwrap();
            std::fs::hard_link(top.join("a"), top.join("b")).unwrap();
        });
        let headers = raw_headers(&tar);
        let kinds: Vec<u8> = headers.iter().map(|h| h[156]).collect();
        assert_eq!(kinds, b"501");
        let link = tar::Header::from_byte_slice(&headers[2]);
        assert_eq!(link.size().unwrap(), 0);
        assert_eq!(link.link_name().unwrap().unwrap().to_str(), Some("top/a"));
    }

    #[test]
    fn a_file_that_shrank_while_archived_is_an_error_not_a_short_entry() {
        let mut r = ExactReader {
            inner: &b"abc"[..],
            left: 5,
        };
        let mut buf = Vec::new();
        let err = r.read_to_end(&mut buf).unwrap_err();
        assert!(err.to_string().contains("shrank by 2 bytes"), "{err}");
        let mut r = ExactReader {
            inner: &b"abcdef"[..],
            left: 4,
        };
        let mut buf = Vec::new();
        r.read_to_end(&mut buf).unwrap();
        assert_eq!(buf, b"abcd", "a file that grew is cut at its header's size");
    }

    #[test]
    fn a_revision_directory_newer_than_the_live_one_marks_its_pod_mid_rollout() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for (name, live, dirs) in [
            ("kube-apiserver", 9, &[8, 9][..]),
            ("kube-controller-manager", 5, &[5, 10][..]),
            ("kube-scheduler", 3, &[2, 3][..]),
            ("etcd", 2, &[2][..]),
        ] {
            std::fs::create_dir_all(r.join("manifests")).unwrap();
            std::fs::write(
                r.join(format!("manifests/{name}-pod.yaml")),
                format!("path: /etc/kubernetes/static-pod-resources/{name}-pod-{live}\n"),
            )
            .unwrap();
            for d in dirs {
                std::fs::create_dir_all(r.join(format!("static-pod-resources/{name}-pod-{d}")))
                    .unwrap();
            }
        }
        // Not revisions: other names, and a file.
        std::fs::create_dir_all(r.join("static-pod-resources/etcd-pod-3x")).unwrap();
        std::fs::create_dir_all(r.join("static-pod-resources/kube-apiserver-certs")).unwrap();
        std::fs::write(r.join("static-pod-resources/etcd-pod-7"), "").unwrap();
        let config = ResourcesConfig {
            root: r.to_path_buf(),
            layout: Layout::Openshift,
        };
        // 10 > 5 numerically, though "10" < "5" as text.
        assert_eq!(rollout_in_progress(&config), ["kube-controller-manager"]);
        std::fs::remove_dir(r.join("static-pod-resources/kube-controller-manager-pod-10")).unwrap();
        assert!(rollout_in_progress(&config).is_empty());
        std::fs::remove_file(r.join("manifests/etcd-pod.yaml")).unwrap();
        assert_eq!(
            rollout_in_progress(&config),
            ["etcd"],
            "unknown counts as mid-rollout"
        );
        let kubeadm = ResourcesConfig {
            root: r.to_path_buf(),
            layout: Layout::Kubeadm,
        };
        assert!(rollout_in_progress(&kubeadm).is_empty());
    }

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
