//! One generation of an identity in the register: what it has depends on how far its
//! enrolment got, and its type says so ([`Material`]). On disk it keeps the flat form
//! every release so far wrote (`GenerationFile`), so registers written by earlier
//! releases load unchanged and a register written now loads in them.

use crate::clock::Unix;
use serde::{Deserialize, Serialize};

mod file;

/// The life of one generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GenStatus {
    /// Being enrolled.
    Pending,
    /// Serving.
    Current,
    /// Replaced; still valid until the overlap ends.
    Overlap,
    /// Key objects destroyed.
    Retired,
    /// Revoked; key objects destroyed.
    Revoked,
    /// Enrolment abandoned (refused certificate, rejected CSR); key objects destroyed.
    Failed,
}

impl GenStatus {
    /// Still holding key objects in the token (pending, current or overlapping).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            GenStatus::Pending | GenStatus::Current | GenStatus::Overlap
        )
    }
}

/// A generation's key pair in the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// `CKA_ID` of its objects.
    pub id: Vec<u8>,
    /// `pkcs11:` URI of the private key.
    pub uri: String,
}

impl KeyRecord {
    /// The `CKA_ID` in hex, as `pkcs11-tool` and the register file show it.
    pub fn id_hex(&self) -> String {
        hsm_shim::keys::hex(&self.id)
    }
}

/// A certificate that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The chain as issued (PEM, leaf first).
    pub chain_pem: String,
    /// Serial, hex.
    pub serial: String,
    /// SHA-256 fingerprint of the leaf, hex.
    pub fingerprint: String,
    /// Not before.
    pub not_before: Unix,
    /// Not after.
    pub not_after: Unix,
    /// The subject as issued, when it differs from the request.
    pub subject_issued: Option<String>,
    /// How the issued names differ from the request (accepted by `subject_match`).
    pub name_differences: Vec<String>,
}

/// A credential rotation request, kept so a retry sends the same `kid` and dates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationRequest {
    /// The exact request body.
    pub body: String,
    /// `CurrentKeyExpiry` asked for the previous key.
    pub previous_expiry: Unix,
}

/// What a generation holds, by how far its enrolment got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Material {
    /// Planned: no key yet (or one being made under its label).
    Planned,
    /// A certificate identity whose key and CSR exist, not issued yet.
    Requested {
        /// Its key.
        key: KeyRecord,
        /// The CSR (PEM).
        csr_pem: String,
        /// The issuer's reference of the submission, once submitted.
        submission: Option<String>,
    },
    /// A certificate came back and is not checked yet.
    Issued {
        /// Its key.
        key: KeyRecord,
        /// The CSR (PEM).
        csr_pem: String,
        /// The issuer's reference of the submission.
        submission: Option<String>,
        /// The chain as it came (PEM, leaf first).
        chain_pem: String,
    },
    /// The certificate passed validation.
    Certified {
        /// Its key.
        key: KeyRecord,
        /// The CSR (PEM).
        csr_pem: String,
        /// The issuer's reference of the submission.
        submission: Option<String>,
        /// The certificate.
        cert: IssuedCert,
    },
    /// A JWK credential (jwk-rotation identities): key and `kid` exist.
    Credential {
        /// Its key.
        key: KeyRecord,
        /// Its `kid`.
        kid: String,
        /// The rotation request (none for the first credential, exported by hand).
        request: Option<RotationRequest>,
        /// When the rotation was sent (recorded before sending: after a crash the outcome is
        /// unknown and is found out, never guessed).
        sent_at: Option<Unix>,
        /// The API's reference of the rotation.
        submission: Option<String>,
        /// Valid from, until (once asked for or activated).
        validity: Option<(Unix, Unix)>,
    },
}

/// One key pair and its certificate or credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "file::GenerationFile", into = "file::GenerationFile")]
pub struct Generation {
    /// 1, 2, 3, ... per identity.
    pub number: u32,
    /// Status.
    pub status: GenStatus,
    /// `CKA_LABEL` of its key objects.
    pub key_label: String,
    /// Subject requested.
    pub subject: String,
    /// SANs requested.
    pub sans: Vec<String>,
    /// Issuer name.
    pub issuer: String,
    /// When it was planned.
    pub created_at: Unix,
    /// Until when an overlapping old generation stays.
    pub overlap_until: Option<Unix>,
    /// Reminder marks (seconds before expiry) already raised.
    pub reminders_fired: Vec<u64>,
    /// What it holds.
    pub material: Material,
}

