//! Harness for the end-to-end tests: a per-test [`Env`] that runs the sample
//! origin(s) and h3gate as child processes on free ports, writes their
//! configuration into a private temporary directory, captures every child's
//! stderr in a file (printed when the test fails) and kills everything on
//! drop, panics included. Also: bounded runs of h3get and other commands,
//! the download pattern's checksum, and a tiny raw HTTP/3 client that
//! encodes request header blocks itself, byte for byte.

// Not every test binary that includes this module uses every helper.
#![allow(dead_code)]

pub mod packets;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, ErrorKind, Write as _};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const H3GATE: &str = env!("CARGO_BIN_EXE_h3gate");
pub const H3GET: &str = env!("CARGO_BIN_EXE_h3get");
pub const ORIGIN: &str = env!("CARGO_BIN_EXE_origin");

/// How long a child may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of each child's log printed when a test fails.
const LOG_TAIL_LINES: usize = 80;

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

/// Byte `i` of the origin's and h3get's generated bodies.
pub fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(7).wrapping_add(i >> 8)) as u8
}

/// `n` pattern bytes.
pub fn pattern(n: u64) -> Vec<u8> {
    (0..n).map(pattern_byte).collect()
}

pub fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

pub fn sha256_hex(data: &[u8]) -> String {
    let mut h = boring::sha::Sha256::new();
    h.update(data);
    hex(&h.finish())
}

/// SHA-256 (hex) of the first `n` pattern bytes, computed locally.
pub fn pattern_sha256(n: u64) -> String {
    let mut h = boring::sha::Sha256::new();
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut i = 0;
    while i < n {
        let end = (i + 64 * 1024).min(n);
        buf.clear();
        buf.extend((i..end).map(pattern_byte));
        h.update(&buf);
        i = end;
    }
    hex(&h.finish())
}

/// The line `h3get --sha256` prints for a response.
pub fn sha_line(status: u16, body: &[u8]) -> String {
    format!(
        "status={status} bytes={} sha256={}",
        body.len(),
        sha256_hex(body)
    )
}

/// The line `h3get --sha256` prints for a 200 carrying `n` pattern bytes.
pub fn pattern_line(n: u64) -> String {
    format!("status=200 bytes={n} sha256={}", pattern_sha256(n))
}

/// Ports handed out by this test binary: never twice, so that two tests
/// running in parallel cannot end up on the same port (h3gate binds with
/// SO_REUSEPORT, so a second proxy on the same port would not even fail).
static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();

fn claim_port(port: u16) -> bool {
    let set = PORTS.get_or_init(|| Mutex::new(HashSet::new()));
    let mut set = set.lock().unwrap_or_else(|e| e.into_inner());
    set.insert(port)
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_udp_port() -> u16 {
    for _ in 0..100 {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind UDP 127.0.0.1:0");
        let port = s.local_addr().expect("local_addr").port();
        // Also free on TCP, so that nothing else here is likely to want it.
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && claim_port(port) {
            return port;
        }
    }
    panic!("no free UDP port found");
}

/// A TCP port on 127.0.0.1 with nothing listening on it.
pub fn closed_tcp_port() -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind TCP 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        if claim_port(port) {
            return port;
        }
    }
    panic!("no free TCP port found");
}

/// Last `n` lines of a file, or a note saying why not.
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let s = String::from_utf8_lossy(&b);
            let lines: Vec<&str> = s.lines().collect();
            let start = lines.len().saturating_sub(n);
            let mut out = String::new();
            if start > 0 {
                let _ = writeln!(out, "[... {start} earlier lines ...]");
            }
            for l in &lines[start..] {
                out.push_str(l);
                out.push('\n');
            }
            out
        }
        Err(e) => format!("[cannot read {}: {e}]\n", path.display()),
    }
}

/// Spawns `cmd` so that it gets SIGKILL if the spawning thread goes away
/// without having reaped it (no orphans even if the test binary dies).
pub fn spawn_child(cmd: &mut Command) -> io::Result<Child> {
    // SAFETY: the closure runs between fork and exec and only calls the
    // async-signal-safe prctl(2) and getppid(2).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl: then do not run at all.
            if libc::getppid() == 1 {
                return Err(io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
    cmd.stdin(Stdio::null()).spawn()
}

/// How long a SIGKILLed child may take to be reaped before we give up on it.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends SIGKILL unless the child already exited.
fn sigkill(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
}

/// Reaps a child that was sent SIGKILL, waiting at most [`REAP_TIMEOUT`]
/// (a process stuck in the kernel cannot be helped; say so and go on).
fn reap(child: &mut Child, name: &str) {
    let deadline = Instant::now() + REAP_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let pid = child.id();
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let wchan =
                    std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
                eprintln!(
                    "WARNING: {name} (pid {pid}) still not gone {REAP_TIMEOUT:?} after SIGKILL \
                     (stat: {stat}, wchan: {wchan}); leaving it"
                );
                return;
            }
        }
    }
}

