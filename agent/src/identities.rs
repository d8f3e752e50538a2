//! The identities the daemon serves: per identity one atomically swapped pair (token key +
//! chain as one `CertifiedKey`), read by rustls resolvers at every handshake and by the API.
//! The engine thread refreshes them after each step; a promotion swaps the pair, new
//! handshakes use it at once, open connections keep what they authenticated with.

use crate::clock::Unix;
use crate::lifecycle::plan::Status;
use crate::lifecycle::Engine;
use crate::register::Generation;
use hsm_shim::{KeyRef, TokenKey};
use rustls::sign::CertifiedKey;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// One served pair.
pub struct Served {
    /// Identity name.
    pub name: String,
    /// Generation number.
    pub generation: u32,
    /// The token key (for the API's signatures).
    pub key: TokenKey,
    /// Key + chain for rustls (None for a JWK credential, which has no certificate).
    pub certified: Option<Arc<CertifiedKey>>,
    /// The `kid` its JWS carry (`Generation::jws_kid`).
    pub jws_kid: String,
    /// Chain, PEM, leaf first (None for a JWK credential).
    pub chain_pem: Option<String>,
    /// `pkcs11:` URI of the key.
    pub key_uri: String,
    /// The leaf's not-after.
    pub not_after: Unix,
    /// SHA-256 fingerprint of the leaf, hex (None for a JWK credential).
    pub fingerprint: Option<String>,
}

/// One identity's current pair, swapped in one step.
#[derive(Default)]
pub struct ServingIdentity {
    current: RwLock<Option<Arc<Served>>>,
    /// The generation last refused (said once, not at every pass).
    refused: RwLock<Option<u32>>,
}

impl ServingIdentity {
    /// The pair in effect now.
    pub fn get(&self) -> Option<Arc<Served>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The generation whose pair was last refused (its key does not match its chain).
    pub fn refused(&self) -> Option<u32> {
        *self.refused.read().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, s: Option<Arc<Served>>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = s;
    }
}

/// Every served identity, by name.
pub struct Identities {
    map: RwLock<BTreeMap<String, Arc<ServingIdentity>>>,
    /// The daemon's status as the API shows it (refreshed with the identities).
    status: RwLock<Vec<Status>>,
    /// The newest events (diagnostics show them).
    recent: RwLock<std::collections::VecDeque<crate::events::Event>>,
    /// Events remembered so far (the fleet channel publishes those it has not sent).
    events_seen: std::sync::atomic::AtomicU64,
    /// The fleet bundle version in effect.
    fleet_version: std::sync::atomic::AtomicU64,
    /// Bumped when status, a served pair or events change (the fleet channel waits on it).
    changes: tokio::sync::watch::Sender<u64>,
    /// Listeners that could not start, one line each.
    down: RwLock<Vec<String>>,
}

impl Default for Identities {
    fn default() -> Self {
        Identities {
            map: Default::default(),
            status: Default::default(),
            recent: Default::default(),
            events_seen: Default::default(),
            fleet_version: Default::default(),
            changes: tokio::sync::watch::channel(0).0,
            down: Default::default(),
        }
    }
}

/// Events kept for diagnostics.
const RECENT_EVENTS: usize = 200;

/// Build the pair of a current generation; refused when the key does not match the chain.
fn load(engine: &Engine, name: &str, g: &Generation) -> crate::error::Result<Served> {
    let key = TokenKey::open(
        engine.token().clone(),
        &KeyRef::Id(g.need_key()?.id.clone()),
    )?;
    let (certified, chain_pem, fingerprint) = match g.cert() {
        Some(cert) => (
            Some(hsm_shim::tls::certified_key(
                hsm_shim::TlsSigningKey::new(key.clone()).with_runner(run_token_call),
                crate::validate::parse_chain(&cert.chain_pem)?,
            )?),
            Some(cert.chain_pem.clone()),
            Some(cert.fingerprint.clone()),
        ),
        None => (None, None, None),
    };
    let (jws_kid, not_after) = match (g.jws_kid(), g.not_after()) {
        (Some(kid), Some(na)) => (kid.to_owned(), na),
        _ => {
            return Err(crate::register::Missing {
                generation: g.number,
                field: "certificate or credential validity",
                status: "current".into(),
            }
            .into())
        }
    };
    Ok(Served {
        jws_kid,
        name: name.to_owned(),
        generation: g.number,
        key_uri: g.need_key()?.uri.clone(),
        key,
        certified,
        chain_pem,
        not_after,
        fingerprint,
    })
}

