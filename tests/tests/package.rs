//! The amd64 package (built by `scripts/package amd64`, which scripts/test runs first),
//! unpacked into a throwaway root: the unit's ExecStart line runs the daemon with a SoftHSM
//! token and the PIN as a systemd credential; readiness, reload and watchdog arrive on a
//! NOTIFY_SOCKET this test listens on, as systemd would see them.

use edge_signer_tests::*;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn package() -> PathBuf {
    let dir = bin()
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("debian");
    std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("_amd64.deb"))
        .unwrap_or_else(|| {
            panic!(
                "no amd64 package in {}: run scripts/package amd64 (scripts/test does)",
                dir.display()
            )
        })
}

/// The ExecStart= line of the packaged unit, split into words.
fn exec_start(root: &Path) -> Vec<String> {
    let unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/edge-signer.service")).unwrap();
    unit.lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Messages on the notify socket until one contains `what` (10 s at most).
fn expect(sock: &UnixDatagram, what: &str) -> String {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            if m.lines()
                .any(|l| l == what || l.starts_with(&format!("{what}=")))
            {
                return m;
            }
            seen.push(m);
        }
    }
    panic!("no {what} on the notify socket; saw {seen:?}");
}

/// Unpack the package into `root`: every file at its place and mode, a conffile, and no
/// token module among its dependencies.
fn unpack_and_check(deb: &Path, root: &Path) {
    let out = std::process::Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    use std::os::unix::fs::PermissionsExt;
    for (f, mode) in [
        ("usr/bin/edge-signer", 0o755),
        ("usr/lib/systemd/system/edge-signer.service", 0o644),
        ("usr/lib/sysusers.d/edge-signer.conf", 0o644),
        ("usr/lib/tmpfiles.d/edge-signer.conf", 0o644),
        ("usr/lib/edge-signer/defaults.toml", 0o644),
        ("etc/edge-signer/agent.toml", 0o644),
        ("usr/share/doc/edge-signer/README.md", 0o644),
        ("usr/share/doc/edge-signer/copyright", 0o644),
        ("usr/share/doc/edge-signer/security.md", 0o644),
        ("usr/share/doc/edge-signer/edge-signer.acl", 0o644),
        ("usr/share/man/man1/edge-signer.1.gz", 0o644),
        // One page per subcommand: the main page's SUBCOMMANDS section names them.
        ("usr/share/man/man1/edge-signer-key-generate.1.gz", 0o644),
        ("usr/share/man/man1/edge-signer-fleet-sign.1.gz", 0o644),
        ("usr/share/bash-completion/completions/edge-signer", 0o644),
        ("usr/share/zsh/vendor-completions/_edge-signer", 0o644),
        (
            "usr/share/fish/vendor_completions.d/edge-signer.fish",
            0o644,
        ),
    ] {
        let m = std::fs::metadata(root.join(f))
            .unwrap_or_else(|_| panic!("{f} in the package"))
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, mode, "{f} mode {m:o}");
    }
    let info = std::process::Command::new("dpkg-deb")
        .arg("--info")
        .arg(deb)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    let depends = info
        .lines()
        .find(|l| l.trim_start().starts_with("Depends:"))
        .unwrap_or_default();
    assert!(
        depends.contains("libc6") && !depends.contains("softhsm") && info.contains(" conffiles"),
        "no token module among the dependencies (the device brings its own): {info}"
    );
}

#[test]
fn the_packaged_unit_runs_and_notifies_ready_reloading_ready_and_watchdog() {
    let env = Env::new();
    let deb = package();
    let root = env.path("root");
    unpack_and_check(&deb, &root);
    // The device's layers: the test token, the PIN as a credential.
    env.make_ca("ca");
    env.lifecycle_config("");
    let cfg = std::fs::read_to_string(env.path("defaults.toml"))
        .unwrap()
        .replace(
            &format!("pin = {{ file = \"{}\" }}", env.path_str("pin")),
            "pin = { credential = \"pin\" }",
        );
    assert!(cfg.contains("credential"), "{cfg}");
    std::fs::write(root.join("usr/lib/edge-signer/defaults.toml"), cfg).unwrap();
    let creds = env.path("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::copy(env.path("pin"), creds.join("pin")).unwrap();
    let notify = UnixDatagram::bind(env.path("notify.sock")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    // ExecStart, with every absolute path taken inside the throwaway root.
    let argv: Vec<String> = exec_start(&root)
        .into_iter()
        .map(|a| {
            if a.starts_with('/') {
                format!("{}{a}", root.display())
            } else {
                a
            }
        })
        .collect();
    let _ca = env.portal_ca(CaMode::Good);
    // systemd sets WATCHDOG_PID to the service's pid: a shell that execs keeps its pid.
    let mut child = std::process::Command::new("sh");
    child
        .arg("-c")
        .arg("WATCHDOG_PID=$$; export WATCHDOG_PID; exec \"$0\" \"$@\"")
        .args(&argv)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("SOFTHSM2_CONF", env.path("softhsm2.conf"))
        .env("CREDENTIALS_DIRECTORY", &creds)
        .env("NOTIFY_SOCKET", env.path("notify.sock"))
        .env("WATCHDOG_USEC", "1000000")
        .env("EDGE_SIGNER_LOG", "info")
        .stderr(std::fs::File::create(env.path("daemon.log")).unwrap());
    let daemon = Guard(child.spawn().unwrap());
    let pid = daemon.0.id();
    let ready = expect(&notify, "READY");
    assert!(ready.contains("STATUS=1 identities"), "{ready}");
    expect(&notify, "WATCHDOG");

    // The PIN is in neither the environment nor the command line.
    for f in ["environ", "cmdline"] {
        let bytes = std::fs::read(format!("/proc/{pid}/{f}")).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(USER_PIN),
            "PIN in /proc/{pid}/{f}"
        );
    }

    // SIGHUP: RELOADING with MONOTONIC_USEC, then READY.
    std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    let reloading = expect(&notify, "RELOADING");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    expect(&notify, "READY");
    drop(daemon);
}
