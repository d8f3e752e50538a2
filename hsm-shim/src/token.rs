//! Token access: module loading (once per path), slot lookup, login, and a session pool.

use crate::error::{Error, Result};
use crate::mechanisms::Mechanisms;
use crate::pin::Pin;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

/// How a token is chosen among the module's slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// By `CKA_LABEL` of the token (trailing blanks ignored).
    Label(String),
    /// By token serial number.
    Serial(String),
}

impl std::fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSelector::Label(l) => f.write_str(l),
            TokenSelector::Serial(s) => write!(f, "serial {s}"),
        }
    }
}

/// What `token list` shows of one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSummary {
    /// Slot id (not stable across restarts on every module).
    pub slot: u64,
    /// Token label.
    pub label: String,
    /// Token serial.
    pub serial: String,
    /// Manufacturer id.
    pub manufacturer: String,
    /// Model.
    pub model: String,
    /// Whether the token was initialised.
    pub initialized: bool,
    /// Whether the user PIN was set.
    pub user_pin_initialized: bool,
}

static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

/// Load and initialise a PKCS#11 module, once per path per process.
pub fn load_module(path: &Path) -> Result<Pkcs11> {
    let map = MODULES.get_or_init(Default::default);
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ctx) = map.get(path) {
        return Ok(ctx.clone());
    }
    let ctx = uncached_module(path)?;
    map.insert(path.to_owned(), ctx.clone());
    Ok(ctx)
}

fn summary(ctx: &Pkcs11, slot: Slot) -> Result<TokenSummary> {
    let info = ctx.get_token_info(slot)?;
    Ok(TokenSummary {
        slot: slot.id(),
        label: info.label().trim_end().to_owned(),
        serial: info.serial_number().trim_end().to_owned(),
        manufacturer: info.manufacturer_id().trim_end().to_owned(),
        model: info.model().trim_end().to_owned(),
        initialized: info.token_initialized(),
        user_pin_initialized: info.user_pin_initialized(),
    })
}

/// Every slot with a token present.
pub fn list_tokens(module: &Path) -> Result<Vec<TokenSummary>> {
    let ctx = load_module(module)?;
    ctx.get_slots_with_token()?
        .into_iter()
        .map(|s| summary(&ctx, s))
        .collect()
}

/// Initialise a token in the first uninitialised slot, set its user PIN, return it.
pub fn init_token(
    module: &Path,
    label: &str,
    so_pin: &Pin,
    user_pin: &Pin,
) -> Result<TokenSummary> {
    // SoftHSM numbers a new token's slot when the module is initialised: to say the slot a
    // later process (`token list`, the daemon) sees, this process initialises it afresh
    // after the token is made, unless it already holds the module for something else.
    let cached = MODULES.get().is_some_and(|m| {
        m.lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(module)
    });
    let ctx = if cached {
        load_module(module)?
    } else {
        uncached_module(module)?
    };
    let mut free = None;
    for slot in ctx.get_slots_with_token()? {
        let s = summary(&ctx, slot)?;
        if s.initialized && s.label == label {
            return Err(Error::AlreadyExists(format!(
                "a token labelled '{label}' already exists (slot {}); pick another label",
                s.slot
            )));
        }
        if !s.initialized && free.is_none() {
            free = Some(slot);
        }
    }
    let slot = free.ok_or_else(|| Error::NoFreeSlot(label.to_owned()))?;
    ctx.init_token(slot, &so_pin.auth(), label)?;
    // Some modules (SoftHSM) move the new token to a new slot id: look it up again.
    let slot = find_slot(&ctx, &TokenSelector::Label(label.to_owned()))?;
    let session = ctx.open_rw_session(slot)?;
    session.login(UserType::So, Some(&so_pin.auth()))?;
    session.init_pin(&user_pin.auth())?;
    session.logout()?;
    drop(session);
    if cached {
        return summary(&ctx, slot);
    }
    ctx.finalize()?;
    let ctx = load_module(module)?;
    let slot = find_slot(&ctx, &TokenSelector::Label(label.to_owned()))?;
    summary(&ctx, slot)
}

/// The module initialised for one use, not kept in the process-wide map.
fn uncached_module(path: &Path) -> Result<Pkcs11> {
    if !path.exists() {
        return Err(Error::ModuleMissing(path.to_owned()));
    }
    let ctx = Pkcs11::new(path).map_err(|e| Error::ModuleLoad {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(ctx)
}

fn find_slot(ctx: &Pkcs11, sel: &TokenSelector) -> Result<Slot> {
    let mut present = Vec::new();
    for slot in ctx.get_slots_with_token()? {
        let s = summary(ctx, slot)?;
        let hit = match sel {
            TokenSelector::Label(l) => s.initialized && s.label == l.trim_end(),
            TokenSelector::Serial(n) => s.initialized && s.serial == n.trim_end(),
        };
        if hit {
            return Ok(slot);
        }
        if s.initialized {
            present.push(format!("'{}' (serial {})", s.label, s.serial));
        }
    }
    Err(Error::TokenNotFound {
        wanted: sel.to_string(),
        present: if present.is_empty() {
            "none".into()
        } else {
            present.join(", ")
        },
    })
}

/// Errors after which a session is thrown away, a fresh one opened (and logged in), and the
/// call retried once.
fn needs_reopen(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::UserNotLoggedIn,
            _
        )
    )
}

