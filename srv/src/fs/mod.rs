//! The namespace, served through FUSE: a view of the runtime's snapshots.
//!
//! ```text
//! /ctl  /status  /active/SERVICE/{ctl,version,previous_version,update_status,
//!   update_progress,state,events,manifest,wait}
//! /active/SERVICE/history/VERSION  /active/SERVICE/instances/N/{pid,state,version,port,log}
//! ```
//!
//! A directory is a static table; an inode number packs which service, which
//! instance and which file ([`Node`]), so a lookup is arithmetic. Where a
//! file's bytes come from is a column of the tables (`view::Source`), which
//! its attributes and its opening both follow ([`files`]). Each
//! `Filesystem` method is a thin adapter: the work is in functions returning
//! `Result<_, Errno>`, tested without a mount, ending in one `match` into
//! the reply.
//!
//! - [`node`]: inode numbers.
//! - [`files`]: what each file is, and its reads and writes.
//! - [`wait`]: reads of `wait` parked until their rollout settles.
//!
//! A service's snapshot files and directories are kept by the kernel
//! ([`Node::cached`]): long attribute TTLs, pages kept across opens. A
//! file whose content changes is a new inode ([`Node::ino_at`]), and the
//! kernel is told to drop the old name when the snapshot that changes it
//! is published ([`changed`]). Every status file is copied out of the
//! snapshot when it is opened, so every read of one open sees the same
//! content. Reads of `wait` while a rollout is
//! in flight are parked and answered when it settles (or when the reader is
//! gone: fuser does not deliver interrupts, so a sweeper checks). Writes to a
//! `ctl` file are parsed here (with lib's parser) and sent to the runtime;
//! the write is answered once the runtime has acted and persisted, and the
//! result can be read back on the same file descriptor.

mod disk;
mod files;
mod node;
mod wait;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use deployd_lib::rollout::{Refusal, RefusalKind};
use fuser::{
    Errno, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, Request, WriteFlags,
};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::runtime::Msg;
use crate::view::Views;

use files::{Listing, Open, Reading};
pub use node::Node;
use wait::Parked;
pub use wait::{SWEEP, Waiters};

/// Attributes are not cached, but for the files the kernel keeps
/// ([`Node::cached`]): sizes and mtimes change all the time.
const TTL: Duration = Duration::ZERO;

/// How long the kernel may keep what it has of a file it caches
/// ([`Node::cached`]): until told the file changed, in practice.
const CACHED: Duration = Duration::from_secs(3600);

/// The attribute TTL of `node`.
fn attr_ttl(node: Node) -> Duration {
    if node.cached() { CACHED } else { TTL }
}

/// What the kernel must drop of a service's cached nodes ([`Node::cached`])
/// between two of its snapshots.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Names in the service's directory of files whose content changed:
    /// each is a new inode now, which the next lookup finds.
    pub names: Vec<&'static str>,
    /// Its directories, whose mtime changed.
    pub inodes: Vec<u64>,
}

/// What changed between two snapshots of a service, for the kernel.
pub fn changed(old: Option<&crate::view::ServiceView>, new: &crate::view::ServiceView) -> Changed {
    let Some(old) = old else {
        // A new service: nothing of it was there to cache, but `/active`
        // lists it now.
        return Changed {
            names: Vec::new(),
            inodes: vec![Node::Active.ino()],
        };
    };
    let sid = new.sid;
    let names = crate::view::SVC_FILES
        .iter()
        .filter(|(_, f, _)| Node::SvcFile(sid, *f).cached())
        .filter(|(_, f, _)| match (old.file(*f), new.file(*f)) {
            (Some(a), Some(b)) => a.generation != b.generation,
            _ => true,
        })
        .map(|(name, _, _)| *name)
        .collect();
    let inodes = match old.mtime != new.mtime {
        true => [Node::Service(sid), Node::History(sid), Node::Instances(sid)]
            .into_iter()
            .map(Node::ino)
            .collect(),
        false => Vec::new(),
    };
    Changed { names, inodes }
}

/// How long the kernel may keep a name whose inode never changes (see
/// [`Node::stable_name`]); a removed service's name is dropped at once by a
/// FUSE notification.
const STABLE: Duration = Duration::from_secs(3600);

