//! The leases a process holds in flight, and the heartbeat that keeps exactly
//! those alive.

use crate::config::{Lease, QueueConfig};
use crate::error::PgError;
use crate::queue::{parse_url, PgQueue};
use crate::throttle::Throttle;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The leases in flight: claimed and not yet settled or given up. A
/// [`PgHeartbeat`] extends these and no others, so a row whose settle failed
/// (and was forgotten here) comes back when its lease ends. Cheap to clone
/// (shared).
#[derive(Debug, Clone, Default)]
pub struct Leases(Arc<Mutex<HashSet<Lease>>>);

impl Leases {
    /// An empty set.
    pub fn new() -> Self {
        Leases::default()
    }

    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<Lease>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds leases (just claimed).
    pub fn hold(&self, leases: impl IntoIterator<Item = Lease>) {
        self.set().extend(leases);
    }

    /// Removes leases (settled, or given up).
    pub fn forget(&self, leases: impl IntoIterator<Item = Lease>) {
        let mut set = self.set();
        for l in leases {
            set.remove(&l);
        }
    }

    /// Leases in flight now.
    pub fn len(&self) -> usize {
        self.set().len()
    }

    /// Whether none is in flight.
    pub fn is_empty(&self) -> bool {
        self.set().is_empty()
    }

    /// Whether this lease is in flight.
    pub fn contains(&self, lease: Lease) -> bool {
        self.set().contains(&lease)
    }

    /// A copy of the set.
    pub fn snapshot(&self) -> Vec<Lease> {
        self.set().iter().copied().collect()
    }
}

/// Keeps the leases of rows in flight alive while long batches run: every
/// `interval` it extends each lease in a [`Leases`] set by the full lease (and
/// no other row: a lease whose settle failed, once forgotten, runs out). The
/// lease must be at least three intervals, so one missed beat never loses a
/// lease. It reconnects by itself. Dropping it stops the thread and joins it.
pub struct PgHeartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PgHeartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgHeartbeat")
    }
}

impl PgHeartbeat {
    /// Starts beating for `leases`, rows of the queue of `config`.
    ///
    /// # Errors
    ///
    /// [`PgError::HeartbeatTooSlow`] when the lease is under three intervals (or
    /// the interval is zero); [`PgError::BadConnectionString`];
    /// [`PgError::BadConfig`]; [`PgError::Io`].
    pub fn start(
        url: &str,
        config: QueueConfig,
        leases: &Leases,
        interval: Duration,
    ) -> Result<Self, PgError> {
        Self::start_with(parse_url(url)?, config, leases, interval)
    }

    pub(crate) fn start_with(
        pg: postgres::Config,
        config: QueueConfig,
        leases: &Leases,
        interval: Duration,
    ) -> Result<Self, PgError> {
        if interval.is_zero() || interval.checked_mul(3).is_none_or(|t| config.lease < t) {
            return Err(PgError::HeartbeatTooSlow);
        }
        let name = format!("{}-heartbeat", config.queue);
        let mut conn = PgQueue::lazy(pg, config)?;
        let leases = leases.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let mut throttle = Throttle::new(Duration::from_secs(10));
                while !s.load(Ordering::SeqCst) {
                    let held = leases.snapshot();
                    for chunk in held.chunks(10_000) {
                        if let Err(e) = conn.extend(chunk) {
                            throttle.warn(|| format!("heartbeat failed ({e}); retrying"));
                            break;
                        }
                    }
                    // Sleep in short steps so a stop is seen quickly.
                    let mut left = interval;
                    while !left.is_zero() && !s.load(Ordering::SeqCst) {
                        let step = left.min(Duration::from_millis(20));
                        std::thread::sleep(step);
                        left = left.saturating_sub(step);
                    }
                }
            })
            .map_err(|e| PgError::Io(e.to_string()))?;
        Ok(PgHeartbeat {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for PgHeartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the heartbeat thread panicked");
            }
        }
    }
}
