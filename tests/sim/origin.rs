//! The scripted backend: plays the ring and the origin servers behind it. It carries out the
//! core's `BackendAction`s the way `ring.rs` does (one completion per Connect and Send, one read
//! per armed Recv, nothing delivered for a socket after its Close) and answers every request as
//! the scenario says. It also checks the core's side of the ring contract: no action for a key
//! that was closed or never connected, one Send and one Recv in flight per socket at most, a
//! request never pipelined behind an unfinished response nor sent after `connection: close`, and
//! every request arrives well-formed with the body the client uploaded.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use h3gate::core::{BackendAction, BackendEvent, BackendKey, Core};

use crate::rng::Rng;
use crate::scenario::{Behaviour, Framing, Scenario, ServerKind};

/// (client, request) as in the request path `/sim/<client>/<request>`.
pub type ReqId = (usize, usize);

/// What the origin learned that the oracle needs, plus the run's violations and trace.
pub struct Ledger {
    pub t0: Instant,
    /// Times the origin received each request in full.
    pub seen: HashMap<ReqId, u32>,
    /// Requests that landed on a connection the origin had already closed (stale pooled one).
    pub stale: HashSet<ReqId>,
    pub violations: Vec<String>,
    pub trace: Vec<String>,
}

impl Ledger {
    pub fn new(t0: Instant) -> Ledger {
        Ledger {
            t0,
            seen: HashMap::new(),
            stale: HashSet::new(),
            violations: Vec::new(),
            trace: Vec::new(),
        }
    }

    pub fn log(&mut self, now: Instant, msg: String) {
        // Bounded: a runaway run must not eat the machine's memory through its trace.
        if self.trace.len() >= 20_000 {
            self.trace.drain(..10_000);
        }
        let t = now.saturating_duration_since(self.t0);
        self.trace.push(format!(
            "{:>5}.{:03}ms {msg}",
            t.as_millis(),
            t.subsec_micros() % 1000
        ));
    }

    pub fn violation(&mut self, now: Instant, msg: String) {
        self.log(now, format!("VIOLATION: {msg}"));
        self.violations.push(msg);
    }
}

enum Seg {
    Data(Vec<u8>),
    Eof,
    Reset,
}

struct Out {
    at: Instant,
    seg: Seg,
    /// The last segment of a response that leaves the connection reusable.
    ends_response: bool,
}

enum Completion {
    Connected(io::Result<()>),
    Sent(io::Result<usize>),
}

struct Sock {
    /// `Connected(Ok)` delivered.
    connected: bool,
    sending: bool,
    reading: bool,
    inbox: Vec<u8>,
    out: VecDeque<Out>,
    /// A request whose response is not fully read yet.
    busy: Option<ReqId>,
    /// The origin sent `connection: close` (or a close-delimited body).
    said_close: bool,
    /// The origin closes this idle keep-alive connection at this instant.
    idle_close_at: Option<Instant>,
    /// The armed read's `max`: the ring reads at most this many bytes.
    read_max: usize,
    rng: Rng,
}

pub struct Origin {
    servers: Vec<(SocketAddr, ServerKind)>,
    socks: BTreeMap<BackendKey, Sock>,
    completions: BTreeMap<(Instant, u64), (BackendKey, Completion)>,
    seq: u64,
    closed: HashSet<BackendKey>,
    rng: Rng,
    pub connects: u64,
    pub closes: u64,
    pub reads: u64,
}

const READ_MAX: usize = 64 * 1024;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

impl Origin {
    pub fn new(scn: &Scenario, servers: Vec<(SocketAddr, ServerKind)>) -> Origin {
        Origin {
            servers,
            socks: BTreeMap::new(),
            completions: BTreeMap::new(),
            seq: 0,
            closed: HashSet::new(),
            rng: Rng::new(scn.seed).fork(7),
            connects: 0,
            closes: 0,
            reads: 0,
        }
    }

    /// Sockets the core asked for and has not closed.
    pub fn open_sockets(&self) -> usize {
        self.socks.len()
    }