fn kill_child(child: &mut Child) {
    sigkill(child);
    reap(child, "child");
}

/// The value of `field` in each line of `log` that contains `marker`, one per worker: h3gate
/// logs `worker N stats: Stats { .. }` and `worker N ring: RingStats { .. }` when it stops. A
/// missing field fails, as does a log without such a line.
pub fn shutdown_stat(log: &str, marker: &str, field: &str) -> Vec<u64> {
    let key = format!("{field}: ");
    let mut values = Vec::new();
    for line in log.lines().filter(|l| l.contains(marker)) {
        let v = line
            .split(&key)
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in stats line: {line}"));
        values.push(v);
    }
    assert!(!values.is_empty(), "no '{marker}' lines in the log:\n{log}");
    values
}

/// `field` of each worker's `Stats` (core counters) at shutdown.
pub fn worker_stat_from_log(log: &str, field: &str) -> Vec<u64> {
    shutdown_stat(log, " stats: Stats {", field)
}

/// `field` of each worker's `RingStats` at shutdown.
pub fn ring_stat_from_log(log: &str, field: &str) -> Vec<u64> {
    shutdown_stat(log, " ring: RingStats {", field)
}

/// A test that cannot run here: prints `SKIPPED test: reason` (so a skip is never silent), and
/// fails instead under CI (`CI` set, as `.ci/run` does), where everything a test needs is
/// provided and a skip would hide that it was not.
pub fn skip(test: &str, reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test} would be skipped under CI: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
}

/// aioquic (PyPI) importable by `python3`: the independent client of `tests/data/aioquic_get.py`.
/// When it is not, the test is skipped (see [`skip`]) and returns.
pub fn have_aioquic(test: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import aioquic"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip(test, "python3 cannot import aioquic (pip install aioquic)");
    }
    ok
}

/// Whether a program can be run (found on PATH).
pub fn have_program(name: &str) -> bool {
    match Command::new(name)
        .arg("--help")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(mut c) => {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => return true,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    _ => {
                        kill_child(&mut c);
                        return true;
                    }
                }
            }
        }
        Err(e) => e.kind() != ErrorKind::NotFound,
    }
}

// ---------------------------------------------------------------------------
// Certificate
// ---------------------------------------------------------------------------

/// A PEM certificate and its key.
type CertKey = (Vec<u8>, Vec<u8>);

/// PEM certificate and key, generated once per test binary.
fn cert_pem() -> &'static CertKey {
    static CERT: OnceLock<Result<CertKey, String>> = OnceLock::new();
    let r = CERT.get_or_init(|| {
        let dir = unique_dir("cert");
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let res = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdin(Stdio::null())
            .output();
        let r = match res {
            Ok(o) if o.status.success() => match (std::fs::read(&cert), std::fs::read(&key)) {
                (Ok(c), Ok(k)) => Ok((c, k)),
                (Err(e), _) | (_, Err(e)) => Err(format!("openssl wrote no cert/key: {e}")),
            },
            Ok(o) => Err(format!(
                "openssl req failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => Err(format!("cannot run openssl (install it): {e}")),
        };
        let _ = std::fs::remove_dir_all(&dir);
        r
    });
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

fn unique_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "h3gate-e2e-{}-{n}-{nanos:x}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    dir
}

// ---------------------------------------------------------------------------
// Command output
// ---------------------------------------------------------------------------

/// What a finished command left.
pub struct Out {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Out {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The `status=... bytes=... sha256=...` lines of `h3get --sha256`.
    pub fn sha_lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with("status="))
            .collect()
    }

    /// Panics (with everything printed) unless the command exited 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "{} failed:\n{self}", self.what);
        self
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cut = |s: &str| -> String {
            if s.len() > 8000 {
                let mut i = s.len() - 8000;
                while !s.is_char_boundary(i) {
                    i += 1;
                }
                format!("[... {i} bytes ...]{}", &s[i..])
            } else {
                s.to_string()
            }
        };
        writeln!(
            f,
            "  command: {}\n  exit: {} after {} ms",
            self.what,
            self.status,
            self.elapsed.as_millis()
        )?;
        writeln!(f, "  --- stdout ---\n{}", cut(&self.stdout))?;
        writeln!(f, "  --- stderr ---\n{}", cut(&self.stderr))
    }
}

