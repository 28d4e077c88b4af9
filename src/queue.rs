//! The bounded queue batches are cut from.
//!
//! Entries are kept as a deque of chunks (`Vec<T>`) of at most one batch each, so a
//! chunk that holds exactly a batch's worth of entries leaves as that batch without
//! a copy. Chunks of up to a few batches are kept whole (no copy, no allocator
//! holes); a longer `Vec` is cut into batch-sized chunks once, when it is pushed, so
//! taking a batch never moves a long tail.
//! The queue may carry a maximum length; pushes stop there and hand back what did
//! not fit (the caller decides what overflow means). A shrink sheds the back half
//! and lowers the maximum until `expand` lifts it again.
//!
//! A *sealed* chunk (a retried batch) is taken as a batch of its own: it is never
//! topped up with the entries behind it, nor used to top up the entries ahead.
//!
//! Every chunk belongs to a *generation* (the one in force when it was queued;
//! a retried batch keeps its own). A batch never mixes generations, and the
//! queue counts its entries per generation, so `wait_idle` can tell when every
//! entry older than its call has left.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

/// Most entries allocated ahead for one pile chunk: `max_batch_size` may be huge.
const CHUNK_RESERVE: usize = 1024;

/// Chunks up to this many batches long are queued whole (see `Queue::cut`).
const CUT_AT: usize = 4;

/// The queue holds 0 or 1 entries, so a shrink has nothing to shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MinimumSize;

/// When a chunk entered the queue, whether it is sealed, and its generation.
#[derive(Debug, Clone, Copy)]
struct Meta {
    since: Instant,
    sealed: bool,
    gen: u64,
}

/// A batch taken from the queue.
pub(crate) struct Taken<T> {
    pub(crate) entries: Vec<T>,
    /// When its first chunk was queued (the batch's longest wait).
    pub(crate) since: Instant,
    pub(crate) gen: u64,
}

pub(crate) struct Queue<T> {
    chunks: VecDeque<Vec<T>>,
    /// Parallel to `chunks`.
    meta: VecDeque<Meta>,
    len: usize,
    /// Entries per batch.
    batch: usize,
    /// The bound chosen at build time; `None` is unbounded.
    configured_max: Option<usize>,
    /// The bound in force: the configured one, or a lower one after a shrink.
    max: Option<usize>,
    shrunk: bool,
    /// The generation new chunks get.
    gen: u64,
    /// Entries queued, per generation.
    live: BTreeMap<u64, usize>,
}

impl<T> Queue<T> {
    pub(crate) fn new(max: Option<usize>, batch: usize) -> Self {
        debug_assert!(batch > 0);
        Queue {
            chunks: VecDeque::new(),
            meta: VecDeque::new(),
            len: 0,
            batch,
            configured_max: max,
            max,
            shrunk: false,
            gen: 0,
            live: BTreeMap::new(),
        }
    }

    /// Chunks queued from now on belong to generation `gen`.
    pub(crate) fn set_gen(&mut self, gen: u64) {
        self.gen = gen;
    }

    /// The oldest generation with entries queued.
    pub(crate) fn oldest_gen(&self) -> Option<u64> {
        self.live.keys().next().copied()
    }

    /// Entries queued in generation `gen` or earlier.
    pub(crate) fn count_upto(&self, gen: u64) -> usize {
        self.live.range(..=gen).map(|(_, n)| n).sum()
    }

    fn add_live(&mut self, gen: u64, n: usize) {
        if n > 0 {
            *self.live.entry(gen).or_insert(0) += n;
        }
    }

