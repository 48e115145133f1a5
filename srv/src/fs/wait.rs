//! Reads of `wait` parked until their rollout settles: answered when a
//! snapshot says it did, or when the reader is gone (fuser does not pass
//! on interrupts, so a sweeper checks), or when deployd stops.

use std::sync::Arc;
use std::time::Duration;

use fuser::{Errno, ReplyData};
use parking_lot::Mutex;

use super::files::slice;
use crate::view::{ServiceView, Views};

/// A read of `wait` waiting for its rollout.
pub(super) struct Parked {
    pub sid: u32,
    pub pid: u32,
    pub offset: u64,
    pub size: u32,
    pub answer: Arc<Mutex<Option<Arc<[u8]>>>>,
    pub reply: ReplyData,
}

/// Parked reads of `wait` files, and readers of files on disk waiting for
/// more (their inotify thread started with the first).
#[derive(Default)]
pub struct Waiters {
    pub(super) parked: Mutex<Vec<Parked>>,
    disk: std::sync::OnceLock<Option<Arc<super::disk::DiskWaiters>>>,
}

impl Waiters {
    /// Answers the reads parked on `view`'s service if its rollout settled.
    /// The engine calls this after publishing, so a read that checked the
    /// old snapshot under this lock is answered here.
    pub fn release(&self, view: &ServiceView) {
        let Some(answer) = view.wait.clone() else {
            return;
        };
        let ready: Vec<Parked> = {
            let mut parked = self.parked.lock();
            let (ready, rest) = std::mem::take(&mut *parked)
                .into_iter()
                .partition(|p| p.sid == view.sid);
            *parked = rest;
            ready
        };
        for p in ready {
            *p.answer.lock() = Some(answer.clone());
            p.reply.data(slice(&answer, p.offset, p.size));
        }
    }

    /// Answers reads whose reader is dying (EINTR) or whose service is gone
    /// (ENOENT). Runs every [`SWEEP`].
    ///
    /// A reader killed while its read is parked here does not go away: the
    /// kernel keeps it until the read is answered, and fuser does not pass
    /// on FUSE_INTERRUPT. So a reader with SIGKILL pending is answered now.
    pub fn sweep(&self, views: &Views) {
        let gone: Vec<(Parked, Errno)> = {
            let mut parked = self.parked.lock();
            if parked.is_empty() {
                return;
            }
            let (gone, rest): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut *parked)
                .into_iter()
                .partition(|p| dying(p.pid) || views.get(p.sid).is_none());
            *parked = rest;
            gone.into_iter()
                .map(|p| {
                    let e = if dying(p.pid) {
                        Errno::EINTR
                    } else {
                        Errno::ENOENT
                    };
                    (p, e)
                })
                .collect()
        };
        for (p, e) in gone {
            p.reply.error(e);
        }
    }

    /// Answers every parked read and wakes every reader waiting on a
    /// file: deployd is stopping (or replacing itself) and unmounts.
    pub fn shutdown(&self) {
        for p in std::mem::take(&mut *self.parked.lock()) {
            p.reply.error(Errno::EIO);
        }
        if let Some(Some(d)) = self.disk.get() {
            d.close();
        }
    }

    /// The waiters on files on disk, if inotify can be had.
    pub(super) fn disk(&self) -> Option<&Arc<super::disk::DiskWaiters>> {
        self.disk
            .get_or_init(super::disk::DiskWaiters::start)
            .as_ref()
    }
}

/// How often parked reads are checked for dying readers.
pub const SWEEP: Duration = Duration::from_millis(100);

/// Whether the thread that sent a request is gone or has SIGKILL pending
/// (a signal whose default action kills is turned into SIGKILL too).
fn dying(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    status
        .lines()
        .filter(|l| l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|mask| u64::from_str_radix(mask, 16).ok())
        .any(|mask| mask & (1 << (libc::SIGKILL - 1)) != 0)
}
