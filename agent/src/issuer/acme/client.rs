//! The ACME protocol's transport (RFC 8555 §6): the directory, nonces, requests signed by
//! the account key in the token (a JWS with `jwk` for newAccount, `kid` after), a `badNonce`
//! answered by retrying with the nonce that came with it, problem documents, `Retry-After`.

use crate::clock::Unix;
use crate::http::{self, Url};
use hsm_shim::jws::{sign_flattened, JwsAlg};
use hsm_shim::rustls;
use hsm_shim::TokenKey;
use std::sync::Arc;
use std::time::Duration;

/// How many `badNonce` answers in a row are retried (pebble, by default, refuses some nonces).
const NONCE_RETRIES: usize = 10;

/// An ACME problem document (RFC 7807 / RFC 8555 §6.7), or a transport failure.
#[derive(Debug, Clone)]
pub struct Problem {
    /// HTTP status (0: no answer).
    pub status: u16,
    /// `type`, without the `urn:ietf:params:acme:error:` prefix.
    pub kind: String,
    /// `detail`.
    pub detail: String,
    /// `Retry-After`, when the server gave one.
    pub retry_after: Option<Unix>,
}

impl Problem {
    /// A failure before any answer.
    pub fn transport(e: impl std::fmt::Display) -> Problem {
        Problem {
            status: 0,
            kind: "connection".into(),
            detail: e.to_string(),
            retry_after: None,
        }
    }

    /// A 5xx, a rate limit or no answer: the same request may succeed later.
    pub fn transient(&self) -> bool {
        self.status == 0
            || self.status >= 500
            || self.status == 429
            || self.kind == "rateLimited"
            || self.kind == "badNonce"
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            0 => write!(f, "{}", self.detail),
            s => write!(f, "HTTP {s} {}: {}", self.kind, self.detail),
        }
    }
}

/// One answer: status, the headers ACME uses, the body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status.
    pub status: u16,
    /// `Location`.
    pub location: Option<String>,
    /// `Link` headers.
    pub links: Vec<String>,
    /// `Retry-After`, as a time.
    pub retry_after: Option<Unix>,
    /// Body.
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, Problem> {
        serde_json::from_slice(&self.body).map_err(|e| Problem {
            status: self.status,
            kind: "malformedAnswer".into(),
            detail: format!("the server's answer is not JSON: {e}"),
            retry_after: None,
        })
    }
}

/// Who signs: the account key, with its `jwk` (newAccount, keyChange's inner JWS) or its
/// account URL (`kid`).
pub enum Signer<'a> {
    /// `jwk` in the protected header.
    Jwk(&'a TokenKey, JwsAlg, &'a serde_json::Value),
    /// `kid` in the protected header.
    Kid(&'a TokenKey, JwsAlg, &'a str),
}

/// An ACME server: its directory and a nonce kept from the last answer.
pub struct Client {
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    /// The directory object.
    pub directory: serde_json::Value,
    nonce: Option<String>,
}

impl Client {
    /// Read the directory at `url`, trusting `roots` for the server's certificate.
    pub fn connect(
        url: &str,
        roots: rustls::RootCertStore,
        timeout: Duration,
    ) -> Result<Client, Problem> {
        let tls = crate::tlsconf::client_config(None, roots, crate::tlsconf::TlsVersions::Any)
            .map_err(Problem::transport)?;
        let mut c = Client {
            tls: Arc::new(tls),
            timeout,
            directory: serde_json::Value::Null,
            nonce: None,
        };
        let a = c.send("GET", url, None)?;
        if a.status != 200 {
            return Err(problem(&a));
        }
        c.directory = a.json()?;
        Ok(c)
    }

    /// A URL the directory names (`newNonce`, `newAccount`, `newOrder`, `revokeCert`,
    /// `keyChange`).
    pub fn url(&self, name: &str) -> Result<String, Problem> {
        self.directory[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Problem {
                status: 0,
                kind: "malformedDirectory".into(),
                detail: format!("the ACME directory has no {name}"),
                retry_after: None,
            })
    }

    fn send(&mut self, method: &str, url: &str, body: Option<Vec<u8>>) -> Result<Answer, Problem> {
        let u: Url = http::parse_https(url).map_err(Problem::transport)?;
        let mut headers = Vec::new();
        if body.is_some() {
            headers.push(("Content-Type", "application/jose+json".to_owned()));
        }
        let body = body.unwrap_or_default();
        let req = http::Request {
            method,
            headers,
            body: &body,
        };
        let r =
            http::request(self.tls.clone(), &u, &req, self.timeout).map_err(Problem::transport)?;
        if let Some(n) = r.header("replay-nonce") {
            self.nonce = Some(n.to_owned());
        }
        let now = crate::clock::Clock::now(&crate::clock::SystemClock);
        Ok(Answer {
            status: r.status,
            location: r.header("location").map(str::to_owned),
            links: r
                .headers
                .iter()
                .filter(|(k, _)| k == "link")
                .map(|(_, v)| v.clone())
                .collect(),
            retry_after: r
                .header("retry-after")
                .map(|v| now + crate::issuer::est::retry_after(Some(v), now)),
            body: r.body,
        })
    }

