//! The engine's test doubles: an in-process CA and a config that uses it.

use edge_signer::clock::{Clock, FakeClock, Unix};
use edge_signer::issuer::{Issuer, IssuerAnswer, Request, Submitted};
use hsm_shim::rustls::pki_types::CertificateDer;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const DAY: u64 = 86_400;

/// An in-process CA behind the `Issuer` trait: answers at once when `up` (submit and poll
/// alike; down, each is refused as unreachable), 90-day certs
/// (or `life` seconds) dated by the fake clock.
pub struct SimCa {
    clock: FakeClock,
    up: Arc<AtomicBool>,
    /// Go down right after accepting a request (set by `down_after_submit`).
    down_after_submit: Arc<AtomicBool>,
    /// Requests accepted so far.
    pub submits: Arc<std::sync::atomic::AtomicUsize>,
    /// The lifetime of what it issues, in seconds.
    pub life: u64,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca: Vec<CertificateDer<'static>>,
}

impl SimCa {
    /// A new CA (`up` switches it on and off).
    pub fn new(clock: FakeClock, up: Arc<AtomicBool>) -> SimCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "sim CA");
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2040, 1, 1);
        let cert = p.self_signed(&key).unwrap();
        SimCa {
            clock,
            up,
            down_after_submit: Arc::default(),
            submits: Arc::default(),
            life: 90 * DAY,
            ca: vec![cert.der().clone()],
            issuer: rcgen::Issuer::new(p, key),
        }
    }
}

impl SimCa {
    /// While `flag` is set, the CA goes down (`up` false) right after it accepts a request:
    /// the submission is in, the answer must be polled for later.
    pub fn down_after_submit(mut self, flag: Arc<AtomicBool>) -> SimCa {
        self.down_after_submit = flag;
        self
    }
}

impl Issuer for SimCa {
    fn submit(&mut self, req: &Request, _now: Unix) -> Result<Submitted, IssuerAnswer> {
        if !self.up.load(Ordering::SeqCst) {
            return Err(IssuerAnswer::Unreachable("connection refused".into()));
        }
        self.submits.fetch_add(1, Ordering::SeqCst);
        if self.down_after_submit.load(Ordering::SeqCst) {
            self.up.store(false, Ordering::SeqCst);
        }
        Ok(Submitted {
            reference: format!("{}-{}", req.identity, req.generation),
            answer: None,
        })
    }

    fn poll(&mut self, req: &Request, _reference: &str, _now: Unix) -> IssuerAnswer {
        // Down between submit and poll: the poll does not get through either.
        if !self.up.load(Ordering::SeqCst) {
            return IssuerAnswer::Unreachable("connection refused".into());
        }
        let mut csr =
            rcgen::CertificateSigningRequestParams::from_pem(req.csr_pem).expect("our CSR parses");
        let now = self.clock.now();
        csr.params.not_before = time::OffsetDateTime::from_unix_timestamp(now as i64).unwrap();
        csr.params.not_after =
            time::OffsetDateTime::from_unix_timestamp((now + self.life) as i64).unwrap();
        IssuerAnswer::Issued(csr.signed_by(&self.issuer).unwrap().pem())
    }

    fn ca_bundle(&self) -> &[CertificateDer<'static>] {
        &self.ca
    }
}

/// A config with one identity `gw` using the `sim` issuer.
pub fn config(
    state: &std::path::Path,
    module: &std::path::Path,
    key_type: &str,
    overlap: &str,
    jitter: &str,
) -> firmware_config::Config {
    let text = format!(
        r#"
[token]
module = "{}"
label = "test"
pin = {{ file = "/nonexistent/unused" }}

[[identity]]
name = "gw"
key_type = "{key_type}"
subject = {{ o = "Acme", cn = "gw-1" }}
sans = ["dns:gw-1.example"]
issuer = "sim"
overlap = "{overlap}"
[identity.renewal]
before = "30d"
jitter = "{jitter}"
retry_min = "1h"
retry_max = "6h"

[[issuer]]
name = "sim"
kind = "portal"
outbox = "/nonexistent/out"
inbox = "/nonexistent/in"
ca_bundle = "/nonexistent/ca.pem"

[paths]
state_dir = "{}"
"#,
        module.display(),
        state.display()
    );
    let layer =
        firmware_config::Layer::parse(firmware_config::LayerKind::Firmware, "sim.toml", &text)
            .unwrap();
    firmware_config::layers::resolve(&[layer]).unwrap().config
}
