//! Backend servers: per-worker keep-alive pools, balancing, and the life of one backend TCP
//! connection (connect → write request → read response → back to the pool or closed).
//!
//! A backend connection is named by its generation key everywhere (the stream that uses it, the
//! ring's in-flight operations). Closing one removes it from the table at once; completions that
//! arrive for it afterwards find no entry and are dropped by `Core::on_backend`.

use std::io;
use std::time::Instant;

use crate::config::{Balance, Server};
use crate::core::{BackendAction, BackendKey, Core, StreamKey};

pub struct BackendConn {
    pub(crate) backend: usize,
    pub(crate) server: usize,
    pub(crate) stream: Option<StreamKey>,
    connected: bool,
    /// A Send is in flight; the next one waits for its completion (one writer at a time).
    sending: bool,
    /// A Recv is armed.
    reading: bool,
    /// The armed Recv holds one budget chunk (reads for a stream do; the idle-pool probe read
    /// does not).
    pub(crate) read_charged: bool,
    /// The Send in flight carries one budget chunk.
    pub(crate) send_charged: bool,
    /// Served at least one request: a failure before any response byte may be a stale keep-alive
    /// connection the origin closed, and a body-less request is retried once.
    reused: bool,
}

/// Balancing and pool state of one server.
pub struct ServerState {
    pub(crate) idle: Vec<BackendKey>,
    pub(crate) active: u32,
    weight: i64,
    current: i64,
    maxconn: Option<u32>,
    pub(crate) failures: u64,
    /// The last connect failed (logged once per change).
    failing: bool,
}

impl ServerState {
    pub fn new(s: &Server) -> Self {
        ServerState {
            idle: Vec::new(),
            active: 0,
            weight: i64::from(s.weight.max(1)),
            current: 0,
            maxconn: s.maxconn,
            failures: 0,
            failing: false,
        }
    }

    fn has_room(&self) -> bool {
        self.maxconn.is_none_or(|m| self.active < m)
    }
}

/// Picks a server: smooth weighted round-robin (nginx's algorithm: even spread, weights honoured)
/// or least connections relative to weight. Servers in `exclude` (already failed for this
/// request) and servers at maxconn are skipped.
pub fn pick_server(
    servers: &mut [ServerState],
    balance: &Balance,
    exclude: &[usize],
) -> Option<usize> {
    let eligible = |i: usize, s: &ServerState| s.has_room() && !exclude.contains(&i);
    match balance {
        Balance::RoundRobin => {
            let mut total = 0;
            let mut best: Option<(usize, i64)> = None;
            for (i, s) in servers.iter_mut().enumerate() {
                if !eligible(i, s) {
                    continue;
                }
                s.current += s.weight;
                total += s.weight;
                if best.is_none_or(|(_, cur)| s.current > cur) {
                    best = Some((i, s.current));
                }
            }
            let (best, _) = best?;
            if let Some(s) = servers.get_mut(best) {
                s.current -= total;
            }
            Some(best)
        }
        Balance::LeastConn => servers
            .iter()
            .enumerate()
            .filter(|(i, s)| eligible(*i, s))
            // active/weight compared without division: a.active * b.weight < b.active * a.weight
            .min_by(|(ia, a), (ib, b)| {
                (i64::from(a.active) * b.weight)
                    .cmp(&(i64::from(b.active) * a.weight))
                    .then(ia.cmp(ib))
            })
            .map(|(i, _)| i),
    }
}

