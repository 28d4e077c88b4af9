//! Helpers shared by the integration tests: a task built from closures, and
//! channel-based waiting with a generous bound that only catches hangs.
#![allow(dead_code)]

use buffered_task::{BufferError, Handle, Outcome, Priority, ShutdownReport, Sink, Task};
use crossbeam_channel::Receiver;
use std::sync::Arc;
use std::time::Duration;

/// Long enough that only a hang reaches it.
pub const HANG: Duration = Duration::from_secs(20);

type InitFn<T, S> = Box<dyn Fn(&mut Sink<T>, &S) + Send + Sync>;
type RunFn<T, S> = Box<dyn Fn(&[T], &S) -> Outcome<T, S> + Send + Sync>;
type RanFn<T, S> = Box<dyn Fn(&[T], &Outcome<T, S>) + Send + Sync>;

/// A task whose `init` and `run` are closures.
pub struct Script<T, S> {
    init: InitFn<T, S>,
    run: RunFn<T, S>,
    ran: Option<RanFn<T, S>>,
}

impl<T: Send + 'static, S: Send + Sync + 'static> Script<T, S> {
    pub fn new(run: impl Fn(&[T], &S) -> Outcome<T, S> + Send + Sync + 'static) -> Self {
        Script {
            init: Box::new(|_, _| {}),
            run: Box::new(run),
            ran: None,
        }
    }

    pub fn with_init(mut self, init: impl Fn(&mut Sink<T>, &S) + Send + Sync + 'static) -> Self {
        self.init = Box::new(init);
        self
    }
}

impl<T, S> Script<T, S>
where
    T: Clone + Ord + std::fmt::Debug + Send + Sync + 'static,
    S: Send + Sync + 'static,
{
    /// Every outcome of `run` goes into `books` (what succeeded, what was new).
    pub fn with_books(mut self, books: &Arc<Books<T>>) -> Self {
        let books = books.clone();
        self.ran = Some(Box::new(move |batch, outcome| books.ran(batch, outcome)));
        self
    }

    /// New books, kept by this script's `run`.
    pub fn books(&mut self) -> Arc<Books<T>> {
        let books = Books::new();
        let kept = books.clone();
        self.ran = Some(Box::new(move |batch, outcome| kept.ran(batch, outcome)));
        books
    }
}

impl<T: Send + 'static, S: Send + Sync + 'static> Task for Script<T, S> {
    type Entry = T;
    type State = S;
    fn init(&self, sink: &mut Sink<T>, state: &S) {
        (self.init)(sink, state)
    }
    fn run(&self, batch: &[T], state: &S) -> Outcome<T, S> {
        let outcome = (self.run)(batch, state);
        if let Some(ran) = &self.ran {
            ran(batch, &outcome);
        }
        outcome
    }
}

/// Receives one message, failing the test on a hang.
pub fn recv<T>(rx: &Receiver<T>) -> T {
    rx.recv_timeout(HANG)
        .expect("timed out waiting: the engine hung")
}

/// Receives exactly `n` messages.
pub fn recv_n<T>(rx: &Receiver<T>, n: usize) -> Vec<T> {
    (0..n).map(|_| recv(rx)).collect()
}

/// Asserts nothing is waiting in `rx` now.
pub fn assert_empty<T: std::fmt::Debug>(rx: &Receiver<T>) {
    if let Ok(v) = rx.try_recv() {
        panic!("unexpected message: {v:?}");
    }
}

/// Waits until `f` holds, yielding between looks (for conditions that have no
/// channel, e.g. a shutdown that has begun on another thread).
pub fn wait_until(mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < HANG, "condition never held");
        std::thread::yield_now();
    }
}

/// Waits until `problem` says there is none (`None`), yielding between
/// looks; after [`HANG`], panics with the last problem it gave.
pub fn eventually(mut problem: impl FnMut() -> Option<String>) {
    let start = std::time::Instant::now();
    while let Some(what) = problem() {
        assert!(start.elapsed() < HANG, "{what}");
        std::thread::yield_now();
    }
}

/// A gate that holds `run` calls until it is opened.
#[derive(Clone)]
pub struct Gate {
    open: std::sync::Arc<(parking_lot::Mutex<bool>, parking_lot::Condvar)>,
}

