//! QUIC side of the core: routing datagrams to connections by DCID, accepting new connections,
//! driving quiche and its HTTP/3 layer, GOAWAY and reaping.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::cid::{self, CID_LEN};
use crate::config::{self, Config, ConfigError, Frontend, RetryMode, TlsFile};
use crate::core::{ConnKey, Core, Handoff, StreamKey, Timer, Transmit};
use crate::initial;
use crate::tickets::{self, TicketKeys};
use crate::token;

pub const H3_NO_ERROR: u64 = 0x100;
pub const H3_INTERNAL_ERROR: u64 = 0x102;
pub const H3_REQUEST_REJECTED: u64 = 0x10b;
pub const H3_MESSAGE_ERROR: u64 = 0x10e;

/// Largest UDP payload we send. 1350 fits every common path MTU with room for tunnels.
pub const MAX_SEND_PAYLOAD: usize = 1350;
/// How many of our CIDs we keep issued to a client (it needs spares to migrate).
const ACTIVE_CIDS: u64 = 4;
/// Our `active_connection_id_limit`. quiche 0.30 also uses it as the number of network paths a
/// connection keeps at once; each NAT rebinding adds one, and the patched quiche frees the least
/// recent one the connection has left when a new one needs the room
/// (vendor/quiche-path-reclaim.patch), so any number of rebindings fit.
const MAX_PATHS: u64 = 16;
/// Stateless resets, and separately INVALID_TOKEN closes, per worker per second: they answer
/// unauthenticated input.
const STATELESS_PER_SEC: u32 = 100;

pub struct Conn {
    pub(crate) q: quiche::Connection,
    pub(crate) h3: Option<quiche::h3::Connection>,
    pub(crate) listener: usize,
    pub(crate) frontend: usize,
    /// Latest client address seen (X-Forwarded-For; follows NAT rebinding).
    pub(crate) peer: SocketAddr,
    pub(crate) streams: HashMap<u64, StreamKey>,
    /// Every CID routed to this connection, removed from the routing map at reap.
    pub(crate) cids: Vec<Vec<u8>>,
    pub(crate) dirty: bool,
    /// When the armed `Timer::Conn` entry fires (quiche's `timeout_instant` when armed).
    pub(crate) timer_at: Option<Instant>,
    /// When the armed `Timer::Handshake` entry fires; `None` once established.
    pub(crate) handshake_at: Option<Instant>,
    /// Lowest client stream id not yet seen: the GOAWAY id on shutdown.
    pub(crate) next_stream_id: u64,
    pub(crate) goaway: Option<u64>,
    /// Streams whose response is complete on our side but may still be unacknowledged; a
    /// draining connection closes only when quiche has collected them all (closing earlier
    /// would discard response bytes still in flight).
    pub(crate) flushing: Vec<u64>,
    /// When request body last arrived on any stream (wait-for-body's stall test).
    pub(crate) last_body_at: Option<Instant>,
    /// Rotates which stream writes first (fair share of the send capacity).
    pub(crate) rotation: usize,
    /// Handshake completed (counted out of `half_open`).
    pub(crate) established: bool,
    /// Requests with an unsafe method that arrived in 0-RTT, with the memory each needs at
    /// admission: they wait for the handshake (replay protection, RFC 8470 §3).
    pub(crate) held: Vec<(StreamKey, usize)>,
}

/// A quiche configuration whose TLS context encrypts session tickets with `tickets` (the
/// process's keys, the same for every worker), or with a key of its own when `None` (`check`).
fn new_quiche_config(tickets: Option<&Arc<TicketKeys>>) -> Result<quiche::Config, String> {
    let Some(tickets) = tickets else {
        return quiche::Config::new(quiche::PROTOCOL_VERSION).map_err(|e| format!("quiche: {e}"));
    };
    let mut ctx = boring::ssl::SslContextBuilder::new(boring::ssl::SslMethod::tls())
        .map_err(|e| format!("TLS context: {e}"))?;
    tickets::install(&mut ctx, tickets.clone());
    quiche::Config::with_boring_ssl_ctx_builder(quiche::PROTOCOL_VERSION, ctx)
        .map_err(|e| format!("quiche: {e}"))
}

/// Loads one TLS file of a frontend into `c` exactly as a worker does; the error is the reason.
/// The key goes in after the certificate: BoringSSL then also checks that they match.
fn load_tls_file(c: &mut quiche::Config, which: TlsFile, path: &Path) -> Result<(), String> {
    // Plain IO problems first: BoringSSL would only report "system library" errors.
    config::check_readable(path)?;
    // Empty the thread's BoringSSL error queue so what follows is this load's own reason.
    drop(boring::error::ErrorStack::get());
    // A config file is UTF-8, so this is lossless; quiche refuses a path with a NUL itself.
    let p = path.to_string_lossy();
    let loaded = match which {
        TlsFile::Cert => c.load_cert_chain_from_pem_file(&p),
        TlsFile::Key => c.load_priv_key_from_pem_file(&p),
    };
    loaded.map_err(|e| {
        // quiche only says `TlsFail`. BoringSSL's queue says why; its first entry is the root
        // cause (later ones only wrap it, e.g. "SSL routines: PEM routines").
        let stack = boring::error::ErrorStack::get();
        let why = match stack.errors().first().map(|e| (e.library(), e.reason())) {
            Some((Some(lib), Some(reason))) => format!("{lib}: {reason}"),
            Some((None, Some(reason))) => reason.to_string(),
            _ => format!("quiche: {e}"),
        };
        match which {
            TlsFile::Cert => format!("not a valid PEM certificate chain ({why})"),
            TlsFile::Key => format!("not a valid PEM private key for the certificate ({why})"),
        }
    })
}

