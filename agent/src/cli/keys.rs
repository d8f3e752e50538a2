//! Token, key, CSR, probe and tls-serve commands: the token used directly.

use super::*;

/// Run a token-level command.
pub(crate) fn run(g: &Global, cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Token(t) => token_cmd(g, t)?,
        Cmd::Key(k) => key_cmd(g, k)?,
        Cmd::Csr {
            key,
            subject,
            san,
            out,
            json,
        } => {
            let subject = Subject::parse(&subject)?;
            let sans = san
                .iter()
                .map(|s| s.parse::<San>())
                .collect::<Result<Vec<_>, _>>()?;
            let k = g.open_key(&key)?;
            let pem = hsm_shim::csr::build_csr(&k, &subject, &sans)?;
            write_file(&out, pem.as_bytes())?;
            print(
                json,
                json!({"out": out, "subject": subject.to_string(), "sans": sans.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "key": key}),
                || format!("wrote CSR for {subject} to {}\n", out.display()),
            );
        }
        Cmd::Probe {
            id,
            ca,
            url,
            tls,
            timeout,
            json,
        } => {
            let url = http::parse_https(&url)?;
            let (signer, ck) = identity(g, &id)?;
            let cfg = tlsconf::client_config(Some(ck), tlsconf::load_roots(&ca)?, tls)?;
            let resp = http::get(Arc::new(cfg), &url, Duration::from_secs(timeout))
                .with_context(|| format!("probe of {url} failed"))?;
            let scheme = signer.last_scheme().map(|s| format!("{s:?}"));
            let ok = (200..300).contains(&resp.status);
            print(
                json,
                json!({"status": resp.status, "ok": ok, "protocol": resp.protocol, "cipher_suite": resp.cipher_suite, "client_signature_scheme": scheme}),
                || {
                    format!(
                    "status {} ({})\nprotocol {}\ncipher suite {}\nclient signature scheme {}\n",
                    resp.status,
                    if ok { "ok" } else { "not 2xx" },
                    resp.protocol,
                    resp.cipher_suite,
                    scheme.as_deref().unwrap_or("none (server asked for no client certificate)")
                )
                },
            );
            return Ok(if ok { 0 } else { 1 });
        }
        Cmd::TlsServe {
            id,
            client_ca,
            listen,
            max_connections,
            tls,
        } => {
            let (_, ck) = identity(g, &id)?;
            let roots = client_ca.as_deref().map(tlsconf::load_roots).transpose()?;
            let cfg = Arc::new(tlsconf::server_config(ck, roots, tls)?);
            serve(cfg, &listen, max_connections)?;
        }
        _ => bail!("internal: not a token command"),
    }
    Ok(0)
}

/// `token list`, `token init`.
fn token_cmd(g: &Global, cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::List { json } => {
            let tokens = hsm_shim::token::list_tokens(&g.module(None)?)?;
            let v: Vec<_> = tokens
                .iter()
                .map(|t| json!({"slot": t.slot, "label": t.label, "serial": t.serial, "manufacturer": t.manufacturer, "model": t.model, "initialized": t.initialized, "user_pin_initialized": t.user_pin_initialized}))
                .collect();
            print(json, json!(v), || {
                let mut s = String::new();
                for t in &tokens {
                    if t.initialized {
                        s += &format!(
                            "slot {:<12} label {:<20} serial {} ({} {})\n",
                            t.slot, t.label, t.serial, t.manufacturer, t.model
                        );
                    } else {
                        s += &format!("slot {:<12} (uninitialised)\n", t.slot);
                    }
                }
                s
            });
        }
        TokenCmd::Init {
            label,
            so_pin_file,
            json,
        } => {
            let so = PinSource::File(so_pin_file).read()?;
            let user = g.pin(None)?;
            let t = hsm_shim::token::init_token(&g.module(None)?, &label, &so, &user)?;
            print(
                json,
                json!({"slot": t.slot, "label": t.label, "serial": t.serial}),
                || {
                    format!(
                        "initialised token '{}' (serial {}) in slot {}\n",
                        t.label, t.serial, t.slot
                    )
                },
            );
        }
    }
    Ok(())
}

