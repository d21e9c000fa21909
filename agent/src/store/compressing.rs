//! zstd compression of the snapshot on its way to the destination (and to
//! age, when the set is also encrypted): plaintext in, one standard zstd
//! frame out, which `zstd -d` turns back into the identical snapshot.
//!
//! Each batch is compressed on a blocking thread while the caller receives
//! the next one from etcd, so compression overlaps the snapshot stream
//! instead of adding to it. zstd runs single-threaded: its multithreaded
//! mode needs 10 MiB (1 worker, level 1) to 60 MiB (2 workers, level 3) of
//! job buffers, over the agent's memory budget, and level 1 on one core is
//! already well ahead of etcd's stream. Memory: the compression context
//! (1.3 MiB at level 1, 3.5 MiB at 3, 7.8 MiB at 7, the highest allowed),
//! zstd's 128 KiB output buffer, the 256 KiB batch in flight and two output
//! buffers (one filling, one being sent), the same buffers for every batch.

use std::io::Write;

use sha2::{Digest, Sha256};

use crate::config::CompressionConfig;

/// The largest window (log2 bytes) the decompressor accepts: 2 MiB, the
/// largest that zstd's levels 1 to 7 ([`crate::config::COMPRESSION_LEVELS`])
/// write (0.5 MiB at level 1). The decompressor holds a buffer of the
/// window's size, so a frame altered to ask for more is refused instead.
pub const WINDOW_LOG: u32 = 21;

/// Why a batch could not be compressed.
#[derive(Debug, thiserror::Error)]
#[error("cannot compress the snapshot with zstd: {0}")]
pub struct CompressError(#[from] std::io::Error);

/// The CPU side: the zstd stream and the hash of its output. It moves to a
/// blocking thread for each batch.
struct Compressor {
    encoder: zstd::stream::write::Encoder<'static, Vec<u8>>,
    sha: Sha256,
    size: u64,
}

impl Compressor {
    fn new(config: &CompressionConfig) -> std::io::Result<Self> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), config.level)?;
        // The snapshot's own SHA-256 (and etcd's digest inside it) is checked
        // after decompressing; zstd's checksum also lets `zstd -t` and
        // `zstd -d` alone catch a damaged file.
        encoder.include_checksum(true)?;
        Ok(Self {
            encoder,
            sha: Sha256::new(),
            size: 0,
        })
    }

    /// Compresses `plain` into `out` (emptied first, its capacity reused);
    /// returns `out` with what zstd produced so far, and `plain` back.
    fn compress(mut self, plain: Vec<u8>, mut out: Vec<u8>) -> std::io::Result<Batch> {
        out.clear();
        // zstd writes into `out`; the encoder's own (empty) vector waits.
        std::mem::swap(self.encoder.get_mut(), &mut out);
        self.encoder.write_all(&plain)?;
        let produced = std::mem::replace(self.encoder.get_mut(), out);
        self.sha.update(&produced);
        self.size += produced.len() as u64;
        Ok((self, produced, plain))
    }

    /// Ends the frame: the rest of the output, and the hash and size of it all.
    fn end(self) -> std::io::Result<(Vec<u8>, Compressed)> {
        let Self {
            encoder,
            mut sha,
            size,
        } = self;
        let out = encoder.finish()?;
        sha.update(&out);
        let size = size + out.len() as u64;
        Ok((
            out,
            Compressed {
                size,
                sha256: hex::encode(sha.finalize()),
                plaintext_size: 0,
            },
        ))
    }
}

/// A compressed batch: the compressor, its output, and the plaintext
/// buffer back for the next batch.
type Batch = (Compressor, Vec<u8>, Vec<u8>);

type Job = tokio::task::JoinHandle<std::io::Result<Batch>>;

/// A stream being compressed, one batch behind: [`write`](Self::write)
/// starts compressing a batch and hands back the output of the previous one.
pub struct Compressing {
    /// The compressor when no batch is in flight.
    idle: Option<Compressor>,
    /// The batch being compressed.
    pending: Option<Job>,
    /// Plaintext bytes taken.
    plaintext_size: u64,
    /// Buffers kept from batch to batch, so the batches reuse the same
    /// memory instead of allocating (and fragmenting) afresh: the next
    /// batch's copy of the plaintext, the next batch's output, and the
    /// output handed back by the last [`Self::write`].
    spare_in: Vec<u8>,
    spare_out: Vec<u8>,
    last_out: Vec<u8>,
}

