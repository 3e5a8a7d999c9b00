//! The worker's memory budget: a pool of fixed-size chunks (`bufsize`) capped at
//! `max-memory / workers`. Sans-IO, no allocation past the cap.
//!
//! Every traffic buffer h3gate owns is charged here: request bytes waiting for the backend
//! (including wait-for-body), response bytes waiting for the client, the backend read window,
//! reads armed on backend sockets and sends in flight. When the pool is empty, checkout fails
//! and callers apply backpressure (stop reading that side) instead of growing; nothing aborts.

use std::collections::VecDeque;

/// Fraction (in 1/100) of the budget above which new connections are refused or sent a Retry
/// and new requests wait (admission control, issue #5).
pub const HIGH_WATER_PCT: usize = 90;

#[derive(Debug, Default, Clone, Copy)]
pub struct PoolStats {
    pub chunk_size: usize,
    pub capacity: usize,
    pub in_use: usize,
    pub peak: usize,
    pub refusals: u64,
    pub reused: u64,
}

pub struct Pool {
    chunk: usize,
    max_chunks: usize,
    in_use: usize,
    peak: usize,
    refusals: u64,
    reused: u64,
    /// Returned chunks kept for reuse (bounded so an idle worker gives memory back).
    free: Vec<Vec<u8>>,
}

/// Chunks kept on the free list at most (1 MiB at the default bufsize): enough to avoid
/// allocator churn under load, small enough that an idle worker gives memory back.
const FREE_KEEP: usize = 64;

impl Pool {
    pub fn new(budget_bytes: u64, chunk_size: usize) -> Pool {
        let chunk = chunk_size.max(1024);
        Pool {
            chunk,
            max_chunks: (budget_bytes / chunk as u64).max(4) as usize,
            in_use: 0,
            peak: 0,
            refusals: 0,
            reused: 0,
            free: Vec::new(),
        }
    }

    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    pub fn capacity_bytes(&self) -> usize {
        self.max_chunks * self.chunk
    }

    pub fn used_bytes(&self) -> usize {
        self.in_use * self.chunk
    }

    pub fn available(&self) -> usize {
        self.max_chunks.saturating_sub(self.in_use)
    }

    pub fn above_high_water(&self) -> bool {
        self.in_use * 100 >= self.max_chunks * HIGH_WATER_PCT
    }

    /// Charges `n` chunks without handing out memory (the memory lives elsewhere: a ring
    /// buffer, a send in flight). All or nothing.
    pub fn reserve(&mut self, n: usize) -> bool {
        if self.available() < n {
            self.refusals += 1;
            return false;
        }
        self.in_use += n;
        self.peak = self.peak.max(self.in_use);
        true
    }

    /// Charges `n` chunks for bytes that are already in memory and cannot be refused (a read
    /// that completed, a response head). Reads are armed only with budget to spare, so this
    /// overshoots by at most one read per stream; the peak shows it.
    pub fn reserve_forced(&mut self, n: usize) {
        self.in_use += n;
        self.peak = self.peak.max(self.in_use);
    }

    pub fn release(&mut self, n: usize) {
        debug_assert!(self.in_use >= n, "pool released more than it handed out");
        self.in_use = self.in_use.saturating_sub(n);
    }

    /// An empty chunk (capacity `chunk_size`), or None when the budget is spent.
    pub fn checkout(&mut self) -> Option<Vec<u8>> {
        if !self.reserve(1) {
            return None;
        }
        match self.free.pop() {
            Some(v) => {
                self.reused += 1;
                Some(v)
            }
            None => Some(Vec::with_capacity(self.chunk)),
        }
    }

    pub fn checkin(&mut self, mut v: Vec<u8>) {
        self.release(1);
        if self.free.len() < FREE_KEEP && v.capacity() == self.chunk {
            v.clear();
            self.free.push(v);
        }
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            chunk_size: self.chunk,
            capacity: self.capacity_bytes(),
            in_use: self.used_bytes(),
            peak: self.peak * self.chunk,
            refusals: self.refusals,
            reused: self.reused,
        }
    }

    pub fn chunks_in_use(&self) -> usize {
        self.in_use
    }
}

/// A byte FIFO made of pool chunks.
#[derive(Default)]
pub struct ChunkQueue {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes already consumed from the front chunk.
    head: usize,
    len: usize,
}

impl ChunkQueue {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Chunks held (what this queue costs the pool).
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// Appends as much of `data` as the budget allows; returns the bytes taken.
    pub fn push(&mut self, pool: &mut Pool, mut data: &[u8]) -> usize {
        let mut taken = 0;
        while !data.is_empty() {
            let room = self
                .chunks
                .back()
                .map(|c| c.capacity() - c.len())
                .unwrap_or(0);
            if room == 0 {
                match pool.checkout() {
                    Some(c) => self.chunks.push_back(c),
                    None => break,
                }
                continue;
            }
            let n = room.min(data.len());
            if let Some(c) = self.chunks.back_mut() {
                c.extend_from_slice(&data[..n]);
            }
            data = &data[n..];
            taken += n;
        }
        self.len += taken;
        taken
    }

    /// Like `push`, but never refuses: bytes already in memory are charged even past the budget.
    pub fn push_forced(&mut self, pool: &mut Pool, data: &[u8]) {
        let mut rest = data;
        loop {
            let n = self.push(pool, rest);
            rest = &rest[n..];
            if rest.is_empty() {
                return;
            }
            pool.reserve_forced(1);
            self.chunks.push_back(Vec::with_capacity(pool.chunk_size()));
        }
    }

