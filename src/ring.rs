//! The only io_uring code in h3gate: turns the core's actions into SQEs and completions into core
//! events.
//!
//! Ownership rules (tokio-uring's, adapted to generation keys):
//! - Every submitted operation has an entry in `ops`, a generation-checked table. The SQE's
//!   `user_data` is that entry's key. The entry owns everything the kernel may touch (buffer,
//!   iovec, msghdr, sockaddr) at a stable heap address until the operation's completion arrives,
//!   whatever happened to the owner meanwhile.
//! - A TCP socket is closed only when no operation on it is in flight: `Close` marks it closing,
//!   cancels its operations, and the last completion closes the fd. A reused fd number can never
//!   be hit by an old operation (HAProxy 3.0's `fd_want_recv()` crash class).
//! - Completions for a closing socket are swallowed; the core forgot that key already, and the
//!   core itself ignores events for keys it no longer has.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

use crate::cmsg;
use crate::core::{BackendAction, BackendEvent, BackendKey, Transmit};
use crate::table::{Key, Table};

/// `user_data` of cancel requests: their own completions carry nothing we need.
const CANCEL_USER_DATA: u64 = u64::MAX;
/// Datagram receive buffer. Large enough for any UDP payload (and later a GRO batch).
const RECV_BUF: usize = 65536;
const RECV_SLOTS_PER_SOCKET: usize = 32;
/// Upper bound on datagrams in flight to the kernel; beyond it the loop waits for completions.
const MAX_SEND_SLOTS: usize = 1024;
/// Free send slots kept for reuse; beyond it returned slots are freed, so a burst does not pin
/// its peak memory.
const SEND_SLOTS_KEPT: usize = 64;
/// A send slot holds one GSO batch: 16 segments (worker.rs) of at most 1500 bytes.
const SEND_SLOT_BYTES: usize = 16 * 1500;
const TCP_RECV_BUF: usize = 64 * 1024;

/// Receives the events the ring produces. Implemented by the worker on top of the core.
pub trait Handler {
    fn datagram(&mut self, listener: usize, from: SocketAddr, to: SocketAddr, data: &mut [u8]);
    fn backend(&mut self, key: BackendKey, ev: BackendEvent<'_>);
    /// The worker's eventfd fired: another worker handed datagrams over.
    fn wake(&mut self) {}
    /// A GSO send failed with EIO/EINVAL: the kernel or device refuses segmentation.
    fn gso_failed(&mut self) {}
}

struct RecvSlot {
    buf: Vec<u8>,
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
    control: [u8; cmsg::SPACE],
    hdr: libc::msghdr,
}

pub struct SendSlot {
    pub buf: Vec<u8>,
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
    control: [u8; cmsg::SPACE],
    hdr: libc::msghdr,
    gso: bool,
}

enum Op {
    Wake {
        buf: Box<[u8; 8]>,
    },
    UdpRecv {
        listener: usize,
        slot: Box<RecvSlot>,
    },
    UdpSend {
        slot: Box<SendSlot>,
    },
    TcpConnect {
        owner: BackendKey,
        _addr: Box<(libc::sockaddr_storage, libc::socklen_t)>,
    },
    TcpSend {
        owner: BackendKey,
        data: Vec<u8>,
        off: usize,
    },
    TcpRecv {
        owner: BackendKey,
        buf: Vec<u8>,
    },
}

struct Tcp {
    fd: RawFd,
    in_flight: u32,
    closing: bool,
}

pub struct Listener {
    pub fd: RawFd,
    pub local: SocketAddr,
}

impl Listener {
    /// Bound to 0.0.0.0 / [::]: replies must name their source address (IP_PKTINFO).
    fn wildcard(&self) -> bool {
        self.local.ip().is_unspecified()
    }
}

#[derive(Default, Debug, Clone)]
pub struct RingStats {
    pub stale_completions: u64,
    pub udp_send_errors: u64,
    pub udp_recv_errors: u64,
    pub gro_segments: u64,
    pub gro_batches: u64,
    pub sq_full: u64,
}

pub struct Ring {
    ring: IoUring,
    ops: Table<Op>,
    listeners: Vec<Listener>,
    tcp: HashMap<BackendKey, Tcp>,
    // Boxed on purpose: the kernel holds pointers into a slot while its send is in flight, so a
    // slot must not move when this Vec grows.
    #[allow(clippy::vec_box)]
    send_free: Vec<Box<SendSlot>>,
    send_slots: usize,
    /// Failures detected before submission, delivered as completions on the next dispatch.
    early: VecDeque<(BackendKey, io::Error)>,
    cqes: Vec<(u64, i32)>,
    tcp_recv_bufs: Vec<Vec<u8>>,
    stopping: bool,
    wake_fd: Option<RawFd>,
    pub stats: RingStats,
}

impl Ring {
    /// `wake_fd`: an eventfd other workers write to after handing datagrams over.
    pub fn new(listeners: Vec<Listener>, wake_fd: Option<RawFd>) -> io::Result<Ring> {
        let ring = IoUring::builder().build(4096)?;
        let mut r = Ring {
            ring,
            ops: Table::with_capacity(1 << 20),
            listeners,
            tcp: HashMap::new(),
            send_free: Vec::new(),
            send_slots: 0,
            early: VecDeque::new(),
            cqes: Vec::with_capacity(1024),
            tcp_recv_bufs: Vec::new(),
            stopping: false,
            wake_fd,
            stats: RingStats::default(),
        };
        if wake_fd.is_some() {
            r.submit_wake(Box::new([0u8; 8]))?;
        }
        for l in 0..r.listeners.len() {
            for _ in 0..RECV_SLOTS_PER_SOCKET {
                let slot = Box::new(RecvSlot {
                    buf: vec![0u8; RECV_BUF],
                    // SAFETY: all-zero is a valid value for these plain C structs.
                    iov: unsafe { mem::zeroed() },
                    addr: unsafe { mem::zeroed() },
                    control: [0u8; cmsg::SPACE],
                    hdr: unsafe { mem::zeroed() },
                });
                r.submit_recv(l, slot)?;
            }
        }
        Ok(r)
    }

