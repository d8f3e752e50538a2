//! One HTTPS/1.1 request with our rustls `ClientConfig` (so the token can sign the handshake),
//! on maintained crates: hyper 1 for HTTP, tokio-rustls for TLS, `url` for URLs.
//!
//! What this module adds to them: one deadline over the whole exchange (DNS, connect, TLS,
//! request, body), every resolved address tried in turn, caps on what a server may send
//! (1 MiB body, hyper's head limits), and errors that say whether the request may have
//! reached the server, which the JWK rotation needs to tell "refused" from "unknown".

use bytes::Bytes;
use hsm_shim::rustls;
use http_body_util::{BodyExt, Full, Limited};
use hyper::http;
use rustls::pki_types::ServerName;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use url::Url;

/// The largest body accepted from a server.
pub const MAX_BODY: usize = 1 << 20;

/// Errors of one HTTPS exchange.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not usable.
    #[error("bad URL '{url}': {why}")]
    Url {
        /// The URL as given.
        url: String,
        /// Why.
        why: String,
    },
    /// Failed before any byte of the request left: DNS, TCP connect, TLS handshake.
    #[error("{stage}: {detail}")]
    NotSent {
        /// What we were doing.
        stage: &'static str,
        /// The error, with its causes.
        detail: String,
    },
    /// Failed after the request was (or may have been) sent: the server may have acted on it.
    #[error("{stage}: {detail}")]
    AfterSend {
        /// What we were doing.
        stage: &'static str,
        /// The error, with its causes.
        detail: String,
    },
    /// The deadline passed.
    #[error("no complete answer within {}s ({})", .after.as_secs_f32(), if *.sent { "the request was sent" } else { "the request was not sent" })]
    Timeout {
        /// The deadline.
        after: Duration,
        /// Whether the request may have reached the server.
        sent: bool,
    },
}

impl HttpError {
    /// True when the server may have received (and acted on) the request.
    pub fn maybe_sent(&self) -> bool {
        match self {
            HttpError::Url { .. } | HttpError::NotSent { .. } => false,
            HttpError::AfterSend { .. } => true,
            HttpError::Timeout { sent, .. } => *sent,
        }
    }
}

/// Parse an `https://` URL.
pub fn parse_https(s: &str) -> Result<Url, HttpError> {
    let bad = |why: &str| HttpError::Url {
        url: s.to_owned(),
        why: why.to_owned(),
    };
    let u = Url::parse(s).map_err(|e| bad(&e.to_string()))?;
    if u.scheme() != "https" {
        return Err(bad("expected https://HOST[:PORT][/PATH]"));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(bad(
            "credentials in the URL are refused; configure them instead",
        ));
    }
    Ok(u)
}

/// `base` with `segments` appended as path segments, each percent-encoded.
pub fn join(base: &Url, segments: &[&str]) -> Url {
    let mut u = base.clone();
    if let Ok(mut p) = u.path_segments_mut() {
        p.pop_if_empty();
        p.extend(segments);
    }
    u
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
    /// The body (at most [`MAX_BODY`]).
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
    /// The body as text for a reason or a log line: lossily, at most `max` bytes, on one
    /// line, control characters escaped (a server's words reach terminals and the journal).
    pub fn text(&self, max: usize) -> String {
        crate::text::one_line(&String::from_utf8_lossy(
            &self.body[..self.body.len().min(max)],
        ))
    }
}

/// A request to send.
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// Extra headers.
    pub headers: Vec<(&'a str, String)>,
    /// Body.
    pub body: &'a [u8],
}

/// Send one GET over TLS with `config` and read the answer.
pub fn get(
    config: Arc<rustls::ClientConfig>,
    url: &Url,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let req = Request {
        method: "GET",
        ..Default::default()
    };
    request(config, url, &req, timeout)
}

/// Send one request over TLS with `config` and read the whole answer, all within `timeout`.
pub fn request(
    config: Arc<rustls::ClientConfig>,
    url: &Url,
    req: &Request,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| HttpError::NotSent {
            stage: "starting the I/O runtime",
            detail: e.to_string(),
        })?;
    let sent = Arc::new(AtomicBool::new(false));
    let flag = sent.clone();
    rt.block_on(async move {
        match tokio::time::timeout(timeout, exchange(config, url, req, &flag)).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout {
                after: timeout,
                sent: sent.load(Ordering::SeqCst),
            }),
        }
    })
}

/// The error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s += &format!(": {t}");
        }
        src = x.source();
    }
    s
}

async fn connect(url: &Url) -> Result<tokio::net::TcpStream, HttpError> {
    let not_sent = |stage, e: &dyn std::error::Error| HttpError::NotSent {
        stage,
        detail: chain(e),
    };
    let host = url.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| not_sent("resolving host", &e))?
        .collect();
    crate::tcp::connect_any(host, &addrs)
        .await
        .map_err(|detail| HttpError::NotSent {
            stage: "connecting",
            detail,
        })
}

