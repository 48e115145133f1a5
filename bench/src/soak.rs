//! The fault soak: three hosts in network namespaces (veth pairs to a
//! bridge), each with an etcd member and a deployd, a service of 6
//! instances under load through every host's port, back-to-back rolling
//! updates, and a random fault every few seconds: kill -9 of a deployd
//! (started again a little later), kill of an etcd member (started again),
//! a host's link cut for a few seconds. Then everything healed, and the
//! cluster left to converge.
//!
//! It prints: slots lost (a slot with no ready instance after
//! convergence), slots doubled (a slot with more than one process of the
//! service after convergence), rollouts completed of those started, and
//! requests failed through hosts that stayed up (a host is excluded while
//! it is under a fault and for `host_timeout` + 2 s after). Targets: 0, 0,
//! all, 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::env::{Deployd, free_port, sibling, wait_until};
use crate::{Report, verdict};

const FAULTS: usize = 20;
const HOST_TIMEOUT: Duration = Duration::from_secs(3);

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The namespaces, their bridge; deleted (with what runs in them) on drop.
struct Net {
    tag: u32,
}

impl Net {
    fn create() -> Result<Net, String> {
        let tag = std::process::id() % 5000 + 7000;
        let net = Net { tag };
        let br = format!("dsb{tag}");
        if !(ip(&["link", "add", &br, "type", "bridge"])
            && ip(&[
                "addr",
                "add",
                &format!("{}.254/24", net.prefix()),
                "dev",
                &br,
            ])
            && ip(&["link", "set", &br, "up"]))
        {
            return Err("cannot make a bridge (ip link add): needs root and iproute2".into());
        }
        for i in 1..=3 {
            let ns = net.ns(i);
            let (outer, inner) = (format!("dsv{tag}h{i}"), format!("dsv{tag}n{i}"));
            let ok = ip(&["netns", "add", &ns])
                && ip(&[
                    "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                ])
                && ip(&["link", "set", &inner, "netns", &ns])
                && ip(&["link", "set", &outer, "master", &br, "up"])
                && ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{}/24", net.addr(i)),
                    "dev",
                    &inner,
                ])
                && ip(&["-n", &ns, "link", "set", &inner, "up"])
                && ip(&["-n", &ns, "link", "set", "lo", "up"]);
            if !ok {
                return Err(format!("cannot set up network namespace {ns}"));
            }
        }
        Ok(net)
    }
    fn prefix(&self) -> String {
        format!("10.{}.{}", 200 + self.tag / 250 % 50, self.tag % 250)
    }
    fn addr(&self, i: usize) -> String {
        format!("{}.{i}", self.prefix())
    }
    fn ns(&self, i: usize) -> String {
        format!("dsn{}h{i}", self.tag)
    }
    fn enter(&self, i: usize) -> Vec<String> {
        vec![
            "nsenter".into(),
            format!("--net=/var/run/netns/{}", self.ns(i)),
            "--".into(),
        ]
    }
    fn link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["link", "set", &format!("dsv{}h{i}", self.tag), state]);
    }
    fn pids(&self, i: usize) -> Vec<u32> {
        Command::new("ip")
            .args(["netns", "pids", &self.ns(i)])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 1..=3 {
            for pid in self.pids(i) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            ip(&["netns", "del", &self.ns(i)]);
        }
        ip(&["link", "del", &format!("dsb{}", self.tag)]);
    }
}

/// An etcd member in a namespace; killed on drop.
struct Member {
    child: Option<Child>,
    args: Vec<String>,
}

