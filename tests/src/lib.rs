//! Test helpers: a throwaway SoftHSM token per test, the real `edge-signer` binary, openssl.
//! Each `Env` has its own temp dir and SOFTHSM2_CONF, passed only to the processes it starts,
//! so tests run in parallel and leave nothing behind.

use serde_json::Value;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The user PIN of test tokens (tests check it never shows up in output).
pub const USER_PIN: &str = "864213";
/// The SO PIN of test tokens.
pub const SO_PIN: &str = "97531";
/// The label of test tokens.
pub const LABEL: &str = "gw-test";

/// The SoftHSM module.
pub fn module() -> PathBuf {
    for p in [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    ] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("SoftHSM not installed: run scripts/setup");
}

/// The `edge-signer` binary built beside this test.
pub fn bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let b = dir.join("edge-signer");
    assert!(
        b.exists(),
        "{} missing: run `cargo build --bins` first (scripts/test does)",
        b.display()
    );
    b
}

/// One test's world: a temp dir holding a SoftHSM token, PIN files, and whatever the test writes.
pub struct Env {
    /// The temp dir (removed on drop).
    pub dir: tempfile::TempDir,
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    /// A fresh token, initialised through `edge-signer token init`.
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path();
        std::fs::create_dir(p.join("tokens")).expect("tokens dir");
        std::fs::write(
            p.join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n",
                p.display()
            ),
        )
        .expect("conf");
        std::fs::write(p.join("pin"), format!("{USER_PIN}\n")).expect("pin");
        std::fs::write(p.join("so-pin"), SO_PIN).expect("so pin");
        let env = Env { dir };
        env.ok(&[
            "token",
            "init",
            "--label",
            LABEL,
            "--so-pin-file",
            &env.path_str("so-pin"),
        ]);
        env
    }

    /// A path inside the temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The same, as a string.
    pub fn path_str(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// Environment for anything that opens the token (edge-signer, pkcs11-tool).
    pub fn envs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SOFTHSM2_CONF", self.path_str("softhsm2.conf")),
            ("EDGE_SIGNER_MODULE", module().display().to_string()),
            ("EDGE_SIGNER_TOKEN", LABEL.to_owned()),
            ("EDGE_SIGNER_PIN_FILE", self.path_str("pin")),
            ("EDGE_SIGNER_LOG", "trace".to_owned()),
            ("EDGE_SIGNER_DEFAULTS", self.path_str("defaults.toml")),
            ("EDGE_SIGNER_CONFIG", self.path_str("etc/agent.toml")),
        ]
    }

    /// `edge-signer` with this env, run in the temp dir.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(bin());
        c.current_dir(self.dir.path())
            .envs(self.envs())
            .stdin(Stdio::null());
        c
    }

    /// Run edge-signer; returns the output whatever the exit code. Checks the PIN never shows.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd().args(args).output().expect("run edge-signer");
        for stream in [&out.stdout, &out.stderr] {
            let s = String::from_utf8_lossy(stream);
            assert!(
                !s.contains(USER_PIN) && !s.contains(SO_PIN),
                "a PIN appeared in the output of {args:?}:\n{s}"
            );
        }
        out
    }

    /// Run edge-signer, insist on success, return stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "edge-signer {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run edge-signer with `--json` appended and parse stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let s = self.ok(&a);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}):\n{s}"))
    }

    /// Run edge-signer, insist on failure, return stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "edge-signer {args:?} should have failed"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Generate a key; returns its URI.
    pub fn generate(&self, key_type: &str, label: &str) -> String {
        self.json(&["key", "generate", "--type", key_type, "--label", label])["uri"]
            .as_str()
            .expect("uri")
            .to_owned()
    }

    /// `pkcs11-tool --list-objects` of the token (logged in).
    pub fn pkcs11_objects(&self) -> String {
        let out = Command::new("pkcs11-tool")
            .args([
                "--module",
                &module().display().to_string(),
                "--token-label",
                LABEL,
                "--login",
                "--pin",
                USER_PIN,
                "--list-objects",
            ])
            .envs(self.envs())
            .output()
            .expect("pkcs11-tool (opensc) is installed by scripts/setup");
        assert!(
            out.status.success(),
            "pkcs11-tool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run openssl in the temp dir; insist on success; return stdout+stderr.
    pub fn openssl(&self, args: &[&str]) -> String {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("openssl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "openssl {args:?} failed:\n{text}");
        text
    }

    /// A test CA made by openssl (an implementation independent of ours): ca.pem / ca.key.
    pub fn make_ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ]);
    }

    /// Sign a CSR with the CA into `out` (PEM), copying the CSR's SANs.
    pub fn sign_csr(&self, ca: &str, csr: &str, out: &str) {
        std::fs::write(self.path("ext.cnf"), "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth,serverAuth\n").expect("ext");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            "7",
            "-days",
            "1",
            "-copy_extensions",
            "copy",
            "-extfile",
            "ext.cnf",
            "-out",
            out,
        ]);
    }

    /// An openssl-made key and certificate for 127.0.0.1, signed by `ca`: `{name}.key`/`{name}.pem`.
    pub fn openssl_leaf(&self, ca: &str, name: &str) {
        self.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ]);
        self.sign_csr(ca, &format!("{name}.csr"), &format!("{name}.pem"));
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Wait until something accepts on the port.
pub fn wait_port(port: u16) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nothing listens on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How the test CA answers the portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaMode {
    /// Sign the CSR as asked.
    Good,
    /// Sign it with another subject.
    WrongSubject,
    /// Sign it already expired.
    Expired,
    /// Sign it valid only from next year.
    NotYetValid,
    /// Sign it with a CA the device does not trust.
    ForeignCa,
    /// Answer with a certificate for another key.
    WrongKey,
    /// Sign it without the SANs.
    NoSans,
}

