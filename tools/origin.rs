//! `origin`: a small, deliberately predictable HTTP/1.1 origin server.
//!
//! h3gate's demo and end-to-end tests put it behind the proxy so that every
//! HTTP/3 request ends up somewhere whose behaviour is known exactly: fixed
//! bodies, large deterministic downloads (content-length, chunked and
//! close-delimited), uploads echoed back together with how they were framed,
//! slow and trickling answers, arbitrary status codes, the raw request head,
//! connection resets and a malformed response.
//!
//! It uses one thread per connection and blocking std I/O, supports
//! keep-alive and HTTP/1.0, decodes chunked uploads (trailers included) and
//! answers anything it cannot parse with 400 and closes. It never trusts the
//! peer: sizes are bounded, arithmetic is checked and nothing unwraps.
//!
//! Endpoints (any method; HEAD gets the same head without a body):
//!
//! | path                 | answer                                                   |
//! |----------------------|----------------------------------------------------------|
//! | `/`                  | 200 `hello from origin\n`                                |
//! | `/echo`              | 200, the request body, plus `x-request-body-length`,     |
//! |                      | `x-seen-transfer-encoding` and `x-seen-content-length`   |
//! | `/sink`              | 200 `N\n`, N = request body bytes (body is discarded)    |
//! | `/bytes/N`           | N pattern bytes with content-length                      |
//! | `/chunked/N`         | N pattern bytes, chunked (16 KiB chunks)                 |
//! | `/close/N`           | N pattern bytes delimited by closing the connection      |
//! | `/slow/MS`           | sleeps MS milliseconds, then 200 `slow\n`                |
//! | `/trickle/N`         | N pattern bytes with content-length, one every 10 ms     |
//! | `/drip/N`            | N pattern bytes with content-length, one a second        |
//! | `/status/N`          | status N (100..=599) with body `status N\n`              |
//! | `/headers`           | 200, the request head exactly as received                |
//! | `/reset`             | no answer: the connection is reset (RST)                 |
//! | `/badresponse`       | a response with two conflicting content-lengths          |
//! | `/resetmid/N`        | head with content-length N, N/2 pattern bytes, then RST  |
//! | `/bigheaders/N`      | 200 whose header fields total about N bytes              |
//! | anything else        | 404 `not found\n`                                        |
//!
//! Pattern byte `i` is `(i * 7 + (i >> 8)) as u8`; it repeats every 64 KiB.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use argh::FromArgs;

/// Read and write timeout on every connection.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request head (request line + header fields) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields accepted in a request head or a trailer section.
const MAX_HEADERS: usize = 128;
/// Empty lines tolerated before a request line (RFC 9112 §2.2).
const MAX_LEADING_EMPTY_LINES: usize = 16;
/// Longest chunk-size line (including extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 64 * 1024;
/// Largest body `/echo` keeps in memory.
const MAX_ECHO: u64 = 256 * 1024 * 1024;
/// Size of each write of a content-length or close-delimited download.
const WRITE_SIZE: usize = 64 * 1024;
/// Largest chunk of a `/chunked/N` download.
const CHUNK_SIZE: usize = 16 * 1024;
/// Delay between the bytes of `/trickle/N`.
const TRICKLE_DELAY: Duration = Duration::from_millis(10);
/// Delay between the bytes of `/drip/N`.
const DRIP_DELAY: Duration = Duration::from_secs(1);
/// How long a closing connection keeps reading what the peer still sends,
/// so that the response is not destroyed by an RST.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// How much a closing connection reads before giving up on lingering.
const LINGER_BYTES: usize = 1024 * 1024;

/// One period of the download pattern.
static PATTERN: [u8; PATTERN_LEN] = pattern_block();
const PATTERN_LEN: usize = 65536;

