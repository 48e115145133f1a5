//! What a host decides about its own instances, sans I/O.
//!
//! The leader assigns; the host carries out. The caller (deployd's
//! runtime on each host) feeds the assignments etcd holds for this host
//! and what happened to each instance (started, probed, exited) and
//! carries out what comes back ([`Do`]): start, stop, signal, and the
//! [`Status`] to write for the leader. A serving instance that ends is
//! started again here, in place, by its restart policy and with the same
//! backoff as on one host: that needs no leader, and goes on while etcd
//! is away.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::manifest::{RestartPolicy, Signal};
use crate::name::ServiceName;
use crate::rollout::{
    BACKOFF_BASE, BACKOFF_MAX, BACKOFF_RESET, Exit, InstanceId, Instant, SHORT_RETRY, Spec,
};

use super::{Assignment, Status};

/// A process started for an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// Its pid.
    pub pid: u32,
    /// Its `$PORT`.
    pub port: Option<u16>,
    /// A digest of its env files' variables.
    pub env: String,
}

/// What happened, as the host saw it.
#[derive(Debug, Clone)]
pub enum Event {
    /// The assignment of an instance to this host was written, or
    /// deleted (`None`).
    Assigned {
        /// The service.
        service: ServiceName,
        /// The instance.
        id: InstanceId,
        /// The assignment.
        assignment: Option<Assignment>,
    },
    /// Its process started, or could not be.
    Spawned {
        /// The service.
        service: ServiceName,
        /// The instance.
        id: InstanceId,
        /// The process, or how it ended before it began.
        result: Result<Started, Exit>,
    },
    /// Its process ended.
    Exited {
        /// The service.
        service: ServiceName,
        /// The instance.
        id: InstanceId,
        /// How.
        exit: Exit,
        /// The last lines it printed.
        lines: Vec<String>,
    },
    /// A probe's result.
    Probe {
        /// The service.
        service: ServiceName,
        /// The instance.
        id: InstanceId,
        /// Why it failed, if it did.
        result: Result<(), String>,
        /// On a failure, the last lines it printed.
        lines: Vec<String>,
    },
    /// A sample of its memory over its `memory_high` (resident bytes).
    OverMemory {
        /// The service.
        service: ServiceName,
        /// The instance.
        id: InstanceId,
        /// Its processes' resident memory.
        rss: u64,
    },
    /// Every host has let go of this routed-out instance
    /// ([`super::LetGo::released`]): one assigned to `retire` stops now.
    Released {
        /// The service.
        service: ServiceName,
        /// The instance.
        id: InstanceId,
    },
    /// Time passed.
    Tick,
}

/// What the host must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Do {
    /// Start a process for the instance; feed `Spawned`.
    Spawn {
        /// The service.
        service: ServiceName,
        /// The instance.
        id: InstanceId,
        /// Its slot (`$INSTANCE`).
        slot: u32,
        /// What it runs.
        spec: Spec,
    },
    /// Stop its process: `signal`, SIGKILL after `timeout`; feed `Exited`.
    Stop {
        /// The service.
        service: ServiceName,
        /// The instance.
        id: InstanceId,
        /// The signal.
        signal: Signal,
        /// Time before SIGKILL.
        timeout: Duration,
    },
    /// Send a signal to its process group.
    Signal {
        /// The service.
        service: ServiceName,
        /// The instance.
        id: InstanceId,
        /// The signal.
        signal: Signal,
    },
    /// Write its status for the leader; `None`: delete it (the instance
    /// is forgotten).
    Report {
        /// The service.
        service: ServiceName,
        /// The instance.
        id: InstanceId,
        /// The status.
        status: Option<Status>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Asked to start; `Spawned` not yet heard.
    Starting,
    /// Its process runs.
    Running(u32),
    /// Ended; started again in place at this instant.
    Backoff(Instant),
    /// Asked to stop; `Exited` not yet heard.
    Stopping,
    /// Ended for good (stopped, or left so by its restart policy).
    Ended,
}

