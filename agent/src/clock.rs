//! Time, injected: the daemon uses the system clock; tests run 90 days in seconds.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub type Unix = u64;

/// A source of the current time.
pub trait Clock: Send + Sync {
    /// Now, in Unix seconds.
    fn now(&self) -> Unix;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Unix {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A clock that only moves when told (tests).
#[derive(Debug, Clone, Default)]
pub struct FakeClock(Arc<Mutex<Unix>>);

impl FakeClock {
    /// Start at `t`.
    pub fn at(t: Unix) -> FakeClock {
        FakeClock(Arc::new(Mutex::new(t)))
    }
    /// Move to `t` (never backwards).
    pub fn set(&self, t: Unix) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *g = (*g).max(t);
    }
    /// Move forward by `secs`.
    pub fn advance(&self, secs: u64) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *g += secs;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Unix {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// RFC 3339 UTC (`2026-11-22T00:41:31Z`) for people and JSON.
pub fn rfc3339(t: Unix) -> String {
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_307_291), "2026-11-22T00:28:11Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
