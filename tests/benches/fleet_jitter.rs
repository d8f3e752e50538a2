//! The fleet simulation of issue "fleet channel": N devices (100,000 by default,
//! `BENCH_DEVICES`), one configuration, one common expiry: when does each renew? Prints the
//! histogram's peak over its average across the jitter window (1.0 is perfectly even), and
//! what a naive fleet without per-device jitter would do (every device in the same second).
//! Device key ids come from the OS random source, as a token's CKA_ID would.

use edge_signer::lifecycle::schedule::{fleet_renewal_times, peak_over_average};
use std::io::Read;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = std::env::var("BENCH_DEVICES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let text = "[[identity]]\nname = \"gw\"\nsubject = { cn = \"gw\" }\nissuer = \"p\"\n[identity.renewal]\nbefore = \"30d\"\njitter = \"1d\"\n";
    let cfg = toml::from_str::<firmware_config::Config>(text)
        .expect("config")
        .identities[0]
        .clone();
    let (nb, na) = (1_800_000_000u64, 1_800_000_000u64 + 90 * 86_400);
    let mut urandom = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    let mut random_id = || {
        let mut b = [0u8; 16];
        urandom.read_exact(&mut b).expect("random");
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    };
    let ids: Vec<String> = (0..n).map(|_| random_id()).collect();
    let start = std::time::Instant::now();
    let times = fleet_renewal_times(&cfg, ids.iter().cloned(), nb, na);
    let point = na - 30 * 86_400;
    println!(
        "fleet renewal spread: {n} devices, one config, one expiry, jitter window 1 d ({:?})",
        start.elapsed()
    );
    println!(
        "{:<10} {:>10} {:>14} {:>16}",
        "buckets", "peak/avg", "peak devices", "naive peak/avg"
    );
    for buckets in [24usize, 96, 1440] {
        let (ratio, hist) = peak_over_average(&times, point, 86_400, buckets);
        println!(
            "{:<10} {:>10.3} {:>14} {:>16.0}",
            format!("{buckets} ({}m)", 1440 / buckets),
            ratio,
            hist.iter().max().unwrap_or(&0),
            buckets as f64
        );
    }
    // A fleet enrolled within one hour: each device's certificate starts 0..3600 s later.
    let spread: Vec<u64> = ids
        .iter()
        .enumerate()
        .flat_map(|(i, id)| {
            let off = (i as u64 * 3600) / n as u64;
            fleet_renewal_times(&cfg, std::iter::once(id.clone()), nb + off, na + off)
        })
        .collect();
    let (ratio, hist) = peak_over_average(&spread, point + 3600, 86_400 + 3600, 1500);
    println!(
        "enrolled within one hour: requests per minute to the CA, peak/avg {ratio:.3} (peak {} devices/min, average {:.0})",
        hist.iter().max().unwrap_or(&0),
        n as f64 / 1500.0
    );
}
