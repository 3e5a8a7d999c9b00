//! Privilege drop (`user` / `group` in `global`). h3gate binds its sockets and loads its TLS keys
//! while it may still be root, then, before the first worker thread exists, switches every id
//! (real, effective, saved) to the configured account and keeps only that account's group.
//! Switching from root to another uid clears every capability, CAP_NET_BIND_SERVICE included:
//! it is not needed once the sockets are bound. When h3gate is started unprivileged with
//! capabilities (systemd `AmbientCapabilities=`), [`drop_capabilities`] lets them go too.
//!
//! Running as root after start-up is refused unless the configuration says `user root`. Started
//! unprivileged, there is nothing to drop: a `user`/`group` naming another account is ignored
//! with a warning (as nginx does), so one file serves both a root start and a systemd unit with
//! `User=`.

use nix::unistd::{Gid, Group, Uid, User};

/// An account as resolved from the system database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub id: u32,
}

/// The switch to perform after binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub user: Account,
    pub group: Account,
}

/// What start-up does about privileges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Keep the current ids; the string says why (for the log).
    Stay(String),
    /// Keep the current ids although `user`/`group` name another account (not started as root);
    /// the string is the warning to log.
    Ignored(String),
    /// Switch to these ids after binding.
    Switch(Plan),
}

/// `user` resolved: its uid and its primary group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Decides from the current effective ids and the resolved `user`/`group`. Pure, for tests.
pub fn decide(
    euid: u32,
    egid: u32,
    user: Option<&UserEntry>,
    group: Option<&Account>,
) -> Result<Decision, String> {
    let Some(user) = user else {
        if euid == 0 {
            return Err(
                "refusing to run as root: add 'user h3gate' (or another unprivileged \
                        account, e.g. 'user nobody') to the global section so h3gate drops \
                        privileges after binding, or 'user root' to run as root on purpose"
                    .to_string(),
            );
        }
        if let Some(g) = group {
            if g.id != egid {
                return Ok(Decision::Ignored(format!(
                    "'group {}' ignored: h3gate was not started as root (uid {euid}, gid {egid})",
                    g.name
                )));
            }
        }
        return Ok(Decision::Stay(format!("running as uid {euid}, gid {egid}")));
    };
    let group = group.cloned().unwrap_or_else(|| Account {
        name: format!("{}", user.gid),
        id: user.gid,
    });
    if euid != 0 {
        if user.uid == euid && group.id == egid {
            return Ok(Decision::Stay(format!(
                "already running as user '{}' (uid {euid}, gid {egid})",
                user.name
            )));
        }
        return Ok(Decision::Ignored(format!(
            "'user {}' ignored: h3gate was not started as root (it runs as uid {euid}, gid \
             {egid}), so there are no privileges to drop",
            user.name
        )));
    }
    Ok(Decision::Switch(Plan {
        user: Account {
            name: user.name.clone(),
            id: user.uid,
        },
        group,
    }))
}

fn resolve_user(name: &str) -> Result<UserEntry, String> {
    let found = match User::from_name(name) {
        Ok(Some(u)) => Some(u),
        Ok(None) => match name.parse::<u32>() {
            Ok(n) => User::from_uid(Uid::from_raw(n)).ok().flatten(),
            Err(_) => None,
        },
        Err(e) => return Err(format!("cannot look up user '{name}': {e}")),
    };
    let u = found.ok_or_else(|| format!("user '{name}' does not exist"))?;
    Ok(UserEntry {
        name: u.name,
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
    })
}

fn resolve_group(name: &str) -> Result<Account, String> {
    let found = match Group::from_name(name) {
        Ok(Some(g)) => Some(g),
        Ok(None) => match name.parse::<u32>() {
            Ok(n) => Group::from_gid(Gid::from_raw(n)).ok().flatten(),
            Err(_) => None,
        },
        Err(e) => return Err(format!("cannot look up group '{name}': {e}")),
    };
    let g = found.ok_or_else(|| format!("group '{name}' does not exist"))?;
    Ok(Account {
        name: g.name,
        id: g.gid.as_raw(),
    })
}

/// Resolves the configured names and decides (call before binding, so mistakes stop start-up
/// early).
pub fn plan(user: Option<&str>, group: Option<&str>) -> Result<Decision, String> {
    let user = user.map(resolve_user).transpose()?;
    let group = group.map(resolve_group).transpose()?;
    decide(
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
        user.as_ref(),
        group.as_ref(),
    )
}

