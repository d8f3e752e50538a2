#![forbid(unsafe_code)]
use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use edge_signer::tlsconf;
use hsm_shim::KeyType;
use std::path::PathBuf;

mod cli;

/// `--version`: the release, the commit and the build date.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("EDGE_SIGNER_COMMIT"),
    ", built ",
    env!("EDGE_SIGNER_BUILD_DATE"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "edge-signer",
    version = VERSION,
    about = "Credential agent: keys in a PKCS#11 token, CSRs, mTLS identities"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
#[command(next_help_heading = "Global options (every command; each also from the environment)")]
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
    /// `[token]` of the configuration, loaded once when a command first needs it.
    #[arg(skip)]
    token_config: std::cell::OnceCell<Option<firmware_config::schema::TokenConfig>>,
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
        /// Machine-readable output (JSON)
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
        /// Machine-readable output (JSON)
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
        /// Machine-readable output (JSON)
        #[arg(long)]
        json: bool,
    },
    /// First enrolment of an identity; waits for the certificate, showing progress
    Enroll {
        /// The identity (its `name` in the configuration)
        name: String,
        /// Give up waiting after this many seconds (the enrolment resumes later)
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Rotate an identity when due (or now), waiting until the new generation is promoted
    Rotate {
        /// The identity (its `name` in the configuration)
        name: String,
        /// Rotate even if renewal is not due
        #[arg(long)]
        now: bool,
        /// Give up waiting after this many seconds (the rotation resumes later)
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Destroy the key objects of a replaced generation now
    Retire {
        /// The identity (its `name` in the configuration)
        name: String,
        /// The replaced generation (`status` lists them)
        #[arg(long)]
        generation: u32,
    },
    /// Mark a generation revoked and destroy its key (a revoked current one is replaced)
    Revoke {
        /// The identity (its `name` in the configuration)
        name: String,
        /// The generation to revoke (`status` lists them)
        #[arg(long)]
        generation: u32,
    },
    /// Exit 0 if the identity should be renewed now, 1 if still valid, 2 on error
    NeedsRenewal {
        /// The identity (its `name` in the configuration)
        name: String,
    },
    /// API credentials (JWK rotation): onboard the first key
    #[command(subcommand)]
    Jwk(JwkCmd),
    /// ACME issuers: move the CA account to a new token key
    #[command(subcommand)]
    Acme(AcmeCmd),
    /// Sign with an identity's current key
    #[command(subcommand)]
    Jws(JwsCmd),
    /// Show, check and apply the device configuration
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Fleet-side tools: keygen, sign (a configuration bundle), trust (rotate fleet keys), publish and status (the MQTT fleet channel)
    #[command(subcommand)]
    Fleet(FleetCmd),
    /// Technician diagnostics over a serial port: `diag --port /dev/ttyUSB0 [--json] [COMMAND]`
    /// (no COMMAND: interactive); `diag token --key K --device S --nonce N --allow rotate`
    /// makes a technician token
    Diag(DiagArgs),
    /// Write the man page (edge-signer.1) and bash, zsh and fish completions into a directory
    /// (what the package installs; made from these very definitions)
    #[command(hide = true)]
    Docs {
        /// The directory to write into
        #[arg(long)]
        out: PathBuf,
    },
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
        /// Label of the new token
        #[arg(long)]
        label: String,
        /// File holding the security officer PIN
        #[arg(long)]
        so_pin_file: PathBuf,
        /// Machine-readable output (JSON)
        #[arg(long)]
        json: bool,
    },
    /// List tokens present in the module
    List {
        /// Machine-readable output (JSON)
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AcmeCmd {
    /// Move the ACME account of ISSUER to a new key made in the token (keyChange), then
    /// destroy the old key; crash-safe: run it again to finish an interrupted one
    Rollover {
        /// The issuer (its `name` in the configuration)
        issuer: String,
        /// Machine-readable output (JSON)
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
        /// The identity (its `name` in the configuration)
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
        /// The identity (its `name` in the configuration)
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
        /// Machine-readable output (JSON)
        #[arg(long)]
        json: bool,
    },
    /// Check files as one configuration (the first as firmware defaults, the rest as local
    /// overrides, in order); prints every error at once
    Check {
        /// Configuration files: the firmware defaults first, then local overrides in order
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Machine-readable output (JSON)
        #[arg(long)]
        json: bool,
    },
    /// The fleet bundles on this device: which is in effect, which key signed it under which
    /// trust version, the trusted keys, and the lowest version a new bundle may have
    Status {
        /// Machine-readable output (JSON)
        #[arg(long)]
        json: bool,
    },
    /// Verify and apply a signed fleet bundle (atomic; the previous one is kept)
    Apply {
        /// The bundle file (edge-signer fleet sign / fleet trust)
        bundle: PathBuf,
        /// Machine-readable output (JSON)
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct BrokerArgs {
    /// mqtts://host:port
    #[arg(long)]
    broker: String,
    /// CA bundle of the broker
    #[arg(long)]
    ca: PathBuf,
    /// Operator certificate (PEM)
    #[arg(long)]
    cert: PathBuf,
    /// Operator private key (PEM)
    #[arg(long)]
    key: PathBuf,
    /// Topic prefix
    #[arg(long, default_value = "edge-signer")]
    prefix: String,
}

#[derive(Args)]
struct DiagArgs {
    /// The serial port the device's diagnostics are on
    #[arg(long)]
    port: Option<PathBuf>,
    #[arg(long, default_value_t = 115_200)]
    baud: u32,
    /// Answers as JSON (one object per answer)
    #[arg(long)]
    json: bool,
    /// Technician key (Ed25519 PKCS#8 PEM): with --port, authorise the session with a fresh
    /// token made from the banner's serial and nonce
    #[arg(long)]
    auth_key: Option<PathBuf>,
    /// `diag token`: the technician key
    #[arg(long)]
    key: Option<PathBuf>,
    /// `diag token`: the device serial (from the banner)
    #[arg(long)]
    device: Option<String>,
    /// `diag token`: the session nonce (from the banner)
    #[arg(long)]
    nonce: Option<String>,
    /// What the token allows: rotate, retire, apply-bundle, collect (repeat)
    #[arg(long)]
    allow: Vec<String>,
    /// Token lifetime (at most 1h)
    #[arg(long, default_value = "15m")]
    ttl: String,
    /// The command (status, identity NAME, token, config, clock, events N, version, rotate NAME,
    /// retire NAME GEN, apply-bundle FILE, collect), or `token`
    words: Vec<String>,
}

#[derive(Subcommand)]
enum FleetCmd {
    /// Make an Ed25519 fleet key pair: private key to FILE (mode 0600), public key to FILE.pub
    Keygen {
        /// Where to write the private key (the public key goes to FILE.pub)
        #[arg(long)]
        out: PathBuf,
        /// Machine-readable output (JSON)
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
        #[command(flatten)]
        audience: AudienceArgs,
    },
    /// Publish a signed bundle retained to a group (or one device) on the fleet's MQTT broker
    Publish {
        #[command(flatten)]
        broker: BrokerArgs,
        /// Group topic: <prefix>/group/NAME/bundle
        #[arg(long)]
        group: Option<String>,
        /// Device topic: <prefix>/ID/bundle
        #[arg(long)]
        device: Option<String>,
        /// The bundle (edge-signer fleet sign)
        file: PathBuf,
    },
    /// Every device's retained status, most urgent first
    Status {
        #[command(flatten)]
        broker: BrokerArgs,
        /// Machine-readable output (JSON)
        #[arg(long)]
        json: bool,
        /// Only devices with an identity expiring within this (e.g. 30d)
        #[arg(long)]
        expiring: Option<String>,
        /// How long to collect retained statuses
        #[arg(long, default_value = "2s")]
        wait: String,
    },
    /// Sign a trust bundle: the fleet keys that replace the trusted set on the devices
    /// (signed by a key they trust now; applied like any bundle)
    Trust {
        /// A fleet private key the devices trust now (PKCS#8 PEM)
        #[arg(long)]
        key: PathBuf,
        /// Trust version: greater than the devices' current trust version
        #[arg(long)]
        version: u64,
        /// A key to trust from now on (`ed25519:BASE64`, or a `.pub` file); repeat for several
        #[arg(long = "trusted", required = true)]
        trusted: Vec<String>,
        /// Where to write the trust bundle
        #[arg(short, long)]
        out: PathBuf,
        /// The configuration version the fleet continues from: devices reset their
        /// anti-rollback floor to it (recovery from a leaked key that signed a huge version)
        #[arg(long)]
        continue_from: Option<u64>,
        #[command(flatten)]
        audience: AudienceArgs,
    },
}

/// Who a bundle is for; signed into it. A device takes a bundle from the fleet channel only
/// when it is named here, by its id or one of its groups.
#[derive(clap::Args, Clone, Debug, Default)]
pub(crate) struct AudienceArgs {
    /// A device id the bundle is for (repeat for several)
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// A group the bundle is for (repeat for several)
    #[arg(long = "group")]
    pub groups: Vec<String>,
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Generate a key pair inside the token; prints its URI
    Generate {
        /// ec-p256, ec-p384, rsa-2048 or rsa-3072
        #[arg(long = "type", value_parser = parse_key_type)]
        key_type: KeyType,
        /// CKA_LABEL of the new key objects
        #[arg(long)]
        label: String,
        /// Machine-readable output (JSON)
        #[arg(long)]
        json: bool,
    },
    /// List key pairs
    List {
        /// Machine-readable output (JSON)
        #[arg(long)]
        json: bool,
    },
    /// Destroy the private key, public key and certificate objects of a key
    Destroy {
        /// Key URI (pkcs11:...)
        uri: String,
        /// Machine-readable output (JSON)
        #[arg(long)]
        json: bool,
    },
}

fn parse_key_type(s: &str) -> Result<KeyType, String> {
    s.parse()
}

fn main() {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let json = wants_json(&matches);
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // The daemon logs as its configuration says ([log]); a command, warnings only.
    let log = match cli.cmd {
        Cmd::Run => edge_signer::configuration::load(&cli::sources(&cli.global))
            .map(|l| l.effective.config.log)
            .unwrap_or_default(),
        _ => firmware_config::schema::LogConfig {
            level: firmware_config::schema::LogLevel::Warn,
            ..Default::default()
        },
    };
    edge_signer::logging::init(log.format, log.level);
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let text = format!("{e:#}");
            // A script that asked for JSON reads one object on stdout, not an empty output.
            if json {
                let value = serde_json::json!({ "error": text });
                println!(
                    "{}",
                    edge_signer::text::printable_json_text(&format!("{value:#}"))
                );
            }
            // Errors quote outside text (a config line, a CA's words): escaped for the terminal.
            eprintln!("error: {}", edge_signer::text::printable_lines(&text));
            std::process::exit(2);
        }
    }
}

/// `docs --out DIR`: the man page and the shell completions.
fn write_docs(out: &std::path::Path) -> Result<i32> {
    use anyhow::Context as _;
    use clap::CommandFactory as _;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    // edge-signer.1 and one page per subcommand (edge-signer-key-generate.1, ...), which the
    // main page's SUBCOMMANDS section names.
    clap_mangen::generate_to(Cli::command(), out)
        .with_context(|| format!("cannot write the man pages to {}", out.display()))?;
    for (shell, file) in [
        (clap_complete::Shell::Bash, "edge-signer.bash"),
        (clap_complete::Shell::Zsh, "_edge-signer"),
        (clap_complete::Shell::Fish, "edge-signer.fish"),
    ] {
        let mut f = std::fs::File::create(out.join(file))?;
        clap_complete::generate(shell, &mut Cli::command(), "edge-signer", &mut f);
    }
    println!("man pages and completions written to {}", out.display());
    Ok(0)
}

/// Whether the command line (at any subcommand level) asked for `--json`.
fn wants_json(m: &clap::ArgMatches) -> bool {
    matches!(m.try_get_one::<bool>("json"), Ok(Some(true)))
        || m.subcommand().is_some_and(|(_, sub)| wants_json(sub))
}

fn run(cli: Cli) -> Result<i32> {
    let g = &cli.global;
    match cli.cmd {
        Cmd::Config(c) => cli::config::config_cmd(g, c),
        Cmd::Fleet(f) => cli::config::fleet_cmd(f),
        Cmd::Diag(a) => cli::diag::diag_cmd(a),
        Cmd::Docs { out } => write_docs(&out),
        c @ (Cmd::Token(_)
        | Cmd::Key(_)
        | Cmd::Csr { .. }
        | Cmd::Probe { .. }
        | Cmd::TlsServe { .. }) => cli::keys::run(g, c),
        c => cli::lifecycle::run(g, c),
    }
}
