//! Checks that span fields: names resolve and are unique, windows fit, bounds hold.

use crate::config_error::{origin_of, ConfigError};
use crate::schema::{Config, IssuerConfig, RenewAt};
use crate::units::Duration;
use std::collections::{BTreeMap, HashSet};

pub use crate::names::safe_name;

/// A CA bundle file the daemon will need: readable now, and holding at least one PEM
/// certificate (a reload that names a missing file is refused instead of half-applied).
pub fn pem_certificates_in(path: &std::path::Path) -> Result<(), String> {
    let text = std::fs::read(path).map_err(|e| {
        format!(
            "cannot read {}: {e}; the file must exist and be readable by the daemon's user",
            path.display()
        )
    })?;
    if !text
        .windows(27)
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(())
}

/// A file the daemon will read: there and readable now.
fn readable(path: &std::path::Path) -> Result<(), String> {
    std::fs::File::open(path).map(drop).map_err(|e| {
        format!(
            "cannot read {}: {e}; the file must exist and be readable by the daemon's user",
            path.display()
        )
    })
}

/// A directory where the daemon makes a socket or file: there, or makeable under a
/// directory that is there.
fn dir_for(path: &std::path::Path) -> Result<(), String> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let mut d = Some(dir);
    while let Some(here) = d {
        if here.is_dir() {
            return Ok(());
        }
        if here.exists() {
            return Err(format!("{} is not a directory", here.display()));
        }
        d = here.parent();
    }
    Ok(())
}

/// The files the daemon will read that are missing or unreadable now, as (field path,
/// reason): `config check` reports them, the daemon warns of them at start and reload (a
/// proxy whose `server_ca` cannot be read is reported down; everything else serves).
pub fn files(c: &Config) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut check = |at: String, r: Result<(), String>| {
        if let Err(e) = r {
            out.push((at, e));
        }
    };
    if let Some(crate::schema::PinConfig::File(f)) = &c.token.pin {
        check("token.pin.file".into(), readable(f));
    }
    for (i, iss) in c.issuers.iter().enumerate() {
        let (ca, boot) = match iss {
            IssuerConfig::Est(e) => (&e.ca_bundle, e.bootstrap.as_ref()),
            IssuerConfig::Portal(p) => (&p.ca_bundle, None),
            IssuerConfig::JwkRotation(j) => (&j.ca_bundle, None),
            IssuerConfig::Acme(a) => {
                if let Some(s) = &a.server_ca {
                    check(format!("issuer[{i}].server_ca"), pem_certificates_in(s));
                }
                if let Some(e) = &a.eab {
                    check(format!("issuer[{i}].eab.hmac_file"), readable(&e.hmac_file));
                }
                (&a.ca_bundle, None)
            }
            IssuerConfig::Scep(sc) => {
                if let Some(s) = &sc.server_ca {
                    check(format!("issuer[{i}].server_ca"), pem_certificates_in(s));
                }
                if let Some(crate::schema::PinConfig::File(f)) = &sc.challenge {
                    check(format!("issuer[{i}].challenge.file"), readable(f));
                }
                (&sc.ca_bundle, None)
            }
        };
        check(format!("issuer[{i}].ca_bundle"), pem_certificates_in(ca));
        if let Some(b) = boot {
            if let Some(f) = &b.password_file {
                check(format!("issuer[{i}].bootstrap.password_file"), readable(f));
            }
            if let Some(f) = &b.cert {
                check(
                    format!("issuer[{i}].bootstrap.cert"),
                    pem_certificates_in(f),
                );
            }
        }
    }
    for (i, id) in c.identities.iter().enumerate() {
        if let Some(f) = &id.probe_ca {
            check(format!("identity[{i}].probe_ca"), pem_certificates_in(f));
        }
    }
    for (i, p) in c.proxies.iter().enumerate() {
        if !p.server_ca.as_os_str().is_empty() {
            check(
                format!("proxy[{i}].server_ca"),
                pem_certificates_in(&p.server_ca),
            );
        }
        if let Ok(crate::serving::Listen::Unix(path)) = p.listen_addr() {
            check(format!("proxy[{i}].listen"), dir_for(&path));
        }
    }
    if c.api.enabled {
        check("api.socket".into(), dir_for(&c.api.socket));
    }
    if let Some(m) = &c.fleet.mqtt {
        if !m.server_ca.as_os_str().is_empty() {
            check(
                "fleet.mqtt.server_ca".into(),
                pem_certificates_in(&m.server_ca),
            );
        }
    }
    out
}

