//! The memory monitor: sheds queued work from the largest tasks when the process
//! uses more memory than its limit, and takes the shrink back once usage falls.
//!
//! One thread per monitor wakes every `check_interval` (or on
//! [`MemoryMonitor::check_now`]) and asks a [`MemoryProbe`] how much memory is in
//! use. Over the limit, it asks the registered tasks to shrink, largest first,
//! moving on while a task answers *minimum size*. Having shrunk, once usage is at or
//! below the expand threshold it expands every task. Tasks are held by weak
//! reference, an engine by its store, which does not keep the engine running: a
//! task that is dropped or shut down is forgotten.
//!
//! The probe and the tasks are user code: each call is contained, a panic is
//! logged and counted ([`MemoryMonitor::panics`]), and the monitor carries on.

use crate::clock::{self, Clock, Listener, ManualClock};
use crate::error::{BuildError, ShrinkError};
use crate::handle::Handle;
use crate::store::Store;
use crate::threads;
use crate::unwind::catch;
use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};
use parking_lot::{Condvar, Mutex};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Says how much memory is in use now.
pub trait MemoryProbe: Send + Sync + 'static {
    /// Bytes in use, or `None` when it cannot be read (the check is skipped).
    fn used_bytes(&self) -> Option<u64>;
}

/// The default probe on Linux: this process's resident set size.
///
/// Read from `/proc/self/smaps_rollup` (`Rss:`), which the kernel computes from the
/// page tables, so it is exact. The cheaper `VmRSS` of `/proc/self/status` (the
/// same figure as `/proc/self/statm`'s resident pages × page size) is used where
/// `smaps_rollup` is missing; it can lag behind by what each thread has not yet
/// reported (seen here: tens of MiB with transparent huge pages).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessRss;

impl MemoryProbe for ProcessRss {
    fn used_bytes(&self) -> Option<u64> {
        if let Ok(rollup) = std::fs::read_to_string("/proc/self/smaps_rollup") {
            if let Some(kib) = kib_field(&rollup, "Rss:") {
                return Some(kib * 1024);
            }
        }
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        kib_field(&status, "VmRSS:").map(|kib| kib * 1024)
    }
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The machine's total memory, where it can be read (Linux: `/proc/meminfo`).
pub fn total_memory() -> Option<u64> {
    total_memory_in(Path::new("/"))
}

fn total_memory_in(root: &Path) -> Option<u64> {
    let info = std::fs::read_to_string(root.join("proc/meminfo")).ok()?;
    kib_field(&info, "MemTotal:").map(|kib| kib * 1024)
}

/// The memory limit of this process's control group, where one is set (Linux:
/// cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`, the lowest along the
/// group's path): the limit a container runs under. `None`: no limit, or no
/// cgroup to read.
pub fn cgroup_memory_limit() -> Option<u64> {
    cgroup_limit_in(Path::new("/"))
}

/// Values this large mean "no limit" in cgroup v1 (it writes `i64::MAX` rounded
/// down to a page).
const V1_UNLIMITED: u64 = 1 << 62;

/// The cgroup limit with `/proc` and `/sys` read under `root`.
fn cgroup_limit_in(root: &Path) -> Option<u64> {
    let groups = std::fs::read_to_string(root.join("proc/self/cgroup")).ok()?;
    let cgroup = root.join("sys/fs/cgroup");
    let mut limits = Vec::new();
    for line in groups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.is_empty() && cgroup.join("cgroup.controllers").exists() {
            limits.extend(along(&cgroup, path, "memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            limits.extend(along(&cgroup.join("memory"), path, "memory.limit_in_bytes"));
        }
    }
    limits.into_iter().min()
}

/// The limits in `file` in the group `path` under `mount` and each group above
/// it (a container often sees only the mount's own file).
fn along(mount: &Path, path: &str, file: &str) -> Vec<u64> {
    let mut dir = mount.join(path);
    let mut limits = Vec::new();
    loop {
        if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
            match text.trim().parse::<u64>() {
                Ok(bytes) if bytes < V1_UNLIMITED => limits.push(bytes),
                _ => {} // "max", or v1's "unlimited"
            }
        }
        if dir == mount || !dir.pop() || !dir.starts_with(mount) {
            return limits;
        }
    }
}

/// Something the monitor can shrink and expand. Every [`Handle`] is one.
pub trait Shrinkable: Send + Sync {
    /// A name for log lines.
    fn name(&self) -> String;
    /// Bytes of queued work this task holds now.
    fn memory_usage(&self) -> usize;
    /// Shed part of the queued work.
    ///
    /// # Errors
    ///
    /// [`ShrinkError::MinimumSize`] when there is nothing left to shed.
    fn shrink(&self) -> Result<(), ShrinkError>;
    /// Lift a shrink.
    fn expand(&self);
    /// Whether a shrink is in force.
    fn is_shrunk(&self) -> bool;
    /// Whether the task has stopped (it is then forgotten).
    fn is_stopped(&self) -> bool {
        false
    }
}

impl<T: Send + 'static> Shrinkable for Handle<T> {
    fn name(&self) -> String {
        Handle::name(self).to_string()
    }
    fn memory_usage(&self) -> usize {
        Handle::memory_usage(self).unwrap_or(0)
    }
    fn shrink(&self) -> Result<(), ShrinkError> {
        Handle::shrink(self)
    }
    fn expand(&self) {
        let _ = Handle::expand(self);
    }
    fn is_shrunk(&self) -> bool {
        Handle::is_shrunk(self).unwrap_or(false)
    }
    fn is_stopped(&self) -> bool {
        Handle::is_stopped(self)
    }
}

