//! Post-quantum hybrid key exchange, checked on the wire: a relay between the proxy and the
//! target reads the ClientHello's key shares and the ServerHello's group.
//! - a target on the OpenSSL of the `cryptography` wheel (pyOpenSSL; 3.5 or later, with
//!   X25519MLKEM768 by default) negotiates X25519MLKEM768 with the default route;
//! - a classic-only route (`kx = ["X25519", "secp256r1"]`) offers no ML-KEM share;
//! - Debian's OpenSSL 3.0 `s_server`, which has no ML-KEM, completes on X25519 with no
//!   HelloRetryRequest (the client sends the X25519 half as a share of its own);
//! - the metrics count each connection with the group it negotiated.

use edge_signer_tests::kx_relay::{KxRelay, Seen, SECP256R1, X25519, X25519MLKEM768};
use edge_signer_tests::*;
use std::io::BufRead;
use std::process::{Command, Stdio};

/// The pyOpenSSL target (tests/py/tls_target.py) with `server.pem`, asking for a client
/// certificate of `ca`; waits until it listens.
fn openssl_wheel_target(env: &Env) -> (Guard, u16) {
    let port = free_port();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/tls_target.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .args(["server.pem", "server.key", "ca.pem"])
        .current_dir(env.dir.path())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(env.path("target.log")).expect("log"))
        .spawn()
        .expect("python3 tls_target.py (scripts/setup installs pyOpenSSL)");
    let mut first = String::new();
    let out = child.stdout.take().expect("stdout");
    std::io::BufReader::new(out)
        .read_line(&mut first)
        .expect("a line");
    assert_eq!(
        first.trim(),
        format!("listening {port}"),
        "the target starts: {}",
        std::fs::read_to_string(env.path("target.log")).unwrap_or_default()
    );
    (Guard(child), port)
}

/// Connections counted by the metrics for `proxy` with result ok and group `kx`.
fn counted(env: &Env, proxy: &str, kx: &str) -> f64 {
    serving::metric_sum(
        &env.metrics_text(),
        "edge_signer_proxy_connections_total",
        &[("proxy", proxy), ("result", "ok"), ("kx", kx)],
    )
}

/// Two routes (name, target port, extra lines), each on `{p}/NAME.sock` checking `ca.pem`,
/// the metrics API, the portal CA and the daemon, once it serves `gw` and listens.
fn serve_routes(env: &Env, routes: [(&str, u16, &str); 2]) -> (PortalCa, Guard) {
    let tables: String = routes
        .iter()
        .map(|(name, port, extra)| {
            serving::proxy_table(
                name,
                &format!("{{p}}/{name}.sock"),
                *port,
                "{p}/ca.pem",
                extra,
            )
        })
        .collect();
    env.serving_config("1d", &(tables + &serving::metrics_api_toml()));
    let ca = env.portal_ca(CaMode::Good);
    let daemon = env.daemon();
    env.wait_served("gw", 1);
    env.wait_log("proxy listening");
    (ca, daemon)
}

