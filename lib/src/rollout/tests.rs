//! The state machine against a simulated world: processes that start, get
//! healthy (or never do), crash, drain and stop on a simulated clock. Every
//! strategy × replicas 1..5 × batch size runs with a fault injected at every
//! step of a clean run, and the invariants are checked after every input.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::time::Duration;

use super::*;
use crate::manifest::{Health, Manifest, Strategy};

const MS: Duration = Duration::from_millis(1);

/// How the exhaustive tests roll out: each strategy, and rolling with
/// stop-first batches (`update_order stop-first`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Rolling,
    Replace,
    StopFirst,
}

impl From<Strategy> for Mode {
    fn from(s: Strategy) -> Mode {
        match s {
            Strategy::Rolling => Mode::Rolling,
            Strategy::Replace => Mode::Replace,
        }
    }
}

/// `Mode::Rolling == Strategy::Rolling`: the surge rolling update, which
/// keeps every instance's capacity; stop-first is neither strategy here.
impl PartialEq<Strategy> for Mode {
    fn eq(&self, s: &Strategy) -> bool {
        *self == Mode::from(*s)
    }
}

impl Mode {
    /// The routed-in instances a rollout of n in batches of b keeps.
    fn capacity(self, n: u32, b: u32) -> usize {
        match self {
            Mode::Rolling => n as usize,
            Mode::StopFirst => (n - b) as usize,
            Mode::Replace => 0,
        }
    }
}

fn spec(exec: &str, replicas: u32, batch: u32, mode: impl Into<Mode>) -> Spec {
    let mode = mode.into();
    let mut m = Manifest::new(exec);
    m.replicas = replicas;
    m.update_batch = batch;
    m.update = match mode {
        Mode::Replace => Strategy::Replace,
        _ => Strategy::Rolling,
    };
    if mode == Mode::StopFirst {
        m.update_order = crate::manifest::UpdateOrder::StopFirst;
    }
    m.port = Some(8080);
    m.health = Health::Http {
        path: "/healthz".into(),
    };
    m.health_interval = 100 * MS;
    m.health_deadline = Duration::from_secs(5);
    m.drain = Duration::from_secs(2);
    m.stop_timeout = Duration::from_secs(3);
    let text = m.canonical();
    Spec::new(m, text)
}

/// How a simulated process of a given version behaves.
#[derive(Clone, Copy, Debug)]
struct Behaviour {
    start: Duration,
    /// Healthy this long after start; `None`: never.
    healthy_after: Option<Duration>,
    /// Time from the stop signal to exit.
    stop: Duration,
    /// Time from route-out to no open request.
    drain: Duration,
}

const GOOD: Behaviour = Behaviour {
    start: Duration::from_millis(20),
    healthy_after: Some(Duration::from_millis(300)),
    stop: Duration::from_millis(50),
    drain: Duration::from_millis(150),
};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum SimEvent {
    Started(u64),
    Probe(u64),
    Exit(u64, i32),
    Drained(u64),
    /// A hook ends: passed or not.
    Hook(Hook, bool),
}

struct Proc {
    pid: u32,
    started: Option<Instant>,
    alive: bool,
    behaviour: Behaviour,
    version: Version,
}

struct Sim {
    svc: Service,
    now: Instant,
    seq: u64,
    queue: BinaryHeap<Reverse<(Instant, u64, SimEvent)>>,
    procs: HashMap<u64, Proc>,
    behaviours: HashMap<Version, Behaviour>,
    routed: HashSet<u64>,
    /// Instances routed out and not yet drained, with when.
    draining: HashMap<u64, Instant>,
    /// Instances whose last probe passed.
    passing: HashSet<u64>,
    stopped: HashSet<u64>,
    events: Vec<String>,
    /// Signals sent by `signal`, in order.
    signals: Vec<(u64, Signal)>,
    next_pid: u32,
    /// Minimum routed instances to keep at every step (capacity invariant).
    capacity: usize,
    steps: usize,
    /// The most replicas a target of the service had.
    replicas_seen: u32,
    /// The hook that fails, if one does; the hooks run, in order.
    failing_hook: Option<Hook>,
    hooks_run: Vec<Hook>,
}

/// A converged v1 of this shape, `k` acting steps into its rollout to v2;
/// with `capacity`, a rolling update must keep `n` instances routed in.
fn rollout_at_step(st: Mode, n: u32, b: u32, k: usize, capacity: bool) -> Sim {
    let mut sim = Sim::new(spec("v1", n, b, st));
    if capacity {
        sim.capacity = st.capacity(n, b);
    }
    let s0 = sim.steps;
    sim.command(Command::Apply(spec("v2", n, b, st))).unwrap();
    while sim.steps - s0 < k && sim.step() {}
    sim
}

/// Steps of a clean rollout v1 → v2 of this shape.
fn clean_steps(st: Mode, n: u32, b: u32) -> usize {
    let mut sim = Sim::new(spec("v1", n, b, st));
    let s0 = sim.steps;
    sim.command(Command::Apply(spec("v2", n, b, st))).unwrap();
    sim.settle();
    sim.steps - s0
}

impl Sim {
    /// A world around `svc`, with no process yet; `actions` are the first
    /// the machine asked for.
    fn with(now: Instant, svc: Service, actions: Vec<Action>) -> Sim {
        let mut sim = Sim {
            svc,
            now,
            seq: 0,
            queue: BinaryHeap::new(),
            procs: HashMap::new(),
            behaviours: HashMap::new(),
            routed: HashSet::new(),
            draining: HashMap::new(),
            passing: HashSet::new(),
            stopped: HashSet::new(),
            events: Vec::new(),
            signals: Vec::new(),
            next_pid: 1000,
            capacity: 0,
            steps: 0,
            replicas_seen: 0,
            failing_hook: None,
            hooks_run: Vec::new(),
        };
        sim.apply(actions);
        sim
    }

    /// A service created at `s` and run until it is converged.
    fn new(s: Spec) -> Sim {
        let (svc, actions) = Service::create(Instant::default(), s);
        let mut sim = Sim::with(Instant::default(), svc, actions);
        sim.settle();
        assert_eq!(
            sim.svc.update_status(),
            UpdateStatus::None,
            "{:#?}",
            sim.events
        );
        sim.check_converged();
        sim.events.clear();
        sim
    }

    fn at(&mut self, delay: Duration, e: SimEvent) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay, self.seq, e)));
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Hook { hook, env, .. } => {
                    assert!(env.iter().any(|(k, _)| k == "VERSION"));
                    assert!(env.iter().any(|(k, _)| k == "PREVIOUS_VERSION"));
                    self.hooks_run.push(hook);
                    let ok = self.failing_hook != Some(hook);
                    self.at(200 * MS, SimEvent::Hook(hook, ok));
                }
                Action::Start { id, spec, .. } => {
                    assert!(!self.procs.contains_key(&id.0), "instance id {id} reused");
                    let behaviour = *self.behaviours.get(&spec.version).unwrap_or(&GOOD);
                    self.next_pid += 1;
                    self.procs.insert(
                        id.0,
                        Proc {
                            pid: self.next_pid,
                            started: None,
                            alive: true,
                            behaviour,
                            version: spec.version,
                        },
                    );
                    self.at(behaviour.start, SimEvent::Started(id.0));
                }
                Action::Stop {
                    id,
                    signal,
                    timeout,
                } => {
                    let p = self.procs.get(&id.0).expect("stop of an unknown instance");
                    assert!(self.stopped.insert(id.0), "instance {id} stopped twice");
                    // Zero downtime: never stopped with traffic, nor before
                    // its drain (its requests done, or `drain` over).
                    assert!(
                        !self.routed.contains(&id.0),
                        "instance {id} stopped while routed in: {:#?}",
                        self.events
                    );
                    if let Some(out) = self.draining.remove(&id.0) {
                        let drain = self
                            .svc
                            .instances()
                            .iter()
                            .find(|i| i.id() == id)
                            .map_or(Duration::ZERO, |i| i.spec().manifest.drain);
                        assert!(
                            !p.alive || self.now >= out + drain.min(p.behaviour.drain),
                            "instance {id} stopped {:?} after its route-out, before its drain: {:#?}",
                            self.now.since(out),
                            self.events
                        );
                    }
                    if p.alive {
                        let delay = p.behaviour.stop.min(timeout);
                        self.at(delay, SimEvent::Exit(id.0, signal.number()));
                    }
                }
                Action::Signal { id, signal } => {
                    let p = self
                        .procs
                        .get(&id.0)
                        .expect("signal to an unknown instance");
                    assert!(p.alive, "signal to a dead instance {id}");
                    assert!(!self.stopped.contains(&id.0), "signal to a stopping {id}");
                    self.signals.push((id.0, signal));
                    // The naive process: the terminating signals end it.
                    if matches!(
                        signal,
                        Signal::Term | Signal::Int | Signal::Quit | Signal::Kill
                    ) {
                        let delay = p.behaviour.stop;
                        self.at(delay, SimEvent::Exit(id.0, signal.number()));
                    }
                }
                Action::RouteIn { id } => {
                    let p = &self.procs[&id.0];
                    assert!(p.alive, "route in of a dead instance {id}");
                    // Traffic only once healthy.
                    assert!(
                        self.passing.contains(&id.0),
                        "route in of {id}, whose last probe failed: {:#?}",
                        self.events
                    );
                    assert!(self.routed.insert(id.0), "instance {id} routed in twice");
                }
                Action::RouteOut { id } => {
                    assert!(
                        self.routed.remove(&id.0),
                        "route out of {id}, not routed in"
                    );
                    let drain = self.procs[&id.0].behaviour.drain;
                    self.draining.insert(id.0, self.now);
                    self.at(drain, SimEvent::Drained(id.0));
                }
                Action::Event(e) => {
                    assert!(!e.starts_with("internal:"), "{e}");
                    self.events.push(e)
                }
                // The sim's processes print nothing: the request is kept
                // in the events, where the engine puts the lines.
                Action::Output { id, prefix } => {
                    assert!(self.procs.contains_key(&id.0), "output of unknown {id}");
                    // What deployd stopped itself has nothing to explain.
                    assert!(
                        !self.stopped.contains(&id.0),
                        "output of {id}, which the machine stopped: {:#?}",
                        self.events
                    );
                    self.events.push(format!("{prefix}: (output of {id})"));
                }
            }
        }
    }

    fn feed(&mut self, input: Input) -> Result<String, Refusal> {
        let handled = self.svc.handle(self.now, input);
        self.replicas_seen = self.replicas_seen.max(self.svc.target().manifest.replicas);
        // A step is an input the machine acted on; probes that change
        // nothing are not steps.
        if !handled.actions.is_empty() {
            self.steps += 1;
        }
        self.apply(handled.actions);
        self.check_invariants();
        handled.result
    }

    /// Moves the world's clock by `d`: what is due, and when, moves with it.
    fn shift(&mut self, d: Duration) {
        self.now = self.now + d;
        self.queue = std::mem::take(&mut self.queue)
            .into_iter()
            .map(|Reverse((t, seq, e))| Reverse((t + d, seq, e)))
            .collect();
        for t in self.draining.values_mut() {
            *t = *t + d;
        }
        for p in self.procs.values_mut() {
            p.started = p.started.map(|t| t + d);
        }
    }

    fn command(&mut self, cmd: Command) -> Result<String, Refusal> {
        self.feed(Input::Command(cmd))
    }

    /// Advances to the next thing that happens; false when nothing will.
    fn step(&mut self) -> bool {
        let next_event = self.queue.peek().map(|Reverse((t, _, _))| *t);
        let next_tick = self.svc.next_deadline();
        let t = match (next_event, next_tick) {
            (None, None) => return false,
            (Some(e), Some(d)) => e.min(d),
            (Some(e), None) => e,
            (None, Some(d)) => d,
        };
        assert!(t >= self.now, "time went backwards");
        self.now = t;
        if next_event == Some(t) {
            let Some(Reverse((_, _, e))) = self.queue.pop() else {
                return false;
            };
            self.deliver(e);
        } else {
            let _ = self.feed(Input::Tick);
        }
        true
    }

    fn deliver(&mut self, e: SimEvent) {
        match e {
            SimEvent::Started(id) => {
                let Some(p) = self.procs.get_mut(&id) else {
                    return;
                };
                if !p.alive {
                    return;
                }
                p.started = Some(self.now);
                let pid = p.pid;
                let _ = self.feed(Input::Started {
                    id: InstanceId(id),
                    pid,
                });
                self.at(Duration::ZERO, SimEvent::Probe(id));
            }
            SimEvent::Probe(id) => {
                let Some(p) = self.procs.get(&id) else { return };
                if !p.alive {
                    return;
                }
                let since = p.started.map(|s| self.now.since(s)).unwrap_or_default();
                let result = match p.behaviour.healthy_after {
                    Some(after) if since >= after => Ok(()),
                    _ => Err("connection refused".to_string()),
                };
                if result.is_ok() {
                    self.passing.insert(id);
                } else {
                    self.passing.remove(&id);
                }
                let _ = self.feed(Input::Probe {
                    id: InstanceId(id),
                    result,
                });
                self.at(100 * MS, SimEvent::Probe(id));
            }
            SimEvent::Exit(id, sig) => {
                let Some(p) = self.procs.get_mut(&id) else {
                    return;
                };
                if !p.alive {
                    return;
                }
                p.alive = false;
                let exit = if sig == 0 {
                    Exit::Code(1)
                } else {
                    Exit::Signal(sig)
                };
                let _ = self.feed(Input::Exited {
                    id: InstanceId(id),
                    exit,
                });
            }
            SimEvent::Drained(id) => {
                let _ = self.feed(Input::Drained { id: InstanceId(id) });
            }
            SimEvent::Hook(hook, ok) => {
                let result = match ok {
                    true => Ok(()),
                    false => Err("exit status 1".to_string()),
                };
                let _ = self.feed(Input::Hook { hook, result });
            }
        }
    }

    /// Runs until nothing is in flight (probes go on forever, so: until the
    /// rollout is over and the instances are settled), or a limit.
    fn settle(&mut self) {
        let limit = self.now + Duration::from_secs(600);
        while self.now < limit {
            if self.svc.wait_line().is_some() && self.quiet() {
                return;
            }
            if !self.step() {
                return;
            }
        }
        panic!("did not settle: {:#?}", self.events);
    }

    /// No instance is on its way in or out.
    fn quiet(&self) -> bool {
        self.svc.instances().iter().all(|i| {
            matches!(i.state(), State::Ready | State::Exited | State::Unhealthy)
                && i.role() == Role::Serving
        }) && self.svc.slots.iter().all(|s| s.restart_at.is_none())
    }

    /// Kills a live process now, as if it crashed.
    /// The `wait` line of a rollout that must have failed.
    fn failed_line(&self) -> String {
        assert_eq!(
            self.svc.update_status(),
            UpdateStatus::Failed,
            "{:#?}",
            self.events
        );
        self.svc.wait_line().unwrap_or_default()
    }

    fn crash(&mut self, id: u64) {
        self.deliver(SimEvent::Exit(id, 0));
    }

    fn check_invariants(&self) {
        let svc = &self.svc;
        // The routing table is exactly the Ready instances.
        let ready: HashSet<u64> = svc
            .instances()
            .iter()
            .filter(|i| i.state() == State::Ready)
            .map(|i| i.id().0)
            .collect();
        assert_eq!(
            ready, self.routed,
            "routing table out of step: {:#?}",
            self.events
        );
        // Every routed instance is alive and healthy.
        for id in &self.routed {
            assert!(self.procs[id].alive);
        }
        // At most one live serving instance per slot; numbers are unique.
        let mut slots = HashSet::new();
        let mut numbers = HashSet::new();
        for i in svc.instances() {
            if i.role() == Role::Serving && i.state() != State::Exited {
                assert!(
                    slots.insert(i.slot()),
                    "two serving instances in slot {}",
                    i.slot()
                );
            }
            assert!(
                numbers.insert(i.number()),
                "number {} used twice",
                i.number()
            );
        }
        // Capacity.
        assert!(
            self.routed.len() >= self.capacity,
            "capacity fell to {} (< {}) at {:?}: {:#?}",
            self.routed.len(),
            self.capacity,
            self.now,
            self.events
        );
        // Stop-first never surges, whatever happens: a slot runs one
        // process at a time (of any role), and no more run than replicas
        // (old or new, while it changes).
        if svc.stop_first() {
            let mut live = HashSet::new();
            for i in svc.instances().iter().filter(|i| i.live()) {
                assert!(
                    live.insert(i.slot()),
                    "two instances alive in slot {} at {:?}: {:#?}",
                    i.slot(),
                    self.now,
                    self.events
                );
            }
            // Slots a failed rollout could not take out are still the
            // old version's, and a candidate started for a target with
            // more replicas is stopped once it starts: the bound is the
            // most replicas any target had.
            let max = svc
                .target()
                .manifest
                .replicas
                .max(svc.previous().map_or(0, |p| p.manifest.replicas))
                .max(self.replicas_seen);
            let alive = self.procs.values().filter(|p| p.alive).count();
            assert!(
                alive <= max as usize,
                "{alive} processes alive (> {max}) at {:?}: {:#?}",
                self.now,
                self.events
            );
        }
        // `replace` never runs two versions at once (a change of replicas
        // alone is not one).
        if svc.target().manifest.update == Strategy::Replace {
            let live: Vec<&Instance> = svc.instances().iter().filter(|i| i.live()).collect();
            for pair in live.windows(2) {
                assert!(
                    pair[0]
                        .spec()
                        .manifest
                        .same_but_replicas(&pair[1].spec().manifest),
                    "{} and {} alive at once at {:?}: {:#?}",
                    pair[0].spec().version,
                    pair[1].spec().version,
                    self.now,
                    self.events
                );
            }
        }
        // A status line for wait exists exactly when nothing is in flight
        // (a canary that `update_canary_auto` will promote is).
        let in_flight = svc
            .rollout
            .as_ref()
            .is_some_and(|r| !r.paused || r.batch.is_some())
            || svc.canary_auto_at().is_some();
        assert_eq!(svc.wait_line().is_none(), in_flight);
    }

    fn check_converged(&self) {
        let svc = &self.svc;
        let n = svc.target().manifest.replicas;
        assert_eq!(
            svc.update_status(),
            UpdateStatus::None,
            "{:#?}",
            self.events
        );
        assert_eq!(svc.progress(), (n, n), "{:#?}", self.events);
        let mut numbers: Vec<u32> = svc.instances().iter().map(|i| i.number()).collect();
        numbers.sort();
        assert_eq!(numbers, (0..n).collect::<Vec<_>>(), "{:#?}", self.events);
        for i in svc.instances() {
            assert_eq!(i.spec().version, svc.version());
            assert_eq!(i.state(), State::Ready);
            assert_eq!(i.number(), i.slot());
        }
        assert_eq!(self.routed.len(), n as usize);
        // Every process deployd no longer knows of is gone.
        let known: HashSet<u64> = svc.instances().iter().map(|i| i.id().0).collect();
        for (id, p) in &self.procs {
            assert_eq!(
                p.alive,
                known.contains(id),
                "process of instance {id}: {:#?}",
                self.events
            );
        }
    }

    /// Live serving instance ids by slot.
    fn serving(&self) -> BTreeMap<u32, (u64, Version)> {
        self.svc
            .instances()
            .iter()
            .filter(|i| i.role() == Role::Serving && i.state() != State::Exited)
            .map(|i| (i.slot(), (i.id().0, i.spec().version)))
            .collect()
    }
}

