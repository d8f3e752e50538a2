//! Registers written by an earlier release load unchanged, continue and rotate.
//!
//! `tests/fixtures/registers/<flow>/` holds what the release of 2026-12-07 left on a device
//! after each flow: its `register.json` (`schema_version` 1), the SoftHSM token files its
//! keys live in, the portal's outbox (for the rotation caught half-way, the CSR waiting
//! there) and, for JWK, the public key the API was given at onboarding.
//! `make_fixtures` wrote them (ignored: run it by hand only to record a new format, with the
//! release that writes it). Each test copies a fixture into a fresh directory, points the
//! configuration at test servers started now, and drives the real binary.

use edge_signer::register::{Material, RegisterFile};
use edge_signer_tests::est::{est_config_with, EstMode, EstServer};
use edge_signer_tests::jwk::{jwk_config_at, JwkApi};
use edge_signer_tests::*;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/registers")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else if !e.file_name().to_string_lossy().ends_with(".lock") {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Keep what `env` left after a flow as fixture `name`.
fn capture(env: &Env, name: &str) {
    let dir = fixtures().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(env.path("state/register.json"), dir.join("register.json")).unwrap();
    copy_dir(&env.path("tokens"), &dir.join("tokens"));
    if env.path("outbox").exists() {
        copy_dir(&env.path("outbox"), &dir.join("outbox"));
    }
}

/// A fresh directory holding fixture `name`: its token in place of a new one, its register
/// in the state directory, its outbox.
fn restore(name: &str) -> Env {
    let env = Env::new();
    let dir = fixtures().join(name);
    std::fs::remove_dir_all(env.path("tokens")).unwrap();
    copy_dir(&dir.join("tokens"), &env.path("tokens"));
    std::fs::create_dir_all(env.path("state")).unwrap();
    std::fs::copy(dir.join("register.json"), env.path("state/register.json")).unwrap();
    if dir.join("outbox").exists() {
        copy_dir(&dir.join("outbox"), &env.path("outbox"));
    }
    env
}

#[test]
#[ignore = "writes tests/fixtures/registers: run by hand to record a register format"]
fn make_fixtures() {
    let env = Env::new();
    env.make_ca("ca");
    env.lifecycle_config("");
    let ca = env.portal_ca(CaMode::Good);
    env.ok(&["enroll", "gw", "--timeout", "20"]);
    capture(&env, "portal");
    ca.set_mode(CaMode::Away);
    let out = env.run(&["rotate", "gw", "--now", "--timeout", "3"]);
    assert!(!out.status.success(), "the person is away: no certificate");
    capture(&env, "portal-rotating");

    let env = Env::new();
    let est = EstServer::start(env.dir.path(), "gw-7", "s3cret-bootstrap", EstMode::Issue);
    est_config(&env, &est);
    env.ok(&["enroll", "dev", "--timeout", "20"]);
    capture(&env, "est");

    let env = Env::new();
    let api = JwkApi::start(env.dir.path());
    jwk_config(&env, &api);
    let jwk = onboard(&env, &api);
    capture(&env, "jwk");
    std::fs::write(fixtures().join("jwk/onboarded.jwk.json"), jwk.to_string()).unwrap();
}

/// One EST identity `dev` enrolled with a bootstrap password.
fn est_config(env: &Env, est: &EstServer) {
    let password = env.path_str("est-password");
    let bootstrap =
        format!("bootstrap = {{ username = \"gw-7\", password_file = \"{password}\" }}");
    est_config_with(env, est, &bootstrap, "");
}

/// One JWK-rotation identity `api` against `api` (no verification endpoint).
fn jwk_config(env: &Env, api: &JwkApi) {
    jwk_config_at(env, api.port, &api.ca_file, "1d", false);
}

/// Register the current key with the API (as the operator did at onboarding) and activate
/// it; returns the public JWK the API was given.
fn onboard(env: &Env, api: &JwkApi) -> serde_json::Value {
    let jwk: serde_json::Value = serde_json::from_str(&env.ok(&["jwk", "export", "api"])).unwrap();
    api.state.lock().unwrap().register(&jwk);
    env.ok(&["jwk", "activate", "api", "--expires", "2099-01-01"]);
    jwk
}

