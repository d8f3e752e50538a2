//! The lifecycle commands: run, status, enroll, rotate, retire, revoke, needs-renewal, jwk, jws.

use super::*;
use edge_signer::statelock::{Holder, StateLock};
use edge_signer::text::printable;

/// Run a lifecycle command.
pub(crate) fn run(g: &Global, cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Run => {
            edge_signer::daemon::run(&sources(g), &overrides(g))?;
        }
        Cmd::Status { json, timeline } => return status_cmd(g, json, timeline),
        Cmd::Enroll { name, timeout } => {
            if let Some(owner) = daemon_owner(g)? {
                return hand_to_daemon(&owner, &name, timeout);
            }
            let mut e = lifecycle_engine(g)?;
            if e.register()
                .identities
                .get(&name)
                .is_some_and(|r| r.current.is_some())
            {
                bail!("'{name}' is already enrolled; use `edge-signer rotate {name} --now` for a new generation");
            }
            e.force(&name)?;
            run_to_promotion(&mut e, &name, timeout)?;
        }
        Cmd::Rotate { name, now, timeout } => return rotate_cmd(g, name, now, timeout),
        Cmd::Retire { name, generation } => return end_generation(g, &name, generation, false),
        Cmd::Revoke { name, generation } => return end_generation(g, &name, generation, true),
        Cmd::NeedsRenewal { name } => {
            // Read-only, from the configuration and the register: beside a running daemon too.
            let cfg = edge_signer::configuration::load(&sources(g))?
                .effective
                .config;
            let ic = cfg
                .identities
                .iter()
                .find(|i| i.name == name)
                .with_context(|| format!("no identity '{name}' in the configuration"))?;
            let reg = edge_signer::register::RegisterFile::new(&cfg.paths.state_dir).load()?;
            let now = edge_signer::clock::Clock::now(&edge_signer::clock::SystemClock);
            let due = edge_signer::lifecycle::needs_renewal(ic, reg.identities.get(&name), now);
            return Ok(if due { 0 } else { 1 });
        }
        Cmd::Acme(AcmeCmd::Rollover { issuer, json }) => {
            let mut e = lifecycle_engine(g)?;
            let thumbprint = e.rollover_account(&issuer)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "issuer": issuer, "thumbprint": thumbprint })
                );
            } else {
                println!("{issuer}: the ACME account now uses a new token key (JWK thumbprint {thumbprint}); the old key is destroyed");
            }
        }
        Cmd::Jwk(JwkCmd::Export { name }) => {
            let mut e = lifecycle_engine(g)?;
            let jwk = e.jwk_export(&name)?;
            println!("{jwk:#}");
        }
        Cmd::Jwk(JwkCmd::Activate { name, expires }) => {
            let at = edge_signer::clock::parse_date(&expires).map_err(|e| anyhow::anyhow!(e))?;
            let mut e = lifecycle_engine(g)?;
            e.jwk_activate(&name, at)?;
            println!(
                "{name}: credential active until {}",
                edge_signer::clock::rfc3339(at)
            );
        }
        Cmd::Jws(JwsCmd::Sign { name, payload }) => return jws_sign(g, &name, payload.as_deref()),
        _ => bail!("internal: not a lifecycle command"),
    }
    Ok(0)
}

/// `retire` / `revoke`: by the daemon when it runs (through its API), else here.
fn end_generation(g: &Global, name: &str, generation: u32, revoke: bool) -> Result<i32> {
    let (verb, done) = if revoke {
        ("revoke", "revoked")
    } else {
        ("retire", "retired")
    };
    if let Some(owner) = daemon_owner(g)? {
        owner.call(
            "POST",
            &format!("/v1/identities/{name}/{verb}?generation={generation}"),
            Vec::new(),
        )?;
        println!("{name}: generation {generation} {done} by the daemon; its key objects are gone from the token");
        return Ok(0);
    }
    let mut e = lifecycle_engine(g)?;
    if revoke {
        e.revoke(name, generation)?;
    } else {
        e.retire(name, generation)?;
    }
    println!("{name}: generation {generation} {done}; its key objects are gone from the token");
    Ok(0)
}