/// A test CA (openssl) answering a portal outbox into an inbox from a background thread.
pub struct PortalCa {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mode: std::sync::Arc<std::sync::Mutex<CaMode>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl PortalCa {
    /// Start answering `outbox` into `inbox` with the CA `ca` ({ca}.pem/{ca}.key in `dir`).
    pub fn start(dir: &Path, ca: &str, outbox: &Path, inbox: &Path, mode: CaMode) -> PortalCa {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mode = std::sync::Arc::new(std::sync::Mutex::new(mode));
        let (dir, ca, outbox, inbox) = (
            dir.to_owned(),
            ca.to_owned(),
            outbox.to_owned(),
            inbox.to_owned(),
        );
        let (s2, m2) = (stop.clone(), mode.clone());
        let handle = std::thread::spawn(move || {
            let mut done = std::collections::HashSet::new();
            while !s2.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(rd) = std::fs::read_dir(&outbox) {
                    for e in rd.flatten() {
                        let p = e.path();
                        let name = p
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        if !name.ends_with(".csr.pem") || done.contains(&name) {
                            continue;
                        }
                        done.insert(name.clone());
                        let mode = *m2.lock().unwrap();
                        sign_for_portal(
                            &dir,
                            &ca,
                            &p,
                            &inbox.join(name.replace(".csr.pem", ".crt")),
                            mode,
                        );
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        PortalCa {
            stop,
            mode,
            handle: Some(handle),
        }
    }

    /// Change how the next CSRs are answered.
    pub fn set_mode(&self, m: CaMode) {
        *self.mode.lock().unwrap() = m;
    }
}

impl Drop for PortalCa {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn sign_for_portal(dir: &Path, ca: &str, csr: &Path, out: &Path, mode: CaMode) {
    let run = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let ext = dir.join("portal-ext.cnf");
    std::fs::write(&ext, "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth,serverAuth\n").expect("ext");
    let (ca_name, csr_path) = match mode {
        CaMode::ForeignCa => {
            if !dir.join("foreign-ca.pem").exists() {
                run(&[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    "foreign-ca.key",
                    "-out",
                    "foreign-ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=foreign-ca",
                ]);
            }
            ("foreign-ca".to_owned(), csr.display().to_string())
        }
        CaMode::WrongKey | CaMode::WrongSubject => {
            // Another key (WrongKey) or the same key under another subject (WrongSubject).
            let other = dir.join("other.csr");
            if mode == CaMode::WrongKey {
                run(&[
                    "req",
                    "-new",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    "other.key",
                    "-out",
                    &other.display().to_string(),
                    "-subj",
                    "/CN=other",
                ]);
            } else {
                run(&[
                    "req",
                    "-in",
                    &csr.display().to_string(),
                    "-out",
                    &other.display().to_string(),
                ]);
            }
            (ca.to_owned(), other.display().to_string())
        }
        _ => (ca.to_owned(), csr.display().to_string()),
    };
    std::fs::create_dir_all(out.parent().expect("inbox")).expect("inbox");
    let tmp = out.with_extension("tmp");
    if let Some((start, end)) = match mode {
        CaMode::Expired => Some(("20200101000000Z", "20200201000000Z")),
        CaMode::NotYetValid => Some(("20990101000000Z", "20991231000000Z")),
        _ => None,
    } {
        // openssl 3.0's `x509 -req` cannot set dates; `openssl ca` can.
        let db = dir.join("ca-db");
        std::fs::create_dir_all(db.join("new")).expect("ca db");
        std::fs::write(db.join("index.txt"), "").expect("index");
        std::fs::write(db.join("serial"), format!("{:08X}\n", 4096 + rand_serial()))
            .expect("serial");
        let cnf = db.join("ca.cnf");
        std::fs::write(
            &cnf,
            format!(
                "[ca]\ndefault_ca = d\n[d]\ndatabase = {0}/index.txt\nnew_certs_dir = {0}/new\nserial = {0}/serial\ndefault_md = sha256\npolicy = p\ncopy_extensions = copy\nunique_subject = no\n[p]\ncommonName = supplied\norganizationName = optional\norganizationalUnitName = optional\n",
                db.display()
            ),
        )
        .expect("ca.cnf");
        run(&[
            "ca",
            "-batch",
            "-notext",
            "-preserveDN",
            "-config",
            &cnf.display().to_string(),
            "-cert",
            &format!("{ca}.pem"),
            "-keyfile",
            &format!("{ca}.key"),
            "-in",
            &csr.display().to_string(),
            "-out",
            &tmp.display().to_string(),
            "-startdate",
            start,
            "-enddate",
            end,
            "-extfile",
            &ext.display().to_string(),
        ]);
        std::fs::rename(&tmp, out).expect("drop into inbox");
        return;
    }
    let mut args: Vec<String> = vec![
        "x509".into(),
        "-req".into(),
        "-in".into(),
        csr_path,
        "-CA".into(),
        format!("{ca_name}.pem"),
        "-CAkey".into(),
        format!("{ca_name}.key"),
        "-set_serial".into(),
        format!("{}", 1000 + std::process::id() % 1000 + rand_serial()),
        "-extfile".into(),
        ext.display().to_string(),
        "-out".into(),
        tmp.display().to_string(),
    ];
    args.extend(["-days".into(), "90".into()]);
    if mode != CaMode::NoSans {
        args.extend(["-copy_extensions".into(), "copy".into()]);
    }
    if mode == CaMode::WrongSubject {
        args.extend(["-subj".into(), "/O=Mallory/CN=not-you".into()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&argv);
    std::fs::rename(&tmp, out).expect("drop into inbox");
}

fn rand_serial() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() % 100_000)
        .unwrap_or(7)
}

impl Env {
    /// Write firmware defaults (read by `cmd()`) for one portal identity `gw`;
    /// `extra_identity` adds fields to it.
    pub fn lifecycle_config(&self, extra_identity: &str) {
        let p = self.dir.path().display();
        let cfg = format!(
            r#"
{token}
[[identity]]
name = "gw"
key_type = "ec-p256"
subject = {{ o = "Acme Payments", ou = "Gateways", cn = "gw-0042" }}
sans = ["dns:gw-0042.edge.example", "ip:127.0.0.1"]
issuer = "portal"
overlap = "1d"
{extra_identity}

[[issuer]]
name = "portal"
kind = "portal"
outbox = "{p}/outbox"
inbox = "{p}/inbox"
ca_bundle = "{p}/ca.pem"
poll_interval = "1s"

[paths]
state_dir = "{p}/state"
"#,
            token = self.token_toml()
        );
        std::fs::write(self.path("defaults.toml"), cfg).expect("config");
    }

    /// Read the register.
    pub fn register(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.path("state/register.json")).expect("register"))
            .expect("register JSON")
    }
}

/// The engine's test doubles: an in-process CA and a config that uses it.
pub mod sim {
    use edge_signer::clock::{Clock, FakeClock, Unix};
    use edge_signer::issuer::{Answer, Issuer, Request, Submitted};
    use hsm_shim::rustls::pki_types::CertificateDer;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const DAY: u64 = 86_400;

    /// An in-process CA behind the `Issuer` trait: answers at once (when `up`), 90-day certs
    /// dated by the fake clock.
    pub struct SimCa {
        clock: FakeClock,
        up: Arc<AtomicBool>,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        ca: Vec<CertificateDer<'static>>,
    }

    impl SimCa {
        /// A new CA (`up` switches it on and off).
        pub fn new(clock: FakeClock, up: Arc<AtomicBool>) -> SimCa {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "sim CA");
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2040, 1, 1);
            let cert = p.self_signed(&key).unwrap();
            SimCa {
                clock,
                up,
                ca: vec![cert.der().clone()],
                issuer: rcgen::Issuer::new(p, key),
            }
        }
    }

    impl Issuer for SimCa {
        fn submit(&mut self, req: &Request, _now: Unix) -> Result<Submitted, Answer> {
            if !self.up.load(Ordering::SeqCst) {
                return Err(Answer::Unreachable("connection refused".into()));
            }
            Ok(Submitted {
                reference: format!("{}-{}", req.identity, req.generation),
                answer: None,
            })
        }

        fn poll(&mut self, req: &Request, _reference: &str, _now: Unix) -> Answer {
            let mut csr = rcgen::CertificateSigningRequestParams::from_pem(req.csr_pem)
                .expect("our CSR parses");
            let now = self.clock.now();
            csr.params.not_before = time::OffsetDateTime::from_unix_timestamp(now as i64).unwrap();
            csr.params.not_after =
                time::OffsetDateTime::from_unix_timestamp((now + 90 * DAY) as i64).unwrap();
            Answer::Issued(csr.signed_by(&self.issuer).unwrap().pem())
        }

        fn ca_bundle(&self) -> &[CertificateDer<'static>] {
            &self.ca
        }
    }

    /// A config with one identity `gw` using the `sim` issuer.
    pub fn config(
        state: &std::path::Path,
        module: &std::path::Path,
        key_type: &str,
        overlap: &str,
        jitter: &str,
    ) -> firmware_config::Config {
        let text = format!(
            r#"
    [token]
    module = "{}"
    label = "test"
    pin = {{ env = "UNUSED" }}

    [[identity]]
    name = "gw"
    key_type = "{key_type}"
    subject = {{ o = "Acme", cn = "gw-1" }}
    sans = ["dns:gw-1.example"]
    issuer = "sim"
    overlap = "{overlap}"
    [identity.renewal]
    before = "30d"
    jitter = "{jitter}"
    retry_min = "1h"
    retry_max = "6h"

    [[issuer]]
    name = "sim"
    kind = "portal"
    outbox = "/nonexistent/out"
    inbox = "/nonexistent/in"
    ca_bundle = "/nonexistent/ca.pem"

    [paths]
    state_dir = "{}"
    "#,
            module.display(),
            state.display()
        );
        let layer =
            firmware_config::Layer::parse(firmware_config::LayerKind::Firmware, "sim.toml", &text)
                .unwrap();
        firmware_config::layers::resolve(&[layer]).unwrap().config
    }
}
pub mod est;
pub mod jwk;

/// Test HTTPS servers' shared parts: a CA with a server certificate for 127.0.0.1, and
/// reading one HTTP/1.1 request.
pub mod httpd {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use std::io::Read;
    use std::sync::Arc;

