//! An RFC 7512 PKCS#11 URI (config files, key.uri, API requests). What parses prints back
//! to a URI that parses to the same thing.
#![no_main]
use hsm_shim::Pkcs11Uri;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(uri) = Pkcs11Uri::parse(text) {
        let _ = uri.describe();
        let again = Pkcs11Uri::parse(&uri.to_string()).expect("a printed URI parses");
        assert_eq!(again, uri);
    }
});
