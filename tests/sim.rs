//! Deterministic simulation of one worker (issue #8): the sans-IO core driven with no sockets.
//!
//! In-process quiche clients talk to `h3gate::core::Core` through an in-memory network that
//! loses, duplicates, delays, reorders and corrupts datagrams, splits GSO batches and rebinds
//! client ports (NAT); a scripted backend plays the ring and the origin servers (normal, slow,
//! reset mid-body, early close, invalid chunk, garbage head, never answering, refusing or
//! black-holing connects, closing idle keep-alive connections). After every step the core's own
//! cross-table checks run, plus the harness's: the ring contract (no action for a dead key but
//! Close, one Send and one Recv in flight per socket, no request pipelined or sent after
//! `connection: close`), requests well-formed at the origin with exactly the uploaded body, every
//! response that completes carrying exactly the origin's bytes (sha256 and length), every request
//! ending within a bound, only the answers the scenario allows (a 504 only if an origin hangs or
//! black-holes, a reset only if the origin broke the body or the run is shutting down…). At the
//! end of each run, after the clients closed and `core.shutdown()` drained, `core.live()` is
//! (0, 0, 0) and every backend socket the core opened was closed.
//!
//! Environment: `SIM_SEED=N` runs seed N alone (its trace is printed on failure, add
//! `--nocapture`); `SIM_SEEDS=N` runs N seeds (default 1000) from `SIM_FIRST` (default 0);
//! `SIM_THREADS` sets the parallelism (default: the machine's cores; runs are on virtual time,
//! see sim/world.rs, so a seed replays exactly); `SIM_LOG=debug` turns on h3gate's logger,
//! `SIM_TRACE_PACKETS=1` adds every datagram to the trace.
//!
//! Known core bugs the simulation found are listed at the end of this file; the CI run
//! (`Knobs::CI`) leaves out the scenario features that hit them, and the `#[ignore]`d tests
//! reproduce each one.

#[path = "sim/client.rs"]
mod client;
#[path = "sim/net.rs"]
mod net;
#[path = "sim/origin.rs"]
mod origin;
#[path = "common/packets.rs"]
mod packets;
#[path = "sim/rng.rs"]
mod rng;
#[path = "sim/scenario.rs"]
mod scenario;
#[path = "sim/world.rs"]
mod world;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use scenario::{Behaviour, Framing, Knobs, ReqPlan, Response, Scenario};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn init_log() {
    if let Ok(level) = std::env::var("SIM_LOG") {
        h3gate::logger::init(&level);
    }
}

#[derive(Default)]
struct Totals {
    seeds: u64,
    requests: usize,
    ok: usize,
    errors: usize,
    resets: usize,
    other: usize,
    datagrams: u64,
    lost: u64,
    backend_connects: u64,
    slowest: (Duration, u64),
    most_steps: u64,
}

/// Runs one seed; a panic in the core (a `debug_assert`, an invariant) is a failure too.
fn run_one(seed: u64, knobs: &Knobs) -> Result<world::Summary, world::Failure> {
    match std::panic::catch_unwind(|| world::run(seed, knobs)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            Err(world::Failure {
                msg: format!(
                    "seed {seed}: panic: {msg}\nscenario: {}",
                    Scenario::generate(seed, knobs).describe()
                ),
            })
        }
    }
}

