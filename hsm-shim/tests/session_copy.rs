//! On SoftHSM a key signs through a session copy of its private key (`signing_object`):
//! the copy is as protected as the key, invisible to listings, destroyed with the key, with
//! the last signer and when it goes stale, and stops signing once the key is deleted behind
//! the process's back.

use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use hsm_shim::signing_object::RECHECK;
use hsm_shim::testing::*;
use hsm_shim::{Hash, KeyRef, KeyType, SignAlg, TokenKey};

const ES256: SignAlg = SignAlg::Ecdsa {
    hash: Hash::Sha256,
    der: true,
};

/// The session objects (copies) with `id` that this process holds.
fn copies(t: &TestToken, id: &[u8]) -> Vec<ObjectHandle> {
    t.token
        .with_session(|s| {
            Ok(s.find_objects(&[Attribute::Id(id.to_vec()), Attribute::Token(false)])?)
        })
        .unwrap()
}

/// A token with one P-256 key that has signed once (so its copy exists).
fn key_that_signed() -> (TestToken, Vec<u8>, TokenKey) {
    let t = TestToken::new();
    let info = t.token.generate_key(KeyType::EcP256, "gw").unwrap();
    let key = TokenKey::open(t.token.clone(), &KeyRef::Id(info.id.clone())).unwrap();
    assert!(
        copies(&t, &info.id).is_empty(),
        "no copy before a signature"
    );
    key.sign(ES256, b"one").unwrap();
    (t, info.id, key)
}

/// `key` is refused as a key the token no longer has.
fn assert_gone(key: &TokenKey, why: &str) {
    let err = key.sign(ES256, b"after").unwrap_err();
    assert!(
        matches!(err, hsm_shim::Error::KeyNotFound(_)),
        "{why}: {err}"
    );
}

#[test]
fn signatures_use_a_protected_copy_that_listings_skip_and_destroy_removes() {
    let (t, id, key) = key_that_signed();
    assert!(t.token.copies_keys(), "SoftHSM gets session copies");
    key.clone().sign(ES256, b"two").unwrap();
    let made = copies(&t, &id);
    assert_eq!(made.len(), 1, "one copy, shared by the key's clones");

    let protection = t
        .token
        .with_session(|s| {
            Ok(s.get_attributes(
                made[0],
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Private,
                ],
            )?)
        })
        .unwrap();
    for a in &protection {
        match a {
            Attribute::Sensitive(v) => assert!(*v, "copy is sensitive"),
            Attribute::Extractable(v) => assert!(!*v, "copy is not extractable"),
            Attribute::Private(v) => assert!(*v, "copy is private"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(protection.len(), 3);

    assert_eq!(
        t.token.list_keys().unwrap().len(),
        1,
        "the copy is not listed"
    );
    assert_eq!(t.token.list_key_labels().unwrap().len(), 1);
    assert_eq!(
        t.token.destroy(&id).unwrap(),
        2,
        "token objects counted: private and public"
    );
    assert!(copies(&t, &id).is_empty(), "the copy went with the key");
    assert_gone(&key, "a destroyed key does not sign");
}

#[test]
fn a_copy_gone_under_the_signer_is_made_again_and_the_last_clone_destroys_it() {
    let (t, id, key) = key_that_signed();
    let first = copies(&t, &id);
    t.token
        .with_session(|s| Ok(s.destroy_object(first[0])?))
        .unwrap();
    key.sign(ES256, b"two").unwrap();
    let second = copies(&t, &id);
    assert_eq!(second.len(), 1);
    assert_ne!(second, first);

    let clone = key.clone();
    drop(key);
    assert_eq!(copies(&t, &id).len(), 1, "a clone still signs with it");
    drop(clone);
    assert!(copies(&t, &id).is_empty(), "the last clone destroyed it");
    assert_eq!(
        t.token.list_keys().unwrap().len(),
        1,
        "the key itself stays"
    );
}

#[test]
fn a_key_deleted_by_another_program_stops_signing_within_the_recheck() {
    let (t, id, key) = key_that_signed();
    let hex_id = hsm_shim::keys::hex(&id);
    let out = std::process::Command::new("pkcs11-tool")
        .arg("--module")
        .arg(&t.module)
        .args(["--token-label", "test", "--login", "--pin", USER_PIN])
        .args(["--delete-object", "--type", "privkey", "--id", &hex_id])
        .output()
        .expect("pkcs11-tool (opensc) is installed by scripts/setup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Until the recheck, the copy signs on: that window is the price of not asking the
    // token object at every signature.
    key.sign(ES256, b"inside the window").unwrap();
    std::thread::sleep(RECHECK + std::time::Duration::from_millis(100));
    assert_gone(&key, "a key deleted by another program does not sign");
    assert!(copies(&t, &id).is_empty(), "and its copy is gone");
}
