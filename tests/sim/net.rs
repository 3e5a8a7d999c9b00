//! The in-memory network: timestamped datagrams in flight between the clients and the core's
//! listener. Faults are decided per link from the link's own RNG, with the same number of draws
//! per datagram, so the n-th datagram on a link meets the same fate for a given seed whatever the
//! timing of the rest of the run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::rng::Rng;
use crate::scenario::NetPlan;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dst {
    Server,
    Client(usize),
}

pub struct Packet {
    pub dst: Dst,
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub data: Vec<u8>,
}

#[derive(Default, Debug, Clone, Copy)]
pub struct NetStats {
    pub sent: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub corrupted: u64,
}

pub struct Net {
    plan: NetPlan,
    in_flight: BTreeMap<(Instant, u64), Packet>,
    seq: u64,
    /// One RNG per (client, direction).
    links: Vec<[Rng; 2]>,
    pub stats: NetStats,
}

impl Net {
    pub fn new(seed: u64, plan: NetPlan, clients: usize) -> Net {
        let root = Rng::new(seed).fork(3);
        Net {
            plan,
            in_flight: BTreeMap::new(),
            seq: 0,
            links: (0..clients)
                .map(|c| [root.fork(2 * c as u64), root.fork(2 * c as u64 + 1)])
                .collect(),
            stats: NetStats::default(),
        }
    }

    /// Puts a datagram on the wire of `client`'s link (`up`: toward the server).
    pub fn send(&mut self, now: Instant, client: usize, up: bool, p: Packet) {
        let Some(link) = self.links.get_mut(client) else {
            return;
        };
        let r = &mut link[usize::from(up)];
        let NetPlan {
            latency_ms,
            jitter_ms,
            loss_pm,
            dup_pm,
            corrupt_pm,
        } = self.plan;
        // Always the same draws, in the same order.
        let lost = r.per_mille(loss_pm);
        let dup = r.per_mille(dup_pm);
        let corrupt = r.per_mille(corrupt_pm);
        let d1 = latency_ms * 1000 + r.below(jitter_ms * 1000 + 1);
        let d2 = latency_ms * 1000 + r.below(jitter_ms * 2000 + 1);
        let pos = r.next_u64();
        let bit = r.below(8);
        self.stats.sent += 1;
        if lost {
            self.stats.lost += 1;
            return;
        }
        let mut p = p;
        if corrupt && !p.data.is_empty() {
            self.stats.corrupted += 1;
            let i = (pos % p.data.len() as u64) as usize;
            p.data[i] ^= 1 << bit;
        }
        if dup {
            self.stats.duplicated += 1;
            let copy = Packet {
                dst: p.dst,
                from: p.from,
                to: p.to,
                data: p.data.clone(),
            };
            self.push(now + Duration::from_micros(d2), copy);
        }
        self.push(now + Duration::from_micros(d1), p);
    }

    fn push(&mut self, at: Instant, p: Packet) {
        self.seq += 1;
        self.in_flight.insert((at, self.seq), p);
    }

    /// The next datagram due at `now`, in arrival order.
    pub fn pop_due(&mut self, now: Instant) -> Option<Packet> {
        let e = self.in_flight.first_entry()?;
        if e.key().0 > now {
            return None;
        }
        Some(e.remove())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn next_arrival(&self) -> Option<Instant> {
        self.in_flight.keys().next().map(|(at, _)| *at)
    }
}
