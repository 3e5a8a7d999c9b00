//! h3load counts right: runs the real binaries (origin, h3gate, h3load) on loopback and checks
//! h3load's `--json` numbers against what was asked for: every request started is a 200 that
//! arrived whole, body bytes are requests × size both ways, the rate limit holds, and failures
//! (non-2xx statuses, a server that is not there) make it exit 1 instead of counting as success.
//!
//! Self-contained harness (no shared test module): free ports, a temporary directory with a
//! certificate from tools/mkcert, children killed on drop.

use std::io::{BufRead, BufReader, Read};
use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Env {
    dir: PathBuf,
    port: u16,
    _origin: Kill,
    _proxy: Kill,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Env {
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind UDP")
        .port()
}

fn setup(name: &str) -> Env {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir =
        std::env::temp_dir().join(format!("h3load-test-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mkcert = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/mkcert");
    let st = Command::new(mkcert)
        .arg(&dir)
        .stderr(Stdio::null())
        .status()
        .expect("run tools/mkcert (needs openssl)");
    assert!(st.success(), "tools/mkcert failed");

    let mut origin = Command::new(env!("CARGO_BIN_EXE_origin"))
        .args(["--listen", "127.0.0.1:0", "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start origin");
    let mut err = BufReader::new(origin.stderr.take().expect("stderr"));
    let mut line = String::new();
    err.read_line(&mut line).expect("origin stderr");
    let origin_addr = line
        .trim()
        .strip_prefix("origin listening on ")
        .unwrap_or_else(|| panic!("unexpected origin output {line:?}"))
        .to_string();
    // Keep draining its stderr so that it can never block on a full pipe.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = err.read_to_end(&mut sink);
    });
    let origin = Kill(origin);

    let port = free_udp_port();
    let conf = dir.join("h3gate.conf");
    std::fs::write(
        &conf,
        format!(
            "global\n    workers 1\n{user}defaults\n    timeout client 30s\n    timeout drain 1s\n\
             frontend web\n    bind 127.0.0.1:{port}\n    cert {d}/cert.pem\n    key {d}/key.pem\n\
             \x20   default_backend app\nbackend app\n    server o1 {origin_addr}\n",
            d = dir.display(),
            // As root h3gate must be told to stay root (the test's files are private).
            user = if nix::unistd::geteuid().is_root() {
                "    user root\n"
            } else {
                ""
            },
        ),
    )
    .expect("write config");
    let log = std::fs::File::create(dir.join("h3gate.log")).expect("log file");
    let proxy = Kill(
        Command::new(env!("CARGO_BIN_EXE_h3gate"))
            .arg("run")
            .arg("-c")
            .arg(&conf)
            .args(["-l", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start h3gate"),
    );
    let env = Env {
        dir,
        port,
        _origin: origin,
        _proxy: proxy,
    };
    // Ready when one request goes through.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, _) = h3load(&["-n", "1", "--timeout", "1", &env.url("/")]);
        if code == 0 && field(&out, "done") == 1 {
            break;
        }
        assert!(
            Instant::now() < end,
            "h3gate not ready; log:\n{}",
            std::fs::read_to_string(env.dir.join("h3gate.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    env
}

/// Runs h3load --json; returns (exit code, JSON line, stderr).
fn h3load(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_h3load"))
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run h3load");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let json = stdout
        .lines()
        .rfind(|l| l.starts_with('{'))
        .unwrap_or("")
        .to_string();
    (
        out.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A number field of h3load's JSON line (`"name":123`), first match.
fn field(json: &str, name: &str) -> u64 {
    let key = format!("\"{name}\":");
    let i = json
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {json:?}"))
        + key.len();
    let digits: String = json[i..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not an integer in {json:?}"))
}

/// Count of one status code in the `"status":{...}` object (0 if absent).
fn status_count(json: &str, code: u16) -> u64 {
    let obj = json
        .split("\"status\":{")
        .nth(1)
        .and_then(|s| s.split('}').next())
        .unwrap_or("");
    let key = format!("\"{code}\":");
    match obj.find(&key) {
        Some(i) => obj[i + key.len()..]
            .split(',')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        None => 0,
    }
}

#[test]
fn two_second_run_counts_every_request_and_byte() {
    let env = setup("duration");
    let (code, json, err) = h3load(&["-c", "4", "-m", "8", "-d", "2", &env.url("/bytes/1024")]);
    assert_eq!(code, 0, "{err}");
    let done = field(&json, "done");
    assert!(done > 0, "{json}");
    assert_eq!(field(&json, "started"), done, "{json}");
    assert_eq!(field(&json, "failed"), 0, "{json}");
    assert_eq!(status_count(&json, 200), done, "{json}");
    assert_eq!(field(&json, "bytes_in"), done * 1024, "{json}");
    assert_eq!(field(&json, "connected"), 4, "{json}");
    assert!(json.contains("\"ok\":true"), "{json}");
    assert!(json.contains("\"p99\":"), "{json}");
}

#[test]
fn request_count_is_exact_across_threads() {
    let env = setup("count");
    let (code, json, err) = h3load(&[
        "-c",
        "3",
        "-m",
        "5",
        "-t",
        "2",
        "-n",
        "500",
        &env.url("/bytes/3000"),
        &env.url("/bytes/3000?again"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(field(&json, "started"), 500, "{json}");
    assert_eq!(field(&json, "done"), 500, "{json}");
    assert_eq!(status_count(&json, 200), 500, "{json}");
    assert_eq!(field(&json, "bytes_in"), 500 * 3000, "{json}");

    // Uploads: every body byte is counted out, the origin's "N\n" answers in.
    let (code, json, err) = h3load(&[
        "-c",
        "2",
        "-m",
        "2",
        "-n",
        "40",
        "--data-size",
        "100000",
        &env.url("/sink"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(status_count(&json, 200), 40, "{json}");
    assert_eq!(field(&json, "bytes_out"), 40 * 100_000, "{json}");
    assert_eq!(
        field(&json, "bytes_in"),
        40 * "100000\n".len() as u64,
        "{json}"
    );
}

#[test]
fn rate_limit_holds() {
    let env = setup("rate");
    let (code, json, err) = h3load(&[
        "-c",
        "2",
        "-m",
        "4",
        "--rps",
        "200",
        "-d",
        "1",
        &env.url("/bytes/100"),
    ]);
    assert_eq!(code, 0, "{err}");
    let done = field(&json, "done");
    assert!(
        (195..=201).contains(&done),
        "{done} requests at 200 req/s for 1 s: {json}"
    );
    assert_eq!(status_count(&json, 200), done, "{json}");
}

#[test]
fn failures_are_loud() {
    let env = setup("fail");
    // Non-2xx answers are counted by status and fail the run.
    let (code, json, _) = h3load(&["-n", "20", "-m", "4", &env.url("/status/503")]);
    assert_eq!(code, 1, "{json}");
    assert!(json.contains("\"ok\":false"), "{json}");
    assert_eq!(status_count(&json, 503), 20, "{json}");
    assert_eq!(field(&json, "non_2xx"), 20, "{json}");

    // Nobody there: the handshake fails, nothing counts as done.
    let port = free_udp_port();
    let (code, json, err) = h3load(&[
        "-n",
        "5",
        "--timeout",
        "1",
        &format!("https://localhost:{port}/"),
    ]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(field(&json, "done"), 0, "{json}");
    assert_eq!(field(&json, "conn_failed"), 1, "{json}");
    assert!(err.contains("FAILED"), "{err}");
}
