//! The callback trait, the run outcome, priorities and the `init` sink.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The work a [`Handle`](crate::Handle) runs: how to find initial work, and how to
/// process one batch.
///
/// One value of the implementing type is shared by every worker thread (`&self`),
/// so configuration such as a client or a URL lives here. The engine-owned,
/// replaceable *state* is separate: every call gets the current state, and
/// [`Outcome::OkWithState`] replaces it for batches dispatched afterwards.
pub trait Task: Send + Sync + 'static {
    /// One unit of work, e.g. a block number to fetch.
    type Entry: Send + 'static;
    /// The state handed to every call; a `run` can replace it.
    type State: Send + Sync + 'static;

    /// Streams the initial work into `sink`. Runs on the engine's own init thread,
    /// so a slow source never blocks the engine; every chunk of `max_batch_size`
    /// entries is queued and dispatched as soon as it fills.
    ///
    /// With `poll` on, `init` runs again whenever the engine goes idle (see
    /// [`Builder::poll`](crate::Builder::poll)). The default streams nothing.
    ///
    /// A panic here is caught and logged; whatever was pushed before it is kept.
    fn init(&self, sink: &mut Sink<Self::Entry>, state: &Self::State) {
        let _ = (sink, state);
    }

    /// Processes one batch of at most `max_batch_size` entries.
    ///
    /// A panic here is caught, logged at error level with its message, and treated
    /// as [`Outcome::Retry`]; the worker thread lives on.
    fn run(&self, batch: &[Self::Entry], state: &Self::State) -> Outcome<Self::Entry, Self::State>;
}

/// A shared task is a task: keep an `Arc` of it for a hook, a handler or your
/// own threads, and give the engine a clone.
impl<K: Task> Task for Arc<K> {
    type Entry = K::Entry;
    type State = K::State;

    fn init(&self, sink: &mut Sink<Self::Entry>, state: &Self::State) {
        (**self).init(sink, state)
    }

    fn run(&self, batch: &[Self::Entry], state: &Self::State) -> Outcome<Self::Entry, Self::State> {
        (**self).run(batch, state)
    }
}

/// What a [`Task::run`] call asks the engine to do next.
///
/// A run that fails with an error says so with [`Outcome::Fail`] or
/// [`Outcome::FailEntries`]: the error is logged, shown to the batch observer,
/// and handed to the dead-letter handler with the entries it spent. To use `?`,
/// write the fallible part as a function returning `Result` and convert:
///
/// ```
/// use buffered_task::{Outcome, Task};
///
/// struct Fetch;
/// impl Fetch {
///     fn fetch(&self, blocks: &[u64]) -> Result<(), std::io::Error> {
///         let _first = blocks.first().ok_or(std::io::ErrorKind::InvalidInput)?;
///         Ok(())
///     }
/// }
/// impl Task for Fetch {
///     type Entry = u64;
///     type State = ();
///     fn run(&self, blocks: &[u64], _: &()) -> Outcome<u64, ()> {
///         self.fetch(blocks).into() // Ok(()) → Outcome::Ok, Err(e) → Outcome::Fail(e)
///     }
/// }
/// assert_eq!(Fetch.run(&[1], &()), Outcome::Ok);
/// assert!(matches!(Fetch.run(&[], &()), Outcome::Fail(_)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T, S> {
    /// The batch is done.
    Ok,
    /// The batch is done; `S` replaces the state for batches dispatched afterwards.
    OkWithState(S),
    /// Run the whole batch again: it goes to the back of the queue.
    Retry,
    /// Run these entries (a subset of the batch, or new ones) again: they go to the
    /// back of the queue. An empty list means nothing is retried.
    RetryEntries(Vec<T>),
    /// As [`Outcome::RetryEntries`], and `S` replaces the state.
    RetryEntriesWithState(Vec<T>, S),
    /// The run failed with this error: the whole batch is retried, as
    /// [`Outcome::Retry`].
    Fail(RunError),
    /// These entries failed with this error and are retried, as
    /// [`Outcome::RetryEntries`]; the others are done.
    FailEntries(Vec<T>, RunError),
}

impl<T, S> Outcome<T, S> {
    /// The whole batch failed with `error` (see [`Outcome::Fail`]).
    pub fn fail(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Outcome::Fail(RunError::new(error))
    }

    /// `Ok(())` is [`Outcome::Ok`]; an error is [`Outcome::Fail`].
    pub fn from_result<E>(result: Result<(), E>) -> Self
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match result {
            Ok(()) => Outcome::Ok,
            Err(e) => Outcome::fail(e),
        }
    }
}

impl<T, S, E> From<Result<(), E>> for Outcome<T, S>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn from(result: Result<(), E>) -> Self {
        Outcome::from_result(result)
    }
}

/// The error a run failed with: cheap to clone (shared), compared by its text.
#[derive(Clone)]
pub struct RunError(Arc<dyn std::error::Error + Send + Sync>);

impl RunError {
    /// Wraps any error (or a message: `RunError::new("timed out")`).
    pub fn new(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        RunError(Arc::from(error.into()))
    }

