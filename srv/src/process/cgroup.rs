//! Each instance in a cgroup of its own (cgroup v2), so that nothing it
//! starts outlives it: a process group holds what an instance starts only
//! until one of them calls `setsid` or `setpgid` (a daemonizing program, a
//! script's `setsid worker &`), and those ran on after their instance was
//! stopped, and after their service was removed. A cgroup holds every
//! descendant, as systemd's `KillMode=control-group` relies on.
//!
//! The tree: `CGROUP/deployd-PID/iN`, where CGROUP is deployd's own cgroup
//! and PID deployd's pid (the same across `reexec`, which keeps the tree).
//! Making and removing a cgroup is slow (1.3 to 1.5 ms each, measured
//! here: the kernel waits for RCU), and so is moving a process into one
//! (8.6 ms when it is not done often: a grace period again), starting a
//! process in one is not (clone3's `CLONE_INTO_CGROUP`: 0.24 ms). So
//! a keeper thread makes cgroups ahead and removes, once empty, those
//! whose instance ended (what was left in them killed with `cgroup.kill`:
//! one killed is not used again, as Linux 6.18 kills every process that
//! clone3 starts in it after); the child starts in the one it is given
//! (without clone3, it moves itself in before `execve`), so what it starts
//! is in from the first.
//! deployd's guard kills the whole tree if deployd dies without stopping
//! its instances.
//!
//! Without cgroup v2 (not mounted, not writable), instances are tracked by
//! their process group alone, as before.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::limits;

/// deployd's tree of cgroups, once [`init`] found cgroup v2 usable; a
/// cheap handle to share.
#[derive(Clone)]
pub struct Cgroups {
    pool: Arc<Pool>,
}

/// Why deployd has no tree of cgroups.
#[derive(Debug)]
pub enum CgroupError {
    /// No cgroup v2 file system is mounted.
    NotMounted,
    /// This process is in no cgroup v2 (cgroup v1 only).
    NoCgroup,
    /// The tree could not be made or opened (no right to write there).
    Tree(PathBuf, std::io::Error),
    /// The keeper thread could not start.
    Thread(std::io::Error),
}

impl std::fmt::Display for CgroupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CgroupError::NotMounted => f.write_str("no cgroup v2 file system is mounted"),
            CgroupError::NoCgroup => f.write_str("this process is in no cgroup v2"),
            CgroupError::Tree(p, e) => write!(f, "{}: {e}", p.display()),
            CgroupError::Thread(e) => write!(f, "cannot start its thread: {e}"),
        }
    }
}

impl std::error::Error for CgroupError {}

/// Empty cgroups the keeper keeps ready: a rollout's batch takes its
/// instances' from these.
const READY: usize = 32;

/// Below this many ready, the keeper makes more at once; above, only once
/// no instance has started for [`QUIET`]: making and removing cgroups
/// while a batch starts (each holds the kernel's cgroup lock for a while)
/// slowed batches of ten from 15 to 23 ms.
const LOW: usize = 4;
const QUIET: Duration = Duration::from_millis(100);

/// How long a cgroup killed has to empty before its removal is given up.
const EMPTYING: Duration = Duration::from_secs(5);

