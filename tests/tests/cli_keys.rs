//! Keys, CSRs and destroy through the CLI, checked with openssl and pkcs11-tool.

use edge_signer_tests::*;

const TYPES: [&str; 4] = ["ec-p256", "ec-p384", "rsa-2048", "rsa-3072"];

fn csr_of_every_key_type_passes_openssl_verify_with_subject_and_sans(kind: TokenKind) {
    let env = Env::on(kind);
    for t in TYPES {
        let uri = env.generate(t, &format!("id-{t}"));
        let csr = format!("{t}.csr");
        let out = env.json(&[
            "csr",
            "--key",
            &uri,
            "--subject",
            "O=Acme Payments,OU=Gateways,CN=gw-0042",
            "--san",
            "dns:gw-0042.edge.example",
            "--san",
            "ip:10.20.30.40",
            "--san",
            "ip:fd00::42",
            "--out",
            &csr,
        ]);
        assert_eq!(out["subject"], "O=Acme Payments,OU=Gateways,CN=gw-0042");
        let text = env.openssl(&["req", "-in", &csr, "-verify", "-noout", "-text"]);
        assert!(text.contains("verify OK"), "{t}: {text}");
        assert!(
            text.contains("O=Acme Payments, OU=Gateways, CN=gw-0042")
                || text.contains("O = Acme Payments, OU = Gateways, CN = gw-0042"),
            "{t}: {text}"
        );
        assert!(text.contains("DNS:gw-0042.edge.example"), "{t}: {text}");
        assert!(text.contains("IP Address:10.20.30.40"), "{t}: {text}");
        assert!(
            text.contains("IP Address:FD00:0:0:0:0:0:0:42"),
            "{t}: {text}"
        );
        let expect_alg = if t.starts_with("ec") {
            "ecdsa-with-SHA"
        } else {
            "sha256WithRSAEncryption"
        };
        assert!(text.contains(expect_alg), "{t}: {text}");
        // The CSR carries the token key's public key.
        let key_pem = env
            .json(&["key", "list"])
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["uri"] == uri.as_str())
            .unwrap()["public_key_pem"]
            .as_str()
            .unwrap()
            .to_owned();
        let csr_pub = env.openssl(&["req", "-in", &csr, "-noout", "-pubkey"]);
        assert_eq!(csr_pub.trim(), key_pem.trim(), "{t}");
    }
}

fn generated_keys_show_in_pkcs11_tool_and_destroy_leaves_nothing(kind: TokenKind) {
    let env = Env::on(kind);
    if kind == TokenKind::Tpm {
        // The token really is the simulated TPM (tpm2-pkcs11 reports its model).
        let tokens = env.json(&["token", "list"]);
        assert!(tokens.to_string().contains("TPM"), "{tokens}");
    }
    let keep = env.generate("ec-p256", "keep-me");
    let gone = env.generate("rsa-2048", "destroy-me");
    let objects = env.pkcs11_objects();
    assert!(
        objects.contains("destroy-me") && objects.contains("keep-me"),
        "{objects}"
    );
    // pkcs11-tool shows the private key as sensitive and never extractable.
    let block = objects_of(&objects)
        .into_iter()
        .find(|b| b.starts_with("Private Key Object") && b.contains("destroy-me"))
        .unwrap();
    assert!(
        block.contains("sensitive") && block.contains("never extractable"),
        "{block}"
    );

    let keys = env.json(&["key", "list"]);
    let id_hex = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["uri"] == gone.as_str())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        objects_of(&objects)
            .iter()
            .filter(|b| b.contains(&id_hex))
            .count(),
        2,
        "{objects}"
    );
    let out = env.json(&["key", "destroy", &gone]);
    assert_eq!(out["destroyed"], 2);
    let objects = env.pkcs11_objects();
    assert!(
        !objects.contains(&format!("ID:         {id_hex}")) && !objects.contains(&id_hex),
        "{objects}"
    );
    assert!(!objects.contains("destroy-me"), "{objects}");
    assert!(objects.contains("keep-me"), "{objects}");
    // Destroying again says there is no such key.
    let err = env.fails(&["key", "destroy", &gone]);
    assert!(err.contains("no key") && err.contains("key list"), "{err}");
    let _ = keep;
}

