//! The little DER this crate writes and reads: SPKI, ECDSA-Sig-Value, EC points.
//! Kept by hand because it is a handful of TLVs on the signing path.

/// Encode one TLV.
pub(crate) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    push_len(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// A DER INTEGER from unsigned big-endian bytes.
pub(crate) fn uint(be: &[u8]) -> Vec<u8> {
    let start = be.iter().take_while(|b| **b == 0).count();
    let mut v = &be[start..];
    if v.is_empty() {
        v = &[0];
    }
    let mut content = Vec::with_capacity(v.len() + 1);
    if v[0] & 0x80 != 0 {
        content.push(0);
    }
    content.extend_from_slice(v);
    tlv(0x02, &content)
}

/// SEQUENCE of already encoded parts.
pub(crate) fn seq(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

/// BIT STRING with no unused bits.
pub(crate) fn bit_string(bytes: &[u8]) -> Vec<u8> {
    let mut c = Vec::with_capacity(bytes.len() + 1);
    c.push(0);
    c.extend_from_slice(bytes);
    tlv(0x03, &c)
}

/// Read one TLV at the start of `input`: (tag, content, rest). None on malformed input.
pub(crate) fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, b| (a << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Raw r||s (as PKCS#11 CKM_ECDSA returns) to DER ECDSA-Sig-Value.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    Some(seq(&[&uint(r), &uint(s)]))
}

/// DER ECDSA-Sig-Value to raw r||s with each half `coord_len` bytes (for JWS).
pub fn ecdsa_der_to_raw(der: &[u8], coord_len: usize) -> Option<Vec<u8>> {
    let (tag, body, rest) = read_tlv(der)?;
    if tag != 0x30 || !rest.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(coord_len * 2);
    let mut cur = body;
    for _ in 0..2 {
        let (tag, int, rest) = read_tlv(cur)?;
        if tag != 0x02 {
            return None;
        }
        let start = int.iter().take_while(|b| **b == 0).count();
        let v = &int[start..];
        if v.len() > coord_len {
            return None;
        }
        out.extend(std::iter::repeat_n(0, coord_len - v.len()));
        out.extend_from_slice(v);
        cur = rest;
    }
    cur.is_empty().then_some(out)
}

/// CKA_EC_POINT as an uncompressed point. SoftHSM wraps it in an OCTET STRING (as the
/// spec says); some tokens return the bare point. Accept both.
pub fn ec_point_unwrap(value: &[u8], coord_len: usize) -> Option<Vec<u8>> {
    let raw_len = 1 + 2 * coord_len;
    if value.len() == raw_len && value[0] == 0x04 {
        return Some(value.to_vec());
    }
    let (tag, content, rest) = read_tlv(value)?;
    if tag == 0x04 && rest.is_empty() && content.len() == raw_len && content[0] == 0x04 {
        return Some(content.to_vec());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn long_lengths() {
        let v = tlv(0x04, &[0u8; 300]);
        assert_eq!(&v[..4], &[0x04, 0x82, 0x01, 0x2c]);
        let (t, c, r) = read_tlv(&v).unwrap();
        assert_eq!((t, c.len(), r.len()), (4, 300, 0));
    }

    #[test]
    fn ec_point_both_forms() {
        let mut raw = vec![4u8];
        raw.extend([7u8; 64]);
        assert_eq!(ec_point_unwrap(&raw, 32).unwrap(), raw);
        let wrapped = tlv(0x04, &raw);
        assert_eq!(ec_point_unwrap(&wrapped, 32).unwrap(), raw);
        assert!(ec_point_unwrap(&wrapped[..10], 32).is_none());
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
            let _ = read_tlv(&bytes);
            let _ = ecdsa_der_to_raw(&bytes, 32);
            let _ = ec_point_unwrap(&bytes, 48);
        }
    }
}
