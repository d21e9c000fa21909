//! age encryption as an upload wrapper: the bytes written are encrypted to
//! the configured recipients on their way to the destination, and the
//! ciphertext's SHA-256 and size are what the manifest records. The keys
//! themselves (recipients, identities) are [`crate::encryption`]'s.

use std::fmt;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::encryption::EncryptionConfig;
use crate::store::destination::{DestinationError, Upload};

/// A `Write` whose bytes are taken out after each write.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    /// Makes `v`, emptied, the buffer written to (its capacity reused).
    fn put(&self, mut v: Vec<u8>) {
        v.clear();
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = v;
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

impl std::io::Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The CPU side of a sealed file: the age stream and the ciphertext hash.
/// It moves to a blocking thread for each batch, so encrypting one batch
/// overlaps receiving the next.
struct Sealer {
    writer: age::stream::StreamWriter<SharedBuf>,
    buf: SharedBuf,
    sha: Sha256,
    size: u64,
}

impl Sealer {
    /// Encrypts `plain` into `out` (emptied first, its capacity reused);
    /// returns `out` with the ciphertext produced (whole 64 KiB chunks), and
    /// `plain` back for the next batch.
    fn seal(mut self, plain: Vec<u8>, out: Vec<u8>) -> std::io::Result<Batch> {
        use std::io::Write;
        self.buf.put(out);
        self.writer.write_all(&plain)?;
        let out = self.buf.take();
        self.sha.update(&out);
        self.size += out.len() as u64;
        Ok((self, out, plain))
    }

    /// Ends the stream: the last chunk, and the hash and size of all ciphertext.
    fn end(self) -> std::io::Result<(Vec<u8>, String, u64)> {
        let Self {
            writer,
            buf,
            mut sha,
            size,
        } = self;
        writer.finish()?;
        let out = buf.take();
        sha.update(&out);
        let size = size + out.len() as u64;
        Ok((out, hex::encode(sha.finalize()), size))
    }
}

/// A sealed batch: the sealer, its ciphertext, and the plaintext buffer
/// back for the next batch.
type Batch = (Sealer, Vec<u8>, Vec<u8>);

type Sealing = tokio::task::JoinHandle<std::io::Result<Batch>>;

/// A file being written encrypted: plaintext in, age ciphertext out to the
/// destination, hashed on the way. One batch is encrypted on a blocking
/// thread while the caller prepares the next; memory is about two batches.
pub struct SealingUpload {
    inner: Box<dyn Upload>,
    /// The sealer when no batch is in flight.
    idle: Option<Sealer>,
    /// The batch being encrypted.
    pending: Option<Sealing>,
    /// Plaintext bytes written.
    plaintext_size: u64,
    location: String,
    /// Buffers kept from batch to batch (the next batch's plaintext copy
    /// and ciphertext), so every batch reuses the same memory.
    spare_in: Vec<u8>,
    spare_out: Vec<u8>,
}

/// What a finished encrypted file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Ciphertext bytes stored.
    pub size: u64,
    /// SHA-256 of the stored ciphertext, lower-case hex.
    pub sha256: String,
    /// Plaintext bytes encrypted.
    pub plaintext_size: u64,
}

fn encrypt_error(location: &str, e: impl fmt::Display) -> DestinationError {
    DestinationError::Io {
        op: "cannot encrypt",
        location: location.to_string(),
        source: std::io::Error::other(e.to_string()),
    }
}

impl SealingUpload {
    /// Starts an age file (a fresh file key, wrapped to every recipient) on `inner`.
    ///
    /// # Errors
    /// When a recipient cannot wrap the key, or the header cannot be written.
    pub async fn new(
        inner: Box<dyn Upload>,
        config: &EncryptionConfig,
        location: &str,
    ) -> Result<Self, DestinationError> {
        let buf = SharedBuf::default();
        let writer = config
            .encryptor()
            .map_err(|e| encrypt_error(location, e))?
            .wrap_output(buf.clone())
            .map_err(|e| encrypt_error(location, e))?;
        let mut up = Self {
            inner,
            idle: None,
            pending: None,
            plaintext_size: 0,
            location: location.to_string(),
            spare_in: Vec::new(),
            spare_out: Vec::new(),
        };
        // The header, written by wrap_output.
        let header = buf.take();
        let mut sha = Sha256::new();
        sha.update(&header);
        up.idle = Some(Sealer {
            writer,
            buf,
            sha,
            size: header.len() as u64,
        });
        up.inner.write(&header).await?;
        Ok(up)
    }

