//! The fault-injecting PKCS#11 wrapper (`tests/p11-fault`) around SoftHSM: a token that
//! fails on cue.

use crate::{bin, module, Env};
use std::path::PathBuf;
use std::process::Command;

/// The test-only fault-injecting PKCS#11 module (`tests/p11-fault`), built by `cargo build
/// --workspace` beside the binary.
pub fn fault_module() -> PathBuf {
    let b = bin();
    let so = b.with_file_name("libp11_fault.so");
    assert!(
        so.exists(),
        "{} missing: run `cargo build --workspace` first (scripts/test does)",
        so.display()
    );
    so
}

impl Env {
    /// `edge-signer` whose token module is the fault wrapper around SoftHSM, steered by the
    /// control file `faults` in the temp dir (see `tests/p11-fault`).
    pub fn faulty_cmd(&self) -> Command {
        let mut c = self.cmd();
        c.env("EDGE_SIGNER_MODULE", fault_module())
            .env("P11_FAULT_MODULE", module())
            .env("P11_FAULT_FILE", self.path("faults"));
        c
    }

    /// Set the fault rules (one `<function> <error> <count>` a line).
    pub fn set_faults(&self, rules: &str) {
        std::fs::write(self.path("faults"), rules).expect("faults file");
    }

    /// The faults fired so far, one `<function> <error>` a line.
    pub fn faults_fired(&self) -> String {
        std::fs::read_to_string(self.path("faults.log")).unwrap_or_default()
    }
}
