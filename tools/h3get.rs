//! h3get: h3gate's own HTTP/3 client, used by the demo and the end-to-end
//! tests.
//!
//! It speaks HTTP/3 over QUIC with quiche on a plain non-blocking UDP socket
//! driven by poll(2) and quiche's timers (no async runtime). Besides ordinary
//! requests it can send many concurrent streams on one connection, use several
//! connections in parallel, send deliberately malformed header lists
//! (`--raw-headers`), reuse a connection after a stream error (`--then`) and
//! simulate NAT rebinding (`--rebind-every`) and read response bodies slowly
//! (`--rate`). It never panics on anything the server sends: protocol problems
//! are reported on stderr and make the exit status 1.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use argh::FromArgs;
use boring::sha::Sha256;
use quiche::h3::NameValue;

/// Largest UDP payload we send (safe for any path MTU we care about).
const MAX_SEND_UDP: usize = 1350;
/// Largest UDP payload we accept.
const MAX_RECV_UDP: usize = 65527;
/// H3_NO_ERROR.
const H3_NO_ERROR: u64 = 0x100;
/// H3_REQUEST_CANCELLED.
const H3_REQUEST_CANCELLED: u64 = 0x10c;
/// H3_INTERNAL_ERROR.
const H3_INTERNAL_ERROR: u64 = 0x102;

#[derive(FromArgs)]
/// HTTP/3 client for h3gate demos and tests. URL is https://host:port/path.
struct Args {
    /// request URL: https://host[:port]/path (host may be a name, an IPv4
    /// address or [IPv6])
    #[argh(positional)]
    url: String,

    /// request method (default GET, or POST when a body is given)
    #[argh(option, short = 'X')]
    method: Option<String>,

    /// extra request header 'name: value' (repeatable)
    #[argh(option, short = 'H')]
    header: Vec<String>,

    /// read the request body from this file
    #[argh(option)]
    data_file: Option<String>,

    /// send a generated body of N bytes (byte i = (i*7 + (i>>8)) as u8)
    #[argh(option)]
    data_size: Option<u64>,

    /// do not send a content-length header for the body
    #[argh(switch)]
    no_content_length: bool,

    /// size of each body write (default 16384)
    #[argh(option, default = "16384")]
    chunk: usize,

    /// do not verify the server certificate
    #[argh(switch)]
    insecure: bool,

    /// verify the server against this CA file (PEM) instead of the system CAs
    #[argh(option)]
    cacert: Option<String>,

    /// overall deadline in seconds (default 30)
    #[argh(option, default = "30.0")]
    timeout: f64,

    /// QUIC max idle timeout in milliseconds (default 30000)
    #[argh(option, default = "30000")]
    idle_timeout: u64,

    /// number of concurrent requests (streams) per connection (default 1)
    #[argh(option, short = 'n', default = "1")]
    requests: usize,

    /// number of independent connections, each in its own thread (default 1)
    #[argh(option, default = "1")]
    connections: usize,

    /// print the status line and response headers to stderr
    #[argh(switch, short = 'i')]
    include: bool,

    /// write the response body to this file (first request only when
    /// several run concurrently; the --then response is appended)
    #[argh(option, short = 'o')]
    output: Option<String>,

    /// print 'status=S bytes=N sha256=HEX' per response instead of the body
    #[argh(switch)]
    sha256: bool,

    /// do not print response bodies
    #[argh(switch)]
    quiet: bool,

    /// send exactly the -H fields, in order, as the whole header list (no
    /// pseudo-headers added, names not lowercased)
    #[argh(switch)]
    raw_headers: bool,

    /// after the first request(s) finished (or failed), send GET URL2 on the
    /// same connection
    #[argh(option)]
    then: Option<String>,

    /// exit 1 if any response status differs from this
    #[argh(option)]
    expect_status: Option<u16>,

    /// every MS milliseconds switch to a new UDP socket (new local port),
    /// simulating a NAT rebinding
    #[argh(option)]
    rebind_every: Option<u64>,

    /// send the -n requests N times in rounds on the same connection, each
    /// round once the previous one has finished (default 1)
    #[argh(option, default = "1")]
    repeat: usize,

    /// before every round after the first (see --repeat), switch to a new
    /// UDP socket: one NAT rebinding per round
    #[argh(switch)]
    rebind_each: bool,

    /// resume the TLS session saved in FILE (if it exists) and save the new
    /// one there; prints 'session: resumed' or 'session: new' (one connection)
    #[argh(option)]
    session: Option<String>,

    /// with --session: send the requests in 0-RTT early data when the saved
    /// ticket allows it; prints 'early data: accepted, N request(s) sent in
    /// it' or why not
    #[argh(switch)]
    early_data: bool,

    /// QUIC version to start in: 1 (default) or 2 (RFC 9369)
    #[argh(option, default = "1")]
    quic_version: u8,

    /// print connection details to stderr
    #[argh(switch, short = 'v')]
    verbose: bool,

    /// read response bodies no faster than BYTES_PER_SEC per connection (a
    /// token bucket); unread data stays in quiche, which then stops crediting
    /// the server (QUIC flow control): a slow reader
    #[argh(option)]
    rate: Option<u64>,
}

/// A parsed `https://` URL.
struct Target {
    /// Host as used for DNS and SNI (IPv6 without brackets).
    host: String,
    port: u16,
    /// `:authority` value, as written in the URL.
    authority: String,
    /// `:path` value (path and query).
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
    if authority.contains('@') {
        return Err(format!("unsupported URL {s:?}: userinfo is not supported"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let end = v6
            .find(']')
            .ok_or_else(|| format!("bad URL {s:?}: unterminated [IPv6] host"))?;
        let host = &v6[..end];
        let after = &v6[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("bad URL {s:?}: junk after [IPv6] host")),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("bad URL {s:?}: empty host"));
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

fn resolve(t: &Target) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = (t.host.as_str(), t.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", t.host))?
        .collect();
    // Prefer IPv4 (test servers usually listen on 127.0.0.1 or 0.0.0.0).
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("cannot resolve {}: no addresses", t.host))
}

/// Splits `name: value`. The separator is the first ':' after the first
/// character, so pseudo-header names like `:method` work.
fn split_header(s: &str, raw: bool) -> Result<(String, String), String> {
    let sep = s
        .char_indices()
        .skip(1)
        .find(|&(_, c)| c == ':')
        .map(|(i, _)| i);
    match sep {
        Some(i) => {
            let name = &s[..i];
            let value = &s[i + 1..];
            if raw {
                // Keep the value as is, except for the one conventional space.
                Ok((
                    name.to_string(),
                    value.strip_prefix(' ').unwrap_or(value).to_string(),
                ))
            } else {
                Ok((name.trim().to_ascii_lowercase(), value.trim().to_string()))
            }
        }
        None if raw => Ok((s.to_string(), String::new())),
        None => Err(format!("bad header {s:?}: expected 'name: value'")),
    }
}

/// A request body, shared by all requests of a run.
#[derive(Clone)]
enum Body {
    Empty,
    Data(std::sync::Arc<Vec<u8>>),
    /// Generated: byte i = (i * 7 + (i >> 8)) as u8.
    Pattern(u64),
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::Data(d) => d.len() as u64,
            Body::Pattern(n) => *n,
        }
    }

