//! The fleet channel against a real mosquitto (require_certificate true): two agents on two
//! tokens take retained bundles, refuse forged and replayed ones and say why, publish their
//! status, go offline through the last will, reconnect after a rotation and after an outage.

use edge_signer_tests::mqtt::{operator_env, Mosquitto};
use edge_signer_tests::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// A device: a token and its own CA (the broker trusts it for clients).
fn device() -> Env {
    let env = Env::new();
    env.make_ca("ca");
    env
}

/// Start `env`'s agent: fleet channel to `broker`, trusting `fleet_pub` for bundles.
fn agent(
    env: &Env,
    device: &str,
    broker: &Mosquitto,
    server_ca: &Path,
    fleet_pub: &str,
    overlap: &str,
) -> (Guard, PortalCa) {
    env.fleet_mqtt_config(
        device,
        broker,
        server_ca,
        fleet_pub,
        overlap,
        "keepalive = \"5s\"\nreconnect_max = \"2s\"\n",
    );
    let ca = env.portal_ca(CaMode::Good);
    let d = env.daemon();
    (d, ca)
}

struct Operator<'a> {
    env: &'a Env,
    url: String,
}

impl Operator<'_> {
    fn args(&self) -> Vec<String> {
        let p = |f: &str| self.env.path_str(f);
        vec![
            "--broker".into(),
            self.url.clone(),
            "--ca".into(),
            p("ca.pem"),
            "--cert".into(),
            p("operator.pem"),
            "--key".into(),
            p("operator.key"),
        ]
    }

    fn publish(&self, file: &str) {
        let mut a = vec!["fleet".to_string(), "publish".into()];
        a.extend(self.args());
        a.extend(["--group".into(), "site".into(), self.env.path_str(file)]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        self.env.ok(&a);
    }

    fn status(&self) -> serde_json::Value {
        let mut a = vec!["fleet".to_string(), "status".into()];
        a.extend(self.args());
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        self.env.json(&a)
    }

    /// Results published by the devices, collected by mosquitto_sub meanwhile.
    fn results(&self) -> std::process::Child {
        let port = self.url.rsplit(':').next().unwrap().parse().unwrap();
        let topic = "edge-signer/+/bundle/result";
        edge_signer_tests::mqtt::operator_sub(self.env, port, topic, true, "results.txt")
    }
}

fn device_row<'a>(st: &'a serde_json::Value, d: &str) -> &'a serde_json::Value {
    st.as_array()
        .unwrap()
        .iter()
        .find(|r| r["device"] == d)
        .unwrap_or(&serde_json::Value::Null)
}

#[test]
fn two_agents_take_bundles_refuse_forgeries_report_status_and_go_offline() {
    // The operator's side: the broker's CA, the operator's certificate, the fleet keys.
    let (op_env, fleet_pub) = operator_env(&["rogue.key"]);
    let (a, b) = (device(), device());
    let broker = Mosquitto::start(
        &op_env,
        &[op_env.path("ca.pem"), a.path("ca.pem"), b.path("ca.pem")],
    );
    let (da, _ca_a) = agent(
        &a,
        "dev-a",
        &broker,
        &op_env.path("ca.pem"),
        &fleet_pub,
        "6s",
    );
    let (mut db, _ca_b) = agent(
        &b,
        "dev-b",
        &broker,
        &op_env.path("ca.pem"),
        &fleet_pub,
        "1d",
    );
    a.wait_current("gw", 1);
    b.wait_current("gw", 1);
    wait_connected(&broker, &a, "dev-a");

    let op = Operator {
        env: &op_env,
        url: broker.url(),
    };
    only_signed_newer_bundles_apply(&op, &[&a, &b]);

    // The operator's view: both devices, days left, config version 2.
    wait_for("both statuses at config v2", 20, || {
        let st = op.status();
        ["dev-a", "dev-b"].iter().all(|d| {
            device_row(&st, d)["config_version"] == 2
                && device_row(&st, d)["days_left"].as_i64().unwrap_or(0) >= 88
        })
    });
    // A killed agent is marked offline by its last will.
    let _ = db.0.kill();
    let _ = db.0.wait();
    wait_for("dev-b offline", 30, || {
        device_row(&op.status(), "dev-b")["online"] == false
    });
    assert_eq!(device_row(&op.status(), "dev-a")["online"], true);

    // A rotation: dev-a reconnects with the new certificate; after the overlap the old key is gone.
    a.ok(&["rotate", "gw", "--now", "--timeout", "20"]);

    let cn2 = a.gw_cn(2);
    wait_for("dev-a reconnected with the new CN", 20, || {
        broker.log().contains(&format!("u'{cn2}'"))
    });
    let id1 = a.generation("gw", 1).key_id_hex().unwrap();
    wait_for("old key destroyed after the overlap", 30, || {
        !a.pkcs11_objects().contains(&id1)
    });
    drop(da);
}

