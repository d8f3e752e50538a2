//! pkcs11-tool (OpenSC), a PKCS#11 client none of us wrote, on a test token.

use std::path::Path;
use std::process::Command;

/// `pkcs11-tool` on token `token` of `module`, logged in with user PIN `pin`, with `envs`
/// set and `args`; insists on success, returns stdout.
pub fn pkcs11_tool_on(
    module: &Path,
    (token, pin): (&str, &str),
    envs: &[(&'static str, String)],
    args: &[&str],
) -> String {
    let module = module.display().to_string();
    let mut all = vec![
        "--module",
        &module,
        "--token-label",
        token,
        "--login",
        "--pin",
        pin,
    ];
    all.extend_from_slice(args);
    let out = crate::run_ok(
        Command::new("pkcs11-tool")
            .args(&all)
            .envs(envs.iter().map(|(k, v)| (k, v))),
        &format!("pkcs11-tool {args:?}"),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Replace the key pair under CKA_ID `id` (hex) by a new P-256 pair with the same id and
/// `label`, as someone holding the PIN could; `tool` runs pkcs11-tool logged in on the token.
pub fn replace_key(tool: impl Fn(&[&str]) -> String, id: &str, label: &str) {
    for kind in ["privkey", "pubkey"] {
        tool(&["--delete-object", "--type", kind, "--id", id]);
    }
    tool(&[
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--id",
        id,
        "--label",
        label,
    ]);
}
