//! Embeds the build commit as `H3GATE_COMMIT` (`h3gate version`, diagnostic start-up, crash
//! reports, `/metrics`). Order: the `H3GATE_COMMIT` environment variable (package builds from a
//! tarball can set it), then `git rev-parse --short HEAD`, then "unknown" when there is no git or
//! no repository. Never fails the build.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=H3GATE_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let commit = std::env::var("H3GATE_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&dir, &["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string());
    // Rebuild when HEAD moves. Only name files that exist: cargo treats a missing one as always
    // stale, which would rebuild the crate every time.
    if let Some(git_dir) = git(&dir, &["rev-parse", "--git-dir"]) {
        let git_dir = dir.join(git_dir);
        let head = git_dir.join("HEAD");
        let mut watch = vec![head.clone(), git_dir.join("packed-refs")];
        if let Ok(text) = std::fs::read_to_string(&head) {
            if let Some(r) = text.trim().strip_prefix("ref: ") {
                watch.push(git_dir.join(r));
            }
        }
        for p in watch.iter().filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    // Only characters that are safe in a log line, a file and a Prometheus label.
    let commit: String = commit
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '+'))
        .take(40)
        .collect();
    let commit = if commit.is_empty() {
        "unknown".to_string()
    } else {
        commit
    };
    println!("cargo:rustc-env=H3GATE_COMMIT={commit}");
}
