//! EST (RFC 7030): `cacerts` checked against the configured CA bundle at first contact,
//! `simpleenroll` with the bootstrap credential (HTTP basic and/or a bootstrap client cert),
//! `simplereenroll` authenticated by mTLS with the current identity, whose key stays in the
//! token. `202 + Retry-After` waits; 4xx rejects; 5xx, network errors and unparseable
//! answers are retried with backoff.

use super::{Answer, Issuer, Request};
use crate::clock::{rfc3339, Unix};
use crate::http::{self, Url};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hsm_shim::rustls::pki_types::CertificateDer;
use hsm_shim::rustls::sign::CertifiedKey;
use hsm_shim::rustls::RootCertStore;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use x509_cert::der::{Decode, Encode};
use zeroize::Zeroizing;

/// An EST server.
pub struct Est {
    name: String,
    base: Url,
    ca: Vec<CertificateDer<'static>>,
    basic: Option<(String, Zeroizing<String>)>,
    bootstrap: Option<Arc<CertifiedKey>>,
    cacerts_checked: bool,
    /// Answers already received for a reference (a 200 on submit, a 202's retry time).
    pending: HashMap<String, Answer>,
    timeout: Duration,
}

/// Parse an EST `application/pkcs7-mime; smime-type=certs-only` body (base64 of a CMS
/// SignedData with no signers) into certificates.
pub fn parse_certs_only(body: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = B64
        .decode(text.as_bytes())
        .map_err(|e| format!("body is not base64: {e}"))?;
    let ci = cms::content_info::ContentInfo::from_der(&der)
        .map_err(|e| format!("not a CMS ContentInfo: {e}"))?;
    if ci.content_type != const_oid::db::rfc5911::ID_SIGNED_DATA {
        return Err(format!(
            "CMS content type {} is not signedData",
            ci.content_type
        ));
    }
    let sd = ci
        .content
        .decode_as::<cms::signed_data::SignedData>()
        .map_err(|e| format!("SignedData does not parse: {e}"))?;
    let mut out = Vec::new();
    for c in sd.certificates.map(|s| s.0.into_vec()).unwrap_or_default() {
        if let cms::cert::CertificateChoices::Certificate(cert) = c {
            out.push(CertificateDer::from(
                cert.to_der().map_err(|e| e.to_string())?,
            ));
        }
    }
    if out.is_empty() {
        return Err("no certificate in the PKCS#7".into());
    }
    Ok(out)
}

fn spki_of(c: &CertificateDer) -> Option<Vec<u8>> {
    x509_cert::Certificate::from_der(c)
        .ok()?
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .ok()
}

impl Est {
    /// From config; the bootstrap client key (a `pkcs11:` URI) is opened in `token`.
    pub fn new(
        cfg: &firmware_config::schema::EstIssuer,
        token: &Arc<hsm_shim::Token>,
    ) -> anyhow::Result<Est> {
        let mut base = cfg.url.trim_end_matches('/').to_owned() + "/.well-known/est";
        if let Some(l) = &cfg.label {
            base += &format!("/{l}");
        }
        let mut basic = None;
        let mut bootstrap = None;
        if let Some(b) = &cfg.bootstrap {
            if let (Some(u), Some(f)) = (&b.username, &b.password_file) {
                let raw = Zeroizing::new(
                    std::fs::read_to_string(f)
                        .map_err(|e| anyhow::anyhow!("EST password file {}: {e}", f.display()))?,
                );
                basic = Some((
                    u.clone(),
                    Zeroizing::new(raw.trim_end_matches(['\n', '\r']).to_owned()),
                ));
            }
            if let (Some(cert), Some(key)) = (&b.cert, &b.key) {
                let uri = hsm_shim::Pkcs11Uri::parse(key)?;
                let k =
                    hsm_shim::TokenKey::open(token.clone(), &hsm_shim::KeyRef::from_uri(&uri)?)?;
                let chain = crate::tlsconf::load_certs(cert)?;
                bootstrap = Some(hsm_shim::tls::certified_key(
                    hsm_shim::TlsSigningKey::new(k),
                    chain,
                )?);
            }
        }
        Ok(Est {
            name: cfg.name.clone(),
            base: Url::parse(&base)?,
            ca: crate::tlsconf::load_certs(&cfg.ca_bundle)?,
            basic,
            bootstrap,
            cacerts_checked: false,
            pending: HashMap::new(),
            timeout: cfg.timeout.to_std().max(Duration::from_secs(1)),
        })
    }

    fn url(&self, op: &str) -> Url {
        let mut u = self.base.clone();
        u.path = format!("{}/{op}", self.base.path.trim_end_matches('/'));
        u
    }

    fn roots(&self) -> Result<RootCertStore, String> {
        let mut r = RootCertStore::empty();
        for c in &self.ca {
            r.add(c.clone()).map_err(|e| e.to_string())?;
        }
        Ok(r)
    }

    fn call(
        &self,
        op: &str,
        identity: Option<Arc<CertifiedKey>>,
        req: &http::Request,
    ) -> Result<http::Response, String> {
        let cfg = crate::tlsconf::client_config(
            identity,
            self.roots()?,
            crate::tlsconf::TlsVersions::Any,
        )
        .map_err(|e| e.to_string())?;
        http::request(Arc::new(cfg), &self.url(op), req, self.timeout).map_err(|e| {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(x) = src {
                s += &format!(": {x}");
                src = x.source();
            }
            s
        })
    }

