//! The runtime: the thin loop around the decision core.
//!
//! It owns what carries decisions out: the state directory ([`Store`]),
//! the spawning thread, the reaper, the probes, the public ports
//! ([`Proxies`]), the snapshots the namespace reads ([`Views`]), and each
//! instance's runtime handles (pid, port, output pipe, prober). It takes
//! messages (a ctl write from the namespace, a probe result, an exit from
//! the reaper, a drained instance, a timer), reads what a decision needs
//! (a manifest, the env files), hands the core an [`Input`], and carries
//! out the [`Effect`]s it returns, in order; [`Core::flush`] ends each
//! round. Data flows one way: command → decision → effects → events →
//! snapshot → files.
//!
//! - [`load`]: what is read before a decision (manifests, env files, the
//!   records and the handoff at start).
//! - [`effects`]: carrying out each effect.
//! - [`instances`]: an instance's runtime: its process, output, probes.
//! - [`services`]: a service's runtime: its event log, port, record on
//!   disk, snapshot.
//! - [`stop`]: stopping deployd, or handing every instance to the deployd
//!   that replaces it.

mod cluster;
mod effects;
mod hooks;
mod instances;
mod load;
mod services;
mod stop;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use deployd_lib::core::{Core, Input, ReplyTo};
use deployd_lib::ctl::Verb;
use deployd_lib::name::ServiceName;
use deployd_lib::rollout::{Exit, Input as MachineInput, InstanceId, Instant, Refusal};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::handoff::Handoff;
use crate::process::{Children, Spawner};
use crate::proxy::Proxies;
use crate::store::Store;
use crate::view::{ServiceView, Views};

use services::Rt;

/// How a ctl command's result gets back to its writer.
pub type CtlDone = Box<dyn FnOnce(Result<String, Refusal>) + Send>;

/// What the runtime is told.
pub enum Msg {
    /// A ctl command for a service.
    Ctl {
        /// The service.
        service: ServiceName,
        /// The command.
        verb: Verb,
        /// Called with the result once it is persisted.
        done: CtlDone,
    },
    /// `apply` on the root ctl: every manifest of the manifests directory.
    ApplyAll {
        /// Called with the result once it is persisted.
        done: CtlDone,
    },
    /// `reexec` on the root ctl: deployd replaces itself, keeping instances.
    ReExec {
        /// Called with the result once it is persisted.
        done: CtlDone,
    },
    /// A line for a service's event log (a ctl write that did not parse,
    /// a port that cannot be listened on).
    Note {
        /// The service.
        service: ServiceName,
        /// The line.
        line: String,
    },
    /// An instance's `STATUS=` changed (`health notify`).
    NotifyStatus {
        /// The service's number.
        sid: u32,
    },
    /// A rollout's hook ended.
    Hook {
        /// The service's number.
        sid: u32,
        /// Which hook.
        hook: deployd_lib::rollout::Hook,
        /// How it went.
        result: Result<(), String>,
    },
    /// A probe result.
    Probe {
        /// The service's number.
        sid: u32,
        /// The instance.
        id: InstanceId,
        /// The result: why it failed, if it did.
        result: Result<(), String>,
    },
    /// deployd could not do something for an instance for a shortage of
    /// its own (a probe it could not run): said in events, at most once
    /// every [`services::SHORT_SAID`], and never counted against the
    /// instance.
    Short {
        /// The service's number.
        sid: u32,
        /// The instance.
        id: InstanceId,
        /// `deployd is short of WHAT (ERROR)`.
        why: String,
    },
    /// A sample of an instance's memory above its `memory_high`.
    OverMemory {
        /// The service's number.
        sid: u32,
        /// The instance.
        id: InstanceId,
        /// Resident bytes of its processes.
        rss: u64,
    },
    /// An instance's process was started, or could not be.
    Spawned {
        /// The service's number.
        sid: u32,
        /// The instance.
        id: InstanceId,
        /// Its pid, or how it ended before it began.
        result: Result<u32, Exit>,
    },
    /// An instance's output comes faster than its `log_rate`: its log's
    /// pump now waits.
    Throttled {
        /// The service's number.
        sid: u32,
        /// The instance.
        id: InstanceId,
    },
    /// An instance's output cannot be written to its log (`Err`: why), or
    /// can again (`Ok`: the bytes dropped meanwhile).
    Unwritable {
        /// The service's number.
        sid: u32,
        /// The instance.
        id: InstanceId,
        /// What its log's pump says.
        result: Result<u64, String>,
    },
    /// An instance routed out has nothing in flight any more.
    Drained {
        /// The service's number.
        sid: u32,
        /// The instance.
        id: InstanceId,
    },
    /// An instance's process ended.
    Exited {
        /// The service's number.
        sid: u32,
        /// The instance.
        id: InstanceId,
        /// How.
        exit: Exit,
    },
    /// In a cluster: what etcd says.
    Cluster(crate::cluster::Event),
    /// In a cluster: `drain` or `undrain` written to a host's ctl file.
    HostCtl {
        /// The host.
        host: deployd_lib::name::HostName,
        /// `drain` (true) or `undrain`.
        drain: bool,
        /// Called with the result.
        done: CtlDone,
    },
}

