//! The local signing API: HTTP/1.1 + JSON on a Unix socket (`curl --unix-socket` works),
//! axum routes served by hyper's connection builder (header read timeout against slow
//! clients). Each connection's caller is identified by `SO_PEERCRED`; every request is
//! checked against `[api] allow` rules (no implicit root); refusals are 403 with a reason.

use super::metrics;
use super::requests::{JwsRequest, SignRequest};
use crate::control::{EngineCommand, EngineRequest};
use crate::identities::{Identities, Served};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use firmware_config::schema::{ApiConfig, Operation};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::Semaphore;

/// Who is calling, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// Peer uid.
    pub uid: u32,
    /// Peer primary gid.
    pub gid: u32,
    /// Peer pid.
    pub pid: Option<i32>,
}

/// What the API enforces, swapped whole at a reload: an open keep-alive connection reads
/// the policy in force at each request, not the one of the listener it came in on.
pub struct Policy {
    /// `[api]`.
    pub api: ApiConfig,
    /// Identities whose issuer is a JWK rotation API: their key authenticates the
    /// rotate-to request itself, so the API never makes raw signatures with it and refuses
    /// a JWS whose payload is shaped like a rotation request.
    pub credentials: HashSet<String>,
}

impl Policy {
    /// The policy of a configuration.
    pub fn of(cfg: &firmware_config::Config) -> Policy {
        let jwk: HashSet<&str> = cfg
            .issuers
            .iter()
            .filter(|i| matches!(i, firmware_config::schema::IssuerConfig::JwkRotation(_)))
            .map(|i| i.name())
            .collect();
        Policy {
            api: cfg.api.clone(),
            credentials: cfg
                .identities
                .iter()
                .filter(|i| jwk.contains(i.issuer.as_str()))
                .map(|i| i.name.clone())
                .collect(),
        }
    }
}

/// Shared by every request, and kept across reloads (the policy inside is swapped).
pub struct ApiState {
    policy: RwLock<Arc<Policy>>,
    pub(super) identities: Arc<Identities>,
    pub(super) wake: std::sync::mpsc::Sender<EngineCommand>,
    own_uid: u32,
    in_flight: Mutex<HashMap<u32, Arc<Semaphore>>>,
    pub(super) connections: Arc<super::gate::Connections>,
    pub(super) refusals: super::gate::Refusals,
}

/// A refusal or failure, as JSON `{"error": ...}` with its status.
pub struct ApiError(StatusCode, String);

