//! EST enrolment and re-enrolment through the real binary against the test EST server.

use edge_signer_tests::est::{first_der, EstMode, EstServer};
use edge_signer_tests::*;

fn est_config(env: &Env, est: &EstServer, bootstrap: &str) {
    let p = env.dir.path().display();
    std::fs::write(env.path("est-password"), "s3cret-bootstrap\n").unwrap();
    let cfg = format!(
        r#"
{token}
[[identity]]
name = "dev"
subject = {{ o = "Acme", cn = "gw-7" }}
sans = ["dns:gw-7.example"]
issuer = "est"
[identity.renewal]
retry_min = "1s"
retry_max = "2s"

[[issuer]]
name = "est"
kind = "est"
url = "https://127.0.0.1:{port}"
ca_bundle = "{ca}"
{bootstrap}

[paths]
state_dir = "{p}/state"
"#,
        token = env.token_toml(),
        port = est.port,
        ca = est.ca_file.display(),
    );
    std::fs::write(env.path("defaults.toml"), cfg).unwrap();
}

fn gens(env: &Env) -> Vec<serde_json::Value> {
    env.register()["identities"]["dev"]["generations"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn enrol_with_bootstrap_basic_then_reenrol_over_token_mtls_then_retire() {
    let env = Env::new();
    let est = EstServer::start(env.dir.path(), "gw-7", "s3cret-bootstrap", EstMode::Issue);
    est_config(
        &env,
        &est,
        &format!(
            "bootstrap = {{ username = \"gw-7\", password_file = \"{}\" }}",
            env.path_str("est-password")
        ),
    );

    env.ok(&["enroll", "dev", "--timeout", "20"]);
    let seen = est.enrolments();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].path.ends_with("/.well-known/est/simpleenroll")
            && seen[0].basic_ok
            && seen[0].client_cert.is_none(),
        "{seen:?}"
    );
    let g1 = gens(&env)[0].clone();
    std::fs::write(env.path("g1.csr"), g1["csr_pem"].as_str().unwrap()).unwrap();
    assert!(env
        .openssl(&["req", "-in", "g1.csr", "-verify", "-noout"])
        .contains("verify OK"));

    env.ok(&["rotate", "dev", "--now", "--timeout", "20"]);
    let seen = est.enrolments();
    assert_eq!(seen.len(), 2);
    assert!(seen[1].path.ends_with("/simplereenroll"), "{seen:?}");
    assert_eq!(
        seen[1].client_cert.as_deref(),
        Some(first_der(g1["cert_pem"].as_str().unwrap()).as_slice()),
        "re-enrolment must present the current generation's certificate"
    );
    let g = gens(&env);
    assert_eq!(
        (g[0]["status"].as_str(), g[1]["status"].as_str()),
        (Some("overlap"), Some("current"))
    );
    env.ok(&["retire", "dev", "--generation", "1"]);
    let objects = env.pkcs11_objects();
    assert!(
        !objects.contains(g1["key_id"].as_str().unwrap()),
        "{objects}"
    );
}

#[test]
fn retry_after_is_honoured_and_bad_answers_leave_the_old_identity_serving() {
    let env = Env::new();
    let est = EstServer::start(
        env.dir.path(),
        "gw-7",
        "s3cret-bootstrap",
        EstMode::AcceptThenIssue,
    );
    est_config(
        &env,
        &est,
        &format!(
            "timeout = \"1s\"\nbootstrap = {{ username = \"gw-7\", password_file = \"{}\" }}",
            env.path_str("est-password")
        ),
    );
    // Give up before the Retry-After: status shows what is awaited and until when.
    let out = env.run(&["enroll", "dev", "--timeout", "1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Retry-After: 1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = env.json(&["status"]);
    assert!(
        st[0]["next_action"]
            .as_str()
            .unwrap()
            .contains("Retry-After: 1"),
        "{st}"
    );
    assert!(st[0]["next_at"].is_string(), "{st}");
    let out = env.run(&["enroll", "dev", "--timeout", "20"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(est.enrolments().len() >= 2, "asked again after Retry-After");

    for (mode, reason) in [
        (EstMode::Garbage, "unusable body"),
        (EstMode::Truncated, "unusable body"),
        (EstMode::WrongContentType, "Content-Type 'text/html'"),
        (EstMode::ServerError, "HTTP 503"),
        (EstMode::Reject, "HTTP 400: CSR refused by policy"),
        (EstMode::Slow, "EST simplereenroll: reading response"),
    ] {
        est.set_mode(mode);
        let out = env.run(&["rotate", "dev", "--now", "--timeout", "2"]);
        assert!(!out.status.success(), "{mode:?} accepted");
        let rec = env.register()["identities"]["dev"].clone();
        let why = rec["failure"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(why.contains(reason), "{mode:?}: {why}");
        assert_eq!(
            rec["current"], 1,
            "{mode:?}: the old identity keeps serving"
        );
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    // Back to normal: the rotation completes (re-enrolment with the still-valid generation 1).
    est.set_mode(EstMode::Issue);
    let out = env.run(&["rotate", "dev", "--now", "--timeout", "20"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        env.register()["identities"]["dev"]["current"]
            .as_u64()
            .unwrap()
            >= 2
    );
}

#[test]
fn enrolment_with_a_bootstrap_client_certificate_in_the_token() {
    let env = Env::new();
    let est = EstServer::start(env.dir.path(), "nobody", "unused", EstMode::Issue);
    // The factory credential: a token key with a certificate from the EST CA.
    let uri = env.generate("ec-p256", "bootstrap");
    env.ok(&[
        "csr",
        "--key",
        &uri,
        "--subject",
        "CN=factory-bootstrap",
        "--out",
        "boot.csr",
    ]);
    est.issue_for_csr(
        &std::fs::read_to_string(env.path("boot.csr")).unwrap(),
        &env.path("boot.pem"),
    );
    est_config(
        &env,
        &est,
        &format!(
            "bootstrap = {{ cert = \"{}\", key = \"{uri}\" }}",
            env.path_str("boot.pem")
        ),
    );
    env.ok(&["enroll", "dev", "--timeout", "20"]);
    let seen = est.enrolments();
    assert!(
        seen[0].path.ends_with("/simpleenroll") && !seen[0].basic_ok,
        "{seen:?}"
    );
    assert_eq!(
        seen[0].client_cert.as_deref(),
        Some(first_der(&std::fs::read_to_string(env.path("boot.pem")).unwrap()).as_slice())
    );
}
