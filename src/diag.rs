//! Diagnostics: what a worker is doing (for crash reports and the SIGUSR2 state dump), the crash
//! reports themselves, and diagnostic mode's start-up checks (core limit, core_pattern, dump
//! directory).
//!
//! Every worker owns a [`Slot`] of atomics in a static table, updated by its loop: its thread id,
//! the loop phase it is in, its live connection/stream/backend-connection counts and its last
//! warning or error. A fatal-signal handler may only use async-signal-safe operations, so it
//! reads these atomics and writes with `write(2)`: no allocation, no locks, no formatting
//! machinery. The panic hook can do more (a backtrace) but reads the same slots.
//!
//! In diagnostic mode a crash report also goes to `crash-<pid>.txt` in the dump directory, and a
//! panic aborts so the kernel writes a core; outside it, the report goes to stderr only and a
//! panic unwinds as before (the worker's thread ends, the process stops with status 1).

use std::io::Write;
use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::OnceLock;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// `git rev-parse --short HEAD` at build time, or "unknown" (build.rs).
pub const COMMIT: &str = env!("H3GATE_COMMIT");

/// Slots in the worker table (worker indexes are a u8).
pub const MAX_WORKERS: usize = 256;
/// Bytes of the last warning/error kept per worker.
const ERR_LEN: usize = 240;

/// Where a worker's loop is: the order of `worker::run`'s phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Idle = 0,
    Starting,
    Wait,
    Dispatch,
    HandoffIn,
    Timers,
    Flush,
    Transmit,
    HandoffOut,
    Publish,
    Stopping,
    Stopped,
}

const PHASE_NAMES: [&str; 12] = [
    "idle",
    "starting",
    "wait (io_uring_enter)",
    "dispatch completions (datagrams, backend results) into the core",
    "deliver handed-over datagrams",
    "fire timers",
    "flush connections (HTTP/3, streams, backends)",
    "transmit datagrams",
    "hand datagrams to other workers",
    "publish metrics / state dump",
    "stopping (ring shutdown)",
    "stopped",
];

fn phase_name(p: u8) -> &'static str {
    PHASE_NAMES.get(usize::from(p)).copied().unwrap_or("?")
}

/// One worker's published state. All atomics: readable from a signal handler on any thread.
pub struct Slot {
    active: AtomicBool,
    tid: AtomicI32,
    phase: AtomicU8,
    conns: AtomicU64,
    streams: AtomicU64,
    bconns: AtomicU64,
    loops: AtomicU64,
    /// Key (`Key::to_u64`, i.e. `generation << 32 | index`, plus 1; 0 = none) of the connection
    /// and of the stream the worker's core is working on: the crash report's breadcrumbs.
    conn: AtomicU64,
    stream: AtomicU64,
    err_len: AtomicUsize,
    err: [AtomicU8; ERR_LEN],
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            active: AtomicBool::new(false),
            tid: AtomicI32::new(0),
            phase: AtomicU8::new(0),
            conns: AtomicU64::new(0),
            streams: AtomicU64::new(0),
            bconns: AtomicU64::new(0),
            loops: AtomicU64::new(0),
            conn: AtomicU64::new(0),
            stream: AtomicU64::new(0),
            err_len: AtomicUsize::new(0),
            err: [const { AtomicU8::new(0) }; ERR_LEN],
        }
    }
}

static SLOTS: [Slot; MAX_WORKERS] = [const { Slot::new() }; MAX_WORKERS];
static MAIN_TID: AtomicI32 = AtomicI32::new(0);
static STATS_TID: AtomicI32 = AtomicI32::new(0);
/// Bumped by SIGUSR2; each worker logs its state when it sees a new value.
static DUMP_REQUESTS: AtomicU64 = AtomicU64::new(0);
/// A crash report was already written (a panic that aborts must not produce a second one).
static REPORTED: AtomicBool = AtomicBool::new(false);
static DIAGNOSTIC: AtomicBool = AtomicBool::new(false);
/// Open directory fd of the dump directory (-1: none), for `openat` in the signal handler.
static DUMP_FD: AtomicI32 = AtomicI32::new(-1);
static DUMP_DIR: OnceLock<PathBuf> = OnceLock::new();
static CRASH_TEST: AtomicU8 = AtomicU8::new(0);

thread_local! {
    static WORKER: std::cell::Cell<Option<u8>> = const { std::cell::Cell::new(None) };
}

fn gettid() -> i32 {
    // SAFETY: gettid(2) has no arguments and cannot fail; async-signal-safe.
    unsafe { libc::gettid() }
}

