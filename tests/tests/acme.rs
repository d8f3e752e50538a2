//! The ACME issuer against Debian's pebble (a CA no one here wrote), each challenge type
//! answered by the agent itself: first enrolment and rotation, a new token key each time,
//! the chain validated, the account key a token key.

use edge_signer_tests::acme::{acme_config, acme_env, pebble_env, PebbleOptions};
use edge_signer_tests::*;

/// Enrol `web` (`NAME.example`), rotate it, and check what a reader would: two generations,
/// two keys, each certificate issued for the name and verifying with openssl up to the root
/// pebble made at this start.
fn enrol_and_rotate(env: &Env, name: &str) {
    env.ok(&["enroll", "web", "--timeout", "60"]);
    let g1 = env.generation("web", 1);
    assert_chain_verifies(env, g1.chain_pem().expect("a chain"), name);
    env.ok(&["rotate", "web", "--now", "--timeout", "60"]);
    let rec = env.record("web");
    assert_eq!(rec.current, Some(2), "{rec:?}");
    let g2 = env.generation("web", 2);
    assert_ne!(
        g1.key_id_hex(),
        g2.key_id_hex(),
        "a fresh key at every renewal"
    );
    assert_chain_verifies(env, g2.chain_pem().expect("a chain"), name);
    let objects = env.pkcs11_objects();
    assert!(
        objects.contains("edge-signer-acme:acme:account"),
        "{objects}"
    );
    // The account is in the register: its URL and the thumbprint of the key the CA holds.
    let reg = env.register();
    let account = reg
        .accounts
        .get("acme")
        .expect("the account in the register");
    assert!(account.url.contains("/my-account/"), "{account:?}");
    assert_eq!(account.thumbprint.len(), 43, "{account:?}");
}

/// The leaf names `NAME.example` and the chain verifies to pebble's root with openssl.
fn assert_chain_verifies(env: &Env, chain: &str, name: &str) {
    assert_chain_verifies_to(env, chain, name, "acme-root.pem");
}

