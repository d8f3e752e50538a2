//! The register as the tests read it: through its type, parsed as the agent parses it.

use crate::Env;
use edge_signer::register::{Generation, IdentityRecord, Register, RegisterFile};

impl Env {
    /// Read the register, through its type (as the agent reads it).
    pub fn register(&self) -> Register {
        let path = self.path("state/register.json");
        let bytes = std::fs::read(&path).expect("register");
        RegisterFile::parse(&path, &bytes).expect("the register loads")
    }

    /// One identity's record in the register.
    pub fn record(&self, identity: &str) -> IdentityRecord {
        self.register()
            .identities
            .get(identity)
            .cloned()
            .unwrap_or_else(|| panic!("no identity '{identity}' in the register"))
    }

    /// Generation `n` (1-based) of `identity`.
    pub fn generation(&self, identity: &str, n: u32) -> Generation {
        self.record(identity)
            .gen(n)
            .cloned()
            .unwrap_or_else(|| panic!("no generation {n} of '{identity}' in the register"))
    }
}
