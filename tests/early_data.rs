//! 0-RTT (issue 13.5): `allow-0rtt` in a frontend lets a resumed client send requests in early
//! data. Replay protection as RFC 8470 and RFC 9001 §9.2 ask: a safe method (GET, HEAD,
//! OPTIONS) is forwarded at once, before the handshake completes, with `Early-Data: 1` for the
//! origin; any other waits for the handshake and goes without the header; the origin's
//! `425 Too Early` reaches the client as it is.

mod common;

use common::*;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A UDP relay in front of h3gate that passes the client's Initial and 0-RTT packets at once
/// and delays by `HOLD` every datagram carrying anything else (Handshake packets, so the
/// client's Finished, and 1-RTT), so the Finished reaches h3gate `HOLD` after the 0-RTT
/// request whatever the machine's load: the window in which a request is in early data is
/// then certain, not a race of threads.
struct HoldFinished {
    port: u16,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

const HOLD: Duration = Duration::from_millis(300);

impl HoldFinished {
    fn start(upstream: u16) -> HoldFinished {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("relay bind"));
        let up = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("relay bind"));
        up.connect(("127.0.0.1", upstream)).expect("relay connect");
        for s in [&front, &up] {
            s.set_read_timeout(Some(Duration::from_millis(20)))
                .expect("timeout");
        }
        let port = front.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let mut threads = Vec::new();
        {
            let (front, up, stop, client) =
                (front.clone(), up.clone(), stop.clone(), client.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    *client.lock().unwrap_or_else(|p| p.into_inner()) = Some(from);
                    if !only_initial_or_0rtt(&buf[..n]) {
                        let (up, data) = (up.clone(), buf[..n].to_vec());
                        std::thread::spawn(move || {
                            std::thread::sleep(HOLD);
                            let _ = up.send(&data);
                        });
                    } else {
                        let _ = up.send(&buf[..n]);
                    }
                }
            }));
        }
        {
            let (front, stop) = (front.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = up.recv(&mut buf) else { continue };
                    let to = *client.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(to) = to {
                        let _ = front.send_to(&buf[..n], to);
                    }
                }
            }));
        }
        HoldFinished {
            port,
            stop,
            threads,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }
}

/// Whether every packet coalesced in a datagram is an Initial or a 0-RTT packet; anything
/// unparsable counts as "something else".
fn only_initial_or_0rtt(datagram: &[u8]) -> bool {
    use common::packets::{packet_types, PacketType};
    packet_types(datagram).is_some_and(|types| {
        types
            .iter()
            .all(|t| matches!(t, PacketType::Initial | PacketType::ZeroRtt))
    })
}

