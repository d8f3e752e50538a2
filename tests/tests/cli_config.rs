//! The configuration commands through the real binary: check, show, fleet keygen/sign, apply.

use std::path::Path;
use std::process::{Command, Output};

fn es(dir: &Path, args: &[&str]) -> Output {
    Command::new(edge_signer_tests::bin())
        .args(args)
        .current_dir(dir)
        .env("EDGE_SIGNER_DEFAULTS", dir.join("defaults.toml"))
        .env("EDGE_SIGNER_CONFIG", dir.join("etc/agent.toml"))
        .output()
        .expect("run edge-signer")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn example() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../agent/examples/agent.toml"
    ))
    .unwrap()
}

#[test]
fn check_accepts_the_example_and_lists_every_error_of_a_bad_file() {
    let d = tempfile::tempdir().unwrap();
    // The example names the broker's CA under /etc: not there, so check says so.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent/examples/agent.toml");
    let o = es(d.path(), &["config", "check", shipped]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("proxy[0].server_ca: cannot read /etc/edge-signer/ca/broker-ca.pem")
            && text(&o).contains("token.pin.file: cannot read /etc/edge-signer/pin")
            && text(&o).contains("issuer[1].ca_bundle: cannot read /etc/edge-signer/ca/est.pem"),
        "{}",
        text(&o)
    );
    // With the files it names in place, it passes.
    let etc = d.path().join("etc/edge-signer");
    std::fs::create_dir_all(etc.join("ca")).unwrap();
    for pem in [
        "ca/broker-ca.pem",
        "ca/acme-api.pem",
        "ca/acme-portal.pem",
        "ca/est.pem",
        "ca/cards-api.pem",
        "bootstrap.pem",
    ] {
        std::fs::copy("/etc/ssl/certs/ca-certificates.crt", etc.join(pem)).unwrap();
    }
    for secret in ["pin", "est-password"] {
        std::fs::write(etc.join(secret), "not-a-real-one\n").unwrap();
    }
    let ex = d.path().join("example.toml");
    std::fs::write(
        &ex,
        example().replace("/etc/edge-signer/", &format!("{}/", etc.display())),
    )
    .unwrap();
    let ex = ex.to_str().unwrap();
    let o = es(d.path(), &["config", "check", ex]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("3 identities, 3 issuers"));

    std::fs::write(
        d.path().join("bad.toml"),
        "[[identity]]\nname = \"payments-mtls\"\nissuer = \"ghost\"\n[[identity]]\nname = \"api-credential\"\noverlap = \"90d\"\n",
    )
    .unwrap();
    let o = es(d.path(), &["config", "check", ex, "bad.toml"]);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(
        t.contains("bad.toml: identity[0].issuer: 'ghost' names no [[issuer]]"),
        "{t}"
    );
    assert!(
        t.contains("bad.toml: identity[2].overlap: 90d must be shorter than the renewal window"),
        "{t}"
    );
    assert!(t.contains("2 error(s)"), "{t}");

    std::fs::write(d.path().join("syntax.toml"), "[token\n").unwrap();
    let o = es(
        d.path(),
        &["config", "check", "syntax.toml", "missing.toml", "--json"],
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["errors"].as_array().unwrap().len(), 2, "{v}");
}

/// A configuration error quotes the offending line; an ESC sequence in it (a hostile or
/// corrupted file) reaches the terminal escaped, from every command that reports it.
#[test]
fn an_error_quoting_control_characters_reaches_the_terminal_escaped() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("etc")).unwrap();
    let bad = "[paths]\nstate_dir = \"/var/lib/x\u{1b}]0;owned\u{7}\"\n";
    std::fs::write(d.path().join("etc/agent.toml"), bad).unwrap();
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["config", "check", "etc/agent.toml"],
    ] {
        let o = es(d.path(), args);
        assert!(!o.status.success(), "{args:?}");
        let t = text(&o);
        assert!(
            !t.contains('\u{1b}') && !t.contains('\u{7}'),
            "{args:?}: {t:?}"
        );
        assert!(t.contains("\\u{1b}]0;owned\\u{7}"), "{args:?}: {t}");
    }
}

