//! EST (RFC 7030): `cacerts` checked against the configured CA bundle at first contact and
//! pinned in the state dir (its intermediates feed chain building; the trust anchor stays
//! `ca_bundle`), `simpleenroll` with the bootstrap credential (HTTP basic or a bootstrap
//! client cert), `simplereenroll` authenticated by mTLS with the current identity alone,
//! whose key stays in the token. `202 + Retry-After` (seconds or an HTTP date) waits, and
//! the engine persists the wait; 4xx rejects; 5xx, network errors and unparseable answers
//! are retried with backoff.

use super::{Issuer, IssuerAnswer, Request, Submitted};
use crate::clock::{rfc3339, Unix};
use crate::http;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hsm_shim::rustls::pki_types::CertificateDer;
use hsm_shim::rustls::sign::CertifiedKey;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use x509_cert::der::{Decode, Encode};
use zeroize::Zeroizing;

/// An EST server.
pub struct Est {
    name: String,
    base: http::Url,
    ca: Vec<CertificateDer<'static>>,
    /// The `/cacerts` answer last accepted (pinned in `pin_file`).
    cacerts: Vec<CertificateDer<'static>>,
    pin_file: PathBuf,
    basic: Option<(String, Zeroizing<String>)>,
    bootstrap: Option<Arc<CertifiedKey>>,
    cacerts_checked: bool,
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

/// `Retry-After` as delta-seconds or an HTTP date, as seconds from `now` (1 s to 7 days).
pub fn retry_after(value: Option<&str>, now: Unix) -> u64 {
    let v = value.unwrap_or("").trim();
    let secs = v.parse::<u64>().ok().or_else(|| {
        httpdate::parse_http_date(v).ok().map(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs().saturating_sub(now))
                .unwrap_or(0)
        })
    });
    secs.unwrap_or(60).clamp(1, 7 * 86_400)
}

fn spki_of(c: &CertificateDer) -> Option<Vec<u8>> {
    x509_cert::Certificate::from_der(c)
        .ok()?
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .ok()
}

/// The contents of a DER TLV (an AlgorithmIdentifier without its SEQUENCE header).
fn contents(der: &[u8]) -> Option<Vec<u8>> {
    x509_cert::der::asn1::AnyRef::from_der(der)
        .ok()
        .map(|a| a.value().to_vec())
}

/// Whether `issuer`'s key signed `cert` (any algorithm webpki knows).
fn signed_by(cert: &CertificateDer, issuer: &CertificateDer) -> bool {
    let (Ok(c), Ok(i)) = (
        x509_cert::Certificate::from_der(cert),
        x509_cert::Certificate::from_der(issuer),
    ) else {
        return false;
    };
    let ispki = &i.tbs_certificate.subject_public_key_info;
    let (Ok(tbs), Ok(sig_alg), Ok(pk_alg)) = (
        c.tbs_certificate.to_der(),
        c.signature_algorithm.to_der(),
        ispki.algorithm.to_der(),
    ) else {
        return false;
    };
    let (Some(sig_alg), Some(pk_alg)) = (contents(&sig_alg), contents(&pk_alg)) else {
        return false;
    };
    let (Some(sig), Some(pk)) = (c.signature.as_bytes(), ispki.subject_public_key.as_bytes())
    else {
        return false;
    };
    webpki::ALL_VERIFICATION_ALGS.iter().any(|alg| {
        alg.signature_alg_id().as_ref() == sig_alg.as_slice()
            && alg.public_key_alg_id().as_ref() == pk_alg.as_slice()
            && alg.verify_signature(pk, &tbs, sig).is_ok()
    })
}

/// Every certificate of `set` is an anchor or was signed, through others of the set, by an
/// anchor: a `/cacerts` answer may add intermediates, never new roots.
pub fn anchored(set: &[CertificateDer<'static>], anchors: &[CertificateDer<'static>]) -> bool {
    let mut good: Vec<&CertificateDer> = anchors.iter().collect();
    let mut left: Vec<&CertificateDer> = set.iter().filter(|c| !anchors.contains(c)).collect();
    loop {
        let before = left.len();
        left.retain(|c| {
            if good.iter().any(|g| signed_by(c, g)) {
                good.push(c);
                false
            } else {
                true
            }
        });
        if left.is_empty() {
            return set.iter().any(|c| good.contains(&c));
        }
        if left.len() == before {
            return false;
        }
    }
}

