//! `deploy status [SERVICE] [--json]`: every service as a table from
//! `/deploy/status`, or one service with its instances.

use std::io::Write;
use std::path::Path;

use deployd_lib::manifest;
use serde::Serialize;

use crate::ns::{self, Ns};
use crate::{Exit, Fail};

#[derive(Serialize)]
struct Summary {
    service: String,
    version: String,
    update_status: String,
    progress: String,
    healthy: String,
    state: String,
}

#[derive(Serialize)]
struct Detail {
    service: String,
    version: String,
    previous_version: Option<String>,
    update_status: String,
    progress: String,
    state: String,
    /// Why the last rollout failed, while `update_status` is `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<String>,
    /// From its target manifest: the account its instances run as.
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    /// From its target manifest: `memory_high`, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_high: Option<u64>,
    /// From its target manifest: the services it starts after.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    after: Vec<String>,
    /// What the public port served, when the service has one.
    traffic: Option<Traffic>,
    instances: Vec<Instance>,
    /// The last lines of its `events`, oldest first (as `systemctl status`
    /// ends with a unit's last log lines, `kubectl describe` with events).
    events: Vec<String>,
}

/// Event lines `deploy status SERVICE` ends with.
const RECENT_EVENTS: u64 = 10;

/// The totals of the `traffic` file.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Traffic {
    pub port: u16,
    pub mode: String,
    /// Requests (http) or connections (tcp) served.
    pub served: u64,
    pub inflight: u64,
    pub errors: u64,
    /// Failed on an instance unseen and sent again.
    pub retried: u64,
    /// Given up by their clients before the answer was through (http only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abandoned: Option<u64>,
    /// With deployd and no instance yet: being read, or queued for one.
    pub waiting: u64,
    /// Why deployd is not listening on the port yet (it is taken).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_listening: Option<String>,
}

impl Traffic {
    /// The service's traffic totals now, if it has a public port.
    pub fn read(dir: &Path) -> Option<Traffic> {
        traffic(&ns::read_field(dir, "traffic"))
    }

    /// What was served between `before` and this reading, as one line:
    /// `1200 requests, 0 errors, 2 retried, 0 abandoned`. `None` if the
    /// port or mode changed meanwhile (the counters started again).
    pub fn since(&self, before: &Traffic) -> Option<String> {
        if (self.port, &self.mode) != (before.port, &before.mode) || self.served < before.served {
            return None;
        }
        let what = if self.mode == "tcp" {
            "connections"
        } else {
            "requests"
        };
        let d = |now: u64, then: u64| now.saturating_sub(then);
        let mut line = format!(
            "{} {what}, {} errors, {} retried",
            d(self.served, before.served),
            d(self.errors, before.errors),
            d(self.retried, before.retried),
        );
        if let (Some(now), Some(then)) = (self.abandoned, before.abandoned) {
            line.push_str(&format!(", {} abandoned", d(now, then)));
        }
        Some(line)
    }
}

#[derive(Serialize)]
struct Instance {
    instance: u32,
    pid: Option<u32>,
    state: String,
    /// Restarts of its slot's instance since the last rollout.
    restarts: u32,
    version: String,
    port: Option<u16>,
    inflight: u64,
    /// What it served through the service's port, once routed in.
    #[serde(skip_serializing_if = "Option::is_none")]
    traffic: Option<InstanceTraffic>,
    /// Its processes' memory and CPU time, while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    /// In a cluster, its host.
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<String>,
}

/// An instance's `usage` file.
#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
struct Usage {
    processes: u32,
    /// Resident memory, bytes.
    rss: u64,
    /// CPU time, seconds.
    cpu: f64,
}

