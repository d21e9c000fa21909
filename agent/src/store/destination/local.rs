//! A directory on this machine (or a volume mounted into the pod).

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncSeekExt, AsyncWriteExt};

use super::range::Exact;
use super::{components, DestinationError, DirEntry, Upload};

/// Writes below `base`. Directories are created 0700, files 0600.
#[derive(Debug, Clone)]
pub struct LocalDir {
    base: PathBuf,
    /// Held by every create, rename, delete and directory removal until the
    /// filesystem call has returned, even when the caller stopped waiting: a
    /// blocking call cannot be stopped, so a cancelled run's create or rename
    /// would otherwise land after the clean-up that was to remove it.
    order: Arc<tokio::sync::Mutex<()>>,
}

fn io<'a>(
    op: &'static str,
    location: &'a Path,
) -> impl FnOnce(std::io::Error) -> DestinationError + 'a {
    move |source| {
        if super::is_out_of_space(&source) {
            DestinationError::Full {
                op,
                location: location.display().to_string(),
                detail: match free_space(location) {
                    Some(free) => format!("{source} ({free})"),
                    None => source.to_string(),
                },
            }
        } else {
            DestinationError::Io {
                op,
                location: location.display().to_string(),
                source,
            }
        }
    }
}

impl LocalDir {
    /// Uses `base`, creating it (0700) when it does not exist yet.
    ///
    /// # Errors
    /// When `base` cannot be created or is not a directory.
    pub async fn open(base: &Path) -> Result<Self, DestinationError> {
        let base = base.to_path_buf();
        let b = base.clone();
        tokio::task::spawn_blocking(move || {
            create_dirs(&b)?;
            let meta =
                std::fs::metadata(&b).map_err(io("cannot read destination directory", &b))?;
            if !meta.is_dir() {
                return Err(DestinationError::Io {
                    op: "cannot use destination",
                    location: b.display().to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "not a directory",
                    ),
                });
            }
            Ok(())
        })
        .await
        .map_err(|e| DestinationError::Io {
            op: "cannot prepare",
            location: base.display().to_string(),
            source: std::io::Error::other(e),
        })??;
        Ok(Self {
            base,
            order: Arc::default(),
        })
    }

    /// Runs blocking filesystem work off the async threads, after every
    /// earlier operation of this destination has finished; it finishes even
    /// when the returned future is dropped, and holds the order until then.
    async fn ordered<T: Send + 'static>(
        &self,
        location: &Path,
        f: impl FnOnce() -> Result<T, DestinationError> + Send + 'static,
    ) -> Result<T, DestinationError> {
        let turn = self.order.clone().lock_owned().await;
        blocking(location, move || {
            let result = f();
            drop(turn);
            result
        })
        .await
    }

    fn resolve(&self, path: &str) -> Result<PathBuf, DestinationError> {
        let mut p = self.base.clone();
        for c in components(path)? {
            p.push(c);
        }
        Ok(p)
    }
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T: Send + 'static>(
    location: &Path,
    f: impl FnOnce() -> Result<T, DestinationError> + Send + 'static,
) -> Result<T, DestinationError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DestinationError::Io {
            op: "background task failed for",
            location: location.display().to_string(),
            source: std::io::Error::other(e),
        })?
}

/// What statvfs(2) says about the filesystem holding `path` (or its nearest
/// existing ancestor), for a disk-full message.
fn free_space(path: &Path) -> Option<String> {
    let on = path.ancestors().find(|p| p.exists())?;
    let st = nix::sys::statvfs::statvfs(on).ok()?;
    let unit = st.fragment_size();
    Some(super::space_text(
        st.blocks_available().saturating_mul(unit),
        st.blocks().saturating_mul(unit),
    ))
}

/// Creates `dir` and its missing ancestors (mode 0700), and syncs the parent
/// of each one it created, so the new directories survive a crash.
fn create_dirs(dir: &Path) -> Result<(), DestinationError> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io("cannot create directory", dir))?;
    for d in missing.iter().rev() {
        if let Some(parent) = d.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), DestinationError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync directory", dir))
}

