//! The namespace, served through FUSE: a view of the engine's snapshots.
//!
//! ```text
//! /ctl  /status  /active/SERVICE/{ctl,version,previous_version,update_status,
//!   update_progress,state,events,manifest,wait}
//! /active/SERVICE/history/VERSION  /active/SERVICE/instances/N/{pid,state,version,port,log}
//! ```
//!
//! A directory is a static table; an inode number packs which service, which
//! instance and which file ([`Node`]), so a lookup is arithmetic. Each
//! `Filesystem` method is a thin adapter: the work is in functions returning
//! `Result<_, Errno>`, ending in one `match` into the reply.
//!
//! A status file is copied out of the snapshot when it is opened, so every
//! read of one open sees the same content. Reads of `wait` while a rollout is
//! in flight are parked and answered when it settles (or when the reader is
//! gone: fuser does not deliver interrupts, so a sweeper checks). Writes to a
//! `ctl` file are parsed here (with lib's parser) and sent to the engine; the
//! write is answered once the engine has acted and persisted, and the result
//! can be read back on the same file descriptor.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use deployd_lib::ctl::{self, RootCommand};
use deployd_lib::name::ServiceName;
use deployd_lib::rollout::{Refusal, RefusalKind};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::runtime::{CtlDone, Msg};
use crate::view::{INST_FILES, InstFile, SVC_FILES, ServiceView, SvcFile, Views};

/// Attributes are never cached: sizes and mtimes change all the time.
const TTL: Duration = Duration::ZERO;

/// How long the kernel may keep a name whose inode never changes (see
/// [`Node::stable_name`]); a removed service's name is dropped at once by a
/// FUSE notification.
const STABLE: Duration = Duration::from_secs(3600);

/// A file or directory of the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    /// `/`
    Root,
    /// `/ctl`
    RootCtl,
    /// `/status`
    Status,
    /// `/active`
    Active,
    /// `/active/SERVICE`
    Service(u32),
    /// `/active/SERVICE/FILE`
    SvcFile(u32, SvcFile),
    /// `/active/SERVICE/history`
    History(u32),
    /// `/active/SERVICE/history/VERSION`, by position in the history.
    HistoryFile(u32, u32),
    /// `/active/SERVICE/instances`
    Instances(u32),
    /// `/active/SERVICE/instances/N`
    Instance(u32, u32),
    /// `/active/SERVICE/instances/N/FILE`
    InstFile(u32, u32, InstFile),
}

const TAG_SERVICE: u64 = 1;
const TAG_HISTORY: u64 = 2;
const TAG_INSTANCES: u64 = 3;
const TAG_INSTANCE: u64 = 4;
const MAX_SUB: u32 = (1 << 24) - 1;

impl Node {
    /// The inode number: `tag << 56 | service << 32 | sub << 8 | file`.
    pub fn ino(self) -> u64 {
        let pack = |tag: u64, sid: u32, sub: u32, file: u64| {
            (tag << 56) | (u64::from(sid) << 32) | (u64::from(sub & MAX_SUB) << 8) | file
        };
        let svc_file = |f: SvcFile| {
            SVC_FILES
                .iter()
                .position(|(_, x)| *x == f)
                .map_or(0, |i| i as u64 + 1)
        };
        let inst_file = |f: InstFile| {
            INST_FILES
                .iter()
                .position(|(_, x)| *x == f)
                .map_or(0, |i| i as u64 + 1)
        };
        match self {
            Node::Root => 1,
            Node::RootCtl => 2,
            Node::Status => 3,
            Node::Active => 4,
            Node::Service(s) => pack(TAG_SERVICE, s, 0, 0),
            Node::SvcFile(s, f) => pack(TAG_SERVICE, s, 0, svc_file(f)),
            Node::History(s) => pack(TAG_HISTORY, s, 0, 0),
            Node::HistoryFile(s, i) => pack(TAG_HISTORY, s, i, 1),
            Node::Instances(s) => pack(TAG_INSTANCES, s, 0, 0),
            Node::Instance(s, n) => pack(TAG_INSTANCE, s, n, 0),
            Node::InstFile(s, n, f) => pack(TAG_INSTANCE, s, n, inst_file(f)),
        }
    }

