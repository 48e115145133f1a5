//! The leader and the hosts' agents against a simulated cluster: an
//! in-memory etcd (revisions, watches delivered a millisecond later),
//! hosts whose processes start, get healthy or fail on a simulated
//! clock, proxies that ack each route table. Faults: a host lost, a leader
//! replaced at every step of a rollout, a bad version.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use super::agent::{self, Agent, Do, Started};
use super::leader::{self, Leader, Op, State0};
use super::*;
use crate::ctl::Verb;
use crate::manifest::{Health, Manifest};
use crate::rollout::{State, UpdateStatus};

const MS: Duration = Duration::from_millis(1);

fn host(n: usize) -> HostName {
    HostName::new(&format!("h{n}")).unwrap()
}

fn svc() -> ServiceName {
    ServiceName::new("web").unwrap()
}

/// A manifest whose `exec` says how its processes behave: `good` (ready
/// after 300ms), `bad` (exits 1 after 50ms), `sick` (never healthy).
fn manifest(exec: &str, replicas: u32, batch: u32) -> String {
    let mut m = Manifest::new(exec);
    m.replicas = replicas;
    m.update_batch = batch;
    m.port = Some(8080);
    m.health = Health::Http {
        path: "/healthz".into(),
    };
    m.health_interval = 100 * MS;
    m.health_deadline = Duration::from_secs(5);
    m.drain = Duration::from_secs(2);
    m.stop_timeout = Duration::from_secs(3);
    m.canonical()
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// Deliver the changes since the last delivery to a watcher: a host's
    /// up to the revision given (what etcd had sent when it was due), the
    /// leader's all there are.
    Watch(Watcher),
    Started(usize, u64, u32),
    Healthy(usize, u64, u32),
    Exit(usize, u64, u32, i32),
    /// A host's lease expires.
    Expire(usize),
    /// A busy host's requests on what was routed out at this revision end.
    Idle(usize, u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Watcher {
    Leader,
    Host(usize, u64),
}

#[derive(Debug)]
struct Proc {
    host: usize,
    id: u64,
    slot: u32,
    exec: String,
    alive: bool,
    healthy: bool,
    ever_healthy: bool,
}

struct Host {
    agent: Agent,
    up: bool,
    /// Revision of the last change it saw.
    seen: u64,
    /// Its view of the drains under way, and of the hosts up.
    let_go: LetGo,
    hosts_up: BTreeSet<HostName>,
}

struct World {
    now: Instant,
    seq: u64,
    queue: BinaryHeap<Reverse<(Instant, u64, Ev)>>,
    rev: u64,
    kv: BTreeMap<String, (Vec<u8>, u64)>,
    /// Every change: (revision, key, value).
    log: Vec<(u64, String, Option<Vec<u8>>)>,
    keys: Keys,
    leader: Option<Leader>,
    leader_seen: u64,
    hosts: Vec<Host>,
    procs: BTreeMap<u32, Proc>,
    next_pid: u32,
    replies: Vec<Reply>,
    /// Starts per (slot, version) of the service.
    starts: BTreeMap<(u32, String), u32>,
    /// The fewest instances routed in seen since `watch_capacity`.
    min_routed: Option<usize>,
    /// A host whose proxies keep requests in flight on what is routed
    /// out for this long.
    busy: Option<(usize, Duration)>,
    /// When each instance was routed out, and stopped.
    routed_out: BTreeMap<u64, Instant>,
    stopped: BTreeMap<u64, Instant>,
    /// Rounds that wrote the snapshot with no shown field changed.
    quiet_rounds: u32,
    /// Instances a host stopped on its own once every host let go.
    released: u32,
}

impl World {
    fn new(hosts: usize) -> World {
        let keys = Keys::new("/deployd");
        let mut w = World {
            now: Instant::from_epoch(Duration::from_secs(1000)),
            seq: 0,
            queue: BinaryHeap::new(),
            rev: 1,
            kv: BTreeMap::new(),
            log: Vec::new(),
            keys: keys.clone(),
            leader: None,
            leader_seen: 0,
            hosts: Vec::new(),
            procs: BTreeMap::new(),
            next_pid: 100,
            replies: Vec::new(),
            starts: BTreeMap::new(),
            min_routed: None,
            busy: None,
            routed_out: BTreeMap::new(),
            stopped: BTreeMap::new(),
            quiet_rounds: 0,
            released: 0,
        };
        for n in 1..=hosts {
            w.hosts.push(Host {
                agent: Agent::new(n as u64),
                up: true,
                seen: 0,
                let_go: LetGo::default(),
                hosts_up: BTreeSet::new(),
            });
            let record = HostRecord {
                address: IpAddr::V4(Ipv4Addr::new(127, 0, 0, n as u8 + 1)),
                id: format!("id{n}"),
                lease: n as i64,
                cpus: 2,
                memory: 1 << 30,
                started_ms: 0,
            };
            w.txn(vec![Op::Put(
                keys.key(&Key::Host(host(n))),
                encode(&record),
            )]);
        }
        w.elect();
        w
    }

    fn wall(&self) -> u64 {
        self.now.as_duration().as_millis() as u64
    }

    fn at(&mut self, delay: Duration, e: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay, self.seq, e)));
    }

    /// Applies writes as one transaction; every watcher hears of it 1ms later.
    fn txn(&mut self, ops: Vec<Op>) -> u64 {
        if ops.is_empty() {
            return self.rev;
        }
        self.rev += 1;
        let rev = self.rev;
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    self.kv.insert(k.clone(), (v.clone(), rev));
                    self.log.push((rev, k, Some(v)));
                }
                Op::Delete(k) => {
                    if self.kv.remove(&k).is_some() {
                        self.log.push((rev, k, None));
                    }
                }
                Op::DeletePrefix(p) => {
                    let gone: Vec<String> = self
                        .kv
                        .keys()
                        .filter(|k| k.starts_with(&p))
                        .cloned()
                        .collect();
                    for k in gone {
                        self.kv.remove(&k);
                        self.log.push((rev, k, None));
                    }
                }
            }
        }
        self.at(MS, Ev::Watch(Watcher::Leader));
        for h in 0..self.hosts.len() {
            self.at(MS, Ev::Watch(Watcher::Host(h, rev)));
        }
        self.check_routes();
        rev
    }

    /// Every routed-in backend is a process that got healthy on its host
    /// (a crash or a lost host is routed out once the leader hears of
    /// it); counts those alive.
    fn check_routes(&mut self) {
        let key = self.keys.key(&Key::Routes(svc()));
        let Some((v, _)) = self.kv.get(&key) else {
            return;
        };
        let routes: Routes = decode(v).unwrap();
        let mut routed = 0;
        for (id, b) in &routes.backends {
            if !b.routed {
                self.routed_out.entry(*id).or_insert(self.now);
                continue;
            }
            let pid = u32::from(b.addr.port() - 20000);
            let p = self
                .procs
                .get(&pid)
                .unwrap_or_else(|| panic!("instance {id} routed in with no process"));
            assert_eq!(p.id, *id);
            assert!(
                p.ever_healthy,
                "instance {id} routed in before it was healthy"
            );
            assert_eq!(host(p.host + 1), b.host);
            if p.alive {
                routed += 1;
            }
        }
        if let Some(m) = &mut self.min_routed {
            *m = (*m).min(routed);
        }
    }

    /// The state a new leader reads from etcd.
    fn state0(&self) -> State0 {
        let mut s = State0::default();
        for (k, (v, rev)) in &self.kv {
            match self.keys.parse(k.as_bytes()).unwrap() {
                Key::Host(h) => s.hosts.push((h, decode(v).unwrap())),
                Key::Service(n) => s.services.push((n, decode(v).unwrap())),
                Key::Routes(n) => s.routes.push((n, decode(v).unwrap(), *rev)),
                Key::Assign(h, n, id) => s.assigns.push((h, n, id, decode(v).unwrap())),
                Key::Status(h, n, id) => s.statuses.push((h, n, id, decode(v).unwrap())),
                Key::Ack(h) => s.acks.push((h, decode(v).unwrap())),
                Key::Drain(h) => s.drains.push(h),
                Key::Command(id) => s.commands.push((id, decode(v).unwrap())),
                _ => {}
            }
        }
        s
    }

    /// A new leader takes over from what etcd holds.
    fn elect(&mut self) {
        let mut l = Leader::new(host(1), self.keys.clone(), "/m");
        l.take_over(self.now, self.wall(), self.state0());
        self.leader = Some(l);
        self.leader_seen = self.rev;
        self.round();
    }

    fn round(&mut self) {
        let (now, wall) = (self.now, self.wall());
        let Some(l) = &mut self.leader else { return };
        let r = l.round(now, wall);
        for (error, line) in &r.logs {
            assert!(!error, "leader: {line}");
        }
        // `shown` says exactly whether a reader's fields changed.
        let key = self.keys.key(&Key::Service(svc()));
        let shown = |v: &[u8]| {
            let m = decode::<Snapshot>(v).unwrap().machine;
            (m.version(), m.update_status(), m.progress())
        };
        let before = self.kv.get(&key).map(|(v, _)| shown(v));
        let after = r.ops.iter().find_map(|op| match op {
            Op::Put(k, v) if *k == key => Some(shown(v)),
            _ => None,
        });
        let changed = after.is_some() && after != before;
        if after.is_some() && !changed {
            self.quiet_rounds += 1;
        }
        assert!(r.shown >= changed, "{before:?} → {after:?}");
        let rev = self.txn(r.ops);
        if let Some(l) = &mut self.leader {
            l.committed(rev);
        }
    }

    fn command(&mut self, from: usize, what: What) {
        self.seq += 1;
        let id = format!("c{}", self.seq);
        let cmd = Command {
            from: host(from),
            what,
        };
        self.txn(vec![Op::Put(
            self.keys.key(&Key::Command(id)),
            encode(&cmd),
        )]);
    }

    fn apply(&mut self, text: String) {
        self.command(
            1,
            What::Service {
                service: svc(),
                verb: Verb::Apply,
                manifest: Some(Ok(Loaded {
                    text,
                    env: String::new(),
                })),
            },
        );
    }

    fn verb(&mut self, from: usize, verb: Verb) {
        self.command(
            from,
            What::Service {
                service: svc(),
                verb,
                manifest: None,
            },
        );
    }

    fn watch_leader(&mut self) {
        let changes: Vec<(u64, String, Option<Vec<u8>>)> = self
            .log
            .iter()
            .filter(|(rev, _, _)| *rev > self.leader_seen)
            .cloned()
            .collect();
        self.leader_seen = self.rev;
        let (now, wall) = (self.now, self.wall());
        let keys = self.keys.clone();
        let Some(l) = &mut self.leader else { return };
        for (_, k, v) in changes {
            let input = match keys.parse(k.as_bytes()).unwrap() {
                Key::Host(h) => match v {
                    Some(v) => leader::Input::HostUp(h, decode(&v).unwrap()),
                    None => leader::Input::HostDown(h),
                },
                Key::Status(host, service, id) => leader::Input::Status {
                    host,
                    service,
                    id,
                    status: v.map(|v| decode(&v).unwrap()),
                },
                Key::Ack(h) => leader::Input::Ack(h, v.map(|v| decode(&v).unwrap())),
                Key::Drain(h) => leader::Input::Drain(h, v.is_some()),
                Key::Command(id) => match v {
                    Some(v) => leader::Input::Command {
                        id,
                        command: decode(&v).unwrap(),
                    },
                    None => continue,
                },
                Key::Reply(_, _) => {
                    if let Some(v) = v {
                        self.replies.push(decode(&v).unwrap());
                    }
                    continue;
                }
                _ => continue,
            };
            l.handle(now, wall, input);
        }
        self.round();
    }

    fn watch_host(&mut self, h: usize, upto: u64) {
        if !self.hosts[h].up {
            return;
        }
        let seen = self.hosts[h].seen;
        let changes: Vec<(u64, String, Option<Vec<u8>>)> = self
            .log
            .iter()
            .filter(|(rev, _, _)| *rev > seen && *rev <= upto)
            .cloned()
            .collect();
        self.hosts[h].seen = self.hosts[h].seen.max(upto);
        let me = host(h + 1);
        let mut routes_rev = None;
        for (rev, k, v) in changes {
            match self.keys.parse(k.as_bytes()).unwrap() {
                Key::Assign(to, service, id) if to == me => {
                    let assignment = v.map(|v| decode(&v).unwrap());
                    self.agent(
                        h,
                        agent::Event::Assigned {
                            service,
                            id,
                            assignment,
                        },
                    );
                }
                Key::Routes(service) => {
                    routes_rev = Some(rev);
                    let routes = v.map(|v| decode(&v).unwrap()).unwrap_or_default();
                    self.hosts[h].let_go.routes(&service, &routes, rev);
                }
                Key::Ack(from) => {
                    let ack = v.map(|v| decode(&v).unwrap());
                    self.hosts[h].let_go.ack(&from, ack);
                }
                Key::Host(name) => {
                    let up = &mut self.hosts[h].hosts_up;
                    match v {
                        Some(_) => up.insert(name),
                        None => up.remove(&name),
                    };
                }
                _ => {}
            }
        }
        // What every host has let go of stops here without the leader.
        let this = &self.hosts[h];
        let released: Vec<(ServiceName, InstanceId)> = this
            .agent
            .retiring()
            .filter(|(s, id)| this.let_go.released(&this.hosts_up, s, id.0))
            .map(|(s, id)| (s.clone(), id))
            .collect();
        for (service, id) in released {
            self.released += 1;
            self.agent(h, agent::Event::Released { service, id });
        }
        // Its proxies follow the new tables at once, with nothing in
        // flight, or (`busy`) with requests on what is routed out for a
        // while.
        if let Some(rev) = routes_rev {
            let mut ack = Ack { rev, busy: vec![] };
            if let Some((_, hold)) = self.busy.filter(|(b, _)| *b == h) {
                let routes: Routes =
                    decode(&self.kv[&self.keys.key(&Key::Routes(svc()))].0).unwrap();
                ack.busy = routes
                    .backends
                    .iter()
                    .filter(|(_, b)| !b.routed)
                    .map(|(id, _)| (svc(), *id))
                    .collect();
                if !ack.busy.is_empty() {
                    self.at(hold, Ev::Idle(h, rev));
                }
            }
            self.txn(vec![Op::Put(self.keys.key(&Key::Ack(me)), encode(&ack))]);
        }
    }

    fn agent(&mut self, h: usize, event: agent::Event) {
        let now = self.now;
        let todo = self.hosts[h].agent.handle(now, event);
        for d in todo {
            self.carry_out(h, d);
        }
    }

    fn carry_out(&mut self, h: usize, d: Do) {
        let me = host(h + 1);
        match d {
            Do::Spawn { id, slot, spec, .. } => {
                self.next_pid += 1;
                let pid = self.next_pid;
                let exec = spec.manifest.exec.clone();
                *self
                    .starts
                    .entry((slot, spec.version.to_string()))
                    .or_default() += 1;
                self.procs.insert(
                    pid,
                    Proc {
                        host: h,
                        id: id.0,
                        slot,
                        exec: exec.clone(),
                        alive: true,
                        healthy: false,
                        ever_healthy: false,
                    },
                );
                self.at(20 * MS, Ev::Started(h, id.0, pid));
                match exec.as_str() {
                    "bad" => self.at(50 * MS, Ev::Exit(h, id.0, pid, 1)),
                    "sick" => {}
                    _ => self.at(300 * MS, Ev::Healthy(h, id.0, pid)),
                }
            }
            Do::Stop { id, .. } => {
                self.stopped.insert(id.0, self.now);
                if let Some((pid, _)) = self
                    .procs
                    .iter()
                    .find(|(_, p)| p.host == h && p.id == id.0 && p.alive)
                {
                    let pid = *pid;
                    self.at(50 * MS, Ev::Exit(h, id.0, pid, 0));
                }
            }
            Do::Signal { .. } => {}
            Do::Report {
                service,
                id,
                status,
            } => {
                let key = self.keys.key(&Key::Status(me, service, id));
                let op = match status {
                    Some(s) => Op::Put(key, encode(&s)),
                    None => Op::Delete(key),
                };
                self.txn(vec![op]);
            }
        }
    }

    fn step(&mut self) -> bool {
        let next_event = self.queue.peek().map(|Reverse((t, _, _))| *t);
        let mut ticks: Vec<Instant> = self
            .hosts
            .iter()
            .filter(|h| h.up)
            .filter_map(|h| h.agent.next_deadline())
            .collect();
        ticks.extend(self.leader.as_ref().and_then(|l| l.next_deadline()));
        let next_tick = ticks.into_iter().filter(|t| *t > self.now).min();
        let t = match (next_event, next_tick) {
            (None, None) => return false,
            (Some(e), Some(d)) => e.min(d),
            (Some(e), None) => e,
            (None, Some(d)) => d,
        };
        self.now = self.now.max(t);
        if next_event == Some(t) {
            let Some(Reverse((_, _, e))) = self.queue.pop() else {
                return false;
            };
            self.deliver(e);
        } else {
            for h in 0..self.hosts.len() {
                if self.hosts[h].up {
                    self.agent(h, agent::Event::Tick);
                }
            }
            let (now, wall) = (self.now, self.wall());
            if let Some(l) = &mut self.leader {
                l.handle(now, wall, leader::Input::Tick);
            }
            self.round();
        }
        true
    }

    fn deliver(&mut self, e: Ev) {
        let svc = svc();
        match e {
            Ev::Watch(Watcher::Leader) => self.watch_leader(),
            Ev::Watch(Watcher::Host(h, upto)) => self.watch_host(h, upto),
            Ev::Started(h, id, pid) => {
                if !self.hosts[h].up || !self.procs[&pid].alive {
                    return;
                }
                let started = Started {
                    pid,
                    port: Some(20000 + pid as u16),
                    env: String::new(),
                };
                self.agent(
                    h,
                    agent::Event::Spawned {
                        service: svc,
                        id: InstanceId(id),
                        result: Ok(started),
                    },
                );
            }
            Ev::Healthy(h, id, pid) => {
                if !self.hosts[h].up || !self.procs[&pid].alive {
                    return;
                }
                let p = self.procs.get_mut(&pid).unwrap();
                p.healthy = true;
                p.ever_healthy = true;
                self.agent(
                    h,
                    agent::Event::Probe {
                        service: svc,
                        id: InstanceId(id),
                        result: Ok(()),
                        lines: vec![],
                    },
                );
            }
            Ev::Exit(h, id, pid, code) => {
                let p = self.procs.get_mut(&pid).unwrap();
                if !p.alive {
                    return;
                }
                p.alive = false;
                p.healthy = false;
                if !self.hosts[h].up {
                    return;
                }
                self.agent(
                    h,
                    agent::Event::Exited {
                        service: svc,
                        id: InstanceId(id),
                        exit: Exit::Code(code),
                        lines: vec![format!("pid {pid} says goodbye")],
                    },
                );
            }
            Ev::Idle(h, rev) => {
                let ack = Ack { rev, busy: vec![] };
                let key = self.keys.key(&Key::Ack(host(h + 1)));
                self.txn(vec![Op::Put(key, encode(&ack))]);
            }
            Ev::Expire(h) => {
                let me = host(h + 1);
                let mut ops = vec![
                    Op::Delete(self.keys.key(&Key::Host(me.clone()))),
                    Op::Delete(self.keys.key(&Key::Ack(me.clone()))),
                ];
                ops.push(Op::DeletePrefix(self.keys.dir(&format!("status/{me}"))));
                self.txn(ops);
            }
        }
    }

    /// Runs until nothing moves but probes, or panics after `limit`.
    fn settle(&mut self) {
        let limit = self.now + Duration::from_secs(600);
        while self.now < limit {
            let quiet = self.queue.is_empty()
                && self.leader.as_ref().is_some_and(|l| {
                    l.next_deadline().is_none_or(|t| t <= self.now)
                        && l.core().services().all(|(_, e)| {
                            e.machine.update_status() != UpdateStatus::Rolling
                                && e.machine.instances().iter().all(|i| {
                                    matches!(i.state(), State::Ready)
                                        || e.machine.is_stopped()
                                        || i.spec().manifest.exec != "good"
                                })
                        })
                });
            if quiet && self.queue.is_empty() {
                return;
            }
            if !self.step() {
                return;
            }
        }
        panic!("did not settle: {:#?}", self.events());
    }

    /// Steps until `k` leader transactions are done (or nothing moves).
    fn run_txns(&mut self, k: u64) {
        let until = self.rev + k;
        while self.rev < until && self.step() {}
    }

    fn snapshot(&self) -> Snapshot {
        let (v, _) = &self.kv[&self.keys.key(&Key::Service(svc()))];
        decode(v).unwrap()
    }

    fn events(&self) -> Vec<String> {
        self.kv
            .iter()
            .filter(|(k, _)| k.starts_with(&self.keys.dir("events/web")))
            .map(|(_, (v, _))| decode::<EventRecord>(v).unwrap().line)
            .collect()
    }

    /// Live processes of the service per host.
    fn per_host(&self) -> Vec<usize> {
        let mut n = vec![0; self.hosts.len()];
        for p in self.procs.values().filter(|p| p.alive) {
            n[p.host] += 1;
        }
        n
    }

    /// Live processes by slot: (exec, host).
    fn slots(&self) -> BTreeMap<u32, Vec<(String, usize)>> {
        let mut m: BTreeMap<u32, Vec<(String, usize)>> = BTreeMap::new();
        for p in self.procs.values().filter(|p| p.alive) {
            m.entry(p.slot).or_default().push((p.exec.clone(), p.host));
        }
        m
    }

    fn alive_pids(&self) -> BTreeSet<u32> {
        self.procs
            .iter()
            .filter(|(_, p)| p.alive)
            .map(|(pid, _)| *pid)
            .collect()
    }

    /// Every slot has exactly one live process of `exec`, and nothing else runs.
    fn check_converged(&self, replicas: u32, exec: &str) {
        let slots = self.slots();
        assert_eq!(slots.len(), replicas as usize, "{slots:?}");
        for (slot, procs) in &slots {
            assert_eq!(procs.len(), 1, "slot {slot} runs {procs:?}");
            assert_eq!(procs[0].0, exec, "slot {slot}");
        }
        let s = self.snapshot();
        assert_eq!(
            s.machine.update_status(),
            UpdateStatus::None,
            "{:#?}",
            self.events()
        );
        let routes: Routes = decode(&self.kv[&self.keys.key(&Key::Routes(svc()))].0).unwrap();
        assert_eq!(
            routes.backends.values().filter(|b| b.routed).count(),
            replicas as usize
        );
        assert_eq!(routes.backends.len(), replicas as usize, "{routes:?}");
        // Each host runs what is assigned to it, nothing more.
        let assigned = self
            .kv
            .keys()
            .filter(|k| k.starts_with(&self.keys.dir("assign")))
            .count();
        assert_eq!(assigned, replicas as usize);
    }

    fn lose_host(&mut self, h: usize) {
        self.hosts[h].up = false;
        for p in self.procs.values_mut().filter(|p| p.host == h) {
            p.alive = false;
            p.healthy = false;
        }
        self.at(Duration::from_secs(5), Ev::Expire(h));
    }
}

