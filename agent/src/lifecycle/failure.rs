//! Failures: record one with its backoff (transient) or its long wait (permanent), and give
//! up a pending generation whose certificate or rotation was refused.

use super::{Engine, Progress};
use crate::clock::rfc3339;
use crate::error::Persistence;
use crate::error::Result;
use crate::events::Severity;
use crate::register::{Failure, GenStatus, Step};

impl Engine {
    pub(super) fn fail(&mut self, name: &str, reason: String) -> Result<Progress> {
        self.fail_as(name, reason, Persistence::Transient)
    }

    /// Record a failure and when to try again: a transient one backs off from `retry_min`
    /// (doubling up to `retry_max`), a permanent one waits `retry_max` at once.
    pub(super) fn fail_as(
        &mut self,
        name: &str,
        reason: String,
        persistence: Persistence,
    ) -> Result<Progress> {
        let cfg = self.identity_cfg(name)?;
        let now = self.now();
        let rec = self.rec(name);
        let attempts = rec.failure.as_ref().map(|f| f.attempts).unwrap_or(0) + 1;
        let base = cfg.renewal.retry_min.secs().max(1);
        let most = cfg.renewal.retry_max.secs().max(base);
        let delay = match persistence {
            Persistence::Transient => base
                .saturating_mul(1u64 << (attempts - 1).min(30))
                .min(most),
            Persistence::Permanent => most,
        };
        let reason = match persistence {
            Persistence::Transient => reason,
            Persistence::Permanent => format!("{reason} (this does not clear by itself: it needs a person or a new configuration)"),
        };
        rec.failure = Some(Failure {
            reason: reason.clone(),
            retry_at: now + delay,
            attempts,
        });
        // Nothing serves while there is no valid current generation: a person must act.
        let serving = rec
            .current_gen()
            .and_then(|g| g.not_after())
            .is_some_and(|na| na > now);
        self.save(name)?;
        self.events.emit(
            now,
            "failure",
            name,
            if serving {
                Severity::Warning
            } else {
                Severity::Critical
            },
            format!(
                "{reason}; attempt {attempts}, retrying at {}{}",
                rfc3339(now + delay),
                if serving {
                    ""
                } else {
                    " (no valid identity is serving)"
                }
            ),
        );
        Ok(Progress::Wait {
            until: now + delay,
            what: format!("retry after: {reason}"),
        })
    }

    /// Give up a pending generation (refused certificate, rejected CSR or rotation): destroy
    /// its key, keep the current identity serving, retry later with a new key.
    pub(super) fn abandon(&mut self, name: &str, n: u32, reason: String) -> Result<Progress> {
        if let Some(id) = self
            .reg
            .identities
            .get(name)
            .and_then(|r| r.gen(n))
            .and_then(|g| g.key().cloned())
        {
            self.destroy_key(&id)?;
        }
        let now = self.now();
        let rec = self.rec(name);
        if let Some(g) = rec.gen_mut(n) {
            g.status = GenStatus::Failed;
        }
        rec.pending = None;
        let back = if rec.current.is_some() {
            Step::Active
        } else {
            Step::Lapsed
        };
        rec.transition(now, back, n, format!("generation {n} abandoned: {reason}"));
        self.fail(name, format!("generation {n} abandoned: {reason}"))
    }
}