/// A registered task, held without keeping it alive.
trait Registrant: Send + Sync {
    fn upgrade(&self) -> Option<Box<dyn Shrinkable>>;
}

/// An engine, seen through its store: holding it does not keep the engine
/// running, so the user's last drop stops and joins it even during a check.
struct EngineView<T: Send + 'static>(Arc<Store<T>>);

impl<T: Send + 'static> Shrinkable for EngineView<T> {
    fn name(&self) -> String {
        self.0.name().to_string()
    }
    fn memory_usage(&self) -> usize {
        self.0.memory_usage().unwrap_or(0)
    }
    fn shrink(&self) -> Result<(), ShrinkError> {
        self.0.shrink()
    }
    fn expand(&self) {
        let _ = self.0.expand();
    }
    fn is_shrunk(&self) -> bool {
        self.0.is_shrunk().unwrap_or(false)
    }
    fn is_stopped(&self) -> bool {
        self.0.is_stopped()
    }
}

impl<T: Send + 'static> Registrant for Weak<Store<T>> {
    fn upgrade(&self) -> Option<Box<dyn Shrinkable>> {
        Weak::upgrade(self).map(|s| Box::new(EngineView(s)) as Box<dyn Shrinkable>)
    }
}

struct WeakArc<S: Shrinkable + 'static>(Weak<S>);

impl<S: Shrinkable + 'static> Registrant for WeakArc<S> {
    fn upgrade(&self) -> Option<Box<dyn Shrinkable>> {
        self.0
            .upgrade()
            .map(|s| Box::new(ArcShrinkable(s)) as Box<dyn Shrinkable>)
    }
}

struct ArcShrinkable<S: Shrinkable>(Arc<S>);

impl<S: Shrinkable> Shrinkable for ArcShrinkable<S> {
    fn name(&self) -> String {
        self.0.name()
    }
    fn memory_usage(&self) -> usize {
        self.0.memory_usage()
    }
    fn shrink(&self) -> Result<(), ShrinkError> {
        self.0.shrink()
    }
    fn expand(&self) {
        self.0.expand()
    }
    fn is_shrunk(&self) -> bool {
        self.0.is_shrunk()
    }
    fn is_stopped(&self) -> bool {
        self.0.is_stopped()
    }
}

