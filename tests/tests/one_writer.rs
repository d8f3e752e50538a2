//! One writer per state directory: the daemon owns it; the CLI hands rotations to it.

use edge_signer::register::GenStatus;
use edge_signer_tests::*;

#[test]
fn rotate_now_while_the_daemon_runs_is_done_once_by_the_daemon() {
    let env = Env::new();
    env.make_ca("ca");
    env.lifecycle_config("");
    let _ca = env.portal_ca(CaMode::Good);
    let mut daemon = env.daemon();
    env.wait_current("gw", 1);
    // A second daemon on the same state is refused.
    let err = env.fails(&["run"]);
    assert!(err.contains("one writer per state directory"), "{err}");

    let out = env.ok(&["rotate", "gw", "--now", "--timeout", "20"]);
    assert!(out.contains("rotated by the daemon"), "{out}");
    let gens = env.record("gw").generations;
    assert_eq!(gens.len(), 2, "the rotation happened once: {gens:?}");
    assert_eq!(
        (gens[0].status, gens[1].status),
        (GenStatus::Overlap, GenStatus::Current)
    );
    let objects = env.pkcs11_objects();
    for g in &gens {
        assert!(
            objects.contains(&g.key_id_hex().unwrap()),
            "no live key destroyed"
        );
    }
    // State changes the daemon cannot take yet are refused with what to do.
    let err = env.fails(&["retire", "gw", "--generation", "1"]);
    assert!(
        err.contains("daemon (pid") && err.contains("stop it first"),
        "{err}"
    );
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );
    // Its view and the register agree: after a restart nothing changes.
    drop(daemon);
    let st = env.json(&["status"]);
    assert_eq!(st[0]["generation"], 2, "{st}");
    assert_eq!(st[0]["live_generations"], serde_json::json!([1, 2]), "{st}");
    assert_eq!(env.record("gw").generations, gens);
}

#[test]
fn with_the_api_every_state_change_from_the_cli_is_done_by_the_daemon() {
    let env = Env::new();
    env.make_ca("ca");
    env.serving_config("1d", "\n[api]\nenabled = true\nsocket = \"{p}/api.sock\"\n");
    let _ca = env.portal_ca(CaMode::Good);
    let daemon = env.daemon();
    env.wait_current("gw", 1);
    env.wait_log("signing API listening");
    let out = env.ok(&["rotate", "gw", "--now", "--timeout", "20"]);
    assert!(out.contains("rotated by the daemon"), "{out}");
    env.wait_log("asked through the API");
    // Status comes from the daemon; retire is done by it.
    let st = env.json(&["status"]);
    assert_eq!(st[0]["live_generations"], serde_json::json!([1, 2]), "{st}");
    let id1 = env.generation("gw", 1).key_id_hex().unwrap();
    let out = env.ok(&["retire", "gw", "--generation", "1"]);
    assert!(out.contains("retired by the daemon"), "{out}");
    assert!(
        !env.pkcs11_objects().contains(&id1),
        "generation 1's key is gone"
    );
    let st = env.json(&["status"]);
    assert_eq!(st[0]["live_generations"], serde_json::json!([2]), "{st}");
    // A JWS made by the daemon with the current key.
    std::fs::write(env.path("payload.json"), b"{\"n\":1}").unwrap();
    let jws = env.ok(&["jws", "sign", "gw", "--payload", "payload.json"]);
    assert_eq!(jws.trim().split('.').count(), 3, "{jws}");
    // Its kid names the certificate (a certificate identity has no JWK kid): never empty.
    use base64::Engine as _;
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(jws.trim().split('.').next().unwrap())
        .unwrap();
    let header: serde_json::Value = serde_json::from_slice(&header).unwrap();
    let current = env.generation("gw", 2);
    assert_eq!(header["kid"].as_str(), current.fingerprint(), "{header}");
    // A bundle applied through the daemon (refused: no fleet key pinned), nothing changed.
    env.ok(&["fleet", "keygen", "--out", "fleet.key"]);
    std::fs::write(env.path("v1.toml"), "[log]\nlevel = \"debug\"\n").unwrap();
    env.fleet_sign("fleet.key", "1", "v1.toml", "v1.bundle");
    let err = env.fails(&["config", "apply", "v1.bundle"]);
    assert!(
        err.contains("daemon answered 409") && err.contains("not trusted"),
        "{err}"
    );
    let mut daemon = daemon;
    assert!(daemon.0.try_wait().unwrap().is_none());
}

