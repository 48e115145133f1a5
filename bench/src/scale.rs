//! Scale: 1,000 services of 2 instances each (a sleeping program): time to
//! deploy them all from a clean start, deployd's memory and CPU once idle,
//! and how fast `deploy status` and `ls /deploy/active` list them.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::env::{Deployd, cpu_ticks, percentile, rss_kib, sibling, ticks_per_sec, wait_until};
use crate::{Report, verdict};

const SERVICES: usize = 1000;

/// `ls -l /deploy/active` of 1,000 services at most this long: the
/// kernel keeps the services' directories' attributes.
const LS_MS: f64 = 5.0;

pub fn run(report: &mut Report) -> Result<(), String> {
    let manifests: Vec<(String, String)> = (0..SERVICES)
        .map(|i| {
            (
                format!("s{i:04}"),
                "exec exec sleep 100000\nreplicas 2\nhealth none\n".to_string(),
            )
        })
        .collect();
    let t0 = Instant::now();
    let d = Deployd::start(&manifests)?;
    let all_up = wait_until(Duration::from_secs(300), Duration::from_millis(50), || {
        let s = d.read("status");
        s.lines().count() == SERVICES && s.lines().all(|l| l.ends_with(" none 2/2 2/2 running"))
    });
    if !all_up {
        return Err("the 1,000 services did not all come up within 300 s".into());
    }
    report.info(
        "scale",
        "deploy 1,000 services × 2 instances from a clean start",
        format!("{:.1} s (2,000 processes)", t0.elapsed().as_secs_f64()),
    );
    std::thread::sleep(Duration::from_secs(3));
    let pid = d.pid();
    let cpu0 = cpu_ticks(pid)?;
    let w0 = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let cpu =
        (cpu_ticks(pid)? - cpu0) as f64 / ticks_per_sec() / w0.elapsed().as_secs_f64() * 100.0;
    let rss = rss_kib(pid)? / 1024.0;
    report.add(
        "scale",
        "deployd RSS, idle, 1,000 services",
        format!("{rss:.1} MB ({:.2}× the target)", rss / 100.0),
        "< 100 MB",
        verdict(rss < 100.0),
    );
    report.add(
        "scale",
        "deployd CPU, idle, 1,000 services",
        format!("{cpu:.2}% of a core ({:.2}× the target)", cpu / 1.0),
        "< 1%",
        verdict(cpu < 1.0),
    );

    let deploy = sibling("deploy");
    let mut times = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let out = Command::new(&deploy)
            .arg("--root")
            .arg(&d.mnt)
            .arg("status")
            .output()
            .map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        if String::from_utf8_lossy(&out.stdout).lines().count() != SERVICES + 1 {
            return Err("deploy status did not list every service".into());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let status_ms = percentile(&times, 50.0);
    report.add(
        "scale",
        "deploy status, 1,000 services (median of 7)",
        format!("{status_ms:.1} ms ({:.3}× the target)", status_ms / 200.0),
        "< 200 ms",
        verdict(status_ms < 200.0),
    );

    let mut ls = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let out = Command::new("ls")
            .arg("-l")
            .arg(d.mnt.join("active"))
            .output()
            .map_err(|e| e.to_string())?;
        ls.push(t.elapsed().as_secs_f64() * 1000.0);
        if String::from_utf8_lossy(&out.stdout).lines().count() != SERVICES + 1 {
            return Err("ls did not list every service".into());
        }
    }
    ls.sort_by(|a, b| a.total_cmp(b));
    let ls_ms = percentile(&ls, 50.0);
    // The reference: the same `ls -l` of 1,000 directories on the disk's
    // own file system, in the same run (what `ls` itself costs here).
    let local = tempfile::tempdir().map_err(|e| e.to_string())?;
    for i in 0..SERVICES {
        std::fs::create_dir(local.path().join(format!("s{i:04}"))).map_err(|e| e.to_string())?;
    }
    let mut disk = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        Command::new("ls")
            .arg("-l")
            .arg(local.path())
            .output()
            .map_err(|e| e.to_string())?;
        disk.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    disk.sort_by(|a, b| a.total_cmp(b));
    let disk_ms = percentile(&disk, 50.0);
    report.add(
        "scale",
        "ls -l /deploy/active, 1,000 services (median of 7)",
        format!(
            "{ls_ms:.1} ms ({:.2}× the target); 1,000 directories on the disk's file system {disk_ms:.1} ms",
            ls_ms / LS_MS
        ),
        format!("≤ {LS_MS:.0} ms"),
        verdict(ls_ms <= LS_MS),
    );
    Ok(())
}
