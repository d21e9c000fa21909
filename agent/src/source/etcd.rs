//! Talking to the local etcd member: who it is, and a verified snapshot stream.
//!
//! The snapshot comes from `Maintenance.Snapshot`. etcd sends the bbolt file in
//! chunks and then one more message holding the SHA-256 of everything before it.
//! [`SnapshotVerifier`] checks that digest as the bytes pass, so the agent never
//! holds a snapshot in memory and never ships one it has not checked.

use std::error::Error as _;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Certificate, Client, Identity, TlsOptions};
use sha2::{Digest, Sha256};
use tonic::transport::Endpoint;
use url::Url;

use crate::config::{EtcdConfig, EtcdTls};
use crate::error_chain::chain;

/// Length of the SHA-256 digest etcd appends to a snapshot.
pub const DIGEST_LEN: usize = 32;

/// Why talking to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A TLS file named in the config could not be read.
    #[error("cannot read {field} {path}: {source}")]
    TlsFile {
        /// The config field naming the file.
        field: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// No TCP connection, TLS handshake failure or an early gRPC failure.
    #[error("cannot connect to etcd at {endpoint}: {detail}{hint}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The cause, with its chain.
        detail: String,
        /// What to do, when we can tell.
        hint: String,
        /// A TLS problem: retrying will not help until a person fixes it.
        tls: bool,
    },
    /// The member did not answer in time.
    #[error("etcd at {endpoint} did not answer within {after:?} (etcd.dial_timeout); check that the member is running and reachable from this node")]
    DialTimeout {
        /// The endpoint.
        endpoint: String,
        /// The configured dial timeout.
        after: Duration,
    },
    /// A call failed after connecting.
    #[error("etcd at {endpoint}: {call} failed: {detail}")]
    Call {
        /// The endpoint.
        endpoint: String,
        /// The RPC, e.g. `Maintenance.Status`.
        call: &'static str,
        /// The cause, with its chain.
        detail: String,
    },
    /// The snapshot stream sent nothing for too long.
    #[error("snapshot stream from {endpoint} sent nothing for {after:?} (etcd.stall_timeout) after {received} bytes")]
    Stalled {
        /// The endpoint.
        endpoint: String,
        /// The configured stall timeout.
        after: Duration,
        /// Bytes received before the stall.
        received: u64,
    },
}

impl EtcdError {
    /// Whether trying again later (with a fresh connection) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            EtcdError::TlsFile { .. } => false,
            EtcdError::Connect { tls, .. } => !tls,
            EtcdError::DialTimeout { .. } | EtcdError::Call { .. } | EtcdError::Stalled { .. } => {
                true
            }
        }
    }
}

/// A snapshot that does not carry a valid etcd digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The stream length is not a bbolt file (a multiple of 512) plus a 32-byte digest.
    #[error("snapshot stream has {received} bytes, which is not a database plus etcd's 32-byte SHA-256 trailer (expected size % 512 == 32); the digest is missing or the stream was cut short")]
    BadLength {
        /// Bytes received in total.
        received: u64,
    },
    /// The digest etcd sent does not match the bytes received.
    #[error("snapshot digest mismatch: etcd sent sha256 {expected}, the {size} bytes received hash to {actual}; the snapshot was corrupted in transit")]
    DigestMismatch {
        /// What etcd sent.
        expected: String,
        /// What the received bytes hash to.
        actual: String,
        /// Size of the database part.
        size: u64,
    },
}

/// What etcd said about the member the snapshot comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// The endpoint asked.
    pub endpoint: String,
    /// etcd cluster ID.
    pub cluster_id: u64,
    /// etcd member ID.
    pub member_id: u64,
    /// Server version.
    pub version: String,
    /// Store revision in the status response header.
    pub revision: i64,
    /// Database size in bytes.
    pub db_size: i64,
    /// Member ID of the raft leader as this member sees it.
    pub leader: u64,
}

/// A source of etcd snapshots: the real member, or a double in unit tests.
#[async_trait]
pub trait SnapshotSource: Send {
    /// Asks the member who it is (a `Maintenance.Status` call).
    ///
    /// # Errors
    /// Connection, TLS, timeout and RPC failures.
    async fn member_info(&mut self) -> Result<MemberInfo, EtcdError>;

    /// Starts a snapshot stream.
    ///
    /// # Errors
    /// Connection and RPC failures.
    async fn snapshot(&mut self) -> Result<Box<dyn SnapshotStream>, EtcdError>;

    /// Keys in the keyspace at `revision`, when the member can still tell
    /// (`None` when that revision is compacted or the source cannot count).
    ///
    /// # Errors
    /// Connection and RPC failures.
    async fn count_keys_at(&mut self, revision: i64) -> Result<Option<u64>, EtcdError> {
        let _ = revision;
        Ok(None)
    }
}

