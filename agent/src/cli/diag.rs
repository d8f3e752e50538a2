//! `edge-signer diag`: the technician's laptop side of the serial protocol, and the
//! technician token maker.

use super::*;
use edge_signer::serial::client::{self, Reply, MAX_ANSWER_LINE};
use edge_signer::serial::protocol::{Line, LineReader};
use std::collections::VecDeque;
use std::io::{BufRead, Read, Write};

/// `diag token`: a token for one device and session, signed with the technician key.
fn make_token(a: &DiagArgs) -> Result<String> {
    let key = a
        .key
        .as_ref()
        .or(a.auth_key.as_ref())
        .context("diag token needs --key technician.key")?;
    let (Some(device), Some(nonce)) = (&a.device, &a.nonce) else {
        bail!("diag token needs --device SERIAL and --nonce N (both from the port's banner)");
    };
    sign_token(key, device, nonce, &a.allow, &a.ttl)
}

fn sign_token(
    key: &Path,
    device: &str,
    nonce: &str,
    allow: &[String],
    ttl: &str,
) -> Result<String> {
    if allow.is_empty() {
        bail!("name what the token allows: --allow rotate (retire, apply-bundle, collect)");
    }
    let pem = zeroize::Zeroizing::new(
        std::fs::read_to_string(key).with_context(|| format!("cannot read {}", key.display()))?,
    );
    let signer = firmware_config::FleetSigner::from_pem(&pem)?;
    let ttl: firmware_config::Duration = ttl
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--ttl: {e}"))?;
    let now = edge_signer::clock::Clock::now(&edge_signer::clock::SystemClock);
    Ok(edge_signer::serial::auth::issue(
        &signer,
        device,
        nonce,
        allow,
        now,
        ttl.secs(),
    )?)
}

struct Port {
    port: Box<dyn serialport::SerialPort>,
    reader: LineReader,
    lines: VecDeque<Line>,
}