/// Every cross-field error, each naming its file and field path.
pub fn check(c: &Config, origins: &BTreeMap<String, String>) -> Vec<ConfigError> {
    let mut errs = Vec::new();
    let mut err = |path: String, reason: String| {
        errs.push(ConfigError {
            file: origin_of(origins, &path, None),
            path,
            reason,
        })
    };
    check_token(c, &mut err);
    check_issuers(c, &mut err);
    let mut names = HashSet::new();
    for (i, id) in c.identities.iter().enumerate() {
        let p = format!("identity[{i}]");
        if id.name.is_empty() {
            err(format!("{p}.name"), "must not be empty".into());
        } else if !safe_name(&id.name) {
            err(
                format!("{p}.name"),
                format!("'{}' is not a safe name: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with '.' or '-'); it names files and key labels", id.name),
            );
        } else if !names.insert(id.name.as_str()) {
            err(
                format!("{p}.name"),
                format!("identity name '{}' is used twice", id.name),
            );
        }
        check_identity(c, id, &p, origins, &mut err);
    }
    if c.serial.baud == 0 {
        err("serial.baud".into(), "must be more than 0".into());
    }
    serving(c, &mut err);
    fleet_channel(c, &mut err);
    errs
}

type ErrSink<'a> = &'a mut dyn FnMut(String, String);

fn check_token(c: &Config, err: ErrSink) {
    if c.token.module.is_none() {
        err(
            "token.module".into(),
            "missing: the PKCS#11 module path (e.g. /usr/lib/softhsm/libsofthsm2.so)".into(),
        );
    }
    match (&c.token.label, &c.token.serial) {
        (None, None) => err(
            "token.label".into(),
            "missing: give token.label or token.serial".into(),
        ),
        (Some(_), Some(_)) => err(
            "token.serial".into(),
            "give token.label or token.serial, not both".into(),
        ),
        _ => {}
    }
    if c.token.pin.is_none() {
        err(
            "token.pin".into(),
            "missing: where the PIN is read from, e.g. pin = { file = \"/etc/edge-signer/pin\" }"
                .into(),
        );
    }
}

fn check_issuers(c: &Config, err: ErrSink) {
    let mut issuer_names = HashSet::new();
    for (i, iss) in c.issuers.iter().enumerate() {
        let p = format!("issuer[{i}]");
        if iss.name().is_empty() {
            err(format!("{p}.name"), "must not be empty".into());
        } else if !safe_name(iss.name()) {
            err(
                format!("{p}.name"),
                format!("'{}' is not a safe name: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with '.' or '-'); it names files", iss.name()),
            );
        } else if !issuer_names.insert(iss.name()) {
            err(
                format!("{p}.name"),
                format!("issuer name '{}' is used twice", iss.name()),
            );
        }
        match iss {
            IssuerConfig::JwkRotation(j) => {
                if j.new_key_lifetime > Duration::days(365) {
                    err(
                        format!("{p}.new_key_lifetime"),
                        format!("{} is more than the API allows (365d)", j.new_key_lifetime),
                    );
                }
                if j.old_key_overlap > Duration::days(14) {
                    err(
                        format!("{p}.old_key_overlap"),
                        format!(
                            "{} is more than the API allows (14d; 24h to 72h recommended)",
                            j.old_key_overlap
                        ),
                    );
                }
                if !j.url.starts_with("https://") {
                    err(format!("{p}.url"), "must be an https:// URL".into());
                }
            }
            IssuerConfig::Est(e) if !e.url.starts_with("https://") => {
                err(format!("{p}.url"), "must be an https:// URL".into())
            }
            IssuerConfig::Acme(a) => check_acme(&p, a, err),
            IssuerConfig::Scep(sc)
                if !(sc.url.starts_with("http://") || sc.url.starts_with("https://")) =>
            {
                err(
                    format!("{p}.url"),
                    "must be an http:// or https:// URL".into(),
                )
            }
            IssuerConfig::Portal(po) if po.inbox == po.outbox => err(
                format!("{p}.inbox"),
                "must differ from outbox (CSRs and certificates would mix)".into(),
            ),
            _ => {}
        }
    }
}

