//! The rollout logic, sans I/O: one [`Service`] state machine per service.
//!
//! It takes [`Input`]s (a command, an instance started, a probe result, an
//! instance exited or drained, time passing) with the current [`Instant`], and
//! returns [`Action`]s (start an instance, stop one, route one in or out, log
//! an event). It never reads a clock, spawns a process or touches a socket:
//! the caller does, and tells it what happened. When it needs to be woken up
//! (a health deadline, the end of a drain or of `update_pause`, a restart
//! backoff) it says so through [`Service::next_deadline`]; the caller feeds
//! [`Input::Tick`] at that time. That is the "wait" action.
//!
//! # Model
//!
//! A service has *slots* `0..replicas`. Each slot has a committed version and
//! at most one *serving* instance. A rollout works through the slots that are
//! not at the target version a batch at a time: it starts *candidate*
//! instances, waits until each is ready (healthy for `min_healthy`, before
//! `health_deadline`), then commits the batch: candidates become serving and
//! are routed in, the slot's old instance is routed out, drained and stopped
//! (*retiring*). Outside the batch, a serving instance that exits is restarted
//! at its slot's version, with exponential backoff. One that grows over its
//! `memory_max` turns retiring while it stays ready and routed in: its slot
//! starts a fresh instance, and the old one drains once that one is ready.
//!
//! Decisions are taken by [`Service::drive`] from the whole state after every
//! input, never from the input alone, so a late or repeated input cannot
//! derail the machine.

mod instance;

use std::borrow::Cow;
use std::fmt;
use std::ops::Add;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::manifest::{
    Manifest, RestartPolicy, Signal, Strategy, UpdateOrder, Version, format_duration,
};
use crate::name::ServiceName;

use instance::ProbeEffect;
pub use instance::{ALLOWED, Exit, Instance, InstanceId, Role, State};

/// First restart delay after an unexpected exit; doubles each time.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest restart delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An instance ready this long before it exits resets its slot's backoff.
pub const BACKOFF_RESET: Duration = Duration::from_secs(30);
/// When deployd could not start an instance for a shortage of its own
/// ([`Exit::Short`]), how long until it tries again: no backoff, since the
/// instance did nothing wrong.
pub const SHORT_RETRY: Duration = Duration::from_secs(1);

/// A point on the caller's monotonic clock, as time since an epoch it chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Instant(Duration);

impl Instant {
    /// The instant `d` after the epoch.
    pub fn from_epoch(d: Duration) -> Instant {
        Instant(d)
    }
    /// Time since the epoch.
    pub fn as_duration(self) -> Duration {
        self.0
    }
    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Instant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(d))
    }
}

/// A manifest with its version and the text it was parsed from.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The parsed manifest.
    pub manifest: Arc<Manifest>,
    /// Its version.
    pub version: Version,
    /// The text as written, shown in the namespace.
    pub text: Arc<str>,
}

impl Spec {
    /// Wraps a manifest and its text, computing the version.
    pub fn new(manifest: Manifest, text: impl Into<Arc<str>>) -> Spec {
        Spec {
            version: manifest.version(),
            manifest: Arc::new(manifest),
            text: text.into(),
        }
    }
}

impl PartialEq for Spec {
    fn eq(&self, other: &Spec) -> bool {
        self.version == other.version
    }
}

/// A command from a ctl file, with any manifest already loaded by the caller.
#[derive(Debug, Clone)]
pub enum Command {
    /// Roll out this manifest.
    Apply(Spec),
    /// Hold after the batch in flight.
    Pause,
    /// Go on with a paused rollout.
    Resume,
    /// Roll back to this version, or to the previous one.
    Rollback(Option<Spec>),
    /// Replace every instance with a fresh one of the same version, or only
    /// the instance with this number.
    Restart(Option<u32>),
    /// Stop every instance.
    Stop,
    /// Start a stopped service.
    Start,
    /// Stop every instance and forget the service.
    Remove,
    /// Send `signal` to the processes of every running instance, or of the
    /// one with this number.
    Signal(Signal, Option<u32>),
}

/// What happened, as told by the caller.
#[derive(Debug, Clone)]
pub enum Input {
    /// A ctl command.
    Command(Command),
    /// The process of an instance was started.
    Started {
        /// Which instance.
        id: InstanceId,
        /// Its process id.
        pid: u32,
    },
    /// One health probe's result; the error says what failed.
    Probe {
        /// Which instance.
        id: InstanceId,
        /// `Ok` when the probe passed.
        result: Result<(), String>,
    },
    /// The process of an instance ended (or never started).
    Exited {
        /// Which instance.
        id: InstanceId,
        /// How.
        exit: Exit,
    },
    /// An instance routed out has no request or connection left.
    Drained {
        /// Which instance.
        id: InstanceId,
    },
    /// An instance's processes hold more resident memory than its
    /// `memory_max`: the caller samples it and reports each sample over.
    OverMemory {
        /// Which instance.
        id: InstanceId,
        /// Resident bytes of its processes, summed.
        rss: u64,
    },
    /// The services this one still waits for before it starts anything
    /// (its manifest's `after` that are not ready yet, as the caller sees
    /// them); empty: go. See [`Service::create_waiting`].
    Wait(Vec<ServiceName>),
    /// Time passed; deadlines up to now are due.
    Tick,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a process for a new instance, then report `Started` or `Exited`.
    Start {
        /// The new instance.
        id: InstanceId,
        /// Its slot, given to the process as `$INSTANCE`.
        slot: u32,
        /// What it runs.
        spec: Spec,
    },
    /// Send `signal` to the instance's process group, SIGKILL after
    /// `timeout`, and report `Exited`.
    Stop {
        /// Which instance.
        id: InstanceId,
        /// The manifest's `stop_signal`.
        signal: Signal,
        /// The manifest's `stop_timeout`.
        timeout: Duration,
    },
    /// Send `signal` to the instance's process group, and nothing more:
    /// what follows (an exit, failed probes) is reported as usual.
    Signal {
        /// Which instance.
        id: InstanceId,
        /// The signal.
        signal: Signal,
    },
    /// Send it new requests and connections.
    RouteIn {
        /// Which instance.
        id: InstanceId,
    },
    /// Send it nothing new; report `Drained` when its last request is done.
    RouteOut {
        /// Which instance.
        id: InstanceId,
    },
    /// Append a line to the service's event log.
    Event(String),
    /// Append the last lines the instance printed (its log's last 10
    /// non-blank lines) to the event log, each as `PREFIX: LINE`: after an
    /// exit or a failure its output may explain (a candidate that exited or
    /// missed its deadline, a serving instance that exited or turned
    /// unhealthy), so that the reason is where the failure is reported.
    Output {
        /// Which instance.
        id: InstanceId,
        /// `instance N printed`.
        prefix: String,
    },
}

/// Why a command was refused. A refused command changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The class of refusal, which the namespace maps to an errno.
    pub kind: RefusalKind,
    /// A sentence for the user.
    pub message: String,
}

/// Classes of refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The command makes no sense now (`EINVAL`).
    Invalid,
    /// Something else is in progress (`EBUSY`).
    Busy,
    /// What it names does not exist (`ENOENT`).
    NotFound,
    /// What it would change could not be written to disk; the errno the
    /// OS gave (`ENOSPC`, `EROFS`, `EIO`, ...). Never the machine's: the
    /// engine's, which saves a command's effect before acting on it.
    Storage(i32),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

fn refuse<T>(kind: RefusalKind, message: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal {
        kind,
        message: message.into(),
    })
}

/// The result of one [`Service::handle`].
#[derive(Debug)]
pub struct Handled {
    /// For a command: what was done, or why not. `Ok("")` for other inputs.
    pub result: Result<String, Refusal>,
    /// What the caller must do, in order.
    pub actions: Vec<Action>,
}

/// The service's rollout status, as in `update_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateStatus {
    /// No rollout in progress, the last one did not fail.
    None,
    /// A rollout is in progress.
    Rolling,
    /// A rollout is held by `pause` (or by a restart of deployd).
    Paused,
    /// The last rollout failed.
    Failed,
}

impl UpdateStatus {
    /// The word shown in `update_status`.
    pub fn name(self) -> &'static str {
        match self {
            UpdateStatus::None => "none",
            UpdateStatus::Rolling => "rolling",
            UpdateStatus::Paused => "paused",
            UpdateStatus::Failed => "failed",
        }
    }
}

/// Why a rollout runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The first deployment of a service: every instance at once.
    Create,
    /// A new manifest.
    Apply,
    /// A manifest that changes only `replicas`: add or remove instances.
    Scale,
    /// The `restart` command: fresh processes, same version.
    Restart,
    /// `restart N`: a fresh process for one slot, same version, the way
    /// `restart` replaces each (with surge when rolling). `number` is the
    /// instance as it was named, for the events.
    RestartInstance {
        /// The slot replaced.
        slot: u32,
        /// The number of the instance replaced.
        number: u32,
    },
    /// The `rollback` command.
    Rollback,
    /// After a failed rollout with `auto_rollback on`; holds that failure.
    AutoRollback(String),
}

