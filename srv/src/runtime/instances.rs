//! An instance's runtime: its process (started on the spawning thread,
//! reaped by the reaper), its output (a pipe a pump copies to its log),
//! its probes and memory samples, its port, and how it is stopped.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deployd_lib::host;
use deployd_lib::manifest::{self, Health, Version};
use deployd_lib::name::ServiceName;
use deployd_lib::rollout::{Exit, Input as MachineInput, InstanceId, Role, Spec};
use tokio::sync::{Notify, mpsc};
use tokio::task::AbortHandle;

use super::{Msg, Runtime};
use crate::handoff;
use crate::logfile;
use crate::notify;
use crate::probe;
use crate::process::{self, Children, Spawn, Tracking, Waiter};

/// How long an unexpected exit waits for its log's pump: the reaper has
/// killed the group, so the pipe's last writer is gone at once, unless a
/// process that left the group (a daemon) still holds it.
const PUMP_WAIT: Duration = Duration::from_millis(50);

/// What the runtime holds of an instance.
pub struct Inst {
    /// `None` until the spawning (main) thread has started the process.
    pub pid: Option<u32>,
    pub start_time: u64,
    /// A stop asked for before the process was started.
    stop_asked: Option<(i32, Duration)>,
    pub port: Option<u16>,
    pub log: PathBuf,
    /// Another descriptor of the read end of its output pipe, for a
    /// deployd replacing itself to hand on (the log pump owns the first).
    pub log_read: Option<OwnedFd>,
    prober: Option<AbortHandle>,
    /// Samples its memory, with `memory_high`, once its pid is known.
    memory: Option<AbortHandle>,
    /// The cgroup file that counts its memory, where one does.
    pub memory_file: Option<std::path::PathBuf>,
    /// Asks the prober for a probe now.
    pub poke: Arc<Notify>,
    pub exited: Arc<AtomicBool>,
    /// Hears when its log's pump has copied all the process printed;
    /// taken by the first look at its exit.
    pumped: Option<tokio::sync::oneshot::Receiver<()>>,
    pub stop_signal: i32,
    pub stop_timeout: Duration,
    memory_high: Option<u64>,
    /// What its env files said when it started ([`host::env_digest`]).
    pub env: u64,
    /// With `health notify`: what it said on its socket.
    pub notify: Option<Arc<notify::State>>,
}

