//! The end-to-end harness: a real deployd on a real FUSE mount in a temporary
//! directory, driven with the real `deploy` binary and plain file reads.
//!
//! Every [`Deployd`] cleans up when dropped, even when the test failed: it
//! stops deployd (SIGTERM, then SIGKILL), detaches the mount if one is left,
//! and kills every process group deployd recorded.

#![allow(dead_code)]

pub mod cluster;
pub mod load;
pub mod netns;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn deployd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_deployd"))
}

pub fn deploy_bin() -> PathBuf {
    let p = deployd_bin().with_file_name("deploy");
    assert!(
        p.exists(),
        "{} is missing: run the tests with cargo test --workspace",
        p.display()
    );
    p
}

/// The test app, an HTTP server in Python.
pub fn app() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/apps/app.py")
}

/// Whether mount tests can run here. Under CI they must: not being able to is
/// a failure, never a silent skip.
pub fn fuse_available() -> bool {
    let reason = if !Path::new("/dev/fuse").exists() {
        Some("/dev/fuse does not exist")
    } else if !nix::unistd::geteuid().is_root() {
        Some("mounting without fusermount needs root")
    } else {
        None
    };
    match reason {
        None => true,
        Some(r) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("FUSE mount tests cannot run under CI: {r}")
        }
        Some(r) => {
            eprintln!("skipping a FUSE test: {r}");
            false
        }
    }
}

/// Whether cgroup v2 is mounted here, for the tests of what deployd does
/// with it. Under CI it must be (the machine CI runs on has it).
pub fn cgroup2_available() -> bool {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|m| m.lines().any(|l| l.contains(" - cgroup2 ")));
    match mounted {
        true => true,
        false if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("cgroup tests cannot run under CI: no cgroup v2 is mounted")
        }
        false => {
            eprintln!("skipping a cgroup test: no cgroup v2 is mounted");
            false
        }
    }
}

/// The pids of the processes whose command line is exactly `words`.
pub fn pids_running(words: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = words
        .iter()
        .flat_map(|w| [w.as_bytes(), b"\0"].concat())
        .collect();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c == want))
                .filter(|&p| alive(p))
                .collect()
        })
        .unwrap_or_default();
    pids.sort();
    pids
}

/// A port nothing listens on now.
///
/// Taken below the kernel's ephemeral range, where `bind(0)` picks: deployd
/// picks its instances' ports there, so a test's public port (chosen, then
/// bound by its deployd a moment later) can never be handed to an instance
/// of a deployd another test runs meanwhile. Unique within the test
/// process, so parallel tests never pick the same one either.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    // The range's first port, or Linux's default.
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32_768u32)
        .max(LOW + 1_000);
    let span = ephemeral - LOW;
    // Test binaries run one after another; each starts somewhere else.
    let base = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let port = LOW + (base + NEXT.fetch_add(1, Ordering::SeqCst)) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port in {LOW}..{ephemeral}")
}

/// Polls `cond` every 20ms until it holds or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub struct Deployd {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
    pub manifests: PathBuf,
    pub state: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    /// deployd's open-file limit (soft and hard), when a test sets one.
    pub nofile: Option<u64>,
    /// A program deployd runs under (`nsenter --net=...`), if any.
    pub wrapper: Vec<String>,
    /// Variables set in deployd's environment.
    pub env: Vec<(String, String)>,
}

impl Deployd {
    /// Starts deployd with these manifests (name, text); `None` if FUSE
    /// tests cannot run here (outside CI only).
    pub fn start(manifests: &[(&str, String)]) -> Option<Deployd> {
        let mut d = Deployd::prepare(manifests)?;
        d.launch();
        Some(d)
    }

    /// As `start`, then waits (up to a minute each) for every one of the
    /// services to be deployed and settled.
    pub fn start_settled(manifests: &[(&str, String)]) -> Option<Deployd> {
        let d = Deployd::start(manifests)?;
        for (name, _) in manifests {
            d.settle(name, Duration::from_secs(60));
        }
        Some(d)
    }

