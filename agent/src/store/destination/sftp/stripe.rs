//! Striping (`destination.sftp.streams` > 1): one file written or read over
//! several SFTP sessions at once, each carrying its own byte ranges.
//!
//! One SFTP session moves at most the server's channel window per round trip
//! (OpenSSH grants 2 MiB: 26 MB/s at 80 ms RTT, whatever the link). Several
//! sessions, each with its own window, multiply that.
//!
//! The sessions ("lanes") are opened once per [`SftpDir`] and kept, beside
//! the control connection that does everything else (directories, create,
//! rename, stat). Each lane is its own SSH connection by default (its own TCP
//! window too, which matters on a lossy WAN), or a further channel on the
//! control connection ([`StripeOver::Channels`]). A server that refuses one
//! kind gets the other; one that refuses both gets fewer lanes, with one
//! warning naming the server settings that limit them (OpenSSH's
//! `MaxSessions`, `MaxStartups`). With no lane at all, files go over the
//! control connection alone, as with `streams: 1`.
//!
//! Writing: [`Upload::write`] gets the stream in order; it is cut into
//! [`WRITE_LEN`] requests and [`BLOCK`]-sized blocks, block `i` going to
//! lane `i % lanes` at its offset (known as the bytes arrive). The control
//! connection creates the `.partial` file (exclusively), so that a
//! clean-up's delete, sent over the same session, always comes after it;
//! then every lane opens its own handle on it. Each lane keeps at most [`LANE_DEPTH`] requests in flight,
//! what the server's channel window takes at once, so memory stays bounded
//! by `streams` × window whatever the file size.
//!
//! Logging in: at most [`LOGINS_AT_ONCE`] connections log in at once; more
//! lanes than that ride as further channels on those connections. A backup
//! starts the lanes' logins while the control connection logs in
//! ([`SftpDir::warm_lanes`]), so on a long round trip the two overlap.
//!
//! Reading: the file's ranges are requested over the lanes the same way,
//! and handed back in order through a reorder queue of at most
//! [`READ_IN_FLIGHT`] bytes.
//!
//! Any failure of any lane fails the whole file. A lane that timed out marks
//! every connection of the destination broken (a stalled server costs one
//! `io_timeout`, as without striping).

use std::collections::VecDeque;
use std::future::Future;

use russh_sftp::client::error::Error as SftpError;
use russh_sftp::client::RawSftpSession;
use tokio::task::JoinHandle;

use super::super::range::Exact;
use super::*;

/// Bytes one lane writes in a row before the next lane takes over: four
/// whole write requests.
pub(super) const BLOCK: u64 = 4 * WRITE_LEN as u64;

/// SFTP write requests in flight per lane (sent but not yet acknowledged):
/// 8 of 255 KiB, 2040 KiB, what OpenSSH's 2 MiB session window lets through
/// at once. A lane moves at most its window per round trip, so `streams`
/// lanes move `streams` × 2 MiB: about 210 MB/s for 8 at 80 ms, 420 MB/s for
/// 16. What is sent leaves the process (it is in the kernel's socket buffers
/// or on the wire); more requests than the window takes would wait here for
/// it, in memory, so a lane keeps no more than that.
pub(super) const LANE_DEPTH: usize = 8;

/// SSH connections logging in at once for one destination, at most, the
/// control connection's own login aside: OpenSSH's `MaxStartups` (default
/// `10:30:100`) starts refusing connections at random beyond 10 that have
/// not logged in yet. Lanes beyond this many are further channels on these
/// connections (OpenSSH's `MaxSessions` allows 10 per connection).
pub(super) const LOGINS_AT_ONCE: usize = 8;

/// Bytes of SFTP read requests in flight over all lanes of one striped read
/// (asked for but not yet handed back): 32 requests of 255 KiB, 8 MiB.
/// Unlike writes, every byte of it may sit in memory at once (the reorder
/// queue), so it is kept well below the write bound: with 12 MiB, `verify`
/// of a compressed, encrypted 4 GiB set peaked at 32.4 MiB, over the
/// agent's 32 MiB budget. Reads move at most this per round trip (105 MB/s
/// at 80 ms).
pub(super) const READ_IN_FLIGHT: usize = 32 * WRITE_LEN as usize;

