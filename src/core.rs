//! The worker's sans-IO core: connection, stream and backend tables, quiche connections, H3↔H1
//! mapping, backend pools and timers. It never calls the kernel.
//!
//! Inputs: [`Core::on_datagram`], [`Core::on_backend`], [`Core::on_timer`], [`Core::shutdown`],
//! each given `now`. Outputs are pulled: [`Core::flush`] then [`Core::poll_transmit`] until `None`,
//! [`Core::poll_backend_action`] until `None`, and [`Core::next_deadline`]. The `ring` module turns
//! the outputs into io_uring operations and completions back into inputs; tests can drive the same
//! core with an in-memory network.
//!
//! The methods are grouped by concern: `frontend.rs` (QUIC connections), `stream.rs` (one request
//! from H3 headers to the end of the response) and `backend.rs` (pools and backend connections) each
//! add an `impl Core` block.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::backend::{BackendConn, ServerState};
use crate::budget::{Pool, PoolStats};
use crate::cid::Secret;
use crate::config::{Backend, Config, Frontend};
use crate::frontend::Conn;
use crate::stream::Stream;
use crate::table::{Key, Table};

pub type ConnKey = Key<Conn>;
pub type StreamKey = Key<Stream>;
pub type BackendKey = Key<BackendConn>;

/// A datagram the core wrote into a lent buffer.
#[derive(Debug, Clone, Copy)]
pub struct Transmit {
    pub listener: usize,
    pub to: SocketAddr,
    pub from: SocketAddr,
    pub len: usize,
    /// Set when `len` holds several datagrams of this size (GSO; the last may be shorter).
    pub segment_size: Option<usize>,
}

/// A datagram that belongs to another worker's connection, to be passed to that worker.
#[derive(Debug)]
pub struct Handoff {
    pub worker: u8,
    pub listener: usize,
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub data: Vec<u8>,
}

/// Work for the ring on a backend TCP connection, named by its generation key.
#[derive(Debug)]
pub enum BackendAction {
    Connect {
        key: BackendKey,
        addr: SocketAddr,
    },
    /// Send all of `data` (the ring resubmits short writes) and report once.
    Send {
        key: BackendKey,
        data: Vec<u8>,
    },
    /// Arm one read. The core arms reads only when it has room: that is the backpressure.
    Recv {
        key: BackendKey,
        /// Read at most this many bytes (the chunk the core reserved for it).
        max: usize,
    },
    /// Cancel what is in flight, then close the socket. The key is dead for the core already.
    Close {
        key: BackendKey,
    },
}

/// A completion for a backend connection.
#[derive(Debug)]
pub enum BackendEvent<'a> {
    Connected(io::Result<()>),
    Sent(io::Result<usize>),
    /// `Ok(&[])` is end of stream.
    Received(io::Result<&'a [u8]>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    Conn(ConnKey),
    Handshake(ConnKey),
    Stream(StreamKey),
    Drain,
}

/// At most a fixed number of events per one-second window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateBound {
    start: Instant,
    used: u32,
}

impl RateBound {
    pub(crate) fn new(now: Instant) -> Self {
        RateBound {
            start: now,
            used: 0,
        }
    }

    /// Takes one event from this second's `per_sec`; false when they are spent.
    pub(crate) fn take(&mut self, now: Instant, per_sec: u32) -> bool {
        if now.saturating_duration_since(self.start).as_secs() >= 1 {
            *self = RateBound::new(now);
        }
        if self.used >= per_sec {
            return false;
        }
        self.used += 1;
        true
    }
}

/// Counters; printed at shutdown and (later) served on the metrics endpoint.
#[derive(Default, Debug, Clone)]
pub struct Stats {
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub dropped_unparsable: u64,
    pub dropped_unknown: u64,
    pub dropped_at_capacity: u64,
    pub version_negotiations: u64,
    pub stateless_resets: u64,
    pub handshakes: u64,
    pub conns_accepted: u64,
    pub conns_closed: u64,
    pub migrations: u64,
    /// Network paths a connection had left, freed to make room for a new one.
    pub paths_freed: u64,
    /// Safe requests forwarded from 0-RTT (with `Early-Data: 1`).
    pub early_data_requests: u64,
    /// Unsafe requests in 0-RTT held until the handshake completed.
    pub early_data_held: u64,
    pub streams_opened: u64,
    pub streams_rejected: u64,
    pub responses: [u64; 6],
    pub backend_connects: u64,
    pub backend_connect_errors: u64,
    pub backend_reuses: u64,
    pub backend_errors: u64,
    pub stale_events: u64,
    pub handoffs_out: u64,
    pub handoffs_in: u64,
    pub gso_batches: u64,
    pub gso_disabled: u64,
    pub retries_sent: u64,
    pub retry_token_invalid: u64,
    /// Initials with an invalid Retry token answered with CONNECTION_CLOSE(INVALID_TOKEN).
    pub invalid_token_closes: u64,
    /// New connections refused because the budget was above its high-water mark.
    pub refused_conns: u64,
    /// Requests that had to wait in the admission queue for budget.
    pub budget_queued: u64,
    /// Requests answered 503 for lack of budget.
    pub budget_refusals: u64,
    pub budget: PoolStats,
}

