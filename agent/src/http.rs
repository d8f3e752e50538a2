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
    /// Headers, names in lower case.
    #[serde(skip)]
    pub headers: Vec<(String, String)>,
    /// The body (at most 1 MiB; de-chunked).
    #[serde(skip)]
    pub body: Vec<u8>,
}

impl Response {
    /// A header's value (name in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// The body as text, lossily, at most `max` bytes.
    pub fn text(&self, max: usize) -> String {
        String::from_utf8_lossy(&self.body[..self.body.len().min(max)]).into_owned()
    }
}

/// A request to send.
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// Extra headers.
    pub headers: Vec<(&'a str, String)>,
    /// Body (sent with Content-Length when not empty).
    pub body: &'a [u8],
}

const MAX_RESPONSE: usize = 1 << 20;

/// Status, headers (lower-case names), body.
pub type Parsed = (u16, Vec<(String, String)>, Vec<u8>);

/// Split a raw HTTP/1.x response into status, headers and (de-chunked) body.
pub fn parse_response(raw: &[u8]) -> Result<Parsed, HttpError> {
    let status = parse_status(raw)?;
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| HttpError::Malformed("no end of headers".into()))?;
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[head_end + 4..].to_vec();
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body)?;
    } else if let Some(len) = get("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| HttpError::Malformed(format!("Content-Length '{len}'")))?;
        if body.len() < len {
            return Err(HttpError::Malformed(format!(
                "body truncated: {} of {len} bytes",
                body.len()
            )));
        }
        body.truncate(len);
    }
    Ok((status, headers, body))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, HttpError> {
    let bad = |why: &str| HttpError::Malformed(format!("chunked body: {why}"));
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("no chunk size"))?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("bad chunk size"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 || out.len() + size > MAX_RESPONSE {
            return Err(bad("truncated or too large"));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
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
    request(
        config,
        url,
        &Request {
            method: "GET",
            ..Default::default()
        },
        timeout,
    )
}

/// Send one request over TLS with `config` (`Connection: close`) and read the answer.
pub fn request(
    config: Arc<rustls::ClientConfig>,
    url: &Url,
    req: &Request,
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
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: edge-signer/{}\r\nConnection: close\r\n",
        req.method,
        url.path,
        url.host_header(),
        env!("CARGO_PKG_VERSION")
    );
    for (k, v) in &req.headers {
        if v.contains(['\r', '\n']) {
            return Err(HttpError::Malformed(format!(
                "header {k} contains a line break"
            )));
        }
        head += &format!("{k}: {v}\r\n");
    }
    if !req.body.is_empty() || req.method == "POST" {
        head += &format!("Content-Length: {}\r\n", req.body.len());
    }
    head += "\r\n";
    tls.write_all(head.as_bytes())
        .map_err(io("TLS handshake or request"))?;
    tls.write_all(req.body)
        .map_err(io("sending request body"))?;
    tls.flush().map_err(io("sending request"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > MAX_RESPONSE {
                    return Err(HttpError::Malformed(format!(
                        "response larger than {MAX_RESPONSE} bytes"
                    )));
                }
            }
            // Servers that close without close_notify: what we have is the answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => break,
            Err(e) => return Err(io("reading response")(e)),
        }
    }
    let (status, headers, body) = parse_response(&buf)?;
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
        headers,
        body,
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

    #[test]
    fn responses() {
        let (s, h, b) = parse_response(
            b"HTTP/1.1 202 Accepted\r\nRetry-After: 3\r\nContent-Length: 2\r\n\r\nokEXTRA",
        )
        .unwrap();
        assert_eq!((s, b.as_slice()), (202, &b"ok"[..]));
        assert_eq!(h[0], ("retry-after".to_owned(), "3".to_owned()));
        let (_, _, b) = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!(b, b"abcde");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120), s in "\\PC{0,60}") {
            let _ = parse_status(&bytes);
            let _ = parse_response(&bytes);
            let _ = dechunk(&bytes);
            let _ = Url::parse(&s);
            let _ = Url::parse(&format!("https://{s}"));
        }
    }
}