/// Byte `i` of the pattern is `(i * 7 + (i >> 8)) as u8`. Both terms only
/// depend on the low 16 bits of `i`, so one 64 KiB block describes it all.
const fn pattern_block() -> [u8; PATTERN_LEN] {
    let mut block = [0u8; PATTERN_LEN];
    let mut i = 0;
    while i < PATTERN_LEN {
        block[i] = (i * 7 + (i >> 8)) as u8;
        i += 1;
    }
    block
}

/// Sample HTTP/1.1 origin server for the h3gate demo and end-to-end tests.
#[derive(FromArgs)]
struct Args {
    /// address to listen on (default 127.0.0.1:8080; port 0 picks one)
    #[argh(option, default = "String::from(\"127.0.0.1:8080\")")]
    listen: String,

    /// do not log requests to stderr
    #[argh(switch, short = 'q')]
    quiet: bool,
}

fn main() {
    let args: Args = argh::from_env();
    let listener = match TcpListener::bind(&args.listen) {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("origin: cannot listen on {}: {err}", args.listen);
            std::process::exit(1);
        }
    };
    let addr = match listener.local_addr() {
        Ok(addr) => addr.to_string(),
        Err(_) => args.listen.clone(),
    };
    eprintln!("origin listening on {addr}");

    let quiet = args.quiet;
    for incoming in listener.incoming() {
        match incoming {
            Ok(stream) => {
                let spawned = thread::Builder::new()
                    .name("origin-conn".into())
                    .spawn(move || serve(stream, quiet));
                if let Err(err) = spawned {
                    eprintln!("origin: cannot start a connection thread: {err}");
                }
            }
            Err(err) => {
                // Usually transient (aborted handshake, fd exhaustion).
                eprintln!("origin: accept: {err}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Why reading or answering a request stopped.
enum Fail {
    /// The peer went away, timed out or broke the stream: close quietly.
    Io,
    /// The request is unacceptable: answer with this status, then close.
    Reject(u16, &'static str),
}

impl From<io::Error> for Fail {
    fn from(_: io::Error) -> Self {
        Fail::Io
    }
}

/// What to do with the connection after a request.
enum Next {
    KeepAlive,
    Close,
    Reset,
}

/// A parsed request head, owned.
struct Request {
    /// The head exactly as received: request line, fields, empty line.
    raw: Vec<u8>,
    method: String,
    target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    minor: u8,
    headers: Vec<(String, Vec<u8>)>,
}

impl Request {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    fn has(&self, name: &str) -> bool {
        self.values(name).next().is_some()
    }

    /// The comma-separated list elements of every `name` field, trimmed,
    /// lower-cased, empty elements dropped.
    fn tokens(&self, name: &str) -> Vec<String> {
        self.values(name)
            .flat_map(|v| v.split(|&b| b == b','))
            .map(|t| String::from_utf8_lossy(t.trim_ascii()).to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    }
}

/// How the request body is delimited.
enum Framing {
    Empty,
    Length(u64),
    Chunked,
}

/// Per-request answer parameters.
struct Exchange {
    http10: bool,
    head_only: bool,
    keep_alive: bool,
    /// End the connection with an RST once the answer is written.
    reset: bool,
}

enum Route {
    Hello,
    Echo,
    Sink,
    Bytes(u64),
    Chunked(u64),
    Close(u64),
    Slow(u64),
    /// N bytes, one every given delay.
    Trickle(u64, Duration),
    Status(u16),
    Headers,
    Reset,
    ResetMid(u64),
    BigHeaders(u64),
    BadResponse,
    NotFound,
    BadParam(&'static str),
}

fn serve(stream: TcpStream, quiet: bool) {
    let peer = match stream.peer_addr() {
        Ok(addr) => addr.to_string(),
        Err(_) => "?".to_string(),
    };
    let _ = stream.set_nodelay(true);
    if stream.set_read_timeout(Some(IO_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(IO_TIMEOUT)).is_err()
    {
        return;
    }
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let mut conn = Conn {
        reader: BufReader::with_capacity(64 * 1024, stream),
        writer,
        peer,
        quiet,
    };
    match conn.run() {
        Ok(Next::KeepAlive) | Err(Fail::Io) => {}
        Ok(Next::Close) => conn.lingering_close(),
        Ok(Next::Reset) => conn.reset(),
        Err(Fail::Reject(status, why)) => {
            conn.log("-", "-", status, why.len() + 1);
            if conn.reject(status, why).is_ok() {
                conn.lingering_close();
            }
        }
    }
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    peer: String,
    quiet: bool,
}

impl Conn {
    /// Serves requests until the connection has to end. `Ok(KeepAlive)`
    /// means the peer closed cleanly between requests.
    fn run(&mut self) -> Result<Next, Fail> {
        loop {
            let Some(raw) = read_head(&mut self.reader)? else {
                return Ok(Next::KeepAlive);
            };
            match self.handle(raw)? {
                Next::KeepAlive => continue,
                other => return Ok(other),
            }
        }
    }

    fn handle(&mut self, raw: Vec<u8>) -> Result<Next, Fail> {
        let req = parse_request(raw)?;
        let framing = request_framing(&req)?;
        let connection = req.tokens("connection");
        let keep_alive = if req.minor == 0 {
            connection.iter().any(|t| t == "keep-alive") && !connection.iter().any(|t| t == "close")
        } else {
            !connection.iter().any(|t| t == "close")
        };
        let mut ex = Exchange {
            http10: req.minor == 0,
            head_only: req.method == "HEAD",
            keep_alive,
            reset: false,
        };
        let route = match request_path(&req.target) {
            Some(path) => route(path),
            None => return Err(Fail::Reject(400, "unsupported request-target")),
        };

        if let Route::Reset = route {
            self.log(&req.method, &req.target, 0, 0);
            return Ok(Next::Reset);
        }

        // Expectations only mean something in HTTP/1.1 (RFC 9110 §10.1.1).
        let mut expect_continue = false;
        if req.minor >= 1 && req.has("expect") {
            let expect = req.tokens("expect");
            if expect.is_empty() || expect.iter().any(|t| t != "100-continue") {
                return Err(Fail::Reject(417, "only 100-continue is supported"));
            }
            expect_continue = true;
        }

        let keep_body = matches!(route, Route::Echo);
        if let (true, Framing::Length(n)) = (keep_body, &framing) {
            if *n > MAX_ECHO {
                return Err(Fail::Reject(413, "body too large to echo"));
            }
        }
        let has_body = !matches!(framing, Framing::Empty | Framing::Length(0));
        if expect_continue && has_body {
            self.writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }

        let mut body = Vec::new();
        let received = read_body(&mut self.reader, &framing, &mut |data: &[u8]| {
            if keep_body {
                if (body.len() as u64).saturating_add(data.len() as u64) > MAX_ECHO {
                    return Err(Fail::Reject(413, "body too large to echo"));
                }
                body.extend_from_slice(data);
            }
            Ok(())
        })?;

        let (status, sent) = self.answer(&mut ex, &req, &framing, route, &body, received)?;
        self.log(&req.method, &req.target, status, sent);
        Ok(if ex.reset {
            Next::Reset
        } else if ex.keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        })
    }

    /// Writes the response for `route`; returns the status and body size
    /// for the log.
    fn answer(
        &mut self,
        ex: &mut Exchange,
        req: &Request,
        framing: &Framing,
        route: Route,
        body: &[u8],
        received: u64,
    ) -> io::Result<(u16, usize)> {
        const TEXT: (&str, &str) = ("content-type", "text/plain");
        const BINARY: (&str, &str) = ("content-type", "application/octet-stream");
        let (status, sent) = match route {
            Route::Hello => self.simple(ex, 200, &[TEXT], b"hello from origin\n")?,
            Route::Echo => {
                let te = match framing {
                    Framing::Chunked => "chunked".to_string(),
                    _ => "none".to_string(),
                };
                let cl = match framing {
                    Framing::Length(n) => n.to_string(),
                    _ => "none".to_string(),
                };
                let len = body.len().to_string();
                let fields = [
                    BINARY,
                    ("x-request-body-length", len.as_str()),
                    ("x-seen-transfer-encoding", te.as_str()),
                    ("x-seen-content-length", cl.as_str()),
                ];
                self.simple(ex, 200, &fields, body)?
            }
            Route::Sink => self.simple(ex, 200, &[TEXT], format!("{received}\n").as_bytes())?,
            Route::Bytes(n) => {
                let len = n.to_string();
                self.head(ex, 200, &[BINARY, ("content-length", &len)])?;
                if !ex.head_only {
                    write_pattern(&mut self.writer, n)?;
                }
                (200, n as usize)
            }
            Route::Chunked(n) => {
                if ex.http10 {
                    // No chunked coding for HTTP/1.0: delimit by closing.
                    ex.keep_alive = false;
                    self.head(ex, 200, &[BINARY])?;
                    if !ex.head_only {
                        write_pattern(&mut self.writer, n)?;
                    }
                } else {
                    self.head(ex, 200, &[BINARY, ("transfer-encoding", "chunked")])?;
                    if !ex.head_only {
                        write_pattern_chunked(&mut self.writer, n)?;
                    }
                }
                (200, n as usize)
            }
            Route::Close(n) => {
                ex.keep_alive = false;
                self.head(ex, 200, &[BINARY])?;
                if !ex.head_only {
                    write_pattern(&mut self.writer, n)?;
                }
                (200, n as usize)
            }
            Route::Slow(ms) => {
                thread::sleep(Duration::from_millis(ms));
                self.simple(ex, 200, &[TEXT], b"slow\n")?
            }
            Route::Trickle(n, delay) => {
                let len = n.to_string();
                self.head(ex, 200, &[BINARY, ("content-length", &len)])?;
                if !ex.head_only {
                    for i in 0..n {
                        let byte = PATTERN[(i % PATTERN_LEN as u64) as usize];
                        self.writer.write_all(&[byte])?;
                        if i + 1 < n {
                            thread::sleep(delay);
                        }
                    }
                }
                (200, n as usize)
            }
            Route::Status(code) => {
                let text = format!("status {code}\n");
                match code {
                    100..=199 => {
                        // An interim response cannot end the exchange: send
                        // it (never to HTTP/1.0, RFC 9110 §15.2), then a 200.
                        if !ex.http10 {
                            let interim = format!("HTTP/1.1 {code} {}\r\n\r\n", reason(code));
                            self.writer.write_all(interim.as_bytes())?;
                        }
                        let (_, sent) = self.simple(ex, 200, &[TEXT], text.as_bytes())?;
                        (code, sent)
                    }
                    204 | 304 => {
                        self.head(ex, code, &[])?;
                        (code, 0)
                    }
                    205 => self.simple(ex, code, &[], b"")?,
                    _ => self.simple(ex, code, &[TEXT], text.as_bytes())?,
                }
            }
            Route::Headers => self.simple(ex, 200, &[TEXT], &req.raw)?,
            Route::BadResponse => {
                ex.keep_alive = false;
                self.writer.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
                )?;
                (200, 5)
            }
            Route::ResetMid(n) => {
                // Half of the promised body, then an RST: a backend dying mid-response.
                let len = n.to_string();
                self.head(ex, 200, &[BINARY, ("content-length", &len)])?;
                if !ex.head_only {
                    write_pattern(&mut self.writer, n / 2)?;
                }
                // Let the half body leave before the RST discards the send queue.
                self.writer.flush()?;
                thread::sleep(Duration::from_millis(200));
                ex.reset = true;
                (200, (n / 2) as usize)
            }
            Route::BigHeaders(n) => {
                // Filler fields of up to 1 KiB each until about `n` bytes of head.
                let n = n.min(4 * 1024 * 1024) as usize;
                let mut names = Vec::new();
                let mut total = 0;
                while total < n {
                    let value = "f".repeat((n - total).clamp(1, 1000));
                    let name = format!("x-filler-{}", names.len());
                    total += name.len() + value.len() + 4;
                    names.push((name, value));
                }
                let mut fields: Vec<(&str, &str)> = vec![TEXT];
                fields.extend(names.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                self.simple(ex, 200, &fields, b"big headers\n")?
            }
            Route::NotFound => self.simple(ex, 404, &[TEXT], b"not found\n")?,
            Route::BadParam(why) => self.simple(ex, 400, &[TEXT], format!("{why}\n").as_bytes())?,
            // Handled before the body is read.
            Route::Reset => (0, 0),
        };
        self.writer.flush()?;
        Ok((status, sent))
    }

    /// Writes a status line and header fields, plus `connection` as needed.
    fn head(&mut self, ex: &Exchange, status: u16, fields: &[(&str, &str)]) -> io::Result<()> {
        let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
        for (name, value) in fields {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        if !ex.keep_alive {
            head.push_str("connection: close\r\n");
        } else if ex.http10 {
            head.push_str("connection: keep-alive\r\n");
        }
        head.push_str("\r\n");
        self.writer.write_all(head.as_bytes())
    }

    /// Writes a complete response whose body is `body`, with content-length.
    fn simple(
        &mut self,
        ex: &Exchange,
        status: u16,
        fields: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<(u16, usize)> {
        let len = body.len().to_string();
        let mut all = fields.to_vec();
        all.push(("content-length", &len));
        self.head(ex, status, &all)?;
        if !ex.head_only {
            self.writer.write_all(body)?;
        }
        Ok((status, body.len()))
    }

    /// Answers a request that could not be accepted; the caller closes.
    fn reject(&mut self, status: u16, why: &str) -> io::Result<()> {
        let ex = Exchange {
            http10: false,
            head_only: false,
            keep_alive: false,
            reset: false,
        };
        self.simple(
            &ex,
            status,
            &[("content-type", "text/plain")],
            format!("{why}\n").as_bytes(),
        )?;
        self.writer.flush()
    }

    /// Half-closes, then reads (and drops) what the peer still sends for a
    /// moment so that closing does not turn into an RST that could destroy
    /// the response before the peer has read it.
    fn lingering_close(&mut self) {
        let _ = self.writer.flush();
        let _ = self.writer.shutdown(Shutdown::Write);
        let stream = self.reader.get_mut();
        let deadline = Instant::now() + LINGER_TIME;
        let mut buf = [0u8; 16 * 1024];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            let now = Instant::now();
            if now >= deadline || stream.set_read_timeout(Some(deadline - now)).is_err() {
                break;
            }
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    }

    /// Makes the coming close send an RST instead of a FIN.
    fn reset(&mut self) {
        use nix::sys::socket::{setsockopt, sockopt::Linger};
        let linger = nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let _ = setsockopt(&self.writer, Linger, &linger);
    }

    fn log(&self, method: &str, target: &str, status: u16, bytes: usize) {
        if !self.quiet {
            if status == 0 {
                eprintln!("{} \"{method} {target}\" reset", self.peer);
            } else {
                eprintln!("{} \"{method} {target}\" {status} {bytes}", self.peer);
            }
        }
    }
}

/// Reads one line, up to and including `\n`, appending it to `buf`, whose
/// total size may not exceed `limit`. `Ok(false)` means EOF before the
/// first byte of the line; EOF inside the line is an I/O failure.
fn read_line<R: BufRead>(r: &mut R, buf: &mut Vec<u8>, limit: usize) -> Result<bool, Fail> {
    let start = buf.len();
    loop {
        let available = match r.fill_buf() {
            Ok(available) => available,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(Fail::Io),
        };
        if available.is_empty() {
            return if buf.len() == start {
                Ok(false)
            } else {
                Err(Fail::Io)
            };
        }
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if buf.len().saturating_add(take) > limit {
            return Err(Fail::Reject(400, "line or header section too long"));
        }
        buf.extend_from_slice(&available[..take]);
        r.consume(take);
        if done {
            return Ok(true);
        }
    }
}

/// Reads a request head up to and including its empty line. `Ok(None)`
/// means the peer closed cleanly before sending anything.
fn read_head<R: BufRead>(r: &mut R) -> Result<Option<Vec<u8>>, Fail> {
    let mut head = Vec::with_capacity(1024);
    let mut empty_lines = 0;
    loop {
        let start = head.len();
        if !read_line(r, &mut head, MAX_HEAD)? {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(Fail::Io)
            };
        }
        let line = &head[start..];
        if line == b"\r\n" || line == b"\n" {
            if start > 0 {
                return Ok(Some(head));
            }
            // Empty lines before the request line are ignored (RFC 9112 §2.2).
            head.clear();
            empty_lines += 1;
            if empty_lines > MAX_LEADING_EMPTY_LINES {
                return Err(Fail::Reject(400, "too many empty lines"));
            }
        }
    }
}

fn parse_request(raw: Vec<u8>) -> Result<Request, Fail> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    match parsed.parse(&raw) {
        Ok(httparse::Status::Complete(n)) if n == raw.len() => {}
        Ok(_) => return Err(Fail::Reject(400, "malformed request head")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Fail::Reject(400, "too many header fields"))
        }
        Err(_) => return Err(Fail::Reject(400, "malformed request head")),
    }
    let (Some(method), Some(target), Some(minor)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err(Fail::Reject(400, "malformed request line"));
    };
    let method = method.to_string();
    let target = target.to_string();
    let headers = parsed
        .headers
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    let req = Request {
        raw,
        method,
        target,
        minor,
        headers,
    };
    // HTTP/1.1 requests carry exactly one Host (RFC 9112 §3.2).
    if req.minor >= 1 && req.values("host").count() != 1 {
        return Err(Fail::Reject(400, "HTTP/1.1 request needs exactly one host"));
    }
    Ok(req)
}

/// Works out the request body framing (RFC 9112 §6), refusing anything
/// ambiguous since a proxy that produces it is broken.
fn request_framing(req: &Request) -> Result<Framing, Fail> {
    if req.has("transfer-encoding") {
        if req.minor == 0 {
            return Err(Fail::Reject(
                400,
                "transfer-encoding in an HTTP/1.0 request",
            ));
        }
        if req.has("content-length") {
            return Err(Fail::Reject(
                400,
                "both transfer-encoding and content-length",
            ));
        }
        let codings = req.tokens("transfer-encoding");
        let Some((last, rest)) = codings.split_last() else {
            return Err(Fail::Reject(400, "empty transfer-encoding"));
        };
        if last != "chunked" || rest.iter().any(|c| c == "chunked") {
            return Err(Fail::Reject(
                400,
                "transfer-encoding must end with one chunked",
            ));
        }
        if !rest.is_empty() {
            return Err(Fail::Reject(501, "unsupported transfer coding"));
        }
        return Ok(Framing::Chunked);
    }
    let mut length = None;
    for value in req.values("content-length") {
        for item in value.split(|&b| b == b',') {
            let item = item.trim_ascii();
            let n = parse_decimal(item).ok_or(Fail::Reject(400, "bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Fail::Reject(400, "conflicting content-lengths"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => Framing::Length(n),
        None if req.has("content-length") => return Err(Fail::Reject(400, "bad content-length")),
        None => Framing::Empty,
    })
}

/// Reads the body, handing each piece of it to `sink`; returns its size.
fn read_body<R: BufRead>(
    r: &mut R,
    framing: &Framing,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), Fail>,
) -> Result<u64, Fail> {
    match framing {
        Framing::Empty => Ok(0),
        Framing::Length(n) => {
            copy_exact(r, *n, sink)?;
            Ok(*n)
        }
        Framing::Chunked => read_chunked(r, sink),
    }
}

/// Passes exactly `n` bytes from `r` to `sink`.
fn copy_exact<R: BufRead>(
    r: &mut R,
    n: u64,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), Fail>,
) -> Result<(), Fail> {
    let mut left = n;
    while left > 0 {
        let available = match r.fill_buf() {
            Ok(available) => available,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(Fail::Io),
        };
        if available.is_empty() {
            return Err(Fail::Io);
        }
        let take = available
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        sink(&available[..take])?;
        r.consume(take);
        left -= take as u64;
    }
    Ok(())
}

/// Decodes a chunked body (RFC 9112 §7.1), trailer section included.
fn read_chunked<R: BufRead>(
    r: &mut R,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), Fail>,
) -> Result<u64, Fail> {
    let mut total: u64 = 0;
    let mut line = Vec::new();
    loop {
        line.clear();
        if !read_line(r, &mut line, MAX_CHUNK_LINE)? {
            return Err(Fail::Io);
        }
        let size = parse_chunk_size(&line)?;
        if size == 0 {
            break;
        }
        copy_exact(r, size, sink)?;
        total = total
            .checked_add(size)
            .ok_or(Fail::Reject(400, "chunked body too large"))?;
        let mut crlf = Vec::with_capacity(2);
        copy_exact(r, 2, &mut |b: &[u8]| {
            crlf.extend_from_slice(b);
            Ok(())
        })?;
        if crlf != b"\r\n" {
            return Err(Fail::Reject(400, "chunk data not followed by CRLF"));
        }
    }

    let mut trailers = Vec::new();
    loop {
        let start = trailers.len();
        if !read_line(r, &mut trailers, MAX_TRAILERS)? {
            return Err(Fail::Io);
        }
        match &trailers[start..] {
            b"\r\n" => break,
            b"\n" => return Err(Fail::Reject(400, "bare LF in chunked body")),
            _ => {}
        }
    }
    if trailers.len() > 2 {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::parse_headers(&trailers, &mut fields) {
            Ok(httparse::Status::Complete((n, _))) if n == trailers.len() => {}
            _ => return Err(Fail::Reject(400, "malformed trailer section")),
        }
    }
    Ok(total)
}

/// Parses `chunk-size [ chunk-ext ] CRLF`; extensions are ignored.
fn parse_chunk_size(line: &[u8]) -> Result<u64, Fail> {
    let bad = Fail::Reject(400, "malformed chunk-size line");
    let Some(line) = line.strip_suffix(b"\r\n") else {
        return Err(bad);
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(bad);
    }
    let (hex, ext) = line.split_at(digits);
    let mut size: u64 = 0;
    for &b in hex {
        let digit = u64::from(char::from(b).to_digit(16).unwrap_or(0));
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(digit))
            .ok_or(Fail::Reject(400, "chunk size too large"))?;
    }
    // chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] )
    let ext_start = ext.iter().position(|&b| b != b' ' && b != b'\t');
    let well_formed = match ext_start {
        None => ext.is_empty(),
        Some(i) => ext[i] == b';',
    };
    let controls = ext.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f);
    if !well_formed || controls {
        return Err(bad);
    }
    Ok(size)
}

/// Parses `1*DIGIT` without sign or whitespace.
fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// The path of an origin-form or absolute-form request-target, without
/// query or fragment.
fn request_path(target: &str) -> Option<&str> {
    let path = if target.starts_with('/') || target == "*" {
        target
    } else {
        let scheme_len = ["http://", "https://"].iter().find_map(|scheme| {
            let prefix = target.get(..scheme.len())?;
            prefix.eq_ignore_ascii_case(scheme).then_some(scheme.len())
        })?;
        let rest = target.get(scheme_len..)?;
        let path_start = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        rest.get(path_start..)?
    };
    let path = match path.find(['?', '#']) {
        Some(end) => path.get(..end)?,
        None => path,
    };
    Some(if path.is_empty() { "/" } else { path })
}

fn route(path: &str) -> Route {
    let number = |s: &str, make: fn(u64) -> Route| match parse_decimal(s.as_bytes()) {
        Some(n) => make(n),
        None => Route::BadParam("expected a decimal number"),
    };
    match path {
        "/" => Route::Hello,
        "/echo" => Route::Echo,
        "/sink" => Route::Sink,
        "/headers" => Route::Headers,
        "/reset" => Route::Reset,
        "/badresponse" => Route::BadResponse,
        _ => {
            if let Some(n) = path.strip_prefix("/bytes/") {
                number(n, Route::Bytes)
            } else if let Some(n) = path.strip_prefix("/chunked/") {
                number(n, Route::Chunked)
            } else if let Some(n) = path.strip_prefix("/close/") {
                number(n, Route::Close)
            } else if let Some(n) = path.strip_prefix("/slow/") {
                number(n, Route::Slow)
            } else if let Some(n) = path.strip_prefix("/resetmid/") {
                number(n, Route::ResetMid)
            } else if let Some(n) = path.strip_prefix("/bigheaders/") {
                number(n, Route::BigHeaders)
            } else if let Some(n) = path.strip_prefix("/trickle/") {
                number(n, |n| Route::Trickle(n, TRICKLE_DELAY))
            } else if let Some(n) = path.strip_prefix("/drip/") {
                number(n, |n| Route::Trickle(n, DRIP_DELAY))
            } else if let Some(n) = path.strip_prefix("/status/") {
                match parse_decimal(n.as_bytes()) {
                    Some(code @ 100..=599) => Route::Status(code as u16),
                    _ => Route::BadParam("status must be 100..=599"),
                }
            } else {
                Route::NotFound
            }
        }
    }
}

/// Writes `len` pattern bytes in writes of up to [`WRITE_SIZE`].
fn write_pattern<W: Write>(w: &mut W, len: u64) -> io::Result<()> {
    let mut offset: u64 = 0;
    while offset < len {
        let piece = pattern_piece(offset, len, WRITE_SIZE);
        w.write_all(piece)?;
        offset += piece.len() as u64;
    }
    Ok(())
}

/// Writes `len` pattern bytes as chunks of up to [`CHUNK_SIZE`], then the
/// last chunk and an empty trailer section.
fn write_pattern_chunked<W: Write>(w: &mut W, len: u64) -> io::Result<()> {
    let mut frame = Vec::with_capacity(CHUNK_SIZE + 16);
    let mut offset: u64 = 0;
    while offset < len {
        let piece = pattern_piece(offset, len, CHUNK_SIZE);
        frame.clear();
        write!(frame, "{:x}\r\n", piece.len())?;
        frame.extend_from_slice(piece);
        frame.extend_from_slice(b"\r\n");
        w.write_all(&frame)?;
        offset += piece.len() as u64;
    }
    w.write_all(b"0\r\n\r\n")
}

/// The pattern bytes from `offset` on, at most `max` of them and not past
/// `len`.
fn pattern_piece(offset: u64, len: u64, max: usize) -> &'static [u8] {
    let start = (offset % PATTERN_LEN as u64) as usize;
    let left = usize::try_from(len.saturating_sub(offset)).unwrap_or(usize::MAX);
    let n = (PATTERN_LEN - start).min(max).min(left);
    &PATTERN[start..start + n]
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        102 => "Processing",
        103 => "Early Hints",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        418 => "I'm a teapot",
        421 => "Misdirected Request",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}
