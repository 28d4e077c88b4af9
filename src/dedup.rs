//! Key de-duplication: an entry whose key is already waiting is not queued
//! again, and a front entry takes the place of a waiting twin.
//!
//! Entries are the user's values, kept as they are: the table cannot tell two
//! entries with one key apart, so it keeps, per key, a *record*: how many
//! entries with the key it counts as waiting, and whether a run is **owed**
//! (some entry with the key came in after the last run of it began). Counted
//! as waiting: every entry marked here that has not yet been recorded as
//! leaving: buffered, queued, retrying, just taken out by a worker or as
//! overflow, and also marked before the store has it (a run's retries and new
//! entries, an `init` chunk, on their way in). The contract that follows:
//!
//! - **Every entry runs, or is dropped as the duplicate of a run of its key
//!   that begins after it came in**, or shares the fate of the twin it waited
//!   behind (that twin overflowed, was shed, was handed back by a shutdown or
//!   after an internal failure, or its run failed for good). No entry is
//!   dropped as the duplicate of nothing, or of a run that had already begun.
//! - A back hand-over (or an `init` entry, or a retry under an enforced
//!   bound) whose key is owed is dropped at once, where the table is sure a
//!   twin still waits (see *Unsettled entries*; where it is not, the entry is
//!   kept, and dropped if a worker reaches it after a twin's run has begun).
//!   A buffered twin counts as waiting: if a bounded queue refuses it at the
//!   flush, the entries dropped against it share its fate.
//! - A front hand-over is never dropped at once. It goes to the front, so it is
//!   usually the first of its twins to reach a worker: the waiting entry's work
//!   **moves to the front**. Of twins that wait together, the first a worker
//!   takes runs; the others are dropped as its duplicates when a worker takes
//!   them (counted and reported then).
//! - A new entry handed over while one with its key *runs* is kept: the run
//!   may have read old data, so the key is owed again.
//!
//! **When a run begins.** A worker records its batch here before it calls
//! `run` (the keys are user code, so after the store's lock): a run begins
//! after every arrival recorded before it, and so covers them.
//!
//! **Unsettled entries.** Some entries are counted as waiting here while they
//! may not be, or soon not be: entries taken out as overflow under the store's
//! lock and recorded after it, and entries marked before a bound has decided
//! whether to take them (a run's new entries, an `init` chunk, a push on its
//! way straight into a bounded queue). The store counts them unsettled until
//! the bound has looked (before any handler runs) or the table has recorded
//! them (see [`Unsettled`]), and a back hand-over whose key is owed is
//! dropped at once only while no one else's are. A failed run's own entries
//! go back whatever the bound: they are marked before its new ones, and,
//! unless the bound is enforced (a buffered twin may yet be refused at the
//! flush), as front entries, never dropped at once. A batch a failed worker
//! gives back comes back as a front hand-over. While keyless entries wait,
//! every entry a worker takes runs: one of them may be an entry that came in
//! without a key, whose arrival never marked its key owed.
//!
//! Keys are computed by the user's function outside every lock (it is user
//! code, contained), and hashed there too, with std's SipHash keyed at random
//! per table: keys often come from outside (a crawler's URLs), and a faster
//! hash whose collisions can be chosen would let them turn every lookup into a
//! list walk. Then the table's own lock, a leaf that nothing else is held
//! under, is taken once per call (a hand-over takes it under the callers'
//! lock, to mark only once admitted); under it the set only compares (the hash
//! first, the key's `Eq` where the hashes match: a panic in it is caught
//! there). The keys stay with their callers while the lock is held; keys
//! leave the set, and the ones not taken into it are dropped, outside the
//! locks (for a hand-over, outside the callers' lock too).

use crate::unwind::catch;
use parking_lot::Mutex;
use std::cell::{Cell, RefCell};
use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

