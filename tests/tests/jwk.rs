//! JWK credential rotation through the real binary against the test API.

use edge_signer::register::{GenStatus, Generation, IdentityRecord};
use edge_signer_tests::jwk::{jwk_config_at, JwkApi};
use edge_signer_tests::*;

fn jwk_config(env: &Env, api: &JwkApi, old_key_overlap: &str) {
    jwk_config_at(env, api.port, &api.ca_file, old_key_overlap, true);
}

fn rec(env: &Env) -> IdentityRecord {
    env.record("api")
}

fn onboard(env: &Env, api: &JwkApi) -> String {
    let jwk: serde_json::Value = serde_json::from_str(&env.ok(&["jwk", "export", "api"])).unwrap();
    assert_eq!(
        (
            jwk["Kty"].as_str(),
            jwk["Crv"].as_str(),
            jwk["Use"].as_str()
        ),
        (Some("EC"), Some("P-256"), Some("sig"))
    );
    api.state.lock().unwrap().register(&jwk);
    env.ok(&["jwk", "activate", "api", "--expires", "2099-01-01"]);
    jwk["Kid"].as_str().unwrap().to_owned()
}

/// `rotate --now`, with the API's kid candidates offered in this order.
fn rotate_offering(env: &Env, candidates: &str) {
    let out = env.rotate_now_with("api", 20, ("EDGE_SIGNER_TEST_KID_CANDIDATES", candidates));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn onboard_sign_rotate_never_reuse_a_kid_and_destroy_the_old_key_after_its_expiry() {
    let env = Env::new();
    let api = JwkApi::start(env.dir.path());
    jwk_config(&env, &api, "3s");
    let kid1 = onboard(&env, &api);

    // A JWS from the current key verifies with an independent implementation (ring).
    std::fs::write(env.path("payload.json"), br#"{"amount":1200}"#).unwrap();
    let jws = env.ok(&["jws", "sign", "api", "--payload", "payload.json"]);
    let (kid, payload) = api
        .state
        .lock()
        .unwrap()
        .verify(jws.trim())
        .expect("JWS verifies");
    assert_eq!(
        (kid.as_str(), payload.as_slice()),
        (kid1.as_str(), &br#"{"amount":1200}"#[..])
    );

    // Rotation: offered the current kid first, the engine must pick a never-used one.
    rotate_offering(&env, &format!("{kid1},kid-two"));
    // During the overlap a new rotation is queued, and the answer says how to go sooner.
    let queued = env.ok(&["rotate", "api", "--now", "--timeout", "20"]);
    assert!(
        queued.contains("the rotation is queued") && queued.contains("retire api --generation 1"),
        "{queued}"
    );
    env.ok(&["retire", "api", "--generation", "1"]);
    // Then an earlier (not current) kid is offered first: still skipped.
    rotate_offering(&env, &format!("{kid1},kid-two,kid-three"));
    let r = rec(&env);
    assert_eq!(r.kids, vec![kid1.as_str(), "kid-two", "kid-three"]);
    assert!(
        api.state.lock().unwrap().refusals.is_empty(),
        "{:?}",
        api.state.lock().unwrap().refusals
    );
    assert_eq!(api.state.lock().unwrap().rotations, 2);
    // The new key signs now; the old one only until its CurrentKeyExpiry.
    let jws = env.ok(&["jws", "sign", "api"]);
    assert_eq!(
        api.state.lock().unwrap().verify(jws.trim()).unwrap().0,
        "kid-three"
    );

    // After CurrentKeyExpiry the old keys are destroyed, only the current one is left.
    std::thread::sleep(std::time::Duration::from_secs(4));
    env.ok(&["rotate", "api", "--timeout", "20"]);
    let r = rec(&env);
    let statuses: Vec<GenStatus> = r.generations.iter().map(|g| g.status).collect();
    assert_eq!(
        statuses,
        vec![GenStatus::Retired, GenStatus::Retired, GenStatus::Current]
    );
    let objects = env.pkcs11_objects();
    for g in &r.generations {
        let id = g.key_id_hex().unwrap();
        assert_eq!(
            objects.contains(&id),
            g.status == GenStatus::Current,
            "{id}: {objects}"
        );
    }
}

fn pending_gen(env: &Env) -> Generation {
    let r = rec(env);
    r.pending
        .and_then(|n| r.gen(n))
        .cloned()
        .expect("a pending generation")
}

fn jws_signer(env: &Env, api: &JwkApi) -> String {
    let jws = env.ok(&["jws", "sign", "api"]);
    api.state
        .lock()
        .unwrap()
        .verify(jws.trim())
        .expect("the API accepts it")
        .0
}

#[test]
fn a_lost_201_is_found_out_with_the_new_key_and_never_resent() {
    let env = Env::new();
    let api = JwkApi::start(env.dir.path());
    jwk_config(&env, &api, "3s");
    let kid1 = onboard(&env, &api);
    api.state.lock().unwrap().drop_next_answer = true;
    let out = env.run(&["rotate", "api", "--now", "--timeout", "20"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = rec(&env);
    let kid2 = api.state.lock().unwrap().keys.last().unwrap().kid.clone();
    assert_eq!(r.kids, vec![kid1, kid2.clone()], "no second new kid");
    assert_eq!(r.current, Some(2), "{r:?}");
    let st = api.state.lock().unwrap();
    assert_eq!(st.rotations, 1);
    assert!(
        st.refusals.is_empty(),
        "the PUT was never re-sent: {:?}",
        st.refusals
    );
    assert!(
        st.whoami_calls >= 1,
        "the outcome was verified with a signed call"
    );
    drop(st);
    // The agent signs with the key the API holds as current, before and after the old
    // key's CurrentKeyExpiry; the old key is destroyed only after it.
    assert_eq!(jws_signer(&env, &api), kid2);
    let gens = r.generations.clone();
    let objects = env.pkcs11_objects();
    assert!(objects.contains(&gens[0].key_id_hex().unwrap()));
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(jws_signer(&env, &api), kid2);
    env.ok(&["rotate", "api", "--timeout", "20"]);
    let objects = env.pkcs11_objects();
    assert!(
        !objects.contains(&gens[0].key_id_hex().unwrap()),
        "{objects}"
    );
    assert!(
        objects.contains(&gens[1].key_id_hex().unwrap()),
        "{objects}"
    );
}

#[test]
fn a_rotation_the_api_never_applied_is_abandoned_and_redone_with_a_new_kid() {
    let env = Env::new();
    let api = JwkApi::start(env.dir.path());
    jwk_config(&env, &api, "48h");
    let kid1 = onboard(&env, &api);
    api.state.lock().unwrap().drop_next_request = true;
    let err = env.fails(&["rotate", "api", "--now", "--timeout", "20"]);
    assert!(err.contains("never applied the rotation"), "{err}");
    let r = rec(&env);
    assert_eq!(r.current, Some(1));
    let g2 = r.generations[1].clone();
    assert_eq!(g2.status, GenStatus::Failed);
    assert!(!env.pkcs11_objects().contains(&g2.key_id_hex().unwrap()));
    // The next attempt uses a new kid; the API sees one rotation in all.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.ok(&["rotate", "api", "--now", "--timeout", "20"]);
    let r = rec(&env);
    let kids = &r.kids;
    assert_eq!(kids.len(), 3, "{r:?}");
    assert_eq!(kids[0], kid1);
    assert_eq!(api.state.lock().unwrap().rotations, 1);
    assert_eq!(jws_signer(&env, &api), kids[2]);
}

#[test]
fn a_put_that_never_reached_the_server_leaves_the_old_key_current_and_drops_the_new_one() {
    let env = Env::new();
    let api = JwkApi::start(env.dir.path());
    jwk_config(&env, &api, "48h");
    onboard(&env, &api);
    // The API is down: nothing listens on its port any more.
    let (port, ca) = (api.port, api.ca_file.clone());
    drop(api);
    jwk_config_at(&env, port, &ca, "48h", true);
    let err = env.fails(&["rotate", "api", "--now", "--timeout", "5"]);
    assert!(err.contains("could not be reached"), "{err}");
    let r = rec(&env);
    assert_eq!(r.current, Some(1));
    let g2 = r.generations[1].clone();
    assert_eq!(g2.status, GenStatus::Failed);
    let objects = env.pkcs11_objects();
    assert!(objects.contains(&r.generations[0].key_id_hex().unwrap()));
    assert!(!objects.contains(&g2.key_id_hex().unwrap()), "{objects}");
}

#[test]
fn an_unknown_outcome_without_a_verification_endpoint_keeps_both_keys_and_says_why() {
    let env = Env::new();
    let api = JwkApi::start(env.dir.path());
    jwk_config_at(&env, api.port, &api.ca_file, "48h", false);
    onboard(&env, &api);
    api.state.lock().unwrap().drop_next_answer = true;
    let out = env.rotate_now_with("api", 3, ("EDGE_SIGNER_LOG", "warn"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no probe_url is configured"), "{err}");
    let g2 = pending_gen(&env);
    let objects = env.pkcs11_objects();
    assert!(
        objects.contains(&g2.key_id_hex().unwrap()),
        "the new key is kept"
    );
    assert!(objects.contains(&rec(&env).generations[0].key_id_hex().unwrap()));
    // Once a verification endpoint is configured, the agent finds out and promotes.
    jwk_config(&env, &api, "48h");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    env.ok(&["rotate", "api", "--timeout", "20"]);
    assert_eq!(rec(&env).current, Some(g2.number));
    assert_eq!(jws_signer(&env, &api), g2.kid().unwrap());
}

#[test]
fn out_of_bound_lifetimes_are_refused_locally() {
    let env = Env::new();
    let api = JwkApi::start(env.dir.path());
    jwk_config(&env, &api, "15d");
    let err = env.fails(&["status"]);
    assert!(
        err.contains("old_key_overlap: 15d is more than the API allows"),
        "{err}"
    );
}

/// An attacker holding a `jws` + `sign` grant on the credential identity tries to sign a
/// rotate-to request carrying its own key, as JSON, as base64 bytes and as a raw signature
/// over a JWS signing input: all refused with 403, and the upstream API's current key stays.
#[test]
fn a_caller_granted_jws_and_sign_cannot_rotate_the_credential_to_its_own_key() {
    let env = Env::new();
    let api = JwkApi::start(env.dir.path());
    jwk_config(&env, &api, "3s");
    let mut cfg = std::fs::read_to_string(env.path("defaults.toml")).unwrap();
    cfg += &format!(
        r#"
[api]
enabled = true
socket = "{p}/api.sock"

[[api.allow]]
uids = [65534]
identities = ["api"]
operations = ["jws", "sign", "chain"]
"#,
        p = env.dir.path().display()
    );
    std::fs::write(env.path("defaults.toml"), cfg).unwrap();
    let kid1 = onboard(&env, &api);
    let _daemon = env.daemon();
    env.wait_log("signing API listening");

    let attacker = serde_json::json!({
        "PublicKey": {"Kty": "EC", "Crv": "P-256", "Use": "sig", "Kid": "evil",
                      "X": "AAAA", "Y": "AAAA"},
        "Expiration": "2027-06-01T00:00:00Z",
        "CurrentKeyExpiry": "2026-12-10T00:00:00Z",
    });
    let lower = serde_json::json!({ "publickey": attacker["PublicKey"] });
    let b64 = |v: &serde_json::Value| {
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            v.to_string().as_bytes(),
        )
    };
    let attempts = [
        ("jws", serde_json::json!({ "payload": attacker })),
        ("jws", serde_json::json!({ "payload": lower })),
        ("jws", serde_json::json!({ "payload_b64": b64(&attacker) })),
        (
            "sign",
            serde_json::json!({ "alg": "ES256", "data": b64(&attacker) }),
        ),
    ];
    let post = |op: &str, body: &serde_json::Value| {
        let out = env.curl_as_nobody(
            "api.sock",
            &format!("/v1/identities/api/{op}"),
            &[
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "-d",
                &body.to_string(),
                "-w",
                "\n%{http_code}",
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (op, body) in &attempts {
        let text = post(op, body);
        assert!(text.ends_with("403"), "{op} {body}: {text}");
        assert!(text.contains("JWK rotation API credential"), "{text}");
    }
    // A credential has no certificate chain: a 404 that says so, not an empty chain.
    let out = env.curl_as_nobody(
        "api.sock",
        "/v1/identities/api/chain",
        &["-w", "\n%{http_code}"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("404") && text.contains("has no certificate chain"),
        "{text}"
    );
    // An ordinary payload still signs for the granted caller.
    let ok = post("jws", &serde_json::json!({ "payload": {"amount": 5} }));
    assert!(ok.ends_with("200"), "{ok}");
    let s = api.state.lock().unwrap();
    assert_eq!(s.rotations, 0);
    assert_eq!(s.keys.last().map(|k| k.kid.clone()), Some(kid1));
}
