//! The rate limit for logs that a broken server could flood (a reconnect
//! loop, a settle retried while the server is away).

use std::time::{Duration, Instant};

/// At most one message per period; the messages held back are counted and
/// reported with the next one.
#[derive(Debug)]
pub(crate) struct Throttle {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    pub(crate) const fn new(every: Duration) -> Self {
        Throttle {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(n)` when a message may be logged now (`n` were held back since the
    /// last one); `None` when this one is held back.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }

    /// Logs `message` at warn level unless held back.
    pub(crate) fn warn(&mut self, message: impl FnOnce() -> String) {
        if let Some(held) = self.allow() {
            if held > 0 {
                log::warn!("{} ({held} similar messages held back)", message());
            } else {
                log::warn!("{}", message());
            }
        }
    }
}
