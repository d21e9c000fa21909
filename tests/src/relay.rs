//! A TCP relay on loopback that can slow a connection down: a rate cap and a
//! one-way delay per direction, for making "mid-stream" last long enough to
//! act in (fault tests) and for emulating a WAN link (benchmarks).
//!
//! [`Relay::start`] listens on `127.0.0.1:<free port>` and forwards every
//! connection it accepts to a target address, on its own thread and tokio
//! runtime (so sync and async tests alike can use it); dropping the relay
//! stops it and closes every relayed connection.
//!
//! Per direction (`up`: client to target, `down`: target to client):
//! - `rate`: at most this many bytes per second leave the relay (a pacing
//!   cap; bursts up to one [`CHUNK`]). `None`: as fast as the peers go.
//! - `delay`: every byte leaves the relay this long after it arrived, in
//!   addition to the rate's pacing. Zero: no delay.
//!
//! A bounded number of bytes per direction ([`in_flight_bytes`]) is held
//! between reading and writing, so a slow side pushes back on the fast one
//! (TCP flow control still works end to end) while a delayed link stays full:
//! a rate-capped link holds twice what it carries in one delay (at least
//! [`MIN_IN_FLIGHT_BYTES`], so a capped link without delay still pushes back
//! after a few MiB, as the fault tests need), an uncapped delayed link
//! [`IN_FLIGHT_BYTES`] (64 MiB keeps a 40 ms one-way link full up to
//! 1.6 GB/s, beyond what loopback SSH reaches on the bench machine). The
//! bound is in bytes, not chunks, so short reads (SSH acknowledgements, small
//! SFTP replies) do not shrink it.
//! [`Relay::set_target`] points new connections elsewhere (a restarted server
//! on a new port); [`Relay::set_options`] shapes new connections differently
//! (a client's later connections on a slower path than its first); [`Relay::limit_connections`] closes any connection beyond
//! a number open at once (a server or firewall that lets a client hold only
//! so many).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes read at a time, and the largest burst a rate cap lets through.
pub const CHUNK: usize = 64 * 1024;

/// Bytes held per direction between reading and writing on a delayed link
/// without a rate cap (the emulated link's capacity: it must hold rate ×
/// delay).
pub const IN_FLIGHT_BYTES: usize = 64 * 1024 * 1024;

/// The least a direction holds (a link without delay, or a slow one).
pub const MIN_IN_FLIGHT_BYTES: usize = 4 * 1024 * 1024;

/// How many bytes a direction shaped by `shape` holds between reading and
/// writing: twice its rate × delay when capped, [`IN_FLIGHT_BYTES`] when
/// delayed and uncapped, never less than [`MIN_IN_FLIGHT_BYTES`].
pub fn in_flight_bytes(shape: &Shape) -> usize {
    let want = match shape.rate {
        Some(rate) => (2.0 * rate as f64 * shape.delay.as_secs_f64()) as usize,
        None if shape.delay.is_zero() => 0,
        None => IN_FLIGHT_BYTES,
    };
    want.max(MIN_IN_FLIGHT_BYTES)
}

/// How one direction of a relayed connection is shaped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    /// Bytes per second at most; `None` for no cap.
    pub rate: Option<u64>,
    /// One-way delay added to every byte.
    pub delay: Duration,
}

/// How a relay shapes each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayOptions {
    /// Client to target.
    pub up: Shape,
    /// Target to client.
    pub down: Shape,
}

