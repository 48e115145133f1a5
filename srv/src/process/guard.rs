//! deployd's guard: a small process forked first thing, while deployd has
//! one thread, that outlives a deployd killed without stopping its
//! instances (`kill -9`, a crash) and kills what is left of their process
//! groups.
//!
//! `PR_SET_PDEATHSIG` reaches only an instance's leader. What the leader
//! started does not get it: the `sleep` of `exec sleep 60; echo done` under
//! `/bin/sh`, each side of a pipe, the workers of a pre-forking server. Left
//! alone, those ran on untracked, holding ports and consuming queues, until
//! the next deployd started and killed the groups it had recorded
//! ([`super::procfs::kill_leftovers`]); with no next start, for ever.
//!
//! deployd tells the guard each group it starts (`+PID\n` on a pipe) and
//! each one it reaps (`-PID\n`). When the pipe's write end closes, deployd
//! is gone: every group still listed gets SIGTERM and, [`GRACE`] later,
//! SIGKILL; then the guard exits. After a clean stop the list is empty and
//! it exits at once. On `reexec` the write end stays open across `execve`
//! (its number in [`ENV`]) and the new deployd keeps the same guard.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The variable that gives the new deployd the guard's pipe on `reexec`.
pub const ENV: &str = crate::inherit::GUARD;

/// How long what is left of a group has between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(5);

/// The guard's process name, as `ps` and `pkill -x` see it.
pub const NAME: &str = "deployd-guard";

/// deployd's end of the guard's pipe.
pub struct Guard {
    /// The write end; `None` once a write failed (the guard was killed),
    /// so the failure is told once.
    pipe: Mutex<Option<File>>,
}

/// Why deployd runs without a guard.
#[derive(Debug)]
pub enum GuardError {
    /// deployd already runs threads: a fork would copy one of them only.
    Threads,
    /// The pipe or the fork failed.
    Os(&'static str, nix::errno::Errno),
    /// `DEPLOYD_GUARD` names no open pipe.
    NotAPipe(String),
}

impl std::fmt::Display for GuardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuardError::Threads => f.write_str("not started: deployd already runs threads"),
            GuardError::Os(what, e) => write!(f, "not started: {what}: {e}"),
            GuardError::NotAPipe(v) => write!(f, "{ENV}={v} is not an open pipe"),
        }
    }
}

impl std::error::Error for GuardError {}

/// Starts the guard, or takes back the one the deployd this one replaced
/// had. Call first thing in `main`, while this is the only thread (fork
/// copies only the calling thread). On an error, to log once logging is
/// set up, deployd runs without a guard, as before it had one.
pub fn start() -> Result<Guard, GuardError> {
    if let Some(fd) = std::env::var_os(ENV) {
        return adopt(&fd.to_string_lossy());
    }
    if threads() != Some(1) {
        return Err(GuardError::Threads);
    }
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| GuardError::Os("pipe", e))?;
    // SAFETY: this process has one thread (checked above), so the child
    // may run any code: no lock is held by a thread that fork left behind.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            drop(w);
            watch_groups(r)
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            drop(r);
            set_nonblocking(w.as_raw_fd());
            Ok(Guard {
                pipe: Mutex::new(Some(File::from(w))),
            })
        }
        Err(e) => Err(GuardError::Os("fork", e)),
    }
}

/// Takes the pipe named by [`ENV`] back after `reexec`.
fn adopt(fd: &str) -> Result<Guard, GuardError> {
    let fd: RawFd = fd
        .parse()
        .map_err(|_| GuardError::NotAPipe(fd.to_string()))?;
    // SAFETY: fstat and fcntl on a descriptor number only read or set flags.
    let is_pipe = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFIFO
    };
    if !is_pipe {
        return Err(GuardError::NotAPipe(fd.to_string()));
    }
    // SAFETY: as above; the descriptor is ours from here on.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    set_nonblocking(fd);
    let file = unsafe { File::from_raw_fd(fd) };
    Ok(Guard {
        pipe: Mutex::new(Some(file)),
    })
}

impl Guard {
    /// The guard's pipe, left open across `execve` for the deployd that
    /// replaces this one (nothing is told to the guard after): the value
    /// for [`ENV`], if the pipe is still there.
    pub fn pass(&self) -> Option<String> {
        let file = self.pipe.lock().take()?;
        crate::inherit::pass(OwnedFd::from(file)).map(|fd| fd.to_string())
    }

    /// The guard kills what is left of the group led by `pid` if deployd
    /// dies.
    pub fn watch(&self, pid: u32) {
        self.tell('+', pid);
    }

    /// The group led by `pid` is gone (its leader reaped, the rest killed).
    pub fn forget(&self, pid: u32) {
        self.tell('-', pid);
    }

    fn tell(&self, op: char, pid: u32) {
        let mut pipe = self.pipe.lock();
        let Some(file) = pipe.as_mut() else { return };
        // Shorter than PIPE_BUF: written whole or not at all. Never waits: a
        // guard that does not read (stopped) must not stop instance starts.
        match file.write(format!("{op}{pid}\n").as_bytes()) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tracing::warn!("{NAME} is not reading; it did not hear of {op}{pid}");
            }
            Err(e) => {
                tracing::warn!(
                    "{NAME}: {e}; if deployd is killed now, what its instances started \
                 runs on until it starts again"
                );
                *pipe = None;
            }
        }
    }
}