fn strategies() -> [Strategy; 2] {
    [Strategy::Rolling, Strategy::Replace]
}

/// Every (mode, replicas, batch) the exhaustive tests cover.
fn shapes() -> Vec<(Mode, u32, u32)> {
    let mut v = Vec::new();
    for st in [Mode::Rolling, Mode::Replace, Mode::StopFirst] {
        for n in 1..=5 {
            for b in 1..=n {
                v.push((st, n, b));
            }
        }
    }
    v
}

#[test]
fn create_starts_every_instance_and_converges() {
    for (st, n, b) in shapes() {
        let sim = Sim::new(spec("v1", n, b, st));
        assert_eq!(
            sim.svc.wait_line(),
            Some(format!("none {}", sim.svc.version()))
        );
    }
}

/// A clean rollout: new instances replace old a batch at a time; capacity
/// never drops (rolling), events come in order, the end is converged.
#[test]
fn clean_rollout_every_shape() {
    for (st, n, b) in shapes() {
        let mut sim = Sim::new(spec("v1", n, b, st));
        let old: Vec<u64> = sim.serving().values().map(|(id, _)| *id).collect();
        if st == Strategy::Rolling {
            sim.capacity = n as usize;
        }
        let v2 = spec("v2", n, b, st);
        let msg = sim.command(Command::Apply(v2.clone())).unwrap();
        assert!(msg.contains("started"), "{msg}");
        assert_eq!(sim.svc.update_status(), UpdateStatus::Rolling);
        assert_eq!(sim.svc.wait_line(), None);
        sim.settle();
        sim.check_converged();
        assert_eq!(sim.svc.version(), v2.version);
        assert_eq!(
            sim.svc.previous().map(|p| p.version),
            Some(spec("v1", n, b, st).version)
        );
        for id in old {
            assert!(!sim.procs[&id].alive);
        }
        // The story, in order.
        let first = &sim.events[0];
        assert!(first.contains("update started"), "{first}");
        assert!(
            sim.events.last().unwrap().contains("complete"),
            "{:#?}",
            sim.events
        );
        if st == Strategy::Rolling && n.div_ceil(b) > 1 {
            let batches = sim.events.iter().filter(|e| e.contains(" done (")).count();
            assert_eq!(batches as u32, n.div_ceil(b), "{:#?}", sim.events);
        }
    }
}

/// Rolling updates never run more than n + batch instances, and replace one
/// batch at a time: the slots at the new version grow by at most `b` per batch.
#[test]
fn rolling_surge_is_bounded_by_the_batch() {
    for (_, n, b) in shapes().into_iter().filter(|s| s.0 == Strategy::Rolling) {
        let mut sim = Sim::new(spec("v1", n, b, Strategy::Rolling));
        sim.command(Command::Apply(spec("v2", n, b, Strategy::Rolling)))
            .unwrap();
        let limit = sim.now + Duration::from_secs(120);
        while sim.now < limit && sim.step() {
            let alive = sim.procs.values().filter(|p| p.alive).count() as u32;
            assert!(alive <= n + b, "{alive} processes for n={n} b={b}");
            if sim.svc.wait_line().is_some() {
                break;
            }
        }
        sim.settle();
        sim.check_converged();
    }
}

/// A version that never gets healthy fails after health_deadline, stops its
/// instances, leaves every old instance untouched, and reports why.
#[test]
fn bad_version_fails_and_old_instances_are_untouched() {
    for (st, n, b) in shapes() {
        let mut sim = Sim::new(spec("v1", n, b, st));
        let before = sim.serving();
        let v2 = spec("bad", n, b, st);
        sim.behaviours.insert(
            v2.version,
            Behaviour {
                healthy_after: None,
                ..GOOD
            },
        );
        if st == Strategy::Rolling {
            sim.capacity = n as usize;
        }
        let t0 = sim.now;
        sim.command(Command::Apply(v2)).unwrap();
        sim.settle();
        let line = sim.failed_line();
        assert!(line.starts_with("failed: instance "), "{line}");
        assert!(
            line.contains("not healthy within health_deadline 5s (last probe: connection refused)"),
            "{line}"
        );
        // It failed at the deadline, not later.
        assert!(
            sim.now.since(t0) <= Duration::from_secs(6),
            "{:?}",
            sim.now.since(t0)
        );
        // No bad instance is left running.
        for p in sim.procs.values() {
            if p.version != before.values().next().unwrap().1 {
                assert!(!p.alive);
            }
        }
        if st == Strategy::Rolling {
            // Rolling: the first batch failed, so every old instance still runs.
            assert_eq!(sim.serving(), before);
            for (id, _) in before.values() {
                assert!(!sim.stopped.contains(id), "old instance {id} was stopped");
            }
        }
    }
}

/// Faults injected at every step of a rollout: a new instance crashes. The
/// rollout fails (or, for a crash after commit, the instance restarts); old
/// instances that were not yet replaced are untouched; capacity holds.
#[test]
fn new_instance_crash_at_every_step() {
    for (st, n, b) in shapes() {
        for k in 0..=clean_steps(st, n, b) {
            let mut sim = rollout_at_step(st, n, b, k, true);
            let v1 = spec("v1", n, b, st).version;
            // Crash the newest instance of the new version, if one runs.
            let victim = sim
                .svc
                .instances()
                .iter()
                .filter(|i| i.spec().version != v1 && i.state() != State::Exited)
                .map(|i| (i.id().0, i.role()))
                .max();
            let untouched: Vec<u64> = sim
                .svc
                .instances()
                .iter()
                .filter(|i| i.spec().version == v1 && i.role() == Role::Serving)
                .map(|i| i.id().0)
                .collect();
            let Some((id, role)) = victim else { continue };
            if role == Role::Serving {
                // A routed-in instance crashing takes its capacity with it.
                sim.capacity = sim.capacity.saturating_sub(1);
            }
            sim.crash(id);
            sim.settle();
            match role {
                Role::Candidate => {
                    assert_eq!(
                        sim.svc.update_status(),
                        UpdateStatus::Failed,
                        "k={k} {st:?} n={n} b={b}: {:#?}",
                        sim.events
                    );
                    assert!(
                        sim.svc
                            .wait_line()
                            .unwrap()
                            .contains("exited while starting")
                    );
                    if st == Strategy::Rolling {
                        for old in untouched {
                            assert!(!sim.stopped.contains(&old), "old {old} stopped, k={k}");
                        }
                    }
                    // Nothing restarts in a loop: the failed candidate stays gone.
                    assert!(!sim.procs[&id].alive);
                    assert!(
                        sim.svc
                            .instances()
                            .iter()
                            .all(|i| i.role() != Role::Candidate)
                    );
                }
                _ => {
                    // A committed instance crashed: restarted, rollout completes.
                    sim.check_converged();
                }
            }
        }
    }
}

/// An old instance crashes at every step: it is restarted (at its own
/// version) or replaced, and the rollout still converges.
#[test]
fn old_instance_crash_at_every_step_still_converges() {
    for (st, n, b) in shapes() {
        for k in 0..=clean_steps(st, n, b) {
            let mut sim = rollout_at_step(st, n, b, k, false);
            let v1 = spec("v1", n, b, st).version;
            let victim = sim
                .svc
                .instances()
                .iter()
                .filter(|i| i.spec().version == v1 && i.state() != State::Exited)
                .map(|i| i.id().0)
                .min();
            if let Some(id) = victim {
                sim.crash(id);
            }
            sim.settle();
            sim.check_converged();
        }
    }
}

/// Pause at every step: the batch in flight finishes, then nothing moves
/// until resume; resume completes the rollout. A pause during the last
/// batch has nothing to hold: the rollout completes after it, rather than
/// staying `paused` at n/n with nothing for resume to do.
#[test]
fn pause_at_every_step_holds_then_resume_completes() {
    let mut completed = 0;
    for (st, n, b) in shapes() {
        for k in 0..=clean_steps(st, n, b) {
            let mut sim = rollout_at_step(st, n, b, k, true);
            // Whether the batch in flight (if any) is the last one.
            let last = sim.svc.batch().is_some_and(|batch| {
                let more = sim.svc.todo().iter().any(|s| !batch.slots.contains(s));
                !more && batch.number == batch.total
            });
            if let Err(r) = sim.command(Command::Pause) {
                assert!(
                    sim.svc.rollout.is_none(),
                    "pause refused mid-rollout: {r:?}"
                );
                assert_eq!(r.kind, RefusalKind::Invalid);
                continue;
            }
            assert_eq!(sim.svc.update_status(), UpdateStatus::Paused);
            sim.settle();
            let line = sim.svc.wait_line().unwrap();
            if last {
                assert!(line.starts_with("none "), "{st:?} {n} {b} step {k}: {line}");
                sim.check_converged();
                completed += 1;
                continue;
            }
            assert!(
                line.starts_with("paused "),
                "{st:?} {n} {b} step {k}: {line}"
            );
            assert!(sim.svc.batch().is_none(), "held with a batch in flight");
            let held = sim.serving();
            let progress = sim.svc.progress();
            // Nothing moves while paused, however long.
            let until = sim.now + Duration::from_secs(60);
            while sim.now < until && sim.step() {}
            assert_eq!(sim.serving(), held);
            assert_eq!(sim.svc.progress(), progress);
            assert_eq!(
                sim.command(Command::Pause).unwrap_err().message,
                "already paused"
            );
            // What else would start one says what ends this one.
            let r = sim.command(Command::Restart(None)).unwrap_err();
            assert_eq!(r.kind, RefusalKind::Busy);
            assert!(
                r.message
                    .ends_with("; it is paused: resume it, or roll back"),
                "{}",
                r.message
            );
            sim.command(Command::Resume).unwrap();
            sim.settle();
            sim.check_converged();
        }
    }
    assert!(completed > 0, "no pause fell in a last batch");
}

/// Rollback at every step of a rollout goes back to v1 with the same health
/// gates: capacity never drops (rolling), and versions are swapped.
#[test]
fn rollback_at_every_step() {
    for (st, n, b) in shapes() {
        for k in 0..=clean_steps(st, n, b) {
            let mut sim = rollout_at_step(st, n, b, k, true);
            let v1 = spec("v1", n, b, st).version;
            let v2 = spec("v2", n, b, st);
            sim.command(Command::Rollback(None)).unwrap();
            sim.settle();
            sim.check_converged();
            assert_eq!(sim.svc.version(), v1);
            assert_eq!(sim.svc.previous().map(|p| p.version), Some(v2.version));
        }
    }
}

/// deployd killed at every step: the record restores the service, the rollout
/// comes back paused, and resume finishes it; one that had nothing left to
/// do (every slot committed at the target) completes as it comes back,
/// rather than waiting paused for a resume with nothing to do.
/// A machine saved at any step and taken on by another process (a new
/// cluster leader: serde, then its instants moved to the new clock's
/// epoch) carries on exactly as the one that was not handed over: the same
/// events, the same instances, the same end.
#[test]
fn handed_over_at_every_step_carries_on_as_if_nothing_happened() {
    let shift = Duration::from_secs(86_400);
    // With a pause between batches, so that one can be in flight too.
    let spec = |v: &str, n, b, st| {
        let mut s = spec(v, n, b, st);
        let mut m = (*s.manifest).clone();
        m.update_pause = Duration::from_millis(700);
        s = Spec::new(m.clone(), m.canonical());
        s
    };
    let at_step = |st, n, b, k| {
        let mut sim = Sim::new(spec("v1", n, b, st));
        let s0 = sim.steps;
        sim.command(Command::Apply(spec("v2", n, b, st))).unwrap();
        while sim.steps - s0 < k && sim.step() {}
        sim
    };
    for (st, n, b) in shapes() {
        for k in 0..=clean_steps(st, n, b) {
            let mut straight = at_step(st, n, b, k);
            let mut handed = at_step(st, n, b, k);
            let json = serde_json::to_string(&handed.svc).unwrap();
            let mut svc: Service = serde_json::from_str(&json).unwrap();
            svc.rebase(|t| t + shift);
            handed.svc = svc;
            handed.shift(shift);
            let (from_s, from_h) = (straight.events.len(), handed.events.len());
            straight.settle();
            handed.settle();
            assert_eq!(
                straight.events[from_s..],
                handed.events[from_h..],
                "{st:?} {n} {b} step {k}"
            );
            assert_eq!(straight.serving(), handed.serving());
            assert_eq!(straight.now + shift, handed.now, "{st:?} {n} {b} step {k}");
            handed.check_converged();
        }
    }
}

