//! A test EST server (RFC 7030) in a thread: rustls with client certificates optional and
//! recorded, a two-tier rcgen PKI (root -> issuing CA, as real EST deployments run; the
//! device's `ca_bundle` holds the root only), `/cacerts` answering [issuing CA, root],
//! enrolment answering the leaf alone, PKCS#7 certs-only answers made by `openssl crl2pkcs7`.

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
    /// Issue with a subject that keeps only the CN (a CA that drops RDNs).
    KeepOnlyCn,
    /// Issue with the subject's RDNs in reverse order.
    ReorderDn,
    /// Issue with the leaf and the issuing CA in the PKCS#7.
    WithChain,
    /// Hostile: a chunk size of ffffffffffffffff.
    ChunkOverflow,
    /// Hostile: Content-Length of 10 GB.
    HugeLength,
    /// Hostile: a header line that never ends (2 MiB).
    EndlessHeader,
    /// A 100 Continue, then the 200 (legal HTTP: must work).
    InformationalThenOk,
    /// Hostile: a close-delimited body cut without TLS close_notify.
    CutWithoutCloseNotify,
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
    /// Whether any Authorization header was sent.
    pub authorization: bool,
}

/// The running server.
pub struct EstServer {
    /// Port on 127.0.0.1.
    pub port: u16,
    /// The CA bundle file (the device's `ca_bundle`).
    pub ca_file: PathBuf,
    mode: Arc<Mutex<EstMode>>,
    retry_after: Arc<Mutex<String>>,
    /// Every request seen.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
    ca: Arc<rcgen::Issuer<'static, rcgen::KeyPair>>,
    /// The issuing CA certificate (PEM).
    pub inter_pem: String,
}

fn pkcs7(dir: &Path, pems: &str) -> Vec<u8> {
    let f = dir.join(format!("est-p7-{}.pem", std::process::id()));
    std::fs::write(&f, pems).expect("p7 input");
    let out = crate::run_ok(
        std::process::Command::new("openssl").args([
            "crl2pkcs7",
            "-nocrl",
            "-certfile",
            &f.display().to_string(),
            "-outform",
            "DER",
        ]),
        "openssl crl2pkcs7",
    );
    let b64 = B64.encode(out.stdout);
    b64.as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8_lossy(c).into_owned() + "\r\n")
        .collect::<String>()
        .into_bytes()
}

/// The issuing CA under the root of `pki`, and its certificate (PEM).
fn issuing_ca(
    pki: &crate::httpd::TestPki,
) -> (Arc<rcgen::Issuer<'static, rcgen::KeyPair>>, String) {
    let key = rcgen::KeyPair::generate().expect("issuing CA key");
    let mut p = rcgen::CertificateParams::new(vec![]).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "EST test issuing CA");
    let inter_pem = p.signed_by(&key, &pki.issuer).expect("issuing CA").pem();
    (Arc::new(rcgen::Issuer::new(p, key)), inter_pem)
}

impl Seen {
    /// What the server saw of one request; `basic` is the expected Authorization value.
    fn of(conn: &rustls::ServerConnection, head: &str, basic: &str) -> Seen {
        let auth = crate::httpd::header(head, "authorization");
        Seen {
            path: head.split_whitespace().nth(1).unwrap_or("").to_owned(),
            client_cert: conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec()),
            basic_ok: auth.as_deref() == Some(basic),
            authorization: auth.is_some(),
        }
    }
}