    /// Returns up to `max` bytes starting at `off`.
    fn slice<'a>(&'a self, off: u64, max: usize, scratch: &'a mut Vec<u8>) -> &'a [u8] {
        let n = (self.len().saturating_sub(off)).min(max as u64) as usize;
        match self {
            Body::Empty => &[],
            Body::Data(d) => &d[off as usize..off as usize + n],
            Body::Pattern(_) => {
                scratch.clear();
                scratch.extend((off..off + n as u64).map(pattern_byte));
                scratch
            }
        }
    }
}

fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(7).wrapping_add(i >> 8)) as u8
}

/// Headers and body of one kind of request.
struct Template {
    headers: Vec<quiche::h3::Header>,
    body: Body,
    /// Send with our own frame encoder instead of quiche's h3 layer (which
    /// lowercases names); see `encode_headers_frame`.
    raw: bool,
}

/// Appends a QUIC variable-length integer.
fn put_varint(out: &mut Vec<u8>, v: u64) {
    if v < 1 << 6 {
        out.push(v as u8);
    } else if v < 1 << 14 {
        out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes());
    } else if v < 1 << 30 {
        out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

/// Appends a QPACK/HPACK prefixed integer (RFC 7541 section 5.1).
fn put_prefix_int(out: &mut Vec<u8>, first: u8, prefix: u32, mut v: u64) {
    let mask = (1u64 << prefix) - 1;
    if v < mask {
        out.push(first | v as u8);
        return;
    }
    out.push(first | mask as u8);
    v -= mask;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Encodes an HTTP/3 HEADERS frame carrying exactly `headers`, byte for
/// byte: every field is a QPACK "literal field line with literal name"
/// without Huffman coding and without dynamic table references.
fn encode_headers_frame(headers: &[quiche::h3::Header]) -> Vec<u8> {
    // Required Insert Count 0, Base 0.
    let mut block = vec![0u8, 0u8];
    for h in headers {
        put_prefix_int(&mut block, 0x20, 3, h.name().len() as u64);
        block.extend_from_slice(h.name());
        put_prefix_int(&mut block, 0x00, 7, h.value().len() as u64);
        block.extend_from_slice(h.value());
    }
    let mut frame = Vec::with_capacity(block.len() + 16);
    put_varint(&mut frame, 0x1);
    put_varint(&mut frame, block.len() as u64);
    frame.extend_from_slice(&block);
    frame
}

/// Options shared by all connections.
struct Opts {
    target: Target,
    peer: SocketAddr,
    main: Template,
    then: Option<Template>,
    chunk: usize,
    insecure: bool,
    cacert: Option<String>,
    idle_timeout: u64,
    requests: usize,
    include: bool,
    sha256: bool,
    expect_status: Option<u16>,
    rebind_every: Option<Duration>,
    /// `--repeat`: rounds of `requests` requests, one after another.
    repeat: usize,
    rebind_each: bool,
    verbose: bool,
    deadline: Instant,
    timeout: Duration,
    multi_conn: bool,
    /// `--rate`: response body bytes per second per connection.
    rate: Option<u64>,
    /// `--session`: where the TLS session is kept between runs.
    session: Option<String>,
    early_data: bool,
    /// `--quic-version`, as on the wire.
    version: u32,
}

/// How often a rate-limited client wakes up at least while it has unread
/// response data (tokens refill in between).
const RATE_TICK: Duration = Duration::from_millis(10);

/// Token bucket for `--rate`: `rate` bytes per second, bursts of at most
/// `cap` bytes (a tenth of a second's worth, at least one byte).
struct Bucket {
    rate: u64,
    cap: u64,
    tokens: u64,
    /// Refill time reached so far, and the fraction of a token (in units of
    /// 1/1e9 byte) carried over.
    last: Instant,
    carry: u128,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Bucket {
        let cap = (rate / 10).max(1);
        Bucket {
            rate,
            cap,
            tokens: cap,
            last: now,
            carry: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_nanos();
        self.last = now;
        let total = self.carry + dt * u128::from(self.rate);
        let add = total / 1_000_000_000;
        self.carry = total % 1_000_000_000;
        self.tokens = (u128::from(self.tokens) + add).min(u128::from(self.cap)) as u64;
        if self.tokens == self.cap {
            self.carry = 0;
        }
    }

    fn take(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_sub(n);
    }
}

/// Where response bodies of the "primary" requests go.
enum Sink {
    Stdout,
    File(String, File),
}

#[derive(Default, Clone, Copy)]
struct Stats {
    responses: u64,
    ok2xx: u64,
    failed: u64,
    bytes: u64,
    /// Something else went wrong (status mismatch, connection error, ...).
    bad: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Active,
    Complete,
    Failed,
}

struct Req {
    is_then: bool,
    stream: Option<u64>,
    body_off: u64,
    body_done: bool,
    status: Option<u16>,
    bytes: u64,
    sha: Option<Sha256>,
    to_sink: bool,
    state: State,
    /// Raw mode: encoded frame bytes not yet accepted by the stream.
    raw_buf: Vec<u8>,
    raw_off: usize,
}

impl Req {
    fn new(is_then: bool, sha: bool, to_sink: bool) -> Req {
        Req {
            is_then,
            stream: None,
            body_off: 0,
            body_done: false,
            status: None,
            bytes: 0,
            sha: if sha { Some(Sha256::new()) } else { None },
            to_sink,
            state: State::Pending,
            raw_buf: Vec::new(),
            raw_off: 0,
        }
    }

    fn finished(&self) -> bool {
        matches!(self.state, State::Complete | State::Failed)
    }
}

/// One UDP socket. `qaddr` is the local address quiche believes it uses for
/// it (the original one when simulating a NAT rebinding).
struct Sock {
    udp: UdpSocket,
    qaddr: SocketAddr,
}

fn new_socket(peer: SocketAddr) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = match peer {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let udp = UdpSocket::bind(bind)?;
    // Connected, so that an ICMP port unreachable shows up as ECONNREFUSED.
    udp.connect(peer)?;
    udp.set_nonblocking(true)?;
    let _ = nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::RcvBuf, &(4 << 20));
    let _ = nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::SndBuf, &(4 << 20));
    Ok(udp)
}

/// Waits until one of `fds` has `events`, or `timeout` passes. Returns true
/// when something is ready.
fn poll_fds(fds: &[i32], events: libc::c_short, timeout: Duration) -> bool {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    // Round up so that we never wake up just before a quiche timer expires.
    let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: pfds is a valid, initialised array of pfds.len() pollfd structs.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    rc > 0
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
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
        0x200 => "QPACK_DECOMPRESSION_FAILED",
        0x201 => "QPACK_ENCODER_STREAM_ERROR",
        0x202 => "QPACK_DECODER_STREAM_ERROR",
        _ => "unknown",
    }
}

