//! deployd among the tools an operator runs around a server: its service
//! manager's notifications, Prometheus, the kernel's limits, the CLI's
//! conventions. Each against the real thing: a notify socket as systemd
//! listens on, a scrape over HTTP parsed by Prometheus' own parser, a
//! cgroup's limits enforced by the kernel.

mod common;

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::load::{Client, Load};
use common::{Deployd, wait_for};

/// A socket that listens as systemd does on `NOTIFY_SOCKET`: each
/// datagram, as text, when it came.
struct Manager {
    rx: mpsc::Receiver<(Instant, String)>,
}

impl Manager {
    fn bind(path: &std::path::Path) -> Manager {
        let sock = UnixDatagram::bind(path).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if tx.send((Instant::now(), text)).is_err() {
                    return;
                }
            }
        });
        Manager { rx }
    }

    /// Datagrams until one has `line` among its lines; all of them.
    fn until(&self, line: &str, timeout: Duration) -> Vec<String> {
        let end = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((_, text)) => {
                    let found = text.lines().any(|l| l == line);
                    seen.push(text);
                    if found {
                        return seen;
                    }
                }
                Err(_) => panic!("no {line} in {timeout:?}; got {seen:?}"),
            }
        }
    }
}

/// Under a service manager: `READY=1` only once the namespace is mounted
/// and every service's instances are ready (here they take 1.5 s to say
/// so), with `MAINPID` and a `STATUS=` line; `RELOADING=1` for `reexec`
/// and `READY=1` again from the deployd it became (same pid);
/// `STOPPING=1` at SIGTERM.
#[test]
fn the_service_manager_hears_ready_reloading_and_stopping() {
    let web = format!(
        "exec exec python3 {}\nport {}\nreplicas 2\nhealth notify\nenv READY_AFTER_MS=1500\n",
        common::app().display(),
        common::free_port()
    );
    let Some(mut d) = Deployd::prepare_with(&[("web", web)], "") else {
        return;
    };
    let sock = d.dir.path().join("notify.sock");
    let manager = Manager::bind(&sock);
    d.env
        .push(("NOTIFY_SOCKET".into(), sock.display().to_string()));
    let started = Instant::now();
    d.launch();
    let seen = manager.until("READY=1", Duration::from_secs(30));
    // At that moment the namespace answers, every instance is ready.
    assert_eq!(d.field("active/web/update_progress"), "2/2", "{seen:?}");
    assert!(started.elapsed() >= Duration::from_millis(1500), "{seen:?}");
    let ready = seen.last().unwrap();
    assert!(ready.contains(&format!("MAINPID={}", d.pid())), "{ready:?}");
    assert!(
        ready.contains("STATUS=1 service, 2/2 instances ready"),
        "{ready:?}"
    );
    // No instance was told deployd's socket: each has its own.
    let environ = std::fs::read(format!("/proc/{}/environ", d.instances("web")[0].1)).unwrap();
    let theirs = String::from_utf8_lossy(&environ);
    assert!(!theirs.contains(&*sock.to_string_lossy()), "{theirs}");

    // As the unit's ExecReload does it: by the configuration, not the
    // mountpoint.
    let out = std::process::Command::new(common::deployd_bin())
        .arg("--config")
        .arg(d.config())
        .arg("reexec")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(
        common::stdout(&out).contains("back in"),
        "{}",
        common::stdout(&out)
    );
    manager.until("RELOADING=1", Duration::from_secs(30));
    let again = manager.until("READY=1", Duration::from_secs(30));
    let ready = again.last().unwrap();
    assert!(ready.contains(&format!("MAINPID={}", d.pid())), "{ready:?}");
    wait_for(
        "the namespace after reexec",
        Duration::from_secs(20),
        || d.try_read("active/web/update_progress").trim() == "2/2",
    );

    d.sigterm();
    manager.until("STOPPING=1", Duration::from_secs(30));
    assert_eq!(d.wait_exit(Duration::from_secs(60)), Some(0), "{}", d.log());
}

