//! Signatures per second on a token: raw cryptoki calls (the baseline) against hsm-shim's
//! rustls signer, 1 and 2 threads; and mTLS handshakes per second over loopback with the
//! client key in the token against an in-memory key. Prints ratios, for SoftHSM and for
//! tpm2-pkcs11 on a simulated TPM side by side (one child process per token kind), and what
//! the raw threads cost on SoftHSM (CPUs busy, CPU per signature, sleeps per signature):
//! why a second thread adds little for P-256.
//! Run with `scripts/bench` (not part of the test suite).

use hsm_shim::testing::bench::{paired, rate, raw_rate_cost, secs, Cost, ROUNDS};
use hsm_shim::testing::TokenKind;
use hsm_shim::tls::TlsSigningKey;
use hsm_shim::{KeyRef, KeyType, TokenKey};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::sign::SigningKey;
use rustls::SignatureScheme;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

const PIN: &str = hsm_shim::testing::USER_PIN;

fn shim_rate(key: &TokenKey, threads: usize) -> f64 {
    let tls = TlsSigningKey::new(key.clone());
    let scheme = if key.key_type().is_ec() {
        SignatureScheme::ECDSA_NISTP256_SHA256
    } else {
        SignatureScheme::RSA_PSS_SHA256
    };
    let msg = [0x5au8; 130];
    rate(threads, || {
        let signer = tls.choose_scheme(&[scheme]).expect("scheme");
        signer.sign(&msg).expect("shim sign");
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Handshakes per second: a server thread (in-memory key, requires client certs) and a
/// client that connects, completes the handshake and reads one byte, over and over.
fn handshake_rate(
    client_key: Arc<dyn SigningKey>,
    client_cert: CertificateDer<'static>,
    ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
) -> f64 {
    let server_key = rcgen::KeyPair::generate().expect("server key");
    let mut sp = rcgen::CertificateParams::new(vec![]).expect("params");
    sp.subject_alt_names = vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())];
    let server_cert = sp.signed_by(&server_key, ca).expect("server cert");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).expect("root");
    let roots = Arc::new(roots);
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .expect("verifier");
    let server_cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![server_cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            )
            .expect("server config"),
    );
    let ck = Arc::new(rustls::sign::CertifiedKey::new(
        vec![client_cert],
        client_key,
    ));
    let mut client_cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck)));
    // Full handshakes only: a resumed session would skip the client signature.
    client_cfg.resumption = rustls::client::Resumption::disabled();
    let client_cfg = Arc::new(client_cfg);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let server = std::thread::spawn(move || {
        for tcp in listener.incoming() {
            if stop2.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            let Ok(tcp) = tcp else { continue };
            let conn = rustls::ServerConnection::new(server_cfg.clone()).expect("server conn");
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let _ = tls.write_all(b"k").and_then(|_| tls.flush());
        }
    });
    let r = rate(1, || {
        let tcp = TcpStream::connect(addr).expect("connect");
        let conn = rustls::ClientConnection::new(
            client_cfg.clone(),
            ServerName::try_from("127.0.0.1").expect("name"),
        )
        .expect("client conn");
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).expect("handshake and first byte");
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = TcpStream::connect(addr);
    let _ = server.join();
    r
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; there is nothing to list.
    }
    match std::env::var("BENCH_TOKEN").ok().as_deref() {
        Some("softhsm") => measure(TokenKind::SoftHsm),
        Some("tpm") => measure(TokenKind::Tpm),
        _ => side_by_side(),
    }
}

/// One process per token kind (each module reads its configuration once per process); this
/// parent runs both and prints their rows side by side.
fn side_by_side() {
    let exe = std::env::current_exe().expect("bench exe");
    let rows: Vec<Vec<Vec<String>>> = TokenKind::ALL
        .iter()
        .map(|k| {
            let out = std::process::Command::new(&exe)
                .env("BENCH_TOKEN", k.name())
                .stderr(std::process::Stdio::inherit())
                .output()
                .expect("bench child");
            assert!(out.status.success(), "{} bench failed", k.name());
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| l.split_whitespace().map(str::to_owned).collect())
                .collect()
        })
        .collect();
    println!(
        "edge-signer signing benchmark, SoftHSM and tpm2-pkcs11 on swtpm side by side (each \
         figure: mean of {ROUNDS} slices of {} ms, alternated with its baseline)",
        secs().as_millis()
    );
    println!(
        "{:<9} {:>3} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6}",
        "key", "thr", "raw sig/s", "shim", "ratio", "raw sig/s", "shim", "ratio"
    );
    print_rows(&rows, "sig", 2);
    print_raw_cost(&rows[0]);
    println!();
    println!(
        "{:<9} {:>3} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6}",
        "client", "", "mem hs/s", "token", "ratio", "mem hs/s", "token", "ratio"
    );
    print_rows(&rows, "hs", 1);
    println!("(left: SoftHSM; right: tpm2-pkcs11 over tpm2-abrmd and swtpm)");
}