impl Inst {
    /// Ends its probe and memory sampling tasks.
    pub fn stop_tasks(&mut self) {
        for task in [self.prober.take(), self.memory.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }

    /// An instance of manifest `m` whose process is not known yet.
    fn new(
        m: &manifest::Manifest,
        port: Option<u16>,
        log: PathBuf,
        log_read: Option<OwnedFd>,
        (prober, poke): (Option<AbortHandle>, Arc<Notify>),
        exited: Arc<AtomicBool>,
        env: u64,
    ) -> Inst {
        Inst {
            pid: None,
            start_time: 0,
            stop_asked: None,
            port,
            log,
            log_read,
            prober,
            memory: None,
            memory_file: None,
            poke,
            exited,
            pumped: None,
            stop_signal: m.stop_signal.number(),
            stop_timeout: m.stop_timeout,
            memory_high: m.memory_high,
            env,
            notify: None,
        }
    }
}

impl Runtime {
    /// Starts an instance's process: reads its env files (first, so that a
    /// broken file holds nothing yet), takes a port and a pipe, has the
    /// spawning thread start it, and starts its probes.
    pub(super) fn start_instance(&mut self, sid: u32, id: InstanceId, slot: u32, spec: &Spec) {
        let Some(name) = self.core.service(sid).map(|e| e.name.clone()) else {
            return;
        };
        let m = spec.manifest.clone();
        // Read at each start, as systemd reads EnvironmentFile=.
        let files = match host::env_files(&self.config.manifests, &m) {
            Ok(vars) => vars,
            Err(err) => return self.not_started(sid, id, Exit::SpawnFailed(err)),
        };
        let kept = self
            .cluster
            .as_ref()
            .and_then(|h| h.ports.get(&(name.clone(), id)).copied());
        let port = if m.needs_instance_port() {
            match self.alloc_port(kept) {
                Ok(p) => Some(p),
                Err(err) => return self.not_started_for(sid, id, None, "no free port", &err),
            }
        } else {
            None
        };
        let dir = self.instance_dir(&m);
        let env_digest = host::env_digest(&files);
        let mut env = instance_env(&name, &m, files, self.ip, port, slot, spec.version);
        let notify = match m.health {
            Health::Notify => match notify::socket(name.as_str(), id.0) {
                Ok(sock) => {
                    env.push(("NOTIFY_SOCKET".into(), sock.name.clone()));
                    if !m.watchdog.is_zero() {
                        env.push(("WATCHDOG_USEC".into(), m.watchdog.as_micros().to_string()));
                    }
                    Some((sock, Arc::new(notify::State::default())))
                }
                Err(err) => return self.not_started_for(sid, id, port, "no NOTIFY_SOCKET", &err),
            },
            _ => None,
        };
        let notified = notify.as_ref().map(|(_, state)| state.clone());
        let notified_view = notified.clone();
        let log = self.store.log_path(&name, self.generation, id.0);
        let (read, write) = match logfile::pipe() {
            Ok(p) => p,
            Err(err) => {
                return self.not_started_for(sid, id, port, "no pipe for its output", &err);
            }
        };
        let log_read = read.try_clone().ok();
        // Reads until every holder of the write end is gone, so also what a
        // process that dies at once printed.
        let pumped =
            logfile::spawn_pump(read, log.clone(), m.log_max, self.pump_options(sid, id, &m));
        let exited = Arc::new(AtomicBool::new(false));
        let (tx, children, flag) = (self.tx.clone(), self.children.clone(), exited.clone());
        let (command, spawn_dir, spawn_env) = (m.exec.clone(), dir.clone(), env.clone());
        let user = m.user.clone();
        let limits = crate::process::limits::Limits::of(&m);
        self.spawner.submit(move || {
            // Looked up at each start, as a login would, on the spawning
            // thread (NSS may be slow): the account may have changed since
            // the apply that checked it.
            let spawned = match user.as_ref().map(host::lookup).transpose() {
                Ok(account) => children.tracking().spawn(Spawn {
                    command: &command,
                    dir: &spawn_dir,
                    env: spawn_env,
                    output: Some(write),
                    account: account.as_ref(),
                    limits,
                }),
                Err(e) => Err(std::io::Error::new(std::io::ErrorKind::NotFound, e)),
            };
            let result =
                spawned
                    .as_ref()
                    .map(|pid| *pid)
                    .map_err(|e| match crate::short::describe(e) {
                        Some(why) => Exit::Short(why),
                        None => Exit::SpawnFailed(e.to_string()),
                    });
            // Spawned goes first: an exit the reaper already saw is only
            // delivered by watch(), after it.
            if let (Ok(pid), Some(state)) = (&spawned, &notified) {
                state.pgid.store(*pid, Ordering::SeqCst);
            }
            let _ = tx.send(Msg::Spawned { sid, id, result });
            if let Ok(pid) = spawned {
                watch_exit(&children, &tx, flag, sid, id, pid);
            }
        });
        let prober = self.start_prober(sid, id, &m, port, (dir, env), notify);
        let mut inst = Inst::new(&m, port, log, log_read, prober, exited, env_digest);
        inst.pumped = Some(pumped);
        inst.notify = notified_view;
        if let Some(r) = self.rt(sid) {
            r.instances.insert(id, inst);
        }
    }

    /// An instance that could not be started: the core hears so at the
    /// flush, as if it had exited.
    /// An instance not started because `what` failed with `err`: a
    /// shortage of deployd's own is said as one; `port`, taken for it, is
    /// free again.
    fn not_started_for(
        &mut self,
        sid: u32,
        id: InstanceId,
        port: Option<u16>,
        what: &str,
        err: &std::io::Error,
    ) {
        if let Some(p) = port {
            self.ports.remove(&p);
        }
        let exit = match crate::short::describe(err) {
            Some(why) => Exit::Short(why),
            None => Exit::SpawnFailed(format!("{what}: {err}")),
        };
        self.not_started(sid, id, exit)
    }

    fn not_started(&mut self, sid: u32, id: InstanceId, exit: Exit) {
        if self.cluster.is_some() {
            let tx = self.tx.clone();
            let _ = tx.send(Msg::Spawned {
                sid,
                id,
                result: Err(exit),
            });
            return;
        }
        self.core.defer(sid, MachineInput::Exited { id, exit });
    }

