//! The engine's threads: named spawning, the marker that tells a thread which
//! engine it belongs to (so a call that would wait for its own thread can fail
//! at once instead), and joining.
//!
//! Every `JoinHandle` is kept in a [`Crew`] and joined by the shutdown or the
//! drop of the last handle. One exception, documented on
//! [`Handle::shutdown_timeout`](crate::Handle::shutdown_timeout): a thread still
//! inside user code (a `run` or an `init` that has not returned) when a shutdown
//! deadline passes is let go rather than waited for.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};

/// What a thread does for its engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Coordinator,
    Worker(usize),
    Init,
    /// A memory monitor's thread (its id is the monitor's own).
    Monitor,
}

thread_local! {
    static MARK: Cell<Option<(u64, Role)>> = const { Cell::new(None) };
    /// The engines whose overflow handlers the calling thread is in, innermost
    /// last (any thread: a caller's flush can overflow too, and one engine's
    /// handler can hand entries to another).
    static HANDLING: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// Marks the calling thread as inside an overflow handler of `engine` until
/// the mark drops.
pub(crate) fn handling(engine: u64) -> HandlerMark {
    HANDLING.with(|h| h.borrow_mut().push(engine));
    HandlerMark(())
}

/// See [`handling`].
pub(crate) struct HandlerMark(());

impl Drop for HandlerMark {
    fn drop(&mut self) {
        HANDLING.with(|h| h.borrow_mut().pop());
    }
}

/// Whether the calling thread is inside an overflow handler of `engine`, at
/// any depth: a call that waits for that handler to return must fail at once.
pub(crate) fn in_handler_of(engine: u64) -> bool {
    HANDLING.with(|h| h.borrow().contains(&engine))
}

static NEXT_ENGINE: AtomicU64 = AtomicU64::new(1);

/// A new engine id, distinct from every other in this process.
pub(crate) fn new_engine_id() -> u64 {
    NEXT_ENGINE.fetch_add(1, Ordering::Relaxed)
}

/// Whether the calling thread is a memory monitor's: it must never wait for
/// an engine's room (only it could make some, by expanding).
pub(crate) fn on_monitor() -> bool {
    matches!(MARK.with(Cell::get), Some((_, Role::Monitor)))
}

/// The role of the calling thread in engine `engine`, if it is one of its own.
pub(crate) fn role_in(engine: u64) -> Option<Role> {
    MARK.with(Cell::get)
        .filter(|(id, _)| *id == engine)
        .map(|(_, role)| role)
}

/// The index of the calling thread among its engine's workers (0-based), or
/// `None` when it is not an engine's worker: for a task that keeps a resource
/// per worker (opened in [`Builder::on_worker_start`](crate::Builder::on_worker_start)).
pub fn worker_index() -> Option<usize> {
    match MARK.with(Cell::get) {
        Some((_, Role::Worker(w))) => Some(w),
        _ => None,
    }
}

/// Starts a named thread (with `stack` bytes of stack, if given); with a mark,
/// the thread knows it belongs to that engine in that role.
pub(crate) fn spawn(
    name: String,
    mark: Option<(u64, Role)>,
    stack: Option<usize>,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let mut builder = thread::Builder::new().name(name);
    if let Some(bytes) = stack {
        builder = builder.stack_size(bytes);
    }
    builder.spawn(move || {
        MARK.with(|m| m.set(mark));
        body()
    })
}

/// Per-worker hooks and thread settings (see the `Builder`'s worker options).
#[derive(Default)]
pub(crate) struct WorkerHooks {
    pub(crate) start: Option<WorkerHook>,
    pub(crate) stop: Option<WorkerHook>,
    pub(crate) name: Option<Box<dyn Fn(usize) -> String + Send + Sync>>,
    pub(crate) stack_size: Option<usize>,
}

/// Called with a worker's index on that worker's thread.
pub type WorkerHook = Box<dyn Fn(usize) + Send + Sync + 'static>;

/// The threads of one engine, each with its role.
#[derive(Default)]
pub(crate) struct Crew {
    members: Vec<(Role, JoinHandle<()>)>,
}

impl Crew {
    pub(crate) fn add(&mut self, role: Role, thread: JoinHandle<()>) {
        self.members.push((role, thread));
    }

    /// Joins every thread.
    pub(crate) fn join(self) {
        self.join_unless(|_| false);
    }

    /// Joins every thread except those `busy` says are inside user code, which
    /// are let go (their handles dropped). Returns how many were let go.
    pub(crate) fn join_unless(self, busy: impl Fn(Role) -> bool) -> usize {
        let mut let_go = 0;
        for (role, thread) in self.members {
            if busy(role) {
                let_go += 1;
                drop(thread);
            } else if thread.join().is_err() {
                // Each thread catches its own panics; this cannot happen.
                log::error!("an engine thread ({role:?}) ended with a panic");
            }
        }
        let_go
    }
}

impl std::fmt::Debug for Crew {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crew")
            .field("threads", &self.members.len())
            .finish()
    }
}
