//! The coordinator: one thread that keeps the engine's timers. It owns no
//! entries (the store does) and never waits for a worker.
//!
//! ```text
//!              nudges (bounded(1): "look again")
//!  store, clock ───────────────────────────────┐
//!                                              ▼
//!        ┌──────────────────────── coordinator ─────────────────────────┐
//!        │ each round, at the time on the engine's clock:               │
//!        │  flush tick due?         → store.tick()   (buffers → queue)  │
//!        │  retries due?            → store.wake_retries()              │
//!        │  run past its deadline?  → store.watch()  (logged, counted)  │
//!        │  init: asked, or idle?   → store.init_decision(), request_init()│── (store) ──▶ init thread
//!        │ then sleeps until the soonest timer or the next nudge         │
//!        └───────────────────────────────────────────────────────────────┘
//! ```
//!
//! The rules it keeps: the flush tick is a deadline schedule (each tick is the
//! previous one plus the interval; ticks missed while late are skipped, never
//! bunched); `init` runs at start, whenever asked (`poll_now`), and, with `poll`
//! on, when the engine goes idle: at once if the last run found entries or a
//! shrink shed some, else once `idle_poll_delay` has passed since the engine
//! went idle. It exits when the store has finished. (The store holds the
//! init thread's request channel and drops it when it finishes, so that thread
//! ends even while the coordinator is stuck in a handler.)

use crate::clock::{self, sooner, Clock};
use crate::fault;
use crate::settings::FlushInterval;
use crate::store::{InitDecision, Store};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A deadline schedule: every `period`, skipping ticks missed while late.
struct Ticker {
    next: Instant,
    period: Duration,
}

impl Ticker {
    /// Whether a tick is due at `now`; if so, the schedule moves past `now`.
    fn due(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        let late = now.saturating_duration_since(self.next);
        let missed = late.as_nanos() / self.period.as_nanos().max(1);
        let steps = u32::try_from(missed + 1).unwrap_or(u32::MAX);
        self.next = clock::after(self.next, self.period.saturating_mul(steps));
        if self.next <= now {
            self.next = clock::after(now, self.period); // saturated: start afresh
        }
        true
    }
}

pub(crate) struct Coordinator<T: Send + 'static> {
    store: Arc<Store<T>>,
    nudges: Receiver<()>,
    ticker: Option<Ticker>,
    poll_at: Option<Instant>,
    /// When the stats are next published (the `metrics` feature).
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    published: Option<Instant>,
}

impl<T: Send + 'static> Coordinator<T> {
    pub(crate) fn new(store: Arc<Store<T>>, nudges: Receiver<()>) -> Self {
        let now = store.clock().now();
        let ticker = match store.config.flush_interval {
            FlushInterval::Every(period) => Some(Ticker {
                next: clock::after(now, period),
                period,
            }),
            FlushInterval::Never => None,
        };
        Coordinator {
            store,
            nudges,
            ticker,
            poll_at: None,
            published: None,
        }
    }

    /// The thread's body: rounds until the store has finished.
    pub(crate) fn run(mut self) {
        while !self.store.is_finished() {
            fault::hit(self.store.name(), "coordinator");
            let now = self.store.clock().now();
            let wake = self.round(now);
            self.store.round_done(now);
            self.sleep(wake);
        }
    }

    /// One look at every timer; returns when the next is due.
    fn round(&mut self, now: Instant) -> Option<Instant> {
        let store = &self.store;
        if let Some(ticker) = &mut self.ticker {
            if ticker.due(now) {
                store.tick();
            }
        }
        let retry_due = store.wake_retries(now);
        let watch_due = match store.config.run_deadline {
            Some(deadline) => self.watch(now, deadline),
            None => None,
        };
        self.decide_init(now);
        self.store.release_if_idle();
        let tick_due = self.ticker.as_ref().map(|t| t.next);
        [
            tick_due,
            retry_due,
            watch_due,
            self.poll_at,
            self.publish(now),
        ]
        .into_iter()
        .fold(None, sooner)
    }

    /// With the `metrics` feature: publishes the stats (gauges and totals) at
    /// most once a second; returns when next.
    #[cfg(feature = "metrics")]
    fn publish(&mut self, now: Instant) -> Option<Instant> {
        if self.published.map_or(true, |at| now >= at) {
            crate::observe::record_stats(self.store.name(), &self.store.stats());
            self.published = Some(clock::after(now, Duration::from_secs(1)));
        }
        self.published
    }

    #[cfg(not(feature = "metrics"))]
    fn publish(&mut self, _now: Instant) -> Option<Instant> {
        None
    }

    fn watch(&self, now: Instant, deadline: Duration) -> Option<Instant> {
        let (stuck, next) = self.store.watch(now, deadline);
        for (entries, age) in stuck {
            log::warn!(
                "{}: a run of {entries} entries has not returned after {age:?} (deadline {deadline:?})",
                self.store.name()
            );
        }
        next
    }

    fn decide_init(&mut self, now: Instant) {
        let poll_due = self.poll_at.is_some_and(|at| now >= at);
        match self.store.init_decision(poll_due) {
            InitDecision::Start => {
                self.poll_at = None;
                self.store.request_init();
            }
            InitDecision::Arm(since) => {
                let at = clock::after(since, self.store.config.idle_poll_delay);
                if at <= now {
                    // Due already: start it at once, in this round.
                    self.poll_at = Some(at);
                    return self.decide_init(now);
                }
                self.poll_at = Some(at);
            }
            InitDecision::Disarm => self.poll_at = None,
        }
    }

    /// Sleeps until `wake` (on the engine's clock) or a nudge.
    fn sleep(&self, wake: Option<Instant>) {
        let clock: &Clock = self.store.clock();
        let result = match clock.real(wake) {
            Some(at) => self.nudges.recv_deadline(at),
            None => self
                .nudges
                .recv()
                .map_err(|_| RecvTimeoutError::Disconnected),
        };
        if let Err(RecvTimeoutError::Disconnected) = result {
            // Every sender is gone: only once the store itself is dropped.
            log::debug!("{}: coordinator without nudges", self.store.name());
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn the_tick_keeps_its_schedule_and_skips_missed_ticks() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut t = Ticker {
            next: t0 + ms(10),
            period: ms(10),
        };
        assert!(!t.due(t0 + ms(9)));
        assert!(t.due(t0 + ms(15))); // late by 5 ms
        assert_eq!(t.next, t0 + ms(20)); // not 25: no drift
        assert!(t.due(t0 + ms(47))); // 20, 30 and 40 missed: one tick
        assert_eq!(t.next, t0 + ms(50));
        let mut huge = Ticker {
            next: t0,
            period: Duration::MAX,
        };
        assert!(huge.due(t0));
        assert!(huge.next > t0);
    }
}
