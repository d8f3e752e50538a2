//! A 90-day certificate lived in seconds: the engine with a fake clock, keys in a real
//! SoftHSM token, and an in-process CA behind the `Issuer` trait (a fake of the issuer
//! only: everything the token does is real).

use edge_signer::clock::{Clock, FakeClock, Unix};
use edge_signer::events::Severity;
use edge_signer::issuer::Issuer;
use edge_signer::lifecycle::Engine;
use edge_signer_tests::pkcs11_tool_on;
use edge_signer_tests::sim::{config, SimCa};
use hsm_shim::testing::TestToken;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const DAY: u64 = 86_400;
const T0: Unix = 1_800_000_000;

type Sim = (
    TestToken,
    FakeClock,
    Arc<AtomicBool>,
    Engine,
    firmware_config::Config,
);

/// The engine on a fake clock at T0, a real token, and the in-process CA (`up` switches it).
fn sim_engine(overlap: &str, jitter: &str) -> Sim {
    sim_engine_with(overlap, jitter, |ca| ca)
}

/// The same with the CA shaped by `shape` first.
fn sim_engine_with(overlap: &str, jitter: &str, shape: impl FnOnce(SimCa) -> SimCa) -> Sim {
    let t = TestToken::new();
    let clock = FakeClock::at(T0);
    let up = Arc::new(AtomicBool::new(true));
    let mut issuers: BTreeMap<String, Box<dyn Issuer>> = BTreeMap::new();
    issuers.insert(
        "sim".into(),
        Box::new(shape(SimCa::new(clock.clone(), up.clone()))),
    );
    let cfg = config(
        &t.dir.path().join("state"),
        &t.module,
        "ec-p256",
        overlap,
        jitter,
    );
    let e = Engine::new(
        cfg.clone(),
        t.token.clone(),
        Arc::new(clock.clone()),
        issuers,
    )
    .unwrap();
    (t, clock, up, e, cfg)
}

/// The events of one kind the engine raised so far.
fn events<'a>(e: &'a Engine, kind: &str) -> Vec<&'a edge_signer::events::Event> {
    e.events().iter().filter(|ev| ev.kind == kind).collect()
}

