//! `[tls]` and a proxy route's `kx`: which key exchange groups the agent offers, in order of
//! preference. The default puts the post-quantum hybrid first and keeps classic groups for
//! servers that do not know it; a list without `X25519MLKEM768` is classic-only.

use serde::{Deserialize, Serialize};

/// A TLS key exchange group, by its IANA name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KxGroup {
    /// X25519 with ML-KEM-768 (post-quantum hybrid, TLS 1.3 only).
    #[serde(rename = "X25519MLKEM768")]
    X25519Mlkem768,
    /// X25519.
    #[serde(rename = "X25519")]
    X25519,
    /// NIST P-256.
    #[serde(rename = "secp256r1")]
    Secp256r1,
    /// NIST P-384.
    #[serde(rename = "secp384r1")]
    Secp384r1,
}

impl KxGroup {
    /// Whether it resists a quantum computer (the hybrid).
    pub fn post_quantum(self) -> bool {
        self == KxGroup::X25519Mlkem768
    }
}

/// The default order: `["X25519MLKEM768", "X25519", "secp256r1", "secp384r1"]`. P-384 stays
/// last: over TLS 1.2 the supported groups also name the curves a peer accepts for ECDSA
/// certificates, so without it an `ec-p384` identity is refused by TLS 1.2 servers.
pub fn default_kx() -> Vec<KxGroup> {
    vec![
        KxGroup::X25519Mlkem768,
        KxGroup::X25519,
        KxGroup::Secp256r1,
        KxGroup::Secp384r1,
    ]
}

/// `[tls]`: the agent's own TLS connections (EST, JWK API, MQTT, probes) and the default of
/// every proxy route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Key exchange groups offered, most preferred first.
    pub kx: Vec<KxGroup>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig { kx: default_kx() }
    }
}
