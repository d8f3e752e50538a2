//! Signed fleet bundles: a version, a TOML payload and a signature by a pinned fleet key.
//!
//! Format (text header, then the payload bytes exactly):
//! ```text
//! edge-signer-bundle v1
//! version 42
//! signature ed25519 1a2b3c4d <base64 signature>
//! payload-length 1234
//!
//! <payload: 1234 bytes of TOML>
//! ```
//! The signature covers `"edge-signer-bundle/v1\0" || version in decimal || "\0" || payload`:
//! the version is bound to the payload, and the bytes cannot be taken for anything else.
//!
//! A *trust bundle* (`edge-signer-trust v1`, signed over `"edge-signer-trust/v1\0" || ...`)
//! has the same layout; its payload names the fleet keys that replace the trusted set
//! (see `trust.rs`). The two domains differ, so a configuration bundle's signature can
//! never pass as a trust bundle's, nor the other way round.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, KeyPair};
use std::fmt;
use std::str::FromStr;

const MAGIC: &str = "edge-signer-bundle v1";
const TRUST_MAGIC: &str = "edge-signer-trust v1";

/// What a bundle carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BundleKind {
    /// A fleet configuration layer (TOML).
    Config,
    /// A replacement for the trusted fleet key set.
    Trust,
}

impl BundleKind {
    fn magic(self) -> &'static str {
        match self {
            BundleKind::Config => MAGIC,
            BundleKind::Trust => TRUST_MAGIC,
        }
    }

    fn domain(self) -> &'static [u8] {
        match self {
            BundleKind::Config => b"edge-signer-bundle/v1\0",
            BundleKind::Trust => b"edge-signer-trust/v1\0",
        }
    }
}
const MAX_PAYLOAD: usize = 1 << 20;

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    /// Not a bundle at all.
    #[error("not an edge-signer bundle (first line must be '{MAGIC}' or '{TRUST_MAGIC}')")]
    NotABundle,
    /// A header line is wrong.
    #[error("bundle header: {0}")]
    Header(String),
    /// Fewer payload bytes than the header announced.
    #[error("bundle is truncated: header announces {expected} payload bytes, file has {got}")]
    Truncated {
        /// Announced.
        expected: usize,
        /// Present.
        got: usize,
    },
    /// More bytes than announced.
    #[error("bundle has {0} bytes after the announced payload")]
    TrailingBytes(usize),
    /// Signed by a key that is not pinned in the firmware.
    #[error("bundle is signed by fleet key {key_id}, which is not trusted on this device (trusted: {trusted}); the set comes from fleet.trusted_keys in the firmware defaults, or from the newest applied trust bundle")]
    UnknownKey {
        /// The key id in the bundle.
        key_id: String,
        /// Trusted key ids.
        trusted: String,
    },
    /// The signature does not verify.
    #[error(
        "bundle signature does not verify with fleet key {0}: the bundle was forged or altered"
    )]
    BadSignature(String),
    /// A fleet key or private key could not be used.
    #[error("fleet key: {0}")]
    Key(String),
}

/// A fleet public key: `ed25519:<base64 32 bytes>` or `p256:<base64 uncompressed point>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FleetKey {
    /// Ed25519 public key.
    Ed25519(Vec<u8>),
    /// ECDSA P-256 public key (uncompressed point).
    P256(Vec<u8>),
}

impl FleetKey {
    fn bytes(&self) -> &[u8] {
        match self {
            FleetKey::Ed25519(b) | FleetKey::P256(b) => b,
        }
    }
    /// `ed25519` or `p256`.
    pub fn alg(&self) -> &'static str {
        match self {
            FleetKey::Ed25519(_) => "ed25519",
            FleetKey::P256(_) => "p256",
        }
    }
    /// Short id: the first 4 bytes of SHA-256 of the public key, hex.
    pub fn key_id(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, self.bytes());
        d.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
    /// The JWS `alg` of this key: `EdDSA` or `ES256`.
    pub fn jws_alg(&self) -> &'static str {
        match self {
            FleetKey::Ed25519(_) => "EdDSA",
            FleetKey::P256(_) => "ES256",
        }
    }

    /// Verify a JWS signature (Ed25519, or ES256 as raw r||s) over `msg`.
    pub fn verify_jws(&self, msg: &[u8], sig: &[u8]) -> bool {
        let alg: &dyn signature::VerificationAlgorithm = match self {
            FleetKey::Ed25519(_) => &signature::ED25519,
            FleetKey::P256(_) => &signature::ECDSA_P256_SHA256_FIXED,
        };
        signature::UnparsedPublicKey::new(alg, self.bytes())
            .verify(msg, sig)
            .is_ok()
    }

    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        let alg: &dyn signature::VerificationAlgorithm = match self {
            FleetKey::Ed25519(_) => &signature::ED25519,
            FleetKey::P256(_) => &signature::ECDSA_P256_SHA256_ASN1,
        };
        signature::UnparsedPublicKey::new(alg, self.bytes())
            .verify(msg, sig)
            .is_ok()
    }
}

