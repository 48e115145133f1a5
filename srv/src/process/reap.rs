//! Reaping: deployd waits for every child with `waitpid(-1)` on SIGCHLD
//! (and as child subreaper, for the orphans of its descendants), and tells
//! whoever waits for a pid. An exit that arrives before its spawner
//! registered the pid is held until it does. Nothing else in deployd may
//! wait for children (no `tokio::process`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deployd_lib::rollout::Exit;
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::Tracking;

/// How long an exit nobody claimed is kept before it is dropped (an
/// orphaned grandchild's, reaped as subreaper).
const UNCLAIMED_TTL: Duration = Duration::from_secs(10);

/// Who is told when a child exits.
pub enum Waiter {
    /// A callback, run on the reaper task with the exit.
    Notify(Box<dyn FnOnce(Exit) + Send>),
    /// A one-shot channel.
    Channel(oneshot::Sender<Exit>),
}

/// The table of children being waited for, and what tracks an instance's
/// processes beyond its group (told of each leader reaped).
#[derive(Clone, Default)]
pub struct Children {
    inner: Arc<Mutex<Table>>,
    tracking: Arc<Tracking>,
}

#[derive(Default)]
struct Table {
    waiting: HashMap<i32, Waiter>,
    unclaimed: HashMap<i32, (Exit, Instant)>,
}

impl Children {
    /// Children whose reaping `tracking` hears of.
    pub fn new(tracking: Arc<Tracking>) -> Children {
        Children {
            inner: Arc::default(),
            tracking,
        }
    }

    /// What tracks the instances' processes.
    pub fn tracking(&self) -> &Arc<Tracking> {
        &self.tracking
    }

    /// Registers who waits for `pid`; delivers at once if it already exited.
    pub fn watch(&self, pid: u32, waiter: Waiter) {
        let pid = pid as i32;
        let early = {
            let mut t = self.inner.lock();
            match t.unclaimed.remove(&pid) {
                Some((exit, _)) => Some(exit),
                None => {
                    t.waiting.insert(pid, waiter);
                    return;
                }
            }
        };
        if let Some(exit) = early {
            deliver(waiter, exit);
        }
    }

    /// Reaps every child that has exited. Returns how many.
    pub fn reap(&self) -> usize {
        let mut n = 0;
        // Not while an instance starts: the guard hears of it first.
        let _order = self.tracking.order.lock();
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("waitpid: {e}");
                    break;
                }
                Ok(s) => s,
            };
            let (pid, exit) = match status {
                WaitStatus::Exited(pid, code) => (pid, Exit::Code(code)),
                // Its cgroup says whether the kernel's OOM killer sent it.
                WaitStatus::Signaled(pid, Signal::SIGKILL, _)
                    if self.tracking.oom_kills(pid.as_raw() as u32) > 0 =>
                {
                    (pid, Exit::OutOfMemory)
                }
                WaitStatus::Signaled(pid, sig, _) => (pid, Exit::Signal(sig as i32)),
                _ => continue,
            };
            n += 1;
            // The group may still hold processes the leader left behind,
            // and its cgroup those that left the group.
            let _ = killpg(pid, Signal::SIGKILL);
            self.tracking.ended(pid.as_raw() as u32);
            let waiter = {
                let mut t = self.inner.lock();
                match t.waiting.remove(&pid.as_raw()) {
                    Some(w) => Some(w),
                    None => {
                        let now = Instant::now();
                        t.unclaimed
                            .retain(|_, (_, at)| now.duration_since(*at) < UNCLAIMED_TTL);
                        t.unclaimed.insert(pid.as_raw(), (exit.clone(), now));
                        None
                    }
                }
            };
            if let Some(w) = waiter {
                deliver(w, exit);
            }
        }
        n
    }

    /// Reaps on every SIGCHLD, and every second in case one was coalesced.
    pub async fn run_reaper(self) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigchld = match signal(SignalKind::child()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot watch SIGCHLD: {e}; reaping every 100ms");
                loop {
                    self.reap();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        loop {
            self.reap();
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

fn deliver(w: Waiter, exit: Exit) {
    match w {
        Waiter::Notify(f) => f(exit),
        Waiter::Channel(tx) => {
            let _ = tx.send(exit);
        }
    }
}
