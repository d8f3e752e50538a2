//! The local signing API through the real binary: curl over the Unix socket, signatures
//! checked by openssl, the policy by a second uid, hostile clients, 1,000 concurrent requests.

use base64::Engine as _;
use edge_signer_tests::serving::ok_body_len;
use edge_signer_tests::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Identities gw (P-256), p384 and rsa, the API on api.sock for this uid.
fn api_env(kind: TokenKind) -> (Env, Guard, PortalCa) {
    let env = Env::on(kind);
    env.make_ca("ca");
    env.serving_config(
        "1d",
        &format!(
            r#"
[[identity]]
name = "p384"
key_type = "ec-p384"
subject = {{ cn = "gw-0042-p384" }}
issuer = "portal"
overlap = "1d"

[[identity]]
name = "rsa"
key_type = "rsa-2048"
subject = {{ cn = "gw-0042-rsa" }}
issuer = "portal"
overlap = "1d"

[api]
enabled = true
socket = "{{p}}/api.sock"
max_request_bytes = 4096
max_concurrent_per_caller = 64
header_timeout = "2s"

[[api.allow]]
uids = [{uid}]
identities = ["*"]
operations = ["list", "chain", "sign", "jws", "metrics", "status"]
"#,
            uid = my_uid()
        ),
    );
    let ca = env.portal_ca(CaMode::Good);
    let daemon = env.daemon();
    for name in ["gw", "p384", "rsa"] {
        env.wait_current(name, 1);
    }
    env.wait_log("signing API listening");
    // The serving pairs follow the register after the engine's pass.
    let start = Instant::now();
    loop {
        let out = env.curl("api.sock", "/v1/identities", &[]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v.as_array()
            .is_some_and(|a| a.len() == 3 && a.iter().all(|i| i["state"] == "serving"))
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    (env, daemon, ca)
}

fn post(env: &Env, path: &str, body: &str) -> (String, serde_json::Value) {
    std::fs::write(env.path("req.json"), body).unwrap();
    let out = env.curl(
        "api.sock",
        path,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data-binary",
            "@req.json",
            "-w",
            "\n%{http_code}",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
    (
        code.to_owned(),
        serde_json::from_str(body).unwrap_or_default(),
    )
}

/// On SoftHSM signatures run inline on the API's workers; on the TPM (milliseconds each)
/// they go to the blocking pool: both paths are checked.
fn signatures_verify_with_openssl_for_each_key_type_over_data_and_digest(kind: TokenKind) {
    let (env, _d, _ca) = api_env(kind);
    let msg = b"settle batch 2026-11-29 #0042";
    std::fs::write(env.path("msg.bin"), msg).unwrap();
    let pss = [
        "-sigopt",
        "rsa_padding_mode:pss",
        "-sigopt",
        "rsa_pss_saltlen:-1",
    ];
    let cases: [(&str, &str, &str, &[&str]); 4] = [
        ("gw", "ES256", "-sha256", &[]),
        ("p384", "ES384", "-sha384", &[]),
        ("rsa", "RS256", "-sha256", &[]),
        ("rsa", "PS256", "-sha256", &pss),
    ];
    for (ident, alg, dgst, opts) in cases {
        let chain = env.curl(
            "api.sock",
            &format!("/v1/identities/{ident}/chain"),
            &["-o", "chain.pem"],
        );
        assert!(chain.status.success());
        let pubkey = env.openssl(&["x509", "-in", "chain.pem", "-pubkey", "-noout"]);
        std::fs::write(env.path("pub.pem"), pubkey).unwrap();
        let digest = match dgst {
            "-sha384" => ring::digest::digest(&ring::digest::SHA384, msg),
            _ => ring::digest::digest(&ring::digest::SHA256, msg),
        };
        for body in [
            format!(r#"{{"alg":"{alg}","data":"{}"}}"#, B64.encode(msg)),
            format!(
                r#"{{"alg":"{alg}","digest":"{}"}}"#,
                B64.encode(digest.as_ref())
            ),
        ] {
            let (code, v) = post(&env, &format!("/v1/identities/{ident}/sign"), &body);
            if kind == TokenKind::Tpm && alg == "RS256" && body.contains("digest") {
                // tpm2-pkcs11 signs a bare digest with PKCS#1 v1.5 only through raw RSA
                // decryption, which the agent's sign-only keys refuse: a clear 422.
                assert_eq!(code, "422", "{v}");
                let e = v["error"].as_str().unwrap();
                assert!(e.contains("send the data instead of a digest"), "{e}");
                continue;
            }
            assert_eq!(code, "200", "{ident} {alg} {body}: {v}");
            let sig = B64.decode(v["signature"].as_str().unwrap()).unwrap();
            std::fs::write(env.path("sig.bin"), sig).unwrap();
            let mut args = vec!["dgst", dgst, "-verify", "pub.pem", "-signature", "sig.bin"];
            args.extend_from_slice(opts);
            args.push("msg.bin");
            let out = env.openssl(&args);
            assert!(out.contains("Verified OK"), "{ident} {alg} {body}: {out}");
        }
    }
    // A compact JWS with the identity's key.
    let (code, v) = post(
        &env,
        "/v1/identities/gw/jws",
        r#"{"payload":{"amount":42}}"#,
    );
    assert_eq!(code, "200", "{v}");
    assert_eq!(v["jws"].as_str().unwrap().split('.').count(), 3);
}

#[test]
fn refusals_are_clear_and_hostile_clients_stall_nobody() {
    let (env, _d, _ca) = api_env(TokenKind::SoftHsm);
    // An unlisted uid: 403 with the reason, not a dropped socket.
    let out = env.curl_as_nobody(
        "api.sock",
        "/v1/identities/gw/chain",
        &["-w", "\n%{http_code}"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("403") && text.contains("uid 65534") && text.contains("may not chain"),
        "{text}"
    );
    // Malformed, unknown algorithm, oversized.
    let (code, v) = post(&env, "/v1/identities/gw/sign", "{not json");
    assert_eq!(code, "400", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("bad sign request"),
        "{v}"
    );
    let (code, v) = post(
        &env,
        "/v1/identities/gw/sign",
        r#"{"alg":"HS256","data":""}"#,
    );
    assert_eq!(code, "400");
    assert!(v["error"].as_str().unwrap().contains("ES256"), "{v}");
    // The agent's own check is not passed off as the token's refusal.
    let (code, v) = post(
        &env,
        "/v1/identities/rsa/sign",
        r#"{"alg":"ES256","data":"aGk="}"#,
    );
    assert_eq!(code, "400", "{v}");
    assert!(
        !v["error"].as_str().unwrap().contains("token refused"),
        "{v}"
    );
    // JSON only, and said so: 415 without the content type.
    let out = env.curl(
        "api.sock",
        "/v1/identities/gw/sign",
        &[
            "-X",
            "POST",
            "--data-binary",
            r#"{"alg":"ES256","data":"aGk="}"#,
            "-H",
            "Content-Type: text/plain",
            "-w",
            "\n%{http_code}",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("415") && text.contains("application/json"),
        "{text}"
    );
    let big = format!(r#"{{"alg":"ES256","data":"{}"}}"#, "A".repeat(8000));
    let (code, _) = post(&env, "/v1/identities/gw/sign", &big);
    assert_eq!(code, "413");
    // A slow client that never finishes its headers.
    let mut slow = UnixStream::connect(env.path("api.sock")).unwrap();
    slow.write_all(b"POST /v1/identities/gw/sign HTTP/1.1\r\nHost: edge\r\n")
        .unwrap();
    let t = Instant::now();
    let out = env.curl(
        "api.sock",
        "/v1/identities",
        &["-o", "/dev/null", "-w", "%{http_code}"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "others are served meanwhile"
    );
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "the slow client is cut off after header_timeout"
    );
}

/// One keep-alive HTTP/1.1 request on `s`; returns the body.
fn request(s: &mut UnixStream, body: &str) -> String {
    let request = format!(
        "POST /v1/identities/gw/sign HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let mut b = vec![0u8; ok_body_len(&head)];
    s.read_exact(&mut b).unwrap();
    String::from_utf8(b).unwrap()
}

#[test]
fn a_thousand_concurrent_requests_on_fifty_connections_all_sign_right() {
    let (env, _d, _ca) = api_env(TokenKind::SoftHsm);
    env.curl("api.sock", "/v1/identities/gw/chain", &["-o", "chain.pem"]);
    let spki_pem = env.openssl(&["x509", "-in", "chain.pem", "-pubkey", "-noout"]);
    let b64: String = spki_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let spki = B64.decode(b64).unwrap();
    let point = spki[spki.len() - 65..].to_vec();
    let sock = env.path("api.sock");
    let t = Instant::now();
    let workers: Vec<_> = (0..50)
        .map(|c| {
            let (sock, point) = (sock.clone(), point.clone());
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&sock).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                for i in 0..20 {
                    let msg = format!("message {c}/{i}");
                    let body = format!(r#"{{"alg":"ES256","data":"{}"}}"#, B64.encode(&msg));
                    let v: serde_json::Value =
                        serde_json::from_str(&request(&mut s, &body)).unwrap();
                    let sig = B64.decode(v["signature"].as_str().unwrap()).unwrap();
                    ring::signature::UnparsedPublicKey::new(
                        &ring::signature::ECDSA_P256_SHA256_ASN1,
                        &point,
                    )
                    .verify(msg.as_bytes(), &sig)
                    .unwrap_or_else(|_| panic!("signature of {msg} verifies"));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    eprintln!("1000 signatures over 50 connections in {:?}", t.elapsed());
    assert_metrics_count_signatures(&env, 1000.0);
}

/// The metrics parse as Prometheus text, name the issue's series and count `signed_ok` signatures.
fn assert_metrics_count_signatures(env: &Env, signed_ok: f64) {
    let text = env.metrics_text();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    let names: std::collections::BTreeSet<&str> =
        scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for m in [
        "edge_signer_certificate_not_after_timestamp_seconds",
        "edge_signer_api_requests_total",
        "edge_signer_token_signature_seconds",
        "edge_signer_renewal_attempts_total",
    ] {
        assert!(names.contains(m), "{m} in {names:?}\n{text}");
    }
    let signed = serving::metric_sum(
        &text,
        "edge_signer_api_requests_total",
        &[("op", "sign"), ("result", "ok")],
    );
    assert_eq!(signed, signed_ok, "{text}");
}

hsm_shim::token_tests!(signatures_verify_with_openssl_for_each_key_type_over_data_and_digest);