impl Core {
    /// Gives the stream a backend connection: a pooled one if the chosen server has one, else a
    /// new connect. No server available → 503; connect failures → next server, then 502.
    pub(crate) fn assign_backend(&mut self, now: Instant, sk: StreamKey) {
        let Some(s) = self.streams.get(sk) else {
            return;
        };
        let b = s.backend;
        let exclude = s.tried.clone();
        let Some(backend) = self.backends.get(b) else {
            self.respond_error(now, sk, 503, "no backend");
            return;
        };
        let timeouts = backend.timeouts;
        let balance = backend.balance;
        let Some(servers) = self.servers.get_mut(b) else {
            return;
        };
        let Some(si) = pick_server(servers, &balance, &exclude) else {
            if exclude.is_empty() {
                self.respond_error(now, sk, 503, "no server available");
            } else {
                self.respond_error(now, sk, 502, "cannot connect to server");
            }
            return;
        };
        let server_name = backend
            .servers
            .get(si)
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let addr = backend.servers.get(si).and_then(|s| s.addr);
        let Some(state) = servers.get_mut(si) else {
            return;
        };
        state.active += 1;
        if let Some(s) = self.streams.get_mut(sk) {
            s.tried.push(si);
            log::debug!("stream {}: to server {server_name}", s.id);
            s.log.server = server_name;
        }
        // Reuse an idle connection if there is one (its armed Recv stays armed: it now reads the
        // response).
        while let Some(bk) = self
            .servers
            .get_mut(b)
            .and_then(|v| v.get_mut(si))
            .and_then(|st| st.idle.pop())
        {
            if let Some(bc) = self.bconns.get_mut(bk) {
                bc.stream = Some(sk);
                bc.reused = true;
                self.stats.backend_reuses += 1;
                if let Some(s) = self.streams.get_mut(sk) {
                    s.bconn = Some(bk);
                }
                self.set_stream_deadline(sk, Some(now + timeouts.server));
                self.backend_write(sk);
                return;
            }
        }
        let Some(addr) = addr else {
            self.server_failed(now, sk, si);
            return;
        };
        let bc = BackendConn {
            backend: b,
            server: si,
            stream: Some(sk),
            connected: false,
            sending: false,
            reading: false,
            read_charged: false,
            send_charged: false,
            reused: false,
        };
        let Ok(bk) = self.bconns.insert(bc) else {
            self.release_server_slot(b, si);
            self.respond_error(now, sk, 503, "too many backend connections");
            return;
        };
        if let Some(s) = self.streams.get_mut(sk) {
            s.bconn = Some(bk);
        }
        self.stats.backend_connects += 1;
        self.actions
            .push_back(BackendAction::Connect { key: bk, addr });
        self.set_stream_deadline(sk, Some(now + timeouts.connect));
    }

    /// `backend/server` for log lines.
    /// `backend/server` of a backend connection, for logs.
    pub(crate) fn backend_name(&self, bk: BackendKey) -> String {
        self.bconns
            .get(bk)
            .map(|c| self.server_name(c.backend, c.server))
            .unwrap_or_default()
    }

    fn server_name(&self, b: usize, si: usize) -> String {
        self.backends
            .get(b)
            .and_then(|be| {
                be.servers
                    .get(si)
                    .map(|s| format!("{}/{}", be.name, s.name))
            })
            .unwrap_or_default()
    }

    /// Starts (or restarts) the stream's `timeout server` from `now`.
    fn restart_server_timeout(&mut self, now: Instant, sk: StreamKey) {
        let t = self
            .streams
            .get(sk)
            .and_then(|s| self.backends.get(s.backend))
            .map(|b| b.timeouts.server);
        if let Some(t) = t {
            self.set_stream_deadline(sk, Some(now + t));
        }
    }

    fn release_server_slot(&mut self, b: usize, si: usize) {
        if let Some(st) = self.servers.get_mut(b).and_then(|v| v.get_mut(si)) {
            debug_assert!(st.active > 0);
            st.active = st.active.saturating_sub(1);
        }
    }

    /// A connect to server `si` failed for stream `sk`: try another server or answer 502.
    fn server_failed(&mut self, now: Instant, sk: StreamKey, si: usize) {
        let Some(s) = self.streams.get(sk) else {
            return;
        };
        if let Some(st) = self.servers.get_mut(s.backend).and_then(|v| v.get_mut(si)) {
            st.failures += 1;
        }
        self.assign_backend(now, sk);
    }

