//! A test JWK credential-rotation API that follows the documented contract and nothing more:
//! verifies the JWS against the current public key (or the old one until its
//! CurrentKeyExpiry), refuses a reused kid or out-of-bound dates, answers 201. No idempotent
//! replay: the same PUT after an applied rotation is refused (kid used before; the signer is
//! no longer the current key). `GET /api/v1/whoami` answers 200 to a JWS made by a key that
//! may sign now and 401 otherwise (the agent's verification call, `probe_url`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64U;
use base64::Engine as _;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One key the API knows.
#[derive(Debug, Clone)]
pub struct ApiKey {
    /// kid.
    pub kid: String,
    /// 04 || X || Y.
    pub point: Vec<u8>,
    /// Until when an old key may still sign (None: current).
    pub expires: Option<u64>,
}

/// The API's state.
#[derive(Debug, Default)]
pub struct ApiState {
    /// Keys, current last.
    pub keys: Vec<ApiKey>,
    /// Every kid ever registered.
    pub kids: Vec<String>,
    /// Apply the next rotation but never answer it.
    pub drop_next_answer: bool,
    /// Drop the next rotation unapplied and unanswered (lost on the way in).
    pub drop_next_request: bool,
    /// Rotations applied.
    pub rotations: u32,
    /// Every refusal, with its reason.
    pub refusals: Vec<String>,
    /// Verification calls answered.
    pub whoami_calls: u32,
}

fn point(jwk: &Value) -> Option<Vec<u8>> {
    let x = B64U.decode(jwk["X"].as_str()?).ok()?;
    let y = B64U.decode(jwk["Y"].as_str()?).ok()?;
    (x.len() == 32 && y.len() == 32).then(|| [vec![4], x, y].concat())
}

impl ApiState {
    /// Onboarding: the first key, as exported by the device.
    pub fn register(&mut self, jwk: &Value) {
        let kid = jwk["Kid"].as_str().expect("Kid").to_owned();
        self.kids.push(kid.clone());
        self.keys.push(ApiKey {
            kid,
            point: point(jwk).expect("X/Y"),
            expires: None,
        });
    }

    /// Verify a compact JWS made by a key the API accepts now; returns (kid, payload).
    pub fn verify(&self, jws: &str) -> Result<(String, Vec<u8>), String> {
        let parts: Vec<&str> = jws.split('.').collect();
        let [h, p, s] = parts[..] else {
            return Err("not a compact JWS".into());
        };
        let header: Value = serde_json::from_slice(&B64U.decode(h).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        if header["alg"] != "ES256" {
            return Err(format!("alg {}", header["alg"]));
        }
        let kid = header["kid"].as_str().unwrap_or_default().to_owned();
        let key = self
            .keys
            .iter()
            .find(|k| k.kid == kid && k.expires.is_none_or(|t| now() < t))
            .ok_or_else(|| format!("kid {kid} is not a key that may sign now"))?;
        let sig = B64U.decode(s).map_err(|e| e.to_string())?;
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            &key.point,
        )
        .verify(format!("{h}.{p}").as_bytes(), &sig)
        .map_err(|_| "bad signature".to_owned())?;
        Ok((kid, B64U.decode(p).map_err(|e| e.to_string())?))
    }

    fn rotate(&mut self, url_kid: &str, auth: &str, body: &[u8]) -> (u16, String) {
        let Some(jws) = auth.strip_prefix("JWS ") else {
            return (401, "Authorization: JWS <compact JWS> expected".into());
        };
        let (signer, payload) = match self.verify(jws) {
            Ok(v) => v,
            Err(e) => return (401, e),
        };
        if payload != body {
            return (400, "the JWS payload is not the request body".into());
        }
        let Ok(req) = serde_json::from_slice::<Value>(body) else {
            return (400, "body is not JSON".into());
        };
        let pk = &req["PublicKey"];
        if pk["Kty"] != "EC" || pk["Crv"] != "P-256" || pk["Use"] != "sig" || pk["Kid"] != url_kid {
            return (
                400,
                "PublicKey must be an EC P-256 sig key whose Kid is the URL's kid".into(),
            );
        }
        let Some(new_point) = point(pk) else {
            return (400, "bad X/Y".into());
        };
        let date = |k: &str| {
            req[k]
                .as_str()
                .and_then(|s| edge_signer::clock::parse_date(s).ok())
        };
        let (Some(exp), Some(cur_exp)) = (date("Expiration"), date("CurrentKeyExpiry")) else {
            return (400, "dates".into());
        };
        if exp > now() + 365 * 86_400 || cur_exp > now() + 14 * 86_400 || cur_exp < now() {
            return (
                400,
                "Expiration at most 365 days, CurrentKeyExpiry at most 14 days ahead".into(),
            );
        }
        // Only the current key may rotate (an old key in its grace period may only sign calls).
        if self.keys.last().is_some_and(|k| k.kid != signer) {
            return (403, format!("kid {signer} is not the current credential"));
        }
        if self.kids.iter().any(|k| k == url_kid) {
            return (409, format!("kid {url_kid} was used before"));
        }
        if let Some(cur) = self.keys.last_mut() {
            cur.expires = Some(cur_exp);
        }
        self.keys.push(ApiKey {
            kid: url_kid.to_owned(),
            point: new_point,
            expires: None,
        });
        self.kids.push(url_kid.to_owned());
        self.rotations += 1;
        (201, "Created".into())
    }
}