/// The raw bytes of a snapshot, chunk by chunk, digest trailer included.
#[async_trait]
pub trait SnapshotStream: Send {
    /// The next chunk, or `None` at the end of the stream.
    ///
    /// # Errors
    /// Stream failures and stalls.
    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, EtcdError>;
}

/// The local etcd member, over gRPC.
pub struct EtcdMember {
    endpoint: Url,
    client: Client,
    dial_timeout: Duration,
    stall_timeout: Duration,
}

impl std::fmt::Debug for EtcdMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdMember")
            .field("endpoint", &self.endpoint.as_str())
            .finish_non_exhaustive()
    }
}

impl EtcdMember {
    /// Connects to `endpoints[0]`, the local member, within `dial_timeout`.
    ///
    /// The connection is made eagerly, so a refused connection or a failed TLS
    /// handshake is reported here with its cause rather than as a timeout later.
    ///
    /// # Errors
    /// [`EtcdError::TlsFile`], [`EtcdError::Connect`], [`EtcdError::DialTimeout`].
    pub async fn connect(config: &EtcdConfig) -> Result<Self, EtcdError> {
        let url = config.endpoints[0].clone();
        let endpoint_text = endpoint_string(&url);
        let mut endpoint = Endpoint::from_shared(endpoint_text.clone())
            .map_err(|e| connect_error(&endpoint_text, &e))?
            .connect_timeout(config.dial_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            // HTTP/2 windows large enough that etcd keeps streaming while we
            // write, small enough to bound what waits in memory (BENCHMARKS.md).
            .initial_stream_window_size(Some(2 << 20))
            .initial_connection_window_size(Some(4 << 20));
        if let Some(tls) = &config.tls {
            endpoint = endpoint
                .tls_config(tls_options(tls)?)
                .map_err(|e| connect_error(&endpoint_text, &e))?;
        }
        let channel = tokio::time::timeout(config.dial_timeout, endpoint.connect())
            .await
            .map_err(|_| EtcdError::DialTimeout {
                endpoint: endpoint_text.clone(),
                after: config.dial_timeout,
            })?
            .map_err(|e| connect_error(&endpoint_text, &e))?;
        let client = Client::from_channel(etcd_client::Channel::Tonic(channel), None)
            .await
            .map_err(|e| EtcdError::Connect {
                endpoint: endpoint_text.clone(),
                detail: etcd_error_detail(&e),
                hint: String::new(),
                tls: false,
            })?;
        Ok(Self {
            endpoint: url,
            client,
            dial_timeout: config.dial_timeout,
            stall_timeout: config.stall_timeout,
        })
    }

    fn endpoint_str(&self) -> String {
        endpoint_string(&self.endpoint)
    }
}

/// `https://host:port` without the trailing slash `Url` adds.
fn endpoint_string(url: &Url) -> String {
    url.as_str().trim_end_matches('/').to_string()
}

fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, EtcdError> {
    let read = |field: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| EtcdError::TlsFile {
            field,
            path: path.to_path_buf(),
            source,
        })
    };
    let mut options = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(read("etcd.ca_file", &tls.ca_file)?));
    if let Some((cert, key)) = &tls.client {
        options = options.identity(Identity::from_pem(
            read("etcd.cert_file", cert)?,
            read("etcd.key_file", key)?,
        ));
    }
    Ok(options)
}

fn etcd_error_detail(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::TransportError(t) => chain(t),
        etcd_client::Error::GRpcStatus(s) => {
            let mut text = format!("{:?}: {}", s.code(), s.message());
            if let Some(src) = s.source() {
                let more = chain(src);
                if !text.contains(&more) {
                    text.push_str(": ");
                    text.push_str(&more);
                }
            }
            text
        }
        other => other.to_string(),
    }
}

