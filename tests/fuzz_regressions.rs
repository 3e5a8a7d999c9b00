//! The fuzz targets' checks on stable: every file in `fuzz/corpus/<target>/` (the seeds) and
//! `fuzz/regressions/<target>/` (inputs that once crashed a target, kept after the fix) goes
//! through the same check the fuzz target runs (`fuzz/checks.rs`). Adding a regression is adding
//! a file.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::PathBuf;

/// Every input of a target, sorted, with its path for the failure message.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = checks::fuzz_dir().join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("read_dir entry").path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read fuzz input");
            (p, bytes)
        })
        .collect()
}

fn run(target: &str, check: fn(&[u8])) {
    let inputs = inputs(target);
    assert!(
        !inputs.is_empty(),
        "no seeds for fuzz target {target} in fuzz/corpus/{target}/"
    );
    for (path, bytes) in inputs {
        let result = std::panic::catch_unwind(|| check(&bytes));
        assert!(
            result.is_ok(),
            "fuzz check {target} fails on {}",
            path.display()
        );
    }
}

#[test]
fn config() {
    run("config", checks::config);
}

#[test]
fn http1_response() {
    run("http1_response", checks::http1_response);
}

#[test]
fn h3_request() {
    run("h3_request", checks::h3_request);
}

#[test]
fn datagram() {
    run("datagram", checks::datagram);
}

#[test]
fn reset_token() {
    run("reset_token", checks::reset_token);
}

#[test]
fn endpoint() {
    run("endpoint", checks::endpoint);
}

#[test]
fn session() {
    run("session", checks::session);
}
