//! What `edge-signer fleet status` reads from the broker: any topic under the prefix, and
//! the retained `online` / `status` messages that devices publish.
#![no_main]
use edge_signer::fleet::operator::{device_topic, DeviceRow};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First line: the topic; the rest: the payload.
    let (topic, payload) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&data[..0], data),
    };
    let topic = String::from_utf8_lossy(topic);
    let (device, leaf) = device_topic("edge", &topic).unwrap_or(("gw", "status"));
    let mut row = DeviceRow::new(device);
    row.apply(leaf, payload, 1_800_000_000);
    let _ = serde_json::to_string(&row);
});
