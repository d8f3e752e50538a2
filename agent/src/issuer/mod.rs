//! One trait, one file per backend. The lifecycle engine sees `Issuer`, never EST, portal or
//! the JWK rotation API, ACME or SCEP.
//!
//! Two flows go through it: a *certificate* flow (a CSR goes out, a chain comes back: portal,
//! EST) and a *credential* flow (the issuer holds our public key itself and confirms a
//! rotation: the JWK API). The engine asks `flow()` once and drives the steps that apply.

pub mod acme;
pub mod est;
pub mod jwk_rotation;
pub mod portal;
pub mod scep;

use crate::clock::Unix;
use hsm_shim::rustls::pki_types::CertificateDer;
use hsm_shim::rustls::sign::CertifiedKey;
use hsm_shim::{KeyInfo, TokenKey};
use std::path::Path;
use std::sync::Arc;

/// What an issuer enrols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// A CSR goes out, a certificate chain comes back.
    Certificate,
    /// The issuer holds the public key; a rotation is confirmed, no certificate.
    Credential,
}

/// A credential rotation, fixed (kid, exact body) and persisted before anything is sent.
#[derive(Debug, Clone)]
pub struct Credential<'a> {
    /// The new key's id at the API.
    pub kid: &'a str,
    /// The exact request body.
    pub body: &'a str,
    /// The current key, which authorises the rotation.
    pub signer: &'a TokenKey,
    /// Its kid.
    pub signer_kid: &'a str,
}

/// What the engine hands an issuer.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Identity name.
    pub identity: &'a str,
    /// Generation number.
    pub generation: u32,
    /// PKCS#10, PEM (certificate flow).
    pub csr_pem: &'a str,
    /// SPKI DER of the new key (to recognise its certificate).
    pub spki: &'a [u8],
    /// The current identity while it is valid (EST re-enrols over mTLS with it).
    pub current: Option<Arc<CertifiedKey>>,
    /// The new key (certificate flow: SCEP signs its messages with it and opens the answer).
    pub key: Option<&'a TokenKey>,
    /// The current identity's key while it is valid (SCEP signs a RenewalReq with it).
    pub current_key: Option<TokenKey>,
    /// The rotation to send (credential flow).
    pub credential: Option<Credential<'a>>,
}

/// What an issuer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssuerAnswer {
    /// Accepted: come back later (`until`), with what is awaited for `status`. A wait the
    /// server asked for (EST `Retry-After`) is persisted and honoured by every process.
    Wait {
        /// When to ask again.
        until: Unix,
        /// What is awaited, for a person.
        what: String,
    },
    /// The certificate chain (PEM, leaf first, extra certificates after it).
    Issued(String),
    /// A credential API applied the rotation (JWK: 201 Created).
    Confirmed,
    /// The server may or may not have acted (answer lost after sending): find out, never guess.
    Unknown(String),
    /// Refused for good: this request can never succeed (a new key and request are needed).
    Rejected(String),
    /// Could not reach it; retry the same request with backoff.
    Unreachable(String),
}

/// A submission the issuer accepted: its reference, and what the server already answered
/// (persisted by the engine before the next step, so a restart never submits twice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// Issuer-specific reference, kept in the register.
    pub reference: String,
    /// An answer that came with the submission (EST 200 chain or 202 wait, JWK 201).
    pub answer: Option<IssuerAnswer>,
}

/// The answer of a verification call made with one key alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: the server accepts this key now.
    Accepted,
    /// 401/403: the server does not accept this key.
    Refused(String),
    /// No usable answer (network, 5xx, timeout).
    NoAnswer(String),
    /// No verification endpoint is configured.
    NotConfigured,
}

/// A credential rotation's request, fixed before sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The exact body.
    pub body: String,
    /// When the new credential expires.
    pub expires: Unix,
    /// When the old one stops being accepted.
    pub previous_expiry: Unix,
}

