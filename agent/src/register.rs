//! The register: every identity, every generation, every JWK `kid` ever used. Written
//! crash-safe (temp file, fsync, rename, directory fsync) at every state change.

use crate::clock::Unix;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Bumped when the file format changes incompatibly.
pub const SCHEMA_VERSION: u32 = 1;

/// Where a rotation stands. Every step is persisted before the next begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// No rotation in progress (the current generation, if any, serves).
    Active,
    /// A new generation is planned; its key is being made in the token.
    KeyPending,
    /// The new key exists and its CSR is built.
    CsrReady,
    /// The CSR went to the issuer; waiting for the certificate.
    Submitted,
    /// A certificate came back, not yet checked.
    Issued,
    /// The certificate passed validation.
    Validated,
    /// A real call with the new identity alone succeeded.
    Probed,
    /// The new generation is current; the old one serves until the overlap ends.
    Overlap,
    /// No valid certificate: the identity fails at every TLS handshake.
    Lapsed,
}

impl Step {
    /// Name as shown in `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Active => "active",
            Step::KeyPending => "key-pending",
            Step::CsrReady => "csr-ready",
            Step::Submitted => "submitted",
            Step::Issued => "issued",
            Step::Validated => "validated",
            Step::Probed => "probed",
            Step::Overlap => "overlap",
            Step::Lapsed => "lapsed",
        }
    }
}

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

/// One key pair and its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// 1, 2, 3, ... per identity.
    pub number: u32,
    /// Status.
    pub status: GenStatus,
    /// `CKA_LABEL` of its key objects.
    pub key_label: String,
    /// `CKA_ID`, hex (known once the key exists).
    pub key_id: Option<String>,
    /// `pkcs11:` URI of the private key.
    pub key_uri: Option<String>,
    /// Subject requested.
    pub subject: String,
    /// SANs requested.
    pub sans: Vec<String>,
    /// The CSR (PEM).
    pub csr_pem: Option<String>,
    /// Issuer name.
    pub issuer: String,
    /// Issuer-specific reference of the submission.
    pub submission: Option<String>,
    /// The certificate chain as issued (PEM, leaf first).
    pub cert_pem: Option<String>,
    /// Certificate serial, hex.
    pub serial: Option<String>,
    /// SHA-256 fingerprint of the leaf, hex.
    pub fingerprint: Option<String>,
    /// Not before.
    pub not_before: Option<Unix>,
    /// Not after.
    pub not_after: Option<Unix>,
    /// Until when an overlapping old generation stays.
    pub overlap_until: Option<Unix>,
    /// Reminder marks (seconds before expiry) already raised.
    pub reminders_fired: Vec<u64>,
    /// When it was planned.
    pub created_at: Unix,
    /// JWK `kid` (jwk-rotation identities).
    #[serde(default)]
    pub kid: Option<String>,
    /// The exact rotation request body, kept so a retry sends the same `kid` and dates.
    #[serde(default)]
    pub request: Option<String>,
    /// `CurrentKeyExpiry` asked for the previous key (jwk-rotation).
    #[serde(default)]
    pub previous_expiry: Option<Unix>,
    /// When the credential rotation was sent (recorded before sending: after a crash the
    /// outcome is unknown and is found out, never guessed).
    #[serde(default)]
    pub sent_at: Option<Unix>,
    /// The subject as issued, when it differs from the request.
    #[serde(default)]
    pub subject_issued: Option<String>,
    /// How the issued names differ from the request (accepted by `subject_match`).
    #[serde(default)]
    pub name_differences: Vec<String>,
}

