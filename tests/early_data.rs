//! 0-RTT (issue 13.5): `allow-0rtt` in a frontend lets a resumed client send requests in early
//! data. Replay protection as RFC 8470 and RFC 9001 §9.2 ask: a safe method (GET, HEAD,
//! OPTIONS) is forwarded at once, before the handshake completes, with `Early-Data: 1` for the
//! origin; any other waits for the handshake and goes without the header; the origin's
//! `425 Too Early` reaches the client as it is.

mod common;

use common::*;
use std::path::Path;

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
    let out = early(
        &env,
        &session,
        &["--expect-status", "200", &env.url("/headers")],
    );
    out.assert_success();
    assert!(out.stderr.contains("session: resumed"), "{out}");
    assert_eq!(
        early_data_line(&out),
        "early data: accepted, 1 request(s) sent in it",
        "{out}"
    );
    assert!(
        out.stdout.contains("\r\nearly-data: 1\r\n"),
        "the origin did not see Early-Data: 1:\n{out}"
    );
    // Forwarded to the origin before the client's Finished arrived.
    let log = last_connection_log(&mut env);
    assert!(
        line_at(&log, "stream 0: to server") < line_at(&log, "established"),
        "the GET waited for the handshake:\n{log}"
    );
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
            &env.url("/headers"),
        ],
    );
    out.assert_success();
    assert_eq!(
        early_data_line(&out),
        "early data: accepted, 1 request(s) sent in it",
        "{out}"
    );
    assert!(out.stdout.starts_with("POST /headers "), "{out}");
    assert!(
        !out.stdout.to_ascii_lowercase().contains("early-data"),
        "a POST held for the handshake was marked as early data:\n{out}"
    );
    let log = last_connection_log(&mut env);
    let held = line_at(&log, "unsafe method in 0-RTT, waiting for the handshake");
    let established = line_at(&log, "established");
    let forwarded = line_at(&log, "stream 0: to server");
    assert!(
        held < established && established < forwarded,
        "the POST did not wait for the handshake:\n{log}"
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
    assert!(
        !out.stdout.to_ascii_lowercase().contains("early-data"),
        "{out}"
    );
    let log = last_connection_log(&mut env);
    assert!(
        line_at(&log, "established") < line_at(&log, "stream 0: to server"),
        "{log}"
    );
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
    let out = env.aioquic(&["--ticket", &t, "--early", &url]);
    out.assert_success();
    assert!(out.stdout.contains("resumed=yes"), "{out}");
    assert!(
        out.stdout.contains("early=yes"),
        "early data refused:\n{out}"
    );
    assert!(
        out.stdout.contains("\r\nearly-data: 1\r\n"),
        "the origin did not see Early-Data: 1:\n{out}"
    );
    let log = last_connection_log(&mut env);
    assert!(
        line_at(&log, "stream 0: to server") < line_at(&log, "established"),
        "the GET waited for the handshake:\n{log}"
    );
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
    assert!(
        !out.stdout.to_ascii_lowercase().contains("early-data"),
        "{out}"
    );
    let log = last_connection_log(&mut env);
    assert!(
        line_at(&log, "established") < line_at(&log, "stream 0: to server"),
        "the POST did not wait for the handshake:\n{log}"
    );
}
