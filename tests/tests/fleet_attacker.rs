//! The fleet channel from an attacker's side, against a real mosquitto running the ACL we
//! ship (packaging/mosquitto/edge-signer.acl): a second device with its own valid
//! certificate tries to overwrite a group's retained bundle and to spoof another device's
//! status; a bundle signed for another device, or for nobody, is refused by the agent even
//! when it arrives on the agent's own topic.

use edge_signer_tests::mqtt::{operator_env, Mosquitto};
use edge_signer_tests::*;
use std::process::{Command, Output};
use std::time::Duration;

/// `mosquitto_pub`/`mosquitto_sub` with `name.pem`/`name.key` of `env`, trusting `ca`.
fn mqtt(tool: &str, env: &Env, name: &str, ca: &str, port: u16, args: &[&str]) -> Output {
    Command::new(tool)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--cafile", ca])
        .args(["--cert", &env.path_str(&format!("{name}.pem"))])
        .args(["--key", &env.path_str(&format!("{name}.key"))])
        .args(args)
        .output()
        .expect("mosquitto-clients")
}

/// The retained message on `topic`, read as the operator (empty when none).
fn retained(op: &Env, port: u16, topic: &str) -> String {
    let ca = op.path_str("ca.pem");
    let out = mqtt(
        "mosquitto_sub",
        op,
        "operator",
        &ca,
        port,
        &["-t", topic, "-C", "1", "-W", "2", "--retained-only"],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_device_with_its_own_certificate_cannot_steer_others_and_bundles_keep_to_their_audience() {
    let (op, fleet_pub) = operator_env(&[]);
    // The operator's certificate has CN "operator": the shipped ACL names it.
    let acl = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/mosquitto/edge-signer.acl"
    ))
    .unwrap()
    .replace("user fleet-operator", "user operator")
        + "\nuser gw-0042\ntopic read edge-signer/group/site/bundle\n\
           user dev-b\ntopic read edge-signer/group/site/bundle\n";
    std::fs::write(op.path("edge-signer.acl"), acl).unwrap();
    // The agent: CN gw-0042 is its device id. The attacker: dev-b, a leaf of its own CA.
    let a = Env::new();
    a.make_ca("ca");
    let b = Env::new();
    b.make_ca("ca");
    b.openssl_leaf("ca", "dev-b");
    let broker = Mosquitto::start_with(
        &op,
        &[op.path("ca.pem"), a.path("ca.pem"), b.path("ca.pem")],
        &format!("acl_file {}\n", op.path_str("edge-signer.acl")),
    );
    a.fleet_mqtt_config(
        "gw-0042",
        &broker,
        &op.path("ca.pem"),
        &fleet_pub,
        "1d",
        "keepalive = \"5s\"\nreconnect_max = \"2s\"\n",
    );
    let cfg = std::fs::read_to_string(a.path("defaults.toml")).unwrap();
    std::fs::write(
        a.path("defaults.toml"),
        cfg.replace("cn_suffix = \"generation\"", ""),
    )
    .unwrap();
    let _portal = a.portal_ca(CaMode::Good);
    let agent = a.daemon();
    a.wait_current("gw", 1);
    let port = broker.port;
    wait_for("the agent's status", 20, || {
        retained(&op, port, "edge-signer/gw-0042/status").contains("\"device\":\"gw-0042\"")
    });

    // The operator's group bundle, then the attacker's attempts with its own certificate.
    std::fs::write(op.path("site.toml"), "[log]\nlevel = \"debug\"\n").unwrap();
    op.fleet_sign_group("fleet.key", "1", "site.toml", "v1.bundle", "site");
    let op_ca = op.path_str("ca.pem");
    let pub_file = |env: &Env, who: &str, topic: &str, file: &str| {
        mqtt(
            "mosquitto_pub",
            env,
            who,
            &op_ca,
            port,
            &["-q", "1", "-r", "-t", topic, "-f", &env.path_str(file)],
        )
    };
    pub_file(
        &op,
        "operator",
        "edge-signer/group/site/bundle",
        "v1.bundle",
    );
    wait_for("v1 applied on the agent", 20, || {
        std::fs::read(a.path("state/fleet/current.bundle")).ok()
            == std::fs::read(op.path("v1.bundle")).ok()
    });
    std::fs::write(b.path("evil.bundle"), "not the operator's").unwrap();
    std::fs::write(
        b.path("status.json"),
        r#"{"device":"gw-0042","spoofed":true}"#,
    )
    .unwrap();
    pub_file(&b, "dev-b", "edge-signer/group/site/bundle", "evil.bundle");
    pub_file(&b, "dev-b", "edge-signer/gw-0042/status", "status.json");
    pub_file(&b, "dev-b", "edge-signer/gw-0042/bundle", "evil.bundle");
    std::thread::sleep(Duration::from_millis(500));
    let group = retained(&op, port, "edge-signer/group/site/bundle");
    assert!(group.starts_with("edge-signer-bundle v2"), "{group}");
    let status = retained(&op, port, "edge-signer/gw-0042/status");
    assert!(!status.contains("spoofed"), "{status}");
    assert!(retained(&op, port, "edge-signer/gw-0042/bundle").is_empty());
    // Nor can it read another device's bundle topic.
    let peek = mqtt(
        "mosquitto_sub",
        &b,
        "dev-b",
        &op_ca,
        port,
        &["-t", "edge-signer/group/other/bundle", "-C", "1", "-W", "2"],
    );
    assert!(peek.stdout.is_empty());

    // Bundles that reach the agent's own topic but are not for it are refused, and say why.
    std::fs::write(op.path("v2.toml"), "[log]\nlevel = \"info\"\n").unwrap();
    let mut for_b = fleet_sign_args("fleet.key", "2", "v2.toml", "for-b.bundle").to_vec();
    for_b.extend(["--device", "dev-b"]);
    op.ok(&for_b);
    op.fleet_sign("fleet.key", "3", "v2.toml", "nobody.bundle");
    for (file, why) in [
        ("for-b.bundle", "is for device:dev-b, not for this device"),
        ("nobody.bundle", "must name its audience"),
    ] {
        pub_file(&op, "operator", "edge-signer/gw-0042/bundle", file);
        a.wait_log(why);
    }
    assert_eq!(
        std::fs::read(a.path("state/fleet/current.bundle")).ok(),
        std::fs::read(op.path("v1.bundle")).ok(),
        "v1 stays in effect"
    );
    // The same no-audience bundle is still taken from the local command line.
    drop(agent);
    let out = a.ok(&["config", "apply", &op.path_str("nobody.bundle")]);
    assert!(out.contains("applied fleet bundle v3"), "{out}");
}

