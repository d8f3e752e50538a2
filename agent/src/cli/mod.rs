//! The CLI's command groups (the clap definitions are in main.rs) and what they share:
//! opening the token from the global options, printing human or JSON output.

pub(crate) mod config;
pub(crate) mod diag;
pub(crate) mod keys;
pub(crate) mod lifecycle;

use crate::*;
use anyhow::{bail, Context, Result};
use edge_signer::{http, tlsconf};
use hsm_shim::csr::{San, Subject};
use hsm_shim::{KeyRef, Pin, PinSource, Pkcs11Uri, Token, TokenKey, TokenSelector};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

impl Global {
    /// `[token]` of the configuration, when it loads: what every command falls back to
    /// after the options, the environment and the key URI (loaded once per command).
    fn configured_token(&self) -> Option<firmware_config::schema::TokenConfig> {
        self.token_config
            .get_or_init(|| {
                edge_signer::configuration::load(&sources(self))
                    .ok()
                    .map(|l| l.effective.config.token)
            })
            .clone()
    }

    pub(crate) fn module(&self, uri: Option<&Pkcs11Uri>) -> Result<PathBuf> {
        if let Some(m) = &self.module {
            return Ok(m.clone());
        }
        if let Some(m) = uri.and_then(|u| u.module_path.as_ref()) {
            return Ok(PathBuf::from(m));
        }
        if let Some(m) = self.configured_token().and_then(|t| t.module) {
            return Ok(m);
        }
        bail!("no PKCS#11 module: pass --module PATH, set EDGE_SIGNER_MODULE, or token.module in the configuration (SoftHSM: /usr/lib/softhsm/libsofthsm2.so)")
    }

    pub(crate) fn pin(&self, uri: Option<&Pkcs11Uri>) -> Result<Pin> {
        let src = match (&self.pin_file, uri.and_then(|u| u.pin_source.as_ref())) {
            (Some(f), _) => PinSource::File(f.clone()),
            (None, Some(s)) => PinSource::File(PathBuf::from(s.strip_prefix("file:").unwrap_or(s))),
            (None, None) => match self.configured_token().and_then(|t| t.pin) {
                Some(p) => p.source(),
                None => return Err(hsm_shim::Error::PinRequired.into()),
            },
        };
        Ok(src.read()?)
    }

    pub(crate) fn selector(&self, uri: Option<&Pkcs11Uri>) -> Result<TokenSelector> {
        if let Some(t) = &self.token {
            return Ok(TokenSelector::Label(t.clone()));
        }
        match uri {
            Some(Pkcs11Uri { token: Some(t), .. }) => return Ok(TokenSelector::Label(t.clone())),
            Some(Pkcs11Uri {
                serial: Some(s), ..
            }) => return Ok(TokenSelector::Serial(s.clone())),
            _ => {}
        }
        match self.configured_token() {
            Some(firmware_config::schema::TokenConfig { label: Some(l), .. }) => {
                Ok(TokenSelector::Label(l))
            }
            Some(firmware_config::schema::TokenConfig {
                serial: Some(s), ..
            }) => Ok(TokenSelector::Serial(s)),
            _ => bail!("no token: pass --token LABEL, set EDGE_SIGNER_TOKEN, or token.label in the configuration"),
        }
    }

    pub(crate) fn open_token(&self, uri: Option<&Pkcs11Uri>) -> Result<Arc<Token>> {
        let module = self.module(uri)?;
        let sel = self.selector(uri)?;
        let pin = self.pin(uri)?;
        Ok(Token::open(&module, &sel, Some(pin))?)
    }

    pub(crate) fn open_key(&self, uri: &str) -> Result<TokenKey> {
        let uri = Pkcs11Uri::parse(uri)?;
        let token = self.open_token(Some(&uri))?;
        Ok(TokenKey::open(token, &KeyRef::from_uri(&uri)?)?)
    }
}

pub(crate) fn print(json_out: bool, value: serde_json::Value, human: impl FnOnce() -> String) {
    if json_out {
        // What devices and CAs wrote may be in it: no raw control character reaches a terminal.
        println!(
            "{}",
            edge_signer::text::printable_json_text(&format!("{value:#}"))
        );
    } else {
        print!("{}", edge_signer::text::printable_lines(&human()));
    }
}

pub(crate) fn key_json(k: &hsm_shim::KeyInfo, token: &Token) -> serde_json::Value {
    json!({
        "uri": k.uri(token).to_string(),
        "id": hsm_shim::keys::hex(&k.id),
        "label": k.label,
        "type": k.key_type.as_str(),
        "has_cert": k.has_cert,
        "public_key_pem": k.spki_pem(),
    })
}

pub(crate) fn identity(
    g: &Global,
    id: &Identity,
) -> Result<(
    hsm_shim::TlsSigningKey,
    Arc<hsm_shim::rustls::sign::CertifiedKey>,
)> {
    let key = g.open_key(&id.key)?;
    let mut chain = tlsconf::load_certs(&id.cert)?;
    if let Some(c) = &id.chain {
        chain.extend(tlsconf::load_certs(c)?);
    }
    let signer = hsm_shim::TlsSigningKey::new(key);
    let ck = hsm_shim::tls::certified_key(signer.clone(), chain)
        .with_context(|| format!("refusing {} for key {}", id.cert.display(), id.key))?;
    Ok((signer, ck))
}

/// Write a file through a temp file and rename, so a power cut never leaves half of it.
pub(crate) fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    firmware_config::store::atomic_write(path, data)
        .with_context(|| format!("cannot write {}", path.display()))
}

pub(crate) fn sources(g: &Global) -> firmware_config::Sources {
    firmware_config::Sources {
        defaults: g.defaults.clone(),
        local: g.config.clone(),
    }
}
pub(crate) fn overrides(g: &Global) -> edge_signer::daemon::TokenOverride {
    edge_signer::daemon::TokenOverride {
        module: g.module.clone(),
        label: g.token.clone(),
        pin_file: g.pin_file.clone(),
    }
}