#[test]
fn person_facing_errors_say_what_to_do() {
    let env = Env::new();
    std::fs::write(env.path("bad-pin"), "000000\n").unwrap();
    let err = env.fails(&["--pin-file", &env.path_str("bad-pin"), "key", "list"]);
    assert!(
        err.contains("CKR_PIN_INCORRECT") && err.contains("wrong PIN"),
        "{err}"
    );
    assert!(!err.contains("000000"), "{err}");

    let err = env.fails(&["--token", "no-such-token", "key", "list"]);
    assert!(
        err.contains("'no-such-token' not found") && err.contains(LABEL),
        "{err}"
    );

    let err = env.fails(&["--module", "/nonexistent/libpkcs11.so", "key", "list"]);
    assert!(
        err.contains("/nonexistent/libpkcs11.so") && err.contains("not found"),
        "{err}"
    );

    let err = env.fails(&[
        "csr",
        "--key",
        "pkcs11:token=gw-test;id=%de%ad;type=private",
        "--subject",
        "CN=x",
        "--out",
        "x.csr",
    ]);
    assert!(err.contains("no key with id dead"), "{err}");

    let err = env.fails(&[
        "csr",
        "--key",
        "pkcs11:id=%zz",
        "--subject",
        "CN=x",
        "--out",
        "x.csr",
    ]);
    assert!(err.contains("invalid pkcs11 URI"), "{err}");

    let err = env.fails(&["key", "generate", "--type", "ec-p521", "--label", "x"]);
    assert!(err.contains("ec-p256"), "{err}");

    let out = env
        .cmd()
        .args(["key", "list"])
        .env_remove("EDGE_SIGNER_PIN_FILE")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pin-file"));
}

#[test]
fn token_list_and_json_output() {
    let env = Env::new();
    let tokens = env.json(&["token", "list"]);
    let t = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["label"] == LABEL)
        .expect("our token is listed");
    assert_eq!(t["initialized"], true);
    let k = env.json(&["key", "generate", "--type", "ec-p384", "--label", "j"]);
    assert_eq!(k["type"], "ec-p384");
    assert!(k["uri"]
        .as_str()
        .unwrap()
        .starts_with("pkcs11:token=gw-test;id=%"));
    assert!(k["public_key_pem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PUBLIC KEY-----"));
}

/// pkcs11-tool --list-objects output, one string per object.
fn objects_of(listing: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in listing.lines() {
        if !line.starts_with(char::is_whitespace) || out.is_empty() {
            out.push(String::new());
        }
        if let Some(last) = out.last_mut() {
            last.push_str(line);
            last.push('\n');
        }
    }
    out
}

// Each runs on SoftHSM and on tpm2-pkcs11 over swtpm.
hsm_shim::token_tests!(
    csr_of_every_key_type_passes_openssl_verify_with_subject_and_sans,
    generated_keys_show_in_pkcs11_tool_and_destroy_leaves_nothing,
);

/// `token init` names the slot `token list` shows; `key list` and `token list` take the
/// module, token and PIN from the configuration like every other command.
#[test]
fn token_init_and_list_agree_and_key_list_takes_the_token_from_the_configuration() {
    let env = Env::new();
    std::fs::write(env.path("so2"), "5678\n").unwrap();
    let made = env.json(&[
        "token",
        "init",
        "--label",
        "second",
        "--so-pin-file",
        &env.path_str("so2"),
    ]);
    let listed = env.json(&["token", "list"]);
    let row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["label"] == "second")
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(row["slot"], made["slot"], "{made} vs {listed}");
    // Only the configuration: no --module/--token/--pin-file, no EDGE_SIGNER_* for them.
    env.generate("ec-p256", "from-config");
    env.lifecycle_config("");
    let out = env
        .cmd()
        .env_remove("EDGE_SIGNER_MODULE")
        .env_remove("EDGE_SIGNER_TOKEN")
        .env_remove("EDGE_SIGNER_PIN_FILE")
        .args(["key", "list"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("from-config"),
        "{out:?}"
    );
    let out = env
        .cmd()
        .env_remove("EDGE_SIGNER_MODULE")
        .args(["token", "list"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("second"),
        "{out:?}"
    );
}
