//! Memory budget end-to-end tests (issue #5): real h3gate, real origin, real
//! clients. The proxy's resident memory (VmRSS of its process, all workers
//! are threads of it) is sampled from /proc while the load runs; the
//! budget's own accounting is read from the per-worker stats h3gate logs
//! when it stops.
//!
//! The RSS bounds assume nothing else in this binary loads the machine at the
//! same time, so the tests run one at a time (`one_at_a_time`).

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
const KIB: u64 = 1024;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// VmRSS of `pid` in bytes (None once the process is gone).
fn rss(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * KIB)
}

#[track_caller]
fn rss_now(pid: i32) -> u64 {
    rss(pid).unwrap_or_else(|| panic!("cannot read VmRSS of pid {pid}"))
}

/// Idle RSS: the largest of a few samples 50 ms apart (the workers may still
/// be settling after the warm-up request).
fn idle_rss(pid: i32) -> u64 {
    (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            rss_now(pid)
        })
        .max()
        .unwrap_or(0)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

/// Samples a process's RSS every `every` on its own thread until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<u64>>>,
}

impl Sampler {
    fn start(pid: i32, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut v = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Some(r) = rss(pid) {
                    v.push(r);
                }
                std::thread::sleep(every);
            }
            if let Some(r) = rss(pid) {
                v.push(r);
            }
            v
        });
        Sampler {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops sampling; returns every sample.
    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One worker's `budget: PoolStats { ... }` from its shutdown stats line.
#[derive(Debug)]
struct Budget {
    worker: u32,
    capacity: u64,
    in_use: u64,
    peak: u64,
    /// Pool checkouts refused (backpressure), `PoolStats::refusals`.
    refusals: u64,
    /// Requests that waited for budget / were answered 503 for it (`Stats`).
    queued: u64,
    answered_503: u64,
}

/// Value of `name: N` inside `s` (the Debug output of a struct).
fn field(s: &str, name: &str) -> Option<u64> {
    let key = format!("{name}: ");
    let i = s.find(&key)? + key.len();
    let digits: String = s[i..].chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Parses every `worker N stats: Stats { ... budget: PoolStats { ... } ... }`
/// line of h3gate's log.
fn shutdown_budgets(log: &str) -> Vec<Budget> {
    let mut out = Vec::new();
    for line in log.lines() {
        let Some(i) = line.find("worker ") else {
            continue;
        };
        let rest = &line[i + "worker ".len()..];
        let Some((num, stats)) = rest.split_once(" stats: Stats {") else {
            continue;
        };
        let Ok(worker) = num.trim().parse::<u32>() else {
            continue;
        };
        let Some(b) = stats.split_once("budget: PoolStats {").map(|(_, b)| b) else {
            continue;
        };
        let b = b.split('}').next().unwrap_or("");
        let queued = field(stats, "budget_queued").unwrap_or(0);
        let answered_503 = field(stats, "budget_refusals").unwrap_or(0);
        if let (Some(capacity), Some(in_use), Some(peak), Some(refusals)) = (
            field(b, "capacity"),
            field(b, "in_use"),
            field(b, "peak"),
            field(b, "refusals"),
        ) {
            out.push(Budget {
                worker,
                capacity,
                in_use,
                peak,
                refusals,
                queued,
                answered_503,
            });
        }
    }
    out
}

/// SIGTERM, exit 0 within `within`, then the per-worker budgets it logged.
#[track_caller]
fn stop_and_read_budgets(env: &mut Env, workers: usize, within: Duration) -> Vec<Budget> {
    // Under tests/sanitize the exit also runs LeakSanitizer over a heap ASan keeps large.
    let within = if sanitize() { within * 3 } else { within };
    let t0 = Instant::now();
    env.signal_proxy(Signal::SIGTERM);
    let st = env
        .wait_proxy_exit(within)
        .unwrap_or_else(|| panic!("h3gate still running {within:?} after SIGTERM"));
    eprintln!(
        "h3gate exited {} ms after SIGTERM",
        t0.elapsed().as_millis()
    );
    assert!(st.success(), "h3gate exited with {st}");
    let log = env.proxy_log();
    let budgets = shutdown_budgets(&log);
    let stats_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" stats: Stats {"))
        .collect();
    assert_eq!(
        budgets.len(),
        workers,
        "expected one 'worker N stats: Stats {{ .. budget: PoolStats {{ .. }} }}' line per \
         worker; got:\n{}",
        stats_lines.join("\n")
    );
    budgets
}

