//! Configuration and fleet commands.

use super::*;

/// `config show`: every effective value and the layer it came from, and the trusted keys.
fn config_show(g: &Global, json: bool) -> Result<i32> {
    let loaded = edge_signer::configuration::load(&sources(g))?;
    for w in &loaded.warnings {
        eprintln!(
            "warning: {}",
            edge_signer::text::printable_lines(&w.to_string())
        );
    }
    let rows = firmware_config::store::show_rows(&loaded)?;
    let trust = sources(g).trust()?;
    print(
        json,
        json!({
            "fleet_version": loaded.fleet_version,
            "log_level_from": edge_signer::logging::level_source(&loaded.effective.config.log),
            "trust": {"version": trust.version, "source": trust.source,
                      "keys": trust.keys.iter().map(|k| k.to_string()).collect::<Vec<_>>()},
            "warnings": loaded.warnings.iter().chain(&trust.warnings).collect::<Vec<_>>(),
            "values": rows.iter().map(|(p, v, s)| json!({"path": p, "value": v, "source": s})).collect::<Vec<_>>(),
        }),
        || {
            let w = rows
                .iter()
                .map(|(p, v, _)| p.len() + v.len())
                .max()
                .unwrap_or(0)
                + 3;
            let mut out = format!(
                "# fleet bundle in effect: {}\n# trusted fleet keys: {} (trust v{}, from {})\n",
                if loaded.fleet_version == 0 {
                    "none".into()
                } else {
                    format!("v{}", loaded.fleet_version)
                },
                trust
                    .keys
                    .iter()
                    .map(|k| k.key_id())
                    .collect::<Vec<_>>()
                    .join(", "),
                trust.version,
                trust.source
            );
            out += &format!(
                "# the daemon logs at: {}\n",
                edge_signer::logging::level_source(&loaded.effective.config.log)
            );
            for w in &trust.warnings {
                out += &format!("# warning: {w}\n");
            }
            for (p, v, src) in &rows {
                out += &format!("{:<w$}# {src}\n", format!("{p} = {v}"));
            }
            out
        },
    );
    Ok(0)
}

/// `config status`: the fleet store, which key signed what.
fn config_status(g: &Global, json: bool) -> Result<i32> {
    let st = sources(g).fleet_status()?;
    print(json, serde_json::to_value(&st)?, || {
        let line = |what: &str, b: &Option<firmware_config::fleet_store::StoredBundle>| match b {
            None => format!("{what}: none\n"),
            Some(b) => format!(
                "{what}: v{} signed by fleet key {}, applied under trust v{}{}{}\n",
                b.version,
                b.signed_by,
                b.applied_under_trust
                    .map_or_else(|| "? (an older release)".into(), |t| t.to_string()),
                if b.audience.is_empty() {
                    String::new()
                } else {
                    format!(", for {}", b.audience.join(" "))
                },
                if b.verifies {
                    ""
                } else {
                    " (DOES NOT VERIFY: ignored)"
                }
            ),
        };
        let mut out = line("in effect", &st.current);
        out += &line("last known good", &st.last_known_good);
        out += &format!(
            "trust v{} (from {}): {}\n",
            st.trust_version,
            st.trust_source,
            st.trusted.join(", ")
        );
        if let Some(c) = st.continue_from {
            out += &format!(
                "versions continue from v{c} (trust v{})\n",
                st.trust_version
            );
        }
        out += &format!("next bundle must be above v{}\n", st.floor);
        out
    });
    Ok(0)
}

