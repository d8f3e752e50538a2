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
use ring::signature;
use std::fmt;
use std::str::FromStr;

const MAGIC: &str = "edge-signer-bundle v1";
const TRUST_MAGIC: &str = "edge-signer-trust v1";
/// The same kinds bound to an audience (an `audience` header line, signed).
const MAGIC_V2: &str = "edge-signer-bundle v2";
const TRUST_MAGIC_V2: &str = "edge-signer-trust v2";

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
    /// The first line: v2 when the bundle names an audience.
    pub(crate) fn magic(self, bound: bool) -> &'static str {
        match (self, bound) {
            (BundleKind::Config, false) => MAGIC,
            (BundleKind::Trust, false) => TRUST_MAGIC,
            (BundleKind::Config, true) => MAGIC_V2,
            (BundleKind::Trust, true) => TRUST_MAGIC_V2,
        }
    }

    fn domain(self, bound: bool) -> &'static [u8] {
        match (self, bound) {
            (BundleKind::Config, false) => b"edge-signer-bundle/v1\0",
            (BundleKind::Trust, false) => b"edge-signer-trust/v1\0",
            (BundleKind::Config, true) => b"edge-signer-bundle/v2\0",
            (BundleKind::Trust, true) => b"edge-signer-trust/v2\0",
        }
    }
}

/// Who a bundle is for: a device id or a group name. Signed with the bundle, so a bundle
/// for one device or group cannot be replayed to another, whatever topic carries it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Audience {
    /// One device, by its id (`fleet.mqtt.device_id` or its identity's CN).
    Device(String),
    /// Every device of a group (`fleet.mqtt.groups`).
    Group(String),
}

impl fmt::Display for Audience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Audience::Device(d) => write!(f, "device:{d}"),
            Audience::Group(g) => write!(f, "group:{g}"),
        }
    }
}

impl FromStr for Audience {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, name) = s
            .split_once(':')
            .ok_or_else(|| format!("audience '{s}': write device:ID or group:NAME"))?;
        if !crate::names::safe_name(name) {
            return Err(format!(
                "audience '{s}': '{name}' is not a safe device id or group name"
            ));
        }
        match kind {
            "device" => Ok(Audience::Device(name.to_owned())),
            "group" => Ok(Audience::Group(name.to_owned())),
            _ => Err(format!("audience '{s}': write device:ID or group:NAME")),
        }
    }
}

/// The audience header's value, as signed.
fn audience_line(audience: &[Audience]) -> String {
    audience
        .iter()
        .map(Audience::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) const MAX_PAYLOAD: usize = 1 << 20;

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    /// Not a bundle at all.
    #[error("not an edge-signer bundle (first line must be '{MAGIC}', '{MAGIC_V2}', '{TRUST_MAGIC}' or '{TRUST_MAGIC_V2}')")]
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

/// What the signature covers: v1 `domain || version || 0 || payload`; with an audience, v2
/// `domain || version || 0 || audience line || 0 || payload`.
pub(crate) fn signed_message(
    kind: BundleKind,
    version: u64,
    audience: &[Audience],
    payload: &[u8],
) -> Vec<u8> {
    let bound = !audience.is_empty();
    let mut m = Vec::with_capacity(payload.len() + 128);
    m.extend_from_slice(kind.domain(bound));
    m.extend_from_slice(version.to_string().as_bytes());
    m.push(0);
    if bound {
        m.extend_from_slice(audience_line(audience).as_bytes());
        m.push(0);
    }
    m.extend_from_slice(payload);
    m
}

/// The header lines of a bundle up to its signature line.
pub(crate) fn header(kind: BundleKind, version: u64, audience: &[Audience]) -> String {
    let mut h = format!("{}\nversion {version}\n", kind.magic(!audience.is_empty()));
    if !audience.is_empty() {
        h += &format!("audience {}\n", audience_line(audience));
    }
    h
}

/// A parsed bundle (not yet verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Configuration or trust.
    pub kind: BundleKind,
    /// Monotonic version.
    pub version: u64,
    /// Who it is for (empty: anyone, a v1 bundle; accepted only from the local CLI and spool).
    pub audience: Vec<Audience>,
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
        let mut r = HeaderReader { rest: bytes };
        let (kind, bound) = match r.line().map_err(|_| BundleError::NotABundle)? {
            MAGIC => (BundleKind::Config, false),
            TRUST_MAGIC => (BundleKind::Trust, false),
            MAGIC_V2 => (BundleKind::Config, true),
            TRUST_MAGIC_V2 => (BundleKind::Trust, true),
            _ => return Err(BundleError::NotABundle),
        };
        let version: u64 = r
            .header("version")?
            .parse()
            .map_err(|_| BundleError::Header("version is not a whole number".into()))?;
        let audience = match bound {
            true => parse_audience(&r.header("audience")?)?,
            false => Vec::new(),
        };
        let sig_line = r.header("signature")?;
        let parts: Vec<&str> = sig_line.split(' ').collect();
        let [alg, key_id, sig_b64] = parts[..] else {
            return Err(BundleError::Header(
                "signature line must be 'signature ALG KEYID BASE64'".into(),
            ));
        };
        let signature = B64
            .decode(sig_b64)
            .map_err(|_| BundleError::Header("signature is not base64".into()))?;
        let payload = r.payload()?;
        Ok(Bundle {
            kind,
            version,
            audience,
            alg: alg.to_owned(),
            key_id: key_id.to_owned(),
            signature,
            payload,
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
            &signed_message(self.kind, self.version, &self.audience, &self.payload),
            &self.signature,
        ) {
            Ok(key)
        } else {
            Err(BundleError::BadSignature(key.key_id()))
        }
    }

    /// Whether the audience names this device (its id) or one of its groups; a bundle
    /// without an audience names nobody.
    pub fn addressed_to(&self, device: Option<&str>, groups: &[String]) -> bool {
        self.audience.iter().any(|a| match a {
            Audience::Device(d) => Some(d.as_str()) == device,
            Audience::Group(g) => groups.contains(g),
        })
    }

    /// The payload as text.
    pub fn payload_str(&self) -> Result<&str, BundleError> {
        std::str::from_utf8(&self.payload)
            .map_err(|_| BundleError::Header("payload is not UTF-8".into()))
    }
}

