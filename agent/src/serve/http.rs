//! Accept loops for the API socket and the metrics port: hyper's HTTP/1 connection
//! builder (keep-alive, header read timeout) over axum routes; the caller of each Unix
//! connection is read once with `SO_PEERCRED` and attached to its requests.

use super::api::{router, ApiState, Caller};
use super::api_threads::ApiThreads;
use anyhow::{Context, Result};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;
use tower_layer::Layer;

/// Bind a Unix socket at `path` (a stale socket file is replaced), mode 0666: who may do
/// what is the policy's decision, made per request from the peer's credentials.
pub(super) fn bind_unix(path: &std::path::Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot replace {}", path.display())),
    }
    let l =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}

fn builder(header_timeout: Duration) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    b
}

/// Serve the API on its socket: the accept loop runs on the first API thread, and each
/// connection on the thread holding the fewest (`ApiThreads::dispatch`).
pub(super) fn serve_api(state: Arc<ApiState>, threads: Arc<ApiThreads>) -> Result<JoinHandle<()>> {
    let rt = threads.handle().clone();
    let _rt = rt.enter();
    let listener = bind_unix(&state.cfg.socket)?;
    let timeout = Duration::from_secs(state.cfg.header_timeout.0.max(1));
    let app = router(state.clone());
    tracing::info!(socket = %state.cfg.socket.display(), "signing API listening");
    Ok(rt.spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("API accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let caller = match stream.peer_cred() {
                Ok(c) => Caller {
                    uid: c.uid(),
                    gid: c.gid(),
                    pid: c.pid(),
                },
                Err(e) => {
                    tracing::warn!("API connection without peer credentials, closed: {e}");
                    continue;
                }
            };
            let stream = match stream.into_std() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("API connection dropped: {e}");
                    continue;
                }
            };
            // The caller goes into each request of the connection by a wrapper around the
            // shared router; `Router::layer` would rebuild every route per connection.
            let svc = TowerToHyperService::new(axum::Extension(caller).layer(app.clone()));
            threads.dispatch(stream, move |stream| async move {
                let conn = builder(timeout).serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(uid = caller.uid, "API connection ended: {e}");
                }
            });
        }
    }))
}

/// Serve `/metrics` only, on a TCP address (loopback in practice).
pub(super) fn serve_metrics(addr: &str) -> Result<JoinHandle<()>> {
    let std_listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    std_listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(std_listener)?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [("content-type", "text/plain; version=0.0.4")],
                super::metrics::get().render(),
            )
        }),
    );
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let svc = TowerToHyperService::new(app.clone());
            let conn = builder(Duration::from_secs(5)).serve_connection(TokioIo::new(stream), svc);
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    }))
}
