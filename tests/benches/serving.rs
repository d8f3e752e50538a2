//! What the daemon serves, measured against baselines in the same run (scripts/bench):
//! - signatures/s through the signing API (keep-alive, 1 and 2 client threads) vs raw
//!   cryptoki on the same token key and thread count;
//! - proxy new connections/s (TLS handshake + one request; 1 client, then 4 at once) vs
//!   stunnel with the same token key (libengine-pkcs11-openssl), same target;
//! - bytes/s through one proxied connection vs one direct TLS connection.
//!
//! Uses the release binary (`cargo build --release -p edge-signer` first).

use edge_signer_tests::*;
use hsm_shim::testing::bench::{paired, rate, raw_rate_cost, secs, ROUNDS};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The agent's own provider (suite order included), so that direct TLS and the proxy
/// negotiate the same cipher suite.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    edge_signer::tlsconf::provider()
}

/// CPU time (ns) used so far by process `pid`, threads that already ended included
/// (`utime + stime` of `/proc/PID/stat`, in clock ticks of 10 ms: read it around a whole
/// measurement, not around one slice).
fn proc_cpu_ns(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the ")" that closes the command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<u64>() * 10_000_000
}

/// CPU time (ns) used so far by the calling thread.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Alternate slices of new connections from `clients` threads through stunnel (`a`) and the
/// proxy (`b`); returns (conn/s, CPU µs per connection of the process behind it) for each.
/// Each process idles while the other one's slice runs, so its CPU over the whole run is its
/// slices' CPU.
fn paired_conns(a: (u16, u32), b: (u16, u32), clients: usize) -> [(f64, f64); 2] {
    let mut acc = [(0.0, 0.0); 2]; // (rate sum, connections)
    let c0 = [proc_cpu_ns(a.1), proc_cpu_ns(b.1)];
    for _ in 0..ROUNDS {
        for (i, (port, _)) in [a, b].into_iter().enumerate() {
            let t0 = Instant::now();
            let r = conn_rate(port, clients);
            acc[i].0 += r;
            acc[i].1 += r * t0.elapsed().as_secs_f64();
        }
    }
    let cpu = [proc_cpu_ns(a.1) - c0[0], proc_cpu_ns(b.1) - c0[1]];
    [0, 1].map(|i| {
        (
            acc[i].0 / ROUNDS as f64,
            cpu[i] as f64 / 1e3 / acc[i].1.max(1.0),
        )
    })
}

/// The target: TLS, client certificate required (from ca.pem). One byte in: `q` answers `k`
/// and closes; `s` reads to EOF and answers the byte count; `d` and an 8-byte count sends
/// that many bytes and closes.
fn target(env: &Env) -> u16 {
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(env.path("ca.pem")).unwrap() {
            r.add(c.unwrap()).unwrap();
        }
        Arc::new(r)
    };
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .unwrap();
    let chain: Vec<_> = CertificateDer::pem_file_iter(env.path("server.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(env.path("server.key")).unwrap();
    let cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap(),
    );
    let l = Arc::new(TcpListener::bind("127.0.0.1:0").unwrap());
    let port = l.local_addr().unwrap().port();
    // A fixed pool of threads that each accept and serve one connection at a time, the way a
    // pre-forked server works: a thread spawned per connection would add the same cost to
    // both sides of every comparison and hide the difference being measured.
    for _ in 0..4 {
        let (l, cfg) = (l.clone(), cfg.clone());
        std::thread::spawn(move || {
            for tcp in l.incoming().flatten() {
                serve_target(cfg.clone(), tcp);
            }
        });
    }
    port
}