/// `kind = "acme"`: an https directory, at least one challenge (each once), listen
/// addresses that parse, a hook for dns-01, an account key type ACME signs with.
fn check_acme(p: &str, a: &crate::issuers::AcmeIssuer, err: ErrSink) {
    use crate::issuers::Challenge;
    if !a.directory.starts_with("https://") {
        err(format!("{p}.directory"), "must be an https:// URL".into());
    }
    if a.challenges.is_empty() {
        err(
            format!("{p}.challenges"),
            "names no challenge: give at least one of \"http-01\", \"tls-alpn-01\", \"dns-01\""
                .into(),
        );
    } else if (1..a.challenges.len()).any(|i| a.challenges[..i].contains(&a.challenges[i])) {
        err(format!("{p}.challenges"), "names a challenge twice".into());
    }
    for (field, addr, c) in [
        ("http01_listen", &a.http01_listen, Challenge::Http01),
        (
            "tls_alpn01_listen",
            &a.tls_alpn01_listen,
            Challenge::TlsAlpn01,
        ),
    ] {
        if a.challenges.contains(&c) && addr.parse::<std::net::SocketAddr>().is_err() {
            err(format!("{p}.{field}"), format!("'{addr}' is not IP:PORT"));
        }
    }
    if a.challenges.contains(&Challenge::Dns01) && a.dns01_hook.is_none() {
        err(
            format!("{p}.dns01_hook"),
            "missing: dns-01 needs a command that sets the TXT record (or leave dns-01 out of challenges)".into(),
        );
    }
    if a.account_key_type == hsm_shim::KeyType::Rsa3072 {
        err(
            format!("{p}.account_key_type"),
            "must be ec-p256 (ES256), ec-p384 (ES384) or rsa-2048 (RS256)".into(),
        );
    }
}

/// One identity's fields beyond its name (`p` is its path, e.g. `identity[0]`).
fn check_identity(
    c: &Config,
    id: &crate::schema::IdentityConfig,
    p: &str,
    origins: &BTreeMap<String, String>,
    err: ErrSink,
) {
    if id.subject.cn.trim().is_empty() {
        err(
            format!("{p}.subject.cn"),
            "missing: every identity needs a CN".into(),
        );
    }
    match c.issuers.iter().find(|x| x.name() == id.issuer) {
        None => {
            let known: Vec<&str> = c.issuers.iter().map(|x| x.name()).collect();
            let known = if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            };
            err(
                format!("{p}.issuer"),
                format!("'{}' names no [[issuer]] (issuers: {known})", id.issuer),
            )
        }
        Some(IssuerConfig::Scep(_)) if id.key_type.is_ec() => err(
            format!("{p}.key_type"),
            format!(
                "{} cannot be used with a scep issuer: the CA encrypts its answer to the key, so it must be RSA (rsa-2048 or rsa-3072)",
                id.key_type
            ),
        ),
        Some(IssuerConfig::JwkRotation(_)) if id.key_type != hsm_shim::KeyType::EcP256 => err(
            format!("{p}.key_type"),
            format!(
                "{} cannot be used with a jwk-rotation issuer: it rotates EC P-256 keys only",
                id.key_type
            ),
        ),
        _ => {}
    }
    check_renewal(id, p, origins, err);
    if id.usage.is_empty() {
        err(
            format!("{p}.usage"),
            "must name at least one of client, server".into(),
        );
    }
    if let Some(u) = &id.probe_url {
        if !u.starts_with("https://") {
            err(format!("{p}.probe_url"), "must be an https:// URL".into());
        }
    }
}

