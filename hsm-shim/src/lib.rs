//! hsm-shim: the only crate of edge-signer that speaks PKCS#11.
//!
//! Keys are generated inside a token and never leave it. This crate opens the token
//! (module loaded once per path, slot by label or serial, PIN in zeroizing memory, a pool of
//! sessions), asks the token what it can do (mechanisms, key sizes) instead of assuming
//! SoftHSM, manages key pairs and certificate objects by `CKA_ID`, prints and parses RFC 7512
//! URIs, and signs for rustls (TLS), rcgen (CSRs) and JWS. Tested on SoftHSM and on
//! tpm2-pkcs11 over a simulated TPM.
#![deny(missing_docs)]

pub mod alg;
mod asn1;
pub mod csr;
pub mod error;
pub mod jws;
pub mod keys;
pub mod mechanisms;
pub mod pin;
mod protection;
pub mod sign;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod token;
pub mod uri;

pub use asn1::{ec_point_unwrap, ecdsa_der_to_raw, ecdsa_raw_to_der};
pub use error::{Error, Result};
pub use keys::{KeyInfo, KeyRef, KeyType};
pub use mechanisms::Mechanisms;
pub use pin::{Pin, PinSource};
pub use protection::PrivateKeyProtection;
pub use sign::{Hash, SignAlg, TokenKey};
pub use tls::TlsSigningKey;
pub use token::{Token, TokenSelector, TokenSummary};
pub use uri::Pkcs11Uri;

/// Re-exported so callers name the same rustls.
pub use rustls;

/// PEM-encode DER with a label.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
