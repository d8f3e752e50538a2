//! The technician line protocol, version 1: what a line from the port means, and how
//! answers are written. A person types it in picocom/minicom/screen; a program parses it.
//!
//! ```text
//! edge-signer-diag 1 serial=<device serial> nonce=<hex>     (banner, once per session)
//! > status
//! identities: 2
//! gw.state: active
//! ...
//! OK
//! > identity nope
//! ERR 404 no identity 'nope'
//! ```
//! In `json` mode each answer is one JSON object on one line: `{"ok":true,"data":{...}}` or
//! `{"ok":false,"code":404,"error":"..."}`. Lines end in CR LF on output; CR, LF or CR LF on
//! input. Never panics on any input: a line longer than `MAX_LINE` is refused whole,
//! non-UTF-8 and control characters are refused.

/// Protocol name and version in the banner.
pub const PROTOCOL: &str = "edge-signer-diag 1";
/// Longest accepted line (bytes, without the line end).
pub const MAX_LINE: usize = 8192;

/// One command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// List the commands.
    Help,
    /// Every identity, one block each.
    Status,
    /// One identity in full.
    Identity(String),
    /// The token: present, PIN accepted, label, serial.
    Token,
    /// The effective configuration and where each value came from.
    Config,
    /// The clock, its floor, whether it is trusted.
    Clock,
    /// The newest N events.
    Events(usize),
    /// Agent version and build time.
    Version,
    /// Answers as one JSON object per line (`json on|off`).
    Json(bool),
    /// Echo what is typed, and prompt, for a terminal that does not echo (`echo on|off`;
    /// on at the start of a session; clients turn it off).
    Echo(bool),
    /// Present a technician token.
    Auth(String),
    /// Rotate an identity now (privileged).
    Rotate(String),
    /// Retire a generation (privileged).
    Retire(String, u32),
    /// Apply a bundle sent as base64 lines ending with a line `end` (privileged).
    ApplyBundle,
    /// A diagnostics bundle: status, events, config, clock in one answer (privileged).
    Collect,
    /// End the session.
    Quit,
    /// An empty line (ignored).
    Empty,
}

impl Command {
    /// The command as a person would type it (for the event log; a token is not shown).
    pub fn describe(&self) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        match self {
            Command::Help => "help".into(),
            Command::Status => "status".into(),
            Command::Identity(n) => format!("identity {n}"),
            Command::Token => "token".into(),
            Command::Config => "config".into(),
            Command::Clock => "clock".into(),
            Command::Events(n) => format!("events {n}"),
            Command::Version => "version".into(),
            Command::Json(b) => format!("json {}", on(*b)),
            Command::Echo(b) => format!("echo {}", on(*b)),
            Command::Auth(_) => "auth (token not shown)".into(),
            Command::Rotate(n) => format!("rotate {n}"),
            Command::Retire(n, g) => format!("retire {n} {g}"),
            Command::ApplyBundle => "apply-bundle".into(),
            Command::Collect => "collect".into(),
            Command::Quit => "quit".into(),
            Command::Empty => "(empty line)".into(),
        }
    }

    /// The privilege name a technician token must allow, if any.
    pub fn privilege(&self) -> Option<&'static str> {
        match self {
            Command::Rotate(_) => Some("rotate"),
            Command::Retire(..) => Some("retire"),
            Command::ApplyBundle => Some("apply-bundle"),
            Command::Collect => Some("collect"),
            _ => None,
        }
    }
}

/// Why a line was refused (code, text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 400 bad request, 404 unknown, 413 too long.
    pub code: u16,
    /// What is wrong and what to type instead.
    pub text: String,
}

fn err(code: u16, text: impl Into<String>) -> LineError {
    LineError {
        code,
        text: text.into(),
    }
}

fn name_arg(cmd: &str, arg: Option<&str>) -> Result<String, LineError> {
    match arg {
        Some(n) if firmware_config::validate::safe_name(n) => Ok(n.to_owned()),
        Some(n) => Err(err(
            400,
            format!(
                "'{}' is not an identity name",
                n.chars().take(64).collect::<String>()
            ),
        )),
        None => Err(err(400, format!("usage: {cmd} NAME"))),
    }
}

