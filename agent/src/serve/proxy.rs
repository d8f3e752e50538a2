//! mTLS egress proxies: a local process speaks plain TCP to `listen`; the agent opens TLS to
//! `target` presenting the identity's current pair (through the swapped resolver), verifies
//! the server against `server_ca`, and splices bytes both ways. A connection ends when either
//! side closes, after `idle_timeout` without a byte, or at the not-after of the certificate
//! it authenticated with (the peer would refuse it from then on anyway).

use super::metrics;
use super::preconnect::{Spare, Upstream};
use crate::error::{Context, Result};
use crate::identities::{Resolver, ServingIdentity};
use firmware_config::schema::{Listen, ProxyConfig};
use rustls::pki_types::ServerName;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

/// One proxy's route: its configuration and what its connections share.
pub struct Route {
    cfg: ProxyConfig,
    roots: Arc<rustls::RootCertStore>,
    /// One client config (and so one TLS session cache) per generation: a session resumed
    /// after a promotion would carry the old certificate's authentication to the server.
    connector: std::sync::Mutex<(u32, TlsConnector)>,
    server_name: ServerName<'static>,
    /// The target's addresses, looked up once and kept (`target.rs`).
    target: Arc<super::target::Target>,
    slot: Arc<ServingIdentity>,
    own_uid: u32,
    /// The spare upstream connection (`preconnect = true`).
    spare: Arc<Spare>,
    /// Saying that the route is at `max_connections`.
    said_full: super::OncePerMinute,
    /// Saying that accepting failed.
    said_accept: super::OncePerMinute,
    /// Who may use it now (follows reloads).
    access: tokio::sync::watch::Receiver<Access>,
}

fn server_name(cfg: &ProxyConfig) -> Result<ServerName<'static>> {
    let host = match &cfg.server_name {
        Some(n) => n.clone(),
        None => {
            let (h, _) = cfg
                .target
                .rsplit_once(':')
                .context("target is not host:port")?;
            h.trim_start_matches('[').trim_end_matches(']').to_owned()
        }
    };
    ServerName::try_from(host.clone()).with_context(|| format!("'{host}' is not a server name"))
}

/// Who may use a proxy now. Sent again at each reload; every open connection of the proxy
/// watches it, so a caller no longer allowed is cut off at the reload, not at its next
/// connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Access {
    /// The proxy is configured (false: removed by a reload, every connection ends).
    pub open: bool,
    /// `allowed_uids`.
    pub uids: Vec<u32>,
    /// `allowed_gids`.
    pub gids: Vec<u32>,
}

impl Access {
    /// The access a proxy's configuration gives.
    pub fn of(cfg: &ProxyConfig) -> Access {
        Access {
            open: true,
            uids: cfg.allowed_uids.clone(),
            gids: cfg.allowed_gids.clone(),
        }
    }

    /// Whether a caller may use the proxy (`cred`: None for a TCP caller, which no list
    /// names: TCP listeners take no uid lists).
    fn admits(&self, own_uid: u32, cred: Option<(u32, u32)>) -> bool {
        self.open
            && match cred {
                None => true,
                Some((uid, gid)) => {
                    uid == own_uid || self.uids.contains(&uid) || self.gids.contains(&gid)
                }
            }
    }
}

/// A proxy made ready to listen: everything that can fail but the bind (the CA bundle is
/// read, the server name checked), so a reload can keep the old listener when this fails.
pub fn prepare(
    cfg: ProxyConfig,
    slot: Arc<ServingIdentity>,
    access: tokio::sync::watch::Receiver<Access>,
) -> Result<Arc<Route>> {
    let roots = Arc::new(
        crate::tlsconf::load_roots(&cfg.server_ca)
            .with_context(|| format!("server_ca {}", cfg.server_ca.display()))?,
    );
    let first = connector(&cfg, &roots, &slot)?;
    cfg.listen_addr().map_err(crate::error::Error::msg)?;
    Ok(Arc::new(Route {
        server_name: server_name(&cfg)?,
        target: super::target::Target::new(&cfg.target),
        roots,
        connector: std::sync::Mutex::new((0, first)),
        slot,
        own_uid: rustix::process::getuid().as_raw(),
        spare: Arc::new(Spare::new(&cfg.name)),
        said_full: Default::default(),
        said_accept: Default::default(),
        access,
        cfg,
    }))
}

