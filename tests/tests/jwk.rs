//! JWK credential rotation through the real binary against the test API.

use edge_signer_tests::jwk::JwkApi;
use edge_signer_tests::*;

fn jwk_config(env: &Env, api: &JwkApi, old_key_overlap: &str) {
    let p = env.dir.path().display();
    let cfg = format!(
        r#"
{token}
[[identity]]
name = "api"
subject = {{ cn = "gw-7-api" }}
issuer = "cards"
[identity.renewal]
retry_min = "1s"
retry_max = "2s"

[[issuer]]
name = "cards"
kind = "jwk-rotation"
url = "https://127.0.0.1:{port}"
ca_bundle = "{ca}"
new_key_lifetime = "300d"
old_key_overlap = "{old_key_overlap}"

[paths]
state_dir = "{p}/state"
"#,
        token = env.token_toml(),
        port = api.port,
        ca = api.ca_file.display(),
    );
    std::fs::write(env.path("defaults.toml"), cfg).unwrap();
}

fn rec(env: &Env) -> serde_json::Value {
    env.register()["identities"]["api"].clone()
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
    let out = env
        .cmd()
        .args(["rotate", "api", "--now", "--timeout", "20"])
        .env("EDGE_SIGNER_TEST_KID_CANDIDATES", format!("{kid1},kid-two"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Then an earlier (not current) kid is offered first: still skipped.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let out = env
        .cmd()
        .args(["rotate", "api", "--now", "--timeout", "20"])
        .env(
            "EDGE_SIGNER_TEST_KID_CANDIDATES",
            format!("{kid1},kid-two,kid-three"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = rec(&env);
    assert_eq!(r["kids"], serde_json::json!([kid1, "kid-two", "kid-three"]));
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
    let statuses: Vec<&str> = r["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, vec!["retired", "retired", "current"]);
    let objects = env.pkcs11_objects();
    for g in r["generations"].as_array().unwrap() {
        let id = g["key_id"].as_str().unwrap();
        assert_eq!(
            objects.contains(id),
            g["status"] == "current",
            "{id}: {objects}"
        );
    }
}

#[test]
fn a_lost_201_is_retried_with_the_same_kid_and_no_second_key() {
    let env = Env::new();
    let api = JwkApi::start(env.dir.path());
    jwk_config(&env, &api, "48h");
    let kid1 = onboard(&env, &api);
    api.state.lock().unwrap().drop_next_answer = true;
    let out = env.run(&["rotate", "api", "--now", "--timeout", "1"]);
    assert!(!out.status.success());
    let r = rec(&env);
    assert_eq!(r["current"], 1, "the only confirmed key stays current");
    let pending = r["pending"].as_u64().unwrap();
    let g = r["generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["number"] == pending)
        .unwrap()
        .clone();
    let kid2 = g["kid"].as_str().unwrap().to_owned();
    assert_eq!(
        api.state.lock().unwrap().keys.last().unwrap().kid,
        kid2,
        "the API applied it"
    );
    assert!(
        r["failure"]["reason"]
            .as_str()
            .unwrap()
            .contains("will be sent again"),
        "{r}"
    );

    // Resume: the same kid and body again; the API says 201; promoted.
    let out = env.run(&["rotate", "api", "--timeout", "20"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = rec(&env);
    assert_eq!(r["kids"], serde_json::json!([kid1, kid2]), "no new kid");
    assert_eq!(
        r["generations"].as_array().unwrap().len(),
        2,
        "no second key"
    );
    assert_eq!(r["current"], pending);
    let gens = r["generations"].as_array().unwrap();
    assert_eq!(
        gens[0]["status"], "overlap",
        "the old key is not destroyed before its expiry"
    );
    let objects = env.pkcs11_objects();
    assert!(
        objects.contains(gens[0]["key_id"].as_str().unwrap())
            && objects.contains(gens[1]["key_id"].as_str().unwrap())
    );
    assert_eq!(api.state.lock().unwrap().rotations, 1);
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
