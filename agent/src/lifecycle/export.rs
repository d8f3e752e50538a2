//! What other programs read of an identity: `state_dir/identities/<name>/` holding `cert.pem`
//! and `key.uri` (or `jwk.json` and `key.uri`). The files of one generation live in their own
//! directory `identities/.<name>.g<N>/`; `identities/<name>` is a symlink swapped in one
//! `rename`, so a reader sees the old pair or the new pair, never a new certificate with the
//! old key.

use crate::error::{Context, Result};
use std::path::Path;

/// Publish `files` (name, bytes) as generation `n` of `name` under `identities`.
pub fn publish(identities: &Path, name: &str, n: u32, files: &[(&str, &[u8])]) -> Result<()> {
    let gen_dir_name = format!(".{name}.g{n}");
    let gen_dir = identities.join(&gen_dir_name);
    std::fs::create_dir_all(&gen_dir)
        .with_context(|| format!("cannot create {}", gen_dir.display()))?;
    for (file, bytes) in files {
        firmware_config::store::atomic_write(&gen_dir.join(file), bytes)
            .with_context(|| format!("cannot write {}", gen_dir.join(file).display()))?;
    }
    let link = identities.join(name);
    // An earlier layout kept a real directory here: move it aside once.
    if link.is_dir() && !link.is_symlink() {
        let aside = identities.join(format!(".{name}.legacy"));
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::rename(&link, &aside)
            .with_context(|| format!("cannot move {} aside", link.display()))?;
    }
    let tmp = identities.join(format!(".{name}.link.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&gen_dir_name, &tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    std::fs::rename(&tmp, &link).with_context(|| format!("cannot swap {}", link.display()))?;
    std::fs::File::open(identities)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", identities.display()))?;
    // Keep this generation and the one before it (still overlapping); older ones go.
    if let Ok(rd) = std::fs::read_dir(identities) {
        let prefix = format!(".{name}.g");
        for e in rd.flatten() {
            let fname = e.file_name().to_string_lossy().into_owned();
            let old = fname
                .strip_prefix(&prefix)
                .and_then(|g| g.parse::<u32>().ok())
                .is_some_and(|g| g + 1 < n);
            if old {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pair_is_swapped_whole_and_old_generations_go() {
        let d = tempfile::tempdir().unwrap();
        let ids = d.path();
        std::fs::create_dir_all(ids.join("gw")).unwrap();
        std::fs::write(ids.join("gw/cert.pem"), "legacy").unwrap();
        for n in 1..=3u32 {
            let c = format!("cert{n}");
            let k = format!("key{n}");
            super::publish(
                ids,
                "gw",
                n,
                &[("cert.pem", c.as_bytes()), ("key.uri", k.as_bytes())],
            )
            .unwrap();
            assert_eq!(std::fs::read_to_string(ids.join("gw/cert.pem")).unwrap(), c);
            assert_eq!(std::fs::read_to_string(ids.join("gw/key.uri")).unwrap(), k);
        }
        assert!(ids.join("gw").is_symlink());
        assert!(!ids.join(".gw.g1").exists() && ids.join(".gw.g2").exists());
    }
}