impl FromStr for FleetKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (alg, b64) = s
            .split_once(':')
            .ok_or_else(|| format!("fleet key '{s}': expected ed25519:BASE64 or p256:BASE64"))?;
        let bytes = B64
            .decode(b64.trim())
            .map_err(|e| format!("fleet key '{s}': bad base64 ({e})"))?;
        match (alg, bytes.len()) {
            ("ed25519", 32) => Ok(FleetKey::Ed25519(bytes)),
            ("p256", 65) if bytes[0] == 4 => Ok(FleetKey::P256(bytes)),
            ("ed25519" | "p256", n) => Err(format!(
                "fleet key '{s}': {n} bytes is the wrong length for {alg}"
            )),
            _ => Err(format!(
                "fleet key '{s}': unknown algorithm '{alg}' (ed25519 or p256)"
            )),
        }
    }
}

impl fmt::Display for FleetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.alg(), B64.encode(self.bytes()))
    }
}

fn signed_message(kind: BundleKind, version: u64, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(payload.len() + 48);
    m.extend_from_slice(kind.domain());
    m.extend_from_slice(version.to_string().as_bytes());
    m.push(0);
    m.extend_from_slice(payload);
    m
}

/// A parsed bundle (not yet verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Configuration or trust.
    pub kind: BundleKind,
    /// Monotonic version.
    pub version: u64,
    /// `ed25519` or `p256`.
    pub alg: String,
    /// Key id of the signer.
    pub key_id: String,
    /// Signature bytes.
    pub signature: Vec<u8>,
    /// TOML payload.
    pub payload: Vec<u8>,
}

impl Bundle {
    /// Parse the file format. Never panics on any input.
    pub fn parse(bytes: &[u8]) -> Result<Bundle, BundleError> {
        let mut rest = bytes;
        let mut line = || -> Result<&str, BundleError> {
            let end = rest
                .iter()
                .position(|b| *b == b'\n')
                .ok_or(BundleError::Truncated {
                    expected: 0,
                    got: 0,
                })?;
            let l = std::str::from_utf8(&rest[..end])
                .map_err(|_| BundleError::Header("not UTF-8".into()))?;
            rest = &rest[end + 1..];
            Ok(l)
        };
        let kind = match line().map_err(|_| BundleError::NotABundle)? {
            MAGIC => BundleKind::Config,
            TRUST_MAGIC => BundleKind::Trust,
            _ => return Err(BundleError::NotABundle),
        };
        let header = |l: &str, key: &str| -> Result<String, BundleError> {
            l.strip_prefix(key)
                .and_then(|v| v.strip_prefix(' '))
                .map(str::to_owned)
                .ok_or_else(|| {
                    BundleError::Header(format!(
                        "expected '{key} ...', found '{}'",
                        l.chars().take(60).collect::<String>()
                    ))
                })
        };
        let version: u64 = header(line()?, "version")?
            .parse()
            .map_err(|_| BundleError::Header("version is not a whole number".into()))?;
        let sig_line = header(line()?, "signature")?;
        let parts: Vec<&str> = sig_line.split(' ').collect();
        let [alg, key_id, sig_b64] = parts[..] else {
            return Err(BundleError::Header(
                "signature line must be 'signature ALG KEYID BASE64'".into(),
            ));
        };
        let signature = B64
            .decode(sig_b64)
            .map_err(|_| BundleError::Header("signature is not base64".into()))?;
        let expected: usize = header(line()?, "payload-length")?
            .parse()
            .map_err(|_| BundleError::Header("payload-length is not a whole number".into()))?;
        if expected > MAX_PAYLOAD {
            return Err(BundleError::Header(format!(
                "payload of {expected} bytes is larger than {MAX_PAYLOAD}"
            )));
        }
        if !line()?.is_empty() {
            return Err(BundleError::Header(
                "expected an empty line before the payload".into(),
            ));
        }
        if rest.len() < expected {
            return Err(BundleError::Truncated {
                expected,
                got: rest.len(),
            });
        }
        if rest.len() > expected {
            return Err(BundleError::TrailingBytes(rest.len() - expected));
        }
        Ok(Bundle {
            kind,
            version,
            alg: alg.to_owned(),
            key_id: key_id.to_owned(),
            signature,
            payload: rest.to_vec(),
        })
    }