#[test]
fn restore_at_every_step_comes_back_paused_and_resume_finishes() {
    let mut completed = 0;
    for (st, n, b) in shapes() {
        for k in 0..=clean_steps(st, n, b) {
            let sim = rollout_at_step(st, n, b, k, false);
            let v1 = spec("v1", n, b, st);
            let v2 = spec("v2", n, b, st);
            let record = sim.svc.record();
            let was = sim.svc.update_status();
            let resolve = |v: Version| {
                [v1.clone(), v2.clone()]
                    .into_iter()
                    .find(|s| s.version == v)
            };
            // Everything the old deployd ran is gone: a new world.
            let (svc, actions) = Service::restore(sim.now, &record, resolve).unwrap();
            let mut fresh = Sim::with(sim.now, svc, actions);
            fresh.settle();
            let nothing_left = record.slots.len() == n as usize
                && record.slots.iter().all(|v| *v == Some(v2.version));
            match was {
                UpdateStatus::Rolling if nothing_left => {
                    assert_eq!(fresh.svc.update_status(), UpdateStatus::None);
                    completed += 1;
                }
                UpdateStatus::Rolling => {
                    assert_eq!(fresh.svc.update_status(), UpdateStatus::Paused);
                    assert!(
                        fresh.events[0].starts_with("deployd restarted during"),
                        "{:?}",
                        fresh.events
                    );
                    fresh.command(Command::Resume).unwrap();
                    fresh.settle();
                }
                other => assert_eq!(fresh.svc.update_status(), other),
            }
            fresh.check_converged();
            assert_eq!(fresh.svc.version(), v2.version);
        }
    }
    assert!(completed > 0, "no restore with nothing left");
}

#[test]
fn auto_rollback_returns_to_the_previous_version_and_reports_failure() {
    for (st, n, b) in shapes() {
        let mut sim = Sim::new(spec("v1", n, b, st));
        let v1 = sim.svc.version();
        let mut bad = spec("bad", n, b, st);
        let mut m = (*bad.manifest).clone();
        m.auto_rollback = true;
        bad = Spec::new(m, "auto");
        sim.behaviours.insert(
            bad.version,
            Behaviour {
                healthy_after: None,
                ..GOOD
            },
        );
        sim.command(Command::Apply(bad.clone())).unwrap();
        sim.settle();
        sim.check_converged();
        assert_eq!(sim.svc.version(), v1);
        assert_eq!(sim.svc.previous().map(|p| p.version), Some(bad.version));
        let line = sim.svc.wait_line().unwrap();
        assert!(line.starts_with("failed: instance "), "{line}");
        assert!(line.ends_with(&format!("rolled back to {v1}")), "{line}");
        assert!(
            sim.events
                .iter()
                .any(|e| e.starts_with("automatic rollback started"))
        );
        // The metrics' count: the first rollout (creation) done, the bad
        // one failed, its rollback done as such; each took some time.
        let t = sim.svc.tally();
        let counts = [Ended::Done, Ended::Failed, Ended::RolledBack].map(|e| t.ended(e));
        assert_eq!(counts, [1, 1, 1], "{st:?} {n} {b}");
        assert_eq!(t.buckets.iter().sum::<u64>(), 3);
        assert!(t.seconds > 0.0);
    }
}

#[test]
fn a_failed_automatic_rollback_does_not_trigger_another() {
    let mut sim = Sim::new(spec("v1", 3, 1, Strategy::Rolling));
    let mut m = (*spec("v2", 3, 1, Strategy::Rolling).manifest).clone();
    m.auto_rollback = true;
    let v2 = Spec::new(m, "v2");
    sim.command(Command::Apply(v2.clone())).unwrap();
    sim.settle();
    sim.check_converged();
    // Now v1 turns bad too (its processes will never get healthy), and v3 is bad.
    let v1 = sim.svc.previous().unwrap().clone();
    let mut m3 = (*v2.manifest).clone();
    m3.exec = "v3".into();
    let v3 = Spec::new(m3, "v3");
    sim.behaviours.insert(
        v1.version,
        Behaviour {
            healthy_after: None,
            ..GOOD
        },
    );
    sim.behaviours.insert(
        v3.version,
        Behaviour {
            healthy_after: None,
            ..GOOD
        },
    );
    sim.command(Command::Apply(v3)).unwrap();
    sim.settle();
    // v3 failed, rolled back to v2 (its previous) which is still good.
    sim.check_converged();
    assert_eq!(sim.svc.version(), v2.version);
    // Roll v2 → v1 manually: v1 is bad, it fails, and no automatic rollback follows.
    sim.command(Command::Rollback(Some(v1.clone()))).unwrap();
    sim.settle();
    assert_eq!(sim.svc.update_status(), UpdateStatus::Failed);
    let autos = sim
        .events
        .iter()
        .filter(|e| e.starts_with("automatic rollback started"))
        .count();
    assert_eq!(autos, 1, "{:#?}", sim.events);
}

#[test]
fn rollback_from_a_failed_rollout_and_to_a_version_in_history() {
    let mut sim = Sim::new(spec("v1", 3, 2, Strategy::Rolling));
    let v1 = sim.svc.target().clone();
    let v2 = spec("v2", 3, 2, Strategy::Rolling);
    sim.command(Command::Apply(v2.clone())).unwrap();
    sim.settle();
    let bad = spec("bad", 3, 2, Strategy::Rolling);
    sim.behaviours.insert(
        bad.version,
        Behaviour {
            healthy_after: None,
            ..GOOD
        },
    );
    sim.command(Command::Apply(bad.clone())).unwrap();
    sim.settle();
    assert_eq!(sim.svc.update_status(), UpdateStatus::Failed);
    sim.capacity = 3;
    sim.command(Command::Rollback(None)).unwrap();
    sim.settle();
    sim.check_converged();
    assert_eq!(sim.svc.version(), v2.version);
    assert_eq!(sim.svc.previous().unwrap().version, bad.version);
    // Any version from history.
    sim.command(Command::Rollback(Some(v1.clone()))).unwrap();
    sim.settle();
    sim.check_converged();
    assert_eq!(sim.svc.version(), v1.version);
    assert_eq!(sim.svc.previous().unwrap().version, v2.version);
}

#[test]
fn restart_replaces_every_process_one_batch_at_a_time() {
    for (st, n, b) in shapes() {
        let mut sim = Sim::new(spec("v1", n, b, st));
        let before: Vec<u64> = sim.serving().values().map(|(id, _)| *id).collect();
        if st == Strategy::Rolling {
            sim.capacity = n as usize;
        }
        sim.command(Command::Restart(None)).unwrap();
        sim.settle();
        sim.check_converged();
        let after: Vec<u64> = sim.serving().values().map(|(id, _)| *id).collect();
        for id in &before {
            assert!(!after.contains(id), "instance {id} was not replaced");
            assert!(!sim.procs[id].alive);
        }
        assert!(sim.svc.previous().is_none(), "restart keeps the version");
    }
}

#[test]
fn scale_only_starts_or_stops_without_replacing() {
    for (from, to) in [(1, 3), (3, 5), (5, 2), (3, 1), (2, 2)] {
        let mut sim = Sim::new(spec("v1", from, 1, Strategy::Rolling));
        let before = sim.serving();
        sim.capacity = from.min(to) as usize;
        let r = sim.command(Command::Apply(spec("v1", to, 1, Strategy::Rolling)));
        sim.settle();
        sim.check_converged();
        let after = sim.serving();
        for s in 0..from.min(to) {
            assert_eq!(
                before[&s].0, after[&s].0,
                "slot {s} was replaced, {from} -> {to}"
            );
        }
        if from == to {
            assert!(r.unwrap().starts_with("unchanged"));
        } else {
            assert!(sim.events[0].starts_with("scaling to"), "{:?}", sim.events);
        }
    }
}

#[test]
fn replicas_and_version_change_together() {
    for (from, to) in [(1, 3), (3, 5), (5, 2), (3, 1)] {
        for st in strategies() {
            let mut sim = Sim::new(spec("v1", from, 1, st));
            sim.command(Command::Apply(spec("v2", to, 1, st))).unwrap();
            sim.settle();
            sim.check_converged();
        }
    }
}

#[test]
fn refusals_change_nothing() {
    let mut sim = Sim::new(spec("v1", 3, 1, Strategy::Rolling));
    let record = sim.svc.record();
    let r = sim.command(Command::Pause).unwrap_err();
    assert_eq!(
        (r.kind, r.message.as_str()),
        (
            RefusalKind::Invalid,
            "nothing to pause: no rollout in progress"
        )
    );
    let r = sim.command(Command::Resume).unwrap_err();
    assert_eq!(r.kind, RefusalKind::Invalid);
    let r = sim.command(Command::Rollback(None)).unwrap_err();
    assert_eq!(
        (r.kind, r.message.as_str()),
        (RefusalKind::NotFound, "no previous version to roll back to")
    );
    let r = sim.command(Command::Start).unwrap_err();
    assert_eq!(r.message, "already running");
    assert_eq!(sim.svc.record(), record);

    sim.command(Command::Apply(spec("v2", 3, 1, Strategy::Rolling)))
        .unwrap();
    let during = sim.svc.record();
    let r = sim
        .command(Command::Apply(spec("v3", 3, 1, Strategy::Rolling)))
        .unwrap_err();
    assert_eq!(r.kind, RefusalKind::Busy);
    assert!(
        r.message.starts_with("a rolling update to "),
        "{}",
        r.message
    );
    let r = sim.command(Command::Restart(None)).unwrap_err();
    assert_eq!(r.kind, RefusalKind::Busy);
    assert_eq!(sim.svc.record(), during);
    // The manifest rolling out, applied again: the rollout is the answer,
    // and nothing else happens.
    let again = Input::Command(Command::Apply(spec("v2", 3, 1, Strategy::Rolling)));
    let handled = sim.svc.handle(sim.now, again);
    let r = handled.result.unwrap();
    assert!(
        r.starts_with("already in progress: a rolling update to "),
        "{r}"
    );
    assert_eq!(sim.svc.record(), during);
    assert!(
        matches!(&handled.actions[..], [Action::Event(e)] if *e == format!("apply: {r}")),
        "{:?}",
        handled.actions
    );
    // But not while paused: that is the operator's to resume.
    sim.command(Command::Pause).unwrap();
    let r = sim
        .command(Command::Apply(spec("v2", 3, 1, Strategy::Rolling)))
        .unwrap_err();
    assert!(
        r.message.ends_with("it is paused: resume it, or roll back"),
        "{}",
        r.message
    );
    sim.command(Command::Resume).unwrap();
    sim.settle();
    sim.check_converged();
}

#[test]
fn apply_unchanged_is_a_noop_and_failed_apply_can_be_retried() {
    let mut sim = Sim::new(spec("v1", 2, 1, Strategy::Rolling));
    let before = sim.serving();
    let r = sim
        .command(Command::Apply(spec("v1", 2, 1, Strategy::Rolling)))
        .unwrap();
    assert_eq!(r, format!("unchanged: already at {}", sim.svc.version()));
    assert_eq!(
        sim.svc.wait_line(),
        Some(format!("none {}", sim.svc.version()))
    );
    assert_eq!(sim.serving(), before);

    let bad = spec("flaky", 2, 1, Strategy::Rolling);
    sim.behaviours.insert(
        bad.version,
        Behaviour {
            healthy_after: None,
            ..GOOD
        },
    );
    sim.command(Command::Apply(bad.clone())).unwrap();
    sim.settle();
    assert_eq!(sim.svc.update_status(), UpdateStatus::Failed);
    // The cause is fixed; the same manifest is applied again.
    sim.behaviours.insert(bad.version, GOOD);
    let r = sim.command(Command::Apply(bad.clone())).unwrap();
    assert!(r.starts_with("retrying"), "{r}");
    sim.settle();
    sim.check_converged();
}

/// deployd short of descriptors (or memory) when it restarts an instance:
/// tried again every second, with no backoff and no restart counted,
/// however long the shortage lasts; once it is over, the slot serves.
#[test]
fn a_start_deployd_could_not_make_is_no_failure_of_the_instance() {
    let mut sim = Sim::new(spec("v1", 2, 1, Strategy::Rolling));
    let id = sim.serving()[&1].0;
    sim.crash(id);
    assert_eq!(sim.svc.restarts(1), 1);
    sim.events.clear();
    let mut shortages = 0;
    let mut starts = Vec::new();
    let until = sim.now + Duration::from_secs(10);
    while sim.now < until && sim.step() {
        // Every start of the next 5 s fails for deployd's shortage.
        let new: Vec<u64> = sim
            .procs
            .iter()
            .filter(|(_, p)| p.alive && p.started.is_none())
            .map(|(id, _)| *id)
            .collect();
        for id in new {
            starts.push(sim.now);
            if sim.now < Instant::from_epoch(Duration::from_secs(5)) {
                sim.procs.get_mut(&id).unwrap().alive = false;
                let _ = sim.feed(Input::Exited {
                    id: InstanceId(id),
                    exit: Exit::Short("deployd is short of file descriptors (EMFILE)".into()),
                });
                shortages += 1;
            }
        }
    }
    assert!(shortages >= 3, "{:#?}", sim.events);
    // A second apart, never more: no backoff.
    for pair in starts.windows(2).take(shortages) {
        assert!(
            pair[1].since(pair[0]) <= SHORT_RETRY + 10 * MS,
            "{starts:?}"
        );
    }
    assert_eq!(sim.svc.restarts(1), 1, "a shortage is no restart");
    assert!(
        sim.events.iter().any(|e| e.ends_with(
            "could not be started: deployd is short of file descriptors (EMFILE); trying again \
             in 1.0s (not counted against it)"
        )),
        "{:#?}",
        sim.events
    );
    assert!(!sim.events.iter().any(|e| e.contains(" printed: ")));
    sim.settle();
    sim.check_converged();
}

/// A rollout's new instance deployd could not start fails the rollout
/// with a reason that names deployd, not the new version.
#[test]
fn a_candidate_deployd_could_not_start_fails_the_rollout_naming_deployd() {
    let mut sim = Sim::new(spec("v1", 2, 1, Strategy::Rolling));
    let before = sim.serving();
    sim.command(Command::Apply(spec("v2", 2, 1, Strategy::Rolling)))
        .unwrap();
    let new: Vec<u64> = sim
        .procs
        .iter()
        .filter(|(_, p)| p.alive && p.started.is_none())
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(new.len(), 1);
    sim.procs.get_mut(&new[0]).unwrap().alive = false;
    let _ = sim.feed(Input::Exited {
        id: InstanceId(new[0]),
        exit: Exit::Short("deployd is short of memory".into()),
    });
    sim.settle();
    assert_eq!(
        sim.failed_line(),
        "failed: deployd could not start instance 2: deployd is short of memory"
    );
    assert_eq!(sim.serving(), before, "the old instances are untouched");
}

/// A cluster host restarts a crashed serving instance in place: the
/// machine routes it out, counts the restart, and routes it in again once
/// healthy, starting no other instance in its slot.
#[test]
fn an_instance_restarted_in_place_by_its_host_comes_back_without_a_replacement() {
    let mut sim = Sim::new(spec("v1", 2, 1, Strategy::Rolling));
    let (id, _) = sim.serving()[&1];
    let before = sim.procs.len();
    // The host restarted the process: the old one is gone, a new one runs
    // under the same instance.
    sim.routed.contains(&id).then_some(()).expect("routed in");
    let _ = sim.feed(Input::Restarted {
        id: InstanceId(id),
        exit: Exit::Code(3),
    });
    assert!(!sim.routed.contains(&id), "still routed in after its crash");
    assert_eq!(sim.svc.restarts(1), 1);
    assert!(
        sim.events
            .iter()
            .any(|e| e == "instance 1 exited unexpectedly (exit status 3); restarted on its host"),
        "{:#?}",
        sim.events
    );
    // Its new process starts and passes its probes: routed in again.
    let _ = sim.feed(Input::Started {
        id: InstanceId(id),
        pid: 4242,
    });
    sim.passing.insert(id);
    let _ = sim.feed(Input::Probe {
        id: InstanceId(id),
        result: Ok(()),
    });
    sim.settle();
    assert!(sim.routed.contains(&id));
    assert_eq!(sim.procs.len(), before, "another instance was started");
    sim.check_converged();
}

