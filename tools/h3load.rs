//! h3load: h3gate's HTTP/3 load generator.
//!
//! It opens `-c` QUIC connections (quiche) spread over `-t` threads and keeps
//! `-m` requests in flight on each, either for `-n` requests in total or for
//! `-d` seconds, or at a fixed rate (`--rps`, open loop: latency is measured
//! from the moment a request was due, so a stalled server cannot hide its
//! queueing). `--idle SECONDS` only opens the connections and holds them.
//!
//! Each thread drives its connections on its own: one non-blocking connected
//! UDP socket per connection (so each has its own 4-tuple, as real clients
//! do), one epoll set for all of them, quiche's timers kept in a heap, UDP GSO
//! for what it sends and GRO for what it receives when the kernel takes them.
//! No async runtime, no locks on the hot path, nothing shared between threads
//! but read-only options; the results are merged at the end.
//!
//! It reports requests done and failed, status code counts, req/s, body bytes
//! and Gbps, latency percentiles from a log-linear histogram (< 0.8 % error),
//! handshake times and its own CPU use (getrusage) so a reader can tell
//! whether the generator itself was the bottleneck. A request counts as done
//! only when its stream ended cleanly after a final status and as many body
//! bytes as its content-length said; resets, connection errors, GOAWAY
//! refusals and length mismatches are failures, printed on stderr, and make
//! the exit status 1, as does any status outside 2xx.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use argh::FromArgs;
use quiche::h3::NameValue;

/// Largest UDP payload we send (safe for any path MTU we care about).
const MAX_SEND_UDP: usize = 1350;
/// Largest UDP payload we accept (and the receive buffer, which holds a
/// whole GRO batch).
const MAX_RECV_UDP: usize = 65535;
/// Most datagrams in one GSO send (the kernel allows 64; 40 × 1350 stays
/// below the 64 KiB UDP limit).
const MAX_GSO_SEGMENTS: usize = 40;
/// recvmsg calls on one socket per wake-up, so that one busy connection
/// cannot starve the others (epoll is level-triggered: the rest comes next).
const MAX_RECV_PER_WAKE: usize = 32;
/// H3_NO_ERROR.
const H3_NO_ERROR: u64 = 0x100;
/// H3_REQUEST_CANCELLED.
const H3_REQUEST_CANCELLED: u64 = 0x10c;
/// H3_INTERNAL_ERROR.
const H3_INTERNAL_ERROR: u64 = 0x102;
/// Error lines each thread prints before it only counts them.
const MAX_ERROR_LINES: u32 = 10;
/// A thread above this share of one core may have been the bottleneck.
const SATURATED_CPU: f64 = 0.90;

#[derive(FromArgs)]
/// HTTP/3 load generator. Give one or more https:// URLs of one server; requests cycle through
/// them. Give -n, -d or --idle.
struct Args {
    /// request URLs (https://host[:port]/path), used round-robin; all must name the same
    /// host and port
    #[argh(positional)]
    urls: Vec<String>,

    /// number of connections (default 1)
    #[argh(option, short = 'c', default = "1")]
    connections: usize,

    /// concurrent requests (streams) per connection (default 1)
    #[argh(option, short = 'm', default = "1")]
    streams: usize,

    /// total number of requests
    #[argh(option, short = 'n')]
    requests: Option<u64>,

    /// run for this many seconds (requests still in flight then are waited for)
    #[argh(option, short = 'd')]
    duration: Option<f64>,

    /// threads, each driving its share of the connections (default 1)
    #[argh(option, short = 't', default = "1")]
    threads: usize,

    /// request method (default GET, or POST when a body is given)
    #[argh(option, short = 'X')]
    method: Option<String>,

    /// extra request header 'name: value' (repeatable)
    #[argh(option, short = 'H')]
    header: Vec<String>,

    /// send a generated request body of N bytes with every request
    #[argh(option)]
    data_size: Option<usize>,

    /// send this file as the body of every request
    #[argh(option)]
    data_file: Option<String>,

    /// start requests at this fixed total rate (open loop) instead of as fast as
    /// the -m window allows; latency counts from when each request was due
    #[argh(option)]
    rps: Option<f64>,

    /// open the connections, hold them this many seconds without requests, close
    #[argh(option)]
    idle: Option<f64>,

    /// print the summary on stderr and one JSON line on stdout
    #[argh(switch)]
    json: bool,

    /// verify the server certificate against this CA file (PEM); without it the
    /// certificate is not verified
    #[argh(option)]
    cacert: Option<String>,

    /// seconds allowed for all handshakes, and for requests still in flight when
    /// -d ends (default 10)
    #[argh(option, default = "10.0")]
    timeout: f64,

    /// handshakes in flight at once per thread (default 64)
    #[argh(option, default = "64")]
    connect_batch: usize,

    /// QUIC max idle timeout in milliseconds (default 30000); idle connections
    /// send a PING every quarter of it
    #[argh(option, default = "30000")]
    idle_timeout: u64,

    /// do not use UDP GSO/GRO
    #[argh(switch)]
    no_gso: bool,
}

/// A parsed `https://` URL.
struct Target {
    host: String,
    port: u16,
    authority: String,
    path: String,
}

fn parse_url(s: &str) -> Result<Target, String> {
    let rest = s
        .strip_prefix("https://")
        .ok_or_else(|| format!("unsupported URL {s:?}: must start with https://"))?;
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = path.split('#').next().unwrap_or("");
    let path = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let end = v6
            .find(']')
            .ok_or_else(|| format!("bad URL {s:?}: unterminated [IPv6] host"))?;
        let port = match &v6[end + 1..] {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("bad URL {s:?}: junk after [IPv6] host"))?,
            ),
        };
        (&v6[..end], port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() || authority.contains('@') {
        return Err(format!("bad URL {s:?}: empty host or userinfo"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("bad URL {s:?}: invalid port {p:?}"))?,
        None => 443,
    };
    Ok(Target {
        host: host.to_string(),
        port,
        authority: authority.to_string(),
        path,
    })
}

/// Log-linear latency histogram in microseconds, in the spirit of
/// HdrHistogram: 256 sub-buckets per power of two, so a reported percentile
/// is within 0.8 % of the true sample. Fixed size, merged by addition.
#[derive(Clone)]
struct Hist {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

const HIST_SUB_BITS: u32 = 8;
const HIST_SUB: u64 = 1 << HIST_SUB_BITS;
const HIST_HALF: u64 = HIST_SUB / 2;

impl Hist {
    fn new() -> Hist {
        // Values up to 2^40 µs (12 days).
        let buckets = Hist::index(1 << 40) + 1;
        Hist {
            counts: vec![0; buckets],
            total: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < HIST_SUB {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= HIST_SUB_BITS
        let h = e - HIST_SUB_BITS + 1;
        let m = v >> h; // in [HIST_HALF, HIST_SUB)
        (u64::from(h) * HIST_HALF + m) as usize
    }

    /// Highest value that falls into bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < HIST_SUB {
            return i;
        }
        let h = (i - HIST_HALF) / HIST_HALF;
        let m = (i - HIST_HALF) % HIST_HALF + HIST_HALF;
        ((m + 1) << h) - 1
    }

    fn record(&mut self, v: u64) {
        let v = v.min(1 << 40);
        self.counts[Hist::index(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.total += o.total;
        self.max = self.max.max(o.max);
    }

    /// The value at percentile `p` (0..=100), in µs; 0 when empty.
    fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p / 100.0 * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Hist::upper(i).min(self.max);
            }
        }
        self.max
    }
}

/// What one thread counted.
struct Stats {
    started: u64,
    done: u64,
    failed: u64,
    status: Vec<u64>,
    bytes_in: u64,
    bytes_out: u64,
    latency: Hist,
    handshake: Hist,
    connected: u64,
    conn_failed: u64,
    /// Connections that ended with a protocol or transport error.
    conn_errors: u64,
    errors_printed: u32,
    errors_suppressed: u64,
    /// Load phase: wall time and this thread's CPU time.
    elapsed: Duration,
    cpu_user: f64,
    cpu_sys: f64,
    /// Time from start until the thread's last connection was up.
    connect_time: Duration,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            started: 0,
            done: 0,
            failed: 0,
            status: vec![0; 1000],
            bytes_in: 0,
            bytes_out: 0,
            latency: Hist::new(),
            handshake: Hist::new(),
            connected: 0,
            conn_failed: 0,
            conn_errors: 0,
            errors_printed: 0,
            errors_suppressed: 0,
            elapsed: Duration::ZERO,
            cpu_user: 0.0,
            cpu_sys: 0.0,
            connect_time: Duration::ZERO,
        }
    }

    fn merge(&mut self, o: &Stats) {
        self.started += o.started;
        self.done += o.done;
        self.failed += o.failed;
        for (a, b) in self.status.iter_mut().zip(&o.status) {
            *a += b;
        }
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.latency.merge(&o.latency);
        self.handshake.merge(&o.handshake);
        self.connected += o.connected;
        self.conn_failed += o.conn_failed;
        self.conn_errors += o.conn_errors;
        self.errors_suppressed += o.errors_suppressed;
        self.elapsed = self.elapsed.max(o.elapsed);
        self.cpu_user += o.cpu_user;
        self.cpu_sys += o.cpu_sys;
        self.connect_time = self.connect_time.max(o.connect_time);
    }
}

