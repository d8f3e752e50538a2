//! Technician diagnostics over the serial port: the daemon serves the line protocol on
//! `serial.device` (reopened when a USB adapter is unplugged and plugged back), on its own
//! thread (serialport is blocking I/O); `edge-signer diag` is the laptop side.

pub mod auth;
pub mod client;
pub mod port;
pub mod protocol;
pub mod session;

use crate::clock::{rfc3339, Clock, Unix};
use crate::control::{EngineCommand, EngineRequest, Reply};
use crate::identities::Identities;
use crate::lifecycle::plan::Status;
use firmware_config::FleetKey;
use hsm_shim::Token;
use protocol::Answer;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// What the port shows of the running configuration (replaced at each reload).
#[derive(Clone)]
pub struct View {
    /// `[serial]`.
    pub serial: firmware_config::schema::SerialConfig,
    /// Effective configuration rows: (path, value, source), secrets redacted.
    pub config_rows: Vec<(String, String, String)>,
    /// Fleet bundle version in effect.
    pub fleet_version: u64,
    /// The open token.
    pub token: Arc<Token>,
    /// The clock floor (build time, newest not-before).
    pub clock_floor: Unix,
}

/// Shared between the daemon and the port thread.
pub struct Shared {
    /// Status and events, as the API serves them.
    pub identities: Arc<Identities>,
    wake: std::sync::mpsc::Sender<EngineCommand>,
    clock: Arc<dyn Clock>,
    view: RwLock<Option<Arc<View>>>,
    /// Failed `auth` attempts since the last success, on this port.
    failures: std::sync::atomic::AtomicU32,
}

impl Shared {
    /// Shared state for the port thread.
    pub fn new(
        identities: Arc<Identities>,
        wake: std::sync::mpsc::Sender<EngineCommand>,
        clock: Arc<dyn Clock>,
    ) -> Shared {
        Shared {
            identities,
            wake,
            clock,
            view: RwLock::new(None),
            failures: Default::default(),
        }
    }

    fn auth_failures(&self) -> u32 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set_auth_failures(&self, n: u32) {
        self.failures.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// The daemon publishes the configuration in effect.
    pub fn set_view(&self, v: View) {
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(v));
    }

    /// The view in effect (shared: no copy of the configuration rows per command).
    fn view(&self) -> Option<Arc<View>> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn now(&self) -> Unix {
        self.clock.now()
    }

    /// This device's serial, as tokens must name it: the token's serial number.
    pub fn device(&self) -> String {
        self.view()
            .map(|v| v.token.serial().to_owned())
            .unwrap_or_default()
    }

    fn allow_privileged(&self) -> bool {
        self.view().is_some_and(|v| v.serial.allow_privileged)
    }

    fn technician_keys(&self) -> Vec<FleetKey> {
        self.view()
            .map(|v| v.serial.technician_keys.clone())
            .unwrap_or_default()
    }

    fn row(&self, name: &str) -> Option<Status> {
        self.identities.status_of(name)
    }

    fn generation(&self, name: &str) -> Option<u32> {
        self.row(name).and_then(|r| r.generation)
    }

    fn status_answer(&self, only: Option<&str>) -> Answer {
        let rows: Vec<serde_json::Value> = self
            .identities
            .status()
            .into_iter()
            .filter(|r| only.is_none_or(|n| r.name == n))
            .filter_map(|r| serde_json::to_value(r).ok())
            .collect();
        if let (Some(n), true) = (only, rows.is_empty()) {
            return Answer::error(404, format!("no identity '{n}'"));
        }
        let mut a = Answer {
            // For programs: the same rows as `edge-signer status --json`.
            data: Some(serde_json::Value::Array(rows.clone())),
            ..Answer::default()
        };
        if only.is_none() {
            a.field("identities", rows.len());
        }
        let keys: &[&str] = if only.is_some() {
            &[
                "state",
                "generation",
                "key_uri",
                "serial",
                "fingerprint",
                "kid",
                "not_after",
                "days_left",
                "subject_issued",
                "pending_generation",
                "next_action",
                "next_at",
                "last_error",
                "live_generations",
            ]
        } else {
            &[
                "state",
                "generation",
                "not_after",
                "days_left",
                "next_action",
                "next_at",
                "last_error",
            ]
        };
        for r in &rows {
            let name = r["name"].as_str().unwrap_or("?");
            for k in keys {
                let v = &r[*k];
                if v.is_null() {
                    continue;
                }
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                a.field(format!("{name}.{k}"), text);
            }
        }
        a
    }