impl Est {
    /// From config; the bootstrap client key (a `pkcs11:` URI) is opened in `token`; the
    /// pinned `/cacerts` of an earlier contact is read from `state_dir/issuers/<name>/`.
    pub fn new(
        cfg: &firmware_config::schema::EstIssuer,
        token: &Arc<hsm_shim::Token>,
        state_dir: &std::path::Path,
    ) -> crate::error::Result<Est> {
        let mut base = http::parse_https(&cfg.url)?.join(&[".well-known", "est"]);
        if let Some(l) = &cfg.label {
            base = base.join(&[l]);
        }
        let mut basic = None;
        let mut bootstrap = None;
        if let Some(b) = &cfg.bootstrap {
            if let (Some(u), Some(f)) = (&b.username, &b.password_file) {
                let raw = Zeroizing::new(
                    std::fs::read_to_string(f)
                        .map_err(|e| crate::err!("EST password file {}: {e}", f.display()))?,
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
        let ca = crate::tlsconf::load_certs(&cfg.ca_bundle)?;
        let pin_file = state_dir
            .join("issuers")
            .join(&cfg.name)
            .join("cacerts.pem");
        // A pin that no longer chains to the configured bundle (the bundle changed) is dropped.
        let cacerts = crate::tlsconf::load_certs(&pin_file)
            .ok()
            .filter(|c| anchored(c, &ca))
            .unwrap_or_default();
        Ok(Est {
            name: cfg.name.clone(),
            base,
            ca,
            cacerts,
            pin_file,
            basic,
            bootstrap,
            cacerts_checked: false,
            timeout: cfg.timeout.to_std().max(Duration::from_secs(1)),
        })
    }

    fn call(
        &self,
        op: &str,
        identity: Option<Arc<CertifiedKey>>,
        req: &http::Request,
    ) -> Result<http::Response, String> {
        let roots = crate::tlsconf::roots_of(&self.ca).map_err(|e| e.to_string())?;
        let cfg = crate::tlsconf::client_config(identity, roots, crate::tlsconf::TlsVersions::Any)
            .map_err(|e| e.to_string())?;
        http::request(Arc::new(cfg), &self.base.join(&[op]), req, self.timeout)
            .map_err(|e| e.to_string())
    }

    /// `GET cacerts` once per process: the answer must be anchored in the configured bundle;
    /// it is pinned (and re-pinned when it changes) for chain building.
    fn check_cacerts(&mut self) -> Result<(), IssuerAnswer> {
        if self.cacerts_checked {
            return Ok(());
        }
        let get = http::Request {
            method: "GET",
            ..Default::default()
        };
        let resp = self
            .call("cacerts", None, &get)
            .map_err(|e| IssuerAnswer::Unreachable(format!("EST cacerts: {e}")))?;
        if resp.status != 200 {
            return Err(IssuerAnswer::Unreachable(format!(
                "EST cacerts answered HTTP {}",
                resp.status
            )));
        }
        let certs = parse_certs_only(&resp.body)
            .map_err(|e| IssuerAnswer::Unreachable(format!("EST cacerts: {e}")))?;
        if !anchored(&certs, &self.ca) {
            return Err(IssuerAnswer::Rejected(format!(
                "the EST server's CA certificates ({} of them) do not chain to the configured ca_bundle: refusing to enrol with an unknown CA",
                certs.len()
            )));
        }
        if certs != self.cacerts {
            let pem = crate::validate::to_pem(&certs);
            let dir = self.pin_file.parent().unwrap_or(std::path::Path::new("."));
            std::fs::create_dir_all(dir)
                .and_then(|_| firmware_config::store::atomic_write(&self.pin_file, pem.as_bytes()))
                .map_err(|e| {
                    IssuerAnswer::Unreachable(format!(
                        "cannot pin {}: {e}",
                        self.pin_file.display()
                    ))
                })?;
            tracing::info!(issuer = %self.name, certificates = certs.len(), "EST cacerts pinned");
            self.cacerts = certs;
        }
        self.cacerts_checked = true;
        Ok(())
    }

    fn post(&mut self, req: &Request, now: Unix) -> IssuerAnswer {
        if let Err(a) = self.check_cacerts() {
            return a;
        }
        // Re-enrol with the current identity alone; else enrol with the bootstrap credential:
        // its client certificate, or else HTTP basic (never beside a client certificate).
        let (op, identity, basic) = match (&req.current, &self.bootstrap, &self.basic) {
            (Some(cur), _, _) => ("simplereenroll", Some(cur.clone()), None),
            (None, Some(b), _) => ("simpleenroll", Some(b.clone()), None),
            (None, None, Some(b)) => ("simpleenroll", None, Some(b)),
            (None, None, None) => {
                return IssuerAnswer::Rejected(format!(
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
        if let Some((u, p)) = basic {
            let cred = Zeroizing::new(format!("{u}:{}", p.as_str()));
            headers.push((
                "Authorization",
                format!("Basic {}", B64.encode(cred.as_bytes())),
            ));
        }
        let hreq = http::Request {
            method: "POST",
            headers,
            body: body.as_bytes(),
        };
        let resp = match self.call(op, identity, &hreq) {
            Ok(r) => r,
            Err(e) => return IssuerAnswer::Unreachable(format!("EST {op}: {e}")),
        };
        match resp.status {
            200 => Self::issued(op, &resp, req.spki),
            202 => {
                let secs = retry_after(resp.header("retry-after"), now);
                // `now` is whole seconds, truncated: one more second so the server is never
                // asked again before the time it gave.
                let until = now + secs + 1;
                IssuerAnswer::Wait {
                    until,
                    what: format!("EST server holds the request for approval; asking again at {} (Retry-After: {secs})", rfc3339(until)),
                }
            }
            s @ 400..=499 => IssuerAnswer::Rejected(format!(
                "EST {op} answered HTTP {s}: {}",
                resp.text(300).trim()
            )),
            s => IssuerAnswer::Unreachable(format!(
                "EST {op} answered HTTP {s}: {}",
                resp.text(300).trim()
            )),
        }
    }

    /// A 200: the PKCS#7 certificates, the one carrying the new key first.
    fn issued(op: &str, resp: &http::Response, spki: &[u8]) -> IssuerAnswer {
        let ct = resp
            .header("content-type")
            .unwrap_or("")
            .to_ascii_lowercase();
        if !ct.starts_with("application/pkcs7-mime") {
            return IssuerAnswer::Unreachable(format!(
                "EST {op} answered 200 with Content-Type '{ct}', not application/pkcs7-mime"
            ));
        }
        match parse_certs_only(&resp.body) {
            Ok(mut certs) => {
                if let Some(i) = certs
                    .iter()
                    .position(|c| spki_of(c).as_deref() == Some(spki))
                {
                    let leaf = certs.remove(i);
                    certs.insert(0, leaf);
                }
                IssuerAnswer::Issued(crate::validate::to_pem(&certs))
            }
            Err(e) => IssuerAnswer::Unreachable(format!(
                "EST {op} answered 200 with an unusable body: {e}"
            )),
        }
    }
}

impl Issuer for Est {
    fn submit(&mut self, req: &Request, now: Unix) -> Result<Submitted, IssuerAnswer> {
        let reference = format!("{}-{}", req.identity, req.generation);
        match self.post(req, now) {
            a @ (IssuerAnswer::Issued(_) | IssuerAnswer::Wait { .. }) => Ok(Submitted {
                reference,
                answer: Some(a),
            }),
            other => Err(other),
        }
    }

    /// RFC 7030 4.2.3: after Retry-After the client repeats the same request. The engine
    /// calls this only once the persisted wait is over.
    fn poll(&mut self, req: &Request, _reference: &str, now: Unix) -> IssuerAnswer {
        self.post(req, now)
    }

    fn ca_bundle(&self) -> &[CertificateDer<'static>] {
        &self.ca
    }

    fn intermediates(&self) -> Vec<CertificateDer<'static>> {
        self.cacerts
            .iter()
            .filter(|c| !self.ca.contains(c))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = 1_784_000_000; // 2026-07-14T03:33:20Z
        assert_eq!(retry_after(Some("60"), now), 60);
        assert_eq!(retry_after(Some("Tue, 14 Jul 2026 03:35:20 GMT"), now), 120);
        assert_eq!(retry_after(Some("Mon, 01 Jan 2001 00:00:00 GMT"), now), 1);
        assert_eq!(retry_after(None, now), 60);
        assert_eq!(retry_after(Some("soon"), now), 60);
        assert_eq!(retry_after(Some("99999999"), now), 7 * 86_400);
    }

    proptest! {
        #[test]
        fn pkcs7_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_certs_only(&bytes);
            let _ = parse_certs_only(B64.encode(&bytes).as_bytes());
            let _ = retry_after(std::str::from_utf8(&bytes).ok(), 1_800_000_000);
        }
    }
}
