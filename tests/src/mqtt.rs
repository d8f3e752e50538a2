//! A real mosquitto (Debian) on a loopback port for the fleet channel tests:
//! `require_certificate true`, the certificate's CN as the username, persistence on
//! (retained bundles survive a restart), everything logged.

use crate::{free_port, wait_port, Env, Guard};
use std::path::PathBuf;
use std::process::{Child, Command};

fn is_root() -> bool {
    crate::my_uid() == "0"
}

/// A running broker.
pub struct Mosquitto {
    /// Its port.
    pub port: u16,
    conf: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    guard: Option<Guard>,
}

impl Mosquitto {
    /// Start mosquitto with `env`'s `broker.pem`/`broker.key` (made here from `ca`) and
    /// trusting every CA file in `cas` for clients.
    pub fn start(env: &Env, cas: &[PathBuf]) -> Mosquitto {
        Mosquitto::start_with(env, cas, "")
    }

    /// The same with `extra` lines in mosquitto.conf (an `acl_file`, say).
    pub fn start_with(env: &Env, cas: &[PathBuf], extra: &str) -> Mosquitto {
        env.openssl_leaf("ca", "broker");
        let bundle: String = cas
            .iter()
            .map(|c| std::fs::read_to_string(c).expect("ca"))
            .collect();
        std::fs::write(env.path("clients-ca.pem"), bundle).expect("ca bundle");
        std::fs::create_dir_all(env.path("mosq")).expect("persistence dir");
        let port = free_port();
        let p = env.dir.path().display();
        let conf = env.path("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "{user}per_listener_settings false\nlistener {port} 127.0.0.1\n\
                 cafile {p}/clients-ca.pem\ncertfile {p}/broker.pem\nkeyfile {p}/broker.key\n\
                 require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n\
                 persistence true\npersistence_location {p}/mosq/\nautosave_interval 1\n\
                 log_dest file {p}/mosquitto.log\nlog_type all\nconnection_messages true\n{extra}",
                // As root, mosquitto drops to user `mosquitto`, who cannot read the test's
                // private temp dir: stay the test's own user.
                user = if is_root() { "user root\n" } else { "" }
            ),
        )
        .expect("mosquitto.conf");
        let mut m = Mosquitto {
            port,
            conf,
            log: env.path("mosquitto.log"),
            guard: None,
        };
        m.restart();
        m
    }

    /// (Re)start the broker process.
    pub fn restart(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .spawn()
            .expect("mosquitto (scripts/setup installs it)");
        self.guard = Some(Guard(child));
        wait_port(self.port);
    }

    /// Stop the broker (SIGTERM: it saves retained messages).
    pub fn stop(&mut self) {
        if let Some(g) = &self.guard {
            let _ = Command::new("kill").arg(g.0.id().to_string()).status();
        }
        if let Some(mut g) = self.guard.take() {
            let _ = g.0.wait();
        }
    }

    /// `mqtts://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The fleet operator's side: a CA (the broker's), an operator certificate, the fleet key
/// `fleet.key` (and `extra_keys`, e.g. a rogue one). Returns the env and the fleet public key.
pub fn operator_env(extra_keys: &[&str]) -> (Env, String) {
    let op = Env::new();
    op.make_ca("ca");
    op.openssl_leaf("ca", "operator");
    for k in std::iter::once(&"fleet.key").chain(extra_keys) {
        op.ok(&["fleet", "keygen", "--out", k]);
    }
    let public = std::fs::read_to_string(op.path("fleet.key.pub"))
        .expect("fleet.key.pub")
        .trim()
        .to_owned();
    (op, public)
}

impl Env {
    /// Firmware defaults for identity `gw` whose fleet channel goes to `broker` as `device`
    /// (group `site`), trusting `fleet_pub` for bundles; `extra` adds `[fleet.mqtt]` fields.
    pub fn fleet_mqtt_config(
        &self,
        device: &str,
        broker: &Mosquitto,
        server_ca: &std::path::Path,
        fleet_pub: &str,
        overlap: &str,
        extra: &str,
    ) {
        self.serving_config(
            overlap,
            &format!(
                "\n[fleet]\ntrusted_keys = [\"{fleet_pub}\"]\n\n[fleet.mqtt]\nbroker = \"{}\"\n\
                 identity = \"gw\"\nserver_ca = \"{}\"\ndevice_id = \"{device}\"\n\
                 groups = [\"site\"]\n{extra}",
                broker.url(),
                server_ca.display()
            ),
        );
    }
}

/// `mosquitto_sub` as the operator (`operator.pem`/`.key` of `op`, trusting `ca.pem`) on the
/// broker at `port`, subscribed to `topic`, writing what it receives (`-v`: with topics) to
/// `out` in `op`'s dir.
pub fn operator_sub(op: &Env, port: u16, topic: &str, verbose: bool, out: &str) -> Child {
    let p = |f: &str| op.path_str(f);
    let mut c = Command::new("mosquitto_sub");
    c.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["--cafile", &p("ca.pem"), "--cert", &p("operator.pem")])
        .args(["--key", &p("operator.key"), "-t", topic]);
    if verbose {
        c.arg("-v");
    }
    c.stdout(std::fs::File::create(p(out)).expect("subscriber output"))
        .spawn()
        .expect("mosquitto_sub (mosquitto-clients) is installed by scripts/setup")
}
