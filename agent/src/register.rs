//! The register: every identity, every generation, every JWK `kid` ever used. Written
//! crash-safe (temp file, fsync, rename, directory fsync) at every state change.

use crate::clock::Unix;
pub use crate::generation::{
    GenStatus, Generation, IssuedCert, KeyRecord, Material, Missing, RotationRequest,
};
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
    /// CA accounts (ACME), by issuer name; absent from the file while there are none, so
    /// registers without one stay as earlier releases wrote them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub accounts: BTreeMap<String, CaAccount>,
}

/// An issuer's account at its CA (ACME): the account URL and the thumbprint of the token key
/// the CA holds for it (the key itself is found in the token by its label).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaAccount {
    /// The account URL (the `kid` of its requests).
    pub url: String,
    /// RFC 7638 thumbprint of the account key's public JWK.
    pub thumbprint: String,
    /// The directory it belongs to.
    pub directory: String,
}

impl Register {
    /// The identity and generation whose live key has this `CKA_ID` (hex), if any.
    pub fn live_generation_with_key(&self, key_id: &[u8]) -> Option<(&str, u32)> {
        self.identities.iter().find_map(|(name, rec)| {
            rec.generations
                .iter()
                .find(|g| g.status.is_live() && g.key().is_some_and(|k| k.id == key_id))
                .map(|g| (name.as_str(), g.number))
        })
    }
}

impl Default for Register {
    fn default() -> Self {
        Register {
            schema_version: SCHEMA_VERSION,
            identities: BTreeMap::new(),
            accounts: BTreeMap::new(),
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