/// A command running in the background with stdout/stderr going to files.
pub struct Running {
    what: String,
    child: Option<Child>,
    out: PathBuf,
    err: PathBuf,
    started: Instant,
}

impl Running {
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Whether the command has exited (it is not reaped here).
    pub fn finished(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// Waits for the command; kills it and panics after `timeout`.
    #[track_caller]
    pub fn wait(mut self, timeout: Duration) -> Out {
        let deadline = self.started + timeout;
        let mut child = self.child.take().expect("child");
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    kill_child(&mut child);
                    panic!(
                        "{} did not finish within {:?}; killed it.\nstdout:\n{}\nstderr:\n{}",
                        self.what,
                        timeout,
                        tail(&self.out, 40),
                        tail(&self.err, 40)
                    );
                }
                Err(e) => panic!("wait for {}: {e}", self.what),
            }
        };
        let read =
            |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
        let out = Out {
            what: self.what.clone(),
            status,
            stdout: read(&self.out),
            stderr: read(&self.err),
            elapsed: self.started.elapsed(),
        };
        let _ = std::fs::remove_file(&self.out);
        let _ = std::fs::remove_file(&self.err);
        out
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            kill_child(c);
        }
    }
}

// ---------------------------------------------------------------------------
// The environment
// ---------------------------------------------------------------------------

/// A long-running child (origin or proxy) whose stderr goes to `log`.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// The test stopped it (or expects it to exit): its exit is not a crash at teardown.
    stopped: bool,
}

/// Settings of the generated h3gate configuration.
#[derive(Clone)]
pub struct ProxyConf {
    /// Backend server addresses (`host:port`).
    pub servers: Vec<String>,
    pub workers: u32,
    /// `user` in the global section. h3gate refuses to run as root without
    /// one, so it defaults to `root` when the tests run as root.
    pub user: Option<String>,
    pub timeout_connect: String,
    pub timeout_server: String,
    pub timeout_client: String,
    pub timeout_drain: String,
    pub timeout_handshake: String,
    /// Extra lines for the frontend section.
    pub frontend_extra: Vec<String>,
    /// Extra lines for the global section.
    pub global_extra: Vec<String>,
    /// More bind hosts (e.g. "[::1]") on the same port.
    pub extra_binds: Vec<String>,
}

impl ProxyConf {
    pub fn new(servers: Vec<String>) -> ProxyConf {
        ProxyConf {
            servers,
            workers: 1,
            user: nix::unistd::geteuid().is_root().then(|| "root".to_string()),
            timeout_connect: "2s".into(),
            timeout_server: "20s".into(),
            timeout_client: "30s".into(),
            timeout_drain: "5s".into(),
            timeout_handshake: "5s".into(),
            frontend_extra: Vec::new(),
            global_extra: Vec::new(),
            extra_binds: Vec::new(),
        }
    }

    pub fn render(&self, port: u16, dir: &Path) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# generated by tests/common/mod.rs");
        let _ = writeln!(s, "global");
        let _ = writeln!(s, "    workers {}", self.workers);
        for l in &self.global_extra {
            let _ = writeln!(s, "    {l}");
        }
        if let Some(u) = &self.user {
            let _ = writeln!(s, "    user {u}");
        }
        let _ = writeln!(s, "defaults");
        let _ = writeln!(s, "    timeout connect {}", self.timeout_connect);
        let _ = writeln!(s, "    timeout server {}", self.timeout_server);
        let _ = writeln!(s, "    timeout client {}", self.timeout_client);
        let _ = writeln!(s, "    timeout drain {}", self.timeout_drain);
        let _ = writeln!(s, "    timeout handshake {}", self.timeout_handshake);
        let _ = writeln!(s, "frontend web");
        let _ = writeln!(s, "    bind 127.0.0.1:{port}");
        for h in &self.extra_binds {
            let _ = writeln!(s, "    bind {h}:{port}");
        }
        let _ = writeln!(s, "    cert {}", dir.join("cert.pem").display());
        let _ = writeln!(s, "    key {}", dir.join("key.pem").display());
        let _ = writeln!(s, "    default_backend app");
        for l in &self.frontend_extra {
            let _ = writeln!(s, "    {l}");
        }
        let _ = writeln!(s, "backend app");
        let _ = writeln!(s, "    balance roundrobin");
        for (i, a) in self.servers.iter().enumerate() {
            let _ = writeln!(s, "    server s{i} {a}");
        }
        s
    }
}