fn check_renewal(
    id: &crate::schema::IdentityConfig,
    p: &str,
    origins: &BTreeMap<String, String>,
    err: ErrSink,
) {
    let r = &id.renewal;
    if r.before.is_some() && r.at.is_some() {
        let at_from = origin_of(origins, &format!("{p}.renewal.at"), None);
        err(format!("{p}.renewal.before"), format!("renewal.at is also set (in {at_from}): give renewal.before or renewal.at, not both"));
    }
    if let RenewAt::Before(window) = r.renew_at() {
        if id.overlap >= window {
            err(
                format!("{p}.overlap"),
                format!(
                    "{} must be shorter than the renewal window ({window} before expiry)",
                    id.overlap
                ),
            );
        }
    }
    if r.retry_min > r.retry_max {
        err(
            format!("{p}.renewal.retry_min"),
            format!("{} is longer than retry_max ({})", r.retry_min, r.retry_max),
        );
    }
    if r.retry_min.secs() == 0 {
        err(
            format!("{p}.renewal.retry_min"),
            "must be more than 0s".into(),
        );
    }
}
/// Cross-field checks of `[api]` and `[[proxy]]`.
pub(crate) fn serving(c: &Config, err: &mut dyn FnMut(String, String)) {
    let identities: Vec<&str> = c.identities.iter().map(|i| i.name.as_str()).collect();
    api(c, &identities, err);
    proxies(c, &identities, err);
    kx_list("tls.kx".into(), &c.tls.kx, err);
    for (i, p) in c.proxies.iter().enumerate() {
        if let Some(kx) = &p.kx {
            kx_list(format!("proxy[{i}].kx"), kx, err);
        }
    }
}

/// A `kx` list offers at least one group, each once.
fn kx_list(at: String, kx: &[crate::tls::KxGroup], err: &mut dyn FnMut(String, String)) {
    if kx.is_empty() {
        err(at, "names no group: give at least one, for example [\"X25519MLKEM768\", \"X25519\", \"secp256r1\"] (the default) or [\"X25519\", \"secp256r1\"] for classic only".into());
    } else if (1..kx.len()).any(|i| kx[..i].contains(&kx[i])) {
        err(at, "names a group twice".into());
    }
}

fn api(c: &Config, identities: &[&str], err: &mut dyn FnMut(String, String)) {
    for (i, r) in c.api.rules.iter().enumerate() {
        for name in &r.identities {
            if name != "*" && !identities.contains(&name.as_str()) {
                err(
                    format!("api.allow[{i}].identities"),
                    format!("'{name}' names no [[identity]]"),
                );
            }
        }
        if r.uids.is_empty() && r.gids.is_empty() {
            err(
                format!("api.allow[{i}]"),
                "names no caller: give uids or gids".into(),
            );
        }
    }
    for (field, zero) in [
        ("max_request_bytes", c.api.max_request_bytes == 0),
        (
            "max_concurrent_per_caller",
            c.api.max_concurrent_per_caller == 0,
        ),
        ("max_connections", c.api.max_connections == 0),
        (
            "max_connections_per_caller",
            c.api.max_connections_per_caller == 0,
        ),
        ("header_timeout", c.api.header_timeout.0 == 0),
        ("body_timeout", c.api.body_timeout.0 == 0),
    ] {
        if zero {
            err(format!("api.{field}"), "must be more than 0".into());
        }
    }
    if let Some(addr) = &c.api.metrics_listen {
        match addr.parse::<std::net::SocketAddr>() {
            Err(_) => err(
                "api.metrics_listen".into(),
                format!("'{addr}' is not IP:PORT"),
            ),
            Ok(a) if !a.ip().is_loopback() && !c.api.unsafe_metrics_listen => err(
                "api.metrics_listen".into(),
                format!("'{addr}' is not loopback: every host that reaches it would read this device's metrics; use 127.0.0.1:PORT (or set api.unsafe_metrics_listen = true)"),
            ),
            Ok(_) => {}
        }
    }
}

