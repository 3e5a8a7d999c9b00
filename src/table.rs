//! Generation-checked slab: the only way h3gate refers to a connection, a stream, a backend
//! connection or an in-flight io_uring operation.
//!
//! HAProxy 3.0 crashed when a stale pointer (a stream after its connection went away, an fd after a
//! thread change) reached code that assumed it was live. Here every cross-reference is a `Key`
//! `(index, generation)`. Removing an entry bumps the slot's generation, so an old key looks up as
//! `None` even after the slot is reused; it can never reach the new occupant.

use std::fmt;
use std::marker::PhantomData;

/// A typed key into a [`Table`]. `T` only tags the key so a stream key cannot index the connection
/// table by mistake.
pub struct Key<T> {
    index: u32,
    gen: u32,
    _t: PhantomData<fn() -> T>,
}

impl<T> Key<T> {
    fn new(index: u32, gen: u32) -> Self {
        Key {
            index,
            gen,
            _t: PhantomData,
        }
    }

    /// Packs the key into a u64 (io_uring `user_data`, timer entries).
    pub fn to_u64(self) -> u64 {
        (u64::from(self.gen) << 32) | u64::from(self.index)
    }

    pub fn from_u64(v: u64) -> Self {
        Key::new(v as u32, (v >> 32) as u32)
    }

    pub fn index(self) -> u32 {
        self.index
    }
}

// Manual impls: derive would require `T: Clone` etc.
impl<T> Clone for Key<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Key<T> {}
impl<T> PartialEq for Key<T> {
    fn eq(&self, o: &Self) -> bool {
        self.index == o.index && self.gen == o.gen
    }
}
impl<T> Eq for Key<T> {}
impl<T> std::hash::Hash for Key<T> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.to_u64().hash(h)
    }
}
impl<T> PartialOrd for Key<T> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for Key<T> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.to_u64().cmp(&o.to_u64())
    }
}
impl<T> fmt::Debug for Key<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.index, self.gen)
    }
}

/// A `slab::Slab` plus one generation counter per slot. The slab gives dense storage and slot
/// reuse; the generations make reuse safe. Lookups with a removed key return `None`.
pub struct Table<T> {
    slab: slab::Slab<T>,
    /// Generation of each slot index ever used; bumped when the slot's entry is removed.
    gens: Vec<u32>,
    capacity: usize,
}

