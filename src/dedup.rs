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
//! held under, is taken once per call. Keys are hashed outside the lock too,
//! with std's SipHash keyed at random per table: keys often come from outside
//! (a crawler's URLs), and a faster hash whose collisions can be chosen would
//! let them turn every lookup into a list walk. Under the lock the map only
//! compares: the hash first, the key (its `Eq`) where the hashes match.

use crate::unwind::catch;
use parking_lot::Mutex;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    /// Counts `n` entries dropped as duplicates (the store counts them as it
    /// reports them: a refused hand-over hands its duplicates back).
    fn count_dropped(&self, n: usize);
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

/// A key with its hash, computed outside the table's lock.
struct Hashed<K> {
    hash: u64,
    key: K,
}

impl<K: Eq> PartialEq for Hashed<K> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.key == other.key
    }
}

impl<K: Eq> Eq for Hashed<K> {}

impl<K> Hash for Hashed<K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The map's hasher: the hash is already there.
#[derive(Default)]
struct Ready(u64);

impl Hasher for Ready {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b); // not used by `Hashed`
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map<K> = HashMap<Hashed<K>, KeyState, BuildHasherDefault<Ready>>;

/// The table for keys of type `K`.
///
/// The key function and the key type's `Hash` run outside the table's lock;
/// its `Eq` and `Drop` under it (a leaf: they must not call into the engine).
/// All are user code, so they run contained. A key that cannot be computed
/// on the way in keeps its entry, as if it had no duplicate. Anything else
/// (a panic under the lock, or a key that cannot be computed again when its
/// entry leaves) may leave the table half updated: it is emptied and
/// de-duplication is off for the rest of the engine's life (logged at error
/// level). Entries are then all kept: none is lost, at worst one runs twice.
pub(crate) struct KeyTable<T, K> {
    key: KeyFn<T, K>,
    hasher: RandomState,
    map: Mutex<Map<K>>,
    dropped: AtomicU64,
    /// A key's `Hash`, `Eq` or `Drop` panicked: every entry is kept.
    broken: AtomicBool,
}

impl<T, K: Hash + Eq> KeyTable<T, K> {
    pub(crate) fn new(key: KeyFn<T, K>) -> Self {
        KeyTable {
            key,
            hasher: RandomState::new(),
            map: Mutex::new(Map::default()),
            dropped: AtomicU64::new(0),
            broken: AtomicBool::new(false),
        }
    }

    /// Empties the table (the keys are user values: dropped contained, and
    /// not under the lock).
    fn forget_all(&self) {
        let old = std::mem::take(&mut *self.map.lock());
        crate::unwind::drop_quietly("dedup keys", old);
    }

    /// Runs `f` on the map (contained; see the type's doc). `None`: it
    /// panicked now or earlier, and the table is off.
    fn with_map<R>(&self, f: impl FnOnce(&mut Map<K>) -> R) -> Option<R> {
        if self.broken.load(Ordering::Acquire) {
            crate::unwind::drop_quietly("dedup keys", f); // it holds keys
            return None;
        }
        let result = catch(|| {
            let mut map = self.map.lock();
            f(&mut map)
        });
        match result {
            Ok(r) => Some(r),
            Err(msg) => {
                self.break_down(&format!("a dedup key's Eq or Drop panicked: {msg}"));
                None
            }
        }
    }

    /// The table cannot be trusted any more: it is emptied, and every entry
    /// is kept from now on.
    fn break_down(&self, why: &str) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            log::error!("{why}; de-duplication is off from now on");
        }
        self.forget_all();
    }

    /// The keys of entries that were admitted, or `None` (and the table off)
    /// where one cannot be computed again: its mark would stay for ever.
    fn keys_again(&self, entries: &[T]) -> Option<Vec<Option<Hashed<K>>>> {
        let keys = self.keys(entries);
        if keys.iter().all(Option::is_some) {
            return Some(keys);
        }
        crate::unwind::drop_quietly("dedup keys", keys);
        self.break_down("a dedup key could not be computed again as its entry left");
        None
    }

    /// Keys with entries in the engine.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// The entries' keys, hashed (`None` where the key function or the key's
    /// `Hash` panicked: on the way in, such an entry is kept, as if it had no
    /// duplicate). One `catch` for the whole call; only after a panic is each
    /// entry tried on its own.
    fn keys(&self, entries: &[T]) -> Vec<Option<Hashed<K>>> {
        let one = |e: &T| {
            let key = (self.key)(e);
            Hashed {
                hash: self.hasher.hash_one(&key),
                key,
            }
        };
        if let Ok(keys) = catch(|| entries.iter().map(|e| Some(one(e))).collect()) {
            return keys;
        }
        entries
            .iter()
            .map(|e| match catch(|| one(e)) {
                Ok(k) => Some(k),
                Err(msg) => {
                    log::error!(
                        "the dedup key function or the key's Hash panicked (entry kept): {msg}"
                    );
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
        if self.broken.load(Ordering::Acquire) {
            return vec![true; entries.len()];
        }
        let keys = self.keys(entries);
        let keep = self.with_map(|map| {
            keys.into_iter()
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
                .collect()
        });
        keep.unwrap_or_else(|| vec![true; entries.len()])
    }

    fn taken(&self, entries: &[T]) -> Vec<bool> {
        if self.broken.load(Ordering::Acquire) {
            return vec![true; entries.len()];
        }
        let Some(keys) = self.keys_again(entries) else {
            return vec![true; entries.len()];
        };
        let run = self.with_map(|map| {
            keys.into_iter()
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
                .collect()
        });
        run.unwrap_or_else(|| vec![true; entries.len()])
    }

    fn left(&self, entries: &[T]) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        let Some(keys) = self.keys_again(entries) else {
            return;
        };
        self.with_map(|map| {
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
        });
    }

    fn undo(&self, entries: &[T], front: bool) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        let Some(keys) = self.keys_again(entries) else {
            return;
        };
        self.with_map(|map| {
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
        });
    }

    fn clear(&self) {
        self.forget_all();
    }

    fn count_dropped(&self, n: usize) {
        self.dropped.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
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
        assert_eq!(t.len(), 0);
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
