//! Fault injection for the crate's own tests: a named point in an engine thread
//! that panics when a test arms it for an engine of a given name, to prove that
//! an internal failure stops the engine cleanly. Compiled to nothing outside
//! `cargo test`'s unit-test build.

#[cfg(test)]
static ARMED: parking_lot::Mutex<Vec<(String, &'static str)>> = parking_lot::Mutex::new(Vec::new());

/// Arms `point` for engines named `engine` (the next time it is passed).
#[cfg(test)]
pub(crate) fn arm(engine: &str, point: &'static str) {
    ARMED.lock().push((engine.to_string(), point));
}

/// Passes a fault point: panics if a test armed it for this engine.
#[cfg(test)]
pub(crate) fn hit(engine: &str, point: &'static str) {
    let fire = {
        let mut armed = ARMED.lock();
        match armed.iter().position(|(e, p)| e == engine && *p == point) {
            Some(i) => {
                armed.remove(i);
                true
            }
            None => false,
        }
    };
    if fire {
        panic!("injected fault at {point}");
    }
}

/// Passes a fault point (a no-op outside the crate's unit tests).
#[cfg(not(test))]
#[inline(always)]
pub(crate) fn hit(_engine: &str, _point: &'static str) {}
