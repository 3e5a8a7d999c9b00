//! Metrics: per-worker snapshots and the `stats` endpoint (Prometheus text on `/metrics`, JSON on
//! `/stats`).
//!
//! Each worker owns one [`Shared`] snapshot and replaces it about every 250 ms (and once more when
//! it stops), taking its own lock once per publish: nothing on the datagram path touches it. The
//! endpoint is one small thread with a blocking std `TcpListener` that reads the snapshots, so
//! a slow scraper never delays a worker.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::core::Stats;
use crate::diag;
use crate::ring::RingStats;

/// How often a worker publishes its snapshot.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// Per-connection read/write timeout of the endpoint (it serves one client at a time).
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head the endpoint reads.
const MAX_HEAD: usize = 8 * 1024;

/// One worker's counters at a point in time.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub worker: u8,
    pub stats: Stats,
    pub ring: RingStats,
    /// Connections, streams, backend connections (`Core::live()`).
    pub live: (usize, usize, usize),
    /// Backend connections idle in a pool (part of `live.2`).
    pub idle_backends: usize,
    pub handoff_drops: u64,
    pub loops: u64,
    pub draining: bool,
}

pub type Shared = Arc<Mutex<Snapshot>>;

/// Stores `snap` in `shared` (a poisoned lock still takes the value: the data is plain counters).
pub fn publish(shared: &Shared, snap: Snapshot) {
    let mut g = shared.lock().unwrap_or_else(|e| e.into_inner());
    *g = snap;
}

fn read(shared: &Shared) -> Snapshot {
    shared.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// One time series of a family: its extra label (`""` or `class="2xx"`), its JSON name and how
/// to read it.
struct Series {
    label: &'static str,
    json: &'static str,
    get: fn(&Snapshot) -> u64,
}

struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    series: &'static [Series],
}

const fn one(json: &'static str, get: fn(&Snapshot) -> u64) -> [Series; 1] {
    [Series {
        label: "",
        json,
        get,
    }]
}

macro_rules! family {
    ($name:literal, $kind:literal, $help:literal, $json:literal, $get:expr) => {
        Family {
            name: $name,
            help: $help,
            kind: $kind,
            series: &one($json, $get),
        }
    };
}

