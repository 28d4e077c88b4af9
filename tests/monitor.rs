//! The memory monitor (SPEC §8): deterministic, with a settable probe and
//! `check_now`.

mod common;
use buffered_task::{
    BuildError, Builder, CheckOutcome, FlushInterval, Handle, MemoryMonitor, MemoryProbe, Outcome,
    OverflowReason,
};
use common::*;
use crossbeam_channel::{unbounded, Receiver};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const LIMIT: u64 = 1_000_000;

/// A probe whose value the test sets.
#[derive(Clone, Default)]
struct Dial(Arc<AtomicU64>);

impl Dial {
    fn set(&self, bytes: u64) {
        self.0.store(bytes, Ordering::SeqCst);
    }
}

impl MemoryProbe for Dial {
    fn used_bytes(&self) -> Option<u64> {
        Some(self.0.load(Ordering::SeqCst))
    }
}

fn monitor(dial: &Dial) -> MemoryMonitor {
    MemoryMonitor::builder()
        .limit_bytes(LIMIT)
        .check_interval(Duration::from_secs(3600)) // only check_now checks
        .probe(dial.clone())
        .start()
        .unwrap()
}

struct Rig {
    handle: Handle<u64>,
    books: Arc<Books<u64>>,
    gate: Gate,
    shed: Receiver<(Vec<u64>, OverflowReason)>,
}

/// An engine registered with `monitor`, its one worker held, `queued` entries
/// queued behind the held one. Each entry weighs `weight` heap bytes.
fn task(monitor: &MemoryMonitor, name: &str, queued: u64, weight: usize) -> Rig {
    let gate = Gate::new();
    let held = gate.clone();
    let (shed_tx, shed) = unbounded();
    let (started_tx, started) = unbounded();
    let books = Books::new();
    let b = books.clone();
    let handle = Builder::new(
        Script::new(move |_: &[u64], _: &()| {
            let _ = started_tx.send(());
            held.wait();
            Outcome::Ok
        })
        .with_books(&books),
        (),
    )
    .name(name)
    .max_batch_size(1)
    .flush_interval(FlushInterval::Never)
    .poll(false)
    .memory_monitor(monitor)
    .weigher(move |_| weight)
    .overflow_handler(move |entries, reason| {
        b.overflowed(&entries);
        shed_tx.send((entries, reason)).unwrap()
    })
    .start()
    .unwrap();
    books.push_back(&handle, vec![u64::MAX]).unwrap(); // runs, held
    recv(&started);
    books.push_back(&handle, (0..queued).collect()).unwrap();
    assert_eq!(handle.debug_count().unwrap().waiting as u64, queued);
    Rig {
        handle,
        books,
        gate,
        shed,
    }
}

fn queued(rig: &Rig) -> usize {
    rig.handle.debug_count().unwrap().waiting
}

/// Drains every rig and checks its books.
fn finish(rigs: &[&Rig]) {
    for rig in rigs {
        rig.gate.open();
        rig.books.finish(rig.handle.shutdown_drain().unwrap());
    }
}

#[test]
fn over_the_limit_only_the_largest_task_shrinks() {
    let dial = Dial::default();
    let monitor = monitor(&dial);
    let small = task(&monitor, "small", 10, 0);
    let large = task(&monitor, "large", 30, 0);
    let middle = task(&monitor, "middle", 20, 0);
    assert_eq!(monitor.task_count(), 3);

    dial.set(LIMIT / 2);
    assert_eq!(monitor.check_now(), CheckOutcome::Normal);
    dial.set(LIMIT + 1);
    assert_eq!(monitor.check_now(), CheckOutcome::Shrunk("large".into()));
    assert_eq!(
        (queued(&small), queued(&middle), queued(&large)),
        (10, 20, 15)
    );
    assert!(large.handle.is_shrunk().unwrap());
    assert!(!middle.handle.is_shrunk().unwrap());
    let (shed, reason) = recv(&large.shed);
    assert_eq!((shed, reason), ((15..30).collect(), OverflowReason::Shrink));

    // Still over: the largest now is "middle" (20 > 15).
    assert_eq!(monitor.check_now(), CheckOutcome::Shrunk("middle".into()));
    assert_eq!(
        (queued(&small), queued(&middle), queued(&large)),
        (10, 10, 15)
    );
    finish(&[&small, &middle, &large]);
}