    /// A new CA named `ca_name`, and a server certificate for 127.0.0.1 signed by it.
    pub struct TestPki {
        /// The CA certificate.
        pub ca_cert: rcgen::Certificate,
        /// The CA, to sign more.
        pub issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        /// Server certificate chain.
        pub server_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        /// Server key (PKCS#8).
        pub server_key: Vec<u8>,
    }

    impl TestPki {
        /// Make it.
        pub fn new(ca_name: &str) -> TestPki {
            let ca_key = rcgen::KeyPair::generate().expect("ca key");
            let mut cap = rcgen::CertificateParams::new(vec![]).expect("ca params");
            cap.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            cap.distinguished_name
                .push(rcgen::DnType::CommonName, ca_name);
            let ca_cert = cap.self_signed(&ca_key).expect("ca cert");
            let issuer = rcgen::Issuer::new(cap, ca_key);
            let key = rcgen::KeyPair::generate().expect("server key");
            let mut sp = rcgen::CertificateParams::new(vec![]).expect("params");
            sp.subject_alt_names = vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())];
            sp.distinguished_name
                .push(rcgen::DnType::CommonName, "test server");
            let cert = sp.signed_by(&key, &issuer).expect("server cert");
            TestPki {
                ca_cert,
                issuer,
                server_chain: vec![cert.der().clone()],
                server_key: key.serialize_der(),
            }
        }