    /// `GET cacerts` once: the server's CA must be in the configured bundle.
    fn check_cacerts(&mut self) -> Result<(), Answer> {
        if self.cacerts_checked {
            return Ok(());
        }
        let resp = self
            .call(
                "cacerts",
                None,
                &http::Request {
                    method: "GET",
                    ..Default::default()
                },
            )
            .map_err(|e| Answer::Unreachable(format!("EST cacerts: {e}")))?;
        if resp.status != 200 {
            return Err(Answer::Unreachable(format!(
                "EST cacerts answered HTTP {}",
                resp.status
            )));
        }
        let certs = parse_certs_only(&resp.body)
            .map_err(|e| Answer::Unreachable(format!("EST cacerts: {e}")))?;
        if !certs.iter().any(|c| self.ca.contains(c)) {
            return Err(Answer::Rejected(format!(
                "the EST server's CA certificates ({} of them) are not in the configured ca_bundle: refusing to enrol with an unknown CA",
                certs.len()
            )));
        }
        self.cacerts_checked = true;
        Ok(())
    }

    fn post(&mut self, req: &Request, now: Unix) -> Answer {
        // Re-enrol with the current identity over mTLS; else enrol with the bootstrap credential.
        let (op, identity) = match (&req.current, &self.bootstrap) {
            (Some(cur), _) => ("simplereenroll", Some(cur.clone())),
            (None, Some(b)) => ("simpleenroll", Some(b.clone())),
            (None, None) if self.basic.is_some() => ("simpleenroll", None),
            (None, None) => {
                return Answer::Rejected(format!(
                    "no valid identity to re-enrol with and no bootstrap credential for {}: a person must configure issuer.bootstrap (username/password_file or cert/key) or enrol through another issuer",
                    self.name
                ))
            }
        };
        let body = req
            .csr_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<Vec<_>>()
            .join("\r\n");
        let mut headers = vec![
            ("Content-Type", "application/pkcs10".to_owned()),
            ("Content-Transfer-Encoding", "base64".to_owned()),
        ];
        if let Some((u, p)) = &self.basic {
            headers.push((
                "Authorization",
                format!("Basic {}", B64.encode(format!("{u}:{}", p.as_str()))),
            ));
        }
        let resp = match self.call(
            op,
            identity,
            &http::Request {
                method: "POST",
                headers,
                body: body.as_bytes(),
            },
        ) {
            Ok(r) => r,
            Err(e) => return Answer::Unreachable(format!("EST {op}: {e}")),
        };
        match resp.status {
            200 => {
                let ct = resp
                    .header("content-type")
                    .unwrap_or("")
                    .to_ascii_lowercase();
                if !ct.starts_with("application/pkcs7-mime") {
                    return Answer::Unreachable(format!("EST {op} answered 200 with Content-Type '{ct}', not application/pkcs7-mime"));
                }
                match parse_certs_only(&resp.body) {
                    Ok(mut certs) => {
                        // Leaf first: the certificate that carries the new key.
                        if let Some(i) = certs
                            .iter()
                            .position(|c| spki_of(c).as_deref() == Some(req.spki))
                        {
                            let leaf = certs.remove(i);
                            certs.insert(0, leaf);
                        }
                        Answer::Issued(
                            certs
                                .iter()
                                .map(|c| hsm_shim::pem("CERTIFICATE", c))
                                .collect(),
                        )
                    }
                    Err(e) => Answer::Unreachable(format!(
                        "EST {op} answered 200 with an unusable body: {e}"
                    )),
                }
            }
            202 => {
                let secs = resp
                    .header("retry-after")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(60)
                    .clamp(1, 7 * 86_400);
                Answer::Wait {
                    until: now + secs,
                    what: format!("EST server holds the request for approval; asking again at {} (Retry-After: {secs})", rfc3339(now + secs)),
                }
            }
            s @ 400..=499 => Answer::Rejected(format!(
                "EST {op} answered HTTP {s}: {}",
                resp.text(300).trim()
            )),
            s => Answer::Unreachable(format!(
                "EST {op} answered HTTP {s}: {}",
                resp.text(300).trim()
            )),
        }
    }
}

impl Issuer for Est {
    fn submit(&mut self, req: &Request, now: Unix) -> Result<String, Answer> {
        self.check_cacerts()?;
        let reference = format!("{}-{}", req.identity, req.generation);
        match self.post(req, now) {
            a @ (Answer::Issued(_) | Answer::Wait { .. }) => {
                self.pending.insert(reference.clone(), a);
                Ok(reference)
            }
            other => Err(other),
        }
    }

    fn poll(&mut self, req: &Request, reference: &str, now: Unix) -> Answer {
        match self.pending.remove(reference) {
            Some(Answer::Issued(pem)) => return Answer::Issued(pem),
            Some(Answer::Wait { until, what }) if until > now => {
                self.pending.insert(
                    reference.to_owned(),
                    Answer::Wait {
                        until,
                        what: what.clone(),
                    },
                );
                return Answer::Wait { until, what };
            }
            _ => {}
        }
        if let Err(a) = self.check_cacerts() {
            return a;
        }
        // RFC 7030 4.2.3: after Retry-After the client repeats the same request.
        let a = self.post(req, now);
        if let Answer::Wait { .. } = &a {
            self.pending.insert(reference.to_owned(), a.clone());
        }
        a
    }

    fn ca_bundle(&self) -> &[CertificateDer<'static>] {
        &self.ca
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pkcs7_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_certs_only(&bytes);
            let _ = parse_certs_only(B64.encode(&bytes).as_bytes());
        }
    }
}
