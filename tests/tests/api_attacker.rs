//! The signing API and the proxies played from an attacker's side, through the real binary:
//! a second uid (`nobody`, through setpriv) floods the API socket, a reload takes a grant
//! away from an open keep-alive connection and from an open proxy connection, and a reload
//! whose new proxy cannot start keeps everything else serving.

use edge_signer_tests::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Identity gw; the API on api.sock, this uid may sign with gw and read status.
/// (`ca` must exist: `env.make_ca("ca")`.)
fn api_config(env: &Env, extra: &str) {
    env.serving_config(
        "1d",
        &format!(
            r#"
[api]
enabled = true
socket = "{{p}}/api.sock"

[[api.allow]]
uids = [{uid}]
identities = ["gw"]
operations = ["sign", "status", "list"]
{extra}"#,
            uid = my_uid()
        ),
    );
}

fn start(env: &Env) -> (Guard, PortalCa) {
    let ca = env.portal_ca(CaMode::Good);
    let daemon = env.daemon();
    env.wait_served("gw", 1);
    env.wait_log("signing API listening");
    (daemon, ca)
}

const SIGN: &str = r#"{"alg":"ES256","data":"aGVsbG8="}"#;

/// One keep-alive request on `s`: (status code, body).
fn ask(s: &mut UnixStream, path: &str, body: &str) -> (u16, String) {
    // One write: `write!` on the bare socket writes each piece of the format on its own, and
    // a daemon that refuses on the request line (403 before the body) may have answered and
    // closed before the last piece, which then meets a closed socket.
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let mut len = 0;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        if h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut b = vec![0; len];
    r.read_exact(&mut b).unwrap();
    let code = status
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap();
    (code, String::from_utf8_lossy(&b).into_owned())
}

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn helper() -> std::path::PathBuf {
    bin().with_file_name("edge-signer-test-servers")
}

