//! Events a person or a monitoring system must hear of: reminders, lapse, rotations,
//! failures. Each goes to the log and, when `notify.exec` is set, to that command as JSON
//! on stdin.

use crate::clock::{rfc3339, Unix};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

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
#[derive(Debug, Clone, Default)]
pub struct Events {
    exec: Option<PathBuf>,
    /// Events emitted so far (tests read them; the daemon trims it).
    pub log: Vec<Event>,
}

impl Events {
    /// Events to the log, and to `exec` if given.
    pub fn new(exec: Option<PathBuf>) -> Events {
        Events {
            exec,
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
        if let Some(cmd) = &self.exec {
            if let Err(err) = run_hook(cmd, &e) {
                tracing::warn!(hook = %cmd.display(), "notify hook failed: {err}");
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
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(serde_json::to_string(e).unwrap_or_default().as_bytes())?;
    }
    let status = child.wait()?;
    if !status.success() {
        return Err(std::io::Error::other(format!("exited with {status}")));
    }
    Ok(())
}