/// Why raw threads scale or not (SoftHSM's rows): what the raw threads cost in CPU and how
/// often one went to sleep, which is how a lock inside the token shows.
fn print_raw_cost(rows: &[Vec<String>]) {
    println!("raw cryptoki on SoftHSM, what its threads cost:");
    for l in rows
        .iter()
        .filter(|l| l.first().map(String::as_str) == Some("raw"))
    {
        if let [_, key, thr, cpus, us, sleeps] = &l[..] {
            println!(
                "  {key:<9} {thr} thr: {cpus} CPUs busy, {us} µs CPU per signature, {sleeps} sleeps per signature"
            );
        }
    }
}

/// Print the rows tagged `tag` (`tag key [threads] base measured`) of both kinds.
fn print_rows(rows: &[Vec<Vec<String>>], tag: &str, keys: usize) {
    let pick = |r: &[Vec<String>]| -> Vec<Vec<String>> {
        r.iter()
            .filter(|l| l.first().map(String::as_str) == Some(tag))
            .cloned()
            .collect()
    };
    let (soft, tpm) = (pick(&rows[0]), pick(&rows[1]));
    for (a, b) in soft.iter().zip(tpm.iter()) {
        let num =
            |l: &[String], i: usize| l.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let thr = if keys == 2 { a[2].as_str() } else { "" };
        let (ab, am, bb, bm) = (
            num(a, keys + 1),
            num(a, keys + 2),
            num(b, keys + 1),
            num(b, keys + 2),
        );
        println!(
            "{:<9} {:>3} | {:>9.0} {:>9.0} {:>6.3} | {:>9.0} {:>9.0} {:>6.3}",
            a[1],
            thr,
            ab,
            am,
            am / ab,
            bb,
            bm,
            bm / bb
        );
    }
}

/// Measure on one token kind; prints `sig KEY THREADS RAW SHIM` and `hs KEY MEM TOKEN` lines.
fn measure(kind: TokenKind) {
    let t = hsm_shim::testing::TestToken::new_on(kind);
    let (module, token) = (t.module.clone(), t.token.clone());

    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut cap = rcgen::CertificateParams::new(vec![]).expect("ca params");
    cap.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(cap, ca_key).expect("ca");

    for kt in [KeyType::EcP256, KeyType::Rsa2048] {
        let info = token.generate_key(kt, &format!("bench-{kt}")).expect("key");
        let key = TokenKey::open(token.clone(), &KeyRef::Id(info.id.clone())).expect("key");
        for threads in [1, 2] {
            let cost = std::cell::Cell::new(Cost::default());
            let (raw, shim) = paired(
                || {
                    let (r, c) = raw_rate_cost(&module, "test", PIN, &info.id, kt, threads);
                    cost.set(cost.get() + c);
                    r
                },
                || shim_rate(&key, threads),
            );
            println!("sig {} {threads} {raw:.1} {shim:.1}", kt.as_str());
            let c = cost.get();
            println!(
                "raw {} {threads} {:.2} {:.1} {:.2}",
                kt.as_str(),
                c.cpus(),
                c.cpu_us_per_op(),
                c.sleeps_per_op()
            );
        }
    }
    for kt in [KeyType::EcP256, KeyType::Rsa2048] {
        let info = token.generate_key(kt, &format!("hs-{kt}")).expect("key");
        let key = TokenKey::open(token.clone(), &KeyRef::Id(info.id)).expect("key");
        let signer = hsm_shim::csr::CsrSigner::new(&key);
        let mut p = rcgen::CertificateParams::new(vec![]).expect("params");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "bench-client");
        let token_cert = p.signed_by(&signer, &ca).expect("token cert");
        let mem_key = if kt.is_ec() {
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256")
        } else {
            // ring cannot generate RSA keys: make one with openssl, the same size.
            let out = std::process::Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                ])
                .output()
                .expect("openssl");
            rcgen::KeyPair::from_pem(&String::from_utf8_lossy(&out.stdout)).expect("rsa pem")
        };
        let mem_cert = p.signed_by(&mem_key, &ca).expect("mem cert");
        let mem_signing = provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                mem_key.serialize_der(),
            )))
            .expect("in-memory key");
        let mem = handshake_rate(mem_signing, mem_cert.der().clone(), &ca);
        let tok = handshake_rate(
            Arc::new(TlsSigningKey::new(key)),
            token_cert.der().clone(),
            &ca,
        );
        println!("hs {} {mem:.1} {tok:.1}", kt.as_str());
    }
}
