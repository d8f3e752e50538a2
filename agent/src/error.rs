//! How a failure bears on retrying. A transient failure (the token busy or removed, the
//! network, a server's 5xx or 202, the disk) clears by itself and is retried with backoff; a
//! permanent one (refused, invalid, a policy, a damaged register, a wrong PIN) does not, and
//! retrying it fast only repeats it (or, for a PIN, counts towards the token's lockout). The
//! engine's retry policy reads the error's type, never its text.

use crate::register::RegisterError;

/// Whether a failure may clear by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Retry with backoff from `renewal.retry_min`.
    Transient,
    /// Needs a person (or a new configuration): retried only every `renewal.retry_max`.
    Permanent,
}

/// A failure the agent states with its persistence (beside the token's and the register's own
/// error types, which carry theirs).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// May clear by itself.
    #[error("{0}")]
    Transient(String),
    /// Will not clear by itself.
    #[error("{0}")]
    Permanent(String),
}

/// The persistence of `e`: the first cause in its chain whose type says.
pub fn persistence_of(e: &anyhow::Error) -> Persistence {
    for cause in e.chain() {
        if let Some(own) = cause.downcast_ref::<Error>() {
            return match own {
                Error::Transient(_) => Persistence::Transient,
                Error::Permanent(_) => Persistence::Permanent,
            };
        }
        if let Some(t) = cause.downcast_ref::<hsm_shim::Error>() {
            return if t.is_transient() {
                Persistence::Transient
            } else {
                Persistence::Permanent
            };
        }
        if let Some(r) = cause.downcast_ref::<RegisterError>() {
            return match r {
                RegisterError::Io { .. } => Persistence::Transient,
                _ => Persistence::Permanent,
            };
        }
        if cause
            .downcast_ref::<firmware_config::ConfigErrors>()
            .is_some()
        {
            return Persistence::Permanent;
        }
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return Persistence::Transient;
        }
    }
    Persistence::Transient
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(e: hsm_shim::Error) -> anyhow::Error {
        anyhow::Error::new(e).context("signing the CSR")
    }

    #[test]
    fn the_type_in_the_chain_decides_not_the_text() {
        let removed = hsm_shim::Error::TokenNotFound {
            wanted: "gw".into(),
            present: "none".into(),
        };
        assert_eq!(persistence_of(&token(removed)), Persistence::Transient);
        let pin = hsm_shim::Error::PinRequired;
        assert_eq!(persistence_of(&token(pin)), Persistence::Permanent);
        let missing = RegisterError::Missing {
            generation: 2,
            field: "kid",
            status: "current".into(),
        };
        assert_eq!(
            persistence_of(&anyhow::Error::new(missing).context("rotating")),
            Persistence::Permanent
        );
        let refused = anyhow::Error::new(Error::Permanent("no".into())).context("x");
        assert_eq!(persistence_of(&refused), Persistence::Permanent);
        // Words do not count: only types.
        let worded = anyhow::anyhow!("permanent PIN_INCORRECT refused");
        assert_eq!(persistence_of(&worded), Persistence::Transient);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(
            persistence_of(&anyhow::Error::new(io)),
            Persistence::Transient
        );
    }
}
