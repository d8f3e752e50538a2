//! Loading the device configuration for a command or the daemon, with an error that says
//! where the configuration was looked for.

use firmware_config::store::{Loaded, Sources};

/// The effective configuration of `sources`. When it is invalid, the error lists every
/// problem, then the files read and those not found, and how to point at other files: a
/// first install with the files elsewhere shows up as "not found", not only as missing keys.
/// Every TLS connection the process makes from then on offers its `[tls] kx` groups.
pub fn load(sources: &Sources) -> crate::error::Result<Loaded> {
    let loaded = sources.load().map_err(|e| {
        crate::err!(
            "the configuration is invalid:\n{e}\n{}",
            looked_for(sources)
        )
    })?;
    crate::tlsconf::set_default_kx(&loaded.effective.config.tls.kx);
    Ok(loaded)
}

/// "files read: ...; not found: ... (how to name others)".
fn looked_for(sources: &Sources) -> String {
    let files = sources.files();
    let list = |found: bool| {
        files
            .iter()
            .filter(|(_, f)| *f == found)
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (read, missing) = (list(true), list(false));
    let mut s = format!(
        "files read: {}",
        if read.is_empty() { "none" } else { &read }
    );
    if !missing.is_empty() {
        s += &format!(
            "; not found: {missing} (files kept elsewhere: --defaults and --config, or \
             EDGE_SIGNER_DEFAULTS and EDGE_SIGNER_CONFIG)"
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error names each problem, the file read and the one not found.
    #[test]
    fn invalid_configuration_says_where_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let defaults = dir.path().join("defaults.toml");
        std::fs::write(&defaults, "[token]\nlabel = \"gw\"\n").unwrap();
        let local = dir.path().join("etc/agent.toml");
        let sources = Sources {
            defaults: defaults.clone(),
            local: local.clone(),
        };
        let e = load(&sources).unwrap_err().to_string();
        assert!(e.starts_with("the configuration is invalid:\n"), "{e}");
        assert!(e.contains("token.module: missing"), "{e}");
        assert!(e.contains("not set in any file"), "{e}");
        let last = e.lines().last().unwrap();
        assert!(
            last.starts_with(&format!(
                "files read: {}; not found: {}",
                defaults.display(),
                local.display()
            )),
            "{last}"
        );
        assert!(last.contains("--defaults and --config"), "{last}");
    }
}
