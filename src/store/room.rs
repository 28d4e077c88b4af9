//! The gate `Block` hand-overs (and `init` chunks under an enforced bound) wait
//! at for room, apart from the callers' lock so that whoever frees room never
//! takes that lock.
//!
//! An event count: a waiter registers (`waiters += 1`) and takes a ticket (the
//! generation) *before* it looks for room; whoever frees room afterwards sees
//! the waiter registered and moves the generation on, so a waiter whose ticket
//! is stale never sleeps. No wake-up can be lost between the look and the wait.

use crate::clock::Clock;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

#[derive(Default)]
pub(super) struct Room {
    generation: AtomicU64,
    waiters: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

/// A registered waiter's ticket; dropping it unregisters.
pub(super) struct Ticket<'a> {
    room: &'a Room,
    generation: u64,
}

impl Room {
    /// Registers a waiter; call before looking for room.
    pub(super) fn ticket(&self) -> Ticket<'_> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        Ticket {
            room: self,
            generation: self.generation.load(Ordering::SeqCst),
        }
    }

    /// Hand-overs waiting now.
    pub(super) fn waiting(&self) -> usize {
        self.waiters.load(Ordering::SeqCst)
    }

    /// Room was freed (or the engine stopped): waiters look again.
    pub(super) fn open(&self) {
        if self.waiting() > 0 {
            self.bump();
        }
    }

    /// Every waiter looks again, registered or not (a clock moved, a stop).
    pub(super) fn bump(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let _held = self.lock.lock();
        self.cv.notify_all();
    }
}

impl Ticket<'_> {
    /// Waits until the room is opened after this ticket was taken, or until
    /// `deadline` passes; returns whether it passed.
    pub(super) fn wait(self, clock: &Clock, deadline: Option<Instant>) -> bool {
        let room = self.room;
        let mut held = room.lock.lock();
        while room.generation.load(Ordering::SeqCst) == self.generation {
            if clock.wait(&room.cv, &mut held, deadline) {
                return true;
            }
        }
        false
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.room.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}
