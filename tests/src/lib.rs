//! Test helpers: a throwaway SoftHSM token per test, the real `edge-signer` binary, openssl.
//! Each `Env` has its own temp dir and SOFTHSM2_CONF, passed only to the processes it starts,
//! so tests run in parallel and leave nothing behind.

use serde_json::Value;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The user PIN of test tokens (tests check it never shows up in output).
/// Not hex-only: trace logs print certificates in hex, and a digits-only PIN turns up in
/// them by chance (a real flake seen with "97531").
pub const USER_PIN: &str = "pin-864213-qx";
/// The SO PIN of test tokens.
pub const SO_PIN: &str = "so-97531-zw";
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

pub use hsm_shim::testing::TokenKind;

/// One test's world: a temp dir holding a token (SoftHSM, or tpm2-pkcs11 on a simulated TPM),
/// PIN files, and whatever the test writes.
pub struct Env {
    /// The kind of token.
    pub kind: TokenKind,
    /// The simulated TPM of a `Tpm` env (stopped on drop, before the dir goes).
    pub tpm: Option<hsm_shim::testing::tpm::SimTpm>,
    /// The temp dir (removed on drop).
    pub dir: tempfile::TempDir,
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    /// A fresh SoftHSM token, initialised through `edge-signer token init`.
    pub fn new() -> Env {
        Self::on(TokenKind::SoftHsm)
    }

    /// A fresh token of `kind`: SoftHSM initialised through `edge-signer token init`; a TPM
    /// token made by `tpm2_ptool` on a simulator of its own.
    pub fn on(kind: TokenKind) -> Env {
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
        if kind == TokenKind::Tpm {
            let tpm = hsm_shim::testing::tpm::SimTpm::start(p, LABEL, SO_PIN, USER_PIN);
            return Env {
                kind,
                tpm: Some(tpm),
                dir,
            };
        }
        let env = Env {
            kind,
            tpm: None,
            dir,
        };
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

    /// The PKCS#11 module of this env's token.
    pub fn module(&self) -> PathBuf {
        match &self.tpm {
            Some(t) => t.module().to_owned(),
            None => module(),
        }
    }

    /// Environment for anything that opens the token (edge-signer, pkcs11-tool).
    pub fn envs(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("SOFTHSM2_CONF", self.path_str("softhsm2.conf")),
            ("EDGE_SIGNER_MODULE", self.module().display().to_string()),
            ("EDGE_SIGNER_TOKEN", LABEL.to_owned()),
            ("EDGE_SIGNER_PIN_FILE", self.path_str("pin")),
            ("EDGE_SIGNER_LOG", "trace".to_owned()),
            ("EDGE_SIGNER_DEFAULTS", self.path_str("defaults.toml")),
            ("EDGE_SIGNER_CONFIG", self.path_str("etc/agent.toml")),
        ];
        if let Some(t) = &self.tpm {
            v.extend(t.envs());
        }
        v
    }