impl Gate {
    pub fn new() -> Self {
        Gate {
            open: Default::default(),
        }
    }
    /// Waits until the gate opens, or at most `HANG` (so a failed test that never
    /// opens its gate ends instead of hanging in the engine's shutdown).
    pub fn wait(&self) {
        let (lock, cv) = &*self.open;
        let mut open = lock.lock();
        cv.wait_while_for(&mut open, |open| !*open, HANG);
    }
    pub fn open(&self) {
        let (lock, cv) = &*self.open;
        *lock.lock() = true;
        cv.notify_all();
    }
}

/// Silences the default panic output for panics the tests cause on purpose.
pub fn quiet_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if !msg.contains("deliberate") {
            default(info);
        }
    }));
}

/// The accounting invariant: every entry given to the engine leaves it exactly
/// once, as processed, handed back (by a failed call or a shutdown report),
/// overflowed (queue full, shrink, dropped handle) or dead-lettered. Entries are
/// `u64` ids.
#[derive(Default)]
pub struct Ledger {
    given: parking_lot::Mutex<Vec<u64>>,
    processed: parking_lot::Mutex<Vec<u64>>,
    handed_back: parking_lot::Mutex<Vec<u64>>,
    overflowed: parking_lot::Mutex<Vec<u64>>,
    dead: parking_lot::Mutex<Vec<u64>>,
}

impl Ledger {
    pub fn given(&self, ids: &[u64]) {
        self.given.lock().extend_from_slice(ids);
    }
    pub fn processed(&self, ids: &[u64]) {
        self.processed.lock().extend_from_slice(ids);
    }
    pub fn handed_back(&self, ids: &[u64]) {
        self.handed_back.lock().extend_from_slice(ids);
    }
    pub fn overflowed(&self, ids: &[u64]) {
        self.overflowed.lock().extend_from_slice(ids);
    }
    pub fn dead_lettered(&self, ids: &[u64]) {
        self.dead.lock().extend_from_slice(ids);
    }
    pub fn dead_count(&self) -> usize {
        self.dead.lock().len()
    }

    /// Whether as many ids have left as were given (a run that outlived a
    /// shutdown deadline may still be on its way out).
    pub fn all_out(&self) -> bool {
        let out = self.processed.lock().len()
            + self.handed_back.lock().len()
            + self.overflowed.lock().len()
            + self.dead.lock().len();
        out >= self.given.lock().len()
    }

    /// Panics unless given = processed + handed back + overflowed + dead-lettered,
    /// with no id counted twice. Returns (given, processed, handed back,
    /// overflowed); see `dead_count` for the last.
    pub fn check(&self) -> (usize, usize, usize, usize) {
        let mut given = self.given.lock().clone();
        let processed = self.processed.lock().clone();
        let back = self.handed_back.lock().clone();
        let over = self.overflowed.lock().clone();
        let dead = self.dead.lock().clone();
        let mut out: Vec<u64> = Vec::with_capacity(processed.len() + back.len() + over.len());
        out.extend(&processed);
        out.extend(&back);
        out.extend(&over);
        out.extend(&dead);
        given.sort_unstable();
        out.sort_unstable();
        let dup_given = given.windows(2).find(|w| w[0] == w[1]);
        assert!(dup_given.is_none(), "an id was given twice: {dup_given:?}");
        if let Some(w) = out.windows(2).find(|w| w[0] == w[1]) {
            panic!("id {} left the engine twice", w[0]);
        }
        if given != out {
            let missing: Vec<u64> = given
                .iter()
                .filter(|id| out.binary_search(id).is_err())
                .take(10)
                .copied()
                .collect();
            let extra: Vec<u64> = out
                .iter()
                .filter(|id| given.binary_search(id).is_err())
                .take(10)
                .copied()
                .collect();
            panic!(
                "accounting broken: {} given, {} out; lost {missing:?}, never given {extra:?}",
                given.len(),
                out.len()
            );
        }
        (given.len(), processed.len(), back.len(), over.len())
    }
}

