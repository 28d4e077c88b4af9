//! The engine's threads besides the coordinator: a fixed pool of workers that
//! take batches from the store and run them, and one init thread that runs
//! `Task::init` on request.
//!
//! Plain threads, not a `rayon::ThreadPool`: each worker blocks on the store's
//! condition variable while idle (no spinning, which matters on small machines
//! where the producers need the cores), a dispatch is one lock with no boxed
//! closure, every thread has a `JoinHandle` the shutdown joins (dropping a rayon
//! pool does not join its threads), and `run` is meant for blocking I/O, which
//! would starve a work-stealing pool.
//!
//! A worker: `Job` → `catch(run)` → `Ok` (counted when it takes the next batch,
//! in the same lock) or a failure settled by [`retry::settle`] outside the lock
//! and applied by the store. Everything the user wrote, drops included, runs
//! inside [`catch`] or [`drop_quietly`]; a panic anywhere else is an internal
//! failure: the thread's batch goes back to the store and the engine stops.

use crate::fault;
use crate::observe::{BatchKind, BatchRecord};
use crate::retry::{self, Failed};
use crate::store::{Done, Job, Store};
use crate::task::{Feed, Outcome, Sink, Task};
use crate::threads::Role;
use crate::unwind::{catch, drop_quietly};
use crossbeam_channel::Receiver;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

/// The state every call sees: a worker whose `run` returns a new state installs
/// it before settling, so every batch that starts afterwards sees it.
pub(crate) struct StateSlot<S>(Mutex<Arc<S>>);

impl<S> StateSlot<S> {
    pub(crate) fn new(state: S) -> Self {
        StateSlot(Mutex::new(Arc::new(state)))
    }

    pub(crate) fn current(&self) -> Arc<S> {
        self.0.lock().clone()
    }

    fn replace(&self, state: S) {
        let old = std::mem::replace(&mut *self.0.lock(), Arc::new(state));
        drop_quietly("a replaced state", old); // outside the lock: user code
    }
}

/// Runs an engine thread's body; a panic that escapes it (never user code,
/// which is caught where it is called) is an internal failure.
pub(crate) fn contained<T: Send + 'static>(store: &Store<T>, role: Role, body: impl FnOnce()) {
    if let Err(msg) = catch(body) {
        store.fail(role, &msg);
    }
}

/// A batch a worker holds: given back to the store if the worker unwinds.
struct Holding<'a, T: Send + 'static> {
    store: &'a Store<T>,
    worker: usize,
    job: Option<Job<T>>,
}

impl<T: Send + 'static> Drop for Holding<'_, T> {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            self.store.orphan(self.worker, job.entries);
        }
    }
}

/// The body of worker `w`: take, run, settle, until the engine finishes.
pub(crate) fn worker<K: Task>(
    w: usize,
    task: Arc<K>,
    state: Arc<StateSlot<K::State>>,
    store: &Store<K::Entry>,
) {
    hook(store, w, store.workers.start.as_ref(), "on_worker_start");
    let mut last = (Done::Nothing, None);
    while let Some(job) = store.take(w, last.0, last.1) {
        last = run_one(w, &*task, &state, store, job);
    }
    hook(store, w, store.workers.stop.as_ref(), "on_worker_stop");
    drop_quietly("the task", task);
    drop_quietly("the state", state);
}

/// Runs a worker hook, contained.
fn hook<T: Send + 'static>(
    store: &Store<T>,
    w: usize,
    hook: Option<&crate::threads::WorkerHook>,
    what: &str,
) {
    if let Some(hook) = hook {
        if let Err(msg) = catch(|| hook(w)) {
            log::error!("{}: {what} of worker {w} panicked: {msg}", store.name());
        }
    }
}

/// Runs one batch (contained), settles its outcome and shows it to the
/// observers; returns how it ended and, when something needs it, how long the
/// run took.
fn run_one<K: Task>(
    w: usize,
    task: &K,
    state: &StateSlot<K::State>,
    store: &Store<K::Entry>,
    job: Job<K::Entry>,
) -> (Done<K::Entry>, Option<Duration>) {
    let mut holding = Holding {
        store,
        worker: w,
        job: Some(job),
    };
    let Some(job) = holding.job.as_mut() else {
        return (Done::Nothing, None);
    };
    store.taken(w, job); // their keys are no longer waiting
    if job.entries.is_empty() {
        holding.job = None;
        return (Done::Ok(0), None); // all of them duplicates, reported
    }
    let job = &*job;
    store.unweigh(&job.entries);
    fault::hit(store.name(), "worker");
    let watch = store.watched().then(|| Watch::start(store, w, job));
    let started = store.adaptive().then(|| store.clock().now());
    let current = state.current();
    let outcome = {
        #[cfg(feature = "tracing")]
        let _span = watch.as_ref().map(|w| w.span.clone().entered());
        catch(|| task.run(&job.entries, &current))
    };
    let took = started.map(|t| store.clock().now().saturating_duration_since(t));
    drop_quietly("the state", current);
    let Some(Job {
        entries, attempts, ..
    }) = holding.job.take()
    else {
        return (Done::Nothing, None);
    };
    let done = finish_run(store, state, entries, attempts, outcome);
    if let Some(watch) = watch {
        store.observe(watch.finish(store, &done));
    }
    (done, took)
}

