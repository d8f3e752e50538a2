//! What a key is and how it signs, as names and numbers only (no token call): key types,
//! hashes and signature algorithms. Every other module of the crate builds on these.

use sha2::Digest;
use std::str::FromStr;

/// Key types edge-signer generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// ECDSA on NIST P-256.
    EcP256,
    /// ECDSA on NIST P-384.
    EcP384,
    /// RSA with a 2048-bit modulus.
    Rsa2048,
    /// RSA with a 3072-bit modulus.
    Rsa3072,
}

/// DER of the named-curve OIDs (CKA_EC_PARAMS).
pub(crate) const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
pub(crate) const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

impl KeyType {
    /// All supported types.
    pub const ALL: [KeyType; 4] = [
        KeyType::EcP256,
        KeyType::EcP384,
        KeyType::Rsa2048,
        KeyType::Rsa3072,
    ];

    /// The name used in config and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
        }
    }

    /// True for the EC types.
    pub fn is_ec(self) -> bool {
        matches!(self, KeyType::EcP256 | KeyType::EcP384)
    }

    /// Coordinate length in bytes for EC types.
    pub fn ec_coord_len(self) -> usize {
        match self {
            KeyType::EcP384 => 48,
            _ => 32,
        }
    }

    pub(crate) fn ec_params(self) -> Option<&'static [u8]> {
        match self {
            KeyType::EcP256 => Some(P256_PARAMS),
            KeyType::EcP384 => Some(P384_PARAMS),
            _ => None,
        }
    }

    /// `CK_ULONG` is `unsigned long`: 32 bits on armhf, 64 on arm64 and amd64.
    pub(crate) fn modulus_bits(self) -> std::ffi::c_ulong {
        match self {
            KeyType::Rsa3072 => 3072,
            _ => 2048,
        }
    }
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        KeyType::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("unknown key type '{s}'; expected ec-p256, ec-p384, rsa-2048 or rsa-3072")
            })
    }
}

/// Hash functions the signers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl Hash {
    pub(crate) fn digest(self, msg: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha256 => sha2::Sha256::digest(msg).to_vec(),
            Hash::Sha384 => sha2::Sha384::digest(msg).to_vec(),
            Hash::Sha512 => sha2::Sha512::digest(msg).to_vec(),
        }
    }
    /// PSS salt length (= digest length) as a `CK_ULONG` (`unsigned long`: 32 bits on armhf).
    pub(crate) fn salt_len(self) -> std::ffi::c_ulong {
        match self {
            Hash::Sha256 => 32,
            Hash::Sha384 => 48,
            Hash::Sha512 => 64,
        }
    }

    /// Name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Hash::Sha256 => "SHA-256",
            Hash::Sha384 => "SHA-384",
            Hash::Sha512 => "SHA-512",
        }
    }

    /// Digest length in bytes.
    pub fn output_len(self) -> u64 {
        match self {
            Hash::Sha256 => 32,
            Hash::Sha384 => 48,
            Hash::Sha512 => 64,
        }
    }
}

/// A signature algorithm as the token layer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignAlg {
    /// ECDSA over the hash; `der` selects DER (X.509, TLS) or raw r||s (JWS).
    Ecdsa {
        /// Hash, computed in software (SoftHSM offers only CKM_ECDSA).
        hash: Hash,
        /// Output DER (true) or raw r||s (false).
        der: bool,
    },
    /// RSASSA-PKCS1-v1_5.
    RsaPkcs1(Hash),
    /// RSASSA-PSS with MGF1 of the same hash and salt = hash length.
    RsaPss(Hash),
}

impl SignAlg {
    /// For messages: "ECDSA with SHA-256", "RSA-PSS with SHA-384", ...
    pub fn describe(self) -> String {
        let (family, hash) = match self {
            SignAlg::Ecdsa { hash, .. } => ("ECDSA", hash),
            SignAlg::RsaPkcs1(hash) => ("RSA PKCS#1 v1.5", hash),
            SignAlg::RsaPss(hash) => ("RSA-PSS", hash),
        };
        format!("{family} with {}", hash.name())
    }

    /// The hash of the algorithm.
    pub fn hash(self) -> Hash {
        match self {
            SignAlg::Ecdsa { hash, .. } | SignAlg::RsaPkcs1(hash) | SignAlg::RsaPss(hash) => hash,
        }
    }

    /// Short mechanism family name (metrics, logs).
    pub fn mechanism_name(self) -> &'static str {
        match self {
            SignAlg::Ecdsa { .. } => "ecdsa",
            SignAlg::RsaPkcs1(_) => "rsa-pkcs1",
            SignAlg::RsaPss(_) => "rsa-pss",
        }
    }
}