/// What one check did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckOutcome {
    /// Usage is within bounds (or between the expand threshold and the limit): nothing done.
    Normal,
    /// Over the limit: the named task was shrunk.
    Shrunk(String),
    /// Over the limit, and no task could shrink (logged at error level).
    NothingToShrink,
    /// Back at or below the expand threshold after a shrink: this many tasks expanded.
    Expanded(usize),
    /// The probe could not read the usage; nothing done.
    ProbeFailed,
}

/// Builds a [`MemoryMonitor`].
#[must_use = "a builder does nothing until `start`"]
pub struct MonitorBuilder {
    limit_bytes: Option<u64>,
    limit_percent: u8,
    check_interval: Duration,
    expand_percent: u8,
    probe: Option<Arc<dyn MemoryProbe>>,
    clock: Clock,
    root: PathBuf,
}

impl std::fmt::Debug for MonitorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MonitorBuilder")
            .field("limit_bytes", &self.limit_bytes)
            .field("limit_percent", &self.limit_percent)
            .field("check_interval", &self.check_interval)
            .field("expand_percent", &self.expand_percent)
            .finish_non_exhaustive()
    }
}

/// Used when neither a limit nor the machine's total memory is known.
pub const FALLBACK_LIMIT: u64 = 1 << 30;

impl MonitorBuilder {
    /// The limit in bytes. Default: `limit_percent` of the memory this process
    /// may use (the smaller of the machine's total memory and its cgroup's
    /// limit, so a container's limit counts), or 1 GiB where neither can be
    /// read. Zero is rejected.
    pub fn limit_bytes(mut self, bytes: u64) -> Self {
        self.limit_bytes = Some(bytes);
        self
    }

    /// The limit as a percentage (1–100) of the memory this process may use
    /// (see [`MonitorBuilder::limit_bytes`]), used when no byte limit is set.
    /// Default 60.
    pub fn limit_percent(mut self, percent: u8) -> Self {
        self.limit_percent = percent;
        self
    }

    /// How often the monitor checks. Default 1 minute; zero is rejected; a huge
    /// interval (`Duration::MAX`) means only [`MemoryMonitor::check_now`] checks.
    pub fn check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// After a shrink, expand every task once usage is at or below this percentage
    /// (1–100) of the limit. Default 40.
    pub fn expand_threshold_percent(mut self, percent: u8) -> Self {
        self.expand_percent = percent;
        self
    }

    /// Where usage is read from. Default on Linux: [`ProcessRss`]; elsewhere one must
    /// be given.
    pub fn probe(mut self, probe: impl MemoryProbe) -> Self {
        self.probe = Some(Arc::new(probe));
        self
    }

