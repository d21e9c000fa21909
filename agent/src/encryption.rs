//! Client-side encryption of backup files with age.
//!
//! With `encryption:` configured, every data file is encrypted to the
//! configured recipients as it streams out, so neither the snapshot nor the
//! tarball ever reaches the destination (or a disk) in plaintext. Each file is
//! a standard age file (`age -d -i KEY` decrypts it); the manifest records the
//! SHA-256 of the stored ciphertext, which anyone can check without a key, and
//! of the plaintext, which a holder of an identity checks after decrypting.
//!
//! Recipients are public keys (age X25519 `age1…`, `ssh-ed25519`, `ssh-rsa`)
//! and may sit in the config. Identities (the private halves) are only needed
//! to read sets back; they come from files and are never logged.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use age::secrecy::SecretString;
use sha2::{Digest, Sha256};

use crate::destination::{DestinationError, Upload};

/// Appended to a data file's name when it is stored encrypted.
pub const AGE_SUFFIX: &str = etcd_backup_proto::AGE_SUFFIX;

/// The `scheme` recorded in the manifest.
pub const SCHEME: &str = "age";

/// The first bytes of every binary age file.
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";

/// Largest identity file read.
const MAX_IDENTITY_FILE: u64 = 1 << 20;

/// One public key files are encrypted to.
#[derive(Clone)]
pub struct Recipient {
    /// The key in its canonical text form (no comment), as the manifest records it.
    pub text: String,
    key: Arc<dyn age::Recipient + Send + Sync>,
}

impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq for Recipient {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

/// What the first characters of a recipient say it is, for messages that
/// never repeat a secret.
fn looks_secret(text: &str) -> Option<&'static str> {
    if text.starts_with("AGE-SECRET-KEY-") {
        Some("this is an age secret key (an identity), not a public key: give its public key (`age-keygen -y KEYFILE` prints it) and keep the secret key off the nodes")
    } else if text.starts_with("-----BEGIN") {
        Some("this is a private key, not a public key: give the public key (the .pub file, or `ssh-keygen -y -f KEYFILE`)")
    } else {
        None
    }
}

/// The first characters of a value, for error messages.
fn preview(text: &str) -> String {
    let cut: String = text.chars().take(24).collect();
    if cut.len() < text.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

/// Parses one recipient: an age X25519 public key (`age1…`) or an SSH public
/// key (`ssh-ed25519 …`, `ssh-rsa …`, a trailing comment allowed).
///
/// # Errors
/// A message saying what the text is not and what to give instead; it never
/// quotes more than the start of the text, and nothing of a secret key.
pub fn parse_recipient(text: &str) -> Result<Recipient, String> {
    let text = text.trim();
    if let Some(why) = looks_secret(text) {
        return Err(why.to_string());
    }
    if text.starts_with("age1") {
        return match text.parse::<age::x25519::Recipient>() {
            Ok(r) => Ok(Recipient {
                text: r.to_string(),
                key: Arc::new(r),
            }),
            Err(e) => Err(format!(
                "{:?} is not a valid age public key: {e}",
                preview(text)
            )),
        };
    }
    if text.starts_with("ssh-") || text.starts_with("ecdsa-") || text.starts_with("sk-") {
        use age::ssh::ParseRecipientKeyError as E;
        return match text.parse::<age::ssh::Recipient>() {
            Ok(r) => Ok(Recipient {
                text: r.to_string(),
                key: Arc::new(r),
            }),
            Err(E::Unsupported(kind)) => Err(format!(
                "SSH key type {kind} cannot be an age recipient; use an ssh-ed25519 or ssh-rsa key, or an age key"
            )),
            Err(E::RsaModulusTooSmall) => {
                Err("this ssh-rsa key is shorter than 2048 bits; use a larger key".to_string())
            }
            Err(E::RsaModulusTooLarge) => {
                Err("this ssh-rsa key is larger than age supports (16384 bits)".to_string())
            }
            Err(_) => Err(format!(
                "{:?} is not a valid SSH public key; give the whole line of the .pub file",
                preview(text)
            )),
        };
    }
    Err(format!(
        "{:?} is not a recipient: give an age public key (age1…) or an SSH public key (ssh-ed25519 … or ssh-rsa …)",
        preview(text)
    ))
}

/// Parses a recipients file: one recipient per line; blank lines and lines
/// starting with `#` are skipped. Errors name the line.
///
/// # Errors
/// The first bad line, as `line N: why`.
pub fn parse_recipients_file(text: &str) -> Result<Vec<Recipient>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_recipient(line).map_err(|e| format!("line {}: {e}", i + 1))?);
    }
    Ok(out)
}

/// The validated `encryption:` section.
#[derive(Debug, Clone, PartialEq)]
pub struct EncryptionConfig {
    /// Everyone a file is encrypted to: `recipients`, then `recipients_file`, without duplicates.
    pub recipients: Vec<Recipient>,
    /// `encryption.identity_file`: the identity scheduled drills (and, by
    /// default, verify/fetch/restore/drill) decrypt with.
    pub identity_file: Option<PathBuf>,
}