#[async_trait]
impl super::Destination for LocalDir {
    fn describe(&self) -> String {
        format!("local:{}", self.base.display())
    }

    async fn create(&self, path: &str) -> Result<Box<dyn Upload>, DestinationError> {
        let full = self.resolve(path)?;
        let f = full.clone();
        let file = self
            .ordered(&full, move || {
                if let Some(parent) = f.parent() {
                    create_dirs(parent)?;
                }
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&f)
                    .map_err(io("cannot create", &f))
            })
            .await?;
        Ok(Box::new(LocalUpload {
            // Large writes keep the number of blocking-pool hops low.
            file: tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(file)),
            path: full,
            written: 0,
        }))
    }

    async fn rename(&self, from: &str, to: &str) -> Result<(), DestinationError> {
        let from = self.resolve(from)?;
        let to = self.resolve(to)?;
        let t = to.clone();
        self.ordered(&to, move || {
            // Set names are unique per run, so checking first is enough to
            // never replace a file; rename(2) itself would overwrite silently.
            if std::fs::symlink_metadata(&t).is_ok() {
                return Err(DestinationError::AlreadyExists {
                    location: t.display().to_string(),
                });
            }
            std::fs::rename(&from, &t).map_err(io("cannot rename into", &t))?;
            if let Some(parent) = t.parent() {
                // The rename took effect: a failed sync is not a refusal
                // (whatever the OS calls it), so the caller looks before it
                // decides that the file is not there.
                std::fs::File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| DestinationError::Io {
                        op: "renamed, but cannot sync the directory of",
                        location: t.display().to_string(),
                        source: std::io::Error::other(e),
                    })?;
            }
            Ok(())
        })
        .await
    }

    async fn list(&self, dir: &str) -> Result<Vec<DirEntry>, DestinationError> {
        let full = if dir.is_empty() {
            self.base.clone()
        } else {
            self.resolve(dir)?
        };
        let d = full.clone();
        blocking(&full, move || {
            let rd = match std::fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(io("cannot list", &d)(e)),
            };
            let mut out = Vec::new();
            for entry in rd {
                let entry = entry.map_err(io("cannot list", &d))?;
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                // DirEntry::metadata does not follow symbolic links.
                let meta = entry.metadata().map_err(io("cannot stat", &entry.path()))?;
                out.push(DirEntry {
                    name,
                    is_dir: meta.is_dir(),
                    is_file: meta.file_type().is_file(),
                    size: if meta.is_dir() { 0 } else { meta.len() },
                    modified: meta.modified().ok(),
                });
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
        .await
    }

    async fn open(
        &self,
        path: &str,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError> {
        let full = self.resolve(path)?;
        let file = tokio::fs::File::open(&full)
            .await
            .map_err(io("cannot open", &full))?;
        Ok(Box::new(file))
    }

    /// A local disk answers at once: two ranges keep it busy.
    fn ranges_in_flight(&self) -> usize {
        2
    }

    async fn open_range(
        &self,
        path: &str,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError> {
        let full = self.resolve(path)?;
        let mut file = tokio::fs::File::open(&full)
            .await
            .map_err(io("cannot open", &full))?;
        let size = file
            .metadata()
            .await
            .map_err(io("cannot stat", &full))?
            .len();
        let location = full.display().to_string();
        match offset.checked_add(len) {
            Some(end) if end <= size => {}
            _ => {
                return Err(DestinationError::OutOfRange {
                    location,
                    offset,
                    len,
                    size,
                })
            }
        }
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io("cannot seek in", &full))?;
        Ok(Box::new(Exact::new(file, location, offset, len)))
    }

    async fn delete(&self, path: &str) -> Result<(), DestinationError> {
        let full = self.resolve(path)?;
        let f = full.clone();
        self.ordered(&full, move || match std::fs::remove_file(&f) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("cannot delete", &f)(e)),
        })
        .await
    }

    async fn remove_dir(&self, path: &str) -> Result<(), DestinationError> {
        let full = self.resolve(path)?;
        let d = full.clone();
        self.ordered(&full, move || match std::fs::remove_dir(&d) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("cannot remove directory", &d)(e)),
        })
        .await
    }
}