pub(crate) fn config_cmd(g: &Global, cmd: ConfigCmd) -> Result<i32> {
    use firmware_config::{layers, Layer, LayerKind};
    match cmd {
        ConfigCmd::Show { json } => config_show(g, json),
        ConfigCmd::Status { json } => config_status(g, json),
        ConfigCmd::Check { files, json } => {
            let mut errors = Vec::new();
            let mut layers_ok = Vec::new();
            for (i, f) in files.iter().enumerate() {
                let kind = if i == 0 {
                    LayerKind::Firmware
                } else {
                    LayerKind::Local
                };
                match Layer::read(kind, f) {
                    Ok(Some(l)) => layers_ok.push(l),
                    Ok(None) => errors.push(format!("{}: file not found", f.display())),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            let mut summary = None;
            if errors.is_empty() {
                // Every error at once: types, cross-field checks, and the files it names.
                let (config, found) = layers::check_all(&layers_ok);
                errors.extend(found.iter().map(|x| x.to_string()));
                if let Some(c) = config {
                    errors.extend(
                        firmware_config::validate::files(&c)
                            .into_iter()
                            .map(|(at, why)| format!("{at}: {why}")),
                    );
                    summary = Some((c.identities.len(), c.issuers.len()));
                }
            }
            print(
                json,
                json!({"ok": errors.is_empty(), "errors": errors}),
                || match summary.filter(|_| errors.is_empty()) {
                    Some((ids, iss)) => format!(
                        "ok: {} file(s), {ids} identities, {iss} issuers\n",
                        files.len()
                    ),
                    None => format!("{}\n{} error(s)\n", errors.join("\n"), errors.len()),
                },
            );
            Ok(if errors.is_empty() { 0 } else { 1 })
        }
        ConfigCmd::Apply { bundle, json } => {
            let bytes = std::fs::read(&bundle)
                .with_context(|| format!("cannot read {}", bundle.display()))?;
            let refused = |e: String| {
                anyhow::anyhow!("bundle {} refused; nothing changed: {e}", bundle.display())
            };
            // While the daemon owns the state, it applies the bundle (and reloads at once).
            let r: firmware_config::Applied = match super::lifecycle::daemon_owner(g)? {
                Some(owner) => {
                    serde_json::from_value(owner.call("POST", "/v1/config/apply", bytes).map_err(
                        |e| anyhow::anyhow!("bundle {} not applied: {e:#}", bundle.display()),
                    )?)?
                }
                None => sources(g)
                    .apply_any(&bytes)
                    .map_err(|e| refused(e.to_string()))?,
            };
            print(json, serde_json::to_value(&r)?, || applied_text(&r));
            Ok(0)
        }
    }
}

/// What `config apply` says a person.
fn applied_text(r: &firmware_config::Applied) -> String {
    use firmware_config::Applied;
    match r {
        Applied::Config(c) if c.already_in_effect => {
            return format!(
                "fleet bundle v{} is already in effect (signed by fleet key {}); nothing changed\n",
                c.version, c.key_id
            )
        }
        Applied::Trust(t) if t.already_in_effect => {
            return format!(
                "trust bundle v{} is already in effect; nothing changed\n",
                t.version
            )
        }
        _ => {}
    }
    let r = match r {
        Applied::Trust(t) => {
            let mut out = format!(
                "applied trust bundle v{} (signed by fleet key {}, replacing trust v{})\ntrusted now:\n",
                t.version, t.key_id, t.previous
            );
            t.trusted.iter().for_each(|k| out += &format!("  {k}\n"));
            t.removed
                .iter()
                .for_each(|k| out += &format!("  no longer trusted: {k}\n"));
            return out;
        }
        Applied::Config(r) => r,
    };
    let mut out = format!(
        "applied fleet bundle v{} (signed by fleet key {}){}\n",
        r.version,
        r.key_id,
        if r.previous == 0 {
            String::new()
        } else {
            format!(", replacing v{} (kept as last-known-good)", r.previous)
        }
    );
    if r.changes.is_empty() {
        out += "no value changed\n";
    }
    for c in &r.changes {
        out += &format!(
            "  {}: {} -> {}\n",
            c.path,
            c.old.as_deref().unwrap_or("(unset)"),
            c.new.as_deref().unwrap_or("(unset)")
        );
    }
    out
}

fn fleet_signer(key: &std::path::Path) -> Result<firmware_config::FleetSigner> {
    let pem = zeroize::Zeroizing::new(
        std::fs::read_to_string(key).with_context(|| format!("cannot read {}", key.display()))?,
    );
    Ok(firmware_config::FleetSigner::from_pem(&pem)?)
}

impl From<BrokerArgs> for edge_signer::fleet::operator::Broker {
    fn from(b: BrokerArgs) -> Self {
        edge_signer::fleet::operator::Broker {
            url: b.broker,
            ca: b.ca,
            cert: b.cert,
            key: b.key,
            prefix: b.prefix,
        }
    }
}

/// `fleet status`: one line a device, most urgent first.
fn fleet_status(
    b: edge_signer::fleet::operator::Broker,
    json: bool,
    expiring: Option<String>,
    wait: &str,
) -> Result<i32> {
    let secs = |s: &str| -> Result<u64> {
        let d: firmware_config::Duration = s.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        Ok(d.secs())
    };
    let mut rows = edge_signer::fleet::operator::status(&b, Duration::from_secs(secs(wait)?))?;
    if let Some(e) = expiring {
        let days = (secs(&e)? / 86_400) as i64;
        rows.retain(|r| r.days_left.is_some_and(|d| d <= days));
    }
    print(json, serde_json::to_value(&rows)?, || {
        let mut out = String::new();
        for r in &rows {
            out += &format!(
                "{:<24} {:<8} config v{:<4} {:>5} days left{}\n",
                // What devices published: `print` shows control characters escaped.
                r.device,
                match r.online {
                    Some(true) => "online",
                    Some(false) => "OFFLINE",
                    None => "?",
                },
                r.config_version.unwrap_or(0),
                r.days_left
                    .map(|d| d.to_string())
                    .unwrap_or_else(|| "-".into()),
                r.last_error
                    .as_deref()
                    .map(|e| format!("  last error: {e}"))
                    .unwrap_or_default()
            );
        }
        if rows.is_empty() {
            out += "no device status on this broker under this prefix\n";
        }
        out
    });
    Ok(0)
}

/// The audience a person named, checked as devices will parse it.
fn audience(a: &crate::AudienceArgs) -> Result<Vec<firmware_config::Audience>> {
    let named = a
        .devices
        .iter()
        .map(|d| format!("device:{d}"))
        .chain(a.groups.iter().map(|g| format!("group:{g}")));
    named
        .map(|n| n.parse().map_err(|e: String| anyhow::anyhow!("{e}")))
        .collect()
}

/// " for device:a group:b", or a note that only the local CLI and spool will take it.
fn audience_note(audience: &[firmware_config::Audience]) -> String {
    if audience.is_empty() {
        " (no audience: devices take it only from `config apply` or the spool, never from MQTT; name --device/--group)".into()
    } else {
        let names: Vec<String> = audience.iter().map(|a| a.to_string()).collect();
        format!(" for {}", names.join(" "))
    }
}

/// What `fleet trust` signs.
struct TrustArgs<'a> {
    key: &'a Path,
    version: u64,
    trusted: &'a [String],
    continue_from: Option<u64>,
    audience: Vec<firmware_config::Audience>,
    out: &'a Path,
}

/// `fleet trust`: a trust bundle naming the keys devices trust from now on.
fn sign_trust(a: TrustArgs) -> Result<i32> {
    let TrustArgs {
        key,
        version,
        trusted,
        continue_from,
        audience,
        out,
    } = a;
    let signer = fleet_signer(key)?;
    let mut keys = Vec::new();
    for t in trusted {
        let text = match std::fs::read_to_string(t) {
            Ok(file) => file.trim().to_owned(),
            Err(_) => t.clone(),
        };
        let k: firmware_config::FleetKey = text
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--trusted {t}: {e}"))?;
        keys.push(format!("\"{k}\""));
    }
    let mut payload = format!("trusted_keys = [{}]\n", keys.join(", "));
    if let Some(c) = continue_from {
        payload += &format!("continue_from = {c}\n");
    }
    let bundle = signer.sign_kind(
        firmware_config::BundleKind::Trust,
        version,
        &audience,
        payload.as_bytes(),
    )?;
    write_file(out, &bundle)?;
    println!(
        "signed trust bundle v{version} ({} key(s)) with fleet key {}{} -> {}",
        keys.len(),
        signer.public().key_id(),
        audience_note(&audience),
        out.display()
    );
    Ok(0)
}

/// `fleet keygen`: an Ed25519 fleet key, private to FILE (0600), public to FILE.pub.
fn fleet_keygen(out: &Path, json: bool) -> Result<i32> {
    use firmware_config::FleetSigner;
    if out.exists() {
        bail!(
            "{} exists; refusing to overwrite a fleet key",
            out.display()
        );
    }
    let (pem, public) = FleetSigner::generate_ed25519()?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        f.write_all(pem.as_bytes())?;
        f.sync_all()?;
    }
    let pub_path = PathBuf::from(format!("{}.pub", out.display()));
    write_file(&pub_path, format!("{public}\n").as_bytes())?;
    print(
        json,
        json!({"private_key": out, "public_key": public.to_string(), "key_id": public.key_id()}),
        || {
            format!(
            "fleet key {} written to {} (keep it off the devices)\npin it in the firmware defaults:\n  [fleet]\n  trusted_keys = [\"{public}\"]\n",
            public.key_id(),
            out.display()
        )
        },
    );
    Ok(0)
}