        /// A server config (client certificates optional when `client_roots` is given).
        pub fn server_config(
            &self,
            client_roots: Option<rustls::RootCertStore>,
        ) -> Arc<rustls::ServerConfig> {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let b = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("versions");
            let b = match client_roots {
                Some(r) => b.with_client_cert_verifier(
                    rustls::server::WebPkiClientVerifier::builder_with_provider(
                        Arc::new(r),
                        provider,
                    )
                    .allow_unauthenticated()
                    .build()
                    .expect("verifier"),
                ),
                None => b.with_no_client_auth(),
            };
            Arc::new(
                b.with_single_cert(
                    self.server_chain.clone(),
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone())),
                )
                .expect("server config"),
            )
        }
    }

    /// Serve HTTPS on 127.0.0.1 (a free port, returned) until `stop`: each connection's
    /// request goes to `handle`, whose answer (a whole response) is written back; `None`
    /// drops the connection without an answer.
    pub fn serve(
        cfg: Arc<rustls::ServerConfig>,
        stop: Arc<std::sync::atomic::AtomicBool>,
        mut handle: impl FnMut(&rustls::ServerConnection, &str, &[u8]) -> Option<Vec<u8>>
            + Send
            + 'static,
    ) -> (u16, std::thread::JoinHandle<()>) {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let h = std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok((tcp, _)) = listener.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    continue;
                };
                let _ = tcp.set_nonblocking(false);
                let _ = tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)));
                let Ok(conn) = rustls::ServerConnection::new(cfg.clone()) else {
                    continue;
                };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let (head, body) = read_request(&mut tls);
                if let Some(resp) = handle(&tls.conn, &head, &body) {
                    match resp.strip_prefix(NO_CLOSE_NOTIFY) {
                        // Cut the connection like a crashed server: no close_notify.
                        Some(raw) => {
                            let _ = tls.write_all(raw);
                            let _ = tls.flush();
                            let _ = tls.sock.shutdown(std::net::Shutdown::Both);
                        }
                        None => {
                            let _ = tls.write_all(&resp);
                            tls.conn.send_close_notify();
                            let _ = tls.flush();
                        }
                    }
                }
            }
        });
        (port, h)
    }

    /// A reply starting with this is sent without the rest and the TCP connection is cut
    /// without a TLS close_notify.
    pub const NO_CLOSE_NOTIFY: &[u8] = b"\x00no-close-notify\x00";

    /// A whole HTTP/1.1 response (`extra_headers` each ending in CRLF).
    pub fn response(status: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 {status}\r\n{extra_headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    /// A header's value from a request head (names compared without case, as HTTP does).
    pub fn header(head: &str, name: &str) -> Option<String> {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    /// Read one request: (head, body of Content-Length bytes). Empty on a broken connection.
    pub fn read_request(tls: &mut impl Read) -> (String, Vec<u8>) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match tls.read(&mut chunk) {
                Ok(0) | Err(_) => return (String::new(), Vec::new()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..i]).into_owned();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                while buf.len() < i + 4 + len {
                    match tls.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                return (head, buf[i + 4..].to_vec());
            }
        }
    }
}

