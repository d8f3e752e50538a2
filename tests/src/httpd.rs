//! Test HTTPS servers' shared parts: a CA with a server certificate for 127.0.0.1, and
//! reading one HTTP/1.1 request.
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io::Read;
use std::sync::Arc;

/// A new CA named `ca_name`, and a server certificate for 127.0.0.1 signed by it.
pub struct TestPki {
    /// The CA certificate.
    pub ca_cert: rcgen::Certificate,
    /// The CA, to sign more.
    pub issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// Server certificate chain.
    pub server_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Server key (PKCS#8).
    pub server_key: Vec<u8>,
}

impl TestPki {
    /// Make it.
    pub fn new(ca_name: &str) -> TestPki {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut cap = rcgen::CertificateParams::new(vec![]).expect("ca params");
        cap.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        cap.distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        let ca_cert = cap.self_signed(&ca_key).expect("ca cert");
        let issuer = rcgen::Issuer::new(cap, ca_key);
        let key = rcgen::KeyPair::generate().expect("server key");
        let mut sp = rcgen::CertificateParams::new(vec![]).expect("params");
        sp.subject_alt_names = vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())];
        sp.distinguished_name
            .push(rcgen::DnType::CommonName, "test server");
        let cert = sp.signed_by(&key, &issuer).expect("server cert");
        TestPki {
            ca_cert,
            issuer,
            server_chain: vec![cert.der().clone()],
            server_key: key.serialize_der(),
        }
    }

    /// A server config (client certificates optional when `client_roots` is given).
    pub fn server_config(
        &self,
        client_roots: Option<rustls::RootCertStore>,
    ) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let b = match client_roots {
            Some(r) => b.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(r), provider)
                    .allow_unauthenticated()
                    .build()
                    .expect("verifier"),
            ),
            None => b.with_no_client_auth(),
        };
        Arc::new(
            b.with_single_cert(
                self.server_chain.clone(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone())),
            )
            .expect("server config"),
        )
    }
}

/// Serve HTTPS on 127.0.0.1 (a free port, returned) until `stop`: each connection's
/// request goes to `handle`, whose answer (a whole response) is written back; `None`
/// drops the connection without an answer.
pub fn serve(
    cfg: Arc<rustls::ServerConfig>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    mut handle: impl FnMut(&rustls::ServerConnection, &str, &[u8]) -> Option<Vec<u8>> + Send + 'static,
) -> (u16, std::thread::JoinHandle<()>) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let h = std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let Ok((tcp, _)) = listener.accept() else {
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            };
            let _ = tcp.set_nonblocking(false);
            let _ = tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)));
            let Ok(conn) = rustls::ServerConnection::new(cfg.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let (head, body) = read_request(&mut tls);
            if let Some(resp) = handle(&tls.conn, &head, &body) {
                match resp.strip_prefix(NO_CLOSE_NOTIFY) {
                    // Cut the connection like a crashed server: no close_notify.
                    Some(raw) => {
                        let _ = tls.write_all(raw);
                        let _ = tls.flush();
                        let _ = tls.sock.shutdown(std::net::Shutdown::Both);
                    }
                    None => {
                        let _ = tls.write_all(&resp);
                        tls.conn.send_close_notify();
                        let _ = tls.flush();
                    }
                }
            }
        }
    });
    (port, h)
}

/// A reply starting with this is sent without the rest and the TCP connection is cut
/// without a TLS close_notify.
pub const NO_CLOSE_NOTIFY: &[u8] = b"\x00no-close-notify\x00";

/// The reason phrase of an HTTP status code.
pub fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// A whole HTTP/1.1 response (`extra_headers` each ending in CRLF).
pub fn response(status: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\n{extra_headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// A header's value from a request head (names compared without case, as HTTP does).
pub fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// Read one request: (head, body of Content-Length bytes). Empty on a broken connection.
pub fn read_request(tls: &mut impl Read) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) | Err(_) => return (String::new(), Vec::new()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            while buf.len() < i + 4 + len {
                match tls.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            return (head, buf[i + 4..].to_vec());
        }
    }
}