/// Loads every frontend's certificate and key (and the `tls-ticket-keys` file) as `run` will
/// (the same quiche calls), so that `check` and a reload reject what a start would. Errors
/// point at the `cert` / `key` / `tls-ticket-keys` lines of `file`.
pub fn tls_errors(file: &str, config: &Config) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for fe in &config.frontends {
        let mut c = match new_quiche_config(None) {
            Ok(c) => c,
            Err(message) => {
                errors.push(ConfigError {
                    file: file.to_string(),
                    line: fe.line,
                    message,
                });
                continue;
            }
        };
        for which in [TlsFile::Cert, TlsFile::Key] {
            let (path, line) = fe.tls_file(which);
            if let Err(reason) = load_tls_file(&mut c, which, path) {
                errors.push(ConfigError {
                    file: file.to_string(),
                    line,
                    message: config::cannot_read(which, path, &reason),
                });
                // Check the key on its own then: a bad cert must not hide a bad key.
                match new_quiche_config(None) {
                    Ok(fresh) => c = fresh,
                    Err(_) => break,
                }
            }
        }
    }
    if let Some((_, line)) = &config.global.tls_ticket_keys {
        if let Err(message) = TicketKeys::from_config(&config.global) {
            errors.push(ConfigError {
                file: file.to_string(),
                line: *line,
                message,
            });
        }
    }
    errors
}

/// Builds the quiche configuration of one frontend (reads its certificate and key); its
/// session tickets use the process's `tickets`.
pub fn quic_config(fe: &Frontend, tickets: &Arc<TicketKeys>) -> Result<quiche::Config, String> {
    let mut c = new_quiche_config(Some(tickets))?;
    for which in [TlsFile::Cert, TlsFile::Key] {
        let (path, _) = fe.tls_file(which);
        load_tls_file(&mut c, which, path).map_err(|reason| {
            format!(
                "frontend '{}': {}",
                fe.name,
                config::cannot_read(which, path, &reason)
            )
        })?;
    }
    c.set_application_protos(quiche::h3::APPLICATION_PROTOCOL)
        .map_err(|e| format!("quiche alpn: {e}"))?;
    c.set_max_idle_timeout(fe.timeouts.client.as_millis().min(u64::MAX as u128) as u64);
    c.set_max_send_udp_payload_size(MAX_SEND_PAYLOAD);
    c.set_max_recv_udp_payload_size(65527);
    // Windows: a client can have this much in flight toward us. Issue #5 derives these from the
    // memory budget; for now they are fixed and documented in the README.
    c.set_initial_max_data(16 * 1024 * 1024);
    c.set_initial_max_stream_data_bidi_remote(1024 * 1024);
    c.set_initial_max_stream_data_bidi_local(1024 * 1024);
    c.set_initial_max_stream_data_uni(128 * 1024);
    c.set_initial_max_streams_bidi(fe.max_concurrent_streams);
    c.set_initial_max_streams_uni(8);
    c.set_active_connection_id_limit(MAX_PATHS);
    c.set_disable_active_migration(false);
    c.enable_hystart(true);
    if fe.allow_0rtt {
        // Tickets then allow early data; what is forwarded from it is decided per request.
        c.enable_early_data();
    }
    Ok(c)
}

/// HTTP/3 error code for a connection-level error (RFC 9114 §8.1).
fn h3_error_code(e: &quiche::h3::Error) -> u64 {
    use quiche::h3::{Error, WireErrorCode as W};
    let code = match e {
        Error::ExcessiveLoad => W::ExcessiveLoad,
        Error::IdError => W::IdError,
        Error::StreamCreationError => W::StreamCreationError,
        Error::ClosedCriticalStream => W::ClosedCriticalStream,
        Error::MissingSettings => W::MissingSettings,
        Error::FrameUnexpected => W::FrameUnexpected,
        Error::FrameError => W::FrameError,
        Error::SettingsError => W::SettingsError,
        Error::MessageError => W::MessageError,
        Error::QpackDecompressionFailed => return 0x200, // QPACK_DECOMPRESSION_FAILED, RFC 9204
        _ => W::InternalError,
    };
    code as u64
}

