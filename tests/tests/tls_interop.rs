//! mTLS with the key in the token, against openssl s_server and s_client, TLS 1.3 and 1.2.

use edge_signer_tests::*;
use std::process::{Command, Stdio};

const TYPES: [&str; 4] = ["ec-p256", "ec-p384", "rsa-2048", "rsa-3072"];

/// A token key with a certificate from the test CA; returns (uri, cert file).
fn token_identity(env: &Env, t: &str) -> (String, String) {
    let uri = env.generate(t, &format!("tls-{t}"));
    let csr = format!("{t}.csr");
    env.ok(&[
        "csr",
        "--key",
        &uri,
        "--subject",
        &format!("O=Acme,CN=gw-{t}"),
        "--san",
        "ip:127.0.0.1",
        "--out",
        &csr,
    ]);
    let cert = format!("{t}.pem");
    env.sign_csr("ca", &csr, &cert);
    (uri, cert)
}

fn client_mtls_against_openssl_s_server_every_key_type_tls13_and_tls12(kind: TokenKind) {
    let env = Env::on(kind);
    env.make_ca("ca");
    env.openssl_leaf("ca", "server");
    for t in TYPES {
        let (uri, cert) = token_identity(&env, t);
        for (version, ours, extra, scheme) in [
            (
                "-tls1_3",
                "1.3",
                vec![],
                if t.starts_with("rsa") {
                    "RSA_PSS"
                } else {
                    "ECDSA"
                },
            ),
            (
                "-tls1_2",
                "1.2",
                vec![],
                if t.starts_with("rsa") {
                    "RSA_PSS"
                } else {
                    "ECDSA"
                },
            ),
            // A TLS 1.2 server that asks only for PKCS#1 v1.5 (or ECDSA) from clients.
            (
                "-tls1_2",
                "1.2",
                vec!["-client_sigalgs", "RSA+SHA256:ECDSA+SHA256:ECDSA+SHA384"],
                if t.starts_with("rsa") {
                    "RSA_PKCS1"
                } else {
                    "ECDSA"
                },
            ),
        ] {
            let (_srv, port) = env.s_server("ca", &[&[version][..], &extra[..]].concat(), None);
            let v = env.json(&[
                "probe",
                "--key",
                &uri,
                "--cert",
                &cert,
                "--ca",
                "ca.pem",
                "--url",
                &format!("https://127.0.0.1:{port}/"),
                "--tls",
                ours,
            ]);
            assert_eq!(v["status"], 200, "{t} {version} {extra:?}: {v}");
            let want = if ours == "1.3" { "TLSv1_3" } else { "TLSv1_2" };
            assert_eq!(v["protocol"], want, "{t}: {v}");
            let used = v["client_signature_scheme"].as_str().unwrap_or_default();
            assert!(
                used.starts_with(scheme),
                "{t} {version} {extra:?}: client signed with {used}"
            );
        }
    }
}

fn token_key_serves_as_server_identity_to_openssl_s_client(kind: TokenKind) {
    let env = Env::on(kind);
    env.make_ca("ca");
    env.openssl_leaf("ca", "client");
    for t in TYPES {
        let (uri, cert) = token_identity(&env, t);
        for version in ["-tls1_3", "-tls1_2"] {
            let port = free_port();
            let server = env
                .cmd()
                .args([
                    "tls-serve",
                    "--key",
                    &uri,
                    "--cert",
                    &cert,
                    "--client-ca",
                    "ca.pem",
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--max-connections",
                    "2",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let _g = Guard(server);
            wait_port(port);
            let out = Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &format!("127.0.0.1:{port}"),
                    "-CAfile",
                    "ca.pem",
                    "-verify_return_error",
                    "-verify_ip",
                    "127.0.0.1",
                    "-cert",
                    "client.pem",
                    "-key",
                    "client.key",
                    "-brief",
                    version,
                ])
                .current_dir(env.dir.path())
                .stdin(Stdio::piped())
                .output_with_input(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            assert!(out.contains("Verification: OK"), "{t} {version}: {out}");
            assert!(out.contains("HTTP/1.1 200 OK"), "{t} {version}: {out}");
        }
    }
}

#[test]
fn certificate_of_another_key_is_refused_before_any_handshake() {
    let env = Env::new();
    env.make_ca("ca");
    let (_uri, cert) = token_identity(&env, "ec-p256");
    let other = env.generate("ec-p256", "other");
    // Nothing listens on the port: a handshake attempt would fail differently.
    let port = free_port();
    let err = env.fails(&[
        "probe",
        "--key",
        &other,
        "--cert",
        &cert,
        "--ca",
        "ca.pem",
        "--url",
        &format!("https://127.0.0.1:{port}/"),
    ]);
    assert!(err.contains("does not match the token key"), "{err}");
    assert!(!err.contains("connect"), "{err}");
}

#[test]
fn probe_exits_non_zero_on_non_2xx_and_on_handshake_failure() {
    let env = Env::new();
    env.make_ca("ca");
    env.openssl_leaf("ca", "server");
    let (uri, cert) = token_identity(&env, "ec-p256");
    // A server that trusts another CA refuses our client certificate at the handshake.
    env.make_ca("other-ca");
    let (_g, port) = env.s_server("other-ca", &[], None);
    let out = env.run(&[
        "probe",
        "--key",
        &uri,
        "--cert",
        &cert,
        "--ca",
        "ca.pem",
        "--url",
        &format!("https://127.0.0.1:{port}/"),
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A 503 from a TLS server (socat + OpenSSL) that accepts us: exit 1 with the status shown.
    std::fs::write(
        env.path("response.http"),
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    // The request is read to its blank line first: a server that closes with the request
    // unread makes the kernel reset the connection, and the answer may never arrive.
    std::fs::write(
        env.path("answer.sh"),
        "cr=$(printf '\\r')\n\
         while IFS= read -r l; do [ \"$l\" = \"$cr\" ] || [ -z \"$l\" ] && break; done\n\
         cat response.http\n",
    )
    .unwrap();
    let port = free_port();
    let child = Command::new("socat")
        .args([
            &format!("OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert=server.pem,key=server.key,cafile=ca.pem,verify=1"),
            "SYSTEM:sh answer.sh",
        ])
        .current_dir(env.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _g2 = Guard(child);
    wait_port(port);
    let out = env.run(&[
        "probe",
        "--key",
        &uri,
        "--cert",
        &cert,
        "--ca",
        "ca.pem",
        "--url",
        &format!("https://127.0.0.1:{port}/"),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("status 503"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

trait OutputWithInput {
    fn output_with_input(&mut self, input: &[u8]) -> String;
}

impl OutputWithInput for Command {
    fn output_with_input(&mut self, input: &[u8]) -> String {
        use std::io::Write;
        let mut child = self
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(input);
            // s_client keeps the connection while stdin is open; give the reply time to arrive.
            std::thread::sleep(std::time::Duration::from_millis(800));
        }
        let out = child.wait_with_output().expect("wait");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

// Each runs on SoftHSM and on tpm2-pkcs11 over swtpm.
hsm_shim::token_tests!(
    client_mtls_against_openssl_s_server_every_key_type_tls13_and_tls12,
    token_key_serves_as_server_identity_to_openssl_s_client,
);
