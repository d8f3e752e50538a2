//! SCEP messages (RFC 8894 §3): a pkiMessage is a CMS SignedData whose signed attributes
//! carry the SCEP fields and whose content is an EnvelopedData (the pkcsPKIEnvelope) for the
//! other side. Ours are signed by the token key (RSA PKCS#1 v1.5, SHA-256) with a transient
//! self-signed certificate of that key, and their envelope is AES-256-CBC with the key
//! transported to the CA (or RA) certificate (envelope.rs).

use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{
    CertificateSet, EncapsulatedContentInfo, SignedData, SignerIdentifier, SignerInfo, SignerInfos,
};
use hsm_shim::TokenKey;
use sha2::Digest;
use x509_cert::attr::Attribute;
use x509_cert::der::asn1::{ObjectIdentifier as Oid, OctetString, PrintableStringRef, SetOfVec};
use x509_cert::der::{Any, Decode, Encode};
use x509_cert::spki::AlgorithmIdentifierOwned;
use x509_cert::Certificate;

pub(super) const ID_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.1");
const ID_SIGNED_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.2");
const ID_CONTENT_TYPE: Oid = Oid::new_unwrap("1.2.840.113549.1.9.3");
const ID_MESSAGE_DIGEST: Oid = Oid::new_unwrap("1.2.840.113549.1.9.4");
const SHA256: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.1");
const SHA256_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.11");
/// SCEP attributes (RFC 8894 §3.2.1).
const MESSAGE_TYPE: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.2");
const PKI_STATUS: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.3");
const FAIL_INFO: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.4");
const SENDER_NONCE: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.5");
const RECIPIENT_NONCE: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.6");
const TRANSACTION_ID: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.7");
const CHALLENGE_PASSWORD: Oid = Oid::new_unwrap("1.2.840.113549.1.9.7");

/// SCEP message types we send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// First enrolment (with the challenge password in the CSR).
    PkcsReq,
    /// Renewal, signed with the current certificate and key.
    RenewalReq,
    /// Polling a pending request (GetCertInitial).
    CertPoll,
}

impl MessageType {
    fn code(self) -> &'static str {
        match self {
            MessageType::PkcsReq => "19",
            MessageType::RenewalReq => "17",
            MessageType::CertPoll => "20",
        }
    }
}

/// What a CertRep says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Issued: the envelope holds the certificate.
    Success,
    /// Refused, with the failInfo named.
    Failure(String),
    /// Waiting for a person at the CA: poll later.
    Pending,
}

/// A parsed CertRep.
#[derive(Debug, Clone)]
pub struct CertRep {
    /// pkiStatus.
    pub status: Status,
    /// transactionID (must be ours).
    pub transaction_id: String,
    /// recipientNonce (must be our senderNonce).
    pub recipient_nonce: Vec<u8>,
    /// The pkcsPKIEnvelope (a ContentInfo of EnvelopedData), on success.
    pub envelope: Option<Vec<u8>>,
}

pub(super) fn der_err(e: impl std::fmt::Display) -> String {
    format!("SCEP message: {e}")
}

pub(super) fn any<T: Encode>(v: &T) -> Result<Any, String> {
    Any::from_der(&v.to_der().map_err(der_err)?).map_err(der_err)
}

fn attribute(oid: Oid, value: Any) -> Result<Attribute, String> {
    let mut values = SetOfVec::new();
    values.insert(value).map_err(der_err)?;
    Ok(Attribute { oid, values })
}

pub(super) fn rid(cert: &Certificate) -> IssuerAndSerialNumber {
    IssuerAndSerialNumber {
        issuer: cert.tbs_certificate.issuer.clone(),
        serial_number: cert.tbs_certificate.serial_number.clone(),
    }
}

