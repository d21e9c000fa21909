//! A scripted HTTP server on a loopback port, for the answers a real store
//! cannot be made to give on demand (a 409 conflict, a skewed clock, a
//! reply lost after the request was carried out), and the tests that use
//! it for the S3 destination's conditional creates.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{RetryConfig, S3Config};

/// What the server does with one request.
pub(super) enum Script {
    /// Writes these bytes (a whole HTTP answer), then closes.
    Raw(String),
    /// Closes the connection without answering: the reply is lost.
    Close,
    /// Writes `head`, then `chunks` one by one `every` apart, then closes.
    Trickle {
        head: String,
        chunks: Vec<String>,
        every: Duration,
    },
}

/// An answer with `status`, extra header lines and `body`.
pub(super) fn answer(status: &str, headers: &[&str], body: &str) -> Script {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    Script::Raw(format!("{head}\r\n{body}"))
}

/// An S3 error answer.
pub(super) fn s3_error(status: &str, code: &str, headers: &[&str]) -> Script {
    answer(
        status,
        headers,
        &format!("<Error><Code>{code}</Code><Message>scripted</Message></Error>"),
    )
}

/// The requests the server saw: each one's head (request line and headers).
pub(super) type Seen = Arc<Mutex<Vec<String>>>;

/// Starts the server; `script` gets each request's index and head. Returns
/// the endpoint URL and the requests seen.
pub(super) async fn serve(
    script: impl Fn(usize, &str) -> Script + Send + Sync + 'static,
) -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let log = log.clone();
            let script = script.clone();
            tokio::spawn(async move {
                let Some(head) = read_request(&mut sock).await else {
                    return;
                };
                let n = {
                    let mut seen = log.lock().unwrap();
                    seen.push(head.clone());
                    seen.len() - 1
                };
                match script(n, &head) {
                    Script::Raw(bytes) => {
                        let _ = sock.write_all(bytes.as_bytes()).await;
                    }
                    Script::Close => {}
                    Script::Trickle {
                        head,
                        chunks,
                        every,
                    } => {
                        let _ = sock.write_all(head.as_bytes()).await;
                        for c in chunks {
                            tokio::time::sleep(every).await;
                            if sock.write_all(c.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    (url, seen)
}

/// Reads one request (head and `content-length` body); its head.
async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < end + length {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(head)
}

/// A config for the store at `url`, with credential files in `dir`.
pub(super) fn config(dir: &std::path::Path, url: &str, attempts: u32) -> S3Config {
    let id = dir.join("id");
    let secret = dir.join("secret");
    std::fs::write(&id, "GKfake").unwrap();
    std::fs::write(&secret, "fake-secret").unwrap();
    S3Config {
        endpoint: url.parse().unwrap(),
        region: "garage".into(),
        bucket: "b".into(),
        prefix: None,
        path_style: true,
        access_key_id_file: id,
        secret_access_key_file: secret,
        session_token_file: None,
        storage_class: None,
        ca_file: None,
        allow_plaintext_http: true,
        retry: RetryConfig {
            attempts,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
        },
    }
}

/// How many of the requests seen start with `method`.
pub(super) fn count(seen: &Seen, method: &str) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|h| h.starts_with(&format!("{method} ")))
        .count()
}

mod publish {
    use super::*;
    use crate::store::destination::s3::{Pending, S3Dir};
    use crate::store::destination::DestinationError;
    use bytes::Bytes;

    const PART_ETAG: &str = "\"5d41402abc4b2a76b9719d911017c592\"";

    fn multipart() -> Pending {
        Pending::Multipart {
            upload_id: "u1".into(),
            parts: vec![(1, PART_ETAG.into())],
            size: 5,
        }
    }

    /// The ETag of an object completed from the one part above.
    fn completed_etag() -> String {
        super::super::multipart_etag(&[(1, PART_ETAG.to_string())]).unwrap()
    }

    /// A store that honours If-None-Match: the first create (`method`) is
    /// carried out but its reply lost; a second one would be answered 412.
    /// A HEAD after the create finds the object with `etag`.
    async fn reply_lost_then(
        method: &'static str,
        etag: String,
        size: usize,
    ) -> (S3Dir, Seen, tempfile::TempDir) {
        let created = Arc::new(Mutex::new(false));
        let (url, seen) = serve(move |_, head| {
            let mut created = created.lock().unwrap();
            if head.starts_with("HEAD ") {
                if *created {
                    Script::Raw(format!(
                        "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {size}\r\netag: \"{etag}\"\r\n\r\n"
                    ))
                } else {
                    answer("404 Not Found", &[], "")
                }
            } else if head.starts_with(method) {
                if *created {
                    s3_error("412 Precondition Failed", "PreconditionFailed", &[])
                } else {
                    *created = true;
                    Script::Close
                }
            } else {
                answer("204 No Content", &[], "")
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let dest = S3Dir::new(&config(dir.path(), &url, 4)).unwrap();
        (dest, seen, dir)
    }

    #[tokio::test]
    async fn a_completion_whose_reply_is_lost_is_found_by_its_etag_never_sent_again() {
        let (dest, seen, _dir) = reply_lost_then("POST ", completed_etag(), 5).await;
        let result = dest.publish("c/n/t/snapshot.db", multipart()).await;
        assert_eq!(count(&seen, "POST"), 1, "{:?}", seen.lock().unwrap());
        result.unwrap();
    }

    #[tokio::test]
    async fn a_put_whose_reply_is_lost_is_found_by_its_md5_never_sent_again() {
        let body = Bytes::from_static(b"hello");
        let etag = format!("{:x}", md5::compute(&body));
        let (dest, seen, _dir) = reply_lost_then("PUT ", etag, 5).await;
        let result = dest.publish("c/n/t/res.tar.gz", Pending::Small(body)).await;
        assert_eq!(count(&seen, "PUT"), 1, "{:?}", seen.lock().unwrap());
        result.unwrap();
    }

    #[tokio::test]
    async fn another_object_found_after_a_lost_reply_is_someone_elses() {
        let (dest, seen, _dir) = reply_lost_then("POST ", "0123-1".into(), 5).await;
        let err = dest
            .publish("c/n/t/snapshot.db", multipart())
            .await
            .unwrap_err();
        assert!(
            matches!(err, DestinationError::AlreadyExists { .. }),
            "{err}"
        );
        assert_eq!(count(&seen, "POST"), 1);
    }

    #[tokio::test]
    async fn a_create_not_carried_out_is_sent_again_after_a_look() {
        // The first completion is dropped before the store acts on it.
        let (url, seen) = serve(move |n, head| {
            if head.starts_with("HEAD ") {
                answer("404 Not Found", &[], "")
            } else if n == 1 {
                Script::Close
            } else {
                answer(
                    "200 OK",
                    &[],
                    "<CompleteMultipartUploadResult><ETag>x</ETag></CompleteMultipartUploadResult>",
                )
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let dest = S3Dir::new(&config(dir.path(), &url, 4)).unwrap();
        dest.publish("c/n/t/snapshot.db", multipart())
            .await
            .unwrap();
        assert_eq!(count(&seen, "POST"), 2);
        // HEAD before, HEAD after the lost reply.
        assert_eq!(count(&seen, "HEAD"), 2);
    }

    #[tokio::test]
    async fn a_create_that_cannot_be_looked_at_stays_ambiguous() {
        let (url, _seen) = serve(move |n, head| {
            if n == 0 {
                answer("404 Not Found", &[], "")
            } else if head.starts_with("POST ") {
                Script::Close
            } else {
                // Every HEAD after the completion: the store is gone.
                answer("503 Service Unavailable", &[], "")
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let dest = S3Dir::new(&config(dir.path(), &url, 2)).unwrap();
        let err = dest
            .publish("c/n/t/snapshot.db", multipart())
            .await
            .unwrap_err();
        assert!(!err.is_refusal(), "{err}");
    }
}
