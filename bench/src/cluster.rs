//! Three hosts through etcd against one host, in the same run: the same
//! rolling update (its overhead per batch, as the rollout section measures
//! it: wall time less the instances' own start-to-ready times), the etcd
//! writes each batch costs, and namespace reads on every host against
//! one host's (they never touch etcd).
//!
//! etcd is three real members (Debian's etcd-server) with their data on
//! disk, as a deployment would have them: their fsyncs are part of what
//! a batch costs.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::env::{Deployd, free_port, sibling, wait_until};
use crate::rollout::{Roll, roll};
use crate::{Report, verdict};

const STARTUP_MS: u64 = 50;
/// Target: a cluster's batch costs at most this much more than one host's.
const TARGET_EXTRA_MS: f64 = 20.0;
const READS: Duration = Duration::from_secs(2);
/// etcd writes one after another on a batch's path in a cluster: the new
/// instances' ready statuses, the route table, the hosts' acks, the old
/// instances' exits, the next batch's assignments.
const PATH_WRITES: usize = 5;

/// One etcd member, killed on drop.
struct Member(Child);

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A 3-member etcd; its client ports.
fn etcd(dir: &Path) -> Result<(Vec<Member>, Vec<u16>), String> {
    let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("etcd is not installed (apt-get install etcd-server)")?;
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let cluster: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("b{i}=http://127.0.0.1:{peer}"))
        .collect();
    let cluster = cluster.join(",");
    let mut members = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let child = Command::new(bin)
            .args(["--name", &format!("b{i}")])
            .arg("--data-dir")
            .arg(dir.join(format!("b{i}")))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args(["--initial-cluster", &cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("etcd: {e}"))?;
        members.push(Member(child));
    }
    let ports: Vec<u16> = ports.iter().map(|(c, _)| *c).collect();
    if !wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
        revision(ports[0]).is_some()
    }) {
        return Err("etcd did not answer".into());
    }
    Ok((members, ports))
}

/// A POST of `body` to etcd's JSON gateway at `path`: the answer, which
/// names the revision etcd is at.
fn gateway(port: u16, path: &str, body: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: e\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.contains("\"revision\"").then_some(out)
}

/// etcd's current revision: one more per write (a put or a transaction).
fn revision(port: u16) -> Option<u64> {
    let out = gateway(port, "/v3/kv/range", "{\"key\":\"AA==\"}")?;
    let at = out.find("\"revision\":\"")? + 12;
    out[at..].split('"').next()?.parse().ok()
}

/// One put, answered once committed: the time it took.
fn put_once(port: u16) -> Option<Duration> {
    let t = Instant::now();
    // `/bench/probe` = "L2JlbmNoL3Byb2Jl", "x" = "eA==".
    gateway(
        port,
        "/v3/kv/put",
        "{\"key\":\"L2JlbmNoL3Byb2Jl\",\"value\":\"eA==\"}",
    )?;
    Some(t.elapsed())
}

/// etcd's own write latency in this run, the reference a cluster's batch
/// is made of: `n` puts one after another; p50 and p90 in ms.
fn put_latency(port: u16, n: usize) -> Option<(f64, f64)> {
    let mut d: Vec<f64> = (0..n)
        .filter_map(|_| put_once(port))
        .map(|t| t.as_secs_f64() * 1000.0)
        .collect();
    if d.len() < n / 2 {
        return None;
    }
    d.sort_by(f64::total_cmp);
    Some((d[d.len() / 2], d[d.len() * 9 / 10]))
}

/// Open, read, close of `path` per second, for READS.
fn reads(path: &Path) -> f64 {
    let mut buf = [0u8; 4096];
    let mut n = 0u64;
    let t = Instant::now();
    while t.elapsed() < READS {
        if let Ok(mut f) = std::fs::File::open(path) {
            while f.read(&mut buf).unwrap_or(0) > 0 {}
            n += 1;
        }
    }
    n as f64 / t.elapsed().as_secs_f64()
}

