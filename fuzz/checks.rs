//! The checks behind every fuzz target, shared by the libFuzzer targets (`fuzz/fuzz_targets/`,
//! nightly, `cargo fuzz`) and the regression test (`tests/fuzz_regressions.rs`, stable,
//! `cargo test`), which runs them over `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`.
//!
//! Each `pub fn <target>(data: &[u8])` decodes arbitrary bytes into calls on h3gate and panics
//! when an invariant breaks. They never panic on their own decoding: any byte string is valid
//! input. Input layouts are documented per function (the seed generator `fuzz/mkseeds` writes
//! the same layouts).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use h3gate::cid::{self, Secret, CID_LEN};
use h3gate::config::{self, Config};
use h3gate::core::{BackendAction, BackendEvent, BackendKey, Core, Listener};
use h3gate::http1::{self, BodyKind, Parsed, ResponseBody, ResponseHead, ResponseParser};
use h3gate::request;
use quiche::h3::NameValue;

/// The fuzz/ directory, whichever crate includes this file (the fuzz crate or h3gate's tests).
pub fn fuzz_dir() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if manifest.ends_with("fuzz") {
        manifest
    } else {
        manifest.join("fuzz")
    }
}

/// A cursor over fuzzer bytes: every read succeeds (missing bytes read as zero / empty).
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn rest(&mut self) -> &'a [u8] {
        self.take(usize::MAX)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// config
// ---------------------------------------------------------------------------------------------

/// Input: config text (lossy UTF-8). `config::parse` never panics; its errors name a line of the
/// file, are sorted, and print on one line without control characters (operator terminals); an
/// accepted config is self-consistent and a worker core can be built from it.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let first = config::parse("fuzz.conf", &text);
    let again = config::parse("fuzz.conf", &text);
    assert_eq!(first, again, "parse is not deterministic");
    let text_lines = text
        .strip_prefix('\u{feff}')
        .unwrap_or(&text)
        .lines()
        .count()
        .max(1);
    match first {
        Err(errors) => {
            assert!(!errors.is_empty(), "Err with no error");
            for e in &errors {
                assert_eq!(e.file, "fuzz.conf");
                assert!(
                    (1..=text_lines).contains(&e.line),
                    "error line {} outside 1..={text_lines}: {e}",
                    e.line
                );
                assert!(!e.message.is_empty());
                let shown = e.to_string();
                assert!(
                    !shown.chars().any(char::is_control),
                    "control character in error message: {shown:?}"
                );
            }
            assert!(
                errors.windows(2).all(|w| w[0].line <= w[1].line),
                "errors not sorted by line"
            );
        }
        Ok(cfg) => check_config(&cfg),
    }
}

fn check_config(cfg: &Config) {
    assert!(
        !cfg.frontends.is_empty(),
        "accepted a config with no frontend"
    );
    let max_timeout = Duration::from_millis(config::MAX_TIMEOUT_MS);
    for (i, fe) in cfg.frontends.iter().enumerate() {
        assert!(!fe.binds.is_empty(), "frontend without bind");
        assert!(fe.max_connections >= 1);
        assert!((1..=config::MAX_CONCURRENT_STREAMS_LIMIT).contains(&fe.max_concurrent_streams));
        assert!(
            cfg.backend(&fe.default_backend).is_some(),
            "default_backend does not resolve"
        );
        assert!(
            cfg.frontends[..i].iter().all(|o| o.name != fe.name),
            "duplicate frontend name accepted"
        );
        let t = fe.timeouts;
        for d in [t.connect, t.server, t.client, t.drain, t.handshake] {
            assert!(d <= max_timeout, "timeout above MAX_TIMEOUT_MS");
        }
    }
    for (i, be) in cfg.backends.iter().enumerate() {
        assert!(!be.servers.is_empty(), "backend without servers");
        assert!(
            cfg.backends[..i].iter().all(|o| o.name != be.name),
            "duplicate backend name accepted"
        );
        for (j, s) in be.servers.iter().enumerate() {
            assert!((1..=config::MAX_WEIGHT).contains(&s.weight));
            assert!(be.servers[..j].iter().all(|o| o.name != s.name));
            if let Some(addr) = s.addr {
                assert_eq!(addr.port(), s.port);
            }
        }
    }
    // What `h3gate check` accepts, a worker must be able to start with (certificates aside: the
    // QUIC configs are built from files and are not the parser's business).
    let core = Core::new(
        0,
        cfg,
        Vec::new(),
        Vec::new(),
        Secret::from_bytes([0; 32]),
        Instant::now(),
    );
    assert!(core.is_ok(), "Core::new refused a parsed config");
}

// ---------------------------------------------------------------------------------------------
// http1_response
// ---------------------------------------------------------------------------------------------

/// Everything a response parse produced, to compare runs with different read boundaries.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    head: Option<ResponseHead>,
    body: Vec<u8>,
    end: bool,
    error: bool,
}

