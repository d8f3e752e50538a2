//! Where a PIN must never be: the configuration's environment source (refused), the
//! daemon's environment, the notify hook's environment.

use edge_signer_tests::*;
use std::os::unix::fs::PermissionsExt;

#[test]
fn a_pin_in_the_environment_is_refused_and_the_pin_reaches_neither_environ_nor_the_hook() {
    let env = Env::new();
    env.make_ca("ca");
    env.lifecycle_config("");
    let hook = env.path("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\ncat /proc/self/environ >> {0}/hook-environ\ncat >> {0}/events.jsonl\n",
            env.dir.path().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = std::fs::read_to_string(env.path("defaults.toml")).unwrap();
    // The environment is no place for a PIN (every child inherits it): refused, clearly.
    let env_pin = cfg.replace(
        &format!("pin = {{ file = \"{}\" }}", env.path_str("pin")),
        "pin = { env = \"GW_TOKEN_PIN\" }",
    );
    std::fs::write(env.path("env-pin.toml"), &env_pin).unwrap();
    let out = env
        .cmd()
        .args(["config", "check"])
        .arg(env.path("env-pin.toml"))
        .output()
        .unwrap();
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() && err.contains("token.pin") && err.contains("credential"),
        "{err}"
    );
    std::fs::write(
        env.path("defaults.toml"),
        format!("{cfg}\n[notify]\nexec = \"{}\"\n", hook.display()),
    )
    .unwrap();
    let _ca = env.portal_ca(CaMode::Good);
    let child = env
        .cmd()
        .arg("run")
        .stderr(std::fs::File::create(env.path("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _daemon = Guard(child);
    env.wait_current("gw", 1);
    let start = std::time::Instant::now();
    while !env.path("events.jsonl").exists() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "the hook never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(!environ.contains(USER_PIN), "PIN in the daemon's environ");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(USER_PIN));
    let hook_env = std::fs::read_to_string(env.path("hook-environ")).unwrap_or_default();
    assert!(!hook_env.contains(USER_PIN), "PIN in the hook's environ");
    assert!(
        !hook_env.contains("EDGE_SIGNER_"),
        "the hook inherits nothing: {hook_env}"
    );
}