impl Core {
    /// One datagram from the network. `listener` is the index of the socket it came in on.
    pub fn on_datagram(
        &mut self,
        now: Instant,
        listener: usize,
        from: SocketAddr,
        to: SocketAddr,
        buf: &mut [u8],
    ) {
        self.debug_check_thread();
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += buf.len() as u64;
        let hdr = match quiche::Header::from_slice(buf, CID_LEN) {
            Ok(h) => h,
            Err(_) => {
                self.stats.dropped_unparsable += 1;
                log::trace!("unparsable datagram from {from}");
                return;
            }
        };
        if let Some(&key) = self.cids.get(hdr.dcid.as_ref()) {
            self.deliver(now, key, from, to, buf);
            return;
        }
        // Version first (RFC 9000 §6, §14.1): the long-header type bits are version-specific
        // (QUIC v2 rotates them, RFC 9369 §3.2), so an unknown version gets Version Negotiation
        // (listing v1 and v2) whatever its type bits say, never silence. A Version Negotiation
        // packet itself is never answered (§6.1), nor a datagram too small to start a
        // connection (§5.2.2: 1200 bytes), so the answer can never amplify.
        if hdr.ty != quiche::Type::Short && !quiche::version_is_supported(hdr.version) {
            if hdr.ty == quiche::Type::VersionNegotiation {
                self.stats.dropped_unknown += 1;
                return;
            }
            if buf.len() < 1200 {
                self.stats.dropped_unparsable += 1;
                return;
            }
            let mut out = vec![0u8; MAX_SEND_PAYLOAD];
            if let Ok(n) = quiche::negotiate_version(&hdr.scid, &hdr.dcid, &mut out) {
                out.truncate(n);
                debug_assert!(
                    n <= buf.len(),
                    "version negotiation larger than its trigger"
                );
                self.stats.version_negotiations += 1;
                self.push_stateless(listener, from, to, out);
            }
            return;
        }
        // Not ours: a CID another worker issued (steering off, a client that moved, a group
        // change) goes to its owner, never processed here. Short and Handshake headers always
        // carry one of our CIDs; an Initial only when it answers a Retry (it carries a token;
        // the token is bound to that CID, so only its owner's connection can use it). Other
        // Initials carry the client's random DCID.
        let retry_answer =
            hdr.ty == quiche::Type::Initial && hdr.token.as_ref().is_some_and(|t| !t.is_empty());
        if matches!(hdr.ty, quiche::Type::Short | quiche::Type::Handshake) || retry_answer {
            if let Some(owner) = cid::owner_of(hdr.dcid.as_ref()) {
                if owner != self.worker && owner < self.workers {
                    self.stats.handoffs_out += 1;
                    self.handoffs.push_back(Handoff {
                        worker: owner,
                        listener,
                        from,
                        to,
                        data: buf.to_vec(),
                    });
                    return;
                }
            }
        }
        if hdr.ty == quiche::Type::Short {
            self.answer_unknown_short(now, listener, from, to, hdr.dcid.as_ref(), buf.len());
            return;
        }
        if hdr.ty != quiche::Type::Initial {
            self.stats.dropped_unknown += 1;
            return;
        }
        // A client Initial must be padded to 1200 bytes (§14.1) and carry a DCID of >= 8 (§7.2).
        if buf.len() < 1200 || hdr.dcid.len() < 8 {
            self.stats.dropped_unparsable += 1;
            return;
        }
        let Some(fe_idx) = self.listeners.get(listener).map(|l| l.frontend) else {
            return;
        };
        // Admission control (issue #5): above the budget's high-water mark a new connection
        // would only compete for memory the live ones need. Refuse it (the client's Initial
        // retransmission backs off and retries) and say so once per state change.
        if self.pool.above_high_water() {
            self.stats.refused_conns += 1;
            if !std::mem::replace(&mut self.refusing, true) {
                log::warn!(
                    "worker {}: memory budget above {}%: refusing new connections",
                    self.worker,
                    crate::budget::HIGH_WATER_PCT
                );
            }
            return;
        }
        if std::mem::take(&mut self.refusing) {
            log::info!(
                "worker {}: memory budget below high water: accepting again",
                self.worker
            );
        }
        let Some(fe) = self.frontends.get(fe_idx) else {
            return;
        };
        let token = hdr.token.as_deref().unwrap_or(&[]);
        // A client answering our Retry addresses the CID that Retry chose, one of ours; the token
        // is bound to it. Any other DCID means the token is not one of ours (most likely a
        // NEW_TOKEN token from whatever server had this address before): RFC 9000 §8.1.3, go
        // on as if there were none, without spending an HMAC on it.
        let validated = if token.is_empty() || cid::owner_of(hdr.dcid.as_ref()).is_none() {
            None
        } else {
            match token::validate(
                &self.secret,
                self.unix_time(now),
                from,
                hdr.dcid.as_ref(),
                token,
            ) {
                Ok(odcid) => Some(odcid),
                Err(token::TokenError::Malformed) => {
                    // Not our layout either: a foreign token after all (a DCID shaped like ours
                    // by chance). As if there were none (a Retry or a plain accept below).
                    log::debug!("ignoring a foreign token from {from}");
                    None
                }
                Err(e) => {
                    // Ours, but expired or bound to another address (the client's NAT rebound
                    // after our Retry), or forged. It proves nothing, and the client will not
                    // take a second Retry: close with INVALID_TOKEN (§8.1.3) so it fails now
                    // instead of at its handshake timeout.
                    log::debug!("invalid retry token from {from}: {e:?}");
                    self.answer_invalid_token(now, listener, from, to, &hdr, buf.len());
                    return;
                }
            }
        };
        let want_retry = match fe.retry {
            RetryMode::Always => true,
            RetryMode::Auto => self.half_open >= fe.retry_threshold,
            RetryMode::Off => false,
        };
        if validated.is_none() && want_retry {
            self.send_retry(now, listener, from, to, &hdr);
            return;
        }
        // After a Retry the client's DCID is the SCID of our Retry packet: it becomes the
        // connection's own CID (it is ours: our length, our worker byte).
        let (scid, odcid) = match &validated {
            Some(odcid) if cid::owner_of(hdr.dcid.as_ref()) == Some(self.worker) => {
                let mut scid = [0u8; CID_LEN];
                scid.copy_from_slice(hdr.dcid.as_ref());
                (scid, Some(odcid.as_slice()))
            }
            Some(_) => {
                // A valid token for a CID of a worker this process does not have (another
                // node sharing the cluster secret, a different worker count): the connection
                // cannot live here under that CID, and the client takes no second Retry.
                self.answer_invalid_token(now, listener, from, to, &hdr, buf.len());
                return;
            }
            None => (cid::new_cid(self.worker), None),
        };
        let key = match self.accept(now, listener, from, to, hdr.dcid.as_ref(), scid, odcid) {
            Some(k) => k,
            None => return,
        };
        self.deliver(now, key, from, to, buf);
    }

    fn push_stateless(&mut self, listener: usize, to: SocketAddr, from: SocketAddr, data: Vec<u8>) {
        let len = data.len();
        self.stateless.push_back((
            Transmit {
                listener,
                to,
                from,
                len,
                segment_size: None,
            },
            data,
        ));
    }

    /// Address validation (RFC 9000 §8.1.2): answer with a Retry carrying a token bound to the
    /// client's address, its original DCID and the new SCID; no state is kept.
    fn send_retry(
        &mut self,
        now: Instant,
        listener: usize,
        from: SocketAddr,
        to: SocketAddr,
        hdr: &quiche::Header,
    ) {
        let new_scid = cid::new_cid(self.worker);
        let tok = token::mint(
            &self.secret,
            self.unix_time(now),
            from,
            hdr.dcid.as_ref(),
            &new_scid,
        );
        let mut out = vec![0u8; MAX_SEND_PAYLOAD];
        let scid_ref = quiche::ConnectionId::from_ref(&new_scid);
        match quiche::retry(&hdr.scid, &hdr.dcid, &scid_ref, &tok, hdr.version, &mut out) {
            Ok(n) => {
                out.truncate(n);
                self.stats.retries_sent += 1;
                self.push_stateless(listener, from, to, out);
            }
            Err(e) => log::debug!("retry to {from} failed: {e}"),
        }
    }

    fn deliver(
        &mut self,
        _now: Instant,
        key: ConnKey,
        from: SocketAddr,
        to: SocketAddr,
        buf: &mut [u8],
    ) {
        self.breadcrumb(Some(key), None);
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        match c.q.recv(buf, quiche::RecvInfo { from, to }) {
            Ok(_) => c.peer = from,
            Err(quiche::Error::Done) => {}
            Err(e) => log::debug!("{}: recv: {e}", c.q.trace_id()),
        }
        self.mark_dirty(key);
    }

