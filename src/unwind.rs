//! The one place user code is called from the engine's threads: it catches a panic
//! and turns its payload into text, so the calling thread lives on.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `f`; a panic comes back as `Err(message)`.
pub(crate) fn catch<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| message(&*payload))
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
}
