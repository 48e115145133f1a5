//! What the leader decides, sans I/O: every service's rollout machine (a
//! [`Core`], as on one host) with the cluster around it.
//!
//! The caller (deployd's leader task) feeds what etcd said ([`Input`]: a
//! host up or down, a status, an ack, a drain mark, a command) and ends
//! each round with [`Leader::round`], which returns the writes of the round
//! ([`Round`]): one etcd transaction, guarded by the leader key, so that a
//! round is all written or not at all, and never by a deposed leader. On
//! success the caller says at which revision ([`Leader::committed`]); on
//! failure it drops the leader and takes the state again from etcd.
//!
//! - A machine's `Start` places the instance ([`super::placement`]) and
//!   becomes an [`Assignment`] for its host; every assignment is derived
//!   from the machine's state each round, and written when it changed.
//! - `RouteIn`, `RouteOut` and `Cut` change the service's [`Routes`]. An
//!   instance routed out is drained once every live host has acked the
//!   revision that routed it out and has nothing in flight on it.
//! - A host's [`Status`] of an instance becomes the machine's inputs
//!   (started, probes, restarted in place, exited), each once ([`Seen`]).
//! - A host lost (its lease expired) loses its instances
//!   ([`Exit::Lost`]): the machines start their slots again elsewhere.
//! - A drained host's instances are moved a slot at a time, as `restart N`
//!   does, while their service is not rolling out.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::core::{Core, Effect, Input as CoreInput, Loaded as CoreLoaded, ReplyTo};
use crate::ctl::Verb;
use crate::manifest;
use crate::manifest::Version;
use crate::name::{HostName, ServiceName};
use crate::rollout::{
    Exit, Input as MachineInput, InstanceId, Instant, Refusal, RefusalKind, Role, Spec, State,
    UpdateStatus,
};

use super::placement::{self, HostLoad};

mod effects;
use super::{
    Ack, Assignment, Backend, Command, EventRecord, HostRecord, Key, Keys, Loaded, Reply, Routes,
    Seen, Snapshot, Status, What, encode,
};

/// One write of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put a value.
    Put(String, Vec<u8>),
    /// Delete a key.
    Delete(String),
    /// Delete every key under a prefix.
    DeletePrefix(String),
}

/// What a round writes, and what it says in deployd's own log.
#[derive(Debug, Default)]
pub struct Round {
    /// The writes, for one transaction.
    pub ops: Vec<Op>,
    /// Lines for deployd's log: (is an error, line).
    pub logs: Vec<(bool, String)>,
    /// Whether a reader may be waiting on these writes: a service's
    /// version, `update_status` or progress changed (`wait`, a script
    /// polling `update_progress`). Otherwise, if the writes are only
    /// events and snapshots, the runtime may hold them for the next round.
    pub shown: bool,
}

