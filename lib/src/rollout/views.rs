//! What a service's machine shows: its versions, status, progress,
//! instances and the line `wait` answers; what a restart of deployd keeps.

use super::*;

impl Service {
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
    /// Why the last rollout failed, while no other is in flight.
    pub fn failure(&self) -> Option<&str> {
        match self.rollout {
            None => self.failure.as_deref(),
            Some(_) => None,
        }
    }
    /// How its rollouts ended since deployd started.
    pub fn tally(&self) -> &Tally {
        &self.tally
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
            (Some(r), _) if r.watch.is_some() => UpdateStatus::Watching,
            (Some(r), _) if r.paused && r.canary.is_some() => UpdateStatus::Canary,
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
    /// `none VERSION`, `paused VERSION`, `canary VERSION` (held at its
    /// canaries, with no `update_canary_auto` to come) or `failed: REASON`.
    pub fn wait_line(&self) -> Option<String> {
        match &self.rollout {
            // Held at its canaries: `wait` follows `update_canary_auto`.
            Some(r) if r.paused && r.batch.is_none() && r.canary.is_some() => {
                match self.canary_auto_at() {
                    Some(_) => None,
                    None => Some(format!("canary {}", self.target.version)),
                }
            }
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
    /// outgrew `memory_high`. kubectl's RESTARTS, PM2's ↺. A rollout or the
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
}