impl Kind {
    fn noun(&self, strategy: Strategy) -> Cow<'static, str> {
        let noun = match (self, strategy) {
            (Kind::RestartInstance { number, .. }, _) => {
                return format!("restart of instance {number}").into();
            }
            (Kind::Create, _) => "deployment",
            (Kind::Scale, _) => "scaling",
            (Kind::Restart, Strategy::Rolling) => "rolling restart",
            (Kind::Restart, Strategy::Replace) => "restart",
            (Kind::Rollback, _) => "rollback",
            (Kind::AutoRollback(_), _) => "automatic rollback",
            (Kind::Apply, Strategy::Rolling) => "rolling update",
            (Kind::Apply, Strategy::Replace) => "replace update",
        };
        noun.into()
    }
}

/// What a service must remember across a restart of deployd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The target version.
    pub version: Version,
    /// The version before it.
    pub previous: Option<Version>,
    /// The rollout status.
    pub update_status: UpdateStatus,
    /// Why the last rollout failed.
    pub failure: Option<String>,
    /// The rollout in progress, if any.
    pub rollout: Option<Kind>,
    /// Whether the service was stopped.
    pub stopped: bool,
    /// The committed version of each slot; `None` where none was yet.
    pub slots: Vec<Option<Version>>,
    /// Each slot's restarts since its version was committed (see
    /// [`Service::restarts`]); missing in records of earlier deployds.
    #[serde(default)]
    pub restarts: Vec<u32>,
}

#[derive(Debug, Clone)]
struct Slot {
    /// The committed version; `None` until a rollout commits one.
    spec: Option<Spec>,
    /// Unexpected exits in a row, for backoff.
    failures: u32,
    /// When the next restart may happen.
    restart_at: Option<Instant>,
    /// Exited and, by the restart policy, left so.
    hold: bool,
    /// Restarts of its instance since its version was committed.
    restarts: u32,
}

impl Slot {
    fn empty() -> Slot {
        Slot {
            spec: None,
            failures: 0,
            restart_at: None,
            hold: false,
            restarts: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `update replace`: the slots' old instances are being stopped first.
    RetireFirst,
    /// Candidates are starting.
    Starting,
    /// Committed; the old instances are draining and stopping.
    Retiring,
}

#[derive(Debug, Clone)]
struct Batch {
    number: u32,
    total: u32,
    slots: Vec<u32>,
    candidates: Vec<InstanceId>,
    retiring: Vec<InstanceId>,
    phase: Phase,
    /// The first batch of a new version with `update_canary`: the rollout
    /// pauses after it.
    canary: bool,
}

impl Batch {
    /// `batch 2/3: ` before its events, or nothing when it is the only one.
    fn prefix(&self) -> String {
        if self.total > 1 {
            format!("batch {}/{}: ", self.number, self.total)
        } else {
            String::new()
        }
    }
}

/// What a stop-first batch may do now; see [`Service::may_take_out`].
enum TakeOut {
    Go,
    Wait,
    Failed,
}

#[derive(Debug, Clone)]
struct Rollout {
    kind: Kind,
    from: Version,
    /// Serving instances with a smaller id must be replaced (restart).
    floor: InstanceId,
    started_at: Instant,
    batch: Option<Batch>,
    batches_done: u32,
    pause_until: Option<Instant>,
    /// Since when a stop-first batch waits for the rest of the service to
    /// be ready before it takes instances out.
    held_since: Option<Instant>,
    paused: bool,
}

#[derive(Debug, Clone)]
enum Outcome {
    Done(Version),
    Failed(String),
}

/// An instance that kept running while deployd replaced itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// The slot it filled.
    pub slot: u32,
    /// Its number in the namespace.
    pub number: u32,
    /// The version it runs.
    pub version: Version,
    /// Its process.
    pub pid: u32,
}

/// What [`Service::adopt`] made of a record and its running instances.
#[derive(Debug)]
pub struct Adopted {
    /// The service.
    pub service: Service,
    /// What to do first (routing the adopted instances in, starting what
    /// is missing).
    pub actions: Vec<Action>,
    /// For each of `running`, in order, the id it was adopted under, or
    /// `None` if it was not (stop it).
    pub ids: Vec<Option<InstanceId>>,
}

/// One service's state machine. See the module documentation.
#[derive(Debug, Clone)]
pub struct Service {
    target: Spec,
    previous: Option<Spec>,
    slots: Vec<Slot>,
    instances: Vec<Instance>,
    rollout: Option<Rollout>,
    failure: Option<String>,
    stopped: bool,
    removing: bool,
    /// Services to wait for before starting anything; see [`Input::Wait`].
    waiting: Vec<ServiceName>,
    next_id: u64,
    outcome: Outcome,
    now: Instant,
    out: Vec<Action>,
}

impl Service {
    /// A new service deploying `spec`: every instance starts at once.
    pub fn create(now: Instant, spec: Spec) -> (Service, Vec<Action>) {
        Service::create_waiting(now, spec, Vec::new())
    }

    /// [`Service::create`], but nothing starts until [`Input::Wait`] says
    /// there is nothing left to wait for (the manifest's `after`: services
    /// that must be ready first). The deployment is in flight meanwhile.
    pub fn create_waiting(
        now: Instant,
        spec: Spec,
        waiting: Vec<ServiceName>,
    ) -> (Service, Vec<Action>) {
        let mut s = Service::blank(now, spec, None, Vec::new());
        s.begin(Kind::Create, None);
        s.wait_for(waiting);
        s.drive();
        let actions = std::mem::take(&mut s.out);
        (s, actions)
    }

    /// A service as recorded, coming back after deployd restarted: every
    /// slot starts at its recorded version, and a rollout that was in
    /// progress comes back paused. `resolve` finds a manifest by version.
    pub fn restore(
        now: Instant,
        record: &Record,
        resolve: impl Fn(Version) -> Option<Spec>,
    ) -> Result<(Service, Vec<Action>), String> {
        Service::restore_waiting(now, record, resolve, Vec::new())
    }

    /// [`Service::restore`], holding every start until [`Input::Wait`]
    /// says go, as [`Service::create_waiting`].
    pub fn restore_waiting(
        now: Instant,
        record: &Record,
        resolve: impl Fn(Version) -> Option<Spec>,
        waiting: Vec<ServiceName>,
    ) -> Result<(Service, Vec<Action>), String> {
        let target = resolve(record.version)
            .ok_or_else(|| format!("the manifest of version {} is lost", record.version))?;
        let previous = record.previous.and_then(&resolve);
        let slots = recorded_slots(record, &resolve);
        let mut s = Service::blank(now, target, previous, slots);
        s.stopped = record.stopped;
        if !s.stopped {
            s.wait_for(waiting);
        }
        s.failure = record.failure.clone();
        if let Some(reason) = &s.failure {
            s.outcome = Outcome::Failed(reason.clone());
        }
        if let Some(kind) = &record.rollout {
            let from = s.previous.as_ref().map_or(s.target.version, |p| p.version);
            s.rollout = Some(Rollout {
                kind: kind.clone(),
                from,
                floor: InstanceId(0),
                started_at: now,
                batch: None,
                batches_done: 0,
                pause_until: None,
                held_since: None,
                paused: true,
            });
            let (k, n) = s.progress();
            s.event(format!(
                "deployd restarted during the {}: paused at {k}/{n}; resume to finish it",
                kind.noun(s.target.manifest.update)
            ));
        }
        s.drive();
        let actions = std::mem::take(&mut s.out);
        Ok((s, actions))
    }

    /// A service as recorded, whose instances kept running while deployd
    /// replaced itself (`reexec`): each of `running` takes its slot back,
    /// ready and routed in, if the slot's recorded version is the one it
    /// runs (the others are for the caller to stop). Slots left empty start
    /// as after [`Service::restore`]. A stopped service, or one with a
    /// rollout in progress, adopts nothing: deployd only replaces itself
    /// when every service has settled.
    pub fn adopt(
        now: Instant,
        record: &Record,
        resolve: impl Fn(Version) -> Option<Spec>,
        running: &[Running],
    ) -> Result<Adopted, String> {
        if record.rollout.is_some() || record.stopped {
            let (service, actions) = Service::restore(now, record, resolve)?;
            return Ok(Adopted {
                service,
                actions,
                ids: vec![None; running.len()],
            });
        }
        // The record without its slots: nothing starts yet.
        let empty = Record {
            slots: Vec::new(),
            ..record.clone()
        };
        let (mut s, _) = Service::restore(now, &empty, &resolve)?;
        s.slots = recorded_slots(record, &resolve);
        let mut ids = Vec::new();
        for r in running {
            let spec = s
                .slots
                .get(r.slot as usize)
                .and_then(|sl| sl.spec.clone())
                .filter(|spec| spec.version == r.version);
            let taken = s
                .instances
                .iter()
                .any(|i| i.slot == r.slot || i.number == r.number);
            let Some(spec) = spec.filter(|_| !taken) else {
                ids.push(None);
                continue;
            };
            let id = InstanceId(s.next_id);
            s.next_id += 1;
            let mut inst = Instance::new(id, r.slot, r.number, spec, Role::Serving, now);
            inst.state = State::Ready;
            inst.pid = Some(r.pid);
            inst.healthy_since = Some(now);
            inst.ready_since = Some(now);
            s.instances.push(inst);
            s.out.push(Action::RouteIn { id });
            ids.push(Some(id));
        }
        s.drive();
        let actions = std::mem::take(&mut s.out);
        Ok(Adopted {
            service: s,
            actions,
            ids,
        })
    }

