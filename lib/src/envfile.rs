//! The `env_file` format: `KEY=VALUE` lines, as Docker Compose's
//! `env_file` and systemd's `EnvironmentFile=` read them.
//!
//! - Blank lines and lines whose first non-blank character is `#` are
//!   skipped; a line may start with `export ` (so the file can be sourced by
//!   a shell too).
//! - The key is letters, digits and `_`, not starting with a digit, and is
//!   followed at once by `=`.
//! - An unquoted value is the rest of the line without trailing blanks; a
//!   `#` after a blank starts a comment (so `a#b` keeps its `#`).
//! - `'…'` is taken literally; `"…"` knows the escapes `\"`, `\\`, `\n`,
//!   `\t` and `\$`. After the closing quote only blanks and a comment may
//!   follow. A value never spans lines.
//! - No `$VAR` expansion: values are what they say.
//! - A key given twice takes its last value.
//!
//! Errors carry the line and column (in characters) of the problem, like
//! the manifest's.

use nom::bytes::complete::take_while1;
use nom::character::complete::{char, space0};
use nom::combinator::opt;
use nom::{IResult, Parser};

use crate::manifest::{Diagnostic, RESERVED_ENV, col, control_char, raw_lines, utf8_line};

/// Largest env file read, in bytes.
pub const MAX_SIZE: usize = 1 << 20;

/// Parses an env file: its variables in file order (a repeated key keeps
/// its last value, at its first place), or every problem found.
pub fn parse(src: &[u8]) -> Result<Vec<(String, String)>, Vec<Diagnostic>> {
    let at = |line, col, message: String| Diagnostic { line, col, message };
    if src.len() > MAX_SIZE {
        return Err(vec![at(
            1,
            1,
            format!("env file is {} bytes; the limit is {MAX_SIZE}", src.len()),
        )]);
    }
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut errors = Vec::new();
    for (lineno, raw) in raw_lines(src) {
        let line = match utf8_line(raw) {
            Ok(l) => l,
            Err(c) => {
                errors.push(at(lineno, c, "invalid UTF-8".into()));
                continue;
            }
        };
        if let Some((c, message)) = control_char(line) {
            errors.push(at(lineno, c, message));
            continue;
        }
        match parse_line(line) {
            Ok(None) => {}
            Ok(Some((k, v))) => match vars.iter_mut().find(|(o, _)| *o == k) {
                Some(slot) => slot.1 = v,
                None => vars.push((k, v)),
            },
            Err((rest, message)) => errors.push(at(lineno, col(line, rest), message)),
        }
    }
    if errors.is_empty() {
        Ok(vars)
    } else {
        Err(errors)
    }
}

type LineResult<'a> = Result<Option<(String, String)>, (&'a str, String)>;

fn parse_line(line: &str) -> LineResult<'_> {
    let (i, _) = ws(line);
    if i.is_empty() || i.starts_with('#') {
        return Ok(None);
    }
    let i = match export(i) {
        Ok((rest, Some(_))) => ws(rest).0,
        _ => i,
    };
    let Ok((after, key)) = key(i) else {
        // The line itself is not shown: an env file holds secrets, and
        // the error goes to events, which other users may read.
        return Err((i, "expected KEY=VALUE".to_string()));
    };
    if key.starts_with(|c: char| c.is_ascii_digit()) {
        return Err((i, format!("key '{key}' must not start with a digit")));
    }
    if RESERVED_ENV.contains(&key) {
        return Err((i, format!("{key} is set by deployd for each instance")));
    }
    let Some(value) = after.strip_prefix('=') else {
        return Err((after, format!("expected '=' after the key '{key}'")));
    };
    let value = match value.chars().next() {
        // A missing closing quote is reported at the opening one.
        Some(q @ ('"' | '\'')) => {
            quoted(&value[1..], q).map_err(|(at, m)| (if at.is_empty() { value } else { at }, m))?
        }
        _ => unquoted(value),
    };
    Ok(Some((key.to_string(), value)))
}

fn ws(i: &str) -> (&str, &str) {
    let r: IResult<&str, &str> = space0.parse(i);
    r.unwrap_or((i, ""))
}

fn export(i: &str) -> IResult<&str, Option<&str>> {
    opt((nom::bytes::complete::tag("export"), char(' ')).map(|(e, _)| e)).parse(i)
}

fn key(i: &str) -> IResult<&str, &str> {
    take_while1(|c: char| c.is_ascii_alphanumeric() || c == '_').parse(i)
}

/// The rest of the line, up to a `#` after a blank, without trailing blanks.
fn unquoted(v: &str) -> String {
    let mut end = v.len();
    let mut prev_blank = false;
    for (at, c) in v.char_indices() {
        if c == '#' && prev_blank {
            end = at;
            break;
        }
        prev_blank = c == ' ' || c == '\t';
    }
    v[..end].trim_end_matches([' ', '\t']).to_string()
}