/// `fleet.mqtt.server_name` decides which name the broker's certificate must carry,
/// whatever host is dialled: the broker's certificate names only IP 127.0.0.1, the agent
/// dials `localhost`. With a wrong server_name the agent refuses the broker; with
/// "127.0.0.1" it connects.
#[test]
fn the_broker_certificate_must_name_server_name() {
    let (op, fleet_pub) = operator_env(&[]);
    let a = Env::new();
    a.make_ca("ca");
    let broker = Mosquitto::start(&op, &[op.path("ca.pem"), a.path("ca.pem")]);
    a.fleet_mqtt_config(
        "gw-0042",
        &broker,
        &op.path("ca.pem"),
        &fleet_pub,
        "1d",
        "keepalive = \"5s\"\nreconnect_max = \"1s\"\nserver_name = \"wrong.example\"\n",
    );
    let cfg = std::fs::read_to_string(a.path("defaults.toml"))
        .unwrap()
        .replace("mqtts://127.0.0.1:", "mqtts://localhost:");
    std::fs::write(a.path("defaults.toml"), &cfg).unwrap();
    let _portal = a.portal_ca(CaMode::Good);
    let agent = a.daemon();
    a.wait_current("gw", 1);
    a.wait_log("fleet channel: ");
    a.wait_log("certificate not valid for name \"wrong.example\"");
    assert!(!broker.log().contains("as gw-0042"), "{}", broker.log());
    std::fs::write(
        a.path("defaults.toml"),
        cfg.replace(
            "server_name = \"wrong.example\"",
            "server_name = \"127.0.0.1\"",
        ),
    )
    .unwrap();
    let pid = agent.0.id().to_string();
    run_ok(Command::new("kill").args(["-HUP", &pid]), "kill -HUP");
    wait_for("connected with server_name 127.0.0.1", 20, || {
        broker.log().contains("as gw-0042")
    });
}
