//! What the daemon serves beside its engine, on one tokio runtime: the local signing API,
//! the mTLS egress proxies and metrics. The engine keeps its own thread (token calls and
//! blocking waits stay off the async workers) and talks to the servers through
//! `Identities` (the swapped pairs and status) and the `Wake` channel (requests to it).

pub mod api;
pub mod identity;
pub mod metrics;
pub mod proxy;

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
    /// A rotation asked for through the API.
    Rotate(String),
}

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
        if let Some(addr) = &cfg.api.metrics_listen {
            self.listeners
                .push(http::serve_metrics(addr).with_context(|| format!("metrics on {addr}"))?);
        }
        Ok(())
    }
}

mod http;