    fn fresh_nonce(&mut self) -> Result<String, Problem> {
        if let Some(n) = self.nonce.take() {
            return Ok(n);
        }
        let url = self.url("newNonce")?;
        self.send("GET", &url, None)?;
        self.nonce.take().ok_or_else(|| Problem {
            status: 0,
            kind: "badNonce".into(),
            detail: "newNonce gave no Replay-Nonce".into(),
            retry_after: None,
        })
    }

    /// POST a JWS of `payload` (None: POST-as-GET) to `url`, signed by `signer`; a
    /// `badNonce` is retried with the nonce it came with. An error status is a [`Problem`].
    pub fn post(
        &mut self,
        url: &str,
        signer: &Signer,
        payload: Option<&serde_json::Value>,
    ) -> Result<Answer, Problem> {
        let payload = payload.map(|p| p.to_string()).unwrap_or_default();
        let mut last = None;
        for _ in 0..NONCE_RETRIES {
            let nonce = self.fresh_nonce()?;
            let mut protected = serde_json::Map::new();
            protected.insert("nonce".into(), nonce.into());
            protected.insert("url".into(), url.into());
            let (key, alg) = match signer {
                Signer::Jwk(k, a, jwk) => {
                    protected.insert("jwk".into(), (*jwk).clone());
                    (k, a)
                }
                Signer::Kid(k, a, kid) => {
                    protected.insert("kid".into(), (*kid).into());
                    (k, a)
                }
            };
            let jws = sign_flattened(key, *alg, protected, payload.as_bytes())
                .map_err(Problem::transport)?;
            let a = self.send("POST", url, Some(jws.to_string().into_bytes()))?;
            if a.status < 400 {
                return Ok(a);
            }
            let p = problem(&a);
            if p.kind != "badNonce" {
                return Err(p);
            }
            last = Some(p);
        }
        Err(last.unwrap_or_else(|| Problem::transport("no answer")))
    }
}

/// The problem document of an error answer.
pub fn problem(a: &Answer) -> Problem {
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_default();
    let kind = v["type"].as_str().unwrap_or("");
    Problem {
        status: a.status,
        kind: kind
            .strip_prefix("urn:ietf:params:acme:error:")
            .unwrap_or(kind)
            .to_owned(),
        detail: crate::text::one_line(v["detail"].as_str().unwrap_or("(no detail)")),
        retry_after: a.retry_after,
    }
}

/// The `rel="alternate"` URLs of `Link` headers (RFC 8555 §7.4.2).
pub fn alternates(links: &[String]) -> Vec<String> {
    links
        .iter()
        .flat_map(|h| h.split(','))
        .filter(|l| l.contains("rel=\"alternate\""))
        .filter_map(|l| {
            let (start, end) = (l.find('<')?, l.find('>')?);
            l.get(start + 1..end).map(str::to_owned)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn alternate_links_are_read_from_one_or_many_headers() {
        let links = vec![
            "<https://ca/dir>;rel=\"index\"".to_owned(),
            "<https://ca/cert/1/1>;rel=\"alternate\", <https://ca/cert/1/2>;rel=\"alternate\""
                .to_owned(),
        ];
        assert_eq!(
            alternates(&links),
            vec!["https://ca/cert/1/1", "https://ca/cert/1/2"]
        );
    }

    #[test]
    fn a_problem_names_its_type_and_detail() {
        let a = Answer {
            status: 403,
            location: None,
            links: vec![],
            retry_after: None,
            body: br#"{"type":"urn:ietf:params:acme:error:unauthorized","detail":"no"}"#.to_vec(),
        };
        let p = problem(&a);
        assert_eq!((p.kind.as_str(), p.detail.as_str()), ("unauthorized", "no"));
        assert!(!p.transient());
        assert_eq!(p.to_string(), "HTTP 403 unauthorized: no");
    }

    proptest! {
        #[test]
        fn any_answer_body_or_link_is_read_without_a_panic(
            body in proptest::collection::vec(any::<u8>(), 0..200),
            link in ".{0,80}",
        ) {
            let a = Answer { status: 400, location: None, links: vec![link.clone()], retry_after: None, body };
            let _ = problem(&a);
            let _ = a.json();
            let _ = alternates(&[link]);
        }
    }
}
