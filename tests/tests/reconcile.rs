//! Reconcile owns exactly its own key objects: parsed labels, foreign keys left alone.

use edge_signer::register::GenStatus;
use edge_signer_tests::*;

fn keygen(env: &Env, key_type: &str, label: &str) {
    let id = if key_type.starts_with("EC") {
        "5210"
    } else {
        "1024"
    };
    env.pkcs11_tool(&[
        "--keypairgen",
        "--key-type",
        key_type,
        "--label",
        label,
        "--id",
        id,
    ]);
}

#[test]
fn neighbouring_identities_and_foreign_keys_survive_reconcile_and_the_daemon() {
    let env = Env::new();
    env.make_ca("ca");
    env.lifecycle_config("");
    let mut cfg = std::fs::read_to_string(env.path("defaults.toml")).unwrap();
    cfg += r#"
[[identity]]
name = "gw-g1"
subject = { cn = "gw-g1" }
issuer = "portal"
overlap = "1d"
"#;
    std::fs::write(env.path("defaults.toml"), cfg).unwrap();
    // Another program's keys in the shared token: types the shim does not use.
    keygen(&env, "EC:secp521r1", "other-app");
    keygen(&env, "rsa:1024", "edge-signer:legacy:gx");
    let _ca = env.portal_ca(CaMode::Good);
    env.ok(&["enroll", "gw", "--timeout", "20"]);
    env.ok(&["enroll", "gw-g1", "--timeout", "20"]);
    let keys = env.json(&["key", "list"]);
    assert!(keys.as_array().unwrap().len() >= 2, "{keys}");

    let mut daemon = env.daemon();
    env.wait_log("reconciled with the token");
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );
    drop(daemon);

    let objects = env.pkcs11_objects();
    for ident in ["gw", "gw-g1"] {
        let id = env.generation(ident, 1).key_id_hex().unwrap();
        assert!(objects.contains(&id), "{ident}'s key survives: {objects}");
    }
    assert!(
        objects.contains("other-app") && objects.contains("edge-signer:legacy:gx"),
        "{objects}"
    );
}

#[test]
fn unsafe_identity_names_are_refused_by_validation() {
    let env = Env::new();
    env.make_ca("ca");
    for bad in ["../etc", "gw/x", "gw:g1", ".hidden"] {
        env.lifecycle_config("");
        let cfg = std::fs::read_to_string(env.path("defaults.toml")).unwrap();
        std::fs::write(
            env.path("defaults.toml"),
            cfg.replacen("name = \"gw\"", &format!("name = \"{bad}\""), 1),
        )
        .unwrap();
        let err = env.fails(&["status"]);
        assert!(err.contains("is not a safe name"), "{bad}: {err}");
    }
}

#[test]
fn a_private_key_dropped_beside_the_certificate_never_reaches_the_register_or_disk() {
    let env = Env::new();
    env.make_ca("ca");
    env.lifecycle_config("");
    let _ca = env.portal_ca(CaMode::AppendKey);
    env.ok(&["enroll", "gw", "--timeout", "20"]);
    let reg = std::fs::read_to_string(env.path("state/register.json")).unwrap();
    let exported = std::fs::read_to_string(env.path("state/identities/gw/cert.pem")).unwrap();
    for text in [&reg, &exported] {
        assert!(!text.contains("PRIVATE KEY"), "{text}");
    }
    assert!(exported.contains("BEGIN CERTIFICATE"));
}

/// A token with identity `gw` enrolled through the portal; its generation 1 key id.
fn enrolled_gw() -> (Env, PortalCa, String) {
    let env = Env::new();
    env.make_ca("ca");
    env.lifecycle_config("");
    let ca = env.portal_ca(CaMode::Good);
    env.ok(&["enroll", "gw", "--timeout", "20"]);
    let id = env.generation("gw", 1).key_id_hex().unwrap();
    (env, ca, id)
}

#[test]
fn revoking_the_current_generation_destroys_its_key_and_asks_for_a_new_one_in_one_write() {
    let (env, _ca, id) = enrolled_gw();
    env.ok(&["revoke", "gw", "--generation", "1"]);
    let rec = env.record("gw");
    assert_eq!(rec.generations[0].status, GenStatus::Revoked);
    assert!(rec.current.is_none() && rec.forced_at.is_some(), "{rec:?}");
    assert!(!env.pkcs11_objects().contains(&id));
    let st = env.json(&["status"]);
    assert_eq!(st[0]["next_action"], "enrol a first generation", "{st}");
    // The daemon (or a command) enrols the replacement.
    env.ok(&["enroll", "gw", "--timeout", "20"]);
    assert_eq!(env.record("gw").current, Some(2));
}

#[test]
fn a_lost_register_does_not_turn_live_keys_into_orphans() {
    let (env, _ca, id) = enrolled_gw();
    std::fs::rename(env.path("state/register.json"), env.path("register.lost")).unwrap();
    let err = env.fails(&["retire", "gw", "--generation", "1"]);
    assert!(err.contains("which the register does not know"), "{err}");
    assert!(
        env.pkcs11_objects().contains(&id),
        "the live key stays in the token"
    );
}
