//! The engine's threads besides the coordinator: a fixed pool of workers that run
//! batches, and one init thread that runs `Task::init` on request.
//!
//! Plain threads, not a `rayon::ThreadPool`: each worker blocks on one shared job
//! channel (no spinning while idle, which matters on small machines where the
//! producers need the cores), a dispatch is one channel send with no boxed closure,
//! and every thread has a `JoinHandle` the coordinator joins at shutdown (dropping a
//! rayon pool does not join its threads).
//!
//! The coordinator keeps up to `HAND_OUT` batches per worker handed out, so a worker
//! that finishes a batch takes the next one at once instead of sleeping until the
//! coordinator has seen its completion; a batch that is simply done is counted,
//! not reported, and the coordinator is woken only when the job channel runs low
//! (below half full) or empty, or when entries come back (retry,
//! panic). Only `max_concurrency` workers exist, so no more batches than that ever
//! run at once. Batches handed out but not started
//! can be recalled into the queue (for a shrink or a shutdown that hands entries
//! back), and a worker that finds the engine halting hands its batch back unrun.

use crate::coordinator::{Command, Shared};
use crate::task::{Outcome, Sink, Task};
use crate::unwind::catch;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

/// Batches handed out per worker at most: one running, the rest ready.
pub(crate) const HAND_OUT: usize = 8;

thread_local! {
    static ENGINE_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is one of an engine's own threads.
pub(crate) fn on_engine_thread() -> bool {
    ENGINE_THREAD.with(Cell::get)
}

/// Starts a named engine thread.
pub(crate) fn spawn(
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new().name(name).spawn(move || {
        ENGINE_THREAD.with(|c| c.set(true));
        f()
    })
}

/// The state every call sees: the coordinator starts it, and a worker whose `run`
/// returns a new state installs it before reporting, so every batch that starts
/// afterwards sees it (even one already handed to a worker).
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
        drop(old); // outside the lock: dropping a state is user code
    }
}

/// Batches handed to workers: waiting in the job channel, or running.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Entries in batches handed out but not started yet.
    pub(crate) prefetched: usize,
    /// When each of those batches was queued, in hand-out order.
    pub(crate) handed: std::collections::VecDeque<std::time::Instant>,
    /// Batches running now.
    pub(crate) running: usize,
    /// Per worker: when its current run started, its batch size, and whether the
    /// watchdog has reported it.
    pub(crate) runs: Vec<Option<RunSlot>>,
}

/// A run in progress, for the stuck-run watchdog.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunSlot {
    pub(crate) started: std::time::Instant,
    pub(crate) entries: usize,
    pub(crate) reported: bool,
}

/// One batch to run, with its entries' attempt counts under a retry policy.
pub(crate) struct Job<T> {
    pub(crate) batch: Vec<T>,
    pub(crate) attempts: Option<Vec<u32>>,
}

/// What a worker reports back. A batch that is simply done is not reported one by
/// one: the worker counts it in `Shared::done_batches` and only asks for a
/// `Refill` when the job channel runs low or empty.
pub(crate) enum Completion<T> {
    /// Batches were done and the job channel is low: account and hand out more.
    Refill,
    /// The run asked for a retry or panicked.
    Failed {
        batch: Vec<T>,
        attempts: Option<Vec<u32>>,
        /// The entries to run again; `None`: the whole batch.
        again: Option<Vec<T>>,
        /// The panic message, if it panicked.
        panic: Option<String>,
    },
    /// Not started: the engine is stopping and hands entries back.
    Skipped(Vec<T>, Option<Vec<u32>>),
}