    /// `edge-signer` with this env, run in the temp dir.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(bin());
        c.current_dir(self.dir.path())
            .envs(self.envs())
            .stdin(Stdio::null());
        c
    }

    /// Rewrite `defaults.toml` with `edit`.
    pub fn edit_defaults(&self, edit: impl FnOnce(String) -> String) {
        let cfg = std::fs::read_to_string(self.path("defaults.toml")).expect("defaults.toml");
        std::fs::write(self.path("defaults.toml"), edit(cfg)).expect("defaults.toml");
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

    /// `edge-signer rotate NAME --now --timeout SECS` with one more environment variable (a
    /// test hook, a log level); its output, whatever the outcome.
    pub fn rotate_now_with(&self, name: &str, secs: u32, var: (&str, &str)) -> Output {
        self.cmd()
            .args(["rotate", name, "--now", "--timeout", &secs.to_string()])
            .env(var.0, var.1)
            .output()
            .expect("edge-signer")
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
        // A command that succeeded has logged no error (tests log at trace level).
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.lines().any(|l| l.contains(" ERROR ")),
            "edge-signer {args:?} succeeded but logged errors:\n{err}"
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

    /// `edge-signer fleet sign --key KEY --version VERSION INPUT -o OUT`; insists on success.
    pub fn fleet_sign(&self, key: &str, version: &str, input: &str, out: &str) -> String {
        self.ok(&fleet_sign_args(key, version, input, out))
    }

    /// The same, for the devices of `group` (the audience the fleet channel requires).
    pub fn fleet_sign_group(
        &self,
        key: &str,
        version: &str,
        input: &str,
        out: &str,
        group: &str,
    ) -> String {
        let mut args = fleet_sign_args(key, version, input, out).to_vec();
        args.extend(["--group", group]);
        self.ok(&args)
    }

    /// Generate a key; returns its URI.
    pub fn generate(&self, key_type: &str, label: &str) -> String {
        self.json(&["key", "generate", "--type", key_type, "--label", label])["uri"]
            .as_str()
            .expect("uri")
            .to_owned()
    }

    /// `pkcs11-tool` on the token, logged in, with `args`; insists on success, returns stdout.
    pub fn pkcs11_tool(&self, args: &[&str]) -> String {
        pkcs11_tool_on(&self.module(), (LABEL, USER_PIN), &self.envs(), args)
    }

    /// `pkcs11-tool --list-objects` of the token (logged in).
    pub fn pkcs11_objects(&self) -> String {
        self.pkcs11_tool(&["--list-objects"])
    }

    /// The test CA `ca` answering this env's portal outbox into its inbox.
    pub fn portal_ca(&self, mode: CaMode) -> PortalCa {
        PortalCa::start(
            self.dir.path(),
            "ca",
            &self.path("outbox"),
            &self.path("inbox"),
            mode,
        )
    }

    /// Wait (20 s at most) until `identity`'s current generation is `n` in the register;
    /// the failure message shows `daemon.log` when there is one.
    pub fn wait_current(&self, identity: &str, n: u64) {
        let path = self.path("state/register.json");
        let current = || {
            let bytes = std::fs::read(&path).ok()?;
            let reg = edge_signer::register::RegisterFile::parse(&path, &bytes).ok()?;
            reg.identities.get(identity)?.current.map(u64::from)
        };
        let reached = poll_until(20, Duration::from_millis(100), || current() == Some(n));
        assert!(
            reached,
            "{identity} never reached generation {n}: {}",
            std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
        );
    }

    /// Run openssl in the temp dir; insist on success; return stdout+stderr.
    pub fn openssl(&self, args: &[&str]) -> String {
        openssl_in(self.dir.path(), args)
    }

    /// A test CA made by openssl (an implementation independent of ours): ca.pem / ca.key.
    pub fn make_ca(&self, name: &str) {
        let args = ca_args(name);
        self.openssl(&args.iter().map(String::as_str).collect::<Vec<_>>());
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

/// `openssl` arguments that make a self-signed P-256 test CA `{name}.pem` / `{name}.key`.
pub fn ca_args(name: &str) -> Vec<String> {
    [
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("{name}.key"),
        "-out".into(),
        format!("{name}.pem"),
        "-days".into(),
        "2".into(),
        "-subj".into(),
        format!("/CN={name}"),
    ])
    .collect()
}

/// The uid the tests run as (`id -u`), for policy rules.
pub fn my_uid() -> String {
    let out = std::process::Command::new("id")
        .arg("-u")
        .output()
        .expect("id -u");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
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
    let up = poll_until(20, Duration::from_millis(50), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "nothing listens on port {port}");
}

/// A child process killed when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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

    /// The CN of identity `gw`'s generation `generation` (1-based), from the register.
    pub fn gw_cn(&self, generation: usize) -> String {
        let g = self.generation("gw", generation as u32);
        let subject = g.subject.as_str();
        subject.rsplit("CN=").next().unwrap_or(subject).to_owned()
    }
}

/// The engine's test doubles: an in-process CA and a config that uses it.
pub mod acme;
pub mod est;
mod faults;
mod register;
pub use faults::fault_module;
mod pkcs11_tool;
pub use pkcs11_tool::{pkcs11_tool_on, replace_key};
pub mod httpd;
pub mod jwk;
pub mod kx_relay;
pub mod mqtt;
pub mod portal;
pub mod scep;
pub mod serial_port;
pub mod serving;
pub mod sim;

pub use portal::{CaMode, PortalCa};

impl Env {
    /// The `[token]` section for this env's token, for configs written by tests.
    pub fn token_toml(&self) -> String {
        format!(
            "[token]\nmodule = \"{}\"\nlabel = \"{LABEL}\"\npin = {{ file = \"{}\" }}\n",
            self.module().display(),
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
        ];
        // `-rev` (echo each line reversed, one long connection) replaces the status page.
        if !extra.contains(&"-rev") {
            args.push("-www");
        }
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

/// Run `openssl args` in `dir`; it must succeed. Returns stdout and stderr.
pub fn openssl_in(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
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

/// Run `cmd` (a tool outside the project, named `what` in failures), insist on success and
/// return its output; a failure shows the tool's stderr.
pub fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what} (scripts/setup installs it): {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Poll `ok` every 200 ms until it holds; fail the test with "never: `what`" after `secs`.
pub fn wait_for(what: &str, secs: u64, ok: impl FnMut() -> bool) {
    assert!(
        poll_until(secs, Duration::from_millis(200), ok),
        "never: {what}"
    );
}

/// Poll `ok` every `every` until it holds (true) or `secs` have passed (false).
pub fn poll_until(secs: u64, every: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if ok() {
            return true;
        }
        if start.elapsed() >= Duration::from_secs(secs) {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// The arguments of `edge-signer fleet sign --key KEY --version VERSION INPUT -o OUT`.
pub fn fleet_sign_args<'a>(
    key: &'a str,
    version: &'a str,
    input: &'a str,
    out: &'a str,
) -> [&'a str; 9] {
    [
        "fleet",
        "sign",
        "--key",
        key,
        "--version",
        version,
        input,
        "-o",
        out,
    ]
}
