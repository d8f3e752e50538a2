//! `TokenKey`: one key pair in the token that signs. Every signer (TLS, CSR, JWS) goes here.

use crate::asn1;
use crate::error::{Error, Result};
use crate::keys::{KeyInfo, KeyRef, KeyType};
use crate::mechanisms::SignPlan;
use crate::token::Token;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use std::sync::Arc;

pub use crate::alg::{Hash, SignAlg};

/// Sees every token signature: mechanism family, seconds taken, and the CKR name when it
/// failed (the daemon feeds its metrics from it).
pub type SignObserver = fn(&'static str, f64, Option<&str>);

static OBSERVER: std::sync::OnceLock<SignObserver> = std::sync::OnceLock::new();

/// Install the process's signature observer (the first call wins).
pub fn set_sign_observer(f: SignObserver) {
    let _ = OBSERVER.set(f);
}

/// A key pair in the token that can sign. Cheap to clone; shares the token's session pool.
///
/// Every signature first asks the token whether the key is still there: the handle found at
/// the first signature is kept only while the token says it is still a private token key with
/// this `CKA_ID` (one C_GetAttributeValue); otherwise the key is looked up by `CKA_ID` again
/// (C_FindObjects). So a key destroyed by this process or by another program on the token (as
/// far as the token shows it) makes the next signature fail with an error that names the key,
/// and a handle the token hands out again for another object is never taken for this key.
#[derive(Clone)]
pub struct TokenKey {
    token: Arc<Token>,
    info: Arc<KeyInfo>,
    /// The private key's handle, as last confirmed by the token (shared by clones).
    handle: Arc<std::sync::Mutex<Option<cryptoki::object::ObjectHandle>>>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("token", &self.token.label())
            .field("id", &crate::keys::hex(&self.info.id))
            .field("label", &self.info.label)
            .field("type", &self.info.key_type)
            .finish()
    }
}

impl TokenKey {
    /// Open a key pair of the token for signing.
    pub fn open(token: Arc<Token>, key: &KeyRef) -> Result<TokenKey> {
        let info = token.find_key(key)?;
        Ok(TokenKey::from_info(token, info))
    }

    /// A signer for a key already looked up (no further token call).
    pub fn from_info(token: Arc<Token>, info: KeyInfo) -> TokenKey {
        TokenKey {
            token,
            info: Arc::new(info),
            handle: Arc::default(),
        }
    }

    /// The key as errors name it: its label and id.
    fn describe(&self) -> String {
        format!(
            "'{}' (id {}) in token '{}'",
            self.info.label,
            crate::keys::hex(&self.info.id),
            self.token.label()
        )
    }

    /// What is known of the key.
    pub fn info(&self) -> &KeyInfo {
        &self.info
    }

    /// Key type.
    pub fn key_type(&self) -> KeyType {
        self.info.key_type
    }

    /// The token.
    pub fn token(&self) -> &Arc<Token> {
        &self.token
    }

    /// Sign a digest computed by the caller (`alg`'s hash names which): ECDSA over the
    /// digest, RSA-PSS over the digest (CKM_RSA_PKCS_PSS), PKCS#1 v1.5 over its DigestInfo
    /// (CKM_RSA_PKCS).
    pub fn sign_digest(&self, alg: SignAlg, digest: &[u8]) -> Result<Vec<u8>> {
        let plan = self.plan(alg, true)?;
        let (mech, data) = input(plan, alg, digest, true)?;
        self.sign_input(plan, alg, mech, &data, true)
    }

    /// How the token signs `alg`: over a caller's digest (`prehashed`) or a message.
    fn plan(&self, alg: SignAlg, prehashed: bool) -> Result<SignPlan> {
        let mechs = self.token.mechanisms()?;
        if prehashed {
            mechs.plan_digest(self.info.key_type, alg)
        } else {
            mechs.plan_message(self.info.key_type, alg)
        }
    }

