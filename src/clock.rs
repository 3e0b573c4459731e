//! The only reader of the wall clock. Everything else asks a [`Clock`], so tests can move
//! time (expiry) without sleeping.

use std::sync::Mutex;

use chrono::SubsecRound as _;

use crate::domain::model::{Duration, Timestamp};
pub use crate::domain::ports::Clock;

/// The real clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one sanctioned wall-clock read
    fn now(&self) -> Timestamp {
        // Microseconds: what both databases store, so a record reads back as it was issued.
        // Truncated before the conversion rather than after it (`trunc_subsecs`), which
        // halves the cost of a call read on every Introspect.
        // A clock before 1970 or beyond chrono's range takes chrono's own path (which
        // panics), never a made-up time: a clock stuck in the past would keep expired
        // tokens live.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|since| {
                chrono::DateTime::from_timestamp(
                    i64::try_from(since.as_secs()).ok()?,
                    since.subsec_micros() * 1000,
                )
            })
            .unwrap_or_else(|| chrono::Utc::now().trunc_subsecs(6))
    }
}

/// A clock that moves only when told to. For tests, and for tools that replay history.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Timestamp>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Timestamp) -> Self {
        Self {
            now: Mutex::new(start.trunc_subsecs(6)),
        }
    }

    /// A clock standing at the current wall-clock time.
    pub fn starting_now() -> Self {
        Self::new(SystemClock.now())
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self
            .now
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self
            .now
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