fn deployed(hosts: usize, replicas: u32, batch: u32) -> World {
    let mut w = World::new(hosts);
    w.apply(manifest("good", replicas, batch));
    w.settle();
    w.check_converged(replicas, "good");
    w
}

#[test]
fn six_replicas_on_three_hosts_are_two_on_each() {
    let w = deployed(3, 6, 1);
    assert_eq!(w.per_host(), [2, 2, 2]);
    let snap = w.snapshot();
    for i in snap.machine.instances() {
        let placed = &snap.placed[&i.id().0];
        assert_eq!(i.host(), Some(placed.as_str()));
    }
    assert!(
        w.replies.iter().all(|r| r.result.is_ok()),
        "{:?}",
        w.replies
    );
}

#[test]
fn a_rolling_update_keeps_every_slot_routed_and_stays_even() {
    for (replicas, batch) in [(6, 1), (6, 2), (5, 2), (3, 3)] {
        let mut w = deployed(3, replicas, batch);
        w.min_routed = Some(usize::MAX);
        w.apply(manifest("good ", replicas, batch).replace("good \n", "good\nenv V=2\n"));
        w.settle();
        let exec = "good";
        w.check_converged(replicas, exec);
        assert_eq!(w.min_routed, Some(replicas as usize), "{replicas} {batch}");
        let per = w.per_host();
        assert!(
            per.iter().max().unwrap() - per.iter().min().unwrap() <= 1,
            "{per:?}"
        );
        // Rounds that only move an instance's details may wait.
        assert!(w.quiet_rounds > 0);
        // Each slot started once at the new version.
        let v2: Vec<u32> = w
            .starts
            .iter()
            .filter(|((_, v), _)| *v == w.snapshot().machine.version().to_string())
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(v2, vec![1; replicas as usize]);
        // Every old instance was stopped by its host as soon as the acks
        // let go of it, not a leader's round later.
        assert_eq!(w.released, replicas, "{replicas} {batch}");
    }
}

