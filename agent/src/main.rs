//! `edge-signer`: the command line.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use edge_signer::{http, tlsconf};
use hsm_shim::csr::{San, Subject};
use hsm_shim::{KeyRef, KeyType, Pin, PinSource, Pkcs11Uri, Token, TokenKey, TokenSelector};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "edge-signer",
    version,
    about = "Credential agent: keys in a PKCS#11 token, CSRs, mTLS identities"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Global {
    /// PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so)
    #[arg(long, global = true, env = "EDGE_SIGNER_MODULE")]
    module: Option<PathBuf>,
    /// Token label
    #[arg(long, global = true, env = "EDGE_SIGNER_TOKEN")]
    token: Option<String>,
    /// File holding the user PIN (never pass a PIN on the command line)
    #[arg(long, global = true, env = "EDGE_SIGNER_PIN_FILE")]
    pin_file: Option<PathBuf>,
    /// Firmware defaults layer
    #[arg(long, global = true, env = "EDGE_SIGNER_DEFAULTS", default_value = firmware_config::store::DEFAULTS_PATH)]
    defaults: PathBuf,
    /// Local overrides (agent.d/*.toml beside it are read too)
    #[arg(long, global = true, env = "EDGE_SIGNER_CONFIG", default_value = firmware_config::store::LOCAL_PATH)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create and list tokens
    #[command(subcommand)]
    Token(TokenCmd),
    /// Generate, list and destroy key pairs in the token
    #[command(subcommand)]
    Key(KeyCmd),
    /// Build a CSR signed by a token key
    Csr {
        /// Key URI (pkcs11:...)
        #[arg(long)]
        key: String,
        /// Subject, e.g. "O=Acme,OU=Gateways,CN=gw-01"
        #[arg(long)]
        subject: String,
        /// Subject alternative name: dns:NAME or ip:ADDRESS (repeatable)
        #[arg(long)]
        san: Vec<String>,
        /// Where to write the PEM CSR
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// One HTTPS request with mTLS through the token key; exit 0 only on a 2xx
    Probe {
        #[command(flatten)]
        id: Identity,
        /// CA bundle that the server's certificate must chain to
        #[arg(long)]
        ca: PathBuf,
        /// https://HOST:PORT/PATH
        #[arg(long)]
        url: String,
        /// TLS versions to offer
        #[arg(long, value_enum, default_value = "any")]
        tls: tlsconf::TlsVersions,
        /// Seconds before giving up
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// The daemon: reconcile with the token, then renew every identity at its deadlines
    Run,
    /// Every identity: state, generation, key, certificate, days left, next action
    Status {
        /// Also print every identity's state transitions
        #[arg(long)]
        timeline: bool,
        #[arg(long)]
        json: bool,
    },
    /// First enrolment of an identity; waits for the certificate, showing progress
    Enroll {
        name: String,
        /// Give up waiting after this many seconds (the enrolment resumes later)
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Rotate an identity when due (or now), waiting until the new generation is promoted
    Rotate {
        name: String,
        /// Rotate even if renewal is not due
        #[arg(long)]
        now: bool,
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Destroy the key objects of a replaced generation now
    Retire {
        name: String,
        #[arg(long)]
        generation: u32,
    },
    /// Mark a generation revoked and destroy its key (a revoked current one is replaced)
    Revoke {
        name: String,
        #[arg(long)]
        generation: u32,
    },
    /// Exit 0 if the identity should be renewed now, 1 if still valid, 2 on error
    NeedsRenewal { name: String },
    /// API credentials (JWK rotation): onboard the first key
    #[command(subcommand)]
    Jwk(JwkCmd),
    /// Sign with an identity's current key
    #[command(subcommand)]
    Jws(JwsCmd),
    /// Show, check and apply the device configuration
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Fleet-side tools: make a fleet key, sign a configuration bundle
    #[command(subcommand)]
    Fleet(FleetCmd),
    /// Serve HTTPS with the token key as the server identity (a diagnostic peer)
    TlsServe {
        #[command(flatten)]
        id: Identity,
        /// Require client certificates chaining to this CA bundle
        #[arg(long)]
        client_ca: Option<PathBuf>,
        /// Address to listen on; port 0 picks one (printed on stdout)
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
        /// Stop after this many connections
        #[arg(long)]
        max_connections: Option<u64>,
        #[arg(long, value_enum, default_value = "any")]
        tls: tlsconf::TlsVersions,
    },
}

#[derive(Args)]
struct Identity {
    /// Key URI (pkcs11:...)
    #[arg(long)]
    key: String,
    /// Certificate (PEM) of the key
    #[arg(long)]
    cert: PathBuf,
    /// Intermediate certificates (PEM) sent after the leaf
    #[arg(long)]
    chain: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Initialise a token in a free slot; the user PIN comes from --pin-file
    Init {
        #[arg(long)]
        label: String,
        /// File holding the security officer PIN
        #[arg(long)]
        so_pin_file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List tokens present in the module
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum JwkCmd {
    /// Make the first key of a jwk-rotation identity and print its public JWK for onboarding
    Export { name: String },
    /// Record the exported key as the current credential
    Activate {
        name: String,
        /// Its expiration as registered with the API (2027-11-01 or 2027-11-01T00:00:00Z)
        #[arg(long)]
        expires: String,
    },
}

#[derive(Subcommand)]
enum JwsCmd {
    /// Print a compact JWS (ES256, kid header) of a payload, signed by the current key
    Sign {
        name: String,
        /// Payload file ("-" for standard input; empty payload when absent)
        #[arg(long)]
        payload: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the effective configuration and the layer each value came from
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Check files as one configuration (the first as firmware defaults, the rest as local
    /// overrides, in order); prints every error at once
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Verify and apply a signed fleet bundle (atomic; the previous one is kept)
    Apply {
        bundle: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum FleetCmd {
    /// Make an Ed25519 fleet key pair: private key to FILE (mode 0600), public key to FILE.pub
    Keygen {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Sign a TOML payload into a bundle
    Sign {
        /// Fleet private key (PKCS#8 PEM, Ed25519 or P-256)
        #[arg(long)]
        key: PathBuf,
        /// Bundle version: must be greater than every version applied on the devices
        #[arg(long)]
        version: u64,
        /// The TOML payload
        file: PathBuf,
        /// Where to write the bundle
        #[arg(short, long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Generate a key pair inside the token; prints its URI
    Generate {
        #[arg(long = "type", value_parser = parse_key_type)]
        key_type: KeyType,
        #[arg(long)]
        label: String,
        #[arg(long)]
        json: bool,
    },
    /// List key pairs
    List {
        #[arg(long)]
        json: bool,
    },
    /// Destroy the private key, public key and certificate objects of a key
    Destroy {
        /// Key URI (pkcs11:...)
        uri: String,
        #[arg(long)]
        json: bool,
    },
}

fn parse_key_type(s: &str) -> Result<KeyType, String> {
    s.parse()
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGE_SIGNER_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

impl Global {
    fn module(&self, uri: Option<&Pkcs11Uri>) -> Result<PathBuf> {
        if let Some(m) = &self.module {
            return Ok(m.clone());
        }
        if let Some(m) = uri.and_then(|u| u.module_path.as_ref()) {
            return Ok(PathBuf::from(m));
        }
        bail!("no PKCS#11 module: pass --module PATH or set EDGE_SIGNER_MODULE (SoftHSM: /usr/lib/softhsm/libsofthsm2.so)")
    }

    fn pin(&self, uri: Option<&Pkcs11Uri>) -> Result<Pin> {
        let src = match (&self.pin_file, uri.and_then(|u| u.pin_source.as_ref())) {
            (Some(f), _) => PinSource::File(f.clone()),
            (None, Some(s)) => PinSource::File(PathBuf::from(s.strip_prefix("file:").unwrap_or(s))),
            (None, None) => return Err(hsm_shim::Error::PinRequired.into()),
        };
        Ok(src.read()?)
    }

    fn selector(&self, uri: Option<&Pkcs11Uri>) -> Result<TokenSelector> {
        if let Some(t) = &self.token {
            return Ok(TokenSelector::Label(t.clone()));
        }
        match uri {
            Some(Pkcs11Uri { token: Some(t), .. }) => Ok(TokenSelector::Label(t.clone())),
            Some(Pkcs11Uri {
                serial: Some(s), ..
            }) => Ok(TokenSelector::Serial(s.clone())),
            _ => bail!("no token: pass --token LABEL or set EDGE_SIGNER_TOKEN"),
        }
    }

    fn open_token(&self, uri: Option<&Pkcs11Uri>) -> Result<Arc<Token>> {
        let module = self.module(uri)?;
        let sel = self.selector(uri)?;
        let pin = self.pin(uri)?;
        Ok(Token::open(&module, &sel, Some(pin))?)
    }

    fn open_key(&self, uri: &str) -> Result<TokenKey> {
        let uri = Pkcs11Uri::parse(uri)?;
        let token = self.open_token(Some(&uri))?;
        Ok(TokenKey::open(token, &KeyRef::from_uri(&uri)?)?)
    }
}

fn print(json_out: bool, value: serde_json::Value, human: impl FnOnce() -> String) {
    if json_out {
        println!("{value:#}");
    } else {
        print!("{}", human());
    }
}

fn key_json(k: &hsm_shim::KeyInfo, token: &Token) -> serde_json::Value {
    json!({
        "uri": k.uri(token).to_string(),
        "id": hsm_shim::keys::hex(&k.id),
        "label": k.label,
        "type": k.key_type.as_str(),
        "has_cert": k.has_cert,
        "public_key_pem": k.spki_pem(),
    })
}

fn identity(
    g: &Global,
    id: &Identity,
) -> Result<(
    hsm_shim::TlsSigningKey,
    Arc<hsm_shim::rustls::sign::CertifiedKey>,
)> {
    let key = g.open_key(&id.key)?;
    let mut chain = tlsconf::load_certs(&id.cert)?;
    if let Some(c) = &id.chain {
        chain.extend(tlsconf::load_certs(c)?);
    }
    let signer = hsm_shim::TlsSigningKey::new(key);
    let ck = hsm_shim::tls::certified_key(signer.clone(), chain)
        .with_context(|| format!("refusing {} for key {}", id.cert.display(), id.key))?;
    Ok((signer, ck))
}

fn run(cli: Cli) -> Result<i32> {
    let g = &cli.global;
    match cli.cmd {
        Cmd::Token(TokenCmd::List { json }) => {
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
        Cmd::Token(TokenCmd::Init {
            label,
            so_pin_file,
            json,
        }) => {
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
        Cmd::Key(KeyCmd::Generate {
            key_type,
            label,
            json,
        }) => {
            let token = g.open_token(None)?;
            let k = token.generate_key(key_type, &label)?;
            print(json, key_json(&k, &token), || {
                format!("{}\n", k.uri(&token))
            });
        }
        Cmd::Key(KeyCmd::List { json }) => {
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
        Cmd::Key(KeyCmd::Destroy { uri, json }) => {
            let parsed = Pkcs11Uri::parse(&uri)?;
            let token = g.open_token(Some(&parsed))?;
            let id = match KeyRef::from_uri(&parsed)? {
                KeyRef::Id(id) => id,
                by_label => token.find_key(&by_label)?.id,
            };
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
        Cmd::Run => {
            edge_signer::daemon::run(&sources(g), &overrides(g))?;
        }
        Cmd::Status { json, timeline } => {
            let loaded = sources(g)
                .load()
                .map_err(|e| anyhow::anyhow!("the configuration is invalid:\n{e}"))?;
            let cfg = loaded.effective.config;
            let reg = edge_signer::register::RegisterFile::new(&cfg.paths.state_dir).load()?;
            let rows = edge_signer::lifecycle::status(
                &cfg,
                &reg,
                edge_signer::clock::Clock::now(&edge_signer::clock::SystemClock),
            );
            print(json, serde_json::to_value(&rows)?, || {
                let mut out = String::new();
                for r in &rows {
                    out += &format!("{} [{}]\n", r.name, r.state);
                    match r.generation {
                        Some(n) => {
                            out += &match &r.kid {
                                Some(kid) => format!("  generation {n}: kid {kid}\n"),
                                None => format!(
                                    "  generation {n}: serial {} sha256 {}\n",
                                    r.serial.as_deref().unwrap_or("-"),
                                    r.fingerprint.as_deref().unwrap_or("-")
                                ),
                            };
                            out += &format!("  key {}\n", r.key_uri.as_deref().unwrap_or("-"));
                            out += &format!(
                                "  valid until {} ({} days left)\n",
                                r.not_after.as_deref().unwrap_or("-"),
                                r.days_left.unwrap_or(0)
                            );
                        }
                        None => out += "  no current generation\n",
                    }
                    if let Some(p) = r.pending_generation {
                        out += &format!("  enrolling generation {p}\n");
                    }
                    out += &format!(
                        "  next: {}{}\n",
                        r.next_action,
                        r.next_at
                            .as_deref()
                            .map(|t| format!(" at {t}"))
                            .unwrap_or_default()
                    );
                    if let Some(e) = &r.last_error {
                        out += &format!("  last error: {e}\n");
                    }
                    if timeline {
                        for t in reg
                            .identities
                            .get(&r.name)
                            .map(|x| x.transitions.as_slice())
                            .unwrap_or_default()
                        {
                            out += &format!(
                                "    {}  g{:<3} {:<12} {}\n",
                                edge_signer::clock::rfc3339(t.at),
                                t.generation,
                                t.step.as_str(),
                                t.note
                            );
                        }
                    }
                }
                out
            });
        }
        Cmd::Enroll { name, timeout } => {
            let mut e = lifecycle_engine(g)?;
            if e.reg
                .identities
                .get(&name)
                .is_some_and(|r| r.current.is_some())
            {
                bail!("'{name}' is already enrolled; use `edge-signer rotate {name} --now` for a new generation");
            }
            e.force(&name)?;
            drive(&mut e, &name, timeout)?;
        }
        Cmd::Rotate { name, now, timeout } => {
            let mut e = lifecycle_engine(g)?;
            let rec = e.reg.identities.get(&name).cloned().unwrap_or_default();
            if now && rec.step == edge_signer::register::Step::Overlap && rec.pending.is_none() {
                // A new rotation cannot start while the old generation still overlaps: queue it.
                e.force(&name)?;
                for old in rec
                    .generations
                    .iter()
                    .filter(|g| g.status == edge_signer::register::GenStatus::Overlap)
                {
                    println!(
                        "{name}: generation {} overlaps with the current generation {} until {}; the rotation is queued and starts when the overlap ends (the daemon, or `edge-signer rotate {name}` then).\n  To start it sooner: `edge-signer retire {name} --generation {}` destroys the old key now, then `edge-signer rotate {name} --now`.",
                        old.number,
                        rec.current.unwrap_or(0),
                        old.overlap_until.map(edge_signer::clock::rfc3339).unwrap_or_default(),
                        old.number
                    );
                }
                return Ok(0);
            }
            if now {
                e.force(&name)?;
            } else if !e.needs_renewal(&name)? {
                let t = e
                    .renewal_time(&name)
                    .map(edge_signer::clock::rfc3339)
                    .unwrap_or_default();
                println!("{name}: renewal not due until {t}; use --now to rotate anyway");
                return Ok(0);
            }
            drive(&mut e, &name, timeout)?;
        }
        Cmd::Retire { name, generation } => {
            let mut e = lifecycle_engine(g)?;
            e.retire(&name, generation)?;
            println!(
                "{name}: generation {generation} retired; its key objects are gone from the token"
            );
        }
        Cmd::Revoke { name, generation } => {
            let mut e = lifecycle_engine(g)?;
            e.revoke(&name, generation)?;
            println!(
                "{name}: generation {generation} revoked; its key objects are gone from the token"
            );
        }
        Cmd::NeedsRenewal { name } => {
            let e = lifecycle_engine(g)?;
            return Ok(if e.needs_renewal(&name)? { 0 } else { 1 });
        }
        Cmd::Jwk(JwkCmd::Export { name }) => {
            let mut e = lifecycle_engine(g)?;
            let jwk = e.jwk_export(&name)?;
            println!("{jwk:#}");
        }
        Cmd::Jwk(JwkCmd::Activate { name, expires }) => {
            let at = edge_signer::clock::parse_date(&expires).map_err(|e| anyhow::anyhow!(e))?;
            let mut e = lifecycle_engine(g)?;
            e.jwk_activate(&name, at)?;
            println!(
                "{name}: credential active until {}",
                edge_signer::clock::rfc3339(at)
            );
        }
        Cmd::Jws(JwsCmd::Sign { name, payload }) => {
            let data = match payload.as_deref() {
                None => Vec::new(),
                Some(p) if p == Path::new("-") => {
                    let mut v = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)?;
                    v
                }
                Some(p) => {
                    std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?
                }
            };
            let e = lifecycle_engine(g)?;
            let (key, kid) = e.current_key(&name)?;
            println!(
                "{}",
                hsm_shim::jws::sign_compact(
                    &key,
                    hsm_shim::jws::JwsAlg::for_key(key.key_type()),
                    &kid,
                    &data
                )?
            );
        }
        Cmd::Config(c) => return config_cmd(g, c),
        Cmd::Fleet(f) => return fleet_cmd(f),
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
    }
    Ok(0)
}

fn serve(cfg: Arc<hsm_shim::rustls::ServerConfig>, listen: &str, max: Option<u64>) -> Result<()> {
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

/// Write a file through a temp file and rename, so a power cut never leaves half of it.
fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out")
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn sources(g: &Global) -> firmware_config::Sources {
    firmware_config::Sources {
        defaults: g.defaults.clone(),
        local: g.config.clone(),
    }
}

fn config_cmd(g: &Global, cmd: ConfigCmd) -> Result<i32> {
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

fn fleet_cmd(cmd: FleetCmd) -> Result<i32> {
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
            firmware_config::Layer::parse(
                firmware_config::LayerKind::Fleet,
                &file.display().to_string(),
                text,
            )?;
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

fn overrides(g: &Global) -> edge_signer::daemon::TokenOverride {
    edge_signer::daemon::TokenOverride {
        module: g.module.clone(),
        label: g.token.clone(),
        pin_file: g.pin_file.clone(),
    }
}

fn lifecycle_engine(g: &Global) -> Result<edge_signer::lifecycle::Engine> {
    let mut e = edge_signer::daemon::engine(
        &sources(g),
        &overrides(g),
        Arc::new(edge_signer::clock::SystemClock),
    )?;
    for note in e.reconcile()? {
        eprintln!("reconcile: {note}");
    }
    Ok(e)
}

fn drive(e: &mut edge_signer::lifecycle::Engine, name: &str, timeout: Option<u64>) -> Result<()> {
    edge_signer::daemon::drive_to_promotion(e, name, timeout.map(Duration::from_secs), |line| {
        eprintln!("{line}")
    })?;
    let rec = e.reg.identities.get(name).cloned().unwrap_or_default();
    let g = rec.current_gen().cloned();
    let which = match g.as_ref() {
        Some(g) if g.kid.is_some() => format!("kid {}", g.kid.as_deref().unwrap_or_default()),
        Some(g) => format!("serial {}", g.serial.as_deref().unwrap_or("-")),
        None => "none".into(),
    };
    println!(
        "{name}: generation {} is current ({which}, valid until {})",
        rec.current.unwrap_or(0),
        g.as_ref()
            .and_then(|g| g.not_after)
            .map(edge_signer::clock::rfc3339)
            .unwrap_or_default()
    );
    for old in rec
        .generations
        .iter()
        .filter(|g| g.status == edge_signer::register::GenStatus::Overlap)
    {
        println!(
            "  generation {} stays valid until {} (overlap), then its key is destroyed",
            old.number,
            old.overlap_until
                .map(edge_signer::clock::rfc3339)
                .unwrap_or_default()
        );
    }
    Ok(())
}
