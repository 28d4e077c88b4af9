//! The engine's threads besides the coordinator: a fixed pool of workers that run
//! batches, and one init thread that runs `Task::init` on request.
//!
//! Plain threads, not a `rayon::ThreadPool`: each worker blocks on one shared job
//! channel (no spinning while idle, which matters on small machines where the
//! producers need the cores), a dispatch is one channel send with no boxed closure,
//! and every thread has a `JoinHandle` the coordinator joins at shutdown (dropping a
//! rayon pool does not join its threads).

use crate::coordinator::Command;
use crate::task::{Outcome, Sink, Task};
use crate::unwind::catch;
use crossbeam_channel::{Receiver, Sender};
use std::cell::Cell;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

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

/// One batch to run, with the state current when it was dispatched.
pub(crate) struct Job<T, S> {
    pub(crate) batch: Vec<T>,
    pub(crate) state: Arc<S>,
}

/// What a worker reports back: the batch (owned by the engine again) and the outcome,
/// or the panic message.
pub(crate) struct Completion<T, S> {
    pub(crate) batch: Vec<T>,
    pub(crate) outcome: Result<Outcome<T, S>, String>,
}

/// The body of a worker thread: run jobs until the job channel closes.
pub(crate) fn worker<K: Task>(
    task: Arc<K>,
    jobs: Receiver<Job<K::Entry, K::State>>,
    done: Sender<Completion<K::Entry, K::State>>,
) {
    for Job { batch, state } in jobs.iter() {
        let outcome = catch(|| task.run(&batch, &state));
        drop(state);
        if done.send(Completion { batch, outcome }).is_err() {
            // The coordinator is gone; it only leaves after joining us, so this
            // cannot happen while entries are owed to it.
            break;
        }
    }
}

/// The body of the init thread: one `init` run per request until the request
/// channel closes. Each run ends with `Command::InitDone`.
pub(crate) fn init_runner<K: Task>(
    task: Arc<K>,
    requests: Receiver<Arc<K::State>>,
    commands: Sender<Command<K::Entry>>,
    chunk_size: usize,
    stopping: Arc<AtomicBool>,
) {
    for state in requests.iter() {
        let mut sink = Sink::new(chunk_size, commands.clone(), stopping.clone());
        let result = catch(|| task.init(&mut sink, &state));
        drop(state);
        let produced = sink.finish();
        if let Err(msg) = &result {
            log::error!("init panicked after {produced} entries (they are kept): {msg}");
        }
        let _ = commands.send(Command::InitDone { produced });
    }
}
