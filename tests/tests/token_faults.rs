//! Token faults under a running daemon: sessions that die, a token that disappears for a
//! moment. Signing recovers without a restart; a failed listing destroys nothing.

use edge_signer_tests::*;

fn daemon(env: &Env) -> Guard {
    Guard(
        env.faulty_cmd()
            .arg("run")
            .stderr(std::fs::File::create(env.path("daemon.log")).unwrap())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn signing_recovers_from_lost_sessions_and_a_removed_token_without_a_restart() {
    let env = Env::new();
    env.make_ca("ca");
    env.lifecycle_config("");
    let _ca = env.portal_ca(CaMode::Good);
    // The CSR's signature meets a token that was pulled and plugged back.
    env.set_faults("C_SignInit DEVICE_REMOVED 1\n");
    let mut d = daemon(&env);
    env.wait_current("gw", 1);
    assert!(
        env.faults_fired().contains("C_SignInit DEVICE_REMOVED"),
        "{}",
        env.faults_fired()
    );
    // Then a session that lost its login, on the next rotation.
    env.set_faults("C_Sign USER_NOT_LOGGED_IN 1\n");
    let out = env.ok(&["rotate", "gw", "--now", "--timeout", "20"]);
    assert!(out.contains("rotated by the daemon"), "{out}");
    let fired = env.faults_fired();
    assert!(fired.contains("C_Sign USER_NOT_LOGGED_IN"), "{fired}");
    assert!(
        d.0.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );
    let csrs = std::fs::read_dir(env.path("outbox")).unwrap().count();
    assert!(csrs >= 1);
    let rec = env.record("gw");
    assert_eq!(rec.current, Some(2), "{rec:?}");
}

#[test]
fn a_listing_that_fails_destroys_nothing_and_the_daemon_goes_on() {
    let env = Env::new();
    env.make_ca("ca");
    env.lifecycle_config("");
    let _ca = env.portal_ca(CaMode::Good);
    env.ok(&["enroll", "gw", "--timeout", "20"]);
    env.ok(&["rotate", "gw", "--now", "--timeout", "20"]);
    let before = env.pkcs11_objects();
    let rec = env.record("gw");
    let keys: Vec<String> = rec
        .generations
        .iter()
        .map(|g| g.key_id_hex().unwrap())
        .collect();
    assert_eq!(keys.len(), 2, "{rec:?}");

    // The token stops answering searches: every listing fails, the start-up reconcile too.
    env.set_faults("C_FindObjectsInit TOKEN_NOT_PRESENT *\n");
    let mut d = daemon(&env);
    env.wait_log("nothing destroyed");
    // A reload meets the same token: still nothing destroyed, still running.
    let pid = d.0.id().to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    env.wait_log("configuration reloaded");
    assert!(
        d.0.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );
    assert!(env
        .faults_fired()
        .contains("C_FindObjectsInit TOKEN_NOT_PRESENT"));
    let objects = env.pkcs11_objects();
    for k in &keys {
        assert!(objects.contains(k.as_str()), "key {k} survives: {objects}");
    }
    // The token comes back: the daemon carries on with it, no restart.
    env.set_faults("");
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    env.wait_log("reconciled with the token");
    assert!(d.0.try_wait().unwrap().is_none());
    assert_eq!(env.pkcs11_objects().lines().count(), before.lines().count());
}

#[test]
fn a_session_lost_after_key_generation_does_not_make_a_second_key() {
    let env = Env::new();
    // In process, through the wrapper: the token forgets the session while the new key is
    // read back. The read is retried; the generation is not.
    let token = fault_token(&env);
    env.set_faults("C_GetAttributeValue SESSION_HANDLE_INVALID 1\n");
    let key = token
        .generate_key(hsm_shim::KeyType::EcP256, "edge-signer:gw:g1")
        .unwrap();
    assert!(env
        .faults_fired()
        .contains("C_GetAttributeValue SESSION_HANDLE_INVALID"));
    let objects = env.pkcs11_objects();
    assert_eq!(
        objects.matches("Private Key Object").count(),
        1,
        "one key pair, not two: {objects}"
    );
    assert!(objects.contains(&hsm_shim::keys::hex(&key.id)), "{objects}");
}

/// A token at its session limit: the call that needs one more session fails with the
/// token's own error, and signatures go on with the sessions the pool has.
#[test]
fn at_the_session_limit_the_call_says_so_and_signatures_go_on() {
    let env = Env::new();
    let token = fault_token(&env);
    let info = token
        .generate_key(hsm_shim::KeyType::EcP256, "edge-signer:gw:g1")
        .unwrap();
    let key = hsm_shim::TokenKey::open(token.clone(), &hsm_shim::KeyRef::Id(info.id)).unwrap();
    let es256 = hsm_shim::SignAlg::Ecdsa {
        hash: hsm_shim::Hash::Sha256,
        der: true,
    };
    // The outer call holds the pool's only session, so the inner one must open another,
    // and the token says it has none left.
    let nested = || token.with_session(|_held| token.with_session(|_| Ok(())));
    env.set_faults("C_OpenSession SESSION_COUNT 1\n");
    let e = nested().expect_err("no room to make").to_string();
    assert!(e.contains("CKR_SESSION_COUNT"), "{e}");
    let sig = key.sign(es256, b"two").unwrap();
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        &key.info().public_bits,
    )
    .verify(b"two", &sig)
    .expect("the signature verifies");
}

/// The test token opened in this process through the fault wrapper, steered by `env`'s
/// `faults` file.
fn fault_token(env: &Env) -> std::sync::Arc<hsm_shim::Token> {
    // Safe: set before any module is loaded; one test per process (nextest).
    unsafe {
        std::env::set_var("SOFTHSM2_CONF", env.path("softhsm2.conf"));
        std::env::set_var("P11_FAULT_MODULE", module());
        std::env::set_var("P11_FAULT_FILE", env.path("faults"));
    }
    hsm_shim::Token::open(
        &fault_module(),
        &hsm_shim::TokenSelector::Label(LABEL.into()),
        Some(hsm_shim::testing::pin(USER_PIN)),
    )
    .unwrap()
}
