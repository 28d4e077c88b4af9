//! Adaptive concurrency: how many batches may run at once follows the backend,
//! as TCP's congestion window and Netflix's concurrency-limits do (AIMD).
//!
//! Each finished run is a sample: its run time and whether it succeeded.
//!
//! - The best run time seen (a low-water mark that drifts up by 1% of the gap
//!   per sample, so a backend whose normal latency rises is learnt) is the
//!   reference.
//! - A success within `TOLERANCE` × best: additive increase, one more slot per
//!   `limit` such samples.
//! - A run slower than that: multiplicative decrease by `LATENCY_BACKOFF`
//!   (gentle: queueing in the backend is the first sign of overload).
//! - A failure (retry, error, panic): multiplicative decrease by
//!   `FAILURE_BACKOFF`.
//! - After a decrease, further decreases wait `limit` samples: runs that
//!   started under the old limit report late, and must not be counted twice.
//!
//! The limit moves within `min..=max` and is used rounded.

use std::time::Duration;

/// Slower than this many times the best run time counts as overload.
const TOLERANCE: f64 = 2.0;
/// The limit kept after a slow run.
const LATENCY_BACKOFF: f64 = 0.9;
/// The limit kept after a failed run.
const FAILURE_BACKOFF: f64 = 0.5;

/// The AIMD controller (pure: fed samples, says the limit).
#[derive(Debug, Clone)]
pub(crate) struct Aimd {
    min: f64,
    max: f64,
    limit: f64,
    best: Option<Duration>,
    /// Samples to wait before another decrease.
    cooldown: usize,
}

impl Aimd {
    /// A controller starting at `min`.
    pub(crate) fn new(min: usize, max: usize) -> Self {
        let (min, max) = (min.max(1) as f64, max.max(min.max(1)) as f64);
        Aimd {
            min,
            max,
            limit: min,
            best: None,
            cooldown: 0,
        }
    }

    /// The limit in force.
    pub(crate) fn limit(&self) -> usize {
        self.limit.round().clamp(self.min, self.max) as usize
    }

    /// One finished run; returns the limit now.
    pub(crate) fn sample(&mut self, took: Duration, ok: bool) -> usize {
        let best = self.learn(took);
        let slow = took.as_secs_f64() > best.as_secs_f64() * TOLERANCE;
        self.cooldown = self.cooldown.saturating_sub(1);
        if !ok || slow {
            if self.cooldown == 0 {
                let factor = if ok { LATENCY_BACKOFF } else { FAILURE_BACKOFF };
                self.limit = (self.limit * factor).max(self.min);
                self.cooldown = self.limit.ceil() as usize;
            }
        } else {
            self.limit = (self.limit + 1.0 / self.limit).min(self.max);
        }
        self.limit()
    }

    /// Updates the best run time with a sample; returns it.
    fn learn(&mut self, took: Duration) -> Duration {
        let best = match self.best {
            Some(best) if took >= best => best + (took - best) / 100,
            _ => took,
        };
        self.best = Some(best);
        best
    }
}

#[cfg(test)]
mod test {
    use super::*;

    /// A backend that answers in 1 ms up to `fast` calls at once, in 4 ms past
    /// that, and fails past `fails_above`.
    fn call(concurrent: usize, fast: usize, fails_above: usize) -> (Duration, bool) {
        let took = if concurrent <= fast {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(4)
        };
        (took, concurrent <= fails_above)
    }

    /// Counted rounds: each round runs `limit` calls at once and feeds their
    /// samples; returns the limits seen after each round.
    fn rounds(aimd: &mut Aimd, n: usize, fast: usize, fails_above: usize) -> Vec<usize> {
        (0..n)
            .map(|_| {
                let at_once = aimd.limit();
                for _ in 0..at_once {
                    let (took, ok) = call(at_once, fast, fails_above);
                    aimd.sample(took, ok);
                }
                aimd.limit()
            })
            .collect()
    }

    #[test]
    fn the_limit_settles_between_the_knee_and_the_failures_and_recovers() {
        let n = 8;
        let mut aimd = Aimd::new(1, 64);
        let warm = rounds(&mut aimd, 100, n, 2 * n);
        assert!(warm.iter().any(|&l| l >= n), "it grows: {warm:?}");
        let settled = rounds(&mut aimd, 300, n, 2 * n);
        assert!(
            settled.iter().all(|&l| (n..2 * n).contains(&l)),
            "{settled:?}"
        );
        // The backend degrades: knee at 2, failures past 4.
        let degraded = rounds(&mut aimd, 300, 2, 4);
        assert!(
            degraded[100..].iter().all(|&l| (1..=4).contains(&l)),
            "{degraded:?}"
        );
        // And recovers.
        let recovered = rounds(&mut aimd, 400, n, 2 * n);
        assert!(
            recovered[200..].iter().all(|&l| (n..2 * n).contains(&l)),
            "{recovered:?}"
        );
    }

    #[test]
    fn failures_halve_and_the_bounds_hold() {
        let mut aimd = Aimd::new(2, 10);
        for _ in 0..1000 {
            aimd.sample(Duration::from_millis(1), true);
        }
        assert_eq!(aimd.limit(), 10);
        assert_eq!(aimd.sample(Duration::from_millis(1), false), 5);
        assert_eq!(
            aimd.sample(Duration::from_millis(1), false),
            5,
            "cooling down"
        );
        for _ in 0..100 {
            aimd.sample(Duration::from_millis(1), false);
        }
        assert_eq!(aimd.limit(), 2);
        let zero = Aimd::new(0, 0);
        assert_eq!(zero.limit(), 1);
    }
}
