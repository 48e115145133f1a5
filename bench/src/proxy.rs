//! The proxy's data path: requests/s and latency through deployd (http and
//! tcp) against the same instance called directly, with keep-alive and with
//! a new connection per request. One Node instance behind each service, so
//! the backend is the same; wrk runs back to back, direct first.

use std::time::Duration;

use crate::env::{Deployd, Wrk, bench_dir, free_port, wrk};
use crate::{Report, verdict};

const SECS: u64 = 5;
const CONNS: u32 = 16;

pub fn run(report: &mut Report) -> Result<(), String> {
    let app = bench_dir().join("apps/app.js");
    let (ph, pt) = (free_port(), free_port());
    let svc = |port: u16, mode: &str| {
        format!(
            "exec exec node {}\nport {port}\nproxy {mode}\nhealth http /healthz\n",
            app.display()
        )
    };
    let d = Deployd::start(&[("h".into(), svc(ph, "http")), ("t".into(), svc(pt, "tcp"))])?;
    for s in ["h", "t"] {
        if !d.settle(s, Duration::from_secs(60)) {
            return Err(format!("service {s} did not deploy"));
        }
    }
    let (direct_h, direct_t) = match (d.ports("h").first(), d.ports("t").first()) {
        (Some(a), Some(b)) => (*a, *b),
        _ => return Err("no instance ports".into()),
    };
    // Warm up both paths (JIT, pools).
    let _ = wrk(direct_h, "/", 1, CONNS, false);
    let _ = wrk(ph, "/", 1, CONNS, false);
    let _ = wrk(pt, "/", 1, CONNS, false);
    for (close, mode, rate_target) in [
        (false, "keep-alive", 0.8),
        (true, "new connection per request", 0.6),
    ] {
        for (name, via, direct) in [("http", ph, direct_h), ("tcp", pt, direct_t)] {
            let base = wrk(direct, "/", SECS, CONNS, close)?;
            let ours = wrk(via, "/", SECS, CONNS, close)?;
            let ratio = ours.rps / base.rps;
            let added = ours.p99_ms - base.p99_ms;
            let p99_target = !close;
            let ok = ratio >= rate_target && (!p99_target || added <= 1.0) && ours.failed == 0;
            report.add(
                "proxy",
                format!("{name} proxy, {mode}"),
                format!(
                    "{:.0} req/s vs {:.0} direct ({:.0}%); p50 {:.2} / p99 {:.2} ms vs {:.2} / {:.2} ms direct{}",
                    ours.rps,
                    base.rps,
                    ratio * 100.0,
                    ours.p50_ms,
                    ours.p99_ms,
                    base.p50_ms,
                    base.p99_ms,
                    errors(&ours)
                ),
                if p99_target {
                    format!("≥ {:.0}% of direct, ≤ +1 ms p99", rate_target * 100.0)
                } else {
                    format!("≥ {:.0}% of direct", rate_target * 100.0)
                },
                verdict(ok),
            );
        }
    }
    Ok(())
}

fn errors(w: &Wrk) -> String {
    if w.failed + w.timeouts > 0 {
        format!("; {} failed, {} timed out", w.failed, w.timeouts)
    } else {
        String::new()
    }
}