/// What the store asks of a key table (the key type is hidden behind it).
pub(crate) trait Table<T>: Send + Sync {
    /// Entries coming in another way than a hand-over (`init`, a run's
    /// retries, a batch a failed worker gives back): which to keep (`false`:
    /// a duplicate, dropped).
    fn admit(&self, entries: &[T], front: bool, own: usize) -> Vec<bool>;
    /// A hand-over's keys, computed now (outside every lock: user code), to
    /// be marked once the hand-over is admitted (under the callers' lock, so
    /// that no other hand-over sees the marks of one that is then refused).
    fn prepare<'a>(&'a self, entries: &[T]) -> Box<dyn Prepared + 'a>;
    /// A worker took these entries, and will run them once this returns:
    /// which to run (`None`: all of them; `false`: a duplicate, covered by a
    /// run recorded after it came in; never while keyless entries wait).
    fn taken(&self, entries: &[T]) -> Option<Vec<bool>>;
    /// These entries left the waiting set unrun (they overflowed or were
    /// shed), held unsettled by the store meanwhile ([`Unsettled::hold`]).
    fn left(&self, entries: &[T]);
    /// The engine stopped: every key is forgotten, and the table is off.
    fn clear(&self);
    /// Counts `n` entries dropped as duplicates (counted by the store as it
    /// reports them, with the handler called right after).
    fn count_dropped(&self, n: usize);
    /// Entries dropped as duplicates so far.
    fn dropped(&self) -> u64;
    /// Where the store counts entries leaving the waiting set.
    fn unsettled(&self) -> Arc<Unsettled>;
    /// The engine's name, for log lines.
    fn set_name(&mut self, name: &str);
}

/// Keys computed by [`Table::prepare`]. The keys that were not taken into the
/// table stay in it: drop it (contained) once the engine's locks are
/// released, since a key is a user value whose `Drop` is user code.
pub(crate) trait Prepared {
    /// Marks the keys: which entries to keep (`false`: a duplicate).
    fn mark(&mut self, front: bool, own: usize) -> Vec<bool>;
}

/// Called to get an entry's key.
pub(crate) type KeyFn<T, K> = Box<dyn Fn(&T) -> K + Send + Sync>;

/// Entries whose place in the waiting set the table cannot trust yet,
/// counted by the store (the only atomic of key de-duplication, shared by the
/// store and the table): entries marked in the table that may still be
/// refused (a run's new entries before the bound has looked at them, an
/// `init` chunk or a push before a bounded queue has taken it), and entries
/// taken out as overflow whose departure the table has not recorded yet.
///
/// The invariant: the store [`holds`](Unsettled::hold) them before any other
/// caller could mark against them (before marking them, or under the lock
/// that takes them out), and [`releases`](Unsettled::release) them once they
/// are settled (before any handler runs): admitted, or, if refused, held
/// again as overflow first (`State::count_overflow`), which the table
/// releases as it records them. So a caller, under the table's lock, never
/// sees such an entry counted as waiting without seeing the count above its
/// own holds (a caller's own do not count against its own marks); it then
/// keeps its entry rather than drop it. (`SeqCst`: the argument is about one
/// order of all these steps.)
pub(crate) struct Unsettled {
    count: AtomicUsize,
}

impl Unsettled {
    fn new() -> Self {
        Unsettled {
            count: AtomicUsize::new(0),
        }
    }

    /// `n` entries are not settled from now on.
    pub(crate) fn hold(&self, n: usize) {
        if n > 0 {
            self.count.fetch_add(n, SeqCst);
        }
    }

    /// `n` held entries are settled.
    pub(crate) fn release(&self, n: usize) {
        if n > 0 {
            let _ = self
                .count
                .fetch_update(SeqCst, SeqCst, |f| Some(f.saturating_sub(n)));
        }
    }

    /// Whether entries other than a caller's `own` are unsettled (under the
    /// table's lock).
    fn beyond(&self, own: usize) -> bool {
        self.count.load(SeqCst) > own
    }
}

/// A key's record (see the module doc), in 32 bits so that it fits beside a
/// 32-bit hash in what would be a `u64` key's padding: how many entries with
/// the key are in the waiting set (at least one while the record is in the
/// table), and whether a run is owed (an entry with the key came in after
/// the last run of it was recorded, and so began).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record(u32);

impl Record {
    const OWED: u32 = 1 << 31;

    /// A key's first entry: one waits, a run is owed.
    fn first() -> Self {
        Record(1 | Self::OWED)
    }

    /// `None`: more entries than the record can count.
    fn new(n: u32, owed: bool) -> Option<Self> {
        (n < Self::OWED).then_some(Record(n | if owed { Self::OWED } else { 0 }))
    }

    fn n(self) -> u32 {
        self.0 & !Self::OWED
    }