/// The leaf names `NAME.example` and the chain verifies to the root in `root` (a file of the
/// env) with openssl.
fn assert_chain_verifies_to(env: &Env, chain: &str, name: &str, root: &str) {
    let certs: Vec<&str> = chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .filter(|c| c.contains("BEGIN"))
        .collect();
    assert!(certs.len() >= 2, "leaf and intermediate: {chain}");
    std::fs::write(env.path("leaf.pem"), certs[0]).unwrap();
    std::fs::write(env.path("untrusted.pem"), certs[1..].concat()).unwrap();
    let text = env.openssl(&[
        "x509",
        "-in",
        "leaf.pem",
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    assert!(text.contains(&format!("DNS:{name}.example")), "{text}");
    let root = env.path_str(root);
    let out = env.openssl(&[
        "verify",
        "-CAfile",
        &root,
        "-untrusted",
        "untrusted.pem",
        "leaf.pem",
    ]);
    assert!(out.contains("leaf.pem: OK"), "{out}");
}

#[test]
fn http_01_enrols_and_rotates_against_pebble() {
    let (env, _pebble) = acme_env("web-1", "challenges = [\"http-01\"]");
    enrol_and_rotate(&env, "web-1");
}

#[test]
fn tls_alpn_01_enrols_and_rotates_against_pebble() {
    let (env, _pebble) = acme_env("web-2", "challenges = [\"tls-alpn-01\"]");
    enrol_and_rotate(&env, "web-2");
}

#[test]
fn dns_01_through_the_hook_enrols_and_rotates_against_pebble() {
    let (env, pebble) = pebble_env(PebbleOptions::default());
    let hook = pebble.dns_hook(&env);
    acme_config(
        &env,
        &pebble,
        "web-3",
        &format!("challenges = [\"dns-01\"]\ndns01_hook = \"{hook}\""),
    );
    enrol_and_rotate(&env, "web-3");
    let log = std::fs::read_to_string(env.path("dns-hook.log")).unwrap();
    assert!(log.contains("set _acme-challenge.web-3.example"), "{log}");
    assert!(log.contains("clear _acme-challenge.web-3.example"), "{log}");
}

/// `kill -9` right after each step that is persisted; the next run resumes: after
/// `submitted` it finishes the same order (the register still names the order it made),
/// never opening a second one for the generation.
#[test]
fn a_kill_at_each_persisted_step_resumes_the_same_order() {
    let (env, _pebble) = acme_env("web-4", "");
    env.ok(&["enroll", "web", "--timeout", "60"]);
    let steps = [
        "key-pending",
        "csr-ready",
        "submitted",
        "issued",
        "validated",
    ];
    env.kill_at_each_step_and_resume("web", 60, &steps, &["submitted", "issued", "validated"]);
}

#[test]
fn external_account_binding_is_sent_when_the_ca_requires_it() {
    // 32 bytes, base64url, as a CA hands out an EAB HMAC key.
    let hmac = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let (env, pebble) = pebble_env(PebbleOptions {
        eab: Some(("kid-1".into(), hmac.into())),
        ..Default::default()
    });
    std::fs::write(env.path("eab.key"), format!("{hmac}\n")).unwrap();
    let eab = format!(
        "eab = {{ key_id = \"kid-1\", hmac_file = \"{}\" }}",
        env.path_str("eab.key")
    );
    // Without it, pebble refuses the account and the agent says why.
    acme_config(&env, &pebble, "web-5", "");
    let out = env.run(&["enroll", "web", "--timeout", "5"]);
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("externalAccountRequired") || text.contains("xternal"),
        "{text}"
    );
    acme_config(&env, &pebble, "web-5", &eab);
    env.ok(&["enroll", "web", "--timeout", "60"]);
    // The refused attempt's generation was given up (its key destroyed); the next one serves.
    let rec = env.record("web");
    assert!(rec.current.is_some(), "{rec:?}");
}

/// `revoke` tells the CA (revokeCert signed by the account key in the token) before it
/// destroys the key: pebble's status of the serial says revoked.
#[test]
fn revoke_goes_to_the_ca_as_well_as_the_register() {
    let (env, pebble) = acme_env("web-6", "");
    env.ok(&["enroll", "web", "--timeout", "60"]);
    let serial = env
        .generation("web", 1)
        .cert()
        .expect("certified")
        .serial
        .clone();
    let status = |s: &str| {
        env.curl_https(&format!(
            "https://127.0.0.1:{}/cert-status-by-serial/{s}",
            pebble.management
        ))
    };
    assert!(status(&serial).contains("Valid"), "{}", status(&serial));
    env.ok(&["revoke", "web", "--generation", "1"]);
    assert!(status(&serial).contains("Revoked"), "{}", status(&serial));
    let g = env.generation("web", 1);
    assert_eq!(g.status, edge_signer::register::GenStatus::Revoked);
    assert!(!env.pkcs11_objects().contains(&g.key_id_hex().unwrap()));
}

/// `acme rollover` moves the account to a new token key (keyChange) and destroys the old
/// one; renewals go on under the same account. A kill right after the CA took the new key
/// is finished by the next run: one account key again, the new one.
#[test]
fn account_key_rollover_is_a_command_and_survives_a_kill() {
    use std::os::unix::process::ExitStatusExt;
    let (env, _pebble) = acme_env("web-7", "");
    env.ok(&["enroll", "web", "--timeout", "60"]);
    let before = env.pkcs11_objects();
    let old = env.register().accounts["acme"].clone();
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["acme", "rollover", "acme", "--json"])).unwrap();
    assert!(
        v["thumbprint"].as_str().is_some_and(|t| t.len() == 43),
        "{v}"
    );
    let new = env.register().accounts["acme"].clone();
    assert_eq!(new.url, old.url, "the same account");
    assert_eq!(
        Some(new.thumbprint.as_str()),
        v["thumbprint"].as_str(),
        "the new key's thumbprint, in the register"
    );
    let after = env.pkcs11_objects();
    assert_ne!(before, after);
    assert!(!after.contains("account-next"), "{after}");
    let labels = |o: &str| o.matches("edge-signer-acme:acme:account").count();
    assert_eq!(
        labels(&after),
        labels(&before),
        "one account key pair, not two"
    );
    env.ok(&["rotate", "web", "--now", "--timeout", "60"]);
    assert_eq!(env.record("web").current, Some(2));

    let out = env
        .cmd()
        .args(["acme", "rollover", "acme", "--json"])
        .env("EDGE_SIGNER_TEST_KILL_AT", "acme-keychange")
        .output()
        .unwrap();
    assert_eq!(out.status.signal(), Some(9), "{out:?}");
    assert!(env.pkcs11_objects().contains("account-next"));
    // The next use of the account finishes the rollover: the CA has the new key.
    env.ok(&["retire", "web", "--generation", "1"]);
    env.ok(&["rotate", "web", "--now", "--timeout", "60"]);
    let objects = env.pkcs11_objects();
    assert!(!objects.contains("account-next"), "{objects}");
    assert_eq!(env.record("web").current, Some(3));
}

