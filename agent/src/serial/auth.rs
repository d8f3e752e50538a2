//! Technician tokens: a compact JWS signed by a technician key pinned in the firmware layer
//! (`serial.technician_keys`), bound to this device's serial and this session's nonce,
//! naming the commands it allows, valid for at most an hour.
//!
//! Header `{"alg":"EdDSA"|"ES256","kid":KEYID}`; claims
//! `{"sub":DEVICE,"nonce":NONCE,"allow":["rotate",...],"iat":T,"exp":T}`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use firmware_config::{FleetKey, FleetSigner};

/// The longest a token may live (exp - iat).
pub const MAX_LIFETIME: u64 = 3600;
/// Clock skew tolerated on `iat`.
const SKEW: u64 = 300;

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Commands allowed (`rotate`, `retire`, `apply-bundle`, `collect`).
    pub allow: Vec<String>,
    /// Until when.
    pub exp: u64,
    /// The technician key that signed it.
    pub key_id: String,
}

/// Why a token was refused; each case its own code and text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not three base64url parts with JSON inside.
    #[error("not a technician token: {0}")]
    Malformed(String),
    /// Signed by a key not pinned on this device.
    #[error("token signed by technician key {0}, which is not pinned in serial.technician_keys")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("token signature does not verify: forged or altered")]
    BadSignature,
    /// Past its expiry.
    #[error("token expired at {0}; make a new one (edge-signer diag token)")]
    Expired(String),
    /// Longer-lived than allowed, or issued in the future.
    #[error("token lifetime {0}s is not within 1..={MAX_LIFETIME}s of its issue time")]
    Lifetime(u64),
    /// For another device.
    #[error("token is for device '{0}', this is '{1}'")]
    OtherDevice(String, String),
    /// For another session.
    #[error(
        "token is for another session (nonce {0}): replayed or stale; use this session's nonce {1}"
    )]
    OtherSession(String, String),
}

impl AuthError {
    /// The protocol error code.
    pub fn code(&self) -> u16 {
        match self {
            AuthError::Malformed(_) => 400,
            _ => 401,
        }
    }
}

#[derive(serde::Deserialize, serde::Serialize)]
struct Header {
    alg: String,
    kid: String,
}

#[derive(serde::Deserialize, serde::Serialize)]
struct Claims {
    sub: String,
    nonce: String,
    allow: Vec<String>,
    iat: u64,
    exp: u64,
}

fn part<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T, AuthError> {
    let bytes = B64URL
        .decode(s)
        .map_err(|_| AuthError::Malformed(format!("{what} is not base64url")))?;
    serde_json::from_slice(&bytes).map_err(|e| AuthError::Malformed(format!("{what}: {e}")))
}

/// Check `token` for this device and session at `now`.
pub fn check(
    token: &str,
    pinned: &[FleetKey],
    device: &str,
    nonce: &str,
    now: u64,
) -> Result<Grant, AuthError> {
    let mut it = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(AuthError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let header: Header = part(h, "header")?;
    let claims: Claims = part(p, "claims")?;
    let sig = B64URL
        .decode(s)
        .map_err(|_| AuthError::Malformed("signature is not base64url".into()))?;
    let key = pinned
        .iter()
        .find(|k| k.key_id() == header.kid && k.jws_alg() == header.alg)
        .ok_or_else(|| AuthError::UnknownKey(format!("{} {}", header.alg, header.kid)))?;
    if !key.verify_jws(format!("{h}.{p}").as_bytes(), &sig) {
        return Err(AuthError::BadSignature);
    }
    if claims.sub != device {
        return Err(AuthError::OtherDevice(claims.sub, device.to_owned()));
    }
    if claims.nonce != nonce {
        return Err(AuthError::OtherSession(claims.nonce, nonce.to_owned()));
    }
    let life = claims.exp.saturating_sub(claims.iat);
    if life == 0 || life > MAX_LIFETIME || claims.iat > now + SKEW {
        return Err(AuthError::Lifetime(life));
    }
    if claims.exp <= now {
        return Err(AuthError::Expired(crate::clock::rfc3339(claims.exp)));
    }
    Ok(Grant {
        allow: claims.allow,
        exp: claims.exp,
        key_id: header.kid,
    })
}

/// Make a token (on the technician's laptop, `edge-signer diag token`).
pub fn issue(
    key: &FleetSigner,
    device: &str,
    nonce: &str,
    allow: &[String],
    now: u64,
    lifetime: u64,
) -> crate::error::Result<String> {
    crate::ensure!(
        (1..=MAX_LIFETIME).contains(&lifetime),
        "a token lives 1 s to 1 h"
    );
    let public = key.public();
    let h = B64URL.encode(serde_json::to_vec(&Header {
        alg: public.jws_alg().into(),
        kid: public.key_id(),
    })?);
    let p = B64URL.encode(serde_json::to_vec(&Claims {
        sub: device.into(),
        nonce: nonce.into(),
        allow: allow.to_vec(),
        iat: now,
        exp: now + lifetime,
    })?);
    let sig = key.sign_jws(format!("{h}.{p}").as_bytes())?;
    Ok(format!("{h}.{p}.{}", B64URL.encode(sig)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> (FleetSigner, FleetKey) {
        let (pem, public) = FleetSigner::generate_ed25519().unwrap();
        (FleetSigner::from_pem(&pem).unwrap(), public)
    }

    #[test]
    fn each_wrong_token_has_its_own_error() {
        let (k, pk) = key();
        let (other, _) = key();
        let allow = vec!["rotate".to_string()];
        let now = 1_800_000_000;
        let good = issue(&k, "SN1", "n1", &allow, now, 900).unwrap();
        let g = check(&good, std::slice::from_ref(&pk), "SN1", "n1", now + 10).unwrap();
        assert_eq!(g.allow, allow);
        let pinned = [pk];
        let e = |t: &str, dev, nonce, at| check(t, &pinned, dev, nonce, at).unwrap_err();
        assert!(matches!(
            e(&good, "SN1", "n1", now + 901),
            AuthError::Expired(_)
        ));
        assert!(matches!(
            e(&good, "SN2", "n1", now),
            AuthError::OtherDevice(..)
        ));
        assert!(matches!(
            e(&good, "SN1", "n2", now),
            AuthError::OtherSession(..)
        ));
        let foreign = issue(&other, "SN1", "n1", &allow, now, 900).unwrap();
        assert!(matches!(
            e(&foreign, "SN1", "n1", now),
            AuthError::UnknownKey(_)
        ));
        let mut forged = good.clone();
        forged.replace_range(forged.len() - 4.., "AAAA");
        assert!(matches!(
            e(&forged, "SN1", "n1", now),
            AuthError::BadSignature
        ));
        assert!(issue(&k, "SN1", "n1", &allow, now, 7200).is_err());
        assert!(matches!(
            e("a.b", "SN1", "n1", now),
            AuthError::Malformed(_)
        ));
    }

    proptest! {
        #[test]
        fn token_check_never_panics(s in "[A-Za-z0-9_.-]{0,300}") {
            let (_, pk) = key();
            let _ = check(&s, &[pk], "SN1", "n1", 0);
        }
    }
}
