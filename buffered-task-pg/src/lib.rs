//! A PostgreSQL-backed work queue that many processes, on many machines, share.
//!
//! This is the storage half of scaling out a [`buffered_task`] engine: rows are
//! the durable backlog, a process *claims* a chunk of them with
//! `FOR UPDATE SKIP LOCKED` (so no two processes take the same row), holds them
//! under a *lease*, and settles each one: done rows are deleted, failed rows go
//! back to `ready` with an exponential backoff (or to `dead` after their
//! attempts), shed rows are released at once. Every settling write is fenced by
//! the claim's [`Lease`] (the row's id and a token that every claim renews): a
//! write from an older claim (a stale batch, even of the same process) touches
//! no row, and is counted as a lost lease. A lease that expires counts as an
//! attempt. All times come from the database's clock.
//!
//! Connections reconnect by themselves (with backoff and rate-limited logs);
//! an enqueue that returned `Ok` is on disk; errors carry the server's SQLSTATE
//! and message.
//!
//! The client is the `postgres` crate: blocking, pure Rust. Each connection runs a
//! private current-thread tokio runtime and starts no threads of its own; it
//! cannot be used from inside a tokio runtime, and [`PgQueue::connect`] says so
//! with an error instead of panicking.
//!
//! ```no_run
//! use buffered_task_pg::{leases, NewRow, PgQueue, QueueConfig};
//! let mut q = PgQueue::connect("host=127.0.0.1 user=postgres dbname=test", QueueConfig::new("blocks"))?;
//! q.install()?;
//! q.enqueue(&[NewRow::new(b"block 1".to_vec()).key("1")])?;
//! let claimed = q.claim(100)?;
//! q.ack(&leases(&claimed))?;
//! # Ok::<(), buffered_task_pg::PgError>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod config;
mod error;
mod leases;
mod listen;
mod ops;
mod queue;
mod sql;
mod task;
mod throttle;

pub use config::{leases, Claimed, Enqueued, Lease, NewRow, QueueConfig, Settled, MAX_QUEUE_NAME};
pub use error::PgError;
pub use leases::{Leases, PgHeartbeat};
pub use listen::PgListener;
pub use ops::{DeadRow, Health, QueueStats, Requeued, Select};
pub use queue::{PgQueue, Settle, SettleReport};
pub use task::{PgProbe, PgRow, PgTask, RowHandler, RowOutcome, TaskCounters};
