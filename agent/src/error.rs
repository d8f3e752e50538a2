//! The agent library's error, and how a failure bears on retrying. A transient failure (the
//! token busy or removed, the network, a server's 5xx or 202, the disk) clears by itself and
//! is retried with backoff; a permanent one (refused, invalid, a policy, a damaged register, a
//! wrong PIN) does not, and retrying it fast only repeats it (or, for a PIN, counts towards
//! the token's lockout). The engine's retry policy reads [`Error::persistence`]: what the
//! failure was stated as, or the type of its cause, never its text.
//!
//! `anyhow` is the CLI's (the binary's) alone: an [`Error`] becomes an `anyhow::Error` at
//! that edge, with its whole chain of context as the message.

use crate::register::{Missing, RegisterError};
use std::error::Error as StdError;
use std::fmt;

/// Whether a failure may clear by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Retry with backoff from `renewal.retry_min`.
    Transient,
    /// Needs a person (or a new configuration): retried only every `renewal.retry_max`.
    Permanent,
}

/// What went wrong first.
enum Cause {
    /// Said in words by the agent.
    Message(String),
    /// An error of a library or of another module, kept with its type.
    Source(Box<dyn StdError + Send + Sync + 'static>),
}

/// A failure of the agent library: its first cause, the context added on the way out
/// (innermost first) and, when the code that failed knew it, whether it may clear by itself.
pub struct Error {
    cause: Cause,
    context: Vec<String>,
    stated: Option<Persistence>,
}

/// The library's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A failure said in words (its persistence comes from the context it is wrapped in, or
    /// is transient).
    pub fn msg(m: impl fmt::Display) -> Error {
        Error {
            cause: Cause::Message(m.to_string()),
            context: Vec::new(),
            stated: None,
        }
    }

    /// A failure that may clear by itself.
    pub fn transient(m: impl fmt::Display) -> Error {
        Error {
            stated: Some(Persistence::Transient),
            ..Error::msg(m)
        }
    }

    /// A failure that will not clear by itself.
    pub fn permanent(m: impl fmt::Display) -> Error {
        Error {
            stated: Some(Persistence::Permanent),
            ..Error::msg(m)
        }
    }

    /// Wrap it in what was being done.
    pub fn context(mut self, c: impl fmt::Display) -> Error {
        self.context.push(c.to_string());
        self
    }

    /// The first cause, if it is a `T` (or has one in its `source()` chain).
    pub fn downcast_ref<T: StdError + 'static>(&self) -> Option<&T> {
        let Cause::Source(s) = &self.cause else {
            return None;
        };
        let mut cur: Option<&(dyn StdError + 'static)> = Some(s.as_ref());
        while let Some(e) = cur {
            if let Some(t) = e.downcast_ref::<T>() {
                return Some(t);
            }
            cur = e.source();
        }
        None
    }

    /// Whether it may clear by itself: as stated where it was raised, else by its cause's
    /// type (the token's and the register's errors carry their own), else transient.
    pub fn persistence(&self) -> Persistence {
        if let Some(p) = self.stated {
            return p;
        }
        if let Some(t) = self.downcast_ref::<hsm_shim::Error>() {
            return if t.is_transient() {
                Persistence::Transient
            } else {
                Persistence::Permanent
            };
        }
        if let Some(r) = self.downcast_ref::<RegisterError>() {
            return match r {
                RegisterError::Io { .. } => Persistence::Transient,
                _ => Persistence::Permanent,
            };
        }
        if self.downcast_ref::<Missing>().is_some()
            || self
                .downcast_ref::<firmware_config::ConfigErrors>()
                .is_some()
        {
            return Persistence::Permanent;
        }
        Persistence::Transient
    }

