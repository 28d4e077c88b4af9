//! Key de-duplication: an entry whose key is already waiting is not queued
//! again.
//!
//! The table knows, for each key with entries in the engine, whether one of
//! them is *live* (waiting to run) and how many are *stale* (superseded, to be
//! dropped when a worker takes them):
//!
//! - a back hand-over whose key is live is a duplicate: dropped at once;
//! - a front hand-over whose key is live goes to the front, and the waiting
//!   one becomes stale: the work moves to the front;
//! - a worker taking an entry runs it if its key is live (and the key stops
//!   being waiting: a new entry with that key, handed over while this one runs,
//!   is queued again, since the running one may have read old data), and drops
//!   it if it is stale;
//! - an entry leaving unrun (overflow, shrink) takes a stale mark first, then
//!   the live one.
//!
//! Keys are computed by the user's function outside every lock (it is user
//! code, contained); then the table's own lock, a leaf that nothing else is
//! held under, is taken once per call.

use crate::unwind::catch;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// What the store asks of a key table (the key type is hidden behind it).
pub(crate) trait Table<T>: Send + Sync {
    /// Hand-overs: which entries to keep (`false`: a duplicate, dropped).
    fn admit(&self, entries: &[T], front: bool) -> Vec<bool>;
    /// A worker took these entries: which to run (`false`: stale, dropped).
    fn taken(&self, entries: &[T]) -> Vec<bool>;
    /// These entries left the engine without running.
    fn left(&self, entries: &[T]);
    /// A hand-over admitted with `admit` failed: its entries never came in.
    fn undo(&self, entries: &[T], front: bool);
    /// The engine stopped: every key is forgotten.
    fn clear(&self);
    /// Entries dropped as duplicates so far.
    fn dropped(&self) -> u64;
}

/// Called to get an entry's key.
pub(crate) type KeyFn<T, K> = Box<dyn Fn(&T) -> K + Send + Sync>;

#[derive(Debug, Clone, Copy, Default)]
struct KeyState {
    live: bool,
    stale: u32,
}

/// The table for keys of type `K`.
pub(crate) struct KeyTable<T, K> {
    key: KeyFn<T, K>,
    map: Mutex<HashMap<K, KeyState, Seeded>>,
    dropped: AtomicU64,
}

impl<T, K: Hash + Eq> KeyTable<T, K> {
    pub(crate) fn new(key: KeyFn<T, K>) -> Self {
        KeyTable {
            key,
            map: Mutex::new(HashMap::with_hasher(Seeded::new())),
            dropped: AtomicU64::new(0),
        }
    }

    /// Keys with entries in the engine.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// The entries' keys (`None` where the key function panicked: such an
    /// entry is kept, as if it had no duplicate). One `catch` for the whole
    /// call; only after a panic is each entry tried on its own.
    fn keys(&self, entries: &[T]) -> Vec<Option<K>> {
        if let Ok(keys) = catch(|| entries.iter().map(|e| Some((self.key)(e))).collect()) {
            return keys;
        }
        entries
            .iter()
            .map(|e| match catch(|| (self.key)(e)) {
                Ok(k) => Some(k),
                Err(msg) => {
                    log::error!("the dedup key function panicked (entry kept): {msg}");
                    None
                }
            })
            .collect()
    }
}