/// `processes N`, `rss BYTES`, `cpu SECONDS`, one per line; `None` when no
/// process runs (or the file is missing, from an older deployd).
fn usage(text: &str) -> Option<Usage> {
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .map(str::trim)
    };
    let u = Usage {
        processes: get("processes")?.parse().ok()?,
        rss: get("rss")?.parse().ok()?,
        cpu: get("cpu")?.parse().ok()?,
    };
    (u.processes > 0).then_some(u)
}

/// Bytes as `ps`/`systemctl status` people read them: 812K, 12.3M, 1.2G.
fn human_bytes(n: u64) -> String {
    const K: f64 = 1024.0;
    let f = n as f64;
    if f < K * K {
        format!("{:.0}K", f / K)
    } else if f < K * K * K {
        format!("{:.1}M", f / (K * K))
    } else {
        format!("{:.1}G", f / (K * K * K))
    }
}

/// One instance's line of the `traffic` file.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
struct InstanceTraffic {
    served: u64,
    errors: u64,
    retried: u64,
}

/// Reads the totals of a `traffic` file: `port P MODE`, then one `NAME N`
/// line per counter (`requests` or `connections`, `inflight`, `errors`,
/// `retried`, in http mode `abandoned`, and `waiting`), then the
/// instances.
fn traffic(text: &str) -> Option<Traffic> {
    let mut lines = text.lines();
    let mut head = lines.next()?.split(' ');
    if head.next()? != "port" {
        return None;
    }
    let port = head.next()?.parse().ok()?;
    let mode = head.next()?.to_string();
    let counters: Vec<(&str, u64)> = lines
        .map_while(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k, v.parse().ok()?))
        })
        .collect();
    let get = |key: &str| counters.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let served = if mode == "tcp" {
        "connections"
    } else {
        "requests"
    };
    Some(Traffic {
        port,
        served: get(served)?,
        inflight: get("inflight")?,
        errors: get("errors")?,
        retried: get("retried").unwrap_or(0),
        abandoned: get("abandoned"),
        waiting: get("waiting").unwrap_or(0),
        not_listening: text
            .lines()
            .find_map(|l| l.strip_prefix("not_listening "))
            .map(String::from),
        mode,
    })
}

/// The instance lines of a `traffic` file, by instance number:
/// `instance N requests R inflight I errors E retried T ...`.
fn instance_traffic(text: &str) -> Vec<(u32, InstanceTraffic)> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.strip_prefix("instance ")?.split(' ');
            let n = words.next()?.parse().ok()?;
            let words: Vec<&str> = words.collect();
            let get = |key: &str| {
                let i = words.iter().position(|w| *w == key)?;
                words.get(i + 1)?.parse().ok()
            };
            let served = get("requests").or_else(|| get("connections"))?;
            let t = InstanceTraffic {
                served,
                errors: get("errors")?,
                retried: get("retried").unwrap_or(0),
            };
            Some((n, t))
        })
        .collect()
}

/// Prints every service.
pub fn all(ns: &Ns, json: bool) -> Result<Exit, Fail> {
    let text = ns::read(&ns.status_file())?;
    let rows: Vec<Summary> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() == 6).then(|| Summary {
                service: f[0].into(),
                version: f[1].into(),
                update_status: f[2].into(),
                progress: f[3].into(),
                healthy: f[4].into(),
                state: f[5].into(),
            })
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &rows).map_err(std::io::Error::other)?;
        writeln!(out)?;
        return Ok(Exit::Ok);
    }
    let table: Vec<[&str; 6]> = std::iter::once([
        "SERVICE", "VERSION", "STATUS", "PROGRESS", "HEALTHY", "STATE",
    ])
    .chain(rows.iter().map(|r| {
        [
            r.service.as_str(),
            &r.version,
            &r.update_status,
            &r.progress,
            &r.healthy,
            &r.state,
        ]
    }))
    .collect();
    print_table(&mut out, &table)?;
    Ok(Exit::Ok)
}

