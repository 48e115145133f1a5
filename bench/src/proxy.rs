//! The proxy's data path: requests/s and latency through deployd (http and
//! tcp) against the same instance called directly, with keep-alive and with
//! a new connection per request. One Node instance behind each service, so
//! the backend is the same. Each row is [`ROUNDS`] rounds of short wrk runs,
//! every proxied run right after a direct one, and gives medians: the
//! shared machine's speed drifts too much for one long run of each.
//!
//! For scale, HAProxy (when installed; `bench/run` installs Debian's) proxies
//! the same instance in the same run, one thread like deployd's proxy on
//! this machine, reusing its backend connections. Each proxy's CPU time per
//! request (user + system, from /proc) shows what the data path costs,
//! which is steadier than requests/s on a shared machine.
//!
//! Last, what the data path allocates: deployd under valgrind's DHAT,
//! heap blocks per request beyond what an idle deployd allocates.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::env::{
    Deployd, Wrk, bench_dir, cpu_ticks, free_port, percentile, rss_kib, ticks_per_sec, wait_until,
    wrk,
};
use crate::{Report, verdict};

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
    let haproxy = HaProxy::start(direct_h, direct_t);
    if let Err(e) = &haproxy {
        eprintln!("  (no HAProxy reference: {e})");
    }
    // Warm up every path (JIT, pools).
    let _ = wrk(direct_h, "/", 1, CONNS, false);
    let _ = wrk(ph, "/", 1, CONNS, false);
    let _ = wrk(pt, "/", 1, CONNS, false);
    if let Ok(h) = &haproxy {
        let _ = wrk(h.http, "/", 1, CONNS, false);
        let _ = wrk(h.tcp, "/", 1, CONNS, false);
    }
    for (close, mode, rate_target) in [
        (false, "keep-alive", 0.8),
        (true, "new connection per request", 0.6),
    ] {
        for (name, via, direct) in [("http", ph, direct_h), ("tcp", pt, direct_t)] {
            let hap = haproxy.as_ref().ok().map(|h| {
                let port = if name == "http" { h.http } else { h.tcp };
                (h.pid(), port)
            });
            let r = rounds(direct, (d.pid(), via), hap, "/", close)?;
            r.report(
                report,
                &format!("{name} proxy, {mode}"),
                rate_target,
                !close,
            );
        }
    }
    // The rows above give the proxy the hardest case: a handler that does
    // nothing, so the proxy's cost is all there is to compare. A handler
    // doing 100 µs of work is closer to an application's.
    let path = "/work?us=100";
    let _ = wrk(ph, path, 1, CONNS, false);
    let r = rounds(direct_h, (d.pid(), ph), None, path, false)?;
    let what = "http proxy, keep-alive, 100 µs of work per request";
    r.report(report, what, 0.8, true);
    drop(haproxy);
    drop(d);
    // Memory: clients (browsers, client pools) keep connections open and
    // idle for minutes; what they cost the proxy while it waits. Each
    // figure from a fresh process. A first wave of connections shows what
    // a burst leaves behind (an allocator keeps what it freed); a second,
    // once the first is idle, what each idle connection adds after that.
    for mode in ["http", "tcp"] {
        let port = free_port();
        // Both waves held open at once: more than a port takes by default
        // where the descriptor limit is low (half of deployd's budget;
        // 3,750 with a limit of 20,000), so the port is told to take them.
        let text = format!("{}max_connections {}\n", svc(port, mode), 2 * IDLE + 100);
        let d = Deployd::start(&[("m".into(), text)])?;
        if !d.settle("m", Duration::from_secs(60)) {
            return Err("service m did not deploy".into());
        }
        let instance = *d.ports("m").first().ok_or("no instance port")?;
        let ours = idle_cost(d.pid(), port)?;
        let reference = match HaProxy::start(instance, instance) {
            Ok(h) => {
                let port = if mode == "http" { h.http } else { h.tcp };
                let (first, second) = idle_cost(h.pid(), port)?;
                format!("; HAProxy {first:.1} / {second:.1} KiB")
            }
            Err(_) => String::new(),
        };
        report.info(
            "proxy",
            format!(
                "memory per idle {mode} client connection: {IDLE} opened at once, then {IDLE} more"
            ),
            format!("{:.1} / {:.1} KiB{reference}", ours.0, ours.1),
        );
    }
    allocations(report, &svc)
}

/// Requests (or connections) each run of the allocation figures sends.
const ALLOC_REQUESTS: usize = 10_000;

