//! The certificate flow (portal, EST): key and CSR, submission, validation, probe, promotion.

use super::{Engine, Progress};
use crate::clock::{rfc3339, Unix};
use crate::error::Result;
use crate::events::Severity;
use crate::issuer::{IssuerAnswer, Request, Submitted};
use crate::register::{GenStatus, IdentityRecord, IssuedCert, KeyRecord, Material, Step, Waiting};
use crate::validate::{self, Expected};
use firmware_config::schema::IdentityConfig;
use hsm_shim::csr::Subject;
use hsm_shim::rustls::sign::CertifiedKey;
use hsm_shim::{Pkcs11Uri, TokenKey};
use std::sync::Arc;

impl Engine {
    pub(super) fn make_key(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
    ) -> Result<Progress> {
        let g = Self::pending(rec)?;
        let decrypt = self.issuer(&cfg.issuer)?.key_decrypts();
        let info = self.find_or_generate(&g.key_label, cfg.key_type, decrypt)?;
        let key = TokenKey::from_info(self.token.clone(), info.clone());
        let subject = Subject::parse(&g.subject)?;
        let csr = hsm_shim::csr::build_csr(&key, &subject, &cfg.sans)?;
        let uri = info.uri(&self.token).to_string();
        let gm = self.gen_mut(name, g.number)?;
        gm.material = Material::Requested {
            key: KeyRecord { id: info.id, uri },
            csr_pem: csr,
            submission: None,
        };
        self.move_to(
            name,
            Step::CsrReady,
            g.number,
            format!("key {} generated in the token; CSR built", g.key_label),
        )?;
        Ok(Progress::Moved)
    }