/// Prints one service in detail.
pub fn one(ns: &Ns, service: &str, json: bool) -> Result<Exit, Fail> {
    let dir = ns.service(service)?;
    let previous = ns::read_field(&dir, "previous_version");
    let traffic_text = ns::read_field(&dir, "traffic");
    // The target manifest, for what the namespace has no file of.
    let m = std::fs::read(dir.join("manifest"))
        .ok()
        .and_then(|t| manifest::parse(&t).ok());
    let d = Detail {
        service: service.to_string(),
        version: ns::read_field(&dir, "version"),
        previous_version: (!previous.is_empty()).then_some(previous),
        update_status: ns::read_field(&dir, "update_status"),
        progress: ns::read_field(&dir, "update_progress"),
        state: ns::read_field(&dir, "state"),
        failure: Some(ns::read_field(&dir, "failure")).filter(|f| !f.is_empty()),
        user: m
            .as_ref()
            .and_then(|m| m.user.as_ref())
            .map(|u| u.to_string()),
        memory_high: m.as_ref().and_then(|m| m.memory_high),
        after: m
            .as_ref()
            .map(|m| m.after.iter().map(|s| s.to_string()).collect())
            .unwrap_or_default(),
        traffic: traffic(&traffic_text),
        instances: instances(&dir.join("instances"), &instance_traffic(&traffic_text)),
        events: crate::tail::last_lines(&dir.join("events"), RECENT_EVENTS),
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &d).map_err(std::io::Error::other)?;
        writeln!(out)?;
        return Ok(Exit::Ok);
    }
    writeln!(out, "{}", d.service)?;
    let fields = [
        ("version", d.version.as_str()),
        (
            "previous version",
            d.previous_version.as_deref().unwrap_or("-"),
        ),
        ("update status", &d.update_status),
        ("progress", &d.progress),
        ("state", &d.state),
    ];
    for (k, v) in fields {
        writeln!(out, "  {k:<17} {v}")?;
    }
    if let Some(u) = &d.user {
        writeln!(out, "  {:<17} {u}", "user")?;
    }
    if let Some(n) = d.memory_high {
        writeln!(out, "  {:<17} {}", "memory max", manifest::format_size(n))?;
    }
    if !d.after.is_empty() {
        writeln!(out, "  {:<17} {}", "after", d.after.join(", "))?;
    }
    if let Some(t) = &d.traffic {
        let what = if t.mode == "tcp" {
            "connections"
        } else {
            "requests"
        };
        write!(
            out,
            "  {:<17} port {} ({}): {} {what}, {} in flight, {} errors, {} retried",
            "traffic", t.port, t.mode, t.served, t.inflight, t.errors, t.retried
        )?;
        if let Some(n) = t.abandoned {
            write!(out, ", {n} abandoned")?;
        }
        // Only when there are: requests queued for want of an instance.
        if t.waiting > 0 {
            write!(out, ", {} waiting", t.waiting)?;
        }
        writeln!(out)?;
        if let Some(why) = &t.not_listening {
            writeln!(out, "  {:<17} not listening: {why}", "")?;
        }
    }
    writeln!(out)?;
    // With a port, what each instance served and failed.
    let served = d.traffic.as_ref().map(|t| {
        if t.mode == "tcp" {
            "CONNECTIONS"
        } else {
            "REQUESTS"
        }
    });
    // In a cluster, where each runs.
    let cluster = d.instances.iter().any(|i| i.host.is_some());
    let mut head = vec!["INSTANCE"];
    if cluster {
        head.push("HOST");
    }
    head.extend([
        "PID", "STATE", "RESTARTS", "VERSION", "PORT", "MEM", "CPU", "INFLIGHT",
    ]);
    if let Some(s) = served {
        head.extend([s, "ERRORS", "RETRIED"]);
    }
    let mut table: Vec<Vec<String>> = vec![head.into_iter().map(String::from).collect()];
    for i in &d.instances {
        let mut row = vec![i.instance.to_string()];
        if cluster {
            row.push(i.host.clone().unwrap_or_else(|| "-".into()));
        }
        row.extend([
            i.pid.map_or("-".into(), |p| p.to_string()),
            i.state.clone(),
            i.restarts.to_string(),
            i.version.clone(),
            i.port.map_or("-".into(), |p| p.to_string()),
            i.usage.map_or("-".into(), |u| human_bytes(u.rss)),
            i.usage.map_or("-".into(), |u| format!("{:.2}s", u.cpu)),
            i.inflight.to_string(),
        ]);
        if served.is_some() {
            let t = i.traffic;
            for v in [
                t.map(|t| t.served),
                t.map(|t| t.errors),
                t.map(|t| t.retried),
            ] {
                row.push(v.map_or("-".into(), |v| v.to_string()));
            }
        }
        table.push(row);
    }
    print_table(&mut out, &table)?;
    if !d.events.is_empty() {
        writeln!(out, "\nrecent events (deploy events {})", d.service)?;
        for e in &d.events {
            writeln!(out, "  {e}")?;
        }
    }
    Ok(Exit::Ok)
}

