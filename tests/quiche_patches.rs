//! Regression tests for the fixes h3gate carries in `vendor/quiche` (vendor/README.md), run
//! on a quiche client and server that exchange packets in memory, deterministically.
//!
//! - `quiche-reset-no-fin.patch`: a stream reset locally while data was still buffered sends no
//!   STREAM frame with FIN (it made a response the core reset look complete to the client).
//! - `quiche-reset-after-fin.patch`: a peer's RESET_STREAM that arrives after its FIN, before the
//!   application read everything, is reported as a reset (it was a clean `Finished`, the unread
//!   data silently gone: a cancelled upload reached the origin truncated but complete).
//! - `quiche-spurious-retransmit.patch`: a stream whose re-queued data was acked before it went
//!   out again no longer blocks every other stream (a transfer stalled under loss once the client
//!   went quiet).
//! - `quiche-path-reclaim.patch`: a connection survives any number of NAT rebindings, keeping at
//!   most its path limit (the 16th rebinding hung).

use std::net::SocketAddr;
use std::sync::Mutex;

/// quiche's trace lines (`tx frm ...`), to see which frames a side sent.
static TRACE: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.target().starts_with("quiche")
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let line = r.args().to_string();
            if line.contains(" tx frm ") {
                TRACE.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        }
    }
    fn flush(&self) {}
}

/// Frames sent so far by the connection whose trace id (its SCID in hex) starts with `id`.
fn sent_frames(id: &str) -> Vec<String> {
    TRACE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|l| l.starts_with(id))
        .cloned()
        .collect()
}

const CODE: u64 = 0x10c; // H3_REQUEST_CANCELLED

struct Pipe {
    client: quiche::Connection,
    server: quiche::Connection,
    client_addr: SocketAddr,
    server_addr: SocketAddr,
}

fn config(server: bool) -> quiche::Config {
    config_v(server, quiche::PROTOCOL_VERSION)
}

/// The same, for QUIC `version`.
fn config_v(server: bool, version: u32) -> quiche::Config {
    let mut c = quiche::Config::new(version).expect("config");
    if server {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
        c.load_cert_chain_from_pem_file(&format!("{dir}/cert.pem"))
            .expect("cert");
        c.load_priv_key_from_pem_file(&format!("{dir}/key.pem"))
            .expect("key");
    }
    c.verify_peer(false);
    c.set_application_protos(&[b"h3"]).expect("alpn");
    c.set_max_idle_timeout(10_000);
    c.set_initial_max_data(10_000_000);
    c.set_initial_max_stream_data_bidi_local(1_000_000);
    c.set_initial_max_stream_data_bidi_remote(1_000_000);
    c.set_initial_max_stream_data_uni(1_000_000);
    c.set_initial_max_streams_bidi(10);
    c.set_initial_max_streams_uni(10);
    c
}

impl Pipe {
    /// A client and a server made from these configurations, nothing exchanged yet.
    fn start(client_cfg: &mut quiche::Config, server_cfg: &mut quiche::Config) -> Pipe {
        let client_addr: SocketAddr = "10.0.0.1:4000".parse().expect("addr");
        let server_addr: SocketAddr = "10.0.0.2:443".parse().expect("addr");
        let client = quiche::connect(
            Some("localhost"),
            &quiche::ConnectionId::from_ref(&[1; 16]),
            client_addr,
            server_addr,
            client_cfg,
        )
        .expect("connect");
        let server = quiche::accept(
            &quiche::ConnectionId::from_ref(&[2; 16]),
            None,
            server_addr,
            client_addr,
            server_cfg,
        )
        .expect("accept");
        Pipe {
            client,
            server,
            client_addr,
            server_addr,
        }
    }

    /// An established pair with the default configurations.
    fn new() -> Pipe {
        let mut p = Pipe::start(&mut config(false), &mut config(true));
        for _ in 0..20 {
            p.advance();
            if p.client.is_established() && p.server.is_established() {
                return p;
            }
        }
        panic!("no handshake");
    }

