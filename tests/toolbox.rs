//! deployd among the tools an operator runs around a server: its service
//! manager's notifications, Prometheus, the kernel's limits, the CLI's
//! conventions. Each against the real thing: a notify socket as systemd
//! listens on, a scrape over HTTP parsed by Prometheus' own parser, a
//! cgroup's limits enforced by the kernel.

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::mpsc;
use std::time::{Duration, Instant};

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
