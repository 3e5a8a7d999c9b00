//! Configuration for h3gate: an HAProxy-style text format.
//!
//! [`parse`] is pure (no IO at all) so every syntax and consistency rule can
//! be unit-tested and fuzzed; [`load`] adds the checks that need the outside
//! world (cert/key files, DNS). Errors are collected rather than stopping at
//! the first one, so an operator can fix a whole file in one pass.
//!
//! Syntax notes: words are separated by spaces or tabs; a word starting with
//! `#` starts a comment; there is no quoting, so values cannot contain
//! whitespace. Each `defaults` section starts again from the built-in
//! defaults and applies to the sections that follow it (HAProxy semantics).

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default for `max-connections` in a frontend.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default for `max-concurrent-streams` in a frontend.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u64 = 100;
/// Upper bound for a server `weight` (the lower bound is 1).
pub const MAX_WEIGHT: u32 = 256;
/// QUIC stream limits are varints capped at 2^60 (RFC 9000, section 4.6).
pub const MAX_CONCURRENT_STREAMS_LIMIT: u64 = 1 << 60;
/// Same cap as HAProxy (2^31-1 ms, about 24.8 days); it also keeps
/// `Instant + timeout` far away from overflow.
pub const MAX_TIMEOUT_MS: u64 = i32::MAX as u64;

const SECTIONS: &[&str] = &["global", "defaults", "frontend", "backend", "stats"];
const GLOBAL_KEYWORDS: &[&str] = &[
    "workers",
    "max-memory",
    "user",
    "group",
    "diagnostic",
    "steering",
    "gso",
    "gro",
    "cluster-secret",
    "tls-ticket-keys",
    "log-file",
    "access-log",
    "dump-dir",
    "bufsize",
];
const DEFAULTS_KEYWORDS: &[&str] = &["timeout"];
const FRONTEND_KEYWORDS: &[&str] = &[
    "bind",
    "cert",
    "key",
    "default_backend",
    "max-connections",
    "max-concurrent-streams",
    "timeout",
    "quic-retry",
    "retry-threshold",
    "allow-0rtt",
    "max-stream-buffer",
    "http-request",
];
const BACKEND_KEYWORDS: &[&str] = &[
    "balance",
    "server",
    "timeout",
    "max-stream-buffer",
    "http-request",
];
const STATS_KEYWORDS: &[&str] = &["bind"];
const TIMEOUT_KINDS: &[&str] = &["connect", "server", "client", "drain", "handshake"];
const SERVER_OPTIONS: &[&str] = &["weight", "maxconn"];
const BALANCE_NAMES: &[&str] = &["roundrobin", "leastconn"];
/// Keywords a frontend cannot work without.
const FRONTEND_REQUIRED: &[&str] = &["bind", "cert", "key", "default_backend"];

/// The whole parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub global: Global,
    pub frontends: Vec<Frontend>,
    pub backends: Vec<Backend>,
    /// The `stats` section (metrics endpoint), if any.
    pub stats: Option<StatsSection>,
}

/// `stats`: where the metrics endpoint listens (TCP; `/metrics` and `/stats`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsSection {
    pub bind: SocketAddr,
    /// Line of the `stats` header.
    pub line: usize,
}

/// Where a log stream goes (`log-file`, `access-log`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard error (journald under systemd).
    #[default]
    Stderr,
    /// Appended to this file, reopened on SIGUSR1.
    File(PathBuf),
    /// Dropped (`access-log off`).
    Off,
}

impl Config {
    /// Looks a backend up by name.
    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// Looks a frontend up by name.
    pub fn frontend(&self, name: &str) -> Option<&Frontend> {
        self.frontends.iter().find(|f| f.name == name)
    }
}

/// Process-wide settings from the `global` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Global {
    /// `None` means one worker per CPU.
    pub workers: Option<usize>,
    /// Bytes.
    pub max_memory: Option<u64>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub diagnostic: bool,
    /// Kernel CID steering (SO_ATTACH_REUSEPORT_CBPF); off = 4-tuple hash plus handoff.
    pub steering: bool,
    /// UDP generic segmentation offload on send, when the kernel accepts it.
    pub gso: bool,
    /// UDP generic receive offload, when the kernel accepts it.
    pub gro: bool,
    /// Secret behind stateless-reset and Retry tokens, shared by a cluster so any node can
    /// answer for another; `None` = random per process start.
    pub cluster_secret: Option<[u8; 32]>,
    /// `tls-ticket-keys FILE` and its line: session ticket keys shared by a cluster (and kept
    /// over a restart); `None` = keys derived from a random per-process secret, rotated.
    pub tls_ticket_keys: Option<(PathBuf, usize)>,
    /// `log-file`: stderr or a file.
    pub log_file: LogTarget,
    /// `access-log`: stderr, a file, or off.
    pub access_log: LogTarget,
    /// `dump-dir`: crash reports and (relative core_pattern) cores in diagnostic mode.
    pub dump_dir: Option<PathBuf>,
    /// Size of one buffer chunk of the memory pool.
    pub bufsize: usize,
}

/// Default `bufsize`.
pub const DEFAULT_BUFSIZE: usize = 16 * 1024;
/// Default `max-stream-buffer`: bytes one stream may hold per direction.
pub const DEFAULT_MAX_STREAM_BUFFER: usize = 256 * 1024;
/// Default `max-memory` when the global section does not set one.
pub const DEFAULT_MAX_MEMORY: u64 = 256 * 1024 * 1024;

/// `http-request wait-for-body time T [at-least SIZE]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitForBody {
    pub time: Duration,
    pub at_least: Option<u64>,
}

impl Default for Global {
    fn default() -> Self {
        Global {
            workers: None,
            max_memory: None,
            user: None,
            group: None,
            diagnostic: false,
            steering: true,
            gso: true,
            gro: true,
            cluster_secret: None,
            tls_ticket_keys: None,
            log_file: LogTarget::Stderr,
            access_log: LogTarget::Stderr,
            dump_dir: None,
            bufsize: DEFAULT_BUFSIZE,
        }
    }
}

/// When a frontend answers a new connection with a Retry (address validation, RFC 9000 §8.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RetryMode {
    /// Never: every Initial is accepted at once.
    Off,
    /// Only while half-open connections exceed `retry-threshold` (a handshake flood).
    #[default]
    Auto,
    /// Always: every new client proves its address first (costs one round trip).
    Always,
}

/// Default `retry-threshold`: half-open connections per worker before `quic-retry auto` kicks in.
pub const DEFAULT_RETRY_THRESHOLD: usize = 200;

/// Effective timeouts of a frontend or backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub server: Duration,
    pub client: Duration,
    pub drain: Duration,
    pub handshake: Duration,
}

impl Default for Timeouts {
    /// Built-in values, used when no `defaults` section sets them.
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            server: Duration::from_secs(30),
            client: Duration::from_secs(30),
            drain: Duration::from_secs(10),
            handshake: Duration::from_secs(10),
        }
    }
}

/// A listening side: QUIC sockets plus TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    pub name: String,
    /// Line of the `frontend` header.
    pub line: usize,
    pub binds: Vec<SocketAddr>,
    pub cert: PathBuf,
    /// Line of the `cert` directive (errors about the file point there).
    pub cert_line: usize,
    pub key: PathBuf,
    /// Line of the `key` directive.
    pub key_line: usize,
    pub default_backend: String,
    pub max_connections: usize,
    pub max_concurrent_streams: u64,
    pub timeouts: Timeouts,
    pub retry: RetryMode,
    pub retry_threshold: usize,
    /// `allow-0rtt`: accept early data; unsafe methods in it wait for the handshake.
    pub allow_0rtt: bool,
    /// `max-stream-buffer` set in this frontend (a backend's own setting wins).
    pub max_stream_buffer: Option<usize>,
    pub wait_for_body: Option<WaitForBody>,
}

/// One of a frontend's two TLS files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
}

impl Frontend {
    /// Path and directive line of one of its TLS files.
    pub fn tls_file(&self, which: TlsFile) -> (&Path, usize) {
        match which {
            TlsFile::Cert => (&self.cert, self.cert_line),
            TlsFile::Key => (&self.key, self.key_line),
        }
    }
}

/// `cannot read certificate PATH: REASON` (or `key`): one wording for every cert/key problem,
/// whether [`load`] or the TLS library found it.
pub fn cannot_read(which: TlsFile, path: &Path, reason: &str) -> String {
    let what = match which {
        TlsFile::Cert => "certificate",
        TlsFile::Key => "key",
    };
    // Not `show`: a path is not truncated, only its control characters escaped.
    let mut shown = String::new();
    for c in path.display().to_string().chars() {
        if c.is_control() {
            shown.extend(c.escape_debug());
        } else {
            shown.push(c);
        }
    }
    format!("cannot read {what} {shown}: {reason}")
}

/// Server selection algorithm of a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
}

/// A pool of origin servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub name: String,
    /// Line of the `backend` header.
    pub line: usize,
    pub balance: Balance,
    pub servers: Vec<Server>,
    pub timeouts: Timeouts,
    pub max_stream_buffer: Option<usize>,
    pub wait_for_body: Option<WaitForBody>,
}

/// One origin server of a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub name: String,
    pub line: usize,
    /// IP literal (IPv6 without brackets) or host name.
    pub host: String,
    pub port: u16,
    /// `Some` when `host` is an IP literal, or after [`load`] resolved it.
    pub addr: Option<SocketAddr>,
    /// 1..=[`MAX_WEIGHT`], default 1.
    pub weight: u32,
    pub maxconn: Option<u32>,
}

/// One problem in a config file; displays as `file:line: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based; problems about the whole file are reported at line 1.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Parses config text. Pure: does no IO, so host names stay unresolved
/// (`Server::addr` is `None` for them) and cert/key paths are not checked.
pub fn parse(file: &str, text: &str) -> Result<Config, Vec<ConfigError>> {
    // Editors on Windows like to prepend a BOM; it is not part of a keyword.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut parser = Parser::new(file);
    for (index, raw) in text.lines().enumerate() {
        parser.line(index + 1, raw);
    }
    parser.finish()
}

