//! Where configuration lives on the device, and `apply`: verify, refuse rollback, validate
//! the merged result, then write with temp file + fsync + rename + directory fsync, keeping
//! the previous bundle as last-known-good.

use crate::bundle::{Bundle, BundleError, BundleKind};
use crate::fleet_store::{AppliedUnder, FleetStore, CURRENT, LAST_GOOD};
use crate::layers::{local_files, resolve, ConfigError, ConfigErrors, Effective, Layer, LayerKind};
use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

/// Default firmware layer.
pub const DEFAULTS_PATH: &str = "/usr/lib/edge-signer/defaults.toml";
/// Default local override file (`agent.d/` beside it).
pub const LOCAL_PATH: &str = "/etc/edge-signer/agent.toml";

pub use crate::atomic::atomic_write;
use crate::atomic::{rename_synced, tmp_path, write_synced};

/// Why `apply` refused a bundle. Nothing was changed in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Format or signature.
    #[error("{0}")]
    Bundle(#[from] BundleError),
    /// Not newer than what was applied (replay or rollback).
    #[error("bundle version {version} is not newer than the applied version {applied}: refusing a replayed or older bundle")]
    Rollback {
        /// The bundle's version.
        version: u64,
        /// The highest version applied on this device.
        applied: u64,
    },
    /// A trust bundle was refused.
    #[error("{0}")]
    Trust(#[from] crate::trust::TrustError),
    /// The bundle is not addressed to this device.
    #[error("{0}")]
    Audience(String),
    /// The merged configuration is invalid.
    #[error("the configuration with this bundle is invalid:\n{0}")]
    Config(ConfigErrors),
    /// A write failed (the step says which).
    #[error("{step}: {source}")]
    Io {
        /// The step.
        step: ApplyStep,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Where a bundle came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// `config apply` or the spool directory: someone with access to the device.
    Local,
    /// The fleet channel (MQTT): the broker and every other device are on the way.
    Fleet,
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Channel::Local => "local command line or spool",
            Channel::Fleet => "fleet channel",
        })
    }
}

/// The steps of `apply` that touch the disk, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyStep {
    /// Write the previous bundle to a temp file (fsync).
    WriteLastKnownGoodTemp,
    /// Rename it over last-known-good (fsync dir).
    RenameLastKnownGood,
    /// Write the new bundle to a temp file (fsync).
    WriteCurrentTemp,
    /// Rename it over current (fsync dir): the moment the new config takes effect.
    RenameCurrent,
    /// Record the highest version applied.
    RecordVersion,
}

impl ApplyStep {
    /// All steps in order.
    pub const ALL: [ApplyStep; 5] = [
        ApplyStep::WriteLastKnownGoodTemp,
        ApplyStep::RenameLastKnownGood,
        ApplyStep::WriteCurrentTemp,
        ApplyStep::RenameCurrent,
        ApplyStep::RecordVersion,
    ];
}

impl std::fmt::Display for ApplyStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApplyStep::WriteLastKnownGoodTemp => "writing last-known-good",
            ApplyStep::RenameLastKnownGood => "renaming last-known-good",
            ApplyStep::WriteCurrentTemp => "writing the new bundle",
            ApplyStep::RenameCurrent => "renaming the new bundle into place",
            ApplyStep::RecordVersion => "recording the applied version",
        })
    }
}

/// One changed value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Change {
    /// Field path.
    pub path: String,
    /// Old value (None: was not set).
    pub old: Option<String>,
    /// New value (None: removed).
    pub new: Option<String>,
}

/// What `apply_any` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Applied {
    /// A configuration bundle.
    Config(ApplyReport),
    /// A trust bundle.
    Trust(crate::trust::TrustReport),
}

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplyReport {
    /// The new version.
    pub version: u64,
    /// The version it replaced (0 = none).
    pub previous: u64,
    /// The fleet key id that signed it.
    pub key_id: String,
    /// Every value that changed in the effective configuration.
    pub changes: Vec<Change>,
    /// The bundle was the one in effect already: nothing changed (a success, so that tools
    /// that push configuration again and again can tell it from a refusal).
    #[serde(default)]
    pub already_in_effect: bool,
}