/// What the observers are told of a run, gathered around it.
struct Watch {
    record: BatchRecord,
    started: std::time::Instant,
    #[cfg(feature = "tracing")]
    span: tracing::Span,
}

impl Watch {
    fn start<T: Send + 'static>(store: &Store<T>, w: usize, job: &Job<T>) -> Self {
        let started = store.clock().now();
        let attempt = match (&job.attempts, store.rules()) {
            (Some(a), _) => Some(a.iter().copied().max().unwrap_or(0).saturating_add(1)),
            (None, Some(_)) => Some(1),
            (None, None) => None,
        };
        let record = BatchRecord {
            engine: store.name().to_string(),
            worker: w,
            size: job.entries.len(),
            kind: BatchKind::Ok,
            attempt,
            waited: started.saturating_duration_since(job.since),
            run_time: std::time::Duration::ZERO,
            processed: 0,
            retried: 0,
            dead_lettered: 0,
            error: None,
        };
        Watch {
            #[cfg(feature = "tracing")]
            span: tracing::debug_span!(
                "buffered_task.run",
                engine = %record.engine,
                worker = w,
                size = record.size,
                attempt = ?attempt,
                waited_us = record.waited.as_micros() as u64,
            ),
            record,
            started,
        }
    }

    fn finish<T>(mut self, store: &Store<T>, done: &Done<T>) -> BatchRecord
    where
        T: Send + 'static,
    {
        #[cfg(feature = "tracing")]
        let span = self.span;
        let r = &mut self.record;
        r.run_time = store.clock().now().saturating_duration_since(self.started);
        match done {
            Done::Nothing => {}
            Done::Ok(n) => r.processed = *n as usize,
            Done::Failed(s) => {
                r.processed = s.processed as usize;
                r.retried = s.retried();
                r.dead_lettered = s.dead.len();
                (r.kind, r.error) = match (&s.panic, &s.error) {
                    (Some(msg), _) => (BatchKind::Panic, Some(msg.clone())),
                    (None, Some(e)) => (BatchKind::Error, Some(e.to_string())),
                    (None, None) => (BatchKind::Retry, None),
                };
            }
        }
        #[cfg(feature = "tracing")]
        tracing::debug!(
            parent: &span,
            kind = ?r.kind,
            run_us = r.run_time.as_micros() as u64,
            processed = r.processed,
            retried = r.retried,
            dead_lettered = r.dead_lettered,
            error = r.error.as_deref(),
            "batch done"
        );
        self.record
    }
}

/// Applies a run's outcome: the new state is installed at once; the entries
/// are accounted by the worker's next `take` (a failure sorted first, here,
/// outside every lock).
fn finish_run<T: Send + 'static, S>(
    store: &Store<T>,
    state: &StateSlot<S>,
    entries: Vec<T>,
    attempts: Option<Vec<u32>>,
    outcome: Result<Outcome<T, S>, String>,
) -> Done<T> {
    let failed = match outcome {
        Ok(Outcome::Ok) => return Done::Ok(done(entries)),
        Ok(Outcome::OkWithState(s)) => {
            state.replace(s);
            return Done::Ok(done(entries));
        }
        Ok(Outcome::Retry) => Failed::All(None),
        Ok(Outcome::RetryEntries(list)) => Failed::These(list, None),
        Ok(Outcome::RetryEntriesWithState(list, s)) => {
            state.replace(s);
            Failed::These(list, None)
        }
        Ok(Outcome::Fail(error)) => Failed::All(Some(error)),
        Ok(Outcome::FailEntries(list, error)) => Failed::These(list, Some(error)),
        Err(msg) => Failed::Panicked(msg),
    };
    let mut settled = retry::settle(entries, attempts, failed, store.rules());
    store.readmit(&mut settled);
    Done::Failed(Box::new(settled))
}

/// A batch done: dropped (contained), its size returned.
fn done<T>(entries: Vec<T>) -> u64 {
    let n = entries.len() as u64;
    drop_quietly("a batch", entries);
    n
}

/// The body of the init thread: one `init` run per request until the request
/// channel closes.
pub(crate) fn init_runner<K: Task>(
    task: Arc<K>,
    state: Arc<StateSlot<K::State>>,
    requests: Receiver<()>,
    store: Arc<Store<K::Entry>>,
) {
    let feed: Arc<dyn Feed<K::Entry>> = store.clone();
    for () in requests.iter() {
        let mut sink = Sink::new(
            store.config.max_batch_size,
            feed.clone(),
            store.stopping_flag(),
        );
        let current = state.current();
        let result = catch(|| task.init(&mut sink, &current));
        drop_quietly("the state", current);
        fault::hit(store.name(), "init");
        let produced = sink.finish();
        if let Err(msg) = &result {
            log::error!(
                "{}: init panicked after {produced} entries (they are kept): {msg}",
                store.config.name
            );
        }
        store.init_done(produced);
    }
    drop(feed);
    drop_quietly("the task", task);
    drop_quietly("the state", state);
}
