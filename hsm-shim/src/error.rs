//! One error type for everything the token layer can report.

use std::path::PathBuf;

/// Errors from the token layer. PKCS#11 failures keep the `CKR_*` code and the function.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PKCS#11 function returned an error code.
    #[error("{function} failed: {ckr}{hint}")]
    Pkcs11 {
        /// The PKCS#11 function, e.g. `C_Login`.
        function: String,
        /// The return code as `CKR_*` name.
        ckr: String,
        /// A sentence saying what to do, or empty.
        hint: &'static str,
        /// The original error, to match on the code (not chained into messages: its
        /// text is the spec's paragraph, the CKR name says it better).
        cause: cryptoki::error::Error,
    },
    /// Any other cryptoki failure (conversion, missing symbol).
    #[error("PKCS#11 library error: {0}")]
    Cryptoki(String),
    /// The module file does not exist.
    #[error("PKCS#11 module {0} not found; install it or point --module / token.module at the right file")]
    ModuleMissing(PathBuf),
    /// The module exists but could not be loaded.
    #[error("cannot load PKCS#11 module {path}: {reason}")]
    ModuleLoad {
        /// Module path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No token with that label or serial.
    #[error("token '{wanted}' not found; tokens present: {present}; check --token / token.label")]
    TokenNotFound {
        /// What was asked for.
        wanted: String,
        /// Labels present, comma separated (or "none").
        present: String,
    },
    /// No free slot to initialise a token in.
    #[error("no uninitialised slot left in this module to create token '{0}'")]
    NoFreeSlot(String),
    /// A PIN source could not be read.
    #[error("cannot read PIN from {source_desc}: {reason}")]
    Pin {
        /// Which source (file path, env var name), never the PIN.
        source_desc: String,
        /// Why.
        reason: String,
    },
    /// An operation needs a PIN and none was given.
    #[error("this operation needs the user PIN; pass --pin-file FILE (or EDGE_SIGNER_PIN_FILE)")]
    PinRequired,
    /// No key with that id/label.
    #[error("no key {0} in the token; `edge-signer key list` shows the keys present")]
    KeyNotFound(String),
    /// A `pkcs11:` URI could not be parsed.
    #[error("invalid pkcs11 URI: {0}")]
    Uri(String),
    /// The token returned data we cannot interpret.
    #[error("unexpected data from the token: {0}")]
    BadTokenData(String),
    /// The token lacks what the operation needs (a mechanism, a key size).
    #[error("not supported by this token: {0}")]
    NotSupportedByToken(String),
    /// The token holds a key of a type edge-signer does not use (another program's).
    #[error("a key of a type edge-signer does not use: {0}")]
    UnknownKeyType(String),
    /// An object of that name exists already.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The request itself cannot be done as asked (a subject, a SAN, a digest length, an
    /// algorithm for this key type, an empty chain).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A certificate does not carry the key's public key.
    #[error("certificate does not match the token key: {0}")]
    KeyCertMismatch(String),
    /// After destroy, objects with the id were still found.
    #[error("destroy incomplete: {0} object(s) with this CKA_ID are still in the token")]
    DestroyIncomplete(usize),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the failure may clear by itself (the token busy, removed or out of sessions, the
    /// module not installed yet, a key not seen yet) rather than need a person (a wrong PIN, a
    /// mechanism or key the token refuses, a malformed request): callers retry the first kind
    /// with backoff, and never retry a wrong PIN fast (each try counts towards the lockout).
    pub fn is_transient(&self) -> bool {
        use cryptoki::error::RvError as Rv;
        match self {
            Error::Pkcs11 { .. } => !matches!(
                self.rv(),
                Some(
                    Rv::PinIncorrect
                        | Rv::PinLocked
                        | Rv::PinExpired
                        | Rv::PinInvalid
                        | Rv::PinLenRange
                        | Rv::MechanismInvalid
                        | Rv::MechanismParamInvalid
                        | Rv::KeyTypeInconsistent
                        | Rv::KeyFunctionNotPermitted
                        | Rv::TemplateInconsistent
                        | Rv::AttributeValueInvalid
                )
            ),
            Error::Pin { .. }
            | Error::PinRequired
            | Error::InvalidRequest(_)
            | Error::NotSupportedByToken(_)
            | Error::UnknownKeyType(_)
            | Error::AlreadyExists(_)
            | Error::Uri(_)
            | Error::KeyCertMismatch(_) => false,
            Error::Cryptoki(_)
            | Error::ModuleMissing(_)
            | Error::ModuleLoad { .. }
            | Error::TokenNotFound { .. }
            | Error::NoFreeSlot(_)
            | Error::KeyNotFound(_)
            | Error::BadTokenData(_)
            | Error::DestroyIncomplete(_) => true,
        }
    }

    /// The PKCS#11 return code, if this is a PKCS#11 failure.
    pub fn rv(&self) -> Option<cryptoki::error::RvError> {
        match self {
            Error::Pkcs11 {
                cause: cryptoki::error::Error::Pkcs11(rv, _),
                ..
            } => Some(*rv),
            _ => None,
        }
    }
}

impl From<cryptoki::error::Error> for Error {
    fn from(e: cryptoki::error::Error) -> Self {
        match &e {
            cryptoki::error::Error::Pkcs11(rv, f) => {
                let ckr = ckr_name(rv);
                Error::Pkcs11 {
                    function: format!("C_{f:?}"),
                    hint: hint_for(&ckr),
                    ckr,
                    cause: e,
                }
            }
            other => Error::Cryptoki(other.to_string()),
        }
    }
}

/// `PinIncorrect` -> `CKR_PIN_INCORRECT`.
pub fn ckr_name(rv: &cryptoki::error::RvError) -> String {
    let camel = format!("{rv:?}");
    let mut out = String::from("CKR_");
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn hint_for(ckr: &str) -> &'static str {
    match ckr {
        "CKR_PIN_INCORRECT" => {
            " (wrong PIN: check the file given with --pin-file; repeated failures lock the token)"
        }
        "CKR_PIN_LOCKED" => " (the user PIN is locked: the security officer must reset it)",
        "CKR_USER_PIN_NOT_INITIALIZED" => {
            " (the token has no user PIN yet: run `edge-signer token init`)"
        }
        "CKR_TOKEN_NOT_PRESENT" | "CKR_DEVICE_REMOVED" => {
            " (the token went away: check the device)"
        }
        "CKR_MECHANISM_INVALID" => " (the token does not support this mechanism)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn ckr_names() {
        use cryptoki::error::RvError;
        assert_eq!(ckr_name(&RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(
            ckr_name(&RvError::SessionHandleInvalid),
            "CKR_SESSION_HANDLE_INVALID"
        );
    }

    #[test]
    fn a_wrong_pin_is_not_transient_a_removed_token_is() {
        use cryptoki::context::Function;
        use cryptoki::error::{Error as Ck, RvError};
        let of = |rv| Error::from(Ck::Pkcs11(rv, Function::Login)).is_transient();
        assert!(!of(RvError::PinIncorrect));
        assert!(!of(RvError::MechanismInvalid));
        assert!(of(RvError::DeviceRemoved));
        assert!(of(RvError::SessionHandleInvalid));
        assert!(!Error::PinRequired.is_transient());
        assert!(Error::KeyNotFound("k".into()).is_transient());
    }
}
