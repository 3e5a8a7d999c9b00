//! One worker: one thread, one io_uring, its own UDP socket per bind, its own core. The loop runs
//! the phases in a fixed order: wait, dispatch completions (datagrams and backend results go into
//! the core), drain handed-over datagrams, fire timers, flush the core, then carry its outputs
//! to the ring.
//!
//! Workers share nothing on the packet path. The kernel steers each datagram to the worker whose
//! index is encoded in its DCID (`steering`); a datagram that still reaches the wrong worker is
//! passed to its owner through a bounded queue (std's bounded channel: a lock-free array queue)
//! and an eventfd wake-up, and is never processed by a worker that does not own it.
//!
//! Operations hooks, all off the datagram path: the loop stores its phase and live counts in its
//! `diag` slot (relaxed atomic stores, read by crash reports), publishes a metrics snapshot
//! about every 250 ms (one lock of its own snapshot), and logs its state once per SIGUSR2.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cid::Secret;
use crate::cmsg;
use crate::config::Config;
use crate::core::{self, BackendEvent, BackendKey, Core, Handoff, Stats};
use crate::diag::{self, Phase, Probe};
use crate::frontend;
use crate::metrics::{self, Snapshot};
use crate::ring::{self, Handler, Ring, RingStats};
use crate::tickets::TicketKeys;

/// Longest single wait: bounds how late a stop request is noticed even if no signal interrupts
/// the wait (signals do interrupt it).
const MAX_WAIT: Duration = Duration::from_millis(200);
/// Handed-over datagrams queued per worker; beyond it they are dropped (QUIC recovers).
const HANDOFF_QUEUE: usize = 4096;
/// Segments per GSO send. The kernel accepts 64 (UDP_MAX_SEGMENTS), but a 64-packet burst
/// (86 KB at once) overflowed default client receive buffers on loopback in our tests and the
/// losses stalled slow clients; 16 keeps most of the syscall saving.
const MAX_GSO_SEGMENTS: usize = 16;

/// What a UDP socket turned out to support at start-up (quinn-udp's `UdpSocketState`).
#[derive(Debug, Clone, Copy, Default)]
pub struct UdpCaps {
    pub gso_segments: usize,
    pub gro: bool,
}

/// One bound socket of a worker.
pub struct BoundSocket {
    pub frontend: usize,
    pub socket: std::net::UdpSocket,
    pub caps: UdpCaps,
}

fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: valid fd; pointer to a live c_int of the stated size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds one UDP socket of a SO_REUSEPORT group for `addr` and probes GSO/GRO.
pub fn bind_udp(
    addr: SocketAddr,
    want_gso: bool,
    want_gro: bool,
) -> io::Result<(std::net::UdpSocket, UdpCaps)> {
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(io::Error::from)?;
    socket::setsockopt(&fd, sockopt::ReusePort, &true).map_err(io::Error::from)?;
    if addr.is_ipv6() {
        // Separate v4 and v6 binds can then coexist on one port.
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(io::Error::from)?;
    }
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    let _ = socket::setsockopt(&fd, sockopt::RcvBuf, &(4 << 20));
    let _ = socket::setsockopt(&fd, sockopt::SndBuf, &(4 << 20));
    let raw = fd.as_raw_fd();
    if addr.ip().is_unspecified() {
        // Learn each datagram's destination so replies leave from the address the client used.
        let r = if addr.is_ipv4() {
            setsockopt_int(raw, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
        } else {
            setsockopt_int(raw, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)
        };
        r.map_err(|e| io::Error::new(e.kind(), format!("packet info: {e}")))?;
    }
    let mut caps = UdpCaps {
        gso_segments: 1,
        gro: false,
    };
    // GSO probe (quinn-udp): set UDP_SEGMENT once to see if it is accepted, then clear it so
    // only sends that carry the control message are segmented.
    if want_gso && setsockopt_int(raw, cmsg::SOL_UDP, cmsg::UDP_SEGMENT, 1200).is_ok() {
        let _ = setsockopt_int(raw, cmsg::SOL_UDP, cmsg::UDP_SEGMENT, 0);
        caps.gso_segments = MAX_GSO_SEGMENTS;
    }
    // GRO: receive buffers (ring.rs) hold 64 KiB, i.e. a full batch of coalesced datagrams.
    if want_gro && setsockopt_int(raw, cmsg::SOL_UDP, cmsg::UDP_GRO, 1).is_ok() {
        caps.gro = true;
    }
    socket::bind(raw, &SockaddrStorage::from(addr)).map_err(io::Error::from)?;
    Ok((std::net::UdpSocket::from(fd), caps))
}

/// Classic BPF for SO_ATTACH_REUSEPORT_CBPF: the socket index is the first DCID byte (byte 1 of
/// a short header, byte 6 of a long one) modulo the group size. Our CIDs carry the owner's index
/// there, so packets for a connection reach its worker. A client's first Initial carries its own
/// random DCID: taking it modulo N still sends every packet with that DCID (retransmits
/// included, whatever the source port) to one worker, the one that accepts and then issues CIDs
/// naming itself. (DESIGN.md suggested the 4-tuple hash for Initials; the DCID is steadier.)
pub fn steering_program(workers: u32) -> [libc::sock_filter; 7] {
    let f = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    [
        f(0x30, 0, 0, 0),              // ldb [0]
        f(0x45, 0, 2, 0x80),           // jset #0x80 (long header) ? next : +2
        f(0x30, 0, 0, 6),              // ldb [6]: long header, first DCID byte
        f(0x05, 0, 0, 1),              // ja +1
        f(0x30, 0, 0, 1),              // ldb [1]: short header, first DCID byte
        f(0x94, 0, 0, workers.max(1)), // mod #workers
        f(0x16, 0, 0, 0),              // ret a
    ]
}

/// Attaches the steering program to a SO_REUSEPORT group (through any of its sockets).
pub fn attach_steering(fd: RawFd, workers: u32) -> io::Result<()> {
    let mut prog = steering_program(workers);
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: fprog points at a live program for the duration of the call; the kernel copies it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds every worker's sockets, in worker order for each address (the order of joining is the
/// index the BPF program returns), and attaches steering. Returns the sockets per worker.
pub fn bind_all(config: &Config, workers: usize) -> Result<Vec<Vec<BoundSocket>>, String> {
    let g = &config.global;
    let mut per_worker: Vec<Vec<BoundSocket>> = (0..workers).map(|_| Vec::new()).collect();
    for (fi, fe) in config.frontends.iter().enumerate() {
        for &addr in &fe.binds {
            for (w, list) in per_worker.iter_mut().enumerate() {
                let (socket, caps) = bind_udp(addr, g.gso, g.gro).map_err(|e| {
                    format!("frontend '{}': bind {addr} (worker {w}): {e}", fe.name)
                })?;
                list.push(BoundSocket {
                    frontend: fi,
                    socket,
                    caps,
                });
            }
            let first = per_worker
                .first()
                .and_then(|l| l.last())
                .map(|b| b.socket.as_raw_fd());
            if g.steering && workers > 1 {
                if let Some(fd) = first {
                    match attach_steering(fd, workers as u32) {
                        Ok(()) => log::info!("{addr}: kernel CID steering over {workers} workers"),
                        Err(e) => {
                            log::warn!("{addr}: CID steering unavailable ({e}); using handoff")
                        }
                    }
                }
            }
            if let Some(b) = per_worker.first().and_then(|l| l.last()) {
                log::info!(
                    "{addr}: GSO {}, GRO {}",
                    if b.caps.gso_segments > 1 { "on" } else { "off" },
                    if b.caps.gro { "on" } else { "off" }
                );
            }
        }
    }
    Ok(per_worker)
}

/// A worker's address for handoffs.
#[derive(Clone)]
pub struct Mailbox {
    tx: SyncSender<Handoff>,
    wake: Arc<OwnedFd>,
}

/// A worker's end of the handoff mesh: its inbox and every worker's mailbox.
pub struct Mesh {
    inbox: Receiver<Handoff>,
    wake: Arc<OwnedFd>,
    peers: Vec<Mailbox>,
}

/// Builds the handoff mesh for `n` workers.
pub fn mesh(n: usize) -> io::Result<Vec<Mesh>> {
    let mut inboxes = Vec::new();
    let mut boxes = Vec::new();
    for _ in 0..n {
        // SAFETY: plain eventfd(2); the fd is owned by the OwnedFd from here on.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let (tx, rx) = mpsc::sync_channel(HANDOFF_QUEUE);
        inboxes.push((rx, wake.clone()));
        boxes.push(Mailbox { tx, wake });
    }
    Ok(inboxes
        .into_iter()
        .map(|(inbox, wake)| Mesh {
            inbox,
            wake,
            peers: boxes.clone(),
        })
        .collect())
}

fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a live u64 to an eventfd we hold.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

struct Events<'a> {
    core: &'a mut Core,
    now: Instant,
    woken: bool,
}

impl Handler for Events<'_> {
    fn datagram(&mut self, listener: usize, from: SocketAddr, to: SocketAddr, data: &mut [u8]) {
        self.core.on_datagram(self.now, listener, from, to, data);
    }
    fn backend(&mut self, key: BackendKey, ev: BackendEvent<'_>) {
        self.core.on_backend(self.now, key, ev);
    }
    fn wake(&mut self) {
        self.woken = true;
    }
    fn gso_failed(&mut self) {
        log::warn!("GSO send refused by the kernel (EIO/EINVAL): GSO disabled on this worker");
        self.core.set_gso_segments(1);
    }
}

