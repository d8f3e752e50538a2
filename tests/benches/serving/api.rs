//! Signatures/s through the signing API (keep-alive, 1 and 2 client threads; one client
//! opening a connection per request; 2 clients with everything held on one CPU) vs raw
//! cryptoki on the same token key and thread count, and where one request's time goes.

use super::{Bench, ProcCpu};
use edge_signer_tests::serving::ok_body_len;
use edge_signer_tests::*;
use hsm_shim::testing::bench::{paired, rate, rate_each, raw_rate_cost};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// One keep-alive signature request on `s`.
fn api_sign(s: &mut UnixStream, identity: &str, body: &[u8]) {
    let head = format!(
        "POST /v1/identities/{identity}/sign HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    // One write per request, as an HTTP client library would send it.
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).unwrap();
    let mut got = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "API closed the connection");
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let len = ok_body_len(&got[..end]);
            while got.len() < end + 4 + len {
                let n = s.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            return;
        }
    }
}

/// A sign request's body: the same 130-byte message as the raw baseline, base64.
fn sign_body(alg: &str) -> String {
    format!(
        r#"{{"alg":"{alg}","data":"WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWg=="}}"#
    )
}

/// Signatures/s of `alg` with `identity` through the API, one client opening a connection
/// per request, as `curl --unix-socket` in a shell script does.
fn api_rate_per_connection(sock: &std::path::Path, identity: &str, alg: &str) -> f64 {
    let body = sign_body(alg);
    rate(1, || {
        let mut s = UnixStream::connect(sock).unwrap();
        api_sign(&mut s, identity, body.as_bytes());
    })
}

/// Signatures/s of `alg` with `identity` through the API, from `threads` keep-alive
/// connections (the same 130-byte message as the raw baseline).
fn api_rate(sock: &std::path::Path, identity: &str, alg: &str, threads: usize) -> f64 {
    let body = sign_body(alg);
    let conns: Vec<_> = (0..threads)
        .map(|_| std::sync::Mutex::new(UnixStream::connect(sock).unwrap()))
        .collect();
    rate_each(&conns, |conn| {
        api_sign(&mut conn.lock().unwrap(), identity, body.as_bytes());
    })
}

/// Holds thread `tid` (0: the calling thread) to the CPUs in `cpus`.
fn pin(tid: libc::pid_t, cpus: impl IntoIterator<Item = usize>) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set);
    }
}

/// Holds every thread of process `pid` to the CPUs in `cpus`.
fn pin_process(pid: u32, cpus: &[usize]) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) {
            pin(tid, cpus.iter().copied());
        }
    }
}

/// Round trip (µs) of one byte between two threads over a Unix socket pair: the two
/// hand-offs every API request costs (client to daemon, daemon to client), with the two
/// threads pinned to CPUs `cpus` (the same CPU, or two: then every wake-up crosses cores).
fn handoff_rtt(cpus: [usize; 2]) -> f64 {
    let pin = |c: usize| pin(0, [c]);
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        pin(cpus[1]);
        let mut buf = [0u8; 1];
        while let Ok(1) = b.read(&mut buf) {
            b.write_all(&buf).unwrap();
        }
    });
    let rtt = std::thread::scope(|s| {
        s.spawn(|| {
            pin(cpus[0]);
            let mut buf = [0u8; 1];
            let n = 20_000;
            let t0 = Instant::now();
            for _ in 0..n {
                a.write_all(b"x").unwrap();
                a.read_exact(&mut buf).unwrap();
            }
            t0.elapsed().as_secs_f64() * 1e6 / n as f64
        })
        .join()
        .unwrap()
    });
    drop(a);
    let _ = echo.join();
    rtt
}

/// Signatures/s through the API vs raw cryptoki, 1 and 2 threads.
pub(super) fn api_part(b: &Bench) {
    println!(
        "{:<28} {:>7} {:>14} {:>14} {:>7}",
        "signatures", "threads", "raw sig/s", "API sig/s", "ratio"
    );
    let sock = b.env.path("api.sock");
    let (one_thread, kept) = keep_alive_rows(b, &sock);
    let fresh = connection_per_request_row(b, &sock);
    println!(
        "  daemon CPU µs per ES256 request, 1 client: keep-alive {kept:.0}, connection per request {fresh:.0}"
    );
    one_cpu_row(b, &sock);
    breakdown(one_thread);
}

