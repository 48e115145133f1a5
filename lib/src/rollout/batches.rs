//! Rollouts, a batch at a time: which slots are still to do, starting a
//! batch's candidates (or, stop-first, retiring first), judging them by
//! their health and deadline, committing, and completing or failing the
//! rollout.

use super::*;

impl Service {
    pub(super) fn begin(&mut self, kind: Kind, from: Option<Version>) {
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
            canary: None,
            watch: None,
            hook: None,
            after_done: false,
        });
        let msg = self.started_message();
        self.event(msg);
        if matches!(self.rollout.as_ref().map(|r| &r.kind), Some(Kind::Apply)) {
            self.run_hook(Hook::Before);
        }
    }

    /// Starts `hook` if the manifest has it: the rollout waits for it.
    fn run_hook(&mut self, hook: Hook) -> bool {
        let m = &self.target.manifest;
        let command = match hook {
            Hook::Before => m.before_deploy.clone(),
            Hook::After => m.after_deploy.clone(),
        };
        let Some(command) = command else { return false };
        let timeout = m.hook_timeout;
        let Some(r) = &mut self.rollout else {
            return false;
        };
        r.hook = Some((hook, self.now));
        let env = vec![
            ("VERSION".to_string(), self.target.version.to_string()),
            ("PREVIOUS_VERSION".to_string(), r.from.to_string()),
        ];
        self.event(format!("{}: running {command}", hook.name()));
        self.out.push(Action::Hook {
            hook,
            command,
            env,
            timeout,
        });
        true
    }

    /// A hook ended: the rollout goes on, or fails.
    pub(super) fn hook_done(&mut self, hook: Hook, result: Result<(), String>) {
        let Some(r) = &mut self.rollout else { return };
        let Some((running, since)) = r.hook else {
            return;
        };
        if running != hook {
            return;
        }
        r.hook = None;
        let took = format_secs(self.now.since(since));
        match result {
            Ok(()) => {
                if hook == Hook::After {
                    r.after_done = true;
                }
                self.event(format!("{}: done ({took})", hook.name()));
            }
            Err(why) => match hook {
                Hook::Before => self.fail_as(
                    format!("{} failed: {why}; no instance changed", hook.name()),
                    false,
                ),
                Hook::After => self.fail(format!("{} failed: {why}", hook.name())),
            },
        }
    }

    pub(super) fn started_message(&self) -> String {
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

    pub(super) fn floor(&self) -> InstanceId {
        self.rollout.as_ref().map_or(InstanceId(0), |r| r.floor)
    }

    /// Slots below `replicas` that the rollout still has to bring to the target.
    pub(super) fn todo(&self) -> Vec<u32> {
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
    pub(super) fn restarts_slot(&self, slot: u32) -> bool {
        match self.rollout.as_ref().map(|r| &r.kind) {
            Some(Kind::RestartInstance { slot: s, .. }) => *s == slot,
            _ => true,
        }
    }

    /// The serving instance of a slot (possibly an exited record).
    pub(super) fn serving(&self, slot: u32) -> Option<usize> {
        self.instances
            .iter()
            .position(|i| i.slot == slot && i.role == Role::Serving)
    }

    /// Whether the batch in flight is replacing this slot: then the rollout,
    /// not the restart policy, decides what runs there.
    pub(super) fn in_batch(&self, slot: u32) -> bool {
        self.batch()
            .is_some_and(|b| b.phase != Phase::Retiring && b.slots.contains(&slot))
            || self
                .instances
                .iter()
                .any(|i| i.slot == slot && i.role == Role::Candidate)
    }

    pub(super) fn step_rollout(&mut self) -> bool {
        let Some(r) = &self.rollout else {
            return false;
        };
        if r.hook.is_some() {
            return false;
        }
        if let Some(w) = r.watch.clone() {
            return self.step_watch(w);
        }
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
        if r.canary.is_some() && self.canary_auto_at().is_some_and(|t| self.now >= t) {
            self.canary_auto();
            return true;
        }
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

    /// When `update_canary_auto` promotes the canaries held, if it will.
    pub(super) fn canary_auto_at(&self) -> Option<Instant> {
        let c = self.rollout.as_ref()?.canary.as_ref()?;
        let auto = self.target.manifest.update_canary_auto;
        (!auto.is_zero() && !c.tried).then(|| c.since + auto)
    }

    /// `update_canary_auto` is due: promote the canaries if each is still
    /// ready at the target with no restart since it was held, else say why
    /// not and go on holding.
    fn canary_auto(&mut self) {
        let Some(c) = self.rollout.as_mut().and_then(|r| r.canary.as_mut()) else {
            return;
        };
        c.tried = true;
        let slots = c.slots.clone();
        let mut trouble = Vec::new();
        for (slot, restarts) in slots {
            let now = self.restarts(slot);
            let ready = self.serving(slot).is_some_and(|i| {
                let i = &self.instances[i];
                i.state == State::Ready && i.spec.version == self.target.version
            });
            if now > restarts {
                trouble.push(format!("the canary in slot {slot} restarted"));
            } else if !ready {
                trouble.push(format!("the canary in slot {slot} is not ready"));
            }
        }
        let auto = format_duration(self.target.manifest.update_canary_auto);
        if trouble.is_empty() {
            if let Some(r) = &mut self.rollout {
                r.canary = None;
                r.paused = false;
            }
            self.event(format!(
                "canary ready for {auto} with no restart: promoted; rolling out the rest"
            ));
        } else {
            self.event(format!(
                "canary not promoted by itself after {auto}: {}; promote or rollback",
                trouble.join(", ")
            ));
        }
    }

    /// Whether the rollout has no slot left to replace and no instance
    /// beyond `replicas` to stop: its next step completes it.
    pub(super) fn nothing_left(&self) -> bool {
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
    pub(super) fn next_batch(&mut self) -> bool {
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
            // started or one replaced over memory_high still serving.
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
    pub(super) fn may_take_out(&mut self, slots: &[u32], number: u32, total: u32) -> TakeOut {
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

    pub(super) fn set_batch(&mut self, batch: Batch) {
        if let Some(r) = &mut self.rollout {
            r.batch = Some(batch);
        }
    }

    pub(super) fn batch(&self) -> Option<&Batch> {
        self.rollout.as_ref().and_then(|r| r.batch.as_ref())
    }

    pub(super) fn batch_mut(&mut self) -> Option<&mut Batch> {
        self.rollout.as_mut().and_then(|r| r.batch.as_mut())
    }

    pub(super) fn start_candidates(&mut self) {
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
    pub(super) fn check_candidates(&mut self) -> bool {
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
            if let Some(Exit::Lost(host)) = &inst.exit {
                // Lost with its host, not failed: its slot gets a new
                // candidate (elsewhere), judged afresh.
                let (slot, number, host) = (inst.slot, inst.number, host.clone());
                let spec = inst.spec.clone();
                let fresh = self.spawn(slot, spec, Role::Candidate);
                let (new_id, new_number) = (self.instances[fresh].id, self.instances[fresh].number);
                if let Some(b) = self.batch_mut() {
                    for c in b.candidates.iter_mut().filter(|c| **c == id) {
                        *c = new_id;
                    }
                }
                self.event(format!(
                    "instance {number} lost with host {host}; starting instance {new_number} \
                     in its place"
                ));
                return true;
            }
            if let Some(exit) = &inst.exit {
                let reason = match exit {
                    // Not the new version's fault: the reason says whose.
                    Exit::Short(why) => {
                        format!("deployd could not start {}: {why}", inst.named())
                    }
                    exit => format!(
                        "{} exited while starting ({exit}; {})",
                        inst.named(),
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
                        "{} {what} within health_deadline {} ({})",
                        inst.named(),
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

    pub(super) fn commit(&mut self) {
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

    pub(super) fn finish_batch(&mut self) {
        let more = !self.todo().is_empty();
        let Some(r) = &mut self.rollout else { return };
        let Some(batch) = r.batch.take() else { return };
        r.batches_done += 1;
        let pause = self.target.manifest.update_pause;
        if batch.canary && more {
            r.paused = true;
            r.canary = Some(Canary {
                since: self.now,
                slots: Vec::new(),
                tried: false,
            });
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
            let restarts: Vec<(u32, u32)> =
                batch.slots.iter().map(|&s| (s, self.restarts(s))).collect();
            if let Some(c) = self.rollout.as_mut().and_then(|r| r.canary.as_mut()) {
                c.slots = restarts;
            }
            let (k, n) = self.progress();
            let auto = self.target.manifest.update_canary_auto;
            let then = if auto.is_zero() {
                String::new()
            } else {
                format!(
                    "; promoted by itself in {} if they stay ready with no restart",
                    format_duration(auto)
                )
            };
            self.event(format!(
                "canary: {k} of {n} instances at {} and ready; held: promote rolls out the rest, rollback undoes it{then}",
                self.target.version
            ));
        }
    }

    /// A new version in place and watched: failed by the first trouble of
    /// one of its instances, complete once the window passed.
    fn step_watch(&mut self, w: Watch) -> bool {
        let window = self.target.manifest.update_watch;
        let mut trouble = None;
        for &(slot, restarts) in &w.slots {
            let now = self.restarts(slot);
            let serving = self.serving(slot).map(|i| &self.instances[i]);
            let what = match serving {
                Some(i) if i.state == State::Exited => match &i.exit {
                    Some(exit) => format!("exited ({exit})"),
                    None => "exited".into(),
                },
                Some(i) if i.state == State::Unhealthy => "turned unhealthy".into(),
                _ if now > restarts => "restarted".into(),
                Some(i) if i.state == State::Ready => continue,
                _ => "is not ready".into(),
            };
            let name = serving.map_or(slot, |i| i.number);
            trouble = Some(format!("instance {name} {what}"));
            break;
        }
        if let Some(what) = trouble {
            let after = format_secs(self.now.since(w.since));
            self.fail(format!(
                "{what} {after} after the rollout completed (update_watch {})",
                format_duration(window)
            ));
            return true;
        }
        if self.now >= w.since + window {
            self.complete();
            return true;
        }
        false
    }

    pub(super) fn complete(&mut self) {
        let after = self
            .rollout
            .as_ref()
            .is_some_and(|r| matches!(r.kind, Kind::Apply) && !r.after_done && r.watch.is_none());
        if after && self.run_hook(Hook::After) {
            return;
        }
        let window = self.target.manifest.update_watch;
        let watched = self
            .rollout
            .as_ref()
            .is_some_and(|r| r.watch.is_none() && matches!(r.kind, Kind::Apply));
        if watched && !window.is_zero() {
            let slots = (0..self.target.manifest.replicas)
                .map(|s| (s, self.restarts(s)))
                .collect();
            let Some(r) = &mut self.rollout else { return };
            r.watch = Some(Watch {
                since: self.now,
                slots,
            });
            let took = format_secs(self.now.since(r.started_at));
            let noun = r.kind.noun(self.target.manifest.update);
            let v = self.target.version;
            self.event(format!(
                "{noun} complete: at {v} ({took}); watched for {} (update_watch)",
                format_duration(window)
            ));
            return;
        }
        let Some(r) = self.rollout.take() else { return };
        let took = format_secs(self.now.since(r.started_at));
        let v = self.target.version;
        let noun = r.kind.noun(self.target.manifest.update);
        match r.watch {
            Some(_) => self.event(format!(
                "watched for {} with no crash, restart or failed probe: at {v} ({took})",
                format_duration(window)
            )),
            None => self.event(format!("{noun} complete: at {v} ({took})")),
        }
        self.failure = None;
        let took = self.now.since(r.started_at);
        self.outcome = match r.kind {
            Kind::AutoRollback(reason) => {
                self.tally.count(Ended::RolledBack, took);
                Outcome::Failed(format!("{reason}; rolled back to {v}"))
            }
            _ => {
                self.tally.count(Ended::Done, took);
                Outcome::Done(v)
            }
        };
    }

    pub(super) fn fail(&mut self, reason: String) {
        self.fail_as(reason, true);
    }

    /// Fails the rollout; `auto_rollback` applies if `may_roll_back` (not
    /// where nothing changed to roll back: a failed `before_deploy`).
    fn fail_as(&mut self, reason: String, may_roll_back: bool) {
        let Some(r) = &self.rollout else { return };
        let noun = r.kind.noun(self.target.manifest.update);
        self.event(format!("{noun} failed: {reason}"));
        self.cancel_batch();
        let Some(r) = self.rollout.take() else { return };
        self.tally
            .count(Ended::Failed, self.now.since(r.started_at));
        let auto = may_roll_back
            && self.target.manifest.auto_rollback
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
    pub(super) fn cancel_batch(&mut self) {
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
}
