//! Building an engine from the configuration, driving one identity in the foreground with
//! progress, and the daemon loop: sleep until the next deadline, wake on SIGHUP/SIGTERM.

use crate::clock::{rfc3339, Clock, SystemClock};
use crate::err;
use crate::error::{Context, Result};
use crate::lifecycle::Engine;
use crate::register::Step;
use firmware_config::{Config, Sources};
use hsm_shim::{Token, TokenSelector};
use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// Token settings given on the command line, overriding the configuration.
#[derive(Debug, Clone, Default)]
pub struct TokenOverride {
    /// `--module`.
    pub module: Option<std::path::PathBuf>,
    /// `--token`.
    pub label: Option<String>,
    /// `--pin-file`.
    pub pin_file: Option<std::path::PathBuf>,
}

/// Open the configured token.
pub fn open_token(cfg: &Config, o: &TokenOverride) -> Result<Arc<Token>> {
    let module = o
        .module
        .clone()
        .or_else(|| cfg.token.module.clone())
        .ok_or_else(|| {
            err!("no PKCS#11 module: set token.module in the configuration or pass --module")
        })?;
    let sel = match (&o.label, &cfg.token.label, &cfg.token.serial) {
        (Some(l), _, _) | (None, Some(l), _) => TokenSelector::Label(l.clone()),
        (None, None, Some(s)) => TokenSelector::Serial(s.clone()),
        _ => crate::bail!("no token: set token.label or token.serial in the configuration"),
    };
    let source = match (&o.pin_file, &cfg.token.pin) {
        (Some(f), _) => hsm_shim::PinSource::File(f.clone()),
        (None, Some(p)) => p.source(),
        (None, None) => return Err(hsm_shim::Error::PinRequired.into()),
    };
    let pin = source.read()?;
    Ok(Token::open(&module, &sel, Some(pin))?)
}

/// Load the configuration and build the engine (issuers, token, register).
pub fn engine(sources: &Sources, o: &TokenOverride, clock: Arc<dyn Clock>) -> Result<Engine> {
    // Loading sets the key exchange groups the agent's connections offer; a refused reload
    // puts back the running ones.
    let kx_before = crate::tlsconf::default_kx();
    let built = load_engine(sources, o, clock);
    if built.is_err() {
        crate::tlsconf::set_default_kx(&kx_before);
    }
    built
}

fn load_engine(sources: &Sources, o: &TokenOverride, clock: Arc<dyn Clock>) -> Result<Engine> {
    let loaded = crate::configuration::load(sources)?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let cfg = loaded.effective.config;
    for (at, why) in firmware_config::validate::files(&cfg) {
        tracing::warn!("{at}: {why}");
    }
    build_engine(cfg, o, clock)
}

fn build_engine(cfg: Config, o: &TokenOverride, clock: Arc<dyn Clock>) -> Result<Engine> {
    let token = open_token(&cfg, o)?;
    let mut issuers = BTreeMap::new();
    for i in &cfg.issuers {
        match crate::issuer::from_config(i, &token, &cfg.paths.state_dir) {
            Ok(b) => {
                issuers.insert(i.name().to_owned(), b);
            }
            // An issuer that cannot start fails only the identities that use it.
            Err(e) => tracing::error!(issuer = i.name(), "{e:#}"),
        }
    }
    Engine::new(cfg, token, clock, issuers)
}

/// Drive one identity in the foreground until its rotation is promoted (or `timeout`),
/// printing what it waits for when that changes.
pub fn run_to_promotion(
    engine: &mut Engine,
    name: &str,
    timeout: Option<Duration>,
    mut progress: impl FnMut(&str),
) -> Result<()> {
    let start = std::time::Instant::now();
    let mut last = String::new();
    let before = engine
        .register()
        .identities
        .get(name)
        .and_then(|r| r.current);
    // An unfinished rotation (or one that got as far as the overlap) completes, not restarts.
    let resuming = engine
        .register()
        .identities
        .get(name)
        .is_some_and(|r| r.pending.is_some() || r.step == Step::Overlap);
    loop {
        let (until, what) = engine.run_until_wait(name)?;
        let rec = engine
            .register()
            .identities
            .get(name)
            .cloned()
            .unwrap_or_default();
        if let (Some(f), None) = (&rec.failure, rec.pending) {
            crate::bail!(
                "{}; the current generation ({}) keeps serving; next attempt at {}",
                f.reason,
                rec.current
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "none".into()),
                rfc3339(f.retry_at)
            );
        }
        let settled = rec.pending.is_none()
            && rec.current.is_some()
            && matches!(rec.step, Step::Active | Step::Overlap);
        if settled && rec.forced_at.is_none() && (rec.current != before || resuming) {
            return Ok(());
        }
        if what != last {
            progress(&format!(
                "[{}] {}: {what}",
                rec.step.as_str(),
                rfc3339(engine.now())
            ));
            last = what;
        }
        let now = engine.now();
        let wait = Duration::from_secs(until.saturating_sub(now).clamp(1, 3600));
        if let Some(t) = timeout {
            if start.elapsed() + wait > t {
                crate::bail!(
                    "gave up waiting after {}s; the {} stays at step {} ({last}) and resumes with the daemon or the next command",
                    t.as_secs(),
                    if before.is_none() { "enrolment" } else { "rotation" },
                    rec.step.as_str()
                );
            }
        }
        std::thread::sleep(wait);
    }
}