impl Round {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// What etcd said, for the leader.
#[derive(Debug, Clone)]
pub enum Input {
    /// A host is up (its key was written).
    HostUp(HostName, HostRecord),
    /// A host is down: its key is gone (its lease expired, or its deployd
    /// stopped).
    HostDown(HostName),
    /// A host was drained (`true`) or undrained.
    Drain(HostName, bool),
    /// A host's status of an instance, or its deletion.
    Status {
        /// The host.
        host: HostName,
        /// The service.
        service: ServiceName,
        /// The instance.
        id: InstanceId,
        /// The status; `None`: deleted.
        status: Option<Status>,
    },
    /// A host's ack, or its deletion.
    Ack(HostName, Option<Ack>),
    /// A command written on a host.
    Command {
        /// Its id (the key's last part).
        id: String,
        /// The command.
        command: Command,
    },
    /// Time passed.
    Tick,
}

/// The state etcd holds when a leader takes over.
#[derive(Debug, Default)]
pub struct State0 {
    /// Each service's snapshot.
    pub services: Vec<(ServiceName, Snapshot)>,
    /// Each service's routes, with the revision they were last written at.
    pub routes: Vec<(ServiceName, Routes, u64)>,
    /// Every assignment.
    pub assigns: Vec<(HostName, ServiceName, InstanceId, Assignment)>,
    /// The live hosts.
    pub hosts: Vec<(HostName, HostRecord)>,
    /// The drained hosts.
    pub drains: Vec<HostName>,
    /// The hosts' acks.
    pub acks: Vec<(HostName, Ack)>,
    /// Every status.
    pub statuses: Vec<(HostName, ServiceName, InstanceId, Status)>,
    /// Commands not yet answered.
    pub commands: Vec<(String, Command)>,
}

/// What the leader keeps of a service besides its machine.
#[derive(Debug, Default)]
struct Extra {
    placed: BTreeMap<InstanceId, HostName>,
    seen: BTreeMap<InstanceId, Seen>,
    signals: BTreeMap<InstanceId, (u64, manifest::Signal)>,
    stopping: BTreeSet<InstanceId>,
    /// Assignments as last written.
    written: BTreeMap<InstanceId, Assignment>,
    routes: Routes,
    routes_dirty: bool,
    /// Instances routed out, with the revision that did (`None`: this
    /// round's, not yet committed).
    out_at: BTreeMap<InstanceId, Option<u64>>,
    next_event: u64,
    dirty: bool,
    /// Version, update status and progress in the last snapshot written.
    shown: Option<(Version, UpdateStatus, (u32, u32))>,
}

/// The instances a lost host had: per service, (number, slot).
type Lost = BTreeMap<u32, Vec<(u32, u32)>>;

/// Events kept in etcd per service: the oldest go as new ones come.
pub const KEEP_EVENTS: u64 = 1000;

/// Replies the leader makes to itself (the moves of a drain).
const INTERNAL: u64 = 1 << 62;

/// The leader. See the module documentation.
#[derive(Debug)]
pub struct Leader {
    me: HostName,
    keys: Keys,
    core: Core,
    extra: HashMap<u32, Extra>,
    hosts: BTreeMap<HostName, HostRecord>,
    drains: BTreeSet<HostName>,
    acks: BTreeMap<HostName, Ack>,
    statuses: HashMap<(ServiceName, InstanceId), (HostName, Status)>,
    /// Commands' writers, by the core's reply token.
    replies: HashMap<u64, (HostName, String, Option<String>)>,
    next_reply: u64,
    /// Effects of this round not yet turned into writes.
    pending: Vec<Effect>,
    /// Writes of this round, by key.
    puts: BTreeMap<String, Op>,
    prefix_deletes: Vec<String>,
    logs: Vec<(bool, String)>,
    /// Hosts lost this round, with each service's instances lost.
    lost: Vec<(HostName, Lost)>,
    /// Where this round placed each slot: (service, slot) → host.
    placed_now: BTreeMap<(u32, u32), HostName>,
    /// Instances a drain tried to move.
    drain_tried: BTreeSet<(u32, InstanceId)>,
    wall_ms: u64,
    now: Instant,
}

impl Leader {
    /// A leader with nothing yet: call [`Leader::take_over`] with etcd's
    /// state before anything else.
    pub fn new(me: HostName, keys: Keys, manifests_dir: impl Into<std::path::PathBuf>) -> Leader {
        Leader {
            me,
            keys,
            core: Core::new(manifests_dir),
            extra: HashMap::new(),
            hosts: BTreeMap::new(),
            drains: BTreeSet::new(),
            acks: BTreeMap::new(),
            statuses: HashMap::new(),
            replies: HashMap::new(),
            next_reply: 0,
            pending: Vec::new(),
            puts: BTreeMap::new(),
            prefix_deletes: Vec::new(),
            logs: Vec::new(),
            lost: Vec::new(),
            placed_now: BTreeMap::new(),
            drain_tried: BTreeSet::new(),
            wall_ms: 0,
            now: Instant::default(),
        }
    }

    /// The machines.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// The host of an instance.
    pub fn host_of(&self, service: &ServiceName, id: InstanceId) -> Option<&HostName> {
        let sid = self.core.sid(service)?;
        self.extra.get(&sid)?.placed.get(&id)
    }