/// Fails clearly when the h3get binary is not this checkout's (the target
/// directory is shared: another checkout may have built into it).
#[track_caller]
fn require_h3get_rate() {
    let out = std::process::Command::new(H3GET)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {H3GET}: {e}"));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--rate"),
        "{H3GET} has no --rate option: not this checkout's build (shared target \
         directory?); rebuild it or use a private CARGO_TARGET_DIR"
    );
}

#[track_caller]
fn warm_up(env: &Env) {
    let out = env.h3get_t(15, &["--sha256", &env.url("/")]);
    out.assert_success();
    assert_eq!(
        out.sha_lines(),
        vec![sha_line(200, b"hello from origin\n")],
        "{out}"
    );
}

// ---------------------------------------------------------------------------
// a. Concurrent uploads under a 64 MiB budget
// ---------------------------------------------------------------------------

#[test]
fn uploads_under_budget_complete_or_503() {
    let _serial = one_at_a_time();
    const WORKERS: usize = 2;
    const BUDGET: u64 = 64 * MIB;
    let mut env = Env::start_with("mem-uploads", |c| {
        c.workers = WORKERS as u32;
        c.global_extra.push("max-memory 64m".into());
        c.frontend_extra
            .push("http-request wait-for-body time 5s at-least 1m".into());
    });
    let pid = env.proxy_pid();
    warm_up(&env);
    let baseline = idle_rss(pid);

    let t0 = Instant::now();
    let sampler = Sampler::start(pid, Duration::from_millis(100));
    let load = env.spawn_h3get(
        28,
        &[
            "--connections",
            "40",
            "-n",
            "5",
            "--data-size",
            "4194304",
            "--sha256",
            &env.url("/slow/2000"),
        ],
    );
    let out = load.wait(Duration::from_secs(34));
    let load_time = t0.elapsed();
    let samples = sampler.finish();
    let peak = samples.iter().copied().max().unwrap_or(0);

    let lines = out.sha_lines();
    let ok_line = sha_line(200, b"slow\n");
    let ok = lines.iter().filter(|l| **l == ok_line).count();
    let busy = lines
        .iter()
        .filter(|l| l.starts_with("status=503 "))
        .count();
    eprintln!(
        "uploads: {} responses ({ok} x 200, {busy} x 503) in {} ms; RSS baseline {}, peak {} \
         ({} samples)",
        lines.len(),
        load_time.as_millis(),
        mib(baseline),
        mib(peak),
        samples.len()
    );
    assert!(
        out.success(),
        "h3get reported failures (every request must end in 200 or 503):\n{out}"
    );
    assert_eq!(lines.len(), 200, "expected 200 responses:\n{out}");
    for l in &lines {
        assert!(
            *l == ok_line || l.starts_with("status=503 "),
            "unexpected response {l:?} (want {ok_line:?} or a 503):\n{out}"
        );
    }
    assert!(ok > 0, "no upload got through at all:\n{out}");
    let bound = BUDGET + baseline + 32 * MIB;
    assert_rss(
        peak < bound,
        format!(
            "peak RSS {} over the bound {} (budget 64 MiB + baseline {} + 32 MiB)",
            mib(peak),
            mib(bound),
            mib(baseline)
        ),
    );

    // After the peak the workers hand freed memory back (malloc_trim).
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_now(pid);
    eprintln!("uploads: RSS 2 s after the load {}", mib(after));
    assert_rss(
        after < baseline + 24 * MIB,
        format!(
            "RSS {} two seconds after the load, baseline {}: memory not given back",
            mib(after),
            mib(baseline)
        ),
    );

    let budgets = stop_and_read_budgets(&mut env, WORKERS, Duration::from_secs(10));
    for b in &budgets {
        eprintln!(
            "uploads: worker {} budget: capacity {}, peak {}, in use {}, pool refusals {}, \
             requests queued {}, answered 503 {}",
            b.worker,
            mib(b.capacity),
            mib(b.peak),
            b.in_use,
            b.refusals,
            b.queued,
            b.answered_503
        );
        assert_eq!(
            b.in_use, 0,
            "worker {} still has budget in use: {b:?}",
            b.worker
        );
    }
}