impl Env {
    /// The `[token]` section for this env's token, for configs written by tests.
    pub fn token_toml(&self) -> String {
        format!(
            "[token]\nmodule = \"{}\"\nlabel = \"{LABEL}\"\npin = {{ file = \"{}\" }}\n",
            module().display(),
            self.path_str("pin")
        )
    }
}

impl Env {
    /// Start `openssl s_server -accept 127.0.0.1:PORT -cert server.pem -key server.key
    /// -CAfile {ca}.pem -Verify 1 -verify_return_error -www` plus `extra`, in the temp dir;
    /// its output goes to `log` (a file in the temp dir) when given. Waits until it listens.
    pub fn s_server(&self, ca: &str, extra: &[&str], log: Option<&str>) -> (Guard, u16) {
        let port = free_port();
        let accept = format!("127.0.0.1:{port}");
        let cafile = format!("{ca}.pem");
        let mut args = vec![
            "s_server",
            "-accept",
            &accept,
            "-cert",
            "server.pem",
            "-key",
            "server.key",
            "-CAfile",
            &cafile,
            "-Verify",
            "1",
            "-verify_return_error",
            "-www",
        ];
        args.extend_from_slice(extra);
        // stdout and stderr (verification lines) into the same log, or nowhere.
        let (stdout, stderr) = match log {
            Some(n) => {
                let f = std::fs::File::create(self.path(n)).expect("log file");
                (
                    Stdio::from(f.try_clone().expect("log file")),
                    Stdio::from(f),
                )
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let child = Command::new("openssl")
            .args(&args)
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("openssl s_server");
        let g = Guard(child);
        wait_port(port);
        (g, port)
    }
}