/// Listener (bound socket) as the core sees it: which frontend and which local address.
#[derive(Debug, Clone)]
pub struct Listener {
    pub frontend: usize,
    pub local: SocketAddr,
}

pub struct Core {
    pub(crate) worker: u8,
    /// `max-memory` for the whole process (split across workers).
    max_memory: u64,
    /// Size of the worker group (CID owner bytes below it belong to a sibling).
    pub(crate) workers: u8,
    /// Most datagrams per GSO batch; 1 = no GSO.
    pub(crate) gso_segments: usize,
    pub(crate) handoffs: VecDeque<Handoff>,
    /// Connections not yet established (drives `quic-retry auto`).
    pub(crate) half_open: usize,
    /// Wall-clock anchor for Retry token expiry, so the core still only reads `now`.
    clock_base: (Instant, u64),
    /// The thread that created the core: the only one that may touch it (debug check).
    owner: std::thread::ThreadId,
    pub(crate) frontends: Vec<Frontend>,
    pub(crate) backends: Vec<Backend>,
    /// Index of each frontend's default backend in `backends`.
    pub(crate) frontend_backend: Vec<usize>,
    pub(crate) listeners: Vec<Listener>,
    pub(crate) quic: Vec<quiche::Config>,
    pub(crate) h3_config: quiche::h3::Config,
    pub(crate) secret: Secret,

    pub(crate) conns: Table<Conn>,
    /// Every CID that routes to a connection: ours and the client's initial DCID.
    pub(crate) cids: HashMap<Vec<u8>, ConnKey>,
    pub(crate) streams: Table<Stream>,
    pub(crate) bconns: Table<BackendConn>,
    /// Per backend, per server: pool and balancing state.
    pub(crate) servers: Vec<Vec<ServerState>>,
    /// Live connections per frontend, for `max-connections`.
    pub(crate) frontend_conns: Vec<usize>,

    /// Armed timers, earliest first. At most one entry per timer: rescheduling removes the old
    /// one, and so does removing its connection or stream. A heap with lazy deletion grew
    /// with (events per second) x (timeout): every backend read restarted `timeout server`,
    /// about 600 000 stale entries (16 MiB per worker, kept at peak capacity) in the soak.
    timers: BTreeSet<(Instant, Timer)>,
    /// Connections with new input to process at the next `flush`.
    pub(crate) dirty: Vec<ConnKey>,
    /// Connections that may have packets to send, drained by `poll_transmit`.
    pub(crate) sendable: VecDeque<ConnKey>,
    /// Stateless answers (version negotiation, resets) waiting for `poll_transmit`.
    pub(crate) stateless: VecDeque<(Transmit, Vec<u8>)>,
    pub(crate) actions: VecDeque<BackendAction>,
    /// The worker's memory budget (`max-memory / workers`, in `bufsize` chunks).
    pub(crate) pool: Pool,
    /// Streams waiting for budget, oldest first, with the chunks each needs.
    pub(crate) admission: VecDeque<(StreamKey, usize)>,
    /// Streams that stopped reading one side because the pool was empty; re-pumped when chunks
    /// come back.
    pub(crate) budget_blocked: Vec<StreamKey>,
    /// New connections are being refused for budget (logged once per change).
    pub(crate) refusing: bool,
    /// The budget was more than half used since the last trim hint.
    budget_was_high: bool,
    /// Connections existed since the last trim hint.
    had_conns: bool,
    pub(crate) scratch: Vec<u8>,

    pub(crate) drain_deadline: Option<Instant>,
    /// Stateless resets and INVALID_TOKEN closes answer unauthenticated input: each has its own
    /// per-second bound, so a flood of one kind cannot silence the other.
    pub(crate) reset_rate: RateBound,
    pub(crate) close_rate: RateBound,
    pub stats: Stats,
}