    fn owed(self) -> bool {
        self.0 & Self::OWED != 0
    }
}

/// The table's state under its lock.
struct Marks<K> {
    set: Set<K>,
    /// Entries admitted without a key (the key function or `Hash` panicked).
    /// When an entry's key cannot be computed as it leaves, it is taken for
    /// one of them; if none is left, the table turns off (its counts can no
    /// longer be trusted).
    keyless: usize,
    /// An entry left without a key (taken for one of the keyless ones) while
    /// keys were recorded: it may have come in *with* a key (a key function
    /// that panics only now and then), whose record then stays behind,
    /// counting an entry that has gone. So from then on no back hand-over is
    /// dropped as it comes in: twins are dropped only as workers reach them,
    /// which never needs the counts to be right.
    suspect: bool,
}

impl<K> Default for Marks<K> {
    fn default() -> Self {
        Marks {
            set: Set::default(),
            keyless: 0,
            suspect: false,
        }
    }
}

impl<K: Hash + Eq> Marks<K> {
    /// An entry with `key` leaves, as `how` says: its record is updated (the
    /// keys it no longer needs go to `removed`, to be dropped outside the
    /// lock). `None`: the key has no record. Otherwise whether it runs (a
    /// taken entry that is not owed, with no keyless entry waiting before
    /// this batch, is a duplicate).
    fn leave(
        &mut self,
        key: &Hashed<K>,
        how: Leaving,
        keyless_waited: bool,
        removed: &mut Vec<Hashed<K>>,
    ) -> Option<bool> {
        // Taken out, and put back if entries with the key still wait (rare:
        // twins), so the common case probes once.
        let known = self.set.take(key)?;
        let r = known.record.get();
        let mut owed = r.owed();
        let mut runs = true;
        if how == Leaving::Taken {
            if owed {
                owed = false; // this run covers every arrival so far
            } else if !keyless_waited {
                runs = false;
            }
            // (Not owed but keyless entries waited: it may be one that came
            // in without a key, whose arrival never marked the key owed, so
            // no run is known to cover it. It runs.)
        }
        match Record::new(r.n().saturating_sub(1), owed) {
            Some(r) if r.n() > 0 => {
                known.record.set(r);
                self.set.insert(known);
            }
            _ => removed.push(known),
        }
        Some(runs)
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

/// A key with its hash, computed outside the table's lock, and, once it is
/// in the table, its record. The record is changed in place under the
/// table's lock (a `Cell`: the set gives no `&mut` to its elements); the
/// hash and `Eq` never look at it. 16 bytes for a `u64` key.
struct Hashed<K> {
    hash: u32,
    record: Cell<Record>,
    key: K,
}

impl<K: Eq> PartialEq for Hashed<K> {
    /// The key's `Eq` is user code, run under the table's lock: a panic in it
    /// is caught here, so it never unwinds through the set (which would drop
    /// keys, user values, under the lock). It reads as "not equal", and the
    /// table breaks down once the operation is over (see `EQ_PANICKED`).
    fn eq(&self, other: &Self) -> bool {
        if self.hash != other.hash {
            return false;
        }
        catch(|| self.key == other.key).unwrap_or_else(|msg| {
            EQ_PANICKED.with(|p| *p.borrow_mut() = Some(msg));
            false
        })
    }
}

/// Logs the line of a table that broke down on this thread, if any (the
/// logger is user code: called where no lock is held).
pub(crate) fn log_break_down() {
    if let Some(line) = BROKE.with(|b| b.borrow_mut().take()) {
        log::error!("{line}");
    }
}

thread_local! {
    /// The line of a table that broke down on this thread, not yet logged.
    static BROKE: RefCell<Option<String>> = const { RefCell::new(None) };
    /// A key's `Eq` panicked on this thread, with this message, since the
    /// table last looked (it looks after each critical section).
    static EQ_PANICKED: RefCell<Option<String>> = const { RefCell::new(None) };
}

impl<K: Eq> Eq for Hashed<K> {}

impl<K> Hash for Hashed<K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The table takes its bucket from the low bits and a tag from the
        // top seven: both come from the 32 bits kept.
        let h = u64::from(self.hash);
        state.write_u64(h << 32 | h);
    }
}