#[test]
fn a_largest_task_at_minimum_size_passes_the_shrink_to_the_next() {
    let dial = Dial::default();
    let monitor = monitor(&dial);
    // One entry that owns 10 MB on the heap: the largest, but it cannot shrink.
    let heavy = task(&monitor, "heavy", 1, 10_000_000);
    let light = task(&monitor, "light", 8, 0);
    assert!(heavy.handle.memory_usage().unwrap() > light.handle.memory_usage().unwrap());
    dial.set(LIMIT * 2);
    assert_eq!(monitor.check_now(), CheckOutcome::Shrunk("light".into()));
    assert_eq!((queued(&heavy), queued(&light)), (1, 4));
    finish(&[&heavy, &light]);
}

#[test]
fn when_no_task_can_shrink_the_error_path_runs_and_nothing_panics() {
    let dial = Dial::default();
    let monitor = monitor(&dial);
    let a = task(&monitor, "a", 1, 0);
    let b = task(&monitor, "b", 0, 0);
    dial.set(LIMIT * 3);
    assert_eq!(monitor.check_now(), CheckOutcome::NothingToShrink);
    assert_eq!((queued(&a), queued(&b)), (1, 0));
    // The monitor lives on.
    assert_eq!(monitor.check_now(), CheckOutcome::NothingToShrink);
    finish(&[&a, &b]);
}

#[test]
fn after_a_shrink_tasks_expand_at_or_below_forty_percent_and_not_above() {
    let dial = Dial::default();
    let monitor = monitor(&dial);
    let a = task(&monitor, "a", 10, 0);
    let b = task(&monitor, "b", 4, 0);
    dial.set(LIMIT + 1);
    assert_eq!(monitor.check_now(), CheckOutcome::Shrunk("a".into()));
    assert_eq!(monitor.check_now(), CheckOutcome::Shrunk("a".into()));
    assert_eq!(monitor.check_now(), CheckOutcome::Shrunk("b".into()));

    // Between 40% and 100%: nothing happens.
    dial.set(LIMIT * 41 / 100);
    assert_eq!(monitor.check_now(), CheckOutcome::Normal);
    assert!(a.handle.is_shrunk().unwrap() && b.handle.is_shrunk().unwrap());
    dial.set(LIMIT);
    assert_eq!(monitor.check_now(), CheckOutcome::Normal);

    // At 40%: every task expands, once.
    dial.set(LIMIT * 40 / 100);
    assert_eq!(monitor.check_now(), CheckOutcome::Expanded(2));
    assert!(!a.handle.is_shrunk().unwrap() && !b.handle.is_shrunk().unwrap());
    assert_eq!(monitor.check_now(), CheckOutcome::Normal);
    // Unbounded again: a push is taken whole.
    a.books.push_back(&a.handle, (100..200).collect()).unwrap();
    assert_eq!(queued(&a), 2 + 100);
    finish(&[&a, &b]);
}

#[test]
fn a_dropped_or_stopped_task_disappears_from_the_monitor() {
    let dial = Dial::default();
    let monitor = monitor(&dial);
    let quiet = |name: &str| {
        Builder::new(Script::new(|_: &[u64], _: &()| Outcome::Ok), ())
            .name(name)
            .memory_monitor(&monitor)
            .start()
            .unwrap()
    };
    let a = quiet("a");
    let b = quiet("b");
    let c = quiet("c");
    assert_eq!(monitor.task_count(), 3);
    drop(a);
    assert_eq!(monitor.task_count(), 2);
    b.shutdown_drain().unwrap();
    assert_eq!(monitor.task_count(), 1);
    // b's handle still exists but is stopped: over the limit, only c is asked.
    dial.set(LIMIT + 1);
    assert_eq!(monitor.check_now(), CheckOutcome::NothingToShrink);
    drop(c);
    assert_eq!(monitor.task_count(), 0);
}

