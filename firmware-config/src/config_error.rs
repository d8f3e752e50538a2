//! A configuration error (file, field path, reason), all of them at once, and the file a
//! value came from: what validation and the layers both report with.

use std::collections::BTreeMap;
use std::fmt;

/// One configuration error: where (file, field path) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File or layer the value came from.
    pub file: String,
    /// Field path such as `identity[1].renewal.before` (empty for the whole file).
    pub path: String,
    /// What is wrong and, where it helps, what to do.
    pub reason: String,
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.file, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.file, self.path, self.reason)
        }
    }
}

/// All errors found, reported at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Find the file that set `path` (or the deepest value under it).
pub fn origin_of(
    origins: &BTreeMap<String, String>,
    path: &str,
    unknown_field: Option<&str>,
) -> String {
    if let Some(f) = unknown_field {
        let key = join(path, f);
        if let Some(src) = origins
            .iter()
            .find(|(k, _)| {
                **k == key || k.starts_with(&format!("{key}.")) || k.starts_with(&format!("{key}["))
            })
            .map(|(_, s)| s)
        {
            return src.clone();
        }
    }
    if let Some(src) = origins.get(path) {
        return src.clone();
    }
    // An element of a list set as a whole (`tls.kx[0]` of `tls.kx`).
    let mut parent = path;
    while let Some(i) = parent.rfind(['.', '[']) {
        parent = &parent[..i];
        if let Some(src) = origins.get(parent) {
            return src.clone();
        }
    }
    let under: Vec<&String> = origins
        .iter()
        .filter(|(k, _)| {
            path.is_empty()
                || k.starts_with(&format!("{path}."))
                || k.starts_with(&format!("{path}["))
        })
        .map(|(_, s)| s)
        .collect();
    match under.last() {
        Some(s) if under.iter().all(|x| x == s) => (*s).clone(),
        Some(_) => "merged configuration".into(),
        None => "not set in any file".into(),
    }
}

/// `prefix.k`, or `k` at the top.
pub(crate) fn join(prefix: &str, k: &str) -> String {
    if prefix.is_empty() {
        k.to_owned()
    } else {
        format!("{prefix}.{k}")
    }
}
