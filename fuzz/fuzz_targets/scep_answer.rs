//! What a SCEP server answers that our code reads: a CertRep (SignedData with the SCEP
//! attributes), the pkcsPKIEnvelope inside it, and certs-only SignedData (GetCACert's CA/RA
//! answer, the issued certificate).
#![no_main]
use edge_signer::issuer::scep::envelope::{read_envelope, recipient};
use edge_signer::issuer::scep::message::{cert_rep, certs_only};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cert_rep(data, &[], true);
    let _ = read_envelope(data);
    let _ = recipient(data);
    let _ = certs_only(data);
});