impl Identities {
    /// One identity's slot (None: not configured).
    pub fn get(&self, name: &str) -> Option<Arc<ServingIdentity>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// The slot of `name`, made (empty) if missing: proxies resolve through it even before
    /// the first enrolment completes.
    pub fn slot(&self, name: &str) -> Arc<ServingIdentity> {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Names and current pairs.
    pub fn all(&self) -> Vec<(String, Option<Arc<Served>>)> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, s)| (n.clone(), s.get()))
            .collect()
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// A receiver woken at each change of status, pairs or events.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The fleet bundle version in effect (set by the daemon).
    pub fn set_fleet_version(&self, v: u64) {
        let old = self
            .fleet_version
            .swap(v, std::sync::atomic::Ordering::Relaxed);
        if old != v {
            self.bump();
        }
    }

    /// The fleet bundle version in effect.
    pub fn fleet_version(&self) -> u64 {
        self.fleet_version
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Events remembered so far, and the newest of them after number `since`.
    pub fn events_since(&self, since: u64) -> (u64, Vec<crate::events::Event>) {
        let total = self.events_seen.load(std::sync::atomic::Ordering::Relaxed);
        let r = self.recent.read().unwrap_or_else(|p| p.into_inner());
        let new = (total.saturating_sub(since) as usize).min(r.len());
        (total, r.iter().skip(r.len() - new).cloned().collect())
    }

    /// Keep the newest events.
    pub fn remember(&self, events: Vec<crate::events::Event>) {
        if events.is_empty() {
            return;
        }
        self.events_seen
            .fetch_add(events.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.bump();
        let mut r = self.recent.write().unwrap_or_else(|p| p.into_inner());
        r.extend(events);
        while r.len() > RECENT_EVENTS {
            r.pop_front();
        }
    }

    /// The newest `n` events, oldest first.
    pub fn recent_events(&self, n: usize) -> Vec<crate::events::Event> {
        let r = self.recent.read().unwrap_or_else(|p| p.into_inner());
        r.iter().skip(r.len().saturating_sub(n)).cloned().collect()
    }

    /// The status JSON last published by the engine, its `days_left` as of now.
    /// Record what is down (listeners that could not start), for `status` and systemd.
    pub fn set_down(&self, down: Vec<String>) {
        *self.down.write().unwrap_or_else(|p| p.into_inner()) = down;
    }

    /// What is down now.
    pub fn down(&self) -> Vec<String> {
        self.down.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The status rows as the API shows them.
    pub fn status(&self) -> Vec<Status> {
        let mut rows = self
            .status
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let now = crate::clock::Clock::now(&crate::clock::SystemClock);
        for r in &mut rows {
            r.refresh_days_left(now);
        }
        rows
    }

    /// One identity's status row.
    pub fn status_of(&self, name: &str) -> Option<Status> {
        self.status().into_iter().find(|r| r.name == name)
    }

    /// Bring every slot to the engine's current generation (engine thread only: it opens
    /// token keys). Returns the status rows it published.
    pub fn refresh(&self, engine: &Engine) -> Vec<Status> {
        let now = engine.now();
        let rows = crate::lifecycle::plan::status(engine.config(), engine.register(), now);
        let changed = {
            let mut cur = self.status.write().unwrap_or_else(|p| p.into_inner());
            let changed = *cur != rows;
            *cur = rows.clone();
            changed
        };
        if changed {
            self.bump();
        }
        for cfg in &engine.config().identities {
            let slot = self.slot(&cfg.name);
            let Some(g) = engine
                .register()
                .identities
                .get(&cfg.name)
                .and_then(|r| r.current_gen())
            else {
                continue;
            };
            let have = slot.get();
            if have.as_ref().is_some_and(|s| {
                s.generation == g.number && s.fingerprint.as_deref() == g.fingerprint()
            }) {
                continue;
            }
            match load(engine, &cfg.name, g) {
                Ok(s) => {
                    tracing::info!(identity = %cfg.name, generation = g.number, "serving identity switched: new handshakes use generation {}", g.number);
                    slot.set(Some(Arc::new(s)));
                }
                // The old pair keeps serving; a pair that does not match is never served.
                Err(e) => {
                    let mut r = slot.refused.write().unwrap_or_else(|p| p.into_inner());
                    if *r != Some(g.number) {
                        tracing::error!(identity = %cfg.name, generation = g.number, "pair refused, the previous one stays: {e:#}");
                        *r = Some(g.number);
                    }
                }
            }
        }
        let names: Vec<&str> = engine
            .config()
            .identities
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|n, _| names.contains(&n.as_str()));
        rows
    }
}

/// rustls resolvers over one slot.
#[derive(Debug)]
pub struct Resolver(pub Arc<ServingIdentity>);

impl std::fmt::Debug for ServingIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cur = self.get();
        f.debug_struct("ServingIdentity")
            .field("generation", &cur.as_ref().map(|s| s.generation))
            .finish()
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.get().and_then(|s| s.certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.get().and_then(|s| s.certified.clone())
    }
}

/// Run a synchronous token call made inside an async task (a handshake signature of a
/// proxy or of the fleet channel) under `block_in_place`, which hands this worker's queue and
/// I/O driver to another thread while the token works, so that a TPM's milliseconds do not
/// hold up the other connections on it. Outside a multi-thread runtime (the CLI, the
/// engine's own calls) it just runs.
pub fn run_token_call(call: &mut dyn FnMut()) {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(call)
    } else {
        call()
    }
}