    /// Where `/proc` and `/sys` are read from for the default limit (the
    /// machine's memory and the cgroup's limit). Default `/`; for tests, or a
    /// host's filesystem mounted elsewhere.
    pub fn system_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = root.into();
        self
    }

    /// The limit when none is given: `limit_percent` of the memory this process
    /// may use, the smaller of the machine's memory and its cgroup's limit (a
    /// container's); 1 GiB when neither can be read.
    fn default_limit(&self) -> u64 {
        let machine = total_memory_in(&self.root);
        let cgroup = cgroup_limit_in(&self.root);
        let room = match (machine, cgroup) {
            (Some(m), Some(c)) => m.min(c),
            (m, c) => match m.or(c) {
                Some(bytes) => bytes,
                None => return FALLBACK_LIMIT,
            },
        };
        let limit = room / 100 * u64::from(self.limit_percent);
        log::info!(
            "memory monitor: limit {} ({}% of {}{})",
            human(limit),
            self.limit_percent,
            human(room),
            if cgroup.is_some_and(|c| Some(c) <= machine) {
                ", the cgroup's limit"
            } else {
                ""
            }
        );
        limit
    }

    /// Reads the check interval from `clock`, which only moves when advanced
    /// (for tests). Default: the system's monotonic clock.
    pub fn clock(mut self, clock: &ManualClock) -> Self {
        self.clock = Clock::Manual(clock.clone());
        self
    }

    fn validate(&self) -> Result<(), BuildError> {
        if self.limit_bytes == Some(0) {
            return Err(BuildError::Monitor("limit_bytes must be above zero"));
        }
        if !(1..=100).contains(&self.limit_percent) {
            return Err(BuildError::Monitor("limit_percent must be within 1..=100"));
        }
        if !(1..=100).contains(&self.expand_percent) {
            return Err(BuildError::Monitor(
                "expand_threshold_percent must be within 1..=100",
            ));
        }
        if self.check_interval.is_zero() {
            return Err(BuildError::Monitor("check_interval must be above zero"));
        }
        Ok(())
    }

    /// Validates the settings and starts the monitor's thread.
    ///
    /// # Errors
    ///
    /// [`BuildError::Monitor`] for a zero limit or interval, a percentage outside
    /// 1–100, or no probe on a platform without a default; [`BuildError::Spawn`]
    /// when the thread cannot start.
    pub fn start(self) -> Result<MemoryMonitor, BuildError> {
        self.validate()?;
        let limit = self.limit_bytes.unwrap_or_else(|| self.default_limit());
        let probe: Arc<dyn MemoryProbe> = match self.probe {
            Some(p) => p,
            None if cfg!(target_os = "linux") => Arc::new(ProcessRss),
            None => {
                return Err(BuildError::Monitor(
                    "no default memory probe on this platform; set one with .probe()",
                ))
            }
        };
        let (requests, rx) = unbounded();
        let state = Arc::new(MonitorState {
            tasks: Mutex::new(Vec::new()),
            next_task: AtomicU64::new(0),
            shrunk: Mutex::new(false),
            probe,
            limit,
            expand_at: limit / 100 * u64::from(self.expand_percent),
            panics: AtomicU64::new(0),
            clock: self.clock,
            wake: requests.clone(),
            id: threads::new_engine_id(),
            seen: Mutex::new(None),
            rounds: Condvar::new(),
        });
        let listener: Arc<dyn Listener> = state.clone();
        state.clock.listen(Arc::downgrade(&listener));
        drop(listener);
        let (interval, thread_state) = (self.check_interval, state.clone());
        let first = clock::after(state.clock.now(), interval);
        let mark = Some((state.id, threads::Role::Monitor));
        let thread = threads::spawn("memory-monitor".to_string(), mark, None, move || {
            monitor_loop(&thread_state, &rx, interval, first)
        })
        .map_err(BuildError::Spawn)?;
        Ok(MemoryMonitor {
            inner: Arc::new(MonitorInner {
                state,
                requests: Some(requests),
                thread: Some(thread),
            }),
        })
    }
}

/// A message to the monitor's thread.
enum Msg {
    /// Check now and answer.
    Check(Sender<CheckOutcome>),
    /// The manual clock moved: look at the time.
    Wake,
    /// The last `MemoryMonitor` is gone.
    Stop,
}

struct MonitorState {
    /// Registered tasks, each with an id (forgotten by id, never by place:
    /// two sweeps may run at once).
    tasks: Mutex<Vec<(u64, Box<dyn Registrant>)>>,
    next_task: AtomicU64,
    /// A check shrank a task and no check expanded them since.
    shrunk: Mutex<bool>,
    probe: Arc<dyn MemoryProbe>,
    limit: u64,
    expand_at: u64,
    /// Panics in the probe, a task, or the monitor itself.
    panics: AtomicU64,
    clock: Clock,
    wake: Sender<Msg>,
    /// The monitor thread's id, for its role mark.
    id: u64,
    /// The clock time of the thread's last look, and a wake-up for `advance`.
    seen: Mutex<Option<Instant>>,
    rounds: Condvar,
}