    /// As `start`, deployd's open-file limit (soft and hard) set to
    /// `nofile` before it runs, as `prlimit --nofile` would.
    pub fn start_with_nofile(manifests: &[(&str, String)], nofile: u64) -> Option<Deployd> {
        let mut d = Deployd::prepare(manifests)?;
        d.nofile = Some(nofile);
        d.launch();
        Some(d)
    }

    /// As `start`, with `socket` passed by socket activation.
    pub fn start_with_socket(
        manifests: &[(&str, String)],
        socket: std::os::fd::RawFd,
    ) -> Option<Deployd> {
        let mut d = Deployd::prepare(manifests)?;
        d.launch_with_socket(Some(socket));
        Some(d)
    }

    /// Its directories and configuration, deployd not started.
    fn prepare(manifests: &[(&str, String)]) -> Option<Deployd> {
        Deployd::prepare_with(manifests, "")
    }

    /// As `prepare`, with `extra` appended to its configuration.
    pub fn prepare_with(manifests: &[(&str, String)], extra: &str) -> Option<Deployd> {
        if !fuse_available() {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("deployd-e2e")
            .tempdir()
            .expect("tempdir");
        let mnt = dir.path().join("mnt");
        let m = dir.path().join("manifests");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&m).unwrap();
        for (name, text) in manifests {
            std::fs::write(m.join(format!("{name}.manifest")), text).unwrap();
        }
        let config = dir.path().join("deployd.toml");
        std::fs::write(
            &config,
            format!("mountpoint = \"mnt\"\nmanifests = \"manifests\"\nstate = \"state\"\nlog_level = \"debug\"\n{extra}"),
        )
        .unwrap();
        Some(Deployd {
            mnt,
            manifests: m,
            state,
            config,
            child: None,
            nofile: None,
            wrapper: Vec::new(),
            env: Vec::new(),
            dir,
        })
    }

    /// Starts the deployd process and waits for its namespace.
    pub fn launch(&mut self) {
        self.launch_with_socket(None);
    }