/// Read-only options shared by all threads.
struct Opts {
    host: String,
    peer: SocketAddr,
    /// One header list per URL.
    templates: Vec<Vec<quiche::h3::Header>>,
    body: Arc<Vec<u8>>,
    streams: usize,
    cacert: Option<String>,
    idle_timeout: u64,
    timeout: Duration,
    connect_batch: usize,
    gso: bool,
}

/// How a thread's load phase issues requests and when it ends.
#[derive(Clone, Copy)]
enum Mode {
    /// Closed loop until this many requests were started (and finished).
    Count(u64),
    /// Closed loop until this long has passed.
    Duration(Duration),
    /// Open loop at a fixed per-thread rate, for a count or a duration.
    Rate {
        interval: Duration,
        count: Option<u64>,
        duration: Option<Duration>,
    },
    /// No requests: hold the connections this long.
    Idle(Duration),
}

/// One request in flight.
struct Req {
    sid: u64,
    start: Instant,
    body_off: usize,
    body_done: bool,
    status: u16,
    content_length: Option<u64>,
    bytes: u64,
}

struct Conn {
    q: quiche::Connection,
    h3: Option<quiche::h3::Connection>,
    sock: UdpSocket,
    local: SocketAddr,
    opened: Instant,
    established: bool,
    /// Closed (by either side); never used again.
    dead: bool,
    goaway: bool,
    inflight: Vec<Req>,
    /// The deadline this connection has in the timer heap (others there are stale).
    timer: Option<Instant>,
    dirty: bool,
}

/// Everything of a thread except its connections, so that both can be borrowed at once.
struct Ctx<'a> {
    o: &'a Opts,
    id: usize,
    stats: Stats,
    /// URL round-robin position.
    rr: usize,
    /// Requests the thread may still start (None: unbounded).
    quota: Option<u64>,
    /// No request starts at or after this instant.
    stop_issuing: Option<Instant>,
    /// Closed loop: connections start requests themselves. Open loop: they take
    /// due times from `backlog`.
    closed_loop: bool,
    backlog: VecDeque<Instant>,
    /// True once the load phase runs (requests may start).
    loading: bool,
    /// Connections opened and neither up nor dead yet.
    handshaking: usize,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
    body_buf: Vec<u8>,
    gso: bool,
    gro: bool,
}

impl Ctx<'_> {
    fn error(&mut self, msg: std::fmt::Arguments) {
        if self.stats.errors_printed < MAX_ERROR_LINES {
            self.stats.errors_printed += 1;
            eprintln!("h3load: [thread {}] {msg}", self.id);
        } else {
            self.stats.errors_suppressed += 1;
        }
    }

    fn may_start(&self, now: Instant) -> bool {
        self.loading
            && self.quota.is_none_or(|q| q > 0)
            && self.stop_issuing.is_none_or(|t| now < t)
    }
}

fn h3_code_name(code: u64) -> &'static str {
    match code {
        0x100 => "H3_NO_ERROR",
        0x101 => "H3_GENERAL_PROTOCOL_ERROR",
        0x102 => "H3_INTERNAL_ERROR",
        0x103 => "H3_STREAM_CREATION_ERROR",
        0x104 => "H3_CLOSED_CRITICAL_STREAM",
        0x105 => "H3_FRAME_UNEXPECTED",
        0x106 => "H3_FRAME_ERROR",
        0x107 => "H3_EXCESSIVE_LOAD",
        0x108 => "H3_ID_ERROR",
        0x109 => "H3_SETTINGS_ERROR",
        0x10a => "H3_MISSING_SETTINGS",
        0x10b => "H3_REQUEST_REJECTED",
        0x10c => "H3_REQUEST_CANCELLED",
        0x10d => "H3_REQUEST_INCOMPLETE",
        0x10e => "H3_MESSAGE_ERROR",
        0x10f => "H3_CONNECT_ERROR",
        0x110 => "H3_VERSION_FALLBACK",
        _ => "",
    }
}

fn describe_close(e: &quiche::ConnectionError) -> String {
    format!(
        "{} error 0x{:x} {}, reason {:?}",
        if e.is_app { "application" } else { "transport" },
        e.error_code,
        if e.is_app {
            h3_code_name(e.error_code)
        } else {
            ""
        },
        String::from_utf8_lossy(&e.reason)
    )
}

fn is_error_close(e: &quiche::ConnectionError) -> bool {
    if e.is_app {
        e.error_code != H3_NO_ERROR
    } else {
        e.error_code != 0
    }
}

// ---------------------------------------------------------------------------
// Sockets: epoll, GSO sends, GRO receives. The only unsafe code.

