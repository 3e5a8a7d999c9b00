//! One seed's run: the core, its clients, the network and the scripted origin, stepped like the
//! worker loop (deliver datagrams and backend completions, fire timers, flush, carry out the
//! outputs), with the invariants checked after every step.
//!
//! Time is virtual and the simulation's own. The core takes `now` everywhere, and quiche reads
//! its time through `quiche::clock` (vendor/quiche-thread-clock.patch), which a thread may set:
//! each seed's thread sets it to the simulation's `now`, for the server connections inside the
//! core and for the clients alike. After a step the clock jumps to the earliest next event (a
//! core deadline, a client timer or scripted action, a datagram arrival, a backend completion);
//! nobody sleeps. quiche's random numbers are seeded too. So a run is a function of its seed:
//! the requests, the origin's behaviour, the read splits, the fate of every datagram and the
//! order of every event, whatever the machine's load, and a failing seed fails again when
//! replayed (only the values of h3gate's connection IDs differ, from BoringSSL's generator). A
//! deadline that nobody reports is never reached: the loop only wakes for what the core, the
//! clients, the network and the origin said they wait for, so a forgotten timer shows as a
//! stall, as it would in the worker. The certificate is RSA: an ECDSA signature's length varies
//! by a byte or two from one handshake to the next, which would change packet sizes and so every
//! later event. `timeout server` is 250 ms and the like, and quiche's initial RTT is 20 ms on
//! both sides.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use h3gate::cid::Secret;
use h3gate::core::{Core, Listener};

use crate::client::{Client, Outcome};
use crate::net::{Dst, Net, Packet};
use crate::origin::{hex, Ledger, Origin};
use crate::packets::{packet_types, PacketType};
use crate::rng::Rng;
use crate::scenario::{Behaviour, Knobs, ReqPlan, Scenario, ServerKind};

/// No request may stay open longer than this (the longest core timeout is 1 s).
const REQUEST_BOUND: Duration = Duration::from_secs(6);
/// A whole seed must finish within this much simulated time…
const RUN_BOUND: Duration = Duration::from_secs(25);
/// …and this much of the machine's (a livelock that keeps time from moving).
const WALL_BOUND: Duration = Duration::from_secs(120);
const MAX_STEPS: u64 = 300_000;
const DRAIN: Duration = Duration::from_millis(800);
/// Outputs one step may produce before the harness calls it a livelock (the core or quiche
/// producing without end would otherwise eat the machine's memory).
const MAX_OUTPUTS_PER_STEP: usize = 20_000;
/// Datagrams in flight on the simulated network, at most.
const MAX_IN_FLIGHT: usize = 100_000;

pub struct Summary {
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    pub resets: usize,
    pub other: usize,
    pub datagrams: u64,
    pub lost: u64,
    pub backend_connects: u64,
    pub steps: u64,
    pub elapsed: Duration,
}

fn config_text(scn: &Scenario, listen: SocketAddr, servers: &[SocketAddr]) -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let mut s = format!(
        "global\n    workers 1\ndefaults\n    timeout connect 250ms\n    timeout server {}ms\n    \
         timeout client {}ms\n    timeout drain 1s\n    timeout handshake 1s\n\
         frontend web\n    bind {listen}\n    cert {dir}/tests/data/sim-cert.pem\n    key {dir}/tests/data/sim-key.pem\n    \
         default_backend app\n    max-connections 16\n    max-concurrent-streams 8\n    \
         quic-retry {}\n    retry-threshold 1\n\
         backend app\n    balance {}\n",
        scn.timeout_server_ms,
        scn.timeout_client_ms,
        scn.retry,
        if scn.leastconn { "leastconn" } else { "roundrobin" }
    );
    for (i, a) in servers.iter().enumerate() {
        s.push_str(&format!("    server s{i} {a}"));
        if let Some(m) = scn.maxconn {
            s.push_str(&format!(" maxconn {m}"));
        }
        s.push('\n');
    }
    s
}