/// The file system.
pub struct Fs {
    views: Views,
    engine: mpsc::UnboundedSender<Msg>,
    waiters: Arc<Waiters>,
    open: Mutex<HashMap<u64, Arc<Open>>>,
    /// Each open directory's listing, taken when it is read from its start:
    /// `ls` reads a directory in several `getdents` calls, and entries
    /// served by position from snapshots that changed in between would
    /// mix two listings (an instance renumbered in between shows twice, or
    /// not at all).
    dirs: Mutex<HashMap<u64, Listing>>,
    next_fh: AtomicU64,
    uid: u32,
    gid: u32,
    started: SystemTime,
}

impl Fs {
    /// A file system over `views`, sending commands to `engine`.
    pub fn new(views: Views, engine: mpsc::UnboundedSender<Msg>, waiters: Arc<Waiters>) -> Fs {
        Fs {
            views,
            engine,
            waiters,
            open: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            started: SystemTime::now(),
        }
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Open>, Errno> {
        self.open.lock().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    /// A file on disk is readable when it holds more than the last read
    /// through this handle got (or less: begun again); else inotify wakes
    /// the kernel when it is written.
    fn poll_disk(
        &self,
        file: &std::fs::File,
        end: &AtomicU64,
        fh: u64,
        ph: fuser::PollNotifier,
        flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        let readable = fuser::PollEvents::POLLIN | fuser::PollEvents::POLLRDNORM;
        let Some(disk) = self.waiters.disk() else {
            return reply.poll(readable);
        };
        let changed = || {
            disk.is_closing()
                || file
                    .metadata()
                    .map_or(true, |m| m.len() != end.load(Ordering::SeqCst))
        };
        if changed() {
            return reply.poll(readable);
        }
        if flags.contains(fuser::PollFlags::FUSE_POLL_SCHEDULE_NOTIFY) {
            let wake = Box::new(move || {
                let _ = ph.notify();
            });
            if !disk.wait(file, fh, wake) {
                return reply.poll(readable);
            }
        }
        match changed() {
            true => reply.poll(readable),
            false => reply.poll(fuser::PollEvents::empty()),
        }
    }

    /// Answers a read now, or parks it (a `wait` mid-rollout) under the
    /// waiters' lock, so that a snapshot published meanwhile answers it.
    fn read_or_park(&self, open: &Open, offset: u64, size: u32, pid: u32, reply: ReplyData) {
        let Open::Wait { sid, answer } = open else {
            return match self.read_open(open, offset, size) {
                Ok(Reading::Data(d)) => reply.data(&d),
                Ok(Reading::Later) => reply.error(Errno::EIO),
                Err(e) => reply.error(e),
            };
        };
        let mut parked = self.waiters.parked.lock();
        match self.read_open(open, offset, size) {
            Ok(Reading::Data(d)) => {
                drop(parked);
                reply.data(&d)
            }
            Ok(Reading::Later) => parked.push(Parked {
                sid: *sid,
                pid,
                offset,
                size,
                answer: answer.clone(),
                reply,
            }),
            Err(e) => {
                drop(parked);
                reply.error(e)
            }
        }
    }

    /// Sends a ctl write's command to the runtime; its writer is answered
    /// once the runtime has acted.
    fn write_ctl(&self, open: &Open, offset: u64, data: &[u8], reply: ReplyWrite) {
        let answered = move |written: Result<u32, Errno>| match written {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        };
        let msg = match self.write_open(open, offset, data, answered) {
            Ok(m) => m,
            Err((e, answered)) => return answered(Err(e)),
        };
        if let Err(mpsc::error::SendError(
            Msg::Ctl { done, .. }
            | Msg::ApplyAll { done }
            | Msg::ReExec { done }
            | Msg::HostCtl { done, .. },
        )) = self.engine.send(msg)
        {
            done(Err(Refusal {
                kind: RefusalKind::Busy,
                message: "deployd is shutting down".into(),
            }));
        }
    }
}

fn node(ino: INodeNo) -> Result<Node, Errno> {
    Node::from_ino(ino.0).ok_or(Errno::ENOENT)
}

impl Fs {
    /// The attributes of `ino`. A file the kernel caches whose content
    /// changed since this inode was its number is stale (`ESTALE`: the
    /// kernel looks its name up again and finds the new one).
    fn attr_of(&self, ino: INodeNo) -> Result<(Node, fuser::FileAttr), Errno> {
        let n = node(ino)?;
        let attr = self.attr(n)?;
        match attr.ino == ino {
            true => Ok((n, attr)),
            false => Err(Errno::ESTALE),
        }
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = node(parent).and_then(|p| {
            let name = name.to_str().ok_or(Errno::ENOENT)?;
            let n = self.lookup_node(p, name)?;
            Ok((n, self.attr(n)?))
        });
        match r {
            Ok((n, attr)) => {
                let entry = if n.stable_name() { STABLE } else { TTL };
                reply.entry_with_ttls(&attr_ttl(n), &entry, &attr, Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr_of(ino) {
            Ok((n, attr)) => reply.attr(&attr_ttl(n), &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // `echo cmd > ctl` truncates first: that is accepted and does nothing.
        let r = node(ino).and_then(|n| match size {
            Some(0) if n.writable() => self.attr(n),
            _ => Err(Errno::EACCES),
        });
        match r {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match node(ino).and_then(|n| self.open_ino(n, ino.0, flags)) {
            Ok((open, keep)) => {
                // The pages of a file the kernel caches are its content at
                // this inode's generation: kept across opens. Any other
                // file is read from here every time.
                let flags = match keep {
                    true => FopenFlags::FOPEN_KEEP_CACHE,
                    false => FopenFlags::FOPEN_DIRECT_IO,
                };
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.open.lock().insert(fh, Arc::new(open));
                reply.opened(FileHandle(fh), flags);
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.handle(fh) {
            Ok(open) => self.read_or_park(&open, offset, size, req.pid(), reply),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.handle(fh) {
            Ok(open) => self.write_ctl(&open, offset, data, reply),
            Err(e) => reply.error(e),
        }
    }

    // No `flush`: fuser answers ENOSYS, and the kernel then stops sending
    // FLUSH on every close (there is nothing to flush here).

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(open) = self.open.lock().remove(&fh.0) {
            match &*open {
                Open::Events(log, _) => log.forget(fh.0),
                Open::Log(..) => {
                    if let Some(d) = self.waiters.disk() {
                        d.forget(fh.0);
                    }
                }
                _ => {}
            }
        }
        reply.ok();
    }

    /// `events` is readable when it holds more than the last read through
    /// this handle got (or was trimmed since); else the kernel is told at
    /// the next line (`deploy events -f` waits so, and costs nothing
    /// while nothing happens). Every other file is always readable.
    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        let readable = fuser::PollEvents::POLLIN | fuser::PollEvents::POLLRDNORM;
        let open = match self.handle(fh) {
            Ok(o) => o,
            Err(e) => return reply.error(e),
        };
        if let Open::Log(file, end) = &*open {
            return self.poll_disk(file, end, fh.0, ph, flags, reply);
        }
        let Open::Events(log, end) = &*open else {
            return reply.poll(readable);
        };
        let changed = || log.is_closing() || log.stat().0 != end.load(Ordering::SeqCst);
        if changed() {
            return reply.poll(readable);
        }
        if flags.contains(fuser::PollFlags::FUSE_POLL_SCHEDULE_NOTIFY) {
            // Asked before looking again: a line appended in between
            // wakes it, or is seen now.
            let wake = Box::new(move || {
                let _ = ph.notify();
            });
            if !log.wake_on_append(fh.0, wake) {
                return reply.poll(readable);
            }
        }
        match changed() {
            true => reply.poll(readable),
            false => reply.poll(fuser::PollEvents::empty()),
        }
    }

    // The namespace's shape is deployd's: nothing is created, removed,
    // renamed or linked through the mount. Each says so as /sys does
    // (`Operation not permitted`) rather than with fuser's default ENOSYS
    // (`Function not implemented`), which reads like a missing feature.

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match node(ino) {
            Ok(n) if n.is_dir() => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                // `/active`'s listing the kernel keeps, until a service
                // comes or goes.
                let flags = match n {
                    Node::Active => FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
                    _ => FopenFlags::empty(),
                };
                reply.opened(FileHandle(fh), flags);
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        // From the start (first read, or rewinddir): a new listing, kept
        // for the reads that go on from where this one stops.
        let kept = (offset > 0)
            .then(|| self.dirs.lock().get(&fh.0).cloned())
            .flatten();
        let r = node(ino).and_then(|dir| match kept {
            Some(e) => Ok((dir, e)),
            None => {
                let e = Arc::new(self.entries(dir)?);
                self.dirs.lock().insert(fh.0, e.clone());
                Ok((dir, e))
            }
        });
        let (dir, entries) = match r {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let dots = [(".".to_string(), dir), ("..".to_string(), dir.parent())];
        for (i, (name, n)) in dots
            .into_iter()
            .chain(entries.iter().cloned())
            .enumerate()
            .skip(offset as usize)
        {
            let kind = if n.is_dir() {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            let ino = match self.generation(n) {
                Ok(Some(g)) => n.ino_at(g),
                _ => n.ino(),
            };
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }
}
