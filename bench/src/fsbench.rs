//! The namespace under reads: open/read/close per second and its p50/p99,
//! for `update_progress` (a status file) and `events` (the log), with one
//! and eight readers, against two references in the same run: the same
//! bytes on tmpfs (the kernel's own speed) and on the minimal FUSE file
//! system (the FUSE floor); then again while a rollout runs.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::env::{Deployd, percentile};
use crate::{Report, hellofs, verdict};

const DURATION: Duration = Duration::from_secs(2);

/// Operations per second, p50 and p99 in microseconds.
#[derive(Clone, Copy)]
struct Figures {
    rate: f64,
    p50: f64,
    p99: f64,
}

/// `threads` readers open, read to the end and close `path` for DURATION.
fn measure(path: &Path, threads: usize) -> Result<Figures, String> {
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let path = path.to_path_buf();
            std::thread::spawn(move || -> Result<Vec<f64>, String> {
                let mut buf = vec![0u8; 1 << 16];
                let mut samples = Vec::with_capacity(100_000);
                let until = Instant::now() + DURATION;
                while Instant::now() < until {
                    let t = Instant::now();
                    let mut f =
                        File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                    while f.read(&mut buf).map_err(|e| e.to_string())? > 0 {}
                    drop(f);
                    samples.push(t.elapsed().as_secs_f64() * 1e6);
                }
                Ok(samples)
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().map_err(|_| "reader panicked".to_string())??);
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.total_cmp(b));
    Ok(Figures {
        rate: all.len() as f64 / secs,
        p50: percentile(&all, 50.0),
        p99: percentile(&all, 99.0),
    })
}

fn show(f: Figures) -> String {
    format!(
        "{:.1}k/s, p50 {:.0} µs, p99 {:.0} µs",
        f.rate / 1000.0,
        f.p50,
        f.p99
    )
}

pub fn run(report: &mut Report) -> Result<(), String> {
    let sleep = "exec exec sleep 100000\nhealth none\n";
    let d = Deployd::start(&[
        ("web".into(), format!("{sleep}replicas 3\n")),
        (
            "roll".into(),
            format!("{sleep}replicas 2\nupdate_pause 200ms\nenv TAG=0\n"),
        ),
    ])?;
    for s in ["web", "roll"] {
        if !d.settle(s, Duration::from_secs(30)) {
            return Err(format!("{s} did not deploy"));
        }
    }
    let files = ["update_progress", "events"];
    let contents: Vec<Vec<u8>> = files
        .iter()
        .map(|f| d.read(&format!("active/web/{f}")).into_bytes())
        .collect();
    let tmp = tempfile::Builder::new()
        .prefix("deployd-bench")
        .tempdir_in("/dev/shm")
        .map_err(|e| e.to_string())?;
    let floor_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let named: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|f| f.to_string())
        .zip(contents.clone())
        .collect();
    for (name, data) in &named {
        std::fs::write(tmp.path().join(name), data).map_err(|e| e.to_string())?;
    }
    let _floor = hellofs::mount(floor_dir.path(), named)?;

    let mut floors = Vec::new();
    for (i, f) in files.iter().enumerate() {
        for threads in [1, 8] {
            let tmpfs = measure(&tmp.path().join(f), threads)?;
            let floor = measure(&floor_dir.path().join(f), threads)?;
            let ours = measure(&d.mnt.join("active/web").join(f), threads)?;
            floors.push((*f, threads, floor));
            row(
                report,
                &format!(
                    "{f} ({} bytes), {threads} reader{}",
                    contents[i].len(),
                    plural(threads)
                ),
                ours,
                floor,
                tmpfs,
            );
        }
    }

    // The same while a rollout of another service runs without a break.
    let stop = Arc::new(AtomicBool::new(false));
    let roller = {
        let (stop, mnt, manifests) = (stop.clone(), d.mnt.clone(), d.manifests.clone());
        std::thread::spawn(move || roll(&stop, &mnt, &manifests, sleep))
    };
    std::thread::sleep(Duration::from_millis(300));
    for (f, threads, floor) in floors.iter().filter(|(f, _, _)| *f == "update_progress") {
        let ours = measure(&d.mnt.join("active/web").join(f), *threads)?;
        row(
            report,
            &format!(
                "{f}, {threads} reader{}, during a rollout",
                plural(*threads)
            ),
            ours,
            *floor,
            Figures {
                rate: f64::NAN,
                p50: f64::NAN,
                p99: f64::NAN,
            },
        );
    }
    stop.store(true, Ordering::SeqCst);
    let rollouts = roller.join().map_err(|_| "roller panicked".to_string())?;
    report.info(
        "namespace",
        "rollouts completed during those reads",
        rollouts.to_string(),
    );
    Ok(())
}

fn row(report: &mut Report, what: &str, ours: Figures, floor: Figures, tmpfs: Figures) {
    let ok = ours.rate >= 0.8 * floor.rate && ours.p99 <= 2.0 * floor.p99;
    let tmpfs = if tmpfs.rate.is_nan() {
        String::new()
    } else {
        format!("; tmpfs {}", show(tmpfs))
    };
    report.add(
        "namespace",
        what.to_string(),
        format!(
            "{} ({:.0}% of floor); FUSE floor {}{tmpfs}",
            show(ours),
            100.0 * ours.rate / floor.rate,
            show(floor)
        ),
        "≥ 80% of floor's rate, p99 ≤ 2× floor's",
        verdict(ok),
    );
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Applies new versions of `roll` back to back until stopped; returns how
/// many completed.
fn roll(stop: &AtomicBool, mnt: &Path, manifests: &Path, base: &str) -> u32 {
    let mut n: u32 = 0;
    let ctl: PathBuf = mnt.join("active/roll/ctl");
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let text = format!("{base}replicas 2\nupdate_pause 200ms\nenv TAG={n}\n");
        if std::fs::write(manifests.join("roll.manifest"), text).is_err()
            || std::fs::write(&ctl, "apply").is_err()
        {
            break;
        }
        let _ = std::fs::read_to_string(mnt.join("active/roll/wait"));
    }
    n.saturating_sub(1)
}