/// One test's processes, ports and files.
pub struct Env {
    pub name: String,
    pub dir: PathBuf,
    /// The proxy's UDP port (0 until [`Env::start_proxy`]).
    pub port: u16,
    pub config_path: PathBuf,
    procs: Vec<Proc>,
    proxy: Option<usize>,
    files: AtomicUsize,
}

impl Env {
    /// A fresh directory holding the test certificate; nothing running yet.
    pub fn new(name: &str) -> Env {
        let dir = unique_dir(name);
        let (cert, key) = cert_pem();
        std::fs::write(dir.join("cert.pem"), cert).expect("write cert.pem");
        std::fs::write(dir.join("key.pem"), key).expect("write key.pem");
        Env {
            name: name.to_string(),
            config_path: dir.join("h3gate.conf"),
            dir,
            port: 0,
            procs: Vec::new(),
            proxy: None,
            files: AtomicUsize::new(0),
        }
    }

    /// One origin and h3gate in front of it, with the default settings.
    pub fn start(name: &str) -> Env {
        Env::start_with(name, |_| {})
    }

    /// One origin and h3gate in front of it; `tweak` adjusts the config.
    pub fn start_with(name: &str, tweak: impl FnOnce(&mut ProxyConf)) -> Env {
        let mut env = Env::new(name);
        let origin = env.start_origin();
        let mut conf = ProxyConf::new(vec![origin.to_string()]);
        tweak(&mut conf);
        env.start_proxy(&conf);
        env
    }

    fn next_file(&self, what: &str) -> PathBuf {
        let n = self.files.fetch_add(1, Ordering::SeqCst);
        self.dir.join(format!("{n:03}-{what}"))
    }