fn connect_error(endpoint: &str, e: &(dyn std::error::Error + 'static)) -> EtcdError {
    let detail = chain(e);
    let lower = detail.to_lowercase();
    let (hint, tls) = if lower.contains("certificate") || lower.contains("unknownissuer") {
        ("; the server's TLS certificate was not accepted: check that etcd.ca_file is the CA that signed etcd's serving certificate and that the endpoint's host is in its SANs", true)
    } else if lower.contains("handshake") || lower.contains("tls") || lower.contains("alert") {
        ("; the TLS handshake failed: check etcd.cert_file/etcd.key_file (etcd requires a client certificate its CA signed) and that the endpoint speaks https", true)
    } else if lower.contains("refused") {
        ("; nothing listens there: check that the etcd member on this node is running and that etcd.endpoints[0] is its client URL", false)
    } else {
        ("", false)
    };
    EtcdError::Connect {
        endpoint: endpoint.to_string(),
        detail,
        hint: hint.to_string(),
        tls,
    }
}

#[async_trait]
impl SnapshotSource for EtcdMember {
    async fn member_info(&mut self) -> Result<MemberInfo, EtcdError> {
        let endpoint = self.endpoint_str();
        let resp = tokio::time::timeout(self.dial_timeout, self.client.status())
            .await
            .map_err(|_| EtcdError::DialTimeout {
                endpoint: endpoint.clone(),
                after: self.dial_timeout,
            })?
            .map_err(|e| EtcdError::Call {
                endpoint: endpoint.clone(),
                call: "Maintenance.Status",
                detail: etcd_error_detail(&e),
            })?;
        let header = resp.header();
        Ok(MemberInfo {
            endpoint,
            cluster_id: header.map_or(0, |h| h.cluster_id()),
            member_id: header.map_or(0, |h| h.member_id()),
            version: resp.version().to_string(),
            revision: header.map_or(0, |h| h.revision()),
            db_size: resp.db_size(),
            leader: resp.leader(),
        })
    }

    async fn count_keys_at(&mut self, revision: i64) -> Result<Option<u64>, EtcdError> {
        let endpoint = self.endpoint_str();
        let options = etcd_client::GetOptions::new()
            .with_from_key()
            .with_count_only()
            .with_revision(revision)
            .with_serializable();
        let result =
            tokio::time::timeout(self.dial_timeout, self.client.get(vec![0u8], Some(options)))
                .await
                .map_err(|_| EtcdError::DialTimeout {
                    endpoint: endpoint.clone(),
                    after: self.dial_timeout,
                })?;
        match result {
            Ok(resp) => Ok(u64::try_from(resp.count()).ok()),
            // Compacted away already: not knowing is fine, it is not a failure.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted") => Ok(None),
            Err(e) => Err(EtcdError::Call {
                endpoint,
                call: "KV.Range",
                detail: etcd_error_detail(&e),
            }),
        }
    }

    async fn snapshot(&mut self) -> Result<Box<dyn SnapshotStream>, EtcdError> {
        let endpoint = self.endpoint_str();
        let stream = tokio::time::timeout(self.stall_timeout, self.client.snapshot())
            .await
            .map_err(|_| EtcdError::Stalled {
                endpoint: endpoint.clone(),
                after: self.stall_timeout,
                received: 0,
            })?
            .map_err(|e| EtcdError::Call {
                endpoint: endpoint.clone(),
                call: "Maintenance.Snapshot",
                detail: etcd_error_detail(&e),
            })?;
        Ok(Box::new(GrpcSnapshotStream {
            endpoint,
            stream,
            stall_timeout: self.stall_timeout,
            received: 0,
        }))
    }
}

struct GrpcSnapshotStream {
    endpoint: String,
    stream: etcd_client::SnapshotStreaming,
    stall_timeout: Duration,
    received: u64,
}

#[async_trait]
impl SnapshotStream for GrpcSnapshotStream {
    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, EtcdError> {
        // A data message can carry an empty blob; skip those rather than
        // handing empty chunks upstream.
        loop {
            let msg = tokio::time::timeout(self.stall_timeout, self.stream.message())
                .await
                .map_err(|_| EtcdError::Stalled {
                    endpoint: self.endpoint.clone(),
                    after: self.stall_timeout,
                    received: self.received,
                })?
                .map_err(|e| EtcdError::Call {
                    endpoint: self.endpoint.clone(),
                    call: "Maintenance.Snapshot",
                    detail: etcd_error_detail(&e),
                })?;
            match msg {
                None => return Ok(None),
                Some(resp) if resp.blob().is_empty() => continue,
                Some(resp) => {
                    self.received += resp.blob().len() as u64;
                    return Ok(Some(resp.blob().to_vec()));
                }
            }
        }
    }
}

/// Checks etcd's digest trailer as a snapshot streams past.
///
/// All but the last 32 bytes go into a SHA-256 of the database, which must
/// equal those last 32 bytes. The last 32 bytes are not known until the stream
/// ends, so they are held back. The SHA-256 of the whole stream (what the stored
/// file hashes to, for the manifest) is the database hash state continued with
/// the trailer, so each byte is hashed once. Memory use is 32 bytes plus one
/// hash state, whatever the snapshot's size.
#[derive(Debug, Clone, Default)]
pub struct SnapshotVerifier {
    body: Sha256,
    held: Vec<u8>,
    total: u64,
}

/// A snapshot whose digest checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSnapshot {
    /// Bytes in the stream, digest included: the stored file's size.
    pub size: u64,
    /// SHA-256 of the whole stream (the stored file), hex.
    pub file_sha256: String,
    /// The digest etcd sent: SHA-256 of the database part, hex.
    pub etcd_digest: String,
}

