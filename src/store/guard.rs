//! The store's lock guard: workers woken under the lock are notified only once
//! it is released, so a woken worker never wakes into a lock still held (and
//! the thread that filled the queue never makes a system call while it holds
//! the lock that every caller needs).

use super::{State, Store};
use parking_lot::MutexGuard;
use std::ops::{Deref, DerefMut};

/// The locked state; on drop, releases the lock, then wakes `to_wake` workers.
pub(super) struct Guard<'a, T: Send + 'static> {
    store: &'a Store<T>,
    st: Option<MutexGuard<'a, State<T>>>,
}

impl<'a, T: Send + 'static> Guard<'a, T> {
    pub(super) fn new(store: &'a Store<T>, st: MutexGuard<'a, State<T>>) -> Self {
        Guard {
            store,
            st: Some(st),
        }
    }

    /// The mutex guard, to wait on a condition variable with. Workers owed a
    /// wake-up are woken first (under the lock: the wait is about to release it).
    pub(super) fn raw(&mut self) -> &mut MutexGuard<'a, State<T>> {
        let st = self.st.as_mut().expect("guard is live");
        self.store.notify(std::mem::take(&mut st.to_wake));
        st
    }
}

impl<T: Send + 'static> Deref for Guard<'_, T> {
    type Target = State<T>;
    fn deref(&self) -> &State<T> {
        self.st.as_ref().expect("guard is live")
    }
}

impl<T: Send + 'static> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut State<T> {
        self.st.as_mut().expect("guard is live")
    }
}

impl<T: Send + 'static> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        let Some(mut st) = self.st.take() else { return };
        let n = std::mem::take(&mut st.to_wake);
        drop(st);
        self.store.notify(n);
    }
}
