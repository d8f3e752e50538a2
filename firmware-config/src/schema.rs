//! The typed configuration. Every string with meaning (durations, percentages, key types,
//! SANs, fleet keys) becomes a type here; the engine never parses. Documented field by field
//! in docs/config.md.

use crate::bundle::FleetKey;
use crate::units::{Duration, Percent};
use hsm_shim::csr::San;
use hsm_shim::KeyType;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::PathBuf;

pub use crate::issuers::{
    AcmeEab, AcmeIssuer, Challenge, EstBootstrap, EstIssuer, IssuerConfig, JwkIssuer, PortalIssuer,
    ScepIssuer,
};
pub use crate::secret::PinConfig;
pub use crate::serving::{ApiConfig, ApiRule, Listen, Operation, ProxyConfig};
pub use crate::tls::{KxGroup, TlsConfig};

fn parse<'de, D: Deserializer<'de>, T: std::str::FromStr>(d: D) -> Result<T, D::Error>
where
    T::Err: std::fmt::Display,
{
    String::deserialize(d)?
        .parse()
        .map_err(serde::de::Error::custom)
}

fn parse_vec<'de, D: Deserializer<'de>, T: std::str::FromStr>(d: D) -> Result<Vec<T>, D::Error>
where
    T::Err: std::fmt::Display,
{
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .collect()
}

fn show<S: Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn show_vec<S: Serializer, T: std::fmt::Display>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| x.to_string()))
}

/// The whole device configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The PKCS#11 token.
    pub token: TokenConfig,
    /// Identities (credentials) this device owns, `[[identity]]`.
    #[serde(rename = "identity")]
    pub identities: Vec<IdentityConfig>,
    /// Issuers (CAs and credential APIs), `[[issuer]]`.
    #[serde(rename = "issuer")]
    pub issuers: Vec<IssuerConfig>,
    /// Technician serial port.
    pub serial: SerialConfig,
    /// Fleet management trust.
    pub fleet: FleetConfig,
    /// Local signing API.
    pub api: ApiConfig,
    /// mTLS egress proxies, `[[proxy]]`.
    #[serde(rename = "proxy")]
    pub proxies: Vec<ProxyConfig>,
    /// Where state lives.
    pub paths: PathsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Event hook.
    pub notify: NotifyConfig,
    /// The agent's own TLS connections.
    pub tls: TlsConfig,
}

/// `[token]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// PKCS#11 module path.
    pub module: Option<PathBuf>,
    /// Token label (or give `serial`).
    pub label: Option<String>,
    /// Token serial (or give `label`).
    pub serial: Option<String>,
    /// Where the user PIN is read from.
    pub pin: Option<PinConfig>,
}

/// `[[identity]]`: one credential and how it is renewed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Unique name.
    pub name: String,
    /// Key type of every generation.
    #[serde(deserialize_with = "parse", serialize_with = "show")]
    pub key_type: KeyType,
    /// Subject of the CSR.
    pub subject: SubjectConfig,
    /// Subject alternative names, `dns:NAME` / `ip:ADDRESS`.
    #[serde(deserialize_with = "parse_vec", serialize_with = "show_vec")]
    pub sans: Vec<San>,
    /// How the CN changes per renewal.
    pub cn_suffix: CnSuffix,
    /// Name of the `[[issuer]]` that signs it.
    pub issuer: String,
    /// When to renew, remind, retry.
    pub renewal: RenewalConfig,
    /// How long old and new generations stay valid together.
    pub overlap: Duration,
    /// URL probed with the new identity alone before it is promoted.
    pub probe_url: Option<String>,
    /// CA bundle of the probe URL's server (default: the issuer's CA bundle).
    pub probe_ca: Option<PathBuf>,
    /// What the identity is used for.
    pub usage: Vec<Usage>,
    /// How strictly the issued subject must match the requested one.
    pub subject_match: SubjectMatch,
}

/// How an issued certificate's subject and SANs are compared with what was asked for.
/// Key match, chain, dates and usage are checked whatever this says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubjectMatch {
    /// Subject equal RDN by RDN in the same order; SANs equal as sets.
    Exact,
    /// The CN and every requested SAN must be present; other differences (RDNs dropped or
    /// reordered by the CA, extra SANs) are accepted and reported.
    #[default]
    Cn,
    /// Subject and SANs are not compared (differences are still reported).
    None,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            name: String::new(),
            key_type: KeyType::EcP256,
            subject: SubjectConfig::default(),
            sans: Vec::new(),
            cn_suffix: CnSuffix::None,
            issuer: String::new(),
            renewal: RenewalConfig::default(),
            overlap: Duration::days(7),
            probe_url: None,
            probe_ca: None,
            usage: vec![Usage::Client],
            subject_match: SubjectMatch::Cn,
        }
    }
}

/// The subject DN of an identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubjectConfig {
    /// Country.
    pub c: Option<String>,
    /// State or province.
    pub st: Option<String>,
    /// Locality.
    pub l: Option<String>,
    /// Organisation.
    pub o: Option<String>,
    /// Organisational unit.
    pub ou: Option<String>,
    /// Common name (required).
    pub cn: String,
}

