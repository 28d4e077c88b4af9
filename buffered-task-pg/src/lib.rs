//! A PostgreSQL-backed work queue that many processes, on many machines, share.
//!
//! This is the storage half of scaling out a [`buffered_task`] engine: rows are
//! the durable backlog, a process *claims* a chunk of them with
//! `FOR UPDATE SKIP LOCKED` (so no two processes take the same row), holds them
//! under a *lease*, and settles each one: done rows are deleted, failed rows go
//! back to `ready` with an exponential backoff (or to `dead` after their
//! attempts), shed rows are released at once. Every settling write is guarded by
//! the claim's owner token: a write that touches no row means the lease was lost
//! (the row expired and another process took it), and is logged and ignored.
//! All times come from the database's clock.
//!
//! The client is the `postgres` crate: blocking, pure Rust. Each connection runs a
//! private current-thread tokio runtime and starts no threads of its own; it
//! cannot be used from inside a tokio runtime, and [`PgQueue::connect`] says so
//! with an error instead of panicking.
//!
//! ```no_run
//! use buffered_task_pg::{PgQueue, QueueConfig};
//! let mut q = PgQueue::connect("host=127.0.0.1 user=postgres dbname=test", QueueConfig::new("blocks"))?;
//! q.install()?;
//! q.enqueue(&[(b"block 1".to_vec(), Some("1".to_string()))])?;
//! let claimed = q.claim(100)?;
//! let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
//! q.ack(&ids)?;
//! # Ok::<(), buffered_task_pg::PgError>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod listen;
mod queue;
mod task;

pub use listen::PgListener;
pub use queue::{Claimed, PgError, PgQueue, QueueConfig, Settled};
pub use task::{PgHeartbeat, PgTask, RowHandler, RowOutcome};