/// Input: byte 0 = flags (bit 0: the request was HEAD; bits 1..=3: k), then k bytes of read sizes
/// (each + 1, used in turn), then the bytes the backend sends. The parser is driven the way
/// stream.rs drives it (append each read to the pending input, parse until NeedMore, drop what
/// was consumed), then `on_eof`. Invariants: no panic, consumed never exceeds the input, Body
/// slices are non-empty, lie inside the input and total at most the input, the loop always ends,
/// and the result does not depend on where the reads were split.
pub fn http1_response(data: &[u8]) {
    let mut b = Bytes(data);
    let flags = b.u8();
    let head_request = flags & 1 != 0;
    let k = usize::from((flags >> 1) & 7);
    let sizes: Vec<usize> = b.take(k).iter().map(|&s| usize::from(s) + 1).collect();
    let input = b.rest();

    let split = run_response(head_request, input, &sizes);
    if !sizes.is_empty() {
        let whole = run_response(head_request, input, &[]);
        assert_eq!(
            split, whole,
            "result depends on read boundaries (sizes {sizes:?})"
        );
    }
}

fn run_response(head_request: bool, input: &[u8], sizes: &[usize]) -> Outcome {
    let mut p = ResponseParser::new(head_request);
    let mut out = Outcome {
        head: None,
        body: Vec::new(),
        end: false,
        error: false,
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut rest = input;
    let mut turn = 0usize;
    while !rest.is_empty() && !out.end && !out.error {
        let n = sizes
            .get(turn % sizes.len().max(1))
            .copied()
            .unwrap_or(rest.len())
            .min(rest.len());
        turn += 1;
        let (read, after) = rest.split_at(n);
        rest = after;
        pending.extend_from_slice(read);
        drive_response(&mut p, &mut pending, &mut out, head_request, input.len());
    }
    if out.error {
        // Documented: after an error the parser keeps answering without panicking.
        let _ = p.parse(&pending);
        let _ = p.on_eof();
        return out;
    }
    if out.end {
        assert!(p.is_done());
        match p.parse(&pending) {
            Ok((0, Parsed::End)) => {}
            other => panic!("parse after End returned {other:?}"),
        }
    } else {
        match p.on_eof() {
            Ok(Parsed::End) => {
                assert!(out.head.is_some(), "End on EOF without a head");
                assert!(p.is_done());
                out.end = true;
            }
            Ok(other) => panic!("on_eof returned {other:?}"),
            Err(_) => out.error = true,
        }
    }
    if out.end {
        let head = out.head.as_ref().expect("End without Head");
        match head.body {
            ResponseBody::Empty => assert!(out.body.is_empty()),
            ResponseBody::Length(n) => assert_eq!(out.body.len() as u64, n),
            ResponseBody::Chunked | ResponseBody::UntilClose => {}
        }
    }
    out
}

fn drive_response(
    p: &mut ResponseParser,
    pending: &mut Vec<u8>,
    out: &mut Outcome,
    head_request: bool,
    input_len: usize,
) {
    let mut stalled = 0;
    loop {
        let (consumed, stop) = match p.parse(pending) {
            Err(_) => {
                out.error = true;
                return;
            }
            Ok((consumed, parsed)) => {
                assert!(
                    consumed <= pending.len(),
                    "consumed {consumed} of {}",
                    pending.len()
                );
                let stop = match parsed {
                    Parsed::Head(h) => {
                        assert!(consumed > 0, "Head consumed nothing");
                        assert!(out.head.is_none(), "second final head");
                        check_response_head(&h, head_request);
                        out.head = Some(h);
                        false
                    }
                    Parsed::Body(bytes) => {
                        assert!(out.head.is_some(), "Body before Head");
                        assert!(!bytes.is_empty(), "empty Body");
                        let start = bytes.as_ptr() as usize;
                        let base = pending.as_ptr() as usize;
                        assert!(
                            start >= base && start + bytes.len() <= base + consumed,
                            "Body slice outside the consumed input"
                        );
                        out.body.extend_from_slice(bytes);
                        assert!(out.body.len() <= input_len, "more body than input");
                        false
                    }
                    Parsed::End => {
                        assert!(out.head.is_some(), "End before Head");
                        out.end = true;
                        true
                    }
                    Parsed::NeedMore => true,
                };
                (consumed, stop)
            }
        };
        pending.drain(..consumed);
        if stop {
            return;
        }
        if consumed == 0 {
            stalled += 1;
            assert!(stalled < 2, "parser makes no progress on the same input");
        } else {
            stalled = 0;
        }
    }
}

fn check_response_head(h: &ResponseHead, head_request: bool) {
    assert!((200..=599).contains(&h.status), "status {}", h.status);
    if head_request || h.status == 204 || h.status == 304 {
        assert_eq!(h.body, ResponseBody::Empty);
    }
    if h.body == ResponseBody::UntilClose {
        assert!(!h.keep_alive, "keep-alive with a close-delimited body");
    }
    for (name, value) in &h.headers {
        assert!(!name.is_empty());
        assert!(
            !name.iter().any(u8::is_ascii_uppercase),
            "uppercase header name"
        );
        assert!(
            !matches!(
                name.as_slice(),
                b"connection"
                    | b"keep-alive"
                    | b"proxy-connection"
                    | b"transfer-encoding"
                    | b"upgrade"
                    | b"te"
                    | b"trailer"
            ),
            "hop-by-hop field {:?} kept",
            String::from_utf8_lossy(name)
        );
        assert!(
            !value.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)),
            "CR, LF or NUL in a header value"
        );
        assert!(
            !matches!(value.first(), Some(b' ' | b'\t'))
                && !matches!(value.last(), Some(b' ' | b'\t')),
            "untrimmed header value"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// h3_request
// ---------------------------------------------------------------------------------------------

/// Field names the fuzzer may pick by index (tag byte with the high bit set).
const FIELD_NAMES: &[&str] = &[
    ":method",
    ":scheme",
    ":authority",
    ":path",
    ":protocol",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "te",
    "cookie",
    "x-forwarded-for",
    "forwarded",
    "user-agent",
    "accept",
    "content-type",
    "upgrade",
    "keep-alive",
    "Host",
    "x-a",
];

/// A request as the fuzzer describes it.
pub struct H3Request {
    /// FIN with the HEADERS frame.
    pub fin: bool,
    pub client: SocketAddr,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Decodes an H3 request for [`h3_request`]: byte 0 = flags (bit 0: FIN with the HEADERS, bit 1:
/// IPv6 client), then the client address (16 or 4 bytes), then fields: a tag byte (high bit set:
/// name number `tag & 0x7f` of [`FIELD_NAMES`], else a name of `tag` bytes), a value length byte
/// (0xff: a 2-byte big-endian length follows) and the value.
pub fn decode_h3_request(data: &[u8]) -> H3Request {
    let mut b = Bytes(data);
    let flags = b.u8();
    let fin = flags & 1 != 0;
    let ip = if flags & 2 != 0 {
        let mut a = [0u8; 16];
        let got = b.take(16);
        a[..got.len()].copy_from_slice(got);
        IpAddr::V6(Ipv6Addr::from(a))
    } else {
        let mut a = [0u8; 4];
        let got = b.take(4);
        a[..got.len()].copy_from_slice(got);
        IpAddr::V4(Ipv4Addr::from(a))
    };
    let client = SocketAddr::new(ip, 4433);
    let mut fields = Vec::new();
    while !b.is_empty() {
        let tag = b.u8();
        let name = if tag & 0x80 != 0 {
            FIELD_NAMES[usize::from(tag & 0x7f) % FIELD_NAMES.len()]
                .as_bytes()
                .to_vec()
        } else {
            b.take(usize::from(tag)).to_vec()
        };
        let len = match b.u8() {
            0xff => usize::from(b.u16()),
            n => usize::from(n),
        };
        let value = b.take(len).to_vec();
        fields.push((name, value));
    }
    H3Request {
        fin,
        client,
        fields,
    }
}

/// Input: see [`decode_h3_request`]. `request::from_h3` never panics; when it accepts, the
/// HTTP/1.1 head `http1::encode_request_head` writes parses back (httparse) as exactly one
/// request with exactly the header lines h3gate meant to write: nothing a client sent can add a
/// line, split the request or change its framing (request smuggling).
pub fn h3_request(data: &[u8]) {
    let H3Request {
        fin,
        client,
        fields,
    } = decode_h3_request(data);
    let Ok(req) = request::from_h3(
        fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())),
        fin,
    ) else {
        return;
    };
    let body = http1::body_kind(&req);
    let mut out = Vec::new();
    http1::encode_request_head(&req, client, &body, &mut out);

    // What the encoder must write: request line, host, the pass-through fields in order,
    // x-forwarded-for, forwarded and at most one framing field.
    let passed: Vec<&(Vec<u8>, Vec<u8>)> = req
        .headers
        .iter()
        .filter(|(n, _)| {
            !matches!(
                n.as_slice(),
                b"host"
                    | b"content-length"
                    | b"transfer-encoding"
                    | b"x-forwarded-for"
                    | b"forwarded"
            )
        })
        .collect();
    let framing: Option<(&[u8], String)> = match body {
        BodyKind::None => (req.content_length.is_some()
            || matches!(req.method.as_slice(), b"POST" | b"PUT" | b"PATCH"))
        .then(|| (&b"content-length"[..], "0".to_string())),
        BodyKind::Length(n) => Some((&b"content-length"[..], n.to_string())),
        BodyKind::Chunked => Some((&b"transfer-encoding"[..], "chunked".to_string())),
    };
    let expected = 1 + passed.len() + 2 + usize::from(framing.is_some());

    assert!(!out.contains(&0), "NUL in the request head");
    for (i, &b) in out.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(out.get(i + 1), Some(&b'\n'), "bare CR in the request head"),
            b'\n' => assert_eq!(
                i.checked_sub(1).map(|j| out[j]),
                Some(b'\r'),
                "bare LF in the request head"
            ),
            _ => {}
        }
    }
    let lines = out.windows(2).filter(|w| w == b"\r\n").count();
    assert_eq!(
        lines,
        expected + 2,
        "line count differs: injected line?\n{}",
        String::from_utf8_lossy(&out)
    );

    let mut slots = vec![httparse::EMPTY_HEADER; expected + 8];
    let mut parsed = httparse::Request::new(&mut slots);
    let n = match parsed.parse(&out) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!(
            "encoded head does not parse ({other:?}):\n{}",
            String::from_utf8_lossy(&out)
        ),
    };
    assert_eq!(n, out.len(), "the head ends before the encoded bytes do");
    assert_eq!(
        parsed.method.map(str::as_bytes),
        Some(req.method.as_slice())
    );
    assert_eq!(parsed.path.map(str::as_bytes), Some(req.path.as_slice()));
    assert_eq!(parsed.version, Some(1));
    let hs = &parsed.headers;
    assert_eq!(hs.len(), expected, "header count differs");
    assert_eq!(hs[0].name, "host");
    assert_eq!(hs[0].value, req.authority.as_slice());
    for (h, (name, value)) in hs[1..].iter().zip(&passed) {
        assert_eq!(h.name.as_bytes(), name.as_slice());
        assert_eq!(h.value, value.as_slice());
    }
    let tail = &hs[1 + passed.len()..];
    assert_eq!(tail[0].name, "x-forwarded-for");
    assert!(tail[0]
        .value
        .ends_with(client.ip().to_canonical().to_string().as_bytes()));
    assert_eq!(tail[1].name, "forwarded");
    match &framing {
        Some((name, value)) => {
            assert_eq!(tail[2].name.as_bytes(), *name);
            assert_eq!(tail[2].value, value.as_bytes());
        }
        None => assert_eq!(tail.len(), 2),
    }
    let framing_fields = hs
        .iter()
        .filter(|h| {
            h.name.eq_ignore_ascii_case("content-length")
                || h.name.eq_ignore_ascii_case("transfer-encoding")
                || h.name.eq_ignore_ascii_case("host")
        })
        .count();
    assert_eq!(framing_fields, 1 + usize::from(framing.is_some()));
}

