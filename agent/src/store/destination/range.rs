//! Ranged reads: the reader every destination's
//! [`open_range`](super::Destination::open_range) hands back, which yields
//! exactly the bytes asked for or fails, and [`read_ranges`], a list of
//! ranges read with a few in flight at once.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use super::{Destination, DestinationError};

/// Yields the first `len` bytes of `inner` and then ends; fails with
/// [`std::io::ErrorKind::UnexpectedEof`] when `inner` ends before them
/// (a file shortened after it was opened, a body cut off), so a caller
/// never takes a short read for the whole range.
pub(super) struct Exact<R> {
    inner: R,
    location: String,
    offset: u64,
    len: u64,
    got: u64,
}

impl<R> Exact<R> {
    /// `len` bytes of `inner`, which starts at byte `offset` of `location`
    /// (both for the error).
    pub(super) fn new(inner: R, location: String, offset: u64, len: u64) -> Self {
        Self {
            inner,
            location,
            offset,
            len,
            got: 0,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Exact<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let left = this.len - this.got;
        if left == 0 || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let n = if (buf.remaining() as u64) <= left {
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            buf.filled().len() - before
        } else {
            // Only the range's last bytes fit: a window of the buffer as
            // long as they are (initialized first, so that what the inner
            // reader fills can be taken over without `unsafe`).
            let want = left as usize;
            buf.initialize_unfilled_to(want);
            let mut window = buf.take(want);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut window))?;
            let n = window.filled().len();
            buf.advance(n);
            n
        };
        if n == 0 {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: {} bytes at offset {} were asked for, but the data ended at byte {} \
                     ({} bytes short); the file is shorter than whatever named this range expected, \
                     or the transfer was cut off",
                    this.location,
                    this.len,
                    this.offset,
                    this.offset + this.got,
                    left
                ),
            )));
        }
        this.got += n as u64;
        Poll::Ready(Ok(()))
    }
}

/// One byte range of one file, for [`read_ranges`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByteRange {
    /// The file, relative to the destination's base.
    pub path: String,
    /// The first byte.
    pub offset: u64,
    /// How many bytes.
    pub len: u64,
}

/// Reads every range of `ranges` whole, at most `in_flight` (at least one)
/// at once, and yields their bytes in the order given: a reader of many
/// small pieces keeps a distant store busy instead of waiting out one
/// round trip per piece, and holds at most `in_flight` ranges in memory
/// (plus those read ahead of one still in flight).
///
/// # Errors
/// Each item is the range's bytes or why it could not be read
/// ([`Destination::open_range`]'s errors; a read failure as
/// [`DestinationError::Io`]). Later ranges are still read after a failed
/// one; a caller that stops at the first error drops the stream.
pub fn read_ranges<'a>(
    dest: &'a dyn Destination,
    ranges: impl IntoIterator<Item = ByteRange> + 'a,
    in_flight: usize,
) -> impl Stream<Item = Result<Vec<u8>, DestinationError>> + 'a {
    futures_util::stream::iter(ranges)
        .map(move |r| async move {
            let mut reader = dest.open_range(&r.path, r.offset, r.len).await?;
            let mut bytes = Vec::with_capacity(usize::try_from(r.len).unwrap_or(0).min(16 << 20));
            reader
                .read_to_end(&mut bytes)
                .await
                .map_err(|source| DestinationError::Io {
                    op: "cannot read",
                    location: format!("{}/{}", dest.describe(), r.path),
                    source,
                })?;
            Ok(bytes)
        })
        .buffered(in_flight.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An inner reader handing out `data` at most `step` bytes per read.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = self
                .step
                .min(buf.remaining())
                .min(self.data.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    fn trickle(len: usize, step: usize) -> Trickle {
        Trickle {
            data: (0..len).map(|i| (i % 251) as u8).collect(),
            at: 0,
            step,
        }
    }

    #[tokio::test]
    async fn exact_stops_at_the_range_end_whatever_the_buffer_size() {
        for step in [1, 7, 1000] {
            let mut out = Vec::new();
            Exact::new(trickle(1000, step), "x".into(), 0, 333)
                .read_to_end(&mut out)
                .await
                .unwrap();
            assert_eq!(out, trickle(333, 1).data, "step {step}");
        }
        // A buffer smaller than the range, then one larger than what is left.
        let mut r = Exact::new(trickle(1000, 1000), "x".into(), 0, 10);
        let mut small = [0u8; 4];
        assert_eq!(r.read(&mut small).await.unwrap(), 4);
        let mut big = [0u8; 64];
        assert_eq!(r.read(&mut big).await.unwrap(), 6);
        assert_eq!(r.read(&mut big).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn exact_fails_when_the_data_ends_early_naming_where() {
        let mut out = Vec::new();
        let e = Exact::new(trickle(100, 30), "local:/b/pack".into(), 900, 150)
            .read_to_end(&mut out)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        let text = e.to_string();
        for part in [
            "local:/b/pack",
            "150 bytes at offset 900",
            "ended at byte 1000",
        ] {
            assert!(text.contains(part), "{text}");
        }
        // A zero-length range reads nothing, even from an empty reader.
        let mut out = Vec::new();
        Exact::new(trickle(0, 1), "x".into(), 5, 0)
            .read_to_end(&mut out)
            .await
            .unwrap();
        assert!(out.is_empty());
    }
}
