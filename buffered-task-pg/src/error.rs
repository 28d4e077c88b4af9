//! The error type.

use std::fmt;

/// What went wrong talking to PostgreSQL.
#[derive(Debug)]
#[non_exhaustive]
pub enum PgError {
    /// The connection string could not be parsed.
    BadConnectionString(String),
    /// A setting of the queue is invalid (e.g. an empty queue name).
    BadConfig(String),
    /// A blocking client cannot run inside a tokio runtime.
    InsideTokioRuntime,
    /// The queue's table is missing: call [`PgQueue::install`](crate::PgQueue::install) first.
    NotInstalled,
    /// An error from the server (shown with its SQLSTATE and message) or the
    /// connection (a lost connection included). The call's transaction did not
    /// commit: nothing it would have written is there. The connection is
    /// reopened by the next call.
    Db(postgres::Error),
    /// The connection broke while the call's commit was in flight: the server
    /// may or may not have committed it. Settles are safe to repeat (they are
    /// fenced by the claim's token); an enqueue is safe to repeat with the same
    /// dedup keys, or through
    /// [`PgQueue::enqueue_request`](crate::PgQueue::enqueue_request).
    CommitUnknown(postgres::Error),
    /// The operating system refused to start a thread.
    Io(String),
    /// A heartbeat must beat at least three times per lease.
    HeartbeatTooSlow,
}

impl PgError {
    /// The SQLSTATE code of a server error (e.g. `"23505"`).
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            PgError::Db(e) | PgError::CommitUnknown(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// Whether the error is the connection's (lost, refused, or closed by a
    /// server that is shutting down or starting up): worth retrying on a new
    /// connection.
    pub fn is_connection(&self) -> bool {
        match self {
            PgError::Db(e) | PgError::CommitUnknown(e) => is_connection_error(e),
            _ => false,
        }
    }
}

/// A lost connection, or a server that is going away or not yet there
/// (SQLSTATE classes 08 and 57P).
pub(crate) fn is_connection_error(e: &postgres::Error) -> bool {
    match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || c.starts_with("57P")
        }
        None => true, // no server error: the socket, the protocol, a closed client
    }
}

/// A postgres error with the server's SQLSTATE, message, detail and hint, or the
/// chain of causes of a connection error.
pub(crate) fn describe(e: &postgres::Error, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    if let Some(db) = e.as_db_error() {
        write!(
            f,
            "{} {}: {}",
            db.severity(),
            db.code().code(),
            db.message()
        )?;
        if let Some(detail) = db.detail() {
            write!(f, " (detail: {detail})")?;
        }
        if let Some(hint) = db.hint() {
            write!(f, " (hint: {hint})")?;
        }
        return Ok(());
    }
    write!(f, "{e}")?;
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        write!(f, ": {s}")?;
        source = s.source();
    }
    Ok(())
}

struct Described<'a>(&'a postgres::Error);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        describe(self.0, f)
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PgError::BadConnectionString(e) => write!(f, "bad connection string: {e}"),
            PgError::BadConfig(e) => write!(f, "bad queue setting: {e}"),
            PgError::InsideTokioRuntime => f.write_str(
                "the blocking PostgreSQL client cannot be used inside a tokio runtime; \
                 call it from a plain thread (e.g. tokio::task::spawn_blocking)",
            ),
            PgError::NotInstalled => {
                f.write_str("the queue table does not exist; call PgQueue::install() first")
            }
            PgError::Db(e) => write!(f, "database error: {}", Described(e)),
            PgError::CommitUnknown(e) => write!(
                f,
                "connection lost while committing (the call may or may not have taken effect): {}",
                Described(e)
            ),
            PgError::Io(e) => write!(f, "could not start a thread: {e}"),
            PgError::HeartbeatTooSlow => {
                f.write_str("the lease must be at least three heartbeat intervals")
            }
        }
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PgError::Db(e) | PgError::CommitUnknown(e) => Some(e),
            _ => None,
        }
    }
}

impl From<postgres::Error> for PgError {
    fn from(e: postgres::Error) -> Self {
        // 42P01: undefined_table.
        if e.code().map(|c| c.code()) == Some("42P01") {
            PgError::NotInstalled
        } else {
            PgError::Db(e)
        }
    }
}
