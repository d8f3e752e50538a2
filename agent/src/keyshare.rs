//! Key shares made before they are needed: the x25519 group of the TLS provider keeps a few
//! ephemeral key pairs ready, so that opening a connection does not wait for one.
//!
//! Every new TLS connection (a proxied one, a preconnected spare, the agent's own calls)
//! starts with an ephemeral x25519 key pair, and so does every TLS 1.3 resumption
//! (rustls offers only `psk_dhe_ke`). Making that pair is a scalar multiplication on the
//! connection's path: 20 µs on the bench VM (of 52 µs for the whole exchange; a gateway's
//! slower core pays more). Here, taking a pair from the pool is a pop; the runtime the
//! caller is on then makes the next pair in a task of its own, which runs while the
//! connection waits for the server's answer, off its path. `scripts/bench`, 5 alternated
//! pairs of runs: proxy 1 client vs stunnel 1.90-1.93 without, 1.92-1.98 with (each pair
//! in favour); with `preconnect` 2.15-2.24 without, 2.25-2.32 with.
//!
//! Each pair is used once (taken out of the pool, never copied), exactly like one made on
//! demand, so forward secrecy is unchanged: a pair only exists earlier, for as long as the
//! next connection takes to come. Outside a tokio runtime an empty pool makes the pair on
//! the spot, as rustls would; a refill queued on a runtime that ends first (a CLI call's)
//! is dropped and the next one queued. An idle daemon makes nothing: pairs are only made to
//! replace ones taken.

use rustls::crypto::{ActiveKeyExchange, SupportedKxGroup};
use rustls::{NamedGroup, ProtocolVersion};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Pairs kept ready: one per connection that can start at the same moment on a small
/// gateway (its cores, give or take), each 32 + 32 bytes.
const READY: usize = 4;

/// The provider's x25519 group, with its pairs made ahead.
pub static X25519: &dyn SupportedKxGroup = &Ahead(&POOL);

static POOL: Pool = Pool::new();

/// A group whose pairs come from a pool.
#[derive(Debug)]
struct Ahead(&'static Pool);

struct Pool {
    inner: &'static dyn SupportedKxGroup,
    ready: Mutex<Vec<Box<dyn ActiveKeyExchange>>>,
    /// A refill task is queued or running (at most one at a time).
    refilling: AtomicBool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySharePool")
            .field("group", &self.inner.name())
            .finish_non_exhaustive()
    }
}

/// Clears `refilling` when the refill task ends, or is dropped unrun (its runtime shut
/// down first: a CLI call's current-thread runtime), so that a later one can be queued.
struct Refilling(&'static Pool);

impl Drop for Refilling {
    fn drop(&mut self) {
        self.0.refilling.store(false, Ordering::Release);
    }
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            inner: rustls::crypto::ring::kx_group::X25519,
            ready: Mutex::new(Vec::new()),
            refilling: AtomicBool::new(false),
        }
    }

    fn take(&self) -> Option<Box<dyn ActiveKeyExchange>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn len(&self) -> usize {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Make pairs until `READY` wait (each made outside the lock).
    fn refill(&self) {
        while self.len() < READY {
            let Ok(pair) = self.inner.start() else {
                return;
            };
            self.ready
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(pair);
        }
    }

    /// Queue a refill on the caller's tokio runtime, if there is one and none is queued.
    fn refill_later(&'static self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let flag = Refilling(self);
        rt.spawn(async move {
            flag.0.refill();
            drop(flag);
        });
    }
}

impl SupportedKxGroup for Ahead {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        let pair = self.0.take();
        self.0.refill_later();
        match pair {
            Some(p) => Ok(p),
            None => self.0.inner.start(),
        }
    }

    fn name(&self) -> NamedGroup {
        self.0.inner.name()
    }

    fn fips(&self) -> bool {
        self.0.inner.fips()
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        self.0.inner.usable_for_version(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ends that each take a pair from the pool agree on one secret; no pair is given
    /// twice; the pool is refilled off the caller's path.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pairs_from_the_pool_agree_and_are_never_reused() {
        static P: Pool = Pool::new();
        let group = Ahead(&P);
        let mut publics = std::collections::HashSet::new();
        for _ in 0..3 * READY {
            let (a, b) = (group.start().unwrap(), group.start().unwrap());
            let (pa, pb) = (a.pub_key().to_vec(), b.pub_key().to_vec());
            assert!(publics.insert(pa.clone()), "a pair was given twice");
            assert!(publics.insert(pb.clone()), "a pair was given twice");
            let (sa, sb) = (a.complete(&pb).unwrap(), b.complete(&pa).unwrap());
            assert_eq!(sa.secret_bytes(), sb.secret_bytes());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(P.len(), READY, "refilled after use");
        assert_eq!(X25519.name(), NamedGroup::X25519);
    }

    /// A refill queued on a runtime that shuts down before running it does not stop later
    /// refills; outside a runtime an empty pool still gives a pair (made on the spot).
    #[test]
    fn a_refill_dropped_unrun_does_not_block_the_next() {
        static P: Pool = Pool::new();
        let group = Ahead(&P);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async { group.start().unwrap() });
        assert!(P.refilling.load(Ordering::Acquire), "a refill was queued");
        drop(rt);
        assert!(!P.refilling.load(Ordering::Acquire));
        assert_eq!(P.len(), 0);
        assert_eq!(group.start().unwrap().pub_key().len(), 32);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            group.start().unwrap();
            tokio::task::yield_now().await;
        });
        assert_eq!(P.len(), READY);
    }
}
