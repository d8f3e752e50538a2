//! Bytes/s through one long connection: the proxy (TCP and Unix-socket listeners) vs direct
//! TLS with the same token key, and the sending side's CPU per GiB.

use super::{proc_cpu_ns, provider, thread_cpu_ns, Bench};
use edge_signer_tests::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

/// Bytes/s of `total` bytes written through `s` (plain or TLS) to the sink.
fn stream_rate<S: Read + Write>(mut s: S, total: usize, done: impl FnOnce(&mut S)) -> f64 {
    let buf = vec![0x42u8; 1 << 16];
    let chunk = &buf;
    let start = Instant::now();
    s.write_all(b"s").unwrap();
    let mut sent = 0;
    while sent < total {
        s.write_all(chunk).unwrap();
        sent += chunk.len();
    }
    done(&mut s);
    let mut n = [0u8; 8];
    s.read_exact(&mut n).unwrap();
    assert_eq!(u64::from_be_bytes(n) as usize, sent);
    sent as f64 / start.elapsed().as_secs_f64()
}

/// Bytes/s of `total` bytes the target sends through `s` (plain or TLS), read to the end.
fn fetch_rate<S: Read + Write>(mut s: S, total: usize) -> f64 {
    let mut buf = vec![0u8; 1 << 16];
    let start = Instant::now();
    let mut ask = b"d".to_vec();
    ask.extend_from_slice(&(total as u64).to_be_bytes());
    s.write_all(&ask).unwrap();
    let mut got = 0;
    while got < total {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("download after {got} bytes: {e}"),
        }
    }
    assert_eq!(got, total);
    got as f64 / start.elapsed().as_secs_f64()
}

/// A client config presenting `gw`'s token key, for direct TLS to the target.
fn direct_client(b: &Bench) -> Arc<rustls::ClientConfig> {
    let token = hsm_shim::Token::open(
        &module(),
        &hsm_shim::TokenSelector::Label(LABEL.into()),
        Some(hsm_shim::testing::pin(USER_PIN)),
    )
    .unwrap();
    let key = hsm_shim::TokenKey::open(token, &hsm_shim::KeyRef::Id(b.id.clone())).unwrap();
    let chain: Vec<_> = CertificateDer::pem_file_iter(b.env.path("chain.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let ck = hsm_shim::tls::certified_key(hsm_shim::TlsSigningKey::new(key), chain).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(b.env.path("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck))),
    )
}

/// Each round's bytes/s and the sender CPU ns summed over rounds, of one way, in rounds
/// that alternate the ways.
#[derive(Default)]
struct Sums {
    cpu: u64,
    rounds: Vec<f64>,
}

impl Sums {
    /// Bytes/s summed over the rounds.
    fn rate(&self) -> f64 {
        self.rounds.iter().sum()
    }

    /// The lowest and highest round's bytes/s.
    fn spread(&self) -> (f64, f64) {
        let low = self.rounds.iter().copied().fold(f64::INFINITY, f64::min);
        let high = self.rounds.iter().copied().fold(0.0, f64::max);
        (low, high)
    }

    /// Median, lowest and highest of the per-round ratios of `self` to `base` (the two
    /// measured back to back in each round): steadier than the ratio of the means when the
    /// baseline itself moves between rounds.
    fn round_ratios(&self, base: &Sums) -> (f64, f64, f64) {
        let mut r: Vec<f64> = self
            .rounds
            .iter()
            .zip(&base.rounds)
            .map(|(a, b)| a / b)
            .collect();
        r.sort_by(f64::total_cmp);
        let median = r.get(r.len() / 2).copied().unwrap_or(0.0);
        let low = r.first().copied().unwrap_or(0.0);
        (median, low, r.last().copied().unwrap_or(0.0))
    }
}

/// Measure one stream: `f` sends it and returns bytes/s; `daemon` is counted when given.
fn measured(sum: &mut Sums, daemon: Option<u32>, f: impl FnOnce() -> f64) {
    let (c0, d0) = (thread_cpu_ns(), daemon.map(proc_cpu_ns).unwrap_or(0));
    sum.rounds.push(f());
    sum.cpu += thread_cpu_ns() - c0 + daemon.map(proc_cpu_ns).unwrap_or(0) - d0;
}

/// Which way the bytes go: from the caller to the target, or from the target to the caller
/// (a download through the proxy: an updater fetching an image).
#[derive(Clone, Copy, PartialEq)]
enum Way {
    Up,
    Down,
}

/// Move `total` bytes `way` through `s`, plain or TLS; `done` ends the caller's side of an
/// upload (close_notify, or a half-close the proxy passes on as close_notify).
fn move_bytes<S: Read + Write>(s: S, total: usize, way: Way, done: impl FnOnce(&mut S)) -> f64 {
    match way {
        Way::Up => stream_rate(s, total, done),
        Way::Down => fetch_rate(s, total),
    }
}