/// Every metric, in output order. A new `Stats` field needs a line here.
static FAMILIES: &[Family] = &[
    family!(
        "h3gate_connections",
        "gauge",
        "Live QUIC connections.",
        "connections",
        |s| s.live.0 as u64
    ),
    family!(
        "h3gate_streams",
        "gauge",
        "Live HTTP/3 request streams.",
        "streams",
        |s| s.live.1 as u64
    ),
    family!(
        "h3gate_backend_connections",
        "gauge",
        "Open HTTP/1.1 connections to origin servers (pooled and busy).",
        "backend_connections",
        |s| s.live.2 as u64
    ),
    family!(
        "h3gate_backend_connections_idle",
        "gauge",
        "Open origin connections idle in a pool, waiting for reuse (part of h3gate_backend_connections).",
        "backend_connections_idle",
        |s| s.idle_backends as u64
    ),
    family!(
        "h3gate_draining",
        "gauge",
        "1 while the worker is draining for a graceful stop.",
        "draining",
        |s| u64::from(s.draining)
    ),
    family!(
        "h3gate_loop_passes_total",
        "counter",
        "Passes of the worker loop.",
        "loop_passes",
        |s| s.loops
    ),
    family!(
        "h3gate_datagrams_received_total",
        "counter",
        "UDP datagrams received (after GRO splitting).",
        "datagrams_in",
        |s| s.stats.datagrams_in
    ),
    family!(
        "h3gate_datagrams_sent_total",
        "counter",
        "UDP datagrams sent.",
        "datagrams_out",
        |s| s.stats.datagrams_out
    ),
    family!(
        "h3gate_received_bytes_total",
        "counter",
        "UDP payload bytes received.",
        "bytes_in",
        |s| s.stats.bytes_in
    ),
    family!(
        "h3gate_sent_bytes_total",
        "counter",
        "UDP payload bytes sent.",
        "bytes_out",
        |s| s.stats.bytes_out
    ),
    Family {
        name: "h3gate_datagrams_dropped_total",
        help: "Datagrams dropped before reaching a connection, by reason.",
        kind: "counter",
        series: &[
            Series {
                label: "reason=\"unparsable\"",
                json: "dropped_unparsable",
                get: |s| s.stats.dropped_unparsable,
            },
            Series {
                label: "reason=\"unknown_connection\"",
                json: "dropped_unknown",
                get: |s| s.stats.dropped_unknown,
            },
            Series {
                label: "reason=\"at_capacity\"",
                json: "dropped_at_capacity",
                get: |s| s.stats.dropped_at_capacity,
            },
        ],
    },
    family!(
        "h3gate_version_negotiations_total",
        "counter",
        "Version negotiation packets sent.",
        "version_negotiations",
        |s| s.stats.version_negotiations
    ),
    family!(
        "h3gate_stateless_resets_total",
        "counter",
        "Stateless resets sent.",
        "stateless_resets",
        |s| s.stats.stateless_resets
    ),
    family!(
        "h3gate_retries_total",
        "counter",
        "QUIC Retry packets sent (address validation).",
        "retries_sent",
        |s| s.stats.retries_sent
    ),
    family!(
        "h3gate_retry_tokens_invalid_total",
        "counter",
        "Initial packets whose Retry token was ours but expired, forged or bound to another address.",
        "retry_token_invalid",
        |s| s.stats.retry_token_invalid
    ),
    family!(
        "h3gate_invalid_token_closes_total",
        "counter",
        "Stateless CONNECTION_CLOSE(INVALID_TOKEN) sent for them (at most 100 per second per worker).",
        "invalid_token_closes",
        |s| s.stats.invalid_token_closes
    ),
    family!(
        "h3gate_handshakes_total",
        "counter",
        "Completed QUIC handshakes.",
        "handshakes",
        |s| s.stats.handshakes
    ),
    family!(
        "h3gate_connections_accepted_total",
        "counter",
        "QUIC connections accepted.",
        "conns_accepted",
        |s| s.stats.conns_accepted
    ),
    family!(
        "h3gate_connections_closed_total",
        "counter",
        "QUIC connections closed and reaped.",
        "conns_closed",
        |s| s.stats.conns_closed
    ),
    family!(
        "h3gate_migrations_total",
        "counter",
        "Connection migrations (client address changes).",
        "migrations",
        |s| s.stats.migrations
    ),
    family!(
        "h3gate_paths_freed_total",
        "counter",
        "Network paths a connection had left (NAT rebinding, migration), freed for a new one.",
        "paths_freed",
        |s| s.stats.paths_freed
    ),
    family!(
        "h3gate_early_data_requests_total",
        "counter",
        "Safe requests forwarded from 0-RTT early data, marked Early-Data: 1.",
        "early_data_requests",
        |s| s.stats.early_data_requests
    ),
    family!(
        "h3gate_early_data_held_total",
        "counter",
        "Unsafe requests in 0-RTT early data held until the handshake completed.",
        "early_data_held",
        |s| s.stats.early_data_held
    ),
    family!(
        "h3gate_streams_opened_total",
        "counter",
        "HTTP/3 request streams opened.",
        "streams_opened",
        |s| s.stats.streams_opened
    ),
    family!(
        "h3gate_streams_rejected_total",
        "counter",
        "Request streams refused (above GOAWAY, limits).",
        "streams_rejected",
        |s| s.stats.streams_rejected
    ),
    Family {
        name: "h3gate_responses_total",
        help: "Requests finished, by response status class (none: reset before a status).",
        kind: "counter",
        series: &[
            Series {
                label: "class=\"none\"",
                json: "responses_none",
                get: |s| s.stats.responses[0],
            },
            Series {
                label: "class=\"1xx\"",
                json: "responses_1xx",
                get: |s| s.stats.responses[1],
            },
            Series {
                label: "class=\"2xx\"",
                json: "responses_2xx",
                get: |s| s.stats.responses[2],
            },
            Series {
                label: "class=\"3xx\"",
                json: "responses_3xx",
                get: |s| s.stats.responses[3],
            },
            Series {
                label: "class=\"4xx\"",
                json: "responses_4xx",
                get: |s| s.stats.responses[4],
            },
            Series {
                label: "class=\"5xx\"",
                json: "responses_5xx",
                get: |s| s.stats.responses[5],
            },
        ],
    },
    family!(
        "h3gate_budget_bytes",
        "gauge",
        "Memory budget of the worker (its share of max-memory).",
        "budget_bytes",
        |s| s.stats.budget.capacity as u64
    ),
    family!(
        "h3gate_budget_used_bytes",
        "gauge",
        "Budget held by buffers now.",
        "budget_used_bytes",
        |s| s.stats.budget.in_use as u64
    ),
    family!(
        "h3gate_budget_peak_bytes",
        "gauge",
        "Highest budget use since start.",
        "budget_peak_bytes",
        |s| s.stats.budget.peak as u64
    ),
    family!(
        "h3gate_budget_chunk_refusals_total",
        "counter",
        "Buffer chunks refused because the budget was spent (a side stopped reading).",
        "budget_chunk_refusals",
        |s| s.stats.budget.refusals
    ),
    family!(
        "h3gate_connections_refused_total",
        "counter",
        "New connections refused because the budget was above its high-water mark.",
        "refused_conns",
        |s| s.stats.refused_conns
    ),
    family!(
        "h3gate_requests_queued_total",
        "counter",
        "Requests that waited in the admission queue for budget.",
        "budget_queued",
        |s| s.stats.budget_queued
    ),
    family!(
        "h3gate_requests_refused_total",
        "counter",
        "Requests answered 503 for lack of budget.",
        "budget_refusals",
        |s| s.stats.budget_refusals
    ),
    family!(
        "h3gate_backend_connects_total",
        "counter",
        "TCP connections opened to origin servers.",
        "backend_connects",
        |s| s.stats.backend_connects
    ),
    family!(
        "h3gate_backend_connect_errors_total",
        "counter",
        "Failed TCP connects to origin servers.",
        "backend_connect_errors",
        |s| s.stats.backend_connect_errors
    ),
    family!(
        "h3gate_backend_reuses_total",
        "counter",
        "Requests sent on a pooled keep-alive connection.",
        "backend_reuses",
        |s| s.stats.backend_reuses
    ),
    family!(
        "h3gate_backend_errors_total",
        "counter",
        "Backend connection errors (reset, invalid response, timeout).",
        "backend_errors",
        |s| s.stats.backend_errors
    ),
    family!(
        "h3gate_stale_events_total",
        "counter",
        "Backend completions for connections already gone.",
        "stale_events",
        |s| s.stats.stale_events
    ),
    family!(
        "h3gate_handoffs_out_total",
        "counter",
        "Datagrams handed to the worker that owns their connection.",
        "handoffs_out",
        |s| s.stats.handoffs_out
    ),
    family!(
        "h3gate_handoffs_in_total",
        "counter",
        "Datagrams received from another worker.",
        "handoffs_in",
        |s| s.stats.handoffs_in
    ),
    family!(
        "h3gate_handoff_drops_total",
        "counter",
        "Handoffs dropped because the owner's queue was full.",
        "handoff_drops",
        |s| s.handoff_drops
    ),
    family!(
        "h3gate_gso_batches_total",
        "counter",
        "Multi-datagram GSO sends.",
        "gso_batches",
        |s| s.stats.gso_batches
    ),
    family!(
        "h3gate_gso_disabled_total",
        "counter",
        "Times GSO was turned off after the kernel refused a batch.",
        "gso_disabled",
        |s| s.stats.gso_disabled
    ),
    family!(
        "h3gate_gro_batches_total",
        "counter",
        "Receives that carried several coalesced datagrams (GRO).",
        "gro_batches",
        |s| s.ring.gro_batches
    ),
    family!(
        "h3gate_gro_segments_total",
        "counter",
        "Datagrams that arrived inside GRO batches.",
        "gro_segments",
        |s| s.ring.gro_segments
    ),
    family!(
        "h3gate_udp_send_errors_total",
        "counter",
        "UDP send errors.",
        "udp_send_errors",
        |s| s.ring.udp_send_errors
    ),
    family!(
        "h3gate_udp_receive_errors_total",
        "counter",
        "UDP receive errors.",
        "udp_recv_errors",
        |s| s.ring.udp_recv_errors
    ),
    family!(
        "h3gate_stale_completions_total",
        "counter",
        "io_uring completions whose owner was gone.",
        "stale_completions",
        |s| s.ring.stale_completions
    ),
    family!(
        "h3gate_submission_queue_full_total",
        "counter",
        "Times the io_uring submission queue was full.",
        "sq_full",
        |s| s.ring.sq_full
    ),
];

