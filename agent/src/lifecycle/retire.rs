//! Retirement: overlap ends, retire and revoke by hand, and reconciling the token with the
//! register at start.

use super::{Engine, Progress};
use crate::clock::{rfc3339, Unix};
use crate::error::Result;
use crate::events::Severity;
use crate::register::{GenStatus, Generation, IdentityRecord, KeyRecord, Step};
use crate::{bail, err};

/// The identity and generation a key label names, when it is exactly
/// `edge-signer:<identity>:g<N>` (parsed, never prefix-matched).
pub fn parse_label(label: &str) -> Option<(&str, u32)> {
    let rest = label.strip_prefix("edge-signer:")?;
    let (identity, n) = rest.rsplit_once(":g")?;
    if identity.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((identity, n.parse().ok()?))
}

/// Why a generation cannot use its key.
#[derive(Debug, Clone, Copy)]
pub(super) enum KeyLoss {
    /// The token does not hold a key with its id.
    Missing,
    /// The key under its id is not the certificate's key.
    Mismatch,
}

impl KeyLoss {
    /// (event kind, what the event says of the token, the transition's reason).
    fn words(self) -> (&'static str, &'static str, &'static str) {
        match self {
            KeyLoss::Missing => (
                "key-missing",
                "the token does not hold it",
                "key missing from token",
            ),
            KeyLoss::Mismatch => (
                "key-mismatch",
                "the token holds another key under that id (its public key is not the certificate's: replaced?)",
                "key in token does not match the certificate",
            ),
        }
    }
}