/// One request through the proxy socket `sock`: the page.
fn page(env: &Env, sock: &str) -> String {
    let out = env.curl(sock, "/", &["-w", "\n%{http_code}"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.ends_with("200"),
        "{text}\n{out:?}\ntarget: {}\ndaemon: {}",
        std::fs::read_to_string(env.path("target.log")).unwrap_or_default(),
        std::fs::read_to_string(env.path("daemon.log")).unwrap_or_default()
    );
    text
}

#[test]
fn the_hybrid_group_is_negotiated_with_a_server_that_has_it_and_classic_routes_stay_classic() {
    let env = Env::new();
    env.make_ca("ca");
    env.openssl_leaf("ca", "server");
    let (_target, target) = openssl_wheel_target(&env);
    let (pq, classic) = (KxRelay::start(target), KxRelay::start(target));
    let _serving = serve_routes(
        &env,
        [
            ("pq", pq.port, ""),
            ("classic", classic.port, "kx = [\"X25519\", \"secp256r1\"]"),
        ],
    );

    let text = page(&env, "pq.sock");
    assert!(text.contains(&format!("client {}", env.gw_cn(1))), "{text}");
    let seen = pq.seen();
    assert_eq!(
        seen[0],
        Seen {
            offered: vec![X25519MLKEM768, X25519],
            chosen: Some(X25519MLKEM768),
            retry: false
        },
        "the hybrid offered first (with its X25519 half) and chosen by the server: {text}"
    );
    assert_eq!(counted(&env, "pq", "X25519MLKEM768"), 1.0);

    page(&env, "classic.sock");
    let seen = classic.seen();
    assert_eq!(seen[0].offered, vec![X25519], "no ML-KEM share: {seen:?}");
    assert_eq!(seen[0].chosen, Some(X25519));
    assert_eq!(counted(&env, "classic", "X25519"), 1.0);
}

#[test]
fn a_server_without_ml_kem_completes_on_x25519_without_a_retry() {
    let env = Env::new();
    env.make_ca("ca");
    env.openssl_leaf("ca", "server");
    let (_www, www) = env.s_server("ca", &[], Some("www.log"));
    let relay = KxRelay::start(www);
    let p256 = KxRelay::start(www);
    let _serving = serve_routes(
        &env,
        [
            ("web", relay.port, ""),
            ("p256", p256.port, "kx = [\"secp256r1\"]"),
        ],
    );

    page(&env, "web.sock");
    let seen = relay.seen();
    assert_eq!(
        seen[0],
        Seen {
            offered: vec![X25519MLKEM768, X25519],
            chosen: Some(X25519),
            retry: false
        }
    );
    assert_eq!(counted(&env, "web", "X25519"), 1.0);
    page(&env, "p256.sock");
    assert_eq!(p256.seen()[0].chosen, Some(SECP256R1));
    assert_eq!(counted(&env, "p256", "secp256r1"), 1.0);
}

#[test]
fn an_empty_or_unknown_group_list_is_refused_by_name() {
    let env = Env::new();
    env.make_ca("ca");
    env.lifecycle_config("");
    let cfg = std::fs::read_to_string(env.path("defaults.toml")).unwrap();
    std::fs::write(
        env.path("defaults.toml"),
        cfg.clone() + "\n[tls]\nkx = []\n",
    )
    .unwrap();
    let defaults = env.path_str("defaults.toml");
    let out = env.run(&["config", "check", &defaults]);
    let err = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("defaults.toml: tls.kx: names no group"),
        "{err}"
    );
    std::fs::write(
        env.path("defaults.toml"),
        cfg + "\n[tls]\nkx = [\"X448\"]\n",
    )
    .unwrap();
    let out = env.run(&["config", "check", &defaults]);
    let err = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("defaults.toml: tls.kx[0]: unknown variant `X448`")
            && err.contains("X25519MLKEM768"),
        "{err}"
    );
}

/// The agent's own connections (here EST enrolment) offer the hybrid first too, and a
/// classic-only `[tls] kx` takes it away.
#[test]
fn the_agents_own_connections_offer_the_hybrid_first_unless_configured_classic() {
    use edge_signer_tests::est::{est_config_with, EstMode, EstServer};
    for (extra, offered) in [
        ("", vec![X25519MLKEM768, X25519]),
        ("[tls]\nkx = [\"secp256r1\"]\n", vec![SECP256R1]),
    ] {
        let env = Env::new();
        let est = EstServer::start(env.dir.path(), "gw-7", "s3cret-bootstrap", EstMode::Issue);
        let relay = KxRelay::start(est.port);
        let password = env.path_str("est-password");
        let bootstrap =
            format!("bootstrap = {{ username = \"gw-7\", password_file = \"{password}\" }}");
        est_config_with(&env, &est, &bootstrap, "");
        let cfg = std::fs::read_to_string(env.path("defaults.toml")).unwrap();
        let cfg = cfg.replace(
            &format!("127.0.0.1:{}", est.port),
            &format!("127.0.0.1:{}", relay.port),
        );
        std::fs::write(env.path("defaults.toml"), cfg + extra).unwrap();
        env.ok(&["enroll", "dev", "--timeout", "20"]);
        let seen = relay.seen();
        assert!(!seen.is_empty(), "EST went through the relay");
        for s in &seen {
            assert_eq!(s.offered, offered, "{extra}: {seen:?}");
            assert!(!s.retry, "{seen:?}");
        }
    }
}