/// The body of a worker thread: run jobs until the job channel closes.
pub(crate) fn worker<K: Task>(
    index: usize,
    task: Arc<K>,
    state: Arc<StateSlot<K::State>>,
    shared: Arc<Shared<K::Entry>>,
    jobs: Receiver<Job<K::Entry>>,
    done: Sender<Completion<K::Entry>>,
) {
    let low_water = jobs.capacity().unwrap_or(2) / 2;
    for Job { batch, attempts } in jobs.iter() {
        if jobs.len() < low_water {
            shared.ask_refill(&done);
        }
        let completion = if shared.halt.load(Ordering::Relaxed) {
            shared.progress.lock().handed.pop_front();
            Completion::Skipped(batch, attempts)
        } else {
            {
                let mut p = shared.progress.lock();
                p.handed.pop_front();
                p.prefetched -= batch.len();
                p.running += 1;
                if p.runs.len() <= index {
                    p.runs.resize(index + 1, None);
                }
                p.runs[index] = Some(RunSlot {
                    started: std::time::Instant::now(),
                    entries: batch.len(),
                    reported: false,
                });
            }
            let current = state.current();
            let outcome = catch(|| task.run(&batch, &current));
            if let Some(slot) = shared.progress.lock().runs[index].take() {
                if slot.reported {
                    log::warn!(
                        "a stuck run of {} entries returned after {:?}",
                        slot.entries,
                        slot.started.elapsed()
                    );
                }
            }
            drop(current);
            let len = batch.len() as u64;
            let done_ok = |shared: &Shared<K::Entry>| {
                shared.counters.processed.fetch_add(len, Ordering::Relaxed);
                shared.progress.lock().running -= 1;
                shared.done_batches.fetch_add(1, Ordering::SeqCst);
            };
            match outcome {
                Ok(Outcome::Ok) => {
                    drop(batch);
                    done_ok(&shared);
                    if jobs.is_empty() {
                        shared.ask_refill(&done);
                    }
                    continue;
                }
                Ok(Outcome::OkWithState(s)) => {
                    state.replace(s);
                    done_ok(&shared);
                    if jobs.is_empty() {
                        shared.ask_refill(&done);
                    }
                    continue;
                }
                Ok(Outcome::Retry) => Completion::Failed {
                    batch,
                    attempts,
                    again: None,
                    panic: None,
                },
                Ok(Outcome::RetryEntries(entries)) => Completion::Failed {
                    batch: keep_for_matching(batch, &entries, &shared),
                    attempts,
                    again: Some(entries),
                    panic: None,
                },
                Ok(Outcome::RetryEntriesWithState(entries, s)) => {
                    state.replace(s);
                    Completion::Failed {
                        batch: keep_for_matching(batch, &entries, &shared),
                        attempts,
                        again: Some(entries),
                        panic: None,
                    }
                }
                Err(msg) => Completion::Failed {
                    batch,
                    attempts,
                    again: None,
                    panic: Some(msg),
                },
            }
        };
        if done.send(completion).is_err() {
            // The coordinator is gone; it only leaves after joining us, so this
            // cannot happen while entries are owed to it.
            break;
        }
    }
}

/// A batch whose run handed back a list: the coordinator needs it only to match
/// attempt counts under a retry policy; otherwise it is dropped here, off the
/// coordinator's thread.
///
/// Also counts as processed the entries the run let go: the batch's size less
/// the entries handed back (exact when those are taken from the batch).
fn keep_for_matching<T>(batch: Vec<T>, again: &[T], shared: &Shared<T>) -> Vec<T> {
    let let_go = batch.len().saturating_sub(again.len()) as u64;
    shared
        .counters
        .processed
        .fetch_add(let_go, Ordering::Relaxed);
    if shared.tracks_attempts {
        batch
    } else {
        Vec::new()
    }
}

/// The body of the init thread: one `init` run per request until the request
/// channel closes. Each run ends with `Command::InitDone`.
pub(crate) fn init_runner<K: Task>(
    task: Arc<K>,
    state: Arc<StateSlot<K::State>>,
    requests: Receiver<()>,
    commands: Sender<Command<K::Entry>>,
    chunk_size: usize,
    shared: Arc<Shared<K::Entry>>,
) {
    for () in requests.iter() {
        let mut sink = Sink::new(chunk_size, commands.clone(), shared.clone());
        let current = state.current();
        let result = catch(|| task.init(&mut sink, &current));
        drop(current);
        let produced = sink.finish();
        if let Err(msg) = &result {
            log::error!("init panicked after {produced} entries (they are kept): {msg}");
        }
        let _ = commands.send(Command::InitDone { produced });
    }
}
