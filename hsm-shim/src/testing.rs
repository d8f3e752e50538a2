//! Test support (feature `testing`): a throwaway SoftHSM token for in-process tests.
//! SoftHSM reads SOFTHSM2_CONF once per process, so each such test needs its own process:
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

/// A token in a temp dir, initialised and opened.
pub struct TestToken {
    /// The temp dir (tokens and config); removed on drop.
    pub dir: tempfile::TempDir,
    /// The open, logged-in token.
    pub token: Arc<Token>,
    /// The module path.
    pub module: PathBuf,
}

/// A PIN from a string.
pub fn pin(s: &str) -> Pin {
    Pin::new(Zeroizing::new(s.to_owned()))
}

impl TestToken {
    /// Make and open a token labelled `test`; panics if this process already made one.
    #[allow(clippy::new_without_default)]
    pub fn new() -> TestToken {
        assert!(
            !USED.swap(true, Ordering::SeqCst),
            "one SoftHSM token per process: run these tests with `cargo nextest run` (scripts/test)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("tokens")).expect("token dir");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().display()
            ),
        )
        .expect("conf");
        // Safe: set before the module is loaded, and only once per process (checked above).
        unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
        let module = module();
        crate::token::init_token(&module, "test", &pin("13579"), &pin(USER_PIN))
            .expect("init token");
        let token = Token::open(
            &module,
            &TokenSelector::Label("test".into()),
            Some(pin(USER_PIN)),
        )
        .expect("open token");
        TestToken { dir, token, module }
    }
}
