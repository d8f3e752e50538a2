//! ACME (RFC 8555) as an [`Issuer`]: `submit` opens an order for the CSR's names and hands
//! its URL to the engine, which keeps it in the register; `poll` drives that order from
//! whatever state the CA has it in (so a restarted agent resumes the same order): answers
//! the pending authorizations' challenges, finalizes with the CSR the token signed, waits
//! as long as `Retry-After` says, and downloads the chain.
//!
//! The account key is a token key and signs every request (account.rs); the transport with
//! nonces and problems is client.rs; the challenge answers are challenge.rs.

pub mod account;
pub mod challenge;
pub mod client;

use super::{csr_der, Issuer, IssuerAnswer, Request, Submitted};
use crate::clock::{rfc3339, Unix};
use client::{Client, Problem};
use firmware_config::schema::{AcmeIssuer, Challenge};
use hsm_shim::rustls::pki_types::CertificateDer;
use hsm_shim::Token;
use std::sync::Arc;

/// An ACME CA.
pub struct Acme {
    cfg: AcmeIssuer,
    token: Arc<Token>,
    /// The account as the register holds it (given at start, read back by the engine).
    record: account::Record,
    anchors: Vec<CertificateDer<'static>>,
    server_roots: Vec<CertificateDer<'static>>,
    client: Option<Client>,
    account: Option<account::Account>,
    responders: challenge::Responders,
}

/// The identifiers of a CSR's subjectAltName (RFC 8555 `dns`, RFC 8738 `ip`).
pub fn csr_identifiers(csr_pem: &str) -> Result<Vec<serde_json::Value>, String> {
    use x509_cert::der::{Decode, Encode};
    let der = csr_der(csr_pem)?;
    let req = x509_cert::request::CertReq::from_der(&der).map_err(|e| format!("CSR: {e}"))?;
    let mut ids = Vec::new();
    for attr in req.info.attributes.iter() {
        if attr.oid.to_string() != "1.2.840.113549.1.9.14" {
            continue;
        }
        for v in attr.values.iter() {
            let exts = v
                .to_der()
                .ok()
                .and_then(|d| x509_cert::ext::Extensions::from_der(&d).ok())
                .unwrap_or_default();
            for san in crate::validate::sans_in(exts.iter()) {
                ids.push(match san {
                    hsm_shim::csr::San::Dns(d) => serde_json::json!({"type": "dns", "value": d}),
                    hsm_shim::csr::San::Ip(ip) => {
                        serde_json::json!({"type": "ip", "value": ip.to_string()})
                    }
                });
            }
        }
    }
    if ids.is_empty() {
        return Err("the CSR names no DNS name or IP address (an ACME CA validates those): set the identity's sans".into());
    }
    Ok(ids)
}

/// A failed call as the engine takes it: a rate limit or `Retry-After` is a wait, a
/// transient failure is retried, anything else refuses this order for good.
fn answer_of(p: Problem, what: &str, now: Unix) -> IssuerAnswer {
    if p.status == 429 || p.kind == "rateLimited" {
        let until = p.retry_after.unwrap_or(now + 3600);
        return IssuerAnswer::Wait {
            until,
            what: format!(
                "ACME rate limit ({what}): {}; retry at {}",
                p.detail,
                rfc3339(until)
            ),
        };
    }
    if p.transient() {
        return IssuerAnswer::Unreachable(format!("ACME {what}: {p}"));
    }
    IssuerAnswer::Rejected(format!("ACME {what}: {p}"))
}

fn wait(until: Unix, what: impl Into<String>) -> IssuerAnswer {
    IssuerAnswer::Wait {
        until,
        what: what.into(),
    }
}

impl Acme {
    /// From config: the CA bundles are read now; the account is made or found at the first
    /// request.
    pub fn new(cfg: &AcmeIssuer, token: &Arc<Token>) -> crate::error::Result<Acme> {
        let anchors = crate::tlsconf::load_certs(&cfg.ca_bundle)?;
        let server_roots = match &cfg.server_ca {
            Some(p) => crate::tlsconf::load_certs(p)?,
            None => anchors.clone(),
        };
        Ok(Acme {
            cfg: cfg.clone(),
            token: token.clone(),
            record: None,
            anchors,
            server_roots,
            client: None,
            account: None,
            responders: challenge::Responders::default(),
        })
    }