/// Metrics as Prometheus' own Python client parses them (not our parser):
/// from `source`, a URL or a file. Each sample as `name{k="v",...}`
/// (labels sorted) to its value.
fn scrape(source: &str) -> HashMap<String, f64> {
    let script = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
src = sys.argv[1]
text = urllib.request.urlopen(src).read().decode() if src.startswith("http") else open(src).read()
out = {}
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        labels = ",".join('%s="%s"' % (k, v) for k, v in sorted(s.labels.items()))
        out["%s{%s}" % (s.name, labels)] = s.value
print(json.dumps(out))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, source])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Whether Prometheus' Python client is here (CI installs it).
fn have_parser() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import prometheus_client.parser"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok || std::env::var_os("CI").is_none(),
        "CI must install prometheus-client (pip)"
    );
    ok
}

/// A Prometheus server, killed when dropped.
struct Prometheus {
    child: std::process::Child,
    port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Debian's `prometheus`, scraping `target` every second; `None`
    /// where it is not installed (outside CI).
    fn scraping(dir: &std::path::Path, target: &str) -> Option<Prometheus> {
        let have = std::process::Command::new("prometheus")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            have || std::env::var_os("CI").is_none(),
            "CI must install prometheus (apt)"
        );
        if !have {
            return None;
        }
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: deployd\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = common::free_port();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        Some(Prometheus { child, port })
    }
}

/// `GET /metrics` on the `metrics` address and `/deploy/metrics` parse
/// with Prometheus' own parser; the request counter and the latency
/// histogram move by at least the requests a load made; rollouts are
/// counted by outcome; a real Prometheus scraping deployd sees it up.
#[test]
fn prometheus_scrapes_metrics_that_move_under_load() {
    if !have_parser() {
        return;
    }
    let port = common::free_port();
    let mport = common::free_port();
    let web = common::app_manifest(2, &format!("port {port}\n"));
    let Some(mut d) = Deployd::prepare_with(
        &[("web", web)],
        &format!("metrics = \"127.0.0.1:{mport}\"\n"),
    ) else {
        return;
    };
    d.launch();
    d.settle("web", Duration::from_secs(60));
    let url = format!("http://127.0.0.1:{mport}/metrics");
    let web = |k: &str| format!("{k}{{service=\"web\"}}");
    let before = scrape(&url);
    let requests = before[&web("deployd_requests_total")];
    let observed = before[&web("deployd_request_duration_seconds_count")];

    let load = Load::start(port, &[(Client::KeepAlive, 2), (Client::Fresh, 1)], "/");
    std::thread::sleep(Duration::from_secs(1));
    let counters = load.finish();
    assert_eq!(counters.failed(), 0);
    let n = counters.ok() as f64;
    assert!(n > 50.0, "{n}");

    let after = scrape(&url);
    assert!(
        after[&web("deployd_requests_total")] >= requests + n,
        "{after:?}"
    );
    let count = after[&web("deployd_request_duration_seconds_count")];
    assert!(count >= observed + n, "{after:?}");
    let inf = after["deployd_request_duration_seconds_bucket{le=\"+Inf\",service=\"web\"}"];
    assert_eq!(inf, count);
    // On loopback, most answers within 100 ms.
    let fast = after["deployd_request_duration_seconds_bucket{le=\"0.1\",service=\"web\"}"];
    assert!(fast > count / 2.0, "{after:?}");
    assert_eq!(after[&web("deployd_replicas")], 2.0);
    assert_eq!(
        after["deployd_rollouts_total{outcome=\"done\",service=\"web\"}"],
        1.0
    );
    for i in ["0", "1"] {
        let key = |k: &str| format!("{k}{{instance=\"{i}\",service=\"web\"}}");
        assert_eq!(after[&key("deployd_instance_ready")], 1.0, "{after:?}");
        assert!(
            after[&key("deployd_instance_memory_bytes")] > 1e6,
            "{after:?}"
        );
        assert!(
            after[&key("deployd_instance_requests_total")] > 0.0,
            "{after:?}"
        );
    }

    // The same through the namespace.
    let file = scrape(&d.path("metrics").display().to_string());
    assert!(file[&web("deployd_requests_total")] >= after[&web("deployd_requests_total")]);

    // A real Prometheus sees the target up.
    let Some(p) = Prometheus::scraping(d.dir.path(), &format!("127.0.0.1:{mport}")) else {
        return;
    };
    let mut last = String::new();
    let up = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        last = common::http_get_at("127.0.0.1", p.port, "/api/v1/targets")
            .map(|(_, b)| b)
            .unwrap_or_default();
        last.contains("\"health\":\"up\"")
    });
    assert!(up, "{last}");
    d.terminate();
}