enum Phase {
    Run,
    Closing,
    Draining,
}

/// A failed run: the report (the error, the scenario and the trace).
pub struct Failure {
    pub msg: String,
}

/// The thread's quiche clock and random numbers for one run: `start` sets both, dropping gives
/// both back, however the run ends (the next seed on this thread starts at the machine's time
/// again).
struct ThreadClock;

impl ThreadClock {
    /// Starts the virtual clock at the machine's time and seeds quiche with `seed`.
    fn start(seed: u64) -> (ThreadClock, Instant) {
        quiche::clock::set_thread_clock(None);
        let t0 = Instant::now();
        quiche::clock::set_thread_clock(Some(t0));
        quiche::set_thread_seed(Some(seed));
        (ThreadClock, t0)
    }

    fn set(now: Instant) {
        quiche::clock::set_thread_clock(Some(now));
    }
}

impl Drop for ThreadClock {
    fn drop(&mut self) {
        quiche::clock::set_thread_clock(None);
        quiche::set_thread_seed(None);
    }
}

/// Runs one seed. `Err` carries the failure and the run's trace.
pub fn run(seed: u64, knobs: &Knobs) -> Result<Summary, Failure> {
    run_scenario(&Scenario::generate(seed, knobs))
}

/// Runs a scenario (generated from a seed, or written out by a named test).
pub fn run_scenario(scn: &Scenario) -> Result<Summary, Failure> {
    let scn = scn.clone();
    let (_clock, t0) = ThreadClock::start(scn.seed);
    let mut led = Ledger::new(t0);
    match run_inner(&scn, &mut led) {
        Ok(s) => Ok(s),
        Err(e) => {
            let keep = 400;
            let skip = led.trace.len().saturating_sub(keep);
            let mut msg = format!("{e}\nscenario: {}", scn.describe());
            if !led.violations.is_empty() {
                msg.push_str(&format!("violations: {:#?}\n", led.violations));
            }
            msg.push_str(&format!(
                "trace (last {} of {} lines):\n",
                led.trace.len() - skip,
                led.trace.len()
            ));
            for l in &led.trace[skip..] {
                msg.push_str("  ");
                msg.push_str(l);
                msg.push('\n');
            }
            Err(Failure { msg })
        }
    }
}

