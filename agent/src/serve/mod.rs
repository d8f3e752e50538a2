//! What the daemon serves beside its engine, on two tokio runtimes: one for the local
//! signing API, one for the mTLS egress proxies, the fleet channel and metrics. The engine
//! keeps its own thread (token calls and blocking waits stay off the async workers) and
//! talks to the servers through `Identities` (the swapped pairs and status) and the `Wake`
//! channel (requests to it).

pub mod api;
pub mod identity;
pub mod metrics;
pub mod proxy;
pub mod requests;

use anyhow::{Context, Result};
pub use ask::{ask, Answer, Reply, Unanswered};
use firmware_config::Config;
use identity::Identities;
use std::sync::Arc;
use tokio::task::JoinHandle;

/// What wakes the engine thread.
#[derive(Debug)]
pub enum Wake {
    /// SIGHUP: reload the configuration.
    Reload,
    /// SIGTERM/SIGINT.
    Stop,
    /// A request through the API, answered on `Reply`.
    Command(EngineRequest, Reply),
}

/// What the API asks the engine to do (the engine is the one writer of the register).
pub enum EngineRequest {
    /// Rotate now (queued during an overlap).
    Rotate(String),
    /// Retire a generation.
    Retire(String, u32),
    /// Revoke a generation.
    Revoke(String, u32),
    /// Apply a signed bundle (then reload).
    Apply(Vec<u8>),
}

impl std::fmt::Debug for EngineRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineRequest::Rotate(n) => write!(f, "rotate {n}"),
            EngineRequest::Retire(n, g) => write!(f, "retire {n} generation {g}"),
            EngineRequest::Revoke(n, g) => write!(f, "revoke {n} generation {g}"),
            EngineRequest::Apply(b) => write!(f, "apply a bundle of {} bytes", b.len()),
        }
    }
}

/// The runtimes and the listeners started from one configuration.
pub struct Servers {
    rt: tokio::runtime::Runtime,
    /// The signing API's own threads (`api_threads`): what a local program asks of the API
    /// never holds up a proxy's handshake or the fleet channel, and the other way round,
    /// and a signature up to `API_INLINE_MAX` runs inline on them (see `api::token_call`).
    api: Arc<api_threads::ApiThreads>,
    listeners: Vec<JoinHandle<()>>,
    identities: Arc<Identities>,
    wake: std::sync::mpsc::Sender<Wake>,
}

impl Servers {
    /// The proxies, the fleet channel and the metrics port on a runtime of one worker; the
    /// API on two threads of its own (`api_threads`). Idle workers sleep in the I/O driver
    /// with no timer.
    ///
    /// One worker for the proxies: a proxied connection is a chain of short steps (accept,
    /// connect, handshake messages, splice), each woken by the network. With two workers
    /// the steps of one connection hop between threads, and every hop is a futex or
    /// eventfd wake of the other one (~30 µs across CPUs on the bench VM). scripts/bench,
    /// alternated runs: 1 client vs stunnel 1.90-1.93 with two, 1.95-2.01 with one (every
    /// pair in favour of one), CPU per new connection ~10% lower; 4 clients at once, bulk
    /// and preconnect unchanged. One core splices faster than a gateway's uplink (~1.2 GB/s
    /// here).
    /// The API has two threads: its signatures are CPU work that two clients run in
    /// parallel.
    pub fn new(
        identities: Arc<Identities>,
        wake: std::sync::mpsc::Sender<Wake>,
    ) -> Result<Servers> {
        let runtime = |name: &str, workers: usize| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name(name)
                .enable_all()
                .build()
                .with_context(|| format!("cannot start the tokio runtime {name}"))
        };
        Ok(Servers {
            rt: runtime("edge-signer-io", 1)?,
            api: Arc::new(api_threads::ApiThreads::start(2)?),
            listeners: Vec::new(),
            identities,
            wake,
        })
    }

    /// (Re)start every listener for `cfg`. Connections already open keep running: only
    /// the accept loops are replaced.
    pub fn start(&mut self, cfg: &Config) -> Result<()> {
        for l in self.listeners.drain(..) {
            l.abort();
        }
        let _guard = self.rt.enter();
        for p in &cfg.proxies {
            let slot = self.identities.slot(&p.identity);
            let task =
                proxy::start(p.clone(), slot).with_context(|| format!("proxy '{}'", p.name))?;
            self.listeners.push(task);
        }
        if cfg.api.enabled {
            let state = Arc::new(api::ApiState::new(
                cfg.api.clone(),
                self.identities.clone(),
                self.wake.clone(),
            ));
            self.listeners.push(
                http::serve_api(state, self.api.clone())
                    .with_context(|| format!("API socket {}", cfg.api.socket.display()))?,
            );
        }
        if let Some(m) = &cfg.fleet.mqtt {
            let device = m.device_id.clone().unwrap_or_else(|| {
                cfg.identities
                    .iter()
                    .find(|i| i.name == m.identity)
                    .map(|i| i.subject.cn.clone())
                    .filter(|cn| !cn.is_empty())
                    .unwrap_or_else(|| m.identity.clone())
            });
            let channel = crate::fleet::channel::Channel {
                cfg: m.clone(),
                slot: self.identities.slot(&m.identity),
                identities: self.identities.clone(),
                wake: self.wake.clone(),
                device,
                state_dir: cfg.paths.state_dir.clone(),
            };
            self.listeners.push(tokio::spawn(channel.run()));
        }
        if let Some(addr) = &cfg.api.metrics_listen {
            self.listeners
                .push(http::serve_metrics(addr).with_context(|| format!("metrics on {addr}"))?);
        }
        Ok(())
    }
}