/// What the proxy allocates per request: deployd under valgrind's DHAT,
/// which counts every heap block a process allocates, once serving nothing
/// and once for each kind of client, each time a fresh deployd with the
/// same two services; the difference over [`ALLOC_REQUESTS`]. The probes
/// are a minute apart, so they do not land in one run more than another.
fn allocations(report: &mut Report, svc: &dyn Fn(u16, &str) -> String) -> Result<(), String> {
    let what = "heap allocations per request (DHAT), beyond a deployd serving nothing";
    if Command::new("valgrind")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        report.info("proxy", what, "valgrind is not installed: not measured");
        return Ok(());
    }
    let (ph, pt) = (free_port(), free_port());
    let slow = |port: u16, mode: &str| format!("{}health_interval 60s\n", svc(port, mode));
    let manifests = [
        ("h".into(), slow(ph, "http")),
        ("t".into(), slow(pt, "tcp")),
    ];
    let runs: [(&str, u16, bool, usize); 6] = [
        ("nothing", ph, false, 0),
        ("nothing", ph, false, 0),
        ("http, keep-alive", ph, false, ALLOC_REQUESTS),
        ("http, new connection per request", ph, true, ALLOC_REQUESTS),
        ("tcp, keep-alive", pt, false, ALLOC_REQUESTS),
        ("tcp, new connection per request", pt, true, ALLOC_REQUESTS),
    ];
    // Two runs serving nothing: how much a deployd's own count varies.
    let mut base: Vec<(u64, u64)> = Vec::new();
    let mut parts = Vec::new();
    let mut keep_alive_worst: f64 = 0.0;
    for (name, port, close, n) in runs {
        let out = std::env::temp_dir().join(format!("deployd-bench-dhat-{}", std::process::id()));
        let wrapper = [
            "valgrind".to_string(),
            "--tool=dhat".into(),
            format!("--dhat-out-file={}", out.display()),
        ];
        let d = Deployd::start_under(&manifests, &wrapper)?;
        for s in ["h", "t"] {
            if !d.settle(s, Duration::from_secs(120)) {
                return Err(format!("service {s} did not deploy under valgrind"));
            }
        }
        let sent = send_requests(port, n, close);
        let pid = d.pid();
        let log = d.finish();
        let _ = std::fs::remove_file(&out);
        sent?;
        let (bytes, blocks) = dhat_total(&log, pid).ok_or("no DHAT total in deployd's log")?;
        if n == 0 {
            base.push((bytes, blocks));
            continue;
        }
        let mean = |f: fn(&(u64, u64)) -> u64| {
            base.iter().map(f).sum::<u64>() as f64 / base.len().max(1) as f64
        };
        let per = (blocks as f64 - mean(|b| b.1)) / n as f64;
        let kib = (bytes as f64 - mean(|b| b.0)) / n as f64 / 1024.0;
        if !close {
            keep_alive_worst = keep_alive_worst.max(per);
        }
        // Within a count's own variation of zero, zero (not "-0.00").
        let shown = |x: f64| if x.abs() < 0.005 { 0.0 } else { x };
        parts.push(format!("{name} {:.2} ({:.1} KiB)", shown(per), shown(kib)));
    }
    let lo = base.iter().map(|b| b.1).min().unwrap_or(0);
    let hi = base.iter().map(|b| b.1).max().unwrap_or(0);
    report.add(
        "proxy",
        what,
        format!(
            "{}; over {ALLOC_REQUESTS} each, against {lo}–{hi} blocks serving nothing",
            parts.join(", ")
        ),
        "none per keep-alive request (< 0.05)",
        verdict(keep_alive_worst < 0.05),
    );
    Ok(())
}

/// `==PID== Total:     84,430,269 bytes in 1,401 blocks`: bytes and blocks,
/// of deployd's own process (its guard, forked at start, says its own).
fn dhat_total(log: &str, pid: u32) -> Option<(u64, u64)> {
    let me = format!("=={pid}==");
    let line = log
        .lines()
        .find(|l| l.contains("Total:") && l.starts_with(&me))?;
    let number = |s: &str| s.replace(',', "").parse::<u64>().ok();
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "Total:")?;
    Some((number(words.get(at + 1)?)?, number(words.get(at + 4)?)?))
}

