//! `plan`: what a command would do, told by the machine itself. A copy of
//! the service's machine takes the command in a world where everything
//! goes as well and as fast as it can: a process starts at once and passes
//! its first probe, a routed-out instance has nothing in flight, a stopped
//! one exits at once. The events the copy writes are the plan; its clock
//! at the end is the least the rollout can take (pauses, `min_healthy`,
//! `health none`'s second, the canary's hold, but no start-up time of the
//! program itself). Nothing of the real service changes.

use std::collections::{BTreeSet, VecDeque};

use crate::manifest::Health;

use super::*;

/// What a command would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// `rolling`, `replace`, `scale-only`, `restart`, `rollback`,
    /// `env restart` or `no-op`.
    pub kind: &'static str,
    /// The machine's answer to the command.
    pub answer: String,
    /// The steps, as the events will say them (without the instances'
    /// own lines: started, healthy, stopped).
    pub steps: Vec<String>,
    /// The least time it takes.
    pub least: Duration,
    /// Where the copy stopped: `none VERSION`, `canary VERSION` (held for
    /// `promote`), `paused VERSION`, or `failed: REASON`.
    pub end: String,
}

impl Plan {
    /// The plan as `deploy plan` prints it.
    pub fn render(&self, service: &str) -> String {
        if self.kind == "no-op" {
            return format!("{service}: no-op ({})\n", self.answer);
        }
        let mut out = format!("{service}: {}\n", self.kind);
        for s in &self.steps {
            out.push_str("  ");
            out.push_str(s);
            out.push('\n');
        }
        let end = match self.end.split_once(' ') {
            Some(("canary", v)) => format!("held at its canary at {v}: promote goes on"),
            Some(("paused", v)) => format!("paused at {v}"),
            Some(("none", v)) => format!("at {v}"),
            _ => self.end.clone(),
        };
        out.push_str(&format!(
            "{service}: takes at least {} (then {end})\n",
            format_secs(self.least)
        ));
        out
    }
}

/// Steps beyond which a plan is cut short (a rollout of 1,000 instances
/// takes a few thousand).
const MAX_STEPS: usize = 200_000;

/// What `command` would do to `svc` from `now`; the refusal it would get.
pub fn plan(svc: &Service, now: Instant, command: Command) -> Result<Plan, Refusal> {
    let mut m = svc.clone();
    m.out.clear();
    let before = m.rollout.as_ref().map(|r| r.started_at);
    let handled = m.handle(now, Input::Command(command));
    let answer = handled.result?;
    // The rollout the command started, if it started one.
    let started = m
        .rollout
        .as_ref()
        .filter(|r| Some(r.started_at) != before || before.is_none())
        .map(|r| r.kind.clone());
    let kind = match &started {
        None => "no-op",
        Some(Kind::Create) => "create",
        Some(Kind::Scale) => "scale-only",
        Some(Kind::Restart) | Some(Kind::RestartInstance { .. }) => "restart",
        Some(Kind::Rollback) | Some(Kind::AutoRollback(_)) => "rollback",
        Some(_) => match m.target.manifest.update {
            Strategy::Rolling => "rolling",
            Strategy::Replace => "replace",
        },
    };
    let mut world = World {
        now,
        queue: VecDeque::new(),
        timers: Vec::new(),
        probing: BTreeSet::new(),
        steps: Vec::new(),
    };
    world.act(&m, handled.actions);
    let mut steps = 0;
    loop {
        steps += 1;
        if steps > MAX_STEPS {
            world.steps.push("… (cut short)".into());
            break;
        }
        if let Some(input) = world.queue.pop_front() {
            let h = m.handle(world.now, input);
            world.act(&m, h.actions);
            continue;
        }
        if m.wait_line().is_some() && world.timers.is_empty() {
            break;
        }
        // Next: a probe due or the machine's own deadline.
        let timer = world.timers.iter().map(|(t, _)| *t).min();
        let next = match (timer, m.next_deadline()) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => break,
        };
        world.now = world.now.max(next);
        let due: Vec<InstanceId> = world
            .timers
            .iter()
            .filter(|(t, _)| *t <= world.now)
            .map(|(_, id)| *id)
            .collect();
        world.timers.retain(|(t, _)| *t > world.now);
        for id in due {
            world.queue.push_back(Input::Probe { id, result: Ok(()) });
        }
        if world.queue.is_empty() {
            let h = m.handle(world.now, Input::Tick);
            world.act(&m, h.actions);
        }
    }
    Ok(Plan {
        kind,
        answer,
        least: world.now.since(now),
        end: m.wait_line().unwrap_or_else(|| "cut short".into()),
        steps: world.steps,
    })
}

/// The world the copy runs in.
struct World {
    now: Instant,
    /// Inputs for the copy, in order, all at `now`.
    queue: VecDeque<Input>,
    /// Probes due: (when, instance).
    timers: Vec<(Instant, InstanceId)>,
    /// Instances started and not yet ready: probed every `health_interval`.
    probing: BTreeSet<InstanceId>,
    steps: Vec<String>,
}

impl World {
    fn act(&mut self, m: &Service, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Start { id, spec, .. } => {
                    self.queue.push_back(Input::Started { id, pid: 0 });
                    // `health none`: ready once it has run a while, which
                    // the machine times itself.
                    if spec.manifest.health != Health::None {
                        self.probing.insert(id);
                        self.timers.push((self.now, id));
                    }
                }
                Action::Stop { id, .. } => {
                    self.probing.remove(&id);
                    self.timers.retain(|(_, i)| *i != id);
                    self.queue.push_back(Input::Exited {
                        id,
                        exit: Exit::Signal(15),
                    });
                }
                Action::RouteOut { id } => self.queue.push_back(Input::Drained { id }),
                Action::Event(line) => {
                    if is_step(&line) {
                        self.steps.push(line);
                    }
                }
                Action::Hook { hook, .. } => self.queue.push_back(Input::Hook {
                    hook,
                    result: Ok(()),
                }),
                Action::Signal { .. } | Action::RouteIn { .. } | Action::Output { .. } => {}
            }
        }
        // Probes go on until an instance is ready.
        let ready: Vec<InstanceId> = self
            .probing
            .iter()
            .copied()
            .filter(|id| {
                m.instances()
                    .iter()
                    .find(|i| i.id() == *id)
                    .is_none_or(|i| matches!(i.state(), State::Ready | State::Exited))
            })
            .collect();
        for id in ready {
            self.probing.remove(&id);
        }
        let interval = m.target.manifest.health_interval;
        for &id in &self.probing {
            if !self.timers.iter().any(|(_, i)| *i == id) {
                self.timers.push((self.now + interval, id));
            }
        }
    }
}

/// Whether an event line is a step of a plan: not an instance's own news
/// (started with its pid, healthy after so long, stopped by its signal),
/// which no plan can tell.
pub fn is_step(line: &str) -> bool {
    let own = [
        " started (pid ",
        " healthy (",
        " stopped (",
        " exited (",
        " ready (",
    ];
    !own.iter().any(|w| line.contains(w))
}
