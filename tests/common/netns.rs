//! Hosts in network namespaces, for the partition tests: each a namespace
//! with its own address on a bridge in the root namespace (veth pairs), so
//! that a host's link can be cut and healed. Everything is created by the
//! test and deleted when dropped, even by a failing test: the processes in
//! the namespaces are killed, the namespaces and the bridge deleted.

use std::process::Command;

/// A bridge and `n` namespaces on it.
pub struct Net {
    bridge: String,
    names: Vec<String>,
    /// `10.X.Y`
    prefix: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

impl Net {
    /// `n` namespaces on a new bridge; `None` (or a failure under CI)
    /// when namespaces cannot be made here.
    pub fn create(n: usize) -> Option<Net> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let k = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = (std::process::id() % 5000) * 8 + k % 8;
        let prefix = format!("10.{}.{}", 100 + tag / 250 % 150, tag % 250);
        let mut net = Net {
            bridge: format!("dbr{tag}"),
            names: Vec::new(),
            prefix,
        };
        let ok = ip(&["link", "add", &net.bridge, "type", "bridge"])
            && ip(&[
                "addr",
                "add",
                &format!("{}.254/24", net.prefix),
                "dev",
                &net.bridge,
            ])
            && ip(&["link", "set", &net.bridge, "up"]);
        if !ok {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("cannot make a bridge (ip link add): the partition tests must run under CI");
            }
            eprintln!("skipping a partition test: cannot make network namespaces here");
            return None;
        }
        for i in 1..=n {
            let ns = format!("dns{tag}h{i}");
            let (outer, inner) = (format!("dv{tag}h{i}"), format!("dv{tag}n{i}"));
            let addr = format!("{}.{i}/24", net.prefix);
            let ok = ip(&["netns", "add", &ns])
                && ip(&[
                    "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                ])
                && ip(&["link", "set", &inner, "netns", &ns])
                && ip(&["link", "set", &outer, "master", &net.bridge, "up"])
                && ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner])
                && ip(&["-n", &ns, "link", "set", &inner, "up"])
                && ip(&["-n", &ns, "link", "set", "lo", "up"]);
            net.names.push(ns);
            assert!(ok, "cannot set up network namespace {i}");
        }
        Some(net)
    }

    /// Host `i`'s address (1-based).
    pub fn addr(&self, i: usize) -> String {
        format!("{}.{i}", self.prefix)
    }

    /// What runs a program in host `i`'s network namespace (only: the
    /// mount namespace stays the root's, so its FUSE mount is seen here).
    pub fn enter(&self, i: usize) -> Vec<String> {
        vec![
            "nsenter".into(),
            format!("--net=/var/run/netns/{}", self.names[i - 1]),
            "--".into(),
        ]
    }

    /// Cuts host `i`'s link to the others.
    pub fn cut(&self, i: usize) {
        let tag = self.bridge.trim_start_matches("dbr");
        assert!(ip(&["link", "set", &format!("dv{tag}h{i}"), "down"]));
    }

    /// Heals it.
    pub fn heal(&self, i: usize) {
        let tag = self.bridge.trim_start_matches("dbr");
        assert!(ip(&["link", "set", &format!("dv{tag}h{i}"), "up"]));
    }

    /// The pids of the processes in host `i`'s namespace.
    pub fn pids(&self, i: usize) -> Vec<u32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.names[i - 1]])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 1..=self.names.len() {
            for pid in self.pids(i) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for ns in &self.names {
            ip(&["netns", "del", ns]);
        }
        ip(&["link", "del", &self.bridge]);
    }
}
