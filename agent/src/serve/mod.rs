//! What the daemon serves beside its engine, on one tokio runtime: the local signing API,
//! the mTLS egress proxies and metrics. The engine keeps its own thread (token calls and
//! blocking waits stay off the async workers) and talks to the servers through
//! `Identities` (the swapped pairs and status) and the `Wake` channel (requests to it).

pub mod api;
pub mod identity;
pub mod metrics;
pub mod proxy;
pub mod requests;

use anyhow::{Context, Result};
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

/// Where the engine answers a request.
pub type Reply = std::sync::mpsc::SyncSender<Result<serde_json::Value, String>>;

/// The runtime and the listeners started from one configuration.
pub struct Servers {
    rt: tokio::runtime::Runtime,
    listeners: Vec<JoinHandle<()>>,
    identities: Arc<Identities>,
    wake: std::sync::mpsc::Sender<Wake>,
}

impl Servers {
    /// A runtime with two workers (gateways have 1-4 cores; the work is I/O and token
    /// calls on the blocking pool).
    pub fn new(
        identities: Arc<Identities>,
        wake: std::sync::mpsc::Sender<Wake>,
    ) -> Result<Servers> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("edge-signer-io")
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")?;
        Ok(Servers {
            rt,
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
                http::serve_api(state)
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

/// Token calls the token answers faster than this run inline on a runtime worker; slower
/// ones (RSA on SoftHSM: ~0.6 ms, a TPM: milliseconds) or not measured yet run under
/// `block_in_place` (see `run_token_call`).
const INLINE_MAX: std::time::Duration = std::time::Duration::from_micros(250);

/// Whether a token whose typical signature takes `typical` may be called inline on a
/// runtime worker.
fn fast_token(typical: Option<std::time::Duration>) -> bool {
    typical.is_some_and(|t| t < INLINE_MAX)
}

/// Run a synchronous token call made inside an async task (a handshake signature of a
/// proxy or of the fleet channel, an API request's signature): inline when the token is fast, else under
/// `block_in_place`, which hands this worker's queue and I/O driver to another thread
/// while the token works, so that a TPM's 4 ms signature does not hold up the other
/// connections on it. Outside a multi-thread runtime (the CLI, the engine's own calls) it
/// just runs.
pub fn run_token_call(typical: Option<std::time::Duration>, call: &mut dyn FnMut()) {
    // The fast path (SoftHSM, every handshake) decides on the token alone.
    let hand_off = !fast_token(typical)
        && tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if hand_off {
        tokio::task::block_in_place(call)
    } else {
        call()
    }
}

/// An optional id or name in a log line: the value, or `-`.
pub(crate) fn or_dash(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

mod http;
mod preconnect;
mod splice;
