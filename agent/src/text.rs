//! Text from outside shown to a person: a device's serial answers and retained fleet status,
//! a CA's or API's error body in a reason, whatever `--json` prints. A control character
//! from there (an ESC sequence) must never reach a terminal raw.

/// `s` safe to print on a terminal: control characters other than tab (ESC and the C1
/// controls included) are shown escaped, as `\u{1b}`.
pub fn printable(s: &str) -> String {
    escape_controls(s, &['\t'], |c, out| out.extend(c.escape_unicode()))
}

/// Several lines for a person (a command's output) safe to print: as `printable`, line
/// ends kept.
pub fn printable_lines(s: &str) -> String {
    escape_controls(s, &['\t', '\n'], |c, out| out.extend(c.escape_unicode()))
}

/// A server's words (an error body) as one line for a reason: line ends and tabs become
/// spaces, other control characters are shown escaped.
pub fn one_line(s: &str) -> String {
    escape_controls(s, &[], |c, out| match c {
        '\r' | '\n' | '\t' => out.push(' '),
        _ => out.extend(c.escape_unicode()),
    })
}

/// A JSON value as one line safe to print (see `printable_json_text`).
pub fn printable_json(v: &serde_json::Value) -> String {
    printable_json_text(&serde_json::to_string(v).unwrap_or_default())
}

/// JSON text from serde_json (compact or pretty) safe to print: serde_json escapes the C0
/// controls in strings but leaves DEL and the C1 controls as they are; those are written as
/// `\u00XX`, which is the same JSON. Line ends are kept: serde_json writes them only
/// between values, never raw inside a string.
pub fn printable_json_text(s: &str) -> String {
    escape_controls(s, &['\n'], |c, out| {
        out.push_str(&format!("\\u{:04x}", u32::from(c)))
    })
}

/// `s` with every control character not in `keep` written by `escape`.
fn escape_controls(s: &str, keep: &[char], escape: impl Fn(char, &mut String)) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() && !keep.contains(&c) {
            escape(c, &mut out);
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
    fn json_text_stays_the_same_json_and_keeps_its_line_ends() {
        let v = serde_json::json!({"e": "a\u{7f}\u{9b}\u{1b}\n", "n": [1, 2]});
        let pretty = printable_json_text(&format!("{v:#}"));
        assert!(pretty.contains('\n'));
        assert!(
            !pretty.chars().any(|c| c.is_control() && c != '\n'),
            "{pretty}"
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&pretty).unwrap(),
            v
        );
        let line = printable_json(&v);
        assert!(!line.chars().any(char::is_control), "{line}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&line).unwrap(), v);
    }

    #[test]
    fn controls_are_shown_escaped_and_the_rest_kept() {
        assert_eq!(printable("a\tb é"), "a\tb é");
        assert_eq!(printable_lines("a\n\u{1b}b\n"), "a\n\\u{1b}b\n");
        assert_eq!(
            one_line("503\r\n<b>busy</b>\u{1b}[0m"),
            "503  <b>busy</b>\\u{1b}[0m"
        );
        assert_eq!(
            printable("\u{1b}[2J\u{7f}\u{9b}"),
            "\\u{1b}[2J\\u{7f}\\u{9b}"
        );
    }
}