#[test]
fn a_bad_version_fails_naming_host_and_instance_and_leaves_the_old_ones() {
    let mut w = deployed(3, 6, 1);
    let before = w.alive_pids();
    w.apply(manifest("bad", 6, 1));
    w.settle();
    let snap = w.snapshot();
    assert_eq!(snap.machine.update_status(), UpdateStatus::Failed);
    let failure = snap.machine.record().failure.unwrap();
    assert!(
        regex_like(&failure, "instance 6 on h"),
        "{failure}: {:#?}",
        w.events()
    );
    assert_eq!(w.alive_pids(), before);
}

fn regex_like(s: &str, prefix: &str) -> bool {
    s.contains(prefix)
}

#[test]
fn a_lost_host_has_its_slots_started_elsewhere_and_says_so() {
    let mut w = deployed(3, 6, 1);
    w.lose_host(2);
    w.settle();
    w.check_converged(6, "good");
    assert_eq!(w.per_host(), [3, 3, 0]);
    let events = w.events();
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("host h3 lost") && e.contains("rescheduled on h1, h2")),
        "{events:#?}"
    );
}

#[test]
fn a_host_lost_in_the_middle_of_a_rollout_does_not_stop_it() {
    let mut w = deployed(3, 6, 1);
    w.apply(manifest("good", 6, 1).replace("good\n", "good\nenv V=2\n"));
    w.run_txns(12);
    w.lose_host(1);
    w.settle();
    w.check_converged(6, "good");
    assert_eq!(w.per_host()[1], 0);
    assert_eq!(
        w.snapshot().machine.target().manifest.env,
        [("V".into(), "2".into())]
    );
}

