//! A PKCS#11 module for tests that forwards every call to a real module and fails chosen
//! calls on demand, the way a token does when a USB HSM is pulled or its daemon restarts.
//!
//! - `P11_FAULT_MODULE`: the real module (e.g. SoftHSM).
//! - `P11_FAULT_FILE`: a control file read at each wrapped call. One rule a line:
//!   `<function> <error> <count>`, e.g. `C_SignInit DEVICE_REMOVED 1`; `<error>` is a name
//!   without `CKR_` (SESSION_HANDLE_INVALID, DEVICE_REMOVED, TOKEN_NOT_PRESENT, ...) or a
//!   number; `<count>` is how many calls fail (`*`: every call). Each fault fired is appended
//!   to `<file>.log` as `<function> <error>`.
//!
//! Wrapped: `C_OpenSession`, `C_Login`, `C_FindObjectsInit`, `C_GetAttributeValue`,
//! `C_SignInit`, `C_Sign`.

#![allow(non_snake_case)]

use cryptoki_sys::*;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

struct Real {
    _lib: libloading::Library,
    list: CK_FUNCTION_LIST,
}

static REAL: OnceLock<Option<Real>> = OnceLock::new();
static OURS: OnceLock<CK_FUNCTION_LIST> = OnceLock::new();
static RULES: Mutex<()> = Mutex::new(());

fn real() -> Option<&'static Real> {
    REAL.get_or_init(|| {
        let path = std::env::var_os("P11_FAULT_MODULE")?;
        // SAFETY: loading a PKCS#11 module runs its initialisers; that is what a module is for.
        let lib = unsafe { libloading::Library::new(path) }.ok()?;
        let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
        // SAFETY: the symbol has the PKCS#11 signature; the list it returns lives as long as
        // the library, which `Real` keeps loaded.
        unsafe {
            let get: libloading::Symbol<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
                lib.get(b"C_GetFunctionList\0").ok()?;
            if get(&mut list) != CKR_OK || list.is_null() {
                return None;
            }
            Some(Real {
                list: *list,
                _lib: lib,
            })
        }
    })
    .as_ref()
}

fn error_code(name: &str) -> Option<CK_RV> {
    Some(match name.trim_start_matches("CKR_") {
        "SESSION_HANDLE_INVALID" => CKR_SESSION_HANDLE_INVALID,
        "SESSION_CLOSED" => CKR_SESSION_CLOSED,
        "SESSION_COUNT" => CKR_SESSION_COUNT,
        "DEVICE_REMOVED" => CKR_DEVICE_REMOVED,
        "DEVICE_ERROR" => CKR_DEVICE_ERROR,
        "TOKEN_NOT_PRESENT" => CKR_TOKEN_NOT_PRESENT,
        "USER_NOT_LOGGED_IN" => CKR_USER_NOT_LOGGED_IN,
        "GENERAL_ERROR" => CKR_GENERAL_ERROR,
        other => other.parse().ok()?,
    })
}

/// The error to return for this call of `function`, if a rule says so (and uses it up).
fn fault(function: &str) -> Option<CK_RV> {
    let path = std::env::var_os("P11_FAULT_FILE")?;
    let _one_at_a_time = RULES.lock().unwrap_or_else(|p| p.into_inner());
    let text = std::fs::read_to_string(&path).ok()?;
    let mut fired = None;
    let mut out = String::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if fired.is_none() && f.len() == 3 && f[0] == function {
            if let Some(rv) = error_code(f[1]) {
                match f[2] {
                    "*" => fired = Some((rv, line.to_owned())),
                    n => {
                        if let Ok(n @ 1..) = n.parse::<u64>() {
                            fired = Some((rv, line.to_owned()));
                            if n > 1 {
                                out += &format!("{} {} {}\n", f[0], f[1], n - 1);
                            }
                            continue;
                        }
                    }
                }
            }
        }
        out += line;
        out.push('\n');
    }
    let (rv, rule) = fired?;
    if out != text {
        let _ = std::fs::write(&path, out);
    }
    let mut log_path = path;
    log_path.push(".log");
    if let Ok(mut log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
    {
        let name = rule.split_whitespace().nth(1).unwrap_or("?").to_owned();
        let _ = writeln!(log, "{function} {name}");
    }
    Some(rv)
}

macro_rules! wrap {
    ($name:ident, $field:ident, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $name($($arg: $ty),*) -> CK_RV {
            if let Some(rv) = fault(stringify!($field)) {
                return rv;
            }
            match real().and_then(|r| r.list.$field) {
                // SAFETY: forwarding the caller's arguments unchanged to the real module.
                Some(f) => unsafe { f($($arg),*) },
                None => CKR_GENERAL_ERROR,
            }
        }
    };
}

wrap!(open_session, C_OpenSession, (slot: CK_SLOT_ID, flags: CK_FLAGS, app: CK_VOID_PTR, notify: CK_NOTIFY, session: CK_SESSION_HANDLE_PTR));
wrap!(login, C_Login, (session: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: CK_UTF8CHAR_PTR, len: CK_ULONG));
wrap!(find_objects_init, C_FindObjectsInit, (session: CK_SESSION_HANDLE, template: CK_ATTRIBUTE_PTR, count: CK_ULONG));
wrap!(get_attribute_value, C_GetAttributeValue, (session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, template: CK_ATTRIBUTE_PTR, count: CK_ULONG));
wrap!(sign_init, C_SignInit, (session: CK_SESSION_HANDLE, mechanism: CK_MECHANISM_PTR, key: CK_OBJECT_HANDLE));
wrap!(sign, C_Sign, (session: CK_SESSION_HANDLE, data: CK_BYTE_PTR, data_len: CK_ULONG, signature: CK_BYTE_PTR, signature_len: CK_ULONG_PTR));

/// The module's entry point: the real module's function list with the wrapped calls swapped in.
///
/// # Safety
/// `list` must be a valid pointer to write the list pointer to (the PKCS#11 contract).
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(list: CK_FUNCTION_LIST_PTR_PTR) -> CK_RV {
    let Some(real) = real() else {
        return CKR_GENERAL_ERROR;
    };
    if list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    let ours = OURS.get_or_init(|| {
        let mut l = real.list;
        l.C_GetFunctionList = Some(C_GetFunctionList);
        l.C_OpenSession = Some(open_session);
        l.C_Login = Some(login);
        l.C_FindObjectsInit = Some(find_objects_init);
        l.C_GetAttributeValue = Some(get_attribute_value);
        l.C_SignInit = Some(sign_init);
        l.C_Sign = Some(sign);
        l
    });
    // SAFETY: checked non-null above; the caller only reads the list.
    unsafe { *list = ours as *const CK_FUNCTION_LIST as *mut CK_FUNCTION_LIST };
    CKR_OK
}
