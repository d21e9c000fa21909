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
use std::sync::Arc;

use age::secrecy::SecretString;

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
    /// `encryption.page_id_key_file`: keys the page ids of paged sets.
    pub page_id_key: Option<PageIdKey>,
}

/// The secret that keys the page ids of encrypted paged sets
/// (`encryption.page_id_key_file`): the SHA-256 of the file's content (at
/// least 32 bytes, surrounding whitespace ignored). Never written anywhere;
/// its [`fingerprint`](Self::fingerprint) is.
#[derive(Clone, PartialEq, Eq)]
pub struct PageIdKey([u8; 32]);

impl fmt::Debug for PageIdKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PageIdKey(<secret>)")
    }
}

/// The fixed text whose HMAC with the key is the key's fingerprint.
const PAGE_ID_KEY_FINGERPRINT_TEXT: &[u8] = b"etcd-backup-agent page id key fingerprint v1";

impl PageIdKey {
    /// The least secret material the file must hold.
    pub const MIN_LEN: usize = 32;

    /// Reads the key file.
    ///
    /// # Errors
    /// The file cannot be read, or holds less than [`Self::MIN_LEN`] bytes;
    /// the message says what to do (never what the file holds).
    pub fn read(path: &Path) -> Result<Self, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < Self::MIN_LEN {
            return Err(format!(
                "{} holds {} bytes, fewer than the {} a page id key needs; make one with `head -c 32 /dev/urandom | base64 > {}`",
                path.display(),
                trimmed.len(),
                Self::MIN_LEN,
                path.display()
            ));
        }
        Ok(Self::from_material(trimmed))
    }

    /// The key made from secret material (the key file's content).
    pub fn from_material(material: &[u8]) -> Self {
        use sha2::Digest;
        Self(sha2::Sha256::digest(material).into())
    }

    /// The first 16 bytes of HMAC-SHA256 of `data` with the key.
    pub fn mac16(&self, data: &[u8]) -> [u8; 16] {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0)
            .expect("HMAC takes a key of any length");
        mac.update(data);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// What the manifest records: which sets' page ids are comparable.
    pub fn fingerprint(&self) -> String {
        hex::encode(self.mac16(PAGE_ID_KEY_FINGERPRINT_TEXT))
    }
}

impl EncryptionConfig {
    /// The recipients' canonical texts, as the manifest records them.
    pub fn recipient_texts(&self) -> Vec<String> {
        self.recipients.iter().map(|r| r.text.clone()).collect()
    }

    /// An age encryptor to every recipient.
    ///
    /// # Errors
    /// age refuses the recipient set.
    pub fn encryptor(&self) -> Result<age::Encryptor, age::EncryptError> {
        age::Encryptor::with_recipients(
            self.recipients
                .iter()
                .map(|r| r.key.as_ref() as &dyn age::Recipient),
        )
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
