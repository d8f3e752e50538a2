//! Copying a proxied connection's bytes both ways, with buffers that start small and grow
//! only on connections that move bulk data.
//!
//! Why not `tokio::io::copy_bidirectional_with_sizes`: its buffers have one fixed size,
//! zeroed when the connection starts: large ones cost every short connection (one MQTT
//! exchange, one payment request) the zeroing, small ones cost bulk transfers throughput
//! (docs/perf.md has the figures). Here each direction starts at 16 KiB and doubles, up to
//! 256 KiB, each time a read fills it.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// First buffer size of each direction.
const START: usize = 16 << 10;
/// Largest buffer size of each direction.
const MAX: usize = 256 << 10;

/// One direction: read into `buf`, write it all out, repeat; at end of input, flush and shut
/// the writer down (a TLS writer sends close_notify, a TCP one a FIN).
struct Pipe {
    buf: Vec<u8>,
    /// Where in `buf` the bytes not yet written start / the bytes read end.
    pos: usize,
    cap: usize,
    eof: bool,
    /// The last read filled the buffer: grow it before the next one.
    grow: bool,
    unflushed: bool,
    moved: u64,
    done: bool,
}

impl Pipe {
    fn new() -> Pipe {
        Pipe {
            buf: vec![0; START],
            pos: 0,
            cap: 0,
            eof: false,
            grow: false,
            unflushed: false,
            moved: 0,
            done: false,
        }
    }

    /// How many bytes one read may bring.
    fn room(&self) -> usize {
        self.buf.len()
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.cap && !self.eof {
                if self.grow {
                    let len = (self.room() * 2).min(MAX);
                    self.buf.resize(len, 0);
                    self.grow = false;
                }
                let mut rb = ReadBuf::new(&mut self.buf);
                match r.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        (self.pos, self.cap) = (0, n);
                        self.eof = n == 0;
                        self.grow = n == self.room() && n < MAX;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing more to read now: what was written must go out.
                        if self.unflushed {
                            ready!(w.as_mut().poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.cap {
                let n = ready!(w.as_mut().poll_write(cx, &self.buf[self.pos..self.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.moved += n as u64;
                self.unflushed = true;
            }
            if self.eof {
                ready!(w.as_mut().poll_flush(cx))?;
                ready!(w.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.moved));
            }
        }
    }
}

/// Copy `a` → `b` and `b` → `a` until both reach end of input (each end is passed on as a
/// shutdown of the other side's writer). Returns the bytes moved (a → b, b → a).
pub async fn copy_both_ways<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut up, mut down) = (Pipe::new(), Pipe::new());
    let (mut up_n, mut down_n) = (0, 0);
    poll_fn(|cx| {
        if !up.done {
            if let Poll::Ready(n) = up.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b)) {
                up_n = n?;
            }
        }
        if !down.done {
            if let Poll::Ready(n) = down.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a)) {
                down_n = n?;
            }
        }
        if up.done && down.done {
            Poll::Ready(Ok((up_n, down_n)))
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// A bulk stream each way at once through the copier arrives whole and in order, each
    /// side's end of input arrives as an end of input, and the counts are right.
    #[tokio::test]
    async fn both_ways_whole_and_ends_passed_on() {
        let (mut client, mut near) = tokio::io::duplex(64 << 10);
        let (mut far, server) = tokio::io::duplex(64 << 10);
        let copier = tokio::spawn(async move { copy_both_ways(&mut near, &mut far).await });
        let up = pattern(3 << 20, 1);
        let down = pattern(5 << 20, 7);
        let (up2, down2) = (up.clone(), down.clone());
        let server_task = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(server);
            let writer = tokio::spawn(async move {
                w.write_all(&down2).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            writer.await.unwrap();
            assert!(got == up2, "upstream bytes differ");
        });
        let (mut r, mut w) = tokio::io::split(&mut client);
        let send = async {
            w.write_all(&up).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let recv = r.read_to_end(&mut got);
        let (_, n) = tokio::join!(send, recv);
        n.unwrap();
        assert!(got == down, "downstream bytes differ");
        server_task.await.unwrap();
        let (u, d) = copier.await.unwrap().unwrap();
        assert_eq!((u, d), (up.len() as u64, down.len() as u64));
    }

    /// A short exchange never grows the buffers; a bulk one grows them to the cap.
    #[test]
    fn buffers_grow_only_when_filled() {
        let mut p = Pipe::new();
        let data = pattern(1 << 20, 3);
        let mut src: &[u8] = &data;
        let mut sink = Vec::new();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let r = p.poll_copy(&mut cx, Pin::new(&mut src), Pin::new(&mut sink));
        assert!(matches!(r, Poll::Ready(Ok(n)) if n == 1 << 20));
        assert_eq!(p.room(), MAX);
        assert!(sink == data);

        let mut q = Pipe::new();
        let mut small: &[u8] = b"PINGREQ";
        let mut out = Vec::new();
        let r = q.poll_copy(&mut cx, Pin::new(&mut small), Pin::new(&mut out));
        assert!(matches!(r, Poll::Ready(Ok(7))));
        assert_eq!(q.room(), START);
    }
}
