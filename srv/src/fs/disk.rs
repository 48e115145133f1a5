//! Readers of files on disk (instances' output, `access`, `failed_log`,
//! `hooks_log`) waiting for more: a `poll` that finds nothing new leaves
//! a wake-up here, and an inotify watch on the file calls it when the file
//! is written, moved or removed. One thread reads the inotify events,
//! started with the first wait.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use parking_lot::Mutex;

type Wake = Box<dyn FnOnce() + Send>;

/// The watches and who waits on each.
pub struct DiskWaiters {
    inotify: Inotify,
    /// By watch: the handles waiting, each with its wake-up.
    waiting: Mutex<HashMap<WatchDescriptor, HashMap<u64, Wake>>>,
    /// deployd is unmounting: nobody is to wait any more.
    closing: AtomicBool,
}

/// Handles one deployd keeps waiting on files at most.
const MAX_WAITING: usize = 4096;

impl DiskWaiters {
    /// Starts the thread that reads inotify's events; `None` if inotify
    /// cannot be had (readers then read again on their own clock).
    pub fn start() -> Option<Arc<DiskWaiters>> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC)
            .inspect_err(|e| tracing::debug!("inotify: {e}; followers of logs poll"))
            .ok()?;
        let w = Arc::new(DiskWaiters {
            inotify,
            waiting: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
        });
        let reader = w.clone();
        std::thread::Builder::new()
            .name("log-waiters".into())
            .spawn(move || reader.run())
            .inspect_err(|e| tracing::debug!("inotify thread: {e}"))
            .ok()?;
        Some(w)
    }

    fn run(&self) {
        loop {
            let events = match self.inotify.read_events() {
                Ok(e) => e,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("inotify: {e}; followers of logs wait for their timeout");
                    return;
                }
            };
            let woken: Vec<Wake> = {
                let mut w = self.waiting.lock();
                events
                    .iter()
                    .filter_map(|e| Some((e.wd, w.remove(&e.wd)?)))
                    .flat_map(|(wd, handles)| {
                        self.unwatch(wd);
                        handles.into_values()
                    })
                    .collect()
            };
            for wake in woken {
                wake();
            }
        }
    }

    /// Calls `wake` once `file` (open as handle `fh`) is written to, moved
    /// or removed. `false` if it cannot be watched (or too many wait): the
    /// caller says it is readable, and the reader reads again.
    pub fn wait(&self, file: &std::fs::File, fh: u64, wake: Wake) -> bool {
        if self.closing.load(Ordering::SeqCst) {
            return false;
        }
        let mut w = self.waiting.lock();
        if w.values().map(HashMap::len).sum::<usize>() >= MAX_WAITING {
            return false;
        }
        // The open file itself, whatever its name is now.
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let mask = AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_ATTRIB;
        match self.inotify.add_watch(path.as_str(), mask) {
            Ok(wd) => {
                w.entry(wd).or_default().insert(fh, wake);
                true
            }
            Err(e) => {
                tracing::debug!("inotify watch: {e}");
                false
            }
        }
    }

    /// A handle closed: it waits no more.
    pub fn forget(&self, fh: u64) {
        let mut w = self.waiting.lock();
        w.retain(|wd, handles| {
            handles.remove(&fh);
            let keep = !handles.is_empty();
            if !keep {
                self.unwatch(*wd);
            }
            keep
        });
    }

    /// Drops a watch nobody waits on, so that writes to its file (an
    /// instance's output, written all the time) wake nothing here. Called
    /// with `waiting` held: a wait on the same file after it adds the
    /// watch again.
    fn unwatch(&self, wd: WatchDescriptor) {
        // EINVAL: the file is gone, and its watch with it.
        let _ = self.inotify.rm_watch(wd);
    }

    /// deployd is about to unmount: every waiting reader is woken, and
    /// none waits from now on.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let woken: Vec<Wake> = std::mem::take(&mut *self.waiting.lock())
            .into_iter()
            .flat_map(|(wd, handles)| {
                self.unwatch(wd);
                handles.into_values()
            })
            .collect();
        for wake in woken {
            wake();
        }
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
}
