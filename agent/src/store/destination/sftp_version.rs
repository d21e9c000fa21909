//! The extensions an SFTP server offers, read from its first packet as it
//! passes by.
//!
//! russh-sftp learns from the server's `SSH_FXP_VERSION` packet whether it
//! offers `fsync@openssh.com`, keeps the answer private, and when the answer
//! is no its flush quietly skips the sync. The agent has to know which of the
//! two happens, to refuse (or record) sets that a crash of the server may
//! lose. [`Sniffer`] wraps the channel stream handed to russh-sftp, passes
//! every byte through unchanged, and parses the first packet the server sends:
//!
//! ```text
//! uint32 length, byte 2 (SSH_FXP_VERSION), uint32 version,
//! then until the end of the packet: string name, string data (extension pairs)
//! ```

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `SSH_FXP_VERSION`.
const FXP_VERSION: u8 = 2;
/// A VERSION packet longer than this is not buffered: no real server sends
/// one anywhere near it (OpenSSH's is under 400 bytes).
const MAX_VERSION_PACKET: usize = 64 * 1024;

/// What the server's VERSION packet said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ServerVersion {
    /// The SFTP protocol version (3 for every server the agent talks to).
    pub version: u32,
    /// Extension names and their data (a version string such as `"1"`), in
    /// the order the server sent them.
    pub extensions: Vec<(String, Vec<u8>)>,
}

impl ServerVersion {
    /// Whether the server offers extension `name` at exactly `version`, the
    /// test russh-sftp applies before it uses one.
    pub fn offers(&self, name: &str, version: &str) -> bool {
        self.extensions
            .iter()
            .any(|(n, v)| n == name && v.as_slice() == version.as_bytes())
    }