/// Bind the proxy's listener and start its accept loop.
pub fn listen(route: Arc<Route>) -> Result<JoinHandle<()>> {
    let listen = route.cfg.listen_addr().map_err(crate::error::Error::msg)?;
    let limit = Arc::new(Semaphore::new(route.cfg.max_connections));
    tracing::info!(proxy = %route.cfg.name, listen = %route.cfg.listen, target = %route.cfg.target, identity = %route.cfg.identity, "proxy listening");
    let task = match listen {
        Listen::Unix(path) => {
            let l = super::http::bind_unix(&path)?;
            tokio::spawn(async move {
                loop {
                    let Some((s, _)) = route.accepted(l.accept()).await else {
                        continue;
                    };
                    let cred = s.peer_cred().ok().map(|c| (c.uid(), c.gid()));
                    if !route.caller_allowed(cred) {
                        tracing::warn!(proxy = %route.cfg.name, uid = %super::or_dash(cred.map(|c| c.0)), gid = %super::or_dash(cred.map(|c| c.1)), "proxy connection refused: caller not in allowed_uids/allowed_gids");
                        route.count("refused-caller", "-", "-");
                        continue;
                    }
                    let Some(permit) = route.permit(&limit).await else {
                        return;
                    };
                    let r = route.clone();
                    tokio::spawn(async move {
                        r.serve(s, cred).await;
                        drop(permit);
                    });
                }
            })
        }
        Listen::Tcp(addr) => {
            let std_l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr}"))?;
            std_l.set_nonblocking(true)?;
            let l = TcpListener::from_std(std_l)?;
            tokio::spawn(async move {
                loop {
                    let Some((s, _)) = route.accepted(l.accept()).await else {
                        continue;
                    };
                    // Bytes go on as they come: batching small writes is the caller's call.
                    let _ = s.set_nodelay(true);
                    let Some(permit) = route.permit(&limit).await else {
                        return;
                    };
                    let r = route.clone();
                    tokio::spawn(async move {
                        r.serve(s, None).await;
                        drop(permit);
                    });
                }
            })
        }
    };
    Ok(task)
}

fn connector(
    cfg: &ProxyConfig,
    roots: &Arc<rustls::RootCertStore>,
    slot: &Arc<ServingIdentity>,
) -> Result<TlsConnector> {
    let provider = match &cfg.kx {
        Some(kx) => crate::tlsconf::provider_with(kx),
        None => crate::tlsconf::provider(),
    };
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)?
        .with_root_certificates(roots.clone())
        .with_client_cert_resolver(Arc::new(Resolver(slot.clone())));
    Ok(TlsConnector::from(Arc::new(client)))
}

impl Route {
    /// The connector of `generation` (a fresh session cache when the generation changed).
    fn connector_for(&self, generation: u32) -> Option<TlsConnector> {
        let mut c = self.connector.lock().unwrap_or_else(|p| p.into_inner());
        if c.0 != generation {
            *c = (
                generation,
                connector(&self.cfg, &self.roots, &self.slot).ok()?,
            );
        }
        Some(c.1.clone())
    }

    /// A slot for one more open connection; at `max_connections`, wait for one to close
    /// (further callers wait in the listen backlog meanwhile), saying so at most once a
    /// minute. None only if the semaphore was closed (it never is: a replaced route's
    /// accept loop is aborted instead).
    async fn permit(&self, limit: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = limit.clone().try_acquire_owned() {
            return Some(p);
        }
        if self.said_full.due() {
            tracing::warn!(proxy = %self.cfg.name, max_connections = self.cfg.max_connections, "proxy at max_connections: new connections wait until one closes (raise max_connections, or lower idle_timeout if callers leave connections open)");
        }
        limit.clone().acquire_owned().await.ok()
    }

    /// What `accept` gave; after a failure, say so (once a minute) and pause the loop.
    async fn accepted<S>(
        &self,
        accept: impl std::future::Future<Output = std::io::Result<S>>,
    ) -> Option<S> {
        match accept.await {
            Ok(s) => Some(s),
            Err(e) => {
                let what = format!("proxy '{}'", self.cfg.name);
                super::accept_failed(&what, &e, &self.said_accept).await;
                None
            }
        }
    }

