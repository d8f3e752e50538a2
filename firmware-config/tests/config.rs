//! The loader, the layers, and apply: against real files in a temp dir.

use firmware_config::*;
use proptest::prelude::*;
use std::path::Path;

const EXAMPLE: &str = include_str!("../../agent/examples/agent.toml");

fn resolve_one(text: &str) -> Result<Effective, ConfigErrors> {
    layers::resolve(&[Layer::parse(LayerKind::Firmware, "example.toml", text)
        .map_err(|e| ConfigErrors(vec![e]))?])
}

#[test]
fn complete_example_loads_and_every_field_round_trips() {
    let eff = resolve_one(EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
    let c = &eff.config;
    assert_eq!(c.identities.len(), 3);
    assert_eq!(c.issuers.len(), 3);
    assert_eq!(
        c.identities[0].renewal.renew_at(),
        schema::RenewAt::Before(Duration::days(30))
    );
    assert_eq!(
        c.identities[1].renewal.renew_at(),
        schema::RenewAt::Fraction(Percent(66))
    );
    assert_eq!(c.identities[1].cn_suffix, schema::CnSuffix::UnixTime);
    assert_eq!(c.identities[0].key_type, hsm_shim::KeyType::Rsa2048);
    assert_eq!(
        c.token.pin,
        Some(schema::PinConfig::File("/etc/edge-signer/pin".into()))
    );
    // Serialize the typed config, parse it again: the same config (every field survives).
    let text = toml::to_string(c).unwrap();
    let again = resolve_one(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(&again.config, c);
    // And every field the example sets is present in the round trip.
    let after = store::leaves(&toml::from_str(&text).unwrap());
    for k in store::leaves(&eff.merged).keys() {
        assert!(after.contains_key(k), "{k} lost in the round trip");
    }
}

/// The error of the firmware defaults under one local file `name` holding `text`.
fn local_error(defaults: &Layer, name: &str, text: &str) -> String {
    let local = Layer::parse(LayerKind::Local, name, text).unwrap();
    layers::resolve(&[defaults.clone(), local])
        .unwrap_err()
        .to_string()
}

#[test]
fn errors_name_file_field_path_and_reason_all_at_once() {
    let defaults = Layer::parse(
        LayerKind::Firmware,
        "/usr/lib/edge-signer/defaults.toml",
        EXAMPLE,
    )
    .unwrap();
    let local = Layer::parse(
        LayerKind::Local,
        "/etc/edge-signer/agent.d/10-site.toml",
        r#"
[[identity]]
name = "device-est"
overlap = "40d"
[identity.renewal]
before = "30d"
retry_min = "7h"

[[identity]]
name = "payments-mtls"
issuer = "nope"
"#,
    )
    .unwrap();
    let e = layers::resolve(&[defaults, local]).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("/etc/edge-signer/agent.d/10-site.toml: identity[1].renewal.before: renewal.at is also set (in /usr/lib/edge-signer/defaults.toml)"), "{text}");
    assert!(
        text.contains("identity[1].renewal.retry_min: 7h is longer than retry_max (6h)"),
        "{text}"
    );
    assert!(
        text.contains("identity[0].issuer: 'nope' names no [[issuer]]"),
        "{text}"
    );
    assert!(e.0.len() >= 3);
}

/// One refusal at a time: each names the file, the field's path and the reason.
#[test]
fn each_refusal_names_file_field_and_reason() {
    let defaults = Layer::parse(LayerKind::Firmware, "defaults.toml", EXAMPLE).unwrap();
    let text = local_error(
        &defaults,
        "/etc/edge-signer/agent.toml",
        "[[identity]]\nname = \"payments-mtls\"\n[identity.renewal]\nbefor = \"3d\"\n",
    );
    assert!(
        text.contains("/etc/edge-signer/agent.toml: identity[0].renewal")
            && text.contains("unknown field `befor`"),
        "{text}"
    );

    let text = local_error(
        &defaults,
        "/etc/edge-signer/agent.toml",
        "[[identity]]\nname = \"payments-mtls\"\noverlap = \"7 days\"\n",
    );
    assert!(
        text.contains(
            "/etc/edge-signer/agent.toml: identity[0].overlap: '7 days' is not a duration"
        ),
        "{text}"
    );

    let text = local_error(&defaults, "local.toml", "[fleet]\ntrusted_keys = []\n");
    assert!(
        text.contains("local.toml: fleet.trusted_keys: may not be set here"),
        "{text}"
    );

    let text = local_error(&defaults, "local.toml", "[[identity]]\nname = \"api-credential\"\nkey_type = \"rsa-2048\"\n[[issuer]]\nname = \"cards-api\"\nkind = \"jwk-rotation\"\nurl = \"https://api.cards.example\"\nca_bundle = \"/x\"\nold_key_overlap = \"15d\"\n");
    assert!(
        text.contains("identity[2].key_type: rsa-2048 cannot be used with a jwk-rotation issuer"),
        "{text}"
    );
    assert!(
        text.contains("issuer[2].old_key_overlap: 15d is more than the API allows"),
        "{text}"
    );

    let syntax = Layer::parse(LayerKind::Local, "broken.toml", "[token\nmodule = 1").unwrap_err();
    assert!(
        syntax.to_string().starts_with("broken.toml: ") && syntax.to_string().contains("line 1"),
        "{syntax}"
    );
}

#[test]
fn local_overrides_merge_by_name_and_show_their_origin() {
    let defaults = Layer::parse(LayerKind::Firmware, "defaults.toml", EXAMPLE).unwrap();
    let local = Layer::parse(
        LayerKind::Local,
        "agent.toml",
        "[log]\nlevel = \"debug\"\n[[identity]]\nname = \"device-est\"\noverlap = \"3d\"\n",
    )
    .unwrap();
    let eff = layers::resolve(&[defaults, local]).unwrap();
    assert_eq!(
        eff.config.identities.len(),
        3,
        "merged by name, not appended"
    );
    assert_eq!(eff.config.identities[1].overlap, Duration::days(3));
    assert_eq!(eff.origins["identity[1].overlap"], "agent.toml");
    assert_eq!(eff.origins["identity[1].key_type"], "defaults.toml");
    assert_eq!(eff.origins["log.level"], "agent.toml");
}

struct Device {
    dir: tempfile::TempDir,
    sources: Sources,
    signer: FleetSigner,
}

fn device() -> Device {
    let dir = tempfile::tempdir().unwrap();
    let (pem, public) = FleetSigner::generate_ed25519().unwrap();
    let state = dir.path().join("state");
    let defaults = EXAMPLE
        .replace(
            "ed25519:Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=",
            &public.to_string(),
        )
        .replace(
            "state_dir = \"/var/lib/edge-signer\"",
            &format!("state_dir = \"{}\"", state.display()),
        );
    std::fs::write(dir.path().join("defaults.toml"), defaults).unwrap();
    let sources = Sources {
        defaults: dir.path().join("defaults.toml"),
        local: dir.path().join("agent.toml"),
    };
    Device {
        sources,
        signer: FleetSigner::from_pem(&pem).unwrap(),
        dir,
    }
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            out.push((
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            ));
        }
    }
    out.sort();
    out
}

