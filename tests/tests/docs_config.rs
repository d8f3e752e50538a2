//! Every TOML example in docs/config.md is a configuration the agent reads: its fields
//! exist and have the types the page says (a renamed or dropped field fails here).

use std::path::Path;

#[test]
fn every_toml_example_in_the_configuration_page_parses() {
    let page =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md"))
            .unwrap();
    let blocks: Vec<&str> = page
        .split("```toml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    assert!(blocks.len() >= 2, "the page has its examples");
    for b in blocks {
        let r: Result<firmware_config::Config, _> = toml::from_str(b);
        assert!(r.is_ok(), "{b}\n{:?}", r.err());
    }
}