/// The worker index of the calling thread, if it is a worker.
pub fn current_worker() -> Option<u8> {
    WORKER.with(|w| w.get())
}

/// A worker's handle on its slot. Created on the worker's own thread.
pub struct Probe {
    slot: &'static Slot,
    seen_dump: u64,
}

impl Probe {
    pub fn register(index: u8) -> Probe {
        WORKER.with(|w| w.set(Some(index)));
        let slot = &SLOTS[usize::from(index)];
        slot.tid.store(gettid(), Relaxed);
        slot.phase.store(Phase::Starting as u8, Relaxed);
        slot.err_len.store(0, Relaxed);
        slot.active.store(true, Release);
        Probe {
            slot,
            seen_dump: DUMP_REQUESTS.load(Relaxed),
        }
    }

    /// One relaxed store: cheap enough for every phase of every loop pass.
    #[inline]
    pub fn phase(&self, p: Phase) {
        self.slot.phase.store(p as u8, Relaxed);
    }

    /// Live counts (`Core::live()`) and loop passes, once per pass.
    #[inline]
    pub fn live(&self, (c, s, b): (usize, usize, usize), loops: u64) {
        self.slot.conns.store(c as u64, Relaxed);
        self.slot.streams.store(s as u64, Relaxed);
        self.slot.bconns.store(b as u64, Relaxed);
        self.slot.loops.store(loops, Relaxed);
    }

    /// True once per SIGUSR2 (each worker sees each request once).
    pub fn dump_requested(&mut self) -> bool {
        let now = DUMP_REQUESTS.load(Relaxed);
        if now != self.seen_dump {
            self.seen_dump = now;
            true
        } else {
            false
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.slot.phase.store(Phase::Stopped as u8, Relaxed);
        self.slot.active.store(false, Release);
    }
}

/// Records the main thread (reports name it instead of "unknown thread").
pub fn register_main_thread() {
    MAIN_TID.store(gettid(), Relaxed);
}

/// Records the metrics thread.
pub fn register_stats_thread() {
    STATS_TID.store(gettid(), Relaxed);
}

/// Called by the logger for warnings and errors: keeps the last one of each worker.
pub fn note_error(line: &str) {
    let Some(w) = current_worker() else {
        return;
    };
    let Some(slot) = SLOTS.get(usize::from(w)) else {
        return;
    };
    slot.err_len.store(0, Relaxed);
    let bytes = line.as_bytes();
    let n = bytes.len().min(ERR_LEN);
    for (dst, &b) in slot.err.iter().zip(bytes.iter().take(n)) {
        dst.store(b, Relaxed);
    }
    slot.err_len.store(n, Release);
}

/// SIGUSR2 handler body: only an atomic increment.
pub fn request_dump() {
    DUMP_REQUESTS.fetch_add(1, Relaxed);
}

/// What the hidden crash test does (diagnostic mode only; see [`set_crash_test`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashTest {
    Panic = 1,
    Segv = 2,
    Abort = 3,
}

/// Parses `H3GATE_CRASH_TEST`: `1`/`panic`, `segv`, `abort`.
pub fn parse_crash_test(v: &str) -> Option<CrashTest> {
    match v {
        "1" | "panic" => Some(CrashTest::Panic),
        "segv" | "sigsegv" => Some(CrashTest::Segv),
        "abort" | "sigabrt" => Some(CrashTest::Abort),
        _ => None,
    }
}

pub fn set_crash_test(t: CrashTest) {
    CRASH_TEST.store(t as u8, Relaxed);
}