/// Reads and parses `path`, then checks that every frontend's cert and key
/// are readable files and resolves server host names. Whether they hold a
/// usable certificate and key is `frontend::tls_errors`'s job (it needs the
/// TLS library).
pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let file = path.display().to_string();
    let error = |line: usize, message: String| ConfigError {
        file: file.clone(),
        line,
        message,
    };
    let bytes =
        std::fs::read(path).map_err(|e| vec![error(1, format!("cannot read config file: {e}"))])?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = e.as_bytes().get(..e.utf8_error().valid_up_to());
        let line = valid.map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count()) + 1;
        vec![error(line, "invalid UTF-8".to_string())]
    })?;
    let mut config = parse(&file, &text)?;

    let mut errors = Vec::new();
    for fe in &config.frontends {
        for which in [TlsFile::Cert, TlsFile::Key] {
            let (path, line) = fe.tls_file(which);
            if let Err(e) = check_readable(path) {
                errors.push(error(line, cannot_read(which, path, &e)));
            }
        }
    }
    for server in config
        .backends
        .iter_mut()
        .flat_map(|b| b.servers.iter_mut())
    {
        if server.addr.is_some() {
            continue;
        }
        // First address wins, like most proxies; re-resolution is not our job.
        match (server.host.as_str(), server.port).to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                Some(addr) => server.addr = Some(addr),
                None => errors.push(error(
                    server.line,
                    format!(
                        "server '{}': host '{}' resolved to no address",
                        server.name, server.host
                    ),
                )),
            },
            Err(e) => errors.push(error(
                server.line,
                format!(
                    "server '{}': cannot resolve host '{}': {e}",
                    server.name, server.host
                ),
            )),
        }
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

/// Parses a duration: a number with an optional unit `ms`, `s`, `m`, `h` or
/// `d`; a bare number means milliseconds (HAProxy convention). Values above
/// [`MAX_TIMEOUT_MS`] are rejected.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (digits, unit) = split_number(s);
    if digits.is_empty() {
        return Err(format!(
            "'{}' is not a duration (e.g. 500ms, 5s, 1m)",
            show(s)
        ));
    }
    let factor: u64 = match unit {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "unknown unit '{}' in duration '{}' (use ms, s, m, h or d)",
                show(unit),
                show(s)
            ))
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .filter(|&ms| ms <= MAX_TIMEOUT_MS)
        .map(Duration::from_millis)
        .ok_or_else(|| {
            format!(
                "duration '{}' is too large (max {MAX_TIMEOUT_MS}ms)",
                show(s)
            )
        })
}

/// Parses a byte size: a number with an optional `k`, `m` or `g` suffix
/// (1024-based, either case); a bare number means bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = split_number(s);
    if digits.is_empty() {
        return Err(format!(
            "'{}' is not a size (e.g. 4096, 64k, 256m, 1g)",
            show(s)
        ));
    }
    let factor: u64 = match unit {
        "" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        _ => {
            return Err(format!(
                "unknown unit '{}' in size '{}' (use k, m or g)",
                show(unit),
                show(s)
            ))
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| format!("size '{}' is too large", show(s)))
}

/// Splits leading ASCII digits from the rest.
fn split_number(s: &str) -> (&str, &str) {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s.split_at(end)
}

/// Where the lines being read belong.
#[derive(Clone, Copy)]
enum Section {
    None,
    /// After a broken section header: its body is ignored so one typo does
    /// not produce a cascade of errors.
    Skip,
    Global,
    Defaults,
    Frontend(usize),
    Backend(usize),
    Stats,
}

struct FrontendDraft {
    name: String,
    line: usize,
    binds: Vec<(SocketAddr, usize)>,
    cert: Option<(PathBuf, usize)>,
    key: Option<(PathBuf, usize)>,
    default_backend: Option<(String, usize)>,
    max_connections: usize,
    max_concurrent_streams: u64,
    timeouts: Timeouts,
    retry: RetryMode,
    retry_threshold: usize,
    allow_0rtt: bool,
    max_stream_buffer: Option<usize>,
    wait_for_body: Option<WaitForBody>,
    /// Keyword (or `timeout <kind>`) -> first line, for duplicate and
    /// missing-keyword checks. Filled even when the value is invalid, so a
    /// bad value is not also reported as missing.
    seen: HashMap<String, usize>,
}

struct BackendDraft {
    name: String,
    line: usize,
    balance: Balance,
    servers: Vec<Server>,
    timeouts: Timeouts,
    max_stream_buffer: Option<usize>,
    wait_for_body: Option<WaitForBody>,
    seen: HashMap<String, usize>,
}

struct Parser<'a> {
    file: &'a str,
    errors: Vec<ConfigError>,
    section: Section,
    global: Global,
    global_seen: HashMap<String, usize>,
    defaults: Timeouts,
    defaults_seen: HashMap<String, usize>,
    frontends: Vec<FrontendDraft>,
    backends: Vec<BackendDraft>,
    /// Line of the first `stats` header.
    stats_line: Option<usize>,
    stats_bind: Option<SocketAddr>,
    stats_seen: HashMap<String, usize>,
}

impl<'a> Parser<'a> {
    fn new(file: &'a str) -> Self {
        Parser {
            file,
            errors: Vec::new(),
            section: Section::None,
            global: Global::default(),
            global_seen: HashMap::new(),
            defaults: Timeouts::default(),
            defaults_seen: HashMap::new(),
            frontends: Vec::new(),
            backends: Vec::new(),
            stats_line: None,
            stats_bind: None,
            stats_seen: HashMap::new(),
        }
    }

