//! One stream of stored bytes written to several destinations at once.
//!
//! A backup run reads the snapshot from etcd once, compresses and encrypts it
//! once, and hands the stored bytes to a [`Tee`]: an [`Upload`] in front of
//! each destination's own upload. With one destination the tee writes to it
//! directly, as a run always did. With several, each destination's upload is
//! driven by its own task, fed through a bounded channel of
//! [`FANOUT_BUFFER_CHUNKS`] chunks: a slow destination holds the stream up
//! only once its buffer is full, and a destination that fails is dropped
//! from the fan-out (its task ends, its channel closes) while the others go
//! on. Only when every destination has failed does a write fail.
//!
//! Which destinations failed, and why, is recorded in a [`Lost`] the caller
//! shares with the tee and reads after each write, so it can fail those
//! destinations on their own (clean-up, result) and keep the rest.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::store::destination::{DestinationError, Upload};

/// Chunks queued for each destination beyond the one it is writing. A chunk
/// is one write of the run (at most the run's 256 KiB write batch, a little
/// more once encrypted), so a destination that falls behind holds at most
/// about 8 MiB before the stream waits for it. The chunks are shared, not
/// copied, between destinations: the bound on the run's memory is the same
/// 8 MiB however many destinations there are.
pub const FANOUT_BUFFER_CHUNKS: usize = 32;

/// Destinations (by index) that failed during a write, with why; drained by
/// the caller after each write or finish.
#[derive(Clone, Default)]
pub struct Lost(Arc<Mutex<Vec<(usize, DestinationError)>>>);

impl Lost {
    fn push(&self, index: usize, e: DestinationError) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((index, e));
    }

    /// Takes what was recorded since the last call.
    pub fn take(&self) -> Vec<(usize, DestinationError)> {
        std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

impl std::fmt::Debug for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lost")
    }
}

/// What the tee's write or finish answers once no destination is left; the
/// destinations' own errors are in the [`Lost`].
fn every_destination_failed() -> DestinationError {
    DestinationError::Io {
        op: "cannot write",
        location: "any destination".into(),
        source: std::io::Error::other("every destination failed"),
    }
}

enum Msg {
    Data(Arc<[u8]>),
    Finish,
}

/// Aborts a destination's task when the tee is dropped (a failed or
/// cancelled run), so nothing more is written after its clean-up starts.
struct AbortOnDrop(tokio::task::JoinHandle<Result<u64, DestinationError>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl AbortOnDrop {
    /// The task's size, or its error (tagged with its destination); still
    /// aborted if this wait is itself dropped.
    async fn join(mut self, index: usize) -> Result<u64, (usize, DestinationError)> {
        match (&mut self.0).await {
            Ok(Ok(size)) => Ok(size),
            Ok(Err(e)) => Err((index, e)),
            Err(join) => Err((
                index,
                DestinationError::Io {
                    op: "cannot write",
                    location: "upload".into(),
                    source: std::io::Error::other(format!("the upload task stopped: {join}")),
                },
            )),
        }
    }
}

enum Lane {
    /// The only destination: written by the caller's task, no buffer.
    Inline { index: usize, up: Box<dyn Upload> },
    /// One of several: written by its own task.
    Task {
        index: usize,
        tx: mpsc::Sender<Msg>,
        task: AbortOnDrop,
    },
}

/// An [`Upload`] that writes every byte to several uploads.
pub struct Tee {
    lanes: Vec<Lane>,
    lost: Lost,
    written: u64,
}

/// One destination's upload, driven until [`Msg::Finish`]; a closed
/// channel without it means the run was abandoned and the file is not
/// finished.
async fn feed(
    mut up: Box<dyn Upload>,
    mut rx: mpsc::Receiver<Msg>,
) -> Result<u64, DestinationError> {
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Data(chunk) => up.write(&chunk).await?,
            Msg::Finish => return up.finish().await,
        }
    }
    Err(DestinationError::Io {
        op: "abandoned",
        location: "upload".into(),
        source: std::io::Error::other("the run stopped before the file was finished"),
    })
}

