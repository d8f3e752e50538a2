//! The pkcsPKIEnvelope (a CMS EnvelopedData): ours is AES-256-CBC with the content key
//! transported to the CA (or RA) certificate's RSA key; an answer's is opened with the token
//! key (`C_Decrypt`), AES-CBC, 3DES only where `allow_legacy_crypto` says so, single DES only
//! where `allow_des_answer` says so (it then carries nothing but the issued certificate).

use super::message::{any, der_err, rid, ID_DATA};
use cms::content_info::{CmsVersion, ContentInfo};
use cms::enveloped_data::{
    EncryptedContentInfo, EnvelopedData, KeyTransRecipientInfo, RecipientIdentifier, RecipientInfo,
    RecipientInfos,
};
use hsm_shim::TokenKey;
use x509_cert::der::asn1::{ObjectIdentifier as Oid, OctetString, SetOfVec};
use x509_cert::der::{Any, Decode, Encode};
use x509_cert::spki::AlgorithmIdentifierOwned;
use x509_cert::Certificate;

const ID_ENVELOPED_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.3");
const RSA_ENCRYPTION: Oid = Oid::new_unwrap("1.2.840.113549.1.1.1");
const AES256_CBC: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.1.42");
const AES128_CBC: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.1.2");
const DES_EDE3_CBC: Oid = Oid::new_unwrap("1.2.840.113549.3.7");
const DES_CBC: Oid = Oid::new_unwrap("1.3.14.3.2.7");

/// Which old ciphers an answer may use (the configuration's switches).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Legacy {
    /// 3DES (and SHA-1 signatures): `allow_legacy_crypto`.
    pub triple_des: bool,
    /// Single DES, for the answer only: `allow_des_answer`.
    pub single_des: bool,
}