use crate::control::{EngineAnswer, EngineCommand, EngineRequest, Outcome};
use crate::identities::Identities;
use crate::serve::Servers;

/// After each engine pass: the served pairs, status, metrics and recent events follow the
/// engine's register.
fn publish(engine: &mut Engine, identities: &Identities) -> Vec<crate::lifecycle::plan::Status> {
    let rows = identities.refresh(engine);
    let m = crate::serve::metrics::get();
    for (name, s) in identities.all() {
        if let Some(s) = s {
            m.not_after
                .get_or_create(&crate::serve::metrics::labels(&[("identity", &name)]))
                .set(s.not_after as i64);
        }
    }
    let events: Vec<_> = engine.take_events();
    for e in &events {
        let result = match e.kind.as_str() {
            "promoted" => "success",
            "failure" => "failure",
            "abandoned" => "abandoned",
            _ => continue,
        };
        m.renewals
            .get_or_create(&crate::serve::metrics::labels(&[
                ("identity", &e.identity),
                ("result", result),
            ]))
            .inc();
        if result == "success" {
            m.last_success
                .get_or_create(&crate::serve::metrics::labels(&[("identity", &e.identity)]))
                .set(engine.now() as i64);
        }
    }
    identities.remember(events);
    rows
}

/// Forward SIGHUP/SIGTERM/SIGINT to the engine thread's channel.
fn signal_thread(tx: mpsc::Sender<EngineCommand>) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for s in signals.forever() {
                let w = if s == signal_hook::consts::SIGHUP {
                    EngineCommand::Reload
                } else {
                    EngineCommand::Stop
                };
                if tx.send(w).is_err() {
                    break;
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// The daemon's running parts: the engine (on this thread) and what serves beside it.
struct Daemon<'a> {
    sources: &'a Sources,
    o: &'a TokenOverride,
    clock: Arc<dyn Clock>,
    engine: Engine,
    identities: Arc<Identities>,
    servers: Servers,
    fleet: crate::fleet::Running,
    /// The engine's own command channel, for the fleet channel it starts.
    commands: mpsc::Sender<EngineCommand>,
    systemd: crate::systemd::Systemd,
    serial: Arc<crate::serial::Shared>,
}

impl Daemon<'_> {
    /// After each engine pass: serving, metrics and systemd's status line follow it.
    fn publish(&mut self) {
        let rows = publish(&mut self.engine, &self.identities);
        let now = self.engine.now();
        let line = crate::systemd::status_line(&rows, now);
        self.systemd.status(&self.with_down(line));
    }

    /// The listeners follow the configuration in force, each on its own; what is down is
    /// logged (by `Servers::start`), an event, in `status` and in systemd's STATUS line.
    fn restart_servers(&mut self) {
        let mut down = self.servers.start(self.engine.config());
        let rt = self.servers.runtime();
        let fleet = self
            .fleet
            .follow(self.engine.config(), &rt, &self.identities, &self.commands);
        if let Some(d) = fleet {
            tracing::error!("{d}");
            down.push(d);
        }
        for d in &down {
            self.engine.raise(
                "listener-down",
                "",
                crate::events::Severity::Critical,
                d.clone(),
            );
        }
        self.identities.set_down(down);
    }

    /// systemd's STATUS line, with what is down first.
    fn with_down(&self, line: String) -> String {
        let down = self.identities.down();
        if down.is_empty() {
            line
        } else {
            format!("DOWN: {}; {line}", down.join("; "))
        }
    }

    /// What the diagnostics port shows of the configuration in effect.
    fn publish_view(&self) {
        let (rows, fleet_version) = match self.sources.load() {
            Ok(l) => (
                firmware_config::store::show_rows(&l).unwrap_or_default(),
                l.fleet_version,
            ),
            Err(_) => (Vec::new(), 0),
        };
        self.identities.set_fleet_version(fleet_version);
        self.serial.set_view(crate::serial::View {
            serial: self.engine.config().serial.clone(),
            config_rows: rows,
            fleet_version,
            token: self.engine.token().clone(),
            clock_floor: crate::lifecycle::plan::clock_floor(self.engine.register()),
        });
    }

    fn status_line(&self) -> String {
        let now = self.engine.now();
        let rows =
            crate::lifecycle::plan::status(self.engine.config(), self.engine.register(), now);
        self.with_down(crate::systemd::status_line(&rows, now))
    }

    /// Only a configuration that validates and whose token opens replaces the running one;
    /// otherwise the daemon keeps going and says why: Ok(Err(reason)) when refused.
    fn reload(&mut self) -> Result<Result<(), String>> {
        self.systemd.reloading();
        let out = self.reload_inner();
        let line = self.status_line();
        self.systemd.ready(&line);
        out
    }

    fn reload_inner(&mut self) -> Result<Result<(), String>> {
        pick_up_spool(self.sources);
        let mut lock = self.engine.release_lock();
        let outcome = match start_engine(self.sources, self.o, &self.clock, &mut lock) {
            Ok(e) => {
                self.engine = e;
                self.restart_servers();
                self.publish();
                self.publish_view();
                tracing::info!("configuration reloaded");
                Ok(())
            }
            Err(e) => {
                self.engine.raise(
                    "reload-refused",
                    "",
                    crate::events::Severity::Critical,
                    // One line in the journal: a multi-line reason would lose its prefix.
                    format!(
                        "reload refused, the running configuration stays: {}",
                        format!("{e:#}")
                            .lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty())
                            .collect::<Vec<_>>()
                            .join(" | ")
                    ),
                );
                // The lock goes back to the running engine (or is taken again).
                let l = match lock.take() {
                    Some(l) => l,
                    None => relock(&self.engine.config().paths.state_dir)?,
                };
                self.engine.hold(l)?;
                Err(format!("{e:#}"))
            }
        };
        take_requests(&mut self.engine);
        Ok(outcome)
    }

    /// Do what the API asked; a bundle applied reloads the configuration.
    fn command(&mut self, req: EngineRequest) -> EngineAnswer {
        let e = &mut self.engine;
        let out = match req {
            EngineRequest::Rotate(name) => {
                e.force(&name).map(|()| Outcome::Queued { queued: name })
            }
            EngineRequest::Retire(name, n) => e.retire(&name, n).map(|()| Outcome::Retired {
                identity: name,
                retired: n,
            }),
            EngineRequest::Revoke(name, n) => e.revoke(&name, n).map(|()| Outcome::Revoked {
                identity: name,
                revoked: n,
            }),
            EngineRequest::Apply(bytes, channel) => {
                let applied = self
                    .sources
                    .apply_from(&bytes, channel)
                    .map_err(|e| e.to_string())?;
                let unchanged = match &applied {
                    firmware_config::Applied::Config(r) => r.already_in_effect,
                    firmware_config::Applied::Trust(t) => t.already_in_effect,
                };
                let v = Outcome::Applied(applied);
                if unchanged {
                    return Ok(v);
                }
                // Applied means in effect: only once the reload it needs went through.
                let refused = match self.reload() {
                    Ok(Ok(())) => return Ok(v),
                    Ok(Err(why)) => why,
                    Err(err) => format!("{err:#}"),
                };
                tracing::error!("reload after apply refused: {refused}");
                return Err(format!(
                    "the bundle verified and is stored, but the reload that puts it in effect was refused: {refused}; the running configuration stays, and the bundle takes effect at the next reload or restart that succeeds"
                ));
            }
        };
        self.publish();
        out.map_err(|e| format!("{e:#}"))
    }
}

