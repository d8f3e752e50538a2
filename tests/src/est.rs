//! A test EST server (RFC 7030) in a thread: rustls with client certificates optional and
//! recorded, an rcgen CA, PKCS#7 certs-only answers made by `openssl crl2pkcs7`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rustls::pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// How the server answers enrolment requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EstMode {
    /// 200 with the certificate.
    Issue,
    /// 202 Retry-After: 1 on the first request for a CSR, then 200.
    AcceptThenIssue,
    /// 400 with a reason.
    Reject,
    /// 200, pkcs7 content type, garbage body.
    Garbage,
    /// 200 with text/html.
    WrongContentType,
    /// 200 with half a PKCS#7.
    Truncated,
    /// 503.
    ServerError,
    /// Answer enrolments only after 1.5 seconds.
    Slow,
}

/// What the server saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Path.
    pub path: String,
    /// The client certificate presented (DER), if any.
    pub client_cert: Option<Vec<u8>>,
    /// Whether HTTP basic credentials matched.
    pub basic_ok: bool,
}

/// The running server.
pub struct EstServer {
    /// Port on 127.0.0.1.
    pub port: u16,
    /// The CA bundle file (the device's `ca_bundle`).
    pub ca_file: PathBuf,
    mode: Arc<Mutex<EstMode>>,
    /// Every request seen.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
    ca: Arc<rcgen::Issuer<'static, rcgen::KeyPair>>,
    ca_pem: String,
    dir: PathBuf,
}

fn pkcs7(dir: &Path, pems: &str) -> Vec<u8> {
    let f = dir.join(format!("est-p7-{}.pem", std::process::id()));
    std::fs::write(&f, pems).expect("p7 input");
    let out = std::process::Command::new("openssl")
        .args([
            "crl2pkcs7",
            "-nocrl",
            "-certfile",
            &f.display().to_string(),
            "-outform",
            "DER",
        ])
        .output()
        .expect("openssl crl2pkcs7");
    assert!(
        out.status.success(),
        "crl2pkcs7: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b64 = B64.encode(out.stdout);
    b64.as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8_lossy(c).into_owned() + "\r\n")
        .collect::<String>()
        .into_bytes()
}

impl EstServer {
    /// Start with HTTP basic credentials `user`/`pass`; the CA is written to `dir/est-ca.pem`.
    pub fn start(dir: &Path, user: &str, pass: &str, mode: EstMode) -> EstServer {
        let pki = crate::httpd::TestPki::new("EST test CA");
        let ca_pem = pki.ca_cert.pem();
        let ca_file = dir.join("est-ca.pem");
        std::fs::write(&ca_file, &ca_pem).expect("ca file");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_cert.der().clone()).expect("root");
        let cfg = pki.server_config(Some(roots));
        let ca = Arc::new(pki.issuer);
        let mode = Arc::new(Mutex::new(mode));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let basic = format!("Basic {}", B64.encode(format!("{user}:{pass}")));
        let (m2, s2, ca2, dir2, ca_pem2) = (
            mode.clone(),
            seen.clone(),
            ca.clone(),
            dir.to_owned(),
            ca_pem.clone(),
        );
        let mut held = std::collections::HashSet::new();
        let (port, handle) = crate::httpd::serve(cfg, stop.clone(), move |conn, head, body| {
            let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
            let client_cert = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec());
            let basic_ok = head
                .lines()
                .any(|l| l.eq_ignore_ascii_case(&format!("authorization: {basic}")));
            s2.lock().unwrap().push(Seen {
                path: path.clone(),
                client_cert: client_cert.clone(),
                basic_ok,
            });
            let mode = *m2.lock().unwrap();
            if mode == EstMode::Slow && !path.ends_with("/cacerts") {
                std::thread::sleep(std::time::Duration::from_millis(1500));
            }
            let (status, ctype, body_out): (&str, &str, Vec<u8>) = if path.ends_with("/cacerts") {
                (
                    "200 OK",
                    "application/pkcs7-mime; smime-type=certs-only",
                    pkcs7(&dir2, &ca_pem2),
                )
            } else if !(client_cert.is_some() || basic_ok) {
                ("401 Unauthorized", "text/plain", b"authenticate".to_vec())
            } else if path.ends_with("/simplereenroll") && client_cert.is_none() {
                (
                    "403 Forbidden",
                    "text/plain",
                    b"re-enrolment needs the current certificate".to_vec(),
                )
            } else {
                match mode {
                    EstMode::Reject => (
                        "400 Bad Request",
                        "text/plain",
                        b"CSR refused by policy: CN not allowed".to_vec(),
                    ),
                    EstMode::ServerError => (
                        "503 Service Unavailable",
                        "text/plain",
                        b"try later".to_vec(),
                    ),
                    EstMode::Garbage => (
                        "200 OK",
                        "application/pkcs7-mime",
                        b"!!!! not base64 !!!!".to_vec(),
                    ),
                    EstMode::WrongContentType => {
                        ("200 OK", "text/html", b"<html>login</html>".to_vec())
                    }
                    EstMode::AcceptThenIssue if held.insert(body.to_vec()) => {
                        ("202 Accepted", "text/plain", b"pending approval".to_vec())
                    }
                    _ => {
                        let text: String = String::from_utf8_lossy(body)
                            .chars()
                            .filter(|c| !c.is_whitespace())
                            .collect();
                        let der = B64.decode(text).unwrap_or_default();
                        match rcgen::CertificateSigningRequestParams::from_der(&der.into()) {
                            Ok(mut csr) => {
                                let now = time::OffsetDateTime::now_utc();
                                csr.params.not_before = now - time::Duration::minutes(1);
                                csr.params.not_after = now + time::Duration::days(90);
                                let cert = csr.signed_by(&ca2).expect("sign");
                                let mut p7 = pkcs7(&dir2, &format!("{}{}", ca_pem2, cert.pem()));
                                if mode == EstMode::Truncated {
                                    p7.truncate(p7.len() / 2);
                                }
                                (
                                    "200 OK",
                                    "application/pkcs7-mime; smime-type=certs-only",
                                    p7,
                                )
                            }
                            Err(_) => ("400 Bad Request", "text/plain", b"not a CSR".to_vec()),
                        }
                    }
                }
            };
            let extra = if status.starts_with("202") {
                "Retry-After: 1\r\n"
            } else {
                ""
            };
            Some(crate::httpd::response(
                status,
                &format!("Content-Type: {ctype}\r\n{extra}"),
                &body_out,
            ))
        });
        EstServer {
            port,
            ca_file,
            mode,
            seen,
            stop,
            handle: Some(handle),
            ca,
            ca_pem,
            dir: dir.to_owned(),
        }
    }

    /// Change how enrolments are answered.
    pub fn set_mode(&self, m: EstMode) {
        *self.mode.lock().unwrap() = m;
    }

    /// Issue a bootstrap certificate for a CSR file (PEM), written to `out`.
    pub fn issue_for_csr(&self, csr_pem: &str, out: &Path) {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).expect("csr");
        let cert = csr.signed_by(&self.ca).expect("sign");
        std::fs::write(out, cert.pem()).expect("write cert");
        let _ = (&self.ca_pem, &self.dir);
    }

    /// The enrolment requests seen (cacerts excluded).
    pub fn enrolments(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| !s.path.ends_with("/cacerts"))
            .cloned()
            .collect()
    }
}

impl Drop for EstServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// DER of the first certificate of a PEM text.
pub fn first_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}
