//! Whether an SSH server's host key is trusted, decided the way OpenSSH decides it.
//!
//! Backups hold every secret in the cluster, so before the agent authenticates to an
//! SFTP server it must know that the server is the one the operator meant. The
//! operator already has the tool for that: an OpenSSH `known_hosts` file, built with
//! `ssh-keyscan` and checked out of band. Reading that same file, with the same
//! matching rules as `ssh`, means a host that `ssh` trusts is trusted here and a host
//! `ssh` would refuse is refused here, with no second format to learn or get wrong.
//!
//! There is deliberately no "accept new keys" or "skip the check" mode: an unknown or
//! changed key is always a refusal, and the operator decides what to do about it.
//! Host certificates (`@cert-authority`) are not supported, so those lines are
//! ignored rather than half-implemented.

use std::fmt;
use std::path::{Path, PathBuf};

use data_encoding::{BASE64, BASE64_NOPAD};
use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// The port for which OpenSSH writes a bare host name instead of `[host]:port`.
const DEFAULT_SSH_PORT: u16 = 22;
/// Prefix of a hashed host name field (`ssh-keygen -H`, `HashKnownHosts yes`).
const HASH_MAGIC: &str = "|1|";
/// Length of an HMAC-SHA1 salt and output; OpenSSH rejects salts of any other length.
const SHA1_LEN: usize = 20;
/// Prefix of a SHA-256 fingerprint, as `ssh-keygen -lf` prints it.
const SHA256_PREFIX: &str = "SHA256:";
/// Length of unpadded base64 for a 32-byte SHA-256 digest.
const SHA256_B64_LEN: usize = 43;

type HmacSha1 = Hmac<Sha1>;

/// Why a known_hosts file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KnownHostsError {
    /// The file could not be read at all (missing, a directory, no permission).
    /// Lines that merely fail to parse are not errors: they are skipped with a
    /// warning, as OpenSSH does.
    #[error(
        "cannot read known_hosts file {}: {source}; check that the path in the config is \
         right and that the agent's user may read it",
        path.display()
    )]
    Read {
        /// The known_hosts file that was being read.
        path: PathBuf,
        /// What the operating system reported.
        #[source]
        source: std::io::Error,
    },
}

/// A parsed known_hosts file.
///
/// Holds the usable lines with their 1-based line numbers, so that a refusal can
/// point the operator at the exact line to inspect or fix, and the file's path for
/// the same reason.
#[derive(Debug, Clone)]
pub struct KnownHosts {
    path: PathBuf,
    entries: Vec<Entry>,
}

/// The verdict for the key a server presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A matching host pattern with exactly this key (type and blob).
    Trusted {
        /// The first line (1-based) that lists this host with this key.
        line: usize,
    },
    /// A `@revoked` line lists this key (for any host pattern): refuse.
    Revoked {
        /// The first `@revoked` line (1-based) that lists this key.
        line: usize,
    },
    /// The host is known but with other key(s): refuse, it may be an attack or a
    /// rotated key.
    Changed {
        /// The lines whose host pattern matched (1-based, ascending).
        lines: Vec<usize>,
        /// True when one of those lines has the same key type as the presented key
        /// (OpenSSH's "REMOTE HOST IDENTIFICATION HAS CHANGED"); false when only
        /// other key types are known for the host.
        same_type: bool,
    },
    /// No line matches the host.
    Unknown,
}

/// One usable line of the file.
#[derive(Debug, Clone)]
struct Entry {
    line: usize,
    revoked: bool,
    hosts: Hosts,
    key_type: String,
    key_blob: Vec<u8>,
}

/// The host names field of a line.
#[derive(Debug, Clone)]
enum Hosts {
    /// Comma-separated patterns, lowercased.
    Patterns(Vec<Pattern>),
    /// `|1|salt|hmac`: HMAC-SHA1 of the lookup name, keyed with the salt.
    Hashed { salt: Vec<u8>, hash: Vec<u8> },
}

/// One pattern of a comma-separated host names field.
#[derive(Debug, Clone)]
struct Pattern {
    negated: bool,
    /// Lowercased; may contain `*` and `?`.
    glob: String,
}

/// Why a line was skipped. Deliberately carries no text from the line, so that a
/// warning can never echo key material (a garbled line may shift the key into any
/// field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineProblem {
    UnknownMarker,
    MissingFields,
    MalformedHashedHost,
    KeyNotBase64,
    KeyTypeMismatch,
}

impl fmt::Display for LineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::UnknownMarker => "it starts with '@' but the marker is neither @revoked nor @cert-authority",
            Self::MissingFields => "it does not have the fields host names, key type and base64 key",
            Self::MalformedHashedHost => {
                "its hashed host name is not of the form |1|<base64 20-byte salt>|<base64 20-byte hash>"
            }
            Self::KeyNotBase64 => "its key field is not valid padded base64",
            Self::KeyTypeMismatch => "its key type field does not match the key type encoded in the key",
        })
    }
}

/// What one line of the file turned out to be.
enum Line {
    /// Blank or a comment.
    Nothing,
    /// `@cert-authority`: not supported, ignored.
    CertAuthority,
    Entry(Entry),
}

