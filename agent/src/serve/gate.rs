//! What the API decides before it reads a request body, and what bounds an attacker with a
//! local uid: the policy from `SO_PEERCRED` and the request line alone (a caller with no
//! rule gets 403 before one byte of its body is buffered), a body-read deadline, caps on
//! open connections in all and per uid, and refusals logged once per uid per minute.

use super::api::{ApiState, Caller};
use axum::body::Body;
use axum::extract::{Extension, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use firmware_config::schema::Operation;
use http_body_util::BodyExt as _;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A bundle may be up to 1 MiB of payload plus its header.
pub(super) const APPLY_MAX_BYTES: usize = (1 << 20) + 4096;

/// The operation and identity a request with a body asks for, from its method and path
/// alone (None: a request that carries no body the API reads; its handler checks it).
pub fn operation(method: &str, path: &str) -> Option<(Operation, Option<String>)> {
    if method != "POST" {
        return None;
    }
    if path == "/v1/config/apply" {
        return Some((Operation::Apply, None));
    }
    let rest = path.strip_prefix("/v1/identities/")?;
    let (name, op) = rest.split_once('/')?;
    let op = match op {
        "sign" => Operation::Sign,
        "jws" => Operation::Jws,
        "rotate" => Operation::Rotate,
        "retire" => Operation::Retire,
        "revoke" => Operation::Revoke,
        _ => return None,
    };
    let name = percent_encoding::percent_decode_str(name)
        .decode_utf8()
        .ok()?
        .into_owned();
    Some((op, Some(name)))
}

/// The middleware in front of every route: refuse by policy before the body, then read the
/// body within `api.body_timeout` and its size cap.
pub(super) async fn before_body(
    State(st): State<Arc<ApiState>>,
    Extension(c): Extension<Caller>,
    req: Request,
    next: Next,
) -> Response {
    let Some((op, identity)) = operation(req.method().as_str(), req.uri().path()) else {
        return next.run(req).await;
    };
    if let Err(e) = st.check(&c, op, identity.as_deref()) {
        return e.into_response();
    }
    let policy = st.policy();
    let limit = if op == Operation::Apply {
        APPLY_MAX_BYTES
    } else {
        policy.api.max_request_bytes
    };
    let deadline = Duration::from_secs(policy.api.body_timeout.0.max(1));
    let (parts, body) = req.into_parts();
    let read = http_body_util::Limited::new(body, limit).collect();
    let bytes = match tokio::time::timeout(deadline, read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return super::api::ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over {limit} bytes (api.max_request_bytes)"),
            )
            .into_response()
        }
        Ok(Err(e)) => {
            return super::api::ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the request body could not be read: {e}"),
            )
            .into_response()
        }
        Err(_) => {
            return super::api::ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s (api.body_timeout)",
                    deadline.as_secs()
                ),
            )
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Open API connections, in all and per uid.
#[derive(Default)]
pub(super) struct Connections {
    open: Mutex<(usize, HashMap<u32, usize>)>,
}

/// One admitted connection; counted until dropped.
pub(super) struct Admitted {
    table: Arc<Connections>,
    uid: u32,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut t = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        t.0 = t.0.saturating_sub(1);
        if let Some(n) = t.1.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.1.remove(&self.uid);
            }
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, PartialEq)]
pub(super) enum Full {
    /// `api.max_connections` are open.
    All(usize),
    /// This uid holds `api.max_connections_per_caller`.
    Caller(usize),
}

impl Connections {
    /// Admit one more connection of `uid` under the caps, or say which cap is reached.
    pub(super) fn admit(
        self: &Arc<Self>,
        uid: u32,
        all: usize,
        per_caller: usize,
    ) -> Result<Admitted, Full> {
        let mut t = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mine = t.1.get(&uid).copied().unwrap_or(0);
        if mine >= per_caller {
            return Err(Full::Caller(per_caller));
        }
        if t.0 >= all {
            return Err(Full::All(all));
        }
        t.0 += 1;
        t.1.insert(uid, mine + 1);
        Ok(Admitted {
            table: self.clone(),
            uid,
        })
    }

    /// Connections open now.
    #[cfg(test)]
    pub(super) fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

/// Refusals logged once per uid per minute, with how many were not logged since.
#[derive(Default)]
pub(crate) struct Refusals(Mutex<HashMap<u32, (Instant, u64)>>);

impl Refusals {
    /// Note a refusal of `uid`: Some(n) when it is to be logged now (n refusals of this uid
    /// went unlogged in the minute before), None when it is only counted.
    pub(crate) fn note(&self, uid: u32) -> Option<u64> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if m.len() > 4096 {
            m.retain(|_, (since, _)| now.duration_since(*since) < Duration::from_secs(60));
        }
        match m.get_mut(&uid) {
            Some((since, n)) if now.duration_since(*since) < Duration::from_secs(60) => {
                *n += 1;
                None
            }
            Some((since, n)) => {
                let before = *n;
                *since = now;
                *n = 0;
                Some(before)
            }
            None => {
                m.insert(uid, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_request_line_names_the_operation() {
        let p = "POST";
        assert_eq!(
            operation(p, "/v1/identities/gw/sign"),
            Some((Operation::Sign, Some("gw".into())))
        );
        assert_eq!(
            operation(p, "/v1/identities/g%77/jws"),
            Some((Operation::Jws, Some("gw".into())))
        );
        assert_eq!(
            operation(p, "/v1/config/apply"),
            Some((Operation::Apply, None))
        );
        assert_eq!(operation("GET", "/v1/identities/gw/sign"), None);
        assert_eq!(operation(p, "/v1/identities/gw/chain"), None);
    }

    #[test]
    fn caps_count_per_uid_and_in_all_and_free_on_drop() {
        let c = Arc::new(Connections::default());
        let a: Vec<_> = (0..2).map(|_| c.admit(7, 3, 2).unwrap()).collect();
        assert_eq!(c.admit(7, 3, 2).err(), Some(Full::Caller(2)));
        let b = c.admit(8, 3, 2).unwrap();
        assert_eq!(c.admit(9, 3, 2).err(), Some(Full::All(3)));
        drop(a);
        drop(b);
        assert_eq!(c.open(), 0);
        assert!(c.admit(7, 3, 2).is_ok());
    }

    #[test]
    fn refusals_are_logged_once_a_minute_per_uid() {
        let r = Refusals::default();
        assert_eq!(r.note(5), Some(0));
        assert_eq!(r.note(5), None);
        assert_eq!(r.note(6), Some(0));
        assert_eq!(r.note(5), None);
    }

    proptest! {
        #[test]
        fn any_request_line_is_parsed_without_panic(path in "\\PC{0,80}") {
            let _ = operation("POST", &path);
        }
    }
}