/// One instance of this host.
#[derive(Debug, Clone)]
struct Local {
    assign: Assignment,
    /// Its assignment is gone: stopped, then forgotten.
    gone: bool,
    run: Run,
    status: Status,
    reported: Option<Status>,
    /// Unexpected exits in a row, for the backoff.
    failures: u32,
    ok_since: Option<Instant>,
    signals_sent: u64,
    /// Its probes have passed since it was (re)started.
    ever_ok: bool,
    /// Failed probes of a starting instance are told at most once per
    /// [`QUIET`]: not until then.
    quiet_until: Option<Instant>,
}

/// While an instance has not passed a probe yet, its failures (a server
/// still starting refuses connections) are told the leader at most this
/// often: they matter only for the reason a missed deadline gives.
pub const QUIET: Duration = Duration::from_secs(1);

/// The host's decisions. See the module documentation.
#[derive(Debug)]
pub struct Agent {
    boot: u64,
    insts: BTreeMap<(ServiceName, InstanceId), Local>,
    out: Vec<Do>,
    now: Instant,
}

impl Agent {
    /// An agent of the deployd that started at `boot` (ms since the Unix
    /// epoch, in every status it writes).
    pub fn new(boot: u64) -> Agent {
        Agent {
            boot,
            insts: BTreeMap::new(),
            out: Vec::new(),
            now: Instant::default(),
        }
    }

    /// The instances it runs or is starting, with their assignments.
    pub fn instances(&self) -> impl Iterator<Item = (&ServiceName, InstanceId, &Assignment)> {
        self.insts
            .iter()
            .filter(|(_, l)| matches!(l.run, Run::Starting | Run::Running(_) | Run::Backoff(_)))
            .map(|((s, id), l)| (s, *id, &l.assign))
    }

    /// The running instances assigned to `retire`: each stops once every
    /// host has let go of it.
    pub fn retiring(&self) -> impl Iterator<Item = (&ServiceName, InstanceId)> {
        self.insts
            .iter()
            .filter(|(_, l)| l.assign.retire && !l.assign.stop && matches!(l.run, Run::Running(_)))
            .map(|((s, id), _)| (s, *id))
    }

    /// Whether it has this instance (running or not).
    pub fn has(&self, service: &ServiceName, id: InstanceId) -> bool {
        self.insts.contains_key(&(service.clone(), id))
    }

    /// Reports every status again at the next event (its lease was lost,
    /// and what it wrote under it with it).
    pub fn report_again(&mut self) {
        for l in self.insts.values_mut() {
            l.reported = None;
        }
    }

    /// When it next needs [`Event::Tick`].
    pub fn next_deadline(&self) -> Option<Instant> {
        self.insts
            .values()
            .flat_map(|l| {
                let backoff = match l.run {
                    Run::Backoff(t) => Some(t),
                    _ => None,
                };
                backoff.into_iter().chain(l.quiet_until)
            })
            .min()
    }

    /// Takes one event at `now`; returns what to do, in order.
    pub fn handle(&mut self, now: Instant, event: Event) -> Vec<Do> {
        self.now = self.now.max(now);
        match event {
            Event::Assigned {
                service,
                id,
                assignment,
            } => match assignment {
                Some(a) => self.assigned(service, id, a),
                None => self.unassigned(service, id),
            },
            Event::Spawned {
                service,
                id,
                result,
            } => match result {
                Ok(started) => self.spawned(service, id, started),
                Err(exit) => self.exited(service, id, exit, Vec::new()),
            },
            Event::Exited {
                service,
                id,
                exit,
                lines,
            } => self.exited(service, id, exit, lines),
            Event::Probe {
                service,
                id,
                result,
                lines,
            } => self.probed(service, id, result, lines),
            Event::OverMemory { service, id, rss } => {
                if let Some(l) = self.insts.get_mut(&(service, id)) {
                    if let Run::Running(_) = l.run {
                        let n = l.status.over.map_or(0, |(n, _)| n);
                        l.status.over = Some((n + 1, rss));
                    }
                }
            }
            Event::Released { service, id } => {
                let retire = self
                    .insts
                    .get(&(service.clone(), id))
                    .is_some_and(|l| l.assign.retire);
                if retire {
                    self.stop(&service, id);
                }
            }
            Event::Tick => {
                let due: Vec<(ServiceName, InstanceId)> = self
                    .insts
                    .iter()
                    .filter(|(_, l)| matches!(l.run, Run::Backoff(t) if t <= self.now))
                    .map(|(k, _)| k.clone())
                    .collect();
                for (service, id) in due {
                    self.spawn(&service, id);
                }
            }
        }
        self.report();
        std::mem::take(&mut self.out)
    }

