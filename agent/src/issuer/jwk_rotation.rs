//! API credential rotation with JWKs.
//!
//! `PUT {url}/api/v1/keys/credential/rotate-to/{kid}` with `Content-Type: application/json`,
//! `Authorization: JWS <compact JWS>` and the body
//! `{"PublicKey":{"Kty":"EC","Kid":..,"Use":"sig","Crv":"P-256","X":..,"Y":..},"Expiration":"..Z","CurrentKeyExpiry":"..Z"}`.
//!
//! What the JWS covers: it is a compact JWS (RFC 7515) made with the CURRENT key, protected
//! header `{"alg":"ES256","kid":"<current kid>"}`, whose payload is the exact request body
//! bytes. The signature covers `BASE64URL(header) || "." || BASE64URL(body)`, so the new key,
//! both dates and (through the body's `Kid`) the URL's kid are all bound to the current key.
//!
//! The contract promises no idempotent replay: once a rotation is applied, the same PUT again
//! is refused (the kid is used, the old key is no longer current). So a rotation is sent
//! once. When its outcome is unknown (answer lost, timeout, crash after sending), the engine
//! asks [`Issuer::verify`]: a `GET` of the identity's `probe_url` carrying
//! `Authorization: JWS` made by one key alone (header `{"alg":"ES256","kid":..}`, payload
//! `{"url":"<probe_url>","iat":<unix time>}`); 2xx means the API accepts that key now.

use super::{Issuer, IssuerAnswer, Prepared, Request, Submitted, Verdict};
use crate::clock::{rfc3339, Unix};
use crate::http;
use hsm_shim::jws::{b64url, sign_compact, JwsAlg};
use hsm_shim::rustls::pki_types::CertificateDer;
use hsm_shim::{KeyInfo, TokenKey};
use std::sync::Arc;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

/// The public JWK of an EC P-256 key, with the field names the API uses.
pub fn public_jwk(info: &KeyInfo, kid: &str) -> Result<serde_json::Value, String> {
    let p = &info.public_bits;
    if info.key_type != hsm_shim::KeyType::EcP256 || p.len() != 65 || p[0] != 4 {
        return Err(format!(
            "the API takes EC P-256 keys; this key is {}",
            info.key_type
        ));
    }
    Ok(serde_json::json!({
        "Kty": "EC", "Kid": kid, "Use": "sig", "Crv": "P-256",
        "X": b64url(&p[1..33]), "Y": b64url(&p[33..65]),
    }))
}

/// The request body, byte for byte what is signed and sent.
pub fn request_body(jwk: &serde_json::Value, expiration: Unix, current_key_expiry: Unix) -> String {
    // serde_json keeps insertion order only with a feature; write the object by hand.
    format!(
        "{{\"PublicKey\":{},\"Expiration\":\"{}\",\"CurrentKeyExpiry\":\"{}\"}}",
        serde_json::to_string(jwk).unwrap_or_default(),
        rfc3339(expiration),
        rfc3339(current_key_expiry)
    )
}

/// A new `kid` (a random UUID) never used before by this identity.
pub fn new_kid(used: &[String]) -> String {
    #[cfg(feature = "test-hooks")]
    {
        // Tests offer kids the register already holds, to prove they are skipped.
        let candidates: Vec<String> = std::env::var("EDGE_SIGNER_TEST_KID_CANDIDATES")
            .map(|v| v.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        if let Some(c) = candidates
            .into_iter()
            .find(|c| !c.is_empty() && !used.contains(c))
        {
            return c;
        }
    }
    loop {
        let mut b = [0u8; 16];
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            let _ = std::io::Read::read_exact(&mut f, &mut b);
        }
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h = hsm_shim::keys::hex(&b);
        let kid = format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        );
        if !used.contains(&kid) {
            return kid;
        }
    }
}

/// The rotation API.
pub struct JwkApi {
    name: String,
    base: http::Url,
    ca: Vec<CertificateDer<'static>>,
    new_key_lifetime: u64,
    old_key_overlap: u64,
}

impl JwkApi {
    /// From config; reads the CA bundle now so a wrong path is reported at start.
    pub fn new(cfg: &firmware_config::schema::JwkIssuer) -> crate::error::Result<JwkApi> {
        Ok(JwkApi {
            name: cfg.name.clone(),
            base: http::parse_https(&cfg.url)?,
            ca: crate::tlsconf::load_certs(&cfg.ca_bundle)?,
            new_key_lifetime: cfg.new_key_lifetime.secs(),
            old_key_overlap: cfg.old_key_overlap.secs(),
        })
    }

    fn call(
        &self,
        url: &http::Url,
        req: &http::Request,
    ) -> Result<http::Response, http::HttpError> {
        let roots = crate::tlsconf::roots_of(&self.ca).map_err(|e| http::HttpError::NotSent {
            stage: "CA bundle",
            detail: e.to_string(),
        })?;
        let tls = crate::tlsconf::client_config(None, roots, crate::tlsconf::TlsVersions::Any)
            .map_err(|e| http::HttpError::NotSent {
                stage: "TLS configuration",
                detail: e.to_string(),
            })?;
        http::request(Arc::new(tls), url, req, TIMEOUT)
    }
}