    fn blank(now: Instant, target: Spec, previous: Option<Spec>, slots: Vec<Slot>) -> Service {
        Service {
            outcome: Outcome::Done(target.version),
            target,
            previous,
            slots,
            instances: Vec::new(),
            rollout: None,
            failure: None,
            stopped: false,
            removing: false,
            waiting: Vec::new(),
            next_id: 0,
            now,
            out: Vec::new(),
        }
    }

    /// Takes one input at time `now` and returns what to do.
    pub fn handle(&mut self, now: Instant, input: Input) -> Handled {
        self.now = self.now.max(now);
        let result = match input {
            Input::Command(cmd) => self.command(cmd),
            Input::Started { id, pid } => {
                self.started(id, pid);
                Ok(String::new())
            }
            Input::Probe { id, result } => {
                self.probed(id, result);
                Ok(String::new())
            }
            Input::Exited { id, exit } => {
                self.exited(id, exit);
                Ok(String::new())
            }
            Input::Drained { id } => {
                if let Some(i) = self.find(id) {
                    if self.instances[i].state == State::Draining {
                        self.instances[i].drained = true;
                    }
                }
                Ok(String::new())
            }
            Input::OverMemory { id, rss } => {
                self.over_memory(id, rss);
                Ok(String::new())
            }
            Input::Wait(waiting) => {
                self.wait_for(waiting);
                Ok(String::new())
            }
            Input::Tick => Ok(String::new()),
        };
        if result.is_ok() {
            self.drive();
        }
        Handled {
            result,
            actions: std::mem::take(&mut self.out),
        }
    }

    /// When the machine next needs an [`Input::Tick`], if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let now = self.now;
        // Instants already past were handled by the last drive.
        let mut at = |t: Instant| {
            if t > now {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        for inst in &self.instances {
            match inst.state {
                State::Starting => at(inst.deadline()),
                State::Healthy => {
                    if let Some(since) = inst.healthy_since {
                        at(since + inst.spec.manifest.ready_after());
                    }
                    at(inst.deadline());
                }
                State::Draining => {
                    if let Some(until) = inst.drain_until {
                        at(until);
                    }
                }
                _ => {}
            }
        }
        for slot in &self.slots {
            if let Some(t) = slot.restart_at {
                at(t);
            }
        }
        if let Some(t) = self.rollout.as_ref().and_then(|r| r.pause_until) {
            at(t);
        }
        if let Some(t) = self.rollout.as_ref().and_then(|r| r.held_since) {
            at(t + self.target.manifest.health_deadline);
        }
        next
    }

    // ---- views ----

    /// The target version.
    pub fn version(&self) -> Version {
        self.target.version
    }
    /// The target manifest.
    pub fn target(&self) -> &Spec {
        &self.target
    }
    /// The version before the target.
    pub fn previous(&self) -> Option<&Spec> {
        self.previous.as_ref()
    }
    /// The instances, in order of creation.
    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }
    /// Whether the service is stopped.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }
    /// The services it waits for before it starts anything; see
    /// [`Input::Wait`].
    pub fn waiting(&self) -> &[ServiceName] {
        &self.waiting
    }
    /// Whether `remove` finished: the caller may forget the service.
    pub fn is_removed(&self) -> bool {
        self.removing && self.instances.is_empty()
    }
    /// Whether `remove` was asked.
    pub fn is_removing(&self) -> bool {
        self.removing
    }

    /// The rollout status.
    pub fn update_status(&self) -> UpdateStatus {
        match (&self.rollout, &self.failure) {
            (Some(r), _) if r.paused => UpdateStatus::Paused,
            (Some(_), _) => UpdateStatus::Rolling,
            (None, Some(_)) => UpdateStatus::Failed,
            (None, None) => UpdateStatus::None,
        }
    }

    /// `(k, n)`: slots whose serving instance is ready at the target version,
    /// out of `replicas`.
    pub fn progress(&self) -> (u32, u32) {
        let n = self.target.manifest.replicas;
        let floor = self.floor();
        let k = self
            .instances
            .iter()
            .filter(|i| {
                i.role == Role::Serving
                    && i.slot < n
                    && i.state == State::Ready
                    && i.spec.version == self.target.version
                    && (i.id >= floor || !self.restarts_slot(i.slot))
            })
            .count() as u32;
        (k, n)
    }

    /// Instances healthy now, routed in or not.
    pub fn healthy(&self) -> u32 {
        self.instances.iter().filter(|i| i.is_healthy()).count() as u32
    }

    /// The line `wait` returns, or `None` while a rollout is in flight:
    /// `none VERSION`, `paused VERSION` or `failed: REASON`.
    pub fn wait_line(&self) -> Option<String> {
        match &self.rollout {
            Some(r) if r.paused && r.batch.is_none() => {
                Some(format!("paused {}", self.target.version))
            }
            Some(_) => None,
            None => Some(match &self.outcome {
                Outcome::Done(v) => format!("none {v}"),
                Outcome::Failed(reason) => format!("failed: {reason}"),
            }),
        }
    }

    /// What must survive a restart of deployd.
    pub fn record(&self) -> Record {
        Record {
            version: self.target.version,
            previous: self.previous.as_ref().map(|p| p.version),
            update_status: self.update_status(),
            failure: self.failure.clone(),
            rollout: self.rollout.as_ref().map(|r| r.kind.clone()),
            stopped: self.stopped,
            slots: self
                .slots
                .iter()
                .map(|s| s.spec.as_ref().map(|spec| spec.version))
                .collect(),
            restarts: self.slots.iter().map(|s| s.restarts).collect(),
        }
    }

    /// How many times the instance of `slot` was started again outside a
    /// rollout since the slot's version was committed: after it exited (by
    /// the restart policy), failed its health checks or deadline, or
    /// outgrew `memory_max`. kubectl's RESTARTS, PM2's ↺. A rollout or the
    /// `restart` command starts the count again.
    pub fn restarts(&self, slot: u32) -> u32 {
        self.slots.get(slot as usize).map_or(0, |s| s.restarts)
    }

