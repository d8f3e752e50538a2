//! SCEP messages (RFC 8894 §3): a pkiMessage is a CMS SignedData whose signed attributes
//! carry the SCEP fields and whose content is an EnvelopedData (the pkcsPKIEnvelope) for the
//! other side. Ours are signed by the token key (RSA PKCS#1 v1.5, SHA-256) with a transient
//! self-signed certificate of that key, and their envelope is AES-256-CBC with the key
//! transported to the CA (or RA) certificate. An answer's envelope is opened with the token
//! key (`C_Decrypt`); single DES is refused, 3DES only where the configuration allows it.

use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
use cms::content_info::{CmsVersion, ContentInfo};
use cms::enveloped_data::{
    EncryptedContentInfo, EnvelopedData, KeyTransRecipientInfo, RecipientIdentifier, RecipientInfo,
    RecipientInfos,
};
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

const ID_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.1");
const ID_SIGNED_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.2");
const ID_ENVELOPED_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.3");
const ID_CONTENT_TYPE: Oid = Oid::new_unwrap("1.2.840.113549.1.9.3");
const ID_MESSAGE_DIGEST: Oid = Oid::new_unwrap("1.2.840.113549.1.9.4");
const SHA256: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.1");
const RSA_ENCRYPTION: Oid = Oid::new_unwrap("1.2.840.113549.1.1.1");
const SHA256_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.11");
const AES256_CBC: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.1.42");
const AES128_CBC: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.1.2");
const DES_EDE3_CBC: Oid = Oid::new_unwrap("1.2.840.113549.3.7");
const DES_CBC: Oid = Oid::new_unwrap("1.3.14.3.2.7");
/// SCEP attributes (RFC 8894 §3.2.1).
const MESSAGE_TYPE: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.2");
const PKI_STATUS: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.3");
const FAIL_INFO: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.4");
const SENDER_NONCE: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.5");
const RECIPIENT_NONCE: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.6");
const TRANSACTION_ID: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.7");

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

fn der_err(e: impl std::fmt::Display) -> String {
    format!("SCEP message: {e}")
}

fn any<T: Encode>(v: &T) -> Result<Any, String> {
    Any::from_der(&v.to_der().map_err(der_err)?).map_err(der_err)
}

fn attribute(oid: Oid, value: Any) -> Result<Attribute, String> {
    let mut values = SetOfVec::new();
    values.insert(value).map_err(der_err)?;
    Ok(Attribute { oid, values })
}

fn rid(cert: &Certificate) -> IssuerAndSerialNumber {
    IssuerAndSerialNumber {
        issuer: cert.tbs_certificate.issuer.clone(),
        serial_number: cert.tbs_certificate.serial_number.clone(),
    }
}

