//! The lifecycle engine: one state machine per identity, persisted at every step.
//!
//! `active -> key-pending -> csr-ready -> submitted -> issued -> validated -> probed ->
//! overlap -> (old generation retired) -> active`, plus `lapsed` and retryable failures with
//! capped exponential backoff. Every step is idempotent, so a restart at any point resumes.
//!
//! - `plan.rs` decides the next step from the record (and `status` shows that decision),
//! - `certificate.rs` runs the certificate flow (portal, EST), `credential.rs` the
//!   credential flow (JWK rotation), `retire.rs` overlap ends, retire, revoke, reconcile,
//!   `alerts.rs` reminders and the lapse alarm, `failure.rs` failures, backoff and abandoned
//!   generations.

mod alerts;
mod certificate;
mod credential;
mod export;
mod failure;
pub mod plan;
mod retire;
pub mod schedule;

pub use schedule::renewal_time;

pub use plan::{status, Status};

use crate::clock::{Clock, Unix};
use crate::error::{Error, Result};
use crate::events::{Events, Severity};
use crate::issuer::{Flow, Issuer};
use crate::register::{Generation, IdentityRecord, Register, RegisterFile, Step};
use crate::{bail, err};
use firmware_config::schema::{CnSuffix, Config, IdentityConfig};
use hsm_shim::{KeyRef, Token, TokenKey};
use plan::{Action, Plan};
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
    /// The register as last saved (read by others through `register()`).
    reg: Register,
    /// Events raised (taken by the daemon through `take_events()`).
    events: Events,
    issuers: BTreeMap<String, Box<dyn Issuer>>,
    state_dir: PathBuf,
    /// The state-dir lock, while this engine is the one writer.
    lock: Option<crate::statelock::StateLock>,
    /// The clock was last seen below its floor (the event is raised once per episode).
    clock_in_doubt: bool,
    #[cfg(feature = "test-hooks")]
    kill_at: Option<String>,
}

/// Whether `rec` (None: never enrolled) needs a rotation at `now`: not enrolled yet, one
/// asked for or under way, or past the renewal point of the current generation. An overlap
/// after a promotion is not a reason: the new generation is current and far from due.
/// Read-only: the CLI answers from the register beside a running daemon.
pub fn needs_renewal(cfg: &IdentityConfig, rec: Option<&IdentityRecord>, now: Unix) -> bool {
    let Some(rec) = rec else { return true };
    if rec.current.is_none() || rec.pending.is_some() || rec.forced_at.is_some() {
        return true;
    }
    renewal_time(cfg, rec).is_some_and(|t| now >= t)
}

