//! The device side of the fleet channel, a task on the daemon's runtime: connects with the
//! identity's current pair (a fresh TLS config per connection, so after a rotation the new
//! certificate authenticates), takes retained bundles and hands them to the engine (checked
//! exactly like `config apply`), publishes the result, a retained status on every change,
//! events, and `online`. Reconnects with backoff and jitter; every queue is bounded.

use super::Topics;
use crate::control::{ask, EngineCommand, EngineRequest, Outcome, Unanswered};
use crate::identities::{Identities, Resolver, ServingIdentity};
use firmware_config::fleet_channel::MqttConfig;
use firmware_config::Applied;
use rumqttc::{AsyncClient, Event, LastWill, Packet, QoS};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What the channel needs from the daemon.
pub struct Channel {
    /// `[fleet.mqtt]`.
    pub cfg: MqttConfig,
    /// The authenticating identity's slot.
    pub slot: Arc<ServingIdentity>,
    /// Status, events, fleet version.
    pub identities: Arc<Identities>,
    /// Requests to the engine.
    pub wake: std::sync::mpsc::Sender<EngineCommand>,
    /// This device's id in topics.
    pub device: String,
    /// The groups it belongs to (a bundle's audience may name one).
    pub groups: Vec<String>,
    /// The state dir (to recognise the bundle in effect when the broker re-delivers it).
    pub state_dir: PathBuf,
}

fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    d + d.mul_f64(f64::from(u16::from_le_bytes(b)) / 65535.0 / 2.0)
}

impl Channel {
    /// The channel of `cfg`'s `[fleet.mqtt]` (`m`); the device id must be a safe topic level.
    pub fn new(
        cfg: &firmware_config::Config,
        m: &MqttConfig,
        identities: &Arc<Identities>,
        wake: &std::sync::mpsc::Sender<EngineCommand>,
    ) -> crate::error::Result<Channel> {
        let device = cfg
            .fleet_device()
            .filter(|d| firmware_config::validate::safe_name(d))
            .ok_or_else(|| {
                crate::err!(
                    "no safe device id (fleet.mqtt.device_id, or the CN of identity '{}'): set fleet.mqtt.device_id",
                    m.identity
                )
            })?;
        Ok(Channel {
            cfg: m.clone(),
            slot: identities.slot(&m.identity),
            identities: identities.clone(),
            wake: wake.clone(),
            device,
            groups: m.groups.clone(),
            state_dir: cfg.paths.state_dir.clone(),
        })
    }

    /// Run until the runtime ends.
    pub async fn run(self) {
        let max = Duration::from_secs(self.cfg.reconnect_max.0.max(1));
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.connection().await {
                Ok(()) => backoff = Duration::from_secs(1),
                Err(e) => {
                    tracing::warn!(target: "edge_signer::fleet", "fleet channel: {e:#}; reconnecting in about {}s", backoff.as_secs())
                }
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(max);
        }
    }

    fn tls(&self) -> crate::error::Result<Arc<rustls::ClientConfig>> {
        let roots = Arc::new(super::roots(&self.cfg.server_ca)?);
        let builder = rustls::ClientConfig::builder_with_provider(crate::tlsconf::provider())
            .with_protocol_versions(rustls::ALL_VERSIONS)?;
        let builder = match &self.cfg.server_name {
            // The broker's certificate must name `server_name`, whatever host is dialled.
            Some(name) => builder
                .dangerous()
                .with_custom_certificate_verifier(crate::tlsconf::named_verifier(roots, name)?),
            None => builder.with_root_certificates(roots),
        };
        Ok(Arc::new(builder.with_client_cert_resolver(Arc::new(
            Resolver(self.slot.clone()),
        ))))
    }

    /// One connection, until it fails or the identity rotates (Ok: reconnect at once).
    async fn connection(&self) -> crate::error::Result<()> {
        let mut changes = self.identities.subscribe();
        // Wait for a pair to present.
        let generation = loop {
            if let Some(s) = self.slot.get() {
                break s.generation;
            }
            let _ = changes.changed().await;
        };
        let (host, port) = self.cfg.host_port().map_err(crate::error::Error::msg)?;
        let topics = Topics::new(&self.cfg, &self.device);
        let mut opts = super::options(
            &self.device,
            &host,
            port,
            Duration::from_secs(self.cfg.keepalive.0),
            self.tls()?,
        );
        opts.set_last_will(LastWill::new(
            topics.at("online"),
            "false",
            QoS::AtLeastOnce,
            true,
        ));
        let (client, mut events) = AsyncClient::new(opts, 16);
        let mut last_status = String::new();
        let mut events_sent = self.identities.events_since(u64::MAX).0;
        loop {
            tokio::select! {
                ev = events.poll() => match ev? {
                    Event::Incoming(Packet::ConnAck(_)) => {
                        tracing::info!(target: "edge_signer::fleet", device = %self.device, generation, "fleet channel connected");
                        for t in &topics.bundles_in {
                            client.try_subscribe(t, QoS::AtLeastOnce)?;
                        }
                        client.try_publish(topics.at("online"), QoS::AtLeastOnce, true, "true")?;
                        last_status.clear();
                        self.publish_status(&client, &topics, &mut last_status);
                    }
                    Event::Incoming(Packet::Publish(p)) if !p.payload.is_empty() => {
                        self.bundle(&client, &topics, p.topic.clone(), p.payload.to_vec());
                    }
                    _ => {}
                },
                r = changes.changed() => {
                    r?;
                    if self.slot.get().is_some_and(|s| s.generation != generation) {
                        tracing::info!(target: "edge_signer::fleet", "identity rotated: reconnecting with the new certificate");
                        let _ = client.try_disconnect();
                        return Ok(());
                    }
                    self.publish_status(&client, &topics, &mut last_status);
                    let (total, new) = self.identities.events_since(events_sent);
                    for e in new {
                        let _ = client.try_publish(topics.at("events"), QoS::AtMostOnce, false, serde_json::to_vec(&e).unwrap_or_default());
                    }
                    events_sent = total;
                }
            }
        }
    }

