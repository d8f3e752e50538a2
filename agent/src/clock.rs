//! Time, injected: the daemon uses the system clock; tests run 90 days in seconds.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use time::format_description::well_known::Rfc3339;

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

/// When this binary was built (a day boundary, or `SOURCE_DATE_EPOCH`): the clock can
/// never be earlier than that.
pub fn build_time() -> Unix {
    env!("EDGE_SIGNER_BUILD_TIME").parse().unwrap_or(0)
}

impl FakeClock {
    /// Set the time to `t`, backwards too (a device that lost its clock).
    pub fn jump_to(&self, t: Unix) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }

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
    i64::try_from(t)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("@{t}"))
}

/// Parse `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SSZ` (UTC) into Unix seconds.
pub fn parse_date(s: &str) -> Result<Unix, String> {
    let bad = || format!("'{s}' is not a date (2027-11-01 or 2027-11-01T12:00:00Z)");
    // Only these two forms (no fractions, no offsets, no lower-case `t`), parsed as RFC 3339.
    let full = match s.len() {
        10 => format!("{s}T00:00:00Z"),
        20 if s.as_bytes()[10] == b'T' && s.ends_with('Z') => s.to_owned(),
        _ => return Err(bad()),
    };
    let at = time::OffsetDateTime::parse(&full, &Rfc3339).map_err(|_| bad())?;
    if !(1970..=9999).contains(&at.year()) {
        return Err(bad());
    }
    Unix::try_from(at.unix_timestamp()).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_307_291), "2026-11-22T00:28:11Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(parse_date("2000-02-29").unwrap(), 951_782_400);
        assert_eq!(parse_date("2026-11-22T00:28:11Z").unwrap(), 1_795_307_291);
        for bad in [
            "2026-02-30",
            "2026-13-01",
            "tomorrow",
            "2026-01-01T25:00:00Z",
            "2026-01-01T10:00:00",
            "2026-01-01T10:00:00.5Z",
            "2026-01-01T10:00:00+01:00",
            "1969-12-31",
            "2026-1-01",
        ] {
            assert!(parse_date(bad).is_err(), "{bad}");
        }
    }
}