    /// The serving identity as a rustls key, and its token key, while its certificate is
    /// valid.
    pub(super) fn current_identity(
        &self,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Option<(Arc<CertifiedKey>, TokenKey)> {
        let g = rec.current_gen()?;
        let cert = g.cert()?;
        if cert.not_after <= now {
            return None;
        }
        let key = self.open_key(g.key()?).ok()?;
        let chain = validate::parse_chain(&cert.chain_pem).ok()?;
        let ck = hsm_shim::tls::certified_key(hsm_shim::TlsSigningKey::new(key.clone()), chain);
        Some((ck.ok()?, key))
    }

    pub(super) fn ask_issuer(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Result<Progress> {
        let r = self.ask_issuer_once(name, cfg, rec, now);
        // What the issuer learnt of its CA account (ACME) goes to the register too.
        self.keep_account(&cfg.issuer)?;
        r
    }

    fn ask_issuer_once(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Result<Progress> {
        let (g, key) = self.pending_key(rec)?;
        let spki = key.info().spki.clone();
        let csr = g.need_csr()?.to_owned();
        let (current, current_key) = self.current_identity(rec, now).unzip();
        let req = Request {
            identity: name,
            generation: g.number,
            csr_pem: &csr,
            spki: &spki,
            current,
            key: Some(&key),
            current_key,
            credential: None,
        };
        let issuer = self.issuer(&cfg.issuer)?;
        let answer = match (&rec.step, g.submission()) {
            (Step::Submitted, Some(reference)) => issuer.poll(&req, reference, now),
            _ => match issuer.submit(&req, now) {
                Ok(Submitted { reference, answer }) => {
                    self.gen_mut(name, g.number)?
                        .set_submission(Some(reference.clone()))?;
                    let note = format!("CSR submitted to {} as {reference}", cfg.issuer);
                    let r = self.rec(name);
                    r.transition(now, Step::Submitted, g.number, note);
                    // What the server answered at once is on disk before the next step.
                    match answer {
                        Some(IssuerAnswer::Issued(pem)) => {
                            return self.received(name, g.number, pem)
                        }
                        Some(IssuerAnswer::Wait { until, what }) => {
                            r.waiting = Some(Waiting { until, what });
                        }
                        _ => {}
                    }
                    self.save(name)?;
                    return Ok(Progress::Moved);
                }
                Err(a) => a,
            },
        };
        match answer {
            IssuerAnswer::Wait { until, what } => {
                // Persist only what changes, not every poll (flash wears out). A server's
                // Retry-After changes `what`, so it is always on disk for other processes.
                let r = self.rec(name);
                if r.waiting.as_ref().map(|w| &w.what) != Some(&what) {
                    r.waiting = Some(Waiting {
                        until,
                        what: what.clone(),
                    });
                    self.save(name)?;
                }
                Ok(Progress::Wait { until, what })
            }
            IssuerAnswer::Issued(pem) => self.received(name, g.number, pem),
            IssuerAnswer::Rejected(why) => self.abandon(
                name,
                g.number,
                format!("issuer {} refused: {why}", cfg.issuer),
            ),
            IssuerAnswer::Unreachable(why) | IssuerAnswer::Unknown(why) => {
                self.fail(name, format!("issuer {} unreachable: {why}", cfg.issuer))
            }
            IssuerAnswer::Confirmed => self.fail(
                name,
                format!("issuer {} confirmed without a certificate", cfg.issuer),
            ),
        }
    }

    fn received(&mut self, name: &str, n: u32, pem: String) -> Result<Progress> {
        self.gen_mut(name, n)?.issue(pem)?;
        self.rec(name).failure = None;
        self.move_to(name, Step::Issued, n, "certificate received")?;
        Ok(Progress::Moved)
    }

    pub(super) fn check_cert(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Result<Progress> {
        let (g, key) = self.pending_key(rec)?;
        let subject = Subject::parse(&g.subject)?;
        let issuer = self.issuer(&cfg.issuer)?;
        let (anchors, intermediates) = (issuer.ca_bundle().to_vec(), issuer.intermediates());
        let want = Expected {
            spki: &key.info().spki,
            subject: &subject,
            sans: &cfg.sans,
            usages: &cfg.usage,
            policy: cfg.subject_match,
        };
        let pem = g.need_chain()?;
        match validate::validate(pem, &anchors, &intermediates, &want, now) {
            Ok(v) => {
                if !v.differences.is_empty() {
                    self.events.emit(
                        now,
                        "names-rewritten",
                        name,
                        Severity::Info,
                        format!(
                            "generation {}: the CA changed the names ({}); accepted by subject_match = \"{}\"",
                            g.number,
                            v.differences.join("; "),
                            serde_json::to_value(cfg.subject_match).ok().and_then(|x| x.as_str().map(str::to_owned)).unwrap_or_default()
                        ),
                    );
                }
                let gm = self.gen_mut(name, g.number)?;
                // The chain as validated: leaf + the intermediates of the verified path.
                gm.certify(IssuedCert {
                    chain_pem: validate::to_pem(&v.chain),
                    serial: v.serial,
                    fingerprint: v.fingerprint,
                    not_before: v.not_before,
                    not_after: v.not_after,
                    subject_issued: (!v.differences.is_empty()).then_some(v.subject),
                    name_differences: v.differences,
                })?;
                self.move_to(
                    name,
                    Step::Validated,
                    g.number,
                    format!("certificate valid until {}", rfc3339(v.not_after)),
                )?;
                Ok(Progress::Moved)
            }
            // Not valid yet by more than the skew: the CA's clock or ours is wrong. Keep the
            // key and the certificate, and check again later; never destroy on a clock doubt.
            Err(refusal @ validate::Refusal::NotYetValid(_)) => self.fail(
                name,
                format!(
                    "certificate for generation {} kept pending: {refusal}",
                    g.number
                ),
            ),
            Err(refusal) => {
                self.events.emit(
                    now,
                    "certificate-refused",
                    name,
                    Severity::Warning,
                    format!("certificate for generation {} refused: {refusal}; the current identity keeps serving", g.number),
                );
                self.abandon(name, g.number, format!("certificate refused: {refusal}"))
            }
        }
    }

    fn probe_once(
        &mut self,
        cfg: &IdentityConfig,
        key: &KeyRecord,
        pem: &str,
        url: &str,
    ) -> Result<u16> {
        let key = self.open_key(key)?;
        let chain = validate::parse_chain(pem)?;
        let ck = hsm_shim::tls::certified_key(hsm_shim::TlsSigningKey::new(key), chain)?;
        let roots = match &cfg.probe_ca {
            Some(p) => crate::tlsconf::load_roots(p)?,
            None => crate::tlsconf::roots_of(self.issuer(&cfg.issuer)?.ca_bundle())?,
        };
        let tls = crate::tlsconf::client_config(Some(ck), roots, crate::tlsconf::TlsVersions::Any)?;
        let resp = crate::http::get(
            Arc::new(tls),
            &crate::http::parse_https(url)?,
            std::time::Duration::from_secs(15),
        )?;
        Ok(resp.status)
    }

    pub(super) fn probe(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
    ) -> Result<Progress> {
        let g = Self::pending(rec)?;
        let Some(url) = &cfg.probe_url else {
            self.move_to(
                name,
                Step::Probed,
                g.number,
                "no probe_url configured: probe skipped",
            )?;
            return Ok(Progress::Moved);
        };
        let key = g.need_key()?.clone();
        let pem = g.need_chain()?.to_owned();
        match self.probe_once(cfg, &key, &pem, url) {
            Ok(s) if (200..300).contains(&s) => {
                self.move_to(
                    name,
                    Step::Probed,
                    g.number,
                    format!("probe {url} with the new identity alone: HTTP {s}"),
                )?;
                Ok(Progress::Moved)
            }
            Ok(s) => self.fail(
                name,
                format!("probe {url} with the new identity answered HTTP {s}"),
            ),
            Err(e) => self.fail(
                name,
                format!("probe {url} with the new identity failed: {e:#}"),
            ),
        }
    }

    pub(super) fn promote(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Result<Progress> {
        let (g, key) = self.pending_key(rec)?;
        let chain_pem = g.need_chain()?.to_owned();
        let chain = validate::parse_chain(&chain_pem)?;
        // The key was checked at `issued`; it may have been replaced in the token since
        // (under the same id). A pair that does not match is never promoted.
        if validate::cert_spki(&chain[0]).is_some_and(|s| s != key.info().spki) {
            self.key_lost(name, &g, super::retire::KeyLoss::Mismatch, now)?;
            return Ok(Progress::Moved);
        }
        // Idempotent: store_cert replaces, the exports are atomic writes.
        self.token
            .store_cert(&key.info().id, &g.key_label, &chain[0])?;
        let uri = Pkcs11Uri::parse(&g.need_key()?.uri)?;
        // Certificate and key URI as one pair, swapped in one step.
        super::export::publish(
            &self.identities_dir(),
            name,
            g.number,
            &[
                ("cert.pem", chain_pem.as_bytes()),
                ("key.uri", format!("{uri}\n").as_bytes()),
            ],
        )?;
        let old = rec.current.filter(|c| *c != g.number);
        let overlap = cfg.overlap.secs();
        let r = self.rec(name);
        if let Some(gm) = r.gen_mut(g.number) {
            gm.status = GenStatus::Current;
        }
        r.current = Some(g.number);
        r.pending = None;
        r.failure = None;
        let mut until = None;
        if let Some(og) = old.and_then(|o| r.gen_mut(o)) {
            let t = (now + overlap).min(og.not_after().unwrap_or(u64::MAX));
            og.status = GenStatus::Overlap;
            og.overlap_until = Some(t);
            until = Some(t);
        }
        self.events.emit(
            now,
            "promoted",
            name,
            Severity::Info,
            match (old, until) {
                (Some(o), Some(t)) => format!(
                    "generation {} is current; generation {o} stays valid until {}",
                    g.number,
                    rfc3339(t)
                ),
                _ => format!("generation {} is current", g.number),
            },
        );
        match old {
            Some(_) => self.move_to(
                name,
                Step::Overlap,
                g.number,
                "promoted; overlap with the old generation",
            )?,
            None => self.move_to(name, Step::Active, g.number, "promoted")?,
        }
        Ok(Progress::Moved)
    }
}