impl KnownHosts {
    /// Reads and parses a known_hosts file.
    ///
    /// Lines that cannot be parsed are skipped (as OpenSSH does) and logged with
    /// `tracing::warn!` naming the path and line number, never the key material.
    ///
    /// # Errors
    /// [`KnownHostsError::Read`] when the file cannot be read.
    pub fn load(path: &Path) -> Result<Self, KnownHostsError> {
        let bytes = std::fs::read(path).map_err(|source| KnownHostsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        // OpenSSH reads bytes; a stray non-UTF-8 byte in a comment must not make the
        // whole file unusable. Replaced bytes can only fail to match.
        Ok(Self::parse(&String::from_utf8_lossy(&bytes), path))
    }

    /// Parses known_hosts text; `path` is only used in messages.
    ///
    /// Unparseable lines are skipped with a warning, as in [`KnownHosts::load`].
    pub fn parse(text: &str, path: &Path) -> Self {
        let mut entries = Vec::new();
        for (index, text) in text.lines().enumerate() {
            let line = index + 1;
            match parse_line(text, line) {
                Ok(Line::Nothing) => {}
                Ok(Line::CertAuthority) => tracing::warn!(
                    path = %path.display(),
                    line,
                    "ignoring @cert-authority line in known_hosts file: host certificates are \
                     not supported; list the server's host key itself if it should be trusted"
                ),
                Ok(Line::Entry(entry)) => entries.push(entry),
                Err(problem) => tracing::warn!(
                    path = %path.display(),
                    line,
                    "skipping known_hosts line that cannot be parsed: {problem}; fix or remove \
                     the line (`ssh-keyscan` prints valid lines)"
                ),
            }
        }
        if entries.is_empty() {
            tracing::warn!(
                path = %path.display(),
                "known_hosts file has no usable host key lines, so every host will be refused; \
                 add the server's keys (from `ssh-keyscan`, checked with its administrator)"
            );
        }
        Self {
            path: path.to_path_buf(),
            entries,
        }
    }

    /// The verdict for the key a server at `host`:`port` presented.
    ///
    /// `key_type` is the SSH algorithm name as in known_hosts (e.g. `ssh-ed25519`,
    /// `ecdsa-sha2-nistp256`, `ssh-rsa`) and `key_blob` the SSH wire-format public
    /// key blob (what base64-decodes from the known_hosts key field). The wire blob
    /// names its own type, and that name is what is compared for
    /// `same_type` in [`Verdict::Changed`]; `key_type` is only used when the blob is too
    /// malformed to name one (the RSA signature names `rsa-sha2-256`/`-512` count
    /// as `ssh-rsa`).
    ///
    /// Precedence: a `@revoked` line with this key wins over everything, then any
    /// matching line with exactly this key, then other keys for the host.
    pub fn check(&self, host: &str, port: u16, key_type: &str, key_blob: &[u8]) -> Verdict {
        if let Some(entry) = self.revocation_of(key_blob) {
            return Verdict::Revoked { line: entry.line };
        }

        let presented_type: &[u8] = match blob_key_type(key_blob) {
            Some(t) => t,
            None => normalize_key_type(key_type).as_bytes(),
        };
        let mut lines = Vec::new();
        let mut same_type = false;
        for entry in self.listed_for(host, port) {
            if entry.key_blob == key_blob {
                return Verdict::Trusted { line: entry.line };
            }
            lines.push(entry.line);
            same_type |= entry.key_type.as_bytes() == presented_type;
        }
        if lines.is_empty() {
            Verdict::Unknown
        } else {
            Verdict::Changed { lines, same_type }
        }
    }

    /// The key types (as known_hosts names them: `ssh-ed25519`, `ssh-rsa`,
    /// `ecdsa-sha2-nistp256`, ...) of the keys listed for `host`:`port`, each
    /// once, in file order.
    ///
    /// OpenSSH offers these host-key algorithms first in key exchange, so a
    /// server with several host keys presents the one the operator trusts
    /// rather than the client's favourite. Lines that do not match the host
    /// (negated patterns included), `@revoked` lines, and lines whose key is
    /// revoked elsewhere in the file are left out: those keys would be refused
    /// anyway.
    pub fn key_types_for(&self, host: &str, port: u16) -> Vec<&str> {
        let mut types: Vec<&str> = Vec::new();
        for entry in self.listed_for(host, port) {
            let revoked = self.revocation_of(&entry.key_blob).is_some();
            if !revoked && !types.contains(&entry.key_type.as_str()) {
                types.push(&entry.key_type);
            }
        }
        types
    }

    /// The host-key lines (not `@revoked` ones) whose patterns match
    /// `host`:`port`, in file order.
    fn listed_for(&self, host: &str, port: u16) -> impl Iterator<Item = &Entry> {
        let name = lookup_name(host, port);
        self.entries
            .iter()
            .filter(move |e| !e.revoked && e.hosts.matches(&name))
    }

    /// The `@revoked` line for `key_blob`, if the file has one.
    fn revocation_of(&self, key_blob: &[u8]) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.revoked && e.key_blob == key_blob)
    }

    /// The file this was read from, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many usable lines (host keys and `@revoked` keys) the file has.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the file has no usable lines, so every host is [`Verdict::Unknown`].
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `"SHA256:"` + unpadded base64 of SHA-256(`key_blob`), exactly as `ssh-keygen -lf`
/// prints it, so operators can compare what the agent logs with what they checked.
pub fn sha256_fingerprint(key_blob: &[u8]) -> String {
    format!(
        "{SHA256_PREFIX}{}",
        BASE64_NOPAD.encode(&Sha256::digest(key_blob))
    )
}

