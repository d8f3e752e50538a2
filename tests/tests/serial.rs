//! Technician diagnostics over a pseudo-terminal pair (socat): the daemon serves one end,
//! the test (or `edge-signer diag`) the other.

use edge_signer_tests::*;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// A pty pair: the daemon opens `A`, we talk on `B`.
struct Pty {
    _socat: Guard,
}

fn pty(env: &Env) -> Pty {
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
struct Line {
    f: std::fs::File,
    seen: Vec<u8>,
}

impl Line {
    fn open(env: &Env) -> Line {
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

    fn send(&mut self, s: &str) {
        self.f.write_all(s.as_bytes()).unwrap();
        self.f.write_all(b"\r\n").unwrap();
    }

    fn pump(&mut self) {
        let mut buf = [0u8; 4096];
        if libc_poll(&self.f) {
            let n = self.f.read(&mut buf).unwrap();
            self.seen.extend_from_slice(&buf[..n]);
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Read until the text from byte `from` satisfies `done` (20 s at most); returns it.
    fn until_from(&mut self, from: usize, what: &str, done: impl Fn(&str) -> bool) -> String {
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
    fn ask(&mut self, cmd: &str) -> String {
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
    fn session(&mut self) -> (String, String) {
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
fn libc_poll(f: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = [PollFd {
        fd: f.as_raw_fd(),
        events: 1,
        revents: 0,
    }];
    // SAFETY: one valid pollfd, 0 ms timeout.
    unsafe { poll(p.as_mut_ptr(), 1, 0) > 0 && p[0].revents & 1 != 0 }
}

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

extern "C" {
    fn poll(fds: *mut PollFd, n: u64, timeout: i32) -> i32;
}

fn normalise(s: &str) -> String {
    let rules = [
        (r"nonce=[0-9a-f]+", "nonce=<NONCE>"),
        (r"serial=[0-9a-f]+", "serial=<SERIAL>"),
        (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "<TIME>"),
        (r"id=(%[0-9a-f]{2})+", "id=<ID>"),
        (r"(serial|fingerprint)(: |\x22:\x22)[0-9a-f]+", "$1$2<HEX>"),
        (r"edge-signer:gw:g\d+", "edge-signer:gw:g<N>"),
        // A 90-day certificate read in the second it was issued has 90 whole days left,
        // a second later 89. Any other count stays in the text and fails the comparison.
        (r"days_left(: |\x22:)(89|90)\b", "days_left$1<DAYS>"),
    ];
    let mut out = s.to_owned();
    for (re, to) in rules {
        out = regex::Regex::new(re)
            .unwrap()
            .replace_all(&out, to)
            .into_owned();
    }
    out
}

fn serial_env(extra: &str) -> (Env, Pty, Guard, PortalCa) {
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

#[test]
fn a_session_transcript_is_stable_byte_for_byte() {
    let (env, _pty, _d, _ca) = serial_env("");
    let mut line = Line::open(&env);
    line.session();
    let start = line.seen.len();
    for c in [
        "status",
        "identity gw",
        "clock",
        "version",
        "frobnicate",
        "rotate gw",
        "json on",
        "status",
        "identity nope",
        "json off",
    ] {
        line.ask(c);
    }
    line.session();
    let got = normalise(&String::from_utf8_lossy(&line.seen[start..]));
    let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/golden/serial_session.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(golden, &got).unwrap();
    }
    let want =
        std::fs::read_to_string(golden).expect("golden transcript (UPDATE_GOLDEN=1 writes it)");
    assert_eq!(
        got, want,
        "the protocol changed: if on purpose, UPDATE_GOLDEN=1 and review the diff"
    );
    assert!(!String::from_utf8_lossy(&line.seen).contains(USER_PIN));
}

fn tech_key(env: &Env, name: &str) -> String {
    env.ok(&["fleet", "keygen", "--out", name]);
    std::fs::read_to_string(env.path(&format!("{name}.pub")))
        .unwrap()
        .trim()
        .to_owned()
}

fn token(env: &Env, key: &str, device: &str, nonce: &str, ttl: &str) -> String {
    env.ok(&[
        "diag", "token", "--key", key, "--device", device, "--nonce", nonce, "--allow", "rotate",
        "--ttl", ttl,
    ])
    .trim()
    .to_owned()
}

/// A device with privileged commands on, `tech.key` pinned, `fleet.key` trusted for bundles.
fn privileged_env() -> (Env, Pty, Guard, PortalCa) {
    privileged_env_with(&[])
}

/// The same, the daemon started with `vars` (test hooks).
fn privileged_env_with(vars: &[(&str, &str)]) -> (Env, Pty, Guard, PortalCa) {
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

#[test]
fn privileged_commands_need_a_token_for_this_device_session_and_key() {
    let (env, _pty, _d, _ca) = privileged_env();
    let mut line = Line::open(&env);
    let (serial, nonce) = line.session();
    let a = line.ask("rotate gw");
    assert!(a.contains("ERR 403 rotate needs `auth TOKEN` first"), "{a}");
    // Each wrong token has its own error (the port slows down after each: 1 s, 2 s, 4 s).
    let t = token(&env, "rogue.key", &serial, &nonce, "10m");
    assert!(
        line.ask(&format!("auth {t}"))
            .contains("ERR 401 token signed by technician key"),
        "unpinned key"
    );
    let t = token(&env, "tech.key", "SOMEONE-ELSE", &nonce, "10m");
    assert!(line
        .ask(&format!("auth {t}"))
        .contains("ERR 401 token is for device 'SOMEONE-ELSE'"));
    let (_, nonce2) = line.session();
    assert_ne!(nonce, nonce2);
    let t = token(&env, "tech.key", &serial, &nonce, "10m");
    assert!(
        line.ask(&format!("auth {t}"))
            .contains("ERR 401 token is for another session"),
        "replayed nonce"
    );
    std::thread::sleep(Duration::from_millis(1100));
    let (_, nonce3) = line.session();
    let expired = token(&env, "tech.key", &serial, &nonce3, "1s");
    std::thread::sleep(Duration::from_millis(2100));
    let a = line.ask(&format!("auth {expired}"));
    assert!(a.contains("ERR 401 token expired"), "{a}");
    // The client makes a fresh token from the banner and shows progress to generation 2.
    drop(line);
    let out = env
        .cmd()
        .args([
            "diag",
            "--port",
            &env.path_str("ttyB"),
            "--auth-key",
            "tech.key",
            "rotate",
            "gw",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("generation: 2"), "{stdout}");
    assert!(stderr.contains("generation 2"), "progress: {stderr}");
    env.wait_current("gw", 2);
}

#[test]
fn bundles_over_the_port_are_checked_like_config_apply() {
    let (env, _pty, _d, _ca) = privileged_env();
    std::fs::write(env.path("v1.toml"), "[log]\nlevel = \"debug\"\n").unwrap();
    env.fleet_sign("fleet.key", "1", "v1.toml", "v1.bundle");
    env.fleet_sign("rogue.key", "2", "v1.toml", "forged.bundle");
    let diag = |file: &str| {
        env.cmd()
            .args([
                "diag",
                "--port",
                &env.path_str("ttyB"),
                "--auth-key",
                "tech.key",
                "--allow",
                "apply-bundle",
                "apply-bundle",
                file,
            ])
            .output()
            .unwrap()
    };
    let out = diag("forged.bundle");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not trusted on this device"),
        "{out:?}"
    );
    assert!(
        !env.path("state/fleet/current.bundle").exists(),
        "a forged bundle changes nothing"
    );
    let out = diag("v1.bundle");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("version: 1"),
        "{out:?}"
    );
    // The bundle in effect again: a success that changes nothing.
    let out = diag("v1.bundle");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already_in_effect: true"),
        "{out:?}"
    );
}

#[test]
fn noise_floods_and_disconnects_stop_nothing_and_no_pin_crosses() {
    let (env, _pty, mut d, _ca) = serial_env("");
    let mut line = Line::open(&env);
    line.session();
    // A 1 MiB line, binary noise, control characters.
    line.f.write_all(&vec![b'A'; 1 << 20]).unwrap();
    line.f.write_all(b"\r\n").unwrap();
    let noise: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    line.f.write_all(&noise).unwrap();
    line.f.write_all(b"\r\n\x1b[2Jstatus\x07\r\n").unwrap();
    let from = line.seen.len();
    line.send("version");
    let a = line.until_from(from, "the version answer", |t| {
        t.contains("protocol: edge-signer-diag 1\r\nOK\r\n")
    });
    assert!(a.contains("ERR 413 line longer than 8192 bytes"), "{a}");
    // A disconnect mid-command: half a line, then the other end goes away.
    line.f.write_all(b"ident").unwrap();
    drop(line);
    std::thread::sleep(Duration::from_millis(300));
    let mut line = Line::open(&env);
    line.session();
    let a = line.ask("status");
    assert!(a.contains("gw.state: active"), "{a}");
    assert!(
        d.0.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );
    for cmd in ["token", "config", "events 50", "clock"] {
        line.ask(cmd);
    }
    assert!(
        !String::from_utf8_lossy(&line.seen).contains(USER_PIN),
        "no PIN crosses the port"
    );
    // The rest of the daemon goes on: a rotation from the CLI still completes.
    env.ok(&["rotate", "gw", "--now", "--timeout", "20"]);
}

#[test]
fn the_client_over_the_port_shows_what_status_shows() {
    let (env, _pty, _d, _ca) = serial_env("");
    let out = env
        .cmd()
        .args(["diag", "--port", &env.path_str("ttyB"), "--json", "status"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let over_port: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let local = env.json(&["status"]);
    for k in [
        "name",
        "state",
        "generation",
        "not_after",
        "days_left",
        "fingerprint",
        "key_uri",
        "live_generations",
    ] {
        assert_eq!(
            over_port["data"][0][k], local[0][k],
            "{k}: {over_port} vs {local}"
        );
    }
}

#[test]
fn an_unplugged_adapter_is_reopened_when_it_comes_back() {
    let (env, adapter, mut d, _ca) = serial_env("");
    let mut line = Line::open(&env);
    line.session();
    assert!(line.ask("version").contains("OK"));
    // Unplug: the device goes away under the open port (socat ends, the links vanish).
    drop(line);
    drop(adapter);
    env.wait_log("diagnostics port lost; reopening");
    let _ = std::fs::remove_file(env.path("ttyA"));
    let _ = std::fs::remove_file(env.path("ttyB"));
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        d.0.try_wait().unwrap().is_none(),
        "the daemon keeps running without its port"
    );
    // Plug back in: a new device at the same path (a new pty), found by the retry.
    let _pty = pty(&env);
    let mut line = Line::open(&env);
    let (serial, _) = line.session();
    assert!(!serial.is_empty());
    let a = line.ask("status");
    assert!(a.contains("gw.state: active"), "{a}");
}

/// A device that answers with terminal escape sequences, as a hostile or broken box on the
/// cable could: `diag` shows them escaped, so none reaches the technician's terminal; a line
/// with no end is cut at 1 MiB with a clear error.
#[test]
fn diag_shows_a_hostile_device_escaped_and_caps_its_lines() {
    let env = Env::new();
    let _pty = pty(&env);
    let device = env.path("ttyA");
    let fake = std::thread::spawn(move || {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(device)
            .unwrap();
        let mut w = f.try_clone().unwrap();
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(f));
        for round in 0..2 {
            // Each `diag` run: an empty line, `quit`, then the command.
            while let Some(Ok(l)) = lines.next() {
                match l.trim() {
                    "echo off" => w.write_all(b"OK\r\n").unwrap(),
                    "quit" => w
                        .write_all(
                            b"OK\r\nedge-signer-diag 1 serial=SN\x1b]0;owned\x07 nonce=ab\r\n",
                        )
                        .unwrap(),
                    "status" if round == 0 => {
                        w.write_all(b"gw.state: \x1b[2Jactive\x9b\r\nERR 500 \x1b[31mboom\r\n")
                            .unwrap();
                        break;
                    }
                    "status" => {
                        w.write_all(&vec![b'x'; (1 << 20) + 10]).unwrap();
                        w.write_all(b"\r\n").unwrap();
                        break;
                    }
                    _ => {}
                }
            }
        }
    });
    let diag = |what: &str| {
        let out = env
            .cmd()
            .args(["diag", "--port", &env.path_str("ttyB"), "status"])
            .output()
            .unwrap();
        let all = [&out.stdout[..], &out.stderr[..]].concat();
        assert!(
            !all.contains(&0x1b),
            "{what}: an ESC reached the terminal: {out:?}"
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&all).into_owned(),
        )
    };
    let (code, text) = diag("escapes");
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("gw.state: \\u{1b}[2Jactive"), "{text}");
    assert!(text.contains("error 500 \\u{1b}[31mboom"), "{text}");
    let (code, text) = diag("a line with no end");
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("longer than 1048576 bytes"), "{text}");
    fake.join().unwrap();
}

fn log_count(env: &Env, what: &str) -> usize {
    std::fs::read_to_string(env.path("daemon.log"))
        .unwrap_or_default()
        .matches(what)
        .count()
}

/// A grant ends after the idle time without a command (2 s here, 60 s in production) and at
/// `quit`; `edge-signer diag` sends `quit` when its command is done.
#[test]
fn a_technician_grant_ends_when_idle_at_quit_and_when_diag_is_done() {
    let (env, _pty, _d, _ca) = privileged_env_with(&[("EDGE_SIGNER_TEST_GRANT_IDLE_SECS", "2")]);
    let mut line = Line::open(&env);
    let (serial, nonce) = line.session();
    let t = token(&env, "tech.key", &serial, &nonce, "10m");
    assert!(line.ask(&format!("auth {t}")).contains("OK"));
    std::thread::sleep(Duration::from_millis(2600));
    let a = line.ask("rotate gw");
    assert!(a.contains("ERR 403 rotate needs `auth TOKEN` first"), "{a}");
    env.wait_log("technician grant ended: no command for a minute");
    // At quit.
    let (serial, nonce) = line.session();
    let t = token(&env, "tech.key", &serial, &nonce, "10m");
    assert!(line.ask(&format!("auth {t}")).contains("OK"));
    let before = log_count(&env, "technician grant ended: quit");
    line.session();
    assert_eq!(log_count(&env, "technician grant ended: quit"), before + 1);
    drop(line);
    // diag: its session ends with a quit once the answer is in.
    let quits = log_count(&env, "session ended: quit");
    let out = env
        .cmd()
        .args(["diag", "--port", &env.path_str("ttyB"), "version"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let done = poll_until(5, Duration::from_millis(100), || {
        log_count(&env, "session ended: quit") >= quits + 2
    });
    assert!(done, "diag left its session open");
}

/// A peer that stops reading (a paused terminal) does not end the session or reset its
/// nonce: answers that cannot be written are dropped and counted; once a reader is back,
/// it is answered at once, in the same session.
#[test]
fn a_peer_that_stops_reading_keeps_its_session_and_is_answered_when_back() {
    let (env, _pty, _d, _ca) = serial_env("");
    let mut line = Line::open(&env);
    let (_, nonce) = line.session();
    let sessions = log_count(&env, "session started");
    // 200 KB of noise, nobody reading: every line of it is answered into a full pipe.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..200 * 1024)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect();
    // From another thread: socat, between the two ptys, stops taking input while its
    // output to us is full, which a real serial line does not.
    let mut w = line.f.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&noise).unwrap());
    std::thread::sleep(Duration::from_secs(4));
    // A reader appears: drain what is there until the noise is through and the port quiet.
    loop {
        let quiet = !libc_poll(&line.f);
        if quiet && writer.is_finished() {
            std::thread::sleep(Duration::from_millis(300));
            if !libc_poll(&line.f) {
                break;
            }
        }
        line.pump();
    }
    writer.join().unwrap();
    let t = Instant::now();
    let from = line.seen.len();
    // The first empty line may only end a half line of noise; the second is empty.
    line.send("");
    line.send("");
    line.send("status");
    let a = line.until_from(from, "the status answer", |t| {
        t.contains("gw.state: active") && t.contains("OK\r\n")
    });
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "{:?}: {a}",
        t.elapsed()
    );
    // The empty line shows the banner again: the same session, the same nonce.
    assert!(a.contains(&format!("nonce={nonce}")), "a new session: {a}");
    assert_eq!(
        log_count(&env, "session started"),
        sessions,
        "the session was reset"
    );
    env.wait_log("edge_signer::serial: the peer is not reading");
}

/// A person in picocom (a terminal that does not echo): Enter on an empty line shows the
/// banner, what is typed comes back, backspace edits the line, a prompt waits after each
/// answer, and the event log names commands as typed.
#[test]
fn a_person_at_a_terminal_sees_the_banner_their_typing_and_a_prompt() {
    let (env, _pty, _d, _ca) = serial_env("");
    let mut line = Line::open(&env);
    // What the session said when the port opened, before anyone was there.
    line.until_from(0, "the first banner", |t| t.ends_with("\r\n> "));
    std::thread::sleep(Duration::from_millis(200));
    while libc_poll(&line.f) {
        line.pump();
    }
    let from = line.seen.len();
    line.f.write_all(b"\r").unwrap();
    let t = line.until_from(from, "the banner and a prompt", |t| {
        t.contains("edge-signer-diag 1 serial=") && t.ends_with("\r\n> ")
    });
    assert!(t.contains(" nonce="), "{t}");
    let from = line.seen.len();
    line.f.write_all(b"statx\x7fus\r").unwrap();
    let t = line.until_from(from, "the status answer and a prompt", |t| {
        t.contains("OK\r\n> ")
    });
    assert!(t.starts_with("statx\x08 \x08us\r\n"), "{t:?}");
    assert!(t.contains("gw.state: active"), "{t:?}");
    let from = line.seen.len();
    line.f.write_all(b"events 5\r").unwrap();
    line.until_from(from, "the events answer", |t| t.contains("OK\r\n> "));
    env.wait_log("events 5");
    let log = std::fs::read_to_string(env.path("daemon.log")).unwrap();
    assert!(!log.contains("Events(5)"), "{log}");
}
