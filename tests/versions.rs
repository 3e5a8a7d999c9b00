//! QUIC versions (issue 13.3): a client that starts in QUIC version 2 (RFC 9369) is served in
//! v2, through Retry and across workers (the kernel steering reads the DCID, which v2 does not
//! move). (An unknown version's Version Negotiation, listing v1 and v2, is in `e2e.rs`.)

mod common;

use common::*;
use std::time::Duration;

const V2: &str = "0x6b3343cf";

/// h3get in QUIC v2: GET `path` with sha256, verbose (it prints the version).
fn v2_get(env: &Env, args: &[&str]) -> Out {
    let mut all = vec![
        "-v",
        "--quic-version",
        "2",
        "--sha256",
        "--expect-status",
        "200",
    ];
    all.extend_from_slice(args);
    env.h3get_t(30, &all)
}

#[test]
fn a_v2_client_downloads_intact() {
    let mut env = Env::start("v2-get");
    let n: u64 = 3 * 1024 * 1024;
    let out = v2_get(&env, &["-n", "3", &env.url(&format!("/bytes/{n}"))]);
    out.assert_success();
    assert!(
        out.stderr.contains(&format!("QUIC version {V2}")),
        "not in v2:\n{out}"
    );
    let lines = out.sha_lines();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines.iter().all(|l| *l == pattern_line(n)), "{out}");
    let log = env.proxy_log();
    assert!(
        log.contains(&format!("established, alpn h3, QUIC version {V2}")),
        "{log}"
    );
    // An upload too, and a v1 client on the same listener still in v1.
    let out = v2_get(&env, &["--data-size", "500000", &env.url("/echo")]);
    out.assert_success();
    assert_eq!(out.sha_lines(), [pattern_line(500_000).as_str()], "{out}");
    let out = env.h3get(&["-v", "--sha256", &env.url("/bytes/1000")]);
    out.assert_success();
    assert!(out.stderr.contains("QUIC version 0x1"), "{out}");
    assert!(env.proxy_alive(), "h3gate died:\n{}", env.proxy_log());
}

#[test]
fn v2_through_retry_and_on_four_workers() {
    let mut env = Env::start_with("v2-retry", |c| {
        c.workers = 4;
        c.frontend_extra.push("quic-retry always".into());
    });
    let out = v2_get(
        &env,
        &["--connections", "20", "--quiet", &env.url("/bytes/20000")],
    );
    out.assert_success();
    assert_eq!(out.sha_lines().len(), 20, "{out}");
    env.signal_proxy(nix::sys::signal::Signal::SIGTERM);
    assert!(
        env.wait_proxy_exit(Duration::from_secs(15))
            .is_some_and(|s| s.success()),
        "h3gate did not stop cleanly:\n{}",
        env.proxy_log()
    );
    let log = env.proxy_log();
    let sum = |field: &str| -> u64 { worker_stat_from_log(&log, field).iter().sum() };
    // Every connection took a Retry (one per Initial datagram: a first flight can be two).
    let retries = sum("retries_sent");
    assert!((20..=40).contains(&retries), "{retries} Retry packets");
    assert_eq!(sum("handshakes"), 20);
    // The steering sent every v2 packet to the worker that owns its CID: none was handed on.
    assert_eq!(
        sum("handoffs_out"),
        0,
        "v2 packets reached the wrong worker"
    );
}

/// aioquic, an independent implementation, starting in QUIC v2: served in v2, body intact; and
/// its session resumes in v2.
#[test]
fn aioquic_in_quic_v2() {
    if !have_aioquic("aioquic_in_quic_v2") {
        return;
    }
    let env = Env::start("v2-aioquic");
    let ticket = env.dir.join("ticket");
    let t = ticket.to_string_lossy();
    let n: u64 = 1024 * 1024;
    let url = env.url(&format!("/bytes/{n}"));
    let args = ["--quic-version", "2", "--ticket", &t, url.as_str()];
    let out = env.aioquic(&args);
    out.assert_success();
    assert!(out.stdout.contains(&pattern_line(n)), "{out}");
    assert!(out.stdout.contains(&format!("version={V2}")), "{out}");
    assert!(out.stdout.contains("resumed=no"), "{out}");
    let out = env.aioquic(&args);
    out.assert_success();
    assert!(out.stdout.contains(&pattern_line(n)), "{out}");
    assert!(out.stdout.contains("resumed=yes"), "{out}");
}
