//! Debian's `scepserver` (micromdm's SCEP server) with its own CA, on a loopback port, for
//! one test: stopped and started again on the same port and depot when a test asks.

use crate::{free_port, wait_port, Env, Guard};
use std::process::{Command, Stdio};

/// A running (or stopped) scepserver.
pub struct ScepServer {
    child: Option<Guard>,
    dir: std::path::PathBuf,
    /// Its port.
    pub port: u16,
    challenge: String,
}

impl ScepServer {
    /// A new CA in `env`'s `scep/` and the server on a free port, enforcing `challenge`,
    /// renewing at any time (`-allowrenew 0`). The CA certificate is `scep-ca.pem`.
    pub fn start(env: &Env, challenge: &str) -> ScepServer {
        let dir = env.path("scep");
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("scepserver")
            .args(["ca", "-init"])
            .current_dir(&dir)
            .output()
            .expect("scepserver (scripts/setup installs scep)");
        assert!(out.status.success(), "{out:?}");
        std::fs::copy(dir.join("depot/ca.pem"), env.path("scep-ca.pem")).unwrap();
        let mut s = ScepServer {
            child: None,
            dir,
            port: free_port(),
            challenge: challenge.to_owned(),
        };
        s.resume();
        s
    }

    /// Stop the server (kill -9).
    pub fn stop(&mut self) {
        self.child = None;
    }

    /// Start it again on the same port with the same depot.
    pub fn resume(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("scepserver.log"))
            .unwrap();
        let child = Command::new("scepserver")
            .args(["-depot", "depot", "-port", &self.port.to_string()])
            .args(["-challenge", &self.challenge, "-allowrenew", "0", "-debug"])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("scepserver");
        self.child = Some(Guard(child));
        wait_port(self.port);
    }

    /// The SCEP URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/scep", self.port)
    }
}

/// A configuration with one RSA identity `gw` (CN `NAME`, DNS name `NAME.example`) enrolled
/// by `server`, the challenge read from `scep-challenge` (holding `challenge`), and `extra`
/// lines in the issuer table.
pub fn scep_config(env: &Env, server: &ScepServer, name: &str, challenge: &str, extra: &str) {
    std::fs::write(env.path("scep-challenge"), format!("{challenge}\n")).unwrap();
    let cfg = format!(
        "{token}\n[[identity]]\nname = \"gw\"\nkey_type = \"rsa-2048\"\n\
         subject = {{ cn = \"{name}\" }}\nsans = [\"dns:{name}.example\"]\nissuer = \"scep\"\n\
         usage = [\"client\"]\nsubject_match = \"none\"\noverlap = \"1h\"\n\
         [identity.renewal]\nretry_min = \"1s\"\nretry_max = \"2s\"\n\
         \n[[issuer]]\nname = \"scep\"\nkind = \"scep\"\nurl = \"{url}\"\n\
         ca_bundle = \"{ca}\"\nchallenge = {{ file = \"{secret}\" }}\n{extra}\n\
         [paths]\nstate_dir = \"{p}/state\"\n",
        token = env.token_toml(),
        url = server.url(),
        ca = env.path_str("scep-ca.pem"),
        secret = env.path_str("scep-challenge"),
        p = env.dir.path().display(),
    );
    std::fs::write(env.path("defaults.toml"), cfg).unwrap();
}

/// A fresh env, scepserver enforcing `s3cret`, and identity `gw` (CN `NAME`) configured to
/// send `challenge`, with `extra` in its issuer table.
pub fn scep_env(name: &str, challenge: &str, extra: &str) -> (Env, ScepServer) {
    let env = Env::new();
    let server = ScepServer::start(&env, "s3cret");
    scep_config(&env, &server, name, challenge, extra);
    (env, server)
}