/// A pkiMessage with `fields` (see [`Fields::request`]) around `content` (the CSR, or for
/// CertPoll the IssuerAndSubject), enveloped for `ca` (AES-256-CBC, or 3DES with
/// `triple_des`: a CA without AES, where allowed) and signed in the token by `key` with its
/// certificate `signer_cert` (transient self-signed, or the current one for a renewal).
pub fn pki_message(
    fields: &Fields,
    content: &[u8],
    ca: &Certificate,
    triple_des: bool,
    key: &TokenKey,
    signer_cert: &Certificate,
) -> Result<Vec<u8>, String> {
    let env = super::envelope::envelope(content, ca, triple_des)?;
    signed_message(Some(env), fields, signer_cert, &|tbs| {
        key.sign(hsm_shim::SignAlg::RsaPkcs1(hsm_shim::Hash::Sha256), tbs)
            .map_err(|e| format!("signing the SCEP message in the token: {e}"))
    })
}

/// The SCEP fields of a message's signed attributes.
#[derive(Debug, Clone)]
pub struct Fields<'a> {
    /// messageType (`"19"` PKCSReq, `"17"` RenewalReq, `"20"` CertPoll, `"3"` CertRep).
    pub message_type: &'a str,
    /// transactionID.
    pub transaction_id: &'a str,
    /// senderNonce.
    pub sender_nonce: &'a [u8],
    /// pkiStatus (a CertRep's).
    pub pki_status: Option<&'a str>,
    /// recipientNonce (a CertRep's).
    pub recipient_nonce: Option<&'a [u8]>,
    /// failInfo (a FAILURE CertRep's).
    pub fail_info: Option<&'a str>,
}

impl<'a> Fields<'a> {
    /// The fields of a request of `kind`.
    pub fn request(kind: MessageType, transaction_id: &'a str, sender_nonce: &'a [u8]) -> Self {
        Fields {
            message_type: kind.code(),
            transaction_id,
            sender_nonce,
            pki_status: None,
            recipient_nonce: None,
            fail_info: None,
        }
    }
}

/// What signs a message's attributes: their DER in, the RSA PKCS#1 v1.5 SHA-256 signature out.
pub type Sign<'a> = dyn Fn(&[u8]) -> Result<Vec<u8>, String> + 'a;

/// A SCEP SignedData (a ContentInfo): `econtent` (an envelope, or none) with `fields` as
/// signed attributes, signed by `sign` (RSA PKCS#1 v1.5 over SHA-256 of the attributes) for
/// `signer_cert`, which it carries.
pub fn signed_message(
    econtent: Option<Vec<u8>>,
    fields: &Fields,
    signer_cert: &Certificate,
    sign: &Sign<'_>,
) -> Result<Vec<u8>, String> {
    let digest = sha2::Sha256::digest(econtent.as_deref().unwrap_or_default());
    let printable = |s: &str| any(&PrintableStringRef::new(s).map_err(der_err)?);
    let octets = |b: &[u8]| any(&OctetString::new(b.to_vec()).map_err(der_err)?);
    let mut list = vec![
        attribute(ID_CONTENT_TYPE, any(&ID_DATA)?)?,
        attribute(ID_MESSAGE_DIGEST, octets(&digest)?)?,
        attribute(MESSAGE_TYPE, printable(fields.message_type)?)?,
        attribute(TRANSACTION_ID, printable(fields.transaction_id)?)?,
        attribute(SENDER_NONCE, octets(fields.sender_nonce)?)?,
    ];
    if let Some(s) = fields.pki_status {
        list.push(attribute(PKI_STATUS, printable(s)?)?);
    }
    if let Some(n) = fields.recipient_nonce {
        list.push(attribute(RECIPIENT_NONCE, octets(n)?)?);
    }
    if let Some(f) = fields.fail_info {
        list.push(attribute(FAIL_INFO, printable(f)?)?);
    }
    let mut attrs = SetOfVec::new();
    for a in list {
        attrs.insert(a).map_err(der_err)?;
    }
    // The signature covers the DER of the attributes as a SET (RFC 5652 §5.4).
    let signature = sign(&attrs.to_der().map_err(der_err)?)?;
    let sha256 = || AlgorithmIdentifierOwned {
        oid: SHA256,
        parameters: None,
    };
    let mut digests = SetOfVec::new();
    digests.insert(sha256()).map_err(der_err)?;
    let mut certs = SetOfVec::new();
    certs
        .insert(CertificateChoices::Certificate(signer_cert.clone()))
        .map_err(der_err)?;
    let mut signers = SetOfVec::new();
    signers
        .insert(SignerInfo {
            version: CmsVersion::V1,
            sid: SignerIdentifier::IssuerAndSerialNumber(rid(signer_cert)),
            digest_alg: sha256(),
            signed_attrs: Some(attrs),
            signature_algorithm: AlgorithmIdentifierOwned {
                oid: SHA256_WITH_RSA,
                parameters: Some(Any::from(x509_cert::der::asn1::AnyRef::NULL)),
            },
            signature: OctetString::new(signature).map_err(der_err)?,
            unsigned_attrs: None,
        })
        .map_err(der_err)?;
    let econtent = match econtent {
        Some(e) => Some(any(&OctetString::new(e).map_err(der_err)?)?),
        None => None,
    };
    let sd = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: digests,
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: ID_DATA,
            econtent,
        },
        certificates: Some(CertificateSet(certs)),
        crls: None,
        signer_infos: SignerInfos(signers),
    };
    ContentInfo {
        content_type: ID_SIGNED_DATA,
        content: any(&sd)?,
    }
    .to_der()
    .map_err(der_err)
}

