//! Following a rollout to its end, like `kubectl rollout status`: print the
//! service's new events as they come, until a read of its `wait` file
//! returns the outcome.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::ns::{self, NOT_RUNNING, Ns};
use crate::status::Traffic;
use crate::tail::Cursor;
use crate::{Exit, Fail};

/// Where things stood just before a command: where to follow the event
/// log from, and the traffic counters to compare with at the end.
pub struct Start {
    offset: u64,
    started: Instant,
    traffic: Option<Traffic>,
    /// `--timeout`: how long to follow before giving up.
    limit: Option<Duration>,
    /// `--no-watch`: done once the new version is in place.
    no_watch: bool,
}

impl Start {
    /// Now, for the service whose directory is `dir` (which need not exist
    /// yet: a first apply).
    pub fn now(dir: &Path) -> Start {
        Start {
            offset: std::fs::metadata(dir.join("events")).map_or(0, |m| m.len()),
            started: Instant::now(),
            traffic: Traffic::read(dir),
            limit: None,
            no_watch: false,
        }
    }

    /// With `--timeout`, if given.
    pub fn limit(self, limit: Option<Duration>) -> Start {
        Start { limit, ..self }
    }

    /// With `--no-watch`: done at `update_status` `watching`.
    pub fn no_watch(self, no_watch: bool) -> Start {
        Start { no_watch, ..self }
    }
}

impl Start {
    /// For a service that did not exist before the command: from its first
    /// event, with no traffic to compare with.
    fn fresh() -> Start {
        Start {
            offset: 0,
            started: Instant::now(),
            traffic: None,
            limit: None,
            no_watch: false,
        }
    }
}

/// `deploy apply` without a service: `apply` on the root ctl, which rolls
/// out every manifest of deployd's manifests directory or, if one is
/// invalid or refused, none; then follows every rollout it started, side by
/// side. Fails if any of them does.
pub fn apply_all(ns: &Ns, no_wait: bool, limit: Option<Duration>) -> Result<Exit, Fail> {
    let mut before: HashMap<String, Start> = ns
        .services()
        .into_iter()
        .map(|name| {
            let start = Start::now(&ns.service_path(&name));
            (name, start)
        })
        .collect();
    let msg = ns
        .ctl_root("apply\n")
        .map_err(|f| crate::refused("apply", f))?;
    let Answer {
        started,
        unchanged,
        unlisted,
        not_started,
    } = parse_apply_all(&msg);
    for s in &unchanged {
        say!("{s}: unchanged");
    }
    for s in &unlisted {
        tell!(
            "deploy: {s}: runs without a manifest file; left as it is (deploy remove {s} removes it)"
        );
    }
    for why in &not_started {
        tell!("deploy: not started: {why}");
    }
    let failed = if not_started.is_empty() {
        Exit::Ok
    } else {
        Exit::Failed
    };
    if no_wait {
        for s in &started {
            say!("{s}: started");
        }
        return Ok(failed);
    }
    let followers: Vec<_> = started
        .into_iter()
        .map(|service| {
            let start = before
                .remove(&service)
                .unwrap_or_else(Start::fresh)
                .limit(limit);
            let dir = ns.service_path(&service);
            std::thread::spawn(move || {
                let r = follow(&service, &dir, start, What::Deploy);
                (service, r)
            })
        })
        .collect();
    let mut exit = Ok(failed);
    for f in followers {
        let r = f
            .join()
            .unwrap_or_else(|_| ("?".into(), Err(Fail::new(1, "follower panicked".into()))));
        match r.1 {
            Ok(Exit::Ok) => {}
            Ok(Exit::Failed) => {
                if exit.is_ok() {
                    exit = Ok(Exit::Failed);
                }
            }
            Err(f) => {
                tell!("deploy: {}", f.message);
                exit = Err(Fail::new(
                    f.code,
                    format!("{}: not followed to its end", r.0),
                ));
            }
        }
    }
    exit
}

/// The answer of `apply` on the root ctl, part by part.
#[derive(Debug, Default, PartialEq)]
struct Answer {
    started: Vec<String>,
    unchanged: Vec<String>,
    /// Services that run without a manifest file.
    unlisted: Vec<String>,
    /// The reasons of those not started.
    not_started: Vec<String>,
}