impl Listener for MonitorState {
    /// A manual clock moved: the caller waits until the monitor has looked at
    /// the new time (so a check now due has run when `advance` returns).
    fn advanced(&self) {
        let target = self.clock.now();
        let mut seen = self.seen.lock();
        if self.wake.send(Msg::Wake).is_err() || threads::role_in(self.id).is_some() {
            return;
        }
        let give_up = Instant::now() + Duration::from_secs(10);
        while !seen.is_some_and(|s| s >= target) {
            if self.rounds.wait_until(&mut seen, give_up).timed_out() {
                log::warn!("memory monitor: did not look at the new time");
                break;
            }
        }
    }
}

impl MonitorState {
    fn add(&self, task: Box<dyn Registrant>) {
        let id = self.next_task.fetch_add(1, Ordering::Relaxed);
        self.tasks.lock().push((id, task));
    }

    /// Runs user code (the probe, a task) contained: a panic is logged, counted,
    /// and comes back as `None`.
    fn contained<R>(&self, what: &str, f: impl FnOnce() -> R) -> Option<R> {
        match catch(f) {
            Ok(r) => Some(r),
            Err(msg) => {
                self.panics.fetch_add(1, Ordering::Relaxed);
                log::error!("memory monitor: {what} panicked: {msg}");
                None
            }
        }
    }
}

struct MonitorInner {
    state: Arc<MonitorState>,
    requests: Option<Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for MonitorInner {
    fn drop(&mut self) {
        // The state keeps a sender for clock wake-ups, so the channel stays
        // open: say goodbye explicitly.
        if let Some(requests) = self.requests.take() {
            let _ = requests.send(Msg::Stop);
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("memory monitor thread panicked");
            }
        }
    }
}

/// A running memory monitor. Cheap to clone; the thread stops and is joined when
/// the last clone is dropped. Tasks hold no clone (they register and are held by
/// weak reference).
///
/// ```
/// use buffered_task::{CheckOutcome, MemoryMonitor, MemoryProbe};
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
///
/// struct Fixed(Arc<AtomicU64>);
/// impl MemoryProbe for Fixed {
///     fn used_bytes(&self) -> Option<u64> { Some(self.0.load(Ordering::Relaxed)) }
/// }
/// let used = Arc::new(AtomicU64::new(10));
/// let monitor = MemoryMonitor::builder()
///     .limit_bytes(100)
///     .probe(Fixed(used.clone()))
///     .start()?;
/// assert_eq!(monitor.check_now(), CheckOutcome::Normal);
/// used.store(500, Ordering::Relaxed);
/// assert_eq!(monitor.check_now(), CheckOutcome::NothingToShrink); // no tasks yet
/// # Ok::<(), buffered_task::BuildError>(())
/// ```
#[derive(Clone)]
pub struct MemoryMonitor {
    inner: Arc<MonitorInner>,
}

impl std::fmt::Debug for MemoryMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryMonitor")
            .field("limit", &self.inner.state.limit)
            .finish_non_exhaustive()
    }
}

impl MemoryMonitor {
    /// A builder with every option at its default.
    pub fn builder() -> MonitorBuilder {
        MonitorBuilder {
            limit_bytes: None,
            limit_percent: 60,
            check_interval: Duration::from_secs(60),
            expand_percent: 40,
            probe: None,
            clock: Clock::System,
            root: PathBuf::from("/"),
        }
    }

    /// The limit in force, in bytes.
    pub fn limit(&self) -> u64 {
        self.inner.state.limit
    }

    /// How many times the probe, a registered task, or the monitor itself
    /// panicked (each was logged; the monitor carried on).
    pub fn panics(&self) -> u64 {
        self.inner.state.panics.load(Ordering::Relaxed)
    }

