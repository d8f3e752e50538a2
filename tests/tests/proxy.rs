//! The mTLS egress proxy with the real binary: unmodified curl and a TCP client speak plain
//! text to the agent; openssl s_server (-Verify) sees the token identity; a rotation in the
//! middle of a stream of requests switches new connections without failing any.

use edge_signer::register::GenStatus;
use edge_signer_tests::*;
use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A `[[proxy]]` table for `serving_config`: `name` listening on `listen` (`{p}/x.sock` or
/// `127.0.0.1:PORT`) for identity gw, to `127.0.0.1:target` checked against `{p}/ca.pem`,
/// then the `extra` lines.
fn route(name: &str, listen: &str, target: u16, extra: &str) -> String {
    serving::proxy_table(name, listen, target, "{p}/ca.pem", extra)
}

fn last_client_cn(env: &Env, log: &str) -> String {
    std::fs::read_to_string(env.path(log))
        .unwrap_or_default()
        .lines()
        .rfind(|l| l.starts_with("depth=0"))
        .unwrap_or_default()
        .to_owned()
}

fn echo(conn: &mut BufReader<std::net::TcpStream>, line: &str) -> String {
    conn.get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .unwrap();
    let mut back = String::new();
    conn.read_line(&mut back).unwrap();
    back.trim_end().to_owned()
}

/// A line longer than what the proxy takes before the handshake (4 KiB), written at once on
/// connecting to the `-rev` route: the part sent with the handshake and the rest arrive in
/// order.
fn a_long_first_line_comes_back_whole(port: u16) {
    let line: String = (0..6000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let mut first = BufReader::new(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
    first
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let reversed: String = line.chars().rev().collect();
    assert!(
        echo(&mut first, &line) == reversed,
        "a 6000-byte line comes back whole"
    );
}

/// curl requests one after the other through a proxy socket, counting answers that are
/// and are not 200, until `finish`.
struct CurlStream {
    stop: Arc<AtomicBool>,
    counts: Arc<[AtomicUsize; 2]>,
    thread: std::thread::JoinHandle<()>,
}

impl CurlStream {
    fn start(sock: &std::path::Path) -> CurlStream {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let (s, c, sock) = (stop.clone(), counts.clone(), sock.to_owned());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let out = std::process::Command::new("curl")
                    .args(["-sS", "--max-time", "10", "-o", "/dev/null"])
                    .args(["-w", "%{http_code}", "--unix-socket"])
                    .arg(&sock)
                    .arg("http://edge/")
                    .output()
                    .unwrap();
                c[usize::from(out.stdout != b"200")].fetch_add(1, Ordering::Relaxed);
            }
        });
        CurlStream {
            stop,
            counts,
            thread,
        }
    }

    /// Stop; (answered 200, failed).
    fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        let [ok, failed] = &*self.counts;
        (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
    }
}