    /// When the leader next needs [`Input::Tick`].
    pub fn next_deadline(&self) -> Option<Instant> {
        self.core.next_deadline()
    }

    /// Takes on what etcd holds: the machines from their snapshots (their
    /// instants moved to this clock: `now` is this leader's instant at
    /// `wall_ms`), and the hosts, statuses and commands since.
    pub fn take_over(&mut self, now: Instant, wall_ms: u64, state: State0) {
        self.now = now;
        self.wall_ms = wall_ms;
        for (h, r) in state.hosts {
            self.hosts.insert(h, r);
        }
        self.drains.extend(state.drains);
        self.acks.extend(state.acks);
        for (name, snap) in state.services {
            let elapsed = Duration::from_millis(wall_ms.saturating_sub(snap.wall_ms));
            let at = snap.at;
            let mut machine = snap.machine;
            // Where the snapshot's instant is on this clock: `elapsed`
            // before now.
            let base = now.as_duration().saturating_sub(elapsed);
            machine.rebase(|t| {
                let d = if t >= at {
                    base.saturating_add(t.since(at))
                } else {
                    base.saturating_sub(at.since(t))
                };
                Instant::from_epoch(d)
            });
            let history = snap
                .history
                .into_iter()
                .map(|(v, t)| (v, Arc::<str>::from(t)))
                .collect();
            let rolling = machine.update_status().in_rollout();
            let sid = self.core.install(name.clone(), machine, history);
            let extra = Extra {
                placed: snap
                    .placed
                    .into_iter()
                    .map(|(id, h)| (InstanceId(id), h))
                    .collect(),
                seen: snap
                    .seen
                    .into_iter()
                    .map(|(id, s)| (InstanceId(id), s))
                    .collect(),
                signals: snap
                    .signals
                    .into_iter()
                    .map(|(id, s)| (InstanceId(id), s))
                    .collect(),
                next_event: snap.next_event,
                ..Extra::default()
            };
            self.extra.insert(sid, extra);
            if rolling {
                let line = format!("{} leads the cluster now; the rollout carries on", self.me);
                self.event(sid, &line);
            }
        }
        for (name, routes, rev) in state.routes {
            let Some(x) = self
                .core
                .sid(&name)
                .and_then(|sid| self.extra.get_mut(&sid))
            else {
                self.prefix_deletes.push(self.keys.key(&Key::Routes(name)));
                continue;
            };
            for (id, b) in &routes.backends {
                if !b.routed {
                    x.out_at.insert(InstanceId(*id), Some(rev));
                }
            }
            x.routes = routes;
        }
        for (host, name, id, a) in state.assigns {
            let owned = self.core.sid(&name).and_then(|sid| {
                let x = self.extra.get_mut(&sid)?;
                (x.placed.get(&id) == Some(&host)).then_some(x)
            });
            match owned {
                Some(x) => {
                    if a.stop {
                        x.stopping.insert(id);
                    }
                    x.written.insert(id, a);
                }
                // Not the machine's: a leftover, deleted.
                None => self.delete(Key::Assign(host, name, id)),
            }
        }
        for (host, name, id, st) in state.statuses {
            self.statuses.insert((name, id), (host, st));
        }
        // What happened since the snapshots: every status, seen afresh.
        let keys: Vec<(ServiceName, InstanceId)> = self.statuses.keys().cloned().collect();
        for (name, id) in keys {
            self.observe(&name, id);
        }
        // Instances on hosts no longer up.
        let up: BTreeSet<HostName> = self.hosts.keys().cloned().collect();
        let mut gone = BTreeSet::new();
        for x in self.extra.values() {
            for h in x.placed.values() {
                if !up.contains(h) {
                    gone.insert(h.clone());
                }
            }
        }
        for h in gone {
            self.host_down(&h);
        }
        for (id, command) in state.commands {
            self.command(id, command);
        }
        self.check_drained();
    }