/// An EnvelopedData of `content` for `recipient` (RSA PKCS#1 v1.5 key transport,
/// AES-256-CBC), as a ContentInfo.
pub fn envelope(content: &[u8], recipient: &Certificate) -> Result<Vec<u8>, String> {
    use aes::cipher::{BlockEncryptMut, KeyIvInit};
    use rsa::pkcs8::DecodePublicKey;
    let mut cek = zeroize::Zeroizing::new([0u8; 32]);
    let mut iv = [0u8; 16];
    {
        use rand_core::RngCore;
        rand_core::OsRng.fill_bytes(&mut cek[..]);
        rand_core::OsRng.fill_bytes(&mut iv);
    }
    let ciphertext = cbc::Encryptor::<aes::Aes256>::new(cek.as_ref().into(), &iv.into())
        .encrypt_padded_vec_mut::<aes::cipher::block_padding::Pkcs7>(content);
    let spki = recipient
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(der_err)?;
    let public = rsa::RsaPublicKey::from_public_key_der(&spki).map_err(|e| {
        format!("the CA certificate's key is not RSA ({e}): SCEP key transport needs RSA")
    })?;
    let enc_key = public
        .encrypt(&mut rand_core::OsRng, rsa::Pkcs1v15Encrypt, cek.as_ref())
        .map_err(der_err)?;
    let mut recipients = SetOfVec::new();
    recipients
        .insert(RecipientInfo::Ktri(KeyTransRecipientInfo {
            version: CmsVersion::V0,
            rid: RecipientIdentifier::IssuerAndSerialNumber(rid(recipient)),
            key_enc_alg: AlgorithmIdentifierOwned {
                oid: RSA_ENCRYPTION,
                parameters: Some(Any::from(x509_cert::der::asn1::AnyRef::NULL)),
            },
            enc_key: OctetString::new(enc_key).map_err(der_err)?,
        }))
        .map_err(der_err)?;
    let env = EnvelopedData {
        version: CmsVersion::V0,
        originator_info: None,
        recip_infos: RecipientInfos(recipients),
        encrypted_content: EncryptedContentInfo {
            content_type: ID_DATA,
            content_enc_alg: AlgorithmIdentifierOwned {
                oid: AES256_CBC,
                parameters: Some(any(&OctetString::new(iv.to_vec()).map_err(der_err)?)?),
            },
            encrypted_content: Some(OctetString::new(ciphertext).map_err(der_err)?),
        },
        unprotected_attrs: None,
    };
    ContentInfo {
        content_type: ID_ENVELOPED_DATA,
        content: any(&env)?,
    }
    .to_der()
    .map_err(der_err)
}

/// A pkiMessage of `kind` around `content` (the CSR, or for CertPoll the
/// IssuerAndSubject), enveloped for `ca` and signed in the token by `key` with its
/// certificate `signer_cert` (transient self-signed, or the current one for a renewal).
pub fn pki_message(
    kind: MessageType,
    content: &[u8],
    ca: &Certificate,
    key: &TokenKey,
    signer_cert: &Certificate,
    transaction_id: &str,
    nonce: &[u8; 16],
) -> Result<Vec<u8>, String> {
    let env = envelope(content, ca)?;
    let digest = sha2::Sha256::digest(&env);
    let mut attrs = SetOfVec::new();
    for a in [
        attribute(ID_CONTENT_TYPE, any(&ID_DATA)?)?,
        attribute(
            ID_MESSAGE_DIGEST,
            any(&OctetString::new(digest.to_vec()).map_err(der_err)?)?,
        )?,
        attribute(
            MESSAGE_TYPE,
            any(&PrintableStringRef::new(kind.code()).map_err(der_err)?)?,
        )?,
        attribute(
            TRANSACTION_ID,
            any(&PrintableStringRef::new(transaction_id).map_err(der_err)?)?,
        )?,
        attribute(
            SENDER_NONCE,
            any(&OctetString::new(nonce.to_vec()).map_err(der_err)?)?,
        )?,
    ] {
        attrs.insert(a).map_err(der_err)?;
    }
    // The signature covers the DER of the attributes as a SET (RFC 5652 §5.4).
    let signed = attrs.to_der().map_err(der_err)?;
    let signature = key
        .sign(hsm_shim::SignAlg::RsaPkcs1(hsm_shim::Hash::Sha256), &signed)
        .map_err(|e| format!("signing the SCEP message in the token: {e}"))?;
    let mut digests = SetOfVec::new();
    digests
        .insert(AlgorithmIdentifierOwned {
            oid: SHA256,
            parameters: None,
        })
        .map_err(der_err)?;
    let mut certs = SetOfVec::new();
    certs
        .insert(CertificateChoices::Certificate(signer_cert.clone()))
        .map_err(der_err)?;
    let mut signers = SetOfVec::new();
    signers
        .insert(SignerInfo {
            version: CmsVersion::V1,
            sid: SignerIdentifier::IssuerAndSerialNumber(rid(signer_cert)),
            digest_alg: AlgorithmIdentifierOwned {
                oid: SHA256,
                parameters: None,
            },
            signed_attrs: Some(attrs),
            signature_algorithm: AlgorithmIdentifierOwned {
                oid: SHA256_WITH_RSA,
                parameters: Some(Any::from(x509_cert::der::asn1::AnyRef::NULL)),
            },
            signature: OctetString::new(signature).map_err(der_err)?,
            unsigned_attrs: None,
        })
        .map_err(der_err)?;
    let sd = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: digests,
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: ID_DATA,
            econtent: Some(any(&OctetString::new(env).map_err(der_err)?)?),
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

/// Read a CertRep: its signed SCEP attributes, after checking its signature with one of
/// `ca_certs` (the CA or RA certificates from GetCACert).
pub fn cert_rep(der: &[u8], ca_certs: &[Certificate]) -> Result<CertRep, String> {
    let ci = ContentInfo::from_der(der).map_err(der_err)?;
    if ci.content_type != ID_SIGNED_DATA {
        return Err(format!(
            "SCEP answer is a {} , not SignedData",
            ci.content_type
        ));
    }
    // Read field by field: servers (Go's pkcs7 among them) send their certificates as a SET
    // that is not sorted, which strict DER refuses; the certificates are not needed (the
    // signature is checked with the CA's own, from GetCACert).
    let parts: Vec<Any> = ci.content.decode_as().map_err(der_err)?;
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
    verify_signer(si, attrs, &encap, ca_certs)?;
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
            "1.3.14.3.2.26" => (
                ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &content)
                    .as_ref()
                    .to_vec(),
                &ring::signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
            ),
            other => return Err(format!("SCEP answer signed with digest {other}: refused (MD5 and unknown digests are not accepted)")),
        };
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