fn transport_code_name(code: u64) -> String {
    let name = match code {
        0x0 => "NO_ERROR",
        0x1 => "INTERNAL_ERROR",
        0x2 => "CONNECTION_REFUSED",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "STREAM_LIMIT_ERROR",
        0x5 => "STREAM_STATE_ERROR",
        0x6 => "FINAL_SIZE_ERROR",
        0x7 => "FRAME_ENCODING_ERROR",
        0x8 => "TRANSPORT_PARAMETER_ERROR",
        0x9 => "CONNECTION_ID_LIMIT_ERROR",
        0xa => "PROTOCOL_VIOLATION",
        0xb => "INVALID_TOKEN",
        0xc => "APPLICATION_ERROR",
        0xd => "CRYPTO_BUFFER_EXCEEDED",
        0xe => "KEY_UPDATE_ERROR",
        0xf => "AEAD_LIMIT_REACHED",
        0x10 => "NO_VIABLE_PATH",
        0x100..=0x1ff => {
            let alert = match code - 0x100 {
                10 => " unexpected_message",
                40 => " handshake_failure",
                42 => " bad_certificate",
                45 => " certificate_expired",
                46 => " certificate_unknown",
                48 => " unknown_ca",
                70 => " protocol_version",
                80 => " internal_error",
                109 => " missing_extension",
                112 => " unrecognized_name",
                120 => " no_application_protocol",
                _ => "",
            };
            return format!("CRYPTO_ERROR: TLS alert {}{alert}", code - 0x100);
        }
        _ => "unknown",
    };
    name.to_string()
}