    /// Every packet `from` has to send, delivered to `to` (no loss, in order).
    fn deliver(
        from: &mut quiche::Connection,
        to: &mut quiche::Connection,
        to_addr: SocketAddr,
        from_addr: SocketAddr,
    ) -> usize {
        let mut buf = [0u8; 1500];
        let mut n = 0;
        while let Ok((len, _)) = from.send(&mut buf) {
            let info = quiche::RecvInfo {
                from: from_addr,
                to: to_addr,
            };
            to.recv(&mut buf[..len], info).expect("recv");
            n += 1;
        }
        n
    }

    /// Delivers packets both ways until neither side has anything to send.
    fn advance(&mut self) {
        loop {
            let a = Self::deliver(
                &mut self.client,
                &mut self.server,
                self.server_addr,
                self.client_addr,
            );
            let b = Self::deliver(
                &mut self.server,
                &mut self.client,
                self.client_addr,
                self.server_addr,
            );
            if a + b == 0 {
                return;
            }
        }
    }
}

fn h3_pair(p: &mut Pipe) -> (quiche::h3::Connection, quiche::h3::Connection) {
    let cfg = quiche::h3::Config::new().expect("h3 config");
    let client = quiche::h3::Connection::with_transport(&mut p.client, &cfg).expect("h3 client");
    let server = quiche::h3::Connection::with_transport(&mut p.server, &cfg).expect("h3 server");
    p.advance();
    (client, server)
}

fn request(path: &str) -> Vec<quiche::h3::Header> {
    [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", path),
    ]
    .iter()
    .map(|(n, v)| quiche::h3::Header::new(n.as_bytes(), v.as_bytes()))
    .collect()
}

/// Polls `h3` until Done; returns the events for `sid` by name, reading no body.
fn events(h3: &mut quiche::h3::Connection, conn: &mut quiche::Connection, sid: u64) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match h3.poll(conn) {
            Ok((s, ev)) if s == sid => seen.push(match ev {
                quiche::h3::Event::Headers { .. } => "headers".to_string(),
                quiche::h3::Event::Data => "data".to_string(),
                quiche::h3::Event::Finished => "finished".to_string(),
                quiche::h3::Event::Reset(code) => format!("reset 0x{code:x}"),
                other => format!("{other:?}"),
            }),
            Ok(_) => {}
            Err(quiche::h3::Error::Done) => return seen,
            Err(e) => panic!("h3 poll: {e:?}"),
        }
    }
}

/// Reads the body of `sid` until Done; returns the bytes read and whether a reset was seen.
fn read_body(
    h3: &mut quiche::h3::Connection,
    conn: &mut quiche::Connection,
    sid: u64,
) -> (usize, bool) {
    let mut buf = [0u8; 4096];
    let mut total = 0;
    loop {
        match h3.recv_body(conn, sid, &mut buf) {
            Ok(n) => total += n,
            Err(quiche::h3::Error::Done) => return (total, false),
            Err(quiche::h3::Error::TransportError(quiche::Error::StreamReset(_))) => {
                return (total, true)
            }
            Err(e) => panic!("recv_body: {e:?}"),
        }
    }
}

