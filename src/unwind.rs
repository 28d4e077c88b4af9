//! The one place user code is called from the engine's threads: it catches a
//! panic, turns its payload into text and drops the payload contained, so the
//! calling thread lives on and no count is skewed.
//!
//! "User code" includes drops: an entry, a replaced state or a panic payload may
//! have a `Drop` that panics, so the engine drops them through [`drop_quietly`].

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A panic payload whose drop panics again is dropped at most this many times
/// over (each panic brings a new payload), then leaked.
const PAYLOAD_DEPTH: usize = 8;

/// Runs `f`; a panic comes back as `Err(message)`, its payload already dropped
/// (contained).
pub(crate) fn catch<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let msg = message(&*payload);
        drop_payload(payload);
        msg
    })
}

/// Drops a user value (entries, a state, a handler) whose `Drop` may panic: the
/// panic is contained and logged at error level.
pub(crate) fn drop_quietly<V>(what: &str, value: V) {
    if let Err(msg) = catch(move || drop(value)) {
        log::error!("dropping {what} panicked: {msg}");
    }
}

/// Drops a payload; a payload whose own drop panics yields another one, dropped
/// in turn, up to `PAYLOAD_DEPTH`; the last is leaked rather than risk an abort.
fn drop_payload(mut payload: Box<dyn Any + Send>) {
    for _ in 0..PAYLOAD_DEPTH {
        match catch_unwind(AssertUnwindSafe(move || drop(payload))) {
            Ok(()) => return,
            Err(next) => payload = next,
        }
    }
    std::mem::forget(payload);
}

/// The text of a panic payload: a `&str` or `String` payload as it is, anything
/// else as a placeholder.
pub(crate) fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic payload>".to_string()
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn payloads_become_text() {
        assert_eq!(catch(|| 7), Ok(7));
        assert_eq!(catch(|| -> () { panic!("boom") }), Err("boom".to_string()));
        assert_eq!(
            catch(|| -> () { panic!("{} {}", "formatted", 1) }),
            Err("formatted 1".to_string())
        );
        assert_eq!(
            catch(|| -> () { std::panic::panic_any(42_u8) }),
            Err("<non-string panic payload>".to_string())
        );
    }

    /// A payload whose drop panics, with another such payload, and so on.
    struct Nasty(usize);
    impl Drop for Nasty {
        fn drop(&mut self) {
            if self.0 > 0 {
                std::panic::panic_any(Nasty(self.0 - 1));
            }
        }
    }

    #[test]
    fn a_payload_whose_drop_panics_is_contained() {
        for depth in [1, 3, PAYLOAD_DEPTH + 5] {
            let got = catch(|| -> () { std::panic::panic_any(Nasty(depth)) });
            assert_eq!(got, Err("<non-string panic payload>".to_string()));
        }
        drop_quietly("a nasty value", Nasty(2));
    }
}
