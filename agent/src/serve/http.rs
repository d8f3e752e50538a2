//! Accept loops for the API socket and the metrics port: hyper's HTTP/1 connection
//! builder (keep-alive, header read timeout) over axum routes; the caller of each Unix
//! connection is read once with `SO_PEERCRED` and attached to its requests.

use super::api::{router, ApiState, Caller};
use super::gate::Full;
use crate::error::{Context, Result};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;
use tower_layer::Layer;

/// Bind a Unix socket at `path`, mode 0666: who may do what is the policy's decision, made
/// per request from the peer's credentials. Only our own kind of file is ever replaced or
/// chmodded: a stale socket is removed, anything else (a symlink, a file) is refused, and so
/// is a parent directory that others may write without the sticky bit (they could swap
/// the socket for a link between the bind and the chmod).
pub(super) fn bind_unix(path: &std::path::Path) -> Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        crate::bail!(
            "{} is writable by every user and not sticky (mode {:o}): another user could replace the socket; put it in a directory only the agent writes (e.g. /run/edge-signer)",
            dir.display(),
            mode & 0o7777
        );
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("cannot replace the stale socket {}", path.display()))?,
        Ok(_) => crate::bail!(
            "{} exists and is not a socket (a file, directory or symlink): refusing to replace it; remove it if it is not needed",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let l =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    // chmod follows links: insist the name is still our socket.
    if !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        crate::bail!("{} was replaced right after the bind", path.display());
    }
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

/// Serve the API on its socket, a task per connection on the daemon's runtime. A connection over
/// `api.max_connections` in all, or over `api.max_connections_per_caller` of its uid, is
/// answered 503 and closed at once, so one local uid cannot hold the others out.
pub(super) fn serve_api(state: Arc<ApiState>) -> Result<JoinHandle<()>> {
    let socket = state.policy().api.socket.clone();
    let listener = bind_unix(&socket)?;
    let app = router(state.clone());
    tracing::info!(socket = %socket.display(), "signing API listening");
    let said = super::OncePerMinute::default();
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    super::accept_failed("API", &e, &said).await;
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
            let policy = state.policy();
            let admitted = match state.connections.admit(
                caller.uid,
                policy.api.max_connections,
                policy.api.max_connections_per_caller,
            ) {
                Ok(a) => a,
                Err(full) => {
                    turn_away(&state, &caller, full, &stream);
                    continue;
                }
            };
            let timeout = Duration::from_secs(policy.api.header_timeout.0.max(1));
            // The caller goes into each request of the connection by a wrapper around the
            // shared router; `Router::layer` would rebuild every route per connection.
            let svc = TowerToHyperService::new(axum::Extension(caller).layer(app.clone()));
            tokio::spawn(async move {
                let _admitted = admitted;
                let conn = builder(timeout).serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(uid = caller.uid, "API connection ended: {e}");
                }
            });
        }
    }))
}

/// Answer a connection over a cap with a 503 if its socket takes it now, and close it.
fn turn_away(state: &ApiState, c: &Caller, full: Full, stream: &tokio::net::UnixStream) {
    let why = match full {
        Full::All(n) => format!("the API has {n} connections open (api.max_connections); retry later"),
        Full::Caller(n) => format!(
            "uid {} has {n} API connections open (api.max_connections_per_caller); close one or reuse it",
            c.uid
        ),
    };
    crate::serve::metrics::get().api_request(c.uid, "connect", "refused");
    if let Some(unlogged) = state.refusals.note(c.uid) {
        tracing::warn!(uid = c.uid, gid = c.gid, unlogged, "API connection refused: {why} (further refusals of this uid are counted, and logged once a minute)");
    }
    let body = serde_json::json!({ "error": why }).to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(answer.as_bytes());
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
    let said = super::OncePerMinute::default();
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    super::accept_failed("metrics", &e, &said).await;
                    continue;
                }
            };
            let svc = TowerToHyperService::new(app.clone());
            let conn = builder(Duration::from_secs(5)).serve_connection(TokioIo::new(stream), svc);
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::bind_unix;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &std::path::Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[tokio::test]
    async fn only_our_own_socket_is_replaced_or_chmodded() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "secret").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let sock = d.path().join("api.sock");
        std::os::unix::fs::symlink(&victim, &sock).unwrap();
        let e = bind_unix(&sock).unwrap_err().to_string();
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(mode(&victim), 0o600, "the link's target is untouched");
        std::fs::remove_file(&sock).unwrap();
        // A stale socket of ours is replaced.
        drop(bind_unix(&sock).unwrap());
        drop(bind_unix(&sock).unwrap());
        assert_eq!(mode(&sock), 0o666);
    }

    #[tokio::test]
    async fn a_directory_others_may_write_is_refused_unless_sticky() {
        let d = tempfile::tempdir().unwrap();
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind_unix(&open.join("api.sock")).unwrap_err().to_string();
        assert!(e.contains("writable by every user and not sticky"), "{e}");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(bind_unix(&open.join("api.sock")).is_ok());
    }
}