/// A new leader at every step of a rollout takes it on: every slot at the
/// new version exactly once, nothing of the old one left, the same
/// end as without.
#[test]
fn a_new_leader_at_every_step_of_a_rollout_carries_it_on() {
    let v2 = manifest("good", 6, 2).replace("good\n", "good\nenv V=2\n");
    let steps = {
        let mut w = deployed(3, 6, 2);
        let r0 = w.rev;
        w.apply(v2.clone());
        w.settle();
        w.rev - r0
    };
    for k in 0..steps {
        let mut w = deployed(3, 6, 2);
        w.apply(v2.clone());
        w.run_txns(k);
        w.now = w.now + Duration::from_millis(700);
        w.elect();
        w.settle();
        w.check_converged(6, "good");
        let version = w.snapshot().machine.version().to_string();
        let started: u32 = w
            .starts
            .iter()
            .filter(|((_, v), _)| *v == version)
            .map(|(_, n)| *n)
            .sum();
        assert_eq!(started, 6, "step {k}: {:#?}", w.events());
    }
}

#[test]
fn pause_on_one_host_holds_the_rollout_and_resume_on_another_finishes_it() {
    let mut w = deployed(3, 6, 1);
    w.apply(manifest("good", 6, 1).replace("good\n", "good\nenv V=2\n"));
    w.run_txns(6);
    w.verb(3, Verb::Pause);
    w.settle();
    let snap = w.snapshot();
    assert_eq!(snap.machine.update_status(), UpdateStatus::Paused);
    let progress = snap.machine.progress();
    assert!(progress.0 < 6, "{progress:?}");
    // A new leader keeps it paused.
    w.elect();
    w.settle();
    assert_eq!(w.snapshot().machine.update_status(), UpdateStatus::Paused);
    assert_eq!(w.snapshot().machine.progress(), progress);
    w.verb(2, Verb::Resume);
    w.settle();
    w.check_converged(6, "good");
}