    /// Takes one input.
    pub fn handle(&mut self, now: Instant, wall_ms: u64, input: Input) {
        self.now = self.now.max(now);
        self.wall_ms = wall_ms;
        match input {
            Input::HostUp(h, r) => {
                self.hosts.insert(h, r);
            }
            Input::HostDown(h) => {
                if self.hosts.remove(&h).is_some() {
                    self.host_down(&h);
                }
            }
            Input::Drain(h, on) => {
                if on {
                    self.drains.insert(h);
                } else {
                    self.drains.remove(&h);
                    self.drain_tried.clear();
                }
            }
            Input::Status {
                host,
                service,
                id,
                status,
            } => {
                let placed = self.host_of(&service, id) == Some(&host);
                match status {
                    Some(st) if placed => {
                        self.statuses.insert((service.clone(), id), (host, st));
                        self.observe(&service, id);
                    }
                    Some(_) => {}
                    None => {
                        if self
                            .statuses
                            .get(&(service.clone(), id))
                            .is_some_and(|(h, _)| *h == host)
                        {
                            self.statuses.remove(&(service, id));
                        }
                    }
                }
            }
            Input::Ack(h, ack) => {
                match ack {
                    Some(a) => self.acks.insert(h, a),
                    None => self.acks.remove(&h),
                };
                self.check_drained();
            }
            Input::Command { id, command } => self.command(id, command),
            Input::Tick => {
                let effects = self.core.handle(self.now, CoreInput::Tick);
                self.pending.extend(effects);
            }
        }
    }

    /// Ends a round: what the machines decided, as writes.
    pub fn round(&mut self, now: Instant, wall_ms: u64) -> Round {
        self.now = self.now.max(now);
        self.wall_ms = wall_ms;
        self.drive_drains();
        let mut queue: VecDeque<Effect> = std::mem::take(&mut self.pending).into();
        loop {
            while let Some(effect) = queue.pop_front() {
                self.translate(effect, &mut queue);
            }
            let more = self.core.flush(self.now);
            if more.is_empty() && !self.core.has_pending() && !self.core.is_dirty() {
                break;
            }
            queue.extend(more);
        }
        self.say_lost();
        let shown = self.write_state();
        let mut ops: Vec<Op> = Vec::new();
        let deletes = std::mem::take(&mut self.prefix_deletes);
        for (key, op) in std::mem::take(&mut self.puts) {
            if deletes.iter().any(|p| key.starts_with(p.as_str())) {
                continue;
            }
            ops.push(op);
        }
        ops.extend(deletes.into_iter().map(Op::DeletePrefix));
        self.placed_now.clear();
        Round {
            ops,
            logs: std::mem::take(&mut self.logs),
            shown,
        }
    }

    /// The round's writes were committed at `revision`.
    pub fn committed(&mut self, revision: u64) {
        for x in self.extra.values_mut() {
            for at in x.out_at.values_mut() {
                if at.is_none() {
                    *at = Some(revision);
                }
            }
        }
        self.check_drained();
    }

    // ---- inputs ----

    /// A command from a host: handed to the core, its answer written to
    /// the host once the round is committed.
    fn command(&mut self, id: String, command: Command) {
        self.delete(Key::Command(id.clone()));
        self.next_reply += 1;
        let token = self.next_reply;
        let mut warning = None;
        let input = match command.what {
            What::Service {
                service,
                verb,
                manifest,
            } => {
                let manifest = manifest.map(|m| {
                    m.and_then(|l| {
                        let (loaded, warn) = self.loaded(&service, l)?;
                        warning = warn;
                        Ok(loaded)
                    })
                });
                CoreInput::Ctl {
                    service,
                    verb,
                    manifest,
                    reply: ReplyTo(token),
                }
            }
            What::ApplyAll(all) => {
                let manifests = all.map(|list| {
                    list.into_iter()
                        .map(|one| {
                            let (name, l) = one?;
                            let (loaded, _) = self
                                .loaded(&name, l)
                                .map_err(|r| format!("{name}: {}", r.message))?;
                            Ok((name, loaded))
                        })
                        .collect()
                });
                CoreInput::ApplyAll {
                    manifests,
                    reply: ReplyTo(token),
                }
            }
        };
        self.replies.insert(token, (command.from, id, warning));
        let effects = self.core.handle(self.now, input);
        self.pending.extend(effects);
    }

