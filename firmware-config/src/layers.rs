//! Layers: firmware defaults, then the newest applied fleet bundle, then local overrides
//! (`agent.toml`, then `agent.d/*.toml` in name order). Tables merge key by key;
//! `[[identity]]` and `[[issuer]]` entries merge by `name`; other arrays are replaced.
//! Every leaf remembers the layer it came from, for `config show` and for error messages.

use crate::config_error::join;
pub use crate::config_error::{origin_of, ConfigError, ConfigErrors};
use crate::schema::Config;
use crate::validate;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// Which hand wrote a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Shipped with the firmware image; the only layer that may pin fleet keys.
    Firmware,
    /// The applied fleet bundle.
    Fleet,
    /// Local overrides on the device.
    Local,
}

/// One parsed layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Who wrote it.
    pub kind: LayerKind,
    /// File path or `fleet bundle v42`.
    pub source: String,
    /// Its TOML.
    pub table: Table,
}

impl Layer {
    /// Parse TOML text as a layer; syntax errors name the line.
    pub fn parse(kind: LayerKind, source: &str, text: &str) -> Result<Layer, ConfigError> {
        let table: Table = toml::from_str(text).map_err(|e| ConfigError {
            file: source.to_owned(),
            path: String::new(),
            reason: e.to_string().trim_end().replace('\n', "\n    "),
        })?;
        Ok(Layer {
            kind,
            source: source.to_owned(),
            table,
        })
    }

    /// Read and parse a file; a missing file is `Ok(None)`.
    pub fn read(kind: LayerKind, path: &Path) -> Result<Option<Layer>, ConfigError> {
        let text = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(ConfigError {
                    file: path.display().to_string(),
                    path: String::new(),
                    reason: format!("cannot read: {e}"),
                })
            }
        };
        let text = String::from_utf8(text).map_err(|_| ConfigError {
            file: path.display().to_string(),
            path: String::new(),
            reason: "not UTF-8 text".into(),
        })?;
        Layer::parse(kind, &path.display().to_string(), &text).map(Some)
    }
}

/// The local override files: `agent.toml`, then `agent.d/*.toml` in name order.
pub fn local_files(agent_toml: &Path) -> Vec<PathBuf> {
    let mut files = vec![agent_toml.to_owned()];
    let dir = agent_toml.with_file_name("agent.d");
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut extra: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        extra.sort();
        files.extend(extra);
    }
    files
}

/// Keys only some layers may set: (dotted key, layers allowed, why).
const RESTRICTED: &[(&str, &[LayerKind], &str)] = &[
    (
        "fleet.trusted_keys",
        &[LayerKind::Firmware],
        "fleet trust keys come only from the firmware defaults (or a signed trust bundle)",
    ),
    (
        "serial.technician_keys",
        &[LayerKind::Firmware],
        "technician keys are pinned in the firmware defaults",
    ),
    (
        "fleet.trust_version",
        &[LayerKind::Firmware],
        "the trust version belongs to the firmware's key set",
    ),
    (
        "paths.state_dir",
        &[LayerKind::Firmware, LayerKind::Local],
        "the state directory holds the fleet bundles themselves; a bundle cannot move it",
    ),
];

/// The merged configuration with the origin of every value.
#[derive(Debug, Clone)]
pub struct Effective {
    /// The typed, validated configuration.
    pub config: Config,
    /// The merged TOML.
    pub merged: Table,
    /// Leaf path -> layer source.
    pub origins: BTreeMap<String, String>,
}

fn record(origins: &mut BTreeMap<String, String>, path: &str, v: &Value, source: &str) {
    origins.retain(|k, _| {
        !(k == path || k.starts_with(&format!("{path}.")) || k.starts_with(&format!("{path}[")))
    });
    match v {
        Value::Table(t) => {
            for (k, v) in t {
                record(origins, &format!("{path}.{k}"), v, source);
            }
        }
        Value::Array(a) if a.iter().all(Value::is_table) && !a.is_empty() => {
            for (i, v) in a.iter().enumerate() {
                record(origins, &format!("{path}[{i}]"), v, source);
            }
        }
        _ => {
            origins.insert(path.to_owned(), source.to_owned());
        }
    }
}