pub struct WorkerReport {
    pub index: u8,
    pub stats: Stats,
    pub ring: RingStats,
    pub handoff_drops: u64,
}

/// What a worker gets from `main` besides its sockets: its QUIC configurations (built before the
/// privilege drop, since the TLS key may be readable by root only), a channel to say it is
/// serving (or why it cannot), and its metrics snapshot.
pub struct Ops {
    /// One per frontend, in config order.
    pub quic: Vec<quiche::Config>,
    pub ready: mpsc::Sender<(u8, Result<(), String>)>,
    pub snapshot: metrics::Shared,
}

/// QUIC + TLS configuration of every frontend (loads the certificates and keys); every worker
/// gets the same `tickets`, so a session resumes on any of them.
pub fn quic_configs(
    config: &Config,
    tickets: &Arc<TicketKeys>,
) -> Result<Vec<quiche::Config>, String> {
    config
        .frontends
        .iter()
        .map(|fe| frontend::quic_config(fe, tickets))
        .collect()
}

fn snapshot(index: u8, core: &Core, ring: &Ring, handoff_drops: u64, loops: u64) -> Snapshot {
    Snapshot {
        worker: index,
        stats: core.stats(),
        ring: ring.stats.clone(),
        live: core.live(),
        idle_backends: core.idle_backends(),
        handoff_drops,
        loops,
        draining: core.is_draining(),
    }
}