    fn push(&mut self, sqe: squeue::Entry) -> io::Result<()> {
        // SAFETY: every pointer in `sqe` points into an `ops` entry (or a socket fd) that stays
        // alive and unmoved until this operation's completion is processed.
        unsafe {
            if self.ring.submission().push(&sqe).is_ok() {
                return Ok(());
            }
        }
        self.stats.sq_full += 1;
        self.ring.submit()?;
        // SAFETY: as above.
        unsafe {
            self.ring
                .submission()
                .push(&sqe)
                .map_err(|_| io::Error::other("submission queue full"))
        }
    }

    fn submit_wake(&mut self, mut buf: Box<[u8; 8]>) -> io::Result<()> {
        let Some(fd) = self.wake_fd else {
            return Ok(());
        };
        let ptr = buf.as_mut_ptr();
        let key = self
            .ops
            .insert(Op::Wake { buf })
            .map_err(|_| io::Error::other("op table full"))?;
        let sqe = opcode::Read::new(types::Fd(fd), ptr, 8)
            .build()
            .user_data(key.to_u64());
        self.push(sqe)
    }

    fn submit_recv(&mut self, listener: usize, mut slot: Box<RecvSlot>) -> io::Result<()> {
        let fd = self
            .listeners
            .get(listener)
            .map(|l| l.fd)
            .ok_or_else(|| io::Error::other("no listener"))?;
        slot.iov = libc::iovec {
            iov_base: slot.buf.as_mut_ptr().cast(),
            iov_len: slot.buf.len(),
        };
        // SAFETY: zeroed msghdr is valid; we then point it at fields of the same boxed slot,
        // whose heap address does not change while the op is in flight.
        slot.hdr = unsafe { mem::zeroed() };
        slot.hdr.msg_name = (&mut slot.addr as *mut libc::sockaddr_storage).cast();
        slot.hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        slot.hdr.msg_iov = &mut slot.iov;
        slot.hdr.msg_iovlen = 1;
        slot.hdr.msg_control = slot.control.as_mut_ptr().cast();
        slot.hdr.msg_controllen = slot.control.len();
        let hdr: *mut libc::msghdr = &mut slot.hdr;
        let key = self
            .ops
            .insert(Op::UdpRecv { listener, slot })
            .map_err(|_| io::Error::other("op table full"))?;
        let sqe = opcode::RecvMsg::new(types::Fd(fd), hdr)
            .build()
            .user_data(key.to_u64());
        self.push(sqe)
    }

