//! One instance as the state machine sees it: its lifecycle [`State`], its
//! [`Role`] in the service, and the health bookkeeping that turns probe
//! results into healthy and unhealthy.
//!
//! Lifecycle changes go through [`Instance::set_state`], which checks them
//! against [`ALLOWED`]; an illegal one is refused and reported, never a panic.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Instant, Spec};

/// An instance's identity for its whole life; never reused by a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceId(pub u64);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum State {
    /// Launched, not yet healthy.
    Starting,
    /// Healthy, not receiving traffic: waiting out `min_healthy` or its batch.
    Healthy,
    /// Healthy and routed in.
    Ready,
    /// Failed `health_retries` probes in a row after being healthy; routed out.
    Unhealthy,
    /// Routed out, letting its open requests finish.
    Draining,
    /// Sent its stop signal.
    Stopping,
    /// Its process is gone.
    Exited,
}

impl State {
    /// The name shown in `instances/N/state`.
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Healthy => "healthy",
            State::Ready => "ready",
            State::Unhealthy => "unhealthy",
            State::Draining => "draining",
            State::Stopping => "stopping",
            State::Exited => "exited",
        }
    }
}

/// Every legal lifecycle change.
pub const ALLOWED: &[(State, State)] = &[
    (State::Starting, State::Healthy),
    (State::Starting, State::Stopping),
    (State::Starting, State::Exited),
    (State::Healthy, State::Ready),
    (State::Healthy, State::Starting),
    (State::Healthy, State::Stopping),
    (State::Healthy, State::Exited),
    (State::Ready, State::Unhealthy),
    (State::Ready, State::Draining),
    (State::Ready, State::Exited),
    (State::Unhealthy, State::Healthy),
    (State::Unhealthy, State::Draining),
    (State::Unhealthy, State::Stopping),
    (State::Unhealthy, State::Exited),
    (State::Draining, State::Stopping),
    (State::Draining, State::Exited),
    (State::Stopping, State::Exited),
    // Its process restarted in place by the host that runs it (a cluster
    // host restarts a crashed instance itself): healthy again only once
    // its probes say so.
    (State::Ready, State::Starting),
    (State::Unhealthy, State::Starting),
];

/// What an instance is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// The instance of its slot.
    Serving,
    /// A new instance of the batch in flight, not yet committed.
    Candidate,
    /// On its way out.
    Retiring,
}

impl Role {
    /// The name shown in views.
    pub fn name(self) -> &'static str {
        match self {
            Role::Serving => "serving",
            Role::Candidate => "candidate",
            Role::Retiring => "retiring",
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// The kernel killed it (SIGKILL) for using more memory than its
    /// `memory_max` lets its cgroup have.
    OutOfMemory,
    /// It could not be started at all.
    SpawnFailed(String),
    /// deployd could not start it for a shortage of its own (descriptors,
    /// memory, processes): what it is short of. Not the instance's doing:
    /// it is started again after [`SHORT_RETRY`](super::SHORT_RETRY),
    /// counted as no failure and no restart.
    Short(String),
    /// It ran on a host that was lost (its lease expired): the host's
    /// name. Not the instance's doing: its slot is started again at once,
    /// elsewhere, whatever its restart policy; a candidate is started
    /// again in its batch.
    Lost(String),
}

impl Exit {
    /// Whether this counts as success for `restart on-failure`.
    pub fn success(&self) -> bool {
        *self == Exit::Code(0)
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit status {c}"),
            Exit::Signal(s) => match crate::manifest::Signal::ALL
                .iter()
                .find(|(sig, _)| sig.number() == *s)
            {
                Some((_, name)) => write!(f, "killed by SIG{name}"),
                None => write!(f, "killed by signal {s}"),
            },
            Exit::OutOfMemory => {
                f.write_str("killed by the kernel: out of memory, over its memory_max")
            }
            Exit::SpawnFailed(e) => write!(f, "could not start: {e}"),
            Exit::Short(e) => write!(f, "not started: {e}"),
            Exit::Lost(host) => write!(f, "lost with host {host}"),
        }
    }
}

/// What a probe result changed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ProbeEffect {
    Nothing,
    BecameHealthy,
    /// Was healthy (maybe routed in), failed `health_retries` probes in a row.
    BecameUnhealthy,
}

/// One instance of a service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    pub(crate) id: InstanceId,
    pub(crate) slot: u32,
    pub(crate) number: u32,
    pub(crate) spec: Spec,
    pub(crate) state: State,
    pub(crate) role: Role,
    pub(crate) pid: Option<u32>,
    pub(crate) started_at: Instant,
    pub(crate) healthy_since: Option<Instant>,
    pub(crate) ready_since: Option<Instant>,
    pub(crate) failures: u32,
    pub(crate) last_error: Option<String>,
    pub(crate) drain_until: Option<Instant>,
    pub(crate) drained: bool,
    pub(crate) exit: Option<Exit>,
    /// A steady-state instance that missed its deadline was reported once.
    pub(crate) deadline_reported: bool,
    /// The host it runs on, in a cluster ([`super::Input::Placed`]).
    #[serde(default)]
    pub(crate) host: Option<String>,
}

impl Instance {
    pub(crate) fn new(
        id: InstanceId,
        slot: u32,
        number: u32,
        spec: Spec,
        role: Role,
        now: Instant,
    ) -> Instance {
        Instance {
            id,
            slot,
            number,
            spec,
            state: State::Starting,
            role,
            pid: None,
            started_at: now,
            healthy_since: None,
            ready_since: None,
            failures: 0,
            last_error: None,
            drain_until: None,
            drained: false,
            exit: None,
            deadline_reported: false,
            host: None,
        }
    }