/// A candidate lost with its host (its lease expired) does not fail the
/// rollout: its slot gets a new candidate, and the rollout completes.
#[test]
fn a_candidate_lost_with_its_host_is_started_again_and_the_rollout_completes() {
    let mut sim = Sim::new(spec("v1", 3, 1, Strategy::Rolling));
    sim.command(Command::Apply(spec("v2", 3, 1, Strategy::Rolling)))
        .unwrap();
    // The batch's candidate, started, is lost.
    while sim.svc.batch().is_none_or(|b| b.candidates.is_empty()) {
        assert!(sim.step());
    }
    let cand = sim.svc.batch().unwrap().candidates[0];
    sim.procs.get_mut(&cand.0).unwrap().alive = false;
    let _ = sim.feed(Input::Exited {
        id: cand,
        exit: Exit::Lost("h3".into()),
    });
    assert_eq!(sim.svc.update_status(), UpdateStatus::Rolling);
    assert!(
        sim.events
            .iter()
            .any(|e| e.starts_with("instance 3 lost with host h3; starting instance")),
        "{:#?}",
        sim.events
    );
    sim.settle();
    sim.check_converged();
    assert_eq!(
        sim.svc.wait_line().unwrap(),
        format!("none {}", sim.svc.version())
    );
}

/// A serving instance lost with its host is started again at once,
/// whatever its restart policy, with no restart counted against it.
#[test]
fn a_serving_instance_lost_with_its_host_is_started_again_at_once() {
    let mut s = spec("v1", 2, 1, Strategy::Rolling);
    let mut m = (*s.manifest).clone();
    m.restart = crate::manifest::RestartPolicy::Never;
    s = Spec::new(m, "never");
    let mut sim = Sim::new(s);
    let (id, _) = sim.serving()[&0];
    sim.procs.get_mut(&id).unwrap().alive = false;
    let at = sim.now;
    let _ = sim.feed(Input::Exited {
        id: InstanceId(id),
        exit: Exit::Lost("h2".into()),
    });
    sim.settle();
    sim.check_converged();
    assert_eq!(sim.svc.restarts(0), 0);
    let (new, _) = sim.serving()[&0];
    assert_ne!(new, id);
    assert!(sim.procs[&new].started.unwrap().since(at) < Duration::from_millis(100));
}

#[test]
fn steady_state_crash_loop_backs_off_exponentially() {
    let mut sim = Sim::new(spec("v1", 1, 1, Strategy::Rolling));
    let v = sim.svc.version();
    // From now on every process of v1 dies at once after starting.
    sim.behaviours.insert(
        v,
        Behaviour {
            healthy_after: None,
            ..GOOD
        },
    );
    let id = sim.serving()[&0].0;
    sim.crash(id);
    let mut restarts = Vec::new();
    let until = sim.now + Duration::from_secs(120);
    while sim.now < until && sim.step() {
        // Kill every new process as soon as it starts.
        let live: Vec<u64> = sim
            .procs
            .iter()
            .filter(|(_, p)| p.alive && p.started.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in live {
            sim.crash(id);
        }
        // The last event, but for the output request after an exit.
        if let Some(e) = sim.events.iter().rev().find(|e| !e.contains(" printed: ")) {
            if e.contains("restarting in") && restarts.last() != Some(e) {
                restarts.push(e.clone());
            }
        }
    }
    let delays: Vec<&str> = restarts
        .iter()
        .map(|e| e.rsplit("restarting in ").next().unwrap())
        .collect();
    assert_eq!(
        &delays[..6],
        ["0.1s", "0.2s", "0.4s", "0.8s", "1.6s", "3.2s"],
        "{restarts:?}"
    );
    assert!(
        delays
            .iter()
            .all(|d| d.trim_end_matches('s').parse::<f64>().unwrap() <= 30.0)
    );
    // Bounded: 120s of a crash loop is about a dozen restarts, not thousands.
    assert!(restarts.len() < 20, "{}", restarts.len());
}

#[test]
fn restart_policies() {
    for (policy, code, restarted) in [
        (RestartPolicy::Always, 0, true),
        (RestartPolicy::Always, 1, true),
        (RestartPolicy::OnFailure, 0, false),
        (RestartPolicy::OnFailure, 1, true),
        (RestartPolicy::Never, 1, false),
    ] {
        let mut m = (*spec("v1", 2, 1, Strategy::Rolling).manifest).clone();
        m.restart = policy;
        let mut sim = Sim::new(Spec::new(m, "x"));
        let id = sim.serving()[&1].0;
        sim.procs.get_mut(&id).unwrap().alive = false;
        sim.feed(Input::Exited {
            id: InstanceId(id),
            exit: Exit::Code(code),
        })
        .unwrap();
        let until = sim.now + Duration::from_secs(5);
        while sim.now < until && sim.step() {}
        let slot1 = sim.serving().get(&1).map(|(id, _)| *id);
        assert_eq!(
            slot1.is_some(),
            restarted,
            "{policy:?} exit {code}: {:#?}",
            sim.events
        );
        if !restarted {
            let rec = sim.svc.instances().iter().find(|i| i.slot() == 1).unwrap();
            assert_eq!(rec.state(), State::Exited);
            assert_eq!(rec.exit(), Some(&Exit::Code(code)));
            assert_eq!(sim.svc.progress(), (1, 2));
        }
    }
}

#[test]
fn unhealthy_instance_is_routed_out_and_replaced() {
    let mut sim = Sim::new(spec("v1", 2, 1, Strategy::Rolling));
    let id = sim.serving()[&0].0;
    for _ in 0..3 {
        sim.feed(Input::Probe {
            id: InstanceId(id),
            result: Err("HTTP 500".into()),
        })
        .unwrap();
    }
    assert!(!sim.routed.contains(&id));
    let at = sim
        .events
        .iter()
        .position(|e| e.contains("unhealthy"))
        .unwrap();
    assert_eq!(
        sim.events[at],
        "instance 0 unhealthy after 3 failed probes (last probe: HTTP 500); replacing it"
    );
    // What it printed may say why.
    assert_eq!(
        sim.events[at + 1],
        format!("instance 0 printed: (output of {id})")
    );
    // Stop the simulated probes of the sick one from reviving it.
    sim.procs.get_mut(&id).unwrap().behaviour.healthy_after = None;
    sim.settle();
    sim.check_converged();
    assert!(!sim.procs[&id].alive);
}

/// The instance's last output is asked for right where its failure or
/// unexpected exit is reported, and not for what deployd stopped itself.
#[test]
fn output_is_shown_where_a_failure_or_an_unexpected_exit_is_reported() {
    let after = |events: &[String], what: &str| -> Vec<String> {
        let at = events
            .iter()
            .position(|e| e.contains(what))
            .unwrap_or_else(|| panic!("{what}: {events:#?}"));
        events[at + 1..].to_vec()
    };
    let printed = |e: &String| e.contains(" printed: ");

    // A serving instance that exits: right after its exit.
    let mut sim = Sim::new(spec("v1", 2, 1, Strategy::Rolling));
    let quiet = sim.events.len();
    assert!(!sim.events.iter().any(printed), "{:#?}", sim.events);
    let id = sim.serving()[&1].0;
    sim.crash(id);
    let next = after(&sim.events[quiet..], "instance 1 exited unexpectedly");
    assert_eq!(next[0], format!("instance 1 printed: (output of {id})"));
    sim.settle();

    // A candidate that exits while starting: between its exit and the
    // failure it causes.
    let v2 = spec("v2", 2, 1, Strategy::Rolling);
    let from = sim.events.len();
    sim.command(Command::Apply(v2)).unwrap();
    while !sim.events[from..]
        .iter()
        .any(|e| e.contains("started (pid"))
    {
        assert!(sim.step());
    }
    let cand = sim
        .procs
        .iter()
        .find(|(_, p)| p.alive && p.started.is_some() && p.version != sim.serving()[&0].1);
    let (&cand, _) = cand.expect("a started candidate");
    sim.crash(cand);
    let next = after(&sim.events[from..], "instance 2 exited (exit status 1)");
    assert_eq!(next[0], format!("instance 2 printed: (output of {cand})"));
    assert!(
        next[1].starts_with("rolling update failed: instance 2 exited while starting"),
        "{next:#?}"
    );
    sim.settle();

    // A candidate that is never healthy: what it printed, then the
    // failure, as after an exit.
    let v3 = spec("v3", 2, 1, Strategy::Rolling);
    let never = Behaviour {
        healthy_after: None,
        ..GOOD
    };
    sim.behaviours.insert(v3.version, never);
    let from = sim.events.len();
    sim.command(Command::Apply(v3)).unwrap();
    sim.settle();
    let next = after(&sim.events[from..], "instance 2 printed: ");
    assert!(
        next[0].starts_with("rolling update failed: instance 2 not healthy within"),
        "{next:#?}"
    );
    // Once: its stop, which deployd made, shows nothing more.
    let shown = sim.events[from..].iter().filter(|e| printed(e)).count();
    assert_eq!(shown, 1, "{:#?}", sim.events[from..].to_vec());

    // A rollout that succeeds stops old instances: none of them is shown.
    let v4 = spec("v4", 2, 1, Strategy::Rolling);
    let from = sim.events.len();
    sim.command(Command::Apply(v4)).unwrap();
    sim.settle();
    sim.check_converged();
    let shown: Vec<&String> = sim.events[from..].iter().filter(|e| printed(e)).collect();
    assert!(shown.is_empty(), "{:#?}", sim.events[from..].to_vec());
}

#[test]
fn grace_and_retries_decide_when_failures_count() {
    let mut m = (*spec("v1", 1, 1, Strategy::Rolling).manifest).clone();
    m.health_grace = Duration::from_secs(10);
    m.health_retries = 2;
    let mut sim = Sim::new(Spec::new(m, "g"));
    let id = InstanceId(sim.serving()[&0].0);
    // Inside the grace period failures don't count.
    for _ in 0..5 {
        sim.feed(Input::Probe {
            id,
            result: Err("x".into()),
        })
        .unwrap();
    }
    assert!(sim.routed.contains(&id.0));
    sim.now = sim.now + Duration::from_secs(11);
    sim.feed(Input::Probe {
        id,
        result: Err("x".into()),
    })
    .unwrap();
    assert!(
        sim.routed.contains(&id.0),
        "one failure is not enough with retries 2"
    );
    sim.feed(Input::Probe { id, result: Ok(()) }).unwrap();
    sim.feed(Input::Probe {
        id,
        result: Err("x".into()),
    })
    .unwrap();
    assert!(sim.routed.contains(&id.0), "a success resets the count");
    sim.feed(Input::Probe {
        id,
        result: Err("x".into()),
    })
    .unwrap();
    assert!(!sim.routed.contains(&id.0));
}

#[test]
fn min_healthy_holds_the_batch_and_flapping_resets_it() {
    let mut m = (*spec("v1", 1, 1, Strategy::Rolling).manifest).clone();
    m.min_healthy = Duration::from_secs(2);
    let mut sim = Sim::new(Spec::new(m.clone(), "a"));
    m.exec = "v2".into();
    let v2 = Spec::new(m, "b");
    sim.command(Command::Apply(v2)).unwrap();
    // Run until the candidate is healthy, then check it is not routed in early.
    while sim
        .svc
        .instances()
        .iter()
        .all(|i| !(i.role() == Role::Candidate && i.state() == State::Healthy))
    {
        assert!(sim.step());
    }
    let healthy_at = sim.now;
    while sim.svc.batch().is_some_and(|b| b.phase == Phase::Starting) {
        assert!(sim.step());
    }
    assert!(sim.now.since(healthy_at) >= Duration::from_secs(2));
    sim.settle();
    sim.check_converged();
}

/// With no probe, running is all that says an instance works: one that
/// exits within its first second (a typo in `exec`) fails the rollout
/// instead of being counted ready at its start.
#[test]
fn with_health_none_an_instance_must_run_a_second_to_be_ready() {
    let mut m = (*spec("v1", 1, 1, Strategy::Rolling).manifest).clone();
    m.health = Health::None;
    m.port = None;
    let mut sim = Sim::new(Spec::new(m.clone(), "a"));
    m.exec = "v2".into();
    sim.command(Command::Apply(Spec::new(m.clone(), "b")))
        .unwrap();
    let candidate = loop {
        let started = sim
            .svc
            .instances()
            .iter()
            .find_map(|i| (i.role() == Role::Candidate && i.pid().is_some()).then(|| i.id()));
        if let Some(id) = started {
            break id;
        }
        assert!(sim.step());
    };
    sim.at(500 * MS, SimEvent::Exit(candidate.0, 0));
    sim.settle();
    let line = sim.failed_line();
    assert!(line.contains("exited while starting"), "{line}");

    // One that keeps running is ready after that second, not before.
    m.exec = "v3".into();
    sim.events.clear();
    let t0 = sim.now;
    sim.command(Command::Apply(Spec::new(m, "c"))).unwrap();
    sim.settle();
    sim.check_converged();
    assert!(sim.now.since(t0) >= Duration::from_secs(1));
}

#[test]
fn replace_stops_all_old_before_starting_new() {
    let mut sim = Sim::new(spec("v1", 3, 1, Strategy::Replace));
    let old: Vec<u64> = sim.serving().values().map(|(id, _)| *id).collect();
    sim.command(Command::Apply(spec("v2", 3, 1, Strategy::Replace)))
        .unwrap();
    let mut first_new_start: Option<Instant> = None;
    let mut last_old_exit: Option<Instant> = None;
    while sim.svc.wait_line().is_none() && sim.step() {
        if first_new_start.is_none() && sim.procs.keys().any(|id| !old.contains(id)) {
            first_new_start = Some(sim.now);
        }
        if last_old_exit.is_none() && old.iter().all(|id| !sim.procs[id].alive) {
            last_old_exit = Some(sim.now);
        }
    }
    assert!(
        last_old_exit.unwrap() <= first_new_start.unwrap(),
        "{last_old_exit:?} {first_new_start:?} {:#?}",
        sim.events
    );
    sim.settle();
    sim.check_converged();
}

#[test]
fn stop_and_start() {
    let mut sim = Sim::new(spec("v1", 3, 1, Strategy::Rolling));
    sim.command(Command::Stop).unwrap();
    sim.settle();
    assert!(sim.procs.values().all(|p| !p.alive));
    assert!(sim.svc.instances().is_empty());
    assert!(sim.svc.record().stopped);
    assert_eq!(
        sim.command(Command::Stop).unwrap_err().message,
        "already stopped"
    );
    let r = sim
        .command(Command::Apply(spec("v2", 3, 1, Strategy::Rolling)))
        .unwrap_err();
    assert_eq!(r.kind, RefusalKind::Busy);
    sim.command(Command::Start).unwrap();
    sim.settle();
    sim.check_converged();
}

#[test]
fn stop_during_a_rollout_cancels_it() {
    let mut sim = Sim::new(spec("v1", 3, 1, Strategy::Rolling));
    sim.command(Command::Apply(spec("v2", 3, 1, Strategy::Rolling)))
        .unwrap();
    for _ in 0..5 {
        sim.step();
    }
    let before = sim.events.len();
    sim.command(Command::Stop).unwrap();
    assert!(sim.svc.wait_line().unwrap().contains("cancelled"));
    // The stop's own line first, then each instance's: the candidate, not
    // routed in yet, is stopped at once, but not said before it.
    let said = &sim.events[before..];
    let stop = said.iter().position(|e| e == "stopping 4 instances");
    let first = said.iter().position(|e| e.contains("stopping ("));
    assert!(stop.is_some() && stop < first, "{said:#?}");
    sim.settle();
    assert!(sim.procs.values().all(|p| !p.alive));
}

#[test]
fn remove_stops_everything_then_reports_removed() {
    let mut sim = Sim::new(spec("v1", 2, 1, Strategy::Rolling));
    sim.command(Command::Remove).unwrap();
    assert!(!sim.svc.is_removed());
    // Removing again waits for the same end; anything else is refused
    // until the service is gone.
    assert_eq!(
        sim.command(Command::Remove).unwrap(),
        "already being removed"
    );
    let r = sim
        .command(Command::Apply(spec("v2", 2, 1, Strategy::Rolling)))
        .unwrap_err();
    assert_eq!(r.kind, RefusalKind::Busy);
    sim.settle();
    assert!(sim.svc.is_removed());
    assert!(sim.procs.values().all(|p| !p.alive));
}

#[test]
fn numbers_are_contiguous_after_every_rollout() {
    let mut sim = Sim::new(spec("v1", 4, 3, Strategy::Rolling));
    for v in ["v2", "v3", "v4"] {
        sim.command(Command::Apply(spec(v, 4, 3, Strategy::Rolling)))
            .unwrap();
        sim.settle();
        sim.check_converged();
    }
    let renames = sim
        .events
        .iter()
        .filter(|e| e.contains(" is now instance "))
        .count();
    assert!(renames > 0);
}

/// A failed candidate slow to stop does not take its slot's number from
/// the instance that now serves the slot: a rollout started at once after
/// the failure completes while it is still stopping, and `instances/0` is
/// then the new instance, not the one on its way out.
#[test]
fn an_instance_on_its_way_out_keeps_its_number() {
    let mut sim = Sim::new(spec("v1", 1, 1, Strategy::Rolling));
    let bad = spec("bad", 1, 1, Strategy::Rolling);
    sim.behaviours.insert(
        bad.version,
        Behaviour {
            healthy_after: None,
            stop: Duration::from_millis(2500),
            ..GOOD
        },
    );
    sim.command(Command::Apply(bad.clone())).unwrap();
    while sim.svc.update_status() != UpdateStatus::Failed {
        assert!(sim.step(), "{:#?}", sim.events);
    }
    let v3 = spec("v3", 1, 1, Strategy::Rolling);
    sim.command(Command::Apply(v3.clone())).unwrap();
    while sim.svc.update_status() != UpdateStatus::None {
        assert!(sim.step(), "{:#?}", sim.events);
    }
    let shown: Vec<(u32, Version, Role)> = sim
        .svc
        .instances()
        .iter()
        .map(|i| (i.number(), i.spec().version, i.role()))
        .collect();
    assert!(
        shown
            .iter()
            .any(|(_, v, r)| *v == bad.version && *r == Role::Retiring),
        "the failed candidate is still stopping: {shown:?}"
    );
    let zero: Vec<_> = shown.iter().filter(|(n, _, _)| *n == 0).collect();
    assert_eq!(zero.len(), 1, "{shown:?}");
    assert_eq!(
        (zero[0].1, zero[0].2),
        (v3.version, Role::Serving),
        "{shown:?}"
    );
    sim.settle();
    sim.check_converged();
}

#[test]
fn drain_waits_for_requests_up_to_the_drain_limit() {
    // Requests that never finish: drain ends at the manifest's limit (2s).
    let mut sim = Sim::new(spec("v1", 1, 1, Strategy::Rolling));
    let v1 = sim.svc.version();
    let slow = Behaviour {
        drain: Duration::from_secs(3600),
        ..GOOD
    };
    for p in sim.procs.values_mut() {
        p.behaviour = slow;
    }
    sim.behaviours.insert(v1, slow);
    let old = sim.serving()[&0].0;
    sim.command(Command::Apply(spec("v2", 1, 1, Strategy::Rolling)))
        .unwrap();
    let mut routed_out_at = None;
    while sim.procs[&old].alive && sim.step() {
        if routed_out_at.is_none() && !sim.routed.contains(&old) && sim.routed.len() == 1 {
            routed_out_at = Some(sim.now);
        }
    }
    let took = sim.now.since(routed_out_at.unwrap());
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[test]
fn update_pause_waits_between_batches() {
    let mut m = (*spec("v1", 3, 1, Strategy::Rolling).manifest).clone();
    m.update_pause = Duration::from_secs(10);
    let mut sim = Sim::new(Spec::new(m.clone(), "a"));
    m.exec = "v2".into();
    let t0 = sim.now;
    sim.command(Command::Apply(Spec::new(m, "b"))).unwrap();
    sim.settle();
    sim.check_converged();
    // Two pauses between three batches.
    assert!(sim.now.since(t0) >= Duration::from_secs(20));
    assert!(sim.now.since(t0) < Duration::from_secs(25));
    assert!(sim.events.iter().any(|e| e.ends_with("; next in 10s")));
}

/// A deployment that fails while another instance's process is still
/// being started says the stop waits for it, not "stopping" before
/// "started".
#[test]
fn a_stop_before_the_start_is_heard_says_it_waits() {
    let now = Instant::default();
    let (mut svc, actions) = Service::create(now, spec("v1", 2, 1, Strategy::Rolling));
    let ids: Vec<InstanceId> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Start { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 2);
    svc.handle(
        now,
        Input::Started {
            id: ids[0],
            pid: 10,
        },
    );
    let handled = svc.handle(
        now,
        Input::Exited {
            id: ids[0],
            exit: Exit::Code(3),
        },
    );
    let events: Vec<&String> = handled
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Event(e) => Some(e),
            _ => None,
        })
        .collect();
    assert!(
        events
            .iter()
            .any(|e| *e == "instance 1 stopping (TERM) once started"),
        "{events:#?}"
    );
    let handled = svc.handle(
        now,
        Input::Started {
            id: ids[1],
            pid: 11,
        },
    );
    assert!(
        handled
            .actions
            .iter()
            .any(|a| matches!(a, Action::Event(e) if e == "instance 1 started (pid 11)")),
        "{:#?}",
        handled.actions
    );
}