    /// How an instance's output is copied: stamped, at most at its
    /// `log_rate`, the first wait and a log it cannot write said in its
    /// service's events.
    fn pump_options(
        &self,
        sid: u32,
        id: InstanceId,
        m: &manifest::Manifest,
    ) -> logfile::PumpOptions {
        let tx = self.tx.clone();
        let said = self.tx.clone();
        logfile::PumpOptions {
            stamped: true,
            rate: m.log_rate,
            throttled: Some(Box::new(move || {
                let _ = tx.send(Msg::Throttled { sid, id });
            })),
            unwritable: Some(Box::new(move |result| {
                let _ = said.send(Msg::Unwritable { sid, id, result });
            })),
        }
    }

    /// An instance's working directory.
    pub(super) fn instance_dir(&self, m: &manifest::Manifest) -> PathBuf {
        match &m.dir {
            Some(d) => self.config.manifests.join(d),
            None => self.config.manifests.clone(),
        }
    }

    /// Starts probing an instance as its manifest says; returns the task
    /// and what pokes it for a probe now.
    fn start_prober(
        &self,
        sid: u32,
        id: InstanceId,
        m: &manifest::Manifest,
        port: Option<u16>,
        (dir, env): (PathBuf, Vec<(String, String)>),
        notify: Option<(notify::Socket, Arc<notify::State>)>,
    ) -> (Option<AbortHandle>, Arc<Notify>) {
        let poke = Arc::new(Notify::new());
        if m.health == Health::None {
            return (None, poke);
        }
        let (sock, state) = match notify {
            Some((sock, state)) => (Some(sock), Some(state)),
            None => (None, None),
        };
        let target = probe::Target {
            ip: self.ip,
            health: m.health.clone(),
            port,
            interval: m.health_interval,
            timeout: m.health_timeout,
            dir,
            env,
            user: m.user.clone(),
            notify: state.clone().map(|s| (s, m.liveness.clone(), m.watchdog)),
        };
        let tx = self.tx.clone();
        let report = move |result| {
            let _ = tx.send(Msg::Probe { sid, id, result });
        };
        let tx = self.tx.clone();
        let short = move |why| {
            let _ = tx.send(Msg::Short { sid, id, why });
        };
        let probing = probe::run(target, self.children.clone(), poke.clone(), report, short);
        // The socket is read as long as the instance is probed: one task.
        let listening = {
            let tx = self.tx.clone();
            let changed = move || {
                let _ = tx.send(Msg::NotifyStatus { sid });
            };
            let poke = poke.clone();
            async move {
                match (sock, state) {
                    (Some(sock), Some(state)) => notify::serve(sock, state, poke, changed).await,
                    _ => std::future::pending().await,
                }
            }
        };
        let task = tokio::spawn(async move {
            tokio::join!(probing, listening);
        });
        (Some(task.abort_handle()), poke)
    }

    /// Takes back an instance the deployd this one replaced left running.
    pub(super) fn adopt_instance(&mut self, sid: u32, id: InstanceId, h: handoff::Instance) {
        self.children.tracking().adopt(h.pid);
        let read = h.pipe();
        let Some((name, m)) = self.core.service(sid).and_then(|e| {
            let i = e.machine.instances().iter().find(|i| i.id() == id)?;
            Some((e.name.clone(), i.spec().manifest.clone()))
        }) else {
            return;
        };
        // For its exec probe: what the process was started with, as far as
        // the files still say it.
        let files = host::env_files(&self.config.manifests, &m).unwrap_or_else(|err| {
            tracing::warn!("{name}: instance {}: {err}", h.number);
            Vec::new()
        });
        let env_digest = h.env.unwrap_or_else(|| host::env_digest(&files));
        let env = instance_env(&name, &m, files, self.ip, h.port, h.slot, h.version);
        if let Some(p) = h.port {
            self.ports.insert(p);
        }
        let log_read = read.try_clone().ok();
        let pumped = logfile::spawn_pump(
            read,
            h.log.clone(),
            m.log_max,
            self.pump_options(sid, id, &m),
        );
        let exited = Arc::new(AtomicBool::new(false));
        watch_exit(&self.children, &self.tx, exited.clone(), sid, id, h.pid);
        // Handed on ready: it said READY=1 to the deployd before, which
        // this one is (the same process, so the same socket name).
        let notify = match m.health {
            Health::Notify => match notify::socket(name.as_str(), id.0) {
                Ok(sock) => {
                    let state = notify::State::default();
                    state.pgid.store(h.pid, Ordering::SeqCst);
                    state.ready.store(true, Ordering::SeqCst);
                    *state.pinged.lock() = Some(std::time::Instant::now());
                    Some((sock, Arc::new(state)))
                }
                Err(err) => {
                    tracing::warn!("{name}: instance {}: NOTIFY_SOCKET: {err}", h.number);
                    None
                }
            },
            _ => None,
        };
        let notified = notify.as_ref().map(|(_, state)| state.clone());
        let prober = self.start_prober(sid, id, &m, h.port, (self.instance_dir(&m), env), notify);
        let mut inst = Inst::new(&m, h.port, h.log, log_read, prober, exited, env_digest);
        inst.pumped = Some(pumped);
        inst.notify = notified;
        inst.pid = Some(h.pid);
        inst.memory_file = self.children.tracking().memory_file(h.pid);
        inst.memory = memory_watch(&self.tx, sid, id, &inst, h.pid);
        inst.start_time = h.start_time;
        if let Some(r) = self.rt(sid) {
            r.instances.insert(id, inst);
        }
    }

