//! Text from users and programs made safe to show in a one-line status or
//! event: what a terminal would act on rather than print (control
//! characters, escape sequences) and what would reorder the line around it
//! (Unicode's bidirectional overrides and isolates, `U+202E` turning
//! `exe.txt` into `txt.exe` on screen, as in "Trojan Source") are written
//! as escapes, visibly.

use std::borrow::Cow;

/// Whether `c` would not print as itself on a line: a control character
/// (C0, DEL, C1), a bidirectional formatting character, or a line or
/// paragraph separator.
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        || matches!(c, '\u{2028}' | '\u{2029}')
}

/// `s` with every [`is_unsafe`] character written as `\u{XXXX}` (a tab as
/// `\t`); borrowed when there was none.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\t' => out.push_str("\\t"),
            c if is_unsafe(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_bidi_overrides_become_escapes() {
        assert!(matches!(
            printable("plain text, é ü 日本"),
            Cow::Borrowed(_)
        ));
        assert_eq!(printable("a\u{202e}txt.exe"), "a\\u{202e}txt.exe");
        assert_eq!(
            printable("red \x1b[31m!\r\nx\0"),
            "red \\u{1b}[31m!\\u{d}\\u{a}x\\u{0}"
        );
        assert_eq!(printable("a\tb\u{2066}c\u{85}"), "a\\tb\\u{2066}c\\u{85}");
    }
}
