//! One agent against a real mosquitto: `fleet publish` of a signed bundle → applied by the
//! agent → its result received by a subscriber; median and max ms over N bundles
//! (`BENCH_BUNDLES`, default 10). Includes starting the `edge-signer fleet publish` process.

use edge_signer_tests::mqtt::{self, operator_env, Mosquitto};
use edge_signer_tests::*;
use std::time::{Duration, Instant};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: u64 = std::env::var("BENCH_BUNDLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let (op, fleet_pub) = operator_env(&[]);
    let dev = Env::new();
    dev.make_ca("ca");
    let broker = Mosquitto::start(&op, &[op.path("ca.pem"), dev.path("ca.pem")]);
    dev.fleet_mqtt_config("dev-a", &broker, &op.path("ca.pem"), &fleet_pub, "1d", "");
    let _ca = dev.portal_ca(CaMode::Good);
    let _d = dev.quiet_daemon();
    dev.wait_current("gw", 1);
    wait_for("the agent connects to the broker", 30, || {
        broker.log().contains("as dev-a")
    });
    let topic = "edge-signer/dev-a/bundle/result";
    let _sub = Guard(mqtt::operator_sub(
        &op,
        broker.port,
        topic,
        false,
        "results.txt",
    ));
    std::thread::sleep(Duration::from_millis(500));
    let mut ms: Vec<f64> = (1..=n).map(|v| push_one(&op, &broker, v)).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "fleet channel, one agent on mosquitto: publish -> applied -> result received over {n} bundles: median {:.0} ms, max {:.0} ms (includes starting `fleet publish`)",
        ms[ms.len() / 2],
        ms[ms.len() - 1]
    );
}

/// Sign bundle `v`, publish it with `edge-signer fleet publish` and wait for the agent's
/// result "applied": ms from the publish command's start.
fn push_one(op: &Env, broker: &Mosquitto, v: u64) -> f64 {
    let p = |f: &str| op.path_str(f);
    std::fs::write(
        op.path("site.toml"),
        format!(
            "[log]\nlevel = \"{}\"\n",
            if v.is_multiple_of(2) { "info" } else { "debug" }
        ),
    )
    .unwrap();
    let out = format!("v{v}.bundle");
    op.fleet_sign_group("fleet.key", &v.to_string(), "site.toml", &out, "site");
    let t0 = Instant::now();
    let args = [
        "fleet",
        "publish",
        "--broker",
        &broker.url(),
        "--ca",
        &p("ca.pem"),
        "--cert",
        &p("operator.pem"),
        "--key",
        &p("operator.key"),
        "--group",
        "site",
        &p(&out),
    ];
    op.ok(&args);
    let want = format!("\"version\":{v}");
    let applied = poll_until(30, Duration::from_millis(2), || {
        std::fs::read_to_string(op.path("results.txt"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(&want) && l.contains("\"applied\":true"))
    });
    assert!(applied, "no result for v{v}");
    t0.elapsed().as_secs_f64() * 1000.0
}
