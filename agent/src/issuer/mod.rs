//! One trait, one file per backend. The lifecycle engine sees `Issuer`, never EST or portal.

pub mod est;
pub mod jwk_rotation;
pub mod portal;

use crate::clock::Unix;
use hsm_shim::rustls::pki_types::CertificateDer;
use hsm_shim::rustls::sign::CertifiedKey;
use std::sync::Arc;

/// What the engine hands an issuer.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Identity name.
    pub identity: &'a str,
    /// Generation number.
    pub generation: u32,
    /// PKCS#10, PEM.
    pub csr_pem: &'a str,
    /// SPKI DER of the new key (to recognise its certificate).
    pub spki: &'a [u8],
    /// The current identity while it is valid (EST re-enrols over mTLS with it).
    pub current: Option<Arc<CertifiedKey>>,
}

/// What an issuer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Accepted: come back later (`until`), with what is awaited for `status`.
    Wait {
        /// When to ask again.
        until: Unix,
        /// What is awaited, for a person.
        what: String,
    },
    /// The certificate chain (PEM, leaf first).
    Issued(String),
    /// Refused for good (the CSR must change).
    Rejected(String),
    /// Could not reach it; retry with backoff.
    Unreachable(String),
}

/// A CA or credential API.
pub trait Issuer: Send {
    /// Submit the CSR. Must be idempotent for one (identity, generation): the engine submits
    /// again after a crash. Returns a reference kept in the register, or the answer.
    fn submit(&mut self, req: &Request, now: Unix) -> Result<String, Answer>;
    /// Ask about a submission.
    fn poll(&mut self, req: &Request, reference: &str, now: Unix) -> Answer;
    /// The CA certificates issued chains must reach.
    fn ca_bundle(&self) -> &[CertificateDer<'static>];
}

/// Build the issuer for a config entry.
pub fn from_config(
    cfg: &firmware_config::schema::IssuerConfig,
    token: &Arc<hsm_shim::Token>,
) -> anyhow::Result<Box<dyn Issuer>> {
    use firmware_config::schema::IssuerConfig;
    match cfg {
        IssuerConfig::Portal(p) => Ok(Box::new(portal::Portal::new(p)?)),
        IssuerConfig::Est(e) => Ok(Box::new(est::Est::new(e, token)?)),
        other => anyhow::bail!(
            "issuer '{}': kind {} is not supported by this build yet (portal and est are)",
            other.name(),
            other.kind()
        ),
    }
}
