//! Shared by the benchmarks (hsm-shim's and the daemon's): timed slices, rates over threads,
//! and the raw-cryptoki baseline every ratio is measured against.

use crate::KeyType;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use sha2::Digest;
use std::time::{Duration, Instant};

/// The length of one measured slice (`BENCH_MS`, default 150 ms).
pub fn secs() -> Duration {
    Duration::from_millis(
        std::env::var("BENCH_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(150),
    )
}

/// Slices per side.
pub const ROUNDS: usize = 20;

/// Measure `a` and `b` in alternating short slices and average each: this VM's speed drifts
/// by tens of percent over seconds, and alternating exposes both sides to the same drift.
pub fn paired(a: impl Fn() -> f64, b: impl Fn() -> f64) -> (f64, f64) {
    let (mut sa, mut sb) = (0.0, 0.0);
    for _ in 0..ROUNDS {
        sa += a();
        sb += b();
    }
    (sa / ROUNDS as f64, sb / ROUNDS as f64)
}

/// Run `f` on `threads` threads for the bench duration; returns operations per second.
pub fn rate(threads: usize, f: impl Fn() + Sync) -> f64 {
    let d = secs();
    let start = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut n = 0u64;
                    while start.elapsed() < d {
                        f();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("bench thread"))
            .sum()
    });
    total as f64 / start.elapsed().as_secs_f64()
}

/// Baseline: what a hand-written integration does: one session per thread, logged in,
/// key handle found once, then C_Sign in a loop (ECDSA over a SHA-256 computed in software).
pub fn raw_rate(
    module: &std::path::Path,
    label: &str,
    pin: &str,
    id: &[u8],
    kt: KeyType,
    threads: usize,
) -> f64 {
    let ctx = crate::token::load_module(module).expect("module");
    let slot = ctx
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|i| i.label().trim_end() == label)
                .unwrap_or(false)
        })
        .expect("the bench token");
    let msg = [0x5au8; 130];
    let sessions: Vec<_> = (0..threads)
        .map(|_| {
            let s = ctx.open_rw_session(slot).expect("session");
            let _ = s.login(UserType::User, Some(&cryptoki::types::AuthPin::from(pin)));
            let h = s
                .find_objects(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Id(id.to_vec()),
                ])
                .expect("find")[0];
            std::sync::Mutex::new((s, h))
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    thread_local!(static MINE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) });
    rate(threads, || {
        let idx = MINE.with(|m| {
            m.get().unwrap_or_else(|| {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                m.set(Some(i));
                i
            })
        });
        let guard = sessions[idx].lock().expect("own session");
        let (s, h) = &*guard;
        if kt.is_ec() {
            let digest = sha2::Sha256::digest(msg);
            s.sign(&Mechanism::Ecdsa, *h, &digest).expect("raw sign");
        } else {
            let p = PkcsPssParams {
                hash_alg: MechanismType::SHA256,
                mgf: PkcsMgfType::MGF1_SHA256,
                s_len: 32u64.into(),
            };
            s.sign(&Mechanism::Sha256RsaPkcsPss(p), *h, &msg)
                .expect("raw sign");
        }
    })
}