    pub(crate) fn backend_connected(&mut self, now: Instant, bk: BackendKey, r: io::Result<()>) {
        log::debug!("backend {bk:?}: connected {r:?}");
        let Some(bc) = self.bconns.get_mut(bk) else {
            return;
        };
        let sk = bc.stream;
        let si = bc.server;
        match r {
            Ok(()) => {
                bc.connected = true;
                let (b, si) = (bc.backend, bc.server);
                if let Some(st) = self.servers.get_mut(b).and_then(|v| v.get_mut(si)) {
                    if std::mem::take(&mut st.failing) {
                        let name = self.server_name(b, si);
                        log::info!("server {name} is back: connect succeeded");
                    }
                }
                if !self.bconns.contains(bk) {
                    return;
                }
                let Some(sk) = sk else {
                    self.close_backend(bk);
                    return;
                };
                self.restart_server_timeout(now, sk);
                self.backend_write(sk);
                self.backend_read(now, sk);
            }
            Err(e) => {
                self.stats.backend_connect_errors += 1;
                let b = self.bconns.get(bk).map(|c| c.backend);
                let first = b
                    .and_then(|b| self.servers.get_mut(b))
                    .and_then(|v| v.get_mut(si))
                    .is_some_and(|st| !std::mem::replace(&mut st.failing, true));
                let name = b.map(|b| self.server_name(b, si)).unwrap_or_default();
                // Once per state change, not once per request: a dead server must not flood logs.
                if first {
                    log::warn!("server {name} is failing: connect: {e}");
                } else {
                    log::debug!("server {name}: connect: {e}");
                }
                self.close_backend(bk);
                if let Some(sk) = sk {
                    if let Some(s) = self.streams.get_mut(sk) {
                        s.bconn = None;
                    }
                    self.server_failed(now, sk, si);
                }
            }
        }
    }

    /// Starts a Send of everything the stream has encoded, if the connection is ready and idle.
    pub(crate) fn backend_write(&mut self, sk: StreamKey) {
        let Some(s) = self.streams.get_mut(sk) else {
            return;
        };
        let Some(bk) = s.bconn else { return };
        let Some(bc) = self.bconns.get_mut(bk) else {
            return;
        };
        if !bc.connected || bc.sending {
            return;
        }
        // One chunk per send; its budget charge travels with it until the completion.
        let Some(data) = s.to_backend.pop_chunk() else {
            return;
        };
        bc.sending = true;
        bc.send_charged = true;
        self.actions
            .push_back(BackendAction::Send { key: bk, data });
    }

    /// Arms a read if the stream has room for more response bytes (the backpressure point: a
    /// slow client stops the reads, TCP stops the backend).
    pub(crate) fn backend_read(&mut self, now: Instant, sk: StreamKey) {
        let Some(s) = self.streams.get(sk) else {
            return;
        };
        let Some(bk) = s.bconn else { return };
        let chunk = self.pool.chunk_size();
        if s.response_complete() {
            return;
        }
        if s.response_buffered() + chunk > s.limit {
            // Paused for the client, not waiting on the server: `timeout server` does not run
            // while the client is the slow party (`timeout client` covers a client that stalls).
            if s.deadline.is_some() && s.wait.is_none() && !s.queued {
                self.set_stream_deadline(sk, None);
            }
            return;
        }
        let Some(bc) = self.bconns.get_mut(bk) else {
            return;
        };
        if !bc.connected || bc.reading {
            return;
        }
        // The read's bytes will land in memory: charge them before arming it. No budget left
        // means no read: TCP then holds the backend back.
        if !self.pool.reserve(1) {
            if self.budget_blocked.last() != Some(&sk) {
                self.budget_blocked.push(sk);
            }
            return;
        }
        bc.reading = true;
        bc.read_charged = true;
        self.actions.push_back(BackendAction::Recv {
            key: bk,
            max: chunk,
        });
        // Waiting on the server again (first byte, or more body): its timeout runs.
        if self.streams.get(sk).is_some_and(|s| s.deadline.is_none()) {
            self.restart_server_timeout(now, sk);
        }
    }

    pub(crate) fn backend_sent(&mut self, now: Instant, bk: BackendKey, r: io::Result<usize>) {
        log::trace!("backend {bk:?}: sent {r:?}");
        let Some(bc) = self.bconns.get_mut(bk) else {
            return;
        };
        bc.sending = false;
        if std::mem::take(&mut bc.send_charged) {
            self.pool.release(1);
        }
        let Some(sk) = bc.stream else { return };
        match r {
            Ok(_) => {
                // The server took request bytes: it is alive, so its timeout starts over (a slow
                // upload to a healthy server is not a 504). Found by the simulation.
                let pending = self
                    .streams
                    .get(sk)
                    .is_some_and(|s| s.deadline.is_some() && s.wait.is_none() && !s.queued);
                if pending {
                    self.restart_server_timeout(now, sk);
                }
                // Room again: read more request body from the client.
                self.pump_request(now, sk);
            }
            Err(e) => self.backend_failed(now, bk, sk, &format!("send: {e}")),
        }
    }

