//! HTTP/1.1 toward the backend, sans-IO: request head and chunked body
//! encoding, and an incremental response parser (RFC 9112), `httparse` for
//! the response head.

use crate::request::Request;
use std::net::{IpAddr, SocketAddr};

/// Largest response head accepted (status line and fields, 1xx included
/// one at a time).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in one response head.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line, extensions and CRLF included.
pub const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Largest trailer section of a chunked response (dropped, but bounded).
pub const MAX_TRAILER_BYTES: usize = 64 * 1024;

// ---------------------------------------------------------------------------
// Request encoding
// ---------------------------------------------------------------------------

/// How the request body is framed toward the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body: the HEADERS frame ended the stream.
    None,
    /// `content-length: n`; the caller sends exactly n bytes as they are.
    Length(u64),
    /// `transfer-encoding: chunked`; the caller wraps DATA with
    /// [`encode_chunk`] and ends with [`encode_last_chunk`].
    Chunked,
}

/// Body framing toward the backend: None if fin with headers; Length if
/// content-length known; else Chunked.
pub fn body_kind(req: &Request) -> BodyKind {
    if req.end_stream_with_headers {
        BodyKind::None
    } else if let Some(n) = req.content_length {
        BodyKind::Length(n)
    } else {
        BodyKind::Chunked
    }
}

fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.'
        | b'^' | b'_' | b'`' | b'|' | b'~'
        | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
}