#[test]
fn a_reset_after_the_fin_is_reported_as_a_reset() {
    let mut p = Pipe::new();
    let (mut client, mut server) = h3_pair(&mut p);
    // The client uploads 20 000 bytes with FIN; the server reads only part of them.
    let sid = client
        .send_request(&mut p.client, &request("/upload"), false)
        .expect("request");
    let body = vec![7u8; 20_000];
    let mut sent = 0;
    while sent < body.len() {
        sent += client
            .send_body(&mut p.client, sid, &body[sent..], true)
            .unwrap_or(0);
        p.advance();
    }
    let ev = events(&mut server, &mut p.server, sid);
    assert_eq!(ev, ["headers", "data"], "{ev:?}");
    let mut part = [0u8; 5000];
    let got = server
        .recv_body(&mut p.server, sid, &mut part)
        .expect("part of the body");
    assert!(got > 0 && got < body.len());
    // Then it cancels: RESET_STREAM after the FIN, the rest still unread at the server.
    p.client
        .stream_shutdown(sid, quiche::Shutdown::Write, CODE)
        .expect("reset");
    p.advance();
    let (rest, reset_seen) = read_body(&mut server, &mut p.server, sid);
    let ev = events(&mut server, &mut p.server, sid);
    assert!(
        reset_seen || ev.iter().any(|e| e.starts_with("reset")),
        "the reset was not reported: read {got}+{rest} of {} bytes, events {ev:?}",
        body.len()
    );
    assert!(
        !ev.iter().any(|e| e == "finished") || got + rest == body.len(),
        "a truncated upload ended as complete: {} of {} bytes, events {ev:?}",
        got + rest,
        body.len()
    );
}

#[test]
fn a_stream_reset_with_data_buffered_sends_no_fin() {
    static LOGGER: Capture = Capture;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Trace);
    // The server's SCID is [2; 16]; its trace id is that in hex.
    let server_id = "02".repeat(16);
    let mut p = Pipe::new();
    let (mut client, mut server) = h3_pair(&mut p);
    let sid = client
        .send_request(&mut p.client, &request("/download"), true)
        .expect("request");
    p.advance();
    let ev = events(&mut server, &mut p.server, sid);
    assert!(ev.first().is_some_and(|e| e == "headers"), "{ev:?}");
    let head = [quiche::h3::Header::new(b":status", b"200")];
    server
        .send_response(&mut p.server, sid, &head, false)
        .expect("response");
    // As much as quiche takes (about a congestion window): most of it is still buffered when the
    // stream is reset (an origin that broke mid-body).
    let body = vec![9u8; 200_000];
    let buffered = server
        .send_body(&mut p.server, sid, &body, false)
        .expect("body");
    assert!(buffered > 5_000, "only {buffered} bytes buffered");
    // One packet goes out, then the reset; nothing buffered may go out with a FIN.
    let mut buf = [0u8; 1500];
    let (len, _) = p.server.send(&mut buf).expect("first packet");
    let info = quiche::RecvInfo {
        from: p.server_addr,
        to: p.client_addr,
    };
    p.client.recv(&mut buf[..len], info).expect("recv");
    p.server
        .stream_shutdown(sid, quiche::Shutdown::Write, 0x102)
        .expect("reset");
    let before = sent_frames(&server_id).len();
    // Deliver the server's packets one at a time, letting the client's application read after
    // each: if any of them carried the FIN before the RESET_STREAM was processed, the client
    // would finish the stream.
    let mut seen = Vec::new();
    let mut total = 0;
    for _ in 0..200 {
        let Ok((len, _)) = p.server.send(&mut buf) else {
            break;
        };
        p.client.recv(&mut buf[..len], info).expect("recv");
        seen.extend(events(&mut client, &mut p.client, sid));
        let (n, _) = read_body(&mut client, &mut p.client, sid);
        total += n;
        seen.extend(events(&mut client, &mut p.client, sid));
    }
    p.advance();
    seen.extend(events(&mut client, &mut p.client, sid));
    // On the wire: after the reset, no STREAM frame with FIN on that stream (in order delivery
    // hides it from the client here; with loss or reordering it arrived before the reset).
    let after = sent_frames(&server_id);
    assert!(after.len() > before, "no frame captured: {after:?}");
    let stream_fin = format!("tx frm STREAM id={sid} ");
    let fins: Vec<&String> = after[before..]
        .iter()
        .filter(|l| l.contains(&stream_fin) && l.contains("fin=true"))
        .collect();
    assert!(
        fins.is_empty(),
        "STREAM frame with FIN after the reset: {fins:?}"
    );
    assert!(
        !seen.iter().any(|e| e == "finished"),
        "the reset response looked complete after {total} bytes: {seen:?}"
    );
    assert!(
        seen.iter().any(|e| e == "reset 0x102"),
        "no reset reported: {seen:?}"
    );
}