    /// The directory read and the account ready (once per process).
    fn session(&mut self) -> Result<(), Problem> {
        if self.client.is_none() {
            let roots = crate::tlsconf::roots_of(&self.server_roots).map_err(Problem::transport)?;
            self.client = Some(Client::connect(
                &self.cfg.directory,
                roots,
                self.cfg.timeout.to_std(),
            )?);
        }
        if self.account.is_none() {
            let client = self
                .client
                .as_mut()
                .ok_or_else(|| Problem::transport("no ACME directory"))?;
            account::settle(client, &self.token, &self.cfg, &mut self.record)?;
            let key = account::account_key(&self.token, &self.cfg)?;
            self.account = Some(account::ensure(client, key, &self.cfg, &mut self.record)?);
        }
        Ok(())
    }

    /// POST (or POST-as-GET with `None`) as the account.
    fn post(
        &mut self,
        url: &str,
        payload: Option<&serde_json::Value>,
    ) -> Result<client::Answer, Problem> {
        self.session()?;
        let (Some(c), Some(a)) = (self.client.as_mut(), self.account.as_ref()) else {
            return Err(Problem::transport("no ACME session"));
        };
        c.post(url, &a.signer(), payload)
    }

    fn get_json(&mut self, url: &str) -> Result<serde_json::Value, Problem> {
        Ok(self.get_with_retry(url)?.0)
    }

    /// A URL of the directory (`newOrder`, `revokeCert`), the session ready.
    fn directory_url(&mut self, name: &str) -> Result<String, Problem> {
        self.session()?;
        match &self.client {
            Some(c) => c.url(name),
            None => Err(Problem::transport("no ACME directory")),
        }
    }

    /// An object and the `Retry-After` that came with it.
    fn get_with_retry(&mut self, url: &str) -> Result<(serde_json::Value, Option<Unix>), Problem> {
        let a = self.post(url, None)?;
        Ok((a.json()?, a.retry_after))
    }