impl<T, K> Table<T> for KeyTable<T, K>
where
    K: Hash + Eq + Send + Sync,
{
    fn admit(&self, entries: &[T], front: bool) -> Vec<bool> {
        let keys = self.keys(entries);
        let mut map = self.map.lock();
        let keep: Vec<bool> = keys
            .into_iter()
            .map(|key| {
                let Some(key) = key else { return true };
                let state = map.entry(key).or_default();
                match (state.live, front) {
                    (false, _) => {
                        state.live = true;
                        true
                    }
                    (true, true) => {
                        state.stale += 1; // the waiting one is superseded
                        true
                    }
                    (true, false) => false,
                }
            })
            .collect();
        drop(map);
        let dups = keep.iter().filter(|k| !**k).count() as u64;
        self.dropped.fetch_add(dups, Ordering::Relaxed);
        keep
    }

    fn taken(&self, entries: &[T]) -> Vec<bool> {
        let keys = self.keys(entries);
        let mut map = self.map.lock();
        let run: Vec<bool> = keys
            .into_iter()
            .map(|key| {
                let Some(key) = key else { return true };
                let Some(state) = map.get_mut(&key) else {
                    return true;
                };
                let run = if state.live {
                    state.live = false;
                    true
                } else if state.stale > 0 {
                    state.stale -= 1;
                    false
                } else {
                    true
                };
                if !state.live && state.stale == 0 {
                    map.remove(&key);
                }
                run
            })
            .collect();
        drop(map);
        let stale = run.iter().filter(|r| !**r).count() as u64;
        self.dropped.fetch_add(stale, Ordering::Relaxed);
        run
    }

    fn left(&self, entries: &[T]) {
        let keys = self.keys(entries);
        let mut map = self.map.lock();
        for key in keys.into_iter().flatten() {
            if let Some(state) = map.get_mut(&key) {
                if state.stale > 0 {
                    state.stale -= 1;
                } else {
                    state.live = false;
                }
                if !state.live && state.stale == 0 {
                    map.remove(&key);
                }
            }
        }
    }

    fn undo(&self, entries: &[T], front: bool) {
        let keys = self.keys(entries);
        let mut map = self.map.lock();
        for key in keys.into_iter().flatten() {
            if let Some(state) = map.get_mut(&key) {
                if front && state.live && state.stale > 0 {
                    state.stale -= 1; // the superseded one is live again
                } else {
                    state.live = false;
                }
                if !state.live && state.stale == 0 {
                    map.remove(&key);
                }
            }
        }
    }

    fn clear(&self) {
        let old = std::mem::replace(&mut *self.map.lock(), HashMap::with_hasher(Seeded::new()));
        crate::unwind::drop_quietly("dedup keys", old); // keys are user values
    }

    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A fast hasher (a multiply-rotate per word, as rustc's FxHash) with a random
/// seed per table, so that keys chosen to collide in one process do not in
/// another.
#[derive(Clone)]
pub(crate) struct Seeded(u64);

impl Seeded {
    fn new() -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x51_7C_C1_B7_27_22_0A_95);
        Seeded(h.finish() | 1)
    }
}

impl BuildHasher for Seeded {
    type Hasher = Fx;
    fn build_hasher(&self) -> Fx {
        Fx(self.0)
    }
}

/// The hasher itself.
pub(crate) struct Fx(u64);

const FX_K: u64 = 0x51_7C_C1_B7_27_22_0A_95;

impl Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(FX_K);
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn table() -> KeyTable<(u32, &'static str), u32> {
        KeyTable::new(Box::new(|e: &(u32, &str)| e.0))
    }

    #[test]
    fn a_waiting_key_takes_no_second_entry_from_the_back() {
        let t = table();
        assert_eq!(
            t.admit(&[(1, "a"), (2, "b"), (1, "c")], false),
            vec![true, true, false]
        );
        assert_eq!(t.admit(&[(2, "d")], false), vec![false]);
        assert_eq!(t.dropped(), 2);
        assert_eq!(t.taken(&[(1, "a"), (2, "b")]), vec![true, true]);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn while_one_runs_another_is_queued_again() {
        let t = table();
        t.admit(&[(1, "a")], false);
        assert_eq!(t.taken(&[(1, "a")]), vec![true]); // runs now
        assert_eq!(t.admit(&[(1, "b")], false), vec![true]); // queued again
        assert_eq!(t.taken(&[(1, "b")]), vec![true]);
    }

    #[test]
    fn a_front_duplicate_supersedes_the_waiting_one() {
        let t = table();
        t.admit(&[(1, "old")], false);
        assert_eq!(t.admit(&[(1, "new")], true), vec![true]);
        // The front one is taken first and runs; the old one is dropped.
        assert_eq!(t.taken(&[(1, "new")]), vec![true]);
        assert_eq!(t.taken(&[(1, "old")]), vec![false]);
        assert_eq!((t.dropped(), t.len()), (1, 0));
    }

    #[test]
    fn entries_that_leave_unrun_free_their_key() {
        let t = table();
        t.admit(&[(1, "a"), (2, "b")], false);
        t.left(&[(1, "a")]);
        assert_eq!(t.admit(&[(1, "c")], false), vec![true]);
        t.clear();
        assert_eq!(t.len(), 0);
        assert_eq!(t.admit(&[(2, "d")], false), vec![true]);
    }
}
