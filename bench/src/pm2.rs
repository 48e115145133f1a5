//! Zero downtime against PM2: the same naive Node app (bench/apps/app.js),
//! 4 instances under deployd and 4 in PM2's cluster mode, the same wrk load
//! (keep-alive, then a new connection per request); three seconds in, a
//! rolling update (`deploy apply`) or `pm2 reload`. Counted: failed requests
//! (socket errors and non-2xx), hung ones (wrk timeouts), requests/s, and
//! the update's wall time.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::env::{Deployd, Wrk, bench_dir, free_port, wait_until, wrk};
use crate::{Report, verdict};

const SECS: u64 = 10;
const CONNS: u32 = 16;

struct Run {
    load: Wrk,
    update: Duration,
}

/// Runs wrk for SECS and calls `update` three seconds in.
fn under_load(
    port: u16,
    close: bool,
    update: impl FnOnce() -> Result<(), String>,
) -> Result<Run, String> {
    let load = std::thread::spawn(move || wrk(port, "/", SECS, CONNS, close));
    std::thread::sleep(Duration::from_secs(3));
    let t0 = Instant::now();
    update()?;
    let took = t0.elapsed();
    let load = load
        .join()
        .map_err(|_| "wrk thread panicked".to_string())??;
    Ok(Run { load, update: took })
}

fn app() -> PathBuf {
    bench_dir().join("apps/app.js")
}

fn describe(r: &Run) -> String {
    format!(
        "{} failed, {} hung of {}; {:.0} req/s; update took {:.1} s",
        r.load.failed,
        r.load.timeouts,
        r.load.requests,
        r.load.rps,
        r.update.as_secs_f64()
    )
}

pub fn run(report: &mut Report) -> Result<(), String> {
    // deployd
    let port = free_port();
    let manifest = |tag: &str| {
        format!(
            "exec exec node {}\nenv TAG={tag}\nreplicas 4\nport {port}\nproxy http\nhealth http /healthz\nhealth_interval 500ms\n",
            app().display()
        )
    };
    let mut ours = Vec::new();
    {
        let d = Deployd::start(&[("app".to_string(), manifest("a"))])?;
        if !d.settle("app", Duration::from_secs(60)) {
            return Err("the Node app did not deploy under deployd".into());
        }
        for (i, close) in [false, true].into_iter().enumerate() {
            let tag = format!("v{i}");
            let r = under_load(port, close, || {
                d.write_manifest("app", &manifest(&tag));
                d.ctl("active/app/ctl", "apply")?;
                let out = d.read("active/app/wait");
                out.starts_with("none ").then_some(()).ok_or(out)
            })?;
            ours.push(r);
        }
    }

    // PM2
    let theirs = match pm2_runs() {
        Ok(r) => Some(r),
        Err(e) => {
            report.info("pm2", "PM2 reference", format!("skipped: {e}"));
            None
        }
    };
    for (i, mode) in ["keep-alive", "new connection per request"]
        .iter()
        .enumerate()
    {
        let o = &ours[i];
        let clean = o.load.failed == 0 && o.load.timeouts == 0;
        let (target, ok) = match &theirs {
            Some(t) => {
                let p = &t[i];
                report.info(
                    "pm2",
                    format!("pm2 reload, 4 instances, {mode}"),
                    describe(p),
                );
                (
                    format!("0 failed, 0 hung, ≥ PM2's {:.0} req/s", p.load.rps),
                    clean && o.load.rps >= p.load.rps,
                )
            }
            None => ("0 failed, 0 hung".to_string(), clean),
        };
        let ratio = theirs
            .as_ref()
            .map(|t| format!(" ({:.2}× PM2)", o.load.rps / t[i].load.rps))
            .unwrap_or_default();
        report.add(
            "pm2",
            format!("deployd rolling update, 4 instances, {mode}"),
            format!("{}{ratio}", describe(o)),
            target,
            verdict(ok),
        );
    }
    Ok(())
}

/// Installs PM2 into bench/.cache/pm2 (once) and measures its reload.
fn pm2_runs() -> Result<Vec<Run>, String> {
    let prefix = bench_dir().join(".cache/pm2");
    let bin = prefix.join("node_modules/.bin/pm2");
    if !bin.exists() {
        eprintln!("  installing PM2 with npm into {}", prefix.display());
        let ok = Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&prefix)
            .arg("pm2")
            .status()
            .map_err(|e| format!("npm is not available ({e})"))?
            .success();
        if !ok || !bin.exists() {
            return Err("npm could not install pm2".into());
        }
    }
    let home = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port = free_port();
    let pm2 = |args: &[&str], tag: &str| -> Result<(), String> {
        let out = Command::new(&bin)
            .args(args)
            .env("PM2_HOME", home.path())
            .env("PORT", port.to_string())
            .env("TAG", tag)
            .output()
            .map_err(|e| e.to_string())?;
        out.status
            .success()
            .then_some(())
            .ok_or_else(|| format!("pm2 {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    let app = app();
    let app = app.to_string_lossy();
    let result = (|| {
        pm2(&["start", &app, "-i", "4", "--name", "app"], "a")?;
        if !wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
            answers(port)
        }) {
            return Err("the app under PM2 does not answer".into());
        }
        std::thread::sleep(Duration::from_secs(1));
        let mut runs = Vec::new();
        for (i, close) in [false, true].into_iter().enumerate() {
            let tag = format!("v{i}");
            runs.push(under_load(port, close, || {
                pm2(&["reload", "app", "--update-env"], &tag)
            })?);
        }
        Ok(runs)
    })();
    let _ = pm2(&["kill"], "a");
    result
}

fn answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && &buf[9..12] == b"200"
}