    fn error(&mut self, line: usize, message: String) {
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line,
            message,
        });
    }

    fn line(&mut self, line: usize, raw: &str) {
        let words: Vec<&str> = raw
            .split(|c: char| c.is_ascii_whitespace())
            .filter(|w| !w.is_empty())
            .take_while(|w| !w.starts_with('#'))
            .collect();
        let Some((&keyword, args)) = words.split_first() else {
            return;
        };
        if SECTIONS.contains(&keyword) {
            self.header(line, keyword, args);
            return;
        }
        let keywords: &[&str] = match self.section {
            Section::Skip => return,
            Section::None => &[],
            Section::Global => GLOBAL_KEYWORDS,
            Section::Defaults => DEFAULTS_KEYWORDS,
            Section::Frontend(_) => FRONTEND_KEYWORDS,
            Section::Backend(_) => BACKEND_KEYWORDS,
            Section::Stats => STATS_KEYWORDS,
        };
        if keywords.contains(&keyword) {
            if let Err(message) = self.keyword(line, keyword, args) {
                self.error(line, message);
            }
            return;
        }
        // An unindented unknown word close to a section name is most likely
        // a misspelt header; inside a section, indented words are keywords.
        let indented = raw.starts_with([' ', '\t']);
        if !indented || matches!(self.section, Section::None) {
            if let Some(name) = suggest(keyword, SECTIONS.iter().copied()) {
                let message = format!(
                    "unknown section '{}'; did you mean '{name}'?",
                    show(keyword)
                );
                self.error(line, message);
                self.section = Section::Skip;
                return;
            }
        }
        let message = match self.section {
            Section::None => match home_of(keyword) {
                Some(home) => {
                    format!("keyword '{keyword}' outside any section; it belongs in {home}")
                }
                None => format!(
                    "unknown keyword '{}' outside any section (sections are: {})",
                    show(keyword),
                    SECTIONS.join(", ")
                ),
            },
            _ => {
                let mut message =
                    format!("unknown keyword '{}' in {}", show(keyword), self.context());
                if let Some(home) = home_of(keyword) {
                    message.push_str(&format!("; '{keyword}' belongs in {home}"));
                } else if let Some(known) = suggest(keyword, keywords.iter().copied()) {
                    message.push_str(&format!("; did you mean '{known}'?"));
                }
                message
            }
        };
        self.error(line, message);
    }

    /// How the current section is named in messages.
    fn context(&self) -> String {
        match self.section {
            Section::Global => "global".to_string(),
            Section::Defaults => "defaults".to_string(),
            Section::Stats => "stats".to_string(),
            Section::Frontend(i) => match self.frontends.get(i) {
                Some(fe) => format!("frontend '{}'", show(&fe.name)),
                None => "frontend".to_string(),
            },
            Section::Backend(i) => match self.backends.get(i) {
                Some(be) => format!("backend '{}'", show(&be.name)),
                None => "backend".to_string(),
            },
            Section::None | Section::Skip => "no section".to_string(),
        }
    }

    fn header(&mut self, line: usize, kind: &str, args: &[&str]) {
        if matches!(kind, "global" | "defaults" | "stats") {
            if let Some(extra) = args.first() {
                let message = format!("unexpected argument '{}' for '{kind}'", show(extra));
                self.error(line, message);
            }
            self.section = if kind == "global" {
                Section::Global
            } else if kind == "stats" {
                // Several `stats` headers are one section, like several `global` ones.
                self.stats_line.get_or_insert(line);
                Section::Stats
            } else {
                // A new defaults section starts over from the built-in values.
                self.defaults = Timeouts::default();
                self.defaults_seen.clear();
                Section::Defaults
            };
            return;
        }

        let Some(&name) = args.first() else {
            self.error(
                line,
                format!("missing name for '{kind}' (usage: {kind} <name>)"),
            );
            self.section = Section::Skip;
            return;
        };
        if let Some(extra) = args.get(1) {
            let message = format!("unexpected argument '{}' for '{kind}'", show(extra));
            self.error(line, message);
        }
        if let Err(message) = check_name(kind, name) {
            self.error(line, message);
        }
        let previous = if kind == "frontend" {
            self.frontends
                .iter()
                .find(|f| f.name == name)
                .map(|f| f.line)
        } else {
            self.backends
                .iter()
                .find(|b| b.name == name)
                .map(|b| b.line)
        };
        if let Some(first) = previous {
            let message = format!(
                "duplicate {kind} '{}' (first defined at line {first})",
                show(name)
            );
            self.error(line, message);
        }
        // Duplicates are still parsed so that their bodies get checked too.
        if kind == "frontend" {
            self.frontends.push(FrontendDraft {
                name: name.to_string(),
                line,
                binds: Vec::new(),
                cert: None,
                key: None,
                default_backend: None,
                max_connections: DEFAULT_MAX_CONNECTIONS,
                max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
                timeouts: self.defaults,
                retry: RetryMode::default(),
                retry_threshold: DEFAULT_RETRY_THRESHOLD,
                allow_0rtt: false,
                max_stream_buffer: None,
                wait_for_body: None,
                seen: HashMap::new(),
            });
            self.section = Section::Frontend(self.frontends.len() - 1);
        } else {
            self.backends.push(BackendDraft {
                name: name.to_string(),
                line,
                balance: Balance::RoundRobin,
                servers: Vec::new(),
                timeouts: self.defaults,
                max_stream_buffer: None,
                wait_for_body: None,
                seen: HashMap::new(),
            });
            self.section = Section::Backend(self.backends.len() - 1);
        }
    }

    /// Handles a keyword already known to be valid in the current section.
    fn keyword(&mut self, line: usize, keyword: &str, args: &[&str]) -> Result<(), String> {
        match self.section {
            Section::Global => self.global_keyword(line, keyword, args),
            Section::Defaults => {
                set_timeout(&mut self.defaults_seen, &mut self.defaults, line, args)
            }
            Section::Frontend(i) => self.frontend_keyword(i, line, keyword, args),
            Section::Backend(i) => self.backend_keyword(i, line, keyword, args),
            Section::Stats => {
                // `bind` is the only stats keyword.
                once(&mut self.stats_seen, keyword, line)?;
                self.stats_bind = Some(parse_bind(one_arg(keyword, args, "bind <address>")?)?);
                Ok(())
            }
            Section::None | Section::Skip => Ok(()),
        }
    }

    fn global_keyword(&mut self, line: usize, keyword: &str, args: &[&str]) -> Result<(), String> {
        once(&mut self.global_seen, keyword, line)?;
        let g = &mut self.global;
        match keyword {
            "workers" => {
                let value = one_arg(keyword, args, "workers <count>")?;
                g.workers = Some(parse_usize(keyword, value, 1)?);
            }
            "max-memory" => {
                let value = one_arg(keyword, args, "max-memory <size>")?;
                let bytes = parse_size(value).map_err(|e| format!("invalid 'max-memory': {e}"))?;
                if bytes == 0 {
                    return Err("'max-memory' must be greater than 0".to_string());
                }
                g.max_memory = Some(bytes);
            }
            "user" => g.user = Some(one_arg(keyword, args, "user <name>")?.to_string()),
            "group" => g.group = Some(one_arg(keyword, args, "group <name>")?.to_string()),
            "diagnostic" => g.diagnostic = on_off(keyword, args)?,
            "steering" => g.steering = on_off(keyword, args)?,
            "gso" => g.gso = on_off(keyword, args)?,
            "gro" => g.gro = on_off(keyword, args)?,
            "bufsize" => {
                let value = one_arg(keyword, args, "bufsize <size>")?;
                let bytes = parse_size(value).map_err(|e| format!("invalid 'bufsize': {e}"))?;
                if !(1024..=1024 * 1024).contains(&bytes) {
                    return Err("'bufsize' must be between 1k and 1m".to_string());
                }
                g.bufsize = bytes as usize;
            }
            "cluster-secret" => {
                let value = one_arg(keyword, args, "cluster-secret <64 hex digits>")?;
                g.cluster_secret = Some(parse_secret(value)?);
            }
            "tls-ticket-keys" => {
                let path = one_arg(keyword, args, "tls-ticket-keys <file>")?;
                g.tls_ticket_keys = Some((PathBuf::from(path), line));
            }
            "log-file" => {
                let value = one_arg(keyword, args, "log-file <path>|stderr")?;
                g.log_file = match value {
                    "stderr" => LogTarget::Stderr,
                    path => LogTarget::File(PathBuf::from(path)),
                };
            }
            "access-log" => {
                let value = one_arg(keyword, args, "access-log <path>|stderr|off")?;
                g.access_log = match value {
                    "stderr" => LogTarget::Stderr,
                    "off" => LogTarget::Off,
                    path => LogTarget::File(PathBuf::from(path)),
                };
            }
            "dump-dir" => {
                let value = one_arg(keyword, args, "dump-dir <directory>")?;
                g.dump_dir = Some(PathBuf::from(value));
            }
            _ => {}
        }
        Ok(())
    }

    fn frontend_keyword(
        &mut self,
        index: usize,
        line: usize,
        keyword: &str,
        args: &[&str],
    ) -> Result<(), String> {
        if keyword == "bind" {
            // May repeat, so only record presence.
            if let Some(fe) = self.frontends.get_mut(index) {
                fe.seen.entry(keyword.to_string()).or_insert(line);
            }
            let addr = parse_bind(one_arg(keyword, args, "bind <address>")?)?;
            for (i, other) in self.frontends.iter().enumerate() {
                if let Some((_, first)) = other.binds.iter().find(|(a, _)| *a == addr) {
                    return Err(if i == index {
                        format!("duplicate bind {addr} (first at line {first})")
                    } else {
                        format!(
                            "bind address {addr} already used by frontend '{}' at line {first}",
                            show(&other.name)
                        )
                    });
                }
            }
            if let Some(fe) = self.frontends.get_mut(index) {
                fe.binds.push((addr, line));
            }
            return Ok(());
        }

        let Some(fe) = self.frontends.get_mut(index) else {
            return Ok(());
        };
        if keyword == "timeout" {
            return set_timeout(&mut fe.seen, &mut fe.timeouts, line, args);
        }
        once(&mut fe.seen, keyword, line)?;
        match keyword {
            "cert" => {
                let path = one_arg(keyword, args, "cert <path>")?;
                fe.cert = Some((PathBuf::from(path), line));
            }
            "key" => {
                let path = one_arg(keyword, args, "key <path>")?;
                fe.key = Some((PathBuf::from(path), line));
            }
            "default_backend" => {
                let name = one_arg(keyword, args, "default_backend <backend>")?;
                fe.default_backend = Some((name.to_string(), line));
            }
            "max-connections" => {
                let value = one_arg(keyword, args, "max-connections <count>")?;
                fe.max_connections = parse_usize(keyword, value, 1)?;
            }
            "max-stream-buffer" => fe.max_stream_buffer = Some(parse_stream_buffer(args)?),
            "http-request" => fe.wait_for_body = Some(parse_http_request(args)?),
            "quic-retry" => {
                fe.retry = match one_arg(keyword, args, "quic-retry always|auto|off")? {
                    "always" => RetryMode::Always,
                    "auto" => RetryMode::Auto,
                    "off" => RetryMode::Off,
                    other => {
                        return Err(unknown(
                            "quic-retry mode",
                            other,
                            &["always", "auto", "off"],
                        ))
                    }
                };
            }
            // HAProxy's bind option is the bare word; `on|off` as h3gate's other switches.
            "allow-0rtt" => fe.allow_0rtt = args.is_empty() || on_off(keyword, args)?,
            "retry-threshold" => {
                let value = one_arg(keyword, args, "retry-threshold <half-open connections>")?;
                fe.retry_threshold = parse_usize(keyword, value, 0)?;
            }
            "max-concurrent-streams" => {
                let value = one_arg(keyword, args, "max-concurrent-streams <count>")?;
                fe.max_concurrent_streams =
                    parse_range(keyword, value, 1, MAX_CONCURRENT_STREAMS_LIMIT)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn backend_keyword(
        &mut self,
        index: usize,
        line: usize,
        keyword: &str,
        args: &[&str],
    ) -> Result<(), String> {
        let Some(be) = self.backends.get_mut(index) else {
            return Ok(());
        };
        match keyword {
            "timeout" => set_timeout(&mut be.seen, &mut be.timeouts, line, args),
            "max-stream-buffer" => {
                once(&mut be.seen, keyword, line)?;
                be.max_stream_buffer = Some(parse_stream_buffer(args)?);
                Ok(())
            }
            "http-request" => {
                once(&mut be.seen, keyword, line)?;
                be.wait_for_body = Some(parse_http_request(args)?);
                Ok(())
            }
            "balance" => {
                once(&mut be.seen, keyword, line)?;
                be.balance = match one_arg(keyword, args, "balance roundrobin|leastconn")? {
                    "roundrobin" => Balance::RoundRobin,
                    "leastconn" => Balance::LeastConn,
                    other => return Err(unknown("balance algorithm", other, BALANCE_NAMES)),
                };
                Ok(())
            }
            "server" => {
                // Recorded even if invalid: avoids a spurious "no servers".
                be.seen.entry(keyword.to_string()).or_insert(line);
                let server = parse_server(line, args)?;
                if let Some(first) = be.servers.iter().find(|s| s.name == server.name) {
                    return Err(format!(
                        "duplicate server '{}' in backend '{}' (first defined at line {})",
                        show(&server.name),
                        show(&be.name),
                        first.line
                    ));
                }
                be.servers.push(server);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Whole-file checks, then conversion to the public types.
    fn finish(mut self) -> Result<Config, Vec<ConfigError>> {
        let mut late = Vec::new();
        if self.frontends.is_empty() {
            late.push((1, "no frontend defined".to_string()));
        }
        for fe in &self.frontends {
            for &required in FRONTEND_REQUIRED {
                if !fe.seen.contains_key(required) {
                    let message = format!("frontend '{}' has no '{required}'", show(&fe.name));
                    late.push((fe.line, message));
                }
            }
            if let Some((name, line)) = &fe.default_backend {
                if !self.backends.iter().any(|b| &b.name == name) {
                    let names = self.backends.iter().map(|b| b.name.as_str());
                    let mut message = format!("unknown backend '{}'", show(name));
                    if let Some(close) = suggest(name, names) {
                        message.push_str(&format!("; did you mean '{}'?", show(close)));
                    }
                    late.push((*line, message));
                }
            }
        }
        if let Some(line) = self.stats_line {
            if !self.stats_seen.contains_key("bind") {
                late.push((line, "stats section has no 'bind'".to_string()));
            }
        }
        for be in &self.backends {
            if !be.seen.contains_key("server") {
                late.push((
                    be.line,
                    format!("backend '{}' has no servers", show(&be.name)),
                ));
            }
        }
        for (line, message) in late {
            self.error(line, message);
        }
        if !self.errors.is_empty() {
            // Stable: errors of one line keep their discovery order.
            self.errors.sort_by_key(|e| e.line);
            return Err(self.errors);
        }

        let frontends = self
            .frontends
            .into_iter()
            .map(|fe| {
                let (cert, cert_line) = fe.cert.unwrap_or_default();
                let (key, key_line) = fe.key.unwrap_or_default();
                Frontend {
                    name: fe.name,
                    line: fe.line,
                    binds: fe.binds.into_iter().map(|(addr, _)| addr).collect(),
                    cert,
                    cert_line,
                    key,
                    key_line,
                    default_backend: fe.default_backend.unwrap_or_default().0,
                    max_connections: fe.max_connections,
                    max_concurrent_streams: fe.max_concurrent_streams,
                    retry: fe.retry,
                    retry_threshold: fe.retry_threshold,
                    allow_0rtt: fe.allow_0rtt,
                    max_stream_buffer: fe.max_stream_buffer,
                    wait_for_body: fe.wait_for_body,
                    timeouts: fe.timeouts,
                }
            })
            .collect();
        let backends = self
            .backends
            .into_iter()
            .map(|be| Backend {
                name: be.name,
                line: be.line,
                balance: be.balance,
                servers: be.servers,
                timeouts: be.timeouts,
                max_stream_buffer: be.max_stream_buffer,
                wait_for_body: be.wait_for_body,
            })
            .collect();
        let stats = match (self.stats_bind, self.stats_line) {
            (Some(bind), Some(line)) => Some(StatsSection { bind, line }),
            _ => None,
        };
        Ok(Config {
            global: self.global,
            frontends,
            backends,
            stats,
        })
    }
}

/// Records a keyword that may appear once per section.
fn once(seen: &mut HashMap<String, usize>, keyword: &str, line: usize) -> Result<(), String> {
    match seen.get(keyword) {
        Some(first) => Err(format!("'{keyword}' already set at line {first}")),
        None => {
            seen.insert(keyword.to_string(), line);
            Ok(())
        }
    }
}

/// Handles `timeout <kind> <duration>`.
fn parse_stream_buffer(args: &[&str]) -> Result<usize, String> {
    let value = one_arg("max-stream-buffer", args, "max-stream-buffer <size>")?;
    let bytes = parse_size(value).map_err(|e| format!("invalid 'max-stream-buffer': {e}"))?;
    if !(16 * 1024..=1024 * 1024 * 1024).contains(&bytes) {
        return Err("'max-stream-buffer' must be between 16k and 1g".to_string());
    }
    Ok(bytes as usize)
}

/// `http-request wait-for-body time <duration> [at-least <size>]` (the only action today).
fn parse_http_request(args: &[&str]) -> Result<WaitForBody, String> {
    const USAGE: &str = "http-request wait-for-body time <duration> [at-least <size>]";
    match args {
        ["wait-for-body", "time", t, rest @ ..] => {
            let time =
                parse_duration(t).map_err(|e| format!("invalid 'wait-for-body' time: {e}"))?;
            let at_least = match rest {
                [] => None,
                ["at-least", size] => {
                    Some(parse_size(size).map_err(|e| format!("invalid 'at-least' size: {e}"))?)
                }
                _ => {
                    return Err(format!(
                        "unexpected arguments for 'http-request' (usage: {USAGE})"
                    ))
                }
            };
            Ok(WaitForBody { time, at_least })
        }
        [action, ..] if *action != "wait-for-body" => {
            Err(unknown("http-request action", action, &["wait-for-body"]))
        }
        _ => Err(format!("invalid 'http-request' (usage: {USAGE})")),
    }
}

/// `KEYWORD on|off`.
fn on_off(keyword: &str, args: &[&str]) -> Result<bool, String> {
    match one_arg(keyword, args, &format!("{keyword} on|off"))? {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!(
            "invalid value '{}' for '{keyword}' (expected on or off)",
            show(other)
        )),
    }
}

/// 32 bytes as 64 hex digits.
fn parse_secret(value: &str) -> Result<[u8; 32], String> {
    let bytes = value.as_bytes();
    if bytes.len() != 64 {
        return Err(format!(
            "'cluster-secret' needs 64 hex digits (32 bytes), got {} characters",
            bytes.len()
        ));
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let hex = std::str::from_utf8(pair)
            .ok()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (hex, out.get_mut(i)) {
            (Some(b), Some(o)) => *o = b,
            _ => return Err("'cluster-secret' must be hexadecimal".to_string()),
        }
    }
    Ok(out)
}

fn set_timeout(
    seen: &mut HashMap<String, usize>,
    timeouts: &mut Timeouts,
    line: usize,
    args: &[&str],
) -> Result<(), String> {
    const USAGE: &str = "timeout <kind> <duration>";
    let Some(&kind) = args.first() else {
        return Err(format!("missing arguments for 'timeout' (usage: {USAGE})"));
    };
    let slot = match kind {
        "connect" => &mut timeouts.connect,
        "server" => &mut timeouts.server,
        "client" => &mut timeouts.client,
        "drain" => &mut timeouts.drain,
        "handshake" => &mut timeouts.handshake,
        _ => return Err(unknown("timeout kind", kind, TIMEOUT_KINDS)),
    };
    let keyword = format!("timeout {kind}");
    once(seen, &keyword, line)?;
    let value = one_arg(&keyword, args.get(1..).unwrap_or_default(), USAGE)?;
    let duration = parse_duration(value).map_err(|e| format!("invalid '{keyword}': {e}"))?;
    // Zero drain means "close at once"; a zero for the others would
    // fail every connection immediately.
    if duration.is_zero() && kind != "drain" {
        return Err(format!("'{keyword}' must be greater than 0"));
    }
    *slot = duration;
    Ok(())
}

/// `server <name> <host:port> [weight <1..256>] [maxconn <n>]`
fn parse_server(line: usize, args: &[&str]) -> Result<Server, String> {
    const USAGE: &str = "server <name> <host:port> [weight <n>] [maxconn <n>]";
    let (name, address, options) = match args {
        [name, address, options @ ..] => (*name, *address, options),
        _ => return Err(format!("missing arguments for 'server' (usage: {USAGE})")),
    };
    check_name("server", name)?;
    let (host, port, addr) = parse_host_port(address)?;
    let mut server = Server {
        name: name.to_string(),
        line,
        host,
        port,
        addr,
        weight: 1,
        maxconn: None,
    };
    let mut seen: Vec<&str> = Vec::new();
    let mut options = options.iter();
    while let Some(&option) = options.next() {
        if !SERVER_OPTIONS.contains(&option) {
            return Err(unknown("server option", option, SERVER_OPTIONS));
        }
        if seen.contains(&option) {
            return Err(format!("server option '{option}' given twice"));
        }
        seen.push(option);
        let Some(&value) = options.next() else {
            return Err(format!("missing value for server option '{option}'"));
        };
        let max = if option == "weight" {
            u64::from(MAX_WEIGHT)
        } else {
            u64::from(u32::MAX)
        };
        let value = u32::try_from(parse_range(option, value, 1, max)?).unwrap_or(u32::MAX);
        if option == "weight" {
            server.weight = value;
        } else {
            server.maxconn = Some(value);
        }
    }
    Ok(server)
}

/// `:PORT` (or `*:PORT`) for all IPv4 interfaces, `IPv4:PORT`, `[IPv6]:PORT`.
fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    let invalid = || {
        format!(
            "invalid bind address '{}' (expected :PORT, IPv4:PORT or [IPv6]:PORT)",
            show(s)
        )
    };
    let addr = match s.strip_prefix(':').or_else(|| s.strip_prefix("*:")) {
        Some(port) => {
            let port = digits_only(port).ok_or_else(invalid)?;
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("invalid port in bind address '{}'", show(s)))?;
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
        }
        None => s.parse::<SocketAddr>().map_err(|_| invalid())?,
    };
    if addr.port() == 0 {
        return Err(format!("bind address '{}' has port 0", show(s)));
    }
    Ok(addr)
}

/// Server address: an IP literal (IPv6 in brackets) or a host name, plus a
/// mandatory non-zero port.
fn parse_host_port(s: &str) -> Result<(String, u16, Option<SocketAddr>), String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!(
                "server address '{}': port 0 is not allowed",
                show(s)
            ));
        }
        return Ok((addr.ip().to_string(), addr.port(), Some(addr)));
    }
    if s.starts_with('[') {
        return Err(format!(
            "invalid server address '{}' (expected [IPv6]:PORT)",
            show(s)
        ));
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!(
            "server address '{}' has no port (expected HOST:PORT)",
            show(s)
        ));
    };
    if host.contains(':') {
        return Err(format!(
            "server address '{}': IPv6 addresses must be written [ADDR]:PORT",
            show(s)
        ));
    }
    let port = digits_only(port)
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| format!("invalid port in server address '{}'", show(s)))?;
    if port == 0 {
        return Err(format!(
            "server address '{}': port 0 is not allowed",
            show(s)
        ));
    }
    // Only IP literals reach here when the host is numeric, and a valid IPv4
    // would already have parsed above, so this is a broken IPv4 literal.
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("invalid IPv4 address '{}'", show(host)));
    }
    if !valid_hostname(host) {
        return Err(format!("invalid host name '{}'", show(host)));
    }
    Ok((host.to_string(), port, None))
}