#[test]
fn stale_and_unknown_inputs_are_ignored() {
    let mut sim = Sim::new(spec("v1", 2, 1, Strategy::Rolling));
    let record = sim.svc.record();
    for input in [
        Input::Started {
            id: InstanceId(999),
            pid: 1,
        },
        Input::Probe {
            id: InstanceId(999),
            result: Ok(()),
        },
        Input::Exited {
            id: InstanceId(999),
            exit: Exit::Code(0),
        },
        Input::Drained {
            id: InstanceId(999),
        },
        Input::Drained { id: InstanceId(0) },
        Input::Tick,
    ] {
        sim.feed(input).unwrap();
    }
    assert_eq!(sim.svc.record(), record);
    sim.check_converged();
}

/// deployd replaced itself (`reexec`) with every service settled: the new
/// machine takes the running instances back, starts nothing, routes them
/// in, and goes on as before (a rollout, a crash).
#[test]
fn adopt_takes_settled_instances_back_and_starts_nothing() {
    for (st, n, b) in shapes() {
        let v1 = spec("v1", n, b, st);
        let v2 = spec("v2", n, b, st);
        let old = Sim::new(v1.clone());
        let record = old.svc.record();
        let running: Vec<Running> = old
            .svc
            .instances()
            .iter()
            .map(|i| Running {
                slot: i.slot(),
                number: i.number(),
                version: i.spec().version,
                pid: i.pid().unwrap(),
            })
            .collect();
        let resolve = |v: Version| {
            [v1.clone(), v2.clone()]
                .into_iter()
                .find(|s| s.version == v)
        };
        let adopted = Service::adopt(old.now, &record, resolve, &running).unwrap();
        assert!(
            adopted.ids.iter().all(|i| i.is_some()),
            "{n}/{b}: {:?}",
            adopted.ids
        );
        assert!(
            !adopted
                .actions
                .iter()
                .any(|a| matches!(a, Action::Start { .. })),
            "{:?}",
            adopted.actions
        );
        // The world: the same processes, now under the new ids.
        let mut sim = Sim::with(old.now, adopted.service, Vec::new());
        for (r, id) in running.iter().zip(&adopted.ids) {
            sim.procs.insert(
                id.unwrap().0,
                Proc {
                    pid: r.pid,
                    started: Some(old.now),
                    alive: true,
                    behaviour: GOOD,
                    version: r.version,
                },
            );
            // Ready under the deployd before: its probes passed.
            sim.passing.insert(id.unwrap().0);
        }
        sim.apply(adopted.actions);
        sim.check_invariants();
        sim.check_converged();
        assert_eq!(sim.routed.len(), n as usize);
        assert_eq!(sim.svc.update_status(), UpdateStatus::None);

        // A crash is restarted; a rollout still replaces every instance.
        let first = adopted.ids[0].unwrap().0;
        sim.crash(first);
        sim.settle();
        sim.check_converged();
        sim.command(Command::Apply(v2.clone())).unwrap();
        sim.settle();
        sim.check_converged();
        assert_eq!(sim.svc.version(), v2.version);
    }
}

#[test]
fn adopt_leaves_what_does_not_fit_and_refuses_mid_rollout() {
    let (st, n, b) = (Strategy::Rolling, 3, 1);
    let v1 = spec("v1", n, b, st);
    let v2 = spec("v2", n, b, st);
    let old = Sim::new(v1.clone());
    let record = old.svc.record();
    let resolve = |v: Version| {
        [v1.clone(), v2.clone()]
            .into_iter()
            .find(|s| s.version == v)
    };
    let r = |slot, number, version, pid| Running {
        slot,
        number,
        version,
        pid,
    };
    let running = vec![
        r(0, 0, v1.version, 10),
        // Another version than the slot's, a slot taken twice, no such slot.
        r(1, 1, v2.version, 11),
        r(0, 5, v1.version, 12),
        r(9, 9, v1.version, 13),
    ];
    let adopted = Service::adopt(old.now, &record, resolve, &running).unwrap();
    assert_eq!(adopted.ids.iter().filter(|i| i.is_some()).count(), 1);
    assert!(adopted.ids[0].is_some());
    let starts: Vec<u32> = adopted
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Start { slot, .. } => Some(*slot),
            _ => None,
        })
        .collect();
    assert_eq!(starts, vec![1, 2], "the slots without an adopted instance");

    // With a rollout in flight nothing is adopted, and it comes back paused.
    let mid = rollout_at_step(st.into(), n, b, 2, false);
    let running: Vec<Running> = mid
        .svc
        .instances()
        .iter()
        .filter(|i| i.pid().is_some())
        .map(|i| r(i.slot(), i.number(), i.spec().version, i.pid().unwrap()))
        .collect();
    let adopted = Service::adopt(mid.now, &mid.svc.record(), resolve, &running).unwrap();
    assert!(adopted.ids.iter().all(|i| i.is_none()));
    assert_eq!(adopted.service.update_status(), UpdateStatus::Paused);
}

fn with_memory_high(replicas: u32, restart: RestartPolicy) -> Spec {
    let mut m = (*spec("v1", replicas, 1, Strategy::Rolling).manifest).clone();
    m.memory_high = Some(100 << 20);
    m.restart = restart;
    let text = m.canonical();
    Spec::new(m, text)
}

fn over(sim: &mut Sim, id: u64, rss: u64) {
    sim.feed(Input::OverMemory {
        id: InstanceId(id),
        rss,
    })
    .unwrap();
}

#[test]
fn over_memory_high_is_replaced_with_surge() {
    for replicas in [1, 3] {
        let mut sim = Sim::new(with_memory_high(replicas, RestartPolicy::Always));
        // Never fewer routed in than replicas, not even with one replica.
        sim.capacity = replicas as usize;
        let old = sim.serving()[&0].0;
        // At or under the limit: nothing.
        over(&mut sim, old, 100 << 20);
        assert!(sim.events.is_empty(), "{:#?}", sim.events);
        over(&mut sim, old, 150 << 20);
        assert_eq!(
            sim.events,
            ["instance 0 uses 150.0M of memory, over memory_high 100M; \
              replacing it (it serves until its replacement is ready)"]
        );
        assert!(
            sim.routed.contains(&old),
            "routed out before its replacement"
        );
        // Later samples while it is being replaced change nothing.
        over(&mut sim, old, 160 << 20);
        assert_eq!(sim.events.len(), 1);
        sim.settle();
        sim.check_converged();
        let new = sim.serving()[&0].0;
        assert_ne!(new, old);
        assert!(!sim.procs[&old].alive);
        assert!(
            sim.events
                .iter()
                .any(|e| e == "instance 0 routed out: replaced"),
            "{:#?}",
            sim.events
        );
    }
}

/// Under stop-first, a host has no room for an extra instance: an instance
/// over its memory_high is routed out, drained and stopped before its
/// replacement starts, one slot at a time, never more than replicas alive.
#[test]
fn over_memory_high_under_stop_first_stops_before_it_starts() {
    let mut sim = Sim::new(mem_spec("v1", 3, 1, Mode::StopFirst));
    sim.capacity = 2;
    let old = sim.serving()[&1].0;
    over(&mut sim, old, 150 << 20);
    assert_eq!(
        sim.events,
        ["instance 1 uses 150.0M of memory, over memory_high 100M; \
          replacing it (stop-first: stopping it before its replacement starts)"]
    );
    assert!(!sim.routed.contains(&old), "still routed in");
    // Another one over the limit meanwhile waits: slot 1 serves nothing.
    let other = sim.serving()[&0].0;
    over(&mut sim, other, 150 << 20);
    assert_eq!(sim.events.len(), 1, "{:#?}", sim.events);
    sim.settle();
    sim.check_converged();
    let stopped = sim
        .events
        .iter()
        .position(|e| e.starts_with("instance 1 stopped"))
        .unwrap_or_else(|| panic!("{:#?}", sim.events));
    let started = sim
        .events
        .iter()
        .position(|e| e.starts_with("instance 1 started (pid "))
        .unwrap_or_else(|| panic!("{:#?}", sim.events));
    assert!(stopped < started, "{:#?}", sim.events);
    assert_ne!(sim.serving()[&1].0, old);
    assert_eq!(sim.serving()[&0].0, other);
}

#[test]
fn over_memory_high_replaces_one_slot_at_a_time() {
    let mut sim = Sim::new(with_memory_high(3, RestartPolicy::Always));
    sim.capacity = 3;
    let ids: Vec<u64> = sim.serving().values().map(|(id, _)| *id).collect();
    for id in &ids {
        over(&mut sim, *id, 200 << 20);
    }
    let replacing = |sim: &Sim| {
        sim.events
            .iter()
            .filter(|e| e.contains("over memory_high"))
            .count()
    };
    assert_eq!(replacing(&sim), 1, "{:#?}", sim.events);
    sim.settle();
    // The next samples of the others decide, once slot 0 serves again.
    for id in &ids[1..] {
        over(&mut sim, *id, 200 << 20);
    }
    assert_eq!(replacing(&sim), 2);
    sim.settle();
    over(&mut sim, ids[2], 200 << 20);
    sim.settle();
    assert_eq!(replacing(&sim), 3);
    sim.check_converged();
    assert!(ids.iter().all(|id| !sim.procs[id].alive));
}

#[test]
fn over_memory_high_keeps_serving_while_its_replacement_fails() {
    let s = with_memory_high(1, RestartPolicy::Always);
    let v = s.version;
    let mut sim = Sim::new(s);
    sim.capacity = 1;
    let old = sim.serving()[&0].0;
    // Replacements of this version never get healthy.
    sim.behaviours.insert(
        v,
        Behaviour {
            healthy_after: None,
            ..GOOD
        },
    );
    over(&mut sim, old, 150 << 20);
    let until = sim.now + Duration::from_secs(60);
    while sim.now < until && sim.step() {}
    assert!(sim.routed.contains(&old), "{:#?}", sim.events);
    assert!(sim.procs[&old].alive);
    let retries = sim
        .events
        .iter()
        .filter(|e| e.contains("not healthy within health_deadline"))
        .count();
    assert!(retries >= 2, "{:#?}", sim.events);
}

#[test]
fn over_memory_high_is_left_to_a_rollout_or_a_stop_and_restart_never_only_stops() {
    // restart never: drained and stopped, the slot held.
    let mut sim = Sim::new(with_memory_high(2, RestartPolicy::Never));
    let id = sim.serving()[&1].0;
    over(&mut sim, id, 150 << 20);
    assert!(!sim.routed.contains(&id));
    assert!(
        sim.events[0].ends_with("stopping it, not replaced (restart never)"),
        "{:#?}",
        sim.events
    );
    let until = sim.now + Duration::from_secs(10);
    while sim.now < until && sim.step() {}
    assert!(!sim.procs[&id].alive);
    assert!(!sim.serving().contains_key(&1));
    assert_eq!(sim.svc.progress(), (1, 2));

    // A slot in a rollout's batch is the rollout's to replace.
    let mut sim = Sim::new(with_memory_high(2, RestartPolicy::Always));
    let mut m = (*with_memory_high(2, RestartPolicy::Always).manifest).clone();
    m.exec = "v2".into();
    sim.command(Command::Apply(Spec::new(m, "v2"))).unwrap();
    let id = sim.serving()[&0].0;
    sim.events.clear();
    over(&mut sim, id, 150 << 20);
    assert!(sim.events.is_empty(), "{:#?}", sim.events);
    sim.settle();
    sim.check_converged();

    // Stopped meanwhile: the old one goes too.
    let mut sim = Sim::new(with_memory_high(1, RestartPolicy::Always));
    let id = sim.serving()[&0].0;
    over(&mut sim, id, 150 << 20);
    sim.command(Command::Stop).unwrap();
    let until = sim.now + Duration::from_secs(10);
    while sim.now < until && sim.step() {}
    assert!(sim.procs.values().all(|p| !p.alive), "{:#?}", sim.events);
    assert!(sim.routed.is_empty());
}