/// Runs the seeds of the environment (or `default_count` from 0) with `knobs`; panics listing
/// every failing seed and the command that replays the first.
fn run_seeds(test: &str, ignored: bool, knobs: Knobs, default_count: u64) {
    init_log();
    let (first, count) = match env_u64("SIM_SEED") {
        Some(s) => (s, 1),
        None => (
            env_u64("SIM_FIRST").unwrap_or(0),
            env_u64("SIM_SEEDS").unwrap_or(default_count),
        ),
    };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u64);
    let threads = env_u64("SIM_THREADS")
        .unwrap_or(cores)
        .clamp(1, 64)
        .min(count.max(1));
    let next = AtomicU64::new(first);
    let end = first + count;
    let failures: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());
    let totals = Mutex::new(Totals::default());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    return;
                }
                let result = run_one(seed, &knobs);
                let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                t.seeds += 1;
                if t.seeds % 250 == 0 {
                    eprintln!(
                        "sim {test}: {} seeds done, {:.1?}",
                        t.seeds,
                        started.elapsed()
                    );
                }
                match result {
                    Ok(sum) => {
                        t.requests += sum.requests;
                        t.ok += sum.ok;
                        t.errors += sum.errors;
                        t.resets += sum.resets;
                        t.other += sum.other;
                        t.datagrams += sum.datagrams;
                        t.lost += sum.lost;
                        t.backend_connects += sum.backend_connects;
                        t.slowest = t.slowest.max((sum.elapsed, seed));
                        t.most_steps = t.most_steps.max(sum.steps);
                    }
                    Err(f) => {
                        drop(t);
                        failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((seed, f.msg));
                    }
                }
            });
        }
    });
    let t = totals.into_inner().unwrap_or_else(|p| p.into_inner());
    eprintln!(
        "sim {test}: {count} seeds from {first} in {:.1?} ({threads} threads): {} requests \
         ({} answered <500, {} 5xx, {} reset, {} other), {} backend connects, {} datagrams \
         ({} lost); slowest seed {} ({:.1?}), most loop steps {}",
        started.elapsed(),
        t.requests,
        t.ok,
        t.errors,
        t.resets,
        t.other,
        t.backend_connects,
        t.datagrams,
        t.lost,
        t.slowest.1,
        t.slowest.0,
        t.most_steps
    );
    let mut failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    if failures.is_empty() {
        return;
    }
    failures.sort_by_key(|(s, _)| *s);
    let flag = if ignored { "--ignored " } else { "" };
    let shown = if count == 1 { 1 } else { 3 };
    for (seed, msg) in failures.iter().take(shown) {
        eprintln!("\n==== seed {seed} failed ====\n{msg}");
    }
    eprintln!("\nfailing seeds:");
    for (_, msg) in &failures {
        eprintln!("  {}", msg.lines().next().unwrap_or(""));
    }
    let seeds: Vec<u64> = failures.iter().map(|(s, _)| *s).collect();
    let (seed, msg) = &failures[0];
    let first_line = msg.lines().next().unwrap_or("");
    panic!(
        "{} of {count} seeds failed: {seeds:?}\nfirst: {first_line}\n\
         replay: SIM_SEED={seed} cargo test --test sim {test} -- {flag}--nocapture",
        failures.len()
    );
}

/// Runs a written-out scenario.
fn run_named(scn: Scenario, runs: usize) {
    init_log();
    for _ in 0..runs {
        if let Err(f) = world::run_scenario(&scn) {
            panic!("{}", f.msg);
        }
    }
}

/// The CI run: 1 000 seeds of every feature but those that hit a known bug (see the end).
#[test]
fn simulated_seeds() {
    run_seeds("simulated_seeds", false, Knobs::CI, 1000);
}