/// Streams that may wait for budget per worker; beyond it they are answered 503 at once.
pub(crate) const ADMISSION_QUEUE: usize = 1024;

impl Core {
    pub fn new(
        worker: u8,
        config: &Config,
        listeners: Vec<Listener>,
        quic: Vec<quiche::Config>,
        secret: Secret,
        now: Instant,
    ) -> Result<Core, String> {
        let mut frontend_backend = Vec::new();
        for fe in &config.frontends {
            let idx = config
                .backends
                .iter()
                .position(|b| b.name == fe.default_backend)
                .ok_or_else(|| {
                    format!(
                        "frontend '{}': unknown backend '{}'",
                        fe.name, fe.default_backend
                    )
                })?;
            frontend_backend.push(idx);
        }
        let mut h3_config = quiche::h3::Config::new().map_err(|e| format!("h3 config: {e}"))?;
        h3_config.set_max_field_section_size(64 * 1024);
        // Saturating: the limits come from the configuration (found by the config fuzzer).
        let max_conns: usize = config
            .frontends
            .iter()
            .fold(0usize, |a, f| a.saturating_add(f.max_connections));
        let max_streams: usize =
            config.frontends.iter().fold(0usize, |a, f| {
                a.saturating_add(f.max_connections.saturating_mul(
                    usize::try_from(f.max_concurrent_streams).unwrap_or(usize::MAX),
                ))
            });
        let servers = config
            .backends
            .iter()
            .map(|b| b.servers.iter().map(ServerState::new).collect())
            .collect();
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let max_memory = config
            .global
            .max_memory
            .unwrap_or(crate::config::DEFAULT_MAX_MEMORY);
        let mut core = Core {
            worker,
            max_memory,
            workers: 1,
            gso_segments: 1,
            handoffs: VecDeque::new(),
            half_open: 0,
            clock_base: (now, unix),
            owner: std::thread::current().id(),
            frontends: config.frontends.clone(),
            backends: config.backends.clone(),
            frontend_backend,
            listeners,
            quic,
            h3_config,
            secret,
            conns: Table::with_capacity(max_conns.max(1)),
            cids: HashMap::new(),
            streams: Table::with_capacity(max_streams.max(1)),
            bconns: Table::with_capacity(max_streams.max(1)),
            servers,
            frontend_conns: vec![0; config.frontends.len()],
            timers: BTreeSet::new(),
            dirty: Vec::new(),
            sendable: VecDeque::new(),
            stateless: VecDeque::new(),
            actions: VecDeque::new(),
            pool: Pool::new(
                config
                    .global
                    .max_memory
                    .unwrap_or(crate::config::DEFAULT_MAX_MEMORY),
                config.global.bufsize,
            ),
            admission: VecDeque::new(),
            refusing: false,
            budget_blocked: Vec::new(),
            budget_was_high: false,
            had_conns: false,
            scratch: vec![0u8; 64 * 1024],
            drain_deadline: None,
            reset_rate: RateBound::new(now),
            close_rate: RateBound::new(now),
            stats: Stats::default(),
        };
        core.apply_windows();
        Ok(core)
    }

    /// The worker group has `n` workers (datagrams for CIDs of the others are handed off).
    pub fn set_workers(&mut self, n: u8) {
        self.workers = n.max(1);
        // The budget is per process: each worker gets its share (before any traffic).
        debug_assert_eq!(self.pool.chunks_in_use(), 0);
        let total = self.max_memory;
        self.pool = Pool::new(total / u64::from(self.workers), self.pool.chunk_size());
        self.apply_windows();
    }

    /// QUIC flow-control windows from the budget, so quiche's own receive buffering is bounded
    /// too (README: "Memory"): per stream `W_s = clamp(budget / 256, 16 KiB, max-stream-buffer)`,
    /// per connection `W_c = clamp(budget / 32, W_s, 8 * W_s)`; auto-tuning is capped at the same
    /// values. quiche then holds at most W_s per stream a client is uploading on.
    pub(crate) fn apply_windows(&mut self) {
        let budget = self.pool.capacity_bytes() as u64;
        for (cfg, fe) in self.quic.iter_mut().zip(&self.frontends) {
            let limit = fe
                .max_stream_buffer
                .unwrap_or(crate::config::DEFAULT_MAX_STREAM_BUFFER) as u64;
            let ws = (budget / 256).clamp(16 * 1024, limit.max(16 * 1024));
            let wc = (budget / 32).clamp(ws, 8 * ws);
            cfg.set_initial_max_stream_data_bidi_remote(ws);
            cfg.set_max_stream_window(ws);
            cfg.set_initial_max_data(wc);
            cfg.set_max_connection_window(wc);
        }
    }

