//! The SCEP server over HTTP: GetCACaps, GetCACert and PKIOperation (POST when the CA says
//! `POSTPKIOperation`, else GET with the message in the query), and what GetCACert's
//! certificates may be trusted for.

use super::message::certs_only;
use crate::http::{self, Url};
use hsm_shim::rustls;
use rustls::pki_types::CertificateDer;
use std::sync::Arc;
use std::time::Duration;
use x509_cert::der::{Decode, Encode};
use x509_cert::Certificate;

/// What GetCACaps says the CA can do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caps {
    /// PKIOperation by POST.
    pub post: bool,
    /// RenewalReq.
    pub renewal: bool,
    /// AES content encryption.
    pub aes: bool,
    /// SHA-256 signatures.
    pub sha256: bool,
}

impl Caps {
    /// Read a GetCACaps answer (one capability per line, any case).
    pub fn parse(text: &str) -> Caps {
        let has = |c: &str| text.lines().any(|l| l.trim().eq_ignore_ascii_case(c));
        // SCEPStandard (RFC 8894 §3.5.2) implies AES, SHA-256 and POST.
        let standard = has("SCEPStandard");
        Caps {
            post: standard || has("POSTPKIOperation"),
            renewal: has("Renewal"),
            aes: standard || has("AES"),
            sha256: standard || has("SHA-256"),
        }
    }
}

/// The CA as GetCACaps and GetCACert showed it.
#[derive(Debug, Clone)]
pub struct CaInfo {
    /// Its capabilities.
    pub caps: Caps,
    /// Every certificate GetCACert returned (CertRep signatures are checked with these).
    pub certs: Vec<Certificate>,
    /// The certificate our envelopes are encrypted to: the RA's, else the CA's.
    pub recipient: Certificate,
    /// The CA's own certificate (its subject names the issuer in CertPoll).
    pub ca: Certificate,
}

/// A SCEP server.
pub struct Server {
    url: Url,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

/// A failed exchange: `true` when the server may come back (network, 5xx), `false` when it
/// refused the request itself.
pub type Failed = (bool, String);

impl Server {
    /// A server at `url` (`http://` or `https://`; the HTTPS certificate must chain to
    /// `roots`).
    pub fn new(
        url: &str,
        roots: rustls::RootCertStore,
        timeout: Duration,
    ) -> Result<Server, String> {
        let url = Url::parse_http_or_https(url).map_err(|e| format!("SCEP url '{url}': {e}"))?;
        let tls = crate::tlsconf::client_config(None, roots, crate::tlsconf::TlsVersions::Any)
            .map_err(|e| e.to_string())?;
        Ok(Server {
            url,
            tls: Arc::new(tls),
            timeout,
        })
    }

    fn get(&self, operation: &str, message: Option<&str>) -> Result<http::Response, Failed> {
        let mut q = format!("operation={operation}");
        if let Some(m) = message {
            q += "&message=";
            q.extend(percent_encoding::utf8_percent_encode(
                m,
                percent_encoding::NON_ALPHANUMERIC,
            ));
        }
        let url = self.with_query(&q)?;
        let r = http::get(self.tls.clone(), &url, self.timeout)
            .map_err(|e| (true, format!("SCEP {operation} at {}: {e}", self.url)))?;
        ok(operation, r)
    }

    fn with_query(&self, q: &str) -> Result<Url, Failed> {
        let base = self.url.to_string();
        let base = base.split('?').next().unwrap_or_default();
        Url::parse_http_or_https(&format!("{base}?{q}")).map_err(|e| (false, e))
    }