impl EncryptionConfig {
    /// The recipients' canonical texts, as the manifest records them.
    pub fn recipient_texts(&self) -> Vec<String> {
        self.recipients.iter().map(|r| r.text.clone()).collect()
    }

    fn encryptor(&self) -> Result<age::Encryptor, age::EncryptError> {
        age::Encryptor::with_recipients(
            self.recipients
                .iter()
                .map(|r| r.key.as_ref() as &dyn age::Recipient),
        )
    }
}

/// A `Write` whose bytes are taken out after each write.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
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
    /// Encrypts `plain`; returns the ciphertext produced (whole 64 KiB chunks).
    fn seal(mut self, plain: &[u8]) -> std::io::Result<(Self, Vec<u8>)> {
        use std::io::Write;
        self.writer.write_all(plain)?;
        let out = self.buf.take();
        self.sha.update(&out);
        self.size += out.len() as u64;
        Ok((self, out))
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

type Sealing = tokio::task::JoinHandle<std::io::Result<(Sealer, Vec<u8>)>>;

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
            let (sealer, out) = job
                .await
                .map_err(|e| encrypt_error(&self.location, e))?
                .map_err(|e| encrypt_error(&self.location, e))?;
            self.idle = Some(sealer);
            if !out.is_empty() {
                self.inner.write(&out).await?;
            }
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
        let plain = plain.to_vec();
        self.pending = Some(tokio::task::spawn_blocking(move || sealer.seal(&plain)));
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

/// Why identities could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file could not be read.
    #[error("cannot read identity file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file holds no usable identity.
    #[error("identity file {path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to give instead.
        why: String,
    },
}

/// Private keys to decrypt sets with: age identities or one SSH private key.
pub struct Identities {
    list: Vec<Box<dyn age::Identity + Send + Sync>>,
    /// The file they came from, for messages.
    pub path: PathBuf,
}

impl fmt::Debug for Identities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identities")
            .field("path", &self.path)
            .field("count", &self.list.len())
            .finish()
    }
}

impl Identities {
    /// The identities, as age's decryptor takes them.
    pub fn iter(&self) -> impl Iterator<Item = &dyn age::Identity> {
        self.list.iter().map(|i| i.as_ref() as &dyn age::Identity)
    }
}

/// Hands a passphrase read from a file to age when an SSH key is encrypted.
#[derive(Clone)]
struct PassphraseFromFile(Option<Arc<String>>);

impl age::Callbacks for PassphraseFromFile {
    fn display_message(&self, _message: &str) {}

    fn confirm(&self, _message: &str, _yes: &str, _no: Option<&str>) -> Option<bool> {
        None
    }

    fn request_public_string(&self, _description: &str) -> Option<String> {
        None
    }

    fn request_passphrase(&self, _description: &str) -> Option<SecretString> {
        self.0
            .as_ref()
            .map(|p| SecretString::from(p.as_str().to_owned()))
    }
}

/// Loads identities from `path`: an age identity file (`AGE-SECRET-KEY-1…`
/// lines, `#` comments, as `age-keygen` writes it) or an SSH private key
/// (OpenSSH format; ed25519 or RSA). A passphrase-protected SSH key needs
/// `passphrase_file`.
///
/// # Errors
/// Unreadable file, nothing usable in it, a protected key without a passphrase.
pub fn load_identities(
    path: &Path,
    passphrase_file: Option<&Path>,
) -> Result<Identities, IdentityError> {
    use std::io::Read;
    let read_err = |source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    };
    let invalid = |why: String| IdentityError::Invalid {
        path: path.to_path_buf(),
        why,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(read_err)?
        .take(MAX_IDENTITY_FILE)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or("");
    if first.starts_with("AGE-SECRET-KEY-") {
        let mut list: Vec<Box<dyn age::Identity + Send + Sync>> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // The message names the line number, never the line.
            let id = line.parse::<age::x25519::Identity>().map_err(|_| {
                invalid(format!(
                    "line {} is not an age identity (AGE-SECRET-KEY-1…)",
                    i + 1
                ))
            })?;
            list.push(Box::new(id));
        }
        return Ok(Identities {
            list,
            path: path.to_path_buf(),
        });
    }
    if first.starts_with("-----BEGIN") {
        let key =
            age::ssh::Identity::from_buffer(text.as_bytes(), Some(path.display().to_string()))
                .map_err(|e| invalid(format!("not a usable SSH private key: {e}")))?;
        let list: Vec<Box<dyn age::Identity + Send + Sync>> = match key {
            age::ssh::Identity::Unencrypted(_) => vec![Box::new(key)],
            age::ssh::Identity::Encrypted(_) => {
                let Some(pf) = passphrase_file else {
                    return Err(invalid(
                        "the SSH key is protected by a passphrase; pass --identity-passphrase-file FILE (a file holding the passphrase)".to_string(),
                    ));
                };
                let pass = std::fs::read_to_string(pf).map_err(|source| IdentityError::Read {
                    path: pf.to_path_buf(),
                    source,
                })?;
                let pass = pass.trim_end_matches(['\r', '\n']).to_string();
                vec![Box::new(
                    key.with_callbacks(PassphraseFromFile(Some(Arc::new(pass)))),
                )]
            }
            age::ssh::Identity::Unsupported(k) => {
                struct Show(age::ssh::UnsupportedKey);
                impl fmt::Display for Show {
                    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        self.0.display(f, None)
                    }
                }
                return Err(invalid(format!(
                    "this SSH key cannot decrypt age files: {}",
                    Show(k).to_string().trim()
                )));
            }
        };
        return Ok(Identities {
            list,
            path: path.to_path_buf(),
        });
    }
    Err(invalid(
        "neither an age identity file (AGE-SECRET-KEY-1… lines, as age-keygen writes) nor an SSH private key (-----BEGIN OPENSSH PRIVATE KEY-----)".to_string(),
    ))
}