    /// Sign the token input `data` (from `input`) on a pooled session.
    fn sign_input(
        &self,
        plan: SignPlan,
        alg: SignAlg,
        mech: Mechanism<'static>,
        data: &[u8],
        prehashed: bool,
    ) -> Result<Vec<u8>> {
        match self.sign_raw(alg, mech, data) {
            // tpm2-pkcs11 makes CKM_RSA_PKCS a raw RSA decryption (TPM2_RSA_Decrypt), which a
            // sign-only key refuses (TPM_RC_ATTRIBUTES, reported as CKR_GENERAL_ERROR). The
            // key stays sign-only: a key that decrypts is a signing oracle for anything.
            Err(Error::Pkcs11 {
                function,
                ckr,
                cause,
                ..
            }) if prehashed && plan == SignPlan::DigestInSoftware(MechanismType::RSA_PKCS) => {
                Err(Error::Pkcs11 {
                    function,
                    ckr,
                    hint: " (this token cannot sign a ready-made digest with PKCS#1 v1.5 for a \
                           sign-only key: send the data instead of a digest, or use RSA-PSS)",
                    cause,
                })
            }
            other => other,
        }
    }

    /// Can the token make `alg` signatures with this key? (When the token will not say, yes:
    /// the signature itself then reports what went wrong.)
    pub fn supports(&self, alg: SignAlg) -> bool {
        self.token
            .mechanisms()
            .map(|m| m.supports(self.info.key_type, alg))
            .unwrap_or(true)
    }

    /// Sign `msg` in the token.
    pub fn sign(&self, alg: SignAlg, msg: &[u8]) -> Result<Vec<u8>> {
        let plan = self.plan(alg, false)?;
        let (mech, data) = input(plan, alg, msg, false)?;
        self.sign_input(plan, alg, mech, &data, false)
    }

    /// Decrypt an RSA PKCS#1 v1.5 key-transport block (a CMS `encryptedKey`) in the token; the
    /// key must have been made to decrypt ([`crate::Token::generate_key_for`]).
    pub fn decrypt_rsa_pkcs1(&self, ciphertext: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>> {
        if !matches!(self.key_type(), KeyType::Rsa2048 | KeyType::Rsa3072) {
            return Err(Error::InvalidRequest(format!(
                "RSA decryption with a {} key",
                self.key_type()
            )));
        }
        let out = self.token.with_session(|s| {
            let h = self.private_handle(s)?;
            Ok(s.decrypt(&Mechanism::RsaPkcs, h, ciphertext)?)
        })?;
        Ok(zeroize::Zeroizing::new(out))
    }

    fn sign_raw(&self, alg: SignAlg, mech: Mechanism<'static>, data: &[u8]) -> Result<Vec<u8>> {
        let start = std::time::Instant::now();
        let out = self.sign_in_token(alg, mech, data);
        let ckr = match &out {
            Err(Error::Pkcs11 { ckr, .. }) => Some(ckr.as_str()),
            Err(_) => Some("other"),
            Ok(_) => None,
        };
        observe(alg, start, ckr);
        out
    }

    fn sign_in_token(
        &self,
        alg: SignAlg,
        mech: Mechanism<'static>,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let raw = self.token.with_session(|s| {
            let h = self.private_handle(s)?;
            Ok(s.sign(&mech, h, data)?)
        })?;
        finish(alg, raw)
    }

    /// The private key's handle, confirmed by the token in this session (see the type's doc).
    fn private_handle(
        &self,
        s: &cryptoki::session::Session,
    ) -> Result<cryptoki::object::ObjectHandle> {
        let kept = *self.handle.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = kept {
            if crate::keys::is_private_key(s, h, &self.info.id)? {
                return Ok(h);
            }
        }
        let found = crate::keys::private_handle(s, &self.info.id).map_err(|e| match e {
            Error::KeyNotFound(_) => Error::KeyNotFound(self.describe()),
            other => other,
        });
        *self.handle.lock().unwrap_or_else(|p| p.into_inner()) = found.as_ref().ok().copied();
        found
    }
}

/// Tell the observer (metrics) of one signature begun at `start`.
fn observe(alg: SignAlg, start: std::time::Instant, ckr: Option<&str>) {
    if let Some(observe) = OBSERVER.get() {
        observe(alg.mechanism_name(), start.elapsed().as_secs_f64(), ckr);
    }
}