/// `jws sign`: a compact JWS with the current key (read-only: no lock, no reconcile).
fn jws_sign(g: &Global, name: &str, payload: Option<&Path>) -> Result<i32> {
    let data = match payload {
        None => Vec::new(),
        Some(p) if p == Path::new("-") => {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)?;
            v
        }
        Some(p) => std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
    };
    let e = edge_signer::daemon::engine(
        &sources(g),
        &overrides(g),
        Arc::new(edge_signer::clock::SystemClock),
    )?;
    let (key, kid) = e.current_key(name)?;
    println!(
        "{}",
        hsm_shim::jws::sign_compact(
            &key,
            hsm_shim::jws::JwsAlg::for_key(key.key_type()),
            &kid,
            &data
        )?
    );
    Ok(0)
}

/// The engine for a command that changes state: it must be the one writer. While a daemon
/// owns the state directory, the command is refused with what to do instead.
pub(crate) fn lifecycle_engine(g: &Global) -> Result<edge_signer::lifecycle::Engine> {
    let mut e = edge_signer::daemon::engine(
        &sources(g),
        &overrides(g),
        Arc::new(edge_signer::clock::SystemClock),
    )?;
    let dir = e.config().paths.state_dir.clone();
    match StateLock::try_acquire(&dir, false)
        .with_context(|| format!("cannot lock {}", dir.display()))?
    {
        Ok(lock) => e.hold(lock)?,
        Err(h) if h.daemon => bail!(
            "the edge-signer daemon (pid {}) owns {}: it is the one writer of the register. With [api] enabled this command is handed to it; without, `rotate --now` and `enroll` are, and for this command stop it first (systemctl stop edge-signer) and start it again after",
            h.pid,
            dir.display()
        ),
        Err(h) => bail!(
            "another edge-signer command (pid {}) is changing {}; try again when it has finished",
            h.pid,
            dir.display()
        ),
    }
    match e.reconcile() {
        Ok(notes) => notes
            .iter()
            .for_each(|n| eprintln!("reconcile: {}", printable(n))),
        Err(err) => eprintln!(
            "reconcile skipped, nothing destroyed: {}",
            printable(&format!("{err:#}"))
        ),
    }
    Ok(e)
}

