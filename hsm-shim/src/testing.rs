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
                "directories.tokendir = {}/tokens\nobjectstore.backend = {}\nlog.level = ERROR\n",
                dir.path().display(),
                // `file` (the default) or `db` (SQLite; Debian's SoftHSM is built without it:
                // C_Initialize then fails with CKR_GENERAL_ERROR).
                std::env::var("EDGE_SIGNER_TEST_SOFTHSM_BACKEND").unwrap_or_else(|_| "file".into())
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

/// Shared by the benchmarks (hsm-shim's and the daemon's): timed slices, rates over threads,
/// and the raw-cryptoki baseline every ratio is measured against.
pub mod bench {
    use crate::KeyType;
    use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
    use cryptoki::mechanism::{Mechanism, MechanismType};
    use cryptoki::object::{Attribute, ObjectClass};
    use cryptoki::session::UserType;
    use sha2::Digest;
    use std::time::{Duration, Instant};

    /// The length of one measured slice (`BENCH_MS`, default 150 ms).
    pub fn secs() -> Duration {
        Duration::from_millis(
            std::env::var("BENCH_MS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(150),
        )
    }

    /// Slices per side.
    pub const ROUNDS: usize = 20;

    /// Measure `a` and `b` in alternating short slices and average each: this VM's speed drifts
    /// by tens of percent over seconds, and alternating exposes both sides to the same drift.
    pub fn paired(a: impl Fn() -> f64, b: impl Fn() -> f64) -> (f64, f64) {
        let (mut sa, mut sb) = (0.0, 0.0);
        for _ in 0..ROUNDS {
            sa += a();
            sb += b();
        }
        (sa / ROUNDS as f64, sb / ROUNDS as f64)
    }

    /// Run `f` on `threads` threads for the bench duration; returns operations per second.
    pub fn rate(threads: usize, f: impl Fn() + Sync) -> f64 {
        let d = secs();
        let start = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut n = 0u64;
                        while start.elapsed() < d {
                            f();
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("bench thread"))
                .sum()
        });
        total as f64 / start.elapsed().as_secs_f64()
    }

    /// Baseline: what a hand-written integration does: one session per thread, logged in,
    /// key handle found once, then C_Sign in a loop (ECDSA over a SHA-256 computed in software).
    pub fn raw_rate(
        module: &std::path::Path,
        label: &str,
        pin: &str,
        id: &[u8],
        kt: KeyType,
        threads: usize,
    ) -> f64 {
        let ctx = crate::token::load_module(module).expect("module");
        let slot = ctx
            .get_slots_with_token()
            .expect("slots")
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .map(|i| i.label().trim_end() == label)
                    .unwrap_or(false)
            })
            .expect("the bench token");
        let msg = [0x5au8; 130];
        let sessions: Vec<_> = (0..threads)
            .map(|_| {
                let s = ctx.open_rw_session(slot).expect("session");
                let _ = s.login(UserType::User, Some(&cryptoki::types::AuthPin::from(pin)));
                let h = s
                    .find_objects(&[
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::Id(id.to_vec()),
                    ])
                    .expect("find")[0];
                std::sync::Mutex::new((s, h))
            })
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        thread_local!(static MINE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) });
        rate(threads, || {
            let idx = MINE.with(|m| {
                m.get().unwrap_or_else(|| {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    m.set(Some(i));
                    i
                })
            });
            let guard = sessions[idx].lock().expect("own session");
            let (s, h) = &*guard;
            if kt.is_ec() {
                let digest = sha2::Sha256::digest(msg);
                s.sign(&Mechanism::Ecdsa, *h, &digest).expect("raw sign");
            } else {
                let p = PkcsPssParams {
                    hash_alg: MechanismType::SHA256,
                    mgf: PkcsMgfType::MGF1_SHA256,
                    s_len: 32u64.into(),
                };
                s.sign(&Mechanism::Sha256RsaPkcsPss(p), *h, &msg)
                    .expect("raw sign");
            }
        })
    }
}