/// FIXED by vendor/quiche-spurious-retransmit.patch, kept as a regression test (issue 13: a
/// transfer stalled under loss): one connection, ten concurrent 100 KB downloads, a link that
/// loses 5, 10 or 20 % of datagrams both ways, with and without reordering, 8 seeds each. The
/// simulated client is quiche's, which like aioquic sends no probes of its own while it has
/// nothing in flight: once the server stopped sending, nothing moved the transfer and the client
/// idled out with requests open. 19 of 32 runs failed before the patch (at every loss rate).
///
/// `timeout client` is 4 s here, not the simulation's usual 1 s: with 1 s, about 6 % of the runs
/// of the 200‰ case seed 101 (SIM_CASE=200,0,101 SIM_SEEDS=64) ended in an idle timeout that was
/// the network's doing, not a stall: the server kept sending PTO probes (8, 25, 57, 122, 252,
/// 511 ms after the last packet it received), the client answered each with an ACK, and the
/// seeded loss stream dropped all five ACKs; the idle timeout came before the next probe. A
/// stall (the server sending nothing while it has data) still ends in an idle timeout here.
#[test]
fn ten_downloads_on_a_lossy_link_never_stall() {
    init_log();
    let mut cases = Vec::new();
    for (loss_pm, jitter_ms) in [(50, 0), (100, 0), (200, 0), (100, 3)] {
        for seed in 0..8 {
            cases.push((loss_pm, jitter_ms, 100 + seed));
        }
    }
    // Replay one case: SIM_CASE=LOSS_PM,JITTER_MS,SEED (SIM_SEEDS times, default 1).
    if let Ok(c) = std::env::var("SIM_CASE") {
        let v: Vec<u64> = c.split(',').filter_map(|x| x.trim().parse().ok()).collect();
        assert_eq!(v.len(), 3, "SIM_CASE=LOSS_PM,JITTER_MS,SEED");
        let n = env_u64("SIM_SEEDS").unwrap_or(1) as usize;
        cases = vec![(v[0], v[1], v[2]); n];
    }
    let next = AtomicU64::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&(loss_pm, jitter_ms, seed)) = cases.get(i) else {
                    return;
                };
                let reqs = (0..10)
                    .map(|id| {
                        let body = Response::ok(100_000, Framing::Length, seed * 10 + id as u64);
                        ReqPlan::get(id, Behaviour::Respond(body))
                    })
                    .collect();
                let mut scn = Scenario::simple(seed, reqs);
                scn.net.loss_pm = loss_pm;
                scn.net.jitter_ms = jitter_ms;
                // Room for PTO backoff: see the doc comment.
                scn.timeout_client_ms = 4000;
                if let Err(f) = world::run_scenario(&scn) {
                    eprintln!("==== loss {loss_pm}‰ jitter {jitter_ms} ms ====\n{}", f.msg);
                    let first = f.msg.lines().next().unwrap_or("").to_string();
                    failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("loss {loss_pm}‰ jitter {jitter_ms} ms: {first}"));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    assert!(
        failures.is_empty(),
        "{} of {} runs failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The origin resets the connection in the middle of a content-length body: the client must
/// see the stream reset (or a 502), never a response that ends cleanly with a short body.
#[test]
fn origin_reset_mid_body_is_never_a_complete_response() {
    let mut reqs = Vec::new();
    for (id, (len, cut)) in [(13912, 6612), (3000, 1), (3000, 0), (70_000, 65_000)]
        .into_iter()
        .enumerate()
    {
        let mut r = ReqPlan::get(
            id,
            Behaviour::ResetMidBody(Response::ok(len, Framing::Length, id as u64), cut),
        );
        r.start_ms = 5 * id as u64;
        reqs.push(r);
    }
    let mut scn = Scenario::simple(2, reqs);
    scn.net.jitter_ms = 5;
    scn.net.loss_pm = 10;
    scn.net.dup_pm = 10;
    scn.gso_segments = 16;
    run_named(scn, 3);
}

/// NAT rebinding mid-download while the old port still delivers (a NAT that keeps both
/// mappings for a while): the download completes.
#[test]
fn nat_rebinding_mid_download_old_port_lingers() {
    let mut scn = Scenario::simple(
        3,
        vec![ReqPlan::get(
            0,
            Behaviour::Respond(Response::ok(200_000, Framing::Length, 1)),
        )],
    );
    scn.clients[0].rebind_after = Some(12);
    scn.clients[0].rebind_drops_old = false;
    run_named(scn, 3);
}

/// `timeout server` must not fire once the origin's response is complete, nor while the core
/// has stopped reading the origin because the client is slow: a client downloading slowly
/// through a small window keeps its response (fixed in c2f9c96).
#[test]
fn server_timeout_does_not_cut_a_slow_download() {
    let mut scn = Scenario::simple(
        4,
        vec![ReqPlan::get(
            0,
            Behaviour::Respond(Response::ok(120_000, Framing::Length, 4)),
        )],
    );
    // 16 KiB window read at 100 bytes/ms: about 1.2 s for the body, timeout server 250 ms.
    scn.clients[0].slow_reader = Some(100);
    scn.timeout_server_ms = 250;
    run_named(scn, 1);
}

/// A client resets its request stream in the middle of an upload with a content-length: the
/// origin must never get it as a complete request. (Unpatched quiche 0.30 sent a FIN at the
/// reset offset that could reach the core first, and reported a reset that followed the FIN as
/// a clean end: vendor/README.md.)
#[test]
fn client_reset_upload_never_reaches_origin_complete() {
    let mut reqs = Vec::new();
    for id in 0..6 {
        let mut r = ReqPlan::get(
            id,
            Behaviour::Respond(Response::ok(100, Framing::Length, 7)),
        );
        r.method = "POST";
        r.upload = Some(scenario::Upload {
            data: rng::Rng::new(id as u64).bytes(1000 + 20_000 * id),
            content_length: true,
        });
        r.cancel_ms = Some(id as u64 % 3);
        r.start_ms = 2 * id as u64;
        reqs.push(r);
    }
    let mut scn = Scenario::simple(7, reqs);
    scn.net.jitter_ms = 3;
    scn.net.loss_pm = 30;
    run_named(scn, 6);
}

/// Uploads with a content-length over a network that duplicates and reorders datagrams: the
/// core must count every body byte once (a miscount is answered with H3_MESSAGE_ERROR).
#[test]
fn uploads_with_content_length_on_a_duplicating_network() {
    let mut reqs = Vec::new();
    for id in 0..5 {
        let mut r = ReqPlan::get(
            id,
            Behaviour::Respond(Response::ok(300, Framing::Length, 10)),
        );
        r.method = "POST";
        r.upload = Some(scenario::Upload {
            data: rng::Rng::new(10 + id as u64).bytes(1348 + 7000 * id),
            content_length: true,
        });
        r.start_ms = 3 * id as u64;
        reqs.push(r);
    }
    let mut scn = Scenario::simple(10, reqs);
    scn.net.latency_ms = 2;
    scn.net.jitter_ms = 2;
    scn.net.dup_pm = 100;
    scn.gso_segments = 16;
    run_named(scn, 10);
}

// ---------------------------------------------------------------------------------------------
// Bugs the simulation found: the fixed ones keep their test as a regression test; the
// `#[ignore]`d ones fail today. Run those with
//   cargo test --test sim -- --ignored --nocapture
// and remove the `#[ignore]` (and the matching `Knobs::CI` exclusion) once fixed.
// ---------------------------------------------------------------------------------------------

/// Every feature, including the ones `Knobs::CI` leaves out: NAT rebinding where the old port dies
/// and rebinding on lossy links. With vendor/quiche-rebinding.patch 0 or 1 of 300 seeds fail (1 of
/// 900 in three runs; 14 or 15 of 300 before; 3 of 900 in one run on 89408cf: seeds 150, 674,
/// 785, each a client whose old port died on a 6 % loss link and that then idled out with a
/// request open; seed 150 fails 2 runs in 3 and passes with SIM_TRACE_PACKETS=1, so timing
/// matters), still too many for CI's 1 000 seeds; the two rebinding tests below run in CI
/// instead. After vendor/quiche-spurious-retransmit.patch (issue 13): 0 of 300, then 3 of 900
/// (244, 397, 586; 244 again a client whose old port died on a 6 % loss link, failing about 1
/// run in 6 and never with SIM_LOG=trace; 397 and 586 passed alone), so not the same bug.
/// Then 5 of 1 800 (586, 674, 726, 859, 1582), none failing alone. 674 could not be won (a
/// quiet client whose NAT moved with the old port dead and whose one datagram from the new port
/// was lost: the judge now accepts that idle timeout), others looked like connections the network
/// killed inside the 1 s idle timeout (lossy generated scenarios now get 4 s). After both: 3 of
/// 1 800 (150, 785, 1582). On virtual time (vendor/quiche-thread-clock.patch), where a seed
/// replays exactly: 9 of 3 000 (96, 518, 666, 830, 1518, 1557, 1742, 2052, 2689); 518 was a
/// client's busy loop in quiche (vendor/quiche-close-in-handshake.patch), the others end with a
/// request open in the client's idle timeout. Then vendor/quiche-challenge-credit.patch (96,
/// 2689), vendor/quiche-challenge-lost-by-ack.patch (1518) and a judge that counts a client as
/// unreachable when no 1-RTT packet from its new port reached the server (666, 830: a client
/// whose handshake is not confirmed sends only Handshake probes, which the server cannot
/// authenticate once it discarded those keys): 3 of 3 000. Left: 1557 (one ACK from the new
/// port, so credit for two challenges, both lost: no server can do better), 1742 (a client that
/// rebinds during its handshake: its 1-RTT packets from the new port arrive before the server
/// has 1-RTT keys and are dropped, quiche buffers only 0-RTT, and after that it sends only
/// Handshake probes) and 2052 (not analysed).
#[test]
#[ignore = "3 seeds in 3 000 still fail (NAT rebinding on lossy links)"]
fn simulated_seeds_all_features() {
    run_seeds("simulated_seeds_all_features", true, Knobs::ALL, 300);
}

/// Seeds of the all-features run that found quiche bugs, kept as regression tests (the runs
/// are deterministic, see sim/world.rs): 96 and 2689 (vendor/quiche-challenge-credit.patch:
/// one lost packet used up the new path's credit) and 1518
/// (vendor/quiche-challenge-lost-by-ack.patch: a challenge lost by acknowledgement was never
/// sent again). A change to the core or quiche changes what a seed does; if one of them then
/// fails, read its trace before anything else.
#[test]
fn rebinding_seeds_that_found_quiche_bugs() {
    init_log();
    for seed in [96, 1518, 2689] {
        if let Err(f) = run_one(seed, &Knobs::ALL) {
            panic!(
                "{}
replay: SIM_SEED={seed} cargo test --test sim simulated_seeds_all_features -- --ignored --nocapture",
                f.msg
            );
        }
    }
}

/// FIXED in ff7aa1e, kept as a regression test (timeout server during a slow upload): the deadline
/// was not refreshed when request body bytes reach the origin (`Sent` completions), so an upload
/// that takes longer than `timeout server` is answered 504 while it is still flowing, the origin
/// healthy.
#[test]
fn server_timeout_does_not_cut_a_slow_upload() {
    let mut r = ReqPlan::get(0, Behaviour::Respond(Response::ok(100, Framing::Length, 5)));
    r.method = "POST";
    r.upload = Some(scenario::Upload {
        data: rng::Rng::new(5).bytes(400_000),
        content_length: true,
    });
    let mut scn = Scenario::simple(5, vec![r]);
    // A lossy path: 400 KB take well over 250 ms to upload.
    scn.net.latency_ms = 3;
    scn.net.loss_pm = 60;
    scn.timeout_server_ms = 250;
    run_named(scn, 1);
}

/// FIXED by vendor/quiche-rebinding.patch, kept as a regression test (NAT rebinding dropped
/// data in flight): the client's NAT mapping changes mid-download and the datagrams already on
/// their way to the old port are lost (the usual NAT rebinding: the old mapping expired). quiche
/// 0.30 kept those packets in the old path's recovery: ACKs on the new path never declared them
/// lost, the old path's PTO fired but sent nothing, so the stream data was never retransmitted
/// and the download stalled until the idle timeout. On a lossy link a lost PATH_RESPONSE also
/// failed the new path at once (its anti-amplification credit spent by data) and quiche reverted
/// to the old, dead address. Failed 6 runs of 6 before the patch, passes 10 of 10.
#[test]
fn nat_rebinding_mid_download() {
    let mut scn = Scenario::simple(
        1,
        vec![ReqPlan::get(
            0,
            Behaviour::Respond(Response::ok(200_000, Framing::Length, 1)),
        )],
    );
    scn.clients[0].rebind_after = Some(12);
    scn.clients[0].rebind_drops_old = true;
    run_named(scn, 3);
}

/// FIXED by vendor/quiche-rebinding.patch, kept as a regression test (NAT rebinding on a lossy,
/// reordering link): the old port keeps delivering, the network reorders (5 ms jitter) and loses
/// 6 %. quiche 0.30 on the server failed the new path's validation (a lost PATH_RESPONSE, or a
/// late one for a challenge already declared lost), reverted to the old address, then made the
/// failed path active again when the client's next packet came from it; a failed path is never
/// `active()`, so the next packet found no active path and quiche closed the connection with
/// PROTOCOL_VIOLATION (0xa). Failed 10 runs of 10 before the patch, passes 10 of 10.
#[test]
fn nat_rebinding_with_reordering() {
    let mut scn = Scenario::simple(
        6,
        vec![ReqPlan::get(
            0,
            Behaviour::Respond(Response::ok(200_000, Framing::Length, 6)),
        )],
    );
    scn.net.jitter_ms = 5;
    scn.net.loss_pm = 60;
    scn.clients[0].rebind_after = Some(12);
    scn.clients[0].rebind_drops_old = false;
    run_named(scn, 3);
}

/// FIXED by vendor/quiche-reset-no-fin.patch, kept as a regression test (a reset response
/// could reach the client as complete): the origin closes a chunked response early, the core
/// resets the stream with `stream_shutdown(Write)`. Unpatched quiche 0.30 then still sent an
/// empty STREAM frame with FIN at the reset offset (the stream stayed in its flushable queue
/// and `SendBuf::reset` had set `fin_off`) next to the RESET_STREAM; on a reordering network
/// the client could see the FIN first and take the truncated body, which has no content-length
/// to check it against, for the whole response. Failed 3 runs out of 3 before the patch.
#[test]
fn reset_chunked_response_never_looks_complete() {
    let mut reqs = Vec::new();
    for id in 0..6 {
        let resp = Response::ok(20_000 + 10_000 * id, Framing::Chunked, id as u64);
        let mut r = ReqPlan::get(id, Behaviour::CloseEarly(resp, 5_000 + 3_000 * id));
        r.start_ms = 2 * id as u64;
        reqs.push(r);
    }
    let mut scn = Scenario::simple(8, reqs);
    scn.net.jitter_ms = 4;
    scn.net.loss_pm = 30;
    run_named(scn, 12);
}

/// FIXED (src/initial.rs), kept as a regression test: NAT rebinding between the server's Retry
/// and the client's next Initial. The Retry token is bound to the old address, and the client
/// will not take a second Retry. The core used to drop every Initial from the new port as
/// "invalid retry token", so the client hung until its own idle timeout; now it answers with a
/// stateless CONNECTION_CLOSE(INVALID_TOKEN) (RFC 9000 §8.1.3) and the client fails at once (the
/// judge accepts exactly that close, not a timeout). Without Retry the same rebinding is
/// harmless, which this test also checks.
#[test]
fn nat_rebinding_during_handshake() {
    for retry in ["off", "always"] {
        let mut scn = Scenario::simple(
            9,
            vec![ReqPlan::get(
                0,
                Behaviour::Respond(Response::ok(1000, Framing::Length, 9)),
            )],
        );
        scn.retry = retry;
        scn.clients[0].rebind_after = Some(3);
        scn.clients[0].rebind_during_handshake = true;
        run_named(scn, 1);
    }
}

/// FIXED in ff7aa1e, kept as a regression test (early error answer turned into H3_MESSAGE_ERROR): a
/// POST with a content-length gets an early error answer (here 503, every server at `maxconn`)
/// while the connection is busy with a large download, so the answer is still queued in the core.
/// `respond_error` makes `pump_request` discard the rest of the body without counting it in
/// `req_body_bytes`; when the client's FIN arrives, `on_request_finished` compares content-length
/// with the bytes counted, finds a mismatch and resets the stream with H3_MESSAGE_ERROR: the client
/// never sees its 503 (seed 2865 of `simulated_seeds` hit this on a lossy network).
#[test]
fn early_error_answer_to_an_upload_is_not_reset() {
    let mut reqs = vec![ReqPlan::get(
        0,
        Behaviour::Respond(Response::ok(400_000, Framing::Length, 11)),
    )];
    for id in 1..4 {
        let mut r = ReqPlan::get(
            id,
            Behaviour::Respond(Response::ok(500, Framing::Length, 12)),
        );
        r.method = "POST";
        r.upload = Some(scenario::Upload {
            data: rng::Rng::new(id as u64).bytes(3000 * id),
            content_length: true,
        });
        r.start_ms = 4 + 2 * id as u64;
        reqs.push(r);
    }
    let mut scn = Scenario::simple(11, reqs);
    scn.maxconn = Some(1);
    scn.net.latency_ms = 5;
    run_named(scn, 5);
}