/// Worker 0 calls this after logging its state for a SIGUSR2: crashes on purpose when the crash
/// test is armed (only ever armed in diagnostic mode).
pub fn maybe_crash_test(worker: u8) {
    if worker != 0 {
        return;
    }
    match CRASH_TEST.load(Relaxed) {
        1 => panic!("H3GATE_CRASH_TEST: forced panic in worker {worker}"),
        2 => {
            log::error!("H3GATE_CRASH_TEST: raising SIGSEGV in worker {worker}");
            // SAFETY: raise(3) on the calling thread; our SIGSEGV handler reports and re-raises
            // with the default action, which ends the process with a core.
            unsafe { libc::raise(libc::SIGSEGV) };
        }
        3 => {
            log::error!("H3GATE_CRASH_TEST: aborting in worker {worker}");
            std::process::abort();
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Report writing, shared by the panic hook (into a Vec) and the signal handler (raw fds).

trait Out {
    fn bytes(&mut self, b: &[u8]);
    fn s(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn n(&mut self, mut v: u64) {
        let mut tmp = [0u8; 20];
        let mut i = tmp.len();
        loop {
            i -= 1;
            if let Some(d) = tmp.get_mut(i) {
                *d = b'0' + (v % 10) as u8;
            }
            v /= 10;
            if v == 0 || i == 0 {
                break;
            }
        }
        self.bytes(tmp.get(i..).unwrap_or_default());
    }
    fn hex(&mut self, v: u64) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        self.s("0x");
        let mut started = false;
        for shift in (0..16).rev() {
            let d = ((v >> (shift * 4)) & 0xf) as usize;
            if d != 0 || started || shift == 0 {
                started = true;
                self.bytes(DIGITS.get(d..d + 1).unwrap_or_default());
            }
        }
    }
}

impl Out for Vec<u8> {
    fn bytes(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
}

/// Async-signal-safe writer: a small stack buffer flushed with write(2) to up to two fds.
struct RawOut {
    fds: [i32; 2],
    buf: [u8; 256],
    len: usize,
}

impl RawOut {
    fn flush(&mut self) {
        for &fd in &self.fds {
            if fd < 0 {
                continue;
            }
            let mut off = 0;
            while off < self.len {
                let Some(rest) = self.buf.get(off..self.len) else {
                    break;
                };
                // SAFETY: write(2) from a live buffer of `rest.len()` bytes; async-signal-safe.
                let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
                if n <= 0 {
                    break;
                }
                off += n as usize;
            }
        }
        self.len = 0;
    }
}

impl Out for RawOut {
    fn bytes(&mut self, b: &[u8]) {
        for &c in b {
            if self.len >= self.buf.len() {
                self.flush();
            }
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = c;
                self.len += 1;
            }
        }
    }
}

/// Records which connection / stream a worker's core is processing (`None` clears). Two relaxed
/// stores: cheap enough for every event.
#[inline]
pub fn breadcrumb(worker: u8, conn: Option<u64>, stream: Option<u64>) {
    if let Some(slot) = SLOTS.get(usize::from(worker)) {
        slot.conn
            .store(conn.map_or(0, |k| k.wrapping_add(1)), Relaxed);
        slot.stream
            .store(stream.map_or(0, |k| k.wrapping_add(1)), Relaxed);
    }
}

fn write_key(out: &mut impl Out, v: u64) {
    if v == 0 {
        out.s("none");
        return;
    }
    let k = v.wrapping_sub(1);
    out.n(k & 0xffff_ffff);
    out.s("#");
    out.n(k >> 32);
}

fn write_worker_line(out: &mut impl Out, i: usize, slot: &Slot) {
    out.s("worker ");
    out.n(i as u64);
    out.s(": phase ");
    out.s(phase_name(slot.phase.load(Relaxed)));
    out.s("; live connections ");
    out.n(slot.conns.load(Relaxed));
    out.s(", streams ");
    out.n(slot.streams.load(Relaxed));
    out.s(", backend connections ");
    out.n(slot.bconns.load(Relaxed));
    out.s("; loop passes ");
    out.n(slot.loops.load(Relaxed));
    out.s("; processing connection ");
    write_key(out, slot.conn.load(Relaxed));
    out.s(", stream ");
    write_key(out, slot.stream.load(Relaxed));
    out.s("\n");
}

/// Everything after the cause line. Reads atomics only.
fn write_state(out: &mut impl Out, tid: i32) {
    out.s("version: h3gate ");
    out.s(VERSION);
    out.s(" (commit ");
    out.s(COMMIT);
    out.s(")\npid: ");
    // SAFETY: getpid(2) is async-signal-safe and cannot fail.
    out.n(unsafe { libc::getpid() } as u64);
    out.s("\nthread: ");
    let mut current = None;
    for (i, slot) in SLOTS.iter().enumerate() {
        if slot.active.load(Acquire) && slot.tid.load(Relaxed) == tid {
            current = Some(i);
            break;
        }
    }
    match current {
        Some(i) => {
            out.s("worker-");
            out.n(i as u64);
            out.s(" (tid ");
            out.n(tid as u64);
            out.s(")\n");
        }
        None if tid == MAIN_TID.load(Relaxed) => out.s("main (signals, reload, start-up)\n"),
        None if tid == STATS_TID.load(Relaxed) => out.s("stats (metrics endpoint)\n"),
        None => out.s("not a worker\n"),
    }
    if let Some(i) = current {
        let slot = &SLOTS[i];
        out.s("crashed in ");
        write_worker_line(out, i, slot);
        out.s("last warning/error: ");
        let n = slot.err_len.load(Acquire).min(ERR_LEN);
        if n == 0 {
            out.s("none");
        }
        for b in slot.err.iter().take(n) {
            out.bytes(&[b.load(Relaxed)]);
        }
        out.s("\n");
    }
    out.s("workers:\n");
    for (i, slot) in SLOTS.iter().enumerate() {
        if slot.active.load(Acquire) && Some(i) != current {
            out.s("  ");
            write_worker_line(out, i, slot);
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV (invalid memory access)",
        libc::SIGBUS => "SIGBUS (bus error)",
        libc::SIGABRT => "SIGABRT (abort)",
        libc::SIGILL => "SIGILL (illegal instruction)",
        libc::SIGFPE => "SIGFPE (arithmetic exception)",
        _ => "fatal signal",
    }
}

/// `crash-<pid>.txt` as a NUL-terminated name, built without allocating.
fn crash_name(buf: &mut [u8; 40]) -> &[u8] {
    struct B<'a>(&'a mut [u8; 40], usize);
    impl Out for B<'_> {
        fn bytes(&mut self, b: &[u8]) {
            for &c in b {
                if let Some(d) = self.0.get_mut(self.1) {
                    *d = c;
                    self.1 += 1;
                }
            }
        }
    }
    let mut b = B(buf, 0);
    b.s("crash-");
    // SAFETY: getpid(2) is async-signal-safe and cannot fail.
    b.n(unsafe { libc::getpid() } as u64);
    b.s(".txt\0");
    let len = b.1;
    buf.get(..len).unwrap_or_default()
}

/// Opens `crash-<pid>.txt` in the dump directory (async-signal-safe), or -1.
fn open_crash_file() -> i32 {
    let dir = DUMP_FD.load(Relaxed);
    if dir < 0 {
        return -1;
    }
    let mut name = [0u8; 40];
    let name = crash_name(&mut name);
    // SAFETY: openat(2) with an open directory fd and a NUL-terminated name on our stack.
    unsafe {
        libc::openat(
            dir,
            name.as_ptr().cast(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o600,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Fatal signals.

const FATAL: [i32; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGABRT,
    libc::SIGILL,
    libc::SIGFPE,
];
/// The handlers that were installed before ours (Rust's runtime has one for SIGSEGV/SIGBUS that
/// recognises stack overflows), chained after the report.
static OLD_HANDLER: [AtomicUsize; 5] = [const { AtomicUsize::new(0) }; 5];
static OLD_FLAGS: [AtomicI32; 5] = [const { AtomicI32::new(0) }; 5];

extern "C" fn on_fatal_signal(sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if !REPORTED.swap(true, SeqCst) {
        let file = open_crash_file();
        let mut out = RawOut {
            fds: [2, file],
            buf: [0; 256],
            len: 0,
        };
        out.s("\n=== h3gate crash report ===\ncause: signal ");
        out.n(sig as u64);
        out.s(" ");
        out.s(signal_name(sig));
        if !info.is_null() {
            // SAFETY: the kernel passes a valid siginfo_t to SA_SIGINFO handlers.
            let code = unsafe { (*info).si_code };
            if code <= 0 {
                // SI_USER, SI_TKILL...: sent by kill/raise, not a fault.
                out.s(", sent by a process (kill/raise)");
            } else if sig == libc::SIGSEGV || sig == libc::SIGBUS {
                // SAFETY: as above; si_addr is the faulting address for kernel-generated
                // SIGSEGV/SIGBUS.
                let addr = unsafe { (*info).si_addr() } as usize;
                out.s(" at address ");
                out.hex(addr as u64);
            }
        }
        out.s("\n");
        write_state(&mut out, gettid());
        out.s("backtrace: not available from a signal handler; see the core file\n");
        if file >= 0 {
            out.s("report saved as crash-<pid>.txt in the dump directory\n");
        }
        out.s("=== end of crash report ===\n");
        out.flush();
        if file >= 0 {
            // SAFETY: closing the fd we opened above.
            unsafe { libc::close(file) };
        }
    }
    let i = FATAL.iter().position(|&s| s == sig).unwrap_or(0);
    let old = OLD_HANDLER.get(i).map_or(0, |h| h.load(Relaxed));
    let flags = OLD_FLAGS.get(i).map_or(0, |f| f.load(Relaxed));
    if old != libc::SIG_DFL && old != libc::SIG_IGN && flags & libc::SA_SIGINFO != 0 {
        // SAFETY: `old` was read from sigaction(2) for this signal with SA_SIGINFO set, so it
        // is a handler of this signature installed by the Rust runtime; it either reports a
        // stack overflow and aborts, or restores the default action and returns.
        let f: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(old) };
        f(sig, info, ctx);
    }
    // SAFETY: signal(2) and raise(3) are async-signal-safe. With the default action restored,
    // the re-raised signal (delivered when this handler returns) ends the process, with a core
    // dump where the limits and core_pattern allow it; a hardware fault would also re-fault.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Installs the fatal-signal handlers (on the alternate signal stack the Rust runtime gives every
/// thread, so a stack overflow can still be reported).
pub fn install_fatal_signal_handlers() -> Result<(), String> {
    for (i, &sig) in FATAL.iter().enumerate() {
        // SAFETY: an all-zero sigaction is a valid starting value; fields are set below.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_fatal_signal as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: sa_mask is a live sigset_t inside `act`.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: as above, filled by the kernel.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: valid signal number, pointers to live sigaction structs. The handler only uses
        // async-signal-safe calls and atomics.
        let r = unsafe { libc::sigaction(sig, &act, &mut old) };
        if r != 0 {
            return Err(format!(
                "sigaction({}): {}",
                signal_name(sig),
                std::io::Error::last_os_error()
            ));
        }
        if let (Some(h), Some(f)) = (OLD_HANDLER.get(i), OLD_FLAGS.get(i)) {
            h.store(old.sa_sigaction, Relaxed);
            f.store(old.sa_flags, Relaxed);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Panics.

/// Installs the panic hook: a crash report with a backtrace on stderr; in diagnostic mode also
/// in `crash-<pid>.txt`, followed by an abort so the kernel writes a core.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let first = !REPORTED.swap(true, SeqCst);
        let diagnostic = DIAGNOSTIC.load(Relaxed);
        let mut out: Vec<u8> = Vec::new();
        out.s("\n=== h3gate crash report ===\ncause: panic: ");
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(non-string payload)".to_string());
        out.s(&msg);
        if let Some(loc) = info.location() {
            out.s(&format!(
                "\nlocation: {}:{}:{}",
                loc.file(),
                loc.line(),
                loc.column()
            ));
        }
        out.s("\n");
        if let Some(name) = std::thread::current().name() {
            out.s(&format!("thread name: {name}\n"));
        }
        write_state(&mut out, gettid());
        if !first {
            out.s("(a crash report was already written: this panic happened while crashing)\n");
        }
        out.s(&format!(
            "backtrace:\n{}\n",
            std::backtrace::Backtrace::force_capture()
        ));
        let mut saved = None;
        if diagnostic && first {
            if let Some(dir) = DUMP_DIR.get() {
                let path = dir.join(format!("crash-{}.txt", std::process::id()));
                let written = {
                    use std::os::unix::fs::OpenOptionsExt;
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&path)
                        .and_then(|mut f| f.write_all(&out))
                };
                match written {
                    Ok(()) => saved = Some(Ok(path)),
                    Err(e) => saved = Some(Err(format!("cannot write {}: {e}", path.display()))),
                }
            }
        }
        match saved {
            Some(Ok(p)) => out.s(&format!("report saved as {}\n", p.display())),
            Some(Err(e)) => out.s(&format!("{e}\n")),
            None => {}
        }
        out.s("=== end of crash report ===\n");
        let _ = std::io::stderr().lock().write_all(&out);
        if diagnostic {
            // Our SIGABRT handler sees REPORTED and only restores the default action, so the
            // process ends with SIGABRT and the kernel dumps core.
            std::process::abort();
        }
    }));
}

// ---------------------------------------------------------------------------------------------
// Diagnostic mode start-up.

/// Default dump directory (the package's state directory).
pub const DEFAULT_DUMP_DIR: &str = "/var/lib/h3gate";

/// Where crash reports (and cores, for a relative core_pattern) go.
#[derive(Debug)]
pub struct DumpDir {
    pub path: PathBuf,
    /// Why the configured/default directory was not used.
    pub fallback: Option<String>,
}

fn writable(dir: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err("not a directory".to_string());
    }
    nix::unistd::access(
        dir,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .map_err(|e| format!("not writable by uid {}: {e}", nix::unistd::getuid()))
}

/// A private directory under the temp dir: `$TMPDIR/h3gate-<uid>`, mode 0700, ours.
fn private_temp_dir() -> Result<PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let uid = nix::unistd::getuid().as_raw();
    let dir = std::env::temp_dir().join(format!("h3gate-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    }
    // Someone else's directory or a symlink planted in a shared /tmp is not ours to use.
    let meta = std::fs::symlink_metadata(&dir).map_err(|e| e.to_string())?;
    if !meta.is_dir() || meta.uid() != uid {
        return Err(format!(
            "{} exists and is not a directory owned by uid {uid}",
            dir.display()
        ));
    }
    writable(&dir).map(|()| dir)
}

/// Picks the dump directory: `configured` (or [`DEFAULT_DUMP_DIR`]) when writable by the current
/// user, else a private temp directory. Call after the privilege drop.
pub fn choose_dump_dir(configured: Option<&Path>) -> Result<DumpDir, String> {
    let wanted = configured.unwrap_or(Path::new(DEFAULT_DUMP_DIR));
    // Best effort: the package normally creates it; a configured one may not exist yet.
    let _ = std::fs::create_dir_all(wanted);
    match writable(wanted) {
        Ok(()) => Ok(DumpDir {
            path: wanted.to_path_buf(),
            fallback: None,
        }),
        Err(why) => {
            let reason = format!("{} is unusable ({why})", wanted.display());
            let path = private_temp_dir().map_err(|e| format!("{reason}; fallback {e}"))?;
            Ok(DumpDir {
                path,
                fallback: Some(reason),
            })
        }
    }
}

/// Turns diagnostic mode on for crash reports: remembers the dump directory (and an open fd on it
/// for the signal handler).
pub fn enable(dump_dir: &Path) -> Result<(), String> {
    let dir = std::fs::File::open(dump_dir).map_err(|e| format!("{}: {e}", dump_dir.display()))?;
    let fd = dir.into_raw_fd();
    let old = DUMP_FD.swap(fd, SeqCst);
    if old >= 0 {
        // SAFETY: closing the previous directory fd, which only this module owned.
        unsafe { libc::close(old) };
    }
    let _ = DUMP_DIR.set(dump_dir.to_path_buf());
    DIAGNOSTIC.store(true, SeqCst);
    Ok(())
}

pub fn diagnostic() -> bool {
    DIAGNOSTIC.load(Relaxed)
}

/// Raises the soft core limit to the hard one. Returns (soft, hard) afterwards.
pub fn raise_core_limit() -> Result<(u64, u64), String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) =
        getrlimit(Resource::RLIMIT_CORE).map_err(|e| format!("getrlimit(RLIMIT_CORE): {e}"))?;
    setrlimit(Resource::RLIMIT_CORE, hard, hard)
        .map_err(|e| format!("setrlimit(RLIMIT_CORE): {e}"))?;
    getrlimit(Resource::RLIMIT_CORE).map_err(|e| format!("getrlimit(RLIMIT_CORE): {e}"))
}

/// `prctl(PR_SET_DUMPABLE, 1)`: a process that changed its uid is not dumpable by default.
pub fn set_dumpable() -> Result<(), String> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(format!(
            "prctl(PR_SET_DUMPABLE): {}",
            std::io::Error::last_os_error()
        ))
    }
}

fn dumpable() -> i32 {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }
}