    /// Starts an origin on a free port; returns its address once it listens.
    pub fn start_origin(&mut self) -> SocketAddr {
        let idx = self
            .procs
            .iter()
            .filter(|p| p.name.starts_with("origin"))
            .count();
        let name = format!("origin{idx}");
        let log = self.dir.join(format!("{name}.log"));
        let f = File::create(&log).expect("create origin log");
        let child = spawn_child(
            Command::new(ORIGIN)
                .args(["--listen", "127.0.0.1:0"])
                .stdout(Stdio::null())
                .stderr(f),
        )
        .unwrap_or_else(|e| panic!("cannot start {ORIGIN}: {e}"));
        self.procs.push(Proc {
            name: name.clone(),
            child,
            log: log.clone(),
            stopped: false,
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(rest) = text.split("origin listening on ").nth(1) {
                if let Some(line) = rest.lines().next() {
                    if let Ok(addr) = line.trim().parse::<SocketAddr>() {
                        return addr;
                    }
                }
            }
            let p = self.procs.last_mut().expect("proc");
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("{name} exited ({st}) before listening:\n{}", tail(&log, 40));
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not say it listens within {READY_TIMEOUT:?}:\n{}",
                tail(&log, 40)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Writes the configuration and starts h3gate on a free UDP port;
    /// returns once it logs that it serves (retrying on a port clash).
    pub fn start_proxy(&mut self, conf: &ProxyConf) {
        assert!(self.proxy.is_none(), "proxy already started");
        let level = std::env::var("H3GATE_E2E_LOG").unwrap_or_else(|_| "debug".into());
        for attempt in 0..5 {
            let port = free_udp_port();
            std::fs::write(&self.config_path, conf.render(port, &self.dir)).expect("write config");
            let log = self.dir.join(format!("h3gate-{attempt}.log"));
            let f = File::create(&log).expect("create proxy log");
            let child = spawn_child(
                Command::new(H3GATE)
                    .arg("run")
                    .arg("-c")
                    .arg(&self.config_path)
                    .args(["-l", &level])
                    .current_dir(&self.dir)
                    .stdout(Stdio::null())
                    .stderr(f),
            )
            .unwrap_or_else(|e| panic!("cannot start {H3GATE}: {e}"));
            self.procs.push(Proc {
                name: "h3gate".into(),
                child,
                log: log.clone(),
                stopped: false,
            });
            let idx = self.procs.len() - 1;
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.matches("serving on").count() >= conf.workers as usize {
                    self.proxy = Some(idx);
                    self.port = port;
                    return;
                }
                if let Ok(Some(st)) = self.procs[idx].child.try_wait() {
                    self.procs[idx].stopped = true;
                    if text.contains("in use") && attempt < 4 {
                        // Someone took the port in the meantime: try another.
                        break;
                    }
                    panic!(
                        "h3gate exited ({st}) before serving; config:\n{}\nlog:\n{}",
                        conf.render(port, &self.dir),
                        tail(&log, 60)
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "h3gate did not log 'serving on' within {READY_TIMEOUT:?}:\n{}",
                    tail(&log, 60)
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        panic!("could not start h3gate on a free port");
    }

    fn proxy_proc(&mut self) -> &mut Proc {
        let i = self.proxy.expect("proxy not started");
        &mut self.procs[i]
    }

    pub fn proxy_pid(&mut self) -> i32 {
        self.proxy_proc().child.id() as i32
    }

    /// Whether h3gate is still running.
    pub fn proxy_alive(&mut self) -> bool {
        matches!(self.proxy_proc().child.try_wait(), Ok(None))
    }

    /// Sends `sig` to h3gate. Any signal but SIGHUP, SIGUSR1 and SIGUSR2 may end it, so its
    /// exit is then the test's business, not a crash found at teardown.
    pub fn signal_proxy(&mut self, sig: nix::sys::signal::Signal) {
        use nix::sys::signal::Signal::{SIGHUP, SIGUSR1, SIGUSR2};
        if !matches!(sig, SIGHUP | SIGUSR1 | SIGUSR2) {
            self.proxy_proc().stopped = true;
        }
        let pid = nix::unistd::Pid::from_raw(self.proxy_pid());
        nix::sys::signal::kill(pid, sig).expect("kill(h3gate)");
    }

    /// Waits up to `timeout` for h3gate to exit (the test expects it to).
    pub fn wait_proxy_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proxy_proc().stopped = true;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.proxy_proc().child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops h3gate with SIGTERM and checks it exited 0, so that [`Env::start_proxy`] can
    /// start another (a restart).
    pub fn stop_proxy(&mut self) {
        self.signal_proxy(nix::sys::signal::Signal::SIGTERM);
        let st = self.wait_proxy_exit(Duration::from_secs(15));
        let log = self.proxy_log();
        match st {
            Some(st) => assert!(st.success(), "h3gate exited {st} on SIGTERM:\n{log}"),
            None => panic!("h3gate did not stop within 15 s of SIGTERM:\n{log}"),
        }
        self.proxy = None;
    }

    /// h3gate's log so far.
    pub fn proxy_log(&mut self) -> String {
        let p = self.proxy_proc().log.clone();
        String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
    }

    /// `https://localhost:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    /// Starts a command with stdout and stderr going to files of this env.
    pub fn spawn(&self, what: &str, cmd: &mut Command) -> Running {
        let out = self.next_file("stdout");
        let err = self.next_file("stderr");
        let child = spawn_child(
            cmd.stdout(File::create(&out).expect("create stdout file"))
                .stderr(File::create(&err).expect("create stderr file")),
        )
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Running {
            what: what.to_string(),
            child: Some(child),
            out,
            err,
            started: Instant::now(),
        }
    }

    /// Runs a command to completion, killing it (and panicking) after
    /// `timeout`.
    #[track_caller]
    pub fn run(&self, what: &str, cmd: &mut Command, timeout: Duration) -> Out {
        self.spawn(what, cmd).wait(timeout)
    }

    /// Starts `h3get --insecure --timeout T ARGS...`; h3get gives up after
    /// `t_secs`, the harness kills it 5 s later.
    pub fn spawn_h3get(&self, t_secs: u64, args: &[&str]) -> Running {
        let mut cmd = Command::new(H3GET);
        cmd.arg("--insecure")
            .args(["--timeout", &t_secs.to_string()])
            .args(args);
        let what = format!("h3get --insecure --timeout {t_secs} {}", args.join(" "));
        self.spawn(&what, &mut cmd)
    }

    /// Runs h3get (see [`Env::spawn_h3get`]) to completion.
    #[track_caller]
    pub fn h3get_t(&self, t_secs: u64, args: &[&str]) -> Out {
        self.spawn_h3get(t_secs, args)
            .wait(Duration::from_secs(t_secs + 5))
    }

    /// One request with aioquic (`tests/data/aioquic_get.py`, see there for `args`).
    pub fn aioquic(&self, args: &[&str]) -> Out {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/aioquic_get.py");
        self.run(
            &format!("aioquic_get.py {}", args.join(" ")),
            Command::new("python3").arg(script).args(args),
            Duration::from_secs(40),
        )
    }

    /// Runs h3get with a 10 s deadline.
    #[track_caller]
    pub fn h3get(&self, args: &[&str]) -> Out {
        self.h3get_t(10, args)
    }
}

/// Whether the tests run under AddressSanitizer (`tests/sanitize` sets
/// `H3GATE_SANITIZE=1`): RSS bounds are skipped (shadow memory and the
/// quarantine inflate RSS) and [`Env`] stops h3gate with SIGTERM, so that
/// LeakSanitizer checks it at exit.
pub fn sanitize() -> bool {
    std::env::var_os("H3GATE_SANITIZE").is_some_and(|v| v != "0")
}

/// Asserts an RSS bound, except under AddressSanitizer (`tests/sanitize`), whose shadow memory
/// and quarantine of freed blocks inflate RSS: there the bound is only printed as skipped.
#[track_caller]
pub fn assert_rss(ok: bool, msg: String) {
    if sanitize() {
        if !ok {
            eprintln!("H3GATE_SANITIZE: RSS bound skipped under ASan (would fail): {msg}");
        }
    } else {
        assert!(ok, "{msg}");
    }
}

/// How long a sanitized h3gate may take to stop on SIGTERM: the drain, then the closing period
/// of connections whose clients vanished (3 PTOs, long when ASan slows the handshake RTTs).
const SANITIZE_STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Under [`sanitize`], stops a still-running h3gate with SIGTERM (a graceful stop, so that the
/// process exits and LeakSanitizer checks it) and waits for it; otherwise does nothing.
pub fn sanitize_stop(child: &mut Child, what: &str) {
    if !sanitize() || !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + SANITIZE_STOP_TIMEOUT;
    while let Ok(None) = child.try_wait() {
        if Instant::now() >= deadline {
            // Straight to stderr, past the test harness's capture: tests/sanitize counts these.
            let _ = writeln!(
                io::stderr(),
                "[{what}] WARNING: h3gate still running {SANITIZE_STOP_TIMEOUT:?} after SIGTERM: \
                 killed, not leak-checked"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // A crash after the last response would otherwise go unseen: every h3gate the test did
        // not stop must still be running now.
        let mut died = None;
        if !std::thread::panicking() {
            for p in self
                .procs
                .iter_mut()
                .filter(|p| p.name == "h3gate" && !p.stopped)
            {
                if let Ok(Some(st)) = p.child.try_wait() {
                    died = Some(format!(
                        "h3gate exited ({st}) during the test, which did not stop it; log:\n{}",
                        tail(&p.log, LOG_TAIL_LINES)
                    ));
                }
            }
        }
        for p in self.procs.iter_mut().filter(|p| p.name == "h3gate") {
            sanitize_stop(&mut p.child, &self.name);
        }
        // h3gate first, so that it sees no backend going away; then reap.
        for p in self.procs.iter_mut().rev() {
            sigkill(&mut p.child);
        }
        for p in self.procs.iter_mut().rev() {
            reap(&mut p.child, &p.name);
        }
        let keep = std::env::var_os("H3GATE_E2E_KEEP").is_some();
        if std::thread::panicking() {
            for p in &self.procs {
                eprintln!(
                    "===== {} log ({}), last {LOG_TAIL_LINES} lines =====\n{}",
                    p.name,
                    p.log.display(),
                    tail(&p.log, LOG_TAIL_LINES)
                );
            }
            if self.config_path.exists() {
                eprintln!(
                    "===== h3gate config =====\n{}",
                    std::fs::read_to_string(&self.config_path).unwrap_or_default()
                );
            }
        }
        if keep {
            eprintln!("[{}] kept {}", self.name, self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if let Some(msg) = died {
            panic!("[{}] {msg}", self.name);
        }
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP/3 client
// ---------------------------------------------------------------------------

/// How a raw request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawOutcome {
    /// The server reset the request stream with this error code.
    Reset(u64),
    /// A complete response.
    Response { status: u16, body: Vec<u8> },
    /// The connection closed (error code, is_app) before the stream ended.
    ConnClosed(String),
}

/// A minimal HTTP/3 client on top of quiche's transport whose request
/// HEADERS are QPACK-encoded here, literally and byte for byte (quiche's own
/// encoder lowercases names), independently of h3get.
pub struct RawH3 {
    conn: quiche::Connection,
    sock: UdpSocket,
    local: SocketAddr,
    peer: SocketAddr,
    next_bidi: u64,
    bufs: std::collections::HashMap<u64, (Vec<u8>, bool)>,
    resets: std::collections::HashMap<u64, u64>,
}

fn put_varint(out: &mut Vec<u8>, v: u64) {
    if v < 1 << 6 {
        out.push(v as u8);
    } else if v < 1 << 14 {
        out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes());
    } else if v < 1 << 30 {
        out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

fn get_varint(b: &[u8]) -> Option<(u64, usize)> {
    let first = *b.first()?;
    let len = 1usize << (first >> 6);
    if b.len() < len {
        return None;
    }
    let mut v = u64::from(first & 0x3f);
    for &x in &b[1..len] {
        v = (v << 8) | u64::from(x);
    }
    Some((v, len))
}

/// QPACK/HPACK prefixed integer (RFC 7541 section 5.1).
fn put_prefixed_int(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut v: u64) {
    let mask = (1u64 << prefix_bits) - 1;
    if v < mask {
        out.push(first | v as u8);
        return;
    }
    out.push(first | mask as u8);
    v -= mask;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A HEADERS frame whose field section holds every field as a literal
/// field line with a literal name, no Huffman coding, in the given order.
pub fn raw_headers_frame(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    // Required Insert Count 0, Delta Base 0.
    let mut block = vec![0u8, 0u8];
    for (name, value) in fields {
        // 001 N=0 H=0, 3-bit name length prefix.
        put_prefixed_int(&mut block, 0x20, 3, name.len() as u64);
        block.extend_from_slice(name);
        // H=0, 7-bit value length prefix.
        put_prefixed_int(&mut block, 0x00, 7, value.len() as u64);
        block.extend_from_slice(value);
    }
    let mut frame = Vec::new();
    put_varint(&mut frame, 0x01);
    put_varint(&mut frame, block.len() as u64);
    frame.extend_from_slice(&block);
    frame
}

impl RawH3 {
    /// Connects to 127.0.0.1:`port` (SNI localhost, no certificate check)
    /// and opens the client's control stream.
    pub fn connect(port: u16, timeout: Duration) -> Result<RawH3, String> {
        let mut config =
            quiche::Config::new(quiche::PROTOCOL_VERSION).map_err(|e| format!("config: {e:?}"))?;
        config.verify_peer(false);
        config
            .set_application_protos(&[b"h3"])
            .map_err(|e| format!("alpn: {e:?}"))?;
        config.set_max_idle_timeout(10_000);
        config.set_max_recv_udp_payload_size(65527);
        config.set_max_send_udp_payload_size(1350);
        config.set_initial_max_data(10_000_000);
        config.set_initial_max_stream_data_bidi_local(1_000_000);
        config.set_initial_max_stream_data_bidi_remote(1_000_000);
        config.set_initial_max_stream_data_uni(1_000_000);
        config.set_initial_max_streams_bidi(100);
        config.set_initial_max_streams_uni(100);
        let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        let local = sock.local_addr().map_err(|e| e.to_string())?;
        let peer: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut scid = [0u8; 16];
        boring::rand::rand_bytes(&mut scid).map_err(|e| e.to_string())?;
        let scid = quiche::ConnectionId::from_ref(&scid);
        let conn = quiche::connect(Some("localhost"), &scid, local, peer, &mut config)
            .map_err(|e| format!("connect: {e:?}"))?;
        let mut c = RawH3 {
            conn,
            sock,
            local,
            peer,
            next_bidi: 0,
            bufs: Default::default(),
            resets: Default::default(),
        };
        let deadline = Instant::now() + timeout;
        while !c.conn.is_established() {
            if c.conn.is_closed() {
                return Err(format!(
                    "connection closed during the handshake: {:?}",
                    c.conn.peer_error().or(c.conn.local_error())
                ));
            }
            if Instant::now() >= deadline {
                return Err("handshake timed out".into());
            }
            c.step(deadline)?;
        }
        // Control stream: type 0x00, then an empty SETTINGS frame.
        c.conn
            .stream_send(2, &[0x00, 0x04, 0x00], false)
            .map_err(|e| format!("control stream: {e:?}"))?;
        c.flush()?;
        Ok(c)
    }

    fn flush(&mut self) -> Result<(), String> {
        let mut out = [0u8; 1500];
        loop {
            match self.conn.send(&mut out) {
                Ok((n, info)) => {
                    if let Err(e) = self.sock.send_to(&out[..n], info.to) {
                        return Err(format!("send: {e}"));
                    }
                }
                Err(quiche::Error::Done) => return Ok(()),
                Err(e) => return Err(format!("quiche send: {e:?}")),
            }
        }
    }

    /// One round: send, wait for a datagram or a timer, receive, read.
    fn step(&mut self, deadline: Instant) -> Result<(), String> {
        self.flush()?;
        let now = Instant::now();
        let mut wait = deadline.saturating_duration_since(now);
        if let Some(t) = self.conn.timeout() {
            wait = wait.min(t);
        }
        let wait = wait.clamp(Duration::from_millis(1), Duration::from_millis(100));
        self.sock
            .set_read_timeout(Some(wait))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 65536];
        match self.sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let info = quiche::RecvInfo {
                    from,
                    to: self.local,
                };
                let _ = self.conn.recv(&mut buf[..n], info);
                // Drain whatever else is queued without waiting.
                self.sock.set_nonblocking(true).map_err(|e| e.to_string())?;
                while let Ok((n, from)) = self.sock.recv_from(&mut buf) {
                    let info = quiche::RecvInfo {
                        from,
                        to: self.local,
                    };
                    let _ = self.conn.recv(&mut buf[..n], info);
                }
                self.sock
                    .set_nonblocking(false)
                    .map_err(|e| e.to_string())?;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("recv: {e}")),
        }
        if self.conn.timeout() == Some(Duration::ZERO) {
            self.conn.on_timeout();
        }
        if let Some(t) = self.conn.timeout_instant() {
            if t <= Instant::now() {
                self.conn.on_timeout();
            }
        }
        let readable: Vec<u64> = self.conn.readable().collect();
        for sid in readable {
            loop {
                match self.conn.stream_recv(sid, &mut buf) {
                    Ok((n, fin)) => {
                        let e = self.bufs.entry(sid).or_default();
                        e.0.extend_from_slice(&buf[..n]);
                        e.1 |= fin;
                    }
                    Err(quiche::Error::StreamReset(code)) => {
                        self.resets.insert(sid, code);
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        self.flush()
    }

    /// Sends a request stream with exactly `fields` (in order, literal
    /// names) and no body; returns its stream id.
    pub fn send_headers(&mut self, fields: &[(&[u8], &[u8])]) -> Result<u64, String> {
        let sid = self.next_bidi;
        self.next_bidi += 4;
        let frame = raw_headers_frame(fields);
        let n = self
            .conn
            .stream_send(sid, &frame, true)
            .map_err(|e| format!("stream_send: {e:?}"))?;
        if n != frame.len() {
            return Err(format!("stream_send wrote {n} of {} bytes", frame.len()));
        }
        self.flush()?;
        Ok(sid)
    }

    /// A well-formed GET for `path` (authority `localhost:PORT`).
    pub fn send_get(&mut self, path: &str) -> Result<u64, String> {
        let authority = format!("localhost:{}", self.peer.port());
        self.send_headers(&[
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", authority.as_bytes()),
            (b":path", path.as_bytes()),
        ])
    }

    /// Waits for stream `sid` to end: a complete response, a reset, or the
    /// connection closing.
    pub fn wait(&mut self, sid: u64, timeout: Duration) -> Result<RawOutcome, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(&code) = self.resets.get(&sid) {
                return Ok(RawOutcome::Reset(code));
            }
            if let Some((data, true)) = self.bufs.get(&sid) {
                return parse_response(data)
                    .map(|(status, body)| RawOutcome::Response { status, body });
            }
            if self.conn.is_closed() {
                return Ok(RawOutcome::ConnClosed(format!(
                    "peer {:?}, local {:?}, timed out {}",
                    self.conn.peer_error(),
                    self.conn.local_error(),
                    self.conn.is_timed_out()
                )));
            }
            if Instant::now() >= deadline {
                return Err(format!("stream {sid}: no answer within {timeout:?}"));
            }
            self.step(deadline)?;
        }
    }
}

impl Drop for RawH3 {
    fn drop(&mut self) {
        let _ = self.conn.close(true, 0x100, b"");
        let _ = self.flush();
    }
}

/// Parses a complete response stream: HEADERS (final status), DATA...
fn parse_response(mut data: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let mut status = None;
    let mut body = Vec::new();
    let mut dec = quiche::h3::qpack::Decoder::new();
    while !data.is_empty() {
        let (ty, a) = get_varint(data).ok_or("truncated frame type")?;
        let (len, b) = get_varint(&data[a..]).ok_or("truncated frame length")?;
        let start = a + b;
        let end = start
            .checked_add(len as usize)
            .filter(|&e| e <= data.len())
            .ok_or("truncated frame")?;
        let payload = &data[start..end];
        match ty {
            0x01 => {
                let list = dec
                    .decode(payload, u64::MAX)
                    .map_err(|e| format!("QPACK decode: {e:?}"))?;
                use quiche::h3::NameValue;
                let st = list
                    .iter()
                    .find(|h| h.name() == b":status")
                    .and_then(|h| std::str::from_utf8(h.value()).ok()?.parse::<u16>().ok());
                match st {
                    Some(s) if s >= 200 && status.is_none() => status = Some(s),
                    Some(_) => {}
                    None if status.is_some() => {} // trailers
                    None => return Err("response HEADERS without :status".into()),
                }
            }
            0x00 => body.extend_from_slice(payload),
            _ => {} // unknown or reserved frame types are ignored
        }
        data = &data[end..];
    }
    status
        .map(|s| (s, body))
        .ok_or_else(|| "stream ended without a final response".to_string())
}