/// A generation lacks what its step needs (never filled in with an empty value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("generation {generation} ({status}) in the register has no {field}, which the next step needs: the register was edited or damaged; `edge-signer rotate NAME --now` starts a new generation")]
pub struct Missing {
    /// The generation.
    pub generation: u32,
    /// What is missing.
    pub field: &'static str,
    /// Its status.
    pub status: String,
}

impl Generation {
    /// A planned generation: pending, with nothing made yet.
    pub fn planned(
        number: u32,
        key_label: String,
        subject: String,
        sans: Vec<String>,
        issuer: String,
        created_at: Unix,
    ) -> Generation {
        Generation {
            number,
            status: GenStatus::Pending,
            key_label,
            subject,
            sans,
            issuer,
            created_at,
            overlap_until: None,
            reminders_fired: Vec::new(),
            material: Material::Planned,
        }
    }

    fn missing(&self, field: &'static str) -> Missing {
        Missing {
            generation: self.number,
            field,
            status: format!("{:?}", self.status).to_lowercase(),
        }
    }

    /// Its key, once made.
    pub fn key(&self) -> Option<&KeyRecord> {
        match &self.material {
            Material::Planned => None,
            Material::Requested { key, .. }
            | Material::Issued { key, .. }
            | Material::Certified { key, .. }
            | Material::Credential { key, .. } => Some(key),
        }
    }

    /// Its key's `CKA_ID` in hex, once made.
    pub fn key_id_hex(&self) -> Option<String> {
        self.key().map(KeyRecord::id_hex)
    }

    /// Its key, or what is missing.
    pub fn need_key(&self) -> Result<&KeyRecord, Missing> {
        self.key().ok_or_else(|| self.missing("key"))
    }

    /// Its CSR (PEM), once built.
    pub fn csr_pem(&self) -> Option<&str> {
        match &self.material {
            Material::Requested { csr_pem, .. }
            | Material::Issued { csr_pem, .. }
            | Material::Certified { csr_pem, .. } => Some(csr_pem),
            _ => None,
        }
    }

    /// Its CSR, or what is missing.
    pub fn need_csr(&self) -> Result<&str, Missing> {
        self.csr_pem().ok_or_else(|| self.missing("CSR"))
    }

    /// The issuer's reference of the submission, once submitted.
    pub fn submission(&self) -> Option<&str> {
        match &self.material {
            Material::Requested { submission, .. }
            | Material::Issued { submission, .. }
            | Material::Certified { submission, .. }
            | Material::Credential { submission, .. } => submission.as_deref(),
            Material::Planned => None,
        }
    }

    /// Record the issuer's reference of the submission.
    pub fn set_submission(&mut self, reference: Option<String>) -> Result<(), Missing> {
        match &mut self.material {
            Material::Requested { submission, .. }
            | Material::Issued { submission, .. }
            | Material::Certified { submission, .. }
            | Material::Credential { submission, .. } => {
                *submission = reference;
                Ok(())
            }
            Material::Planned => Err(self.missing("key")),
        }
    }

    /// The chain (PEM, leaf first), once issued (checked or not).
    pub fn chain_pem(&self) -> Option<&str> {
        match &self.material {
            Material::Issued { chain_pem, .. } => Some(chain_pem),
            Material::Certified { cert, .. } => Some(&cert.chain_pem),
            _ => None,
        }
    }

    /// The chain, or what is missing.
    pub fn need_chain(&self) -> Result<&str, Missing> {
        self.chain_pem()
            .ok_or_else(|| self.missing("certificate chain"))
    }