/// Runs worker `index` of `workers` on its bound sockets until `stop` is set and its connections
/// have drained. Reports on `ops.ready` once serving, or with the error that prevents it.
#[allow(clippy::too_many_arguments)]
pub fn run(
    index: u8,
    workers: u8,
    config: &Config,
    secret: Secret,
    stop: &AtomicBool,
    sockets: Vec<BoundSocket>,
    mesh: Mesh,
    ops: Ops,
) -> Result<WorkerReport, String> {
    let mut probe = Probe::register(index);
    let Ops {
        quic,
        ready,
        snapshot: shared,
    } = ops;
    let started = setup(index, workers, config, secret, &sockets, &mesh, quic);
    let _ = ready.send((index, started.as_ref().map(|_| ()).map_err(|e| e.clone())));
    let (mut core, mut ring, drain) = started?;

    let mut handoff_drops = 0u64;
    let mut next_publish = Instant::now();
    let mut woke_peer = vec![false; mesh.peers.len()];
    // A pending transmit that found no free send slot: wait for send completions first.
    let mut send_blocked = false;
    let mut loops: u64 = 0;
    loop {
        loops += 1;
        let now = Instant::now();
        let timeout = if send_blocked {
            Some(Duration::from_millis(1))
        } else {
            let t = core
                .next_deadline()
                .map(|d| d.saturating_duration_since(now))
                .unwrap_or(MAX_WAIT);
            Some(t.min(MAX_WAIT))
        };
        probe.phase(Phase::Wait);
        ring.wait(timeout)
            .map_err(|e| format!("io_uring wait: {e}"))?;

        // Phase: dispatch completions (datagrams, backend results) into the core.
        probe.phase(Phase::Dispatch);
        let now = Instant::now();
        let mut ev = Events {
            core: &mut core,
            now,
            woken: false,
        };
        ring.dispatch(&mut ev);
        // Phase: datagrams other workers handed to us (drained on wake-up and every pass, so a
        // coalesced wake-up never strands one).
        probe.phase(Phase::HandoffIn);
        while let Ok(h) = mesh.inbox.try_recv() {
            core.stats.handoffs_in += 1;
            let mut data = h.data;
            core.on_datagram(now, h.listener, h.from, h.to, &mut data);
        }
        probe.phase(Phase::Timers);
        core.on_timer(now);
        if stop.load(Ordering::Relaxed) && !core.is_draining() {
            log::info!("worker {index}: stopping, draining up to {drain:?}");
            core.shutdown(now, drain);
        }
        probe.phase(Phase::Flush);
        core.flush(now);
        while let Some(a) = core.poll_backend_action() {
            ring.backend(a);
        }
        probe.phase(Phase::Transmit);
        send_blocked = false;
        loop {
            let Some(mut slot) = ring.send_slot() else {
                send_blocked = true;
                break;
            };
            match core.poll_transmit(now, &mut slot.buf) {
                Some(t) => ring.send(slot, t),
                None => {
                    ring.return_slot(slot);
                    break;
                }
            }
        }
        // Backend actions can also come out of poll_transmit (reaping a connection closes its
        // backend connections).
        while let Some(a) = core.poll_backend_action() {
            ring.backend(a);
        }
        // Phase: hand datagrams for other workers' connections to their owners.
        probe.phase(Phase::HandoffOut);
        while let Some(h) = core.poll_handoff() {
            let w = usize::from(h.worker);
            let Some(peer) = mesh.peers.get(w) else {
                continue;
            };
            match peer.tx.try_send(h) {
                Ok(()) => {
                    if let Some(flag) = woke_peer.get_mut(w) {
                        *flag = true;
                    }
                }
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    handoff_drops += 1
                }
            }
        }
        for (w, flag) in woke_peer.iter_mut().enumerate() {
            if std::mem::take(flag) {
                if let Some(peer) = mesh.peers.get(w) {
                    wake(&peer.wake);
                }
            }
        }
        core.check_invariants_every(loops);
        if core.take_trim_hint() {
            // A load peak passed: hand freed heap pages back so RSS follows the budget down.
            // SAFETY: malloc_trim only releases free memory of this process's heap.
            unsafe { libc::malloc_trim(0) };
        }
        // Phase: operations hooks (crash-report state every pass; metrics and dumps rarely).
        probe.live(core.live(), loops);
        let dump = probe.dump_requested();
        if dump || now >= next_publish {
            probe.phase(Phase::Publish);
            let snap = snapshot(index, &core, &ring, handoff_drops, loops);
            if dump {
                log_state(&snap);
            }
            metrics::publish(&shared, snap);
            next_publish = now + metrics::PUBLISH_EVERY;
            if dump {
                diag::maybe_crash_test(index);
            }
        }
        if core.is_done() {
            break;
        }
    }
    probe.phase(Phase::Stopping);
    ring.submit().map_err(|e| format!("io_uring submit: {e}"))?;
    ring.shutdown();
    metrics::publish(&shared, snapshot(index, &core, &ring, handoff_drops, loops));
    let (c, s, b) = core.live();
    debug_assert_eq!((c, s), (0, 0), "connections or streams left after drain");
    log::info!("worker {index}: stopped (live conns {c}, streams {s}, backend conns {b})");
    Ok(WorkerReport {
        index,
        stats: core.stats(),
        ring: ring.stats.clone(),
        handoff_drops,
    })
}

