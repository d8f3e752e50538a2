//! Instructions the daemon executes per signing-API request, counted by valgrind's callgrind
//! (a count does not move with a noisy neighbour, so a change can be compared with the one
//! before it): ES256 and PS256, keep-alive and a connection per request. Each total is split
//! into the token's part (the module's own `C_*` functions, inclusive: SoftHSM signing in
//! process) and the daemon's own work outside it (HTTP, JSON, base64, the policy, the
//! runtime, syscalls' user side). A gateway's token does its part in hardware; the rest is
//! what the agent adds to every request.
//!
//! Uses the release binary (`cargo build --release -p edge-signer` first; scripts/bench does).

use edge_signer_tests::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

/// Requests counted per case (under valgrind each takes a few ms).
const N: usize = 200;

/// The module's entry points a signature request goes through.
const TOKEN_FUNCTIONS: [&str; 7] = [
    "C_GetAttributeValue",
    "C_FindObjectsInit",
    "C_FindObjects",
    "C_FindObjectsFinal",
    "C_SignInit",
    "C_Sign",
    "C_GetSessionInfo",
];

fn request(identity: &str, alg: &str) -> Vec<u8> {
    let body = format!(r#"{{"alg":"{alg}","data":"{}"}}"#, "WlpaWlpa".repeat(22));
    format!(
        "POST /v1/identities/{identity}/sign HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Send `req` on `s` and read one whole 200 answer.
fn exchange(s: &mut UnixStream, req: &[u8]) {
    s.write_all(req).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the API closed the connection");
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = &got[..end];
            assert!(
                head.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(head)
            );
            let len = serving::ok_body_len(head);
            while got.len() < end + 4 + len {
                let n = s.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            return;
        }
    }
}

fn callgrind_control(args: &[&str], pid: u32) {
    let out = Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .output()
        .expect("callgrind_control (valgrind)");
    assert!(out.status.success(), "callgrind_control {args:?}: {out:?}");
}

/// Total instructions of a dump and the inclusive instructions of the token's functions.
fn split(dump: &std::path::Path) -> (f64, f64) {
    let out = Command::new("callgrind_annotate")
        .args(["--inclusive=yes", "--threshold=100"])
        .arg(dump)
        .output()
        .expect("callgrind_annotate");
    let annotated = String::from_utf8_lossy(&out.stdout);
    if let Ok(dir) = std::env::var("BENCH_KEEP_DUMPS") {
        let _ = std::fs::copy(
            dump,
            std::path::Path::new(&dir).join(dump.file_name().unwrap()),
        );
    }
    // "1,234,567 (100.0%)  PROGRAM TOTALS"
    let total = annotated
        .lines()
        .find(|l| l.contains("PROGRAM TOTALS"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.replace(',', "").parse::<f64>().ok())
        .unwrap_or(0.0);
    let token: f64 = annotated
        .lines()
        .filter(|l| l.contains("libsofthsm2"))
        .filter_map(|l| {
            let (count, rest) = l.trim_start().split_once(' ')?;
            let func = rest.split(':').nth(1)?.split_whitespace().next()?;
            TOKEN_FUNCTIONS
                .contains(&func)
                .then(|| count.replace(',', "").parse::<f64>().ok())
                .flatten()
        })
        .sum();
    (total, token)
}

/// Two enrolled identities (`gw` P-256, `rsa` RSA-2048) and the API config, then the
/// release daemon under callgrind with counting off; returns it once its API answers.
fn daemon_under_callgrind(env: &Env) -> Guard {
    env.make_ca("ca");
    env.serving_config(
        "1d",
        &format!(
            "\n[[identity]]\nname = \"rsa\"\nkey_type = \"rsa-2048\"\nsubject = {{ cn = \"gw-0042-rsa\" }}\n\
             issuer = \"portal\"\noverlap = \"1d\"\n\
             \n[api]\nenabled = true\nsocket = \"{{p}}/api.sock\"\n\
             [[api.allow]]\nuids = [{}]\nidentities = [\"gw\", \"rsa\"]\noperations = [\"sign\"]\n",
            my_uid()
        ),
    );
    let _ca = env.portal_ca(CaMode::Good);
    {
        let _enrol = env.quiet_daemon();
        env.wait_current("gw", 1);
        env.wait_current("rsa", 1);
    }
    let _ = std::fs::remove_file(env.path("api.sock"));
    let prefix = env.path("callgrind.out");
    let daemon = Guard(
        Command::new("valgrind")
            .args(["--tool=callgrind", "--instr-atstart=no"])
            .arg(format!("--callgrind-out-file={}.%p", prefix.display()))
            .arg(bin())
            .arg("run")
            .current_dir(env.dir.path())
            .envs(env.envs())
            .env("EDGE_SIGNER_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(env.path("daemon.log")).unwrap())
            .spawn()
            .expect("valgrind"),
    );
    let sock = env.path("api.sock");
    let start = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no API under valgrind"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = Env::new();
    let daemon = daemon_under_callgrind(&env);
    let pid = daemon.0.id();
    let sock = env.path("api.sock");
    println!("instructions per signing-API request (valgrind callgrind, release daemon, SoftHSM in process, {N} requests each)");
    println!(
        "{:<34} {:>12} {:>12} {:>14}",
        "request", "total", "token C_*", "daemon's own"
    );
    for (label, identity, alg, per_connection) in [
        ("ES256 (P-256), keep-alive", "gw", "ES256", false),
        ("ES256, connection per request", "gw", "ES256", true),
        ("PS256 (RSA-2048), keep-alive", "rsa", "PS256", false),
        ("PS256, connection per request", "rsa", "PS256", true),
    ] {
        let req = request(identity, alg);
        let mut kept = UnixStream::connect(&sock).unwrap();
        // Warm: the key's first use, the connection's buffers.
        for _ in 0..5 {
            exchange(&mut kept, &req);
        }
        callgrind_control(&["--zero"], pid);
        callgrind_control(&["--instr=on"], pid);
        for _ in 0..N {
            if per_connection {
                exchange(&mut UnixStream::connect(&sock).unwrap(), &req);
            } else {
                exchange(&mut kept, &req);
            }
        }
        callgrind_control(&["--instr=off"], pid);
        callgrind_control(&["--dump"], pid);
        // The newest dump of the daemon's process.
        let dump = std::fs::read_dir(env.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.to_string_lossy()
                    .contains(&format!("callgrind.out.{pid}"))
            })
            .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .expect("a callgrind dump");
        let (total, token) = split(&dump);
        let (total, token) = (total / N as f64, token / N as f64);
        println!(
            "{label:<34} {total:>12.0} {token:>12.0} {:>14.0}",
            total - token
        );
        std::fs::remove_file(&dump).unwrap();
    }
    drop(daemon);
}