struct LocalUpload {
    file: tokio::io::BufWriter<tokio::fs::File>,
    path: PathBuf,
    written: u64,
}

#[async_trait]
impl Upload for LocalUpload {
    async fn write(&mut self, buf: &[u8]) -> Result<(), DestinationError> {
        self.file
            .write_all(buf)
            .await
            .map_err(io("cannot write", &self.path))?;
        self.written += buf.len() as u64;
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, DestinationError> {
        self.file
            .flush()
            .await
            .map_err(io("cannot write", &self.path))?;
        let file = self.file.get_mut();
        file.sync_all()
            .await
            .map_err(io("cannot sync", &self.path))?;
        let stored = file
            .metadata()
            .await
            .map_err(io("cannot stat", &self.path))?
            .len();
        if stored != self.written {
            return Err(DestinationError::SizeMismatch {
                location: self.path.display().to_string(),
                sent: self.written,
                stored,
            });
        }
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::destination::Destination;
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn write_rename_read_delete_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = LocalDir::open(&tmp.path().join("base")).await.unwrap();
        let mut up = dest.create("c/n/ts/f.partial").await.unwrap();
        up.write(b"hello ").await.unwrap();
        up.write(b"world").await.unwrap();
        assert_eq!(up.finish().await.unwrap(), 11);
        dest.rename("c/n/ts/f.partial", "c/n/ts/f").await.unwrap();

        let base = tmp.path().join("base");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&base), 0o700);
        assert_eq!(mode(&base.join("c/n/ts")), 0o700);
        assert_eq!(mode(&base.join("c/n/ts/f")), 0o600);