pub(crate) fn run_to_promotion(
    e: &mut edge_signer::lifecycle::Engine,
    name: &str,
    timeout: Option<u64>,
) -> Result<()> {
    edge_signer::daemon::run_to_promotion(e, name, timeout.map(Duration::from_secs), |line| {
        eprintln!("{}", printable(line))
    })?;
    let rec = e
        .register()
        .identities
        .get(name)
        .cloned()
        .unwrap_or_default();
    let g = rec.current_gen().cloned();
    let which = match (
        g.as_ref().and_then(|g| g.kid()),
        g.as_ref().and_then(|g| g.cert()),
    ) {
        (Some(kid), _) => format!("kid {kid}"),
        (None, Some(cert)) => format!("serial {}", cert.serial),
        (None, None) => "none".into(),
    };
    println!(
        "{name}: generation {} is current ({which}, valid until {})",
        rec.current.unwrap_or(0),
        g.as_ref()
            .and_then(|g| g.not_after())
            .map(edge_signer::clock::rfc3339)
            .unwrap_or_else(|| "-".into())
    );
    for old in rec
        .generations
        .iter()
        .filter(|g| g.status == edge_signer::register::GenStatus::Overlap)
    {
        println!(
            "  generation {} stays valid until {} (overlap), then its key is destroyed",
            old.number,
            old.overlap_until
                .map(edge_signer::clock::rfc3339)
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// `status`: from the register alone.
fn status_cmd(g: &Global, json: bool, timeline: bool) -> Result<i32> {
    let loaded = edge_signer::configuration::load(&sources(g))?;
    let cfg = loaded.effective.config;
    let reg = edge_signer::register::RegisterFile::new(&cfg.paths.state_dir).load()?;
    // While the daemon runs and serves its API, its own view; otherwise the register's.
    let mut down: Vec<String> = Vec::new();
    let from_daemon = match daemon_owner(g)? {
        Some(owner) if owner.api.is_some() => {
            let listeners = owner.call("GET", "/v1/listeners", Vec::new())?;
            down = serde_json::from_value(listeners["down"].clone()).unwrap_or_default();
            Some(serde_json::from_value(owner.call(
                "GET",
                "/v1/status",
                Vec::new(),
            )?)?)
        }
        _ => None,
    };
    let rows: Vec<edge_signer::lifecycle::plan::Status> = match from_daemon {
        Some(rows) => rows,
        None => edge_signer::lifecycle::status(
            &cfg,
            &reg,
            edge_signer::clock::Clock::now(&edge_signer::clock::SystemClock),
        ),
    };
    print(json, serde_json::to_value(&rows)?, || {
        let mut out: String = down.iter().map(|d| format!("DOWN: {d}\n")).collect();
        for r in &rows {
            out += &status_text(r);
            if timeline {
                for t in reg
                    .identities
                    .get(&r.name)
                    .map(|x| x.transitions.as_slice())
                    .unwrap_or_default()
                {
                    out += &format!(
                        "    {}  g{:<3} {:<12} {}\n",
                        edge_signer::clock::rfc3339(t.at),
                        t.generation,
                        t.step.as_str(),
                        t.note
                    );
                }
            }
        }
        out
    });
    Ok(0)
}

/// One identity's lines in the human `status`.
fn status_text(r: &edge_signer::lifecycle::plan::Status) -> String {
    let mut out = format!("{} [{}]\n", r.name, r.state);
    match r.generation {
        Some(n) => {
            out += &match &r.kid {
                Some(kid) => format!("  generation {n}: kid {kid}\n"),
                None => format!(
                    "  generation {n}: serial {} sha256 {}\n",
                    r.serial.as_deref().unwrap_or("-"),
                    r.fingerprint.as_deref().unwrap_or("-")
                ),
            };
            out += &format!("  key {}\n", r.key_uri.as_deref().unwrap_or("-"));
            out += &format!(
                "  valid until {} ({} days left)\n",
                r.not_after.as_deref().unwrap_or("-"),
                r.days_left.unwrap_or(0)
            );
        }
        None => out += "  no current generation\n",
    }
    for old in r
        .live_generations
        .iter()
        .filter(|g| Some(**g) != r.generation && Some(**g) != r.pending_generation)
    {
        out += &format!(
            "  generation {old}: overlapping, still valid (`edge-signer retire {} --generation {old}` ends it now)\n",
            r.name
        );
    }
    if let Some(p) = r.pending_generation {
        out += &format!("  enrolling generation {p}\n");
    }
    for w in &r.warnings {
        out += &format!("  warning: {w}\n");
    }
    // "renewal at T" already says when.
    let at = r
        .next_at
        .as_deref()
        .filter(|t| !r.next_action.contains(t))
        .map(|t| format!(" at {t}"))
        .unwrap_or_default();
    out += &format!("  next: {}{at}\n", r.next_action);
    if let Some(e) = &r.last_error {
        out += &format!("  last error: {e}\n");
    }
    out
}

/// During an overlap a rotation is queued until the old generation retires: what to say.
fn queued_in_overlap(name: &str, rec: &edge_signer::register::IdentityRecord) -> Option<String> {
    if rec.step != edge_signer::register::Step::Overlap || rec.pending.is_some() {
        return None;
    }
    let lines: Vec<String> = rec
        .generations
        .iter()
        .filter(|g| g.status == edge_signer::register::GenStatus::Overlap)
        .map(|old| format!(
            "{name}: generation {} overlaps with the current generation {} until {}; the rotation is queued and starts when the overlap ends (the daemon, or `edge-signer rotate {name}` then).\n  To start it sooner: `edge-signer retire {name} --generation {}` destroys the old key now, then `edge-signer rotate {name} --now`.",
            old.number,
            rec.current.unwrap_or(0),
            old.overlap_until.map(edge_signer::clock::rfc3339).unwrap_or_default(),
            old.number
        ))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// `rotate`: when due, or now; during an overlap a rotation is queued.
fn rotate_cmd(g: &Global, name: String, now: bool, timeout: Option<u64>) -> Result<i32> {
    if let Some(owner) = daemon_owner(g)? {
        if !now {
            println!("{name}: the daemon (pid {}) runs and renews at the policy point; `edge-signer status` shows when; `rotate {name} --now` asks it to rotate now", owner.holder.pid);
            return Ok(0);
        }
        return hand_to_daemon(&owner, &name, timeout);
    }
    let mut e = lifecycle_engine(g)?;
    let rec = e
        .register()
        .identities
        .get(&name)
        .cloned()
        .unwrap_or_default();
    if let Some(note) = now.then(|| queued_in_overlap(&name, &rec)).flatten() {
        // A new rotation cannot start while the old generation still overlaps: queue it.
        e.force(&name)?;
        println!("{note}");
        return Ok(0);
    }
    // An overlap is the end of a rotation: `rotate` (not --now) finishes it when it is due.
    let unfinished = rec.step != edge_signer::register::Step::Active;
    if unfinished {
        // Someone waits at the terminal: look at a submission now, not at its next check.
        e.check_now(&name);
    }
    if now {
        e.force(&name)?;
    } else if !unfinished && !e.needs_renewal(&name)? {
        let t = e
            .renewal_time(&name)
            .map(edge_signer::clock::rfc3339)
            .unwrap_or_default();
        println!("{name}: renewal not due until {t}; use --now to rotate anyway");
        return Ok(0);
    }
    run_to_promotion(&mut e, &name, timeout)?;
    Ok(0)
}

/// The daemon that owns the state directory, and its API socket when it serves one.
pub(crate) struct Owner {
    pub(crate) dir: PathBuf,
    pub(crate) holder: Holder,
    api: Option<PathBuf>,
}

impl Owner {
    /// Ask the daemon through its API; without one, say how to proceed.
    pub(crate) fn call(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<serde_json::Value> {
        let Some(sock) = &self.api else {
            bail!(
                "the edge-signer daemon (pid {}) owns {}: it is the one writer. Enable [api] in the configuration so commands are handed to it, or stop it first (systemctl stop edge-signer)",
                self.holder.pid,
                self.dir.display()
            );
        };
        Ok(
            edge_signer::local_api::call(sock, method, path, body, Duration::from_secs(90))?
                .ok()?,
        )
    }
}

/// The daemon that owns the state directory, if one runs.
pub(crate) fn daemon_owner(g: &Global) -> Result<Option<Owner>> {
    let loaded = edge_signer::configuration::load(&sources(g))?;
    let cfg = loaded.effective.config;
    let dir = cfg.paths.state_dir;
    Ok(match StateLock::try_acquire(&dir, false)? {
        Err(h) if h.daemon => Some(Owner {
            dir,
            holder: h,
            api: cfg.api.enabled.then_some(cfg.api.socket),
        }),
        _ => None,
    })
}

/// Ask the running daemon to rotate `name` now (through its API, or a request file and
/// SIGHUP without one) and follow the register (read-only) until the new generation is
/// promoted, the attempt fails, or `timeout` passes.
fn hand_to_daemon(owner: &Owner, name: &str, timeout: Option<u64>) -> Result<i32> {
    // The name becomes a file name in the state dir: only what config validation allows.
    if !firmware_config::validate::safe_name(name) {
        bail!("no identity '{name}' in the configuration");
    }
    let (dir, h) = (&owner.dir, &owner.holder);
    let file = edge_signer::register::RegisterFile::new(dir);
    let at_start = file
        .load()?
        .identities
        .get(name)
        .cloned()
        .unwrap_or_default();
    let before = at_start.current;
    match owner.api {
        Some(_) => {
            owner.call("POST", &format!("/v1/identities/{name}/rotate"), Vec::new())?;
        }
        None => edge_signer::statelock::ask_daemon_to_rotate(dir, name, h)?,
    }
    eprintln!(
        "the daemon (pid {}) owns {}: asked it to rotate {name}",
        h.pid,
        dir.display()
    );
    if let Some(note) = queued_in_overlap(name, &at_start) {
        println!("{note}");
        return Ok(0);
    }
    let start = std::time::Instant::now();
    let limit = Duration::from_secs(timeout.unwrap_or(3600));
    let mut last = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let rec = file
            .load()?
            .identities
            .get(name)
            .cloned()
            .unwrap_or_default();
        if rec.current != before && rec.current.is_some() && rec.pending.is_none() {
            println!(
                "{name}: generation {} is current (rotated by the daemon)",
                rec.current.unwrap_or(0)
            );
            return Ok(0);
        }
        if let (Some(f), None) = (&rec.failure, rec.pending) {
            if start.elapsed() > Duration::from_secs(1) {
                bail!(
                    "{}; the daemon retries at {}",
                    f.reason,
                    edge_signer::clock::rfc3339(f.retry_at)
                );
            }
        }
        let step = rec.step.as_str().to_owned();
        if step != last {
            eprintln!(
                "[{step}] generation {}",
                rec.pending.or(rec.current).unwrap_or(0)
            );
            last = step;
        }
        if start.elapsed() > limit {
            let waits = rec
                .waiting
                .as_ref()
                .map(|w| format!(", waiting for {}", w.what))
                .unwrap_or_default();
            bail!(
                "gave up waiting after {}s; the daemon goes on with the {} of {name} at step {}{waits} (see `edge-signer status`)",
                limit.as_secs(),
                if before.is_none() { "enrolment" } else { "rotation" },
                rec.step.as_str()
            );
        }
    }
}
