//! Copying output to log files: an instance's stdout and stderr (each line
//! after the time deployd read it) and a port's access log, through a pipe
//! a pump task reads, into a file moved to `.1` at its size limit; and the
//! last lines of a log, clean enough for an event.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use deployd_lib::stamp;
use tokio::io::AsyncReadExt;

/// A pipe whose write end goes to a child (or the proxy) and whose read
/// end a pump copies to a log file.
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((r, w))
}

/// What a log pump does besides copying; by default nothing (an access
/// log's pump).
#[derive(Default)]
pub struct PumpOptions {
    /// Each line that begins is preceded by the time deployd read it (a
    /// [`stamp`] and a space): a child's output; the lines of an access
    /// log come with their own.
    pub stamped: bool,
    /// Bytes a second it reads at most (the manifest's `log_rate`), after
    /// a burst of as much; 0: no limit. Past it the pump waits, the pipe
    /// fills and the writer's writes wait: nothing is lost, and a process
    /// printing as fast as it can costs deployd no more than that.
    pub rate: u64,
    /// Called the first time the pump waits.
    pub throttled: Option<Box<dyn FnOnce() + Send>>,
    /// Called when what it copies cannot be written (a full disk), with
    /// the error, and again with `Ok(bytes dropped meanwhile)` once it can.
    pub unwritable: Option<Unwritable>,
}

/// What a pump says when its log cannot be written (`Err`: why), and when
/// it can again (`Ok`: the bytes dropped meanwhile).
pub type Unwritable = Box<dyn Fn(Result<u64, String>) + Send>;

/// The read buffer of a pump held to its rate: a pipe's capacity. Only
/// those get it; the many quiet instances keep 4 KiB.
const THROTTLED_BUF: usize = 64 * 1024;

/// Reads allowed by a [`PumpOptions::rate`]: a token bucket of a second.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        Bucket {
            rate: rate as f64,
            tokens: rate as f64,
            at: Instant::now(),
        }
    }

    /// Takes `n` bytes; how long to wait before reading again, if at all.
    fn take(&mut self, n: usize) -> Option<Duration> {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate) - n as f64;
        self.at = now;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// Copies what comes down a pipe to the log at `path`, moving the file to