    /// A free datagram buffer, or None when `MAX_SEND_SLOTS` are in flight (wait, then retry).
    pub fn send_slot(&mut self) -> Option<Box<SendSlot>> {
        if let Some(s) = self.send_free.pop() {
            return Some(s);
        }
        if self.send_slots >= MAX_SEND_SLOTS {
            return None;
        }
        self.send_slots += 1;
        Some(Box::new(SendSlot {
            buf: vec![0u8; SEND_SLOT_BYTES],
            // SAFETY: all-zero is a valid value for these plain C structs.
            iov: unsafe { mem::zeroed() },
            addr: unsafe { mem::zeroed() },
            control: [0u8; cmsg::SPACE],
            hdr: unsafe { mem::zeroed() },
            gso: false,
        }))
    }

    pub fn return_slot(&mut self, slot: Box<SendSlot>) {
        self.keep_slot(slot);
    }

    fn keep_slot(&mut self, slot: Box<SendSlot>) {
        if self.send_free.len() < SEND_SLOTS_KEPT {
            self.send_free.push(slot);
        } else {
            self.send_slots -= 1;
        }
    }

    /// Sends `t.len` bytes of `slot.buf` to `t.to` from the listener's socket.
    pub fn send(&mut self, mut slot: Box<SendSlot>, t: Transmit) {
        let Some((fd, wildcard)) = self.listeners.get(t.listener).map(|l| (l.fd, l.wildcard()))
        else {
            self.keep_slot(slot);
            return;
        };
        let mut enc = cmsg::Encoder::new(&mut slot.control);
        let mut gso = false;
        if let Some(seg) = t.segment_size.filter(|&s| s < t.len) {
            gso = enc.segment_size(seg.min(usize::from(u16::MAX)) as u16);
        }
        if wildcard {
            enc.source(t.from.ip());
        }
        let control_len = enc.len();
        slot.gso = gso;
        let alen = write_sockaddr(&t.to, &mut slot.addr);
        slot.iov = libc::iovec {
            iov_base: slot.buf.as_mut_ptr().cast(),
            iov_len: t.len.min(slot.buf.len()),
        };
        // SAFETY: as in submit_recv: pointers into the same boxed slot.
        slot.hdr = unsafe { mem::zeroed() };
        slot.hdr.msg_name = (&mut slot.addr as *mut libc::sockaddr_storage).cast();
        slot.hdr.msg_namelen = alen;
        slot.hdr.msg_iov = &mut slot.iov;
        slot.hdr.msg_iovlen = 1;
        if control_len > 0 {
            slot.hdr.msg_control = slot.control.as_mut_ptr().cast();
            slot.hdr.msg_controllen = control_len;
        }
        let hdr: *const libc::msghdr = &slot.hdr;
        let Ok(key) = self.ops.insert(Op::UdpSend { slot }) else {
            self.stats.udp_send_errors += 1;
            return;
        };
        let sqe = opcode::SendMsg::new(types::Fd(fd), hdr)
            .build()
            .user_data(key.to_u64());
        if self.push(sqe).is_err() {
            // Never submitted: take the slot back. QUIC loss recovery resends the packet.
            if let Some(Op::UdpSend { slot }) = self.ops.remove(key) {
                self.keep_slot(slot);
            }
            self.stats.udp_send_errors += 1;
        }
    }

    /// Carries out one backend action from the core.
    pub fn backend(&mut self, action: BackendAction) {
        match action {
            BackendAction::Connect { key, addr } => {
                if let Err(e) = self.connect(key, addr) {
                    self.early.push_back((key, e));
                }
            }
            BackendAction::Send { key, data } => {
                if let Err(e) = self.tcp_send(key, data, 0) {
                    self.early.push_back((key, e));
                }
            }
            BackendAction::Recv { key, max } => {
                if let Err(e) = self.tcp_recv(key, max) {
                    self.early.push_back((key, e));
                }
            }
            BackendAction::Close { key } => self.close(key),
        }
    }