/// Validates a pinned fingerprint from config: `"SHA256:"` followed by 43 base64
/// characters that decode to 32 bytes, as `ssh-keygen -lf -E sha256` prints it.
///
/// Returns the fingerprint in the exact form [`sha256_fingerprint`] produces, so the
/// two can be compared as strings.
///
/// # Errors
/// A message for a person, saying what is wrong and how to get a valid value.
pub fn parse_sha256_fingerprint(s: &str) -> Result<String, String> {
    const HOW: &str = "get it with `ssh-keyscan -p PORT HOST | ssh-keygen -lf -E sha256 -` \
                       and check it with the server's administrator";
    let Some(b64) = s.strip_prefix(SHA256_PREFIX) else {
        return Err(format!(
            "{s:?} is not a SHA-256 host key fingerprint: expected \"SHA256:\" followed by \
             {SHA256_B64_LEN} base64 characters; {HOW}"
        ));
    };
    if b64.len() != SHA256_B64_LEN {
        let hint = if b64.ends_with('=') {
            " (remove the '=' padding: ssh-keygen prints fingerprints without it)"
        } else {
            ""
        };
        return Err(format!(
            "{s:?} has {} characters after \"SHA256:\", expected {SHA256_B64_LEN}{hint}; {HOW}",
            b64.len()
        ));
    }
    match BASE64_NOPAD.decode(b64.as_bytes()) {
        Ok(digest) if digest.len() == 32 => {
            Ok(format!("{SHA256_PREFIX}{}", BASE64_NOPAD.encode(&digest)))
        }
        _ => Err(format!(
            "{s:?} is not a valid fingerprint: the part after \"SHA256:\" is not the base64 \
             of a SHA-256 digest; {HOW}"
        )),
    }
}

/// The name OpenSSH looks up: the bare host on port 22, `[host]:port` otherwise;
/// lowercased, as `ssh` lowercases the host name it is given.
fn lookup_name(host: &str, port: u16) -> String {
    let name = if port == DEFAULT_SSH_PORT {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    };
    name.to_ascii_lowercase()
}

/// RSA keys are negotiated under signature names, but known_hosts lists the key
/// type.
fn normalize_key_type(key_type: &str) -> &str {
    match key_type {
        "rsa-sha2-256" | "rsa-sha2-512" => "ssh-rsa",
        other => other,
    }
}

/// The key type name at the start of an SSH wire-format public key blob (an SSH
/// `string`: big-endian u32 length, then the bytes).
fn blob_key_type(blob: &[u8]) -> Option<&[u8]> {
    let (len, rest) = blob.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    rest.get(..len)
}

fn parse_line(text: &str, line: usize) -> Result<Line, LineProblem> {
    let trimmed = text.trim_start_matches([' ', '\t']);
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(Line::Nothing);
    }
    let mut fields = trimmed.split([' ', '\t']).filter(|f| !f.is_empty());
    let mut first = fields.next().ok_or(LineProblem::MissingFields)?;
    let mut revoked = false;
    if first.starts_with('@') {
        match first {
            "@cert-authority" => return Ok(Line::CertAuthority),
            "@revoked" => revoked = true,
            _ => return Err(LineProblem::UnknownMarker),
        }
        first = fields.next().ok_or(LineProblem::MissingFields)?;
    }
    let hosts_field = first;
    let key_type = fields.next().ok_or(LineProblem::MissingFields)?;
    let key_b64 = fields.next().ok_or(LineProblem::MissingFields)?;
    // Anything further is the comment.

    let hosts = parse_hosts(hosts_field)?;
    let key_blob = BASE64
        .decode(key_b64.as_bytes())
        .map_err(|_| LineProblem::KeyNotBase64)?;
    // OpenSSH refuses a line whose type field disagrees with the key itself; so do
    // we, which also means a matching blob implies a matching type.
    if blob_key_type(&key_blob) != Some(key_type.as_bytes()) {
        return Err(LineProblem::KeyTypeMismatch);
    }
    Ok(Line::Entry(Entry {
        line,
        revoked,
        hosts,
        key_type: key_type.to_owned(),
        key_blob,
    }))
}

fn parse_hosts(field: &str) -> Result<Hosts, LineProblem> {
    if field.starts_with('|') {
        // A hashed field is one entry; anything but exactly `|1|salt|hash` is
        // unusable (OpenSSH treats it as a parse error too).
        let rest = field
            .strip_prefix(HASH_MAGIC)
            .ok_or(LineProblem::MalformedHashedHost)?;
        let (salt, hash) = rest
            .split_once('|')
            .ok_or(LineProblem::MalformedHashedHost)?;
        let decode = |s: &str| {
            BASE64
                .decode(s.as_bytes())
                .ok()
                .filter(|b| b.len() == SHA1_LEN)
                .ok_or(LineProblem::MalformedHashedHost)
        };
        return Ok(Hosts::Hashed {
            salt: decode(salt)?,
            hash: decode(hash)?,
        });
    }
    let patterns = field
        .split(',')
        .filter_map(|p| {
            let (negated, glob) = match p.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, p),
            };
            // An empty pattern could only match an empty host name.
            (!glob.is_empty()).then(|| Pattern {
                negated,
                glob: glob.to_ascii_lowercase(),
            })
        })
        .collect();
    Ok(Hosts::Patterns(patterns))
}

impl Hosts {
    /// Whether the (lowercased) lookup name matches, with OpenSSH's
    /// `match_hostname` semantics: a matching negated pattern vetoes the line,
    /// otherwise any matching positive pattern accepts it.
    fn matches(&self, name: &str) -> bool {
        match self {
            Self::Patterns(patterns) => {
                let mut positive = false;
                for p in patterns {
                    if wildcard_match(name.as_bytes(), p.glob.as_bytes()) {
                        if p.negated {
                            return false;
                        }
                        positive = true;
                    }
                }
                positive
            }
            Self::Hashed { salt, hash } => {
                let Ok(mut mac) = HmacSha1::new_from_slice(salt) else {
                    return false;
                };
                mac.update(name.as_bytes());
                mac.verify_slice(hash).is_ok()
            }
        }
    }
}

