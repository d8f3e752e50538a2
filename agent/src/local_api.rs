//! The CLI's side of the signing API: one HTTP/1.1 request over the daemon's Unix socket
//! (hyper's client connection on a tokio `UnixStream`), so that commands run while the
//! daemon owns the state are done by the daemon, never behind its back.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::path::Path;
use std::time::Duration;

/// An answer of the API: status and JSON (or text) body.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (Null when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }

    /// The JSON body of a 2xx answer, or the API's `error` text as an error.
    pub fn ok(self) -> crate::error::Result<serde_json::Value> {
        if (200..300).contains(&self.status) {
            return Ok(self.json());
        }
        let v = self.json();
        let why = v["error"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned());
        crate::bail!("the daemon answered {}: {why}", self.status)
    }
}

/// `method path` with `body` on the API socket `sock`, within `timeout`.
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> crate::error::Result<Answer> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::time::timeout(timeout, exchange(sock, method, path, body))
            .await
            .map_err(|_| crate::err!("no answer from the daemon within {}s", timeout.as_secs()))?
    })
}

async fn exchange(
    sock: &Path,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> crate::error::Result<Answer> {
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| crate::err!("cannot reach the daemon's API at {}: {e}", sock.display()))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "edge-signer")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = http_body_util::Limited::new(resp.into_body(), crate::http::MAX_BODY)
        .collect()
        .await
        .map_err(|e| crate::err!("reading the daemon's answer: {e}"))?
        .to_bytes();
    Ok(Answer { status, body })
}
