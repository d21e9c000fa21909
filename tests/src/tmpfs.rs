//! A size-limited tmpfs mounted for one test, to fill a destination's disk.
//!
//! Tests run as root (scripts/test runs them in a container as root); a
//! tmpfs counts whole 4 KiB pages per file, directories cost no pages, so a
//! size of `n × 4096` bytes holds exactly `n` pages of file data.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// Bytes per tmpfs page: what a file's size is rounded up to.
pub const PAGE: u64 = 4096;

/// Pages a file of `bytes` takes on a tmpfs.
pub fn pages(bytes: u64) -> u64 {
    bytes.div_ceil(PAGE)
}

/// A mounted tmpfs; unmounted (and its mountpoint removed when this made
/// it) on drop.
pub struct Tmpfs {
    /// The mountpoint.
    pub path: PathBuf,
    _dir: Option<TempDir>,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes (a multiple of [`PAGE`]) on a new
    /// temporary directory.
    pub fn mount(size: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tmpfs");
        std::fs::create_dir(&path).expect("create mountpoint");
        let mut fs = Self::mount_at(&path, size);
        fs._dir = Some(dir);
        fs
    }

    /// Mounts a tmpfs of `size` bytes on `path`, which must be an existing,
    /// empty directory (mode 0700, like the agent's own directories).
    pub fn mount_at(path: &Path, size: u64) -> Self {
        assert_eq!(size % PAGE, 0, "a tmpfs size is a whole number of pages");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0700"))
            .arg("tmpfs")
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs on {} failed (the fault-matrix tests need root, as scripts/test runs them): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            path: path.to_path_buf(),
            _dir: None,
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process still holding a file there must not keep it mounted.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
