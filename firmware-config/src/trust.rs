//! Fleet key rotation without a firmware update: trust bundles.
//!
//! The firmware pins a set of fleet keys (`fleet.trusted_keys`, versioned by
//! `fleet.trust_version`, default 0). A trust bundle (`BundleKind::Trust`) whose payload is
//!
//! ```toml
//! trusted_keys = ["ed25519:...", "p256:..."]
//! continue_from = 120   # optional: the configuration version the fleet continues from
//! ```
//!
//! `continue_from` is how a fleet recovers from a leaked key: the anti-rollback floor counts
//! only bundles that verify under the set in effect, and a trust bundle that drops a key sets
//! the floor to `continue_from`, so a huge version the leaked key signed stops blocking the
//! operator's next bundle. The configuration in effect stays until a bundle replaces it.
//!
//! replaces the trusted set when it is signed by a key of the set in effect and its version is
//! higher than every trust version seen (the firmware's included). Each applied trust bundle is
//! kept (`state/fleet/trust/v<N>.bundle`, one atomic write each) and the set is rebuilt on load
//! by walking them in version order from the firmware set: each must verify with the set before
//! it. A factory reset (state wiped) returns to the firmware set; a firmware image that ships a
//! newer `trust_version` supersedes every stored trust bundle at or below it.

use crate::bundle::{Bundle, BundleError, BundleKind, FleetKey};
use std::path::{Path, PathBuf};

/// The trusted fleet key set in effect, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustSet {
    /// The keys whose signatures are accepted now.
    pub keys: Vec<FleetKey>,
    /// The trust version in effect (the firmware's, or the newest applied trust bundle's).
    pub version: u64,
    /// "firmware defaults" or "trust bundle vN".
    pub source: String,
    /// Stored trust bundles that were skipped, and why.
    pub warnings: Vec<String>,
    /// Where the newest trust bundle says configuration versions continue from.
    pub continue_from: Option<u64>,
    /// Every set on the way, by trust version (the firmware's first): a bundle applied
    /// under an earlier set stays in effect until replaced.
    pub history: Vec<(u64, Vec<FleetKey>)>,
}

impl TrustSet {
    /// The keys trusted at trust version `v`.
    pub fn keys_at(&self, v: u64) -> Option<&[FleetKey]> {
        self.history
            .iter()
            .find(|(at, _)| *at == v)
            .map(|(_, k)| k.as_slice())
    }
}

/// Why a trust bundle was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// Format or signature.
    #[error("{0}")]
    Bundle(#[from] BundleError),
    /// Not newer than the trust in effect.
    #[error("trust bundle version {version} is not newer than the trust version in effect ({current}, from {source_name}): refusing a replayed or older trust bundle")]
    Rollback {
        /// The bundle's version.
        version: u64,
        /// The version in effect.
        current: u64,
        /// Where that version came from.
        source_name: String,
    },
    /// The payload is not a key list.
    #[error("trust bundle payload: {0}")]
    Payload(String),
    /// Writing it failed (nothing in effect changed).
    #[error("storing the trust bundle: {0}")]
    Io(#[from] std::io::Error),
}

/// What applying a trust bundle did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrustReport {
    /// The new trust version.
    pub version: u64,
    /// The version it replaced.
    pub previous: u64,
    /// The key that signed it.
    pub key_id: String,
    /// The new trusted set (`alg key-id` each).
    pub trusted: Vec<String>,
    /// Keys no longer trusted.
    pub removed: Vec<String>,
    /// The configuration version the fleet continues from, when the bundle says.
    #[serde(default)]
    pub continue_from: Option<u64>,
    /// It was the trust bundle in effect already: nothing changed.
    #[serde(default)]
    pub already_in_effect: bool,
}

/// A trust bundle's payload.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    trusted_keys: Vec<String>,
    continue_from: Option<u64>,
}

