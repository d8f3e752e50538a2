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

/// Signatures/s through the API vs raw cryptoki, 1 and 2 threads, with the daemon's CPU per
/// request and the part of it outside the token (the daemon's CPU per request minus the time
/// its token calls took, from its own `edge_signer_token_signature_seconds`: the key's check,
/// C_SignInit and C_Sign, in process on SoftHSM); then the same API against p11-kit's
/// PKCS#11 remoting, the peer a user would otherwise pick to share a token over a socket.
pub(super) fn api_part(b: &Bench) {
    println!(
        "{:<28} {:>7} {:>11} {:>11} {:>7} {:>12} {:>14}",
        "signatures",
        "threads",
        "raw sig/s",
        "API sig/s",
        "ratio",
        "daemon µs/req",
        "outside token"
    );
    let sock = b.env.path("api.sock");
    let one_thread = keep_alive_rows(b, &sock);
    connection_per_request_row(b, &sock);
    one_cpu_row(b, &sock);
    breakdown(one_thread);
    p11_kit_rows(b, &sock);
}

/// The API against `p11-kit server` (Debian's p11-kit) remoting the same SoftHSM token,
/// driven by the raw-cryptoki client through `p11-kit-client.so`: the same key, the same
/// client code as the raw baseline, 1 and 2 client threads.
fn p11_kit_rows(b: &Bench, sock: &std::path::Path) {
    let Some(client) = [
        "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
        "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
    ]
    .into_iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.exists()) else {
        println!("  (p11-kit-client.so not found: scripts/setup installs p11-kit-modules)");
        return;
    };
    let server_sock = b.env.path("p11-kit.sock");
    let _server = Guard(
        std::process::Command::new("p11-kit")
            .args(["server", "-f", "-n"])
            .arg(&server_sock)
            .arg("--provider")
            .arg(module())
            .arg(format!("pkcs11:token={LABEL}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("p11-kit (scripts/setup installs it)"),
    );
    wait_for("p11-kit server's socket", 10, || server_sock.exists());
    // Safe: the client module reads it when it is loaded, below, after this.
    unsafe {
        std::env::set_var(
            "P11_KIT_SERVER_ADDRESS",
            format!("unix:path={}", server_sock.display()),
        )
    };
    println!(
        "{:<28} {:>7} {:>11} {:>11} {:>7}",
        "vs p11-kit remoting", "threads", "p11-kit/s", "API sig/s", "ratio"
    );
    for threads in [1, 2] {
        let kt = hsm_shim::KeyType::EcP256;
        let (remote, api) = paired(
            || raw_rate_cost(&client, LABEL, USER_PIN, &b.id, kt, threads).0,
            || api_rate(sock, "gw", "ES256", threads),
        );
        println!(
            "{:<28} {threads:>7} {remote:>11.0} {api:>11.0} {:>7.2}",
            "ES256 (P-256)",
            api / remote
        );
    }
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

/// The daemon's `edge_signer_token_signature_seconds` (sum, count) over every mechanism, read
/// from `/metrics` on the API socket.
fn token_seconds(b: &Bench) -> (f64, f64) {
    let mut s = UnixStream::connect(b.env.path("api.sock")).expect("API socket");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let total = |series: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (
        total("edge_signer_token_signature_seconds_sum"),
        total("edge_signer_token_signature_seconds_count"),
    )
}

/// One row, `label`: raw cryptoki on key `id` alternated with `api` (the API's rate with
/// `threads` clients); prints the rates, the daemon's CPU per request and its part outside
/// the token. Returns (raw, API) signatures/s.
fn row(
    b: &Bench,
    label: &str,
    api: impl Fn() -> f64,
    id: &[u8],
    kt: hsm_shim::KeyType,
    threads: usize,
) -> (f64, f64) {
    let cpu = ProcCpu::start(b.daemon_pid());
    let token_before = token_seconds(b);
    let (raw, api) = paired(
        || raw_rate_cost(&module(), LABEL, USER_PIN, id, kt, threads).0,
        || cpu.count(&api),
    );
    let daemon = cpu.per_op_us();
    let (sum, count) = token_seconds(b);
    let in_token = (sum - token_before.0) / (count - token_before.1).max(1.0) * 1e6;
    // With 2 threads a token call's time includes waiting for the other one at SoftHSM's
    // locks, which is not CPU: the split means something with one client only.
    let outside = if threads == 1 {
        format!("{:.1}", daemon - in_token)
    } else {
        "-".to_owned()
    };
    println!(
        "{label:<28} {threads:>7} {raw:>11.0} {api:>11.0} {:>7.3} {daemon:>12.0} {outside:>14}",
        api / raw
    );
    (raw, api)
}

/// The keep-alive rows, each key type with 1 and 2 client threads. Returns ES256's
/// (raw, API) rates with 1 thread.
fn keep_alive_rows(b: &Bench, sock: &std::path::Path) -> (f64, f64) {
    // ES256 is the case the target is about; PS256 (RSA-2048, a slower signature) shows
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
    let mut one_thread = (0.0, 0.0);
    for (label, identity, alg, id, kt) in keys {
        for threads in [1, 2] {
            let r = row(
                b,
                label,
                || api_rate(sock, identity, alg, threads),
                id,
                kt,
                threads,
            );
            if threads == 1 && identity == "gw" {
                one_thread = r;
            }
        }
    }
    one_thread
}

/// ES256 and PS256 with a connection per request (accept, SO_PEERCRED, close).
fn connection_per_request_row(b: &Bench, sock: &std::path::Path) {
    row(
        b,
        "ES256, connection per req",
        || api_rate_per_connection(sock, "gw", "ES256"),
        &b.id,
        hsm_shim::KeyType::EcP256,
        1,
    );
    row(
        b,
        "PS256, connection per req",
        || api_rate_per_connection(sock, "rsa", "PS256"),
        &b.rsa_id,
        hsm_shim::KeyType::Rsa2048,
        1,
    );
}

/// Where one request's time goes (1 thread, nothing overlaps): the signature, the two
/// hand-offs between client and daemon threads (measured by `handoff_rtt`), and the rest (HTTP, JSON, base64, syscalls on both sides).
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

/// The API on the simulated TPM (swtpm + tpm2-pkcs11, a token signing in milliseconds, as a
/// gateway's does) against raw cryptoki on the same TPM key, 1 client thread: what the
/// daemon adds where the token dominates.
pub(super) fn tpm_part(_: &Bench) {
    let env = Env::on(TokenKind::Tpm);
    env.make_ca("ca");
    env.serving_config(
        "1d",
        &format!(
            "\n[api]\nenabled = true\nsocket = \"{{p}}/api.sock\"\n\
             [[api.allow]]\nuids = [{}]\nidentities = [\"gw\"]\noperations = [\"sign\"]\n",
            my_uid()
        ),
    );
    let _ca = env.portal_ca(CaMode::Good);
    let _daemon = env.quiet_daemon();
    env.wait_current("gw", 1);
    let sock = env.path("api.sock");
    wait_for("the API on the TPM env", 30, || {
        UnixStream::connect(&sock).is_ok()
    });
    let key_id = env.generation("gw", 1).key_id_hex().unwrap();
    let id = hsm_shim::keys::unhex(&key_id).unwrap();
    for (k, v) in env.envs() {
        // Safe: tpm2-pkcs11 reads these when it is loaded, below, after this.
        unsafe { std::env::set_var(k, v) };
    }
    let kt = hsm_shim::KeyType::EcP256;
    let (raw, api) = paired(
        || raw_rate_cost(&env.module(), LABEL, USER_PIN, &id, kt, 1).0,
        || api_rate(&sock, "gw", "ES256", 1),
    );
    println!(
        "{:<28} {:>7} {:>11} {:>11} {:>7}",
        "on swtpm (tpm2-pkcs11)", "threads", "raw sig/s", "API sig/s", "ratio"
    );
    println!(
        "{:<28} {:>7} {raw:>11.0} {api:>11.0} {:>7.3}",
        "ES256 (P-256)",
        1,
        api / raw
    );
}