fn describe_close(e: &quiche::ConnectionError) -> String {
    let (kind, name) = if e.is_app {
        ("application", h3_code_name(e.error_code).to_string())
    } else {
        ("transport", transport_code_name(e.error_code))
    };
    format!(
        "{kind} error code 0x{:x} ({name}), reason {:?}",
        e.error_code,
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

/// Writes a whole line to stdout; a closed stdout is not an error.
fn out_line(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(s.as_bytes());
    let _ = o.write_all(b"\n");
    let _ = o.flush();
}

/// One QUIC connection and its requests.
struct Client<'a> {
    o: &'a Opts,
    tag: String,
    conn: quiche::Connection,
    h3: Option<quiche::h3::Connection>,
    socks: Vec<Sock>,
    reqs: Vec<Req>,
    by_stream: HashMap<u64, usize>,
    next_pending: usize,
    /// Rounds of `--repeat` not yet queued.
    rounds_left: usize,
    then_queued: bool,
    sink: Option<Sink>,
    goaway: Option<u64>,
    stats: Stats,
    buf: Vec<u8>,
    scratch: Vec<u8>,
    start: Instant,
    established: bool,
    refused: Option<String>,
    /// Raw mode: next client-initiated bidirectional stream ID.
    next_raw_sid: u64,
    /// `--rate`: the read allowance.
    bucket: Option<Bucket>,
    /// `--rate`: streams with response body left in quiche. quiche's Data
    /// event fires only once until a stream is drained, so these are read
    /// from the main loop as tokens come in.
    unread: BTreeSet<u64>,
    /// Requests sent before the handshake completed (0-RTT).
    early_sent: usize,
}

impl<'a> Client<'a> {
    fn new(o: &'a Opts, idx: usize, sink: Option<Sink>) -> Result<Client<'a>, String> {
        let tag = if o.multi_conn {
            format!("[conn {idx}] ")
        } else {
            String::new()
        };
        let mut config =
            quiche::Config::new(o.version).map_err(|e| format!("quiche config: {e:?}"))?;
        config.verify_peer(!o.insecure);
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
        config.set_initial_max_data(20_000_000);
        config.set_initial_max_stream_data_bidi_local(10_000_000);
        config.set_initial_max_stream_data_bidi_remote(10_000_000);
        config.set_initial_max_stream_data_uni(10_000_000);
        config.set_initial_max_streams_bidi(1000);
        config.set_initial_max_streams_uni(1000);
        config.set_disable_active_migration(false);
        if o.early_data {
            config.enable_early_data();
        }

        let udp = new_socket(o.peer).map_err(|e| format!("UDP socket: {e}"))?;
        let local = udp.local_addr().map_err(|e| format!("UDP socket: {e}"))?;

        let mut scid = [0u8; 16];
        boring::rand::rand_bytes(&mut scid).map_err(|e| format!("random: {e}"))?;
        let scid = quiche::ConnectionId::from_ref(&scid);
        let mut conn = quiche::connect(Some(&o.target.host), &scid, local, o.peer, &mut config)
            .map_err(|e| format!("quiche connect: {e:?}"))?;
        // A missing or empty file just means a first visit.
        if let Some(saved) = o.session.as_ref().and_then(|p| std::fs::read(p).ok()) {
            if !saved.is_empty() {
                conn.set_session(&saved)
                    .map_err(|e| format!("cannot resume the session in the file: {e:?}"))?;
            }
        }
        if o.verbose {
            eprintln!(
                "{tag}connecting to {} from {local}, scid {}",
                o.peer,
                hex(&scid)
            );
        }

        let mut reqs = Vec::with_capacity(o.requests + 1);
        for i in 0..o.requests {
            let to_sink = sink.is_some() && i == 0;
            reqs.push(Req::new(false, o.sha256, to_sink));
        }

        Ok(Client {
            o,
            tag,
            conn,
            h3: None,
            socks: vec![Sock { udp, qaddr: local }],
            reqs,
            by_stream: HashMap::new(),
            next_pending: 0,
            rounds_left: o.repeat - 1,
            then_queued: false,
            sink,
            goaway: None,
            stats: Stats::default(),
            buf: vec![0; 65536],
            scratch: Vec::new(),
            start: Instant::now(),
            established: false,
            refused: None,
            next_raw_sid: 0,
            bucket: o.rate.map(|r| Bucket::new(r, Instant::now())),
            unread: BTreeSet::new(),
            early_sent: 0,
        })
    }

    fn template(&self, i: usize) -> &'a Template {
        match (&self.o.then, self.reqs[i].is_then) {
            (Some(t), true) => t,
            _ => &self.o.main,
        }
    }

    fn run(mut self) -> Stats {
        let mut next_rebind = self.o.rebind_every.map(|d| self.start + d);
        // The ClientHello goes out first: with a ticket that allows it, the connection is then
        // in early data and the requests can follow at once.
        self.flush();
        loop {
            if !self.established && self.conn.is_established() {
                self.established = true;
                if self.o.verbose {
                    eprintln!(
                        "{}connected in {} ms, alpn {:?}, QUIC version {:#x}",
                        self.tag,
                        self.start.elapsed().as_millis(),
                        String::from_utf8_lossy(self.conn.application_proto()),
                        self.conn.version()
                    );
                }
            }
            let early = self.o.early_data && self.conn.is_in_early_data();
            if self.h3.is_none() && (self.conn.is_established() || early) && !self.conn.is_closed()
            {
                self.setup_h3();
            }
            if self.h3.is_some() {
                // Before polling: draining a stream queues its Finished event.
                self.read_unread();
                self.process_events();
                self.maybe_queue_then();
                self.start_requests();
                self.send_bodies();
            }
            self.flush();

            if self.all_done() {
                let _ = self.conn.close(true, H3_NO_ERROR, b"");
                self.flush();
                break;
            }
            if let Some(msg) = self.refused.take() {
                eprintln!("{}{msg}", self.tag);
                self.stats.bad = true;
                self.fail_all("connection failed");
                break;
            }
            if self.conn.is_closed() {
                self.report_close();
                self.fail_all("connection closed");
                break;
            }
            let now = Instant::now();
            if now >= self.o.deadline {
                let left = self.reqs.iter().filter(|r| !r.finished()).count() + self.not_queued();
                eprintln!(
                    "{}timeout: {left} request(s) unfinished after {:.1} s{}",
                    self.tag,
                    self.o.timeout.as_secs_f64(),
                    if self.established {
                        ""
                    } else {
                        " (handshake not complete)"
                    }
                );
                if self.o.verbose {
                    eprintln!("{}quiche: {:?}", self.tag, self.conn.stats());
                }
                self.fail_all_quiet();
                let _ = self.conn.close(true, H3_REQUEST_CANCELLED, b"timeout");
                self.flush();
                break;
            }
            if let (Some(t), Some(every)) = (next_rebind, self.o.rebind_every) {
                if now >= t {
                    if self.established {
                        self.rebind();
                    }
                    next_rebind = Some(now + every);
                    continue;
                }
            }

            let mut wait = self.o.deadline - now;
            if let Some(t) = self.conn.timeout() {
                wait = wait.min(t);
            }
            if let Some(t) = next_rebind {
                wait = wait.min(t.saturating_duration_since(now));
            }
            if !self.unread.is_empty() {
                wait = wait.min(RATE_TICK);
            }
            let fds: Vec<i32> = self.socks.iter().map(|s| s.udp.as_raw_fd()).collect();
            if poll_fds(&fds, libc::POLLIN, wait) {
                self.recv_all();
            }
            if let Some(t) = self.conn.timeout_instant() {
                if t <= Instant::now() {
                    self.conn.on_timeout();
                }
            }
        }
        if let Some(path) = &self.o.session {
            let how = if self.conn.is_resumed() {
                "resumed"
            } else {
                "new"
            };
            eprintln!("{}session: {how}", self.tag);
            if self.o.early_data {
                // BoringSSL's ssl_early_data_reason_t: 2 is accepted.
                match self.conn.early_data_reason() {
                    2 => eprintln!(
                        "{}early data: accepted, {} request(s) sent in it",
                        self.tag, self.early_sent
                    ),
                    why => eprintln!("{}early data: not accepted (reason {why})", self.tag),
                }
            }
            if let Some(session) = self.conn.session() {
                if let Err(e) = std::fs::write(path, session) {
                    eprintln!("{}cannot save the session to {path}: {e}", self.tag);
                    self.stats.bad = true;
                }
            }
        }
        self.stats
    }

    fn setup_h3(&mut self) {
        let cfg = match quiche::h3::Config::new() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}HTTP/3 config failed: {e:?}", self.tag);
                let _ = self.conn.close(true, H3_INTERNAL_ERROR, b"");
                return;
            }
        };
        match quiche::h3::Connection::with_transport(&mut self.conn, &cfg) {
            Ok(h3) => self.h3 = Some(h3),
            Err(e) => {
                eprintln!("{}HTTP/3 setup failed: {e:?}", self.tag);
                self.stats.bad = true;
                let _ = self.conn.close(true, H3_INTERNAL_ERROR, b"h3 setup failed");
            }
        }
    }

    fn all_done(&self) -> bool {
        self.reqs.iter().all(Req::finished) && self.not_queued() == 0
    }

    /// Requests still to come: later `--repeat` rounds and the `--then` one.
    fn not_queued(&self) -> usize {
        self.rounds_left * self.o.requests + usize::from(self.o.then.is_some() && !self.then_queued)
    }

    fn maybe_queue_then(&mut self) {
        if self.rounds_left > 0 && self.reqs.iter().all(Req::finished) {
            self.rounds_left -= 1;
            if self.o.rebind_each {
                self.rebind();
            }
            for _ in 0..self.o.requests {
                self.reqs.push(Req::new(false, self.o.sha256, false));
            }
            return;
        }
        if self.o.then.is_some() && !self.then_queued && self.reqs.iter().all(Req::finished) {
            self.then_queued = true;
            let to_sink = self.sink.is_some();
            self.reqs.push(Req::new(true, self.o.sha256, to_sink));
        }
    }

    fn fail(&mut self, i: usize, msg: &str) {
        let r = &mut self.reqs[i];
        if r.finished() {
            return;
        }
        if !msg.is_empty() {
            eprintln!("{}{msg}", self.tag);
        }
        r.state = State::Failed;
        self.stats.failed += 1;
        if let Some(sid) = r.stream {
            if !r.body_done {
                r.body_done = true;
                let _ =
                    self.conn
                        .stream_shutdown(sid, quiche::Shutdown::Write, H3_REQUEST_CANCELLED);
            }
        }
    }

    /// Fails every unfinished request (and the not yet queued --then one).
    fn fail_all(&mut self, why: &str) {
        let left = self.reqs.iter().filter(|r| !r.finished()).count() + self.not_queued();
        if left > 0 {
            eprintln!("{}{why}: {left} request(s) unfinished", self.tag);
        }
        self.fail_all_quiet();
    }

    fn fail_all_quiet(&mut self) {
        for i in 0..self.reqs.len() {
            self.fail(i, "");
        }
        self.stats.failed += self.not_queued() as u64;
        self.rounds_left = 0;
        self.then_queued = true;
    }

    fn complete(&mut self, i: usize) {
        let sid = self.reqs[i].stream.unwrap_or(0);
        let r = &mut self.reqs[i];
        let status = r.status.unwrap_or(0);
        r.state = State::Complete;
        self.stats.responses += 1;
        if (200..300).contains(&status) {
            self.stats.ok2xx += 1;
        }
        if let Some(sha) = r.sha.take() {
            out_line(&format!(
                "status={status} bytes={} sha256={}",
                r.bytes,
                hex(&sha.finish())
            ));
        }
        if !r.body_done {
            // The response is complete before the request body was sent
            // (RFC 9114 section 4.1 allows this): stop sending it.
            r.body_done = true;
            let _ = self
                .conn
                .stream_shutdown(sid, quiche::Shutdown::Write, H3_NO_ERROR);
        }
        if let Some(want) = self.o.expect_status {
            if want != status {
                eprintln!(
                    "{}unexpected status {status} on stream {sid} (expected {want})",
                    self.tag
                );
                self.stats.bad = true;
            }
        }
    }

    fn start_requests(&mut self) {
        while self.next_pending < self.reqs.len() {
            let i = self.next_pending;
            if self.reqs[i].state != State::Pending {
                self.next_pending += 1;
                continue;
            }
            if let Some(id) = self.goaway {
                self.fail(
                    i,
                    &format!("request not sent: server sent GOAWAY (id {id})"),
                );
                self.next_pending += 1;
                continue;
            }
            let tpl = self.template(i);
            let fin = tpl.body.len() == 0;
            if tpl.raw {
                if self.conn.peer_streams_left_bidi() == 0 {
                    return;
                }
                let sid = self.next_raw_sid;
                self.next_raw_sid += 4;
                let r = &mut self.reqs[i];
                r.stream = Some(sid);
                r.state = State::Active;
                r.raw_buf = encode_headers_frame(&tpl.headers);
                r.raw_off = 0;
                self.by_stream.insert(sid, i);
                self.next_pending += 1;
                continue;
            }
            let Some(h3) = self.h3.as_mut() else {
                return;
            };
            match h3.send_request(&mut self.conn, &tpl.headers, fin) {
                Ok(sid) => {
                    if !self.conn.is_established() {
                        self.early_sent += 1;
                    }
                    let r = &mut self.reqs[i];
                    r.stream = Some(sid);
                    r.state = State::Active;
                    r.body_done = fin;
                    self.by_stream.insert(sid, i);
                    self.next_pending += 1;
                }
                Err(quiche::h3::Error::StreamBlocked)
                | Err(quiche::h3::Error::TransportError(quiche::Error::StreamLimit))
                | Err(quiche::h3::Error::TransportError(quiche::Error::Done)) => return,
                Err(e) => {
                    self.fail(i, &format!("cannot send request: {e:?}"));
                    self.next_pending += 1;
                }
            }
        }
    }

    fn send_bodies(&mut self) {
        for i in 0..self.reqs.len() {
            let r = &self.reqs[i];
            if r.state != State::Active || r.body_done {
                continue;
            }
            let Some(sid) = r.stream else { continue };
            if self.template(i).raw {
                self.send_raw(i, sid);
                continue;
            }
            let body = &self.template(i).body;
            let total = body.len();
            loop {
                let off = self.reqs[i].body_off;
                let data = body.slice(off, self.o.chunk, &mut self.scratch);
                let fin = off + data.len() as u64 == total;
                let Some(h3) = self.h3.as_mut() else { return };
                match h3.send_body(&mut self.conn, sid, data, fin) {
                    Ok(w) => {
                        let r = &mut self.reqs[i];
                        r.body_off += w as u64;
                        if w == data.len() && fin {
                            r.body_done = true;
                            break;
                        }
                        if w < data.len() || w == 0 {
                            break;
                        }
                    }
                    Err(quiche::h3::Error::Done) | Err(quiche::h3::Error::StreamBlocked) => break,
                    Err(quiche::h3::Error::TransportError(quiche::Error::StreamStopped(c))) => {
                        self.reqs[i].body_done = true;
                        if c != H3_NO_ERROR {
                            eprintln!(
                                "{}stream {sid}: peer stopped the request body: error code 0x{c:x} ({})",
                                self.tag,
                                h3_code_name(c)
                            );
                        }
                        break;
                    }
                    Err(quiche::h3::Error::TransportError(quiche::Error::StreamReset(_))) => {
                        // The Reset event reports it.
                        self.reqs[i].body_done = true;
                        break;
                    }
                    Err(e) => {
                        self.fail(i, &format!("stream {sid}: sending body failed: {e:?}"));
                        break;
                    }
                }
            }
        }
    }

    /// Raw mode: writes the HEADERS frame and then the body as DATA frames
    /// directly on the QUIC stream, as far as flow control allows.
    fn send_raw(&mut self, i: usize, sid: u64) {
        let body = &self.template(i).body;
        let total = body.len();
        loop {
            let r = &mut self.reqs[i];
            if r.raw_off == r.raw_buf.len() {
                if r.body_off == total {
                    r.body_done = true;
                    return;
                }
                let data = body.slice(r.body_off, self.o.chunk, &mut self.scratch);
                r.raw_buf.clear();
                r.raw_off = 0;
                put_varint(&mut r.raw_buf, 0x0);
                put_varint(&mut r.raw_buf, data.len() as u64);
                r.raw_buf.extend_from_slice(data);
                r.body_off += data.len() as u64;
            }
            let fin = r.body_off == total;
            match self.conn.stream_send(sid, &r.raw_buf[r.raw_off..], fin) {
                Ok(w) => {
                    r.raw_off += w;
                    if r.raw_off < r.raw_buf.len() {
                        return;
                    }
                    if fin {
                        r.body_done = true;
                        return;
                    }
                }
                Err(quiche::Error::Done) | Err(quiche::Error::StreamLimit) => return,
                Err(quiche::Error::StreamStopped(c)) => {
                    r.body_done = true;
                    if c != H3_NO_ERROR {
                        eprintln!(
                            "{}stream {sid}: peer stopped the request: error code 0x{c:x} ({})",
                            self.tag,
                            h3_code_name(c)
                        );
                    }
                    return;
                }
                Err(quiche::Error::StreamReset(_)) => {
                    r.body_done = true;
                    return;
                }
                Err(e) => {
                    self.fail(i, &format!("stream {sid}: sending request failed: {e:?}"));
                    return;
                }
            }
        }
    }

    fn process_events(&mut self) {
        loop {
            let Some(h3) = self.h3.as_mut() else { return };
            let (sid, ev) = match h3.poll(&mut self.conn) {
                Ok(v) => v,
                Err(quiche::h3::Error::Done) => return,
                Err(e) => {
                    eprintln!("{}HTTP/3 error: {e:?}", self.tag);
                    self.stats.bad = true;
                    if !self.conn.is_closed() && self.conn.local_error().is_none() {
                        let _ = self.conn.close(true, H3_INTERNAL_ERROR, b"");
                    }
                    return;
                }
            };
            match ev {
                quiche::h3::Event::Headers { list, .. } => self.on_headers(sid, &list),
                quiche::h3::Event::Data => self.on_data(sid),
                quiche::h3::Event::Finished => {
                    let Some(&i) = self.by_stream.get(&sid) else {
                        continue;
                    };
                    if self.reqs[i].finished() {
                        continue;
                    }
                    match self.reqs[i].status {
                        Some(s) if s >= 200 => self.complete(i),
                        _ => self.fail(
                            i,
                            &format!("stream {sid} finished without a final response"),
                        ),
                    }
                }
                quiche::h3::Event::Reset(code) => {
                    if let Some(&i) = self.by_stream.get(&sid) {
                        self.fail(
                            i,
                            &format!(
                                "stream {sid} reset by peer: error code 0x{code:x} ({})",
                                h3_code_name(code)
                            ),
                        );
                    }
                }
                quiche::h3::Event::GoAway => {
                    eprintln!("{}GOAWAY received (id {sid})", self.tag);
                    self.goaway = Some(sid);
                    for i in 0..self.reqs.len() {
                        if let (State::Active, Some(s)) = (self.reqs[i].state, self.reqs[i].stream)
                        {
                            if s >= sid {
                                self.fail(i, &format!("stream {s} not processed: GOAWAY id {sid}"));
                            }
                        }
                    }
                }
                quiche::h3::Event::PriorityUpdate => {}
            }
        }
    }

    fn on_headers(&mut self, sid: u64, list: &[quiche::h3::Header]) {
        let Some(&i) = self.by_stream.get(&sid) else {
            return;
        };
        let status = list
            .iter()
            .find(|h| h.name() == b":status")
            .and_then(|h| std::str::from_utf8(h.value()).ok())
            .and_then(|v| v.parse::<u16>().ok());
        let trailers = matches!(self.reqs[i].status, Some(s) if s >= 200);
        if self.o.include {
            let mut s = String::new();
            if trailers {
                s.push_str("(trailers)\n");
            } else {
                match status {
                    Some(st) => s.push_str(&format!("HTTP/3 {st}\n")),
                    None => s.push_str("HTTP/3 (no valid :status)\n"),
                }
            }
            for h in list {
                if h.name() == b":status" {
                    continue;
                }
                s.push_str(&format!(
                    "{}: {}\n",
                    String::from_utf8_lossy(h.name()),
                    String::from_utf8_lossy(h.value())
                ));
            }
            s.push('\n');
            let _ = std::io::stderr().lock().write_all(s.as_bytes());
        }
        if trailers || self.reqs[i].finished() {
            return;
        }
        match status {
            Some(st) if (100..200).contains(&st) => {} // informational, wait for more
            Some(st) if (200..1000).contains(&st) => self.reqs[i].status = Some(st),
            _ => {
                self.fail(
                    i,
                    &format!("stream {sid}: response without a valid :status"),
                );
                let _ =
                    self.conn
                        .stream_shutdown(sid, quiche::Shutdown::Read, H3_REQUEST_CANCELLED);
            }
        }
    }

    /// `--rate`: reads what the tokens allow from the streams with unread
    /// response body, lowest stream first.
    fn read_unread(&mut self) {
        if self.unread.is_empty() {
            return;
        }
        let now = Instant::now();
        if let Some(b) = self.bucket.as_mut() {
            b.refill(now);
        }
        let sids: Vec<u64> = self.unread.iter().copied().collect();
        for sid in sids {
            if self.bucket.as_ref().is_some_and(|b| b.tokens == 0) {
                return;
            }
            self.on_data(sid);
        }
    }

    fn on_data(&mut self, sid: u64) {
        let idx = self.by_stream.get(&sid).copied();
        if let Some(b) = self.bucket.as_mut() {
            // Remembered until recv_body says Done: no new Data event until then.
            self.unread.insert(sid);
            b.refill(Instant::now());
        }
        loop {
            let want = match &self.bucket {
                Some(b) => (b.tokens.min(self.buf.len() as u64)) as usize,
                None => self.buf.len(),
            };
            if want == 0 {
                return; // out of tokens: read_unread comes back for it
            }
            let Some(h3) = self.h3.as_mut() else { return };
            let n = match h3.recv_body(&mut self.conn, sid, &mut self.buf[..want]) {
                Ok(n) => n,
                // Done: drained. Anything else (e.g. a reset) is reported by
                // a later event.
                Err(_) => {
                    self.unread.remove(&sid);
                    return;
                }
            };
            if let Some(b) = self.bucket.as_mut() {
                b.take(n as u64);
            }
            self.stats.bytes += n as u64;
            let Some(i) = idx else { continue };
            let r = &mut self.reqs[i];
            r.bytes += n as u64;
            if let Some(sha) = r.sha.as_mut() {
                sha.update(&self.buf[..n]);
            }
            if r.to_sink && r.state == State::Active {
                let res = match &mut self.sink {
                    Some(Sink::Stdout) => {
                        let mut o = std::io::stdout().lock();
                        o.write_all(&self.buf[..n]).and_then(|_| o.flush())
                    }
                    Some(Sink::File(_, f)) => f.write_all(&self.buf[..n]),
                    None => Ok(()),
                };
                if let Err(e) = res {
                    if let Some(Sink::File(path, _)) = &self.sink {
                        eprintln!("{}cannot write {path}: {e}", self.tag);
                        self.stats.bad = true;
                    }
                    self.sink = None;
                }
            }
        }
    }

    fn recv_all(&mut self) {
        for s in &self.socks {
            loop {
                let (len, from) = match s.udp.recv_from(&mut self.buf) {
                    Ok(v) => v,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        if !self.established {
                            self.refused = Some(format!(
                                "connection refused by {} (ICMP port unreachable)",
                                self.o.peer
                            ));
                        }
                        continue;
                    }
                    Err(e) => {
                        if self.o.verbose {
                            eprintln!("{}recv: {e}", self.tag);
                        }
                        break;
                    }
                };
                let info = quiche::RecvInfo { from, to: s.qaddr };
                if let Err(e) = self.conn.recv(&mut self.buf[..len], info) {
                    if self.o.verbose && e != quiche::Error::Done {
                        eprintln!("{}quiche recv: {e:?}", self.tag);
                    }
                }
            }
        }
    }

    fn flush(&mut self) {
        let mut out = [0u8; MAX_SEND_UDP];
        loop {
            let (len, info) = match self.conn.send(&mut out) {
                Ok(v) => v,
                Err(quiche::Error::Done) => return,
                Err(e) => {
                    eprintln!("{}quiche send failed: {e:?}", self.tag);
                    let _ = self.conn.close(false, 0x1, b"send failed");
                    return;
                }
            };
            let sock = self
                .socks
                .iter()
                .rev()
                .find(|s| s.qaddr == info.from)
                .or_else(|| self.socks.last());
            let Some(sock) = sock else { return };
            let mut tries = 0;
            loop {
                let res = if info.to == self.o.peer {
                    sock.udp.send(&out[..len])
                } else {
                    sock.udp.send_to(&out[..len], info.to)
                };
                match res {
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && tries < 20 => {
                        tries += 1;
                        poll_fds(
                            &[sock.udp.as_raw_fd()],
                            libc::POLLOUT,
                            Duration::from_millis(50),
                        );
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        if e.kind() == std::io::ErrorKind::ConnectionRefused && !self.established {
                            self.refused = Some(format!(
                                "connection refused by {} (ICMP port unreachable)",
                                self.o.peer
                            ));
                        } else if self.o.verbose {
                            eprintln!("{}send: {e}", self.tag);
                        }
                        // Dropped; quiche's loss recovery resends.
                        break;
                    }
                }
            }
        }
    }

    /// Switches to a fresh UDP socket (new local port) without telling
    /// quiche, so the server sees a NAT rebinding: same connection IDs, new
    /// client address. The previous socket is kept for packets in flight.
    fn rebind(&mut self) {
        let udp = match new_socket(self.o.peer) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("{}rebind: cannot create socket: {e}", self.tag);
                return;
            }
        };
        let Some(last) = self.socks.last() else {
            return;
        };
        let qaddr = last.qaddr;
        if self.o.verbose {
            let old = last.udp.local_addr().map(|a| a.port()).unwrap_or(0);
            let new = udp.local_addr().map(|a| a.port()).unwrap_or(0);
            let at = (Instant::now() + self.o.timeout).saturating_duration_since(self.o.deadline);
            eprintln!(
                "{}rebind: local port {old} -> {new} at {:.3} s, {} body bytes read",
                self.tag,
                at.as_secs_f64(),
                self.stats.bytes
            );
        }
        self.socks.push(Sock { udp, qaddr });
        while self.socks.len() > 2 {
            self.socks.remove(0);
        }
    }

    fn report_close(&mut self) {
        if let Some(e) = self.conn.peer_error() {
            if is_error_close(e) || !self.all_done() {
                eprintln!(
                    "{}connection closed by peer: {}",
                    self.tag,
                    describe_close(e)
                );
            }
            if is_error_close(e) {
                self.stats.bad = true;
            }
        } else if let Some(e) = self.conn.local_error() {
            if is_error_close(e) {
                eprintln!(
                    "{}connection closed locally: {}",
                    self.tag,
                    describe_close(e)
                );
                self.stats.bad = true;
            }
        } else if self.conn.is_timed_out() {
            eprintln!(
                "{}connection timed out (idle timeout{})",
                self.tag,
                if self.established {
                    ""
                } else {
                    ", handshake not complete"
                }
            );
            self.stats.bad = true;
        } else if !self.established {
            eprintln!(
                "{}connection closed before the handshake completed",
                self.tag
            );
            self.stats.bad = true;
        }
    }
}