/// Parse one line (without its line end).
pub fn parse(line: &[u8]) -> Result<Command, LineError> {
    if line.len() > MAX_LINE {
        return Err(err(413, format!("line longer than {MAX_LINE} bytes")));
    }
    let text = std::str::from_utf8(line).map_err(|_| err(400, "line is not UTF-8"))?;
    if text.chars().any(|c| c.is_control() && c != '\t') {
        return Err(err(400, "control characters in the line"));
    }
    let mut words = text.split_whitespace();
    let Some(cmd) = words.next() else {
        return Ok(Command::Empty);
    };
    let arg = words.next();
    let extra = words.next();
    let cmd_l = cmd.to_ascii_lowercase();
    let no_more = |c: Command| match extra {
        None => Ok(c),
        Some(_) => Err(err(400, format!("too many arguments to {cmd_l}"))),
    };
    match (cmd_l.as_str(), arg) {
        ("help" | "?", None) => Ok(Command::Help),
        ("status", None) => Ok(Command::Status),
        ("identity", _) => no_more(Command::Identity(name_arg("identity", arg)?)),
        ("token", None) => Ok(Command::Token),
        ("config", None) => Ok(Command::Config),
        ("clock", None) => Ok(Command::Clock),
        ("events", None) => Ok(Command::Events(20)),
        ("events", Some(n)) => match n.parse::<usize>() {
            Ok(n @ 1..=200) => no_more(Command::Events(n)),
            _ => Err(err(400, "usage: events [N], N from 1 to 200")),
        },
        ("version", None) => Ok(Command::Version),
        ("json", Some("on")) => no_more(Command::Json(true)),
        ("json", Some("off")) => no_more(Command::Json(false)),
        ("json", None) => Ok(Command::Json(true)),
        ("echo", Some("on")) => no_more(Command::Echo(true)),
        ("echo", Some("off")) => no_more(Command::Echo(false)),
        ("echo", _) => Err(err(400, "usage: echo on|off")),
        ("auth", Some(t)) => no_more(Command::Auth(t.to_owned())),
        ("auth", None) => Err(err(
            400,
            "usage: auth TOKEN (made with `edge-signer diag token`)",
        )),
        ("rotate", _) => no_more(Command::Rotate(name_arg("rotate", arg)?)),
        ("retire", _) => {
            let name = name_arg("retire NAME GENERATION", arg)?;
            match extra.and_then(|g| g.parse::<u32>().ok()) {
                Some(g) if words.next().is_none() => Ok(Command::Retire(name, g)),
                _ => Err(err(400, "usage: retire NAME GENERATION")),
            }
        }
        ("apply-bundle", None) => Ok(Command::ApplyBundle),
        ("collect", None) => Ok(Command::Collect),
        ("quit" | "exit", None) => Ok(Command::Quit),
        (
            "help" | "?" | "status" | "token" | "config" | "clock" | "version" | "apply-bundle"
            | "collect" | "quit" | "exit",
            Some(_),
        ) => Err(err(400, format!("{cmd_l} takes no argument"))),
        (_, _) => Err(err(
            404,
            format!(
                "unknown command '{}'; type help",
                cmd.chars().take(32).collect::<String>()
            ),
        )),
    }
}

/// Splits a byte stream into lines: CR, LF or CR LF end a line; a line over `MAX_LINE` (or
/// the cap given to `with_max`) is dropped up to its end and reported once as too long.
#[derive(Debug, Default)]
pub struct LineReader {
    /// The cap when it is not `MAX_LINE`.
    max: Option<usize>,
    buf: Vec<u8>,
    overflow: bool,
    last_cr: bool,
    /// Complete lines not taken yet (kept across sessions: what follows `quit` in the same
    /// read belongs to the next session). Bounded: a flood drops the oldest.
    queue: std::collections::VecDeque<Line>,
    last_byte: Option<std::time::Instant>,
}

/// A half line older than this is dropped.
const STALE_FRAGMENT: std::time::Duration = std::time::Duration::from_secs(30);

/// Lines kept waiting at most.
const MAX_QUEUED: usize = 64;

/// What the reader produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line.
    Text(Vec<u8>),
    /// A line that was too long (its bytes were dropped).
    TooLong,
}

impl LineReader {
    /// A reader whose lines may be up to `max` bytes.
    pub fn with_max(max: usize) -> LineReader {
        LineReader {
            max: Some(max),
            ..LineReader::default()
        }
    }

    /// Feed bytes; complete lines wait in the queue. A half line left alone for 30 s (a
    /// cable pulled mid-command) is dropped before new bytes are taken.
    pub fn push(&mut self, bytes: &[u8]) {
        let now = std::time::Instant::now();
        if self
            .last_byte
            .is_some_and(|t| now.duration_since(t) > STALE_FRAGMENT)
        {
            self.buf.clear();
            self.overflow = false;
        }
        self.last_byte = Some(now);
        for l in self.feed(bytes) {
            if self.queue.len() == MAX_QUEUED {
                self.queue.pop_front();
            }
            self.queue.push_back(l);
        }
    }

    /// Bytes of the line being typed (not complete yet).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete line.
    pub fn next_line(&mut self) -> Option<Line> {
        self.queue.pop_front()
    }