    #[allow(clippy::too_many_arguments)]
    fn accept(
        &mut self,
        now: Instant,
        listener: usize,
        from: SocketAddr,
        to: SocketAddr,
        client_dcid: &[u8],
        scid: [u8; CID_LEN],
        odcid: Option<&[u8]>,
    ) -> Option<ConnKey> {
        if self.drain_deadline.is_some() {
            self.stats.dropped_at_capacity += 1;
            return None;
        }
        let fe_idx = self.listeners.get(listener)?.frontend;
        let fe = self.frontends.get(fe_idx)?;
        let live_on_frontend = self.frontend_conns.get(fe_idx).copied().unwrap_or(0);
        // Refuse before allocating anything (sozu's can_accept): limits are checked here only.
        if self.conns.is_full() || live_on_frontend >= fe.max_connections {
            self.stats.dropped_at_capacity += 1;
            log::debug!("refusing connection from {from}: at capacity");
            return None;
        }
        let qcfg = self.quic.get_mut(fe_idx)?;
        qcfg.set_stateless_reset_token(Some(self.secret.reset_token(&scid)));
        let scid_ref = quiche::ConnectionId::from_ref(&scid);
        let odcid_ref = odcid.map(quiche::ConnectionId::from_ref);
        let q = match quiche::accept(&scid_ref, odcid_ref.as_ref(), to, from, qcfg) {
            Ok(q) => q,
            Err(e) => {
                log::debug!("accept from {from} failed: {e}");
                return None;
            }
        };
        let conn = Conn {
            q,
            h3: None,
            listener,
            frontend: fe_idx,
            peer: from,
            streams: HashMap::new(),
            cids: vec![scid.to_vec()],
            dirty: false,
            timer_at: None,
            handshake_at: None,
            next_stream_id: 0,
            goaway: None,
            flushing: Vec::new(),
            last_body_at: None,
            rotation: 0,
            established: false,
            held: Vec::new(),
        };
        let key = self.conns.insert(conn).ok()?;
        self.cids.insert(scid.to_vec(), key);
        // The client keeps using its own DCID until it learns ours; route it too, unless a live
        // connection already owns those bytes (a collision must not hijack it).
        if let std::collections::hash_map::Entry::Vacant(e) = self.cids.entry(client_dcid.to_vec())
        {
            e.insert(key);
            if let Some(c) = self.conns.get_mut(key) {
                c.cids.push(client_dcid.to_vec());
            }
        }
        self.half_open += 1;
        self.stats.conns_accepted += 1;
        if let Some(n) = self.frontend_conns.get_mut(fe_idx) {
            *n += 1;
        }
        let handshake = self.frontends.get(fe_idx).map(|f| f.timeouts.handshake);
        if let (Some(t), Some(c)) = (handshake, self.conns.get_mut(key)) {
            c.handshake_at = Some(now + t);
            self.schedule(None, now + t, Timer::Handshake(key));
        }
        log::debug!("new connection {key:?} from {from}");
        Some(key)
    }

    /// A Retry token of ours this worker cannot use: counted, and answered with
    /// CONNECTION_CLOSE(INVALID_TOKEN) within the per-second bound.
    fn answer_invalid_token(
        &mut self,
        now: Instant,
        listener: usize,
        from: SocketAddr,
        to: SocketAddr,
        hdr: &quiche::Header,
        trigger_len: usize,
    ) {
        self.stats.retry_token_invalid += 1;
        // The bound first: over it, not even the key derivation is spent on the packet.
        if !self.close_rate.take(now, STATELESS_PER_SEC) {
            return;
        }
        let Some(pkt) = initial::invalid_token_close(hdr.version, &hdr.dcid, &hdr.scid) else {
            return;
        };
        // Never more bytes than the trigger (it was a padded Initial, so this always holds).
        if pkt.len() > trigger_len {
            return;
        }
        self.stats.invalid_token_closes += 1;
        self.push_stateless(listener, from, to, pkt);
    }

    fn answer_unknown_short(
        &mut self,
        now: Instant,
        listener: usize,
        from: SocketAddr,
        to: SocketAddr,
        dcid: &[u8],
        len: usize,
    ) {
        self.stats.dropped_unknown += 1;
        // Only CIDs that could be ours (our length, our worker) get a reset; the token is then
        // the one we would have advertised, so a client whose connection we lost learns it.
        if cid::owner_of(dcid).is_none() {
            return;
        }
        // Cheap checks and the bound before the HMAC and the random bytes.
        if !cid::reset_fits(len) || !self.reset_rate.take(now, STATELESS_PER_SEC) {
            return;
        }
        let mut out = vec![0u8; 64];
        if let Some(n) = cid::stateless_reset(&self.secret, dcid, len, &mut out) {
            out.truncate(n);
            self.stats.stateless_resets += 1;
            self.push_stateless(listener, from, to, out);
        }
    }

    /// Everything a connection needs after input: HTTP/3 events, pending stream output, path
    /// events, CID top-up, close when drained.
    pub(crate) fn service_conn(&mut self, key: ConnKey, now: Instant) {
        let mut handshake_done = None;
        let mut released = Vec::new();
        let h3_ready = {
            let Some(c) = self.conns.get_mut(key) else {
                return;
            };
            if c.q.is_established() && !c.established {
                c.established = true;
                handshake_done = c.handshake_at.take();
                debug_assert!(self.half_open > 0);
                self.half_open = self.half_open.saturating_sub(1);
                self.stats.handshakes += 1;
                log::debug!(
                    "{}: established, alpn h3, QUIC version {:#x}",
                    c.q.trace_id(),
                    c.q.version()
                );
                released = std::mem::take(&mut c.held);
            }
            // In 0-RTT the client's requests arrive before the handshake completes.
            if (c.q.is_established() || c.q.is_in_early_data()) && c.h3.is_none() {
                match quiche::h3::Connection::with_transport(&mut c.q, &self.h3_config) {
                    Ok(h3) => {
                        c.h3 = Some(h3);
                        if self.drain_deadline.is_some() {
                            // Established during shutdown: tell it at once not to send requests.
                            self.send_goaway(key);
                        }
                    }
                    Err(e) => {
                        log::debug!("{}: h3 setup failed: {e}", c.q.trace_id());
                        let _ = c.q.close(true, H3_INTERNAL_ERROR, b"h3 setup");
                    }
                }
            }
            self.conns.get(key).is_some_and(|c| c.h3.is_some())
        };
        self.unschedule(handshake_done, Timer::Handshake(key));
        for (sk, need) in released {
            self.release_held(now, sk, need);
        }
        if h3_ready {
            self.poll_h3(key, now);
            self.push_streams(key, now);
        }
        self.path_events(key);
        self.top_up_cids(key);
        if let Some(c) = self.conns.get_mut(key) {
            let draining = self.drain_deadline.is_some();
            if draining || c.flushing.len() > 64 {
                let q = &mut c.q;
                c.flushing.retain(|&sid| {
                    !matches!(
                        q.stream_capacity(sid),
                        Err(quiche::Error::InvalidStreamState(_))
                    )
                });
            }
            if draining
                && c.streams.is_empty()
                && c.flushing.is_empty()
                && !c.q.is_closed()
                && !c.q.is_draining()
            {
                let _ = c.q.close(true, H3_NO_ERROR, b"");
            }
        }
    }