    /// Largest GSO batch the socket accepts (1 turns GSO off).
    pub fn set_gso_segments(&mut self, n: usize) {
        if n < self.gso_segments {
            self.stats.gso_disabled += 1;
        }
        self.gso_segments = n.clamp(1, 64);
    }

    /// Streams blocked on an empty pool get another try once chunks are free again.
    fn wake_budget_blocked(&mut self, now: Instant) {
        if self.budget_blocked.is_empty() || self.pool.available() == 0 {
            return;
        }
        let blocked = std::mem::take(&mut self.budget_blocked);
        let mut seen = std::collections::HashSet::new();
        for sk in blocked {
            if !seen.insert(sk) {
                continue; // oldest entry wins: FIFO order
            }
            if self.pool.available() == 0 {
                // Not enough for everyone: the rest keep waiting, in order.
                self.budget_blocked.push(sk);
                continue;
            }
            self.pump_request(now, sk);
            self.backend_read(now, sk);
            if let Some(ck) = self.streams.get(sk).map(|s| s.conn) {
                self.mark_dirty(ck);
            }
        }
    }

    /// True once after a load peak has passed (budget back under 1/8 after exceeding 1/2, or the
    /// last connection gone): the worker then asks the allocator to return freed memory to the
    /// kernel (`malloc_trim`), so RSS follows the load down instead of staying at the peak.
    pub fn take_trim_hint(&mut self) -> bool {
        let used = self.pool.used_bytes();
        let cap = self.pool.capacity_bytes();
        if used * 2 > cap {
            self.budget_was_high = true;
        }
        if self.budget_was_high && used * 8 < cap {
            self.budget_was_high = false;
            return true;
        }
        // The worker went idle after traffic: quiche's per-connection memory (not in the pool)
        // was freed too, so hand it back as well.
        if !self.conns.is_empty() {
            self.had_conns = true;
        } else if std::mem::take(&mut self.had_conns) {
            return true;
        }
        false
    }

    pub fn poll_handoff(&mut self) -> Option<Handoff> {
        self.handoffs.pop_front()
    }

    /// Seconds since the Unix epoch at `now` (for token expiry).
    pub(crate) fn unix_time(&self, now: Instant) -> u64 {
        self.clock_base.1 + now.saturating_duration_since(self.clock_base.0).as_secs()
    }

    /// Crash-report breadcrumbs: what this worker is working on right now.
    #[inline]
    pub(crate) fn breadcrumb(&self, conn: Option<ConnKey>, stream: Option<StreamKey>) {
        crate::diag::breadcrumb(
            self.worker,
            conn.map(|k| k.to_u64()),
            stream.map(|k| k.to_u64()),
        );
    }

    /// Shared-nothing: a core is only ever used by the thread that built it.
    pub(crate) fn debug_check_thread(&self) {
        debug_assert_eq!(
            std::thread::current().id(),
            self.owner,
            "a worker's core was touched by another thread"
        );
    }

    /// Arms timer `t` at `at`, replacing its entry at `old` (the instant its owner recorded).
    pub(crate) fn schedule(&mut self, old: Option<Instant>, at: Instant, t: Timer) {
        if old == Some(at) {
            debug_assert!(
                self.timers.contains(&(at, t)),
                "a recorded instant is armed"
            );
            return;
        }
        self.unschedule(old, t);
        self.timers.insert((at, t));
    }

    /// Disarms timer `t` armed at `at` (nothing when it already fired).
    pub(crate) fn unschedule(&mut self, at: Option<Instant>, t: Timer) {
        if let Some(at) = at {
            self.timers.remove(&(at, t));
        }
    }

    pub(crate) fn mark_dirty(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(key) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    /// Earliest instant at which `on_timer` has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.first().map(|&(at, _)| at)
    }