// ---------------------------------------------------------------------------------------------
// datagram
// ---------------------------------------------------------------------------------------------

/// Input: 2 bytes trigger length (big endian), 1 byte size of the output buffer, then a
/// datagram. The header parse the core routes by (`quiche::Header::from_slice` with our CID
/// length), `cid::owner_of` on its DCID, and a stateless reset answering it: never larger than
/// the buffer, always shorter than the trigger, at least 21 bytes, and shaped like a short-header
/// packet that ends with the CID's token.
pub fn datagram(data: &[u8]) {
    let mut b = Bytes(data);
    let trigger = usize::from(b.u16());
    let out_len = usize::from(b.u8());
    let mut pkt = b.rest().to_vec();
    let len = pkt.len();

    let dcid: Vec<u8> = match quiche::Header::from_slice(&mut pkt, CID_LEN) {
        Ok(h) => {
            let dcid = h.dcid.as_ref().to_vec();
            if h.ty == quiche::Type::Short {
                assert_eq!(dcid.len(), CID_LEN, "short header DCID of another length");
            }
            assert!(dcid.len() <= len);
            dcid
        }
        Err(_) => pkt.get(1..1 + CID_LEN).unwrap_or(&[]).to_vec(),
    };
    let owner = cid::owner_of(&dcid);
    assert_eq!(owner, (dcid.len() == CID_LEN).then(|| dcid[0]));

    let secret = Secret::from_bytes([0x5a; 32]);
    let token = secret.reset_token(&dcid).to_be_bytes();
    for trigger in [trigger, len] {
        let mut out = vec![0u8; out_len];
        match cid::stateless_reset(&secret, &dcid, trigger, &mut out) {
            Some(n) => {
                assert!(n < trigger, "reset of {n} bytes for a trigger of {trigger}");
                assert!(n >= 21, "reset of {n} bytes");
                assert!(n <= out_len);
                let reset = &mut out[..n];
                assert_eq!(reset[0] & 0xc0, 0x40, "not a short header");
                assert_eq!(&reset[n - 16..], &token);
                let h = quiche::Header::from_slice(reset, CID_LEN).expect("reset does not parse");
                assert_eq!(h.ty, quiche::Type::Short);
            }
            None => assert!(
                trigger <= 21 || out_len < 21,
                "no reset for a trigger of {trigger} into {out_len} bytes"
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// reset_token
// ---------------------------------------------------------------------------------------------

/// Input: 32 bytes of secret (zero-padded), then a CID. Tokens are
/// `HMAC-SHA256(secret, cid)[..16]`: the same for the same secret (and for another `Secret` made
/// of the same bytes), different for another secret or another CID.
pub fn reset_token(data: &[u8]) {
    let mut b = Bytes(data);
    let mut key = [0u8; 32];
    let got = b.take(32);
    key[..got.len()].copy_from_slice(got);
    let cid = b.rest();

    let s = Secret::from_bytes(key);
    let t = s.reset_token(cid);
    assert_eq!(t, s.reset_token(cid), "not deterministic");
    assert_eq!(
        t,
        Secret::from_bytes(key).reset_token(cid),
        "not a function of the bytes"
    );
    let mac = boring::hash::hmac_sha256(&key, cid).expect("hmac");
    assert_eq!(
        t.to_be_bytes(),
        mac[..16],
        "not HMAC-SHA256(secret, cid)[..16]"
    );

    let mut other = key;
    let bit = usize::from(key[0] ^ key[31]) % 256;
    other[bit / 8] ^= 1 << (bit % 8);
    assert_ne!(
        t,
        Secret::from_bytes(other).reset_token(cid),
        "secret ignored"
    );
    let mut longer = cid.to_vec();
    longer.push(0);
    assert_ne!(t, s.reset_token(&longer), "CID ignored");

    let (r1, r2) = (Secret::random(), Secret::random());
    assert_eq!(r1.reset_token(cid), r1.clone().reset_token(cid));
    assert_ne!(
        r1.reset_token(cid),
        r2.reset_token(cid),
        "random secrets collide"
    );
}

// ---------------------------------------------------------------------------------------------
// endpoint
// ---------------------------------------------------------------------------------------------

/// The endpoint's frontend address and a few client addresses (index 3 is IPv6).
const LOCAL: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 8443);
const PEERS: [SocketAddr; 4] = [
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 50000),
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 50001),
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9)), 443),
    SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 50000),
];

