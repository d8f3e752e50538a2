//! A destroyed or deleted key never signs again: every signature finds its key by id
//! first, so the next signature after [`Token::destroy`](hsm_shim::Token::destroy) (from any
//! clone of the signer), or after another program deleted the key (pkcs11-tool), fails with
//! an error that names the key. No window: checked at once, on both token kinds (but for
//! tpm2-pkcs11 and another process's deletion, which it does not show: see the test).

use hsm_shim::testing::*;
use hsm_shim::{Hash, KeyRef, KeyType, SignAlg, TokenKey};

const ES256: SignAlg = SignAlg::Ecdsa {
    hash: Hash::Sha256,
    der: true,
};

/// A token with one P-256 key (labelled `gw`) that has signed once.
fn key_that_signed(kind: TokenKind) -> (TestToken, TokenKey) {
    let t = TestToken::new_on(kind);
    let info = t.token.generate_key(KeyType::EcP256, "gw").unwrap();
    let key = TokenKey::open(t.token.clone(), &KeyRef::Id(info.id)).unwrap();
    key.sign(ES256, b"one").unwrap();
    (t, key)
}

/// `key` is refused as a key the token no longer has, and the error names it.
fn assert_gone(key: &TokenKey, why: &str) {
    let err = key.sign(ES256, b"after").unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, hsm_shim::Error::KeyNotFound(_))
            && text.contains("'gw'")
            && text.contains(&hsm_shim::keys::hex(&key.info().id)),
        "{why}: {text}"
    );
}

fn a_destroyed_key_does_not_sign_through_any_clone(kind: TokenKind) {
    let (t, key) = key_that_signed(kind);
    let clone = key.clone();
    let reopened = TokenKey::open(t.token.clone(), &KeyRef::Id(key.info().id.clone())).unwrap();
    reopened.sign(ES256, b"two").unwrap();
    assert_eq!(
        t.token.destroy(&key.info().id).unwrap(),
        2,
        "private and public"
    );
    assert_gone(&key, "the signer that made the destroy");
    assert_gone(&clone, "a clone of it");
    assert_gone(&reopened, "another signer of the same key");
}

fn a_key_deleted_by_another_program_does_not_sign_the_next_time(kind: TokenKind) {
    let (t, key) = key_that_signed(kind);
    let mut cmd = std::process::Command::new("pkcs11-tool");
    if let Some(tpm) = &t.tpm {
        cmd.envs(tpm.envs());
    }
    let out = cmd
        .arg("--module")
        .arg(&t.module)
        .args(["--token-label", "test", "--login", "--pin", USER_PIN])
        .args(["--delete-object", "--type", "privkey", "--id"])
        .arg(hsm_shim::keys::hex(&key.info().id))
        .output()
        .expect("pkcs11-tool (opensc) is installed by scripts/setup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    match kind {
        TokenKind::SoftHsm => assert_gone(
            &key,
            "the first signature after another program deleted the key",
        ),
        // tpm2-pkcs11 reads its store once per process (C_Initialize): a deletion by another
        // process shows only to processes that load the module after it. The agent's own
        // tools go through the daemon instead (`key destroy` refuses a served key), and
        // docs/security.md says so. Should this start failing, tpm2-pkcs11 learnt to see
        // other processes' deletions: make it `assert_gone` and update the docs.
        TokenKind::Tpm => {
            key.sign(ES256, b"after").unwrap();
        }
    }
}

hsm_shim::token_tests!(
    a_destroyed_key_does_not_sign_through_any_clone,
    a_key_deleted_by_another_program_does_not_sign_the_next_time,
);