/// The accept loops end with the servers: the API's holds the API threads, which would
/// otherwise outlive them (the proxies' runtime ends its tasks when dropped).
impl Drop for Servers {
    fn drop(&mut self) {
        for l in self.listeners.drain(..) {
            l.abort();
        }
    }
}

/// Token calls the token answers faster than this run inline on the worker of the proxies'
/// runtime; slower ones (RSA on SoftHSM: ~0.6 ms, a TPM: milliseconds) or not measured yet
/// run under `block_in_place` (see `run_token_call`).
const INLINE_MAX: std::time::Duration = std::time::Duration::from_micros(250);

/// The same limit on the API's threads. Each serves nothing but API requests, so a
/// signature inline there delays only the other API requests on its thread, each time by
/// less than this; above it, the hand-off to the blocking pool (tens of µs) is a few
/// percent of the signature.
const API_INLINE_MAX: std::time::Duration = std::time::Duration::from_millis(2);

/// Whether a token call whose typical time is `typical` (None: not measured yet) runs
/// inline under `limit`.
fn runs_inline(limit: std::time::Duration, typical: Option<std::time::Duration>) -> bool {
    typical.is_some_and(|t| t < limit)
}

/// Run a synchronous token call made inside an async task (a handshake signature of a
/// proxy or of the fleet channel): inline when the token is fast, else under
/// `block_in_place`, which hands this worker's queue and I/O driver to another thread
/// while the token works, so that a TPM's 4 ms signature does not hold up the other
/// connections on it. Outside a multi-thread runtime (the CLI, the engine's own calls) it
/// just runs.
pub fn run_token_call(typical: Option<std::time::Duration>, call: &mut dyn FnMut()) {
    // The fast path (SoftHSM, every handshake) decides on the token alone.
    let hand_off = !runs_inline(INLINE_MAX, typical)
        && tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if hand_off {
        tokio::task::block_in_place(call)
    } else {
        call()
    }
}

/// The gate of a WARN line that a flood of one cause would repeat: open at most once a minute.
#[derive(Default)]
pub(crate) struct OncePerMinute(std::sync::Mutex<Option<std::time::Instant>>);

impl OncePerMinute {
    /// Whether to say it now; if so, the next minute is closed.
    pub(crate) fn due(&self) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let due = last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60));
        if due {
            *last = Some(std::time::Instant::now());
        }
        due
    }
}

/// An optional id or name in a log line: the value, or `-`.
pub(crate) fn or_dash(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

mod api_threads;
mod ask;
mod http;
mod preconnect;
mod splice;
mod target;