#[test]
fn curl_through_the_proxy_survives_a_rotation_and_the_old_key_goes_after_the_overlap() {
    let env = Env::new();
    env.make_ca("ca");
    env.openssl_leaf("ca", "server");
    let (_www, www) = env.s_server("ca", &[], Some("www.log"));
    let (_rev, rev) = env.s_server("ca", &["-rev"], Some("rev.log"));
    let echo_port = serving::proxy_port();
    env.serving_config(
        "6s",
        &(route("web", "{p}/web.sock", www, "")
            + &route("echo", &format!("127.0.0.1:{echo_port}"), rev, "")),
    );
    let _ca = env.portal_ca(CaMode::Good);
    let mut daemon = env.daemon();
    env.wait_served("gw", 1);
    env.wait_log("proxy listening");

    let out = env.curl("web.sock", "/", &["-o", "page.html", "-w", "%{http_code}"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
    let cn1 = env.gw_cn(1);
    assert!(last_client_cn(&env, "www.log").contains(&cn1));

    a_long_first_line_comes_back_whole(echo_port);

    // A long-lived connection, opened before the rotation.
    let mut long = BufReader::new(std::net::TcpStream::connect(("127.0.0.1", echo_port)).unwrap());
    long.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(echo(&mut long, "hello"), "olleh");

    // A stream of requests while the rotation happens.
    let stream = CurlStream::start(&env.path("web.sock"));
    env.ok(&["rotate", "gw", "--now", "--timeout", "20"]);
    env.wait_log("new handshakes use generation 2");
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failed) = stream.finish();
    assert_eq!(failed, 0, "no request failed");
    assert!(ok >= 3);

    let out = env.curl("web.sock", "/", &["-o", "/dev/null", "-w", "%{http_code}"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    let cn2 = env.gw_cn(2);
    assert_ne!(cn1, cn2);
    assert!(
        last_client_cn(&env, "www.log").contains(&cn2),
        "after promotion the new certificate: {}",
        last_client_cn(&env, "www.log")
    );
    assert_eq!(
        echo(&mut long, "still here"),
        "ereh llits",
        "the old connection keeps working"
    );

    // After the overlap the old key is gone from the token; the old connection still runs.
    let id1 = env.generation("gw", 1).key_id_hex().unwrap();
    wait_for("old key retired after the overlap", 20, || {
        !env.pkcs11_objects().contains(&id1)
    });
    assert_eq!(echo(&mut long, "third"), "driht");
    assert!(daemon.0.try_wait().unwrap().is_none());
    drop(daemon);
}

#[test]
fn a_foreign_caller_a_foreign_server_and_a_silent_one_are_refused() {
    let env = Env::new();
    env.make_ca("ca");
    env.make_ca("other-ca");
    env.openssl_leaf("ca", "server");
    let (_www, www) = env.s_server("ca", &[], Some("www.log"));
    env.openssl_leaf("other-ca", "rogue");
    // The rogue server presents a certificate from another CA.
    std::fs::copy(env.path("rogue.pem"), env.path("server.pem")).unwrap();
    std::fs::copy(env.path("rogue.key"), env.path("server.key")).unwrap();
    let (_rogue, rogue) = env.s_server("ca", &[], None);
    // A target that accepts and then never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let held: Vec<_> = silent.incoming().collect();
        drop(held);
    });
    env.serving_config(
        "1d",
        &(route("web", "{p}/web.sock", www, "allowed_uids = [4242]")
            + &route("rogue", "{p}/rogue.sock", rogue, "")
            + &route(
                "silent",
                "{p}/silent.sock",
                silent_port,
                "connect_timeout = \"1s\"",
            )),
    );
    let _ca = env.portal_ca(CaMode::Good);
    let _daemon = env.daemon();
    env.wait_served("gw", 1);
    env.wait_log("proxy listening");
    // The daemon's own uid passes; nobody (65534) is not in allowed_uids.
    let out = env.curl("web.sock", "/", &["-o", "/dev/null", "-w", "%{http_code}"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
    let out = env.curl_as_nobody("web.sock", "/", &["-o", "/dev/null"]);
    assert!(!out.status.success(), "nobody is refused: {out:?}");
    env.wait_log("caller not in allowed_uids/allowed_gids");
    // A server whose certificate does not chain to server_ca.
    let out = env.curl("rogue.sock", "/", &["-o", "/dev/null"]);
    assert!(!out.status.success());
    env.wait_log("TLS to the target failed");
    // A silent target: the caller's connection is closed after connect_timeout, not held.
    let t0 = std::time::Instant::now();
    let out = env.curl("silent.sock", "/", &["-o", "/dev/null"]);
    assert!(!out.status.success(), "{out:?}");
    let waited = t0.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(900)
            && waited < std::time::Duration::from_secs(8),
        "closed after {waited:?}, connect_timeout is 1 s: {out:?}"
    );
    env.wait_log("no TLS connection to the target within 1 s");
}

/// A stunnel4 TLS server (client certificate required, `TIMEOUTidle = idle` seconds) that
/// greets each connection with a banner and then echoes: a real server that talks first and
/// closes silent connections, as many do.
fn banner_server(env: &Env, idle: u32) -> (Guard, u16) {
    let port = free_port();
    let script = env.path("banner.sh");
    std::fs::write(&script, "#!/bin/sh\necho 220 ready\nexec cat\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dir = env.dir.path().display();
    let conf = format!(
        "foreground = yes\npid =\noutput = {dir}/stunnel-server.log\ndebug = 5\n\
         [banner]\naccept = 127.0.0.1:{port}\ncert = {dir}/server.pem\nkey = {dir}/server.key\n\
         CAfile = {dir}/ca.pem\nverifyChain = yes\nrequireCert = yes\nTIMEOUTidle = {idle}\n\
         exec = {script}\nexecArgs = banner.sh\n",
        script = script.display()
    );
    std::fs::write(env.path("stunnel-server.conf"), conf).unwrap();
    let child = std::process::Command::new("stunnel4")
        .arg(env.path("stunnel-server.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("stunnel4 (scripts/setup installs it)");
    wait_port(port);
    (Guard(child), port)
}

/// A connection through the proxy whose first line, the server's banner, has arrived.
fn greeted(port: u16) -> BufReader<std::net::TcpStream> {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut conn = BufReader::new(s);
    let mut banner = String::new();
    conn.read_line(&mut banner).unwrap();
    assert_eq!(
        banner.trim_end(),
        "220 ready",
        "the server's banner comes first"
    );
    conn
}

/// One exchange through the proxy: the banner first, then an echoed line.
fn greeted_echo(port: u16, word: &str) {
    assert_eq!(echo(&mut greeted(port), word), word);
}

/// A token of `kind`, a banner server (`TIMEOUTidle = idle`) and a proxy route to it on a
/// loopback port, with `extra` added to the route's table and `more` after it. Returns the
/// env, the server and the route's port.
fn banner_route(kind: TokenKind, idle: u32, extra: &str, more: &str) -> (Env, Guard, u16) {
    let env = Env::on(kind);
    env.make_ca("ca");
    env.openssl_leaf("ca", "server");
    let (server, target) = banner_server(&env, idle);
    let port = serving::proxy_port();
    let table = route("banner", &format!("127.0.0.1:{port}"), target, extra);
    env.serving_config("1d", &(table + more));
    (env, server, port)
}

/// On a TPM the handshake signature takes milliseconds: it runs under `block_in_place`.
fn preconnect_hands_over_a_live_spare_with_its_banner_and_never_a_closed_one(kind: TokenKind) {
    let api = serving::metrics_api_toml();
    let (env, _server, port) = banner_route(kind, 3, "preconnect = true", &api);
    let _ca = env.portal_ca(CaMode::Good);
    let _daemon = env.daemon();
    env.wait_served("gw", 1);
    env.wait_log("proxy listening");

    // The first connection makes its own; it leaves a spare behind (banner queued in it).
    greeted_echo(port, "first");
    std::thread::sleep(Duration::from_millis(400));
    // Taken: the banner that waited in the spare arrives first.
    greeted_echo(port, "second");
    // The next spare outlives the server's idle timeout: closed under us, never handed out.
    std::thread::sleep(Duration::from_millis(3500));
    greeted_echo(port, "third");

    let text = env.metrics_text();
    let spares = |fate: &str| {
        serving::metric_sum(&text, "edge_signer_proxy_spares_total", &[("fate", fate)])
    };
    assert!(spares("used") >= 1.0, "a spare was used\n{text}");
    assert!(
        spares("stale") >= 1.0,
        "the closed spare was noticed\n{text}"
    );

    // A spare made before a promotion is never handed out after it.
    greeted_echo(port, "fourth");
    env.ok(&["rotate", "gw", "--now", "--timeout", "20"]);
    env.wait_log("new handshakes use generation 2");
    greeted_echo(port, "fifth");
    env.wait_log("spare connection dropped: made for generation 1, now 2");
    let log = std::fs::read_to_string(env.path("stunnel-server.log")).unwrap();
    let last = log.lines().rfind(|l| l.contains("depth=0")).unwrap_or("");
    assert!(
        last.contains(&env.gw_cn(2)),
        "the new certificate: {last}\n{log}"
    );
}

// Runs on SoftHSM and on tpm2-pkcs11 over swtpm.
hsm_shim::token_tests!(preconnect_hands_over_a_live_spare_with_its_banner_and_never_a_closed_one);

/// `max_connections = 1`: a second caller waits (the daemon says why) until the first
/// connection ends; `idle_timeout = 1s` ends a connection that went quiet, well before the
/// server's own 10 s.
#[test]
fn over_the_cap_a_caller_waits_and_a_quiet_connection_ends_at_idle_timeout() {
    let (env, _server, port) = banner_route(
        TokenKind::SoftHsm,
        10,
        "max_connections = 1\nidle_timeout = \"1s\"",
        "",
    );
    let _ca = env.portal_ca(CaMode::Good);
    let _daemon = env.daemon();
    env.wait_served("gw", 1);
    env.wait_log("proxy listening");

    let mut first = greeted(port);
    assert_eq!(echo(&mut first, "first"), "first");
    let quiet_from = std::time::Instant::now();
    // The second caller is connected by the kernel but not served while the first is open.
    let second = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut second = BufReader::new(second);
    let mut line = String::new();
    assert!(
        second.read_line(&mut line).is_err() && line.is_empty(),
        "served over the cap: {line:?}"
    );
    env.wait_log("proxy at max_connections");
    // The first, quiet since its echo, is closed by the proxy at idle_timeout.
    let mut rest = String::new();
    let n = first.read_line(&mut rest).expect("closed, not timed out");
    let after = quiet_from.elapsed();
    assert_eq!(n, 0, "end of stream, got {rest:?}");
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(6),
        "closed after {after:?}: idle_timeout is 1 s, the server's own 10 s"
    );
    // Its slot goes to the caller that waited: the banner, then an echo.
    second
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    second.read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), "220 ready");
    assert_eq!(echo(&mut second, "second"), "second");
}

/// A connection authenticated by a certificate ends at that certificate's not-after (the
/// server would refuse it from then on), however busy it is. Generation 1 is valid for 15 s
/// and its renewal waits on a person who is away, so nothing else ends it.
#[test]
fn a_busy_connection_ends_at_the_not_after_of_the_certificate_it_presented() {
    let (env, _server, port) = banner_route(TokenKind::SoftHsm, 60, "", "");
    let _ca = env.portal_ca(CaMode::ShortLived(15));
    let _daemon = env.daemon();
    env.wait_served("gw", 1);
    let not_after = env
        .generation("gw", 1)
        .not_after()
        .expect("generation 1 has a not-after") as f64;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    assert!(now() < not_after - 3.0, "enrolment took too long to test");
    let mut conn = greeted(port);
    let ended = loop {
        let t = now();
        let mut back = String::new();
        let open = conn.get_mut().write_all(b"tick\n").is_ok()
            && conn.read_line(&mut back).is_ok_and(|n| n > 0);
        if !open {
            break t;
        }
        assert_eq!(back.trim_end(), "tick");
        assert!(t < not_after + 5.0, "still open 5 s after the not-after");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        ended > not_after - 1.0,
        "ended {:.1} s before the not-after",
        not_after - ended
    );
    env.wait_log("proxy connection ended: certificate expired");
}

/// A generation whose key in the token no longer matches its certificate is never served:
/// the daemon's reconcile fails it (a critical line), keeps serving the pair it had and
/// enrols a new key at once. The rotation is killed after its probe; its key is then
/// replaced under the same CKA_ID and label, as someone with the PIN could do.
#[test]
fn a_key_replaced_in_the_token_is_never_served_and_a_new_one_takes_over() {
    let env = Env::new();
    env.make_ca("ca");
    env.openssl_leaf("ca", "server");
    let (_www, www) = env.s_server("ca", &[], Some("www.log"));
    env.serving_config("1d", &route("web", "{p}/web.sock", www, ""));
    let _ca = env.portal_ca(CaMode::Good);
    env.ok(&["enroll", "gw", "--timeout", "20"]);
    let out = env.rotate_now_with("gw", 20, ("EDGE_SIGNER_TEST_KILL_AT", "probed"));
    assert!(!out.status.success(), "killed after the probe: {out:?}");
    let id = env
        .generation("gw", 2)
        .key_id_hex()
        .expect("generation 2's key id");
    replace_key(|a| env.pkcs11_tool(a), &id, "edge-signer:gw:g2");

    let _daemon = env.daemon();
    env.wait_log("the token holds another key under that id");
    env.wait_served("gw", 3);
    let out = env.curl("web.sock", "/", &["-o", "/dev/null", "-w", "%{http_code}"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
    let seen = last_client_cn(&env, "www.log");
    assert!(
        seen.contains(&env.gw_cn(3)),
        "generation 3 presented: {seen}"
    );
    let log = std::fs::read_to_string(env.path("daemon.log")).unwrap();
    assert!(
        !log.contains("new handshakes use generation 2"),
        "generation 2 was served:\n{log}"
    );
    assert_eq!(env.generation("gw", 2).status, GenStatus::Failed);
}
