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

/// When the current generation should be renewed: the policy point, minus a stable jitter
/// offset (earlier, never later than the policy says).
pub fn renewal_time(cfg: &IdentityConfig, rec: &IdentityRecord) -> Option<Unix> {
    let g = rec.current_gen()?;
    let (nb, na) = (g.not_before?, g.not_after?);
    let point = match cfg.renewal.renew_at() {
        RenewAt::Before(d) => na.saturating_sub(d.secs()),
        RenewAt::Fraction(p) => nb + (na.saturating_sub(nb)) * p.0 as u64 / 100,
    };
    Some(
        point
            .saturating_sub(jitter(
                g.key_id.as_deref().unwrap_or_default(),
                &cfg.name,
                g.number,
                cfg.renewal.jitter.secs(),
            ))
            .max(nb),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::key_label;
    use crate::register::{GenStatus, Generation};
    use firmware_config::schema::Config;

    /// 1,000 devices, one configuration, one expiry: renewal times spread over the window.
    #[test]
    fn a_fleet_with_one_expiry_spreads_over_the_jitter_window() {
        let text = "[[identity]]\nname = \"gw\"\nsubject = { cn = \"gw\" }\nissuer = \"p\"\n[identity.renewal]\nbefore = \"30d\"\njitter = \"1d\"\n";
        let cfg: IdentityConfig = toml::from_str::<Config>(text).unwrap().identities[0].clone();
        let (nb, na) = (1_800_000_000u64, 1_800_000_000u64 + 90 * 86_400);
        let mut state = 0x1234_5678_9abc_def0u64;
        let buckets = 24usize;
        let mut hist = vec![0u32; buckets];
        let mut times = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            // A token-made random CKA_ID per device.
            let id: String = (0..16)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    format!("{:02x}", state as u8)
                })
                .collect();
            let mut rec = IdentityRecord::default();
            rec.generations.push(Generation {
                number: 1,
                status: GenStatus::Current,
                key_label: key_label("gw", 1),
                key_id: Some(id),
                key_uri: None,
                subject: "CN=gw".into(),
                sans: vec![],
                csr_pem: None,
                issuer: "p".into(),
                submission: None,
                cert_pem: None,
                serial: None,
                fingerprint: None,
                not_before: Some(nb),
                not_after: Some(na),
                overlap_until: None,
                reminders_fired: vec![],
                created_at: nb,
                kid: None,
                request: None,
                previous_expiry: None,
                sent_at: None,
                subject_issued: None,
                name_differences: vec![],
            });
            rec.current = Some(1);
            let t = renewal_time(&cfg, &rec).unwrap();
            let point = na - 30 * 86_400;
            assert!(
                t <= point && t > point - 86_400,
                "only ever earlier, within the window"
            );
            assert_eq!(renewal_time(&cfg, &rec), Some(t), "stable for one device");
            hist[((point - t) * buckets as u64 / 86_400) as usize] += 1;
            times.insert(t);
        }
        let peak = *hist.iter().max().unwrap() as f64;
        let avg = 1000.0 / buckets as f64;
        eprintln!("jitter histogram peak/avg {:.2} over {hist:?}", peak / avg);
        assert!(peak / avg <= 2.0, "peak/avg {} over {hist:?}", peak / avg);
        assert!(times.len() > 980, "{} distinct times", times.len());
    }
}
