//! SCEP against Debian's `scepserver` (micromdm's SCEP server, a CA no one here wrote): the
//! agent's PKCSReq (CSR with the challenge, signed in the token with a transient certificate
//! of its key, enveloped to the CA in AES-256-CBC) is accepted and decodes with openssl; the
//! CertRep's signature verifies with the CA certificate. The server answers in single DES
//! whatever it is sent: refused by default with the reason, opened where `allow_des_answer`
//! says so. Through the binary: first enrolment, renewal (RenewalReq), a wrong challenge,
//! the server down and back, and a kill at each persisted step.

use edge_signer::issuer::scep::envelope::{self, Legacy};
use edge_signer::issuer::scep::message::{self, MessageType, Status};
use edge_signer_tests::scep::{scep_env, ScepServer};

/// What micromdm's scepserver needs: it signs its answers with SHA-1 and encrypts them with
/// single DES, whatever it is sent.
const LEGACY: &str = "allow_legacy_crypto = true\nallow_des_answer = true";
use edge_signer_tests::*;
use hsm_shim::testing::{TestToken, TokenKind};
use hsm_shim::{KeyRef, KeyType, TokenKey};
use std::process::Command;
use x509_cert::der::Decode;

fn http(url: &str, body: Option<&std::path::Path>) -> Vec<u8> {
    let mut c = Command::new("curl");
    c.args(["-sSf", url]);
    if let Some(b) = body {
        c.args([
            "-H",
            "Content-Type: application/x-pki-message",
            "--data-binary",
        ])
        .arg(format!("@{}", b.display()));
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{url}: {out:?}");
    out.stdout
}

#[test]
fn a_pkcsreq_made_in_the_token_is_accepted_and_a_des_answer_is_refused_with_the_reason() {
    let t = TestToken::new_on(TokenKind::SoftHsm);
    let env = Env::new();
    let srv = ScepServer::start(&env, "s3cret");
    let dir = env.dir.path();
    let base = srv.url();
    let caps = String::from_utf8(http(&format!("{base}?operation=GetCACaps"), None)).unwrap();
    assert!(
        caps.contains("AES") && caps.contains("POSTPKIOperation"),
        "{caps}"
    );
    let ca_der = http(&format!("{base}?operation=GetCACert"), None);
    let ca = x509_cert::Certificate::from_der(&ca_der).expect("a bare CA certificate");

    let info = t
        .token
        .generate_key_for(KeyType::Rsa2048, "scep-g1", true)
        .unwrap();
    let key = TokenKey::open(t.token.clone(), &KeyRef::Id(info.id.clone())).unwrap();
    let subject = hsm_shim::csr::Subject::parse("CN=gw-scep").unwrap();
    let csr_pem = hsm_shim::csr::build_csr(&key, &subject, &[]).unwrap();
    let csr_der = message::with_challenge(&pem_der(&csr_pem), &key, "s3cret").unwrap();
    let transient = message::transient_cert(&key, "gw-scep").unwrap();
    let msg = message::pki_message(
        &message::Fields::request(MessageType::PkcsReq, "tid-1", &[9u8; 16]),
        &csr_der,
        &ca,
        false,
        &key,
        &transient,
    )
    .unwrap();
    let rep = send(dir, &base, &msg);
    // scepserver signs its answers with SHA-1: refused unless allow_legacy_crypto says so.
    let err = message::cert_rep(&rep, std::slice::from_ref(&ca), false).unwrap_err();
    assert!(
        err.contains("SHA-1") && err.contains("allow_legacy_crypto"),
        "{err}"
    );
    let r = message::cert_rep(&rep, std::slice::from_ref(&ca), true)
        .expect("a CertRep signed by the CA");
    assert_eq!(r.status, Status::Success, "{r:?}");
    assert_eq!(r.transaction_id, "tid-1");
    assert_eq!(r.recipient_nonce, vec![9u8; 16]);
    let env = r.envelope.unwrap();
    let err = envelope::open_envelope(&env, &key, Legacy::default()).unwrap_err();
    assert!(err.contains("single DES"), "{err}");
    // Where the configuration allows it, it opens in the token: the certificate is ours.
    let allow = Legacy {
        triple_des: false,
        single_des: true,
    };
    let content = envelope::open_envelope(&env, &key, allow).unwrap();
    let certs = message::certs_only(&content).unwrap();
    let spki =
        x509_cert::der::Encode::to_der(&certs[0].tbs_certificate.subject_public_key_info).unwrap();
    assert_eq!(spki, info.spki);
    // A CA without AES gets 3DES (where allow_legacy_crypto says so); scepserver reads it.
    let msg = message::pki_message(
        &message::Fields::request(MessageType::PkcsReq, "tid-2", &[8u8; 16]),
        &csr_der,
        &ca,
        true,
        &key,
        &transient,
    )
    .unwrap();
    let r = message::cert_rep(&send(dir, &base, &msg), std::slice::from_ref(&ca), true).unwrap();
    assert_eq!(r.status, Status::Success, "{r:?}");
}

/// POST `msg` as a PKIOperation (after checking that openssl decodes it, so a reader can see
/// what goes on the wire); the answer.
fn send(dir: &std::path::Path, base: &str, msg: &[u8]) -> Vec<u8> {
    std::fs::write(dir.join("req.der"), msg).unwrap();
    let printed = Command::new("openssl")
        .args([
            "cms", "-inform", "DER", "-in", "req.der", "-cmsout", "-print",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.contains("pkcs7-signedData") || printed.contains("signedData"),
        "{printed}"
    );
    http(
        &format!("{base}?operation=PKIOperation"),
        Some(&dir.join("req.der")),
    )
}

/// The leaf of `chain` names CN `cn` and verifies with openssl to the scepserver's CA.
fn assert_issued_by_scep_ca(env: &Env, chain: &str, cn: &str) {
    let leaf = chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap();
    std::fs::write(env.path("leaf.pem"), leaf).unwrap();
    let subject = env.openssl(&["x509", "-in", "leaf.pem", "-noout", "-subject"]);
    assert!(subject.contains(&format!("CN = {cn}")), "{subject}");
    let out = env.openssl(&[
        "verify",
        "-CAfile",
        &env.path_str("scep-ca.pem"),
        "leaf.pem",
    ]);
    assert!(out.contains("leaf.pem: OK"), "{out}");
}

#[test]
fn first_enrolment_with_the_challenge_then_renewal_with_the_current_certificate() {
    let (env, _srv) = scep_env("gw-scep-1", "s3cret", LEGACY);
    let out = env.run(&["enroll", "gw", "--timeout", "60"]);
    assert!(out.status.success(), "{out:?}");
    // Tests log at trace level: the challenge is in no line of it.
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("s3cret"), "{text}");
    let g1 = env.generation("gw", 1);
    assert!(
        g1.submission().unwrap().starts_with("PKCSReq:"),
        "{:?}",
        g1.submission()
    );
    assert_issued_by_scep_ca(&env, g1.chain_pem().unwrap(), "gw-scep-1");
    // The register never holds the challenge (the CSR sent is built at each send).
    let reg = std::fs::read_to_string(env.path("state/register.json")).unwrap();
    assert!(!reg.contains("s3cret"));
    env.ok(&["rotate", "gw", "--now", "--timeout", "60"]);
    let rec = env.record("gw");
    assert_eq!(rec.current, Some(2), "{rec:?}");
    let g2 = env.generation("gw", 2);
    assert!(
        g2.submission().unwrap().starts_with("RenewalReq:"),
        "the CA says Renewal: {:?}",
        g2.submission()
    );
    assert_ne!(
        g1.key_id_hex(),
        g2.key_id_hex(),
        "a fresh key at every renewal"
    );
    assert_issued_by_scep_ca(&env, g2.chain_pem().unwrap(), "gw-scep-1");
    // SCEP has no revocation message: revoke changes the register and the token only.
    let out = env.ok(&["revoke", "gw", "--generation", "1"]);
    assert!(!out.contains("CA"), "nothing is said to the CA: {out}");
    let g1_key = g1.key_id_hex().unwrap();
    assert!(
        !env.pkcs11_objects().contains(&g1_key),
        "the key is destroyed"
    );
}

#[test]
fn a_wrong_challenge_is_refused_with_the_servers_fail_info() {
    let (env, _srv) = scep_env("gw-scep-2", "not-it", LEGACY);
    let out = env.run(&["enroll", "gw", "--timeout", "6"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("failInfo badRequest (2)"), "{text}");
    assert!(
        !text.contains("not-it"),
        "the challenge is never shown: {text}"
    );
    let g1 = env.generation("gw", 1);
    assert_eq!(
        g1.status,
        edge_signer::register::GenStatus::Failed,
        "{g1:?}"
    );
}

#[test]
fn by_default_the_servers_sha1_and_single_des_answers_are_refused_with_the_reason() {
    let (env, _srv) = scep_env("gw-scep-3", "s3cret", "");
    let out = env.run(&["enroll", "gw", "--timeout", "4"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("signed with SHA-1: refused"), "{text}");
    env.edit_defaults(|c| {
        c.replace(
            "kind = \"scep\"\n",
            "kind = \"scep\"\nallow_legacy_crypto = true\n",
        )
    });
    let out = env.run(&["enroll", "gw", "--timeout", "4"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("single DES"), "{text}");
    assert!(text.contains("allow_des_answer"), "{text}");
}

#[test]
fn an_ec_key_and_a_missing_challenge_file_are_named_by_config_check() {
    let (env, _srv) = scep_env("gw-scep-4", "s3cret", "");
    let rsa = "key_type = \"rsa-2048\"";
    env.edit_defaults(|c| c.replace(rsa, "key_type = \"ec-p256\""));
    let out = env.run(&["config", "check", &env.path_str("defaults.toml")]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("identity[0].key_type"), "{text}");
    assert!(text.contains("must be RSA"), "{text}");
    // An RSA key, but the challenge file is gone: named by its field (never its content).
    env.edit_defaults(|c| c.replace("key_type = \"ec-p256\"", rsa));
    std::fs::remove_file(env.path("scep-challenge")).unwrap();
    let out = env.run(&["config", "check", &env.path_str("defaults.toml")]);
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("issuer[0].challenge.file"), "{text}");
}

#[test]
fn the_server_down_between_request_and_answer_is_retried_and_then_enrols() {
    let (env, mut srv) = scep_env("gw-scep-5", "s3cret", LEGACY);
    srv.stop();
    let out = env.run(&["enroll", "gw", "--timeout", "4"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("unreachable"), "{text}");
    srv.resume();
    env.ok(&["enroll", "gw", "--timeout", "60"]);
    let g1 = env.generation("gw", 1);
    assert_issued_by_scep_ca(&env, g1.chain_pem().unwrap(), "gw-scep-5");
    // Stopped and started again after the first answer: the renewal goes through as well.
    srv.stop();
    srv.resume();
    env.ok(&["rotate", "gw", "--now", "--timeout", "60"]);
    assert_eq!(env.record("gw").current, Some(2));
}

/// `kill -9` right after each step that is persisted; the next run resumes the same
/// generation and transaction (the transaction id is the hash of its key). scepserver
/// answers at once, so its certificate is on disk with the submission (`issued`); a
/// `submitted` step alone is a PENDING answer (`a_pending_request_is_polled_after_a_restart`).
#[test]
fn a_kill_at_each_persisted_step_resumes_the_same_transaction() {
    let (env, _srv) = scep_env("gw-scep-6", "s3cret", LEGACY);
    env.ok(&["enroll", "gw", "--timeout", "60"]);
    let steps = ["key-pending", "csr-ready", "issued", "validated"];
    env.kill_at_each_step_and_resume("gw", 60, &steps, &[]);
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::{pem::PemObject, CertificateSigningRequestDer};
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

/// RFC 8894 §3.3.2: a PENDING answer is recorded (the wait and the transaction), and the
/// agent polls with CertPoll, also after a restart, until the CA answers SUCCESS; it never
/// sends the PKCSReq again. (scepserver never answers PENDING: `PendingDouble` stands in
/// front of it, see tests/src/scep.rs; it offers no POST, so every message goes by GET.)
#[test]
fn a_pending_request_is_polled_after_a_restart() {
    use edge_signer_tests::scep::PendingDouble;
    let (env, srv) = scep_env("gw-scep-7", "s3cret", LEGACY);
    let double = PendingDouble::start(&srv, 2);
    env.edit_defaults(|c| {
        c.replace(&srv.url(), &double.url()).replace(
            "kind = \"scep\"\n",
            "kind = \"scep\"\npoll_interval = \"1s\"\n",
        )
    });
    // Killed right after the PENDING answer is on disk.
    let out = env
        .cmd()
        .args(["enroll", "gw", "--timeout", "30"])
        .env("EDGE_SIGNER_TEST_KILL_AT", "submitted")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(9), "{out:?}");
    let rec = env.record("gw");
    let waiting = rec.waiting.as_ref().expect("the wait is in the register");
    assert!(waiting.what.contains("pending at the CA"), "{waiting:?}");
    let g1 = env.generation("gw", 1);
    let reference = g1.submission().unwrap().to_owned();
    assert!(reference.starts_with("PKCSReq:"), "{reference}");
    let status = env.ok(&["status"]);
    assert!(status.contains("pending at the CA"), "{status}");
    // The next run polls the same transaction until it is issued.
    env.ok(&["enroll", "gw", "--timeout", "30"]);
    let g1 = env.generation("gw", 1);
    assert_eq!(g1.submission(), Some(reference.as_str()));
    assert_issued_by_scep_ca(&env, g1.chain_pem().unwrap(), "gw-scep-7");
    let seen = double.seen.lock().unwrap().clone();
    assert_eq!(seen, ["19", "20", "20"], "one PKCSReq, then CertPoll");
}

/// Over HTTPS (stunnel4 in front of scepserver, its certificate from another CA named by
/// `server_ca`) the agent enrols; a GetCACert answer that is not the pinned CA (here: the
/// configuration pins another CA, as a server in the middle would look) is refused by name,
/// and the key is kept for the retry.
#[test]
fn over_https_with_server_ca_and_a_getcacert_that_is_not_the_pinned_ca_is_refused() {
    let (env, srv) = scep_env("gw-scep-8", "s3cret", LEGACY);
    env.make_ca("ca");
    env.openssl_leaf("ca", "tls");
    let port = free_port();
    let dir = env.dir.path().display();
    let conf = format!(
        "foreground = yes\npid =\noutput = {dir}/stunnel.log\n[scep]\n\
         accept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{up}\ncert = {dir}/tls.pem\nkey = {dir}/tls.key\n",
        up = srv.port
    );
    std::fs::write(env.path("stunnel.conf"), conf).unwrap();
    let _tls = Guard(
        Command::new("stunnel4")
            .arg(env.path("stunnel.conf"))
            .spawn()
            .expect("stunnel4 (scripts/setup installs it)"),
    );
    wait_port(port);
    env.edit_defaults(|c| {
        c.replace(
            &format!("url = \"{}\"", srv.url()),
            &format!(
                "url = \"https://127.0.0.1:{port}/scep\"\nserver_ca = \"{}\"",
                env.path_str("ca.pem")
            ),
        )
    });
    env.ok(&["enroll", "gw", "--timeout", "60"]);
    assert_issued_by_scep_ca(
        &env,
        env.generation("gw", 1).chain_pem().unwrap(),
        "gw-scep-8",
    );

    env.edit_defaults(|c| {
        c.replace(
            &format!("ca_bundle = \"{}\"", env.path_str("scep-ca.pem")),
            &format!("ca_bundle = \"{}\"", env.path_str("ca.pem")),
        )
    });
    let out = env.run(&["rotate", "gw", "--now", "--timeout", "4"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("GetCACert returned no certificate of ca_bundle"),
        "{text}"
    );
    let g2 = env.generation("gw", 2);
    assert!(
        env.pkcs11_objects().contains(&g2.key_id_hex().unwrap()),
        "the key is kept for the retry"
    );
}

/// GetCACert as a certs-only PKCS#7 (`openssl crl2pkcs7`) of the CA and an RA certificate it
/// issued: the RA is the envelope's recipient. An RA certificate another CA issued, or a CA
/// outside `ca_bundle`, is refused by name.
#[test]
fn a_getcacert_chain_with_an_ra_certificate_is_pinned_to_the_ca() {
    use edge_signer::issuer::scep::client::{ca_certs, Caps};
    let env = Env::new();
    let _srv = ScepServer::start(&env, "s3cret");
    // An RA certificate issued by the scepserver's CA (its key is under an empty password).
    env.openssl(&[
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ra.key",
        "-out",
        "ra.csr",
        "-subj",
        "/CN=scep-ra",
    ]);
    env.openssl(&[
        "x509",
        "-req",
        "-in",
        "ra.csr",
        "-CA",
        "scep/depot/ca.pem",
        "-CAkey",
        "scep/depot/ca.key",
        "-passin",
        "pass:",
        "-set_serial",
        "77",
        "-days",
        "2",
        "-out",
        "ra.pem",
    ]);
    env.make_ca("other");
    env.openssl_leaf("other", "stray");
    let p7 = |certs: &[&str], out: &str| {
        let mut args = vec!["crl2pkcs7", "-nocrl", "-outform", "DER", "-out", out];
        for c in certs {
            args.extend(["-certfile", c]);
        }
        env.openssl(&args);
        std::fs::read(env.path(out)).unwrap()
    };
    let anchors = edge_signer::tlsconf::load_certs(&env.path("scep-ca.pem")).unwrap();
    let good = p7(&["scep-ca.pem", "ra.pem"], "good.p7");
    let info = ca_certs(&good, &anchors, Caps::default()).unwrap();
    assert_eq!(info.certs.len(), 2);
    assert!(info
        .recipient
        .tbs_certificate
        .subject
        .to_string()
        .contains("scep-ra"));
    assert!(!info
        .ca
        .tbs_certificate
        .subject
        .to_string()
        .contains("scep-ra"));

    let stray = p7(&["scep-ca.pem", "stray.pem"], "stray.p7");
    let err = ca_certs(&stray, &anchors, Caps::default()).unwrap_err();
    assert!(err.contains("did not issue"), "{err}");
    let foreign = p7(&["other.pem"], "foreign.p7");
    let err = ca_certs(&foreign, &anchors, Caps::default()).unwrap_err();
    assert!(err.contains("no certificate of ca_bundle"), "{err}");
}

/// A CA that refuses the RenewalReq (it did not issue the current certificate: an identity
/// moved to it) gets a PKCSReq with the challenge in the same attempt, with a warning; the
/// generation is enrolled, not given up.
#[test]
fn a_refused_renewal_falls_back_to_a_pkcsreq_with_the_challenge() {
    use edge_signer_tests::scep::PendingDouble;
    let (env, srv) = scep_env("gw-scep-9", "s3cret", LEGACY);
    let double = PendingDouble::refusing_renewal(&srv);
    env.edit_defaults(|c| c.replace(&srv.url(), &double.url()));
    env.ok(&["enroll", "gw", "--timeout", "30"]);
    let out = env.run(&["rotate", "gw", "--now", "--timeout", "30"]);
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("refused the RenewalReq") && log.contains("sending a PKCSReq"),
        "{log}"
    );
    let g2 = env.generation("gw", 2);
    assert!(g2.submission().unwrap().starts_with("PKCSReq:"), "{g2:?}");
    assert_issued_by_scep_ca(&env, g2.chain_pem().unwrap(), "gw-scep-9");
    let seen = double.seen.lock().unwrap().clone();
    assert_eq!(seen, ["19", "17", "19"]);
}

/// The server issues but its answer is lost (the connection closes after it acted): the
/// agent sends the same request again (same transaction, same key) and enrols with what the
/// second answer carries; the certificate it keeps is for its key and verifies.
#[test]
fn a_lost_answer_is_asked_for_again_with_the_same_transaction() {
    use edge_signer_tests::scep::PendingDouble;
    let (env, srv) = scep_env("gw-scep-10", "s3cret", LEGACY);
    let double = PendingDouble::losing_first_answer(&srv);
    env.edit_defaults(|c| c.replace(&srv.url(), &double.url()));
    let out = env.run(&["enroll", "gw", "--timeout", "30"]);
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("connection closed before message completed"),
        "{log}"
    );
    let g1 = env.generation("gw", 1);
    assert!(g1.submission().unwrap().starts_with("PKCSReq:"), "{g1:?}");
    assert_issued_by_scep_ca(&env, g1.chain_pem().unwrap(), "gw-scep-10");
    assert_eq!(double.seen.lock().unwrap().clone(), ["19", "19"]);
}
