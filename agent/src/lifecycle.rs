//! The lifecycle engine: one state machine per identity, persisted at every step.
//!
//! `active -> key-pending -> csr-ready -> submitted -> issued -> validated -> probed ->
//! overlap -> (old generation retired) -> active`, plus `lapsed` and retryable failures with
//! capped exponential backoff. Every step is idempotent, so a restart at any point resumes.

use crate::clock::{rfc3339, Clock, Unix};
use crate::events::{Events, Severity};
use crate::issuer::{Answer, Issuer, Request};
use crate::register::{
    Failure, GenStatus, Generation, IdentityRecord, Register, RegisterFile, Step,
};
use crate::validate::{self, Expected};
use anyhow::{anyhow, bail, Context, Result};
use firmware_config::schema::{
    CnSuffix, Config, IdentityConfig, IssuerConfig, JwkIssuer, RenewAt, Usage,
};
use hsm_shim::csr::Subject;
use hsm_shim::{KeyRef, Pkcs11Uri, Token, TokenKey};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// What one call of `advance` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A step was taken; call again.
    Moved,
    /// Nothing to do before `until`, for the reason given.
    Wait {
        /// Next deadline.
        until: Unix,
        /// Why, for `status`.
        what: String,
    },
}

/// The engine.
pub struct Engine {
    cfg: Config,
    token: Arc<Token>,
    clock: Arc<dyn Clock>,
    file: RegisterFile,
    /// The register as last saved.
    pub reg: Register,
    /// Events raised.
    pub events: Events,
    issuers: BTreeMap<String, Box<dyn Issuer>>,
    state_dir: PathBuf,
    kill_at: Option<String>,
}

/// The label of a generation's key objects.
pub fn key_label(identity: &str, generation: u32) -> String {
    format!("edge-signer:{identity}:g{generation}")
}

fn label_prefix(identity: &str) -> String {
    format!("edge-signer:{identity}:g")
}

/// A stable per-identity, per-generation offset in `0..span`, so a fleet spreads out.
fn jitter(identity: &str, generation: u32, span: u64) -> u64 {
    if span == 0 {
        return 0;
    }
    // FNV-1a: stable across runs and builds.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in identity.bytes().chain(generation.to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h % span
}

/// When the current generation should be renewed: the policy point, minus a stable jitter
/// offset (earlier, never later than the policy says).
pub fn renewal_time(cfg: &IdentityConfig, rec: &IdentityRecord) -> Option<Unix> {
    let g = rec.current_gen()?;
    let (nb, na) = (g.not_before?, g.not_after?);
    let point = match cfg.renewal.renew_at() {
        RenewAt::Before(d) => na.saturating_sub(d.secs()),
        RenewAt::Fraction(p) => nb + (na.saturating_sub(nb)) * p.0 as u64 / 100,
    };
    Some(
        point
            .saturating_sub(jitter(&cfg.name, g.number, cfg.renewal.jitter.secs()))
            .max(nb),
    )
}

/// One line of `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// Identity name.
    pub name: String,
    /// Step.
    pub state: String,
    /// Serving generation.
    pub generation: Option<u32>,
    /// Its key URI.
    pub key_uri: Option<String>,
    /// Its certificate serial.
    pub serial: Option<String>,
    /// Its SHA-256 fingerprint.
    pub fingerprint: Option<String>,
    /// Its JWK `kid` (jwk-rotation identities).
    pub kid: Option<String>,
    /// Its not-after (RFC 3339).
    pub not_after: Option<String>,
    /// Whole days left (negative when lapsed).
    pub days_left: Option<i64>,
    /// The generation being enrolled.
    pub pending_generation: Option<u32>,
    /// What happens next.
    pub next_action: String,
    /// When (RFC 3339).
    pub next_at: Option<String>,
    /// The last error.
    pub last_error: Option<String>,
    /// Generations still holding keys in the token.
    pub live_generations: Vec<u32>,
}