/// Every packet the server has to send now, not delivered (in flight, as if delayed).
fn hold(p: &mut Pipe) -> Vec<Vec<u8>> {
    let mut held = Vec::new();
    let mut buf = [0u8; 1500];
    while let Ok((len, _)) = p.server.send(&mut buf) {
        held.push(buf[..len].to_vec());
    }
    held
}

/// Reads every response body that has data, adding the bytes read to `got` (per stream).
fn body_bytes(
    h3: &mut quiche::h3::Connection,
    conn: &mut quiche::Connection,
    sids: [u64; 2],
    got: &mut [usize; 2],
) {
    while let Ok((sid, ev)) = h3.poll(conn) {
        let Some(i) = sids.iter().position(|&s| s == sid) else {
            continue;
        };
        if matches!(ev, quiche::h3::Event::Data) {
            got[i] += read_body(h3, conn, sid).0;
        }
    }
}

#[test]
fn data_acked_after_a_probe_queued_it_again_does_not_block_other_streams() {
    let mut p = Pipe::new();
    let (mut client, mut server) = h3_pair(&mut p);
    let get = |path: &str| {
        let mut h = request(path);
        h[0] = quiche::h3::Header::new(b":method", b"GET");
        h
    };
    let first = client
        .send_request(&mut p.client, &get("/a"), true)
        .expect("request a");
    let second = client
        .send_request(&mut p.client, &get("/b"), true)
        .expect("request b");
    p.advance();
    let mut requests = Vec::new();
    while let Ok((sid, ev)) = server.poll(&mut p.server) {
        if matches!(ev, quiche::h3::Event::Headers { .. }) {
            requests.push(sid);
        }
    }
    assert_eq!(requests, [first, second]);
    let head = [quiche::h3::Header::new(b":status", b"200")];
    for sid in [first, second] {
        server
            .send_response(&mut p.server, sid, &head, false)
            .expect("response");
    }
    // Part of the first response goes out; the client is quiet and its ACKs are late.
    let body = vec![5u8; 8_000];
    let n = server
        .send_body(&mut p.server, first, &body, false)
        .expect("body");
    assert_eq!(n, body.len());
    let held = hold(&mut p);
    assert!(held.len() >= 4, "only {} packets", held.len());
    // The server's PTO fires: it queues the data of its oldest packets again and sends one probe
    // (lost too).
    let wait = p.server.timeout().expect("a PTO is armed");
    std::thread::sleep(wait + std::time::Duration::from_millis(2));
    p.server.on_timeout();
    let mut buf = [0u8; 1500];
    assert!(p.server.send(&mut buf).is_ok(), "no probe");
    // Then the late packets arrive and are acked: the data queued again is acked before it went
    // out a second time, so the first stream has nothing left to send.
    let info = quiche::RecvInfo {
        from: p.server_addr,
        to: p.client_addr,
    };
    for mut pkt in held {
        p.client.recv(&mut pkt, info).expect("recv");
    }
    Pipe::deliver(&mut p.client, &mut p.server, p.server_addr, p.client_addr);
    let mut got = [0usize; 2];
    body_bytes(&mut client, &mut p.client, [first, second], &mut got);
    assert_eq!(got[0], body.len());
    // The second response's body must still go out.
    let more = vec![6u8; 4_000];
    let n = server
        .send_body(&mut p.server, second, &more, true)
        .expect("second body");
    assert_eq!(n, more.len());
    p.advance();
    body_bytes(&mut client, &mut p.client, [first, second], &mut got);
    assert_eq!(
        got[1],
        more.len(),
        "the second stream sent nothing: the first one, with nothing to send, blocked the queue"
    );
}

