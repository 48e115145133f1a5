//! The end of a file as whole lines: what deployd shows in the events of
//! an instance's log, and whether a file ends a line. Read with positioned reads, so it works the same on a
//! file of the namespace (FUSE) and on one of deployd's own.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The lines of the last `bytes` of the file at `path`, oldest first,
/// without the first one if the read began in the middle of it (unless it
/// is all there is); invalid UTF-8 shown as U+FFFD. Nothing if the file
/// cannot be read.
pub fn last_lines(path: &Path, bytes: u64) -> Vec<String> {
    let Ok(f) = File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    // One byte more, before: whether the first line begins there.
    let from = len.saturating_sub(bytes.saturating_add(1));
    let mut buf = vec![0u8; (len - from) as usize];
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], from + got as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    buf.truncate(got);
    let start = match buf.iter().position(|&b| b == b'\n') {
        Some(nl) if from > 0 => nl + 1,
        // A line longer than the read: its end is all there is.
        None if from > 0 => 1,
        _ => 0,
    };
    String::from_utf8_lossy(&buf[start.min(buf.len())..])
        .lines()
        .map(str::to_string)
        .collect()
}

/// Whether the file `f`, of `len` bytes, is empty or ends with a newline:
/// whether what comes after begins a line.
pub fn ends_a_line(f: &File, len: u64) -> bool {
    let mut last = [0u8];
    len == 0 || matches!(f.read_at(&mut last, len - 1), Ok(1) if last[0] == b'\n')
}

#[cfg(test)]
mod tests {
    use super::{File, ends_a_line, last_lines};

    #[test]
    fn whether_a_file_ends_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        for (text, ends) in [("", true), ("a\n", true), ("a\nb", false), ("\n", true)] {
            std::fs::write(&path, text).unwrap();
            let f = File::open(&path).unwrap();
            assert_eq!(ends_a_line(&f, text.len() as u64), ends, "{text:?}");
        }
    }

    #[test]
    fn whole_lines_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        assert!(last_lines(&path, 100).is_empty(), "no file, no lines");
        std::fs::write(&path, "one\ntwo\r\nthree").unwrap();
        assert_eq!(last_lines(&path, 100), ["one", "two", "three"]);
        // Begun mid-line: that line is left out; begun at a line's start:
        // it is in.
        assert_eq!(last_lines(&path, 9), ["three"]);
        assert_eq!(last_lines(&path, 10), ["two", "three"]);
        // A single line longer than the read: its end is all there is.
        std::fs::write(&path, "x".repeat(50)).unwrap();
        assert_eq!(last_lines(&path, 10), ["x".repeat(10)]);
        std::fs::write(&path, b"\xff ok\n").unwrap();
        assert_eq!(last_lines(&path, 100), ["\u{fffd} ok"]);
    }
}
