//! Telling systemd what the daemon is doing (`sd-notify`): READY after the first reconcile,
//! RELOADING (with MONOTONIC_USEC) and READY again around each SIGHUP, STATUS lines a person
//! reads in `systemctl status`, STOPPING, and WATCHDOG pings while the engine and the token
//! answer. Without `NOTIFY_SOCKET` every call is a no-op; without `WATCHDOG_USEC` the daemon
//! never wakes up just to ping.

use sd_notify::NotifyState;
use std::time::{Duration, Instant};

/// The daemon's link to systemd.
pub struct Systemd {
    watchdog: Option<Duration>,
    last_ping: Instant,
    last_status: String,
}

impl Default for Systemd {
    fn default() -> Self {
        Self::new()
    }
}

impl Systemd {
    /// Read `WATCHDOG_USEC` (kept in the environment for children that do not exist).
    pub fn new() -> Systemd {
        let mut usec = 0;
        let watchdog =
            sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec));
        Systemd {
            watchdog,
            last_ping: Instant::now(),
            last_status: String::new(),
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!("cannot notify systemd: {e}");
        }
    }

    /// Ready (after the first reconcile, and after each reload).
    pub fn ready(&mut self, status: &str) {
        self.last_status = status.to_owned();
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A reload begins.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// Stopping.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// A new status line, sent only when it changed.
    pub fn status(&mut self, status: &str) {
        if status != self.last_status {
            self.last_status = status.to_owned();
            self.send(&[NotifyState::Status(status)]);
        }
    }

    /// How long the engine may sleep before the next ping is due (None: no watchdog).
    pub fn ping_due_in(&self) -> Option<Duration> {
        let half = self.watchdog? / 2;
        Some(half.saturating_sub(self.last_ping.elapsed()))
    }

    /// Ping the watchdog when due and `healthy` (the engine got here; the token answers).
    pub fn maybe_ping(&mut self, healthy: impl FnOnce() -> bool) {
        if self.ping_due_in() != Some(Duration::ZERO) {
            return;
        }
        if healthy() {
            self.last_ping = Instant::now();
            self.send(&[NotifyState::Watchdog]);
        } else {
            tracing::error!("the token does not answer: watchdog not pinged (systemd restarts the daemon if this lasts)");
        }
    }
}

/// "3 identities, next: renew gw in 41 d" from the status rows.
pub fn status_line(rows: &[crate::lifecycle::plan::Status], now: crate::clock::Unix) -> String {
    let next = rows
        .iter()
        .filter_map(|r| {
            let at = crate::clock::parse_date(r.next_at.as_deref()?).ok()?;
            Some((at, r))
        })
        .min_by_key(|(at, _)| *at);
    let errors = rows.iter().filter(|r| r.last_error.is_some()).count();
    let mut s = format!("{} identities", rows.len());
    if let Some((at, r)) = next {
        let secs = at.saturating_sub(now);
        let when = if secs >= 86_400 {
            format!("{} d", secs / 86_400)
        } else if secs >= 3600 {
            format!("{} h", secs / 3600)
        } else {
            format!("{} min", secs.div_ceil(60))
        };
        s += &format!(", next: {} for {} in {when}", r.next_action, r.name);
    }
    if errors > 0 {
        s += &format!(", {errors} with errors (edge-signer status)");
    }
    s
}
