//! Test support (feature `testing`): a throwaway token for in-process tests, on SoftHSM or on
//! a simulated TPM through tpm2-pkcs11. Both modules read their configuration from the
//! environment once per process (SOFTHSM2_CONF, TPM2_PKCS11_*), so each such test needs its own process:
//! `cargo nextest run` (what scripts/test uses).

use crate::{Pin, Token, TokenSelector};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use zeroize::Zeroizing;

static USED: AtomicBool = AtomicBool::new(false);

/// The user PIN of test tokens.
pub const USER_PIN: &str = "246810";

/// The SoftHSM module (`EDGE_SIGNER_TEST_MODULE` overrides, for qemu runs).
pub fn module() -> PathBuf {
    if let Some(m) = std::env::var_os("EDGE_SIGNER_TEST_MODULE") {
        return m.into();
    }
    for p in [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    ] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("SoftHSM not installed: run scripts/setup (or set EDGE_SIGNER_TEST_MODULE)");
}

/// Which kind of token a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// SoftHSM v2 (a file store in the test's temp dir).
    SoftHsm,
    /// tpm2-pkcs11 on a simulated TPM (swtpm + tpm2-abrmd, see [`tpm`]).
    Tpm,
}

impl TokenKind {
    /// Every kind, in the order tests and benchmarks report them.
    pub const ALL: [TokenKind; 2] = [TokenKind::SoftHsm, TokenKind::Tpm];

    /// Short name (test module names, bench rows).
    pub fn name(self) -> &'static str {
        match self {
            TokenKind::SoftHsm => "softhsm",
            TokenKind::Tpm => "tpm",
        }
    }
}

/// Generate, for each named `fn name(kind: TokenKind)`, one `#[test]` per token kind:
/// `softhsm::name` and `tpm::name`. One test body, two token kinds.
#[macro_export]
macro_rules! token_tests {
    ($($name:ident),+ $(,)?) => {
        mod softhsm {
            $(#[test]
            fn $name() {
                super::$name($crate::testing::TokenKind::SoftHsm)
            })+
        }
        mod tpm {
            $(#[test]
            fn $name() {
                super::$name($crate::testing::TokenKind::Tpm)
            })+
        }
    };
}

/// A token in a temp dir, initialised and opened.
pub struct TestToken {
    /// The open, logged-in token (dropped first).
    pub token: Arc<Token>,
    /// The module path.
    pub module: PathBuf,
    /// Which kind of token this is.
    pub kind: TokenKind,
    /// The simulated TPM behind a `Tpm` token (stopped on drop, before the dir goes).
    pub tpm: Option<tpm::SimTpm>,
    /// The temp dir (tokens and config); removed on drop.
    pub dir: tempfile::TempDir,
}

/// A PIN from a string.
pub fn pin(s: &str) -> Pin {
    Pin::new(Zeroizing::new(s.to_owned()))
}

/// The SO PIN of test tokens.
pub const SO_PIN: &str = "13579";

impl TestToken {
    /// Make and open a SoftHSM token labelled `test`; panics if this process already made one.
    #[allow(clippy::new_without_default)]
    pub fn new() -> TestToken {
        Self::new_on(TokenKind::SoftHsm)
    }

    /// Make and open a token of `kind` labelled `test`; panics if this process already made
    /// one (both modules read their configuration from the environment once per process).
    pub fn new_on(kind: TokenKind) -> TestToken {
        assert!(
            !USED.swap(true, Ordering::SeqCst),
            "one test token per process: run these tests with `cargo nextest run` (scripts/test)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let (module, tpm) = match kind {
            TokenKind::SoftHsm => {
                softhsm_conf(dir.path());
                let module = module();
                crate::token::init_token(&module, "test", &pin(SO_PIN), &pin(USER_PIN))
                    .expect("init token");
                (module, None)
            }
            TokenKind::Tpm => {
                let sim = tpm::SimTpm::start(dir.path(), "test", SO_PIN, USER_PIN);
                for (k, v) in sim.envs() {
                    // Safe: before the module is loaded, once per process (checked above).
                    unsafe { std::env::set_var(k, v) };
                }
                (sim.module().to_owned(), Some(sim))
            }
        };
        let token = Token::open(
            &module,
            &TokenSelector::Label("test".into()),
            Some(pin(USER_PIN)),
        )
        .expect("open token");
        TestToken {
            token,
            module,
            kind,
            tpm,
            dir,
        }
    }
}

/// Write a SoftHSM config for a token store in `dir` and point this process at it.
fn softhsm_conf(dir: &std::path::Path) {
    std::fs::create_dir(dir.join("tokens")).expect("token dir");
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}/tokens\nobjectstore.backend = {}\nlog.level = ERROR\n",
            dir.display(),
            // `file` (the default) or `db` (SQLite; Debian's SoftHSM is built without it:
            // C_Initialize then fails with CKR_GENERAL_ERROR).
            std::env::var("EDGE_SIGNER_TEST_SOFTHSM_BACKEND").unwrap_or_else(|_| "file".into())
        ),
    )
    .expect("conf");
    // Safe: set before the module is loaded, and only once per process (checked by the caller).
    unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
}

pub mod tpm;

/// Shared by the benchmarks (hsm-shim's and the daemon's): timed slices, rates over threads,
/// and the raw-cryptoki baseline every ratio is measured against.
pub mod bench;
