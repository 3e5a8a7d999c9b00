//! h3gate: HTTP/3 (QUIC) edge proxy and load balancer for HTTP/1.1 services.
//!
//! Start-up order (`run`): read the configuration; resolve `user`/`group` (refusing root without
//! `user`); bind every socket and load every TLS key, possibly as root; drop privileges while
//! the process is still single-threaded; open the log files; in diagnostic mode prepare the dump
//! directory; start the metrics thread and the workers; tell systemd `READY=1` once every worker
//! is serving. The main thread then only handles signals: SIGTERM/SIGINT (graceful stop, with
//! `STOPPING=1`), SIGHUP (validate the file again and reopen logs; see `reload`), SIGUSR1 (reopen
//! logs), SIGUSR2 (each worker logs its state).

use h3gate::config::{self, Config, ConfigError, LogTarget};
use h3gate::tickets::TicketKeys;
use h3gate::{cid, diag, frontend, logger, metrics, notify, privdrop, worker};

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use argh::FromArgs;

/// h3gate: serve HTTP/1.1 services to browsers over HTTP/3.
#[derive(FromArgs)]
struct Cli {
    #[argh(subcommand)]
    cmd: Command,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Run(RunCmd),
    Check(CheckCmd),
    Version(VersionCmd),
}

/// Run the proxy in the foreground (logs to stderr). SIGTERM/SIGINT stop it gracefully, SIGHUP
/// re-validates the configuration and reopens logs, SIGUSR1 reopens logs, SIGUSR2 logs each
/// worker's state.
#[derive(FromArgs)]
#[argh(subcommand, name = "run")]
struct RunCmd {
    /// configuration file
    #[argh(
        option,
        short = 'c',
        default = "PathBuf::from(\"/etc/h3gate/h3gate.conf\")"
    )]
    config: PathBuf,
    /// log level: error, warn, info, debug, trace (default info; env H3GATE_LOG also works)
    #[argh(option, short = 'l')]
    log: Option<String>,
    /// diagnostic mode (same as `diagnostic on`): core dumps enabled, crash reports in the dump
    /// directory, start-up checks printed
    #[argh(switch)]
    diag: bool,
}

/// Validate a configuration file: prints file:line: message for each problem, exit 1 if any.
#[derive(FromArgs)]
#[argh(subcommand, name = "check")]
struct CheckCmd {
    /// configuration file
    #[argh(
        option,
        short = 'c',
        default = "PathBuf::from(\"/etc/h3gate/h3gate.conf\")"
    )]
    config: PathBuf,
}

/// Print the version.
#[derive(FromArgs)]
#[argh(subcommand, name = "version")]
struct VersionCmd {
    /// also print the build commit
    #[argh(switch, short = 'v')]
    verbose: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);
static RELOAD: AtomicBool = AtomicBool::new(false);
static REOPEN: AtomicBool = AtomicBool::new(false);

// The handlers below only store to atomics: async-signal-safe.
extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

extern "C" fn on_hup(_: libc::c_int) {
    RELOAD.store(true, Ordering::SeqCst);
}

extern "C" fn on_usr1(_: libc::c_int) {
    REOPEN.store(true, Ordering::SeqCst);
}

extern "C" fn on_usr2(_: libc::c_int) {
    diag::request_dump();
}

fn install_signal_handlers() -> Result<(), String> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    // No SA_RESTART: the signal interrupts io_uring_enter so the worker notices at once.
    let handlers: [(Signal, extern "C" fn(libc::c_int)); 5] = [
        (Signal::SIGTERM, on_stop_signal),
        (Signal::SIGINT, on_stop_signal),
        (Signal::SIGHUP, on_hup),
        (Signal::SIGUSR1, on_usr1),
        (Signal::SIGUSR2, on_usr2),
    ];
    for (sig, handler) in handlers {
        let act = SigAction::new(
            SigHandler::Handler(handler),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: each handler only stores to an atomic.
        unsafe { sigaction(sig, &act) }.map_err(|e| format!("sigaction {sig}: {e}"))?;
    }
    let ign = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: ignoring SIGPIPE is always sound; backend writes use MSG_NOSIGNAL anyway.
    unsafe { sigaction(Signal::SIGPIPE, &ign) }.map_err(|e| format!("sigaction SIGPIPE: {e}"))?;
    Ok(())
}

