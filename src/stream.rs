//! One request's life: HTTP/3 HEADERS in, a backend connection assigned, the request and its body
//! written as HTTP/1.1, the response parsed and sent back as HTTP/3, the stream removed.
//!
//! Phases (forward only): `Waiting` (no backend connection yet or connecting) → `Forwarding`
//! (request going out, response coming back) → removed. A stream is always created in full before
//! anything can reject it, so a stream above the GOAWAY id is a complete entry that is then
//! refused (the HAProxy 3.0 `h3s->h3c` NULL crash class).

use std::net::SocketAddr;
use std::time::Instant;

use quiche::h3::{Header, NameValue};

use crate::budget::ChunkQueue;
use crate::core::{BackendKey, ConnKey, Core, StreamKey, Timer, ADMISSION_QUEUE};
use crate::frontend::{H3_INTERNAL_ERROR, H3_MESSAGE_ERROR, H3_NO_ERROR, H3_REQUEST_REJECTED};
use crate::http1::{self, BodyKind, Parsed, ResponseParser};
use crate::request::{self, RequestError};

pub struct Stream {
    pub(crate) conn: ConnKey,
    pub(crate) id: u64,
    pub(crate) backend: usize,
    pub(crate) bconn: Option<BackendKey>,
    /// Servers already tried for this request (connect failures move on to the next).
    pub(crate) tried: Vec<usize>,
    pub(crate) started: Instant,
    pub(crate) deadline: Option<Instant>,
    pub(crate) log: AccessLog,

    // Request direction.
    framing: BodyKind,
    /// The encoded head, kept while a body-less request may still be retried on a new
    /// connection (a pooled connection the origin closed under us).
    retry_head: Option<Vec<u8>>,
    /// Encoded request (head, framed body) waiting for the backend connection.
    pub(crate) to_backend: ChunkQueue,
    /// Bytes this stream may hold in each direction (`max-stream-buffer`).
    pub(crate) limit: usize,
    /// `wait-for-body` in progress: the request is held until enough body arrived.
    pub(crate) wait: Option<WaitBody>,
    /// Waiting in the admission queue for memory budget.
    pub(crate) queued: bool,
    /// When request body last arrived (a client still sending is not stalled).
    pub(crate) last_body_at: Option<Instant>,
    /// quiche has request body we have not read yet (its Data event fires only once until drained).
    body_readable: bool,
    req_body_bytes: u64,
    content_length: Option<u64>,
    /// The client's side is complete (FIN read, or we stopped reading it).
    req_fin: bool,

    // Response direction.
    parser: ResponseParser,
    /// Raw backend bytes not parsed yet (a partial head or chunk line), and the pool chunks
    /// charged for them.
    pub(crate) from_backend: Vec<u8>,
    pub(crate) from_chunks: usize,
    head: Option<(Vec<Header>, bool)>,
    pub(crate) head_sent: bool,
    body_out: ChunkQueue,
    resp_end: bool,
    fin_sent: bool,
    pub(crate) got_response_bytes: bool,
    pub(crate) backend_keepalive: bool,
}

/// A client that sent no body for this long when wait-for-body's time is up has stalled (408):
/// a quarter of the wait time, at most one second.
fn stall_after(time: std::time::Duration) -> std::time::Duration {
    (time / 4).min(std::time::Duration::from_secs(1))
}

/// State of `http-request wait-for-body` for one stream.
#[derive(Debug, Clone, Copy)]
pub struct WaitBody {
    /// Body bytes to hold before forwarding (or the whole body, if shorter).
    pub target: u64,
    /// Pool chunks reserved for the body still to come (taken in FIFO order at admission, so
    /// waiting streams never starve each other by each holding a part).
    pub reserved: usize,
    /// The pool ran dry while the client was still sending: answer 503, not 408.
    pub starved: bool,
    /// `wait-for-body time`: counted from admission, so time spent queued for budget (our
    /// doing, answered 503 if it runs out) never turns into a 408 for the client.
    pub time: std::time::Duration,
}