    /// Starts the deployd process as systemd's socket activation would,
    /// with `socket` as its descriptor 3, `LISTEN_FDS=1` and `LISTEN_PID`
    /// its pid, and its log as systemd's journal stream (`JOURNAL_STREAM`
    /// naming it); `None`: as `launch`. Waits for its namespace.
    pub fn launch_with_socket(&mut self, socket: Option<std::os::fd::RawFd>) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("deployd.log"))
            .unwrap();
        let mut cmd = match socket {
            None if !self.wrapper.is_empty() => {
                let mut c = Command::new(&self.wrapper[0]);
                c.args(&self.wrapper[1..]).arg(deployd_bin());
                c
            }
            None => Command::new(deployd_bin()),
            Some(fd) => {
                // The shell's pid is deployd's once it execs.
                let mut c = Command::new("/bin/sh");
                use std::os::unix::fs::MetadataExt;
                let m = log.metadata().unwrap();
                c.env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()));
                c.arg("-c")
                    .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"")
                    .arg(deployd_bin());
                // SAFETY: dup2 and fcntl are async-signal-safe. The copy
                // dup2 makes stays open across exec; if the socket is
                // descriptor 3 already, its close-on-exec flag is cleared.
                unsafe {
                    c.pre_exec(move || {
                        let r = if fd == 3 {
                            libc::fcntl(3, libc::F_SETFD, 0)
                        } else {
                            libc::dup2(fd, 3)
                        };
                        if r < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                c
            }
        };
        if let Some(n) = self.nofile {
            // SAFETY: setrlimit is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start deployd");
        self.child = Some(child);
        let ctl = self.mnt.join("ctl");
        wait_for(
            "the namespace to be mounted",
            Duration::from_secs(20),
            || {
                if let Some(c) = self.child.as_mut() {
                    if let Ok(Some(status)) = c.try_wait() {
                        panic!("deployd exited early ({status}): {}", self.log());
                    }
                }
                ctl.exists()
            },
        );
    }

    /// Its configuration file.
    pub fn config(&self) -> &std::path::Path {
        &self.config
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("deployd.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.sigterm();
        self.wait_exit(Duration::from_secs(30))
    }

    /// Sends deployd SIGTERM, without waiting.
    pub fn sigterm(&self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    /// Sends deployd `signal`, without waiting.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), signal);
        }
    }

    /// Waits up to `timeout` for deployd to exit and returns its exit code
    /// (128 + the signal if one killed it); kills it when it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if let Ok(Some(s)) = c.try_wait() {
                return s.code().or(s.signal().map(|s| 128 + s));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// A namespace file's content.
    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel))
            .unwrap_or_else(|e| panic!("read {rel}: {e}\n{}", self.log()))
    }

    /// A namespace file's content, or empty if it cannot be read (yet).
    pub fn try_read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_default()
    }

    /// A namespace file's content, trimmed.
    pub fn field(&self, rel: &str) -> String {
        self.read(rel).trim_end().to_string()
    }

    pub fn write_manifest(&self, name: &str, text: &str) {
        std::fs::write(self.manifests.join(format!("{name}.manifest")), text).unwrap();
    }

    /// Runs `deploy ARGS` against this namespace.
    pub fn deploy(&self, args: &[&str]) -> Output {
        Command::new(deploy_bin())
            .args(args)
            .env("DEPLOY_ROOT", &self.mnt)
            .stdin(Stdio::null())
            .output()
            .expect("run deploy")
    }

    /// Runs a shell command with `$ROOT` set to the mount.
    pub fn sh(&self, script: &str) -> Output {
        Command::new("bash")
            .arg("-c")
            .arg(script)
            .env("ROOT", &self.mnt)
            .output()
            .expect("run sh")
    }

    /// The output of instance `n` of `service` once its log holds a whole
    /// line (the log pump may copy an instance's output after its probe
    /// passed): the log's lines without the time stamp each must begin with.
    pub fn instance_log(&self, service: &str, n: u32) -> String {
        let rel = format!("active/{service}/instances/{n}/log");
        wait_for(
            "the instance's output in its log",
            Duration::from_secs(30),
            || self.try_read(&rel).ends_with('\n'),
        );
        let log = self.read(&rel);
        log.lines()
            .map(|l| match deployd_lib::stamp::split(l) {
                Some((_, line)) => format!("{line}\n"),
                None => panic!("an unstamped line in {rel}: {l:?}\n{log}"),
            })
            .collect()
    }

    /// Instances of a service: (number, pid, state, version, port).
    pub fn instances(&self, service: &str) -> Vec<(u32, u32, String, String, Option<u16>)> {
        let dir = self.mnt.join("active").join(service).join("instances");
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                    .filter_map(|n| {
                        let d = dir.join(n.to_string());
                        let read = |f: &str| {
                            std::fs::read_to_string(d.join(f))
                                .ok()
                                .map(|s| s.trim().to_string())
                        };
                        Some((
                            n,
                            read("pid")?.parse().unwrap_or(0),
                            read("state")?,
                            read("version")?,
                            read("port")?.parse().ok(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Waits (up to a minute) until the service's events hold `what` at
    /// least `times` times; returns the events then.
    pub fn wait_events(&self, service: &str, what: &str, times: usize) -> String {
        let path = format!("active/{service}/events");
        wait_for(
            &format!("{times} × {what:?} in {service}'s events"),
            Duration::from_secs(60),
            || self.try_read(&path).matches(what).count() >= times,
        );
        self.read(&path)
    }

    /// Waits until the service has no rollout in flight and every slot runs
    /// a ready instance of its version (`update_progress` k/n with k = n).
    pub fn settle(&self, service: &str, timeout: Duration) {
        let settled = || {
            let status = self.try_read(&format!("active/{service}/update_status"));
            let progress = self.try_read(&format!("active/{service}/update_progress"));
            status == "none\n" && progress.trim().split_once('/').is_some_and(|(k, n)| k == n)
        };
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if settled() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // What it was doing instead, for whoever reads the failure.
        panic!(
            "timed out after {timeout:?} waiting for {service} to settle: update_status {:?}, \
             update_progress {:?}, events:\n{}",
            self.try_read(&format!("active/{service}/update_status")),
            self.try_read(&format!("active/{service}/update_progress")),
            self.try_read(&format!("active/{service}/events")),
        );
    }

    fn recorded_groups(&self) -> Vec<i32> {
        let mut v = Vec::new();
        let dirs = [
            self.state.join("services"),
            self.state.join("cluster").join("services"),
        ];
        for dirs in dirs.iter().filter_map(|d| std::fs::read_dir(d).ok()) {
            for d in dirs.filter_map(|e| e.ok()) {
                if let Ok(text) = std::fs::read_to_string(d.path().join("pids")) {
                    v.extend(
                        text.lines()
                            .filter_map(|l| l.split(' ').next()?.parse::<i32>().ok()),
                    );
                }
            }
        }
        v
    }
}

impl Drop for Deployd {
    fn drop(&mut self) {
        let groups = self.recorded_groups();
        self.terminate();
        for g in groups {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(g),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // A mount left by a crashed deployd is detached.
        if std::fs::read_to_string("/proc/self/mountinfo")
            .is_ok_and(|m| m.contains(&*self.mnt.to_string_lossy()))
        {
            let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// A `deploy` command left running (`-f`), its output lines collected as
/// they come; killed and reaped when dropped, even by a failing test.
pub struct Following {
    child: Child,
    lines: std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
    errors: std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Following {
    pub fn start(d: &Deployd, args: &[&str]) -> Following {
        use std::io::BufRead;
        let mut child = Command::new(deploy_bin())
            .args(args)
            .env("DEPLOY_ROOT", &d.mnt)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start deploy");
        let mut readers = Vec::new();
        let mut collect = |from: Box<dyn std::io::Read + Send>| {
            let lines = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
            let sink = lines.clone();
            readers.push(std::thread::spawn(move || {
                for line in std::io::BufReader::new(from).lines().map_while(Result::ok) {
                    sink.lock().push(line);
                }
            }));
            lines
        };
        let lines = collect(Box::new(child.stdout.take().expect("piped stdout")));
        let errors = collect(Box::new(child.stderr.take().expect("piped stderr")));
        Following {
            child,
            lines,
            errors,
            readers,
        }
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().clone()
    }

    /// Every line of its standard error so far.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().clone()
    }

    /// Its exit code, once it has exited within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Its pipes end with it: every line it wrote is collected.
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The live (not zombie) children of `pid`'s main thread, which starts
/// every instance, but for deployd's guard: the kernel lists them in one
/// read, so unlike a walk of the namespace (a file at a time, across
/// renumberings) this is what ran at one moment.
pub fn live_children(pid: u32) -> Vec<u32> {
    children(pid)
        .into_iter()
        .filter(|&p| alive(p) && !is_guard(p))
        .collect()
}

/// Every child of `pid`'s main thread, as the kernel lists them.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether `pid` is a deployd's guard (it kills what is left of the
/// instances of a deployd that died).
pub fn is_guard(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c == "deployd-guard\n")
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// One HTTP/1.1 GET on a fresh connection; the status and body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http_get_at("127.0.0.1", port, path)
}

/// [`http_get`] of a port at another address.
pub fn http_get_at(ip: &str, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect((ip, port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response {buf:?}")))?;
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((status, body))
}

/// A manifest for the test app.
pub fn app_manifest(replicas: u32, extra: &str) -> String {
    format!(
        "exec exec python3 {}\nreplicas {replicas}\nhealth http /healthz\nhealth_interval 200ms\n{extra}",
        app().display()
    )
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The standard error of a command that must have exited with `code`.
pub fn failed_with(o: &Output, code: i32) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "{err}");
    err
}
