//! hsm-shim against real tokens: each test runs on SoftHSM and on tpm2-pkcs11 over swtpm.

use hsm_shim::jws::{self, JwsAlg};
use hsm_shim::testing::*;
use hsm_shim::tls::sign_alg;
use hsm_shim::{Hash, KeyRef, KeyType, SignAlg, Token, TokenKey, TokenSelector};
use ring::signature::{self, UnparsedPublicKey};

fn spki_bits(k: &TokenKey) -> Vec<u8> {
    k.info().public_bits.clone()
}

fn verifier(kt: KeyType, alg: SignAlg) -> &'static dyn signature::VerificationAlgorithm {
    match (kt, alg) {
        (KeyType::EcP256, SignAlg::Ecdsa { der: true, .. }) => &signature::ECDSA_P256_SHA256_ASN1,
        (KeyType::EcP256, SignAlg::Ecdsa { der: false, .. }) => &signature::ECDSA_P256_SHA256_FIXED,
        (KeyType::EcP384, SignAlg::Ecdsa { der: true, .. }) => &signature::ECDSA_P384_SHA384_ASN1,
        (KeyType::EcP384, SignAlg::Ecdsa { der: false, .. }) => &signature::ECDSA_P384_SHA384_FIXED,
        (_, SignAlg::RsaPss(Hash::Sha256)) => &signature::RSA_PSS_2048_8192_SHA256,
        (_, SignAlg::RsaPss(Hash::Sha384)) => &signature::RSA_PSS_2048_8192_SHA384,
        (_, SignAlg::RsaPss(Hash::Sha512)) => &signature::RSA_PSS_2048_8192_SHA512,
        (_, SignAlg::RsaPkcs1(Hash::Sha256)) => &signature::RSA_PKCS1_2048_8192_SHA256,
        (_, SignAlg::RsaPkcs1(Hash::Sha384)) => &signature::RSA_PKCS1_2048_8192_SHA384,
        (_, SignAlg::RsaPkcs1(Hash::Sha512)) => &signature::RSA_PKCS1_2048_8192_SHA512,
        other => panic!("no verifier for {other:?}"),
    }
}

fn every_key_type_is_sensitive_unextractable_and_signs_verifiably(kind: TokenKind) {
    let t = TestToken::new_on(kind);
    for kt in KeyType::ALL {
        let info = t.token.generate_key(kt, &format!("k-{kt}")).unwrap();
        assert_eq!(info.key_type, kt);
        let p = t.token.private_key_protection(&info.id).unwrap();
        assert!(
            p.sensitive && !p.extractable && p.never_extractable,
            "{kt}: {p:?}"
        );
        assert_eq!(
            p.secret_attrs_readable, 0,
            "{kt}: secret attribute readable: {p:?}"
        );
        match kind {
            TokenKind::SoftHsm => {
                assert!(p.secret_attrs_sensitive >= 1, "{kt}: {p:?}");
                assert!(
                    p.set_extractable_refused,
                    "{kt}: CKA_EXTRACTABLE could be set to true"
                );
            }
            // tpm2-pkcs11 has no secret attributes to ask for, and lets CKA_EXTRACTABLE be set
            // to true (a database flag): what keeps the key in is its TPM object.
            TokenKind::Tpm => assert_eq!(p.tpm_object_fixed, Some(true), "{kt}: {p:?}"),
        }

        // Every TLS scheme the key offers verifies with ring against its public key.
        let key = TokenKey::open(t.token.clone(), &KeyRef::Id(info.id.clone())).unwrap();
        let schemes = hsm_shim::TlsSigningKey::schemes(kt);
        // EC: its one curve's scheme; RSA: PSS (TLS 1.3) and PKCS#1 v1.5 (TLS 1.2), 3 hashes each.
        assert_eq!(
            schemes.len(),
            if kt.is_ec() { 1 } else { 6 },
            "{kt}: {schemes:?}"
        );
        let msg = b"TLS 1.3, client CertificateVerify\0transcript hash";
        for s in schemes {
            let alg = sign_alg(*s).unwrap();
            let sig = key.sign(alg, msg).unwrap();
            UnparsedPublicKey::new(verifier(kt, alg), spki_bits(&key))
                .verify(msg, &sig)
                .unwrap_or_else(|_| panic!("{kt} {s:?} signature does not verify"));
        }
        // Looked up again by label, the key is the same one.
        assert_eq!(
            t.token
                .find_key(&KeyRef::Label(format!("k-{kt}")))
                .unwrap()
                .id,
            info.id
        );
    }
    assert_eq!(t.token.list_keys().unwrap().len(), 4);
}