    fn poll_h3(&mut self, key: ConnKey, now: Instant) {
        loop {
            let ev = {
                let Some(c) = self.conns.get_mut(key) else {
                    return;
                };
                let Some(h3) = c.h3.as_mut() else { return };
                h3.poll(&mut c.q)
            };
            match ev {
                Ok((sid, quiche::h3::Event::Headers { list, more_frames })) => {
                    self.on_request_headers(now, key, sid, list, more_frames)
                }
                Ok((sid, quiche::h3::Event::Data)) => self.on_request_data(now, key, sid),
                Ok((sid, quiche::h3::Event::Finished)) => self.on_request_finished(now, key, sid),
                Ok((sid, quiche::h3::Event::Reset(code))) => self.on_request_reset(key, sid, code),
                Ok((_, quiche::h3::Event::GoAway)) | Ok((_, quiche::h3::Event::PriorityUpdate)) => {
                }
                Err(quiche::h3::Error::Done) => return,
                Err(e) => {
                    // Connection-level HTTP/3 error: quiche has already queued CONNECTION_CLOSE
                    // with the right code where the error is the peer's fault.
                    if let Some(c) = self.conns.get_mut(key) {
                        log::debug!("{}: h3 error: {e}", c.q.trace_id());
                        if !c.q.is_closed() && !c.q.is_draining() {
                            let _ = c.q.close(true, h3_error_code(&e), b"");
                        }
                    }
                    return;
                }
            }
        }
    }

    /// Lets every stream of the connection move pending response data into quiche.
    fn push_streams(&mut self, key: ConnKey, now: Instant) {
        let mut sks: Vec<(u64, StreamKey)> = match self.conns.get_mut(key) {
            Some(c) => {
                c.rotation = c.rotation.wrapping_add(1);
                c.streams.iter().map(|(&id, &sk)| (id, sk)).collect()
            }
            None => return,
        };
        // Fairness: streams share the connection's send capacity, and the first to write takes
        // it. Start from a different stream on every pass so none starves behind the others.
        sks.sort_unstable_by_key(|&(id, _)| id);
        if let Some(c) = self.conns.get(key) {
            if !sks.is_empty() {
                let n = c.rotation % sks.len();
                sks.rotate_left(n);
            }
        }
        for (_, sk) in sks {
            self.pump_request(now, sk);
            self.pump_response(now, sk);
        }
    }

    fn path_events(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        while let Some(ev) = c.q.path_event_next() {
            match ev {
                quiche::PathEvent::PeerMigrated(local, peer) => {
                    self.stats.migrations += 1;
                    c.peer = peer;
                    log::debug!(
                        "{}: peer migrated to {peer} (local {local})",
                        c.q.trace_id()
                    );
                }
                quiche::PathEvent::Closed(local, peer) => {
                    self.stats.paths_freed += 1;
                    log::debug!("{}: path {peer} (local {local}) freed", c.q.trace_id());
                }
                other => log::trace!("{}: path event {other:?}", c.q.trace_id()),
            }
        }
        while let Some(retired) = c.q.retired_scid_next() {
            let bytes = retired.as_ref().to_vec();
            if self.cids.get(&bytes) == Some(&key) {
                self.cids.remove(&bytes);
            }
            c.cids.retain(|x| *x != bytes);
        }
    }

    /// Keeps spare CIDs issued so a client can migrate or survive NAT rebinding.
    fn top_up_cids(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if !c.q.is_established() || c.q.is_closed() {
            return;
        }
        let mut guard = 0;
        while c.q.scids_left() > 0 && guard < ACTIVE_CIDS {
            guard += 1;
            let new = cid::new_cid(self.worker);
            if self.cids.contains_key(new.as_slice()) {
                continue;
            }
            let token = self.secret.reset_token(&new);
            match c
                .q
                .new_scid(&quiche::ConnectionId::from_ref(&new), token, false)
            {
                Ok(_) => {
                    self.cids.insert(new.to_vec(), key);
                    c.cids.push(new.to_vec());
                }
                Err(_) => break,
            }
        }
    }

    pub(crate) fn send_goaway(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        match c.h3.as_mut() {
            Some(h3) => {
                let id = c.next_stream_id;
                if h3.send_goaway(&mut c.q, id).is_ok() {
                    c.goaway = Some(id);
                    log::debug!("{}: GOAWAY {id}", c.q.trace_id());
                }
            }
            None => {
                // Still handshaking: nothing in flight to protect.
                let _ = c.q.close(true, H3_NO_ERROR, b"shutting down");
            }
        }
    }