#[test]
fn shed_entries_reach_the_overflow_handler_and_init_finds_them_again() {
    let dial = Dial::default();
    let monitor = monitor(&dial);
    let gate = Gate::new();
    let held = gate.clone();
    let (init_tx, inits) = unbounded();
    let (shed_tx, shed) = unbounded();
    let (ran_tx, ran) = unbounded();
    let (started_tx, started) = unbounded();
    let books = Books::new();
    let (g, o) = (books.clone(), books.clone());
    let handle = Builder::new(
        Script::new(move |b: &[u64], _: &()| {
            started_tx.send(b.to_vec()).unwrap();
            held.wait();
            ran_tx.send(b.to_vec()).unwrap();
            Outcome::Ok
        })
        .with_init(move |sink, _| {
            let call = init_tx.len();
            init_tx.send(()).unwrap();
            if call == 0 {
                g.given(&(0..9).collect::<Vec<u64>>());
                sink.extend(0..9); // the backlog at start
            }
        })
        .with_books(&books),
        (),
    )
    .max_batch_size(1)
    .flush_interval(FlushInterval::Never)
    .poll(true)
    .idle_poll_delay(Duration::from_secs(3600))
    .memory_monitor(&monitor)
    .overflow_handler(move |entries, reason| {
        o.overflowed(&entries);
        shed_tx.send((entries, reason)).unwrap()
    })
    .start()
    .unwrap();
    recv(&inits);
    assert_eq!(recv(&started), vec![0]); // 0 runs (held): nothing else is taken
    wait_until(|| handle.debug_count().unwrap().waiting == 8); // 1..=8 queued

    dial.set(LIMIT + 1);
    assert_eq!(
        monitor.check_now(),
        CheckOutcome::Shrunk("buffered-task".into())
    );
    assert_eq!(
        recv(&shed),
        ((5..9).collect::<Vec<u64>>(), OverflowReason::Shrink)
    );
    assert_empty(&inits);

    gate.open();
    let done: Vec<u64> = recv_n(&ran, 5).into_iter().flatten().collect();
    assert_eq!(done, vec![0, 1, 2, 3, 4]);
    // The queue ran empty after a shrink: init runs again to find the shed work.
    recv(&inits);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn the_monitor_thread_checks_on_its_own_every_interval() {
    let dial = Dial::default();
    let monitor = MemoryMonitor::builder()
        .limit_bytes(LIMIT)
        .check_interval(Duration::from_millis(1))
        .probe(dial.clone())
        .start()
        .unwrap();
    let rig = task(&monitor, "auto", 10, 0);
    dial.set(LIMIT * 2);
    wait_until(|| rig.handle.is_shrunk().unwrap());
    dial.set(0);
    wait_until(|| !rig.handle.is_shrunk().unwrap());
    finish(&[&rig]);
}

#[test]
fn invalid_monitor_settings_are_rejected() {
    let bad = [
        MemoryMonitor::builder().limit_bytes(0),
        MemoryMonitor::builder().limit_percent(0),
        MemoryMonitor::builder().limit_percent(101),
        MemoryMonitor::builder().expand_threshold_percent(0),
        MemoryMonitor::builder().expand_threshold_percent(101),
        MemoryMonitor::builder().check_interval(Duration::ZERO),
    ];
    for builder in bad {
        let err = builder.probe(Dial::default()).start().unwrap_err();
        assert!(matches!(err, BuildError::Monitor(_)), "{err}");
    }
}

#[test]
fn the_default_limit_is_a_share_of_the_machine_or_one_gib() {
    let monitor = MemoryMonitor::builder().start().unwrap();
    match buffered_task::total_memory() {
        Some(total) => assert_eq!(monitor.limit(), total / 100 * 60),
        None => assert_eq!(monitor.limit(), buffered_task::FALLBACK_LIMIT),
    }
    let half = MemoryMonitor::builder().limit_percent(50).start().unwrap();
    if let Some(total) = buffered_task::total_memory() {
        assert_eq!(half.limit(), total / 100 * 50);
    }
}

#[test]
#[cfg(target_os = "linux")]
fn the_default_probe_reads_this_process_resident_memory() {
    use buffered_task::ProcessRss;
    let before = ProcessRss.used_bytes().expect("RSS is readable on Linux");
    assert!(before > 0);
    // Touch 64 MiB: resident memory grows by about that much. (`black_box`: a
    // release build would otherwise drop the unused block before it is made.)
    let block = std::hint::black_box(vec![1u8; 64 << 20]);
    let after = ProcessRss.used_bytes().unwrap();
    assert!(after >= before + (32 << 20), "{before} -> {after}");
    drop(std::hint::black_box(block));
}

/// A probe that panics on its first read.
struct Flaky(AtomicU64);
impl MemoryProbe for Flaky {
    fn used_bytes(&self) -> Option<u64> {
        if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("deliberate: probe");
        }
        Some(1)
    }
}