/// Status of every configured identity, from the register alone (no token access).
pub fn status(cfg: &Config, reg: &Register, now: Unix) -> Vec<Status> {
    cfg.identities
        .iter()
        .map(|ic| {
            let rec = reg.identities.get(&ic.name).cloned().unwrap_or_default();
            let cur = rec.current_gen();
            let since = |step: Step| {
                rec.transitions
                    .iter()
                    .rev()
                    .find(|t| t.step == step)
                    .map(|t| rfc3339(t.at))
                    .unwrap_or_default()
            };
            let (next_action, next_at) = if let Some(f) = &rec.failure {
                (format!("retry: {}", f.reason), Some(f.retry_at))
            } else {
                match rec.step {
                    Step::Active if cur.is_none() => ("enrol a first generation".into(), Some(now)),
                    Step::Active => ("renew".into(), renewal_time(ic, &rec)),
                    Step::Lapsed => ("enrol a new key (the certificate lapsed)".into(), Some(now)),
                    Step::KeyPending => ("generate the key and CSR".into(), Some(now)),
                    Step::CsrReady => (format!("submit the CSR to {}", ic.issuer), Some(now)),
                    Step::Submitted => match &rec.waiting {
                        Some(w) => (
                            format!("wait: {} (submitted {})", w.what, since(Step::Submitted)),
                            Some(w.until),
                        ),
                        None => (
                            format!(
                                "wait for the certificate from {} (submitted {})",
                                ic.issuer,
                                since(Step::Submitted)
                            ),
                            None,
                        ),
                    },
                    Step::Issued => ("validate the certificate".into(), Some(now)),
                    Step::Validated => ("probe with the new identity".into(), Some(now)),
                    Step::Probed => ("promote the new identity".into(), Some(now)),
                    Step::Overlap => {
                        let t = rec
                            .generations
                            .iter()
                            .filter(|g| g.status == GenStatus::Overlap)
                            .filter_map(|g| g.overlap_until)
                            .min();
                        ("retire the old generation".into(), t)
                    }
                }
            };
            Status {
                name: ic.name.clone(),
                state: rec.step.as_str().into(),
                generation: rec.current,
                key_uri: cur.and_then(|g| g.key_uri.clone()),
                serial: cur.and_then(|g| g.serial.clone()),
                fingerprint: cur.and_then(|g| g.fingerprint.clone()),
                kid: cur.and_then(|g| g.kid.clone()),
                not_after: cur.and_then(|g| g.not_after).map(rfc3339),
                days_left: cur
                    .and_then(|g| g.not_after)
                    .map(|na| (na as i64 - now as i64).div_euclid(86_400)),
                pending_generation: rec.pending,
                next_action,
                next_at: next_at.map(rfc3339),
                last_error: rec.failure.as_ref().map(|f| f.reason.clone()),
                live_generations: rec
                    .generations
                    .iter()
                    .filter(|g| {
                        matches!(
                            g.status,
                            GenStatus::Pending | GenStatus::Current | GenStatus::Overlap
                        )
                    })
                    .map(|g| g.number)
                    .collect(),
            }
        })
        .collect()
}