fn epoll_create() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned fd is owned by us from here on.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn epoll_ctl(ep: &OwnedFd, op: libc::c_int, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: ev is a valid epoll_event for the duration of the call.
    let rc = unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, fd, &mut ev) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to `timeout` (nanosecond precision: a 2 000 req/s schedule
/// needs better than epoll_wait's milliseconds) and appends ready tokens.
fn epoll_wait(
    ep: &OwnedFd,
    events: &mut [libc::epoll_event],
    timeout: Duration,
    out: &mut Vec<u64>,
) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(3600) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: events is a valid writable array of events.len() entries; ts
    // lives across the call; a null sigmask means "do not change it".
    let n = unsafe {
        libc::epoll_pwait2(
            ep.as_raw_fd(),
            events.as_mut_ptr(),
            events.len() as libc::c_int,
            &ts,
            std::ptr::null(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSYS) {
            // Old kernel: millisecond precision, rounded up.
            let ms = timeout.as_nanos().div_ceil(1_000_000).min(3_600_000) as libc::c_int;
            // SAFETY: as above.
            let n = unsafe {
                libc::epoll_wait(
                    ep.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    ms,
                )
            };
            for ev in events.iter().take(n.max(0) as usize) {
                out.push(ev.u64);
            }
        }
        return;
    }
    for ev in events.iter().take(n as usize) {
        out.push(ev.u64);
    }
}

fn new_socket(peer: SocketAddr, gro: bool) -> io::Result<UdpSocket> {
    let bind: SocketAddr = match peer {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let udp = UdpSocket::bind(bind)?;
    // Connected: the kernel filters other senders and reports ICMP errors.
    udp.connect(peer)?;
    udp.set_nonblocking(true)?;
    let _ = nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::RcvBuf, &(2 << 20));
    let _ = nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::SndBuf, &(2 << 20));
    if gro {
        let one: libc::c_int = 1;
        // SAFETY: a valid int option value and its size.
        unsafe {
            libc::setsockopt(
                udp.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_GRO,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    Ok(udp)
}

/// One recvmsg; returns (bytes, segment size). With GRO the buffer may hold
/// several datagrams of `segment` bytes each (the last may be shorter).
fn recv_gro(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, usize)> {
    let mut cmsg = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    // SAFETY: msg points at iov (into buf) and cmsg, both live and writable.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let mut seg = n;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled,
    // bounded by msg_controllen; the data is read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                if v > 0 {
                    seg = v as usize;
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n, seg))
}

/// Sends `buf` as datagrams of `seg` bytes (the last may be shorter) with
/// one sendmsg and UDP_SEGMENT.
fn send_gso(fd: RawFd, buf: &[u8], seg: usize) -> io::Result<usize> {
    let mut cmsg = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as _;
    // SAFETY: the control buffer (32 bytes, 8-aligned) is large enough for one
    // cmsg carrying a u16; the kernel only reads buf.
    let n = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg as u16);
        libc::sendmsg(fd, &msg, 0)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn wait_writable(fd: RawFd, ms: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// Sends one datagram or GSO batch. Returns false if the socket failed for
/// good (the caller marks the connection dead via quiche's timeout).
fn send_batch(sock: &UdpSocket, buf: &[u8], seg: usize, count: usize, gso: &mut bool) {
    let fd = sock.as_raw_fd();
    for attempt in 0..20 {
        let res = if count > 1 {
            send_gso(fd, buf, seg)
        } else {
            sock.send(buf)
        };
        match res {
            Ok(_) => return,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && attempt < 19 => {
                wait_writable(fd, 5);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if count > 1
                    && matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL)) =>
            {
                // No GSO on this path: fall back to one datagram per send.
                *gso = false;
                for chunk in buf.chunks(seg) {
                    let _ = sock.send(chunk);
                }
                return;
            }
            // Dropped; quiche's loss recovery resends (or times out).
            Err(_) => return,
        }
    }
}

fn cpu_now(who: libc::c_int) -> (f64, f64) {
    // SAFETY: rusage is plain data, filled by the kernel.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

// ---------------------------------------------------------------------------
// One connection's work.

fn new_conn(o: &Opts, config: &mut quiche::Config, gro: bool) -> Result<Conn, String> {
    let sock = new_socket(o.peer, gro).map_err(|e| format!("UDP socket: {e}"))?;
    let local = sock.local_addr().map_err(|e| format!("UDP socket: {e}"))?;
    let mut scid = [0u8; 16];
    boring::rand::rand_bytes(&mut scid).map_err(|e| format!("random: {e}"))?;
    let scid = quiche::ConnectionId::from_ref(&scid);
    let q = quiche::connect(Some(&o.host), &scid, local, o.peer, config)
        .map_err(|e| format!("quiche connect: {e:?}"))?;
    Ok(Conn {
        q,
        h3: None,
        sock,
        local,
        opened: Instant::now(),
        established: false,
        dead: false,
        goaway: false,
        inflight: Vec::with_capacity(o.streams),
        timer: None,
        dirty: true,
    })
}

/// Reads what the socket has and feeds it to quiche. True if anything came.
fn recv_conn(c: &mut Conn, cx: &mut Ctx) -> bool {
    let mut got = false;
    let fd = c.sock.as_raw_fd();
    let info = quiche::RecvInfo {
        from: cx.o.peer,
        to: c.local,
    };
    for _ in 0..MAX_RECV_PER_WAKE {
        let res = if cx.gro {
            recv_gro(fd, &mut cx.recv_buf)
        } else {
            c.sock.recv(&mut cx.recv_buf).map(|n| (n, n))
        };
        let (n, seg) = match res {
            Ok(v) => v,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // ICMP errors (port unreachable): quiche times out the
                // connection; say why once.
                if !c.established {
                    cx.error(format_args!("connection from {}: {e}", c.local));
                }
                return got;
            }
        };
        got = true;
        let mut off = 0;
        while off < n {
            let end = (off + seg.max(1)).min(n);
            // Errors are per packet (undecryptable, duplicate): quiche drops
            // the packet and, for fatal ones, closes the connection, which
            // the caller reports.
            let _ = c.q.recv(&mut cx.recv_buf[off..end], info);
            off = end;
        }
    }
    got
}

/// Sends everything quiche has for this connection, batching equal-size
/// datagrams with GSO.
fn flush_conn(c: &mut Conn, cx: &mut Ctx) {
    let buf = &mut cx.send_buf;
    loop {
        let mut off = 0;
        let mut seg = 0;
        let mut count = 0;
        let mut done = false;
        while count < MAX_GSO_SEGMENTS {
            let (len, _) = match c.q.send(&mut buf[off..off + MAX_SEND_UDP]) {
                Ok(v) => v,
                Err(quiche::Error::Done) => {
                    done = true;
                    break;
                }
                Err(e) => {
                    let _ = c.q.close(false, 0x1, b"send failed");
                    eprintln!("h3load: quiche send failed: {e:?}");
                    done = true;
                    break;
                }
            };
            if count == 0 {
                seg = len;
                off = len;
                count = 1;
                if !cx.gso {
                    break;
                }
                continue;
            }
            if len > seg {
                // Cannot join a batch of smaller segments: send the batch,
                // start a new one with this datagram.
                send_batch(&c.sock, &buf[..off], seg, count, &mut cx.gso);
                buf.copy_within(off..off + len, 0);
                seg = len;
                off = len;
                count = 1;
                continue;
            }
            off += len;
            count += 1;
            if len < seg {
                break;
            }
        }
        if count > 0 {
            send_batch(&c.sock, &buf[..off], seg, count, &mut cx.gso);
        }
        if done {
            return;
        }
    }
}

fn fail_req(cx: &mut Ctx, r: &Req, why: std::fmt::Arguments) {
    cx.stats.failed += 1;
    cx.error(format_args!("stream {}: {why}", r.sid));
}

/// Starts one request with the given start time. False if the connection
/// cannot take another stream right now.
fn start_req(c: &mut Conn, cx: &mut Ctx, start: Instant) -> bool {
    let Some(h3) = c.h3.as_mut() else {
        return false;
    };
    let headers = &cx.o.templates[cx.rr % cx.o.templates.len()];
    let fin = cx.o.body.is_empty();
    match h3.send_request(&mut c.q, headers, fin) {
        Ok(sid) => {
            cx.rr += 1;
            cx.stats.started += 1;
            if cx.closed_loop {
                if let Some(q) = cx.quota.as_mut() {
                    *q -= 1;
                }
            }
            c.inflight.push(Req {
                sid,
                start,
                body_off: 0,
                body_done: fin,
                status: 0,
                content_length: None,
                bytes: 0,
            });
            true
        }
        Err(quiche::h3::Error::StreamBlocked)
        | Err(quiche::h3::Error::TransportError(quiche::Error::StreamLimit))
        | Err(quiche::h3::Error::TransportError(quiche::Error::Done))
        | Err(quiche::h3::Error::Done) => false,
        Err(e) => {
            cx.error(format_args!("cannot send request: {e:?}"));
            let _ = c.q.close(true, H3_INTERNAL_ERROR, b"send_request failed");
            false
        }
    }
}

/// Starts requests while the connection has room and the mode allows.
fn fill(c: &mut Conn, cx: &mut Ctx, now: Instant) {
    if c.h3.is_none() || c.goaway || c.dead || c.q.is_closed() {
        return;
    }
    while c.inflight.len() < cx.o.streams {
        if cx.closed_loop {
            if !cx.may_start(now) || !start_req(c, cx, now) {
                return;
            }
        } else {
            let Some(due) = cx.backlog.pop_front() else {
                return;
            };
            if !start_req(c, cx, due) {
                cx.backlog.push_front(due);
                return;
            }
        }
    }
}

fn send_bodies(c: &mut Conn, cx: &mut Ctx) {
    let body = &cx.o.body;
    let Some(h3) = c.h3.as_mut() else { return };
    let mut i = 0;
    while i < c.inflight.len() {
        let r = &mut c.inflight[i];
        if r.body_done {
            i += 1;
            continue;
        }
        match h3.send_body(&mut c.q, r.sid, &body[r.body_off..], true) {
            Ok(w) => {
                r.body_off += w;
                cx.stats.bytes_out += w as u64;
                if r.body_off == body.len() {
                    r.body_done = true;
                }
            }
            Err(quiche::h3::Error::Done) | Err(quiche::h3::Error::StreamBlocked) => {}
            Err(e) => {
                // Stopped or reset by the peer, or worse: the request fails
                // (a final response that already arrived is not enough when
                // the server refused the rest of the body).
                let r = c.inflight.swap_remove(i);
                fail_req(cx, &r, format_args!("sending the body failed: {e:?}"));
                let _ =
                    c.q.stream_shutdown(r.sid, quiche::Shutdown::Read, H3_REQUEST_CANCELLED);
                continue;
            }
        }
        i += 1;
    }
}

fn on_headers(c: &mut Conn, cx: &mut Ctx, sid: u64, list: &[quiche::h3::Header]) {
    let Some(i) = c.inflight.iter().position(|r| r.sid == sid) else {
        return;
    };
    if c.inflight[i].status >= 200 {
        return; // trailers
    }
    let mut status = None;
    let mut clen = None;
    for h in list {
        match h.name() {
            b":status" => {
                status = std::str::from_utf8(h.value())
                    .ok()
                    .and_then(|v| v.parse::<u16>().ok())
            }
            b"content-length" => {
                clen = std::str::from_utf8(h.value())
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
            }
            _ => {}
        }
    }
    match status {
        Some(s) if (100..200).contains(&s) => {}
        Some(s) if (200..1000).contains(&s) => {
            c.inflight[i].status = s;
            c.inflight[i].content_length = clen;
        }
        _ => {
            let r = c.inflight.swap_remove(i);
            fail_req(cx, &r, format_args!("response without a valid :status"));
            let _ =
                c.q.stream_shutdown(sid, quiche::Shutdown::Read, H3_REQUEST_CANCELLED);
            let _ =
                c.q.stream_shutdown(sid, quiche::Shutdown::Write, H3_REQUEST_CANCELLED);
        }
    }
}

fn on_data(c: &mut Conn, cx: &mut Ctx, sid: u64) {
    let idx = c.inflight.iter().position(|r| r.sid == sid);
    let Some(h3) = c.h3.as_mut() else { return };
    while let Ok(n) = h3.recv_body(&mut c.q, sid, &mut cx.body_buf) {
        cx.stats.bytes_in += n as u64;
        if let Some(i) = idx {
            c.inflight[i].bytes += n as u64;
        }
    }
}

fn on_finished(c: &mut Conn, cx: &mut Ctx, sid: u64, now: Instant) {
    let Some(i) = c.inflight.iter().position(|r| r.sid == sid) else {
        return;
    };
    let r = c.inflight.swap_remove(i);
    if r.status < 200 {
        fail_req(
            cx,
            &r,
            format_args!("stream ended without a final response"),
        );
        return;
    }
    if let Some(want) = r.content_length {
        if want != r.bytes {
            fail_req(
                cx,
                &r,
                format_args!(
                    "status {}: {} body bytes, content-length said {want}",
                    r.status, r.bytes
                ),
            );
            return;
        }
    }
    if !r.body_done {
        // A complete response before the whole request body went out
        // (RFC 9114 §4.1): the exchange is over; stop sending.
        let _ =
            c.q.stream_shutdown(sid, quiche::Shutdown::Write, H3_NO_ERROR);
    }
    cx.stats.done += 1;
    cx.stats.status[usize::from(r.status)] += 1;
    cx.stats
        .latency
        .record(now.saturating_duration_since(r.start).as_micros() as u64);
}

fn poll_h3(c: &mut Conn, cx: &mut Ctx, now: Instant) {
    loop {
        let Some(h3) = c.h3.as_mut() else { return };
        let (sid, ev) = match h3.poll(&mut c.q) {
            Ok(v) => v,
            Err(quiche::h3::Error::Done) => return,
            Err(e) => {
                cx.error(format_args!("HTTP/3 error: {e:?}"));
                cx.stats.conn_errors += 1;
                if !c.q.is_closed() && c.q.local_error().is_none() {
                    let _ = c.q.close(true, H3_INTERNAL_ERROR, b"");
                }
                return;
            }
        };
        match ev {
            quiche::h3::Event::Headers { list, .. } => on_headers(c, cx, sid, &list),
            quiche::h3::Event::Data => on_data(c, cx, sid),
            quiche::h3::Event::Finished => on_finished(c, cx, sid, now),
            quiche::h3::Event::Reset(code) => {
                if let Some(i) = c.inflight.iter().position(|r| r.sid == sid) {
                    let r = c.inflight.swap_remove(i);
                    fail_req(
                        cx,
                        &r,
                        format_args!("reset by the server: 0x{code:x} {}", h3_code_name(code)),
                    );
                }
            }
            quiche::h3::Event::GoAway => {
                c.goaway = true;
                cx.error(format_args!("GOAWAY (id {sid}) from the server"));
                let mut i = 0;
                while i < c.inflight.len() {
                    if c.inflight[i].sid >= sid {
                        let r = c.inflight.swap_remove(i);
                        fail_req(cx, &r, format_args!("not processed: GOAWAY id {sid}"));
                    } else {
                        i += 1;
                    }
                }
            }
            quiche::h3::Event::PriorityUpdate => {}
        }
    }
}

/// Runs everything a connection needs after input: handshake bookkeeping,
/// HTTP/3 events, new requests, request bodies, sending.
fn service(c: &mut Conn, cx: &mut Ctx, now: Instant) {
    c.dirty = false;
    if c.dead {
        return;
    }
    if !c.established && c.q.is_established() {
        c.established = true;
        cx.handshaking -= 1;
        cx.stats.connected += 1;
        cx.stats
            .handshake
            .record(now.saturating_duration_since(c.opened).as_micros() as u64);
        match quiche::h3::Config::new()
            .and_then(|cfg| quiche::h3::Connection::with_transport(&mut c.q, &cfg))
        {
            Ok(h3) => c.h3 = Some(h3),
            Err(e) => {
                cx.error(format_args!("HTTP/3 setup failed: {e:?}"));
                let _ = c.q.close(true, H3_INTERNAL_ERROR, b"h3 setup failed");
            }
        }
    }
    if c.h3.is_some() {
        poll_h3(c, cx, now);
        fill(c, cx, now);
        send_bodies(c, cx);
    }
    flush_conn(c, cx);
    if c.q.is_closed() {
        c.dead = true;
        let why = if let Some(e) = c.q.peer_error() {
            if is_error_close(e) {
                cx.stats.conn_errors += 1;
            }
            Some(format!("closed by the server: {}", describe_close(e)))
        } else if let Some(e) = c.q.local_error() {
            if is_error_close(e) {
                cx.stats.conn_errors += 1;
            }
            Some(format!("closed locally: {}", describe_close(e)))
        } else if c.q.is_timed_out() {
            cx.stats.conn_errors += 1;
            Some("idle timeout".to_string())
        } else {
            None
        };
        let n = c.inflight.len();
        let failed_handshake = !c.established;
        if failed_handshake {
            cx.stats.conn_failed += 1;
            cx.handshaking -= 1;
        }
        if n > 0 || failed_handshake || cx.loading {
            cx.error(format_args!(
                "connection {} {}{}",
                c.local,
                why.as_deref().unwrap_or("closed"),
                if failed_handshake {
                    " before the handshake completed".to_string()
                } else if n > 0 {
                    format!(", {n} request(s) in flight")
                } else {
                    String::new()
                }
            ));
        }
        cx.stats.failed += n as u64;
        c.inflight.clear();
    }
}

// ---------------------------------------------------------------------------
// One thread.

struct Worker<'a> {
    cx: Ctx<'a>,
    conns: Vec<Conn>,
    /// Connections this thread opens in total.
    target: usize,
    config: quiche::Config,
    ep: OwnedFd,
    events: Vec<libc::epoll_event>,
    ready: Vec<u64>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    dirty: Vec<usize>,
}