/// The running API.
pub struct JwkApi {
    /// Port on 127.0.0.1.
    pub port: u16,
    /// Its CA (the device's ca_bundle).
    pub ca_file: PathBuf,
    /// State.
    pub state: Arc<Mutex<ApiState>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl JwkApi {
    /// Start; the CA is written to `dir/jwk-ca.pem`.
    pub fn start(dir: &Path) -> JwkApi {
        let pki = crate::httpd::TestPki::new("JWK API test CA");
        let ca_file = dir.join("jwk-ca.pem");
        std::fs::write(&ca_file, pki.ca_cert.pem()).expect("ca file");
        let cfg = pki.server_config(None);
        let state = Arc::new(Mutex::new(ApiState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let st = state.clone();
        let (port, handle) = crate::httpd::serve(cfg, stop.clone(), move |_conn, head, body| {
            let mut first = head.lines().next().unwrap_or("").split_whitespace();
            let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
            let auth = crate::httpd::header(head, "authorization").unwrap_or_default();
            let (status, text) = match (
                method,
                path.strip_prefix("/api/v1/keys/credential/rotate-to/"),
            ) {
                ("PUT", Some(kid)) => {
                    let mut s = st.lock().unwrap();
                    if s.drop_next_request {
                        s.drop_next_request = false;
                        return None; // lost before the API saw it
                    }
                    let r = s.rotate(kid, &auth, body);
                    if r.0 != 201 {
                        s.refusals.push(r.1.clone());
                    }
                    if r.0 == 201 && s.drop_next_answer {
                        s.drop_next_answer = false;
                        return None; // applied, but the answer is lost
                    }
                    r
                }
                ("GET", _) if path == "/api/v1/whoami" => {
                    let mut s = st.lock().unwrap();
                    s.whoami_calls += 1;
                    match auth.strip_prefix("JWS ").map(|j| s.verify(j)) {
                        Some(Ok((kid, _))) => (200, format!("{{\"kid\":\"{kid}\"}}")),
                        Some(Err(e)) => (401, e),
                        None => (401, "Authorization: JWS <compact JWS> expected".into()),
                    }
                }
                // Onboarding, as a person does it in the provider's portal (test helper only).
                ("POST", _) if path == "/test/register" => {
                    match serde_json::from_slice::<Value>(body) {
                        Ok(jwk) if point(&jwk).is_some() && jwk["Kid"].is_string() => {
                            st.lock().unwrap().register(&jwk);
                            (201, "registered".into())
                        }
                        _ => (400, "a JWK with Kid, X, Y".into()),
                    }
                }
                _ => (404, "not found".into()),
            };
            Some(crate::httpd::response(
                &format!("{status} {}", crate::httpd::reason(status)),
                "",
                text.as_bytes(),
            ))
        });
        JwkApi {
            port,
            ca_file,
            state,
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for JwkApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Firmware defaults for one JWK-rotation identity `api` against the API at `port` (CA
/// `ca`); `verify` sets probe_url to its verification endpoint.
pub fn jwk_config_at(
    env: &crate::Env,
    port: u16,
    ca: &std::path::Path,
    old_key_overlap: &str,
    verify: bool,
) {
    let p = env.dir.path().display();
    let probe = if verify {
        format!("probe_url = \"https://127.0.0.1:{port}/api/v1/whoami\"")
    } else {
        String::new()
    };
    let cfg = format!(
        r#"
{token}
[[identity]]
name = "api"
subject = {{ cn = "gw-7-api" }}
issuer = "cards"
{probe}
[identity.renewal]
retry_min = "1s"
retry_max = "2s"

[[issuer]]
name = "cards"
kind = "jwk-rotation"
url = "https://127.0.0.1:{port}"
ca_bundle = "{ca}"
new_key_lifetime = "300d"
old_key_overlap = "{old_key_overlap}"

[paths]
state_dir = "{p}/state"
"#,
        token = env.token_toml(),
        ca = ca.display(),
    );
    std::fs::write(env.path("defaults.toml"), cfg).unwrap();
}