/// `path.1` when it would pass `max` bytes (the manifest's `log_max`), as
/// `opts` says. Ends at end of file (every writer closed).
pub async fn pump_log(read: OwnedFd, path: PathBuf, max: u64, opts: PumpOptions) {
    let PumpOptions {
        stamped,
        rate,
        mut throttled,
        unwritable,
    } = opts;
    // Bytes dropped since writes began to fail, while they fail.
    let mut dropping: Option<u64> = None;
    let mut bucket = (rate > 0).then(|| Bucket::new(rate));
    let rx = match tokio::net::unix::pipe::Receiver::from_owned_fd(read) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::warn!("log pipe for {}: {e}", path.display());
            return;
        }
    };
    let mut rx = rx;
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::new();
    let mut file = open_log(&path);
    let mut size = file
        .as_ref()
        .and_then(|f| f.metadata().ok())
        .map_or(0, |m| m.len());
    // A log taken over mid-line (by a re-executed deployd) goes on with it.
    let mut at_start = file
        .as_ref()
        .is_none_or(|f| deployd_lib::tail::ends_a_line(f, size));
    // Whether the file's last byte ends a line (it is not the same as
    // `at_start` for output that is not stamped).
    let mut ends_line = at_start;
    loop {
        let n = match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let data = match stamped {
            true => {
                out.clear();
                stamp_lines(&buf[..n], SystemTime::now(), &mut at_start, &mut out);
                &out[..]
            }
            false => &buf[..n],
        };
        let mut data = data;
        if size + data.len() as u64 > max {
            // The line under way ends in the old file if its end is in
            // this read, so that each file begins with a line of its own
            // (a line longer than a read is cut, as before).
            let head = match ends_line {
                true => 0,
                false => data.iter().position(|&b| b == b'\n').map_or(0, |p| p + 1),
            };
            if head > 0 {
                if let Some(f) = file.as_mut() {
                    let _ = f.write_all(&data[..head]);
                }
                ends_line = true;
            }
            data = &data[head..];
            let mut old = path.clone().into_os_string();
            old.push(".1");
            let _ = std::fs::rename(&path, &old);
            file = open_log(&path);
            size = 0;
        }
        let written = match file.as_mut() {
            Some(f) => f.write_all(data).map_err(|e| e.to_string()),
            None => Err("cannot open the log".to_string()),
        };
        match (written, dropping.as_mut()) {
            (Ok(()), _) => {
                size += data.len() as u64;
                if let (Some(dropped), Some(say)) = (dropping.take(), unwritable.as_ref()) {
                    say(Ok(dropped));
                }
            }
            (Err(_), Some(dropped)) => *dropped += data.len() as u64,
            (Err(e), None) => {
                tracing::warn!("log {}: {e}", path.display());
                dropping = Some(data.len() as u64);
                if let Some(say) = unwritable.as_ref() {
                    say(Err(e));
                }
            }
        }
        if let Some(&last) = data.last() {
            ends_line = last == b'\n';
        }
        if let Some(wait) = bucket.as_mut().and_then(|b| b.take(n)) {
            if let Some(say) = throttled.take() {
                say();
            }
            // The pipe fills meanwhile: take a pipe's worth at each
            // wake-up rather than 4 KiB (16 times fewer of them).
            if buf.len() < THROTTLED_BUF {
                buf.resize(THROTTLED_BUF, 0);
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// Appends `chunk` to `out` with the stamp of `at` before each line that
/// begins in it. `at_start` says whether the chunk begins a line, and is
/// left saying whether the next one does.
fn stamp_lines(chunk: &[u8], at: SystemTime, at_start: &mut bool, out: &mut Vec<u8>) {
    // Formatted once, where it is first written; copied from there after.
    let mut stamp: Option<std::ops::Range<usize>> = None;
    let mut rest = chunk;
    while !rest.is_empty() {
        if *at_start {
            match stamp.clone() {
                Some(written) => out.extend_from_within(written),
                None => {
                    let from = out.len();
                    stamp::utc(out, at);
                    out.push(b' ');
                    stamp = Some(from..out.len());
                }
            }
        }
        let line = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |nl| nl + 1);
        out.extend_from_slice(&rest[..line]);
        *at_start = rest[line - 1] == b'\n';
        rest = &rest[line..];
    }
}

/// [`pump_log`] of a child's output on its own task; the receiver hears
/// when it has copied everything (the pipe's last writer closed), or is
/// dropped.
pub fn spawn_pump(
    read: OwnedFd,
    path: PathBuf,
    max: u64,
    opts: PumpOptions,
) -> tokio::sync::oneshot::Receiver<()> {
    let (done, pumped) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        pump_log(read, path, max, opts).await;
        let _ = done.send(());
    });
    pumped
}

/// Lines of output shown in the events after an exit or a failure, as
/// `systemctl status` shows a unit's last lines.
pub const SHOWN_LINES: usize = 10;
/// How much of a log's end is read for them.
const TAIL_BYTES: u64 = 4096;
/// Characters kept of each line.
const LINE_WIDTH: usize = 200;

/// The last `n` non-blank lines of a log (from its last 4 KiB), fit for an
/// event line: without their time stamps, terminal escape sequences
/// removed, other control characters as spaces, what a carriage return
/// overwrote dropped, each cut at 200 characters. Nothing if the file
/// cannot be read.
pub fn last_lines(path: &Path, n: usize) -> Vec<String> {
    let lines = deployd_lib::tail::last_lines(path, TAIL_BYTES);
    let mut shown: Vec<String> = lines
        .iter()
        .rev()
        .filter_map(|l| shown_line(stamp::strip(l)))
        .take(n)
        .collect();
    shown.reverse();
    shown
}

fn shown_line(line: &str) -> Option<String> {
    // A progress bar redrawn with \r, or a \r\n ending: what is visible.
    let line = line.rsplit('\r').find(|s| !s.trim().is_empty())?;
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ parameters final byte; others: ESC and one more.
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            c if deployd_lib::printable::is_unsafe(c) => out.push(' '),
            c => out.push(c),
        }
    }
    let trimmed = out.trim_end();
    if trimmed.trim_start().is_empty() {
        return None;
    }
    Some(match trimmed.char_indices().nth(LINE_WIDTH) {
        Some((cut, _)) => format!("{}...", &trimmed[..cut]),
        None => trimmed.to_string(),
    })
}

