//! What the daemon serves, measured against baselines in the same run (scripts/bench):
//! - signatures/s through the signing API (keep-alive, 1 and 2 client threads) vs raw
//!   cryptoki on the same token key and thread count;
//! - proxy new connections/s (TLS handshake + one request; 1 client, then 4 at once) vs
//!   stunnel with the same token key (libengine-pkcs11-openssl), same target;
//! - bytes/s through one proxied connection vs one direct TLS connection.
//!
//! Uses the release binary (`cargo build --release -p edge-signer` first).

use edge_signer_tests::*;
use hsm_shim::testing::bench::{secs, ROUNDS};
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

/// The CPU a process spends per operation over a run of measured slices that alternate
/// with a baseline it takes no part in, so that its CPU over the whole run is its slices'
/// CPU (read around the run: `proc_cpu_ns` counts 10 ms ticks).
struct ProcCpu {
    pid: u32,
    start: u64,
    /// Operations summed over the slices.
    ops: std::cell::Cell<f64>,
}

impl ProcCpu {
    fn start(pid: u32) -> ProcCpu {
        ProcCpu {
            pid,
            start: proc_cpu_ns(pid),
            ops: Default::default(),
        }
    }

    /// Run one slice (`f` returns operations/s) and count its operations.
    fn count(&self, f: impl FnOnce() -> f64) -> f64 {
        let t0 = Instant::now();
        let r = f();
        self.ops
            .set(self.ops.get() + r * t0.elapsed().as_secs_f64());
        r
    }

    /// CPU µs per operation since `start`.
    fn per_op_us(&self) -> f64 {
        (proc_cpu_ns(self.pid) - self.start) as f64 / 1e3 / self.ops.get().max(1.0)
    }
}

/// CPU time (ns) used so far by the calling thread.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
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
    let mut buf = vec![0x42u8; 1 << 16];
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
                let k = left.min(buf.len());
                if tls.write_all(&buf[..k]).is_err() {
                    return;
                }
                left -= k;
            }
        }
        _ => {
            let mut n = 0u64;
            while let Ok(k @ 1..) = tls.read(&mut buf) {
                n += k as u64;
            }
            let _ = tls.write_all(&n.to_be_bytes());
        }
    }
    tls.conn.send_close_notify();
    let _ = tls.flush();
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
    /// Port of the same route with `kx = ["X25519"]` (classic only).
    x25519_port: u16,
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
        let x25519_port = free_port();
        let uid = my_uid();
        env.serving_config(
            "1d",
            &format!(
                "\n[[identity]]\nname = \"rsa\"\nkey_type = \"rsa-2048\"\nsubject = {{ cn = \"gw-0042-rsa\" }}\n\
                 issuer = \"portal\"\noverlap = \"1d\"\n\
                 \n[api]\nenabled = true\nsocket = \"{{p}}/api.sock\"\nmax_concurrent_per_caller = 64\n\
                 [[api.allow]]\nuids = [{uid}]\nidentities = [\"gw\", \"rsa\"]\noperations = [\"sign\", \"metrics\"]\n\n\
                 [[proxy]]\nname = \"bench\"\nlisten = \"127.0.0.1:{pport}\"\ntarget = \"127.0.0.1:{tport}\"\n\
                 identity = \"gw\"\nserver_ca = \"{{p}}/ca.pem\"\nmax_connections = 256\n\n\
                 [[proxy]]\nname = \"bench-pre\"\nlisten = \"127.0.0.1:{preport}\"\ntarget = \"127.0.0.1:{tport}\"\n\
                 identity = \"gw\"\nserver_ca = \"{{p}}/ca.pem\"\nmax_connections = 256\npreconnect = true\n\n\
                 [[proxy]]\nname = \"bench-x25519\"\nlisten = \"127.0.0.1:{x25519_port}\"\ntarget = \"127.0.0.1:{tport}\"\n\
                 identity = \"gw\"\nserver_ca = \"{{p}}/ca.pem\"\nmax_connections = 256\nkx = [\"X25519\"]\n\n\
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
        let gen = env.generation("gw", 1);
        let key_id = gen.key_id_hex().unwrap();
        std::fs::write(env.path("chain.pem"), gen.chain_pem().unwrap()).unwrap();
        // In-process access to the same token (the raw baseline and direct TLS).
        // Safe: before any module is loaded in this process.
        unsafe { std::env::set_var("SOFTHSM2_CONF", env.path("softhsm2.conf")) };
        let id = hsm_shim::keys::unhex(&key_id).unwrap();
        let rsa = env.generation("rsa", 1).key_id_hex().unwrap();
        let rsa_id = hsm_shim::keys::unhex(&rsa).unwrap();
        Bench {
            env,
            _ca: ca,
            daemon,
            tport,
            pport,
            preport,
            x25519_port,
            key_id,
            id,
            rsa_id,
        }
    }

    fn daemon_pid(&self) -> u32 {
        self.daemon.0.id()
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
    // BENCH_ONLY=api|tpm|proxy|kx|bulk runs one part (to profile it); all by default.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    type Part = fn(&Bench);
    let parts: [(&str, Part); 5] = [
        ("api", api::api_part),
        ("tpm", api::tpm_part),
        ("proxy", proxy::proxy_part),
        ("kx", kx::kx_part),
        ("bulk", bulk::bulk_part),
    ];
    for (name, part) in parts {
        if only.is_empty() || only == name {
            part(&b);
            println!();
        }
    }
}

#[path = "serving/api.rs"]
mod api;
#[path = "serving/bulk.rs"]
mod bulk;
#[path = "serving/kx.rs"]
mod kx;
#[path = "serving/proxy.rs"]
mod proxy;
