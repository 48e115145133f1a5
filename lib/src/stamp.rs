//! Wall-clock times as deployd writes them at the start of its log lines
//! (the `events` of a service, the `access` lines of its port, each line of
//! an instance's output): UTC, ISO 8601, to the millisecond,
//! `2026-12-01T21:16:05.123Z`. One format for every log, with the date (a
//! log outlives days and restarts), sortable as text (so `deploy logs
//! --since` compares strings), and told apart from what follows it by
//! [`split`].

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// `2026-12-01T21:16:05.123Z`
pub fn utc(out: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        d.subsec_millis()
    );
}

/// [`utc`] of `t`, as a string.
pub fn at(t: SystemTime) -> String {
    let mut v = Vec::with_capacity(LEN);
    utc(&mut v, t);
    String::from_utf8(v).unwrap_or_default()
}

/// [`utc`] of now, as a string.
pub fn now() -> String {
    at(SystemTime::now())
}

/// Bytes of a stamp.
pub const LEN: usize = 24;

/// A stamp and the space after it, `d` for a digit.
const SHAPE: &[u8; LEN + 1] = b"dddd-dd-ddTdd:dd:dd.dddZ ";

/// Whether `b` is the beginning of a stamp and its space (`2026-12-02`,
/// `2026-12-02T01:30`, ...: any length up to the whole).
pub fn begins(b: &[u8]) -> bool {
    b.len() <= SHAPE.len()
        && SHAPE.iter().zip(b).all(|(&want, &got)| match want {
            b'd' => got.is_ascii_digit(),
            c => got == c,
        })
}

/// A line that begins with a stamp and a space: the stamp and the rest.
/// `None` for any other line (one written before deployd stamped it).
pub fn split(line: &str) -> Option<(&str, &str)> {
    let b = line.as_bytes();
    (b.len() > LEN && begins(&b[..=LEN])).then(|| (&line[..LEN], &line[LEN + 1..]))
}

/// `line` without its stamp and the space after it, if it begins with
/// them.
pub fn strip(line: &str) -> &str {
    split(line).map_or(line, |(_, rest)| rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64, ms: u64) -> String {
        super::at(UNIX_EPOCH + Duration::from_millis(secs * 1000 + ms))
    }

    #[test]
    fn utc_times_are_iso_8601() {
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        // `date -u -d @1764623765`
        assert_eq!(at(1_764_623_765, 123), "2025-12-01T21:16:05.123Z");
        // A leap day, and the end of a century year that is not one.
        assert_eq!(at(951_782_400, 0), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(4_107_542_399, 999), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn a_leading_stamp_is_split_off() {
        let t = at(1_764_623_765, 123);
        let line = format!("{t} listening on 8080");
        assert_eq!(split(&line), Some((t.as_str(), "listening on 8080")));
        assert_eq!(split(&format!("{t} ")), Some((t.as_str(), "")));
        // Not a stamp, or not one followed by a space: no split.
        for other in [
            "listening on 8080",
            "2026-12-01 12:00:00 from the app",
            "2026-12-01T21:16:05Z without milliseconds",
            "2026-12-01T21:16:05.123Z",
            "2026-12-01T21:16:05.123Zx",
            "é",
            "",
        ] {
            assert_eq!(split(other), None, "{other:?}");
            assert_eq!(strip(other), other);
        }
        assert_eq!(strip(&line), "listening on 8080");
        assert_eq!(split(&now()).map(|s| s.1), None);
    }

    #[test]
    fn beginnings_of_a_stamp() {
        for yes in [
            "",
            "2026",
            "2026-12-02",
            "2026-12-02T01:30",
            "2026-12-02T01:30:00.1",
        ] {
            assert!(begins(yes.as_bytes()), "{yes}");
        }
        let whole = format!("{} ", at(0, 0));
        assert!(begins(whole.as_bytes()));
        for no in [
            "2026-x",
            "2026-12-02 01:30",
            "12:00",
            "x",
            &format!("{whole}x"),
        ] {
            assert!(!begins(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn now_is_one_token_of_the_format() {
        let t = now();
        assert_eq!(t.len(), LEN, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && !t.contains(' '),
            "{t}"
        );
    }
}