    /// A Unix caller without credentials is refused.
    fn caller_allowed(&self, cred: Option<(u32, u32)>) -> bool {
        cred.is_some() && self.access.borrow().admits(self.own_uid, cred)
    }

    /// Resolves when a reload takes the caller's access away (or removes the proxy).
    async fn access_lost(&self, cred: Option<(u32, u32)>) {
        let mut rx = self.access.clone();
        loop {
            if !rx.borrow_and_update().admits(self.own_uid, cred) {
                return;
            }
            if rx.changed().await.is_err() {
                // The proxy's sender is gone (removed by a reload, or the servers ended):
                // its last word stands, and nothing changes any more.
                if !rx.borrow().admits(self.own_uid, cred) {
                    return;
                }
                std::future::pending::<()>().await;
            }
        }
    }

    /// Count a connection: its result, the generation presented and the key exchange group
    /// negotiated with the target (`-` when no handshake completed).
    fn count(&self, result: &str, generation: &str, kx: &str) {
        metrics::get()
            .proxy_connections
            .get_or_create(&metrics::labels(&[
                ("proxy", &self.cfg.name),
                ("generation", generation),
                ("result", result),
                ("kx", kx),
            ]))
            .inc();
    }

    async fn serve<S: AsyncRead + AsyncWrite + ReadNow + Unpin>(
        self: Arc<Self>,
        local: S,
        cred: Option<(u32, u32)>,
    ) {
        let name = &self.cfg.name;
        let Some(served) = self.slot.get() else {
            tracing::warn!(proxy = %name, identity = %self.cfg.identity, "proxy connection refused: the identity has no certificate yet");
            self.count("no-identity", "-", "-");
            return;
        };
        let generation = served.generation.to_string();
        let mut first = Vec::new();
        let (tls, early) = match self.spare.take(served.generation) {
            Some(t) => (t.tls, t.early),
            None => match self.open_for(&local, &mut first, served.generation).await {
                Ok(t) => (t, Vec::new()),
                Err(result) => {
                    self.count(result, &generation, "-");
                    return;
                }
            },
        };
        if self.cfg.preconnect {
            let (me, g) = (self.clone(), served.generation);
            self.spare
                .refill(g, async move { me.open(g, &[]).await.ok() });
        }
        let kx = tls
            .get_ref()
            .1
            .negotiated_key_exchange_group()
            .map_or("-", |g| crate::kx::name(g.name()));
        self.count("ok", &generation, kx);
        tracing::debug!(proxy = %name, generation = %generation, "proxy connection up");
        let now = crate::clock::SystemClock.now();
        let lapse = Duration::from_secs(served.not_after.saturating_sub(now));
        drop(served);
        self.splice(local, tls, (&early, first.len() as u64), lapse, cred)
            .await;
    }

