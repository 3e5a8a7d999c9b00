//! An in-process HTTP/3 client (quiche) that sends the requests of its plan and records how each
//! ended. It believes its address is `qaddr` for the whole run; the network rewrites the source
//! to `nat`, which NAT rebinding changes under it, so the core sees a new peer address for the
//! same connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quiche::h3::NameValue;

use crate::net::{Dst, Net, Packet};
use crate::origin::Ledger;
use crate::rng::Rng;
use crate::scenario::ClientPlan;

const H3_NO_ERROR: u64 = 0x100;
const H3_REQUEST_CANCELLED: u64 = 0x10c;

#[derive(Debug, Clone)]
pub enum Outcome {
    /// The whole response, FIN included.
    Response { status: u16, body: Vec<u8> },
    /// The server reset the stream.
    Reset(u64),
    /// FIN after fewer body bytes than the response's content-length, or FIN without a
    /// response head (`status` 0). quiche 0.30 sends a FIN at the reset offset next to each
    /// RESET_STREAM, so a stream the core reset can end this way when the FIN arrives first; a
    /// client can tell only when a content-length is there to compare with.
    Truncated {
        status: u16,
        got: usize,
        want: usize,
    },
    /// The connection closed first.
    ConnClosed,
    /// Never sent: GOAWAY came first.
    NotSent,
    /// The client reset the stream itself (plan).
    Cancelled,
    /// The client vanished (plan).
    Vanished,
}

impl Outcome {
    pub fn short(&self) -> String {
        match self {
            Outcome::Response { status, body } => {
                format!("{status} with {} body bytes", body.len())
            }
            Outcome::Reset(c) => format!("reset 0x{c:x}"),
            Outcome::Truncated { status, got, want } => {
                format!("{status} truncated: {got} of {want} body bytes, then FIN")
            }
            other => format!("{other:?}"),
        }
    }
}

#[derive(Default)]
pub struct ReqState {
    pub sid: Option<u64>,
    pub sent_at: Option<Instant>,
    upload_off: usize,
    upload_done: bool,
    status: Option<u16>,
    content_length: Option<usize>,
    body: Vec<u8>,
    readable: bool,
    pub outcome: Option<(Instant, Outcome)>,
    pub judged: bool,
}

pub struct Client {
    pub idx: usize,
    pub plan: ClientPlan,
    q: quiche::Connection,
    h3: Option<quiche::h3::Connection>,
    qaddr: SocketAddr,
    server: SocketAddr,
    pub nat: SocketAddr,
    pub nat_history: Vec<SocketAddr>,
    pub reqs: Vec<ReqState>,
    by_sid: HashMap<u64, usize>,
    pub established_at: Option<Instant>,
    pub datagrams_sent: u64,
    pub aborted: bool,
    pub vanished: bool,
    pub closing: bool,
    /// How the connection ended, if it ended with requests open.
    pub closed_why: Option<String>,
    goaway: Option<u64>,
    read_budget: usize,
    last_read: Instant,
    buf: Vec<u8>,
}

pub fn client_ip(idx: usize) -> String {
    format!("10.0.0.{}", idx + 1)
}