/// A bundle is reported applied only when the reload that puts it in effect went through:
/// here the PIN file is gone, so the token cannot open for the new configuration.
#[test]
fn a_bundle_whose_reload_is_refused_is_not_reported_applied() {
    let env = Env::new();
    env.make_ca("ca");
    let key = env.json(&["fleet", "keygen", "--out", "fleet.key"]);
    let public = key["public_key"].as_str().unwrap().to_owned();
    env.serving_config(
        "1d",
        &format!(
            "\n[api]\nenabled = true\nsocket = \"{{p}}/api.sock\"\n\n[fleet]\ntrusted_keys = [\"{public}\"]\n"
        ),
    );
    let _ca = env.portal_ca(CaMode::Good);
    let mut daemon = env.daemon();
    env.wait_current("gw", 1);
    env.wait_log("signing API listening");
    std::fs::write(env.path("v1.toml"), "[log]\nlevel = \"debug\"\n").unwrap();
    env.fleet_sign("fleet.key", "1", "v1.toml", "v1.bundle");
    std::fs::rename(env.path("pin"), env.path("pin.away")).unwrap();
    let err = env.fails(&["config", "apply", "v1.bundle"]);
    assert!(
        err.contains("not applied") && err.contains("reload that puts it in effect was refused"),
        "{err}"
    );
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );
    // With the PIN back, the next bundle is applied and says so.
    std::fs::rename(env.path("pin.away"), env.path("pin")).unwrap();
    std::fs::write(env.path("v2.toml"), "[log]\nlevel = \"info\"\n").unwrap();
    env.fleet_sign("fleet.key", "2", "v2.toml", "v2.bundle");
    let out = env.ok(&["config", "apply", "v2.bundle"]);
    assert!(out.contains("applied fleet bundle v2"), "{out}");
}

/// Beside a running daemon: `needs-renewal` answers from the renewal point (an overlap after
/// a promotion is not "renew now"), `rotate --now` during the overlap says it is queued and
/// how to end the overlap, and `status` names the old generation that `retire` takes.
#[test]
fn needs_renewal_and_rotate_during_an_overlap_beside_the_daemon_say_what_is_true() {
    let env = Env::new();
    env.make_ca("ca");
    env.serving_config("1d", "\n[api]\nenabled = true\nsocket = \"{p}/api.sock\"\n");
    let _ca = env.portal_ca(CaMode::Good);
    let _daemon = env.daemon();
    env.wait_current("gw", 1);
    env.wait_log("signing API listening");
    assert_eq!(env.run(&["needs-renewal", "gw"]).status.code(), Some(1));
    env.ok(&["rotate", "gw", "--now", "--timeout", "20"]);
    // Generation 2 current, generation 1 overlapping: nothing is due.
    assert_eq!(env.run(&["needs-renewal", "gw"]).status.code(), Some(1));
    let out = env.run(&["rotate", "gw", "--now", "--timeout", "5"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("the rotation is queued") && text.contains("retire gw --generation 1"),
        "{text}"
    );
    let st = env.ok(&["status"]);
    assert!(
        st.contains("generation 1: overlapping") && st.contains("retire gw --generation 1"),
        "{st}"
    );
}

/// The first portal enrolment with `poll_interval = "5m"`: once the certificate is in the
/// inbox, `enroll` (handed to the daemon) looks at once instead of at the scheduled check;
/// and a lowered `poll_interval` moves a check already scheduled at the reload.
#[test]
fn an_interactive_enroll_and_a_lowered_poll_interval_look_at_the_inbox_at_once() {
    let env = Env::new();
    env.make_ca("ca");
    env.serving_config("1d", "\n[api]\nenabled = true\nsocket = \"{p}/api.sock\"\n");
    let slow = |env: &Env| {
        let cfg = std::fs::read_to_string(env.path("defaults.toml")).unwrap();
        std::fs::write(
            env.path("defaults.toml"),
            cfg.replace("poll_interval = \"1s\"", "poll_interval = \"5m\""),
        )
        .unwrap();
    };
    slow(&env);
    let _ca = env.portal_ca(CaMode::Good);
    let daemon = env.daemon();
    env.wait_log("signing API listening");
    // The CSR went out and was signed into the inbox; the daemon's next look is 5 min away.
    wait_for("the certificate in the inbox", 20, || {
        std::fs::read_dir(env.path("inbox")).is_ok_and(|mut d| d.next().is_some())
    });
    let t = std::time::Instant::now();
    let out = env.ok(&["enroll", "gw", "--timeout", "20"]);
    assert!(out.contains("generation 1 is current"), "{out}");
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    drop(daemon);

    // A second device state: the same wait, then poll_interval lowered and SIGHUP.
    let env = Env::new();
    env.make_ca("ca");
    env.serving_config("1d", "");
    slow(&env);
    let _ca = env.portal_ca(CaMode::Good);
    let daemon = env.daemon();
    wait_for("the certificate in the inbox", 20, || {
        std::fs::read_dir(env.path("inbox")).is_ok_and(|mut d| d.next().is_some())
    });
    let cfg = std::fs::read_to_string(env.path("defaults.toml")).unwrap();
    std::fs::write(
        env.path("defaults.toml"),
        cfg.replace("poll_interval = \"5m\"", "poll_interval = \"1s\""),
    )
    .unwrap();
    run_ok(
        std::process::Command::new("kill").args(["-HUP", &daemon.0.id().to_string()]),
        "kill -HUP",
    );
    env.wait_current("gw", 1);
}
