//! What the daemon serves beside its engine, on one tokio runtime: the local signing API,
//! the mTLS egress proxies, the fleet channel and metrics. The engine
//! keeps its own thread (token calls and blocking waits stay off the async workers) and
//! talks to the servers through `Identities` (the swapped pairs and status) and the `Wake`
//! channel (requests to it).

pub mod api;
pub mod identity;
pub mod metrics;
pub mod proxy;
pub mod requests;

pub use ask::{ask, Answer, Reply, Unanswered};

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
    /// Apply a signed bundle that came through a channel (then reload).
    Apply(Vec<u8>, firmware_config::Channel),
}

impl std::fmt::Debug for EngineRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineRequest::Rotate(n) => write!(f, "rotate {n}"),
            EngineRequest::Retire(n, g) => write!(f, "retire {n} generation {g}"),
            EngineRequest::Revoke(n, g) => write!(f, "revoke {n} generation {g}"),
            EngineRequest::Apply(b, c) => {
                write!(f, "apply a bundle of {} bytes from the {c}", b.len())
            }
        }
    }
}

pub use listeners::Servers;

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

mod ask;
pub mod gate;
mod http;
mod listeners;
mod preconnect;
mod splice;
mod target;
