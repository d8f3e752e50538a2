//! One writer per state directory: whoever changes the register holds an exclusive `flock`
//! on `state_dir/.lock` (the daemon for as long as it runs; a CLI command for its run). The
//! lock file names the holder's pid, so a CLI can tell a person who owns the state, or ask
//! the daemon to act (a request file plus SIGHUP) instead of writing behind its back.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// A held lock; released when dropped (or when the process dies, whatever the way).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Who holds the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its pid, as it wrote it.
    pub pid: u32,
    /// Whether it is a daemon (`edge-signer run`).
    pub daemon: bool,
}

fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join(".lock")
}

impl StateLock {
    /// Take the lock without waiting: `Ok(Err(holder))` when someone else holds it.
    pub fn try_acquire(
        state_dir: &Path,
        daemon: bool,
    ) -> std::io::Result<Result<StateLock, Holder>> {
        std::fs::create_dir_all(state_dir)?;
        // Never through a symlink: a link planted at the lock's name would make the agent
        // truncate and write whatever file it points to.
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(lock_path(state_dir))?;
        if let Err(e) = f.try_lock() {
            if let std::fs::TryLockError::Error(err) = e {
                return Err(err);
            }
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            let mut words = text.split_whitespace();
            let pid = words.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            return Ok(Err(Holder {
                pid,
                daemon: words.next() == Some("daemon"),
            }));
        }
        f.set_len(0)?;
        f.rewind()?;
        writeln!(
            f,
            "{} {}",
            std::process::id(),
            if daemon { "daemon" } else { "cli" }
        )?;
        f.sync_all()?;
        Ok(Ok(StateLock { _file: f }))
    }
}

/// Where CLI requests to the daemon are dropped.
pub fn requests_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("requests")
}

/// Ask the daemon `holder` to rotate `identity` now: a request file, then SIGHUP.
pub fn ask_daemon_to_rotate(
    state_dir: &Path,
    identity: &str,
    holder: &Holder,
) -> std::io::Result<()> {
    let dir = requests_dir(state_dir);
    std::fs::create_dir_all(&dir)?;
    firmware_config::store::atomic_write(&dir.join(format!("{identity}.rotate")), b"rotate\n")?;
    let pid = i32::try_from(holder.pid)
        .ok()
        .filter(|p| *p > 1)
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::other(format!("bad daemon pid {}", holder.pid)))?;
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).map_err(|e| {
        std::io::Error::other(format!(
            "cannot signal the daemon (pid {}): {e}",
            pid.as_raw_nonzero()
        ))
    })
}

/// Take the rotation requests waiting for the daemon (identity names); the files go.
pub fn take_rotation_requests(state_dir: &Path) -> Vec<String> {
    let dir = requests_dir(state_dir);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        if let Some(name) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".rotate"))
        {
            out.push(name.to_owned());
        }
        let _ = std::fs::remove_file(&p);
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_at_the_lock_is_never_followed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        std::os::unix::fs::symlink(&victim, lock_path(d.path())).unwrap();
        assert!(StateLock::try_acquire(d.path(), true).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    }
}