/// What the endpoint serves: every worker's snapshot.
pub struct Board {
    workers: Vec<Shared>,
    started: SystemTime,
}

impl Board {
    pub fn new(workers: Vec<Shared>) -> Board {
        Board {
            workers,
            started: SystemTime::now(),
        }
    }

    fn snapshots(&self) -> Vec<Snapshot> {
        self.workers.iter().map(read).collect()
    }

    fn uptime(&self) -> f64 {
        self.started
            .elapsed()
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn prometheus(&self) -> String {
        render_prometheus(&self.snapshots(), self.uptime(), self.started)
    }

    pub fn json(&self) -> String {
        render_json(&self.snapshots(), self.uptime())
    }
}

fn render_prometheus(snaps: &[Snapshot], uptime: f64, started: SystemTime) -> String {
    use std::fmt::Write as _;
    let mut o = String::with_capacity(8192);
    let start = started
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let _ = write!(
        o,
        "# HELP h3gate_build_info Version and build commit of the running h3gate.\n\
         # TYPE h3gate_build_info gauge\n\
         h3gate_build_info{{version=\"{}\",commit=\"{}\"}} 1\n\
         # HELP h3gate_start_time_seconds Start time of the process since the Unix epoch.\n\
         # TYPE h3gate_start_time_seconds gauge\n\
         h3gate_start_time_seconds {start}\n\
         # HELP h3gate_uptime_seconds Seconds since start.\n\
         # TYPE h3gate_uptime_seconds gauge\n\
         h3gate_uptime_seconds {uptime:.3}\n\
         # HELP h3gate_workers Worker threads.\n\
         # TYPE h3gate_workers gauge\n\
         h3gate_workers {}\n",
        diag::VERSION,
        diag::COMMIT,
        snaps.len()
    );
    for f in FAMILIES {
        let _ = writeln!(o, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(o, "# TYPE {} {}", f.name, f.kind);
        for s in snaps {
            for series in f.series {
                let sep = if series.label.is_empty() { "" } else { "," };
                let _ = writeln!(
                    o,
                    "{}{{worker=\"{}\"{sep}{}}} {}",
                    f.name,
                    s.worker,
                    series.label,
                    (series.get)(s)
                );
            }
        }
    }
    o
}

fn render_json(snaps: &[Snapshot], uptime: f64) -> String {
    use std::fmt::Write as _;
    let mut o = String::with_capacity(4096);
    let _ = write!(
        o,
        "{{\"version\":\"{}\",\"commit\":\"{}\",\"uptime_seconds\":{uptime:.3},\"workers\":[",
        diag::VERSION,
        diag::COMMIT
    );
    for (i, s) in snaps.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        let _ = write!(o, "{{\"worker\":{}", s.worker);
        for f in FAMILIES {
            for series in f.series {
                let _ = write!(o, ",\"{}\":{}", series.json, (series.get)(s));
            }
        }
        o.push('}');
    }
    o.push_str("]}\n");
    o
}

/// Every counter of `snap` as `name=value` pairs (the SIGUSR2 state dump).
pub fn summary(snap: &Snapshot) -> String {
    let mut o = String::with_capacity(1024);
    for f in FAMILIES {
        for series in f.series {
            if !o.is_empty() {
                o.push(' ');
            }
            o.push_str(series.json);
            o.push('=');
            o.push_str(&(series.get)(snap).to_string());
        }
    }
    o
}

/// Serves `board` on `listener` until the process exits. Runs on its own thread.
pub fn serve(listener: TcpListener, board: Arc<Board>) {
    diag::register_stats_thread();
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                if let Err(e) = handle(stream, &board) {
                    log::debug!("stats endpoint: {e}");
                }
            }
            Err(e) => {
                log::warn!("stats endpoint: accept: {e}");
                // EMFILE and friends: do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Parses the request line of `head`: (method, path without the query).
fn request_target(head: &[u8]) -> Option<(&str, &str)> {
    let line_end = head.iter().position(|&b| b == b'\r' || b == b'\n')?;
    let line = std::str::from_utf8(head.get(..line_end)?).ok()?;
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    Some((method, path))
}

fn handle(mut stream: TcpStream, board: &Board) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
        if head.len() > MAX_HEAD {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"",
                false,
            );
        }
    }
    let Some((method, path)) = request_target(&head) else {
        return respond(
            &mut stream,
            "400 Bad Request",
            "text/plain",
            b"bad request\n",
            false,
        );
    };
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            b"GET only\n",
            false,
        );
    }
    match path {
        "/metrics" => respond(
            &mut stream,
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            board.prometheus().as_bytes(),
            head_only,
        ),
        "/stats" => respond(
            &mut stream,
            "200 OK",
            "application/json",
            board.json().as_bytes(),
            head_only,
        ),
        "/" => respond(
            &mut stream,
            "200 OK",
            "text/plain",
            b"h3gate stats: /metrics (Prometheus), /stats (JSON)\n",
            head_only,
        ),
        _ => respond(
            &mut stream,
            "404 Not Found",
            "text/plain",
            b"not found\n",
            head_only,
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(body)?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Snapshot> {
        let mut a = Snapshot {
            worker: 0,
            live: (2, 1, 3),
            ..Snapshot::default()
        };
        a.stats.responses[2] = 7;
        a.stats.bytes_in = 1234;
        let b = Snapshot {
            worker: 1,
            ..Snapshot::default()
        };
        vec![a, b]
    }

    #[test]
    fn prometheus_text_has_every_family_once_and_labels() {
        let text = render_prometheus(&sample(), 1.5, SystemTime::now());
        for f in FAMILIES {
            assert_eq!(
                text.matches(&format!("# TYPE {} ", f.name)).count(),
                1,
                "{}",
                f.name
            );
        }
        assert!(text.contains("h3gate_responses_total{worker=\"0\",class=\"2xx\"} 7\n"));
        assert!(text.contains("h3gate_received_bytes_total{worker=\"0\"} 1234\n"));
        assert!(text.contains("h3gate_connections{worker=\"0\"} 2\n"));
        assert!(text.contains("h3gate_connections{worker=\"1\"} 0\n"));
        // Every sample line is `name{labels} value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(series.starts_with("h3gate_"), "{line}");
        }
    }

    #[test]
    fn json_is_balanced_and_named() {
        let j = render_json(&sample(), 2.0);
        assert!(j.starts_with("{\"version\":"));
        assert!(j.contains("\"worker\":0,\"connections\":2"));
        assert!(j.contains("\"responses_2xx\":7"));
        assert_eq!(j.matches('{').count(), j.matches('}').count());
        assert_eq!(j.matches('[').count(), j.matches(']').count());
    }

    #[test]
    fn request_lines() {
        assert_eq!(
            request_target(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            request_target(b"GET /stats?x=1 HTTP/1.0\r\n\r\n"),
            Some(("GET", "/stats"))
        );
        assert_eq!(request_target(b"GET /metrics\r\n\r\n"), None);
        assert_eq!(request_target(b"\xff\xfe\r\n"), None);
        assert_eq!(request_target(b""), None);
    }

    #[test]
    fn serves_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared: Shared = Arc::new(Mutex::new(sample().remove(0)));
        let board = Arc::new(Board::new(vec![shared.clone()]));
        std::thread::spawn(move || serve(listener, board));
        let get = |path: &str| {
            let mut s = TcpStream::connect(addr).unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let m = get("/metrics");
        assert!(m.starts_with("HTTP/1.1 200 OK\r\n"), "{m}");
        assert!(m.contains("h3gate_streams{worker=\"0\"} 1\n"));
        let mut snap = sample().remove(0);
        snap.live.1 = 9;
        publish(&shared, snap);
        assert!(get("/metrics").contains("h3gate_streams{worker=\"0\"} 9\n"));
        assert!(get("/stats").contains("\"streams\":9"));
        assert!(get("/nope").starts_with("HTTP/1.1 404"));
    }
}