    /// A manifest a host loaded, parsed again here, with the instances
    /// whose env files said something else when they started, and a
    /// warning for a name of its `hosts` no live host has.
    fn loaded(
        &self,
        service: &ServiceName,
        l: Loaded,
    ) -> Result<(CoreLoaded, Option<String>), Refusal> {
        let m = manifest::parse(l.text.as_bytes()).map_err(|d| Refusal {
            kind: RefusalKind::Invalid,
            message: d.first().map(|d| d.message.clone()).unwrap_or_default(),
        })?;
        let spec = Spec::new(m, l.text);
        let mut env_changed = Vec::new();
        if !spec.manifest.env_files.is_empty() {
            for ((name, id), (_, st)) in &self.statuses {
                if name == service && st.env != l.env {
                    env_changed.push(*id);
                }
            }
            env_changed.sort();
        }
        let unknown: Vec<&str> = spec
            .manifest
            .hosts
            .iter()
            .filter(|h| !self.hosts.contains_key(*h))
            .map(|h| h.as_str())
            .collect();
        let warning = (!unknown.is_empty()).then(|| {
            format!(
                "warning: no live host is named {} (its instances go on the hosts of its hosts line that are up)",
                unknown.join(", ")
            )
        });
        Ok((CoreLoaded { spec, env_changed }, warning))
    }

    /// What a host says of an instance, fed to the machine: each change
    /// once.
    fn observe(&mut self, service: &ServiceName, id: InstanceId) {
        let Some(sid) = self.core.sid(service) else {
            return;
        };
        let Some((host, st)) = self.statuses.get(&(service.clone(), id)).cloned() else {
            return;
        };
        let inst = self
            .core
            .service(sid)
            .and_then(|e| e.machine.instances().iter().find(|i| i.id() == id));
        let retries = inst.map_or(1, |i| u64::from(i.spec().manifest.health_retries));
        let serving = inst.is_some_and(|i| i.role() == Role::Serving);
        let Some(x) = self.extra.get_mut(&sid) else {
            return;
        };
        if x.placed.get(&id) != Some(&host) {
            return;
        }
        let seen = x.seen.entry(id).or_default();
        let mut inputs = Vec::new();
        if seen.boot != 0 && st.boot != seen.boot && !seen.exited {
            // Its host's deployd started again (within its lease): the
            // process ended with the one before, and the new one started
            // it again. A serving instance is restarted in place; any
            // other is lost (a candidate is started again in its batch).
            let exit = Exit::Lost(host.to_string());
            if serving {
                inputs.push(MachineInput::Restarted { id, exit });
                *seen = Seen {
                    restarts: st.restarts,
                    fails: st.fails,
                    ..Seen::default()
                };
            } else {
                inputs.push(MachineInput::Exited { id, exit });
                seen.exited = true;
            }
        }
        seen.boot = st.boot;
        if !seen.exited {
            while seen.restarts < st.restarts {
                seen.restarts += 1;
                let exit = st.last_exit.clone().unwrap_or(Exit::Code(0));
                inputs.push(MachineInput::Restarted { id, exit });
                seen.pid = None;
                seen.ok = false;
            }
            if st.pid.is_some() && st.pid != seen.pid {
                seen.pid = st.pid;
                inputs.push(MachineInput::Started {
                    id,
                    pid: st.pid.unwrap_or_default(),
                });
            }
            let failed = st.fails > seen.fails;
            if failed {
                let error = st.error.clone().unwrap_or_else(|| "probe failed".into());
                for _ in 0..(st.fails - seen.fails).min(retries + 1) {
                    inputs.push(MachineInput::Probe {
                        id,
                        result: Err(error.clone()),
                    });
                }
                seen.fails = st.fails;
            }
            if st.ok && (failed || !seen.ok) {
                inputs.push(MachineInput::Probe { id, result: Ok(()) });
            }
            seen.ok = st.ok;
            if let Some((n, rss)) = st.over.filter(|(n, _)| *n > seen.over) {
                seen.over = n;
                inputs.push(MachineInput::OverMemory { id, rss });
            }
            if let Some(exit) = &st.exit {
                seen.exited = true;
                inputs.push(MachineInput::Exited {
                    id,
                    exit: exit.clone(),
                });
            }
        }
        x.dirty = true;
        for input in inputs {
            let effects = self
                .core
                .handle(self.now, CoreInput::Instance { sid, input });
            self.pending.extend(effects);
        }
    }

