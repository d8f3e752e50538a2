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

use crate::clock::{rfc3339, Unix};
use crate::http::{self, Url};
use hsm_shim::jws::{b64url, sign_compact, JwsAlg};
use hsm_shim::{KeyInfo, TokenKey};
use std::sync::Arc;
use std::time::Duration;

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

/// The request body, byte for byte what is signed and sent (and re-sent on retry).
pub fn request_body(jwk: &serde_json::Value, expiration: Unix, current_key_expiry: Unix) -> String {
    // serde_json keeps insertion order only with a feature; write the object by hand.
    format!(
        "{{\"PublicKey\":{},\"Expiration\":\"{}\",\"CurrentKeyExpiry\":\"{}\"}}",
        serde_json::to_string(jwk).unwrap_or_default(),
        rfc3339(expiration),
        rfc3339(current_key_expiry)
    )
}

/// A new `kid` (a random UUID) never used before by this identity. `EDGE_SIGNER_TEST_KID_CANDIDATES`
/// (comma separated) is tried first, so tests can offer kids the register already holds.
pub fn new_kid(used: &[String]) -> String {
    let candidates: Vec<String> = std::env::var("EDGE_SIGNER_TEST_KID_CANDIDATES")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    for c in candidates {
        if !c.is_empty() && !used.contains(&c) {
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
        let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
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

/// What the API said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 201 (or 200): the new key is the credential now.
    Rotated,
    /// 4xx: refused; the kid is spent, the new key is useless.
    Refused(String),
    /// Network, 5xx, lost answer: send the same request again later.
    Retry(String),
}

/// Send the rotation, signed by the current key.
pub fn rotate(
    cfg: &firmware_config::schema::JwkIssuer,
    current: &TokenKey,
    current_kid: &str,
    kid: &str,
    body: &str,
) -> Outcome {
    let jws = match sign_compact(current, JwsAlg::Es256, current_kid, body.as_bytes()) {
        Ok(j) => j,
        Err(e) => return Outcome::Retry(format!("signing with the current key failed: {e}")),
    };
    let url = match Url::parse(&format!(
        "{}/api/v1/keys/credential/rotate-to/{kid}",
        cfg.url.trim_end_matches('/')
    )) {
        Ok(u) => u,
        Err(e) => return Outcome::Refused(e.to_string()),
    };
    let roots = match crate::tlsconf::load_roots(&cfg.ca_bundle) {
        Ok(r) => r,
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    let tls = match crate::tlsconf::client_config(None, roots, crate::tlsconf::TlsVersions::Any) {
        Ok(t) => t,
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    let req = http::Request {
        method: "PUT",
        headers: vec![
            ("Content-Type", "application/json".into()),
            ("Authorization", format!("JWS {jws}")),
        ],
        body: body.as_bytes(),
    };
    match http::request(Arc::new(tls), &url, &req, Duration::from_secs(30)) {
        Ok(r) if r.status == 201 || r.status == 200 => Outcome::Rotated,
        Ok(r) if (400..500).contains(&r.status) => {
            Outcome::Refused(format!("HTTP {}: {}", r.status, r.text(300).trim()))
        }
        Ok(r) => Outcome::Retry(format!("HTTP {}: {}", r.status, r.text(300).trim())),
        Err(e) => Outcome::Retry(format!(
            "no answer ({e}); the same kid {kid} will be sent again"
        )),
    }
}
