//! What an identity does next, decided from its configuration and its record alone. The
//! engine's `step` executes it and `status` shows it: one source of truth for "next action".

use super::renewal_time;
use crate::clock::{rfc3339, Unix};
use crate::issuer::Flow;
use crate::register::{GenStatus, IdentityRecord, Register, Step};
use firmware_config::schema::{Config, IdentityConfig, IssuerConfig};

/// A step the engine takes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Plan a new generation (first enrolment, renewal due, asked for, or lapsed).
    Begin,
    /// Make the key in the token and the CSR (or the credential request).
    MakeKey,
    /// Send the CSR (or the rotation).
    Submit,
    /// Ask the issuer about the submission.
    Poll,
    /// Certificate: validate what came back. Credential: verify the confirmed key.
    Check,
    /// Credential: the outcome of a sent rotation is unknown; verify both keys.
    Resolve,
    /// Probe with the new identity alone.
    Probe,
    /// Promote the new identity.
    Promote,
    /// Retire old generations whose overlap ended.
    Retire,
}

/// What happens next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Take this step now.
    Act(Action),
    /// Nothing before `until`.
    Wait {
        /// Deadline.
        until: Unix,
        /// Why, for a person.
        what: String,
    },
}

/// The flow of an identity's issuer, from the configuration.
pub fn flow_of(cfg: &Config, ic: &IdentityConfig) -> Flow {
    match cfg.issuers.iter().find(|i| i.name() == ic.issuer) {
        Some(IssuerConfig::JwkRotation(_)) => Flow::Credential,
        _ => Flow::Certificate,
    }
}

/// The earliest the clock can be: the build time, and the newest start of anything in the
/// register (a certificate's not-before, a credential's creation).
pub fn clock_floor(reg: &Register) -> Unix {
    reg.identities
        .values()
        .flat_map(|r| r.generations.iter().filter_map(|g| g.not_before()))
        .fold(crate::clock::build_time(), Unix::max)
}

/// Decide the next step. `floor` is [`clock_floor`]: below it the clock is wrong and nothing
/// is decided (no renewal, no refusal, no key destroyed) until time sync puts it right.
pub fn plan(ic: &IdentityConfig, flow: Flow, rec: &IdentityRecord, now: Unix, floor: Unix) -> Plan {
    if let Some(wait) = held_back(rec, now, floor) {
        return wait;
    }
    let onboarding = flow == Flow::Credential && rec.current.is_none();
    match rec.step {
        Step::Active | Step::Lapsed if onboarding => Plan::Wait {
            until: u64::MAX,
            what: format!(
                "no credential yet: `edge-signer jwk export {0}`, register the JWK with the API, then `edge-signer jwk activate {0} --expires DATE`",
                ic.name
            ),
        },
        Step::Active if rec.current.is_some() && rec.forced_at.is_none() => {
            let renew = renewal_time(ic, rec).unwrap_or(now);
            if now >= renew {
                Plan::Act(Action::Begin)
            } else {
                Plan::Wait {
                    until: renew,
                    what: format!("renewal at {}", rfc3339(renew)),
                }
            }
        }
        Step::Active | Step::Lapsed => Plan::Act(Action::Begin),
        Step::KeyPending => Plan::Act(Action::MakeKey),
        Step::CsrReady if onboarding => Plan::Wait {
            until: u64::MAX,
            what: format!(
                "waiting for `edge-signer jwk activate {} --expires DATE`",
                ic.name
            ),
        },
        Step::CsrReady => Plan::Act(Action::Submit),
        Step::Submitted if flow == Flow::Credential => Plan::Act(Action::Resolve),
        Step::Submitted => match &rec.waiting {
            Some(w) if w.until > now => Plan::Wait {
                until: w.until,
                what: w.what.clone(),
            },
            _ => Plan::Act(Action::Poll),
        },
        Step::Issued => Plan::Act(Action::Check),
        Step::Validated => Plan::Act(Action::Probe),
        Step::Probed => Plan::Act(Action::Promote),
        Step::Overlap => overlap(rec, now),
    }
}

