//! The daemon's listeners (each proxy, the API, the metrics port), each
//! started and failed on its own: a reload whose new proxy cannot start keeps every other
//! listener serving, keeps the proxy's old listener when it had one, and says what is down.

use super::api::{ApiState, Policy};
use super::http;
use super::proxy::{self, Access};
use crate::control::EngineCommand;
use crate::error::{Context, Result};
use crate::identities::Identities;
use firmware_config::schema::ProxyConfig;
use firmware_config::Config;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running proxy: its configuration, accept loop and the access its connections watch.
struct RunningProxy {
    cfg: ProxyConfig,
    task: Option<JoinHandle<()>>,
    access: watch::Sender<Access>,
}

/// The runtimes and the listeners started from the configuration in force.
pub struct Servers {
    rt: tokio::runtime::Runtime,
    /// The signing API's own runtime: its requests make their token calls in place.
    api_rt: tokio::runtime::Runtime,
    identities: Arc<Identities>,
    wake: std::sync::mpsc::Sender<EngineCommand>,
    /// The API's state, kept across reloads (its policy is swapped), its socket and loop.
    api: Option<(Arc<ApiState>, std::path::PathBuf, JoinHandle<()>)>,
    proxies: BTreeMap<String, RunningProxy>,
    metrics: Option<(String, JoinHandle<()>)>,
}