/// `PATH` with the directory of the `deploy` under test first.
fn path_with_deploy() -> std::ffi::OsString {
    let bin = common::deploy_bin();
    let mut dirs = vec![bin.parent().unwrap().to_path_buf()];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(dirs).unwrap()
}

/// What bash completes for `words` (the last one being completed), with
/// the script `deploy completions bash` printed.
fn complete_bash(d: &Deployd, words: &[&str]) -> Vec<String> {
    let script = format!(
        "source <(\"$0\" completions bash)\nCOMP_WORDS=({words})\nCOMP_CWORD={cword}\n\
         _clap_complete_deploy deploy \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        words = words
            .iter()
            .map(|w| format!("'{w}'"))
            .collect::<Vec<_>>()
            .join(" "),
        cword = words.len() - 1,
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .arg(common::deploy_bin())
        .env("DEPLOY_ROOT", &d.mnt)
        // The script runs the `deploy` on the PATH, as once installed.
        .env("PATH", path_with_deploy())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    common::stdout(&out)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// `deploy completions bash` completes commands and the services deployd
/// runs; the manual pages render with man; `--json` output parses.
#[test]
fn completions_manual_pages_and_json() {
    let Some(d) = Deployd::start_settled(&[
        ("web", common::app_manifest(1, "")),
        ("worker", common::app_manifest(1, "")),
    ]) else {
        return;
    };
    assert_eq!(complete_bash(&d, &["deploy", "ap"]), ["apply"]);
    assert_eq!(
        complete_bash(&d, &["deploy", "status", "w"]),
        ["web", "worker"]
    );
    assert_eq!(complete_bash(&d, &["deploy", "stop", "wo"]), ["worker"]);

    // Every command that prints state, with --json: one document, or
    // (events, logs) a document per line.
    let file = d.manifests.join("web.manifest").display().to_string();
    let whole = [
        vec!["status"],
        vec!["status", "web"],
        vec!["history", "web"],
        vec!["plan", "web"],
        vec!["diff", &file],
        vec!["check", &file],
    ];
    for args in whole {
        let mut args = args.clone();
        args.push("--json");
        let out = d.deploy(&args);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", common::stdout(&out)));
        assert!(!v.is_null(), "{args:?}");
    }
    let history = d.deploy(&["history", "web", "--json"]);
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    assert_eq!(history[0]["running"], true, "{history}");
    for args in [["events", "web", "--json"], ["logs", "web", "--json"]] {
        let out = d.deploy(&args);
        let text = common::stdout(&out);
        assert!(!text.is_empty(), "{args:?}");
        for line in text.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{args:?}: {e}: {line}"));
            assert!(v["line"].is_string(), "{line}");
            assert!(v["time"].is_string(), "{line}");
        }
    }

    let man = d.dir.path().join("man");
    let out = d.deploy(&["man", &man.display().to_string()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let out = std::process::Command::new(common::deployd_bin())
        .arg("man")
        .arg(&man)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    for (page, says) in [
        ("deploy.1", "Drive deployd through its /deploy namespace"),
        ("deploy-apply.1", "deploy apply"),
        ("deployd.8", "Deployment server with a file namespace"),
    ] {
        let out = std::process::Command::new("man")
            .arg("-l")
            .arg(man.join(page))
            .env("MANWIDTH", "200")
            .output()
            .unwrap();
        let text = common::stdout(&out);
        assert!(
            out.status.success() && text.contains(says),
            "{page}: {text}"
        );
    }
}

/// A service running `script` (Python) with `limits`, no port, healthy
/// while it runs.
fn limited(d_dir: &std::path::Path, name: &str, script: &str, limits: &str) -> String {
    let path = d_dir.join(format!("{name}.py"));
    std::fs::write(&path, script).unwrap();
    format!(
        "exec exec python3 {}\nhealth exec true\nhealth_interval 200ms\n{limits}",
        path.display()
    )
}

/// CPU seconds (user and system) of `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// The kernel holds instances to their manifest's limits: over
/// `memory_max` it OOM-kills one (events say so, and it restarts);
/// `cpu_max 0.5` holds a busy loop to half a core; `pids_max 50` stops a
/// fork bomb at 50. Where the controllers are missing, `deploy check`
/// says so at the directive.
#[test]
fn the_kernel_holds_instances_to_their_limits() {
    let Some(mut d) = Deployd::prepare_with(&[], "") else {
        return;
    };
    let have = deployd_lib::host::controllers();
    let dir = d.dir.path().to_path_buf();
    let hog = limited(
        &dir,
        "hog",
        "import time\ntime.sleep(1.5)\nb = bytearray(b'x') * (200 << 20)\ntime.sleep(60)\n",
        "memory_max 64M\n",
    );
    let spin = limited(&dir, "spin", "while True:\n    pass\n", "cpu_max 0.5\n");
    let bomb = limited(
        &dir,
        "bomb",
        "import os, time\nn = 0\ntry:\n    while n < 500:\n        if os.fork() == 0:\n            time.sleep(120)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('fork failed after', n, e, flush=True)\ntime.sleep(120)\n",
        "pids_max 50\n",
    );
    let wanted = ["memory", "cpu", "pids"];
    if !wanted.iter().all(|c| have.contains(c)) {
        // deploy check names what is missing, at its line.
        d.write_manifest("hog", &hog);
        let out = d.deploy(&[
            "check",
            &d.manifests.join("hog.manifest").display().to_string(),
        ]);
        assert!(
            common::stderr(&out).contains("memory_max needs the cgroup memory controller"),
            "{}",
            common::stderr(&out)
        );
        assert!(
            std::env::var_os("CI").is_none(),
            "no cgroup controllers in CI: {have:?}"
        );
        return;
    }
    for (name, text) in [("hog", &hog), ("spin", &spin), ("bomb", &bomb)] {
        d.write_manifest(name, text);
    }
    d.launch();
    for name in ["hog", "spin", "bomb"] {
        d.settle(name, Duration::from_secs(60));
    }

    // cpu_max 0.5: about half a core over 3 s, not the whole one it asks.
    let pid: u32 = d.field("active/spin/instances/0/pid").parse().unwrap();
    let (t0, c0) = (Instant::now(), cpu_seconds(pid));
    std::thread::sleep(Duration::from_secs(3));
    let cores = (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64();
    assert!(
        (0.3..=0.65).contains(&cores),
        "cpu_max 0.5 let it use {cores:.2} cores"
    );

    // pids_max 50: the 50th task is refused.
    wait_for(
        "the fork bomb to hit pids_max",
        Duration::from_secs(30),
        || d.instance_log("bomb", 0).contains("fork failed after"),
    );
    let log = d.instance_log("bomb", 0);
    assert!(log.contains("fork failed after 49"), "{log}");

    // memory_max 64M: killed by the kernel, said so, and started again.
    let first: u32 = d.field("active/hog/instances/0/pid").parse().unwrap();
    let events = d.wait_events("hog", "out of memory", 1);
    assert!(
        events.contains("killed by the kernel: out of memory, over its memory_max"),
        "{events}"
    );
    wait_for("hog to be started again", Duration::from_secs(30), || {
        d.try_read("active/hog/instances/0/pid")
            .trim()
            .parse::<u32>()
            .is_ok_and(|p| p != first)
    });
    d.terminate();
}
