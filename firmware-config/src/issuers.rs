//! `[[issuer]]`: the CAs and credential APIs, one struct per `kind`.

use crate::units::Duration;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `[[issuer]]`, by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum IssuerConfig {
    /// EST (RFC 7030).
    Est(EstIssuer),
    /// A drop folder: CSR out, certificate in (a person uses a portal in between).
    Portal(PortalIssuer),
    /// JWK credential rotation API.
    JwkRotation(JwkIssuer),
    /// ACME (RFC 8555).
    Acme(AcmeIssuer),
    /// SCEP (RFC 8894).
    Scep(ScepIssuer),
}

impl IssuerConfig {
    /// The issuer's name.
    pub fn name(&self) -> &str {
        match self {
            IssuerConfig::Est(i) => &i.name,
            IssuerConfig::Portal(i) => &i.name,
            IssuerConfig::JwkRotation(i) => &i.name,
            IssuerConfig::Acme(i) => &i.name,
            IssuerConfig::Scep(i) => &i.name,
        }
    }
    /// The kind as written in config.
    pub fn kind(&self) -> &'static str {
        match self {
            IssuerConfig::Est(_) => "est",
            IssuerConfig::Portal(_) => "portal",
            IssuerConfig::JwkRotation(_) => "jwk-rotation",
            IssuerConfig::Acme(_) => "acme",
            IssuerConfig::Scep(_) => "scep",
        }
    }
}

/// `kind = "est"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EstIssuer {
    /// Name.
    pub name: String,
    /// Base URL, e.g. `https://est.example:8443` (the `/.well-known/est` prefix is added).
    pub url: String,
    /// Optional EST label (`/.well-known/est/<label>/...`).
    #[serde(default)]
    pub label: Option<String>,
    /// CA bundle that the EST server and issued chains must chain to.
    pub ca_bundle: PathBuf,
    /// Bootstrap credential for first enrolment and lapse recovery.
    #[serde(default)]
    pub bootstrap: Option<EstBootstrap>,
    /// How long one EST request may take.
    #[serde(default = "default_est_timeout")]
    pub timeout: Duration,
}

fn default_est_timeout() -> Duration {
    Duration(30)
}

/// Bootstrap credential: HTTP basic credentials and/or a client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EstBootstrap {
    /// HTTP basic user name.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the HTTP basic password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Bootstrap client certificate (PEM).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Bootstrap client key: a `pkcs11:` URI.
    #[serde(default)]
    pub key: Option<String>,
}

/// `kind = "portal"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalIssuer {
    /// Name.
    pub name: String,
    /// Where CSRs are written for a person to upload.
    pub outbox: PathBuf,
    /// Where issued certificates are dropped (any file name; matched by public key).
    pub inbox: PathBuf,
    /// CA bundle issued certificates must chain to.
    pub ca_bundle: PathBuf,
    /// How often the inbox is looked at.
    #[serde(default = "default_poll")]
    pub poll_interval: Duration,
}

fn default_poll() -> Duration {
    Duration::minutes(5)
}

/// `kind = "jwk-rotation"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwkIssuer {
    /// Name.
    pub name: String,
    /// API base URL.
    pub url: String,
    /// CA bundle of the API's server certificate.
    pub ca_bundle: PathBuf,
    /// `Expiration` of a new key, at most 365 days.
    #[serde(default = "default_new_key_lifetime")]
    pub new_key_lifetime: Duration,
    /// `CurrentKeyExpiry` of the old key, at most 14 days (24 to 72 h recommended).
    #[serde(default = "default_old_key_overlap")]
    pub old_key_overlap: Duration,
}

fn default_new_key_lifetime() -> Duration {
    Duration::days(365)
}

fn default_old_key_overlap() -> Duration {
    Duration::hours(48)
}

/// An ACME challenge type the agent answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Challenge {
    /// `http-01`: the daemon serves the key authorization on `http01_listen`.
    #[serde(rename = "http-01")]
    Http01,
    /// `tls-alpn-01` (RFC 8737): the daemon answers `acme-tls/1` on `tls_alpn01_listen`.
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// `dns-01`: `dns01_hook` sets the TXT record.
    #[serde(rename = "dns-01")]
    Dns01,
}

impl Challenge {
    /// As ACME names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Challenge::Http01 => "http-01",
            Challenge::TlsAlpn01 => "tls-alpn-01",
            Challenge::Dns01 => "dns-01",
        }
    }
}