/// Builds the worker's core and ring (everything that can fail before serving).
fn setup(
    index: u8,
    workers: u8,
    config: &Config,
    secret: Secret,
    sockets: &[BoundSocket],
    mesh: &Mesh,
    quic: Vec<quiche::Config>,
) -> Result<(Core, Ring, Duration), String> {
    let mut listeners = Vec::new();
    let mut ring_listeners = Vec::new();
    let mut gso = MAX_GSO_SEGMENTS;
    for b in sockets {
        let local = b.socket.local_addr().map_err(|e| e.to_string())?;
        listeners.push(core::Listener {
            frontend: b.frontend,
            local,
        });
        ring_listeners.push(ring::Listener {
            fd: b.socket.as_raw_fd(),
            local,
        });
        gso = gso.min(b.caps.gso_segments);
    }
    let drain = config
        .frontends
        .iter()
        .map(|f| f.timeouts.drain)
        .max()
        .unwrap_or(Duration::from_secs(10));
    let mut core = Core::new(index, config, listeners, quic, secret, Instant::now())?;
    core.set_workers(workers);
    core.set_gso_segments(gso);
    let ring = Ring::new(ring_listeners, Some(mesh.wake.as_raw_fd()))
        .map_err(|e| format!("io_uring setup: {e}"))?;
    log::info!(
        "worker {index}: serving on {}",
        sockets
            .iter()
            .filter_map(|s| s.socket.local_addr().ok())
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok((core, ring, drain))
}

/// The SIGUSR2 state dump of one worker: one log line, taken without stopping anything.
fn log_state(snap: &Snapshot) {
    let (c, s, b) = snap.live;
    log::info!(
        "worker {} state: connections {c}, streams {s}, backend connections {b} (idle {}), \
         draining {}, loop passes {}; counters: {}",
        snap.worker,
        snap.idle_backends,
        snap.draining,
        snap.loops,
        metrics::summary(snap)
    );
}

impl Core {
    /// Cross-table invariant checks in debug builds, every few hundred loop passes.
    fn check_invariants_every(&self, loops: u64) {
        if cfg!(debug_assertions) && loops.is_multiple_of(256) {
            self.check_invariants();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the steering program over a datagram the way the kernel does (offset 0 = first byte
    /// of the UDP payload; an out-of-bounds load returns 0).
    fn run_cbpf(prog: &[libc::sock_filter], pkt: &[u8]) -> u32 {
        let (mut a, mut pc) = (0u32, 0usize);
        while let Some(i) = prog.get(pc) {
            pc += 1;
            match i.code {
                0x30 => match pkt.get(i.k as usize) {
                    Some(&b) => a = u32::from(b),
                    None => return 0,
                },
                0x45 => pc += if a & i.k != 0 { i.jt } else { i.jf } as usize,
                0x05 => pc += i.k as usize,
                0x94 => a %= i.k,
                0x16 => return a,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
        panic!("program fell off the end")
    }

    #[test]
    fn steering_sends_our_cids_to_their_owner() {
        let prog = steering_program(3);
        for owner in 0..3u8 {
            let cid = crate::cid::new_cid(owner);
            // Short header: 0x40 | bits, then DCID.
            let mut short = vec![0x41];
            short.extend_from_slice(&cid);
            assert_eq!(run_cbpf(&prog, &short), u32::from(owner));
            // Long headers of every type, v1 and v2 (whose type bits differ, RFC 9369 §3.2):
            // the program never looks at them, only at the DCID after the version.
            for first in [0xc0, 0xd0, 0xe0, 0xf0] {
                for version in [1u32, quiche::PROTOCOL_VERSION_V2] {
                    let mut long = vec![first];
                    long.extend_from_slice(&version.to_be_bytes());
                    long.push(cid.len() as u8);
                    long.extend_from_slice(&cid);
                    assert_eq!(
                        run_cbpf(&prog, &long),
                        u32::from(owner),
                        "{first:x} {version:x}"
                    );
                }
            }
        }
        // A client's random DCID always lands on the same, valid worker.
        let initial = [0xc0, 0, 0, 0, 1, 8, 200, 1, 2, 3, 4, 5, 6, 7];
        assert_eq!(run_cbpf(&prog, &initial), 200 % 3);
        assert_eq!(run_cbpf(&prog, &[]), 0);
    }

    #[test]
    fn mesh_delivers_to_the_right_inbox() {
        let m = mesh(2).unwrap();
        let h = Handoff {
            worker: 1,
            listener: 0,
            from: "127.0.0.1:1".parse().unwrap(),
            to: "127.0.0.1:2".parse().unwrap(),
            data: vec![1, 2, 3],
        };
        m[0].peers[1].tx.try_send(h).unwrap();
        assert!(m[0].inbox.try_recv().is_err());
        assert_eq!(m[1].inbox.try_recv().unwrap().data, vec![1, 2, 3]);
    }
}
