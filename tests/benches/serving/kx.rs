//! The post-quantum hybrid's cost, against X25519 in the same run: full TLS 1.3 handshakes
//! in memory (software keys: the key exchange is the only difference), and new connections/s
//! through the proxy to a target that has the hybrid (the default route) vs a route with
//! `kx = ["X25519"]`, with the daemon's CPU per connection.

use super::{Bench, ProcCpu};
use edge_signer::kx::X25519MLKEM768;
use hsm_shim::testing::bench::{paired, rate, ROUNDS};
use rustls::crypto::ring::kx_group::X25519;
use rustls::crypto::SupportedKxGroup;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::sync::Arc;

/// A client and a server config offering only `group` (a self-signed P-256 server key in
/// memory).
fn configs(
    group: &'static dyn SupportedKxGroup,
) -> (Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>) {
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        kx_groups: vec![group],
        ..(*edge_signer::tlsconf::provider()).clone()
    });
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["bench.example".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = CertificateDer::from(cert.der().to_vec());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![der],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    (Arc::new(client), Arc::new(server))
}

/// One full handshake in memory.
fn handshake(c: &Arc<rustls::ClientConfig>, s: &Arc<rustls::ServerConfig>) {
    let name = ServerName::try_from("bench.example").unwrap();
    let mut client = rustls::ClientConnection::new(c.clone(), name).unwrap();
    let mut server = rustls::ServerConnection::new(s.clone()).unwrap();
    let mut buf = Vec::new();
    while client.is_handshaking() || server.is_handshaking() {
        buf.clear();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
        }
        server.process_new_packets().unwrap();
        buf.clear();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
        }
        client.process_new_packets().unwrap();
    }
}

pub(super) fn kx_part(b: &Bench) {
    println!(
        "{:<36} {:>12} {:>12} {:>7}",
        "post-quantum hybrid vs X25519", "X25519 /s", "hybrid /s", "ratio"
    );
    let (xc, xs) = configs(X25519);
    let (hc, hs) = configs(X25519MLKEM768);
    let (x, h) = paired(
        || rate(1, || handshake(&xc, &xs)),
        || rate(1, || handshake(&hc, &hs)),
    );
    println!(
        "{:<36} {x:>12.0} {h:>12.0} {:>7.3}",
        "in-memory handshakes, 1 thread",
        h / x
    );
    let pid = b.daemon_pid();
    let cpu = [ProcCpu::start(pid), ProcCpu::start(pid)];
    let mut sum = [0.0; 2];
    for _ in 0..ROUNDS {
        for (i, port) in [b.x25519_port, b.pport].into_iter().enumerate() {
            sum[i] += cpu[i].count(|| super::proxy::conn_rate(port, 1));
        }
    }
    let [x, h] = [0, 1].map(|i| sum[i] / ROUNDS as f64);
    println!(
        "{:<36} {x:>12.0} {h:>12.0} {:>7.3}",
        "proxy new connections, 1 client",
        h / x
    );
    let [xc, hc] = [0, 1].map(|i| cpu[i].per_op_us());
    println!(
        "{:<36} {xc:>12.0} {hc:>12.0} {:>7.3}",
        "  daemon CPU µs per connection",
        hc / xc
    );
}
