//! The `https://` URLs of the CAs and APIs the agent calls (EST, JWK rotation, probes), on
//! `http::Uri`, the URI type hyper already brings: parsed strictly (RFC 3986), no
//! credentials, and path segments percent-encoded when they are appended.
//!
//! Host names are ASCII as they are sent: an internationalised name is written in its
//! `xn--` form. That keeps the IDNA tables (the `url` crate's `idna` and ICU) out of a
//! binary that only ever talks to names an operator configured.

use hyper::http::uri::{Authority, PathAndQuery, Scheme, Uri};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::fmt;

/// Bytes left as they are in an appended path segment: RFC 3986 "unreserved".
/// Everything else, `/`, `?`, `#` and `%` included, is percent-encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// An `https://HOST[:PORT][/PATH][?QUERY]` URL without credentials or fragment (or, for
/// SCEP alone, whose messages carry their own protection, an `http://` one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    plain: bool,
    authority: Authority,
    path_and_query: PathAndQuery,
}

/// Why a text is not a usable URL.
pub type UrlError = String;

impl Url {
    /// Parse `s`, which must be an `https://` URL with a host and without credentials.
    pub fn parse_https(s: &str) -> Result<Url, UrlError> {
        Self::parse(s, false)
    }

    /// Parse `s`, an `https://` or a plain `http://` URL (SCEP: the messages are signed and
    /// encrypted themselves, and CAs serve it over plain HTTP).
    pub fn parse_http_or_https(s: &str) -> Result<Url, UrlError> {
        Self::parse(s, true)
    }

    fn parse(s: &str, plain_ok: bool) -> Result<Url, UrlError> {
        if !s.is_ascii() {
            return Err("non-ASCII characters: write the host in its xn-- form and \
                        percent-encode the path"
                .into());
        }
        if s.contains('#') {
            return Err("a fragment (#...) is never sent to a server; remove it".into());
        }
        let uri: Uri = s.parse().map_err(|e| format!("{e}"))?;
        let parts = uri.into_parts();
        let plain = match parts.scheme.as_ref() {
            Some(x) if *x == Scheme::HTTPS => false,
            Some(x) if *x == Scheme::HTTP && plain_ok => true,
            _ if plain_ok => return Err("expected http(s)://HOST[:PORT][/PATH]".into()),
            _ => return Err("expected https://HOST[:PORT][/PATH]".into()),
        };
        let Some(authority) = parts.authority else {
            return Err("no host".into());
        };
        if authority.as_str().contains('@') {
            return Err("credentials in the URL are refused; configure them instead".into());
        }
        if authority.host().is_empty() {
            return Err("no host".into());
        }
        let port_given = authority.as_str().len() > authority.host().len();
        if port_given && authority.port_u16().is_none_or(|p| p == 0) {
            return Err("the port is not a number from 1 to 65535".into());
        }
        // `https://host?q` has an empty path: it is sent as `/?q`, and stored so, so that a
        // printed URL parses back to the same one.
        let path_and_query = match parts.path_and_query {
            Some(pq) if pq.as_str().starts_with('/') => pq,
            Some(pq) => {
                PathAndQuery::try_from(format!("/{}", pq.as_str())).map_err(|e| format!("{e}"))?
            }
            None => PathAndQuery::from_static("/"),
        };
        Ok(Url {
            plain,
            authority,
            path_and_query,
        })
    }

    /// True for an `https://` URL.
    pub fn is_https(&self) -> bool {
        !self.plain
    }

    fn default_port(&self) -> u16 {
        if self.plain {
            80
        } else {
            443
        }
    }

    /// The host as written: an IPv6 address keeps its brackets.
    pub fn host_str(&self) -> &str {
        self.authority.host()
    }

    /// The host to resolve and to name in TLS: an IPv6 address without its brackets.
    pub fn bare_host(&self) -> &str {
        self.host_str()
            .trim_start_matches('[')
            .trim_end_matches(']')
    }

    /// The port, if the URL names one.
    pub fn port(&self) -> Option<u16> {
        self.authority.port_u16()
    }

    /// The port to connect to: the URL's, or 443 (80 for `http://`).
    pub fn port_or_default(&self) -> u16 {
        self.port().unwrap_or(self.default_port())
    }

    /// The path (`/` at least).
    pub fn path(&self) -> &str {
        match self.path_and_query.path() {
            "" => "/",
            p => p,
        }
    }

    /// The query, without its `?`.
    pub fn query(&self) -> Option<&str> {
        self.path_and_query.query()
    }

    /// The request target: the path, and the query if there is one.
    pub fn target(&self) -> String {
        match self.query() {
            Some(q) => format!("{}?{q}", self.path()),
            None => self.path().to_owned(),
        }
    }

    /// The `Host` header: the host, and the port unless it is the scheme's default.
    pub fn host_header(&self) -> String {
        match self.port() {
            Some(p) if p != self.default_port() => format!("{}:{p}", self.host_str()),
            _ => self.host_str().to_owned(),
        }
    }