/// The device connects with its token identity: the broker logs the certificate's CN.
fn wait_connected(broker: &Mosquitto, a: &Env, device: &str) {
    let cn = a.gw_cn(1);
    let start = Instant::now();
    while !(broker.log().contains(&format!("as {device}"))
        && broker.log().contains(&format!("u'{cn}'")))
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{device} never connected as {cn}:\n{}\n{}",
            broker.log(),
            std::fs::read_to_string(a.path("daemon.log"))
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.contains("TRACE"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// v1 then v2 apply on every device; a forged bundle and a replayed v1 are refused by each,
/// and each says so on its result topic.
fn only_signed_newer_bundles_apply(op: &Operator, devices: &[&Env]) {
    let op_env = op.env;
    let mut results = Guard(op.results());
    let sign = |key: &str, v: &str, out: &str| {
        std::fs::write(
            op_env.path("site.toml"),
            format!(
                "[log]\nlevel = \"{}\"\n",
                if v == "1" { "debug" } else { "info" }
            ),
        )
        .unwrap();
        op_env.fleet_sign_group(key, v, "site.toml", out, "site");
    };
    sign("fleet.key", "1", "v1.bundle");
    sign("fleet.key", "2", "v2.bundle");
    sign("rogue.key", "3", "forged.bundle");
    op.publish("v1.bundle");
    for e in devices {
        wait_for("v1 applied", 20, || {
            std::fs::read(e.path("state/fleet/current.bundle")).ok()
                == std::fs::read(op_env.path("v1.bundle")).ok()
        });
    }
    op.publish("v2.bundle");
    for e in devices {
        wait_for("v2 applied", 20, || {
            std::fs::read(e.path("state/fleet/current.bundle")).ok()
                == std::fs::read(op_env.path("v2.bundle")).ok()
        });
    }
    op.publish("forged.bundle");
    op.publish("v1.bundle");
    wait_for("four refusals published", 20, || {
        let r = std::fs::read_to_string(op_env.path("results.txt")).unwrap_or_default();
        r.matches("not trusted on this device").count() >= 2
            && r.matches("not newer than the applied version 2").count() >= 2
    });
    for e in devices {
        assert_eq!(
            std::fs::read(e.path("state/fleet/current.bundle")).ok(),
            std::fs::read(op_env.path("v2.bundle")).ok(),
            "nothing changed"
        );
    }
    drop(results.0.kill());
}

#[test]
fn a_broker_outage_changes_nothing_and_the_agent_comes_back_by_itself() {
    let (op_env, fleet_pub) = operator_env(&[]);
    let a = device();
    let mut broker = Mosquitto::start(&op_env, &[op_env.path("ca.pem"), a.path("ca.pem")]);
    let (_da, _ca) = agent(
        &a,
        "dev-a",
        &broker,
        &op_env.path("ca.pem"),
        &fleet_pub,
        "1d",
    );
    a.wait_current("gw", 1);
    let op = Operator {
        env: &op_env,
        url: broker.url(),
    };
    wait_for("dev-a online", 20, || {
        device_row(&op.status(), "dev-a")["online"] == true
    });
    // With reconnect_max = 2s (agent config above), 10 s is several failed reconnects at the
    // capped backoff; OUTAGE_SECS makes it longer.
    let outage = Duration::from_secs(
        std::env::var("OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    );
    broker.stop();
    // Meanwhile the device rotates: nothing on the device waits for the broker.
    a.ok(&["rotate", "gw", "--now", "--timeout", "20"]);
    std::thread::sleep(outage.saturating_sub(Duration::from_secs(2)));
    broker.restart();
    std::fs::write(op_env.path("site.toml"), "[log]\nlevel = \"debug\"\n").unwrap();
    op_env.fleet_sign_group("fleet.key", "1", "site.toml", "v1.bundle", "site");
    op.publish("v1.bundle");
    wait_for("the retained bundle applied after the outage", 30, || {
        std::fs::read(a.path("state/fleet/current.bundle")).is_ok()
    });
    wait_for(
        "current status published: generation 2, config v1",
        30,
        || {
            let st = op.status();
            let r = device_row(&st, "dev-a");
            r["config_version"] == 1 && r["identities"][0]["generation"] == 2 && r["online"] == true
        },
    );
}
