//! The commands of a service's ctl file, as the machine takes them: each
//! changes the target or the rollout's flags, or is refused with a reason
//! and changes nothing; [`Service::drive`] then acts on what changed.

use super::*;

impl Service {
    pub(super) fn command(&mut self, cmd: Command) -> Result<String, Refusal> {
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
            Command::Promote => self.promote(),
            Command::Rollback(spec) => self.rollback(spec),
            Command::Restart(None) => self.restart(),
            Command::Restart(Some(number)) => self.restart_instance(number),
            Command::Stop => self.stop(false),
            Command::Start => self.start(),
            Command::Remove => self.stop(true),
            Command::Signal(signal, instance) => self.signal(signal, instance),
        }
    }

    pub(super) fn refuse_if_stopped(&self) -> Result<(), Refusal> {
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

    pub(super) fn apply(&mut self, spec: Spec) -> Result<String, Refusal> {
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

    pub(super) fn pause(&mut self) -> Result<String, Refusal> {
        let Some(r) = &mut self.rollout else {
            return refuse(
                RefusalKind::Invalid,
                "nothing to pause: no rollout in progress",
            );
        };
        if r.paused {
            return refuse(RefusalKind::Invalid, "already paused");
        }
        if r.watch.is_some() {
            return refuse(
                RefusalKind::Invalid,
                "nothing to pause: the new version is in place and watched (update_watch); rollback undoes it",
            );
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

    pub(super) fn resume(&mut self) -> Result<String, Refusal> {
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
        if r.canary.take().is_some() {
            self.event("resumed: rolling out the rest".into());
            return Ok("resumed: rolling out the rest".into());
        }
        self.event("resumed".into());
        Ok("resumed".into())
    }

    pub(super) fn promote(&mut self) -> Result<String, Refusal> {
        let Some(r) = &mut self.rollout else {
            return refuse(
                RefusalKind::Invalid,
                "nothing to promote: no rollout in progress",
            );
        };
        if r.canary.is_none() {
            let why = match r.paused {
                true => {
                    "nothing to promote: the rollout is paused, not held at a canary; resume goes on with it"
                }
                false => "nothing to promote: the rollout is not held at a canary",
            };
            return refuse(RefusalKind::Invalid, why);
        }
        r.canary = None;
        r.paused = false;
        self.event("promoted: rolling out the rest".into());
        Ok("promoted: rolling out the rest".into())
    }

    pub(super) fn rollback(&mut self, spec: Option<Spec>) -> Result<String, Refusal> {
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
    pub(super) fn refuse_if_rolling(&self) -> Result<(), Refusal> {
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

    pub(super) fn restart(&mut self) -> Result<String, Refusal> {
        self.refuse_if_stopped()?;
        self.refuse_if_rolling()?;
        self.refuse_if_behind()?;
        self.begin(Kind::Restart, None);
        Ok(self.started_message())
    }

    /// `restart N`: one slot's rollout to a fresh process of its version.
    pub(super) fn restart_instance(&mut self, number: u32) -> Result<String, Refusal> {
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
    pub(super) fn refuse_if_behind(&self) -> Result<(), Refusal> {
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
    pub(super) fn wait_for(&mut self, mut waiting: Vec<ServiceName>) {
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
    pub(super) fn signal(
        &mut self,
        signal: Signal,
        instance: Option<u32>,
    ) -> Result<String, Refusal> {
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

    pub(super) fn stop(&mut self, remove: bool) -> Result<String, Refusal> {
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

    pub(super) fn start(&mut self) -> Result<String, Refusal> {
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
}
