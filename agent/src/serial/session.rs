//! One technician session on a byte stream (the serial port, or anything Read + Write in
//! tests): banner with a fresh nonce, commands answered per the protocol, privileged ones
//! only after `auth`, repeated auth failures slowing the port, an idle timeout. Nothing
//! secret is ever written: no PIN, no key material, no bundle payload.

use super::auth::{self, Grant};
use super::protocol::{parse, Answer, Command, Line, LineReader, PROTOCOL};
use super::Shared;
use crate::control::EngineRequest;
use crate::events::{Event, Severity};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// The port as a session uses it: a read or write waits at most `set_wait` (`port::Port`;
/// other streams ignore it).
pub trait Wire: Read + Write {
    /// Reads and writes wait at most `d` from now on.
    fn set_wait(&mut self, _d: Duration) {}
}

/// How long a read waits (the loop then checks the idle timers).
pub const READ_WAIT: Duration = Duration::from_millis(500);
/// How long an answer may wait for the peer to take it; past that the peer counts as not
/// reading, and answers are dropped (and counted) without waiting until it reads again.
const WRITE_WAIT: Duration = Duration::from_secs(2);
/// A technician's grant ends after this long without a command.
const GRANT_IDLE: Duration = Duration::from_secs(60);

/// An error that only says "not now" (the port was not ready within the wait).
fn not_yet(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::Interrupted
    )
}

/// What was written to a peer that may stop reading.
#[derive(Default)]
struct Outbox {
    /// The last write timed out: the peer is not reading.
    stalled: bool,
    /// Answers dropped since the session started.
    dropped: u64,
}

impl Outbox {
    /// Write `bytes`, waiting for room only while the peer reads; None, or PortGone when
    /// the port failed (not merely full).
    fn send(&mut self, port: &mut impl Wire, bytes: &[u8]) -> Option<End> {
        port.set_wait(if self.stalled {
            Duration::ZERO
        } else {
            WRITE_WAIT
        });
        let r = port.write_all(bytes);
        port.set_wait(READ_WAIT);
        match r {
            Ok(()) => {
                if self.stalled {
                    tracing::info!(target: "edge_signer::serial", dropped = self.dropped, "the peer reads again");
                }
                self.stalled = false;
                None
            }
            Err(e) if not_yet(&e) => {
                self.dropped += 1;
                if !self.stalled {
                    tracing::warn!(target: "edge_signer::serial", "the peer is not reading (paused terminal, flow control): answers are dropped and counted until it reads again");
                }
                self.stalled = true;
                None
            }
            Err(_) => Some(End::PortGone),
        }
    }
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// `quit`, or the idle timeout: a new session starts on the same port.
    Again,
    /// The port failed (unplugged): reopen it.
    PortGone,
}

/// A session's state.
pub struct Session<'a> {
    shared: &'a Shared,
    nonce: String,
    json: bool,
    grant: Option<Grant>,
    idle: Duration,
    /// While `apply-bundle` collects base64 lines.
    collecting: Option<String>,
    out: Outbox,
    /// When the last command came (a grant ends after `GRANT_IDLE` without one).
    last_command: Instant,
    /// Echo what is typed and prompt (a person at a terminal); clients turn it off.
    echo: bool,
    /// The last byte echoed was CR (its LF is not echoed again).
    echoed_cr: bool,
    /// An answer or banner went out: prompt before waiting for the next line (not between
    /// lines typed ahead, which would put the prompt in front of an answer).
    prompt_due: bool,
}

/// What a person sees before typing a command (echo on only).
const PROMPT: &[u8] = b"> ";

/// The largest bundle accepted over the port, as base64 text (a 1 MiB payload and header).
const MAX_BUNDLE_B64: usize = 1_500_000;