const V1: &str = "[log]\nlevel = \"debug\"\n";
const V2: &str =
    "[log]\nlevel = \"warn\"\n[[identity]]\nname = \"payments-mtls\"\noverlap = \"5d\"\n";

/// Bundles a device must refuse once v2 is applied: what each is, its bytes, and what the
/// error must say.
fn refused_bundles(d: &Device) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let stranger = FleetSigner::from_pem(&FleetSigner::generate_ed25519().unwrap().0).unwrap();
    let good3 = d.signer.sign(3, V1.as_bytes()).unwrap();
    let mut forged = good3.clone();
    let n = forged.len();
    forged[n - 2] ^= 0x01;
    vec![
        ("forged", forged, "does not verify"),
        (
            "wrong key",
            stranger.sign(3, V1.as_bytes()).unwrap(),
            "not trusted on this device",
        ),
        ("truncated", good3[..good3.len() - 4].to_vec(), "truncated"),
        (
            "replayed",
            d.signer.sign(2, V2.as_bytes()).unwrap(),
            "not newer than the applied version 2",
        ),
        (
            "older",
            d.signer.sign(1, V1.as_bytes()).unwrap(),
            "not newer",
        ),
        (
            "invalid payload",
            d.signer.sign(3, b"[log]\nlevel = \"loud\"\n").unwrap(),
            "log.level",
        ),
        (
            "trust change",
            d.signer.sign(3, b"[fleet]\ntrusted_keys = []\n").unwrap(),
            "fleet.trusted_keys: may not come from a fleet bundle",
        ),
        (
            "a library to load",
            d.signer
                .sign(3, b"[token]\nmodule = \"/tmp/evil.so\"\n")
                .unwrap(),
            "token.module: may not come from a fleet bundle: a fleet bundle may set identities",
        ),
        (
            "a command to run",
            d.signer.sign(3, b"[notify]\nexec = \"/bin/sh\"\n").unwrap(),
            "notify.exec: may not come from a fleet bundle",
        ),
        (
            "a new trust anchor",
            d.signer
                .sign(
                    3,
                    b"[[issuer]]\nname = \"x\"\nca_bundle = \"/tmp/ca.pem\"\n",
                )
                .unwrap(),
            "issuer[0].ca_bundle: may not come from a fleet bundle",
        ),
        (
            "not toml",
            d.signer.sign(3, b"[[[").unwrap(),
            "fleet bundle v3",
        ),
        (
            "garbage",
            b"\x00\x01garbage".to_vec(),
            "not an edge-signer bundle",
        ),
    ]
}