/// One target connection: `q` answers `k`; `s` counts bytes to EOF and answers the count;
/// `d` sends the count it is given.
fn serve_target(cfg: Arc<rustls::ServerConfig>, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let conn = rustls::ServerConnection::new(cfg).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut cmd = [0u8; 1];
    if tls.read_exact(&mut cmd).is_err() {
        return;
    }
    // rustls copies the plaintext into it or out of it (see `LEAD`).
    let mut buf = vec![0x42u8; LEAD + (1 << 16)];
    match cmd[0] {
        b'q' => {
            let _ = tls.write_all(b"k");
        }
        b'd' => {
            let mut n = [0u8; 8];
            if tls.read_exact(&mut n).is_err() {
                return;
            }
            let mut left = u64::from_be_bytes(n) as usize;
            while left > 0 {
                let k = left.min(buf.len() - LEAD);
                if tls.write_all(&buf[LEAD..LEAD + k]).is_err() {
                    return;
                }
                left -= k;
            }
        }
        _ => {
            let mut n = 0u64;
            while let Ok(k @ 1..) = tls.read(&mut buf[LEAD..]) {
                n += k as u64;
            }
            let _ = tls.write_all(&n.to_be_bytes());
        }
    }
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

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
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
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
    let next = std::sync::atomic::AtomicUsize::new(0);
    thread_local!(static MINE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) });
    rate(threads, || {
        let i = MINE.with(|m| {
            m.get().unwrap_or_else(|| {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % threads;
                m.set(Some(i));
                i
            })
        });
        api_sign(&mut conns[i].lock().unwrap(), identity, body.as_bytes());
    })
}

