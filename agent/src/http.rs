//! One HTTPS/1.1 request with our rustls `ClientConfig` (so the token can sign the handshake),
//! or plain HTTP for a SCEP URL, on maintained crates: hyper 1 for HTTP, tokio-rustls for TLS;
//! URLs are [`crate::url::Url`].
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

pub use crate::url::Url;

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

/// Parse an `https://` URL (see [`Url::parse_https`]).
pub fn parse_https(s: &str) -> Result<Url, HttpError> {
    Url::parse_https(s).map_err(|why| HttpError::Url {
        url: crate::text::one_line(s),
        why,
    })
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
    let host = url.bare_host();
    let port = url.port_or_default();
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
    let bare = url.bare_host().to_owned();
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
    if !url.is_https() {
        // Plain HTTP (SCEP only: its messages are signed and encrypted themselves).
        let tcp = connect(url).await?;
        return send_on(tcp, url, req, sent, String::new(), String::new()).await;
    }
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
    send_on(tls, url, req, sent, protocol, cipher_suite).await
}

/// The HTTP/1.1 exchange on a connected stream.
async fn send_on<S>(
    io: S,
    url: &Url,
    req: &Request<'_>,
    sent: &AtomicBool,
    protocol: String,
    cipher_suite: String,
) -> Result<Response, HttpError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
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
    let mut b = http::Request::builder()
        .method(req.method)
        .uri(url.target())
        .header(http::header::HOST, url.host_header())
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

    proptest! {
        #[test]
        fn every_parsed_url_makes_a_request(s in "\\PC{0,60}") {
            if let Ok(u) = parse_https(&format!("https://{s}")) {
                let r = build(&u.join(&[&s]), &Request { method: "GET", ..Default::default() });
                prop_assert!(r.is_ok(), "{u}: {:?}", r.err());
            }
        }
    }
}