/// A running relay; stopped (every connection closed) on drop.
pub struct Relay {
    /// Where clients connect: `127.0.0.1:<port>`.
    pub addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    options: Arc<Mutex<RelayOptions>>,
    /// Connections relayed at once at most; more are closed as soon as
    /// they are accepted.
    limit: Arc<AtomicUsize>,
    /// Connections being relayed now.
    open: Arc<AtomicUsize>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying connections on a free loopback port to `target`.
    pub fn start(target: SocketAddr, options: RelayOptions) -> Self {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the relay on 127.0.0.1:0");
        std_listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = std_listener.local_addr().expect("relay address");
        let target = Arc::new(Mutex::new(target));
        let shaping = Arc::new(Mutex::new(options));
        let stop = CancellationToken::new();
        let limit = Arc::new(AtomicUsize::new(usize::MAX));
        let open = Arc::new(AtomicUsize::new(0));
        let (t, s, o) = (target.clone(), stop.clone(), shaping.clone());
        let (lim, now_open) = (limit.clone(), open.clone());
        let thread = std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("relay runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("relay listener");
                    loop {
                        let client = tokio::select! {
                            () = s.cancelled() => break,
                            r = listener.accept() => match r {
                                Ok((c, _)) => c,
                                Err(_) => continue,
                            },
                        };
                        if now_open.fetch_add(1, Ordering::SeqCst) >= lim.load(Ordering::SeqCst) {
                            now_open.fetch_sub(1, Ordering::SeqCst);
                            drop(client);
                            continue;
                        }
                        let to = *t.lock().expect("relay target");
                        let options = *o.lock().expect("relay options");
                        let (stop, done) = (s.clone(), now_open.clone());
                        tokio::spawn(async move {
                            relay_one(client, to, options, stop).await;
                            done.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                });
            })
            .expect("spawn the relay thread");
        Self {
            addr,
            target,
            options: shaping,
            limit,
            open,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>`, for an endpoint setting.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Relays no more than `n` connections at once; one accepted beyond
    /// that is closed at once.
    pub fn limit_connections(&self, n: usize) {
        self.limit.store(n, Ordering::SeqCst);
    }

    /// Connections being relayed now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Sends connections accepted from now on to `target`.
    pub fn set_target(&self, target: SocketAddr) {
        *self.target.lock().expect("relay target") = target;
    }

    /// Shapes connections accepted from now on by `options`; those open
    /// keep their shape.
    pub fn set_options(&self, options: RelayOptions) {
        *self.options.lock().expect("relay options") = options;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Relays one connection; a target that refuses closes the client's.
async fn relay_one(
    client: TcpStream,
    target: SocketAddr,
    options: RelayOptions,
    stop: CancellationToken,
) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        () = stop.cancelled() => {}
        () = async {
            tokio::join!(pump(cr, sw, options.up), pump(sr, cw, options.down));
        } => {}
    }
}

/// Copies one direction, shaped; ends (shutting the writer down) at end of
/// input or on an error of either side.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shape: Shape,
) {
    // The channel is unbounded in chunks; the semaphore bounds it in bytes:
    // the reader takes a permit per byte before it reads, the writer gives
    // them back once the bytes are written.
    let budget = Arc::new(tokio::sync::Semaphore::new(in_flight_bytes(&shape)));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader_budget = budget.clone();
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let Ok(permit) = reader_budget.acquire_many(CHUNK as u32).await else {
                break;
            };
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // Keep the permits of the bytes read; return the rest.
                    permit.forget();
                    reader_budget.add_permits(CHUNK - n);
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        // When the next byte may leave under the rate cap.
        let mut next = Instant::now();
        while let Some((arrived, chunk)) = rx.recv().await {
            let due = (arrived + shape.delay).max(next);
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                // Wakes a reader waiting for room, which then ends.
                budget.close();
                return;
            }
            budget.add_permits(chunk.len());
            if let Some(rate) = shape.rate {
                let start = next.max(due);
                next = start + Duration::from_secs_f64(chunk.len() as f64 / rate.max(1) as f64);
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// An echo server on loopback.
    fn echo() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let mut w = s;
                    let _ = std::io::copy(&mut r, &mut w);
                });
            }
        });
        addr
    }

    #[test]
    fn relays_bytes_unchanged_and_the_rate_cap_and_delay_slow_them_down() {
        let target = echo();
        let plain = Relay::start(target, RelayOptions::default());
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let roundtrip = |addr: SocketAddr| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            let mut r = s.try_clone().unwrap();
            let d = data.clone();
            let w = std::thread::spawn(move || s.write_all(&d).unwrap());
            let mut back = vec![0u8; data.len()];
            let t = std::time::Instant::now();
            r.read_exact(&mut back).unwrap();
            w.join().unwrap();
            (back, t.elapsed())
        };
        let (back, _) = roundtrip(plain.addr);
        assert_eq!(back, data);
        // 200 kB through a 400 kB/s cap and 100 ms each way: no less than
        // 0.5 s minus one burst, plus the 200 ms of delay (a lower bound
        // only: a slow machine makes it longer, never shorter).
        let shaped = Relay::start(
            target,
            RelayOptions {
                up: Shape {
                    rate: Some(400_000),
                    delay: Duration::from_millis(100),
                },
                down: Shape {
                    rate: None,
                    delay: Duration::from_millis(100),
                },
            },
        );
        let (back, took) = roundtrip(shaped.addr);
        assert_eq!(back, data);
        assert!(took >= Duration::from_millis(600), "{took:?}");
    }

    #[test]
    fn a_direction_holds_what_its_link_carries_in_flight() {
        let ms = Duration::from_millis;
        // 1 Gbit/s × 40 ms one way is 5 MB in flight; twice that is held.
        let gbit = Shape {
            rate: Some(125_000_000),
            delay: ms(40),
        };
        assert_eq!(in_flight_bytes(&gbit), 10_000_000);
        // Uncapped and delayed: the large fixed capacity.
        let uncapped = Shape {
            rate: None,
            delay: ms(40),
        };
        assert_eq!(in_flight_bytes(&uncapped), IN_FLIGHT_BYTES);
        // A slow cap without delay (the fault tests' 4 MiB/s) and no shaping
        // at all hold the minimum, so the sender is pushed back early.
        let slow = Shape {
            rate: Some(4 << 20),
            delay: Duration::ZERO,
        };
        assert_eq!(in_flight_bytes(&slow), MIN_IN_FLIGHT_BYTES);
        assert_eq!(in_flight_bytes(&Shape::default()), MIN_IN_FLIGHT_BYTES);
    }

    #[test]
    fn dropping_the_relay_closes_its_connections() {
        let relay = Relay::start(echo(), RelayOptions::default());
        let mut s = std::net::TcpStream::connect(relay.addr).unwrap();
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        drop(relay);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(s.read(&mut b).unwrap(), 0, "closed");
    }
}
