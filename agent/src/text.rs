//! Text from outside (a device's serial answers, its retained fleet status) shown to a
//! person on a terminal.

/// `s` safe to print on a terminal: control characters other than tab (ESC and the C1
/// controls included) are shown escaped, as `\u{1b}`.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_shown_escaped_and_the_rest_kept() {
        assert_eq!(printable("a\tb é"), "a\tb é");
        assert_eq!(
            printable("\u{1b}[2J\u{7f}\u{9b}"),
            "\\u{1b}[2J\\u{7f}\\u{9b}"
        );
    }
}