    /// Every part of the message, outermost first.
    fn parts(&self) -> Vec<String> {
        let mut parts: Vec<String> = self.context.iter().rev().cloned().collect();
        match &self.cause {
            Cause::Message(m) => parts.push(m.clone()),
            Cause::Source(s) => {
                let mut cur: Option<&(dyn StdError + 'static)> = Some(s.as_ref());
                while let Some(e) = cur {
                    parts.push(e.to_string());
                    cur = e.source();
                }
            }
        }
        parts
    }
}

/// `{}`: the outermost message; `{:#}`: the whole chain, outermost first, joined by ": ".
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = self.parts();
        if f.alternate() {
            write!(f, "{}", parts.join(": "))
        } else {
            write!(f, "{}", parts.first().map(String::as_str).unwrap_or(""))
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:#}")
    }
}

/// Any error of a library or module becomes the first cause, its type kept for
/// [`Error::persistence`]. (`Error` itself is not a `std::error::Error`, as with `anyhow`,
/// so that this conversion can exist.)
impl<E: StdError + Send + Sync + 'static> From<E> for Error {
    fn from(e: E) -> Error {
        Error {
            cause: Cause::Source(Box::new(e)),
            context: Vec::new(),
            stated: None,
        }
    }
}

/// At the CLI's edge: the whole chain as the message.
impl From<Error> for anyhow::Error {
    fn from(e: Error) -> anyhow::Error {
        anyhow::Error::msg(format!("{e:#}"))
    }
}

/// Context on a result or an option, as the library adds it.
pub trait Context<T> {
    /// Wrap a failure in what was being done.
    fn context(self, c: impl fmt::Display) -> Result<T>;
    /// Wrap a failure in what was being done, said lazily.
    fn with_context<C: fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, c: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(c))
    }
    fn with_context<C: fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| e.into().context(f()))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, c: impl fmt::Display) -> Result<T> {
        self.ok_or_else(|| Error::msg(c))
    }
    fn with_context<C: fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.ok_or_else(|| Error::msg(f()))
    }
}

/// An [`Error`] said in words, formatted like `format!`.
#[macro_export]
macro_rules! err {
    ($($t:tt)*) => { $crate::error::Error::msg(format!($($t)*)) };
}

/// Return an [`Error`] said in words, formatted like `format!`.
#[macro_export]
macro_rules! bail {
    ($($t:tt)*) => { return Err($crate::err!($($t)*).into()) };
}

/// Return an [`Error`] said in words unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($t:tt)*) => { if !$cond { $crate::bail!($($t)*) } };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(e: hsm_shim::Error) -> Error {
        Error::from(e).context("signing the CSR")
    }

    #[test]
    fn the_type_of_the_cause_decides_not_the_text() {
        let removed = hsm_shim::Error::TokenNotFound {
            wanted: "gw".into(),
            present: "none".into(),
        };
        assert_eq!(token(removed).persistence(), Persistence::Transient);
        let pin = hsm_shim::Error::PinRequired;
        assert_eq!(token(pin).persistence(), Persistence::Permanent);
        let missing = Missing {
            generation: 2,
            field: "kid",
            status: "current".into(),
        };
        assert_eq!(
            Error::from(missing).context("rotating").persistence(),
            Persistence::Permanent
        );
        let refused = Error::permanent("no").context("x");
        assert_eq!(refused.persistence(), Persistence::Permanent);
        // Words do not count: only types.
        let worded = crate::err!("permanent PIN_INCORRECT refused");
        assert_eq!(worded.persistence(), Persistence::Transient);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(Error::from(io).persistence(), Persistence::Transient);
    }

    #[test]
    fn the_message_is_the_outermost_and_the_chain_on_alternate() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = Error::from(io).context("reading x").context("loading");
        assert_eq!(e.to_string(), "loading");
        assert_eq!(format!("{e:#}"), "loading: reading x: no such file");
        let a: anyhow::Error = e.into();
        assert_eq!(a.to_string(), "loading: reading x: no such file");
        let none: Option<u8> = None;
        assert_eq!(none.context("absent").unwrap_err().to_string(), "absent");
    }
}
