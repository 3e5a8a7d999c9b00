//! What one seed simulates, drawn up front from the seed alone: the backend servers and how each
//! request's origin answers, the clients and their requests, the network's faults. Nothing here
//! depends on timing, so a seed always names the same scenario.

use crate::rng::Rng;

/// Scenario features that can be switched off, so a class of runs that hits a known core bug can
/// be kept out of the CI run (and run on its own, `#[ignore]`d, until the bug is fixed).
#[derive(Clone, Copy, Debug)]
pub struct Knobs {
    /// A few responses of 100–300 KB (more than a stream buffers in h3gate: backpressure).
    pub large_bodies: bool,
    /// Clients that read response bodies slowly through a small stream window.
    pub slow_readers: bool,
    /// `core.shutdown()` while requests are in flight (GOAWAY, drain, drain timeout).
    pub shutdown_mid_flight: bool,
    /// Clients that disappear without a word (the core's idle timeout must reap them).
    pub vanishing_clients: bool,
    /// Origins that close idle keep-alive connections (stale pooled connection, retry).
    pub idle_closing_origins: bool,
    /// Clients that reset a request stream or close the connection mid-request.
    pub client_aborts: bool,
    /// Request bodies (POST), with and without content-length.
    pub uploads: bool,
    /// NAT rebinding where the old mapping dies at once: datagrams in flight to the old port
    /// are lost (else the old port keeps delivering for a while, as NATs that keep both do).
    pub rebinding_drops_old_port: bool,
    /// NAT rebinding on links that lose or reorder datagrams (else only on clean links).
    pub rebinding_on_lossy_links: bool,
}

impl Knobs {
    /// What CI runs: every feature, minus the ones that hit a known core bug (see sim.rs).
    pub const CI: Knobs = Knobs {
        rebinding_drops_old_port: false,
        rebinding_on_lossy_links: false,
        ..Knobs::ALL
    };

    pub const ALL: Knobs = Knobs {
        large_bodies: true,
        slow_readers: true,
        shutdown_mid_flight: true,
        vanishing_clients: true,
        idle_closing_origins: true,
        client_aborts: true,
        uploads: true,
        rebinding_drops_old_port: true,
        rebinding_on_lossy_links: true,
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    /// Accepts connections; each request is answered as its plan says.
    Up,
    /// Connect fails with ECONNREFUSED.
    Refuse,
    /// Connect never completes (the core's `timeout connect` must fire).
    Blackhole,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Length,
    Chunked,
    /// No length: the body ends when the origin closes the connection.
    Close,
}

#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    pub framing: Framing,
    pub keepalive: bool,
    /// A `100 Continue` before the final head.
    pub interim: bool,
    pub head_delay_ms: u64,
    /// The body goes out in this many pieces, `gap_ms` apart.
    pub pieces: usize,
    pub gap_ms: u64,
}

#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Answers (slowly if the delays say so).
    Respond(Response),
    /// Head and `cut` body bytes, then ECONNRESET.
    ResetMidBody(Response, usize),
    /// Head and `cut` body bytes, then EOF (the body is length- or chunk-framed: truncated).
    CloseEarly(Response, usize),
    /// Chunked head and a valid first chunk, then an invalid chunk-size line.
    BadChunk(Response),
    /// An invalid response head.
    Garbage(Vec<u8>),
    /// Reads the request, never answers (`timeout server` → 504).
    Hang,
}

