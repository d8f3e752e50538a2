//! CSRs signed in the token (rcgen 0.14 `SigningKey`), and the subject/SAN types behind them.

use crate::error::{Error, Result};
use crate::keys::KeyType;
use crate::sign::{Hash, SignAlg, TokenKey};
use std::net::IpAddr;

/// rcgen signing key over a token key. rcgen reduces every signing failure to
/// `RemoteKeyError`; the token's own error is kept here so callers can tell a lost session
/// or a removed token (retry) from a refused mechanism.
pub struct CsrSigner<'a>(pub &'a TokenKey, std::sync::Mutex<Option<Error>>);

impl<'a> CsrSigner<'a> {
    /// A signer over `key`.
    pub fn new(key: &'a TokenKey) -> Self {
        CsrSigner(key, std::sync::Mutex::new(None))
    }

    /// The token error of the last failed signature, if any.
    pub fn take_error(&self) -> Option<Error> {
        self.1.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl rcgen::PublicKeyData for CsrSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.0.info().public_bits
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self.0.key_type() {
            KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Rsa2048 | KeyType::Rsa3072 => &rcgen::PKCS_RSA_SHA256,
        }
    }
}

impl rcgen::SigningKey for CsrSigner<'_> {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        let alg = match self.0.key_type() {
            KeyType::EcP256 => SignAlg::Ecdsa {
                hash: Hash::Sha256,
                der: true,
            },
            KeyType::EcP384 => SignAlg::Ecdsa {
                hash: Hash::Sha384,
                der: true,
            },
            _ => SignAlg::RsaPkcs1(Hash::Sha256),
        };
        self.0.sign(alg, msg).map_err(|e| {
            tracing::error!(error = %e, "CSR signature in the token failed");
            *self.1.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            rcgen::Error::RemoteKeyError
        })
    }
}

/// A subject distinguished name: ordered (attribute, value) pairs, `O=..,OU=..,CN=..`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subject(pub Vec<(String, String)>);

impl Subject {
    /// Parse `O=Acme,OU=Gateways,CN=gw-01` (`\,` escapes a comma; C, ST, L, O, OU, CN).
    pub fn parse(s: &str) -> Result<Subject> {
        let mut parts = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(n) => cur.push(n),
                    None => {
                        return Err(Error::InvalidRequest(
                            "subject ends with a lone '\\'".into(),
                        ))
                    }
                },
                ',' => parts.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        parts.push(cur);
        let mut out = Vec::new();
        for p in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            let (k, v) = p.split_once('=').ok_or_else(|| {
                Error::InvalidRequest(format!("subject part '{p}' is not ATTR=value"))
            })?;
            let k = k.trim().to_ascii_uppercase();
            if !["C", "ST", "L", "O", "OU", "CN"].contains(&k.as_str()) {
                return Err(Error::InvalidRequest(format!(
                    "subject attribute '{k}' (use C, ST, L, O, OU, CN)"
                )));
            }
            if v.trim().is_empty() {
                return Err(Error::InvalidRequest(format!(
                    "subject attribute {k} is empty"
                )));
            }
            out.push((k, v.trim().to_owned()));
        }
        if !out.iter().any(|(k, _)| k == "CN") {
            return Err(Error::InvalidRequest("subject has no CN".into()));
        }
        Ok(Subject(out))
    }

    fn to_rcgen(&self) -> rcgen::DistinguishedName {
        let mut dn = rcgen::DistinguishedName::new();
        for (k, v) in &self.0 {
            let t = match k.as_str() {
                "C" => rcgen::DnType::CountryName,
                "ST" => rcgen::DnType::StateOrProvinceName,
                "L" => rcgen::DnType::LocalityName,
                "O" => rcgen::DnType::OrganizationName,
                "OU" => rcgen::DnType::OrganizationalUnitName,
                _ => rcgen::DnType::CommonName,
            };
            dn.push(t, v.as_str());
        }
        dn
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| format!("{k}={}", v.replace(',', "\\,")))
            .collect();
        f.write_str(&s.join(","))
    }
}

/// A subject alternative name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum San {
    /// dNSName.
    Dns(String),
    /// iPAddress.
    Ip(IpAddr),
}

impl std::str::FromStr for San {
    type Err = Error;
    /// `dns:gw-01.example.net` or `ip:10.0.0.7`.
    fn from_str(s: &str) -> Result<San> {
        match s.split_once(':') {
            Some(("dns", n))
                if !n.is_empty()
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-.*".contains(c)) =>
            {
                Ok(San::Dns(n.to_owned()))
            }
            Some(("ip", a)) => a
                .parse()
                .map(San::Ip)
                .map_err(|_| Error::InvalidRequest(format!("'{a}' is not an IP address"))),
            _ => Err(Error::InvalidRequest(format!(
                "SAN '{s}': use dns:NAME or ip:ADDRESS"
            ))),
        }
    }
}

impl std::fmt::Display for San {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            San::Dns(n) => write!(f, "dns:{n}"),
            San::Ip(a) => write!(f, "ip:{a}"),
        }
    }
}

/// Build a PKCS#10 CSR for the token key, signed in the token; returns PEM.
pub fn build_csr(key: &TokenKey, subject: &Subject, sans: &[San]) -> Result<String> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = subject.to_rcgen();
    params.subject_alt_names = sans
        .iter()
        .map(|s| {
            Ok(match s {
                San::Dns(n) => rcgen::SanType::DnsName(
                    n.clone()
                        .try_into()
                        .map_err(|e| Error::InvalidRequest(format!("DNS name '{n}': {e}")))?,
                ),
                San::Ip(a) => rcgen::SanType::IpAddress(*a),
            })
        })
        .collect::<Result<_>>()?;
    let signer = CsrSigner::new(key);
    let csr = params.serialize_request(&signer).map_err(|e| {
        signer
            .take_error()
            .unwrap_or_else(|| Error::InvalidRequest(format!("building the CSR failed: {e}")))
    })?;
    csr.pem()
        .map_err(|e| Error::InvalidRequest(format!("CSR PEM: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn subject_parse() {
        let s = Subject::parse("O=Acme\\, Inc,OU=Gateways, CN=gw-01").unwrap();
        assert_eq!(s.0[0], ("O".into(), "Acme, Inc".into()));
        assert_eq!(s.0[2], ("CN".into(), "gw-01".into()));
        assert_eq!(Subject::parse(&s.to_string()).unwrap(), s);
        assert!(Subject::parse("O=Acme").is_err());
        assert!(Subject::parse("X=1,CN=a").is_err());
        assert!(Subject::parse("CN").is_err());
    }

    #[test]
    fn san_parse() {
        assert_eq!(
            "dns:a.example".parse::<San>().unwrap(),
            San::Dns("a.example".into())
        );
        assert!("ip:10.0.0.300".parse::<San>().is_err());
        assert!("uri:x".parse::<San>().is_err());
        assert_eq!("ip:::1".parse::<San>().unwrap().to_string(), "ip:::1");
    }

    proptest! {
        #[test]
        fn subject_and_san_parsers_never_panic(s in "\\PC{0,60}") {
            let _ = Subject::parse(&s);
            let _ = s.parse::<San>();
        }
    }
}