impl Port {
    fn open(path: &Path, baud: u32) -> Result<Port> {
        let port = serialport::new(path.to_string_lossy(), baud)
            .timeout(Duration::from_millis(200))
            .open()
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Port {
            port,
            reader: LineReader::with_max(MAX_ANSWER_LINE),
            lines: VecDeque::new(),
        })
    }

    fn send(&mut self, line: &str) -> Result<()> {
        self.port.write_all(format!("{line}\r\n").as_bytes())?;
        Ok(())
    }

    /// The next line (30 s at most: a rotation prints progress meanwhile).
    fn line(&mut self) -> Result<String> {
        let start = std::time::Instant::now();
        loop {
            match self.lines.pop_front() {
                Some(Line::Text(l)) => return Ok(String::from_utf8_lossy(&l).trim_end().to_owned()),
                Some(Line::TooLong) => bail!(
                    "the device sent a line longer than {MAX_ANSWER_LINE} bytes (not an edge-signer port?)"
                ),
                None => {}
            }
            let mut buf = [0u8; 512];
            match self.port.read(&mut buf) {
                Ok(n) => self.lines.extend(self.reader.feed(&buf[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => return Err(e.into()),
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("no answer from the device within 30 s (right port and baud rate?)");
            }
        }
    }

    /// A fresh session: its banner's serial and nonce. `quit` ends whatever session the
    /// port was in (its banner may still be waiting unread): the banner after its OK counts.
    fn session(&mut self) -> Result<(String, String)> {
        // What an earlier client left unread (the OK and banner after its own quit) would
        // pass for this quit's answer: drop it first (quiet for 200 ms, 2 s at most).
        let start = std::time::Instant::now();
        let mut buf = [0u8; 512];
        while start.elapsed() < Duration::from_secs(2) {
            match self.port.read(&mut buf) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        self.reader = LineReader::with_max(MAX_ANSWER_LINE);
        self.lines.clear();
        // An empty line first: it ends a half line someone left on the port.
        self.send("")?;
        self.send("quit")?;
        let mut quit_answered = false;
        loop {
            let l = self.line()?;
            if l == "OK" || l.starts_with("{\"data\"") {
                quit_answered = true;
                continue;
            }
            if !quit_answered {
                continue;
            }
            if let Some(fields) = client::banner(&l) {
                // A program reads the answers: no echo, no prompt.
                self.send("echo off")?;
                self.answer(false, &mut std::io::sink())?;
                return Ok(fields);
            }
        }
    }

    /// The answer to one command: lines until OK / ERR (text) or a final JSON object.
    /// Device text is shown with its control characters escaped (`client::reply`).
    fn answer(&mut self, json: bool, out: &mut impl Write) -> Result<bool> {
        loop {
            match client::reply(&self.line()?, json) {
                Reply::Progress(p) => eprintln!("{p}"),
                Reply::Body(l) => writeln!(out, "{l}")?,
                Reply::Other => {}
                Reply::End { ok, show } => {
                    match (show, json) {
                        (Some(s), true) => writeln!(out, "{s}")?,
                        (Some(e), false) => eprintln!("error {e}"),
                        (None, _) => {}
                    }
                    return Ok(ok);
                }
            }
        }
    }
}

/// `edge-signer diag ...`.
pub(crate) fn diag_cmd(a: DiagArgs) -> Result<i32> {
    if a.words.first().map(String::as_str) == Some("token") && a.port.is_none() {
        println!("{}", make_token(&a)?);
        return Ok(0);
    }
    let path = a
        .port
        .as_ref()
        .context("diag needs --port /dev/ttyUSB0 (or `diag token ...`)")?;
    let mut port = Port::open(path, a.baud)?;
    let (device, nonce) = port.session()?;
    let result = on_session(&a, &mut port, (&device, &nonce));
    // The technician's grant ends with the command: a session left open would keep it for
    // whoever plugs in next.
    let _ = port.send("quit");
    result
}

/// What `diag` does inside one session (`session`: the banner's serial and nonce).
fn on_session(a: &DiagArgs, port: &mut Port, (device, nonce): (&str, &str)) -> Result<i32> {
    let path = a.port.as_deref().unwrap_or(std::path::Path::new("-"));
    let mut stdout = std::io::stdout();
    if let Some(key) = &a.auth_key {
        let mut allow = a.allow.clone();
        if allow.is_empty() {
            allow.extend(a.words.first().cloned());
        }
        let token = sign_token(key, device, nonce, &allow, &a.ttl)?;
        port.send(&format!("auth {token}"))?;
        if !port.answer(false, &mut std::io::sink())? {
            return Ok(2);
        }
    }
    if a.json {
        port.send("json on")?;
        port.answer(true, &mut std::io::sink())?;
    }
    if a.words.is_empty() {
        // Interactive: a line from the keyboard, the device's answer, and so on.
        eprintln!(
            "connected to {} (serial {}); type help, quit to end",
            path.display(),
            edge_signer::text::printable(device)
        );
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            port.send(&line)?;
            port.answer(a.json, &mut stdout)?;
            if line.trim() == "quit" {
                break;
            }
        }
        return Ok(0);
    }
    if a.words[0] == "apply-bundle" {
        let file = a
            .words
            .get(1)
            .context("usage: diag --port P --auth-key K apply-bundle FILE")?;
        let bytes = std::fs::read(file).with_context(|| format!("cannot read {file}"))?;
        port.send("apply-bundle")?;
        let prompt = port.line()?;
        if !prompt.starts_with("bundle:") {
            eprintln!("{}", edge_signer::text::printable(&prompt));
            return Ok(2);
        }
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        for chunk in b64.as_bytes().chunks(76) {
            port.send(&String::from_utf8_lossy(chunk))?;
        }
        port.send("end")?;
    } else {
        port.send(&a.words.join(" "))?;
    }
    Ok(if port.answer(a.json, &mut stdout)? {
        0
    } else {
        2
    })
}
