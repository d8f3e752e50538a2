//! Names that become file names, key labels and topic levels.

/// Names that become file names and key labels: `[A-Za-z0-9._-]{1,64}`, not starting with
/// `.` or `-` (no `/`, no `..`, no `:` that would blur `edge-signer:<identity>:g<N>`).
pub fn safe_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