/// Switches every id to `plan`. Call while the process has a single thread: each thread has its
/// own credentials in the kernel, and threads created afterwards inherit these.
pub fn apply(plan: &Plan) -> Result<(), String> {
    let uid = Uid::from_raw(plan.user.id);
    let gid = Gid::from_raw(plan.group.id);
    // Groups first: once the uid is not 0 any more, changing them is no longer allowed.
    nix::unistd::setgroups(&[gid]).map_err(|e| format!("setgroups({gid}): {e}"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("setresgid({gid}): {e}"))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("setresuid({uid}): {e}"))?;
    let ids = nix::unistd::getresuid().map_err(|e| format!("getresuid: {e}"))?;
    if ids.real != uid || ids.effective != uid || ids.saved != uid {
        return Err(format!("privilege drop to uid {uid} did not take effect"));
    }
    if !uid.is_root() && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err("privilege drop failed: root could be regained".to_string());
    }
    Ok(())
}

/// The `CapEff` mask of this thread, from /proc/self/status.
pub fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Best effort: clears the ambient, effective, permitted and inheritable capabilities of the
/// calling thread (threads created afterwards inherit the empty sets). Used when h3gate was
/// started unprivileged but with capabilities (CAP_NET_BIND_SERVICE to bind :443). Returns an
/// error text when the kernel refused (a seccomp filter may forbid `capset`).
pub fn drop_capabilities() -> Result<(), String> {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset(2) reads one v3 header and two data structs, both live locals laid out as
    // the kernel's __user_cap_header_struct / __user_cap_data_struct.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(format!("capset: {}", std::io::Error::last_os_error()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, uid: u32, gid: u32) -> UserEntry {
        UserEntry {
            name: name.into(),
            uid,
            gid,
        }
    }

    #[test]
    fn root_without_user_is_refused() {
        let e = decide(0, 0, None, None).unwrap_err();
        assert!(e.contains("refusing to run as root"), "{e}");
        assert!(e.contains("user h3gate") && e.contains("user root"), "{e}");
    }

    #[test]
    fn root_with_user_switches_to_its_primary_group_by_default() {
        let d = decide(0, 0, Some(&user("nobody", 65534, 65534)), None).unwrap();
        let Decision::Switch(p) = d else {
            panic!("{d:?}")
        };
        assert_eq!((p.user.id, p.group.id), (65534, 65534));
        let g = Account {
            name: "nogroup".into(),
            id: 65533,
        };
        let Decision::Switch(p) =
            decide(0, 0, Some(&user("nobody", 65534, 65534)), Some(&g)).unwrap()
        else {
            panic!()
        };
        assert_eq!(p.group, g);
    }

    #[test]
    fn explicit_root_is_allowed() {
        let d = decide(0, 0, Some(&user("root", 0, 0)), None).unwrap();
        assert!(
            matches!(d, Decision::Switch(ref p) if p.user.id == 0),
            "{d:?}"
        );
    }

    #[test]
    fn unprivileged_start() {
        assert!(matches!(
            decide(1000, 1000, None, None).unwrap(),
            Decision::Stay(_)
        ));
        // Already that account (systemd User=h3gate with `user h3gate` in the file).
        assert!(matches!(
            decide(999, 998, Some(&user("h3gate", 999, 998)), None).unwrap(),
            Decision::Stay(_)
        ));
        let d = decide(1000, 1000, Some(&user("h3gate", 999, 998)), None).unwrap();
        assert!(matches!(d, Decision::Ignored(ref w) if w.contains("not started as root")));
        let g = Account {
            name: "adm".into(),
            id: 4,
        };
        assert!(matches!(
            decide(1000, 1000, None, Some(&g)).unwrap(),
            Decision::Ignored(_)
        ));
    }

    #[test]
    fn resolves_names_and_numbers() {
        assert_eq!(resolve_user("root").unwrap().uid, 0);
        assert_eq!(resolve_user("0").unwrap().name, "root");
        assert!(resolve_user("no-such-user-h3gate").is_err());
        assert_eq!(resolve_group("root").unwrap().id, 0);
    }

    #[test]
    fn reads_capabilities() {
        assert!(effective_capabilities().is_some());
    }
}
