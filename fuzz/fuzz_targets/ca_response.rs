//! What a CA answers that our code reads: a Retry-After header, and a PEM chain (portal
//! drop, EST after decoding) checked against an expected key and names.
#![no_main]
use edge_signer::issuer::est::retry_after;
use edge_signer::validate::{parse_chain, validate, Expected};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = retry_after(Some(&text), 1_700_000_000);
    if parse_chain(&text).is_ok() {
        let subject = hsm_shim::csr::Subject(vec![("CN".into(), "gw-0042".into())]);
        let want = Expected {
            spki: &[0x30, 0x00],
            subject: &subject,
            sans: &[],
            usages: &[],
            policy: Default::default(),
        };
        let _ = validate(&text, &[], &[], &want, 1_700_000_000);
    }
});
