//! What a deployd hands to the deployd that replaces it (`reexec` on the
//! root ctl): the instances that keep running, with the descriptors of
//! their output pipes, and the listening sockets of the public ports.
//!
//! The old deployd finishes the traffic in flight, unmounts, writes this
//! file (atomically) in its state directory, clears close-on-exec on the
//! descriptors it names and calls `execve` from the thread that started
//! every instance: same pid, so the instances are still its children and
//! their pipes and sockets are still open. The new deployd reads the file
//! first thing (its path is in `DEPLOYD_HANDOFF`), deletes it, and takes
//! the instances back instead of starting new ones. A file whose pid is not
//! the reader's (a deployd that died between writing it and exec'ing) is
//! deleted and ignored: that start is an ordinary restart.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use deployd_lib::manifest::Version;
use serde::{Deserialize, Serialize};

/// The variable that names the file for the new deployd.
pub const ENV: &str = "DEPLOYD_HANDOFF";

/// The file, in the state directory.
pub const FILE: &str = "handoff.json";

/// The handoff.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Handoff {
    /// The process it is for: the same pid, across execve.
    pub pid: u32,
    /// Listening sockets, one per public port.
    pub listeners: Vec<RawFd>,
    /// Services, by name.
    pub services: Vec<Service>,
}

/// A service's running instances.
#[derive(Debug, Serialize, Deserialize)]
pub struct Service {
    /// Its name.
    pub name: String,
    /// Its instances.
    pub instances: Vec<Instance>,
}

/// A running instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    /// Its slot.
    pub slot: u32,
    /// Its number in the namespace.
    pub number: u32,
    /// The version it runs.
    pub version: Version,
    /// Its process group leader.
    pub pid: u32,
    /// The leader's start time (see `process::start_time`).
    pub start_time: u64,
    /// Its `$PORT`.
    pub port: Option<u16>,
    /// Its log file.
    pub log: PathBuf,
    /// The read end of its output pipe.
    pub log_fd: RawFd,
    /// What its env files said when it started ([`host::env_digest`]);
    /// absent from a handoff written before deployd kept it.
    ///
    /// [`host::env_digest`]: deployd_lib::host::env_digest
    #[serde(default)]
    pub env: Option<u64>,
}

/// Writes `h` to `STATE/handoff.json` (temporary file, fsync, rename) and
/// returns the path.
pub fn write(state: &Path, h: &Handoff) -> std::io::Result<PathBuf> {
    let path = state.join(FILE);
    let text = serde_json::to_vec(h).map_err(std::io::Error::other)?;
    crate::store::write_atomic(&path, &text, true)?;
    Ok(path)
}

static TAKEN: Mutex<Option<Handoff>> = Mutex::new(None);

/// Reads the handoff this process was started with, if any: call first
/// thing, before anything opens a descriptor. Every descriptor it names
/// becomes close-on-exec. Returns the listeners (for socket adoption) and
/// what went wrong, if anything; the rest waits in [`take`].
pub fn receive() -> (Vec<RawFd>, Option<String>) {
    let Some(path) = std::env::var_os(ENV) else {
        return (Vec::new(), None);
    };
    let path = PathBuf::from(path);
    let read = std::fs::read(&path);
    let _ = std::fs::remove_file(&path);
    let h: Handoff = match read
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(h) => h,
        Err(e) => return (Vec::new(), Some(format!("{}: {e}", path.display()))),
    };
    if h.pid != std::process::id() {
        return (
            Vec::new(),
            Some(format!(
                "{} is for pid {}, not this deployd",
                path.display(),
                h.pid
            )),
        );
    }
    let fds = h
        .services
        .iter()
        .flat_map(|s| s.instances.iter().map(|i| i.log_fd))
        .chain(h.listeners.iter().copied());
    for fd in fds {
        // SAFETY: fcntl on a descriptor number.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let listeners = h.listeners.clone();
    if let Ok(mut t) = TAKEN.lock() {
        *t = Some(h);
    }
    (listeners, None)
}

/// The handoff [`receive`] read, once.
pub fn take() -> Option<Handoff> {
    TAKEN.lock().ok()?.take()
}

impl Instance {
    /// Its output pipe, as the descriptor the handoff names.
    pub fn pipe(&self) -> OwnedFd {
        // SAFETY: each instance of the handoff is consumed once (adopted
        // or discarded), and its descriptor with it.
        unsafe { OwnedFd::from_raw_fd(self.log_fd) }
    }

    /// An instance that is not taken back: its group is killed and its
    /// pipe closed.
    pub fn discard(self) {
        crate::process::signal_group(self.pid, libc::SIGKILL);
        drop(self.pipe());
    }
}

/// Leaves `fd` open across execve (close-on-exec cleared) for the new
/// deployd to find; its number, or `None` if that failed (it is closed).
pub fn pass(fd: OwnedFd) -> Option<RawFd> {
    use std::os::fd::{AsRawFd, IntoRawFd};
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) } < 0 {
        return None;
    }
    Some(fd.into_raw_fd())
}