/// The value of attribute `oid` among `attrs`.
fn attr(attrs: &SetOfVec<Attribute>, oid: Oid) -> Option<&Any> {
    attrs
        .iter()
        .find(|a| a.oid == oid)
        .and_then(|a| a.values.iter().next())
}

fn printable(v: Option<&Any>) -> String {
    v.and_then(|a| a.decode_as::<x509_cert::der::asn1::PrintableString>().ok())
        .map(|s| s.to_string())
        .unwrap_or_default()
}

/// The fields of a ContentInfo that must be a SignedData (`what` names it in errors), read
/// field by field: servers (Go's pkcs7 among them) send their certificates as a SET that is
/// not sorted, which strict DER refuses.
fn signed_data_parts(der: &[u8], what: &str) -> Result<Vec<Any>, String> {
    let ci = ContentInfo::from_der(der).map_err(der_err)?;
    if ci.content_type != ID_SIGNED_DATA {
        return Err(format!(
            "SCEP: a {} where {what} was expected",
            ci.content_type
        ));
    }
    ci.content.decode_as().map_err(der_err)
}

/// Read a CertRep: its signed SCEP attributes, after checking its signature with one of
/// `ca_certs` (the CA or RA certificates from GetCACert).
pub fn cert_rep(der: &[u8], ca_certs: &[Certificate], allow_sha1: bool) -> Result<CertRep, String> {
    // The certificates are not needed: the signature is checked with the CA's own, from
    // GetCACert.
    let parts = signed_data_parts(der, "a CertRep")?;
    let (Some(encap), Some(signers)) = (parts.get(2), parts.last()) else {
        return Err("SCEP answer: a SignedData too short".into());
    };
    let encap: EncapsulatedContentInfo = encap.decode_as().map_err(der_err)?;
    let signers: SignerInfos = signers.decode_as().map_err(der_err)?;
    let si = signers.0.iter().next().ok_or("SCEP answer has no signer")?;
    let attrs = si
        .signed_attrs
        .as_ref()
        .ok_or("SCEP answer has no signed attributes")?;
    verify_signer(si, attrs, &encap, ca_certs, allow_sha1)?;
    let status = match printable(attr(attrs, PKI_STATUS)).as_str() {
        "0" => Status::Success,
        "2" => Status::Failure(fail_info(&printable(attr(attrs, FAIL_INFO)))),
        "3" => Status::Pending,
        other => return Err(format!("SCEP answer has pkiStatus {other:?}")),
    };
    let recipient_nonce = attr(attrs, RECIPIENT_NONCE)
        .and_then(|a| a.decode_as::<OctetString>().ok())
        .map(|o| o.as_bytes().to_vec())
        .unwrap_or_default();
    let envelope = match (&status, &encap.econtent) {
        (Status::Success, Some(c)) => Some(
            c.decode_as::<OctetString>()
                .map_err(der_err)?
                .as_bytes()
                .to_vec(),
        ),
        (Status::Success, None) => return Err("SCEP success without a certificate".into()),
        _ => None,
    };
    Ok(CertRep {
        status,
        transaction_id: printable(attr(attrs, TRANSACTION_ID)),
        recipient_nonce,
        envelope,
    })
}