/// A command asked for `--json` that fails prints one JSON object with the error on stdout
/// (and the human line on stderr), exit 2; the error says where the configuration was
/// looked for.
#[test]
fn a_failed_json_command_prints_its_error_as_json() {
    let d = tempfile::tempdir().unwrap();
    let o = es(d.path(), &["status", "--json"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let e = v["error"].as_str().unwrap();
    assert!(e.starts_with("the configuration is invalid"), "{e}");
    assert!(
        e.contains("not set in any file: token.module: missing"),
        "{e}"
    );
    assert!(e.contains("files read: none; not found: "), "{e}");
    assert!(e.contains("defaults.toml"), "{e}");
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("error: the configuration is invalid"));
    // Without --json, stdout stays empty.
    let o = es(d.path(), &["status"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty());
}

#[test]
fn fleet_keygen_sign_apply_show_and_refusals() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    pinned_device(p);
    std::fs::create_dir_all(p.join("etc/agent.d")).unwrap();
    std::fs::write(
        p.join("etc/agent.d/50-site.toml"),
        "[serial]\nbaud = 9600\n",
    )
    .unwrap();

    std::fs::write(p.join("v1.toml"), "[log]\nlevel = \"debug\"\n").unwrap();
    let o = fleet_sign(p, "fleet.key", "1", "v1.toml", "v1.bundle");
    assert!(o.status.success(), "{}", text(&o));
    let o = es(p, &["config", "apply", "v1.bundle"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("applied fleet bundle v1")
            && text(&o).contains("log.level: \"info\" -> \"debug\""),
        "{}",
        text(&o)
    );

    show_names_each_source(p);

    // The bundle in effect again: a success that changes nothing.
    let before = std::fs::read(p.join("state/fleet/current.bundle")).unwrap();
    let o = es(p, &["config", "apply", "v1.bundle"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("fleet bundle v1 is already in effect"),
        "{}",
        text(&o)
    );
    // Another bundle with the same version: refused, nothing changed.
    std::fs::write(p.join("v1b.toml"), "[log]\nlevel = \"warn\"\n").unwrap();
    ok(fleet_sign(p, "fleet.key", "1", "v1b.toml", "v1b.bundle"));
    let o = es(p, &["config", "apply", "v1b.bundle"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("not newer than the applied version 1")
            && text(&o).contains("nothing changed"),
        "{}",
        text(&o)
    );
    // A bundle that a device would refuse is not even signed.
    std::fs::write(p.join("bad.toml"), "[log\n").unwrap();
    assert!(!fleet_sign(p, "fleet.key", "2", "bad.toml", "bad.bundle")
        .status
        .success());
    // Nor one that reaches outside what a bundle may set: the rule is named.
    std::fs::write(p.join("hook.toml"), "[notify]\nexec = \"/bin/sh\"\n").unwrap();
    let o = fleet_sign(p, "fleet.key", "2", "hook.toml", "hook.bundle");
    assert!(!o.status.success());
    assert!(
        text(&o).contains("notify.exec: may not come from a fleet bundle"),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read(p.join("state/fleet/current.bundle")).unwrap(),
        before
    );
}

/// `config show` names where each value comes from: the bundle, a drop-in, the firmware
/// defaults, the built-in defaults.
fn show_names_each_source(p: &Path) {
    let o = es(p, &["config", "show", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["fleet_version"], 1);
    let row = |path: &str| {
        v["values"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["path"] == path)
            .cloned()
            .unwrap_or_else(|| panic!("{path} in {v}"))
    };
    assert_eq!(row("log.level")["source"], "fleet bundle v1");
    assert_eq!(row("serial.baud")["value"], "9600");
    assert!(row("serial.baud")["source"]
        .as_str()
        .unwrap()
        .ends_with("50-site.toml"));
    assert!(row("identity[0].key_type")["source"]
        .as_str()
        .unwrap()
        .ends_with("defaults.toml"));
    assert_eq!(
        row("identity[2].renewal.retry_max")["source"],
        "built-in default"
    );
}

/// A fleet key `fleet.key` made with `fleet keygen` and pinned in this device's firmware
/// defaults (the example config, state under `p`).
fn pinned_device(p: &Path) {
    let o = es(p, &["fleet", "keygen", "--out", "fleet.key", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let key: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let public = key["public_key"].as_str().unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(p.join("fleet.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(
        !es(p, &["fleet", "keygen", "--out", "fleet.key"])
            .status
            .success(),
        "never overwrites a key"
    );

    let defaults = example()
        .replace(
            "ed25519:Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=",
            public,
        )
        .replace(
            "state_dir = \"/var/lib/edge-signer\"",
            &format!("state_dir = \"{}/state\"", p.display()),
        );
    std::fs::write(p.join("defaults.toml"), defaults).unwrap();
}

/// `fleet sign --key KEY --version V IN -o OUT`.
fn fleet_sign(p: &Path, key: &str, version: &str, input: &str, out: &str) -> Output {
    es(
        p,
        &edge_signer_tests::fleet_sign_args(key, version, input, out),
    )
}

/// `fleet trust --key KEY --version V --trusted PUB -o OUT`.
fn fleet_trust(p: &Path, key: &str, version: &str, trusted: &str, out: &str) -> Output {
    let args = [
        "--key",
        key,
        "--version",
        version,
        "--trusted",
        trusted,
        "-o",
        out,
    ];
    es(p, &[&["fleet", "trust"][..], &args].concat())
}

/// Insist that the command succeeded.
fn ok(o: Output) {
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn fleet_keys_rotate_through_a_trust_bundle() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    pinned_device(p);
    ok(es(p, &["fleet", "keygen", "--out", "next.key"]));
    std::fs::write(p.join("v1.toml"), "[log]\nlevel = \"debug\"\n").unwrap();
    // The old key hands the fleet over to the new one.
    ok(fleet_trust(
        p,
        "fleet.key",
        "1",
        "next.key.pub",
        "t1.bundle",
    ));
    let o = es(p, &["config", "apply", "t1.bundle"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("applied trust bundle v1") && text(&o).contains("no longer trusted"),
        "{}",
        text(&o)
    );
    // The old key signs no more; the new one does.
    ok(fleet_sign(p, "fleet.key", "1", "v1.toml", "old.bundle"));
    let o = es(p, &["config", "apply", "old.bundle"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("not trusted on this device"),
        "{}",
        text(&o)
    );
    ok(fleet_sign(p, "next.key", "1", "v1.toml", "new.bundle"));
    let o = es(p, &["config", "apply", "new.bundle"]);
    assert!(o.status.success(), "{}", text(&o));
    // The trust bundle in effect again is a success that changes nothing; one by the
    // trusted key that does not raise the version is refused; show names where the set
    // comes from.
    let o = es(p, &["config", "apply", "t1.bundle"]);
    assert!(
        o.status.success() && text(&o).contains("trust bundle v1 is already in effect"),
        "{}",
        text(&o)
    );
    ok(fleet_trust(
        p,
        "next.key",
        "1",
        "next.key.pub",
        "t1b.bundle",
    ));
    let o = es(p, &["config", "apply", "t1b.bundle"]);
    assert!(
        text(&o).contains("not newer than the trust version in effect (1, from trust bundle v1)"),
        "{}",
        text(&o)
    );
    let o = es(p, &["config", "show", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["trust"]["source"], "trust bundle v1", "{v}");
    assert_eq!(v["fleet_version"], 1);
    // Factory reset (state wiped): the firmware set again.
    std::fs::remove_dir_all(p.join("state")).unwrap();
    let o = es(p, &["config", "show", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["trust"]["source"], "firmware defaults", "{v}");
}

/// A leaked fleet key signs version 2^64-1 and the device takes it. A trust bundle that
/// drops the key and says where versions continue brings the floor back, and the
/// operator's next bundle applies. Rotating the key never dropped the configuration that
/// was in effect, and `config status` says which key signed what under which trust.
#[test]
fn a_leaked_fleet_key_is_recovered_from_with_a_trust_bundle() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    pinned_device(p);
    ok(es(p, &["fleet", "keygen", "--out", "next.key"]));
    std::fs::write(p.join("v5.toml"), "[log]\nlevel = \"debug\"\n").unwrap();
    ok(fleet_sign(p, "fleet.key", "5", "v5.toml", "v5.bundle"));
    ok(es(p, &["config", "apply", "v5.bundle"]));
    // The attacker, with a copy of fleet.key.
    std::fs::write(p.join("evil.toml"), "[log]\nlevel = \"error\"\n").unwrap();
    let max = u64::MAX.to_string();
    ok(fleet_sign(p, "fleet.key", &max, "evil.toml", "evil.bundle"));
    ok(es(p, &["config", "apply", "evil.bundle"]));
    std::fs::write(p.join("v6.toml"), "[log]\nlevel = \"info\"\n").unwrap();
    ok(fleet_sign(p, "fleet.key", "6", "v6.toml", "v6.bundle"));
    let o = es(p, &["config", "apply", "v6.bundle"]);
    assert!(
        text(&o).contains("not newer than the applied version"),
        "{}",
        text(&o)
    );

    // Recovery: a trust bundle (signed by a key trusted now) drops fleet.key.
    let o = es(
        p,
        &[
            "fleet",
            "trust",
            "--key",
            "fleet.key",
            "--version",
            "1",
            "--trusted",
            "next.key.pub",
            "--continue-from",
            "5",
            "-o",
            "t1.bundle",
        ],
    );
    ok(o);
    ok(es(p, &["config", "apply", "t1.bundle"]));
    // The configuration in effect stays (applied under trust v0) until replaced.
    let st: serde_json::Value =
        serde_json::from_slice(&es(p, &["config", "status", "--json"]).stdout).unwrap();
    assert_eq!(st["current"]["version"].as_u64(), Some(u64::MAX), "{st}");
    assert_eq!(st["current"]["applied_under_trust"], 0, "{st}");
    assert_eq!(st["current"]["verifies"], true, "{st}");
    assert_eq!(st["trust_version"], 1, "{st}");
    assert_eq!(st["floor"], 5, "{st}");
    let show: serde_json::Value =
        serde_json::from_slice(&es(p, &["config", "show", "--json"]).stdout).unwrap();
    assert_eq!(show["fleet_version"].as_u64(), Some(u64::MAX), "{show}");
    // The old key's bundles are refused now; the operator's next one applies.
    let o = es(p, &["config", "apply", "v6.bundle"]);
    assert!(
        text(&o).contains("not trusted on this device"),
        "{}",
        text(&o)
    );
    ok(fleet_sign(p, "next.key", "6", "v6.toml", "v6n.bundle"));
    let o = es(p, &["config", "apply", "v6n.bundle"]);
    assert!(text(&o).contains("applied fleet bundle v6"), "{}", text(&o));
    // Pushed again (tools that push idempotently): a success that changes nothing.
    for (file, what) in [
        ("v6n.bundle", "fleet bundle v6 is already in effect"),
        ("t1.bundle", "trust bundle v1 is already in effect"),
    ] {
        let o = es(p, &["config", "apply", file]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains(what), "{}", text(&o));
    }
    let o = es(p, &["config", "status"]);
    let t = text(&o);
    assert!(
        t.contains("in effect: v6 signed by fleet key ed25519")
            && t.contains("applied under trust v1")
            && t.contains("next bundle must be above v6"),
        "{t}"
    );
    // Replaying the operator's older bundle stays refused.
    ok(fleet_sign(p, "next.key", "4", "v6.toml", "v4n.bundle"));
    let o = es(p, &["config", "apply", "v4n.bundle"]);
    assert!(
        text(&o).contains("not newer than the applied version 6"),
        "{}",
        text(&o)
    );
}

/// `--version` says the release, the commit and the build date.
#[test]
fn version_names_the_release_the_commit_and_the_build_date() {
    let d = tempfile::tempdir().unwrap();
    let o = es(d.path(), &["--version"]);
    assert!(o.status.success());
    let re = regex::Regex::new(
        r"^edge-signer \d+\.\d+\.\d+ \(commit ([0-9a-f]{12}|unknown), built \d{4}-\d{2}-\d{2}\)\n$",
    )
    .unwrap();
    assert!(re.is_match(&text(&o)), "{}", text(&o));
}

/// A file with mistakes of every kind: every one is reported at once, with its file and its
/// path inside arrays of tables, and the exit code is 1.
#[test]
fn check_reports_every_type_error_at_once_with_its_path() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("bad.toml"),
        "[token]\nmodule = 5\nlabel = \"x\"\npin = { file = \"/nonexistent/pin\" }\n\n\
         [[identity]]\nname = \"gw\"\nsubject = { cn = 7 }\nissuer = \"p\"\noverlap = \"zz\"\n\
         [identity.renewal]\nbefore = 30\n\n[[issuer]]\nname = \"p\"\nkind = \"portal\"\n\
         outbox = \"/tmp/o\"\ninbox = \"/tmp/i\"\nca_bundle = \"/nonexistent/ca.pem\"\n\
         poll_interval = 10\nbogus = 1\n\n[serial]\nbaud = \"fast\"\n",
    )
    .unwrap();
    let o = es(d.path(), &["config", "check", "bad.toml"]);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    for want in [
        "bad.toml: token.module: invalid type: integer `5`",
        "bad.toml: identity[0].subject.cn: invalid type: integer `7`",
        "bad.toml: identity[0].overlap: 'zz' is not a duration",
        "bad.toml: identity[0].renewal.before: invalid type: integer `30`",
        "bad.toml: issuer[0].poll_interval: invalid type: integer `10`",
        "bad.toml: issuer[0].bogus: unknown field `bogus`",
        "bad.toml: serial.baud: invalid type: string \"fast\"",
        "token.pin.file: cannot read /nonexistent/pin",
        "issuer[0].ca_bundle: cannot read /nonexistent/ca.pem",
        "9 error(s)",
    ] {
        assert!(t.contains(want), "{want}:\n{t}");
    }
}

/// Technician (and fleet) keys as docs/config.md says to make them: `fleet keygen`'s key is
/// read by Debian's OpenSSL 3.0, whose public key is the `.pub` line to pin; a key from
/// `openssl genpkey -algorithm ed25519` signs technician tokens.
#[test]
fn technician_keys_from_keygen_or_openssl_work_both_ways() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(es(p, &["fleet", "keygen", "--out", "tech.key"]));
    let sh = |cmd: &str| {
        let o = std::process::Command::new("sh")
            .args(["-c", cmd])
            .current_dir(p)
            .output()
            .unwrap();
        assert!(o.status.success(), "{cmd}: {o:?}");
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    let pinned = sh(
        r#"echo "ed25519:$(openssl pkey -in tech.key -pubout -outform DER | tail -c 32 | base64)""#,
    );
    assert_eq!(
        pinned,
        std::fs::read_to_string(p.join("tech.key.pub"))
            .unwrap()
            .trim()
    );
    sh("openssl genpkey -algorithm ed25519 -out tech2.key");
    let o = es(
        p,
        &[
            "diag",
            "token",
            "--key",
            "tech2.key",
            "--device",
            "SN",
            "--nonce",
            "ab",
            "--allow",
            "rotate",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim().split('.').count(),
        3
    );
}