impl Servers {
    /// The proxies and the metrics port on one runtime of two workers, where a handshake's
    /// token call runs under `block_in_place` (`run_token_call`), which moves the worker's
    /// other connections to another thread, so a slow token holds up no connection. The
    /// signing API on a runtime of its own (two workers), whose requests make their token
    /// call in place: no hand-off per request, and a slow token holds up only other API
    /// requests, which wait for the token anyway (docs/perf.md). Idle workers sleep in the
    /// I/O driver with no timer.
    pub fn new(
        identities: Arc<Identities>,
        wake: std::sync::mpsc::Sender<EngineCommand>,
    ) -> Result<Servers> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            // Threads that carry on a worker's queue while it is in a handshake's token
            // call; the unit's TasksMax bounds the process's threads, so this pool is bounded
            // well under it. A token signs one call at a time or close to it, so more
            // threads would only wait on it.
            .max_blocking_threads(8)
            .thread_name("edge-signer-io")
            .enable_all()
            .build()
            .context("cannot start the tokio runtime edge-signer-io")?;
        let api_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(2)
            .thread_name("edge-signer-api")
            .enable_all()
            .build()
            .context("cannot start the tokio runtime edge-signer-api")?;
        Ok(Servers {
            rt,
            api_rt,
            identities,
            wake,
            api: None,
            proxies: BTreeMap::new(),
            metrics: None,
        })
    }

    /// The runtime the listeners run on (the daemon runs the fleet channel there too).
    pub fn runtime(&self) -> tokio::runtime::Handle {
        self.rt.handle().clone()
    }

    /// Make the listeners follow `cfg`: unchanged ones keep running, changed ones restart,
    /// removed ones stop. Returns what is down, one line each (empty: all serving).
    pub fn start(&mut self, cfg: &Config) -> Vec<String> {
        let _guard = self.rt.enter();
        let mut down = Vec::new();
        self.start_proxies(cfg, &mut down);
        if let Err(e) = self.start_api(cfg) {
            down.push(format!("the signing API is down: {e:#}"));
        }
        if let Err(e) = self.start_metrics(cfg) {
            down.push(format!("the metrics listener is down: {e:#}"));
        }
        for d in &down {
            tracing::error!("{d}");
        }
        down
    }

    fn start_proxies(&mut self, cfg: &Config, down: &mut Vec<String>) {
        let wanted: BTreeMap<&str, &ProxyConfig> =
            cfg.proxies.iter().map(|p| (p.name.as_str(), p)).collect();
        self.proxies.retain(|name, running| {
            let keep = wanted.contains_key(name.as_str());
            if !keep {
                if let Some(t) = running.task.take() {
                    t.abort();
                }
                // Its open connections end too.
                running.access.send_replace(Access::default());
                tracing::info!(proxy = %name, "proxy removed by the reload");
            }
            keep
        });
        for (name, p) in wanted {
            let running = self
                .proxies
                .entry(name.to_owned())
                .or_insert_with(|| RunningProxy {
                    cfg: p.clone(),
                    task: None,
                    access: watch::Sender::new(Access::of(p)),
                });
            // Open connections of a caller no longer allowed end now.
            running.access.send_replace(Access::of(p));
            if running.task.is_some() && running.cfg == *p {
                continue;
            }
            let slot = self.identities.slot(&p.identity);
            let route = match proxy::prepare(p.clone(), slot, running.access.subscribe()) {
                Ok(r) => r,
                Err(e) => {
                    down.push(format!(
                        "proxy '{name}': {e:#}; {}",
                        if running.task.is_some() {
                            "its previous configuration keeps serving"
                        } else {
                            "it is not serving"
                        }
                    ));
                    if running.task.is_some() {
                        running.access.send_replace(Access::of(&running.cfg));
                    }
                    continue;
                }
            };
            if let Some(t) = running.task.take() {
                t.abort();
            }
            match proxy::listen(route) {
                Ok(t) => {
                    running.task = Some(t);
                    running.cfg = p.clone();
                }
                Err(e) => {
                    let old = running.cfg.clone();
                    let back = (old != *p)
                        .then(|| {
                            let slot = self.identities.slot(&old.identity);
                            running.access.send_replace(Access::of(&old));
                            proxy::prepare(old, slot, running.access.subscribe())
                                .and_then(proxy::listen)
                                .ok()
                        })
                        .flatten();
                    let keeps = back.is_some();
                    running.task = back;
                    down.push(format!(
                        "proxy '{name}': {e:#}; {}",
                        if keeps {
                            "its previous configuration keeps serving"
                        } else {
                            "it is not serving"
                        }
                    ));
                }
            }
        }
    }

    fn start_api(&mut self, cfg: &Config) -> Result<()> {
        if let Some((state, socket, task)) = &self.api {
            // Open connections follow the new policy at their next request.
            state.set_policy(Policy::of(cfg));
            if cfg.api.enabled && *socket == cfg.api.socket && !task.is_finished() {
                return Ok(());
            }
            task.abort();
        }
        let state = match self.api.take() {
            Some((state, _, _)) => state,
            None => Arc::new(ApiState::new(
                Policy::of(cfg),
                self.identities.clone(),
                self.wake.clone(),
            )),
        };
        if !cfg.api.enabled {
            return Ok(());
        }
        let _api_runtime = self.api_rt.enter();
        let task = http::serve_api(state.clone())
            .with_context(|| format!("API socket {}", cfg.api.socket.display()))?;
        self.api = Some((state, cfg.api.socket.clone(), task));
        Ok(())
    }

    fn start_metrics(&mut self, cfg: &Config) -> Result<()> {
        let wanted = cfg.api.metrics_listen.clone();
        if self.metrics.as_ref().map(|m| &m.0) == wanted.as_ref() {
            return Ok(());
        }
        if let Some((_, t)) = self.metrics.take() {
            t.abort();
        }
        if let Some(addr) = wanted {
            let t = http::serve_metrics(&addr).with_context(|| format!("metrics on {addr}"))?;
            self.metrics = Some((addr, t));
        }
        Ok(())
    }
}

/// The accept loops end with the servers, and their sockets go.
impl Drop for Servers {
    fn drop(&mut self) {
        if let Some((_, socket, t)) = self.api.take() {
            t.abort();
            remove_socket(&socket);
        }
        for p in self.proxies.values_mut() {
            if let Some(t) = p.task.take() {
                t.abort();
                if let Ok(firmware_config::schema::Listen::Unix(path)) = p.cfg.listen_addr() {
                    remove_socket(&path);
                }
            }
        }
    }
}

/// At the end (SIGTERM): our sockets go, so nothing connects to a daemon that is gone; only
/// a socket is removed, never what else may stand at its name.
fn remove_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}