/// `kind = "acme"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeIssuer {
    /// Name.
    pub name: String,
    /// The directory URL, e.g. `https://ca.example/acme/directory`.
    pub directory: String,
    /// CA bundle issued chains must chain to.
    pub ca_bundle: PathBuf,
    /// CA bundle of the ACME server's own HTTPS certificate (default: `ca_bundle`).
    #[serde(default)]
    pub server_ca: Option<PathBuf>,
    /// Challenges answered, most preferred first.
    #[serde(default = "default_challenges")]
    pub challenges: Vec<Challenge>,
    /// Where `http-01` answers are served (the CA connects to port 80 of the name, or the
    /// port it is told).
    #[serde(default = "default_http01")]
    pub http01_listen: String,
    /// Where `tls-alpn-01` answers are served (port 443 of the name, or the port it is told).
    #[serde(default = "default_tls_alpn01")]
    pub tls_alpn01_listen: String,
    /// Command that sets (`set NAME VALUE`) and clears (`clear NAME VALUE`) a `dns-01` TXT
    /// record; run with a clean environment.
    #[serde(default)]
    pub dns01_hook: Option<PathBuf>,
    /// How long the hook may run.
    #[serde(default = "default_hook_timeout")]
    pub dns01_hook_timeout: Duration,
    /// External account binding, for CAs that require it.
    #[serde(default)]
    pub eab: Option<AcmeEab>,
    /// Of the chains the CA offers (the default and its `Link: rel="alternate"` ones), take
    /// the one whose top certificate was issued by the CA with this common name.
    #[serde(default)]
    pub preferred_chain: Option<String>,
    /// `mailto:` contacts of the account.
    #[serde(default)]
    pub contact: Vec<String>,
    /// Key type of the account key (made in the token on first use).
    #[serde(default = "default_account_key", with = "key_type")]
    pub account_key_type: hsm_shim::KeyType,
    /// How long one ACME request may take.
    #[serde(default = "default_est_timeout")]
    pub timeout: Duration,
}

fn default_challenges() -> Vec<Challenge> {
    vec![Challenge::Http01, Challenge::TlsAlpn01]
}

fn default_http01() -> String {
    "0.0.0.0:80".into()
}

fn default_tls_alpn01() -> String {
    "0.0.0.0:443".into()
}

fn default_hook_timeout() -> Duration {
    Duration(60)
}

fn default_account_key() -> hsm_shim::KeyType {
    hsm_shim::KeyType::EcP256
}

/// External account binding: the key id and the HMAC key the CA gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeEab {
    /// The key id.
    pub key_id: String,
    /// File holding the HMAC key (base64url, as CAs hand it out).
    pub hmac_file: PathBuf,
}

/// `kind = "scep"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScepIssuer {
    /// Name.
    pub name: String,
    /// The SCEP URL, `http://` or `https://`, e.g.
    /// `http://ndes.example/certsrv/mscep/mscep.dll`.
    pub url: String,
    /// The CA certificates: what GetCACert returns must be one of them or issued by one (an
    /// RA certificate), and issued chains must chain to them.
    pub ca_bundle: PathBuf,
    /// CA bundle of the server's HTTPS certificate, for an `https://` URL (default:
    /// `ca_bundle`).
    #[serde(default)]
    pub server_ca: Option<PathBuf>,
    /// The challenge password of a first enrolment: `{ file = ".." }` or
    /// `{ credential = ".." }`. Not needed when the CA renews with the current certificate.
    #[serde(default)]
    pub challenge: Option<crate::secret::PinConfig>,
    /// How often a pending request is asked about (CertPoll).
    #[serde(default = "default_scep_poll")]
    pub poll_interval: Duration,
    /// Accept 3DES and SHA-1 (with a warning) from a CA that offers nothing better.
    #[serde(default)]
    pub allow_legacy_crypto: bool,
    /// Accept an answer whose envelope is single DES (it carries only the issued
    /// certificate; the agent never encrypts with DES). Off: such an answer is refused.
    #[serde(default)]
    pub allow_des_answer: bool,
    /// How long one SCEP request may take.
    #[serde(default = "default_est_timeout")]
    pub timeout: Duration,
}

fn default_scep_poll() -> Duration {
    Duration::minutes(10)
}

/// A key type as the configuration writes it (`ec-p256`, `rsa-2048`, ...).
mod key_type {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &hsm_shim::KeyType, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(k)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<hsm_shim::KeyType, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}