    /// Bytes that can be pushed now: the tail chunk's room plus the pool's free chunks.
    pub fn room(&self, pool: &Pool) -> usize {
        let tail = self
            .chunks
            .back()
            .map(|c| c.capacity() - c.len())
            .unwrap_or(0);
        tail + pool.available() * pool.chunk_size()
    }

    /// Whether `n` more bytes fit without failing (the tail chunk's room plus free chunks).
    pub fn can_push(&self, pool: &Pool, n: usize) -> bool {
        let room = self
            .chunks
            .back()
            .map(|c| c.capacity() - c.len())
            .unwrap_or(0);
        n <= room || (n - room).div_ceil(pool.chunk_size()) <= pool.available()
    }

    /// The first contiguous run of bytes.
    pub fn front(&self) -> &[u8] {
        self.chunks
            .front()
            .and_then(|c| c.get(self.head..))
            .unwrap_or(&[])
    }

    /// Drops `n` bytes from the front, returning emptied chunks to the pool.
    pub fn consume(&mut self, pool: &mut Pool, mut n: usize) {
        n = n.min(self.len);
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let avail = front.len() - self.head;
            if n < avail {
                self.head += n;
                return;
            }
            n -= avail;
            self.head = 0;
            if let Some(c) = self.chunks.pop_front() {
                pool.checkin(c);
            }
        }
        // An emptied tail chunk with room left stays for the next push.
        if self.len == 0 && self.head > 0 {
            if let Some(c) = self.chunks.pop_front() {
                pool.checkin(c);
            }
            self.head = 0;
        }
    }

    /// Takes the front chunk out whole (for a send to the ring). Its pool charge moves with it:
    /// the caller must `pool.release(1)` when the send completes.
    pub fn pop_chunk(&mut self) -> Option<Vec<u8>> {
        let mut c = self.chunks.pop_front()?;
        if self.head > 0 {
            c.drain(..self.head);
            self.head = 0;
        }
        self.len -= c.len();
        Some(c)
    }

    /// Returns every chunk to the pool.
    pub fn clear(&mut self, pool: &mut Pool) {
        while let Some(c) = self.chunks.pop_front() {
            pool.checkin(c);
        }
        self.head = 0;
        self.len = 0;
    }
}

impl Drop for ChunkQueue {
    fn drop(&mut self) {
        // Dropping a queue that still holds chunks would leak their pool charge: every owner
        // clears its queues when it goes away.
        debug_assert!(
            self.chunks.is_empty(),
            "ChunkQueue dropped with {} chunks charged",
            self.chunks.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_never_exceeds_budget() {
        let mut p = Pool::new(64 * 1024, 16 * 1024);
        let mut held = Vec::new();
        while let Some(c) = p.checkout() {
            held.push(c);
        }
        assert_eq!(held.len(), 4);
        assert_eq!(p.used_bytes(), 64 * 1024);
        assert!(p.checkout().is_none());
        assert!(!p.reserve(1));
        assert_eq!(
            p.stats().refusals,
            3,
            "the loop's last try, checkout, reserve"
        );
        for c in held {
            p.checkin(c);
        }
        assert_eq!(p.used_bytes(), 0);
        assert_eq!(p.stats().peak, 64 * 1024);
    }

    #[test]
    fn chunks_are_reused() {
        let mut p = Pool::new(1 << 20, 16 * 1024);
        let a = p.checkout().unwrap();
        let ptr = a.as_ptr();
        p.checkin(a);
        let b = p.checkout().unwrap();
        assert_eq!(b.as_ptr(), ptr, "a returned chunk is handed out again");
        assert_eq!(p.stats().reused, 1);
        p.checkin(b);
    }

    #[test]
    fn queue_is_fifo_and_returns_chunks() {
        let mut p = Pool::new(1 << 20, 1024);
        let mut q = ChunkQueue::default();
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        assert_eq!(q.push(&mut p, &data), 5000);
        assert_eq!(q.chunks(), 5);
        assert_eq!(p.chunks_in_use(), 5);
        let mut out = Vec::new();
        while !q.is_empty() {
            let n = q.front().len().min(700);
            out.extend_from_slice(&q.front()[..n]);
            q.consume(&mut p, n);
        }
        assert_eq!(out, data);
        assert_eq!(p.chunks_in_use(), 0, "every chunk back in the pool");
    }

    #[test]
    fn queue_push_stops_softly_at_the_budget() {
        let mut p = Pool::new(4 * 1024, 1024);
        let mut q = ChunkQueue::default();
        assert_eq!(q.push(&mut p, &[7u8; 10_000]), 4096);
        assert!(!q.can_push(&p, 1));
        assert_eq!(q.len(), 4096);
        let c = q.pop_chunk().unwrap();
        assert_eq!(c.len(), 1024);
        assert_eq!(
            p.chunks_in_use(),
            4,
            "a popped chunk stays charged until released"
        );
        p.release(1);
        q.clear(&mut p);
        assert_eq!(p.chunks_in_use(), 0);
    }

    #[test]
    fn forced_push_charges_past_the_budget_and_returns_it() {
        let mut p = Pool::new(4 * 1024, 1024);
        let mut q = ChunkQueue::default();
        q.push_forced(&mut p, &[1u8; 6000]);
        assert_eq!(q.len(), 6000);
        assert_eq!(p.chunks_in_use(), 6);
        assert_eq!(p.available(), 0);
        assert_eq!(p.stats().peak, 6 * 1024);
        q.clear(&mut p);
        assert_eq!(p.chunks_in_use(), 0);
    }
}
