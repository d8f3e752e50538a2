//! rustls 0.23 `SigningKey` over a token key: the TLS identity never leaves the token.

use crate::keys::KeyType;
use crate::sign::{Hash, SignAlg, TokenKey};
use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use std::sync::{Arc, Mutex};

/// How a handshake signature is run. rustls signs synchronously, inside the task that drives
/// the handshake: a server on an async runtime passes a function that tells the runtime
/// first (a TPM takes milliseconds), so that the worker's other tasks move on.
pub type SignRunner = fn(&mut dyn FnMut());

/// A rustls signing key backed by the token.
#[derive(Debug, Clone)]
pub struct TlsSigningKey {
    key: TokenKey,
    /// The scheme chosen in the last handshake, for diagnostics (`probe` prints it).
    last_scheme: Arc<Mutex<Option<SignatureScheme>>>,
    runner: SignRunner,
}

/// The default runner: sign right here.
fn inline(call: &mut dyn FnMut()) {
    call()
}

impl TlsSigningKey {
    /// Wrap a token key.
    pub fn new(key: TokenKey) -> Self {
        TlsSigningKey {
            key,
            last_scheme: Arc::default(),
            runner: inline,
        }
    }

    /// Run each handshake signature through `runner` (see [`SignRunner`]).
    pub fn with_runner(mut self, runner: SignRunner) -> Self {
        self.runner = runner;
        self
    }

    /// The signature scheme picked in the most recent handshake, if any.
    pub fn last_scheme(&self) -> Option<SignatureScheme> {
        *self.last_scheme.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Schemes this key offers, best first. RSA prefers PSS (the only choice in TLS 1.3)
    /// and falls back to PKCS#1 v1.5 for TLS 1.2 peers that offer only that.
    pub fn schemes(key_type: KeyType) -> &'static [SignatureScheme] {
        match key_type {
            KeyType::EcP256 => &[SignatureScheme::ECDSA_NISTP256_SHA256],
            KeyType::EcP384 => &[SignatureScheme::ECDSA_NISTP384_SHA384],
            KeyType::Rsa2048 | KeyType::Rsa3072 => &[
                SignatureScheme::RSA_PSS_SHA256,
                SignatureScheme::RSA_PSS_SHA384,
                SignatureScheme::RSA_PSS_SHA512,
                SignatureScheme::RSA_PKCS1_SHA256,
                SignatureScheme::RSA_PKCS1_SHA384,
                SignatureScheme::RSA_PKCS1_SHA512,
            ],
        }
    }
}

/// The token algorithm for a TLS scheme.
pub fn sign_alg(scheme: SignatureScheme) -> Option<SignAlg> {
    Some(match scheme {
        SignatureScheme::ECDSA_NISTP256_SHA256 => SignAlg::Ecdsa {
            hash: Hash::Sha256,
            der: true,
        },
        SignatureScheme::ECDSA_NISTP384_SHA384 => SignAlg::Ecdsa {
            hash: Hash::Sha384,
            der: true,
        },
        SignatureScheme::RSA_PSS_SHA256 => SignAlg::RsaPss(Hash::Sha256),
        SignatureScheme::RSA_PSS_SHA384 => SignAlg::RsaPss(Hash::Sha384),
        SignatureScheme::RSA_PSS_SHA512 => SignAlg::RsaPss(Hash::Sha512),
        SignatureScheme::RSA_PKCS1_SHA256 => SignAlg::RsaPkcs1(Hash::Sha256),
        SignatureScheme::RSA_PKCS1_SHA384 => SignAlg::RsaPkcs1(Hash::Sha384),
        SignatureScheme::RSA_PKCS1_SHA512 => SignAlg::RsaPkcs1(Hash::Sha512),
        _ => return None,
    })
}

impl SigningKey for TlsSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        // Only schemes the token can make: a scheme chosen here that the token then refuses
        // would fail the handshake instead of falling back to the next one.
        let scheme = Self::schemes(self.key.key_type())
            .iter()
            .filter(|s| sign_alg(**s).is_some_and(|a| self.key.supports(a)))
            .find(|s| offered.contains(s))?;
        *self.last_scheme.lock().unwrap_or_else(|p| p.into_inner()) = Some(*scheme);
        Some(Box::new(TlsSigner {
            key: self.key.clone(),
            scheme: *scheme,
            alg: sign_alg(*scheme)?,
            runner: self.runner,
        }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(
            self.key.info().spki.as_slice(),
        ))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        if self.key.key_type().is_ec() {
            SignatureAlgorithm::ECDSA
        } else {
            SignatureAlgorithm::RSA
        }
    }
}

#[derive(Debug)]
struct TlsSigner {
    key: TokenKey,
    scheme: SignatureScheme,
    alg: SignAlg,
    runner: SignRunner,
}

impl Signer for TlsSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let mut out = None;
        (self.runner)(&mut || out = Some(self.key.sign(self.alg, message)));
        let signed = out.unwrap_or_else(|| {
            Err(crate::Error::InvalidRequest(
                "the signature runner never ran the signature".into(),
            ))
        });
        signed.map_err(|e| rustls::Error::General(format!("token signature failed: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// A rustls `CertifiedKey` for the token key and a chain, refused when the leaf
/// certificate does not carry this key's public key.
pub fn certified_key(
    key: TlsSigningKey,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
) -> Result<Arc<rustls::sign::CertifiedKey>, crate::Error> {
    if chain.is_empty() {
        return Err(crate::Error::InvalidRequest(
            "an empty certificate chain".into(),
        ));
    }
    let ck = rustls::sign::CertifiedKey::new(chain, Arc::new(key));
    ck.keys_match()
        .map_err(|e| crate::Error::KeyCertMismatch(e.to_string()))?;
    Ok(Arc::new(ck))
}
