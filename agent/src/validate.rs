//! Validation of an issued certificate before anything uses it: the key is the pending
//! key's, the dates hold, the chain reaches the issuer's CA bundle, and the subject and SANs
//! are what was asked for. A refused certificate leaves the old identity serving.

use crate::clock::{rfc3339, Unix};
use firmware_config::schema::{SubjectMatch, Usage};
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
    /// Chain, leaf first, then the intermediates of the verified path (no trust anchor).
    pub chain: Vec<CertificateDer<'static>>,
    /// Serial, hex.
    pub serial: String,
    /// SHA-256 of the leaf, hex.
    pub fingerprint: String,
    /// Not before.
    pub not_before: Unix,
    /// Not after.
    pub not_after: Unix,
    /// The subject as issued.
    pub subject: String,
    /// How the issued subject and SANs differ from the request (accepted by the policy).
    pub differences: Vec<String>,
}

/// What the certificate must say.
pub struct Expected<'a> {
    /// SPKI DER of the pending key.
    pub spki: &'a [u8],
    /// Subject asked for.
    pub subject: &'a Subject,
    /// SANs asked for.
    pub sans: &'a [San],
    /// TLS roles the certificate must allow (each EKU checked on the whole path).
    pub usages: &'a [Usage],
    /// How strictly subject and SANs must match.
    pub policy: SubjectMatch,
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

/// A chain as PEM text.
pub fn to_pem(chain: &[CertificateDer]) -> String {
    chain
        .iter()
        .map(|c| hsm_shim::pem("CERTIFICATE", c))
        .collect()
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
    name_of(&cert.tbs_certificate.subject)
}

/// The common name of the issuer of certificate `der` (an ACME chain's top, say).
pub fn issuer_cn(der: &[u8]) -> Option<String> {
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    cn(&name_of(&cert.tbs_certificate.issuer)).map(str::to_owned)
}

