//! What every benchmark section needs: a deployd of its own on a temporary
//! mount, the load generator (wrk), and statistics.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A binary built next to this one (`cargo build --release --workspace`).
pub fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .map(|p| p.with_file_name(name))
        .unwrap_or_else(|_| PathBuf::from(name))
}

/// The repository's `bench/` directory.
pub fn bench_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Polls `cond` every `every` until it holds; false after `timeout`.
pub fn wait_until(timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if cond() {
            return true;
        }
        std::thread::sleep(every);
    }
    false
}

/// A deployd on a temporary directory, stopped (and its mount gone) on drop.
pub struct Deployd {
    /// Holds the temporary directory for as long as deployd runs.
    _dir: tempfile::TempDir,
    pub mnt: PathBuf,
    pub manifests: PathBuf,
    config: PathBuf,
    log: PathBuf,
    /// A listening socket passed as by systemd's socket activation.
    socket: Option<RawFd>,
    /// A program deployd runs under (`valgrind --tool=dhat`), if any.
    wrapper: Vec<String>,
    child: Option<Child>,
}

impl Deployd {
    /// Starts deployd with these manifests and waits for its namespace.
    pub fn start(manifests: &[(String, String)]) -> Result<Deployd, String> {
        Deployd::start_with_socket(manifests, None)
    }

    /// As `start`, with deployd run by `wrapper` (a program and its
    /// arguments, deployd's command line after them).
    pub fn start_under(
        manifests: &[(String, String)],
        wrapper: &[String],
    ) -> Result<Deployd, String> {
        Deployd::new(manifests, None, wrapper, "")
    }

    /// As `start`, with `socket` (if any) passed as systemd's socket
    /// activation passes one: descriptor 3, `LISTEN_FDS=1`, `LISTEN_PID`.
    pub fn start_with_socket(
        manifests: &[(String, String)],
        socket: Option<RawFd>,
    ) -> Result<Deployd, String> {
        Deployd::new(manifests, socket, &[], "")
    }

    /// As `start`, with `extra` appended to its configuration (a
    /// `[cluster]` table, a `bind`).
    pub fn start_configured(
        manifests: &[(String, String)],
        extra: &str,
    ) -> Result<Deployd, String> {
        Deployd::new(manifests, None, &[], extra)
    }

    /// As `start_configured`, run by `wrapper` (`nsenter --net=...`).
    pub fn start_wrapped(
        manifests: &[(String, String)],
        wrapper: &[String],
        extra: &str,
    ) -> Result<Deployd, String> {
        Deployd::new(manifests, None, wrapper, extra)
    }

    /// SIGKILL, as a crash; `relaunch` starts it again.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::fs::read_to_string("/proc/self/mountinfo")
            .is_ok_and(|m| m.contains(&*self.mnt.to_string_lossy()))
        {
            let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    /// Starts the deployd process again (after `kill9`).
    pub fn relaunch(&mut self) -> Result<(), String> {
        self.launch()
    }

    fn new(
        manifests: &[(String, String)],
        socket: Option<RawFd>,
        wrapper: &[String],
        extra: &str,
    ) -> Result<Deployd, String> {
        let dir = tempfile::Builder::new()
            .prefix("deployd-bench")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let m = dir.path().join("manifests");
        std::fs::create_dir_all(&m).map_err(|e| e.to_string())?;
        for (name, text) in manifests {
            std::fs::write(m.join(format!("{name}.manifest")), text).map_err(|e| e.to_string())?;
        }
        let config = dir.path().join("deployd.toml");
        std::fs::write(
            &config,
            format!("mountpoint = \"mnt\"\nmanifests = \"manifests\"\nstate = \"state\"\nlog_level = \"warn\"\n{extra}"),
        )
        .map_err(|e| e.to_string())?;
        let mut d = Deployd {
            mnt: dir.path().join("mnt"),
            manifests: m,
            config,
            log: dir.path().join("deployd.log"),
            socket,
            wrapper: wrapper.to_vec(),
            child: None,
            _dir: dir,
        };
        d.launch()?;
        Ok(d)
    }

    /// Starts the deployd process and waits for its namespace.
    fn launch(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| e.to_string())?;
        // DEPLOYD names another build to measure (two builds compared).
        let bin = std::env::var_os("DEPLOYD").map_or_else(|| sibling("deployd"), PathBuf::from);
        let mut cmd = match self.socket {
            None if !self.wrapper.is_empty() => {
                let mut c = Command::new(&self.wrapper[0]);
                c.args(&self.wrapper[1..]).arg(bin);
                c
            }
            None => Command::new(bin),
            Some(fd) => {
                use std::os::unix::process::CommandExt;
                // The shell's pid is deployd's once it execs.
                let mut c = Command::new("/bin/sh");
                c.arg("-c")
                    .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"")
                    .arg(bin);
                // SAFETY: dup2 and fcntl are async-signal-safe; descriptor
                // 3 stays open across exec.
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
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run deployd: {e}"))?;
        self.child = Some(child);
        if !wait_until(Duration::from_secs(20), Duration::from_millis(10), || {
            self.mnt.join("ctl").exists()
        }) {
            return Err("deployd did not mount its namespace".into());
        }
        Ok(())
    }

    /// Stops deployd (SIGTERM: it drains, stops its instances, unmounts)
    /// and starts it again, with the same socket if it had one.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.launch()
    }

