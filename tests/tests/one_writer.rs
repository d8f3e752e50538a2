//! One writer per state directory: the daemon owns it; the CLI hands rotations to it.

use edge_signer_tests::*;

#[test]
fn rotate_now_while_the_daemon_runs_is_done_once_by_the_daemon() {
    let env = Env::new();
    env.make_ca("ca");
    env.lifecycle_config("");
    let _ca = env.portal_ca(CaMode::Good);
    let mut daemon = Guard(
        env.cmd()
            .arg("run")
            .stderr(std::fs::File::create(env.path("daemon.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    env.wait_current("gw", 1);
    // A second daemon on the same state is refused.
    let err = env.fails(&["run"]);
    assert!(err.contains("one writer per state directory"), "{err}");

    let out = env.ok(&["rotate", "gw", "--now", "--timeout", "20"]);
    assert!(out.contains("rotated by the daemon"), "{out}");
    let reg = env.register();
    let gens = reg["identities"]["gw"]["generations"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(gens.len(), 2, "the rotation happened once: {reg}");
    assert_eq!(
        (gens[0]["status"].as_str(), gens[1]["status"].as_str()),
        (Some("overlap"), Some("current"))
    );
    let objects = env.pkcs11_objects();
    for g in &gens {
        assert!(
            objects.contains(g["key_id"].as_str().unwrap()),
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
    assert_eq!(
        env.register()["identities"]["gw"]["generations"],
        serde_json::json!(gens)
    );
}
