//! The post-quantum hybrid X25519MLKEM768 (draft-ietf-tls-ecdhe-mlkem, code point 0x11EC) as
//! a rustls key exchange group: ML-KEM-768 (FIPS 203, RustCrypto's `ml-kem`) beside ring's
//! X25519. Only the key exchange is post-quantum; the signatures are whatever the rustls
//! configuration signs with (the agent's token).
//!
//! On the wire the ML-KEM part comes first: the client's share is its ML-KEM encapsulation
//! key then its X25519 public key, the server's the ML-KEM ciphertext then its X25519 public
//! key, and the shared secret the ML-KEM secret then the X25519 one. The client also offers
//! the X25519 half on its own (`hybrid_component`), so a server without ML-KEM answers on
//! X25519 without a HelloRetryRequest.
//!
//! A crate of its own so that its code and ML-KEM's (generic, so compiled where it is used)
//! build at `opt-level = 3` while the agent builds for size (what that buys: docs/perf.md).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use ml_kem::{Decapsulate, Encapsulate, Kem, KeyExport, MlKem768};
use rustls::crypto::ring::kx_group;
use rustls::crypto::{ActiveKeyExchange, CompletedKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::{Error, NamedGroup, PeerMisbehaved, ProtocolVersion};

/// ML-KEM-768 encapsulation key (the client's share of it).
const MLKEM768_EK_LEN: usize = 1184;
/// ML-KEM-768 ciphertext (the server's share of it).
const MLKEM768_CT_LEN: usize = 1088;
/// X25519 public key.
const X25519_LEN: usize = 32;

const BAD_SHARE: Error = Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare);

/// X25519MLKEM768.
pub static X25519MLKEM768: &dyn SupportedKxGroup = &X25519MlKem768;

/// The group behind [`X25519MLKEM768`].
#[derive(Debug)]
struct X25519MlKem768;

impl SupportedKxGroup for X25519MlKem768 {
    /// The client's half: a fresh ML-KEM key pair and a fresh X25519 key pair.
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let classical = kx_group::X25519.start()?;
        let (dk, ek) = MlKem768::generate_keypair();
        let mut share = Vec::with_capacity(MLKEM768_EK_LEN + X25519_LEN);
        share.extend_from_slice(&ek.to_bytes());
        share.extend_from_slice(classical.pub_key());
        Ok(Box::new(ClientHalf {
            dk,
            classical,
            share,
        }))
    }

    /// The server's half: encapsulate to the client's ML-KEM key, and X25519 with its key.
    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        if client_share.len() != MLKEM768_EK_LEN + X25519_LEN {
            return Err(BAD_SHARE);
        }
        let (ek_bytes, x25519_share) = client_share.split_at(MLKEM768_EK_LEN);
        let ek_bytes = ek_bytes.try_into().map_err(|_| BAD_SHARE)?;
        let ek = ml_kem::ml_kem_768::EncapsulationKey::new(ek_bytes).map_err(|_| BAD_SHARE)?;
        let (ct, pq_secret) = ek.encapsulate();
        let cl = kx_group::X25519.start_and_complete(x25519_share)?;
        let mut pub_key = Vec::with_capacity(MLKEM768_CT_LEN + X25519_LEN);
        pub_key.extend_from_slice(&ct);
        pub_key.extend_from_slice(&cl.pub_key);
        Ok(CompletedKeyExchange {
            group: NamedGroup::X25519MLKEM768,
            pub_key,
            secret: combined(&pq_secret, cl.secret.secret_bytes()),
        })
    }

    fn ffdhe_group(&self) -> Option<rustls::ffdhe_groups::FfdheGroup<'static>> {
        None
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

/// The ML-KEM secret then the X25519 secret.
fn combined(pq: &[u8], classical: &[u8]) -> SharedSecret {
    let mut s = zeroize::Zeroizing::new(Vec::with_capacity(pq.len() + classical.len()));
    s.extend_from_slice(pq);
    s.extend_from_slice(classical);
    SharedSecret::from(&s[..])
}

/// A client's key exchange in progress.
struct ClientHalf {
    dk: ml_kem::ml_kem_768::DecapsulationKey,
    classical: Box<dyn ActiveKeyExchange>,
    share: Vec<u8>,
}

impl ActiveKeyExchange for ClientHalf {
    fn complete(self: Box<Self>, server_share: &[u8]) -> Result<SharedSecret, Error> {
        if server_share.len() != MLKEM768_CT_LEN + X25519_LEN {
            return Err(BAD_SHARE);
        }
        let (ct, x25519_share) = server_share.split_at(MLKEM768_CT_LEN);
        let ct: ml_kem::ml_kem_768::Ciphertext = ct.try_into().map_err(|_| BAD_SHARE)?;
        let pq_secret = self.dk.decapsulate(&ct);
        let cl = self.classical.complete(x25519_share)?;
        Ok(combined(&pq_secret, cl.secret_bytes()))
    }

    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        Some((NamedGroup::X25519, self.classical.pub_key()))
    }

    fn complete_hybrid_component(
        self: Box<Self>,
        server_share: &[u8],
    ) -> Result<SharedSecret, Error> {
        self.classical.complete(server_share)
    }

    fn pub_key(&self) -> &[u8] {
        &self.share
    }

    fn ffdhe_group(&self) -> Option<rustls::ffdhe_groups::FfdheGroup<'static>> {
        None
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn both_sides_agree_and_the_shares_have_the_drafts_sizes() {
        let client = X25519MLKEM768.start().unwrap();
        assert_eq!(client.pub_key().len(), 1216);
        let server = X25519MLKEM768.start_and_complete(client.pub_key()).unwrap();
        assert_eq!(server.pub_key.len(), 1120);
        let secret = client.complete(&server.pub_key).unwrap();
        assert_eq!(secret.secret_bytes().len(), 64);
        assert_eq!(secret.secret_bytes(), server.secret.secret_bytes());
    }

    #[test]
    fn the_x25519_half_alone_agrees_with_a_plain_x25519_server() {
        let client = X25519MLKEM768.start().unwrap();
        let (g, x) = client.hybrid_component().unwrap();
        assert_eq!(g, NamedGroup::X25519);
        let server = kx_group::X25519.start_and_complete(x).unwrap();
        let secret = client.complete_hybrid_component(&server.pub_key).unwrap();
        assert_eq!(secret.secret_bytes(), server.secret.secret_bytes());
    }

    proptest! {
        #[test]
        fn a_share_of_any_other_shape_is_refused_not_a_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..1300)
        ) {
            let _ = X25519MLKEM768.start_and_complete(&bytes);
            let client = X25519MLKEM768.start().unwrap();
            let _ = client.complete(&bytes);
        }
    }
}
