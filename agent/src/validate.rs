//! Validation of an issued certificate before anything uses it: the key is the pending
//! key's, the dates hold, the chain reaches the issuer's CA bundle, and the subject and SANs
//! are what was asked for. A refused certificate leaves the old identity serving.

use crate::clock::{rfc3339, Unix};
use hsm_shim::csr::{San, Subject};
use hsm_shim::keys::hex;
use hsm_shim::rustls::pki_types::pem::PemObject;
use hsm_shim::rustls::pki_types::{CertificateDer, UnixTime};
use sha2::Digest;
use x509_cert::der::{Decode, Encode};

/// Clock skew tolerated on not-before.
pub const SKEW: u64 = 300;

/// Why a certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Nothing that parses as a certificate.
    #[error("no certificate in what the issuer returned ({0})")]
    NoCertificate(String),
    /// The leaf carries another public key.
    #[error("the certificate's public key is not the pending key's (issued for another CSR?)")]
    WrongKey,
    /// Not valid yet.
    #[error("the certificate is not valid before {0} (check the device clock or the CA)")]
    NotYetValid(String),
    /// Already expired.
    #[error("the certificate expired at {0}")]
    Expired(String),
    /// The chain does not reach the CA bundle.
    #[error("the certificate does not chain to the issuer's CA bundle: {0}")]
    Chain(String),
    /// Subject differs.
    #[error("subject is '{got}', expected '{want}'")]
    Subject {
        /// Asked for.
        want: String,
        /// Found.
        got: String,
    },
    /// SANs differ.
    #[error("subject alternative names are [{got}], expected [{want}]")]
    Sans {
        /// Asked for.
        want: String,
        /// Found.
        got: String,
    },
}

/// What the register keeps of a validated certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    /// Chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Serial, hex.
    pub serial: String,
    /// SHA-256 of the leaf, hex.
    pub fingerprint: String,
    /// Not before.
    pub not_before: Unix,
    /// Not after.
    pub not_after: Unix,
}

/// What the certificate must say.
pub struct Expected<'a> {
    /// SPKI DER of the pending key.
    pub spki: &'a [u8],
    /// Subject asked for.
    pub subject: &'a Subject,
    /// SANs asked for.
    pub sans: &'a [San],
    /// Check for TLS server use instead of client use.
    pub server: bool,
}

/// Parse every certificate of a PEM text.
pub fn parse_chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, Refusal> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Refusal::NoCertificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(Refusal::NoCertificate("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

fn attr_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.6" => "C",
        "2.5.4.8" => "ST",
        "2.5.4.7" => "L",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.3" => "CN",
        _ => return None,
    })
}

/// The subject of a certificate as `O=..,CN=..` in encoding order.
fn subject_of(cert: &x509_cert::Certificate) -> Subject {
    let mut v = Vec::new();
    for rdn in cert.tbs_certificate.subject.0.iter() {
        for atv in rdn.0.iter() {
            let name = attr_name(&atv.oid.to_string())
                .map(str::to_owned)
                .unwrap_or_else(|| atv.oid.to_string());
            v.push((
                name,
                String::from_utf8_lossy(atv.value.value()).into_owned(),
            ));
        }
    }
    Subject(v)
}