    /// SIGTERM, then SIGKILL if it has not exited within 30 s.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let done = wait_until(Duration::from_secs(30), Duration::from_millis(5), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if !done {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Stops deployd and returns what it wrote to its standard error.
    pub fn finish(mut self) -> String {
        self.stop();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.mnt.join(rel)).unwrap_or_default()
    }

    pub fn write_manifest(&self, name: &str, text: &str) {
        let _ = std::fs::write(self.manifests.join(format!("{name}.manifest")), text);
    }

    /// Writes a command to a ctl file; the answer or the error.
    pub fn ctl(&self, rel: &str, cmd: &str) -> Result<(), String> {
        std::fs::write(self.mnt.join(rel), cmd).map_err(|e| format!("{cmd}: {e}"))
    }

    /// Waits until the service has no rollout in flight and every slot runs
    /// a ready instance of its version (`update_progress` k/n with k = n).
    pub fn settle(&self, service: &str, timeout: Duration) -> bool {
        wait_until(timeout, Duration::from_millis(10), || {
            let status = self.read(&format!("active/{service}/update_status"));
            let progress = self.read(&format!("active/{service}/update_progress"));
            status == "none\n" && progress.trim().split_once('/').is_some_and(|(k, n)| k == n)
        })
    }

    /// The instances' ports, in number order.
    pub fn ports(&self, service: &str) -> Vec<u16> {
        let dir = self.mnt.join("active").join(service).join("instances");
        let mut v: Vec<(u32, u16)> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let n = e.file_name().to_str()?.parse().ok()?;
                        let p = std::fs::read_to_string(e.path().join("port")).ok()?;
                        Some((n, p.trim().parse().ok()?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    }
}

impl Drop for Deployd {
    fn drop(&mut self) {
        self.stop();
        if std::fs::read_to_string("/proc/self/mountinfo")
            .is_ok_and(|m| m.contains(&*self.mnt.to_string_lossy()))
        {
            let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// What one wrk run reported.
#[derive(Debug, Clone, Default)]
pub struct Wrk {
    pub requests: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Socket errors (connect, read, write) plus non-2xx responses.
    pub failed: u64,
    /// Requests that hit wrk's timeout: hung.
    pub timeouts: u64,
}

/// Runs wrk against 127.0.0.1:`port` for `secs`; `close` makes every
/// request use a new connection.
pub fn wrk(port: u16, path: &str, secs: u64, conns: u32, close: bool) -> Result<Wrk, String> {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t",
        "2",
        "-c",
        &conns.to_string(),
        "-d",
        &format!("{secs}s"),
    ])
    .args(["--timeout", "5s", "--latency"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://127.0.0.1:{port}{path}"));
    let out = cmd.output().map_err(|e| format!("cannot run wrk: {e}"))?;
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

fn parse_wrk(text: &str) -> Result<Wrk, String> {
    let mut w = Wrk::default();
    let ms = |v: &str| -> f64 {
        let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
        let n: f64 = num.parse().unwrap_or(f64::NAN);
        match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            "m" => n * 60_000.0,
            _ => f64::NAN,
        }
    };
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["50%", v] => w.p50_ms = ms(v),
            ["99%", v] => w.p99_ms = ms(v),
            ["Requests/sec:", v] => w.rps = v.parse().unwrap_or(0.0),
            [n, "requests", "in", ..] => w.requests = n.parse().unwrap_or(0),
            ["Non-2xx", "or", "3xx", "responses:", n] => w.failed += n.parse::<u64>().unwrap_or(0),
            [
                "Socket",
                "errors:",
                "connect",
                c,
                "read",
                r,
                "write",
                wr,
                "timeout",
                t,
            ] => {
                let n = |s: &str| s.trim_end_matches(',').parse::<u64>().unwrap_or(0);
                w.failed += n(c) + n(r) + n(wr);
                w.timeouts = n(t);
            }
            _ => {}
        }
    }
    if w.requests == 0 {
        return Err(format!("wrk reported nothing:\n{text}"));
    }
    Ok(w)
}

/// The `q`-th percentile (0..=100) of sorted samples.
/// The resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<f64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(|| "no VmRSS".to_string())
}

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Kills a process group, ignoring a group already gone.
pub fn kill_group(pid: u32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    let rest = &stat[stat.rfind(')').ok_or("bad stat")? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok(n(11) + n(12))
}

/// Clock ticks a second, as `/proc/PID/stat` counts them.
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf reads a constant.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let text = "Running 5s test @ http://127.0.0.1:8080/\n  2 threads and 16 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   510.20us  200.00us   5.00ms   90.00%\n  Latency Distribution\n     50%  480.00us\n     75%  550.00us\n     90%  700.00us\n     99%    1.20ms\n  150000 requests in 5.00s, 12.00MB read\n  Socket errors: connect 0, read 3, write 1, timeout 2\n  Non-2xx or 3xx responses: 5\nRequests/sec:  30000.00\nTransfer/sec:      2.40MB\n";
        let w = parse_wrk(text).unwrap();
        assert_eq!(w.requests, 150000);
        assert_eq!(w.rps, 30000.0);
        assert_eq!(w.p50_ms, 0.48);
        assert_eq!(w.p99_ms, 1.2);
        assert_eq!(w.failed, 9);
        assert_eq!(w.timeouts, 2);
    }
}