/// `spec` with a memory_high.
fn mem_spec(exec: &str, n: u32, b: u32, st: impl Into<Mode>) -> Spec {
    let mut m = (*spec(exec, n, b, st).manifest).clone();
    m.memory_high = Some(100 << 20);
    let text = m.canonical();
    Spec::new(m, text)
}

/// Every ready serving instance reports a sample over its limit.
fn all_over(sim: &mut Sim) {
    let ids: Vec<u64> = sim
        .svc
        .instances()
        .iter()
        .filter(|i| i.state() == State::Ready && i.role() == Role::Serving)
        .map(|i| i.id().0)
        .collect();
    for id in ids {
        over(sim, id, 200 << 20);
    }
}

#[test]
fn over_memory_high_at_every_step_of_a_rollout_still_converges() {
    for (st, n, b) in shapes() {
        for k in 0..=clean_steps(st, n, b) {
            let mut sim = Sim::new(mem_spec("v1", n, b, st));
            if st == Strategy::Rolling {
                sim.capacity = n as usize;
            }
            let s0 = sim.steps;
            sim.command(Command::Apply(mem_spec("v2", n, b, st)))
                .unwrap();
            while sim.steps - s0 < k && sim.step() {}
            all_over(&mut sim);
            sim.settle();
            sim.check_converged();
        }
    }
}

#[test]
fn a_rollout_restart_or_scale_during_a_memory_replacement_converges() {
    for (st, n, b) in shapes() {
        for k in 0..8 {
            for cmd in 0..3 {
                let mut sim = Sim::new(mem_spec("v1", n, b, st));
                if st == Strategy::Rolling {
                    sim.capacity = n as usize;
                }
                all_over(&mut sim);
                // Probes go on forever: k acting steps, or until it settled.
                let (s0, until) = (sim.steps, sim.now + Duration::from_secs(30));
                while sim.steps - s0 < k && sim.now < until && sim.step() {}
                let command = match cmd {
                    0 => Command::Apply(mem_spec("v2", n, b, st)),
                    1 => Command::Restart(None),
                    _ => Command::Apply(mem_spec("v1", n + 1, b, st)),
                };
                // A memory replacement is no rollout: nothing is refused.
                sim.command(command).unwrap();
                sim.settle();
                sim.check_converged();
            }
        }
    }
}

#[test]
fn restarts_count_what_the_machine_restarted_until_a_rollout() {
    let mut sim = Sim::new(with_memory_high(2, RestartPolicy::Always));
    assert_eq!((sim.svc.restarts(0), sim.svc.restarts(1)), (0, 0));
    // A crash, an unhealthy instance, a memory replacement: three restarts.
    let id = sim.serving()[&1].0;
    sim.crash(id);
    sim.settle();
    let id = sim.serving()[&1].0;
    for _ in 0..3 {
        sim.feed(Input::Probe {
            id: InstanceId(id),
            result: Err("HTTP 500".into()),
        })
        .unwrap();
    }
    sim.procs.get_mut(&id).unwrap().behaviour.healthy_after = None;
    sim.settle();
    let id = sim.serving()[&1].0;
    over(&mut sim, id, 200 << 20);
    sim.settle();
    assert_eq!((sim.svc.restarts(0), sim.svc.restarts(1)), (0, 3));
    // Kept across a restart of deployd, in the record.
    let record = sim.svc.record();
    assert_eq!(record.restarts, [0, 3]);
    let target = sim.svc.target().clone();
    let (restored, _) = Service::restore(sim.now, &record, |v| {
        (v == target.version).then(|| target.clone())
    })
    .unwrap();
    assert_eq!(restored.restarts(1), 3);
    // A rollout starts the count again.
    let mut m = (*with_memory_high(2, RestartPolicy::Always).manifest).clone();
    m.exec = "v2".into();
    sim.command(Command::Apply(Spec::new(m, "v2"))).unwrap();
    sim.settle();
    assert_eq!((sim.svc.restarts(0), sim.svc.restarts(1)), (0, 0));
}

/// The instance number of the live serving instance with this id.
fn number_of(sim: &Sim, id: u64) -> u32 {
    let inst = sim.svc.instances().iter().find(|i| i.id().0 == id);
    inst.map(|i| i.number()).expect("a known instance")
}

#[test]
fn restart_of_one_instance_replaces_that_slot_alone() {
    for (st, n, b) in shapes() {
        for slot in 0..n {
            let mut sim = Sim::new(spec("v1", n, b, st));
            let before = sim.serving();
            let old = before[&slot].0;
            let number = number_of(&sim, old);
            if st == Strategy::Rolling {
                sim.capacity = n as usize;
            }
            let msg = sim.command(Command::Restart(Some(number))).unwrap();
            assert!(
                msg.starts_with(&format!("restart of instance {number} started")),
                "{msg}"
            );
            assert_eq!(sim.svc.progress(), (n - 1, n));
            sim.settle();
            sim.check_converged();
            let after = sim.serving();
            for (s, (id, _)) in &before {
                assert_eq!(after[s].0 == *id, *s != slot, "slot {s} of {st:?} {n}/{b}");
            }
            assert!(!sim.procs[&old].alive);
            let last = sim.events.iter().rev().find(|e| e.contains("complete"));
            assert!(
                last.is_some_and(
                    |e| e.starts_with(&format!("restart of instance {number} complete: at "))
                ),
                "{:#?}",
                sim.events
            );
            assert_eq!(
                sim.svc.wait_line(),
                Some(format!("none {}", sim.svc.version()))
            );
        }
    }
}

#[test]
fn restart_of_one_instance_is_refused_when_it_cannot_be_done() {
    let mut sim = Sim::new(spec("v1", 3, 1, Strategy::Rolling));
    let record = sim.svc.record();
    let r = sim.command(Command::Restart(Some(7))).unwrap_err();
    assert_eq!(
        (r.kind, r.message.as_str()),
        (RefusalKind::NotFound, "no instance 7 (instances: 0, 1, 2)")
    );
    assert_eq!(sim.svc.record(), record);
    // A rollout in flight.
    sim.command(Command::Apply(spec("v2", 3, 1, Strategy::Rolling)))
        .unwrap();
    let r = sim.command(Command::Restart(Some(1))).unwrap_err();
    assert_eq!(r.kind, RefusalKind::Busy);
    sim.settle();
    // A failed rollout leaves slots at the old version: restarting one of
    // them at the target would be a rollout of its own.
    let bad = spec("v3", 3, 1, Strategy::Rolling);
    sim.behaviours.insert(
        bad.version,
        Behaviour {
            healthy_after: None,
            ..GOOD
        },
    );
    sim.command(Command::Apply(bad)).unwrap();
    sim.settle();
    assert_eq!(sim.svc.update_status(), UpdateStatus::Failed);
    let record = sim.svc.record();
    let r = sim.command(Command::Restart(Some(0))).unwrap_err();
    assert_eq!(r.kind, RefusalKind::Invalid);
    assert!(
        r.message.contains("apply or roll back first"),
        "{}",
        r.message
    );
    assert_eq!(sim.svc.record(), record);
    // So is a restart of them all: it would roll the failed version out
    // again under the name of a restart.
    let all = sim.command(Command::Restart(None)).unwrap_err();
    assert_eq!((all.kind, &all.message), (r.kind, &r.message));
    assert_eq!(sim.svc.record(), record);
    // Stopped.
    sim.command(Command::Stop).unwrap();
    sim.settle();
    let r = sim.command(Command::Restart(Some(0))).unwrap_err();
    assert_eq!(r.kind, RefusalKind::Busy);
    // Failed after a first batch: the slot that is at the target is
    // refused too, or its success would hide the failure.
    let mut sim = Sim::new(spec("v1", 3, 1, Strategy::Rolling));
    let v2 = spec("v2", 3, 1, Strategy::Rolling);
    sim.command(Command::Apply(v2.clone())).unwrap();
    while sim.svc.progress().0 < 1 && sim.step() {}
    sim.behaviours.insert(
        v2.version,
        Behaviour {
            healthy_after: None,
            ..GOOD
        },
    );
    sim.settle();
    assert_eq!(sim.svc.update_status(), UpdateStatus::Failed);
    let at_target = sim
        .svc
        .instances()
        .iter()
        .find(|i| i.spec().version == v2.version && i.state() == State::Ready)
        .map(|i| i.number())
        .unwrap();
    let r = sim.command(Command::Restart(Some(at_target))).unwrap_err();
    assert_eq!(
        r.message,
        format!(
            "2 of 3 instances do not run the target {} (the last rollout did not finish); apply or roll back first",
            v2.version
        )
    );
}

#[test]
fn restart_of_one_instance_keeps_the_old_serving_when_the_new_fails() {
    let s = spec("v1", 2, 1, Strategy::Rolling);
    let v = s.version;
    let mut sim = Sim::new(s);
    sim.capacity = 2;
    let old = sim.serving()[&1].0;
    sim.behaviours.insert(
        v,
        Behaviour {
            healthy_after: None,
            ..GOOD
        },
    );
    sim.command(Command::Restart(Some(1))).unwrap();
    sim.settle();
    assert_eq!(sim.svc.update_status(), UpdateStatus::Failed);
    let line = sim.svc.wait_line().unwrap();
    assert!(
        line.starts_with("failed: instance 2 not healthy within health_deadline"),
        "{line}"
    );
    assert!(sim.routed.contains(&old) && sim.procs[&old].alive);
    assert!(
        sim.events
            .iter()
            .any(|e| e.starts_with("restart of instance 1 failed:")),
        "{:#?}",
        sim.events
    );
}

#[test]
fn restart_of_an_exited_instance_starts_it_now() {
    // Held by its policy, or waiting out its backoff: restarted at once.
    for policy in [RestartPolicy::Never, RestartPolicy::Always] {
        let mut m = (*spec("v1", 2, 1, Strategy::Rolling).manifest).clone();
        m.restart = policy;
        let mut sim = Sim::new(Spec::new(m, "x"));
        // Crash it four times in a row: then a 0.8s backoff.
        for round in 0..4 {
            while round > 0
                && policy == RestartPolicy::Always
                && sim
                    .serving()
                    .get(&1)
                    .is_none_or(|(id, _)| sim.procs[id].started.is_none())
                && sim.step()
            {}
            if let Some((id, _)) = sim.serving().get(&1).copied() {
                sim.crash(id);
            }
        }
        assert!(!sim.serving().contains_key(&1), "{:#?}", sim.events);
        let number = sim
            .svc
            .instances()
            .iter()
            .find(|i| i.slot() == 1)
            .map(|i| i.number())
            .unwrap();
        let at = sim.now;
        sim.command(Command::Restart(Some(number))).unwrap();
        assert!(
            sim.serving().contains_key(&1)
                || sim
                    .svc
                    .instances()
                    .iter()
                    .any(|i| i.slot() == 1 && i.role() == Role::Candidate),
            "{policy:?}: nothing started: {:#?}",
            sim.events
        );
        sim.settle();
        sim.check_converged();
        assert!(
            sim.now.since(at) < 700 * MS,
            "{policy:?}: {:?}",
            sim.now.since(at)
        );
        assert_eq!(sim.svc.restarts(1), 0, "a commit starts the count again");
    }
}

#[test]
fn restore_during_a_restart_of_one_instance_and_resume_finishes() {
    for st in strategies() {
        let s = spec("v1", 3, 1, st);
        let steps = {
            let mut sim = Sim::new(s.clone());
            let s0 = sim.steps;
            sim.command(Command::Restart(Some(2))).unwrap();
            sim.settle();
            sim.steps - s0
        };
        for k in 0..=steps {
            let mut sim = Sim::new(s.clone());
            let s0 = sim.steps;
            sim.command(Command::Restart(Some(2))).unwrap();
            while sim.steps - s0 < k && sim.step() {}
            let record = sim.svc.record();
            let resolve = |v: Version| Some(s.clone()).filter(|s| s.version == v);
            let (svc, actions) = Service::restore(sim.now, &record, resolve).unwrap();
            let mut fresh = Sim::with(sim.now, svc, actions);
            fresh.settle();
            if fresh.svc.update_status() == UpdateStatus::Paused {
                assert!(
                    fresh.events[0]
                        .starts_with("deployd restarted during the restart of instance 2"),
                    "{:?}",
                    fresh.events
                );
                fresh.command(Command::Resume).unwrap();
                fresh.settle();
            }
            fresh.check_converged();
        }
    }
}

#[test]
fn signal_reaches_every_running_instance_or_one() {
    let mut sim = Sim::new(spec("v1", 3, 1, Strategy::Rolling));
    let ids: Vec<u64> = sim.serving().values().map(|(id, _)| *id).collect();
    let msg = sim.command(Command::Signal(Signal::Hup, None)).unwrap();
    assert_eq!(msg, "sent HUP to instances 0, 1, 2");
    let sent: Vec<u64> = sim.signals.iter().map(|(id, _)| *id).collect();
    assert_eq!(sent, ids);
    // A signal that the process survives changes nothing else.
    sim.settle();
    assert_eq!(
        sim.serving()
            .values()
            .map(|(id, _)| *id)
            .collect::<Vec<_>>(),
        ids
    );
    sim.signals.clear();
    let msg = sim.command(Command::Signal(Signal::Usr1, Some(1))).unwrap();
    assert_eq!(msg, "sent USR1 to instance 1");
    assert_eq!(sim.signals, [(ids[1], Signal::Usr1)]);
    // One that ends it is an exit like any other: restarted by the policy.
    sim.command(Command::Signal(Signal::Kill, Some(2))).unwrap();
    let until = sim.now + Duration::from_secs(5);
    while sim.now < until && sim.step() {}
    sim.settle();
    sim.check_converged();
    assert!(!sim.procs[&ids[2]].alive);
    assert!(
        sim.events
            .iter()
            .any(|e| e.starts_with("instance 2 exited unexpectedly (killed by SIGKILL)")),
        "{:#?}",
        sim.events
    );
    assert_eq!(sim.svc.restarts(2), 1);
}

#[test]
fn signal_skips_what_is_stopping_and_refuses_what_does_not_run() {
    let mut sim = Sim::new(spec("v1", 2, 1, Strategy::Rolling));
    let record = sim.svc.record();
    let r = sim
        .command(Command::Signal(Signal::Hup, Some(5)))
        .unwrap_err();
    assert_eq!(
        (r.kind, r.message.as_str()),
        (RefusalKind::NotFound, "no instance 5")
    );
    assert_eq!(sim.svc.record(), record);
    assert!(sim.signals.is_empty());
    // During a rollout: candidates get it, instances being stopped do not.
    sim.command(Command::Apply(spec("v2", 2, 1, Strategy::Rolling)))
        .unwrap();
    let mut seen_stopping = false;
    while sim.svc.update_status() == UpdateStatus::Rolling && sim.step() {
        let stopping: Vec<u32> = sim
            .svc
            .instances()
            .iter()
            .filter(|i| i.state() == State::Stopping)
            .map(|i| i.number())
            .collect();
        if let Some(n) = stopping.first() {
            seen_stopping = true;
            let r = sim
                .command(Command::Signal(Signal::Hup, Some(*n)))
                .unwrap_err();
            assert_eq!(r.kind, RefusalKind::Invalid);
            assert_eq!(r.message, format!("instance {n} is not running (stopping)"));
        }
        sim.signals.clear();
        let _ = sim.command(Command::Signal(Signal::Usr2, None));
        for (id, _) in &sim.signals {
            let inst = sim
                .svc
                .instances()
                .iter()
                .find(|i| i.id().0 == *id)
                .unwrap();
            assert!(inst.state() != State::Stopping && inst.state() != State::Exited);
        }
    }
    assert!(seen_stopping, "{:#?}", sim.events);
    sim.settle();
    sim.check_converged();
    sim.command(Command::Stop).unwrap();
    sim.settle();
    let r = sim.command(Command::Signal(Signal::Hup, None)).unwrap_err();
    assert_eq!(r.kind, RefusalKind::Busy);
}