impl Generation {
    fn need<'a>(
        &self,
        v: Option<&'a String>,
        field: &'static str,
    ) -> Result<&'a str, RegisterError> {
        v.map(String::as_str).ok_or_else(|| RegisterError::Missing {
            generation: self.number,
            field,
            status: format!("{:?}", self.status).to_lowercase(),
        })
    }

    /// Its key's `CKA_ID` (hex), once the key exists.
    pub fn need_key_id(&self) -> Result<&str, RegisterError> {
        self.need(self.key_id.as_ref(), "key id")
    }

    /// Its key's `pkcs11:` URI, once the key exists.
    pub fn need_key_uri(&self) -> Result<&str, RegisterError> {
        self.need(self.key_uri.as_ref(), "key URI")
    }

    /// Its CSR (PEM), once built.
    pub fn need_csr(&self) -> Result<&str, RegisterError> {
        self.need(self.csr_pem.as_ref(), "CSR")
    }

    /// Its certificate chain (PEM, leaf first), once issued.
    pub fn need_chain(&self) -> Result<&str, RegisterError> {
        self.need(self.cert_pem.as_ref(), "certificate chain")
    }

    /// Its JWK `kid` (credentials), once chosen.
    pub fn need_kid(&self) -> Result<&str, RegisterError> {
        self.need(self.kid.as_ref(), "kid")
    }

    /// The `kid` a JWS made with this generation's key carries: the credential's kid, or for
    /// a certificate identity the certificate's SHA-256 fingerprint (None before either).
    pub fn jws_kid(&self) -> Option<&str> {
        self.kid.as_deref().or(self.fingerprint.as_deref())
    }

    /// The rotation request body kept for retries (credentials), once built.
    pub fn need_request(&self) -> Result<&str, RegisterError> {
        self.need(self.request.as_ref(), "rotation request")
    }

    /// A planned generation: pending, with no key, request or certificate yet.
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
            key_id: None,
            key_uri: None,
            subject,
            sans,
            csr_pem: None,
            issuer,
            submission: None,
            cert_pem: None,
            serial: None,
            fingerprint: None,
            not_before: None,
            not_after: None,
            overlap_until: None,
            reminders_fired: Vec::new(),
            created_at,
            kid: None,
            request: None,
            previous_expiry: None,
            sent_at: None,
            subject_issued: None,
            name_differences: Vec::new(),
        }
    }
}

/// A failed attempt, to retry with backoff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// What went wrong and what to do.
    pub reason: String,
    /// When to try again.
    pub retry_at: Unix,
    /// Consecutive failures.
    pub attempts: u32,
}

/// One state change, for people reading `status --json` and for audits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// When.
    pub at: Unix,
    /// Into which step.
    pub step: Step,
    /// Generation concerned.
    pub generation: u32,
    /// A note.
    pub note: String,
}

/// One identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRecord {
    /// Where its rotation stands.
    pub step: Step,
    /// The generation in progress (for the steps between key-pending and probed).
    pub pending: Option<u32>,
    /// The serving generation.
    pub current: Option<u32>,
    /// All generations, oldest first.
    pub generations: Vec<Generation>,
    /// Every JWK `kid` ever used (never reused).
    pub kids: Vec<String>,
    /// The last failure, if the last attempt failed.
    pub failure: Option<Failure>,
    /// The last transitions (at most 100).
    pub transitions: Vec<Transition>,
    /// When a `rotate --now` was asked for.
    pub forced_at: Option<Unix>,
    /// What the issuer said to wait for, and until when (shown by `status`).
    #[serde(default)]
    pub waiting: Option<Waiting>,
}

/// An issuer's "come back later".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    /// Until when.
    pub until: Unix,
    /// For what.
    pub what: String,
}

impl Default for IdentityRecord {
    fn default() -> Self {
        IdentityRecord {
            step: Step::Active,
            pending: None,
            current: None,
            generations: Vec::new(),
            kids: Vec::new(),
            failure: None,
            transitions: Vec::new(),
            forced_at: None,
            waiting: None,
        }
    }
}

impl IdentityRecord {
    /// Generation by number.
    pub fn gen(&self, n: u32) -> Option<&Generation> {
        self.generations.iter().find(|g| g.number == n)
    }
    /// Generation by number, mutable.
    pub fn gen_mut(&mut self, n: u32) -> Option<&mut Generation> {
        self.generations.iter_mut().find(|g| g.number == n)
    }
    /// The serving generation.
    pub fn current_gen(&self) -> Option<&Generation> {
        self.current.and_then(|n| self.gen(n))
    }
    /// Next generation number.
    pub fn next_number(&self) -> u32 {
        self.generations.iter().map(|g| g.number).max().unwrap_or(0) + 1
    }
    /// Record a transition.
    pub fn transition(&mut self, at: Unix, step: Step, generation: u32, note: impl Into<String>) {
        self.step = step;
        self.waiting = None;
        self.transitions.push(Transition {
            at,
            step,
            generation,
            note: note.into(),
        });
        if self.transitions.len() > 100 {
            self.transitions.drain(..self.transitions.len() - 100);
        }
    }
}

