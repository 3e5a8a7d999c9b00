//! One worker: one thread, one io_uring, its own UDP socket per bind, its own core. The loop runs
//! the phases in a fixed order: wait, dispatch completions (datagrams and backend results go into
//! the core), fire timers, flush the core, then carry its outputs to the ring.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::cid::Secret;
use crate::config::Config;
use crate::core::{self, BackendEvent, BackendKey, Core, Stats};
use crate::frontend;
use crate::ring::{self, Handler, Ring, RingStats};

/// Longest single wait: bounds how late a stop request is noticed even if no signal interrupts
/// the wait (signals do interrupt it).
const MAX_WAIT: Duration = Duration::from_millis(200);

struct Events<'a> {
    core: &'a mut Core,
    now: Instant,
}

impl Handler for Events<'_> {
    fn datagram(&mut self, listener: usize, from: SocketAddr, to: SocketAddr, data: &mut [u8]) {
        self.core.on_datagram(self.now, listener, from, to, data);
    }
    fn backend(&mut self, key: BackendKey, ev: BackendEvent<'_>) {
        self.core.on_backend(self.now, key, ev);
    }
}

/// Binds one UDP socket of the worker's SO_REUSEPORT group for `addr`.
pub fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
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
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(io::Error::from)?;
    Ok(std::net::UdpSocket::from(fd))
}

pub struct WorkerReport {
    pub index: u8,
    pub stats: Stats,
    pub ring: RingStats,
}

/// Runs worker `index` until `stop` is set and its connections have drained.
pub fn run(
    index: u8,
    config: &Config,
    secret: Secret,
    stop: &AtomicBool,
) -> Result<WorkerReport, String> {
    let mut listeners = Vec::new();
    let mut ring_listeners = Vec::new();
    let mut quic = Vec::new();
    let mut sockets = Vec::new();
    for (fi, fe) in config.frontends.iter().enumerate() {
        quic.push(frontend::quic_config(fe)?);
        for &addr in &fe.binds {
            let sock =
                bind_udp(addr).map_err(|e| format!("frontend '{}': bind {addr}: {e}", fe.name))?;
            let local = sock.local_addr().map_err(|e| e.to_string())?;
            listeners.push(core::Listener {
                frontend: fi,
                local,
            });
            ring_listeners.push(ring::Listener {
                fd: sock.as_raw_fd(),
                local,
            });
            sockets.push(sock);
        }
    }
    let drain = config
        .frontends
        .iter()
        .map(|f| f.timeouts.drain)
        .max()
        .unwrap_or(Duration::from_secs(10));
    let mut core = Core::new(index, config, listeners, quic, secret, Instant::now())?;
    let mut ring = Ring::new(ring_listeners).map_err(|e| format!("io_uring setup: {e}"))?;
    log::info!(
        "worker {index}: serving on {}",
        sockets
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

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
        ring.wait(timeout)
            .map_err(|e| format!("io_uring wait: {e}"))?;

        let now = Instant::now();
        ring.dispatch(&mut Events {
            core: &mut core,
            now,
        });
        core.on_timer(now);
        if stop.load(Ordering::Relaxed) && !core.is_draining() {
            log::info!("worker {index}: stopping, draining up to {drain:?}");
            core.shutdown(now, drain);
        }
        core.flush(now);
        while let Some(a) = core.poll_backend_action() {
            ring.backend(a);
        }
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
        core.check_invariants_every(loops);
        if core.is_done() {
            break;
        }
    }
    ring.submit().map_err(|e| format!("io_uring submit: {e}"))?;
    ring.shutdown();
    let (c, s, b) = core.live();
    debug_assert_eq!((c, s), (0, 0), "connections or streams left after drain");
    log::info!("worker {index}: stopped (live conns {c}, streams {s}, backend conns {b})");
    for s in sockets {
        let _ = s.into_raw_fd();
    }
    Ok(WorkerReport {
        index,
        stats: core.stats.clone(),
        ring: ring.stats.clone(),
    })
}

impl Core {
    /// Cross-table invariant checks in debug builds, every few hundred loop passes.
    fn check_invariants_every(&self, loops: u64) {
        if cfg!(debug_assertions) && loops.is_multiple_of(256) {
            self.check_invariants();
        }
    }
}