/// A hand-over's keys, waiting to be marked (`None`: the table is off); once
/// marked, the keys not taken into the table, and the table's old marks if it
/// broke down meanwhile. All are user values, dropped with this once the
/// callers' lock is released.
struct PreparedKeys<'a, T, K> {
    table: &'a KeyTable<T, K>,
    n: usize,
    keys: Option<Vec<Option<Hashed<K>>>>,
    trash: Option<Marks<K>>,
}

impl<T, K> Drop for PreparedKeys<'_, T, K> {
    /// Dropped once the callers' lock is released.
    fn drop(&mut self) {
        log_break_down();
    }
}

impl<T, K: Hash + Eq> Prepared for PreparedKeys<'_, T, K> {
    fn mark(&mut self, front: bool, own: usize) -> Vec<bool> {
        match &mut self.keys {
            Some(keys) => self.table.mark_keys(keys, front, own, &mut self.trash),
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

/// How an entry leaves the waiting set.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leaving {
    /// A worker took it: its run begins once it is recorded.
    Taken,
    /// It overflowed or was shed (counted unsettled until recorded).
    Unrun,
}

/// The table for keys of type `K`.
///
/// The key function and the key type's `Hash` run outside the locks, and so
/// do the keys' drops; its `Eq` runs under the table's lock, and for a
/// hand-over under the callers' lock too (it must not call into the engine).
/// All are user code, so they run contained (a panic in `Eq` is caught
/// where it is called: the panic hook, and the drop of its payload, run
/// there too, under the locks). The key function may be called more than
/// once for an entry (as it comes in and as it leaves, and again for each
/// entry of a batch in which it panicked), and must give the same answer
/// each time (the same key, or a panic every time): the table cannot tell a
/// key that changed into another waiting key (it takes that key's record,
/// and leaves its own behind) until a record is found missing, and the
/// wary mode below is a best effort for panics that come and go. A key that cannot be computed on the way in keeps its
/// entry, as if it had no duplicate; one that cannot be computed as its
/// entry leaves is taken for a keyless one, and makes the table wary (see
/// `Marks::suspect`). What is seen to leave the table wrong (a panic in
/// `Eq`, a key that cannot be computed as its entry leaves with no keyless
/// entry waiting, a record found missing) empties it, and de-duplication is
/// off for the rest of the engine's life (logged at error level, once the
/// locks are released). Entries are then all kept: none is lost, at worst
/// one runs twice.
pub(crate) struct KeyTable<T, K> {
    /// The engine's name, for log lines.
    name: String,
    key: KeyFn<T, K>,
    hasher: RandomState,
    marks: Mutex<Marks<K>>,
    unsettled: Arc<Unsettled>,
    dropped: AtomicU64,
    /// A key's `Eq` panicked, or the counts went wrong: every entry is kept.
    broken: AtomicBool,
    /// The engine stopped: every entry is kept (there are no more runs).
    closed: AtomicBool,
}

impl<T, K: Hash + Eq> KeyTable<T, K> {
    pub(crate) fn new(key: KeyFn<T, K>) -> Self {
        KeyTable {
            name: String::new(),
            key,
            hasher: RandomState::new(),
            marks: Mutex::new(Marks::default()),
            unsettled: Arc::new(Unsettled::new()),
            dropped: AtomicU64::new(0),
            broken: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    /// The table keeps every entry and records nothing.
    fn off(&self) -> bool {
        self.broken.load(SeqCst) || self.closed.load(SeqCst)
    }

    /// Runs `f` on the marks, under the table's lock. `f` owns no keys: the
    /// callers keep them, so nothing of the user's is dropped under the lock.
    /// `None`: the table is off, or it broke down now (a key's `Eq` panicked,
    /// or, never expected, `f` did), and its marks are in `trash`, for the
    /// caller to drop where no lock is held.
    fn with_marks<R>(
        &self,
        trash: &mut Option<Marks<K>>,
        f: impl FnOnce(&mut Marks<K>) -> R,
    ) -> Option<R> {
        if self.off() {
            return None;
        }
        let result = catch(|| {
            let mut marks = self.marks.lock();
            f(&mut marks)
        });
        let eq_panicked = EQ_PANICKED.with(|p| p.borrow_mut().take());
        let why = match (result, eq_panicked) {
            (Ok(r), None) => return Some(r),
            (_, Some(msg)) => format!("a dedup key's Eq panicked: {msg}"),
            (Err(msg), None) => format!("the dedup table failed: {msg}"),
        };
        *trash = self.break_down(&why);
        None
    }

    /// The table cannot be trusted any more: every entry is kept from now on.
    /// Returns its marks, for the caller to drop where no lock is held.
    fn break_down(&self, why: &str) -> Option<Marks<K>> {
        if !self.broken.swap(true, SeqCst) {
            let line = format!("{}: {why}; de-duplication is off from now on", self.name);
            BROKE.with(|b| *b.borrow_mut() = Some(line));
        }
        Some(std::mem::take(&mut *self.marks.lock()))
    }

    /// Keys with entries in the engine.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.marks.lock().set.len()
    }

    /// Marks the keys of entries coming in: which entries to keep. The keys
    /// taken into the table are taken out of `keys`; the rest stay there, for
    /// the caller to drop once its locks are released (and so does `trash`).
    /// See the module doc for the rules.
    fn mark_keys(
        &self,
        keys: &mut [Option<Hashed<K>>],
        front: bool,
        own: usize,
        trash: &mut Option<Marks<K>>,
    ) -> Vec<bool> {
        let n = keys.len();
        let marked = self.with_marks(trash, |marks| {
            // Others' unsettled entries, not this call's own.
            let unsettled = self.unsettled.beyond(own);
            let mut overfull = false;
            let keep = keys
                .iter_mut()
                .map(|slot| {
                    let Some(key) = slot else {
                        marks.keyless += 1;
                        return true;
                    };
                    let Some(known) = marks.set.get(key) else {
                        key.record.set(Record::first());
                        // `replace`, not `insert`: an element the set finds
                        // equal now (an `Eq` that panicked a moment ago) goes
                        // back to the caller, never dropped under the lock.
                        if let Some(k) = slot.take() {
                            *slot = marks.set.replace(k);
                        }
                        return true;
                    };
                    let r = known.record.get();
                    let keep = front || unsettled || marks.suspect || !r.owed();
                    if keep {
                        match Record::new(r.n() + 1, true) {
                            Some(r) => known.record.set(r),
                            None => overfull = true,
                        }
                    }
                    keep
                })
                .collect();
            (keep, overfull)
        });
        match marked {
            Some((keep, false)) => keep,
            Some((_, true)) => {
                *trash = self.break_down("a dedup key has 2^31 entries waiting");
                vec![true; n]
            }
            None => vec![true; n],
        }
    }

    /// Entries leaving the waiting set: their records are updated; for a
    /// worker's, which of them to run (see the module doc).
    fn leaving(&self, entries: &[T], how: Leaving) -> Option<Vec<bool>> {
        let n = entries.len();
        let unrun = if how == Leaving::Unrun { n } else { 0 };
        if self.off() {
            self.unsettled.release(unrun);
            return None;
        }
        let mut keys = self.keys(entries);
        let mut removed = Vec::new();
        let mut trash = None;
        let left = self.with_marks(&mut trash, |marks| {
            let mut lost = false;
            let was_suspect = marks.suspect;
            // Read before this batch: an entry of it that leaves without a key
            // may take that count.
            let keyless_waited = marks.keyless > 0;
            let mut run: Option<Vec<bool>> = None;
            for (i, slot) in keys.iter_mut().enumerate() {
                let Some(key) = slot else {
                    match marks.keyless_left() {
                        // With no record in the table, none can be stale.
                        true => marks.suspect |= !marks.set.is_empty(),
                        false => lost = true,
                    }
                    continue;
                };
                match marks.leave(key, how, keyless_waited, &mut removed) {
                    None => lost = true, // its key changed, or a record was lost
                    Some(false) => run.get_or_insert_with(|| vec![true; n])[i] = false,
                    Some(true) => {}
                }
            }
            (lost, run, marks.suspect && !was_suspect)
        });
        // After the records (whether or not the table was still on when its
        // lock was taken: `clear` may have run while the keys were computed).
        self.unsettled.release(unrun);
        // Outside the lock: the keys are user values.
        crate::unwind::drop_quietly("dedup keys", (keys, removed, trash));
        log_break_down();
        let (lost, run, suspect) = left?;
        if suspect {
            log::warn!(
                "{}: an entry left without a dedup key while other keys were recorded: \
                 duplicates are dropped only as workers reach them from now on",
                self.name
            );
        }
        if lost {
            let old = self.break_down("a dedup key could not be computed again as its entry left");
            crate::unwind::drop_quietly("dedup keys", old);
            log_break_down();
            return None;
        }
        run
    }

    /// The entries' keys, hashed (`None` where the key function or the key's
    /// `Hash` panicked: on the way in, such an entry is kept, as if it had no
    /// duplicate). One `catch` for the whole call; only after a panic is each
    /// entry tried on its own (so the key function may be called twice for
    /// an entry).
    fn keys(&self, entries: &[T]) -> Vec<Option<Hashed<K>>> {
        let one = |e: &T| {
            let key = (self.key)(e);
            Hashed {
                hash: self.hasher.hash_one(&key) as u32, // see `Hashed`
                record: Cell::new(Record::first()),
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
                        "{}: the dedup key function or the key's Hash panicked (entry kept): {msg}",
                        self.name
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
    fn admit(&self, entries: &[T], front: bool, own: usize) -> Vec<bool> {
        if self.off() {
            return vec![true; entries.len()];
        }
        let mut keys = self.keys(entries);
        let mut trash = None;
        let keep = self.mark_keys(&mut keys, front, own, &mut trash);
        crate::unwind::drop_quietly("dedup keys", (keys, trash)); // outside the lock
        log_break_down();
        keep
    }

    fn prepare<'a>(&'a self, entries: &[T]) -> Box<dyn Prepared + 'a> {
        let keys = if self.off() {
            None
        } else {
            Some(self.keys(entries))
        };
        Box::new(PreparedKeys {
            table: self,
            n: entries.len(),
            keys,
            trash: None,
        })
    }

    fn taken(&self, entries: &[T]) -> Option<Vec<bool>> {
        self.leaving(entries, Leaving::Taken)
    }

    fn left(&self, entries: &[T]) {
        self.leaving(entries, Leaving::Unrun);
    }

    fn clear(&self) {
        self.closed.store(true, SeqCst);
        let old = std::mem::take(&mut *self.marks.lock());
        crate::unwind::drop_quietly("dedup keys", old); // outside the lock
    }

    fn count_dropped(&self, n: usize) {
        self.dropped.fetch_add(n as u64, SeqCst);
    }

    fn dropped(&self) -> u64 {
        self.dropped.load(SeqCst)
    }

    fn unsettled(&self) -> Arc<Unsettled> {
        self.unsettled.clone()
    }

    fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }
}

#[cfg(test)]
mod test {
    use super::*;

    type E = (u32, &'static str);

    fn table() -> KeyTable<E, u32> {
        KeyTable::new(Box::new(|e: &E| e.0))
    }

    /// A worker takes `entries` and records them: which run.
    fn take(t: &KeyTable<E, u32>, entries: &[E]) -> Vec<bool> {
        t.taken(entries)
            .unwrap_or_else(|| vec![true; entries.len()])
    }

    fn unsettled(t: &KeyTable<E, u32>) -> usize {
        t.unsettled.count.load(SeqCst)
    }

    #[test]
    fn a_waiting_key_takes_no_second_entry_from_the_back() {
        let t = table();
        assert_eq!(
            t.admit(&[(1, "a"), (2, "b"), (1, "c")], false, 0),
            vec![true, true, false]
        );
        assert_eq!(t.admit(&[(2, "d")], false, 0), vec![false]);
        assert_eq!(take(&t, &[(1, "a"), (2, "b")]), vec![true, true]);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn while_one_runs_another_is_queued_again() {
        let t = table();
        t.admit(&[(1, "a")], false, 0);
        assert_eq!(take(&t, &[(1, "a")]), vec![true]); // runs now
        assert_eq!(t.admit(&[(1, "b")], false, 0), vec![true]); // queued again
        assert_eq!(take(&t, &[(1, "b")]), vec![true]);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn a_front_twin_takes_the_place_of_the_waiting_one() {
        let t = table();
        t.admit(&[(1, "old")], false, 0);
        assert_eq!(t.admit(&[(1, "new")], true, 0), vec![true]);
        assert_eq!(take(&t, &[(1, "new")]), vec![true]); // at the front: runs
        assert_eq!(take(&t, &[(1, "old")]), vec![false]); // covered by it
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn of_twins_the_first_taken_runs() {
        let t = table();
        t.admit(&[(1, "old")], false, 0);
        t.admit(&[(1, "new")], true, 0);
        assert_eq!(take(&t, &[(1, "old")]), vec![true]);
        assert_eq!(take(&t, &[(1, "new")]), vec![false]);
        // Two in one batch: the first runs.
        t.admit(&[(2, "a")], false, 0);
        t.admit(&[(2, "b")], true, 0);
        assert_eq!(take(&t, &[(2, "b"), (2, "a")]), vec![true, false]);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn an_arrival_after_a_twin_began_is_owed_a_run() {
        let t = table();
        t.admit(&[(1, "a")], false, 0);
        t.admit(&[(1, "f")], true, 0);
        assert_eq!(take(&t, &[(1, "f")]), vec![true]); // "a" still waits
        assert_eq!(t.admit(&[(1, "d")], false, 0), vec![true]); // after f began
        assert_eq!(take(&t, &[(1, "a")]), vec![true]); // covers d
        assert_eq!(take(&t, &[(1, "d")]), vec![false]);
        assert_eq!(t.len(), 0);
    }

    /// A shrink has taken "a" out, not yet recorded: "b" must not be dropped
    /// as its duplicate.
    #[test]
    fn an_arrival_while_a_shed_twin_is_unsettled_is_kept() {
        let t = table();
        t.admit(&[(1, "a"), (2, "x")], false, 0);
        t.unsettled.hold(1);
        assert_eq!(t.admit(&[(1, "b")], false, 0), vec![true]);
        assert_eq!(
            t.admit(&[(2, "y")], false, 0),
            vec![true],
            "kept, to be safe"
        );
        t.left(&[(1, "a")]);
        assert_eq!(unsettled(&t), 0);
        assert_eq!(t.admit(&[(1, "c")], false, 0), vec![false]); // "b" waits
        assert_eq!(take(&t, &[(1, "b")]), vec![true]);
        assert_eq!(take(&t, &[(2, "x"), (2, "y")]), vec![true, false]);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn entries_that_leave_unrun_free_their_key() {
        let t = table();
        t.admit(&[(1, "a"), (2, "b")], false, 0);
        t.unsettled.hold(1);
        t.left(&[(1, "a")]);
        assert_eq!(t.admit(&[(1, "c")], false, 0), vec![true]);
        t.clear();
        assert_eq!(t.len(), 0);
        assert_eq!(t.admit(&[(1, "e"), (1, "f")], false, 0), vec![true, true]);
        assert_eq!(t.len(), 0, "a closed table records nothing");
    }

    #[test]
    fn a_key_that_changes_turns_the_table_off() {
        let flip = Arc::new(AtomicBool::new(false));
        let f = flip.clone();
        let t: KeyTable<E, u32> =
            KeyTable::new(Box::new(move |e: &E| e.0 + u32::from(f.load(SeqCst))));
        t.admit(&[(1, "a"), (1, "b")], false, 0);
        flip.store(true, SeqCst);
        assert_eq!(take(&t, &[(1, "a")]), vec![true]);
        assert!(t.off());
        assert_eq!(t.admit(&[(1, "c"), (1, "d")], false, 0), vec![true, true]);
    }

    /// "d" came in with key 7; its key panics as it leaves, while "a"
    /// (keyless from the start) waits: the table takes "d" for "a", and key
    /// 7's record stays behind. From then on a back twin is kept, not
    /// dropped against that record.
    #[test]
    fn a_keyless_departure_makes_the_table_wary_not_wrong() {
        let flaky = Arc::new(AtomicBool::new(false));
        let f = flaky.clone();
        let t: KeyTable<E, u32> = KeyTable::new(Box::new(move |e: &E| {
            if e.1 == "a" || (e.1 == "d" && f.load(SeqCst)) {
                panic!("deliberate: no key");
            }
            e.0
        }));
        t.admit(&[(7, "d"), (3, "a")], false, 0);
        flaky.store(true, SeqCst);
        assert_eq!(take(&t, &[(7, "d")]), vec![true]);
        assert_eq!(t.admit(&[(7, "e")], false, 0), vec![true]);
        assert_eq!(t.admit(&[(7, "f")], true, 0), vec![true]);
        assert_eq!(take(&t, &[(7, "f"), (7, "e")]), vec![true, false]);
        assert!(!t.off());
    }
}
