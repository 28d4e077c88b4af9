//! Key de-duplication: an entry whose key is already waiting is not queued
//! again.
//!
//! The table holds the keys *marked* waiting. It cannot tell two entries with
//! one key apart (entries are the user's values, kept as they are), so it only
//! counts: a key is marked when an entry comes in with nothing marked (a
//! hand-over only once it is admitted), and unmarked when any entry with that
//! key leaves the waiting set (a worker takes it, it overflows or is shed).
//! Hence the
//! invariant, which every rule below keeps: **a key is marked only while at
//! least one entry with it waits**. A mark never outlives its entries, so no
//! entry is ever dropped as the duplicate of nothing; where the table cannot
//! know, it errs towards an extra run.
//!
//! - a back hand-over (or a retry, or `init`) whose key is marked is a
//!   duplicate: dropped at once, counted and reported;
//! - a front hand-over is never dropped: it is urgent, goes to the front and
//!   runs first, marking its key if nothing is marked; a waiting twin still
//!   runs later (the table cannot tell which of two entries is the older);
//! - a new entry handed over while one with its key *runs* is queued again
//!   (the running one may have read old data).
//!
//! Keys are computed by the user's function outside every lock (it is user
//! code, contained), and hashed there too, with std's SipHash keyed at random
//! per table: keys often come from outside (a crawler's URLs), and a faster
//! hash whose collisions can be chosen would let them turn every lookup into a
//! list walk. Then the table's own lock, a leaf that nothing else is held
//! under, is taken once per call (a hand-over takes it under the callers'
//! lock, to mark only once admitted); under it the set only compares (the hash
//! first, the key's `Eq` where the hashes match). Keys leave the set, and the
//! ones not taken into it are dropped, outside the locks.

use crate::unwind::catch;
use parking_lot::Mutex;
use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What the store asks of a key table (the key type is hidden behind it).
pub(crate) trait Table<T>: Send + Sync {
    /// Entries coming in another way than a hand-over (`init`, a run's
    /// retries): which to keep (`false`: a duplicate, dropped).
    fn admit(&self, entries: &[T], front: bool) -> Vec<bool>;
    /// A hand-over's keys, computed now (outside every lock: user code), to
    /// be marked once the hand-over is admitted (under the callers' lock, so
    /// that no other hand-over sees the marks of one that is then refused).
    fn prepare<'a>(&'a self, entries: &[T]) -> Box<dyn Prepared + 'a>;
    /// These entries left the waiting set: a worker took them, or they
    /// overflowed or were shed.
    fn left(&self, entries: &[T]);
    /// The engine stopped: every key is forgotten.
    fn clear(&self);
    /// Counts `n` entries dropped as duplicates (counted by the store as it
    /// reports them, with the handler called right after).
    fn count_dropped(&self, n: usize);
    /// Entries dropped as duplicates so far.
    fn dropped(&self) -> u64;
}

/// Keys computed by [`Table::prepare`]. The keys that were not marked stay in
/// it: drop it (contained) once the engine's locks are released, since a key
/// is a user value whose `Drop` is user code.
pub(crate) trait Prepared {
    /// Marks the keys: which entries to keep (`false`: a duplicate).
    fn mark(&mut self, front: bool) -> Vec<bool>;
}

/// Called to get an entry's key.
pub(crate) type KeyFn<T, K> = Box<dyn Fn(&T) -> K + Send + Sync>;

/// The table's state under its lock.
struct Marks<K> {
    /// The keys marked waiting.
    set: Set<K>,
    /// Entries admitted without a key (the key function or `Hash` panicked):
    /// when one leaves, its key cannot be computed again either, and this
    /// count tells it from an entry whose key has changed since it came in
    /// (whose mark would then stay: the table turns off instead).
    keyless: usize,
}

impl<K> Default for Marks<K> {
    fn default() -> Self {
        Marks {
            set: Set::default(),
            keyless: 0,
        }
    }
}

impl<K> Marks<K> {
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

/// A hand-over's keys, waiting to be marked (`None`: the table is off), then
/// the ones that were not (to be dropped outside the locks).
struct PreparedKeys<'a, T, K> {
    table: &'a KeyTable<T, K>,
    n: usize,
    keys: Option<Vec<Option<Hashed<K>>>>,
    left_over: Vec<Hashed<K>>,
}