fn build_template(
    args: &Args,
    t: &Target,
    method: &str,
    body: Body,
) -> Result<Vec<quiche::h3::Header>, String> {
    let mut extra = Vec::new();
    for h in &args.header {
        extra.push(split_header(h, args.raw_headers)?);
    }
    if args.raw_headers {
        return Ok(extra
            .iter()
            .map(|(n, v)| quiche::h3::Header::new(n.as_bytes(), v.as_bytes()))
            .collect());
    }
    let mut list: Vec<(String, String)> = vec![
        (":method".into(), method.into()),
        (":scheme".into(), "https".into()),
        (":authority".into(), t.authority.clone()),
        (":path".into(), t.path.clone()),
        (
            "user-agent".into(),
            concat!("h3get/", env!("CARGO_PKG_VERSION")).into(),
        ),
    ];
    for (n, v) in extra {
        // A -H with the name of a generated field replaces it.
        if let Some(slot) = list.iter_mut().find(|(ln, _)| *ln == n) {
            slot.1 = v;
        } else if n.starts_with(':') {
            let pos = list
                .iter()
                .take_while(|(ln, _)| ln.starts_with(':'))
                .count();
            list.insert(pos, (n, v));
        } else {
            list.push((n, v));
        }
    }
    let has_body = !matches!(body, Body::Empty);
    if has_body && !args.no_content_length && !list.iter().any(|(n, _)| n == "content-length") {
        list.push(("content-length".into(), body.len().to_string()));
    }
    Ok(list
        .iter()
        .map(|(n, v)| quiche::h3::Header::new(n.as_bytes(), v.as_bytes()))
        .collect())
}

