//! End-to-end: the anti-amplification limit (RFC 9000 §8.1, issue 13). A raw UDP socket sends
//! one Initial (or the two of a Retry exchange) and then never speaks again, as a spoofed
//! source would not; everything h3gate sends to that address over 10 s must stay within 3× what
//! it received from it, whatever the token and the `quic-retry` setting.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;

const LISTEN: Duration = Duration::from_secs(10);

/// A quiche client whose datagrams the test sends by hand from `sock`.
fn client(sock: &UdpSocket, server: SocketAddr) -> quiche::Connection {
    let mut cfg = quiche::Config::new(quiche::PROTOCOL_VERSION).expect("config");
    cfg.verify_peer(false);
    cfg.set_application_protos(&[b"h3"]).expect("alpn");
    cfg.set_max_idle_timeout(30_000);
    let scid: Vec<u8> = (0..16).map(|i| (i * 37 + 11) as u8).collect();
    quiche::connect(
        Some("localhost"),
        &quiche::ConnectionId::from_ref(&scid),
        sock.local_addr().expect("addr"),
        server,
        &mut cfg,
    )
    .expect("connect")
}

fn socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    s
}

/// The client's next flight (its Initial, or the one answering a Retry), concatenated datagram
/// by datagram: a post-quantum key share makes the ClientHello span two.
fn next_flight(q: &mut quiche::Connection) -> Vec<Vec<u8>> {
    let mut flight = Vec::new();
    let mut buf = vec![0u8; 1500];
    while let Ok((n, _)) = q.send(&mut buf) {
        flight.push(buf[..n].to_vec());
    }
    assert!(!flight.is_empty(), "the client had nothing to send");
    flight
}

/// Sends every datagram of `flight` to `to`; returns the bytes sent.
fn send(sock: &UdpSocket, flight: &[Vec<u8>], to: SocketAddr) -> usize {
    for d in flight {
        sock.send_to(d, to).expect("send");
    }
    flight.iter().map(Vec::len).sum()
}

/// Bytes received on `sock` until `until`, and the datagrams' sizes.
fn listen(sock: &UdpSocket, until: Instant) -> (usize, Vec<usize>) {
    let mut buf = vec![0u8; 65536];
    let (mut total, mut sizes) = (0, Vec::new());
    while Instant::now() < until {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            total += n;
            sizes.push(n);
        }
    }
    (total, sizes)
}

/// Waits for the Retry to `sock` and lets the client process it; returns its size.
fn take_retry(sock: &UdpSocket, q: &mut quiche::Connection, server: SocketAddr) -> usize {
    let mut buf = vec![0u8; 65536];
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let info = quiche::RecvInfo {
                from,
                to: sock.local_addr().expect("addr"),
            };
            let _ = q.recv(&mut buf[..n], info);
            assert_eq!(from, server);
            return n;
        }
    }
    panic!("no Retry within 5 s");
}

fn check(case: &str, sent: usize, received: usize, sizes: &[usize]) {
    eprintln!("{case}: sent {sent} bytes, received {received} ({sizes:?})");
    assert!(
        received <= 3 * sent,
        "{case}: h3gate sent {received} bytes to an unvalidated address that sent {sent} \
         (ratio {:.2} > 3): datagrams {sizes:?}",
        received as f64 / sent as f64
    );
}

#[test]
fn one_initial_gets_at_most_three_times_its_size() {
    let plain = Env::start("amp_plain");
    let retry = Env::start_with("amp_retry", |c| {
        c.frontend_extra.push("quic-retry always".into())
    });
    let addr = |e: &Env| -> SocketAddr { format!("127.0.0.1:{}", e.port).parse().expect("addr") };
    let (plain_addr, retry_addr) = (addr(&plain), addr(&retry));
    std::thread::scope(|s| {
        // A plain Initial, no token.
        s.spawn(move || {
            let sock = socket();
            let mut q = client(&sock, plain_addr);
            let sent = send(&sock, &next_flight(&mut q), plain_addr);
            let (got, sizes) = listen(&sock, Instant::now() + LISTEN);
            check("plain Initial", sent, got, &sizes);
        });
        // `quic-retry always`: the answer is a Retry and nothing else.
        s.spawn(move || {
            let sock = socket();
            let mut q = client(&sock, retry_addr);
            let flight = next_flight(&mut q);
            let sent = send(&sock, &flight, retry_addr);
            let (got, sizes) = listen(&sock, Instant::now() + LISTEN);
            check("quic-retry always", sent, got, &sizes);
            assert!(
                sizes.len() <= flight.len(),
                "more than a Retry each: {sizes:?}"
            );
        });
        // A Retry token of ours, sent back from the address it was issued to, then silence.
        s.spawn(move || {
            let sock = socket();
            let mut q = client(&sock, retry_addr);
            // Only the first datagram: one Retry answers it.
            let first = next_flight(&mut q).swap_remove(0);
            let mut sent = send(&sock, std::slice::from_ref(&first), retry_addr);
            let retry_len = take_retry(&sock, &mut q, retry_addr);
            sent += send(&sock, &next_flight(&mut q), retry_addr);
            let (got, sizes) = listen(&sock, Instant::now() + LISTEN);
            check(
                "Initial with our Retry token",
                sent,
                retry_len + got,
                &sizes,
            );
        });
        // A token of ours that fails here (issued to another address): at most the
        // INVALID_TOKEN close.
        s.spawn(move || {
            let owner = socket();
            let mut q = client(&owner, retry_addr);
            let first = next_flight(&mut q).swap_remove(0);
            send(&owner, std::slice::from_ref(&first), retry_addr);
            take_retry(&owner, &mut q, retry_addr);
            let other = socket();
            let sent = send(&other, &next_flight(&mut q), retry_addr);
            let (got, sizes) = listen(&other, Instant::now() + LISTEN);
            check("Initial with a bad token", sent, got, &sizes);
        });
    });
}