    /// This URL with `segments` appended to its path, each percent-encoded (a `/` in a
    /// segment stays inside it); a trailing `/` of the path is dropped first, so
    /// `https://ca/est/` + `x` is `https://ca/est/x`. The query is kept.
    pub fn join(&self, segments: &[&str]) -> Url {
        let mut path = self.path().trim_end_matches('/').to_owned();
        for s in segments {
            path.push('/');
            path.extend(utf8_percent_encode(s, SEGMENT));
        }
        if path.is_empty() {
            path.push('/');
        }
        if let Some(q) = self.query() {
            path = format!("{path}?{q}");
        }
        // The path holds only unreserved bytes, `%XX` and `/`, all valid in a path, and the
        // query was valid in the URL this came from: the parse cannot fail (the property test
        // and the https_url fuzz target, both with debug assertions, hold it to that).
        match PathAndQuery::try_from(path) {
            Ok(path_and_query) => Url {
                plain: self.plain,
                authority: self.authority.clone(),
                path_and_query,
            },
            Err(e) => {
                debug_assert!(false, "joined path refused: {e}");
                tracing::error!("{self}: appending {segments:?} made an invalid path ({e}); using the URL as it was");
                self.clone()
            }
        }
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.plain { "http" } else { "https" };
        write!(f, "{scheme}://{}{}", self.authority, self.target())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn urls() {
        let u = Url::parse_https("https://127.0.0.1:8443/health?x=1").unwrap();
        assert_eq!(
            (u.host_str(), u.port(), u.path(), u.query()),
            ("127.0.0.1", Some(8443), "/health", Some("x=1"))
        );
        assert_eq!(u.host_header(), "127.0.0.1:8443");
        assert_eq!(u.to_string(), "https://127.0.0.1:8443/health?x=1");
        let u = Url::parse_https("https://[::1]:9/").unwrap();
        assert_eq!((u.host_str(), u.port()), ("[::1]", Some(9)));
        assert_eq!(u.bare_host(), "::1");
        let u = Url::parse_https("https://gw.example").unwrap();
        assert_eq!((u.port_or_default(), u.path()), (443, "/"));
        assert_eq!(u.host_header(), "gw.example");
        assert_eq!(u.to_string(), "https://gw.example/");
        let u = Url::parse_https("https://gw.example?q=1").unwrap();
        assert_eq!((u.path(), u.query()), ("/", Some("q=1")));
        assert_eq!(Url::parse_https(&u.to_string()), Ok(u));
        assert!(Url::parse_https("HTTPS://gw.example:443/a").is_ok());
        for bad in [
            "http://x",
            "https://",
            "https://a:b/",
            "https://a:0/",
            "https://a:70000/",
            "https://[::1",
            "ftp://a/",
            "https://a/b c",
            "https://a/#frag",
            "https://bücher.example/",
            "/relative",
            "",
        ] {
            assert!(Url::parse_https(bad).is_err(), "{bad}");
        }
        let e = Url::parse_https("https://user:pw@a/").unwrap_err();
        assert!(e.contains("credentials"), "{e}");
    }

    #[test]
    fn plain_http_only_where_asked_for() {
        let u = Url::parse_http_or_https("http://127.0.0.1:8080/scep").unwrap();
        assert!(!u.is_https());
        assert_eq!(
            (u.port_or_default(), u.host_header()),
            (8080, "127.0.0.1:8080".into())
        );
        let u = Url::parse_http_or_https("http://ndes.example/certsrv/mscep/mscep.dll").unwrap();
        assert_eq!(
            (u.port_or_default(), u.host_header()),
            (80, "ndes.example".into())
        );
        assert_eq!(u.to_string(), "http://ndes.example/certsrv/mscep/mscep.dll");
        assert_eq!(
            u.join(&["x"]).to_string(),
            "http://ndes.example/certsrv/mscep/mscep.dll/x"
        );
        assert!(Url::parse_http_or_https("https://a/").unwrap().is_https());
        assert!(Url::parse_http_or_https("ftp://a/").is_err());
        assert!(Url::parse_https("http://a/").is_err());
    }

    #[test]
    fn segments_are_encoded() {
        let base = Url::parse_https("https://ca.example/.well-known/est/").unwrap();
        assert_eq!(
            base.join(&["lab/../x", "simpleenroll"]).to_string(),
            "https://ca.example/.well-known/est/lab%2F..%2Fx/simpleenroll"
        );
        let base = Url::parse_https("https://api.example").unwrap();
        assert_eq!(
            base.join(&["api", "v1", "rotate-to", "a b?c#d%"])
                .to_string(),
            "https://api.example/api/v1/rotate-to/a%20b%3Fc%23d%25"
        );
        assert_eq!(base.join(&["é"]).to_string(), "https://api.example/%C3%A9");
        let base = Url::parse_https("https://api.example/p/?v=2").unwrap();
        assert_eq!(base.join(&["x"]).to_string(), "https://api.example/p/x?v=2");
        assert_eq!(base.join(&[]).to_string(), "https://api.example/p?v=2");
    }

    proptest! {
        #[test]
        fn parsing_and_joining_never_panic_and_joined_segments_survive(
            s in "\\PC{0,60}", seg in "\\PC{0,20}"
        ) {
            let _ = Url::parse_https(&s);
            if let Ok(u) = Url::parse_https(&format!("https://{s}")) {
                let joined = u.join(&[&seg]);
                // What was appended is the last segment, and decodes back to what was given.
                let last = joined.path().rsplit('/').next().unwrap_or_default();
                let decoded = percent_encoding::percent_decode_str(last).decode_utf8_lossy();
                prop_assert_eq!(decoded.as_ref(), seg.as_str());
                // A joined URL is itself a URL this module accepts.
                prop_assert_eq!(Url::parse_https(&joined.to_string()), Ok(joined));
            }
        }
    }
}