    /// Registers an engine (done for you by
    /// [`Builder::memory_monitor`](crate::Builder::memory_monitor)). The monitor
    /// holds its store, which does not keep the engine running.
    pub(crate) fn register<T: Send + 'static>(&self, handle: &Handle<T>) {
        self.inner.state.add(Box::new(handle.store_weak()));
    }

    /// Registers any other [`Shrinkable`], held by weak reference.
    pub fn register_shrinkable<S: Shrinkable + 'static>(&self, task: &Arc<S>) {
        self.inner
            .state
            .add(Box::new(WeakArc(Arc::downgrade(task))));
    }

    /// How many live tasks are registered (dropped and stopped ones are forgotten).
    pub fn task_count(&self) -> usize {
        live_tasks(&self.inner.state).len()
    }

    /// Runs a check now, on the monitor's thread, and says what it did. Called
    /// on the monitor's own thread (from a handler a shrink ran), it checks
    /// right there instead of waiting for itself.
    pub fn check_now(&self) -> CheckOutcome {
        let state = &self.inner.state;
        if threads::role_in(state.id) == Some(threads::Role::Monitor) {
            return state
                .contained("the monitor's check", || check(state))
                .unwrap_or(CheckOutcome::ProbeFailed);
        }
        let (tx, rx) = bounded(1);
        match &self.inner.requests {
            Some(requests) if requests.send(Msg::Check(tx)).is_ok() => {
                rx.recv().unwrap_or(CheckOutcome::ProbeFailed)
            }
            _ => CheckOutcome::ProbeFailed,
        }
    }
}

/// The monitor's thread: a check every `every` on its clock, or when asked;
/// ends when the last `MemoryMonitor` is dropped.
fn monitor_loop(state: &MonitorState, requests: &Receiver<Msg>, every: Duration, first: Instant) {
    let mut next = first;
    loop {
        let msg = match state.clock.real(Some(next)) {
            Some(at) => requests.recv_deadline(at),
            None => requests.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let reply = match msg {
            Ok(Msg::Check(reply)) => Some(reply),
            Ok(Msg::Wake) | Err(RecvTimeoutError::Timeout) => None,
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
        };
        let now = state.clock.now();
        let due = now >= next;
        if due {
            next = clock::after(now, every);
        }
        if due || reply.is_some() {
            let outcome = state
                .contained("the monitor's check", || check(state))
                .unwrap_or(CheckOutcome::ProbeFailed);
            if let Some(reply) = reply {
                let _ = reply.send(outcome);
            }
        }
        *state.seen.lock() = Some(now);
        state.rounds.notify_all();
    }
}

/// Live tasks; dropped and stopped ones are removed from the registry.
fn live_tasks(state: &MonitorState) -> Vec<Box<dyn Shrinkable>> {
    // Upgrade under the lock (cheap, no user code), ask questions after it.
    let upgraded: Vec<(u64, Option<Box<dyn Shrinkable>>)> = {
        let tasks = state.tasks.lock();
        tasks.iter().map(|(id, t)| (*id, t.upgrade())).collect()
    };
    let mut live = Vec::new();
    let mut gone = Vec::new();
    for (id, task) in upgraded {
        let stopped = task.as_ref().map_or(true, |t| {
            state
                .contained("a task's is_stopped", || t.is_stopped())
                .unwrap_or(false)
        });
        match task {
            Some(task) if !stopped => live.push(task),
            _ => gone.push(id),
        }
    }
    if !gone.is_empty() {
        state.tasks.lock().retain(|(id, _)| !gone.contains(id));
    }
    live
}

/// Bytes in binary units, for log lines.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn check(state: &MonitorState) -> CheckOutcome {
    crate::fault::hit("memory-monitor", "monitor");
    let Some(Some(used)) = state.contained("the memory probe", || state.probe.used_bytes()) else {
        log::warn!("memory monitor: could not read memory usage; check skipped");
        return CheckOutcome::ProbeFailed;
    };
    if used > state.limit {
        shrink_largest(state, used)
    } else if *state.shrunk.lock() && used <= state.expand_at {
        let tasks = live_tasks(state);
        for task in &tasks {
            state.contained("a task's expand", || task.expand());
        }
        *state.shrunk.lock() = false;
        log::info!(
            "memory monitor: {} in use, at or below {}; expanded {} tasks",
            human(used),
            human(state.expand_at),
            tasks.len()
        );
        CheckOutcome::Expanded(tasks.len())
    } else {
        CheckOutcome::Normal
    }
}