#[test]
fn a_canary_held_through_a_new_leader_is_promoted_from_another_host() {
    let mut w = deployed(3, 6, 1);
    let v2 = manifest("good", 6, 2).replace("good\n", "good\nenv V=2\nupdate_canary 1\n");
    w.apply(v2);
    w.settle();
    let snap = w.snapshot();
    assert_eq!(snap.machine.update_status(), UpdateStatus::Canary);
    assert_eq!(snap.machine.progress(), (1, 6));
    // A new leader keeps it held at its canary.
    w.elect();
    w.settle();
    assert_eq!(w.snapshot().machine.update_status(), UpdateStatus::Canary);
    w.verb(2, Verb::Promote);
    w.settle();
    w.check_converged(6, "good");
}

#[test]
fn a_drained_host_ends_with_nothing_and_undrain_then_restart_spreads_again() {
    let mut w = deployed(3, 6, 1);
    w.min_routed = Some(usize::MAX);
    let key = w.keys.key(&Key::Drain(host(2)));
    w.txn(vec![Op::Put(key.clone(), Vec::new())]);
    w.settle();
    w.check_converged(6, "good");
    assert_eq!(w.per_host(), [3, 0, 3]);
    assert_eq!(w.min_routed, Some(6));
    w.txn(vec![Op::Delete(key)]);
    w.verb(1, Verb::Restart(None));
    w.settle();
    w.check_converged(6, "good");
    assert_eq!(w.per_host(), [2, 2, 2]);
}