fn setup(args: &Args, start: Instant) -> Result<Opts, String> {
    let target = parse_url(&args.url)?;
    let then_target = args.then.as_deref().map(parse_url).transpose()?;
    if args.requests == 0 || args.connections == 0 {
        return Err("-n and --connections must be at least 1".into());
    }
    if args.chunk == 0 {
        return Err("--chunk must be at least 1".into());
    }
    if args.rate == Some(0) {
        return Err("--rate must be at least 1".into());
    }
    let version = match args.quic_version {
        1 => quiche::PROTOCOL_VERSION,
        2 => quiche::PROTOCOL_VERSION_V2,
        other => return Err(format!("--quic-version {other}: 1 or 2")),
    };
    let timeout = Duration::try_from_secs_f64(args.timeout)
        .ok()
        .filter(|d| !d.is_zero() && d.as_secs() < 1_000_000_000)
        .ok_or_else(|| format!("bad --timeout {}", args.timeout))?;
    let body = match (&args.data_file, args.data_size) {
        (Some(_), Some(_)) => return Err("use either --data-file or --data-size".into()),
        (Some(p), None) => {
            let d = std::fs::read(p).map_err(|e| format!("cannot read {p}: {e}"))?;
            Body::Data(std::sync::Arc::new(d))
        }
        (None, Some(n)) => Body::Pattern(n),
        (None, None) => Body::Empty,
    };
    let has_body = !matches!(body, Body::Empty);
    let method = args
        .method
        .clone()
        .unwrap_or_else(|| if has_body { "POST" } else { "GET" }.to_string());
    let headers = build_template(args, &target, &method, body.clone())?;
    let then = then_target.map(|t| Template {
        headers: vec![
            quiche::h3::Header::new(b":method", b"GET"),
            quiche::h3::Header::new(b":scheme", b"https"),
            quiche::h3::Header::new(b":authority", t.authority.as_bytes()),
            quiche::h3::Header::new(b":path", t.path.as_bytes()),
            quiche::h3::Header::new(
                b"user-agent",
                concat!("h3get/", env!("CARGO_PKG_VERSION")).as_bytes(),
            ),
        ],
        body: Body::Empty,
        // The h3 layer picks stream IDs itself, so once we allocate them by
        // hand every request of the connection must be sent the raw way.
        raw: args.raw_headers,
    });
    let peer = resolve(&target)?;
    Ok(Opts {
        target,
        peer,
        main: Template {
            headers,
            body,
            raw: args.raw_headers,
        },
        then,
        chunk: args.chunk,
        insecure: args.insecure,
        cacert: args.cacert.clone(),
        idle_timeout: args.idle_timeout,
        requests: args.requests,
        include: args.include,
        sha256: args.sha256,
        expect_status: args.expect_status,
        rebind_every: args.rebind_every.map(|ms| Duration::from_millis(ms.max(1))),
        repeat: args.repeat.max(1),
        rebind_each: args.rebind_each,
        verbose: args.verbose,
        deadline: start + timeout,
        timeout,
        multi_conn: args.connections > 1,
        rate: args.rate,
        session: args.session.clone(),
        early_data: args.early_data,
        version,
    })
}