fn client_config(o: &Opts) -> Result<quiche::Config, String> {
    let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION)
        .map_err(|e| format!("quiche config: {e:?}"))?;
    config.verify_peer(o.cacert.is_some());
    if let Some(ca) = &o.cacert {
        config
            .load_verify_locations_from_file(ca)
            .map_err(|e| format!("cannot load CA file {ca}: {e:?}"))?;
    }
    config
        .set_application_protos(quiche::h3::APPLICATION_PROTOCOL)
        .map_err(|e| format!("quiche config: {e:?}"))?;
    config.set_max_idle_timeout(o.idle_timeout);
    config.set_max_recv_udp_payload_size(MAX_RECV_UDP);
    config.set_max_send_udp_payload_size(MAX_SEND_UDP);
    // Windows large enough that the client never limits a 10 MiB download.
    config.set_initial_max_data(32 << 20);
    config.set_initial_max_stream_data_bidi_local(16 << 20);
    config.set_initial_max_stream_data_bidi_remote(1 << 20);
    config.set_initial_max_stream_data_uni(1 << 20);
    config.set_initial_max_streams_bidi(16);
    config.set_initial_max_streams_uni(16);
    config.set_max_connection_window(64 << 20);
    config.set_max_stream_window(16 << 20);
    config.set_disable_active_migration(true);
    Ok(config)
}