    fn assigned(&mut self, service: ServiceName, id: InstanceId, a: Assignment) {
        let key = (service.clone(), id);
        let Some(l) = self.insts.get_mut(&key) else {
            let signals_sent = a.signal.map_or(0, |(n, _)| n);
            let stop = a.stop;
            self.insts.insert(
                key,
                Local {
                    assign: a,
                    gone: false,
                    run: Run::Ended,
                    status: Status {
                        boot: self.boot,
                        ..Status::default()
                    },
                    reported: None,
                    failures: 0,
                    ok_since: None,
                    signals_sent,
                    ever_ok: false,
                    quiet_until: None,
                },
            );
            if stop {
                // Stopped before it was ever started here.
                if let Some(l) = self.insts.get_mut(&(service, id)) {
                    l.status.exit = Some(Exit::SpawnFailed("stopped before it started".into()));
                }
            } else {
                self.spawn(&service, id);
            }
            return;
        };
        l.assign = a;
        if let Some((n, signal)) = l.assign.signal {
            if n > l.signals_sent {
                l.signals_sent = n;
                if let Run::Running(_) = l.run {
                    self.out.push(Do::Signal {
                        service: service.clone(),
                        id,
                        signal,
                    });
                }
            }
        }
        if l.assign.stop {
            self.stop(&service, id);
        }
    }

    fn unassigned(&mut self, service: ServiceName, id: InstanceId) {
        let key = (service.clone(), id);
        let Some(l) = self.insts.get_mut(&key) else {
            return;
        };
        l.gone = true;
        match l.run {
            Run::Running(_) => self.stop(&service, id),
            Run::Starting | Run::Stopping => {}
            Run::Backoff(_) | Run::Ended => {
                self.insts.remove(&key);
                self.out.push(Do::Report {
                    service,
                    id,
                    status: None,
                });
            }
        }
    }

    fn spawned(&mut self, service: ServiceName, id: InstanceId, started: Started) {
        let key = (service.clone(), id);
        let Some(l) = self.insts.get_mut(&key) else {
            return;
        };
        l.run = Run::Running(started.pid);
        l.status.pid = Some(started.pid);
        l.status.port = started.port;
        l.status.env = started.env;
        if l.gone || l.assign.stop {
            self.stop(&service, id);
        }
    }

    fn stop(&mut self, service: &ServiceName, id: InstanceId) {
        let Some(l) = self.insts.get_mut(&(service.clone(), id)) else {
            return;
        };
        match l.run {
            Run::Running(_) => {
                l.run = Run::Stopping;
                let m = &l.assign.spec.manifest;
                self.out.push(Do::Stop {
                    service: service.clone(),
                    id,
                    signal: m.stop_signal,
                    timeout: m.stop_timeout,
                });
            }
            Run::Backoff(_) => {
                // Nothing runs: it ended as it last did.
                l.run = Run::Ended;
                l.status.exit = Some(l.status.last_exit.clone().unwrap_or(Exit::Code(0)));
            }
            Run::Starting | Run::Stopping | Run::Ended => {}
        }
    }