/// A CA or credential API.
pub trait Issuer: Send {
    /// Which flow this issuer takes.
    fn flow(&self) -> Flow {
        Flow::Certificate
    }
    /// Submit. Called once per generation and request: the engine records that it is
    /// sending before it calls, and resumes from the register after a crash.
    fn submit(&mut self, req: &Request, now: Unix) -> Result<Submitted, IssuerAnswer>;
    /// Ask about a submission.
    fn poll(&mut self, req: &Request, reference: &str, now: Unix) -> IssuerAnswer;
    /// True when the identity's key must also decrypt (SCEP: the CA encrypts its answer to
    /// it), so the engine makes it with `CKA_DECRYPT`.
    fn key_decrypts(&self) -> bool {
        false
    }
    /// How often this issuer is polled by its configuration (`poll_interval`), when that is
    /// the only thing that says when to look again (not a server's Retry-After).
    fn poll_interval(&self) -> Option<u64> {
        None
    }
    /// The CA certificates issued chains must reach (trust anchors).
    fn ca_bundle(&self) -> &[CertificateDer<'static>];
    /// Intermediate CA certificates the issuer published (EST `/cacerts`), for chain building.
    fn intermediates(&self) -> Vec<CertificateDer<'static>> {
        Vec::new()
    }
    /// Credential flow: fix the request for a new key (`kid` never used before).
    fn prepare(
        &self,
        _key: &KeyInfo,
        _kid: &str,
        _now: Unix,
        _current_not_after: Option<Unix>,
    ) -> Result<Prepared, String> {
        Err("this issuer enrols certificates, not credentials".into())
    }
    /// The CA account this issuer keeps (ACME), for the engine to hold in the register.
    fn account(&self) -> Option<crate::register::CaAccount> {
        None
    }
    /// The account the register holds for this issuer, given back when the engine starts.
    fn restore_account(&mut self, _account: Option<crate::register::CaAccount>) {}
    /// Move the CA account to a new token key (ACME keyChange); returns the new key's
    /// thumbprint.
    fn rollover_account(&mut self) -> Result<String, String> {
        Err("this issuer has no account key".into())
    }
    /// Tell the CA that the certificate `chain_pem` (leaf first) is revoked. `Ok(false)`:
    /// this issuer has no revocation to ask for (the register and the token are all).
    fn revoke(&mut self, _chain_pem: &str) -> Result<bool, String> {
        Ok(false)
    }
    /// Credential flow: a call authenticated by `key` alone, to learn whether the server
    /// accepts it now.
    fn verify(&mut self, _key: &TokenKey, _kid: &str, _url: Option<&str>) -> Verdict {
        Verdict::NotConfigured
    }
}

/// The DER of a PEM CSR.
pub fn csr_der(pem: &str) -> Result<Vec<u8>, String> {
    use hsm_shim::rustls::pki_types::{pem::PemObject, CertificateSigningRequestDer};
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.as_ref().to_vec())
        .map_err(|e| format!("CSR PEM: {e}"))
}

/// Build the issuer for a config entry (`state_dir` holds what an issuer pins, e.g. EST's
/// `/cacerts`).
pub fn from_config(
    cfg: &firmware_config::schema::IssuerConfig,
    token: &Arc<hsm_shim::Token>,
    state_dir: &Path,
) -> crate::error::Result<Box<dyn Issuer>> {
    use firmware_config::schema::IssuerConfig;
    match cfg {
        IssuerConfig::Portal(p) => Ok(Box::new(portal::Portal::new(p)?)),
        IssuerConfig::Est(e) => Ok(Box::new(est::Est::new(e, token, state_dir)?)),
        IssuerConfig::JwkRotation(j) => Ok(Box::new(jwk_rotation::JwkApi::new(j)?)),
        IssuerConfig::Acme(a) => Ok(Box::new(acme::Acme::new(a, token)?)),
        IssuerConfig::Scep(sc) => Ok(Box::new(scep::Scep::new(sc)?)),
    }
}