    /// Fires every timer due at `now`.
    pub fn on_timer(&mut self, now: Instant) {
        self.debug_check_thread();
        while let Some(&(at, t)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            match t {
                Timer::Conn(key) => self.breadcrumb(Some(key), None),
                Timer::Handshake(key) => self.breadcrumb(Some(key), None),
                Timer::Stream(key) => {
                    let ck = self.streams.get(key).map(|s| s.conn);
                    self.breadcrumb(ck, Some(key));
                }
                Timer::Drain => self.breadcrumb(None, None),
            }
            match t {
                Timer::Conn(key) => self.conn_timer(key, at, now),
                Timer::Handshake(key) => self.handshake_timer(key),
                Timer::Stream(key) => self.stream_timer(key, at, now),
                Timer::Drain => self.drain_expired(),
            }
        }
        self.breadcrumb(None, None);
    }

    pub fn on_backend(&mut self, now: Instant, key: BackendKey, ev: BackendEvent<'_>) {
        self.debug_check_thread();
        let sk = self.bconns.get(key).and_then(|b| b.stream);
        let ck = sk.and_then(|sk| self.streams.get(sk)).map(|s| s.conn);
        self.breadcrumb(ck, sk);
        if !self.bconns.contains(key) {
            // The owner is gone (closed while the op was in flight). The ring already released
            // the buffer; nothing else to do.
            self.stats.stale_events += 1;
            return;
        }
        // Whatever the event does to the stream (data, an error answer, a reset), its QUIC
        // connection has something to send afterwards.
        let conn = self
            .bconns
            .get(key)
            .and_then(|b| b.stream)
            .and_then(|sk| self.streams.get(sk))
            .map(|s| s.conn);
        match ev {
            BackendEvent::Connected(r) => self.backend_connected(now, key, r),
            BackendEvent::Sent(r) => self.backend_sent(now, key, r),
            BackendEvent::Received(r) => self.backend_received(now, key, r),
        }
        if let Some(ck) = conn {
            self.mark_dirty(ck);
        }
        self.breadcrumb(None, None);
    }

    pub fn poll_backend_action(&mut self) -> Option<BackendAction> {
        self.actions.pop_front()
    }

    /// Processes every connection that got input since the last flush (HTTP/3 events, stream
    /// output, CID top-up) and queues it for `poll_transmit`. Called once per loop pass, after all
    /// datagrams of the pass were delivered, so ACKs coalesce.
    pub fn flush(&mut self, now: Instant) {
        // A connection stays marked dirty while it is serviced, so its own stream work does not
        // queue it again. Servicing one connection does not dirty another today; the bound is a
        // guard against a livelock if that ever changes.
        self.admit_queued(now);
        self.wake_budget_blocked(now);
        for _ in 0..8 {
            if self.dirty.is_empty() {
                break;
            }
            let dirty = std::mem::take(&mut self.dirty);
            for key in dirty {
                if !self.conns.contains(key) {
                    continue;
                }
                self.breadcrumb(Some(key), None);
                self.service_conn(key, now);
                if let Some(c) = self.conns.get_mut(key) {
                    c.dirty = false;
                }
                self.sendable.push_back(key);
            }
        }
        self.breadcrumb(None, None);
    }

    /// Writes the next datagram into `buf`. Call until `None` after every `flush`.
    /// `_now` is unused until pacing honours quiche's `SendInfo.at`; it keeps the quinn-style
    /// shape every driver (worker, simulation, fuzzer) already calls.
    pub fn poll_transmit(&mut self, _now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        self.debug_check_thread();
        if let Some((t, data)) = self.stateless.pop_front() {
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            self.stats.datagrams_out += 1;
            return Some(Transmit { len: n, ..t });
        }
        while let Some(&key) = self.sendable.front() {
            match self.conn_send(key, buf) {
                Some(t) => {
                    self.stats.datagrams_out += 1;
                    self.stats.bytes_out += t.len as u64;
                    return Some(t);
                }
                None => {
                    self.sendable.pop_front();
                }
            }
        }
        None
    }

    /// Graceful stop: GOAWAY everywhere, finish in-flight streams until `drain`, then close.
    pub fn shutdown(&mut self, now: Instant, drain: Duration) {
        if self.drain_deadline.is_some() {
            return;
        }
        let deadline = now + drain;
        self.drain_deadline = Some(deadline);
        self.schedule(None, deadline, Timer::Drain);
        for key in self.conns.keys() {
            self.send_goaway(key);
            self.mark_dirty(key);
        }
        self.close_idle_backends();
    }

    /// True once shutting down and every connection is gone.
    pub fn is_done(&self) -> bool {
        self.drain_deadline.is_some() && self.conns.is_empty()
    }

