//! The ACME account: its key is a token key (made on first use, found again by its label
//! after a restart), its JWS are made by the token, and its URL is kept beside the issuer's
//! other state. newAccount with the same key answers with the same account, so a crash
//! between making the key and writing the URL down loses nothing.

use super::client::{Client, Problem, Signer};
use firmware_config::schema::AcmeIssuer;
use hsm_shim::jws::{b64url, public_jwk, thumbprint, JwsAlg};
use hsm_shim::{KeyRef, Token, TokenKey};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The token label of issuer `name`'s account key.
pub fn key_label(name: &str) -> String {
    format!("edge-signer-acme:{name}:account")
}

/// An account ready to sign requests.
pub struct Account {
    /// The key, in the token.
    pub key: TokenKey,
    /// Its JWS algorithm.
    pub alg: JwsAlg,
    /// Its public JWK.
    pub jwk: serde_json::Value,
    /// RFC 7638 thumbprint of the JWK (key authorizations end with it).
    pub thumbprint: String,
    /// The account URL (`kid`).
    pub url: String,
}

impl Account {
    /// Sign as this account (`kid`).
    pub fn signer(&self) -> Signer<'_> {
        Signer::Kid(&self.key, self.alg, &self.url)
    }

    /// The key authorization of a challenge token.
    pub fn key_authorization(&self, token: &str) -> String {
        format!("{token}.{}", self.thumbprint)
    }
}

/// Where the account URL is kept.
fn record_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir
        .join("issuers")
        .join(name)
        .join("acme-account.json")
}

fn transport(e: impl std::fmt::Display) -> Problem {
    Problem {
        status: 0,
        kind: "account".into(),
        detail: e.to_string(),
        retry_after: None,
    }
}

/// The account key: found by its label, or made now in the token.
pub fn account_key(token: &Arc<Token>, cfg: &AcmeIssuer) -> Result<TokenKey, Problem> {
    let label = key_label(&cfg.name);
    let info = match token.find_key(&KeyRef::Label(label.clone())) {
        Ok(k) => k,
        Err(hsm_shim::Error::KeyNotFound(_)) => token
            .generate_key(cfg.account_key_type, &label)
            .map_err(transport)?,
        Err(e) => return Err(transport(e)),
    };
    Ok(TokenKey::from_info(token.clone(), info))
}

/// The account of `key` at this server: its URL from the record, or from newAccount (which
/// creates it, or finds it for a key it already knows).
pub fn ensure(
    client: &mut Client,
    key: TokenKey,
    cfg: &AcmeIssuer,
    state_dir: &Path,
) -> Result<Account, Problem> {
    let alg = JwsAlg::for_key(key.key_type());
    let jwk = public_jwk(key.info()).map_err(transport)?;
    let thumbprint = thumbprint(&jwk);
    let path = record_path(state_dir, &cfg.name);
    let recorded: Option<serde_json::Value> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(r) = recorded.filter(|r| r["thumbprint"] == thumbprint.as_str()) {
        if let Some(url) = r["url"].as_str() {
            return Ok(Account {
                url: url.to_owned(),
                key,
                alg,
                jwk,
                thumbprint,
            });
        }
    }
    let new_account = client.url("newAccount")?;
    let mut payload = serde_json::json!({ "termsOfServiceAgreed": true });
    if !cfg.contact.is_empty() {
        payload["contact"] = cfg.contact.clone().into();
    }
    if let Some(eab) = &cfg.eab {
        payload["externalAccountBinding"] = binding(eab, &new_account, &jwk)?;
    }
    let a = client.post(&new_account, &Signer::Jwk(&key, alg, &jwk), Some(&payload))?;
    let url = a
        .location
        .clone()
        .ok_or_else(|| transport("newAccount answered without the account's Location"))?;
    let record =
        serde_json::json!({ "url": url, "thumbprint": thumbprint, "directory": cfg.directory });
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))
        .and_then(|_| firmware_config::store::atomic_write(&path, record.to_string().as_bytes()))
        .map_err(|e| {
            transport(format!(
                "cannot record the account in {}: {e}",
                path.display()
            ))
        })?;
    tracing::info!(issuer = %cfg.name, account = %url, "ACME account ready");
    Ok(Account {
        key,
        alg,
        jwk,
        thumbprint,
        url,
    })
}

/// The external account binding (RFC 8555 §7.3.4): the account's JWK signed with the CA's
/// HMAC key (HS256), `kid` = the key id the CA gave.
fn binding(
    eab: &firmware_config::schema::AcmeEab,
    url: &str,
    jwk: &serde_json::Value,
) -> Result<serde_json::Value, Problem> {
    use base64::Engine;
    let raw = zeroize::Zeroizing::new(
        std::fs::read_to_string(&eab.hmac_file)
            .map_err(|e| transport(format!("eab.hmac_file {}: {e}", eab.hmac_file.display())))?,
    );
    let hmac_key = zeroize::Zeroizing::new(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(raw.trim().trim_end_matches('='))
            .map_err(|_| {
                transport(format!(
                    "eab.hmac_file {}: not a base64url HMAC key",
                    eab.hmac_file.display()
                ))
            })?,
    );
    let protected = b64url(
        serde_json::json!({"alg": "HS256", "kid": eab.key_id, "url": url})
            .to_string()
            .as_bytes(),
    );
    let payload = b64url(jwk.to_string().as_bytes());
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &hmac_key);
    let tag = ring::hmac::sign(&key, format!("{protected}.{payload}").as_bytes());
    Ok(serde_json::json!({
        "protected": protected, "payload": payload, "signature": b64url(tag.as_ref()),
    }))
}