/// A worker core with one frontend on the fuzz certificate (`fuzz/data/`) and small limits;
/// `defaults` and `backend` are the bodies of those sections.
fn fuzz_core(now: Instant, defaults: &str, backend: &str) -> Core {
    let data = fuzz_dir().join("data");
    let text = format!(
        "defaults\n{defaults}frontend web\n    bind {LOCAL}\n    cert {}\n    key {}\n\
         \x20   default_backend app\n    max-connections 4\n    max-concurrent-streams 8\n\
         backend app\n{backend}",
        data.join("cert.pem").display(),
        data.join("key.pem").display(),
    );
    let cfg = config::parse("fuzz.conf", &text).expect("fuzz core config");
    let tickets = std::sync::Arc::new(h3gate::tickets::TicketKeys::rotating([0; 32]));
    let quic = cfg
        .frontends
        .iter()
        .map(|fe| {
            h3gate::frontend::quic_config(fe, &tickets).expect("quiche config from fuzz/data")
        })
        .collect();
    let listeners = vec![Listener {
        frontend: 0,
        local: LOCAL,
    }];
    Core::new(0, &cfg, listeners, quic, Secret::random(), now).expect("core")
}

/// The endpoint target's core.
pub fn endpoint_core(now: Instant) -> Core {
    fuzz_core(
        now,
        "    timeout client 5s\n    timeout handshake 2s\n    timeout drain 1s\n",
        "    server a1 127.0.0.1:8080\n",
    )
}