fn open_log(path: &Path) -> Option<File> {
    // Read too: whether it ends mid-line.
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("log {}: {e}", path.display());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A child's output: stamped, no rate.
    fn stamped() -> PumpOptions {
        PumpOptions {
            stamped: true,
            ..PumpOptions::default()
        }
    }

    /// Past its rate the pump reads no faster: the writer waits (its
    /// writes block on a full pipe), nothing is lost, the first wait is
    /// said once. 1.5 MiB at 512 KiB/s, a second's burst first: at least
    /// two seconds.
    #[tokio::test]
    async fn a_pump_reads_no_faster_than_its_rate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("0.log");
        let (r, w) = pipe().expect("pipe");
        let said = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = said.clone();
        let opts = PumpOptions {
            stamped: false,
            rate: 512 << 10,
            throttled: Some(Box::new(move || {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })),
            unwritable: None,
        };
        let pump = tokio::spawn(pump_log(r, path.clone(), 1 << 30, opts));
        let t0 = std::time::Instant::now();
        let writer = std::thread::spawn(move || {
            let mut w = File::from(w);
            for _ in 0..24 {
                w.write_all(&[b'x'; 64 << 10]).expect("write");
            }
        });
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .expect("join")
            .expect("writer");
        pump.await.expect("pump");
        assert!(
            t0.elapsed() >= Duration::from_millis(1900),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(std::fs::metadata(&path).expect("log").len(), 24 << 16);
        assert_eq!(said.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// What a pump with `max` made of `chunks`, each one write: the log
    /// moved to `.1`, and the log.
    async fn pumped(max: u64, chunks: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("0.log");
        let (r, w) = pipe().expect("pipe");
        let pump = tokio::spawn(pump_log(r, path.clone(), max, stamped()));
        let mut w = File::from(w);
        for chunk in chunks {
            w.write_all(chunk).expect("write");
            w.flush().expect("flush");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(w);
        pump.await.expect("pump");
        let old = std::fs::read(dir.path().join("0.log.1")).expect("0.log.1");
        (old, std::fs::read(&path).expect("0.log"))
    }

    /// Output that cannot be written (a full disk: /dev/full says ENOSPC
    /// to every write) is said once, not dropped silently.
    #[tokio::test]
    async fn a_log_that_cannot_be_written_is_said_once() {
        let said = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let log = said.clone();
        let opts = PumpOptions {
            unwritable: Some(Box::new(move |r| log.lock().push(r))),
            ..stamped()
        };
        let (r, w) = pipe().expect("pipe");
        let pump = tokio::spawn(pump_log(r, PathBuf::from("/dev/full"), 1 << 20, opts));
        let mut w = File::from(w);
        for _ in 0..3 {
            w.write_all(b"a line\n").expect("write");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(w);
        pump.await.expect("pump");
        let said = said.lock().clone();
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0]
                .as_ref()
                .unwrap_err()
                .contains("No space left on device"),
            "{said:?}"
        );
    }

    #[tokio::test]
    async fn a_line_under_way_at_the_move_to_dot_one_ends_in_the_old_file() {
        // A line begun in one write and ended in the next, which passes
        // the limit; then a line of its own.
        let chunks = [
            vec![b'a'; 60 << 10],
            [vec![b'a'; 1000], b"\nbbb\n".to_vec(), vec![b'c'; 4000]].concat(),
        ];
        let (old, new) = pumped(64 << 10, &chunks).await;
        assert_eq!(old.last(), Some(&b'\n'), "the old file ends its line");
        assert_eq!(old.len(), stamp::LEN + 1 + (60 << 10) + 1000 + 1);
        // The new one begins with a line of its own, stamped.
        let new = String::from_utf8(new).expect("utf-8");
        assert!(stamp::split(&new).is_some(), "{}", &new[..40]);
        let lines: Vec<&str> = new.lines().map(stamp::strip).collect();
        assert_eq!(lines, ["bbb".to_string(), "c".repeat(4000)]);
    }

    #[tokio::test]
    async fn a_log_past_its_max_moves_to_dot_one() {
        // 40 KiB chunks, each one write: the third would pass 100 KiB.
        let chunks = [b'a', b'b', b'c'].map(|c| vec![c; 40 << 10]);
        let (old, new) = pumped(100 << 10, &chunks).await;
        // One line: one stamp, at its start.
        assert_eq!(old.len() + new.len(), (120 << 10) + stamp::LEN + 1);
        assert!(old.len() <= 100 << 10 && new.len() <= 100 << 10);
        assert_eq!(
            (old[stamp::LEN + 1], new.last().copied()),
            (b'a', Some(b'c'))
        );
    }

    #[test]
    fn each_line_is_stamped_where_it_begins() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_623_765_123);
        let t = "2025-12-01T21:16:05.123Z ";
        let stamped = |chunks: &[&str], mut at_start: bool| {
            let mut out = Vec::new();
            for c in chunks {
                stamp_lines(c.as_bytes(), at, &mut at_start, &mut out);
            }
            (String::from_utf8(out).unwrap(), at_start)
        };
        assert_eq!(
            stamped(&["one\ntwo\n"], true),
            (format!("{t}one\n{t}two\n"), true)
        );
        // A line split across reads has one stamp; an empty line has its own.
        assert_eq!(
            stamped(&["par", "tial\n\nx"], true),
            (format!("{t}partial\n{t}\n{t}x"), false)
        );
        // Carried on from a line begun before: not stamped again.
        assert_eq!(stamped(&["end\n"], false), ("end\n".to_string(), true));
        assert_eq!(stamped(&[""], true), (String::new(), true));
    }

    #[tokio::test]
    async fn a_log_taken_over_mid_line_goes_on_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("0.log");
        std::fs::write(&path, "2025-12-01T21:16:05.123Z half a").unwrap();
        let (r, w) = pipe().expect("pipe");
        let pump = tokio::spawn(pump_log(r, path.clone(), 1 << 20, stamped()));
        File::from(w).write_all(b" line\nnext\n").expect("write");
        pump.await.expect("pump");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines[0], "2025-12-01T21:16:05.123Z half a line");
        let (t, next) = stamp::split(lines[1]).expect("a stamp");
        assert_eq!((t.len(), next, lines.len()), (stamp::LEN, "next", 2));
        assert!(t > "2026-", "{t}");
        // What the events show of it: the lines, without their stamps.
        assert_eq!(last_lines(&path, 10), ["half a line", "next"]);
    }

    #[test]
    fn the_last_lines_of_a_log_are_shown_clean() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        assert!(last_lines(&path, 10).is_empty(), "no file, no lines");
        std::fs::write(
            &path,
            "starting\n\n  \ndownloading 10%\rdownloading 100%\r\n\x1b[31merror:\x1b[0m no\tconfig\r\nbye\n",
        )
        .unwrap();
        assert_eq!(
            last_lines(&path, 10),
            ["starting", "downloading 100%", "error: no config", "bye"]
        );
        assert_eq!(last_lines(&path, 2), ["error: no config", "bye"]);

        // A long log: from its end, never a cut first line, long lines cut.
        let long = format!("{}\n", "x".repeat(300));
        let mut text = String::new();
        for i in 0..100 {
            text.push_str(&format!("line {i}\n"));
        }
        text.push_str(&long);
        text.push_str("last");
        std::fs::write(&path, &text).unwrap();
        let lines = last_lines(&path, 10);
        assert_eq!(lines.len(), 10, "{lines:?}");
        assert_eq!(lines[8], format!("{}...", "x".repeat(200)));
        assert_eq!(lines[9], "last");
        assert_eq!(lines[0], "line 92");
        // Multibyte characters are cut whole, and invalid bytes shown.
        let mut bytes = "é".repeat(250).into_bytes();
        bytes.extend(b"\n\xff ok");
        std::fs::write(&path, bytes).unwrap();
        let lines = last_lines(&path, 10);
        assert_eq!(lines[0], format!("{}...", "é".repeat(200)));
        assert_eq!(lines[1], "\u{fffd} ok");
    }
}