// ---------------------------------------------------------------------------
// b. A slow reader cannot make h3gate buffer the download
// ---------------------------------------------------------------------------

#[test]
fn slow_reader_download_is_bounded() {
    let _serial = one_at_a_time();
    const STREAM_BUFFER: u64 = 256 * KIB; // max-stream-buffer default
    const CHUNK: u64 = 16 * KIB; // bufsize default
    const RATE: u64 = 1_000_000;
    require_h3get_rate();
    let mut env = Env::start("mem-slow-reader");
    let pid = env.proxy_pid();
    warm_up(&env);
    let baseline = idle_rss(pid);

    let t0 = Instant::now();
    let sampler = Sampler::start(pid, Duration::from_millis(100));
    let dl = env.spawn_h3get(
        4,
        &[
            "--rate",
            &RATE.to_string(),
            "--sha256",
            &env.url("/bytes/104857600"),
        ],
    );
    let out = dl.wait(Duration::from_secs(12));
    let ran = t0.elapsed();
    let samples = sampler.finish();
    let peak = samples.iter().copied().max().unwrap_or(0);

    // h3get times out (it cannot read 100 MiB at 1 MB/s in 4 s) and says how
    // much body it read: no more than the rate allows.
    assert!(
        !out.success() && out.stderr.contains("timeout"),
        "the slow download was expected to time out:\n{out}"
    );
    let read: u64 = out
        .stderr
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("done: ")?;
            let i = rest.find(" failed, ")? + " failed, ".len();
            rest[i..].split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no 'done:' summary from h3get:\n{out}"));
    let secs = ran.as_secs_f64();
    eprintln!(
        "slow reader: read {read} bytes in {:.1} s at --rate {RATE}; RSS baseline {}, peak {} \
         (+{}, {} samples)",
        secs,
        mib(baseline),
        mib(peak),
        mib(peak.saturating_sub(baseline)),
        samples.len()
    );
    assert!(read > 0, "the slow reader read nothing:\n{out}");
    let allowed = (RATE as f64 * (secs + 0.2)) as u64;
    assert!(
        read <= allowed,
        "--rate {RATE}: read {read} bytes in {secs:.1} s (more than {allowed})"
    );
    assert_rss(
        peak.saturating_sub(baseline) < 16 * MIB,
        format!(
            "RSS grew by {} during the slow download (baseline {}, peak {})",
            mib(peak.saturating_sub(baseline)),
            mib(baseline),
            mib(peak)
        ),
    );

    // Still serving.
    warm_up(&env);

    // No budget gauge on /metrics (src/metrics.rs has none): the stats logged
    // at shutdown give the peak, which bounds what the download held.
    let budgets = stop_and_read_budgets(&mut env, 1, Duration::from_secs(10));
    let limit = STREAM_BUFFER + 6 * CHUNK;
    for b in &budgets {
        eprintln!(
            "slow reader: worker {} budget peak {} KiB, in use {}",
            b.worker,
            b.peak / KIB,
            b.in_use
        );
        assert_eq!(b.in_use, 0, "budget still in use: {b:?}");
        assert!(
            b.peak <= limit,
            "budget peak {} KiB over max-stream-buffer + 6 chunks ({} KiB)",
            b.peak / KIB,
            limit / KIB
        );
    }
}

// ---------------------------------------------------------------------------
// c. wait-for-body: a client that stops sending gets 408
// ---------------------------------------------------------------------------