    fn token_answer(&self) -> Answer {
        let Some(v) = self.view() else {
            return Answer::error(503, "the daemon is starting");
        };
        let mut a = Answer::default();
        a.field("label", v.token.label())
            .field("serial", v.token.serial());
        match v.token.ping() {
            Ok(()) => a.field("present", "yes").field("pin_accepted", "yes"),
            Err(e) => a.field("present", "no answer").field("error", e),
        };
        a
    }

    fn config_answer(&self) -> Answer {
        let Some(v) = self.view() else {
            return Answer::error(503, "the daemon is starting");
        };
        let mut a = Answer::default();
        a.field(
            "fleet_bundle",
            if v.fleet_version == 0 {
                "none".to_owned()
            } else {
                format!("v{}", v.fleet_version)
            },
        );
        for (path, value, source) in &v.config_rows {
            a.field(path, format!("{value}  # {source}"));
        }
        a
    }

    fn clock_answer(&self) -> Answer {
        let now = self.now();
        let floor = self.view().map(|v| v.clock_floor).unwrap_or(0);
        let mut a = Answer::default();
        a.field("now", rfc3339(now))
            .field("floor", rfc3339(floor))
            .field(
                "trusted",
                if now >= floor {
                    "yes".to_owned()
                } else {
                    "no: before the build time or a certificate's not-before; waiting for time sync (check NTP or the RTC)".to_owned()
                },
            );
        a
    }

    fn events_answer(&self, n: usize) -> Answer {
        let mut a = Answer::default();
        for (i, e) in self.identities.recent_events(n).iter().enumerate() {
            a.field(
                format!("event.{i}"),
                format!(
                    "{} {} {} {}",
                    e.at,
                    e.kind,
                    if e.identity.is_empty() {
                        "-"
                    } else {
                        &e.identity
                    },
                    e.message
                ),
            );
        }
        a
    }

    fn version_answer(&self) -> Answer {
        let mut a = Answer::default();
        a.field("agent", env!("CARGO_PKG_VERSION"))
            .field("built", rfc3339(crate::clock::build_time()))
            .field("protocol", protocol::PROTOCOL);
        a
    }

    fn collect_answer(&self) -> Answer {
        let mut a = Answer::default();
        for part in [
            self.version_answer(),
            self.clock_answer(),
            self.token_answer(),
            self.status_answer(None),
            self.events_answer(50),
            self.config_answer(),
        ] {
            a.fields.extend(part.fields);
        }
        a
    }

    /// Ask the engine (the one writer) and wait for its answer.
    fn ask(&self, req: EngineRequest) -> Answer {
        let (tx, rx) = Reply::blocking();
        if self.wake.send(EngineCommand::Request(req, tx)).is_err() {
            return Answer::error(503, "the engine is stopping");
        }
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Ok(outcome)) => {
                // The fields of the API's JSON answer, one `key=value` each.
                let v = serde_json::to_value(&outcome).unwrap_or_default();
                let mut a = Answer::default();
                if let Some(o) = v.as_object() {
                    for (k, v) in o {
                        if k == "changes" {
                            a.field("changes", v.as_array().map(|c| c.len()).unwrap_or(0));
                            continue;
                        }
                        a.field(
                            k,
                            match v {
                                serde_json::Value::String(s) => s.clone(),
                                other => other.to_string(),
                            },
                        );
                    }
                }
                a
            }
            Ok(Err(e)) => Answer::error(409, e),
            Err(_) => Answer::error(504, "the engine did not answer within 120 s"),
        }
    }
}

/// Serve the port until the process ends: open, run sessions, reopen after an error.
pub fn serve(shared: Arc<Shared>, device: std::path::PathBuf, baud: u32) {
    let mut said = false;
    loop {
        let mut port = match port::Port::open(&device, baud, session::READ_WAIT) {
            Ok(p) => {
                tracing::info!(target: "edge_signer::serial", device = %device.display(), baud, "diagnostics port open");
                said = false;
                p
            }
            Err(e) => {
                if !said {
                    tracing::warn!(target: "edge_signer::serial", device = %device.display(), "cannot open the diagnostics port (retrying every 2 s): {e}");
                    said = true;
                }
                std::thread::sleep(Duration::from_secs(2));
                continue;
            }
        };
        let mut reader = protocol::LineReader::default();
        loop {
            let mut s = session::Session::new(&shared, Duration::from_secs(600));
            if s.run(&mut port, &mut reader) == session::End::PortGone {
                tracing::warn!(target: "edge_signer::serial", device = %device.display(), "diagnostics port lost; reopening");
                break;
            }
        }
    }
}
