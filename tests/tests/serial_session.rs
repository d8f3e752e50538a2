//! Serial sessions against what a person and a stalled peer do: grants that end, a peer that
//! stops reading, a person at a terminal (echo, prompt, backspace, the banner on Enter).

use edge_signer_tests::serial_port::*;
use edge_signer_tests::*;
use std::io::Write;
use std::time::{Duration, Instant};

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
    let mut noise: Vec<u8> = (0..200 * 1024)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect();
    // Then commands with long answers: more than every buffer on the way holds.
    noise.extend_from_slice(b"\r\n");
    for _ in 0..60 {
        noise.extend_from_slice(b"config\r\n");
    }
    // From another thread: socat, between the two ptys, stops taking input while its
    // output to us is full, which a real serial line does not.
    let mut w = line.f.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&noise).unwrap());
    // Nobody reads until the daemon has found out (its answers no longer go through). Under
    // load socat may stop forwarding our input before the daemon's output fills the pty:
    // then there is no stall to see, and the rest still checks the session is the same.
    let stalled = poll_until(15, Duration::from_millis(100), || {
        log_count(&env, "edge_signer::serial: the peer is not reading") > 0
    });
    if !stalled {
        eprintln!("the daemon never saw a stalled peer this run (socat stopped first)");
    }
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
