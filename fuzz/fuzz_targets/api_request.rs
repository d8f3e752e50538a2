//! Bodies sent to the signing API (sign and JWS requests), parsed and checked as the daemon
//! does before anything reaches the token.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edge_signer::serve::requests::parse("sign", data);
    let _ = edge_signer::serve::requests::parse("jws", data);
});
