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
//! `memory_high` turns retiring while it stays ready and routed in: its slot
//! starts a fresh instance, and the old one drains once that one is ready.
//!
//! Decisions are taken by [`Service::drive`] from the whole state after every
//! input, never from the input alone, so a late or repeated input cannot
//! derail the machine.
//!
//! # Files
//!
//! This file holds the types and the creation and restoration of a
//! machine; `views.rs` what it shows; `commands.rs` the commands,
//! `batches.rs` the rollouts a batch at a time (canaries, `update_watch`),
//! `supervise.rs` the instances themselves and [`Service::drive`],
//! `instance.rs` an instance's states and transitions; `plan.rs` what a
//! command would do, on a copy.

mod batches;
mod commands;
mod instance;
mod plan;
mod supervise;
pub mod tally;
mod views;

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
pub use plan::{Plan, is_step, plan};
pub use tally::{Ended, Tally};

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
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash, Serialize, Deserialize,
)]
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

/// A spec is saved as its text, and read back by parsing it.
impl Serialize for Spec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Spec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Spec, D::Error> {
        let text = String::deserialize(d)?;
        if let Some(spec) = read_back::get(&text) {
            return Ok(spec);
        }
        let m = crate::manifest::parse(text.as_bytes()).map_err(|e| {
            let first = e.first().map(|d| d.message.clone()).unwrap_or_default();
            serde::de::Error::custom(format!("a saved manifest does not parse: {first}"))
        })?;
        let spec = Spec::new(m, text);
        read_back::keep(&spec);
        Ok(spec)
    }
}

/// The specs read back lately, by text. A machine's snapshot holds its
/// target's and each instance's, most of them the same text, and a host of
/// a cluster reads one at every round of the leader: each text is parsed
/// once, not once per instance per round.
mod read_back {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use super::Spec;

    /// Kept at most; past it the cache starts again empty.
    const MOST: usize = 256;

    static SPECS: Mutex<Option<HashMap<Arc<str>, Spec>>> = Mutex::new(None);

    pub(super) fn get(text: &str) -> Option<Spec> {
        let specs = SPECS.lock().unwrap_or_else(|e| e.into_inner());
        specs.as_ref()?.get(text).cloned()
    }

    pub(super) fn keep(spec: &Spec) {
        let mut specs = SPECS.lock().unwrap_or_else(|e| e.into_inner());
        let specs = specs.get_or_insert_with(HashMap::new);
        if specs.len() >= MOST {
            specs.clear();
        }
        specs.insert(spec.text.clone(), spec.clone());
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
    /// Go on with a rollout held at its canary.
    Promote,
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
    /// The process of a serving instance ended unexpectedly and the host
    /// that runs it started it again in place (a cluster host restarts a
    /// crashed instance itself, leader or none): it is routed out until
    /// its probes pass again; `Started` follows with its new pid.
    Restarted {
        /// Which instance.
        id: InstanceId,
        /// How its process ended.
        exit: Exit,
    },
    /// The process of an instance ended (or never started).
    Exited {
        /// Which instance.
        id: InstanceId,
        /// How.
        exit: Exit,
    },
    /// A hook ended: `Ok` if it exited 0, else what happened.
    Hook {
        /// Which.
        hook: Hook,
        /// How it went.
        result: Result<(), String>,
    },
    /// An instance routed out has no request or connection left.
    Drained {
        /// Which instance.
        id: InstanceId,
    },
    /// An instance's processes hold more resident memory than its
    /// `memory_high`: the caller samples it and reports each sample over.
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
    /// In a cluster: the host an instance was placed on, named from then
    /// on in what the machine says of it (`instance 3 on h2`).
    Placed {
        /// Which instance.
        id: InstanceId,
        /// Its host.
        host: String,
    },
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
    /// Run a hook (`before_deploy`, `after_deploy`) through `/bin/sh -c`
    /// with the service's environment and `env`, killed after `timeout`;
    /// report [`Input::Hook`].
    Hook {
        /// Which.
        hook: Hook,
        /// The command line.
        command: String,
        /// `VERSION`, `PREVIOUS_VERSION`.
        env: Vec<(String, String)>,
        /// `hook_timeout`.
        timeout: Duration,
    },
}

/// A hook of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Hook {
    /// `before_deploy`.
    Before,
    /// `after_deploy`.
    After,
}

impl Hook {
    /// The directive's name.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Before => "before_deploy",
            Hook::After => "after_deploy",
        }
    }
}