impl EstServer {
    /// Start with HTTP basic credentials `user`/`pass`; the root CA is written to
    /// `dir/est-ca.pem` (the device's `ca_bundle`).
    pub fn start(dir: &Path, user: &str, pass: &str, mode: EstMode) -> EstServer {
        let pki = crate::httpd::TestPki::new("EST test root CA");
        let root_pem = pki.ca_cert.pem();
        let ca_file = dir.join("est-ca.pem");
        std::fs::write(&ca_file, &root_pem).expect("ca file");
        let (ca, inter_pem) = issuing_ca(&pki);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_cert.der().clone()).expect("root");
        let cfg = pki.server_config(Some(roots));
        let mode = Arc::new(Mutex::new(mode));
        let retry_after = Arc::new(Mutex::new("1".to_owned()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let basic = format!("Basic {}", B64.encode(format!("{user}:{pass}")));
        let (m2, r2, s2) = (mode.clone(), retry_after.clone(), seen.clone());
        let authority = Authority {
            ca: ca.clone(),
            dir: dir.to_owned(),
            cacerts: format!("{inter_pem}{root_pem}"),
            inter: inter_pem.clone(),
        };
        let mut held = std::collections::HashSet::new();
        let (port, handle) = crate::httpd::serve(cfg, stop.clone(), move |conn, head, body| {
            let req = Seen::of(conn, head, &basic);
            let (path, has_cert, basic_ok) =
                (req.path.clone(), req.client_cert.is_some(), req.basic_ok);
            s2.lock().unwrap().push(req);
            let mode = *m2.lock().unwrap();
            if mode == EstMode::Slow && !path.ends_with("/cacerts") {
                std::thread::sleep(std::time::Duration::from_millis(1500));
            }
            if !path.ends_with("/cacerts") {
                if let Some(raw) = hostile(mode) {
                    return Some(raw);
                }
            }
            let (status, ctype, body_out) =
                authority.answer(mode, &path, has_cert || basic_ok, has_cert, body, &mut held);
            let extra = if status.starts_with("202") {
                format!("Retry-After: {}\r\n", r2.lock().unwrap())
            } else {
                String::new()
            };
            let mut out = Vec::new();
            if mode == EstMode::InformationalThenOk && !path.ends_with("/cacerts") {
                out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            out.extend(crate::httpd::response(
                status,
                &format!("Content-Type: {ctype}\r\n{extra}"),
                &body_out,
            ));
            Some(out)
        });
        EstServer {
            port,
            ca_file,
            mode,
            retry_after,
            seen,
            stop,
            handle: Some(handle),
            ca,
            inter_pem,
        }
    }

    /// What a 202 says in `Retry-After` (seconds or an HTTP date).
    pub fn set_retry_after(&self, v: &str) {
        *self.retry_after.lock().unwrap() = v.to_owned();
    }

    /// Change how enrolments are answered.
    pub fn set_mode(&self, m: EstMode) {
        *self.mode.lock().unwrap() = m;
    }

    /// Issue a bootstrap certificate for a CSR file (PEM), written to `out` with the
    /// issuing CA after it (the chain a client presents).
    pub fn issue_for_csr(&self, csr_pem: &str, out: &Path) {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).expect("csr");
        let cert = csr.signed_by(&self.ca).expect("sign");
        std::fs::write(out, format!("{}{}", cert.pem(), self.inter_pem)).expect("write cert");
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

/// The CA side of the server: what an enrolment or `/cacerts` request gets.
struct Authority {
    ca: Arc<rcgen::Issuer<'static, rcgen::KeyPair>>,
    dir: PathBuf,
    /// `/cacerts`: [issuing CA, root].
    cacerts: String,
    /// The issuing CA (PEM).
    inter: String,
}

impl Authority {
    /// (status, content type, body) for a request on `path` in `mode`; `held` remembers the
    /// CSRs already answered 202 (AcceptThenIssue).
    fn answer(
        &self,
        mode: EstMode,
        path: &str,
        authenticated: bool,
        has_cert: bool,
        body: &[u8],
        held: &mut std::collections::HashSet<Vec<u8>>,
    ) -> (&'static str, &'static str, Vec<u8>) {
        if path.ends_with("/cacerts") {
            (
                "200 OK",
                "application/pkcs7-mime; smime-type=certs-only",
                pkcs7(&self.dir, &self.cacerts),
            )
        } else if !authenticated {
            ("401 Unauthorized", "text/plain", b"authenticate".to_vec())
        } else if path.ends_with("/simplereenroll") && !has_cert {
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
                _ => match issue(&self.ca, body, mode) {
                    Some(cert_pem) => {
                        let pems = if mode == EstMode::WithChain {
                            format!("{cert_pem}{}", self.inter)
                        } else {
                            cert_pem
                        };
                        let mut p7 = pkcs7(&self.dir, &pems);
                        if mode == EstMode::Truncated {
                            p7.truncate(p7.len() / 2);
                        }
                        (
                            "200 OK",
                            "application/pkcs7-mime; smime-type=certs-only",
                            p7,
                        )
                    }
                    None => ("400 Bad Request", "text/plain", b"not a CSR".to_vec()),
                },
            }
        }
    }
}

/// Sign a base64 CSR body for 90 days, rewriting the subject as `mode` says.
fn issue(
    ca: &rcgen::Issuer<'static, rcgen::KeyPair>,
    body: &[u8],
    mode: EstMode,
) -> Option<String> {
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = B64.decode(text).ok()?;
    let mut csr = rcgen::CertificateSigningRequestParams::from_der(&der.into()).ok()?;
    let now = time::OffsetDateTime::now_utc();
    csr.params.not_before = now - time::Duration::minutes(1);
    csr.params.not_after = now + time::Duration::days(90);
    let dn: Vec<(rcgen::DnType, rcgen::DnValue)> = csr
        .params
        .distinguished_name
        .iter()
        .map(|(t, v)| (t.clone(), v.clone()))
        .collect();
    let rebuilt: Vec<_> = match mode {
        EstMode::KeepOnlyCn => dn
            .into_iter()
            .filter(|(t, _)| *t == rcgen::DnType::CommonName)
            .collect(),
        EstMode::ReorderDn => dn.into_iter().rev().collect(),
        _ => dn,
    };
    csr.params.distinguished_name = rcgen::DistinguishedName::new();
    for (t, v) in rebuilt {
        csr.params.distinguished_name.push(t, v);
    }
    Some(csr.signed_by(ca).ok()?.pem())
}

/// The raw bytes of a hostile answer, if `mode` is one.
fn hostile(mode: EstMode) -> Option<Vec<u8>> {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/pkcs7-mime\r\n";
    Some(match mode {
        EstMode::ChunkOverflow => {
            format!("{head}Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabcd\r\n0\r\n\r\n")
                .into_bytes()
        }
        EstMode::HugeLength => {
            format!("{head}Content-Length: 10000000000\r\n\r\nMIIB").into_bytes()
        }
        EstMode::EndlessHeader => {
            let mut v = format!("{head}X-Endless: ").into_bytes();
            v.extend(std::iter::repeat_n(b'a', 2 << 20));
            v
        }
        EstMode::InformationalThenOk => return None,
        EstMode::CutWithoutCloseNotify => {
            let mut v = crate::httpd::NO_CLOSE_NOTIFY.to_vec();
            v.extend_from_slice(format!("{head}Connection: close\r\n\r\nMIIBcut").as_bytes());
            v
        }
        _ => return None,
    })
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

/// Firmware defaults for one EST identity `dev` (`gw-7`) against `est`, with `bootstrap`
/// lines for the issuer and `identity_extra` for the identity; the bootstrap password file
/// is written too.
pub fn est_config_with(env: &crate::Env, est: &EstServer, bootstrap: &str, identity_extra: &str) {
    let p = env.dir.path().display();
    std::fs::write(env.path("est-password"), "s3cret-bootstrap\n").unwrap();
    let cfg = format!(
        r#"
{token}
[[identity]]
name = "dev"
subject = {{ o = "Acme", cn = "gw-7" }}
sans = ["dns:gw-7.example"]
issuer = "est"
{identity_extra}
[identity.renewal]
retry_min = "1s"
retry_max = "2s"

[[issuer]]
name = "est"
kind = "est"
url = "https://127.0.0.1:{port}"
ca_bundle = "{ca}"
{bootstrap}

[paths]
state_dir = "{p}/state"
"#,
        token = env.token_toml(),
        port = est.port,
        ca = est.ca_file.display(),
    );
    std::fs::write(env.path("defaults.toml"), cfg).unwrap();
}