    /// GetCACaps and GetCACert; every certificate must be in `anchors` or issued by one of
    /// them (an RA certificate).
    pub fn ca_info(&self, anchors: &[CertificateDer<'static>]) -> Result<CaInfo, Failed> {
        let caps = self.get("GetCACaps", None)?;
        let caps = Caps::parse(&String::from_utf8_lossy(&caps.body));
        let r = self.get("GetCACert", None)?;
        ca_certs(&r.body, anchors, caps).map_err(|e| (false, e))
    }

    /// One PKIOperation: the CertRep's bytes.
    pub fn operation(&self, caps: &Caps, msg: &[u8]) -> Result<Vec<u8>, Failed> {
        use base64::Engine;
        if !caps.post {
            let m = base64::engine::general_purpose::STANDARD.encode(msg);
            return Ok(self.get("PKIOperation", Some(&m))?.body);
        }
        let url = self.with_query("operation=PKIOperation")?;
        let req = http::Request {
            method: "POST",
            headers: vec![("Content-Type", "application/x-pki-message".to_owned())],
            body: msg,
        };
        let r = http::request(self.tls.clone(), &url, &req, self.timeout)
            .map_err(|e| (true, format!("SCEP PKIOperation at {}: {e}", self.url)))?;
        Ok(ok("PKIOperation", r)?.body)
    }
}

/// A 200 answer, or why not (5xx and 429 may pass; anything else is a refusal).
fn ok(operation: &str, r: http::Response) -> Result<http::Response, Failed> {
    if r.status == 200 {
        return Ok(r);
    }
    let transient = r.status >= 500 || r.status == 429;
    Err((
        transient,
        format!("SCEP {operation}: HTTP {}: {}", r.status, r.text(200)),
    ))
}

/// A GetCACert answer (a bare certificate, or a certs-only PKCS#7 of the CA and its RA
/// certificates) checked against the configured anchors.
pub fn ca_certs(
    body: &[u8],
    anchors: &[CertificateDer<'static>],
    caps: Caps,
) -> Result<CaInfo, String> {
    let certs = match Certificate::from_der(body) {
        Ok(c) => vec![c],
        Err(_) => certs_only(body).map_err(|e| format!("GetCACert: {e}"))?,
    };
    trusted(certs, anchors, caps)
}

/// The certificates GetCACert returned, checked against the configured anchors: the CA's
/// must be one of them; any other (an RA's) must be issued by the CA.
fn trusted(
    certs: Vec<Certificate>,
    anchors: &[CertificateDer<'static>],
    caps: Caps,
) -> Result<CaInfo, String> {
    let der = |c: &Certificate| c.to_der().unwrap_or_default();
    let ca = certs
        .iter()
        .find(|c| anchors.iter().any(|a| a.as_ref() == der(c).as_slice()))
        .cloned()
        .ok_or_else(|| {
            let names: Vec<String> = certs
                .iter()
                .map(|c| c.tbs_certificate.subject.to_string())
                .collect();
            format!(
                "GetCACert returned no certificate of ca_bundle (it returned: {}): check ca_bundle, or that the url is the right CA",
                names.join("; ")
            )
        })?;
    let mut recipient = ca.clone();
    for c in &certs {
        if der(c) == der(&ca) {
            continue;
        }
        if !signed_by(c, &ca) {
            return Err(format!(
                "GetCACert returned {} which the CA {} did not issue: refused",
                c.tbs_certificate.subject, ca.tbs_certificate.subject
            ));
        }
        recipient = c.clone();
    }
    Ok(CaInfo {
        caps,
        certs,
        recipient,
        ca,
    })
}

/// True when `issuer`'s key verifies `cert`'s signature (RSA PKCS#1 or ECDSA, SHA-2).
fn signed_by(cert: &Certificate, issuer: &Certificate) -> bool {
    use ring::signature as s;
    let alg: &dyn s::VerificationAlgorithm = match cert.signature_algorithm.oid.to_string().as_str()
    {
        "1.2.840.113549.1.1.11" => &s::RSA_PKCS1_2048_8192_SHA256,
        "1.2.840.113549.1.1.12" => &s::RSA_PKCS1_2048_8192_SHA384,
        "1.2.840.113549.1.1.13" => &s::RSA_PKCS1_2048_8192_SHA512,
        "1.2.840.10045.4.3.2" => &s::ECDSA_P256_SHA256_ASN1,
        "1.2.840.10045.4.3.3" => &s::ECDSA_P384_SHA384_ASN1,
        _ => return false,
    };
    let Ok(tbs) = cert.tbs_certificate.to_der() else {
        return false;
    };
    let key = issuer
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes();
    s::UnparsedPublicKey::new(alg, key)
        .verify(&tbs, cert.signature.raw_bytes())
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_read_by_line_and_scep_standard_implies_the_rest() {
        let c = Caps::parse("Renewal\nSHA-1\nSHA-256\nAES\nDES3\nSCEPStandard\nPOSTPKIOperation\n");
        assert_eq!(
            c,
            Caps {
                post: true,
                renewal: true,
                aes: true,
                sha256: true
            }
        );
        let c = Caps::parse("scepstandard\r\n");
        assert!(c.post && c.aes && c.sha256 && !c.renewal);
        assert_eq!(Caps::parse("DES3\nSHA-1"), Caps::default());
    }
}
