//! Child processes: spawning instances and exec probes in their own process
//! group ([`spawn`], [`launch`]), reaping every child ([`reap`]), stopping a
//! group with escalation to SIGKILL, and what `/proc` says of them
//! ([`procfs`]). What an instance starts is tracked beyond its group by
//! deployd's [`guard`] (which outlives a deployd killed) and, with cgroup
//! v2, by a [`cgroup`] per instance: [`Tracking`] holds both.
//!
//! A child gets `PR_SET_PDEATHSIG`, so a deployd killed with SIGKILL takes its
//! instances down with it, and the guard the rest of their process groups;
//! the pid file the runtime writes lets the next deployd kill whatever
//! survived (see [`procfs::kill_leftovers`]).

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use parking_lot::Mutex;

pub mod cgroup;
pub mod guard;
mod launch;
pub mod limits;
pub mod procfs;
mod reap;
mod spawn;

pub use launch::is_executable_file;
pub use reap::{Children, Waiter};
pub use spawn::{Spawn, Spawner, spawn};

/// Makes deployd the reaper of its descendants' orphans.
pub fn become_subreaper() {
    // SAFETY: prctl with an integer argument has no memory effects.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r != 0 {
        tracing::warn!(
            "PR_SET_CHILD_SUBREAPER: {}; orphaned grandchildren go to init",
            std::io::Error::last_os_error()
        );
    }
}

/// Whether `signal` is ignored (SIG_IGN) in this process, as `nohup`
/// leaves SIGHUP for what it starts.
pub fn ignored(signal: i32) -> bool {
    // SAFETY: with a null new action, sigaction only writes `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Raises the soft limit on open files to the hard limit: every instance
/// holds a pipe and a log file open in deployd.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to / read from the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// What keeps track of an instance's processes beyond its process group:
/// the guard, if it started, and the cgroups, where there is cgroup v2.
/// Their news is ordered by one lock, held while an instance starts and
/// while children are reaped, so that the guard hears of a group before it
/// can hear of its end.
#[derive(Default)]
pub struct Tracking {
    guard: Option<guard::Guard>,
    cgroups: Option<cgroup::Cgroups>,
    order: Mutex<()>,
}

impl Tracking {
    /// Tracking by the guard and the cgroups there are.
    pub fn new(guard: Option<guard::Guard>, cgroups: Option<cgroup::Cgroups>) -> Tracking {
        Tracking {
            guard,
            cgroups,
            order: Mutex::new(()),
        }
    }

    /// The controllers instances can be held to limits with, here.
    pub fn controllers(&self) -> Vec<&'static str> {
        self.cgroups
            .as_ref()
            .map(cgroup::Cgroups::controllers)
            .unwrap_or_default()
    }

    /// The file that counts the memory of the instance led by `pid`, if
    /// a cgroup controller does.
    pub fn memory_file(&self, pid: u32) -> Option<std::path::PathBuf> {
        self.cgroups.as_ref()?.memory_file(pid)
    }

    /// How often the kernel killed a process of the instance led by `pid`
    /// for want of memory.
    pub fn oom_kills(&self, pid: u32) -> u64 {
        self.cgroups.as_ref().map_or(0, |c| c.oom_kills(pid))
    }

    /// The cgroups, where there are.
    pub fn cgroups(&self) -> Option<&cgroup::Cgroups> {
        self.cgroups.as_ref()
    }

    /// The guard's pipe, left open across `execve` for the deployd that
    /// replaces this one: the value for [`guard::ENV`], if there is one.
    pub fn pass_guard(&self) -> Option<String> {
        self.guard.as_ref()?.pass()
    }

    /// [`spawn`], for an instance: in a cgroup of its own if there is
    /// cgroup v2, and the guard kills what is left of its group if deployd
    /// dies without stopping it.
    /// With limits (`memory_max`, `cpu_max`, `pids_max`) that cannot be
    /// set here, it is not started: the error says why.
    pub fn spawn(&self, s: Spawn<'_>) -> std::io::Result<u32> {
        let _order = self.order.lock();
        let place = match &self.cgroups {
            Some(c) => c.take(&s.limits).map_err(std::io::Error::other)?,
            None if !s.limits.is_empty() => {
                return Err(std::io::Error::other(
                    "memory_max, cpu_max and pids_max need cgroups, which deployd does not have here",
                ));
            }
            None => None,
        };
        let pid = spawn::spawn_in(s, place.as_ref());
        if let (Some(place), Some(cgroups)) = (place, &self.cgroups) {
            cgroups.placed(place, pid.as_ref().ok().copied());
        }
        let pid = pid?;
        if let Some(g) = &self.guard {
            g.watch(pid);
        }
        Ok(pid)
    }

    /// An instance handed on by the deployd this one replaced, led by
    /// `pid`: back in the cgroup it was in, and known to the guard.
    pub fn adopt(&self, pid: u32) {
        if let Some(c) = &self.cgroups {
            c.adopt(pid);
        }
        if let Some(g) = &self.guard {
            g.watch(pid);
        }
    }

    /// The leader `pid` was reaped: the rest of its cgroup is killed, and
    /// the guard forgets its group.
    fn ended(&self, pid: u32) {
        if let Some(c) = &self.cgroups {
            c.ended(pid);
        }
        if let Some(g) = &self.guard {
            g.forget(pid);
        }
    }

    /// Sends `signal` to the group led by `pid`, and to what of its
    /// cgroup left the group (`setsid`); the rest of the cgroup is killed
    /// once the leader is reaped.
    pub fn signal(&self, pid: u32, signal: i32) {
        signal_group(pid, signal);
        if let Some(c) = &self.cgroups {
            c.signal_strays(pid, signal);
        }
    }
}

/// Sends `signal` to the process group led by `pid`. A group already gone is
/// not an error.
pub fn signal_group(pid: u32, signal: i32) {
    let Ok(sig) = Signal::try_from(signal) else {
        return;
    };
    match killpg(Pid::from_raw(pid as i32), sig) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!("kill -{signal} -{pid}: {e}"),
    }
}