impl SubjectConfig {
    /// As the CSR builder's type, with `cn` replaced (for the CN suffix rule).
    pub fn to_subject(&self, cn: &str) -> hsm_shim::csr::Subject {
        let mut v = Vec::new();
        for (k, val) in [
            ("C", &self.c),
            ("ST", &self.st),
            ("L", &self.l),
            ("O", &self.o),
            ("OU", &self.ou),
        ] {
            if let Some(x) = val {
                v.push((k.to_owned(), x.clone()));
            }
        }
        v.push(("CN".into(), cn.to_owned()));
        hsm_shim::csr::Subject(v)
    }
}

/// How the CN changes on each renewal (some CAs refuse a renewed DN equal to the old one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CnSuffix {
    /// The CN stays as configured.
    #[default]
    None,
    /// `-<unix time>` is appended to the CN on each renewal.
    UnixTime,
    /// `-g<generation number>` is appended to the CN: unique per identity even when two
    /// renewals fall in one second.
    Generation,
}

/// What an identity is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Usage {
    /// TLS client authentication.
    Client,
    /// TLS server authentication.
    Server,
}

/// `[identity.renewal]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RenewalConfig {
    /// Renew this long before expiry (`30d`). Give this or `at`.
    pub before: Option<Duration>,
    /// Renew at this fraction of the lifetime (`66%`). Give this or `before`.
    pub at: Option<Percent>,
    /// Reminder marks before expiry.
    pub reminders: Vec<Duration>,
    /// First retry delay.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Random spread added to the renewal time, so a fleet does not renew in one minute.
    pub jitter: Duration,
}

impl Default for RenewalConfig {
    fn default() -> Self {
        RenewalConfig {
            before: None,
            at: None,
            reminders: vec![Duration::days(30), Duration::days(15), Duration::days(5)],
            retry_min: Duration::minutes(1),
            retry_max: Duration::hours(6),
            jitter: Duration::hours(1),
        }
    }
}

/// When to renew, as the engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewAt {
    /// This long before not-after.
    Before(Duration),
    /// At this fraction of the lifetime after not-before.
    Fraction(Percent),
}

impl RenewalConfig {
    /// The renewal point; 30 days before expiry when neither is given.
    pub fn renew_at(&self) -> RenewAt {
        match (self.before, self.at) {
            (_, Some(p)) => RenewAt::Fraction(p),
            (Some(d), None) => RenewAt::Before(d),
            (None, None) => RenewAt::Before(Duration::days(30)),
        }
    }
}

/// `[serial]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SerialConfig {
    /// Device path.
    pub device: PathBuf,
    /// Baud rate.
    pub baud: u32,
    /// Whether the diagnostics port is served.
    pub enabled: bool,
    /// Whether a technician may trigger actions that change state (rotate, retire).
    pub allow_privileged: bool,
    /// Technician public keys (`ed25519:BASE64`) whose tokens unlock privileged commands;
    /// firmware layer only.
    #[serde(deserialize_with = "parse_vec", serialize_with = "show_vec")]
    pub technician_keys: Vec<FleetKey>,
}

impl Default for SerialConfig {
    fn default() -> Self {
        SerialConfig {
            device: "/dev/ttyS0".into(),
            baud: 115_200,
            enabled: false,
            allow_privileged: false,
            technician_keys: Vec::new(),
        }
    }
}

/// `[fleet]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// Public keys whose signatures on bundles are trusted. Only the firmware layer may set it.
    #[serde(deserialize_with = "parse_vec", serialize_with = "show_vec")]
    pub trusted_keys: Vec<FleetKey>,
    /// The trust version of `trusted_keys` (firmware only): trust bundles at or below it are
    /// superseded by this firmware's set.
    pub trust_version: u64,
    /// Where the daemon picks up pushed bundles.
    pub spool_dir: PathBuf,
    /// The MQTT fleet channel (`[fleet.mqtt]`).
    pub mqtt: Option<crate::fleet_channel::MqttConfig>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            trusted_keys: Vec::new(),
            trust_version: 0,
            mqtt: None,
            spool_dir: "/var/lib/edge-signer/spool".into(),
        }
    }
}

/// `[paths]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    /// State: register, applied fleet bundles, exported certificates.
    pub state_dir: PathBuf,
}

impl Default for PathsConfig {
    fn default() -> Self {
        PathsConfig {
            state_dir: "/var/lib/edge-signer".into(),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// error, warn, info, debug, trace.
    pub level: LogLevel,
    /// text or json.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: LogLevel::Info,
            format: LogFormat::Text,
        }
    }
}

/// Log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum LogFormat {
    Text,
    Json,
}

/// `[notify]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// Command run for each event, with the event as JSON on stdin.
    pub exec: Option<PathBuf>,
}
impl Config {
    /// This device's id in fleet topics: `fleet.mqtt.device_id`, else the CN of the channel's
    /// identity (None without a channel or when neither is there; validation refuses an id
    /// that is not a safe topic level).
    pub fn fleet_device(&self) -> Option<String> {
        let m = self.fleet.mqtt.as_ref()?;
        m.device_id.clone().or_else(|| {
            self.identities
                .iter()
                .find(|i| i.name == m.identity)
                .map(|i| i.subject.cn.clone())
        })
    }
}
