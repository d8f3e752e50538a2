//! PINs: where they come from, and a type that never shows them.

use crate::error::{Error, Result};
use std::fmt;
use std::path::PathBuf;
use zeroize::Zeroizing;

/// A PIN held in memory that is wiped on drop and never printed.
#[derive(Clone)]
pub struct Pin(Zeroizing<String>);

impl Pin {
    /// Wrap a PIN string. Trailing newlines are the caller's business.
    pub fn new(s: Zeroizing<String>) -> Self {
        Pin(s)
    }
    /// The secret itself, for a protocol that must send it (SCEP's challenge password in the
    /// CSR); never for a log or a message.
    pub fn reveal(&self) -> &str {
        &self.0
    }
    /// The PIN as cryptoki wants it. The copy lives in a `SecretString`, which zeroizes too.
    pub(crate) fn auth(&self) -> cryptoki::types::AuthPin {
        cryptoki::types::AuthPin::from(self.0.as_str())
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

/// Where a PIN is read from. The PIN itself is never part of configuration, nor of the
/// environment (which every child process inherits and /proc shows to the process's uid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file holding the PIN (trailing newline stripped).
    File(PathBuf),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/<name>`.
    Credential(String),
}

impl PinSource {
    /// Read the PIN. Errors name the source, never the content.
    pub fn read(&self) -> Result<Pin> {
        let raw: Zeroizing<String> = match self {
            PinSource::File(p) => {
                Zeroizing::new(std::fs::read_to_string(p).map_err(|e| Error::Pin {
                    source_desc: format!("file {}", p.display()),
                    reason: e.to_string(),
                })?)
            }
            PinSource::Credential(name) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| Error::Pin {
                    source_desc: format!("systemd credential {name}"),
                    reason: "CREDENTIALS_DIRECTORY is not set (is LoadCredential= in the unit?)"
                        .into(),
                })?;
                let p = PathBuf::from(dir).join(name);
                return PinSource::File(p).read();
            }
        };
        let trimmed = raw.trim_end_matches(['\n', '\r']);
        if trimmed.is_empty() {
            return Err(Error::Pin {
                source_desc: self.describe(),
                reason: "it is empty".into(),
            });
        }
        Ok(Pin(Zeroizing::new(trimmed.to_owned())))
    }

    /// A description safe to log.
    pub fn describe(&self) -> String {
        match self {
            PinSource::File(p) => format!("file {}", p.display()),
            PinSource::Credential(n) => format!("systemd credential {n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_pin() {
        let p = Pin::new(Zeroizing::new("123456-secret".into()));
        let s = format!("{p:?} {:?}", Some(p.clone()));
        assert!(!s.contains("123456"));
        assert!(s.contains("redacted"));
    }

    #[test]
    fn file_pin_trims_newline_and_errors_name_source() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pin");
        std::fs::write(&f, "4321\n").unwrap();
        let pin = PinSource::File(f.clone()).read().unwrap();
        assert_eq!(pin.0.as_str(), "4321");
        std::fs::write(&f, "\n").unwrap();
        let e = PinSource::File(f).read().unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let e = PinSource::File(dir.path().join("nope"))
            .read()
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn credential_needs_directory() {
        // Only checks the error path; CREDENTIALS_DIRECTORY is normally unset in tests.
        if std::env::var_os("CREDENTIALS_DIRECTORY").is_none() {
            let e = PinSource::Credential("pin".into()).read().unwrap_err();
            assert!(e.to_string().contains("CREDENTIALS_DIRECTORY"));
        }
    }
}