    /// The spawning thread started (or failed to start) an instance's process.
    pub(super) fn spawned(&mut self, sid: u32, id: InstanceId, result: Result<u32, Exit>) {
        let Some(inst) = self.instance_mut(sid, id) else {
            return;
        };
        match result {
            Ok(pid) => {
                inst.pid = Some(pid);
                inst.start_time = process::procfs::start_time(pid).unwrap_or(0);
                self.spawned_pid(sid, id, pid);
                self.core.touch(sid);
                self.feed(sid, MachineInput::Started { id, pid });
            }
            Err(exit) => {
                if let Some(inst) = self.take_instance(sid, id) {
                    self.release(inst);
                }
                self.feed(sid, MachineInput::Exited { id, exit });
            }
        }
    }

    /// What follows a process known: its memory watched, and a stop asked
    /// for before it was sent.
    pub(super) fn spawned_pid(&mut self, sid: u32, id: InstanceId, pid: u32) {
        let (tx, tracking) = (self.tx.clone(), self.children.tracking().clone());
        let Some(inst) = self.instance_mut(sid, id) else {
            return;
        };
        inst.memory_file = tracking.memory_file(pid);
        inst.memory = memory_watch(&tx, sid, id, inst, pid);
        if let Some((signal, timeout)) = inst.stop_asked.take() {
            stop_group(&tracking, pid, signal, timeout, inst.exited.clone());
        }
    }

    /// An instance's process ended: routed out at once, then the core
    /// hears of it (once its log has all it printed, when the exit was not
    /// asked for), then what it held is freed.
    pub(super) fn exited(&mut self, sid: u32, id: InstanceId, exit: Exit) {
        if let Some(router) = self.services.get(&sid).and_then(|r| r.router.as_ref()) {
            router.close(id);
        }
        if self.defer_exit(sid, id, &exit) {
            return;
        }
        self.feed(sid, MachineInput::Exited { id, exit });
        // Released once the core has it: it may ask for the output in the
        // instance's log.
        if let Some(inst) = self.take_instance(sid, id) {
            self.release(inst);
            self.core.touch(sid);
        }
    }

    /// Whether an exit waits for the rest of its process's output: one the
    /// machine did not ask for (it may show what the process printed last)
    /// while the log's pump is still copying. It comes back once the pump
    /// is done, or after [`PUMP_WAIT`]. Stops deployd made, the many exits
    /// of a rollout's batches, are handled at once, together.
    pub(super) fn defer_exit(&mut self, sid: u32, id: InstanceId, exit: &Exit) -> bool {
        let asked = self.core.service(sid).is_some_and(|e| {
            e.machine
                .instances()
                .iter()
                .any(|i| i.id() == id && i.role() == Role::Retiring)
        });
        let Some(r) = self.services.get_mut(&sid) else {
            return false;
        };
        let Some(mut pumped) = r.instances.get_mut(&id).and_then(|i| i.pumped.take()) else {
            return false;
        };
        if asked || pumped.try_recv() != Err(tokio::sync::oneshot::error::TryRecvError::Empty) {
            return false;
        }
        let (tx, exit) = (self.tx.clone(), exit.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(PUMP_WAIT, pumped).await;
            let _ = tx.send(Msg::Exited { sid, id, exit });
        });
        true
    }