        let listed = dest.list("c/n/ts").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].name.as_str(), listed[0].size), ("f", 11));
        let mut text = String::new();
        dest.open("c/n/ts/f")
            .await
            .unwrap()
            .read_to_string(&mut text)
            .await
            .unwrap();
        assert_eq!(text, "hello world");

        dest.delete("c/n/ts/f").await.unwrap();
        dest.delete("c/n/ts/f").await.unwrap();
        dest.remove_dir("c/n/ts").await.unwrap();
        assert!(dest.list("c/n/ts").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn rename_never_replaces_and_create_never_truncates() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = LocalDir::open(tmp.path()).await.unwrap();
        for name in ["a", "b"] {
            let mut up = dest.create(name).await.unwrap();
            up.write(name.as_bytes()).await.unwrap();
            up.finish().await.unwrap();
        }
        assert!(matches!(
            dest.rename("a", "b").await,
            Err(DestinationError::AlreadyExists { .. })
        ));
        assert!(dest.create("a").await.is_err());
        assert_eq!(std::fs::read(tmp.path().join("b")).unwrap(), b"b");
    }

    /// A file of `len` bytes that differ from their neighbours.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 253) as u8).collect()
    }

    async fn read_range(dest: &LocalDir, path: &str, offset: u64, len: u64) -> Vec<u8> {
        let mut out = Vec::new();
        dest.open_range(path, offset, len)
            .await
            .unwrap()
            .read_to_end(&mut out)
            .await
            .unwrap();
        out
    }

    #[tokio::test]
    async fn a_range_reads_exactly_its_bytes_and_past_the_end_is_an_error_naming_the_size() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = LocalDir::open(tmp.path()).await.unwrap();
        let data = pattern(3 << 20);
        std::fs::create_dir(tmp.path().join("p")).unwrap();
        std::fs::write(tmp.path().join("p/pack"), &data).unwrap();
        let size = data.len() as u64;
        for (offset, len) in [
            (0, 1),
            (size - 1, 1),
            (1000, 2 << 20),
            (0, size),
            (12345, 0),
            (size, 0),
        ] {
            let got = read_range(&dest, "p/pack", offset, len).await;
            assert!(
                got == data[offset as usize..(offset + len) as usize],
                "{offset}+{len}"
            );
        }
        for (offset, len) in [(size - 10, 11), (size + 1, 0), (u64::MAX, 2)] {
            let Err(e) = dest.open_range("p/pack", offset, len).await else {
                panic!("{offset}+{len} past the end was opened");
            };
            assert!(
                matches!(e, DestinationError::OutOfRange { size: s, .. } if s == size),
                "{e:?}"
            );
            let text = e.to_string();
            assert!(text.contains(&format!("holds only {size} bytes")), "{text}");
            assert!(text.contains("p/pack"), "{text}");
            assert!(e.is_refusal() && !e.is_transient(), "{e:?}");
        }
        let Err(missing) = dest.open_range("p/nothing", 0, 1).await else {
            panic!("a missing file was opened");
        };
        assert!(
            matches!(&missing, DestinationError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{missing:?}"
        );
        assert!(matches!(
            dest.open_range("../outside", 0, 1).await,
            Err(DestinationError::BadPath { .. })
        ));
    }

    #[tokio::test]
    async fn a_file_cut_short_after_opening_fails_the_read_instead_of_ending_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = LocalDir::open(tmp.path()).await.unwrap();
        std::fs::write(tmp.path().join("pack"), pattern(1 << 20)).unwrap();
        let mut reader = dest.open_range("pack", 4096, 500_000).await.unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path().join("pack"))
            .unwrap()
            .set_len(100_000)
            .unwrap();
        let mut out = Vec::new();
        let e = reader.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
        assert!(e.to_string().contains("ended at byte 100000"), "{e}");
    }

    #[tokio::test]
    async fn read_ranges_yields_every_range_in_the_order_asked_with_several_in_flight() {
        use crate::store::destination::{read_ranges, ByteRange};
        use futures_util::StreamExt;
        let tmp = tempfile::tempdir().unwrap();
        let dest = LocalDir::open(tmp.path()).await.unwrap();
        let packs = [pattern(300_000), pattern(70_001)];
        for (i, p) in packs.iter().enumerate() {
            std::fs::write(tmp.path().join(format!("pack{i}")), p).unwrap();
        }
        // Out of file order and of offset order, a large one before small ones.
        let ranges: Vec<(usize, u64, u64)> = vec![
            (0, 100_000, 200_000),
            (1, 0, 1),
            (0, 0, 10),
            (1, 70_000, 1),
            (1, 500, 0),
            (0, 299_999, 1),
            (1, 1, 69_999),
            (0, 4096, 4096),
            (0, 10, 90),
        ];
        let asked = ranges.iter().map(|&(i, offset, len)| ByteRange {
            path: format!("pack{i}"),
            offset,
            len,
        });
        let got: Vec<Vec<u8>> = read_ranges(&dest, asked, 8)
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(got.len(), ranges.len());
        for ((i, offset, len), bytes) in ranges.iter().zip(&got) {
            let want = &packs[*i][*offset as usize..(*offset + *len) as usize];
            assert!(bytes == want, "pack{i} {offset}+{len}");
        }
        // A bad range fails its own item, in its place; the others still read.
        let asked =
            [("pack1", 0, 5), ("pack1", 70_000, 2), ("pack0", 1, 1)].map(|(p, offset, len)| {
                ByteRange {
                    path: p.into(),
                    offset,
                    len,
                }
            });
        let got: Vec<_> = read_ranges(&dest, asked, 2).collect().await;
        assert!(got[0].is_ok() && got[2].is_ok(), "{got:?}");
        assert!(
            matches!(
                got[1],
                Err(DestinationError::OutOfRange { size: 70_001, .. })
            ),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn paths_cannot_escape_the_base() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = LocalDir::open(&tmp.path().join("base")).await.unwrap();
        assert!(matches!(
            dest.create("../outside").await,
            Err(DestinationError::BadPath { .. })
        ));
        assert!(!tmp.path().join("outside").exists());
    }
}
