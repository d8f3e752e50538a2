//! RFC 7512 `pkcs11:` URIs, so openssl, p11tool and curl can name the same objects.

use crate::error::{Error, Result};
use std::fmt;

/// The object class in a URI's `type` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectType {
    /// `type=private`
    Private,
    /// `type=public`
    Public,
    /// `type=cert`
    Cert,
}

impl ObjectType {
    fn as_str(self) -> &'static str {
        match self {
            ObjectType::Private => "private",
            ObjectType::Public => "public",
            ObjectType::Cert => "cert",
        }
    }
}

/// A parsed `pkcs11:` URI (the attributes edge-signer uses; others are ignored on parse).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `token=` label.
    pub token: Option<String>,
    /// `serial=` token serial.
    pub serial: Option<String>,
    /// `id=` CKA_ID bytes.
    pub id: Option<Vec<u8>>,
    /// `object=` CKA_LABEL.
    pub object: Option<String>,
    /// `type=`.
    pub object_type: Option<ObjectType>,
    /// `?module-path=`.
    pub module_path: Option<String>,
    /// `?pin-source=` (a file path or URI, never the PIN).
    pub pin_source: Option<String>,
}

fn unhex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

fn pct_decode(s: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (h, l) = match (
                b.get(i + 1).and_then(|c| unhex(*c)),
                b.get(i + 2).and_then(|c| unhex(*c)),
            ) {
                (Some(h), Some(l)) => (h, l),
                _ => return Err(Error::Uri(format!("bad percent escape in '{s}'"))),
            };
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn pct_text(s: &str) -> Result<String> {
    String::from_utf8(pct_decode(s)?).map_err(|_| Error::Uri(format!("'{s}' is not UTF-8")))
}

fn pct_encode(bytes: &[u8], all: bool) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for &c in bytes {
        if !all && (c.is_ascii_alphanumeric() || b"-._~".contains(&c)) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02x}"));
        }
    }
    out
}

impl Pkcs11Uri {
    /// Parse a `pkcs11:` URI. Unknown attributes are ignored (as RFC 7512 allows);
    /// a `pin-value` is refused: PINs never travel in URIs here.
    pub fn parse(s: &str) -> Result<Self> {
        let rest = s
            .strip_prefix("pkcs11:")
            .ok_or_else(|| Error::Uri(format!("'{s}' does not start with pkcs11:")))?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut uri = Pkcs11Uri::default();
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| Error::Uri(format!("attribute '{attr}' has no '='")))?;
            match k {
                "token" => uri.token = Some(pct_text(v)?),
                "serial" => uri.serial = Some(pct_text(v)?),
                "object" => uri.object = Some(pct_text(v)?),
                "id" => uri.id = Some(pct_decode(v)?),
                "type" => {
                    uri.object_type = Some(match v {
                        "private" => ObjectType::Private,
                        "public" => ObjectType::Public,
                        "cert" => ObjectType::Cert,
                        other => return Err(Error::Uri(format!("unsupported type '{other}'"))),
                    })
                }
                _ => {}
            }
        }
        for attr in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|a| !a.is_empty())
        {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| Error::Uri(format!("query attribute '{attr}' has no '='")))?;
            match k {
                "module-path" => uri.module_path = Some(pct_text(v)?),
                "pin-source" => uri.pin_source = Some(pct_text(v)?),
                "pin-value" => {
                    return Err(Error::Uri(
                        "pin-value is refused: give the PIN with --pin-file or pin-source".into(),
                    ))
                }
                _ => {}
            }
        }
        Ok(uri)
    }

    /// A short description for messages: `id=..` or `object=..`.
    pub fn describe(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(t) = &self.token {
            parts.push(format!("token={}", pct_encode(t.as_bytes(), false)));
        }
        if let Some(s) = &self.serial {
            parts.push(format!("serial={}", pct_encode(s.as_bytes(), false)));
        }
        if let Some(id) = &self.id {
            parts.push(format!("id={}", pct_encode(id, true)));
        }
        if let Some(o) = &self.object {
            parts.push(format!("object={}", pct_encode(o.as_bytes(), false)));
        }
        if let Some(t) = self.object_type {
            parts.push(format!("type={}", t.as_str()));
        }
        write!(f, "pkcs11:{}", parts.join(";"))?;
        let mut q = Vec::new();
        if let Some(m) = &self.module_path {
            q.push(format!(
                "module-path={}",
                pct_encode(m.as_bytes(), false).replace("%2f", "/")
            ));
        }
        if let Some(p) = &self.pin_source {
            q.push(format!(
                "pin-source={}",
                pct_encode(p.as_bytes(), false).replace("%2f", "/")
            ));
        }
        if !q.is_empty() {
            write!(f, "?{}", q.join("&"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_rfc_example() {
        let u = Pkcs11Uri::parse(
            "pkcs11:token=gw%2001;id=%01%a2;object=my%20key;type=private?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=/run/pin",
        )
        .unwrap();
        assert_eq!(u.token.as_deref(), Some("gw 01"));
        assert_eq!(u.id.as_deref(), Some(&[1u8, 0xa2][..]));
        assert_eq!(u.object.as_deref(), Some("my key"));
        assert_eq!(u.object_type, Some(ObjectType::Private));
        assert_eq!(
            u.module_path.as_deref(),
            Some("/usr/lib/softhsm/libsofthsm2.so")
        );
        assert_eq!(u.pin_source.as_deref(), Some("/run/pin"));
        assert_eq!(
            u.to_string(),
            "pkcs11:token=gw%2001;id=%01%a2;object=my%20key;type=private?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=/run/pin"
        );
    }

    #[test]
    fn refuses_pin_value_and_garbage() {
        assert!(Pkcs11Uri::parse("pkcs11:id=%01?pin-value=1234").is_err());
        assert!(Pkcs11Uri::parse("file:foo").is_err());
        assert!(Pkcs11Uri::parse("pkcs11:id=%zz").is_err());
        assert!(Pkcs11Uri::parse("pkcs11:id").is_err());
        assert!(Pkcs11Uri::parse("pkcs11:type=data").is_err());
    }

    proptest! {
        #[test]
        fn round_trip(token in "[ -~]{0,20}", id in proptest::collection::vec(any::<u8>(), 0..20), object in "\\PC{0,20}") {
            let u = Pkcs11Uri { token: Some(token), id: Some(id), object: Some(object), object_type: Some(ObjectType::Cert), ..Default::default() };
            prop_assert_eq!(Pkcs11Uri::parse(&u.to_string()).unwrap(), u);
        }

        #[test]
        fn parse_never_panics(s in "pkcs11:\\PC{0,80}") {
            let _ = Pkcs11Uri::parse(&s);
        }
    }
}
