//! systemd's readiness protocol (`Type=notify`, sd_notify(3)) written by hand: one datagram of
//! `KEY=VALUE` lines to the unix socket named by `$NOTIFY_SOCKET`. A name starting with `@` is
//! in the abstract namespace (the `@` stands for the leading NUL byte). Without the variable
//! (not started by systemd) every call is a no-op.
//!
//! h3gate sends `READY=1` once every worker is serving, `RELOADING=1` then `READY=1` around a
//! SIGHUP, and `STOPPING=1` when a graceful stop begins.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Where `$NOTIFY_SOCKET` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Path(std::path::PathBuf),
    /// Abstract socket name, without the leading NUL.
    Abstract(Vec<u8>),
}

/// Parses a `$NOTIFY_SOCKET` value. systemd also knows `vsock:` addresses (for VMs); those are
/// refused here rather than guessed.
pub fn parse_target(value: &str) -> Result<Target, String> {
    if let Some(name) = value.strip_prefix('@') {
        if name.is_empty() {
            return Err("NOTIFY_SOCKET: empty abstract socket name".to_string());
        }
        Ok(Target::Abstract(name.as_bytes().to_vec()))
    } else if value.starts_with('/') {
        Ok(Target::Path(value.into()))
    } else {
        Err(format!(
            "NOTIFY_SOCKET '{}': only absolute paths and '@' abstract names are supported",
            value.escape_debug()
        ))
    }
}

fn address(target: &Target) -> io::Result<SocketAddr> {
    match target {
        Target::Path(p) => SocketAddr::from_pathname(p),
        Target::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
    }
}

/// Sends `state` (e.g. `"READY=1\nSTATUS=serving"`) to `target`.
pub fn send_to(target: &Target, state: &str) -> io::Result<()> {
    let addr = address(target)?;
    let sock = UnixDatagram::unbound()?;
    let n = sock.send_to_addr(state.as_bytes(), &addr)?;
    if n != state.len() {
        return Err(io::Error::other("short write to NOTIFY_SOCKET"));
    }
    Ok(())
}

/// Sends `state` to `$NOTIFY_SOCKET`. `Ok(false)`: the variable is not set (nothing to do).
pub fn notify(state: &str) -> Result<bool, String> {
    let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let value = value
        .into_string()
        .map_err(|_| "NOTIFY_SOCKET is not valid UTF-8".to_string())?;
    let target = parse_target(&value)?;
    send_to(&target, state).map_err(|e| format!("sd_notify to {value}: {e}"))?;
    Ok(true)
}

/// [`notify`], logging a failure (a lost notification must not stop the proxy; systemd then
/// reports the start as timed out, which names the problem).
pub fn notify_logged(state: &str) {
    match notify(state) {
        Ok(true) => log::debug!("sd_notify: {}", state.replace('\n', " ")),
        Ok(false) => {}
        Err(e) => log::warn!("{e}"),
    }
}

/// `MONOTONIC_USEC=` value systemd wants next to `RELOADING=1` (CLOCK_MONOTONIC, µs).
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a live local.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if r != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("/run/systemd/notify").unwrap(),
            Target::Path("/run/systemd/notify".into())
        );
        assert_eq!(
            parse_target("@foo/bar").unwrap(),
            Target::Abstract(b"foo/bar".to_vec())
        );
        assert!(parse_target("@").is_err());
        assert!(parse_target("vsock:2:1234").is_err());
        assert!(parse_target("relative").is_err());
    }

    #[test]
    fn sends_to_path_and_abstract_sockets() {
        let dir = std::env::temp_dir().join(format!("h3gate-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        send_to(&Target::Path(path.clone()), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);

        use std::os::linux::net::SocketAddrExt;
        let name = format!("h3gate-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        let target = parse_target(&format!("@{name}")).unwrap();
        send_to(&target, "STOPPING=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn monotonic_is_nonzero() {
        assert!(monotonic_usec() > 0);
    }
}