/// Generation 2 could not renew: its reminders at 30, 15 and 5 days came once each, then
/// one critical lapse at its expiry, with backoff retries all along.
fn reminders_once_then_one_critical_lapse(e: &Engine, g2_expiry: Unix) {
    let reminders: Vec<(String, String)> = events(e, "reminder")
        .iter()
        .map(|ev| {
            (
                ev.at.clone(),
                ev.message.split('(').nth(1).unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let marks: Vec<&str> = reminders.iter().map(|(_, m)| m.as_str()).collect();
    // Generation 1 had its 30-day reminder; generation 2 all three, each exactly once.
    assert_eq!(
        marks,
        vec![
            "30 day mark)",
            "30 day mark)",
            "15 day mark)",
            "5 day mark)"
        ],
        "{reminders:?}"
    );
    assert_eq!(
        reminders[2].0,
        edge_signer::clock::rfc3339(g2_expiry - 15 * DAY)
    );
    let lapses = events(e, "lapsed");
    assert_eq!(lapses.len(), 1);
    assert_eq!(lapses[0].severity, Severity::Critical);
    assert_eq!(lapses[0].at, edge_signer::clock::rfc3339(g2_expiry));
    let failures = events(e, "failure").len();
    assert!(
        failures > 10,
        "retries with backoff while the CA is away ({failures})"
    );
}

#[test]
fn ninety_days_reminders_once_renewal_at_policy_point_and_lapse_is_critical() {
    let (t, clock, up, mut e, _) = sim_engine("7d", "0s");

    // Run the daemon's loop on the fake clock: tick, jump to the deadline it returns.
    let mut ticks = 0;
    let run_until = |e: &mut Engine, end: Unix, ticks: &mut u32| {
        while clock.now() < end {
            let next = e.run_all_until_wait();
            *ticks += 1;
            clock.set(next.min(end).max(clock.now() + 1));
        }
    };

    run_until(&mut e, T0 + 1, &mut ticks);
    let gw = e.register().identities["gw"].clone();
    assert_eq!(gw.current, Some(1));
    assert_eq!(gw.gen(1).unwrap().not_after(), Some(T0 + 90 * DAY));

    // Generation 1 renews at exactly 30 days before expiry (jitter 0).
    run_until(&mut e, T0 + 80 * DAY, &mut ticks);
    let started: Vec<_> = events(&e, "rotation-started")
        .iter()
        .map(|ev| ev.at.clone())
        .collect();
    assert_eq!(
        started,
        vec![
            edge_signer::clock::rfc3339(T0),
            edge_signer::clock::rfc3339(T0 + 60 * DAY)
        ]
    );
    let gw = e.register().identities["gw"].clone();
    assert_eq!(gw.current, Some(2));
    assert_eq!(
        gw.gen(1).unwrap().status,
        edge_signer::register::GenStatus::Retired,
        "retired after the 7-day overlap"
    );
    let k1 = gw.gen(1).unwrap().key_id_hex().unwrap();
    assert!(
        t.token
            .list_keys()
            .unwrap()
            .iter()
            .all(|k| hsm_shim::keys::hex(&k.id) != k1),
        "generation 1's key is gone"
    );

    // The CA goes away: generation 2 cannot renew; reminders at 30, 15 and 5 days, then lapse.
    up.store(false, Ordering::SeqCst);
    let g2_expiry = T0 + 60 * DAY + 90 * DAY;
    run_until(&mut e, g2_expiry + DAY, &mut ticks);
    reminders_once_then_one_critical_lapse(&e, g2_expiry);

    // The CA comes back: recovery with a new key, no person involved.
    up.store(true, Ordering::SeqCst);
    run_until(&mut e, g2_expiry + 2 * DAY, &mut ticks);
    let gw = e.register().identities["gw"].clone();
    assert_eq!(gw.step, edge_signer::register::Step::Active);
    assert_eq!(gw.current, Some(3));
    // No polling loop: about 160 simulated days took a bounded number of wake-ups, most
    // of them backoff retries (capped at 6 h) while the CA was away.
    assert!(ticks < 400, "{ticks} wake-ups");
    eprintln!(
        "simulated {} days in {ticks} wake-ups",
        (clock.now() - T0) / DAY
    );
}

#[test]
fn a_clock_back_in_1970_destroys_nothing_and_the_rotation_completes_once_time_is_right() {
    let (t, clock, _up, mut e, cfg) = sim_engine("7d", "0s");
    e.run_all_until_wait();
    assert_eq!(e.register().identities["gw"].current, Some(1));
    let keys = t.token.list_key_labels().unwrap().len();

    // The box reboots without its RTC, right when renewal would be due.
    clock.jump_to(86_400);
    for _ in 0..3 {
        e.run_all_until_wait();
    }
    let st = edge_signer::lifecycle::status(&cfg, e.register(), clock.now());
    assert!(
        st[0].next_action.starts_with("waiting for time sync"),
        "{st:?}"
    );
    assert_eq!(e.register().identities["gw"].current, Some(1));
    assert_eq!(
        e.register().identities["gw"].pending,
        None,
        "no rotation started"
    );
    assert_eq!(
        t.token.list_key_labels().unwrap().len(),
        keys,
        "no key made or destroyed"
    );
    let clock_events = e.events().iter().filter(|ev| ev.kind == "clock").count();
    assert_eq!(clock_events, 1, "said once, loudly");

    // Time sync: 61 days after enrolment, renewal is due and completes.
    clock.jump_to(T0 + 61 * DAY);
    e.run_all_until_wait();
    assert_eq!(e.register().identities["gw"].current, Some(2));
    assert_eq!(e.events().iter().filter(|ev| ev.kind == "clock").count(), 1);
}

/// A key replaced in the token (another key pair under the same CKA_ID and label) after its
/// certificate was checked is never promoted: the generation fails with a critical
/// `key-mismatch`, generation 1 stays current, and a new key is enrolled at once.
/// Tick the engine (the fake clock moving to each deadline, at most a minute at a time)
/// until generation `n` of "gw" is current.
fn run_to(e: &mut Engine, clock: &FakeClock, n: u32) {
    for _ in 0..50 {
        if e.register().identities.get("gw").and_then(|r| r.current) == Some(n) {
            return;
        }
        let next = e.run_all_until_wait();
        clock.set(next.min(clock.now() + 60).max(clock.now() + 1));
    }
    panic!("generation {n} never became current");
}

/// Replace generation `n`'s key in the token by a new one under the same CKA_ID and label,
/// the way someone holding the PIN could (pkcs11-tool). Returns the key id.
fn replace_key(t: &TestToken, e: &Engine, n: u32) -> String {
    let g = e.register().identities["gw"].gen(n).unwrap().clone();
    let id = g.key_id_hex().unwrap();
    let login = ("test", hsm_shim::testing::USER_PIN);
    let tool = |args: &[&str]| pkcs11_tool_on(&t.module, login, &[], args);
    edge_signer_tests::replace_key(tool, &id, &g.key_label);
    id
}

#[test]
fn a_key_replaced_before_promotion_is_never_promoted_and_a_new_one_is_enrolled() {
    use edge_signer::register::{GenStatus, Step};
    let (t, clock, _up, mut e, _) = sim_engine("7d", "0s");
    run_to(&mut e, &clock, 1);
    e.force("gw").unwrap();
    while e.register().identities["gw"].step != Step::Probed {
        e.take_one_step("gw").unwrap();
    }
    let id = replace_key(&t, &e, 2);

    e.take_one_step("gw").unwrap();
    let gw = e.register().identities["gw"].clone();
    assert_eq!(gw.current, Some(1), "the old pair stays");
    assert_eq!(gw.gen(2).unwrap().status, GenStatus::Failed);
    let mismatch = events(&e, "key-mismatch");
    assert_eq!(mismatch.len(), 1);
    assert_eq!(mismatch[0].severity, Severity::Critical);
    assert!(mismatch[0].message.contains(&id), "{}", mismatch[0].message);
    run_to(&mut e, &clock, 3);
}

/// The serving layer's own check, behind the engine's: when the token key of a promoted
/// generation no longer matches its certificate by the time the serving pair is built (the
/// key replaced between the engine's check and the swap), that pair is refused and the one
/// already served keeps serving; later passes keep refusing it.
#[test]
fn a_promoted_pair_whose_key_was_replaced_is_never_served() {
    use edge_signer::identities::Identities;
    let (t, clock, _up, mut e, _) = sim_engine("7d", "0s");
    run_to(&mut e, &clock, 1);
    let served = Identities::default();
    served.refresh(&e);
    let slot = served.slot("gw");
    let generation = || slot.get().map(|s| s.generation);
    assert_eq!(generation(), Some(1));

    e.force("gw").unwrap();
    run_to(&mut e, &clock, 2);
    replace_key(&t, &e, 2);
    served.refresh(&e);
    assert_eq!(generation(), Some(1), "the pair already served stays");
    assert_eq!(slot.refused(), Some(2));
    served.refresh(&e);
    assert_eq!(generation(), Some(1));
}

/// A CA whose certificates are as short as the renewal window or shorter (30-day ones with
/// the default `before = "30d"`, 1-day and 1-hour ones): one generation per renewal period
/// (a third of the life at the earliest), never one after another at once; `status` warns.
fn short_lived_certificates_renew_once_per_period(life: u64) {
    {
        let t = TestToken::new();
        let clock = FakeClock::at(T0);
        let up = Arc::new(AtomicBool::new(true));
        let mut ca = SimCa::new(clock.clone(), up.clone());
        ca.life = life;
        let mut issuers: BTreeMap<String, Box<dyn Issuer>> = BTreeMap::new();
        issuers.insert("sim".into(), Box::new(ca));
        let cfg = config(
            &t.dir.path().join("state"),
            &t.module,
            "ec-p256",
            "1m",
            "0s",
        );
        let mut e = Engine::new(
            cfg.clone(),
            t.token.clone(),
            Arc::new(clock.clone()),
            issuers,
        )
        .unwrap();
        e.force("gw").unwrap();
        run_to(&mut e, &clock, 1);
        let rows = edge_signer::lifecycle::status(&cfg, e.register(), clock.now());
        assert!(
            rows[0]
                .warnings
                .iter()
                .any(|w| w.contains("renewal.before (30d)")),
            "{:?}",
            rows[0].warnings
        );
        // Three lifetimes on the fake clock, a deadline (or a minute) at a time.
        let end = clock.now() + 3 * life;
        let mut ticks = 0;
        while clock.now() < end {
            let next = e.run_all_until_wait();
            clock.set(next.min(clock.now() + life / 20).max(clock.now() + 1));
            ticks += 1;
            assert!(ticks < 10_000, "the engine never sleeps");
        }
        let generations = e.register().identities["gw"].generations.len() as u64;
        // Renewal at 2/3 of the life left (a third of it lived): at most 3/(1/3) + 1.
        assert!(
            (4..=11).contains(&generations),
            "{generations} generations in 3 lifetimes of {life} s"
        );
    }
}

#[test]
fn thirty_day_certificates_with_a_thirty_day_window_renew_once_per_period() {
    short_lived_certificates_renew_once_per_period(30 * DAY);
}

#[test]
fn one_day_certificates_renew_once_per_period() {
    short_lived_certificates_renew_once_per_period(DAY);
}

#[test]
fn one_hour_certificates_renew_once_per_period() {
    short_lived_certificates_renew_once_per_period(3600);
}

/// The CA takes the request, then goes down before the answer is polled: the engine polls the
/// same submission again (backoff, failure recorded) and never sends a second request.
#[test]
fn a_ca_down_between_submit_and_poll_is_polled_again_never_asked_twice() {
    let mut submits = Arc::default();
    let (_t, clock, up, mut e, _cfg) = sim_engine_with("7d", "0s", |ca| {
        let ca = ca.down_after_submit(Arc::new(AtomicBool::new(true)));
        submits = ca.submits.clone();
        ca
    });

    let next = e.run_all_until_wait();
    let gw = e.register().identities["gw"].clone();
    assert_eq!((gw.current, gw.pending), (None, Some(1)), "{gw:?}");
    let failure = gw.failure.clone().expect("the poll failed");
    assert!(failure.reason.contains("connection refused"), "{failure:?}");
    assert_eq!(submits.load(Ordering::SeqCst), 1);

    up.store(true, Ordering::SeqCst);
    clock.set(next);
    e.run_all_until_wait();
    let gw = e.register().identities["gw"].clone();
    assert_eq!(gw.current, Some(1), "{gw:?}");
    assert_eq!(
        submits.load(Ordering::SeqCst),
        1,
        "one request, polled twice"
    );
}
