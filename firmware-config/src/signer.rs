//! The fleet operator's side of bundles: a signing key (Ed25519 or P-256 PKCS#8, held by
//! the operator, never by a device) that writes bundle files (format in `bundle.rs`).

use crate::bundle::{signed_message, Audience, BundleError, BundleKind, FleetKey, MAX_PAYLOAD};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, KeyPair};

/// A fleet signing key (PKCS#8), held by the fleet operator, never by a device.
pub enum FleetSigner {
    /// Ed25519.
    Ed25519(signature::Ed25519KeyPair),
    /// ECDSA P-256.
    P256(signature::EcdsaKeyPair),
}

fn pem_body(pem: &str) -> Result<Vec<u8>, BundleError> {
    let mut inside = false;
    let mut b64 = String::new();
    for l in pem.lines() {
        let l = l.trim();
        if l.starts_with("-----BEGIN ") {
            inside = true;
        } else if l.starts_with("-----END ") {
            return B64
                .decode(&b64)
                .map_err(|e| BundleError::Key(format!("bad PEM body: {e}")));
        } else if inside {
            b64.push_str(l);
        }
    }
    Err(BundleError::Key("no PEM block found".into()))
}

/// ring writes Ed25519 keys as PKCS#8 v2 (RFC 8410 `OneAsymmetricKey` with the public key),
/// which Debian 12's OpenSSL 3.0 does not read; the v1 form (the 32-byte seed alone) every
/// tool reads, ring included. The seed is the `CurvePrivateKey` OCTET STRING (04 20) inside
/// the `privateKey` OCTET STRING (04 22).
fn pkcs8_v1(v2: &[u8]) -> Result<Vec<u8>, BundleError> {
    const V1: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let at = v2
        .windows(4)
        .position(|w| w == [0x04, 0x22, 0x04, 0x20])
        .ok_or_else(|| BundleError::Key("unexpected Ed25519 PKCS#8 layout from ring".into()))?;
    let seed = v2
        .get(at + 4..at + 36)
        .ok_or_else(|| BundleError::Key("truncated Ed25519 PKCS#8 from ring".into()))?;
    Ok([&V1[..], seed].concat())
}

impl FleetSigner {
    /// A new Ed25519 key: returns (PKCS#8 PEM of the private key, public key).
    pub fn generate_ed25519() -> Result<(String, FleetKey), BundleError> {
        let pkcs8 = signature::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| BundleError::Key("key generation failed".into()))?;
        let signer = FleetSigner::from_pkcs8(pkcs8.as_ref())?;
        Ok((
            pem("PRIVATE KEY", &pkcs8_v1(pkcs8.as_ref())?),
            signer.public(),
        ))
    }

    /// A signer from a PKCS#8 PEM file's text (Ed25519 or P-256).
    pub fn from_pem(text: &str) -> Result<FleetSigner, BundleError> {
        FleetSigner::from_pkcs8(&pem_body(text)?)
    }

    fn from_pkcs8(der: &[u8]) -> Result<FleetSigner, BundleError> {
        if let Ok(k) = signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            return Ok(FleetSigner::Ed25519(k));
        }
        signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            der,
            &SystemRandom::new(),
        )
        .map(FleetSigner::P256)
        .map_err(|_| BundleError::Key("not an Ed25519 or P-256 PKCS#8 private key".into()))
    }

    /// The public key to pin in firmware.
    pub fn public(&self) -> FleetKey {
        match self {
            FleetSigner::Ed25519(k) => FleetKey::Ed25519(k.public_key().as_ref().to_vec()),
            FleetSigner::P256(k) => FleetKey::P256(k.public_key().as_ref().to_vec()),
        }
    }

    /// A JWS signature over `msg` (EdDSA, or ES256 as raw r||s).
    pub fn sign_jws(&self, msg: &[u8]) -> Result<Vec<u8>, BundleError> {
        match self {
            FleetSigner::Ed25519(k) => Ok(k.sign(msg).as_ref().to_vec()),
            FleetSigner::P256(_) => Err(BundleError::Key(
                "technician tokens are signed with Ed25519 keys (edge-signer fleet keygen)".into(),
            )),
        }
    }

    /// Produce a configuration bundle file (no audience).
    pub fn sign(&self, version: u64, payload: &[u8]) -> Result<Vec<u8>, BundleError> {
        self.sign_kind(BundleKind::Config, version, &[], payload)
    }

    /// Produce a bundle file of either kind, bound to `audience` when it names anyone.
    pub fn sign_kind(
        &self,
        kind: BundleKind,
        version: u64,
        audience: &[Audience],
        payload: &[u8],
    ) -> Result<Vec<u8>, BundleError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(BundleError::Header(format!(
                "payload larger than {MAX_PAYLOAD} bytes"
            )));
        }
        let msg = signed_message(kind, version, audience, payload);
        let sig = match self {
            FleetSigner::Ed25519(k) => k.sign(&msg).as_ref().to_vec(),
            FleetSigner::P256(k) => k
                .sign(&SystemRandom::new(), &msg)
                .map_err(|_| BundleError::Key("signing failed".into()))?
                .as_ref()
                .to_vec(),
        };
        let public = self.public();
        let mut out = format!(
            "{}signature {} {} {}\npayload-length {}\n\n",
            crate::bundle::header(kind, version, audience),
            public.alg(),
            public.key_id(),
            B64.encode(sig),
            payload.len()
        )
        .into_bytes();
        out.extend_from_slice(payload);
        Ok(out)
    }
}

/// PEM-encode.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out + &format!("-----END {label}-----\n")
}
