//! Each instance in a cgroup of its own (cgroup v2), so that nothing it
//! starts outlives it: a process group holds what an instance starts only
//! until one of them calls `setsid` or `setpgid` (a daemonizing program, a
//! script's `setsid worker &`), and those ran on after their instance was
//! stopped, and after their service was removed. A cgroup holds every
//! descendant, as systemd's `KillMode=control-group` relies on.
//!
//! The tree: `CGROUP/deployd-PID/LEADER`, where CGROUP is deployd's own
//! cgroup, PID deployd's pid (the same across `reexec`, which keeps the
//! tree) and LEADER the pid of the instance's leader. The child makes its
//! cgroup, named after its own pid (cgroup v2 does not rename), and moves
//! itself in before `execve`, so what it starts is in from the first.
//! When the leader is reaped, what is left in its cgroup is killed and
//! the cgroup removed.
//! deployd's guard kills the whole tree if deployd dies without stopping
//! its instances.
//!
//! Without cgroup v2 (not mounted, not writable), instances are tracked by
//! their process group alone, as before.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// deployd's tree, and a descriptor of it for the child to make its
/// cgroup in, once [`init`] found cgroup v2 usable.
static TREE: OnceLock<Option<(PathBuf, OwnedFd)>> = OnceLock::new();

/// How long a cgroup killed has to empty before its removal is given up.
const EMPTYING: Duration = Duration::from_secs(5);

/// Sets up deployd's tree: removes the trees of deployds that are gone
/// (what was left in them is killed), then makes this one's, or with
/// `keep` (after `reexec`: the instances handed on are in it) keeps it.
/// Returns where it is, or why there is none.
pub fn init(keep: bool) -> Result<PathBuf, String> {
    let made = tree_for(std::process::id()).and_then(|tree| {
        sweep(tree.parent().unwrap_or(Path::new("/")));
        if !keep {
            // A deployd that had this pid before, killed with its guard.
            kill_tree(&tree);
        }
        match std::fs::create_dir(&tree) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
        .and_then(|()| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY)
                .open(&tree)
        })
        .map(|dir| (tree.clone(), OwnedFd::from(dir)))
        .map_err(|e| format!("{}: {e}", tree.display()))
    });
    match made {
        Ok((tree, fd)) => {
            let _ = TREE.set(Some((tree.clone(), fd)));
            Ok(tree)
        }
        Err(e) => {
            let _ = TREE.set(None);
            Err(e)
        }
    }
}

/// Where the tree of the deployd with this pid is (or would be): under the
/// cgroup this process is in, which the guard shares with deployd.
pub fn tree_for(deployd: u32) -> Result<PathBuf, String> {
    let mount = cgroup2_mount().ok_or("no cgroup v2 file system is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no cgroup v2")?;
    let dir = mount.join(own.trim_start_matches('/'));
    Ok(dir.join(format!("deployd-{deployd}")))
}

/// The mount point of the cgroup v2 file system (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on a host that mounts v1 beside it).
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNT OPTIONS... - TYPE SOURCE SUPER
        let (left, right) = line.split_once(" - ")?;
        let mount = left.split(' ').nth(4)?;
        (right.split(' ').next()? == "cgroup2").then(|| PathBuf::from(mount))
    })
}

/// Removes the trees of deployds no longer running beside `dir`'s own,
/// killing what was left in them (the guard of a deployd killed does this
/// already; this is for one whose guard was killed with it).
fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("deployd-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // Gone, or its pid taken by another program since. (A deployd
        // binary under another name, `deployd-next`, still counts.)
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if pid != std::process::id() && !comm.starts_with("deployd") {
            kill_tree(&e.path());
        }
    }
}

/// The descriptor of deployd's tree, for a child to make its cgroup in
/// ([`super::launch`]); `None` without cgroup v2.
pub fn tree_fd() -> Option<RawFd> {
    TREE.get()?.as_ref().map(|(_, fd)| fd.as_raw_fd())
}

/// The cgroup of the instance led by `pid`, if it has one.
fn of(pid: u32) -> Option<PathBuf> {
    let dir = TREE.get()?.as_ref()?.0.join(pid.to_string());
    dir.is_dir().then_some(dir)
}

/// The processes of a cgroup.
fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

/// Sends `signal` to the processes of the instance led by `pid` that left
/// its process group (which the caller signals): those that called
/// `setsid` or `setpgid`.
pub fn signal_strays(pid: u32, signal: i32) {
    let Some(dir) = of(pid) else { return };
    for p in procs(&dir) {
        if super::group_of(p).is_some_and(|g| g != pid) {
            // SAFETY: kill only sends a signal.
            unsafe { libc::kill(p as libc::pid_t, signal) };
        }
    }
}

/// The leader `pid` was reaped: what is left of its instance is killed and
/// its cgroup removed (once empty, on a thread of its own if that takes a
/// while).
pub fn ended(pid: u32) {
    if let Some(dir) = of(pid) {
        kill(&dir);
        if std::fs::remove_dir(&dir).is_err() {
            let _ = std::thread::Builder::new()
                .name("cgroup".into())
                .spawn(move || remove_when_empty(&dir));
        }
    }
}

/// Kills every process of a cgroup and of those below it.
fn kill(dir: &Path) {
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        // Before Linux 5.14: one by one.
        for p in procs(dir) {
            // SAFETY: kill only sends a signal.
            unsafe { libc::kill(p as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// Removes a cgroup killed, waiting for it to empty.
fn remove_when_empty(dir: &Path) {
    let until = Instant::now() + EMPTYING;
    while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills everything in a tree and removes it: the guard's last act for a
/// deployd that died without stopping its instances, and deployd's for a
/// tree left by one that is gone.
pub fn kill_tree(tree: &Path) {
    if !tree.is_dir() {
        return;
    }
    kill(tree);
    let leaves: Vec<PathBuf> = std::fs::read_dir(tree)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    for leaf in &leaves {
        kill(leaf);
        remove_when_empty(leaf);
    }
    remove_when_empty(tree);
}

/// Removes deployd's tree at a clean stop (every instance stopped, so it
/// is empty); kept on `reexec`, for the deployd that takes the instances.
pub fn release() {
    if let Some(Some((tree, _))) = TREE.get() {
        kill_tree(tree);
    }
}
