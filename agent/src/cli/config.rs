//! Configuration and fleet commands.

use super::*;

pub(crate) fn config_cmd(g: &Global, cmd: ConfigCmd) -> Result<i32> {
    use firmware_config::{layers, Layer, LayerKind};
    match cmd {
        ConfigCmd::Show { json } => {
            let loaded = sources(g)
                .load()
                .map_err(|e| anyhow::anyhow!("the configuration is invalid:\n{e}"))?;
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            // The typed config, so built-in defaults show too, each with its origin.
            let full: toml::Table = toml::Table::try_from(&loaded.effective.config)?;
            let rows: Vec<(String, String, String)> = firmware_config::store::leaves(&full)
                .into_iter()
                .map(|(path, value)| {
                    let source = loaded
                        .effective
                        .origins
                        .get(&path)
                        .cloned()
                        .unwrap_or_else(|| "built-in default".into());
                    let value = if layers::redacted(&path) {
                        "\"<redacted>\"".to_owned()
                    } else {
                        value
                    };
                    (path, value, source)
                })
                .collect();
            print(
                json,
                json!({
                    "fleet_version": loaded.fleet_version,
                    "warnings": loaded.warnings,
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
                        "# fleet bundle in effect: {}\n",
                        if loaded.fleet_version == 0 {
                            "none".into()
                        } else {
                            format!("v{}", loaded.fleet_version)
                        }
                    );
                    for (p, v, src) in &rows {
                        out += &format!("{:<w$}# {src}\n", format!("{p} = {v}"));
                    }
                    out
                },
            );
            Ok(0)
        }
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
                match layers::resolve(&layers_ok) {
                    Ok(eff) => {
                        summary = Some((eff.config.identities.len(), eff.config.issuers.len()))
                    }
                    Err(e) => errors.extend(e.0.iter().map(|x| x.to_string())),
                }
            }
            print(
                json,
                json!({"ok": errors.is_empty(), "errors": errors}),
                || match summary {
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
            let r = sources(g).apply(&bytes).map_err(|e| {
                anyhow::anyhow!("bundle {} refused; nothing changed: {e}", bundle.display())
            })?;
            print(json, serde_json::to_value(&r)?, || {
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
            });
            Ok(0)
        }
    }
}

pub(crate) fn fleet_cmd(cmd: FleetCmd) -> Result<i32> {
    use firmware_config::FleetSigner;
    match cmd {
        FleetCmd::Keygen { out, json } => {
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
                    .open(&out)
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
        FleetCmd::Sign {
            key,
            version,
            file,
            out,
        } => {
            let pem = zeroize::Zeroizing::new(
                std::fs::read_to_string(&key)
                    .with_context(|| format!("cannot read {}", key.display()))?,
            );
            let signer = FleetSigner::from_pem(&pem)?;
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
            let bundle = signer.sign(version, &payload)?;
            write_file(&out, &bundle)?;
            println!(
                "signed {} as bundle v{version} with fleet key {} -> {}",
                file.display(),
                signer.public().key_id(),
                out.display()
            );
            Ok(0)
        }
    }
}
