//! TLS session resumption (issue 13.4): one set of ticket keys per process, so a ticket issued
//! by one worker resumes on any other; `tls-ticket-keys FILE` (HAProxy's format) so that a
//! restarted process (or another node) resumes the same sessions, and a ticket whose key left
//! the file gets a full handshake, not an error.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// One GET with `h3get --session FILE`: whether the session was resumed.
fn resumed(env: &Env, session: &Path) -> bool {
    let s = session.to_string_lossy();
    let out = env.h3get(&["--session", &s, "--sha256", &env.url("/bytes/1000")]);
    out.assert_success();
    assert_eq!(out.sha_lines(), [pattern_line(1000).as_str()], "{out}");
    if out.stderr.contains("session: resumed") {
        true
    } else {
        assert!(out.stderr.contains("session: new"), "{out}");
        false
    }
}

/// A key file line: 48 bytes (name, AES-128, HMAC) of `fill`, base64.
fn key_line(fill: u8) -> String {
    let key: Vec<u8> = (0..48u8).map(|i| fill ^ i).collect();
    boring::base64::encode_block(&key)
}

fn write_keys(path: &Path, fills: &[u8]) {
    let lines: Vec<String> = fills.iter().map(|&f| key_line(f)).collect();
    std::fs::write(path, lines.join("\n") + "\n").expect("write key file");
}

#[test]
fn twenty_reconnections_to_four_workers_all_resume() {
    let mut env = Env::start_with("resume-workers", |c| c.workers = 4);
    let session = env.dir.join("session");
    assert!(!resumed(&env, &session), "first visit resumed a session");
    // Each run is a new UDP socket, so the kernel spreads the connections over the four
    // workers: with a ticket key per worker about three in four would not resume.
    let again: Vec<bool> = (0..20).map(|_| resumed(&env, &session)).collect();
    let n = again.iter().filter(|&&r| r).count();
    assert_eq!(n, 20, "only {n} of 20 reconnections resumed: {again:?}");
    assert!(env.proxy_alive(), "h3gate died:\n{}", env.proxy_log());
}

#[test]
fn a_key_file_resumes_across_restarts_and_a_dropped_key_is_refused() {
    let mut env = Env::new("resume-keyfile");
    let origin = env.start_origin();
    let keys = env.dir.join("tickets.keys");
    let mut conf = ProxyConf::new(vec![origin.to_string()]);
    conf.workers = 2;
    conf.global_extra
        .push(format!("tls-ticket-keys {}", keys.display()));
    let session = env.dir.join("session");

    // Keys 1 2 3: 2 encrypts.
    write_keys(&keys, &[1, 2, 3]);
    env.start_proxy(&conf);
    assert!(!resumed(&env, &session), "first visit resumed a session");
    assert!(resumed(&env, &session), "same process did not resume");

    // A restart with the same file resumes the ticket the old process issued.
    env.stop_proxy();
    env.start_proxy(&conf);
    assert!(
        resumed(&env, &session),
        "no resumption after a restart with the same keys"
    );

    // Rotated once (4 appended: 3 encrypts, 2 and 4 still decrypt): the saved ticket (from
    // the previous run, made with 2 or renewed) still resumes.
    env.stop_proxy();
    write_keys(&keys, &[1, 2, 3, 4]);
    let saved = std::fs::read(&session).expect("session file");
    env.start_proxy(&conf);
    assert!(
        resumed(&env, &session),
        "a still-listed key did not decrypt"
    );

    // Every key the ticket could have used is gone: a full handshake, and the request works.
    env.stop_proxy();
    write_keys(&keys, &[7, 8, 9]);
    env.start_proxy(&conf);
    std::fs::write(&session, &saved).expect("restore session");
    assert!(
        !resumed(&env, &session),
        "a ticket from a key no longer listed resumed"
    );
    // The new ticket works.
    assert!(resumed(&env, &session), "no resumption with the new keys");
    assert!(env.proxy_alive(), "h3gate died:\n{}", env.proxy_log());
}

#[test]
fn check_reports_a_bad_ticket_key_file_with_its_line() {
    let env = Env::new("resume-check");
    let keys = env.dir.join("tickets.keys");
    let conf_path = env.dir.join("h3gate.conf");
    let mut conf = ProxyConf::new(vec!["127.0.0.1:9".to_string()]);
    conf.global_extra
        .push(format!("tls-ticket-keys {}", keys.display()));
    std::fs::write(&conf_path, conf.render(free_udp_port(), &env.dir)).expect("write conf");
    // The tls-ticket-keys line of the rendered file.
    let text = std::fs::read_to_string(&conf_path).expect("read conf");
    let line = 1 + text
        .lines()
        .position(|l| l.contains("tls-ticket-keys"))
        .expect("keyword line");
    let check = || {
        let out = Command::new(H3GATE)
            .args(["check", "-c"])
            .arg(&conf_path)
            .output()
            .expect("run h3gate check");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let at = format!(
        "{}:{line}: cannot read tls-ticket-keys {}",
        conf_path.display(),
        keys.display()
    );
    let (ok, err) = check();
    assert!(!ok && err.contains(&at), "missing file: {err}");
    std::fs::write(
        &keys,
        format!("{}\nnot base64!\n{}\n", key_line(1), key_line(2)),
    )
    .expect("w");
    let (ok, err) = check();
    assert!(
        !ok && err.contains(&format!("{at}: line 2: not a base64 key")),
        "{err}"
    );
    write_keys(&keys, &[1, 2]);
    let (ok, err) = check();
    assert!(!ok && err.contains("needs at least 3 keys"), "{err}");
    write_keys(&keys, &[1, 2, 3]);
    let (ok, err) = check();
    assert!(ok, "a valid key file was refused: {err}");
}