#[test]
fn a_waiting_service_starts_nothing_until_told_to_go() {
    let s = spec("v1", 2, 1, Strategy::Rolling);
    let (svc, actions) =
        Service::create_waiting(Instant::default(), s.clone(), names(&["db", "cache"]));
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Start { .. })),
        "{actions:?}"
    );
    let mut sim = Sim::with(Instant::default(), svc, actions);
    let until = sim.now + Duration::from_secs(60);
    while sim.now < until && sim.step() {}
    assert!(sim.procs.is_empty());
    assert_eq!(sim.svc.update_status(), UpdateStatus::Rolling);
    assert_eq!(sim.svc.waiting(), ["cache", "db"]);
    assert!(sim.svc.wait_line().is_none(), "the deployment is in flight");
    // Commands are taken meanwhile, and held too.
    sim.command(Command::Restart(None)).unwrap_err();
    sim.feed(Input::Wait(names(&["db"]))).unwrap();
    assert!(sim.procs.is_empty());
    sim.feed(Input::Wait(Vec::new())).unwrap();
    sim.settle();
    sim.check_converged();
    let waits: Vec<&String> = sim
        .events
        .iter()
        .filter(|e| e.contains("waiting"))
        .collect();
    assert_eq!(
        waits,
        [
            "waiting for cache, db to be ready before starting (after)",
            "done waiting for cache; still waiting for db",
            "done waiting for db; starting",
        ]
    );
    // Told again what it already knows: nothing is said.
    let n = sim.events.len();
    sim.feed(Input::Wait(Vec::new())).unwrap();
    assert_eq!(sim.events.len(), n);
}

#[test]
fn a_restored_service_waits_and_a_stopped_one_does_not() {
    let s = spec("v1", 3, 1, Strategy::Rolling);
    let sim = Sim::new(s.clone());
    let record = sim.svc.record();
    let resolve = |v: Version| Some(s.clone()).filter(|s| s.version == v);
    let (svc, actions) =
        Service::restore_waiting(sim.now, &record, resolve, names(&["db"])).unwrap();
    assert!(!actions.iter().any(|a| matches!(a, Action::Start { .. })));
    let mut fresh = Sim::with(sim.now, svc, actions);
    let until = fresh.now + Duration::from_secs(10);
    while fresh.now < until && fresh.step() {}
    assert!(fresh.procs.is_empty());
    assert_eq!(fresh.svc.progress(), (0, 3));
    fresh.feed(Input::Wait(Vec::new())).unwrap();
    fresh.settle();
    fresh.check_converged();
    // Stopped: nothing to wait for; a stop while waiting forgets the wait.
    let mut stopped = Sim::new(s.clone());
    stopped.command(Command::Stop).unwrap();
    stopped.settle();
    let record = stopped.svc.record();
    let (svc, _) = Service::restore_waiting(stopped.now, &record, resolve, names(&["db"])).unwrap();
    assert!(svc.waiting().is_empty());
    let (svc, actions) = Service::create_waiting(Instant::default(), s.clone(), names(&["db"]));
    let mut sim = Sim::with(Instant::default(), svc, actions);
    sim.command(Command::Stop).unwrap();
    assert!(sim.svc.waiting().is_empty());
    sim.command(Command::Start).unwrap();
    sim.settle();
    assert_eq!(sim.svc.healthy(), 3);
}

#[test]
fn stop_first_never_runs_more_than_replicas_and_keeps_the_rest_ready() {
    for (_, n, b) in shapes().into_iter().filter(|s| s.0 == Mode::StopFirst) {
        let mut sim = Sim::new(spec("v1", n, b, Mode::StopFirst));
        sim.capacity = (n - b) as usize;
        sim.command(Command::Apply(spec("v2", n, b, Mode::StopFirst)))
            .unwrap();
        let limit = sim.now + Duration::from_secs(120);
        while sim.now < limit && sim.step() {
            let alive = sim.procs.values().filter(|p| p.alive).count() as u32;
            assert!(alive <= n, "{alive} processes for n={n} b={b}");
            if sim.svc.wait_line().is_some() {
                break;
            }
        }
        sim.settle();
        sim.check_converged();
        assert!(
            sim.events[0].ends_with(&format!("batch {b}, stop first)")),
            "{:?}",
            sim.events[0]
        );
    }
}

#[test]
fn stop_first_replaces_a_slot_that_serves_nothing_first() {
    let mut sim = Sim::new(spec("v1", 3, 1, Mode::StopFirst));
    let v1 = sim.svc.version();
    // Slot 2's process dies, and v1 never gets healthy again.
    sim.behaviours.insert(
        v1,
        Behaviour {
            healthy_after: None,
            ..GOOD
        },
    );
    let id = sim.serving()[&2].0;
    sim.crash(id);
    sim.capacity = 1;
    sim.command(Command::Apply(spec("v2", 3, 1, Mode::StopFirst)))
        .unwrap();
    sim.settle();
    sim.check_converged();
    // Nothing runs in slot 2: its replacement starts at once, stopping
    // nothing, and takes its number.
    let first = sim.events.iter().find(|e| e.starts_with("batch 1/3: "));
    assert!(
        first.is_some_and(|e| e.starts_with("batch 1/3: starting instance 3 ")),
        "{:#?}",
        sim.events
    );
    let renamed = sim.events.iter().find(|e| e.contains(" is now instance "));
    assert_eq!(
        renamed.map(String::as_str),
        Some("instance 3 is now instance 2"),
        "{:#?}",
        sim.events
    );
}

#[test]
fn a_stop_first_batch_waits_for_a_missing_slot_then_fails_at_the_deadline() {
    let v1 = spec("v1", 2, 1, Mode::StopFirst);
    let mut sim = Sim::new(v1.clone());
    sim.capacity = 1;
    sim.command(Command::Apply(spec("v2", 2, 1, Mode::StopFirst)))
        .unwrap();
    // Into batch 2: instance 1 (v1) is being stopped.
    while !sim
        .events
        .iter()
        .any(|e| e.starts_with("batch 2/2: stopping"))
        && sim.step()
    {}
    // Rolled back meanwhile, to a v1 whose new processes never get healthy:
    // slot 1 never serves again, so slot 0 (v2, the one ready instance)
    // must not be taken out.
    sim.behaviours.insert(
        v1.version,
        Behaviour {
            healthy_after: None,
            ..GOOD
        },
    );
    let at = sim.now;
    sim.command(Command::Rollback(None)).unwrap();
    // Slot 1 retries for ever: a bounded run, not a settle.
    while sim.now.since(at) < Duration::from_secs(20) && sim.step() {}
    assert_eq!(sim.svc.update_status(), UpdateStatus::Failed);
    let line = sim.svc.wait_line().unwrap();
    assert!(
        line.starts_with("failed: batch 1/1 waited health_deadline 5s for the rest of the service to be ready (slot 1 has no ready instance)"),
        "{line}"
    );
    assert!(sim.now.since(at) >= Duration::from_secs(5));
    assert!(
        sim.events.iter().any(|e| e
            == "batch 1/1 waits: slot 1 has no ready instance, and stop-first takes no ready instance out meanwhile"),
        "{:#?}",
        sim.events
    );
    // The ready instance was never touched.
    assert_eq!(sim.routed.len(), 1);
}

/// `spec` with an `update_canary`.
fn canary_spec(exec: &str, n: u32, b: u32, st: Mode, canary: u32) -> Spec {
    let mut m = (*spec(exec, n, b, st).manifest).clone();
    m.update_canary = canary;
    let text = m.canonical();
    Spec::new(m, text)
}

#[test]
fn a_canary_holds_the_rollout_until_promote_resume_or_rollback() {
    for (st, n, b) in shapes()
        .into_iter()
        .filter(|s| s.0 != Mode::Replace && s.1 > 1)
    {
        for c in 1..n {
            for then in ["promote", "resume", "rollback"] {
                let mut sim = Sim::new(canary_spec("v1", n, b, st, c));
                sim.capacity = st.capacity(n, b.max(c));
                let v2 = canary_spec("v2", n, b, st, c);
                sim.command(Command::Apply(v2.clone())).unwrap();
                sim.settle();
                assert_eq!(
                    sim.svc.update_status(),
                    UpdateStatus::Canary,
                    "{st:?} n={n} b={b} c={c}: {:#?}",
                    sim.events
                );
                assert_eq!(sim.svc.progress(), (c, n));
                assert_eq!(sim.svc.wait_line(), Some(format!("canary {}", v2.version)));
                let line = format!(
                    "canary: {c} of {n} instances at {} and ready; held: promote rolls out the rest, rollback undoes it",
                    v2.version
                );
                assert!(sim.events.contains(&line), "{:#?}", sim.events);
                let total = 1 + (n - c).div_ceil(b);
                assert!(
                    sim.events[0].contains(&format!("batch {b}")),
                    "{}",
                    sim.events[0]
                );
                assert!(
                    sim.events
                        .iter()
                        .any(|e| e.starts_with(&format!("batch 1/{total} done ({c}/{n}); paused"))),
                    "{:#?}",
                    sim.events
                );
                // Held, a pause has nothing more to hold.
                assert!(sim.command(Command::Pause).is_err());
                let said = match then {
                    "promote" => sim.command(Command::Promote).unwrap(),
                    "resume" => sim.command(Command::Resume).unwrap(),
                    _ => sim.command(Command::Rollback(None)).unwrap(),
                };
                if then != "rollback" {
                    assert_eq!(said, format!("{then}d: rolling out the rest"));
                    assert_eq!(sim.svc.update_status(), UpdateStatus::Rolling);
                }
                sim.settle();
                sim.check_converged();
                let want = if then == "rollback" { "v1" } else { "v2" };
                assert_eq!(sim.svc.version(), canary_spec(want, n, b, st, c).version);
                // Only the first batch of a new version is a canary.
                let pauses = sim
                    .events
                    .iter()
                    .filter(|e| e.starts_with("canary:"))
                    .count();
                assert_eq!(pauses, 1, "{:#?}", sim.events);
            }
        }
    }
}

/// `spec` with `update_canary 1` and `update_canary_auto 10s`.
fn auto_canary_spec(exec: &str) -> Spec {
    let mut m = (*spec(exec, 3, 1, Mode::Rolling).manifest).clone();
    m.update_canary = 1;
    m.update_canary_auto = Duration::from_secs(10);
    let text = m.canonical();
    Spec::new(m, text)
}

/// Steps until the rollout is held at its canary; the instant it was.
fn until_canary(sim: &mut Sim) -> Instant {
    while sim.svc.update_status() != UpdateStatus::Canary {
        assert!(sim.step(), "never held at a canary: {:#?}", sim.events);
    }
    sim.now
}

#[test]
fn update_canary_auto_promotes_a_canary_that_stayed_ready() {
    let mut sim = Sim::new(auto_canary_spec("v1"));
    sim.command(Command::Apply(auto_canary_spec("v2"))).unwrap();
    let held = until_canary(&mut sim);
    // `wait` follows the window: it does not answer at the canary.
    assert_eq!(sim.svc.wait_line(), None);
    while sim.svc.update_status() == UpdateStatus::Canary {
        assert!(sim.step());
    }
    assert_eq!(sim.now.since(held), Duration::from_secs(10));
    assert!(
        sim.events
            .iter()
            .any(|e| e == "canary ready for 10s with no restart: promoted; rolling out the rest"),
        "{:#?}",
        sim.events
    );
    sim.settle();
    sim.check_converged();
    assert_eq!(sim.svc.version(), auto_canary_spec("v2").version);
}

#[test]
fn update_canary_auto_holds_a_canary_that_restarted_until_promote() {
    let mut sim = Sim::new(auto_canary_spec("v1"));
    let v2 = auto_canary_spec("v2");
    sim.command(Command::Apply(v2.clone())).unwrap();
    until_canary(&mut sim);
    let canary = sim
        .svc
        .instances()
        .iter()
        .find(|i| i.spec().version == v2.version && i.role() == Role::Serving)
        .map(|i| i.id().0)
        .unwrap();
    sim.crash(canary);
    sim.settle();
    // Held still, and `wait` answers: nothing will promote it by itself.
    assert_eq!(sim.svc.update_status(), UpdateStatus::Canary);
    assert_eq!(sim.svc.wait_line(), Some(format!("canary {}", v2.version)));
    assert!(
        sim.events.iter().any(|e| e
            .starts_with("canary not promoted by itself after 10s: the canary in slot ")
            && e.ends_with(" restarted; promote or rollback")),
        "{:#?}",
        sim.events
    );
    sim.command(Command::Promote).unwrap();
    sim.settle();
    sim.check_converged();
    assert_eq!(sim.svc.version(), v2.version);
}

#[test]
fn promote_is_refused_where_no_canary_holds() {
    let mut sim = Sim::new(spec("v1", 3, 1, Mode::Rolling));
    let no = sim.command(Command::Promote).unwrap_err();
    assert!(no.message.contains("no rollout in progress"), "{no:?}");
    sim.command(Command::Apply(spec("v2", 3, 1, Mode::Rolling)))
        .unwrap();
    sim.command(Command::Pause).unwrap();
    let no = sim.command(Command::Promote).unwrap_err();
    assert!(no.message.contains("resume goes on with it"), "{no:?}");
    sim.command(Command::Resume).unwrap();
    sim.settle();
    sim.check_converged();
}

#[test]
fn a_restart_or_a_scale_has_no_canary() {
    let mut sim = Sim::new(canary_spec("v1", 3, 1, Mode::Rolling, 1));
    sim.command(Command::Restart(None)).unwrap();
    sim.settle();
    sim.check_converged();
    sim.command(Command::Apply(canary_spec("v1", 4, 1, Mode::Rolling, 1)))
        .unwrap();
    sim.settle();
    sim.check_converged();
    assert!(
        !sim.events.iter().any(|e| e.starts_with("canary:")),
        "{:#?}",
        sim.events
    );
}

/// Service names, for `after`.
fn names(v: &[&str]) -> Vec<crate::name::ServiceName> {
    v.iter()
        .map(|s| crate::name::ServiceName::new(s).unwrap())
        .collect()
}

/// One thing that happens to a service in [`any_story_keeps_the_invariants`].
#[derive(Debug, Clone)]
enum Turn {
    /// The world goes on for this many acting steps.
    Steps(u8),
    /// The process of the live instance with this index (modulo) crashes.
    Crash(u8),
    /// `apply` of version `v{0}` with this many replicas; `bad`: it never
    /// gets healthy; `auto`: with `auto_rollback on`.
    Apply {
        v: u8,
        replicas: u32,
        bad: bool,
        auto: bool,
    },
    Command(Command),
    /// deployd killed and started again: its processes are gone with it,
    /// the record is all that is left.
    Restore,
}

fn turn() -> impl proptest::strategy::Strategy<Value = Turn> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (1u8..25).prop_map(Turn::Steps),
        2 => any::<u8>().prop_map(Turn::Crash),
        3 => (0u8..4, 1u32..=4, any::<bool>(), any::<bool>())
            .prop_map(|(v, replicas, bad, auto)| Turn::Apply { v, replicas, bad, auto }),
        1 => Just(Turn::Command(Command::Pause)),
        1 => Just(Turn::Command(Command::Resume)),
        1 => Just(Turn::Command(Command::Rollback(None))),
        1 => (0u32..5).prop_map(|n| Turn::Command(Command::Restart(Some(n)))),
        1 => Just(Turn::Command(Command::Signal(Signal::Hup, None))),
        1 => Just(Turn::Restore),
    ]
}

