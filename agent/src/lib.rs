//! edge-signer: the credential agent. This library holds what the CLI and the daemon share.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod clock;
pub mod configuration;
pub mod control;
pub mod daemon;
pub mod error;
pub mod events;
pub mod fleet;
pub mod generation;
pub mod http;
pub mod identities;
pub mod issuer;
pub mod kx;
pub mod lifecycle;
pub mod local_api;
pub mod logging;
pub mod register;
pub mod serial;
pub mod serve;
pub mod statelock;
pub mod systemd;
pub mod tcp;
pub mod text;
pub mod tlsconf;
pub mod url;
pub mod validate;