/// What a finished compressed stream is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compressed {
    /// Compressed bytes produced.
    pub size: u64,
    /// SHA-256 of the compressed bytes, lower-case hex.
    pub sha256: String,
    /// Plaintext bytes compressed.
    pub plaintext_size: u64,
}

fn failed_earlier() -> CompressError {
    CompressError(std::io::Error::other("the compressor failed earlier"))
}

impl Compressing {
    /// A new zstd frame at the configured level.
    ///
    /// # Errors
    /// When zstd refuses the parameters (it does not for [`crate::config::COMPRESSION_LEVELS`]).
    pub fn new(config: &CompressionConfig) -> Result<Self, CompressError> {
        Ok(Self {
            idle: Some(Compressor::new(config)?),
            pending: None,
            plaintext_size: 0,
            spare_in: Vec::new(),
            spare_out: Vec::new(),
            last_out: Vec::new(),
        })
    }

    /// Waits for the batch in flight; its output becomes `last_out` (the
    /// previous one, sent by now, is kept for reuse).
    async fn settle(&mut self) -> Result<(), CompressError> {
        let Some(job) = self.pending.take() else {
            self.last_out.clear();
            return Ok(());
        };
        let (compressor, out, plain) = job.await.map_err(std::io::Error::other)??;
        self.idle = Some(compressor);
        self.spare_in = plain;
        self.spare_out = std::mem::replace(&mut self.last_out, out);
        Ok(())
    }

    /// Starts compressing `plain` on a blocking thread and returns the
    /// output of the previous batch (possibly empty), to be sent on before
    /// the next call.
    ///
    /// # Errors
    /// zstd failures.
    pub async fn write(&mut self, plain: &[u8]) -> Result<&[u8], CompressError> {
        self.settle().await?;
        let compressor = self.idle.take().ok_or_else(failed_earlier)?;
        self.plaintext_size += plain.len() as u64;
        let mut input = std::mem::take(&mut self.spare_in);
        input.clear();
        input.extend_from_slice(plain);
        let out = std::mem::take(&mut self.spare_out);
        self.pending = Some(tokio::task::spawn_blocking(move || {
            compressor.compress(input, out)
        }));
        Ok(&self.last_out)
    }

    /// Ends the frame: returns the last output (the previous batch's and the
    /// frame's end) and the totals.
    ///
    /// # Errors
    /// zstd failures.
    pub async fn finish(mut self) -> Result<(Vec<u8>, Compressed), CompressError> {
        self.settle().await?;
        let mut out = std::mem::take(&mut self.last_out);
        let compressor = self.idle.take().ok_or_else(failed_earlier)?;
        let (last, mut done) = tokio::task::spawn_blocking(move || compressor.end())
            .await
            .map_err(std::io::Error::other)??;
        out.extend_from_slice(&last);
        done.plaintext_size = self.plaintext_size;
        Ok((out, done))
    }
}

/// Decompresses a zstd stream fed in pieces, handing each piece of plaintext
/// on: for `verify` and `fetch`, which read the stored file in chunks.
/// Frames with a window above [`WINDOW_LOG`]'s are refused, so a file
/// altered to ask for a huge window cannot make the agent allocate it.
pub struct Decompressor {
    decoder: zstd::stream::raw::Decoder<'static>,
    out: Vec<u8>,
    /// Whether the last call ended a frame and nothing followed it.
    at_frame_end: bool,
}

impl Decompressor {
    /// A decoder for one or more frames.
    ///
    /// # Errors
    /// zstd failures to set up.
    pub fn new() -> std::io::Result<Self> {
        use zstd::zstd_safe::DParameter;
        let mut decoder = zstd::stream::raw::Decoder::new()?;
        decoder.set_parameter(DParameter::WindowLogMax(WINDOW_LOG))?;
        Ok(Self {
            decoder,
            out: vec![0; zstd::zstd_safe::DCtx::out_size()],
            at_frame_end: true,
        })
    }

