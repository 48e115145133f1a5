//! A cluster for the end-to-end tests: a real 3-member etcd (Debian's
//! `etcd-server`) and deployd hosts on loopback addresses 127.0.0.2, .3,
//! .4, each with its own mount, state and `bind`, all in one temporary
//! directory. Ports are unique per test, so tests run in parallel.
//!
//! Dropped, even by a failing test: every deployd is stopped (with what
//! it runs), every etcd member killed, the directories removed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Deployd, free_port, wait_for};

/// The etcd binary, or a clear failure under CI.
pub fn etcd_bin() -> Option<PathBuf> {
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if Path::new(p).exists() {
            return Some(PathBuf::from(p));
        }
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "etcd is not installed (apt-get install etcd-server): the cluster tests must run under CI"
        );
    }
    eprintln!("skipping a cluster test: etcd is not installed (apt-get install etcd-server)");
    None
}

/// One etcd member.
pub struct Member {
    pub name: String,
    /// Where it listens.
    pub host: String,
    /// A program it runs under (`nsenter --net=...`), if any.
    wrapper: Vec<String>,
    pub client: u16,
    pub peer: u16,
    dir: PathBuf,
    child: Option<Child>,
    cluster: String,
    log: PathBuf,
}

/// A 3-member etcd cluster.
pub struct Etcd {
    pub members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts `n` members on 127.0.0.1 and waits until they answer.
    pub fn start(n: usize) -> Option<Etcd> {
        Etcd::start_at(
            (0..n)
                .map(|_| ("127.0.0.1".to_string(), Vec::new()))
                .collect(),
        )
    }

    /// Starts a member at each (address, wrapper) and waits until they
    /// answer.
    pub fn start_at(at: Vec<(String, Vec<String>)>) -> Option<Etcd> {
        let bin = etcd_bin()?;
        // On tmpfs when there is one: etcd's fsyncs are its slowest part,
        // and what is measured here is deployd.
        let base = if Path::new("/dev/shm").is_dir() {
            tempfile::Builder::new()
                .prefix("deployd-etcd")
                .tempdir_in("/dev/shm")
        } else {
            tempfile::Builder::new().prefix("deployd-etcd").tempdir()
        }
        .expect("tempdir");
        let mut members: Vec<Member> = at
            .into_iter()
            .enumerate()
            .map(|(i, (host, wrapper))| Member {
                host,
                wrapper,
                name: format!("e{i}"),
                client: free_port(),
                peer: free_port(),
                dir: base.path().join(format!("e{i}")),
                child: None,
                cluster: String::new(),
                log: base.path().join(format!("e{i}.log")),
            })
            .collect();
        let cluster: Vec<String> = members
            .iter()
            .map(|m| format!("{}=http://{}:{}", m.name, m.host, m.peer))
            .collect();
        let cluster = cluster.join(",");
        let token = format!("deployd-test-{}-{}", std::process::id(), members[0].client);
        for m in &mut members {
            m.cluster = cluster.clone();
            m.launch(&bin, &token, "new");
        }
        let etcd = Etcd {
            members,
            _dir: base,
        };
        etcd.wait_healthy(Duration::from_secs(30));
        Some(etcd)
    }

    /// The client URLs, as deployd's `[cluster] etcd` lists them.
    pub fn endpoints(&self) -> String {
        let urls: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("\"http://{}:{}\"", m.host, m.client))
            .collect();
        format!("[{}]", urls.join(", "))
    }

    /// Waits until a member answers a linearizable read.
    pub fn wait_healthy(&self, timeout: Duration) {
        wait_for("etcd to answer", timeout, || {
            self.members.iter().any(|m| m.healthy())
        });
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Starts member `i` again, with its data.
    pub fn restart(&mut self, i: usize) {
        let bin = etcd_bin().expect("etcd");
        self.members[i].launch(&bin, "unused", "existing");
    }
}