#[test]
fn a_panicking_probe_is_logged_counted_and_survived() {
    quiet_panics();
    let monitor = MemoryMonitor::builder()
        .limit_bytes(LIMIT)
        .check_interval(Duration::from_secs(3600))
        .probe(Flaky(AtomicU64::new(0)))
        .start()
        .unwrap();
    assert_eq!(monitor.check_now(), CheckOutcome::ProbeFailed);
    assert_eq!(monitor.panics(), 1);
    assert_eq!(monitor.check_now(), CheckOutcome::Normal);
    assert_eq!(monitor.panics(), 1);
}

/// A task of the user's own whose every call panics.
struct Broken;
impl buffered_task::Shrinkable for Broken {
    fn name(&self) -> String {
        "broken".into()
    }
    fn memory_usage(&self) -> usize {
        usize::MAX // the largest: asked first
    }
    fn shrink(&self) -> Result<(), buffered_task::ShrinkError> {
        panic!("deliberate: shrink")
    }
    fn expand(&self) {
        panic!("deliberate: expand")
    }
    fn is_shrunk(&self) -> bool {
        false
    }
}

#[test]
fn a_panicking_task_is_passed_over_and_the_next_one_shrinks() {
    quiet_panics();
    let dial = Dial::default();
    let monitor = monitor(&dial);
    let broken = Arc::new(Broken);
    monitor.register_shrinkable(&broken);
    let rig = task(&monitor, "healthy", 10, 0);
    dial.set(LIMIT + 1);
    assert_eq!(monitor.check_now(), CheckOutcome::Shrunk("healthy".into()));
    assert_eq!(monitor.panics(), 1);
    dial.set(1);
    assert_eq!(monitor.check_now(), CheckOutcome::Expanded(2)); // both asked
    assert_eq!(monitor.panics(), 2);
    let (entries, reason) = recv(&rig.shed);
    assert_eq!((entries.len(), reason), (5, OverflowReason::Shrink));
    rig.gate.open();
    rig.books.finish(rig.handle.shutdown_drain().unwrap());
}

/// Holds a check inside its `is_stopped` until released.
struct Stall {
    inside: crossbeam_channel::Sender<()>,
    release: Receiver<()>,
}
impl buffered_task::Shrinkable for Stall {
    fn name(&self) -> String {
        "stall".into()
    }
    fn memory_usage(&self) -> usize {
        0
    }
    fn shrink(&self) -> Result<(), buffered_task::ShrinkError> {
        Err(buffered_task::ShrinkError::MinimumSize)
    }
    fn expand(&self) {}
    fn is_shrunk(&self) -> bool {
        false
    }
    fn is_stopped(&self) -> bool {
        let _ = self.inside.send(());
        let _ = self.release.recv();
        false
    }
}