    /// Decompresses `input`, handing every piece of plaintext to `each`.
    ///
    /// # Errors
    /// A damaged stream (as [`std::io::ErrorKind::InvalidData`] from zstd),
    /// or `each`'s error.
    pub fn feed<E: From<std::io::Error>>(
        &mut self,
        input: &[u8],
        mut each: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let mut inb = InBuffer::around(input);
        loop {
            let before = inb.pos();
            let mut outb = OutBuffer::around(&mut self.out[..]);
            // zstd starts the next frame by itself after one ends.
            let hint = self.decoder.run(&mut inb, &mut outb)?;
            let n = outb.pos();
            if n > 0 {
                each(&self.out[..n])?;
            }
            if hint == 0 {
                self.at_frame_end = true;
            } else if n > 0 || inb.pos() > before {
                self.at_frame_end = false;
            }
            // Done once the input is consumed and the output buffer was not
            // filled (a full one may mean more output is waiting).
            if inb.pos() == input.len() && n < self.out.len() {
                return Ok(());
            }
        }
    }

    /// Checks that the stream ended at the end of a frame.
    ///
    /// # Errors
    /// A truncated stream.
    pub fn finish(&self) -> std::io::Result<()> {
        if self.at_frame_end {
            Ok(())
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the zstd stream ends in the middle of a frame (the file is truncated)",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(level: i32) -> CompressionConfig {
        CompressionConfig {
            algorithm: etcd_backup_proto::Compression::Zstd,
            level,
        }
    }

    /// JSON-ish text with some randomness, 3 MB: more than one window.
    fn sample() -> Vec<u8> {
        let mut out = Vec::new();
        let mut x: u32 = 7;
        while out.len() < 3_000_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            out.extend_from_slice(
                format!("{{\"name\":\"pod-{x:08x}\",\"ns\":\"ns-{}\"}}", x % 13).as_bytes(),
            );
        }
        out
    }

    async fn compress(plain: &[u8], level: i32) -> (Vec<u8>, Compressed) {
        let mut c = Compressing::new(&config(level)).unwrap();
        let mut stored = Vec::new();
        // Uneven writes, as etcd's messages gathered into batches are.
        for part in plain.chunks(700_001) {
            stored.extend(c.write(part).await.unwrap());
        }
        let (last, done) = c.finish().await.unwrap();
        stored.extend(last);
        (stored, done)
    }

    fn decompress(stored: &[u8], piece: usize) -> std::io::Result<Vec<u8>> {
        let mut d = Decompressor::new()?;
        let mut back = Vec::new();
        for part in stored.chunks(piece) {
            d.feed(part, |p| -> std::io::Result<()> {
                back.extend_from_slice(p);
                Ok(())
            })?;
        }
        d.finish()?;
        Ok(back)
    }

    #[tokio::test]
    async fn every_allowed_level_round_trips_within_the_decompressors_window() {
        let plain = sample();
        for level in [
            *crate::config::COMPRESSION_LEVELS.start(),
            3,
            *crate::config::COMPRESSION_LEVELS.end(),
        ] {
            let (stored, done) = compress(&plain, level).await;
            assert_eq!(done.size, stored.len() as u64, "level {level}");
            assert_eq!(done.plaintext_size, plain.len() as u64);
            assert_eq!(done.sha256, hex::encode(Sha256::digest(&stored)));
            assert!(
                stored.len() < plain.len() / 3,
                "level {level}: {}",
                stored.len()
            );
            // The one-shot decoder (what `zstd -d` does) and the chunked one agree.
            assert!(zstd::stream::decode_all(&stored[..]).unwrap() == plain);
            for piece in [1 << 20, 4096, 7] {
                assert!(
                    decompress(&stored, piece).unwrap() == plain,
                    "level {level}, piece {piece}"
                );
            }
        }
    }

    #[tokio::test]
    async fn damaged_truncated_and_oversized_streams_are_refused() {
        let plain = sample();
        let (stored, _) = compress(&plain, 1).await;
        let mut flipped = stored.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        match decompress(&flipped, 1 << 20) {
            Err(_) => {}
            Ok(back) => panic!("a flipped byte decompressed to {} bytes", back.len()),
        }
        let err = decompress(&stored[..stored.len() - 100], 1 << 20).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        // Trailing garbage after the frame is not a frame.
        let mut trailing = stored.clone();
        trailing.extend_from_slice(b"not zstd");
        assert!(decompress(&trailing, 1 << 20).is_err());
        // A frame that needs a window above WINDOW_LOG is refused, not allocated.
        let wide = {
            use zstd::zstd_safe::CParameter;
            let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
            e.set_parameter(CParameter::WindowLog(WINDOW_LOG + 2))
                .unwrap();
            std::io::Write::write_all(&mut e, &plain).unwrap();
            e.finish().unwrap()
        };
        assert!(decompress(&wide, 1 << 20).is_err());
    }
}