#[test]
fn every_fixture_loads_as_a_register_of_format_1_with_each_step_typed() {
    for (name, want) in [
        ("portal", vec!["certified"]),
        ("portal-rotating", vec!["certified", "requested"]),
        ("est", vec!["certified"]),
        ("jwk", vec!["credential"]),
    ] {
        let path = fixtures().join(name).join("register.json");
        let bytes = std::fs::read(&path).unwrap();
        let reg = RegisterFile::parse(&path, &bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(reg.schema_version, 1, "{name}");
        let rec = reg.identities.values().next().expect("one identity");
        let got: Vec<&str> = rec
            .generations
            .iter()
            .map(|g| match &g.material {
                Material::Planned => "planned",
                Material::Requested { .. } => "requested",
                Material::Issued { .. } => "issued",
                Material::Certified { .. } => "certified",
                Material::Credential { .. } => "credential",
            })
            .collect();
        assert_eq!(got, want, "{name}");
        // Written back, it is the file the last release wrote (so that release reads it too).
        let again: serde_json::Value = serde_json::to_value(&reg).unwrap();
        let before: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(again, before, "{name}");
    }
}

/// A register whose generation has only part of what a step makes is refused with a reason
/// (it is never filled in with empty values).
#[test]
fn a_generation_with_half_a_step_is_refused_by_name() {
    let path = fixtures().join("portal").join("register.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let g = &mut v["identities"]["gw"]["generations"][0];
    g["fingerprint"] = serde_json::Value::Null;
    let err = RegisterFile::parse(&path, v.to_string().as_bytes()).unwrap_err();
    assert!(
        err.to_string()
            .contains("generation 1: a certificate with only part of"),
        "{err}"
    );
    let g = &mut v["identities"]["gw"]["generations"][0];
    g["key_uri"] = serde_json::Value::Null;
    let err = RegisterFile::parse(&path, v.to_string().as_bytes()).unwrap_err();
    assert!(
        err.to_string().contains("a key id without a key URI"),
        "{err}"
    );
}

#[test]
fn a_portal_register_from_the_last_release_rotates() {
    let env = restore("portal");
    env.make_ca("ca");
    env.lifecycle_config("");
    let _ca = env.portal_ca(CaMode::Good);
    let status = env.json(&["status"]);
    assert!(status.to_string().contains("gw"), "{status}");
    assert_eq!(env.record("gw").current, Some(1));
    env.ok(&["rotate", "gw", "--now", "--timeout", "20"]);
    let rec = env.record("gw");
    assert_eq!(rec.current, Some(2), "{rec:?}");
    let old = rec.gen(1).unwrap();
    assert!(old.status.is_live(), "generation 1 overlaps: {old:?}");
}

#[test]
fn a_rotation_caught_half_way_by_the_last_release_is_finished_not_restarted() {
    let env = restore("portal-rotating");
    env.make_ca("ca");
    env.lifecycle_config("");
    let before = env.record("gw");
    assert_eq!((before.current, before.pending), (Some(1), Some(2)));
    let csr = before
        .gen(2)
        .unwrap()
        .csr_pem()
        .expect("the CSR was sent")
        .to_owned();
    let _ca = env.portal_ca(CaMode::Good);
    env.ok(&["rotate", "gw", "--timeout", "20"]);
    let rec = env.record("gw");
    assert_eq!(rec.current, Some(2), "{rec:?}");
    assert_eq!(
        rec.gen(2).unwrap().csr_pem(),
        Some(csr.as_str()),
        "the same request finished, no new one"
    );
    assert!(rec.gen(3).is_none(), "no third generation: {rec:?}");
}

#[test]
fn a_jwk_register_from_the_last_release_rotates_with_its_key() {
    let env = restore("jwk");
    let api = JwkApi::start(env.dir.path());
    jwk_config(&env, &api);
    // The API knows the device's key from its onboarding (kept beside the fixture).
    let onboarded = std::fs::read(fixtures().join("jwk/onboarded.jwk.json")).unwrap();
    let jwk: serde_json::Value = serde_json::from_slice(&onboarded).unwrap();
    api.state.lock().unwrap().register(&jwk);
    let kid1 = env
        .record("api")
        .current_gen()
        .and_then(|g| g.kid().map(str::to_owned))
        .expect("a kid");
    env.ok(&["rotate", "api", "--now", "--timeout", "20"]);
    let rec = env.record("api");
    let current = rec.current_gen().expect("current");
    assert_eq!(rec.current, Some(2), "{rec:?}");
    assert_ne!(current.kid(), Some(kid1.as_str()));
}

/// An EST identity from the last release is read as it was: served, not due for renewal. (Its
/// re-enrolment authenticates with its certificate, which only the EST CA of the run that
/// issued it would accept: the rotation itself is tested against the portal and JWK fixtures.)
#[test]
fn an_est_register_from_the_last_release_is_read_as_it_was() {
    let env = restore("est");
    let est = EstServer::start(env.dir.path(), "gw-7", "s3cret-bootstrap", EstMode::Issue);
    est_config(&env, &est);
    let rec = env.record("dev");
    assert_eq!(rec.current, Some(1), "{rec:?}");
    let out = env.run(&["needs-renewal", "dev"]);
    assert_eq!(out.status.code(), Some(1), "still valid: {out:?}");
    let status = env.json(&["status"]);
    assert!(status.to_string().contains("\"dev\""), "{status}");
}