    fn connect(&mut self, owner: BackendKey, addr: SocketAddr) -> io::Result<()> {
        log::trace!("ring: connect {owner:?} to {addr}");
        let family = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket(2) call; the fd is owned by `self.tcp` from here on.
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        // SAFETY: valid fd, pointer to a live c_int of the stated size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        // SAFETY: all-zero sockaddr_storage is valid.
        let mut sa: Box<(libc::sockaddr_storage, libc::socklen_t)> =
            Box::new((unsafe { mem::zeroed() }, 0));
        sa.1 = write_sockaddr(&addr, &mut sa.0);
        let ptr: *const libc::sockaddr = (&sa.0 as *const libc::sockaddr_storage).cast();
        let len = sa.1;
        self.tcp.insert(
            owner,
            Tcp {
                fd,
                in_flight: 1,
                closing: false,
            },
        );
        let key = self
            .ops
            .insert(Op::TcpConnect { owner, _addr: sa })
            .map_err(|_| io::Error::other("op table full"))?;
        let sqe = opcode::Connect::new(types::Fd(fd), ptr, len)
            .build()
            .user_data(key.to_u64());
        if let Err(e) = self.push(sqe) {
            self.ops.remove(key);
            if let Some(t) = self.tcp.get_mut(&owner) {
                t.in_flight -= 1;
            }
            return Err(e);
        }
        Ok(())
    }

