//! Helpers shared by the integration tests: a task built from closures, and
//! channel-based waiting with a generous bound that only catches hangs.
#![allow(dead_code)]

use buffered_task::{Outcome, Sink, Task};
use crossbeam_channel::Receiver;
use std::time::Duration;

/// Long enough that only a hang reaches it.
pub const HANG: Duration = Duration::from_secs(20);

type InitFn<T, S> = Box<dyn Fn(&mut Sink<T>, &S) + Send + Sync>;
type RunFn<T, S> = Box<dyn Fn(&[T], &S) -> Outcome<T, S> + Send + Sync>;

/// A task whose `init` and `run` are closures.
pub struct Script<T, S> {
    init: InitFn<T, S>,
    run: RunFn<T, S>,
}

impl<T: Send + 'static, S: Send + Sync + 'static> Script<T, S> {
    pub fn new(run: impl Fn(&[T], &S) -> Outcome<T, S> + Send + Sync + 'static) -> Self {
        Script {
            init: Box::new(|_, _| {}),
            run: Box::new(run),
        }
    }

    pub fn with_init(mut self, init: impl Fn(&mut Sink<T>, &S) + Send + Sync + 'static) -> Self {
        self.init = Box::new(init);
        self
    }
}

impl<T: Send + 'static, S: Send + Sync + 'static> Task for Script<T, S> {
    type Entry = T;
    type State = S;
    fn init(&self, sink: &mut Sink<T>, state: &S) {
        (self.init)(sink, state)
    }
    fn run(&self, batch: &[T], state: &S) -> Outcome<T, S> {
        (self.run)(batch, state)
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
