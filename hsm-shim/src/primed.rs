//! Signatures whose `C_SignInit` was made ahead: after a signature the server answers its
//! caller first, then initialises the next signature of the same key and mechanism in a
//! session of its own ([`Prime::run`]); the next request of that kind then costs one
//! `C_Sign`.
//!
//! On SoftHSM `C_SignInit` is most of an ECDSA signature: it reads and decrypts the key's
//! value and builds the key (P-256, session copy of the key: 54 µs of C_SignInit, 41 µs of
//! C_Sign; a TPM loads the key there). A request made while the server's thread would
//! otherwise wait for the next one is that much shorter.
//!
//! A primed session holds an operation that signs with the key as it was at `C_SignInit`,
//! whatever happens to the object later (SoftHSM copies the key into the operation). So a
//! primed session is only used while nothing was destroyed in the token since it was
//! primed ([`Token::destroy`] moves the epoch on before and after it destroys, and every
//! session primed before either move is closed, never used), only for the key handle the
//! key signs with now, and it never serves anything but that one signature. The sessions are
//! the process's own (opened for this, never the pool's: a pool session may hold the
//! session copies of keys, which would go with it when it closes).
//!
//! `C_Sign` without a `C_SignInit` before it is not in cryptoki's API (its `sign` always
//! makes both), so the module's own `C_Sign` is called, found through its
//! `C_GetFunctionList`. A module without one, or any failure on the primed path, leaves the
//! ordinary path: `C_SignInit` + `C_Sign` on a pooled session.

use crate::mechanisms::SignPlan;
use crate::sign::SignAlg;
use crate::token::Token;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki_sys::{CKR_OK, CK_FUNCTION_LIST_PTR, CK_RV, CK_ULONG};
use std::path::Path;
use std::sync::Arc;

/// Primed sessions kept per token: enough for the API threads and a few keys.
const KEPT: usize = 8;

/// How many primed sessions a token whose `ulMaxSessionCount` is `limit` gets: at most a
/// quarter of its sessions (a small HSM allows ten or so, and the pool needs them more), none
/// when that is under one.
pub(crate) fn kept_for(limit: Option<cryptoki::slot::Limit>) -> usize {
    match limit {
        Some(cryptoki::slot::Limit::Max(n)) => usize::try_from(n / 4).unwrap_or(KEPT).min(KEPT),
        _ => KEPT,
    }
}

/// The module's own `C_Sign`.
pub(crate) struct RawSign {
    /// Keeps the module mapped for as long as the pointer is used (cryptoki holds it too).
    _lib: libloading::Library,
    sign: unsafe extern "C" fn(
        cryptoki_sys::CK_SESSION_HANDLE,
        *mut u8,
        CK_ULONG,
        *mut u8,
        *mut CK_ULONG,
    ) -> CK_RV,
}

impl RawSign {
    /// The `C_Sign` of the module at `path` (already loaded by cryptoki: this maps the same
    /// copy), or None if it has none to give.
    pub(crate) fn load(path: &Path) -> Option<RawSign> {
        // SAFETY: the module is a PKCS#11 library that cryptoki already loaded and
        // initialised from this path; loading it again runs no initialiser twice (the
        // dynamic loader hands back the mapped copy).
        let lib = unsafe { libloading::Library::new(path) }.ok()?;
        let list = {
            // SAFETY: C_GetFunctionList has this signature in every PKCS#11 module.
            let get: libloading::Symbol<cryptoki_sys::CK_C_GetFunctionList> =
                unsafe { lib.get(b"C_GetFunctionList\0") }.ok()?;
            let get = (*get)?;
            let mut list: CK_FUNCTION_LIST_PTR = std::ptr::null_mut();
            // SAFETY: `list` is a valid out pointer; the module fills it with a pointer to
            // its static function list.
            if unsafe { get(&mut list) } != CKR_OK || list.is_null() {
                return None;
            }
            list
        };
        // SAFETY: `list` points to the module's function list, valid while it is loaded.
        let sign = unsafe { (*list).C_Sign }?;
        Some(RawSign { _lib: lib, sign })
    }

    /// `C_Sign` of `data` in `session`, whose signing operation is initialised; the
    /// signature, or None (the operation is then in an unknown state: close the session).
    fn sign(&self, session: &Session, data: &[u8]) -> Option<Vec<u8>> {
        // Room for any signature of the key types here (RSA-4096: 512 bytes), on the stack:
        // a 1 KiB heap buffer per signature is a large-bin allocation for glibc, which
        // first consolidates every freed small chunk of the thread's arena.
        let mut out = [0u8; 1024];
        let mut len = out.len() as CK_ULONG;
        // SAFETY: `data` and `out` are valid for their lengths; the module reads `data` and
        // writes at most `len` bytes to `out`, then the length it wrote to `len`.
        let rv = unsafe {
            (self.sign)(
                session.handle(),
                data.as_ptr() as *mut u8,
                CK_ULONG::try_from(data.len()).ok()?,
                out.as_mut_ptr(),
                &mut len,
            )
        };
        if rv != CKR_OK {
            return None;
        }
        out.get(..usize::try_from(len).ok()?).map(<[u8]>::to_vec)
    }
}

