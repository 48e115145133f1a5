//! Followers: how soon `deploy events -f` prints a line after deployd
//! appends it, and what it costs while nothing happens. deployd lets a
//! reader `poll` the `events` file and tells the kernel at each append;
//! the reference is a reader that reads the file again every 200 ms (what
//! `deploy events -f` did before), measured in the same run.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::env::{self, Deployd, percentile, sibling};
use crate::{Report, verdict};

const SECTION: &str = "follow";
/// Events appended per run, a few milliseconds apart.
const EVENTS: usize = 300;

/// Appends one event to the service's log: a refused command is said in
/// its events at once.
fn append(d: &Deployd, i: usize) {
    let _ = d.ctl("active/w/ctl", &format!("bench-{i}\n"));
}

/// `deploy ARGS` on `d`'s namespace, and the lines it prints.
fn follower(
    d: &Deployd,
    args: &[&str],
) -> Result<
    (
        std::process::Child,
        std::io::Lines<BufReader<std::process::ChildStdout>>,
    ),
    String,
> {
    let mut child = Command::new(sibling("deploy"))
        .args(args)
        .env("DEPLOY_ROOT", &d.mnt)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("deploy {}: {e}", args.join(" ")))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    Ok((child, BufReader::new(out).lines()))
}

pub fn run(report: &mut Report) -> Result<(), String> {
    // `w` for events; `talk`, for logs, prints the time (UTC, in seconds)
    // every 50 ms.
    let talk = "exec python3 -c 'import time; [(print(repr(time.time()), flush=True), time.sleep(0.05)) for _ in iter(int, 1)]'\nhealth exec true\n";
    let d = Deployd::start(&[
        (
            "w".to_string(),
            "exec sleep 100000\nhealth exec true\n".to_string(),
        ),
        ("talk".to_string(), talk.to_string()),
    ])?;
    if !d.settle("w", Duration::from_secs(30)) || !d.settle("talk", Duration::from_secs(30)) {
        return Err("w or talk did not settle".into());
    }
    let logs = logs_latency(&d)?;
    let (mut child, mut lines) = follower(&d, &["events", "w", "-f", "-n", "0"])?;
    std::thread::sleep(Duration::from_millis(300));
    let mut took = Vec::with_capacity(EVENTS);
    for i in 0..EVENTS {
        let t = Instant::now();
        append(&d, i);
        // Its line, and the one a refused write may add; the first that
        // names this write.
        loop {
            let line = lines
                .next()
                .ok_or("the follower ended")?
                .map_err(|e| e.to_string())?;
            if line.contains(&format!("'bench-{i}'")) {
                break;
            }
        }
        took.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(3 + (i % 7) as u64));
    }
    took.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&took, 50.0), percentile(&took, 99.0));

    // Idle: what the follower costs in 10 s with nothing appended.
    let pid = child.id();
    let before = env::cpu_ticks(pid)?;
    std::thread::sleep(Duration::from_secs(10));
    let idle = (env::cpu_ticks(pid)? - before) as f64 / env::ticks_per_sec();
    let _ = child.kill();
    let _ = child.wait();

    // The reference: a reader of its own clock, reading again every
    // 200 ms, telling when it saw the file change.
    let path = d.mnt.join("active/w/events");
    let (tx, rx) = std::sync::mpsc::channel();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || {
            let len = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let mut seen = len();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let now = len();
                if now != seen {
                    seen = now;
                    let _ = tx.send(Instant::now());
                }
            }
        })
    };
    let mut polled = Vec::new();
    for i in 0..25 {
        // Out of phase with the reader's 200 ms.
        std::thread::sleep(Duration::from_millis(37 * (i as u64 % 5) + 11));
        let t = Instant::now();
        append(&d, EVENTS + i);
        let seen = rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| "the re-reading reference saw nothing")?;
        polled.push(seen.saturating_duration_since(t).as_secs_f64() * 1000.0);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = poller.join();
    polled.sort_by(f64::total_cmp);
    report.add(
        SECTION,
        "append to printed line, deploy events -f (p50 / p99)",
        format!(
            "{p50:.2} / {p99:.2} ms (re-reading every 200 ms: {:.0} / {:.0} ms)",
            percentile(&polled, 50.0),
            percentile(&polled, 99.0)
        ),
        "p99 ≤ 10 ms",
        verdict(p99 <= 10.0),
    );
    report.add(
        SECTION,
        "output line to printed line, deploy logs -f (p50 / p99)",
        format!("{:.2} / {:.2} ms", logs.0, logs.1),
        "p99 ≤ 10 ms",
        verdict(logs.1 <= 10.0),
    );
    report.add(
        SECTION,
        "idle follower, CPU over 10 s",
        format!("{:.3} s", idle),
        "≈ 0 (≤ 0.01 s)",
        verdict(idle <= 0.01),
    );
    d.finish();
    Ok(())
}

/// From the moment `talk` printed a line (the time it prints) to the
/// moment `deploy logs talk 0 -f` printed it: p50 and p99 of 200, in ms.
fn logs_latency(d: &Deployd) -> Result<(f64, f64), String> {
    let (mut child, mut lines) = follower(d, &["logs", "talk", "0", "-f", "-n", "0"])?;
    let mut took = Vec::new();
    while took.len() < 200 {
        let line = lines
            .next()
            .ok_or("the follower ended")?
            .map_err(|e| e.to_string())?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs_f64();
        let printed: f64 = line
            .trim()
            .parse()
            .map_err(|_| format!("unexpected line {line:?}"))?;
        took.push((now - printed) * 1000.0);
    }
    let _ = child.kill();
    let _ = child.wait();
    took.sort_by(f64::total_cmp);
    Ok((percentile(&took, 50.0), percentile(&took, 99.0)))
}