pub(crate) fn fleet_cmd(cmd: FleetCmd) -> Result<i32> {
    match cmd {
        FleetCmd::Keygen { out, json } => fleet_keygen(&out, json),
        FleetCmd::Sign {
            key,
            version,
            file,
            out,
            audience: to,
        } => {
            let to = audience(&to)?;
            let signer = fleet_signer(&key)?;
            let payload =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            // Refuse to sign what a device would refuse to parse.
            let text = std::str::from_utf8(&payload).context("the payload is not UTF-8")?;
            let layer = firmware_config::Layer::parse(
                firmware_config::LayerKind::Fleet,
                &file.display().to_string(),
                text,
            )?;
            let scope = firmware_config::layers::fleet_scope_errors(&layer);
            if !scope.is_empty() {
                bail!(
                    "refusing to sign what every device would refuse:\n{}",
                    scope
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            let bundle =
                signer.sign_kind(firmware_config::BundleKind::Config, version, &to, &payload)?;
            write_file(&out, &bundle)?;
            println!(
                "signed {} as bundle v{version} with fleet key {}{} -> {}",
                file.display(),
                signer.public().key_id(),
                audience_note(&to),
                out.display()
            );
            Ok(0)
        }
        FleetCmd::Publish {
            broker,
            group,
            device,
            file,
        } => {
            let topic = edge_signer::fleet::operator::publish(
                &broker.into(),
                group.as_deref(),
                device.as_deref(),
                &file,
            )?;
            println!("published {} retained to {topic}", file.display());
            Ok(0)
        }
        FleetCmd::Status {
            broker,
            json,
            expiring,
            wait,
        } => fleet_status(broker.into(), json, expiring, &wait),
        FleetCmd::Trust {
            key,
            version,
            trusted,
            out,
            continue_from,
            audience: to,
        } => sign_trust(TrustArgs {
            key: &key,
            version,
            trusted: &trusted,
            continue_from,
            audience: audience(&to)?,
            out: &out,
        }),
    }
}