/// An EnvelopedData of `content` for `recipient` (RSA PKCS#1 v1.5 key transport,
/// AES-256-CBC, or 3DES-CBC for a CA without AES where the configuration allows it), as a
/// ContentInfo.
pub fn envelope(
    content: &[u8],
    recipient: &Certificate,
    triple_des: bool,
) -> Result<Vec<u8>, String> {
    use rsa::pkcs8::DecodePublicKey;
    let (key_len, iv_len, oid) = if triple_des {
        (24, 8, DES_EDE3_CBC)
    } else {
        (32, 16, AES256_CBC)
    };
    let mut cek = zeroize::Zeroizing::new(vec![0u8; key_len]);
    let mut iv = vec![0u8; iv_len];
    {
        use rand_core::RngCore;
        rand_core::OsRng.fill_bytes(&mut cek[..]);
        rand_core::OsRng.fill_bytes(&mut iv);
    }
    let ciphertext = if triple_des {
        cbc_seal::<des::TdesEde3>(&cek, &iv, content)?
    } else {
        cbc_seal::<aes::Aes256>(&cek, &iv, content)?
    };
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
                oid,
                parameters: Some(any(&OctetString::new(iv).map_err(der_err)?)?),
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
fn cipher(oid: &Oid, legacy: Legacy) -> Result<(), String> {
    match *oid {
        AES256_CBC | AES128_CBC => Ok(()),
        DES_EDE3_CBC if legacy.triple_des => {
            tracing::warn!("the SCEP server encrypted its answer with 3DES (allowed by allow_legacy_crypto); prefer a server that uses AES");
            Ok(())
        }
        DES_EDE3_CBC => Err("the SCEP server encrypted its answer with 3DES: refused (set allow_legacy_crypto = true to accept it, with a warning)".into()),
        DES_CBC if legacy.single_des => {
            tracing::warn!("the SCEP server encrypted its answer with single DES (allowed by allow_des_answer: it carries only the issued certificate, whose chain, dates and key are validated); configure the server for AES");
            Ok(())
        }
        DES_CBC => Err("the SCEP server encrypted its answer with single DES (des-cbc), which is broken: refused; configure the server for AES (or, since the answer carries only the public certificate, set allow_des_answer = true)".into()),
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
/// content with it (AES-CBC, or 3DES / single DES where `legacy` allows).
pub fn open_envelope(der: &[u8], key: &TokenKey, legacy: Legacy) -> Result<Vec<u8>, String> {
    let env = read_envelope(der)?;
    cipher(&env.cipher, legacy)?;
    let cek = key
        .decrypt_rsa_pkcs1(&env.enc_key)
        .map_err(|e| format!("decrypting the SCEP answer's key in the token: {e}"))?;
    let (data, iv) = (&env.data[..], &env.iv[..]);
    let opened = match (env.cipher, cek.len()) {
        (AES256_CBC, 32) => cbc_open::<aes::Aes256>(&cek, iv, data),
        (AES128_CBC, 16) => cbc_open::<aes::Aes128>(&cek, iv, data),
        (DES_EDE3_CBC, 24) => cbc_open::<des::TdesEde3>(&cek, iv, data),
        (DES_CBC, 8) => cbc_open::<des::Des>(&cek, iv, data),
        (oid, n) => return Err(format!("SCEP envelope: a {n}-byte key for {oid}")),
    };
    opened.ok_or_else(|| "the SCEP answer does not decrypt (wrong key or damaged)".to_string())
}

/// CBC with PKCS#7 padding under cipher `C`: `None` when the key, IV or padding is wrong.
fn cbc_open<C>(key: &[u8], iv: &[u8], data: &[u8]) -> Option<Vec<u8>>
where
    C: aes::cipher::BlockDecryptMut + aes::cipher::BlockCipher + aes::cipher::KeyInit,
{
    use aes::cipher::{BlockDecryptMut, KeyIvInit};
    cbc::Decryptor::<C>::new_from_slices(key, iv)
        .ok()?
        .decrypt_padded_vec_mut::<aes::cipher::block_padding::Pkcs7>(data)
        .ok()
}

/// CBC with PKCS#7 padding under cipher `C`.
fn cbc_seal<C>(key: &[u8], iv: &[u8], data: &[u8]) -> Result<Vec<u8>, String>
where
    C: aes::cipher::BlockEncryptMut + aes::cipher::BlockCipher + aes::cipher::KeyInit,
{
    use aes::cipher::{BlockEncryptMut, KeyIvInit};
    Ok(cbc::Encryptor::<C>::new_from_slices(key, iv)
        .map_err(der_err)?
        .encrypt_padded_vec_mut::<aes::cipher::block_padding::Pkcs7>(data))
}

/// The recipient an envelope is addressed to (issuer and serial), to pick the key that opens
/// it.
pub fn recipient(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let ci = ContentInfo::from_der(der).ok()?;
    let parts: Vec<Any> = ci.content.decode_as().ok()?;
    let recips: RecipientInfos = parts.get(1)?.decode_as().ok()?;
    recips.0.iter().find_map(|r| match r {
        RecipientInfo::Ktri(k) => match &k.rid {
            RecipientIdentifier::IssuerAndSerialNumber(i) => {
                Some((i.issuer.to_der().ok()?, i.serial_number.as_bytes().to_vec()))
            }
            _ => None,
        },
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn des_and_3des_only_when_allowed() {
        let none = Legacy::default();
        assert!(cipher(&DES_CBC, none).unwrap_err().contains("single DES"));
        assert!(cipher(
            &DES_CBC,
            Legacy {
                triple_des: true,
                single_des: false
            }
        )
        .is_err());
        assert!(cipher(
            &DES_CBC,
            Legacy {
                triple_des: false,
                single_des: true
            }
        )
        .is_ok());
        assert!(cipher(&DES_EDE3_CBC, none)
            .unwrap_err()
            .contains("allow_legacy_crypto"));
        assert!(cipher(
            &DES_EDE3_CBC,
            Legacy {
                triple_des: true,
                single_des: false
            }
        )
        .is_ok());
        assert!(cipher(&AES256_CBC, none).is_ok());
    }

    proptest! {
        #[test]
        fn any_envelope_is_read_without_a_panic(bytes in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..600)) {
            let _ = read_envelope(&bytes);
            let _ = recipient(&bytes);
        }
    }
}
