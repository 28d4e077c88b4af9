//! Starting an engine: the store, the channels, the threads; a half-built
//! engine tears itself down. [`Engine`] is what every handle shares; dropping it
//! (the last handle) stops the engine.

use crate::clock::Listener;
use crate::coordinator::Coordinator;
use crate::error::{BuildError, ControlError};
use crate::pool::{self, StateSlot};
use crate::settings::Config;
use crate::shutdown::{self, Mode, ShutdownReport};
use crate::store::{Parts, Store};
use crate::task::Task;
use crate::threads::{self, Crew, Role};
use crossbeam_channel::{bounded, unbounded, Receiver};
use parking_lot::Mutex;
use std::sync::Arc;

/// A running engine: its store and its threads.
pub(crate) struct Engine<T: Send + 'static> {
    pub(crate) store: Arc<Store<T>>,
    crew: Mutex<Option<Crew>>,
}

impl<T: Send + 'static> Engine<T> {
    pub(crate) fn shutdown(&self, mode: Mode) -> Result<ShutdownReport<T>, ControlError> {
        shutdown::stop(&self.store, &self.crew, mode)
    }
}

impl<T: Send + 'static> Drop for Engine<T> {
    fn drop(&mut self) {
        shutdown::abandon(&self.store, &self.crew);
    }
}

/// Starts the threads for `task` over a new store.
pub(crate) fn start<K: Task>(
    task: K,
    state: K::State,
    config: Config,
    parts: Parts<K::Entry>,
) -> Result<Engine<K::Entry>, BuildError> {
    let id = threads::new_engine_id();
    let (nudge, nudges) = bounded(1);
    let store = Arc::new(Store::new(config, id, parts, nudge));
    let listener: Arc<dyn Listener> = store.clone();
    store.clock().listen(Arc::downgrade(&listener));
    drop(listener);
    let engine = Engine {
        store: store.clone(),
        crew: Mutex::new(Some(Crew::default())),
    };
    // From here on, an early return drops `engine`, which stops and joins
    // whatever was started.
    spawn_all(
        &engine,
        Arc::new(task),
        Arc::new(StateSlot::new(state)),
        nudges,
    )?;
    Ok(engine)
}

fn spawn_all<K: Task>(
    engine: &Engine<K::Entry>,
    task: Arc<K>,
    state: Arc<StateSlot<K::State>>,
    nudges: Receiver<()>,
) -> Result<(), BuildError> {
    let store = &engine.store;
    let (name, id) = (store.config.name.clone(), store.id);
    let (init_tx, init_rx) = unbounded::<()>();
    let spawn = |role: Role, label: String, body: Box<dyn FnOnce() + Send>| {
        let s = store.clone();
        let stack = match role {
            Role::Worker(_) => store.workers.stack_size,
            _ => None,
        };
        let thread = threads::spawn(label, Some((id, role)), stack, move || {
            pool::contained(&s, role, body)
        })
        .map_err(BuildError::Spawn)?;
        if let Some(crew) = engine.crew.lock().as_mut() {
            crew.add(role, thread);
        }
        Ok::<(), BuildError>(())
    };
    for w in 0..store.config.max_concurrency {
        let (task, state, s) = (task.clone(), state.clone(), store.clone());
        let default = || format!("{name}-worker-{w}");
        let label = match &store.workers.name {
            // User code: contained, and a name a thread can hold.
            Some(f) => crate::unwind::catch(|| f(w))
                .ok()
                .filter(|n| !n.contains('\0'))
                .unwrap_or_else(default),
            None => default(),
        };
        spawn(
            Role::Worker(w),
            label,
            Box::new(move || pool::worker(w, task, state, &s)),
        )?;
    }
    let s = store.clone();
    spawn(
        Role::Init,
        format!("{name}-init"),
        Box::new(move || pool::init_runner(task, state, init_rx, s)),
    )?;
    let coordinator = Coordinator::new(store.clone(), nudges);
    spawn(
        Role::Coordinator,
        format!("{name}-coordinator"),
        Box::new(move || coordinator.run()),
    )?;
    // Every thread runs: the first `init` starts now.
    store.first_init(init_tx);
    Ok(())
}
