//! One writer per state directory: the daemon owns it; the CLI hands rotations to it.

use edge_signer_tests::*;

fn current(env: &Env) -> Option<u64> {
    std::fs::read(env.path("state/register.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|r| r["identities"]["gw"]["current"].as_u64())
}

#[test]
fn rotate_now_while_the_daemon_runs_is_done_once_by_the_daemon() {
    let env = Env::new();
    env.make_ca("ca");
    env.lifecycle_config("");
    let _ca = PortalCa::start(
        env.dir.path(),
        "ca",
        &env.path("outbox"),
        &env.path("inbox"),
        CaMode::Good,
    );
    let mut daemon = Guard(
        env.cmd()
            .arg("run")
            .stderr(std::fs::File::create(env.path("daemon.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let start = std::time::Instant::now();
    while current(&env) != Some(1) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "no enrolment"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
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