/// An instance routed out is stopped only once every host's proxies have
/// let go of it.
#[test]
fn a_routed_out_instance_is_stopped_once_every_host_has_let_go_of_it() {
    let mut w = deployed(3, 3, 1);
    let hold = Duration::from_millis(800);
    w.busy = Some((1, hold));
    w.apply(manifest("good", 3, 1).replace("good\n", "good\nenv V=2\n"));
    w.settle();
    w.check_converged(3, "good");
    assert_eq!(w.stopped.len(), 3);
    // Each by its own host, once the busy host's ack let go of it.
    assert_eq!(w.released, 3);
    for (id, stopped) in &w.stopped {
        let out = w.routed_out[id];
        assert!(
            stopped.since(out) >= hold,
            "instance {id}: {:?}",
            stopped.since(out)
        );
        // Not held to the drain limit (2s) either.
        assert!(stopped.since(out) < Duration::from_secs(2));
    }
}

#[test]
fn a_crashed_instance_is_restarted_by_its_host_without_a_new_instance() {
    let mut w = deployed(3, 3, 1);
    let ids: Vec<u64> = w
        .snapshot()
        .machine
        .instances()
        .iter()
        .map(|i| i.id().0)
        .collect();
    let (pid, p) = w.procs.iter().find(|(_, p)| p.alive).unwrap();
    let (pid, h, id) = (*pid, p.host, p.id);
    // Even with no leader.
    let leader = w.leader.take();
    w.at(MS, Ev::Exit(h, id, pid, 3));
    w.run_txns(3);
    while w.step() && w.alive_pids().len() < 3 {}
    assert_eq!(w.alive_pids().len(), 3);
    w.leader = leader;
    w.elect();
    w.settle();
    w.check_converged(3, "good");
    let after: Vec<u64> = w
        .snapshot()
        .machine
        .instances()
        .iter()
        .map(|i| i.id().0)
        .collect();
    assert_eq!(ids, after);
    assert!(
        w.events()
            .iter()
            .any(|e| e.contains("restarted on its host")),
        "{:#?}",
        w.events()
    );
}