fn sans_of(cert: &x509_cert::Certificate) -> Vec<San> {
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;
    let mut out = Vec::new();
    for ext in cert.tbs_certificate.extensions.iter().flatten() {
        if ext.extn_id.to_string() != "2.5.29.17" {
            continue;
        }
        let Ok(san) = SubjectAltName::from_der(ext.extn_value.as_bytes()) else {
            continue;
        };
        for name in san.0 {
            match name {
                GeneralName::DnsName(d) => out.push(San::Dns(d.to_string())),
                GeneralName::IpAddress(ip) => {
                    let b = ip.as_bytes();
                    if let Ok(a) = <[u8; 4]>::try_from(b) {
                        out.push(San::Ip(a.into()));
                    } else if let Ok(a) = <[u8; 16]>::try_from(b) {
                        out.push(San::Ip(a.into()));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

fn list(sans: &[San]) -> String {
    let mut v: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    v.sort();
    v.join(", ")
}

/// Check an issued chain (PEM, leaf first) against what was asked for, at time `now`.
pub fn validate(
    chain_pem: &str,
    ca_bundle: &[CertificateDer<'static>],
    want: &Expected,
    now: Unix,
) -> Result<Validated, Refusal> {
    let chain = parse_chain(chain_pem)?;
    let leaf = x509_cert::Certificate::from_der(&chain[0])
        .map_err(|e| Refusal::NoCertificate(e.to_string()))?;
    let tbs = &leaf.tbs_certificate;
    let spki = tbs
        .subject_public_key_info
        .to_der()
        .map_err(|e| Refusal::NoCertificate(e.to_string()))?;
    if spki != want.spki {
        return Err(Refusal::WrongKey);
    }
    let not_before = tbs.validity.not_before.to_unix_duration().as_secs();
    let not_after = tbs.validity.not_after.to_unix_duration().as_secs();
    if not_before > now + SKEW {
        return Err(Refusal::NotYetValid(rfc3339(not_before)));
    }
    if not_after <= now {
        return Err(Refusal::Expired(rfc3339(not_after)));
    }
    let anchors: Vec<_> = ca_bundle
        .iter()
        .filter_map(|c| {
            webpki::anchor_from_trusted_cert(c)
                .ok()
                .map(|a| a.to_owned())
        })
        .collect();
    let ee =
        webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| Refusal::Chain(format!("{e:?}")))?;
    let usage = if want.server {
        webpki::KeyUsage::server_auth()
    } else {
        webpki::KeyUsage::client_auth()
    };
    // Checked at a time inside the validity window: dates were judged above, with skew.
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.max(not_before)));
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        at,
        usage,
        None,
        None,
    )
    .map_err(|e| Refusal::Chain(format!("{e:?}")))?;
    let got = subject_of(&leaf);
    if got != *want.subject {
        return Err(Refusal::Subject {
            want: want.subject.to_string(),
            got: got.to_string(),
        });
    }
    let (mut a, mut b) = (sans_of(&leaf), want.sans.to_vec());
    let key = |s: &San| s.to_string();
    a.sort_by_key(key);
    b.sort_by_key(key);
    if a != b {
        return Err(Refusal::Sans {
            want: list(want.sans),
            got: list(&a),
        });
    }
    Ok(Validated {
        serial: hex(tbs.serial_number.as_bytes()),
        fingerprint: hex(&sha2::Sha256::digest(&chain[0])),
        chain,
        not_before,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (
        rcgen::Issuer<'static, rcgen::KeyPair>,
        CertificateDer<'static>,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "unit CA");
        let cert = p.self_signed(&key).unwrap();
        (rcgen::Issuer::new(p, key), cert.der().clone())
    }

    #[test]
    fn a_certificate_for_another_key_is_refused_and_the_right_one_passes() {
        let (issuer, ca_der) = ca();
        let (ours, theirs) = (
            rcgen::KeyPair::generate().unwrap(),
            rcgen::KeyPair::generate().unwrap(),
        );
        let mut p = rcgen::CertificateParams::new(vec!["gw.example".into()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, "gw");
        let now = 1_800_000_000u64;
        p.not_before = rcgen::date_time_ymd(2026, 1, 1);
        p.not_after = rcgen::date_time_ymd(2030, 1, 1);
        let subject = Subject(vec![("CN".into(), "gw".into())]);
        let sans = [San::Dns("gw.example".into())];
        let spki = rcgen::PublicKeyData::subject_public_key_info(&ours);
        let want = Expected {
            spki: &spki,
            subject: &subject,
            sans: &sans,
            server: false,
        };
        let wrong = p.signed_by(&theirs, &issuer).unwrap();
        assert_eq!(
            validate(&wrong.pem(), std::slice::from_ref(&ca_der), &want, now),
            Err(Refusal::WrongKey)
        );
        let right = p.signed_by(&ours, &issuer).unwrap();
        let v = validate(&right.pem(), &[ca_der], &want, now).unwrap();
        assert_eq!(v.not_after, 1_893_456_000);
        assert!(matches!(
            validate("garbage", &[], &want, now),
            Err(Refusal::NoCertificate(_))
        ));
    }
}