/// `config::load` plus loading every cert and key as the workers will: `check`, `run` and a
/// reload all reject the same files, as `file:line: message`.
fn load_and_check(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let cfg = config::load(path)?;
    let errors = frontend::tls_errors(&path.display().to_string(), &cfg);
    if errors.is_empty() {
        Ok(cfg)
    } else {
        Err(errors)
    }
}

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    load_and_check(path).map_err(|errors| {
        for e in &errors {
            eprintln!("{e}");
        }
        ExitCode::from(1)
    })
}

/// `path` made absolute against the start-up directory (a diagnostic run moves to its dump
/// directory later, and reloads still need the same files).
fn absolute(start: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        start.join(path)
    }
}

fn absolute_target(start: &Path, t: &LogTarget) -> LogTarget {
    match t {
        LogTarget::File(p) => LogTarget::File(absolute(start, p)),
        other => other.clone(),
    }
}

/// What a running process keeps for SIGHUP.
struct Running {
    config_path: PathBuf,
    start_dir: PathBuf,
    /// Set in diagnostic mode: the working directory to return to after a reload.
    dump_dir: Option<PathBuf>,
    config: Arc<Config>,
    workers: usize,
}

/// SIGHUP. h3gate has no hot reload: the workers keep the configuration they started with. A
/// reload validates the file again (so `systemctl reload` reports a broken file in the log even
/// though the unit already ran `h3gate check`), says plainly whether a restart is needed, and
/// reopens the log files.
fn reload(r: &Running) {
    notify::notify_logged(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading",
        notify::monotonic_usec()
    ));
    log::info!("reload (SIGHUP): checking {}", r.config_path.display());
    // Relative cert/key paths in the file are relative to the start-up directory. Only a
    // diagnostic run has left it; no other thread uses the working directory.
    if r.dump_dir.is_some() {
        let _ = std::env::set_current_dir(&r.start_dir);
    }
    let loaded = load_and_check(&r.config_path);
    if let Some(d) = &r.dump_dir {
        let _ = std::env::set_current_dir(d);
    }
    let status = match loaded {
        Err(errors) => {
            for e in &errors {
                log::error!("reload: {e}");
            }
            log::error!(
                "reload: {} has {} error(s); the running configuration stays in effect",
                r.config_path.display(),
                errors.len()
            );
            "configuration file invalid, running configuration unchanged"
        }
        Ok(new) if new == *r.config => {
            log::info!("reload: configuration valid and unchanged");
            "configuration unchanged"
        }
        Ok(_) => {
            log::warn!(
                "reload: configuration valid but changed; h3gate does not apply configuration \
                 changes while running: restart to apply (systemctl restart h3gate)"
            );
            "configuration changed: restart to apply"
        }
    };
    reopen_logs("reload");
    notify::notify_logged(&format!(
        "READY=1\nSTATUS=serving with {} worker(s); last reload: {status}",
        r.workers
    ));
}

fn reopen_logs(why: &str) {
    let errors = logger::reopen();
    if errors.is_empty() {
        log::info!("{why}: log files reopened");
    }
    for e in errors {
        log::error!("{why}: {e}");
    }
}

/// Drops privileges as decided; logs what happened. Must run before any thread is started.
fn drop_privileges(decision: &privdrop::Decision) -> Result<(), String> {
    match decision {
        privdrop::Decision::Switch(plan) => {
            privdrop::apply(plan)?;
            if plan.user.id == 0 {
                log::warn!(
                    "running as root ('user root' in the configuration): every worker has full \
                     privileges"
                );
            } else {
                log::info!(
                    "dropped privileges to user '{}' (uid {}), group '{}' (gid {})",
                    plan.user.name,
                    plan.user.id,
                    plan.group.name,
                    plan.group.id
                );
            }
        }
        privdrop::Decision::Stay(why) => log::info!("{why}"),
        privdrop::Decision::Ignored(warning) => log::warn!("{warning}"),
    }
    let root = nix::unistd::geteuid().is_root();
    if !root && privdrop::effective_capabilities().unwrap_or(0) != 0 {
        // Started unprivileged with capabilities (systemd AmbientCapabilities=): the sockets are
        // bound, CAP_NET_BIND_SERVICE is not needed any more.
        match privdrop::drop_capabilities() {
            Ok(()) => log::info!("capabilities dropped after binding"),
            // systemd's `SystemCallFilter=~@privileged` forbids capset(2): not worth a warning
            // on every start, the unit already bounds the set to CAP_NET_BIND_SERVICE.
            Err(e) => log::info!(
                "capabilities kept after binding ({e}; ambient set cleared); allow capset(2) to \
                 drop them"
            ),
        }
    }
    Ok(())
}

