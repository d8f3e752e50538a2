//! Stamps the build time (SOURCE_DATE_EPOCH when set, for reproducible builds): the engine
//! takes it as a floor for the clock, since a device without an RTC may boot in 1970.
fn main() {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let t = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() / 86_400 * 86_400)
                .unwrap_or(0)
        });
    println!("cargo:rustc-env=EDGE_SIGNER_BUILD_TIME={t}");
}