impl ApiError {
    /// A refusal with its status and reason.
    pub fn new(status: StatusCode, why: impl Into<String>) -> ApiError {
        ApiError(status, why.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

impl ApiState {
    pub(super) fn new(
        policy: Policy,
        identities: Arc<Identities>,
        wake: std::sync::mpsc::Sender<EngineCommand>,
    ) -> ApiState {
        ApiState {
            policy: RwLock::new(Arc::new(policy)),
            identities,
            wake,
            own_uid: rustix::process::getuid().as_raw(),
            in_flight: Mutex::new(HashMap::new()),
            connections: Default::default(),
            refusals: Default::default(),
        }
    }

    /// The policy in force now.
    pub(super) fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Put a reloaded policy in force for every connection, open ones included.
    pub(super) fn set_policy(&self, p: Policy) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(p);
        // A changed cap applies to the next request of each uid.
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Allowed by a rule. The daemon's own uid may read status and ask for the engine's
    /// operations (it is the CLI run as the agent's own user, which can already read the PIN
    /// and the state); it gets no signatures without a rule. Nothing else is implicit, root
    /// included (unless the daemon itself runs as root).
    fn allowed(&self, p: &Policy, c: &Caller, op: Operation, identity: Option<&str>) -> bool {
        p.api.enabled
            && ((c.uid == self.own_uid
                && matches!(
                    op,
                    Operation::Status
                        | Operation::List
                        | Operation::Rotate
                        | Operation::Retire
                        | Operation::Revoke
                        | Operation::Apply
                ))
                || p.api
                    .rules
                    .iter()
                    .any(|r| r.allows(c.uid, c.gid, op, identity)))
    }

    /// Refuse with 403 unless the policy allows it; raw signatures with an API credential's
    /// key are refused whatever the rules say.
    pub(super) fn check(&self, c: &Caller, op: Operation, identity: Option<&str>) -> ApiResult<()> {
        let policy = self.policy();
        let credential =
            op == Operation::Sign && identity.is_some_and(|i| policy.credentials.contains(i));
        if credential {
            return Err(self.refuse(c, op, identity, format!(
                "identity '{}' is a JWK rotation API credential: its key also signs the rotate-to request, so the API makes no raw signatures with it (use /jws)",
                identity.unwrap_or_default()
            )));
        }
        if self.allowed(&policy, c, op, identity) {
            return Ok(());
        }
        Err(self.refuse(
            c,
            op,
            identity,
            format!(
                "uid {} (gid {}) may not {}{}: no [[api.allow]] rule grants it",
                c.uid,
                c.gid,
                op.as_str(),
                identity
                    .map(|i| format!(" with identity '{i}'"))
                    .unwrap_or_default()
            ),
        ))
    }

    /// Count a refusal, log it (once a minute per uid), and make its 403.
    fn refuse(&self, c: &Caller, op: Operation, identity: Option<&str>, why: String) -> ApiError {
        count(c, op, "refused");
        if let Some(unlogged) = self.refusals.note(c.uid) {
            tracing::warn!(
                uid = c.uid,
                gid = c.gid,
                pid = %super::or_dash(c.pid),
                op = %op.as_str(),
                identity = %super::or_dash(identity),
                unlogged,
                "API request refused: {why} (further refusals of this uid are counted, and logged once a minute)"
            );
        }
        ApiError(StatusCode::FORBIDDEN, why)
    }

    /// One slot of the caller's in-flight cap (429 when full).
    fn slot(&self, c: &Caller) -> ApiResult<tokio::sync::OwnedSemaphorePermit> {
        let cap = self.policy().api.max_concurrent_per_caller;
        let sem = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(c.uid)
            .or_insert_with(|| Arc::new(Semaphore::new(cap)))
            .clone();
        sem.try_acquire_owned().map_err(|_| {
            ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "uid {} has {} requests in flight (api.max_concurrent_per_caller); retry when one finishes",
                    c.uid, cap
                ),
            )
        })
    }

    fn served(&self, name: &str) -> ApiResult<Arc<Served>> {
        self.identities
            .get(name)
            .and_then(|s| s.get())
            .ok_or_else(|| {
                ApiError(
                    StatusCode::NOT_FOUND,
                    format!("identity '{name}' has no current certificate yet"),
                )
            })
    }
}

fn count(c: &Caller, op: Operation, result: &'static str) {
    metrics::get().api_request(c.uid, op.as_str(), result);
}

/// The routes, behind the policy gate (`gate::before_body`), which has already read the
/// body within its size cap when a handler runs.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/identities", get(list))
        .route("/v1/identities/{name}/chain", get(chain))
        .route("/v1/identities/{name}/sign", post(sign))
        .route("/v1/identities/{name}/jws", post(jws))
        .route("/v1/identities/{name}/rotate", post(rotate))
        .route("/v1/identities/{name}/retire", post(retire))
        .route("/v1/identities/{name}/revoke", post(revoke))
        .route(
            "/v1/config/apply",
            // A bundle may be up to 1 MiB of payload plus its header.
            post(apply),
        )
        .route("/v1/status", get(status))
        .route("/v1/listeners", get(listeners))
        .route("/metrics", get(metrics_text))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such endpoint: see /v1/identities, /v1/status, /metrics".into(),
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::gate::before_body,
        ))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn list(
    State(st): State<Arc<ApiState>>,
    Extension(c): Extension<Caller>,
) -> ApiResult<Json<serde_json::Value>> {
    let policy = st.policy();
    let rows: Vec<serde_json::Value> = st
        .identities
        .all()
        .into_iter()
        .filter(|(name, _)| st.allowed(&policy, &c, Operation::List, Some(name)))
        .map(|(name, s)| match s {
            Some(s) => serde_json::json!({
                "name": name, "generation": s.generation, "key_uri": s.key_uri,
                "not_after": crate::clock::rfc3339(s.not_after), "fingerprint": s.fingerprint,
                "chain_pem": s.chain_pem, "state": "serving",
            }),
            None => serde_json::json!({"name": name, "state": "no certificate yet"}),
        })
        .collect();
    if rows.is_empty() {
        st.check(&c, Operation::List, None)?;
    }
    count(&c, Operation::List, "ok");
    Ok(Json(serde_json::Value::Array(rows)))
}