/// Any story of commands, crashes, bad versions and restarts of deployd
/// keeps every invariant at every input (`check_invariants`: the routing
/// table is the ready instances, nothing stopped while routed in or before
/// its drain, stop-first never surges, `replace` never runs two versions),
/// and once it is over, an `apply` of a good version converges on it with
/// no process left behind. The exhaustive tests inject one fault into a
/// clean run; this one mixes them.
#[test]
fn any_story_keeps_the_invariants() {
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let story = (
        0usize..3,
        1u32..=4,
        1u32..=4,
        proptest::collection::vec(turn(), 1..40),
    );
    // One fixed sequence of stories, so that a run fails only on a change.
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 512,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let result = runner.run(&story, |(mode, n, b, turns)| {
        let mode = [Mode::Rolling, Mode::Replace, Mode::StopFirst][mode];
        tell(mode, n, b, turns)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Tells one story of [`any_story_keeps_the_invariants`].
fn tell(
    mode: Mode,
    n: u32,
    b: u32,
    turns: Vec<Turn>,
) -> Result<(), proptest::test_runner::TestCaseError> {
    use proptest::prelude::*;
    let shape = |exec: &str, n: u32| spec(exec, n, b.min(n), mode);
    let mut sim = Sim::new(shape("v0", n));
    let mut known: HashMap<Version, Spec> = HashMap::new();
    let first = sim.svc.target().clone();
    known.insert(first.version, first);
    for t in turns {
        match t {
            Turn::Steps(k) => {
                // Probes that change nothing are not steps: a settled
                // service takes none, so the clock bounds the turn too.
                let (s0, until) = (sim.steps, sim.now + Duration::from_secs(20));
                while sim.steps - s0 < usize::from(k) && sim.now < until && sim.step() {}
            }
            Turn::Crash(i) => {
                let mut live: Vec<u64> = sim
                    .procs
                    .iter()
                    .filter(|(_, p)| p.alive && p.started.is_some())
                    .map(|(id, _)| *id)
                    .collect();
                live.sort();
                if !live.is_empty() {
                    sim.crash(live[usize::from(i) % live.len()]);
                }
            }
            Turn::Apply {
                v,
                replicas,
                bad,
                auto,
            } => {
                let name = if bad {
                    format!("bad{v}")
                } else {
                    format!("v{v}")
                };
                let mut m = (*shape(&name, replicas).manifest).clone();
                m.auto_rollback = auto;
                let text = m.canonical();
                let s = Spec::new(m, text);
                if bad {
                    sim.behaviours.insert(
                        s.version,
                        Behaviour {
                            healthy_after: None,
                            ..GOOD
                        },
                    );
                }
                known.insert(s.version, s.clone());
                let _ = sim.command(Command::Apply(s));
            }
            Turn::Command(c) => {
                let _ = sim.command(c);
            }
            Turn::Restore => {
                let record = sim.svc.record();
                let resolve = |v: Version| known.get(&v).cloned();
                let (svc, actions) =
                    Service::restore(sim.now, &record, resolve).expect("a record restores");
                let behaviours = std::mem::take(&mut sim.behaviours);
                let mut fresh = Sim::with(sim.now, svc, Vec::new());
                fresh.behaviours = behaviours;
                fresh.replicas_seen = sim.replicas_seen;
                fresh.apply(actions);
                sim = fresh;
            }
        }
    }
    // The story is over: whatever it left, start, resume, and a good
    // version applied once nothing moves converges.
    let _ = sim.command(Command::Start);
    let _ = sim.command(Command::Resume);
    sim.settle();
    let good = shape("good", n);
    sim.command(Command::Apply(good.clone()))
        .map_err(|r| TestCaseError::fail(format!("{r:?}: {:#?}", sim.events)))?;
    sim.settle();
    sim.check_converged();
    prop_assert_eq!(sim.svc.version(), good.version);
    Ok(())
}

/// Stories [`any_story_keeps_the_invariants`] found, each a bug fixed.
#[test]
fn stories_that_broke_an_invariant() {
    let bad = |v, replicas| Turn::Apply {
        v,
        replicas,
        bad: true,
        auto: false,
    };
    let good = |v, replicas, auto| Turn::Apply {
        v,
        replicas,
        bad: false,
        auto,
    };
    let rollback = || Turn::Command(Command::Rollback(None));
    // An old instance beyond the new replicas crashed; the rollout that
    // was to take it out failed: it is restarted, as the old version ran.
    tell(Mode::Rolling, 2, 1, vec![Turn::Crash(13), bad(0, 1)]).unwrap();
    tell(
        Mode::Rolling,
        2,
        1,
        vec![bad(0, 1), rollback(), Turn::Crash(35), rollback()],
    )
    .unwrap();
    // A scaling of `replace` waits for the stopping candidate of another
    // version that a rollback left.
    tell(
        Mode::Replace,
        1,
        1,
        vec![
            good(3, 1, false),
            Turn::Steps(4),
            rollback(),
            Turn::Crash(0),
            Turn::Crash(0),
            rollback(),
            good(3, 2, false),
        ],
    )
    .unwrap();
    // deployd restarted with slots of two versions: `replace` starts one.
    tell(
        Mode::Replace,
        2,
        1,
        vec![
            good(0, 1, true),
            Turn::Command(Command::Pause),
            Turn::Steps(6),
            rollback(),
            Turn::Restore,
        ],
    )
    .unwrap();
}

/// An event line as a plan compares it: an instance's own news left out
/// (as the plan leaves it out), durations (the real ones are longer).
fn plan_step(line: &str) -> Option<String> {
    if !super::is_step(line) {
        return None;
    }
    Some(match line.rfind(" (") {
        Some(at) if line.ends_with("s)") && line[at + 2..line.len() - 2].parse::<f64>().is_ok() => {
            line[..at].to_string()
        }
        _ => line.to_string(),
    })
}

#[test]
fn a_plan_is_what_the_command_then_does() {
    for (st, n, b) in shapes() {
        let with_pause = |exec: &str, replicas: u32| {
            let mut m = (*spec(exec, replicas, b, st).manifest).clone();
            m.update_pause = Duration::from_secs(2);
            let text = m.canonical();
            Spec::new(m, text)
        };
        for (what, command) in [
            ("apply", Command::Apply(with_pause("v2", n))),
            ("scale", Command::Apply(with_pause("v1", n + 1))),
            ("restart", Command::Restart(None)),
            ("same", Command::Apply(with_pause("v1", n))),
        ] {
            let mut sim = Sim::new(with_pause("v1", n));
            sim.capacity = st.capacity(n, b);
            sim.settle();
            let planned = super::plan(&sim.svc, sim.now, command.clone()).unwrap();
            let from = sim.events.len();
            let t0 = sim.now;
            sim.command(command).unwrap();
            sim.settle();
            let done: Vec<String> = sim.events[from..]
                .iter()
                .filter_map(|l| plan_step(l))
                .collect();
            let plan: Vec<String> = planned.steps.iter().filter_map(|l| plan_step(l)).collect();
            assert_eq!(plan, done, "{st:?} n={n} b={b} {what}");
            // The least it takes is no more than it took.
            assert!(
                planned.least <= sim.now.since(t0),
                "{st:?} n={n} b={b} {what}"
            );
            let kind = match what {
                "apply" => match st {
                    Mode::Replace => "replace",
                    _ => "rolling",
                },
                "scale" => "scale-only",
                "restart" => "restart",
                _ => "no-op",
            };
            assert_eq!(planned.kind, kind, "{st:?} n={n} b={b} {what}");
            if what != "same" {
                assert_eq!(Some(planned.end.clone()), sim.svc.wait_line());
            }
        }
    }
}

#[test]
fn a_plan_of_three_batches_with_update_pause_takes_the_pauses() {
    let mut sim = Sim::new(spec("v1", 3, 1, Mode::Rolling));
    sim.settle();
    let mut m = (*spec("v2", 3, 1, Mode::Rolling).manifest).clone();
    m.update_pause = Duration::from_secs(2);
    let text = m.canonical();
    let before = sim.svc.clone();
    let p = super::plan(&sim.svc, sim.now, Command::Apply(Spec::new(m, text))).unwrap();
    assert_eq!(p.kind, "rolling");
    assert_eq!(p.least, Duration::from_secs(4));
    for k in 1..=3 {
        assert!(
            p.steps
                .iter()
                .any(|s| s.starts_with(&format!("batch {k}/3: starting instance 3 "))),
            "{:#?}",
            p.steps
        );
    }
    let text = p.render("web");
    assert!(
        text.starts_with("web: rolling\n  rolling update started "),
        "{text}"
    );
    assert!(
        text.contains("\nweb: takes at least 4.0s (then at "),
        "{text}"
    );
    // Nothing of the service changed.
    assert_eq!(format!("{:?}", sim.svc), format!("{before:?}"));
    assert!(sim.svc.out.is_empty());
}

/// `spec` with `update_watch 10s`, and `auto_rollback` if `auto`.
fn watch_spec(exec: &str, auto: bool) -> Spec {
    let mut m = (*spec(exec, 3, 1, Mode::Rolling).manifest).clone();
    m.update_watch = Duration::from_secs(10);
    m.auto_rollback = auto;
    let text = m.canonical();
    Spec::new(m, text)
}

/// Steps until the new version is in place and watched; the instant.
fn until_watching(sim: &mut Sim) -> Instant {
    while sim.svc.update_status() != UpdateStatus::Watching {
        assert!(sim.step(), "never watched: {:#?}", sim.events);
    }
    sim.now
}

#[test]
fn update_watch_completes_once_the_window_passed_with_nothing_failed() {
    let mut sim = Sim::new(watch_spec("v1", false));
    let v2 = watch_spec("v2", false);
    sim.command(Command::Apply(v2.clone())).unwrap();
    let since = until_watching(&mut sim);
    assert_eq!(sim.svc.progress(), (3, 3));
    // `wait` follows the window.
    assert_eq!(sim.svc.wait_line(), None);
    assert!(sim.command(Command::Pause).is_err());
    while sim.svc.update_status() == UpdateStatus::Watching {
        assert!(sim.step());
    }
    assert_eq!(sim.now.since(since), Duration::from_secs(10));
    assert_eq!(sim.svc.wait_line(), Some(format!("none {}", v2.version)));
    assert!(
        sim.events.iter().any(|e| e
            .starts_with(&format!("rolling update complete: at {} (", v2.version))
            && e.ends_with("; watched for 10s (update_watch)")),
        "{:#?}",
        sim.events
    );
    assert!(
        sim.events
            .iter()
            .any(|e| e.starts_with("watched for 10s with no crash, restart or failed probe: at ")),
        "{:#?}",
        sim.events
    );
}

#[test]
fn a_crash_in_the_watch_window_fails_the_rollout_and_auto_rollback_undoes_it() {
    for auto in [false, true] {
        let mut sim = Sim::new(watch_spec("v1", auto));
        let (v1, v2) = (watch_spec("v1", auto), watch_spec("v2", auto));
        sim.command(Command::Apply(v2.clone())).unwrap();
        let since = until_watching(&mut sim);
        // A second in, one of the new instances crashes.
        while sim.now.since(since) < Duration::from_secs(1) {
            assert!(sim.step());
        }
        let id = sim
            .svc
            .instances()
            .iter()
            .find(|i| i.spec().version == v2.version && i.state() == State::Ready)
            .map(|i| i.id().0)
            .unwrap();
        sim.crash(id);
        sim.settle();
        let line = sim.svc.wait_line().unwrap();
        assert!(
            line.starts_with("failed: instance ")
                && line.contains(" exited (")
                && line.contains(") 1.")
                && line.contains("s after the rollout completed (update_watch 10s)"),
            "{line}"
        );
        if auto {
            assert!(
                line.ends_with(&format!("; rolled back to {}", v1.version)),
                "{line}"
            );
            assert_eq!(sim.svc.version(), v1.version);
        } else {
            assert_eq!(sim.svc.update_status(), UpdateStatus::Failed);
            assert_eq!(sim.svc.version(), v2.version);
            assert_eq!(sim.svc.progress(), (3, 3));
        }
        if auto {
            sim.check_converged();
        }
    }
}

#[test]
fn a_plan_counts_the_watch_window() {
    let mut sim = Sim::new(watch_spec("v1", false));
    let p = super::plan(&sim.svc, sim.now, Command::Apply(watch_spec("v2", false))).unwrap();
    assert_eq!(p.least, Duration::from_secs(10));
    sim.settle();
}

/// `spec` with both hooks, and `auto_rollback` if `auto`.
fn hooks_spec(exec: &str, auto: bool) -> Spec {
    let mut m = (*spec(exec, 3, 1, Mode::Rolling).manifest).clone();
    m.before_deploy = Some("./migrate".into());
    m.after_deploy = Some("./smoke-test".into());
    m.auto_rollback = auto;
    let text = m.canonical();
    Spec::new(m, text)
}

#[test]
fn before_deploy_runs_before_the_first_batch_and_after_deploy_after_the_last() {
    let mut sim = Sim::new(hooks_spec("v1", false));
    let v2 = hooks_spec("v2", false);
    sim.command(Command::Apply(v2.clone())).unwrap();
    sim.settle();
    sim.check_converged();
    assert_eq!(sim.hooks_run, [Hook::Before, Hook::After]);
    let at = |what: &str| {
        sim.events
            .iter()
            .position(|e| e.starts_with(what))
            .unwrap_or_else(|| panic!("{what}: {:#?}", sim.events))
    };
    assert!(at("before_deploy: running ./migrate") < at("before_deploy: done"));
    assert!(at("before_deploy: done") < at("batch 1/3: starting"));
    assert!(at("batch 3/3 done") < at("after_deploy: running ./smoke-test"));
    assert!(at("after_deploy: done") < at("rolling update complete"));
    // A restart is no deploy: no hooks.
    sim.hooks_run.clear();
    sim.command(Command::Restart(None)).unwrap();
    sim.settle();
    assert!(sim.hooks_run.is_empty());
    // The plan says them.
    let p = super::plan(&sim.svc, sim.now, Command::Apply(hooks_spec("v3", false))).unwrap();
    assert!(
        p.steps
            .iter()
            .any(|s| s == "before_deploy: running ./migrate")
    );
    assert!(
        p.steps
            .iter()
            .any(|s| s == "after_deploy: running ./smoke-test")
    );
}

#[test]
fn a_failing_before_deploy_changes_no_instance() {
    // With auto_rollback too: there is nothing to roll back.
    for auto in [false, true] {
        let mut sim = Sim::new(hooks_spec("v1", auto));
        sim.failing_hook = Some(Hook::Before);
        let before = sim.serving();
        sim.command(Command::Apply(hooks_spec("v2", auto))).unwrap();
        sim.settle();
        assert_eq!(
            sim.failed_line(),
            "failed: before_deploy failed: exit status 1; no instance changed"
        );
        assert_eq!(sim.serving(), before);
        assert_eq!(sim.hooks_run, [Hook::Before]);
    }
}

#[test]
fn a_failing_after_deploy_fails_the_rollout_and_auto_rollback_undoes_it() {
    let mut sim = Sim::new(hooks_spec("v1", true));
    sim.failing_hook = Some(Hook::After);
    let v1 = hooks_spec("v1", true);
    sim.command(Command::Apply(hooks_spec("v2", true))).unwrap();
    sim.settle();
    assert_eq!(
        sim.svc.wait_line().unwrap(),
        format!(
            "failed: after_deploy failed: exit status 1; rolled back to {}",
            v1.version
        )
    );
    sim.check_converged();
    assert_eq!(sim.svc.version(), v1.version);
    // The rollback is no deploy of a new version: its hooks do not run.
    assert_eq!(sim.hooks_run, [Hook::Before, Hook::After]);
}

/// A spec read back twice from the same text is parsed once: the second
/// shares the first's manifest.
#[test]
fn a_spec_read_back_twice_is_parsed_once() {
    let text = "exec sleep 1000\nreplicas 3\nenv READ_BACK=once\n";
    let json = serde_json::to_string(text).unwrap();
    let a: Spec = serde_json::from_str(&json).unwrap();
    let b: Spec = serde_json::from_str(&json).unwrap();
    assert!(Arc::ptr_eq(&a.manifest, &b.manifest));
    assert_eq!(a.manifest.replicas, 3);
    let other: Spec = serde_json::from_str(&json.replace("once", "twice")).unwrap();
    assert!(!Arc::ptr_eq(&a.manifest, &other.manifest));
    assert_ne!(a.version, other.version);
    // Text that does not parse is still refused.
    assert!(serde_json::from_str::<Spec>("\"replicas many\\n\"").is_err());
}
