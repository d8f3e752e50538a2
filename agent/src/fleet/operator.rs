//! The operator's side of the fleet channel (`edge-signer fleet publish|status`): publish a
//! signed bundle retained to a group or device topic; read every device's retained status.

use crate::bail;
use crate::error::{Context, Result};
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
        let (host, port) = cfg.host_port().map_err(crate::error::Error::msg)?;
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
    let bundle = firmware_config::Bundle::parse(&bytes)
        .context("not a bundle (edge-signer fleet sign makes one)")?;
    let topic = match (group, device) {
        (Some(g), None) => format!("{}/group/{g}/bundle", b.prefix),
        (None, Some(d)) => format!("{}/{d}/bundle", b.prefix),
        _ => bail!("give exactly one of --group NAME or --device ID"),
    };
    // Devices take from the channel only bundles whose signed audience names them.
    let groups: Vec<String> = group.iter().map(|g| g.to_string()).collect();
    if !bundle.addressed_to(device, &groups) {
        bail!(
            "{} is for [{}], not for {}: devices would refuse it; sign it with fleet sign --{} {}",
            file.display(),
            bundle
                .audience
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(" "),
            topic,
            if group.is_some() { "group" } else { "device" },
            group.or(device).unwrap_or_default()
        );
    }
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
                        return Ok::<_, crate::error::Error>(());
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

impl DeviceRow {
    /// A device seen for the first time: nothing known yet.
    pub fn new(device: &str) -> DeviceRow {
        DeviceRow {
            device: device.to_owned(),
            online: None,
            config_version: None,
            days_left: None,
            identities: serde_json::Value::Null,
            last_error: None,
        }
    }

    /// Take in one retained message of the device (`leaf`: `online` or `status`). Devices
    /// publish these, so any bytes may come: what cannot be read is left unknown.
    pub fn apply(&mut self, leaf: &str, payload: &[u8], now: crate::clock::Unix) {
        if leaf == "online" {
            self.online = Some(payload == b"true");
        } else if leaf == "status" {
            let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
            self.config_version = v["config_version"].as_u64();
            // Retained: published when the device last changed, maybe weeks ago. Days left
            // are counted from now.
            let mut ids = v["identities"].clone();
            crate::lifecycle::plan::refresh_days_left(&mut ids, now);
            let ids = ids.as_array().cloned().unwrap_or_default();
            self.days_left = ids.iter().filter_map(|i| i["days_left"].as_i64()).min();
            self.last_error = ids
                .iter()
                .find_map(|i| i["last_error"].as_str().map(str::to_owned));
            self.identities = serde_json::Value::Array(ids);
        }
    }
}

/// `PREFIX/DEVICE/LEAF` → (device, leaf); any other topic is not a device's.
pub fn device_topic<'a>(prefix: &str, topic: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    rest.split_once('/').filter(|(d, _)| !d.is_empty())
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
                        let Some((device, leaf)) = device_topic(&prefix, &p.topic) else {
                            continue;
                        };
                        rows.entry(device.to_owned())
                            .or_insert_with(|| DeviceRow::new(device))
                            .apply(leaf, &p.payload, now);
                    }
                    _ => {}
                }
            }
            #[allow(unreachable_code)]
            Ok::<_, crate::error::Error>(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_status_message_fills_the_row_and_days_are_counted_from_now() {
        let mut row = DeviceRow::new("gw-1");
        row.apply("online", b"true", NOW);
        let status = format!(
            r#"{{"config_version":7,"identities":[
                {{"name":"a","not_after":"{}","days_left":90}},
                {{"name":"b","not_after":null,"days_left":null,"last_error":"EST: 503"}}]}}"#,
            crate::clock::rfc3339(NOW + 10 * 86_400 + 5)
        );
        row.apply("status", status.as_bytes(), NOW);
        assert_eq!(row.online, Some(true));
        assert_eq!(row.config_version, Some(7));
        assert_eq!(row.days_left, Some(10), "recounted, not the published 90");
        assert_eq!(row.last_error.as_deref(), Some("EST: 503"));
        row.apply("online", b"false", NOW);
        assert_eq!(row.online, Some(false));
    }

    #[test]
    fn only_device_topics_under_the_prefix_are_taken() {
        assert_eq!(
            device_topic("edge", "edge/gw-1/status"),
            Some(("gw-1", "status"))
        );
        assert_eq!(device_topic("edge", "edge//status"), None);
        assert_eq!(device_topic("edge", "edgeX/gw-1/status"), None);
        assert_eq!(device_topic("edge", "edge/gw-1"), None);
        assert_eq!(device_topic("edge", "other/gw-1/status"), None);
    }

    /// Any JSON value, a few levels deep: what a broken or hostile device could retain.
    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            "[ -~]{0,30}".prop_map(serde_json::Value::from),
            (0u64..4_000_000_000).prop_map(|t| crate::clock::rfc3339(t).into()),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            let keys = prop_oneof![
                Just("identities".to_owned()),
                Just("not_after".to_owned()),
                Just("days_left".to_owned()),
                Just("last_error".to_owned()),
                Just("config_version".to_owned()),
                "[a-z]{1,6}",
            ];
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(keys, inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_bytes_in_a_retained_message_never_panic(
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            leaf in prop_oneof![Just("status"), Just("online"), Just("other")],
        ) {
            let mut row = DeviceRow::new("gw");
            row.apply(leaf, &payload, NOW);
        }

        #[test]
        fn any_json_status_never_panics_and_days_left_is_the_fewest(
            v in json(),
            now in 0u64..4_000_000_000,
        ) {
            let mut row = DeviceRow::new("gw");
            row.apply("status", v.to_string().as_bytes(), now);
            let ids = row.identities.as_array().cloned().unwrap_or_default();
            let fewest = ids.iter().filter_map(|i| i["days_left"].as_i64()).min();
            prop_assert_eq!(row.days_left, fewest);
        }

        #[test]
        fn any_topic_never_panics(topic in "[a-z/+#]{0,20}") {
            if let Some((device, leaf)) = device_topic("edge", &topic) {
                prop_assert!(!device.is_empty());
                prop_assert_eq!(format!("edge/{device}/{leaf}"), topic);
            }
        }
    }
}
