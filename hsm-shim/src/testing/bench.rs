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
    rate_cost(threads, f).0
}

/// What the measured threads spent: CPU time, wall time, operations and the times a thread
/// went to sleep (voluntary context switches: waiting on a lock or I/O). Sums over slices.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cost {
    cpu_ns: u64,
    wall_ns: u64,
    ops: u64,
    sleeps: u64,
}

impl std::ops::Add for Cost {
    type Output = Cost;
    /// Two slices' (or threads') costs together.
    fn add(self, o: Cost) -> Cost {
        Cost {
            cpu_ns: self.cpu_ns + o.cpu_ns,
            wall_ns: self.wall_ns + o.wall_ns,
            ops: self.ops + o.ops,
            sleeps: self.sleeps + o.sleeps,
        }
    }
}

impl Cost {
    /// CPUs kept busy by the measured threads.
    pub fn cpus(&self) -> f64 {
        self.cpu_ns as f64 / self.wall_ns.max(1) as f64
    }
    /// Times a thread went to sleep, per operation.
    pub fn sleeps_per_op(&self) -> f64 {
        self.sleeps as f64 / self.ops.max(1) as f64
    }
    /// CPU µs per operation.
    pub fn cpu_us_per_op(&self) -> f64 {
        self.cpu_ns as f64 / 1e3 / self.ops.max(1) as f64
    }
}

/// The calling thread's CPU time in ns and its voluntary context switches so far (Linux
/// /proc; zeros elsewhere).
fn thread_cost() -> (u64, u64) {
    let read =
        |f: &str| std::fs::read_to_string(format!("/proc/thread-self/{f}")).unwrap_or_default();
    let cpu = read("schedstat")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let sleeps = read("status")
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (cpu, sleeps)
}

/// `rate` with one item per thread (see `rate_cost_each`).
pub fn rate_each<T: Sync>(items: &[T], f: impl Fn(&T) + Sync) -> f64 {
    rate_cost_each(items, f).0
}

/// `rate`, and what its threads cost.
pub fn rate_cost(threads: usize, f: impl Fn() + Sync) -> (f64, Cost) {
    rate_cost_by_thread(threads, |_| f())
}

/// `rate_cost` with one item per thread: thread `i` runs `f(&items[i])` (its own session,
/// its own connection).
pub fn rate_cost_each<T: Sync>(items: &[T], f: impl Fn(&T) + Sync) -> (f64, Cost) {
    rate_cost_by_thread(items.len(), |i| f(&items[i]))
}

/// `rate_cost`, telling each call which thread (0..threads) makes it.
fn rate_cost_by_thread(threads: usize, f: impl Fn(usize) + Sync) -> (f64, Cost) {
    let d = secs();
    let start = Instant::now();
    let threads_cost: Cost = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|i| {
                let f = &f;
                s.spawn(move || {
                    let (cpu0, sleeps0) = thread_cost();
                    let mut ops = 0u64;
                    while start.elapsed() < d {
                        f(i);
                        ops += 1;
                    }
                    let (cpu1, sleeps1) = thread_cost();
                    Cost {
                        ops,
                        cpu_ns: cpu1.saturating_sub(cpu0),
                        sleeps: sleeps1.saturating_sub(sleeps0),
                        wall_ns: 0,
                    }
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("bench thread"))
            .fold(Cost::default(), |a, b| a + b)
    });
    let wall = start.elapsed();
    let cost = Cost {
        wall_ns: wall.as_nanos() as u64,
        ..threads_cost
    };
    (cost.ops as f64 / wall.as_secs_f64(), cost)
}

/// Baseline: what a hand-written integration does: one session per thread, logged in,
/// key handle found once, then C_Sign in a loop (ECDSA over a SHA-256 computed in software).
/// Signatures per second, and what the threads cost.
pub fn raw_rate_cost(
    module: &std::path::Path,
    label: &str,
    pin: &str,
    id: &[u8],
    kt: KeyType,
    threads: usize,
) -> (f64, Cost) {
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
    rate_cost_each(&sessions, |session| {
        let guard = session.lock().expect("own session");
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