fn doc(bundle: &Bundle) -> Result<Doc, TrustError> {
    if bundle.kind != BundleKind::Trust {
        return Err(TrustError::Payload("not a trust bundle".into()));
    }
    let text = bundle
        .payload_str()
        .map_err(|e| TrustError::Payload(e.to_string()))?;
    toml::from_str(text).map_err(|e| TrustError::Payload(e.to_string()))
}

/// The keys a trust bundle's payload names (at least one; each valid).
pub fn payload_keys(bundle: &Bundle) -> Result<Vec<FleetKey>, TrustError> {
    let doc = doc(bundle)?;
    if doc.trusted_keys.is_empty() {
        return Err(TrustError::Payload(
            "trusted_keys is empty: a device with no trusted key could never be reached again"
                .into(),
        ));
    }
    doc.trusted_keys
        .iter()
        .map(|k| k.parse().map_err(TrustError::Payload))
        .collect()
}

fn describe(keys: &[FleetKey]) -> Vec<String> {
    keys.iter()
        .map(|k| format!("{} {}", k.alg(), k.key_id()))
        .collect()
}

fn stored(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let v = name
                .strip_prefix('v')?
                .strip_suffix(".bundle")?
                .parse()
                .ok()?;
            Some((v, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The set in effect: the firmware's, then each stored trust bundle above the firmware's
/// version that verifies with the set before it.
pub fn effective(firmware: Vec<FleetKey>, firmware_version: u64, dir: &Path) -> TrustSet {
    let mut set = TrustSet {
        history: vec![(firmware_version, firmware.clone())],
        keys: firmware,
        version: firmware_version,
        source: "firmware defaults".into(),
        warnings: Vec::new(),
        continue_from: None,
    };
    for (v, path) in stored(dir) {
        if v <= set.version {
            continue;
        }
        let step = std::fs::read(&path)
            .map_err(TrustError::from)
            .and_then(|b| Ok(Bundle::parse(&b)?))
            .and_then(|b| {
                b.verify(&set.keys)?;
                if b.version != v {
                    return Err(TrustError::Payload(format!(
                        "file name says v{v}, bundle says v{}",
                        b.version
                    )));
                }
                Ok((payload_keys(&b)?, doc(&b)?.continue_from))
            });
        match step {
            Ok((keys, continue_from)) => {
                set.history.push((v, keys.clone()));
                set.keys = keys;
                set.version = v;
                set.source = format!("trust bundle v{v}");
                set.continue_from = continue_from;
            }
            Err(e) => set
                .warnings
                .push(format!("stored trust bundle v{v} ignored: {e}")),
        }
    }
    set
}

/// Verify a trust bundle against the set in effect and store it. On any error nothing
/// changed; after the one atomic write the new set is in effect.
pub fn apply(current: &TrustSet, dir: &Path, bytes: &[u8]) -> Result<TrustReport, TrustError> {
    let bundle = Bundle::parse(bytes)?;
    let key_id = bundle.verify(&current.keys)?.key_id();
    if bundle.version <= current.version {
        return Err(TrustError::Rollback {
            version: bundle.version,
            current: current.version,
            source_name: current.source.clone(),
        });
    }
    let keys = payload_keys(&bundle)?;
    let continue_from = doc(&bundle)?.continue_from;
    std::fs::create_dir_all(dir)?;
    crate::atomic::atomic_write(&dir.join(format!("v{}.bundle", bundle.version)), bytes)?;
    let new = describe(&keys);
    Ok(TrustReport {
        version: bundle.version,
        previous: current.version,
        key_id,
        removed: describe(&current.keys)
            .into_iter()
            .filter(|k| !new.contains(k))
            .collect(),
        trusted: new,
        continue_from,
        already_in_effect: false,
    })
}

/// The same bytes as the trust bundle in effect: a report that says so (nothing changes).
pub fn already_applied(current: &TrustSet, dir: &Path, bytes: &[u8]) -> Option<TrustReport> {
    let stored = std::fs::read(dir.join(format!("v{}.bundle", current.version))).ok()?;
    if stored != bytes {
        return None;
    }
    let b = Bundle::parse(bytes).ok()?;
    Some(TrustReport {
        version: current.version,
        previous: current.version,
        key_id: b.key_id,
        trusted: describe(&current.keys),
        removed: Vec::new(),
        continue_from: current.continue_from,
        already_in_effect: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signer::FleetSigner;

    fn key() -> (FleetSigner, FleetKey) {
        let (pem, public) = FleetSigner::generate_ed25519().unwrap();
        (FleetSigner::from_pem(&pem).unwrap(), public)
    }

    fn trust(signer: &FleetSigner, version: u64, keys: &[&FleetKey]) -> Vec<u8> {
        let list: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
        let payload = format!("trusted_keys = [{}]\n", list.join(", "));
        signer
            .sign_kind(BundleKind::Trust, version, &[], payload.as_bytes())
            .unwrap()
    }

    #[test]
    fn a_chain_of_trust_bundles_replaces_the_set_and_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let (a, ka) = key();
        let (b, kb) = key();
        let (c, kc) = key();
        let fw = effective(vec![ka.clone()], 0, dir.path());
        assert_eq!(fw.source, "firmware defaults");
        // a hands over to b; b to c.
        let r = apply(&fw, dir.path(), &trust(&a, 1, &[&kb])).unwrap();
        assert_eq!(r.removed.len(), 1);
        let s1 = effective(vec![ka.clone()], 0, dir.path());
        assert_eq!((s1.keys.clone(), s1.version), (vec![kb.clone()], 1));
        // a is no longer trusted: its next trust bundle is refused.
        assert!(matches!(
            apply(&s1, dir.path(), &trust(&a, 2, &[&ka])),
            Err(TrustError::Bundle(BundleError::UnknownKey { .. }))
        ));
        apply(&s1, dir.path(), &trust(&b, 2, &[&kc])).unwrap();
        let s2 = effective(vec![ka.clone()], 0, dir.path());
        assert_eq!((s2.keys.clone(), s2.version), (vec![kc.clone()], 2));
        // Replay and rollback refused.
        assert!(matches!(
            apply(&s2, dir.path(), &trust(&c, 2, &[&ka])),
            Err(TrustError::Rollback { .. })
        ));
        // A configuration bundle's signature never passes as trust.
        let cfg = c.sign(3, b"trusted_keys = []\n").unwrap();
        assert!(apply(&s2, dir.path(), &cfg).is_err());
        // A firmware that ships trust version 2 supersedes the stored chain.
        let fw2 = effective(vec![ka.clone()], 2, dir.path());
        assert_eq!(
            (fw2.keys, fw2.source.as_str()),
            (vec![ka], "firmware defaults")
        );
    }

    #[test]
    fn a_tampered_stored_bundle_stops_the_walk_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (a, ka) = key();
        let (_b, kb) = key();
        let (_c, kc) = key();
        let fw = effective(vec![ka.clone()], 0, dir.path());
        apply(&fw, dir.path(), &trust(&a, 1, &[&kb])).unwrap();
        // Someone with write access to the state dir drops their own v2.
        let (evil, _) = key();
        std::fs::write(dir.path().join("v2.bundle"), trust(&evil, 2, &[&kc])).unwrap();
        let s = effective(vec![ka], 0, dir.path());
        assert_eq!((s.keys, s.version), (vec![kb], 1));
        assert!(s.warnings[0].contains("v2 ignored"), "{:?}", s.warnings);
    }

    #[test]
    fn an_empty_key_list_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, ka) = key();
        let fw = effective(vec![ka], 0, dir.path());
        let b = a
            .sign_kind(BundleKind::Trust, 1, &[], b"trusted_keys = []\n")
            .unwrap();
        assert!(matches!(
            apply(&fw, dir.path(), &b),
            Err(TrustError::Payload(_))
        ));
    }
}
