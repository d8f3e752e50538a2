//! The credential flow (JWK rotation): no certificate; the API holds the public key.
//!
//! key-pending: make the key, pick a kid never used, fix the exact request -> csr-ready:
//! record `sent_at`, send once -> issued (201: confirmed) or submitted (outcome unknown) ->
//! a signed call with the new key alone (and, when unknown, with the old one) decides:
//! promote, abandon (the API never applied it), or keep both keys and ask a person.
//! No key is destroyed while the API may hold it as the current credential.

use super::{Engine, Progress};
use crate::clock::{rfc3339, Unix};
use crate::error::{Error, Result};
use crate::events::Severity;
use crate::issuer::{jwk_rotation, Credential, IssuerAnswer, Request, Submitted, Verdict};
use crate::register::{
    GenStatus, Generation, IdentityRecord, KeyRecord, Material, RotationRequest, Step,
};
use crate::{bail, err};
use firmware_config::schema::IdentityConfig;

impl Engine {
    /// Make (or find) the new key, choose a kid never used, and fix the exact request: all
    /// recorded before anything is sent.
    pub(super) fn credential_prepare(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Result<Progress> {
        let g = Self::pending(rec)?;
        let info = self.find_or_generate(&g.key_label, hsm_shim::KeyType::EcP256, false)?;
        let kid = match g.kid() {
            Some(k) => k.to_owned(),
            None => jwk_rotation::new_kid(&rec.kids),
        };
        let old_na = rec.current_gen().and_then(|c| c.not_after());
        let prepared = match rec.current {
            Some(_) => Some(
                self.issuer(&cfg.issuer)?
                    .prepare(&info, &kid, now, old_na)
                    .map_err(Error::permanent)?,
            ),
            None => None,
        };
        let uri = info.uri(&self.token).to_string();
        let r = self.rec(name);
        if !r.kids.contains(&kid) {
            r.kids.push(kid.clone());
        }
        let gm = self.gen_mut(name, g.number)?;
        let (request, validity) = match prepared {
            Some(p) => (
                Some(RotationRequest {
                    body: p.body,
                    previous_expiry: p.previous_expiry,
                }),
                Some((now, p.expires)),
            ),
            None => (None, None),
        };
        gm.material = Material::Credential {
            key: KeyRecord { id: info.id, uri },
            kid: kid.clone(),
            request,
            sent_at: None,
            submission: None,
            validity,
        };
        self.move_to(
            name,
            Step::CsrReady,
            g.number,
            format!(
                "key {} made; kid {kid} recorded before sending",
                g.key_label
            ),
        )?;
        Ok(Progress::Moved)
    }

    /// Send the rotation once, signed by the current key.
    pub(super) fn credential_send(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
    ) -> Result<Progress> {
        let (g, key) = self.pending_key(rec)?;
        let kid = g.need_kid()?.to_owned();
        if g.sent_at().is_some() {
            // A process sent it and recorded no outcome (crash): the API may have applied it.
            self.move_to(
                name,
                Step::Submitted,
                g.number,
                format!("rotation to {kid} was sent before a restart; outcome unknown"),
            )?;
            return Ok(Progress::Moved);
        }
        let now = self.now();
        self.gen_mut(name, g.number)?.set_sent_at(Some(now))?;
        self.save(name)?;
        let cur = rec
            .current_gen()
            .cloned()
            .ok_or_else(|| err!("no current credential to sign the rotation"))?;
        let cur_key = self.open_key(cur.need_key()?)?;
        let body = g.need_request()?.body.clone();
        let cur_kid = cur.need_kid()?.to_owned();
        let req = Request {
            identity: name,
            generation: g.number,
            csr_pem: "",
            spki: &key.info().spki,
            current: None,
            key: None,
            current_key: None,
            credential: Some(Credential {
                kid: &kid,
                body: &body,
                signer: &cur_key,
                signer_kid: &cur_kid,
            }),
        };
        match self.issuer(&cfg.issuer)?.submit(&req, now) {
            Ok(Submitted {
                answer: Some(IssuerAnswer::Confirmed),
                reference,
            }) => {
                self.gen_mut(name, g.number)?
                    .set_submission(Some(reference))?;
                self.move_to(
                    name,
                    Step::Issued,
                    g.number,
                    format!("{} confirmed the rotation to {kid}", cfg.issuer),
                )?;
                Ok(Progress::Moved)
            }
            Ok(Submitted { answer, reference }) => {
                let why = match answer {
                    Some(IssuerAnswer::Unknown(w)) => w,
                    other => format!("unexpected answer {other:?}"),
                };
                self.gen_mut(name, g.number)?
                    .set_submission(Some(reference))?;
                self.move_to(name, Step::Submitted, g.number, why)?;
                Ok(Progress::Moved)
            }
            Err(IssuerAnswer::Rejected(why)) => self.abandon(name, g.number, why),
            Err(other) => {
                // Not sent after all (signing failed before sending): try again later.
                self.gen_mut(name, g.number)?.set_sent_at(None)?;
                self.fail(name, format!("rotation to {kid}: {other:?}"))
            }
        }
    }

    fn verdict(&mut self, cfg: &IdentityConfig, g: &Generation) -> Result<Verdict> {
        let key = self.open_key(g.need_key()?)?;
        let kid = g.need_kid()?.to_owned();
        Ok(self
            .issuer(&cfg.issuer)?
            .verify(&key, &kid, cfg.probe_url.as_deref()))
    }

    /// After a 201: a call with the new key alone before promotion.
    pub(super) fn credential_check(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
    ) -> Result<Progress> {
        let g = Self::pending(rec)?;
        let old = rec.current_gen().cloned();
        match self.verdict(cfg, &g)? {
            Verdict::Accepted => self.credential_promote(name, &g, old.as_ref(), "verified with the new key"),
            Verdict::NotConfigured => {
                self.credential_promote(name, &g, old.as_ref(), "no probe_url: 201 taken as proof")
            }
            // The API confirmed the rotation: never abandon; keep both keys and retry.
            Verdict::Refused(w) | Verdict::NoAnswer(w) => self.fail(
                name,
                format!(
                    "the API confirmed kid {} but a call with it was not accepted ({w}); both keys are kept",
                    g.need_kid()?
                ),
            ),
        }
    }

    /// The outcome of a sent rotation is unknown: ask the API with each key.
    pub(super) fn credential_resolve(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
    ) -> Result<Progress> {
        let g = Self::pending(rec)?;
        let old = rec.current_gen().cloned();
        let kid = g.need_kid()?.to_owned();
        let new = self.verdict(cfg, &g)?;
        if new == Verdict::Accepted {
            return self.credential_promote(name, &g, old.as_ref(), "the API accepts the new key");
        }
        let old_verdict = match &old {
            Some(o) => self.verdict(cfg, o)?,
            None => Verdict::NotConfigured,
        };
        if let (Verdict::Refused(why), Verdict::Accepted) = (&new, &old_verdict) {
            return self.abandon(
                name,
                g.number,
                format!("the API never applied the rotation to {kid} (the new key is refused: {why}; the old one is accepted); a new kid will be used"),
            );
        }
        let now = self.now();
        let check = match &cfg.probe_url {
            None => format!("no probe_url is configured for '{name}', so the agent cannot ask. Ask the API provider which kid is current ({kid} or {}), or configure probe_url (a GET that accepts `Authorization: JWS`)", old.as_ref().and_then(|o| o.kid()).unwrap_or("none")),
            Some(u) => format!("{u} answered neither way (new key: {new:?}; old key: {old_verdict:?}). Check that the API is reachable and which kid it holds as current"),
        };
        self.events.emit(
            now,
            "rotation-unknown",
            name,
            Severity::Critical,
            format!("the rotation to {kid} was sent but its outcome is unknown; both keys are kept. {check}"),
        );
        self.fail(
            name,
            format!("outcome of the rotation to {kid} unknown; both keys kept; asking again"),
        )
    }

    fn credential_promote(
        &mut self,
        name: &str,
        g: &Generation,
        old: Option<&Generation>,
        how: &str,
    ) -> Result<Progress> {
        let now = self.now();
        let key = self.open_key(g.need_key()?)?;
        let jwk = jwk_rotation::public_jwk(key.info(), g.need_kid()?).map_err(Error::permanent)?;
        super::export::publish(
            &self.identities_dir(),
            name,
            g.number,
            &[
                ("jwk.json", format!("{jwk}\n").as_bytes()),
                ("key.uri", format!("{}\n", g.need_key()?.uri).as_bytes()),
            ],
        )?;
        // The old key stays until the expiry the rotation asked for it; with no old key
        // there is nothing to keep.
        let until = match old {
            Some(_) => g.need_request()?.previous_expiry,
            None => now,
        };
        let r = self.rec(name);
        if let Some(gm) = r.gen_mut(g.number) {
            gm.status = GenStatus::Current;
        }
        if let Some(og) = old.and_then(|o| r.gen_mut(o.number)) {
            og.status = GenStatus::Overlap;
            og.overlap_until = Some(until);
        }
        r.current = Some(g.number);
        r.pending = None;
        r.failure = None;
        self.events.emit(
            now,
            "promoted",
            name,
            Severity::Info,
            format!(
                "kid {} is current ({how}); the old key ({}) signs nothing new and is destroyed after {}",
                g.need_kid()?,
                old.and_then(|o| o.kid()).unwrap_or("none"),
                rfc3339(until)
            ),
        );
        self.move_to(name, Step::Overlap, g.number, format!("promoted: {how}"))?;
        Ok(Progress::Moved)
    }

    /// First credential: make the key and kid, return the public JWK to register with the API.
    pub fn jwk_export(&mut self, name: &str) -> Result<serde_json::Value> {
        let cfg = self.identity_cfg(name)?;
        if self.flow(&cfg) != crate::issuer::Flow::Credential {
            bail!("identity '{name}' does not use a jwk-rotation issuer");
        }
        let now = self.now();
        let rec = self.rec(name).clone();
        if rec.current.is_some() {
            bail!("'{name}' already has a credential; use `edge-signer rotate {name} --now`");
        }
        if rec.pending.is_none() {
            self.rec(name).forced_at = Some(now);
            self.begin(name, &cfg, &rec, now)?;
        }
        if self.rec(name).step == Step::KeyPending {
            let rec = self.rec(name).clone();
            self.credential_prepare(name, &cfg, &rec, now)?;
        }
        let rec = self.rec(name).clone();
        let (g, key) = self.pending_key(&rec)?;
        jwk_rotation::public_jwk(key.info(), g.need_kid()?).map_err(Error::permanent)
    }

    /// Record the exported key as the current credential, valid until `expires`.
    pub fn jwk_activate(&mut self, name: &str, expires: Unix) -> Result<()> {
        let now = self.now();
        let rec = self.rec(name).clone();
        if rec.current.is_some() {
            bail!("'{name}' already has a current credential");
        }
        if rec.step != Step::CsrReady {
            bail!("nothing to activate: run `edge-signer jwk export {name}` first");
        }
        if expires <= now {
            bail!("--expires {} is in the past", rfc3339(expires));
        }
        let g = Self::pending(&rec)?;
        let r = self.rec(name);
        if let Some(gm) = r.gen_mut(g.number) {
            gm.status = GenStatus::Current;
            gm.set_validity(now, expires)?;
        }
        r.current = Some(g.number);
        r.pending = None;
        self.move_to(
            name,
            Step::Active,
            g.number,
            format!("credential {} activated by hand", g.need_kid()?),
        )
    }
}
