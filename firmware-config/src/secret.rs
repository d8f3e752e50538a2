//! Where a secret comes from: the token PIN, SCEP's challenge password.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where a PIN (or another secret: SCEP's challenge) comes from: `{ file = ".." }` or `{ credential = ".." }` (never the
/// environment: every child inherits it and /proc shows it to the process's uid).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum PinConfig {
    /// A file holding the PIN.
    File(PathBuf),
    /// A systemd credential name (`$CREDENTIALS_DIRECTORY/<name>`).
    Credential(String),
}

impl PinConfig {
    /// The hsm-shim source.
    pub fn source(&self) -> hsm_shim::PinSource {
        match self {
            PinConfig::File(p) => hsm_shim::PinSource::File(p.clone()),
            PinConfig::Credential(c) => hsm_shim::PinSource::Credential(c.clone()),
        }
    }
}
