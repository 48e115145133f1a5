//! The runtime as one host of a cluster: the leader decides, this host
//! carries out its share.
//!
//! What etcd holds comes in as changes of this host's copy
//! ([`Event::Changes`]): each service's snapshot is installed in the core
//! as a mirror (never driven here: it is the leader's machine, shown by
//! the namespace as on one host), its events appended to its event log,
//! its route table applied to its port's router (and acked), and this
//! host's assignments handed to its [`Agent`], whose decisions start,
//! stop and signal instances with the same code as on one host and whose
//! statuses go back to etcd. Commands written here go to the leader.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deployd_lib::cluster::agent::{self, Agent, Do, Started};
use deployd_lib::cluster::{
    Ack, EventRecord, HostRecord, Key, LetGo, Loaded, Routes, Snapshot, What, decode, encode,
};
use deployd_lib::core::Manifests;
use deployd_lib::ctl::Verb;
use deployd_lib::host;
use deployd_lib::name::{HostName, ServiceName};
use deployd_lib::rollout::{Exit, InstanceId, Refusal};
use tokio::sync::Notify;

use super::{CtlDone, Msg, Runtime};
use crate::cluster::{Change, Event, Health, Link};
use crate::logfile;
use crate::view::{ClusterView, HostView, file_data};

/// What the runtime keeps as a host of a cluster.
pub struct Host {
    /// The link to etcd and the leader.
    pub link: Arc<Link>,
    agent: Agent,
    /// Each service's placement, from its snapshot: instance → host.
    placed: HashMap<ServiceName, BTreeMap<u64, HostName>>,
    /// Each service's route table as its router has it.
    routes: HashMap<ServiceName, Routes>,
    /// The revision of the copy the routers follow.
    routes_rev: u64,
    /// Instances routed out that still have something in flight here.
    busy: BTreeSet<(ServiceName, u64)>,
    /// Each instance's port, kept for its restarts in place.
    pub ports: HashMap<(ServiceName, InstanceId), u16>,
    hosts: BTreeMap<HostName, HostRecord>,
    drains: BTreeSet<HostName>,
    leader: Option<HostName>,
    /// Each host's number in inode numbers, never reused.
    hids: BTreeMap<HostName, u32>,
    view: Option<Arc<ClusterView>>,
    /// The revision of the copy the namespace shows.
    applied: u64,
    /// Writers waiting for the copy to reach their write's revision.
    after: Vec<(u64, Result<String, Refusal>, CtlDone)>,
    /// Which routed-out instances every host has let go of.
    let_go: LetGo,
}

impl Host {
    /// A host on `link`, with nothing yet.
    pub fn new(link: Arc<Link>) -> Host {
        Host {
            agent: Agent::new(link.boot),
            link,
            placed: HashMap::new(),
            routes: HashMap::new(),
            routes_rev: 0,
            busy: BTreeSet::new(),
            ports: HashMap::new(),
            hosts: BTreeMap::new(),
            drains: BTreeSet::new(),
            leader: None,
            hids: BTreeMap::new(),
            view: None,
            applied: 0,
            after: Vec::new(),
            let_go: LetGo::default(),
        }
    }

    /// When the agent next needs a tick.
    pub fn next_deadline(&self) -> Option<deployd_lib::rollout::Instant> {
        self.agent.next_deadline()
    }

    /// The host of an instance, as its service's snapshot says.
    pub fn host_of(&self, service: &ServiceName, id: InstanceId) -> Option<&HostName> {
        self.placed.get(service)?.get(&id.0)
    }

    /// The address and port other hosts reach an instance at, from its
    /// service's route table.
    pub fn routed_port(&self, service: &ServiceName, id: InstanceId) -> Option<u16> {
        Some(self.routes.get(service)?.backends.get(&id.0)?.addr.port())
    }
}

impl Runtime {
    fn host(&mut self) -> Option<&mut Host> {
        self.cluster.as_mut()
    }