/// What the access log line needs.
#[derive(Default, Clone)]
pub struct AccessLog {
    pub client: Option<SocketAddr>,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub server: String,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Stream {
    /// Buffered response bytes the client has not taken yet.
    pub(crate) fn response_buffered(&self) -> usize {
        self.from_backend.len() + self.body_out.len()
    }
    /// Returns every chunk the stream holds to the pool.
    pub(crate) fn release_buffers(&mut self, pool: &mut crate::budget::Pool) {
        self.to_backend.clear(pool);
        self.body_out.clear(pool);
        pool.release(std::mem::take(&mut self.from_chunks));
        if let Some(w) = self.wait.as_mut() {
            pool.release(std::mem::take(&mut w.reserved));
        }
    }
    pub(crate) fn body_out_chunks(&self) -> usize {
        self.body_out.chunks()
    }
    pub(crate) fn response_complete(&self) -> bool {
        self.parser.is_done()
    }
    /// The backend closed its side: Ok if that completes the response (close-delimited body).
    pub(crate) fn parser_eof(&mut self) -> Result<(), ()> {
        match self.parser.on_eof() {
            Ok(Parsed::End) => {
                self.resp_end = true;
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(_) => Err(()),
        }
    }
    /// The whole request (head and body) has been handed to the backend connection.
    pub(crate) fn request_sent(&self) -> bool {
        self.req_fin && self.to_backend.is_empty() && !self.body_readable
    }
}

impl Core {
    pub(crate) fn on_request_headers(
        &mut self,
        now: Instant,
        ck: ConnKey,
        sid: u64,
        list: Vec<Header>,
        more_frames: bool,
    ) {
        let Some(c) = self.conns.get_mut(ck) else {
            return;
        };
        if !sid.is_multiple_of(4) {
            return; // only client-initiated bidirectional streams carry requests
        }
        if c.streams.contains_key(&sid) {
            // Trailers (a second HEADERS): HTTP/1.1 chunked trailers are not forwarded; the
            // body is complete once FIN arrives.
            return;
        }
        c.next_stream_id = c.next_stream_id.max(sid + 4);
        let above_goaway = c.goaway.is_some_and(|g| sid >= g);
        // Before the handshake completes, a request can only have come in 0-RTT (the client's
        // 1-RTT packets cannot be read yet), which an attacker may replay.
        let early = !c.q.is_established();
        debug_assert!(!early || c.q.is_in_early_data());
        let peer = c.peer;
        let frontend = c.frontend;
        let backend = self.frontend_backend.get(frontend).copied().unwrap_or(0);

        let stream = Stream {
            conn: ck,
            id: sid,
            backend,
            bconn: None,
            tried: Vec::new(),
            started: now,
            deadline: None,
            log: AccessLog {
                client: Some(peer),
                ..AccessLog::default()
            },
            framing: BodyKind::None,
            retry_head: None,
            to_backend: ChunkQueue::default(),
            limit: self.stream_limit(backend, frontend),
            wait: None,
            queued: false,
            last_body_at: None,
            body_readable: false,
            req_body_bytes: 0,
            content_length: None,
            req_fin: !more_frames,
            parser: ResponseParser::new(false),
            from_backend: Vec::new(),
            from_chunks: 0,
            head: None,
            head_sent: false,
            body_out: ChunkQueue::default(),
            resp_end: false,
            fin_sent: false,
            got_response_bytes: false,
            backend_keepalive: false,
        };
        let sk = match self.streams.insert(stream) {
            Ok(k) => k,
            Err(_) => {
                // Cannot happen while quiche's stream limit is below the table's capacity;
                // refuse rather than half-create.
                if let Some(c) = self.conns.get_mut(ck) {
                    let _ =
                        c.q.stream_shutdown(sid, quiche::Shutdown::Read, H3_REQUEST_REJECTED);
                    let _ =
                        c.q.stream_shutdown(sid, quiche::Shutdown::Write, H3_REQUEST_REJECTED);
                }
                return;
            }
        };
        if let Some(c) = self.conns.get_mut(ck) {
            c.streams.insert(sid, sk);
        }
        self.stats.streams_opened += 1;

        if above_goaway {
            // RFC 9114 §5.2: requests above the GOAWAY id are rejected and may be retried.
            self.stats.streams_rejected += 1;
            self.reset_stream(sk, H3_REQUEST_REJECTED);
            return;
        }

        let fields = list.iter().map(|h| (h.name(), h.value()));
        let mut req = match request::from_h3(fields, !more_frames) {
            Ok(r) => r,
            Err(RequestError::Malformed(why)) => {
                log::debug!("stream {sid}: malformed request: {why}");
                self.reset_stream(sk, H3_MESSAGE_ERROR);
                return;
            }
            Err(RequestError::BadRequest(why)) => {
                log::debug!("stream {sid}: bad request: {why}");
                self.respond_error(now, sk, 400, why);
                return;
            }
            Err(RequestError::NotImplemented(why)) => {
                self.respond_error(now, sk, 501, why);
                return;
            }
        };
        // RFC 8470: safe, idempotent requests are forwarded at once, marked so that the origin
        // may answer 425 Too Early; any other waits until the handshake proves the client live.
        let hold = early && !request::is_safe_method(&req.method);
        if early && !hold {
            self.stats.early_data_requests += 1;
            if !req.headers.iter().any(|(n, _)| n == b"early-data") {
                req.headers.push((b"early-data".to_vec(), b"1".to_vec()));
            }
        }
        let framing = http1::body_kind(&req);
        let mut head = Vec::with_capacity(512);
        http1::encode_request_head(&req, peer, &framing, &mut head);
        let is_head = req.method == b"HEAD";
        let Some(s) = self.streams.get_mut(sk) else {
            return;
        };
        s.log.method = lossy(&req.method);
        s.log.authority = lossy(&req.authority);
        s.log.path = lossy(&req.path);
        s.parser = ResponseParser::new(is_head);
        s.content_length = req.content_length;
        if matches!(framing, BodyKind::None) {
            s.retry_head = Some(head.clone());
        }
        s.framing = framing;
        log::debug!(
            "stream {sid}: {} {} {}",
            s.log.method,
            s.log.authority,
            s.log.path
        );
        // The head is small and already in memory: it is charged even past the budget.
        s.to_backend.push_forced(&mut self.pool, &head);
        let wait = if more_frames {
            self.wait_for_body(backend, frontend)
        } else {
            None
        };
        let need = wait
            .map(|w| self.wait_chunks(w, req.content_length))
            .unwrap_or(0);
        if let Some(w) = wait {
            if let Some(s) = self.streams.get_mut(sk) {
                s.wait = Some(WaitBody {
                    target: w.at_least.unwrap_or(s.limit as u64),
                    time: w.time,
                    reserved: 0,
                    starved: false,
                });
            }
        }
        if hold {
            self.stats.early_data_held += 1;
            log::debug!("stream {sid}: unsafe method in 0-RTT, waiting for the handshake");
            if let Some(s) = self.streams.get_mut(sk) {
                // Not admitted: its body stays in quiche (flow control) meanwhile.
                s.queued = true;
            }
            if let Some(c) = self.conns.get_mut(ck) {
                c.held.push((sk, need));
            }
            return;
        }
        self.admit_or_enqueue(now, sk, need);
    }

    /// Admission (issue #5): above the high-water mark, or when a wait-for-body reservation does
    /// not fit, the stream waits its turn in a bounded FIFO instead of taking memory.
    fn admit_or_enqueue(&mut self, now: Instant, sk: StreamKey, need: usize) {
        if self.admission.is_empty() && !self.pool.above_high_water() && self.pool.reserve(need) {
            self.admit(now, sk, need);
            return;
        }
        self.enqueue(now, sk, need);
    }

    /// The handshake completed: a request held since it arrived in 0-RTT goes on.
    pub(crate) fn release_held(&mut self, now: Instant, sk: StreamKey, need: usize) {
        let Some(s) = self.streams.get_mut(sk) else {
            return; // reset or answered meanwhile
        };
        if !s.queued || s.resp_end {
            return;
        }
        s.queued = false;
        log::debug!("stream {}: handshake complete, request released", s.id);
        self.admit_or_enqueue(now, sk, need);
        // Body that arrived while held was left unread.
        self.pump_request(now, sk);
    }

    /// Effective `max-stream-buffer` for a stream of this backend and frontend.
    fn stream_limit(&self, backend: usize, frontend: usize) -> usize {
        self.backends
            .get(backend)
            .and_then(|b| b.max_stream_buffer)
            .or_else(|| {
                self.frontends
                    .get(frontend)
                    .and_then(|f| f.max_stream_buffer)
            })
            .unwrap_or(crate::config::DEFAULT_MAX_STREAM_BUFFER)
    }

    fn wait_for_body(&self, backend: usize, frontend: usize) -> Option<crate::config::WaitForBody> {
        self.backends
            .get(backend)
            .and_then(|b| b.wait_for_body)
            .or_else(|| self.frontends.get(frontend).and_then(|f| f.wait_for_body))
    }

    /// Chunks a wait-for-body stream reserves: its target (or its whole declared body, if
    /// smaller) plus chunked-framing overhead.
    fn wait_chunks(&self, w: crate::config::WaitForBody, content_length: Option<u64>) -> usize {
        let chunk = self.pool.chunk_size() as u64;
        let mut target = w
            .at_least
            .unwrap_or(crate::config::DEFAULT_MAX_STREAM_BUFFER as u64);
        if let Some(cl) = content_length {
            target = target.min(cl);
        }
        (target.div_ceil(chunk) + 1) as usize
    }

    /// The stream got its memory: start reading its body (wait-for-body) or forward it now.
    fn admit(&mut self, now: Instant, sk: StreamKey, reserved: usize) {
        let Some(s) = self.streams.get_mut(sk) else {
            self.pool.release(reserved);
            return;
        };
        s.queued = false;
        match s.wait.as_mut() {
            Some(w) => {
                w.reserved = reserved;
                let at = now + w.time;
                self.set_stream_deadline(sk, Some(at));
                self.pump_request(now, sk);
                self.maybe_release_wait(now, sk);
            }
            None => {
                self.pool.release(reserved);
                self.assign_backend(now, sk);
            }
        }
    }

    fn enqueue(&mut self, now: Instant, sk: StreamKey, need: usize) {
        if self.admission.len() >= ADMISSION_QUEUE {
            self.stats.budget_refusals += 1;
            log::warn!("memory budget exhausted and admission queue full: answering 503");
            self.respond_error(now, sk, 503, "memory budget exhausted");
            return;
        }
        if let Some(s) = self.streams.get_mut(sk) {
            s.queued = true;
            // Queue timeout: the backend's `timeout connect` (waiting for memory is waiting to
            // reach the server).
            let t = self.backends.get(s.backend).map(|b| b.timeouts.connect);
            if let Some(t) = t {
                self.set_stream_deadline(sk, Some(now + t));
            }
        }
        self.stats.budget_queued += 1;
        self.admission.push_back((sk, need));
    }

    /// Admits queued streams, oldest first, while the budget allows (called every flush).
    pub(crate) fn admit_queued(&mut self, now: Instant) {
        while let Some(&(sk, need)) = self.admission.front() {
            if !self.streams.get(sk).is_some_and(|s| s.queued) {
                self.admission.pop_front();
                continue;
            }
            if self.pool.above_high_water() || !self.pool.reserve(need) {
                break;
            }
            self.admission.pop_front();
            self.admit(now, sk, need);
        }
    }

    /// Ends the wait once the target or the end of the body is there: the reservation goes back
    /// and the request is forwarded.
    fn maybe_release_wait(&mut self, now: Instant, sk: StreamKey) {
        let Some(s) = self.streams.get_mut(sk) else {
            return;
        };
        let Some(w) = s.wait else { return };
        if s.queued || (s.req_body_bytes < w.target && !s.req_fin) {
            return;
        }
        s.wait = None;
        self.set_stream_deadline(sk, None);
        self.pool.release(w.reserved);
        self.assign_backend(now, sk);
    }

    pub(crate) fn on_request_data(&mut self, now: Instant, ck: ConnKey, sid: u64) {
        let Some(&sk) = self.conns.get(ck).and_then(|c| c.streams.get(&sid)) else {
            self.discard_unknown_stream(ck, sid);
            return;
        };
        if let Some(s) = self.streams.get_mut(sk) {
            s.body_readable = true;
        }
        self.pump_request(now, sk);
    }

    pub(crate) fn on_request_finished(&mut self, now: Instant, ck: ConnKey, sid: u64) {
        let Some(&sk) = self.conns.get(ck).and_then(|c| c.streams.get(&sid)) else {
            return;
        };
        let Some(s) = self.streams.get_mut(sk) else {
            return;
        };
        if s.req_fin {
            self.try_finish(sk);
            return;
        }
        s.req_fin = true;
        log::trace!(
            "stream {sid}: request body complete, {} bytes",
            s.req_body_bytes
        );
        // RFC 9114 §4.1.2: a body whose length differs from content-length is malformed. Once
        // the answer is decided (an early error response), the rest of the body was discarded
        // uncounted and no longer matters: the client must get that answer, not a reset.
        if let Some(cl) = s.content_length.filter(|_| !s.resp_end) {
            if cl != s.req_body_bytes {
                log::debug!(
                    "stream {sid}: body {} bytes, content-length {cl}",
                    s.req_body_bytes
                );
                if s.head_sent {
                    self.reset_stream(sk, H3_MESSAGE_ERROR);
                } else {
                    self.close_backend_of(sk);
                    self.reset_stream(sk, H3_MESSAGE_ERROR);
                }
                return;
            }
        }
        if matches!(s.framing, BodyKind::Chunked) {
            let mut last = Vec::with_capacity(5);
            http1::encode_last_chunk(&mut last);
            s.to_backend.push_forced(&mut self.pool, &last);
        }
        self.pump_request(now, sk);
        self.maybe_release_wait(now, sk);
        self.try_finish(sk);
    }

    pub(crate) fn on_request_reset(&mut self, ck: ConnKey, sid: u64, code: u64) {
        let Some(&sk) = self.conns.get(ck).and_then(|c| c.streams.get(&sid)) else {
            return;
        };
        log::debug!("stream {sid}: reset by client (0x{code:x})");
        if let Some(s) = self.streams.get_mut(sk) {
            s.log.status = 499;
        }
        // The client gave up: the backend connection is mid-exchange and cannot be reused.
        self.reset_stream(sk, H3_REQUEST_REJECTED.min(code.max(H3_NO_ERROR)));
    }

    fn discard_unknown_stream(&mut self, ck: ConnKey, sid: u64) {
        // Data for a stream we already finished with (e.g. body after an early error response):
        // read and drop it so flow control keeps moving.
        let Core { conns, scratch, .. } = self;
        let Some(c) = conns.get_mut(ck) else { return };
        let Some(h3) = c.h3.as_mut() else { return };
        while let Ok(n) = h3.recv_body(&mut c.q, sid, scratch) {
            if n == 0 {
                break;
            }
        }
    }

    /// Reads request body from quiche while the stream has room (its `max-stream-buffer`, its
    /// wait-for-body reservation, the worker's budget), and hands it to the backend connection
    /// when that is ready. Not reading is the backpressure: quiche stops crediting the client.
    pub(crate) fn pump_request(&mut self, now: Instant, sk: StreamKey) {
        let mut error = None;
        {
            let Core {
                conns,
                streams,
                scratch,
                pool,
                budget_blocked,
                ..
            } = self;
            let Some(s) = streams.get_mut(sk) else { return };
            if s.queued {
                return;
            }
            let Some(c) = conns.get_mut(s.conn) else {
                return;
            };
            let Some(h3) = c.h3.as_mut() else { return };
            // A waiting stream spends its own reservation: hand it to the pool for this pass
            // and take back what is still needed afterwards (one thread: nobody else runs).
            if let Some(w) = s.wait.as_mut() {
                pool.release(std::mem::take(&mut w.reserved));
            }
            let cap = match s.wait {
                Some(w) => (w.target as usize).max(s.limit) + pool.chunk_size(),
                None => s.limit,
            };
            // Chunked framing adds at most a size line and a CRLF per read.
            const FRAMING: usize = 32;
            while s.body_readable && !s.resp_end {
                let room = cap
                    .saturating_sub(s.to_backend.len())
                    .min(s.to_backend.room(pool))
                    .saturating_sub(FRAMING)
                    .min(scratch.len());
                if room == 0 {
                    if pool.available() == 0 {
                        // Out of budget, not of the client's doing: come back when chunks are
                        // returned (nothing else would wake a stream whose client is blocked
                        // by the flow control we stopped crediting).
                        if budget_blocked.last() != Some(&sk) {
                            budget_blocked.push(sk);
                        }
                        if let Some(w) = s.wait.as_mut() {
                            w.starved = true;
                        }
                    }
                    break;
                }
                match h3.recv_body(&mut c.q, s.id, &mut scratch[..room]) {
                    Ok(n) => {
                        let data = &scratch[..n];
                        if n > 0 {
                            s.last_body_at = Some(now);
                            c.last_body_at = Some(now);
                        }
                        s.req_body_bytes += n as u64;
                        s.log.bytes_in += n as u64;
                        let pushed = match s.framing {
                            BodyKind::Chunked => {
                                let mut framed = Vec::with_capacity(n + FRAMING);
                                http1::encode_chunk(data, &mut framed);
                                s.to_backend.push(pool, &framed) == framed.len()
                            }
                            _ => s.to_backend.push(pool, data) == n,
                        };
                        debug_assert!(pushed, "room was checked before reading");
                        if !pushed {
                            error = Some(H3_INTERNAL_ERROR);
                            break;
                        }
                        if s.content_length.is_some_and(|cl| s.req_body_bytes > cl) {
                            error = Some(H3_MESSAGE_ERROR);
                            break;
                        }
                        if matches!(s.framing, BodyKind::None) && n > 0 {
                            error = Some(H3_MESSAGE_ERROR);
                            break;
                        }
                    }
                    Err(quiche::h3::Error::Done) => s.body_readable = false,
                    Err(e) => {
                        log::trace!("stream {}: recv_body error {e:?}", s.id);
                        log::debug!("stream {}: recv_body: {e}", s.id);
                        error = Some(H3_INTERNAL_ERROR);
                        break;
                    }
                }
            }
            if let Some(w) = s.wait.as_mut() {
                let chunk = pool.chunk_size() as u64;
                let body_chunks = s.req_body_bytes.div_ceil(chunk);
                let still = (w.target.div_ceil(chunk) + 1).saturating_sub(body_chunks) as usize;
                // Taken back from what was just released, so this cannot fail; if it ever did,
                // the stream simply reads less next time.
                if pool.reserve(still) {
                    w.reserved = still;
                }
            }
            if s.resp_end && s.body_readable {
                // Response already complete (an error answer): drop the rest of the body.
                while let Ok(n) = h3.recv_body(&mut c.q, s.id, scratch) {
                    if n == 0 {
                        break;
                    }
                }
                s.body_readable = false;
            }
            // Once any body was read, a retry would need it again: no retry from here on.
            if s.req_body_bytes > 0 {
                s.retry_head = None;
            }
        }
        if let Some(code) = error {
            self.close_backend_of(sk);
            self.reset_stream(sk, code);
            return;
        }
        self.maybe_release_wait(now, sk);
        self.backend_write(sk);
        if let Some(s) = self.streams.get(sk) {
            let ck = s.conn;
            self.mark_dirty(ck);
        }
    }

    /// Parses what the backend sent and moves it toward the client as far as flow control allows.
    pub(crate) fn pump_response(&mut self, now: Instant, sk: StreamKey) {
        let mut bad_response = None;
        {
            let Core { streams, pool, .. } = self;
            let Some(s) = streams.get_mut(sk) else {
                return;
            };
            let mut off = 0;
            let Stream {
                parser,
                from_backend,
                from_chunks,
                body_out,
                head,
                log,
                backend_keepalive,
                resp_end,
                ..
            } = &mut *s;
            while head.is_none() || !*resp_end {
                // Parse even an empty input: a Length body ends with an End the parser reports
                // only when asked again.
                let Some(input) = from_backend.get(off..) else {
                    break;
                };
                match parser.parse(input) {
                    Ok((n, Parsed::Head(h))) => {
                        off += n;
                        let mut list = Vec::with_capacity(h.headers.len() + 1);
                        list.push(Header::new(b":status", h.status.to_string().as_bytes()));
                        for (name, value) in &h.headers {
                            list.push(Header::new(name, value));
                        }
                        let empty = matches!(h.body, http1::ResponseBody::Empty);
                        log.status = h.status;
                        *backend_keepalive = h.keep_alive;
                        *head = Some((list, empty));
                        if empty {
                            *resp_end = true;
                        }
                    }
                    Ok((n, Parsed::Body(b))) => {
                        off += n;
                        // Already in memory (a read was only armed with budget to spare): the
                        // move from the read window to the response queue is charged as is.
                        body_out.push_forced(pool, b);
                        if n == 0 {
                            break; // no progress: wait for more input
                        }
                    }
                    Ok((n, Parsed::End)) => {
                        off += n;
                        *resp_end = true;
                    }
                    Ok((n, Parsed::NeedMore)) => {
                        // NeedMore may still have consumed framing bytes (chunk lines, 1xx).
                        off += n;
                        break;
                    }
                    Err(e) => {
                        bad_response = Some(e);
                        break;
                    }
                }
            }
            from_backend.drain(..off.min(from_backend.len()));
            // The read window is charged by whole chunks for what is still unparsed.
            let need = from_backend.len().div_ceil(pool.chunk_size());
            if need < *from_chunks {
                pool.release(*from_chunks - need);
            } else {
                pool.reserve_forced(need - *from_chunks);
            }
            *from_chunks = need;
            if s.resp_end && !s.from_backend.is_empty() {
                // Bytes after the end of the response: the connection is out of sync.
                s.backend_keepalive = false;
            }
        }
        if let Some(e) = bad_response {
            if let Some(s) = self.streams.get(sk) {
                let name = s.bconn.map(|bk| self.backend_name(bk)).unwrap_or_default();
                log::warn!("stream {}: server {name}: invalid response: {e}", s.id);
            }
            self.stats.backend_errors += 1;
            self.close_backend_of(sk);
            let head_known = self.streams.get(sk).is_some_and(|s| s.head.is_some());
            if head_known {
                self.reset_stream(sk, H3_INTERNAL_ERROR);
            } else {
                self.respond_error(now, sk, 502, "invalid response from server");
            }
            return;
        }
        self.send_response_data(sk);
        self.backend_read(now, sk);
        if self.streams.get(sk).is_some_and(|s| s.resp_end) {
            // Nothing more is awaited from the server; delivering the rest to the client is
            // bounded by `timeout client` (QUIC idle timeout), not `timeout server`.
            if self
                .streams
                .get(sk)
                .is_some_and(|s| s.wait.is_none() && !s.queued)
            {
                self.set_stream_deadline(sk, None);
            }
            self.release_backend(sk);
        }
        self.try_finish(sk);
    }

    /// Moves the pending head and body into quiche as far as the stream's capacity allows.
    fn send_response_data(&mut self, sk: StreamKey) {
        let mut fail = false;
        {
            let Core {
                conns,
                streams,
                pool,
                ..
            } = self;
            let Some(s) = streams.get_mut(sk) else { return };
            let Some(c) = conns.get_mut(s.conn) else {
                return;
            };
            let Some(h3) = c.h3.as_mut() else { return };
            if !s.head_sent {
                if let Some((list, fin)) = &s.head {
                    match h3.send_response(&mut c.q, s.id, list, *fin) {
                        Ok(()) => {
                            s.head_sent = true;
                            s.fin_sent = *fin;
                        }
                        Err(quiche::h3::Error::StreamBlocked) => return,
                        Err(e) => {
                            log::debug!("stream {}: send_response: {e}", s.id);
                            fail = true;
                        }
                    }
                }
            }
            while !fail && s.head_sent && !s.fin_sent && !s.body_out.is_empty() {
                let front = s.body_out.front();
                let last = front.len() == s.body_out.len();
                match h3.send_body(&mut c.q, s.id, front, s.resp_end && last) {
                    Ok(n) => {
                        let all = n == front.len();
                        s.body_out.consume(pool, n);
                        s.log.bytes_out += n as u64;
                        if all && last && s.resp_end {
                            s.fin_sent = true;
                        }
                        if !all {
                            break;
                        }
                    }
                    Err(quiche::h3::Error::Done) => break,
                    Err(e) => {
                        log::debug!("stream {}: send_body: {e}", s.id);
                        fail = true;
                    }
                }
            }
            if !fail && s.head_sent && !s.fin_sent && s.body_out.is_empty() && s.resp_end {
                match h3.send_body(&mut c.q, s.id, &[], true) {
                    Ok(_) => s.fin_sent = true,
                    Err(quiche::h3::Error::Done) => {}
                    Err(_) => fail = true,
                }
            }
        }
        if fail {
            self.close_backend_of(sk);
            self.drop_stream(sk);
        }
    }

    /// Answers the stream with a short error response (when no response head was sent yet).
    pub(crate) fn respond_error(&mut self, now: Instant, sk: StreamKey, status: u16, why: &str) {
        let reason = match status {
            400 => "Bad Request",
            408 => "Request Timeout",
            501 => "Not Implemented",
            502 => "Bad Gateway",
            503 => "Service Unavailable",
            504 => "Gateway Timeout",
            _ => "Error",
        };
        log::debug!("stream {sk:?}: answering {status}: {why}");
        let body = format!("{status} {reason}: {why}\n").into_bytes();
        let Some(s) = self.streams.get_mut(sk) else {
            return;
        };
        if s.head_sent {
            let _ = s;
            self.reset_stream(sk, H3_INTERNAL_ERROR);
            return;
        }
        s.head = Some((
            vec![
                Header::new(b":status", status.to_string().as_bytes()),
                Header::new(b"content-type", b"text/plain"),
                Header::new(b"content-length", body.len().to_string().as_bytes()),
            ],
            false,
        ));
        s.log.status = status;
        s.body_out.clear(&mut self.pool);
        s.body_out.push_forced(&mut self.pool, &body);
        s.from_backend.clear();
        self.pool.release(std::mem::take(&mut s.from_chunks));
        if let Some(w) = s.wait.take() {
            self.pool.release(w.reserved);
        }
        s.queued = false;
        s.resp_end = true;
        s.retry_head = None;
        self.set_stream_deadline(sk, None);
        self.close_backend_of(sk);
        self.send_response_data(sk);
        self.pump_request(now, sk); // discard any body still arriving
        self.try_finish(sk);
        if let Some(s) = self.streams.get(sk) {
            let ck = s.conn;
            self.mark_dirty(ck);
        }
    }

    /// Removes the stream once the response is fully handed to quiche; stops reading a request
    /// body the response no longer needs (RFC 9114 §4.1: H3_NO_ERROR).
    pub(crate) fn try_finish(&mut self, sk: StreamKey) {
        let Some(s) = self.streams.get(sk) else {
            return;
        };
        if !s.fin_sent {
            return;
        }
        if !s.req_fin {
            if let Some(c) = self.conns.get_mut(s.conn) {
                let _ =
                    c.q.stream_shutdown(s.id, quiche::Shutdown::Read, H3_NO_ERROR);
            }
        }
        if let Some(c) = self.conns.get_mut(s.conn) {
            c.flushing.push(s.id);
        }
        self.count_response(sk);
        self.drop_stream(sk);
    }

    fn count_response(&mut self, sk: StreamKey) {
        let Some(s) = self.streams.get(sk) else {
            return;
        };
        let class = (s.log.status / 100) as usize;
        if let Some(n) = self.stats.responses.get_mut(class) {
            *n += 1;
        }
        let l = &s.log;
        // The time quiche sees: the machine's, or a simulation's virtual clock.
        let took = quiche::clock::now().saturating_duration_since(s.started);
        log::info!(
            target: "access",
            "{} {} {} {} {} {} {} {}ms {}",
            l.client.map(|a| a.to_string()).unwrap_or_default(),
            l.authority,
            l.method,
            l.path,
            l.status,
            l.bytes_in,
            l.bytes_out,
            took.as_millis(),
            if l.server.is_empty() { "-" } else { &l.server }
        );
    }

    /// Resets both directions of the stream with `code` and removes it.
    pub(crate) fn reset_stream(&mut self, sk: StreamKey, code: u64) {
        let Some(s) = self.streams.get(sk) else {
            return;
        };
        if let Some(c) = self.conns.get_mut(s.conn) {
            let _ = c.q.stream_shutdown(s.id, quiche::Shutdown::Read, code);
            let _ = c.q.stream_shutdown(s.id, quiche::Shutdown::Write, code);
        }
        let ck = s.conn;
        self.close_backend_of(sk);
        self.drop_stream(sk);
        self.mark_dirty(ck);
    }

    /// Forgets the stream: unlinks it from its connection and its backend connection (which is
    /// closed unless it was already handed back to the pool) and returns its memory.
    pub(crate) fn drop_stream(&mut self, sk: StreamKey) {
        self.close_backend_of(sk);
        let Some(mut s) = self.streams.remove(sk) else {
            return;
        };
        self.unschedule(s.deadline, Timer::Stream(sk));
        s.release_buffers(&mut self.pool);
        if let Some(c) = self.conns.get_mut(s.conn) {
            if c.streams.get(&s.id) == Some(&sk) {
                c.streams.remove(&s.id);
            }
        }
        // Whatever ended the stream left frames in quiche (FIN, RESET_STREAM): send them.
        self.mark_dirty(s.conn);
        debug_assert!(!self.streams.contains(sk));
    }

    pub(crate) fn stream_timer(&mut self, sk: StreamKey, at: Instant, now: Instant) {
        let Some(s) = self.streams.get_mut(sk) else {
            return;
        };
        if s.deadline != Some(at) {
            return;
        }
        // Its entry was popped: whatever happens next arms a new one.
        s.deadline = None;
        if s.queued {
            self.stats.budget_refusals += 1;
            log::warn!(
                "stream {}: no memory budget within the queue timeout: answering 503",
                s.id
            );
            self.respond_error(now, sk, 503, "memory budget exhausted");
            return;
        }
        if let Some(w) = s.wait {
            // A client still sending (on this stream, or on its connection whose flow control
            // the other streams share) is slow, not stalled: forward what arrived.
            let recent = |t: Option<Instant>| {
                t.is_some_and(|t| now.saturating_duration_since(t) < stall_after(w.time))
            };
            let conn_recent = self
                .conns
                .get(s.conn)
                .is_some_and(|c| recent(c.last_body_at));
            if !w.starved && (recent(s.last_body_at) || conn_recent) {
                log::debug!(
                    "stream {}: wait-for-body time elapsed, client still sending: forwarding",
                    s.id
                );
                if let Some(s) = self.streams.get_mut(sk) {
                    s.wait = None;
                }
                self.set_stream_deadline(sk, None);
                self.pool.release(w.reserved);
                self.assign_backend(now, sk);
                return;
            }
            if w.starved {
                self.stats.budget_refusals += 1;
                log::warn!(
                    "stream {}: wait-for-body starved of memory budget: answering 503",
                    s.id
                );
                self.respond_error(now, sk, 503, "memory budget exhausted");
            } else {
                self.respond_error(now, sk, 408, "request body too slow");
            }
            return;
        }
        log::debug!("stream {}: backend timeout", s.id);
        self.stats.backend_errors += 1;
        if s.head_sent {
            self.reset_stream(sk, H3_INTERNAL_ERROR);
        } else {
            self.respond_error(now, sk, 504, "server timeout");
        }
    }

    pub(crate) fn set_stream_deadline(&mut self, sk: StreamKey, at: Option<Instant>) {
        let Some(s) = self.streams.get_mut(sk) else {
            return;
        };
        let old = std::mem::replace(&mut s.deadline, at);
        match at {
            Some(at) => self.schedule(old, at, Timer::Stream(sk)),
            None => self.unschedule(old, Timer::Stream(sk)),
        }
    }

    /// Takes the encoded head for a retry on a fresh connection, if the request allows one.
    pub(crate) fn take_retry(&mut self, sk: StreamKey) -> Option<Vec<u8>> {
        let s = self.streams.get_mut(sk)?;
        if s.got_response_bytes || s.req_body_bytes > 0 {
            return None;
        }
        s.retry_head.take()
    }

    pub(crate) fn restart_request(&mut self, sk: StreamKey, head: Vec<u8>) {
        if let Some(s) = self.streams.get_mut(sk) {
            s.to_backend.clear(&mut self.pool);
            s.to_backend.push_forced(&mut self.pool, &head);
            s.from_backend.clear();
            self.pool.release(std::mem::take(&mut s.from_chunks));
            s.parser = ResponseParser::new(s.log.method == "HEAD");
        }
    }
}