    /// The node of an inode number, if it is one.
    pub fn from_ino(ino: u64) -> Option<Node> {
        let (tag, sid, sub, file) = (
            ino >> 56,
            ((ino >> 32) & 0xff_ffff) as u32,
            ((ino >> 8) & 0xff_ffff) as u32,
            (ino & 0xff) as usize,
        );
        Some(match (tag, file) {
            (0, _) => match ino {
                1 => Node::Root,
                2 => Node::RootCtl,
                3 => Node::Status,
                4 => Node::Active,
                _ => return None,
            },
            (TAG_SERVICE, 0) => Node::Service(sid),
            (TAG_SERVICE, f) => Node::SvcFile(sid, SVC_FILES.get(f - 1)?.1),
            (TAG_HISTORY, 0) => Node::History(sid),
            (TAG_HISTORY, 1) => Node::HistoryFile(sid, sub),
            (TAG_INSTANCES, 0) => Node::Instances(sid),
            (TAG_INSTANCE, 0) => Node::Instance(sid, sub),
            (TAG_INSTANCE, f) => Node::InstFile(sid, sub, INST_FILES.get(f - 1)?.1),
            _ => return None,
        })
    }

    fn is_dir(self) -> bool {
        matches!(
            self,
            Node::Root
                | Node::Active
                | Node::Service(_)
                | Node::History(_)
                | Node::Instances(_)
                | Node::Instance(..)
        )
    }

    /// Whether the name of this node always leads to the same inode while
    /// it exists, so the kernel may cache the name: everything but the
    /// instance directories (instances come and go under a number) and
    /// history files (named by position). A service's name is dropped from
    /// the cache when it is removed (the `removed` hook in `main`
    /// invalidates it).
    fn stable_name(self) -> bool {
        !matches!(self, Node::Instance(..) | Node::HistoryFile(..))
    }

    fn writable(self) -> bool {
        matches!(
            self,
            Node::RootCtl | Node::SvcFile(_, SvcFile::Ctl) | Node::InstFile(_, _, InstFile::Ctl)
        )
    }
}

/// Whose ctl file it is.
enum CtlOf {
    /// `/ctl`
    Root,
    /// `/active/SERVICE/ctl`
    Service(ServiceName),
    /// `/active/SERVICE/instances/N/ctl`
    Instance(ServiceName, u32),
}

impl CtlOf {
    fn service(&self) -> Option<&ServiceName> {
        match self {
            CtlOf::Root => None,
            CtlOf::Service(s) | CtlOf::Instance(s, _) => Some(s),
        }
    }

    /// What a read of it lists.
    fn usage(&self) -> String {
        match self {
            CtlOf::Root => ctl::root_usage(),
            CtlOf::Service(_) => ctl::usage(),
            CtlOf::Instance(..) => ctl::instance_usage(),
        }
    }

    fn parse(&self, data: &[u8]) -> Result<RootCommand, ctl::CtlError> {
        match self {
            CtlOf::Root => ctl::parse_root(data),
            CtlOf::Service(s) => ctl::parse_service(data).map(|v| RootCommand::One(s.clone(), v)),
            CtlOf::Instance(s, n) => {
                ctl::parse_instance(data, *n).map(|v| RootCommand::One(s.clone(), v))
            }
        }
    }
}

/// A file deployd writes to disk (a log): its size and mtime, if it
/// exists yet (`created` otherwise).
fn disk_stat(path: Option<&Path>, created: SystemTime) -> (u64, SystemTime, SystemTime) {
    let meta = path.and_then(|p| std::fs::metadata(p).ok());
    let len = meta.as_ref().map_or(0, |m| m.len());
    let m = meta.and_then(|m| m.modified().ok()).unwrap_or(created);
    (len, m, created)
}

/// Opens a file deployd writes to disk; empty while it does not exist.
fn disk_open(path: Option<&Path>) -> Open {
    match path.map(File::open) {
        Some(Ok(file)) => Open::Log(file),
        _ => Open::Bytes(Arc::from(Vec::new())),
    }
}

/// A directory's entries, as one readdir stream serves them.
type Listing = Arc<Vec<(String, Node)>>;

/// What an open file holds.
enum Open {
    /// A snapshot taken at open.
    Bytes(Arc<[u8]>),
    /// The service's live event log.
    Events(Arc<crate::view::EventLog>),
    /// An instance's output file.
    Log(File),
    /// A ctl file; holds the result of the last command written through it.
    Ctl {
        of: CtlOf,
        last: Arc<Mutex<Option<Answer>>>,
    },
    /// A wait file; holds its answer once there is one.
    Wait {
        sid: u32,
        answer: Arc<Mutex<Option<Arc<[u8]>>>>,
    },
}

