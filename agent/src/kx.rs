//! The key exchange groups a configuration names, as rustls groups: ring's classic ones and
//! the post-quantum hybrid of the `hybrid-kx` crate.

use firmware_config::schema::KxGroup;
use hsm_shim::rustls;
pub use hybrid_kx::X25519MLKEM768;
use rustls::crypto::ring::kx_group;
use rustls::crypto::SupportedKxGroup;
use rustls::NamedGroup;

/// The rustls group a configured name stands for.
pub fn group(g: KxGroup) -> &'static dyn SupportedKxGroup {
    match g {
        KxGroup::X25519Mlkem768 => X25519MLKEM768,
        KxGroup::X25519 => kx_group::X25519,
        KxGroup::Secp256r1 => kx_group::SECP256R1,
        KxGroup::Secp384r1 => kx_group::SECP384R1,
    }
}

/// The configuration name of a negotiated group (`other` for one the agent never offers).
pub fn name(g: NamedGroup) -> &'static str {
    match g {
        NamedGroup::X25519MLKEM768 => "X25519MLKEM768",
        NamedGroup::X25519 => "X25519",
        NamedGroup::secp256r1 => "secp256r1",
        NamedGroup::secp384r1 => "secp384r1",
        _ => "other",
    }
}
