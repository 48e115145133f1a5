//! The instances themselves: starting, probing, routing, draining and
//! stopping them, the restart policy outside a batch, renumbering, and
//! [`Service::drive`], which takes every decision the state calls for.
use std::time::Duration;

use super::*;

impl Service {
    pub(super) fn find(&self, id: InstanceId) -> Option<usize> {
        self.instances.iter().position(|i| i.id == id)
    }

    pub(super) fn gone(&self, id: InstanceId) -> bool {
        self.find(id)
            .is_none_or(|i| self.instances[i].state == State::Exited)
    }

    pub(super) fn number_used(&self, n: u32) -> bool {
        self.instances.iter().any(|i| i.number == n)
    }

    /// The slot's own number if free, else the first free one above every slot.
    pub(super) fn free_number(&self, slot: u32) -> u32 {
        if !self.number_used(slot) {
            return slot;
        }
        let mut n = (self.slots.len() as u32).max(self.target.manifest.replicas);
        while self.number_used(n) {
            n += 1;
        }
        n
    }

    pub(super) fn spawn(&mut self, slot: u32, spec: Spec, role: Role) -> usize {
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

    pub(super) fn set(&mut self, i: usize, to: State) {
        if let Err(e) = self.instances[i].set_state(to) {
            // An illegal transition is a bug; it is reported, not fatal.
            self.event(format!("internal: {e}"));
        }
    }

    pub(super) fn route_in(&mut self, i: usize) {
        if self.instances[i].state == State::Healthy {
            self.set(i, State::Ready);
            self.instances[i].ready_since = Some(self.now);
            let id = self.instances[i].id;
            self.out.push(Action::RouteIn { id });
        }
    }

    pub(super) fn stop_now(&mut self, i: usize) {
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
    pub(super) fn retire(&mut self, i: usize) {
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

    pub(super) fn started(&mut self, id: InstanceId, pid: u32) {
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

    /// A serving instance's host restarted its process in place: routed
    /// out, starting again, its restart counted; `Started` comes next.
    pub(super) fn restarted(&mut self, id: InstanceId, exit: Exit) {
        let Some(i) = self.find(id) else { return };
        let inst = &self.instances[i];
        let gone = matches!(
            inst.state,
            State::Draining | State::Stopping | State::Exited
        );
        if inst.role != Role::Serving || gone {
            return;
        }
        if inst.state == State::Ready {
            self.out.push(Action::RouteOut { id });
        }
        let (number, slot) = (inst.number, inst.slot);
        self.set(i, State::Starting);
        let now = self.now;
        let inst = &mut self.instances[i];
        inst.pid = None;
        inst.started_at = now;
        inst.healthy_since = None;
        inst.ready_since = None;
        inst.failures = 0;
        inst.deadline_reported = false;
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.restarts = s.restarts.saturating_add(1);
        }
        self.event(format!(
            "instance {number} exited unexpectedly ({exit}); restarted on its host"
        ));
        self.show_output(id, number);
    }

    pub(super) fn probed(&mut self, id: InstanceId, result: Result<(), String>) {
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

    /// A ready instance over its `memory_high` is replaced with surge, as a
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
    pub(super) fn over_memory(&mut self, id: InstanceId, rss: u64) {
        let Some(i) = self.find(id) else { return };
        let inst = &self.instances[i];
        let Some(limit) = inst.spec.manifest.memory_high else {
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
            "instance {number} uses {} of memory, over memory_high {}; {}",
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
    pub(super) fn unready_slots(&self, except: &[u32]) -> Vec<u32> {
        (0..self.target.manifest.replicas)
            .filter(|s| !except.contains(s) && !self.slot_ready(*s))
            .collect()
    }

    /// Whether the service never runs more than `replicas` instances
    /// (`update_order stop-first`): then nothing starts in a slot until
    /// whatever ran there is gone, rollout or not.
    pub(super) fn stop_first(&self) -> bool {
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
    pub(super) fn slot_clear(&self, slot: u32, spec: &Spec) -> bool {
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
    pub(super) fn blocking<'a>(
        &'a self,
        slot: u32,
        spec: &'a Spec,
    ) -> impl Iterator<Item = &'a Instance> {
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
    pub(super) fn slot_ready(&self, slot: u32) -> bool {
        self.instances
            .iter()
            .any(|j| j.slot == slot && j.role == Role::Serving && j.state == State::Ready)
    }

    pub(super) fn exited(&mut self, id: InstanceId, exit: Exit) {
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
                } else if let Exit::Lost(host) = &exit {
                    // Not the instance's doing: its slot starts again at
                    // once, elsewhere, whatever its restart policy.
                    if let Some(s) = self.slots.get_mut(slot as usize) {
                        s.restart_at = Some(self.now);
                        s.hold = false;
                    }
                    self.event(format!(
                        "instance {number} lost with host {host}; starting it again"
                    ));
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
        let said_nothing = matches!(exit, Exit::SpawnFailed(_) | Exit::Short(_) | Exit::Lost(_));
        if role != Role::Retiring && !said_nothing {
            self.show_output(id, number);
        }
    }

    /// Asks for the last lines an instance printed, as events.
    pub(super) fn show_output(&mut self, id: InstanceId, number: u32) {
        let prefix = format!("instance {number} printed");
        self.out.push(Action::Output { id, prefix });
    }

    /// Schedules the restart of a slot with exponential backoff; returns the delay.
    pub(super) fn schedule_restart(&mut self, slot: u32, ready_since: Option<Instant>) -> Duration {
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
    pub(super) fn step_instances(&mut self) -> bool {
        let mut changed = false;
        let now = self.now;
        for i in 0..self.instances.len() {
            let inst = &self.instances[i];
            match inst.state {
                State::Draining if inst.drained || inst.drain_until.is_some_and(|t| now >= t) => {
                    self.stop_now(i);
                    changed = true;
                }
                // Replaced over memory_high (the only way to be ready and
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
    pub(super) fn renumber(&mut self) {
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
    pub(super) fn step_slots(&mut self) -> bool {
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
    pub(super) fn drive(&mut self) {
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

    pub(super) fn event(&mut self, msg: String) {
        self.out.push(Action::Event(msg));
    }
}
