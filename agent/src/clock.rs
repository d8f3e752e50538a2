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

/// Parse `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SSZ` (UTC) into Unix seconds.
pub fn parse_date(s: &str) -> Result<Unix, String> {
    let bad = || format!("'{s}' is not a date (2027-11-01 or 2027-11-01T12:00:00Z)");
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t.strip_suffix('Z').ok_or_else(bad)?)),
        None => (s, None),
    };
    let n: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let [y, m, d] = n[..] else { return Err(bad()) };
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let secs = match time {
        Some(t) => {
            let v: Vec<i64> = t
                .split(':')
                .map(|x| x.parse().map_err(|_| bad()))
                .collect::<Result<_, _>>()?;
            let [h, mi, se] = v[..] else {
                return Err(bad());
            };
            if !(0..24).contains(&h) || !(0..60).contains(&mi) || !(0..61).contains(&se) {
                return Err(bad());
            }
            h * 3600 + mi * 60 + se
        }
        None => 0,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let t = days * 86_400 + secs;
    let t = u64::try_from(t).map_err(|_| bad())?;
    if rfc3339(t)[..10] != *date {
        return Err(bad());
    }
    Ok(t)
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
        ] {
            assert!(parse_date(bad).is_err(), "{bad}");
        }
    }
}