    fn publish_status(&self, client: &AsyncClient, topics: &Topics, last: &mut String) {
        let status = serde_json::json!({
            "device": self.device,
            "agent_version": env!("CARGO_PKG_VERSION"),
            "config_version": self.identities.fleet_version(),
            "identities": self.identities.status(),
        })
        .to_string();
        if status != *last
            && client
                .try_publish(topics.at("status"), QoS::AtLeastOnce, true, status.clone())
                .is_ok()
        {
            *last = status;
        }
    }

    /// The bundle now in effect, or an applied trust bundle, re-delivered as retained.
    fn already_applied(&self, bytes: &[u8]) -> bool {
        let fleet = self.state_dir.join("fleet");
        std::fs::read(fleet.join("current.bundle")).is_ok_and(|b| b == bytes)
            || std::fs::read_dir(fleet.join("trust"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| std::fs::read(e.path()).is_ok_and(|b| b == bytes))
    }

    /// Hand a bundle to the engine off the event loop; publish what happened.
    fn bundle(&self, client: &AsyncClient, topics: &Topics, topic: String, bytes: Vec<u8>) {
        if self.already_applied(&bytes) {
            tracing::debug!(target: "edge_signer::fleet", %topic, "retained bundle already in effect");
            return;
        }
        let (client, wake, result_topic) = (
            client.clone(),
            self.wake.clone(),
            topics.at("bundle/result"),
        );
        let device = self.device.clone();
        tokio::spawn(async move {
            let version = firmware_config::Bundle::parse(&bytes)
                .map(|b| b.version)
                .ok();
            let asked = ask(
                &wake,
                EngineRequest::Apply(bytes, firmware_config::Channel::Fleet),
                Duration::from_secs(120),
            )
            .await;
            // Late is not a refusal: the bundle stays queued, and the retained status shows
            // its config_version once the engine has applied it.
            let pending = asked == Err(Unanswered::Late);
            let outcome = asked.unwrap_or_else(|e| {
                Err(match e {
                    Unanswered::Stopping => "the engine is stopping".to_owned(),
                    Unanswered::Late => "the engine did not answer within 120 s; the bundle is still queued and may yet be applied: watch config_version in the status topic".to_owned(),
                })
            });
            let msg = match &outcome {
                Ok(outcome) => {
                    tracing::info!(target: "edge_signer::fleet", %topic, "bundle applied from the fleet channel");
                    let (kind, version, changes) = match outcome {
                        Outcome::Applied(Applied::Config(r)) => {
                            ("config", Some(r.version), r.changes.len())
                        }
                        Outcome::Applied(Applied::Trust(t)) => ("trust", Some(t.version), 0),
                        _ => ("", None, 0),
                    };
                    serde_json::json!({"device": device, "topic": topic, "applied": true, "version": version, "kind": kind, "changes": changes})
                }
                Err(e) if pending => {
                    tracing::warn!(target: "edge_signer::fleet", %topic, "bundle not answered yet: {e}");
                    serde_json::json!({"device": device, "topic": topic, "applied": false, "pending": true, "version": version, "reason": e})
                }
                Err(e) => {
                    tracing::warn!(target: "edge_signer::fleet", %topic, "bundle refused: {e}");
                    serde_json::json!({"device": device, "topic": topic, "applied": false, "version": version, "reason": e})
                }
            };
            let _ = client.try_publish(result_topic, QoS::AtLeastOnce, false, msg.to_string());
        });
    }
}

/// The fleet channel as the daemon runs it: started with `[fleet.mqtt]`, restarted when that
/// table changes, stopped when it goes.
#[derive(Default)]
pub struct Running(Option<(MqttConfig, tokio::task::JoinHandle<()>)>);

impl Running {
    /// Follow `cfg` on runtime `rt`; returns why the channel is down, if it is.
    pub fn follow(
        &mut self,
        cfg: &firmware_config::Config,
        rt: &tokio::runtime::Handle,
        identities: &Arc<Identities>,
        wake: &std::sync::mpsc::Sender<EngineCommand>,
    ) -> Option<String> {
        if self.0.as_ref().map(|f| Some(&f.0)) == Some(cfg.fleet.mqtt.as_ref()) {
            return None;
        }
        if let Some((_, t)) = self.0.take() {
            t.abort();
        }
        let m = cfg.fleet.mqtt.as_ref()?;
        let _guard = rt.enter();
        match Channel::new(cfg, m, identities, wake) {
            Ok(channel) => {
                self.0 = Some((m.clone(), rt.spawn(channel.run())));
                None
            }
            Err(e) => Some(format!("the fleet channel is down: {e:#}")),
        }
    }
}
