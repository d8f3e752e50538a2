//! The daemon's side of the diagnostics port: the device opened non-blocking, raw, at the
//! configured speed (rustix termios, no `unsafe`). Reads and writes wait for the port with
//! `poll` up to the session's limit and never longer: a peer that stops reading costs a
//! write its limit at most, never a thread stuck in `write` (a tty in blocking mode blocks
//! until every byte is taken, whatever `poll` said before).

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

/// An open diagnostics port.
pub struct Port {
    file: std::fs::File,
    wait: Duration,
}

impl Port {
    /// Open `device` raw at `baud`, waiting at most `wait` per read or write.
    pub fn open(device: &std::path::Path, baud: u32, wait: Duration) -> std::io::Result<Port> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags((rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::NONBLOCK).bits() as i32)
            .open(device)?;
        let mut t = rustix::termios::tcgetattr(&file)?;
        t.make_raw();
        t.set_speed(baud)?;
        rustix::termios::tcsetattr(&file, rustix::termios::OptionalActions::Now, &t)?;
        Ok(Port { file, wait })
    }

    /// Wait until the port is ready for `flags`, `limit` at most; false on time out.
    fn ready(&self, flags: PollFlags, limit: Duration) -> std::io::Result<bool> {
        let ts = Timespec {
            tv_sec: limit.as_secs() as _,
            tv_nsec: limit.subsec_nanos() as _,
        };
        let mut fds = [PollFd::new(&self.file, flags)];
        loop {
            match poll(&mut fds, Some(&ts)) {
                Ok(n) => {
                    let got = fds[0].revents();
                    if got.intersects(PollFlags::ERR | PollFlags::NVAL) {
                        return Err(std::io::Error::other("the port failed (POLLERR)"));
                    }
                    return Ok(n > 0);
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the port did not take it in time",
    )
}

impl Read for Port {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.ready(PollFlags::IN, self.wait)? {
            return Err(timed_out());
        }
        self.file.read(buf)
    }
}

impl Write for Port {
    /// What the port takes within the wait (a partial write when it fills up).
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let deadline = Instant::now() + self.wait;
        loop {
            match self.file.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.ready(PollFlags::OUT, left)? {
                return Err(timed_out());
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl super::session::Wire for Port {
    fn set_wait(&mut self, d: Duration) {
        self.wait = d;
    }
}