/// Writes to `fd` fail with EAGAIN instead of waiting.
fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl reads and sets the flags of a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

/// The number of threads of this process.
fn threads() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// The guard itself: reads the pipe until deployd is gone, then kills the
/// groups still listed, and exits.
fn watch_groups(pipe: OwnedFd) -> ! {
    // Forked by deployd, which is the parent until it is gone.
    let deployd = std::os::unix::process::parent_id();
    detach(pipe.as_raw_fd());
    let mut groups: HashSet<u32> = HashSet::new();
    let mut file = File::from(pipe);
    let mut buf = [0u8; 4096];
    let mut partial = Vec::new();
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                partial.extend_from_slice(&buf[..n]);
                let end = partial
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |i| i + 1);
                for line in partial[..end].split(|&b| b == b'\n') {
                    apply(&mut groups, line);
                }
                partial.drain(..end);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if !groups.is_empty() {
        let mut list: Vec<String> = groups.iter().map(u32::to_string).collect();
        list.sort();
        // On deployd's stderr, which this shares: the journal, a terminal.
        // Not eprintln!, which panics when that is gone (a closed pipe):
        // the groups come first.
        let _ = writeln!(
            std::io::stderr(),
            "{NAME}: deployd ended without stopping its instances; stopping what is \
             left of process groups {}",
            list.join(", ")
        );
    }
    kill_groups(&groups, GRACE);
    // And what left its group but not its instance's cgroup.
    if let Ok(tree) = super::cgroup::tree_for(deployd) {
        super::cgroup::kill_tree(&tree);
    }
    // SAFETY: _exit ends the process without running deployd's atexit
    // handlers or flushing its buffers, which are the parent's.
    unsafe { libc::_exit(0) }
}

/// One `+PID` or `-PID` line.
fn apply(groups: &mut HashSet<u32>, line: &[u8]) {
    let Some((&op, pid)) = line.split_first() else {
        return;
    };
    let Some(pid) = std::str::from_utf8(pid).ok().and_then(|p| p.parse().ok()) else {
        return;
    };
    match op {
        b'+' => groups.insert(pid),
        b'-' => groups.remove(&pid),
        _ => false,
    };
}

/// Cuts the guard loose from what deployd holds and hears: no descriptor
/// but the pipe and stderr (a listening socket or the state directory's
/// lock held here would outlive deployd), no terminal signals (Ctrl-C
/// stops deployd, which then closes the pipe), its own name, `/` as its
/// directory.
fn detach(keep: RawFd) {
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let name = std::ffi::CString::new(NAME).unwrap_or_default();
    // SAFETY: plain system calls on descriptors and signal dispositions of
    // this single-threaded process; the name is NUL-terminated.
    unsafe {
        for fd in open {
            if fd != keep && fd != 2 {
                libc::close(fd);
            }
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            if null > 2 {
                libc::close(null);
            }
        }
        for sig in [libc::SIGINT, libc::SIGHUP, libc::SIGTERM, libc::SIGQUIT] {
            libc::signal(sig, libc::SIG_IGN);
        }
        libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0);
        libc::chdir(c"/".as_ptr());
    }
}

/// SIGTERM to every group, and SIGKILL to those not empty `grace` later.
fn kill_groups(groups: &HashSet<u32>, grace: Duration) {
    use nix::sys::signal::{Signal, killpg};
    let signal = |g: u32, sig| killpg(nix::unistd::Pid::from_raw(g as i32), sig).is_ok();
    let mut left: Vec<u32> = groups
        .iter()
        .copied()
        .filter(|&g| signal(g, Signal::SIGTERM))
        .collect();
    // Zombies don't count: their new parent reaps them when it will. A
    // group seen empty is dropped at once, so that its number, free again,
    // is not taken for it (a next deployd's instance may get it).
    let until = Instant::now() + grace;
    loop {
        left = super::procfs::live_groups(&left);
        if left.is_empty() {
            return;
        }
        if Instant::now() >= until {
            for &g in &left {
                signal(g, Signal::SIGKILL);
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_add_and_remove_groups() {
        let mut groups = HashSet::new();
        for line in ["+12", "+13", "-12", "+", "x14", "+abc", "", "-99"] {
            apply(&mut groups, line.as_bytes());
        }
        assert_eq!(groups, HashSet::from([13]));
    }

    #[test]
    fn a_group_that_ignores_sigterm_is_killed_after_the_grace() {
        use std::os::unix::process::CommandExt;
        use std::process::Command;
        // A group of two: a shell that ignores TERM, and its sleep.
        let mut child = Command::new("/bin/sh")
            .args(["-c", "trap '' TERM; sleep 30 & wait"])
            .process_group(0)
            .spawn()
            .expect("sh");
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        kill_groups(&HashSet::from([pid]), Duration::from_millis(300));
        let status = child.wait().expect("wait");
        assert!(started.elapsed() >= Duration::from_millis(300));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        // The sleep went with it.
        let until = Instant::now() + Duration::from_secs(5);
        while super::super::procfs::running_in_groups(&[pid]) {
            assert!(Instant::now() < until, "group {pid} still runs");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
