//! firmware-config: the configuration an edge-signer device runs with.
//!
//! Three layers (firmware defaults, the newest applied fleet bundle, local overrides) merge
//! into one typed [`Config`], validated with errors that name the file and field path.
//! Fleet bundles are signed by a key pinned in the firmware layer, versioned (no rollback),
//! and applied atomically with the previous one kept as last-known-good.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod atomic;
pub mod bundle;
mod config_error;
pub mod fleet_channel;
pub mod fleet_store;
pub mod issuers;
pub mod layers;
mod names;
pub mod schema;
pub mod secret;
pub mod serving;
pub mod signer;
pub mod store;
pub mod tls;
pub mod trust;
pub mod units;
pub mod validate;

pub use bundle::{Audience, Bundle, BundleError, BundleKind, FleetKey};
pub use layers::{ConfigError, ConfigErrors, Effective, Layer, LayerKind};
pub use schema::Config;
pub use signer::FleetSigner;
pub use store::{Applied, ApplyError, ApplyReport, ApplyStep, Channel, Loaded, Sources};
pub use units::{Duration, Percent};