impl Behaviour {
    pub fn name(&self) -> &'static str {
        match self {
            Behaviour::Respond(r) if r.head_delay_ms > 3 || r.gap_ms > 0 => "slow",
            Behaviour::Respond(_) => "normal",
            Behaviour::ResetMidBody(..) => "reset-mid-body",
            Behaviour::CloseEarly(..) => "close-early",
            Behaviour::BadChunk(_) => "bad-chunk",
            Behaviour::Garbage(_) => "garbage",
            Behaviour::Hang => "hang",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Upload {
    pub data: Vec<u8>,
    /// Send a `content-length` (else the core forwards it chunked).
    pub content_length: bool,
}

#[derive(Clone, Debug)]
pub struct ReqPlan {
    pub client: usize,
    pub id: usize,
    /// After the client's HTTP/3 connection is up.
    pub start_ms: u64,
    pub method: &'static str,
    pub upload: Option<Upload>,
    /// A body-less request whose HEADERS frame does not carry FIN (FIN follows on its own).
    pub separate_fin: bool,
    pub behaviour: Behaviour,
    /// The client resets the stream this long after sending the request.
    pub cancel_ms: Option<u64>,
}

impl ReqPlan {
    pub fn path(&self) -> String {
        format!("/sim/{}/{}", self.client, self.id)
    }
}

#[derive(Clone, Debug)]
pub struct ClientPlan {
    pub start_ms: u64,
    pub requests: Vec<ReqPlan>,
    /// Reads at most this many body bytes per millisecond, through a 16 KiB stream window.
    pub slow_reader: Option<usize>,
    /// NAT rebinding: the source port changes on the n-th datagram the client sends.
    pub rebind_after: Option<u64>,
    /// After rebinding, datagrams to the old port are lost (else still delivered).
    pub rebind_drops_old: bool,
    /// Count `rebind_after` from the first datagram (else from the end of the handshake).
    pub rebind_during_handshake: bool,
    /// Closes the connection (CONNECTION_CLOSE) this long after the handshake.
    pub abort_ms: Option<u64>,
    /// Goes silent (no packets in or out, ever) this long after the handshake.
    pub vanish_ms: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct NetPlan {
    pub latency_ms: u64,
    /// Extra random delay per datagram: reorders.
    pub jitter_ms: u64,
    pub loss_pm: u64,
    pub dup_pm: u64,
    pub corrupt_pm: u64,
}

#[derive(Clone, Debug)]
pub struct OriginPlan {
    /// Chance that a keep-alive connection is closed by the origin once idle.
    pub idle_close_pct: u64,
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub seed: u64,
    pub servers: Vec<ServerKind>,
    pub maxconn: Option<u32>,
    pub leastconn: bool,
    pub net: NetPlan,
    pub origin: OriginPlan,
    pub clients: Vec<ClientPlan>,
    /// `core.shutdown()` this long after the start, requests possibly in flight.
    pub shutdown_ms: Option<u64>,
    /// `quic-retry` of the frontend: off, always, or auto with a threshold of 1 half-open.
    pub retry: &'static str,
    /// `core.set_gso_segments()`: 1 is no GSO.
    pub gso_segments: usize,
    /// `timeout server` (also `timeout connect`'s partner for black-holed servers).
    pub timeout_server_ms: u64,
    /// `timeout client` (the QUIC idle timeout; the simulated clients allow twice as long).
    pub timeout_client_ms: u64,
}

impl Scenario {
    pub fn generate(seed: u64, knobs: &Knobs) -> Scenario {
        let root = Rng::new(seed);
        let mut r = root.fork(1);
        let servers = match r.below(100) {
            0..=69 => vec![ServerKind::Up],
            70..=79 => vec![ServerKind::Up, ServerKind::Up],
            80..=87 => {
                if r.percent(50) {
                    vec![ServerKind::Up, ServerKind::Refuse]
                } else {
                    vec![ServerKind::Refuse, ServerKind::Up]
                }
            }
            88..=91 => vec![ServerKind::Refuse],
            92..=95 => vec![ServerKind::Blackhole],
            _ => vec![ServerKind::Up, ServerKind::Blackhole],
        };
        let maxconn = if r.percent(8) { Some(1) } else { None };
        let leastconn = r.percent(30);
        let net = if r.percent(30) {
            NetPlan {
                latency_ms: r.below(2),
                jitter_ms: 0,
                loss_pm: 0,
                dup_pm: 0,
                corrupt_pm: 0,
            }
        } else {
            NetPlan {
                latency_ms: r.below(4),
                jitter_ms: r.below(6),
                loss_pm: *r.pick(&[0, 10, 30, 60, 100]),
                dup_pm: *r.pick(&[0, 0, 10, 30]),
                corrupt_pm: *r.pick(&[0, 0, 0, 5]),
            }
        };
        let origin = OriginPlan {
            idle_close_pct: if knobs.idle_closing_origins && r.percent(40) {
                r.range(10, 50)
            } else {
                0
            },
        };
        let nclients = r.range(1, 3) as usize;
        let mut clients = Vec::new();
        for c in 0..nclients {
            let mut cr = root.fork(100 + c as u64);
            let nreq = cr.range(1, 5) as usize;
            let requests = (0..nreq)
                .map(|id| gen_request(&mut root.fork(1000 + (c * 16 + id) as u64), c, id, knobs))
                .collect();
            clients.push(ClientPlan {
                start_ms: cr.below(20),
                requests,
                slow_reader: (knobs.slow_readers && cr.percent(5))
                    .then(|| cr.range(150, 500) as usize),
                rebind_after: cr.percent(25).then(|| cr.range(3, 40)),
                rebind_drops_old: knobs.rebinding_drops_old_port && cr.percent(50),
                rebind_during_handshake: false,
                abort_ms: (knobs.client_aborts && cr.percent(3)).then(|| cr.range(5, 80)),
                vanish_ms: (knobs.vanishing_clients && cr.percent(2)).then(|| cr.range(5, 60)),
            });
        }
        let shutdown_ms = (knobs.shutdown_mid_flight && r.percent(6)).then(|| r.range(10, 120));
        let retry = *r.pick(&["off", "off", "always", "auto"]);
        let gso_segments = *r.pick(&[1, 1, 4, 16]);
        let mut scn = Scenario {
            seed,
            servers,
            maxconn,
            leastconn,
            net,
            origin,
            clients,
            shutdown_ms,
            retry,
            gso_segments,
            timeout_server_ms: 250,
            timeout_client_ms: 1000,
        };
        let lossy = scn.net.loss_pm > 0 || scn.net.jitter_ms > 0 || scn.net.dup_pm > 0;
        // A lossy link with quiet clients: 1 s of idle time can run out during the server's PTO
        // backoff while the network drops every answer (a death that is the network's doing,
        // see sim::ten_downloads_on_a_lossy_link_never_stall); 4 s leave room for more probes.
        if scn.net.loss_pm > 0 {
            scn.timeout_client_ms = 4000;
        }
        if lossy && !knobs.rebinding_on_lossy_links {
            for c in &mut scn.clients {
                c.rebind_after = None;
            }
        }
        scn
    }

    pub fn request(&self, client: usize, id: usize) -> Option<&ReqPlan> {
        self.clients.get(client)?.requests.get(id)
    }

    /// One line per feature, for failure reports.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "servers {:?} maxconn {:?} {} | timeout server {}ms client {}ms | quic-retry {} gso {} | net latency {}ms jitter {}ms loss {}‰ dup {}‰ corrupt {}‰ | origin idle-close {}% | shutdown {:?}\n",
            self.servers,
            self.maxconn,
            if self.leastconn { "leastconn" } else { "roundrobin" },
            self.timeout_server_ms,
            self.timeout_client_ms,
            self.retry,
            self.gso_segments,
            self.net.latency_ms,
            self.net.jitter_ms,
            self.net.loss_pm,
            self.net.dup_pm,
            self.net.corrupt_pm,
            self.origin.idle_close_pct,
            self.shutdown_ms,
        );
        for (i, c) in self.clients.iter().enumerate() {
            s.push_str(&format!(
                "  client {i}: start {}ms slow_reader {:?} rebind_after {:?} (old port dies: {}) abort {:?} vanish {:?}\n",
                c.start_ms, c.slow_reader, c.rebind_after, c.rebind_drops_old, c.abort_ms, c.vanish_ms
            ));
            for r in &c.requests {
                let (status, len, framing) = match &r.behaviour {
                    Behaviour::Respond(x)
                    | Behaviour::ResetMidBody(x, _)
                    | Behaviour::CloseEarly(x, _)
                    | Behaviour::BadChunk(x) => {
                        (x.status, x.body.len(), format!("{:?}", x.framing))
                    }
                    _ => (0, 0, String::new()),
                };
                s.push_str(&format!(
                    "    {} {} at +{}ms upload {:?} separate_fin {} cancel {:?}: {} {status} {len}B {framing}\n",
                    r.method,
                    r.path(),
                    r.start_ms,
                    r.upload.as_ref().map(|u| (u.data.len(), u.content_length)),
                    r.separate_fin,
                    r.cancel_ms,
                    r.behaviour.name(),
                ));
            }
        }
        s
    }
}

fn gen_response(r: &mut Rng, knobs: &Knobs, slow: bool) -> Response {
    let status = match r.below(100) {
        0..=84 => 200,
        85..=89 => 404,
        90..=94 => 500,
        _ => 204,
    };
    let len = match r.below(100) {
        0..=49 => r.below(1000),
        50..=84 => r.range(1000, 16 * 1024),
        85..=96 => r.range(16 * 1024, 100 * 1024),
        _ if knobs.large_bodies => r.range(100 * 1024, 300 * 1024),
        _ => r.range(16 * 1024, 100 * 1024),
    } as usize;
    let body = if status == 204 {
        Vec::new()
    } else {
        r.bytes(len)
    };
    let framing = match r.below(100) {
        0..=44 => Framing::Length,
        45..=84 => Framing::Chunked,
        _ => Framing::Close,
    };
    let keepalive = framing != Framing::Close && r.percent(80);
    Response {
        status,
        body,
        framing,
        keepalive,
        interim: r.percent(5),
        head_delay_ms: if slow { r.range(5, 25) } else { r.below(3) },
        pieces: if slow { r.range(2, 5) } else { r.range(1, 3) } as usize,
        gap_ms: if slow { r.range(2, 15) } else { 0 },
    }
}

const GARBAGE: &[&[u8]] = &[
    b"HTTX/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.1 2000 OK\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nx-folded: a\r\n b\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
    b"\x00\x01\x02\x03garbage\xff\xfe\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
];

fn gen_request(r: &mut Rng, client: usize, id: usize, knobs: &Knobs) -> ReqPlan {
    let post = knobs.uploads && r.percent(35);
    let upload = post.then(|| {
        let len = match r.below(100) {
            0..=59 => r.below(2000),
            60..=89 => r.range(2000, 32 * 1024),
            _ => r.range(32 * 1024, 100 * 1024),
        } as usize;
        Upload {
            data: r.bytes(len),
            content_length: r.percent(50),
        }
    });
    let behaviour = match r.below(100) {
        0..=49 => Behaviour::Respond(gen_response(r, knobs, false)),
        50..=64 => Behaviour::Respond(gen_response(r, knobs, true)),
        65..=71 => {
            let mut resp = gen_response(r, knobs, false);
            resp.status = 200;
            resp.framing = Framing::Length;
            if resp.body.len() < 2 {
                let n = r.range(2, 3000) as usize;
                resp.body = r.bytes(n);
            }
            let cut = r.below(resp.body.len() as u64) as usize;
            Behaviour::ResetMidBody(resp, cut)
        }
        72..=78 => {
            let mut resp = gen_response(r, knobs, false);
            resp.status = 200;
            if resp.framing == Framing::Close {
                resp.framing = Framing::Length;
            }
            if resp.body.len() < 2 {
                let n = r.range(2, 3000) as usize;
                resp.body = r.bytes(n);
            }
            let cut = r.below(resp.body.len() as u64) as usize;
            Behaviour::CloseEarly(resp, cut)
        }
        79..=82 => {
            let mut resp = gen_response(r, knobs, false);
            resp.status = 200;
            resp.framing = Framing::Chunked;
            if resp.body.is_empty() {
                let n = r.range(1, 3000) as usize;
                resp.body = r.bytes(n);
            }
            Behaviour::BadChunk(resp)
        }
        83..=93 => Behaviour::Garbage(r.pick(GARBAGE).to_vec()),
        _ => Behaviour::Hang,
    };
    ReqPlan {
        client,
        id,
        start_ms: r.below(30),
        method: if post { "POST" } else { "GET" },
        upload,
        separate_fin: !post && r.percent(10),
        behaviour,
        cancel_ms: (knobs.client_aborts && r.percent(5)).then(|| r.below(40)),
    }
}

/// Builders for the named tests: one origin server, a clean network, one client.
impl Scenario {
    pub fn simple(seed: u64, requests: Vec<ReqPlan>) -> Scenario {
        Scenario {
            seed,
            servers: vec![ServerKind::Up],
            maxconn: None,
            leastconn: false,
            net: NetPlan {
                latency_ms: 1,
                jitter_ms: 0,
                loss_pm: 0,
                dup_pm: 0,
                corrupt_pm: 0,
            },
            origin: OriginPlan { idle_close_pct: 0 },
            clients: vec![ClientPlan {
                start_ms: 0,
                requests,
                slow_reader: None,
                rebind_after: None,
                rebind_drops_old: false,
                rebind_during_handshake: false,
                abort_ms: None,
                vanish_ms: None,
            }],
            shutdown_ms: None,
            retry: "off",
            gso_segments: 1,
            timeout_server_ms: 250,
            timeout_client_ms: 1000,
        }
    }
}

impl Response {
    /// A 200 with `len` body bytes (from `seed`), answered at once.
    pub fn ok(len: usize, framing: Framing, seed: u64) -> Response {
        Response {
            status: 200,
            body: Rng::new(seed).bytes(len),
            framing,
            keepalive: framing != Framing::Close,
            interim: false,
            head_delay_ms: 0,
            pieces: 1,
            gap_ms: 0,
        }
    }
}

impl ReqPlan {
    pub fn get(id: usize, behaviour: Behaviour) -> ReqPlan {
        ReqPlan {
            client: 0,
            id,
            start_ms: 0,
            method: "GET",
            upload: None,
            separate_fin: false,
            behaviour,
            cancel_ms: None,
        }
    }
}