    pub fn is_draining(&self) -> bool {
        self.drain_deadline.is_some()
    }

    fn drain_expired(&mut self) {
        log::info!(
            "worker {}: drain timeout, closing {} connections with {} streams in flight",
            self.worker,
            self.conns.len(),
            self.streams.len()
        );
        for key in self.conns.keys() {
            if let Some(c) = self.conns.get_mut(key) {
                let _ =
                    c.q.close(true, crate::frontend::H3_NO_ERROR, b"shutting down");
            }
            self.mark_dirty(key);
        }
    }

    /// Counters with the budget figures filled in.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.budget = self.pool.stats();
        s
    }

    pub fn live(&self) -> (usize, usize, usize) {
        (self.conns.len(), self.streams.len(), self.bconns.len())
    }

    /// How many of the live backend connections sit idle in a pool (kept until the origin
    /// closes them); the rest carry an exchange.
    pub fn idle_backends(&self) -> usize {
        self.servers.iter().flatten().map(|s| s.idle.len()).sum()
    }

    /// Debug-only cross-table checks: every stream's connection resolves and lists it; every
    /// backend connection's stream resolves and points back.
    pub fn check_invariants(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        self.conns.check_invariants();
        self.streams.check_invariants();
        self.bconns.check_invariants();
        // Timers: one entry at most per connection (idle/loss, handshake), stream and drain.
        assert!(
            self.timers.len() <= 2 * self.conns.len() + self.streams.len() + 1,
            "timer entries outlive their owners: {} for {} connections, {} streams",
            self.timers.len(),
            self.conns.len(),
            self.streams.len()
        );
        for &(at, t) in &self.timers {
            match t {
                Timer::Conn(k) => assert_eq!(self.conns.get(k).and_then(|c| c.timer_at), Some(at)),
                Timer::Handshake(k) => {
                    assert_eq!(self.conns.get(k).and_then(|c| c.handshake_at), Some(at))
                }
                Timer::Stream(k) => {
                    assert_eq!(self.streams.get(k).and_then(|s| s.deadline), Some(at))
                }
                Timer::Drain => assert_eq!(self.drain_deadline, Some(at)),
            }
        }
        // Below, the other way: every instant an owner records is armed (a lost timer would
        // leave a stream or connection waiting forever).
        for (sk, s) in self.streams.iter() {
            if let Some(at) = s.deadline {
                assert!(
                    self.timers.contains(&(at, Timer::Stream(sk))),
                    "stream timer lost"
                );
            }
            let c = self
                .conns
                .get(s.conn)
                .expect("stream outlived its connection");
            assert_eq!(
                c.streams.get(&s.id),
                Some(&sk),
                "connection does not list its stream"
            );
            if let Some(bk) = s.bconn {
                let b = self
                    .bconns
                    .get(bk)
                    .expect("stream names a dead backend connection");
                assert_eq!(b.stream, Some(sk), "backend connection does not point back");
            }
        }
        for (ck, c) in self.conns.iter() {
            if let Some(at) = c.timer_at {
                assert!(
                    self.timers.contains(&(at, Timer::Conn(ck))),
                    "conn timer lost"
                );
            }
            if let Some(at) = c.handshake_at {
                assert!(
                    self.timers.contains(&(at, Timer::Handshake(ck))),
                    "handshake timer lost"
                );
            }
            for &sk in c.streams.values() {
                assert_eq!(self.streams.get(sk).map(|s| s.conn), Some(ck));
            }
        }
        // Budget: every charged chunk has an owner.
        let streams: usize = self
            .streams
            .iter()
            .map(|(_, s)| {
                s.to_backend.chunks()
                    + s.body_out_chunks()
                    + s.from_chunks
                    + s.wait.map_or(0, |w| w.reserved)
            })
            .sum();
        let bconns: usize = self
            .bconns
            .iter()
            .map(|(_, b)| usize::from(b.read_charged) + usize::from(b.send_charged))
            .sum();
        assert_eq!(
            self.pool.chunks_in_use(),
            streams + bconns,
            "budget accounting out of sync"
        );
    }
}

impl Drop for Core {
    /// A core dropped with requests in flight (a worker that failed, a test, the fuzzer) gives
    /// their buffers back so the budget's own checks hold to the end (found by the session
    /// fuzzer).
    fn drop(&mut self) {
        for sk in self.streams.keys() {
            if let Some(s) = self.streams.get_mut(sk) {
                s.release_buffers(&mut self.pool);
            }
        }
    }
}
