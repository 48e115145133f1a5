//! Rolling update overhead: the wall time of a complete rolling update,
//! against its theoretical minimum, the sum over batches of the slowest
//! start-to-ready time of the batch's instances (each instance writes its
//! own start and ready times) plus min_healthy, update_pause and drain
//! actually needed (all zero here: no traffic, no pause).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::env::{Deployd, sibling};
use crate::{Report, verdict};

/// The instances' simulated initialisation.
const STARTUP_MS: u64 = 50;
/// Target: deployd's own time per batch.
const TARGET_MS: f64 = 20.0;

pub fn run(report: &mut Report) -> Result<(), String> {
    let ready = tempfile::tempdir().map_err(|e| e.to_string())?;
    let d = Deployd::start(&[])?;
    let app = sibling("bench-app");
    for (n, b) in [(3u32, 1u32), (10, 1), (10, 2), (50, 1), (50, 10)] {
        let name = format!("r{n}b{b}");
        let manifest = |tag: &str| {
            format!(
                "exec exec {}\nenv READY_DIR={}\nenv STARTUP_MS={STARTUP_MS}\nenv TAG={tag}\nreplicas {n}\nupdate_batch {b}\nhealth http /healthz\nhealth_deadline 30s\n",
                app.display(),
                ready.path().display()
            )
        };
        d.write_manifest(&name, &manifest("a"));
        d.ctl("ctl", &format!("apply {name}"))?;
        if !d.settle(&name, Duration::from_secs(60)) {
            return Err(format!("{name} did not deploy"));
        }
        let Roll {
            wall,
            minimum,
            batches,
        } = roll(&d, &name, &manifest, ready.path())?;
        let per_batch = Roll::per_batch(wall, minimum, batches);
        report.add(
            "rollout",
            format!("rolling update, {n} instances, batch {b} ({batches} batches)"),
            format!(
                "{:.0} ms wall / {:.0} ms minimum = {:.2}×: {per_batch:.1} ms per batch",
                wall.as_secs_f64() * 1000.0,
                minimum.as_secs_f64() * 1000.0,
                wall.as_secs_f64() / minimum.as_secs_f64()
            ),
            format!("≤ {TARGET_MS:.0} ms per batch"),
            verdict(per_batch <= TARGET_MS),
        );
        d.ctl("ctl", &format!("remove {name}"))?;
    }
    Ok(())
}

/// One rolling update's times.
pub struct Roll {
    /// From the `apply` write to the `wait` answer.
    pub wall: Duration,
    /// The sum over batches of the slowest instance's start to ready.
    pub minimum: Duration,
    pub batches: usize,
}

impl Roll {
    /// deployd's own time per batch, in ms.
    pub fn per_batch(wall: Duration, minimum: Duration, batches: usize) -> f64 {
        (wall.as_secs_f64() - minimum.as_secs_f64()) * 1000.0 / batches.max(1) as f64
    }
}

/// One rolling update of `name` (deployed at `manifest("a")`) to
/// `manifest("b")` on `d`, from its `apply` to its `wait`.
pub fn roll(
    d: &Deployd,
    name: &str,
    manifest: &dyn Fn(&str) -> String,
    ready: &Path,
) -> Result<Roll, String> {
    let events_from = d.read(&format!("active/{name}/events")).len();
    d.write_manifest(name, &manifest("b"));
    let t0 = Instant::now();
    d.ctl(&format!("active/{name}/ctl"), "apply")?;
    let outcome = d.read(&format!("active/{name}/wait"));
    let wall = t0.elapsed();
    if !outcome.starts_with("none ") {
        return Err(format!("{name}: rollout ended with {outcome}"));
    }
    let events = d.read(&format!("active/{name}/events"));
    let batches = batches(&events[events_from.min(events.len())..]);
    let mut minimum = Duration::ZERO;
    for pids in &batches {
        minimum += pids
            .iter()
            .filter_map(|p| start_to_ready(ready, *p))
            .max()
            .ok_or_else(|| format!("{name}: no timing for a batch"))?;
    }
    Ok(Roll {
        wall,
        minimum,
        batches: batches.len(),
    })
}

/// The pids started in each batch, from the event log of one rollout.
pub fn batches(events: &str) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = Vec::new();
    let mut numbers: HashMap<u32, usize> = HashMap::new();
    for line in events.lines() {
        if let Some(rest) = line.split("starting instance").nth(1) {
            let list = rest.trim_start_matches('s').trim();
            let list = list.split(" (").next().unwrap_or("");
            out.push(Vec::new());
            numbers.clear();
            for n in list.split(", ").filter_map(|n| n.trim().parse().ok()) {
                numbers.insert(n, out.len() - 1);
            }
        } else if let Some(rest) = line.split(" instance ").nth(1) {
            // "instance N started (pid P)"
            let mut w = rest.split_whitespace();
            let (Some(n), Some("started"), Some(_), Some(pid)) =
                (w.next(), w.next(), w.next(), w.next())
            else {
                continue;
            };
            let (Ok(n), Ok(pid)) = (n.parse::<u32>(), pid.trim_end_matches(')').parse::<u32>())
            else {
                continue;
            };
            if let Some(&b) = numbers.get(&n) {
                out[b].push(pid);
            }
        }
    }
    out
}

/// An instance's start-to-ready time, as it wrote it.
pub fn start_to_ready(dir: &std::path::Path, pid: u32) -> Option<Duration> {
    let text = std::fs::read_to_string(dir.join(pid.to_string())).ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<u128>());
    let (Some(Ok(start)), Some(Ok(ready))) = (it.next(), it.next()) else {
        return None;
    };
    Some(Duration::from_nanos(ready.saturating_sub(start) as u64))
}

#[cfg(test)]
mod tests {
    #[test]
    fn batches_from_events() {
        let ev = "2026-12-01T10:00:00.100Z rolling update started a → b (3 instances, batch 2)\n2026-12-01T10:00:00.100Z batch 1/2: starting instances 3, 4 (b)\n2026-12-01T10:00:00.100Z instance 3 started (pid 100)\n2026-12-01T10:00:00.100Z instance 4 started (pid 101)\n2026-12-01T10:00:00.100Z instance 3 healthy (0.1s)\n2026-12-01T10:00:01.200Z batch 2/2: starting instance 3 (b)\n2026-12-01T10:00:01.200Z instance 3 started (pid 102)\n";
        assert_eq!(super::batches(ev), vec![vec![100, 101], vec![102]]);
    }
}