    /// Every version an instance or slot still runs, besides the target.
    pub fn versions_in_use(&self) -> Vec<Version> {
        let mut v: Vec<Version> = self
            .slots
            .iter()
            .filter_map(|s| s.spec.as_ref().map(|s| s.version))
            .chain(self.instances.iter().map(|i| i.spec.version))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    // ---- commands ----

    fn command(&mut self, cmd: Command) -> Result<String, Refusal> {
        if self.removing {
            // Removing twice is waiting for the first to end; anything
            // else waits for the service to be gone (then apply deploys
            // it anew).
            if matches!(cmd, Command::Remove) {
                return Ok("already being removed".into());
            }
            return refuse(
                RefusalKind::Busy,
                "the service is being removed; try again once it is gone",
            );
        }
        match cmd {
            Command::Apply(spec) => self.apply(spec),
            Command::Pause => self.pause(),
            Command::Resume => self.resume(),
            Command::Rollback(spec) => self.rollback(spec),
            Command::Restart(None) => self.restart(),
            Command::Restart(Some(number)) => self.restart_instance(number),
            Command::Stop => self.stop(false),
            Command::Start => self.start(),
            Command::Remove => self.stop(true),
            Command::Signal(signal, instance) => self.signal(signal, instance),
        }
    }

    fn refuse_if_stopped(&self) -> Result<(), Refusal> {
        if self.stopped {
            refuse(RefusalKind::Busy, "the service is stopped; start it first")
        } else {
            Ok(())
        }
    }

    /// Every slot committed at the target, no rollout, nothing extra:
    /// where an `apply` of the target answers `unchanged`.
    pub fn converged(&self) -> bool {
        let n = self.target.manifest.replicas as usize;
        self.rollout.is_none()
            && self.failure.is_none()
            && self.slots.len() == n
            && self
                .slots
                .iter()
                .all(|s| s.spec.as_ref().is_some_and(|spec| *spec == self.target))
    }

    fn apply(&mut self, spec: Spec) -> Result<String, Refusal> {
        self.refuse_if_stopped()?;
        // The same manifest again while it rolls out (a CI job retried,
        // a script that applies what deployd's start already applies):
        // nothing to refuse, the rollout under way is its answer.
        if let Some(r) = self
            .rollout
            .as_ref()
            .filter(|r| !r.paused && spec == self.target)
        {
            let (k, n) = self.progress();
            let msg = format!(
                "already in progress: a {} to {} ({k}/{n})",
                r.kind.noun(self.target.manifest.update),
                self.target.version
            );
            self.event(format!("apply: {msg}"));
            return Ok(msg);
        }
        self.refuse_if_rolling()?;
        if spec == self.target {
            if self.converged() {
                let msg = format!("unchanged: already at {}", spec.version);
                self.event(format!("apply: {msg}"));
                self.outcome = Outcome::Done(spec.version);
                return Ok(msg);
            }
            // Same version, not there yet (a failed rollout): try again.
            self.begin(Kind::Apply, None);
            return Ok(format!("retrying the rollout of {}", spec.version));
        }
        let old = std::mem::replace(&mut self.target, spec);
        // Slots whose version differs only in replicas keep their processes.
        let mut relabeled = true;
        for slot in &mut self.slots {
            if let Some(s) = &slot.spec {
                if s.manifest.same_but_replicas(&self.target.manifest) {
                    let from = s.version;
                    slot.spec = Some(self.target.clone());
                    for inst in &mut self.instances {
                        if inst.spec.version == from && inst.role == Role::Serving {
                            inst.spec = self.target.clone();
                        }
                    }
                } else {
                    relabeled = false;
                }
            }
        }
        let kind = if relabeled && old.manifest.same_but_replicas(&self.target.manifest) {
            Kind::Scale
        } else {
            Kind::Apply
        };
        self.previous = Some(old.clone());
        self.begin(kind, Some(old.version));
        Ok(self.started_message())
    }

    fn pause(&mut self) -> Result<String, Refusal> {
        let Some(r) = &mut self.rollout else {
            return refuse(
                RefusalKind::Invalid,
                "nothing to pause: no rollout in progress",
            );
        };
        if r.paused {
            return refuse(RefusalKind::Invalid, "already paused");
        }
        r.paused = true;
        let msg = match &r.batch {
            Some(b) => format!(
                "pausing: batch {}/{} finishes, then the rollout holds",
                b.number, b.total
            ),
            None => "paused".to_string(),
        };
        self.event(msg.clone());
        Ok(msg)
    }

    fn resume(&mut self) -> Result<String, Refusal> {
        let Some(r) = &mut self.rollout else {
            return refuse(
                RefusalKind::Invalid,
                "nothing to resume: no rollout in progress",
            );
        };
        if !r.paused {
            return refuse(RefusalKind::Invalid, "not paused");
        }
        r.paused = false;
        self.event("resumed".into());
        Ok("resumed".into())
    }

    fn rollback(&mut self, spec: Option<Spec>) -> Result<String, Refusal> {
        self.refuse_if_stopped()?;
        let to = match spec.or_else(|| self.previous.clone()) {
            Some(to) => to,
            None => return refuse(RefusalKind::NotFound, "no previous version to roll back to"),
        };
        if to == self.target && self.converged() {
            return refuse(RefusalKind::Invalid, format!("already at {}", to.version));
        }
        self.cancel_batch();
        self.rollout = None;
        let from = self.target.version;
        if to != self.target {
            let old = std::mem::replace(&mut self.target, to);
            self.previous = Some(old);
        }
        self.begin(Kind::Rollback, Some(from));
        Ok(self.started_message())
    }

    /// `EBUSY` while a rollout is in flight, saying what will end it.
    fn refuse_if_rolling(&self) -> Result<(), Refusal> {
        let Some(r) = &self.rollout else {
            return Ok(());
        };
        let (k, n) = self.progress();
        refuse(
            RefusalKind::Busy,
            format!(
                "a {} to {} is in progress ({k}/{n}); {}",
                r.kind.noun(self.target.manifest.update),
                self.target.version,
                match r.paused {
                    true => "it is paused: resume it, or roll back",
                    false => "wait for it, or roll back",
                }
            ),
        )
    }

    fn restart(&mut self) -> Result<String, Refusal> {
        self.refuse_if_stopped()?;
        self.refuse_if_rolling()?;
        self.refuse_if_behind()?;
        self.begin(Kind::Restart, None);
        Ok(self.started_message())
    }

    /// `restart N`: one slot's rollout to a fresh process of its version.
    fn restart_instance(&mut self, number: u32) -> Result<String, Refusal> {
        self.refuse_if_stopped()?;
        self.refuse_if_rolling()?;
        let Some(inst) = self.instances.iter().find(|i| i.number == number) else {
            let mut numbers: Vec<u32> = self.instances.iter().map(|i| i.number).collect();
            numbers.sort_unstable();
            let list = numbers
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            return refuse(
                RefusalKind::NotFound,
                format!("no instance {number} (instances: {list})"),
            );
        };
        if inst.role != Role::Serving {
            return refuse(
                RefusalKind::Invalid,
                format!("instance {number} is already being replaced or stopped"),
            );
        }
        let slot = inst.slot;
        self.refuse_if_behind()?;
        self.begin(Kind::RestartInstance { slot, number }, None);
        Ok(self.started_message())
    }

    /// After a rollout that failed or was cut short, some slots are not at
    /// the target: a restart would roll them to it behind the operator's
    /// back (a failed version tried again under the name of a restart),
    /// and a success would clear the failure while the versions stay
    /// mixed. `apply` (try again) and `rollback` are the ways out.
    fn refuse_if_behind(&self) -> Result<(), Refusal> {
        let behind = self
            .slots
            .iter()
            .filter(|s| s.spec.as_ref() != Some(&self.target))
            .count();
        if behind == 0 {
            return Ok(());
        }
        refuse(
            RefusalKind::Invalid,
            format!(
                "{behind} of {} instances do not run the target {} (the last rollout did not finish); apply or roll back first",
                self.slots.len(),
                self.target.version
            ),
        )
    }

    /// Sets what the service waits for, saying what changed.
    fn wait_for(&mut self, mut waiting: Vec<ServiceName>) {
        waiting.sort();
        waiting.dedup();
        if waiting == self.waiting {
            return;
        }
        let joined = |names: Vec<&ServiceName>| {
            let names: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
            names.join(", ")
        };
        let done = joined(
            self.waiting
                .iter()
                .filter(|w| !waiting.contains(w))
                .collect(),
        );
        let left = joined(waiting.iter().collect());
        let msg = match (done.is_empty(), left.is_empty()) {
            (true, _) => format!("waiting for {left} to be ready before starting (after)"),
            (false, true) => format!("done waiting for {done}; starting"),
            (false, false) => format!("done waiting for {done}; still waiting for {left}"),
        };
        self.waiting = waiting;
        self.event(msg);
    }

    /// `signal SIG [N]`: to every instance whose process runs and is not
    /// being stopped (deployd's own stop signal is under way there), or to
    /// instance N. A rollout in flight is no reason to refuse: a `HUP` that
    /// reloads a configuration is as good for a candidate.
    fn signal(&mut self, signal: Signal, instance: Option<u32>) -> Result<String, Refusal> {
        let running =
            |i: &Instance| i.pid().is_some() && !matches!(i.state, State::Stopping | State::Exited);
        let mut targets: Vec<(u32, InstanceId)> = match instance {
            Some(n) => {
                let Some(inst) = self.instances.iter().find(|i| i.number == n) else {
                    return refuse(RefusalKind::NotFound, format!("no instance {n}"));
                };
                if !running(inst) {
                    return refuse(
                        RefusalKind::Invalid,
                        format!("instance {n} is not running ({})", inst.state.name()),
                    );
                }
                vec![(inst.number, inst.id)]
            }
            None => self
                .instances
                .iter()
                .filter(|i| running(i))
                .map(|i| (i.number, i.id))
                .collect(),
        };
        if targets.is_empty() {
            return if self.stopped {
                refuse(RefusalKind::Busy, "the service is stopped; start it first")
            } else {
                refuse(RefusalKind::Invalid, "no instance is running")
            };
        }
        targets.sort_unstable();
        for (_, id) in &targets {
            self.out.push(Action::Signal { id: *id, signal });
        }
        let numbers: Vec<u32> = targets.iter().map(|&(n, _)| n).collect();
        let msg = format!("sent {} to {}", signal.name(), instance_list(&numbers));
        self.event(msg.clone());
        Ok(msg)
    }

    fn stop(&mut self, remove: bool) -> Result<String, Refusal> {
        if self.stopped && !remove {
            return refuse(RefusalKind::Invalid, "already stopped");
        }
        // Said before anything it does, so that each instance's own line
        // (a candidate not routed in is stopped at once) comes after it.
        let live = self.instances.iter().filter(|i| i.live()).count();
        let msg = format!(
            "{} {live} instance{}",
            if remove {
                "removing: stopping"
            } else {
                "stopping"
            },
            if live == 1 { "" } else { "s" }
        );
        self.event(msg.clone());
        if self.rollout.is_some() {
            self.cancel_batch();
            self.rollout = None;
            self.outcome =
                Outcome::Failed("the rollout was cancelled: the service was stopped".into());
        }
        self.failure = None;
        self.stopped = true;
        self.removing = remove;
        self.waiting.clear();
        let live: Vec<usize> = (0..self.instances.len())
            .filter(|&i| self.instances[i].live())
            .collect();
        for i in &live {
            self.retire(*i);
        }
        // Exited records have nothing left to stop.
        self.instances.retain(|i| i.live());
        Ok(msg)
    }

    fn start(&mut self) -> Result<String, Refusal> {
        if !self.stopped {
            return refuse(RefusalKind::Invalid, "already running");
        }
        self.stopped = false;
        let n = self.target.manifest.replicas as usize;
        self.slots.resize_with(n, Slot::empty);
        for slot in &mut self.slots {
            if slot.spec.is_none() {
                slot.spec = Some(self.target.clone());
            }
            slot.hold = false;
            slot.restart_at = None;
            slot.failures = 0;
            slot.restarts = 0;
        }
        let msg = format!("starting {n} instance{}", if n == 1 { "" } else { "s" });
        self.event(msg.clone());
        Ok(msg)
    }

    // ---- rollouts ----

    fn begin(&mut self, kind: Kind, from: Option<Version>) {
        let from = from.unwrap_or(self.target.version);
        let floor = if matches!(kind, Kind::Restart | Kind::RestartInstance { .. }) {
            InstanceId(self.next_id)
        } else {
            InstanceId(0)
        };
        self.failure = None;
        self.rollout = Some(Rollout {
            kind,
            from,
            floor,
            started_at: self.now,
            batch: None,
            batches_done: 0,
            pause_until: None,
            held_since: None,
            paused: false,
        });
        let msg = self.started_message();
        self.event(msg);
    }

    fn started_message(&self) -> String {
        let Some(r) = &self.rollout else {
            return String::new();
        };
        let m = &self.target.manifest;
        let to = self.target.version;
        let n = match m.replicas {
            1 => "1 instance".to_string(),
            n => format!("{n} instances"),
        };
        let shape = match (&r.kind, m.update) {
            (Kind::Create | Kind::Scale, _) => n.clone(),
            (_, Strategy::Replace) => format!("{n}, all at once"),
            (_, Strategy::Rolling) if m.update_order == UpdateOrder::StopFirst => {
                format!("{n}, batch {}, stop first", m.update_batch)
            }
            (_, Strategy::Rolling) => format!("{n}, batch {}", m.update_batch),
        };
        match &r.kind {
            Kind::Create => format!("deployment of {to} started ({shape})"),
            Kind::Restart => format!("{} of {to} started ({shape})", r.kind.noun(m.update)),
            Kind::RestartInstance { .. } => format!(
                "{} started ({to}{})",
                r.kind.noun(m.update),
                match (m.update, m.update_order) {
                    (Strategy::Rolling, UpdateOrder::StartFirst) => {
                        ", serving until its replacement is ready"
                    }
                    _ => ", stopping it first",
                }
            ),
            Kind::Scale => format!("scaling to {n} ({to})"),
            kind => format!(
                "{} started {} → {to} ({shape})",
                kind.noun(m.update),
                r.from
            ),
        }
    }

    fn floor(&self) -> InstanceId {
        self.rollout.as_ref().map_or(InstanceId(0), |r| r.floor)
    }

    /// Slots below `replicas` that the rollout still has to bring to the target.
    fn todo(&self) -> Vec<u32> {
        let n = self.target.manifest.replicas;
        let floor = self.floor();
        (0..n)
            .filter(|&s| self.restarts_slot(s))
            .filter(|&s| {
                let slot = self.slots.get(s as usize);
                match slot.and_then(|sl| sl.spec.as_ref()) {
                    None => true,
                    Some(spec) if *spec != self.target => true,
                    Some(_) => self
                        .serving(s)
                        .is_some_and(|i| self.instances[i].id < floor),
                }
            })
            .collect()
    }

    /// Whether the rollout in flight (if any) is about this slot: every
    /// slot, but for `restart N`.
    fn restarts_slot(&self, slot: u32) -> bool {
        match self.rollout.as_ref().map(|r| &r.kind) {
            Some(Kind::RestartInstance { slot: s, .. }) => *s == slot,
            _ => true,
        }
    }

    /// The serving instance of a slot (possibly an exited record).
    fn serving(&self, slot: u32) -> Option<usize> {
        self.instances
            .iter()
            .position(|i| i.slot == slot && i.role == Role::Serving)
    }

    /// Whether the batch in flight is replacing this slot: then the rollout,
    /// not the restart policy, decides what runs there.
    fn in_batch(&self, slot: u32) -> bool {
        self.batch()
            .is_some_and(|b| b.phase != Phase::Retiring && b.slots.contains(&slot))
            || self
                .instances
                .iter()
                .any(|i| i.slot == slot && i.role == Role::Candidate)
    }

    fn step_rollout(&mut self) -> bool {
        let Some(r) = &self.rollout else {
            return false;
        };
        if let Some(batch) = &r.batch {
            let retired = batch.retiring.iter().all(|id| self.gone(*id));
            return match batch.phase {
                Phase::Starting => self.check_candidates(),
                // Both other phases wait for the old instances to be gone.
                _ if !retired => false,
                Phase::RetireFirst => {
                    self.start_candidates();
                    true
                }
                Phase::Retiring => {
                    self.finish_batch();
                    true
                }
            };
        }
        if !self.waiting.is_empty() {
            return false;
        }
        // A pause holds the batches still to come; once the batch in
        // flight was the last, there is nothing to hold, and the rollout
        // is complete (resume would have nothing to do).
        if r.paused && !self.nothing_left() {
            return false;
        }
        if let Some(t) = r.pause_until {
            if self.now < t {
                return false;
            }
        }
        if let Some(r) = &mut self.rollout {
            r.pause_until = None;
        }
        self.next_batch()
    }

    /// Whether the rollout has no slot left to replace and no instance
    /// beyond `replicas` to stop: its next step completes it.
    fn nothing_left(&self) -> bool {
        let n = self.target.manifest.replicas;
        self.todo().is_empty()
            && self.slots.len() >= n as usize
            && !self
                .instances
                .iter()
                .any(|i| i.slot >= n && i.role == Role::Serving)
    }

    /// Starts the next batch, or completes the rollout; false if it must
    /// wait (a stop-first batch, for the rest of the service to be ready).
    fn next_batch(&mut self) -> bool {
        let m = self.target.manifest.clone();
        let n = m.replicas;
        if self.slots.len() < n as usize {
            self.slots.resize_with(n as usize, Slot::empty);
        }
        let mut todo = self.todo();
        let Some(r) = &self.rollout else { return false };
        let kind = r.kind.clone();
        let done = r.batches_done;
        if todo.is_empty() {
            let extras: Vec<usize> = (0..self.instances.len())
                .filter(|&i| {
                    let inst = &self.instances[i];
                    inst.slot >= n && inst.role == Role::Serving
                })
                .collect();
            if extras.is_empty() {
                self.slots.truncate(n as usize);
                self.complete();
                return true;
            }
            let ids: Vec<InstanceId> = extras.iter().map(|&i| self.instances[i].id).collect();
            let numbers: Vec<u32> = extras.iter().map(|&i| self.instances[i].number).collect();
            for i in extras {
                self.retire(i);
            }
            self.event(format!(
                "stopping {} (beyond replicas {n})",
                instance_list(&numbers)
            ));
            self.set_batch(Batch {
                number: done + 1,
                total: done + 1,
                slots: Vec::new(),
                candidates: Vec::new(),
                retiring: ids,
                phase: Phase::Retiring,
                canary: false,
            });
            return true;
        }
        // A deployment or a scaling only fills slots: nothing to replace.
        let fills = matches!(kind, Kind::Create | Kind::Scale);
        let all_at_once = fills || m.update == Strategy::Replace;
        // A new version's first batch is its canary: `update_canary`
        // instances, while no slot runs it yet.
        let canary =
            kind == Kind::Apply && !all_at_once && m.update_canary > 0 && todo.len() == n as usize;
        let size = if all_at_once {
            todo.len()
        } else if canary {
            m.update_canary as usize
        } else {
            m.update_batch as usize
        };
        let total = if canary {
            let rest = todo.len().saturating_sub(size);
            done + 1 + rest.div_ceil(m.update_batch as usize) as u32
        } else {
            done + todo.len().div_ceil(size) as u32
        };
        let stop_first = self.stop_first() && !fills;
        if stop_first {
            // Slots that serve nothing go first: replacing them costs no
            // capacity.
            todo.sort_by_key(|&s| self.slot_ready(s));
        }
        let slots: Vec<u32> = todo.into_iter().take(size).collect();
        if stop_first {
            match self.may_take_out(&slots, done + 1, total) {
                TakeOut::Go => {}
                TakeOut::Wait => return false,
                // The failure (or the automatic rollback it began) is the change.
                TakeOut::Failed => return true,
            }
        }
        if let Some(r) = &mut self.rollout {
            r.held_since = None;
        }
        let mut batch = Batch {
            number: done + 1,
            total,
            slots,
            candidates: Vec::new(),
            retiring: Vec::new(),
            phase: Phase::Starting,
            canary,
        };
        if stop_first || (m.update == Strategy::Replace && !fills) {
            // Stop the batch's old instances, and any beyond replicas, first:
            // every one still alive there, including one a failed batch
            // started or one replaced over memory_max still serving.
            let old: Vec<usize> = (0..self.instances.len())
                .filter(|&i| {
                    let inst = &self.instances[i];
                    inst.live()
                        && inst.role != Role::Candidate
                        && (batch.slots.contains(&inst.slot) || inst.slot >= n)
                })
                .collect();
            batch.retiring = old.iter().map(|&i| self.instances[i].id).collect();
            batch.phase = Phase::RetireFirst;
            let numbers: Vec<u32> = old.iter().map(|&i| self.instances[i].number).collect();
            for i in old {
                self.retire(i);
            }
            // Slots with nothing alive in them start their instances at
            // once (at the next step).
            if !numbers.is_empty() {
                self.event(format!(
                    "{}stopping {} before starting {}",
                    batch.prefix(),
                    instance_list(&numbers),
                    if numbers.len() == 1 {
                        "its replacement"
                    } else {
                        "their replacements"
                    }
                ));
            }
            self.set_batch(batch);
        } else {
            // What a cancelled batch left on its way out goes first where
            // the slot must be clear: a scaling of `replace` starts no new
            // instance beside a stopping one of another version.
            let mut blocking: Vec<InstanceId> = batch
                .slots
                .iter()
                .flat_map(|&s| self.blocking(s, &self.target).map(|i| i.id))
                .collect();
            blocking.sort_unstable();
            blocking.dedup();
            if blocking.is_empty() {
                self.set_batch(batch);
                self.start_candidates();
            } else {
                batch.retiring = blocking;
                batch.phase = Phase::RetireFirst;
                self.set_batch(batch);
            }
        }
        true
    }

    /// Whether a stop-first batch of `slots` may stop their old instances
    /// now: not while it would take a ready instance out and another slot
    /// has none (a crash, a rollback in the middle of a batch), so that at
    /// least `replicas - update_batch` stay ready. It waits for that up to
    /// `health_deadline`, then the rollout fails.
    fn may_take_out(&mut self, slots: &[u32], number: u32, total: u32) -> TakeOut {
        let takes_ready = slots.iter().any(|&s| self.slot_ready(s));
        let missing: Vec<String> = self
            .unready_slots(slots)
            .iter()
            .map(u32::to_string)
            .collect();
        if !takes_ready || missing.is_empty() {
            return TakeOut::Go;
        }
        let (now, deadline) = (self.now, self.target.manifest.health_deadline);
        let Some(r) = &mut self.rollout else {
            return TakeOut::Wait;
        };
        let first = r.held_since.is_none();
        let since = *r.held_since.get_or_insert(now);
        let what = format!(
            "slot{} {} {} no ready instance",
            plural(&missing),
            missing.join(", "),
            if missing.len() == 1 { "has" } else { "have" }
        );
        if now >= since + deadline {
            self.fail(format!(
                "batch {number}/{total} waited health_deadline {} for the rest of the service to be ready ({what}); update_order stop-first takes no ready instance out meanwhile",
                format_duration(deadline)
            ));
            return TakeOut::Failed;
        }
        if first {
            self.event(format!(
                "batch {number}/{total} waits: {what}, and stop-first takes no ready instance out meanwhile"
            ));
        }
        TakeOut::Wait
    }

    fn set_batch(&mut self, batch: Batch) {
        if let Some(r) = &mut self.rollout {
            r.batch = Some(batch);
        }
    }

    fn batch(&self) -> Option<&Batch> {
        self.rollout.as_ref().and_then(|r| r.batch.as_ref())
    }

    fn batch_mut(&mut self) -> Option<&mut Batch> {
        self.rollout.as_mut().and_then(|r| r.batch.as_mut())
    }

    fn start_candidates(&mut self) {
        let Some(batch) = self.batch() else { return };
        let slots = batch.slots.clone();
        let prefix = batch.prefix();
        let spec = self.target.clone();
        let mut ids = Vec::new();
        let mut numbers = Vec::new();
        for slot in slots {
            let i = self.spawn(slot, spec.clone(), Role::Candidate);
            ids.push(self.instances[i].id);
            numbers.push(self.instances[i].number);
        }
        if let Some(b) = self.batch_mut() {
            b.candidates = ids;
            b.phase = Phase::Starting;
        }
        self.event(format!(
            "{prefix}starting {} ({})",
            instance_list(&numbers),
            spec.version
        ));
    }

    /// Fails the rollout on a dead or late candidate; commits the batch when
    /// every candidate is ready.
    fn check_candidates(&mut self) -> bool {
        let Some(batch) = self.batch() else {
            return false;
        };
        let mut all_ready = true;
        for id in batch.candidates.clone() {
            let Some(i) = self.find(id) else {
                self.fail(format!("instance {id} vanished while starting"));
                return true;
            };
            let inst = &self.instances[i];
            if let Some(exit) = &inst.exit {
                let reason = match exit {
                    // Not the new version's fault: the reason says whose.
                    Exit::Short(why) => {
                        format!("deployd could not start instance {}: {why}", inst.number)
                    }
                    exit => format!(
                        "instance {} exited while starting ({exit}; {})",
                        inst.number,
                        inst.last_probe()
                    ),
                };
                self.fail(reason);
                return true;
            }
            if !inst.eligible(self.now) {
                all_ready = false;
                if self.now >= inst.deadline() {
                    let m = &inst.spec.manifest;
                    let what = if inst.state == State::Healthy && !m.ready_after().is_zero() {
                        format!(
                            "did not stay healthy for min_healthy {}",
                            format_duration(m.ready_after())
                        )
                    } else {
                        "not healthy".to_string()
                    };
                    let reason = format!(
                        "instance {} {what} within health_deadline {} ({})",
                        inst.number,
                        format_duration(m.health_deadline),
                        inst.last_probe()
                    );
                    // What it printed, then the failure (as after an exit).
                    self.show_output(id, inst.number);
                    self.fail(reason);
                    return true;
                }
            }
        }
        if all_ready {
            self.commit();
            return true;
        }
        false
    }

    fn commit(&mut self) {
        let Some(batch) = self.batch().cloned() else {
            return;
        };
        let mut routed_in = Vec::new();
        let mut routed_out = Vec::new();
        let mut retiring = Vec::new();
        for (slot, cand) in batch.slots.iter().zip(&batch.candidates) {
            let Some(c) = self.find(*cand) else { continue };
            // New capacity goes in before old capacity goes out.
            self.instances[c].role = Role::Serving;
            self.route_in(c);
            routed_in.push(self.instances[c].number);
            if let Some(old) = self
                .instances
                .iter()
                .position(|i| i.slot == *slot && i.role == Role::Serving && i.id != *cand)
            {
                if self.instances[old].live() {
                    routed_out.push(self.instances[old].number);
                    retiring.push(self.instances[old].id);
                    self.retire(old);
                } else {
                    self.instances[old].role = Role::Retiring;
                }
            }
            let target = self.target.clone();
            if let Some(s) = self.slots.get_mut(*slot as usize) {
                *s = Slot {
                    spec: Some(target),
                    ..Slot::empty()
                };
            }
        }
        let prefix = batch.prefix();
        let mut msg = format!("{prefix}routed in {}", instance_list(&routed_in));
        if !routed_out.is_empty() {
            msg += &format!("; routed out {}", instance_list(&routed_out));
        }
        self.event(msg);
        if retiring.is_empty() {
            self.finish_batch();
        } else if let Some(b) = self.batch_mut() {
            b.retiring = retiring;
            b.phase = Phase::Retiring;
        }
    }

    fn finish_batch(&mut self) {
        let more = !self.todo().is_empty();
        let Some(r) = &mut self.rollout else { return };
        let Some(batch) = r.batch.take() else { return };
        r.batches_done += 1;
        let pause = self.target.manifest.update_pause;
        if batch.canary && more {
            r.paused = true;
        }
        let paused = r.paused;
        if more && !pause.is_zero() {
            r.pause_until = Some(self.now + pause);
        }
        if batch.total > 1 && batch.number <= batch.total && !batch.slots.is_empty() {
            let (k, n) = self.progress();
            let next = if !more {
                String::new()
            } else if paused {
                "; paused".to_string()
            } else if !pause.is_zero() {
                format!("; next in {}", format_duration(pause))
            } else {
                String::new()
            };
            self.event(format!(
                "batch {}/{} done ({k}/{n}){next}",
                batch.number, batch.total
            ));
        } else if paused && more {
            self.event("paused".into());
        }
        if batch.canary && more {
            let (k, n) = self.progress();
            self.event(format!(
                "canary: {k} of {n} instances at {} and ready; paused: resume rolls out the rest, rollback undoes it",
                self.target.version
            ));
        }
    }

    fn complete(&mut self) {
        let Some(r) = self.rollout.take() else { return };
        let took = format_secs(self.now.since(r.started_at));
        let v = self.target.version;
        let noun = r.kind.noun(self.target.manifest.update);
        self.event(format!("{noun} complete: at {v} ({took})"));
        self.failure = None;
        self.outcome = match r.kind {
            Kind::AutoRollback(reason) => Outcome::Failed(format!("{reason}; rolled back to {v}")),
            _ => Outcome::Done(v),
        };
    }

    fn fail(&mut self, reason: String) {
        let Some(r) = &self.rollout else { return };
        let noun = r.kind.noun(self.target.manifest.update);
        self.event(format!("{noun} failed: {reason}"));
        self.cancel_batch();
        let Some(r) = self.rollout.take() else { return };
        let auto = self.target.manifest.auto_rollback
            && matches!(r.kind, Kind::Apply | Kind::Scale)
            && self.previous.is_some();
        match r.kind {
            Kind::AutoRollback(first) => {
                let reason = format!("automatic rollback failed: {reason} (after: {first})");
                self.failure = Some(reason.clone());
                self.outcome = Outcome::Failed(reason);
            }
            _ if auto => {
                if let Some(prev) = self.previous.clone() {
                    let from = self.target.version;
                    let old = std::mem::replace(&mut self.target, prev);
                    self.previous = Some(old);
                    self.begin(Kind::AutoRollback(reason), Some(from));
                }
            }
            _ => {
                self.failure = Some(reason.clone());
                self.outcome = Outcome::Failed(reason);
            }
        }
    }

    /// Stops the candidates of the batch in flight; the old instances they
    /// were to replace stay.
    fn cancel_batch(&mut self) {
        let Some(batch) = self.batch_mut().and_then(|b| {
            if b.phase == Phase::Starting {
                Some(std::mem::take(&mut b.candidates))
            } else {
                None
            }
        }) else {
            return;
        };
        for id in batch {
            if let Some(i) = self.find(id) {
                if self.instances[i].role == Role::Candidate {
                    self.retire(i);
                }
            }
        }
        if let Some(r) = &mut self.rollout {
            r.batch = None;
        }
    }

    // ---- instances ----

    fn find(&self, id: InstanceId) -> Option<usize> {
        self.instances.iter().position(|i| i.id == id)
    }

    fn gone(&self, id: InstanceId) -> bool {
        self.find(id)
            .is_none_or(|i| self.instances[i].state == State::Exited)
    }

    fn number_used(&self, n: u32) -> bool {
        self.instances.iter().any(|i| i.number == n)
    }

    /// The slot's own number if free, else the first free one above every slot.
    fn free_number(&self, slot: u32) -> u32 {
        if !self.number_used(slot) {
            return slot;
        }
        let mut n = (self.slots.len() as u32).max(self.target.manifest.replicas);
        while self.number_used(n) {
            n += 1;
        }
        n
    }

    fn spawn(&mut self, slot: u32, spec: Spec, role: Role) -> usize {
        let id = InstanceId(self.next_id);
        self.next_id += 1;
        let number = self.free_number(slot);
        self.instances.push(Instance::new(
            id,
            slot,
            number,
            spec.clone(),
            role,
            self.now,
        ));
        self.out.push(Action::Start { id, slot, spec });
        self.instances.len() - 1
    }

    fn set(&mut self, i: usize, to: State) {
        if let Err(e) = self.instances[i].set_state(to) {
            // An illegal transition is a bug; it is reported, not fatal.
            self.event(format!("internal: {e}"));
        }
    }

    fn route_in(&mut self, i: usize) {
        if self.instances[i].state == State::Healthy {
            self.set(i, State::Ready);
            self.instances[i].ready_since = Some(self.now);
            let id = self.instances[i].id;
            self.out.push(Action::RouteIn { id });
        }
    }

    fn stop_now(&mut self, i: usize) {
        let inst = &self.instances[i];
        let (id, number) = (inst.id, inst.number);
        let m = inst.spec.manifest.clone();
        self.set(i, State::Stopping);
        self.out.push(Action::Stop {
            id,
            signal: m.stop_signal,
            timeout: m.stop_timeout,
        });
        // Its process may not be started yet (the spawning thread has not
        // said): then the signal waits for it, and the events say so
        // rather than showing "stopping" before "started".
        let when = if self.instances[i].pid.is_none() {
            " once started"
        } else {
            ""
        };
        self.event(format!(
            "instance {number} stopping ({}){when}",
            m.stop_signal.name()
        ));
    }

    /// Takes an instance out of service: drain it if it had traffic, then stop it.
    fn retire(&mut self, i: usize) {
        self.instances[i].role = Role::Retiring;
        match self.instances[i].state {
            State::Ready | State::Unhealthy => {
                let id = self.instances[i].id;
                if self.instances[i].state == State::Ready {
                    self.out.push(Action::RouteOut { id });
                }
                self.set(i, State::Draining);
                let drain = self.instances[i].spec.manifest.drain;
                self.instances[i].drain_until = Some(self.now + drain);
            }
            State::Starting | State::Healthy => self.stop_now(i),
            State::Draining | State::Stopping | State::Exited => {}
        }
    }

    fn started(&mut self, id: InstanceId, pid: u32) {
        let Some(i) = self.find(id) else { return };
        let inst = &mut self.instances[i];
        inst.pid = Some(pid);
        let number = inst.number;
        let healthy_now = inst.state == State::Starting
            && inst.spec.manifest.health == crate::manifest::Health::None;
        self.event(format!("instance {number} started (pid {pid})"));
        if healthy_now {
            self.probed(id, Ok(()));
        }
    }

    fn probed(&mut self, id: InstanceId, result: Result<(), String>) {
        let Some(i) = self.find(id) else { return };
        let was_ready = self.instances[i].state == State::Ready;
        let effect = self.instances[i].probe(self.now, result);
        let inst = &self.instances[i];
        let number = inst.number;
        match effect {
            ProbeEffect::Nothing => {}
            ProbeEffect::BecameHealthy => {
                let age = format_secs(inst.age(self.now));
                self.event(format!("instance {number} healthy ({age})"));
            }
            ProbeEffect::BecameUnhealthy => {
                let retries = inst.spec.manifest.health_retries;
                let why = inst.last_probe();
                let policy = inst.spec.manifest.restart;
                let role = inst.role;
                if was_ready {
                    let id = inst.id;
                    self.out.push(Action::RouteOut { id });
                }
                let what = if role == Role::Serving && policy != RestartPolicy::Never && was_ready {
                    "; replacing it"
                } else if was_ready {
                    "; routed out"
                } else {
                    ""
                };
                self.event(format!(
                    "instance {number} unhealthy after {retries} failed probe{} ({why}){what}",
                    if retries == 1 { "" } else { "s" }
                ));
                if was_ready {
                    self.show_output(id, number);
                }
                if role == Role::Serving && policy != RestartPolicy::Never && was_ready {
                    let slot = self.instances[i].slot;
                    self.retire(i);
                    self.schedule_restart(slot, None);
                }
            }
        }
    }

    /// A ready instance over its `memory_max` is replaced with surge, as a
    /// rolling restart of its slot alone: it becomes retiring but stays
    /// ready and routed in, its slot starts a fresh instance (after the
    /// slot's restart backoff), and only once that one is ready is the old
    /// one routed out, drained and stopped ([`Service::step_instances`]).
    /// If the fresh one fails, the old one goes on serving while the slot
    /// retries. With `restart never` it is only drained and stopped; under
    /// stop-first (no room for one more) it is drained and stopped before
    /// the slot starts again.
    ///
    /// One slot at a time: while another slot has no ready serving
    /// instance, the sample is ignored and a later one decides, so a leak
    /// that reaches every replica at once neither doubles the memory of all
    /// of them nor takes them down together. Candidates and slots in a
    /// rollout's batch are left to the rollout, which replaces them anyway.
    fn over_memory(&mut self, id: InstanceId, rss: u64) {
        let Some(i) = self.find(id) else { return };
        let inst = &self.instances[i];
        let Some(limit) = inst.spec.manifest.memory_max else {
            return;
        };
        let (slot, number, policy) = (inst.slot, inst.number, inst.spec.manifest.restart);
        if self.stopped
            || rss <= limit
            || inst.state != State::Ready
            || inst.role != Role::Serving
            || self.in_batch(slot)
        {
            return;
        }
        if !self.unready_slots(&[slot]).is_empty() {
            return;
        }
        let ready_since = inst.ready_since;
        let replace = policy != RestartPolicy::Never;
        let stop_first = self.stop_first();
        self.event(format!(
            "instance {number} uses {} of memory, over memory_max {}; {}",
            format_bytes(rss),
            crate::manifest::format_size(limit),
            if !replace {
                format!("stopping it, not replaced (restart {})", policy.name())
            } else if stop_first {
                "replacing it (stop-first: stopping it before its replacement starts)".to_string()
            } else {
                "replacing it (it serves until its replacement is ready)".to_string()
            }
        ));
        if replace && stop_first {
            self.retire(i);
            self.schedule_restart(slot, ready_since);
        } else if replace {
            // Ready and retiring: routed in until the slot has a ready
            // serving instance again.
            self.instances[i].role = Role::Retiring;
            self.schedule_restart(slot, ready_since);
        } else {
            self.retire(i);
            if let Some(s) = self.slots.get_mut(slot as usize) {
                s.hold = true;
            }
        }
    }

    /// The slots below `replicas`, but for `except`, with no ready serving
    /// instance.
    fn unready_slots(&self, except: &[u32]) -> Vec<u32> {
        (0..self.target.manifest.replicas)
            .filter(|s| !except.contains(s) && !self.slot_ready(*s))
            .collect()
    }

    /// Whether the service never runs more than `replicas` instances
    /// (`update_order stop-first`): then nothing starts in a slot until
    /// whatever ran there is gone, rollout or not.
    fn stop_first(&self) -> bool {
        let m = &self.target.manifest;
        m.update == Strategy::Rolling && m.update_order == UpdateOrder::StopFirst
    }

    /// Whether `slot` may start an instance of `spec` now: not while an
    /// instance on its way out must be gone first. Under stop-first, one
    /// in the same slot; under `replace` (which never runs two versions at
    /// once), one of another version anywhere: the new ones of a failed
    /// rollout stop before the old version starts again. A change of
    /// replicas alone is no other version. Waiting is bounded by that
    /// instance's `drain` and `stop_timeout`. Nor, under `replace`, while
    /// another version serves: slots whose versions differ (deployd
    /// restarted in the middle of a rollout) start one version, and the
    /// rollout, once resumed, the rest.
    fn slot_clear(&self, slot: u32, spec: &Spec) -> bool {
        let replace = self.target.manifest.update == Strategy::Replace;
        let other_serves = || {
            self.instances.iter().any(|i| {
                i.live()
                    && i.role == Role::Serving
                    && !i.spec.manifest.same_but_replicas(&spec.manifest)
            })
        };
        self.blocking(slot, spec).next().is_none() && !(replace && other_serves())
    }

    /// The instances on their way out that keep `slot` from starting an
    /// instance of `spec` (see [`Service::slot_clear`]).
    fn blocking<'a>(&'a self, slot: u32, spec: &'a Spec) -> impl Iterator<Item = &'a Instance> {
        let stop_first = self.stop_first();
        let replace = self.target.manifest.update == Strategy::Replace;
        self.instances.iter().filter(move |i| {
            i.live()
                && i.role != Role::Serving
                && ((stop_first && i.slot == slot)
                    || (replace && !i.spec.manifest.same_but_replicas(&spec.manifest)))
        })
    }

    /// Whether `slot` has a serving instance that is ready.
    fn slot_ready(&self, slot: u32) -> bool {
        self.instances
            .iter()
            .any(|j| j.slot == slot && j.role == Role::Serving && j.state == State::Ready)
    }

    fn exited(&mut self, id: InstanceId, exit: Exit) {
        let Some(i) = self.find(id) else { return };
        let was = self.instances[i].state;
        if was == State::Exited {
            return;
        }
        if was == State::Ready {
            self.out.push(Action::RouteOut { id });
        }
        self.set(i, State::Exited);
        let inst = &mut self.instances[i];
        inst.exit = Some(exit.clone());
        let (number, slot, role) = (inst.number, inst.slot, inst.role);
        let ready_since = inst.ready_since;
        match role {
            Role::Retiring => {
                self.event(format!("instance {number} stopped ({exit})"));
            }
            Role::Candidate => {
                self.event(format!("instance {number} exited ({exit})"));
            }
            Role::Serving => {
                let policy = self.instances[i].spec.manifest.restart;
                let restart = match policy {
                    RestartPolicy::Always => true,
                    RestartPolicy::OnFailure => !exit.success(),
                    RestartPolicy::Never => false,
                };
                if self.stopped || self.in_batch(slot) {
                    self.event(format!("instance {number} exited ({exit})"));
                } else if let Exit::Short(why) = &exit {
                    // deployd's shortage, not the instance's failure: no
                    // backoff, no restart counted.
                    if let Some(s) = self.slots.get_mut(slot as usize) {
                        s.restart_at = Some(self.now + SHORT_RETRY);
                    }
                    self.event(format!(
                        "instance {number} could not be started: {why}; trying again in {} \
                         (not counted against it)",
                        format_secs(SHORT_RETRY)
                    ));
                } else if restart {
                    let delay = self.schedule_restart(slot, ready_since);
                    self.event(format!(
                        "instance {number} exited unexpectedly ({exit}); restarting in {}",
                        format_secs(delay)
                    ));
                } else {
                    if let Some(s) = self.slots.get_mut(slot as usize) {
                        s.hold = true;
                    }
                    self.event(format!(
                        "instance {number} exited ({exit}); not restarted (restart {})",
                        policy.name()
                    ));
                }
            }
        }
        // Not asked to stop, it may have said why; a process that never
        // started said nothing.
        if role != Role::Retiring && !matches!(exit, Exit::SpawnFailed(_) | Exit::Short(_)) {
            self.show_output(id, number);
        }
    }

    /// Asks for the last lines an instance printed, as events.
    fn show_output(&mut self, id: InstanceId, number: u32) {
        let prefix = format!("instance {number} printed");
        self.out.push(Action::Output { id, prefix });
    }

    /// Schedules the restart of a slot with exponential backoff; returns the delay.
    fn schedule_restart(&mut self, slot: u32, ready_since: Option<Instant>) -> Duration {
        let now = self.now;
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return Duration::ZERO;
        };
        if ready_since.is_some_and(|t| now.since(t) >= BACKOFF_RESET) {
            s.failures = 0;
        }
        s.failures = s.failures.saturating_add(1);
        s.restarts = s.restarts.saturating_add(1);
        let shift = (s.failures - 1).min(16);
        let delay = BACKOFF_BASE.saturating_mul(1 << shift).min(BACKOFF_MAX);
        s.restart_at = Some(now + delay);
        delay
    }