impl Engine {
    /// On start: destroy key objects of aborted rotations and of generations already
    /// retired, and fail generations whose key the token lacks or no longer matches.
    pub fn reconcile(&mut self) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        // Labels only: a foreign key of a type we do not know must not stop reconcile.
        let keys = self.token.list_key_labels()?;
        let now = self.now();
        for ident in self
            .cfg
            .identities
            .iter()
            .map(|i| i.name.clone())
            .collect::<Vec<_>>()
        {
            let rec = self.reg.identities.get(&ident).cloned().unwrap_or_default();
            let live: Vec<&Generation> = rec
                .generations
                .iter()
                .filter(|g| {
                    matches!(
                        g.status,
                        GenStatus::Pending | GenStatus::Current | GenStatus::Overlap
                    )
                })
                .collect();
            for (k, n) in keys.iter().filter_map(|k| match parse_label(&k.label) {
                Some((i, n)) if i == ident => Some((k, n)),
                _ => None,
            }) {
                let id = hsm_shim::keys::hex(&k.id);
                let wanted = live.iter().any(|g| match g.key() {
                    Some(key) => key.id == k.id,
                    None => g.key_label == k.label,
                });
                // Every generation is planned in the register before its key exists, so a
                // key of a generation the register never heard of is not an aborted rotation:
                // the register was lost or replaced. Such keys are left alone, loudly.
                if !wanted && rec.gen(n).is_none() {
                    let msg = format!(
                        "key {} (id {id}) belongs to generation {n} of '{ident}', which the register does not know (was the register lost or replaced?); left in the token",
                        k.label
                    );
                    self.events
                        .emit(now, "key-unknown", &ident, Severity::Warning, msg.clone());
                    notes.push(msg);
                    continue;
                }
                if !wanted {
                    self.token.destroy(&k.id)?;
                    notes.push(format!(
                        "{ident}: destroyed orphan key {} (id {id}) left by an aborted rotation",
                        k.label
                    ));
                }
            }
            for g in live {
                let Some(key) = g.key() else { continue };
                if !keys.iter().any(|k| k.id == key.id) {
                    notes.push(self.key_lost(&ident, g, KeyLoss::Missing, now)?);
                } else if !self.key_matches_cert(g, key) {
                    notes.push(self.key_lost(&ident, g, KeyLoss::Mismatch, now)?);
                }
            }
        }
        Ok(notes)
    }

    /// Whether generation `g`'s key `id` is still the key its certificate was validated
    /// for (true before validation, where a wrong certificate is the CA's fault and is refused
    /// by the `issued` step, and when the key cannot be read: a missing key is reported on
    /// its own).
    fn key_matches_cert(&self, g: &Generation, key: &KeyRecord) -> bool {
        let Some(cert) = g.cert() else {
            return true;
        };
        let Some(spki) = crate::validate::leaf_spki(&cert.chain_pem) else {
            return true;
        };
        self.open_key(key).map_or(true, |k| k.info().spki == spki)
    }

    /// Generation `g` of `ident` cannot use its key: the token does not hold it, or holds
    /// another key under its id. The generation fails and a new key is enrolled at once (a
    /// critical event says so); its pair is never served.
    pub(super) fn key_lost(
        &mut self,
        ident: &str,
        g: &Generation,
        loss: KeyLoss,
        now: Unix,
    ) -> Result<String> {
        let id = g.key_id_hex().unwrap_or_else(|| "-".into());
        let (kind, what, why) = loss.words();
        let msg = format!(
            "generation {} of '{ident}' expects key {id} ({}) but {what}; a new key will be enrolled",
            g.number, g.key_label
        );
        self.events
            .emit(now, kind, ident, Severity::Critical, msg.clone());
        let n = g.number;
        let rec = self.rec(ident);
        if let Some(gm) = rec.gen_mut(n) {
            gm.status = GenStatus::Failed;
        }
        if rec.current == Some(n) {
            rec.current = None;
        }
        if rec.pending == Some(n) {
            rec.pending = None;
        }
        rec.transition(now, Step::Active, n, why);
        rec.forced_at = Some(now);
        self.save(ident)?;
        Ok(msg)
    }

    pub(super) fn end_overlap(
        &mut self,
        name: &str,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Result<Progress> {
        let old: Vec<Generation> = rec
            .generations
            .iter()
            .filter(|g| g.status == GenStatus::Overlap)
            .cloned()
            .collect();
        let next = old
            .iter()
            .filter_map(|g| g.overlap_until)
            .filter(|t| *t > now)
            .min();
        for g in old
            .iter()
            .filter(|g| g.overlap_until.is_none_or(|t| t <= now))
        {
            self.retire_generation(name, g.number, GenStatus::Retired)?;
        }
        match next {
            Some(until) => Ok(Progress::Wait {
                until,
                what: format!("overlap: old generation retires at {}", rfc3339(until)),
            }),
            None => {
                let cur = rec.current.unwrap_or(0);
                self.move_to(name, Step::Active, cur, "overlap over")?;
                Ok(Progress::Moved)
            }
        }
    }

    fn retire_generation(&mut self, name: &str, n: u32, status: GenStatus) -> Result<()> {
        self.retire_generation_and(name, n, status, |_, _| {})
    }

    /// Destroy generation `n`'s key objects, then mark it `status` and apply `also` to the
    /// record, all in one register write.
    fn retire_generation_and(
        &mut self,
        name: &str,
        n: u32,
        status: GenStatus,
        also: impl FnOnce(&mut IdentityRecord, Unix),
    ) -> Result<()> {
        let g = self
            .rec(name)
            .gen(n)
            .cloned()
            .ok_or_else(|| err!("'{name}' has no generation {n}"))?;
        if let Some(key) = g.key() {
            self.destroy_key(key)?;
        }
        let now = self.now();
        let r = self.rec(name);
        if let Some(gm) = r.gen_mut(n) {
            gm.status = status;
        }
        also(r, now);
        self.save(name)?;
        let what = if status == GenStatus::Revoked {
            "revoked"
        } else {
            "retired"
        };
        self.events.emit(
            now,
            what,
            name,
            Severity::Info,
            format!("generation {n} {what}: its key objects are destroyed in the token"),
        );
        Ok(())
    }

    /// Retire a non-current generation now.
    pub fn retire(&mut self, name: &str, n: u32) -> Result<()> {
        let rec = self.rec(name).clone();
        let g = rec
            .gen(n)
            .ok_or_else(|| err!("'{name}' has no generation {n}"))?;
        if rec.current == Some(n) {
            bail!(
                "generation {n} is the current identity of '{name}'; rotate first, or use revoke"
            );
        }
        if rec.pending == Some(n) {
            bail!("generation {n} of '{name}' is being enrolled");
        }
        if matches!(
            g.status,
            GenStatus::Retired | GenStatus::Revoked | GenStatus::Failed
        ) {
            bail!("generation {n} of '{name}' is already {:?}", g.status);
        }
        self.retire_generation(name, n, GenStatus::Retired)?;
        if rec.step == Step::Overlap
            && !self
                .rec(name)
                .generations
                .iter()
                .any(|g| g.status == GenStatus::Overlap)
        {
            self.move_to(
                name,
                Step::Active,
                rec.current.unwrap_or(0),
                format!("generation {n} retired by hand"),
            )?;
        }
        Ok(())
    }

    /// Mark a generation revoked and destroy its key; a revoked current identity is replaced.
    pub fn revoke(&mut self, name: &str, n: u32) -> Result<()> {
        let rec = self.rec(name).clone();
        let g = rec
            .gen(n)
            .ok_or_else(|| err!("'{name}' has no generation {n}"))?;
        if rec.pending == Some(n) {
            bail!("generation {n} of '{name}' is being enrolled");
        }
        // The CA first (ACME revokeCert): its refusal leaves everything as it was, so the
        // command can be repeated; the key is destroyed here only once the CA agreed.
        // An issuer that is no longer configured (or did not start) cannot be told; the
        // revocation here goes on.
        let issuer = self
            .identity_cfg(name)
            .ok()
            .and_then(|cfg| self.issuers.get_mut(&cfg.issuer));
        let told = match (g.chain_pem(), issuer) {
            (Some(chain), Some(issuer)) => issuer
                .revoke(chain)
                .map_err(|e| err!("the CA did not revoke generation {n} of '{name}' ({e}); nothing was changed here: run the command again when the CA answers, or `edge-signer retire` to destroy the key without telling the CA"))?,
            _ => false,
        };
        if told {
            tracing::info!(identity = %name, generation = n, "the CA revoked the certificate");
            if let Ok(cfg) = self.identity_cfg(name) {
                self.keep_account(&cfg.issuer)?;
            }
        }
        // Marked revoked and the current one cleared in the same write as nothing else.
        self.retire_generation_and(name, n, GenStatus::Revoked, |r, now| {
            if r.current == Some(n) {
                r.current = None;
                r.forced_at = Some(now);
                let back = if r.step == Step::Overlap {
                    Step::Active
                } else {
                    r.step
                };
                r.transition(
                    now,
                    back,
                    n,
                    "current generation revoked: a new one will be enrolled",
                );
            }
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_label;

    #[test]
    fn labels_are_parsed_not_prefix_matched() {
        assert_eq!(parse_label("edge-signer:gw:g12"), Some(("gw", 12)));
        assert_eq!(parse_label("edge-signer:gw:g1:g1"), Some(("gw:g1", 1)));
        assert_eq!(parse_label("edge-signer:gw-g1:g3"), Some(("gw-g1", 3)));
        for bad in [
            "edge-signer:gw:g",
            "edge-signer::g1",
            "other:gw:g1",
            "edge-signer:gw:g1x",
            "edge-signer:gw:g+1",
        ] {
            assert_eq!(parse_label(bad), None, "{bad}");
        }
    }
}
