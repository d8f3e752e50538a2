//! The `https://` URL of an issuer or a probe (config files, `probe --url`, the JWK API's
//! verify URL). What parses prints back to a URL that parses to the same thing; a segment
//! appended to it stays one segment.
#![no_main]
use edge_signer::url::Url;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (url, segment) = text.split_once('\n').unwrap_or((text, "x"));
    if let Ok(u) = Url::parse_https(url) {
        let again = Url::parse_https(&u.to_string()).expect("a printed URL parses");
        assert_eq!(again, u);
        let joined = u.join(&[segment]);
        let printed = joined.to_string();
        assert_eq!(Url::parse_https(&printed), Ok(joined.clone()), "{printed}");
        assert_eq!(joined.path().matches('/').count(), u.path().trim_end_matches('/').matches('/').count() + 1);
        let _ = (joined.target(), joined.host_header());
    }
});