/// The bytes of `[0] encryptedContent`: primitive, or constructed of OCTET STRING pieces.
fn encrypted_content(v: &Any) -> Result<Vec<u8>, String> {
    if !x509_cert::der::Tagged::tag(v).is_constructed() {
        return Ok(v.value().to_vec());
    }
    let mut reader = x509_cert::der::SliceReader::new(v.value()).map_err(der_err)?;
    let mut out = Vec::new();
    while !x509_cert::der::Reader::is_finished(&reader) {
        let piece: OctetString = x509_cert::der::Decode::decode(&mut reader).map_err(der_err)?;
        out.extend_from_slice(piece.as_bytes());
    }
    Ok(out)
}

/// Which content cipher an envelope uses, and whether it may be opened.
fn cipher(oid: &Oid, allow_legacy: bool) -> Result<(), String> {
    match *oid {
        AES256_CBC | AES128_CBC => Ok(()),
        DES_EDE3_CBC if allow_legacy => {
            tracing::warn!("the SCEP server encrypted its answer with 3DES (allowed by allow_legacy_crypto); prefer a server that uses AES");
            Ok(())
        }
        DES_EDE3_CBC => Err("the SCEP server encrypted its answer with 3DES: refused (set allow_legacy_crypto = true to accept it, with a warning)".into()),
        DES_CBC => Err("the SCEP server encrypted its answer with single DES (des-cbc), which is broken: refused; configure the server for AES".into()),
        ref other => Err(format!("the SCEP server encrypted its answer with {other}: not supported")),
    }
}

/// An envelope as read, before anything is decrypted.
#[derive(Debug)]
pub struct Envelope {
    /// The content cipher.
    pub cipher: Oid,
    /// Its IV.
    pub iv: Vec<u8>,
    /// The content key, encrypted to the recipient's RSA key.
    pub enc_key: Vec<u8>,
    /// The encrypted content.
    pub data: Vec<u8>,
}

