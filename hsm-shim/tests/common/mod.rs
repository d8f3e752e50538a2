//! A throwaway SoftHSM token per test. SoftHSM reads SOFTHSM2_CONF once per process, so
//! these tests need one process per test: `cargo nextest run` (what scripts/test uses).
#![allow(dead_code)]

use hsm_shim::{Pin, Token, TokenSelector};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use zeroize::Zeroizing;

static USED: AtomicBool = AtomicBool::new(false);

pub const USER_PIN: &str = "246810";

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

pub struct TestToken {
    pub dir: tempfile::TempDir,
    pub token: Arc<Token>,
    pub module: PathBuf,
}

pub fn pin(s: &str) -> Pin {
    Pin::new(Zeroizing::new(s.to_owned()))
}

impl TestToken {
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
        hsm_shim::token::init_token(&module, "test", &pin("13579"), &pin(USER_PIN))
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
