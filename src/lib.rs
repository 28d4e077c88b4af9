//! TODO docs
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod config;
mod coordinator;
mod error;
mod handle;
mod monitor;
mod pool;
mod queue;
mod task;
mod unwind;

pub use config::{Builder, FlushInterval, OverflowHandler, OverflowReason, Weigher};
pub use error::{BufferError, BuildError, ControlError, ShrinkError};
pub use handle::{DebugCount, Handle, ShutdownReport, WeakHandle};
pub use monitor::{
    total_memory, CheckOutcome, MemoryMonitor, MemoryProbe, MonitorBuilder, ProcessRss,
    Shrinkable, FALLBACK_LIMIT,
};
pub use task::{Outcome, Priority, Sink, Task};
