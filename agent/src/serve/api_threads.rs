//! The signing API's threads: each runs a tokio current-thread runtime, and each API
//! connection lives on one of them from accept to close.
//!
//! Why not one multi-thread runtime with two workers (what the API ran on before): there,
//! a request woken on one worker also woke the other one to look for work, and a task
//! could move between them. `perf stat` of the daemon under `BENCH_ONLY=api`, one client:
//! 2.4-3.1 context switches and 0.8 futex calls per request there, 0.9 and 0 here (a
//! connection that stays on its thread costs one `epoll_wait` per request); PS256 with one
//! client went from 0.85-0.88 of raw cryptoki's rate to 0.92-0.95 (3 alternated runs).
//! Connections are spread over the threads by how many each already holds, so two callers
//! sign on two cores at once.
//!
//! A token call too slow to make inline (a TPM, RSA on a slow token, the first call of a
//! key) goes to the runtime's blocking pool (`api::token_call`), so it never holds up the
//! other connections of its thread (at most `BLOCKING_PER_THREAD` at once per thread). An
//! idle thread sleeps in `epoll_wait` with no timer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Token calls too slow to make inline that one API thread runs at once; more wait in its
/// queue. A token signs one call at a time or close to it (a TPM behind tpm2-abrmd: one), so
/// more threads would only wait on it; tokio's default (512) would let a burst of callers
/// start hundreds of threads on a small gateway. Engine requests (up to a minute) hold no
/// thread (`serve::ask`).
const BLOCKING_PER_THREAD: usize = 4;

/// The API's threads.
pub(super) struct ApiThreads {
    /// Runs the accept loop; there is always one.
    first: ApiThread,
    rest: Vec<ApiThread>,
}

struct ApiThread {
    handle: tokio::runtime::Handle,
    /// Connections this thread serves now.
    open: Arc<AtomicUsize>,
    /// Dropped to stop the thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Counts a connection on its thread until it ends.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ApiThreads {
    /// Start `n` threads (at least one) named `edge-signer-api-<i>`.
    pub(super) fn start(n: usize) -> anyhow::Result<ApiThreads> {
        let first = ApiThread::start("edge-signer-api-0")?;
        let rest = (1..n)
            .map(|i| ApiThread::start(&format!("edge-signer-api-{i}")))
            .collect::<anyhow::Result<_>>()?;
        Ok(ApiThreads { first, rest })
    }

    /// Every thread, the first one first.
    #[cfg(test)]
    fn all(&self) -> impl Iterator<Item = &ApiThread> {
        std::iter::once(&self.first).chain(&self.rest)
    }

    /// Where the accept loop runs (the first thread).
    pub(super) fn handle(&self) -> &tokio::runtime::Handle {
        &self.first.handle
    }

    /// Run `serve(stream)` on the thread holding the fewest connections; the stream is
    /// registered with that thread's runtime there.
    pub(super) fn dispatch<F, Fut>(&self, stream: std::os::unix::net::UnixStream, serve: F)
    where
        F: FnOnce(tokio::net::UnixStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let t = self.rest.iter().fold(&self.first, |best, t| {
            if t.open.load(Ordering::Relaxed) < best.open.load(Ordering::Relaxed) {
                t
            } else {
                best
            }
        });
        t.open.fetch_add(1, Ordering::Relaxed);
        let open = Open(t.open.clone());
        t.handle.spawn(async move {
            let _open = open;
            match tokio::net::UnixStream::from_std(stream) {
                Ok(s) => serve(s).await,
                Err(e) => tracing::warn!("API connection dropped: cannot register it: {e}"),
            }
        });
    }
}

impl ApiThread {
    fn start(name: &str) -> anyhow::Result<ApiThread> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(BLOCKING_PER_THREAD)
            .thread_name(name)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot start the tokio runtime {name}: {e}"))?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let _ = rt.block_on(stopped);
                // A request waiting on the engine (up to a minute) does not hold up the stop.
                rt.shutdown_timeout(std::time::Duration::from_secs(1));
            })
            .map_err(|e| anyhow::anyhow!("cannot start the thread {name}: {e}"))?;
        Ok(ApiThread {
            handle,
            open: Arc::new(AtomicUsize::new(0)),
            _stop: stop,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn open_counts(t: &ApiThreads) -> Vec<usize> {
        t.all().map(|t| t.open.load(Ordering::Relaxed)).collect()
    }

    #[test]
    fn connections_spread_over_the_threads_and_are_counted_until_they_end() {
        let threads = ApiThreads::start(2).unwrap();
        let (names_tx, names_rx) = std::sync::mpsc::channel();
        let mut ours = Vec::new();
        for _ in 0..4 {
            let (mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            theirs.set_nonblocking(true).unwrap();
            let names = names_tx.clone();
            threads.dispatch(theirs, move |mut s| async move {
                let name = std::thread::current().name().map(str::to_owned);
                names.send(name).unwrap();
                // Serve until the other end closes.
                let mut buf = [0u8; 1];
                let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            });
            ours.push(mine);
        }
        let mut names: Vec<_> = (0..4)
            .map(|_| {
                names_rx
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap()
                    .unwrap()
            })
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "edge-signer-api-0",
                "edge-signer-api-0",
                "edge-signer-api-1",
                "edge-signer-api-1"
            ]
        );
        assert_eq!(open_counts(&threads), [2, 2]);
        drop(ours);
        let t0 = std::time::Instant::now();
        while open_counts(&threads) != [0, 0] {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{:?}",
                open_counts(&threads)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// An accept loop holding the threads keeps them; once it is aborted (`Servers`' drop)
    /// and the last holder lets go, the threads stop and their runtimes refuse new work.
    #[test]
    fn the_threads_stop_when_the_last_holder_is_gone() {
        let threads = Arc::new(ApiThreads::start(2).unwrap());
        let handles: Vec<_> = threads.all().map(|t| t.handle.clone()).collect();
        let held = threads.clone();
        let accept_loop = handles[0].spawn(async move {
            let _held = held;
            std::future::pending::<()>().await
        });
        drop(threads);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let probe = |h: &tokio::runtime::Handle| rt.block_on(h.spawn(async {})).is_ok();
        assert!(handles.iter().all(probe), "held by the accept loop");
        accept_loop.abort();
        let t0 = std::time::Instant::now();
        while handles.iter().any(probe) {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the threads still run"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