/// Diagnostic mode after the privilege drop: dump directory, dumpable, chdir, start-up report.
fn start_diagnostic(cfg: &Config, start_dir: &Path) -> Result<PathBuf, String> {
    let wanted = cfg.global.dump_dir.as_ref().map(|d| absolute(start_dir, d));
    let dump = diag::choose_dump_dir(wanted.as_deref())?;
    diag::enable(&dump.path)?;
    // A process that changed its uid is not dumpable; the kernel would write no core.
    if let Err(e) = diag::set_dumpable() {
        log::warn!("diagnostic mode: {e}");
    }
    std::env::set_current_dir(&dump.path)
        .map_err(|e| format!("chdir {}: {e}", dump.path.display()))?;
    for line in diag::startup_report(&dump) {
        log::info!("{line}");
    }
    Ok(dump.path)
}

fn run(cmd: RunCmd) -> ExitCode {
    diag::register_main_thread();
    diag::install_panic_hook();
    let level = cmd.log.or_else(|| std::env::var("H3GATE_LOG").ok());
    logger::init(level.as_deref().unwrap_or("info"));
    let start_dir = match std::env::current_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("h3gate: current directory: {e}");
            return ExitCode::from(1);
        }
    };
    let config_path = absolute(&start_dir, &cmd.config);
    let cfg = match load_config(&config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let diagnostic = cmd.diag || cfg.global.diagnostic;
    if let Err(e) = install_signal_handlers() {
        eprintln!("h3gate: {e}");
        return ExitCode::from(1);
    }
    if let Err(e) = diag::install_fatal_signal_handlers() {
        log::warn!("crash reports on fatal signals unavailable: {e}");
    }
    let privileges = match privdrop::plan(cfg.global.user.as_deref(), cfg.global.group.as_deref()) {
        Ok(d) => d,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(1);
        }
    };
    if let Some(v) = std::env::var_os("H3GATE_CRASH_TEST") {
        let v = v.to_string_lossy();
        match (diagnostic, diag::parse_crash_test(&v)) {
            (true, Some(t)) => {
                log::warn!("H3GATE_CRASH_TEST={v}: worker 0 will crash ({t:?}) on SIGUSR2");
                diag::set_crash_test(t);
            }
            (true, None) => log::warn!("H3GATE_CRASH_TEST={v} not understood (panic|segv|abort)"),
            (false, _) => log::warn!("H3GATE_CRASH_TEST ignored: diagnostic mode is off"),
        }
    }
    let workers = cfg
        .global
        .workers
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .clamp(1, 255);
    let secret = match cfg.global.cluster_secret {
        Some(s) => cid::Secret::from_bytes(s),
        None => cid::Secret::random(),
    };
    log::info!(
        "h3gate {} (commit {}) starting {workers} worker(s)",
        diag::VERSION,
        diag::COMMIT
    );
    if diagnostic {
        match diag::raise_core_limit() {
            Ok(_) => {}
            Err(e) => log::warn!("diagnostic mode: {e}"),
        }
    }
    // Bind everything here, in worker order, before any worker runs: the order of joining each
    // SO_REUSEPORT group is the index the steering program returns.
    let sockets = match worker::bind_all(&cfg, workers) {
        Ok(s) => s,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(1);
        }
    };
    let meshes = match worker::mesh(workers) {
        Ok(m) => m,
        Err(e) => {
            log::error!("cannot create the worker handoff queues: {e}");
            return ExitCode::from(1);
        }
    };
    let stats_listener = match &cfg.stats {
        Some(st) => match std::net::TcpListener::bind(st.bind) {
            Ok(l) => Some(l),
            Err(e) => {
                log::error!("stats: bind {}: {e}", st.bind);
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    // TLS keys are often readable by root only: load them before the drop.
    let tickets = match TicketKeys::from_config(&cfg.global) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(1);
        }
    };
    let mut quic = Vec::with_capacity(workers);
    for _ in 0..workers {
        match worker::quic_configs(&cfg, &tickets) {
            Ok(q) => quic.push(q),
            Err(e) => {
                log::error!("{e}");
                return ExitCode::from(1);
            }
        }
    }
    if let Err(e) = drop_privileges(&privileges) {
        log::error!("privilege drop failed: {e}");
        return ExitCode::from(1);
    }
    let log_file = absolute_target(&start_dir, &cfg.global.log_file);
    let access_log = absolute_target(&start_dir, &cfg.global.access_log);
    if let Err(e) = logger::configure(&log_file, &access_log) {
        log::error!("{e}");
        return ExitCode::from(1);
    }
    let dump_dir = if diagnostic {
        match start_diagnostic(&cfg, &start_dir) {
            Ok(d) => Some(d),
            Err(e) => {
                log::error!("diagnostic mode: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };

    let snapshots: Vec<metrics::Shared> = (0..workers)
        .map(|i| {
            Arc::new(Mutex::new(metrics::Snapshot {
                worker: i as u8,
                ..metrics::Snapshot::default()
            }))
        })
        .collect();
    if let Some(listener) = stats_listener {
        let board = Arc::new(metrics::Board::new(snapshots.clone()));
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        match std::thread::Builder::new()
            .name("stats".into())
            .spawn(move || metrics::serve(listener, board))
        {
            Ok(_) => log::info!("stats: serving /metrics and /stats on http://{addr}"),
            Err(e) => {
                log::error!("stats: cannot start the endpoint thread: {e}");
                return ExitCode::from(1);
            }
        }
    }

    let cfg = Arc::new(cfg);
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut handles = Vec::new();
    let parts = sockets.into_iter().zip(meshes).zip(quic).zip(snapshots);
    for (i, (((socks, mesh), quic), snapshot)) in parts.enumerate() {
        let cfg = cfg.clone();
        let secret = secret.clone();
        let ops = worker::Ops {
            quic,
            ready: ready_tx.clone(),
            snapshot,
        };
        let h = std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || {
                worker::run(
                    i as u8,
                    workers as u8,
                    &cfg,
                    secret,
                    &STOP,
                    socks,
                    mesh,
                    ops,
                )
            });
        match h {
            Ok(h) => handles.push(h),
            Err(e) => {
                log::error!("cannot start worker {i}: {e}");
                STOP.store(true, Ordering::SeqCst);
            }
        }
    }
    drop(ready_tx);

    // Every worker reports once: serving, or why not.
    let mut serving = 0;
    while serving < handles.len() && !STOP.load(Ordering::SeqCst) {
        match ready_rx.recv_timeout(Duration::from_millis(100)) {
            Ok((_, Ok(()))) => serving += 1,
            Ok((i, Err(e))) => {
                log::error!("worker {i} could not start: {e}");
                STOP.store(true, Ordering::SeqCst);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if handles.iter().any(|h| h.is_finished()) {
                    STOP.store(true, Ordering::SeqCst);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if serving == workers && !STOP.load(Ordering::SeqCst) {
        log::info!("h3gate ready: {workers} worker(s) serving");
        notify::notify_logged(&format!(
            "READY=1\nSTATUS=serving with {workers} worker(s)\nMAINPID={}",
            std::process::id()
        ));
    }

    let running = Running {
        config_path,
        start_dir,
        dump_dir,
        config: cfg.clone(),
        workers,
    };
    let mut stopping = false;
    loop {
        if STOP.load(Ordering::SeqCst) && !stopping {
            stopping = true;
            log::info!("stopping: draining every worker");
            notify::notify_logged("STOPPING=1\nSTATUS=draining");
        }
        if RELOAD.swap(false, Ordering::SeqCst) && !stopping {
            reload(&running);
        }
        if REOPEN.swap(false, Ordering::SeqCst) {
            reopen_logs("SIGUSR1");
        }
        if handles.iter().all(|h| h.is_finished()) {
            break;
        }
        if !stopping && handles.iter().any(|h| h.is_finished()) {
            // A worker only ends on its own after a failure: stop the others.
            log::error!("a worker stopped unexpectedly; stopping the others");
            STOP.store(true, Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut failed = serving < workers;
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => {
                log::info!("worker {} stats: {:?}", r.index, r.stats);
                log::info!(
                    "worker {} ring: {:?} handoff_drops: {}",
                    r.index,
                    r.ring,
                    r.handoff_drops
                );
            }
            Ok(Err(e)) => {
                log::error!("{e}");
                failed = true;
            }
            Err(_) => {
                log::error!("a worker panicked");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        log::info!("h3gate stopped");
        ExitCode::SUCCESS
    }
}

fn main() -> ExitCode {
    let cli: Cli = argh::from_env();
    match cli.cmd {
        Command::Run(cmd) => run(cmd),
        Command::Check(cmd) => match load_config(&cmd.config) {
            Ok(_) => {
                println!("{}: configuration is valid", cmd.config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Version(v) => {
            println!("h3gate {}", diag::VERSION);
            if v.verbose {
                println!("commit {}", diag::COMMIT);
            }
            ExitCode::SUCCESS
        }
    }
}
