//! EST enrolment and re-enrolment through the real binary against the test EST server.

use edge_signer::register::{GenStatus, Generation};
use edge_signer_tests::est::{est_config_with, first_der, EstMode, EstServer};
use edge_signer_tests::*;

fn est_config(env: &Env, est: &EstServer, bootstrap: &str) {
    est_config_with(env, est, bootstrap, "");
}

fn gens(env: &Env) -> Vec<Generation> {
    env.record("dev").generations
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
    std::fs::write(env.path("g1.csr"), g1.csr_pem().unwrap()).unwrap();
    assert!(env
        .openssl(&["req", "-in", "g1.csr", "-verify", "-noout"])
        .contains("verify OK"));

    // Two-tier PKI, root-only ca_bundle: the issuing CA from /cacerts builds the chain, is
    // pinned, and is exported with the leaf.
    let exported = std::fs::read_to_string(env.path("state/identities/dev/cert.pem")).unwrap();
    assert_eq!(
        exported.matches("BEGIN CERTIFICATE").count(),
        2,
        "{exported}"
    );
    assert!(exported.ends_with(&est.inter_pem), "leaf + issuing CA");
    assert!(env.path("state/issuers/est/cacerts.pem").exists());

    env.ok(&["rotate", "dev", "--now", "--timeout", "20"]);
    let seen = est.enrolments();
    assert_eq!(seen.len(), 2);
    assert!(seen[1].path.ends_with("/simplereenroll"), "{seen:?}");
    assert!(
        !seen[1].authorization,
        "re-enrolment carries no Authorization header beside the client certificate"
    );
    assert_eq!(
        seen[1].client_cert.as_deref(),
        Some(first_der(g1.chain_pem().unwrap()).as_slice()),
        "re-enrolment must present the current generation's certificate"
    );
    let g = gens(&env);
    assert_eq!(
        (g[0].status, g[1].status),
        (GenStatus::Overlap, GenStatus::Current)
    );
    env.ok(&["retire", "dev", "--generation", "1"]);
    let objects = env.pkcs11_objects();
    assert!(!objects.contains(&g1.key_id_hex().unwrap()), "{objects}");
}

fn basic_bootstrap(env: &Env) -> String {
    format!(
        "timeout = \"1s\"\nbootstrap = {{ username = \"gw-7\", password_file = \"{}\" }}",
        env.path_str("est-password")
    )
}

#[test]
fn a_retry_after_is_persisted_and_honoured_by_every_process() {
    let env = Env::new();
    let est = EstServer::start(
        env.dir.path(),
        "gw-7",
        "s3cret-bootstrap",
        EstMode::AcceptThenIssue,
    );
    est.set_retry_after("5");
    est_config(&env, &est, &basic_bootstrap(&env));
    let started = std::time::Instant::now();
    let err = env.fails(&["enroll", "dev", "--timeout", "1"]);
    assert!(err.contains("Retry-After: 5"), "{err}");
    let asked = est.seen.lock().unwrap().len();
    let st = env.json(&["status"]);
    assert!(
        st[0]["next_action"]
            .as_str()
            .unwrap()
            .contains("Retry-After: 5"),
        "{st}"
    );
    let until = st[0]["next_at"].as_str().unwrap().to_owned();
    // A second process, and a daemon started now, make no request before the time.
    let err = env.fails(&["enroll", "dev", "--timeout", "1"]);
    assert!(
        err.contains(&until) || err.contains("Retry-After: 5"),
        "{err}"
    );
    let daemon = Guard(env.cmd().arg("run").spawn().unwrap());
    std::thread::sleep(std::time::Duration::from_secs(2));
    drop(daemon);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(
        est.seen.lock().unwrap().len(),
        asked,
        "no request before Retry-After"
    );
    // After it, the same request is repeated and the certificate comes.
    env.ok(&["enroll", "dev", "--timeout", "20"]);
    assert!(started.elapsed() >= std::time::Duration::from_secs(5));
    assert_eq!(est.enrolments().len(), 2);
}