/// A client that sends a request head announcing `content_length` bytes and
/// then only `sent` of them, no FIN, and waits for the answer: with a zero
/// `delay` the body bytes share the head's datagram, otherwise they follow
/// `delay` later. Returns the status and how long after the head it came.
fn stalled_upload(
    port: u16,
    path: &str,
    content_length: u64,
    sent: usize,
    delay: Duration,
    timeout: Duration,
) -> Result<(u16, Duration), String> {
    let mut cfg =
        quiche::Config::new(quiche::PROTOCOL_VERSION).map_err(|e| format!("config: {e:?}"))?;
    cfg.verify_peer(false);
    cfg.set_application_protos(quiche::h3::APPLICATION_PROTOCOL)
        .map_err(|e| format!("alpn: {e:?}"))?;
    cfg.set_max_idle_timeout(30_000);
    cfg.set_max_recv_udp_payload_size(65527);
    cfg.set_max_send_udp_payload_size(1350);
    cfg.set_initial_max_data(10_000_000);
    cfg.set_initial_max_stream_data_bidi_local(1_000_000);
    cfg.set_initial_max_stream_data_bidi_remote(1_000_000);
    cfg.set_initial_max_stream_data_uni(1_000_000);
    cfg.set_initial_max_streams_bidi(100);
    cfg.set_initial_max_streams_uni(100);
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    let peer: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut scid = [0u8; 16];
    boring::rand::rand_bytes(&mut scid).map_err(|e| e.to_string())?;
    let scid = quiche::ConnectionId::from_ref(&scid);
    let mut conn = quiche::connect(Some("localhost"), &scid, local, peer, &mut cfg)
        .map_err(|e| format!("connect: {e:?}"))?;

    let flush = |conn: &mut quiche::Connection| -> Result<(), String> {
        let mut out = [0u8; 1500];
        loop {
            match conn.send(&mut out) {
                Ok((n, info)) => {
                    sock.send_to(&out[..n], info.to)
                        .map_err(|e| format!("send: {e}"))?;
                }
                Err(quiche::Error::Done) => return Ok(()),
                Err(e) => return Err(format!("quiche send: {e:?}")),
            }
        }
    };
    let step = |conn: &mut quiche::Connection, deadline: Instant| -> Result<(), String> {
        flush(conn)?;
        let mut wait = deadline.saturating_duration_since(Instant::now());
        if let Some(t) = conn.timeout() {
            wait = wait.min(t);
        }
        let wait = wait.clamp(Duration::from_millis(1), Duration::from_millis(50));
        sock.set_read_timeout(Some(wait))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 65536];
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let _ = conn.recv(&mut buf[..n], quiche::RecvInfo { from, to: local });
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("recv: {e}")),
        }
        if conn.timeout_instant().is_some_and(|t| t <= Instant::now()) {
            conn.on_timeout();
        }
        flush(conn)
    };

    let deadline = Instant::now() + timeout;
    while !conn.is_established() {
        if conn.is_closed() || Instant::now() >= deadline {
            return Err(format!(
                "handshake failed: {:?}",
                conn.peer_error().or(conn.local_error())
            ));
        }
        step(&mut conn, deadline)?;
    }
    let h3cfg = quiche::h3::Config::new().map_err(|e| format!("h3 config: {e:?}"))?;
    let mut h3 = quiche::h3::Connection::with_transport(&mut conn, &h3cfg)
        .map_err(|e| format!("h3: {e:?}"))?;
    // Let the control and QPACK streams go out first, so that the request
    // head and its first body bytes share one datagram.
    flush(&mut conn)?;
    let authority = format!("localhost:{port}");
    let cl = content_length.to_string();
    let headers = [
        quiche::h3::Header::new(b":method", b"POST"),
        quiche::h3::Header::new(b":scheme", b"https"),
        quiche::h3::Header::new(b":authority", authority.as_bytes()),
        quiche::h3::Header::new(b":path", path.as_bytes()),
        quiche::h3::Header::new(b"content-length", cl.as_bytes()),
    ];
    let sid = h3
        .send_request(&mut conn, &headers, false)
        .map_err(|e| format!("send_request: {e:?}"))?;
    let sent_at = Instant::now();
    if !delay.is_zero() {
        flush(&mut conn)?;
        while sent_at.elapsed() < delay {
            step(&mut conn, sent_at + delay)?;
        }
    }
    let body = pattern(sent as u64);
    let n = h3
        .send_body(&mut conn, sid, &body, false)
        .map_err(|e| format!("send_body: {e:?}"))?;
    if n != body.len() {
        return Err(format!("send_body took {n} of {} bytes", body.len()));
    }
    flush(&mut conn)?;

    let mut status = None;
    loop {
        loop {
            match h3.poll(&mut conn) {
                Ok((s, quiche::h3::Event::Headers { list, .. })) if s == sid => {
                    use quiche::h3::NameValue;
                    let st = list
                        .iter()
                        .find(|h| h.name() == b":status")
                        .and_then(|h| std::str::from_utf8(h.value()).ok()?.parse::<u16>().ok());
                    if let Some(st) = st.filter(|s| *s >= 200) {
                        status.get_or_insert((st, sent_at.elapsed()));
                    }
                }
                Ok((s, quiche::h3::Event::Data)) if s == sid => {
                    let mut b = [0u8; 4096];
                    while h3.recv_body(&mut conn, sid, &mut b).is_ok() {}
                }
                Ok((s, quiche::h3::Event::Finished)) if s == sid => {
                    return status.ok_or_else(|| "stream ended without a status".to_string());
                }
                Ok((s, quiche::h3::Event::Reset(code))) if s == sid => {
                    return match status {
                        Some(v) => Ok(v),
                        None => Err(format!("stream reset by the proxy: 0x{code:x}")),
                    };
                }
                Ok(_) => {}
                Err(quiche::h3::Error::Done) => break,
                Err(e) => return Err(format!("h3 poll: {e:?}")),
            }
        }
        if let Some(v) = status {
            // The head is what matters; do not wait for the end of the body.
            if sent_at.elapsed() > v.1 + Duration::from_millis(500) {
                return Ok(v);
            }
        }
        if conn.is_closed() {
            return status.ok_or_else(|| {
                format!(
                    "connection closed: peer {:?}, local {:?}",
                    conn.peer_error(),
                    conn.local_error()
                )
            });
        }
        if Instant::now() >= deadline {
            return status.ok_or_else(|| format!("no answer within {timeout:?}"));
        }
        step(&mut conn, deadline)?;
    }
}