fn main() {
    let args: Args = argh::from_env();
    let start = Instant::now();
    let opts = match setup(&args, start) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("h3get: {e}");
            std::process::exit(2);
        }
    };
    let sink = if let Some(path) = &args.output {
        match File::create(path) {
            Ok(f) => Some(Sink::File(path.clone(), f)),
            Err(e) => {
                eprintln!("h3get: cannot create {path}: {e}");
                std::process::exit(2);
            }
        }
    } else if args.sha256 || args.quiet {
        None
    } else {
        Some(Sink::Stdout)
    };

    let per_conn = (args.requests * opts.repeat + usize::from(opts.then.is_some())) as u64;
    let mut sink = sink;
    let results: Vec<Stats> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.connections)
            .map(|idx| {
                let o = &opts;
                let sink = if idx == 0 { sink.take() } else { None };
                s.spawn(move || match Client::new(o, idx, sink) {
                    Ok(c) => c.run(),
                    Err(e) => {
                        let tag = if o.multi_conn {
                            format!("[conn {idx}] ")
                        } else {
                            String::new()
                        };
                        eprintln!("{tag}{e}");
                        Stats {
                            failed: per_conn,
                            bad: true,
                            ..Stats::default()
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or(Stats {
                    failed: per_conn,
                    bad: true,
                    ..Stats::default()
                })
            })
            .collect()
    });

    let mut total = Stats::default();
    for r in &results {
        total.responses += r.responses;
        total.ok2xx += r.ok2xx;
        total.failed += r.failed;
        total.bytes += r.bytes;
        total.bad |= r.bad;
    }
    eprintln!(
        "done: {} responses, {} status-2xx, {} failed, {} body bytes in {} ms",
        total.responses,
        total.ok2xx,
        total.failed,
        total.bytes,
        start.elapsed().as_millis()
    );
    let expected = per_conn * args.connections as u64;
    let ok = !total.bad && total.failed == 0 && total.responses == expected;
    std::process::exit(if ok { 0 } else { 1 });
}
