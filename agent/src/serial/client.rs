//! The technician's side of the line protocol (`edge-signer diag`): what a device sends back,
//! read as untrusted input. The laptop must not be steered by the box it diagnoses: lines are
//! capped, and device text is shown with its control characters escaped (an escape sequence
//! from the port would otherwise drive the technician's terminal).

use super::protocol::PROTOCOL;
use crate::text::printable;

/// Longest line taken from a device (a JSON status with timelines is a few KiB).
pub const MAX_ANSWER_LINE: usize = 1 << 20;

/// The serial and nonce of a session banner line
/// (`edge-signer-diag 1 serial=<serial> nonce=<hex>`); None for any other line.
pub fn banner(line: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix(PROTOCOL)?;
    let field = |k: &str| {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(str::to_owned)
            .unwrap_or_default()
    };
    Some((field("serial="), field("nonce=")))
}

/// What one line of an answer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A progress line of a long command (shown, the answer goes on).
    Progress(String),
    /// A line of the answer's body (text mode).
    Body(String),
    /// The end of the answer: whether it succeeded, and what to show (the JSON object in
    /// JSON mode, the error text in text mode).
    End {
        /// `OK` / `"ok": true`.
        ok: bool,
        /// What to show: the JSON answer, or the error; None after a text `OK`.
        show: Option<String>,
    },
    /// Not part of an answer (JSON mode: a line that is no answer object).
    Other,
}

/// Read one line of an answer, in JSON mode (`json on`) or text mode.
pub fn reply(line: &str, json: bool) -> Reply {
    if json {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        if v["progress"] == true {
            let p = v["data"]["progress"].as_str().unwrap_or_default();
            return Reply::Progress(printable(p));
        }
        return match v.get("ok") {
            Some(ok) => Reply::End {
                ok: *ok == true,
                show: Some(crate::text::printable_json(&v)),
            },
            None => Reply::Other,
        };
    }
    if line == "OK" {
        return Reply::End {
            ok: true,
            show: None,
        };
    }
    if let Some(e) = line.strip_prefix("ERR ") {
        return Reply::End {
            ok: false,
            show: Some(printable(e)),
        };
    }
    match line.strip_prefix("progress: ") {
        Some(p) => Reply::Progress(printable(p)),
        None => Reply::Body(printable(line)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn banner_answers_and_escapes() {
        assert_eq!(
            banner("edge-signer-diag 1 serial=SN1 nonce=ab12"),
            Some(("SN1".into(), "ab12".into()))
        );
        assert_eq!(banner("login:"), None);
        assert_eq!(
            reply("OK", false),
            Reply::End {
                ok: true,
                show: None
            }
        );
        assert_eq!(
            reply("ERR 403 no", false),
            Reply::End {
                ok: false,
                show: Some("403 no".into())
            }
        );
        assert_eq!(reply("progress: 2/7", false), Reply::Progress("2/7".into()));
        assert_eq!(
            reply("gw.state: \u{1b}]0;owned\u{7}active", false),
            Reply::Body("gw.state: \\u{1b}]0;owned\\u{7}active".into())
        );
        let end = reply(r#"{"ok":false,"code":404,"error":"x\u001b[2J"}"#, true);
        let Reply::End {
            ok: false,
            show: Some(s),
        } = end
        else {
            panic!("{end:?}")
        };
        assert!(!s.contains('\u{1b}'), "{s}");
        assert_eq!(reply("garbage", true), Reply::Other);
    }

    proptest! {
        #[test]
        fn any_line_is_read_without_panic_and_shown_without_controls(
            line in "(\\PC|[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}]){0,80}",
            json in any::<bool>(),
        ) {
            let _ = banner(&line);
            let shown = match reply(&line, json) {
                Reply::Progress(s) | Reply::Body(s) => s,
                Reply::End { show, .. } => show.unwrap_or_default(),
                Reply::Other => String::new(),
            };
            prop_assert!(!shown.chars().any(|c| c.is_control() && c != '\t'), "{:?}", shown);
        }

        #[test]
        fn any_json_answer_is_shown_without_controls_and_means_the_same(
            text in "\\PC{0,20}[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}]{0,3}",
        ) {
            let sent = serde_json::json!({"ok": false, "error": text});
            let Reply::End { show: Some(s), .. } = reply(&sent.to_string(), true) else {
                return Err(TestCaseError::fail("not an end"));
            };
            prop_assert!(!s.chars().any(char::is_control), "{:?}", s);
            let back: serde_json::Value = serde_json::from_str(&s).unwrap();
            prop_assert_eq!(back, sent);
        }
    }
}