#[test]
fn wait_for_body_stalled_client_gets_408() {
    let _serial = one_at_a_time();
    let mut env = Env::start_with("mem-wfb-408", |c| {
        c.frontend_extra
            .push("http-request wait-for-body time 1s at-least 1m".into());
    });
    warm_up(&env);
    let (status, after) = stalled_upload(
        env.port,
        "/sink",
        2_000_000,
        1000,
        Duration::ZERO,
        Duration::from_secs(8),
    )
    .unwrap_or_else(|e| panic!("stalled upload: {e}\nlog:\n{}", env.proxy_log()));
    eprintln!(
        "stalled upload: status {status} after {} ms",
        after.as_millis()
    );
    assert_eq!(status, 408, "a stalled upload must get 408");
    assert!(
        after >= Duration::from_millis(900),
        "408 after {after:?}, before wait-for-body's 1 s"
    );
    assert!(
        after < Duration::from_secs(3),
        "408 only after {after:?} (wait-for-body time 1s)"
    );
    // The proxy is fine afterwards.
    warm_up(&env);
    assert!(env.proxy_alive());
}

/// The same stalled client, except that its 1000 body bytes arrive 300 ms
/// after the head. A client counts as still sending only if body arrived in
/// the last quarter of `time` (at most 1 s); this one stopped 700 ms before
/// the deadline, so it gets 408 (it once was forwarded, found by this test).
#[test]
fn wait_for_body_stall_after_late_first_bytes() {
    let _serial = one_at_a_time();
    let mut env = Env::start_with("mem-wfb-late", |c| {
        c.frontend_extra
            .push("http-request wait-for-body time 1s at-least 1m".into());
    });
    warm_up(&env);
    let r = stalled_upload(
        env.port,
        "/sink",
        2_000_000,
        1000,
        Duration::from_millis(300),
        Duration::from_secs(8),
    );
    eprintln!("late first bytes: {r:?}");
    let log = env.proxy_log();
    for l in log
        .lines()
        .filter(|l| l.contains("stream ") || l.contains("/sink"))
    {
        eprintln!("  {l}");
    }
    assert!(matches!(r, Ok((408, _))), "{r:?}");
}

/// The RSS bounds assume nothing else in this binary loads the machine at the same time: every
/// test holds this, so `cargo test` runs them one at a time whatever `--test-threads` says.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}
