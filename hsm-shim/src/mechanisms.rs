//! What the token can do, asked once (`C_GetMechanismList` + `C_GetMechanismInfo`) instead of
//! assumed: SoftHSM, tpm2-pkcs11 and vendor HSMs differ in key sizes, in whether they hash
//! inside the token (`CKM_ECDSA_SHA256`) or only sign a digest (`CKM_ECDSA`), and in PSS.
//! Key generation and every signature pick their mechanism here, and an error names what the
//! token lacks.

use crate::alg::{Hash, KeyType, SignAlg};
use crate::error::{Error, Result};
use cryptoki::mechanism::{MechanismInfo, MechanismType};

/// The mechanisms of one token with their info.
#[derive(Debug, Clone, Default)]
pub struct Mechanisms {
    list: Vec<(MechanismType, MechanismInfo)>,
}

/// How a signature is made in the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignPlan {
    /// The token hashes: pass the message to this mechanism.
    HashInToken(MechanismType),
    /// Hash in software; the token signs the digest with this mechanism
    /// (`CKM_ECDSA`, `CKM_RSA_PKCS` over a DigestInfo, `CKM_RSA_PKCS_PSS`).
    DigestInSoftware(MechanismType),
}

impl Mechanisms {
    /// A set from pairs (tests and the token).
    pub fn new(list: Vec<(MechanismType, MechanismInfo)>) -> Mechanisms {
        Mechanisms { list }
    }

    fn info(&self, m: MechanismType) -> Option<&MechanismInfo> {
        self.list.iter().find(|(t, _)| *t == m).map(|(_, i)| i)
    }

    fn can_sign(&self, m: MechanismType) -> bool {
        self.info(m).is_some_and(|i| i.sign())
    }

    /// Can the token generate a key pair of `kt`? `Err` says what it lacks.
    pub fn check_keygen(&self, kt: KeyType) -> Result<()> {
        let gen = if kt.is_ec() {
            MechanismType::ECC_KEY_PAIR_GEN
        } else {
            MechanismType::RSA_PKCS_KEY_PAIR_GEN
        };
        let Some(info) = self.info(gen).filter(|i| i.generate_key_pair()) else {
            return Err(Error::NotSupportedByToken(format!(
                "the token cannot generate {kt} keys: it has no {gen}"
            )));
        };
        // Sizes in bits: the modulus for RSA, the curve's field for EC (PKCS#11 2.40 §2.1.4,
        // §2.3.3). A token that reports no range (max 0) is not held to one.
        let bits = if kt.is_ec() {
            kt.ec_coord_len() * 8
        } else {
            kt.modulus_bits() as usize
        };
        let (min, max) = (info.min_key_size(), info.max_key_size());
        if max > 0 && (bits < min || bits > max) {
            return Err(Error::NotSupportedByToken(format!(
                "the token cannot generate {kt} keys: its {gen} takes {min} to {max} bits"
            )));
        }
        Ok(())
    }

    /// How to sign `msg` with `alg` on a `kt` key: the token's hashing mechanism when it has
    /// one, else its digest-signing mechanism.
    pub fn plan_message(&self, kt: KeyType, alg: SignAlg) -> Result<SignPlan> {
        let (hashing, digest) = candidates(kt, alg)?;
        // ECDSA: software hashing first. SoftHSM and most HSMs offer CKM_ECDSA, and a digest
        // is all a TLS or CSR signature needs; RSA: the token's own hash mechanism first.
        if kt.is_ec() && self.can_sign(digest) {
            return Ok(SignPlan::DigestInSoftware(digest));
        }
        if self.can_sign(hashing) {
            return Ok(SignPlan::HashInToken(hashing));
        }
        if self.can_sign(digest) {
            return Ok(SignPlan::DigestInSoftware(digest));
        }
        Err(lacks(alg, &[hashing, digest]))
    }

    /// How to sign a caller's digest with `alg`: only a digest-signing mechanism will do.
    pub fn plan_digest(&self, kt: KeyType, alg: SignAlg) -> Result<SignPlan> {
        let (_, digest) = candidates(kt, alg)?;
        if self.can_sign(digest) {
            Ok(SignPlan::DigestInSoftware(digest))
        } else {
            Err(lacks(alg, &[digest]))
        }
    }

    /// Can `alg` be used with a `kt` key on this token at all?
    pub fn supports(&self, kt: KeyType, alg: SignAlg) -> bool {
        self.plan_message(kt, alg).is_ok()
    }
}

