//! Time as a dependency: servers read [`SystemClock`], tests and simulations drive a
//! [`MockClock`].

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::ids::Time;

/// A source of the current time.
pub trait Clock: Debug + Send + Sync + 'static {
    /// Now, in whole seconds since the UNIX epoch.
    fn now(&self) -> Time;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Time {
        // A clock before 1970 reads as the epoch.
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Time::from_secs(secs)
    }
}

/// A clock that only moves when told to. Clones share the same time.
#[derive(Clone, Debug, Default)]
pub struct MockClock(Arc<AtomicU64>);

impl MockClock {
    /// A clock reading `t`.
    pub fn new(t: Time) -> Self {
        Self(Arc::new(AtomicU64::new(t.as_secs())))
    }

    /// Sets the time.
    pub fn set(&self, t: Time) {
        self.0.store(t.as_secs(), Ordering::SeqCst);
    }

    /// Moves the time forward by `secs`.
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for MockClock {
    fn now(&self) -> Time {
        Time::from_secs(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mock_clock_moves_only_when_told() {
        let c = MockClock::new(Time::from_secs(100));
        let c2 = c.clone();
        c.advance(5);
        assert_eq!(c2.now(), Time::from_secs(105));
        c2.set(Time::from_secs(7));
        assert_eq!(c.now(), Time::from_secs(7));
        assert!(SystemClock.now().as_secs() > 1_600_000_000);
    }
}