    pub(crate) fn backend_received(&mut self, now: Instant, bk: BackendKey, r: io::Result<&[u8]>) {
        log::trace!("backend {bk:?}: received {:?}", r.as_ref().map(|d| d.len()));
        let Some(bc) = self.bconns.get_mut(bk) else {
            return;
        };
        bc.reading = false;
        let charged = std::mem::take(&mut bc.read_charged);
        let Some(sk) = bc.stream else {
            if charged {
                self.pool.release(1);
            }
            // An idle pooled connection became readable: the origin closed it (or sent junk).
            self.close_backend(bk);
            return;
        };
        match r {
            Ok(data) if !data.is_empty() => {
                match self.streams.get_mut(sk) {
                    Some(s) => {
                        s.from_backend.extend_from_slice(data);
                        s.got_response_bytes = true;
                        // The read's chunk now pays for these bytes until they are parsed.
                        // (An uncharged idle-probe read is charged now, as the bytes are here.)
                        if !charged {
                            self.pool.reserve_forced(1);
                        }
                        s.from_chunks += 1;
                    }
                    None if charged => self.pool.release(1),
                    None => {}
                }
                self.restart_server_timeout(now, sk);
                self.pump_response(now, sk);
            }
            Ok(_) => {
                if charged {
                    self.pool.release(1);
                }
                self.backend_eof(now, bk, sk)
            }
            Err(e) => {
                if charged {
                    self.pool.release(1);
                }
                self.backend_failed(now, bk, sk, &format!("receive: {e}"));
            }
        }
    }

    fn backend_eof(&mut self, now: Instant, bk: BackendKey, sk: StreamKey) {
        let outcome = self
            .streams
            .get_mut(sk)
            .map(|s| (s.parser_eof(), s.got_response_bytes));
        match outcome {
            Some((Ok(()), _)) => {
                // Close-delimited body complete.
                if let Some(s) = self.streams.get_mut(sk) {
                    s.backend_keepalive = false;
                }
                self.close_backend(bk);
                self.pump_response(now, sk);
            }
            Some((Err(()), _)) => {
                self.backend_failed(now, bk, sk, "closed before the response was complete")
            }
            None => self.close_backend(bk),
        }
    }

    /// The connection broke mid-exchange. A body-less request on a reused connection that got
    /// no byte back is retried once on a fresh connection; otherwise 502, or a stream reset if
    /// the response head already went out.
    fn backend_failed(&mut self, now: Instant, bk: BackendKey, sk: StreamKey, why: &str) {
        let reused = self.bconns.get(bk).is_some_and(|b| b.reused);
        let name = self.backend_name(bk);
        self.close_backend(bk);
        if reused {
            if let Some(head) = self.take_retry(sk) {
                log::debug!(
                    "retrying request on a fresh connection after a stale keep-alive one failed"
                );
                self.restart_request(sk, head);
                if let Some(s) = self.streams.get_mut(sk) {
                    s.tried.clear();
                }
                self.assign_backend(now, sk);
                return;
            }
        }
        self.stats.backend_errors += 1;
        let complete = self.streams.get(sk).is_some_and(|s| s.response_complete());
        if complete {
            self.pump_response(now, sk);
            return;
        }
        if let Some(s) = self.streams.get(sk) {
            let what = if s.head_sent {
                "response cut: resetting the stream"
            } else {
                "answering 502"
            };
            log::warn!("stream {}: server {name}: {why}; {what}", s.id);
        }
        self.respond_error(now, sk, 502, "server connection failed");
    }