struct Pool {
    tree: PathBuf,
    /// The tree, open, for the child to make its cgroup in.
    dir: OwnedFd,
    state: Mutex<State>,
    wake: Condvar,
    /// Set once clone3 with `CLONE_INTO_CGROUP` failed for want of
    /// support: children move themselves in from then on.
    no_clone3: Arc<AtomicBool>,
    /// The controllers enabled for the instances' cgroups in the tree.
    v2: Vec<&'static str>,
    /// The others, from cgroup v1 hierarchies: each one's tree.
    v1: Vec<(&'static str, PathBuf)>,
}

#[derive(Default)]
struct State {
    /// Empty cgroups, ready for an instance.
    free: Vec<String>,
    /// Killed: removed once empty.
    dead: Vec<String>,
    /// The cgroup of each instance, by its leader's pid.
    by_leader: HashMap<u32, String>,
    /// Held after `reexec` until the instance in it is taken back.
    held: Vec<String>,
    /// An ended instance's cgroups in v1 hierarchies, removed once empty.
    dead_v1: Vec<PathBuf>,
    next: u64,
    /// When an instance last took a cgroup.
    last_take: Option<Instant>,
}

/// Where an instance is to start: the tree, open, and the names (relative
/// to it) of its cgroup and of that cgroup's `cgroup.procs`.
pub struct Place {
    pub tree: RawFd,
    pub dir: CString,
    pub procs: CString,
    /// The cgroup itself, open, for clone3 to start the child in.
    pub fd: Option<OwnedFd>,
    /// Whether clone3 was found not to start children in cgroups here;
    /// the launcher sets it the first time it is refused so.
    pub no_clone3: Arc<AtomicBool>,
    /// Its cgroups in v1 hierarchies, for its limits.
    pub v1: super::limits::V1Place,
    name: String,
    /// Limits were written into it: not to be used by another.
    limited: bool,
}

/// Sets up deployd's tree: removes the trees of deployds that are gone
/// (what was left in them is killed), then makes this one's, or with
/// `keep` (after `reexec`: the instances handed on are in it) keeps it,
/// its cgroups held for [`Cgroups::adopt`]. Returns it, or why there is
/// none.
pub fn init(keep: bool) -> Result<Cgroups, CgroupError> {
    let tree = tree_for(std::process::id())?;
    sweep(tree.parent().unwrap_or(Path::new("/")));
    if !keep {
        // A deployd that had this pid before, killed with its guard.
        kill_tree(&tree);
    }
    let dir = match std::fs::create_dir(&tree) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
    .and_then(|()| open_dir(&tree))
    .map_err(|e| CgroupError::Tree(tree.clone(), e))?;
    let mut state = State::default();
    for name in children(&tree) {
        let n = name.strip_prefix('i').and_then(|n| n.parse::<u64>().ok());
        state.next = state.next.max(n.map_or(0, |n| n + 1));
        // An empty one may have been killed (and so not to be used again).
        match procs(&tree.join(&name)).is_empty() {
            true => state.dead.push(name),
            false => state.held.push(name),
        }
    }
    let v2 = enable_controllers(&tree);
    let missing: Vec<&'static str> = limits::CONTROLLERS
        .into_iter()
        .filter(|c| !v2.contains(c))
        .collect();
    let name = tree.file_name().map(|n| n.to_owned()).unwrap_or_default();
    let v1: Vec<(&'static str, PathBuf)> = limits::v1_cgroups(&missing)
        .into_iter()
        .filter_map(|(c, own)| {
            let own = strip_leaf(&own);
            // Those of deployds gone (their processes went with their v2
            // trees): empty, removed.
            for gone in children(&own).into_iter().filter(|n| is_gone(n)) {
                let t = own.join(gone);
                for leaf in children(&t) {
                    let _ = std::fs::remove_dir(t.join(leaf));
                }
                let _ = std::fs::remove_dir(t);
            }
            let t = own.join(&name);
            match std::fs::create_dir(&t) {
                Ok(()) => Some((c, t)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Some((c, t)),
                Err(e) => {
                    tracing::debug!("cgroup v1 {c}: {}: {e}", t.display());
                    None
                }
            }
        })
        .collect();
    let pool = Arc::new(Pool {
        tree,
        dir,
        state: Mutex::new(state),
        wake: Condvar::new(),
        no_clone3: Arc::new(AtomicBool::new(false)),
        v2,
        v1,
    });
    let keeper = pool.clone();
    std::thread::Builder::new()
        .name("cgroups".into())
        .spawn(move || keep_ready(&keeper))
        .map_err(CgroupError::Thread)?;
    Ok(Cgroups { pool })
}

/// Where the tree of the deployd with this pid is (or would be): under the
/// cgroup this process is in, which the guard shares with deployd.
pub fn tree_for(deployd: u32) -> Result<PathBuf, CgroupError> {
    let mount = cgroup2_mount().ok_or(CgroupError::NotMounted)?;
    let own = cgroup_of("self").ok_or(CgroupError::NoCgroup)?;
    let dir = strip_leaf(&mount.join(own.trim_start_matches('/')));
    Ok(dir.join(format!("deployd-{deployd}")))
}

/// deployd's cgroup: `dir`, or its parent when `dir` is the leaf deployd
/// moved itself into ([`limits::LEAF`]).
fn strip_leaf(dir: &Path) -> PathBuf {
    match dir.file_name().is_some_and(|n| n == limits::LEAF) {
        true => dir.parent().unwrap_or(dir).to_path_buf(),
        false => dir.to_path_buf(),
    }
}

/// Enables the limits' controllers for the instances' cgroups under
/// `tree`, where the kernel lets it; returns those enabled. deployd's
/// cgroup (the tree's parent) must pass them on, which it may only while
/// no process sits in it: deployd and its guard move into a leaf of their
/// own first, if nothing else is there (a cgroup deployd does not own is
/// left as it is).
fn enable_controllers(tree: &Path) -> Vec<&'static str> {
    let Some(parent) = tree.parent() else {
        return Vec::new();
    };
    let read = |p: &Path, f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
    let words =
        |text: String| -> Vec<String> { text.split_whitespace().map(str::to_owned).collect() };
    let available = words(read(parent, "cgroup.controllers"));
    let wanted: Vec<&'static str> = limits::CONTROLLERS
        .into_iter()
        .filter(|c| available.iter().any(|a| a == c))
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let passed = words(read(parent, "cgroup.subtree_control"));
    let root = parent.join("cgroup.procs").exists() && !parent.join("cgroup.events").exists();
    if !wanted.iter().all(|c| passed.iter().any(|p| p == c)) && !root {
        // Only deployd and its guard (its child) may be moved.
        let me = std::process::id();
        let procs = procs(parent);
        let ours = procs
            .iter()
            .all(|&p| p == me || super::procfs::parent_of(p) == Some(me));
        if !ours {
            tracing::debug!(
                "{}: other processes share deployd's cgroup; no limits from cgroup v2",
                parent.display()
            );
            return Vec::new();
        }
        let leaf = parent.join(limits::LEAF);
        let moved = match std::fs::create_dir(&leaf) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
        .and_then(|()| {
            procs
                .iter()
                .try_for_each(|p| std::fs::write(leaf.join("cgroup.procs"), p.to_string()))
        });
        if let Err(e) = moved {
            tracing::debug!("{}: {e}; no limits from cgroup v2", leaf.display());
            return Vec::new();
        }
    }
    let enable =
        |dir: &Path, c: &str| std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
    wanted
        .into_iter()
        .filter(|c| match enable(parent, c).and_then(|()| enable(tree, c)) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("cgroup v2 {c}: {e}");
                false
            }
        })
        .collect()
}