    /// Parses the body of a packet (after its length field).
    fn parse(packet: &[u8]) -> Result<Self, String> {
        let mut rest = packet;
        let kind = take(&mut rest, 1).ok_or("empty packet")?[0];
        if kind != FXP_VERSION {
            return Err(format!(
                "the server's first SFTP packet has type {kind}, not SSH_FXP_VERSION ({FXP_VERSION})"
            ));
        }
        let version = take_u32(&mut rest).ok_or("VERSION packet without a version")?;
        let mut extensions = Vec::new();
        while !rest.is_empty() {
            let name = take_string(&mut rest).ok_or("truncated extension name")?;
            let data = take_string(&mut rest).ok_or("truncated extension data")?;
            extensions.push((String::from_utf8_lossy(name).into_owned(), data.to_vec()));
        }
        Ok(Self {
            version,
            extensions,
        })
    }
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if rest.len() < n {
        return None;
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Some(head)
}

fn take_u32(rest: &mut &[u8]) -> Option<u32> {
    let b = take(rest, 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn take_string<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = take_u32(rest)? as usize;
    take(rest, len)
}

/// Where the parsed VERSION packet (or why it could not be parsed) lands.
pub(super) type Seen = Arc<OnceLock<Result<ServerVersion, String>>>;

/// A stream that records the server's first SFTP packet and otherwise does
/// nothing to the bytes in either direction.
pub(super) struct Sniffer<S> {
    inner: S,
    /// The first packet so far; `None` once it is parsed (or given up on).
    pending: Option<Vec<u8>>,
    seen: Seen,
}

impl<S> Sniffer<S> {
    /// Wraps `inner`; the VERSION packet is stored in `seen` once it has
    /// passed completely.
    pub fn new(inner: S, seen: Seen) -> Self {
        Self {
            inner,
            pending: Some(Vec::new()),
            seen,
        }
    }

    fn observe(&mut self, mut bytes: &[u8]) {
        let Some(buf) = self.pending.as_mut() else {
            return;
        };
        if buf.len() < 4 {
            let n = (4 - buf.len()).min(bytes.len());
            buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if buf.len() < 4 {
                return;
            }
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > MAX_VERSION_PACKET {
            self.finish(Err(format!(
                "the server's first SFTP packet claims {len} bytes; not a VERSION packet"
            )));
            return;
        }
        let n = (4 + len - buf.len()).min(bytes.len());
        buf.extend_from_slice(&bytes[..n]);
        if buf.len() == 4 + len {
            let parsed = ServerVersion::parse(&buf[4..]);
            self.finish(parsed);
        }
    }

    fn finish(&mut self, result: Result<ServerVersion, String>) {
        self.pending = None;
        // Only one first packet: a second set is impossible, so ignore it.
        let _ = self.seen.set(result);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniffer<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            if self.pending.is_some() {
                let new = buf.filled()[before..].to_vec();
                self.observe(&new);
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniffer<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s);
    }

    /// A VERSION packet as a server sends it, length field included.
    fn version_packet(version: u32, extensions: &[(&str, &str)]) -> Vec<u8> {
        let mut body = vec![FXP_VERSION];
        body.extend_from_slice(&version.to_be_bytes());
        for (name, data) in extensions {
            string(&mut body, name.as_bytes());
            string(&mut body, data.as_bytes());
        }
        let mut packet = (body.len() as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        packet
    }

    /// Reads everything `server` sends through a sniffer, `chunk` bytes at a
    /// time at most, and returns what the reader got and what was seen.
    async fn sniff(
        server: Vec<u8>,
        chunk: usize,
    ) -> (Vec<u8>, Option<Result<ServerVersion, String>>) {
        let (mut far, near) = tokio::io::duplex(chunk);
        let seen: Seen = Arc::default();
        let mut sniffer = Sniffer::new(near, seen.clone());
        let writer = tokio::spawn(async move {
            far.write_all(&server).await.unwrap();
            far.shutdown().await.unwrap();
            far
        });
        let mut got = Vec::new();
        sniffer.read_to_end(&mut got).await.unwrap();
        drop(writer.await.unwrap());
        (got, seen.get().cloned())
    }

    const OPENSSH: [(&str, &str); 5] = [
        ("posix-rename@openssh.com", "1"),
        ("statvfs@openssh.com", "2"),
        ("fstatvfs@openssh.com", "2"),
        ("hardlink@openssh.com", "1"),
        ("fsync@openssh.com", "1"),
    ];

    #[tokio::test]
    async fn the_extensions_of_the_first_packet_are_recorded_and_every_byte_passes() {
        let mut stream = version_packet(3, &OPENSSH);
        // What follows the VERSION packet is not parsed, only passed on.
        stream.extend_from_slice(&[0, 0, 0, 5, 101, 0, 0, 0, 1]);
        for chunk in [1, 3, 7, 4096] {
            let (got, seen) = sniff(stream.clone(), chunk).await;
            assert_eq!(got, stream, "chunk {chunk}");
            let v = seen.expect("seen").expect("parsed");
            assert_eq!(v.version, 3);
            assert_eq!(v.extensions.len(), 5);
            assert!(v.offers("fsync@openssh.com", "1"), "chunk {chunk}");
            assert!(v.offers("statvfs@openssh.com", "2"));
            // The version must match, as russh-sftp requires before it uses one.
            assert!(!v.offers("statvfs@openssh.com", "1"));
        }
    }

    #[tokio::test]
    async fn a_server_without_fsync_is_seen_as_such() {
        // ProFTPD with `SFTPExtensions -fsync`.
        let packet = version_packet(
            3,
            &[
                ("versions", "2,3,4,5,6"),
                ("posix-rename@openssh.com", "1"),
                ("statvfs@openssh.com", "2"),
                ("home-directory", "1"),
            ],
        );
        let (_, seen) = sniff(packet, 5).await;
        let v = seen.unwrap().unwrap();
        assert!(!v.offers("fsync@openssh.com", "1"));
        assert!(v.offers("statvfs@openssh.com", "2"));

        let (_, seen) = sniff(version_packet(3, &[]), 64).await;
        assert_eq!(
            seen.unwrap().unwrap(),
            ServerVersion {
                version: 3,
                extensions: Vec::new()
            }
        );
    }

    #[tokio::test]
    async fn malformed_first_packets_are_reported_not_guessed_at() {
        // Not a VERSION packet (SSH_FXP_STATUS).
        let mut status = version_packet(3, &[]);
        status[4] = 101;
        let (got, seen) = sniff(status.clone(), 64).await;
        assert_eq!(got, status);
        assert!(seen.unwrap().unwrap_err().contains("type 101"));

        // An extension whose data is cut short inside the packet.
        let mut cut = version_packet(3, &[("fsync@openssh.com", "1")]);
        cut.pop();
        let len = (cut.len() - 4) as u32;
        cut[..4].copy_from_slice(&len.to_be_bytes());
        let (_, seen) = sniff(cut, 64).await;
        assert!(seen.unwrap().unwrap_err().contains("truncated"));

        // An absurd length is not buffered.
        let (got, seen) = sniff(vec![0x7f, 0xff, 0xff, 0xff, 2, 0, 0], 64).await;
        assert_eq!(got.len(), 7);
        assert!(seen.unwrap().unwrap_err().contains("claims"));

        // A stream that ends early leaves nothing seen.
        let mut short = version_packet(3, &OPENSSH);
        short.truncate(20);
        let (_, seen) = sniff(short, 64).await;
        assert!(seen.is_none());
    }
}