    /// Check the signature against the trusted keys.
    pub fn verify<'k>(&self, trusted: &'k [FleetKey]) -> Result<&'k FleetKey, BundleError> {
        let key = trusted
            .iter()
            .find(|k| k.key_id() == self.key_id && k.alg() == self.alg)
            .ok_or_else(|| BundleError::UnknownKey {
                key_id: format!("{} {}", self.alg, self.key_id),
                trusted: if trusted.is_empty() {
                    "none".into()
                } else {
                    trusted
                        .iter()
                        .map(|k| format!("{} {}", k.alg(), k.key_id()))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            })?;
        if key.verify(
            &signed_message(self.kind, self.version, &self.payload),
            &self.signature,
        ) {
            Ok(key)
        } else {
            Err(BundleError::BadSignature(key.key_id()))
        }
    }

    /// The payload as text.
    pub fn payload_str(&self) -> Result<&str, BundleError> {
        std::str::from_utf8(&self.payload)
            .map_err(|_| BundleError::Header("payload is not UTF-8".into()))
    }
}

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

impl FleetSigner {
    /// A new Ed25519 key: returns (PKCS#8 PEM of the private key, public key).
    pub fn generate_ed25519() -> Result<(String, FleetKey), BundleError> {
        let pkcs8 = signature::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| BundleError::Key("key generation failed".into()))?;
        let signer = FleetSigner::from_pkcs8(pkcs8.as_ref())?;
        Ok((pem("PRIVATE KEY", pkcs8.as_ref()), signer.public()))
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

    /// Produce a configuration bundle file.
    pub fn sign(&self, version: u64, payload: &[u8]) -> Result<Vec<u8>, BundleError> {
        self.sign_kind(BundleKind::Config, version, payload)
    }

    /// Produce a bundle file of either kind.
    pub fn sign_kind(
        &self,
        kind: BundleKind,
        version: u64,
        payload: &[u8],
    ) -> Result<Vec<u8>, BundleError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(BundleError::Header(format!(
                "payload larger than {MAX_PAYLOAD} bytes"
            )));
        }
        let msg = signed_message(kind, version, payload);
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
            "{}\nversion {version}\nsignature {} {} {}\npayload-length {}\n\n",
            kind.magic(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn signer() -> (FleetSigner, FleetKey) {
        let (pem, public) = FleetSigner::generate_ed25519().unwrap();
        (FleetSigner::from_pem(&pem).unwrap(), public)
    }

    #[test]
    fn sign_parse_verify() {
        let (s, public) = signer();
        assert_eq!(s.public(), public);
        let b = s.sign(7, b"[log]\nlevel = \"debug\"\n").unwrap();
        let parsed = Bundle::parse(&b).unwrap();
        assert_eq!(parsed.version, 7);
        parsed.verify(std::slice::from_ref(&public)).unwrap();
        assert_eq!(public.to_string().parse::<FleetKey>().unwrap(), public);
    }

    #[test]
    fn p256_keys_sign_too() {
        let rng = SystemRandom::new();
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &rng,
        )
        .unwrap();
        let s = FleetSigner::from_pem(&pem("PRIVATE KEY", pkcs8.as_ref())).unwrap();
        let b = s.sign(1, b"x = 1").unwrap();
        Bundle::parse(&b).unwrap().verify(&[s.public()]).unwrap();
    }

    #[test]
    fn each_failure_has_its_own_error() {
        let (s, public) = signer();
        let (_, other) = signer();
        let good = s.sign(3, b"[log]\nlevel = \"info\"\n").unwrap();
        // Forged: payload altered, length kept.
        let mut forged = good.clone();
        let n = forged.len();
        forged[n - 3] ^= 1;
        assert!(matches!(
            Bundle::parse(&forged)
                .unwrap()
                .verify(std::slice::from_ref(&public)),
            Err(BundleError::BadSignature(_))
        ));
        // Wrong key.
        assert!(matches!(
            Bundle::parse(&good).unwrap().verify(&[other]),
            Err(BundleError::UnknownKey { .. })
        ));
        // Truncated.
        assert!(matches!(
            Bundle::parse(&good[..good.len() - 5]),
            Err(BundleError::Truncated { .. })
        ));
        assert!(matches!(
            Bundle::parse(&good[..10]),
            Err(BundleError::NotABundle)
        ));
        // Version altered: the signature covers it.
        let text = String::from_utf8(good.clone())
            .unwrap()
            .replace("version 3", "version 4");
        assert!(matches!(
            Bundle::parse(text.as_bytes()).unwrap().verify(&[public]),
            Err(BundleError::BadSignature(_))
        ));
        assert_eq!(Bundle::parse(b"hello\n"), Err(BundleError::NotABundle));
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Bundle::parse(&bytes);
        }

        #[test]
        fn header_mutations_never_panic(cut in 0usize..200, flip in 0usize..200, payload in "\\PC{0,50}") {
            let (s, public) = signer();
            let mut b = s.sign(9, payload.as_bytes()).unwrap();
            if flip < b.len() { b[flip] ^= 0x20; }
            b.truncate(b.len().saturating_sub(cut % 8));
            if let Ok(p) = Bundle::parse(&b) { let _ = p.verify(std::slice::from_ref(&public)); }
        }

        #[test]
        fn fleet_key_parser_never_panics(s in "\\PC{0,80}") {
            let _ = s.parse::<FleetKey>();
        }
    }
}
