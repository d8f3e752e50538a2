//! The device's fleet store (`state/fleet/`): the bundle in effect, the last-known-good one,
//! which key and trust version each was applied under, and the anti-rollback floor.
//!
//! The floor counts only what verifies under the trusted set in effect: the record of the
//! highest version applied (`highest-version`, written as `N trust=T`) counts while trust
//! version T is in effect, or while no trust bundle since has said where versions continue
//! from; the bundles on disk count when they verify under the keys trusted now. So a trust
//! bundle that drops a leaked key, with `continue_from`, also drops a huge version that the
//! leaked key signed.

use crate::bundle::{Bundle, BundleKind};
use crate::trust::TrustSet;
use std::path::PathBuf;

pub(crate) const CURRENT: &str = "current.bundle";
pub(crate) const LAST_GOOD: &str = "last-known-good.bundle";
const HIGHEST: &str = "highest-version";

/// Under which key and trust version a stored bundle was applied (`<bundle>.applied`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppliedUnder {
    /// The bundle's version.
    pub version: u64,
    /// The fleet key that signed it (`alg key-id`).
    pub key_id: String,
    /// The trust version in effect when it was applied.
    pub trust_version: u64,
}

pub(crate) struct FleetStore {
    pub(crate) dir: PathBuf,
}

fn meta_name(bundle: &str) -> String {
    format!("{bundle}.applied")
}

impl FleetStore {
    pub(crate) fn read(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join(name)).ok()
    }

    /// The record of `bundle` (None for a bundle stored by an older release).
    pub(crate) fn applied_under(&self, bundle: &str) -> Option<AppliedUnder> {
        serde_json::from_slice(&self.read(&meta_name(bundle))?).ok()
    }

    /// `bundle`'s record as bytes, to write beside it.
    pub(crate) fn meta_bytes(m: &AppliedUnder) -> Vec<u8> {
        serde_json::to_vec(m).unwrap_or_default()
    }

    pub(crate) fn meta_path(&self, bundle: &str) -> PathBuf {
        self.dir.join(meta_name(bundle))
    }

    /// A stored bundle that still verifies: under the keys trusted now, or under the set it
    /// was applied under (a fleet key rotation never drops the configuration in effect).
    pub(crate) fn verified(&self, name: &str, trust: &TrustSet) -> Result<Bundle, String> {
        let bytes = self.read(name).ok_or_else(|| "not there".to_owned())?;
        let b = Bundle::parse(&bytes).map_err(|e| e.to_string())?;
        match b.verify(&trust.keys) {
            Ok(_) => Ok(b),
            Err(now) => {
                let then = self
                    .applied_under(name)
                    .filter(|m| m.version == b.version)
                    .and_then(|m| trust.keys_at(m.trust_version));
                match then {
                    Some(keys) => b.verify(keys).map(|_| b.clone()).map_err(|e| e.to_string()),
                    None => Err(now.to_string()),
                }
            }
        }
    }

    /// The record's text for `version` applied under `trust`.
    pub(crate) fn record(version: u64, trust: &TrustSet) -> String {
        format!("{version} trust={}\n", trust.version)
    }

    /// Versions at or below this are refused (replay, rollback).
    pub(crate) fn floor(&self, trust: &TrustSet) -> u64 {
        let text = self
            .read(HIGHEST)
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        let mut words = text.split_whitespace();
        let recorded: u64 = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let under: Option<u64> = words
            .next()
            .and_then(|w| w.strip_prefix("trust="))
            .and_then(|t| t.parse().ok());
        let base = match trust.continue_from {
            Some(c) if under != Some(trust.version) => c,
            _ => recorded,
        };
        // A crash between renaming a bundle in and recording its version loses nothing.
        [CURRENT, LAST_GOOD]
            .iter()
            .filter_map(|n| self.read(n))
            .filter_map(|b| Bundle::parse(&b).ok())
            .filter(|b| b.kind == BundleKind::Config && b.verify(&trust.keys).is_ok())
            .map(|b| b.version)
            .fold(base, u64::max)
    }

    pub(crate) fn highest_path(&self) -> PathBuf {
        self.dir.join(HIGHEST)
    }
}

/// A stored bundle as `config status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredBundle {
    /// Its version.
    pub version: u64,
    /// The fleet key that signed it (`alg key-id`).
    pub signed_by: String,
    /// The trust version in effect when it was applied (None: applied by an older release).
    pub applied_under_trust: Option<u64>,
    /// Who it is for (`device:ID`, `group:NAME`; empty: no audience).
    pub audience: Vec<String>,
    /// Whether it still verifies (under the keys trusted now or those it was applied under).
    pub verifies: bool,
}

/// The fleet store's state: which bundle is in effect, who signed it, the trust in effect
/// and the anti-rollback floor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FleetStatus {
    /// `current.bundle`.
    pub current: Option<StoredBundle>,
    /// `last-known-good.bundle`.
    pub last_known_good: Option<StoredBundle>,
    /// The trust version in effect.
    pub trust_version: u64,
    /// Where the trusted set comes from.
    pub trust_source: String,
    /// The trusted keys (`alg key-id`).
    pub trusted: Vec<String>,
    /// What the newest trust bundle says versions continue from.
    pub continue_from: Option<u64>,
    /// Configuration bundles at or below this version are refused.
    pub floor: u64,
}

impl FleetStore {
    fn stored(&self, name: &str, trust: &TrustSet) -> Option<StoredBundle> {
        let b = Bundle::parse(&self.read(name)?).ok()?;
        let under = self.applied_under(name).filter(|m| m.version == b.version);
        Some(StoredBundle {
            version: b.version,
            signed_by: format!("{} {}", b.alg, b.key_id),
            applied_under_trust: under.map(|m| m.trust_version),
            audience: b.audience.iter().map(|a| a.to_string()).collect(),
            verifies: self.verified(name, trust).is_ok(),
        })
    }

    /// What `config status` shows.
    pub(crate) fn status(&self, trust: &TrustSet) -> FleetStatus {
        FleetStatus {
            current: self.stored(CURRENT, trust),
            last_known_good: self.stored(LAST_GOOD, trust),
            trust_version: trust.version,
            trust_source: trust.source.clone(),
            trusted: trust
                .keys
                .iter()
                .map(|k| format!("{} {}", k.alg(), k.key_id()))
                .collect(),
            continue_from: trust.continue_from,
            floor: self.floor(trust),
        }
    }
}