impl Drop for HoldFinished {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs h3get with `--session FILE --early-data` and the extra arguments.
fn early(env: &Env, session: &Path, args: &[&str]) -> Out {
    let s = session.to_string_lossy();
    let mut all = vec!["--session", &s, "--early-data", "-i"];
    all.extend_from_slice(args);
    env.h3get(&all)
}

/// A first visit: a full handshake that saves a ticket.
fn first_visit(env: &Env, session: &Path) {
    let out = early(env, session, &["--expect-status", "200", &env.url("/")]);
    out.assert_success();
    assert!(out.stderr.contains("session: new"), "{out}");
    assert!(out.stderr.contains("early data: not accepted"), "{out}");
}

fn early_data_line(out: &Out) -> &str {
    out.stderr
        .lines()
        .find(|l| l.starts_with("early data: "))
        .unwrap_or_else(|| panic!("no early data line:\n{out}"))
}

/// The proxy log of the last connection: from its "new connection" line on.
fn last_connection_log(env: &mut Env) -> String {
    let log = env.proxy_log();
    let at = log
        .rfind("new connection")
        .expect("no connection in the log");
    log[at..].to_string()
}

/// Whether the first line containing `what` comes before the connection's "established" line
/// (or there is none yet: the client's Finished is still held by the relay).
fn before_handshake(log: &str, what: &str) -> bool {
    let at = line_at(log, what);
    log.find("established").is_none_or(|e| at < e)
}

/// The request of `out` (a `/headers` echo) reached the origin with `Early-Data: 1`, before
/// h3gate completed the handshake of the last connection.
fn assert_forwarded_in_early_data(env: &mut Env, out: &Out) {
    assert!(
        out.stdout.contains("\r\nearly-data: 1\r\n"),
        "the origin did not see Early-Data: 1:\n{out}"
    );
    let log = last_connection_log(env);
    assert!(
        before_handshake(&log, "stream 0: to server"),
        "the request waited for the handshake:\n{log}"
    );
}

/// The request of `out` (a `/headers` echo) reached the origin without `Early-Data`, only after
/// h3gate completed the handshake of the last connection; returns that connection's log.
fn assert_held_for_the_handshake(env: &mut Env, out: &Out) -> String {
    assert!(
        !out.stdout.to_ascii_lowercase().contains("early-data"),
        "a request held for the handshake was marked as early data:\n{out}"
    );
    let log = last_connection_log(env);
    assert!(
        line_at(&log, "established") < line_at(&log, "stream 0: to server"),
        "the request did not wait for the handshake:\n{log}"
    );
    log
}

/// Position of the first line containing `what`.
fn line_at(log: &str, what: &str) -> usize {
    log.find(what)
        .unwrap_or_else(|| panic!("no '{what}' line in:\n{log}"))
}

fn zero_rtt_env(name: &str) -> Env {
    Env::start_with(name, |c| c.frontend_extra.push("allow-0rtt on".into()))
}

#[test]
fn a_get_in_0rtt_is_forwarded_before_the_handshake_with_early_data_1() {
    let mut env = zero_rtt_env("0rtt-get");
    let session = env.dir.join("session");
    first_visit(&env, &session);
    let relay = HoldFinished::start(env.port);
    let out = early(
        &env,
        &session,
        &["--expect-status", "200", &relay.url("/headers")],
    );
    out.assert_success();
    assert!(out.stderr.contains("session: resumed"), "{out}");
    assert_eq!(
        early_data_line(&out),
        "early data: accepted, 1 request(s) sent in it",
        "{out}"
    );
    // Forwarded to the origin before the client's Finished arrived.
    assert_forwarded_in_early_data(&mut env, &out);
    // An origin's 425 Too Early reaches the client as it is.
    let out = early(&env, &session, &[&env.url("/status/425")]);
    assert!(out.stderr.contains("HTTP/3 425"), "{out}");
    assert!(
        early_data_line(&out).starts_with("early data: accepted"),
        "{out}"
    );
    assert!(env.proxy_alive(), "h3gate died:\n{}", env.proxy_log());
}

#[test]
fn a_post_in_0rtt_waits_for_the_handshake_and_goes_without_the_header() {
    let mut env = zero_rtt_env("0rtt-post");
    let session = env.dir.join("session");
    first_visit(&env, &session);
    let relay = HoldFinished::start(env.port);
    let out = early(
        &env,
        &session,
        &[
            "-X",
            "POST",
            "--data-size",
            "300",
            "--expect-status",
            "200",
            &relay.url("/headers"),
        ],
    );
    out.assert_success();
    assert_eq!(
        early_data_line(&out),
        "early data: accepted, 1 request(s) sent in it",
        "{out}"
    );
    assert!(out.stdout.starts_with("POST /headers "), "{out}");
    let log = assert_held_for_the_handshake(&mut env, &out);
    assert!(
        line_at(&log, "unsafe method in 0-RTT, waiting for the handshake")
            < line_at(&log, "established"),
        "the POST was not held while in early data:\n{log}"
    );
    // Its body, sent in 0-RTT too, arrives whole.
    let out = early(
        &env,
        &session,
        &["--sha256", "--data-size", "200000", &env.url("/echo")],
    );
    out.assert_success();
    assert!(
        early_data_line(&out).starts_with("early data: accepted"),
        "{out}"
    );
    assert_eq!(out.sha_lines(), [pattern_line(200_000).as_str()], "{out}");
    assert!(env.proxy_alive(), "h3gate died:\n{}", env.proxy_log());
}

#[test]
fn without_allow_0rtt_no_ticket_offers_early_data() {
    let mut env = Env::start("0rtt-off");
    let session = env.dir.join("session");
    first_visit(&env, &session);
    let out = early(
        &env,
        &session,
        &["--expect-status", "200", &env.url("/headers")],
    );
    out.assert_success();
    assert!(out.stderr.contains("session: resumed"), "{out}");
    assert!(
        early_data_line(&out).starts_with("early data: not accepted"),
        "{out}"
    );
    assert_held_for_the_handshake(&mut env, &out);
    assert!(env.proxy_alive(), "h3gate died:\n{}", env.proxy_log());
}

/// aioquic, an independent client, in 0-RTT: its GET is accepted as early data and reaches the
/// origin with `Early-Data: 1`; its POST in early data goes without it, after the handshake.
#[test]
fn aioquic_in_0rtt() {
    if !have_aioquic("aioquic_in_0rtt") {
        return;
    }
    let mut env = zero_rtt_env("0rtt-aioquic");
    let ticket = env.dir.join("ticket");
    let t = ticket.to_string_lossy();
    let url = env.url("/headers");
    let out = env.aioquic(&["--ticket", &t, &url]);
    out.assert_success();
    assert!(out.stdout.contains("early=no"), "{out}");
    let relay = HoldFinished::start(env.port);
    let url = relay.url("/headers");
    let out = env.aioquic(&["--ticket", &t, "--early", &url]);
    out.assert_success();
    assert!(out.stdout.contains("resumed=yes"), "{out}");
    assert!(
        out.stdout.contains("early=yes"),
        "early data refused:\n{out}"
    );
    assert_forwarded_in_early_data(&mut env, &out);
    let out = env.aioquic(&[
        "--ticket",
        &t,
        "--early",
        "--method",
        "POST",
        "--data-size",
        "1000",
        &url,
    ]);
    out.assert_success();
    assert!(out.stdout.contains("early=yes"), "{out}");
    assert!(out.stdout.contains("POST /headers "), "{out}");
    assert_held_for_the_handshake(&mut env, &out);
}
