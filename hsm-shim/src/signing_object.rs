//! Which object of the token a key's signatures use.
//!
//! Everywhere: the private key's token object, its handle looked up once and again only when
//! it goes stale. On SoftHSM: a session copy of it. SoftHSM checks a token object against
//! its file on every use (open, POSIX lock, read, close of the object's file), under the
//! mutex that every signing thread of the token shares; a session object lives in the
//! module's memory for as long as the session that made it, and signs without that check
//! (measured: P-256 through the API with 2 clients went from 15-18k to 18-23k sig/s).
//!
//! The copy is as protected as the original: it inherits `CKA_SENSITIVE`, `CKA_EXTRACTABLE`
//! and `CKA_PRIVATE`, which PKCS#11 lets a copy make stricter, never looser. It goes
//! with its session, with [`Token::destroy`](crate::Token::destroy) of its id, and with the
//! last clone of its [`TokenKey`](crate::TokenKey). A token object deleted behind the
//! process's back (another program on the token) stops the copy's signatures within
//! [`RECHECK`]: the token object is asked for once a second while the copy is used.
//! SoftHSM numbers handles from a counter and never reuses one, so the handle of a copy that
//! died with its session is refused (and looked up again), never taken for another object.

use crate::error::Result;
use crate::keys::private_handle;
use crate::token::Token;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a session copy signs before the token object behind it is checked again.
pub const RECHECK: Duration = Duration::from_secs(1);

/// The handle a key signs with, shared by every clone of one `TokenKey`.
pub(crate) struct SigningObject {
    token: Arc<Token>,
    id: Vec<u8>,
    now: Mutex<Option<Current>>,
}

#[derive(Clone, Copy)]
struct Current {
    /// The private key's token object.
    object: ObjectHandle,
    /// Its session copy, when the token gets one.
    copy: Option<ObjectHandle>,
    /// When `object` was last seen to exist.
    checked: Instant,
}

impl Current {
    fn sign_with(&self) -> ObjectHandle {
        self.copy.unwrap_or(self.object)
    }
}

impl SigningObject {
    pub(crate) fn new(token: Arc<Token>, id: Vec<u8>) -> SigningObject {
        SigningObject {
            token,
            id,
            now: Mutex::new(None),
        }
    }

    /// The handle to sign with in session `s`.
    pub(crate) fn get(&self, s: &Session) -> Result<ObjectHandle> {
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        match *now {
            Some(c) if c.copy.is_none() || c.checked.elapsed() < RECHECK => {
                return Ok(c.sign_with())
            }
            Some(mut c) => {
                if s.get_attributes(c.object, &[AttributeType::Class]).is_ok() {
                    c.checked = Instant::now();
                    *now = Some(c);
                    return Ok(c.sign_with());
                }
                // The token object is gone (or unreadable): so is the copy's right to sign.
                forget(s, &mut now);
            }
            None => {}
        }
        self.look_up(s, &mut now)
    }

    /// The handle to sign with, when it is known and needs no check now (a primed session
    /// is only used for it: see `primed`).
    pub(crate) fn known(&self) -> Option<ObjectHandle> {
        match *self.now.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(c) if c.copy.is_none() || c.checked.elapsed() < RECHECK => Some(c.sign_with()),
            _ => None,
        }
    }

    /// `stale` was refused as a key handle: look the key up again, unless another thread
    /// already did (then its handle is the answer, and stays valid for the thread using it).
    pub(crate) fn refresh(&self, s: &Session, stale: ObjectHandle) -> Result<ObjectHandle> {
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        match *now {
            Some(c) if c.sign_with() != stale => Ok(c.sign_with()),
            _ => {
                forget(s, &mut now);
                self.look_up(s, &mut now)
            }
        }
    }

    fn look_up(&self, s: &Session, now: &mut Option<Current>) -> Result<ObjectHandle> {
        let object = private_handle(s, &self.id)?;
        let copy = if self.token.copies_keys() {
            // The copy inherits every other attribute. SoftHSM refuses even a same-value
            // CKA_SENSITIVE or CKA_EXTRACTABLE in a copy's template (CKR_ATTRIBUTE_READ_ONLY).
            s.copy_object(object, &[Attribute::Token(false)])
                .map_err(|e| {
                    tracing::debug!(error = %e, "no session copy of the key; signing with the token object")
                })
                .ok()
        } else {
            None
        };
        let c = Current {
            object,
            copy,
            checked: Instant::now(),
        };
        *now = Some(c);
        Ok(c.sign_with())
    }
}

/// Drop the current handle, destroying its session copy (already gone with its session if
/// that closed: then the error says so and is ignored).
fn forget(s: &Session, now: &mut Option<Current>) {
    if let Some(copy) = now.take().and_then(|c| c.copy) {
        let _ = s.destroy_object(copy);
    }
}

impl Drop for SigningObject {
    fn drop(&mut self) {
        let now = self.now.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(copy) = now.take().and_then(|c| c.copy) {
            let _ = self.token.with_session(|s| Ok(s.destroy_object(copy)?));
        }
    }
}