#[test]
fn hosts_restricts_placement_and_none_eligible_fails_naming_why() {
    let mut w = deployed(3, 2, 1);
    w.apply(manifest("good", 2, 1).replace("good\n", "good\nhosts h3\n"));
    w.settle();
    w.check_converged(2, "good");
    assert_eq!(w.per_host(), [0, 0, 2]);
    w.apply(manifest("good", 2, 1).replace("good\n", "good\nhosts h9\n"));
    w.settle();
    let snap = w.snapshot();
    assert_eq!(snap.machine.update_status(), UpdateStatus::Failed);
    let failure = snap.machine.record().failure.unwrap();
    assert!(failure.contains("no host can run it"), "{failure}");
    assert_eq!(w.per_host(), [0, 0, 2]);
    let last = w.replies.last().unwrap().result.clone().unwrap();
    assert!(last.contains("warning: no live host is named h9"), "{last}");
}

#[test]
fn keys_parse_back_and_refuse_what_is_not_ours() {
    let k = Keys::new("deployd/");
    assert_eq!(k.prefix(), "/deployd/");
    let all = [
        Key::Host(host(1)),
        Key::Leader,
        Key::Service(svc()),
        Key::Event(svc(), 300),
        Key::Assign(host(2), svc(), InstanceId(7)),
        Key::Status(host(2), svc(), InstanceId(7)),
        Key::Routes(svc()),
        Key::Ack(host(3)),
        Key::Drain(host(3)),
        Key::Command("h1-5".into()),
        Key::Reply(host(1), "h1-5".into()),
    ];
    for key in all {
        assert_eq!(k.parse(k.key(&key).as_bytes()), Some(key));
    }
    for bad in [
        "/other/hosts/h1",
        "/deployd/hosts/../x",
        "/deployd/assign/h1/web/x",
        "/deployd/hosts/h1/extra",
        "/deployd/services/Web",
    ] {
        assert_eq!(k.parse(bad.as_bytes()), None, "{bad}");
    }
}

