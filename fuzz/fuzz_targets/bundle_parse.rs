//! A fleet or trust bundle as it arrives (spool file, MQTT message): parse, read the payload,
//! check the signature against a fixed key. Errors are fine; a panic is a bug.
#![no_main]
use firmware_config::bundle::{Bundle, FleetKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(bundle) = Bundle::parse(data) else {
        return;
    };
    let _ = bundle.payload_str();
    let _ = firmware_config::trust::payload_keys(&bundle);
    let key: Result<FleetKey, _> =
        "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=".parse();
    if let Ok(key) = key {
        let _ = bundle.verify(std::slice::from_ref(&key));
    }
});