fn proxies(c: &Config, identities: &[&str], err: &mut dyn FnMut(String, String)) {
    let mut names = std::collections::HashSet::new();
    for (i, p) in c.proxies.iter().enumerate() {
        let at = |f: &str| format!("proxy[{i}].{f}");
        if !safe_name(&p.name) {
            err(at("name"), format!("'{}' is not a safe name", p.name));
        } else if !names.insert(p.name.as_str()) {
            err(at("name"), format!("'{}' is used twice", p.name));
        }
        match p.listen_addr() {
            Err(e) => err(at("listen"), e),
            Ok(crate::serving::Listen::Tcp(_)) if !p.allowed_uids.is_empty() || !p.allowed_gids.is_empty() => err(
                at("allowed_uids"),
                format!("'{}' is a TCP address, which cannot tell callers apart: allowed_uids and allowed_gids need a Unix socket path in listen", p.listen),
            ),
            Ok(_) => {}
        }
        if !p.target.contains(':') {
            err(at("target"), format!("'{}' is not host:port", p.target));
        }
        if !identities.contains(&p.identity.as_str()) {
            err(
                at("identity"),
                format!("'{}' names no [[identity]]", p.identity),
            );
        }
        if p.server_ca.as_os_str().is_empty() {
            err(
                at("server_ca"),
                "missing: the CA bundle the server must chain to".into(),
            );
        }
        for (field, zero) in [
            ("max_connections", p.max_connections == 0),
            ("idle_timeout", p.idle_timeout.0 == 0),
            ("connect_timeout", p.connect_timeout.0 == 0),
        ] {
            if zero {
                err(at(field), "must be more than 0".into());
            }
        }
    }
}

/// Cross-field checks of `[fleet.mqtt]`.
pub(crate) fn fleet_channel(c: &Config, err: &mut dyn FnMut(String, String)) {
    let Some(m) = &c.fleet.mqtt else { return };
    if let Err(e) = m.host_port() {
        err("fleet.mqtt.broker".into(), e);
    }
    if !c.identities.iter().any(|i| i.name == m.identity) {
        err(
            "fleet.mqtt.identity".into(),
            format!("'{}' names no [[identity]]", m.identity),
        );
    }
    if m.server_ca.as_os_str().is_empty() {
        err(
            "fleet.mqtt.server_ca".into(),
            "missing: the CA bundle the broker must chain to".into(),
        );
    }
    if !crate::fleet_channel::topic_safe(&m.topic_prefix) {
        err(
            "fleet.mqtt.topic_prefix".into(),
            "must be a topic without + # or leading/trailing /".into(),
        );
    }
    match (&m.device_id, c.fleet_device()) {
        (Some(d), _) if !safe_name(d) => err(
            "fleet.mqtt.device_id".into(),
            format!("'{d}' is not a safe name: use 1 to 64 of A-Z a-z 0-9 . _ - (it is a topic level, and the broker's ACL matches it with the certificate's CN)"),
        ),
        (None, Some(cn)) if !safe_name(&cn) => err(
            "fleet.mqtt.device_id".into(),
            format!("unset, so the device id would be the CN of identity '{}', '{cn}', which is not a safe topic level (no / + # or empty; 1 to 64 of A-Z a-z 0-9 . _ -): set fleet.mqtt.device_id", m.identity),
        ),
        _ => {}
    }
    if let Some(n) = &m.server_name {
        if n.is_empty() || n.contains(['/', ' ', ':']) {
            err(
                "fleet.mqtt.server_name".into(),
                format!("'{n}' is not a DNS name or IP address"),
            );
        }
    }
    for g in &m.groups {
        if !safe_name(g) {
            err(
                "fleet.mqtt.groups".into(),
                format!("'{g}' is not a safe name"),
            );
        }
    }
}