    /// Take the key, CSR and submission out of a requested or issued generation (or, with
    /// `certified`, a certified one); anything else is left as it was.
    fn take_request(
        &mut self,
        certified: bool,
    ) -> Result<(KeyRecord, String, Option<String>), Missing> {
        match std::mem::replace(&mut self.material, Material::Planned) {
            Material::Requested {
                key,
                csr_pem,
                submission,
            }
            | Material::Issued {
                key,
                csr_pem,
                submission,
                ..
            } => Ok((key, csr_pem, submission)),
            Material::Certified {
                key,
                csr_pem,
                submission,
                ..
            } if certified => Ok((key, csr_pem, submission)),
            other => {
                self.material = other;
                Err(self.missing("CSR"))
            }
        }
    }

    /// Record the chain as it came back: requested -> issued (a chain issued again replaces
    /// the unchecked one).
    pub fn issue(&mut self, chain: String) -> Result<(), Missing> {
        let (key, csr_pem, submission) = self.take_request(false)?;
        self.material = Material::Issued {
            key,
            csr_pem,
            submission,
            chain_pem: chain,
        };
        Ok(())
    }

    /// Record the validated certificate: issued -> certified.
    pub fn certify(&mut self, cert: IssuedCert) -> Result<(), Missing> {
        let (key, csr_pem, submission) = self.take_request(true)?;
        self.material = Material::Certified {
            key,
            csr_pem,
            submission,
            cert,
        };
        Ok(())
    }

    /// The validated certificate, once checked.
    pub fn cert(&self) -> Option<&IssuedCert> {
        match &self.material {
            Material::Certified { cert, .. } => Some(cert),
            _ => None,
        }
    }

    /// Its JWK `kid` (credentials), once chosen.
    pub fn kid(&self) -> Option<&str> {
        match &self.material {
            Material::Credential { kid, .. } => Some(kid),
            _ => None,
        }
    }

    /// Its `kid`, or what is missing.
    pub fn need_kid(&self) -> Result<&str, Missing> {
        self.kid().ok_or_else(|| self.missing("kid"))
    }

    /// The credential rotation request kept for retries, or what is missing.
    pub fn need_request(&self) -> Result<&RotationRequest, Missing> {
        match &self.material {
            Material::Credential {
                request: Some(r), ..
            } => Ok(r),
            _ => Err(self.missing("rotation request")),
        }
    }

    /// When the credential rotation was sent, if it was.
    pub fn sent_at(&self) -> Option<Unix> {
        match &self.material {
            Material::Credential { sent_at, .. } => *sent_at,
            _ => None,
        }
    }

    /// Record (or clear) when the credential rotation was sent.
    pub fn set_sent_at(&mut self, at: Option<Unix>) -> Result<(), Missing> {
        match &mut self.material {
            Material::Credential { sent_at, .. } => {
                *sent_at = at;
                Ok(())
            }
            _ => Err(self.missing("kid")),
        }
    }

    /// Set a credential's validity (asked for, or activated by hand).
    pub fn set_validity(&mut self, from: Unix, until: Unix) -> Result<(), Missing> {
        match &mut self.material {
            Material::Credential { validity, .. } => {
                *validity = Some((from, until));
                Ok(())
            }
            _ => Err(self.missing("kid")),
        }
    }

    /// Valid from, until: the certificate's, or the credential's.
    pub fn validity(&self) -> Option<(Unix, Unix)> {
        match &self.material {
            Material::Certified { cert, .. } => Some((cert.not_before, cert.not_after)),
            Material::Credential { validity, .. } => *validity,
            _ => None,
        }
    }

    /// Valid until.
    pub fn not_after(&self) -> Option<Unix> {
        self.validity().map(|(_, na)| na)
    }

    /// Valid from.
    pub fn not_before(&self) -> Option<Unix> {
        self.validity().map(|(nb, _)| nb)
    }

    /// The certificate's SHA-256 fingerprint (hex), once validated.
    pub fn fingerprint(&self) -> Option<&str> {
        self.cert().map(|c| c.fingerprint.as_str())
    }

    /// The `kid` a JWS made with this generation's key carries: the credential's kid, or for
    /// a certificate identity the certificate's SHA-256 fingerprint (None before either).
    pub fn jws_kid(&self) -> Option<&str> {
        self.kid().or(self.fingerprint())
    }
}
