//! When to renew: the policy point, moved earlier by a per-device jitter.

use crate::clock::Unix;
use crate::register::IdentityRecord;
use firmware_config::schema::{IdentityConfig, RenewAt};

/// A per-device offset in `0..span`: a hash of the generation's random `CKA_ID` (16 random
/// bytes made by this device's token), so boxes sharing one configuration and one expiry
/// spread uniformly over the window, while one box keeps the same offset across restarts.
fn jitter(seed: &str, identity: &str, generation: u32, span: u64) -> u64 {
    if span == 0 {
        return 0;
    }
    // FNV-1a, then a 64-bit finaliser (splitmix) so the low bits are well mixed.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in seed
        .bytes()
        .chain(identity.bytes())
        .chain(generation.to_le_bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d049bb133111eb);
    h ^= h >> 31;
    h % span
}

/// A renewal point given as "this long before expiry" is never earlier than a third of the
/// certificate's life: a CA that issues certificates as short as the window (30-day ones
/// with `before = "30d"`, or 24-hour ones) would otherwise have each new generation due at
/// once, forever.
pub const EARLIEST_FRACTION: u64 = 3;

/// When the current generation should be renewed: the policy point, minus a stable jitter
/// offset (earlier, never later than the policy says), never before a third of its life
/// for a `before` window.
pub fn renewal_time(cfg: &IdentityConfig, rec: &IdentityRecord) -> Option<Unix> {
    let g = rec.current_gen()?;
    let (nb, na) = g.validity()?;
    Some(renewal_point(cfg, &g.key()?.id_hex(), g.number, nb, na))
}

/// [`renewal_time`] of generation `number` whose key has `key_id` (hex), valid `nb..na`.
fn renewal_point(cfg: &IdentityConfig, key_id: &str, number: u32, nb: Unix, na: Unix) -> Unix {
    let life = na.saturating_sub(nb);
    let (point, earliest) = match cfg.renewal.renew_at() {
        RenewAt::Before(d) => (na.saturating_sub(d.secs()), nb + life / EARLIEST_FRACTION),
        RenewAt::Fraction(p) => (nb + life * p.0 as u64 / 100, nb),
    };
    let point = point.max(earliest);
    point
        .saturating_sub(jitter(key_id, &cfg.name, number, cfg.renewal.jitter.secs()))
        .max(earliest)
}

/// A warning when the `before` window is not shorter than the certificates the issuer hands
/// out (`life`, the current generation's): renewal then happens at a third of their life.
pub fn window_warning(cfg: &IdentityConfig, life: u64) -> Option<String> {
    match cfg.renewal.renew_at() {
        RenewAt::Before(d) if d.secs() >= life.saturating_sub(life / EARLIEST_FRACTION) => {
            Some(format!(
                "renewal.before ({}) leaves less than a third of the life of the certificates the issuer hands out ({}): renewing at a third of their life instead; set a shorter renewal.before or renewal.at = \"66%\"",
                d,
                firmware_config::Duration(life)
            ))
        }
        _ => None,
    }
}

/// Renewal times of a fleet sharing `cfg` whose current certificates all run `nb..na`, one
/// per device key id (`ids`: what each device's token made): the fleet simulation of the
/// tests and of `scripts/bench`.
pub fn fleet_renewal_times(
    cfg: &IdentityConfig,
    ids: impl Iterator<Item = String>,
    nb: Unix,
    na: Unix,
) -> Vec<Unix> {
    ids.map(|id| renewal_point(cfg, &id, 1, nb, na)).collect()
}

/// Peak bucket over the average bucket of `times` spread over `window` seconds before
/// `point`, in `buckets` buckets (1.0: perfectly even), with the histogram.
pub fn peak_over_average(
    times: &[Unix],
    point: Unix,
    window: u64,
    buckets: usize,
) -> (f64, Vec<u32>) {
    let mut hist = vec![0u32; buckets.max(1)];
    for t in times {
        let off = point.saturating_sub(*t).min(window.saturating_sub(1));
        hist[(off * buckets as u64 / window.max(1)) as usize] += 1;
    }
    let peak = f64::from(*hist.iter().max().unwrap_or(&0));
    (peak / (times.len() as f64 / buckets as f64), hist)
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_config::schema::Config;

    /// 1,000 devices, one configuration, one expiry: renewal times spread over the window.
    #[test]
    fn a_fleet_with_one_expiry_spreads_over_the_jitter_window() {
        let text = "[[identity]]\nname = \"gw\"\nsubject = { cn = \"gw\" }\nissuer = \"p\"\n[identity.renewal]\nbefore = \"30d\"\njitter = \"1d\"\n";
        let cfg: IdentityConfig = toml::from_str::<Config>(text).unwrap().identities[0].clone();
        let (nb, na) = (1_800_000_000u64, 1_800_000_000u64 + 90 * 86_400);
        let mut state = 0x1234_5678_9abc_def0u64;
        // A token-made random CKA_ID per device.
        let ids: Vec<String> = (0..1000)
            .map(|_| {
                (0..16)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        format!("{:02x}", state as u8)
                    })
                    .collect()
            })
            .collect();
        let all = fleet_renewal_times(&cfg, ids.iter().cloned(), nb, na);
        let point = na - 30 * 86_400;
        for t in &all {
            assert!(
                *t <= point && *t > point - 86_400,
                "only ever earlier, within the window"
            );
        }
        let again = fleet_renewal_times(&cfg, ids.into_iter(), nb, na);
        assert_eq!(all, again, "stable for one device");
        let (ratio, hist) = peak_over_average(&all, point, 86_400, 24);
        eprintln!("jitter histogram peak/avg {ratio:.2} over {hist:?}");
        assert!(ratio <= 2.0, "peak/avg {ratio} over {hist:?}");
        let times: std::collections::BTreeSet<_> = all.iter().collect();
        assert!(times.len() > 980, "{} distinct times", times.len());
    }
}