#[test]
fn bad_and_hostile_answers_leave_the_old_identity_serving() {
    let env = Env::new();
    let est = EstServer::start(
        env.dir.path(),
        "gw-7",
        "s3cret-bootstrap",
        EstMode::InformationalThenOk,
    );
    est_config(&env, &est, &basic_bootstrap(&env));
    // A 100 Continue before the 200 is legal HTTP: enrolment works.
    env.ok(&["enroll", "dev", "--timeout", "20"]);
    for (mode, reason) in [
        (EstMode::Garbage, "unusable body"),
        (EstMode::Truncated, "unusable body"),
        (EstMode::WrongContentType, "Content-Type 'text/html'"),
        (EstMode::ServerError, "HTTP 503"),
        (EstMode::Reject, "HTTP 400: CSR refused by policy"),
        (EstMode::Slow, "no complete answer within 1s"),
        (EstMode::ChunkOverflow, "reading the response body"),
        (EstMode::HugeLength, "Content-Length \"10000000000\""),
        (EstMode::EndlessHeader, "reading the response head"),
        (EstMode::CutWithoutCloseNotify, "reading the response body"),
    ] {
        est.set_mode(mode);
        let out = env.run(&["rotate", "dev", "--now", "--timeout", "2"]);
        assert!(!out.status.success(), "{mode:?} accepted");
        let rec = env.record("dev");
        let why = rec.failure.map(|f| f.reason).unwrap_or_default();
        assert!(why.contains(reason), "{mode:?}: {why}");
        assert_eq!(
            rec.current,
            Some(1),
            "{mode:?}: the old identity keeps serving"
        );
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    // The daemon meets a hostile server, stays up, and completes once the server is sane.
    est.set_mode(EstMode::ChunkOverflow);
    let mut daemon = env.daemon();
    env.wait_log("retrying at");
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon is alive"
    );
    est.set_mode(EstMode::Issue);
    let start = std::time::Instant::now();
    while env.record("dev").current == Some(1) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "no recovery"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon is alive"
    );
}

#[test]
fn a_ca_that_rewrites_the_dn_issues_under_the_cn_policy_and_is_refused_under_exact() {
    for mode in [EstMode::KeepOnlyCn, EstMode::ReorderDn] {
        let env = Env::new();
        let est = EstServer::start(env.dir.path(), "gw-7", "s3cret-bootstrap", mode);
        est_config(&env, &est, &basic_bootstrap(&env));
        env.ok(&["enroll", "dev", "--timeout", "20"]);
        let st = env.json(&["status"]);
        let diffs = st[0]["name_differences"].to_string();
        assert!(
            diffs.contains("asked for 'O=Acme,CN=gw-7'"),
            "{mode:?}: {st}"
        );
        assert!(st[0]["subject_issued"].is_string(), "{st}");

        est_config_with(
            &env,
            &est,
            &basic_bootstrap(&env),
            "subject_match = \"exact\"",
        );
        let err = env.fails(&["rotate", "dev", "--now", "--timeout", "3"]);
        assert!(err.contains("subject is '"), "{mode:?}: {err}");
        assert_eq!(env.record("dev").current, Some(1));
    }
}

#[test]
fn extra_certificates_in_the_pkcs7_join_the_chain_and_a_foreign_root_is_refused() {
    let env = Env::new();
    let est = EstServer::start(
        env.dir.path(),
        "gw-7",
        "s3cret-bootstrap",
        EstMode::WithChain,
    );
    est_config(&env, &est, &basic_bootstrap(&env));
    env.ok(&["enroll", "dev", "--timeout", "20"]);
    let exported = std::fs::read_to_string(env.path("state/identities/dev/cert.pem")).unwrap();
    assert!(exported.ends_with(&est.inter_pem), "{exported}");

    // The same server, but the device trusts another root: refused (at TLS already, and
    // /cacerts could never anchor there).
    std::fs::create_dir_all(env.path("foreign")).unwrap();
    let foreign = EstServer::start(&env.path("foreign"), "x", "y", EstMode::Issue);
    std::fs::copy(&foreign.ca_file, env.path("foreign-root.pem")).unwrap();
    drop(foreign);
    let cfg = std::fs::read_to_string(env.path("defaults.toml")).unwrap();
    std::fs::write(
        env.path("defaults.toml"),
        cfg.replace(
            &est.ca_file.display().to_string(),
            &env.path_str("foreign-root.pem"),
        ),
    )
    .unwrap();
    env.fails(&["rotate", "dev", "--now", "--timeout", "2"]);
    let why = env
        .record("dev")
        .failure
        .map(|f| f.reason)
        .unwrap_or_default();
    assert!(
        why.contains("invalid peer certificate")
            || why.contains("do not chain to the configured ca_bundle"),
        "{why}"
    );
    assert_eq!(env.record("dev").current, Some(1));
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
