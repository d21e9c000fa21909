//! An HTTP/1.1 relay on loopback that loses one reply: it forwards every
//! request to the target and every answer back, except the answer to the
//! first request a rule picks. That request reaches the server, which
//! carries it out and answers; the relay reads the whole answer and closes
//! the client's connection without passing it on, as when a connection
//! dies after the server acted. Plain HTTP only (the S3 tests talk to
//! Garage over `http://`): it has to read the requests to pick one.
//!
//! Each client connection gets its own connection to the target; requests
//! on it are taken one at a time (the agent's client never pipelines).
//! Dropping the relay stops it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Picks the request whose answer is lost, by method and request target
/// (path and query, as sent).
pub type Rule = Box<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// A running relay; stopped on drop.
pub struct HttpReplyDropper {
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    dropped: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
    _thread: std::thread::JoinHandle<()>,
}

impl HttpReplyDropper {
    /// Listens on a free loopback port and relays to `target`, losing the
    /// answer to the first request `rule` picks.
    pub fn start(target: SocketAddr, rule: Rule) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("relay address");
        let dropped: Arc<Mutex<Option<String>>> = Arc::default();
        let stop = CancellationToken::new();
        let (d, s) = (dropped.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("relay runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                let rule = Arc::new(rule);
                let fired = Arc::new(AtomicBool::new(false));
                loop {
                    let (client, _) = tokio::select! {
                        _ = s.cancelled() => break,
                        a = listener.accept() => match a {
                            Ok(a) => a,
                            Err(_) => continue,
                        },
                    };
                    let (rule, fired, d, s) = (rule.clone(), fired.clone(), d.clone(), s.clone());
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = s.cancelled() => {}
                            _ = relay(client, target, &rule, &fired, &d) => {}
                        }
                    });
                }
            });
        });
        Self {
            addr,
            dropped,
            stop,
            _thread: thread,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The request line whose answer was lost, once it was.
    pub fn dropped(&self) -> Option<String> {
        self.dropped.lock().unwrap().clone()
    }
}

impl Drop for HttpReplyDropper {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One HTTP message's head: its lines up to the blank one, as read.
async fn read_head(r: &mut BufReader<impl AsyncReadExt + Unpin>) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line).await.ok()? == 0 {
            return None;
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" || line == b"\n" {
            return Some(head);
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads a message body framed by `head` (`content-length` or chunked)
/// into `out`; `no_body` for answers to HEAD and 1xx/204/304.
async fn read_body(
    r: &mut BufReader<impl AsyncReadExt + Unpin>,
    head: &str,
    no_body: bool,
    out: &mut Vec<u8>,
) -> Option<()> {
    if no_body {
        return Some(());
    }
    if header(head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size_line = Vec::new();
            r.read_until(b'\n', &mut size_line).await.ok()?;
            out.extend_from_slice(&size_line);
            let text = String::from_utf8_lossy(&size_line);
            let size = usize::from_str_radix(text.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0u8; size + 2];
            r.read_exact(&mut chunk).await.ok()?;
            out.extend_from_slice(&chunk);
            if size == 0 {
                return Some(());
            }
        }
    }
    let len: usize = header(head, "content-length").map_or(Some(0), |v| v.parse().ok())?;
    let start = out.len();
    out.resize(start + len, 0);
    r.read_exact(&mut out[start..]).await.ok()?;
    Some(())
}

async fn relay(
    client: TcpStream,
    target: SocketAddr,
    rule: &Rule,
    fired: &AtomicBool,
    dropped: &Mutex<Option<String>>,
) -> Option<()> {
    let upstream = TcpStream::connect(target).await.ok()?;
    let (cr, mut cw) = client.into_split();
    let (ur, mut uw) = upstream.into_split();
    let (mut cr, mut ur) = (BufReader::new(cr), BufReader::new(ur));
    loop {
        let mut request = read_head(&mut cr).await?;
        let head = String::from_utf8_lossy(&request).into_owned();
        let request_line = head.lines().next().unwrap_or_default().to_string();
        let mut parts = request_line.split(' ');
        let (method, target_path) = (parts.next()?, parts.next()?);
        read_body(&mut cr, &head, false, &mut request).await?;
        let doomed = rule(method, target_path) && !fired.swap(true, Ordering::SeqCst);
        uw.write_all(&request).await.ok()?;
        let mut answer = read_head(&mut ur).await?;
        let answer_head = String::from_utf8_lossy(&answer).into_owned();
        let status: u16 = answer_head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let no_body = method == "HEAD" || status < 200 || status == 204 || status == 304;
        read_body(&mut ur, &answer_head, no_body, &mut answer).await?;
        if doomed {
            *dropped.lock().unwrap() = Some(format!(
                "{request_line} (the server answered {})",
                answer_head.lines().next().unwrap_or_default()
            ));
            // The server acted and answered; the client hears nothing.
            return None;
        }
        cw.write_all(&answer).await.ok()?;
    }
}
