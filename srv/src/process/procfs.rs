//! What `/proc` says about processes: when one started (with its pid, what
//! names it for good), what an instance's processes use (`usage`, and the
//! samples `memory_high` is held to), and the groups a deployd that died
//! left running, which the next one kills.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The start time of a process in clock ticks since boot, from
/// `/proc/PID/stat`: with the pid, it names one process for good.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// What an instance's processes use, as `instances/N/usage` shows it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Usage {
    /// The leader and its descendants still running.
    pub processes: u32,
    /// Their resident memory, summed (pages they share count once each).
    pub rss: u64,
    /// Their CPU time, user and system, including the children they waited for.
    pub cpu: Duration,
}

impl Usage {
    /// The `usage` file.
    pub fn render(&self) -> String {
        format!(
            "processes {}\nrss {}\ncpu {:.2}\n",
            self.processes,
            self.rss,
            self.cpu.as_secs_f64()
        )
    }
}

/// How often an instance with `memory_high` has its memory sampled.
pub const MEMORY_INTERVAL: Duration = Duration::from_secs(1);

/// Samples the memory of the instance led by `leader` every
/// [`MEMORY_INTERVAL`] ([`memory`]) and calls `over` with each sample above
/// `limit`. Runs until aborted; an exited leader reads as 0.
pub async fn watch_memory(leader: u32, cgroup: Option<PathBuf>, limit: u64, over: impl Fn(u64)) {
    let mut tick = tokio::time::interval(MEMORY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let rss = memory(leader, cgroup.as_deref());
        if rss > limit {
            over(rss);
        }
    }
}

/// The memory an instance uses: its cgroup's count (`memory.current`, or
/// v1's `memory.usage_in_bytes`) where it has one, which holds what its
/// processes started even after they left its tree (a daemon reparented
/// to deployd); else the resident memory of its process tree ([`usage`]).
pub fn memory(leader: u32, cgroup: Option<&Path>) -> u64 {
    cgroup
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| usage(leader).rss)
}

/// Most processes one instance's usage walks (a fork bomb stays cheap to read).
const USAGE_MAX_PROCESSES: usize = 4096;