impl<T, K: Hash + Eq> Prepared for PreparedKeys<'_, T, K> {
    fn mark(&mut self, front: bool) -> Vec<bool> {
        match self.keys.take() {
            Some(keys) => {
                let (keep, left_over) = self.table.mark_keys(keys, front);
                self.left_over = left_over;
                keep
            }
            None => vec![true; self.n],
        }
    }
}

/// The set's hasher: the hash is already there.
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

type Set<K> = HashSet<Hashed<K>, BuildHasherDefault<Ready>>;

/// The table for keys of type `K`.
///
/// The key function and the key type's `Hash` run outside the locks, and so
/// do the keys' drops (but for a table that breaks down: below); its `Eq`
/// runs under the table's lock, and for a hand-over under the callers' lock
/// too (it must not call into the engine). All are user code, so they run
/// contained. A key that cannot be computed
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

    /// Runs `f` on the marks (contained; see the type's doc). `None`: it
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
        self.marks.lock().set.len()
    }

    /// Marks `keys` (of entries coming in): which entries to keep.
    /// Which entries to keep, and the keys not taken into the set (the
    /// caller drops them once the locks are released).
    fn mark_keys(&self, keys: Vec<Option<Hashed<K>>>, front: bool) -> (Vec<bool>, Vec<Hashed<K>>) {
        let n = keys.len();
        let marked = self.with_marks(|marks| {
            let mut left_over = Vec::new();
            let keep = keys
                .into_iter()
                .map(|key| match key {
                    None => {
                        marks.keyless += 1;
                        true
                    }
                    Some(key) if !marks.set.contains(&key) => marks.set.insert(key),
                    Some(key) => {
                        left_over.push(key);
                        front // see the module doc
                    }
                })
                .collect();
            (keep, left_over)
        });
        marked.unwrap_or_else(|| (vec![true; n], Vec::new()))
    }

    /// Entries leaving the waiting set: their keys are unmarked.
    fn leaving(&self, entries: &[T]) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        let keys = self.keys(entries);
        let left = self.with_marks(|marks| {
            let mut lost = false;
            let mut removed = Vec::with_capacity(keys.len());
            for key in keys {
                match key {
                    Some(key) => {
                        removed.extend(marks.set.take(&key));
                        removed.push(key);
                    }
                    None => lost |= !marks.keyless_left(),
                }
            }
            (lost, removed)
        });
        if let Some((lost, removed)) = left {
            crate::unwind::drop_quietly("dedup keys", removed); // outside the lock
            if lost {
                self.break_down("a dedup key could not be computed again as its entry left");
            }
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
        if self.broken.load(Ordering::Acquire) {
            return vec![true; entries.len()];
        }
        let (keep, left_over) = self.mark_keys(self.keys(entries), front);
        crate::unwind::drop_quietly("dedup keys", left_over); // outside the lock
        keep
    }

    fn prepare<'a>(&'a self, entries: &[T]) -> Box<dyn Prepared + 'a> {
        let keys = if self.broken.load(Ordering::Acquire) {
            None
        } else {
            Some(self.keys(entries))
        };
        Box::new(PreparedKeys {
            table: self,
            n: entries.len(),
            keys,
            left_over: Vec::new(),
        })
    }

    fn left(&self, entries: &[T]) {
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
        t.left(&[(1, "a"), (2, "b")]); // taken
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn while_one_runs_another_is_queued_again() {
        let t = table();
        t.admit(&[(1, "a")], false);
        t.left(&[(1, "a")]); // taken: runs now
        assert_eq!(t.admit(&[(1, "b")], false), vec![true]); // queued again
    }

    #[test]
    fn a_front_duplicate_is_kept_and_no_mark_outlives_the_entries() {
        let t = table();
        t.admit(&[(1, "old")], false);
        assert_eq!(t.admit(&[(1, "new")], true), vec![true]);
        t.left(&[(1, "new")]); // taken first: the key is unmarked
                               // "old" still waits unmarked: a back twin is kept (an extra run, never
                               // a drop against nothing).
        assert_eq!(t.admit(&[(1, "again")], false), vec![true]);
        t.left(&[(1, "old")]);
        t.left(&[(1, "again")]);
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
