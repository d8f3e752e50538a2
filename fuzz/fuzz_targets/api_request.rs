//! Bodies sent to the signing API (sign and JWS requests, the rotation-shape check) and the request line the policy gate reads, parsed and checked as the daemon
//! does before anything reaches the token.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edge_signer::serve::requests::parse("sign", data);
    let _ = edge_signer::serve::requests::parse("jws", data);
    let _ = edge_signer::serve::requests::parse("rotation", data);
    if let Ok(path) = std::str::from_utf8(data) {
        let _ = edge_signer::serve::gate::operation("POST", path);
    }
});
