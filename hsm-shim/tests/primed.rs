//! Primed signatures (`primed`): after a signature, the next one's C_SignInit is made
//! ahead in a session of its own; the next signature of that key and kind is then one
//! C_Sign. They verify like any other, and no session primed before a destroy signs after it.

use hsm_shim::testing::*;
use hsm_shim::{Hash, KeyRef, KeyType, SignAlg, TokenKey};
use ring::signature::{self, UnparsedPublicKey};

const ES256: SignAlg = SignAlg::Ecdsa {
    hash: Hash::Sha256,
    der: true,
};

fn key(t: &TestToken, kt: KeyType) -> TokenKey {
    let info = t.token.generate_key(kt, "gw").unwrap();
    TokenKey::open(t.token.clone(), &KeyRef::Id(info.id)).unwrap()
}

/// Sign `msg` with `alg`, run the prime, and say whether the signature used a primed
/// session (one was kept before it, and the prime kept one again).
fn sign_primed(t: &TestToken, k: &TokenKey, alg: SignAlg, msg: &[u8]) -> Vec<u8> {
    let (sig, prime) = k.sign_and_prime(alg, msg, false).unwrap();
    prime.expect("SoftHSM signatures prime the next one").run();
    assert!(t.token.primed_sessions() >= 1);
    sig
}

fn primed_signatures_verify_for_each_key_type_and_alg(kind: TokenKind) {
    let t = TestToken::new_on(kind);
    let cases: [(KeyType, SignAlg, &dyn signature::VerificationAlgorithm); 4] = [
        (KeyType::EcP256, ES256, &signature::ECDSA_P256_SHA256_ASN1),
        (
            KeyType::EcP256,
            SignAlg::Ecdsa {
                hash: Hash::Sha256,
                der: false,
            },
            &signature::ECDSA_P256_SHA256_FIXED,
        ),
        (
            KeyType::EcP384,
            SignAlg::Ecdsa {
                hash: Hash::Sha384,
                der: true,
            },
            &signature::ECDSA_P384_SHA384_ASN1,
        ),
        (
            KeyType::Rsa2048,
            SignAlg::RsaPss(Hash::Sha256),
            &signature::RSA_PSS_2048_8192_SHA256,
        ),
    ];
    for (kt, alg, verifier) in cases {
        let k = key(&t, kt);
        for i in 0..5u8 {
            let msg = [i; 40];
            let sig = sign_primed(&t, &k, alg, &msg);
            UnparsedPublicKey::new(verifier, &k.info().public_bits)
                .verify(&msg, &sig)
                .unwrap_or_else(|_| panic!("{kt} signature {i} does not verify"));
        }
    }
}

fn no_session_primed_before_a_destroy_signs_after_it(kind: TokenKind) {
    let t = TestToken::new_on(kind);
    let k = key(&t, KeyType::EcP256);
    let other = key(&t, KeyType::EcP256);
    sign_primed(&t, &k, ES256, b"one");
    sign_primed(&t, &other, ES256, b"one");
    // A prime made before the destroy and run after it primes nothing.
    let (_, late) = k.sign_and_prime(ES256, b"two", false).unwrap();
    assert_eq!(t.token.primed_sessions(), 1, "the other key's one is left");

    t.token.destroy(&k.info().id).unwrap();
    assert_eq!(
        t.token.primed_sessions(),
        0,
        "a destroy closes every primed session"
    );
    late.unwrap().run();
    assert_eq!(
        t.token.primed_sessions(),
        0,
        "a prime from before the destroy keeps none"
    );
    let err = k.sign_and_prime(ES256, b"after", false).unwrap_err();
    assert!(
        matches!(err, hsm_shim::Error::KeyNotFound(_)),
        "a destroyed key does not sign: {err}"
    );
    // The other key signs on (through the ordinary path first, then primed again).
    sign_primed(&t, &other, ES256, b"two");
    sign_primed(&t, &other, ES256, b"three");
}

fn a_primed_session_serves_only_its_own_key_and_kind(kind: TokenKind) {
    let t = TestToken::new_on(kind);
    let k = key(&t, KeyType::EcP256);
    sign_primed(&t, &k, ES256, b"one");
    // Another alg (raw r||s) of the same key: not the primed one, which stays.
    let raw = SignAlg::Ecdsa {
        hash: Hash::Sha256,
        der: false,
    };
    let (sig, _) = k.sign_and_prime(raw, b"two", false).unwrap();
    assert_eq!(sig.len(), 64);
    assert_eq!(t.token.primed_sessions(), 1);
    // A caller's digest takes the same mechanism as a message hashed here.
    let digest = <sha2::Sha256 as sha2::Digest>::digest(b"three");
    let (sig, _) = k.sign_and_prime(ES256, &digest, true).unwrap();
    assert_eq!(t.token.primed_sessions(), 0, "taken");
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &k.info().public_bits)
        .verify(b"three", &sig)
        .expect("verifies");
    // A prime dropped unrun keeps nothing.
    drop(k.sign_and_prime(ES256, b"four", false).unwrap().1);
    assert_eq!(t.token.primed_sessions(), 0);
}

fn primed_jws_signatures_verify(kind: TokenKind) {
    use base64::Engine;
    use hsm_shim::jws::{sign_compact_and_prime, JwsAlg};
    let t = TestToken::new_on(kind);
    let k = key(&t, KeyType::EcP256);
    for i in 0..3 {
        let payload = format!(r#"{{"n":{i}}}"#);
        let (jws, prime) =
            sign_compact_and_prime(&k, JwsAlg::Es256, "kid", payload.as_bytes()).unwrap();
        prime.expect("a prime").run();
        let (input, sig) = jws.rsplit_once('.').unwrap();
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .unwrap();
        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &k.info().public_bits)
            .verify(input.as_bytes(), &sig)
            .unwrap_or_else(|_| panic!("JWS {i} does not verify"));
    }
    assert_eq!(t.token.primed_sessions(), 1);
}

hsm_shim::token_tests!(
    primed_jws_signatures_verify,
    primed_signatures_verify_for_each_key_type_and_alg,
    no_session_primed_before_a_destroy_signs_after_it,
    a_primed_session_serves_only_its_own_key_and_kind,
);
