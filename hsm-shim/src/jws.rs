//! Compact JWS (RFC 7515) signed in the token: ES256/ES384 with raw r||s, RS256, PS256.

use crate::error::{Error, Result};
use crate::keys::KeyType;
use crate::sign::{Hash, SignAlg, TokenKey};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// JWS algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwsAlg {
    /// ECDSA P-256 SHA-256, raw r||s.
    Es256,
    /// ECDSA P-384 SHA-384, raw r||s.
    Es384,
    /// RSASSA-PKCS1-v1_5 SHA-256.
    Rs256,
    /// RSASSA-PSS SHA-256.
    Ps256,
}

impl JwsAlg {
    /// The `alg` header value.
    pub fn name(self) -> &'static str {
        match self {
            JwsAlg::Es256 => "ES256",
            JwsAlg::Es384 => "ES384",
            JwsAlg::Rs256 => "RS256",
            JwsAlg::Ps256 => "PS256",
        }
    }

    /// The natural algorithm for a key type (RSA: RS256).
    pub fn for_key(kt: KeyType) -> JwsAlg {
        match kt {
            KeyType::EcP256 => JwsAlg::Es256,
            KeyType::EcP384 => JwsAlg::Es384,
            _ => JwsAlg::Rs256,
        }
    }

    fn sign_alg(self) -> SignAlg {
        match self {
            JwsAlg::Es256 => SignAlg::Ecdsa {
                hash: Hash::Sha256,
                der: false,
            },
            JwsAlg::Es384 => SignAlg::Ecdsa {
                hash: Hash::Sha384,
                der: false,
            },
            JwsAlg::Rs256 => SignAlg::RsaPkcs1(Hash::Sha256),
            JwsAlg::Ps256 => SignAlg::RsaPss(Hash::Sha256),
        }
    }
}

/// base64url without padding.
pub fn b64url(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// The public JWK of a token key (RFC 7517/7518), members in the order RFC 7638 hashes them.
pub fn public_jwk(info: &crate::keys::KeyInfo) -> Result<serde_json::Value> {
    let bad = || Error::InvalidRequest(format!("cannot read the public key of {}", info.label));
    let p = &info.public_bits;
    let (crv, len) = match info.key_type {
        KeyType::EcP256 => ("P-256", 32),
        KeyType::EcP384 => ("P-384", 48),
        KeyType::Rsa2048 | KeyType::Rsa3072 => {
            let (n, e) = crate::asn1::rsa_public_parts(p).ok_or_else(bad)?;
            return Ok(serde_json::json!({"e": b64url(&e), "kty": "RSA", "n": b64url(&n)}));
        }
    };
    if p.len() != 1 + 2 * len || p[0] != 4 {
        return Err(bad());
    }
    Ok(serde_json::json!({
        "crv": crv, "kty": "EC", "x": b64url(&p[1..1 + len]), "y": b64url(&p[1 + len..]),
    }))
}

/// The RFC 7638 thumbprint of a public JWK from [`public_jwk`]: SHA-256 over its required
/// members in lexicographic order, no whitespace, base64url.
pub fn thumbprint(jwk: &serde_json::Value) -> String {
    use sha2::Digest;
    // serde_json's map keeps keys sorted, which is RFC 7638's order.
    b64url(&sha2::Sha256::digest(jwk.to_string().as_bytes()))
}

/// A flattened JSON JWS (RFC 7515 §7.2.2), as ACME sends it: `protected` gets `alg` added,
/// the token signs `BASE64URL(protected) '.' BASE64URL(payload)`; an empty payload is
/// ACME's POST-as-GET.
pub fn sign_flattened(
    key: &TokenKey,
    alg: JwsAlg,
    mut protected: serde_json::Map<String, serde_json::Value>,
    payload: &[u8],
) -> Result<serde_json::Value> {
    check_alg(key, alg)?;
    protected.insert("alg".into(), alg.name().into());
    let p64 = b64url(serde_json::Value::Object(protected).to_string().as_bytes());
    let pl64 = b64url(payload);
    let sig = key.sign(alg.sign_alg(), format!("{p64}.{pl64}").as_bytes())?;
    Ok(serde_json::json!({"protected": p64, "payload": pl64, "signature": b64url(&sig)}))
}

/// Sign `payload` as a compact JWS with protected header `{"alg":..,"kid":..}`.
/// The signature covers `BASE64URL(header) || '.' || BASE64URL(payload)` (RFC 7515 §5.1).
pub fn sign_compact(key: &TokenKey, alg: JwsAlg, kid: &str, payload: &[u8]) -> Result<String> {
    let signing_input = signing_input(key, alg, kid, payload)?;
    let sig = key.sign(alg.sign_alg(), signing_input.as_bytes())?;
    Ok(format!("{signing_input}.{}", b64url(&sig)))
}

/// What a JWS signature covers, once `alg` fits the key.
fn signing_input(key: &TokenKey, alg: JwsAlg, kid: &str, payload: &[u8]) -> Result<String> {
    check_alg(key, alg)?;
    let header = serde_json::json!({ "alg": alg.name(), "kid": kid });
    Ok(format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(payload)
    ))
}

/// `alg` fits the key.
fn check_alg(key: &TokenKey, alg: JwsAlg) -> Result<()> {
    let compatible = matches!(
        (alg, key.key_type()),
        (JwsAlg::Es256, KeyType::EcP256)
            | (JwsAlg::Es384, KeyType::EcP384)
            | (
                JwsAlg::Rs256 | JwsAlg::Ps256,
                KeyType::Rsa2048 | KeyType::Rsa3072
            )
    );
    if !compatible {
        return Err(Error::InvalidRequest(format!(
            "JWS {} with a {} key",
            alg.name(),
            key.key_type()
        )));
    }
    Ok(())
}