/// Whether a file starts like a binary age file.
pub fn is_age_file(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut head = Vec::with_capacity(AGE_MAGIC.len());
    std::fs::File::open(path)?
        .take(AGE_MAGIC.len() as u64)
        .read_to_end(&mut head)?;
    Ok(head == AGE_MAGIC)
}

/// Words for a decryption failure, with what to do.
pub fn explain_decrypt_error(
    e: &age::DecryptError,
    identities: &Identities,
    recipients: &[String],
) -> String {
    match e {
        age::DecryptError::NoMatchingKeys => format!(
            "no identity in {} can decrypt this set; it is encrypted to: {}. Use the private key of one of these recipients",
            identities.path.display(),
            if recipients.is_empty() {
                "(not recorded)".to_string()
            } else {
                recipients.join(", ")
            }
        ),
        age::DecryptError::KeyDecryptionFailed => format!(
            "the passphrase does not unlock the SSH key {}",
            identities.path.display()
        ),
        other => format!("cannot decrypt: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519_PUB: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsKLqeplhpW+uObz5dvMgjz1OxfM/XXUB+VHtZ6isGN comment@host";

    #[test]
    fn recipients_parse_and_are_canonical() {
        let id = age::x25519::Identity::generate();
        let public = id.to_public().to_string();
        let r = parse_recipient(&format!("  {public}  ")).unwrap();
        assert_eq!(r.text, public);
        let s = parse_recipient(ED25519_PUB).unwrap();
        assert!(s.text.starts_with("ssh-ed25519 AAAA"));
        assert!(!s.text.contains("comment@host"), "{}", s.text);
    }

    #[test]
    fn bad_recipients_say_what_to_give_and_never_quote_secrets() {
        let id = age::x25519::Identity::generate();
        use age::secrecy::ExposeSecret;
        let secret = id.to_string();
        let e = parse_recipient(secret.expose_secret()).unwrap_err();
        assert!(e.contains("age-keygen -y"), "{e}");
        assert!(!e.contains(&secret.expose_secret()[16..]), "{e}");
        let e = parse_recipient("-----BEGIN OPENSSH PRIVATE KEY-----").unwrap_err();
        assert!(e.contains("public key"), "{e}");
        let e = parse_recipient("age1notakey").unwrap_err();
        assert!(e.contains("not a valid age public key"), "{e}");
        let e = parse_recipient("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEmKSENjQEezOmxkZMy7opKgwFB9nkt5YRrYMjNuG5N87uRgg6CLrbo5wAdT/y6v0mKV0U2w0WZ2YB/++Tpockg=").unwrap_err();
        assert!(e.contains("ssh-ed25519 or ssh-rsa"), "{e}");
        let e = parse_recipient("hello").unwrap_err();
        assert!(e.contains("age1"), "{e}");
    }

    #[tokio::test]
    async fn sealed_uploads_decrypt_to_the_bytes_written_and_hash_what_is_stored() {
        use crate::destination::{Destination, LocalDir};
        let dir = tempfile::tempdir().unwrap();
        let dest = LocalDir::open(dir.path()).await.unwrap();
        let id = age::x25519::Identity::generate();
        let config = EncryptionConfig {
            recipients: vec![parse_recipient(&id.to_public().to_string()).unwrap()],
            identity_file: None,
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

    #[test]
    fn recipients_file_skips_comments_and_names_bad_lines() {
        let id = age::x25519::Identity::generate();
        let public = id.to_public().to_string();
        let text = format!("# ops team\n\n{public}\n  # laptop\n{ED25519_PUB}\n");
        assert_eq!(parse_recipients_file(&text).unwrap().len(), 2);
        let e = parse_recipients_file(&format!("{public}\n\nnope\n")).unwrap_err();
        assert!(e.starts_with("line 3:"), "{e}");
    }
}
