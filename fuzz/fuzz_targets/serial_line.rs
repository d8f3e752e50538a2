//! Bytes from the serial port: split into lines and parsed as commands; a line taken as a
//! technician token and checked.
#![no_main]
use edge_signer::serial::{auth, protocol};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = protocol::LineReader::default();
    r.push(data);
    while let Some(line) = r.next_line() {
        if let protocol::Line::Text(t) = line {
            let _ = protocol::parse(&t);
        }
    }
    if let Ok(token) = std::str::from_utf8(data) {
        let key = "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=".parse();
        if let Ok(key) = key {
            let _ = auth::check(token, &[key], "SN1", "nonce", 1_800_000_000);
        }
    }
});
