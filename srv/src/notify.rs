//! `health notify`: readiness from the program itself, by the sd_notify
//! protocol of systemd's `Type=notify` services, so that programs and
//! libraries that speak it (Python's `sdnotify`, Rust's `sd-notify`,
//! `systemd-notify`) work unchanged. Each instance gets a datagram socket
//! of its own in the abstract namespace (`NOTIFY_SOCKET=@…`, nothing on
//! disk) and reads `KEY=VALUE` lines: `READY=1` makes it ready (its probe
//! passes from then on, and is run at once), `STATUS=…` is shown in
//! `instances/N/status`, `WATCHDOG=1` is a ping that `watchdog` requires.
//! A datagram is taken only from a process of the instance's process
//! group (its credentials, `SO_PASSCRED`): another local user cannot make
//! an instance ready.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, setsockopt};
use parking_lot::Mutex;
use tokio::io::Interest;
use tokio::net::UnixDatagram;
use tokio::sync::Notify;

/// What an instance said over its socket.
#[derive(Debug, Default)]
pub struct State {
    /// Its process group (its pid), once started: whose datagrams count.
    pub pgid: AtomicU32,
    /// `READY=1` came.
    pub ready: AtomicBool,
    /// The last `STATUS=`.
    pub status: Mutex<String>,
    /// The last `WATCHDOG=1` (or `READY=1`).
    pub pinged: Mutex<Option<Instant>>,
}

impl State {
    /// Whether the probe passes on what the program said: ready, and, with
    /// a `watchdog`, pinged within it.
    pub fn check(&self, watchdog: Duration) -> Result<(), String> {
        if !self.ready.load(Ordering::SeqCst) {
            return Err("no READY=1 on NOTIFY_SOCKET yet (health notify)".into());
        }
        if !watchdog.is_zero() {
            let last = *self.pinged.lock();
            if last.is_none_or(|t| t.elapsed() > watchdog) {
                return Err(format!(
                    "no WATCHDOG=1 within watchdog {}",
                    deployd_lib::manifest::format_duration(watchdog)
                ));
            }
        }
        Ok(())
    }
}

/// An instance's socket: its `NOTIFY_SOCKET` value, and the socket.
pub struct Socket {
    /// `@deployd/PID/N`: `NOTIFY_SOCKET` for the instance.
    pub name: String,
    sock: std::os::unix::net::UnixDatagram,
}

/// The socket of `service`'s instance `id`: the same name across a
/// `reexec` (the same process), so an instance handed on keeps reaching it.
pub fn socket(service: &str, id: u64) -> std::io::Result<Socket> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("deployd/{}/{service}/{id}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let sock = std::os::unix::net::UnixDatagram::bind_addr(&addr)?;
    sock.set_nonblocking(true)?;
    setsockopt(&sock, nix::sys::socket::sockopt::PassCred, &true).map_err(std::io::Error::from)?;
    Ok(Socket {
        name: format!("@{name}"),
        sock,
    })
}

/// Reads `sock` until the task is aborted; `changed` is called when the
/// status changed, `poke` is notified at `READY=1` (a probe now).
pub async fn serve(sock: Socket, state: Arc<State>, poke: Arc<Notify>, changed: impl Fn()) {
    let Ok(sock) = UnixDatagram::from_std(sock.sock) else {
        return;
    };
    let mut buf = vec![0u8; 4096];
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let got = sock.try_io(Interest::READABLE, || {
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!(UnixCredentials);
            let msg = recvmsg::<()>(
                sock_fd(&sock),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_DONTWAIT,
            )
            .map_err(std::io::Error::from)?;
            let pid = msg.cmsgs().ok().and_then(|mut c| {
                c.find_map(|m| match m {
                    ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                    _ => None,
                })
            });
            Ok((msg.bytes, pid))
        });
        let (n, pid) = match got {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => continue,
        };
        let pgid = state.pgid.load(Ordering::SeqCst);
        let ours = pid.is_some_and(|p| {
            pgid != 0 && (p as u32 == pgid || unsafe { libc::getpgid(p) } as u32 == pgid)
        });
        if !ours {
            continue;
        }
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if take(&state, &text) {
            changed();
        }
        if state.ready.load(Ordering::SeqCst) && text.lines().any(|l| l == "READY=1") {
            poke.notify_one();
        }
    }
}

fn sock_fd(s: &UnixDatagram) -> i32 {
    s.as_raw_fd()
}

/// Takes one datagram's lines; whether the status changed.
pub fn take(state: &State, text: &str) -> bool {
    let mut changed = false;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("READY", "1")) => {
                state.ready.store(true, Ordering::SeqCst);
                *state.pinged.lock() = Some(Instant::now());
            }
            Some(("WATCHDOG", "1")) => *state.pinged.lock() = Some(Instant::now()),
            Some(("STATUS", s)) => {
                let s = deployd_lib::printable::printable(s).into_owned();
                let mut st = state.status.lock();
                if *st != s {
                    *st = s;
                    changed = true;
                }
            }
            _ => {}
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `text` to the socket named `name` (`@…`), from this process.
    fn send(name: &str, text: &str) {
        use std::os::linux::net::SocketAddrExt;
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(&name.as_bytes()[1..]).unwrap();
        let s = std::os::unix::net::UnixDatagram::unbound().unwrap();
        s.send_to_addr(text.as_bytes(), &addr).unwrap();
    }

    #[tokio::test]
    async fn only_the_instances_own_processes_are_heard() {
        let sock = socket("test-notify", u64::from(std::process::id())).unwrap();
        let name = sock.name.clone();
        let state = Arc::new(State::default());
        // Another process group's instance: this process is a stranger.
        state.pgid.store(1, Ordering::SeqCst);
        let poke = Arc::new(Notify::new());
        let task = tokio::spawn(serve(sock, state.clone(), poke, || {}));
        send(&name, "READY=1\nSTATUS=spoofed");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!state.ready.load(Ordering::SeqCst));
        assert_eq!(*state.status.lock(), "");
        // Its own group: heard.
        state
            .pgid
            .store(unsafe { libc::getpgrp() } as u32, Ordering::SeqCst);
        send(&name, "READY=1\nSTATUS=up");
        tokio::time::timeout(Duration::from_secs(5), async {
            while !state.ready.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(*state.status.lock(), "up");
        task.abort();
    }

    #[test]
    fn ready_status_and_watchdog_lines() {
        let s = State::default();
        assert!(s.check(Duration::ZERO).is_err());
        assert!(take(&s, "STATUS=migrating\n"));
        assert!(!take(&s, "STATUS=migrating"));
        assert_eq!(*s.status.lock(), "migrating");
        take(&s, "READY=1\nSTATUS=serving");
        assert!(s.check(Duration::ZERO).is_ok());
        assert!(s.check(Duration::from_secs(10)).is_ok());
        *s.pinged.lock() = Some(Instant::now() - Duration::from_secs(11));
        assert_eq!(
            s.check(Duration::from_secs(10)),
            Err("no WATCHDOG=1 within watchdog 10s".into())
        );
        take(&s, "WATCHDOG=1");
        assert!(s.check(Duration::from_secs(10)).is_ok());
    }
}