#[test]
fn an_instance_over_memory_high_is_replaced_through_the_leader() {
    let mut w = World::new(3);
    w.apply(format!("{}memory_high 64M\n", manifest("good", 3, 1)));
    w.settle();
    w.check_converged(3, "good");
    let (pid, slot, h, id) = w
        .procs
        .iter()
        .find(|(_, p)| p.alive)
        .map(|(pid, p)| (*pid, p.slot, p.host, p.id))
        .unwrap();
    w.min_routed = Some(usize::MAX);
    w.agent(
        h,
        agent::Event::OverMemory {
            service: svc(),
            id: InstanceId(id),
            rss: 100 << 20,
        },
    );
    w.settle();
    w.check_converged(3, "good");
    assert!(!w.procs[&pid].alive, "{:#?}", w.events());
    // Its slot runs a new instance; the others never stopped serving.
    let snap = w.snapshot();
    let now: Vec<u64> = snap
        .machine
        .instances()
        .iter()
        .filter(|i| i.slot() == slot)
        .map(|i| i.id().0)
        .collect();
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], id);
    assert_eq!(w.min_routed, Some(3));
    assert!(
        w.events().iter().any(|e| e.contains("over memory_high")),
        "{:#?}",
        w.events()
    );
}

#[test]
fn let_go_waits_for_every_host_up_to_ack_the_table_and_let_go() {
    let (s, id) = (svc(), 7);
    let backend = |routed| Backend {
        host: host(1),
        addr: "127.0.0.2:9000".parse().unwrap(),
        routed,
    };
    let table = |routed| Routes {
        backends: BTreeMap::from([(id, backend(routed))]),
    };
    let ack = |rev, busy: bool| Ack {
        rev,
        busy: if busy { vec![(svc(), id)] } else { vec![] },
    };
    let mut g = LetGo::default();
    let mut up: BTreeSet<HostName> = (1..=3).map(host).collect();
    g.routes(&s, &table(true), 10);
    assert!(!g.released(&up, &s, id), "routed in");
    g.routes(&s, &table(false), 12);
    // A later table keeps the revision it was first routed out at.
    g.routes(&s, &table(false), 15);
    g.ack(&host(1), Some(ack(12, false)));
    g.ack(&host(2), Some(ack(11, false)));
    g.ack(&host(3), Some(ack(13, true)));
    assert!(!g.released(&up, &s, id), "host 2 is behind, host 3 busy");
    g.ack(&host(2), Some(ack(12, false)));
    assert!(!g.released(&up, &s, id), "host 3 busy");
    // A host gone counts no more.
    up.remove(&host(3));
    assert!(g.released(&up, &s, id));
    up.insert(host(3));
    g.ack(&host(3), Some(ack(14, false)));
    assert!(g.released(&up, &s, id));
    // Routed in again: nothing to let go of.
    g.routes(&s, &table(true), 16);
    assert!(!g.released(&up, &s, id));
}
