//! What the daemon serves beside its engine: the mTLS egress proxies and metrics on one
//! tokio runtime (the daemon runs the fleet channel there too), the local signing API on a
//! small runtime of its own (`Servers::new` says why). The engine keeps its own thread (token calls and blocking waits stay off the
//! async workers) and talks to the servers through `Identities` (the swapped pairs and
//! status) and the `EngineCommand` channel (requests to it).

pub mod api;
pub mod metrics;
pub mod proxy;
pub mod requests;

pub use listeners::Servers;

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

/// After a failed `accept` (EMFILE, ENFILE, ENOBUFS...): say so at most once a minute and
/// pause the loop, so that it does not spin while the process is out of descriptors.
pub(crate) async fn accept_failed(what: &str, e: &std::io::Error, said: &OncePerMinute) {
    if said.due() {
        tracing::warn!("{what}: accepting a connection failed: {e}; pausing new connections for 250 ms (out of file descriptors: raise LimitNOFILE or lower the connection caps)");
    }
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
}

/// An optional id or name in a log line: the value, or `-`.
pub(crate) fn or_dash(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

pub mod gate;
mod http;
mod listeners;
mod preconnect;
mod splice;
mod target;
