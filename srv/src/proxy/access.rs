//! The access log of a service's port (`access_log on`), in the service's
//! `access` file. An http port has a line per request, as nginx and
//! kamal-proxy write them:
//!
//! ```text
//! 2026-12-01T21:16:05.123Z 127.0.0.1 GET /orders?id=7 200 1.2 127.0.0.1:41234
//! ```
//!
//! time (UTC), client address, method, target, status (`-`: no response,
//! the client left or the instance was cut), milliseconds from the whole
//! request head to the end of the response, and the instance it went to
//! (`-`: none). A tcp port has a line per connection, as nginx's stream
//! log and HAProxy's tcplog do, with the same fields in the same places
//! where they mean the same:
//!
//! ```text
//! 2026-12-01T21:16:05.123Z 127.0.0.1 closed 517 10240 1234.5 127.0.0.1:41234
//! ```
//!
//! time, client, how it ended ([`End`]), bytes from the client, bytes to
//! it, milliseconds from accept to close, instance. The proxy writes each
//! line with one `write(2)` into a
//! non-blocking pipe; the task that copies the pipe to the file (rotating
//! it at `log_max`, as an instance's log) is the only one that touches the
//! disk. A line the pipe has no room for is dropped and counted, never
//! waited for: the data path does not block on a log.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::logfile;
use deployd_lib::stamp;

/// The longest target written; a longer one is cut and ends in `...`.
const MAX_TARGET: usize = 1024;

/// A service's access log.
pub struct AccessLog {
    pipe: File,
    dropped: AtomicU64,
}

/// One request, as the log line says it.
pub struct Entry<'a> {
    pub client: &'a [u8],
    /// The request line's method and target.
    pub method: &'a [u8],
    pub target: &'a [u8],
    pub status: Option<u16>,
    pub took: Duration,
    pub upstream: Option<std::net::SocketAddr>,
}

/// One tcp connection, as the log line says it.
pub struct Connection<'a> {
    pub client: &'a [u8],
    pub end: End,
    /// Bytes the client sent, and bytes it was sent.
    pub from_client: u64,
    pub to_client: u64,
    pub took: Duration,
    pub upstream: Option<std::net::SocketAddr>,
}

/// How a tcp connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed their direction.
    Closed,
    /// A read or write failed (a reset, most often).
    Error,
    /// deployd closed it: its instance's drain was over.
    Cut,
    /// No instance took it within `queue_timeout`.
    Unserved,
}

impl End {
    fn word(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Error => "error",
            End::Cut => "cut",
            End::Unserved => "unserved",
        }
    }
}

impl AccessLog {
    /// A log that goes to `path`, moved to `path.1` past `max` bytes.
    /// Spawns its copying task: call it within the runtime.
    pub fn open(path: PathBuf, max: u64) -> std::io::Result<AccessLog> {
        let (read, write) = logfile::pipe()?;
        set_nonblocking(&write)?;
        let opts = logfile::PumpOptions::default();
        tokio::spawn(logfile::pump_log(read, path, max, opts));
        Ok(AccessLog {
            pipe: File::from(write),
            dropped: AtomicU64::new(0),
        })
    }

    /// Lines dropped because the pipe was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Writes one entry's line.
    pub fn write(&self, e: &Entry<'_>) {
        let mut line = Vec::with_capacity(96 + e.target.len().min(MAX_TARGET));
        stamp::utc(&mut line, SystemTime::now());
        line.push(b' ');
        line.extend_from_slice(e.client);
        line.push(b' ');
        line.extend_from_slice(e.method);
        line.push(b' ');
        if e.target.len() > MAX_TARGET {
            line.extend_from_slice(&e.target[..MAX_TARGET]);
            line.extend_from_slice(b"...");
        } else {
            line.extend_from_slice(e.target);
        }
        // Writing to a Vec cannot fail.
        let _ = match e.status {
            Some(s) => write!(line, " {s}"),
            None => write!(line, " -"),
        };
        self.finish(line, e.took, e.upstream);
    }

    /// Writes one tcp connection's line.
    pub fn write_connection(&self, c: &Connection<'_>) {
        let mut line = Vec::with_capacity(112);
        stamp::utc(&mut line, SystemTime::now());
        line.push(b' ');
        line.extend_from_slice(c.client);
        // Writing to a Vec cannot fail.
        let _ = write!(line, " {} {} {}", c.end.word(), c.from_client, c.to_client);
        self.finish(line, c.took, c.upstream);
    }

    /// Ends a line with the milliseconds and the instance, and writes it.
    fn finish(&self, mut line: Vec<u8>, took: Duration, upstream: Option<std::net::SocketAddr>) {
        let _ = write!(line, " {:.1}", took.as_secs_f64() * 1000.0);
        let _ = match upstream {
            Some(a) => writeln!(line, " {a}"),
            None => writeln!(line, " -"),
        };
        // One write: a pipe takes up to PIPE_BUF (4096) bytes whole, and
        // a line is at most about 1.2 KiB.
        if (&self.pipe).write(&line).map_or(true, |n| n < line.len()) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_go_to_the_file_and_a_full_pipe_drops_rather_than_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access");
        let log = AccessLog::open(path.clone(), 1 << 20).unwrap();
        let long = vec![b'x'; 3000];
        let e = Entry {
            client: b"127.0.0.1",
            method: b"GET",
            target: &long,
            status: Some(200),
            took: Duration::from_micros(1234),
            upstream: Some(([127, 0, 0, 1], 41234).into()),
        };
        log.write(&Entry {
            target: b"/a?b=1",
            ..e
        });
        log.write(&Entry {
            status: None,
            upstream: None,
            ..e
        });
        let want_first = " 127.0.0.1 GET /a?b=1 200 1.2 127.0.0.1:41234\n";
        let mut text = String::new();
        for _ in 0..200 {
            text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            text.split('\n')
                .next()
                .is_some_and(|l| format!("{l}\n").ends_with(want_first))
        );
        assert!(
            lines[1].ends_with(&format!("{}... - 1.2 -", "x".repeat(MAX_TARGET))),
            "{}",
            lines[1]
        );
        assert_eq!(
            lines[0].len(),
            "2025-12-01T21:16:05.123Z".len() + want_first.len() - 1
        );
        // Nothing reads the pipe while the runtime is blocked here: writes
        // fill it, then are dropped, and none blocks.
        let started = std::time::Instant::now();
        for _ in 0..200 {
            log.write(&e);
        }
        assert!(log.dropped() > 0);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