fn limit(v: u64) -> String {
    if v == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        v.to_string()
    }
}

/// Where a core dump would end up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreVerdict {
    /// A core file is written in this directory.
    File(PathBuf),
    /// The kernel pipes the core to this program (systemd-coredump, apport...).
    Pipe(String),
    /// No core will be written, and why.
    No(String),
}

/// Facts that decide whether a core can be written.
#[derive(Debug, Clone)]
pub struct CoreFacts {
    pub core_soft: u64,
    pub pattern: String,
    pub dumpable: i32,
    pub cwd: PathBuf,
    pub cwd_writable: Result<(), String>,
}

/// Decides from `facts`, with `dir_writable` checking a directory named by an absolute pattern.
pub fn core_verdict(
    f: &CoreFacts,
    dir_writable: impl Fn(&Path) -> Result<(), String>,
) -> CoreVerdict {
    if f.dumpable != 1 {
        return CoreVerdict::No(format!(
            "the process is not dumpable (PR_GET_DUMPABLE = {})",
            f.dumpable
        ));
    }
    let pattern = f.pattern.trim();
    if let Some(prog) = pattern.strip_prefix('|') {
        let prog = prog.split_whitespace().next().unwrap_or("?").to_string();
        return CoreVerdict::Pipe(prog);
    }
    if f.core_soft == 0 {
        return CoreVerdict::No(
            "the core size limit (RLIMIT_CORE) is 0 and its hard limit too; raise it \
             (LimitCORE=infinity under systemd, ulimit -c unlimited in a shell)"
                .to_string(),
        );
    }
    if pattern.starts_with('/') {
        let dir = Path::new(pattern).parent().unwrap_or(Path::new("/"));
        if dir.to_string_lossy().contains('%') {
            return CoreVerdict::File(dir.to_path_buf());
        }
        return match dir_writable(dir) {
            Ok(()) => CoreVerdict::File(dir.to_path_buf()),
            Err(e) => CoreVerdict::No(format!(
                "core_pattern writes to {}, which is unusable: {e}",
                dir.display()
            )),
        };
    }
    match &f.cwd_writable {
        Ok(()) => CoreVerdict::File(f.cwd.clone()),
        Err(e) => CoreVerdict::No(format!(
            "core_pattern is relative, so the core goes to the working directory {}, which is \
             unusable: {e}",
            f.cwd.display()
        )),
    }
}