/// A CA with two roots serves its default chain and an alternate one (`Link:
/// rel="alternate"`); `preferred_chain` names the alternate root and only that chain is
/// accepted (the CA bundle holds that root alone).
#[test]
fn preferred_chain_takes_the_alternate_chain_the_ca_links() {
    let (env, pebble) = pebble_env(PebbleOptions {
        alternate_roots: 1,
        ..Default::default()
    });
    let subject = env.openssl(&[
        "x509",
        "-in",
        "acme-root-1.pem",
        "-noout",
        "-subject",
        "-nameopt",
        "multiline",
    ]);
    let cn = subject
        .lines()
        .find_map(|l| l.trim().strip_prefix("commonName"))
        .map(|v| v.trim().trim_start_matches('=').trim().to_owned())
        .expect("the alternate root's CN");
    let extra = format!("preferred_chain = \"{cn}\"");
    acme_config(&env, &pebble, "web-8", &extra);
    env.edit_defaults(|c| {
        c.replace(
            &env.path_str("acme-root.pem"),
            &env.path_str("acme-root-1.pem"),
        )
    });
    env.ok(&["enroll", "web", "--timeout", "60"]);
    let chain = env.generation("web", 1).chain_pem().unwrap().to_owned();
    assert_chain_verifies_to(&env, &chain, "web-8", "acme-root-1.pem");
}

/// A challenge the CA cannot validate (nothing answers on the port pebble connects to) is
/// named with the CA's reason, and the generation is given up (its key destroyed).
#[test]
fn a_failed_challenge_says_which_and_why() {
    let (env, pebble) = acme_env("web-9", "challenges = [\"http-01\"]");
    let elsewhere = free_port();
    env.edit_defaults(|c| {
        c.replace(
            &format!("http01_listen = \"127.0.0.1:{}\"", pebble.http_port),
            &format!("http01_listen = \"127.0.0.1:{elsewhere}\""),
        )
    });
    let out = env.run(&["enroll", "web", "--timeout", "8"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("ACME http-01 challenge for web-9.example failed:"),
        "{text}"
    );
    let g1 = env.generation("web", 1);
    assert_eq!(
        g1.status,
        edge_signer::register::GenStatus::Failed,
        "{g1:?}"
    );
    assert!(!env.pkcs11_objects().contains(&g1.key_id_hex().unwrap()));
}

/// The account key as the configuration says: P-384 (ES384) and RSA-2048 (RS256) accounts
/// enrol against pebble too, their keys made in the token.
#[test]
fn p384_and_rsa_account_keys_sign_with_es384_and_rs256() {
    for (kt, name) in [("ec-p384", "web-10"), ("rsa-2048", "web-11")] {
        let (env, _pebble) = acme_env(name, &format!("account_key_type = \"{kt}\""));
        env.ok(&["enroll", "web", "--timeout", "60"]);
        assert_eq!(env.record("web").current, Some(1), "{kt}");
        let objects = env.pkcs11_objects();
        // The header line of the private key object whose label is the account's.
        let mut header = "";
        let mut account = None;
        for line in objects.lines() {
            if line.contains("Key Object") {
                header = line;
            } else if line.contains("edge-signer-acme:acme:account")
                && header.starts_with("Private")
            {
                account = Some(header);
            }
        }
        let account = account.unwrap_or_else(|| panic!("{kt}: no account key in {objects}"));
        let want = if kt == "rsa-2048" {
            "Private Key Object; RSA"
        } else {
            "Private Key Object; EC"
        };
        assert!(account.starts_with(want), "{kt}: {account}");
    }
}