    fn complete(&mut self, at: Instant, key: BackendKey, c: Completion) {
        self.seq += 1;
        self.completions.insert((at, self.seq), (key, c));
    }

    /// Carries out one action of the core, as the ring would.
    pub fn action(&mut self, now: Instant, a: BackendAction, scn: &Scenario, led: &mut Ledger) {
        match a {
            BackendAction::Connect { key, addr } => {
                led.log(now, format!("backend {key:?}: connect {addr}"));
                if self.socks.contains_key(&key) || self.closed.contains(&key) {
                    led.violation(now, format!("Connect reuses backend key {key:?}"));
                    return;
                }
                self.connects += 1;
                let Some(server) = self.servers.iter().position(|(a, _)| *a == addr) else {
                    led.violation(now, format!("Connect to unknown address {addr}"));
                    return;
                };
                let mut rng = self.rng.fork(self.connects);
                let delay = ms(rng.below(3));
                match self.servers[server].1 {
                    ServerKind::Up => {
                        self.complete(now + delay, key, Completion::Connected(Ok(())))
                    }
                    ServerKind::Refuse => self.complete(
                        now + delay,
                        key,
                        Completion::Connected(Err(io::ErrorKind::ConnectionRefused.into())),
                    ),
                    ServerKind::Blackhole => {}
                }
                self.socks.insert(
                    key,
                    Sock {
                        connected: false,
                        sending: false,
                        reading: false,
                        inbox: Vec::new(),
                        out: VecDeque::new(),
                        busy: None,
                        said_close: false,
                        idle_close_at: None,
                        read_max: 0,
                        rng,
                    },
                );
            }
            BackendAction::Send { key, data } => {
                let Some(s) = self.live(now, key, "Send", led) else {
                    return;
                };
                if !s.connected {
                    led.violation(now, format!("Send on {key:?} before its connect completed"));
                    return;
                }
                if s.sending {
                    led.violation(
                        now,
                        format!("second Send on {key:?} while one is in flight"),
                    );
                }
                s.sending = true;
                s.inbox.extend_from_slice(&data);
                match s.idle_close_at {
                    Some(t) if now >= t => {
                        // Bytes for a connection the origin closed already: whatever request
                        // they start is lost (the EOF queued at the close tells the core), even
                        // if its body never arrives in full.
                        if let Some(id) = request_line_id(&s.inbox) {
                            led.stale.insert(id);
                        }
                    }
                    Some(_) => {
                        // Not idle any more: the origin keeps the connection open.
                        s.idle_close_at = None;
                        s.out.retain(|o| !matches!(o.seg, Seg::Eof));
                    }
                    None => {}
                }
                let delay = ms(s.rng.below(2));
                led.log(now, format!("backend {key:?}: send {} bytes", data.len()));
                self.complete(now + delay, key, Completion::Sent(Ok(data.len())));
                self.parse_requests(now, key, scn, led);
            }
            BackendAction::Recv { key, max } => {
                let Some(s) = self.live(now, key, "Recv", led) else {
                    return;
                };
                if !s.connected {
                    led.violation(now, format!("Recv on {key:?} before its connect completed"));
                    return;
                }
                if s.reading {
                    led.violation(now, format!("second Recv armed on {key:?}"));
                }
                if max == 0 {
                    led.violation(now, format!("Recv on {key:?} with max 0"));
                }
                s.reading = true;
                s.read_max = max;
            }
            BackendAction::Close { key } => {
                led.log(now, format!("backend {key:?}: close"));
                if self.closed.contains(&key) {
                    led.violation(now, format!("double Close of {key:?}"));
                    return;
                }
                if self.socks.remove(&key).is_none() {
                    led.violation(now, format!("Close of never-connected key {key:?}"));
                    return;
                }
                self.closed.insert(key);
                self.closes += 1;
                // The ring cancels what is in flight and delivers nothing more for this socket.
                self.completions.retain(|_, (k, _)| *k != key);
            }
        }
    }