    fn exited(&mut self, service: ServiceName, id: InstanceId, exit: Exit, lines: Vec<String>) {
        let key = (service.clone(), id);
        let now = self.now;
        let Some(l) = self.insts.get_mut(&key) else {
            return;
        };
        if l.gone {
            self.insts.remove(&key);
            self.out.push(Do::Report {
                service,
                id,
                status: None,
            });
            return;
        }
        l.status.pid = None;
        l.status.ok = false;
        if !lines.is_empty() {
            l.status.lines = lines;
        }
        let m = &l.assign.spec.manifest;
        let again = match m.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !exit.success(),
            RestartPolicy::Never => false,
        };
        let stopping = l.assign.stop || l.run == Run::Stopping;
        if let Exit::Short(_) = exit {
            if !stopping {
                // deployd's shortage, not the instance's: tried again,
                // counted as nothing.
                l.run = Run::Backoff(now + SHORT_RETRY);
                return;
            }
        }
        if stopping || !l.assign.serving || !again {
            l.run = Run::Ended;
            l.status.exit = Some(exit);
            return;
        }
        if l.ok_since.is_some_and(|t| now.since(t) >= BACKOFF_RESET) {
            l.failures = 0;
        }
        let delay = BACKOFF_BASE
            .saturating_mul(1u32 << l.failures.min(16))
            .min(BACKOFF_MAX);
        l.failures += 1;
        l.ok_since = None;
        l.status.restarts += 1;
        l.status.last_exit = Some(exit);
        l.run = Run::Backoff(now + delay);
    }

    fn probed(
        &mut self,
        service: ServiceName,
        id: InstanceId,
        result: Result<(), String>,
        lines: Vec<String>,
    ) {
        let now = self.now;
        let Some(l) = self.insts.get_mut(&(service, id)) else {
            return;
        };
        if !matches!(l.run, Run::Running(_)) {
            return;
        }
        match result {
            Ok(()) => {
                if !l.status.ok {
                    l.status.ok = true;
                    l.ok_since = Some(now);
                }
                l.ever_ok = true;
                l.quiet_until = None;
            }
            Err(e) => {
                if !l.ever_ok && l.quiet_until.is_none() {
                    l.quiet_until = Some(now + QUIET);
                }
                l.status.ok = false;
                l.ok_since = None;
                l.status.fails += 1;
                l.status.error = Some(e);
                if !lines.is_empty() {
                    l.status.lines = lines;
                }
            }
        }
    }

    fn spawn(&mut self, service: &ServiceName, id: InstanceId) {
        let Some(l) = self.insts.get_mut(&(service.clone(), id)) else {
            return;
        };
        l.run = Run::Starting;
        l.status.pid = None;
        l.status.ok = false;
        l.ever_ok = false;
        l.quiet_until = None;
        self.out.push(Do::Spawn {
            service: service.clone(),
            id,
            slot: l.assign.slot,
            spec: l.assign.spec.clone(),
        });
    }

    /// A report for each status that changed.
    fn report(&mut self) {
        let now = self.now;
        for ((service, id), l) in &mut self.insts {
            if let Some(t) = l.quiet_until {
                if now < t {
                    // A starting instance's failures wait (see QUIET);
                    // anything else goes now, with them.
                    let failures_only = l.reported.as_ref().is_some_and(|r| {
                        Status {
                            fails: r.fails,
                            error: r.error.clone(),
                            lines: r.lines.clone(),
                            ..l.status.clone()
                        } == *r
                    });
                    if failures_only {
                        continue;
                    }
                } else {
                    l.quiet_until = None;
                }
            }
            // Nothing to say before it has a process or an end.
            let news = l.reported.is_some() || l.status.pid.is_some() || l.status.exit.is_some();
            if news && l.reported.as_ref() != Some(&l.status) {
                l.reported = Some(l.status.clone());
                self.out.push(Do::Report {
                    service: service.clone(),
                    id: *id,
                    status: Some(l.status.clone()),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;

    fn assignment() -> Assignment {
        let m = Manifest::new("app");
        let text = m.canonical();
        Assignment {
            slot: 0,
            number: 0,
            spec: Spec::new(m, text),
            serving: true,
            stop: false,
            retire: false,
            signal: None,
        }
    }

    /// An instance assigned to `retire` stops when it is released; one
    /// that is not keeps running (the leader's `stop` alone ends it).
    #[test]
    fn a_released_instance_stops_only_if_assigned_to_retire() {
        let svc = ServiceName::new("web").unwrap();
        let t0 = Instant::from_epoch(Duration::from_secs(100));
        let mut a = Agent::new(7);
        for (n, retire) in [(1, true), (2, false)] {
            let id = InstanceId(n);
            a.handle(
                t0,
                Event::Assigned {
                    service: svc.clone(),
                    id,
                    assignment: Some(assignment()),
                },
            );
            let started = Started {
                pid: 40 + n as u32,
                port: Some(5000),
                env: String::new(),
            };
            a.handle(
                t0,
                Event::Spawned {
                    service: svc.clone(),
                    id,
                    result: Ok(started),
                },
            );
            let assignment = Assignment {
                retire,
                serving: false,
                ..assignment()
            };
            let todo = a.handle(
                t0,
                Event::Assigned {
                    service: svc.clone(),
                    id,
                    assignment: Some(assignment),
                },
            );
            assert!(
                !todo.iter().any(|d| matches!(d, Do::Stop { .. })),
                "{todo:?}"
            );
        }
        let retiring: Vec<InstanceId> = a.retiring().map(|(_, id)| id).collect();
        assert_eq!(retiring, [InstanceId(1)]);
        for n in [1, 2] {
            let todo = a.handle(
                t0,
                Event::Released {
                    service: svc.clone(),
                    id: InstanceId(n),
                },
            );
            let stops = todo.iter().filter(|d| matches!(d, Do::Stop { .. })).count();
            assert_eq!(stops, usize::from(n == 1), "instance {n}: {todo:?}");
        }
        // Stopping: no longer waiting to be released.
        assert_eq!(a.retiring().count(), 0);
    }

    fn reports(todo: &[Do]) -> Vec<Status> {
        todo.iter()
            .filter_map(|d| match d {
                Do::Report { status, .. } => status.clone(),
                _ => None,
            })
            .collect()
    }

    /// A starting instance's refused connections are told the leader once
    /// a second at most; its first passing probe at once.
    #[test]
    fn a_starting_instances_failures_are_told_at_most_once_per_quiet() {
        let svc = ServiceName::new("web").unwrap();
        let id = InstanceId(1);
        let mut a = Agent::new(7);
        let t0 = Instant::from_epoch(Duration::from_secs(100));
        let ms = |n| t0 + Duration::from_millis(n);
        let todo = a.handle(
            t0,
            Event::Assigned {
                service: svc.clone(),
                id,
                assignment: Some(assignment()),
            },
        );
        assert!(matches!(todo[..], [Do::Spawn { .. }]), "{todo:?}");
        let started = Started {
            pid: 42,
            port: Some(5000),
            env: String::new(),
        };
        let todo = a.handle(
            ms(5),
            Event::Spawned {
                service: svc.clone(),
                id,
                result: Ok(started),
            },
        );
        assert_eq!(reports(&todo)[0].pid, Some(42));
        let fail = || Event::Probe {
            service: svc.clone(),
            id,
            result: Err("connection refused".into()),
            lines: vec![],
        };
        for n in [10, 15, 20, 500] {
            assert!(reports(&a.handle(ms(n), fail())).is_empty(), "{n}");
        }
        assert_eq!(a.next_deadline(), Some(ms(10) + QUIET));
        let told = reports(&a.handle(ms(1010), Event::Tick));
        assert_eq!(told.len(), 1);
        assert_eq!(told[0].fails, 4);
        assert_eq!(told[0].error.as_deref(), Some("connection refused"));
        let ok = a.handle(
            ms(1020),
            Event::Probe {
                service: svc.clone(),
                id,
                result: Ok(()),
                lines: vec![],
            },
        );
        assert!(reports(&ok)[0].ok);
        // Once it has passed, a failure is told at once.
        assert_eq!(reports(&a.handle(ms(1030), fail())).len(), 1);
    }
}