impl Client {
    pub fn new(
        idx: usize,
        plan: ClientPlan,
        server: SocketAddr,
        now: Instant,
        rng: &mut Rng,
        idle_ms: u64,
    ) -> Result<Client, String> {
        let mut cfg = quiche::Config::new(quiche::PROTOCOL_VERSION).map_err(|e| e.to_string())?;
        cfg.verify_peer(false);
        cfg.set_application_protos(quiche::h3::APPLICATION_PROTOCOL)
            .map_err(|e| e.to_string())?;
        cfg.set_max_idle_timeout(idle_ms);
        cfg.set_max_recv_udp_payload_size(65527);
        cfg.set_initial_max_data(64 << 20);
        let window = if plan.slow_reader.is_some() {
            16 << 10
        } else {
            4 << 20
        };
        cfg.set_initial_max_stream_data_bidi_local(window);
        cfg.set_max_stream_window(window.max(16 << 20));
        if plan.slow_reader.is_some() {
            cfg.set_max_stream_window(window);
        }
        cfg.set_initial_max_stream_data_bidi_remote(1 << 20);
        cfg.set_initial_max_stream_data_uni(1 << 20);
        cfg.set_initial_max_streams_bidi(100);
        cfg.set_initial_max_streams_uni(100);
        // A small initial RTT and ACK delay keep loss recovery in the milliseconds, so lossy
        // seeds take few steps.
        cfg.set_initial_rtt(Duration::from_millis(20));
        cfg.set_max_ack_delay(5);
        let scid: [u8; 16] = rng.bytes(16).try_into().expect("16 bytes");
        let qaddr: SocketAddr = format!("192.168.0.{}:5000", idx + 1).parse().expect("addr");
        let nat: SocketAddr = format!("{}:{}", client_ip(idx), 20000 + idx * 100)
            .parse()
            .expect("addr");
        let q = quiche::connect(
            Some("localhost"),
            &quiche::ConnectionId::from_ref(&scid),
            qaddr,
            server,
            &mut cfg,
        )
        .map_err(|e| format!("quiche connect: {e}"))?;
        let n = plan.requests.len();
        Ok(Client {
            idx,
            plan,
            q,
            h3: None,
            qaddr,
            server,
            nat,
            nat_history: vec![nat],
            reqs: (0..n).map(|_| ReqState::default()).collect(),
            by_sid: HashMap::new(),
            established_at: None,
            datagrams_sent: 0,
            aborted: false,
            vanished: false,
            closing: false,
            closed_why: None,
            goaway: None,
            read_budget: 0,
            last_read: now,
            buf: vec![0u8; 65536],
        })
    }

    /// Every request has ended, one way or another.
    pub fn all_done(&self) -> bool {
        self.reqs.iter().all(|r| r.outcome.is_some())
    }

    pub fn is_closed(&self) -> bool {
        self.vanished || self.q.is_closed()
    }

    fn finish(&mut self, i: usize, now: Instant, o: Outcome, led: &mut Ledger) {
        let r = &mut self.reqs[i];
        if r.outcome.is_some() {
            return;
        }
        led.log(now, format!("client {} req {i}: {}", self.idx, o.short()));
        r.outcome = Some((now, o));
    }

    pub fn recv(&mut self, now: Instant, p: Packet, led: &mut Ledger) {
        if self.vanished {
            return;
        }
        if p.from != self.server {
            led.violation(
                now,
                format!(
                    "client {}: datagram from {}, not the listener",
                    self.idx, p.from
                ),
            );
            return;
        }
        if p.to != self.nat && self.plan.rebind_drops_old {
            // Sent to an address the client used before NAT rebinding: the old mapping is gone.
            return;
        }
        let mut data = p.data;
        let _ = self.q.recv(
            &mut data,
            quiche::RecvInfo {
                from: p.from,
                to: self.qaddr,
            },
        );
    }

