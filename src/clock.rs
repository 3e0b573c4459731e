//! The only reader of the wall clock. Everything else asks a [`Clock`], so tests can move
//! time (expiry) without sleeping.

use std::cell::Cell;
use std::sync::Mutex;

use chrono::{NaiveDate, NaiveTime, SubsecRound as _};

use crate::domain::model::{Duration, Timestamp};
pub use crate::domain::ports::Clock;

/// The real clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one sanctioned wall-clock read
    fn now(&self) -> Timestamp {
        // Microseconds: what both databases store, so a record reads back as it was issued.
        // A clock before 1970 or beyond chrono's range takes chrono's own path (which
        // panics), never a made-up time: a clock stuck in the past would keep expired
        // tokens live.
        // `clock_gettime` itself rather than `SystemTime::now().duration_since(UNIX_EPOCH)`,
        // whose normalising subtraction cost more than the read: every call reads the clock.
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
        u64::try_from(now.tv_sec)
            .ok()
            .zip(u32::try_from(now.tv_nsec / 1_000).ok())
            .and_then(|(secs, micros)| from_unix(secs, micros))
            .unwrap_or_else(|| chrono::Utc::now().trunc_subsecs(6))
    }
}

/// The time `secs` and `micros` after the Unix epoch. Every call reads the clock (twice, a
/// call authenticated and introspecting), and turning a day number into a calendar date is
/// most of chrono's conversion; the date is worked out once per day and thread instead.
fn from_unix(secs: u64, micros: u32) -> Option<Timestamp> {
    const DAY: u64 = 86_400;
    thread_local! {
        static TODAY: Cell<Option<(u64, NaiveDate)>> = const { Cell::new(None) };
    }
    let (day, second) = (secs / DAY, u32::try_from(secs % DAY).ok()?);
    let date = match TODAY.get() {
        Some((known, date)) if known == day => date,
        _ => {
            let date =
                chrono::DateTime::from_timestamp(i64::try_from(day * DAY).ok()?, 0)?.date_naive();
            TODAY.set(Some((day, date)));
            date
        }
    };
    let time = NaiveTime::from_num_seconds_from_midnight_opt(second, micros * 1000)?;
    Some(date.and_time(time).and_utc())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_remembered_date_gives_what_chrono_gives_across_days_years_and_leap_days() {
        let check = |secs: u64, micros: u32| {
            let expected =
                chrono::DateTime::from_timestamp(secs as i64, micros * 1000).expect("in range");
            assert_eq!(
                from_unix(secs, micros),
                Some(expected),
                "{secs}.{micros:06}"
            );
        };
        // Each instant twice in a row (the second from the remembered date), around
        // midnights, the end of a leap February and of a year, in and out of order.
        for secs in [
            0,
            86_399,
            86_400,
            951_782_399, // 2000-02-28T23:59:59
            951_782_400,
            951_868_800, // 2000-03-01
            1_798_761_599,
            1_798_761_600, // 2027-01-01
            1_798_761_599,
            4_102_444_800, // 2100-01-01
            1_765_000_000,
        ] {
            for micros in [0, 1, 999_999] {
                check(secs, micros);
                check(secs, micros);
            }
        }
        let now = SystemClock.now();
        assert_eq!(
            now,
            now.trunc_subsecs(6),
            "microseconds, as the databases keep"
        );
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // the reference the system clock is checked against
    fn the_system_clock_reads_the_wall_clock() {
        let before = chrono::Utc::now().trunc_subsecs(6);
        let now = SystemClock.now();
        let after = chrono::Utc::now();
        assert!(before <= now && now <= after, "{before} ≤ {now} ≤ {after}");
    }
}
