//! The serial diagnostics tests' side of the line: a pty pair (socat), our end recording
//! every byte, a daemon serving the other end, technician keys and tokens.

use crate::*;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// A pty pair: the daemon opens `A`, we talk on `B`.
pub struct Pty {
    _socat: Guard,
}

pub fn pty(env: &Env) -> Pty {
    let g = Guard(
        std::process::Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", env.path_str("ttyA")))
            .arg(format!("pty,raw,echo=0,link={}", env.path_str("ttyB")))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("socat (scripts/setup installs it)"),
    );
    let start = Instant::now();
    while !(env.path("ttyA").exists() && env.path("ttyB").exists()) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "socat made no pty pair"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Pty { _socat: g }
}

/// Our end of the line, recording every byte read (to check no PIN ever crosses).
pub struct Line {
    /// The pty end.
    pub f: std::fs::File,
    /// Every byte read so far.
    pub seen: Vec<u8>,
}

impl Line {
    pub fn open(env: &Env) -> Line {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(env.path("ttyB"))
            .unwrap();
        Line {
            f,
            seen: Vec::new(),
        }
    }

    pub fn send(&mut self, s: &str) {
        self.f.write_all(s.as_bytes()).unwrap();
        self.f.write_all(b"\r\n").unwrap();
    }

    pub fn pump(&mut self) {
        let mut buf = [0u8; 4096];
        if libc_poll(&self.f) {
            let n = self.f.read(&mut buf).unwrap();
            self.seen.extend_from_slice(&buf[..n]);
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Read until the text from byte `from` satisfies `done` (20 s at most); returns it.
    pub fn until_from(&mut self, from: usize, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = String::from_utf8_lossy(&self.seen[from..]).into_owned();
            if done(&got) {
                return got;
            }
            assert!(Instant::now() < deadline, "never saw {what}; got {got:?}");
            self.pump();
        }
    }

    /// Send a command and read its whole answer (up to OK, ERR or a JSON line).
    pub fn ask(&mut self, cmd: &str) -> String {
        let from = self.seen.len();
        self.send(cmd);
        self.until_from(from, "an answer", |t| {
            t.lines().any(|l| {
                let l = l.trim_end_matches('\r');
                l == "OK"
                    || l.starts_with("ERR ")
                    || (l.starts_with('{') && !l.contains("\"progress\":true"))
            }) && t.ends_with("\r\n")
        })
    }

    /// The banner of a fresh session: (serial, nonce).
    pub fn session(&mut self) -> (String, String) {
        let from = self.seen.len();
        // An empty line first: it ends a half line left on the port.
        self.send("");
        self.send("quit");
        // The quit's OK, then the next session's banner (and its prompt: echo is on).
        let text = self.until_from(from, "a banner", |t| {
            t.split_once("OK\r\n").is_some_and(|(_, after)| {
                after
                    .split_once("edge-signer-diag 1")
                    .is_some_and(|(_, b)| b.contains("\r\n"))
            })
        });
        // A program reads the answers: no echo, no prompt.
        let off = self.seen.len();
        self.send("echo off");
        self.until_from(off, "echo off answered", |t| t.contains("OK\r\n"));
        let banner = text
            .lines()
            .rfind(|l| l.starts_with("edge-signer-diag 1"))
            .unwrap()
            .trim_end()
            .to_owned();
        let field = |k: &str| {
            banner
                .split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap()
                .to_owned()
        };
        (field("serial="), field("nonce="))
    }
}

/// Whether the fd has bytes to read now.
pub fn libc_poll(f: &std::fs::File) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(f, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&now)).is_ok_and(|n| n > 0) && fds[0].revents().contains(PollFlags::IN)
}

pub fn serial_env(extra: &str) -> (Env, Pty, Guard, PortalCa) {
    let env = Env::new();
    env.make_ca("ca");
    let pty = pty(&env);
    env.serving_config(
        "1d",
        &format!("\n[serial]\nenabled = true\ndevice = \"{{p}}/ttyA\"\n{extra}"),
    );
    let ca = env.portal_ca(CaMode::Good);
    let d = env.daemon();
    env.wait_served("gw", 1);
    env.wait_log("diagnostics port open");
    (env, pty, d, ca)
}

pub fn tech_key(env: &Env, name: &str) -> String {
    env.ok(&["fleet", "keygen", "--out", name]);
    std::fs::read_to_string(env.path(&format!("{name}.pub")))
        .unwrap()
        .trim()
        .to_owned()
}

pub fn token(env: &Env, key: &str, device: &str, nonce: &str, ttl: &str) -> String {
    env.ok(&[
        "diag", "token", "--key", key, "--device", device, "--nonce", nonce, "--allow", "rotate",
        "--ttl", ttl,
    ])
    .trim()
    .to_owned()
}

/// A device with privileged commands on, `tech.key` pinned, `fleet.key` trusted for bundles.
pub fn privileged_env() -> (Env, Pty, Guard, PortalCa) {
    privileged_env_with(&[])
}

/// The same, the daemon started with `vars` (test hooks).
pub fn privileged_env_with(vars: &[(&str, &str)]) -> (Env, Pty, Guard, PortalCa) {
    let env = Env::new();
    let tech = tech_key(&env, "tech.key");
    let fleet = tech_key(&env, "fleet.key");
    tech_key(&env, "rogue.key");
    let (e, p, d, c) = {
        env.make_ca("ca");
        let pty = pty(&env);
        env.serving_config(
            "1d",
            &format!(
                "\n[serial]\nenabled = true\ndevice = \"{{p}}/ttyA\"\nallow_privileged = true\n\
                 technician_keys = [\"{tech}\"]\n\n[fleet]\ntrusted_keys = [\"{fleet}\"]\n"
            ),
        );
        let ca = env.portal_ca(CaMode::Good);
        let d = env.daemon_with(vars);
        env.wait_served("gw", 1);
        env.wait_log("diagnostics port open");
        (env, pty, d, ca)
    };
    (e, p, d, c)
}

/// How many lines of `daemon.log` contain `what`.
pub fn log_count(env: &Env, what: &str) -> usize {
    std::fs::read_to_string(env.path("daemon.log"))
        .unwrap_or_default()
        .matches(what)
        .count()
}