    /// Timers of single instances: drains that ended, serving instances that
    /// became ready, steady-state instances past their deadline; and the
    /// removal of exited records that nothing refers to.
    fn step_instances(&mut self) -> bool {
        let mut changed = false;
        let now = self.now;
        for i in 0..self.instances.len() {
            let inst = &self.instances[i];
            match inst.state {
                State::Draining if inst.drained || inst.drain_until.is_some_and(|t| now >= t) => {
                    self.stop_now(i);
                    changed = true;
                }
                // Replaced over memory_max (the only way to be ready and
                // retiring): it goes once its slot serves again, or when the
                // slot itself goes (a stop retires it with the rest).
                State::Ready
                    if inst.role == Role::Retiring
                        && (self.slot_ready(inst.slot)
                            || inst.slot >= self.target.manifest.replicas) =>
                {
                    let number = inst.number;
                    self.retire(i);
                    self.event(format!("instance {number} routed out: replaced"));
                    changed = true;
                }
                State::Healthy if inst.role == Role::Serving && inst.eligible(now) => {
                    let number = inst.number;
                    self.route_in(i);
                    self.event(format!("instance {number} routed in"));
                    changed = true;
                }
                State::Starting | State::Healthy
                    if inst.role == Role::Serving
                        && !inst.deadline_reported
                        && now >= inst.deadline() =>
                {
                    let m = inst.spec.manifest.clone();
                    let (number, slot) = (inst.number, inst.slot);
                    let why = inst.last_probe();
                    self.instances[i].deadline_reported = true;
                    let replace = m.restart != RestartPolicy::Never;
                    self.event(format!(
                        "instance {number} not healthy within health_deadline {} ({why}){}",
                        format_duration(m.health_deadline),
                        if replace { "; replacing it" } else { "" }
                    ));
                    if replace {
                        self.retire(i);
                        self.schedule_restart(slot, None);
                    }
                    changed = true;
                }
                _ => {}
            }
        }
        let batch_ids: Vec<InstanceId> = self
            .batch()
            .map(|b| b.candidates.iter().chain(&b.retiring).copied().collect())
            .unwrap_or_default();
        let before = self.instances.len();
        self.instances.retain(|i| {
            i.state != State::Exited || batch_ids.contains(&i.id) || (i.role == Role::Serving)
        });
        // A serving record that exited stays visible until its slot is
        // filled again or is gone.
        let slots = &self.slots;
        let n = self.target.manifest.replicas;
        let removing = self.removing;
        self.instances.retain(|i| {
            !(i.state == State::Exited
                && i.role == Role::Serving
                && (removing || i.slot >= n.max(slots.len() as u32)))
        });
        if self.instances.len() != before {
            changed = true;
            self.renumber();
        }
        changed
    }

