//! Validation of an HTTP/3 request header section (RFC 9114 §4.1.2, §4.2,
//! §4.3.1; RFC 9110) and its mapping to a request to be proxied over
//! HTTP/1.1.
//!
//! Sans-IO: the caller decodes the QPACK field section and hands the list of
//! `(name, value)` pairs to [`from_h3`], in order.

/// At most this many fields (pseudo-header fields included) per request.
pub const MAX_FIELDS: usize = 200;
/// At most this many bytes of field names plus values per request.
pub const MAX_FIELD_BYTES: usize = 64 * 1024;

/// A validated request, ready to be encoded toward the backend.
#[derive(Debug, Clone)]
pub struct Request {
    /// `:method`, a token.
    pub method: Vec<u8>,
    /// `:scheme`, `http` or `https` (as sent, compared case-insensitively).
    pub scheme: Vec<u8>,
    /// From `:authority`, or from `Host` if `:authority` is absent. Never
    /// empty, never holds userinfo.
    pub authority: Vec<u8>,
    /// `:path`: starts with `/`, or is `*` for OPTIONS. Holds no SP, CTL,
    /// DEL, non-ASCII byte or `#`, so it is safe to put into a request line.
    pub path: Vec<u8>,
    /// Regular fields in order, lowercase names. Pseudo-header fields,
    /// connection-specific fields, `te`, `host` and `content-length` are
    /// removed (the encoder writes `host` and the framing header itself).
    /// Several `cookie` fields are joined with "; " into the first one.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// The `content-length` value, if the request had one.
    pub content_length: Option<u64>,
    /// The HEADERS frame carried FIN: the request has no body.
    pub end_stream_with_headers: bool,
}

/// Why a request header section was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Malformed per RFC 9114 §4.1.2: reset the stream with H3_MESSAGE_ERROR.
    Malformed(&'static str),
    /// Well-formed HTTP/3 but unacceptable: answer 400.
    BadRequest(&'static str),
    /// A feature this proxy does not offer (CONNECT): answer 501.
    NotImplemented(&'static str),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Malformed(m) => write!(f, "malformed request: {m}"),
            RequestError::BadRequest(m) => write!(f, "bad request: {m}"),
            RequestError::NotImplemented(m) => write!(f, "not implemented: {m}"),
        }
    }
}

impl std::error::Error for RequestError {}

use RequestError::{BadRequest, Malformed, NotImplemented};

/// `tchar` of RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.'
        | b'^' | b'_' | b'`' | b'|' | b'~'
        | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// Bytes allowed in an authority (RFC 3986 §3.2: unreserved, pct-encoded,
/// sub-delims, ":" and the brackets of an IP literal). `@` is handled apart.
fn is_authority_char(b: u8) -> bool {
    matches!(b,
        b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9'
        | b'-' | b'.' | b'_' | b'~' | b'%'
        | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
        | b':' | b'[' | b']')
}

fn check_name(name: &[u8]) -> Result<(), RequestError> {
    if name.is_empty() {
        return Err(Malformed("empty field name"));
    }
    if name.iter().any(|b| b.is_ascii_uppercase()) {
        return Err(Malformed("uppercase character in field name"));
    }
    if !name.iter().all(|&b| is_tchar(b)) {
        return Err(Malformed("invalid character in field name"));
    }
    Ok(())
}

fn check_value(value: &[u8]) -> Result<(), RequestError> {
    if value.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(Malformed("CR, LF or NUL in field value"));
    }
    let ws = |b: &u8| matches!(*b, b' ' | b'\t');
    if value.first().is_some_and(ws) || value.last().is_some_and(ws) {
        return Err(Malformed("leading or trailing whitespace in field value"));
    }
    // Other CTLs are not malformed HTTP/3 (§4.1.2 names only CR, LF and NUL), but they are
    // invalid field values that HTTP/1.1 parsers refuse or read differently (RFC 9110 §5.5: only
    // kept where no downstream parser sees them, and the backend is one).
    if value.iter().any(|&b| (b < b' ' && b != b'\t') || b == 0x7f) {
        return Err(BadRequest("control character in field value"));
    }
    Ok(())
}