fn valid_hostname(host: &str) -> bool {
    let trimmed = host.strip_suffix('.').unwrap_or(host);
    !trimmed.is_empty()
        && trimmed.len() <= 253
        && trimmed.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {kind} name '{}' (use letters, digits, '-', '_', '.', ':')",
            show(name)
        ))
    }
}

fn one_arg<'w>(keyword: &str, args: &[&'w str], usage: &str) -> Result<&'w str, String> {
    match args {
        [value] => Ok(value),
        [] => Err(format!("missing argument for '{keyword}' (usage: {usage})")),
        [_, extra, ..] => Err(format!(
            "unexpected argument '{}' for '{keyword}' (usage: {usage})",
            show(extra)
        )),
    }
}

fn digits_only(s: &str) -> Option<&str> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then_some(s)
}

/// Parses an integer in `min..=max`; `str::parse` alone would accept `+5`.
fn parse_range(keyword: &str, s: &str, min: u64, max: u64) -> Result<u64, String> {
    let n = digits_only(s)
        .ok_or_else(|| format!("invalid number '{}' for '{keyword}'", show(s)))?
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            format!(
                "'{keyword}' must be between {min} and {max}, got {}",
                show(s)
            )
        })?;
    Ok(n)
}

fn parse_usize(keyword: &str, s: &str, min: u64) -> Result<usize, String> {
    let max = u64::try_from(usize::MAX).unwrap_or(u64::MAX);
    let n = parse_range(keyword, s, min, max)?;
    usize::try_from(n).map_err(|_| format!("'{keyword}' is too large"))
}

