//! Unit tests of the engine as a whole that need the crate's insides: injected
//! internal failures (see `fault`).

mod failure;
