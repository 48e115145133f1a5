//! deployd under a service manager (systemd's `Type=notify`, through
//! `NOTIFY_SOCKET`): `READY=1` once the namespace is mounted and every
//! service is back, `STATUS=` as the services' line changes,
//! `RELOADING=1` before `reexec` (the deployd it becomes says `READY=1`
//! again), `STOPPING=1` at a stop signal, and `WATCHDOG=1` at half of
//! `WatchdogSec` from the runtime's own loop, so a stuck engine stops it.
//! Without `NOTIFY_SOCKET` every call does nothing.

use std::time::Duration;

use deployd_lib::core::Standing;
use sd_notify::NotifyState;

/// What deployd has told its service manager.
pub struct Manager {
    on: bool,
    ready: bool,
    status: String,
    watchdog: Option<Duration>,
}

impl Manager {
    /// From deployd's environment (the variables stay for the deployd that
    /// `reexec` starts; instances do not inherit them).
    pub fn from_env() -> Manager {
        Manager {
            on: std::env::var_os(crate::inherit::NOTIFY_SOCKET).is_some(),
            ready: false,
            status: String::new(),
            watchdog: sd_notify::watchdog_enabled(),
        }
    }

    /// Whether deployd has a service manager to tell.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// How often to ping the watchdog, if asked to: twice per interval.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.on).map(|d| d / 2)
    }

    /// The services stand so: `READY=1` the first time they are back,
    /// `STATUS=` whenever the line changes.
    pub fn standing(&mut self, s: &Standing) {
        if !self.on {
            return;
        }
        let becomes_ready = s.back && !self.ready;
        if !becomes_ready && s.line == self.status {
            return;
        }
        self.status.clone_from(&s.line);
        let pid = std::process::id();
        match becomes_ready {
            true => {
                self.ready = true;
                tracing::debug!("systemd: ready ({})", s.line);
                send(&[
                    NotifyState::Ready,
                    NotifyState::MainPid(pid),
                    NotifyState::Status(&s.line),
                ]);
            }
            false => send(&[NotifyState::Status(&s.line)]),
        }
    }

    /// deployd is about to replace itself.
    pub fn reloading(&mut self) {
        if self.on {
            send(&[
                NotifyState::Reloading,
                NotifyState::Status("replacing deployd (reexec)"),
            ]);
        }
    }

    /// deployd is stopping.
    pub fn stopping(&mut self) {
        if self.on {
            send(&[
                NotifyState::Stopping,
                NotifyState::Status("stopping: draining traffic, then every instance"),
            ]);
        }
    }

    /// The runtime's loop is alive.
    pub fn watchdog(&self) {
        if self.on {
            send(&[NotifyState::Watchdog]);
        }
    }
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("NOTIFY_SOCKET: {e}");
    }
}
