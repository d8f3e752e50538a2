//! An EST `certs-only` body (/cacerts, /simpleenroll answers).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edge_signer::issuer::est::parse_certs_only(data);
});