/// "unknown <what> 'x'; did you mean 'y'?" (or the list of valid values).
fn unknown(what: &str, value: &str, valid: &[&str]) -> String {
    match suggest(value, valid.iter().copied()) {
        Some(close) => format!("unknown {what} '{}'; did you mean '{close}'?", show(value)),
        None => format!(
            "unknown {what} '{}' (expected one of: {})",
            show(value),
            valid.join(", ")
        ),
    }
}

/// Section(s) where a keyword is valid, for "wrong section" hints.
fn home_of(keyword: &str) -> Option<&'static str> {
    if keyword == "bind" {
        Some("a frontend or stats")
    } else if GLOBAL_KEYWORDS.contains(&keyword) {
        Some("global")
    } else if keyword == "timeout" {
        Some("defaults, frontend or backend")
    } else if FRONTEND_KEYWORDS.contains(&keyword) {
        Some("a frontend")
    } else if BACKEND_KEYWORDS.contains(&keyword) {
        Some("a backend")
    } else {
        None
    }
}

/// Closest candidate by edit distance, if close enough to be a typo: at most
/// 2 edits, and at most a third of the candidate (so `x` does not suggest
/// `key`). Ties go to the first candidate.
fn suggest<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    let word_len = word.chars().count();
    candidates
        .into_iter()
        .filter_map(|candidate| {
            let len = candidate.chars().count();
            // The length difference is a lower bound: skip hopeless pairs
            // cheaply, which also bounds the work on huge garbage words.
            if word_len.abs_diff(len) > 2 {
                return None;
            }
            let distance = edit_distance(word, candidate);
            (distance <= 2 && distance <= (len / 3).max(1)).then_some((distance, candidate))
        })
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance where swapping two adjacent characters also counts
/// as one edit (optimal string alignment), since that is the common typo.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current: Vec<usize> = vec![0; b.len() + 1];
    // Indices stay within the loop ranges and the rows' fixed length, so the
    // indexing below cannot panic whatever the input.
    for i in 1..=a.len() {
        current[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (previous[j] + 1)
                .min(current[j - 1] + 1)
                .min(previous[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(before[j - 2] + 1);
            }
            current[j] = d;
        }
        std::mem::swap(&mut before, &mut previous);
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// User text for messages: escaped (no control characters reach a
/// terminal) and shortened (a garbage line must not flood the log).
fn show(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().nth(MAX).is_some() {
        out.push_str("...");
    }
    out
}

/// An existing, readable regular file.
pub fn check_readable(path: &Path) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if meta.is_dir() {
        return Err("is a directory".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv6Addr};

    fn ok(text: &str) -> Config {
        match parse("t.conf", text) {
            Ok(config) => config,
            Err(errors) => panic!("unexpected errors: {errors:#?}"),
        }
    }

    fn errors(text: &str) -> Vec<ConfigError> {
        match parse("t.conf", text) {
            Ok(config) => panic!("expected errors, got {config:#?}"),
            Err(errors) => errors,
        }
    }

    /// Asserts an error at exactly `line` whose message contains every needle.
    fn assert_error(text: &str, line: usize, needles: &[&str]) {
        let errors = errors(text);
        let found = errors
            .iter()
            .any(|e| e.line == line && needles.iter().all(|n| e.message.contains(n)));
        assert!(
            found,
            "no error at line {line} containing {needles:?}: {errors:#?}"
        );
    }

    /// A valid config with `extra` inserted in the frontend, at line 6.
    fn with_frontend(extra: &str) -> String {
        format!(
            "frontend web\n bind :443\n cert c.pem\n key k.pem\n default_backend app\n{extra}\n\
             backend app\n server s1 10.0.0.1:80\n"
        )
    }

    /// A valid config with `extra` inserted in the backend, at line 8.
    fn with_backend(extra: &str) -> String {
        format!(
            "frontend web\n bind :443\n cert c.pem\n key k.pem\n default_backend app\n\
             backend app\n server s1 10.0.0.1:80\n{extra}\n"
        )
    }

    /// A valid config with `extra` inserted in global, at line 2.
    fn with_global(extra: &str) -> String {
        format!("global\n{extra}\n{}", with_frontend(""))
    }

    const FULL: &str = "\
# h3gate test config
global
    workers 2            # usize >= 1
    max-memory 256m
    user h3gate
    group nogroup
    diagnostic on
defaults
    timeout connect 4s
    timeout server 31s
    timeout client 32s
    timeout drain 11s
    timeout handshake 12s
frontend web
    bind :443
    bind [::1]:8443
    cert /etc/h3gate/site.pem
    key /etc/h3gate/site.key
    default_backend app
    max-connections 5000
    max-concurrent-streams 50
    timeout client 1m
backend app
    balance leastconn
    timeout server 2m
    timeout connect 500
    server a1 10.0.0.1:8080
    server a2 10.0.0.2:8080 weight 2 maxconn 100
    server a3 localhost:8080
";

    #[test]
    fn full_config_every_field() {
        let config = ok(FULL);
        let secs = Duration::from_secs;
        let defaults = Timeouts {
            connect: secs(4),
            server: secs(31),
            client: secs(32),
            drain: secs(11),
            handshake: secs(12),
        };
        let expected = Config {
            global: Global {
                workers: Some(2),
                max_memory: Some(256 * 1024 * 1024),
                user: Some("h3gate".into()),
                group: Some("nogroup".into()),
                diagnostic: true,
                ..Global::default()
            },
            frontends: vec![Frontend {
                name: "web".into(),
                line: 14,
                binds: vec![
                    "0.0.0.0:443".parse().unwrap(),
                    "[::1]:8443".parse().unwrap(),
                ],
                cert: "/etc/h3gate/site.pem".into(),
                cert_line: 17,
                key: "/etc/h3gate/site.key".into(),
                key_line: 18,
                default_backend: "app".into(),
                max_connections: 5000,
                max_concurrent_streams: 50,
                timeouts: Timeouts {
                    client: secs(60),
                    ..defaults
                },
                retry: RetryMode::Auto,
                retry_threshold: DEFAULT_RETRY_THRESHOLD,
                allow_0rtt: false,
                max_stream_buffer: None,
                wait_for_body: None,
            }],
            backends: vec![Backend {
                name: "app".into(),
                line: 23,
                balance: Balance::LeastConn,
                servers: vec![
                    Server {
                        name: "a1".into(),
                        line: 27,
                        host: "10.0.0.1".into(),
                        port: 8080,
                        addr: Some("10.0.0.1:8080".parse().unwrap()),
                        weight: 1,
                        maxconn: None,
                    },
                    Server {
                        name: "a2".into(),
                        line: 28,
                        host: "10.0.0.2".into(),
                        port: 8080,
                        addr: Some("10.0.0.2:8080".parse().unwrap()),
                        weight: 2,
                        maxconn: Some(100),
                    },
                    Server {
                        name: "a3".into(),
                        line: 29,
                        host: "localhost".into(),
                        port: 8080,
                        addr: None,
                        weight: 1,
                        maxconn: None,
                    },
                ],
                timeouts: Timeouts {
                    server: secs(120),
                    connect: Duration::from_millis(500),
                    ..defaults
                },
                max_stream_buffer: None,
                wait_for_body: None,
            }],
            stats: None,
        };
        assert_eq!(config, expected);
        assert_eq!(config.backend("app"), config.backends.first());
        assert!(config.backend("nope").is_none());
        assert_eq!(config.frontend("web"), config.frontends.first());
    }

    #[test]
    fn operations_keywords() {
        let c = ok(&format!(
            "global\n log-file /var/log/h3gate/h3gate.log\n access-log off\n \
             dump-dir /var/lib/h3gate\nstats\n bind 127.0.0.1:9100\n{}",
            with_frontend("")
        ));
        assert_eq!(
            c.global.log_file,
            LogTarget::File("/var/log/h3gate/h3gate.log".into())
        );
        assert_eq!(c.global.access_log, LogTarget::Off);
        assert_eq!(c.global.dump_dir, Some("/var/lib/h3gate".into()));
        assert_eq!(
            c.stats,
            Some(StatsSection {
                bind: "127.0.0.1:9100".parse().unwrap(),
                line: 5
            })
        );
        let c = ok(&with_global(" access-log /tmp/a.log\n log-file stderr"));
        assert_eq!(c.global.access_log, LogTarget::File("/tmp/a.log".into()));
        assert_eq!(c.global.log_file, LogTarget::Stderr);
        assert_eq!(c.stats, None);
        assert_eq!(ok(&with_frontend("")).global.access_log, LogTarget::Stderr);
    }

    #[test]
    fn stats_section_errors() {
        let base = with_frontend("");
        assert_error(
            &format!("stats\n{base}"),
            1,
            &["stats section has no 'bind'"],
        );
        assert_error(
            &format!("stats\n bind 127.0.0.1:9100\n bind :9101\n{base}"),
            3,
            &["'bind' already set at line 2"],
        );
        assert_error(
            &format!("stats\n bnd :9100\n{base}"),
            2,
            &["in stats; did you mean 'bind'?"],
        );
        assert_error(
            &format!("stats\n cert x\n{base}"),
            2,
            &["'cert' belongs in a frontend"],
        );
        assert_error(
            &format!("stats 1\n bind :9100\n{base}"),
            1,
            &["unexpected argument '1'"],
        );
        assert_error(&format!("stats\n bind :0\n{base}"), 2, &["port 0"]);
        assert_error(
            &format!("stat\n bind :9100\n{base}"),
            1,
            &["did you mean 'stats'?"],
        );
        assert_error(
            &with_global(" bind :9100"),
            2,
            &["'bind' belongs in a frontend or stats"],
        );
        assert_error(
            &with_global(" acess-log /x"),
            2,
            &["did you mean 'access-log'?"],
        );
        assert_error(
            &with_global(" dump-dir"),
            2,
            &["missing argument for 'dump-dir'"],
        );
        assert_error(
            &with_global(" log-file a b"),
            2,
            &["unexpected argument 'b'"],
        );
    }

    #[test]
    fn sample_conf_parses() {
        let config = ok(include_str!("../conf/h3gate.conf"));
        assert_eq!(config.global.workers, Some(1));
        assert_eq!(config.global.max_memory, Some(256 << 20));
        let web = config.frontend("web").unwrap();
        assert_eq!(web.binds, vec!["127.0.0.1:8443".parse().unwrap()]);
        assert_eq!(web.cert, PathBuf::from("demo/cert.pem"));
        assert_eq!(web.key, PathBuf::from("demo/key.pem"));
        let app = config.backend(&web.default_backend).unwrap();
        assert_eq!(app.balance, Balance::RoundRobin);
        assert_eq!(app.servers.len(), 1);
        assert_eq!(app.servers[0].name, "origin1");
        assert_eq!(app.servers[0].addr, Some("127.0.0.1:8080".parse().unwrap()));
    }

    #[test]
    fn built_in_defaults_when_nothing_given() {
        let config = ok(&with_frontend(""));
        assert_eq!(config.global, Global::default());
        assert_eq!(config.global.workers, None);
        let fe = &config.frontends[0];
        assert_eq!(fe.max_connections, 10_000);
        assert_eq!(fe.max_concurrent_streams, 100);
        let builtin = Timeouts {
            connect: Duration::from_secs(5),
            server: Duration::from_secs(30),
            client: Duration::from_secs(30),
            drain: Duration::from_secs(10),
            handshake: Duration::from_secs(10),
        };
        assert_eq!(fe.timeouts, builtin);
        assert_eq!(config.backends[0].timeouts, builtin);
        assert_eq!(config.backends[0].balance, Balance::RoundRobin);
        assert_eq!(config.backends[0].servers[0].weight, 1);
    }

    #[test]
    fn defaults_inherited_and_overridden() {
        let text = "\
defaults
  timeout connect 1s
  timeout client 2s
frontend web
  bind :443
  cert c
  key k
  default_backend app
  timeout client 3s
defaults
  timeout server 4s
backend app
  timeout connect 7s
  server s 10.0.0.1:1
";
        let config = ok(text);
        let fe = config.frontends[0].timeouts;
        assert_eq!(fe.connect, Duration::from_secs(1));
        assert_eq!(
            fe.client,
            Duration::from_secs(3),
            "frontend overrides defaults"
        );
        assert_eq!(fe.server, Duration::from_secs(30), "built-in where unset");
        let be = config.backends[0].timeouts;
        // The second defaults section starts from the built-in values: the
        // first section's `client 2s` must not leak into it.
        assert_eq!(be.client, Duration::from_secs(30));
        assert_eq!(be.server, Duration::from_secs(4));
        assert_eq!(be.connect, Duration::from_secs(7));
    }

    #[test]
    fn defaults_do_not_apply_backwards() {
        let text = format!("{}defaults\n timeout server 1s\n", with_frontend(""));
        let config = ok(&text);
        assert_eq!(config.backends[0].timeouts.server, Duration::from_secs(30));
    }

    #[test]
    fn duration_parsing() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("100"), Ok(ms(100)));
        assert_eq!(parse_duration("250ms"), Ok(ms(250)));
        assert_eq!(parse_duration("5s"), Ok(ms(5_000)));
        assert_eq!(parse_duration("2m"), Ok(ms(120_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("1d"), Ok(ms(86_400_000)));
        assert_eq!(parse_duration("0"), Ok(ms(0)));
        assert_eq!(parse_duration("007s"), Ok(ms(7_000)));
        assert_eq!(parse_duration("2147483647"), Ok(ms(2_147_483_647)));
        for bad in ["", "s", "ms", "-1", "+5s", "1.5s", " 5s", "5 s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        let unit = parse_duration("5x").unwrap_err();
        assert!(unit.contains("unknown unit 'x'"), "{unit}");
        assert!(parse_duration("5sec")
            .unwrap_err()
            .contains("unknown unit 'sec'"));
        assert!(parse_duration("5S").is_err(), "units are lower case");
        for big in [
            "2147483648",
            "25d",
            "18446744073709551615d",
            "99999999999999999999999",
        ] {
            let e = parse_duration(big).unwrap_err();
            assert!(e.contains("too large"), "{big}: {e}");
        }
    }

    #[test]
    fn size_parsing() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        for bad in ["", "k", "-1", "1.5m", "+1"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_size("1t").unwrap_err().contains("unknown unit 't'"));
        assert!(parse_size("1kb").unwrap_err().contains("unknown unit 'kb'"));
        for big in ["18446744073709551616", "18014398509481984k", "17179869184g"] {
            assert!(parse_size(big).unwrap_err().contains("too large"), "{big}");
        }
    }

    #[test]
    fn unknown_keyword_suggests() {
        assert_error(
            &with_frontend(" tiemout client 5s"),
            6,
            &["unknown keyword 'tiemout' in frontend 'web'; did you mean 'timeout'?"],
        );
        assert_error(
            &with_backend(" sever s2 10.0.0.2:80"),
            8,
            &["did you mean 'server'?"],
        );
        assert_error(
            &with_global(" worker 2"),
            2,
            &["in global; did you mean 'workers'?"],
        );
        let e = errors(&with_frontend(" frobnicate 1"));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].line, 6);
        assert!(e[0].message.contains("'frobnicate'"));
        assert!(!e[0].message.contains("did you mean"), "{}", e[0].message);
    }

    #[test]
    fn keyword_in_wrong_section_names_its_home() {
        assert_error(
            &with_frontend(" server s 1.2.3.4:80"),
            6,
            &["'server'", "backend"],
        );
        assert_error(
            &with_global(" timeout client 1s"),
            2,
            &["'timeout'", "in global"],
        );
    }

    #[test]
    fn unknown_section_suggests_and_skips_body() {
        let text = format!(
            "frontnd web\n  bind :443\n  nonsense\n{}",
            with_frontend("")
        );
        let e = errors(&text);
        assert_eq!(e.len(), 1, "body of a broken section is skipped: {e:#?}");
        assert_eq!(e[0].line, 1);
        assert!(e[0]
            .message
            .contains("unknown section 'frontnd'; did you mean 'frontend'?"));
        // Unindented inside a section: still read as a section typo.
        assert_error(
            &with_frontend("backnd other"),
            6,
            &["did you mean 'backend'?"],
        );
    }

    #[test]
    fn unknown_timeout_kind_suggests() {
        let text = format!("defaults\n timeout conect 5s\n{}", with_frontend(""));
        assert_error(
            &text,
            2,
            &["unknown timeout kind 'conect'", "did you mean 'connect'?"],
        );
        assert_error(
            &with_frontend(" timeout"),
            6,
            &["missing arguments for 'timeout'"],
        );
        assert_error(
            &with_frontend(" timeout client"),
            6,
            &["missing argument for 'timeout client'"],
        );
        assert_error(
            &with_frontend(" timeout client 5s 6s"),
            6,
            &["unexpected argument '6s'"],
        );
        assert_error(
            &with_frontend(" timeout client 5x"),
            6,
            &["'timeout client'", "unit 'x'"],
        );
        assert_error(&with_frontend(" timeout client 0"), 6, &["greater than 0"]);
        assert_error(
            &with_frontend(" timeout client 1s\n timeout client 2s"),
            7,
            &["already set at line 6"],
        );
        assert_eq!(
            ok(&with_frontend(" timeout drain 0")).frontends[0]
                .timeouts
                .drain,
            Duration::ZERO
        );
    }

    #[test]
    fn keyword_outside_section() {
        let text = format!("bind :443\n{}", with_frontend(""));
        assert_error(&text, 1, &["'bind' outside any section", "frontend"]);
        let text = format!("wibble\n{}", with_frontend(""));
        assert_error(&text, 1, &["unknown keyword 'wibble' outside any section"]);
    }

    #[test]
    fn argument_count_errors() {
        let e = errors("frontend web\n bind :443\n cert\n key k\n default_backend b\nbackend b\n server s h:1\n");
        assert_eq!(e.len(), 1, "a bad cert line is not also 'missing': {e:#?}");
        assert_eq!(e[0].line, 3);
        assert!(e[0].message.contains("missing argument for 'cert'"));
        assert_error(
            &with_frontend(" max-connections 1 2"),
            6,
            &["unexpected argument '2' for 'max-connections'"],
        );
        assert_error(&with_global(" user"), 2, &["missing argument for 'user'"]);
        assert_error(
            &with_backend(" server s2"),
            8,
            &["missing arguments for 'server'"],
        );
        assert_error(
            &with_backend(" balance"),
            8,
            &["missing argument for 'balance'"],
        );
        assert_error(
            "global extra\n",
            1,
            &["unexpected argument 'extra' for 'global'"],
        );
        assert_error("frontend\n", 1, &["missing name for 'frontend'"]);
        assert_error(
            "frontend a b\n",
            1,
            &["unexpected argument 'b' for 'frontend'"],
        );
        assert_error("backend bad/name\n", 1, &["invalid backend name"]);
        assert_error(
            &with_frontend(" cert a.pem"),
            6,
            &["'cert' already set at line 3"],
        );
    }

    #[test]
    fn bad_values() {
        assert_error(
            &with_global(" workers 0"),
            2,
            &["'workers' must be between 1"],
        );
        assert_error(
            &with_global(" workers two"),
            2,
            &["invalid number 'two' for 'workers'"],
        );
        assert_error(&with_global(" workers +2"), 2, &["invalid number"]);
        assert_error(
            &with_global(" workers 99999999999999999999999"),
            2,
            &["'workers' must be between"],
        );
        assert_error(
            &with_global(" max-memory 10x"),
            2,
            &["'max-memory'", "unknown unit 'x'"],
        );
        assert_error(
            &with_global(" max-memory 0"),
            2,
            &["'max-memory' must be greater than 0"],
        );
        assert_error(
            &with_global(" diagnostic yes"),
            2,
            &["'diagnostic'", "on or off"],
        );
        assert_error(
            &with_frontend(" max-connections -1"),
            6,
            &["'max-connections'"],
        );
        assert_error(
            &with_frontend(" max-concurrent-streams 1152921504606846977"),
            6,
            &["'max-concurrent-streams' must be between 1 and 1152921504606846976"],
        );
        assert_error(
            &with_backend(" balance roundrobbin"),
            8,
            &["did you mean 'roundrobin'?"],
        );
        assert_error(
            &with_backend(" balance random"),
            8,
            &["expected one of: roundrobin, leastconn"],
        );
    }

    #[test]
    fn bad_bind_addresses() {
        for (bind, needle) in [
            ("443", "invalid bind address '443'"),
            (":", "invalid bind address"),
            (":http", "invalid bind address"),
            (":99999", "invalid port"),
            (":0", "port 0"),
            ("10.0.0.1:0", "port 0"),
            ("[::1", "invalid bind address"),
            ("::1:443", "invalid bind address"),
            ("example.com:443", "invalid bind address"),
        ] {
            let text = with_frontend(&format!(" bind {bind}"));
            assert_error(&text, 6, &[needle]);
        }
    }

    #[test]
    fn bad_server_lines() {
        for (server, needle) in [
            ("s2 10.0.0.1", "has no port"),
            ("s2 10.0.0.1:0", "port 0 is not allowed"),
            ("s2 host:0", "port 0 is not allowed"),
            ("s2 [::1]:0", "port 0 is not allowed"),
            ("s2 host:http", "invalid port"),
            ("s2 host:", "invalid port"),
            ("s2 ::1:80", "[ADDR]:PORT"),
            ("s2 [::1:80", "expected [IPv6]:PORT"),
            ("s2 300.1.1.1:80", "invalid IPv4 address '300.1.1.1'"),
            ("s2 bad_host!:80", "invalid host name"),
            ("s2 -bad:80", "invalid host name"),
            (
                "s2 10.0.0.2:80 weight 0",
                "'weight' must be between 1 and 256",
            ),
            (
                "s2 10.0.0.2:80 weight 257",
                "'weight' must be between 1 and 256",
            ),
            (
                "s2 10.0.0.2:80 weight heavy",
                "invalid number 'heavy' for 'weight'",
            ),
            (
                "s2 10.0.0.2:80 weight",
                "missing value for server option 'weight'",
            ),
            (
                "s2 10.0.0.2:80 wieght 3",
                "unknown server option 'wieght'; did you mean 'weight'?",
            ),
            ("s2 10.0.0.2:80 weight 1 weight 2", "'weight' given twice"),
            ("s2 10.0.0.2:80 maxconn 0", "'maxconn' must be between 1"),
            (
                "s2 10.0.0.2:80 maxconn 4294967296",
                "'maxconn' must be between 1",
            ),
            ("s/2 10.0.0.2:80", "invalid server name"),
        ] {
            let text = with_backend(&format!(" server {server}"));
            assert_error(&text, 8, &[needle]);
            // An invalid server line must not also cause "has no servers".
            let lone = format!(
                "frontend web\n bind :443\n cert c\n key k\n default_backend app\n\
                 backend app\n server {server}\n"
            );
            let e = errors(&lone);
            assert_eq!(e.len(), 1, "{server}: {e:#?}");
        }
        let config = ok(&with_backend(
            " server s2 10.0.0.2:80 maxconn 4294967295 weight 256",
        ));
        let s2 = &config.backends[0].servers[1];
        assert_eq!((s2.weight, s2.maxconn), (256, Some(u32::MAX)));
    }

    #[test]
    fn duplicates() {
        let text = format!("{}frontend web\n bind :80\n", with_frontend(""));
        assert_error(
            &text,
            9,
            &["duplicate frontend 'web' (first defined at line 1)"],
        );
        let text = format!("{}backend app\n server x 10.0.0.1:1\n", with_frontend(""));
        assert_error(
            &text,
            9,
            &["duplicate backend 'app' (first defined at line 7)"],
        );
        assert_error(
            &with_backend(" server s1 10.0.0.2:80"),
            8,
            &["duplicate server 's1' in backend 'app' (first defined at line 7)"],
        );
        let text = format!(
            "{}frontend other\n bind 0.0.0.0:443\n cert c\n key k\n default_backend app\n",
            with_frontend("")
        );
        assert_error(
            &text,
            10,
            &["0.0.0.0:443 already used by frontend 'web' at line 2"],
        );
        assert_error(
            &with_frontend(" bind :443"),
            6,
            &["duplicate bind 0.0.0.0:443 (first at line 2)"],
        );
        // The same port on different addresses is fine.
        let config = ok(&with_frontend(" bind 127.0.0.1:443\n bind [::]:443"));
        assert_eq!(config.frontends[0].binds.len(), 3);
    }

    /// Found by the config fuzz target: a name holding a vertical tab (not a word separator) was
    /// printed raw in the duplicate message, a control character on the operator's terminal.
    #[test]
    fn duplicate_names_are_escaped() {
        let text = "backend a\x0b\n server s 10.0.0.1:1\nbackend a\x0b\n server s 10.0.0.1:1\n \
                    server s 10.0.0.1:2\n";
        assert_error(text, 3, &["duplicate backend 'a\\u{b}'"]);
        assert_error(text, 5, &["duplicate server 's' in backend 'a\\u{b}'"]);
        for e in errors(text) {
            assert!(!e.to_string().chars().any(char::is_control), "{e}");
        }
        let text = "frontend a\0\n bind :443\nfrontend b\n bind :443\n";
        assert_error(text, 4, &["already used by frontend 'a\\0'"]);
        let text = with_frontend("").replace("\nbackend app", "\nbackend app\x08");
        assert_error(&text, 5, &["did you mean 'app\\u{8}'?"]);
    }

    #[test]
    fn incomplete_sections() {
        let text = "frontend web\n max-connections 5\nbackend app\n server s 10.0.0.1:1\n";
        let e = errors(text);
        for keyword in ["'bind'", "'cert'", "'key'", "'default_backend'"] {
            assert!(
                e.iter().any(|e| e.line == 1 && e.message.contains(keyword)),
                "no missing {keyword}: {e:#?}"
            );
        }
        assert_eq!(e.len(), 4);
        assert_error(
            "frontend web\n bind :443\n cert c\n key k\n default_backend ap\nbackend app\n server s 10.0.0.1:1\n",
            5,
            &["unknown backend 'ap'; did you mean 'app'?"],
        );
        let e = errors("frontend web\n bind :443\n cert c\n key k\n default_backend zzz\nbackend app\n server s 10.0.0.1:1\n");
        assert!(!e[0].message.contains("did you mean"), "{}", e[0].message);
        let text = format!("{}backend empty\n", with_frontend(""));
        assert_error(&text, 9, &["backend 'empty' has no servers"]);
        assert_error("", 1, &["no frontend defined"]);
        assert_error("global\n workers 1\n", 1, &["no frontend defined"]);
    }

    #[test]
    fn default_backend_may_come_first_or_later() {
        let text = "backend app\n server s 10.0.0.1:1\nfrontend web\n bind :443\n cert c\n key k\n default_backend app\n";
        assert_eq!(ok(text).frontends[0].default_backend, "app");
    }

    #[test]
    fn all_errors_collected_in_line_order() {
        let text = "\
frontend web
  bind :0
  tiemout client 1s
  cert c
  key k
  default_backend nope
backend app
  server s 10.0.0.1:0
";
        let e = errors(text);
        let lines: Vec<usize> = e.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 6, 8], "{e:#?}");
        assert_eq!(e[1].to_string(), format!("t.conf:3: {}", e[1].message));
    }

    #[test]
    fn display_format() {
        let e = ConfigError {
            file: "h3gate.conf".into(),
            line: 7,
            message: "boom".into(),
        };
        assert_eq!(e.to_string(), "h3gate.conf:7: boom");
    }

    #[test]
    fn ipv6_addresses() {
        let config = ok(&with_frontend(" bind [::]:443\n bind [2001:db8::1]:8443"));
        let binds = &config.frontends[0].binds;
        assert_eq!(
            binds[1],
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 443)
        );
        assert_eq!(binds[2], "[2001:db8::1]:8443".parse().unwrap());
        let config = ok(&with_backend(" server v6 [::1]:8080"));
        let v6 = &config.backends[0].servers[1];
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.addr, Some("[::1]:8080".parse().unwrap()));
    }

    #[test]
    fn host_names_stay_unresolved() {
        let config = ok(&with_backend(
            " server h1 localhost:8080\n server h2 origin.example.com.:80\n server h3 db_1:5432",
        ));
        let servers = &config.backends[0].servers;
        for (server, host, port) in [
            (&servers[1], "localhost", 8080),
            (&servers[2], "origin.example.com.", 80),
            (&servers[3], "db_1", 5432),
        ] {
            assert_eq!(
                (server.host.as_str(), server.port, server.addr),
                (host, port, None)
            );
        }
    }

    #[test]
    fn comments_whitespace_and_crlf() {
        let text = "# top\r\n\r\nfrontend\tweb # trailing\r\n\tbind\t:443\r\n   cert a#b.pem\r\n key k # c\r\n default_backend app\r\n#backend nope\r\nbackend app\r\n\t server s 10.0.0.1:1\r";
        let config = ok(text);
        assert_eq!(config.frontends[0].cert, PathBuf::from("a#b.pem"));
        assert_eq!(config.frontends[0].key, PathBuf::from("k"));
        assert_eq!(config.backends[0].line, 9);
        let bom = format!("\u{feff}{}", with_frontend(""));
        assert_eq!(ok(&bom).frontends[0].line, 1);
    }

    #[test]
    fn suggestions() {
        assert_eq!(edit_distance("tiemout", "timeout"), 1);
        assert_eq!(edit_distance("conect", "connect"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(suggest("x", ["key"]), None);
        assert_eq!(suggest("ap", ["app", "api2"]), Some("app"));
        assert_eq!(suggest("zzzzzz", ["timeout"]), None);
        let long = "é".repeat(10_000);
        assert_eq!(suggest(&long, FRONTEND_KEYWORDS.iter().copied()), None);
    }

    #[test]
    fn long_and_odd_words_are_shortened_in_messages() {
        let word = "y".repeat(500);
        let e = errors(&with_frontend(&format!(" {word}")));
        assert!(e[0].message.len() < 200, "{}", e[0].message);
        let e = errors(&with_frontend(" bell\u{7}"));
        assert!(e[0].message.contains("bell\\u{7}"), "{}", e[0].message);
    }

    /// Deterministic garbage made of keywords, addresses and odd bytes:
    /// parse must never panic and must only report real line numbers.
    #[test]
    fn garbage_never_panics() {
        const WORDS: &[&str] = &[
            "global",
            "defaults",
            "frontend",
            "backend",
            "bind",
            "cert",
            "key",
            "default_backend",
            "max-connections",
            "max-concurrent-streams",
            "timeout",
            "balance",
            "server",
            "weight",
            "maxconn",
            "workers",
            "max-memory",
            "user",
            "group",
            "diagnostic",
            "on",
            "connect",
            "client",
            "drain",
            "handshake",
            "roundrobin",
            "leastconn",
            "web",
            "app",
            ":443",
            "[::1]:80",
            "[",
            "]",
            ":",
            "0",
            "65536",
            "10.0.0.1:8080",
            "localhost:1",
            "5s",
            "99999999999999999999d",
            "256m",
            "#",
            "é",
            "\u{0}",
            "\u{feff}",
            "1k",
            "-1",
            "",
        ];
        const SEPARATORS: &[&str] = &[" ", "\t", "\n", "\r\n", " # ", "\n ", "\r"];
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: usize| {
            // Knuth's MMIX LCG; the high bits are the better ones.
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            usize::try_from(state >> 33).unwrap_or(0) % n
        };
        for _ in 0..2000 {
            let mut text = String::new();
            for _ in 0..next(60) {
                match next(10) {
                    0 => text.push(char::from_u32(next(0x3000) as u32).unwrap_or('?')),
                    1 => text.push(char::from(next(128) as u8)),
                    2..=4 => text.push_str(SEPARATORS[next(SEPARATORS.len())]),
                    _ => text.push_str(WORDS[next(WORDS.len())]),
                }
                text.push_str(SEPARATORS[next(2)]);
            }
            if let Err(errors) = parse("fuzz", &text) {
                let lines = text.lines().count().max(1);
                for e in errors {
                    assert!((1..=lines).contains(&e.line), "{e} in {text:?}");
                }
            }
        }
    }

    /// A unique scratch directory under the system temp dir.
    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("h3gate-config-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn load_checks_files_and_resolves() {
        let dir = temp_dir("load");
        let cert = dir.join("cert.pem");
        std::fs::write(&cert, "cert").unwrap();
        let text = format!(
            "frontend web\n bind :443\n cert {}\n key {}\n default_backend app\n\
             backend app\n server s1 localhost:8080\n server s2 10.0.0.1:80\n",
            cert.display(),
            dir.join("missing.key").display()
        );
        let conf = dir.join("bad.conf");
        std::fs::write(&conf, &text).unwrap();
        let e = load(&conf).unwrap_err();
        assert_eq!(e.len(), 1, "{e:#?}");
        assert_eq!(e[0].line, 4);
        let missing = dir.join("missing.key");
        assert!(
            e[0].message
                .starts_with(&format!("cannot read key {}: ", missing.display())),
            "{}",
            e[0].message
        );
        assert_eq!(e[0].file, conf.display().to_string());

        let text = text.replace("missing.key", "cert.pem");
        std::fs::write(&conf, &text).unwrap();
        let config = load(&conf).unwrap();
        let s1 = &config.backends[0].servers[0];
        assert_eq!(s1.host, "localhost");
        assert!(s1
            .addr
            .is_some_and(|a| a.ip().is_loopback() && a.port() == 8080));

        // A directory is not a readable cert.
        std::fs::write(
            &conf,
            text.replace(&cert.display().to_string(), &dir.display().to_string()),
        )
        .unwrap();
        let e = load(&conf).unwrap_err();
        assert_eq!(e[0].line, 3);
        assert_eq!(
            e[0].message,
            format!("cannot read certificate {}: is a directory", dir.display())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_reports_unreadable_config() {
        let dir = temp_dir("unreadable");
        let e = load(&dir.join("absent.conf")).unwrap_err();
        assert_eq!(e[0].line, 1);
        assert!(e[0].message.contains("cannot read config file"));
        let conf = dir.join("latin1.conf");
        std::fs::write(&conf, b"global\n workers 1\n user caf\xe9\n").unwrap();
        let e = load(&conf).unwrap_err();
        assert_eq!((e[0].line, e[0].message.as_str()), (3, "invalid UTF-8"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn udp_path_and_retry_keywords() {
        let text = "global\n    steering off\n    gso off\n    gro on\n    cluster-secret 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\nfrontend web\n    bind :8443\n    cert c.pem\n    key k.pem\n    default_backend app\n    quic-retry always\n    retry-threshold 10\nbackend app\n    server s1 127.0.0.1:8080\n";
        let c = parse("t.conf", text).unwrap();
        assert!(!c.global.steering && !c.global.gso && c.global.gro);
        assert_eq!(c.global.cluster_secret.map(|s| s[31]), Some(0x1f));
        assert_eq!(c.frontends[0].retry, RetryMode::Always);
        assert_eq!(c.frontends[0].retry_threshold, 10);
        let bad = text.replace("quic-retry always", "quic-retry sometimes");
        let errs = parse("t.conf", &bad).unwrap_err();
        assert_eq!(errs[0].line, 11, "{errs:?}");
        let bad = text.replace("cluster-secret 00", "cluster-secret zz");
        let errs = parse("t.conf", &bad).unwrap_err();
        assert!(errs[0].message.contains("hexadecimal"), "{errs:?}");
    }

    #[test]
    fn allow_0rtt_is_off_unless_asked() {
        let base = "frontend web\n    bind :8443\n    cert c.pem\n    key k.pem\n    default_backend app\nbackend app\n    server s1 127.0.0.1:8080\n";
        assert!(!parse("t.conf", base).unwrap().frontends[0].allow_0rtt);
        for (line, want) in [
            ("allow-0rtt", true),
            ("allow-0rtt on", true),
            ("allow-0rtt off", false),
        ] {
            let text = base.replace(
                "default_backend app\n",
                &format!("default_backend app\n    {line}\n"),
            );
            assert_eq!(
                parse("t.conf", &text).unwrap().frontends[0].allow_0rtt,
                want,
                "{line}"
            );
        }
        let text = base.replace(
            "default_backend app\n",
            "default_backend app\n    allow-0rtt yes\n",
        );
        let errs = parse("t.conf", &text).unwrap_err();
        assert_eq!(errs[0].line, 6, "{errs:?}");
        assert!(errs[0].message.contains("expected on or off"), "{errs:?}");
    }

    #[test]
    fn memory_keywords() {
        let text = "global\n    bufsize 32k\nfrontend web\n    bind :8443\n    cert c.pem\n    key k.pem\n    default_backend app\n    max-stream-buffer 512k\n    http-request wait-for-body time 5s at-least 1m\nbackend app\n    http-request wait-for-body time 2s\n    server s1 127.0.0.1:8080\n";
        let c = parse("t.conf", text).unwrap();
        assert_eq!(c.global.bufsize, 32 * 1024);
        let fe = &c.frontends[0];
        assert_eq!(fe.max_stream_buffer, Some(512 * 1024));
        assert_eq!(
            fe.wait_for_body,
            Some(WaitForBody {
                time: Duration::from_secs(5),
                at_least: Some(1024 * 1024)
            })
        );
        assert_eq!(c.backends[0].wait_for_body.map(|w| w.at_least), Some(None));
        let bad = text.replace("wait-for-body time 5s", "wait-for-bdy time 5s");
        let errs = parse("t.conf", &bad).unwrap_err();
        assert!(
            errs[0].message.contains("did you mean 'wait-for-body'"),
            "{errs:?}"
        );
        assert_eq!(errs[0].line, 9);
    }
}