/// A wait that comes before any step: a clock behind the floor (nothing is renewed or
/// destroyed on a wrong clock), or a failure's back-off not yet over.
fn held_back(rec: &IdentityRecord, now: Unix, floor: Unix) -> Option<Plan> {
    if now + crate::validate::SKEW < floor {
        return Some(Plan::Wait {
            until: now + 60,
            what: format!(
                "waiting for time sync: the clock says {}, before {} (this build or the newest certificate); nothing is renewed or destroyed until it is right",
                rfc3339(now),
                rfc3339(floor)
            ),
        });
    }
    let f = rec.failure.as_ref().filter(|f| f.retry_at > now)?;
    Some(Plan::Wait {
        until: f.retry_at,
        what: format!("retry after: {}", f.reason),
    })
}

/// In overlap: retire once any old generation's overlap has ended, else wait for the first end.
fn overlap(rec: &IdentityRecord, now: Unix) -> Plan {
    let overlapping = rec
        .generations
        .iter()
        .filter(|g| g.status == GenStatus::Overlap);
    if overlapping
        .clone()
        .any(|g| g.overlap_until.is_none_or(|t| t <= now))
    {
        return Plan::Act(Action::Retire);
    }
    match overlapping.filter_map(|g| g.overlap_until).min() {
        Some(until) => Plan::Wait {
            until,
            what: format!("overlap: old generation retires at {}", rfc3339(until)),
        },
        None => Plan::Act(Action::Retire),
    }
}

/// How a step reads in `status`.
fn describe(a: Action, ic: &IdentityConfig, flow: Flow, rec: &IdentityRecord) -> String {
    let since = |step: Step| {
        rec.transitions
            .iter()
            .rev()
            .find(|t| t.step == step)
            .map(|t| rfc3339(t.at))
            .unwrap_or_default()
    };
    let credential = flow == Flow::Credential;
    match a {
        Action::Begin if rec.current.is_none() => "enrol a first generation".into(),
        Action::Begin if rec.step == Step::Lapsed => {
            "enrol a new key (the certificate lapsed)".into()
        }
        Action::Begin => "renew".into(),
        Action::MakeKey if credential => "generate the key and fix the rotation request".into(),
        Action::MakeKey => "generate the key and CSR".into(),
        Action::Submit if credential => format!("send the rotation to {}", ic.issuer),
        Action::Submit => format!("submit the CSR to {}", ic.issuer),
        Action::Poll => match &rec.waiting {
            Some(w) => format!(
                "check again: {} (submitted {})",
                w.what,
                since(Step::Submitted)
            ),
            None => format!(
                "ask {} for the certificate (submitted {})",
                ic.issuer,
                since(Step::Submitted)
            ),
        },
        Action::Check if credential => "verify the confirmed key with a signed call".into(),
        Action::Check => "validate the certificate".into(),
        Action::Resolve => format!(
            "find out whether {} applied the rotation (sent {}): a signed call with each key",
            ic.issuer,
            since(Step::Submitted)
        ),
        Action::Probe => "probe with the new identity".into(),
        Action::Promote => "promote the new identity".into(),
        Action::Retire => "retire the old generation".into(),
    }
}

/// One line of `status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// Identity name.
    pub name: String,
    /// Step.
    pub state: String,
    /// Serving generation.
    pub generation: Option<u32>,
    /// Its key URI.
    pub key_uri: Option<String>,
    /// Its certificate serial.
    pub serial: Option<String>,
    /// Its SHA-256 fingerprint.
    pub fingerprint: Option<String>,
    /// Its JWK `kid` (jwk-rotation identities).
    pub kid: Option<String>,
    /// Its not-after (RFC 3339).
    pub not_after: Option<String>,
    /// Whole days left (negative when lapsed).
    pub days_left: Option<i64>,
    /// The subject as issued, when the CA rewrote it.
    pub subject_issued: Option<String>,
    /// How the issued names differ from the request (accepted by `subject_match`).
    pub name_differences: Vec<String>,
    /// The generation being enrolled.
    pub pending_generation: Option<u32>,
    /// What happens next.
    pub next_action: String,
    /// When (RFC 3339).
    pub next_at: Option<String>,
    /// The last error.
    pub last_error: Option<String>,
    /// Generations still holding keys in the token.
    pub live_generations: Vec<u32>,
    /// What a person should change (a renewal window as long as the certificates, ...);
    /// left out when empty (the serial protocol's answers stay as they were).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Whole days from `now` until `not_after` (negative once it has passed).
