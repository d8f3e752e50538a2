//! What a device sends back to `edge-signer diag` on the technician's laptop: split into
//! capped lines, read as a banner and as answer lines in text and JSON mode. Whatever is
//! shown must carry no control character (no escape sequence reaches the terminal).
#![no_main]
use edge_signer::serial::client::{banner, reply, Reply};
use edge_signer::serial::protocol::{Line, LineReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = LineReader::with_max(4096);
    for line in r.feed(data) {
        let Line::Text(t) = line else { continue };
        let text = String::from_utf8_lossy(&t);
        let _ = banner(&text);
        for json in [false, true] {
            let shown = match reply(&text, json) {
                Reply::Progress(s) | Reply::Body(s) => s,
                Reply::End { show, .. } => show.unwrap_or_default(),
                Reply::Other => String::new(),
            };
            assert!(
                !shown.chars().any(|c| c.is_control() && c != '\t'),
                "a control character would reach the terminal: {shown:?}"
            );
        }
    }
});