    /// Next packet of the connection at the front of the send queue; `None` when it has nothing
    /// more (then its timer is refreshed and a closed connection is reaped).
    pub(crate) fn conn_send(&mut self, key: ConnKey, buf: &mut [u8]) -> Option<Transmit> {
        let c = self.conns.get_mut(key)?;
        match c.q.send(buf) {
            Ok((first, info)) => {
                // GSO batch: more packets for the same path, each exactly `first` bytes (the
                // kernel cuts at that size), ending at a short packet, the batch limit or the
                // caller's buffer. Only the last may be shorter.
                let mut len = first;
                let mut segments = 1;
                let quantum = c.q.send_quantum().max(first);
                while segments < self.gso_segments
                    && len + first <= buf.len()
                    && len + first <= quantum
                {
                    let Some(room) = buf.get_mut(len..len + first) else {
                        break;
                    };
                    match c.q.send_on_path(room, Some(info.from), Some(info.to)) {
                        Ok((n, _)) => {
                            len += n;
                            segments += 1;
                            if n < first {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
                if segments > 1 {
                    self.stats.gso_batches += 1;
                }
                self.stats.datagrams_out += segments as u64 - 1;
                Some(Transmit {
                    listener: c.listener,
                    to: info.to,
                    from: info.from,
                    len,
                    segment_size: (segments > 1).then_some(first),
                })
            }
            Err(e) => {
                if e != quiche::Error::Done {
                    log::debug!("{}: send: {e}", c.q.trace_id());
                    let _ = c.q.close(false, 0x1, b"");
                }
                self.after_send(key);
                None
            }
        }
    }

    fn after_send(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if c.q.is_closed() {
            self.reap(key);
            return;
        }
        if let Some(at) = c.q.timeout_instant() {
            if c.timer_at != Some(at) {
                let old = c.timer_at.replace(at);
                self.schedule(old, at, Timer::Conn(key));
            }
        }
    }

    pub(crate) fn conn_timer(&mut self, key: ConnKey, at: Instant, now: Instant) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        debug_assert_eq!(c.timer_at, Some(at), "a fired entry is the armed one");
        if c.timer_at != Some(at) {
            return;
        }
        c.timer_at = None;
        if c.q.timeout_instant().is_some_and(|t| t <= now) {
            c.q.on_timeout();
        }
        self.mark_dirty(key);
    }

    /// `timeout handshake`: a connection still not established is closed (half-open
    /// connections cost memory and CPU; this bounds what a flood of Initials can hold).
    pub(crate) fn handshake_timer(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        c.handshake_at = None;
        if c.q.is_established() || c.q.is_closed() {
            return;
        }
        log::debug!("{}: handshake timeout", c.q.trace_id());
        let _ = c.q.close(false, 0x0, b"handshake timeout");
        self.mark_dirty(key);
    }

    /// Removes a closed connection, its streams and its routing entries.
    fn reap(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get(key) else { return };
        let sks: Vec<StreamKey> = c.streams.values().copied().collect();
        for sk in sks {
            self.drop_stream(sk);
        }
        let Some(c) = self.conns.remove(key) else {
            return;
        };
        self.unschedule(c.timer_at, Timer::Conn(key));
        self.unschedule(c.handshake_at, Timer::Handshake(key));
        for id in &c.cids {
            if self.cids.get(id) == Some(&key) {
                self.cids.remove(id);
            }
        }
        self.stats.conns_closed += 1;
        if !c.established {
            debug_assert!(self.half_open > 0);
            self.half_open = self.half_open.saturating_sub(1);
        }
        if let Some(n) = self.frontend_conns.get_mut(c.frontend) {
            debug_assert!(*n > 0);
            *n = n.saturating_sub(1);
        }
        let s = c.q.stats();
        log::debug!(
            "{}: closed (peer error {:?}, local error {:?}, {} pkts in, {} out, {} lost)",
            c.q.trace_id(),
            c.q.peer_error(),
            c.q.local_error(),
            s.recv,
            s.sent,
            s.lost
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Listener;

    const LISTEN: &str = "127.0.0.1:4433";

    fn core(retry: &str, now: Instant) -> Core {
        core_of(0, retry, now)
    }

    /// Worker `worker`'s core; every core here shares one secret, as the workers of a process do.
    fn core_of(worker: u8, retry: &str, now: Instant) -> Core {
        let dir = env!("CARGO_MANIFEST_DIR");
        let text = format!(
            "global\n    workers 1\nfrontend web\n    bind {LISTEN}\n    \
             cert {dir}/tests/data/cert.pem\n    key {dir}/tests/data/key.pem\n    \
             default_backend app\n    quic-retry {retry}\nbackend app\n    server s0 127.0.0.1:9\n"
        );
        let config = crate::config::parse("t.conf", &text).expect("config");
        let tickets = Arc::new(TicketKeys::rotating([0; 32]));
        let qc = quic_config(&config.frontends[0], &tickets).expect("quic config");
        let listener = Listener {
            frontend: 0,
            local: LISTEN.parse().expect("addr"),
        };
        Core::new(
            worker,
            &config,
            vec![listener],
            vec![qc],
            cid::Secret::from_bytes([5; 32]),
            now,
        )
        .expect("core")
    }

    /// Everything the core sends now.
    fn drain(core: &mut Core, now: Instant) -> Vec<Vec<u8>> {
        core.flush(now);
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        while let Some(t) = core.poll_transmit(now, &mut buf) {
            out.push(buf[..t.len].to_vec());
        }
        out
    }

    /// A QUIC v2 Initial (RFC 9369: type bits 0b01, which v1 reads as 0-RTT) and an unknown
    /// version both get Version Negotiation at once; a Version Negotiation packet gets nothing.
    #[test]
    fn unknown_versions_get_version_negotiation_listing_v1_and_v2() {
        let now = Instant::now();
        let from: SocketAddr = "10.0.0.7:5555".parse().expect("addr");
        let to: SocketAddr = LISTEN.parse().expect("addr");
        let long = |first: u8, version: u32| {
            let mut d = vec![first];
            d.extend_from_slice(&version.to_be_bytes());
            d.push(8);
            d.extend_from_slice(&[0xaa; 8]);
            d.push(8);
            d.extend_from_slice(&[0xbb; 8]);
            d.resize(1200, 0);
            d
        };
        for (what, first, version) in [
            ("unknown version, v1 Initial bits", 0xc0, 0x1a2a_3a4a),
            ("unknown version, v1 0-RTT bits", 0xd0, 0x1a2a_3a4a),
            ("draft 29", 0xc0, 0xff00_001d),
        ] {
            let mut core = core("off", now);
            let mut d = long(first, version);
            core.on_datagram(now, 0, from, to, &mut d);
            let out = drain(&mut core, now);
            assert_eq!(out.len(), 1, "{what}: {} datagrams", out.len());
            let vn = &out[0];
            assert!(vn[0] & 0x80 != 0, "{what}: not a long header");
            assert_eq!(vn[1..5], [0, 0, 0, 0], "{what}: not version negotiation");
            // The client's SCID comes back as the DCID.
            assert_eq!(vn[5], 8);
            assert_eq!(vn[6..14], [0xbb; 8], "{what}");
            assert!(vn.len() < d.len(), "{what}: {} bytes", vn.len());
            // Then our SCID (the client's DCID) and the versions we speak.
            assert_eq!(vn[14], 8);
            assert_eq!(vn[15..23], [0xaa; 8], "{what}");
            assert_eq!(vn[23..], [0, 0, 0, 1, 0x6b, 0x33, 0x43, 0xcf], "{what}");
            assert_eq!(core.stats.version_negotiations, 1, "{what}");
        }
        let mut core = core("off", now);
        let mut d = long(0xc0, 0);
        core.on_datagram(now, 0, from, to, &mut d);
        assert!(
            drain(&mut core, now).is_empty(),
            "answered a version negotiation"
        );
        // A long header too short to start a connection (a junk datagram, a spoofed probe)
        // gets nothing: a Version Negotiation answer could be larger than it.
        let mut small = self::core("off", now);
        let mut d = long(0xd0, 0x1a2a_3a4a);
        d.truncate(30);
        small.on_datagram(now, 0, from, to, &mut d);
        assert!(
            drain(&mut small, now).is_empty(),
            "answered a 30-byte datagram"
        );
        assert_eq!(small.stats.dropped_unparsable, 1);
    }

    /// A client starting in QUIC v2 (RFC 9369) is accepted in v2: a connection, and an answer in
    /// v2 long headers with v2's Initial type bits.
    #[test]
    fn a_v2_initial_is_accepted_in_v2() {
        let now = Instant::now();
        let from: SocketAddr = "10.0.0.7:5555".parse().expect("addr");
        let to: SocketAddr = LISTEN.parse().expect("addr");
        let mut core = core("off", now);
        let (_client, mut first) =
            crate::initial::testing::client_v(quiche::PROTOCOL_VERSION_V2, &[7; 16], from, to);
        assert_eq!((first[0] & 0x30) >> 4, 0b01, "a v2 Initial");
        core.on_datagram(now, 0, from, to, &mut first);
        assert_eq!(core.live().0, 1, "no connection for a v2 Initial");
        assert_eq!(core.stats.version_negotiations, 0);
        let mut out = drain(&mut core, now);
        assert!(!out.is_empty(), "no answer to a v2 Initial");
        let hdr = quiche::Header::from_slice(&mut out[0], 16).expect("a QUIC packet");
        assert_eq!(hdr.version, quiche::PROTOCOL_VERSION_V2);
        assert_eq!(hdr.ty, quiche::Type::Initial);
    }

    /// A quiche client that took a Retry carrying `token` (ours or anyone's) and the Initial
    /// it sends next, which carries that token.
    fn client_after_retry(
        from: SocketAddr,
        retry_scid: &[u8],
        token: &[u8],
    ) -> (quiche::Connection, Vec<u8>) {
        let server: SocketAddr = LISTEN.parse().expect("addr");
        let (mut q, mut first) = initial::testing::client(&[0x42; 16], from, server);
        let mut retry = initial::testing::retry(&mut first, retry_scid, token);
        let info = quiche::RecvInfo {
            from: server,
            to: from,
        };
        q.recv(&mut retry, info).expect("client takes the retry");
        let next = next_datagram(&mut q);
        (q, next)
    }

    /// The next datagram the client sends.
    fn next_datagram(q: &mut quiche::Connection) -> Vec<u8> {
        let mut buf = vec![0u8; 1500];
        let (n, _) = q.send(&mut buf).expect("send");
        buf.truncate(n);
        buf
    }

    fn ty(pkt: &mut [u8]) -> quiche::Type {
        quiche::Header::from_slice(pkt, CID_LEN).expect("hdr").ty
    }

    /// A token that is not one of ours (a NEW_TOKEN token from the server that had this address
    /// before) counts as no token: RFC 9000 §8.1.3. Dropping it would leave the client hanging.
    /// Two shapes: a DCID we would never issue (8 bytes; no HMAC is spent on it) and one shaped
    /// like ours by chance (16 bytes, a worker byte this process does not have).
    #[test]
    fn foreign_token_is_treated_as_no_token() {
        let now = Instant::now();
        let from: SocketAddr = "192.0.2.7:5000".parse().expect("addr");
        let to: SocketAddr = LISTEN.parse().expect("addr");
        for dcid in [&[0x77u8; 8][..], &[0x77u8; 16][..]] {
            // quic-retry always: we answer with a Retry, as to a client without a token.
            let mut c = core("always", now);
            let (_, mut init) = client_after_retry(from, dcid, b"someone else's token");
            c.on_datagram(now, 0, from, to, &mut init);
            let mut out = drain(&mut c, now);
            assert_eq!(out.len(), 1);
            assert_eq!(ty(&mut out[0]), quiche::Type::Retry);
            assert_eq!(c.stats().retry_token_invalid, 0);
            // quic-retry off: accepted.
            let mut c = core("off", now);
            let (_, mut init) = client_after_retry(from, dcid, b"someone else's token");
            c.on_datagram(now, 0, from, to, &mut init);
            assert_eq!(c.live().0, 1);
            assert_eq!(c.stats().retry_token_invalid, 0);
        }
    }

    /// A valid token for a CID of another worker: handed to that worker (its Retry, its CID);
    /// when no worker of this process owns the CID (another node sharing the cluster secret,
    /// with more workers), the client gets INVALID_TOKEN at once rather than hanging.
    #[test]
    fn retry_answer_for_another_worker_is_handed_over() {
        let now = Instant::now();
        let from: SocketAddr = "192.0.2.7:5000".parse().expect("addr");
        let to: SocketAddr = LISTEN.parse().expect("addr");
        // Worker 1 answers the first Initial with a Retry (its CID, our shared secret).
        let mut w1 = core_of(1, "always", now);
        w1.set_workers(2);
        let (mut q, mut first) = initial::testing::client(&[0x42; 16], from, to);
        w1.on_datagram(now, 0, from, to, &mut first);
        let mut out = drain(&mut w1, now);
        assert_eq!(ty(&mut out[0]), quiche::Type::Retry);
        q.recv(&mut out[0], quiche::RecvInfo { from: to, to: from })
            .expect("client takes the retry");
        let init = next_datagram(&mut q);
        // The answer lands on worker 0 (no kernel steering): handed to worker 1.
        let mut w0 = core_of(0, "always", now);
        w0.set_workers(2);
        w0.on_datagram(now, 0, from, to, &mut init.clone());
        let h = w0.poll_handoff().expect("handed off");
        assert_eq!(h.worker, 1);
        assert!(drain(&mut w0, now).is_empty());
        assert_eq!(w0.live().0, 0);
        // Worker 1 accepts it.
        w1.on_datagram(now, 0, from, to, &mut h.data.clone());
        assert_eq!(w1.live().0, 1);
        assert_eq!(w1.stats().retry_token_invalid, 0);
        // A process with one worker has nobody to hand it to: INVALID_TOKEN.
        let mut solo = core_of(0, "always", now);
        solo.on_datagram(now, 0, from, to, &mut init.clone());
        let mut out = drain(&mut solo, now);
        assert_eq!(out.len(), 1);
        assert_eq!(solo.live().0, 0);
        q.recv(&mut out[0], quiche::RecvInfo { from: to, to: from })
            .expect("client reads the close");
        assert_eq!(
            q.peer_error().map(|e| e.error_code),
            Some(initial::INVALID_TOKEN)
        );
    }

    /// NAT rebinding between our Retry and the client's next Initial: the token names the old
    /// address. The core answers with a stateless CONNECTION_CLOSE(INVALID_TOKEN), no bigger
    /// than the trigger and bounded per second, and keeps no state.
    #[test]
    fn token_for_another_address_gets_invalid_token_close() {
        let now = Instant::now();
        let old: SocketAddr = "192.0.2.7:5000".parse().expect("addr");
        let new: SocketAddr = "192.0.2.7:5001".parse().expect("addr");
        let to: SocketAddr = LISTEN.parse().expect("addr");
        let mut c = core("always", now);
        // Someone spends this second's stateless resets first: the closes have their own bound.
        for i in 0..150u8 {
            let mut short = vec![0x40u8; 100];
            short[1] = 0; // worker 0: a CID shaped like ours
            short[2] = i;
            c.on_datagram(
                now,
                0,
                "198.51.100.1:9".parse().expect("addr"),
                to,
                &mut short,
            );
        }
        assert_eq!(drain(&mut c, now).len(), STATELESS_PER_SEC as usize);
        assert_eq!(c.stats().stateless_resets, u64::from(STATELESS_PER_SEC));
        // First flight from the old port: the core's Retry.
        let (mut q, mut first) = initial::testing::client(&[0x42; 16], old, to);
        c.on_datagram(now, 0, old, to, &mut first);
        let mut out = drain(&mut c, now);
        assert_eq!(out.len(), 1);
        assert_eq!(ty(&mut out[0]), quiche::Type::Retry);
        q.recv(&mut out[0], quiche::RecvInfo { from: to, to: old })
            .expect("client takes the retry");
        // The NAT rebinds: the token-carrying Initial arrives from a new port.
        let init = next_datagram(&mut q);
        c.on_datagram(now, 0, new, to, &mut init.clone());
        let mut out = drain(&mut c, now);
        assert_eq!(out.len(), 1, "one close");
        assert!(out[0].len() < init.len());
        assert_eq!(c.live().0, 0, "no state kept");
        // The NAT maps it back: the client still sees its own, unchanged address.
        q.recv(&mut out[0], quiche::RecvInfo { from: to, to: old })
            .expect("client reads the close");
        let e = q.peer_error().expect("closed by the server");
        assert!(!e.is_app);
        assert_eq!(e.error_code, initial::INVALID_TOKEN);
        // Rate bound: the same trigger 150 times in one second gets 100 answers.
        for _ in 1..150 {
            c.on_datagram(now, 0, new, to, &mut init.clone());
        }
        assert_eq!(drain(&mut c, now).len(), STATELESS_PER_SEC as usize - 1);
        let s = c.stats();
        assert_eq!(s.retry_token_invalid, 150);
        assert_eq!(s.invalid_token_closes, u64::from(STATELESS_PER_SEC));
        assert_eq!(c.live().0, 0);
    }

    #[test]
    fn tls_errors_name_the_cert_and_key_lines() {
        let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
        let (cert, key) = (format!("{data}/cert.pem"), format!("{data}/key.pem"));
        let dir = std::env::temp_dir().join(format!("h3gate-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage.pem").display().to_string();
        std::fs::write(&garbage, "not PEM at all\n").unwrap();
        let missing = dir.join("missing.pem").display().to_string();
        // cert on line 3, key on line 4.
        let errors_for = |cert: &str, key: &str| -> Vec<String> {
            let text = format!(
                "frontend web\n bind 127.0.0.1:4433\n cert {cert}\n key {key}\n \
                 default_backend app\nbackend app\n server s 127.0.0.1:9\n"
            );
            let config = config::parse("t.conf", &text).expect("config");
            tls_errors("t.conf", &config)
                .iter()
                .map(|e| e.to_string())
                .collect()
        };
        assert!(errors_for(&cert, &key).is_empty());

        let e = errors_for(&missing, &key);
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(
            e[0].starts_with(&format!(
                "t.conf:3: cannot read certificate {missing}: No such file"
            )),
            "{e:#?}"
        );
        let e = errors_for(&cert, &missing);
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(
            e[0].starts_with(&format!(
                "t.conf:4: cannot read key {missing}: No such file"
            )),
            "{e:#?}"
        );
        let e = errors_for(&garbage, &key);
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(
            e[0].starts_with(&format!(
                "t.conf:3: cannot read certificate {garbage}: not a valid PEM certificate chain ("
            )),
            "{e:#?}"
        );
        // A certificate where the key belongs: the load that `run` does rejects it.
        let e = errors_for(&cert, &cert);
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(
            e[0].starts_with(&format!(
                "t.conf:4: cannot read key {cert}: not a valid PEM"
            )),
            "{e:#?}"
        );
        // A bad certificate does not hide a bad key.
        let e = errors_for(&garbage, &garbage);
        assert_eq!(e.len(), 2, "{e:#?}");
        assert!(
            e[0].starts_with("t.conf:3: cannot read certificate "),
            "{e:#?}"
        );
        assert!(e[1].starts_with("t.conf:4: cannot read key "), "{e:#?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
