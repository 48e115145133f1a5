//! Public ports held across restarts of deployd: systemd's socket
//! activation protocol (`LISTEN_PID`, `LISTEN_FDS`, descriptors from 3).
//!
//! A socket unit that lists the services' ports keeps them open while
//! deployd restarts (an upgrade, a crash): connections that arrive
//! meanwhile wait in the kernel's backlog instead of being refused, and the
//! next deployd serves them once an instance is ready (they wait for one up
//! to `queue_timeout`, as in any restart of a service). Without those
//! variables, deployd binds its ports itself.

use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use parking_lot::Mutex;

/// Where passed descriptors start (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// More than any socket unit lists; a bigger count is not ours to trust.
const MAX_FDS: usize = 4096;

/// The listening sockets deployd was given: by systemd's socket
/// activation, or by the deployd it replaced.
#[derive(Debug, Default)]
pub struct Passed {
    listeners: Vec<TcpListener>,
    /// Ports of passed sockets some service has taken.
    taken: Mutex<Vec<u16>>,
}

/// Takes the listening sockets deployd was started with, if it was started
/// by socket activation, and `handed` (from the deployd it replaced, see
/// `handoff`); returns them, their ports, and why a passed descriptor was
/// left alone. Call it once, first thing: the descriptors become
/// close-on-exec, so instances never inherit them.
pub fn adopt(handed: &[RawFd]) -> (Passed, Vec<u16>, Vec<String>) {
    let (mut fds, skipped) = passed_fds();
    fds.extend(
        handed
            .iter()
            .filter(|fd| !fds.contains(fd))
            .collect::<Vec<_>>(),
    );
    let mut ports = Vec::new();
    let mut problems = Vec::new();
    let mut listeners = Vec::new();
    for fd in fds {
        match listener(fd) {
            Ok(l) => match l.local_addr() {
                Ok(a) => {
                    ports.push(a.port());
                    listeners.push(l);
                }
                Err(e) => problems.push(format!("descriptor {fd}: {e}")),
            },
            Err(why) => problems.push(format!("descriptor {fd}: {why}")),
        }
    }
    problems.extend(skipped);
    let passed = Passed {
        listeners,
        taken: Mutex::new(Vec::new()),
    };
    (passed, ports, problems)
}

impl Passed {
    /// Every passed socket, as new descriptors: what a deployd replacing
    /// itself hands on, with the ports its services listen on.
    pub fn all(&self) -> Vec<std::io::Result<TcpListener>> {
        self.listeners.iter().map(|l| l.try_clone()).collect()
    }

    /// A passed socket listening on `port`, as a new descriptor (the passed
    /// one stays, so that a service removed and applied again finds it too).
    pub fn take(&self, port: u16) -> Option<std::io::Result<TcpListener>> {
        let l = self
            .listeners
            .iter()
            .find(|l| l.local_addr().is_ok_and(|a| a.port() == port))?;
        self.taken.lock().push(port);
        Some(l.try_clone())
    }

    /// Passed ports no service has taken: connections to them wait in their
    /// backlog for nothing.
    pub fn untaken(&self) -> Vec<u16> {
        let taken = self.taken.lock();
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok().map(|a| a.port()))
            .filter(|p| !taken.contains(p))
            .collect()
    }
}

/// The descriptors systemd says are ours.
fn passed_fds() -> (Vec<RawFd>, Vec<String>) {
    let pid = std::env::var(crate::inherit::LISTEN_PID).ok();
    let count = std::env::var(crate::inherit::LISTEN_FDS).ok();
    let (Some(pid), Some(count)) = (pid, count) else {
        return (Vec::new(), Vec::new());
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        // Meant for another process (the one that exec'd deployd, say).
        return (
            Vec::new(),
            vec![format!("LISTEN_PID {pid} is not deployd's")],
        );
    }
    match count.trim().parse::<usize>() {
        Ok(n) if n <= MAX_FDS => ((FIRST_FD..FIRST_FD + n as RawFd).collect(), Vec::new()),
        _ => (
            Vec::new(),
            vec![format!("LISTEN_FDS {count:?} is not a count")],
        ),
    }
}

/// Why a passed descriptor is not taken.
#[derive(Debug)]
pub enum NotAListener {
    /// The OS said so (`EBADF`: no such descriptor).
    Os(std::io::Error),
    /// Not a listening stream socket.
    NotListening,
    /// A stream socket, but not TCP (a Unix-domain one).
    NotTcp,
}

impl std::fmt::Display for NotAListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotAListener::Os(e) => write!(f, "{e}"),
            NotAListener::NotListening => f.write_str("not a listening stream socket"),
            NotAListener::NotTcp => f.write_str("not a TCP socket"),
        }
    }
}

impl std::error::Error for NotAListener {}

/// The passed descriptor `fd` as a listener, if it is a listening TCP
/// socket (closed otherwise), made close-on-exec and non-blocking.
fn listener(fd: RawFd) -> Result<TcpListener, NotAListener> {
    // First, so that no instance inherits it whatever it is; an unused
    // number fails with EBADF.
    // SAFETY: fcntl on a descriptor number.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(NotAListener::Os(std::io::Error::last_os_error()));
    }
    // SAFETY: systemd passed it to this process for it to own, and nothing
    // else in deployd has taken it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let sock = socket2::SockRef::from(&owned);
    let stream = sock.r#type().is_ok_and(|t| t == socket2::Type::STREAM);
    if !stream || !sock.is_listener().unwrap_or(false) {
        return Err(NotAListener::NotListening);
    }
    let l = TcpListener::from(owned);
    // A Unix-domain stream socket has passed the checks above.
    if l.local_addr().is_err() {
        return Err(NotAListener::NotTcp);
    }
    l.set_nonblocking(true).map_err(NotAListener::Os)?;
    Ok(l)
}
