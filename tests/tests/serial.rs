//! Technician diagnostics over a pseudo-terminal pair (socat): the daemon serves one end,
//! the test (or `edge-signer diag`) the other.

use edge_signer_tests::serial_port::*;
use edge_signer_tests::*;
use std::io::Write;
use std::time::Duration;

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
    env.wait_log("cannot open the diagnostics port (retrying every 2 s)");
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