impl<'a> Worker<'a> {
    fn new(cx: Ctx<'a>, target: usize) -> Result<Worker<'a>, String> {
        let config = client_config(cx.o)?;
        let ep = epoll_create().map_err(|e| format!("epoll: {e}"))?;
        Ok(Worker {
            cx,
            conns: Vec::with_capacity(target),
            target,
            config,
            ep,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 256],
            ready: Vec::with_capacity(256),
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
        })
    }

    fn mark(&mut self, i: usize) {
        if !self.conns[i].dirty {
            self.conns[i].dirty = true;
            self.dirty.push(i);
        }
    }

    /// Opens connections until `connect_batch` handshakes are in flight.
    fn open_more(&mut self) {
        let want = self
            .cx
            .o
            .connect_batch
            .saturating_sub(self.cx.handshaking)
            .min(self.target - self.conns.len());
        for _ in 0..want {
            let i = self.conns.len();
            match new_conn(self.cx.o, &mut self.config, self.cx.gro) {
                Ok(c) => {
                    if let Err(e) =
                        epoll_ctl(&self.ep, libc::EPOLL_CTL_ADD, c.sock.as_raw_fd(), i as u64)
                    {
                        eprintln!("h3load: epoll_ctl: {e}");
                        std::process::exit(2);
                    }
                    self.conns.push(c);
                    self.cx.handshaking += 1;
                    // `dirty` starts true: queue it for its first flight.
                    self.dirty.push(i);
                }
                Err(e) => {
                    eprintln!("h3load: {e}");
                    std::process::exit(2);
                }
            }
        }
    }

    /// One turn of the loop: wait at most until `until`, read, fire timers,
    /// service what changed.
    fn turn(&mut self, until: Instant) {
        let now = Instant::now();
        let mut wait = until.saturating_duration_since(now);
        if let Some(Reverse((t, _))) = self.timers.peek() {
            wait = wait.min(t.saturating_duration_since(now));
        }
        if !self.dirty.is_empty() {
            wait = Duration::ZERO;
        }
        self.ready.clear();
        epoll_wait(&self.ep, &mut self.events, wait, &mut self.ready);
        for k in 0..self.ready.len() {
            let i = self.ready[k] as usize;
            if i < self.conns.len()
                && !self.conns[i].dead
                && recv_conn(&mut self.conns[i], &mut self.cx)
            {
                self.mark(i);
            }
        }
        let now = Instant::now();
        while let Some(&Reverse((t, i))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if self.conns[i].timer == Some(t) {
                self.conns[i].timer = None;
                self.conns[i].q.on_timeout();
                self.mark(i);
            }
        }
        self.service_dirty(now);
    }

    fn service_dirty(&mut self, now: Instant) {
        let mut k = 0;
        while k < self.dirty.len() {
            let i = self.dirty[k];
            k += 1;
            let c = &mut self.conns[i];
            service(c, &mut self.cx, now);
            if c.dead {
                c.timer = None;
                let _ = epoll_ctl(&self.ep, libc::EPOLL_CTL_DEL, c.sock.as_raw_fd(), 0);
                continue;
            }
            let t = c.q.timeout_instant();
            if t != c.timer {
                c.timer = t;
                if let Some(t) = t {
                    self.timers.push(Reverse((t, i)));
                }
            }
        }
        self.dirty.clear();
        // Most pushed deadlines are superseded quickly (every packet moves
        // the idle timer); drop the stale ones before they pile up.
        if self.timers.len() > 4 * self.conns.len() + 1024 {
            let conns = &self.conns;
            self.timers
                .retain(|Reverse((t, i))| conns[*i].timer == Some(*t));
        }
    }