/// Splits endpoint input into datagrams: each is a 2-byte big-endian length, a flags byte and the
/// payload (bits 0..=1: client address, bits 2..=5: ms to advance ×2, bit 6: then jump 1.5 s and
/// fire timers, bit 7: graceful shutdown before this datagram).
pub fn decode_datagrams(data: &[u8]) -> Vec<(u8, &[u8])> {
    let mut b = Bytes(data);
    let mut out = Vec::new();
    while !b.is_empty() && out.len() < 64 {
        let len = usize::from(b.u16());
        let flags = b.u8();
        out.push((flags, b.take(len)));
    }
    out
}

/// Drains everything the core has to say; checks each datagram it sends.
fn drain_core(core: &mut Core, now: Instant, buf: &mut [u8]) -> usize {
    core.flush(now);
    let mut sent = 0;
    while let Some(t) = core.poll_transmit(now, buf) {
        assert!(
            t.len > 0 && t.len <= buf.len(),
            "transmit of {} bytes",
            t.len
        );
        assert_eq!(t.listener, 0);
        assert_eq!(t.from, LOCAL, "sent from an address we do not listen on");
        sent += 1;
        assert!(sent < 10_000, "poll_transmit does not run dry");
    }
    let mut actions = 0;
    while core.poll_backend_action().is_some() {
        actions += 1;
        assert!(actions < 10_000, "poll_backend_action does not run dry");
    }
    core.check_invariants();
    sent
}

/// Input: see [`decode_datagrams`]. The whole sans-IO endpoint fed arbitrary datagrams from a
/// few addresses, with jumps of a virtual clock that fire h3gate's own timers (handshake, drain),
/// then a graceful stop. Invariants: no panic, `check_invariants` after every step, every
/// datagram sent leaves from the frontend's address, the output queues run dry.
pub fn endpoint(data: &[u8]) {
    let mut now = Instant::now();
    let mut core = endpoint_core(now);
    let mut out = vec![0u8; 65536];
    let mut shut = false;
    for (flags, payload) in decode_datagrams(data) {
        if flags & 0x80 != 0 && !shut {
            shut = true;
            core.shutdown(now, Duration::from_secs(1));
            drain_core(&mut core, now, &mut out);
        }
        let from = PEERS[usize::from(flags & 3)];
        let mut buf = payload.to_vec();
        core.on_datagram(now, 0, from, LOCAL, &mut buf);
        drain_core(&mut core, now, &mut out);
        now += Duration::from_millis(u64::from((flags >> 2) & 0xf) * 2);
        if flags & 0x40 != 0 {
            now += Duration::from_millis(1500);
        }
        core.on_timer(now);
        drain_core(&mut core, now, &mut out);
    }
    // quiche 0.30 reads the real clock in `on_timeout` (and for its own timers), so the virtual
    // clock cannot make quiche's timers expire; connections cannot be run to their end here.
    // End with a graceful stop whose drain time is already over: everything is closed at once.
    core.shutdown(now, Duration::ZERO);
    drain_core(&mut core, now, &mut out);
    core.on_timer(now);
    drain_core(&mut core, now, &mut out);
    assert!(core.is_draining());
}

// ---------------------------------------------------------------------------------------------
// session
// ---------------------------------------------------------------------------------------------

/// The session target's core: two servers (one a host name the pure parser leaves unresolved,
/// so it always fails), maxconn to reach 503, short timeouts a time jump can fire.
fn session_core(now: Instant) -> Core {
    fuzz_core(
        now,
        "    timeout client 5s\n    timeout handshake 2s\n    timeout drain 1s\n\
         \x20   timeout connect 300ms\n    timeout server 600ms\n",
        "    balance roundrobin\n    server a1 127.0.0.1:8080 maxconn 3\n\
         \x20   server a2 origin.invalid:8080 weight 2\n",
    )
}

/// Responses an origin would send, for the "answer well" op (index by a fuzzer byte).
const CANNED_RESPONSES: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nclose-delimited",
    b"HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
];