impl Issuer for JwkApi {
    fn flow(&self) -> super::Flow {
        super::Flow::Credential
    }

    fn prepare(
        &self,
        key: &KeyInfo,
        kid: &str,
        now: Unix,
        current_not_after: Option<Unix>,
    ) -> Result<Prepared, String> {
        let jwk = public_jwk(key, kid)?;
        let expires = now + self.new_key_lifetime;
        let previous_expiry =
            (now + self.old_key_overlap).min(current_not_after.unwrap_or(u64::MAX));
        Ok(Prepared {
            body: request_body(&jwk, expires, previous_expiry),
            expires,
            previous_expiry,
        })
    }

    /// The PUT, once. 201/200: confirmed. A 4xx to this first sending: refused (the kid is
    /// spent). Never reached the server: refused too, so the key and kid are dropped and the
    /// next attempt starts clean. Anything after the request may have arrived: unknown.
    fn submit(&mut self, req: &Request, _now: Unix) -> Result<Submitted, IssuerAnswer> {
        let Some(c) = &req.credential else {
            return Err(IssuerAnswer::Rejected(
                "no rotation request was prepared".into(),
            ));
        };
        let jws = sign_compact(c.signer, JwsAlg::Es256, c.signer_kid, c.body.as_bytes())
            .map_err(|e| IssuerAnswer::Unreachable(format!("signing with the current key: {e}")))?;
        let url = self
            .base
            .join(&["api", "v1", "keys", "credential", "rotate-to", c.kid]);
        let hreq = http::Request {
            method: "PUT",
            headers: vec![
                ("Content-Type", "application/json".into()),
                ("Authorization", format!("JWS {jws}")),
            ],
            body: c.body.as_bytes(),
        };
        let reference = c.kid.to_owned();
        match self.call(&url, &hreq) {
            Ok(r) if r.status == 201 || r.status == 200 => Ok(Submitted {
                reference,
                answer: Some(IssuerAnswer::Confirmed),
            }),
            Ok(r) if (400..500).contains(&r.status) => Err(IssuerAnswer::Rejected(format!(
                "{} refused the rotation to {}: HTTP {}: {}",
                self.name,
                c.kid,
                r.status,
                r.text(300).trim()
            ))),
            Ok(r) => Ok(Submitted {
                reference,
                answer: Some(IssuerAnswer::Unknown(format!(
                    "{} answered HTTP {}: {}",
                    self.name,
                    r.status,
                    r.text(300).trim()
                ))),
            }),
            Err(e) if !e.maybe_sent() => Err(IssuerAnswer::Rejected(format!(
                "{} could not be reached ({e}); the rotation to {} never left, so that kid and its key are dropped and the next attempt uses new ones",
                self.name, c.kid
            ))),
            Err(e) => Ok(Submitted {
                reference,
                answer: Some(IssuerAnswer::Unknown(format!(
                    "the rotation to {} was sent but no answer came ({e})",
                    c.kid
                ))),
            }),
        }
    }

    fn poll(&mut self, _req: &Request, _reference: &str, _now: Unix) -> IssuerAnswer {
        IssuerAnswer::Unknown("the rotation API has nothing to poll; verify with the keys".into())
    }

    fn ca_bundle(&self) -> &[CertificateDer<'static>] {
        &self.ca
    }

    fn verify(&mut self, key: &TokenKey, kid: &str, url: Option<&str>) -> Verdict {
        let Some(url) = url else {
            return Verdict::NotConfigured;
        };
        let u = match http::parse_https(url) {
            Ok(u) => u,
            Err(e) => return Verdict::NoAnswer(e.to_string()),
        };
        let now = crate::clock::Clock::now(&crate::clock::SystemClock);
        let payload = serde_json::json!({ "url": url, "iat": now }).to_string();
        let jws = match sign_compact(key, JwsAlg::Es256, kid, payload.as_bytes()) {
            Ok(j) => j,
            Err(e) => return Verdict::NoAnswer(format!("signing with {kid}: {e}")),
        };
        let req = http::Request {
            method: "GET",
            headers: vec![("Authorization", format!("JWS {jws}"))],
            body: &[],
        };
        match self.call(&u, &req) {
            Ok(r) if (200..300).contains(&r.status) => Verdict::Accepted,
            Ok(r) if r.status == 401 || r.status == 403 => {
                Verdict::Refused(format!("HTTP {}: {}", r.status, r.text(200).trim()))
            }
            Ok(r) => Verdict::NoAnswer(format!("HTTP {}: {}", r.status, r.text(200).trim())),
            Err(e) => Verdict::NoAnswer(e.to_string()),
        }
    }
}