/// The header lines of a bundle, read one at a time, then its payload.
struct HeaderReader<'a> {
    rest: &'a [u8],
}

impl<'a> HeaderReader<'a> {
    fn line(&mut self) -> Result<&'a str, BundleError> {
        let end = self
            .rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or(BundleError::Truncated {
                expected: 0,
                got: 0,
            })?;
        let l = std::str::from_utf8(&self.rest[..end])
            .map_err(|_| BundleError::Header("not UTF-8".into()))?;
        self.rest = &self.rest[end + 1..];
        Ok(l)
    }

    /// The value of the next line, which must be `key value`.
    fn header(&mut self, key: &str) -> Result<String, BundleError> {
        let l = self.line()?;
        l.strip_prefix(key)
            .and_then(|v| v.strip_prefix(' '))
            .map(str::to_owned)
            .ok_or_else(|| {
                BundleError::Header(format!(
                    "expected '{key} ...', found '{}'",
                    l.chars().take(60).collect::<String>()
                ))
            })
    }

    /// `payload-length N`, an empty line, and exactly N bytes.
    fn payload(&mut self) -> Result<Vec<u8>, BundleError> {
        let expected: usize = self
            .header("payload-length")?
            .parse()
            .map_err(|_| BundleError::Header("payload-length is not a whole number".into()))?;
        if expected > MAX_PAYLOAD {
            return Err(BundleError::Header(format!(
                "payload of {expected} bytes is larger than {MAX_PAYLOAD}"
            )));
        }
        if !self.line()?.is_empty() {
            return Err(BundleError::Header(
                "expected an empty line before the payload".into(),
            ));
        }
        let rest = self.rest;
        if rest.len() < expected {
            return Err(BundleError::Truncated {
                expected,
                got: rest.len(),
            });
        }
        if rest.len() > expected {
            return Err(BundleError::TrailingBytes(rest.len() - expected));
        }
        Ok(rest.to_vec())
    }
}

/// The `audience` line's names: 1 to 256 devices or groups.
fn parse_audience(line: &str) -> Result<Vec<Audience>, BundleError> {
    let names = line
        .split(' ')
        .map(str::parse)
        .collect::<Result<Vec<Audience>, String>>()
        .map_err(BundleError::Header)?;
    if names.is_empty() || names.len() > 256 {
        return Err(BundleError::Header(
            "audience must name 1 to 256 devices or groups".into(),
        ));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signer::{pem, FleetSigner};
    use proptest::prelude::*;
    use ring::rand::SystemRandom;

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