    fn inflight(&self) -> usize {
        self.conns.iter().map(|c| c.inflight.len()).sum()
    }

    /// Handshake phase: open every connection (at most `connect_batch` at a
    /// time) and wait until each is up or failed, or the timeout.
    fn connect(&mut self, start: Instant) {
        let deadline = start + self.cx.o.timeout;
        loop {
            self.open_more();
            if self.cx.handshaking == 0 && self.conns.len() == self.target {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                let n = self.cx.handshaking + (self.target - self.conns.len());
                self.cx.error(format_args!(
                    "{n} connection(s) not established after {:.1} s",
                    self.cx.o.timeout.as_secs_f64()
                ));
                self.cx.stats.conn_failed += n as u64;
                for c in &mut self.conns {
                    if !c.established && !c.dead {
                        c.dead = true;
                        c.timer = None;
                        let _ = c.q.close(false, 0x0, b"handshake timeout");
                    }
                }
                self.cx.handshaking = 0;
                break;
            }
            self.turn(deadline);
        }
        self.cx.stats.connect_time = start.elapsed();
    }

    /// Load phase.
    fn load(&mut self, mode: Mode) {
        let t0 = Instant::now();
        let cpu0 = cpu_now(libc::RUSAGE_THREAD);
        self.cx.loading = true;
        let drain = self.cx.o.timeout;
        let mut end_at: Option<Instant> = None;
        let mut next_due = t0;
        let mut interval = None;
        let mut next_ping = None;
        let ping_every = Duration::from_millis((self.cx.o.idle_timeout / 4).max(100));
        match mode {
            Mode::Count(n) => {
                self.cx.quota = Some(n);
            }
            Mode::Duration(d) => {
                self.cx.stop_issuing = Some(t0 + d);
                end_at = Some(t0 + d + drain);
            }
            Mode::Rate {
                interval: iv,
                count,
                duration,
            } => {
                self.cx.closed_loop = false;
                self.cx.quota = count;
                if let Some(d) = duration {
                    self.cx.stop_issuing = Some(t0 + d);
                    end_at = Some(t0 + d + drain);
                }
                interval = Some(iv);
            }
            Mode::Idle(d) => {
                self.cx.quota = Some(0);
                end_at = Some(t0 + d);
                next_ping = Some(t0 + ping_every);
            }
        }
        for i in 0..self.conns.len() {
            self.mark(i);
        }
        let mut last_done = t0;
        let mut done_before = self.cx.stats.done + self.cx.stats.failed;
        loop {
            let now = Instant::now();
            // Open loop: every due request goes to the backlog, and
            // connections with room are woken to take them.
            if let Some(iv) = interval {
                while next_due <= now && self.cx.may_start(next_due) {
                    self.cx.backlog.push_back(next_due);
                    if let Some(q) = self.cx.quota.as_mut() {
                        *q -= 1;
                    }
                    next_due += iv;
                }
                if !self.cx.backlog.is_empty() {
                    let mut want = self.cx.backlog.len();
                    let n = self.conns.len();
                    for k in 0..n {
                        if want == 0 {
                            break;
                        }
                        let i = (self.cx.rr + k) % n;
                        let c = &self.conns[i];
                        let room = self.cx.o.streams.saturating_sub(c.inflight.len());
                        if room > 0 && c.h3.is_some() && !c.dead && !c.goaway {
                            want = want.saturating_sub(room);
                            self.mark(i);
                        }
                    }
                }
            }
            if let Some(t) = next_ping {
                if now >= t {
                    for i in 0..self.conns.len() {
                        if !self.conns[i].dead {
                            let _ = self.conns[i].q.send_ack_eliciting();
                            self.mark(i);
                        }
                    }
                    next_ping = Some(now + ping_every);
                }
            }
            if !self.dirty.is_empty() {
                self.service_dirty(now);
            }
            let finished = self.cx.stats.done + self.cx.stats.failed;
            if finished != done_before {
                done_before = finished;
                last_done = Instant::now();
            }

            let alive = self.conns.iter().any(|c| !c.dead);
            let issuing = alive
                && match mode {
                    Mode::Idle(_) => false,
                    _ => self.cx.may_start(now) || !self.cx.backlog.is_empty(),
                };
            if let Some(t) = end_at {
                if now >= t {
                    let inflight = self.inflight();
                    if inflight > 0 || !self.cx.backlog.is_empty() {
                        let n = inflight + self.cx.backlog.len();
                        self.cx.error(format_args!(
                            "{n} request(s) unfinished {:.1} s after the end of the run",
                            drain.as_secs_f64()
                        ));
                        self.cx.stats.failed += n as u64;
                        self.cx.stats.started += self.cx.backlog.len() as u64;
                        self.cx.backlog.clear();
                        for c in &mut self.conns {
                            c.inflight.clear();
                        }
                    }
                    break;
                }
            }
            if !matches!(mode, Mode::Idle(_)) && !issuing && self.inflight() == 0 {
                break;
            }
            if !alive {
                let lost = self.cx.backlog.len() as u64 + self.cx.quota.unwrap_or(0);
                if lost > 0 && !matches!(mode, Mode::Idle(_)) {
                    self.cx.error(format_args!(
                        "every connection is closed; {lost} request(s) not sent"
                    ));
                    self.cx.stats.failed += lost;
                }
                break;
            }
            let mut until = end_at.unwrap_or(now + Duration::from_secs(3600));
            if let Some(t) = self.cx.stop_issuing {
                if now < t {
                    until = until.min(t);
                }
            }
            if interval.is_some() && self.cx.may_start(next_due) {
                until = until.min(next_due);
            }
            if let Some(t) = next_ping {
                until = until.min(t);
            }
            self.turn(until);
        }
        let cpu1 = cpu_now(libc::RUSAGE_THREAD);
        self.cx.stats.elapsed = match mode {
            Mode::Idle(_) => t0.elapsed(),
            _ => last_done.saturating_duration_since(t0),
        };
        self.cx.stats.cpu_user = cpu1.0 - cpu0.0;
        self.cx.stats.cpu_sys = cpu1.1 - cpu0.1;
        self.cx.loading = false;
        // Close politely; do not wait for the peer.
        for c in &mut self.conns {
            if !c.dead && !c.q.is_closed() {
                let _ = c.q.close(true, H3_NO_ERROR, b"");
                flush_conn(c, &mut self.cx);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Setup and report.

fn split_header(s: &str) -> Result<(String, String), String> {
    let i = s
        .char_indices()
        .skip(1)
        .find(|&(_, c)| c == ':')
        .map(|(i, _)| i)
        .ok_or_else(|| format!("bad header {s:?}: expected 'name: value'"))?;
    Ok((
        s[..i].trim().to_ascii_lowercase(),
        s[i + 1..].trim().to_string(),
    ))
}

fn setup(args: &Args) -> Result<(Opts, Mode), String> {
    if args.urls.is_empty() {
        return Err("give at least one URL".into());
    }
    let targets: Vec<Target> = args
        .urls
        .iter()
        .map(|u| parse_url(u))
        .collect::<Result<_, _>>()?;
    let first = &targets[0];
    if targets
        .iter()
        .any(|t| t.host != first.host || t.port != first.port)
    {
        return Err("all URLs must name the same host and port".into());
    }
    if args.connections == 0 || args.streams == 0 || args.threads == 0 {
        return Err("-c, -m and -t must be at least 1".into());
    }
    if args.connect_batch == 0 {
        return Err("--connect-batch must be at least 1".into());
    }
    let secs = |name: &str, v: f64| {
        Duration::try_from_secs_f64(v)
            .ok()
            .filter(|d| !d.is_zero() && d.as_secs() < 1_000_000)
            .ok_or_else(|| format!("bad {name} {v}"))
    };
    let timeout = secs("--timeout", args.timeout)?;
    let duration = args.duration.map(|d| secs("-d", d)).transpose()?;
    let idle = args.idle.map(|d| secs("--idle", d)).transpose()?;
    let modes = usize::from(args.requests.is_some())
        + usize::from(duration.is_some())
        + usize::from(idle.is_some());
    if modes != 1 {
        return Err("give exactly one of -n, -d and --idle".into());
    }
    if idle.is_some() && args.rps.is_some() {
        return Err("--rps makes no sense with --idle".into());
    }
    let threads = args.threads.min(args.connections);
    let mode = if let Some(d) = idle {
        Mode::Idle(d)
    } else if let Some(rps) = args.rps {
        if !(rps.is_finite() && rps > 0.0) {
            return Err(format!("bad --rps {rps}"));
        }
        let per_thread = rps / threads as f64;
        Mode::Rate {
            interval: Duration::from_secs_f64(1.0 / per_thread),
            count: args.requests,
            duration,
        }
    } else if let Some(d) = duration {
        Mode::Duration(d)
    } else {
        Mode::Count(args.requests.unwrap_or(0))
    };

    let body = match (&args.data_file, args.data_size) {
        (Some(_), Some(_)) => return Err("use either --data-file or --data-size".into()),
        (Some(p), None) => std::fs::read(p).map_err(|e| format!("cannot read {p}: {e}"))?,
        (None, Some(n)) => (0..n as u64)
            .map(|i| (i.wrapping_mul(7).wrapping_add(i >> 8)) as u8)
            .collect(),
        (None, None) => Vec::new(),
    };
    let has_body = args.data_file.is_some() || args.data_size.is_some();
    let method = args
        .method
        .clone()
        .unwrap_or_else(|| if has_body { "POST" } else { "GET" }.to_string());
    let mut extra = Vec::new();
    for h in &args.header {
        extra.push(split_header(h)?);
    }
    let templates = targets
        .iter()
        .map(|t| {
            let mut list: Vec<(String, String)> = vec![
                (":method".into(), method.clone()),
                (":scheme".into(), "https".into()),
                (":authority".into(), t.authority.clone()),
                (":path".into(), t.path.clone()),
                (
                    "user-agent".into(),
                    concat!("h3load/", env!("CARGO_PKG_VERSION")).into(),
                ),
            ];
            for (n, v) in &extra {
                if let Some(slot) = list.iter_mut().find(|(ln, _)| ln == n) {
                    slot.1 = v.clone();
                } else {
                    list.push((n.clone(), v.clone()));
                }
            }
            if has_body && !list.iter().any(|(n, _)| n == "content-length") {
                list.push(("content-length".into(), body.len().to_string()));
            }
            list.iter()
                .map(|(n, v)| quiche::h3::Header::new(n.as_bytes(), v.as_bytes()))
                .collect()
        })
        .collect();

    let peer = (first.host.as_str(), first.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", first.host))?
        .min_by_key(|a| !a.is_ipv4())
        .ok_or_else(|| format!("cannot resolve {}", first.host))?;
    Ok((
        Opts {
            host: first.host.clone(),
            peer,
            templates,
            body: Arc::new(body),
            streams: args.streams,
            cacert: args.cacert.clone(),
            idle_timeout: args.idle_timeout,
            timeout,
            connect_batch: args.connect_batch,
            gso: !args.no_gso,
        },
        mode,
    ))
}

fn raise_nofile(need: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < need + 64 {
            let _ = setrlimit(
                Resource::RLIMIT_NOFILE,
                hard.min(need + 1024).max(soft),
                hard,
            );
        }
    }
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.2} kB", b / 1e3)
    } else {
        format!("{b} B")
    }
}

fn main() {
    let args: Args = argh::from_env();
    let (opts, mode) = match setup(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("h3load: {e}");
            std::process::exit(2);
        }
    };
    let threads = args.threads.min(args.connections);
    raise_nofile(args.connections as u64 + 16);

    // Split connections and (for -n) requests over the threads.
    let split = |total: u64, k: usize| {
        total / threads as u64 + u64::from((k as u64) < total % threads as u64)
    };
    let barrier = Barrier::new(threads);
    let cpu0 = cpu_now(libc::RUSAGE_SELF);
    let wall0 = Instant::now();
    let results: Vec<Stats> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|k| {
                let opts = &opts;
                let barrier = &barrier;
                let conns = split(args.connections as u64, k) as usize;
                let mode = match mode {
                    Mode::Count(n) => Mode::Count(split(n, k)),
                    Mode::Rate {
                        interval,
                        count,
                        duration,
                    } => Mode::Rate {
                        interval,
                        count: count.map(|n| split(n, k)),
                        duration,
                    },
                    m => m,
                };
                s.spawn(move || {
                    let cx = Ctx {
                        o: opts,
                        id: k,
                        stats: Stats::new(),
                        rr: k,
                        quota: None,
                        stop_issuing: None,
                        closed_loop: true,
                        backlog: VecDeque::new(),
                        loading: false,
                        handshaking: 0,
                        send_buf: vec![0; MAX_SEND_UDP * MAX_GSO_SEGMENTS],
                        recv_buf: vec![0; MAX_RECV_UDP],
                        body_buf: vec![0; 64 * 1024],
                        gso: opts.gso,
                        gro: opts.gso,
                    };
                    let mut w = match Worker::new(cx, conns) {
                        Ok(w) => w,
                        Err(e) => {
                            eprintln!("h3load: {e}");
                            std::process::exit(2);
                        }
                    };
                    w.connect(Instant::now());
                    // Every thread starts its load at the same moment.
                    barrier.wait();
                    w.load(mode);
                    w.cx.stats
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| std::process::exit(3)))
            .collect()
    });
    let wall = wall0.elapsed();
    let cpu1 = cpu_now(libc::RUSAGE_SELF);

