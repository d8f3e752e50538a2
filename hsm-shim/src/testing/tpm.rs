//! A simulated TPM 2.0 behind tpm2-pkcs11, for tests: `swtpm socket` in a temp dir, a private
//! D-Bus session bus, `tpm2-abrmd` on it as resource manager (tpm2-pkcs11 keeps transient
//! objects loaded; without a resource manager the TPM runs out of object slots: 0x902), and a
//! token made with `tpm2_ptool`. Everything is killed on drop; nothing outside the dir is used.
//!
//! The processes that open the token need [`SimTpm::envs`] (they pick the TCTI and the store
//! from the environment, read once at `C_Initialize`).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tpm2-pkcs11 module, or `None` when the package is not installed.
pub fn module() -> Option<PathBuf> {
    if let Some(m) = std::env::var_os("EDGE_SIGNER_TEST_TPM_MODULE") {
        return Some(m.into());
    }
    [
        "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
        "/usr/lib/aarch64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
        "/usr/lib/arm-linux-gnueabihf/pkcs11/libtpm2_pkcs11.so",
        "/usr/lib/pkcs11/libtpm2_pkcs11.so",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// A running simulated TPM with one initialised tpm2-pkcs11 token.
pub struct SimTpm {
    children: Vec<Child>,
    bus: String,
    store: PathBuf,
    module: PathBuf,
}

/// The TCTI string for tpm2-pkcs11 and tpm2-tools: abrmd on the session bus of `envs()`.
const TCTI: &str = "tabrmd:bus_type=session";

fn free_port_pair() -> u16 {
    // swtpm takes PORT (commands) and PORT+1 (control); pick a free even port with a free
    // neighbour. Another test may take it between here and swtpm's bind: start() retries.
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let p = l.local_addr().expect("local addr").port();
        if p < 65000 && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

fn spawn(cmd: &mut Command, what: &str) -> Child {
    cmd.spawn().unwrap_or_else(|e| {
        panic!("{what} could not start ({e}): run scripts/setup (swtpm, tpm2-abrmd, tpm2-tools)")
    })
}

impl SimTpm {
    /// Start a simulator in `dir` and make a token `label` with these PINs.
    pub fn start(dir: &Path, label: &str, so_pin: &str, user_pin: &str) -> SimTpm {
        let module = module().expect("tpm2-pkcs11 not installed: run scripts/setup");
        let state = dir.join("tpm-state");
        let store = dir.join("tpm-store");
        for d in [&state, &store] {
            std::fs::create_dir_all(d).expect("tpm dirs");
        }
        // Built first, so that whatever started is killed on drop if a later step panics.
        let mut me = SimTpm {
            children: Vec::new(),
            bus: String::new(),
            store,
            module,
        };
        let port = Self::start_swtpm(&state, &mut me.children);
        me.bus = Self::start_bus(dir, &mut me.children);
        let mut abrmd = Command::new("tpm2-abrmd");
        abrmd
            .args(["--session", "--allow-root", "--flush-all"])
            .arg(format!("--tcti=swtpm:host=127.0.0.1,port={port}"))
            .env("DBUS_SESSION_BUS_ADDRESS", &me.bus)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        me.children.push(spawn(&mut abrmd, "tpm2-abrmd"));
        me.wait_ready();
        me.tool(&["init", "--path", &me.store_str()]);
        me.tool(&[
            "addtoken",
            "--pid=1",
            &format!("--sopin={so_pin}"),
            &format!("--userpin={user_pin}"),
            &format!("--label={label}"),
            "--path",
            &me.store_str(),
        ]);
        me
    }

    fn start_swtpm(state: &Path, children: &mut Vec<Child>) -> u16 {
        for _ in 0..5 {
            let port = free_port_pair();
            let mut c = Command::new("swtpm");
            c.args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
                .arg("--tpmstate")
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,bindaddr=127.0.0.1,port={port}"))
                .arg("--ctrl")
                .arg(format!("type=tcp,bindaddr=127.0.0.1,port={}", port + 1))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut child = spawn(&mut c, "swtpm");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    // Ours, not a neighbour test's that took the port first: a swtpm that
                    // could not bind exits at once.
                    std::thread::sleep(Duration::from_millis(50));
                    if matches!(child.try_wait(), Ok(None)) {
                        children.push(child);
                        return port;
                    }
                    break;
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken meanwhile: try another
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("swtpm did not start");
    }

    fn start_bus(dir: &Path, children: &mut Vec<Child>) -> String {
        let addr = format!("unix:path={}/bus", dir.display());
        let mut c = Command::new("dbus-daemon");
        c.args(["--session", "--nofork", "--print-address=1"])
            .arg(format!("--address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = spawn(&mut c, "dbus-daemon");
        // The first line it prints says it listens.
        let mut line = String::new();
        let out = child.stdout.take().expect("piped stdout");
        BufReader::new(out)
            .read_line(&mut line)
            .expect("dbus-daemon address");
        assert!(!line.trim().is_empty(), "dbus-daemon did not start");
        children.push(child);
        line.trim().to_owned()
    }

    /// Poll until abrmd owns its name and the TPM answers through it.
    fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            let ok = Command::new("tpm2_getcap")
                .args(["-T", TCTI, "properties-fixed"])
                .envs(self.envs())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "tpm2-abrmd did not come up on the test bus"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn store_str(&self) -> String {
        self.store.display().to_string()
    }

    /// Run `tpm2_ptool` with `args`; panics with its output on failure.
    pub fn tool(&self, args: &[&str]) {
        let out = Command::new("tpm2_ptool")
            .args(args)
            .envs(self.envs())
            .output()
            .expect("tpm2_ptool (libtpm2-pkcs11-tools) is installed by scripts/setup");
        assert!(
            out.status.success(),
            "tpm2_ptool {}: {}{}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The module to load.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// What a process that opens the token needs in its environment.
    pub fn envs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DBUS_SESSION_BUS_ADDRESS", self.bus.clone()),
            ("TPM2_PKCS11_TCTI", TCTI.to_owned()),
            ("TPM2TOOLS_TCTI", TCTI.to_owned()),
            ("TPM2_PKCS11_STORE", self.store_str()),
        ]
    }
}

impl Drop for SimTpm {
    fn drop(&mut self) {
        // abrmd first (it holds the TPM connection), then the bus, then the TPM.
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