#[test]
fn apply_verifies_refuses_rollback_and_reports_changes() {
    let d = device();
    let r = d
        .sources
        .apply(&d.signer.sign(1, V1.as_bytes()).unwrap())
        .unwrap();
    assert_eq!((r.version, r.previous), (1, 0));
    assert!(
        r.changes
            .iter()
            .any(|c| c.path == "log.level" && c.new.as_deref() == Some("\"debug\"")),
        "{:?}",
        r.changes
    );
    assert_eq!(
        d.sources.load().unwrap().effective.config.log.level,
        schema::LogLevel::Debug
    );

    let r = d
        .sources
        .apply(&d.signer.sign(2, V2.as_bytes()).unwrap())
        .unwrap();
    assert_eq!(r.previous, 1);
    assert!(
        r.changes.iter().any(|c| c.path == "identity[0].overlap"),
        "{:?}",
        r.changes
    );
    let fleet = d.dir.path().join("state/fleet");
    let applied = snapshot(&fleet);

    for (what, bytes, expect) in refused_bundles(&d) {
        let e = d.sources.apply(&bytes).expect_err(what).to_string();
        assert!(e.contains(expect), "{what}: {e}");
        assert_eq!(
            snapshot(&fleet),
            applied,
            "{what} changed the applied config"
        );
    }
}