/// The service's instances, as their files and `traffic` say.
fn instances(dir: &Path, traffic: &[(u32, InstanceTraffic)]) -> Vec<Instance> {
    ns::instance_numbers(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|n| {
            let d = dir.join(n.to_string());
            Instance {
                instance: n,
                pid: ns::read_field(&d, "pid").parse().ok(),
                state: ns::read_field(&d, "state"),
                restarts: ns::read_field(&d, "restarts").parse().unwrap_or(0),
                version: ns::read_field(&d, "version"),
                port: ns::read_field(&d, "port").parse().ok(),
                inflight: ns::read_field(&d, "inflight").parse().unwrap_or(0),
                traffic: traffic.iter().find(|(m, _)| *m == n).map(|(_, t)| *t),
                usage: usage(&ns::read_field(&d, "usage")),
                host: Some(ns::read_field(&d, "host")).filter(|h| !h.is_empty()),
            }
        })
        // An instance that went between the listing and the reads.
        .filter(|i| !i.state.is_empty())
        .collect()
}

fn print_table<R: AsRef<[S]>, S: AsRef<str>>(
    out: &mut impl Write,
    rows: &[R],
) -> std::io::Result<()> {
    let n = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let mut widths = vec![0usize; n];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r.as_ref()) {
            *w = (*w).max(c.as_ref().len());
        }
    }
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.as_ref().iter().enumerate() {
            let c = c.as_ref();
            if i + 1 == n {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// `deploy history SERVICE`: the versions kept (the files of `history/`,
/// which the namespace lists oldest first), newest first, with which one
/// runs and which is the previous one.
pub fn history(ns: &Ns, service: &str, json: bool) -> Result<Exit, Fail> {
    let dir = ns.service(service)?;
    let current = ns::read_field(&dir, "version");
    let previous = ns::read_field(&dir, "previous_version");
    let history = dir.join("history");
    let mut versions: Vec<String> = std::fs::read_dir(&history)
        .map_err(|e| ns::io_fail(&history, e))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    versions.reverse();
    let mut out = std::io::stdout().lock();
    if json {
        let rows: Vec<serde_json::Value> = versions
            .iter()
            .map(|v| {
                serde_json::json!({
                    "version": v,
                    "running": v == &current,
                    "previous": v == &previous,
                })
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &rows).map_err(std::io::Error::other)?;
        writeln!(out)?;
        return Ok(Exit::Ok);
    }
    for v in &versions {
        let role = match v {
            _ if *v == current => " running",
            _ if *v == previous => " previous",
            _ => "",
        };
        writeln!(out, "{v}{role}")?;
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_an_instances_usage() {
        let u = super::usage("processes 2\nrss 13107200\ncpu 1.25\n").expect("usage");
        assert_eq!((u.processes, u.rss, u.cpu), (2, 13107200, 1.25));
        assert_eq!(super::usage("processes 0\nrss 0\ncpu 0.00\n"), None);
        assert_eq!(super::usage(""), None);
        assert_eq!(super::usage("processes x\nrss 1\ncpu 1\n"), None);
        assert_eq!(super::human_bytes(812 * 1024), "812K");
        assert_eq!(super::human_bytes(13107200), "12.5M");
        assert_eq!(super::human_bytes(3 << 30), "3.0G");
    }

    #[test]
    fn reads_the_traffic_totals() {
        let t = super::traffic(
            "port 8080 http\nrequests 12\ninflight 3\nerrors 1\nretried 2\nabandoned 4\n\
             waiting 5\ninstance 0 requests 12 inflight 3 errors 1 retried 2 abandoned 4\n",
        )
        .unwrap();
        assert_eq!(
            (t.port, t.mode.as_str(), t.served, t.inflight, t.errors),
            (8080, "http", 12, 3, 1)
        );
        assert_eq!((t.retried, t.abandoned, t.waiting), (2, Some(4), 5));
        let t = super::traffic(
            "port 9 tcp\nconnections 5\ninflight 0\nerrors 0\nretried 1\n\
             instance 0 connections 5 inflight 0 errors 0 retried 1\n",
        )
        .unwrap();
        assert_eq!(
            (t.mode.as_str(), t.served, t.retried, t.abandoned),
            ("tcp", 5, 1, None)
        );
        let rows = super::instance_traffic(
            "port 8080 http\nrequests 12\ninflight 3\nerrors 1\nretried 2\nabandoned 4\n\
             instance 0 requests 12 inflight 3 errors 1 retried 2 abandoned 4\n\
             instance 3 requests 7 inflight 0 errors 0 retried 0 abandoned 0 draining\n",
        );
        let t = |served, errors, retried| super::InstanceTraffic {
            served,
            errors,
            retried,
        };
        assert_eq!(rows, vec![(0, t(12, 1, 2)), (3, t(7, 0, 0))]);
        let rows = super::instance_traffic(
            "port 9 tcp\nconnections 5\ninflight 0\nerrors 0\nretried 1\n\
             instance 1 connections 5 inflight 0 errors 0 retried 1\n",
        );
        assert_eq!(rows, vec![(1, t(5, 0, 1))]);
        // A counter missing: not traffic.
        assert!(super::traffic("port 9 tcp\nconnections 5\ninflight 0\n").is_none());
        assert!(super::traffic("no port: deployd routes no traffic to this service").is_none());
        assert!(super::traffic("").is_none());
    }

    #[test]
    fn says_what_was_served_between_two_readings() {
        let http = |requests, errors, retried, abandoned| {
            super::traffic(&format!(
                "port 8080 http\nrequests {requests}\ninflight 3\nerrors {errors}\n\
                 retried {retried}\nabandoned {abandoned}\n"
            ))
            .unwrap()
        };
        let before = http(100, 1, 0, 2);
        assert_eq!(
            http(1300, 1, 2, 2).since(&before).as_deref(),
            Some("1200 requests, 0 errors, 2 retried, 0 abandoned")
        );
        let tcp = |port, connections| {
            super::traffic(&format!(
                "port {port} tcp\nconnections {connections}\ninflight 0\nerrors 0\nretried 0\n"
            ))
            .unwrap()
        };
        assert_eq!(
            tcp(9, 50).since(&tcp(9, 8)).as_deref(),
            Some("42 connections, 0 errors, 0 retried")
        );
        // Counters that started again (a new port, a new mode, deployd
        // restarted) say nothing about the interval.
        assert_eq!(tcp(10, 50).since(&tcp(9, 8)), None);
        assert_eq!(tcp(8080, 50).since(&before), None);
        assert_eq!(http(5, 0, 0, 0).since(&before), None);
    }
}
