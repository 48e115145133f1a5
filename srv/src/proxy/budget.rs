//! How many descriptors the public ports may hold, so that a flood of
//! connections to one port never takes what deployd needs for the rest:
//! probes, ctl, state saves, event logs, instances' pipes and logs, and the
//! other services' ports.
//!
//! deployd's open-file limit is split once, at start: a reserve of a
//! quarter (at least [`MIN_RESERVE`]) is kept for deployd's own work, the
//! rest is the proxies' [`Budget`]. A client connection takes two
//! descriptors of it from its accept to its close (its own, and the one it
//! may open to an instance); a connection to an instance kept idle in a
//! pool takes one of its own. Each service's port also holds at most its
//! manifest's `max_connections` client connections at once ([`Admission`]),
//! by default half of what the budget allows, so that one flooded port
//! leaves the other half to the others. A port at either limit stops
//! accepting: new connections wait in the kernel's backlog, as HAProxy's
//! `maxconn` makes them wait, rather than being accepted and then failed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The fewest descriptors kept back for deployd's own work.
pub const MIN_RESERVE: u64 = 256;

/// Descriptors a client connection takes from the budget.
pub const PER_CONNECTION: u32 = 2;

/// The descriptors every public port together may hold.
#[derive(Debug)]
pub struct Budget {
    fds: Arc<Semaphore>,
    total: usize,
}

impl Budget {
    /// The budget left by an open-file limit of `limit` descriptors.
    pub fn from_limit(limit: u64) -> Budget {
        let reserve = (limit / 4).max(MIN_RESERVE);
        let total = limit
            .saturating_sub(reserve)
            .min(Semaphore::MAX_PERMITS as u64) as usize;
        Budget {
            fds: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// The budget of this process's open-file limit (its soft limit).
    pub fn of_this_process() -> Budget {
        Budget::from_limit(open_file_limit())
    }

    /// Descriptors in the budget.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The `max_connections` of a service whose manifest sets none: half
    /// the client connections the whole budget holds.
    pub fn default_max_connections(&self) -> usize {
        (self.total / PER_CONNECTION as usize / 2).max(1)
    }

    /// Waits for a client connection's descriptors.
    pub async fn connection(&self) -> OwnedSemaphorePermit {
        match self.fds.clone().acquire_many_owned(PER_CONNECTION).await {
            Ok(p) => p,
            // The semaphore is never closed.
            Err(_) => unreachable!("the descriptor budget is never closed"),
        }
    }

    /// A descriptor for a connection kept in a pool, if one is free now.
    pub fn pooled(&self) -> Option<OwnedSemaphorePermit> {
        self.fds.clone().try_acquire_owned().ok()
    }

    /// Descriptors of the budget in use now.
    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.total - self.fds.available_permits()
    }
}

/// deployd's open-file limit (the soft one, which it raises to the hard
/// one at start).
pub fn open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        return u64::from(u32::MAX);
    }
    lim.rlim_cur
}

/// The client connections one port holds at once, at most its
/// `max_connections`.
#[derive(Debug, Default)]
pub struct Admission {
    open: AtomicUsize,
    max: AtomicUsize,
    freed: Notify,
    /// Told, one at a time, when a connection waits to be let in: an idle
    /// keep-alive connection then makes room (as nginx reuses its idle
    /// connections when it runs out), rather than a new client wait for a
    /// connection that may idle for minutes.
    full: Notify,
}

impl Admission {
    /// At most `max` connections at once.
    pub fn new(max: usize) -> Admission {
        Admission {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max.max(1)),
            freed: Notify::new(),
            full: Notify::new(),
        }
    }

    /// Changes the limit; connections over a lowered one stay until they end.
    pub fn set_max(&self, max: usize) {
        self.max.store(max.max(1), Ordering::SeqCst);
        self.freed.notify_waiters();
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Waits until the port may hold one more connection, and counts it.
    pub async fn admit(self: &Arc<Self>) -> Admitted {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let open = self.open.fetch_add(1, Ordering::SeqCst);
            if open < self.max.load(Ordering::SeqCst) {
                return Admitted(self.clone());
            }
            self.open.fetch_sub(1, Ordering::SeqCst);
            self.full.notify_one();
            freed.await;
        }
    }

    /// Resolves when a connection waits to be let in and an idle one
    /// should make room.
    pub async fn full(&self) {
        self.full.notified().await
    }
}

/// One connection counted by an [`Admission`], until dropped.
#[derive(Debug)]
pub struct Admitted(Arc<Admission>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.freed.notify_one();
    }
}

/// What a client connection holds while it is open: its place among its
/// port's connections and its descriptors of the budget.
#[derive(Debug)]
pub struct Permit {
    _admitted: Admitted,
    _fds: OwnedSemaphorePermit,
}

impl Permit {
    /// Both parts, once each was had.
    pub fn new(admitted: Admitted, fds: OwnedSemaphorePermit) -> Permit {
        Permit {
            _admitted: admitted,
            _fds: fds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_reserve_is_a_quarter_and_at_least_256() {
        assert_eq!(Budget::from_limit(20_000).total(), 15_000);
        assert_eq!(Budget::from_limit(1024).total(), 768);
        assert_eq!(Budget::from_limit(300).total(), 44);
        assert_eq!(Budget::from_limit(100).total(), 0);
        assert_eq!(Budget::from_limit(20_000).default_max_connections(), 3750);
        assert_eq!(Budget::from_limit(100).default_max_connections(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_port_at_its_limit_waits_until_a_connection_ends() {
        let a = Arc::new(Admission::new(2));
        let one = a.admit().await;
        let _two = a.admit().await;
        assert_eq!(a.open(), 2);
        let waiting = tokio::spawn({
            let a = a.clone();
            async move { a.admit().await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        drop(one);
        let _three = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("admitted once one ended")
            .unwrap();
        assert_eq!(a.open(), 2);
        // Meanwhile an idle connection was asked to make room.
        assert!(
            tokio::time::timeout(Duration::from_millis(10), a.full())
                .await
                .is_ok()
        );
        // A raised limit lets the next one in at once.
        a.set_max(3);
        let _four = tokio::time::timeout(Duration::from_secs(1), a.admit())
            .await
            .expect("admitted under the raised limit");
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_holds_two_descriptors_a_connection_and_one_a_pooled() {
        let b = Budget::from_limit(MIN_RESERVE + 3);
        assert_eq!(b.total(), 3);
        let c = b.connection().await;
        assert_eq!(b.in_use(), 2);
        let p = b.pooled().expect("one left");
        assert!(b.pooled().is_none());
        assert!(
            tokio::time::timeout(Duration::from_secs(1), b.connection())
                .await
                .is_err()
        );
        drop((c, p));
        assert_eq!(b.in_use(), 0);
    }
}