    /// Sends what is due, reads what arrived, and hands datagrams to the network.
    pub fn step(&mut self, now: Instant, net: &mut Net, led: &mut Ledger) {
        if self.vanished {
            return;
        }
        if self.q.timeout_instant().is_some_and(|t| t <= now) {
            self.q.on_timeout();
        }
        if self.q.is_established() && self.h3.is_none() && !self.q.is_closed() {
            let cfg = quiche::h3::Config::new().expect("h3 config");
            match quiche::h3::Connection::with_transport(&mut self.q, &cfg) {
                Ok(h3) => {
                    self.h3 = Some(h3);
                    self.established_at = Some(now);
                    led.log(now, format!("client {}: established", self.idx));
                }
                Err(e) => led.violation(now, format!("client {}: h3 setup: {e}", self.idx)),
            }
        }
        self.poll(now, led);
        if let Some(est) = self.established_at {
            if !self.closing {
                self.scripted(now, est, led);
            }
            if self.vanished {
                return;
            }
            self.send_bodies(now, led);
            self.read_bodies(now, led);
            self.poll(now, led);
        }
        // Draining: the peer closed the connection; nothing more will happen on it.
        if self.q.is_closed() || self.q.is_draining() {
            if !self.all_done() && self.closed_why.is_none() {
                let why = match (self.q.peer_error(), self.q.local_error()) {
                    (Some(e), _) => format!(
                        "peer closed it: {} error 0x{:x} {:?}",
                        if e.is_app { "application" } else { "transport" },
                        e.error_code,
                        String::from_utf8_lossy(&e.reason)
                    ),
                    (None, Some(e)) => format!(
                        "client closed it: {} error 0x{:x}",
                        if e.is_app { "application" } else { "transport" },
                        e.error_code
                    ),
                    (None, None) if self.q.is_timed_out() => "idle timeout".to_string(),
                    (None, None) => "stateless reset".to_string(),
                };
                let st = self.q.stats();
                led.log(
                    now,
                    format!(
                        "client {}: connection closed: {why} (quiche: {} packets received, {} \
                         sent, {} lost)",
                        self.idx, st.recv, st.sent, st.lost
                    ),
                );
                self.closed_why = Some(why);
            }
            for i in 0..self.reqs.len() {
                self.finish(i, now, Outcome::ConnClosed, led);
            }
        }
        self.flush(now, net, led);
    }

    fn scripted(&mut self, now: Instant, est: Instant, led: &mut Ledger) {
        let after = |ms: u64| est + Duration::from_millis(ms);
        if let Some(ms) = self.plan.vanish_ms {
            if now >= after(ms) {
                led.log(now, format!("client {}: vanishes", self.idx));
                self.vanished = true;
                for i in 0..self.reqs.len() {
                    self.finish(i, now, Outcome::Vanished, led);
                }
                return;
            }
        }
        if let Some(ms) = self.plan.abort_ms {
            if now >= after(ms) && !self.aborted {
                led.log(
                    now,
                    format!("client {}: closes the connection mid-flight", self.idx),
                );
                self.aborted = true;
                let _ = self.q.close(true, H3_REQUEST_CANCELLED, b"abort");
                for i in 0..self.reqs.len() {
                    self.finish(i, now, Outcome::ConnClosed, led);
                }
                return;
            }
        }
        for i in 0..self.reqs.len() {
            let plan = &self.plan.requests[i];
            let r = &self.reqs[i];
            if let (Some(sid), Some(sent), Some(c), None) =
                (r.sid, r.sent_at, plan.cancel_ms, &r.outcome)
            {
                if now >= sent + Duration::from_millis(c) {
                    let _ =
                        self.q
                            .stream_shutdown(sid, quiche::Shutdown::Read, H3_REQUEST_CANCELLED);
                    let _ =
                        self.q
                            .stream_shutdown(sid, quiche::Shutdown::Write, H3_REQUEST_CANCELLED);
                    self.finish(i, now, Outcome::Cancelled, led);
                }
            }
        }
        for i in 0..self.reqs.len() {
            let plan = &self.plan.requests[i];
            if self.reqs[i].sid.is_some()
                || self.reqs[i].outcome.is_some()
                || now < after(plan.start_ms)
            {
                continue;
            }
            if self.goaway.is_some() {
                self.finish(i, now, Outcome::NotSent, led);
                continue;
            }
            let mut headers = vec![
                quiche::h3::Header::new(b":method", plan.method.as_bytes()),
                quiche::h3::Header::new(b":scheme", b"https"),
                quiche::h3::Header::new(b":authority", b"localhost"),
                quiche::h3::Header::new(b":path", plan.path().as_bytes()),
                quiche::h3::Header::new(b"user-agent", b"h3gate-sim"),
            ];
            let upload_len = plan.upload.as_ref().map_or(0, |u| u.data.len());
            if let Some(u) = &plan.upload {
                if u.content_length {
                    headers.push(quiche::h3::Header::new(
                        b"content-length",
                        upload_len.to_string().as_bytes(),
                    ));
                }
            }
            let fin = upload_len == 0 && !plan.separate_fin;
            let Some(h3) = self.h3.as_mut() else { return };
            match h3.send_request(&mut self.q, &headers, fin) {
                Ok(sid) => {
                    led.log(
                        now,
                        format!(
                            "client {} req {i}: {} {} on stream {sid}",
                            self.idx,
                            plan.method,
                            plan.path()
                        ),
                    );
                    let r = &mut self.reqs[i];
                    r.sid = Some(sid);
                    r.sent_at = Some(now);
                    r.upload_done = fin;
                    self.by_sid.insert(sid, i);
                }
                Err(quiche::h3::Error::StreamBlocked)
                | Err(quiche::h3::Error::TransportError(quiche::Error::StreamLimit))
                | Err(quiche::h3::Error::TransportError(quiche::Error::Done)) => return,
                Err(e) => {
                    led.log(
                        now,
                        format!("client {} req {i}: send_request: {e}", self.idx),
                    );
                    self.finish(i, now, Outcome::ConnClosed, led);
                }
            }
        }
    }

