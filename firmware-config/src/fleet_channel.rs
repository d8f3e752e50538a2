//! `[fleet.mqtt]`: the fleet channel. Bundles in from retained MQTT topics, status and
//! events out, authenticated by one of the device's token identities. Firmware or local
//! layers only (a bundle can set nothing under `fleet`).

use crate::units::Duration;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `[fleet.mqtt]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `mqtts://host:port` (TLS only: the identity is a client certificate).
    pub broker: String,
    /// The identity whose token key signs the handshake (reconnects after each rotation).
    pub identity: String,
    /// CA bundle the broker's certificate must chain to.
    pub server_ca: PathBuf,
    /// Name checked in the broker's certificate (default: the broker's host).
    pub server_name: Option<String>,
    /// This device's id in topics (default: the identity's CN).
    pub device_id: Option<String>,
    /// Topic prefix.
    pub topic_prefix: String,
    /// Groups whose retained bundles this device takes (`<prefix>/group/<name>/bundle`).
    pub groups: Vec<String>,
    /// MQTT keepalive.
    pub keepalive: Duration,
    /// Longest wait between reconnection attempts (backoff doubles up to it, with jitter).
    pub reconnect_max: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            broker: String::new(),
            identity: String::new(),
            server_ca: PathBuf::new(),
            server_name: None,
            device_id: None,
            topic_prefix: "edge-signer".into(),
            groups: Vec::new(),
            keepalive: Duration(60),
            reconnect_max: Duration(60),
        }
    }
}

impl MqttConfig {
    /// (host, port) of `broker`.
    pub fn host_port(&self) -> Result<(String, u16), String> {
        let rest = self
            .broker
            .strip_prefix("mqtts://")
            .ok_or_else(|| format!("'{}' is not an mqtts:// URL (TLS is required)", self.broker))?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("bad port in '{}'", self.broker))?,
            ),
            None => (rest, 8883),
        };
        if host.is_empty() {
            return Err(format!("no host in '{}'", self.broker));
        }
        Ok((
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
        ))
    }
}

/// A topic level we build from configuration: no wildcards, separators or control chars.
pub fn topic_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s
            .chars()
            .any(|c| matches!(c, '+' | '#' | '\0') || c.is_control())
        && !s.starts_with('/')
        && !s.ends_with('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cn(cn: &str, device_id: Option<&str>) -> Vec<String> {
        let mut c = crate::schema::Config::default();
        let mut id = crate::schema::IdentityConfig {
            name: "gw".into(),
            ..Default::default()
        };
        id.subject.cn = cn.into();
        c.identities.push(id);
        c.fleet.mqtt = Some(MqttConfig {
            broker: "mqtts://broker:8883".into(),
            identity: "gw".into(),
            device_id: device_id.map(str::to_owned),
            ..Default::default()
        });
        let mut errors = Vec::new();
        crate::validate::fleet_channel(&c, &mut |at, why| errors.push(format!("{at}: {why}")));
        errors
    }

    #[test]
    fn a_device_id_taken_from_the_cn_must_be_a_safe_topic_level() {
        for cn in ["site/+/#", "", "a b"] {
            let e = with_cn(cn, None);
            assert!(
                e.iter().any(|e| e
                    .starts_with("fleet.mqtt.device_id: unset, so the device id would be the CN")),
                "{cn:?}: {e:?}"
            );
        }
        assert!(!with_cn("gw-0042", None)
            .iter()
            .any(|e| e.contains("device_id")));
        // An explicit id is checked, and then the CN does not matter.
        assert!(!with_cn("site/+", Some("gw-0042"))
            .iter()
            .any(|e| e.contains("device_id")));
        assert!(with_cn("gw", Some("a/b"))
            .iter()
            .any(|e| e.starts_with("fleet.mqtt.device_id: 'a/b' is not a safe name")));
    }
}