/// Over the limit: shrink the task holding the most, or the next while one is
/// at its minimum size.
fn shrink_largest(state: &MonitorState, used: u64) -> CheckOutcome {
    let limit = state.limit;
    log::warn!(
        "memory monitor: {} in use, over the limit of {} ({:.0}%); shrinking the largest task",
        human(used),
        human(limit),
        used as f64 * 100.0 / limit as f64
    );
    let mut tasks: Vec<(usize, Box<dyn Shrinkable>)> = live_tasks(state)
        .into_iter()
        .map(|t| {
            (
                state
                    .contained("a task's memory_usage", || t.memory_usage())
                    .unwrap_or(0),
                t,
            )
        })
        .collect();
    tasks.sort_by_key(|t| std::cmp::Reverse(t.0));
    for (bytes, task) in tasks {
        let name = state
            .contained("a task's name", || task.name())
            .unwrap_or_else(|| "<task>".to_string());
        match state.contained("a task's shrink", || task.shrink()) {
            Some(Ok(())) => {
                *state.shrunk.lock() = true;
                log::warn!(
                    "memory monitor: shrank {name} (it held {} of queued work)",
                    human(bytes as u64)
                );
                return CheckOutcome::Shrunk(name);
            }
            Some(Err(ShrinkError::MinimumSize)) => {
                log::debug!("memory monitor: {name} is at its minimum size");
            }
            Some(Err(err)) => log::debug!("memory monitor: {name}: {err}"),
            None => {}
        }
    }
    log::error!(
        "memory monitor: {} in use, over the limit of {}, and no task could shrink",
        human(used),
        human(limit)
    );
    CheckOutcome::NothingToShrink
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1024), "1.0 KiB");
        assert_eq!(human(1536 * 1024), "1.5 MiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
        assert_eq!(human(u64::MAX), "16777216.0 TiB"); // the largest unit stays
    }

    #[test]
    fn the_kernel_files_are_read_by_field() {
        let rollup = "00400000-7fff0000 ---p 00000000 00:00 0    [rollup]\n\
                      Rss:              123456 kB\n\
                      Pss:               99999 kB\n";
        assert_eq!(kib_field(rollup, "Rss:"), Some(123_456));
        let status = "Name:\tbuffered\nVmRSS:\t    2048 kB\nThreads:\t3\n";
        assert_eq!(kib_field(status, "VmRSS:"), Some(2048));
        assert_eq!(kib_field(status, "VmSwap:"), None);
        assert_eq!(kib_field("Rss: many kB\n", "Rss:"), None);
    }

    /// On Linux the default probe reads `smaps_rollup` where the kernel has
    /// it, and it agrees with `status` to within what threads have not yet
    /// reported.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_default_probe_reads_this_process() {
        let used = ProcessRss.used_bytes().expect("readable on Linux");
        assert!(used > 0);
        if let Ok(rollup) = std::fs::read_to_string("/proc/self/smaps_rollup") {
            let kib = kib_field(&rollup, "Rss:").expect("an Rss line");
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let vm = kib_field(&status, "VmRSS:").expect("a VmRSS line");
            // Read at different moments: the probe's figure lies near both.
            let (lo, hi) = (kib.min(vm) / 2, kib.max(vm) * 2);
            assert!(
                (lo * 1024..=hi * 1024).contains(&used),
                "{used} vs {kib} / {vm} KiB"
            );
        }
    }
}