    let mut t = Stats::new();
    let mut max_thread_pct: f64 = 0.0;
    for r in &results {
        t.merge(r);
        let e = r.elapsed.as_secs_f64();
        if e > 0.0 {
            max_thread_pct = max_thread_pct.max((r.cpu_user + r.cpu_sys) / e * 100.0);
        }
    }
    let idle = matches!(mode, Mode::Idle(_));
    let secs = t.elapsed.as_secs_f64().max(1e-9);
    let rps = t.done as f64 / secs;
    let gbps = (t.bytes_in + t.bytes_out) as f64 * 8.0 / secs / 1e9;
    let cpu_load = t.cpu_user + t.cpu_sys;
    let cpu_pct = cpu_load / secs * 100.0;
    let saturated = max_thread_pct >= SATURATED_CPU * 100.0;
    let non_2xx: u64 = t
        .status
        .iter()
        .enumerate()
        .filter(|(s, _)| !(200..300).contains(s))
        .map(|(_, c)| c)
        .sum();
    let status: Vec<(usize, u64)> = t
        .status
        .iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .map(|(s, &c)| (s, c))
        .collect();
    let ok = t.failed == 0
        && non_2xx == 0
        && t.conn_failed == 0
        && t.conn_errors == 0
        && t.connected == args.connections as u64;