    /// The response is complete: hand the connection back to its pool (keep-alive) or close it.
    pub(crate) fn release_backend(&mut self, sk: StreamKey) {
        let Some(s) = self.streams.get_mut(sk) else {
            return;
        };
        if !s.response_complete() {
            return;
        }
        let Some(bk) = s.bconn.take() else { return };
        let keep = s.backend_keepalive
            && s.to_backend.is_empty()
            && s.from_backend.is_empty()
            && s.request_sent();
        let Some(bc) = self.bconns.get_mut(bk) else {
            return;
        };
        if !keep || bc.sending || self.drain_deadline.is_some() {
            bc.stream = None;
            self.close_backend(bk);
            return;
        }
        bc.stream = None;
        let (b, si) = (bc.backend, bc.server);
        let arm = !bc.reading;
        bc.reading = true;
        self.release_server_slot(b, si);
        if let Some(st) = self.servers.get_mut(b).and_then(|v| v.get_mut(si)) {
            st.idle.push(bk);
        }
        if arm {
            // Keep a read armed while idle: it completes when the origin closes the connection,
            // so stale pooled connections are noticed before a request lands on them.
            self.actions
                .push_back(BackendAction::Recv { key: bk, max: 64 });
        }
    }

    /// Closes the stream's backend connection, if any (mid-exchange: it cannot be reused).
    pub(crate) fn close_backend_of(&mut self, sk: StreamKey) {
        let Some(s) = self.streams.get_mut(sk) else {
            return;
        };
        if let Some(bk) = s.bconn.take() {
            self.close_backend(bk);
        }
    }

    /// Removes the backend connection from the table (its key dies now) and asks the ring to
    /// cancel its operations and close the socket after their completions.
    pub(crate) fn close_backend(&mut self, bk: BackendKey) {
        let Some(bc) = self.bconns.remove(bk) else {
            return;
        };
        // Charges of operations still in flight end with the connection (their buffers are the
        // ring's until the cancelled completions arrive, and are freed then).
        self.pool
            .release(usize::from(bc.read_charged) + usize::from(bc.send_charged));
        if let Some(st) = self
            .servers
            .get_mut(bc.backend)
            .and_then(|v| v.get_mut(bc.server))
        {
            if let Some(pos) = st.idle.iter().position(|k| *k == bk) {
                st.idle.swap_remove(pos);
            } else {
                debug_assert!(st.active > 0);
                st.active = st.active.saturating_sub(1);
            }
        }
        if let Some(sk) = bc.stream {
            if let Some(s) = self.streams.get_mut(sk) {
                if s.bconn == Some(bk) {
                    s.bconn = None;
                }
            }
        }
        self.actions.push_back(BackendAction::Close { key: bk });
    }

    pub(crate) fn close_idle_backends(&mut self) {
        let idle: Vec<BackendKey> = self
            .servers
            .iter()
            .flatten()
            .flat_map(|s| s.idle.iter().copied())
            .collect();
        for bk in idle {
            self.close_backend(bk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(weights: &[u32]) -> Vec<ServerState> {
        weights
            .iter()
            .map(|&w| ServerState {
                idle: Vec::new(),
                active: 0,
                weight: i64::from(w),
                current: 0,
                maxconn: None,
                failures: 0,
                failing: false,
            })
            .collect()
    }

    #[test]
    fn weighted_round_robin_is_smooth_and_fair() {
        let mut s = servers(&[1, 2]);
        let picks: Vec<usize> = (0..6)
            .filter_map(|_| pick_server(&mut s, &Balance::RoundRobin, &[]))
            .collect();
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 4);
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 2);
        // Smooth: never three of the same in a row for weights 1:2.
        assert!(picks.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])));
    }

    #[test]
    fn excluded_and_full_servers_are_skipped() {
        let mut s = servers(&[1, 1]);
        assert_eq!(pick_server(&mut s, &Balance::RoundRobin, &[0]), Some(1));
        s[1].maxconn = Some(0);
        assert_eq!(pick_server(&mut s, &Balance::RoundRobin, &[0]), None);
        assert_eq!(pick_server(&mut s, &Balance::LeastConn, &[]), Some(0));
    }

    #[test]
    fn leastconn_respects_weight() {
        let mut s = servers(&[1, 3]);
        s[0].active = 1;
        s[1].active = 2;
        // 1/1 > 2/3: the heavier server wins.
        assert_eq!(pick_server(&mut s, &Balance::LeastConn, &[]), Some(1));
    }
}
