//! Where a proxy route connects: the target's addresses, looked up once and kept.
//!
//! A target given as an IP address is used as is. A host name is looked up once and the answer
//! kept for [`FRESH`]: a proxied connection then makes no lookup of its own (each would cost a
//! hand-off to tokio's blocking pool for `getaddrinfo`, and a DNS round trip for a name not in
//! /etc/hosts; docs/perf.md). After [`FRESH`], or when none of its addresses accepts, the kept answer is still
//! used at once while one lookup in the background renews it. When lookups fail (DNS down on a
//! flaky uplink), the last answer keeps serving for up to [`STALE`], with a warning, so a
//! resolver outage alone does not cut the box off a target it can still reach. Older than that,
//! a connection waits for a lookup of its own, and fails with it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// How long an answer is used without a new lookup.
pub const FRESH: Duration = Duration::from_secs(30);
/// How long an answer keeps serving while lookups fail.
pub const STALE: Duration = Duration::from_secs(3600);

type Lookup = fn(String) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;

fn system_lookup(
    spec: String,
) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>> {
    Box::pin(async move { Ok(tokio::net::lookup_host(spec).await?.collect()) })
}

/// One route's target (`host:port`).
pub struct Target {
    spec: String,
    /// The target's address when it is written as one.
    fixed: Option<Arc<[SocketAddr]>>,
    known: Mutex<Option<Known>>,
    renewing: AtomicBool,
    /// Saying that a renewal failed.
    said: super::OncePerMinute,
    lookup: Lookup,
}

#[derive(Clone)]
struct Known {
    addrs: Arc<[SocketAddr]>,
    at: Instant,
}

impl Target {
    /// The target `spec` (`host:port`, `v4:port` or `[v6]:port`).
    pub fn new(spec: &str) -> Arc<Target> {
        Target::with_lookup(spec, system_lookup)
    }

    fn with_lookup(spec: &str, lookup: Lookup) -> Arc<Target> {
        Arc::new(Target {
            spec: spec.to_owned(),
            fixed: spec.parse::<SocketAddr>().ok().map(|a| Arc::from([a])),
            known: Mutex::new(None),
            renewing: AtomicBool::new(false),
            said: Default::default(),
            lookup,
        })
    }

    /// A TCP connection to the first of the target's addresses that accepts. When none
    /// does, a kept answer is renewed at once (the target may have moved).
    pub async fn connect(self: &Arc<Self>) -> io::Result<TcpStream> {
        let refused = match crate::tcp::connect_any(&self.spec, &self.addrs().await?).await {
            Ok(s) => return Ok(s),
            Err(why) => why,
        };
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(k) = known {
            self.renew_later(k.at);
        }
        Err(io::Error::other(refused))
    }

    /// The addresses to try, in the resolver's order.
    async fn addrs(self: &Arc<Self>) -> io::Result<Arc<[SocketAddr]>> {
        if let Some(a) = &self.fixed {
            return Ok(a.clone());
        }
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match known {
            Some(k) if k.at.elapsed() < FRESH => Ok(k.addrs),
            Some(k) if k.at.elapsed() < STALE => {
                self.renew_later(k.at);
                Ok(k.addrs)
            }
            _ => self.look_up().await,
        }
    }

    async fn look_up(&self) -> io::Result<Arc<[SocketAddr]>> {
        let found = (self.lookup)(self.spec.clone()).await?;
        if found.is_empty() {
            return Err(io::Error::other("the name has no address"));
        }
        let addrs: Arc<[SocketAddr]> = found.into();
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) = Some(Known {
            addrs: addrs.clone(),
            at: Instant::now(),
        });
        Ok(addrs)
    }

    /// One lookup at a time, in the background; the answer from `since` serves meanwhile.
    fn renew_later(self: &Arc<Self>, since: Instant) {
        if self.renewing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        let guard = Renewing(self.clone());
        tokio::spawn(async move {
            let _guard = guard;
            match me.look_up().await {
                Err(e) if me.said.due() => tracing::warn!(
                    "cannot look the proxy target {} up ({e}); still connecting to the addresses found {} s ago",
                    me.spec,
                    since.elapsed().as_secs()
                ),
                _ => {}
            }
        });
    }
}

/// Clears the renewal flag when the renewal ends, or is dropped unrun with its runtime.
struct Renewing(Arc<Target>);

impl Drop for Renewing {
    fn drop(&mut self) {
        self.0.renewing.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    static CALLS: AtomicUsize = AtomicUsize::new(0);
    static FAIL: AtomicBool = AtomicBool::new(false);

    fn counted(_spec: String) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>> {
        CALLS.fetch_add(1, Ordering::SeqCst);
        let fail = FAIL.load(Ordering::SeqCst);
        Box::pin(async move {
            if fail {
                Err(io::Error::other("resolver down"))
            } else {
                Ok(vec!["127.0.0.1:9".parse().unwrap()])
            }
        })
    }

    fn age(t: &Target, by: Duration) {
        let mut k = t.known.lock().unwrap();
        let k = k.as_mut().unwrap();
        k.at = Instant::now().checked_sub(by).unwrap();
    }

    /// One test, because the lookup double's counters are shared.
    #[tokio::test]
    async fn an_answer_is_kept_renewed_in_the_background_and_served_stale_while_lookups_fail() {
        let ip = Target::with_lookup("192.0.2.1:443", counted);
        assert_eq!(
            &*ip.addrs().await.unwrap(),
            &["192.0.2.1:443".parse().unwrap()]
        );
        assert_eq!(
            CALLS.load(Ordering::SeqCst),
            0,
            "an address needs no lookup"
        );

        let t = Target::with_lookup("gw.example:443", counted);
        let first = t.addrs().await.unwrap();
        let again = t.addrs().await.unwrap();
        assert!(Arc::ptr_eq(&first, &again), "kept while fresh");
        assert_eq!(CALLS.load(Ordering::SeqCst), 1);

        // Past FRESH: served at once, renewed in the background.
        age(&t, FRESH + Duration::from_secs(1));
        assert!(Arc::ptr_eq(&t.addrs().await.unwrap(), &first));
        tokio::task::yield_now().await;
        while t.renewing.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        assert_eq!(CALLS.load(Ordering::SeqCst), 2, "one renewal");
        assert!(t.known.lock().unwrap().as_ref().unwrap().at.elapsed() < FRESH);

        // No address accepts (nothing listens on 127.0.0.1:9): a fresh answer is renewed.
        assert!(t.connect().await.is_err());
        while t.renewing.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        assert_eq!(CALLS.load(Ordering::SeqCst), 3, "renewed after the refusal");

        // The resolver fails: the old answer serves until STALE, then the lookup's error.
        FAIL.store(true, Ordering::SeqCst);
        age(&t, STALE - Duration::from_secs(60));
        assert_eq!(t.addrs().await.unwrap().len(), 1, "served stale");
        while t.renewing.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            t.addrs().await.unwrap().len(),
            1,
            "still served after a failed renewal"
        );
        age(&t, STALE + Duration::from_secs(1));
        let err = t.addrs().await.unwrap_err();
        assert!(err.to_string().contains("resolver down"), "{err}");
    }

    /// `localhost` may name ::1 first: a refused address gives way to the next.
    #[tokio::test]
    async fn a_name_connects_through_the_system_resolver() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let t = Target::new(&format!("localhost:{port}"));
        let (conn, accepted) = tokio::join!(t.connect(), l.accept());
        assert_eq!(conn.unwrap().peer_addr().unwrap().port(), port);
        assert!(accepted.is_ok());
    }
}
