//! The operator's side of the fleet channel (`edge-signer fleet publish|status`): publish a
//! signed bundle retained to a group or device topic; read every device's retained status.

use anyhow::{bail, Context, Result};
use firmware_config::fleet_channel::MqttConfig;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How the operator reaches the broker: its URL, the broker's CA, the operator's certificate.
pub struct Broker {
    /// `mqtts://host:port`.
    pub url: String,
    /// CA bundle of the broker.
    pub ca: PathBuf,
    /// Operator certificate (PEM).
    pub cert: PathBuf,
    /// Operator private key (PEM).
    pub key: PathBuf,
    /// Topic prefix.
    pub prefix: String,
}

impl Broker {
    fn tls(&self) -> Result<Arc<rustls::ClientConfig>> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .with_context(|| format!("cannot read {}", self.cert.display()))?
            .collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .with_context(|| format!("cannot read the key {}", self.key.display()))?;
        Ok(Arc::new(
            rustls::ClientConfig::builder_with_provider(crate::tlsconf::provider())
                .with_protocol_versions(rustls::ALL_VERSIONS)?
                .with_root_certificates(super::roots(&self.ca)?)
                .with_client_auth_cert(chain, key)?,
        ))
    }

    fn connect(&self) -> Result<(AsyncClient, rumqttc::EventLoop)> {
        let cfg = MqttConfig {
            broker: self.url.clone(),
            ..Default::default()
        };
        let (host, port) = cfg.host_port().map_err(anyhow::Error::msg)?;
        let id = format!("edge-signer-operator-{}", std::process::id());
        Ok(AsyncClient::new(
            super::options(&id, &host, port, Duration::from_secs(30), self.tls()?),
            16,
        ))
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Publish `file` retained to `group` (or one `device`), wait for the broker's ack.
pub fn publish(
    b: &Broker,
    group: Option<&str>,
    device: Option<&str>,
    file: &Path,
) -> Result<String> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    firmware_config::Bundle::parse(&bytes)
        .context("not a bundle (edge-signer fleet sign makes one)")?;
    let topic = match (group, device) {
        (Some(g), None) => format!("{}/group/{g}/bundle", b.prefix),
        (None, Some(d)) => format!("{}/{d}/bundle", b.prefix),
        _ => bail!("give exactly one of --group NAME or --device ID"),
    };
    let (client, mut ev) = b.connect()?;
    runtime()?.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match ev.poll().await? {
                    Event::Incoming(Packet::ConnAck(_)) => {
                        client
                            .publish(&topic, QoS::AtLeastOnce, true, bytes.clone())
                            .await?;
                    }
                    Event::Incoming(Packet::PubAck(_)) => {
                        let _ = client.try_disconnect();
                        return Ok::<_, anyhow::Error>(());
                    }
                    _ => {}
                }
            }
        })
        .await
        .context("no answer from the broker within 20 s")?
    })?;
    Ok(topic)
}

/// One device as its retained messages show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceRow {
    /// Device id.
    pub device: String,
    /// `online` as last retained (the last will sets it false).
    pub online: Option<bool>,
    /// Fleet bundle version in effect.
    pub config_version: Option<u64>,
    /// Fewest days left over its identities.
    pub days_left: Option<i64>,
    /// Its identities' rows.
    pub identities: serde_json::Value,
    /// The first last error among them.
    pub last_error: Option<String>,
}

/// Every device's retained status under the prefix (collected for `wait` after subscribing).
pub fn status(b: &Broker, wait: Duration) -> Result<Vec<DeviceRow>> {
    let (client, mut ev) = b.connect()?;
    let mut rows: std::collections::BTreeMap<String, DeviceRow> = Default::default();
    let prefix = b.prefix.clone();
    let now = crate::clock::Clock::now(&crate::clock::SystemClock);
    runtime()?.block_on(async {
        let collect = async {
            loop {
                match ev.poll().await? {
                    Event::Incoming(Packet::ConnAck(_)) => {
                        client
                            .subscribe(format!("{prefix}/+/status"), QoS::AtLeastOnce)
                            .await?;
                        client
                            .subscribe(format!("{prefix}/+/online"), QoS::AtLeastOnce)
                            .await?;
                    }
                    Event::Incoming(Packet::Publish(p)) => {
                        let Some(rest) = p.topic.strip_prefix(&format!("{prefix}/")) else {
                            continue;
                        };
                        let Some((device, leaf)) = rest.split_once('/') else {
                            continue;
                        };
                        let row = rows.entry(device.to_owned()).or_insert_with(|| DeviceRow {
                            device: device.to_owned(),
                            online: None,
                            config_version: None,
                            days_left: None,
                            identities: serde_json::Value::Null,
                            last_error: None,
                        });
                        if leaf == "online" {
                            row.online = Some(&p.payload[..] == b"true");
                        } else if leaf == "status" {
                            let v: serde_json::Value =
                                serde_json::from_slice(&p.payload).unwrap_or_default();
                            row.config_version = v["config_version"].as_u64();
                            // Retained: published when the device last changed, maybe
                            // weeks ago. Days left are counted from now.
                            let mut ids = v["identities"].clone();
                            crate::lifecycle::plan::refresh_days_left(&mut ids, now);
                            let ids = ids.as_array().cloned().unwrap_or_default();
                            row.days_left =
                                ids.iter().filter_map(|i| i["days_left"].as_i64()).min();
                            row.last_error = ids
                                .iter()
                                .find_map(|i| i["last_error"].as_str().map(str::to_owned));
                            row.identities = serde_json::Value::Array(ids);
                        }
                    }
                    _ => {}
                }
            }
            #[allow(unreachable_code)]
            Ok::<_, anyhow::Error>(())
        };
        match tokio::time::timeout(wait, collect).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    })?;
    let mut out: Vec<DeviceRow> = rows.into_values().collect();
    // Most urgent first: fewest days left, then offline, then name.
    out.sort_by_key(|r| {
        (
            r.days_left.unwrap_or(i64::MAX),
            r.online == Some(true),
            r.device.clone(),
        )
    });
    Ok(out)
}
