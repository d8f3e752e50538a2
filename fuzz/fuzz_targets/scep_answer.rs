//! What a SCEP server answers that our code reads: a CertRep (SignedData with the SCEP
//! attributes) and the pkcsPKIEnvelope inside it.
#![no_main]
use edge_signer::issuer::scep::message::{cert_rep, read_envelope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cert_rep(data, &[]);
    let _ = read_envelope(data);
});
