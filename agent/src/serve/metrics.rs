//! Prometheus metrics (`prometheus-client`, text format), served at `/metrics` on the API
//! socket and, optionally, on a loopback TCP port. One process-wide set: token signatures
//! are observed from inside hsm-shim through its observer hook.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// Not-after of each identity's serving certificate.
    pub not_after: Family<Labels, Gauge>,
    /// Renewal attempts by identity and result.
    pub renewals: Family<Labels, Counter>,
    /// Last successful renewal (promotion) per identity.
    pub last_success: Family<Labels, Gauge>,
    /// Token signature latency by mechanism.
    pub sign_seconds: HistogramFamily,
    /// Token errors by CKR.
    pub token_errors: Family<Labels, Counter>,
    /// API requests by caller uid, operation and result.
    pub api_requests: Family<Labels, Counter>,
    /// Proxy connections by proxy, generation presented, result and key exchange group.
    pub proxy_connections: Family<Labels, Counter>,
    /// Proxy bytes by proxy and direction.
    pub proxy_bytes: Family<Labels, Counter>,
    /// Preconnected spares by proxy and fate (used, expired, stale).
    pub proxy_spares: Family<Labels, Counter>,
    /// Fleet configuration bundle version in effect.
    pub bundle_version: Gauge,
    /// The signature histograms of the three mechanism families, looked up once (a
    /// signature is the hot path: no label allocation per observation).
    sign_by_mechanism: [(&'static str, Histogram); 3],
    /// API request counters by (uid, operation, result), looked up once each.
    api_cache: RwLock<HashMap<(u32, &'static str, &'static str), Counter>>,
}

fn sign_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

fn observe_sign(mechanism: &'static str, secs: f64, ckr: Option<&str>) {
    let m = get();
    match m.sign_by_mechanism.iter().find(|(n, _)| *n == mechanism) {
        Some((_, h)) => h.observe(secs),
        None => m
            .sign_seconds
            .get_or_create(&vec![("mechanism", mechanism.to_owned())])
            .observe(secs),
    }
    if let Some(ckr) = ckr {
        m.token_errors
            .get_or_create(&vec![("ckr", ckr.to_owned())])
            .inc();
    }
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("edge_signer");
        let sign_seconds: HistogramFamily = Family::new_with_constructor(sign_histogram);
        let sign_by_mechanism = ["ecdsa", "rsa-pkcs1", "rsa-pss"].map(|n| {
            let h = sign_seconds
                .get_or_create(&vec![("mechanism", n.to_owned())])
                .clone();
            (n, h)
        });
        let m = Metrics {
            not_after: Family::default(),
            renewals: Family::default(),
            last_success: Family::default(),
            sign_seconds,
            token_errors: Family::default(),
            api_requests: Family::default(),
            proxy_connections: Family::default(),
            proxy_bytes: Family::default(),
            proxy_spares: Family::default(),
            bundle_version: Gauge::default(),
            registry: Registry::default(),
            sign_by_mechanism,
            api_cache: RwLock::default(),
        };
        registry.register(
            "certificate_not_after_timestamp_seconds",
            "Not-after of the serving certificate",
            m.not_after.clone(),
        );
        registry.register(
            "renewal_attempts",
            "Renewal attempts by result",
            m.renewals.clone(),
        );
        registry.register(
            "renewal_last_success_timestamp_seconds",
            "Time of the last promotion",
            m.last_success.clone(),
        );
        registry.register(
            "token_signature_seconds",
            "Token signature latency by mechanism",
            m.sign_seconds.clone(),
        );
        registry.register(
            "token_errors",
            "Token errors by CKR",
            m.token_errors.clone(),
        );
        registry.register(
            "api_requests",
            "Signing API requests by caller, operation and result",
            m.api_requests.clone(),
        );
        registry.register(
            "proxy_connections",
            "Proxy connections by proxy, generation presented, result and key exchange group negotiated with the target (kx)",
            m.proxy_connections.clone(),
        );
        registry.register(
            "proxy_bytes",
            "Bytes through the proxies by direction",
            m.proxy_bytes.clone(),
        );
        registry.register(
            "proxy_spares",
            "Preconnected spare connections by proxy and fate: used, expired (no taker in time), stale (closed by the server, or made for an older generation)",
            m.proxy_spares.clone(),
        );
        registry.register(
            "config_bundle_version",
            "Fleet configuration bundle version in effect",
            m.bundle_version.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Count one API request (the counter of each uid/operation/result is looked up once).
    pub fn api_request(&self, uid: u32, op: &'static str, result: &'static str) {
        let key = (uid, op, result);
        let cached = self
            .api_cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let counter = cached.unwrap_or_else(|| {
            let c = self
                .api_requests
                .get_or_create(&labels(&[
                    ("uid", &uid.to_string()),
                    ("op", op),
                    ("result", result),
                ]))
                .clone();
            self.api_cache
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, c.clone());
            c
        });
        counter.inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics (installs the token signature observer on first use).
pub fn get() -> &'static Metrics {
    METRICS.get_or_init(|| {
        hsm_shim::sign::set_sign_observer(observe_sign);
        Metrics::new()
    })
}

/// Label helper.
pub fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}
