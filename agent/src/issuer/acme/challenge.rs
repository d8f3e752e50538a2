//! Answering ACME challenges from the gateway itself: `http-01` served by a small hyper
//! server on `http01_listen`, `tls-alpn-01` (RFC 8737) by a rustls server speaking
//! `acme-tls/1` on `tls_alpn01_listen` with a challenge certificate made for it, and `dns-01`
//! through the configured hook (clean environment, bounded time). Servers run only while an
//! order has challenges pending, and stop when it is done.

use firmware_config::schema::{AcmeIssuer, Challenge};
use hsm_shim::rustls;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A server on its own thread, stopped on drop.
struct Server {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bind `addr` now (so a failure is said at once), then serve each connection with `conn`
/// on a thread of its own until stopped.
fn serve<F, Fut>(addr: &str, conn: F) -> Result<Server, String>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let std_listener =
        std::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("edge-signer-acme".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(l) = tokio::net::TcpListener::from_std(std_listener) else {
                    return;
                };
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        a = l.accept() => if let Ok((s, _)) = a {
                            tokio::spawn(conn(s));
                        },
                    }
                }
            });
        })
        .map_err(|e| e.to_string())?;
    Ok(Server {
        stop: Some(stop),
        thread: Some(thread),
    })
}

type Answers = Arc<Mutex<HashMap<String, String>>>;

/// `GET /.well-known/acme-challenge/TOKEN`: the key authorization, or 404.
async fn http01(answers: Answers, s: tokio::net::TcpStream) {
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let token = req
            .uri()
            .path()
            .strip_prefix("/.well-known/acme-challenge/")
            .map(str::to_owned);
        let found = token.and_then(|t| {
            answers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&t)
                .cloned()
        });
        async move {
            let (status, body) = match found {
                Some(k) => (200, k),
                None => (404, "no such challenge\n".to_owned()),
            };
            hyper::Response::builder()
                .status(status)
                .header("content-type", "application/octet-stream")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
        .await;
}

/// Challenge certificates by the name they are for (SNI).
#[derive(Debug, Default)]
struct AlpnCerts(Mutex<HashMap<String, Arc<rustls::sign::CertifiedKey>>>);

impl rustls::server::ResolvesServerCert for AlpnCerts {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let acme = hello
            .alpn()
            .is_some_and(|mut p| p.any(|p| p == b"acme-tls/1"));
        let name = hello.server_name()?.to_owned();
        acme.then(|| {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .cloned()
        })
        .flatten()
    }
}

/// A self-signed certificate for `name` with the critical acmeIdentifier extension holding
/// SHA-256 of the key authorization (RFC 8737 §3); its key is made in memory for this one
/// answer (it proves control of the name, never the device's identity).
fn alpn_cert(name: &str, key_auth: &str) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    use sha2::Digest;
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(|e| e.to_string())?;
    let digest = sha2::Sha256::digest(key_auth.as_bytes());
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(&digest));
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing = crate::tlsconf::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

async fn tls_alpn01(acceptor: tokio_rustls::TlsAcceptor, s: tokio::net::TcpStream) {
    // The validation is the handshake; nothing is sent after it.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(s)).await;
}

/// What is provisioned for the challenges of the order in progress.
#[derive(Default)]
pub struct Responders {
    http01: Option<(Server, Answers)>,
    alpn: Option<(Server, Arc<AlpnCerts>)>,
    /// TXT records set through the hook: (name, value).
    dns: Vec<(String, String)>,
}

impl Responders {
    /// Be ready to answer `kind` for `domain`; `key_auth` is the key authorization of its
    /// token. Idempotent.
    pub fn provision(
        &mut self,
        cfg: &AcmeIssuer,
        kind: Challenge,
        domain: &str,
        token: &str,
        key_auth: &str,
    ) -> Result<(), String> {
        match kind {
            Challenge::Http01 => {
                if self.http01.is_none() {
                    let answers = Answers::default();
                    let a = answers.clone();
                    let server = serve(&cfg.http01_listen, move |s| http01(a.clone(), s))?;
                    self.http01 = Some((server, answers));
                }
                if let Some((_, answers)) = &self.http01 {
                    answers
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(token.to_owned(), key_auth.to_owned());
                }
            }
            Challenge::TlsAlpn01 => {
                if self.alpn.is_none() {
                    let certs = Arc::new(AlpnCerts::default());
                    let mut sc =
                        rustls::ServerConfig::builder_with_provider(crate::tlsconf::provider())
                            .with_protocol_versions(&[
                                &rustls::version::TLS13,
                                &rustls::version::TLS12,
                            ])
                            .map_err(|e| e.to_string())?
                            .with_no_client_auth()
                            .with_cert_resolver(certs.clone());
                    sc.alpn_protocols = vec![b"acme-tls/1".to_vec()];
                    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
                    let server = serve(&cfg.tls_alpn01_listen, move |s| {
                        tls_alpn01(acceptor.clone(), s)
                    })?;
                    self.alpn = Some((server, certs));
                }
                if let Some((_, certs)) = &self.alpn {
                    let c = alpn_cert(domain, key_auth)?;
                    certs
                        .0
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(domain.to_owned(), c);
                }
            }
            Challenge::Dns01 => {
                use sha2::Digest;
                let name = format!("_acme-challenge.{}", domain.trim_start_matches("*."));
                let value = hsm_shim::jws::b64url(&sha2::Sha256::digest(key_auth.as_bytes()));
                if !self.dns.contains(&(name.clone(), value.clone())) {
                    hook(cfg, "set", &name, &value)?;
                    self.dns.push((name, value));
                }
            }
        }
        Ok(())
    }

    /// Stop the servers and clear the TXT records (a hook failure is logged: the record
    /// is only left behind).
    pub fn clear(&mut self, cfg: &AcmeIssuer) {
        self.http01 = None;
        self.alpn = None;
        for (name, value) in std::mem::take(&mut self.dns) {
            if let Err(e) = hook(cfg, "clear", &name, &value) {
                tracing::warn!(issuer = %cfg.name, "dns01_hook clear {name}: {e}");
            }
        }
    }
}

/// Run `dns01_hook ACTION NAME VALUE` with a clean environment within its timeout.
fn hook(cfg: &AcmeIssuer, action: &str, name: &str, value: &str) -> Result<(), String> {
    let Some(cmd) = &cfg.dns01_hook else {
        return Err("dns-01 needs dns01_hook".into());
    };
    let mut child = std::process::Command::new(cmd)
        .args([action, name, value])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("dns01_hook {}: {e}", cmd.display()))?;
    crate::events::wait_bounded(&mut child, cfg.dns01_hook_timeout.to_std())
        .map_err(|e| format!("dns01_hook {} {action} {name}: {e}", cmd.display()))
}