impl Member {
    fn launch(&mut self, bin: &Path, token: &str, state: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let (h, c, p) = (&self.host, self.client, self.peer);
        let child = cmd
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.dir)
            .args([
                "--listen-client-urls",
                &format!("http://{h}:{c}"),
                "--advertise-client-urls",
                &format!("http://{h}:{c}"),
                "--listen-peer-urls",
                &format!("http://{h}:{p}"),
                "--initial-advertise-peer-urls",
                &format!("http://{h}:{p}"),
                "--initial-cluster",
                &self.cluster,
                "--initial-cluster-token",
                token,
                "--initial-cluster-state",
                state,
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it answers `/health` with a leader.
    fn healthy(&self) -> bool {
        super::http_get_at(&self.host, self.client, "/health")
            .is_ok_and(|(status, body)| status == 200 && body.contains("\"true\""))
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Several deployd hosts on one etcd.
pub struct Cluster {
    pub hosts: Vec<Deployd>,
    pub etcd: Etcd,
}

impl Cluster {
    /// A 3-member etcd and `n` hosts (h1 at 127.0.0.2, h2 at .3, ...),
    /// each with `manifests` in its manifests directory; waits until every
    /// host sees every other and one leads.
    pub fn start(n: usize, manifests: &[(&str, String)]) -> Option<Cluster> {
        if !super::fuse_available() {
            return None;
        }
        let etcd = Etcd::start(3)?;
        let mut hosts = Vec::new();
        for i in 1..=n {
            hosts.push(Cluster::host(&etcd, i, manifests, "")?);
        }
        let c = Cluster { hosts, etcd };
        c.wait_formed(Duration::from_secs(30));
        Some(c)
    }

    /// A 3-host cluster in network namespaces: host `i` in `net`'s
    /// namespace `i`, with an etcd member beside it.
    pub fn start_in(net: &super::netns::Net, manifests: &[(&str, String)]) -> Option<Cluster> {
        if !super::fuse_available() {
            return None;
        }
        let etcd = Etcd::start_at((1..=3).map(|i| (net.addr(i), net.enter(i))).collect())?;
        let mut hosts = Vec::new();
        for i in 1..=3 {
            let a = net.addr(i);
            let config = format!(
                "bind = \"{a}\"\n[cluster]\netcd = {}\nhost = \"h{i}\"\naddress = \"{a}\"\nhost_timeout = \"3s\"\n",
                etcd.endpoints()
            );
            let mut d = Deployd::prepare_with(manifests, &config)?;
            d.wrapper = net.enter(i);
            d.launch();
            hosts.push(d);
        }
        let c = Cluster { hosts, etcd };
        c.wait_formed(Duration::from_secs(30));
        Some(c)
    }

    /// Host `i`'s deployd (not started), with `extra` in its `[cluster]`.
    pub fn host(
        etcd: &Etcd,
        i: usize,
        manifests: &[(&str, String)],
        extra: &str,
    ) -> Option<Deployd> {
        let config = format!(
            "bind = \"127.0.0.{a}\"\n[cluster]\netcd = {}\nhost = \"h{i}\"\naddress = \"127.0.0.{a}\"\nhost_timeout = \"3s\"\n{extra}",
            etcd.endpoints(),
            a = i + 1
        );
        let mut d = Deployd::prepare_with(manifests, &config)?;
        d.launch();
        Some(d)
    }

    /// Waits until every host sees all of them up and one leader.
    pub fn wait_formed(&self, timeout: Duration) {
        let n = self.hosts.len();
        wait_for("the hosts to see each other and a leader", timeout, || {
            self.hosts.iter().all(|h| {
                let c = h.try_read("cluster");
                c.contains(&format!("hosts up {n} ")) && !c.contains("leader none")
            })
        });
    }

    /// Host `i` (1-based: h1 is `host(1)`).
    pub fn h(&self, i: usize) -> &Deployd {
        &self.hosts[i - 1]
    }

    /// The leader's name, as h1 sees it.
    pub fn leader(&self) -> String {
        self.h(1)
            .try_read("cluster")
            .lines()
            .find_map(|l| l.strip_prefix("leader ").map(str::to_string))
            .unwrap_or_default()
    }

    /// Waits until `rel` reads `want` on every host; returns how long the
    /// slowest took from the first that did.
    pub fn wait_all(&self, rel: &str, want: &str, timeout: Duration) -> Duration {
        let until = Instant::now() + timeout;
        let mut first: Option<Instant> = None;
        let mut seen = vec![false; self.hosts.len()];
        while Instant::now() < until {
            for (i, h) in self.hosts.iter().enumerate() {
                if !seen[i] && h.try_read(rel) == want {
                    seen[i] = true;
                    first.get_or_insert_with(Instant::now);
                }
            }
            if seen.iter().all(|s| *s) {
                return first.map_or(Duration::ZERO, |f| f.elapsed());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let got: Vec<String> = self.hosts.iter().map(|h| h.try_read(rel)).collect();
        panic!(
            "timed out after {timeout:?} waiting for {rel} to read {want:?} on every host: {got:?}\nevents on h1:\n{}",
            self.h(1).try_read("active/web/events")
        );
    }
}
