//! `[log]` through the real daemon: the configured level and format apply (the daemon says
//! what it does by default), the level follows a reload, `EDGE_SIGNER_LOG` overrides it, and
//! `config show` says which is in effect.

use edge_signer_tests::*;
use std::process::Command;

#[test]
fn the_configured_level_and_format_apply_and_the_level_follows_a_reload() {
    let env = Env::new();
    env.make_ca("ca");
    env.serving_config("1d", "\n[log]\nlevel = \"info\"\nformat = \"json\"\n");
    let _ca = env.portal_ca(CaMode::Good);
    let daemon = Guard(
        env.cmd()
            .env_remove("EDGE_SIGNER_LOG")
            .arg("run")
            .stderr(std::fs::File::create(env.path("daemon.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    env.wait_current("gw", 1);
    env.wait_log("edge-signer running");
    let log = std::fs::read_to_string(env.path("daemon.log")).unwrap();
    for l in log.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(
            matches!(v["level"].as_str(), Some("INFO" | "WARN" | "ERROR")),
            "{l}"
        );
    }
    assert!(!log.contains("sleeping until the next deadline"), "{log}");
    // debug from the next reload on.
    let cfg = std::fs::read_to_string(env.path("defaults.toml")).unwrap();
    std::fs::write(
        env.path("defaults.toml"),
        cfg.replace("level = \"info\"", "level = \"debug\""),
    )
    .unwrap();
    run_ok(
        Command::new("kill").args(["-HUP", &daemon.0.id().to_string()]),
        "kill -HUP",
    );
    env.wait_log("sleeping until the next deadline");
    // config show says which level is in effect and where it comes from.
    let show = env.ok(&["config", "show"]);
    assert!(
        show.contains("# the daemon logs at: EDGE_SIGNER_LOG=trace (overrides log.level = debug)"),
        "{show}"
    );
    let out = env
        .cmd()
        .env_remove("EDGE_SIGNER_LOG")
        .args(["config", "show"])
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&out.stdout);
    assert!(
        show.contains("# the daemon logs at: log.level = debug"),
        "{show}"
    );
}