/// 1,100 connections of a uid with no rule, each half-sending a 1 MB bundle: the daemon
/// buffers none of it (403 before the body), holds at most its per-uid cap of them, and an
/// allowed caller is answered within 1 s throughout. Fds and RSS go back afterwards.
#[test]
fn a_local_uid_flooding_the_api_holds_nobody_out_and_grows_nothing() {
    let env = Env::new();
    env.make_ca("ca");
    api_config(&env, "");
    let (daemon, _ca) = start(&env);
    let pid = daemon.0.id();
    let mut me = UnixStream::connect(env.path("api.sock")).unwrap();
    assert_eq!(ask(&mut me, "/v1/identities/gw/sign", SIGN).0, 200);
    let (rss0, fds0) = (proc_status(pid, "VmRSS:"), fds(pid));

    std::fs::set_permissions(
        env.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut attacker = Guard(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(helper())
            .args(["flood", &env.path_str("api.sock"), "1100"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(attacker.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("opened "), "{line}");

    // While the attacker sends: the allowed caller, on a fresh connection each time.
    let (mut worst, mut peak_rss, mut peak_fds) = (Duration::ZERO, 0, 0);
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let t = Instant::now();
        let mut c = UnixStream::connect(env.path("api.sock")).unwrap();
        let (code, body) = ask(&mut c, "/v1/identities/gw/sign", SIGN);
        assert_eq!(code, 200, "{body}");
        worst = worst.max(t.elapsed());
        peak_rss = peak_rss.max(proc_status(pid, "VmRSS:"));
        peak_fds = peak_fds.max(fds(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "sent");
    peak_rss = peak_rss.max(proc_status(pid, "VmRSS:"));
    peak_fds = peak_fds.max(fds(pid));
    let log = std::fs::read_to_string(env.path("daemon.log")).unwrap();
    assert!(worst < Duration::from_secs(1), "slowest answer {worst:?}");
    assert!(
        peak_rss < rss0 + 64 * 1024,
        "RSS {rss0} -> {peak_rss} KiB\n{log}"
    );
    // Its per-uid cap (64) of connections at most, beside ours and the daemon's own.
    assert!(peak_fds < fds0 + 64 + 8, "fds {fds0} -> {peak_fds}");
    // Refusals are logged once a minute per uid, not once per request.
    let said = log
        .lines()
        .filter(|l| l.contains("refused") && l.contains("uid=65534"))
        .count();
    assert!((1..=2).contains(&said), "{said} refusal lines\n{log}");

    drop(attacker);
    let back = poll_until(10, Duration::from_millis(100), || fds(pid) <= fds0 + 2);
    assert!(back, "fds {fds0} -> {} after the attacker left", fds(pid));
    assert!(proc_status(pid, "VmRSS:") < rss0 + 64 * 1024);
    let mut c = UnixStream::connect(env.path("api.sock")).unwrap();
    assert_eq!(ask(&mut c, "/v1/identities/gw/sign", SIGN).0, 200);
    eprintln!(
        "flood: slowest allowed answer {worst:?}; RSS {rss0} -> {peak_rss} KiB; fds {fds0} -> {peak_fds}"
    );
}

/// A rule removed by a reload stops the next request of an already open keep-alive
/// connection.
#[test]
fn a_removed_rule_stops_the_next_request_on_an_open_connection() {
    let env = Env::new();
    env.make_ca("ca");
    api_config(&env, "");
    let (daemon, _ca) = start(&env);
    let mut open = UnixStream::connect(env.path("api.sock")).unwrap();
    assert_eq!(ask(&mut open, "/v1/identities/gw/sign", SIGN).0, 200);

    let cfg = std::fs::read_to_string(env.path("defaults.toml")).unwrap();
    std::fs::write(
        env.path("defaults.toml"),
        cfg.replace(
            r#"operations = ["sign", "status", "list"]"#,
            r#"operations = ["status"]"#,
        ),
    )
    .unwrap();
    let pid = daemon.0.id().to_string();
    run_ok(Command::new("kill").args(["-HUP", &pid]), "kill -HUP");
    let refused = poll_until(10, Duration::from_millis(100), || {
        ask(&mut open, "/v1/identities/gw/sign", SIGN).0 == 403
    });
    assert!(refused, "the open connection still signs after the reload");
}

use edge_signer_tests::serving::proxy_table as proxy;

/// `socat - UNIX-CONNECT:sock` as nobody: a caller holding one proxied connection open.
fn nobody_connected(env: &Env, sock: &str) -> Guard {
    std::fs::set_permissions(
        env.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    Guard(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "socat"])
            .args(["-", &format!("UNIX-CONNECT:{}", env.path_str(sock))])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

fn reload_with(env: &Env, daemon: &Guard, from: &str, to: &str) {
    let cfg = std::fs::read_to_string(env.path("defaults.toml")).unwrap();
    assert!(cfg.contains(from), "{from} not in the config");
    std::fs::write(env.path("defaults.toml"), cfg.replace(from, to)).unwrap();
    let pid = daemon.0.id().to_string();
    run_ok(Command::new("kill").args(["-HUP", &pid]), "kill -HUP");
}

/// A reload that takes a uid off a proxy's list cuts its open connection; a reload whose
/// new proxy cannot start (an unreadable server_ca, a port in use) keeps every other
/// listener, and the old configuration of a changed proxy, serving, and says what is down.
#[test]
fn a_reload_cuts_callers_no_longer_allowed_and_a_broken_proxy_downs_only_itself() {
    let env = Env::new();
    env.make_ca("ca");
    env.openssl_leaf("ca", "server");
    let (_www, www) = env.s_server("ca", &[], None);
    let (_rev, rev) = env.s_server("ca", &["-rev"], None);
    let ca = env.path_str("ca.pem");
    api_config(
        &env,
        &(proxy("web", "{p}/web.sock", www, &ca, "")
            + &proxy("rev", "{p}/rev.sock", rev, &ca, "allowed_uids = [65534]")),
    );
    let (daemon, _portal) = start(&env);
    env.wait_log("proxy listening");
    let mut held = nobody_connected(&env, "rev.sock");
    let mut to = held.0.stdin.take().unwrap();
    let mut from = BufReader::new(held.0.stdout.take().unwrap());
    to.write_all(b"hello\n").unwrap();
    let mut line = String::new();
    from.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "olleh",
        "{}",
        std::fs::read_to_string(env.path("daemon.log")).unwrap()
    );

    // Take nobody off rev; add a proxy whose CA file is missing and one on a busy port.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let missing = env.path_str("missing-ca.pem");
    reload_with(
        &env,
        &daemon,
        "allowed_uids = [65534]",
        &format!(
            "allowed_uids = []\n{}{}",
            proxy("broken", "{p}/broken.sock", www, &missing, ""),
            proxy("busy", &format!("127.0.0.1:{busy_port}"), www, &ca, "")
        )
        .replace("{p}", &env.dir.path().display().to_string()),
    );
    // nobody's open connection ends (EOF), within the reload.
    line.clear();
    let t = Instant::now();
    let n = from.read_line(&mut line).unwrap_or(0);
    assert_eq!(n, 0, "still connected: {line}");
    assert!(t.elapsed() < Duration::from_secs(10));
    env.wait_log("proxy 'broken': server_ca");
    env.wait_log("proxy 'busy': cannot listen");
    // Everything else serves, and status says what is down.
    let out = env.curl("web.sock", "/", &["-o", "/dev/null", "-w", "%{http_code}"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
    let mut me = UnixStream::connect(env.path("api.sock")).unwrap();
    assert_eq!(ask(&mut me, "/v1/identities/gw/sign", SIGN).0, 200);
    let status = env.ok(&["status"]);
    assert!(
        status.contains("DOWN: proxy 'broken'") && status.contains("DOWN: proxy 'busy'"),
        "{status}"
    );

    // A changed proxy that cannot start keeps its old configuration serving.
    reload_with(
        &env,
        &daemon,
        &format!("name = \"web\"\nlisten = \"{}/web.sock\"\ntarget = \"127.0.0.1:{www}\"\nidentity = \"gw\"\nserver_ca = \"{ca}\"", env.dir.path().display()),
        &format!("name = \"web\"\nlisten = \"{}/web.sock\"\ntarget = \"127.0.0.1:{www}\"\nidentity = \"gw\"\nserver_ca = \"{missing}\"", env.dir.path().display()),
    );
    env.wait_log("proxy 'web': server_ca");
    env.wait_log("its previous configuration keeps serving");
    let out = env.curl("web.sock", "/", &["-o", "/dev/null", "-w", "%{http_code}"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
    drop(busy);
    // SIGTERM: the daemon takes its sockets with it.
    let mut daemon = daemon;
    run_ok(
        Command::new("kill").args(["-TERM", &daemon.0.id().to_string()]),
        "kill -TERM",
    );
    let _ = daemon.0.wait();
    for s in ["api.sock", "web.sock", "rev.sock"] {
        assert!(!env.path(s).exists(), "{s} left behind");
    }
}

/// An allowed caller that sends its headers and then only part of its body gets 408 after
/// `api.body_timeout`, and its connection is closed.
#[test]
fn a_body_that_does_not_arrive_in_time_is_answered_408() {
    let env = Env::new();
    env.make_ca("ca");
    api_config(&env, "");
    let cfg = std::fs::read_to_string(env.path("defaults.toml")).unwrap();
    std::fs::write(
        env.path("defaults.toml"),
        cfg.replace("[api]\n", "[api]\nbody_timeout = \"1s\"\n"),
    )
    .unwrap();
    let (_daemon, _ca) = start(&env);
    let mut s = UnixStream::connect(env.path("api.sock")).unwrap();
    s.write_all(
        b"POST /v1/identities/gw/sign HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"alg\":",
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("api.body_timeout"), "{answer}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}

/// CPU time (user + system) of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Out of file descriptors (a local caller holding many proxied connections, the daemon at
/// its limit): the accept loop pauses and says so, instead of spinning a core.
#[test]
fn out_of_descriptors_the_accept_loop_pauses_instead_of_spinning() {
    let env = Env::new();
    env.make_ca("ca");
    // A target that accepts and then says nothing: each proxied connection holds two fds.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = target.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let held: Vec<_> = target.incoming().collect();
        drop(held);
    });
    let ca = env.path_str("ca.pem");
    api_config(&env, &proxy("held", "{p}/held.sock", port, &ca, ""));
    let _portal = env.portal_ca(CaMode::Good);
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=64:64")
        .arg(bin())
        .arg("run")
        .envs(env.envs())
        .current_dir(env.dir.path())
        .stderr(std::fs::File::create(env.path("daemon.log")).unwrap());
    let daemon = Guard(cmd.spawn().unwrap());
    env.wait_served("gw", 1);
    env.wait_log("proxy listening");
    let conns: Vec<_> = (0..100)
        .filter_map(|_| UnixStream::connect(env.path("held.sock")).ok())
        .collect();
    env.wait_log("accepting a connection failed");
    let pid = daemon.0.id();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(pid) - before;
    assert!(
        spent < 40,
        "{spent} ticks of CPU in 2 s while out of descriptors"
    );
    drop(conns);
    eprintln!("out of descriptors: {spent} clock ticks of CPU in 2 s");
}
