//! Following a rollout to its end, like `kubectl rollout status`: print the
//! service's new events as they come, until a read of its `wait` file
//! returns the outcome.

use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::ns::{self, NOT_RUNNING};
use crate::status::Traffic;
use crate::{Exit, Fail};

/// Where things stood just before a command: where to follow the event
/// log from, and the traffic counters to compare with at the end.
pub struct Start {
    offset: u64,
    started: Instant,
    traffic: Option<Traffic>,
}

impl Start {
    /// Now, for the service whose directory is `dir` (which need not exist
    /// yet: a first apply).
    pub fn now(dir: &Path) -> Start {
        Start {
            offset: std::fs::metadata(dir.join("events")).map_or(0, |m| m.len()),
            started: Instant::now(),
            traffic: Traffic::read(dir),
        }
    }
}

/// What the rollout was, for the final line.
#[derive(Clone, Copy)]
pub enum What {
    /// apply, resume
    Deploy,
    /// rollback
    Rollback,
    /// restart
    Restart,
}

/// Prints events from `start` until the rollout settles, then what the
/// service's port served meanwhile (so that whether the rollout cost any
/// client anything is right there), then the outcome; returns the exit.
pub fn follow(service: &str, dir: &Path, start: Start, what: What) -> Result<Exit, Fail> {
    let Start {
        mut offset,
        started,
        traffic,
    } = start;
    let (tx, rx) = mpsc::channel();
    let wait = dir.join("wait");
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read_to_string(&wait));
    });
    let mut out = std::io::stdout().lock();
    let outcome = loop {
        offset = print_events(&mut out, service, dir, offset)?;
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => break r,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Fail::new(1, "lost track of the rollout".into()));
            }
        }
    };
    print_events(&mut out, service, dir, offset)?;
    let took = format!("{:.1}s", started.elapsed().as_secs_f64());
    if let (Some(before), Some(now)) = (traffic, Traffic::read(dir)) {
        if let Some(line) = now.since(&before) {
            writeln!(out, "{service}: traffic meanwhile: {line}")?;
        }
    }
    let line = match outcome {
        Ok(l) => l.trim_end().to_string(),
        Err(e) => {
            return Err(Fail::new(
                NOT_RUNNING,
                format!("{service}: deployd stopped before the rollout ended ({e})"),
            ));
        }
    };
    if let Some(v) = line.strip_prefix("none ") {
        let verb = match what {
            What::Deploy => "deployed",
            What::Rollback => "rolled back to",
            What::Restart => "restarted",
        };
        writeln!(out, "{service}: {verb} {v} ({took})")?;
        Ok(Exit::Ok)
    } else if line.starts_with("paused ") {
        let progress = ns::read_field(dir, "update_progress");
        eprintln!("{service}: paused at {progress}; go on with: deploy resume {service}");
        Ok(Exit::Failed)
    } else {
        let reason = line.strip_prefix("failed: ").unwrap_or(&line);
        eprintln!("{service}: failed: {reason}");
        Ok(Exit::Failed)
    }
}

/// Prints the event lines after `offset` as `service: message`; returns the
/// new offset. A log that shrank (trimmed) is read again from its start.
fn print_events(out: &mut impl Write, service: &str, dir: &Path, offset: u64) -> Result<u64, Fail> {
    let text = std::fs::read(dir.join("events")).unwrap_or_default();
    let offset = if (text.len() as u64) < offset {
        0
    } else {
        offset
    };
    let new = &text[offset as usize..];
    // Only whole lines.
    let end = new.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    for line in String::from_utf8_lossy(&new[..end]).lines() {
        let msg = strip_time(line);
        writeln!(out, "{service}: {msg}")?;
    }
    out.flush()?;
    Ok(offset + end as u64)
}

/// "12:34:05 message" → "message"
pub fn strip_time(line: &str) -> &str {
    let b = line.as_bytes();
    if b.len() > 9 && b[2] == b':' && b[5] == b':' && b[8] == b' ' {
        &line[9..]
    } else {
        line
    }
}
