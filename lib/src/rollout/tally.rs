//! How a service's rollouts ended since deployd started: what its metrics
//! count (`deployd_rollouts_total`, `deployd_rollout_duration_seconds`).

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Upper bounds, in seconds, of the rollout duration histogram's buckets.
pub const DURATION_BUCKETS: [f64; 10] = [
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// How a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Its version is in place.
    Done,
    /// It failed (an automatic rollback that follows is counted apart).
    Failed,
    /// An automatic rollback put the previous version back.
    RolledBack,
}

impl Ended {
    /// The `outcome` label.
    pub fn name(self) -> &'static str {
        match self {
            Ended::Done => "done",
            Ended::Failed => "failed",
            Ended::RolledBack => "rolled_back",
        }
    }
}

/// Rollouts that ended, by outcome, and how long they took.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Done, failed, rolled back.
    pub ended: [u64; 3],
    /// Rollouts that took at most each of [`DURATION_BUCKETS`] (not
    /// cumulative), and past the last one.
    pub buckets: [u64; DURATION_BUCKETS.len() + 1],
    /// Their durations, summed, in seconds.
    pub seconds: f64,
}

impl Tally {
    /// Counts a rollout that ended so after `took`.
    pub fn count(&mut self, how: Ended, took: Duration) {
        self.ended[how as usize] += 1;
        let s = took.as_secs_f64();
        let i = DURATION_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[i] += 1;
        self.seconds += s;
    }

    /// How many ended so.
    pub fn ended(&self, how: Ended) -> u64 {
        self.ended[how as usize]
    }
}