    fn live(
        &mut self,
        now: Instant,
        key: BackendKey,
        what: &str,
        led: &mut Ledger,
    ) -> Option<&mut Sock> {
        if self.closed.contains(&key) {
            led.violation(now, format!("{what} for {key:?} after its Close"));
            return None;
        }
        let s = self.socks.get_mut(&key);
        if s.is_none() {
            led.violation(now, format!("{what} for {key:?}, never connected"));
        }
        s
    }

    /// Handles every complete request in the socket's inbox.
    fn parse_requests(&mut self, now: Instant, key: BackendKey, scn: &Scenario, led: &mut Ledger) {
        loop {
            let Some(s) = self.socks.get_mut(&key) else {
                return;
            };
            let (n, req) = match parse_request(&s.inbox) {
                Ok(Some(x)) => x,
                Ok(None) => return,
                Err(e) => {
                    led.violation(
                        now,
                        format!("malformed request from the core on {key:?}: {e}"),
                    );
                    s.inbox.clear();
                    return;
                }
            };
            s.inbox.drain(..n);
            let Some(id) = parse_path(&req.path) else {
                led.violation(now, format!("request for unexpected path {}", req.path));
                continue;
            };
            let Some(plan) = scn.request(id.0, id.1) else {
                led.violation(now, format!("request for unknown {}", req.path));
                continue;
            };
            led.log(
                now,
                format!(
                    "origin {key:?}: {} {} ({} body bytes, {})",
                    req.method,
                    req.path,
                    req.body.len(),
                    plan.behaviour.name()
                ),
            );
            check_request(now, &req, plan, led);
            if let Some(t) = s.idle_close_at {
                if now >= t {
                    // The origin closed this connection before the request arrived: it is lost
                    // (the EOF already queued tells the core).
                    led.log(
                        now,
                        format!("origin {key:?}: request hit a closed connection"),
                    );
                    led.stale.insert(id);
                    continue;
                }
                s.idle_close_at = None;
                s.out.retain(|o| !matches!(o.seg, Seg::Eof));
            }
            if s.said_close {
                led.violation(
                    now,
                    format!(
                        "request {} sent on {key:?} after the origin said connection: close",
                        req.path
                    ),
                );
                continue;
            }
            if let Some(prev) = s.busy {
                led.violation(
                    now,
                    format!(
                        "request {} pipelined on {key:?} behind /sim/{}/{} whose response is unfinished",
                        req.path, prev.0, prev.1
                    ),
                );
            }
            *led.seen.entry(id).or_insert(0) += 1;
            s.busy = Some(id);
            queue_response(now, s, &plan.behaviour);
        }
    }