/// The daemon: reconcile, then advance every identity at its deadlines. No polling loop:
/// between deadlines the process sleeps in one blocking receive.
pub fn run(sources: &Sources, o: &TokenOverride) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    signal_thread(tx.clone())?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let identities = Arc::new(Identities::default());
    let servers = Servers::new(identities.clone(), tx.clone())?;
    let serial = Arc::new(crate::serial::Shared::new(
        identities.clone(),
        tx.clone(),
        clock.clone(),
    ));
    pick_up_spool(sources);
    let mut engine = start_engine(sources, o, &clock, &mut None)?;
    take_requests(&mut engine);
    publish(&mut engine, &identities);
    let mut d = Daemon {
        sources,
        o,
        clock,
        engine,
        identities,
        servers,
        fleet: crate::fleet::Running::default(),
        commands: tx,
        systemd: crate::systemd::Systemd::new(),
        serial,
    };
    d.publish_view();
    let sc = d.engine.config().serial.clone();
    if sc.enabled {
        // A device path or speed changed by a reload takes effect at the next start.
        let shared = d.serial.clone();
        std::thread::Builder::new()
            .name("serial".into())
            .spawn(move || crate::serial::serve(shared, sc.device, sc.baud))
            .context("cannot start the diagnostics port thread")?;
    }
    d.restart_servers();
    let line = d.status_line();
    d.systemd.ready(&line);
    loop {
        let next = d.engine.run_all_until_wait();
        d.publish();
        let token = d.engine.token().clone();
        d.systemd.maybe_ping(|| token.ping().is_ok());
        let now = d.clock.now();
        let mut wait = Duration::from_secs(next.saturating_sub(now).clamp(1, 86_400));
        if let Some(ping) = d.systemd.ping_due_in() {
            wait = wait.min(ping.max(Duration::from_millis(100)));
        }
        tracing::debug!(next = %rfc3339(now + wait.as_secs()), "sleeping until the next deadline");
        match rx.recv_timeout(wait) {
            Ok(EngineCommand::Reload) => {
                tracing::info!("SIGHUP: reloading the configuration");
                d.reload()?.ok();
            }
            Ok(EngineCommand::Stop) => {
                tracing::info!("stopping");
                d.systemd.stopping();
                return Ok(());
            }
            Ok(EngineCommand::Request(req, reply)) => {
                tracing::info!(request = ?req, "asked through the API");
                reply.send(d.command(req));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// Take the state-dir lock as the daemon, or say who holds it.
fn relock(dir: &std::path::Path) -> Result<crate::statelock::StateLock> {
    match crate::statelock::StateLock::try_acquire(dir, true)
        .with_context(|| format!("cannot lock {}", dir.display()))?
    {
        Ok(lock) => Ok(lock),
        Err(h) => crate::bail!(
            "edge-signer pid {} ({}) owns {}: one writer per state directory; stop it first",
            h.pid,
            if h.daemon { "a daemon" } else { "a command" },
            dir.display()
        ),
    }
}

/// Rotations the CLI asked for while this daemon owns the state.
fn take_requests(engine: &mut Engine) {
    let dir = engine.config().paths.state_dir.clone();
    for name in crate::statelock::take_rotation_requests(&dir) {
        match engine.force(&name) {
            Ok(()) => tracing::info!(identity = %name, "rotation asked for from the command line"),
            Err(e) => tracing::warn!(identity = %name, "rotation request refused: {e:#}"),
        }
    }
}

/// Build the engine from the configuration, take the state-dir lock (the daemon is the one
/// writer while it runs) and reconcile with the token.
fn start_engine(
    sources: &Sources,
    o: &TokenOverride,
    clock: &Arc<dyn Clock>,
    lock: &mut Option<crate::statelock::StateLock>,
) -> Result<Engine> {
    let mut engine = engine(sources, o, clock.clone())?;
    crate::logging::apply(&engine.config().log);
    let l = match lock.take() {
        Some(l) => l,
        None => relock(&engine.config().paths.state_dir)?,
    };
    engine.hold(l)?;
    match engine.reconcile() {
        Ok(notes) => {
            notes.iter().for_each(|n| tracing::warn!("{n}"));
            tracing::info!(notes = notes.len(), "reconciled with the token");
        }
        // A token that cannot list its keys now destroys nothing; the next start or
        // reload reconciles again.
        Err(e) => tracing::error!("reconcile skipped, nothing destroyed: {e:#}"),
    }
    tracing::info!(
        identities = engine.config().identities.len(),
        "edge-signer running"
    );
    Ok(engine)
}

/// Apply fleet bundles dropped in the spool directory (on start and on SIGHUP).
fn pick_up_spool(sources: &Sources) {
    let Ok(loaded) = sources.load() else { return };
    let spool = loaded.effective.config.fleet.spool_dir;
    let Ok(rd) = std::fs::read_dir(&spool) else {
        return;
    };
    let mut files: Vec<_> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "bundle"))
        .collect();
    files.sort();
    for f in files {
        let outcome = std::fs::read(&f)
            .map_err(|e| e.to_string())
            .and_then(|b| sources.apply_any(&b).map_err(|e| e.to_string()));
        let dest = match &outcome {
            Ok(firmware_config::Applied::Config(r)) => {
                tracing::info!(bundle = %f.display(), version = r.version, changes = r.changes.len(), "fleet bundle applied");
                "applied"
            }
            Ok(firmware_config::Applied::Trust(t)) => {
                tracing::warn!(bundle = %f.display(), version = t.version, trusted = ?t.trusted, removed = ?t.removed, "trust bundle applied: the trusted fleet keys changed");
                "applied"
            }
            Err(e) => {
                tracing::error!(bundle = %f.display(), "fleet bundle refused: {e}");
                "refused"
            }
        };
        let dir = spool.join(dest);
        let _ = std::fs::create_dir_all(&dir);
        if let Some(n) = f.file_name() {
            let _ = std::fs::rename(&f, dir.join(n));
        }
    }
}
