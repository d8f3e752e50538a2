//! SCEP against Debian's `scepserver` (micromdm's SCEP server): the agent's PKCSReq (CSR
//! with the challenge, signed in the token with a transient certificate of its key,
//! enveloped to the CA in AES-256-CBC) is accepted, the CertRep's signature verifies with the
//! CA certificate, and its envelope's cipher is judged (the server answers in single DES,
//! which the agent refuses with the reason).

use edge_signer::issuer::scep::message::{self, MessageType, Status};
use edge_signer_tests::*;
use hsm_shim::testing::{TestToken, TokenKind};
use hsm_shim::{KeyRef, KeyType, TokenKey};
use std::process::{Command, Stdio};
use x509_cert::der::Decode;

/// scepserver with its own CA in `dir`, on a free port, enforcing `challenge`.
fn scep_server(dir: &std::path::Path, challenge: &str) -> (Guard, u16) {
    let ok = Command::new("scepserver")
        .args(["ca", "-init"])
        .current_dir(dir)
        .output()
        .expect("scepserver (scripts/setup installs scep)");
    assert!(ok.status.success(), "{ok:?}");
    let port = free_port();
    let child = Command::new("scepserver")
        .args([
            "-depot",
            "depot",
            "-port",
            &port.to_string(),
            "-challenge",
            challenge,
        ])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("scepserver.log")).unwrap())
        .spawn()
        .unwrap();
    wait_port(port);
    (Guard(child), port)
}

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
    let dir = tempfile::tempdir().unwrap();
    let (_srv, port) = scep_server(dir.path(), "s3cret");
    let base = format!("http://127.0.0.1:{port}/scep");
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
    let csr_pem = hsm_shim::csr::build_csr_with(&key, &subject, &[], Some("s3cret")).unwrap();
    let csr_der = pem_der(&csr_pem);
    let transient = {
        let signer = hsm_shim::csr::CsrSigner::new(&key);
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "gw-scep");
        let c = p.self_signed(&signer).unwrap();
        x509_cert::Certificate::from_der(c.der()).unwrap()
    };
    let msg = message::pki_message(
        MessageType::PkcsReq,
        &csr_der,
        &ca,
        &key,
        &transient,
        "tid-1",
        &[9u8; 16],
    )
    .unwrap();
    std::fs::write(dir.path().join("req.der"), &msg).unwrap();
    // What goes on the wire decodes with openssl.
    let printed = Command::new("openssl")
        .args([
            "cms", "-inform", "DER", "-in", "req.der", "-cmsout", "-print",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.contains("pkcs7-signedData") || printed.contains("signedData"),
        "{printed}"
    );

    let rep = http(
        &format!("{base}?operation=PKIOperation"),
        Some(&dir.path().join("req.der")),
    );
    let r = message::cert_rep(&rep, std::slice::from_ref(&ca)).expect("a CertRep signed by the CA");
    assert_eq!(r.status, Status::Success, "{r:?}");
    assert_eq!(r.transaction_id, "tid-1");
    assert_eq!(r.recipient_nonce, vec![9u8; 16]);
    let err = message::open_envelope(&r.envelope.unwrap(), &key, false).unwrap_err();
    assert!(err.contains("single DES"), "{err}");
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::{pem::PemObject, CertificateSigningRequestDer};
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}