/// A Content-Length value: `1*DIGIT`, or a comma list of identical ones
/// (RFC 9110 §8.6).
fn parse_content_length(value: &[u8]) -> Result<u64, RequestError> {
    let mut result: Option<u64> = None;
    for part in value.split(|&b| b == b',') {
        let part = trim_ows(part);
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return Err(Malformed("invalid content-length"));
        }
        let mut n: u64 = 0;
        for &d in part {
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(d - b'0')))
                .ok_or(Malformed("invalid content-length"))?;
        }
        match result {
            Some(prev) if prev != n => return Err(Malformed("differing content-length values")),
            _ => result = Some(n),
        }
    }
    result.ok_or(Malformed("invalid content-length"))
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

/// Validates an HTTP/3 request header section, in wire order, and maps it to
/// a [`Request`]. `fin` tells whether the HEADERS frame ended the stream.
pub fn from_h3<'a>(
    fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    fin: bool,
) -> Result<Request, RequestError> {
    let mut method: Option<&[u8]> = None;
    let mut scheme: Option<&[u8]> = None;
    let mut authority: Option<&[u8]> = None;
    let mut path: Option<&[u8]> = None;
    let mut host: Option<&[u8]> = None;
    let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut cookie_index: Option<usize> = None;
    let mut content_length: Option<u64> = None;
    let mut regular_seen = false;
    let mut count = 0usize;
    let mut total = 0usize;

    for (name, value) in fields {
        count += 1;
        total = total.saturating_add(name.len()).saturating_add(value.len());
        if count > MAX_FIELDS {
            return Err(BadRequest("too many header fields"));
        }
        if total > MAX_FIELD_BYTES {
            return Err(BadRequest("header section too large"));
        }
        check_value(value)?;

        if let Some(pseudo) = name.strip_prefix(b":") {
            if regular_seen {
                return Err(Malformed("pseudo-header field after regular field"));
            }
            let slot = match pseudo {
                b"method" => &mut method,
                b"scheme" => &mut scheme,
                b"authority" => &mut authority,
                b"path" => &mut path,
                _ => return Err(Malformed("unknown pseudo-header field")),
            };
            if slot.is_some() {
                return Err(Malformed("duplicate pseudo-header field"));
            }
            *slot = Some(value);
            continue;
        }

        regular_seen = true;
        check_name(name)?;
        match name {
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => return Err(Malformed("connection-specific field")),
            b"te" => {
                if !value.eq_ignore_ascii_case(b"trailers") {
                    return Err(Malformed("te field with a value other than trailers"));
                }
            }
            b"host" => {
                if host.is_some() {
                    return Err(BadRequest("more than one host field"));
                }
                host = Some(value);
            }
            b"content-length" => {
                let n = parse_content_length(value)?;
                if content_length.is_some_and(|prev| prev != n) {
                    return Err(Malformed("differing content-length values"));
                }
                content_length = Some(n);
            }
            b"cookie" => {
                if value.is_empty() {
                    continue;
                }
                match cookie_index.and_then(|i| headers.get_mut(i)) {
                    Some((_, joined)) => {
                        joined.extend_from_slice(b"; ");
                        joined.extend_from_slice(value);
                    }
                    None => {
                        cookie_index = Some(headers.len());
                        headers.push((name.to_vec(), value.to_vec()));
                    }
                }
            }
            _ => headers.push((name.to_vec(), value.to_vec())),
        }
    }

    let method = method.ok_or(Malformed("missing :method"))?;
    if !is_token(method) {
        return Err(Malformed(":method is not a token"));
    }
    if method == b"CONNECT" {
        return Err(NotImplemented("CONNECT"));
    }
    let scheme = scheme.ok_or(Malformed("missing :scheme"))?;
    let path = path.ok_or(Malformed("missing :path"))?;
    if path.is_empty() {
        return Err(Malformed("empty :path"));
    }
    let scheme_ok = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return Err(Malformed("invalid :scheme"));
    }
    if !scheme.eq_ignore_ascii_case(b"https") && !scheme.eq_ignore_ascii_case(b"http") {
        return Err(BadRequest("unsupported :scheme"));
    }

    // http and https have a mandatory authority (RFC 9114 §4.3.1).
    let authority = match (authority, host) {
        (Some(a), Some(h)) => {
            if !a.eq_ignore_ascii_case(h) {
                return Err(Malformed(":authority and host differ"));
            }
            a
        }
        (Some(a), None) => a,
        (None, Some(h)) => h,
        (None, None) => return Err(Malformed("missing :authority and host")),
    };
    if authority.is_empty() {
        return Err(Malformed("empty :authority or host"));
    }
    if authority.contains(&b'@') {
        return Err(Malformed("userinfo in :authority"));
    }
    if !authority.iter().all(|&b| is_authority_char(b)) {
        return Err(BadRequest("invalid :authority"));
    }

    if path == b"*" {
        if method != b"OPTIONS" {
            return Err(BadRequest(
                "asterisk-form :path for a method other than OPTIONS",
            ));
        }
    } else if path.first() != Some(&b'/') {
        return Err(BadRequest(":path does not start with '/'"));
    }
    // A request-target is ASCII (RFC 9112 §3.2, RFC 3986 §2); clients percent-encode the rest.
    if path.iter().any(|&b| b <= b' ' || b >= 0x7f || b == b'#') {
        return Err(BadRequest("invalid character in :path"));
    }

    if fin && content_length.is_some_and(|n| n > 0) {
        return Err(Malformed("content-length > 0 on a request without body"));
    }

    Ok(Request {
        method: method.to_vec(),
        scheme: scheme.to_vec(),
        authority: authority.to_vec(),
        path: path.to_vec(),
        headers,
        content_length,
        end_stream_with_headers: fin,
    })
}

