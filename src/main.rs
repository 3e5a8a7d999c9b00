//! h3gate: HTTP/3 (QUIC) edge proxy and load balancer for HTTP/1.1 services.

use h3gate::{cid, config, logger, worker};

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// Run the proxy in the foreground (logs to stderr). SIGTERM/SIGINT stop it gracefully.
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
struct VersionCmd {}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> Result<(), String> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    // No SA_RESTART: the signal interrupts io_uring_enter so the worker notices at once.
    let act = SigAction::new(
        SigHandler::Handler(on_stop_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &act) }.map_err(|e| format!("sigaction {sig}: {e}"))?;
    }
    let ign = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: ignoring SIGPIPE is always sound; backend writes use MSG_NOSIGNAL anyway.
    unsafe { sigaction(Signal::SIGPIPE, &ign) }.map_err(|e| format!("sigaction SIGPIPE: {e}"))?;
    Ok(())
}

fn load_config(path: &std::path::Path) -> Result<config::Config, ExitCode> {
    config::load(path).map_err(|errors| {
        for e in &errors {
            eprintln!("{e}");
        }
        ExitCode::from(1)
    })
}

fn run(cmd: RunCmd) -> ExitCode {
    let level = cmd.log.or_else(|| std::env::var("H3GATE_LOG").ok());
    logger::init(level.as_deref().unwrap_or("info"));
    let cfg = match load_config(&cmd.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = install_signal_handlers() {
        eprintln!("h3gate: {e}");
        return ExitCode::from(1);
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
        "h3gate {} starting {workers} worker(s)",
        env!("CARGO_PKG_VERSION")
    );
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
    let cfg = std::sync::Arc::new(cfg);
    let mut handles = Vec::new();
    for (i, (socks, mesh)) in sockets.into_iter().zip(meshes).enumerate() {
        let cfg = cfg.clone();
        let secret = secret.clone();
        let h = std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || worker::run(i as u8, workers as u8, &cfg, secret, &STOP, socks, mesh));
        match h {
            Ok(h) => handles.push(h),
            Err(e) => {
                log::error!("cannot start worker {i}: {e}");
                STOP.store(true, Ordering::SeqCst);
            }
        }
    }
    let mut failed = false;
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
                // One worker failing to start (bind, cert) stops the others.
                STOP.store(true, Ordering::SeqCst);
            }
            Err(_) => {
                log::error!("a worker panicked");
                failed = true;
                STOP.store(true, Ordering::SeqCst);
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
        Command::Version(_) => {
            println!("h3gate {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}