/// A value after its opening quote `q`, to the closing one; then only
/// blanks and a comment.
fn quoted(v: &str, q: char) -> Result<String, (&str, String)> {
    let mut out = String::new();
    let mut chars = v.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            c if c == q => {
                let rest = ws(&v[at + 1..]).0;
                if !rest.is_empty() && !rest.starts_with('#') {
                    return Err((rest, format!("unexpected text after the closing {q}")));
                }
                return Ok(out);
            }
            '\\' if q == '"' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, 't')) => out.push('\t'),
                Some((_, e @ ('"' | '\\' | '$'))) => out.push(e),
                Some((e_at, e)) => {
                    return Err((
                        &v[e_at..],
                        format!("unknown escape '\\{e}' in a \"…\" value"),
                    ));
                }
                None => break,
            },
            c => out.push(c),
        }
    }
    Err(("", format!("missing the closing {q}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(src: &str) -> Vec<(String, String)> {
        parse(src.as_bytes()).unwrap_or_else(|e| panic!("{src:?}: {e:?}"))
    }

    fn errors(src: &str) -> Vec<String> {
        match parse(src.as_bytes()) {
            Ok(v) => panic!("{src:?} parsed: {v:?}"),
            Err(d) => d
                .iter()
                .map(|d| format!("{}:{}: {}", d.line, d.col, d.message))
                .collect(),
        }
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_forms_of_a_line() {
        let src = "\
# database
DATABASE_URL=postgres://app:s3cret@localhost/app
  export  LOG_LEVEL=info
EMPTY=
SPACES=  padded value   # comment
HASH=a#b
SINGLE='literal $HOME \\n # kept'
DOUBLE=\"tab\\there \\\"q\\\" \\\\ \\$ # kept\" # comment
CRLF=yes\r

_x1=1
";
        assert_eq!(
            ok(src),
            kv(&[
                ("DATABASE_URL", "postgres://app:s3cret@localhost/app"),
                ("LOG_LEVEL", "info"),
                ("EMPTY", ""),
                ("SPACES", "  padded value"),
                ("HASH", "a#b"),
                ("SINGLE", "literal $HOME \\n # kept"),
                ("DOUBLE", "tab\there \"q\" \\ $ # kept"),
                ("CRLF", "yes"),
                ("_x1", "1"),
            ])
        );
    }

    #[test]
    fn a_byte_order_mark_first_is_not_part_of_the_key() {
        assert_eq!(ok("\u{feff}A=1\r\nB=2\r\n"), kv(&[("A", "1"), ("B", "2")]));
    }

    #[test]
    fn the_example_in_the_manifest_reference_reads_as_it_says() {
        let doc = include_str!("../../docs/manifest.md");
        let start = doc
            .find("# comments and blank lines are skipped")
            .expect("example");
        let example = &doc[start..start + doc[start..].find("```").expect("end")];
        assert_eq!(
            ok(example),
            kv(&[
                ("DATABASE_URL", "postgres://web:s3cret@localhost/web"),
                ("LOG_LEVEL", "info"),
                ("GREETING", "hello world"),
                ("LITERAL", "$HOME is not expanded"),
                ("ESCAPED", "tab\tnewline\n quote\" backslash\\ dollar$"),
            ])
        );
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value() {
        assert_eq!(ok("A=1\nB=2\nA=3\n"), kv(&[("A", "3"), ("B", "2")]));
    }

    #[test]
    fn every_error_has_its_line_and_column() {
        assert_eq!(
            errors("OK=1\nnot a pair\n1X=2\nPORT=80\nA =1\nQ=\"open\nR='x' y\nS=\"\\q\"\n"),
            [
                "2:4: expected '=' after the key 'not'",
                "3:1: key '1X' must not start with a digit",
                "4:1: PORT is set by deployd for each instance",
                "5:2: expected '=' after the key 'A'",
                "6:3: missing the closing \"",
                "7:7: unexpected text after the closing '",
                "8:5: unknown escape '\\q' in a \"…\" value",
            ]
        );
        assert_eq!(errors("=x\n"), ["1:1: expected KEY=VALUE"]);
        // A NUL can never reach a process's environment.
        assert_eq!(
            errors("A=x\0y\n"),
            ["1:4: control character U+0000 is not allowed"]
        );
        // A line that is not KEY=VALUE is not echoed: it may be a secret.
        assert_eq!(errors("$6$salt$hash\n"), ["1:1: expected KEY=VALUE"]);
        let bad = parse(b"A=\xc3\xa9\nB=1\xff\n").expect_err("not UTF-8");
        assert_eq!(
            (bad[0].line, bad[0].col, bad[0].message.as_str()),
            (2, 4, "invalid UTF-8")
        );
        let big = vec![b'#'; MAX_SIZE + 1];
        assert!(
            parse(&big).expect_err("too big")[0]
                .message
                .contains("the limit is")
        );
    }
}