/// The accounting invariant for any entry type, kept by the test around every
/// hand-over: entries given = processed + handed back + overflowed +
/// dead-lettered, as multisets (an entry counted twice, or lost, fails `check`).
/// Entries a `run` hands back that were not in its batch count as given by it.
pub struct Books<T> {
    given: parking_lot::Mutex<Vec<T>>,
    processed: parking_lot::Mutex<Vec<T>>,
    back: parking_lot::Mutex<Vec<T>>,
    overflowed: parking_lot::Mutex<Vec<T>>,
    dead: parking_lot::Mutex<Vec<T>>,
}

impl<T: Clone + Ord + std::fmt::Debug + Send + 'static> Books<T> {
    pub fn new() -> Arc<Self> {
        Arc::new(Books {
            given: Default::default(),
            processed: Default::default(),
            back: Default::default(),
            overflowed: Default::default(),
            dead: Default::default(),
        })
    }

    pub fn given(&self, entries: &[T]) {
        self.given.lock().extend_from_slice(entries);
    }
    pub fn handed_back(&self, entries: &[T]) {
        self.back.lock().extend_from_slice(entries);
    }
    pub fn overflowed(&self, entries: &[T]) {
        self.overflowed.lock().extend_from_slice(entries);
    }
    pub fn dead_lettered(&self, entries: &[T]) {
        self.dead.lock().extend_from_slice(entries);
    }
    /// Records what a shutdown handed back.
    pub fn settle(&self, report: &ShutdownReport<T>) {
        self.handed_back(&report.unprocessed);
    }

    /// What a `run` outcome means for the books.
    pub fn ran<S>(&self, batch: &[T], outcome: &Outcome<T, S>) {
        let again: &[T] = match outcome {
            Outcome::Ok | Outcome::OkWithState(_) => &[],
            Outcome::Retry | Outcome::Fail(_) => batch,
            Outcome::RetryEntries(v)
            | Outcome::RetryEntriesWithState(v, _)
            | Outcome::FailEntries(v, _) => v,
        };
        let mut left: Vec<Option<&T>> = batch.iter().map(Some).collect();
        let mut new = Vec::new();
        for e in again {
            match left.iter_mut().find(|x| x.is_some_and(|x| x == e)) {
                Some(slot) => *slot = None,
                None => new.push(e.clone()),
            }
        }
        let done: Vec<T> = left.into_iter().flatten().cloned().collect();
        self.processed.lock().extend(done);
        self.given.lock().extend(new);
    }

    fn refused(&self, result: Result<(), BufferError<T>>) -> Result<(), BufferError<T>>
    where
        T: Clone,
    {
        if let Err(err) = &result {
            let back: Vec<T> = match err {
                BufferError::Stopped(v) | BufferError::Full(v) | BufferError::Timeout(v) => {
                    v.clone()
                }
                _ => Vec::new(),
            };
            self.handed_back(&back);
        }
        result
    }

    pub fn buffer(&self, h: &Handle<T>, v: Vec<T>, p: Priority) -> Result<(), BufferError<T>> {
        self.given(&v);
        self.refused(h.buffer(v, p))
    }
    pub fn buffer_timeout(
        &self,
        h: &Handle<T>,
        v: Vec<T>,
        p: Priority,
        timeout: std::time::Duration,
    ) -> Result<(), BufferError<T>> {
        self.given(&v);
        self.refused(h.buffer_timeout(v, p, timeout))
    }
    pub fn buffer_one(&self, h: &Handle<T>, e: T, p: Priority) -> Result<(), BufferError<T>> {
        self.given(std::slice::from_ref(&e));
        self.refused(h.buffer_one(e, p))
    }
    pub fn push_back(&self, h: &Handle<T>, v: Vec<T>) -> Result<(), BufferError<T>> {
        self.given(&v);
        self.refused(h.push_back(v))
    }
    pub fn push_front(&self, h: &Handle<T>, v: Vec<T>) -> Result<(), BufferError<T>> {
        self.given(&v);
        self.refused(h.push_front(v))
    }

    /// Records what a shutdown handed back, checks the books, passes the report on.
    pub fn finish(&self, report: ShutdownReport<T>) -> ShutdownReport<T> {
        self.settle(&report);
        self.check();
        report
    }

    /// Panics unless every entry given left exactly once.
    pub fn check(&self) {
        let mut given = self.given.lock().clone();
        let mut out = self.processed.lock().clone();
        out.extend(self.back.lock().iter().cloned());
        out.extend(self.overflowed.lock().iter().cloned());
        out.extend(self.dead.lock().iter().cloned());
        given.sort();
        out.sort();
        if out != given {
            let mut lost = Vec::new();
            let mut extra = Vec::new();
            let (mut i, mut j) = (0, 0);
            while i < given.len() || j < out.len() {
                match (given.get(i), out.get(j)) {
                    (Some(g), Some(o)) if g == o => (i, j) = (i + 1, j + 1),
                    (Some(g), Some(o)) if g < o => (lost.push(g.clone()), i += 1).1,
                    (Some(_), Some(o)) => (extra.push(o.clone()), j += 1).1,
                    (Some(g), None) => (lost.push(g.clone()), i += 1).1,
                    (None, Some(o)) => (extra.push(o.clone()), j += 1).1,
                    (None, None) => unreachable!(),
                }
            }
            panic!(
                "accounting broken: {} given, {} left; lost {:?}{}, left but never given (or twice) {:?}{}",
                given.len(),
                out.len(),
                &lost[..lost.len().min(10)],
                if lost.len() > 10 { " ..." } else { "" },
                &extra[..extra.len().min(10)],
                if extra.len() > 10 { " ..." } else { "" },
            );
        }
    }
}