impl<T> Table<T> {
    /// `capacity` is a hard limit: `insert` fails beyond it (refuse before allocating).
    pub fn with_capacity(capacity: usize) -> Self {
        Table {
            slab: slab::Slab::new(),
            gens: Vec::new(),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.slab.len() >= self.capacity
    }

    /// Inserts `value`; on a full table the value is handed back.
    pub fn insert(&mut self, value: T) -> Result<Key<T>, T> {
        if self.is_full() {
            return Err(value);
        }
        Ok(self
            .insert_with(|_| value)
            .ok()
            .expect("not full: checked above"))
    }

    /// Inserts the value built by `f`, which gets the entry's own key (for entries that name
    /// themselves). On a full table `f` is handed back unused.
    pub fn insert_with<F: FnOnce(Key<T>) -> T>(&mut self, f: F) -> Result<Key<T>, F> {
        if self.is_full() || self.slab.vacant_key() >= u32::MAX as usize {
            return Err(f);
        }
        let index = self.slab.vacant_key();
        if index == self.gens.len() {
            self.gens.push(0);
        }
        let key = Key::new(index as u32, self.gens[index]);
        let got = self.slab.insert(f(key));
        debug_assert_eq!(got, index);
        debug_assert!(self.get(key).is_some());
        Ok(key)
    }

    fn live(&self, key: Key<T>) -> bool {
        self.gens.get(key.index as usize) == Some(&key.gen)
            && self.slab.contains(key.index as usize)
    }

    pub fn get(&self, key: Key<T>) -> Option<&T> {
        if self.live(key) {
            self.slab.get(key.index as usize)
        } else {
            None
        }
    }

    pub fn get_mut(&mut self, key: Key<T>) -> Option<&mut T> {
        if self.live(key) {
            self.slab.get_mut(key.index as usize)
        } else {
            None
        }
    }

    pub fn contains(&self, key: Key<T>) -> bool {
        self.live(key)
    }

    /// Removes the entry and bumps the slot's generation so `key` (and every copy of it) is dead.
    pub fn remove(&mut self, key: Key<T>) -> Option<T> {
        if !self.live(key) {
            return None;
        }
        let value = self.slab.try_remove(key.index as usize)?;
        if let Some(g) = self.gens.get_mut(key.index as usize) {
            *g = g.wrapping_add(1);
        }
        debug_assert!(self.get(key).is_none());
        Some(value)
    }

    pub fn keys(&self) -> Vec<Key<T>> {
        self.iter().map(|(k, _)| k).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Key<T>, &T)> {
        self.slab.iter().map(|(i, v)| {
            (
                Key::new(i as u32, self.gens.get(i).copied().unwrap_or(0)),
                v,
            )
        })
    }

    /// Debug-only consistency check: every occupied slot has a generation entry.
    pub fn check_invariants(&self) {
        if cfg!(debug_assertions) {
            for (i, _) in self.slab.iter() {
                assert!(i < self.gens.len(), "slot {i} has no generation");
            }
            assert!(self.slab.len() <= self.capacity, "table over capacity");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_key_never_reaches_reused_slot() {
        let mut t: Table<&str> = Table::with_capacity(4);
        let a = t.insert("conn-a").unwrap();
        assert_eq!(t.remove(a), Some("conn-a"));
        let b = t.insert("conn-b").unwrap();
        assert_eq!(a.index(), b.index(), "slot is reused");
        assert_eq!(t.get(a), None, "the old key must not see the new occupant");
        assert_eq!(t.get_mut(a), None);
        assert_eq!(t.remove(a), None, "removing via a stale key is a no-op");
        assert_eq!(t.get(b), Some(&"conn-b"));
        t.check_invariants();
    }

    #[test]
    fn capacity_is_a_hard_limit() {
        let mut t = Table::with_capacity(2);
        t.insert(1).unwrap();
        t.insert(2).unwrap();
        assert_eq!(t.insert(3), Err(3));
        assert!(t.is_full());
    }

    #[test]
    fn key_roundtrips_through_u64() {
        let mut t = Table::with_capacity(8);
        let k = t.insert(5u8).unwrap();
        t.remove(k);
        let k2 = t.insert(6u8).unwrap();
        assert_eq!(Key::<u8>::from_u64(k2.to_u64()), k2);
        assert_ne!(k.to_u64(), k2.to_u64());
    }

    #[test]
    fn insert_with_sees_own_key() {
        let mut t: Table<u64> = Table::with_capacity(2);
        // Entries that store their own key (an in-flight op naming itself) get the right one.
        let k = t.insert_with(|k| k.to_u64()).ok().unwrap();
        assert_eq!(t.get(k), Some(&k.to_u64()));
    }

    /// Random inserts and removes: a removed key never resolves again, a live key always resolves
    /// to its own value. (A deterministic LCG keeps this reproducible without a proptest dep.)
    #[test]
    fn random_churn_keeps_keys_honest() {
        let mut t: Table<u64> = Table::with_capacity(64);
        let mut live: Vec<(Key<u64>, u64)> = Vec::new();
        let mut dead: Vec<Key<u64>> = Vec::new();
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for n in 0..20_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if !(x >> 33).is_multiple_of(3) && !t.is_full() {
                let k = t.insert(n).unwrap();
                live.push((k, n));
            } else if !live.is_empty() {
                let i = ((x >> 40) as usize) % live.len();
                let (k, v) = live.swap_remove(i);
                assert_eq!(t.remove(k), Some(v));
                dead.push(k);
            }
            if n % 1000 == 0 {
                for &(k, v) in &live {
                    assert_eq!(t.get(k), Some(&v));
                }
                for &k in &dead {
                    assert_eq!(t.get(k), None);
                }
                t.check_invariants();
            }
        }
    }
}
