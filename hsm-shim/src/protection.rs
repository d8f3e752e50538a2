//! What a check of a private key's protection finds: sensitive, never extractable, the
//! secret attributes unreadable, and in a TPM an object that can never leave it.

use crate::error::{Error, Result};
use crate::keys::private_handle;
use crate::token::Token;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;

impl Token {
    /// For tests: is each protection attribute of the private key as it must be?
    /// Returns (sensitive, extractable, value readable).
    pub fn private_key_protection(&self, id: &[u8]) -> Result<PrivateKeyProtection> {
        use cryptoki::object::AttributeInfo;
        self.with_session(|s| {
            let h = private_handle(s, id)?;
            let mut p = PrivateKeyProtection::default();
            for a in s.get_attributes(
                h,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                ],
            )? {
                match a {
                    Attribute::Sensitive(v) => p.sensitive = v,
                    Attribute::Extractable(v) => p.extractable = v,
                    Attribute::NeverExtractable(v) => p.never_extractable = v,
                    _ => {}
                }
            }
            let secret_attrs = [
                AttributeType::Value,
                AttributeType::PrivateExponent,
                AttributeType::Prime1,
            ];
            for info in s.get_attribute_info(h, &secret_attrs)? {
                match info {
                    AttributeInfo::Sensitive => p.secret_attrs_sensitive += 1,
                    AttributeInfo::Available(_) => p.secret_attrs_readable += 1,
                    _ => {}
                }
            }
            p.set_extractable_refused = s
                .update_attributes(h, &[Attribute::Extractable(true)])
                .is_err();
            if !p.set_extractable_refused {
                // tpm2-pkcs11 takes it (PKCS#11 allows only true -> false): put it back.
                s.update_attributes(h, &[Attribute::Extractable(false)])?;
            }
            p.tpm_object_fixed = tpm_object_fixed(s, h)?;
            Ok(p)
        })
    }
}

/// tpm2-pkcs11's vendor attribute holding the key's TPM2B_PUBLIC (`CKA_TPM2_PUB_BLOB`).
const CKA_TPM2_PUB_BLOB: std::ffi::c_ulong = 0x8F00_0002;

/// For a key in a TPM (tpm2-pkcs11): are fixedTPM, fixedParent and sensitiveDataOrigin set
/// in its TPM object, i.e. was it made inside this TPM and can never be duplicated out of
/// it? `None` on other tokens.
fn tpm_object_fixed(s: &Session, h: ObjectHandle) -> Result<Option<bool>> {
    const FIXED_TPM: u32 = 1 << 1;
    const FIXED_PARENT: u32 = 1 << 4;
    const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    let t = AttributeType::VendorDefined(CKA_TPM2_PUB_BLOB);
    let Ok(attrs) = s.get_attributes(h, &[t]) else {
        return Ok(None);
    };
    for a in attrs {
        if let Attribute::VendorDefined((_, blob)) = a {
            // TPM2B_PUBLIC: size (2), type (2), nameAlg (2), objectAttributes (4), big-endian.
            let Some(bytes) = blob.get(6..10) else {
                return Err(Error::BadTokenData(format!(
                    "TPM public blob of {} bytes",
                    blob.len()
                )));
            };
            let attrs = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            let want = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN;
            return Ok(Some(attrs & want == want));
        }
    }
    Ok(None)
}

/// What a check of a private key's protection found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrivateKeyProtection {
    /// `CKA_SENSITIVE`.
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`.
    pub extractable: bool,
    /// `CKA_NEVER_EXTRACTABLE`.
    pub never_extractable: bool,
    /// Secret attributes (`CKA_VALUE`, `CKA_PRIVATE_EXPONENT`, `CKA_PRIME_1`) that answered "sensitive".
    pub secret_attrs_sensitive: usize,
    /// Secret attributes whose value could be read (must be 0).
    pub secret_attrs_readable: usize,
    /// Whether setting `CKA_EXTRACTABLE` to true was refused.
    pub set_extractable_refused: bool,
    /// In a TPM: whether its TPM object is fixedTPM, fixedParent and sensitiveDataOrigin.
    pub tpm_object_fixed: Option<bool>,
}