    fn send_bodies(&mut self, now: Instant, led: &mut Ledger) {
        let Some(h3) = self.h3.as_mut() else { return };
        for i in 0..self.reqs.len() {
            let r = &mut self.reqs[i];
            let (Some(sid), false, None) = (r.sid, r.upload_done, &r.outcome) else {
                continue;
            };
            let data: &[u8] = self.plan.requests[i]
                .upload
                .as_ref()
                .map_or(&[], |u| &u.data);
            loop {
                let rest = &data[r.upload_off..];
                match h3.send_body(&mut self.q, sid, rest, true) {
                    Ok(n) => {
                        r.upload_off += n;
                        if n == rest.len() {
                            r.upload_done = true;
                            break;
                        }
                        if n == 0 {
                            break;
                        }
                    }
                    Err(quiche::h3::Error::Done) | Err(quiche::h3::Error::StreamBlocked) => break,
                    Err(quiche::h3::Error::TransportError(quiche::Error::StreamStopped(_)))
                    | Err(quiche::h3::Error::TransportError(quiche::Error::StreamReset(_))) => {
                        r.upload_done = true;
                        break;
                    }
                    Err(e) => {
                        led.log(now, format!("client {} req {i}: send_body: {e}", self.idx));
                        r.upload_done = true;
                        break;
                    }
                }
            }
        }
    }

    fn read_body(&mut self, i: usize, now: Instant, led: &mut Ledger) {
        let Some(h3) = self.h3.as_mut() else { return };
        let r = &mut self.reqs[i];
        let Some(sid) = r.sid else { return };
        loop {
            let limit = if self.plan.slow_reader.is_some() {
                self.read_budget.min(self.buf.len())
            } else {
                self.buf.len()
            };
            if limit == 0 {
                return;
            }
            match h3.recv_body(&mut self.q, sid, &mut self.buf[..limit]) {
                Ok(n) => {
                    r.body.extend_from_slice(&self.buf[..n]);
                    if self.plan.slow_reader.is_some() {
                        self.read_budget -= n;
                    }
                    if n == 0 {
                        r.readable = false;
                        return;
                    }
                }
                Err(quiche::h3::Error::TransportError(quiche::Error::StreamReset(code))) => {
                    // The reset shows here first; the h3 layer may later call the stream
                    // Finished, so record it now (a truncated body must not pass for whole).
                    r.readable = false;
                    if r.outcome.is_none() {
                        r.outcome = Some((now, Outcome::Reset(code)));
                        led.log(
                            now,
                            format!("client {} req {i}: reset 0x{code:x} (read)", self.idx),
                        );
                    }
                    return;
                }
                Err(_) => {
                    r.readable = false;
                    return;
                }
            }
        }
    }

    fn read_bodies(&mut self, now: Instant, led: &mut Ledger) {
        if let Some(rate) = self.plan.slow_reader {
            let ms = now.saturating_duration_since(self.last_read).as_millis() as usize;
            if ms > 0 {
                self.last_read = now;
                self.read_budget = (self.read_budget + ms * rate).min(64 << 10);
            }
        }
        for i in 0..self.reqs.len() {
            if self.reqs[i].readable {
                self.read_body(i, now, led);
            }
        }
    }