#[test]
fn a_crash_at_any_step_leaves_the_old_or_the_new_config_whole() {
    for (i, fail_at) in ApplyStep::ALL.iter().enumerate() {
        let d = device();
        d.sources
            .apply(&d.signer.sign(1, V1.as_bytes()).unwrap())
            .unwrap();
        let old = d.sources.load().unwrap().effective.config;
        let bundle2 = d.signer.sign(2, V2.as_bytes()).unwrap();
        let e = d
            .sources
            .apply_with(&bundle2, &mut |s| {
                if s == *fail_at {
                    Err(std::io::Error::other("power cut"))
                } else {
                    Ok(())
                }
            })
            .unwrap_err();
        assert!(e.to_string().contains("power cut"), "{e}");
        let loaded = d.sources.load().unwrap();
        let now = loaded.effective.config;
        let took_effect = i > ApplyStep::ALL
            .iter()
            .position(|s| *s == ApplyStep::RenameCurrent)
            .unwrap();
        if took_effect {
            assert_eq!(loaded.fleet_version, 2, "{fail_at:?}");
            assert_eq!(now.log.level, schema::LogLevel::Warn);
            assert_eq!(now.identities[0].overlap, Duration::days(5));
        } else {
            assert_eq!(now, old, "{fail_at:?}: not the old config");
            assert_eq!(loaded.fleet_version, 1);
        }
        // Whatever happened, v2 can be applied afterwards only if it did not take effect,
        // and an older version never can.
        assert!(d
            .sources
            .apply(&d.signer.sign(1, V1.as_bytes()).unwrap())
            .is_err());
        let again = d.sources.apply(&bundle2);
        assert_eq!(again.is_ok(), !took_effect, "{fail_at:?}: {again:?}");
    }
}

#[test]
fn a_tampered_current_bundle_falls_back_to_last_known_good() {
    let d = device();
    d.sources
        .apply(&d.signer.sign(1, V1.as_bytes()).unwrap())
        .unwrap();
    d.sources
        .apply(&d.signer.sign(2, V2.as_bytes()).unwrap())
        .unwrap();
    let cur = d.dir.path().join("state/fleet/current.bundle");
    let mut b = std::fs::read(&cur).unwrap();
    let n = b.len();
    b[n - 3] ^= 1;
    std::fs::write(&cur, b).unwrap();
    let loaded = d.sources.load().unwrap();
    assert_eq!(loaded.fleet_version, 1);
    assert!(
        loaded.warnings[0].contains("current fleet bundle ignored"),
        "{:?}",
        loaded.warnings
    );
    // The next bundle must not copy the tampered current over the good copy.
    let good = std::fs::read(d.dir.path().join("state/fleet/last-known-good.bundle")).unwrap();
    d.sources
        .apply(&d.signer.sign(3, V2.as_bytes()).unwrap())
        .unwrap();
    assert_eq!(
        std::fs::read(d.dir.path().join("state/fleet/last-known-good.bundle")).unwrap(),
        good,
        "last-known-good keeps the verified v1, not the tampered v2"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn loader_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(l) = Layer::parse(LayerKind::Local, "fuzz.toml", &text) {
            let _ = layers::resolve(&[l]);
        }
    }

    #[test]
    fn loader_never_panics_on_arbitrary_toml(
        keys in proptest::collection::vec(prop_oneof![
            Just("token.module"), Just("token.label"), Just("token.pin"), Just("identity"), Just("issuer"),
            Just("log.level"), Just("serial.baud"), Just("fleet.trusted_keys"), Just("paths.state_dir"),
            Just("identity.0.renewal"), Just("api.allowed_uids"), Just("x.y"),
        ], 0..6),
        values in proptest::collection::vec(prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            "\\PC{0,12}".prop_map(|s| format!("{s:?}")),
            Just("[]".to_string()), Just("{}".to_string()), Just("[{}]".to_string()),
            Just("[{ name = \"a\", kind = \"portal\" }]".to_string()), Just("true".to_string()),
            Just("\"30d\"".to_string()), Just("\"200%\"".to_string()), Just("{ file = 3 }".to_string()),
        ], 6),
    ) {
        let (mut top, mut tables) = (String::new(), String::new());
        for (k, v) in keys.iter().zip(values.iter()) {
            match k.rsplit_once('.') {
                Some((section, key)) => tables.push_str(&format!("[{section}]\n{key} = {v}\n")),
                None => top.push_str(&format!("{k} = {v}\n")),
            }
        }
        let Ok(l) = Layer::parse(LayerKind::Local, "fuzz.toml", &format!("{top}{tables}")) else { return Ok(()) };
        let base = Layer::parse(LayerKind::Firmware, "base.toml", EXAMPLE).unwrap();
        let _ = layers::resolve(&[base, l.clone()]);
        let _ = layers::resolve(&[l]);
    }
}