pub fn days_left(not_after: Unix, now: Unix) -> i64 {
    (not_after as i64 - now as i64).div_euclid(86_400)
}

impl Status {
    /// Status rows are published when the engine acts, and an idle daemon acts weeks apart:
    /// whoever shows a published row recomputes its `days_left` from `not_after` at `now`.
    pub fn refresh_days_left(&mut self, now: Unix) {
        if let Some(Ok(na)) = self.not_after.as_deref().map(crate::clock::parse_date) {
            self.days_left = Some(days_left(na, now));
        }
    }
}

/// [`Status::refresh_days_left`] for rows as JSON (a device's status read by the operator).
pub fn refresh_days_left(rows: &mut serde_json::Value, now: Unix) {
    for row in rows.as_array_mut().into_iter().flatten() {
        let na = row["not_after"].as_str().map(crate::clock::parse_date);
        if let Some(Ok(na)) = na {
            row["days_left"] = days_left(na, now).into();
        }
    }
}

/// Status of every configured identity, from the register alone (no token access).
pub fn status(cfg: &Config, reg: &Register, now: Unix) -> Vec<Status> {
    cfg.identities
        .iter()
        .map(|ic| {
            let rec = reg.identities.get(&ic.name).cloned().unwrap_or_default();
            let flow = flow_of(cfg, ic);
            let cur = rec.current_gen();
            let cert = cur.and_then(|g| g.cert());
            let (next_action, next_at) = match plan(ic, flow, &rec, now, clock_floor(reg)) {
                Plan::Act(a) => (describe(a, ic, flow, &rec), Some(now)),
                Plan::Wait { until, what } => (what, (until != u64::MAX).then_some(until)),
            };
            Status {
                name: ic.name.clone(),
                state: rec.step.as_str().into(),
                generation: rec.current,
                key_uri: cur.and_then(|g| Some(g.key()?.uri.clone())),
                serial: cert.map(|c| c.serial.clone()),
                fingerprint: cert.map(|c| c.fingerprint.clone()),
                kid: cur.and_then(|g| g.kid()).map(str::to_owned),
                not_after: cur.and_then(|g| g.not_after()).map(rfc3339),
                days_left: cur.and_then(|g| g.not_after()).map(|na| days_left(na, now)),
                subject_issued: cert.and_then(|c| c.subject_issued.clone()),
                name_differences: cert.map(|c| c.name_differences.clone()).unwrap_or_default(),
                pending_generation: rec.pending,
                next_action,
                next_at: next_at.map(rfc3339),
                last_error: rec.failure.as_ref().map(|f| f.reason.clone()),
                live_generations: rec
                    .generations
                    .iter()
                    .filter(|g| g.status.is_live())
                    .map(|g| g.number)
                    .collect(),
                warnings: cur
                    .and_then(|g| g.validity())
                    .map(|(nb, na)| na.saturating_sub(nb))
                    .and_then(|life| super::schedule::window_warning(ic, life))
                    .into_iter()
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_left_is_recomputed_when_a_published_row_is_read() {
        let issued = 1_800_000_000;
        let not_after = issued + 90 * 86_400;
        assert_eq!(days_left(not_after, issued), 90);
        assert_eq!(days_left(not_after, issued + 1), 89);
        assert_eq!(days_left(not_after, not_after + 1), -1);
        let mut rows = serde_json::json!([
            {"name": "gw", "not_after": rfc3339(not_after), "days_left": 90},
            {"name": "new", "not_after": null, "days_left": null},
            {"name": "odd", "not_after": "yesterday", "days_left": 3},
        ]);
        refresh_days_left(&mut rows, issued + 30 * 86_400 + 5);
        assert_eq!(rows[0]["days_left"], 59);
        assert!(rows[1]["days_left"].is_null());
        assert_eq!(
            rows[2]["days_left"], 3,
            "an unreadable date leaves the row as it was"
        );
    }
}
