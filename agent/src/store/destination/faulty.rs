//! A local directory that fails, or goes silent, on chosen operations: the
//! one fault-injecting destination the unit tests share (a dropped
//! connection while publishing or pruning, a reply that never comes, a
//! reply lost after the operation was carried out, a server that cannot
//! sync, files or directories).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

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
    /// The n-th call of this operation is carried out, then answered with
    /// a timeout: the reply was lost on the way back.
    pub reply_lost: Option<(Op, usize)>,
    /// After that lost reply, every listing and read fails (the store
    /// cannot be read back): the caller cannot find out what happened.
    pub blind_after_lost: bool,
    /// Every `sync_dir` from the n-th on answers that the directory cannot
    /// be synced, as a server that refuses to open or fsync a directory.
    pub dir_sync_refused_from: usize,
    /// The n-th `sync_dir` fails with a connection reset.
    pub dir_sync_fails_at: usize,
    /// Ranged reads kept open at once, as a distant store asks for
    /// (`None`: as the local directory underneath).
    pub ranges_in_flight: Option<usize>,
}

/// The operations of the set protocol, for [`Faults::reply_lost`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Create,
    CreateSmall,
    Write,
    Finish,
    Rename,
    Claim,
    Delete,
}

impl Op {
    pub(crate) const ALL: [Op; 7] = [
        Op::Create,
        Op::CreateSmall,
        Op::Write,
        Op::Finish,
        Op::Rename,
        Op::Claim,
        Op::Delete,
    ];
}

/// Calls per operation, and whether a reply was lost; shared with uploads.
#[derive(Default)]
struct Lossy {
    calls: [AtomicUsize; 7],
    lost: AtomicBool,
}

impl Lossy {
    /// Counts a call of `op`; whether its reply is the one to lose.
    fn loses(&self, faults: &Faults, op: Op) -> bool {
        let n = self.calls[op as usize].fetch_add(1, Ordering::SeqCst) + 1;
        let hit = faults.reply_lost == Some((op, n));
        if hit {
            self.lost.store(true, Ordering::SeqCst);
        }
        hit
    }

    fn blind(&self, faults: &Faults) -> bool {
        faults.blind_after_lost && self.lost.load(Ordering::SeqCst)
    }
}

/// The error of a reply that never came back, after the work was done.
fn lost(op: &'static str, location: &str) -> DestinationError {
    DestinationError::Io {
        op,
        location: location.to_string(),
        source: std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer within the timeout (the reply was lost)",
        ),
    }
}

/// An upload whose writes or finish may lose their reply.
struct LossyUpload {
    inner: Box<dyn Upload>,
    faults: Faults,
    lossy: Arc<Lossy>,
    path: String,
}

#[async_trait]
impl Upload for LossyUpload {
    async fn write(&mut self, buf: &[u8]) -> Result<(), DestinationError> {
        self.inner.write(buf).await?;
        if self.lossy.loses(&self.faults, Op::Write) {
            return Err(lost("cannot write", &self.path));
        }
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<u64, DestinationError> {
        let LossyUpload {
            inner,
            faults,
            lossy,
            path,
        } = *self;
        let size = inner.finish().await?;
        if lossy.loses(&faults, Op::Finish) {
            return Err(lost("cannot finish", &path));
        }
        Ok(size)
    }
}

/// A [`LocalDir`] with [`Faults`]; `inner` is the same directory without them.
pub(crate) struct Faulty {
    pub inner: LocalDir,
    faults: Faults,
    creates: AtomicUsize,
    renames: AtomicUsize,
    deletes: AtomicUsize,
    lossy: Arc<Lossy>,
    dir_syncs: AtomicUsize,
    /// Every ranged read: its path and offset.
    ranges: std::sync::Mutex<Vec<(String, u64)>>,
}

impl Faulty {
    pub(crate) fn new(inner: LocalDir, faults: Faults) -> Self {
        Self {
            inner,
            faults,
            creates: AtomicUsize::new(0),
            renames: AtomicUsize::new(0),
            deletes: AtomicUsize::new(0),
            lossy: Arc::default(),
            dir_syncs: AtomicUsize::new(0),
            ranges: std::sync::Mutex::default(),
        }
    }

    /// The ranged reads so far: path and offset of each.
    pub(crate) fn ranges_read(&self) -> Vec<(String, u64)> {
        self.ranges.lock().expect("ranges lock").clone()
    }

    /// Whether the [`Faults::reply_lost`] fault fired.
    pub(crate) fn reply_was_lost(&self) -> bool {
        self.lossy.lost.load(Ordering::SeqCst)
    }

    fn lossy(&self, up: Box<dyn Upload>, path: &str) -> Box<dyn Upload> {
        Box::new(LossyUpload {
            inner: up,
            faults: self.faults,
            lossy: self.lossy.clone(),
            path: path.to_string(),
        })
    }

    fn blind(&self, op: &'static str, path: &str) -> Result<(), DestinationError> {
        if self.lossy.blind(&self.faults) {
            return Err(reset(op, path));
        }
        Ok(())
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
        if self.lossy.loses(&self.faults, Op::Create) {
            return Err(lost("cannot create", path));
        }
        Ok(self.lossy(up, path))
    }
    async fn create_small(&self, path: &str) -> Result<Box<dyn Upload>, DestinationError> {
        let up = self.inner.create_small(path).await?;
        // The silent fault counts small creates among the creates.
        if self.creates.fetch_add(1, Ordering::SeqCst) + 1 == self.faults.create_silent_at {
            drop(up);
            return std::future::pending().await;
        }
        if self.lossy.loses(&self.faults, Op::CreateSmall) {
            return Err(lost("cannot create", path));
        }
        Ok(self.lossy(up, path))
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
        if self.lossy.loses(&self.faults, Op::Rename) {
            return Err(lost("cannot rename into", to));
        }
        Ok(())
    }
    async fn list(&self, dir: &str) -> Result<Vec<DirEntry>, DestinationError> {
        self.blind("cannot list", dir)?;
        self.inner.list(dir).await
    }
    async fn open(
        &self,
        path: &str,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError> {
        self.blind("cannot open", path)?;
        self.inner.open(path).await
    }
    fn ranges_in_flight(&self) -> usize {
        self.faults
            .ranges_in_flight
            .unwrap_or_else(|| self.inner.ranges_in_flight())
    }

    async fn open_range(
        &self,
        path: &str,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError> {
        self.ranges
            .lock()
            .expect("ranges lock")
            .push((path.to_string(), offset));
        self.blind("cannot open", path)?;
        self.inner.open_range(path, offset, len).await
    }
    async fn claim(&self, dir: &str) -> Result<(), DestinationError> {
        self.inner.claim(dir).await?;
        if self.lossy.loses(&self.faults, Op::Claim) {
            return Err(lost("cannot claim", dir));
        }
        Ok(())
    }
    async fn delete(&self, path: &str) -> Result<(), DestinationError> {
        let from = self.faults.deletes_fail_from;
        if from != 0 && self.deletes.fetch_add(1, Ordering::SeqCst) + 1 >= from {
            return Err(reset("cannot delete", path));
        }
        self.inner.delete(path).await?;
        if self.lossy.loses(&self.faults, Op::Delete) {
            return Err(lost("cannot delete", path));
        }
        Ok(())
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