/// The device's configuration sources.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The firmware defaults file.
    pub defaults: PathBuf,
    /// The local `agent.toml` (`agent.d/` beside it).
    pub local: PathBuf,
}

impl Default for Sources {
    fn default() -> Self {
        Sources {
            defaults: DEFAULTS_PATH.into(),
            local: LOCAL_PATH.into(),
        }
    }
}

/// The effective configuration and what was found on the way.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The merged, validated configuration.
    pub effective: Effective,
    /// The fleet bundle version in effect (0 = none).
    pub fleet_version: u64,
    /// Things a person should know (a bad current bundle, a fallback to last-known-good).
    pub warnings: Vec<String>,
}

impl Sources {
    /// The files the firmware and local layers are read from (`agent.d/*.toml` included),
    /// each with whether it exists: for messages that say where the configuration was looked
    /// for.
    pub fn files(&self) -> Vec<(PathBuf, bool)> {
        std::iter::once(self.defaults.clone())
            .chain(local_files(&self.local))
            .map(|f| {
                let found = f.is_file();
                (f, found)
            })
            .collect()
    }

    fn firmware(&self) -> Result<Vec<Layer>, ConfigErrors> {
        Ok(Layer::read(LayerKind::Firmware, &self.defaults)
            .map_err(|e| ConfigErrors(vec![e]))?
            .into_iter()
            .collect())
    }