/// What a [`held`] task reports, and the gate that holds it.
pub struct Held<T> {
    /// Opens to let every run (held until then) go on.
    pub gate: Gate,
    /// One message as each run starts.
    pub started: Receiver<()>,
    /// Each batch, as its run returns.
    pub ran: Receiver<Vec<T>>,
    /// The books its runs keep.
    pub books: Arc<Books<T>>,
}

/// A task whose every run reports that it started, waits at a gate, reports its
/// batch and returns `Ok`; its outcomes go into its books.
pub fn held<T>() -> (Script<T, ()>, Held<T>)
where
    T: Clone + Ord + std::fmt::Debug + Send + Sync + 'static,
{
    let gate = Gate::new();
    let waits = gate.clone();
    let (ran_tx, ran) = crossbeam_channel::unbounded();
    let (started_tx, started) = crossbeam_channel::unbounded();
    let mut task = Script::new(move |b: &[T], _: &()| {
        let _ = started_tx.send(());
        waits.wait();
        let _ = ran_tx.send(b.to_vec());
        Outcome::Ok
    });
    let books = task.books();
    (
        task,
        Held {
            gate,
            started,
            ran,
            books,
        },
    )
}

/// A task whose every run reports its batch as it starts, then waits for one
/// permit; `retry` decides whether the batch asks for a retry. With its
/// starts, its permits and its books.
pub type Permitted<T> = (
    Script<T, ()>,
    Receiver<Vec<T>>,
    crossbeam_channel::Sender<()>,
    Arc<Books<T>>,
);

/// See [`Permitted`].
pub fn permitted<T>(retry: impl Fn(&[T]) -> bool + Send + Sync + 'static) -> Permitted<T>
where
    T: Clone + Ord + std::fmt::Debug + Send + Sync + 'static,
{
    let (started_tx, started) = crossbeam_channel::unbounded();
    let (permit_tx, permits) = crossbeam_channel::unbounded::<()>();
    let mut task = Script::new(move |b: &[T], _: &()| {
        started_tx.send(b.to_vec()).unwrap();
        permits.recv_timeout(HANG).expect("no permit");
        if retry(b) {
            Outcome::Retry
        } else {
            Outcome::Ok
        }
    });
    let books = task.books();
    (task, started, permit_tx, books)
}

/// Entries that overflowed, each with its reason.
pub type Overflowed<T> = Receiver<(T, buffered_task::OverflowReason)>;

/// An overflow handler that books what overflowed and sends each entry with
/// its reason; and the receiving end.
pub fn overflow_log<T>(
    books: &Arc<Books<T>>,
) -> (
    impl Fn(Vec<T>, buffered_task::OverflowReason) + Send + Sync + 'static,
    Overflowed<T>,
)
where
    T: Clone + Ord + std::fmt::Debug + Send + 'static,
{
    let (tx, rx) = crossbeam_channel::unbounded();
    let books = books.clone();
    let handler = move |v: Vec<T>, r| {
        books.overflowed(&v);
        for e in v {
            let _ = tx.send((e, r));
        }
    };
    (handler, rx)
}
