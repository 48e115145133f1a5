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

use deployd_lib::manifest::Version;
use serde::{Deserialize, Serialize};

/// The variable that names the file for the new deployd.
pub const ENV: &str = crate::inherit::HANDOFF;

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

/// Reads the handoff this process was started with, if any: call first
/// thing, before anything opens a descriptor. Every descriptor it names
/// becomes close-on-exec. Returns it (its listeners for socket adoption,
/// its instances for the engine to take back), or what went wrong.
pub fn receive() -> Result<Option<Handoff>, HandoffError> {
    let Some(path) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    let path = PathBuf::from(path);
    let read = std::fs::read(&path);
    let _ = std::fs::remove_file(&path);
    let bytes = read.map_err(|e| HandoffError::Read(path.clone(), e))?;
    let h: Handoff =
        serde_json::from_slice(&bytes).map_err(|e| HandoffError::Parse(path.clone(), e))?;
    if h.pid != std::process::id() {
        return Err(HandoffError::OtherPid(path, h.pid));
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
    Ok(Some(h))
}

/// Why a handoff could not be taken: deployd then starts as after a
/// restart.
#[derive(Debug)]
pub enum HandoffError {
    /// The file could not be read.
    Read(PathBuf, std::io::Error),
    /// It is not a handoff.
    Parse(PathBuf, serde_json::Error),
    /// It is for another process (a deployd that died between writing it
    /// and exec'ing).
    OtherPid(PathBuf, u32),
}

impl std::fmt::Display for HandoffError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandoffError::Read(p, e) => write!(f, "{}: {e}", p.display()),
            HandoffError::Parse(p, e) => write!(f, "{}: {e}", p.display()),
            HandoffError::OtherPid(p, pid) => {
                write!(f, "{} is for pid {pid}, not this deployd", p.display())
            }
        }
    }
}

impl std::error::Error for HandoffError {}

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
        // SAFETY: killpg only sends a signal; a group gone is no error.
        unsafe { libc::killpg(self.pid as libc::pid_t, libc::SIGKILL) };
        drop(self.pipe());
    }
}