    fn local(&self) -> Result<Vec<Layer>, ConfigErrors> {
        let mut layers = Vec::new();
        let mut errors = Vec::new();
        for f in local_files(&self.local) {
            match Layer::read(LayerKind::Local, &f) {
                Ok(Some(l)) => layers.push(l),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(layers)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The state directory, from firmware and local layers only (a bundle cannot move it).
    pub fn state_dir(&self) -> Result<PathBuf, ConfigErrors> {
        let mut dir = PathBuf::from("/var/lib/edge-signer");
        for l in self.firmware()?.iter().chain(self.local()?.iter()) {
            if let Some(d) = l
                .table
                .get("paths")
                .and_then(|p| p.get("state_dir"))
                .and_then(|v| v.as_str())
            {
                dir = d.into();
            }
        }
        Ok(dir)
    }

    fn store(&self) -> Result<FleetStore, ConfigErrors> {
        Ok(FleetStore {
            dir: self.state_dir()?.join("fleet"),
        })
    }

    /// The fleet keys trusted now: the firmware's set, replaced by applied trust bundles.
    pub fn trusted_keys(&self) -> Result<Vec<crate::bundle::FleetKey>, ConfigErrors> {
        Ok(self.trust()?.keys)
    }

    /// The trusted set in effect and where it came from (see `trust.rs`).
    pub fn trust(&self) -> Result<crate::trust::TrustSet, ConfigErrors> {
        let layers = self.firmware()?;
        let fleet = layers.first().and_then(|l| l.table.get("fleet"));
        let version = fleet
            .and_then(|f| f.get("trust_version"))
            .and_then(|v| v.as_integer())
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0);
        let keys = self.firmware_keys(fleet.and_then(|f| f.get("trusted_keys")))?;
        Ok(crate::trust::effective(
            keys,
            version,
            &self.store()?.dir.join("trust"),
        ))
    }

    fn firmware_keys(
        &self,
        keys: Option<&toml::Value>,
    ) -> Result<Vec<crate::bundle::FleetKey>, ConfigErrors> {
        let Some(keys) = keys else {
            return Ok(Vec::new());
        };
        let arr = keys.as_array().cloned().unwrap_or_default();
        arr.iter()
            .map(|v| {
                v.as_str().unwrap_or_default().parse().map_err(|e: String| {
                    ConfigErrors(vec![ConfigError {
                        file: self.defaults.display().to_string(),
                        path: "fleet.trusted_keys".into(),
                        reason: e,
                    }])
                })
            })
            .collect()
    }

    fn resolve_with(&self, fleet: Option<Layer>) -> Result<Effective, ConfigErrors> {
        let mut layers = self.firmware()?;
        layers.extend(fleet);
        layers.extend(self.local()?);
        resolve(&layers)
    }

    /// Load the effective configuration: firmware, the current fleet bundle (verified again;
    /// falls back to last-known-good if it does not verify or validate), local overrides.
    pub fn load(&self) -> Result<Loaded, ConfigErrors> {
        let store = self.store()?;
        let trust = self.trust()?;
        let mut warnings = Vec::new();
        for (name, which) in [(CURRENT, "current"), (LAST_GOOD, "last-known-good")] {
            if store.read(name).is_none() {
                continue;
            }
            let attempt = store.verified(name, &trust).and_then(|b| {
                let layer = fleet_layer(&b).map_err(|e| e.to_string())?;
                self.resolve_with(Some(layer))
                    .map(|eff| (b.version, eff))
                    .map_err(|e| e.to_string())
            });
            match attempt {
                Ok((version, effective)) => {
                    return Ok(Loaded {
                        effective,
                        fleet_version: version,
                        warnings,
                    })
                }
                Err(e) => warnings.push(format!("{which} fleet bundle ignored: {e}")),
            }
        }
        Ok(Loaded {
            effective: self.resolve_with(None)?,
            fleet_version: 0,
            warnings,
        })
    }

    /// Apply a bundle of either kind: a configuration bundle (`apply`) or a trust bundle
    /// (replaces the trusted fleet keys, see `trust.rs`).
    pub fn apply_any(&self, bytes: &[u8]) -> Result<Applied, ApplyError> {
        self.apply_from(bytes, Channel::Local)
    }

    /// `apply_any` for a bundle that came through `channel`: from the fleet channel it must
    /// name this device or one of its groups; from the local CLI or spool it may name
    /// nobody (a v1 bundle), and if it names anyone, it must name this device.
    pub fn apply_from(&self, bytes: &[u8], channel: Channel) -> Result<Applied, ApplyError> {
        let bundle = Bundle::parse(bytes)?;
        if channel == Channel::Fleet || !bundle.audience.is_empty() {
            self.check_audience(&bundle, channel)?;
        }
        if let Some(r) = self.already_in_effect(bytes)? {
            return Ok(r);
        }
        if bundle.kind == BundleKind::Trust {
            let current = self.trust().map_err(ApplyError::Config)?;
            let dir = self.store().map_err(ApplyError::Config)?.dir.join("trust");
            return Ok(Applied::Trust(crate::trust::apply(&current, &dir, bytes)?));
        }
        self.apply(bytes).map(Applied::Config)
    }

    /// The same bytes as the bundle in effect (or a stored trust bundle): a success that
    /// changes nothing.
    fn already_in_effect(&self, bytes: &[u8]) -> Result<Option<Applied>, ApplyError> {
        let store = self.store().map_err(ApplyError::Config)?;
        let trust = self.trust().map_err(ApplyError::Config)?;
        if store.read(CURRENT).as_deref() == Some(bytes) {
            if let Ok(b) = store.verified(CURRENT, &trust) {
                return Ok(Some(Applied::Config(ApplyReport {
                    version: b.version,
                    previous: b.version,
                    key_id: b.key_id.clone(),
                    changes: Vec::new(),
                    already_in_effect: true,
                })));
            }
        }
        Ok(
            crate::trust::already_applied(&trust, &store.dir.join("trust"), bytes)
                .map(Applied::Trust),
        )
    }

    /// The fleet store's state (`config status`).
    pub fn fleet_status(&self) -> Result<crate::fleet_store::FleetStatus, ConfigErrors> {
        Ok(self.store()?.status(&self.trust()?))
    }

    /// This device's id and groups (from `[fleet.mqtt]` in effect) must be in the audience.
    fn check_audience(&self, bundle: &Bundle, channel: Channel) -> Result<(), ApplyError> {
        let cfg = self.load().map_err(ApplyError::Config)?.effective.config;
        let (device, groups) = match &cfg.fleet.mqtt {
            Some(m) => (cfg.fleet_device(), m.groups.clone()),
            None => (None, Vec::new()),
        };
        if bundle.addressed_to(device.as_deref(), &groups) {
            return Ok(());
        }
        let me = format!(
            "this device is {} in groups [{}]",
            device.as_deref().unwrap_or("(no fleet.mqtt device id)"),
            groups.join(", ")
        );
        Err(ApplyError::Audience(if bundle.audience.is_empty() {
            format!("a bundle from the {channel} must name its audience (fleet sign --device/--group); this one names nobody; {me}")
        } else {
            let names: Vec<String> = bundle.audience.iter().map(|a| a.to_string()).collect();
            format!(
                "the bundle is for {}, not for this device: {me}",
                names.join(" ")
            )
        }))
    }

    /// Apply a configuration bundle file's bytes. On any error nothing on disk has changed, except
    /// for a failed write step, after which either the old or the new bundle is in place.
    pub fn apply(&self, bytes: &[u8]) -> Result<ApplyReport, ApplyError> {
        self.apply_with(bytes, &mut |_| Ok(()))
    }

    /// `apply` with a hook run before each disk step (tests make it fail to simulate a crash).
    pub fn apply_with(
        &self,
        bytes: &[u8],
        hook: &mut dyn FnMut(ApplyStep) -> std::io::Result<()>,
    ) -> Result<ApplyReport, ApplyError> {
        let bundle = Bundle::parse(bytes)?;
        if bundle.kind != BundleKind::Config {
            return Err(ApplyError::Bundle(BundleError::Header(
                "this is a trust bundle, not a configuration bundle".into(),
            )));
        }
        let trust = self.trust().map_err(ApplyError::Config)?;
        let signer = bundle.verify(&trust.keys)?;
        let key = signer.key_id();
        let key_name = format!("{} {key}", signer.alg());
        let store = self.store().map_err(ApplyError::Config)?;
        let applied = store.floor(&trust);
        if bundle.version <= applied {
            return Err(ApplyError::Rollback {
                version: bundle.version,
                applied,
            });
        }
        let layer = fleet_layer(&bundle).map_err(|e| ApplyError::Config(ConfigErrors(vec![e])))?;
        let new = self.resolve_with(Some(layer)).map_err(ApplyError::Config)?;
        let old = self.load().ok();
        let changes = diff(old.as_ref().map(|l| &l.effective), &new);
        let previous = old.as_ref().map(|l| l.fleet_version).unwrap_or(0);

        let under = AppliedUnder {
            version: bundle.version,
            key_id: key_name,
            trust_version: trust.version,
        };
        install(&store, &trust, bytes, &under, hook)?;
        Ok(ApplyReport {
            version: bundle.version,
            previous,
            key_id: key,
            changes,
            already_in_effect: false,
        })
    }
}

/// The disk steps of an apply, each after `hook`: the current bundle (if it still verifies)
/// becomes last-known-good, then `bytes` becomes current, then the version is recorded.
fn install(
    store: &FleetStore,
    trust: &crate::trust::TrustSet,
    bytes: &[u8],
    under: &AppliedUnder,
    hook: &mut dyn FnMut(ApplyStep) -> std::io::Result<()>,
) -> Result<(), ApplyError> {
    let io = |step| move |source| ApplyError::Io { step, source };
    let step =
        |s: ApplyStep,
         hook: &mut dyn FnMut(ApplyStep) -> std::io::Result<()>,
         f: &dyn Fn() -> std::io::Result<()>| { hook(s).and_then(|_| f()).map_err(io(s)) };
    fs::create_dir_all(&store.dir).map_err(io(ApplyStep::WriteLastKnownGoodTemp))?;
    let current = store.dir.join(CURRENT);
    let last_good = store.dir.join(LAST_GOOD);
    let (last_good_tmp, current_tmp) = (tmp_path(&last_good), tmp_path(&current));
    // Only a current bundle that still verifies may become last-known-good: a damaged
    // or tampered file must never replace the good copy kept for revert.
    let verified_current = store
        .verified(CURRENT, trust)
        .ok()
        .and_then(|_| store.read(CURRENT));
    if let Some(prev) = verified_current {
        let prev_meta = store.applied_under(CURRENT);
        step(ApplyStep::WriteLastKnownGoodTemp, hook, &|| {
            write_synced(&last_good_tmp, &prev)
        })?;
        step(ApplyStep::RenameLastKnownGood, hook, &|| {
            rename_synced(&last_good_tmp, &last_good)?;
            match &prev_meta {
                Some(m) => atomic_write(&store.meta_path(LAST_GOOD), &FleetStore::meta_bytes(m)),
                None => Ok(()),
            }
        })?;
    }
    step(ApplyStep::WriteCurrentTemp, hook, &|| {
        write_synced(&current_tmp, bytes)
    })?;
    step(ApplyStep::RenameCurrent, hook, &|| {
        rename_synced(&current_tmp, &current)
    })?;
    step(ApplyStep::RecordVersion, hook, &|| {
        atomic_write(&store.meta_path(CURRENT), &FleetStore::meta_bytes(under))?;
        atomic_write(
            &store.highest_path(),
            FleetStore::record(under.version, trust).as_bytes(),
        )
    })?;
    Ok(())
}

fn fleet_layer(b: &Bundle) -> Result<Layer, ConfigError> {
    let source = format!("fleet bundle v{}", b.version);
    let text = b.payload_str().map_err(|e| ConfigError {
        file: source.clone(),
        path: String::new(),
        reason: e.to_string(),
    })?;
    Layer::parse(LayerKind::Fleet, &source, text)
}

/// Every effective value as (path, value, the layer it came from), built-in defaults
/// included, secrets redacted: what `config show` and the serial `config` command print.
pub fn show_rows(loaded: &Loaded) -> Result<Vec<(String, String, String)>, toml::ser::Error> {
    let full: toml::Table = toml::Table::try_from(&loaded.effective.config)?;
    Ok(leaves(&full)
        .into_iter()
        .map(|(path, value)| {
            let source = loaded
                .effective
                .origins
                .get(&path)
                .cloned()
                .unwrap_or_else(|| "built-in default".into());
            let value = if crate::layers::redacted(&path) {
                "\"<redacted>\"".to_owned()
            } else {
                value
            };
            (path, value, source)
        })
        .collect())
}

/// Flatten the effective configuration into `path -> value` leaves.
pub fn leaves(t: &toml::Table) -> BTreeMap<String, String> {
    fn walk(out: &mut BTreeMap<String, String>, path: String, v: &toml::Value) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    walk(
                        out,
                        if path.is_empty() {
                            k.clone()
                        } else {
                            format!("{path}.{k}")
                        },
                        v,
                    );
                }
            }
            toml::Value::Array(a) if a.iter().all(toml::Value::is_table) && !a.is_empty() => {
                for (i, v) in a.iter().enumerate() {
                    walk(out, format!("{path}[{i}]"), v);
                }
            }
            other => {
                out.insert(path, other.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&mut out, String::new(), &toml::Value::Table(t.clone()));
    out
}

fn diff(old: Option<&Effective>, new: &Effective) -> Vec<Change> {
    let a = old.map(|o| leaves(&o.merged)).unwrap_or_default();
    let b = leaves(&new.merged);
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| Change {
            path: k.clone(),
            old: a.get(k).cloned(),
            new: b.get(k).cloned(),
        })
        .collect()
}
