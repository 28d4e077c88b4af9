//! Unit tests of the engine as a whole that need the crate's insides: injected
//! internal failures (see `fault`), and what the engine logs about them.

mod failure;

use parking_lot::Mutex;

/// Every log record of this test process, for tests that check what was logged.
static LOGGED: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        LOGGED
            .lock()
            .push((record.level(), record.args().to_string()));
    }
    fn flush(&self) {}
}

/// Installs the capturing logger (once per process).
pub(crate) fn capture_logs() {
    static CAPTURE: Capture = Capture;
    if log::set_logger(&CAPTURE).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
}

/// Whether a record at `level` containing every one of `needles` was logged.
pub(crate) fn logged(level: log::Level, needles: &[&str]) -> bool {
    LOGGED
        .lock()
        .iter()
        .any(|(l, msg)| *l == level && needles.iter().all(|n| msg.contains(n)))
}