/// TCP and TLS to the URL's host: the stream, the protocol version and the cipher suite.
async fn tls_connect(
    config: Arc<rustls::ClientConfig>,
    url: &Url,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, HttpError> {
    let host = url.host_str().unwrap_or_default().to_owned();
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let name = ServerName::try_from(bare).map_err(|e| HttpError::Url {
        url: url.to_string(),
        why: e.to_string(),
    })?;
    let tcp = connect(url).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| HttpError::NotSent {
            stage: "TLS handshake",
            detail: chain(&e),
        })
}

async fn exchange(
    config: Arc<rustls::ClientConfig>,
    url: &Url,
    req: &Request<'_>,
    sent: &AtomicBool,
) -> Result<Response, HttpError> {
    let tls = tls_connect(config, url).await?;
    let c = tls.get_ref().1;
    let protocol = c
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_default();
    let cipher_suite = c
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| HttpError::NotSent {
                stage: "HTTP set-up",
                detail: chain(&e),
            })?;
    // The connection task ends with the exchange; its error (if any) surfaces through the
    // response or body futures below.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = build(url, req)?;
    sent.store(true, Ordering::SeqCst);
    let after = |stage| {
        move |e: hyper::Error| HttpError::AfterSend {
            stage,
            detail: chain(&e),
        }
    };
    let resp = sender
        .send_request(request)
        .await
        .map_err(after("reading the response head"))?;
    let (status, headers, body) = read_response(resp).await?;
    Ok(Response {
        status,
        protocol,
        cipher_suite,
        headers,
        body,
    })
}

/// Status, headers (names in lower case) and body (at most `MAX_BODY` bytes) of a response.
async fn read_response(
    resp: http::Response<hyper::body::Incoming>,
) -> Result<(u16, Vec<(String, String)>, Vec<u8>), HttpError> {
    let status = resp.status().as_u16();
    let headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    if let Some(len) = resp.headers().get(http::header::CONTENT_LENGTH) {
        let n = len.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok());
        if n.is_none_or(|n| n > MAX_BODY as u64) {
            return Err(HttpError::AfterSend {
                stage: "reading the response body",
                detail: format!(
                    "Content-Length {:?} is not a size up to {MAX_BODY} bytes",
                    String::from_utf8_lossy(len.as_bytes())
                ),
            });
        }
    }
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| HttpError::AfterSend {
            stage: "reading the response body",
            detail: chain(&*e),
        })?
        .to_bytes()
        .to_vec();
    Ok((status, headers, body))
}

fn build(url: &Url, req: &Request) -> Result<http::Request<Full<Bytes>>, HttpError> {
    let bad = |why: String| HttpError::Url {
        url: url.to_string(),
        why,
    };
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let authority = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_owned(),
    };
    let mut b = http::Request::builder()
        .method(req.method)
        .uri(target)
        .header(http::header::HOST, authority)
        .header(
            http::header::USER_AGENT,
            concat!("edge-signer/", env!("CARGO_PKG_VERSION")),
        )
        .header(http::header::CONNECTION, "close");
    for (k, v) in &req.headers {
        b = b.header(*k, v.as_str());
    }
    if !req.body.is_empty() || matches!(req.method, "POST" | "PUT") {
        b = b.header(http::header::CONTENT_LENGTH, req.body.len());
    }
    b.body(Full::new(Bytes::copy_from_slice(req.body)))
        .map_err(|e| bad(format!("request refused: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn urls() {
        let u = parse_https("https://127.0.0.1:8443/health?x=1").unwrap();
        assert_eq!(
            (u.host_str(), u.port(), u.path(), u.query()),
            (Some("127.0.0.1"), Some(8443), "/health", Some("x=1"))
        );
        let u = parse_https("https://[::1]:9/").unwrap();
        assert_eq!((u.host_str(), u.port()), (Some("[::1]"), Some(9)));
        assert_eq!(
            parse_https("https://gw.example")
                .unwrap()
                .port_or_known_default(),
            Some(443)
        );
        for bad in [
            "http://x",
            "https://",
            "https://a:b/",
            "https://[::1",
            "ftp://a/",
        ] {
            assert!(parse_https(bad).is_err(), "{bad}");
        }
        assert!(parse_https("https://user:pw@a/").is_err());
    }

    #[test]
    fn segments_are_encoded() {
        let base = parse_https("https://ca.example/.well-known/est/").unwrap();
        assert_eq!(
            join(&base, &["lab/../x", "simpleenroll"]).as_str(),
            "https://ca.example/.well-known/est/lab%2F..%2Fx/simpleenroll"
        );
        let base = parse_https("https://api.example").unwrap();
        assert_eq!(
            join(&base, &["api", "v1", "rotate-to", "a b?c#d"]).as_str(),
            "https://api.example/api/v1/rotate-to/a%20b%3Fc%23d"
        );
    }

    proptest! {
        #[test]
        fn url_parsing_never_panics(s in "\\PC{0,60}") {
            let _ = parse_https(&s);
            if let Ok(u) = parse_https(&format!("https://{s}")) {
                let _ = join(&u, &[&s]);
                let _ = build(&u, &Request { method: "GET", ..Default::default() });
            }
        }
    }
}