/// Canned requests for the "simple request" op.
const CANNED_REQUESTS: &[&[(&str, &str)]] = &[
    &[
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", "/"),
    ],
    &[
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "localhost:8443"),
        (":path", "/echo"),
        ("content-length", "10"),
    ],
    &[
        (":method", "PUT"),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", "/sink"),
    ],
    &[
        (":method", "HEAD"),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", "/x"),
        ("cookie", "a=1"),
        ("cookie", "b=2"),
    ],
];

/// One operation the fake ring has in flight for the core.
#[derive(Debug)]
enum RingOp {
    Connect(BackendKey),
    Send(BackendKey, usize),
    /// A read of at most this many bytes.
    Recv(BackendKey, usize),
}

impl RingOp {
    fn key(&self) -> BackendKey {
        match *self {
            RingOp::Connect(k) | RingOp::Send(k, _) | RingOp::Recv(k, _) => k,
        }
    }
}

/// A quiche client, the core and a fake ring, on one virtual clock (h3gate's timers; quiche's
/// own follow the real clock, see `endpoint`).
struct Session {
    core: Core,
    client: quiche::Connection,
    h3: Option<quiche::h3::Connection>,
    /// The client's own address, and the one the core sees (differs after NAT rebinding).
    client_addr: SocketAddr,
    nat_addr: SocketAddr,
    now: Instant,
    ops: Vec<RingOp>,
    /// Bytes each backend connection's origin has sent that no read has taken yet.
    inbound: Vec<(BackendKey, Vec<u8>)>,
    /// Backend connections that have had their first Send (the request head is checked on it).
    sent_to: Vec<BackendKey>,
    /// Client streams that got a response head.
    answered: Vec<u64>,
    streams: Vec<u64>,
    next_raw_stream: u64,
    buf: Vec<u8>,
}

impl Session {
    fn new() -> Option<Session> {
        let now = Instant::now();
        let core = session_core(now);
        let mut cfg = quiche::Config::new(quiche::PROTOCOL_VERSION).ok()?;
        cfg.verify_peer(false);
        cfg.set_application_protos(quiche::h3::APPLICATION_PROTOCOL)
            .ok()?;
        cfg.set_max_idle_timeout(5000);
        cfg.set_max_recv_udp_payload_size(65527);
        cfg.set_max_send_udp_payload_size(1350);
        cfg.set_initial_max_data(1 << 20);
        cfg.set_initial_max_stream_data_bidi_local(1 << 18);
        cfg.set_initial_max_stream_data_bidi_remote(1 << 18);
        cfg.set_initial_max_stream_data_uni(1 << 18);
        cfg.set_initial_max_streams_bidi(16);
        cfg.set_initial_max_streams_uni(16);
        cfg.set_disable_active_migration(false);
        let mut scid = [0u8; 16];
        cid::fill_random(&mut scid);
        let client_addr = PEERS[0];
        let client = quiche::connect(
            Some("localhost"),
            &quiche::ConnectionId::from_ref(&scid),
            client_addr,
            LOCAL,
            &mut cfg,
        )
        .ok()?;
        let mut s = Session {
            core,
            client,
            h3: None,
            client_addr,
            nat_addr: client_addr,
            now,
            ops: Vec::new(),
            inbound: Vec::new(),
            sent_to: Vec::new(),
            answered: Vec::new(),
            streams: Vec::new(),
            next_raw_stream: 0,
            buf: vec![0u8; 65536],
        };
        s.pump();
        assert!(s.client.is_established(), "handshake with the core failed");
        let h3cfg = quiche::h3::Config::new().ok()?;
        s.h3 = Some(quiche::h3::Connection::with_transport(&mut s.client, &h3cfg).ok()?);
        s.pump();
        Some(s)
    }

    /// Moves datagrams both ways until neither side has anything to send.
    fn pump(&mut self) {
        let mut out = vec![0u8; 65536];
        for _ in 0..64 {
            let mut moved = false;
            while let Ok((n, _)) = self.client.send(&mut self.buf) {
                moved = true;
                let mut d = self.buf[..n].to_vec();
                self.core
                    .on_datagram(self.now, 0, self.nat_addr, LOCAL, &mut d);
            }
            self.core.flush(self.now);
            let mut sent = 0;
            while let Some(t) = self.core.poll_transmit(self.now, &mut out) {
                moved = true;
                sent += 1;
                assert!(sent < 10_000, "poll_transmit does not run dry");
                assert!(t.len > 0 && t.len <= out.len());
                assert_eq!(t.from, LOCAL);
                assert!(PEERS.contains(&t.to), "sent to an address no client used");
                let seg = t.segment_size.unwrap_or(t.len).max(1);
                for d in out[..t.len].chunks(seg) {
                    let mut d = d.to_vec();
                    let info = quiche::RecvInfo {
                        from: LOCAL,
                        to: self.client_addr,
                    };
                    let _ = self.client.recv(&mut d, info);
                }
            }
            self.take_actions();
            self.read_responses();
            self.core.check_invariants();
            if !moved {
                return;
            }
        }
    }