/// The signer's signature over the signed attributes verifies with one of `ca_certs`, and
/// the messageDigest matches the content.
fn verify_signer(
    si: &SignerInfo,
    attrs: &SetOfVec<Attribute>,
    encap: &EncapsulatedContentInfo,
    ca_certs: &[Certificate],
    allow_sha1: bool,
) -> Result<(), String> {
    let content = match &encap.econtent {
        Some(c) => c
            .decode_as::<OctetString>()
            .map_err(der_err)?
            .as_bytes()
            .to_vec(),
        None => Vec::new(),
    };
    let (digest, alg): (Vec<u8>, &'static dyn ring::signature::VerificationAlgorithm) =
        match si.digest_alg.oid.to_string().as_str() {
            "2.16.840.1.101.3.4.2.1" => (
                sha2::Sha256::digest(&content).to_vec(),
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            ),
            "1.3.14.3.2.26" if !allow_sha1 => return Err("SCEP answer signed with SHA-1: refused (set allow_legacy_crypto = true to accept it, with a warning)".into()),
            "1.3.14.3.2.26" => (
                ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &content)
                    .as_ref()
                    .to_vec(),
                &ring::signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
            ),
            other => return Err(format!("SCEP answer signed with digest {other}: refused (MD5 and unknown digests are not accepted)")),
        };
    if si.digest_alg.oid.to_string() == "1.3.14.3.2.26" {
        tracing::warn!("the SCEP server signed its answer with SHA-1 (allowed by allow_legacy_crypto); prefer a server that uses SHA-256");
    }
    let md = attr(attrs, ID_MESSAGE_DIGEST)
        .and_then(|a| a.decode_as::<OctetString>().ok())
        .ok_or("SCEP answer has no messageDigest")?;
    if md.as_bytes() != digest.as_slice() {
        return Err("SCEP answer's messageDigest does not match its content".into());
    }
    let signed = attrs.to_der().map_err(der_err)?;
    let ok = ca_certs.iter().any(|c| {
        let key = c
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes();
        ring::signature::UnparsedPublicKey::new(alg, key)
            .verify(&signed, si.signature.as_bytes())
            .is_ok()
    });
    if !ok {
        return Err("SCEP answer's signature does not verify with the CA's certificates".into());
    }
    Ok(())
}

/// failInfo codes (RFC 8894 §3.2.1.4) by name.
fn fail_info(code: &str) -> String {
    let name = match code {
        "0" => "badAlg",
        "1" => "badMessageCheck",
        "2" => "badRequest",
        "3" => "badTime",
        "4" => "badCertId",
        _ => "unknown",
    };
    format!("{name} ({code})")
}