    /// Gives each instance its slot's number once that number is free; not
    /// one on its way out (a failed candidate still stopping), which would
    /// take the number from the instance that serves the slot.
    fn renumber(&mut self) {
        for i in 0..self.instances.len() {
            let inst = &self.instances[i];
            let (number, slot) = (inst.number, inst.slot);
            if number != slot && inst.role != Role::Retiring && !self.number_used(slot) {
                self.instances[i].number = slot;
                self.event(format!("instance {number} is now instance {slot}"));
            }
        }
    }

    /// Steady state: every committed slot that has no live instance gets one,
    /// once its backoff allows.
    fn step_slots(&mut self) -> bool {
        if self.stopped || !self.waiting.is_empty() {
            return false;
        }
        let mut changed = false;
        let n = self.target.manifest.replicas;
        for s in 0..self.slots.len() as u32 {
            let slot = &self.slots[s as usize];
            let Some(spec) = slot.spec.clone() else {
                continue;
            };
            // Slots beyond replicas are on their way out, never restarted,
            // unless the rollout that was to take them out failed: then
            // they are the old version's, kept serving as it was.
            let leaving = s >= n && self.failure.is_none();
            if leaving || slot.hold || slot.restart_at.is_some_and(|t| self.now < t) {
                continue;
            }
            let live = self
                .instances
                .iter()
                .any(|i| i.slot == s && i.role == Role::Serving && i.live());
            if live || self.in_batch(s) || !self.slot_clear(s, &spec) {
                continue;
            }
            // The exited record gives way to its replacement.
            self.instances
                .retain(|i| !(i.slot == s && i.role == Role::Serving));
            self.slots[s as usize].restart_at = None;
            self.spawn(s, spec, Role::Serving);
            changed = true;
        }
        changed
    }