#[test]
fn a_check_in_progress_does_not_keep_an_engine_alive() {
    let dial = Dial::default();
    let monitor = monitor(&dial);
    let (inside_tx, inside) = unbounded();
    let (release_tx, release) = unbounded();
    let stall = Arc::new(Stall {
        inside: inside_tx,
        release,
    });
    monitor.register_shrinkable(&stall); // looked at first
    let (gone_tx, gone) = unbounded::<()>();
    struct Guard(crossbeam_channel::Sender<()>);
    let guard = Guard(gone_tx);
    let handle = Builder::new(
        Script::new(move |_: &[u64], _: &()| {
            let _ = guard.0.is_empty();
            Outcome::Ok
        }),
        (),
    )
    .memory_monitor(&monitor)
    .start()
    .unwrap();
    dial.set(LIMIT + 1); // over the limit: the check looks at every task
    let checker = {
        let monitor = monitor.clone();
        std::thread::spawn(move || monitor.check_now())
    };
    recv(&inside); // the check has taken hold of both tasks
    drop(handle); // the user's last handle: stops and joins the engine now
                  // Joined in the drop: the task (and its sender) is gone already.
    assert_eq!(
        gone.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected),
        "the engine outlived its last handle"
    );
    release_tx.send(()).unwrap();
    // The engine had stopped: nothing could shrink.
    assert_eq!(checker.join().unwrap(), CheckOutcome::NothingToShrink);
    drop(release_tx); // the stall lets every later look through
    assert_eq!(monitor.task_count(), 1); // the engine is forgotten
}

/// A fake `/proc` and `/sys` under a temporary directory.
struct FakeRoot(std::path::PathBuf);

impl FakeRoot {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("buffered-task-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("proc/self")).unwrap();
        FakeRoot(dir)
    }
    fn write(&self, path: &str, text: &str) -> &Self {
        let file = self.0.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
        self
    }
    fn limit(&self) -> u64 {
        MemoryMonitor::builder()
            .system_root(&self.0)
            .limit_percent(50)
            .probe(Dial::default())
            .start()
            .unwrap()
            .limit()
    }
}

impl Drop for FakeRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const GIB: u64 = 1 << 30;

#[test]
fn a_container_limit_counts_when_it_is_lower_than_the_machine() {
    let meminfo = "MemTotal:       67108864 kB\nMemFree: 1 kB\n"; // 64 GiB
                                                                  // cgroup v2: the group's own memory.max, and a lower one above it.
    let v2 = FakeRoot::new("cgroup-v2");
    v2.write("proc/meminfo", meminfo)
        .write("proc/self/cgroup", "0::/app/worker\n")
        .write("sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
        .write("sys/fs/cgroup/app/worker/memory.max", "max\n")
        .write("sys/fs/cgroup/app/memory.max", &format!("{}\n", GIB));
    assert_eq!(v2.limit(), GIB / 100 * 50);
    // cgroup v1, as in a container: only the mount's own file.
    let v1 = FakeRoot::new("cgroup-v1");
    v1.write("proc/meminfo", meminfo)
        .write("proc/self/cgroup", "4:memory:/docker/abc\n0::/\n")
        .write(
            "sys/fs/cgroup/memory/memory.limit_in_bytes",
            &format!("{}\n", 512 << 20),
        );
    assert_eq!(v1.limit(), (512u64 << 20) / 100 * 50);
    // Unlimited in both: the machine's memory.
    let none = FakeRoot::new("cgroup-none");
    none.write("proc/meminfo", meminfo)
        .write("proc/self/cgroup", "4:memory:/\n")
        .write(
            "sys/fs/cgroup/memory/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
    assert_eq!(none.limit(), 64 * GIB / 100 * 50);
    // Nothing to read: 1 GiB.
    let empty = FakeRoot::new("cgroup-empty");
    assert_eq!(empty.limit(), buffered_task::FALLBACK_LIMIT);
    // A container limit above the machine's memory does not raise it.
    let high = FakeRoot::new("cgroup-high");
    high.write("proc/meminfo", meminfo)
        .write("proc/self/cgroup", "0::/\n")
        .write("sys/fs/cgroup/cgroup.controllers", "memory\n")
        .write("sys/fs/cgroup/memory.max", &format!("{}\n", 128 * GIB));
    assert_eq!(high.limit(), 64 * GIB / 100 * 50);
}