/// Called with each published snapshot and the one it replaced.
pub type Published = Box<dyn Fn(Option<&ServiceView>, &ServiceView) + Send + Sync>;

/// What the namespace must hear about, besides the snapshots it reads.
pub struct Hooks {
    /// Every published snapshot, with the one it replaced (the namespace
    /// answers parked reads, and has the kernel drop what it cached of
    /// the files that changed).
    pub published: Published,
    /// A service forgotten (the namespace drops its name from the kernel's
    /// cache).
    pub removed: Box<dyn Fn(&ServiceName) + Send + Sync>,
}

/// How [`Runtime::run`] ended.
pub enum Outcome {
    /// Told to stop: every instance is stopped.
    Stopped,
    /// Told to replace itself: traffic in flight finished, the instances
    /// run on; what the next deployd needs to take them back.
    ReExec(Handoff),
}

/// What the runtime works with, made in `main`.
pub struct Parts {
    /// The configuration.
    pub config: Arc<Config>,
    /// The locked state directory.
    pub store: Store,
    /// The snapshots the namespace reads.
    pub views: Views,
    /// What the namespace hears about.
    pub hooks: Hooks,
    /// The reaper's table.
    pub children: Children,
    /// The spawning thread.
    pub spawner: Spawner,
    /// The public ports' shared runtime.
    pub proxies: Proxies,
    /// The sending side of the runtime's queue.
    pub tx: mpsc::UnboundedSender<Msg>,
    /// The binary `reexec` replaces deployd with (`None`: refused).
    pub exe: Option<PathBuf>,
    /// In a cluster: this host's link to etcd and the leader.
    pub cluster: Option<Arc<crate::cluster::Link>>,
}

/// The runtime. See the module documentation.
pub struct Runtime {
    config: Arc<Config>,
    core: Core,
    store: Store,
    views: Views,
    hooks: Hooks,
    children: Children,
    spawner: Spawner,
    proxies: Proxies,
    tx: mpsc::UnboundedSender<Msg>,
    epoch: tokio::time::Instant,
    /// Distinguishes this run's log files from earlier runs'.
    generation: u64,
    /// Each service's runtime, by the core's number.
    services: HashMap<u32, Rt>,
    /// Ports held by instances.
    ports: HashSet<u16>,
    /// Writers waiting for their answer.
    replies: HashMap<u64, CtlDone>,
    next_reply: u64,
    exe: Option<PathBuf>,
    /// When to write again the records that could not be written.
    retry_save: Option<tokio::time::Instant>,
    /// What a service being created saved first, until its runtime exists.
    created: HashMap<ServiceName, deployd_lib::core::Saved>,
    /// In a cluster: this host's share.
    cluster: Option<cluster::Host>,
    /// Where instances listen (`$HOST`): the loopback address, or in a
    /// cluster this host's address.
    ip: std::net::IpAddr,
    /// deployd's service manager, told how the services stand.
    manager: crate::systemd::Manager,
    /// When to next ping the service manager's watchdog.
    watchdog: Option<tokio::time::Instant>,
    /// A service's snapshot was published since the service manager was
    /// last told how the services stand (nothing else changes it).
    standing_stale: bool,
}

