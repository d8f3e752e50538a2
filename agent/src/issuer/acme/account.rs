//! The ACME account: its key is a token key (made on first use, found again by its label
//! after a restart), its JWS are made by the token, and its URL and key thumbprint are in the
//! register (`Register::accounts`, written by the engine after each call). newAccount with the
//! same key answers with the same account, so a crash between making the key and the register
//! write loses nothing.

use super::client::{Client, Problem, Signer};
use crate::register::CaAccount;
use firmware_config::schema::AcmeIssuer;
use hsm_shim::jws::{b64url, public_jwk, thumbprint, JwsAlg};
use hsm_shim::{KeyRef, Token, TokenKey};
use std::sync::Arc;

/// The token label of issuer `name`'s account key.
pub fn key_label(name: &str) -> String {
    format!("edge-signer-acme:{name}:account")
}

/// The label of the key a rollover moves the account to, until the CA has it.
pub fn next_label(name: &str) -> String {
    format!("edge-signer-acme:{name}:account-next")
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

/// The register's record of the account.
pub type Record = Option<CaAccount>;

/// Record the account (the engine writes it to the register after the call).
fn write_record(record: &mut Record, cfg: &AcmeIssuer, url: &str, thumbprint: &str) {
    *record = Some(CaAccount {
        url: url.to_owned(),
        thumbprint: thumbprint.to_owned(),
        directory: cfg.directory.clone(),
    });
}

/// The account URL recorded for the key with this thumbprint at this directory.
fn recorded_for(record: &Record, cfg: &AcmeIssuer, thumbprint: &str) -> Option<String> {
    record
        .as_ref()
        .filter(|r| r.thumbprint == thumbprint && r.directory == cfg.directory)
        .map(|r| r.url.clone())
}

/// The account key: found by its label, or made now in the token.
pub fn account_key(token: &Arc<Token>, cfg: &AcmeIssuer) -> Result<TokenKey, Problem> {
    let label = key_label(&cfg.name);
    let info = match token.find_key(&KeyRef::Label(label.clone())) {
        Ok(k) => k,
        Err(hsm_shim::Error::KeyNotFound(_)) => token
            .generate_key(cfg.account_key_type, &label)
            .map_err(Problem::transport)?,
        Err(e) => return Err(Problem::transport(e)),
    };
    Ok(TokenKey::from_info(token.clone(), info))
}

/// The account of `key` at this server: its URL from the record, or from newAccount (which
/// creates it, or finds it for a key it already knows).
pub fn ensure(
    client: &mut Client,
    key: TokenKey,
    cfg: &AcmeIssuer,
    record: &mut Record,
) -> Result<Account, Problem> {
    let alg = JwsAlg::for_key(key.key_type());
    let jwk = public_jwk(key.info()).map_err(Problem::transport)?;
    let thumbprint = thumbprint(&jwk);
    if let Some(url) = recorded_for(record, cfg, &thumbprint) {
        return Ok(Account {
            url,
            key,
            alg,
            jwk,
            thumbprint,
        });
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
        .ok_or_else(|| Problem::transport("newAccount answered without the account's Location"))?;
    write_record(record, cfg, &url, &thumbprint);
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
    let raw = zeroize::Zeroizing::new(std::fs::read_to_string(&eab.hmac_file).map_err(|e| {
        Problem::transport(format!("eab.hmac_file {}: {e}", eab.hmac_file.display()))
    })?);
    let hmac_key = zeroize::Zeroizing::new(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(raw.trim().trim_end_matches('='))
            .map_err(|_| {
                Problem::transport(format!(
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

/// A key of the token by label, if there is one.
fn find(token: &Arc<Token>, label: &str) -> Result<Option<TokenKey>, Problem> {
    match token.find_key(&KeyRef::Label(label.to_owned())) {
        Ok(k) => Ok(Some(TokenKey::from_info(token.clone(), k))),
        Err(hsm_shim::Error::KeyNotFound(_)) => Ok(None),
        Err(e) => Err(Problem::transport(e)),
    }
}

/// The next key takes the account key's place: the old key's objects are destroyed, then
/// the next key gets the account label (a crash between leaves only the next key, which
/// [`settle`] relabels).
fn promote_next(
    token: &Arc<Token>,
    cfg: &AcmeIssuer,
    old: Option<&TokenKey>,
    next: &TokenKey,
) -> Result<(), Problem> {
    if let Some(o) = old {
        token.destroy(&o.info().id).map_err(Problem::transport)?;
    }
    token
        .relabel(&next.info().id, &key_label(&cfg.name))
        .map_err(Problem::transport)?;
    Ok(())
}

/// Finish a rollover a crash interrupted, from what the token and the record hold: the
/// record names the next key, or the old key is gone, or the CA answers the next key as the
/// account's (then the next key takes over); else the rollover never reached the CA and the
/// next key waits for `acme rollover` to be run again.
pub fn settle(
    client: &mut Client,
    token: &Arc<Token>,
    cfg: &AcmeIssuer,
    record: &mut Record,
) -> Result<(), Problem> {
    let Some(next) = find(token, &next_label(&cfg.name))? else {
        return Ok(());
    };
    let cur = find(token, &key_label(&cfg.name))?;
    let next_jwk = public_jwk(next.info()).map_err(Problem::transport)?;
    let next_thumb = thumbprint(&next_jwk);
    let held = recorded_for(record, cfg, &next_thumb).is_some() || cur.is_none() || {
        // Ask the CA with the next key alone whether it is the account's now.
        let alg = JwsAlg::for_key(next.key_type());
        let url = client.url("newAccount")?;
        let probe = serde_json::json!({ "onlyReturnExisting": true });
        match client.post(&url, &Signer::Jwk(&next, alg, &next_jwk), Some(&probe)) {
            Ok(a) => {
                let url = a.location.unwrap_or_default();
                write_record(record, cfg, &url, &next_thumb);
                true
            }
            Err(p) if p.kind == "accountDoesNotExist" => false,
            Err(p) => return Err(p),
        }
    };
    if held {
        promote_next(token, cfg, cur.as_ref(), &next)?;
        tracing::info!(issuer = %cfg.name, "ACME account key rollover finished");
    }
    Ok(())
}

/// Move the account to a new token key (RFC 8555 §7.3.5 keyChange), crash-safe: the new key
/// is made under the `account-next` label, the CA is told (outer JWS by the old key, inner by
/// the new), the record is written, then the old key is destroyed and the new one takes the
/// account label. Returns the new key's thumbprint.
pub fn rollover(
    client: &mut Client,
    account: &Account,
    token: &Arc<Token>,
    cfg: &AcmeIssuer,
    record: &mut Record,
) -> Result<String, Problem> {
    let next = match find(token, &next_label(&cfg.name))? {
        Some(k) => k,
        None => TokenKey::from_info(
            token.clone(),
            token
                .generate_key(cfg.account_key_type, &next_label(&cfg.name))
                .map_err(Problem::transport)?,
        ),
    };
    let next_alg = JwsAlg::for_key(next.key_type());
    let next_jwk = public_jwk(next.info()).map_err(Problem::transport)?;
    let url = client.url("keyChange")?;
    let mut protected = serde_json::Map::new();
    protected.insert("jwk".into(), next_jwk.clone());
    protected.insert("url".into(), url.clone().into());
    let inner_payload = serde_json::json!({ "account": account.url, "oldKey": account.jwk });
    let inner = hsm_shim::jws::sign_flattened(
        &next,
        next_alg,
        protected,
        inner_payload.to_string().as_bytes(),
    )
    .map_err(Problem::transport)?;
    client.post(&url, &account.signer(), Some(&inner))?;
    #[cfg(feature = "test-hooks")]
    if std::env::var("EDGE_SIGNER_TEST_KILL_AT").as_deref() == Ok("acme-keychange") {
        // Test hook: die like `kill -9` once the CA has the new key, before anything here
        // says so.
        let _ = std::process::Command::new("kill")
            .args(["-9", &std::process::id().to_string()])
            .status();
    }
    let next_thumb = thumbprint(&next_jwk);
    write_record(record, cfg, &account.url, &next_thumb);
    promote_next(token, cfg, Some(&account.key), &next)?;
    tracing::info!(issuer = %cfg.name, account = %account.url, "ACME account key rolled over");
    Ok(next_thumb)
}
