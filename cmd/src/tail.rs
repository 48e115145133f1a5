//! `deploy events` and `deploy logs`: print a file of the namespace (or the
//! logs of a service's instances), and with `-f` keep printing what is
//! appended, like `tail -f`; with `--since`, only the lines stamped since.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use deployd_lib::stamp;

use crate::ns;
use crate::{Exit, Fail};

const POLL: Duration = Duration::from_millis(200);
/// How long a follower of `events` waits for a line before it looks
/// whether the service is still there.
const IDLE: Duration = Duration::from_secs(1);

/// Which lines of a log are printed, and how.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Only the lines stamped at or after this (a stamp, or the beginning
    /// of one: `2026-12-02`, `2026-12-02T01:30`), and the unstamped lines
    /// that follow them.
    pub since: Option<String>,
    /// Print each line without the stamp it begins with (instance output,
    /// whose stamps deployd added: `deploy logs` without `--timestamps`).
    pub unstamped: bool,
    /// Begin with the last this many lines of each log (then `since`
    /// applies), rather than its first.
    pub tail: Option<u64>,
    /// Each line as a JSON object (`--json`): `time` (the stamp, or null),
    /// `instance` (logs of instances), `line`.
    pub json: bool,
}

/// `--since`: a time ago (`30s`, `10m`, `2h`, `1d`; a bare number is
/// seconds) or a UTC time, written as deployd stamps lines
/// (`2026-12-02T01:30:00Z`, or any beginning of it; a space may stand for
/// the `T`). Gives the stamp lines are compared with.
pub fn parse_since(arg: &str) -> Result<String, String> {
    // A time ago, in the grammar of every duration (500ms, 30s, 10m, 2h,
    // 1d; a bare number is seconds).
    if arg.starts_with(|c: char| c.is_ascii_digit()) {
        if let Ok(ago) = deployd_lib::manifest::parse_span("--since", arg) {
            let at = SystemTime::now().checked_sub(ago);
            return Ok(stamp::at(at.unwrap_or(SystemTime::UNIX_EPOCH)));
        }
    }
    // `Z` ends a stamp: one given with it, without its milliseconds,
    // compares as the whole second.
    let t = arg.replacen(' ', "T", 1);
    let t = t.strip_suffix('Z').unwrap_or(&t);
    // Down to a day, an hour, a minute, a second or a part of one.
    let fits = [10, 13, 16, 19, 21, 22, 23].contains(&t.len()) && stamp::begins(t.as_bytes());
    match fits {
        true => Ok(t.to_string()),
        false => Err(format!(
            "'{arg}' is neither a time ago (500ms, 30s, 10m, 2h, 1d) nor a UTC time (2026-12-02T01:30)"
        )),
    }
}

/// One log being printed: how far, the line not yet whole, and whether the
/// last stamped line was shown (an unstamped one goes with it).
#[derive(Debug, Default)]
struct Stream {
    at: Cursor,
    partial: Vec<u8>,
    shown: Option<bool>,
    /// Rounds in a row its process was under no number.
    missed: u8,
}