/// The label of a generation's key objects.
pub fn key_label(identity: &str, generation: u32) -> String {
    format!("edge-signer:{identity}:g{generation}")
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
        let mut e = Engine {
            cfg,
            token,
            clock,
            file,
            reg,
            events,
            issuers,
            state_dir,
            lock: None,
            clock_in_doubt: false,
            #[cfg(feature = "test-hooks")]
            kill_at: std::env::var("EDGE_SIGNER_TEST_KILL_AT").ok(),
        };
        e.follow_poll_intervals();
        for (name, issuer) in e.issuers.iter_mut() {
            issuer.restore_account(e.reg.accounts.get(name).cloned());
        }
        Ok(e)
    }

    /// A check already scheduled by an issuer's `poll_interval` comes no later than the
    /// interval configured now (a lowered interval takes effect at the reload, not after
    /// the old one ran out).
    fn follow_poll_intervals(&mut self) {
        let now = self.now();
        for ic in &self.cfg.identities {
            let Some(every) = self.issuers.get(&ic.issuer).and_then(|i| i.poll_interval()) else {
                continue;
            };
            if let Some(w) = self
                .reg
                .identities
                .get_mut(&ic.name)
                .filter(|r| r.step == Step::Submitted)
                .and_then(|r| r.waiting.as_mut())
            {
                w.until = w.until.min(now.saturating_add(every));
            }
        }
    }

    /// Look at a submission now instead of at its scheduled check (an interactive `enroll`
    /// or `rotate`: someone is waiting for the answer). Only a check its issuer schedules by
    /// `poll_interval` (a portal inbox): a server's Retry-After is honoured by every process.
    pub fn check_now(&mut self, name: &str) {
        let by_interval = self
            .cfg
            .identities
            .iter()
            .find(|i| i.name == name)
            .and_then(|i| self.issuers.get(&i.issuer))
            .is_some_and(|i| i.poll_interval().is_some());
        if !by_interval {
            return;
        }
        if let Some(r) = self.reg.identities.get_mut(name) {
            if r.step == Step::Submitted {
                if let Some(w) = r.waiting.as_mut() {
                    w.until = 0;
                }
            }
        }
    }

    /// Become the one writer: keep `lock` and read the register again under it (whoever
    /// held the lock before may have changed it).
    pub fn hold(&mut self, lock: crate::statelock::StateLock) -> Result<()> {
        self.lock = Some(lock);
        self.reg = self.file.load()?;
        self.follow_poll_intervals();
        Ok(())
    }

    /// Give the state-dir lock up (to hand it to the engine of a reload).
    pub fn release_lock(&mut self) -> Option<crate::statelock::StateLock> {
        self.lock.take()
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The register as last saved. Only the engine writes it.
    pub fn register(&self) -> &Register {
        &self.reg
    }

    /// The events raised since they were last taken.
    pub fn events(&self) -> &[crate::events::Event] {
        &self.events.log
    }

    /// Take the events raised so far (the daemon publishes them).
    pub fn take_events(&mut self) -> Vec<crate::events::Event> {
        std::mem::take(&mut self.events.log)
    }

    /// Raise an event of the daemon's own (a listener down, a reload refused): it goes to the
    /// notify hook and the log like the engine's.
    pub fn raise(
        &mut self,
        kind: &str,
        identity: &str,
        severity: crate::events::Severity,
        message: String,
    ) {
        let now = self.now();
        self.events.emit(now, kind, identity, severity, message);
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
            .ok_or_else(|| err!("no identity '{name}' in the configuration"))
    }

    fn rec(&mut self, name: &str) -> &mut IdentityRecord {
        self.reg.identities.entry(name.to_owned()).or_default()
    }

    fn gen_mut(&mut self, name: &str, n: u32) -> Result<&mut Generation> {
        self.rec(name)
            .gen_mut(n)
            .ok_or_else(|| err!("'{name}' has no generation {n} in the register"))
    }

    fn save(&mut self, name: &str) -> Result<()> {
        self.file.save(&self.reg)?;
        #[cfg(feature = "test-hooks")]
        if let Some(step) = &self.kill_at {
            // Test hook: die like `kill -9` right after a step is on disk.
            let now_step = self.reg.identities.get(name).map(|r| r.step.as_str());
            if now_step == Some(step.as_str()) {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &std::process::id().to_string()])
                    .status();
            }
        }
        let _ = name;
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

    fn flow(&self, ic: &IdentityConfig) -> Flow {
        plan::flow_of(&self.cfg, ic)
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
        self.save(name)?;
        self.check_now(name);
        Ok(())
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
        let cfg = self.identity_cfg(name)?;
        Ok(needs_renewal(
            &cfg,
            self.reg.identities.get(name),
            self.now(),
        ))
    }

    fn destroy_key(&self, key: &crate::register::KeyRecord) -> Result<()> {
        match self.token.destroy(&key.id) {
            Ok(_) | Err(hsm_shim::Error::KeyNotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn open_key(&self, key: &crate::register::KeyRecord) -> Result<TokenKey> {
        Ok(TokenKey::open(
            self.token.clone(),
            &KeyRef::Id(key.id.clone()),
        )?)
    }

    /// The pending generation's key: found by its label (a crash after `C_GenerateKeyPair`
    /// left it there) or generated now.
    fn find_or_generate(
        &self,
        label: &str,
        key_type: hsm_shim::KeyType,
        decrypt: bool,
    ) -> Result<hsm_shim::KeyInfo> {
        match self.token.find_key(&KeyRef::Label(label.to_owned())) {
            Ok(k) => Ok(k),
            Err(hsm_shim::Error::KeyNotFound(_)) => {
                Ok(self.token.generate_key_for(key_type, label, decrypt)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The pending generation and a signer for its key.
    fn pending_key(&self, rec: &IdentityRecord) -> Result<(Generation, TokenKey)> {
        let g = Self::pending(rec)?;
        let key = self.open_key(g.need_key()?)?;
        Ok((g, key))
    }

    fn pending(rec: &IdentityRecord) -> Result<Generation> {
        rec.pending
            .and_then(|n| rec.gen(n))
            .cloned()
            .ok_or_else(|| {
                err!(
                    "register inconsistent: step {} without a pending generation",
                    rec.step.as_str()
                )
            })
    }

    fn issuer(&mut self, name: &str) -> Result<&mut Box<dyn Issuer>> {
        self.issuers
            .get_mut(name)
            .ok_or_else(|| err!("issuer '{name}' is not available (see the log at start)"))
    }

    /// Move issuer `name`'s CA account to a new token key (`acme rollover`); the new key's
    /// thumbprint.
    pub fn rollover_account(&mut self, name: &str) -> Result<String> {
        let r = self.issuer(name)?.rollover_account();
        self.keep_account(name)?;
        r.map_err(|e| Error::permanent(format!("issuer '{name}': {e}")))
    }

    /// Write issuer `name`'s CA account to the register when a call changed it.
    pub(super) fn keep_account(&mut self, name: &str) -> Result<()> {
        let Some(now) = self.issuers.get(name).map(|i| i.account()) else {
            return Ok(());
        };
        if self.reg.accounts.get(name) == now.as_ref() {
            return Ok(());
        }
        match now {
            Some(a) => self.reg.accounts.insert(name.to_owned(), a),
            None => self.reg.accounts.remove(name),
        };
        self.file.save(&self.reg)?;
        Ok(())
    }

    fn identities_dir(&self) -> PathBuf {
        self.state_dir.join("identities")
    }

    /// Take at most one step for `name` (an alert due first shortens the wait it returns).
    pub fn take_one_step(&mut self, name: &str) -> Result<Progress> {
        let cfg = self.identity_cfg(name)?;
        let now = self.now();
        let alert = self.alerts(name, &cfg, now)?;
        let rec = self.rec(name).clone();
        let progress = self.act_on_plan(name, &cfg, &rec, now)?;
        Ok(match (progress, alert) {
            (Progress::Wait { until, what }, Some(a)) if a < until => {
                Progress::Wait { until: a, what }
            }
            (p, _) => p,
        })
    }

    fn act_on_plan(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Result<Progress> {
        let flow = self.flow(cfg);
        let floor = plan::clock_floor(&self.reg);
        let action = match plan::plan(cfg, flow, rec, now, floor) {
            Plan::Wait { until, what } => {
                let doubt = now + crate::validate::SKEW < floor;
                if doubt && !self.clock_in_doubt {
                    self.events
                        .emit(now, "clock", name, Severity::Critical, what.clone());
                }
                self.clock_in_doubt = doubt;
                return Ok(Progress::Wait { until, what });
            }
            Plan::Act(a) => a,
        };
        self.clock_in_doubt = false;
        match (flow, action) {
            (_, Action::Begin) => self.begin(name, cfg, rec, now),
            (_, Action::Retire) => self.end_overlap(name, rec, now),
            (Flow::Certificate, Action::MakeKey) => self.make_key(name, cfg, rec),
            (Flow::Certificate, Action::Submit | Action::Poll) => {
                self.ask_issuer(name, cfg, rec, now)
            }
            (Flow::Certificate, Action::Check) => self.check_cert(name, cfg, rec, now),
            (Flow::Certificate, Action::Probe) => self.probe(name, cfg, rec),
            (Flow::Certificate, Action::Promote) => self.promote(name, cfg, rec, now),
            (Flow::Credential, Action::MakeKey) => self.credential_prepare(name, cfg, rec, now),
            (Flow::Credential, Action::Submit) => self.credential_send(name, cfg, rec),
            (Flow::Credential, Action::Check) => self.credential_check(name, cfg, rec),
            (Flow::Credential, Action::Resolve) => self.credential_resolve(name, cfg, rec),
            (f, a) => bail!(
                "step {} ({a:?}) does not apply to a {f:?} identity: see the register",
                rec.step.as_str()
            ),
        }
    }

    /// Plan a new generation (new key, never the old one), persisted before the key exists.
    fn begin(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        rec: &IdentityRecord,
        now: Unix,
    ) -> Result<Progress> {
        let n = rec.next_number();
        let cn = match cfg.cn_suffix {
            CnSuffix::None => cfg.subject.cn.clone(),
            CnSuffix::UnixTime => format!("{}-{now}", cfg.subject.cn),
            CnSuffix::Generation => format!("{}-g{n}", cfg.subject.cn),
        };
        let g = Generation::planned(
            n,
            key_label(name, n),
            cfg.subject.to_subject(&cn).to_string(),
            cfg.sans.iter().map(|s| s.to_string()).collect(),
            cfg.issuer.clone(),
            now,
        );
        let why = if rec.current.is_none() {
            "first enrolment"
        } else if rec.forced_at.is_some() {
            "rotation asked for"
        } else if rec.step == Step::Lapsed {
            "the current generation lapsed"
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

    /// The current key and the `kid` its JWS carry (for `jws sign`): the credential's kid,
    /// or for a certificate identity the certificate's SHA-256 fingerprint.
    pub fn current_key(&self, name: &str) -> Result<(TokenKey, String)> {
        let rec = self
            .reg
            .identities
            .get(name)
            .ok_or_else(|| err!("'{name}' has no credential"))?;
        let g = rec
            .current_gen()
            .ok_or_else(|| err!("'{name}' has no current credential"))?;
        let kid = match g.jws_kid() {
            Some(kid) => kid.to_owned(),
            None => g.need_kid()?.to_owned(),
        };
        Ok((self.open_key(g.need_key()?)?, kid))
    }

    /// Take steps for `name` until it must wait; returns the wait.
    pub fn run_until_wait(&mut self, name: &str) -> Result<(Unix, String)> {
        for _ in 0..64 {
            match self.take_one_step(name)? {
                Progress::Moved => continue,
                Progress::Wait { until, what } => return Ok((until, what)),
            }
        }
        bail!("'{name}' made 64 steps without settling: a bug; see the register")
    }

    /// Run every configured identity until it must wait; returns the earliest deadline.
    pub fn run_all_until_wait(&mut self) -> Unix {
        let mut next = u64::MAX;
        for name in self
            .cfg
            .identities
            .iter()
            .map(|i| i.name.clone())
            .collect::<Vec<_>>()
        {
            match self.run_until_wait(&name) {
                Ok((until, _)) => next = next.min(until),
                Err(e) => {
                    let now = self.now();
                    tracing::error!(identity = %name, "{e:#}");
                    let persistence = e.persistence();
                    let retry = self.fail_as(&name, format!("{e:#}"), persistence).ok();
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