    /// `open` with what the caller has already sent (into `first`); a caller whose socket
    /// already failed gets no connection to the target.
    async fn open_for(
        &self,
        local: &impl ReadNow,
        first: &mut Vec<u8>,
        generation: u32,
    ) -> Result<Upstream, &'static str> {
        match local.read_now(first) {
            Ok(sent) => self.open(generation, sent).await,
            Err(e) => {
                tracing::debug!(proxy = %self.cfg.name, "caller gone before the handshake: {e}");
                Err("reset")
            }
        }
    }

    /// Connect to the target and complete the handshake presenting `generation`'s pair,
    /// within `connect_timeout` (a target that accepts and then says nothing would otherwise
    /// hold the caller, and a spare being made, for good); on failure, the result label for
    /// the metrics (the reason is logged).
    async fn open(&self, generation: u32, first: &[u8]) -> Result<Upstream, &'static str> {
        let limit = Duration::from_secs(self.cfg.connect_timeout.0);
        match tokio::time::timeout(limit, self.open_now(generation, first)).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(proxy = %self.cfg.name, target = %self.cfg.target, "no TLS connection to the target within {} s (it accepts but does not answer; connect_timeout)", limit.as_secs());
                Err("timeout")
            }
        }
    }

    /// `first`: what the caller sent before the handshake started. rustls holds it until the
    /// handshake completes (the server verified, our Finished queued) and sends it in the
    /// same write as our Finished, so the server reads both in one wake-up instead of two.
    async fn open_now(&self, generation: u32, first: &[u8]) -> Result<Upstream, &'static str> {
        let name = &self.cfg.name;
        let tcp = self.target.connect().await.map_err(|e| {
            tracing::warn!(proxy = %name, target = %self.cfg.target, "cannot reach the target: {e}");
            "connect-failed"
        })?;
        let _ = tcp.set_nodelay(true);
        let connector = self.connector_for(generation).ok_or("tls-failed")?;
        let mut held = 0;
        let mut tls = connector
            .connect_with(self.server_name.clone(), tcp, |c| {
                held = std::io::Write::write(&mut c.writer(), first).unwrap_or(0);
            })
            .await
            .map_err(|e| {
                tracing::warn!(proxy = %name, target = %self.cfg.target, "TLS to the target failed (server certificate not from server_ca, or our identity refused): {e}");
                "tls-failed"
            })?;
        // rustls holds up to 64 KiB before the handshake, far more than `read_now` takes;
        // whatever it did not take goes now.
        if let Some(rest) = first.get(held..).filter(|r| !r.is_empty()) {
            tokio::io::AsyncWriteExt::write_all(&mut tls, rest)
                .await
                .map_err(|_| "reset")?;
        }
        Ok(tls)
    }

    /// Copy both ways; `early` (what the server sent to a spare before the hand-off) goes
    /// to the caller first; `sent` bytes of the caller's already went with the handshake.
    async fn splice<A, B>(
        &self,
        local: A,
        remote: B,
        (early, sent): (&[u8], u64),
        lapse: Duration,
        cred: Option<(u32, u32)>,
    ) where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let start = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let mut a = Tracked {
            inner: local,
            last: last.clone(),
            start,
        };
        let mut b = Tracked {
            inner: remote,
            last: last.clone(),
            start,
        };
        let idle = Duration::from_secs(self.cfg.idle_timeout.0.max(1));
        let watchdog = async {
            loop {
                let quiet = start
                    .elapsed()
                    .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                if quiet >= idle {
                    return "idle timeout";
                }
                tokio::time::sleep(idle - quiet).await;
            }
        };
        let copy = async {
            tokio::io::AsyncWriteExt::write_all(&mut a, early).await?;
            super::splice::copy_both_ways(&mut a, &mut b).await
        };
        let (up, down, why) = tokio::select! {
            r = copy => match r {
                Ok((up, down)) => (up + sent, down + early.len() as u64, "closed"),
                Err(_) => (0, 0, "reset"),
            },
            why = watchdog => (0, 0, why),
            _ = tokio::time::sleep(lapse) => (0, 0, "certificate expired"),
            _ = self.access_lost(cred) => (0, 0, "the caller is no longer allowed (reload)"),
        };
        let m = metrics::get();
        for (dir, n) in [("up", up), ("down", down)] {
            m.proxy_bytes
                .get_or_create(&metrics::labels(&[
                    ("proxy", &self.cfg.name),
                    ("direction", dir),
                ]))
                .inc_by(n);
        }
        tracing::debug!(proxy = %self.cfg.name, up, down, "proxy connection ended: {why}");
    }
}

use crate::clock::Clock as _;

/// A stream that notes the time of its last byte (milliseconds since `start`).
struct Tracked<S> {
    inner: S,
    last: Arc<AtomicU64>,
    start: Instant,
}

impl<S> Tracked<S> {
    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Take, without waiting, what a caller has already sent (most clients write their request
/// right after connecting, before the proxy has even reached the target).
trait ReadNow {
    /// Up to 4 KiB already received, into `buf`: nothing when nothing came yet or at EOF
    /// (which the splice then meets again); an error when the socket failed.
    fn read_now<'b>(&self, buf: &'b mut Vec<u8>) -> std::io::Result<&'b [u8]>;
}

macro_rules! read_now_for {
    ($t:ty) => {
        impl ReadNow for $t {
            fn read_now<'b>(&self, buf: &'b mut Vec<u8>) -> std::io::Result<&'b [u8]> {
                let mut chunk = [0u8; 4096];
                match self.try_read(&mut chunk) {
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                Ok(buf)
            }
        }
    };
}
read_now_for!(TcpStream);
read_now_for!(tokio::net::UnixStream);
