//! The kernel's limits on an instance (`memory_max`, `cpu_max`,
//! `pids_max`): written into its cgroup before it starts, so that what it
//! starts is held to them from the first.
//!
//! With cgroup v2 the controllers (`memory`, `cpu`, `pids`) must be
//! enabled down to the instances' cgroups, which the kernel allows only
//! where no process sits in a cgroup that passes them on: deployd (and its
//! guard) move into a leaf of their own, `CGROUP/supervisor`, when they are
//! alone in deployd's cgroup (as under its systemd unit, `Delegate=yes`).
//! On a host that mounts these controllers as cgroup v1 hierarchies
//! (systemd's "hybrid" layout), each instance also gets a cgroup in each
//! such hierarchy, which its process joins before `execve`.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use deployd_lib::manifest::Manifest;

/// The controllers deployd can hold instances to limits with.
pub const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// The leaf deployd and its guard move into, below deployd's cgroup.
pub const LEAF: &str = "supervisor";

/// The limits of one instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Bytes (`memory.max`).
    pub memory_max: Option<u64>,
    /// Hundredths of a core (`cpu.max`).
    pub cpu_max: Option<u32>,
    /// Processes and threads (`pids.max`).
    pub pids_max: Option<u32>,
}

/// The CFS period `cpu_max` is a share of, in microseconds.
const PERIOD_US: u64 = 100_000;

impl Limits {
    /// A manifest's.
    pub fn of(m: &Manifest) -> Limits {
        Limits {
            memory_max: m.memory_max,
            cpu_max: m.cpu_max,
            pids_max: m.pids_max,
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// The controllers these limits need, with the directive that asks.
    pub fn needs(&self) -> Vec<(&'static str, &'static str)> {
        let mut v = Vec::new();
        if self.memory_max.is_some() {
            v.push(("memory", "memory_max"));
        }
        if self.cpu_max.is_some() {
            v.push(("cpu", "cpu_max"));
        }
        if self.pids_max.is_some() {
            v.push(("pids", "pids_max"));
        }
        v
    }

    /// The files to write, for each controller: cgroup v2's names, or v1's.
    pub fn files(&self, v1: bool) -> Vec<(&'static str, &'static str, String)> {
        let mut f = Vec::new();
        if let Some(bytes) = self.memory_max {
            let file = if v1 {
                "memory.limit_in_bytes"
            } else {
                "memory.max"
            };
            f.push(("memory", file, bytes.to_string()));
        }
        if let Some(c) = self.cpu_max {
            let quota = u64::from(c) * PERIOD_US / 100;
            match v1 {
                true => {
                    f.push(("cpu", "cpu.cfs_period_us", PERIOD_US.to_string()));
                    f.push(("cpu", "cpu.cfs_quota_us", quota.to_string()));
                }
                false => f.push(("cpu", "cpu.max", format!("{quota} {PERIOD_US}"))),
            }
        }
        if let Some(n) = self.pids_max {
            f.push(("pids", "pids.max", n.to_string()));
        }
        f
    }
}

/// An instance's cgroups in the v1 hierarchies, made for its limits: the
/// directories, and their `cgroup.procs` open for the child to write
/// itself into.
#[derive(Default)]
pub struct V1Place {
    pub dirs: Vec<PathBuf>,
    pub procs: Vec<OwnedFd>,
}

/// Makes `name` in each v1 tree its limits need, writes them, and opens its
/// `cgroup.procs`. What was made is removed again on an error.
pub fn place_v1(
    trees: &[(&'static str, PathBuf)],
    name: &str,
    limits: &Limits,
) -> Result<V1Place, String> {
    let mut place = V1Place::default();
    let result = (|| {
        for (controller, tree) in trees {
            let files: Vec<_> = limits
                .files(true)
                .into_iter()
                .filter(|(c, _, _)| c == controller)
                .collect();
            if files.is_empty() {
                continue;
            }
            let dir = tree.join(name);
            std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            place.dirs.push(dir.clone());
            write_all(&dir, &files)?;
            let procs = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .map_err(|e| format!("{}/cgroup.procs: {e}", dir.display()))?;
            place.procs.push(procs.into());
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(place),
        Err(e) => {
            remove(&place.dirs);
            Err(e)
        }
    }
}

/// Writes each file in `dir`.
pub fn write_all(dir: &Path, files: &[(&'static str, &'static str, String)]) -> Result<(), String> {
    for (_, file, value) in files {
        std::fs::write(dir.join(file), value)
            .map_err(|e| format!("{}: cannot set {value}: {e}", dir.join(file).display()))?;
    }
    Ok(())
}

/// Removes cgroups whose processes are gone; true if every one is.
pub fn remove(dirs: &[PathBuf]) -> bool {
    dirs.iter().all(|d| match std::fs::remove_dir(d) {
        Ok(()) => true,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    })
}

/// How many times the kernel killed a process of the cgroup `dir` for
/// want of memory (`oom_kill` in v2's `memory.events`, v1's
/// `memory.oom_control`).
pub fn oom_kills(dir: &Path) -> u64 {
    ["memory.events", "memory.oom_control"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.strip_prefix("oom_kill ")?.trim().parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap_or(0)
}

/// The v1 hierarchies of `controllers` mounted here and this process's
/// cgroup in each: (controller, directory).
pub fn v1_cgroups(controllers: &[&'static str]) -> Vec<(&'static str, PathBuf)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    controllers
        .iter()
        .filter_map(|c| {
            let mount = info.lines().find_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                let mut r = right.split(' ');
                let (kind, _, options) = (r.next()?, r.next()?, r.next()?);
                let on = kind == "cgroup" && options.split(',').any(|o| o == *c);
                let at = left.split(' ').nth(4)?;
                on.then(|| PathBuf::from(at))
            })?;
            // `N:cpu,cpuacct:/path`
            let path = own.lines().find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, names, path) = (f.next()?, f.next()?, f.next()?);
                names.split(',').any(|n| n == *c).then(|| path.to_owned())
            })?;
            Some((*c, mount.join(path.trim_start_matches('/'))))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_become_the_kernels_files() {
        let l = Limits {
            memory_max: Some(64 << 20),
            cpu_max: Some(50),
            pids_max: Some(50),
        };
        assert_eq!(
            l.files(false),
            [
                ("memory", "memory.max", "67108864".to_string()),
                ("cpu", "cpu.max", "50000 100000".to_string()),
                ("pids", "pids.max", "50".to_string()),
            ]
        );
        assert_eq!(
            l.files(true),
            [
                ("memory", "memory.limit_in_bytes", "67108864".to_string()),
                ("cpu", "cpu.cfs_period_us", "100000".to_string()),
                ("cpu", "cpu.cfs_quota_us", "50000".to_string()),
                ("pids", "pids.max", "50".to_string()),
            ]
        );
        let one = Limits {
            cpu_max: Some(150),
            ..Limits::default()
        };
        assert_eq!(
            one.files(false),
            [("cpu", "cpu.max", "150000 100000".to_string())]
        );
        assert_eq!(one.needs(), [("cpu", "cpu_max")]);
        assert!(Limits::default().is_empty());
    }

    #[test]
    fn oom_kills_are_read_from_either_version() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(oom_kills(d.path()), 0);
        std::fs::write(
            d.path().join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        assert_eq!(oom_kills(d.path()), 1);
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(oom_kills(d.path()), 2);
    }
}