/// The signature as `alg` gives it from the token's output (ECDSA: r||s, or DER).
fn finish(alg: SignAlg, raw: Vec<u8>) -> Result<Vec<u8>> {
    match alg {
        SignAlg::Ecdsa { der: true, .. } => asn1::ecdsa_raw_to_der(&raw)
            .ok_or_else(|| Error::BadTokenData(format!("ECDSA signature of {} bytes", raw.len()))),
        _ => Ok(raw),
    }
}

/// The mechanism and the bytes to pass the token for `data`: a message (hashed here when
/// the token signs digests) or, with `prehashed`, the caller's digest (its length checked).
fn input(
    plan: SignPlan,
    alg: SignAlg,
    data: &[u8],
    prehashed: bool,
) -> Result<(Mechanism<'static>, Vec<u8>)> {
    let hash = alg.hash();
    if prehashed && data.len() as u64 != hash.output_len() {
        return Err(Error::InvalidRequest(format!(
            "a {} digest is {} bytes, not {}",
            hash.name(),
            hash.output_len(),
            data.len()
        )));
    }
    Ok(match plan {
        SignPlan::DigestInSoftware(_) if !prehashed => mechanism(plan, alg, &hash.digest(data)),
        _ => mechanism(plan, alg, data),
    })
}

/// The mechanism (with PSS parameters) and the data to pass for `plan`: `data` is the message
/// when the token hashes, else the digest (wrapped in a DigestInfo for CKM_RSA_PKCS).
pub(crate) fn mechanism(
    plan: SignPlan,
    alg: SignAlg,
    data: &[u8],
) -> (Mechanism<'static>, Vec<u8>) {
    let h = alg.hash();
    let (hash_alg, mgf) = match h {
        Hash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
        Hash::Sha384 => (MechanismType::SHA384, PkcsMgfType::MGF1_SHA384),
        Hash::Sha512 => (MechanismType::SHA512, PkcsMgfType::MGF1_SHA512),
    };
    let pss = PkcsPssParams {
        hash_alg,
        mgf,
        s_len: h.salt_len().into(),
    };
    let m = match plan {
        SignPlan::HashInToken(m) | SignPlan::DigestInSoftware(m) => m,
    };
    use MechanismType as M;
    let mech = match m {
        m if m == M::ECDSA => Mechanism::Ecdsa,
        m if m == M::ECDSA_SHA256 => Mechanism::EcdsaSha256,
        m if m == M::ECDSA_SHA384 => Mechanism::EcdsaSha384,
        m if m == M::ECDSA_SHA512 => Mechanism::EcdsaSha512,
        m if m == M::SHA256_RSA_PKCS => Mechanism::Sha256RsaPkcs,
        m if m == M::SHA384_RSA_PKCS => Mechanism::Sha384RsaPkcs,
        m if m == M::SHA512_RSA_PKCS => Mechanism::Sha512RsaPkcs,
        m if m == M::SHA256_RSA_PKCS_PSS => Mechanism::Sha256RsaPkcsPss(pss),
        m if m == M::SHA384_RSA_PKCS_PSS => Mechanism::Sha384RsaPkcsPss(pss),
        m if m == M::SHA512_RSA_PKCS_PSS => Mechanism::Sha512RsaPkcsPss(pss),
        m if m == M::RSA_PKCS_PSS => Mechanism::RsaPkcsPss(pss),
        // CKM_RSA_PKCS: the only other mechanism a plan names.
        _ => {
            let mut info = digest_info_prefix(h).to_vec();
            info.extend_from_slice(data);
            return (Mechanism::RsaPkcs, info);
        }
    };
    (mech, data.to_vec())
}

/// The DER DigestInfo prefix of PKCS#1 v1.5 signatures (RFC 8017 §9.2, note 1).
fn digest_info_prefix(h: Hash) -> &'static [u8] {
    match h {
        Hash::Sha256 => &[
            0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x05, 0x00, 0x04, 0x20,
        ],
        Hash::Sha384 => &[
            0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x02, 0x05, 0x00, 0x04, 0x30,
        ],
        Hash::Sha512 => &[
            0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x03, 0x05, 0x00, 0x04, 0x40,
        ],
    }
}