    /// The instance's identity.
    pub fn id(&self) -> InstanceId {
        self.id
    }
    /// The slot it fills: the number it ends up with, and its `$INSTANCE`.
    pub fn slot(&self) -> u32 {
        self.slot
    }
    /// Its number in the namespace (`instances/N`).
    pub fn number(&self) -> u32 {
        self.number
    }
    /// The version it runs.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }
    /// Its lifecycle state.
    pub fn state(&self) -> State {
        self.state
    }
    /// Its role.
    pub fn role(&self) -> Role {
        self.role
    }
    /// Its process id, once started.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }
    /// How its process ended, if it did.
    pub fn exit(&self) -> Option<&Exit> {
        self.exit.as_ref()
    }
    /// The last failed probe's result.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
    /// The host it runs on, in a cluster.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// `instance N`, and `on HOST` in a cluster: how failures name it.
    pub(crate) fn named(&self) -> String {
        match &self.host {
            Some(h) => format!("instance {} on {h}", self.number),
            None => format!("instance {}", self.number),
        }
    }

    /// Moves every instant it holds by `f` (see [`super::Service::rebase`]).
    pub(crate) fn rebase(&mut self, f: &dyn Fn(Instant) -> Instant) {
        self.started_at = f(self.started_at);
        self.healthy_since = self.healthy_since.map(f);
        self.ready_since = self.ready_since.map(f);
        self.drain_until = self.drain_until.map(f);
    }

    /// Changes the lifecycle state if [`ALLOWED`]; returns whether it did.
    pub(crate) fn set_state(&mut self, to: State) -> Result<(), String> {
        if self.state == to {
            return Ok(());
        }
        if ALLOWED.contains(&(self.state, to)) {
            self.state = to;
            Ok(())
        } else {
            Err(format!(
                "instance {} ({}): illegal transition {} -> {}",
                self.number,
                self.id,
                self.state.name(),
                to.name()
            ))
        }
    }

    /// Whether it is alive and not on its way out.
    pub(crate) fn live(&self) -> bool {
        !matches!(self.state, State::Exited)
    }

    /// Whether it is healthy (routed in or not).
    pub fn is_healthy(&self) -> bool {
        matches!(self.state, State::Healthy | State::Ready)
    }

    /// Healthy for `min_healthy` without a break (see
    /// [`Manifest::ready_after`](crate::manifest::Manifest::ready_after)):
    /// may be routed in.
    pub(crate) fn eligible(&self, now: Instant) -> bool {
        match (self.state, self.healthy_since) {
            (State::Ready, _) => true,
            (State::Healthy, Some(since)) => now >= since + self.spec.manifest.ready_after(),
            _ => false,
        }
    }

    /// When it must be ready by.
    pub(crate) fn deadline(&self) -> Instant {
        self.started_at + self.spec.manifest.health_deadline
    }

    /// Whether probe failures are still inside `health_grace`.
    fn in_grace(&self, now: Instant) -> bool {
        now < self.started_at + self.spec.manifest.health_grace
    }

    /// Takes one probe result.
    pub(crate) fn probe(&mut self, now: Instant, result: Result<(), String>) -> ProbeEffect {
        match (self.state, result) {
            (State::Starting | State::Unhealthy, Ok(())) => {
                self.failures = 0;
                self.healthy_since = Some(now);
                let _ = self.set_state(State::Healthy);
                ProbeEffect::BecameHealthy
            }
            (State::Healthy | State::Ready, Ok(())) => {
                self.failures = 0;
                ProbeEffect::Nothing
            }
            (State::Starting | State::Unhealthy, Err(e)) => {
                self.last_error = Some(e);
                ProbeEffect::Nothing
            }
            (State::Healthy | State::Ready, Err(e)) => {
                self.last_error = Some(e);
                if self.in_grace(now) {
                    return ProbeEffect::Nothing;
                }
                self.failures += 1;
                if self.failures < self.spec.manifest.health_retries {
                    return ProbeEffect::Nothing;
                }
                self.failures = 0;
                self.healthy_since = None;
                self.ready_since = None;
                let to = if self.state == State::Ready {
                    State::Unhealthy
                } else {
                    State::Starting
                };
                let _ = self.set_state(to);
                ProbeEffect::BecameUnhealthy
            }
            _ => ProbeEffect::Nothing,
        }
    }

    /// "(last probe: connection refused)", or empty.
    pub(crate) fn last_probe(&self) -> String {
        match &self.last_error {
            Some(e) => format!("last probe: {e}"),
            None => "no failed probe".to_string(),
        }
    }

    /// Time since start, for events.
    pub(crate) fn age(&self, now: Instant) -> Duration {
        now.since(self.started_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_can_reach_exited_and_exited_is_final() {
        for s in [
            State::Starting,
            State::Healthy,
            State::Ready,
            State::Unhealthy,
            State::Draining,
            State::Stopping,
        ] {
            assert!(ALLOWED.contains(&(s, State::Exited)), "{s:?}");
        }
        assert!(!ALLOWED.iter().any(|(from, _)| *from == State::Exited));
    }

    #[test]
    fn only_ready_instances_leave_through_drain_or_unhealthy() {
        // Traffic can only be on a Ready instance, so only Ready (and an
        // Unhealthy one, already routed out) go to Draining.
        for (from, to) in ALLOWED {
            if *to == State::Draining {
                assert!(matches!(from, State::Ready | State::Unhealthy));
            }
            if *to == State::Ready {
                assert_eq!(*from, State::Healthy);
            }
        }
    }
}
