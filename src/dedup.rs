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
    /// A failed run's entries going to wait a retry backoff: as back
    /// hand-overs, marked as retries (see [`KeyState`]).
    fn admit_retries(&self, entries: &[T]) -> Vec<bool>;
    /// A worker took these entries: which to run (`false`: stale, dropped).
    fn taken(&self, entries: &[T]) -> Vec<bool>;
    /// These entries left the engine without running.
    fn left(&self, entries: &[T]);
    /// A hand-over admitted with `admit` failed: its entries never came in.
    fn undo(&self, entries: &[T]);
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

/// The marks of one key. Invariant: `live as u32 + stale` is at most the
/// number of entries with this key waiting in the engine (each entry that
/// leaves takes one mark away), so a mark never outlives its entries; where
/// the table cannot tell entries apart it errs towards fewer marks (an extra
/// run), never towards more (an entry dropped as the duplicate of nothing).
#[derive(Debug, Clone, Copy, Default)]
struct KeyState {
    /// One waiting entry with this key is the one to run.
    live: bool,
    /// That entry waits in a retry backoff. Due retries are taken before the
    /// queue, so a front hand-over does not supersede it (it would be taken
    /// first and run the older data): both run.
    live_is_retry: bool,
    /// Waiting entries superseded by a front hand-over: dropped when taken.
    stale: u32,
}

impl KeyState {
    /// One waiting entry with this key left (taken, shed, or never came in).
    fn take_one(&mut self) -> bool {
        if self.live {
            self.live = false;
            self.live_is_retry = false;
            true
        } else {
            self.stale = self.stale.saturating_sub(1);
            false
        }
    }

    fn is_empty(&self) -> bool {
        !self.live && self.stale == 0
    }
}

/// How entries come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Back,
    Front,
    Retry,
}

/// The table's state under its lock.
struct Marks<K> {
    map: Map<K>,
    /// Entries admitted without a key (the key function or `Hash` panicked):
    /// when one leaves, its key cannot be computed again either, and this
    /// count tells it from an entry whose key has changed (which would leave a
    /// mark behind: then the table turns off).
    keyless: usize,
}

impl<K> Default for Marks<K> {
    fn default() -> Self {
        Marks {
            map: Map::default(),
            keyless: 0,
        }
    }
}

impl<K: Eq> Marks<K> {
    /// An entry without a key left; `false` if none was admitted.
    fn keyless_left(&mut self) -> bool {
        match self.keyless.checked_sub(1) {
            Some(n) => {
                self.keyless = n;
                true
            }
            None => false,
        }
    }

    /// One entry with `key` left without running (shed, or never came in).
    fn left(&mut self, key: Hashed<K>) {
        if let Some(state) = self.map.get_mut(&key) {
            // A superseded one first: the one to run stays.
            if state.stale > 0 {
                state.stale -= 1;
            } else {
                state.take_one();
            }
            if state.is_empty() {
                self.map.remove(&key);
            }
        }
    }
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
    marks: Mutex<Marks<K>>,
    dropped: AtomicU64,
    /// A key's `Hash`, `Eq` or `Drop` panicked: every entry is kept.
    broken: AtomicBool,
}

impl<T, K: Hash + Eq> KeyTable<T, K> {
    pub(crate) fn new(key: KeyFn<T, K>) -> Self {
        KeyTable {
            key,
            hasher: RandomState::new(),
            marks: Mutex::new(Marks::default()),
            dropped: AtomicU64::new(0),
            broken: AtomicBool::new(false),
        }
    }

    /// Empties the table (the keys are user values: dropped contained, and
    /// not under the lock).
    fn forget_all(&self) {
        let old = std::mem::take(&mut *self.marks.lock());
        crate::unwind::drop_quietly("dedup keys", old);
    }

    /// Runs `f` on the map (contained; see the type's doc). `None`: it
    /// panicked now or earlier, and the table is off.
    fn with_marks<R>(&self, f: impl FnOnce(&mut Marks<K>) -> R) -> Option<R> {
        if self.broken.load(Ordering::Acquire) {
            crate::unwind::drop_quietly("dedup keys", f); // it holds keys
            return None;
        }
        let result = catch(|| {
            let mut marks = self.marks.lock();
            f(&mut marks)
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

    /// Keys with entries in the engine.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.marks.lock().map.len()
    }

    /// Admits entries coming in `way`: which to keep.
    fn admit_as(&self, entries: &[T], way: Way) -> Vec<bool> {
        if self.broken.load(Ordering::Acquire) {
            return vec![true; entries.len()];
        }
        let keys = self.keys(entries);
        let keep = self.with_marks(|marks| {
            keys.into_iter()
                .map(|key| {
                    let Some(key) = key else {
                        marks.keyless += 1;
                        return true;
                    };
                    let state = marks.map.entry(key).or_default();
                    match (state.live, way) {
                        (false, _) => {
                            state.live = true;
                            state.live_is_retry = way == Way::Retry;
                            true
                        }
                        // Taken first, then the waiting one (dropped).
                        (true, Way::Front) if !state.live_is_retry => {
                            state.stale += 1;
                            true
                        }
                        // The retry would be taken first: no mark, both run.
                        (true, Way::Front) => true,
                        (true, Way::Back | Way::Retry) => false,
                    }
                })
                .collect()
        });
        keep.unwrap_or_else(|| vec![true; entries.len()])
    }

    /// Entries leaving without running (`left`, `undo`).
    fn leaving(&self, entries: &[T]) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        let keys = self.keys(entries);
        let lost = self.with_marks(|marks| {
            let mut lost = false;
            for key in keys {
                match key {
                    Some(key) => marks.left(key),
                    None => lost |= !marks.keyless_left(),
                }
            }
            lost
        });
        if lost == Some(true) {
            self.break_down("a dedup key could not be computed again as its entry left");
        }
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
        self.admit_as(entries, if front { Way::Front } else { Way::Back })
    }

    fn admit_retries(&self, entries: &[T]) -> Vec<bool> {
        self.admit_as(entries, Way::Retry)
    }

    fn taken(&self, entries: &[T]) -> Vec<bool> {
        if self.broken.load(Ordering::Acquire) {
            return vec![true; entries.len()];
        }
        let keys = self.keys(entries);
        let run = self.with_marks(|marks| {
            let mut lost = false;
            let run: Vec<bool> = keys
                .into_iter()
                .map(|key| {
                    let Some(key) = key else {
                        lost |= !marks.keyless_left();
                        return true;
                    };
                    let Some(state) = marks.map.get_mut(&key) else {
                        return true; // came in with no mark (see `KeyState`)
                    };
                    let run = state.live || state.stale == 0;
                    state.take_one();
                    if state.is_empty() {
                        marks.map.remove(&key);
                    }
                    run
                })
                .collect();
            (run, lost)
        });
        match run {
            Some((run, false)) => run,
            Some((_, true)) => {
                self.break_down("a dedup key could not be computed again as its entry left");
                vec![true; entries.len()]
            }
            None => vec![true; entries.len()],
        }
    }

    fn left(&self, entries: &[T]) {
        self.leaving(entries);
    }

    fn undo(&self, entries: &[T]) {
        self.leaving(entries);
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
