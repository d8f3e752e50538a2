//! One full rotation on SoftHSM with the issuer answering at once: plan, key generation in
//! the token, CSR signed in the token, submit, certificate, validation, promotion (certificate
//! object stored, PEM exported), retirement of the previous generation (destroy + proof).
//! No probe (it would measure the probed server). Run with `scripts/bench`.

use edge_signer::clock::{Clock, FakeClock};
use edge_signer::issuer::Issuer;
use edge_signer::lifecycle::{Engine, Progress};
use edge_signer_tests::sim::{config, SimCa};
use hsm_shim::testing::TestToken;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let t = TestToken::new();
    let n: usize = std::env::var("BENCH_ROTATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    println!("one full rotation on SoftHSM, issuer answering at once ({n} rotations per key type)");
    println!(
        "{:<10} {:>10} {:>10} {:>10}",
        "key", "median ms", "p90 ms", "max ms"
    );
    for (i, kt) in ["ec-p256", "rsa-2048"].iter().enumerate() {
        let clock = FakeClock::at(1_800_000_000);
        let mut issuers: BTreeMap<String, Box<dyn Issuer>> = BTreeMap::new();
        issuers.insert(
            "sim".into(),
            Box::new(SimCa::new(clock.clone(), Arc::new(AtomicBool::new(true)))),
        );
        let cfg = config(
            &t.dir.path().join(format!("state-{i}")),
            &t.module,
            kt,
            "0s",
            "0s",
        );
        let mut e =
            Engine::new(cfg, t.token.clone(), Arc::new(clock.clone()), issuers).expect("engine");
        e.run_until_wait("gw").expect("first enrolment");
        let mut times = Vec::new();
        for _ in 0..n {
            clock.advance(60);
            let start = Instant::now();
            e.force("gw").expect("force");
            while let Progress::Moved = e.take_one_step("gw").expect("one step") {}
            times.push(start.elapsed().as_secs_f64() * 1000.0);
            let rec = &e.register().identities["gw"];
            assert!(
                rec.pending.is_none()
                    && rec
                        .generations
                        .iter()
                        .filter(|g| g.status == edge_signer::register::GenStatus::Current)
                        .count()
                        == 1
            );
        }
        times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{:<10} {:>10.1} {:>10.1} {:>10.1}",
            kt,
            times[n / 2],
            times[n * 9 / 10],
            times[n - 1]
        );
        let _ = clock.now();
    }
}