impl Member {
    fn start(&mut self) -> Result<(), String> {
        let child = Command::new(&self.args[0])
            .args(&self.args[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("etcd: {e}"))?;
        self.child = Some(child);
        Ok(())
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A deterministic stream of choices (a run can be repeated from its seed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// When each host was last under a fault (for excluding its requests).
#[derive(Default)]
struct Faulted {
    until: [Option<Instant>; 3],
    active: [bool; 3],
}

fn get(addr: SocketAddr, keep: &mut Option<BufReader<TcpStream>>) -> Result<(), String> {
    if keep.is_none() {
        let s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        *keep = Some(BufReader::new(s));
    }
    let r = keep.as_mut().ok_or("no connection")?;
    r.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.starts_with("HTTP/1.1 200") {
        return Err(format!("answer {:?}", line.trim()));
    }
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).map_err(|e| e.to_string())? == 0 {
            return Err("closed in the head".into());
        }
        if h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(())
}

pub fn run(report: &mut Report) -> Result<(), String> {
    let etcd_bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("etcd is not installed (apt-get install etcd-server)")?;
    let net = Net::create()?;
    let data = tempfile::Builder::new()
        .prefix("deployd-soak")
        .tempdir_in("/var/tmp")
        .map_err(|e| e.to_string())?;
    let (client, peer) = (2379, 2380);
    let cluster: Vec<String> = (1..=3)
        .map(|i| format!("s{i}=http://{}:{peer}", net.addr(i)))
        .collect();
    let mut members: Vec<Member> = (1..=3)
        .map(|i| {
            let a = net.addr(i);
            let mut args = net.enter(i);
            args.push(etcd_bin.to_string());
            for (k, v) in [
                ("--name", format!("s{i}")),
                (
                    "--data-dir",
                    data.path().join(format!("s{i}")).display().to_string(),
                ),
                ("--listen-client-urls", format!("http://{a}:{client}")),
                ("--advertise-client-urls", format!("http://{a}:{client}")),
                ("--listen-peer-urls", format!("http://{a}:{peer}")),
                (
                    "--initial-advertise-peer-urls",
                    format!("http://{a}:{peer}"),
                ),
                ("--initial-cluster", cluster.join(",")),
                ("--heartbeat-interval", "50".into()),
                ("--election-timeout", "500".into()),
                ("--log-level", "error".into()),
            ] {
                args.push(k.into());
                args.push(v);
            }
            Member { child: None, args }
        })
        .collect();
    for m in &mut members {
        m.start()?;
    }
    let endpoints: Vec<String> = (1..=3)
        .map(|i| format!("\"http://{}:{client}\"", net.addr(i)))
        .collect();
    let port = free_port();
    let app = sibling("bench-app");
    let manifest = |tag: u64| {
        format!(
            "exec exec {}\nenv STARTUP_MS=50\nenv TAG={tag}\nreplicas 6\nupdate_batch 2\nport {port}\nhealth http /healthz\nhealth_interval 200ms\nhealth_deadline 20s\ndrain 2s\n",
            app.display()
        )
    };
    let mut hosts = Vec::new();
    for i in 1..=3 {
        let a = net.addr(i);
        let extra = format!(
            "bind = \"{a}\"\n[cluster]\netcd = [{}]\nhost = \"s{i}\"\naddress = \"{a}\"\nhost_timeout = \"{}s\"\n",
            endpoints.join(", "),
            HOST_TIMEOUT.as_secs()
        );
        hosts.push(Deployd::start_wrapped(
            &[("web".to_string(), manifest(0))],
            &net.enter(i),
            &extra,
        )?);
    }
    let formed = wait_until(Duration::from_secs(60), Duration::from_millis(50), || {
        let c = hosts[0].read("cluster");
        c.contains("hosts up 3 ") && !c.contains("leader none")
    });
    if !formed {
        return Err("the three hosts did not form a cluster".into());
    }
    hosts[0].ctl("ctl", "apply web")?;
    if !hosts[0].settle("web", Duration::from_secs(60)) {
        return Err("web did not deploy".into());
    }
    // Load through every host's port, each request counted against the
    // host it went through.
    let stop = Arc::new(AtomicBool::new(false));
    let faulted = Arc::new(Mutex::new(Faulted::default()));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let excused = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for i in 0..3 {
        for keep_alive in [true, false] {
            let addr: SocketAddr = format!("{}:{port}", net.addr(i + 1))
                .parse()
                .map_err(|_| "address")?;
            let (stop, faulted, ok, failed, excused, errors) = (
                stop.clone(),
                faulted.clone(),
                ok.clone(),
                failed.clone(),
                excused.clone(),
                errors.clone(),
            );
            workers.push(std::thread::spawn(move || {
                let mut conn = None;
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let r = get(addr, &mut conn);
                    if !keep_alive {
                        conn = None;
                    }
                    match r {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            conn = None;
                            let f = faulted.lock();
                            let excuse = f.active[i] || f.until[i].is_some_and(|t| started <= t);
                            drop(f);
                            if excuse {
                                excused.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(50));
                            } else {
                                failed.fetch_add(1, Ordering::SeqCst);
                                let mut e2 = errors.lock();
                                if e2.len() < 10 {
                                    e2.push(format!("via s{}: {e}", i + 1));
                                }
                            }
                        }
                    }
                }
            }));
        }
    }
    // Back-to-back rollouts, through whichever host is whole.
    let whole = |f: &Faulted, i: usize| !f.active[i];
    let mut rng = Rng(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.as_nanos() as u64));
    let seed = rng.0;
    let mut started_rollouts = 0u64;
    let mut completed = 0u64;
    let mut pending: Option<String> = None;
    let mut version = 0u64;
    let mut faults = Vec::new();
    let t0 = Instant::now();
    let mut next_fault = Instant::now() + Duration::from_secs(2);
    let mut restore: Vec<(Instant, usize, u8)> = Vec::new();
    while faults.len() < FAULTS || !restore.is_empty() {
        // Restore what is due.
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = restore.into_iter().partition(|(t, ..)| *t <= now);
        restore = later;
        for (_, h, kind) in due {
            match kind {
                0 => {
                    let _ = hosts[h].relaunch();
                }
                1 => {
                    let _ = members[h].start();
                }
                _ => net.link(h + 1, true),
            }
            let mut f = faulted.lock();
            f.active[h] = false;
            f.until[h] = Some(Instant::now() + HOST_TIMEOUT + Duration::from_secs(2));
        }
        // A new fault, on a host with none now.
        if faults.len() < FAULTS && now >= next_fault {
            let free: Vec<usize> = (0..3).filter(|h| !faulted.lock().active[*h]).collect();
            if free.len() == 3 {
                let h = free[rng.below(free.len() as u64) as usize];
                let kind = rng.below(3) as u8;
                faulted.lock().active[h] = true;
                match kind {
                    0 => hosts[h].kill9(),
                    1 => members[h].kill(),
                    _ => net.link(h + 1, false),
                }
                let what = ["kill -9 deployd", "kill etcd member", "cut link"][kind as usize];
                faults.push(format!(
                    "{:.1}s s{}: {what}",
                    t0.elapsed().as_secs_f64(),
                    h + 1
                ));
                let back = Duration::from_millis(2000 + rng.below(2000));
                restore.push((now + back, h, kind));
            }
            next_fault = now + Duration::from_millis(3000 + rng.below(3000));
        }
        // A new rollout when the last one is over, through a whole host.
        let f = faulted.lock();
        let by = (0..3).find(|h| whole(&f, *h));
        drop(f);
        if let Some(h) = by {
            let status = hosts[h].read("active/web/update_status");
            if status == "none\n" || status == "failed\n" {
                // The last rollout is over: done if it is where it went.
                let at = hosts[h].read("active/web/version");
                if let Some(v) = pending.take() {
                    if status == "none\n" && at == v {
                        completed += 1;
                    } else if status == "none\n" {
                        pending = Some(v);
                    }
                }
            }
            if (status == "none\n" || status == "failed\n") && pending.is_none() {
                version += 1;
                hosts[h].write_manifest("web", &manifest(version));
                // A refusal (etcd or a leader away, EAGAIN) started
                // nothing: tried again.
                if hosts[h].ctl("active/web/ctl", "apply").is_ok() {
                    started_rollouts += 1;
                    pending = Some(hosts[h].read("active/web/version"));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // Everything healed: let the cluster converge, under load still.
    let converged = wait_until(Duration::from_secs(120), Duration::from_millis(100), || {
        (0..3).all(|h| {
            let c = hosts[h].read("cluster");
            c.contains("hosts up 3 ") && c.contains("etcd reachable")
        }) && hosts[0].read("active/web/update_status") == "none\n"
            && hosts[0].read("active/web/update_progress") == "6/6\n"
    });
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.join();
    }
    // Slots: each process of the service in the namespaces, by its $INSTANCE.
    let mut per_slot = [0u32; 6];
    for i in 1..=3 {
        for pid in net.pids(i) {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if !String::from_utf8_lossy(&cmd).contains("bench-app") {
                continue;
            }
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let slot = env.split(|b| *b == 0).find_map(|kv| {
                std::str::from_utf8(kv)
                    .ok()?
                    .strip_prefix("INSTANCE=")?
                    .parse::<usize>()
                    .ok()
            });
            if let Some(s) = slot.filter(|s| *s < 6) {
                per_slot[s] += 1;
            }
        }
    }
    let lost = per_slot.iter().filter(|n| **n == 0).count();
    let doubled = per_slot.iter().filter(|n| **n > 1).count();
    let events = hosts[0].read("active/web/events");
    if let Some(v) = pending {
        if converged && hosts[0].read("active/web/version") == v {
            completed += 1;
        }
    }
    eprintln!("  seed {seed}; faults: {}", faults.join("; "));
    for l in events
        .lines()
        .filter(|l| l.contains("failed") || l.contains("superseded"))
    {
        eprintln!("  {l}");
    }
    let failed_n = failed.load(Ordering::SeqCst);
    if failed_n > 0 {
        eprintln!("  failures: {:?}", errors.lock());
    }
    report.add(
        "soak",
        format!(
            "{} faults in {:.0}s, {} rollouts started (converged: {converged})",
            faults.len(),
            t0.elapsed().as_secs_f64(),
            started_rollouts
        ),
        format!("slots lost {lost}, slots doubled {doubled}"),
        "0, 0",
        verdict(lost == 0 && doubled == 0 && converged),
    );
    report.add(
        "soak",
        "rollouts completed",
        format!("{completed} of {started_rollouts}"),
        "all",
        verdict(completed >= started_rollouts),
    );
    report.add(
        "soak",
        "requests failed through hosts that stayed up",
        format!(
            "{failed_n} of {} ({} more through hosts under a fault, not counted)",
            ok.load(Ordering::SeqCst) + failed_n,
            excused.load(Ordering::SeqCst)
        ),
        "0",
        verdict(failed_n == 0),
    );
    Ok(())
}