fn run_inner(scn: &Scenario, led: &mut Ledger) -> Result<Summary, String> {
    let t0 = led.t0;
    let listen: SocketAddr = "127.0.0.1:4433".parse().expect("addr");
    let server_addrs: Vec<SocketAddr> = (0..scn.servers.len())
        .map(|i| format!("10.1.0.{}:80", i + 1).parse().expect("addr"))
        .collect();
    let text = config_text(scn, listen, &server_addrs);
    let config =
        h3gate::config::parse("sim.conf", &text).map_err(|e| format!("config: {e:?}\n{text}"))?;
    let fe = config.frontends.first().ok_or("no frontend")?;
    let tickets = std::sync::Arc::new(h3gate::tickets::TicketKeys::rotating([0; 32]));
    let mut qc = h3gate::frontend::quic_config(fe, &tickets)?;
    // Short quiche timers: see the module comment.
    qc.set_initial_rtt(Duration::from_millis(20));
    let mut core = Core::new(
        0,
        &config,
        vec![Listener {
            frontend: 0,
            local: listen,
        }],
        vec![qc],
        Secret::from_bytes(
            Rng::new(scn.seed)
                .fork(9)
                .bytes(32)
                .try_into()
                .expect("32 bytes"),
        ),
        t0,
    )?;
    core.set_gso_segments(scn.gso_segments);
    let mut origin = Origin::new(
        scn,
        server_addrs
            .iter()
            .copied()
            .zip(scn.servers.iter().copied())
            .collect(),
    );
    let mut net = Net::new(scn.seed, scn.net.clone(), scn.clients.len());
    // Source addresses the core received a 1-RTT packet from (a client's NAT addresses).
    let mut heard_from: HashSet<SocketAddr> = HashSet::new();
    let mut clients: Vec<Option<Client>> = scn.clients.iter().map(|_| None).collect();
    let mut crng = Rng::new(scn.seed).fork(5);
    let mut buf = vec![0u8; 65536];
    let mut steps = 0u64;
    let mut phase = Phase::Run;
    let mut shutdown_at: Option<Instant> = None;
    let trace_packets = std::env::var_os("SIM_TRACE_PACKETS").is_some();

    let wall = Instant::now();
    let mut now = t0;
    let mut busy = 0u32;
    loop {
        ThreadClock::set(now);
        steps += 1;
        if now > t0 + RUN_BOUND || steps > MAX_STEPS || wall.elapsed() > WALL_BOUND {
            return Err(format!(
                "seed {}: run did not finish: {steps} steps, {:?} simulated, {:?} real; core live (conns, streams, backend conns) = {:?}, draining {}",
                scn.seed,
                now - t0,
                wall.elapsed(),
                core.live(),
                core.is_draining()
            ));
        }

        // Clients whose start time came.
        for (i, slot) in clients.iter_mut().enumerate() {
            if slot.is_none() && now >= t0 + Duration::from_millis(scn.clients[i].start_ms) {
                *slot = Some(Client::new(
                    i,
                    scn.clients[i].clone(),
                    listen,
                    now,
                    &mut crng,
                    2 * scn.timeout_client_ms,
                )?);
                led.log(now, format!("client {i}: starts"));
            }
        }

        // 1. Datagrams that arrived.
        while let Some(p) = net.pop_due(now) {
            match p.dst {
                Dst::Server => {
                    if trace_packets {
                        led.log(
                            now,
                            format!("net: {} → core, {} bytes", p.from, p.data.len()),
                        );
                    }
                    if packet_types(&p.data).is_some_and(|t| t.contains(&PacketType::Short)) {
                        heard_from.insert(p.from);
                    }
                    let mut data = p.data;
                    core.on_datagram(now, 0, p.from, p.to, &mut data);
                }
                Dst::Client(i) => {
                    if trace_packets {
                        led.log(
                            now,
                            format!("net: core → {} (client {i}), {} bytes", p.to, p.data.len()),
                        );
                    }
                    if let Some(c) = clients.get_mut(i).and_then(|c| c.as_mut()) {
                        c.recv(now, p, led);
                    }
                }
            }
        }
        // 2. Backend completions.
        origin.deliver(now, &mut core, scn, led);
        // 3. Timers.
        core.on_timer(now);
        if let (Some(ms), None) = (scn.shutdown_ms, shutdown_at) {
            if now >= t0 + Duration::from_millis(ms) {
                led.log(now, "core.shutdown() with requests in flight".into());
                core.shutdown(now, DRAIN);
                shutdown_at = Some(now);
            }
        }
        // 4. Flush and carry out the outputs, in the worker's order.
        core.flush(now);
        for n in 0.. {
            let Some(a) = core.poll_backend_action() else {
                break;
            };
            if n > MAX_OUTPUTS_PER_STEP {
                return Err(format!(
                    "seed {}: livelock: endless poll_backend_action in one step",
                    scn.seed
                ));
            }
            origin.action(now, a, scn, led);
        }
        let mut transmits = 0;
        while let Some(t) = core.poll_transmit(now, &mut buf) {
            transmits += 1;
            if transmits > MAX_OUTPUTS_PER_STEP {
                return Err(format!(
                    "seed {}: livelock: poll_transmit returned {MAX_OUTPUTS_PER_STEP} datagrams in one step without None",
                    scn.seed
                ));
            }
            // A GSO batch: equal segments, only the last may be shorter (the kernel's rule).
            let seg = t.segment_size.unwrap_or(t.len);
            let nseg = t.len.div_ceil(seg.max(1));
            if t.listener != 0
                || t.from != listen
                || t.len == 0
                || seg == 0
                || seg > 1350
                || (t.segment_size.is_some() && (nseg < 2 || nseg > scn.gso_segments))
            {
                led.violation(now, format!("bad transmit {t:?}"));
                continue;
            }
            let dst = clients
                .iter()
                .flatten()
                .find(|c| c.nat_history.contains(&t.to))
                .map(|c| c.idx);
            let Some(ci) = dst else {
                led.violation(
                    now,
                    format!("core sends to {}, which no client ever used", t.to),
                );
                continue;
            };
            for d in buf[..t.len].chunks(seg) {
                net.send(
                    now,
                    ci,
                    false,
                    Packet {
                        dst: Dst::Client(ci),
                        from: t.from,
                        to: t.to,
                        data: d.to_vec(),
                    },
                );
            }
        }
        for n in 0.. {
            let Some(a) = core.poll_backend_action() else {
                break;
            };
            if n > MAX_OUTPUTS_PER_STEP {
                return Err(format!(
                    "seed {}: livelock: endless poll_backend_action in one step",
                    scn.seed
                ));
            }
            origin.action(now, a, scn, led);
        }
        core.check_invariants();

        if net.in_flight() > MAX_IN_FLIGHT {
            return Err(format!(
                "seed {}: livelock: {} datagrams in flight",
                scn.seed,
                net.in_flight()
            ));
        }
        // 5. Clients.
        for c in clients.iter_mut().flatten() {
            c.step(now, &mut net, led);
        }

        // 6. Judge every request that ended; bound the ones still open.
        for c in clients.iter_mut().flatten() {
            for (i, r) in c.reqs.iter_mut().enumerate() {
                let plan = &scn.clients[c.idx].requests[i];
                if let Some((at, o)) = &r.outcome {
                    if !r.judged {
                        r.judged = true;
                        let shutdown = shutdown_at.is_some_and(|s| s <= *at);
                        // Its NAT moved, the old port died and not one 1-RTT packet from the
                        // new port reached the server: nothing can tell the server where it
                        // went. (A client whose handshake is not confirmed sends only Handshake
                        // probes, RFC 9002 §6.2.1, which the server, its Handshake keys
                        // discarded, cannot authenticate, so cannot follow: RFC 9000 §9.)
                        let unreachable = c.plan.rebind_drops_old
                            && c.nat_history.len() > 1
                            && !heard_from.contains(&c.nat);
                        let end = End {
                            shutdown,
                            aborted: c.aborted,
                            unreachable,
                            closed_why: c.closed_why.as_deref(),
                        };
                        if let Err(e) = judge(scn, plan, o, &end, led) {
                            let why = match (o, &c.closed_why) {
                                (Outcome::ConnClosed, Some(w)) => format!(" ({w})"),
                                _ => String::new(),
                            };
                            led.violation(
                                now,
                                format!("{} ({}): {e}{why}", plan.path(), plan.behaviour.name()),
                            );
                        }
                    }
                } else if let Some(sent) = r.sent_at {
                    if now - sent > REQUEST_BOUND {
                        led.violation(
                            now,
                            format!("{} still open after {REQUEST_BOUND:?}", plan.path()),
                        );
                    }
                }
            }
        }
        if !led.violations.is_empty() {
            return Err(format!(
                "seed {}: invariant violated: {}",
                scn.seed, led.violations[0]
            ));
        }

        // 7. Phases: all requests ended → clients close → core shutdown → done.
        match phase {
            Phase::Run => {
                let all_started = clients.iter().all(|c| c.is_some());
                if all_started && clients.iter().flatten().all(|c| c.all_done()) {
                    for c in clients.iter_mut().flatten() {
                        c.close(now, led);
                    }
                    phase = Phase::Closing;
                }
            }
            Phase::Closing => {
                if clients.iter().flatten().all(|c| c.is_closed()) {
                    led.log(now, "clients closed: core.shutdown()".into());
                    core.shutdown(now, DRAIN);
                    shutdown_at.get_or_insert(now);
                    phase = Phase::Draining;
                }
            }
            Phase::Draining => {
                if core.is_done() {
                    break;
                }
            }
        }

        // 8. Sleep until the next event.
        let mut next = core.next_deadline();
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        consider(net.next_arrival());
        consider(origin.next_event());
        for (i, c) in clients.iter().enumerate() {
            match c {
                Some(c) => consider(c.next_event()),
                None => consider(Some(t0 + Duration::from_millis(scn.clients[i].start_ms))),
            }
        }
        if shutdown_at.is_none() {
            consider(scn.shutdown_ms.map(|ms| t0 + Duration::from_millis(ms)));
        }
        // Everything due at `now` was handled above; a deadline still at or before `now` is
        // one nobody consumes. A few in a row happen (a timer rescheduled for the same
        // instant), a long run of them is a busy loop: the worker would spin at 100 % CPU.
        if next.is_some_and(|n| n <= now) {
            busy += 1;
            if busy > 2_000 {
                let stuck = |t: Option<Instant>| t.is_some_and(|d| d <= now);
                let clients_stuck: Vec<String> = clients
                    .iter()
                    .flatten()
                    .filter(|c| stuck(c.next_event()))
                    .map(|c| c.describe())
                    .collect();
                return Err(format!(
                    "seed {}: busy loop: a deadline at or before now for {busy} steps in a row \
                     (stuck: core.next_deadline() {}, network {}, origin {}, clients {clients_stuck:?}; \
                     core live {:?}, draining {})",
                    scn.seed,
                    stuck(core.next_deadline()),
                    stuck(net.next_arrival()),
                    stuck(origin.next_event()),
                    core.live(),
                    core.is_draining()
                ));
            }
        } else {
            busy = 0;
        }
        // Jump to the next event; with none at all, nothing can happen any more, and the run
        // bound ends the run.
        now = match next {
            Some(n) => n.max(now),
            None => now + Duration::from_millis(20),
        };
    }

    // End of run: every table empty, every backend socket closed.
    while let Some(a) = core.poll_backend_action() {
        origin.action(now, a, scn, led);
    }
    core.check_invariants();
    let live = core.live();
    if live != (0, 0, 0) {
        return Err(format!(
            "seed {}: core.live() = {live:?} after is_done(), want (0, 0, 0)",
            scn.seed
        ));
    }
    if origin.connects != origin.closes || origin.open_sockets() != 0 {
        return Err(format!(
            "seed {}: {} backend connects but {} closes ({} sockets left open)",
            scn.seed,
            origin.connects,
            origin.closes,
            origin.open_sockets()
        ));
    }
    if !led.violations.is_empty() {
        return Err(format!(
            "seed {}: invariant violated: {}",
            scn.seed, led.violations[0]
        ));
    }
    let mut s = Summary {
        requests: 0,
        ok: 0,
        errors: 0,
        resets: 0,
        other: 0,
        datagrams: net.stats.sent,
        lost: net.stats.lost,
        backend_connects: origin.connects,
        steps,
        elapsed: now - t0,
    };
    for c in clients.iter().flatten() {
        for (i, r) in c.reqs.iter().enumerate() {
            s.requests += 1;
            match &r.outcome {
                Some((_, Outcome::Response { status, .. })) if *status < 500 => s.ok += 1,
                Some((_, Outcome::Response { .. })) => s.errors += 1,
                Some((_, Outcome::Reset(_))) => s.resets += 1,
                Some(_) => s.other += 1,
                None => {
                    return Err(format!(
                        "seed {}: client {} request {i} never ended",
                        scn.seed, c.idx
                    ))
                }
            }
        }
    }
    Ok(s)
}