async fn chain(
    State(st): State<Arc<ApiState>>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    st.check(&c, Operation::Chain, Some(&name))?;
    let s = st.served(&name)?;
    let Some(chain) = s.chain_pem.clone() else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("identity '{name}' is a JWK credential: it has no certificate chain"),
        ));
    };
    count(&c, Operation::Chain, "ok");
    Ok((
        [("content-type", "application/pem-certificate-chain")],
        chain,
    )
        .into_response())
}

/// A request body that did not parse (or was too large: 413), with axum's reason.
fn rejected(what: &str, e: axum::extract::rejection::JsonRejection) -> ApiError {
    ApiError(e.status(), format!("bad {what} request: {}", e.body_text()))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// Run one token call of a request where the request is: the API has a runtime of its own
/// (`Servers::new`), so no hand-off to another thread per request, and a token that takes
/// milliseconds holds up only other API requests, which would wait for the token anyway.
/// The error says what failed, for the caller.
fn token_call<R>(f: impl FnOnce() -> hsm_shim::Result<R>) -> ApiResult<R> {
    f().map_err(token_error)
}

/// What a failed token call answers: the token's own refusal (422), a key gone from the
/// token (409: the daemon replaces it), or the agent's own check of the request (400), never
/// one passed off as another.
fn token_error(e: hsm_shim::Error) -> ApiError {
    use hsm_shim::Error as E;
    match e {
        E::Pkcs11 { .. } | E::Cryptoki(_) | E::BadTokenData(_) => ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the token refused: {e}"),
        ),
        E::KeyNotFound(_) => ApiError(
            StatusCode::CONFLICT,
            format!("the identity's key is no longer in the token: {e}"),
        ),
        other => ApiError(
            StatusCode::BAD_REQUEST,
            format!("this key cannot make that signature: {other}"),
        ),
    }
}

async fn sign(
    State(st): State<Arc<ApiState>>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    req: Result<Json<SignRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Json<SignResponse>> {
    st.check(&c, Operation::Sign, Some(&name))?;
    let Json(req) = req.map_err(|e| rejected("sign", e))?;
    let _slot = st.slot(&c)?;
    let s = st.served(&name)?;
    let alg_name = req.alg_name().to_owned();
    let job = req.check().map_err(bad)?;
    let key = s.key.clone();
    let sig = token_call(|| {
        if job.prehashed {
            key.sign_digest(job.alg, &job.bytes)
        } else {
            key.sign(job.alg, &job.bytes)
        }
    })
    .inspect_err(|_| count(&c, Operation::Sign, "error"))?;
    count(&c, Operation::Sign, "ok");
    Ok(Json(SignResponse {
        signature: B64.encode(sig),
        alg: alg_name,
        generation: s.generation,
        key_uri: s.key_uri.clone(),
    }))
}

/// The answer to a signature request.
#[derive(serde::Serialize)]
struct SignResponse {
    signature: String,
    alg: String,
    generation: u32,
    key_uri: String,
}

async fn jws(
    State(st): State<Arc<ApiState>>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    req: Result<Json<JwsRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    st.check(&c, Operation::Jws, Some(&name))?;
    let Json(req) = req.map_err(|e| rejected("jws", e))?;
    let _slot = st.slot(&c)?;
    let s = st.served(&name)?;
    let key = s.key.clone();
    let payload = req.payload().map_err(bad)?;
    if st.policy().credentials.contains(&name) {
        if let Err(why) = super::requests::not_a_rotation_request(&payload) {
            return Err(st.refuse(
                &c,
                Operation::Jws,
                Some(&name),
                format!("identity '{name}' is a JWK rotation API credential: {why}"),
            ));
        }
    }
    let kid = req.kid.unwrap_or_else(|| s.jws_kid.clone());
    let out = token_call(|| {
        let alg = hsm_shim::jws::JwsAlg::for_key(key.key_type());
        hsm_shim::jws::sign_compact(&key, alg, &kid, &payload)
    })
    .inspect_err(|_| count(&c, Operation::Jws, "error"))?;
    count(&c, Operation::Jws, "ok");
    Ok(Json(
        serde_json::json!({ "jws": out, "generation": s.generation }),
    ))
}

/// Hand a request to the engine thread and wait for its answer (the engine may be in the
/// middle of a step: up to a minute).
async fn ask_engine(
    st: &ApiState,
    c: &Caller,
    op: Operation,
    req: EngineRequest,
) -> ApiResult<Json<crate::control::Outcome>> {
    let answer = crate::control::ask(&st.wake, req, std::time::Duration::from_secs(60))
        .await
        .map_err(|e| match e {
            crate::control::Unanswered::Stopping => ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "the engine is stopping".into(),
            ),
            crate::control::Unanswered::Late => ApiError(
                StatusCode::GATEWAY_TIMEOUT,
                "the engine did not answer within 60 s; see `edge-signer status`".into(),
            ),
        })?;
    match answer {
        Ok(v) => {
            count(c, op, "ok");
            Ok(Json(v))
        }
        Err(e) => {
            count(c, op, "error");
            Err(ApiError(StatusCode::CONFLICT, e))
        }
    }
}

