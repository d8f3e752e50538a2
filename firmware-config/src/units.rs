//! Durations ("30d", "12h", "1d12h") and percentages ("66%") parsed at the edge.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A non-negative span of time, written `30d`, `12h`, `90m`, `45s`, `2w` or combined `1d12h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub u64);

impl Duration {
    /// Seconds.
    pub fn secs(self) -> u64 {
        self.0
    }
    /// From days.
    pub const fn days(d: u64) -> Duration {
        Duration(d * 86_400)
    }
    /// From hours.
    pub const fn hours(h: u64) -> Duration {
        Duration(h * 3_600)
    }
    /// From minutes.
    pub const fn minutes(m: u64) -> Duration {
        Duration(m * 60)
    }
    /// As std.
    pub fn to_std(self) -> std::time::Duration {
        std::time::Duration::from_secs(self.0)
    }
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a duration (examples: 30d, 12h, 90m, 45s, 2w, 1d12h)");
        let s = s.trim();
        if s.is_empty() {
            return Err(bad());
        }
        let mut total: u64 = 0;
        let mut num = String::new();
        for c in s.chars() {
            if c.is_ascii_digit() {
                num.push(c);
                continue;
            }
            let unit = match c {
                'w' => 604_800,
                'd' => 86_400,
                'h' => 3_600,
                'm' => 60,
                's' => 1,
                _ => return Err(bad()),
            };
            let n: u64 = num.parse().map_err(|_| bad())?;
            num.clear();
            total = n
                .checked_mul(unit)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| format!("'{s}' is too long a duration"))?;
        }
        if !num.is_empty() {
            return Err(bad());
        }
        Ok(Duration(total))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        if rest == 0 {
            return f.write_str("0s");
        }
        for (unit, name) in [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")] {
            if rest >= unit {
                write!(f, "{}{name}", rest / unit)?;
                rest %= unit;
            }
        }
        Ok(())
    }
}

/// A percentage from 1 to 99, written `66%`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Percent(pub u8);

impl FromStr for Percent {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let n = s
            .trim()
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<u8>().ok())
            .ok_or_else(|| format!("'{s}' is not a percentage (example: 66%)"))?;
        if !(1..=99).contains(&n) {
            return Err(format!("{n}% is out of range: use 1% to 99%"));
        }
        Ok(Percent(n))
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

macro_rules! string_serde {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}
string_serde!(Duration);
string_serde!(Percent);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations() {
        assert_eq!("30d".parse::<Duration>().unwrap(), Duration::days(30));
        assert_eq!("1d12h".parse::<Duration>().unwrap(), Duration::hours(36));
        assert_eq!("2w".parse::<Duration>().unwrap(), Duration::days(14));
        assert_eq!(Duration::hours(36).to_string(), "1d12h");
        for bad in ["", "30", "d", "3x", "-1d", "1.5h", "99999999999999999999d"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad}");
        }
    }

    #[test]
    fn percents() {
        assert_eq!("66%".parse::<Percent>().unwrap(), Percent(66));
        for bad in ["0%", "100%", "66", "%", "abc%", "300%"] {
            assert!(bad.parse::<Percent>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn duration_display_round_trips(secs in 0u64..10_000_000_000) {
            prop_assert_eq!(Duration(secs).to_string().parse::<Duration>().unwrap(), Duration(secs));
        }
        #[test]
        fn parsers_never_panic(s in "\\PC{0,30}") {
            let _ = s.parse::<Duration>();
            let _ = s.parse::<Percent>();
        }
    }
}
