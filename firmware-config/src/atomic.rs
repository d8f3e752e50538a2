//! Writes that a power cut cannot tear: temp file, fsync, rename, fsync of the directory.
//! The fleet store and the trust store both write through here.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Write a file so that a power cut leaves either the old or the new content:
/// temp file, fsync, rename, fsync of the directory.
pub fn atomic_write(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    write_synced(&tmp, data)?;
    rename_synced(&tmp, path)
}

/// A temp name unique to this process and call, so two writers never share one.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{seq}.tmp", std::process::id()))
}

pub(crate) fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

pub(crate) fn rename_synced(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::rename(from, to)?;
    let dir = to
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}