    /// A host is down: its instances are lost with it.
    fn host_down(&mut self, host: &HostName) {
        self.acks.remove(host);
        self.statuses.retain(|_, (h, _)| h != host);
        let mut lost = BTreeMap::new();
        for sid in self.core.sids() {
            let Some(x) = self.extra.get(&sid) else {
                continue;
            };
            let Some(e) = self.core.service(sid) else {
                continue;
            };
            let on: Vec<(InstanceId, u32, u32)> = e
                .machine
                .instances()
                .iter()
                .filter(|i| i.state() != State::Exited && x.placed.get(&i.id()) == Some(host))
                .map(|i| (i.id(), i.number(), i.slot()))
                .collect();
            if on.is_empty() {
                continue;
            }
            lost.insert(sid, on.iter().map(|(_, n, s)| (*n, *s)).collect());
            for (id, _, _) in on {
                if let Some(x) = self.extra.get_mut(&sid) {
                    x.seen.entry(id).or_default().exited = true;
                }
                let input = MachineInput::Exited {
                    id,
                    exit: Exit::Lost(host.to_string()),
                };
                let effects = self
                    .core
                    .handle(self.now, CoreInput::Instance { sid, input });
                self.pending.extend(effects);
            }
        }
        self.lost.push((host.clone(), lost));
        self.check_drained();
    }

    /// Feeds `Drained` for each instance routed out that every live host
    /// has let go of.
    fn check_drained(&mut self) {
        let mut drained = Vec::new();
        for (sid, x) in &self.extra {
            let Some(name) = self.core.service(*sid).map(|e| &e.name) else {
                continue;
            };
            for (id, at) in &x.out_at {
                let Some(rev) = at else { continue };
                if super::let_go(self.hosts.keys(), &self.acks, *rev, name, id.0) {
                    drained.push((*sid, *id));
                }
            }
        }
        for (sid, id) in drained {
            if let Some(x) = self.extra.get_mut(&sid) {
                x.out_at.remove(&id);
            }
            let input = MachineInput::Drained { id };
            let effects = self
                .core
                .handle(self.now, CoreInput::Instance { sid, input });
            self.pending.extend(effects);
        }
    }

    /// A drained host's instances move off it a slot at a time per
    /// service, as `restart N` does, while the service is not rolling out.
    fn drive_drains(&mut self) {
        if self.drains.is_empty() {
            return;
        }
        for sid in self.core.sids() {
            let (Some(e), Some(x)) = (self.core.service(sid), self.extra.get(&sid)) else {
                continue;
            };
            if e.machine.update_status().in_rollout() || e.machine.is_stopped() {
                continue;
            }
            let moving = e.machine.instances().iter().any(|i| {
                i.role() == Role::Candidate
                    || (i.role() == Role::Serving && i.state() == State::Starting)
            });
            if moving {
                continue;
            }
            let next = e.machine.instances().iter().find(|i| {
                i.role() == Role::Serving
                    && i.state() == State::Ready
                    && x.placed
                        .get(&i.id())
                        .is_some_and(|h| self.drains.contains(h))
                    && !self.drain_tried.contains(&(sid, i.id()))
            });
            let Some(inst) = next else { continue };
            let (id, number, name) = (inst.id(), inst.number(), e.name.clone());
            self.drain_tried.insert((sid, id));
            self.next_reply += 1;
            let reply = ReplyTo(INTERNAL + self.next_reply);
            let effects = self.core.handle(
                self.now,
                CoreInput::Ctl {
                    service: name,
                    verb: Verb::Restart(Some(number)),
                    manifest: None,
                    reply,
                },
            );
            self.pending.extend(effects);
        }
    }
}
