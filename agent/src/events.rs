//! Events a person or a monitoring system must hear of: reminders, lapse, rotations,
//! failures. Each goes to the log and, when `notify.exec` is set, to that command as JSON
//! on stdin.
//!
//! The hook runs off the engine's path: events go through a bounded queue to one worker
//! thread, which runs the command with a clean environment (nothing of ours, no PIN: only
//! `PATH=/usr/sbin:/usr/bin:/sbin:/bin`) and kills it after [`HOOK_TIMEOUT`]. A full queue
//! drops the event for the hook (it is still logged) rather than stall a renewal.

use crate::clock::{rfc3339, Unix};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::{Duration, Instant};

/// The longest a notify hook may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(10);
const QUEUE: usize = 64;

/// How loud.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Progress.
    Info,
    /// Needs attention soon.
    Warning,
    /// Service is or will be down: act now.
    Critical,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Kind: `reminder`, `lapsed`, `rotation-started`, `promoted`, `retired`, `failure`, ...
    pub kind: String,
    /// Identity name.
    pub identity: String,
    /// How loud.
    pub severity: Severity,
    /// When (RFC 3339).
    pub at: String,
    /// What happened and, for a person, what to do.
    pub message: String,
}

/// Where events go.
#[derive(Debug, Default)]
pub struct Events {
    hook: Option<Hook>,
    /// Events emitted so far (tests read them; the daemon trims it).
    pub log: Vec<Event>,
}

#[derive(Debug)]
struct Hook {
    cmd: PathBuf,
    queue: Option<SyncSender<Event>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Hook {
    /// Let queued events reach the hook before the process ends (bounded by the timeout).
    fn drop(&mut self) {
        self.queue.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Events {
    /// Events to the log, and to `exec` if given.
    pub fn new(exec: Option<PathBuf>) -> Events {
        let hook = exec.map(|cmd| {
            let (tx, rx) = sync_channel::<Event>(QUEUE);
            let c = cmd.clone();
            let worker = std::thread::Builder::new()
                .name("notify-hook".into())
                .spawn(move || {
                    for e in rx {
                        if let Err(err) = run_hook(&c, &e) {
                            tracing::warn!(hook = %c.display(), "notify hook failed: {err}");
                        }
                    }
                })
                .ok();
            Hook {
                cmd,
                queue: worker.as_ref().map(|_| tx),
                worker,
            }
        });
        Events {
            hook,
            log: Vec::new(),
        }
    }

    /// Emit one event.
    pub fn emit(
        &mut self,
        now: Unix,
        kind: &str,
        identity: &str,
        severity: Severity,
        message: String,
    ) {
        let e = Event {
            kind: kind.to_owned(),
            identity: identity.to_owned(),
            severity,
            at: rfc3339(now),
            message,
        };
        match severity {
            Severity::Info => tracing::info!(identity, kind, "{}", e.message),
            Severity::Warning => tracing::warn!(identity, kind, "{}", e.message),
            Severity::Critical => tracing::error!(identity, kind, "CRITICAL: {}", e.message),
        }
        if let Some(h) = &self.hook {
            match h.queue.as_ref().map(|q| q.try_send(e.clone())) {
                Some(Ok(())) => {}
                Some(Err(TrySendError::Full(_))) => {
                    tracing::warn!(hook = %h.cmd.display(), "notify hook queue full: event not passed on")
                }
                _ => tracing::warn!(hook = %h.cmd.display(), "notify hook is not running"),
            }
        }
        self.log.push(e);
        if self.log.len() > 1000 {
            self.log.drain(..500);
        }
    }
}

fn run_hook(cmd: &PathBuf, e: &Event) -> std::io::Result<()> {
    let mut child = Command::new(cmd)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(serde_json::to_string(e).unwrap_or_default().as_bytes())?;
    }
    wait_bounded(&mut child, HOOK_TIMEOUT)
}

/// Wait for a hook `child` to end within `limit` (killed after it); an exit other than 0
/// is an error.
pub fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> std::io::Result<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                return Err(std::io::Error::other(format!("exited with {status}")));
            }
            return Ok(());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "still running after {}s: killed",
                limit.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