/// Sessions a striped read uses at most. A download moves under the window
/// the agent grants (16 MiB per session), not the server's 2 MiB, so what
/// bounds it is [`READ_IN_FLIGHT`], not the sessions; each further session
/// costs its SSH and SFTP buffers (about 0.25 MiB: 16 sessions took a fetch
/// from 30 to 33 MiB of peak RSS).
pub(super) const READ_LANES: usize = LOGINS_AT_ONCE;

/// The smallest file read over the striped sessions: below one read window
/// (8 MiB) of data, the logins they may cost outweigh what they save.
pub(super) const STRIPE_READ_MIN: u64 = READ_IN_FLIGHT as u64;

/// How the lanes of a striped transfer reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeOver {
    /// Each lane is its own SSH connection (own TCP window, own key
    /// exchange); a server refusing more connections gets channels instead.
    Connections,
    /// Each lane is another session channel on the control connection; a
    /// server refusing more channels (`MaxSessions`) gets connections.
    Channels,
}

/// One SFTP session of a striped transfer.
pub(super) struct Lane {
    raw: Arc<RawSftpSession>,
    /// Set when a request on this lane failed at the connection level.
    broken: AtomicBool,
    /// The control connection this lane is a channel of, if it is one.
    shared: Option<Arc<Connection>>,
    /// The connection of its own it rides on, if any, shared with the other
    /// lanes on it (dropping the last closes it).
    _own: Option<Arc<russh::client::Handle<HostKeyChecker>>>,
}

impl Lane {
    /// Whether the lane can carry another transfer for `control`.
    fn usable(&self, control: &Arc<Connection>) -> bool {
        !self.broken.load(Ordering::Relaxed)
            && match &self.shared {
                Some(c) => Arc::ptr_eq(c, control) && !c.is_broken(),
                None => true,
            }
    }
}

/// What a striped transfer needs to fail well: its lanes and the control
/// connection, to mark broken, and the timeout, to name.
#[derive(Clone)]
struct Failing {
    lanes: Vec<Arc<Lane>>,
    control: Arc<Connection>,
    io_timeout: Duration,
}

impl Failing {
    /// Marks what `e` says is unusable: the lane on a connection-level
    /// failure; every lane and the control connection on a timeout (the
    /// server is stalled: nothing more is waited on).
    fn note(&self, lane: usize, e: &SftpError) {
        if matches!(e, SftpError::Timeout) {
            self.stalled();
        } else if breaks_connection(e) {
            self.lanes[lane].broken.store(true, Ordering::Relaxed);
            if let Some(c) = &self.lanes[lane].shared {
                c.mark_broken();
            }
        }
    }

    fn stalled(&self) {
        for l in &self.lanes {
            l.broken.store(true, Ordering::Relaxed);
        }
        self.control.mark_broken();
    }

    /// The `std::io::Error` for `e` on `lane`, after noting it.
    fn io(&self, lane: usize, e: SftpError) -> std::io::Error {
        self.note(lane, &e);
        sftp_io_error(e, self.io_timeout)
    }

    /// The error for a request on `lane` that got no answer in time.
    fn timeout(&self) -> std::io::Error {
        self.stalled();
        timeout_error(self.io_timeout)
    }
}

/// One handle per lane on the same remote file, closed (without waiting)
/// when dropped unless closed before.
struct Handles {
    lanes: Vec<Arc<Lane>>,
    handles: Vec<String>,
    closed: bool,
}

impl Drop for Handles {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for (lane, handle) in self.lanes.iter().zip(self.handles.drain(..)) {
            if lane.broken.load(Ordering::Relaxed) {
                continue;
            }
            let raw = lane.raw.clone();
            // Bounded by the session's own request timeout (io_timeout).
            rt.spawn(async move {
                let _ = raw.close(handle).await;
            });
        }
    }
}

/// Files kept open for ranged reads, at most this many at once.
pub(super) const RANGE_HANDLES_KEPT: usize = 16;

/// A file opened (or being opened) for ranged reads on one lane: its
/// handle and its size, if the server said.
type RangeCell = Arc<tokio::sync::OnceCell<(Arc<Handles>, Option<u64>)>>;

/// The files kept open for ranged reads, by lane and path, the most
/// recently opened last. A handle closes when it leaves here and the last
/// reader of it is done.
#[derive(Default)]
pub(super) struct RangeHandles {
    kept: VecDeque<(Arc<Lane>, String, RangeCell)>,
}