impl Engine {
    /// An engine over a token, a register in `cfg.paths.state_dir`, and issuers by name.
    pub fn new(
        cfg: Config,
        token: Arc<Token>,
        clock: Arc<dyn Clock>,
        issuers: BTreeMap<String, Box<dyn Issuer>>,
    ) -> Result<Engine> {
        let state_dir = cfg.paths.state_dir.clone();
        let file = RegisterFile::new(&state_dir);
        let reg = file.load()?;
        let events = Events::new(cfg.notify.exec.clone());
        Ok(Engine {
            cfg,
            token,
            clock,
            file,
            reg,
            events,
            issuers,
            state_dir,
            kill_at: std::env::var("EDGE_SIGNER_TEST_KILL_AT").ok(),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The token.
    pub fn token(&self) -> &Arc<Token> {
        &self.token
    }

    /// Now.
    pub fn now(&self) -> Unix {
        self.clock.now()
    }

    fn identity_cfg(&self, name: &str) -> Result<IdentityConfig> {
        self.cfg
            .identities
            .iter()
            .find(|i| i.name == name)
            .cloned()
            .ok_or_else(|| anyhow!("no identity '{name}' in the configuration"))
    }

    fn rec(&mut self, name: &str) -> &mut IdentityRecord {
        self.reg.identities.entry(name.to_owned()).or_default()
    }

    fn save(&mut self, name: &str) -> Result<()> {
        self.file.save(&self.reg)?;
        // Test hook: die like `kill -9` right after a step is on disk.
        if let Some(step) = &self.kill_at {
            let now_step = self.reg.identities.get(name).map(|r| r.step.as_str());
            if now_step == Some(step.as_str()) {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &std::process::id().to_string()])
                    .status();
            }
        }
        Ok(())
    }

    fn move_to(
        &mut self,
        name: &str,
        step: Step,
        generation: u32,
        note: impl Into<String>,
    ) -> Result<()> {
        let now = self.now();
        let note = note.into();
        tracing::info!(identity = name, generation, step = step.as_str(), "{note}");
        self.rec(name).transition(now, step, generation, note);
        self.save(name)
    }

    /// On start: destroy key objects of aborted rotations and of generations already
    /// retired, and report keys the register expects but the token lacks.
    pub fn reconcile(&mut self) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        let keys = self.token.list_keys()?;
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
            for k in keys
                .iter()
                .filter(|k| k.label.starts_with(&label_prefix(&ident)))
            {
                let id = hsm_shim::keys::hex(&k.id);
                let wanted = live.iter().any(|g| {
                    g.key_id.as_deref() == Some(id.as_str())
                        || (g.key_id.is_none() && g.key_label == k.label)
                });
                if !wanted {
                    self.token.destroy(&k.id)?;
                    notes.push(format!(
                        "{ident}: destroyed orphan key {} (id {id}) left by an aborted rotation",
                        k.label
                    ));
                }
            }
            for g in live {
                let Some(id) = &g.key_id else { continue };
                if !keys.iter().any(|k| &hsm_shim::keys::hex(&k.id) == id) {
                    let msg = format!(
                        "generation {} of '{ident}' expects key {id} ({}) but the token does not hold it; a new key will be enrolled",
                        g.number, g.key_label
                    );
                    self.events
                        .emit(now, "key-missing", &ident, Severity::Critical, msg.clone());
                    notes.push(msg);
                    let n = g.number;
                    let rec = self.rec(&ident);
                    if let Some(gm) = rec.gen_mut(n) {
                        gm.status = GenStatus::Failed;
                    }
                    if rec.current == Some(n) {
                        rec.current = None;
                    }
                    if rec.pending == Some(n) {
                        rec.pending = None;
                    }
                    rec.transition(now, Step::Active, n, "key missing from token");
                    rec.forced_at = Some(now);
                    self.save(&ident)?;
                }
            }
        }
        Ok(notes)
    }

    /// Ask for a rotation at the next step, whatever the renewal policy says.
    pub fn force(&mut self, name: &str) -> Result<()> {
        self.identity_cfg(name)?;
        let now = self.now();
        let rec = self.rec(name);
        // A rotation under way already is the one asked for: only retry it now.
        if rec.pending.is_none() {
            rec.forced_at = Some(now);
        }
        rec.failure = None;
        self.save(name)
    }

    /// When the current generation should be renewed.
    pub fn renewal_time(&self, name: &str) -> Option<Unix> {
        renewal_time(
            &self.identity_cfg(name).ok()?,
            self.reg.identities.get(name)?,
        )
    }

    /// True when a rotation should start now (or one is under way).
    pub fn needs_renewal(&self, name: &str) -> Result<bool> {
        self.identity_cfg(name)?;
        let now = self.now();
        let Some(rec) = self.reg.identities.get(name) else {
            return Ok(true);
        };
        if rec.step != Step::Active || rec.current.is_none() || rec.forced_at.is_some() {
            return Ok(true);
        }
        Ok(self.renewal_time(name).is_some_and(|t| now >= t))
    }

    fn fail(&mut self, name: &str, reason: String) -> Result<Progress> {
        let cfg = self.identity_cfg(name)?;
        let now = self.now();
        let rec = self.rec(name);
        let attempts = rec.failure.as_ref().map(|f| f.attempts).unwrap_or(0) + 1;
        let base = cfg.renewal.retry_min.secs().max(1);
        let delay = base
            .saturating_mul(1u64 << (attempts - 1).min(30))
            .min(cfg.renewal.retry_max.secs().max(base));
        rec.failure = Some(Failure {
            reason: reason.clone(),
            retry_at: now + delay,
            attempts,
        });
        // Nothing serves while there is no valid current generation: a person must act.
        let serving = rec
            .current_gen()
            .and_then(|g| g.not_after)
            .is_some_and(|na| na > now);
        self.save(name)?;
        self.events.emit(
            now,
            "failure",
            name,
            if serving {
                Severity::Warning
            } else {
                Severity::Critical
            },
            format!(
                "{reason}; attempt {attempts}, retrying at {}{}",
                rfc3339(now + delay),
                if serving {
                    ""
                } else {
                    " (no valid identity is serving)"
                }
            ),
        );
        Ok(Progress::Wait {
            until: now + delay,
            what: format!("retry after: {reason}"),
        })
    }

    /// Give up a pending generation (refused certificate, rejected CSR): destroy its key,
    /// keep the current identity serving, retry later with a new key.
    fn abandon(&mut self, name: &str, n: u32, reason: String) -> Result<Progress> {
        if let Some(id) = self
            .reg
            .identities
            .get(name)
            .and_then(|r| r.gen(n))
            .and_then(|g| g.key_id.clone())
        {
            self.destroy_key(&id)?;
        }
        let now = self.now();
        let rec = self.rec(name);
        if let Some(g) = rec.gen_mut(n) {
            g.status = GenStatus::Failed;
        }
        rec.pending = None;
        let back = if rec.current.is_some() {
            Step::Active
        } else {
            Step::Lapsed
        };
        rec.transition(now, back, n, format!("generation {n} abandoned: {reason}"));
        self.fail(name, format!("generation {n} abandoned: {reason}"))
    }

    fn destroy_key(&self, id_hex: &str) -> Result<()> {
        let id = hsm_shim::keys::unhex(id_hex)
            .ok_or_else(|| anyhow!("register holds a bad key id '{id_hex}'"))?;
        match self.token.destroy(&id) {
            Ok(_) | Err(hsm_shim::Error::KeyNotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn open_key(&self, id_hex: &str) -> Result<TokenKey> {
        let id = hsm_shim::keys::unhex(id_hex)
            .ok_or_else(|| anyhow!("register holds a bad key id '{id_hex}'"))?;
        Ok(TokenKey::open(self.token.clone(), &KeyRef::Id(id))?)
    }

    /// The pending generation's key: found by its label (a crash after `C_GenerateKeyPair`
    /// left it there) or generated now.
    fn find_or_generate(
        &self,
        label: &str,
        key_type: hsm_shim::KeyType,
    ) -> Result<hsm_shim::KeyInfo> {
        match self.token.find_key(&KeyRef::Label(label.to_owned())) {
            Ok(k) => Ok(k),
            Err(hsm_shim::Error::KeyNotFound(_)) => Ok(self.token.generate_key(key_type, label)?),
            Err(e) => Err(e.into()),
        }
    }

    /// Take at most one step for `name`.
    pub fn advance(&mut self, name: &str) -> Result<Progress> {
        let cfg = self.identity_cfg(name)?;
        let now = self.now();
        let alert = self.alerts(name, &cfg, now)?;
        let rec = self.rec(name).clone();
        let progress = self.step(name, &cfg, &rec, now)?;
        Ok(match (progress, alert) {
            (Progress::Wait { until, what }, Some(a)) if a < until => {
                Progress::Wait { until: a, what }
            }
            (p, _) => p,
        })
    }

    fn step(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Result<Progress> {
        if let Some(f) = &rec.failure {
            if f.retry_at > now {
                return Ok(Progress::Wait {
                    until: f.retry_at,
                    what: format!("retry after: {}", f.reason),
                });
            }
        }
        let jwk = self.cfg.issuers.iter().find_map(|i| match i {
            IssuerConfig::JwkRotation(j) if j.name == cfg.issuer => Some(j.clone()),
            _ => None,
        });
        if let Some(j) = jwk {
            return self.jwk_step(name, cfg, &j, rec, now);
        }
        match rec.step {
            Step::Active | Step::Lapsed => self.idle(name, cfg, rec, now),
            Step::KeyPending => self.make_key(name, cfg, rec, now),
            Step::CsrReady | Step::Submitted => self.ask_issuer(name, cfg, rec, now),
            Step::Issued => self.check_cert(name, cfg, rec, now),
            Step::Validated => self.probe(name, cfg, rec),
            Step::Probed => self.promote(name, cfg, rec, now),
            Step::Overlap => self.end_overlap(name, rec, now),
        }
    }

    /// Reminders at the configured marks and the lapse alarm for the serving generation,
    /// whatever step a rotation is at (a stuck rotation is exactly when they matter).
    /// Each fires once per generation (the lapse is recorded as mark 0). Returns the next
    /// alert deadline.
    fn alerts(&mut self, name: &str, cfg: &IdentityConfig, now: Unix) -> Result<Option<Unix>> {
        let Some(g) = self.rec(name).current_gen().cloned() else {
            return Ok(None);
        };
        let Some(na) = g.not_after else {
            return Ok(None);
        };
        let mut marks: Vec<u64> = cfg
            .renewal
            .reminders
            .iter()
            .map(|d| d.secs())
            .filter(|m| *m > 0)
            .collect();
        marks.sort_unstable_by(|a, b| b.cmp(a));
        marks.push(0);
        let mut next = None;
        for m in marks {
            let at = na.saturating_sub(m);
            if g.reminders_fired.contains(&m) {
                continue;
            }
            if now < at {
                next = Some(next.map_or(at, |n: Unix| n.min(at)));
                continue;
            }
            if m == 0 {
                self.events.emit(
                    now,
                    "lapsed",
                    name,
                    Severity::Critical,
                    format!(
                        "certificate of generation {} expired at {}: every TLS handshake with it fails; enrolling a new key (portal: upload the CSR from the outbox)",
                        g.number,
                        rfc3339(na)
                    ),
                );
            } else if now < na {
                self.events.emit(
                    now,
                    "reminder",
                    name,
                    if m <= 5 * 86_400 {
                        Severity::Critical
                    } else {
                        Severity::Warning
                    },
                    format!(
                        "certificate of generation {} expires at {} ({} day mark)",
                        g.number,
                        rfc3339(na),
                        m / 86_400
                    ),
                );
            }
            let rec = self.rec(name);
            if let Some(gm) = rec.gen_mut(g.number) {
                gm.reminders_fired.push(m);
            }
            if m == 0 && rec.step == Step::Active {
                rec.transition(now, Step::Lapsed, g.number, "certificate expired");
            }
            self.save(name)?;
        }
        Ok(next)
    }

    fn idle(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Result<Progress> {
        let cur = rec.current_gen().cloned();
        let due = match (&cur, rec.forced_at) {
            (_, Some(_)) => true,
            _ if rec.step == Step::Lapsed => true,
            (None, _) => true,
            (Some(_), None) => self.renewal_time(name).is_some_and(|t| now >= t),
        };
        if !due {
            let renew = self.renewal_time(name).unwrap_or(now);
            return Ok(Progress::Wait {
                until: renew,
                what: format!("renewal at {}", rfc3339(renew)),
            });
        }
        // Plan a new generation (new key, never the old one), persisted before the key exists.
        let n = self.rec(name).next_number();
        let cn = match cfg.cn_suffix {
            CnSuffix::None => cfg.subject.cn.clone(),
            CnSuffix::UnixTime => format!("{}-{now}", cfg.subject.cn),
        };
        let subject = cfg.subject.to_subject(&cn);
        let g = Generation {
            number: n,
            status: GenStatus::Pending,
            key_label: key_label(name, n),
            key_id: None,
            key_uri: None,
            subject: subject.to_string(),
            sans: cfg.sans.iter().map(|s| s.to_string()).collect(),
            csr_pem: None,
            issuer: cfg.issuer.clone(),
            submission: None,
            cert_pem: None,
            serial: None,
            fingerprint: None,
            not_before: None,
            not_after: None,
            overlap_until: None,
            reminders_fired: Vec::new(),
            created_at: now,
            kid: None,
            request: None,
            previous_expiry: None,
        };
        let why = if cur.is_none() {
            "first enrolment"
        } else if rec.forced_at.is_some() {
            "rotation asked for"
        } else {
            "renewal due"
        };
        let r = self.rec(name);
        r.generations.push(g);
        r.pending = Some(n);
        r.forced_at = None;
        r.failure = None;
        self.events.emit(
            now,
            "rotation-started",
            name,
            Severity::Info,
            format!("{why}: generation {n} planned"),
        );
        self.move_to(name, Step::KeyPending, n, why)?;
        Ok(Progress::Moved)
    }

    /// The pending generation and a signer for its key.
    fn pending_key(&self, rec: &IdentityRecord) -> Result<(Generation, TokenKey)> {
        let g = Self::pending(rec)?;
        let key = self.open_key(g.key_id.as_deref().unwrap_or_default())?;
        Ok((g, key))
    }

    fn pending(rec: &IdentityRecord) -> Result<Generation> {
        rec.pending
            .and_then(|n| rec.gen(n))
            .cloned()
            .ok_or_else(|| {
                anyhow!(
                    "register inconsistent: step {} without a pending generation",
                    rec.step.as_str()
                )
            })
    }

    fn make_key(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
        _now: Unix,
    ) -> Result<Progress> {
        let g = Self::pending(rec)?;
        let info = self.find_or_generate(&g.key_label, cfg.key_type)?;
        let key = TokenKey::from_info(self.token.clone(), info.clone());
        let subject = Subject::parse(&g.subject)?;
        let csr = hsm_shim::csr::build_csr(&key, &subject, &cfg.sans)?;
        let uri = info.uri(&self.token).to_string();
        let gm = self
            .rec(name)
            .gen_mut(g.number)
            .ok_or_else(|| anyhow!("generation vanished"))?;
        gm.key_id = Some(hsm_shim::keys::hex(&info.id));
        gm.key_uri = Some(uri);
        gm.csr_pem = Some(csr);
        self.move_to(
            name,
            Step::CsrReady,
            g.number,
            format!("key {} generated in the token; CSR built", g.key_label),
        )?;
        Ok(Progress::Moved)
    }

    /// The serving identity as a rustls key, while its certificate is valid.
    fn current_identity(
        &self,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Option<Arc<hsm_shim::rustls::sign::CertifiedKey>> {
        let g = rec.current_gen()?;
        if g.not_after.is_none_or(|na| na <= now) {
            return None;
        }
        let key = self.open_key(g.key_id.as_deref()?).ok()?;
        let chain = validate::parse_chain(g.cert_pem.as_deref()?).ok()?;
        hsm_shim::tls::certified_key(hsm_shim::TlsSigningKey::new(key), chain).ok()
    }

    fn issuer(&mut self, name: &str) -> Result<&mut Box<dyn Issuer>> {
        self.issuers
            .get_mut(name)
            .ok_or_else(|| anyhow!("issuer '{name}' is not available"))
    }

    fn ask_issuer(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Result<Progress> {
        let (g, key) = self.pending_key(rec)?;
        let spki = key.info().spki.clone();
        let csr = g.csr_pem.clone().unwrap_or_default();
        let req = Request {
            identity: name,
            generation: g.number,
            csr_pem: &csr,
            spki: &spki,
            current: self.current_identity(rec, now),
        };
        let issuer = self.issuer(&cfg.issuer)?;
        let answer = match (&rec.step, &g.submission) {
            (Step::Submitted, Some(reference)) => issuer.poll(&req, reference, now),
            _ => match issuer.submit(&req, now) {
                Ok(reference) => {
                    if let Some(gm) = self.rec(name).gen_mut(g.number) {
                        gm.submission = Some(reference.clone());
                    }
                    self.move_to(
                        name,
                        Step::Submitted,
                        g.number,
                        format!("CSR submitted to {} as {reference}", cfg.issuer),
                    )?;
                    return Ok(Progress::Moved);
                }
                Err(a) => a,
            },
        };
        match answer {
            Answer::Wait { until, what } => {
                // Persist only what changes, not every poll (flash wears out).
                let r = self.rec(name);
                if r.waiting.as_ref().map(|w| &w.what) != Some(&what) {
                    r.waiting = Some(crate::register::Waiting {
                        until,
                        what: what.clone(),
                    });
                    self.save(name)?;
                }
                Ok(Progress::Wait { until, what })
            }
            Answer::Issued(pem) => {
                if let Some(gm) = self.rec(name).gen_mut(g.number) {
                    gm.cert_pem = Some(pem);
                }
                self.rec(name).failure = None;
                self.move_to(name, Step::Issued, g.number, "certificate received")?;
                Ok(Progress::Moved)
            }
            Answer::Rejected(why) => self.abandon(
                name,
                g.number,
                format!("issuer {} rejected the CSR: {why}", cfg.issuer),
            ),
            Answer::Unreachable(why) => {
                self.fail(name, format!("issuer {} unreachable: {why}", cfg.issuer))
            }
        }
    }

    fn check_cert(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Result<Progress> {
        let (g, key) = self.pending_key(rec)?;
        let subject = Subject::parse(&g.subject)?;
        let ca = self.issuer(&cfg.issuer)?.ca_bundle().to_vec();
        let want = Expected {
            spki: &key.info().spki,
            subject: &subject,
            sans: &cfg.sans,
            server: cfg.usage == [Usage::Server],
        };
        match validate::validate(g.cert_pem.as_deref().unwrap_or_default(), &ca, &want, now) {
            Ok(v) => {
                let gm = self
                    .rec(name)
                    .gen_mut(g.number)
                    .ok_or_else(|| anyhow!("generation vanished"))?;
                gm.serial = Some(v.serial);
                gm.fingerprint = Some(v.fingerprint);
                gm.not_before = Some(v.not_before);
                gm.not_after = Some(v.not_after);
                self.move_to(
                    name,
                    Step::Validated,
                    g.number,
                    format!("certificate valid until {}", rfc3339(v.not_after)),
                )?;
                Ok(Progress::Moved)
            }
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

    fn probe(
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
        let result = (|| -> Result<u16> {
            let key = self.open_key(g.key_id.as_deref().unwrap_or_default())?;
            let chain = validate::parse_chain(g.cert_pem.as_deref().unwrap_or_default())?;
            let ck = hsm_shim::tls::certified_key(hsm_shim::TlsSigningKey::new(key), chain)?;
            let roots = match &cfg.probe_ca {
                Some(p) => crate::tlsconf::load_roots(p)?,
                None => {
                    let mut r = hsm_shim::rustls::RootCertStore::empty();
                    for c in self.issuer(&cfg.issuer)?.ca_bundle() {
                        r.add(c.clone())?;
                    }
                    r
                }
            };
            let tls =
                crate::tlsconf::client_config(Some(ck), roots, crate::tlsconf::TlsVersions::Any)?;
            let resp = crate::http::get(
                Arc::new(tls),
                &crate::http::Url::parse(url)?,
                std::time::Duration::from_secs(15),
            )?;
            Ok(resp.status)
        })();
        match result {
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

    fn export_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join("identities").join(name)
    }

    fn promote(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Result<Progress> {
        let (g, key) = self.pending_key(rec)?;
        let chain_pem = g.cert_pem.clone().unwrap_or_default();
        let chain = validate::parse_chain(&chain_pem)?;
        // Idempotent: store_cert replaces, the exports are atomic writes.
        self.token
            .store_cert(&key.info().id, &g.key_label, &chain[0])?;
        let dir = self.export_dir(name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        firmware_config::store::atomic_write(&dir.join("cert.pem"), chain_pem.as_bytes())?;
        let uri = Pkcs11Uri::parse(g.key_uri.as_deref().unwrap_or_default())?;
        firmware_config::store::atomic_write(&dir.join("key.uri"), format!("{uri}\n").as_bytes())?;
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
        if let Some(o) = old {
            if let Some(og) = r.gen_mut(o) {
                let t = (now + overlap).min(og.not_after.unwrap_or(u64::MAX));
                og.status = GenStatus::Overlap;
                og.overlap_until = Some(t);
                until = Some(t);
            }
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

    fn end_overlap(&mut self, name: &str, rec: &IdentityRecord, now: Unix) -> Result<Progress> {
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
        let g = self
            .rec(name)
            .gen(n)
            .cloned()
            .ok_or_else(|| anyhow!("'{name}' has no generation {n}"))?;
        if let Some(id) = &g.key_id {
            self.destroy_key(id)?;
        }
        let now = self.now();
        if let Some(gm) = self.rec(name).gen_mut(n) {
            gm.status = status;
        }
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
            .ok_or_else(|| anyhow!("'{name}' has no generation {n}"))?;
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
        rec.gen(n)
            .ok_or_else(|| anyhow!("'{name}' has no generation {n}"))?;
        if rec.pending == Some(n) {
            bail!("generation {n} of '{name}' is being enrolled");
        }
        self.retire_generation(name, n, GenStatus::Revoked)?;
        let now = self.now();
        let r = self.rec(name);
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
            self.save(name)?;
        }
        Ok(())
    }

    // ---- JWK credential rotation: no certificate; the API confirms with 201 ----

    fn jwk_step(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        j: &JwkIssuer,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Result<Progress> {
        let onboarding = rec.current.is_none();
        match rec.step {
            Step::Active | Step::Lapsed if onboarding => Ok(Progress::Wait {
                until: u64::MAX,
                what: format!("no credential yet: `edge-signer jwk export {name}`, register the JWK with the API, then `edge-signer jwk activate {name} --expires DATE`"),
            }),
            Step::Active | Step::Lapsed => self.idle(name, cfg, rec, now),
            Step::KeyPending => self.jwk_prepare(name, j, rec, now),
            Step::CsrReady if onboarding => Ok(Progress::Wait {
                until: u64::MAX,
                what: format!("waiting for `edge-signer jwk activate {name} --expires DATE`"),
            }),
            Step::CsrReady => self.jwk_send(name, j, rec),
            Step::Overlap => self.end_overlap(name, rec, now),
            other => bail!("step {} does not apply to a jwk-rotation identity", other.as_str()),
        }
    }

    /// Make (or find) the new key, choose a kid never used, and fix the exact request: all
    /// recorded before anything is sent, so a lost answer is retried with the same kid.
    fn jwk_prepare(
        &mut self,
        name: &str,
        j: &JwkIssuer,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Result<Progress> {
        let g = Self::pending(rec)?;
        let info = self.find_or_generate(&g.key_label, hsm_shim::KeyType::EcP256)?;
        let kid = match &g.kid {
            Some(k) => k.clone(),
            None => crate::issuer::jwk_rotation::new_kid(&rec.kids),
        };
        let jwk = crate::issuer::jwk_rotation::public_jwk(&info, &kid).map_err(|e| anyhow!(e))?;
        let old_na = rec
            .current_gen()
            .and_then(|c| c.not_after)
            .unwrap_or(u64::MAX);
        let expiration = now + j.new_key_lifetime.secs();
        let previous_expiry = (now + j.old_key_overlap.secs()).min(old_na);
        let uri = info.uri(&self.token).to_string();
        let r = self.rec(name);
        if !r.kids.contains(&kid) {
            r.kids.push(kid.clone());
        }
        let gm = r
            .gen_mut(g.number)
            .ok_or_else(|| anyhow!("generation vanished"))?;
        gm.key_id = Some(hsm_shim::keys::hex(&info.id));
        gm.key_uri = Some(uri);
        gm.kid = Some(kid.clone());
        if r.current.is_some() {
            let gm = r
                .gen_mut(g.number)
                .ok_or_else(|| anyhow!("generation vanished"))?;
            gm.request = Some(crate::issuer::jwk_rotation::request_body(
                &jwk,
                expiration,
                previous_expiry,
            ));
            gm.not_before = Some(now);
            gm.not_after = Some(expiration);
            gm.previous_expiry = Some(previous_expiry);
        }
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

    fn jwk_send(&mut self, name: &str, j: &JwkIssuer, rec: &IdentityRecord) -> Result<Progress> {
        use crate::issuer::jwk_rotation::{rotate, Outcome};
        let g = Self::pending(rec)?;
        let cur = rec
            .current_gen()
            .cloned()
            .ok_or_else(|| anyhow!("no current credential to sign the rotation"))?;
        let cur_key = self.open_key(cur.key_id.as_deref().unwrap_or_default())?;
        let (kid, body) = (
            g.kid.clone().unwrap_or_default(),
            g.request.clone().unwrap_or_default(),
        );
        match rotate(
            j,
            &cur_key,
            cur.kid.as_deref().unwrap_or_default(),
            &kid,
            &body,
        ) {
            Outcome::Rotated => self.jwk_promote(name, &g, &cur),
            Outcome::Refused(why) => self.abandon(
                name,
                g.number,
                format!("the API refused the rotation to {kid}: {why}"),
            ),
            Outcome::Retry(why) => self.fail(name, format!("rotation to {kid}: {why}")),
        }
    }

    fn jwk_promote(&mut self, name: &str, g: &Generation, old: &Generation) -> Result<Progress> {
        let now = self.now();
        let dir = self.export_dir(name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let key = self.open_key(g.key_id.as_deref().unwrap_or_default())?;
        let jwk = crate::issuer::jwk_rotation::public_jwk(
            key.info(),
            g.kid.as_deref().unwrap_or_default(),
        )
        .map_err(|e| anyhow!(e))?;
        firmware_config::store::atomic_write(&dir.join("jwk.json"), format!("{jwk}\n").as_bytes())?;
        firmware_config::store::atomic_write(
            &dir.join("key.uri"),
            format!("{}\n", g.key_uri.clone().unwrap_or_default()).as_bytes(),
        )?;
        let until = g.previous_expiry.unwrap_or(now);
        let r = self.rec(name);
        if let Some(gm) = r.gen_mut(g.number) {
            gm.status = GenStatus::Current;
        }
        if let Some(og) = r.gen_mut(old.number) {
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
                "the API confirmed kid {}; the old key ({}) signs nothing new and is destroyed after {}",
                g.kid.as_deref().unwrap_or_default(),
                old.kid.as_deref().unwrap_or_default(),
                rfc3339(until)
            ),
        );
        self.move_to(name, Step::Overlap, g.number, "rotation confirmed (201)")?;
        Ok(Progress::Moved)
    }

    /// First credential: make the key and kid, return the public JWK to register with the API.
    pub fn jwk_export(&mut self, name: &str) -> Result<serde_json::Value> {
        let cfg = self.identity_cfg(name)?;
        let rec = self.rec(name).clone();
        if rec.current.is_some() {
            bail!("'{name}' already has a credential; use `edge-signer rotate {name} --now`");
        }
        if rec.pending.is_none() {
            self.rec(name).forced_at = Some(self.now());
            self.idle(name, &cfg, &rec, self.now())?;
        }
        if self.rec(name).step == Step::KeyPending {
            let rec = self.rec(name).clone();
            let j = self.cfg.issuers.iter().find_map(|i| match i {
                IssuerConfig::JwkRotation(j) if j.name == cfg.issuer => Some(j.clone()),
                _ => None,
            });
            let j =
                j.ok_or_else(|| anyhow!("identity '{name}' does not use a jwk-rotation issuer"))?;
            self.jwk_prepare(name, &j, &rec, self.now())?;
        }
        let rec = self.rec(name).clone();
        let g = Self::pending(&rec)?;
        let key = self.open_key(g.key_id.as_deref().unwrap_or_default())?;
        crate::issuer::jwk_rotation::public_jwk(key.info(), g.kid.as_deref().unwrap_or_default())
            .map_err(|e| anyhow!(e))
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
            gm.not_before = Some(now);
            gm.not_after = Some(expires);
        }
        r.current = Some(g.number);
        r.pending = None;
        self.move_to(
            name,
            Step::Active,
            g.number,
            format!("credential {} activated by hand", g.kid.unwrap_or_default()),
        )
    }

    /// The current key and its kid (for `jws sign`).
    pub fn current_key(&self, name: &str) -> Result<(TokenKey, String)> {
        let rec = self
            .reg
            .identities
            .get(name)
            .ok_or_else(|| anyhow!("'{name}' has no credential"))?;
        let g = rec
            .current_gen()
            .ok_or_else(|| anyhow!("'{name}' has no current credential"))?;
        Ok((
            self.open_key(g.key_id.as_deref().unwrap_or_default())?,
            g.kid.clone().unwrap_or_default(),
        ))
    }

    /// Advance `name` until it must wait; returns the wait.
    pub fn drive(&mut self, name: &str) -> Result<(Unix, String)> {
        for _ in 0..64 {
            match self.advance(name)? {
                Progress::Moved => continue,
                Progress::Wait { until, what } => return Ok((until, what)),
            }
        }
        bail!("'{name}' made 64 steps without settling: a bug; see the register")
    }

    /// Advance every configured identity; returns the earliest deadline.
    pub fn tick(&mut self) -> Unix {
        let mut next = u64::MAX;
        for name in self
            .cfg
            .identities
            .iter()
            .map(|i| i.name.clone())
            .collect::<Vec<_>>()
        {
            match self.drive(&name) {
                Ok((until, _)) => next = next.min(until),
                Err(e) => {
                    let now = self.now();
                    tracing::error!(identity = %name, "{e:#}");
                    let retry = self.fail(&name, format!("{e:#}")).ok();
                    next = next.min(match retry {
                        Some(Progress::Wait { until, .. }) => until,
                        _ => now + 60,
                    });
                }
            }
        }
        next
    }
}
