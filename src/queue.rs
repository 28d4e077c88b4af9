//! The bounded queue batches are cut from.
//!
//! Entries are kept as a deque of chunks (`Vec<T>`), so a chunk that arrives with
//! exactly a batch's worth of entries leaves as that batch without a copy.
//! The queue may carry a maximum length; pushes stop there and hand back what did
//! not fit (the caller decides what overflow means). A shrink sheds the back half
//! and lowers the maximum until `expand` lifts it again.

use std::collections::VecDeque;

/// The queue holds 0 or 1 entries, so a shrink has nothing to shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MinimumSize;

pub(crate) struct Queue<T> {
    chunks: VecDeque<Vec<T>>,
    len: usize,
    /// The bound chosen at build time; `None` is unbounded.
    configured_max: Option<usize>,
    /// The bound in force: the configured one, or a lower one after a shrink.
    max: Option<usize>,
    shrunk: bool,
}

impl<T> Queue<T> {
    pub(crate) fn new(max: Option<usize>) -> Self {
        Queue {
            chunks: VecDeque::new(),
            len: 0,
            configured_max: max,
            max,
            shrunk: false,
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
    pub(crate) fn push_back(&mut self, mut entries: Vec<T>) -> Vec<T> {
        let overflow = self.cut_to_room(&mut entries);
        if !entries.is_empty() {
            self.len += entries.len();
            self.chunks.push_back(entries);
        }
        overflow
    }

    /// Puts `entries` ahead of everything queued, keeping their order, as far as the
    /// bound allows. What does not fit is the tail of `entries`, returned.
    pub(crate) fn push_front(&mut self, mut entries: Vec<T>) -> Vec<T> {
        let overflow = self.cut_to_room(&mut entries);
        if !entries.is_empty() {
            self.len += entries.len();
            self.chunks.push_front(entries);
        }
        overflow
    }

    /// Appends `entries` whatever the bound (used when the engine stops, so that
    /// nothing racing the stop is lost).
    pub(crate) fn push_back_unbounded(&mut self, entries: Vec<T>) {
        if !entries.is_empty() {
            self.len += entries.len();
            self.chunks.push_back(entries);
        }
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
    pub(crate) fn pop_batch(&mut self, n: usize) -> Option<Vec<T>> {
        let first = self.chunks.front_mut()?;
        let batch = if first.len() == n {
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
            let mut batch = self.chunks.pop_front().expect("front chunk exists");
            batch.reserve(n - batch.len());
            while batch.len() < n {
                let Some(next) = self.chunks.front_mut() else {
                    break;
                };
                let want = n - batch.len();
                if next.len() <= want {
                    batch.append(next);
                    self.chunks.pop_front();
                } else {
                    batch.extend(next.drain(..want));
                }
            }
            batch
        };
        self.len -= batch.len();
        Some(batch)
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
            if last.len() <= count {
                count -= last.len();
                self.len -= last.len();
                parts.push(self.chunks.pop_back().expect("back chunk exists"));
            } else {
                let at = last.len() - count;
                parts.push(last.split_off(at));
                self.len -= count;
                count = 0;
            }
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
        } else {
            self.chunks.shrink_to_fit();
        }
    }

    /// Visits every queued entry (for memory weighing).
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flat_map(|c| c.iter())
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn q(max: Option<usize>, items: &[u32]) -> Queue<u32> {
        let mut q = Queue::new(max);
        assert!(q.push_back(items.to_vec()).is_empty());
        q
    }

    #[test]
    fn batches_cross_chunks_in_order() {
        let mut q = q(None, &[1, 2, 3]);
        q.push_back(vec![4, 5]);
        q.push_front(vec![0]);
        assert_eq!(q.pop_batch(2), Some(vec![0, 1]));
        assert_eq!(q.pop_batch(4), Some(vec![2, 3, 4, 5]));
        assert_eq!(q.pop_batch(4), None);
        assert!(q.is_empty());
    }

    #[test]
    fn bound_hands_back_overflow() {
        let mut q = q(Some(3), &[1, 2]);
        assert_eq!(q.push_back(vec![3, 4, 5]), vec![4, 5]);
        assert_eq!(q.push_front(vec![9]), vec![9]);
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn shrink_halves_and_bounds() {
        let mut q = q(None, &[1, 2, 3]);
        q.push_back(vec![4, 5]);
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
