//! A revoked or deleted key never signs again, through any path of the running daemon (API
//! `sign` and `jws`, a proxy handshake) or the CLI, on both token kinds; the errors name the
//! key. `key destroy` of a key the daemon holds is refused with the command that does it
//! through the daemon (a module may keep its objects per process: only the daemon can make
//! sure that none of its signers keeps the key).

use edge_signer_tests::*;
use std::time::{Duration, Instant};

/// gw served by the daemon through the API and a proxy route to openssl s_server.
fn served(kind: TokenKind) -> (Env, Vec<Guard>, u16, PortalCa) {
    let env = Env::on(kind);
    env.make_ca("ca");
    env.openssl_leaf("ca", "server");
    let (server, target) = env.s_server("ca", &[], None);
    let port = serving::proxy_port();
    let route = serving::proxy_table(
        "api",
        &format!("127.0.0.1:{port}"),
        target,
        "{p}/ca.pem",
        "",
    );
    env.serving_config(
        "1d",
        &format!(
            r#"{route}
[api]
enabled = true
socket = "{{p}}/api.sock"

[[api.allow]]
uids = [{uid}]
identities = ["*"]
operations = ["sign", "jws", "status", "revoke"]
"#,
            uid = my_uid()
        ),
    );
    let ca = env.portal_ca(CaMode::Good);
    let daemon = env.daemon();
    env.wait_current("gw", 1);
    wait_for("gw served through the API", 20, || {
        sign(&env, "sign").0 == "200"
    });
    (env, vec![daemon, server], port, ca)
}

/// POST a signature (`sign`) or a JWS (`jws`) request for gw: (status, body).
fn sign(env: &Env, op: &str) -> (String, String) {
    let body = match op {
        "sign" => r#"{"alg":"ES256","data":"aGVsbG8="}"#,
        _ => r#"{"payload":{"hello":1}}"#,
    };
    let out = env.curl(
        "api.sock",
        &format!("/v1/identities/gw/{op}"),
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            body,
            "-w",
            "\n%{http_code}",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
    (code.to_owned(), body.to_owned())
}

/// One plain HTTP request through the proxy route: whether s_server answered.
fn through_proxy(port: u16) -> bool {
    std::process::Command::new("curl")
        .args(["-sf", "-m", "5", &format!("http://127.0.0.1:{port}/")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The key id of gw's current generation (hex).
fn current_key_id(env: &Env) -> String {
    env.record("gw")
        .current_gen()
        .and_then(|g| g.key_id_hex())
        .expect("a current generation with a key")
}

fn key_destroy_of_a_served_key_is_refused_and_revoke_ends_its_signatures(kind: TokenKind) {
    let (env, _guards, port, _ca) = served(kind);
    assert!(through_proxy(port), "the proxy serves before");
    let id = current_key_id(&env);
    let uri = format!("pkcs11:token={LABEL};id={}", percent(&id));
    let refused = env.fails(&["key", "destroy", &uri]);
    assert!(
        refused.contains("generation 1 of identity 'gw'")
            && refused.contains("edge-signer revoke gw --generation 1"),
        "{refused}"
    );
    assert!(
        env.pkcs11_objects().contains(&id),
        "the refused destroy left the key"
    );

    // Revoked through the daemon: from the moment the command returns, no path signs.
    env.ok(&["revoke", "gw", "--generation", "1"]);
    let (code, body) = sign(&env, "sign");
    assert_ne!(code, "200", "a revoked key signed through the API: {body}");
    let (code, body) = sign(&env, "jws");
    assert_ne!(code, "200", "a revoked key made a JWS: {body}");
    assert!(!env.pkcs11_objects().contains(&id), "its objects are gone");
    // The CLI, in a process of its own, finds no key either, and says which.
    let cli = env.fails(&["csr", "--key", &uri, "--subject", "CN=x", "--out", "x.csr"]);
    assert!(cli.contains(&id) || cli.contains("no key"), "{cli}");
}

/// Another program (pkcs11-tool) deletes the served key: SoftHSM shows it to every process
/// at once, so the next signature of each path fails and names the key. tpm2-pkcs11 reads
/// its store once per process (C_Initialize), so a running daemon goes on seeing the key
/// there until it restarts: docs/security.md says so, and the tpm variant checks that what
/// the daemon does about it is said (its `key destroy` refusal above covers the agent's own
/// tools).
fn a_key_deleted_by_another_program_stops_every_path_at_once(kind: TokenKind) {
    let (env, _guards, port, _ca) = served(kind);
    let id = current_key_id(&env);
    env.pkcs11_tool(&["--delete-object", "--type", "privkey", "--id", &id]);
    if kind == TokenKind::Tpm {
        // The daemon's tpm2-pkcs11 still has the key in its store read at start.
        assert_eq!(
            sign(&env, "sign").0,
            "200",
            "tpm2-pkcs11 learnt to see it: update docs/security.md"
        );
        // A restart is what makes it see the deletion: the key is never used again.
        drop(_guards);
        let _daemon = env.daemon();
        std::thread::sleep(Duration::from_secs(3));
        let (code, body) = sign(&env, "sign");
        assert!(
            code != "200" || !body.contains("\"generation\":1"),
            "the deleted key signed after a restart: {body}"
        );
        return;
    }
    let start = Instant::now();
    for op in ["sign", "jws"] {
        let (code, body) = sign(&env, op);
        assert_eq!(code, "409", "{op}: {body}");
        assert!(
            body.contains(&id) && body.contains("'edge-signer:gw:g1'"),
            "{op}: {body}"
        );
    }
    assert!(
        !through_proxy(port),
        "a handshake signed with the deleted key"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}

fn percent(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|c| format!("%{}", String::from_utf8_lossy(c)))
        .collect()
}

hsm_shim::token_tests!(
    key_destroy_of_a_served_key_is_refused_and_revoke_ends_its_signatures,
    a_key_deleted_by_another_program_stops_every_path_at_once,
);
