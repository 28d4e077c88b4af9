//! Time, for every timer the engine and the memory monitor keep: the flush tick,
//! the idle poll, retry backoff, the run deadline, the shutdown deadline, the
//! monitor's interval, and the timeouts of calls that wait.
//!
//! The engine reads time through a [`Clock`]: the system's monotonic clock, or a
//! [`ManualClock`] that only moves when a test advances it. A thread that waits
//! for a deadline waits on its channel or condition variable; with a manual clock
//! it waits without a real timeout and is woken by [`ManualClock::advance`],
//! which calls every engine and monitor listening to that clock.
//!
//! Deadlines saturate: a duration too long to add (`Duration::MAX`) means about a
//! century from now, which is "never" for every practical purpose and never
//! panics.

use parking_lot::{Condvar, Mutex, MutexGuard};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// The longest wait the engine schedules: about a century. Longer durations are
/// cut to it, so that adding them to an `Instant` never overflows.
pub(crate) const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `from + after`, saturating at about a century ahead (see [`FAR`]).
pub(crate) fn after(from: Instant, after: Duration) -> Instant {
    from.checked_add(after.min(FAR))
        .or_else(|| from.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(from)
}

/// The sooner of two optional instants (`None`: never).
pub(crate) fn sooner(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Something woken when a manual clock moves.
pub(crate) trait Listener: Send + Sync {
    /// The clock was advanced: look at the time again.
    fn advanced(&self);
}

/// A clock that moves only when told to, for tests: every timer of an engine
/// built with it (see [`Builder::clock`](crate::Builder::clock)) fires when the
/// clock is advanced past it, with no real waiting.
///
/// ```
/// use buffered_task::ManualClock;
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// let start = clock.now();
/// clock.advance(Duration::from_secs(3600));
/// assert_eq!(clock.now() - start, Duration::from_secs(3600));
/// clock.advance(Duration::MAX); // saturates, never panics
/// ```
#[derive(Clone)]
pub struct ManualClock {
    inner: Arc<ManualInner>,
}

struct ManualInner {
    origin: Instant,
    offset: Mutex<Duration>,
    listeners: Mutex<Vec<Weak<dyn Listener>>>,
}

impl ManualClock {
    /// A clock standing at the present instant.
    pub fn new() -> Self {
        ManualClock {
            inner: Arc::new(ManualInner {
                origin: Instant::now(),
                offset: Mutex::new(Duration::ZERO),
                listeners: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The time on this clock.
    pub fn now(&self) -> Instant {
        after(self.inner.origin, *self.inner.offset.lock())
    }

    /// Moves the clock forward by `by` (saturating) and wakes every engine and
    /// monitor using it, so their timers that are now due fire.
    pub fn advance(&self, by: Duration) {
        {
            let mut offset = self.inner.offset.lock();
            *offset = offset.saturating_add(by).min(FAR);
        }
        let live: Vec<Arc<dyn Listener>> = {
            let mut listeners = self.inner.listeners.lock();
            listeners.retain(|l| l.strong_count() > 0);
            listeners.iter().filter_map(Weak::upgrade).collect()
        };
        for listener in live {
            listener.advanced();
        }
    }

    fn listen(&self, listener: Weak<dyn Listener>) {
        let mut listeners = self.inner.listeners.lock();
        listeners.retain(|l| l.strong_count() > 0);
        listeners.push(listener);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl std::fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManualClock")
            .field("elapsed", &*self.inner.offset.lock())
            .finish()
    }
}

/// The clock an engine or a monitor reads.
#[derive(Clone, Debug, Default)]
pub(crate) enum Clock {
    /// The system's monotonic clock.
    #[default]
    System,
    /// A clock that tests move by hand.
    Manual(ManualClock),
}

impl Clock {
    pub(crate) fn now(&self) -> Instant {
        match self {
            Clock::System => Instant::now(),
            Clock::Manual(m) => m.now(),
        }
    }

    /// The clock-time deadline `d` from now (saturating).
    pub(crate) fn deadline(&self, d: Duration) -> Instant {
        after(self.now(), d)
    }

    /// Asks to be woken whenever a manual clock moves (a no-op for the system
    /// clock, whose deadlines are real).
    pub(crate) fn listen(&self, listener: Weak<dyn Listener>) {
        if let Clock::Manual(m) = self {
            m.listen(listener);
        }
    }

    /// The real instant at which a wait for the clock-time `deadline` must end:
    /// the deadline itself on the system clock; none on a manual clock, whose
    /// waits end when it is advanced.
    pub(crate) fn real(&self, deadline: Option<Instant>) -> Option<Instant> {
        match self {
            Clock::System => deadline,
            Clock::Manual(_) => None,
        }
    }

    /// Waits on `cv` until it is notified or `deadline` passes; returns whether
    /// the deadline has passed. Callers loop on their condition.
    pub(crate) fn wait<S>(
        &self,
        cv: &Condvar,
        guard: &mut MutexGuard<'_, S>,
        deadline: Option<Instant>,
    ) -> bool {
        if deadline.is_some_and(|d| self.now() >= d) {
            return true;
        }
        match self.real(deadline) {
            Some(when) => {
                cv.wait_until(guard, when);
            }
            None => cv.wait(guard),
        }
        deadline.is_some_and(|d| self.now() >= d)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn deadlines_saturate() {
        let now = Instant::now();
        assert_eq!(
            after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        assert!(after(now, Duration::MAX) > now + Duration::from_secs(3600 * 24 * 365 * 50));
        let clock = Clock::System;
        assert!(clock.deadline(Duration::MAX) > now);
    }

    #[test]
    fn a_manual_clock_wakes_its_listeners() {
        struct Count(Mutex<u32>);
        impl Listener for Count {
            fn advanced(&self) {
                *self.0.lock() += 1;
            }
        }
        let manual = ManualClock::new();
        let count = Arc::new(Count(Mutex::new(0)));
        let listener: Arc<dyn Listener> = count.clone();
        let c = Clock::Manual(manual.clone());
        c.listen(Arc::downgrade(&listener));
        let t0 = c.now();
        manual.advance(Duration::from_millis(5));
        assert_eq!(c.now() - t0, Duration::from_millis(5));
        assert_eq!(*count.0.lock(), 1);
        manual.advance(Duration::MAX);
        assert!(c.now() > t0);
        assert_eq!(*count.0.lock(), 2);
        drop((count, listener)); // forgotten once dropped
        manual.advance(Duration::from_millis(1));
        assert_eq!(manual.inner.listeners.lock().len(), 0);
    }
}