fn merge(
    base: &mut Table,
    over: &Table,
    prefix: &str,
    source: &str,
    origins: &mut BTreeMap<String, String>,
) {
    for (k, v) in over {
        let path = join(prefix, k);
        match (base.get_mut(k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o, &path, source, origins),
            (Some(Value::Array(b)), Value::Array(o))
                if prefix.is_empty() && (k == "identity" || k == "issuer") =>
            {
                for item in o {
                    let name = item.get("name").and_then(Value::as_str);
                    let existing = name.and_then(|n| {
                        b.iter()
                            .position(|x| x.get("name").and_then(Value::as_str) == Some(n))
                    });
                    match (existing, item) {
                        (Some(i), Value::Table(ot)) => {
                            if let Some(Value::Table(bt)) = b.get_mut(i) {
                                merge(bt, ot, &format!("{path}[{i}]"), source, origins);
                            }
                        }
                        _ => {
                            record(origins, &format!("{path}[{}]", b.len()), item, source);
                            b.push(item.clone());
                        }
                    }
                }
            }
            _ => {
                record(origins, &path, v, source);
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// What a fleet bundle may set (everything else only from the firmware or local layers):
/// per identity its names, renewal policy, overlap, probe URL and subject policy; per issuer
/// its URL, label and timings; the log level. Never the token (a library the agent loads),
/// the notify hook (a command it runs), the local API, the serial port, fleet trust, paths,
/// nor any CA bundle or credential *path*: one leaked fleet key must not be code execution
/// or a new trust anchor on every device.
const FLEET_IDENTITY: &[&str] = &[
    "name",
    "key_type",
    "subject",
    "sans",
    "cn_suffix",
    "issuer",
    "renewal",
    "overlap",
    "probe_url",
    "usage",
    "subject_match",
];
const FLEET_ISSUER: &[&str] = &[
    "name",
    "kind",
    "url",
    "label",
    "timeout",
    "poll_interval",
    "new_key_lifetime",
    "old_key_overlap",
];
const FLEET_RULE: &str = "a fleet bundle may set identities (names, subject, SANs, renewal, overlap, probe_url, subject_match), issuer URLs and timings, and log; token, notify, api, serial, fleet, paths and CA bundle or credential paths come only from the firmware or local layers";

/// Everything a fleet layer sets outside [`FLEET_IDENTITY`], [`FLEET_ISSUER`] and `log`.
pub fn fleet_scope_errors(layer: &Layer) -> Vec<ConfigError> {
    let mut out = Vec::new();
    let mut refuse = |path: String| {
        out.push(ConfigError {
            file: layer.source.clone(),
            path,
            reason: format!("may not come from a fleet bundle: {FLEET_RULE}"),
        })
    };
    for (section, value) in &layer.table {
        let allowed: Option<&[&str]> = match section.as_str() {
            "identity" => Some(FLEET_IDENTITY),
            "issuer" => Some(FLEET_ISSUER),
            "log" => continue,
            _ => None,
        };
        match (allowed, value) {
            (Some(fields), Value::Array(entries)) => {
                for (i, e) in entries.iter().enumerate() {
                    let Some(t) = e.as_table() else { continue };
                    for k in t.keys().filter(|k| !fields.contains(&k.as_str())) {
                        refuse(format!("{section}[{i}].{k}"));
                    }
                }
            }
            (Some(_), _) => {}
            (None, Value::Table(t)) => t.keys().for_each(|k| refuse(format!("{section}.{k}"))),
            (None, _) => refuse(section.clone()),
        }
    }
    out
}

fn restricted_errors(layer: &Layer) -> Vec<ConfigError> {
    if layer.kind == LayerKind::Fleet {
        let scope = fleet_scope_errors(layer);
        if !scope.is_empty() {
            return scope;
        }
    }
    RESTRICTED
        .iter()
        .filter(|(key, allowed, _)| {
            let (section, field) = key.split_once('.').unwrap_or((key, ""));
            !allowed.contains(&layer.kind)
                && layer
                    .table
                    .get(section)
                    .and_then(|s| s.get(field))
                    .is_some()
        })
        .map(|(key, _, why)| ConfigError {
            file: layer.source.clone(),
            path: (*key).to_owned(),
            reason: format!("may not be set here: {why}"),
        })
        .collect()
}

/// Merge layers in order, then type-check and validate the result.
pub fn resolve(layers: &[Layer]) -> Result<Effective, ConfigErrors> {
    let (merged, origins) = merged(layers);
    match check_merged(layers, &merged, &origins) {
        (Some(config), errors) if errors.is_empty() => Ok(Effective {
            config,
            merged,
            origins,
        }),
        (_, errors) => Err(ConfigErrors(errors)),
    }
}

/// Every error of the merged layers at once (`config check`), and the configuration with
/// the values that had type errors left out (their defaults in their place), when that much
/// deserializes: for the checks that look at files.
pub fn check_all(layers: &[Layer]) -> (Option<Config>, Vec<ConfigError>) {
    let (merged, origins) = merged(layers);
    check_merged(layers, &merged, &origins)
}

fn merged(layers: &[Layer]) -> (Table, BTreeMap<String, String>) {
    let mut merged = Table::new();
    let mut origins = BTreeMap::new();
    for l in layers {
        merge(&mut merged, &l.table, "", &l.source, &mut origins);
    }
    (merged, origins)
}

fn check_merged(
    layers: &[Layer],
    merged: &Table,
    origins: &BTreeMap<String, String>,
) -> (Option<Config>, Vec<ConfigError>) {
    let mut errors: Vec<ConfigError> = layers.iter().flat_map(restricted_errors).collect();
    // Every type error at once: each bad value is reported, then left out (its default
    // applies) and the rest checked again, until it deserializes or nothing can be left out.
    let mut table = merged.clone();
    let mut left_out: Vec<String> = Vec::new();
    let config: Config = loop {
        match serde_path_to_error::deserialize(Value::Table(table.clone())) {
            Ok(c) => break c,
            Err(e) => {
                let (path, reason) = precise(&table, &e);
                let unknown = reason
                    .strip_prefix("unknown field `")
                    .and_then(|r| r.split('`').next())
                    .map(str::to_owned);
                errors.push(ConfigError {
                    file: origin_of(origins, &path, unknown.as_deref()),
                    path: path.clone(),
                    reason,
                });
                let target = match &unknown {
                    Some(u) if path == *u || path.ends_with(&format!(".{u}")) => path,
                    Some(u) if !path.is_empty() => format!("{path}.{u}"),
                    Some(u) => u.clone(),
                    None => path,
                };
                if left_out.len() >= 100 || !remove_at(&mut table, &target) {
                    return (None, errors);
                }
                left_out.push(target);
            }
        }
    };
    let mut checks = validate::check(&config, origins);
    // What was left out for a type error is not reported again as missing.
    checks.retain(|c| !left_out.iter().any(|l| c.path.starts_with(l.as_str())));
    errors.extend(checks);
    (Some(config), errors)
}

/// The path and reason of a deserialization error, inside an `[[issuer]]` too (a table
/// tagged by `kind`: serde reports its errors at the element, so it is read again by kind).
fn precise(table: &Table, e: &serde_path_to_error::Error<toml::de::Error>) -> (String, String) {
    let path = e.path().to_string().trim_start_matches('.').to_owned();
    let path = if path == "?" { String::new() } else { path };
    let reason = e.inner().message().to_owned();
    let element = path
        .strip_prefix("issuer[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|i| i.parse::<usize>().ok())
        .and_then(|i| table.get("issuer")?.as_array()?.get(i));
    let Some(Value::Table(t)) = element else {
        return (path, reason);
    };
    let mut fields = t.clone();
    let kind = fields.remove("kind");
    let inner = match kind.as_ref().and_then(Value::as_str) {
        Some("est") => {
            serde_path_to_error::deserialize::<_, crate::schema::EstIssuer>(Value::Table(fields))
                .err()
        }
        Some("portal") => {
            serde_path_to_error::deserialize::<_, crate::schema::PortalIssuer>(Value::Table(fields))
                .err()
        }
        Some("jwk-rotation") => {
            serde_path_to_error::deserialize::<_, crate::schema::JwkIssuer>(Value::Table(fields))
                .err()
        }
        _ => None,
    };
    match inner {
        Some(i) if i.path().to_string() != "?" && i.path().to_string() != "." => (
            format!("{path}.{}", i.path().to_string().trim_start_matches('.')),
            i.inner().message().to_owned(),
        ),
        Some(i) => (path, i.inner().message().to_owned()),
        None => (path, reason),
    }
}

/// Remove the value at `path` (`a.b[2].c`) from `table`; false when there is none, or it is
/// a whole array element (removing it would renumber the others).
fn remove_at(table: &mut Table, path: &str) -> bool {
    let mut parts: Vec<&str> = path.split('.').filter(|p| !p.is_empty()).collect();
    let Some(last) = parts.pop() else {
        return false;
    };
    if last.ends_with(']') {
        return false;
    }
    let mut here = table;
    for part in parts {
        let (key, index) = match part.split_once('[') {
            Some((k, i)) => (k, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let next = match (here.get_mut(key), index) {
            (Some(Value::Table(t)), None) => t,
            (Some(Value::Array(a)), Some(i)) => match a.get_mut(i) {
                Some(Value::Table(t)) => t,
                _ => return false,
            },
            _ => return false,
        };
        here = next;
    }
    here.remove(last).is_some()
}
/// Secret-looking keys are redacted in `config show` (the schema holds none, by design:
/// only where to read secrets from).
pub fn redacted(path: &str) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path).to_ascii_lowercase();
    ["password", "secret", "pin_value", "passphrase"]
        .iter()
        .any(|s| last == *s)
}