/// GET, HEAD and OPTIONS: safe and idempotent (RFC 9110 §9.2), so forwarding one from 0-RTT
/// early data, which an attacker may replay, changes nothing at the origin (RFC 8470 §3).
pub fn is_safe_method(method: &[u8]) -> bool {
    matches!(method, b"GET" | b"HEAD" | b"OPTIONS")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(fields: &[(&str, &str)], fin: bool) -> Result<Request, RequestError> {
        from_h3(
            fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
            fin,
        )
    }

    const BASE: [(&str, &str); 4] = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "example.com"),
        (":path", "/index.html"),
    ];

    /// The base request plus `extra` regular fields after it.
    fn with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        BASE.iter().copied().chain(extra.iter().copied()).collect()
    }

    fn malformed(r: Result<Request, RequestError>) {
        assert!(
            matches!(r, Err(RequestError::Malformed(_))),
            "expected Malformed, got {r:?}"
        );
    }

    fn bad_request(r: Result<Request, RequestError>) {
        assert!(
            matches!(r, Err(RequestError::BadRequest(_))),
            "expected BadRequest, got {r:?}"
        );
    }

    #[test]
    fn valid_get() {
        let r = parse(&with(&[("accept", "*/*"), ("te", "trailers")]), true).unwrap();
        assert_eq!(r.method, b"GET");
        assert_eq!(r.scheme, b"https");
        assert_eq!(r.authority, b"example.com");
        assert_eq!(r.path, b"/index.html");
        assert_eq!(r.headers, vec![(b"accept".to_vec(), b"*/*".to_vec())]);
        assert_eq!(r.content_length, None);
        assert!(r.end_stream_with_headers);
    }

    #[test]
    fn pseudo_after_regular() {
        malformed(parse(
            &[
                (":method", "GET"),
                (":scheme", "https"),
                ("accept", "*/*"),
                (":authority", "example.com"),
                (":path", "/"),
            ],
            true,
        ));
    }

    #[test]
    fn unknown_pseudo() {
        let mut f = BASE.to_vec();
        f.push((":protocol", "websocket"));
        malformed(parse(&f, true));
        let mut f = BASE.to_vec();
        f.push((":status", "200"));
        malformed(parse(&f, true));
        let mut f = BASE.to_vec();
        f.push((":", "x"));
        malformed(parse(&f, true));
    }

    #[test]
    fn duplicate_pseudo() {
        let mut f = BASE.to_vec();
        f.push((":path", "/other"));
        malformed(parse(&f, true));
    }

    #[test]
    fn missing_method() {
        malformed(parse(
            &[(":scheme", "https"), (":authority", "a"), (":path", "/")],
            true,
        ));
    }

    #[test]
    fn missing_scheme() {
        malformed(parse(
            &[(":method", "GET"), (":authority", "a"), (":path", "/")],
            true,
        ));
    }

    #[test]
    fn missing_path() {
        malformed(parse(
            &[
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "a"),
            ],
            true,
        ));
    }

    #[test]
    fn empty_path() {
        malformed(parse(
            &[
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "a"),
                (":path", ""),
            ],
            true,
        ));
    }

    #[test]
    fn uppercase_name() {
        malformed(parse(&with(&[("Accept", "*/*")]), true));
    }

    #[test]
    fn non_tchar_name() {
        malformed(parse(&with(&[("acc ept", "x")]), true));
        malformed(parse(&with(&[("acc:ept", "x")]), true));
        malformed(parse(&with(&[("", "x")]), true));
    }

    #[test]
    fn value_with_cr_lf_nul() {
        malformed(parse(&with(&[("x-a", "a\rb")]), true));
        malformed(parse(&with(&[("x-a", "a\nb")]), true));
        malformed(parse(&with(&[("x-a", "a\0b")]), true));
        // Pseudo-header values too.
        malformed(parse(
            &[
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "a"),
                (":path", "/a\r\nx: y"),
            ],
            true,
        ));
    }

    /// Found by the h3_request fuzz target: a value with \x05 was forwarded, and the head it
    /// produced is one HTTP/1.1 parsers (httparse among them) refuse.
    #[test]
    fn value_with_other_control_characters() {
        for v in ["a\x05b", "a\x0bb", "a\x1fb", "a\x7fb"] {
            bad_request(parse(&with(&[("x-a", v)]), true));
        }
        // HTAB inside a value and obs-text are fine.
        assert!(parse(&with(&[("x-a", "a\tb")]), true).is_ok());
        assert!(parse(&with(&[("x-a", "caf\u{e9}")]), true).is_ok());
    }

    /// Found by the h3_request fuzz target: a raw non-ASCII byte in :path was forwarded into
    /// the request line, which is ASCII only (httparse refuses it; other parsers guess).
    #[test]
    fn non_ascii_path() {
        let mut f = BASE.to_vec();
        f[3] = (":path", "/caf\u{e9}");
        bad_request(parse(&f, true));
        f[3] = (":path", "/caf%C3%A9");
        assert!(parse(&f, true).is_ok());
    }

    #[test]
    fn value_with_surrounding_whitespace() {
        malformed(parse(&with(&[("x-a", " a")]), true));
        malformed(parse(&with(&[("x-a", "a\t")]), true));
        // Inner whitespace is fine.
        assert!(parse(&with(&[("x-a", "a b")]), true).is_ok());
    }

    #[test]
    fn connection_specific_fields() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "upgrade",
        ] {
            malformed(parse(&with(&[(name, "x")]), true));
        }
    }

    #[test]
    fn te_other_than_trailers() {
        malformed(parse(&with(&[("te", "gzip")]), true));
        malformed(parse(&with(&[("te", "trailers, gzip")]), true));
        let r = parse(&with(&[("te", "trailers")]), true).unwrap();
        assert!(r.headers.is_empty());
    }

    #[test]
    fn authority_and_host_differ() {
        malformed(parse(&with(&[("host", "other.com")]), true));
        // Same value (case aside) is fine, and host is removed.
        let r = parse(&with(&[("host", "Example.com")]), true).unwrap();
        assert_eq!(r.authority, b"example.com");
        assert!(r.headers.is_empty());
    }

    #[test]
    fn host_used_when_authority_absent() {
        let r = parse(
            &[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
                ("host", "h.example:8443"),
            ],
            true,
        )
        .unwrap();
        assert_eq!(r.authority, b"h.example:8443");
        assert!(r.headers.is_empty());
    }

    #[test]
    fn missing_or_empty_authority() {
        malformed(parse(
            &[(":method", "GET"), (":scheme", "https"), (":path", "/")],
            true,
        ));
        malformed(parse(
            &[
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", ""),
                (":path", "/"),
            ],
            true,
        ));
    }

    #[test]
    fn userinfo_in_authority() {
        malformed(parse(
            &[
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "user@example.com"),
                (":path", "/"),
            ],
            true,
        ));
    }

    #[test]
    fn invalid_authority_chars() {
        bad_request(parse(
            &[
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "exa mple.com"),
                (":path", "/"),
            ],
            true,
        ));
    }

    #[test]
    fn multiple_host_fields() {
        bad_request(parse(
            &[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
                ("host", "a"),
                ("host", "a"),
            ],
            true,
        ));
    }

    #[test]
    fn invalid_content_length() {
        malformed(parse(&with(&[("content-length", "abc")]), false));
        malformed(parse(&with(&[("content-length", "-1")]), false));
        malformed(parse(&with(&[("content-length", "")]), false));
        malformed(parse(&with(&[("content-length", "1,")]), false));
        malformed(parse(
            &with(&[("content-length", "99999999999999999999999")]),
            false,
        ));
    }

    #[test]
    fn differing_content_lengths() {
        malformed(parse(
            &with(&[("content-length", "5"), ("content-length", "6")]),
            false,
        ));
        malformed(parse(&with(&[("content-length", "5, 6")]), false));
        let r = parse(
            &with(&[("content-length", "5"), ("content-length", "5, 5")]),
            false,
        )
        .unwrap();
        assert_eq!(r.content_length, Some(5));
        // The encoder writes the framing header itself.
        assert!(r.headers.is_empty());
    }

    #[test]
    fn connect_not_implemented() {
        assert_eq!(
            parse(&[(":method", "CONNECT"), (":authority", "a:443")], true).unwrap_err(),
            RequestError::NotImplemented("CONNECT")
        );
    }

    #[test]
    fn safe_methods_for_early_data() {
        for m in ["GET", "HEAD", "OPTIONS"] {
            assert!(is_safe_method(m.as_bytes()), "{m}");
        }
        for m in ["POST", "PUT", "DELETE", "PATCH", "CONNECT", "get", "TRACE"] {
            assert!(!is_safe_method(m.as_bytes()), "{m}");
        }
    }

    #[test]
    fn method_not_token() {
        malformed(parse(
            &[
                (":method", "G(T"),
                (":scheme", "https"),
                (":authority", "a"),
                (":path", "/"),
            ],
            true,
        ));
        malformed(parse(
            &[
                (":method", ""),
                (":scheme", "https"),
                (":authority", "a"),
                (":path", "/"),
            ],
            true,
        ));
    }

    #[test]
    fn path_form() {
        let req = |m: &'static str, p: &'static str| {
            parse(
                &[
                    (":method", m),
                    (":scheme", "https"),
                    (":authority", "a"),
                    (":path", p),
                ],
                true,
            )
        };
        bad_request(req("GET", "index.html"));
        bad_request(req("GET", "http://a/"));
        bad_request(req("GET", "*"));
        bad_request(req("GET", "/a b"));
        bad_request(req("GET", "/a#frag"));
        bad_request(req("GET", "/a\x7f"));
        assert_eq!(req("OPTIONS", "*").unwrap().path, b"*");
        assert!(req("GET", "/a?b=c%20d").is_ok());
    }

    #[test]
    fn invalid_or_unsupported_scheme() {
        let req = |s: &'static str| {
            parse(
                &[
                    (":method", "GET"),
                    (":scheme", s),
                    (":authority", "a"),
                    (":path", "/"),
                ],
                true,
            )
        };
        malformed(req(""));
        malformed(req("1http"));
        bad_request(req("ftp"));
        assert!(req("http").is_ok());
    }

    #[test]
    fn fin_with_nonzero_content_length() {
        malformed(parse(&with(&[("content-length", "3")]), true));
        let r = parse(&with(&[("content-length", "0")]), true).unwrap();
        assert_eq!(r.content_length, Some(0));
        let r = parse(&with(&[("content-length", "3")]), false).unwrap();
        assert_eq!(r.content_length, Some(3));
        assert!(!r.end_stream_with_headers);
    }

    #[test]
    fn too_many_fields() {
        let mut f = BASE.to_vec();
        for _ in 0..(MAX_FIELDS - BASE.len()) {
            f.push(("x-a", "b"));
        }
        assert!(parse(&f, true).is_ok());
        f.push(("x-a", "b"));
        bad_request(parse(&f, true));
    }

    #[test]
    fn too_many_field_bytes() {
        let big = "v".repeat(MAX_FIELD_BYTES);
        bad_request(parse(&with(&[("x-big", &big)]), true));
        let fits = "v".repeat(MAX_FIELD_BYTES - 200);
        assert!(parse(&with(&[("x-big", &fits)]), true).is_ok());
    }

    #[test]
    fn cookies_joined() {
        let r = parse(
            &with(&[
                ("cookie", "a=1"),
                ("accept", "*/*"),
                ("cookie", "b=2"),
                ("cookie", "c=3"),
            ]),
            true,
        )
        .unwrap();
        assert_eq!(
            r.headers,
            vec![
                (b"cookie".to_vec(), b"a=1; b=2; c=3".to_vec()),
                (b"accept".to_vec(), b"*/*".to_vec()),
            ]
        );
    }
}
