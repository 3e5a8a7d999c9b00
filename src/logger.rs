//! Logger for the `log` facade. By default everything goes to stderr (journald picks it up under
//! systemd), one line per record: `LEVEL target: message`; access lines (`target: access`, one per
//! request from the core) are prefixed `access` so they can be filtered.
//!
//! `log-file PATH` sends the log to a file and `access-log PATH` the access lines to another (or
//! `access-log off` drops them); file lines start with a UTC timestamp. [`reopen`] (SIGUSR1, and
//! SIGHUP) reopens both files by name, for logrotate. Lines are written with one `write` each on an
//! `O_APPEND` file, so lines from several workers never interleave.
//!
//! Access lines on stderr follow the log level (shown at `info` and above); in a file they are
//! always written.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::LogTarget;

enum Sink {
    Stderr,
    File { path: PathBuf, file: File },
    Off,
}

impl Sink {
    fn write_line(&mut self, line: &str) {
        match self {
            Sink::Stderr => {
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
            Sink::File { file, .. } => {
                let _ = file.write_all(line.as_bytes());
            }
            Sink::Off => {}
        }
    }

    fn is_file(&self) -> bool {
        matches!(self, Sink::File { .. })
    }
}

struct Logger {
    level: log::LevelFilter,
    main: Mutex<Sink>,
    access: Mutex<Sink>,
    /// Mirrors `access` so `enabled` does not take its lock.
    access_mode: std::sync::atomic::AtomicU8,
}

const ACCESS_STDERR: u8 = 0;
const ACCESS_FILE: u8 = 1;
const ACCESS_OFF: u8 = 2;

static LOGGER: OnceLock<&'static Logger> = OnceLock::new();

fn lock(m: &Mutex<Sink>) -> std::sync::MutexGuard<'_, Sink> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        if m.target() == "access" {
            return match self.access_mode.load(std::sync::atomic::Ordering::Relaxed) {
                ACCESS_FILE => true,
                ACCESS_OFF => false,
                _ => m.level() <= self.level,
            };
        }
        // quiche's own debug/trace output is very chatty; keep it at warn unless tracing.
        if m.target().starts_with("quiche") && self.level < log::LevelFilter::Trace {
            return m.level() <= log::Level::Warn;
        }
        m.level() <= self.level
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        if r.target() == "access" {
            let mut sink = lock(&self.access);
            let line = if sink.is_file() {
                format!("{} {}\n", timestamp(SystemTime::now()), r.args())
            } else {
                format!("access {}\n", r.args())
            };
            sink.write_line(&line);
            return;
        }
        let text = format!("{:5} {}: {}", r.level(), r.target(), r.args());
        if r.level() <= log::Level::Warn {
            crate::diag::note_error(&text);
        }
        let mut sink = lock(&self.main);
        let line = if sink.is_file() {
            format!("{} {text}\n", timestamp(SystemTime::now()))
        } else {
            format!("{text}\n")
        };
        sink.write_line(&line);
    }

    fn flush(&self) {}
}

/// Installs the logger with everything on stderr. `level`: error, warn, info, debug, trace.
pub fn init(level: &str) {
    let level = level.parse().unwrap_or(log::LevelFilter::Info);
    let logger: &'static Logger = Box::leak(Box::new(Logger {
        level,
        main: Mutex::new(Sink::Stderr),
        access: Mutex::new(Sink::Stderr),
        access_mode: std::sync::atomic::AtomicU8::new(ACCESS_STDERR),
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
        let _ = LOGGER.set(logger);
    }
}

fn open(path: &Path) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map_err(|e| format!("cannot open log file {}: {e}", path.display()))
}

fn sink_for(target: &LogTarget) -> Result<Sink, String> {
    Ok(match target {
        LogTarget::Stderr => Sink::Stderr,
        LogTarget::Off => Sink::Off,
        LogTarget::File(p) => Sink::File {
            path: p.clone(),
            file: open(p)?,
        },
    })
}

/// Routes the log and the access lines as configured. Paths should be absolute (a diagnostic run
/// changes the working directory later). Opens both files before switching either, so an error
/// changes nothing.
pub fn configure(log: &LogTarget, access: &LogTarget) -> Result<(), String> {
    let Some(logger) = LOGGER.get() else {
        return Ok(());
    };
    let main = sink_for(log)?;
    let acc = sink_for(access)?;
    let mode = match access {
        LogTarget::Stderr => ACCESS_STDERR,
        LogTarget::File(_) => ACCESS_FILE,
        LogTarget::Off => ACCESS_OFF,
    };
    *lock(&logger.main) = main;
    *lock(&logger.access) = acc;
    logger
        .access_mode
        .store(mode, std::sync::atomic::Ordering::Relaxed);
    if mode == ACCESS_FILE && logger.level < log::LevelFilter::Info {
        // The access records are `info`; let them through the facade's global filter.
        log::set_max_level(log::LevelFilter::Info);
    }
    Ok(())
}

/// Reopens the log files by name (after logrotate moved them). Returns one message per file that
/// could not be reopened; that file keeps its old descriptor.
pub fn reopen() -> Vec<String> {
    let Some(logger) = LOGGER.get() else {
        return Vec::new();
    };
    let mut errors = Vec::new();
    for m in [&logger.main, &logger.access] {
        let path = match &*lock(m) {
            Sink::File { path, .. } => path.clone(),
            _ => continue,
        };
        // Opened outside the lock: a slow file system must not stall the workers' logging.
        match open(&path) {
            Ok(file) => *lock(m) = Sink::File { path, file },
            Err(e) => errors.push(e),
        }
    }
    errors
}

/// `2024-05-01T12:34:56.789Z`.
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_123); // leap day 2000
        assert_eq!(timestamp(t), "2000-02-29T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_735_689_599);
        assert_eq!(timestamp(t), "2024-12-31T23:59:59.000Z");
    }
}
