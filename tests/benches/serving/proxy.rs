//! New connections/s through the proxy (TLS handshake + one request; 1 client, then 4 at
//! once) vs stunnel with the same token key (libengine-pkcs11-openssl), same target, and
//! the CPU each spends per connection.

use super::{Bench, ProcCpu};
use edge_signer_tests::*;
use hsm_shim::testing::bench::{rate, ROUNDS};
use std::io::{Read, Write};
use std::net::TcpStream;

/// Alternate slices of new connections from `clients` threads through stunnel (`a`) and the
/// proxy (`b`); returns (conn/s, CPU µs per connection of the process behind it) for each.
/// Each process idles while the other one's slice runs, so its CPU over the whole run is its
/// slices' CPU.
fn paired_conns(a: (u16, u32), b: (u16, u32), clients: usize) -> [(f64, f64); 2] {
    let cpu = [ProcCpu::start(a.1), ProcCpu::start(b.1)];
    let mut sum = [0.0; 2];
    for _ in 0..ROUNDS {
        for (i, (port, _)) in [a, b].into_iter().enumerate() {
            sum[i] += cpu[i].count(|| conn_rate(port, clients));
        }
    }
    [0, 1].map(|i| (sum[i] / ROUNDS as f64, cpu[i].per_op_us()))
}

/// New connections/s through a local plain-TCP entry (the proxy or stunnel), each of
/// `clients` threads opening one after the other. Only answered connections count; one that
/// fails (refused, reset, no answer) is retried, and the slice reports how many failed with
/// the first error, so that one bad connection in ~100,000 does not end the whole run.
pub(super) fn conn_rate(port: u16, clients: usize) -> f64 {
    let failed = std::sync::atomic::AtomicU64::new(0);
    let first = std::sync::Mutex::new(None::<String>);
    let r = rate(clients, || {
        while let Err(e) = one_conn(port) {
            let n = failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            first
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(|| e.to_string());
            assert!(n < 1000, "port {port}: 1,000 connections failed: {e}");
        }
    });
    let failed = failed.into_inner();
    if failed > 0 {
        let first = first.into_inner().unwrap_or_else(|p| p.into_inner());
        eprintln!(
            "  port {port}: {failed} connection(s) failed and were retried; first: {}",
            first.unwrap_or_default()
        );
    }
    r
}

/// One connection: `q` in, one byte back.
fn one_conn(port: u16) -> std::io::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.write_all(b"q")?;
    let mut k = [0u8; 1];
    s.read_exact(&mut k)
}

fn stunnel(env: &Env, port: u16, target: u16, key_id: &str) -> Option<Guard> {
    let engine = [
        "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so",
        "/usr/lib/aarch64-linux-gnu/engines-3/pkcs11.so",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())?;
    which("stunnel4")?;
    let conf = format!(
        "foreground = yes\npid =\noutput = {dir}/stunnel.log\ndebug = 4\n\
         engine = dynamic\nengineCtrl = SO_PATH:{engine}\nengineCtrl = ID:pkcs11\nengineCtrl = LIST_ADD:1\n\
         engineCtrl = LOAD\nengineCtrl = MODULE_PATH:{module}\nengineCtrl = PIN:{pin}\nengineCtrl = INIT\n\n\
         [bench]\nclient = yes\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{target}\n\
         engineNum = 1\ncert = {dir}/chain.pem\nkey = pkcs11:token={label};id={id};type=private\n\
         CAfile = {dir}/ca.pem\nverifyChain = yes\n\
         ciphersuites = TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384\n",
        dir = env.dir.path().display(),
        module = module().display(),
        pin = USER_PIN,
        label = LABEL,
        id = key_id
            .as_bytes()
            .chunks(2)
            .map(|c| format!("%{}", String::from_utf8_lossy(c)))
            .collect::<String>(),
    );
    std::fs::write(env.path("stunnel.conf"), conf).unwrap();
    let child = std::process::Command::new("stunnel4")
        .arg(env.path("stunnel.conf"))
        .envs(env.envs())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    wait_port(port);
    Some(Guard(child))
}

fn which(cmd: &str) -> Option<()> {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| ())
}

/// New connections/s (and CPU per connection) through the proxy vs stunnel.
pub(super) fn proxy_part(b: &Bench) {
    let sport = free_port();
    let Some(g) = stunnel(&b.env, sport, b.tport, &b.key_id) else {
        println!("stunnel4 or libengine-pkcs11-openssl missing: proxy vs stunnel skipped (scripts/setup installs them)");
        return;
    };
    println!(
        "{:<28} {:>14} {:>14} {:>7}",
        "new connections (hs + 1 req)", "stunnel conn/s", "proxy conn/s", "ratio"
    );
    // The same route twice: as configured by default (the handshake in each connection's
    // path), and with `preconnect = true` (the next connection's handshake made after this
    // one, off its path; its CPU still counted). Each against its own stunnel slices, with
    // one client (each connection waits for the one before: conn/s is 1 / latency) and with
    // four clients at once (conn/s is what the 2 cores give, shared with the clients and
    // the target).
    for (label, port, clients) in [
        ("ES256 key, 1 client", b.pport, 1),
        ("  4 clients at once", b.pport, 4),
        ("preconnect = true, 1 client", b.preport, 1),
        ("  4 clients at once", b.preport, 4),
    ] {
        let [(st, st_cpu), (px, px_cpu)] =
            paired_conns((sport, g.0.id()), (port, b.daemon_pid()), clients);
        println!("{label:<28} {st:>14.0} {px:>14.0} {:>7.3}", px / st);
        // CPU per connection is the proxy's own cost (stunnel's inverse ratio: how many
        // times less the proxy uses).
        println!(
            "{:<28} {st_cpu:>14.0} {px_cpu:>14.0} {:>7.3}",
            "  CPU µs per connection",
            st_cpu / px_cpu
        );
    }
}