    /// Stops an instance: its stop signal (SIGKILL after its timeout), now
    /// or once its process is known.
    pub(super) fn stop_instance(
        &mut self,
        sid: u32,
        id: InstanceId,
        signal: i32,
        timeout: Duration,
    ) {
        let tracking = self.children.tracking().clone();
        let Some(inst) = self.instance_mut(sid, id) else {
            return;
        };
        match inst.pid {
            Some(pid) => stop_group(&tracking, pid, signal, timeout, inst.exited.clone()),
            None => inst.stop_asked = Some((signal, timeout)),
        }
    }

    /// Sends a signal to an instance's processes.
    pub(super) fn signal(&self, sid: u32, id: InstanceId, signal: i32) {
        let pid = self
            .services
            .get(&sid)
            .and_then(|r| r.instances.get(&id))
            .and_then(|i| i.pid);
        if let Some(pid) = pid {
            process::signal_group(pid, signal);
        }
    }

    /// Cuts what is still open on an instance about to be stopped, and says
    /// so in the event log: a drain that runs out cuts what its clients
    /// then see fail.
    pub(super) fn cut(&mut self, sid: u32, id: InstanceId) {
        let Some(router) = self.services.get(&sid).and_then(|r| r.router.clone()) else {
            return;
        };
        let open = router.close(id);
        if open == 0 {
            return;
        }
        let what = open_traffic(&router, open);
        let who = self
            .core
            .service(sid)
            .and_then(|e| e.machine.instances().iter().find(|i| i.id() == id))
            .map(|i| (i.number(), i.spec().manifest.drain));
        let msg = match who {
            Some((n, drain)) => format!(
                "instance {n}: drain of {} over with {what} still open; closing",
                manifest::format_duration(drain)
            ),
            None => format!("drain over with {what} still open; closing"),
        };
        self.log(sid, &msg);
    }

    /// Routes new traffic to an instance.
    pub(super) fn route_in(&mut self, sid: u32, id: InstanceId) {
        let Some(r) = self.services.get(&sid) else {
            return;
        };
        let (Some(router), Some(inst)) = (&r.router, r.instances.get(&id)) else {
            return;
        };
        let Some(port) = inst.port else { return };
        let tx = self.tx.clone();
        router.route_in(
            id,
            port,
            inst.poke.clone(),
            Box::new(move || {
                let _ = tx.send(Msg::Drained { sid, id });
            }),
        );
    }

    /// Routes nothing new to an instance; one that was not routed through
    /// deployd has nothing to drain, and the core hears so at the flush.
    pub(super) fn route_out(&mut self, sid: u32, id: InstanceId) {
        let routed = self
            .services
            .get(&sid)
            .and_then(|r| r.router.as_ref())
            .is_some_and(|r| r.route_out(id));
        if !routed {
            self.core.defer(sid, MachineInput::Drained { id });
        }
    }

    /// Instance `id` of service `sid`, if the runtime has it.
    pub(super) fn instance_mut(&mut self, sid: u32, id: InstanceId) -> Option<&mut Inst> {
        self.services.get_mut(&sid)?.instances.get_mut(&id)
    }

    /// Takes instance `id` of service `sid` out of its service's table.
    pub(super) fn take_instance(&mut self, sid: u32, id: InstanceId) -> Option<Inst> {
        self.services.get_mut(&sid)?.instances.remove(&id)
    }

    /// Frees what an exited instance held.
    pub(super) fn release(&mut self, mut inst: Inst) {
        inst.stop_tasks();
        if let Some(port) = inst.port {
            self.ports.remove(&port);
        }
    }