/// `started: a, b; unchanged: c; no manifest: d; not started: REASON`;
/// parts it does not know are skipped.
fn parse_apply_all(msg: &str) -> Answer {
    let mut a = Answer::default();
    for part in msg.trim().split("; ") {
        let (list, names) = match part.split_once(": ") {
            Some(("started", names)) => (&mut a.started, names),
            Some(("unchanged", names)) => (&mut a.unchanged, names),
            Some(("no manifest", names)) => (&mut a.unlisted, names),
            Some(("not started", why)) => {
                a.not_started.push(why.to_string());
                continue;
            }
            _ => continue,
        };
        list.extend(names.split(", ").map(|n| n.trim().to_string()));
    }
    a
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
    /// restart N
    RestartInstance(u32),
}

/// Prints events from `start` until the rollout settles, then what the
/// service's port served meanwhile (so that whether the rollout cost any
/// client anything is right there), then the outcome; returns the exit.
pub fn follow(service: &str, dir: &Path, start: Start, what: What) -> Result<Exit, Fail> {
    let Start {
        offset,
        started,
        traffic,
        limit,
        no_watch,
    } = start;
    let mut events = Cursor::at(offset);
    // A file's mtime comes from a coarser clock.
    let now = std::time::SystemTime::now();
    let since = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
    let (tx, rx) = mpsc::channel();
    let wait = dir.join("wait");
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read_to_string(&wait));
    });
    // Not locked for the whole rollout: `apply` of every manifest follows
    // several side by side, a line at a time.
    let mut out = std::io::stdout();
    let mut waiter = crate::tail::Waiter::default();
    let outcome = loop {
        let new = print_events(&mut out, service, dir, &mut events)?;
        if let Some(limit) = limit.filter(|l| started.elapsed() >= *l) {
            let (status, progress) = (
                ns::read_field(dir, "update_status"),
                ns::read_field(dir, "update_progress"),
            );
            tell!(
                "{service}: not over after {} (--timeout): {status} at {progress}; deployd goes on with it (deploy status {service}, or deploy pause|rollback {service})",
                deployd_lib::manifest::format_duration(limit)
            );
            return Ok(Exit::Failed);
        }
        if no_watch && ns::read_field(dir, "update_status") == "watching" {
            break Ok(format!("watching {}", ns::read_field(dir, "version")));
        }
        match rx.try_recv() {
            Ok(r) => break r,
            Err(mpsc::TryRecvError::Disconnected) => {
                return Err(Fail::new(1, "lost track of the rollout".into()));
            }
            // The next event as it is appended (or 100 ms, to look at
            // the rollout's end and the timeout).
            Err(mpsc::TryRecvError::Empty) => {
                let at = [(dir.join("events"), events.offset())];
                waiter.wait(&at, Duration::from_millis(100), new);
            }
        }
    };
    print_events(&mut out, service, dir, &mut events)?;
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
        match what {
            What::Deploy => writeln!(out, "{service}: deployed {v} ({took})")?,
            What::Rollback => writeln!(out, "{service}: rolled back to {v} ({took})")?,
            What::Restart => writeln!(out, "{service}: restarted {v} ({took})")?,
            What::RestartInstance(n) => {
                writeln!(out, "{service}: restarted instance {n} ({v}, {took})")?
            }
        }
        Ok(Exit::Ok)
    } else if let Some(v) = line.strip_prefix("watching ") {
        writeln!(
            out,
            "{service}: deployed {v} ({took}); watched for its update_watch still (deploy status {service})"
        )?;
        Ok(Exit::Ok)
    } else if line.starts_with("paused ") {
        let progress = ns::read_field(dir, "update_progress");
        tell!("{service}: paused at {progress}; go on with: deploy resume {service}");
        Ok(Exit::Failed)
    } else if line.starts_with("canary ") {
        let progress = ns::read_field(dir, "update_progress");
        tell!(
            "{service}: held at its canary ({progress}); go on with: deploy promote {service} (or deploy rollback {service})"
        );
        Ok(Exit::Failed)
    } else {
        let reason = line.strip_prefix("failed: ").unwrap_or(&line);
        tell!("{service}: failed: {reason}");
        if reason.starts_with("before_deploy failed") || reason.starts_with("after_deploy failed") {
            tell!("{service}: what the hook printed: deploy logs {service} --hooks");
        }
        // The events showed the last lines of what the failed instance
        // printed; say where the rest is, if it printed in this rollout.
        let log = std::fs::metadata(dir.join("failed_log"));
        if log.is_ok_and(|m| m.len() > 0 && m.modified().is_ok_and(|t| t >= since)) {
            tell!("{service}: all it printed: deploy logs {service} --failed");
        }
        Ok(Exit::Failed)
    }
}