/// OpenSSH's `match_pattern`: `*` matches any run of bytes (also none), `?` exactly
/// one byte, everything else itself; the whole string must match.
fn wildcard_match(s: &[u8], p: &[u8]) -> bool {
    let (mut si, mut pi) = (0, 0);
    // Where the last `*` was in the pattern, and how much of `s` it has swallowed.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == s[si] => {
                si += 1;
                pi += 1;
            }
            _ => match star {
                Some((star_pi, star_si)) => {
                    pi = star_pi + 1;
                    si = star_si + 1;
                    star = Some((star_pi, si));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    // Keys made with `ssh-keygen -t ... -N '' -C ''` (OpenSSH 9.2p1) and their
    // fingerprints as `ssh-keygen -lf FILE.pub -E sha256` printed them.
    const ED25519: &str = "AAAAC3NzaC1lZDI1NTE5AAAAICVWEAhcodoSgDpjhMqZg5tSkW7prcQJ0+r96E4yD1/X";
    const ED25519_FP: &str = "SHA256:pLGoRbzd9llCvgV1W07syGaP40v9e20TpBbgMRAyMdQ";
    const ED25519_OTHER: &str =
        "AAAAC3NzaC1lZDI1NTE5AAAAIAVdl6ytDNPNeYM6lumXt6AIMwoCB/8Fgni37bliMLL7";
    const ED25519_OTHER_FP: &str = "SHA256:x7zdM9d/eUiVllq/TbFnJlw9huV3RBcF8H09pOgkdjc";
    const ECDSA: &str = "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBDpl5ArxgM4ZmonZKD+3huCY9jkycHXXHI+lHitKQqlUUBsPyKVj2hv8DwCLuOOdPOxxLRFdoc+Y5lQkELvCqOM=";
    const ECDSA_FP: &str = "SHA256:SdkJkLTJp4icpUmOEzYPsxHMAqO/ptWj0y5Ys4agyYc";
    const RSA: &str = "AAAAB3NzaC1yc2EAAAADAQABAAAAgQDN8A3do5Uy8Ac5Tf/GSI+WvNUA8GMeJR3zFj8LytSOCUBsV+IHFpyiVNSzUyBKPt33wFzT3ArbyaFpnUIYxN4bY/2GQZTfV/h/Dp0NKf9JzyxNYKCzXUP/uR/NCdcdeoUxSuwIb59L5uO8vG6xcDpc4Rm+8b1Hl2sWw1dNc5i/8Q==";
    const RSA_FP: &str = "SHA256:BNUM+6oBzpa/nNcYK7EaEuEZd8PX9Rz7DyinZCJ/R00";

    // `ssh-keygen -H -f FILE` output for the file
    //   backup.example.com ssh-ed25519 <ED25519>
    //   [10.1.2.3]:2222 ecdsa-sha2-nistp256 <ECDSA>
    const OPENSSH_HASHED: &str = "\
|1|Ycw4QAplbyNnc6p0blCNdFiAFSw=|g0OHFUmoZN5Kz259JX099PhnR4g= ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICVWEAhcodoSgDpjhMqZg5tSkW7prcQJ0+r96E4yD1/X 
|1|C2YQ3Zu0neiGB2v8mGODRmkRAfA=|GvdE/Kf8a5Crtdj7nRK6MJSVtKc= ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBDpl5ArxgM4ZmonZKD+3huCY9jkycHXXHI+lHitKQqlUUBsPyKVj2hv8DwCLuOOdPOxxLRFdoc+Y5lQkELvCqOM= 
";

    fn blob(b64: &str) -> Vec<u8> {
        BASE64.decode(b64.as_bytes()).unwrap()
    }

    fn parse_kh(text: &str) -> KnownHosts {
        KnownHosts::parse(text, Path::new("/test/known_hosts"))
    }

    fn check(kh: &KnownHosts, host: &str, port: u16, key_type: &str, b64: &str) -> Verdict {
        kh.check(host, port, key_type, &blob(b64))
    }

    fn ed(kh: &KnownHosts, host: &str, port: u16) -> Verdict {
        check(kh, host, port, "ssh-ed25519", ED25519)
    }

    /// A wire-format blob for a key type this module has never heard of.
    fn unknown_type_b64() -> String {
        let name = b"ssh-future@example.com";
        let mut b = (name.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(name);
        b.extend_from_slice(&[0, 0, 0, 3, 1, 2, 3]);
        BASE64.encode(&b)
    }

    fn hashed_field(salt: &[u8], name: &str) -> String {
        let mut mac = HmacSha1::new_from_slice(salt).unwrap();
        mac.update(name.as_bytes());
        let hash = mac.finalize().into_bytes();
        format!("|1|{}|{}", BASE64.encode(salt), BASE64.encode(&hash))
    }

    const TRUSTED_1: Verdict = Verdict::Trusted { line: 1 };

    #[test]
    fn plain_host_on_port_22_with_its_key_is_trusted() {
        let kh = parse_kh(&format!(
            "backup.example.com ssh-ed25519 {ED25519} comment here\n"
        ));
        assert_eq!(ed(&kh, "backup.example.com", 22), TRUSTED_1);
        assert_eq!(ed(&kh, "other.example.com", 22), Verdict::Unknown);
        assert_eq!(kh.len(), 1);
        assert_eq!(kh.path(), Path::new("/test/known_hosts"));
    }

    #[test]
    fn bracketed_entry_matches_only_its_port_and_bare_entry_only_port_22() {
        let kh = parse_kh(&format!(
            "[127.0.0.1]:2222 ssh-ed25519 {ED25519}\n10.0.0.1 ssh-ed25519 {ED25519}\n\
             [10.0.0.2]:22 ssh-ed25519 {ED25519}\n"
        ));
        assert_eq!(ed(&kh, "127.0.0.1", 2222), TRUSTED_1);
        assert_eq!(ed(&kh, "127.0.0.1", 22), Verdict::Unknown);
        assert_eq!(ed(&kh, "127.0.0.1", 2223), Verdict::Unknown);
        assert_eq!(ed(&kh, "10.0.0.1", 22), Verdict::Trusted { line: 2 });
        assert_eq!(ed(&kh, "10.0.0.1", 2222), Verdict::Unknown);
        // OpenSSH never looks up `[host]:22`, so such a line matches nothing.
        assert_eq!(ed(&kh, "10.0.0.2", 22), Verdict::Unknown);
    }

    #[test]
    fn wildcards_work_inside_the_bracketed_port_form() {
        let kh = parse_kh(&format!("[*.example.com]:2?22 ssh-ed25519 {ED25519}\n"));
        assert_eq!(ed(&kh, "a.example.com", 2222), TRUSTED_1);
        assert_eq!(ed(&kh, "a.example.com", 2322), TRUSTED_1);
        assert_eq!(ed(&kh, "a.example.com", 22), Verdict::Unknown);
        assert_eq!(ed(&kh, "a.example.com", 222), Verdict::Unknown);
    }

    #[test]
    fn comma_list_matches_each_name_and_nothing_else() {
        let kh = parse_kh(&format!(
            "backup,backup.example.com,10.0.0.5 ssh-ed25519 {ED25519}\n"
        ));
        for host in ["backup", "backup.example.com", "10.0.0.5"] {
            assert_eq!(ed(&kh, host, 22), TRUSTED_1, "{host}");
        }
        for host in ["backup.example", "10.0.0.50", "ackup", ""] {
            assert_eq!(ed(&kh, host, 22), Verdict::Unknown, "{host}");
        }
    }

    #[test]
    fn star_matches_any_run_and_question_mark_exactly_one_character() {
        let kh = parse_kh(&format!(
            "*.example.com ssh-ed25519 {ED25519}\nnode?.lab ssh-ed25519 {ED25519}\n\
             10.0.*.1 ssh-ed25519 {ED25519}\n"
        ));
        assert_eq!(ed(&kh, "a.example.com", 22), TRUSTED_1);
        assert_eq!(ed(&kh, "a.b.example.com", 22), TRUSTED_1);
        assert_eq!(ed(&kh, ".example.com", 22), TRUSTED_1);
        assert_eq!(ed(&kh, "example.com", 22), Verdict::Unknown);
        assert_eq!(ed(&kh, "a.example.com.evil", 22), Verdict::Unknown);
        assert_eq!(ed(&kh, "node1.lab", 22), Verdict::Trusted { line: 2 });
        assert_eq!(ed(&kh, "node.lab", 22), Verdict::Unknown);
        assert_eq!(ed(&kh, "node12.lab", 22), Verdict::Unknown);
        assert_eq!(ed(&kh, "10.0.99.1", 22), Verdict::Trusted { line: 3 });
        assert_eq!(ed(&kh, "10.0.99.2", 22), Verdict::Unknown);
    }

    #[test]
    fn wildcard_match_follows_openssh_match_pattern() {
        let cases: &[(&str, &str, bool)] = &[
            ("", "", true),
            ("", "*", true),
            ("", "?", false),
            ("a", "", false),
            ("abc", "abc", true),
            ("abc", "ab", false),
            ("abc", "abcd", false),
            ("abc", "a*", true),
            ("abc", "*c", true),
            ("abc", "*b*", true),
            ("abc", "a**c", true),
            ("abc", "???", true),
            ("abc", "??", false),
            ("aXbXc", "*X*X*", true),
            ("aXbc", "*X*X*", false),
            ("mississippi", "m*iss*ppi", true),
            ("mississippi", "m*iss*x", false),
            ("a*c", "a*c", true),
        ];
        for &(s, p, want) in cases {
            assert_eq!(
                wildcard_match(s.as_bytes(), p.as_bytes()),
                want,
                "{s:?} ~ {p:?}"
            );
        }
    }

    #[test]
    fn negated_pattern_vetoes_the_line_whatever_its_position() {
        for field in [
            "!bad.example.com,*.example.com",
            "*.example.com,!bad.example.com",
        ] {
            let kh = parse_kh(&format!("{field} ssh-ed25519 {ED25519}\n"));
            assert_eq!(ed(&kh, "good.example.com", 22), TRUSTED_1, "{field}");
            assert_eq!(ed(&kh, "bad.example.com", 22), Verdict::Unknown, "{field}");
        }
        // A negation alone never makes a line match.
        let kh = parse_kh(&format!("!bad.example.com ssh-ed25519 {ED25519}\n"));
        assert_eq!(ed(&kh, "good.example.com", 22), Verdict::Unknown);
        // A vetoed line does not make the host "known" either.
        let kh = parse_kh(&format!(
            "!bad.example.com,*.example.com ssh-ed25519 {ED25519_OTHER}\n"
        ));
        assert_eq!(ed(&kh, "bad.example.com", 22), Verdict::Unknown);
    }

    #[test]
    fn host_names_compare_case_insensitively() {
        let kh = parse_kh(&format!(
            "Backup.EXAMPLE.com ssh-ed25519 {ED25519}\n[FE80::1]:2222 ssh-ed25519 {ED25519}\n"
        ));
        assert_eq!(ed(&kh, "backup.example.com", 22), TRUSTED_1);
        assert_eq!(ed(&kh, "BACKUP.example.COM", 22), TRUSTED_1);
        assert_eq!(ed(&kh, "fe80::1", 2222), Verdict::Trusted { line: 2 });
    }

    #[test]
    fn hashed_entry_computed_with_a_fixed_salt_matches_only_its_name() {
        let salt = [7u8; SHA1_LEN];
        let kh = parse_kh(&format!(
            "{} ssh-ed25519 {ED25519}\n{} ssh-ed25519 {ED25519}\n",
            hashed_field(&salt, "backup.example.com"),
            hashed_field(&salt, "[127.0.0.1]:2222"),
        ));
        assert_eq!(ed(&kh, "backup.example.com", 22), TRUSTED_1);
        assert_eq!(ed(&kh, "Backup.Example.com", 22), TRUSTED_1);
        assert_eq!(ed(&kh, "backup.example.org", 22), Verdict::Unknown);
        assert_eq!(ed(&kh, "backup.example.com", 2222), Verdict::Unknown);
        assert_eq!(ed(&kh, "127.0.0.1", 2222), Verdict::Trusted { line: 2 });
        assert_eq!(ed(&kh, "127.0.0.1", 22), Verdict::Unknown);
    }

    #[test]
    fn lines_hashed_by_ssh_keygen_match_their_hosts() {
        let kh = parse_kh(OPENSSH_HASHED);
        assert_eq!(kh.len(), 2);
        assert_eq!(ed(&kh, "backup.example.com", 22), TRUSTED_1);
        assert_eq!(ed(&kh, "BACKUP.example.com", 22), TRUSTED_1);
        assert_eq!(
            check(&kh, "10.1.2.3", 2222, "ecdsa-sha2-nistp256", ECDSA),
            Verdict::Trusted { line: 2 }
        );
        assert_eq!(
            check(&kh, "10.1.2.3", 22, "ecdsa-sha2-nistp256", ECDSA),
            Verdict::Unknown
        );
        assert_eq!(ed(&kh, "backup.example.org", 22), Verdict::Unknown);
        assert_eq!(
            check(&kh, "backup.example.com", 22, "ssh-ed25519", ED25519_OTHER),
            Verdict::Changed {
                lines: vec![1],
                same_type: true
            }
        );
    }

    #[test]
    fn other_key_of_the_same_type_is_changed_with_same_type() {
        let kh = parse_kh(&format!(
            "# backup server\nbackup.example.com ssh-ed25519 {ED25519_OTHER}\n\
             backup.example.com ecdsa-sha2-nistp256 {ECDSA}\n"
        ));
        assert_eq!(
            ed(&kh, "backup.example.com", 22),
            Verdict::Changed {
                lines: vec![2, 3],
                same_type: true
            }
        );
    }

    #[test]
    fn only_other_key_types_known_is_changed_without_same_type() {
        let kh = parse_kh(&format!(
            "backup.example.com ecdsa-sha2-nistp256 {ECDSA}\nother ssh-ed25519 {ED25519_OTHER}\n\
             *.example.com ssh-rsa {RSA}\n"
        ));
        assert_eq!(
            ed(&kh, "backup.example.com", 22),
            Verdict::Changed {
                lines: vec![1, 3],
                same_type: false
            }
        );
    }

    #[test]
    fn exact_key_on_any_matching_line_wins_over_other_keys() {
        let kh = parse_kh(&format!(
            "*.example.com ssh-ed25519 {ED25519_OTHER}\nbackup.example.com ecdsa-sha2-nistp256 \
             {ECDSA}\nbackup.example.com ssh-ed25519 {ED25519}\nbackup.example.com ssh-ed25519 \
             {ED25519}\n"
        ));
        assert_eq!(
            ed(&kh, "backup.example.com", 22),
            Verdict::Trusted { line: 3 }
        );
    }

    #[test]
    fn line_with_an_unknown_key_type_still_makes_the_host_known() {
        let kh = parse_kh(&format!(
            "backup.example.com ssh-future@example.com {}\n",
            unknown_type_b64()
        ));
        assert_eq!(kh.len(), 1);
        assert_eq!(
            ed(&kh, "backup.example.com", 22),
            Verdict::Changed {
                lines: vec![1],
                same_type: false
            }
        );
    }

    #[test]
    fn revoked_key_is_refused_for_any_host_and_wins_over_trusted_lines() {
        let kh = parse_kh(&format!(
            "backup.example.com ssh-ed25519 {ED25519}\n\
             @revoked other.example.org ssh-ed25519 {ED25519}\n\
             @revoked * ssh-ed25519 {ED25519}\n"
        ));
        assert_eq!(
            ed(&kh, "backup.example.com", 22),
            Verdict::Revoked { line: 2 }
        );
        assert_eq!(ed(&kh, "anything", 2222), Verdict::Revoked { line: 2 });
    }

    #[test]
    fn revoked_line_for_another_key_neither_trusts_nor_makes_the_host_known() {
        let kh = parse_kh(&format!(
            "@revoked backup.example.com ssh-ed25519 {ED25519_OTHER}\n"
        ));
        assert_eq!(ed(&kh, "backup.example.com", 22), Verdict::Unknown);
        let kh = parse_kh(&format!(
            "@revoked backup.example.com ssh-ed25519 {ED25519_OTHER}\n\
             backup.example.com ssh-ed25519 {ED25519}\n"
        ));
        assert_eq!(
            ed(&kh, "backup.example.com", 22),
            Verdict::Trusted { line: 2 }
        );
    }

    #[test]
    fn cert_authority_lines_are_ignored() {
        let kh = parse_kh(&format!(
            "@cert-authority *.example.com ssh-ed25519 {ED25519}\n\
             @cert-authority backup.example.com ssh-ed25519 {ED25519_OTHER}\n"
        ));
        assert!(kh.is_empty());
        assert_eq!(ed(&kh, "backup.example.com", 22), Verdict::Unknown);
    }

    #[test]
    fn comments_blank_and_garbage_lines_are_skipped_and_line_numbers_kept() {
        let salt = BASE64.encode(&[1u8; SHA1_LEN]);
        let short = BASE64.encode(&[1u8; 8]);
        let text = format!(
            "# comment\n\
             \n\
             \t   \n\
             \t# indented comment\n\
             only-one-field\n\
             backup.example.com ssh-ed25519\n\
             backup.example.com ssh-ed25519 !!!not-base64!!!\n\
             backup.example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICVWEAhcodoSgDpjhMqZg5tSkW7prcQJ0+r96E4yD1/X=\n\
             backup.example.com ssh-rsa {ED25519}\n\
             backup.example.com ssh-ed25519 AAAA\n\
             @bogus backup.example.com ssh-ed25519 {ED25519}\n\
             @revoked\n\
             |1|{salt} ssh-ed25519 {ED25519}\n\
             |2|{salt}|{salt} ssh-ed25519 {ED25519}\n\
             |1|{short}|{salt} ssh-ed25519 {ED25519}\n\
             |1|{salt}|{short} ssh-ed25519 {ED25519}\n\
             |1|%%%|{salt} ssh-ed25519 {ED25519}\n\
             backup.example.com ssh-ed25519 {ED25519}\n"
        );
        let kh = parse_kh(&text);
        assert_eq!(kh.len(), 1, "{:?}", kh.entries);
        assert_eq!(
            ed(&kh, "backup.example.com", 22),
            Verdict::Trusted { line: 18 }
        );
    }

    #[test]
    fn line_problems_are_classified() {
        let ed_line = |hosts: &str| format!("{hosts} ssh-ed25519 {ED25519}");
        let problem = |text: &str| parse_line(text, 1).err();
        assert_eq!(problem("host"), Some(LineProblem::MissingFields));
        assert_eq!(
            problem("@revoked host ssh-ed25519"),
            Some(LineProblem::MissingFields)
        );
        assert_eq!(
            problem(&format!("@Revoked host ssh-ed25519 {ED25519}")),
            Some(LineProblem::UnknownMarker)
        );
        assert_eq!(
            problem("host ssh-ed25519 AAA"),
            Some(LineProblem::KeyNotBase64)
        );
        assert_eq!(
            problem(&format!("host ecdsa-sha2-nistp256 {ED25519}")),
            Some(LineProblem::KeyTypeMismatch)
        );
        assert_eq!(
            problem(&ed_line("|1|abc|def")),
            Some(LineProblem::MalformedHashedHost)
        );
        assert_eq!(problem(&ed_line("host")), None);
    }

    #[test]
    fn tabs_and_crlf_line_endings_are_accepted() {
        let kh = parse_kh(&format!(
            "# windows editor\r\n\tbackup.example.com\t ssh-ed25519\t{ED25519}\r\nx ssh-ed25519 {ED25519}\r\n"
        ));
        assert_eq!(kh.len(), 2);
        assert_eq!(
            ed(&kh, "backup.example.com", 22),
            Verdict::Trusted { line: 2 }
        );
        assert_eq!(ed(&kh, "x", 22), Verdict::Trusted { line: 3 });
    }

    #[test]
    fn rsa_key_reported_under_a_signature_algorithm_name_still_matches() {
        let kh = parse_kh(&format!(
            "rsa.example.com ssh-rsa {RSA}\nold.example.com ssh-rsa {RSA}\n"
        ));
        for key_type in ["ssh-rsa", "rsa-sha2-256", "rsa-sha2-512"] {
            assert_eq!(
                check(&kh, "rsa.example.com", 22, key_type, RSA),
                TRUSTED_1,
                "{key_type}"
            );
        }
        // The type is taken from the blob, so a mislabelled ed25519 key is still
        // compared as ed25519.
        let kh = parse_kh(&format!("h ssh-ed25519 {ED25519_OTHER}\n"));
        assert_eq!(
            check(&kh, "h", 22, "rsa-sha2-256", ED25519),
            Verdict::Changed {
                lines: vec![1],
                same_type: true
            }
        );
        // Only an unparseable blob falls back to the given (normalised) name.
        assert_eq!(
            kh.check("h", 22, "ssh-ed25519", &[0, 0]),
            Verdict::Changed {
                lines: vec![1],
                same_type: true
            }
        );
        assert_eq!(
            kh.check("h", 22, "rsa-sha2-512", &[0, 0]),
            Verdict::Changed {
                lines: vec![1],
                same_type: false
            }
        );
    }

    #[test]
    fn key_types_for_lists_each_matching_type_once_in_file_order() {
        let salt = [9u8; SHA1_LEN];
        let kh = parse_kh(&format!(
            "[127.0.0.1]:2222 ssh-rsa {RSA}\n\
             other.example.com ssh-ed25519 {ED25519}\n\
             {} ecdsa-sha2-nistp256 {ECDSA}\n\
             [127.0.0.1]:2222 ssh-rsa {RSA}\n\
             [127.0.0.1]:* ssh-ed25519 {ED25519_OTHER}\n\
             127.0.0.1 ssh-ed25519 {ED25519}\n",
            hashed_field(&salt, "[127.0.0.1]:2222"),
        ));
        assert_eq!(
            kh.key_types_for("127.0.0.1", 2222),
            ["ssh-rsa", "ecdsa-sha2-nistp256", "ssh-ed25519"]
        );
        // Port 22 is looked up bare; another port matches only the wildcard line.
        assert_eq!(kh.key_types_for("127.0.0.1", 22), ["ssh-ed25519"]);
        assert_eq!(kh.key_types_for("127.0.0.1", 2223), ["ssh-ed25519"]);
        assert!(kh.key_types_for("backup.example.com", 22).is_empty());
        // Host names compare case-insensitively, as in `check`.
        assert_eq!(kh.key_types_for("OTHER.example.com", 22), ["ssh-ed25519"]);
    }

    #[test]
    fn key_types_for_leaves_out_revoked_and_vetoed_keys() {
        let kh = parse_kh(&format!(
            "@revoked backup.example.com ssh-rsa {RSA}\n\
             backup.example.com ecdsa-sha2-nistp256 {ECDSA}\n\
             @revoked * ecdsa-sha2-nistp256 {ECDSA}\n\
             !backup.example.com,*.example.com ssh-ed25519 {ED25519}\n\
             *.example.com ssh-ed25519 {ED25519_OTHER}\n\
             backup.example.com ssh-future@example.com {}\n",
            unknown_type_b64()
        ));
        // RSA only on a @revoked line; the ECDSA key is revoked on line 3; the
        // first ed25519 line is vetoed by its negated pattern. A type this
        // module does not know is still reported: the caller decides.
        assert_eq!(
            kh.key_types_for("backup.example.com", 22),
            ["ssh-ed25519", "ssh-future@example.com"]
        );
        assert_eq!(kh.key_types_for("www.example.com", 22), ["ssh-ed25519"]);
    }

    #[test]
    fn fingerprints_equal_what_ssh_keygen_prints() {
        assert_eq!(sha256_fingerprint(&blob(ED25519)), ED25519_FP);
        assert_eq!(sha256_fingerprint(&blob(ED25519_OTHER)), ED25519_OTHER_FP);
        assert_eq!(sha256_fingerprint(&blob(ECDSA)), ECDSA_FP);
        assert_eq!(sha256_fingerprint(&blob(RSA)), RSA_FP);
    }

    #[test]
    fn parse_sha256_fingerprint_accepts_ssh_keygen_output() {
        for fp in [ED25519_FP, ECDSA_FP, RSA_FP] {
            assert_eq!(parse_sha256_fingerprint(fp).as_deref(), Ok(fp));
        }
    }

    #[test]
    fn parse_sha256_fingerprint_rejects_malformed_values() {
        let body = ED25519_FP.strip_prefix("SHA256:").unwrap();
        let bad = [
            // wrong or missing prefix
            format!("sha256:{body}"),
            format!("MD5:{body}"),
            body.to_owned(),
            "MD5:16:27:ac:a5:76:28:2d:36:63:1b:56:4d:eb:df:a6:48".to_owned(),
            // wrong length
            "SHA256:".to_owned(),
            format!("SHA256:{}", &body[..42]),
            format!("SHA256:{body}A"),
            format!("SHA256:{body}="),
            format!(" {ED25519_FP}"),
            // bad base64: invalid characters, URL-safe alphabet, non-zero trailing bits
            format!("SHA256:{}!", &body[..42]),
            format!("SHA256:{}_", &body[..42]),
            format!("SHA256:{}R", &body[..42]),
        ];
        for s in &bad {
            let err = parse_sha256_fingerprint(s).expect_err(s);
            assert!(err.contains("ssh-keygen"), "{err}");
        }
        assert!(parse_sha256_fingerprint(&format!("SHA256:{body}="))
            .unwrap_err()
            .contains("padding"));
    }

    #[test]
    fn load_reads_a_file_and_names_the_path_when_it_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        // A non-UTF-8 byte in a comment does not spoil the file.
        let mut bytes = b"# caf\xe9\n".to_vec();
        bytes.extend_from_slice(format!("backup.example.com ssh-ed25519 {ED25519}\n").as_bytes());
        std::fs::write(&path, bytes).unwrap();
        let kh = KnownHosts::load(&path).unwrap();
        assert_eq!(kh.path(), path);
        assert_eq!(
            ed(&kh, "backup.example.com", 22),
            Verdict::Trusted { line: 2 }
        );

        let missing = dir.path().join("missing");
        let err = KnownHosts::load(&missing).unwrap_err();
        assert!(matches!(&err, KnownHostsError::Read { path, .. } if *path == missing));
        let msg = err.to_string();
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(msg.contains("agent's user may read it"), "{msg}");
    }

    /// Collects formatted log output for one test.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn warnings_name_path_and_line_but_never_key_material() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        // Garbled lines that put key material into every field, plus the
        // unsupported @cert-authority.
        let text = format!(
            "ssh-ed25519 {ED25519}\n{ED25519} {ECDSA}\nh ssh-rsa {ED25519}\n\
             @{ED25519} h ssh-ed25519 {ED25519}\n|1|{ED25519}|x ssh-ed25519 {ED25519}\n\
             @cert-authority h ssh-ed25519 {ED25519}\n"
        );
        tracing::subscriber::with_default(subscriber, || {
            parse_kh(&text);
        });
        let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let tokens: Vec<&str> = logs.split_whitespace().collect();
        for line in 1..=6 {
            let want = format!("line={line}");
            assert!(tokens.contains(&want.as_str()), "{want}: {logs}");
        }
        assert_eq!(logs.matches("/test/known_hosts").count(), 7, "{logs}");
        assert!(logs.contains("no usable host key lines"), "{logs}");
        for secret in [ED25519, ECDSA, &ED25519[20..40], &ECDSA[40..60]] {
            assert!(!logs.contains(secret), "key material in logs: {logs}");
        }
    }
}
