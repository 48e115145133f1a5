//! How the host's services stand as a whole: what deployd tells its service
//! manager (systemd's `READY=1` and `STATUS=`).

use super::Core;
use crate::rollout::{State, UpdateStatus};

/// The host's services as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    /// Whether every service is back: none has an instance still starting
    /// (a stopped service, one waiting for others, one whose rollout
    /// failed, one between restarts of a crashing instance count as
    /// back: deployd did what it could).
    pub back: bool,
    /// One line: `3 services, 7/7 instances ready`, then what is rolling,
    /// held or failed.
    pub line: String,
}

impl Core {
    /// How the services stand now.
    pub fn standing(&self) -> Standing {
        let mut names: Vec<_> = self.services.values().collect();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        let (mut ready, mut total, mut back) = (0, 0, true);
        let (mut rolling, mut held, mut failed) = (Vec::new(), Vec::new(), Vec::new());
        for e in names {
            let m = &e.machine;
            let live = m.instances().iter().filter(|i| i.state() != State::Exited);
            let starting = live.clone().any(|i| i.state() == State::Starting);
            if !m.is_stopped() && !m.is_removing() {
                let n = m.target().manifest.replicas;
                let up = live.filter(|i| i.state() == State::Ready).count() as u32;
                // Old and new both ready for a moment in a rollout.
                total += n;
                ready += up.min(n);
            }
            let status = m.update_status();
            if starting && !m.is_stopped() && status != UpdateStatus::Failed {
                back = false;
            }
            let name = e.name.as_str().to_owned();
            match status {
                UpdateStatus::Rolling | UpdateStatus::Watching => rolling.push(name),
                UpdateStatus::Paused | UpdateStatus::Canary => held.push(name),
                UpdateStatus::Failed => failed.push(name),
                UpdateStatus::None => {}
            }
        }
        let n = self.services.len();
        let mut line = format!(
            "{n} service{}, {ready}/{total} instances ready",
            if n == 1 { "" } else { "s" }
        );
        for (what, names) in [("rolling", rolling), ("held", held), ("failed", failed)] {
            if !names.is_empty() {
                line.push_str(&format!("; {what}: {}", names.join(", ")));
            }
        }
        Standing { back, line }
    }
}