fn jws_es256_verifies_with_ring(kind: TokenKind) {
    let t = TestToken::new_on(kind);
    let info = t.token.generate_key(KeyType::EcP256, "jws").unwrap();
    let key = TokenKey::open(t.token.clone(), &KeyRef::Id(info.id)).unwrap();
    let compact = jws::sign_compact(&key, JwsAlg::Es256, "kid-1", br#"{"hello":"world"}"#).unwrap();
    let parts: Vec<&str> = compact.split('.').collect();
    assert_eq!(parts.len(), 3);
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header: serde_json::Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], "kid-1");
    let sig = b64.decode(parts[2]).unwrap();
    assert_eq!(sig.len(), 64, "ES256 is raw r||s");
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, spki_bits(&key))
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .expect("JWS verifies");
    assert!(jws::sign_compact(&key, JwsAlg::Rs256, "k", b"x").is_err());
}

/// Two threads share one key: SoftHSM 10,000 signatures each (or
/// `EDGE_SIGNER_TEST_SIGNATURES`: scripts/cross asks for 2,000 under qemu, which emulates
/// the token's arithmetic at a tenth of native speed); a TPM (a few hundred a second) 300 each.
fn two_threads_sign_concurrently(kind: TokenKind) {
    let t = TestToken::new_on(kind);
    let info = t.token.generate_key(KeyType::EcP256, "busy").unwrap();
    let key = TokenKey::open(t.token.clone(), &KeyRef::Id(info.id)).unwrap();
    let alg = SignAlg::Ecdsa {
        hash: Hash::Sha256,
        der: true,
    };
    let n: u32 = match kind {
        TokenKind::SoftHsm => std::env::var("EDGE_SIGNER_TEST_SIGNATURES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000),
        TokenKind::Tpm => 300,
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|thread| {
                let key = key.clone();
                s.spawn(move || {
                    for i in 0..n {
                        let msg = [thread as u8, (i >> 8) as u8, i as u8];
                        key.sign(alg, &msg)
                            .unwrap_or_else(|e| panic!("thread {thread} signature {i}: {e}"));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("signer thread");
        }
    });
}

fn session_lost_by_logout_is_reopened_and_logged_in_again(kind: TokenKind) {
    let t = TestToken::new_on(kind);
    let info = t.token.generate_key(KeyType::EcP256, "k").unwrap();
    let key = TokenKey::open(t.token.clone(), &KeyRef::Id(info.id)).unwrap();
    let alg = SignAlg::Ecdsa {
        hash: Hash::Sha256,
        der: true,
    };
    key.sign(alg, b"before").unwrap();
    t.token.logout_for_test().unwrap();
    key.sign(alg, b"after logout")
        .expect("signer recovers after the token logged us out");
}

fn certificate_objects_and_destroy_leave_nothing(kind: TokenKind) {
    let t = TestToken::new_on(kind);
    let info = t.token.generate_key(KeyType::EcP256, "with-cert").unwrap();
    let key = TokenKey::open(t.token.clone(), &KeyRef::Id(info.id.clone())).unwrap();
    // A self-signed certificate for the token key, made with rcgen + the token signer.
    let mut params = rcgen::CertificateParams::new(vec!["gw.example".into()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "gw");
    let cert = params
        .self_signed(&hsm_shim::csr::CsrSigner::new(&key))
        .unwrap();
    t.token
        .store_cert(&info.id, "with-cert", cert.der())
        .unwrap();
    assert_eq!(
        t.token.find_cert(&info.id).unwrap().as_deref(),
        Some(cert.der().as_ref())
    );
    assert!(
        t.token
            .find_key(&KeyRef::Id(info.id.clone()))
            .unwrap()
            .has_cert
    );
    // The certificate matches the key for rustls; a foreign certificate does not.
    let ck = hsm_shim::tls::certified_key(
        hsm_shim::TlsSigningKey::new(key.clone()),
        vec![cert.der().clone()],
    );
    assert!(ck.is_ok());
    let other = rcgen::KeyPair::generate().unwrap();
    let foreign = params.self_signed(&other).unwrap();
    let err = hsm_shim::tls::certified_key(
        hsm_shim::TlsSigningKey::new(key),
        vec![foreign.der().clone()],
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");

    assert_eq!(
        t.token.destroy(&info.id).unwrap(),
        3,
        "private, public and certificate objects"
    );
    assert!(matches!(
        t.token.find_key(&KeyRef::Id(info.id.clone())),
        Err(hsm_shim::Error::KeyNotFound(_))
    ));
    assert!(t.token.find_cert(&info.id).unwrap().is_none());
    assert!(
        t.token.destroy(&info.id).is_err(),
        "nothing left to destroy"
    );
}

fn wrong_pin_and_unknown_label_say_what_is_wrong(kind: TokenKind) {
    let t = TestToken::new_on(kind);
    assert!(
        !format!("{:?}", t.token).contains(USER_PIN),
        "PIN in Debug output"
    );
    // Login state is per process: close every session (drop the token) so C_Login really runs.
    let TestToken {
        token,
        module,
        tpm: _tpm,
        dir: _dir,
        ..
    } = t;
    drop(token);
    let t = (module,);
    let e = Token::open(
        &t.0,
        &TokenSelector::Label("test".into()),
        Some(pin("000000")),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("CKR_PIN_INCORRECT") && msg.contains("C_Login"),
        "{msg}"
    );
    assert!(!msg.contains("000000"));
    let e = Token::open(
        &t.0,
        &TokenSelector::Label("nope".into()),
        Some(pin(USER_PIN)),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("'nope' not found") && msg.contains("'test'"),
        "{msg}"
    );
    let by_label = Token::open(
        &t.0,
        &TokenSelector::Label("test".into()),
        Some(pin(USER_PIN)),
    )
    .unwrap();
    let by_serial = Token::open(
        &t.0,
        &TokenSelector::Serial(by_label.serial().into()),
        Some(pin(USER_PIN)),
    )
    .unwrap();
    assert_eq!(by_serial.label(), "test");
}

/// A key made to decrypt (SCEP's key transport) decrypts in the token what openssl
/// encrypted to its public key; a key made to sign only refuses, and an EC key cannot be made
/// to decrypt.
fn an_rsa_key_made_to_decrypt_decrypts_key_transport_and_others_refuse(kind: TokenKind) {
    let t = TestToken::new_on(kind);
    let dir = tempfile::tempdir().unwrap();
    let encrypt_to = |info: &hsm_shim::KeyInfo, secret: &[u8]| -> Vec<u8> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&info.spki);
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n");
        std::fs::write(dir.path().join("pub.pem"), pem).unwrap();
        std::fs::write(dir.path().join("secret"), secret).unwrap();
        let out = std::process::Command::new("openssl")
            .args([
                "pkeyutl", "-encrypt", "-pubin", "-inkey", "pub.pem", "-in", "secret",
            ])
            .args(["-pkeyopt", "rsa_padding_mode:pkcs1"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        out.stdout
    };
    let info = t
        .token
        .generate_key_for(KeyType::Rsa2048, "scep", true)
        .unwrap();
    let key = TokenKey::open(t.token.clone(), &KeyRef::Id(info.id.clone())).unwrap();
    let cek = [7u8; 32];
    let plain = key.decrypt_rsa_pkcs1(&encrypt_to(&info, &cek)).unwrap();
    assert_eq!(&plain[..], &cek[..]);
    let p = t.token.private_key_protection(&info.id).unwrap();
    assert!(p.sensitive && !p.extractable, "{p:?}");

    let signer = t.token.generate_key(KeyType::Rsa2048, "sign-only").unwrap();
    let key = TokenKey::open(t.token.clone(), &KeyRef::Id(signer.id.clone())).unwrap();
    assert!(key.decrypt_rsa_pkcs1(&encrypt_to(&signer, &cek)).is_err());
    assert!(t
        .token
        .generate_key_for(KeyType::EcP256, "ec", true)
        .is_err());
}

hsm_shim::token_tests!(
    every_key_type_is_sensitive_unextractable_and_signs_verifiably,
    an_rsa_key_made_to_decrypt_decrypts_key_transport_and_others_refuse,
    jws_es256_verifies_with_ring,
    two_threads_sign_concurrently,
    session_lost_by_logout_is_reopened_and_logged_in_again,
    certificate_objects_and_destroy_leave_nothing,
    wrong_pin_and_unknown_label_say_what_is_wrong,
);
