//! The fleet channel over MQTT: topics, messages, and the TLS set-up shared by the device
//! side (`channel`, in the daemon) and the operator side (`operator`, the CLI).
//!
//! Topics under `<prefix>`: `<device>/bundle` and `group/<name>/bundle` (retained bundles
//! in), `<device>/bundle/result`, `<device>/status` (retained), `<device>/online` (retained
//! `true`; the last will sets `false`), `<device>/events`.

pub mod channel;
pub mod operator;

pub use channel::Running;

use firmware_config::fleet_channel::MqttConfig;

/// The topics of one device.
#[derive(Debug, Clone)]
pub struct Topics {
    /// `<prefix>/<device>`.
    pub base: String,
    /// Where bundles for this device come from.
    pub bundles_in: Vec<String>,
}

impl Topics {
    /// Topics of `device` under `cfg`'s prefix, with its groups.
    pub fn new(cfg: &MqttConfig, device: &str) -> Topics {
        let p = &cfg.topic_prefix;
        let mut bundles_in = vec![format!("{p}/{device}/bundle")];
        bundles_in.extend(cfg.groups.iter().map(|g| format!("{p}/group/{g}/bundle")));
        Topics {
            base: format!("{p}/{device}"),
            bundles_in,
        }
    }

    /// `<base>/<leaf>`.
    pub fn at(&self, leaf: &str) -> String {
        format!("{}/{leaf}", self.base)
    }
}

/// MQTT options for a TLS connection with `tls` as the rustls config.
pub fn options(
    client_id: &str,
    host: &str,
    port: u16,
    keepalive: std::time::Duration,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(client_id, host, port);
    o.set_keep_alive(keepalive.max(std::time::Duration::from_secs(5)))
        .set_clean_session(true)
        .set_max_packet_size(2 << 20, 2 << 20)
        .set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    o
}

/// Roots from a CA bundle file.
pub fn roots(path: &std::path::Path) -> crate::error::Result<rustls::RootCertStore> {
    Ok(crate::tlsconf::load_roots(path)?)
}
