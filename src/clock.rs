//! Time as a dependency: the server asks a [`Clock`], so tests can move it.

use std::sync::Arc;

use parking_lot::Mutex;

use time::{Date, OffsetDateTime};

/// Where the service reads the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> OffsetDateTime;

    /// Today's date in UTC; agreement dates are read in UTC.
    fn today(&self) -> Date {
        self.now().date()
    }
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// A clock that stands still until moved; for tests.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<OffsetDateTime>>);

impl ManualClock {
    pub fn new(at: OffsetDateTime) -> Self {
        ManualClock(Arc::new(Mutex::new(at)))
    }

    pub fn set(&self, at: OffsetDateTime) {
        *self.0.lock() = at;
    }

    pub fn advance(&self, by: time::Duration) {
        let mut t = self.0.lock();
        *t += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let start = time::macros::datetime!(2027-01-01 00:00 UTC);
        let clock = ManualClock::new(start);
        assert_eq!(clock.now(), start);
        clock.advance(time::Duration::days(2));
        assert_eq!(clock.today(), time::macros::date!(2027 - 01 - 03));
    }
}