    fn take_actions(&mut self) {
        let mut n = 0;
        while let Some(a) = self.core.poll_backend_action() {
            n += 1;
            assert!(n < 10_000, "poll_backend_action does not run dry");
            match a {
                BackendAction::Connect { key, .. } => self.ops.push(RingOp::Connect(key)),
                BackendAction::Send { key, data } => {
                    assert!(!data.is_empty(), "empty Send");
                    if !self.sent_to.contains(&key) {
                        self.sent_to.push(key);
                        check_backend_request(&data);
                    }
                    self.ops.push(RingOp::Send(key, data.len()));
                }
                BackendAction::Recv { key, max } => {
                    assert!(max > 0, "a Recv of 0 bytes");
                    assert!(
                        !self
                            .ops
                            .iter()
                            .any(|o| matches!(o, RingOp::Recv(k, _) if *k == key)),
                        "a second Recv armed on one backend connection"
                    );
                    self.ops.push(RingOp::Recv(key, max));
                }
                // The ring cancels what is in flight; the core never hears of it again.
                BackendAction::Close { key } => {
                    self.ops.retain(|o| o.key() != key);
                    self.inbound.retain(|(k, _)| *k != key);
                }
            }
        }
    }

    /// The client reads every response (so flow control moves) and checks each head.
    fn read_responses(&mut self) {
        let Some(h3) = self.h3.as_mut() else { return };
        for _ in 0..1000 {
            match h3.poll(&mut self.client) {
                Ok((sid, quiche::h3::Event::Headers { list, .. })) => {
                    let status = list
                        .first()
                        .filter(|h| h.name() == b":status")
                        .map(|h| h.value().to_vec());
                    let status = status.expect("response head without :status first");
                    assert!(
                        status.len() == 3 && status.iter().all(u8::is_ascii_digit),
                        "bad :status {status:?}"
                    );
                    assert!((b'1'..=b'5').contains(&status[0]));
                    for h in &list[1..] {
                        assert!(!h.name().starts_with(b":"), "pseudo-header after :status");
                        assert!(
                            !matches!(
                                h.name(),
                                b"connection"
                                    | b"transfer-encoding"
                                    | b"keep-alive"
                                    | b"upgrade"
                                    | b"proxy-connection"
                            ),
                            "connection-specific field in an HTTP/3 response"
                        );
                        assert!(
                            !h.value().iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)),
                            "CR, LF or NUL in a response field"
                        );
                    }
                    if status[0] != b'1' {
                        assert!(!self.answered.contains(&sid), "two final heads on a stream");
                        self.answered.push(sid);
                    }
                }
                Ok((sid, quiche::h3::Event::Data)) => {
                    while let Ok(n) = h3.recv_body(&mut self.client, sid, &mut self.buf) {
                        if n == 0 {
                            break;
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    fn complete(&mut self, index: usize, outcome: u8, b: &mut Bytes) {
        if self.ops.is_empty() {
            return;
        }
        let op = self.ops.remove(index % self.ops.len());
        let now = self.now;
        let refused = || std::io::Error::from_raw_os_error(libc_errno(outcome));
        match op {
            RingOp::Connect(k) => {
                let r = if outcome & 1 == 0 {
                    Ok(())
                } else {
                    Err(refused())
                };
                self.core.on_backend(now, k, BackendEvent::Connected(r));
            }
            RingOp::Send(k, len) => {
                let r = if outcome & 1 == 0 {
                    Ok(len)
                } else {
                    Err(refused())
                };
                self.core.on_backend(now, k, BackendEvent::Sent(r));
            }
            RingOp::Recv(k, max) => {
                // What the origin sends is queued per connection; a read takes at most `max`.
                let pos = match self.inbound.iter().position(|(key, _)| *key == k) {
                    Some(pos) => pos,
                    None => {
                        self.inbound.push((k, Vec::new()));
                        self.inbound.len() - 1
                    }
                };
                let queued = &mut self.inbound[pos].1;
                match outcome % 4 {
                    // The origin answers (if it has not yet): a canned response.
                    0 => {
                        if queued.is_empty() {
                            let canned =
                                CANNED_RESPONSES[usize::from(b.u8()) % CANNED_RESPONSES.len()];
                            queued.extend_from_slice(canned);
                        }
                    }
                    // The origin sends fuzzer bytes.
                    1 => {
                        let len = usize::from(b.u8());
                        queued.extend_from_slice(b.take(len));
                    }
                    // The origin closes (once what it sent is read).
                    2 => {}
                    _ => {
                        queued.clear();
                        let r = Err(refused());
                        self.core.on_backend(now, k, BackendEvent::Received(r));
                        self.take_actions();
                        return;
                    }
                }
                let n = queued.len().min(max);
                let data: Vec<u8> = queued.drain(..n).collect();
                self.core
                    .on_backend(now, k, BackendEvent::Received(Ok(&data)));
            }
        }
        self.take_actions();
    }

    fn send_request(&mut self, fields: &[quiche::h3::Header], fin: bool) {
        let Some(h3) = self.h3.as_mut() else { return };
        if let Ok(sid) = h3.send_request(&mut self.client, fields, fin) {
            self.streams.push(sid);
            self.next_raw_stream = self.next_raw_stream.max(sid + 4);
        }
    }

    fn stream(&self, sel: u8) -> Option<u64> {
        if self.streams.is_empty() {
            None
        } else {
            Some(self.streams[usize::from(sel) % self.streams.len()])
        }
    }
}

fn libc_errno(sel: u8) -> i32 {
    // ECONNREFUSED, ECONNRESET, EPIPE, ETIMEDOUT
    [111, 104, 32, 110][usize::from(sel >> 1) % 4]
}

/// The first bytes h3gate writes on a backend connection start with one complete, valid
/// HTTP/1.1 request head with exactly one framing decision.
fn check_backend_request(data: &[u8]) {
    let mut slots = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(data) {
        Ok(httparse::Status::Complete(_)) => {}
        other => panic!(
            "backend request head does not parse ({other:?}): {:?}",
            String::from_utf8_lossy(data)
        ),
    }
    let count = |name: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count()
    };
    assert_eq!(count("host"), 1);
    assert!(count("content-length") + count("transfer-encoding") <= 1);
}

/// Input: a sequence of operations, each an op byte then its arguments, after a real QUIC + H3
/// handshake between a quiche client and the core:
/// 0 fuzz request (flags: bit 0 FIN; n fields as in `h3_request`), 1 canned request (selector,
/// FIN bit), 2 body (stream selector with FIN in bit 7 and ×1024 in bit 6, length), 3 raw bytes on a
/// request stream (arbitrary HTTP/3 frames), 4 reset or stop a stream, 5 complete one ring
/// operation (selector, outcome, data), 6 answer every pending ring operation well, 7 advance
/// the clock (×8 ms) and fire timers, 8 NAT rebinding, 9 graceful stop. After each, datagrams
/// flow until both sides are quiet. Invariants: `check_invariants` after every exchange, the
/// first bytes on each backend connection are a valid request head, one Recv armed at a time,
/// response heads start with a valid `:status` and carry no connection-specific or CR/LF/NUL
/// field, one final head per stream.
pub fn session(data: &[u8]) {
    let Some(mut s) = Session::new() else {
        return;
    };
    let mut b = Bytes(data);
    let mut ops = 0;
    while !b.is_empty() && ops < 256 {
        ops += 1;
        match b.u8() % 10 {
            0 => {
                let flags = b.u8();
                let n = usize::from(b.u8() % 24);
                let mut fields = Vec::new();
                for _ in 0..n {
                    let tag = b.u8();
                    let name = if tag & 0x80 != 0 {
                        FIELD_NAMES[usize::from(tag & 0x7f) % FIELD_NAMES.len()]
                            .as_bytes()
                            .to_vec()
                    } else {
                        b.take(usize::from(tag % 64)).to_vec()
                    };
                    let len = usize::from(b.u8());
                    fields.push(quiche::h3::Header::new(&name, b.take(len)));
                }
                s.send_request(&fields, flags & 1 != 0);
            }
            1 => {
                let sel = b.u8();
                let fields: Vec<quiche::h3::Header> = CANNED_REQUESTS
                    [usize::from(sel & 0x7f) % CANNED_REQUESTS.len()]
                .iter()
                .map(|(n, v)| quiche::h3::Header::new(n.as_bytes(), v.as_bytes()))
                .collect();
                s.send_request(&fields, sel & 0x80 != 0);
            }
            2 => {
                let sel = b.u8();
                let len = usize::from(b.u8()) * if sel & 0x40 != 0 { 1024 } else { 1 };
                let body = vec![b'x'; len];
                if let (Some(sid), Some(h3)) = (s.stream(sel & 0x3f), s.h3.as_mut()) {
                    let _ = h3.send_body(&mut s.client, sid, &body, sel & 0x80 != 0);
                }
            }
            3 => {
                let sel = b.u8();
                let len = usize::from(b.u8());
                let bytes = b.take(len).to_vec();
                let sid = if sel & 0x40 != 0 {
                    s.stream(sel & 0x3f)
                } else {
                    // A fresh client bidi stream above those quiche's h3 layer has used.
                    let sid = s
                        .next_raw_stream
                        .max(s.streams.iter().max().map_or(0, |m| m + 4));
                    s.next_raw_stream = sid + 4;
                    Some(sid)
                };
                if let Some(sid) = sid {
                    let _ = s.client.stream_send(sid, &bytes, sel & 0x80 != 0);
                }
            }
            4 => {
                let sel = b.u8();
                let code = 0x100 + u64::from(b.u8() % 0x12);
                if let Some(sid) = s.stream(sel & 0x7f) {
                    let how = if sel & 0x80 != 0 {
                        quiche::Shutdown::Read
                    } else {
                        quiche::Shutdown::Write
                    };
                    let _ = s.client.stream_shutdown(sid, how, code);
                }
            }
            5 => {
                let index = usize::from(b.u8());
                let outcome = b.u8();
                s.complete(index, outcome, &mut b);
            }
            6 => {
                let sel = b.u8();
                // Everything pending now, in order: connects succeed, sends complete, reads get
                // a canned response (one round; what these trigger waits for the next op).
                for _ in 0..s.ops.len() {
                    if s.ops.is_empty() {
                        break;
                    }
                    let mut canned = Bytes(std::slice::from_ref(&sel));
                    s.complete(0, 0, &mut canned);
                }
            }
            7 => {
                s.now += Duration::from_millis(u64::from(b.u8()) * 8);
                s.core.on_timer(s.now);
            }
            8 => {
                s.nat_addr = PEERS[usize::from(b.u8()) % PEERS.len()];
            }
            _ => {
                let drain = Duration::from_millis(u64::from(b.u8()) * 8);
                s.core.shutdown(s.now, drain);
            }
        }
        s.pump();
    }
    s.core.shutdown(s.now, Duration::ZERO);
    s.core.on_timer(s.now);
    s.pump();
}