/// ES256 with 2 client threads, the bench (raw threads and clients) and the daemon all held
/// on CPU 0: no wake-up crosses CPUs. On a VM every one that does is an interrupt sent to
/// another vCPU, paid by the daemon and the client twice per request, by the raw threads
/// only when they meet on one of SoftHSM's mutexes (`scripts/bench`: 0.26-0.86 sleeps per
/// signature with 2 threads). The row shows what a request costs beside its signature when
/// hand-offs are cheap.
fn one_cpu_row(b: &Bench, sock: &std::path::Path) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        return;
    }
    let all: Vec<usize> = (0..cpus).collect();
    pin_process(b.daemon_pid(), &[0]);
    pin(0, [0]);
    let cpu = ProcCpu::start(b.daemon_pid());
    let kt = hsm_shim::KeyType::EcP256;
    let (raw, api) = paired(
        || raw_rate_cost(&module(), LABEL, USER_PIN, &b.id, kt, 2).0,
        || cpu.count(|| api_rate(sock, "gw", "ES256", 2)),
    );
    pin(0, all.iter().copied());
    pin_process(b.daemon_pid(), &all);
    println!(
        "{:<28} {:>7} {raw:>14.0} {api:>14.0} {:>7.3}",
        "ES256, all on one CPU",
        2,
        api / raw
    );
    println!(
        "  daemon CPU µs per ES256 request there: {:.0}",
        cpu.per_op_us()
    );
}

/// The keep-alive rows, each key type with 1 and 2 client threads. Returns ES256's
/// (raw, API) rates with 1 thread and the daemon's CPU µs per request there.
fn keep_alive_rows(b: &Bench, sock: &std::path::Path) -> ((f64, f64), f64) {
    // ES256 is the case the target is about; PS256 (RSA-2048, a ~0.6 ms signature) shows
    // the same fixed cost per request against a slower signature.
    let keys = [
        (
            "ES256 (P-256)",
            "gw",
            "ES256",
            &b.id,
            hsm_shim::KeyType::EcP256,
        ),
        (
            "PS256 (RSA-2048)",
            "rsa",
            "PS256",
            &b.rsa_id,
            hsm_shim::KeyType::Rsa2048,
        ),
    ];
    let (mut one_thread, mut kept) = ((0.0, 0.0), 0.0);
    for (label, identity, alg, id, kt) in keys {
        for threads in [1, 2] {
            let cpu = ProcCpu::start(b.daemon_pid());
            let (raw, api) = paired(
                || raw_rate_cost(&module(), LABEL, USER_PIN, id, kt, threads).0,
                || cpu.count(|| api_rate(sock, identity, alg, threads)),
            );
            println!(
                "{label:<28} {threads:>7} {raw:>14.0} {api:>14.0} {:>7.3}",
                api / raw
            );
            if threads == 1 && identity == "gw" {
                one_thread = (raw, api);
                kept = cpu.per_op_us();
            }
        }
    }
    (one_thread, kept)
}

/// ES256 with a connection per request (accept, SO_PEERCRED, hand-off to an API thread,
/// close); returns the daemon's CPU µs per request.
fn connection_per_request_row(b: &Bench, sock: &std::path::Path) -> f64 {
    let fresh = ProcCpu::start(b.daemon_pid());
    let kt = hsm_shim::KeyType::EcP256;
    let (raw, api) = paired(
        || raw_rate_cost(&module(), LABEL, USER_PIN, &b.id, kt, 1).0,
        || fresh.count(|| api_rate_per_connection(sock, "gw", "ES256")),
    );
    println!(
        "{:<28} {:>7} {raw:>14.0} {api:>14.0} {:>7.3}",
        "ES256, connection per req",
        1,
        api / raw
    );
    fresh.per_op_us()
}

/// Where one request's time goes (1 thread, nothing overlaps): the signature, the two
/// hand-offs between client and daemon threads (on a VM a wake-up that crosses cores
/// costs tens of µs), and the rest (HTTP, JSON, base64, syscalls on both sides).
fn breakdown(one_thread: (f64, f64)) {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return;
    }
    let (cross, same) = (handoff_rtt([0, 1]), handoff_rtt([0, 0]));
    let (sig, req) = (1e6 / one_thread.0, 1e6 / one_thread.1);
    println!("  hand-off round trip: {cross:.1} µs across two CPUs, {same:.1} µs on one CPU");
    println!(
        "  1 thread, µs per request: {req:.0} = signature {sig:.0} + the rest {:.0} (hand-offs: {same:.0} to {cross:.0})",
        req - sig
    );
}