impl Tee {
    /// A tee over `uploads`, each tagged with its destination's index;
    /// failures are recorded in `lost`.
    pub fn new(uploads: Vec<(usize, Box<dyn Upload>)>, lost: Lost) -> Self {
        let lanes = if uploads.len() == 1 {
            uploads
                .into_iter()
                .map(|(index, up)| Lane::Inline { index, up })
                .collect()
        } else {
            uploads
                .into_iter()
                .map(|(index, up)| {
                    let (tx, rx) = mpsc::channel(FANOUT_BUFFER_CHUNKS);
                    Lane::Task {
                        index,
                        tx,
                        task: AbortOnDrop(tokio::spawn(feed(up, rx))),
                    }
                })
                .collect()
        };
        Self {
            lanes,
            lost,
            written: 0,
        }
    }

    fn result(&self) -> Result<(), DestinationError> {
        if self.lanes.is_empty() {
            Err(every_destination_failed())
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Upload for Tee {
    async fn write(&mut self, buf: &[u8]) -> Result<(), DestinationError> {
        self.result()?;
        if let [Lane::Inline { index, up }] = self.lanes.as_mut_slice() {
            if let Err(e) = up.write(buf).await {
                self.lost.push(*index, e);
                self.lanes.clear();
            }
        } else {
            let chunk: Arc<[u8]> = Arc::from(buf);
            // Lanes stay in place while sends are awaited, so a write that is
            // itself dropped (a cancelled run) loses no lane.
            let mut failed = Vec::new();
            for (at, lane) in self.lanes.iter_mut().enumerate() {
                let Lane::Task { tx, .. } = lane else {
                    continue;
                };
                // Waits while this destination's buffer is full; fails at
                // once when its task has ended (on an error).
                if tx.send(Msg::Data(Arc::clone(&chunk))).await.is_err() {
                    failed.push(at);
                }
            }
            for at in failed.into_iter().rev() {
                let Lane::Task { index, task, .. } = self.lanes.remove(at) else {
                    continue;
                };
                let (i, e) = match task.join(index).await {
                    Err(failed) => failed,
                    Ok(_) => (
                        index,
                        DestinationError::Io {
                            op: "cannot write",
                            location: "upload".into(),
                            source: std::io::Error::other("the upload ended before the file did"),
                        },
                    ),
                };
                tracing::warn!(destination_index = i, error = %e, "a destination failed; the others go on");
                self.lost.push(i, e);
            }
        }
        self.written += buf.len() as u64;
        self.result()
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, DestinationError> {
        self.result()?;
        let mut finished = 0;
        for lane in std::mem::take(&mut self.lanes) {
            match lane {
                Lane::Inline { index, up } => match up.finish().await {
                    Ok(_) => finished += 1,
                    Err(e) => self.lost.push(index, e),
                },
                Lane::Task { index, tx, task } => {
                    // A failed send means the task ended on an error,
                    // which its result carries.
                    let _ = tx.send(Msg::Finish).await;
                    drop(tx);
                    match task.join(index).await {
                        Ok(_) => finished += 1,
                        Err((i, e)) => self.lost.push(i, e),
                    }
                }
            }
        }
        if finished == 0 {
            return Err(every_destination_failed());
        }
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::destination::{Destination, LocalDir};
    use std::time::Duration;
    use tokio::sync::Semaphore;

    /// An upload that fails on its `fail_at`-th write.
    struct Failing {
        writes: usize,
        fail_at: usize,
    }

    #[async_trait]
    impl Upload for Failing {
        async fn write(&mut self, _buf: &[u8]) -> Result<(), DestinationError> {
            self.writes += 1;
            if self.writes >= self.fail_at {
                return Err(DestinationError::Io {
                    op: "cannot write",
                    location: "failing".into(),
                    source: std::io::Error::from(std::io::ErrorKind::ConnectionReset),
                });
            }
            Ok(())
        }

        async fn finish(self: Box<Self>) -> Result<u64, DestinationError> {
            Ok(0)
        }
    }

    #[tokio::test]
    async fn a_failed_destination_is_dropped_and_the_other_gets_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalDir::open(dir.path()).await.unwrap();
        let good = local.create("f").await.unwrap();
        let bad: Box<dyn Upload> = Box::new(Failing {
            writes: 0,
            fail_at: 3,
        });
        let lost = Lost::default();
        let mut tee: Box<dyn Upload> = Box::new(Tee::new(vec![(0, bad), (1, good)], lost.clone()));
        let mut expected = Vec::new();
        for i in 0..(FANOUT_BUFFER_CHUNKS * 4) {
            let chunk = vec![i as u8; 1000 + i];
            tee.write(&chunk).await.unwrap();
            expected.extend_from_slice(&chunk);
        }
        let size = tee.finish().await.unwrap();
        assert_eq!(size, expected.len() as u64);
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), expected);
        let lost = lost.take();
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!(lost[0].0, 0);
        assert!(lost[0].1.to_string().contains("failing"), "{}", lost[0].1);
    }

    /// An upload whose writes each wait for a permit, keeping what it got.
    struct Gated {
        gate: Arc<tokio::sync::Semaphore>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    #[async_trait]
    impl Upload for Gated {
        async fn write(&mut self, buf: &[u8]) -> Result<(), DestinationError> {
            self.gate.acquire().await.expect("gate open").forget();
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(())
        }

        async fn finish(self: Box<Self>) -> Result<u64, DestinationError> {
            Ok(self.got.lock().unwrap().len() as u64)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_destination_holds_the_stream_only_once_its_buffer_is_full() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let slow_got = Arc::new(Mutex::new(Vec::new()));
        let fast_got = Arc::new(Mutex::new(Vec::new()));
        let slow: Box<dyn Upload> = Box::new(Gated {
            gate: Arc::clone(&gate),
            got: Arc::clone(&slow_got),
        });
        let open = Arc::new(tokio::sync::Semaphore::new(Semaphore::MAX_PERMITS));
        let fast: Box<dyn Upload> = Box::new(Gated {
            gate: open,
            got: Arc::clone(&fast_got),
        });
        let mut tee: Box<dyn Upload> =
            Box::new(Tee::new(vec![(0, slow), (1, fast)], Lost::default()));
        // The slow destination takes the first chunk and stalls on it; its
        // buffer then holds FANOUT_BUFFER_CHUNKS more, and the next write
        // waits. The clock is paused: the sleep below ends only once every
        // task is idle, so the count is what got through before the writer
        // blocked, not a matter of speed.
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let chunks = FANOUT_BUFFER_CHUNKS * 3;
        let writer = tokio::spawn({
            let accepted = Arc::clone(&accepted);
            async move {
                let mut expected = Vec::new();
                for i in 0..chunks {
                    let chunk = vec![i as u8; 100];
                    tee.write(&chunk).await.unwrap();
                    expected.extend_from_slice(&chunk);
                    accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let size = tee.finish().await.unwrap();
                (size, expected)
            }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1 + FANOUT_BUFFER_CHUNKS
        );
        // Released, the stream goes on, and each destination gets it all.
        gate.add_permits(Semaphore::MAX_PERMITS / 2);
        let (size, expected) = writer.await.unwrap();
        assert_eq!(size, expected.len() as u64);
        assert_eq!(*fast_got.lock().unwrap(), expected);
        assert_eq!(*slow_got.lock().unwrap(), expected);
    }

    #[tokio::test]
    async fn when_every_destination_fails_the_write_fails() {
        let lost = Lost::default();
        let ups: Vec<(usize, Box<dyn Upload>)> = (0..2)
            .map(|i| {
                let up: Box<dyn Upload> = Box::new(Failing {
                    writes: 0,
                    fail_at: 1 + i,
                });
                (i, up)
            })
            .collect();
        let mut tee = Tee::new(ups, lost.clone());
        let mut failed = false;
        for _ in 0..(FANOUT_BUFFER_CHUNKS * 4) {
            if tee.write(b"data").await.is_err() {
                failed = true;
                break;
            }
        }
        assert!(
            failed,
            "the tee kept accepting writes with no destination left"
        );
        let mut lost: Vec<usize> = lost.take().into_iter().map(|(i, _)| i).collect();
        lost.sort_unstable();
        assert_eq!(lost, vec![0, 1]);
    }
}