/// Human text for a verdict.
pub fn describe(v: &CoreVerdict, pattern: &str, core_soft: u64) -> String {
    match v {
        CoreVerdict::File(dir) => {
            let mut s = format!(
                "yes: a core file is written in {} (core_pattern '{}')",
                dir.display(),
                pattern.trim()
            );
            if core_soft != libc::RLIM_INFINITY && core_soft < (64 << 20) {
                s.push_str(&format!(
                    "; but the core limit is {core_soft} bytes, a core may be truncated"
                ));
            }
            s
        }
        CoreVerdict::Pipe(prog) => {
            let mut s = format!(
                "to a program: core_pattern pipes cores to {prog}, not to the dump directory"
            );
            if prog.contains("systemd-coredump") {
                s.push_str(" (see `coredumpctl list h3gate`)");
            } else if prog.contains("apport") {
                s.push_str(" (see /var/crash)");
            }
            if core_soft == 0 {
                s.push_str(
                    "; the core limit is 0, which the program may honour by keeping no core",
                );
            }
            s
        }
        CoreVerdict::No(why) => format!("no: {why}"),
    }
}

/// Diagnostic mode's start-up lines (after the privilege drop and the chdir to `dump`).
pub fn startup_report(dump: &DumpDir) -> Vec<String> {
    use nix::sys::resource::{getrlimit, Resource};
    let mut lines = vec![format!(
        "diagnostic mode: h3gate {VERSION} (commit {COMMIT})"
    )];
    let (core_soft, core_hard) = getrlimit(Resource::RLIMIT_CORE).unwrap_or((0, 0));
    let (nofile_soft, nofile_hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((0, 0));
    lines.push(format!(
        "limits: core {} (hard {}), nofile {} (hard {})",
        limit(core_soft),
        limit(core_hard),
        limit(nofile_soft),
        limit(nofile_hard)
    ));
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern")
        .unwrap_or_else(|e| format!("(unreadable: {e})"));
    let uses_pid = std::fs::read_to_string("/proc/sys/kernel/core_uses_pid").unwrap_or_default();
    lines.push(format!(
        "core_pattern: '{}', core_uses_pid {}",
        pattern.trim(),
        uses_pid.trim()
    ));
    let ids = nix::unistd::getresuid();
    let gids = nix::unistd::getresgid();
    lines.push(format!(
        "dumpable: {}; uid {} (effective {}), gid {} (effective {})",
        dumpable(),
        ids.map(|i| i.real.as_raw()).unwrap_or(u32::MAX),
        ids.map(|i| i.effective.as_raw()).unwrap_or(u32::MAX),
        gids.map(|i| i.real.as_raw()).unwrap_or(u32::MAX),
        gids.map(|i| i.effective.as_raw()).unwrap_or(u32::MAX)
    ));
    match &dump.fallback {
        None => lines.push(format!("dump directory: {}", dump.path.display())),
        Some(why) => lines.push(format!(
            "dump directory: {} (temporary fallback: {why}; set dump-dir)",
            dump.path.display()
        )),
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| dump.path.clone());
    let facts = CoreFacts {
        core_soft,
        pattern: pattern.clone(),
        dumpable: dumpable(),
        cwd_writable: writable(&cwd),
        cwd,
    };
    let v = core_verdict(&facts, writable);
    lines.push(format!("core dump: {}", describe(&v, &pattern, core_soft)));
    lines.push(format!(
        "crash reports: crash-<pid>.txt in {} and on stderr; SIGUSR2 logs each worker's state",
        dump.path.display()
    ));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn facts(pattern: &str, soft: u64) -> CoreFacts {
        CoreFacts {
            core_soft: soft,
            pattern: pattern.to_string(),
            dumpable: 1,
            cwd: PathBuf::from("/var/lib/h3gate"),
            cwd_writable: Ok(()),
        }
    }

    #[test]
    fn verdicts() {
        let ok = |_: &Path| Ok(());
        let inf = libc::RLIM_INFINITY;
        assert_eq!(
            core_verdict(&facts("core", inf), ok),
            CoreVerdict::File("/var/lib/h3gate".into())
        );
        assert_eq!(
            core_verdict(
                &facts("|/usr/lib/systemd/systemd-coredump %P %u %g %s %t %c %h", 0),
                ok
            ),
            CoreVerdict::Pipe("/usr/lib/systemd/systemd-coredump".into())
        );
        assert!(
            matches!(core_verdict(&facts("core", 0), ok), CoreVerdict::No(ref w) if w.contains("RLIMIT_CORE"))
        );
        assert_eq!(
            core_verdict(&facts("/var/crash/core.%e.%p", inf), ok),
            CoreVerdict::File("/var/crash".into())
        );
        let no = |_: &Path| Err("denied".to_string());
        assert!(matches!(
            core_verdict(&facts("/var/crash/core", inf), no),
            CoreVerdict::No(ref w) if w.contains("/var/crash")
        ));
        let mut f = facts("core", inf);
        f.cwd_writable = Err("denied".into());
        assert!(
            matches!(core_verdict(&f, ok), CoreVerdict::No(ref w) if w.contains("working directory"))
        );
        f.dumpable = 0;
        assert!(matches!(core_verdict(&f, ok), CoreVerdict::No(ref w) if w.contains("dumpable")));
        let d = describe(
            &CoreVerdict::Pipe("/usr/share/apport/apport".into()),
            "|/usr/share/apport/apport",
            0,
        );
        assert!(d.contains("/var/crash") && d.contains("limit is 0"), "{d}");
    }

    #[test]
    fn numbers_and_names_without_allocation() {
        let mut v: Vec<u8> = Vec::new();
        v.n(0);
        v.s(" ");
        v.n(1234567890123);
        v.s(" ");
        v.n(u64::MAX);
        v.s(" ");
        v.hex(0);
        v.s(" ");
        v.hex(0xdead_beef);
        assert_eq!(
            String::from_utf8(v).unwrap(),
            format!("0 1234567890123 {} 0x0 0xdeadbeef", u64::MAX)
        );
        let mut buf = [0u8; 40];
        let name = crash_name(&mut buf).to_vec();
        assert_eq!(
            name,
            format!("crash-{}.txt\0", std::process::id()).into_bytes()
        );
    }

    #[test]
    fn raw_out_flushes_in_pieces() {
        let mut fds = [0i32; 2];
        // SAFETY: pipe(2) into a live array of two fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let mut out = RawOut {
            fds: [fds[1], -1],
            buf: [0; 256],
            len: 0,
        };
        let text = "x".repeat(1000);
        out.s(&text);
        out.flush();
        // SAFETY: closing the write end we created.
        unsafe { libc::close(fds[1]) };
        let mut r = std::fs::File::from(unsafe {
            // SAFETY: the read end is ours and closed by File's drop.
            std::os::fd::OwnedFd::from_raw_fd(fds[0])
        });
        let mut got = String::new();
        std::io::Read::read_to_string(&mut r, &mut got).unwrap();
        assert_eq!(got, text);
    }

    #[test]
    fn slot_state_is_reported() {
        let mut p = Probe::register(200);
        p.phase(Phase::Flush);
        p.live((3, 2, 1), 42);
        note_error("WARN worker: something broke");
        // Connection 5 generation 1, stream 7 generation 2, as `Key::to_u64` packs them.
        breadcrumb(200, Some(1 << 32 | 5), Some(2 << 32 | 7));
        let mut out: Vec<u8> = Vec::new();
        write_state(&mut out, gettid());
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("crashed in worker 200: phase flush connections")
                && text.contains("processing connection 5#1, stream 7#2\n"),
            "{text}"
        );
        // The breadcrumbs replaced the old "not tracked" placeholder line.
        assert!(!text.contains("not tracked"), "{text}");
        breadcrumb(200, None, None);
        let mut out: Vec<u8> = Vec::new();
        write_state(&mut out, gettid());
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("processing connection none, stream none\n"),
            "{text}"
        );
        assert!(text.contains("thread: worker-200"), "{text}");
        assert!(text.contains("phase flush connections"), "{text}");
        assert!(text.contains("live connections 3, streams 2, backend connections 1"));
        assert!(text.contains("last warning/error: WARN worker: something broke"));
        assert!(!p.dump_requested());
        request_dump();
        assert!(p.dump_requested());
        assert!(!p.dump_requested());
        drop(p);
        assert_eq!(current_worker(), Some(200));
    }

    #[test]
    fn crash_test_values() {
        assert_eq!(parse_crash_test("1"), Some(CrashTest::Panic));
        assert_eq!(parse_crash_test("segv"), Some(CrashTest::Segv));
        assert_eq!(parse_crash_test("abort"), Some(CrashTest::Abort));
        assert_eq!(parse_crash_test("0"), None);
    }
}