    let mut out = String::new();
    let mode_desc = match mode {
        Mode::Count(n) => format!("{n} requests"),
        Mode::Duration(d) => format!("{:.1} s", d.as_secs_f64()),
        Mode::Rate { .. } => format!(
            "{} at {} req/s",
            args.requests
                .map(|n| format!("{n} requests"))
                .or(args.duration.map(|d| format!("{d:.1} s")))
                .unwrap_or_default(),
            args.rps.unwrap_or(0.0)
        ),
        Mode::Idle(d) => format!("idle {:.1} s", d.as_secs_f64()),
    };
    out.push_str(&format!(
        "h3load: {} ({} URL{}), {threads} thread(s), {} connection(s) x {} stream(s), {mode_desc}\n",
        args.urls[0],
        args.urls.len(),
        if args.urls.len() == 1 { "" } else { "s" },
        args.connections,
        args.streams
    ));
    out.push_str(&format!(
        "connections: {} up, {} failed, {} ended with an error; handshake p50 {} ms, p99 {} ms, max {} ms; all up in {:.3} s\n",
        t.connected,
        t.conn_failed,
        t.conn_errors,
        ms(t.handshake.percentile(50.0)),
        ms(t.handshake.percentile(99.0)),
        ms(t.handshake.max),
        t.connect_time.as_secs_f64()
    ));
    if !idle {
        out.push_str(&format!(
            "requests:    {} started, {} done, {} failed\n",
            t.started, t.done, t.failed
        ));
        let st: Vec<String> = status.iter().map(|(s, c)| format!("{s}: {c}")).collect();
        out.push_str(&format!(
            "status:      {}\n",
            if st.is_empty() {
                "-".to_string()
            } else {
                st.join(", ")
            }
        ));
        out.push_str(&format!(
            "throughput:  {rps:.1} req/s over {secs:.3} s; body bytes in {} out {}; {gbps:.3} Gbps\n",
            human_bytes(t.bytes_in),
            human_bytes(t.bytes_out)
        ));
        out.push_str(&format!(
            "latency:     p50 {} ms, p90 {} ms, p99 {} ms, max {} ms ({} samples{})\n",
            ms(t.latency.percentile(50.0)),
            ms(t.latency.percentile(90.0)),
            ms(t.latency.percentile(99.0)),
            ms(t.latency.max),
            t.latency.total,
            if args.rps.is_some() {
                ", from when each request was due"
            } else {
                ""
            }
        ));
    } else {
        out.push_str(&format!(
            "idle:        {} connection(s) held for {secs:.1} s\n",
            t.connected
        ));
    }
    let self_total = (cpu1.0 - cpu0.0) + (cpu1.1 - cpu0.1);
    out.push_str(&format!(
        "cpu:         h3load {:.2} s user + {:.2} s sys in the run = {cpu_pct:.0}% of one core; busiest thread {max_thread_pct:.0}%; {self_total:.2} s in all over {:.2} s{}\n",
        t.cpu_user,
        t.cpu_sys,
        wall.as_secs_f64(),
        if saturated {
            "\nh3load: SATURATED: a thread used >= 90% of a core; the numbers may be h3load's limit, not the server's (add -t)"
        } else {
            ""
        }
    ));
    if t.errors_suppressed > 0 {
        out.push_str(&format!(
            "errors:      {} more error line(s) not printed\n",
            t.errors_suppressed
        ));
    }
    if !ok {
        out.push_str("h3load: FAILED (failed requests, non-2xx statuses or connection errors)\n");
    }

    if args.json {
        eprint!("{out}");
        let st: Vec<String> = status.iter().map(|(s, c)| format!("\"{s}\":{c}")).collect();
        println!(
            "{{\"ok\":{ok},\"mode\":\"{}\",\"threads\":{threads},\"connections\":{},\"streams\":{},\
\"connected\":{},\"conn_failed\":{},\"conn_errors\":{},\"started\":{},\"done\":{},\"failed\":{},\
\"non_2xx\":{non_2xx},\"status\":{{{}}},\"elapsed_s\":{secs:.6},\"rps\":{rps:.3},\"bytes_in\":{},\
\"bytes_out\":{},\"gbps\":{gbps:.6},\"latency_ms\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"max\":{}}},\
\"handshake_ms\":{{\"p50\":{},\"p99\":{},\"max\":{}}},\"connect_s\":{:.6},\"cpu_user_s\":{:.6},\
\"cpu_sys_s\":{:.6},\"cpu_pct\":{cpu_pct:.2},\"max_thread_cpu_pct\":{max_thread_pct:.2},\
\"saturated\":{saturated}}}",
            match mode {
                Mode::Count(_) => "count",
                Mode::Duration(_) => "duration",
                Mode::Rate { .. } => "rate",
                Mode::Idle(_) => "idle",
            },
            args.connections,
            args.streams,
            t.connected,
            t.conn_failed,
            t.conn_errors,
            t.started,
            t.done,
            t.failed,
            st.join(","),
            t.bytes_in,
            t.bytes_out,
            ms(t.latency.percentile(50.0)),
            ms(t.latency.percentile(90.0)),
            ms(t.latency.percentile(99.0)),
            ms(t.latency.max),
            ms(t.handshake.percentile(50.0)),
            ms(t.handshake.percentile(99.0)),
            ms(t.handshake.max),
            t.connect_time.as_secs_f64(),
            t.cpu_user,
            t.cpu_sys,
        );
    } else {
        print!("{out}");
    }
    std::process::exit(if ok { 0 } else { 1 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hist_buckets_are_contiguous_and_tight() {
        let mut prev = 0;
        for v in 0..200_000u64 {
            let i = Hist::index(v);
            assert!(i == prev || i == prev + 1, "v {v} idx {i} prev {prev}");
            prev = i;
        }
        for v in (0..200_000u64).chain((8..41).map(|s| (1u64 << s) + 12345)) {
            let i = Hist::index(v);
            assert!(
                Hist::upper(i) >= v,
                "v {v} idx {i} upper {}",
                Hist::upper(i)
            );
            if i > 0 {
                assert!(Hist::upper(i - 1) < v, "v {v} idx {i}");
            }
            if v >= HIST_SUB {
                let err = (Hist::upper(i) - v) as f64 / v as f64;
                assert!(err < 0.008, "v {v} err {err}");
            }
        }
        assert!(Hist::index(1 << 40) < Hist::new().counts.len());
    }

    #[test]
    fn hist_percentiles() {
        let mut h = Hist::new();
        for v in 1..=1000u64 {
            h.record(v * 10);
        }
        let p50 = h.percentile(50.0);
        assert!((4980..=5040).contains(&p50), "{p50}");
        let p99 = h.percentile(99.0);
        assert!((9880..=9980).contains(&p99), "{p99}");
        assert_eq!(h.percentile(100.0), 10000);
        assert_eq!(Hist::new().percentile(50.0), 0);
    }

    #[test]
    fn urls() {
        let t = parse_url("https://localhost:8443/a?b").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("localhost", 8443, "/a?b")
        );
        let t = parse_url("https://[::1]/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 443));
        assert!(parse_url("http://x/").is_err());
    }
}