/// Whether the service whose directory is `dir` was removed: deployd is
/// there (its root `ctl` appears once every service is back, after a
/// restart or a reexec) and the service is not. While deployd is away for
/// a moment, neither: a follower waits for it.
fn removed(dir: &Path) -> bool {
    let ctl = dir
        .parent()
        .and_then(Path::parent)
        .map(|root| root.join("ctl"));
    ctl.is_some_and(|c| c.exists())
        && std::fs::metadata(dir).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

/// What a follower says as it ends because its service is gone.
fn say_removed(dir: &Path) {
    let service = dir.file_name().map_or("".into(), |s| s.to_string_lossy());
    tell!("deploy: {service}: removed");
}

/// Bytes a [`Cursor`] keeps of what it read last: many lines, so that
/// their stamps make them unique (the end of one line alone is not: every
/// refused command's line ends with the list of commands).
const MARK: usize = 4096;

/// A reader's place in a file that may be begun again (a log moved to `.1`)
/// or lose its start (the event log drops its older half past 1 MiB): how
/// far it has read, and the bytes just before, by which it finds its place
/// again, as `tail -F` does not: it would print the kept half again.
#[derive(Debug, Default, Clone)]
pub struct Cursor {
    offset: u64,
    mark: Vec<u8>,
}

impl Cursor {
    /// At `offset` of a file (its length, to read only what comes).
    pub fn at(offset: u64) -> Cursor {
        Cursor {
            offset,
            mark: Vec::new(),
        }
    }

    /// What the file at `path` holds after the cursor (up to its last
    /// newline, with `lines`), the cursor then after it; `None` if the
    /// file is gone.
    pub fn read(&mut self, path: &Path, lines: bool) -> Option<Vec<u8>> {
        let f = std::fs::File::open(path).ok()?;
        let len = f.metadata().map_or(0, |m| m.len());
        self.find_place(&f, len);
        let mut data = read_rest(&f, self.offset);
        if lines {
            let end = data.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            data.truncate(end);
        }
        let mut mark = std::mem::take(&mut self.mark);
        mark.extend_from_slice(&data);
        let keep = mark.len().saturating_sub(MARK);
        mark.drain(..keep);
        self.mark = mark;
        self.offset += data.len() as u64;
        Some(data)
    }

    /// Where the cursor is in its file: what a wait on it starts from.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Checks that the bytes before the cursor are still those it read
    /// last; if not, puts it after them where they now are, or at the start
    /// if they are gone (a file begun again).
    fn find_place(&mut self, f: &std::fs::File, len: u64) {
        let m = self.mark.len() as u64;
        if self.offset > len && m == 0 {
            self.offset = 0;
        }
        if m == 0 {
            // Placed, not read yet: what is before it is what it follows.
            let from = self.offset.saturating_sub(MARK as u64);
            let mut before = vec![0u8; (self.offset - from) as usize];
            if f.read_exact_at(&mut before, from).is_ok() {
                self.mark = before;
            }
            return;
        }
        if self.offset <= len && self.offset >= m {
            let mut before = vec![0u8; m as usize];
            if f.read_exact_at(&mut before, self.offset - m).is_ok() && before == self.mark {
                return;
            }
        }
        let whole = read_rest(f, 0);
        let found = memchr::memmem::find(&whole, &self.mark);
        match found {
            Some(p) => self.offset = (p + self.mark.len()) as u64,
            None => {
                // Begun again: what it reads from now on is its mark.
                self.offset = 0;
                self.mark.clear();
            }
        }
    }
}

/// A follower's wait between its reads: on the files themselves
/// ([`wait_any`]), or, once a wait said readable and the read after it
/// brought nothing (a deployd whose files cannot be waited on), for a
/// while on its own clock.
#[derive(Default)]
pub struct Waiter {
    ready: bool,
}

impl Waiter {
    /// Waits up to `timeout` for more in `files` (each with where its
    /// reader is); `new`: whether the read before brought anything.
    pub fn wait(&mut self, files: &[(std::path::PathBuf, u64)], timeout: Duration, new: bool) {
        if self.ready && !new {
            std::thread::sleep(timeout.min(POLL));
        }
        self.ready = wait_any(files, timeout);
    }
}

/// Waits, up to `timeout`, until one of `files` holds more than its
/// reader has read (each file with where its reader is): deployd lets
/// `poll` wait on its files and wakes it as a line is appended, so a
/// follower learns of a line the moment it is written and costs nothing
/// meanwhile. Whether `poll` said readable (a deployd that cannot wait so
/// says it at once, every time: [`Waiter`] then reads again on its own
/// clock).
fn wait_any(files: &[(std::path::PathBuf, u64)], timeout: Duration) -> bool {
    let open: Vec<std::fs::File> = files
        .iter()
        .filter_map(|(path, _)| std::fs::File::open(path).ok())
        .collect();
    if open.len() < files.len() || open.is_empty() {
        // Gone, or deployd away for a moment: look again soon.
        std::thread::sleep(POLL);
        return false;
    }
    // A read where each reader is tells deployd how far it is.
    let mut one = [0u8; 1];
    for (f, (_, offset)) in open.iter().zip(files) {
        if f.read_at(&mut one, *offset).is_ok_and(|n| n > 0) {
            return true;
        }
    }
    let mut fds: Vec<libc::pollfd> = open
        .iter()
        .map(|f| libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(f),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: pollfds we own, for descriptors open for the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    r > 0
}

/// What `f` holds from `from` to its end (as far as it reads).
fn read_rest(f: &std::fs::File, from: u64) -> Vec<u8> {
    let mut data = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = from;
    loop {
        let n = f.read_at(&mut buf, at).unwrap_or(0);
        if n == 0 {
            return data;
        }
        at += n as u64;
        data.extend_from_slice(&buf[..n]);
    }
}

/// Prints the file `file` of the service directory `dir`; with `follow`,
/// keeps polling for more until killed, across a reexec or a restart of
/// deployd, or until the service is removed. A file begun again is read
/// from its start; one that lost its start, from where the reader was
/// ([`Cursor`]).
pub fn run(dir: &Path, file: &str, follow: bool, filter: &Filter) -> Result<Exit, Fail> {
    let path = dir.join(file);
    let mut stream = Stream {
        at: Cursor::at(start(&path, filter.tail)),
        ..Stream::default()
    };
    let mut out = std::io::stdout().lock();
    let mut waiter = Waiter::default();
    loop {
        let mut new = false;
        if let Some(chunk) = stream.at.read(&path, false) {
            new = !chunk.is_empty();
            stream.partial.extend_from_slice(&chunk);
            emit(&mut out, None, None, &mut stream, !follow, filter)?;
        }
        out.flush()?;
        if !follow {
            return Ok(Exit::Ok);
        }
        if removed(dir) {
            say_removed(dir);
            return Ok(Exit::Ok);
        }
        waiter.wait(&[(path.clone(), stream.at.offset)], IDLE, new);
    }
}

/// The last `n` lines of the file at `path`; nothing if it cannot be read.
pub fn last_lines(path: &Path, n: u64) -> Vec<String> {
    match std::fs::File::open(path) {
        Ok(f) => String::from_utf8_lossy(&read_rest(&f, start(path, Some(n))))
            .lines()
            .map(str::to_string)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Where printing `path` begins: at its start, or at its last `tail`
/// lines (a last line not yet ended counts as one).
fn start(path: &Path, tail: Option<u64>) -> u64 {
    let Some(n) = tail else { return 0 };
    let Ok(f) = std::fs::File::open(path) else {
        return 0;
    };
    let mut end = f.metadata().map_or(0, |m| m.len());
    let mut buf = vec![0u8; 64 * 1024];
    // Newlines to pass going back: one per line, and the one that ends
    // the last line if it is whole.
    let whole = end > 0 && deployd_lib::tail::ends_a_line(&f, end);
    let mut left = n + u64::from(whole);
    if left == 0 {
        return end;
    }
    while end > 0 {
        let from = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - from) as usize];
        if f.read_exact_at(chunk, from).is_err() {
            return 0;
        }
        for (i, &b) in chunk.iter().enumerate().rev() {
            if b == b'\n' {
                left -= 1;
                if left == 0 {
                    return from + i as u64 + 1;
                }
            }
        }
        end = from;
    }
    0
}

/// Writes the complete lines of the stream's pending bytes (all of them if
/// `all`) that `filter` lets through, each after `[label] ` if there is one.
fn emit(
    out: &mut impl Write,
    label: Option<&str>,
    instance: Option<u32>,
    stream: &mut Stream,
    all: bool,
    filter: &Filter,
) -> std::io::Result<()> {
    let pending = &mut stream.partial;
    let end = if all {
        pending.len()
    } else {
        pending
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1)
    };
    let text = String::from_utf8_lossy(&pending[..end]).into_owned();
    pending.drain(..end);
    for line in text.split_inclusive('\n') {
        let mut body = line;
        let stamped = stamp::split(line);
        if let Some((t, rest)) = stamped {
            if let Some(since) = &filter.since {
                stream.shown = Some(t >= since.as_str());
            }
            if filter.unstamped {
                body = rest;
            }
        }
        // Before any stamped line: shown unless only lines since are.
        if !stream.shown.unwrap_or(filter.since.is_none()) {
            continue;
        }
        if filter.json {
            let (time, rest) = match stamped {
                Some((t, rest)) => (Some(t), rest),
                None => (None, line),
            };
            let mut o = serde_json::Map::new();
            o.insert("time".into(), time.into());
            if let Some(n) = instance {
                o.insert("instance".into(), n.into());
            }
            o.insert("line".into(), rest.trim_end_matches(['\n', '\r']).into());
            writeln!(out, "{}", serde_json::Value::Object(o))?;
            continue;
        }
        match label {
            None => out.write_all(body.as_bytes())?,
            Some(l) => writeln!(out, "[{l}] {}", body.trim_end_matches(['\n', '\r']))?,
        }
    }
    Ok(())
}

/// `deploy logs SERVICE [INSTANCE] [-f]`: the output of the service's
/// instances (or of the one numbered `instance`), each line labelled with
/// its instance's number when there are several. With `follow`, it keeps
/// polling the instances as they come and go: one started since (by a
/// rollout, a restart) is printed from its first line, one replaced under
/// the same number starts afresh, and one renumbered (`instance 3 is now
/// instance 0`) goes on where it was, under its new label. An instance is
/// known by its pid, read around each read of its log.
pub fn logs(
    dir: &Path,
    instance: Option<u32>,
    follow: bool,
    filter: &Filter,
) -> Result<Exit, Fail> {
    let instances = dir.join("instances");
    if let Some(n) = instance {
        if !instances.join(n.to_string()).join("log").exists() {
            let service = dir.file_name().map_or("".into(), |s| s.to_string_lossy());
            let there = ns::instance_numbers(&instances).unwrap_or_default();
            let there: Vec<String> = there.iter().map(u32::to_string).collect();
            return Err(Fail::new(
                ns::NOT_FOUND,
                format!(
                    "{service}: no instance {n} (instances: {})",
                    match there.is_empty() {
                        true => "none".to_string(),
                        false => there.join(", "),
                    }
                ),
            ));
        }
    }
    // Per process: how far its log was printed, and a line not yet whole.
    let mut seen: HashMap<String, Stream> = HashMap::new();
    let mut out = std::io::stdout().lock();
    let mut first = true;
    let mut waiter = Waiter::default();
    loop {
        // What to wait on next: each live instance's log where it was
        // read to, and the events (an instance started or replaced says
        // so there).
        let mut watch: Vec<(std::path::PathBuf, u64)> = Vec::new();
        let mut new = false;
        if follow && removed(dir) {
            say_removed(dir);
            return Ok(Exit::Ok);
        }
        let numbers = match instance {
            Some(n) => vec![n],
            None => match ns::instance_numbers(&instances) {
                Ok(n) => n,
                // deployd away for a moment (replacing itself): again.
                Err(_) if follow => {
                    std::thread::sleep(POLL);
                    continue;
                }
                Err(e) => return Err(Fail::new(1, format!("{}: {e}", instances.display()))),
            },
        };
        let mut live = HashSet::new();
        for n in numbers {
            let inst = instances.join(n.to_string());
            let pid = || std::fs::read_to_string(inst.join("pid")).unwrap_or_default();
            let before = pid();
            let key = before.trim().to_string();
            if key.is_empty() {
                // Not started yet: nothing printed.
                continue;
            }
            let log = inst.join("log");
            // Those there at first from their last lines if asked; any
            // later from its first.
            let stream = seen.entry(key.clone()).or_insert_with(|| Stream {
                at: Cursor::at(if first { start(&log, filter.tail) } else { 0 }),
                ..Stream::default()
            });
            // Seen: kept, whatever this read gives.
            live.insert(key);
            let mut at = stream.at.clone();
            let chunk = at.read(&log, false);
            // Renumbered or replaced between the reads: next time.
            if pid() != before {
                continue;
            }
            stream.at = at;
            let Some(chunk) = chunk else { continue };
            new |= !chunk.is_empty();
            watch.push((log.clone(), stream.at.offset));
            stream.partial.extend_from_slice(&chunk);
            let label = instance.is_none().then(|| n.to_string());
            emit(&mut out, label.as_deref(), Some(n), stream, !follow, filter)?;
        }
        // Not while the service is away with deployd: those are kept, to
        // go on with where they were. A process is forgotten once it was
        // under no number two rounds in a row: a renumbering between the
        // listing and the reads can hide it for one.
        if dir.is_dir() {
            seen.retain(|k, s| {
                s.missed = if live.contains(k) { 0 } else { s.missed + 1 };
                s.missed < 2
            });
        }
        first = false;
        out.flush()?;
        if !follow {
            return Ok(Exit::Ok);
        }
        let events = dir.join("events");
        let len = std::fs::metadata(&events).map_or(0, |m| m.len());
        watch.push((events, len));
        waiter.wait(&watch, IDLE, new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_lines_of_a_long_file_are_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events");
        let text: String = (0..2000).map(|i| format!("event number {i}\n")).collect();
        std::fs::write(&path, &text).unwrap();
        let last = last_lines(&path, 3);
        assert_eq!(
            last,
            [
                "event number 1997",
                "event number 1998",
                "event number 1999"
            ]
        );
        std::fs::write(&path, "one\ntwo\n").unwrap();
        assert_eq!(last_lines(&path, 10), ["one", "two"]);
        assert!(last_lines(&dir.path().join("none"), 10).is_empty());
    }

    #[test]
    fn a_cursor_finds_its_place_in_a_trimmed_file_and_starts_a_new_one_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events");
        // Lines longer than a mark's worth of identical ending.
        let same = "x".repeat(300);
        let line = |i: u32| format!("2026-12-02T07:00:{:02}.{i:03}Z event {i} {same}\n", i % 60);
        let lines = |r: std::ops::Range<u32>| r.map(line).collect::<String>();
        std::fs::write(&path, lines(0..100)).unwrap();
        let mut c = Cursor::at(0);
        let read =
            |c: &mut Cursor, whole: bool| String::from_utf8(c.read(&path, whole).unwrap()).unwrap();
        assert_eq!(read(&mut c, false), lines(0..100));
        // Appended to: what was appended.
        std::fs::write(&path, lines(0..110)).unwrap();
        assert_eq!(read(&mut c, false), lines(100..110));
        // The older half dropped, then more appended, the file longer or
        // shorter than where the cursor was: only what is new.
        std::fs::write(&path, lines(55..112)).unwrap();
        assert_eq!(read(&mut c, false), lines(110..112));
        std::fs::write(&path, lines(80..200)).unwrap();
        assert_eq!(read(&mut c, false), lines(112..200));
        // Begun again (a log moved to .1): all of it.
        std::fs::write(&path, "a new file\n").unwrap();
        assert_eq!(read(&mut c, false), "a new file\n");
        // Whole lines only: the rest waits for its newline.
        std::fs::write(&path, "a new file\nhalf").unwrap();
        assert_eq!(read(&mut c, true), "");
        std::fs::write(&path, "a new file\nhalf a line\n").unwrap();
        assert_eq!(read(&mut c, true), "half a line\n");
        // Placed in the middle before reading: from there.
        let mut c = Cursor::at(line(0).len() as u64);
        std::fs::write(&path, lines(0..3)).unwrap();
        assert_eq!(read(&mut c, false), lines(1..3));
        assert!(
            Cursor::at(0)
                .read(&dir.path().join("gone"), false)
                .is_none()
        );
    }

    fn printed(chunks: &[&str], filter: &Filter, label: Option<&str>) -> String {
        let mut stream = Stream::default();
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            stream.partial.extend_from_slice(c.as_bytes());
            emit(
                &mut out,
                label,
                None,
                &mut stream,
                i + 1 == chunks.len(),
                filter,
            )
            .unwrap();
        }
        String::from_utf8(out).unwrap()
    }

    const LOG: &str = "2025-12-02T01:00:00.000Z one\n\
                       2025-12-02T01:30:00.000Z two\n\
                       after a rotation, unstamped\n\
                       2025-12-02T02:00:00.000Z three\n";

    #[test]
    fn stamps_are_kept_or_taken_off() {
        let all = Filter::default();
        assert_eq!(printed(&[LOG], &all, None), LOG);
        let plain = Filter {
            unstamped: true,
            ..all
        };
        assert_eq!(
            printed(&[LOG], &plain, None),
            "one\ntwo\nafter a rotation, unstamped\nthree\n"
        );
        // Only whole lines until the end; labelled, each line.
        assert_eq!(
            printed(
                &["2025-12-02T01:00:00.000Z o", "ne\nlast"],
                &plain,
                Some("1")
            ),
            "[1] one\n[1] last\n"
        );
    }

    #[test]
    fn tail_begins_at_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let at = |text: &str, n: u64| {
            std::fs::write(&path, text).unwrap();
            text[start(&path, Some(n)) as usize..].to_string()
        };
        assert_eq!(at("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(at("a\nb\nc\n", 3), "a\nb\nc\n");
        assert_eq!(at("a\nb\nc\n", 9), "a\nb\nc\n");
        assert_eq!(at("a\nb\nc\n", 0), "");
        // A last line not yet ended is one.
        assert_eq!(at("a\nb\nc", 1), "c");
        assert_eq!(at("a\nb\nc", 2), "b\nc");
        assert_eq!(at("a\nb\nc", 0), "");
        assert_eq!(at("", 5), "");
        assert_eq!(at("\n\n", 1), "\n");
        // Lines across the reads of 64 KiB going back.
        let long: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(at(&long, 2), "line 19998\nline 19999\n");
        assert_eq!(at(&long, 15_000).lines().next(), Some("line 5000"));
        assert_eq!(start(&path, None), 0, "no --tail: from the start");
        assert_eq!(start(&dir.path().join("none"), Some(1)), 0);
    }

    #[test]
    fn since_keeps_the_lines_stamped_from_then() {
        let since = |s: &str| Filter {
            since: Some(parse_since(s).unwrap()),
            ..Filter::default()
        };
        let lines = |f: &Filter| printed(&[LOG], f, None).lines().count();
        assert_eq!(lines(&since("2025-12-02")), 4);
        // An unstamped line goes with the stamped line before it.
        assert_eq!(lines(&since("2025-12-02T01:30")), 3);
        assert_eq!(lines(&since("2025-12-02 01:30:00Z")), 3);
        assert_eq!(lines(&since("2025-12-02T01:30:00.001")), 1);
        assert_eq!(lines(&since("2025-12-03")), 0);
        // A time ago: every line here is older than a second ago.
        assert_eq!(lines(&since("1s")), 0);
        assert_eq!(lines(&since("99999d")), 4);
        // Unstamped lines before any stamp (an old log): only without --since.
        assert_eq!(printed(&["old\n"], &since("0"), None), "");
        assert_eq!(printed(&["old\n"], &Filter::default(), None), "old\n");
    }

    #[test]
    fn since_reads_times_ago_and_utc_times() {
        let now = deployd_lib::stamp::now();
        let ago = parse_since("10m").unwrap();
        assert_eq!(ago.len(), now.len());
        assert!(ago < now, "{ago} {now}");
        assert!(parse_since("0").unwrap() <= deployd_lib::stamp::now());
        assert_eq!(parse_since("2026-12-02").unwrap(), "2026-12-02");
        assert_eq!(
            parse_since("2026-12-02T01:30:00Z").unwrap(),
            "2026-12-02T01:30:00"
        );
        for bad in [
            "",
            "m",
            "10x",
            "-5m",
            "yesterday",
            "2026-1-2",
            "2026-12-02T1",
            "12:00",
        ] {
            let e = parse_since(bad).unwrap_err();
            assert!(e.contains("neither a time ago"), "{bad}: {e}");
        }
    }
}