    /// Work on each authorization of `order`: valid ones are done; for a pending one the
    /// preferred challenge the CA offers is provisioned and, once, answered.
    fn authorize(&mut self, order: &serde_json::Value, now: Unix) -> IssuerAnswer {
        let urls = authorization_urls(order);
        let mut waiting = Vec::new();
        for url in urls {
            let authz = match self.get_json(&url) {
                Ok(a) => a,
                Err(p) => return answer_of(p, "authorization", now),
            };
            let domain = authz["identifier"]["value"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            match authz["status"].as_str().unwrap_or("") {
                "valid" => continue,
                "pending" => {}
                "invalid" => return IssuerAnswer::Rejected(failed_challenge(&authz, &domain)),
                other => {
                    return IssuerAnswer::Rejected(format!(
                        "ACME authorization for {domain} is {other}"
                    ))
                }
            }
            match self.answer_challenge(&authz, &domain) {
                Ok(kind) => waiting.push(format!("{} for {domain}", kind.as_str())),
                Err(a) => return a,
            }
        }
        wait(
            now + 1,
            format!("ACME: the CA validates {}", waiting.join(", ")),
        )
    }

    /// Provision and (if not yet done) answer the preferred challenge of `authz`.
    fn answer_challenge(
        &mut self,
        authz: &serde_json::Value,
        domain: &str,
    ) -> Result<Challenge, IssuerAnswer> {
        let offered: Vec<&serde_json::Value> = authz["challenges"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();
        let chosen = self.cfg.challenges.iter().find_map(|kind| {
            offered
                .iter()
                .find(|c| c["type"] == kind.as_str())
                .map(|c| (*kind, *c))
        });
        let Some((kind, ch)) = chosen else {
            let types: Vec<&str> = offered.iter().filter_map(|c| c["type"].as_str()).collect();
            return Err(IssuerAnswer::Rejected(format!(
                "the ACME CA offers {} for {domain}; this issuer answers {:?} (challenges)",
                types.join(", "),
                self.cfg
                    .challenges
                    .iter()
                    .map(|c| c.as_str())
                    .collect::<Vec<_>>()
            )));
        };
        let token = ch["token"].as_str().unwrap_or("").to_owned();
        let url = ch["url"].as_str().unwrap_or("").to_owned();
        let key_auth = match &self.account {
            Some(a) => a.key_authorization(&token),
            None => return Err(IssuerAnswer::Unreachable("no ACME account".into())),
        };
        self.responders
            .provision(&self.cfg, kind, domain, &token, &key_auth)
            .map_err(|e| {
                IssuerAnswer::Unreachable(format!("{} challenge for {domain}: {e}", kind.as_str()))
            })?;
        if ch["status"] == "pending" {
            let now = crate::clock::Clock::now(&crate::clock::SystemClock);
            self.post(&url, Some(&serde_json::json!({})))
                .map_err(|p| answer_of(p, &format!("{} challenge", kind.as_str()), now))?;
            tracing::info!(issuer = %self.cfg.name, challenge = kind.as_str(), %domain, "ACME challenge answered");
        }
        Ok(kind)
    }

    /// Why an order is invalid: the challenge that failed, named with the CA's reason, or
    /// the order's own error.
    fn why_invalid(&mut self, order: &serde_json::Value) -> String {
        let urls = authorization_urls(order);
        for url in urls {
            if let Ok(authz) = self.get_json(&url) {
                if authz["status"] == "invalid" {
                    let domain = authz["identifier"]["value"].as_str().unwrap_or("?");
                    return failed_challenge(&authz, domain);
                }
            }
        }
        format!(
            "ACME order is invalid: {}",
            crate::text::one_line(order["error"]["detail"].as_str().unwrap_or("no detail"))
        )
    }

    /// The chain of a valid order.
    fn download(&mut self, order: &serde_json::Value, now: Unix) -> IssuerAnswer {
        let Some(url) = order["certificate"].as_str() else {
            return IssuerAnswer::Unreachable(
                "ACME order is valid but names no certificate".into(),
            );
        };
        let a = match self.post(url, None) {
            Ok(a) => a,
            Err(p) => return answer_of(p, "certificate download", now),
        };
        self.responders.clear(&self.cfg);
        let mut pem = String::from_utf8_lossy(&a.body).into_owned();
        if let Some(want) = self.cfg.preferred_chain.clone() {
            if !tops_with(&pem, &want) {
                for alt in client::alternates(&a.links) {
                    match self.post(&alt, None) {
                        Ok(b) if tops_with(&String::from_utf8_lossy(&b.body), &want) => {
                            pem = String::from_utf8_lossy(&b.body).into_owned();
                            break;
                        }
                        Ok(_) => {}
                        Err(p) => return answer_of(p, "alternate chain download", now),
                    }
                }
                if !tops_with(&pem, &want) {
                    tracing::warn!(issuer = %self.cfg.name, "no chain the CA offers reaches '{want}' (preferred_chain): the default one is used");
                }
            }
        }
        IssuerAnswer::Issued(pem)
    }
}

/// The authorization URLs of an order.
fn authorization_urls(order: &serde_json::Value) -> Vec<String> {
    order["authorizations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u.as_str().map(str::to_owned))
        .collect()
}

/// Whether the top certificate of `pem` was issued by a CA with common name `cn`.
fn tops_with(pem: &str, cn: &str) -> bool {
    crate::validate::parse_chain(pem)
        .ok()
        .and_then(|chain| chain.last().and_then(|c| crate::validate::issuer_cn(c)))
        .is_some_and(|got| got == cn)
}

/// "CHALLENGE challenge for DOMAIN failed: DETAIL" of an invalid authorization.
pub fn failed_challenge(authz: &serde_json::Value, domain: &str) -> String {
    let failed = authz["challenges"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["status"] == "invalid" || c.get("error").is_some());
    match failed {
        Some(c) => format!(
            "ACME {} challenge for {domain} failed: {}",
            c["type"].as_str().unwrap_or("?"),
            crate::text::one_line(c["error"]["detail"].as_str().unwrap_or("no detail"))
        ),
        None => format!("ACME authorization for {domain} is invalid"),
    }
}

impl Issuer for Acme {
    fn submit(&mut self, req: &Request, now: Unix) -> Result<Submitted, IssuerAnswer> {
        let identifiers = csr_identifiers(req.csr_pem).map_err(IssuerAnswer::Rejected)?;
        let new_order = self
            .directory_url("newOrder")
            .map_err(|p| answer_of(p, "account", now))?;
        let a = self
            .post(
                &new_order,
                Some(&serde_json::json!({ "identifiers": identifiers })),
            )
            .map_err(|p| answer_of(p, "newOrder", now))?;
        let reference = a.location.ok_or_else(|| {
            IssuerAnswer::Unreachable("newOrder answered without the order's Location".into())
        })?;
        tracing::info!(issuer = %self.cfg.name, order = %reference, "ACME order created");
        Ok(Submitted {
            reference,
            answer: None,
        })
    }

    fn poll(&mut self, req: &Request, reference: &str, now: Unix) -> IssuerAnswer {
        // A few state changes in one call: ready -> processing -> valid often take under a
        // second.
        for _ in 0..4 {
            let (order, retry_after) = match self.get_with_retry(reference) {
                Ok(o) => o,
                Err(p) => return answer_of(p, "order", now),
            };
            match order["status"].as_str().unwrap_or("") {
                "pending" => return self.authorize(&order, now),
                "ready" => {
                    let csr = match csr_der(req.csr_pem) {
                        Ok(d) => hsm_shim::jws::b64url(&d),
                        Err(e) => return IssuerAnswer::Rejected(e),
                    };
                    let Some(fin) = order["finalize"].as_str().map(str::to_owned) else {
                        return IssuerAnswer::Unreachable(
                            "ACME order names no finalize URL".into(),
                        );
                    };
                    if let Err(p) = self.post(&fin, Some(&serde_json::json!({ "csr": csr }))) {
                        return answer_of(p, "finalize", now);
                    }
                }
                // The CA said when to look again: that wait is persisted (it is in `what`)
                // and kept by any process that takes over.
                "processing" => match retry_after {
                    Some(until) if until > now + 1 => {
                        return wait(
                            until,
                            format!("ACME: the CA is issuing; Retry-After {}", rfc3339(until)),
                        )
                    }
                    _ => std::thread::sleep(std::time::Duration::from_millis(500)),
                },
                "valid" => return self.download(&order, now),
                "invalid" => {
                    self.responders.clear(&self.cfg);
                    return IssuerAnswer::Rejected(self.why_invalid(&order));
                }
                other => return IssuerAnswer::Unreachable(format!("ACME order status {other:?}")),
            }
        }
        wait(now + 2, "ACME: the CA is issuing the certificate")
    }

    fn ca_bundle(&self) -> &[CertificateDer<'static>] {
        &self.anchors
    }

    fn account(&self) -> Option<crate::register::CaAccount> {
        self.record.clone()
    }

    fn restore_account(&mut self, account: Option<crate::register::CaAccount>) {
        self.record = account;
        self.account = None;
    }

    fn rollover_account(&mut self) -> Result<String, String> {
        self.session().map_err(|p| p.to_string())?;
        let (Some(c), Some(a)) = (self.client.as_mut(), self.account.as_ref()) else {
            return Err("no ACME session".into());
        };
        let t = account::rollover(c, a, &self.token, &self.cfg, &mut self.record)
            .map_err(|p| format!("ACME keyChange: {p}"))?;
        self.account = None;
        Ok(t)
    }

    /// `revokeCert` (RFC 8555 §7.6) signed by the account key, reason unspecified.
    fn revoke(&mut self, chain_pem: &str) -> Result<bool, String> {
        let leaf = crate::validate::parse_chain(chain_pem)
            .map_err(|e| e.to_string())?
            .into_iter()
            .next()
            .ok_or("no certificate to revoke")?;
        let url = self
            .directory_url("revokeCert")
            .map_err(|p| p.to_string())?;
        let payload = serde_json::json!({ "certificate": hsm_shim::jws::b64url(&leaf) });
        self.post(&url, Some(&payload))
            .map_err(|p| format!("ACME revokeCert: {p}"))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_rate_limit_is_a_wait_until_retry_after_and_a_5xx_a_retry() {
        let p = |status: u16, kind: &str, retry_after| Problem {
            status,
            kind: kind.into(),
            detail: "d".into(),
            retry_after,
        };
        match answer_of(p(429, "rateLimited", Some(5000)), "newOrder", 1000) {
            IssuerAnswer::Wait { until, what } => {
                assert_eq!(until, 5000);
                assert!(what.contains("rate limit"), "{what}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            answer_of(p(429, "rateLimited", None), "x", 1000),
            IssuerAnswer::Wait { until: 4600, .. }
        ));
        assert!(matches!(
            answer_of(p(503, "serverInternal", None), "x", 0),
            IssuerAnswer::Unreachable(_)
        ));
        assert!(matches!(
            answer_of(p(403, "unauthorized", None), "x", 0),
            IssuerAnswer::Rejected(_)
        ));
    }

    proptest! {
        #[test]
        fn any_csr_text_is_read_without_a_panic(s in ".{0,300}") {
            let _ = csr_identifiers(&s);
        }

        #[test]
        fn any_authorization_is_described_without_a_panic(s in ".{0,200}") {
            let v: serde_json::Value = serde_json::from_str(&s).unwrap_or(serde_json::Value::String(s));
            let _ = failed_challenge(&v, "x");
        }
    }
}