/// An open token: one slot, logged in once, with a pool of sessions so that several
/// threads sign at once (a cryptoki `Session` is `Send` but not `Sync`).
pub struct Token {
    ctx: Pkcs11,
    selector: TokenSelector,
    slot: RwLock<Slot>,
    label: String,
    serial: String,
    pin: Option<Pin>,
    pool: Mutex<Vec<Session>>,
    max_idle: usize,
    mechanisms: OnceLock<Mechanisms>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("label", &self.label)
            .field("serial", &self.serial)
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// Open the token chosen by `selector` in `module`, logging in with `pin` if given.
    pub fn open(module: &Path, selector: &TokenSelector, pin: Option<Pin>) -> Result<Arc<Token>> {
        let ctx = load_module(module)?;
        let slot = find_slot(&ctx, selector)?;
        let s = summary(&ctx, slot)?;
        let token = Token {
            ctx,
            selector: selector.clone(),
            slot: RwLock::new(slot),
            label: s.label,
            serial: s.serial,
            pin,
            pool: Mutex::new(Vec::new()),
            max_idle: 8,
            mechanisms: OnceLock::new(),
        };
        // Open (and log in) one session now, so a wrong PIN is reported here.
        let first = token.open_session()?;
        token.give_back(first);
        Ok(Arc::new(token))
    }

    /// Token label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Token serial.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    fn slot(&self) -> Slot {
        *self.slot.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn open_session(&self) -> Result<Session> {
        let session = self.ctx.open_rw_session(self.slot())?;
        if let Some(pin) = &self.pin {
            match session.login(UserType::User, Some(&pin.auth())) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(session)
    }

    fn take(&self) -> Result<Session> {
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match pooled {
            Some(s) => Ok(s),
            None => self.open_session(),
        }
    }

    fn give_back(&self, s: Session) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < self.max_idle {
            pool.push(s);
        }
    }

    /// Run `f` on a pooled session. A session that died (handle invalid, token removed,
    /// logged out) is replaced and `f` retried once.
    pub fn with_session<T>(&self, f: impl Fn(&Session) -> Result<T>) -> Result<T> {
        let session = self.take()?;
        match f(&session) {
            Ok(v) => {
                self.give_back(session);
                Ok(v)
            }
            Err(Error::Pkcs11 { cause, .. }) if needs_reopen(&cause) => {
                drop(session);
                self.drop_pool();
                if matches!(
                    cause,
                    CkError::Pkcs11(RvError::DeviceRemoved | RvError::TokenNotPresent, _)
                ) {
                    let slot = find_slot(&self.ctx, &self.selector)?;
                    *self.slot.write().unwrap_or_else(|p| p.into_inner()) = slot;
                }
                tracing::warn!(token = %self.label, error = %cause, "token session lost; reopening");
                let fresh = self.open_session()?;
                let out = f(&fresh);
                if out.is_ok() {
                    self.give_back(fresh);
                }
                out
            }
            Err(e) => {
                self.give_back(session);
                Err(e)
            }
        }
    }

    /// What the token can do (asked once, then cached: mechanisms do not change while a
    /// token is present).
    pub fn mechanisms(&self) -> Result<&Mechanisms> {
        if let Some(m) = self.mechanisms.get() {
            return Ok(m);
        }
        let slot = self.slot();
        let mut list = Vec::new();
        for m in self.ctx.get_mechanism_list(slot)? {
            // A mechanism whose info the token will not give is one we cannot plan with.
            if let Ok(info) = self.ctx.get_mechanism_info(slot, m) {
                list.push((m, info));
            }
        }
        Ok(self.mechanisms.get_or_init(|| Mechanisms::new(list)))
    }

    /// Whether the token answers now (one C_GetSessionInfo on a pooled session; a dead
    /// session is reopened first). The daemon's watchdog pings only when it does.
    pub fn ping(&self) -> Result<()> {
        self.with_session(|s| {
            s.get_session_info()?;
            Ok(())
        })
    }

    /// Forget all pooled sessions (they are closed on drop).
    fn drop_pool(&self) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Log the user out of the token (all sessions). For tests of the reopen path.
    #[doc(hidden)]
    pub fn logout_for_test(&self) -> Result<()> {
        self.with_session(|s| Ok(s.logout()?))
    }
}