/// Appends an RFC 7239 value: as a token if it is one, else quoted.
fn push_forwarded_value(out: &mut Vec<u8>, v: &[u8]) {
    if !v.is_empty() && v.iter().all(|&b| is_tchar(b)) {
        out.extend_from_slice(v);
        return;
    }
    out.push(b'"');
    for &b in v {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes "METHOD path HTTP/1.1\r\nhost: authority\r\n<headers>\r\n
/// x-forwarded-for: <client ip>\r\nforwarded: for=<client>;proto=https;
/// host=<authority>\r\n<framing header>\r\n\r\n".
///
/// * Existing `x-forwarded-for` fields are joined and appended to
///   (", ip"); existing `forwarded` fields likewise (comma-joined).
/// * The client address is canonicalised (an IPv4-mapped IPv6 address is
///   written as IPv4); the port is not written. In `forwarded`, IPv6 is
///   quoted `"[::1]"` and `host=` is quoted when the authority is not a
///   token (e.g. it has a port), per RFC 7239.
/// * Framing: `Length(n)` writes `content-length: n`, `Chunked` writes
///   `transfer-encoding: chunked`; `None` writes `content-length: 0` for
///   POST, PUT and PATCH or when the request carried a content-length
///   (RFC 9110 §8.6), and nothing otherwise.
/// * `host`, `content-length` and `transfer-encoding` in `req.headers`
///   (which `from_h3` never leaves there) are skipped, so that framing is
///   only ever what `body` says.
/// * Does NOT add `connection: keep-alive` (the 1.1 default).
pub fn encode_request_head(req: &Request, client: SocketAddr, body: &BodyKind, out: &mut Vec<u8>) {
    out.extend_from_slice(&req.method);
    out.push(b' ');
    out.extend_from_slice(&req.path);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    push_header(out, b"host", &req.authority);

    let mut xff: Vec<u8> = Vec::new();
    let mut fwd: Vec<u8> = Vec::new();
    for (name, value) in &req.headers {
        let joined = match name.as_slice() {
            b"x-forwarded-for" => &mut xff,
            b"forwarded" => &mut fwd,
            b"host" | b"content-length" | b"transfer-encoding" => continue,
            _ => {
                push_header(out, name, value);
                continue;
            }
        };
        if !joined.is_empty() {
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(value);
    }

    let ip = client.ip().to_canonical();
    let ip_text = ip.to_string();
    if !xff.is_empty() {
        xff.extend_from_slice(b", ");
    }
    xff.extend_from_slice(ip_text.as_bytes());
    push_header(out, b"x-forwarded-for", &xff);

    if !fwd.is_empty() {
        fwd.extend_from_slice(b", ");
    }
    fwd.extend_from_slice(b"for=");
    match ip {
        IpAddr::V4(_) => fwd.extend_from_slice(ip_text.as_bytes()),
        IpAddr::V6(_) => {
            fwd.extend_from_slice(b"\"[");
            fwd.extend_from_slice(ip_text.as_bytes());
            fwd.extend_from_slice(b"]\"");
        }
    }
    fwd.extend_from_slice(b";proto=https;host=");
    push_forwarded_value(&mut fwd, &req.authority);
    push_header(out, b"forwarded", &fwd);

    match *body {
        BodyKind::None => {
            if req.content_length.is_some()
                || matches!(req.method.as_slice(), b"POST" | b"PUT" | b"PATCH")
            {
                push_header(out, b"content-length", b"0");
            }
        }
        BodyKind::Length(n) => push_header(out, b"content-length", n.to_string().as_bytes()),
        BodyKind::Chunked => push_header(out, b"transfer-encoding", b"chunked"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends one chunk: hex size CRLF data CRLF. No-op for empty data (an
/// empty chunk would end the body).
pub fn encode_chunk(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends the last chunk with an empty trailer section: "0\r\n\r\n".
pub fn encode_last_chunk(out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n\r\n");
}

// ---------------------------------------------------------------------------
// Response parsing
// ---------------------------------------------------------------------------

/// The final (non-1xx) response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// 200..=599 (1xx are skipped, 101 is an error).
    pub status: u16,
    /// Lowercase names, values trimmed of surrounding whitespace, in order.
    /// Hop-by-hop fields removed: connection and the names it lists,
    /// keep-alive, proxy-connection, transfer-encoding, upgrade, te,
    /// trailer. `content-length` is kept.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// The connection may be reused once this response has ended.
    pub keep_alive: bool,
    /// How the body is delimited.
    pub body: ResponseBody,
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    /// No body: HEAD request, 204 or 304.
    Empty,
    /// Exactly n bytes (n may be 0).
    Length(u64),
    /// Chunked transfer coding (decoded by the parser).
    Chunked,
    /// Delimited by the backend closing the connection.
    UntilClose,
}

/// A response the proxy cannot relay; the caller answers 502 and does not
/// reuse the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseError {
    Malformed(&'static str),
    TooLarge,
    UnexpectedEof,
}

impl std::fmt::Display for ResponseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResponseError::Malformed(m) => write!(f, "malformed response: {m}"),
            ResponseError::TooLarge => f.write_str("response head or trailers too large"),
            ResponseError::UnexpectedEof => f.write_str("backend closed mid-response"),
        }
    }
}

impl std::error::Error for ResponseError {}

/// What one call to [`ResponseParser::parse`] found.
#[derive(Debug)]
pub enum Parsed<'a> {
    /// The final response head (exactly once, first).
    Head(ResponseHead),
    /// Decoded body bytes, never empty, borrowed from the input.
    Body(&'a [u8]),
    /// The response is complete.
    End,
    /// Nothing more can be done with this input: read more.
    NeedMore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    UntilClose,
    Done,
}

/// Incremental HTTP/1.1 response parser; one per response.
#[derive(Debug, Clone)]
pub struct ResponseParser {
    head_request: bool,
    state: State,
    trailer_bytes: usize,
    /// Bytes at the start of the pending head known to hold no end of head
    /// ("\n\r\n" or "\n\n"), so that a head trickling in is not
    /// re-parsed on every call.
    head_scanned: usize,
}

fn malformed<T>(why: &'static str) -> Result<T, ResponseError> {
    Err(ResponseError::Malformed(why))
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Comma-separated list elements, trimmed, empty ones dropped.
fn list_elements(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',')
        .map(trim_ows)
        .filter(|e| !e.is_empty())
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

/// Finds the line at the start of `buf`, searching at most `limit` bytes.
/// Ok(Some((line without CRLF, bytes including CRLF))); Ok(None) if no LF
/// within what is there. A bare LF is an error.
fn take_line(buf: &[u8], limit: usize) -> Result<Option<(&[u8], usize)>, ResponseError> {
    let window = buf.get(..limit).unwrap_or(buf);
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    match window.get(..lf) {
        Some([line @ .., b'\r']) => Ok(Some((line, lf + 1))),
        _ => malformed("line not ended by CRLF"),
    }
}

fn hex_value(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    }
}

/// chunk-size [ BWS ";" ext... ] (extensions ignored), CRLF already removed.
fn parse_chunk_size(line: &[u8]) -> Result<u64, ResponseError> {
    if line.iter().any(|&b| (b < b' ' && b != b'\t') || b == 0x7f) {
        return malformed("control character in chunk-size line");
    }
    let digits = line.iter().take_while(|&&b| hex_value(b).is_some()).count();
    if digits == 0 {
        return malformed("missing chunk size");
    }
    let mut size: u64 = 0;
    for &b in line.get(..digits).unwrap_or(&[]) {
        let d = hex_value(b).unwrap_or(0);
        size = match size.checked_mul(16).and_then(|s| s.checked_add(d)) {
            Some(s) => s,
            None => return malformed("chunk size overflow"),
        };
    }
    let after = line.get(digits..).unwrap_or(&[]);
    let after = trim_ows_start(after);
    match after.first() {
        None | Some(b';') => Ok(size),
        Some(_) => malformed("invalid chunk-size line"),
    }
}

fn trim_ows_start(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    s
}

fn check_trailer_line(line: &[u8]) -> Result<(), ResponseError> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return malformed("obs-fold in trailers");
    }
    if line.iter().any(|&b| (b < b' ' && b != b'\t') || b == 0x7f) {
        return malformed("control character in trailer");
    }
    let name_len = line.iter().take_while(|&&b| is_tchar(b)).count();
    if name_len == 0 || line.get(name_len) != Some(&b':') {
        return malformed("invalid trailer field");
    }
    Ok(())
}

fn head_error(e: httparse::Error) -> ResponseError {
    match e {
        httparse::Error::TooManyHeaders => ResponseError::TooLarge,
        httparse::Error::Version => ResponseError::Malformed("unsupported HTTP version"),
        httparse::Error::Status => ResponseError::Malformed("invalid status line"),
        httparse::Error::HeaderName => {
            ResponseError::Malformed("invalid header name (or obs-fold)")
        }
        httparse::Error::HeaderValue => ResponseError::Malformed("invalid header value"),
        _ => ResponseError::Malformed("invalid response head"),
    }
}

/// One parsed head: a final one, or an interim (1xx) one to skip.
enum HeadOutcome {
    Interim,
    Final(ResponseHead),
}

impl ResponseParser {
    /// `head_request`: the request was HEAD, so the response has no body
    /// whatever its fields say.
    pub fn new(head_request: bool) -> Self {
        ResponseParser {
            head_request,
            state: State::Head,
            trailer_bytes: 0,
            head_scanned: 0,
        }
    }

    /// Parses from the start of `buf` (the caller's unconsumed input) and
    /// returns how many bytes were consumed and what was found.
    ///
    /// The caller removes `consumed` bytes from its input after EVERY call,
    /// NeedMore included (skipped 1xx responses, chunk-size lines and
    /// trailers are consumed without anything to show), then calls again
    /// until NeedMore, when it reads more from the backend. Body slices
    /// borrow from `buf` and are never empty.
    ///
    /// After End, further calls return `Ok((0, Parsed::End))`; bytes after
    /// the response are the caller's (it should then not reuse the
    /// connection if any arrived). After an error the parser must not be
    /// used again (it keeps returning errors or NeedMore, never panics).
    pub fn parse<'a>(&mut self, buf: &'a [u8]) -> Result<(usize, Parsed<'a>), ResponseError> {
        let mut pos = 0usize;
        loop {
            let rest = buf.get(pos..).unwrap_or(&[]);
            match self.state {
                State::Done => return Ok((pos, Parsed::End)),
                State::Head => {
                    let Some((n, outcome)) = self.parse_head(rest)? else {
                        return Ok((pos, Parsed::NeedMore));
                    };
                    pos += n;
                    self.head_scanned = 0;
                    if let HeadOutcome::Final(head) = outcome {
                        self.state = match head.body {
                            ResponseBody::Empty | ResponseBody::Length(0) => State::Done,
                            ResponseBody::Length(n) => State::Length(n),
                            ResponseBody::Chunked => State::ChunkSize,
                            ResponseBody::UntilClose => State::UntilClose,
                        };
                        return Ok((pos, Parsed::Head(head)));
                    }
                }
                State::Length(remaining) | State::ChunkData(remaining) => {
                    if rest.is_empty() {
                        return Ok((pos, Parsed::NeedMore));
                    }
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(rest.len());
                    let data = rest.get(..take).unwrap_or(&[]);
                    let left = remaining - take as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), n) => State::Length(n),
                        (_, 0) => State::ChunkDataEnd,
                        (_, n) => State::ChunkData(n),
                    };
                    return Ok((pos + take, Parsed::Body(data)));
                }
                State::UntilClose => {
                    if rest.is_empty() {
                        return Ok((pos, Parsed::NeedMore));
                    }
                    return Ok((pos + rest.len(), Parsed::Body(rest)));
                }
                State::ChunkSize => {
                    let Some((line, n)) = take_line(rest, MAX_CHUNK_LINE)? else {
                        if rest.len() >= MAX_CHUNK_LINE {
                            return malformed("chunk-size line too long");
                        }
                        return Ok((pos, Parsed::NeedMore));
                    };
                    let size = parse_chunk_size(line)?;
                    pos += n;
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::ChunkDataEnd => match rest {
                    [b'\r', b'\n', ..] => {
                        pos += 2;
                        self.state = State::ChunkSize;
                    }
                    [] | [b'\r'] => return Ok((pos, Parsed::NeedMore)),
                    _ => return malformed("chunk data not followed by CRLF"),
                },
                State::Trailers => {
                    let budget = MAX_TRAILER_BYTES.saturating_sub(self.trailer_bytes);
                    let Some((line, n)) = take_line(rest, budget)? else {
                        if rest.len() >= budget {
                            return Err(ResponseError::TooLarge);
                        }
                        return Ok((pos, Parsed::NeedMore));
                    };
                    pos += n;
                    if line.is_empty() {
                        self.state = State::Done;
                        return Ok((pos, Parsed::End));
                    }
                    check_trailer_line(line)?;
                    self.trailer_bytes += n;
                }
            }
        }
    }

    /// The backend closed the connection: Ok(End) if the body was
    /// UntilClose (or the response had already ended), Err(UnexpectedEof)
    /// otherwise.
    pub fn on_eof(&mut self) -> Result<Parsed<'static>, ResponseError> {
        match self.state {
            State::UntilClose | State::Done => {
                self.state = State::Done;
                Ok(Parsed::End)
            }
            _ => Err(ResponseError::UnexpectedEof),
        }
    }

    /// The whole response has been parsed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Parses one head at the start of `buf`: None if incomplete.
    fn parse_head(&mut self, buf: &[u8]) -> Result<Option<(usize, HeadOutcome)>, ResponseError> {
        let window = buf.get(..MAX_HEAD_BYTES).unwrap_or(buf);
        // Only hand the head to httparse once it may be complete.
        let from = self.head_scanned.saturating_sub(2);
        let unseen = window.get(from..).unwrap_or(&[]);
        let may_be_complete = unseen
            .windows(2)
            .enumerate()
            .any(|(i, w)| w == b"\n\n" || (w == b"\n\r" && unseen.get(i + 2) == Some(&b'\n')));
        if !may_be_complete {
            self.head_scanned = window.len();
            if window.len() >= MAX_HEAD_BYTES {
                return Err(ResponseError::TooLarge);
            }
            return Ok(None);
        }
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut slots);
        let n = match resp.parse(window).map_err(head_error)? {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => {
                self.head_scanned = window.len();
                if window.len() >= MAX_HEAD_BYTES {
                    return Err(ResponseError::TooLarge);
                }
                return Ok(None);
            }
        };
        let version = match resp.version {
            Some(v @ (0 | 1)) => v,
            _ => return malformed("unsupported HTTP version"),
        };
        let status = match resp.code {
            Some(c @ 100..=599) => c,
            _ => return malformed("status code out of range"),
        };
        if status == 101 {
            return malformed("unexpected 101 Switching Protocols");
        }
        if status < 200 {
            return Ok(Some((n, HeadOutcome::Interim)));
        }

        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(resp.headers.len());
        let mut content_length: Option<u64> = None;
        let mut transfer_encoding: Vec<&[u8]> = Vec::new();
        let mut te_seen = false;
        let mut close = false;
        let mut keep_alive_token = false;
        let mut connection_names: Vec<Vec<u8>> = Vec::new();

        for h in resp.headers.iter() {
            let name = h.name.as_bytes().to_ascii_lowercase();
            let value = trim_ows(h.value);
            if value.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)) {
                return malformed("CR, LF or NUL in header value");
            }
            match name.as_slice() {
                b"content-length" => {
                    for e in value.split(|&b| b == b',').map(trim_ows) {
                        let Some(v) = parse_decimal(e) else {
                            return malformed("invalid content-length");
                        };
                        if content_length.is_some_and(|c| c != v) {
                            return malformed("differing content-length values");
                        }
                        content_length = Some(v);
                    }
                }
                b"transfer-encoding" => {
                    te_seen = true;
                    transfer_encoding.extend(list_elements(value));
                    continue;
                }
                b"connection" => {
                    for token in list_elements(value) {
                        let token = token.to_ascii_lowercase();
                        match token.as_slice() {
                            b"close" => close = true,
                            b"keep-alive" => keep_alive_token = true,
                            _ => {}
                        }
                        connection_names.push(token);
                    }
                    continue;
                }
                b"keep-alive" | b"proxy-connection" | b"upgrade" | b"te" | b"trailer" => continue,
                _ => {}
            }
            headers.push((name, value.to_vec()));
        }
        if !connection_names.is_empty() {
            headers.retain(|(name, _)| !connection_names.contains(name));
        }

        let mut chunked = false;
        if te_seen {
            if version == 0 {
                return malformed("transfer-encoding in an HTTP/1.0 response");
            }
            if content_length.is_some() {
                return malformed("both content-length and transfer-encoding");
            }
            match transfer_encoding.as_slice() {
                [coding] if coding.eq_ignore_ascii_case(b"chunked") => chunked = true,
                _ => return malformed("transfer-encoding other than chunked alone"),
            }
        }

        let body = if self.head_request || status == 204 || status == 304 {
            ResponseBody::Empty
        } else if chunked {
            ResponseBody::Chunked
        } else if let Some(len) = content_length {
            ResponseBody::Length(len)
        } else {
            ResponseBody::UntilClose
        };
        let keep_alive =
            body != ResponseBody::UntilClose && !close && (version == 1 || keep_alive_token);

        Ok(Some((
            n,
            HeadOutcome::Final(ResponseHead {
                status,
                headers,
                keep_alive,
                body,
            }),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        cl: Option<u64>,
        fin: bool,
    ) -> Request {
        Request {
            method: method.as_bytes().to_vec(),
            scheme: b"https".to_vec(),
            authority: b"example.com".to_vec(),
            path: path.as_bytes().to_vec(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
            content_length: cl,
            end_stream_with_headers: fin,
        }
    }

    fn head_of(req: &Request, client: &str) -> String {
        let mut out = Vec::new();
        encode_request_head(req, client.parse().unwrap(), &body_kind(req), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn encode_get() {
        let req = request(
            "GET",
            "/a?b=c",
            &[("accept", "*/*"), ("cookie", "a=1; b=2")],
            None,
            true,
        );
        assert_eq!(body_kind(&req), BodyKind::None);
        assert_eq!(
            head_of(&req, "192.0.2.7:4433"),
            "GET /a?b=c HTTP/1.1\r\n\
             host: example.com\r\n\
             accept: */*\r\n\
             cookie: a=1; b=2\r\n\
             x-forwarded-for: 192.0.2.7\r\n\
             forwarded: for=192.0.2.7;proto=https;host=example.com\r\n\
             \r\n"
        );
    }

    #[test]
    fn encode_chunked_post() {
        let mut req = request(
            "POST",
            "/upload",
            &[
                ("content-type", "text/plain"),
                ("x-forwarded-for", "203.0.113.1"),
                ("forwarded", "for=203.0.113.1"),
            ],
            None,
            false,
        );
        req.authority = b"example.com:8443".to_vec();
        assert_eq!(body_kind(&req), BodyKind::Chunked);
        let mut out = head_of(&req, "192.0.2.7:4433").into_bytes();
        encode_chunk(b"hello world, this is 27 b..", &mut out);
        encode_chunk(b"", &mut out);
        encode_chunk(b"!", &mut out);
        encode_last_chunk(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /upload HTTP/1.1\r\n\
             host: example.com:8443\r\n\
             content-type: text/plain\r\n\
             x-forwarded-for: 203.0.113.1, 192.0.2.7\r\n\
             forwarded: for=203.0.113.1, for=192.0.2.7;proto=https;host=\"example.com:8443\"\r\n\
             transfer-encoding: chunked\r\n\
             \r\n\
             1b\r\nhello world, this is 27 b..\r\n\
             1\r\n!\r\n\
             0\r\n\r\n"
        );
    }

    #[test]
    fn encode_ipv6_client_and_length() {
        let req = request("PUT", "/x", &[], Some(5), false);
        assert_eq!(body_kind(&req), BodyKind::Length(5));
        assert_eq!(
            head_of(&req, "[2001:db8::1]:443"),
            "PUT /x HTTP/1.1\r\n\
             host: example.com\r\n\
             x-forwarded-for: 2001:db8::1\r\n\
             forwarded: for=\"[2001:db8::1]\";proto=https;host=example.com\r\n\
             content-length: 5\r\n\
             \r\n"
        );
        // IPv4-mapped IPv6 is written as IPv4.
        let get = request("GET", "/", &[], None, true);
        assert!(head_of(&get, "[::ffff:192.0.2.9]:1")
            .contains("x-forwarded-for: 192.0.2.9\r\nforwarded: for=192.0.2.9;"));
    }

    #[test]
    fn encode_empty_post() {
        let req = request("POST", "/", &[], None, true);
        assert!(head_of(&req, "127.0.0.1:1").ends_with("content-length: 0\r\n\r\n"));
        let req = request("POST", "/", &[], Some(0), false);
        assert_eq!(body_kind(&req), BodyKind::Length(0));
        assert!(head_of(&req, "127.0.0.1:1").ends_with("content-length: 0\r\n\r\n"));
    }

    // --- response parser -------------------------------------------------

    #[derive(Debug, Default)]
    struct Outcome {
        head: Option<ResponseHead>,
        body: Vec<u8>,
        end: bool,
        err: Option<ResponseError>,
        leftover: usize,
    }

    /// Runs the parser over `buf` until NeedMore, End or an error, draining
    /// consumed bytes. Returns true when finished (End or error).
    fn pump(p: &mut ResponseParser, buf: &mut Vec<u8>, out: &mut Outcome) -> bool {
        // Every non-NeedMore step consumes or ends, so this bounds the loop.
        for _ in 0..(buf.len() + 3) {
            let (n, parsed) = match p.parse(buf) {
                Ok(r) => r,
                Err(e) => {
                    out.err = Some(e);
                    return true;
                }
            };
            assert!(n <= buf.len(), "consumed more than given");
            let finished = match parsed {
                Parsed::Head(h) => {
                    assert!(out.head.is_none(), "two heads");
                    assert!(n > 0);
                    out.head = Some(h);
                    None
                }
                Parsed::Body(b) => {
                    assert!(!b.is_empty() && b.len() <= n);
                    assert!(out.head.is_some(), "body before head");
                    out.body.extend_from_slice(b);
                    None
                }
                Parsed::End => Some(true),
                Parsed::NeedMore => Some(false),
            };
            buf.drain(..n);
            if let Some(end) = finished {
                out.end = end;
                if end {
                    out.leftover = buf.len();
                    assert!(p.is_done());
                    assert!(matches!(p.parse(buf), Ok((0, Parsed::End))));
                }
                return end;
            }
        }
        panic!("parser did not settle");
    }

    /// Feeds `input` in the given pieces, then signals EOF if `eof`.
    fn feed(head: bool, pieces: &[&[u8]], eof: bool) -> Outcome {
        let mut p = ResponseParser::new(head);
        let mut buf = Vec::new();
        let mut out = Outcome::default();
        for piece in pieces {
            buf.extend_from_slice(piece);
            if pump(&mut p, &mut buf, &mut out) {
                return out;
            }
        }
        if eof {
            match p.on_eof() {
                Ok(Parsed::End) => out.end = true,
                Ok(other) => panic!("on_eof gave {other:?}"),
                Err(e) => out.err = Some(e),
            }
        }
        out
    }

    fn all(input: &[u8]) -> Outcome {
        feed(false, &[input], false)
    }

    fn bytewise(input: &[u8]) -> Outcome {
        let pieces: Vec<&[u8]> = input.chunks(1).collect();
        feed(false, &pieces, false)
    }

    fn assert_splits_agree(input: &[u8], body: &[u8]) {
        let whole = all(input);
        assert!(whole.end && whole.err.is_none(), "{whole:?}");
        assert_eq!(whole.body, body);
        let one = bytewise(input);
        assert!(one.end && one.err.is_none(), "{one:?}");
        assert_eq!(one.body, body);
        assert_eq!(one.head, whole.head);
        for split in 0..=input.len() {
            let (a, b) = input.split_at(split);
            let o = feed(false, &[a, b], false);
            assert!(o.end && o.err.is_none(), "split {split}: {o:?}");
            assert_eq!(o.body, body, "split {split}");
            assert_eq!(o.head, whole.head, "split {split}");
        }
    }

    fn err_of(input: &[u8]) -> ResponseError {
        let o = all(input);
        let e = o.err.clone().unwrap_or_else(|| panic!("no error: {o:?}"));
        // Byte-at-a-time feeding finds the same error.
        assert_eq!(bytewise(input).err, Some(e.clone()));
        e
    }

    fn is_malformed(input: &[u8]) {
        let e = err_of(input);
        assert!(matches!(e, ResponseError::Malformed(_)), "{e:?}");
    }

    const CL_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\n\
        Content-Type: text/plain\r\n\
        Content-Length: 11\r\n\
        Connection: x-hop\r\n\
        X-Hop: 1\r\n\
        Keep-Alive: timeout=5\r\n\
        \r\n\
        hello world";

    #[test]
    fn content_length_every_split() {
        assert_splits_agree(CL_RESPONSE, b"hello world");
        let o = all(CL_RESPONSE);
        let head = o.head.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.body, ResponseBody::Length(11));
        assert!(head.keep_alive);
        assert_eq!(
            head.headers,
            vec![
                (b"content-type".to_vec(), b"text/plain".to_vec()),
                (b"content-length".to_vec(), b"11".to_vec()),
            ]
        );
    }

    #[test]
    fn length_body_stops_at_remaining() {
        let mut input = CL_RESPONSE.to_vec();
        input.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let o = all(&input);
        assert!(o.end);
        assert_eq!(o.body, b"hello world");
        assert_eq!(o.leftover, 17);
    }

    const CHUNKED_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\n\
        Transfer-Encoding: chunked\r\n\
        Trailer: x-checksum\r\n\
        \r\n\
        5;name=value;other\r\nhello\r\n\
        1 ; ext\r\n \r\n\
        00000000000000000006\r\nworld!\r\n\
        0;last\r\n\
        X-Checksum: abc\r\n\
        X-Other: d\r\n\
        \r\n";

    #[test]
    fn chunked_every_split() {
        assert_splits_agree(CHUNKED_RESPONSE, b"hello world!");
        let head = all(CHUNKED_RESPONSE).head.unwrap();
        assert_eq!(head.body, ResponseBody::Chunked);
        assert!(head.keep_alive);
        assert!(head.headers.is_empty(), "{:?}", head.headers);
        let mut with_next = CHUNKED_RESPONSE.to_vec();
        with_next.extend_from_slice(b"xyz");
        assert_eq!(all(&with_next).leftover, 3);
    }

    #[test]
    fn continue_then_ok() {
        let input = b"HTTP/1.1 100 Continue\r\n\r\n\
            HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
            HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok";
        assert_splits_agree(input, b"ok");
        assert_eq!(all(input).head.unwrap().status, 201);
    }

    #[test]
    fn bare_lf_head() {
        assert_splits_agree(b"HTTP/1.1 200 OK\nContent-Length: 1\n\nx", b"x");
        assert_splits_agree(b"\r\nHTTP/1.1 204 No Content\r\n\r\n", b"");
    }

    #[test]
    fn switching_protocols_is_malformed() {
        is_malformed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n");
    }

    #[test]
    fn head_request_with_content_length() {
        let input = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n";
        let o = feed(true, &[input], false);
        assert!(o.end && o.err.is_none());
        let head = o.head.unwrap();
        assert_eq!(head.body, ResponseBody::Empty);
        assert!(head.keep_alive);
        assert_eq!(
            head.headers,
            vec![(b"content-length".to_vec(), b"1234".to_vec())]
        );
    }

    #[test]
    fn no_content_and_not_modified() {
        for input in [
            &b"HTTP/1.1 204 No Content\r\n\r\n"[..],
            &b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"[..],
        ] {
            let o = all(input);
            assert!(o.end && o.body.is_empty() && o.leftover == 0, "{o:?}");
            assert_eq!(o.head.unwrap().body, ResponseBody::Empty);
        }
    }

    #[test]
    fn zero_length_body() {
        let o = all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert!(o.end);
        assert_eq!(o.head.unwrap().body, ResponseBody::Length(0));
    }

    #[test]
    fn close_delimited() {
        let input = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nsome body";
        let o = feed(false, &[&input[..40], &input[40..]], true);
        assert!(o.end && o.err.is_none(), "{o:?}");
        assert_eq!(o.body, b"some body");
        let head = o.head.unwrap();
        assert_eq!(head.body, ResponseBody::UntilClose);
        assert!(!head.keep_alive);
        // Without the EOF it is not over.
        let o = feed(false, &[input], false);
        assert!(!o.end);
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |s: &[u8]| all(s).head.unwrap().keep_alive;
        assert!(ka(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!ka(
            b"HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!ka(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(ka(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
        ));
        let o = feed(false, &[b"HTTP/1.0 200 OK\r\n\r\nabc"], true);
        assert_eq!(o.body, b"abc");
        assert!(!o.head.unwrap().keep_alive);
    }

    #[test]
    fn content_length_and_transfer_encoding() {
        is_malformed(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        );
    }

    #[test]
    fn bad_transfer_encodings() {
        is_malformed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n");
        is_malformed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        is_malformed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n");
        is_malformed(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        is_malformed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\n\r\n");
        is_malformed(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    }

    #[test]
    fn content_lengths() {
        is_malformed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n");
        is_malformed(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n");
        is_malformed(b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n");
        is_malformed(b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n");
        is_malformed(b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551616\r\n\r\n");
        let o = all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3, 3\r\n\r\nabc");
        assert!(o.end);
        assert_eq!(o.body, b"abc");
    }

    #[test]
    fn bad_header_values() {
        is_malformed(b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n");
        is_malformed(b"HTTP/1.1 200 OK\r\nX-A: a\0b\r\nContent-Length: 0\r\n\r\n");
    }

    #[test]
    fn obs_fold() {
        is_malformed(b"HTTP/1.1 200 OK\r\nX-A: a\r\n  b\r\nContent-Length: 0\r\n\r\n");
        is_malformed(b"HTTP/1.1 200 OK\r\nX-A: a\r\n\tb\r\nContent-Length: 0\r\n\r\n");
    }

    #[test]
    fn oversize_head() {
        let mut input = b"HTTP/1.1 200 OK\r\n".to_vec();
        while input.len() <= MAX_HEAD_BYTES {
            input
                .extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        // Incomplete: no end of head yet; all at once and byte by byte.
        assert_eq!(err_of(&input), ResponseError::TooLarge);
        let mut p = ResponseParser::new(false);
        assert_eq!(p.parse(&input).unwrap_err(), ResponseError::TooLarge);
        // One huge field.
        let mut big = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
        big.resize(MAX_HEAD_BYTES + 10, b'a');
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(all(&big).err, Some(ResponseError::TooLarge));
    }

    #[test]
    fn too_many_headers() {
        let mut input = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            input.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        let mut ok = input.clone();
        ok.extend_from_slice(b"\r\n");
        assert!(all(&ok).head.is_some());
        input.extend_from_slice(b"X-One-Too-Many: v\r\n\r\n");
        assert_eq!(all(&input).err, Some(ResponseError::TooLarge));
    }

    #[test]
    fn truncated_chunked_then_eof() {
        let cut = CHUNKED_RESPONSE.len() - 10;
        let o = feed(false, &[&CHUNKED_RESPONSE[..cut]], true);
        assert_eq!(o.err, Some(ResponseError::UnexpectedEof));
        assert_eq!(o.body, b"hello world!");
        // Truncated length body too, and nothing at all.
        let o = feed(false, &[&CL_RESPONSE[..CL_RESPONSE.len() - 1]], true);
        assert_eq!(o.err, Some(ResponseError::UnexpectedEof));
        let o = feed(false, &[], true);
        assert_eq!(o.err, Some(ResponseError::UnexpectedEof));
    }

    #[test]
    fn eof_after_end_is_fine() {
        let mut p = ResponseParser::new(false);
        let input = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert!(matches!(p.parse(input), Ok((n, Parsed::Head(_))) if n == input.len()));
        assert!(matches!(p.parse(&[]), Ok((0, Parsed::End))));
        assert!(matches!(p.on_eof(), Ok(Parsed::End)));
        assert!(p.is_done());
    }

    #[test]
    fn bad_status_lines() {
        is_malformed(b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n");
        is_malformed(b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n");
        is_malformed(b"HTTP/1.1 099 Low\r\n\r\n");
        is_malformed(b"HTTP/1.1 600 High\r\n\r\n");
        is_malformed(b"HTTP/1.1 20 OK\r\n\r\n");
        is_malformed(b"garbage\r\n\r\n");
    }

    #[test]
    fn bad_chunk_framing() {
        let h = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let with = |tail: &[u8]| {
            let mut v = h.clone();
            v.extend_from_slice(tail);
            v
        };
        is_malformed(&with(b"g\r\n"));
        is_malformed(&with(b"\r\n"));
        is_malformed(&with(b"5x\r\nhello\r\n0\r\n\r\n"));
        is_malformed(&with(b"5\nhello\r\n0\r\n\r\n"));
        is_malformed(&with(b"5\r\nhelloXX0\r\n\r\n"));
        is_malformed(&with(b"5\r\nhello\r\n0\r\n  folded\r\n\r\n"));
        is_malformed(&with(b"5\r\nhello\r\n0\r\nno-colon\r\n\r\n"));
        // 17 significant hex digits overflow u64.
        is_malformed(&with(b"10000000000000000\r\n"));
        // A size line longer than 4 KiB.
        let mut long = b"1;".to_vec();
        long.resize(MAX_CHUNK_LINE + 1, b'a');
        is_malformed(&with(&long));
        // Oversized trailers.
        let mut tr = b"0\r\n".to_vec();
        while tr.len() <= MAX_TRAILER_BYTES {
            tr.extend_from_slice(
                b"X-T: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        assert_eq!(all(&with(&tr)).err, Some(ResponseError::TooLarge));
    }

    #[test]
    fn huge_chunk_is_streamed() {
        let mut input =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n".to_vec();
        input.extend_from_slice(&[b'z'; 100]);
        let o = feed(false, &[&input], true);
        assert_eq!(o.body.len(), 100);
        assert_eq!(o.err, Some(ResponseError::UnexpectedEof));
    }

    /// Deterministic LCG (Knuth MMIX constants).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn below(&mut self, n: usize) -> usize {
            if n == 0 {
                0
            } else {
                (self.next() % n as u64) as usize
            }
        }
    }

    #[test]
    fn fuzz_mutations_terminate_without_panic() {
        let seeds: [&[u8]; 6] = [
            CL_RESPONSE,
            CHUNKED_RESPONSE,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\nuntil close",
            b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n",
        ];
        let interesting: &[u8] = b"\r\n:;, \t0fF\x00\x7f9";
        let mut rng = Lcg(0x5eed);
        let mut ended = 0;
        for iter in 0..4000 {
            let mut input = seeds[iter % seeds.len()].to_vec();
            for _ in 0..=rng.below(4) {
                let at = rng.below(input.len() + 1);
                match rng.below(6) {
                    0 if at < input.len() => input[at] = rng.next() as u8,
                    1 if at < input.len() => input[at] = interesting[rng.below(interesting.len())],
                    2 => input.insert(at, interesting[rng.below(interesting.len())]),
                    3 if at < input.len() => {
                        input.remove(at);
                    }
                    4 => input.truncate(at),
                    _ => {
                        let from = rng.below(input.len() + 1);
                        let len = rng.below(input.len() - from + 1);
                        let dup = input[from..from + len].to_vec();
                        input.splice(at..at, dup);
                    }
                }
            }
            // Random piece sizes, random HEAD flag, EOF at the end.
            let mut pieces = Vec::new();
            let mut rest: &[u8] = &input;
            while !rest.is_empty() {
                let n = 1 + rng.below(rest.len().min(16));
                let (a, b) = rest.split_at(n);
                pieces.push(a);
                rest = b;
            }
            let o = feed(rng.below(4) == 0, &pieces, true);
            if o.end {
                ended += 1;
                if let Some(ResponseBody::Length(n)) = o.head.as_ref().map(|h| h.body) {
                    assert_eq!(o.body.len() as u64, n);
                }
            }
        }
        assert!(ended > 100, "mutations too destructive: {ended}");
    }
}