    /// Feed bytes; returns complete lines.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' && self.last_cr {
                self.last_cr = false;
                continue;
            }
            self.last_cr = b == b'\r';
            if b == b'\r' || b == b'\n' {
                if self.overflow {
                    out.push(Line::TooLong);
                } else {
                    out.push(Line::Text(std::mem::take(&mut self.buf)));
                }
                self.buf.clear();
                self.overflow = false;
                continue;
            }
            if self.overflow {
                continue;
            }
            // Backspace and delete edit the line, as a person at a terminal expects.
            if b == 0x08 || b == 0x7f {
                self.buf.pop();
                continue;
            }
            if self.buf.len() >= self.max.unwrap_or(MAX_LINE) {
                self.overflow = true;
                self.buf.clear();
                continue;
            }
            self.buf.push(b);
        }
        out
    }
}

/// An answer: `key: value` lines, then `OK` or `ERR code text`.
#[derive(Debug, Default)]
pub struct Answer {
    /// The fields, in order.
    pub fields: Vec<(String, String)>,
    /// Ok, or (code, text).
    pub error: Option<(u16, String)>,
    /// In JSON mode, `data` is this value instead of the fields as an object.
    pub data: Option<serde_json::Value>,
}

fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl Answer {
    /// Add a field.
    pub fn field(&mut self, k: impl Into<String>, v: impl std::fmt::Display) -> &mut Self {
        self.fields.push((k.into(), v.to_string()));
        self
    }

    /// A refusal.
    pub fn error(code: u16, text: impl Into<String>) -> Answer {
        Answer {
            fields: Vec::new(),
            error: Some((code, text.into())),
            data: None,
        }
    }

    /// Written for a person (`key: value` lines, CR LF) or a program (one JSON line).
    pub fn render(&self, json: bool) -> String {
        if json {
            let v = match (&self.error, &self.data) {
                (None, Some(data)) => serde_json::json!({"ok": true, "data": data}),
                (None, None) => serde_json::json!({
                    "ok": true,
                    "data": self.fields.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
                }),
                (Some((code, text)), _) => {
                    serde_json::json!({"ok": false, "code": code, "error": text})
                }
            };
            return format!("{v}\r\n");
        }
        let mut out = String::new();
        for (k, v) in &self.fields {
            out += &format!("{}: {}\r\n", clean(k), clean(v));
        }
        match &self.error {
            None => out += "OK\r\n",
            Some((code, text)) => out += &format!("ERR {code} {}\r\n", clean(text)),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn commands_parse_and_refusals_say_why() {
        assert_eq!(parse(b"status"), Ok(Command::Status));
        assert_eq!(parse(b"  IDENTITY gw "), Ok(Command::Identity("gw".into())));
        assert_eq!(parse(b"events 5"), Ok(Command::Events(5)));
        assert_eq!(parse(b"retire gw 3"), Ok(Command::Retire("gw".into(), 3)));
        assert_eq!(parse(b""), Ok(Command::Empty));
        assert_eq!(parse(b"identity ../x").unwrap_err().code, 400);
        assert_eq!(parse(b"frobnicate").unwrap_err().code, 404);
        assert_eq!(parse(b"status now").unwrap_err().code, 400);
        assert_eq!(parse(b"st\x1batus").unwrap_err().code, 400);
        assert_eq!(parse(b"\xff\xfe").unwrap_err().code, 400);
        assert_eq!(parse(&vec![b'a'; MAX_LINE + 1]).unwrap_err().code, 413);
        assert_eq!(Command::Rotate("gw".into()).privilege(), Some("rotate"));
    }

    #[test]
    fn line_ends_and_overflow() {
        let mut r = LineReader::default();
        assert_eq!(
            r.feed(b"a\r\nb\rc\n"),
            vec![
                Line::Text(b"a".to_vec()),
                Line::Text(b"b".to_vec()),
                Line::Text(b"c".to_vec())
            ]
        );
        let mut big = vec![b'x'; MAX_LINE + 10];
        big.extend_from_slice(b"\nstatus\n");
        assert_eq!(
            r.feed(&big),
            vec![Line::TooLong, Line::Text(b"status".to_vec())]
        );
    }

    #[test]
    fn answers_render_for_people_and_programs() {
        let mut a = Answer::default();
        a.field("state", "active").field("evil", "a\r\nOK");
        assert_eq!(a.render(false), "state: active\r\nevil: a  OK\r\nOK\r\n");
        assert_eq!(
            Answer::error(404, "no identity 'x'").render(true),
            "{\"code\":404,\"error\":\"no identity 'x'\",\"ok\":false}\r\n"
        );
    }

    proptest! {
        #[test]
        fn parser_and_reader_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = parse(&bytes);
            let mut r = LineReader::default();
            for l in r.feed(&bytes) {
                if let Line::Text(t) = l {
                    prop_assert!(t.len() <= MAX_LINE);
                    let _ = parse(&t);
                }
            }
        }
    }
}