/// Sends `n` GETs to `port` one after another: on one connection, or each
/// on its own (`Connection: close`). Every answer must be a 200.
fn send_requests(port: u16, n: usize, close: bool) -> Result<(), String> {
    use std::io::{Read, Write};
    let connect = || -> Result<std::net::TcpStream, String> {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        Ok(s)
    };
    let request: &[u8] = match close {
        true => b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
        false => b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n",
    };
    let mut conn = None;
    let mut buf = Vec::with_capacity(4096);
    for i in 0..n {
        let s = match &mut conn {
            Some(s) if !close => s,
            _ => conn.insert(connect()?),
        };
        s.write_all(request)
            .map_err(|e| format!("request {i}: {e}"))?;
        buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            let got = s
                .read(&mut chunk)
                .map_err(|e| format!("request {i}: {e}"))?;
            buf.extend_from_slice(&chunk[..got]);
            if got == 0 || (!close && response_complete(&buf)) {
                break;
            }
        }
        if !buf.starts_with(b"HTTP/1.1 200") {
            return Err(format!("request {i}: no 200 through port {port}"));
        }
    }
    Ok(())
}

/// Whether `buf` holds a whole response: its head and a body of its
/// `Content-Length`, or chunks up to the last.
fn response_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let body = buf.len() - end - 4;
    match head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        Some(len) => body >= len,
        None => buf.ends_with(b"0\r\n\r\n"),
    }
}

/// Client connections per wave of the memory figure.
const IDLE: usize = 3000;

/// Opens two waves of [`IDLE`] connections to `port`, each sending one
/// request and reading its answer, then left idle; returns how much process
/// `pid` grew per connection of each wave, in KiB.
fn idle_cost(pid: u32, port: u16) -> Result<(f64, f64), String> {
    let mut conns = Vec::with_capacity(2 * IDLE);
    let first = idle_wave(pid, port, &mut conns)?;
    let second = idle_wave(pid, port, &mut conns)?;
    Ok((first, second))
}