    /// Delivers every completion and read that is due, in time order, as the ring's dispatch would.
    pub fn deliver(
        &mut self,
        now: Instant,
        core: &mut Core,
        scn: &Scenario,
        led: &mut Ledger,
    ) -> bool {
        let mut progress = false;
        while let Some(entry) = self.completions.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (key, c) = entry.remove();
            progress = true;
            let Some(s) = self.socks.get_mut(&key) else {
                continue;
            };
            match c {
                Completion::Connected(r) => {
                    s.connected = r.is_ok();
                    led.log(now, format!("backend {key:?}: connected {r:?}"));
                    core.on_backend(now, key, BackendEvent::Connected(r));
                }
                Completion::Sent(r) => {
                    s.sending = false;
                    core.on_backend(now, key, BackendEvent::Sent(r));
                }
            }
        }
        let keys: Vec<BackendKey> = self.socks.keys().copied().collect();
        for key in keys {
            let Some(s) = self.socks.get_mut(&key) else {
                continue;
            };
            if !s.reading || s.out.front().is_none_or(|o| o.at > now) {
                continue;
            }
            s.reading = false;
            progress = true;
            self.reads += 1;
            let mut buf = Vec::new();
            let mut ended = false;
            let mut special = None;
            // One read: a random cut of the ready bytes, sometimes spanning segments (TCP
            // coalesces), so the core's parser sees every kind of boundary.
            let want = match s.rng.below(10) {
                0..=2 => READ_MAX,
                3..=5 => s.rng.range(1, 64) as usize,
                6..=8 => s.rng.range(65, 4096) as usize,
                _ => s.rng.range(1, 8) as usize,
            }
            .min(s.read_max.max(1));
            let coalesce = s.rng.percent(50);
            while let Some(o) = s.out.front_mut() {
                if o.at > now || buf.len() >= want {
                    break;
                }
                match &mut o.seg {
                    Seg::Data(d) => {
                        let take = (want - buf.len()).min(d.len());
                        buf.extend_from_slice(&d[..take]);
                        d.drain(..take);
                        if d.is_empty() {
                            ended |= o.ends_response;
                            s.out.pop_front();
                            if !coalesce {
                                break;
                            }
                        }
                    }
                    Seg::Eof | Seg::Reset => {
                        if buf.is_empty() {
                            special = Some(matches!(o.seg, Seg::Reset));
                        }
                        break;
                    }
                }
            }
            if ended {
                s.busy = None;
                if s.idle_close_at.is_none()
                    && !s.said_close
                    && s.rng.percent(scn.origin.idle_close_pct)
                {
                    let at = now + ms(s.rng.below(20));
                    let fin = at + ms(s.rng.below(5));
                    s.idle_close_at = Some(at);
                    s.out.push_back(Out {
                        at: fin,
                        seg: Seg::Eof,
                        ends_response: false,
                    });
                }
            }
            match special {
                Some(true) => {
                    led.log(now, format!("backend {key:?}: read → ECONNRESET"));
                    core.on_backend(
                        now,
                        key,
                        BackendEvent::Received(Err(io::ErrorKind::ConnectionReset.into())),
                    );
                }
                Some(false) => {
                    led.log(now, format!("backend {key:?}: read → EOF"));
                    core.on_backend(now, key, BackendEvent::Received(Ok(&[])));
                }
                None => {
                    core.on_backend(now, key, BackendEvent::Received(Ok(&buf)));
                }
            }
        }
        progress
    }

    /// Earliest instant something is due: a completion, or data for an armed read.
    pub fn next_event(&self) -> Option<Instant> {
        let c = self.completions.keys().next().map(|(at, _)| *at);
        let r = self
            .socks
            .values()
            .filter(|s| s.reading)
            .filter_map(|s| s.out.front().map(|o| o.at))
            .min();
        match (c, r) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The request named by the request line at the front of `buf`, if there is one yet.
fn request_line_id(buf: &[u8]) -> Option<ReqId> {
    let end = find(buf, b"\r\n")?;
    let line = std::str::from_utf8(&buf[..end]).ok()?;
    parse_path(line.split(' ').nth(1)?)
}

fn parse_path(path: &str) -> Option<ReqId> {
    let rest = path.strip_prefix("/sim/")?;
    let (c, r) = rest.split_once('/')?;
    Some((c.parse().ok()?, r.parse().ok()?))
}

fn check_request(now: Instant, req: &ParsedReq, plan: &crate::scenario::ReqPlan, led: &mut Ledger) {
    if req.method != plan.method {
        led.violation(
            now,
            format!(
                "{}: method {} became {}",
                plan.path(),
                plan.method,
                req.method
            ),
        );
    }
    if req.header("host") != Some("localhost") {
        led.violation(
            now,
            format!("{}: host header {:?}", plan.path(), req.header("host")),
        );
    }
    let ip = format!("10.0.0.{}", plan.client + 1);
    if req.header("x-forwarded-for") != Some(ip.as_str()) {
        led.violation(
            now,
            format!(
                "{}: x-forwarded-for {:?}, client is {ip}",
                plan.path(),
                req.header("x-forwarded-for")
            ),
        );
    }
    let want: &[u8] = plan.upload.as_ref().map_or(&[], |u| &u.data);
    // A client that resets its stream mid-upload never gets here: the core sees the reset and
    // never ends the body. (Unpatched quiche 0.30 also sent a FIN at the reset offset, which
    // made a truncated upload without content-length look complete: vendor/README.md.)
    if req.body != want {
        led.violation(
            now,
            format!(
                "{}: the origin got a {}-byte body, the client uploaded {} bytes (sha256 {} vs {})",
                plan.path(),
                req.body.len(),
                want.len(),
                hex(&boring::sha::sha256(&req.body)[..8]),
                hex(&boring::sha::sha256(want)[..8]),
            ),
        );
    }
    let framing_ok = match &plan.upload {
        Some(u) if !u.data.is_empty() && u.content_length => {
            !req.chunked && req.content_length == Some(u.data.len())
        }
        Some(u) if !u.data.is_empty() => req.chunked && req.content_length.is_none(),
        _ if plan.separate_fin => req.chunked || req.content_length.unwrap_or(0) == 0,
        _ => !req.chunked && req.content_length.unwrap_or(0) == 0,
    };
    if !framing_ok {
        led.violation(
            now,
            format!(
                "{}: request framing chunked={} content-length={:?} does not match the upload",
                plan.path(),
                req.chunked,
                req.content_length
            ),
        );
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Whatever",
    }
}

/// Queues the answer to one request on the socket.
fn queue_response(now: Instant, s: &mut Sock, b: &Behaviour) {
    let (resp, tail, cut) = match b {
        Behaviour::Hang => return,
        Behaviour::Garbage(g) => {
            let at = now + ms(s.rng.below(3));
            s.out.push_back(Out {
                at,
                seg: Seg::Data(g.clone()),
                ends_response: false,
            });
            return;
        }
        Behaviour::Respond(r) => (r, None, None),
        Behaviour::ResetMidBody(r, cut) => (r, Some(Seg::Reset), Some(*cut)),
        Behaviour::CloseEarly(r, cut) => (r, Some(Seg::Eof), Some(*cut)),
        Behaviour::BadChunk(r) => (r, None, Some(usize::MAX)),
    };
    let bad_chunk = cut == Some(usize::MAX);
    let mut head = Vec::new();
    if resp.interim {
        head.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    head.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\nserver: sim\r\n",
            resp.status,
            reason(resp.status)
        )
        .as_bytes(),
    );
    let no_body = resp.status == 204;
    match resp.framing {
        Framing::Length if !no_body => {
            head.extend_from_slice(format!("content-length: {}\r\n", resp.body.len()).as_bytes())
        }
        Framing::Chunked if !no_body => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    let close = !resp.keepalive || resp.framing == Framing::Close;
    if close {
        head.extend_from_slice(b"connection: close\r\n");
        s.said_close = true;
    }
    head.extend_from_slice(b"\r\n");

    let body: &[u8] = match cut {
        Some(c) if !bad_chunk => &resp.body[..c.min(resp.body.len())],
        _ => &resp.body,
    };
    // Split the body into `pieces` at random points.
    let mut cuts: Vec<usize> = (1..resp.pieces)
        .map(|_| s.rng.below(body.len() as u64 + 1) as usize)
        .collect();
    cuts.push(0);
    cuts.push(body.len());
    cuts.sort_unstable();
    let pieces: Vec<&[u8]> = cuts.windows(2).map(|w| &body[w[0]..w[1]]).collect();

    let mut wire: Vec<Vec<u8>> = vec![head];
    for (i, p) in pieces.iter().enumerate() {
        let mut seg = Vec::new();
        match resp.framing {
            Framing::Chunked if !no_body => {
                if bad_chunk && i > 0 {
                    seg.extend_from_slice(b"zz\r\nnot a chunk\r\n");
                    wire.push(seg);
                    break;
                }
                if !p.is_empty() {
                    seg.extend_from_slice(format!("{:x}\r\n", p.len()).as_bytes());
                    seg.extend_from_slice(p);
                    seg.extend_from_slice(b"\r\n");
                }
            }
            _ if no_body => {}
            _ => seg.extend_from_slice(p),
        }
        if !seg.is_empty() {
            wire.push(seg);
        }
    }
    if bad_chunk && wire.len() < 3 {
        wire.push(b"zz\r\nnot a chunk\r\n".to_vec());
    }
    if resp.framing == Framing::Chunked && !no_body && cut.is_none() {
        wire.push(b"0\r\n\r\n".to_vec());
    }
    let mut at = now + ms(resp.head_delay_ms);
    let n = wire.len();
    for (i, seg) in wire.into_iter().enumerate() {
        let last = i + 1 == n;
        s.out.push_back(Out {
            at,
            seg: Seg::Data(seg),
            ends_response: last && cut.is_none() && !close,
        });
        at += ms(resp.gap_ms);
    }
    if let Some(t) = tail {
        s.out.push_back(Out {
            at,
            seg: t,
            ends_response: false,
        });
    } else if close && !bad_chunk {
        s.out.push_back(Out {
            at,
            seg: Seg::Eof,
            ends_response: false,
        });
    }
}

pub struct ParsedReq {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub chunked: bool,
    pub content_length: Option<usize>,
}

impl ParsedReq {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses one HTTP/1.1 request (head and body) from the front of `buf`: `Ok(None)` until it is
/// all there. Strict: anything an origin might read two ways is an error.
pub fn parse_request(buf: &[u8]) -> Result<Option<(usize, ParsedReq)>, String> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err("request head over 64 KiB".into());
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "head is not UTF-8".to_string())?;
    let mut lines = head.split("\r\n");
    let rl = lines.next().unwrap_or("");
    let mut parts = rl.split(' ');
    let (Some(method), Some(path), Some("HTTP/1.1"), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("bad request line {rl:?}"));
    };
    let mut headers = Vec::new();
    for l in lines {
        let (n, v) = l
            .split_once(':')
            .ok_or_else(|| format!("bad header line {l:?}"))?;
        if n.is_empty() || n.contains(' ') || l.starts_with([' ', '\t']) {
            return Err(format!("bad header name in {l:?}"));
        }
        if v.contains(['\r', '\n', '\0']) {
            return Err(format!("control character in {l:?}"));
        }
        headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
    }
    let count = |name: &str| headers.iter().filter(|(n, _)| n == name).count();
    if count("host") != 1 || count("content-length") > 1 || count("transfer-encoding") > 1 {
        return Err("duplicate host/content-length/transfer-encoding".into());
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let te = get("transfer-encoding");
    let cl = get("content-length");
    if te.is_some() && cl.is_some() {
        return Err("both content-length and transfer-encoding".into());
    }
    if let Some(t) = &te {
        if t != "chunked" {
            return Err(format!("transfer-encoding {t}"));
        }
    }
    for hop in [
        "connection",
        "keep-alive",
        "upgrade",
        "proxy-connection",
        "te",
    ] {
        if count(hop) > 0 {
            return Err(format!("hop-by-hop field {hop} forwarded"));
        }
    }
    let content_length = match &cl {
        Some(v) => Some(
            v.parse::<usize>()
                .map_err(|_| format!("content-length {v:?}"))?,
        ),
        None => None,
    };
    let mut pos = end + 4;
    let mut body = Vec::new();
    if te.is_some() {
        loop {
            let Some(eol) = find(&buf[pos..], b"\r\n") else {
                return Ok(None);
            };
            let line =
                std::str::from_utf8(&buf[pos..pos + eol]).map_err(|_| "chunk line".to_string())?;
            let size =
                usize::from_str_radix(line, 16).map_err(|_| format!("chunk size {line:?}"))?;
            pos += eol + 2;
            if size == 0 {
                if buf.len() < pos + 2 {
                    return Ok(None);
                }
                if &buf[pos..pos + 2] != b"\r\n" {
                    return Err("trailers after the last chunk".into());
                }
                pos += 2;
                break;
            }
            if buf.len() < pos + size + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&buf[pos..pos + size]);
            if &buf[pos + size..pos + size + 2] != b"\r\n" {
                return Err("chunk not followed by CRLF".into());
            }
            pos += size + 2;
        }
    } else if let Some(n) = content_length {
        if buf.len() < pos + n {
            return Ok(None);
        }
        body.extend_from_slice(&buf[pos..pos + n]);
        pos += n;
    }
    Ok(Some((
        pos,
        ParsedReq {
            method: method.to_string(),
            path: path.to_string(),
            headers,
            body,
            chunked: te.is_some(),
            content_length,
        },
    )))
}
