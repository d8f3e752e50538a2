//! edge-signer: the credential agent. This library holds what the CLI and the daemon share.
#![deny(missing_docs)]

pub mod http;
pub mod tlsconf;
