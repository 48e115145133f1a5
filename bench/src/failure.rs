//! Failure detection: from an instance's crash (SIGKILL, sent here) to the
//! event that says so, to its replacement's start and readiness; and from a
//! bad version's first failed probe to the rollout's `failed`, which should
//! be bounded by `health_deadline`. Then a restart of deployd itself under
//! load, with its public port held by socket activation and without.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::env::{
    Deployd, cpu_ticks, free_port, kill_group, sibling, ticks_per_sec, wait_until, wrk,
};
use crate::{Report, verdict};

const POLL: Duration = Duration::from_millis(1);

pub fn run(report: &mut Report) -> Result<(), String> {
    let app = sibling("bench-app");
    let good = format!(
        "exec exec {}\nreplicas 3\nhealth http /healthz\nhealth_deadline 2s\n",
        app.display()
    );
    let d = Deployd::start(&[("svc".into(), good.clone())])?;
    if !d.settle("svc", Duration::from_secs(30)) {
        return Err("svc did not deploy".into());
    }
    let mut event = Vec::new();
    let mut restart = Vec::new();
    let mut ready = Vec::new();
    for i in 0..3 {
        let dir = format!("active/svc/instances/{i}");
        let pid: u32 = d
            .read(&format!("{dir}/pid"))
            .trim()
            .parse()
            .map_err(|_| "no pid")?;
        let from = d.read("active/svc/events").len();
        let t0 = Instant::now();
        kill_group(pid);
        wait_until(Duration::from_secs(10), POLL, || {
            let e = d.read("active/svc/events");
            e.get(from..)
                .is_some_and(|n| n.contains("exited unexpectedly") || n.contains("unhealthy"))
        })
        .then(|| event.push(t0.elapsed()))
        .ok_or("no event for the crash")?;
        wait_until(Duration::from_secs(10), POLL, || {
            let p = d.read(&format!("{dir}/pid"));
            !p.is_empty() && p.trim() != pid.to_string()
        })
        .then(|| restart.push(t0.elapsed()))
        .ok_or("no restart")?;
        wait_until(Duration::from_secs(10), POLL, || {
            d.read(&format!("{dir}/state")) == "ready\n"
        })
        .then(|| ready.push(t0.elapsed()))
        .ok_or("the replacement did not get ready")?;
    }
    let ms = |v: &[Duration]| {
        let mut x: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        x.sort_by(|a, b| a.total_cmp(b));
        x[x.len() / 2]
    };
    report.info(
        "failure",
        "crash (SIGKILL) → event / restarted / ready, median of 3",
        format!(
            "{:.1} ms / {:.0} ms / {:.0} ms (first restart backoff: 100 ms)",
            ms(&event),
            ms(&restart),
            ms(&ready)
        ),
    );

    // A version that never listens: every probe fails from the start.
    d.write_manifest(
        "svc",
        "exec exec sleep 100000\nreplicas 3\nhealth http /healthz\nhealth_deadline 2s\n",
    );
    d.ctl("active/svc/ctl", "apply")?;
    let mut started: Option<Instant> = None;
    let failed = wait_until(Duration::from_secs(30), POLL, || {
        if started.is_none() && d.read("active/svc/instances/3/state") == "starting\n" {
            started = Some(Instant::now());
        }
        d.read("active/svc/update_status") == "failed\n"
    });
    let (Some(s), true) = (started, failed) else {
        return Err("the bad version did not fail".into());
    };
    let took = s.elapsed().as_secs_f64();
    report.add(
        "failure",
        "bad version: first failed probe → rollout failed (health_deadline 2 s)",
        format!("{took:.3} s ({:.3}× health_deadline)", took / 2.0),
        "≤ health_deadline + 100 ms",
        verdict(took <= 2.1),
    );
    drop(d);
    restarts(report, &app)?;
    reexec(report, &app)?;
    log_flood(report)
}

/// An instance printing as fast as it can (`yes`): how much of a core its
/// output costs deployd, at the default `log_rate` and with none to speak
/// of, and how fast its log grows.
fn log_flood(report: &mut Report) -> Result<(), String> {
    for (what, extra) in [
        ("log_rate 8M, the default", ""),
        ("log_rate 1T (no limit)", "log_rate 1T\n"),
    ] {
        let m = format!(
            "exec exec yes a line of output, some fifty bytes long, again\nlog_max 1T\n{extra}"
        );
        let d = Deployd::start(&[("flood".into(), m)])?;
        if !d.settle("flood", Duration::from_secs(30)) {
            return Err("flood did not deploy".into());
        }
        std::thread::sleep(Duration::from_secs(1));
        let log = d.mnt.join("active/flood/instances/0/log");
        let size = || std::fs::metadata(&log).map_or(0, |m| m.len());
        let (cpu0, size0, t0) = (cpu_ticks(d.pid())?, size(), Instant::now());
        std::thread::sleep(Duration::from_secs(5));
        let (cpu1, size1) = (cpu_ticks(d.pid())?, size());
        let secs = t0.elapsed().as_secs_f64();
        let cores = (cpu1 - cpu0) as f64 / ticks_per_sec() / secs;
        report.info(
            "failure",
            format!("an instance printing as fast as it can (yes), {what}"),
            format!(
                "deployd {:.0}% of a core; its log grows {:.1} MB/s (stamps included)",
                cores * 100.0,
                size1.saturating_sub(size0) as f64 / secs / 1e6
            ),
        );
    }
    Ok(())
}