fn fresh_nonce() -> String {
    let mut b = [0u8; 12];
    if getrandom(&mut b).is_err() {
        // Still unique per session: time and pid.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        return format!("{t:x}{:x}", std::process::id());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn getrandom(b: &mut [u8]) -> std::io::Result<()> {
    std::fs::File::open("/dev/urandom")?.read_exact(b)
}

impl<'a> Session<'a> {
    /// A new session (new nonce).
    pub fn new(shared: &'a Shared, idle: Duration) -> Session<'a> {
        Session {
            shared,
            nonce: fresh_nonce(),
            json: false,
            grant: None,
            idle,
            collecting: None,
            out: Outbox::default(),
            last_command: Instant::now(),
            echo: true,
            echoed_cr: false,
            prompt_due: false,
        }
    }

    /// Take bytes from the port; with echo on, write back what a terminal shows for them
    /// (printable text, a line end, backspace erasing one character).
    fn take(&mut self, bytes: &[u8], reader: &mut LineReader, port: &mut impl Wire) -> Option<End> {
        if !self.echo || self.collecting.is_some() {
            reader.push(bytes);
            return None;
        }
        let mut shown = Vec::with_capacity(bytes.len() + 8);
        for &b in bytes {
            let had = reader.pending();
            reader.push(&[b]);
            match b {
                b'\r' => shown.extend_from_slice(b"\r\n"),
                b'\n' if !self.echoed_cr => shown.extend_from_slice(b"\r\n"),
                b'\n' => {}
                0x08 | 0x7f if had > 0 => shown.extend_from_slice(b"\x08 \x08"),
                b if b >= 0x20 && b != 0x7f => shown.push(b),
                _ => {}
            }
            self.echoed_cr = b == b'\r';
        }
        self.out.send(port, &shown)
    }

    /// How long a grant lasts without a command (shorter in tests, with the test hooks).
    fn grant_idle() -> Duration {
        #[cfg(feature = "test-hooks")]
        if let Some(s) = std::env::var("EDGE_SIGNER_TEST_GRANT_IDLE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            return Duration::from_secs(s);
        }
        GRANT_IDLE
    }

    /// End the technician's grant, saying why (no-op without one).
    fn end_grant(&mut self, why: &str) {
        if self.grant.take().is_some() {
            self.log(
                "serial-auth-ended",
                format!("technician grant ended: {why}"),
            );
        }
    }

    fn log(&self, kind: &str, message: String) {
        tracing::info!(target: "edge_signer::serial", kind, "{message}");
        self.shared.identities.remember(vec![Event {
            kind: kind.into(),
            identity: String::new(),
            severity: Severity::Info,
            at: crate::clock::rfc3339(self.shared.now()),
            message,
        }]);
    }

    fn banner(&self) -> String {
        format!(
            "{PROTOCOL} serial={} nonce={}\r\n",
            self.shared.device(),
            self.nonce
        )
    }

    /// Serve until `quit`, the idle timeout, or a port error.
    pub fn run(&mut self, port: &mut impl Wire, reader: &mut LineReader) -> End {
        self.log(
            "serial-session",
            format!("session started (nonce {})", self.nonce),
        );
        let banner = self.banner();
        if let Some(end) = self.out.send(port, banner.as_bytes()) {
            return end;
        }
        self.prompt_due = true;
        let mut buf = [0u8; 512];
        let mut last = Instant::now();
        loop {
            if let Some(line) = reader.next_line() {
                last = Instant::now();
                match self.line(line, port) {
                    Some(end) => return end,
                    None => continue,
                }
            }
            if self.grant.is_some() && self.last_command.elapsed() > Self::grant_idle() {
                self.end_grant("no command for a minute");
            }
            if std::mem::take(&mut self.prompt_due) && self.echo && self.collecting.is_none() {
                if let Some(end) = self.out.send(port, PROMPT) {
                    return end;
                }
            }
            let n = match port.read(&mut buf) {
                Ok(0) => {
                    // A pty whose other side is closed reads 0: the technician is gone, and
                    // so is the grant. Wait, do not spin.
                    self.end_grant("the port was closed");
                    std::thread::sleep(Duration::from_millis(100));
                    0
                }
                Ok(n) => n,
                Err(e) if not_yet(&e) => 0,
                Err(_) => return End::PortGone,
            };
            if n == 0 {
                if last.elapsed() > self.idle {
                    let bye = Answer::error(408, "idle timeout: session ended").render(self.json);
                    let _ = self.out.send(port, bye.as_bytes());
                    self.log("serial-session", "session ended: idle timeout".into());
                    return End::Again;
                }
                continue;
            }
            if let Some(end) = self.take(&buf[..n], reader, port) {
                return end;
            }
        }
    }

    /// Handle one line; `Some` ends the session.
    fn line(&mut self, line: Line, port: &mut impl Wire) -> Option<End> {
        if self.grant.is_some() && self.last_command.elapsed() > Self::grant_idle() {
            self.end_grant("no command for a minute");
        }
        self.last_command = Instant::now();
        let line = match self.collect(line) {
            Ok(None) => return None,
            Ok(Some(line)) => line,
            Err(out) => {
                let text = out.render(self.json);
                return self.out.send(port, text.as_bytes());
            }
        };
        let cmd = match line {
            Line::TooLong => Err(super::protocol::LineError {
                code: 413,
                text: format!("line longer than {} bytes", super::protocol::MAX_LINE),
            }),
            Line::Text(t) => parse(&t),
        };
        let out = match cmd {
            // An empty line (Enter at a terminal) shows the banner again: the serial number
            // and the nonce a technician token is made for.
            Ok(Command::Empty) => {
                let banner = self.banner();
                self.prompt_due = true;
                return self.out.send(port, banner.as_bytes());
            }
            Ok(Command::Quit) => {
                let ok = Answer::default().render(self.json);
                let _ = self.out.send(port, ok.as_bytes());
                self.end_grant("quit");
                self.log("serial-session", "session ended: quit".into());
                return Some(End::Again);
            }
            Ok(Command::ApplyBundle) => match self.authorised("apply-bundle") {
                Err(a) => a,
                Ok(()) => {
                    self.log("serial-command", "apply-bundle".into());
                    self.collecting = Some(String::new());
                    return self.out.send(
                        port,
                        b"bundle: send it as base64 lines, then a line: end\r\n",
                    );
                }
            },
            Ok(c) => self.answer(c, port),
            Err(e) => Answer::error(e.code, e.text),
        };
        let text = out.render(self.json);
        self.prompt_due = true;
        self.out.send(port, text.as_bytes())
    }

    /// The answer to one command (progress of a rotation is written to `port` meanwhile).
    fn answer(&mut self, c: Command, port: &mut impl Wire) -> Answer {
        self.log("serial-command", c.describe());
        if let Some(privilege) = c.privilege() {
            if let Err(a) = self.authorised(privilege) {
                return a;
            }
        }
        let sh = self.shared;
        match c {
            Command::Help => help(),
            Command::Status => sh.status_answer(None),
            Command::Identity(n) => sh.status_answer(Some(&n)),
            Command::Token => sh.token_answer(),
            Command::Config => sh.config_answer(),
            Command::Clock => sh.clock_answer(),
            Command::Events(n) => sh.events_answer(n),
            Command::Version => sh.version_answer(),
            Command::Json(on) => {
                self.json = on;
                Answer::default()
            }
            Command::Echo(on) => {
                self.echo = on;
                Answer::default()
            }
            Command::Auth(t) => self.auth(&t),
            Command::Rotate(n) => self.rotate(&n, port),
            Command::Retire(n, g) => sh.ask(EngineRequest::Retire(n, g)),
            Command::Collect => sh.collect_answer(),
            Command::ApplyBundle | Command::Quit | Command::Empty => Answer::default(),
        }
    }

    fn authorised(&self, privilege: &str) -> Result<(), Answer> {
        if !self.shared.allow_privileged() {
            return Err(Answer::error(
                403,
                "privileged commands are off on this device (serial.allow_privileged)",
            ));
        }
        match &self.grant {
            None => Err(Answer::error(
                403,
                format!("{privilege} needs `auth TOKEN` first"),
            )),
            Some(g) if g.exp <= self.shared.now() => Err(Answer::error(
                401,
                "the token of this session has expired; auth again",
            )),
            Some(g) if !g.allow.iter().any(|a| a == privilege) => Err(Answer::error(
                403,
                format!("the token does not allow {privilege}"),
            )),
            Some(_) => Ok(()),
        }
    }

    fn auth(&mut self, token: &str) -> Answer {
        // Repeated failures on this port (across sessions) slow it down: 1, 2, 4 ... 30 s.
        let failures = self.shared.auth_failures();
        if failures > 0 {
            let wait = Duration::from_secs((1u64 << (failures - 1).min(5)).min(30));
            std::thread::sleep(wait);
        }
        let sh = self.shared;
        match auth::check(
            token,
            &sh.technician_keys(),
            &sh.device(),
            &self.nonce,
            sh.now(),
        ) {
            Ok(g) => {
                self.shared.set_auth_failures(0);
                self.log(
                    "serial-auth",
                    format!(
                        "technician key {} authorised {:?} until {}",
                        g.key_id,
                        g.allow,
                        crate::clock::rfc3339(g.exp)
                    ),
                );
                let mut a = Answer::default();
                a.field("allow", g.allow.join(","))
                    .field("until", crate::clock::rfc3339(g.exp));
                self.grant = Some(g);
                a
            }
            Err(e) => {
                self.shared.set_auth_failures(failures + 1);
                self.log("serial-auth-refused", e.to_string());
                Answer::error(e.code(), e.to_string())
            }
        }
    }

    fn rotate(&mut self, name: &str, port: &mut impl Wire) -> Answer {
        let sh = self.shared;
        let before = sh.generation(name);
        let a = sh.ask(EngineRequest::Rotate(name.to_owned()));
        if a.error.is_some() {
            return a;
        }
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < Duration::from_secs(300) {
            let Some(row) = sh.row(name) else {
                return Answer::error(404, format!("no identity '{name}'"));
            };
            let now = (row.state.as_str(), row.generation, row.pending_generation);
            let line = format!("[{}] generation {}", now.0, now.2.or(now.1).unwrap_or(0));
            if line != last {
                let mut p = Answer::default();
                p.field("progress", &line);
                let text = p.render(self.json);
                // Only the progress line, not the OK that ends an answer.
                let text = if self.json {
                    text.replace("\"ok\":true", "\"ok\":true,\"progress\":true")
                } else {
                    text.trim_end_matches("OK\r\n").to_owned()
                };
                if self.out.send(port, text.as_bytes()).is_some() {
                    break;
                }
                last = line;
            }
            if now.1 != before && now.2.is_none() && now.1.is_some() {
                let mut done = Answer::default();
                done.field("identity", name)
                    .field("generation", now.1.unwrap_or(0));
                return done;
            }
            if let Some(e) = &row.last_error {
                if now.2.is_none() {
                    return Answer::error(500, format!("rotation failed: {e}"));
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        Answer::error(504, "the rotation goes on in the daemon; see `status`")
    }

    /// While a bundle is being sent: take its lines; `end` applies it. Returns the line
    /// for the command parser when not collecting.
    fn collect(&mut self, line: Line) -> Result<Option<Line>, Answer> {
        let Some(b64) = self.collecting.as_mut() else {
            return Ok(Some(line));
        };
        let text = match line {
            Line::Text(t) => t,
            Line::TooLong => {
                self.collecting = None;
                return Err(Answer::error(
                    413,
                    "bundle line too long; bundle dropped, nothing changed",
                ));
            }
        };
        if text.trim_ascii() == b"end" {
            let data = self.collecting.take().unwrap_or_default();
            return Err(self.apply(&data));
        }
        if b64.len() + text.len() > MAX_BUNDLE_B64 {
            self.collecting = None;
            return Err(Answer::error(
                413,
                "bundle larger than 1 MiB; dropped, nothing changed",
            ));
        }
        b64.extend(
            text.iter()
                .filter(|b| !b.is_ascii_whitespace())
                .map(|&b| b as char),
        );
        Ok(None)
    }

    /// Apply a bundle received over the port: checked exactly like `config apply` (by the
    /// engine, the one writer). Its payload is never echoed.
    fn apply(&self, b64: &str) -> Answer {
        use base64::Engine as _;
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b64.as_bytes()) else {
            return Answer::error(400, "the bundle is not base64; nothing changed");
        };
        let a = self
            .shared
            .ask(EngineRequest::Apply(bytes, firmware_config::Channel::Local));
        match &a.error {
            None => self.log("serial-apply", "bundle applied over the port".into()),
            Some((_, e)) => self.log("serial-apply-refused", format!("bundle refused: {e}")),
        }
        a
    }
}

fn help() -> Answer {
    let mut a = Answer::default();
    for (c, what) in [
        (
            "status",
            "every identity: state, generation, days left, next action, last error",
        ),
        ("identity NAME", "one identity in full"),
        ("token", "token present, PIN accepted, label, serial"),
        (
            "config",
            "effective configuration and where each value came from",
        ),
        ("clock", "time now, its floor, whether it is trusted"),
        ("events [N]", "the newest N events"),
        ("version", "agent version, build time, protocol"),
        ("json on|off", "answers as one JSON object per line"),
        (
            "echo on|off",
            "echo what is typed and prompt (on for a terminal; clients turn it off)",
        ),
        (
            "auth TOKEN",
            "technician token (edge-signer diag token) for the commands below",
        ),
        ("rotate NAME", "privileged: rotate now, with progress"),
        ("retire NAME GEN", "privileged: retire a generation"),
        (
            "apply-bundle",
            "privileged: send a signed bundle as base64 lines, then end",
        ),
        (
            "collect",
            "privileged: status, events, config and clock at once",
        ),
        ("quit", "end the session (a new banner follows)"),
    ] {
        a.field(c, what);
    }
    a
}