/// New connections/s through a local plain-TCP entry (the proxy or stunnel), each of
/// `clients` threads opening one after the other. Only answered connections count; one that
/// fails (refused, reset, no answer) is retried, and the slice reports how many failed with
/// the first error, so that one bad connection in ~100,000 does not end the whole run.
fn conn_rate(port: u16, clients: usize) -> f64 {
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

/// Where the bulk part's buffers that rustls copies plaintext out of (the direct client's
/// chunk) or into (the target's read buffer) start: half a page in, for the reason of the
/// proxy's `splice::LEAD`. The allocator puts rustls' buffers just after ours, and on x86
/// CPUs with fast `rep movsb` a copy 1-31 bytes apart modulo 4096 runs 12-20 times slower.
/// Without it the direct baseline hit that in some runs and not others (sender CPU per GiB
/// 643-904 ms between runs of one binary), and the target on some connections (a `perf
/// probe` on memmove: 16,386 of 96,870 copies in 4 s at distance 16).
const LEAD: usize = 2 << 10;

/// Bytes/s of `total` bytes written through `s` (plain or TLS) to the sink.
fn stream_rate<S: Read + Write>(mut s: S, total: usize, done: impl FnOnce(&mut S)) -> f64 {
    let buf = vec![0x42u8; LEAD + (1 << 16)];
    let chunk = &buf[LEAD..];
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
    let mut buf = vec![0u8; LEAD + (1 << 16)];
    let start = Instant::now();
    let mut ask = b"d".to_vec();
    ask.extend_from_slice(&(total as u64).to_be_bytes());
    s.write_all(&ask).unwrap();
    let mut got = 0;
    while got < total {
        match s.read(&mut buf[LEAD..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("download after {got} bytes: {e}"),
        }
    }
    assert_eq!(got, total);
    got as f64 / start.elapsed().as_secs_f64()
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

/// The world every part measures in: a token, a target, the release daemon with the API and
/// two proxy routes (TCP and Unix socket) on identity `gw`.
struct Bench {
    env: Env,
    _ca: PortalCa,
    daemon: Guard,
    /// Port of the target (TLS, client certificate required).
    tport: u16,
    /// Port of the proxy's TCP listener.
    pport: u16,
    /// Port of the same route with `preconnect = true`.
    preport: u16,
    /// `gw`'s key: CKA_ID as hex and as bytes.
    key_id: String,
    id: Vec<u8>,
    /// CKA_ID of identity `rsa` (RSA-2048; API part only).
    rsa_id: Vec<u8>,
}

impl Bench {
    fn start() -> Bench {
        let env = Env::new();
        env.make_ca("ca");
        env.openssl_leaf("ca", "server");
        let tport = target(&env);
        let pport = free_port();
        let preport = free_port();
        let uid = my_uid();
        env.serving_config(
            "1d",
            &format!(
                "\n[[identity]]\nname = \"rsa\"\nkey_type = \"rsa-2048\"\nsubject = {{ cn = \"gw-0042-rsa\" }}\n\
                 issuer = \"portal\"\noverlap = \"1d\"\n\
                 \n[api]\nenabled = true\nsocket = \"{{p}}/api.sock\"\nmax_concurrent_per_caller = 64\n\
                 [[api.allow]]\nuids = [{uid}]\nidentities = [\"gw\", \"rsa\"]\noperations = [\"sign\"]\n\n\
                 [[proxy]]\nname = \"bench\"\nlisten = \"127.0.0.1:{pport}\"\ntarget = \"127.0.0.1:{tport}\"\n\
                 identity = \"gw\"\nserver_ca = \"{{p}}/ca.pem\"\nmax_connections = 256\n\n\
                 [[proxy]]\nname = \"bench-pre\"\nlisten = \"127.0.0.1:{preport}\"\ntarget = \"127.0.0.1:{tport}\"\n\
                 identity = \"gw\"\nserver_ca = \"{{p}}/ca.pem\"\nmax_connections = 256\npreconnect = true\n\n\
                 [[proxy]]\nname = \"bench-unix\"\nlisten = \"{{p}}/proxy.sock\"\ntarget = \"127.0.0.1:{tport}\"\n\
                 identity = \"gw\"\nserver_ca = \"{{p}}/ca.pem\"\nserver_name = \"127.0.0.1\"\n"
            ),
        );
        let ca = env.portal_ca(CaMode::Good);
        let daemon = env.quiet_daemon();
        env.wait_current("gw", 1);
        env.wait_current("rsa", 1);
        wait_for("the daemon's listeners come up", 20, || {
            UnixStream::connect(env.path("api.sock")).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", pport)).is_ok()
        });
        std::thread::sleep(Duration::from_millis(500));
        let gen = &env.register()["identities"]["gw"]["generations"][0];
        let key_id = gen["key_id"].as_str().unwrap().to_owned();
        std::fs::write(env.path("chain.pem"), gen["cert_pem"].as_str().unwrap()).unwrap();
        // In-process access to the same token (the raw baseline and direct TLS).
        // Safe: before any module is loaded in this process.
        unsafe { std::env::set_var("SOFTHSM2_CONF", env.path("softhsm2.conf")) };
        let id = hsm_shim::keys::unhex(&key_id).unwrap();
        let rsa = &env.register()["identities"]["rsa"]["generations"][0]["key_id"];
        let rsa_id = hsm_shim::keys::unhex(rsa.as_str().unwrap()).unwrap();
        Bench {
            env,
            _ca: ca,
            daemon,
            tport,
            pport,
            preport,
            key_id,
            id,
            rsa_id,
        }
    }

    fn daemon_pid(&self) -> u32 {
        self.daemon.0.id()
    }
}

/// Round trip (µs) of one byte between two threads over a Unix socket pair: the two
/// hand-offs every API request costs (client to daemon, daemon to client), with the two
/// threads pinned to CPUs `cpus` (the same CPU, or two: then every wake-up crosses cores).
fn handoff_rtt(cpus: [usize; 2]) -> f64 {
    let pin = |c: usize| {
        // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(c, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
        }
    };
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

/// The daemon's CPU time over the operations of measured slices.
struct DaemonCpu {
    pid: u32,
    /// (CPU ns, operations) summed over slices.
    sum: std::cell::Cell<(u64, f64)>,
}

impl DaemonCpu {
    fn new(b: &Bench) -> DaemonCpu {
        DaemonCpu {
            pid: b.daemon_pid(),
            sum: Default::default(),
        }
    }

    /// Run one slice (`f` returns operations/s) and count what the daemon spent in it.
    fn count(&self, f: impl FnOnce() -> f64) -> f64 {
        let (c0, t0) = (proc_cpu_ns(self.pid), Instant::now());
        let r = f();
        let (cpu, ops) = self.sum.get();
        self.sum.set((
            cpu + proc_cpu_ns(self.pid) - c0,
            ops + r * t0.elapsed().as_secs_f64(),
        ));
        r
    }

    fn per_op_us(&self) -> f64 {
        let (cpu, ops) = self.sum.get();
        cpu as f64 / 1e3 / ops.max(1.0)
    }
}

/// Signatures/s through the API vs raw cryptoki, 1 and 2 threads.
fn api_part(b: &Bench) {
    println!(
        "{:<28} {:>7} {:>14} {:>14} {:>7}",
        "signatures", "threads", "raw sig/s", "API sig/s", "ratio"
    );
    let sock = b.env.path("api.sock");
    let mut one_thread = (0.0, 0.0);
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
    // The daemon's CPU per request, keep-alive and a connection per request (ES256, 1 client).
    let (kept, fresh) = (DaemonCpu::new(b), DaemonCpu::new(b));
    for (label, identity, alg, id, kt) in keys {
        for threads in [1, 2] {
            let es256_one = threads == 1 && identity == "gw";
            let (raw, api) = paired(
                || raw_rate_cost(&module(), LABEL, USER_PIN, id, kt, threads).0,
                || {
                    let api = || api_rate(&sock, identity, alg, threads);
                    if es256_one {
                        kept.count(api)
                    } else {
                        api()
                    }
                },
            );
            println!(
                "{label:<28} {threads:>7} {raw:>14.0} {api:>14.0} {:>7.3}",
                api / raw
            );
            if threads == 1 && identity == "gw" {
                one_thread = (raw, api);
            }
        }
    }
    // A connection per request (accept, SO_PEERCRED, hand-off to an API thread, close).
    let (raw, api) = paired(
        || {
            raw_rate_cost(
                &module(),
                LABEL,
                USER_PIN,
                &b.id,
                hsm_shim::KeyType::EcP256,
                1,
            )
            .0
        },
        || fresh.count(|| api_rate_per_connection(&sock, "gw", "ES256")),
    );
    println!(
        "{:<28} {:>7} {raw:>14.0} {api:>14.0} {:>7.3}",
        "ES256, connection per req",
        1,
        api / raw
    );
    println!(
        "  daemon CPU µs per ES256 request, 1 client: keep-alive {:.0}, connection per request {:.0}",
        kept.per_op_us(),
        fresh.per_op_us()
    );
    // Where one request's time goes (1 thread, nothing overlaps): the signature, the two
    // hand-offs between client and daemon threads (on a VM a wake-up that crosses cores
    // costs tens of µs), and the rest (HTTP, JSON, base64, syscalls on both sides).
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

/// New connections/s (and CPU per connection) through the proxy vs stunnel.
fn proxy_part(b: &Bench) {
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

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let b = Bench::start();
    println!(
        "edge-signer serving benchmark on SoftHSM, release daemon (each figure: mean of {ROUNDS} slices of {} ms, alternated with its baseline)",
        secs().as_millis()
    );
    // BENCH_ONLY=api|proxy|bulk runs one part (to profile it); all three by default.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    type Part = fn(&Bench);
    let parts: [(&str, Part); 3] = [
        ("api", api_part),
        ("proxy", proxy_part),
        ("bulk", bulk::bulk_part),
    ];
    for (name, part) in parts {
        if only.is_empty() || only == name {
            part(&b);
            println!();
        }
    }
}

#[path = "serving/bulk.rs"]
mod bulk;