/// What a primed session will sign: with which key object, how.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Kind {
    pub(crate) id: Vec<u8>,
    pub(crate) handle: ObjectHandle,
    pub(crate) alg: SignAlg,
    pub(crate) plan: SignPlan,
}

/// A session whose signing operation for `kind` is initialised.
pub(crate) struct Primed {
    session: Session,
    kind: Kind,
    epoch: u64,
}

/// The primed sessions of a token.
pub(crate) struct Stash {
    /// Moves on with every destroy in the token (before and after it).
    epoch: u64,
    kept: Vec<Primed>,
    /// How many are kept at most (`kept_for`).
    cap: usize,
}

impl Stash {
    pub(crate) fn new(cap: usize) -> Stash {
        Stash {
            epoch: 0,
            kept: Vec::new(),
            cap,
        }
    }

    /// Sessions primed before now can no longer be used; returns them, to be closed.
    pub(crate) fn next_epoch(&mut self) -> Vec<Primed> {
        self.epoch += 1;
        std::mem::take(&mut self.kept)
    }

    pub(crate) fn len(&self) -> usize {
        self.kept.len()
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A session primed for exactly `kind` in this epoch; sessions of the same key primed
    /// for an older handle are taken out too (returned in `stale`, to be closed).
    fn take(&mut self, kind: &Kind, stale: &mut Vec<Primed>) -> Option<Primed> {
        let mut found = None;
        let mut i = 0;
        while i < self.kept.len() {
            let p = &self.kept[i];
            if p.epoch != self.epoch || (p.kind.id == kind.id && p.kind.handle != kind.handle) {
                stale.push(self.kept.swap_remove(i));
            } else if found.is_none() && p.kind == *kind {
                found = Some(self.kept.swap_remove(i));
            } else {
                i += 1;
            }
        }
        found
    }

    /// Keep `p` if it was primed in this epoch (else hand it back, to be closed); at the
    /// cap, the oldest one goes.
    fn keep(&mut self, p: Primed) -> Option<Primed> {
        if p.epoch != self.epoch || self.cap == 0 {
            return Some(p);
        }
        let out = (self.kept.len() >= self.cap).then(|| self.kept.remove(0));
        self.kept.push(p);
        out
    }
}

/// The next signature's `C_SignInit`, to run once the caller was answered: [`Prime::run`].
/// Dropped unrun, it closes its session (if it has one) and primes nothing.
pub struct Prime {
    token: Arc<Token>,
    session: Option<Session>,
    kind: Kind,
    epoch: u64,
}

impl std::fmt::Debug for Prime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prime")
            .field("id", &crate::keys::hex(&self.kind.id))
            .field("alg", &self.kind.alg)
            .finish_non_exhaustive()
    }
}

impl Prime {
    pub(crate) fn new(
        token: Arc<Token>,
        session: Option<Session>,
        kind: Kind,
        epoch: u64,
    ) -> Prime {
        Prime {
            token,
            session,
            kind,
            epoch,
        }
    }

    /// Initialise the next signature of the same key and mechanism in this prime's session
    /// (a new one when the signature used the pool), and keep it for that signature.
    /// Failures are quiet: the next signature then takes the ordinary path.
    pub fn run(self) {
        let Prime {
            token,
            session,
            kind,
            epoch,
        } = self;
        let session = match session.map_or_else(|| token.open_session(), Ok) {
            Ok(s) => s,
            Err(_) => return,
        };
        let mech: Mechanism<'static> = crate::sign::mechanism(kind.plan, kind.alg, &[]).0;
        if session.sign_init(&mech, kind.handle).is_err() {
            return;
        }
        let closed = token.with_stash(|s| {
            s.keep(Primed {
                session,
                kind,
                epoch,
            })
        });
        drop(closed);
    }
}

/// Sign `data` with a session primed for `kind`, if there is one: the signature and the
/// prime of the next one.
pub(crate) fn sign_primed(
    token: &Arc<Token>,
    kind: &Kind,
    data: &[u8],
) -> Option<(Vec<u8>, Prime)> {
    let raw = token.raw_sign()?;
    let mut stale = Vec::new();
    let (p, epoch) = token.with_stash(|s| (s.take(kind, &mut stale), s.epoch()));
    drop(stale);
    let p = p?;
    let sig = raw.sign(&p.session, data)?;
    Some((
        sig,
        Prime::new(token.clone(), Some(p.session), kind.clone(), epoch),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::slot::Limit;

    #[test]
    fn a_small_token_keeps_a_quarter_of_its_sessions_primed_at_most() {
        assert_eq!(kept_for(Some(Limit::Max(3))), 0);
        assert_eq!(kept_for(Some(Limit::Max(10))), 2);
        assert_eq!(kept_for(Some(Limit::Max(1000))), KEPT);
        assert_eq!(kept_for(Some(Limit::Infinite)), KEPT);
        assert_eq!(kept_for(Some(Limit::Unavailable)), KEPT);
        assert_eq!(kept_for(None), KEPT);
    }
}