/// `key generate`, `key list`, `key destroy`.
fn key_cmd(g: &Global, cmd: KeyCmd) -> Result<()> {
    match cmd {
        KeyCmd::Generate {
            key_type,
            label,
            json,
        } => {
            let token = g.open_token(None)?;
            let k = token.generate_key(key_type, &label)?;
            print(json, key_json(&k, &token), || {
                format!("{}\n", k.uri(&token))
            });
        }
        KeyCmd::List { json } => {
            let token = g.open_token(None)?;
            let keys = token.list_keys()?;
            print(
                json,
                json!(keys.iter().map(|k| key_json(k, &token)).collect::<Vec<_>>()),
                || {
                    keys.iter()
                        .map(|k| {
                            format!(
                                "{:<9} {:<24} {}{}\n",
                                k.key_type,
                                k.label,
                                k.uri(&token),
                                if k.has_cert { " (cert)" } else { "" }
                            )
                        })
                        .collect()
                },
            );
        }
        KeyCmd::Destroy { uri, json } => {
            let parsed = Pkcs11Uri::parse(&uri)?;
            let token = g.open_token(Some(&parsed))?;
            let id = match KeyRef::from_uri(&parsed)? {
                KeyRef::Id(id) => id,
                by_label => token.find_key(&by_label)?.id,
            };
            refuse_a_served_key(g, &id)?;
            let n = token.destroy(&id)?;
            print(
                json,
                json!({"destroyed": n, "id": hsm_shim::keys::hex(&id)}),
                || {
                    format!(
                        "destroyed {n} object(s) with id {}; none left\n",
                        hsm_shim::keys::hex(&id)
                    )
                },
            );
        }
    }
    Ok(())
}

pub(crate) fn serve(
    cfg: Arc<hsm_shim::rustls::ServerConfig>,
    listen: &str,
    max: Option<u64>,
) -> Result<()> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!("listening on {}", listener.local_addr()?);
    let mut served = 0u64;
    for stream in listener.incoming() {
        let cfg = cfg.clone();
        let Ok(tcp) = stream else { continue };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
        let result = (|| -> Result<()> {
            let conn = hsm_shim::rustls::ServerConnection::new(cfg)?;
            let mut tls = hsm_shim::rustls::StreamOwned::new(conn, tcp);
            let mut buf = [0u8; 2048];
            let _ = tls.read(&mut buf)?;
            let body = format!("edge-signer tls-serve: {:?}\n", tls.conn.protocol_version());
            tls.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )?;
            tls.conn.send_close_notify();
            tls.flush()?;
            Ok(())
        })();
        if let Err(e) = result {
            eprintln!("connection failed: {e:#}");
        }
        served += 1;
        if max.is_some_and(|m| served >= m) {
            break;
        }
    }
    Ok(())
}

/// `key destroy` of a key a running daemon holds for an identity's generation: refused, with
/// the command that does it through the daemon. A token module may keep its objects per
/// process (tpm2-pkcs11 reads its store once), so only the daemon itself can make sure that
/// none of its signers uses the key afterwards.
fn refuse_a_served_key(g: &Global, id: &[u8]) -> Result<()> {
    let Ok(Some(owner)) = super::lifecycle::daemon_owner(g) else {
        return Ok(());
    };
    let register = edge_signer::register::RegisterFile::new(&owner.dir).load()?;
    if let Some((name, generation)) = register.live_generation_with_key(id) {
        anyhow::bail!(
            "the key is generation {generation} of identity '{name}', which the daemon (pid {}) holds: \
             destroy it through the daemon, so none of its signers keeps it: \
             `edge-signer retire {name} --generation {generation}` (a replaced generation) or \
             `edge-signer revoke {name} --generation {generation}` (the current one)",
            owner.holder.pid
        );
    }
    Ok(())
}
