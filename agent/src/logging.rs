//! Logging: to stderr (the journal under systemd), text or JSON lines. The level comes from
//! `EDGE_SIGNER_LOG` when it is set (a level or `target=level` pairs), else, for the daemon,
//! from `[log] level` (applied at start and at each reload), else `warn` for commands.
//! The format is `[log] format`, read when the daemon starts.

use firmware_config::schema::{LogConfig, LogFormat, LogLevel};
use std::sync::OnceLock;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;

type FilterHandle = reload::Handle<Targets, tracing_subscriber::Registry>;

static FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// The variable that overrides `[log] level`.
pub const ENV: &str = "EDGE_SIGNER_LOG";

/// Where the level in effect comes from, for `config show`.
pub fn level_source(cfg: &LogConfig) -> String {
    match std::env::var(ENV).ok().filter(|v| !v.trim().is_empty()) {
        Some(v) => format!(
            "{ENV}={} (overrides log.level = {})",
            crate::text::one_line(&v),
            level_name(cfg.level)
        ),
        None => format!("log.level = {}", level_name(cfg.level)),
    }
}

fn level_name(l: LogLevel) -> &'static str {
    match l {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    }
}

fn level_filter(l: LogLevel) -> LevelFilter {
    match l {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    }
}

/// Start logging: `format` (text unless the daemon's configuration says json), the level
/// from `EDGE_SIGNER_LOG` or `default`. Returns what was wrong with a variable that could
/// not be used (logged as a warning once logging runs).
pub fn init(format: LogFormat, default: LogLevel) {
    let (filter, bad) = env_filter(std::env::var(ENV).ok().as_deref(), default);
    let (filter, handle) = reload::Layer::new(filter);
    let _ = FILTER.set(handle);
    // Colour only on a terminal: under systemd stderr goes to the journal, where escape
    // codes would be stored as text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    if let Some(why) = bad {
        tracing::warn!("{why}");
    }
}

/// Put `[log] level` in force (the daemon, at start and at each reload), unless
/// `EDGE_SIGNER_LOG` says otherwise.
pub fn apply(cfg: &LogConfig) {
    if std::env::var(ENV).is_ok_and(|v| !v.trim().is_empty()) {
        return;
    }
    if let Some(h) = FILTER.get() {
        let _ = h.reload(quiet(Targets::new().with_default(level_filter(cfg.level))));
    }
}

/// cryptoki logs, at error level, each mechanism of the token's list that it has no name for
/// (SoftHSM has about 30): nothing is wrong, the mechanism is just skipped. The longest
/// matching target wins, so this holds whatever the value says of `cryptoki`.
fn quiet(t: Targets) -> Targets {
    t.with_target("cryptoki::mechanism", LevelFilter::OFF)
}

/// The filter from `EDGE_SIGNER_LOG` (`LEVEL` or `target=LEVEL,...`; `default` for what it
/// does not name), and what was wrong with a value that could not be used (then `default`).
pub fn env_filter(value: Option<&str>, default: LogLevel) -> (Targets, Option<String>) {
    let (named, bad) = match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => (Targets::new(), None),
        Some(v) => match v.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (
                Targets::new(),
                Some(format!(
                    "{ENV}={:?} is not a log filter ({e}); logging at {}. Use a level (error, \
                     warn, info, debug, trace) or target=level pairs separated by commas, e.g. \
                     info,edge_signer::serve=debug",
                    crate::text::one_line(v),
                    level_name(default)
                )),
            ),
        },
    };
    // What the value does not name (all of it, unless it gives a bare level) logs at default.
    let filter = match named.default_level() {
        Some(_) => named,
        None => named.with_default(level_filter(default)),
    };
    (quiet(filter), bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;
    fn log_filter(v: Option<&str>) -> (Targets, Option<String>) {
        env_filter(v, LogLevel::Warn)
    }

    #[test]
    fn log_filter_reads_levels_and_targets_and_says_what_it_cannot_use() {
        let (f, bad) = log_filter(None);
        assert!(bad.is_none());
        assert!(f.would_enable("edge_signer::serve", &Level::WARN));
        assert!(!f.would_enable("edge_signer::serve", &Level::INFO));

        let (f, bad) = log_filter(Some("info,edge_signer::serve=trace,cryptoki=trace"));
        assert!(bad.is_none());
        assert!(f.would_enable("edge_signer::daemon", &Level::INFO));
        assert!(!f.would_enable("edge_signer::daemon", &Level::DEBUG));
        assert!(f.would_enable("edge_signer::serve::proxy", &Level::TRACE));
        assert!(f.would_enable("cryptoki::session", &Level::TRACE));
        // The token's unnamed mechanisms stay quiet whatever the value says.
        assert!(!f.would_enable("cryptoki::mechanism", &Level::ERROR));

        // A target alone is that target at trace, the rest at warn.
        let (f, bad) = log_filter(Some("edge_signer::serve"));
        assert!(bad.is_none());
        assert!(f.would_enable("edge_signer::serve", &Level::TRACE));
        assert!(f.would_enable("edge_signer::daemon", &Level::WARN));
        assert!(!f.would_enable("edge_signer::daemon", &Level::INFO));

        for v in ["edge_signer=verbose", "a=b=c", "=loud"] {
            let (f, bad) = log_filter(Some(v));
            let why = bad.unwrap_or_default();
            assert!(
                why.contains("EDGE_SIGNER_LOG") && why.contains("e.g. info"),
                "{v}: {why}"
            );
            assert!(f.would_enable("edge_signer", &Level::WARN), "{v}");
            assert!(!f.would_enable("edge_signer", &Level::INFO), "{v}");
        }
    }
}