/// Why a command was refused. A refused command changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The class of refusal, which the namespace maps to an errno.
    pub kind: RefusalKind,
    /// A sentence for the user.
    pub message: String,
}

/// Classes of refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// In a cluster: etcd, or a leader, cannot be reached now (`EAGAIN`);
    /// nothing was changed.
    Unavailable,
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
    /// A rollout is held after its canaries, for `promote` (or
    /// `update_canary_auto`).
    Canary,
    /// A new version is in place and watched for `update_watch`.
    Watching,
    /// The last rollout failed.
    Failed,
}

impl UpdateStatus {
    /// Whether a rollout is under way (rolling, or held).
    pub fn in_rollout(self) -> bool {
        matches!(
            self,
            UpdateStatus::Rolling
                | UpdateStatus::Paused
                | UpdateStatus::Canary
                | UpdateStatus::Watching
        )
    }

    /// The word shown in `update_status`.
    pub fn name(self) -> &'static str {
        match self {
            UpdateStatus::None => "none",
            UpdateStatus::Rolling => "rolling",
            UpdateStatus::Paused => "paused",
            UpdateStatus::Canary => "canary",
            UpdateStatus::Watching => "watching",
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

#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Phase {
    /// `update replace`: the slots' old instances are being stopped first.
    RetireFirst,
    /// Candidates are starting.
    Starting,
    /// Committed; the old instances are draining and stopping.
    Retiring,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Held after its canaries (`paused` is set too).
    #[serde(default)]
    canary: Option<Canary>,
    /// In place, and watched for `update_watch`.
    #[serde(default)]
    watch: Option<Watch>,
    /// A hook running: (which, since when); nothing moves meanwhile.
    #[serde(default)]
    hook: Option<(Hook, Instant)>,
    /// `after_deploy` ran and passed.
    #[serde(default)]
    after_done: bool,
}

/// A new version in place, watched.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Watch {
    /// When its rollout completed.
    since: Instant,
    /// Every slot, and its restarts then.
    slots: Vec<(u32, u32)>,
}

/// A rollout held after its canaries.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Canary {
    /// When they were all ready and routed in.
    since: Instant,
    /// Their slots, and the restarts of each slot then.
    slots: Vec<(u32, u32)>,
    /// `update_canary_auto` was tried (it promotes once, or says why not).
    tried: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// How its rollouts ended since deployd started.
    #[serde(default)]
    tally: Tally,
    now: Instant,
    #[serde(skip)]
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
                canary: None,
                watch: None,
                hook: None,
                after_done: false,
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
            tally: Tally::default(),
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
            Input::Restarted { id, exit } => {
                self.restarted(id, exit);
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
            Input::Placed { id, host } => {
                if let Some(i) = self.find(id) {
                    self.instances[i].host = Some(host);
                }
                Ok(String::new())
            }
            Input::Tick => Ok(String::new()),
            Input::Hook { hook, result } => {
                self.hook_done(hook, result);
                Ok(String::new())
            }
        };
        if result.is_ok() {
            self.drive();
        }
        Handled {
            result,
            actions: std::mem::take(&mut self.out),
        }
    }

    /// Moves every instant the machine holds by `f`: a machine saved by
    /// one process and restored by another, whose clock has another
    /// epoch, keeps its deadlines where they were in real time.
    pub fn rebase(&mut self, f: impl Fn(Instant) -> Instant) {
        let f: &dyn Fn(Instant) -> Instant = &f;
        self.now = f(self.now);
        for inst in &mut self.instances {
            inst.rebase(f);
        }
        for slot in &mut self.slots {
            slot.restart_at = slot.restart_at.map(f);
        }
        if let Some(r) = &mut self.rollout {
            r.started_at = f(r.started_at);
            r.pause_until = r.pause_until.map(f);
            r.held_since = r.held_since.map(f);
            if let Some(c) = &mut r.canary {
                c.since = f(c.since);
            }
            if let Some(w) = &mut r.watch {
                w.since = f(w.since);
            }
            if let Some((_, t)) = &mut r.hook {
                *t = f(*t);
            }
        }
    }

    /// The instant of the last input: where a saved machine's clock was.
    pub fn now(&self) -> Instant {
        self.now
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
        if let Some(t) = self.canary_auto_at() {
            at(t);
        }
        if let Some(w) = self.rollout.as_ref().and_then(|r| r.watch.as_ref()) {
            at(w.since + self.target.manifest.update_watch);
        }
        next
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