    /// What the cluster says.
    pub(super) fn on_cluster(&mut self, event: Event) {
        match event {
            Event::Changes {
                changes,
                rev,
                replies,
            } => {
                self.changes(changes, rev);
                if !replies.is_empty() {
                    // In the namespace before the writers hear.
                    self.settle();
                    if let Some(h) = &self.cluster {
                        for (id, reply) in replies {
                            h.link.answer(&id, reply);
                        }
                    }
                }
            }
            Event::Registered { again } => {
                // A new lease: what this host wrote under the old one is
                // gone with it.
                if let Some(h) = self.host() {
                    h.agent.report_again();
                }
                self.agent(agent::Event::Tick);
                self.ack();
                if again {
                    self.say_everywhere(
                        "this host was taken for lost (its lease expired while it could not reach etcd): \
                         it joined again; what was moved meanwhile stops here",
                    );
                }
            }
            Event::Health => {
                let line = match self.cluster.as_ref().map(|h| h.link.health()) {
                    Some(Health::Unreachable(_, why)) => format!(
                        "etcd unreachable ({why}): this host goes on running and serving what it has; \
                         commands are refused until etcd answers"
                    ),
                    _ => "etcd answers again".to_string(),
                };
                self.say_everywhere(&line);
            }
            Event::Done { rev, result, done } => {
                if let Some(h) = self.host() {
                    h.after.push((rev, result, done));
                }
            }
        }
        self.publish_cluster();
        self.settle();
        // Answered once what they wrote is in the namespace.
        let Some(h) = self.host() else { return };
        let applied = h.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut h.after)
            .into_iter()
            .partition(|(rev, ..)| *rev <= applied);
        h.after = waiting;
        for (_, result, done) in ready {
            done(result);
        }
    }

    fn changes(&mut self, changes: Vec<Change>, rev: u64) {
        let me = match &self.cluster {
            Some(h) => h.link.me.clone(),
            None => return,
        };
        // What the leader waits for goes first: route tables and this
        // host's assignments of services already here, so that an ack
        // leaves, and an instance starts or stops, before the (larger)
        // snapshots are decoded. A service's snapshot still comes before
        // what else a round wrote for a service new here.
        let removed: BTreeSet<ServiceName> = changes
            .iter()
            .filter_map(|c| match &c.key {
                Key::Service(n) if c.value.is_none() => Some(n.clone()),
                _ => None,
            })
            .collect();
        let known = |n: &ServiceName| self.core.sid(n).is_some() && !removed.contains(n);
        let (early, late): (Vec<Change>, Vec<Change>) =
            changes.into_iter().partition(|c| match &c.key {
                Key::Routes(n) => known(n),
                Key::Assign(h, n, _) => *h == me && known(n),
                _ => false,
            });
        let mut routed = false;
        for c in early {
            routed |= self.change(c, &me);
        }
        let mut acked = false;
        if routed && !late.iter().any(|c| matches!(c.key, Key::Routes(_))) {
            if let Some(h) = self.host() {
                h.routes_rev = rev;
            }
            self.ack();
            acked = true;
        }
        let (services, rest): (Vec<Change>, Vec<Change>) = late
            .into_iter()
            .partition(|c| matches!(c.key, Key::Service(_)));
        for c in services {
            if let Key::Service(name) = c.key {
                self.mirror(name, c.value.as_deref());
            }
        }
        for c in rest {
            routed |= self.change(c, &me);
        }
        if let Some(h) = self.host() {
            h.applied = h.applied.max(rev);
            let first = h.routes_rev == 0;
            h.routes_rev = rev;
            if (routed || first) && !acked {
                self.ack();
            }
        }
        self.retire_released();
    }

    /// Stops what this host was assigned to retire once every host has
    /// let go of it: the acks that tell the leader tell this host too.
    fn retire_released(&mut self) {
        let Some(h) = &self.cluster else { return };
        let released: Vec<(ServiceName, InstanceId)> = h
            .agent
            .retiring()
            .filter(|(s, id)| h.let_go.released(h.hosts.keys(), s, id.0))
            .map(|(s, id)| (s.clone(), id))
            .collect();
        for (service, id) in released {
            self.agent(agent::Event::Released { service, id });
        }
    }

    /// One key's change (not a snapshot's); whether it routed something
    /// out here.
    fn change(&mut self, c: Change, me: &HostName) -> bool {
        match c.key {
            Key::Event(name, _) => {
                let Some(v) = c.value else { return false };
                let Some(sid) = self.core.sid(&name) else {
                    return false;
                };
                match decode::<EventRecord>(&v) {
                    Ok(e) => {
                        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(e.ms);
                        self.log_at(sid, &e.line, at);
                    }
                    Err(e) => tracing::warn!("{name}: an event in etcd: {e}"),
                }
            }
            Key::Assign(h, service, id) if h == *me => {
                let assignment = match c.value.as_deref().map(decode) {
                    None => None,
                    Some(Ok(a)) => Some(a),
                    Some(Err(e)) => {
                        tracing::warn!("{service}: assignment {}: {e}", id.0);
                        return false;
                    }
                };
                self.agent(agent::Event::Assigned {
                    service,
                    id,
                    assignment,
                });
            }
            Key::Routes(name) => {
                let routes = match c.value.as_deref().map(decode::<Routes>) {
                    None => Routes::default(),
                    Some(Ok(r)) => r,
                    Some(Err(e)) => {
                        tracing::warn!("{name}: route table: {e}");
                        return false;
                    }
                };
                if let (Some(h), Some(rev)) = (self.cluster.as_mut(), c.rev) {
                    h.let_go.routes(&name, &routes, rev);
                }
                // Acked when it routed something out: that is what
                // the leader waits for (a drain).
                return self.apply_routes(name, routes);
            }
            Key::Ack(h) => {
                let Some(host) = self.host() else {
                    return false;
                };
                match c.value.as_deref().map(decode::<Ack>).transpose() {
                    Ok(ack) => host.let_go.ack(&h, ack),
                    Err(e) => tracing::warn!("host {h}'s ack: {e}"),
                }
            }
            Key::Host(h) => {
                let Some(host) = self.host() else {
                    return false;
                };
                match c.value.as_deref().map(decode::<HostRecord>) {
                    Some(Ok(r)) => {
                        host.hosts.insert(h, r);
                    }
                    Some(Err(e)) => tracing::warn!("host {h}: {e}"),
                    None => {
                        host.hosts.remove(&h);
                    }
                }
            }
            Key::Drain(h) => {
                let Some(host) = self.host() else {
                    return false;
                };
                match c.value {
                    Some(_) => host.drains.insert(h),
                    None => host.drains.remove(&h),
                };
            }
            Key::Leader => {
                let Some(host) = self.host() else {
                    return false;
                };
                host.leader = c
                    .value
                    .as_deref()
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|s| HostName::new(s).ok());
            }
            _ => {}
        }
        false
    }

    /// A line in every service's events, this host's own (not the
    /// cluster's: the others do not see it).
    fn say_everywhere(&mut self, line: &str) {
        let me = self.cluster.as_ref().map(|h| h.link.me.clone());
        let line = match me {
            Some(me) => format!("{me}: {line}"),
            None => line.to_string(),
        };
        for sid in self.core.sids() {
            self.log(sid, &line);
        }
    }

    /// A service's snapshot: installed as the core's mirror and shown.
    fn mirror(&mut self, name: ServiceName, value: Option<&[u8]>) {
        let Some(v) = value else {
            if let Some(h) = self.host() {
                h.placed.remove(&name);
                h.routes.remove(&name);
            }
            if let Some(sid) = self.core.uninstall(&name) {
                self.forget(sid, &name);
            }
            return;
        };
        let snap: Snapshot = match decode(v) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("{name}: its snapshot in etcd: {e}");
                return;
            }
        };
        let history = snap
            .history
            .into_iter()
            .map(|(v, t)| (v, Arc::<str>::from(t)))
            .collect();
        let new = self.core.sid(&name).is_none();
        if new {
            if let Err(e) = self.store.create(&name) {
                tracing::warn!("{name}: cannot make its directory: {e}");
            }
        }
        let sid = self.core.install(name.clone(), snap.machine, history);
        if let Some(h) = self.host() {
            h.placed.insert(name, snap.placed);
        }
        self.sync_proxy(sid);
        self.core.touch(sid);
    }

    /// Makes a service's router follow its route table: new instances
    /// routed in (local or on other hosts), those routed out drained, those
    /// gone cut.
    fn apply_routes(&mut self, name: ServiceName, routes: Routes) -> bool {
        let Some(sid) = self.core.sid(&name) else {
            return false;
        };
        // Whether it routes out what was not routed out before here.
        let out = routes
            .backends
            .iter()
            .any(|(id, b)| !b.routed && !old_out(self.cluster.as_ref(), &name, *id));
        let router = self.services.get(&sid).and_then(|r| r.router.clone());
        let old = self
            .host()
            .and_then(|h| h.routes.remove(&name))
            .unwrap_or_default();
        if let Some(router) = &router {
            for (&id, b) in &routes.backends {
                let iid = InstanceId(id);
                let before = old.backends.get(&id);
                let moved = before.is_some_and(|o| o.addr != b.addr);
                if moved {
                    router.close(iid);
                    router.route_out(iid);
                }
                if b.routed && (moved || !before.is_some_and(|o| o.routed)) {
                    let poke = self
                        .services
                        .get(&sid)
                        .and_then(|r| r.instances.get(&iid))
                        .map_or_else(|| Arc::new(Notify::new()), |i| i.poke.clone());
                    let tx = self.tx.clone();
                    router.route_to(
                        iid,
                        b.addr,
                        poke,
                        Box::new(move || {
                            let _ = tx.send(Msg::Drained { sid, id: iid });
                        }),
                    );
                } else if !b.routed
                    && before.is_some_and(|o| o.routed)
                    && router.route_out(iid)
                    && router.inflight(iid) > 0
                {
                    if let Some(h) = self.cluster.as_mut() {
                        h.busy.insert((name.clone(), id));
                    }
                }
            }
            for id in old.backends.keys() {
                if !routes.backends.contains_key(id) {
                    router.close(InstanceId(*id));
                    router.route_out(InstanceId(*id));
                    if let Some(h) = self.cluster.as_mut() {
                        h.busy.remove(&(name.clone(), *id));
                    }
                }
            }
        }
        if let Some(h) = self.host() {
            h.routes.insert(name, routes);
        }
        self.core.touch(sid);
        out
    }

    /// A service's router made anew (its port or mode changed): every
    /// route of its table again.
    pub(super) fn route_all(&mut self, sid: u32) {
        let Some(name) = self.core.service(sid).map(|e| e.name.clone()) else {
            return;
        };
        let Some(routes) = self.host().and_then(|h| h.routes.remove(&name)) else {
            return;
        };
        if self.apply_routes(name, routes) {
            self.ack();
        }
    }

    /// An instance routed out has nothing in flight here any more.
    pub(super) fn cluster_drained(&mut self, sid: u32, id: InstanceId) {
        let Some(name) = self.core.service(sid).map(|e| e.name.clone()) else {
            return;
        };
        let removed = self.host().is_some_and(|h| h.busy.remove(&(name, id.0)));
        if removed {
            self.ack();
        }
    }

    /// Tells the leader which route tables this host follows and what is
    /// still in flight on what they routed out.
    fn ack(&mut self) {
        let Some(h) = &self.cluster else { return };
        let ack = Ack {
            rev: h.routes_rev,
            busy: h.busy.iter().cloned().collect(),
        };
        h.link.put(&Key::Ack(h.link.me.clone()), encode(&ack));
    }

    /// Hands an event to the agent and carries out its decisions.
    pub(super) fn agent(&mut self, event: agent::Event) {
        let now = self.now();
        let Some(h) = self.host() else { return };
        let todo = h.agent.handle(now, event);
        for d in todo {
            self.carry_out_agent(d);
        }
    }

    fn carry_out_agent(&mut self, d: Do) {
        match d {
            Do::Spawn {
                service,
                id,
                slot,
                spec,
            } => {
                let Some(sid) = self.core.sid(&service) else {
                    return self.agent(agent::Event::Spawned {
                        service,
                        id,
                        result: Err(Exit::SpawnFailed(
                            "its service is not known here yet".into(),
                        )),
                    });
                };
                self.start_instance(sid, id, slot, &spec);
            }
            Do::Stop {
                service,
                id,
                signal,
                timeout,
            } => {
                if let Some(sid) = self.core.sid(&service) {
                    self.stop_instance(sid, id, signal.number(), timeout);
                }
            }
            Do::Signal {
                service,
                id,
                signal,
            } => {
                if let Some(sid) = self.core.sid(&service) {
                    self.signal(sid, id, signal.number());
                }
            }
            Do::Report {
                service,
                id,
                status,
            } => {
                let Some(h) = self.host() else { return };
                let key = Key::Status(h.link.me.clone(), service.clone(), id);
                match status {
                    Some(s) => h.link.put(&key, encode(&s)),
                    None => {
                        h.ports.remove(&(service, id));
                        h.link.delete(&key);
                    }
                }
            }
        }
    }

    /// An instance's process started (or not): the agent hears of it.
    pub(super) fn cluster_spawned(&mut self, sid: u32, id: InstanceId, result: Result<u32, Exit>) {
        let Some(service) = self.core.service(sid).map(|e| e.name.clone()) else {
            return;
        };
        let result = match result {
            Ok(pid) => {
                let Some(inst) = self.instance_mut(sid, id) else {
                    return;
                };
                inst.pid = Some(pid);
                inst.start_time = crate::process::procfs::start_time(pid).unwrap_or(0);
                let port = inst.port;
                let env = format!("{:016x}", inst.env);
                if let (Some(p), Some(h)) = (port, self.cluster.as_mut()) {
                    h.ports.insert((service.clone(), id), p);
                }
                self.spawned_pid(sid, id, pid);
                // Its log is this host's again.
                self.core.touch(sid);
                Ok(Started { pid, port, env })
            }
            Err(exit) => {
                if let Some(inst) = self.take_instance(sid, id) {
                    self.release(inst);
                }
                Err(exit)
            }
        };
        self.agent(agent::Event::Spawned {
            service,
            id,
            result,
        });
    }

    /// An instance's process ended: the agent hears of it with the last
    /// lines it printed.
    pub(super) fn cluster_exited(&mut self, sid: u32, id: InstanceId, exit: Exit) {
        let Some(service) = self.core.service(sid).map(|e| e.name.clone()) else {
            return;
        };
        if let Some(router) = self.services.get(&sid).and_then(|r| r.router.as_ref()) {
            router.close(id);
        }
        let mut lines = Vec::new();
        if let Some(inst) = self.take_instance(sid, id) {
            lines = logfile::last_lines(&inst.log, logfile::SHOWN_LINES);
            self.release(inst);
        }
        self.agent(agent::Event::Exited {
            service,
            id,
            exit,
            lines,
        });
        self.core.touch(sid);
    }

    /// A probe's result: the agent hears of it (with the last lines the
    /// instance printed, when it failed).
    pub(super) fn cluster_probed(&mut self, sid: u32, id: InstanceId, result: Result<(), String>) {
        let Some(service) = self.core.service(sid).map(|e| e.name.clone()) else {
            return;
        };
        let lines = match &result {
            Err(_) => self
                .services
                .get(&sid)
                .and_then(|r| r.instances.get(&id))
                .map(|i| logfile::last_lines(&i.log, logfile::SHOWN_LINES))
                .unwrap_or_default(),
            Ok(()) => Vec::new(),
        };
        self.agent(agent::Event::Probe {
            service,
            id,
            result,
            lines,
        });
    }

    /// A ctl command written on this host: to the leader, through etcd.
    pub(super) fn cluster_ctl(&mut self, service: ServiceName, verb: Verb, done: CtlDone) {
        let Some(h) = &self.cluster else { return };
        let link = h.link.clone();
        let manifest = verb.needs_manifest().then(|| {
            self.load_for_apply(&service).and_then(|l| {
                no_hooks(&service, &l.spec.manifest).map_err(|message| Refusal {
                    kind: deployd_lib::rollout::RefusalKind::Invalid,
                    message,
                })?;
                Ok(self.to_loaded(&l.spec))
            })
        });
        let what = What::Service {
            service,
            verb,
            manifest,
        };
        tokio::spawn(async move { done(link.command(what).await) });
    }

    /// `apply` of every manifest of this host's directory: to the leader.
    pub(super) fn cluster_apply_all(&mut self, done: CtlDone) {
        let Some(h) = &self.cluster else { return };
        let link = h.link.clone();
        let all: Manifests = self.load_all();
        let all = all.map(|list| {
            list.into_iter()
                .map(|one| {
                    one.and_then(|(name, l)| {
                        no_hooks(&name, &l.spec.manifest)?;
                        Ok((name, self.to_loaded(&l.spec)))
                    })
                })
                .collect()
        });
        tokio::spawn(async move { done(link.command(What::ApplyAll(all)).await) });
    }

    /// `drain` or `undrain` of a host.
    pub(super) fn cluster_drain(&mut self, host: HostName, on: bool, done: CtlDone) {
        let Some(h) = &self.cluster else {
            return done(Err(Refusal {
                kind: deployd_lib::rollout::RefusalKind::Invalid,
                message: "not a cluster".into(),
            }));
        };
        let link = h.link.clone();
        tokio::spawn(link.drain(host, on, done));
    }

    /// A manifest as the leader gets it: its text, and a digest of its
    /// env files as this host reads them.
    fn to_loaded(&self, spec: &deployd_lib::rollout::Spec) -> Loaded {
        let env = host::env_files(&self.config.manifests, &spec.manifest)
            .map(|files| format!("{:016x}", host::env_digest(&files)))
            .unwrap_or_default();
        Loaded {
            text: spec.text.to_string(),
            env,
        }
    }

    /// Publishes `/deploy/cluster` and `/deploy/hosts/`.
    pub(super) fn publish_cluster(&mut self) {
        let now = SystemTime::now();
        let Some(h) = self.cluster.as_mut() else {
            return;
        };
        // Every host ever seen: one lost is shown `down`.
        let mut names: BTreeSet<HostName> = h.hids.keys().cloned().collect();
        names.extend(h.hosts.keys().cloned());
        names.extend(h.drains.iter().cloned());
        for placed in h.placed.values() {
            names.extend(placed.values().cloned());
        }
        names.insert(h.link.me.clone());
        let mut per_host: BTreeMap<&HostName, Vec<String>> = BTreeMap::new();
        let mut listed: Vec<(&ServiceName, &BTreeMap<u64, HostName>)> = h.placed.iter().collect();
        listed.sort_by_key(|(n, _)| *n);
        for (service, placed) in listed {
            let Some(sid) = self.core.sid(service) else {
                continue;
            };
            let Some(e) = self.core.service(sid) else {
                continue;
            };
            for i in e.machine.instances() {
                if let Some(host) = placed.get(&i.id().0) {
                    per_host
                        .entry(host)
                        .or_default()
                        .push(format!("{service} {}\n", i.number()));
                }
            }
        }
        let prev = h.view.clone();
        let mut hosts = Vec::new();
        for name in &names {
            let next = h.hids.len() as u32 + 1;
            let hid = *h.hids.entry(name.clone()).or_insert(next);
            let old = prev.as_ref().and_then(|v| v.host(hid));
            let state = match (h.hosts.contains_key(name), h.drains.contains(name)) {
                (false, _) => "down",
                (true, true) => "draining",
                (true, false) => "up",
            };
            let address = h
                .hosts
                .get(name)
                .map(|r| format!("{}\n", r.address))
                .unwrap_or_default();
            let instances: String = per_host.get(name).map(|v| v.concat()).unwrap_or_default();
            hosts.push(HostView {
                hid,
                name: name.clone(),
                state: file_data(&format!("{state}\n"), now, old.map(|o| &o.state)),
                address: file_data(&address, now, old.map(|o| &o.address)),
                instances: file_data(&instances, now, old.map(|o| &o.instances)),
            });
        }
        let up: Vec<&str> = h.hosts.keys().map(|n| n.as_str()).collect();
        let etcd = match h.link.health() {
            Health::Reachable => "reachable".to_string(),
            Health::Unreachable(since, why) => format!(
                "unreachable since {} ({why})",
                deployd_lib::stamp::at(since)
            ),
        };
        let summary = format!(
            "host {}\naddress {}\nleader {}\nhosts up {} ({})\netcd {etcd}\n",
            h.link.me,
            h.link.address,
            h.leader.as_ref().map_or("none", |l| l.as_str()),
            up.len(),
            up.join(" "),
        );
        let same_hosts = prev.as_ref().is_some_and(|p| {
            p.hosts.len() == hosts.len() && p.hosts.iter().zip(&hosts).all(|(a, b)| a.hid == b.hid)
        });
        let view = Arc::new(ClusterView {
            summary: file_data(&summary, now, prev.as_ref().map(|p| &p.summary)),
            hosts,
            mtime: match (&prev, same_hosts) {
                (Some(p), true) => p.mtime,
                _ => now,
            },
        });
        h.view = Some(view.clone());
        self.views.set_cluster(view);
    }
}

/// Whether this host's table has an instance routed out already.
fn old_out(host: Option<&Host>, name: &ServiceName, id: u64) -> bool {
    host.and_then(|h| h.routes.get(name))
        .and_then(|r| r.backends.get(&id))
        .is_some_and(|b| !b.routed)
}

/// Hooks run on one host: a cluster does not run them (yet), so a manifest
/// with them is refused there, before anything changes.
fn no_hooks(service: &ServiceName, m: &deployd_lib::manifest::Manifest) -> Result<(), String> {
    if m.before_deploy.is_some() || m.after_deploy.is_some() {
        return Err(format!(
            "{service}: before_deploy and after_deploy are not run in a cluster (yet): \
             take them out of the manifest, or run the step from a script around deploy apply"
        ));
    }
    Ok(())
}
