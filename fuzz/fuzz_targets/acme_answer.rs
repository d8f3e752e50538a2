//! What an ACME CA answers that our code reads: problem documents, `Link` headers, order
//! and authorization objects; and the CSR names an order is made for.
#![no_main]
use edge_signer::issuer::acme::client::{alternates, problem, Answer};
use edge_signer::issuer::acme::{csr_identifiers, failed_challenge};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    let a = Answer {
        status: 400,
        location: None,
        links: vec![text.clone()],
        retry_after: None,
        body: data.to_vec(),
    };
    let _ = problem(&a);
    let _ = alternates(&a.links);
    if let Ok(v) = a.json() {
        let _ = failed_challenge(&v, "gw.example");
    }
    let _ = csr_identifiers(&text);
});