/// The usage of the process tree led by `leader`, from `/proc`: the leader
/// and its descendants (through `/proc/PID/task/TID/children`). Zero if
/// `leader` no longer leads its own process group (it exited).
pub fn usage(leader: u32) -> Usage {
    // SAFETY: sysconf only reads configuration values.
    let (tick, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let (tick, page) = (tick.max(1) as f64, page.max(0) as u64);
    let mut total = Usage::default();
    let mut ticks = 0u64;
    let mut todo = vec![leader];
    let mut seen = 0usize;
    while let Some(pid) = todo.pop() {
        seen += 1;
        if seen > USAGE_MAX_PROCESSES {
            break;
        }
        let Some(st) = proc_stat(pid) else { continue };
        if pid == leader && st.pgrp != leader {
            return Usage::default();
        }
        if st.state == 'Z' {
            continue;
        }
        total.processes += 1;
        total.rss += st.rss_pages * page;
        ticks += st.ticks;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.filter_map(|t| t.ok()) {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    total.cpu = Duration::from_secs_f64(ticks as f64 / tick);
    total
}

/// The fields of `/proc/PID/stat` that [`usage`] needs.
struct ProcStat {
    state: char,
    ppid: u32,
    pgrp: u32,
    /// utime + stime + cutime + cstime, in clock ticks.
    ticks: u64,
    rss_pages: u64,
}

/// The parent of `pid`, while it runs.
pub(crate) fn parent_of(pid: u32) -> Option<u32> {
    proc_stat(pid).map(|st| st.ppid)
}

/// The process group `pid` is in, while it runs.
pub(crate) fn group_of(pid: u32) -> Option<u32> {
    proc_stat(pid).map(|st| st.pgrp)
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields follow the last ')'.
    let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        ticks: num(11)? + num(12)? + num(13)? + num(14)?,
        rss_pages: num(21)?,
    })
}

/// Kills the process groups a previous deployd left running. `groups` holds
/// each group leader's pid and start time, as recorded when it was started.
/// Returns how many groups were signalled.
pub fn kill_leftovers(groups: &[(u32, u64)]) -> usize {
    let candidates: Vec<u32> = groups
        .iter()
        // The pid now names another process: the old group is long gone
        // (a pid is not reused while its group exists).
        .filter(|&&(pid, started)| start_time(pid).is_none_or(|t| t == started))
        .map(|&(pid, _)| pid)
        .collect();
    // Only groups with a live process: the guard has usually stopped them
    // already, and zombies waiting for init are not worth a word.
    let killed: Vec<u32> = live_groups(&candidates)
        .into_iter()
        .filter(|&pid| killpg(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok())
        .collect();
    // They are not our children; wait (briefly) until none is running.
    // Zombies don't count: their new parent reaps them when it will.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until && running_in_groups(&killed) {
        std::thread::sleep(Duration::from_millis(10));
    }
    killed.len()
}

/// Whether a process that is not a zombie belongs to one of these groups.
pub(crate) fn running_in_groups(groups: &[u32]) -> bool {
    !live_groups(groups).is_empty()
}

/// Those of `groups` that hold a process that is not a zombie.
pub(crate) fn live_groups(groups: &[u32]) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut live: Vec<u32> = dir
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| {
            // After the command name: state, ppid, pgrp.
            let rest = &stat[stat.rfind(')')? + 2..];
            let mut f = rest.split(' ');
            let state = f.next()?;
            let pgrp = f.nth(1)?.parse::<u32>().ok()?;
            (state != "Z" && groups.contains(&pgrp)).then_some(pgrp)
        })
        .collect();
    live.sort_unstable();
    live.dedup();
    live
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{Spawn, signal_group, spawn};
    use nix::sys::wait::waitpid;

    #[test]
    fn usage_counts_the_leader_and_its_descendants() {
        // A group leader whose child burns CPU and holds 32 MiB.
        let dir = tempfile::tempdir().expect("tempdir");
        let script = "python3 -c 'b = bytearray(b\"x\") * (32 << 20)\nimport time\nt = time.time()\n\
                      while time.time() - t < 0.3: pass\nprint(len(b), flush=True)\ntime.sleep(60)' & \
                      wait";
        let (r, w) = crate::logfile::pipe().expect("pipe");
        let pid = spawn(Spawn {
            command: script,
            dir: dir.path(),
            env: Vec::new(),
            output: Some(w),
            account: None,
            limits: Default::default(),
        })
        .expect("spawn");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(std::fs::File::from(r)),
            &mut line,
        )
        .expect("read");
        let u = usage(pid);
        signal_group(pid, libc::SIGKILL);
        let _ = waitpid(Pid::from_raw(pid as i32), None);
        assert_eq!(line.trim(), (32u32 << 20).to_string());
        assert_eq!(u.processes, 2, "{u:?}");
        assert!(u.rss >= 32 << 20, "{u:?}");
        assert!(u.cpu >= Duration::from_millis(200), "{u:?}");
        assert!(
            u.render().starts_with("processes 2\nrss "),
            "{}",
            u.render()
        );
        // Gone (reaped here or by another test's reaper): nothing.
        assert_eq!(usage(pid), Usage::default());
    }

    #[test]
    fn leftovers_are_killed_only_when_theirs_and_running() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("sleep");
        let pid = child.id();
        let started = start_time(pid).expect("start time");
        // Another process's start time: the pid was reused, not ours.
        assert_eq!(kill_leftovers(&[(pid, started + 1)]), 0);
        assert!(running_in_groups(&[pid]));
        // It waits for the group to end (a zombie has ended).
        assert_eq!(kill_leftovers(&[(pid, started)]), 1);
        assert!(!running_in_groups(&[pid]));
        // Ended: nothing to kill, nothing to report.
        assert_eq!(kill_leftovers(&[(pid, started)]), 0);
        // Reaped here, or by another test's reaper (waitpid(-1)).
        let _ = child.wait();
    }

    #[test]
    fn start_time_survives_odd_command_names() {
        let me = std::process::id();
        let t = start_time(me).expect("own start time");
        assert!(t > 0);
        assert_eq!(start_time(me), Some(t));
        assert_eq!(start_time(u32::MAX), None);
    }
}