    /// Takes every decision the current state calls for, until none is left.
    fn drive(&mut self) {
        for _ in 0..64 {
            let mut changed = self.step_instances();
            changed |= self.step_rollout();
            changed |= self.step_slots();
            if !changed {
                return;
            }
        }
        self.event("internal: the state machine did not settle".into());
    }

    fn event(&mut self, msg: String) {
        self.out.push(Action::Event(msg));
    }
}

/// The slots of a record, each with its committed version's manifest.
fn recorded_slots(record: &Record, resolve: impl Fn(Version) -> Option<Spec>) -> Vec<Slot> {
    record
        .slots
        .iter()
        .enumerate()
        .map(|(i, v)| Slot {
            spec: v.and_then(&resolve),
            restarts: record.restarts.get(i).copied().unwrap_or(0),
            ..Slot::empty()
        })
        .collect()
}

/// "instance 1", "instances 0, 2": instance numbers as events say them.
pub fn instance_list<T: std::fmt::Display>(numbers: &[T]) -> String {
    let list: Vec<String> = numbers.iter().map(T::to_string).collect();
    format!("instance{} {}", plural(numbers), list.join(", "))
}

fn plural<T>(items: &[T]) -> &'static str {
    if items.len() == 1 { "" } else { "s" }
}

/// "612.4M": bytes in MiB, to a tenth.
fn format_bytes(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / (1u64 << 20) as f64)
}

/// "2.1s"
pub fn format_secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests;
