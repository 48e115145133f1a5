//! What crosses an `execve`: the variables of deployd's own environment
//! that are deployd's and not its instances' (each is removed from what an
//! instance starts with), and descriptors deployd leaves open for the
//! deployd that replaces it (`reexec`). A leaf module, so that the modules
//! that use them (socket activation, the handoff, the guard) and the one
//! that starts processes need not know each other.

use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};

/// systemd's socket activation (`proxy::activation`).
pub const LISTEN_PID: &str = "LISTEN_PID";
/// systemd's socket activation: how many descriptors were passed.
pub const LISTEN_FDS: &str = "LISTEN_FDS";
/// systemd's socket activation: the passed descriptors' names.
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// The handoff file of the deployd this one replaced (`handoff`).
pub const HANDOFF: &str = "DEPLOYD_HANDOFF";
/// The guard's pipe, kept across `reexec` (`process::guard`).
pub const GUARD: &str = "DEPLOYD_GUARD";
/// The journal stream deployd's own output goes to under systemd: an
/// instance's output is deployd's pipe, not the journal.
pub const JOURNAL_STREAM: &str = "JOURNAL_STREAM";

/// The service manager's socket for deployd's own readiness (`systemd`);
/// an instance with `health notify` gets one of deployd's instead.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The service manager's watchdog interval for deployd, and whose it is.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// deployd's own log filter (an instance's is its manifest's `env`).
pub const RUST_LOG: &str = "RUST_LOG";

/// Every one of them.
pub const NOT_INHERITED: [&str; 10] = [
    LISTEN_PID,
    LISTEN_FDS,
    LISTEN_FDNAMES,
    HANDOFF,
    GUARD,
    JOURNAL_STREAM,
    NOTIFY_SOCKET,
    WATCHDOG_USEC,
    WATCHDOG_PID,
    RUST_LOG,
];

/// The socket activation protocol's, removed before deployd replaces
/// itself (the sockets go in the handoff then).
pub const ACTIVATION: [&str; 3] = [LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES];

/// Leaves `fd` open across execve (close-on-exec cleared) for the new
/// deployd to find; its number, or `None` if that failed (it is closed).
pub fn pass(fd: OwnedFd) -> Option<RawFd> {
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) } < 0 {
        return None;
    }
    Some(fd.into_raw_fd())
}
