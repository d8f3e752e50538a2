//! `preconnect = true` on a `[[proxy]]` route: after each connection the route opens one
//! spare TLS connection to the target (TCP connect, handshake with the current identity,
//! server verified), so that the next local connection starts on a finished handshake
//! instead of waiting for one. A payment terminal that opens a connection per transaction
//! sees its latency drop by the whole handshake; the CPU per connection is the same, done
//! earlier.
//!
//! A spare is never used twice and never kept long: it is dropped after `MAX_AGE` without
//! a taker (servers close connections that stay silent after the handshake, and a spare
//! closed under the taker would fail its first request), when the identity's generation
//! changed (it authenticated with the old certificate), and when the server has closed it
//! (checked without waiting at the hand-off). Bytes the server sent first (a banner) are
//! handed over with it. An idle route has no spare and no timer: nothing wakes the daemon.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tokio_rustls::client::TlsStream;

/// How long a spare waits for a taker.
pub const MAX_AGE: Duration = Duration::from_secs(10);

/// An upstream TLS connection.
pub type Upstream = TlsStream<TcpStream>;

struct Ready {
    id: u64,
    generation: u32,
    tls: Upstream,
    /// The task that drops the spare at `MAX_AGE` (aborted when it is taken).
    expiry: AbortHandle,
}

/// A route's spare connection (at most one) and whether one is being made.
pub struct Spare {
    /// The route's name (metrics).
    proxy: String,
    ready: Mutex<Option<Ready>>,
    making: AtomicBool,
    ids: AtomicU64,
}

/// A connection taken from the spare slot: the stream and what the server already sent.
pub struct Taken {
    /// The upstream connection.
    pub tls: Upstream,
    /// Application bytes the server sent before the hand-off (to pass on first).
    pub early: Vec<u8>,
}

impl Spare {
    /// No spare yet, for route `proxy`.
    pub fn new(proxy: &str) -> Spare {
        Spare {
            proxy: proxy.to_owned(),
            ready: Mutex::default(),
            making: AtomicBool::new(false),
            ids: AtomicU64::new(0),
        }
    }

    fn count(&self, fate: &str) {
        super::metrics::get()
            .proxy_spares
            .get_or_create(&super::metrics::labels(&[
                ("proxy", &self.proxy),
                ("fate", fate),
            ]))
            .inc();
    }

    /// The spare, if it belongs to `generation` and the server has not closed it.
    pub fn take(&self, generation: u32) -> Option<Taken> {
        let ready = self
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        ready.expiry.abort();
        let mut taken = Taken {
            tls: ready.tls,
            early: Vec::new(),
        };
        if ready.generation != generation {
            // Once per promotion and route: worth a line.
            tracing::info!(proxy = %self.proxy, "spare connection dropped: made for generation {}, now {generation}", ready.generation);
        } else if !still_open(&mut taken) {
            tracing::debug!(proxy = %self.proxy, "spare connection dropped: closed by the server");
        } else {
            self.count("used");
            return Some(taken);
        }
        self.count("stale");
        None
    }

    /// Start making a spare unless one is ready or being made. `make` connects and
    /// completes the handshake for `generation`.
    pub fn refill<F>(self: &Arc<Self>, generation: u32, make: F)
    where
        F: std::future::Future<Output = Option<Upstream>> + Send + 'static,
    {
        let has_one = self
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if has_one || self.making.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let Some(tls) = make.await else {
                me.making.store(false, Ordering::Release);
                return;
            };
            let id = me.ids.fetch_add(1, Ordering::Relaxed);
            let dropper = me.clone();
            let expiry = tokio::spawn(async move {
                tokio::time::sleep(MAX_AGE).await;
                let mut r = dropper.ready.lock().unwrap_or_else(|p| p.into_inner());
                if r.as_ref().is_some_and(|s| s.id == id) {
                    *r = None;
                    drop(r);
                    dropper.count("expired");
                }
            })
            .abort_handle();
            let mut r = me.ready.lock().unwrap_or_else(|p| p.into_inner());
            *r = Some(Ready {
                id,
                generation,
                tls,
                expiry,
            });
            // Only now: a refill asked for in between sees the spare, not a gap.
            me.making.store(false, Ordering::Release);
        });
    }
}

/// Read, without waiting, whatever the server sent while the spare waited: true when it is
/// still open (its bytes, if any, are in `early`); false when it was closed or failed, or
/// when that cannot be told (a fresh connection is then made: never a doubtful spare).
///
/// The kernel is asked first, not tokio's readiness (which learns of a FIN only when the
/// I/O driver next runs): nothing queued is an open, quiet spare. Queued bytes (session
/// tickets, a banner, a close_notify) are read through TLS until the kernel has none left.
fn still_open(t: &mut Taken) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut buf = [0u8; 4096];
    let mut stale = false;
    for _ in 0..64 {
        match queued(t.tls.get_ref().0) {
            Queued::Nothing => return true,
            Queued::Closed => return false,
            // Bytes that tokio did not read on the last try: it has not seen them yet.
            Queued::Bytes if stale => return false,
            Queued::Bytes => {}
        }
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut t.tls).poll_read(&mut cx, &mut rb) {
            Poll::Pending => stale = true,
            Poll::Ready(Ok(())) if rb.filled().is_empty() => return false,
            Poll::Ready(Ok(())) => {
                stale = false;
                t.early.extend_from_slice(rb.filled());
                // The rest stays in the stream for the splice.
                if t.early.len() >= 64 << 10 {
                    return true;
                }
            }
            Poll::Ready(Err(_)) => return false,
        }
    }
    false
}

enum Queued {
    Nothing,
    Bytes,
    Closed,
}

/// What the kernel holds for `tcp` to read, without taking it.
fn queued(tcp: &TcpStream) -> Queued {
    use rustix::net::RecvFlags;
    let mut probe = [0u8; 1];
    match rustix::net::recv(tcp, &mut probe, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((0, _)) => Queued::Closed,
        Ok(_) => Queued::Bytes,
        Err(rustix::io::Errno::AGAIN) => Queued::Nothing,
        Err(_) => Queued::Closed,
    }
}
