//! A local directory that fails, or goes silent, on chosen operations: the
//! one fault-injecting destination the unit tests share (a dropped
//! connection while publishing or pruning, a reply that never comes, a
//! server that cannot sync, files or directories).

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use tokio::io::AsyncRead;

use super::{Destination, DestinationError, DirEntry, DirSync, Durability, LocalDir, Upload};

/// Which operations misbehave; counts are 1-based, 0 means never.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Faults {
    /// The n-th rename fails with a connection reset, touching nothing.
    pub rename_fails_at: usize,
    /// The n-th create is carried out and then never answered.
    pub create_silent_at: usize,
    /// The n-th rename is carried out and then never answered.
    pub rename_silent_at: usize,
    /// Every delete from the n-th on fails with a connection reset.
    pub deletes_fail_from: usize,
    /// `durability` answers as an SFTP server without fsync@openssh.com:
    /// `Some(true)` refused by `require_fsync`, `Some(false)` allowed.
    pub unsynced_required: Option<bool>,
    /// Every `sync_dir` from the n-th on answers that the directory cannot
    /// be synced, as a server that refuses to open or fsync a directory.
    pub dir_sync_refused_from: usize,
    /// The n-th `sync_dir` fails with a connection reset.
    pub dir_sync_fails_at: usize,
}

/// A [`LocalDir`] with [`Faults`]; `inner` is the same directory without them.
pub(crate) struct Faulty {
    pub inner: LocalDir,
    faults: Faults,
    creates: AtomicUsize,
    renames: AtomicUsize,
    deletes: AtomicUsize,
    dir_syncs: AtomicUsize,
}

impl Faulty {
    pub(crate) fn new(inner: LocalDir, faults: Faults) -> Self {
        Self {
            inner,
            faults,
            creates: AtomicUsize::new(0),
            renames: AtomicUsize::new(0),
            deletes: AtomicUsize::new(0),
            dir_syncs: AtomicUsize::new(0),
        }
    }
}

fn reset(op: &'static str, location: &str) -> DestinationError {
    DestinationError::Io {
        op,
        location: location.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset"),
    }
}

#[async_trait]
impl Destination for Faulty {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn create(&self, path: &str) -> Result<Box<dyn Upload>, DestinationError> {
        let up = self.inner.create(path).await?;
        // Counts start at 1, so a fault at 0 never fires.
        if self.creates.fetch_add(1, Ordering::SeqCst) + 1 == self.faults.create_silent_at {
            drop(up);
            return std::future::pending().await;
        }
        Ok(up)
    }
    async fn rename(&self, from: &str, to: &str) -> Result<(), DestinationError> {
        let n = self.renames.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.faults.rename_fails_at {
            return Err(reset("cannot rename into", to));
        }
        self.inner.rename(from, to).await?;
        if n == self.faults.rename_silent_at {
            return std::future::pending().await;
        }
        Ok(())
    }
    async fn list(&self, dir: &str) -> Result<Vec<DirEntry>, DestinationError> {
        self.inner.list(dir).await
    }
    async fn open(
        &self,
        path: &str,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError> {
        self.inner.open(path).await
    }
    async fn delete(&self, path: &str) -> Result<(), DestinationError> {
        let from = self.faults.deletes_fail_from;
        if from != 0 && self.deletes.fetch_add(1, Ordering::SeqCst) + 1 >= from {
            return Err(reset("cannot delete", path));
        }
        self.inner.delete(path).await
    }
    async fn remove_dir(&self, path: &str) -> Result<(), DestinationError> {
        self.inner.remove_dir(path).await
    }
    async fn warm_up(&self) {
        self.inner.warm_up().await;
    }

    async fn sync_dir(&self, dir: &str) -> Result<DirSync, DestinationError> {
        let n = self.dir_syncs.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.faults.dir_sync_fails_at {
            return Err(reset("cannot sync directory", dir));
        }
        if self.faults.dir_sync_refused_from != 0 && n >= self.faults.dir_sync_refused_from {
            return Ok(DirSync::Unsupported("Failure: not a regular file".into()));
        }
        self.inner.sync_dir(dir).await
    }

    async fn durability(&self) -> Result<Durability, DestinationError> {
        match self.faults.unsynced_required {
            None => self.inner.durability().await,
            Some(true) => Err(DestinationError::NotDurable {
                location: self.describe(),
            }),
            Some(false) => Ok(Durability::NotSynced),
        }
    }
}