/// The cgroup v2 path (from the mount's root) of the process `pid`
/// (`self` for this one).
fn cgroup_of(pid: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// A directory, open (for `openat`, or for clone3 to start a child in).
fn open_dir(dir: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .map(OwnedFd::from)
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
    for name in children(dir).into_iter().filter(|n| is_gone(n)) {
        kill_tree(&dir.join(name));
    }
}

/// Whether `name` is the tree of a deployd no longer running: gone, or its
/// pid taken by another program since. (A deployd binary under another
/// name, `deployd-next`, still counts.)
fn is_gone(name: &str) -> bool {
    let Some(pid) = name
        .strip_prefix("deployd-")
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return false;
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    pid != std::process::id() && !comm.starts_with("deployd")
}

/// The names of the directories in `dir`.
fn children(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The keeper: removes the killed cgroups once empty and keeps [`READY`]
/// made ahead, off the path of an instance start.
fn keep_ready(pool: &Pool) {
    let mut s = pool.state.lock();
    // A cgroup that could not be made (a limit on descendants): not tried
    // again at once.
    let mut failed = false;
    loop {
        // Soon again while some have yet to empty or be made.
        let wait =
            match failed || (s.dead.is_empty() && s.dead_v1.is_empty() && s.free.len() >= READY) {
                true => Duration::from_millis(500),
                false => Duration::from_millis(20),
            };
        failed = false;
        pool.wake.wait_for(&mut s, wait);
        // Their processes are gone with the v2 cgroup's (not there:
        // nothing to remove).
        let v1 = std::mem::take(&mut s.dead_v1);
        if !v1.is_empty() {
            let left: Vec<PathBuf> = parking_lot::MutexGuard::unlocked(&mut s, || {
                v1.into_iter()
                    .filter(|d| !limits::remove(std::slice::from_ref(d)))
                    .collect()
            });
            s.dead_v1.extend(left);
        }
        // One cgroup at a time, the lock released meanwhile, each time
        // asking again whether a batch is starting.
        loop {
            let busy = s.last_take.is_some_and(|t| t.elapsed() < QUIET);
            let job = if s.free.len() < LOW || (!busy && s.free.len() < READY) {
                Some((s.fresh(), true))
            } else if !busy {
                s.dead.pop().map(|name| (name, false))
            } else {
                None
            };
            let Some((name, make)) = job else { break };
            let dir = pool.tree.join(&name);
            let done = parking_lot::MutexGuard::unlocked(&mut s, || match make {
                true => std::fs::create_dir(&dir),
                false => std::fs::remove_dir(&dir),
            });
            match (make, done) {
                (true, Ok(())) => s.free.push(name),
                (true, Err(e)) => {
                    tracing::debug!("cgroup {name}: {e}");
                    failed = true;
                    break;
                }
                (false, Ok(())) => {}
                (false, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                // Not empty yet: later.
                (false, Err(_)) => {
                    s.dead.insert(0, name);
                    break;
                }
            }
        }
    }
}

impl State {
    fn fresh(&mut self) -> String {
        let name = format!("i{}", self.next);
        self.next += 1;
        name
    }
}

impl Cgroups {
    /// Where the tree is.
    pub fn tree(&self) -> &Path {
        &self.pool.tree
    }

    /// The controllers instances can be held to limits with, here.
    pub fn controllers(&self) -> Vec<&'static str> {
        let p = &self.pool;
        let mut v = p.v2.clone();
        v.extend(p.v1.iter().map(|(c, _)| *c));
        v
    }

    /// A cgroup for an instance about to start, with `limits` written into
    /// it: an empty one from the pool, or, if it ran dry, one made now.
    /// `Ok(None)`: none could be made (the instance runs without, tracked
    /// by its process group); `Err`: its limits cannot be set.
    pub fn take(&self, limits: &limits::Limits) -> Result<Option<Place>, String> {
        let pool = &self.pool;
        let have = self.controllers();
        if let Some((c, directive)) = limits.needs().into_iter().find(|(c, _)| !have.contains(c)) {
            return Err(format!(
                "{directive} needs the {c} controller, which deployd does not have here (cgroup v2 with {c} delegated to deployd, or a cgroup v1 {c} hierarchy)"
            ));
        }
        let (name, made) = {
            let mut s = pool.state.lock();
            let name = s.free.pop();
            s.last_take = Some(Instant::now());
            pool.wake.notify_one();
            match name {
                Some(name) => (name, true),
                None => (s.fresh(), false),
            }
        };
        let dir = pool.tree.join(&name);
        if !made {
            if let Err(e) = std::fs::create_dir(&dir) {
                if !limits.is_empty() {
                    return Err(format!("{}: {e}", dir.display()));
                }
                tracing::warn!("{}: {e}; the instance runs without a cgroup", dir.display());
                return Ok(None);
            }
        }
        let unused = |why: String| {
            let mut s = pool.state.lock();
            s.dead.push(name.clone());
            why
        };
        let v2: Vec<_> = limits
            .files(false)
            .into_iter()
            .filter(|(c, _, _)| pool.v2.contains(c))
            .collect();
        limits::write_all(&dir, &v2).map_err(unused)?;
        let v1 = limits::place_v1(&pool.v1, &name, limits).map_err(unused)?;
        let fd = open_dir(&dir).ok();
        Ok(Some(Place {
            tree: pool.dir.as_raw_fd(),
            dir: CString::new(name.as_str()).map_err(|e| e.to_string())?,
            procs: CString::new(format!("{name}/cgroup.procs")).map_err(|e| e.to_string())?,
            fd,
            no_clone3: pool.no_clone3.clone(),
            v1,
            limited: !limits.is_empty(),
            name,
        }))
    }

    /// The instance given `place` runs, led by `pid` (or did not start).
    pub fn placed(&self, place: Place, pid: Option<u32>) {
        let mut s = self.pool.state.lock();
        match pid {
            Some(pid) => {
                s.by_leader.insert(pid, place.name);
            }
            // Never used, and holding another's limits: removed.
            None if place.limited => {
                s.dead.push(place.name);
                s.dead_v1.extend(place.v1.dirs);
            }
            // Never used: free again.
            None => s.free.push(place.name),
        }
    }

    /// The file that counts the memory of the instance led by `pid`, where
    /// a memory controller counts it.
    pub fn memory_file(&self, pid: u32) -> Option<PathBuf> {
        let p = &self.pool;
        let name = p.state.lock().by_leader.get(&pid)?.clone();
        if p.v2.contains(&"memory") {
            return Some(p.tree.join(name).join("memory.current"));
        }
        let (_, t) = p.v1.iter().find(|(c, _)| *c == "memory")?;
        let f = t.join(name).join("memory.usage_in_bytes");
        f.exists().then_some(f)
    }

    /// How often the kernel killed a process of the instance led by `pid`
    /// for want of memory (its `memory_max`).
    pub fn oom_kills(&self, pid: u32) -> u64 {
        let p = &self.pool;
        let Some(name) = p.state.lock().by_leader.get(&pid).cloned() else {
            return 0;
        };
        let mut dirs = vec![p.tree.join(&name)];
        dirs.extend(
            p.v1.iter()
                .filter(|(c, _)| *c == "memory")
                .map(|(_, t)| t.join(&name)),
        );
        dirs.iter().map(|d| limits::oom_kills(d)).max().unwrap_or(0)
    }

    /// After `reexec`: the instance led by `pid`, taken back, is in the
    /// cgroup it was in.
    pub fn adopt(&self, pid: u32) {
        let Some(name) = cgroup_of(&pid.to_string())
            .and_then(|p| Path::new(&p).file_name()?.to_str().map(str::to_owned))
        else {
            return;
        };
        let mut s = self.pool.state.lock();
        if let Some(i) = s.held.iter().position(|h| *h == name) {
            s.held.swap_remove(i);
            s.by_leader.insert(pid, name);
        }
    }

    /// After `reexec`, once every instance handed on was taken back or
    /// not: what is left in the cgroups not taken is killed.
    pub fn adopted_all(&self) {
        let mut s = self.pool.state.lock();
        let held = std::mem::take(&mut s.held);
        for name in &held {
            kill(&self.pool.tree.join(name));
        }
        s.dead.extend(held);
    }

    /// The cgroup of the instance led by `pid`, if it has one.
    fn of(&self, pid: u32) -> Option<PathBuf> {
        let name = self.pool.state.lock().by_leader.get(&pid)?.clone();
        Some(self.pool.tree.join(name))
    }

    /// Sends `signal` to the processes of the instance led by `pid` that
    /// left its process group (which the caller signals): those that
    /// called `setsid` or `setpgid`.
    pub fn signal_strays(&self, pid: u32, signal: i32) {
        let Some(dir) = self.of(pid) else { return };
        for p in procs(&dir) {
            if super::procfs::group_of(p).is_some_and(|g| g != pid) {
                // SAFETY: kill only sends a signal.
                unsafe { libc::kill(p as libc::pid_t, signal) };
            }
        }
    }

    /// The leader `pid` was reaped: what is left of its instance is
    /// killed, and its cgroup removed once empty.
    pub fn ended(&self, pid: u32) {
        let mut s = self.pool.state.lock();
        if let Some(name) = s.by_leader.remove(&pid) {
            kill(&self.pool.tree.join(&name));
            let v1: Vec<PathBuf> = self.pool.v1.iter().map(|(_, t)| t.join(&name)).collect();
            s.dead_v1.extend(v1);
            s.dead.push(name);
            self.pool.wake.notify_one();
        }
    }

    /// Removes deployd's tree at a clean stop (every instance stopped, so
    /// it is empty); kept on `reexec`, for the deployd that takes the
    /// instances.
    pub fn release(&self) {
        kill_tree(&self.pool.tree);
        for (_, t) in &self.pool.v1 {
            for leaf in children(t) {
                let _ = std::fs::remove_dir(t.join(leaf));
            }
            let _ = std::fs::remove_dir(t);
        }
    }
}

/// The processes of a cgroup.
fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

/// Kills every process of a cgroup and of those below it.
fn kill(dir: &Path) {
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        // Before Linux 5.14: one by one, cgroup by cgroup.
        for p in procs(dir) {
            // SAFETY: kill only sends a signal.
            unsafe { libc::kill(p as libc::pid_t, libc::SIGKILL) };
        }
        for below in children(dir) {
            kill(&dir.join(below));
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
/// tree left by one that is gone, and for its own at a clean stop.
pub fn kill_tree(tree: &Path) {
    if !tree.is_dir() {
        return;
    }
    kill(tree);
    for leaf in children(tree) {
        remove_when_empty(&tree.join(leaf));
    }
    remove_when_empty(tree);
}
