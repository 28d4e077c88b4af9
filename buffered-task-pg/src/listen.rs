//! Wake-ups: a thread LISTENs on the queue's channel and asks the engine to claim
//! at once when rows are enqueued. NOTIFY is not durable (a notification sent
//! while the listener is reconnecting is lost), so polling stays the safety net,
//! and the listener asks for a claim after every (re)connection.

use crate::config::notify_channel;
use crate::error::PgError;
use crate::queue::{harden, parse_url};
use crate::throttle::Throttle;
use buffered_task::WeakHandle;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A running listener. Dropping it stops the thread and joins it.
pub struct PgListener {
    stop: Arc<AtomicBool>,
    backend: Arc<AtomicI32>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PgListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgListener")
            .field("backend_pid", &self.backend_pid())
            .finish_non_exhaustive()
    }
}

impl PgListener {
    /// Starts listening for `queue`'s notifications; each one (and each
    /// reconnection) calls [`poll_now`](buffered_task::Handle::poll_now) on the
    /// engine, if it still exists.
    ///
    /// # Errors
    ///
    /// [`PgError::InsideTokioRuntime`], [`PgError::BadConnectionString`], or
    /// [`PgError::Db`] if the first connection fails (later ones are retried).
    pub fn start<T: Send + 'static>(
        url: &str,
        queue: &str,
        engine: WeakHandle<T>,
    ) -> Result<Self, PgError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(PgError::InsideTokioRuntime);
        }
        let config = harden(parse_url(url)?);
        if queue.is_empty() || queue.contains('\0') {
            return Err(PgError::BadConfig(format!("bad queue name {queue:?}")));
        }
        let channel = notify_channel(queue);
        let first = listen(&config, &channel)?;
        let stop = Arc::new(AtomicBool::new(false));
        let backend = Arc::new(AtomicI32::new(0));
        let (s, b) = (stop.clone(), backend.clone());
        let thread = std::thread::Builder::new()
            .name(format!("{queue}-listener"))
            .spawn(move || run(config, channel, first, engine, &s, &b))
            .map_err(|e| PgError::Io(e.to_string()))?;
        Ok(PgListener {
            stop,
            backend,
            thread: Some(thread),
        })
    }

    /// The server process of the current listening connection (0 while
    /// reconnecting).
    pub fn backend_pid(&self) -> i32 {
        self.backend.load(Ordering::SeqCst)
    }
}

impl Drop for PgListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the listener thread panicked");
            }
        }
    }
}

fn listen(config: &postgres::Config, channel: &str) -> Result<Client, PgError> {
    let mut client = config.connect(NoTls)?;
    client.batch_execute(&format!("LISTEN \"{}\"", channel.replace('"', "\"\"")))?;
    Ok(client)
}

fn run<T: Send + 'static>(
    config: postgres::Config,
    channel: String,
    first: Client,
    engine: WeakHandle<T>,
    stop: &AtomicBool,
    backend: &AtomicI32,
) {
    let mut client = Some(first);
    let mut wait = Duration::from_millis(100);
    let mut throttle = Throttle::new(Duration::from_secs(10));
    while !stop.load(Ordering::SeqCst) {
        let Some(c) = client.as_mut() else {
            // The reconnect backoff, in short steps so a stop is seen quickly.
            let mut left = wait;
            while !left.is_zero() && !stop.load(Ordering::SeqCst) {
                let step = left.min(Duration::from_millis(20));
                std::thread::sleep(step);
                left = left.saturating_sub(step);
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
            match listen(&config, &channel) {
                Ok(c) => {
                    client = Some(c);
                    wait = Duration::from_millis(100);
                }
                Err(e) => {
                    throttle.warn(|| {
                        format!("listener: reconnect failed ({e}); polling covers the gap")
                    });
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
            continue;
        };
        if backend.load(Ordering::SeqCst) == 0 {
            match c.query_one("SELECT pg_backend_pid()", &[]) {
                Ok(row) => backend.store(row.get(0), Ordering::SeqCst),
                Err(_) => {
                    client = None;
                    continue;
                }
            }
            // Claim once after every (re)connection: notifications sent while
            // we were away are lost.
            wake(&engine);
        }
        let mut broken = false;
        {
            let mut notes = c.notifications();
            let mut it = notes.timeout_iter(Duration::from_millis(200));
            loop {
                match it.next() {
                    // Claim at once; a burst of notifications while the claim
                    // runs costs nothing (poll_now is a no-op while init runs).
                    Ok(Some(_)) => wake(&engine),
                    Ok(None) => break, // the timeout passed
                    Err(e) => {
                        throttle.warn(|| {
                            format!(
                                "listener: connection lost ({}); reconnecting",
                                PgError::Db(e)
                            )
                        });
                        broken = true;
                        break;
                    }
                }
            }
        }
        if broken || c.is_closed() {
            client = None;
            backend.store(0, Ordering::SeqCst);
        }
        if engine.upgrade().is_none() {
            return; // the engine is gone
        }
    }
}

fn wake<T: Send + 'static>(engine: &WeakHandle<T>) {
    if let Some(handle) = engine.upgrade() {
        let _ = handle.poll_now();
    }
}
