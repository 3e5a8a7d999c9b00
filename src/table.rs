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

enum Slot<T> {
    Occupied { gen: u32, value: T },
    Vacant { gen: u32, next_free: Option<u32> },
}

/// A slab whose keys carry a generation. Lookups with a removed key return `None`.
pub struct Table<T> {
    slots: Vec<Slot<T>>,
    free_head: Option<u32>,
    len: usize,
    capacity: usize,
}

impl<T> Table<T> {
    /// `capacity` is a hard limit: `insert` fails beyond it (refuse before allocating).
    pub fn with_capacity(capacity: usize) -> Self {
        Table {
            slots: Vec::new(),
            free_head: None,
            len: 0,
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len >= self.capacity
    }

    /// Inserts `value`; on a full table the value is handed back.
    pub fn insert(&mut self, value: T) -> Result<Key<T>, T> {
        self.insert_with(|_| value).map_err(|f| f(Key::new(0, 0)))
    }

    /// Inserts the value built by `f`, which gets the entry's own key (for entries that name
    /// themselves). On a full table `f` is handed back unused.
    pub fn insert_with<F: FnOnce(Key<T>) -> T>(&mut self, f: F) -> Result<Key<T>, F> {
        if self.is_full() {
            return Err(f);
        }
        let key = match self.free_head {
            Some(index) => {
                let slot = &mut self.slots[index as usize];
                let (gen, next) = match slot {
                    Slot::Vacant { gen, next_free } => (*gen, *next_free),
                    Slot::Occupied { .. } => unreachable!("free list points at an occupied slot"),
                };
                self.free_head = next;
                let key = Key::new(index, gen);
                *slot = Slot::Occupied { gen, value: f(key) };
                key
            }
            None => {
                let index = self.slots.len() as u32;
                let key = Key::new(index, 0);
                self.slots.push(Slot::Occupied {
                    gen: 0,
                    value: f(key),
                });
                key
            }
        };
        self.len += 1;
        debug_assert!(self.get(key).is_some());
        Ok(key)
    }

    pub fn get(&self, key: Key<T>) -> Option<&T> {
        match self.slots.get(key.index as usize)? {
            Slot::Occupied { gen, value } if *gen == key.gen => Some(value),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, key: Key<T>) -> Option<&mut T> {
        match self.slots.get_mut(key.index as usize)? {
            Slot::Occupied { gen, value } if *gen == key.gen => Some(value),
            _ => None,
        }
    }

    pub fn contains(&self, key: Key<T>) -> bool {
        self.get(key).is_some()
    }

    /// Removes the entry and bumps the slot's generation so `key` (and every copy of it) is dead.
    pub fn remove(&mut self, key: Key<T>) -> Option<T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        match slot {
            Slot::Occupied { gen, .. } if *gen == key.gen => {}
            _ => return None,
        }
        let old = std::mem::replace(
            slot,
            Slot::Vacant {
                gen: key.gen.wrapping_add(1),
                next_free: self.free_head,
            },
        );
        self.free_head = Some(key.index);
        self.len -= 1;
        debug_assert!(self.get(key).is_none());
        match old {
            Slot::Occupied { value, .. } => Some(value),
            Slot::Vacant { .. } => None,
        }
    }

    pub fn keys(&self) -> Vec<Key<T>> {
        self.iter().map(|(k, _)| k).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Key<T>, &T)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| match s {
            Slot::Occupied { gen, value } => Some((Key::new(i as u32, *gen), value)),
            Slot::Vacant { .. } => None,
        })
    }

    /// Debug-only consistency check: the length matches the occupied slots and the free list
    /// covers exactly the vacant ones.
    pub fn check_invariants(&self) {
        if cfg!(debug_assertions) {
            let occupied = self
                .slots
                .iter()
                .filter(|s| matches!(s, Slot::Occupied { .. }))
                .count();
            assert_eq!(occupied, self.len, "table length out of sync");
            let mut free = 0;
            let mut cur = self.free_head;
            while let Some(i) = cur {
                match self.slots.get(i as usize) {
                    Some(Slot::Vacant { next_free, .. }) => cur = *next_free,
                    _ => panic!("free list reaches a non-vacant slot"),
                }
                free += 1;
                assert!(free <= self.slots.len(), "free list has a cycle");
            }
            assert_eq!(free + self.len, self.slots.len(), "free list incomplete");
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
