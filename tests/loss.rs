//! End-to-end: transfers through a UDP relay that loses datagrams both ways (issue 13). The
//! release binaries over loopback, driven by the project's h3get, whose quiche sends no probes
//! of its own while nothing of its is in flight (like aioquic): once h3gate stops sending, only
//! h3gate's own timers can move a transfer along.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// A UDP relay in front of `upstream` that drops `loss_pm` per mille of the datagrams in each
/// direction, chosen by a generator seeded with `seed` (one stream per direction).
struct LossyRelay {
    addr: SocketAddr,
    dropped: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// xorshift64*: the relay's drop decisions, reproducible from the seed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

impl LossyRelay {
    fn start(upstream: SocketAddr, loss_pm: u64, seed: u64) -> LossyRelay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("relay bind"));
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("relay bind"));
        let addr = front.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let mut threads = Vec::new();
        for to_proxy in [true, false] {
            let (front, back, stop, dropped, client) = (
                front.clone(),
                back.clone(),
                stop.clone(),
                dropped.clone(),
                client.clone(),
            );
            let mut rng = (seed.wrapping_mul(2) + u64::from(to_proxy)) ^ 0x9e37_79b9_7f4a_7c15;
            threads.push(std::thread::spawn(move || {
                let from = if to_proxy { &front } else { &back };
                let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, src)) = from.recv_from(&mut buf) else {
                        continue;
                    };
                    if to_proxy {
                        *client.lock().unwrap_or_else(|p| p.into_inner()) = Some(src);
                    }
                    if next(&mut rng) % 1000 < loss_pm {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if to_proxy {
                        let _ = back.send_to(&buf[..n], upstream);
                    } else if let Some(c) = *client.lock().unwrap_or_else(|p| p.into_inner()) {
                        let _ = front.send_to(&buf[..n], c);
                    }
                }
            }));
        }
        LossyRelay {
            addr,
            dropped,
            stop,
            threads,
        }
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Ten concurrent 100 KiB GETs on one connection through a relay losing 10 % each way, 20
/// seeds, `workers 2`: every body arrives intact (sha256). Before
/// vendor/quiche-spurious-retransmit.patch, most seeds stalled until the client's idle timeout.
#[test]
fn ten_downloads_through_a_lossy_relay_complete() {
    let env = Env::start_with("lossy_relay", |c| c.workers = 2);
    let proxy: SocketAddr = format!("127.0.0.1:{}", env.port).parse().expect("addr");
    let n: u64 = 100 * 1024;
    let seeds = AtomicU64::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let seed = seeds.fetch_add(1, Ordering::Relaxed);
                if seed >= 20 {
                    return;
                }
                let relay = LossyRelay::start(proxy, 100, seed);
                let url = format!("https://localhost:{}/bytes/{n}", relay.addr.port());
                let out = env.h3get_t(
                    20,
                    &[
                        "-n",
                        "10",
                        "--sha256",
                        "--expect-status",
                        "200",
                        "--idle-timeout",
                        "10000",
                        &url,
                    ],
                );
                let good = out.success()
                    && out.sha_lines().len() == 10
                    && out.sha_lines().iter().all(|l| *l == pattern_line(n));
                let dropped = relay.dropped.load(Ordering::Relaxed);
                if !good {
                    failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("seed {seed} ({dropped} datagrams dropped):\n{out}"));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    assert!(
        failures.is_empty(),
        "{} of 20 seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
