//! The DER this crate writes and reads: SubjectPublicKeyInfo, RSAPublicKey, ECDSA-Sig-Value
//! and EC points, through the `der` and `spki` crates. Strict DER: a non-canonical encoding
//! from a token (a long-form length that fits the short form, an integer with a needless
//! leading zero) is refused, never guessed at.

use der::asn1::{AnyRef, BitString, OctetStringRef, UintRef};
use der::{Decode, Encode, Sequence};
use spki::{AlgorithmIdentifierOwned, ObjectIdentifier, SubjectPublicKeyInfoOwned};

/// id-ecPublicKey (RFC 5480).
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// rsaEncryption (RFC 8017).
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// ECDSA-Sig-Value (RFC 5480 §2.2 / RFC 3279).
#[derive(Sequence)]
struct EcdsaSig<'a> {
    r: UintRef<'a>,
    s: UintRef<'a>,
}

/// RSAPublicKey (RFC 8017 A.1.1).
#[derive(Sequence)]
struct RsaPublicKey<'a> {
    n: UintRef<'a>,
    e: UintRef<'a>,
}

/// The SubjectPublicKeyInfo of an EC key (`ec_params`: the DER of its named-curve OID, as
/// in CKA_EC_PARAMS) or of an RSA key (`None`), around `public_bits`.
pub(crate) fn spki(ec_params: Option<&[u8]>, public_bits: &[u8]) -> Result<Vec<u8>, der::Error> {
    let algorithm = match ec_params {
        Some(params) => AlgorithmIdentifierOwned {
            oid: EC_PUBLIC_KEY,
            parameters: Some(AnyRef::from_der(params)?.into()),
        },
        None => AlgorithmIdentifierOwned {
            oid: RSA_ENCRYPTION,
            parameters: Some(AnyRef::NULL.into()),
        },
    };
    SubjectPublicKeyInfoOwned {
        algorithm,
        subject_public_key: BitString::from_bytes(public_bits)?,
    }
    .to_der()
}

/// RSAPublicKey from the modulus and public exponent (unsigned big-endian, as PKCS#11 gives).
pub(crate) fn rsa_public_key(n: &[u8], e: &[u8]) -> Result<Vec<u8>, der::Error> {
    RsaPublicKey {
        n: UintRef::new(n)?,
        e: UintRef::new(e)?,
    }
    .to_der()
}

/// The modulus and public exponent of an RSAPublicKey (unsigned big-endian).
pub fn rsa_public_parts(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let k = RsaPublicKey::from_der(der).ok()?;
    Some((k.n.as_bytes().to_vec(), k.e.as_bytes().to_vec()))
}

/// Raw r||s (as PKCS#11 CKM_ECDSA returns) to DER ECDSA-Sig-Value.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    EcdsaSig {
        r: UintRef::new(r).ok()?,
        s: UintRef::new(s).ok()?,
    }
    .to_der()
    .ok()
}

/// DER ECDSA-Sig-Value to raw r||s with each half `coord_len` bytes (for JWS).
pub fn ecdsa_der_to_raw(der: &[u8], coord_len: usize) -> Option<Vec<u8>> {
    let sig = EcdsaSig::from_der(der).ok()?;
    let mut out = Vec::with_capacity(coord_len * 2);
    for v in [sig.r.as_bytes(), sig.s.as_bytes()] {
        if v.len() > coord_len {
            return None;
        }
        out.extend(std::iter::repeat_n(0, coord_len - v.len()));
        out.extend_from_slice(v);
    }
    Some(out)
}

/// CKA_EC_POINT as an uncompressed point. SoftHSM wraps it in an OCTET STRING (as the
/// spec says); some tokens return the bare point. Accept both.
pub fn ec_point_unwrap(value: &[u8], coord_len: usize) -> Option<Vec<u8>> {
    let raw_len = 1 + 2 * coord_len;
    if value.len() == raw_len && value[0] == 0x04 {
        return Some(value.to_vec());
    }
    let content = OctetStringRef::from_der(value).ok()?.as_bytes();
    (content.len() == raw_len && content[0] == 0x04).then(|| content.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ec_point_both_forms_and_only_canonical_der() {
        let mut raw = vec![4u8];
        raw.extend([7u8; 64]);
        assert_eq!(ec_point_unwrap(&raw, 32).unwrap(), raw);
        let mut wrapped = vec![0x04, 65];
        wrapped.extend(&raw);
        assert_eq!(ec_point_unwrap(&wrapped, 32).unwrap(), raw);
        assert!(ec_point_unwrap(&wrapped[..10], 32).is_none());
        // The same OCTET STRING with a long-form length (0x81 0x41): not DER.
        let mut long = vec![0x04, 0x81, 65];
        long.extend(&raw);
        assert!(ec_point_unwrap(&long, 32).is_none());
    }

    #[test]
    fn a_needless_leading_zero_in_a_signature_is_refused() {
        // r = 0x00 0x01 (not minimal), s = 0x01.
        let bad = [0x30, 0x07, 0x02, 0x02, 0x00, 0x01, 0x02, 0x01, 0x01];
        assert!(ecdsa_der_to_raw(&bad, 32).is_none());
        let good = [0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01];
        assert!(ecdsa_der_to_raw(&good, 32).is_some());
    }

    #[test]
    fn spki_matches_the_known_encodings() {
        let p256 = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        let der = spki(Some(&p256), &[4u8; 65]).unwrap();
        assert_eq!(&der[..4], &[0x30, 0x59, 0x30, 0x13]);
        let rsa = spki(None, &rsa_public_key(&[0xc1; 256], &[1, 0, 1]).unwrap()).unwrap();
        assert_eq!(
            &rsa[..19],
            &[
                0x30, 0x82, 0x01, 0x22, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d,
                0x01, 0x01, 0x01, 0x05, 0x00
            ]
        );
    }

    proptest! {
        #[test]
        fn ecdsa_round_trip(r in proptest::collection::vec(any::<u8>(), 32), s in proptest::collection::vec(any::<u8>(), 32)) {
            let raw = [r, s].concat();
            let der = ecdsa_raw_to_der(&raw).unwrap();
            prop_assert_eq!(ecdsa_der_to_raw(&der, 32).unwrap(), raw);
        }

        #[test]
        fn readers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ecdsa_der_to_raw(&bytes, 32);
            let _ = ec_point_unwrap(&bytes, 48);
        }
    }
}