pub fn run(report: &mut Report) -> Result<(), String> {
    let data = tempfile::Builder::new()
        .prefix("deployd-bench-etcd")
        .tempdir_in(std::env::var("ETCD_DATA").unwrap_or_else(|_| "/var/tmp".into()))
        .map_err(|e| e.to_string())?;
    let (_members, ports) = etcd(data.path())?;
    let endpoints: Vec<String> = ports
        .iter()
        .map(|p| format!("\"http://127.0.0.1:{p}\""))
        .collect();
    let mut hosts = Vec::new();
    for i in 1..=3 {
        let extra = format!(
            "bind = \"127.0.0.{a}\"\n[cluster]\netcd = [{}]\nhost = \"b{i}\"\naddress = \"127.0.0.{a}\"\n",
            endpoints.join(", "),
            a = i + 1
        );
        hosts.push(Deployd::start_configured(&[], &extra)?);
    }
    let formed = wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
        let c = hosts[0].read("cluster");
        c.contains("hosts up 3 ") && !c.contains("leader none")
    });
    if !formed {
        return Err("the three hosts did not form a cluster".into());
    }
    let single = Deployd::start(&[])?;
    let ready = tempfile::tempdir().map_err(|e| e.to_string())?;
    let app = sibling("bench-app");
    for (n, b) in [(6u32, 1u32), (6, 2), (12, 3)] {
        let name = format!("c{n}b{b}");
        let port = free_port();
        let manifest = |tag: &str| {
            format!(
                "exec exec {}\nenv READY_DIR={}\nenv STARTUP_MS={STARTUP_MS}\nenv TAG={tag}\nreplicas {n}\nupdate_batch {b}\nport {port}\nhealth http /healthz\nhealth_deadline 30s\ndrain 1s\n",
                app.display(),
                ready.path().display()
            )
        };
        let mut results = Vec::new();
        for d in [&single, &hosts[0]] {
            d.write_manifest(&name, &manifest("a"));
            d.ctl("ctl", &format!("apply {name}"))?;
            if !d.settle(&name, Duration::from_secs(60)) {
                return Err(format!("{name} did not deploy"));
            }
            let rev0 = revision(ports[0]);
            let r = roll(d, &name, &manifest, ready.path())?;
            let (per_batch, count) = (Roll::per_batch(r.wall, r.minimum, r.batches), r.batches);
            let writes = revision(ports[0]).zip(rev0).map(|(a, b)| a - b);
            results.push((per_batch, count, writes));
        }
        let (one, _, _) = results[0];
        let (many, count, writes) = results[1];
        let put = put_latency(ports[0], 40);
        report.add(
            "cluster",
            format!("rolling update, {n} instances, batch {b} ({count} batches): deployd's time per batch"),
            format!(
                "3 hosts {many:.1} ms, one host {one:.1} ms: {:+.1} ms",
                many - one
            ),
            format!("≤ {TARGET_EXTRA_MS:.0} ms more than one host"),
            verdict(many - one <= TARGET_EXTRA_MS),
        );
        if let Some((p50, p90)) = put {
            report.info(
                "cluster",
                "etcd's own write, one put at a time, after that update (reference)",
                format!(
                    "p50 {p50:.1} ms, p90 {p90:.1} ms; a batch's path holds {PATH_WRITES} writes one after another"
                ),
            );
        }
        if let Some(w) = writes {
            report.info(
                "cluster",
                format!("etcd writes per batch ({n} instances, batch {b})"),
                format!(
                    "{:.1} ({w} for {count} batches: the leader's rounds and the hosts' statuses and acks)",
                    w as f64 / count as f64
                ),
            );
        }
        for d in [&single, &hosts[0]] {
            let _ = d.ctl("ctl", &format!("remove {name}"));
        }
    }
    // Reads never touch etcd: every host at one host's rate.
    let name = "reads";
    let text = format!(
        "exec exec {}\nreplicas 3\nhealth http /healthz\n",
        app.display()
    );
    for d in [&single, &hosts[0]] {
        d.write_manifest(name, &text);
        d.ctl("ctl", &format!("apply {name}"))?;
        if !d.settle(name, Duration::from_secs(60)) {
            return Err("reads did not deploy".into());
        }
    }
    for h in &hosts[1..] {
        wait_until(Duration::from_secs(10), Duration::from_millis(10), || {
            h.read("active/reads/update_progress") == "3/3\n"
        });
    }
    let file = "active/reads/update_progress";
    let base = reads(&single.mnt.join(file));
    for (i, h) in hosts.iter().enumerate() {
        let rate = reads(&h.mnt.join(file));
        report.add(
            "cluster",
            format!("namespace reads of update_progress on host {}", i + 1),
            format!("{:.0}/s, one host {base:.0}/s: {:.2}×", rate, rate / base),
            "≥ 0.8× one host's (they never touch etcd)",
            verdict(rate >= 0.8 * base),
        );
    }
    Ok(())
}