impl Runtime {
    /// A runtime on `parts`, with no service yet (see [`Runtime::start`]).
    pub fn new(parts: Parts) -> Runtime {
        let generation = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let budget = parts.proxies.budget();
        tracing::debug!(
            "public ports may hold {} descriptors together ({} client connections per port by default)",
            budget.total(),
            budget.default_max_connections()
        );
        Runtime {
            core: Core::new(&parts.config.manifests),
            config: parts.config,
            store: parts.store,
            views: parts.views,
            hooks: parts.hooks,
            children: parts.children,
            spawner: parts.spawner,
            proxies: parts.proxies,
            tx: parts.tx,
            epoch: tokio::time::Instant::now(),
            generation,
            services: HashMap::new(),
            ports: HashSet::new(),
            replies: HashMap::new(),
            next_reply: 0,
            exe: parts.exe,
            retry_save: None,
            created: HashMap::new(),
            ip: parts
                .cluster
                .as_ref()
                .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |l| l.address),
            cluster: parts.cluster.map(cluster::Host::new),
            manager: crate::systemd::Manager::from_env(),
            watchdog: None,
            standing_stale: true,
        }
    }

    fn now(&self) -> Instant {
        Instant::from_epoch(self.epoch.elapsed())
    }

    /// Hands `input` to the core and carries out what it decides now.
    fn decide(&mut self, input: Input) {
        let now = self.now();
        let effects = self.core.handle(now, input);
        self.carry_out(effects);
    }

    /// Ends a round: the core's flush (saves, snapshots, stop signals,
    /// answers), again as long as carrying it out made more to do.
    fn settle(&mut self) {
        loop {
            let now = self.now();
            let effects = self.core.flush(now);
            self.carry_out(effects);
            if !self.core.has_pending() && !self.core.is_dirty() {
                return;
            }
        }
    }

    /// A token for a writer's answer.
    fn reply_to(&mut self, done: CtlDone) -> ReplyTo {
        self.next_reply += 1;
        self.replies.insert(self.next_reply, done);
        ReplyTo(self.next_reply)
    }

    /// Runs until the queue closes or `signals` (how many stop signals
    /// deployd has had) reaches one, then lets traffic in flight finish and
    /// stops every instance gracefully; a second signal skips the wait.
    pub async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        mut signals: watch::Receiver<u32>,
    ) -> Outcome {
        self.watchdog = self
            .manager
            .watchdog_every()
            .map(|d| tokio::time::Instant::now() + d);
        loop {
            if self.manager.is_on() && std::mem::take(&mut self.standing_stale) {
                self.manager.standing(&self.core.standing());
            }
            // In a cluster the machines are the leader's: only the agent
            // has deadlines here.
            let deadline = match &self.cluster {
                Some(h) => h.next_deadline(),
                None => self.core.next_deadline(),
            };
            let wake = deadline.map(|t| self.epoch + t.as_duration());
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    self.on_msg(msg);
                    // Take what else is queued before flushing once; not
                    // past an accepted `reexec`, which nothing may follow:
                    // what is left is refused while traffic finishes.
                    for _ in 0..1024 {
                        if self.core.replacing() {
                            break;
                        }
                        match rx.try_recv() {
                            Ok(m) => self.on_msg(m),
                            Err(_) => break,
                        }
                    }
                }
                _ = sleep_until(wake) => match self.cluster.is_some() {
                    true => self.agent(deployd_lib::cluster::agent::Event::Tick),
                    false => self.decide(Input::Tick),
                },
                _ = sleep_until(self.retry_save) => {
                    self.retry_save = None;
                    let unsaved: Vec<u32> = self
                        .services
                        .iter()
                        .filter(|(_, r)| r.unsaved.is_some())
                        .map(|(sid, _)| *sid)
                        .collect();
                    for sid in unsaved {
                        self.core.touch(sid);
                    }
                }
                _ = sleep_until(self.watchdog) => {
                    self.manager.watchdog();
                    self.watchdog = self
                        .manager
                        .watchdog_every()
                        .map(|d| tokio::time::Instant::now() + d);
                }
                Ok(_) = signals.wait_for(|n| *n >= 1) => break,
            }
            self.settle();
            if self.core.replacing() {
                break;
            }
        }
        match self.core.replacing() {
            true => self.manager.reloading(),
            false => self.manager.stopping(),
        }
        self.stop(&mut rx, &mut signals).await
    }

    fn on_msg(&mut self, msg: Msg) {
        if self.cluster.is_some() {
            return self.on_cluster_msg(msg);
        }
        match msg {
            Msg::Ctl {
                service,
                verb,
                done,
            } => {
                let manifest = verb.needs_manifest().then(|| self.load_for_apply(&service));
                let reply = self.reply_to(done);
                self.decide(Input::Ctl {
                    service,
                    verb,
                    manifest,
                    reply,
                });
            }
            Msg::ApplyAll { done } => {
                let manifests = self.load_all();
                let reply = self.reply_to(done);
                self.decide(Input::ApplyAll { manifests, reply });
            }
            Msg::ReExec { done } => {
                let exe = self.reexec_binary();
                let unhandable = self.unhandable();
                let reply = self.reply_to(done);
                self.decide(Input::ReExec {
                    exe,
                    unhandable,
                    reply,
                });
            }
            Msg::Note { service, line } => {
                if let Some(sid) = self.core.sid(&service) {
                    self.log(sid, &line);
                }
            }
            Msg::Probe { sid, id, result } => self.feed(sid, MachineInput::Probe { id, result }),
            Msg::Hook { sid, hook, result } => self.hook_done(sid, hook, result),
            Msg::NotifyStatus { sid } => self.core.touch(sid),
            Msg::Short { sid, id, why } => self.short(sid, id, &why),
            Msg::OverMemory { sid, id, rss } => {
                self.feed(sid, MachineInput::OverMemory { id, rss })
            }
            Msg::Spawned { sid, id, result } => self.spawned(sid, id, result),
            Msg::Drained { sid, id } => self.feed(sid, MachineInput::Drained { id }),
            Msg::Throttled { sid, id } => self.throttled(sid, id),
            Msg::Unwritable { sid, id, result } => self.unwritable(sid, id, result),
            Msg::Exited { sid, id, exit } => self.exited(sid, id, exit),
            Msg::Cluster(_) => {}
            Msg::HostCtl { done, .. } => done(Err(Refusal {
                kind: deployd_lib::rollout::RefusalKind::NotFound,
                message: "not a cluster: there are no hosts to drain".into(),
            })),
        }
    }

    /// A message, as one host of a cluster: commands go to the leader,
    /// what happens to an instance goes to the agent.
    fn on_cluster_msg(&mut self, msg: Msg) {
        match msg {
            Msg::Ctl {
                service,
                verb,
                done,
            } => self.cluster_ctl(service, verb, done),
            Msg::ApplyAll { done } => self.cluster_apply_all(done),
            Msg::ReExec { done } => done(Err(Refusal {
                kind: deployd_lib::rollout::RefusalKind::Invalid,
                message: "reexec is not available in cluster mode yet: stop and start deployd \
                          (with drain first to move its instances to other hosts)"
                    .into(),
            })),
            Msg::HostCtl { host, drain, done } => self.cluster_drain(host, drain, done),
            Msg::Note { service, line } => {
                if let Some(sid) = self.core.sid(&service) {
                    self.log(sid, &line);
                }
            }
            Msg::Probe { sid, id, result } => self.cluster_probed(sid, id, result),
            // Hooks run on one host only (a cluster host refuses them).
            Msg::Hook { .. } => {}
            Msg::NotifyStatus { sid } => self.core.touch(sid),
            Msg::Short { sid, id, why } => self.short(sid, id, &why),
            // The leader's machine decides; the agent reports the sample.
            Msg::OverMemory { sid, id, rss } => {
                if let Some(service) = self.core.service(sid).map(|e| e.name.clone()) {
                    self.agent(deployd_lib::cluster::agent::Event::OverMemory { service, id, rss });
                }
            }
            Msg::Spawned { sid, id, result } => self.cluster_spawned(sid, id, result),
            Msg::Drained { sid, id } => self.cluster_drained(sid, id),
            Msg::Throttled { sid, id } => self.throttled(sid, id),
            Msg::Unwritable { sid, id, result } => self.unwritable(sid, id, result),
            Msg::Exited { sid, id, exit } => {
                if !self.defer_exit(sid, id, &exit) {
                    self.cluster_exited(sid, id, exit);
                }
            }
            Msg::Cluster(event) => self.on_cluster(event),
        }
    }

    /// Hands an instance's event to the core.
    fn feed(&mut self, sid: u32, input: MachineInput) {
        self.decide(Input::Instance { sid, input });
    }
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
