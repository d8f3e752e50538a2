//! The register as read back from disk after a power cut or a bad edit.
#![no_main]
use edge_signer::register::RegisterFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = RegisterFile::parse(std::path::Path::new("register.json"), data);
});