pub(super) fn bulk_part(b: &Bench) {
    let client = direct_client(b);
    let total: usize = std::env::var("BENCH_BYTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(128 << 20);
    // BENCH_WAY=up|down measures one way (to profile it); both by default.
    let only = std::env::var("BENCH_WAY").unwrap_or_default();
    for (way, name, title) in [
        (Way::Up, "up", "one connection, caller sends"),
        (Way::Down, "down", "one connection, target sends"),
    ] {
        if !only.is_empty() && only != name {
            continue;
        }
        let (direct, tcp, unix) = one_way(b, &client, total, way);
        report(title, way, [&direct, &tcp, &unix], total);
    }
}

/// Ten rounds (this VM's direct baseline alone moves by a third between rounds) of `total`
/// bytes `way`: direct TLS, through the proxy's TCP and its Unix-socket listener. CPU on the
/// party that does TLS with the target: direct = the client thread; proxied = the client
/// thread (plain I/O) + the daemon.
fn one_way(
    b: &Bench,
    client: &Arc<rustls::ClientConfig>,
    total: usize,
    way: Way,
) -> (Sums, Sums, Sums) {
    let (mut direct, mut tcp, mut unix) = (Sums::default(), Sums::default(), Sums::default());
    let daemon = Some(b.daemon_pid());
    for _ in 0..BULK_ROUNDS {
        measured(&mut direct, None, || {
            let s = TcpStream::connect(("127.0.0.1", b.tport)).unwrap();
            let name = ServerName::try_from("127.0.0.1").unwrap();
            let conn = rustls::ClientConnection::new(client.clone(), name).unwrap();
            move_bytes(rustls::StreamOwned::new(conn, s), total, way, |s| {
                s.conn.send_close_notify();
                let _ = s.flush();
            })
        });
        measured(&mut tcp, daemon, || {
            let s = TcpStream::connect(("127.0.0.1", b.pport)).unwrap();
            move_bytes(s, total, way, |s| {
                let _ = s.shutdown(std::net::Shutdown::Write);
            })
        });
        // The same through the proxy's Unix-socket listener (the recommended local door).
        measured(&mut unix, daemon, || {
            let s = UnixStream::connect(b.env.path("proxy.sock")).unwrap();
            move_bytes(s, total, way, |s| {
                let _ = s.shutdown(std::net::Shutdown::Write);
            })
        });
    }
    (direct, tcp, unix)
}

/// Rounds of each way in the bulk part.
const BULK_ROUNDS: usize = 10;

/// Print the bulk part's rows for one way from its sums (direct, proxy TCP, proxy Unix;
/// `BULK_ROUNDS` of `total` bytes each).
fn report(title: &str, way: Way, [direct, tcp, unix]: [&Sums; 3], total: usize) {
    let rounds = BULK_ROUNDS;
    let mib = |r: f64| r / rounds as f64 / (1 << 20) as f64;
    let ms_per_gib = |ns: u64| ns as f64 / 1e6 / ((total * rounds) as f64 / (1u64 << 30) as f64);
    println!(
        "{title:<28} {:>14} {:>14} {:>7}",
        "direct MiB/s", "proxy MiB/s", "ratio"
    );
    let row = |label: String, d: f64, p: f64, ratio: f64| {
        println!("{label:<28} {d:>14.0} {p:>14.0} {ratio:>7.3}");
    };
    let label = format!("{} MiB x {rounds}, alternated", total >> 20);
    row(
        label,
        mib(direct.rate()),
        mib(tcp.rate()),
        tcp.rate() / direct.rate(),
    );
    let (dr, ur) = (mib(direct.rate()), mib(unix.rate()));
    row(
        "  proxy on a Unix socket".into(),
        dr,
        ur,
        unix.rate() / direct.rate(),
    );
    for (what, s) in [("TCP", tcp), ("Unix socket", unix)] {
        let (median, low, high) = s.round_ratios(direct);
        println!(
            "  {what}: ratio of each round median {median:.3} (lowest {low:.3}, highest {high:.3})"
        );
    }
    // Which side moves: the spread of each side's rounds (docs/perf.md reads it).
    for (what, s) in [("direct", direct), ("proxy TCP", tcp), ("proxy Unix", unix)] {
        let (low, high) = s.spread();
        println!(
            "  {what}: MiB/s per round {:.0} to {:.0}",
            low / (1 << 20) as f64,
            high / (1 << 20) as f64
        );
    }
    let (dc, tc, uc) = (direct.cpu, tcp.cpu, unix.cpu);
    let per = |x: u64| ms_per_gib(x);
    let cpu = if way == Way::Up {
        "  sender CPU ms per GiB"
    } else {
        "  receiver CPU ms per GiB"
    };
    row(cpu.into(), per(dc), per(tc), dc as f64 / tc as f64);
    row(
        "  the same, Unix socket".into(),
        per(dc),
        per(uc),
        dc as f64 / uc as f64,
    );
}