/// `quiche-path-reclaim.patch`: a client behind a NAT that gives it a new port before every
/// request (the old one never used again) keeps its connection through 100 rebindings, and the
/// server keeps at most its `active_connection_id_limit` paths. The client issues no spare CID,
/// so the server reuses the one it has on every new path; unpatched, that CID kept each old path
/// alive and the 16th rebinding's packets were refused, silently: the connection hung.
#[test]
fn a_connection_survives_any_number_of_nat_rebindings() {
    const LIMIT: u64 = 16;
    let mut server_cfg = config(true);
    server_cfg.set_active_connection_id_limit(LIMIT);
    server_cfg.set_initial_max_streams_bidi(1000);
    let mut client_cfg = config(false);
    client_cfg.set_initial_max_streams_bidi(1000);
    let Pipe {
        mut client,
        mut server,
        client_addr,
        server_addr,
    } = Pipe::start(&mut client_cfg, &mut server_cfg);
    // What the server sees as the client's address: the client itself never learns it changed.
    let mut seen = client_addr;
    let mut buf = [0u8; 1500];
    let mut exchange = |client: &mut quiche::Connection, server: &mut quiche::Connection, seen| {
        for _ in 0..50 {
            let mut moved = 0;
            while let Ok((len, _)) = client.send(&mut buf) {
                let info = quiche::RecvInfo {
                    from: seen,
                    to: server_addr,
                };
                let _ = server.recv(&mut buf[..len], info);
                moved += 1;
            }
            while let Ok((len, to)) = server.send(&mut buf) {
                assert_eq!(
                    to.to, seen,
                    "the server answers the client's current address"
                );
                let info = quiche::RecvInfo {
                    from: server_addr,
                    to: client_addr,
                };
                let _ = client.recv(&mut buf[..len], info);
                moved += 1;
            }
            if moved == 0 {
                return;
            }
        }
    };
    exchange(&mut client, &mut server, seen);
    assert!(client.is_established() && server.is_established());
    for i in 0..100u16 {
        seen.set_port(5000 + i);
        let sid = u64::from(i) * 4;
        client.stream_send(sid, b"ping", true).expect("stream_send");
        exchange(&mut client, &mut server, seen);
        let mut got = [0u8; 16];
        let read = server.stream_recv(sid, &mut got);
        assert!(
            matches!(read, Ok((4, true))),
            "request {} after rebinding {} never reached the server: {read:?}, {} paths",
            i + 1,
            i + 1,
            server.path_stats().count()
        );
        server.stream_send(sid, b"pong", true).expect("answer");
        exchange(&mut client, &mut server, seen);
        let read = client.stream_recv(sid, &mut got);
        assert!(matches!(read, Ok((4, true))), "answer {}: {read:?}", i + 1);
        let paths = server.path_stats().count();
        assert!(
            paths as u64 <= LIMIT,
            "{paths} paths after {} rebindings",
            i + 1
        );
    }
    assert!(!server.is_closed() && !client.is_closed());
}

