//! Stopping deployd: the traffic in flight finishes (each service's
//! requests for up to its `drain`), then every instance stops, the
//! services in `after` order; or, on `reexec`, the instances run on and
//! are handed to the deployd that replaces this one.

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::time::Duration;

use deployd_lib::manifest;
use deployd_lib::rollout::{Refusal, RefusalKind};
use tokio::sync::{mpsc, watch};

use super::instances::{open_traffic, stop_group};
use super::{Msg, Outcome, Runtime};
use crate::handoff::{self, Handoff};

impl Runtime {
    /// What the loop ends with: a handoff after an accepted `reexec`, else
    /// every instance stopped, dependents first.
    pub(super) async fn stop(
        mut self,
        rx: &mut mpsc::UnboundedReceiver<Msg>,
        signals: &mut watch::Receiver<u32>,
    ) -> Outcome {
        let all = self.core.sids();
        if let Some(h) = &self.cluster {
            // The leader moves this host's instances at once; what this
            // host knew is on disk, for a start while etcd is away.
            h.link.keep_copy();
            h.link.leave().await;
        }
        if self.core.replacing() {
            // Replacing itself, deployd keeps its ports open through the wait.
            let sockets: Vec<OwnedFd> = self
                .services
                .values()
                .filter_map(|r| r.router.as_ref()?.take_socket())
                .collect();
            self.finish_traffic(rx, signals, &all).await;
            if *signals.borrow() == 0 {
                return Outcome::ReExec(self.handoff(sockets));
            }
            self.shutdown(rx, &all).await;
            return Outcome::Stopped;
        }
        // Services stop in `after` order: those that come after others
        // first, so that what they need outlives their requests in flight.
        let groups = self.core.stop_order();
        let many = groups.len() > 1;
        for group in groups {
            if many {
                let names: Vec<String> = group
                    .iter()
                    .filter_map(|sid| self.core.service(*sid).map(|e| e.name.to_string()))
                    .collect();
                tracing::info!("stopping {}", names.join(", "));
            }
            self.finish_traffic(rx, signals, &group).await;
            self.shutdown(rx, &group).await;
        }
        tracing::info!("every instance stopped");
        Outcome::Stopped
    }

    /// deployd is stopping the services `only`: none of them takes new
    /// connections, idle ones close, and what is in flight may finish,
    /// each service's requests (http) or connections (tcp) for up to its
    /// `drain`, as when an instance is routed out. Its instances keep
    /// running meanwhile; a second stop signal ends the wait.
    async fn finish_traffic(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Msg>,
        signals: &mut watch::Receiver<u32>,
        only: &[u32],
    ) {
        let now = tokio::time::Instant::now();
        let mut waiting = Vec::new();
        for &sid in only {
            let Some(r) = self.services.get(&sid).and_then(|r| r.router.clone()) else {
                continue;
            };
            r.finish();
            let open = r.owed();
            if open == 0 {
                continue;
            }
            let drain = self
                .core
                .service(sid)
                .and_then(|e| {
                    e.machine
                        .instances()
                        .iter()
                        .map(|i| i.spec().manifest.drain)
                        .max()
                })
                .unwrap_or_default();
            let what = open_traffic(&r, open);
            let msg = format!(
                "deployd stopping: waiting up to {} for {what} in flight",
                manifest::format_duration(drain)
            );
            waiting.push((sid, now + drain, msg));
        }
        for (sid, _, msg) in &waiting {
            self.log(*sid, msg);
        }
        let tick = Duration::from_millis(10);
        loop {
            let now = tokio::time::Instant::now();
            waiting.retain(|(sid, until, _)| {
                let open = self
                    .services
                    .get(sid)
                    .and_then(|r| r.router.as_ref())
                    .is_some_and(|r| r.owed() > 0);
                open && now < *until
            });
            if waiting.is_empty() {
                return;
            }
            tokio::select! {
                m = rx.recv() => if !self.while_stopping(m) {
                    return;
                },
                _ = tokio::time::sleep(tick) => {}
                Ok(_) = signals.wait_for(|n| *n >= 2) => {
                    tracing::info!("second stop signal: not waiting for traffic in flight");
                    return;
                }
            }
        }
    }