    fn tcp_fd(&mut self, owner: BackendKey) -> io::Result<RawFd> {
        match self.tcp.get_mut(&owner) {
            Some(t) if !t.closing => {
                t.in_flight += 1;
                Ok(t.fd)
            }
            _ => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }

    fn tcp_send(&mut self, owner: BackendKey, data: Vec<u8>, off: usize) -> io::Result<()> {
        let fd = self.tcp_fd(owner)?;
        let rest = data.get(off..).unwrap_or(&[]);
        let (ptr, len) = (rest.as_ptr(), rest.len() as u32);
        let key = self
            .ops
            .insert(Op::TcpSend { owner, data, off })
            .map_err(|_| io::Error::other("op table full"))?;
        let sqe = opcode::Send::new(types::Fd(fd), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(key.to_u64());
        self.push_tcp(owner, key, sqe)
    }

    fn tcp_recv(&mut self, owner: BackendKey, max: usize) -> io::Result<()> {
        let fd = self.tcp_fd(owner)?;
        // Reuse a pooled buffer of the right size (the core reads one budget chunk at a time;
        // idle-connection probes read a few bytes).
        let max = max.clamp(1, TCP_RECV_BUF);
        let mut buf = match self.tcp_recv_bufs.iter().position(|b| b.len() == max) {
            Some(i) => self.tcp_recv_bufs.swap_remove(i),
            None => vec![0u8; max],
        };
        let (ptr, len) = (buf.as_mut_ptr(), buf.len() as u32);
        let key = self
            .ops
            .insert(Op::TcpRecv { owner, buf })
            .map_err(|_| io::Error::other("op table full"))?;
        let sqe = opcode::Recv::new(types::Fd(fd), ptr, len)
            .build()
            .user_data(key.to_u64());
        self.push_tcp(owner, key, sqe)
    }

    fn push_tcp(&mut self, owner: BackendKey, key: Key<Op>, sqe: squeue::Entry) -> io::Result<()> {
        if let Err(e) = self.push(sqe) {
            self.ops.remove(key);
            self.op_done(owner);
            return Err(e);
        }
        Ok(())
    }

    /// Marks the socket closing; closes it now if idle, else cancels what is in flight and lets
    /// the last completion close it.
    fn close(&mut self, owner: BackendKey) {
        let Some(t) = self.tcp.get_mut(&owner) else {
            return;
        };
        t.closing = true;
        if t.in_flight == 0 {
            self.finish_close(owner);
            return;
        }
        let fd = t.fd;
        let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .user_data(CANCEL_USER_DATA);
        if self.push(sqe).is_err() {
            // Could not cancel: a shutdown makes pending reads and writes complete promptly.
            // SAFETY: fd is still open (in_flight > 0 keeps it) and owned by us.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    fn finish_close(&mut self, owner: BackendKey) {
        if let Some(t) = self.tcp.remove(&owner) {
            debug_assert_eq!(t.in_flight, 0, "closing an fd with operations in flight");
            // SAFETY: no operation references this fd any more; we own it.
            unsafe { libc::close(t.fd) };
        }
    }

    /// One operation on `owner`'s socket completed. Returns true if the owner is still live.
    fn op_done(&mut self, owner: BackendKey) -> bool {
        let Some(t) = self.tcp.get_mut(&owner) else {
            return false;
        };
        debug_assert!(t.in_flight > 0);
        t.in_flight = t.in_flight.saturating_sub(1);
        if t.closing {
            if t.in_flight == 0 {
                self.finish_close(owner);
            }
            return false;
        }
        true
    }

    /// Submits queued SQEs and waits up to `timeout` for at least one completion.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let want = if self.early.is_empty() { 1 } else { 0 };
        let r = match timeout {
            Some(d) => {
                let ts = types::Timespec::new()
                    .sec(d.as_secs())
                    .nsec(d.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
            None => self.ring.submit_and_wait(want),
        };
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit().map(|_| ())
    }

    /// Processes every available completion, feeding events to `h`.
    pub fn dispatch<H: Handler>(&mut self, h: &mut H) {
        while let Some((owner, e)) = self.early.pop_front() {
            // These ops never reached the kernel; the owner learns of the failure now.
            h.backend(owner, BackendEvent::Connected(Err(e)));
        }
        self.cqes.clear();
        self.cqes
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let cqes = mem::take(&mut self.cqes);
        for &(ud, res) in &cqes {
            if ud == CANCEL_USER_DATA {
                continue;
            }
            self.complete(Key::from_u64(ud), res, h);
        }
        self.cqes = cqes;
    }

    fn complete<H: Handler>(&mut self, key: Key<Op>, res: i32, h: &mut H) {
        log::trace!("ring: completion {key:?} res {res}");
        let Some(op) = self.ops.remove(key) else {
            self.stats.stale_completions += 1;
            return;
        };
        let err = |res: i32| io::Error::from_raw_os_error(-res);
        match op {
            Op::Wake { buf } => {
                if res >= 0 {
                    h.wake();
                }
                if !self.stopping {
                    if let Err(e) = self.submit_wake(buf) {
                        log::error!("cannot re-arm the wake-up read: {e}");
                    }
                }
            }
            Op::UdpRecv { listener, mut slot } => {
                if res >= 0 {
                    let local = self.listeners.get(listener).map(|l| l.local);
                    let control_len = slot.hdr.msg_controllen.min(slot.control.len());
                    let meta = cmsg::decode(&slot.control[..control_len]);
                    if let (Some(from), Some(local)) = (read_sockaddr(&slot.addr), local) {
                        // On a wildcard bind the datagram's own destination is the address
                        // the client used; replies must leave from it.
                        let to = SocketAddr::new(meta.dst.unwrap_or(local.ip()), local.port());
                        let n = (res as usize).min(slot.buf.len());
                        if let Some(data) = slot.buf.get_mut(..n) {
                            if meta.gro_segment.is_some_and(|s| s < n) {
                                self.stats.gro_batches += 1;
                            }
                            // GRO: one buffer, several datagrams; each is routed on its own.
                            for seg in cmsg::segments(data, meta.gro_segment) {
                                self.stats.gro_segments += 1;
                                h.datagram(listener, from, to, seg);
                            }
                        }
                    }
                } else if res != -libc::ECANCELED {
                    self.stats.udp_recv_errors += 1;
                }
                if !self.stopping {
                    if let Err(e) = self.submit_recv(listener, slot) {
                        log::error!("cannot re-arm UDP receive: {e}");
                    }
                }
            }
            Op::UdpSend { slot } => {
                if res < 0 {
                    // A lost datagram is QUIC's business (loss recovery); count it and go on.
                    self.stats.udp_send_errors += 1;
                    log::trace!("udp send: {}", err(res));
                    // quinn-udp's rule: EIO/EINVAL on a segmented send means the path refuses
                    // GSO; batches already queued fail too and are left to QUIC loss recovery.
                    if slot.gso && (res == -libc::EIO || res == -libc::EINVAL) {
                        h.gso_failed();
                    }
                }
                self.keep_slot(slot);
            }
            Op::TcpConnect { owner, .. } => {
                if self.op_done(owner) {
                    let r = if res < 0 { Err(err(res)) } else { Ok(()) };
                    h.backend(owner, BackendEvent::Connected(r));
                }
            }
            Op::TcpSend { owner, data, off } => {
                if !self.op_done(owner) {
                    return;
                }
                if res < 0 {
                    h.backend(owner, BackendEvent::Sent(Err(err(res))));
                    return;
                }
                let off = off + res as usize;
                if res == 0 && off < data.len() {
                    h.backend(
                        owner,
                        BackendEvent::Sent(Err(io::ErrorKind::WriteZero.into())),
                    );
                } else if off < data.len() {
                    // Short write: send the rest; the core hears once, when all is sent.
                    let total = data.len();
                    if let Err(e) = self.tcp_send(owner, data, off) {
                        log::debug!("resubmitting {} of {total} bytes failed: {e}", total - off);
                        h.backend(owner, BackendEvent::Sent(Err(e)));
                    }
                } else {
                    h.backend(owner, BackendEvent::Sent(Ok(data.len())));
                }
            }
            Op::TcpRecv { owner, buf } => {
                if self.op_done(owner) {
                    if res < 0 {
                        h.backend(owner, BackendEvent::Received(Err(err(res))));
                    } else {
                        let n = (res as usize).min(buf.len());
                        h.backend(owner, BackendEvent::Received(Ok(&buf[..n])));
                    }
                }
                // Keep a bounded number of read buffers for reuse.
                if self.tcp_recv_bufs.len() < 64 {
                    self.tcp_recv_bufs.push(buf);
                }
            }
        }
    }

    /// Ops in flight (tests and the shutdown check).
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    /// Stops re-arming receives, cancels everything and waits (bounded) until nothing is in
    /// flight, so no buffer is freed while the kernel may still write to it.
    pub fn shutdown(&mut self) {
        self.stopping = true;
        let owners: Vec<BackendKey> = self.tcp.keys().copied().collect();
        for o in owners {
            self.close(o);
        }
        let fds: Vec<RawFd> = self
            .listeners
            .iter()
            .map(|l| l.fd)
            .chain(self.wake_fd)
            .collect();
        for fd in fds {
            let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                .build()
                .user_data(CANCEL_USER_DATA);
            let _ = self.push(sqe);
        }
        struct Nop;
        impl Handler for Nop {
            fn datagram(&mut self, _: usize, _: SocketAddr, _: SocketAddr, _: &mut [u8]) {}
            fn backend(&mut self, _: BackendKey, _: BackendEvent<'_>) {}
        }
        for _ in 0..100 {
            if self.ops.is_empty() {
                break;
            }
            let _ = self.wait(Some(Duration::from_millis(20)));
            self.dispatch(&mut Nop);
        }
        if !self.ops.is_empty() {
            log::warn!(
                "{} io_uring operations still in flight at shutdown",
                self.ops.len()
            );
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if !self.ops.is_empty() {
            // Buffers of in-flight ops must outlive the kernel's use: leak them rather than free
            // memory the kernel may still write to. Dropping the IoUring afterwards tears the
            // ring down, which waits for the kernel side.
            for k in self.ops.keys() {
                if let Some(op) = self.ops.remove(k) {
                    mem::forget(op);
                }
            }
        }
        for (_, t) in self.tcp.drain() {
            // SAFETY: fds we own; nothing in flight references them any more (see above).
            unsafe { libc::close(t.fd) };
        }
    }
}

/// Writes `addr` as a C sockaddr; returns its length.
pub fn write_sockaddr(addr: &SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            let sin =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in6.
            let sin6 =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

pub fn read_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_roundtrip() {
        for a in ["127.0.0.1:443", "[::1]:8443", "10.1.2.3:1"] {
            let addr: SocketAddr = a.parse().unwrap();
            // SAFETY: zeroed sockaddr_storage is valid.
            let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
            write_sockaddr(&addr, &mut ss);
            assert_eq!(read_sockaddr(&ss), Some(addr));
        }
    }
}