impl RangeHandles {
    /// The cell for `path` on `lane`: the kept one, or a new one (kept,
    /// the oldest let go past [`RANGE_HANDLES_KEPT`]). Cells of lanes that
    /// can no longer carry a transfer are let go first.
    fn cell(&mut self, lane: &Arc<Lane>, control: &Arc<Connection>, path: &str) -> RangeCell {
        self.kept.retain(|(l, _, _)| l.usable(control));
        if let Some((_, _, cell)) = self
            .kept
            .iter()
            .find(|(l, p, _)| Arc::ptr_eq(l, lane) && p == path)
        {
            return cell.clone();
        }
        let cell = RangeCell::default();
        self.kept
            .push_back((lane.clone(), path.to_string(), cell.clone()));
        if self.kept.len() > RANGE_HANDLES_KEPT {
            self.kept.pop_front();
        }
        cell
    }
}

impl SftpDir {
    /// The lanes for a striped transfer next to `control`: the kept ones
    /// that still work, topped up to `destination.sftp.streams` (or `most`,
    /// if fewer). Fewer (or none) when the server refuses more sessions;
    /// that is warned about once per destination.
    pub(super) async fn lanes(&self, control: &Arc<Connection>, most: usize) -> Vec<Arc<Lane>> {
        let want = self.lanes_wanted(most);
        let mut pool = self.lanes.lock().await;
        pool.retain(|l| l.usable(control));
        if pool.len() >= want {
            return pool[..want].to_vec();
        }
        let (first, second) = match self.stripe_over {
            StripeOver::Connections => (StripeOver::Connections, StripeOver::Channels),
            StripeOver::Channels => (StripeOver::Channels, StripeOver::Connections),
        };
        // All at once first; then each missing one on its own (a server that
        // limits concurrent logins, MaxStartups, takes them one by one), then
        // the other kind.
        let missing = want - pool.len();
        let (opened, mut refusals) = self.open_lanes(first, Some(control), missing).await;
        pool.extend(opened.into_iter().map(Arc::new));
        'more: while pool.len() < want {
            for over in [first, second] {
                let (opened, refused) = self.open_lanes(over, Some(control), 1).await;
                refusals.extend(refused);
                if let Some(l) = opened.into_iter().next() {
                    pool.push(Arc::new(l));
                    continue 'more;
                }
            }
            break;
        }
        if pool.len() < want {
            self.lane_cap.store(pool.len(), Ordering::Relaxed);
        }
        if pool.len() < want && !self.warned_lanes.swap(true, Ordering::Relaxed) {
            let last = refusals.last().map(ToString::to_string).unwrap_or_default();
            tracing::warn!(
                location = %self.location(""),
                streams = want,
                opened = pool.len(),
                error = %last,
                "destination.sftp.streams is {want}, but the server let only {} more SFTP session(s) open beside the first (OpenSSH limits them with MaxSessions per connection and MaxStartups for connections logging in at once); transferring over {}; raise those limits on the server, or lower destination.sftp.streams",
                pool.len(),
                if pool.is_empty() { "one session".to_string() } else { format!("{} sessions", pool.len()) },
            );
        }
        pool.clone()
    }

    /// Lanes to have: `destination.sftp.streams`, at most `most`, and after
    /// the server refused some, no more than it allowed then.
    fn lanes_wanted(&self, most: usize) -> usize {
        (self.config.streams as usize)
            .min(most)
            .min(self.lane_cap.load(Ordering::Relaxed))
    }

    /// Logs the lanes in before the first striped file needs them, while
    /// the caller does its first steps over the control connection (which
    /// logs in at the same time): a backup's striped sessions are then ready
    /// when its snapshot starts, instead of logging in after the control
    /// connection has. Refusals are not final here: [`Self::lanes`] tries
    /// again for what is missing, and warns.
    pub(super) async fn warm_lanes(&self) {
        if self.config.streams <= 1 || self.stripe_over != StripeOver::Connections {
            return;
        }
        let want = self.lanes_wanted(usize::MAX);
        let mut pool = self.lanes.lock().await;
        if !pool.is_empty() {
            return;
        }
        // After the control connection's TCP connection is in (one round
        // trip into its login), so a server or firewall that admits one
        // connection at a time, or counts them (MaxStartups), admits the
        // control connection first; nothing if that connection failed.
        let mut dialed = self.dialed.subscribe();
        let up = tokio::time::timeout(self.config.connect_timeout, async {
            dialed
                .wait_for(|d| *d != Dial::Pending)
                .await
                .map(|d| *d == Dial::Up)
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if !up {
            return;
        }
        let (opened, _) = self.open_lanes(StripeOver::Connections, None, want).await;
        pool.extend(opened.into_iter().map(Arc::new));
    }

    /// Opens `n` lanes, concurrently: over connections, at most
    /// [`LOGINS_AT_ONCE`] logins with the lanes spread over them as
    /// channels; over channels, all on `control`. Returns those that opened
    /// and why the others did not.
    async fn open_lanes(
        &self,
        over: StripeOver,
        control: Option<&Arc<Connection>>,
        n: usize,
    ) -> (Vec<Lane>, Vec<DestinationError>) {
        let groups = match (over, control) {
            (StripeOver::Connections, _) => {
                let logins = n.min(LOGINS_AT_ONCE);
                join_all(
                    (0..logins)
                        .map(|j| self.open_group(None, n / logins + usize::from(j < n % logins))),
                )
                .await
            }
            (StripeOver::Channels, Some(control)) => vec![self.open_group(Some(control), n).await],
            (StripeOver::Channels, None) => Vec::new(),
        };
        let mut lanes = Vec::new();
        let mut errors = Vec::new();
        for r in groups.into_iter().flatten() {
            match r {
                Ok(l) => lanes.push(l),
                Err(e) => errors.push(e),
            }
        }
        (lanes, errors)
    }

    /// Opens `k` lanes as channels of one connection: `control`, or a new
    /// login of their own. Within `connect_timeout`.
    async fn open_group(
        &self,
        control: Option<&Arc<Connection>>,
        k: usize,
    ) -> Vec<Result<Lane, DestinationError>> {
        let timed_out = || DestinationError::Connect {
            location: self.location(""),
            detail: format!(
                "no further SSH session within {:?} (destination.sftp.connect_timeout)",
                self.config.connect_timeout
            ),
        };
        let work = async {
            match control {
                Some(c) => self.open_channels(&c.ssh, k, Some(c), None).await,
                None => match self.login().await {
                    Ok(ssh) => {
                        let ssh = Arc::new(ssh);
                        self.open_channels(&ssh, k, None, Some(ssh.clone())).await
                    }
                    Err(e) => vec![Err(e)],
                },
            }
        };
        tokio::time::timeout(self.config.connect_timeout, work)
            .await
            .unwrap_or_else(|_| vec![Err(timed_out())])
    }

    /// Opens `k` SFTP sessions on `ssh` at once, as lanes riding on
    /// `shared` (the control connection) or `own`.
    async fn open_channels(
        &self,
        ssh: &russh::client::Handle<HostKeyChecker>,
        k: usize,
        shared: Option<&Arc<Connection>>,
        own: Option<Arc<russh::client::Handle<HostKeyChecker>>>,
    ) -> Vec<Result<Lane, DestinationError>> {
        join_all((0..k).map(|_| async {
            let stream = self.sftp_channel(ssh).await?;
            let raw = RawSftpSession::new_with_config(stream, self.sftp_config());
            raw.init().await.map_err(|e| DestinationError::Connect {
                location: self.location(""),
                detail: format!("SFTP handshake failed: {e}"),
            })?;
            Ok(Lane {
                raw: Arc::new(raw),
                broken: AtomicBool::new(false),
                shared: shared.cloned(),
                _own: own.clone(),
            })
        }))
        .await
    }

    /// Opens `path`, just created over the control connection (`created`),
    /// on every lane for writing, without creating or truncating it. When
    /// no lane may open it (a server that refuses a second writer), the
    /// file is written over the control connection's own handle.
    pub(super) async fn create_striped(
        &self,
        path: &str,
        created: SftpUpload,
        lanes: Vec<Arc<Lane>>,
    ) -> Result<Box<dyn Upload>, DestinationError> {
        let remote = self.remote(path);
        let failing = Failing {
            lanes: lanes.clone(),
            control: created.conn.clone(),
            io_timeout: self.config.io_timeout,
        };
        let opened = join_all(lanes.iter().enumerate().map(|(i, l)| {
            self.lane_call(
                &failing,
                i,
                "cannot open",
                path,
                l.raw
                    .open(remote.clone(), OpenFlags::WRITE, FileAttributes::empty()),
            )
        }))
        .await;
        let mut handles = Handles {
            lanes: Vec::new(),
            handles: Vec::new(),
            closed: false,
        };
        let mut refused = None;
        let mut failed = None;
        for (lane, h) in lanes.iter().zip(opened) {
            match h {
                Ok(h) => {
                    handles.lanes.push(lane.clone());
                    handles.handles.push(h.handle);
                }
                // A server that will not open a file a second time for
                // writing (ProFTPD's `AllowOverwrite off`, its default) gets
                // the file over the sessions that could open it.
                Err(DestinationError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    refused.get_or_insert(source);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        // On any other error, `handles` closes what was opened, and the
        // control connection's handle closes with `created`.
        if let Some(e) = failed {
            return Err(e);
        }
        if let Some(e) = refused {
            if !self.warned_reopen.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    location = %self.location(""),
                    streams = lanes.len(),
                    sessions = handles.lanes.len().max(1),
                    error = %e,
                    "the server would not open a file being written from a second SFTP session (ProFTPD refuses this unless `AllowOverwrite on`), so files are written over {} session(s) instead of destination.sftp.streams = {}; allow it on the server for striped uploads, or set destination.sftp.streams: 1 to silence this",
                    handles.lanes.len().max(1),
                    lanes.len(),
                );
            }
        }
        if handles.lanes.is_empty() {
            return Ok(Box::new(created));
        }
        // The control connection's handle is closed without waiting for
        // the answer: the lanes write the file.
        let SftpUpload { file, conn, .. } = created;
        drop(file);
        let lanes = handles.lanes.clone();
        Ok(Box::new(StripedUpload {
            pending: lanes.iter().map(|_| VecDeque::new()).collect(),
            handles,
            // Lane numbers from here on are those of the sessions writing.
            failing: Failing { lanes, ..failing },
            remote,
            location: self.location(path),
            fsync: conn.fsync,
            packet: Vec::with_capacity(WRITE_LEN as usize),
            sent: 0,
        }))
    }

    /// Opens `path` on every lane for a striped read.
    pub(super) async fn open_striped(
        &self,
        path: &str,
        control: Arc<Connection>,
        lanes: Vec<Arc<Lane>>,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError> {
        let remote = self.remote(path);
        let failing = Failing {
            lanes: lanes.clone(),
            control,
            io_timeout: self.config.io_timeout,
        };
        let opened = join_all(lanes.iter().enumerate().map(|(i, l)| {
            self.lane_call(
                &failing,
                i,
                "cannot open",
                path,
                l.raw
                    .open(remote.clone(), OpenFlags::READ, FileAttributes::empty()),
            )
        }))
        .await;
        let mut handles = Handles {
            lanes: lanes.clone(),
            handles: Vec::new(),
            closed: false,
        };
        let mut first_err = None;
        for h in opened {
            match h {
                Ok(h) => handles.handles.push(h.handle),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let size = self
            .lane_call(
                &failing,
                0,
                "cannot stat",
                path,
                lanes[0].raw.fstat(handles.handles[0].clone()),
            )
            .await?
            .attrs
            .size
            .unwrap_or(0);
        Ok(Box::new(StripedReader {
            handles: Arc::new(handles),
            failing,
            end: size,
            next: 0,
            queue: VecDeque::new(),
            depth: (READ_IN_FLIGHT / WRITE_LEN as usize).max(2),
            current: Vec::new(),
            pos: 0,
        }))
    }

    /// The session a ranged read goes over. With `streams` > 1, the striped
    /// lanes in turn, so that ranges read at once spread over them. Else
    /// (or when the server let none open) one further SFTP channel on the
    /// control connection, opened on the first ranged read and kept for
    /// the next ones: its reads are sized to each range, where a file
    /// opened on the control session reads far ahead of what is asked.
    pub(super) async fn range_lane(
        &self,
        control: &Arc<Connection>,
    ) -> Result<Arc<Lane>, DestinationError> {
        if self.config.streams > 1 {
            let lanes = self.lanes(control, READ_LANES).await;
            if !lanes.is_empty() {
                let turn = self.range_turn.fetch_add(1, Ordering::Relaxed);
                return Ok(lanes[turn % lanes.len()].clone());
            }
        }
        let mut kept = self.range_lane.lock().await;
        if let Some(lane) = kept.as_ref().filter(|l| l.usable(control)) {
            return Ok(lane.clone());
        }
        if self.range_lane_refused.load(Ordering::Relaxed) {
            return Err(DestinationError::Connect {
                location: self.location(""),
                detail: "the server refused a further SFTP session before".into(),
            });
        }
        *kept = None;
        let opened = tokio::time::timeout(
            self.config.connect_timeout,
            self.open_channels(&control.ssh, 1, Some(control), None),
        )
        .await;
        let lane = match opened.map(|mut v| v.pop()) {
            Ok(Some(Ok(lane))) => Arc::new(lane),
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) | Err(_) => {
                return Err(DestinationError::Connect {
                    location: self.location(""),
                    detail: format!(
                        "no SFTP session for ranged reads within {:?} (destination.sftp.connect_timeout)",
                        self.config.connect_timeout
                    ),
                })
            }
        };
        *kept = Some(lane.clone());
        Ok(lane)
    }

    /// Opens `len` bytes of `path` at `offset` on `lane` (a [`Self::range_lane`]):
    /// every read of the range asked for at once (at most [`READ_IN_FLIGHT`]
    /// bytes), handed back in order. The file's handle on that lane is
    /// kept for the next ranges of it ([`RANGE_HANDLES_KEPT`] files at most,
    /// the least recently opened closed first, without waiting): ranged
    /// reads are for files that never change once written (packs), and a
    /// restore reads each pack range after range. Only the first range of a
    /// file on a lane sends the OPEN, with a STAT beside it (one round trip).
    pub(super) async fn open_range_on_lane(
        &self,
        path: &str,
        control: Arc<Connection>,
        lane: Arc<Lane>,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, DestinationError> {
        let location = self.location(path);
        let failing = Failing {
            lanes: vec![lane.clone()],
            control: control.clone(),
            io_timeout: self.config.io_timeout,
        };
        let cell = self
            .range_handles
            .lock()
            .expect("range handles lock")
            .cell(&lane, &control, path);
        let (handles, size) = cell
            .get_or_try_init(|| async {
                let remote = self.remote(path);
                let (opened, stat) = tokio::join!(
                    self.lane_call(
                        &failing,
                        0,
                        "cannot open",
                        path,
                        lane.raw
                            .open(remote.clone(), OpenFlags::READ, FileAttributes::empty()),
                    ),
                    self.lane_call(&failing, 0, "cannot stat", path, lane.raw.stat(remote)),
                );
                let handles = Arc::new(Handles {
                    lanes: vec![lane.clone()],
                    handles: vec![opened?.handle],
                    closed: false,
                });
                Ok::<_, DestinationError>((handles, stat?.attrs.size))
            })
            .await?
            .clone();
        let end = match (offset.checked_add(len), size) {
            (Some(end), Some(size)) if end <= size => end,
            // A server that does not say: the reads find out.
            (Some(end), None) => end,
            (_, size) => {
                return Err(DestinationError::OutOfRange {
                    location,
                    offset,
                    len,
                    size: size.unwrap_or(0),
                })
            }
        };
        Ok(Box::new(Exact::new(
            StripedReader {
                handles,
                failing,
                end,
                next: offset,
                queue: VecDeque::new(),
                depth: (READ_IN_FLIGHT / WRITE_LEN as usize).max(2),
                current: Vec::new(),
                pos: 0,
            },
            location,
            offset,
            len,
        )))
    }

    /// [`SftpDir::timed`] for a request on lane `lane`.
    async fn lane_call<T>(
        &self,
        failing: &Failing,
        lane: usize,
        op: &'static str,
        path: &str,
        fut: impl std::future::Future<Output = Result<T, SftpError>>,
    ) -> Result<T, DestinationError> {
        let source = match tokio::time::timeout(failing.io_timeout, fut).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => failing.io(lane, e),
            Err(_) => failing.timeout(),
        };
        Err(DestinationError::Io {
            op,
            location: self.location(path),
            source,
        })
    }
}

/// Runs `futs` concurrently on this task, in order of the results.
async fn join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, result) in futs.iter_mut().zip(out.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *result = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|r| r.expect("every future finished"))
        .collect()
}

/// A file being written over several lanes.
struct StripedUpload {
    handles: Handles,
    failing: Failing,
    /// Per lane, its writes not yet acknowledged, oldest first.
    pending: Vec<VecDeque<JoinHandle<Result<(), SftpError>>>>,
    remote: String,
    location: String,
    /// Whether to sync the file on the server before closing it.
    fsync: bool,
    /// Bytes not yet sent, fewer than one write request.
    packet: Vec<u8>,
    /// Bytes sent so far: the offset of `packet`.
    sent: u64,
}

impl StripedUpload {
    /// Sends `packet` at offset `sent` over the lane whose block it is in.
    async fn send(&mut self) -> Result<(), DestinationError> {
        let data = std::mem::replace(&mut self.packet, Vec::with_capacity(WRITE_LEN as usize));
        let lane = ((self.sent / BLOCK) % self.handles.lanes.len() as u64) as usize;
        while self.pending[lane].len() >= LANE_DEPTH {
            self.wait_oldest(lane).await?;
        }
        let raw = self.handles.lanes[lane].raw.clone();
        let handle = self.handles.handles[lane].clone();
        let offset = self.sent;
        self.sent += data.len() as u64;
        self.pending[lane].push_back(tokio::spawn(async move {
            raw.write(handle, offset, data).await.map(|_| ())
        }));
        Ok(())
    }

    /// Waits for lane `lane`'s oldest write to be acknowledged.
    async fn wait_oldest(&mut self, lane: usize) -> Result<(), DestinationError> {
        let Some(ack) = self.pending[lane].front_mut() else {
            return Ok(());
        };
        let result = tokio::time::timeout(self.failing.io_timeout, ack).await;
        self.pending[lane].pop_front();
        match result {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(self.write_error(lane, e).await),
            Ok(Err(join)) => Err(DestinationError::Io {
                op: "cannot write",
                location: self.location.clone(),
                source: std::io::Error::other(join.to_string()),
            }),
            Err(_) => Err(DestinationError::Io {
                op: "cannot write",
                location: self.location.clone(),
                source: self.failing.timeout(),
            }),
        }
    }

    /// A refused write: as [`SftpUpload::write_error`] reads it, a server's
    /// `Failure` on a file it let us create means it has no room.
    async fn write_error(&self, lane: usize, e: SftpError) -> DestinationError {
        let failure = matches!(&e, SftpError::Status(s) if s.status_code == StatusCode::Failure);
        let e = self.failing.io(lane, e);
        if failure || super::super::is_out_of_space(&e) {
            out_of_space(
                &self.failing.control,
                self.failing.io_timeout,
                &self.remote,
                &self.location,
                e,
            )
            .await
        } else {
            DestinationError::Io {
                op: "cannot write",
                location: self.location.clone(),
                source: e,
            }
        }
    }

    fn io(&self, op: &'static str, source: std::io::Error) -> DestinationError {
        DestinationError::Io {
            op,
            location: self.location.clone(),
            source,
        }
    }

    /// [`Failing`]'s timed call on lane `lane`, for `finish`.
    async fn call<T>(
        &self,
        op: &'static str,
        lane: usize,
        fut: impl std::future::Future<Output = Result<T, SftpError>>,
    ) -> Result<T, DestinationError> {
        match tokio::time::timeout(self.failing.io_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.io(op, self.failing.io(lane, e))),
            Err(_) => Err(self.io(op, self.failing.timeout())),
        }
    }
}

impl Drop for StripedUpload {
    fn drop(&mut self) {
        // Abandoned: its writes are not waited for.
        for lane in &mut self.pending {
            for w in lane.drain(..) {
                w.abort();
            }
        }
    }
}

#[async_trait]
impl Upload for StripedUpload {
    async fn write(&mut self, mut buf: &[u8]) -> Result<(), DestinationError> {
        while !buf.is_empty() {
            let room = WRITE_LEN as usize - self.packet.len();
            let n = room.min(buf.len());
            self.packet.extend_from_slice(&buf[..n]);
            buf = &buf[n..];
            if self.packet.len() == WRITE_LEN as usize {
                self.send().await?;
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, DestinationError> {
        if !self.packet.is_empty() {
            self.send().await?;
        }
        for lane in 0..self.pending.len() {
            while !self.pending[lane].is_empty() {
                self.wait_oldest(lane).await?;
            }
        }
        // Every lane's handle is synced, not one for all: each lane is its
        // own session (its own server process), and what one handle's fsync
        // covers of the writes through another is the server's filesystem's
        // business (one inode on a local disk; not so on every network
        // filesystem or server). The fsyncs go out at once.
        if self.fsync {
            let syncs = join_all(
                self.handles
                    .lanes
                    .iter()
                    .zip(&self.handles.handles)
                    .enumerate()
                    .map(|(i, (l, h))| self.call("cannot sync", i, l.raw.fsync(h.clone()))),
            )
            .await;
            for s in syncs {
                s?;
            }
        }
        let closes = join_all(
            self.handles
                .lanes
                .iter()
                .zip(&self.handles.handles)
                .enumerate()
                .map(|(i, (l, h))| self.call("cannot close", i, l.raw.close(h.clone()))),
        )
        .await;
        self.handles.closed = true;
        for c in closes {
            c?;
        }
        let raw = self.handles.lanes[0].raw.clone();
        let stored = self
            .call("cannot stat", 0, raw.stat(self.remote.clone()))
            .await?
            .attrs
            .size
            .unwrap_or(0);
        if stored != self.sent {
            return Err(DestinationError::SizeMismatch {
                location: self.location.clone(),
                sent: self.sent,
                stored,
            });
        }
        Ok(stored)
    }
}

/// A file being read over several lanes, in order.
struct StripedReader {
    /// Shared with the kept handles of ranged reads (`RangeHandles`).
    handles: Arc<Handles>,
    failing: Failing,
    /// Where the reads stop: the file's size when opened, or the end of
    /// the range asked for.
    end: u64,
    /// The offset of the next read to ask for.
    next: u64,
    /// Reads asked for, oldest (next to hand back) first.
    queue: VecDeque<JoinHandle<std::io::Result<Vec<u8>>>>,
    /// Reads in flight at most.
    depth: usize,
    /// The read being handed back, and how far.
    current: Vec<u8>,
    pos: usize,
}

impl StripedReader {
    /// Asks for reads until `depth` are in flight or the file is covered.
    fn fill(&mut self) {
        let lanes = self.handles.lanes.len() as u64;
        while self.queue.len() < self.depth && self.next < self.end {
            let offset = self.next;
            let len = (WRITE_LEN as u64).min(self.end - offset) as u32;
            self.next += u64::from(len);
            let lane = ((offset / BLOCK) % lanes) as usize;
            let raw = self.handles.lanes[lane].raw.clone();
            let handle = self.handles.handles[lane].clone();
            let failing = self.failing.clone();
            self.queue.push_back(tokio::spawn(async move {
                read_range(&raw, &handle, offset, len, &failing, lane).await
            }));
        }
    }
}

/// Reads `len` bytes at `offset` (fewer only at the end of the file),
/// asking again after a short answer.
async fn read_range(
    raw: &RawSftpSession,
    handle: &str,
    offset: u64,
    len: u32,
    failing: &Failing,
    lane: usize,
) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    while out.len() < len as usize {
        let at = offset + out.len() as u64;
        let want = len - out.len() as u32;
        match tokio::time::timeout(failing.io_timeout, raw.read(handle, at, want)).await {
            Ok(Ok(d)) if d.data.is_empty() => break,
            // Whole, as servers answer but at the end: no copy.
            Ok(Ok(d)) if out.is_empty() => out = d.data,
            Ok(Ok(d)) => out.extend_from_slice(&d.data),
            Ok(Err(SftpError::Status(s))) if s.status_code == StatusCode::Eof => break,
            Ok(Err(e)) => return Err(failing.io(lane, e)),
            Err(_) => return Err(failing.timeout()),
        }
    }
    Ok(out)
}

impl Drop for StripedReader {
    fn drop(&mut self) {
        for r in self.queue.drain(..) {
            r.abort();
        }
    }
}

impl AsyncRead for StripedReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        while this.pos == this.current.len() {
            this.fill();
            let Some(front) = this.queue.front_mut() else {
                // Everything handed back: the file ends here.
                return Poll::Ready(Ok(()));
            };
            let chunk = match Pin::new(front).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(Ok(chunk))) => chunk,
                Poll::Ready(Ok(Err(e))) => {
                    this.queue.pop_front();
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Err(join)) => {
                    this.queue.pop_front();
                    return Poll::Ready(Err(std::io::Error::other(join.to_string())));
                }
            };
            this.queue.pop_front();
            if chunk.is_empty() {
                // The file got shorter than it was when opened.
                this.queue.clear();
                this.next = this.end;
                return Poll::Ready(Ok(()));
            }
            this.current = chunk;
            this.pos = 0;
        }
        let n = buf.remaining().min(this.current.len() - this.pos);
        buf.put_slice(&this.current[this.pos..this.pos + n]);
        this.pos += n;
        if this.pos == this.current.len() {
            this.fill();
        }
        Poll::Ready(Ok(()))
    }
}