    /// A free loopback port, not held by another instance, nor any
    /// service's public `port` (which may not be bound yet: its listener
    /// binds it a moment after the manifest is applied, or retries while
    /// it is taken).
    fn alloc_port(&mut self, kept: Option<u16>) -> std::io::Result<u16> {
        // The port it had, for an instance started again in place: its
        // route on every host stays right.
        if let Some(p) = kept {
            if !self.ports.contains(&p) && std::net::TcpListener::bind((self.ip, p)).is_ok() {
                self.ports.insert(p);
                return Ok(p);
            }
        }
        for _ in 0..64 {
            let port = std::net::TcpListener::bind((self.ip, 0))?
                .local_addr()?
                .port();
            let public = self
                .core
                .services()
                .any(|(_, e)| e.machine.target().manifest.port == Some(port));
            if !public && self.ports.insert(port) {
                return Ok(port);
            }
        }
        Err(std::io::Error::other("every port tried is taken"))
    }

    /// The instances of a service whose env files said something else when
    /// they started than they say now (`spec`'s files, read now).
    pub(super) fn env_changed(&self, sid: u32, spec: &Spec) -> Vec<InstanceId> {
        if spec.manifest.env_files.is_empty() {
            return Vec::new();
        }
        let Ok(files) = host::env_files(&self.config.manifests, &spec.manifest) else {
            return Vec::new();
        };
        let now = host::env_digest(&files);
        self.services
            .get(&sid)
            .map(|r| {
                r.instances
                    .iter()
                    .filter(|(_, i)| i.env != now)
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// What an instance finds in its environment besides deployd's own: its
/// env files' variables (`files`), then the manifest's `env` (a later name
/// wins when the process is started), then `HOST` (the address to listen
/// on), `PORT`, `SERVICE`, `INSTANCE` and `VERSION`.
fn instance_env(
    name: &ServiceName,
    m: &manifest::Manifest,
    files: Vec<(String, String)>,
    ip: std::net::IpAddr,
    port: Option<u16>,
    slot: u32,
    version: Version,
) -> Vec<(String, String)> {
    let mut env = files;
    env.extend(m.env.iter().cloned());
    env.push(("HOST".into(), ip.to_string()));
    if let Some(p) = port {
        env.push(("PORT".into(), p.to_string()));
    }
    env.push(("SERVICE".into(), name.to_string()));
    env.push(("INSTANCE".into(), slot.to_string()));
    env.push(("VERSION".into(), version.to_string()));
    env
}

/// With a `limit`, samples the memory of `pid`'s processes and tells the
/// runtime of each sample over it; the task is aborted with the instance.
fn memory_watch(
    tx: &mpsc::UnboundedSender<Msg>,
    sid: u32,
    id: InstanceId,
    inst: &Inst,
    pid: u32,
) -> Option<AbortHandle> {
    let limit = inst.memory_high?;
    let tx = tx.clone();
    let file = inst.memory_file.clone();
    let task = tokio::spawn(process::procfs::watch_memory(
        pid,
        file,
        limit,
        move |rss| {
            let _ = tx.send(Msg::OverMemory { sid, id, rss });
        },
    ));
    Some(task.abort_handle())
}

/// Tells the runtime when `pid`, instance `id` of service `sid`, exits.
fn watch_exit(
    children: &Children,
    tx: &mpsc::UnboundedSender<Msg>,
    flag: Arc<AtomicBool>,
    sid: u32,
    id: InstanceId,
    pid: u32,
) {
    let tx = tx.clone();
    children.watch(
        pid,
        Waiter::Notify(Box::new(move |exit| {
            flag.store(true, Ordering::SeqCst);
            let _ = tx.send(Msg::Exited { sid, id, exit });
        })),
    );
}

/// `open` requests or connections, as the router's mode counts them.
pub fn open_traffic(r: &crate::proxy::Router, open: usize) -> String {
    match (r.settings().mode, open) {
        (manifest::Proxy::Http, 1) => "1 request".to_string(),
        (manifest::Proxy::Tcp, 1) => "1 connection".to_string(),
        (manifest::Proxy::Http, _) => format!("{open} requests"),
        (manifest::Proxy::Tcp, _) => format!("{open} connections"),
    }
}

/// Sends `signal` to a process group (and what of its cgroup left it), and
/// SIGKILL after `timeout` unless it exited by then.
pub fn stop_group(
    tracking: &Arc<Tracking>,
    pid: u32,
    signal: i32,
    timeout: Duration,
    exited: Arc<AtomicBool>,
) {
    tracking.signal(pid, signal);
    if signal == libc::SIGKILL {
        return;
    }
    tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        if !exited.load(Ordering::SeqCst) {
            process::signal_group(pid, libc::SIGKILL);
        }
    });
}