/// The certificates of a degenerate ("certs-only") PKCS#7 SignedData: GetCACert's CA/RA
/// answer and the CertRep's issued certificate. Never panics.
pub fn certs_only(der: &[u8]) -> Result<Vec<Certificate>, String> {
    let parts = signed_data_parts(der, "a certs-only SignedData")?;
    let set = parts
        .iter()
        .find(|p| {
            x509_cert::der::Tagged::tag(*p)
                == x509_cert::der::Tag::ContextSpecific {
                    constructed: true,
                    number: x509_cert::der::TagNumber::N0,
                }
        })
        .ok_or("a certs-only SignedData without certificates")?;
    let mut reader = x509_cert::der::SliceReader::new(set.value()).map_err(der_err)?;
    let mut certs = Vec::new();
    while !x509_cert::der::Reader::is_finished(&reader) {
        certs.push(Certificate::decode(&mut reader).map_err(der_err)?);
    }
    if certs.is_empty() {
        return Err("a certs-only SignedData without certificates".into());
    }
    Ok(certs)
}

/// CertPoll's content: `IssuerAndSubject ::= SEQUENCE { issuer Name, subject Name }`.
pub fn issuer_and_subject(
    issuer: &x509_cert::name::Name,
    subject: &x509_cert::name::Name,
) -> Result<Vec<u8>, String> {
    // A SEQUENCE OF two Names encodes exactly as the SEQUENCE of two fields.
    vec![any(issuer)?, any(subject)?].to_der().map_err(der_err)
}

/// The subject of a DER CSR.
pub fn csr_subject(csr_der: &[u8]) -> Result<x509_cert::name::Name, String> {
    Ok(x509_cert::request::CertReq::from_der(csr_der)
        .map_err(der_err)?
        .info
        .subject)
}

/// The CSR `csr_der` with a PKCS#9 challengePassword added, signed again in the token by
/// `key` (RSA, SHA-256). It holds the secret: it is zeroized when dropped, never stored.
pub fn with_challenge(
    csr_der: &[u8],
    key: &TokenKey,
    challenge: &str,
) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    let mut req = x509_cert::request::CertReq::from_der(csr_der).map_err(der_err)?;
    let value = x509_cert::der::asn1::Utf8StringRef::new(challenge).map_err(der_err)?;
    req.info
        .attributes
        .insert(attribute(CHALLENGE_PASSWORD, any(&value)?)?)
        .map_err(der_err)?;
    let tbs = zeroize::Zeroizing::new(req.info.to_der().map_err(der_err)?);
    let signature = key
        .sign(hsm_shim::SignAlg::RsaPkcs1(hsm_shim::Hash::Sha256), &tbs)
        .map_err(|e| format!("signing the CSR in the token: {e}"))?;
    req.algorithm = AlgorithmIdentifierOwned {
        oid: SHA256_WITH_RSA,
        parameters: Some(Any::from(x509_cert::der::asn1::AnyRef::NULL)),
    };
    req.signature = x509_cert::der::asn1::BitString::from_bytes(&signature).map_err(der_err)?;
    Ok(zeroize::Zeroizing::new(req.to_der().map_err(der_err)?))
}

/// A transient self-signed certificate of `key` (RFC 8894 §2.3: what signs a first
/// request, and what the CA encrypts its answer to), made in the token.
pub fn transient_cert(key: &TokenKey, cn: &str) -> Result<Certificate, String> {
    let signer = hsm_shim::csr::CsrSigner::new(key);
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(der_err)?;
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let c = p.self_signed(&signer).map_err(|e| {
        signer
            .take_error()
            .map(|e| format!("signing in the token: {e}"))
            .unwrap_or_else(|| der_err(e))
    })?;
    Certificate::from_der(c.der()).map_err(der_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fail_infos_are_named() {
        assert_eq!(fail_info("1"), "badMessageCheck (1)");
        assert_eq!(fail_info("9"), "unknown (9)");
    }

    proptest! {
        #[test]
        fn any_answer_is_read_without_a_panic(bytes in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..600)) {
            let _ = cert_rep(&bytes, &[], true);
        }
    }
}