/// A name as `O=..,CN=..` in encoding order.
fn name_of(name: &x509_cert::name::Name) -> Subject {
    let mut v = Vec::new();
    for rdn in name.0.iter() {
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
    sans_in(cert.tbs_certificate.extensions.iter().flatten())
}

/// The DNS and IP names of the subjectAltName among `extensions` (of a certificate or of a
/// CSR's extensionRequest).
pub fn sans_in<'a>(extensions: impl Iterator<Item = &'a x509_cert::ext::Extension>) -> Vec<San> {
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;
    let mut out = Vec::new();
    for ext in extensions {
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

fn cn(s: &Subject) -> Option<&str> {
    s.0.iter().find(|(k, _)| k == "CN").map(|(_, v)| v.as_str())
}

/// Compare the issued subject and SANs with the request under `policy`; returns the
/// accepted differences for the register and `status`.
fn compare_names(got: &Subject, got_sans: &[San], want: &Expected) -> Result<Vec<String>, Refusal> {
    let subject_refusal = || Refusal::Subject {
        want: want.subject.to_string(),
        got: got.to_string(),
    };
    let sans_refusal = || Refusal::Sans {
        want: list(want.sans),
        got: list(got_sans),
    };
    let mut diffs = Vec::new();
    if got != want.subject {
        diffs.push(format!("subject is '{got}', asked for '{}'", want.subject));
    }
    let missing: Vec<San> = want
        .sans
        .iter()
        .filter(|s| !got_sans.contains(s))
        .cloned()
        .collect();
    let extra: Vec<San> = got_sans
        .iter()
        .filter(|s| !want.sans.contains(s))
        .cloned()
        .collect();
    if !missing.is_empty() {
        diffs.push(format!("SANs missing: [{}]", list(&missing)));
    }
    if !extra.is_empty() {
        diffs.push(format!("SANs added by the CA: [{}]", list(&extra)));
    }
    match want.policy {
        SubjectMatch::Exact if got != want.subject => Err(subject_refusal()),
        SubjectMatch::Exact if !(missing.is_empty() && extra.is_empty()) => Err(sans_refusal()),
        SubjectMatch::Cn if cn(got) != cn(want.subject) => Err(subject_refusal()),
        SubjectMatch::Cn if !missing.is_empty() => Err(sans_refusal()),
        _ => Ok(diffs),
    }
}

/// The SPKI (DER) of the first certificate in a PEM text, if any.
pub fn leaf_spki(text: &str) -> Option<Vec<u8>> {
    cert_spki(&parse_chain(text).ok()?[0])
}

/// The SPKI (DER) of one certificate (DER), if it parses.
pub fn cert_spki(der: &[u8]) -> Option<Vec<u8>> {
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    cert.tbs_certificate.subject_public_key_info.to_der().ok()
}

/// Check an issued chain (PEM, leaf first) against what was asked for, at time `now`.
/// `anchors` are the trust anchors (the issuer's CA bundle); `intermediates` may help build
/// the path (EST `/cacerts`), as may any certificate after the leaf in the PEM.
pub fn validate(
    chain_pem: &str,
    anchors: &[CertificateDer<'static>],
    intermediates: &[CertificateDer<'static>],
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
    // Checked at a time inside the validity window: dates were judged above, with skew.
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.max(not_before)));
    let path_certs = verify_path(&chain, anchors, intermediates, want.usages, at)?;
    let got = subject_of(&leaf);
    let differences = compare_names(&got, &sans_of(&leaf), want)?;
    let mut out = vec![chain[0].clone()];
    out.extend(path_certs);
    Ok(Validated {
        serial: hex(tbs.serial_number.as_bytes()),
        fingerprint: hex(&sha2::Sha256::digest(&chain[0])),
        chain: out,
        not_before,
        not_after,
        subject: got.to_string(),
        differences,
    })
}

/// Build and verify the path from the leaf (`chain[0]`) to one of `anchors` for each usage
/// (client alone when none is asked for), helped by the rest of `chain` and by
/// `intermediates`; the intermediates of the path found.
fn verify_path(
    chain: &[CertificateDer<'static>],
    anchors: &[CertificateDer<'static>],
    intermediates: &[CertificateDer<'static>],
    usages: &[Usage],
    at: UnixTime,
) -> Result<Vec<CertificateDer<'static>>, Refusal> {
    let trust: Vec<_> = anchors
        .iter()
        .filter_map(|c| {
            webpki::anchor_from_trusted_cert(c)
                .ok()
                .map(|a| a.to_owned())
        })
        .collect();
    let mut pool: Vec<CertificateDer<'static>> = chain[1..].to_vec();
    for c in intermediates {
        if !pool.contains(c) && !anchors.contains(c) {
            pool.push(c.clone());
        }
    }
    let ee =
        webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| Refusal::Chain(format!("{e:?}")))?;
    let usages: Vec<Usage> = if usages.is_empty() {
        vec![Usage::Client]
    } else {
        usages.to_vec()
    };
    let mut path_certs = Vec::new();
    for u in usages {
        let (ku, role) = match u {
            Usage::Server => (webpki::KeyUsage::server_auth(), "TLS server"),
            Usage::Client => (webpki::KeyUsage::client_auth(), "TLS client"),
        };
        let path = ee
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &trust,
                &pool,
                at,
                ku,
                None,
                None,
            )
            .map_err(|e| Refusal::Chain(format!("{e:?} (as a {role} certificate)")))?;
        path_certs = path
            .intermediate_certificates()
            .map(|c| c.der().into_owned())
            .collect();
    }
    Ok(path_certs)
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
            usages: &[Usage::Client],
            policy: SubjectMatch::Exact,
        };
        let wrong = p.signed_by(&theirs, &issuer).unwrap();
        assert_eq!(
            validate(&wrong.pem(), std::slice::from_ref(&ca_der), &[], &want, now),
            Err(Refusal::WrongKey)
        );
        let right = p.signed_by(&ours, &issuer).unwrap();
        let v = validate(&right.pem(), &[ca_der], &[], &want, now).unwrap();
        assert_eq!(v.not_after, 1_893_456_000);
        assert!(matches!(
            validate("garbage", &[], &[], &want, now),
            Err(Refusal::NoCertificate(_))
        ));
    }

    struct Pki {
        root: CertificateDer<'static>,
        inter: CertificateDer<'static>,
        inter_issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    fn two_tier() -> Pki {
        let (root_issuer, root) = ca();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "issuing CA");
        let inter = p.signed_by(&key, &root_issuer).unwrap().der().clone();
        Pki {
            root,
            inter,
            inter_issuer: rcgen::Issuer::new(p, key),
        }
    }

    /// A leaf for `key` with `dn` (in that order), `sans`, EKUs and CA flag.
    fn leaf(
        pki: &Pki,
        key: &rcgen::KeyPair,
        dn: &[(rcgen::DnType, &str)],
        ekus: Vec<rcgen::ExtendedKeyUsagePurpose>,
        is_ca: bool,
    ) -> String {
        let mut p = rcgen::CertificateParams::new(vec!["gw.example".into()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in dn {
            p.distinguished_name.push(t.clone(), *v);
        }
        p.extended_key_usages = ekus;
        if is_ca {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        p.not_before = rcgen::date_time_ymd(2026, 1, 1);
        p.not_after = rcgen::date_time_ymd(2030, 1, 1);
        p.signed_by(key, &pki.inter_issuer).unwrap().pem()
    }

    const NOW: u64 = 1_800_000_000;

    fn check(
        pki: &Pki,
        pem: &str,
        key: &rcgen::KeyPair,
        usages: &[Usage],
        policy: SubjectMatch,
    ) -> Result<Validated, Refusal> {
        let spki = rcgen::PublicKeyData::subject_public_key_info(key);
        let subject = Subject(vec![
            ("O".into(), "Acme".into()),
            ("CN".into(), "gw".into()),
        ]);
        let sans = [San::Dns("gw.example".into())];
        let want = Expected {
            spki: &spki,
            subject: &subject,
            sans: &sans,
            usages,
            policy,
        };
        validate(
            pem,
            std::slice::from_ref(&pki.root),
            std::slice::from_ref(&pki.inter),
            &want,
            NOW,
        )
    }

    use rcgen::DnType::{CommonName as CN, OrganizationName as O};
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};

    #[test]
    fn intermediates_build_the_path_and_join_the_chain_but_never_anchor_it() {
        let pki = two_tier();
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = leaf(&pki, &key, &[(O, "Acme"), (CN, "gw")], vec![], false);
        let v = check(&pki, &pem, &key, &[Usage::Client], SubjectMatch::Exact).unwrap();
        assert_eq!(v.chain.len(), 2);
        assert_eq!(v.chain[1], pki.inter);
        assert!(v.differences.is_empty());
        // Without the intermediate, or anchored elsewhere: refused.
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let subject = Subject(vec![
            ("O".into(), "Acme".into()),
            ("CN".into(), "gw".into()),
        ]);
        let sans = [San::Dns("gw.example".into())];
        let want = Expected {
            spki: &spki,
            subject: &subject,
            sans: &sans,
            usages: &[Usage::Client],
            policy: SubjectMatch::Cn,
        };
        assert!(matches!(
            validate(&pem, std::slice::from_ref(&pki.root), &[], &want, NOW),
            Err(Refusal::Chain(_))
        ));
        let (_, foreign) = ca();
        assert!(matches!(
            validate(
                &pem,
                &[foreign],
                std::slice::from_ref(&pki.inter),
                &want,
                NOW
            ),
            Err(Refusal::Chain(_))
        ));
    }

    #[test]
    fn every_usage_asked_for_must_be_allowed_and_a_ca_leaf_is_refused() {
        let pki = two_tier();
        let key = rcgen::KeyPair::generate().unwrap();
        let dn = [(O, "Acme"), (CN, "gw")];
        let both = [Usage::Client, Usage::Server];
        let server_only = leaf(&pki, &key, &dn, vec![ServerAuth], false);
        let client_only = leaf(&pki, &key, &dn, vec![ClientAuth], false);
        let dual = leaf(&pki, &key, &dn, vec![ClientAuth, ServerAuth], false);
        for pem in [&server_only, &client_only] {
            let e = check(&pki, pem, &key, &both, SubjectMatch::Cn).unwrap_err();
            assert!(
                matches!(e, Refusal::Chain(ref m) if m.contains("Eku")),
                "{e}"
            );
        }
        check(&pki, &dual, &key, &both, SubjectMatch::Cn).unwrap();
        check(&pki, &client_only, &key, &[Usage::Client], SubjectMatch::Cn).unwrap();
        let ca_leaf = leaf(&pki, &key, &dn, vec![ClientAuth], true);
        let e = check(&pki, &ca_leaf, &key, &[Usage::Client], SubjectMatch::Cn).unwrap_err();
        assert!(
            matches!(e, Refusal::Chain(ref m) if m.contains("CaUsedAsEndEntity")),
            "{e}"
        );
    }

    #[test]
    fn subject_policy_cn_accepts_rewritten_dns_exact_does_not() {
        let pki = two_tier();
        let key = rcgen::KeyPair::generate().unwrap();
        let cn_only = leaf(&pki, &key, &[(CN, "gw")], vec![], false);
        let reordered = leaf(&pki, &key, &[(CN, "gw"), (O, "Acme")], vec![], false);
        let other_cn = leaf(&pki, &key, &[(O, "Acme"), (CN, "other")], vec![], false);
        for pem in [&cn_only, &reordered] {
            let v = check(&pki, pem, &key, &[Usage::Client], SubjectMatch::Cn).unwrap();
            assert!(
                v.differences[0].contains("asked for 'O=Acme,CN=gw'"),
                "{v:?}"
            );
            assert!(matches!(
                check(&pki, pem, &key, &[Usage::Client], SubjectMatch::Exact),
                Err(Refusal::Subject { .. })
            ));
        }
        assert!(matches!(
            check(&pki, &other_cn, &key, &[Usage::Client], SubjectMatch::Cn),
            Err(Refusal::Subject { .. })
        ));
        check(&pki, &other_cn, &key, &[Usage::Client], SubjectMatch::None).unwrap();
    }
}
