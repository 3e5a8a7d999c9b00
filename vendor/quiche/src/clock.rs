//! Where quiche reads the time (h3gate patch, `quiche-clock.patch`). A thread may set a clock
//! of its own, which every connection used on that thread then reads: a simulation steps
//! virtual time through the server and its clients alike, jumping from one timer to the next
//! instead of sleeping. Every other thread reads the system's monotonic clock.

use std::cell::Cell;
use std::time::Instant;

thread_local! {
    static NOW: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The current time: this thread's clock if one is set, else `Instant::now()`.
#[inline]
pub fn now() -> Instant {
    NOW.with(|c| c.get()).unwrap_or_else(Instant::now)
}

/// Sets this thread's clock (`None`: back to the system's). Time must not go backwards.
pub fn set_thread_clock(now: Option<Instant>) {
    NOW.with(|c| {
        debug_assert!(
            !matches!((c.get(), now), (Some(a), Some(b)) if b < a),
            "a thread clock went backwards"
        );
        c.set(now)
    });
}
