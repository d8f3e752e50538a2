//! Reminders at the configured marks and the lapse alarm.

use super::Engine;
use crate::clock::{rfc3339, Unix};
use crate::error::Result;
use crate::events::Severity;
use crate::register::Step;
use firmware_config::schema::IdentityConfig;

impl Engine {
    /// Reminders at the configured marks and the lapse alarm for the serving generation,
    /// whatever step a rotation is at (a stuck rotation is exactly when they matter).
    /// Each fires once per generation (the lapse is recorded as mark 0). Returns the next
    /// alert deadline.
    pub(super) fn alerts(
        &mut self,
        name: &str,
        cfg: &IdentityConfig,
        now: Unix,
    ) -> Result<Option<Unix>> {
        let Some(g) = self.rec(name).current_gen().cloned() else {
            return Ok(None);
        };
        let Some(na) = g.not_after() else {
            return Ok(None);
        };
        let mut marks: Vec<u64> = cfg
            .renewal
            .reminders
            .iter()
            .map(|d| d.secs())
            .filter(|m| *m > 0)
            .collect();
        marks.sort_unstable_by(|a, b| b.cmp(a));
        marks.push(0);
        let mut next = None;
        for m in marks {
            let at = na.saturating_sub(m);
            if g.reminders_fired.contains(&m) {
                continue;
            }
            if now < at {
                next = Some(next.map_or(at, |n: Unix| n.min(at)));
                continue;
            }
            if m == 0 {
                self.events.emit(
                    now,
                    "lapsed",
                    name,
                    Severity::Critical,
                    format!(
                        "certificate of generation {} expired at {}: every TLS handshake with it fails; enrolling a new key (portal: upload the CSR from the outbox)",
                        g.number,
                        rfc3339(na)
                    ),
                );
            } else if now < na {
                self.events.emit(
                    now,
                    "reminder",
                    name,
                    if m <= 5 * 86_400 {
                        Severity::Critical
                    } else {
                        Severity::Warning
                    },
                    format!(
                        "certificate of generation {} expires at {} ({} day mark)",
                        g.number,
                        rfc3339(na),
                        m / 86_400
                    ),
                );
            }
            let rec = self.rec(name);
            if let Some(gm) = rec.gen_mut(g.number) {
                gm.reminders_fired.push(m);
            }
            if m == 0 && rec.step == Step::Active {
                rec.transition(now, Step::Lapsed, g.number, "certificate expired");
            }
            self.save(name)?;
        }
        Ok(next)
    }
}