fn known(st: &ApiState, name: &str) -> ApiResult<()> {
    match st.identities.get(name) {
        Some(_) => Ok(()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no identity '{name}'"),
        )),
    }
}

async fn rotate(
    State(st): State<Arc<ApiState>>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<crate::control::Outcome>)> {
    st.check(&c, Operation::Rotate, Some(&name))?;
    known(&st, &name)?;
    let v = ask_engine(&st, &c, Operation::Rotate, EngineRequest::Rotate(name)).await?;
    Ok((StatusCode::ACCEPTED, v))
}

#[derive(serde::Deserialize)]
struct GenerationQuery {
    generation: u32,
}

async fn retire(
    State(st): State<Arc<ApiState>>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<GenerationQuery>,
) -> ApiResult<Json<crate::control::Outcome>> {
    st.check(&c, Operation::Retire, Some(&name))?;
    known(&st, &name)?;
    ask_engine(
        &st,
        &c,
        Operation::Retire,
        EngineRequest::Retire(name, q.generation),
    )
    .await
}

async fn revoke(
    State(st): State<Arc<ApiState>>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<GenerationQuery>,
) -> ApiResult<Json<crate::control::Outcome>> {
    st.check(&c, Operation::Revoke, Some(&name))?;
    known(&st, &name)?;
    ask_engine(
        &st,
        &c,
        Operation::Revoke,
        EngineRequest::Revoke(name, q.generation),
    )
    .await
}

/// `POST /v1/config/apply`: the bundle file's bytes as the body.
async fn apply(
    State(st): State<Arc<ApiState>>,
    Extension(c): Extension<Caller>,
    body: axum::body::Bytes,
) -> ApiResult<Json<crate::control::Outcome>> {
    st.check(&c, Operation::Apply, None)?;
    ask_engine(
        &st,
        &c,
        Operation::Apply,
        EngineRequest::Apply(body.to_vec(), firmware_config::Channel::Local),
    )
    .await
}

async fn status(
    State(st): State<Arc<ApiState>>,
    Extension(c): Extension<Caller>,
) -> ApiResult<Json<Vec<crate::lifecycle::plan::Status>>> {
    st.check(&c, Operation::Status, None)?;
    count(&c, Operation::Status, "ok");
    Ok(Json(st.identities.status()))
}

async fn metrics_text(
    State(st): State<Arc<ApiState>>,
    Extension(c): Extension<Caller>,
) -> ApiResult<Response> {
    st.check(&c, Operation::Metrics, None)?;
    count(&c, Operation::Metrics, "ok");
    Ok((
        [("content-type", "text/plain; version=0.0.4")],
        metrics::get().render(),
    )
        .into_response())
}

/// `GET /v1/listeners`: the listeners that could not start (`{"down": [...]}`).
async fn listeners(
    State(st): State<Arc<ApiState>>,
    Extension(c): Extension<Caller>,
) -> ApiResult<Json<serde_json::Value>> {
    st.check(&c, Operation::Status, None)?;
    count(&c, Operation::Status, "ok");
    Ok(Json(serde_json::json!({ "down": st.identities.down() })))
}