    /// Waits for the batch in flight and sends its ciphertext.
    async fn settle(&mut self) -> Result<(), DestinationError> {
        if let Some(job) = self.pending.take() {
            let (sealer, out, plain) = job
                .await
                .map_err(|e| encrypt_error(&self.location, e))?
                .map_err(|e| encrypt_error(&self.location, e))?;
            self.idle = Some(sealer);
            self.spare_in = plain;
            if !out.is_empty() {
                self.inner.write(&out).await?;
            }
            self.spare_out = out;
        }
        Ok(())
    }

    /// Encrypts and sends `plain` (the ciphertext of the previous write is
    /// sent first; this one's is being made when the call returns).
    ///
    /// # Errors
    /// Destination write failures.
    pub async fn write(&mut self, plain: &[u8]) -> Result<(), DestinationError> {
        self.settle().await?;
        let sealer = self
            .idle
            .take()
            .ok_or_else(|| encrypt_error(&self.location, "the encryptor failed earlier"))?;
        self.plaintext_size += plain.len() as u64;
        let mut input = std::mem::take(&mut self.spare_in);
        input.clear();
        input.extend_from_slice(plain);
        let out = std::mem::take(&mut self.spare_out);
        self.pending = Some(tokio::task::spawn_blocking(move || sealer.seal(input, out)));
        Ok(())
    }

    /// Ends the age stream (its last, authenticated chunk), then finishes the
    /// file at the destination.
    ///
    /// # Errors
    /// As [`Upload::finish`], and a stored size that differs from the ciphertext sent.
    pub async fn finish(mut self) -> Result<Sealed, DestinationError> {
        self.settle().await?;
        let sealer = self
            .idle
            .take()
            .ok_or_else(|| encrypt_error(&self.location, "the encryptor failed earlier"))?;
        let (last, sha256, size) = sealer.end().map_err(|e| encrypt_error(&self.location, e))?;
        if !last.is_empty() {
            self.inner.write(&last).await?;
        }
        let stored = self.inner.finish().await?;
        if stored != size {
            return Err(DestinationError::SizeMismatch {
                location: self.location,
                sent: size,
                stored,
            });
        }
        Ok(Sealed {
            size,
            sha256,
            plaintext_size: self.plaintext_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encryption::{parse_recipient, AGE_MAGIC};

    #[tokio::test]
    async fn sealed_uploads_decrypt_to_the_bytes_written_and_hash_what_is_stored() {
        use crate::store::destination::{Destination, LocalDir};
        let dir = tempfile::tempdir().unwrap();
        let dest = LocalDir::open(dir.path()).await.unwrap();
        let id = age::x25519::Identity::generate();
        let config = EncryptionConfig {
            recipients: vec![parse_recipient(&id.to_public().to_string()).unwrap()],
            identity_file: None,
            page_id_key: None,
        };
        // Uneven writes across age's 64 KiB chunk boundaries.
        let plain: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let up = dest.create("f.age").await.unwrap();
        let mut sealed = SealingUpload::new(up, &config, "test").await.unwrap();
        for part in plain.chunks(100_003) {
            sealed.write(part).await.unwrap();
        }
        let done = sealed.finish().await.unwrap();
        let stored = std::fs::read(dir.path().join("f.age")).unwrap();
        assert_eq!(done.size, stored.len() as u64);
        assert_eq!(done.plaintext_size, plain.len() as u64);
        assert_eq!(done.sha256, hex::encode(Sha256::digest(&stored)));
        assert!(stored.starts_with(AGE_MAGIC));
        let decryptor = age::Decryptor::new(&stored[..]).unwrap();
        let mut reader = decryptor
            .decrypt(std::iter::once(&id as &dyn age::Identity))
            .unwrap();
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut back).unwrap();
        assert!(back == plain);
    }
}