impl SnapshotVerifier {
    /// A verifier that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes seen so far.
    pub fn received(&self) -> u64 {
        self.total
    }

    /// Feeds the next bytes of the stream.
    pub fn update(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        let pending = self.held.len() + chunk.len();
        if pending <= DIGEST_LEN {
            self.held.extend_from_slice(chunk);
            return;
        }
        let release = pending - DIGEST_LEN;
        if release <= self.held.len() {
            self.body.update(&self.held[..release]);
            self.held.drain(..release);
            self.held.extend_from_slice(chunk);
        } else {
            self.body.update(&self.held);
            let from_chunk = release - self.held.len();
            self.body.update(&chunk[..from_chunk]);
            self.held.clear();
            self.held.extend_from_slice(&chunk[from_chunk..]);
        }
    }

    /// Checks the length and the trailer once the stream has ended.
    ///
    /// # Errors
    /// [`VerifyError::BadLength`] when the stream cannot be a bbolt file plus
    /// digest, [`VerifyError::DigestMismatch`] when the digest is wrong.
    pub fn finish(self) -> Result<VerifiedSnapshot, VerifyError> {
        if self.total < (DIGEST_LEN as u64) + 512 || self.total % 512 != DIGEST_LEN as u64 {
            return Err(VerifyError::BadLength {
                received: self.total,
            });
        }
        let mut file = self.body.clone();
        file.update(&self.held);
        let expected = hex::encode(&self.held);
        let actual = hex::encode(self.body.finalize());
        if expected != actual {
            return Err(VerifyError::DigestMismatch {
                expected,
                actual,
                size: self.total - DIGEST_LEN as u64,
            });
        }
        Ok(VerifiedSnapshot {
            size: self.total,
            file_sha256: hex::encode(file.finalize()),
            etcd_digest: expected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake database of `pages` 512-byte pages followed by its digest.
    fn stream(pages: usize) -> Vec<u8> {
        let mut db: Vec<u8> = (0..pages * 512).map(|i| (i * 7 % 251) as u8).collect();
        let digest = Sha256::digest(&db);
        db.extend_from_slice(&digest);
        db
    }

    fn verify_in_chunks(data: &[u8], chunk: usize) -> Result<VerifiedSnapshot, VerifyError> {
        let mut v = SnapshotVerifier::new();
        for c in data.chunks(chunk) {
            v.update(c);
        }
        assert_eq!(v.received(), data.len() as u64);
        v.finish()
    }

    #[test]
    fn good_stream_verifies_whatever_the_chunking() {
        let data = stream(9);
        let want_file = hex::encode(Sha256::digest(&data));
        for chunk in [1, 7, 31, 32, 33, 511, 512, 4096, data.len()] {
            let v = verify_in_chunks(&data, chunk).unwrap_or_else(|e| panic!("chunk {chunk}: {e}"));
            assert_eq!(v.size, data.len() as u64);
            assert_eq!(v.file_sha256, want_file);
            assert_eq!(v.etcd_digest, hex::encode(&data[data.len() - 32..]));
        }
    }

    #[test]
    fn digest_as_its_own_message_verifies() {
        let data = stream(4);
        let (db, digest) = data.split_at(data.len() - 32);
        let mut v = SnapshotVerifier::new();
        v.update(db);
        v.update(digest);
        assert!(v.finish().is_ok());
    }

    #[test]
    fn flipped_byte_anywhere_is_a_mismatch() {
        let data = stream(3);
        for pos in [0, 100, 512 * 3 - 1, 512 * 3, data.len() - 1] {
            let mut bad = data.clone();
            bad[pos] ^= 0x40;
            match verify_in_chunks(&bad, 100) {
                Err(VerifyError::DigestMismatch { size, .. }) => assert_eq!(size, 512 * 3),
                other => panic!("flip at {pos}: {other:?}"),
            }
        }
    }

    #[test]
    fn missing_or_cut_digest_is_a_bad_length() {
        let data = stream(3);
        for len in [0, 10, 512 * 3, data.len() - 1, data.len() - 32 + 1] {
            match verify_in_chunks(&data[..len], 64) {
                Err(VerifyError::BadLength { received }) => assert_eq!(received, len as u64),
                other => panic!("len {len}: {other:?}"),
            }
        }
    }
}