fn idle_wave(pid: u32, port: u16, conns: &mut Vec<std::net::TcpStream>) -> Result<f64, String> {
    use std::io::{Read, Write};
    let before = rss_kib(pid)?;
    let mut buf = [0u8; 4096];
    for i in 0..IDLE {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
            .map_err(|e| format!("connection {i}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            .map_err(|e| format!("connection {i}: {e}"))?;
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("connection {i}: {e}"))?;
        if !buf[..n].starts_with(b"HTTP/1.1 200") {
            return Err(format!("connection {i}: no 200 through port {port}"));
        }
        conns.push(s);
    }
    // Whatever the proxy gives back once a connection is idle, it has.
    std::thread::sleep(Duration::from_secs(3));
    Ok((rss_kib(pid)? - before) / IDLE as f64)
}

/// wrk runs per row: the machine is shared and its speed drifts by a
/// quarter within a minute, so each proxied run is paired with a direct run
/// just before it, and the row gives the median of the pairs' ratios.
const ROUNDS: usize = 5;
/// Seconds of each run of a round.
const ROUND_SECS: u64 = 3;

/// The runs through one proxy, each with the direct run of its round.
struct Paired {
    runs: Vec<(Wrk, Wrk)>,
    /// CPU seconds the proxy spent over all its runs.
    cpu: f64,
}

impl Paired {
    fn ratio(&self) -> f64 {
        median(self.runs.iter().map(|(w, b)| w.rps / b.rps))
    }

    fn rps(&self) -> f64 {
        median(self.runs.iter().map(|(w, _)| w.rps))
    }

    fn p99(&self) -> f64 {
        median(self.runs.iter().map(|(w, _)| w.p99_ms))
    }

    /// The median over rounds of the p99 added to the direct one's.
    fn added_p99(&self) -> f64 {
        median(self.runs.iter().map(|(w, b)| w.p99_ms - b.p99_ms))
    }

    /// `61%, 55–66% in 5 rounds`.
    fn spread(&self) -> String {
        let r: Vec<f64> = self
            .runs
            .iter()
            .map(|(w, b)| w.rps / b.rps * 100.0)
            .collect();
        let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!(
            "{:.0}%, {lo:.0}–{hi:.0}% in {} rounds",
            self.ratio() * 100.0,
            r.len()
        )
    }

    /// CPU per request, and the cores it kept busy while it ran.
    fn cpu(&self) -> String {
        let requests: u64 = self.runs.iter().map(|(w, _)| w.requests).sum();
        let secs = (self.runs.len() as u64 * ROUND_SECS) as f64;
        format!(
            "{:.1} µs CPU/request, {:.2} cores",
            self.cpu * 1e6 / requests.max(1) as f64,
            self.cpu / secs
        )
    }

    fn errors(&self) -> String {
        let failed: u64 = self.runs.iter().map(|(w, _)| w.failed).sum();
        let timeouts: u64 = self.runs.iter().map(|(w, _)| w.timeouts).sum();
        if failed + timeouts > 0 {
            format!("; {failed} failed, {timeouts} timed out")
        } else {
            String::new()
        }
    }
}

/// deployd's runs and HAProxy's (if any), each paired with its round's
/// direct run.
struct Rounds {
    ours: Paired,
    haproxy: Option<Paired>,
}

impl Rounds {
    /// Adds the row: its target is `rate_target` of direct, and with
    /// `p99_target` at most 1 ms added to the p99.
    fn report(&self, report: &mut Report, what: &str, rate_target: f64, p99_target: bool) {
        let ours = &self.ours;
        let failed: u64 = ours.runs.iter().map(|(w, _)| w.failed + w.timeouts).sum();
        let ok =
            ours.ratio() >= rate_target && (!p99_target || ours.added_p99() <= 1.0) && failed == 0;
        let reference = match &self.haproxy {
            Some(h) => format!(
                "; HAProxy {:.0} req/s ({}), p99 {:.2} ms, {}",
                h.rps(),
                h.spread(),
                h.p99(),
                h.cpu()
            ),
            None => String::new(),
        };
        let direct = |f: fn(&Wrk) -> f64| median(ours.runs.iter().map(|(_, b)| f(b)));
        report.add(
            "proxy",
            what,
            format!(
                "{:.0} req/s vs {:.0} direct ({}); p50 {:.2} / p99 {:.2} ms vs {:.2} / {:.2} ms direct; {}{}{}",
                ours.rps(),
                direct(|w| w.rps),
                ours.spread(),
                median(ours.runs.iter().map(|(w, _)| w.p50_ms)),
                ours.p99(),
                direct(|w| w.p50_ms),
                direct(|w| w.p99_ms),
                ours.cpu(),
                ours.errors(),
                reference,
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

/// [`ROUNDS`] rounds of: direct, through deployd (`ours`: its pid and
/// port), direct, through HAProxy (`hap`).
fn rounds(
    direct: u16,
    ours: (u32, u16),
    hap: Option<(u32, u16)>,
    path: &str,
    close: bool,
) -> Result<Rounds, String> {
    let mut r = Rounds {
        ours: Paired {
            runs: Vec::new(),
            cpu: 0.0,
        },
        haproxy: hap.map(|_| Paired {
            runs: Vec::new(),
            cpu: 0.0,
        }),
    };
    let run = |port| wrk(port, path, ROUND_SECS, CONNS, close);
    for _ in 0..ROUNDS {
        let base = run(direct)?;
        let (w, cpu) = with_cpu(ours.0, || run(ours.1))?;
        r.ours.runs.push((w, base));
        r.ours.cpu += cpu;
        if let (Some((pid, port)), Some(h)) = (hap, r.haproxy.as_mut()) {
            let base = run(direct)?;
            let (w, cpu) = with_cpu(pid, || run(port))?;
            h.runs.push((w, base));
            h.cpu += cpu;
        }
    }
    Ok(r)
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

/// Runs `f` and measures the CPU time (user + system, seconds) process
/// `pid` spent meanwhile.
fn with_cpu<T>(pid: u32, f: impl FnOnce() -> Result<T, String>) -> Result<(T, f64), String> {
    let before = cpu_seconds(pid);
    let r = f()?;
    let after = cpu_seconds(pid);
    Ok((r, (after - before).max(0.0)))
}

/// User + system time of a process, all its threads, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    cpu_ticks(pid).map_or(f64::NAN, |t| t as f64 / ticks_per_sec())
}

/// HAProxy in front of the same instance: `http` in http mode, `tcp` in tcp
/// mode. Stopped on drop.
struct HaProxy {
    child: Child,
    http: u16,
    tcp: u16,
    _dir: tempfile::TempDir,
}

impl HaProxy {
    fn start(backend_http: u16, backend_tcp: u16) -> Result<HaProxy, String> {
        let dir = tempfile::Builder::new()
            .prefix("deployd-bench-haproxy")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let (http, tcp) = (free_port(), free_port());
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  nbthread 1\n  maxconn 9000\ndefaults\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
                 frontend fh\n  mode http\n  bind 127.0.0.1:{http}\n  option forwardfor\n  default_backend bh\n\
                 backend bh\n  mode http\n  http-reuse always\n  server s1 127.0.0.1:{backend_http}\n\
                 frontend ft\n  mode tcp\n  bind 127.0.0.1:{tcp}\n  default_backend bt\n\
                 backend bt\n  mode tcp\n  server s1 127.0.0.1:{backend_tcp}\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run haproxy: {e}"))?;
        let h = HaProxy {
            child,
            http,
            tcp,
            _dir: dir,
        };
        if !wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            listening(http) && listening(tcp)
        }) {
            return Err("haproxy did not listen".into());
        }
        Ok(h)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