    fn sub_live(&mut self, gen: u64, n: usize) {
        if let Some(count) = self.live.get_mut(&gen) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                self.live.remove(&gen);
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room left under the bound in force.
    pub(crate) fn room(&self) -> usize {
        match self.max {
            Some(max) => max.saturating_sub(self.len),
            None => usize::MAX,
        }
    }

    /// The bound in force, if any.
    pub(crate) fn max_len(&self) -> Option<usize> {
        self.max
    }

    /// Appends `entries` at the back, as far as the bound allows. Returns what did
    /// not fit (empty when everything went in), in the order it was given.
    pub(crate) fn push_back(&mut self, mut entries: Vec<T>, now: Instant) -> Vec<T> {
        let overflow = self.cut_to_room(&mut entries);
        self.push_back_unbounded(entries, now);
        overflow
    }

    /// Puts `entries` ahead of everything queued, keeping their order, as far as the
    /// bound allows. What does not fit is the tail of `entries`, returned.
    pub(crate) fn push_front(&mut self, mut entries: Vec<T>, now: Instant) -> Vec<T> {
        let overflow = self.cut_to_room(&mut entries);
        self.push_front_unbounded(entries, now);
        overflow
    }

    /// Puts a pile's chunks (in arrival order) ahead of everything queued, keeping
    /// their order, as far as the bound allows; returns what did not fit.
    pub(crate) fn push_front_chunks(&mut self, mut chunks: Vec<Vec<T>>, now: Instant) -> Vec<T> {
        let total = chunks.iter().fold(0usize, |n, c| n.saturating_add(c.len()));
        if chunks.len() == 1 || total > self.room() {
            let all = if chunks.len() == 1 {
                chunks.pop().unwrap_or_default()
            } else {
                chunks.into_iter().flatten().collect()
            };
            return self.push_front(all, now);
        }
        for chunk in chunks.into_iter().rev() {
            self.push_front_unbounded(chunk, now);
        }
        Vec::new()
    }

    /// Puts `entries` at the front, in their order, whatever the bound (entries
    /// admitted earlier, or put back).
    pub(crate) fn push_front_unbounded(&mut self, entries: Vec<T>, now: Instant) {
        if entries.is_empty() {
            return;
        }
        self.len += entries.len();
        self.add_live(self.gen, entries.len());
        let meta = Meta {
            since: now,
            sealed: false,
            gen: self.gen,
        };
        if self.fits_whole(&entries) {
            self.chunks.push_front(trim(entries));
            self.meta.push_front(meta);
            return;
        }
        for chunk in self.cut(entries).into_iter().rev() {
            self.chunks.push_front(chunk);
            self.meta.push_front(meta);
        }
    }

    /// Appends `entries` whatever the bound (entries admitted earlier, or a
    /// batch's own entries retried).
    pub(crate) fn push_back_unbounded(&mut self, entries: Vec<T>, now: Instant) {
        self.append(entries, now, false, self.gen);
    }

    /// Appends a retried batch of generation `gen` whatever the bound, sealed:
    /// it runs as a batch of its own.
    pub(crate) fn push_back_sealed(&mut self, entries: Vec<T>, now: Instant, gen: u64) {
        self.append(entries, now, true, gen);
    }

    fn append(&mut self, entries: Vec<T>, now: Instant, sealed: bool, gen: u64) {
        if entries.is_empty() {
            return;
        }
        self.len += entries.len();
        self.add_live(gen, entries.len());
        let meta = Meta {
            since: now,
            sealed,
            gen,
        };
        if self.fits_whole(&entries) {
            self.chunks.push_back(trim(entries));
            self.meta.push_back(meta);
            return;
        }
        for chunk in self.cut(entries) {
            self.chunks.push_back(chunk);
            self.meta.push_back(meta);
        }
    }

    /// Whether `entries` is queued as one chunk (see `cut`).
    fn fits_whole(&self, entries: &[T]) -> bool {
        entries.len() <= CUT_AT.saturating_mul(self.batch)
    }

    /// Splits a long `entries` into chunks of one batch, in order. A chunk of up to
    /// `CUT_AT` batches stays whole (no copy: taking a batch from it moves at most
    /// that many batches' worth); a longer one is cut once here, so taking batches
    /// never moves a long tail again and again. Spare capacity of more than the
    /// length is given back.
    fn cut(&self, mut entries: Vec<T>) -> Vec<Vec<T>> {
        if entries.is_empty() {
            return Vec::new();
        }
        let mut tail = Vec::new();
        if !self.fits_whole(&entries) {
            while entries.len() > self.batch {
                let at = (entries.len() - 1) / self.batch * self.batch;
                tail.push(entries.split_off(at));
            }
        }
        tail.push(trim(entries));
        tail.reverse();
        tail
    }

    fn cut_to_room(&self, entries: &mut Vec<T>) -> Vec<T> {
        let room = self.room();
        if entries.len() > room {
            entries.split_off(room)
        } else {
            Vec::new()
        }
    }

    /// Takes up to `n` entries (n ≥ 1) from the front, or `None` when empty.
    #[cfg(test)]
    pub(crate) fn pop_batch(&mut self, n: usize) -> Option<Vec<T>> {
        self.take_batch(n).map(|taken| taken.entries)
    }

    /// Takes up to `n` entries (n ≥ 1) from the front, one generation's, or
    /// `None` when empty.
    pub(crate) fn take_batch(&mut self, n: usize) -> Option<Taken<T>> {
        let first = self.chunks.front_mut()?;
        let meta = *self.meta.front().expect("parallel to chunks");
        let entries = if first.len() == n || (meta.sealed && first.len() < n) {
            self.meta.pop_front();
            self.chunks.pop_front().expect("front chunk exists")
        } else if first.len() > n {
            // Copy out the smaller side; the larger one stays where it is.
            if first.len() - n < n {
                let rest = first.split_off(n);
                std::mem::replace(first, rest)
            } else {
                first.drain(..n).collect()
            }
        } else {
            self.meta.pop_front();
            let batch = self.chunks.pop_front().expect("front chunk exists");
            self.top_up(batch, n, meta.gen)
        };
        self.len -= entries.len();
        self.sub_live(meta.gen, entries.len());
        Some(Taken {
            entries,
            since: meta.since,
            gen: meta.gen,
        })
    }

    /// Fills `batch` up to `n` from the chunks that follow, up to a sealed one
    /// or one of another generation.
    fn top_up(&mut self, mut batch: Vec<T>, n: usize, gen: u64) -> Vec<T> {
        // Never more than is queued: `n` may be huge.
        batch.reserve(n.min(self.len) - batch.len());
        while batch.len() < n && self.meta.front().is_some_and(|m| !m.sealed && m.gen == gen) {
            let Some(next) = self.chunks.front_mut() else {
                break;
            };
            let want = n - batch.len();
            if next.len() <= want {
                batch.append(next);
                self.chunks.pop_front();
                self.meta.pop_front();
            } else {
                batch.extend(next.drain(..want));
            }
        }
        batch
    }

    /// Drops entries from the back until half remain (integer division) and makes
    /// that the bound. Returns the shed entries in queue order.
    pub(crate) fn shrink(&mut self) -> Result<Vec<T>, MinimumSize> {
        if self.len <= 1 {
            return Err(MinimumSize);
        }
        let keep = self.len / 2;
        let shed = self.split_back(self.len - keep);
        self.max = Some(keep);
        self.shrunk = true;
        Ok(shed)
    }

    /// Removes the last `count` entries and returns them in queue order.
    fn split_back(&mut self, mut count: usize) -> Vec<T> {
        let mut parts: Vec<Vec<T>> = Vec::new();
        while count > 0 {
            let last = self.chunks.back_mut().expect("count within len");
            let gen = self.meta.back().expect("parallel to chunks").gen;
            let part = if last.len() <= count {
                self.meta.pop_back();
                self.chunks.pop_back().expect("back chunk exists")
            } else {
                let at = last.len() - count;
                last.split_off(at)
            };
            count -= part.len();
            self.len -= part.len();
            self.sub_live(gen, part.len());
            parts.push(part);
        }
        let mut shed = Vec::with_capacity(parts.iter().map(Vec::len).sum());
        for part in parts.into_iter().rev() {
            shed.extend(part);
        }
        shed
    }

    /// Whether a shrink is in force.
    pub(crate) fn is_shrunk(&self) -> bool {
        self.shrunk
    }

    /// Lifts a shrink: the bound goes back to the configured one (or none).
    pub(crate) fn expand(&mut self) {
        self.max = self.configured_max;
        self.shrunk = false;
    }

    /// Takes every entry out, in queue order.
    pub(crate) fn drain_all(&mut self) -> Vec<T> {
        let mut all = Vec::with_capacity(self.len);
        self.meta.clear();
        self.live.clear();
        for chunk in self.chunks.drain(..) {
            all.extend(chunk);
        }
        self.len = 0;
        all
    }

    /// Gives spare memory back (called when the engine goes idle).
    pub(crate) fn release_memory(&mut self) {
        if self.chunks.is_empty() {
            self.chunks = VecDeque::new();
            self.meta = VecDeque::new();
        } else {
            self.chunks.shrink_to_fit();
            self.meta.shrink_to_fit();
        }
    }

    /// When the chunk at the head (the next to run) entered the queue.
    pub(crate) fn head_since(&self) -> Option<Instant> {
        self.meta.front().map(|m| m.since)
    }
}

/// Gives back spare capacity of more than the length.
fn trim<T>(mut entries: Vec<T>) -> Vec<T> {
    if entries.capacity() > 2 * entries.len() {
        entries.shrink_to_fit();
    }
    entries
}

/// Entries waiting in a buffer: chunks of at most one batch where they arrive
/// one at a time, whole `Vec`s (moved, not copied) where they arrive many at once.
pub(crate) struct Pile<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T> Pile<T> {
    pub(crate) const fn new() -> Self {
        Pile {
            chunks: Vec::new(),
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub(crate) fn push_one(&mut self, entry: T, batch: usize) {
        match self.chunks.last_mut() {
            Some(last) if last.len() < batch => last.push(entry),
            _ => {
                let mut chunk = Vec::with_capacity(batch.min(CHUNK_RESERVE));
                chunk.push(entry);
                self.chunks.push(chunk);
            }
        }
        self.len += 1;
    }

    pub(crate) fn push_vec(&mut self, mut entries: Vec<T>, batch: usize) {
        self.len += entries.len();
        match self.chunks.last_mut() {
            // A small call joins a small last chunk, where it fits without growing.
            Some(last)
                if last.len() + entries.len() <= batch
                    && last.len() + entries.len() <= last.capacity() =>
            {
                last.append(&mut entries)
            }
            _ => self.chunks.push(entries),
        }
    }

    /// The chunks, in arrival order, leaving the pile empty.
    pub(crate) fn take(&mut self) -> Vec<Vec<T>> {
        self.len = 0;
        std::mem::take(&mut self.chunks)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn now() -> Instant {
        Instant::now()
    }

    fn q(max: Option<usize>, items: &[u32]) -> Queue<u32> {
        let mut q = Queue::new(max, 100);
        assert!(q.push_back(items.to_vec(), now()).is_empty());
        q
    }

    #[test]
    fn batches_cross_chunks_in_order() {
        let mut q = q(None, &[1, 2, 3]);
        q.push_back(vec![4, 5], now());
        q.push_front(vec![0], now());
        assert_eq!(q.pop_batch(2), Some(vec![0, 1]));
        assert_eq!(q.pop_batch(4), Some(vec![2, 3, 4, 5]));
        assert_eq!(q.pop_batch(4), None);
        assert!(q.is_empty());
    }

    #[test]
    fn bound_hands_back_overflow() {
        let mut q = q(Some(3), &[1, 2]);
        assert_eq!(q.push_back(vec![3, 4, 5], now()), vec![4, 5]);
        assert_eq!(q.push_front(vec![9], now()), vec![9]);
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn long_pushes_are_cut_into_batches_in_order() {
        let mut q = Queue::new(None, 3);
        q.push_back((0..8).collect(), now()); // kept whole
        q.push_back((20..34).collect(), now()); // cut into batches
        q.push_front(vec![10, 11, 12, 13], now());
        assert_eq!(q.chunks.len(), 1 + 1 + 5);
        assert_eq!(q.pop_batch(3), Some(vec![10, 11, 12]));
        assert_eq!(q.pop_batch(3), Some(vec![13, 0, 1]));
        assert_eq!(q.pop_batch(3), Some(vec![2, 3, 4]));
        assert_eq!(q.pop_batch(3), Some(vec![5, 6, 7]));
        let rest: Vec<i32> = std::iter::from_fn(|| q.pop_batch(3)).flatten().collect();
        assert_eq!(rest, (20..34).collect::<Vec<_>>());
        assert!(q.is_empty());
    }

    #[test]
    fn a_sealed_chunk_is_a_batch_of_its_own() {
        let mut q = Queue::new(None, 3);
        q.push_back(vec![1], now());
        q.push_back_sealed(vec![2, 3], now(), 0);
        q.push_back(vec![4], now());
        q.push_back(vec![5, 6], now());
        assert_eq!(q.pop_batch(3), Some(vec![1]));
        assert_eq!(q.pop_batch(3), Some(vec![2, 3]));
        assert_eq!(q.pop_batch(3), Some(vec![4, 5, 6]));
        assert!(q.is_empty());
    }

    #[test]
    fn a_huge_batch_size_allocates_nothing_in_proportion() {
        let mut q = Queue::new(None, usize::MAX);
        q.push_back((0..10).collect(), now());
        q.push_back((10..20).collect(), now());
        let batch = q.pop_batch(usize::MAX).unwrap();
        assert_eq!(batch, (0..20).collect::<Vec<_>>());
        assert!(batch.capacity() < 1000);
        let mut p = Pile::new();
        p.push_one(1u64, usize::MAX);
        assert!(p.take()[0].capacity() <= CHUNK_RESERVE);
    }

    #[test]
    fn piles_keep_order_and_count() {
        let mut p = Pile::new();
        p.push_one(1, 2);
        p.push_one(2, 2);
        p.push_one(3, 2);
        p.push_vec(vec![4, 5, 6], 2);
        p.push_vec(vec![7], 2);
        assert_eq!(p.len(), 7);
        let all: Vec<i32> = p.take().into_iter().flatten().collect();
        assert_eq!(all, vec![1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn shrink_halves_and_bounds() {
        let mut q = q(None, &[1, 2, 3]);
        q.push_back(vec![4, 5], now());
        assert_eq!(q.shrink(), Ok(vec![3, 4, 5]));
        assert_eq!(q.len(), 2);
        assert_eq!(q.max_len(), Some(2));
        assert!(q.is_shrunk());
        assert_eq!(q.shrink(), Ok(vec![2]));
        assert_eq!(q.shrink(), Err(MinimumSize));
        q.expand();
        assert_eq!(q.max_len(), None);
        assert!(!q.is_shrunk());
    }
}

#[cfg(test)]
mod model {
    //! Property tests: the chunked queue behaves like a plain `VecDeque` with a
    //! maximum, whatever the sequence of operations.
    use super::*;
    use proptest::prelude::*;

    fn now() -> Instant {
        Instant::now()
    }

    #[derive(Debug, Clone)]
    enum Op {
        PushBack(Vec<u16>),
        PushFront(Vec<u16>),
        PushFrontChunks(Vec<Vec<u16>>),
        Pop,
        Shrink,
        Expand,
        DrainAll,
    }

    fn op() -> impl Strategy<Value = Op> {
        let entries = || proptest::collection::vec(any::<u16>(), 0..40);
        prop_oneof![
            4 => entries().prop_map(Op::PushBack),
            2 => entries().prop_map(Op::PushFront),
            1 => proptest::collection::vec(entries(), 0..4).prop_map(Op::PushFrontChunks),
            4 => Just(Op::Pop),
            1 => Just(Op::Shrink),
            1 => Just(Op::Expand),
            1 => Just(Op::DrainAll),
        ]
    }

    struct Model {
        items: VecDeque<u16>,
        configured: Option<usize>,
        max: Option<usize>,
        shrunk: bool,
    }

    impl Model {
        fn room(&self) -> usize {
            self.max
                .map_or(usize::MAX, |m| m.saturating_sub(self.items.len()))
        }
        fn push_back(&mut self, mut v: Vec<u16>) -> Vec<u16> {
            let over = if v.len() > self.room() {
                v.split_off(self.room())
            } else {
                Vec::new()
            };
            self.items.extend(v);
            over
        }
        fn push_front(&mut self, mut v: Vec<u16>) -> Vec<u16> {
            let over = if v.len() > self.room() {
                v.split_off(self.room())
            } else {
                Vec::new()
            };
            for e in v.into_iter().rev() {
                self.items.push_front(e);
            }
            over
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn queue_matches_a_vecdeque_with_a_maximum(
            batch in 1usize..8,
            max in proptest::option::of(1usize..60),
            ops in proptest::collection::vec(op(), 0..60),
        ) {
            let mut q: Queue<u16> = Queue::new(max, batch);
            let mut m = Model { items: VecDeque::new(), configured: max, max, shrunk: false };
            for op in ops {
                match op {
                    Op::PushBack(v) => prop_assert_eq!(q.push_back(v.clone(), now()), m.push_back(v)),
                    Op::PushFront(v) => prop_assert_eq!(q.push_front(v.clone(), now()), m.push_front(v)),
                    Op::PushFrontChunks(chunks) => {
                        let all: Vec<u16> = chunks.iter().flatten().copied().collect();
                        prop_assert_eq!(q.push_front_chunks(chunks, now()), m.push_front(all));
                    }
                    Op::Pop => {
                        let want: Vec<u16> = {
                            let n = batch.min(m.items.len());
                            m.items.drain(..n).collect()
                        };
                        let got = q.pop_batch(batch);
                        if want.is_empty() {
                            prop_assert_eq!(got, None);
                        } else {
                            prop_assert_eq!(got, Some(want));
                        }
                    }
                    Op::Shrink => {
                        let got = q.shrink();
                        if m.items.len() <= 1 {
                            prop_assert_eq!(got, Err(MinimumSize));
                        } else {
                            let keep = m.items.len() / 2;
                            let shed: Vec<u16> = m.items.drain(keep..).collect();
                            m.max = Some(keep);
                            m.shrunk = true;
                            prop_assert_eq!(got, Ok(shed));
                        }
                    }
                    Op::Expand => {
                        q.expand();
                        m.max = m.configured;
                        m.shrunk = false;
                    }
                    Op::DrainAll => {
                        prop_assert_eq!(q.drain_all(), m.items.drain(..).collect::<Vec<_>>());
                    }
                }
                prop_assert_eq!(q.len(), m.items.len());
                prop_assert_eq!(q.is_shrunk(), m.shrunk);
                prop_assert_eq!(q.max_len(), m.max);
                prop_assert!(q.chunks.iter().all(|c| !c.is_empty()));
                prop_assert_eq!(q.chunks.len(), q.meta.len());
            }
        }
    }
}
