//! A configuration layer (firmware, fleet payload, local file) parsed and resolved.
#![no_main]
use firmware_config::layers::{fleet_scope_errors, resolve, Layer, LayerKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for kind in [LayerKind::Firmware, LayerKind::Fleet, LayerKind::Local] {
        if let Ok(layer) = Layer::parse(kind, "fuzz", text) {
            let _ = fleet_scope_errors(&layer);
            let _ = resolve(std::slice::from_ref(&layer));
        }
    }
});