/// Read an EnvelopedData (a ContentInfo) field by field, and the encrypted content in either
/// form: servers send it as a constructed [0] of OCTET STRING pieces (BER), which strict DER
/// refuses. Never panics.
pub fn read_envelope(der: &[u8]) -> Result<Envelope, String> {
    let ci = ContentInfo::from_der(der).map_err(der_err)?;
    let parts: Vec<Any> = ci.content.decode_as().map_err(der_err)?;
    let (Some(recips), Some(eci)) = (parts.get(1), parts.get(2)) else {
        return Err("SCEP envelope: an EnvelopedData too short".into());
    };
    let recips: RecipientInfos = recips.decode_as().map_err(der_err)?;
    let eci: Vec<Any> = eci.decode_as().map_err(der_err)?;
    let alg: AlgorithmIdentifierOwned = eci
        .get(1)
        .ok_or("SCEP envelope without a content cipher")?
        .decode_as()
        .map_err(der_err)?;
    let iv = alg
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<OctetString>().ok())
        .ok_or("SCEP envelope without an IV")?;
    let data = encrypted_content(eci.get(2).ok_or("SCEP envelope without content")?)?;
    let enc_key = recips
        .0
        .iter()
        .find_map(|r| match r {
            RecipientInfo::Ktri(k) => Some(k.enc_key.as_bytes().to_vec()),
            _ => None,
        })
        .ok_or("SCEP envelope has no key-transport recipient")?;
    Ok(Envelope {
        cipher: alg.oid,
        iv: iv.as_bytes().to_vec(),
        enc_key,
        data,
    })
}

/// Open an envelope addressed to `key`: the content key is decrypted in the token, the
/// content with it (AES-CBC, or 3DES where allowed; single DES never).
pub fn open_envelope(der: &[u8], key: &TokenKey, allow_legacy: bool) -> Result<Vec<u8>, String> {
    use aes::cipher::{BlockDecryptMut, KeyIvInit};
    let env = read_envelope(der)?;
    cipher(&env.cipher, allow_legacy)?;
    let cek = key
        .decrypt_rsa_pkcs1(&env.enc_key)
        .map_err(|e| format!("decrypting the SCEP answer's key in the token: {e}"))?;
    let bad = |_| "the SCEP answer does not decrypt (wrong key or damaged)".to_string();
    let (data, iv) = (&env.data[..], &env.iv[..]);
    match (env.cipher, cek.len()) {
        (AES256_CBC, 32) => cbc::Decryptor::<aes::Aes256>::new_from_slices(&cek, iv)
            .map_err(der_err)?
            .decrypt_padded_vec_mut::<aes::cipher::block_padding::Pkcs7>(data)
            .map_err(bad),
        (AES128_CBC, 16) => cbc::Decryptor::<aes::Aes128>::new_from_slices(&cek, iv)
            .map_err(der_err)?
            .decrypt_padded_vec_mut::<aes::cipher::block_padding::Pkcs7>(data)
            .map_err(bad),
        (DES_EDE3_CBC, 24) => cbc::Decryptor::<des::TdesEde3>::new_from_slices(&cek, iv)
            .map_err(der_err)?
            .decrypt_padded_vec_mut::<aes::cipher::block_padding::Pkcs7>(data)
            .map_err(bad),
        (oid, n) => Err(format!("SCEP envelope: a {n}-byte key for {oid}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn single_des_is_refused_and_3des_only_when_allowed() {
        assert!(cipher(&DES_CBC, true).unwrap_err().contains("single DES"));
        assert!(cipher(&DES_EDE3_CBC, false)
            .unwrap_err()
            .contains("allow_legacy_crypto"));
        assert!(cipher(&DES_EDE3_CBC, true).is_ok());
        assert!(cipher(&AES256_CBC, false).is_ok());
        assert_eq!(fail_info("1"), "badMessageCheck (1)");
    }

    proptest! {
        #[test]
        fn any_answer_is_read_without_a_panic(bytes in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..600)) {
            let _ = cert_rep(&bytes, &[]);
            let _ = read_envelope(&bytes);
        }
    }
}