/// `reexec` under wrk's load (a new connection per request): deployd
/// replaces itself, its ports and instances kept.
fn reexec(report: &mut Report, app: &std::path::Path) -> Result<(), String> {
    let port = free_port();
    let manifest = format!(
        "exec exec {}\nreplicas 2\nport {port}\nproxy http\nhealth http /healthz\n",
        app.display()
    );
    let d = Deployd::start_with_socket(&[("web".into(), manifest)], None)?;
    if !d.settle("web", Duration::from_secs(30)) {
        return Err("web did not deploy".into());
    }
    let pids = |d: &Deployd| [0, 1].map(|n| d.read(&format!("active/web/instances/{n}/pid")));
    let before = pids(&d);
    let load = std::thread::spawn(move || wrk(port, "/", 6, 16, true));
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    d.ctl("ctl", "reexec")?;
    let back = wait_until(Duration::from_secs(30), Duration::from_millis(1), || {
        d.read("active/web/events").contains("kept running")
    });
    let took = t0.elapsed().as_secs_f64();
    let w = load
        .join()
        .map_err(|_| "wrk thread panicked".to_string())??;
    if !back {
        return Err("deployd did not come back after reexec".into());
    }
    let kept = pids(&d)
        .iter()
        .zip(&before)
        .filter(|(a, b)| a == b && !a.is_empty())
        .count();
    report.add(
        "failure",
        "reexec of deployd under load (new connection per request): it replaces itself, keeping ports and instances",
        format!(
            "{} failed, {} hung of {}; p99 {:.1} ms; back in {took:.3} s; {kept} of 2 instances kept (same pids)",
            w.failed, w.timeouts, w.requests, w.p99_ms
        ),
        "0 failed, 0 hung, every instance kept",
        verdict(w.failed == 0 && w.timeouts == 0 && kept == 2),
    );
    Ok(())
}

/// A restart of deployd (SIGTERM, then started again, as an upgrade does)
/// under wrk's load, a new connection per request: with the public port
/// held by socket activation, the connections that arrive meanwhile wait;
/// with deployd binding the port itself, they are refused.
fn restarts(report: &mut Report, app: &std::path::Path) -> Result<(), String> {
    // (port held by socket activation, a new connection per request)
    for (passed, close) in [(true, true), (false, true), (true, false)] {
        let port = free_port();
        let socket = match passed {
            true => Some(
                std::net::TcpListener::bind(("127.0.0.1", port))
                    .map_err(|e| format!("cannot bind port {port}: {e}"))?,
            ),
            false => None,
        };
        let manifest = format!(
            "exec exec {}\nreplicas 2\nport {port}\nproxy http\nhealth http /healthz\n",
            app.display()
        );
        let fd = socket.as_ref().map(|s| s.as_raw_fd());
        let mut d = Deployd::start_with_socket(&[("web".into(), manifest)], fd)?;
        if !d.settle("web", Duration::from_secs(30)) {
            return Err("web did not deploy".into());
        }
        let load = std::thread::spawn(move || wrk(port, "/", 6, 16, close));
        std::thread::sleep(Duration::from_secs(2));
        let t0 = Instant::now();
        d.restart()?;
        if !d.settle("web", Duration::from_secs(30)) {
            return Err("web did not come back after the restart".into());
        }
        let back = t0.elapsed().as_secs_f64();
        let w = load
            .join()
            .map_err(|_| "wrk thread panicked".to_string())??;
        let figure = format!(
            "{} failed, {} hung of {}; p99 {:.1} ms; deployd stopped, started and ready again in {back:.2} s",
            w.failed, w.timeouts, w.requests, w.p99_ms
        );
        if !close {
            report.add(
                "failure",
                "the same under keep-alive load, port held by socket activation",
                figure,
                "0 failed, 0 hung",
                verdict(w.failed == 0 && w.timeouts == 0),
            );
        } else if passed {
            report.add(
                "failure",
                "restart of deployd under load (new connection per request), port held by socket activation",
                figure,
                "0 failed, 0 hung",
                verdict(w.failed == 0 && w.timeouts == 0),
            );
        } else {
            report.info("failure", "the same, port bound by deployd itself", figure);
        }
    }
    Ok(())
}