    /// Stops every instance of the services `only` (stop signal, SIGKILL
    /// after its stop_timeout) and waits for them, refusing commands
    /// meanwhile. Records stay as they are, so a rollout in flight comes
    /// back paused.
    async fn shutdown(&mut self, rx: &mut mpsc::UnboundedReceiver<Msg>, only: &[u32]) {
        let mut longest = Duration::ZERO;
        let mut live = Vec::new();
        for &sid in only {
            let Some(r) = self.services.get_mut(&sid) else {
                continue;
            };
            for (&id, inst) in &mut r.instances {
                inst.stop_tasks();
                live.push((sid, id));
            }
        }
        let tracking = self.children.tracking().clone();
        for (sid, id) in live {
            // What is still open after the wait is cut, and said.
            self.cut(sid, id);
            let Some(inst) = self.services.get(&sid).and_then(|r| r.instances.get(&id)) else {
                continue;
            };
            if let Some(pid) = inst.pid {
                stop_group(
                    &tracking,
                    pid,
                    inst.stop_signal,
                    inst.stop_timeout,
                    inst.exited.clone(),
                );
            }
            longest = longest.max(inst.stop_timeout);
        }
        let until = tokio::time::Instant::now() + longest + Duration::from_secs(2);
        let running = |s: &Self| {
            only.iter()
                .any(|sid| s.services.get(sid).is_some_and(|r| !r.instances.is_empty()))
        };
        while running(self) {
            let msg = tokio::select! {
                m = rx.recv() => m,
                _ = tokio::time::sleep_until(until) => break,
            };
            if !self.while_stopping(msg) {
                break;
            }
        }
        for sid in only {
            if let Some(r) = self.services.get_mut(sid) {
                r.instances.clear();
                let _ = self.store.save_pids(&r.name, &[]);
            }
        }
    }

    /// Handles a message while deployd stops: an instance that exited is
    /// forgotten, one that started meanwhile is stopped, commands are
    /// refused. False when the queue is closed.
    fn while_stopping(&mut self, msg: Option<Msg>) -> bool {
        let tracking = self.children.tracking().clone();
        match msg {
            Some(Msg::Exited { sid, id, .. }) => {
                if let Some(r) = self.services.get_mut(&sid) {
                    r.instances.remove(&id);
                    // Died while traffic finishes: no request goes to it.
                    if let Some(router) = &r.router {
                        router.close(id);
                    }
                }
            }
            // Started while stopping: stop it too.
            Some(Msg::Spawned { sid, id, result }) => {
                let inst = self.instance_mut(sid, id);
                match (result, inst) {
                    (Ok(pid), Some(inst)) => {
                        inst.pid = Some(pid);
                        stop_group(
                            &tracking,
                            pid,
                            inst.stop_signal,
                            inst.stop_timeout,
                            inst.exited.clone(),
                        );
                    }
                    (_, _) => {
                        if let Some(r) = self.services.get_mut(&sid) {
                            r.instances.remove(&id);
                        }
                    }
                }
            }
            Some(
                Msg::Ctl { done, .. }
                | Msg::ApplyAll { done }
                | Msg::ReExec { done }
                | Msg::HostCtl { done, .. },
            ) => {
                let message = match self.core.replacing() {
                    true => "deployd is replacing itself (reexec); try again once it is back",
                    false => "deployd is shutting down",
                };
                done(Err(Refusal {
                    kind: RefusalKind::Busy,
                    message: message.into(),
                }))
            }
            Some(_) => {}
            None => return false,
        }
        true
    }

    /// What the next deployd needs: each instance with its pid and output
    /// pipe, and every listening socket, their descriptors kept open across
    /// execve (and out of the runtime's hands).
    fn handoff(&mut self, sockets: Vec<OwnedFd>) -> Handoff {
        let mut h = Handoff {
            pid: std::process::id(),
            ..Handoff::default()
        };
        // One socket per port: the services' own, then passed ones no
        // service listens on (a removed service's, waiting for its return).
        let mut ports = HashSet::new();
        let passed = self
            .proxies
            .passed()
            .all()
            .into_iter()
            .flatten()
            .map(OwnedFd::from);
        for fd in sockets.into_iter().chain(passed) {
            let l = std::net::TcpListener::from(fd);
            let Ok(port) = l.local_addr().map(|a| a.port()) else {
                continue;
            };
            if ports.insert(port) {
                h.listeners.extend(crate::inherit::pass(OwnedFd::from(l)));
            }
        }
        for (sid, r) in self.services.iter_mut() {
            let Some(e) = self.core.service(*sid) else {
                continue;
            };
            let mut instances = Vec::new();
            for (id, inst) in &mut r.instances {
                inst.stop_tasks();
                let Some(i) = e.machine.instances().iter().find(|i| i.id() == *id) else {
                    continue;
                };
                let (Some(pid), Some(read)) = (inst.pid, inst.log_read.take()) else {
                    continue;
                };
                let Some(log_fd) = crate::inherit::pass(read) else {
                    continue;
                };
                instances.push(handoff::Instance {
                    slot: i.slot(),
                    number: i.number(),
                    version: i.spec().version,
                    pid,
                    start_time: inst.start_time,
                    port: inst.port,
                    log: inst.log.clone(),
                    log_fd,
                    env: Some(inst.env),
                });
            }
            h.services.push(handoff::Service {
                name: e.name.to_string(),
                instances,
            });
        }
        h
    }
}
