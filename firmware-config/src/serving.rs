//! What the daemon serves to other processes on the box: the local signing API (`[api]`,
//! with its caller policy) and mTLS egress proxies (`[[proxy]]`). Firmware or local layers
//! only: a fleet bundle can set none of it.

use crate::units::Duration;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What a caller of the API may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// List identities (name, key URI, not-after, state).
    List,
    /// Fetch an identity's certificate chain.
    Chain,
    /// Sign a payload or a digest.
    Sign,
    /// Make a compact JWS.
    Jws,
    /// Read `/metrics`.
    Metrics,
    /// Read the daemon's status.
    Status,
    /// Ask for a rotation.
    Rotate,
    /// Retire a generation (destroys its key).
    Retire,
    /// Revoke a generation (destroys its key at once).
    Revoke,
    /// Apply a signed fleet bundle.
    Apply,
}

impl Operation {
    /// As written in the config and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::List => "list",
            Operation::Chain => "chain",
            Operation::Sign => "sign",
            Operation::Jws => "jws",
            Operation::Metrics => "metrics",
            Operation::Status => "status",
            Operation::Rotate => "rotate",
            Operation::Retire => "retire",
            Operation::Revoke => "revoke",
            Operation::Apply => "apply",
        }
    }
}

/// One rule of the API policy: callers (by uid or gid) × identities × operations.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiRule {
    /// Caller uids this rule covers.
    pub uids: Vec<u32>,
    /// Caller gids (primary group, from SO_PEERCRED) this rule covers.
    pub gids: Vec<u32>,
    /// Identity names, or `"*"` for all.
    pub identities: Vec<String>,
    /// Operations allowed.
    pub operations: Vec<Operation>,
}

impl ApiRule {
    /// Whether this rule lets (uid, gid) do `op` on `identity` (None: not about one identity).
    pub fn allows(&self, uid: u32, gid: u32, op: Operation, identity: Option<&str>) -> bool {
        (self.uids.contains(&uid) || self.gids.contains(&gid))
            && self.operations.contains(&op)
            && identity.is_none_or(|name| self.identities.iter().any(|i| i == "*" || i == name))
    }
}

/// `[api]`: the local signing API on a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Serve the API (the daemon only).
    pub enabled: bool,
    /// Unix socket of the API (created by the daemon, mode 0666: the policy decides).
    pub socket: PathBuf,
    /// Who may do what; nobody else may do anything (no implicit root).
    #[serde(rename = "allow")]
    pub rules: Vec<ApiRule>,
    /// Largest request body accepted.
    pub max_request_bytes: usize,
    /// Requests one caller (uid) may have in flight at once.
    pub max_concurrent_per_caller: usize,
    /// Time a client has to send a request's headers (slow clients are cut off).
    pub header_timeout: Duration,
    /// Time an allowed client has to send a request's body once its headers are in.
    pub body_timeout: Duration,
    /// Open API connections at most, all callers together; more are closed at once.
    pub max_connections: usize,
    /// Open API connections one uid may hold; more are closed at once.
    pub max_connections_per_caller: usize,
    /// Optional TCP listener for `/metrics` only (`127.0.0.1:9464`); loopback unless
    /// `unsafe_metrics_listen`.
    pub metrics_listen: Option<String>,
    /// Allow a `metrics_listen` address that is not loopback.
    pub unsafe_metrics_listen: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: false,
            socket: "/run/edge-signer/api.sock".into(),
            rules: Vec::new(),
            max_request_bytes: 64 * 1024,
            max_concurrent_per_caller: 16,
            header_timeout: Duration(5),
            body_timeout: Duration(10),
            max_connections: 256,
            max_connections_per_caller: 64,
            metrics_listen: None,
            unsafe_metrics_listen: false,
        }
    }
}

/// `[[proxy]]`: plain TCP in on the box, mTLS with the token identity out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Name (logs, metrics).
    pub name: String,
    /// A Unix socket path, or `127.0.0.1:PORT` / `[::1]:PORT`.
    pub listen: String,
    /// Allow a `listen` address that is not loopback (say why in a comment).
    pub unsafe_listen: bool,
    /// `host:port` of the server.
    pub target: String,
    /// The identity presented.
    pub identity: String,
    /// CA bundle the server's certificate must chain to.
    pub server_ca: PathBuf,
    /// Name checked in the server's certificate (default: the host of `target`).
    pub server_name: Option<String>,
    /// Caller uids allowed on a Unix socket (the daemon's own uid always is).
    pub allowed_uids: Vec<u32>,
    /// Caller gids allowed on a Unix socket.
    pub allowed_gids: Vec<u32>,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Connecting to the target and the TLS handshake must end within this long (a
    /// target that accepts and then says nothing would hold the caller).
    pub connect_timeout: Duration,
    /// Open connections at most; more wait in the listen backlog.
    pub max_connections: usize,
    /// Keep one spare connection to the target, handshake done, for the next caller
    /// (made after each connection, dropped after 10 s unused).
    pub preconnect: bool,
    /// Key exchange groups offered to the target, most preferred first (default: `[tls] kx`).
    pub kx: Option<Vec<crate::tls::KxGroup>>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            name: String::new(),
            listen: String::new(),
            unsafe_listen: false,
            target: String::new(),
            identity: String::new(),
            server_ca: PathBuf::new(),
            server_name: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            idle_timeout: Duration(300),
            connect_timeout: Duration(30),
            max_connections: 64,
            preconnect: false,
            kx: None,
        }
    }
}