/// A read of `wait` waiting for its rollout.
struct Parked {
    sid: u32,
    pid: u32,
    offset: u64,
    size: u32,
    answer: Arc<Mutex<Option<Arc<[u8]>>>>,
    reply: ReplyData,
}

/// Parked reads of `wait` files.
#[derive(Default)]
pub struct Waiters {
    parked: Mutex<Vec<Parked>>,
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

    /// Answers every parked read: deployd is stopping.
    pub fn shutdown(&self) {
        for p in std::mem::take(&mut *self.parked.lock()) {
            p.reply.error(Errno::EIO);
        }
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

/// A ctl command's answer, and the offset the descriptor is at after the
/// write (the kernel moves it past what a write took, not past a refused
/// one). A read from there on (`cat <&3` after `echo cmd >&3`) gets the
/// answer from its start, and so does one from offset 0 (`pread`, as
/// `deploy` reads it). Offsets in between count from 0 as well; only a
/// reader that took part of an answer at 0 and went on below `at` would
/// be misled, and answers are a line or a few, far below one read.
struct Answer {
    at: u64,
    text: String,
}

impl Answer {
    fn read(&self, offset: u64, size: u32) -> &[u8] {
        let from = if offset >= self.at {
            offset - self.at
        } else {
            offset
        };
        slice(self.text.as_bytes(), from, size)
    }
}

fn slice(data: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = (offset as usize).min(data.len());
    let end = start.saturating_add(size as usize).min(data.len());
    &data[start..end]
}

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

    fn view(&self, sid: u32) -> Result<Arc<ServiceView>, Errno> {
        self.views.get(sid).ok_or(Errno::ENOENT)
    }

    /// The text of `/status`: one line per service.
    fn status(&self) -> Arc<[u8]> {
        self.views.with(|ns| {
            let mut out = String::new();
            for sid in ns.by_name.values() {
                if let Some(v) = ns.by_sid.get(sid) {
                    out.push_str(&v.summary);
                }
            }
            Arc::from(out.into_bytes())
        })
    }

    fn attr(&self, node: Node) -> Result<FileAttr, Errno> {
        let (size, mtime, ctime) = match node {
            Node::Root | Node::RootCtl => (0, self.started, self.started),
            Node::Status => {
                let m = self.views.with(|ns| ns.mtime).unwrap_or(self.started);
                (
                    self.status().len() as u64,
                    SystemTime::now().max(m),
                    self.started,
                )
            }
            Node::Active => {
                let m = self.views.with(|ns| ns.mtime).unwrap_or(self.started);
                (0, m, m)
            }
            Node::Service(s) | Node::History(s) | Node::Instances(s) => {
                let v = self.view(s)?;
                (0, v.mtime, v.created)
            }
            Node::SvcFile(s, f) => {
                let v = self.view(s)?;
                match f {
                    SvcFile::Events => {
                        let (len, m) = v.events.stat();
                        (len, m, v.created)
                    }
                    SvcFile::Ctl | SvcFile::Wait => (0, v.mtime, v.created),
                    SvcFile::Traffic => (v.traffic().len() as u64, SystemTime::now(), v.created),
                    SvcFile::Access => disk_stat(Some(&v.access), v.created),
                    SvcFile::FailedLog => disk_stat(Some(&v.failed_log), v.created),
                    f => {
                        let d = v.file(f).ok_or(Errno::ENOENT)?;
                        (d.data.len() as u64, d.mtime, v.created)
                    }
                }
            }
            Node::HistoryFile(s, i) => {
                let v = self.view(s)?;
                let (_, d) = v.history.get(i as usize).ok_or(Errno::ENOENT)?;
                (d.data.len() as u64, d.mtime, d.mtime)
            }
            Node::Instance(s, n) => {
                let v = self.view(s)?;
                let i = v.instance(n).ok_or(Errno::ENOENT)?;
                (0, i.created, i.created)
            }
            Node::InstFile(s, n, f) => {
                let v = self.view(s)?;
                let i = v.instance(n).ok_or(Errno::ENOENT)?;
                match (f, i.file(f)) {
                    (_, Some(d)) => (d.data.len() as u64, d.mtime, i.created),
                    (InstFile::Inflight, _) => {
                        (v.inflight(i.id).len() as u64, SystemTime::now(), i.created)
                    }
                    (InstFile::Usage, _) => (
                        ServiceView::usage(i).len() as u64,
                        SystemTime::now(),
                        i.created,
                    ),
                    (InstFile::Log, _) => disk_stat(i.log.as_deref(), i.created),
                    (InstFile::Ctl, _) => (0, i.created, i.created),
                    _ => return Err(Errno::ENOENT),
                }
            }
        };
        let (kind, perm, nlink) = if node.is_dir() {
            (FileType::Directory, 0o555, 2)
        } else if node.writable() {
            (FileType::RegularFile, 0o644, 1)
        } else {
            (FileType::RegularFile, 0o444, 1)
        };
        Ok(FileAttr {
            ino: INodeNo(node.ino()),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: ctime.max(mtime),
            crtime: ctime,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn lookup_node(&self, parent: Node, name: &str) -> Result<Node, Errno> {
        let node = match parent {
            Node::Root => match name {
                "ctl" if self.views.whole() => Node::RootCtl,
                "status" => Node::Status,
                "active" => Node::Active,
                _ => return Err(Errno::ENOENT),
            },
            Node::Active => {
                let v = self.views.by_name(name).ok_or(Errno::ENOENT)?;
                Node::Service(v.sid)
            }
            Node::Service(s) => match name {
                "history" => Node::History(s),
                "instances" => Node::Instances(s),
                _ => {
                    let (_, f) = SVC_FILES
                        .iter()
                        .find(|(n, _)| *n == name)
                        .ok_or(Errno::ENOENT)?;
                    Node::SvcFile(s, *f)
                }
            },
            Node::History(s) => {
                let v = self.view(s)?;
                let i = v
                    .history
                    .iter()
                    .position(|(ver, _)| ver.to_string() == name)
                    .ok_or(Errno::ENOENT)?;
                Node::HistoryFile(s, i as u32)
            }
            Node::Instances(s) => {
                let n: u32 = name.parse().map_err(|_| Errno::ENOENT)?;
                if n.to_string() != name {
                    return Err(Errno::ENOENT);
                }
                Node::Instance(s, n)
            }
            Node::Instance(s, n) => {
                let (_, f) = INST_FILES
                    .iter()
                    .find(|(x, _)| *x == name)
                    .ok_or(Errno::ENOENT)?;
                Node::InstFile(s, n, *f)
            }
            _ => return Err(Errno::ENOTDIR),
        };
        Ok(node)
    }

    /// Directory entries after `.` and `..`: name, node.
    fn entries(&self, node: Node) -> Result<Vec<(String, Node)>, Errno> {
        Ok(match node {
            Node::Root => {
                let mut v = vec![
                    ("status".into(), Node::Status),
                    ("active".into(), Node::Active),
                ];
                if self.views.whole() {
                    v.insert(0, ("ctl".into(), Node::RootCtl));
                }
                v
            }
            Node::Active => self.views.with(|ns| {
                ns.by_name
                    .iter()
                    .map(|(n, s)| (n.to_string(), Node::Service(*s)))
                    .collect()
            }),
            Node::Service(s) => {
                self.view(s)?;
                let mut v: Vec<(String, Node)> = SVC_FILES
                    .iter()
                    .map(|(n, f)| (n.to_string(), Node::SvcFile(s, *f)))
                    .collect();
                v.push(("history".into(), Node::History(s)));
                v.push(("instances".into(), Node::Instances(s)));
                v
            }
            Node::History(s) => self
                .view(s)?
                .history
                .iter()
                .enumerate()
                .map(|(i, (ver, _))| (ver.to_string(), Node::HistoryFile(s, i as u32)))
                .collect(),
            Node::Instances(s) => self
                .view(s)?
                .instances
                .iter()
                .map(|i| (i.number.to_string(), Node::Instance(s, i.number)))
                .collect(),
            Node::Instance(s, n) => {
                self.view(s)?.instance(n).ok_or(Errno::ENOENT)?;
                INST_FILES
                    .iter()
                    .map(|(name, f)| (name.to_string(), Node::InstFile(s, n, *f)))
                    .collect()
            }
            _ => return Err(Errno::ENOTDIR),
        })
    }

    fn parent(node: Node) -> Node {
        match node {
            Node::Root | Node::RootCtl | Node::Status | Node::Active => Node::Root,
            Node::Service(_) => Node::Active,
            Node::SvcFile(s, _) | Node::History(s) | Node::Instances(s) => Node::Service(s),
            Node::HistoryFile(s, _) => Node::History(s),
            Node::Instance(s, _) => Node::Instances(s),
            Node::InstFile(s, n, _) => Node::Instance(s, n),
        }
    }

    fn do_open(&self, node: Node, flags: OpenFlags) -> Result<Open, Errno> {
        let writing = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if node.is_dir() {
            return Err(Errno::EISDIR);
        }
        if writing && !node.writable() {
            return Err(Errno::EACCES);
        }
        Ok(match node {
            Node::RootCtl => Open::Ctl {
                of: CtlOf::Root,
                last: Arc::default(),
            },
            Node::Status => Open::Bytes(self.status()),
            Node::SvcFile(s, f) => {
                let v = self.view(s)?;
                match f {
                    SvcFile::Ctl => Open::Ctl {
                        of: CtlOf::Service(v.name.clone()),
                        last: Arc::default(),
                    },
                    SvcFile::Events => Open::Events(v.events.clone()),
                    SvcFile::Traffic => Open::Bytes(Arc::from(v.traffic().into_bytes())),
                    // Nothing logged yet (or never: `access_log off`): empty.
                    SvcFile::Access => disk_open(Some(&v.access)),
                    SvcFile::FailedLog => disk_open(Some(&v.failed_log)),
                    SvcFile::Wait => Open::Wait {
                        sid: s,
                        answer: Arc::default(),
                    },
                    f => Open::Bytes(v.file(f).ok_or(Errno::ENOENT)?.data.clone()),
                }
            }
            Node::HistoryFile(s, i) => {
                let v = self.view(s)?;
                let (_, d) = v.history.get(i as usize).ok_or(Errno::ENOENT)?;
                Open::Bytes(d.data.clone())
            }
            Node::InstFile(s, n, f) => {
                let v = self.view(s)?;
                let i = v.instance(n).ok_or(Errno::ENOENT)?;
                match (f, i.file(f)) {
                    (_, Some(d)) => Open::Bytes(d.data.clone()),
                    (InstFile::Ctl, _) => Open::Ctl {
                        of: CtlOf::Instance(v.name.clone(), n),
                        last: Arc::default(),
                    },
                    (InstFile::Inflight, _) => {
                        Open::Bytes(Arc::from(v.inflight(i.id).into_bytes()))
                    }
                    (InstFile::Usage, _) => {
                        Open::Bytes(Arc::from(ServiceView::usage(i).into_bytes()))
                    }
                    // No output yet: empty.
                    (InstFile::Log, _) => disk_open(i.log.as_deref()),
                    _ => return Err(Errno::ENOENT),
                }
            }
            _ => return Err(Errno::ENOENT),
        })
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Open>, Errno> {
        self.open.lock().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    /// Reads that can be answered now; `Ok(None)` means the read was parked.
    fn do_read(&self, open: &Open, offset: u64, size: u32, pid: u32, reply: ReplyData) {
        let data: Vec<u8> = match open {
            Open::Bytes(b) => slice(b, offset, size).to_vec(),
            Open::Events(log) => log.read(offset, size as usize),
            Open::Log(f) => {
                let mut buf = vec![0u8; size as usize];
                match f.read_at(&mut buf, offset) {
                    Ok(n) => {
                        buf.truncate(n);
                        buf
                    }
                    Err(_) => return reply.error(Errno::EIO),
                }
            }
            Open::Ctl { of, last } => match &*last.lock() {
                Some(answer) => answer.read(offset, size).to_vec(),
                None => {
                    let usage = format!("commands: {}\n", of.usage());
                    slice(usage.as_bytes(), offset, size).to_vec()
                }
            },
            Open::Wait { sid, answer } => {
                if let Some(a) = answer.lock().clone() {
                    return reply.data(slice(&a, offset, size));
                }
                let mut parked = self.waiters.parked.lock();
                match self.views.get(*sid) {
                    None => return reply.error(Errno::ENOENT),
                    Some(v) => match &v.wait {
                        Some(a) => {
                            *answer.lock() = Some(a.clone());
                            slice(a, offset, size).to_vec()
                        }
                        None => {
                            parked.push(Parked {
                                sid: *sid,
                                pid,
                                offset,
                                size,
                                answer: answer.clone(),
                                reply,
                            });
                            return;
                        }
                    },
                }
            }
        };
        reply.data(&data)
    }

    fn do_write(&self, open: &Open, offset: u64, data: &[u8], reply: ReplyWrite) {
        let Open::Ctl { of, last } = open else {
            return reply.error(Errno::EBADF);
        };
        let refused = move |text: String| Answer { at: offset, text };
        let command = match of.parse(data) {
            Ok(x) => x,
            Err(e) => {
                *last.lock() = Some(refused(format!("error: {e}\n")));
                if let Some(s) = of.service() {
                    let shown: String = String::from_utf8_lossy(data).chars().take(60).collect();
                    let _ = self.engine.send(Msg::Note {
                        service: s.clone(),
                        line: format!("refused '{}': {e}", shown.trim_end().escape_debug()),
                    });
                }
                return reply.error(Errno::EINVAL);
            }
        };
        let len = data.len() as u32;
        let last = last.clone();
        let done: CtlDone = Box::new(move |result: Result<String, Refusal>| match result {
            Ok(msg) => {
                *last.lock() = Some(Answer {
                    at: offset.saturating_add(u64::from(len)),
                    text: format!("ok: {msg}\n"),
                });
                reply.written(len);
            }
            Err(r) => {
                *last.lock() = Some(refused(format!("error: {}\n", r.message)));
                reply.error(match r.kind {
                    RefusalKind::Invalid => Errno::EINVAL,
                    RefusalKind::Busy => Errno::EBUSY,
                    RefusalKind::NotFound => Errno::ENOENT,
                    RefusalKind::Storage(errno) => Errno::from_i32(errno),
                });
            }
        });
        let msg = match command {
            RootCommand::One(service, verb) => Msg::Ctl {
                service,
                verb,
                done,
            },
            RootCommand::ApplyAll => Msg::ApplyAll { done },
            RootCommand::ReExec => Msg::ReExec { done },
        };
        if let Err(mpsc::error::SendError(
            Msg::Ctl { done, .. } | Msg::ApplyAll { done } | Msg::ReExec { done },
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
                reply.entry_with_ttls(&TTL, &entry, &attr, Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match node(ino).and_then(|n| self.attr(n)) {
            Ok(attr) => reply.attr(&TTL, &attr),
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
        match node(ino).and_then(|n| self.do_open(n, flags)) {
            Ok(open) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.open.lock().insert(fh, Arc::new(open));
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
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
            Ok(open) => self.do_read(&open, offset, size, req.pid(), reply),
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
            Ok(open) => self.do_write(&open, offset, data, reply),
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
        self.open.lock().remove(&fh.0);
        reply.ok();
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
                reply.opened(FileHandle(fh), FopenFlags::empty());
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
        let dots = [(".".to_string(), dir), ("..".to_string(), Fs::parent(dir))];
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
            if reply.add(INodeNo(n.ino()), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_round_trip() {
        let mut nodes = vec![Node::Root, Node::RootCtl, Node::Status, Node::Active];
        for s in [1, 2, 1000, MAX_SUB] {
            nodes.push(Node::Service(s));
            nodes.push(Node::History(s));
            nodes.push(Node::Instances(s));
            for (_, f) in SVC_FILES {
                nodes.push(Node::SvcFile(s, f));
            }
            for n in [0, 1, 999, MAX_SUB] {
                nodes.push(Node::HistoryFile(s, n));
                nodes.push(Node::Instance(s, n));
                for (_, f) in INST_FILES {
                    nodes.push(Node::InstFile(s, n, f));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for n in nodes {
            assert_eq!(Node::from_ino(n.ino()), Some(n), "{n:?}");
            assert!(seen.insert(n.ino()), "{n:?} shares an inode");
        }
        assert_eq!(Node::from_ino(0), None);
        assert_eq!(Node::from_ino(5), None);
        assert_eq!(Node::from_ino((TAG_SERVICE << 56) | 200), None);
        assert_eq!(Node::from_ino(9 << 56), None);
    }

    #[test]
    fn only_ctl_files_are_writable() {
        assert!(Node::RootCtl.writable());
        assert!(Node::SvcFile(1, SvcFile::Ctl).writable());
        for (_, f) in SVC_FILES.iter().filter(|(_, f)| *f != SvcFile::Ctl) {
            assert!(!Node::SvcFile(1, *f).writable());
        }
        assert!(Node::InstFile(1, 0, InstFile::Ctl).writable());
        for (_, f) in INST_FILES.iter().filter(|(_, f)| *f != InstFile::Ctl) {
            assert!(!Node::InstFile(1, 0, *f).writable());
        }
    }
}