fn lacks(alg: SignAlg, wanted: &[MechanismType]) -> Error {
    let names: Vec<String> = wanted.iter().map(|m| m.to_string()).collect();
    Error::NotSupportedByToken(format!(
        "the token cannot make {} signatures: it has none of {}",
        alg.describe(),
        names.join(", ")
    ))
}

/// (mechanism that hashes in the token, mechanism that signs a digest) for `alg` on `kt`.
fn candidates(kt: KeyType, alg: SignAlg) -> Result<(MechanismType, MechanismType)> {
    use MechanismType as M;
    Ok(match (alg, kt.is_ec()) {
        (SignAlg::Ecdsa { hash, .. }, true) => (
            match hash {
                Hash::Sha256 => M::ECDSA_SHA256,
                Hash::Sha384 => M::ECDSA_SHA384,
                Hash::Sha512 => M::ECDSA_SHA512,
            },
            M::ECDSA,
        ),
        (SignAlg::RsaPkcs1(h), false) => (
            match h {
                Hash::Sha256 => M::SHA256_RSA_PKCS,
                Hash::Sha384 => M::SHA384_RSA_PKCS,
                Hash::Sha512 => M::SHA512_RSA_PKCS,
            },
            M::RSA_PKCS,
        ),
        (SignAlg::RsaPss(h), false) => (
            match h {
                Hash::Sha256 => M::SHA256_RSA_PKCS_PSS,
                Hash::Sha384 => M::SHA384_RSA_PKCS_PSS,
                Hash::Sha512 => M::SHA512_RSA_PKCS_PSS,
            },
            M::RSA_PKCS_PSS,
        ),
        (alg, _) => {
            return Err(Error::InvalidRequest(format!(
                "{} with a {kt} key",
                alg.describe()
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::mechanism::MechanismInfo;

    fn info(min: u32, max: u32, flags: cryptoki_sys::CK_FLAGS) -> MechanismInfo {
        let raw = cryptoki_sys::CK_MECHANISM_INFO {
            ulMinKeySize: min as _,
            ulMaxKeySize: max as _,
            flags,
        };
        raw.into()
    }
    const SIGN: cryptoki_sys::CK_FLAGS = cryptoki_sys::CKF_SIGN;
    const GEN: cryptoki_sys::CK_FLAGS = cryptoki_sys::CKF_GENERATE_KEY_PAIR;

    #[test]
    fn picks_what_the_token_has_and_names_what_it_lacks() {
        let m = Mechanisms::new(vec![
            (MechanismType::RSA_PKCS_KEY_PAIR_GEN, info(1024, 2048, GEN)),
            (MechanismType::SHA256_RSA_PKCS, info(1024, 2048, SIGN)),
            (MechanismType::RSA_PKCS_PSS, info(1024, 2048, SIGN)),
            (MechanismType::ECDSA_SHA256, info(256, 384, SIGN)),
        ]);
        assert!(m.check_keygen(KeyType::Rsa2048).is_ok());
        let e = m.check_keygen(KeyType::Rsa3072).unwrap_err().to_string();
        assert!(e.contains("1024 to 2048 bits"), "{e}");
        let e = m.check_keygen(KeyType::EcP256).unwrap_err().to_string();
        assert!(e.contains("CKM_EC_KEY_PAIR_GEN"), "{e}");
        let ec_only_256 =
            Mechanisms::new(vec![(MechanismType::ECC_KEY_PAIR_GEN, info(256, 256, GEN))]);
        assert!(ec_only_256.check_keygen(KeyType::EcP256).is_ok());
        let e = ec_only_256
            .check_keygen(KeyType::EcP384)
            .unwrap_err()
            .to_string();
        assert!(e.contains("256 to 256 bits"), "{e}");
        let ec = SignAlg::Ecdsa {
            hash: Hash::Sha256,
            der: true,
        };
        assert_eq!(
            m.plan_message(KeyType::EcP256, ec).unwrap(),
            SignPlan::HashInToken(MechanismType::ECDSA_SHA256)
        );
        let e = m.plan_digest(KeyType::EcP256, ec).unwrap_err().to_string();
        assert!(e.contains("CKM_ECDSA"), "{e}");
        let pss = SignAlg::RsaPss(Hash::Sha256);
        assert_eq!(
            m.plan_message(KeyType::Rsa2048, pss).unwrap(),
            SignPlan::DigestInSoftware(MechanismType::RSA_PKCS_PSS)
        );
        assert!(!m.supports(KeyType::Rsa2048, SignAlg::RsaPkcs1(Hash::Sha384)));
    }
}