/// Where a proxy listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(std::net::SocketAddr),
}

impl ProxyConfig {
    /// Parse `listen`: an absolute path, or a loopback `IP:PORT` (any IP with
    /// `unsafe_listen`).
    pub fn listen_addr(&self) -> Result<Listen, String> {
        if self.listen.starts_with('/') {
            return Ok(Listen::Unix(self.listen.clone().into()));
        }
        let addr: std::net::SocketAddr = self.listen.parse().map_err(|_| {
            format!(
                "'{}' is neither an absolute socket path nor IP:PORT",
                self.listen
            )
        })?;
        if !addr.ip().is_loopback() && !self.unsafe_listen {
            return Err(format!(
                "'{}' is not loopback: every host that reaches it would use this device's identity; use 127.0.0.1:PORT or a socket path (or set unsafe_listen = true)",
                self.listen
            ));
        }
        Ok(Listen::Tcp(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_name_callers_identities_and_operations_no_implicit_root() {
        let r = ApiRule {
            uids: vec![1001],
            gids: vec![],
            identities: vec!["gw".into()],
            operations: vec![Operation::Sign],
        };
        assert!(r.allows(1001, 50, Operation::Sign, Some("gw")));
        assert!(
            !r.allows(0, 0, Operation::Sign, Some("gw")),
            "root is not implied"
        );
        assert!(!r.allows(1001, 50, Operation::Sign, Some("other")));
        assert!(!r.allows(1001, 50, Operation::Rotate, Some("gw")));
    }

    #[test]
    fn listen_is_loopback_or_a_path_unless_said_otherwise() {
        let mut p = ProxyConfig {
            listen: "0.0.0.0:8443".into(),
            ..Default::default()
        };
        assert!(p.listen_addr().is_err());
        p.unsafe_listen = true;
        assert!(p.listen_addr().is_ok());
        p.listen = "/run/edge-signer/mqtt.sock".into();
        assert!(matches!(p.listen_addr(), Ok(Listen::Unix(_))));
        p.listen = "127.0.0.1:1883".into();
        p.unsafe_listen = false;
        assert!(matches!(p.listen_addr(), Ok(Listen::Tcp(_))));
    }

    #[test]
    fn uid_lists_need_a_unix_socket_and_metrics_stay_on_loopback() {
        let mut c = crate::schema::Config::default();
        c.proxies.push(ProxyConfig {
            name: "p".into(),
            listen: "127.0.0.1:8080".into(),
            allowed_uids: vec![1000],
            ..Default::default()
        });
        c.api.metrics_listen = Some("0.0.0.0:9464".into());
        let mut errors = Vec::new();
        crate::validate::serving(&c, &mut |at, why| errors.push(format!("{at}: {why}")));
        let has = |errors: &[String], p: &str| errors.iter().any(|e| e.starts_with(p));
        assert!(
            has(
                &errors,
                "proxy[0].allowed_uids: '127.0.0.1:8080' is a TCP address"
            ),
            "{errors:?}"
        );
        assert!(
            has(
                &errors,
                "api.metrics_listen: '0.0.0.0:9464' is not loopback"
            ),
            "{errors:?}"
        );
        c.api.unsafe_metrics_listen = true;
        c.proxies[0].listen = "/run/edge-signer/p.sock".into();
        errors.clear();
        crate::validate::serving(&c, &mut |at, why| errors.push(format!("{at}: {why}")));
        assert!(
            !has(&errors, "proxy[0].allowed_uids") && !has(&errors, "api.metrics_listen"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_zero_limit_is_named_by_its_own_field() {
        let mut c = crate::schema::Config::default();
        c.proxies.push(ProxyConfig {
            connect_timeout: Duration(0),
            max_connections: 0,
            ..Default::default()
        });
        let mut errors = Vec::new();
        crate::validate::serving(&c, &mut |at, why| errors.push(format!("{at}: {why}")));
        assert!(
            errors.contains(&"proxy[0].connect_timeout: must be more than 0".to_owned()),
            "{errors:?}"
        );
        assert!(
            errors.contains(&"proxy[0].max_connections: must be more than 0".to_owned()),
            "{errors:?}"
        );
        assert!(
            !errors.iter().any(|e| e.contains("idle_timeout")),
            "{errors:?}"
        );
    }
}
