//! The smallest HTTPS/1.1 client that a probe needs: one request, read the status.

use hsm_shim::rustls;
use rustls::pki_types::ServerName;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// Errors of one HTTPS exchange.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not `https://host[:port][/path]`.
    #[error("bad URL '{0}': expected https://HOST[:PORT][/PATH]")]
    Url(String),
    /// TCP connect or I/O failed.
    #[error("{stage}")]
    Io {
        /// What we were doing.
        stage: String,
        /// The I/O error (TLS alerts show up here too).
        #[source]
        source: std::io::Error,
    },
    /// The peer's answer is not HTTP.
    #[error("the server's answer is not HTTP/1.x: {0}")]
    Malformed(String),
}

/// A parsed `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// Host name or IP (without brackets).
    pub host: String,
    /// Port (443 by default).
    pub port: u16,
    /// Path with query, starting with '/'.
    pub path: String,
}

impl Url {
    /// Parse `https://HOST[:PORT][/PATH]`; IPv6 hosts in brackets.
    pub fn parse(s: &str) -> Result<Url, HttpError> {
        let bad = || HttpError::Url(s.to_owned());
        let rest = s.strip_prefix("https://").ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(bad)?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad())?,
                None if after.is_empty() => 443,
                None => return Err(bad()),
            };
            (h.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad())?),
                None => (authority.to_owned(), 443),
            }
        };
        if host.is_empty()
            || host.chars().any(|c| c.is_whitespace() || c == '@')
            || path.contains(['\r', '\n', ' '])
        {
            return Err(bad());
        }
        Ok(Url {
            host,
            port,
            path: path.to_owned(),
        })
    }

    /// The `Host:` header value.
    fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What one HTTPS request found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Negotiated TLS version, e.g. `TLSv1_3`.
    pub protocol: String,
    /// Negotiated cipher suite.
    pub cipher_suite: String,
    /// The first bytes of the body (at most 4 KiB), lossily decoded.
    pub body: String,
}

/// Parse an HTTP/1.x status line's code from the start of a response.
pub fn parse_status(head: &[u8]) -> Result<u16, HttpError> {
    let line_end = head.iter().position(|b| *b == b'\n').unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..line_end]);
    let mut parts = line.trim_end().splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(HttpError::Malformed(line.chars().take(80).collect()));
    };
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(HttpError::Malformed(line.chars().take(80).collect()));
    }
    code.parse()
        .map_err(|_| HttpError::Malformed(line.chars().take(80).collect()))
}

/// Send one GET over TLS with `config` and read the answer.
pub fn get(
    config: Arc<rustls::ClientConfig>,
    url: &Url,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let io = |stage: &str| {
        let stage = stage.to_owned();
        move |source| HttpError::Io { stage, source }
    };
    let addr = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(io("resolving host"))?
        .next()
        .ok_or_else(|| HttpError::Url(format!("{} resolves to no address", url.host)))?;
    let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(io("connecting"))?;
    tcp.set_read_timeout(Some(timeout)).map_err(io("socket"))?;
    tcp.set_write_timeout(Some(timeout)).map_err(io("socket"))?;
    let name =
        ServerName::try_from(url.host.clone()).map_err(|_| HttpError::Url(url.host.clone()))?;
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| HttpError::Io {
        stage: "TLS setup".into(),
        source: std::io::Error::other(e),
    })?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: edge-signer/{}\r\nConnection: close\r\n\r\n",
        url.path,
        url.host_header(),
        env!("CARGO_PKG_VERSION")
    );
    tls.write_all(req.as_bytes())
        .map_err(io("TLS handshake or request"))?;
    tls.flush().map_err(io("sending request"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 64 * 1024 {
                    break;
                }
            }
            // Servers that close without close_notify: what we have is the answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => break,
            Err(e) => return Err(io("reading response")(e)),
        }
    }
    let status = parse_status(&buf)?;
    let body_start = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .unwrap_or(buf.len());
    let body_end = buf.len().min(body_start + 4096);
    Ok(Response {
        status,
        protocol: tls
            .conn
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default(),
        cipher_suite: tls
            .conn
            .negotiated_cipher_suite()
            .map(|c| format!("{:?}", c.suite()))
            .unwrap_or_default(),
        body: String::from_utf8_lossy(&buf[body_start..body_end]).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn urls() {
        let u = Url::parse("https://127.0.0.1:8443/health?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8443, "/health?x=1")
        );
        let u = Url::parse("https://[::1]:9/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.host_header().as_str()),
            ("::1", 9, "[::1]:9")
        );
        assert_eq!(Url::parse("https://gw.example").unwrap().port, 443);
        for bad in [
            "http://x",
            "https://",
            "https://a:b/",
            "https://a/ b",
            "https://[::1",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap(),
            204
        );
        assert_eq!(parse_status(b"HTTP/1.0 200 ok\n").unwrap(), 200);
        assert!(parse_status(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_status(b"").is_err());
        assert!(parse_status(b"HTTP/1.1 2000 x").is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120), s in "\\PC{0,60}") {
            let _ = parse_status(&bytes);
            let _ = Url::parse(&s);
            let _ = Url::parse(&format!("https://{s}"));
        }
    }
}