/// What the world knows about how a request ended, beyond its outcome.
struct End<'a> {
    /// The core was shut down before it ended.
    shutdown: bool,
    /// Its client aborted.
    aborted: bool,
    /// Its client's NAT moved with the old port dead and the server never heard the new one.
    unreachable: bool,
    /// Why its client's connection closed, if it did.
    closed_why: Option<&'a str>,
}

/// Is `o` an acceptable end for the request `plan`?
fn judge(
    scn: &Scenario,
    plan: &ReqPlan,
    o: &Outcome,
    end: &End,
    led: &Ledger,
) -> Result<(), String> {
    let End {
        shutdown,
        aborted,
        unreachable,
        closed_why,
    } = *end;
    let id = (plan.client, plan.id);
    let servers = &scn.servers;
    // Statuses the core may answer with instead of the origin's response.
    let mut errors: Vec<u16> = Vec::new();
    if servers.iter().all(|k| *k == ServerKind::Refuse) {
        errors.push(502);
    }
    if servers.contains(&ServerKind::Blackhole) {
        errors.push(504); // timeout connect
    }
    if scn.maxconn.is_some() {
        errors.push(503);
        if servers.contains(&ServerKind::Refuse) {
            errors.push(502); // the only server with room refused
        }
    }
    if led.stale.contains(&id) {
        errors.push(502); // stale pooled connection, and the request could not be retried
    }
    let mut may_reset = shutdown || aborted;
    let expected = match &plan.behaviour {
        Behaviour::Respond(r) => Some((r.status, &r.body)),
        Behaviour::ResetMidBody(..) | Behaviour::CloseEarly(..) | Behaviour::BadChunk(_) => {
            errors.push(502);
            may_reset = true;
            None
        }
        Behaviour::Garbage(_) => {
            errors.push(502);
            None
        }
        Behaviour::Hang => {
            errors.push(504);
            None
        }
    };
    match o {
        Outcome::Response { status, body } => {
            if let Some((want_status, want_body)) = expected {
                if *status == want_status {
                    if body != want_body {
                        return Err(format!(
                            "{status} response body differs from the origin's: got {} bytes sha256 {}…, want {} bytes sha256 {}…",
                            body.len(),
                            hex(&boring::sha::sha256(body)[..8]),
                            want_body.len(),
                            hex(&boring::sha::sha256(want_body)[..8]),
                        ));
                    }
                    if !led.seen.contains_key(&id) {
                        return Err("a response the origin never gave".into());
                    }
                    return Ok(());
                }
            }
            if errors.contains(status) {
                return Ok(());
            }
            Err(format!(
                "status {status}, want {} or one of {errors:?}",
                expected.map_or("no origin response".to_string(), |(s, _)| s.to_string())
            ))
        }
        Outcome::Reset(code) if may_reset => {
            let _ = code;
            Ok(())
        }
        Outcome::Reset(code) => Err(format!("stream reset by the core with 0x{code:x}")),
        Outcome::Truncated { .. } if may_reset => Ok(()),
        Outcome::Truncated { got, want, .. } => Err(format!(
            "response ended (FIN) after {got} of its {want} content-length bytes"
        )),
        Outcome::ConnClosed if shutdown || aborted => Ok(()),
        // NAT rebinding between our Retry and the client's next Initial: its token names the
        // old address, and the core closes with INVALID_TOKEN (RFC 9000 §8.1.3) at once.
        Outcome::ConnClosed
            if scn.retry != "off"
                && scn.clients[plan.client].rebind_during_handshake
                && closed_why
                    .is_some_and(|w| w.starts_with("peer closed it: transport error 0xb ")) =>
        {
            Ok(())
        }
        // A quiet client whose NAT rebound while it had nothing to send, the old mapping gone
        // and its one datagram from the new port lost: the server's packets go to the dead
        // port and the client never speaks again, so the idle timeout is the only end. (No
        // implementation can do better; a stall with the server still reachable is not this.)
        Outcome::ConnClosed if unreachable && closed_why == Some("idle timeout") => Ok(()),
        Outcome::ConnClosed => Err("connection closed under a live request".into()),
        Outcome::NotSent if shutdown => Ok(()),
        Outcome::NotSent => Err("GOAWAY without a shutdown".into()),
        Outcome::Cancelled | Outcome::Vanished => Ok(()),
    }
}