    /// The error itself, e.g. to downcast it.
    pub fn get(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl std::fmt::Debug for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RunError")
            .field(&self.0.to_string())
            .finish()
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for RunError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for RunError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl Eq for RunError {}

/// Where buffered entries go on the next flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// Behind everything already queued (first in, first out).
    Back,
    /// Ahead of everything already queued; several front calls between two flushes
    /// keep their call order, and each call keeps its own order.
    Front,
}

/// Where a [`Sink`] delivers its chunks: the engine's store.
pub(crate) trait Feed<T>: Send + Sync {
    /// Takes a chunk streamed by `init` (under an enforced bound, after waiting
    /// for room, unless the engine is stopping). Never drops entries.
    fn feed(&self, chunk: Vec<T>);
}

/// Most entries a sink allocates room for ahead: `max_batch_size` may be huge.
const SINK_RESERVE: usize = 1024;

/// Collects the entries an [`Task::init`] streams and hands them to the engine in
/// chunks of `max_batch_size`.
///
/// Nothing pushed is lost: full chunks go to the queue at once, the remainder when
/// `init` returns (or panics).
pub struct Sink<T> {
    chunk: Vec<T>,
    chunk_size: usize,
    /// Entries sent in full chunks so far (those in `chunk` are not yet).
    sent: u64,
    feed: Arc<dyn Feed<T>>,
    /// Set once the engine is shutting down (read on every push: no call).
    stopping: Arc<AtomicBool>,
}

impl<T> Sink<T> {
    pub(crate) fn new(
        chunk_size: usize,
        feed: Arc<dyn Feed<T>>,
        stopping: Arc<AtomicBool>,
    ) -> Self {
        Sink {
            chunk: Vec::new(),
            chunk_size,
            sent: 0,
            feed,
            stopping,
        }
    }

    /// Adds one entry. Returns `false` once the engine is shutting down: the entry is
    /// still taken (and drained or handed back by the shutdown), but `init` should
    /// stop streaming and return.
    #[inline]
    pub fn push(&mut self, entry: T) -> bool {
        if self.chunk.capacity() == 0 {
            self.reserve();
        }
        self.chunk.push(entry);
        if self.chunk.len() >= self.chunk_size {
            self.send_chunk();
        }
        !self.is_stopping()
    }

    /// Adds every entry of `entries`; returns `false` once the engine is shutting
    /// down (see [`Sink::push`]). All entries are taken either way.
    pub fn extend<I: IntoIterator<Item = T>>(&mut self, entries: I) -> bool {
        let mut entries = entries.into_iter();
        loop {
            if self.chunk.capacity() == 0 {
                self.reserve();
            }
            let room = self.chunk_size - self.chunk.len();
            self.chunk.extend(entries.by_ref().take(room));
            if self.chunk.len() < self.chunk_size {
                break; // the iterator ran out
            }
            self.send_chunk();
        }
        !self.is_stopping()
    }

    /// Room for the next chunk: a full one, up to a limit (a chunk may be huge).
    #[cold]
    fn reserve(&mut self) {
        self.chunk.reserve(self.chunk_size.min(SINK_RESERVE));
    }

    /// Whether the engine is shutting down, so `init` should return soon.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// How many entries this `init` run has pushed so far.
    pub fn produced(&self) -> u64 {
        self.sent + self.chunk.len() as u64
    }

    #[inline(never)]
    fn send_chunk(&mut self) {
        let chunk = std::mem::take(&mut self.chunk);
        self.sent += chunk.len() as u64;
        self.feed.feed(chunk);
    }

    /// Sends the remainder; returns how many entries this run produced.
    pub(crate) fn finish(mut self) -> u64 {
        if !self.chunk.is_empty() {
            self.send_chunk();
        }
        self.sent
    }
}

impl<T> Drop for Sink<T> {
    /// A sink dropped without `finish` (its thread is unwinding) still delivers
    /// what it holds.
    fn drop(&mut self) {
        if !self.chunk.is_empty() {
            self.send_chunk();
        }
    }
}

impl<T> std::fmt::Debug for Sink<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("pending", &self.chunk.len())
            .field("chunk_size", &self.chunk_size)
            .field("produced", &self.produced())
            .finish()
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use parking_lot::Mutex;

    /// Records the chunks it is fed.
    #[derive(Default)]
    struct Chunks(Mutex<Vec<Vec<u32>>>);

    impl Feed<u32> for Chunks {
        fn feed(&self, chunk: Vec<u32>) {
            self.0.lock().push(chunk);
        }
    }

    fn sink(chunk_size: usize) -> (Sink<u32>, Arc<Chunks>) {
        let chunks = Arc::new(Chunks::default());
        let feed: Arc<dyn Feed<u32>> = chunks.clone();
        (
            Sink::new(chunk_size, feed, Arc::new(AtomicBool::new(false))),
            chunks,
        )
    }

    #[test]
    fn push_and_extend_deliver_full_chunks_in_order_and_count_every_entry() {
        let (mut s, chunks) = sink(4);
        s.push(0);
        assert!(s.extend(1..10)); // fills 0..4 and 4..8; 8, 9 wait
        assert_eq!(s.produced(), 10);
        s.push(10);
        assert!(s.extend(std::iter::empty()));
        assert_eq!(*chunks.0.lock(), vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert_eq!(s.finish(), 11);
        assert_eq!(chunks.0.lock().last(), Some(&vec![8, 9, 10]));
    }

    #[test]
    fn entries_taken_before_an_iterator_panics_are_delivered() {
        let (mut s, chunks) = sink(4);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s.extend((0..7).map(|i| if i == 6 { panic!("deliberate") } else { i }));
        }));
        assert!(result.is_err());
        assert_eq!(s.produced(), 6);
        drop(s); // as when init unwinds: what it holds still goes
        let all: Vec<u32> = chunks.0.lock().concat();
        assert_eq!(all, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_huge_chunk_size_neither_overflows_nor_reserves_it_all() {
        let (mut s, chunks) = sink(usize::MAX);
        assert!(s.extend(0..3));
        assert!(s.chunk.capacity() <= SINK_RESERVE);
        assert_eq!(s.finish(), 3);
        assert_eq!(*chunks.0.lock(), vec![vec![0, 1, 2]]);
    }
}