/// `quiche-v2.patch`: a client that starts in QUIC version 2 (RFC 9369) completes the handshake
/// and exchanges data in v2, its long headers carrying v2's type bits; a session ticket from v2
/// does not resume in v1 (RFC 9369 §5).
#[test]
fn a_client_speaks_quic_v2_end_to_end() {
    // One server configuration: its TLS context holds the ticket keys.
    let mut server_cfg = config(true);
    let mut pair = |version: u32, session: Option<&[u8]>| {
        let mut p = Pipe::start(&mut config_v(false, version), &mut server_cfg);
        if let Some(s) = session {
            p.client.set_session(s).expect("session");
        }
        // The client's first datagram: a long header with version 2 and v2's Initial bits (01).
        let mut buf = [0u8; 1500];
        let (len, _) = p.client.send(&mut buf).expect("first flight");
        assert_eq!(&buf[1..5], &version.to_be_bytes());
        let bits = (buf[0] & 0x30) >> 4;
        assert_eq!(bits, if version == 1 { 0 } else { 1 }, "Initial type bits");
        let info = quiche::RecvInfo {
            from: p.client_addr,
            to: p.server_addr,
        };
        p.server
            .recv(&mut buf[..len], info)
            .expect("server reads it");
        for _ in 0..20 {
            p.advance();
        }
        p
    };
    let mut p = pair(quiche::PROTOCOL_VERSION_V2, None);
    assert!(p.client.is_established() && p.server.is_established());
    assert_eq!(p.server.version(), quiche::PROTOCOL_VERSION_V2);
    assert_eq!(p.client.version(), quiche::PROTOCOL_VERSION_V2);
    p.client.stream_send(0, b"ping", true).expect("send");
    p.advance();
    let mut got = [0u8; 16];
    assert!(matches!(p.server.stream_recv(0, &mut got), Ok((4, true))));
    let body = [7u8; 50_000];
    let (mut sent, mut total) = (0, 0);
    for _ in 0..50 {
        if sent < body.len() {
            sent += p.server.stream_send(0, &body[sent..], true).unwrap_or(0);
        }
        p.advance();
        let mut buf = [0u8; 65536];
        while let Ok((n, _)) = p.client.stream_recv(0, &mut buf) {
            total += n;
        }
    }
    assert_eq!(total, 50_000);
    // Resumption stays within a version.
    let session = p.client.session().expect("a session ticket").to_vec();
    let again = pair(quiche::PROTOCOL_VERSION_V2, Some(&session));
    assert!(again.server.is_established() && again.server.is_resumed());
    let other = pair(quiche::PROTOCOL_VERSION, Some(&session));
    assert!(
        other.server.is_established(),
        "v1 with a v2 ticket must still connect"
    );
    assert!(!other.server.is_resumed(), "a v2 ticket resumed in v1");
}

/// quiche-thread-clock.patch's companion fix in `write_pkt_type`: a client whose handshake is
/// not confirmed (HANDSHAKE_DONE and the ACK of its Finished lost) has a Handshake probe due
/// when the application closes it. Without the fix every `send()` returned another ACK-only
/// Handshake packet and never `Done` (found by the simulation, seed 781 of `simulated_seeds`);
/// with it, the APPLICATION_CLOSE goes out in 1-RTT and the server sees it.
#[test]
fn an_application_close_with_a_handshake_probe_due_is_sent_and_ends() {
    let t0 = std::time::Instant::now();
    quiche::clock::set_thread_clock(Some(t0));
    let mut p = Pipe::start(&mut config(false), &mut config(true));
    let mut buf = [0u8; 1500];
    // ClientHello to the server, the server's flight to the client.
    Pipe::deliver(&mut p.client, &mut p.server, p.server_addr, p.client_addr);
    Pipe::deliver(&mut p.server, &mut p.client, p.client_addr, p.server_addr);
    assert!(p.client.is_established());
    // The client's Finished reaches the server; nothing of the server's answer comes back.
    Pipe::deliver(&mut p.client, &mut p.server, p.server_addr, p.client_addr);
    assert!(p.server.is_established());
    while p.server.send(&mut buf).is_ok() {}
    // The client's probe timer fires (its Finished looks lost).
    let pto = p.client.timeout().expect("a probe timer");
    quiche::clock::set_thread_clock(Some(t0 + pto + std::time::Duration::from_millis(1)));
    p.client.on_timeout();
    p.client.close(true, 0x100, b"bye").expect("close");
    let mut sent = 0;
    loop {
        match p.client.send(&mut buf) {
            Ok((len, _)) => {
                sent += 1;
                assert!(sent < 10, "send() keeps returning packets while closing");
                let info = quiche::RecvInfo {
                    from: p.client_addr,
                    to: p.server_addr,
                };
                let _ = p.server.recv(&mut buf[..len], info);
            }
            Err(quiche::Error::Done) => break,
            Err(e) => panic!("send: {e:?}"),
        }
    }
    quiche::clock::set_thread_clock(None);
    let err = p.server.peer_error().expect("the server saw the close");
    assert!(err.is_app && err.error_code == 0x100, "{err:?}");
}
