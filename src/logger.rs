//! Minimal stderr logger for the `log` facade (journald picks stderr up under systemd).
//! One line per record: `LEVEL target: message`; access lines (`target: access`) are prefixed
//! `access` so they can be filtered.

use std::io::Write;

struct Logger {
    level: log::LevelFilter,
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
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
        let mut err = std::io::stderr().lock();
        let _ = if r.target() == "access" {
            writeln!(err, "access {}", r.args())
        } else {
            writeln!(err, "{:5} {}: {}", r.level(), r.target(), r.args())
        };
    }

    fn flush(&self) {}
}

pub fn init(level: &str) {
    let level = level.parse().unwrap_or(log::LevelFilter::Info);
    let logger = Box::leak(Box::new(Logger { level }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
