//! Failure detection: from an instance's crash (SIGKILL, sent here) to the
//! event that says so, to its replacement's start and readiness; and from a
//! bad version's first failed probe to the rollout's `failed`, which should
//! be bounded by `health_deadline`.

use std::time::{Duration, Instant};

use crate::env::{Deployd, kill_group, sibling, wait_until};
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
    Ok(())
}
