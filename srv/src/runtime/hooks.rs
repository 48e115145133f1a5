//! A rollout's hooks (`before_deploy`, `after_deploy`): a command run
//! through `/bin/sh -c` on the spawning thread, as an instance is, with
//! the service's environment, its output appended to the service's
//! `hooks_log`, killed with its process group after `hook_timeout`; how
//! it went goes back to the service's machine.

use std::io::Write;
use std::time::Duration;

use deployd_lib::host;
use deployd_lib::manifest::format_duration;
use deployd_lib::rollout::{Exit, Hook, Input as MachineInput};
use tokio::sync::oneshot;

use super::{Msg, Runtime};
use crate::process::{self, Spawn, Waiter};

impl Runtime {
    /// Runs `hook` of service `sid` with `extra` added to its environment.
    pub(super) fn run_hook(
        &mut self,
        sid: u32,
        hook: Hook,
        command: String,
        extra: Vec<(String, String)>,
        timeout: Duration,
    ) {
        let Some(e) = self.core.service(sid) else {
            return;
        };
        let name = e.name.clone();
        let m = e.machine.target().manifest.clone();
        let done = |result: Result<(), String>| Msg::Hook { sid, hook, result };
        let mut env = match host::env_files(&self.config.manifests, &m) {
            Ok(vars) => vars,
            Err(err) => {
                let _ = self.tx.send(done(Err(err)));
                return;
            }
        };
        env.extend(m.env.iter().cloned());
        env.push(("SERVICE".into(), name.to_string()));
        env.push(("HOST".into(), self.ip.to_string()));
        env.extend(extra);
        let version = env
            .iter()
            .rev()
            .find(|(k, _)| k == "VERSION")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let path = self.store.hooks_log_path(&name);
        use std::os::unix::fs::OpenOptionsExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .mode(0o600)
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                let at = deployd_lib::stamp::now();
                writeln!(f, "== {at} {} of {version}: {command}", hook.name())?;
                Ok(f)
            });
        let log = match log {
            Ok(f) => std::os::fd::OwnedFd::from(f),
            Err(err) => {
                let why = format!("cannot write its log {}: {err}", path.display());
                let _ = self.tx.send(done(Err(why)));
                return;
            }
        };
        let dir = self.instance_dir(&m);
        let user = m.user.clone();
        let children = self.children.clone();
        let (pid_tx, pid_rx) = oneshot::channel::<Result<u32, String>>();
        let (exit_tx, exit_rx) = oneshot::channel::<Exit>();
        self.spawner.submit(move || {
            let spawned = match user.as_ref().map(host::lookup).transpose() {
                Ok(account) => children
                    .tracking()
                    .spawn(Spawn {
                        command: &command,
                        dir: &dir,
                        env,
                        output: Some(log),
                        account: account.as_ref(),
                        limits: Default::default(),
                    })
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            if let Ok(pid) = spawned {
                children.watch(pid, Waiter::Channel(exit_tx));
            }
            let _ = pid_tx.send(spawned);
        });
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = match pid_rx.await {
                Ok(Ok(pid)) => match tokio::time::timeout(timeout, exit_rx).await {
                    Ok(Ok(Exit::Code(0))) => Ok(()),
                    Ok(Ok(exit)) => Err(exit.to_string()),
                    Ok(Err(_)) => Err("deployd lost track of it".into()),
                    Err(_) => {
                        process::signal_group(pid, libc::SIGKILL);
                        Err(format!(
                            "still running after hook_timeout {}: killed",
                            format_duration(timeout)
                        ))
                    }
                },
                Ok(Err(e)) => Err(format!("cannot run it: {e}")),
                Err(_) => Err("not run: deployd is stopping".into()),
            };
            let _ = tx.send(Msg::Hook { sid, hook, result });
        });
    }

    /// A hook ended: its service's machine hears how, after the last
    /// lines it printed if it failed (the rest: `hooks_log`).
    pub(super) fn hook_done(&mut self, sid: u32, hook: Hook, result: Result<(), String>) {
        if result.is_err() {
            if let Some(name) = self.core.service(sid).map(|e| e.name.clone()) {
                let path = self.store.hooks_log_path(&name);
                let lines = crate::logfile::last_lines(&path, crate::logfile::SHOWN_LINES);
                // From its run's header on.
                let start = lines
                    .iter()
                    .rposition(|l| l.starts_with("== "))
                    .map_or(0, |i| i + 1);
                for line in &lines[start..] {
                    self.log(sid, &format!("{} printed: {line}", hook.name()));
                }
            }
        }
        self.feed(sid, MachineInput::Hook { hook, result });
    }
}