    fn poll(&mut self, now: Instant, led: &mut Ledger) {
        let mut stuck = 0;
        for n in 0.. {
            if n > 100_000 {
                led.violation(now, format!("client {}: h3 poll never said Done", self.idx));
                return;
            }
            let Some(h3) = self.h3.as_mut() else { return };
            let (sid, ev) = match h3.poll(&mut self.q) {
                Ok(x) => x,
                Err(quiche::h3::Error::Done) => return,
                Err(quiche::h3::Error::TransportError(quiche::Error::InvalidStreamState(sid)))
                    if self
                        .by_sid
                        .get(&sid)
                        .is_some_and(|&i| self.reqs[i].outcome.is_some()) =>
                {
                    // The tail of the quiche quirk (see Outcome::Truncated): the h3 layer forgot
                    // the stream, the transport still holds its reset. Consume it so the stream
                    // stops showing as readable (else every poll fails the same way).
                    led.log(
                        now,
                        format!("client {}: h3 poll: InvalidStreamState({sid})", self.idx),
                    );
                    let mut scratch = [0u8; 64];
                    let _ = self.q.stream_recv(sid, &mut scratch);
                    let _ = self.q.stream_shutdown(sid, quiche::Shutdown::Read, 0);
                    stuck += 1;
                    if stuck > 3 {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    led.violation(
                        now,
                        format!("client {}: HTTP/3 connection error {e:?}", self.idx),
                    );
                    let _ = self.q.close(true, 0x102, b"");
                    return;
                }
            };
            match ev {
                quiche::h3::Event::Headers { list, .. } => {
                    let Some(&i) = self.by_sid.get(&sid) else {
                        continue;
                    };
                    let status = list
                        .iter()
                        .find(|h| h.name() == b":status")
                        .and_then(|h| std::str::from_utf8(h.value()).ok())
                        .and_then(|v| v.parse::<u16>().ok());
                    if status.is_none() {
                        led.violation(
                            now,
                            format!("client {} req {i}: response without :status", self.idx),
                        );
                    }
                    if self.reqs[i].status.is_none() {
                        self.reqs[i].status = status;
                        self.reqs[i].content_length = list
                            .iter()
                            .find(|h| h.name() == b"content-length")
                            .and_then(|h| std::str::from_utf8(h.value()).ok())
                            .and_then(|v| v.parse().ok());
                    }
                }
                quiche::h3::Event::Data => {
                    let Some(&i) = self.by_sid.get(&sid) else {
                        continue;
                    };
                    self.reqs[i].readable = true;
                    self.read_body(i, now, led);
                }
                quiche::h3::Event::Finished => {
                    let Some(&i) = self.by_sid.get(&sid) else {
                        continue;
                    };
                    if self.reqs[i].outcome.is_some() {
                        continue;
                    }
                    let r = &mut self.reqs[i];
                    match r.status {
                        Some(status) => {
                            let body = std::mem::take(&mut r.body);
                            let o = match r.content_length {
                                Some(want) if want != body.len() => Outcome::Truncated {
                                    status,
                                    got: body.len(),
                                    want,
                                },
                                _ => Outcome::Response { status, body },
                            };
                            self.finish(i, now, o, led);
                        }
                        // FIN without HEADERS: the core reset the stream and quiche's FIN
                        // at the reset offset came first (see Outcome::Truncated).
                        None => {
                            let got = r.body.len();
                            let o = Outcome::Truncated {
                                status: 0,
                                got,
                                want: 0,
                            };
                            self.finish(i, now, o, led);
                        }
                    }
                }
                quiche::h3::Event::Reset(code) => {
                    let Some(&i) = self.by_sid.get(&sid) else {
                        continue;
                    };
                    self.finish(i, now, Outcome::Reset(code), led);
                }
                quiche::h3::Event::GoAway => {
                    led.log(now, format!("client {}: GOAWAY {sid}", self.idx));
                    self.goaway = Some(sid);
                }
                quiche::h3::Event::PriorityUpdate => {}
            }
        }
    }

    fn flush(&mut self, now: Instant, net: &mut Net, led: &mut Ledger) {
        for n in 0.. {
            if n > 20_000 {
                led.violation(
                    now,
                    format!("client {}: quiche send() never said Done", self.idx),
                );
                return;
            }
            let (n, info) = match self.q.send(&mut self.buf) {
                Ok(x) => x,
                Err(quiche::Error::Done) => return,
                Err(e) => {
                    led.log(now, format!("client {}: send: {e}", self.idx));
                    return;
                }
            };
            if info.to != self.server {
                led.violation(
                    now,
                    format!("client {}: quiche sends to {}", self.idx, info.to),
                );
            }
            if self.established_at.is_some() || self.plan.rebind_during_handshake {
                self.datagrams_sent += 1;
            }
            if self.plan.rebind_after == Some(self.datagrams_sent) && self.nat_history.len() == 1 {
                // NAT rebinding: the old mapping expired and this datagram creates a new one. Same
                // client, same connection, new source port; datagrams still in flight to the old
                // port are lost.
                let new: SocketAddr = format!("{}:{}", client_ip(self.idx), self.nat.port() + 1)
                    .parse()
                    .expect("addr");
                led.log(
                    now,
                    format!("client {}: NAT rebinding {} → {new}", self.idx, self.nat),
                );
                self.nat = new;
                self.nat_history.push(new);
            }
            net.send(
                now,
                self.idx,
                true,
                Packet {
                    dst: Dst::Server,
                    from: self.nat,
                    to: info.to,
                    data: self.buf[..n].to_vec(),
                },
            );
        }
    }

    /// Closes the connection at the end of the run.
    pub fn close(&mut self, now: Instant, led: &mut Ledger) {
        if self.closing || self.vanished {
            return;
        }
        self.closing = true;
        led.log(now, format!("client {}: closing", self.idx));
        let _ = self.q.close(true, H3_NO_ERROR, b"bye");
    }

    /// State for a failure report.
    pub fn describe(&self) -> String {
        format!(
            "client {}: established {} closed {} closing {} draining {} timeout_instant in {:?} goaway {:?} outcomes {}/{}",
            self.idx,
            self.q.is_established(),
            self.q.is_closed(),
            self.closing,
            self.q.is_draining(),
            self.q
                .timeout_instant()
                .map(|t| t.saturating_duration_since(quiche::clock::now())),
            self.goaway,
            self.reqs.iter().filter(|r| r.outcome.is_some()).count(),
            self.reqs.len()
        )
    }

    /// Earliest instant this client has something to do.
    pub fn next_event(&self) -> Option<Instant> {
        if self.vanished {
            return None;
        }
        let mut t = self.q.timeout_instant();
        let mut consider = |x: Instant| t = Some(t.map_or(x, |y| y.min(x)));
        if let Some(est) = self.established_at {
            let after = |ms: u64| est + Duration::from_millis(ms);
            if !self.closing {
                if let Some(ms) = self.plan.vanish_ms {
                    consider(after(ms));
                }
                if let (Some(ms), false) = (self.plan.abort_ms, self.aborted) {
                    consider(after(ms));
                }
                for (p, r) in self.plan.requests.iter().zip(&self.reqs) {
                    if r.outcome.is_some() {
                        continue;
                    }
                    if r.sid.is_none() {
                        // A request whose start time passed but could not be sent yet (stream
                        // limit, no room for its HEADERS) is tried again in a millisecond.
                        let now = quiche::clock::now();
                        consider(after(p.start_ms).max(now + Duration::from_millis(1)));
                    } else if let (Some(s), Some(c)) = (r.sent_at, p.cancel_ms) {
                        consider(s + Duration::from_millis(c));
                    }
                }
            }
            if self.plan.slow_reader.is_some() && self.reqs.iter().any(|r| r.readable) {
                consider(self.last_read + Duration::from_millis(1));
            }
        }
        t
    }
}