/// What `deploy stop`, `start` and `remove` wait for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// No instance left running.
    Stopped,
    /// Every slot runs a ready instance (or the service waits for what it
    /// comes after).
    Started,
    /// The service is gone from the namespace.
    Removed,
}

impl Until {
    /// The ctl command that gets there.
    pub fn command(self) -> &'static str {
        match self {
            Until::Stopped => "stop",
            Until::Started => "start",
            Until::Removed => "remove",
        }
    }

    /// What the service is once there.
    fn done(self) -> &'static str {
        match self {
            Until::Stopped => "stopped",
            Until::Started => "started",
            Until::Removed => "removed",
        }
    }
}

/// Prints the service's events from `start` until `until` holds, then says
/// so. Gives up (exit 1) once the manifest says it should have happened
/// (`drain` then `stop_timeout` for a stop, `health_deadline` for a start)
/// and ten seconds more.
pub fn until(
    service: &str,
    dir: &Path,
    start: Start,
    until: Until,
    answer: &str,
) -> Result<Exit, Fail> {
    let Start {
        offset,
        started,
        limit,
        ..
    } = start;
    let mut events = Cursor::at(offset);
    let mut printed = false;
    let m = std::fs::read(dir.join("manifest"))
        .ok()
        .and_then(|text| deployd_lib::manifest::parse(&text).ok());
    let limit = limit.unwrap_or_else(|| {
        match until {
            Until::Stopped | Until::Removed => m.map(|m| m.drain + m.stop_timeout),
            Until::Started => m.map(|m| m.health_deadline),
        }
        .unwrap_or(Duration::from_secs(60))
            + Duration::from_secs(10)
    });
    let mut out = std::io::stdout();
    loop {
        printed |= print_events(&mut out, service, dir, &mut events)?;
        if reached(dir, until)? {
            break;
        }
        if started.elapsed() > limit {
            let (state, progress) = (
                ns::read_field(dir, "state"),
                ns::read_field(dir, "update_progress"),
            );
            tell!(
                "{service}: not {} after {} ({state}, {progress} ready); see deploy status {service}",
                until.done(),
                deployd_lib::manifest::format_duration(limit)
            );
            return Ok(Exit::Failed);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The answer is the first event; a service removed before its events
    // could be read has only the answer to say it.
    if !printed {
        writeln!(out, "{service}: {answer}")?;
    }
    let took = format!("{:.1}s", started.elapsed().as_secs_f64());
    if until == Until::Started && ns::read_field(dir, "state") == "waiting" {
        writeln!(
            out,
            "{service}: started; waiting for the services it comes after (deploy status {service})"
        )?;
    } else {
        writeln!(out, "{service}: {} ({took})", until.done())?;
    }
    Ok(Exit::Ok)
}

/// Whether `until` holds now. The namespace gone (deployd stopped) is a
/// failure, not a removal.
fn reached(dir: &Path, until: Until) -> Result<bool, Fail> {
    let gone = |e: std::io::Error| -> Result<bool, Fail> {
        match e.kind() {
            std::io::ErrorKind::NotFound if until == Until::Removed => Ok(true),
            _ => Err(Fail::new(NOT_RUNNING, format!("{}: {e}", dir.display()))),
        }
    };
    match until {
        Until::Removed => match std::fs::metadata(dir) {
            Ok(_) => Ok(false),
            Err(e) => gone(e),
        },
        Until::Stopped => {
            let numbers = match ns::instance_numbers(&dir.join("instances")) {
                Ok(n) => n,
                Err(e) => return gone(e),
            };
            // An exited instance (restart never) stays listed; it runs not.
            Ok(numbers
                .iter()
                .all(|n| ns::read_field(&dir.join(format!("instances/{n}")), "state") == "exited"))
        }
        Until::Started => {
            let state = match std::fs::read_to_string(dir.join("state")) {
                Ok(s) => s,
                Err(e) => return gone(e),
            };
            // Every slot ready, of whichever version: after a failed
            // rollout the slots run the version before the target, which
            // update_progress does not count.
            let replicas = ns::read_field(dir, "update_progress")
                .split_once('/')
                .and_then(|(_, n)| n.parse::<usize>().ok());
            let numbers = ns::instance_numbers(&dir.join("instances")).unwrap_or_default();
            let ready = numbers
                .iter()
                .filter(|n| ns::read_field(&dir.join(format!("instances/{n}")), "state") == "ready")
                .count();
            let all = replicas.is_some_and(|n| ready >= n);
            Ok(state.trim_end() == "waiting" || (state.trim_end() == "running" && all))
        }
    }
}

/// Prints the event lines after the cursor as `service: message`; whether
/// there were any.
fn print_events(
    out: &mut impl Write,
    service: &str,
    dir: &Path,
    events: &mut Cursor,
) -> Result<bool, Fail> {
    let new = events.read(&dir.join("events"), true).unwrap_or_default();
    for line in String::from_utf8_lossy(&new).lines() {
        let msg = strip_time(line);
        writeln!(out, "{service}: {msg}")?;
    }
    out.flush()?;
    Ok(!new.is_empty())
}

/// "2026-12-01T12:34:05.123Z message" → "message"; also the
/// "12:34:05 message" of the lines an older deployd left in the log.
pub fn strip_time(line: &str) -> &str {
    let b = line.as_bytes();
    if let Some((_, rest)) = deployd_lib::stamp::split(line) {
        rest
    } else if b.len() > 8 && b[8] == b' ' && b[2] == b':' && b[5] == b':' {
        &line[9..]
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::{Answer, parse_apply_all, strip_time};

    #[test]
    fn strips_the_time_of_an_event_line() {
        assert_eq!(
            strip_time("2026-12-01T12:34:05.123Z instance 3 healthy (0.1s)"),
            "instance 3 healthy (0.1s)"
        );
        assert_eq!(
            strip_time("12:34:05 instance 3 healthy"),
            "instance 3 healthy"
        );
        // Not a time: left whole.
        assert_eq!(strip_time("2026-12-01 instance"), "2026-12-01 instance");
        assert_eq!(strip_time("12:34:05"), "12:34:05");
        assert_eq!(strip_time("é"), "é");
    }

    #[test]
    fn reads_what_apply_of_every_manifest_did() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let answer =
            |started: &[&str], unchanged: &[&str], unlisted: &[&str], why: &[&str]| Answer {
                started: s(started),
                unchanged: s(unchanged),
                unlisted: s(unlisted),
                not_started: s(why),
            };
        assert_eq!(
            parse_apply_all("started: api, web; unchanged: worker\n"),
            answer(&["api", "web"], &["worker"], &[], &[])
        );
        assert_eq!(
            parse_apply_all("unchanged: a"),
            answer(&[], &["a"], &[], &[])
        );
        assert_eq!(parse_apply_all("started: a"), answer(&["a"], &[], &[], &[]));
        assert_eq!(parse_apply_all(""), Answer::default());
        assert_eq!(
            parse_apply_all("unchanged: a; no manifest: b, c"),
            answer(&[], &["a"], &["b", "c"], &[])
        );
        // A part a newer deployd adds is skipped.
        assert_eq!(
            parse_apply_all("started: a; later: x"),
            answer(&["a"], &[], &[], &[])
        );
        let full =
            "cannot save the state of b (nothing changed): No space left on device (os error 28)";
        assert_eq!(
            parse_apply_all(&format!("started: a; not started: {full}\n")),
            answer(&["a"], &[], &[], &[full])
        );
    }
}