/// The whole register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// File format version.
    pub schema_version: u32,
    /// By identity name.
    pub identities: BTreeMap<String, IdentityRecord>,
}

impl Register {
    /// The identity and generation whose live key has this `CKA_ID` (hex), if any.
    pub fn live_generation_with_key(&self, key_id: &str) -> Option<(&str, u32)> {
        self.identities.iter().find_map(|(name, rec)| {
            rec.generations
                .iter()
                .find(|g| g.status.is_live() && g.key_id.as_deref() == Some(key_id))
                .map(|g| (name.as_str(), g.number))
        })
    }
}

impl Default for Register {
    fn default() -> Self {
        Register {
            schema_version: SCHEMA_VERSION,
            identities: BTreeMap::new(),
        }
    }
}

/// Errors reading or writing the register.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// I/O.
    #[error("register {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// Unreadable content.
    #[error("register {path} is damaged ({reason}); it is only ever replaced whole (temp file, fsync, rename), so this is a disk fault or a hand edit: restore it from a backup; do not delete it, since every key in the token would then look unowned")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Written by a newer edge-signer.
    #[error("register {path} has schema version {found}; this edge-signer reads {SCHEMA_VERSION}: upgrade edge-signer")]
    TooNew {
        /// File.
        path: PathBuf,
        /// Found.
        found: u32,
    },
    /// A generation lacks what its step needs (never filled in with an empty value).
    #[error("generation {generation} ({status}) in the register has no {field}, which the next step needs: the register was edited or damaged; `edge-signer rotate NAME --now` starts a new generation")]
    Missing {
        /// The generation.
        generation: u32,
        /// What is missing.
        field: &'static str,
        /// Its status.
        status: String,
    },
}

/// The register file in a state directory, and its last good copy.
#[derive(Debug, Clone)]
pub struct RegisterFile {
    path: PathBuf,
}

impl RegisterFile {
    /// `state_dir/register.json`.
    pub fn new(state_dir: &Path) -> RegisterFile {
        RegisterFile {
            path: state_dir.join("register.json"),
        }
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read it (an absent file is an empty register).
    pub fn load(&self) -> Result<Register, RegisterError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Register::default()),
            Err(source) => {
                return Err(RegisterError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        Self::parse(&self.path, &bytes)
    }

    /// Parse register bytes. Never panics.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Register, RegisterError> {
        #[derive(Deserialize)]
        struct Version {
            schema_version: u32,
        }
        let v: Version = serde_json::from_slice(bytes).map_err(|e| RegisterError::Corrupt {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        if v.schema_version > SCHEMA_VERSION {
            return Err(RegisterError::TooNew {
                path: path.to_owned(),
                found: v.schema_version,
            });
        }
        serde_json::from_slice(bytes).map_err(|e| RegisterError::Corrupt {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Write it crash-safe.
    pub fn save(&self, reg: &Register) -> Result<(), RegisterError> {
        let io = |source| RegisterError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let json = serde_json::to_vec_pretty(reg).map_err(|e| io(std::io::Error::other(e)))?;
        firmware_config::store::atomic_write(&self.path, &json).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_newer_schema_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = RegisterFile::new(dir.path());
        assert_eq!(f.load().unwrap(), Register::default());
        let mut r = Register::default();
        let mut id = IdentityRecord::default();
        id.kids.push("k1".into());
        id.transition(5, Step::KeyPending, 1, "planned");
        r.identities.insert("gw".into(), id);
        f.save(&r).unwrap();
        assert_eq!(f.load().unwrap(), r);
        std::fs::write(f.path(), br#"{"schema_version": 9, "identities": {}}"#).unwrap();
        assert!(matches!(
            f.load(),
            Err(RegisterError::TooNew { found: 9, .. })
        ));
        std::fs::write(
            f.path(),
            b"{\"schema_version\": 1, \"identities\": {\"x\": 3}}",
        )
        .unwrap();
        assert!(f.load().unwrap_err().to_string().contains("damaged"));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = RegisterFile::parse(Path::new("r.json"), &bytes);
        }
    }
}
