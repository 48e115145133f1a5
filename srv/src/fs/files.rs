//! What each file of the namespace is: where its bytes come from (the
//! `Source` column of the file tables), its attributes, what an open of it
//! holds, and its reads and writes, each a plain function over the
//! snapshots returning a `Result`, tested without a mount.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use deployd_lib::ctl::{self, RootCommand};
use deployd_lib::name::{HostName, ServiceName};
use deployd_lib::rollout::{Refusal, RefusalKind};
use fuser::{Errno, FileAttr, FileType, INodeNo, OpenAccMode, OpenFlags};
use parking_lot::Mutex;

use super::Fs;
use super::node::Node;
use crate::runtime::{CtlDone, Msg};
use crate::view::{
    ClusterView, EventLog, HOST_FILES, INST_FILES, InstFile, SVC_FILES, ServiceView, Source,
};

/// Whose ctl file it is.
#[derive(Debug, Clone)]
pub enum CtlOf {
    /// `/ctl`
    Root,
    /// `/active/SERVICE/ctl`
    Service(ServiceName),
    /// `/active/SERVICE/instances/N/ctl`
    Instance(ServiceName, u32),
    /// `/hosts/HOST/ctl`
    Host(HostName),
}

/// What a ctl write asks.
enum Asked {
    /// A command of the root, a service or an instance.
    Command(RootCommand),
    /// `drain` (true) or `undrain` of a host.
    Host(HostName, bool),
}

impl CtlOf {
    fn service(&self) -> Option<&ServiceName> {
        match self {
            CtlOf::Root | CtlOf::Host(_) => None,
            CtlOf::Service(s) | CtlOf::Instance(s, _) => Some(s),
        }
    }

    /// What a read of it lists.
    fn usage(&self) -> String {
        match self {
            CtlOf::Root => ctl::root_usage(),
            CtlOf::Service(_) => ctl::usage(),
            CtlOf::Instance(..) => ctl::instance_usage(),
            CtlOf::Host(_) => ctl::host_usage(),
        }
    }

    fn parse(&self, data: &[u8]) -> Result<Asked, ctl::CtlError> {
        let one = |s: &ServiceName, v| Asked::Command(RootCommand::One(s.clone(), v));
        match self {
            CtlOf::Root => ctl::parse_root(data).map(Asked::Command),
            CtlOf::Service(s) => ctl::parse_service(data).map(|v| one(s, v)),
            CtlOf::Instance(s, n) => ctl::parse_instance(data, *n).map(|v| one(s, v)),
            CtlOf::Host(h) => ctl::parse_host(data).map(|on| Asked::Host(h.clone(), on)),
        }
    }
}

/// What a node is, now: a directory, or a file and where its bytes are.
enum Content {
    Dir {
        mtime: SystemTime,
        ctime: SystemTime,
    },
    /// Bytes in memory: a snapshot's, or computed now.
    Bytes {
        data: Arc<[u8]>,
        mtime: SystemTime,
        ctime: SystemTime,
    },
    /// A file the kernel caches ([`Node::cached`]): a snapshot's, with its
    /// generation (its inode number's).
    Kept {
        data: crate::view::FileData,
        ctime: SystemTime,
    },
    /// A file on disk, if it exists yet.
    Disk {
        path: Option<PathBuf>,
        ctime: SystemTime,
    },
    /// A service's event log.
    Events {
        log: Arc<EventLog>,
        ctime: SystemTime,
    },
    /// A ctl file.
    Ctl {
        of: CtlOf,
        mtime: SystemTime,
        ctime: SystemTime,
    },
    /// A `wait` file.
    Wait {
        sid: u32,
        mtime: SystemTime,
        ctime: SystemTime,
    },
}

/// A directory's entries, as one readdir stream serves them.
pub type Listing = Arc<Vec<(String, Node)>>;

/// What an open file holds.
pub enum Open {
    /// A snapshot taken at open.
    Bytes(Arc<[u8]>),
    /// The service's live event log, and where the last read through this
    /// handle ended (what `poll` compares the log's length with).
    Events(Arc<EventLog>, std::sync::atomic::AtomicU64),
    /// An output file on disk, and where the last read through this handle
    /// ended (what `poll` compares the file's length with).
    Log(File, std::sync::atomic::AtomicU64),
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

/// What a read gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Reading {
    /// These bytes, now.
    Data(Vec<u8>),
    /// Nothing yet: a `wait` whose rollout is in flight (the caller parks
    /// the read).
    Later,
}

/// A ctl command's answer, and the offset the descriptor is at after the
/// write (the kernel moves it past what a write took, not past a refused
/// one). A read from there on (`cat <&3` after `echo cmd >&3`) gets the
/// answer from its start, and so does one from offset 0 (`pread`, as
/// `deploy` reads it). Offsets in between count from 0 as well; only a
/// reader that took part of an answer at 0 and went on below `at` would
/// be misled, and answers are a line or a few, far below one read.
#[derive(Debug)]
pub struct Answer {
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

/// `size` bytes of `data` from `offset`, as far as there are.
pub fn slice(data: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = (offset as usize).min(data.len());
    let end = start.saturating_add(size as usize).min(data.len());
    &data[start..end]
}

/// A file deployd writes to disk (a log): its size and mtime, if it
/// exists yet (`created` otherwise).
fn disk_stat(path: Option<&Path>, created: SystemTime) -> (u64, SystemTime) {
    let meta = path.and_then(|p| std::fs::metadata(p).ok());
    let len = meta.as_ref().map_or(0, |m| m.len());
    let m = meta.and_then(|m| m.modified().ok()).unwrap_or(created);
    (len, m)
}

/// The errno a refusal is answered with.
pub fn errno(kind: RefusalKind) -> Errno {
    match kind {
        RefusalKind::Invalid => Errno::EINVAL,
        RefusalKind::Busy => Errno::EBUSY,
        RefusalKind::NotFound => Errno::ENOENT,
        RefusalKind::Storage(errno) => Errno::from_i32(errno),
        RefusalKind::Unavailable => Errno::EAGAIN,
    }
}

impl Fs {
    fn view(&self, sid: u32) -> Result<Arc<ServiceView>, Errno> {
        self.views.get(sid).ok_or(Errno::ENOENT)
    }

    fn cluster(&self) -> Result<Arc<ClusterView>, Errno> {
        self.views.cluster().ok_or(Errno::ENOENT)
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

    /// What `node` is now, its file's source followed.
    fn content(&self, node: Node) -> Result<Content, Errno> {
        let live = |text: String, ctime| Content::Bytes {
            data: Arc::from(text.into_bytes()),
            mtime: SystemTime::now(),
            ctime,
        };
        Ok(match node {
            Node::Root => Content::Dir {
                mtime: self.started,
                ctime: self.started,
            },
            Node::RootCtl => Content::Ctl {
                of: CtlOf::Root,
                mtime: self.started,
                ctime: self.started,
            },
            Node::Status => {
                let m = self.views.with(|ns| ns.mtime).unwrap_or(self.started);
                Content::Bytes {
                    data: self.status(),
                    mtime: SystemTime::now().max(m),
                    ctime: self.started,
                }
            }
            // Read when it is opened: counters move without a snapshot.
            Node::Metrics => live(crate::metrics::render(&self.views), self.started),
            Node::Active => {
                let m = self.views.with(|ns| ns.mtime).unwrap_or(self.started);
                Content::Dir { mtime: m, ctime: m }
            }
            Node::Service(s) | Node::History(s) | Node::Instances(s) => {
                let v = self.view(s)?;
                Content::Dir {
                    mtime: v.mtime,
                    ctime: v.created,
                }
            }
            Node::SvcFile(s, f) => {
                let v = self.view(s)?;
                let ctime = v.created;
                match f.source() {
                    Source::Snapshot => Content::Kept {
                        data: v.file(f).ok_or(Errno::ENOENT)?.clone(),
                        ctime,
                    },
                    Source::Live => live(v.live(f).ok_or(Errno::ENOENT)?, ctime),
                    Source::Disk => Content::Disk {
                        path: v.disk(f).map(Path::to_path_buf),
                        ctime,
                    },
                    Source::Events => Content::Events {
                        log: v.events.clone(),
                        ctime,
                    },
                    Source::Ctl => Content::Ctl {
                        of: CtlOf::Service(v.name.clone()),
                        mtime: v.mtime,
                        ctime,
                    },
                    Source::Wait => Content::Wait {
                        sid: s,
                        mtime: v.mtime,
                        ctime,
                    },
                }
            }
            Node::HistoryFile(s, i) => {
                let v = self.view(s)?;
                let (_, d) = v.history.get(i as usize).ok_or(Errno::ENOENT)?;
                Content::Bytes {
                    data: d.data.clone(),
                    mtime: d.mtime,
                    ctime: d.mtime,
                }
            }
            Node::Instance(s, n) => {
                let v = self.view(s)?;
                let i = v.instance(n).ok_or(Errno::ENOENT)?;
                Content::Dir {
                    mtime: i.created,
                    ctime: i.created,
                }
            }
            Node::Cluster => {
                let c = self.cluster()?;
                Content::Bytes {
                    data: c.summary.data.clone(),
                    mtime: c.summary.mtime,
                    ctime: self.started,
                }
            }
            Node::Hosts => {
                let c = self.cluster()?;
                Content::Dir {
                    mtime: c.mtime,
                    ctime: self.started,
                }
            }
            Node::Host(h) => {
                let c = self.cluster()?;
                c.host(h).ok_or(Errno::ENOENT)?;
                Content::Dir {
                    mtime: c.mtime,
                    ctime: c.mtime,
                }
            }
            Node::HostFile(h, f) => {
                let c = self.cluster()?;
                let host = c.host(h).ok_or(Errno::ENOENT)?;
                match host.file(f) {
                    Some(d) => Content::Bytes {
                        data: d.data.clone(),
                        mtime: d.mtime,
                        ctime: c.mtime,
                    },
                    None => Content::Ctl {
                        of: CtlOf::Host(host.name.clone()),
                        mtime: c.mtime,
                        ctime: c.mtime,
                    },
                }
            }
            Node::InstFile(s, n, f) => {
                let v = self.view(s)?;
                let i = v.instance(n).ok_or(Errno::ENOENT)?;
                let ctime = i.created;
                match f.source() {
                    Source::Snapshot => {
                        let d = i.file(f).ok_or(Errno::ENOENT)?;
                        Content::Bytes {
                            data: d.data.clone(),
                            mtime: d.mtime,
                            ctime,
                        }
                    }
                    Source::Live => live(v.instance_live(i, f).ok_or(Errno::ENOENT)?, ctime),
                    Source::Disk => Content::Disk {
                        path: i.log.clone(),
                        ctime,
                    },
                    Source::Ctl => Content::Ctl {
                        of: CtlOf::Instance(v.name.clone(), n),
                        mtime: ctime,
                        ctime,
                    },
                    Source::Events | Source::Wait => return Err(Errno::ENOENT),
                }
            }
        })
    }

    /// A node's attributes.
    pub(super) fn attr(&self, node: Node) -> Result<FileAttr, Errno> {
        let mut generation = 0;
        let (size, mtime, ctime) = match self.content(node)? {
            Content::Dir { mtime, ctime } => (0, mtime, ctime),
            Content::Bytes { data, mtime, ctime } => (data.len() as u64, mtime, ctime),
            Content::Kept { data, ctime } => {
                generation = data.generation;
                (data.data.len() as u64, data.mtime, ctime)
            }
            Content::Disk { path, ctime } => {
                let (len, m) = disk_stat(path.as_deref(), ctime);
                (len, m, ctime)
            }
            Content::Events { log, ctime } => {
                let (len, m) = log.stat();
                (len, m, ctime)
            }
            Content::Ctl { mtime, ctime, .. } | Content::Wait { mtime, ctime, .. } => {
                (0, mtime, ctime)
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
            ino: INodeNo(node.ino_at(generation)),
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

    /// What opening `node` holds: bytes copied out of the snapshot at
    /// open (every read of one open sees the same), or a live source.
    pub(super) fn open_node(&self, node: Node, flags: OpenFlags) -> Result<Open, Errno> {
        let writing = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if node.is_dir() {
            return Err(Errno::EISDIR);
        }
        if writing && !node.writable() {
            return Err(Errno::EACCES);
        }
        Ok(match self.content(node)? {
            Content::Dir { .. } => return Err(Errno::EISDIR),
            Content::Bytes { data, .. } => Open::Bytes(data),
            Content::Kept { data, .. } => Open::Bytes(data.data),
            // Nothing written yet (or never: `access_log off`): empty.
            Content::Disk { path, .. } => match path.map(File::open) {
                Some(Ok(file)) => Open::Log(file, Default::default()),
                _ => Open::Bytes(Arc::from(Vec::new())),
            },
            Content::Events { log, .. } => Open::Events(log, Default::default()),
            Content::Ctl { of, .. } => Open::Ctl {
                of,
                last: Arc::default(),
            },
            Content::Wait { sid, .. } => Open::Wait {
                sid,
                answer: Arc::default(),
            },
        })
    }

    /// Opens `node` by its inode number `ino`; whether the kernel may keep
    /// what it reads: only a cached file's, at the generation `ino` names,
    /// so that what the kernel keeps of an inode is always that inode's
    /// content. An older inode (a name looked up just before it changed)
    /// opens the content now, read past the kernel's cache.
    pub(super) fn open_ino(
        &self,
        node: Node,
        ino: u64,
        flags: OpenFlags,
    ) -> Result<(Open, bool), Errno> {
        let Node::SvcFile(s, f) = node else {
            return Ok((self.open_node(node, flags)?, false));
        };
        if !node.cached() {
            return Ok((self.open_node(node, flags)?, false));
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return Err(Errno::EACCES);
        }
        let d = self.view(s)?.file(f).ok_or(Errno::ENOENT)?.clone();
        Ok((Open::Bytes(d.data), node.ino_at(d.generation) == ino))
    }

    /// The generation of a file the kernel caches, as published now;
    /// `None` for any other node.
    pub(super) fn generation(&self, node: Node) -> Result<Option<u32>, Errno> {
        match node {
            Node::SvcFile(s, f) if node.cached() => {
                Ok(Some(self.view(s)?.file(f).ok_or(Errno::ENOENT)?.generation))
            }
            _ => Ok(None),
        }
    }

    /// A read of an open file: its bytes now, or [`Reading::Later`] for a
    /// `wait` whose rollout is in flight.
    pub(super) fn read_open(&self, open: &Open, offset: u64, size: u32) -> Result<Reading, Errno> {
        let data = match open {
            Open::Bytes(b) => slice(b, offset, size).to_vec(),
            Open::Events(log, end) => {
                let d = log.read(offset, size as usize);
                end.store(offset + d.len() as u64, std::sync::atomic::Ordering::SeqCst);
                d
            }
            Open::Log(f, end) => {
                let mut buf = vec![0u8; size as usize];
                let n = f.read_at(&mut buf, offset).map_err(|_| Errno::EIO)?;
                buf.truncate(n);
                end.store(offset + n as u64, std::sync::atomic::Ordering::SeqCst);
                buf
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
                    return Ok(Reading::Data(slice(&a, offset, size).to_vec()));
                }
                let v = self.views.get(*sid).ok_or(Errno::ENOENT)?;
                match &v.wait {
                    Some(a) => {
                        *answer.lock() = Some(a.clone());
                        slice(a, offset, size).to_vec()
                    }
                    None => return Ok(Reading::Later),
                }
            }
        };
        Ok(Reading::Data(data))
    }

    /// A write to an open ctl file: the command it asks for, for the
    /// runtime, with `answered` called once the runtime has acted (with
    /// the bytes written, or the errno of the refusal). A write that does
    /// not parse is refused here (EINVAL, and `answered` is not called),
    /// its answer readable on the file and said in the service's events.
    pub(super) fn write_open<F>(
        &self,
        open: &Open,
        offset: u64,
        data: &[u8],
        answered: F,
    ) -> Result<Msg, (Errno, F)>
    where
        F: FnOnce(Result<u32, Errno>) + Send + 'static,
    {
        let Open::Ctl { of, last } = open else {
            return Err((Errno::EBADF, answered));
        };
        let command = match of.parse(data) {
            Ok(x) => x,
            Err(e) => {
                *last.lock() = Some(Answer {
                    at: offset,
                    text: format!("error: {e}\n"),
                });
                if let Some(s) = of.service() {
                    let shown: String = String::from_utf8_lossy(data).chars().take(60).collect();
                    let _ = self.engine.send(Msg::Note {
                        service: s.clone(),
                        line: format!("refused '{}': {e}", shown.trim_end().escape_debug()),
                    });
                }
                return Err((Errno::EINVAL, answered));
            }
        };
        let len = data.len() as u32;
        let last = last.clone();
        let done: CtlDone = Box::new(move |result: Result<String, Refusal>| {
            let (answer, written) = match result {
                Ok(msg) => (
                    Answer {
                        at: offset.saturating_add(u64::from(len)),
                        text: format!("ok: {msg}\n"),
                    },
                    Ok(len),
                ),
                Err(r) => (
                    Answer {
                        at: offset,
                        text: format!("error: {}\n", r.message),
                    },
                    Err(errno(r.kind)),
                ),
            };
            *last.lock() = Some(answer);
            answered(written);
        });
        Ok(match command {
            Asked::Command(RootCommand::One(service, verb)) => Msg::Ctl {
                service,
                verb,
                done,
            },
            Asked::Command(RootCommand::ApplyAll) => Msg::ApplyAll { done },
            Asked::Command(RootCommand::ReExec) => Msg::ReExec { done },
            Asked::Host(host, drain) => Msg::HostCtl { host, drain, done },
        })
    }

    /// The node `name` names in the directory `parent`.
    pub(super) fn lookup_node(&self, parent: Node, name: &str) -> Result<Node, Errno> {
        let node = match parent {
            Node::Root => match name {
                "ctl" if self.views.whole() => Node::RootCtl,
                "status" => Node::Status,
                "metrics" => Node::Metrics,
                "active" => Node::Active,
                "cluster" if self.views.cluster().is_some() => Node::Cluster,
                "hosts" if self.views.cluster().is_some() => Node::Hosts,
                _ => return Err(Errno::ENOENT),
            },
            Node::Hosts => {
                let c = self.cluster()?;
                let h = c
                    .hosts
                    .iter()
                    .find(|h| h.name.as_str() == name)
                    .ok_or(Errno::ENOENT)?;
                Node::Host(h.hid)
            }
            Node::Host(h) => {
                let (_, f) = HOST_FILES
                    .iter()
                    .find(|(n, _)| *n == name)
                    .ok_or(Errno::ENOENT)?;
                Node::HostFile(h, *f)
            }
            Node::Active => {
                let v = self.views.by_name(name).ok_or(Errno::ENOENT)?;
                Node::Service(v.sid)
            }
            Node::Service(s) => match name {
                "history" => Node::History(s),
                "instances" => Node::Instances(s),
                _ => {
                    let (_, f, _) = SVC_FILES
                        .iter()
                        .find(|(n, _, _)| *n == name)
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
                let (_, f, _) = INST_FILES
                    .iter()
                    .find(|(x, _, _)| *x == name)
                    .ok_or(Errno::ENOENT)?;
                Node::InstFile(s, n, *f)
            }
            _ => return Err(Errno::ENOTDIR),
        };
        Ok(node)
    }

    /// Directory entries after `.` and `..`: name, node.
    pub(super) fn entries(&self, node: Node) -> Result<Vec<(String, Node)>, Errno> {
        Ok(match node {
            Node::Root => {
                let mut v = vec![
                    ("status".into(), Node::Status),
                    ("metrics".into(), Node::Metrics),
                    ("active".into(), Node::Active),
                ];
                if self.views.whole() {
                    v.insert(0, ("ctl".into(), Node::RootCtl));
                }
                if self.views.cluster().is_some() {
                    v.push(("cluster".into(), Node::Cluster));
                    v.push(("hosts".into(), Node::Hosts));
                }
                v
            }
            Node::Hosts => self
                .cluster()?
                .hosts
                .iter()
                .map(|h| (h.name.to_string(), Node::Host(h.hid)))
                .collect(),
            Node::Host(h) => {
                self.cluster()?.host(h).ok_or(Errno::ENOENT)?;
                HOST_FILES
                    .iter()
                    .map(|(n, f)| (n.to_string(), Node::HostFile(h, *f)))
                    .collect()
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
                    .map(|(n, f, _)| (n.to_string(), Node::SvcFile(s, *f)))
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
                let v = self.view(s)?;
                let i = v.instance(n).ok_or(Errno::ENOENT)?;
                INST_FILES
                    .iter()
                    // `host` only in a cluster.
                    .filter(|(_, f, _)| *f != InstFile::Host || i.host.is_some())
                    .filter(|(_, f, _)| *f != InstFile::Status || i.status.is_some())
                    .map(|(name, f, _)| (name.to_string(), Node::InstFile(s, n, *f)))
                    .collect()
            }
            _ => return Err(Errno::ENOTDIR),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::Waiters;
    use crate::view::{InstFile, SvcFile, Views};
    use deployd_lib::manifest;
    use deployd_lib::rollout::{Instant, Service, Spec};
    use tokio::sync::mpsc;

    /// A namespace with one service of two instances, `web` (sid 7), and
    /// the receiving end of what its writes send.
    fn namespace() -> (Fs, mpsc::UnboundedReceiver<Msg>) {
        over(view_of("exec app\nreplicas 2\n", b"t0 one\n", None))
    }

    /// A namespace of `view` alone, and the receiving end of what its
    /// writes send.
    fn over(view: ServiceView) -> (Fs, mpsc::UnboundedReceiver<Msg>) {
        let views = Views::default();
        views.publish(Arc::new(view));
        views.set_whole();
        let (tx, rx) = mpsc::unbounded_channel();
        (Fs::new(views, tx, Arc::new(Waiters::default())), rx)
    }

    /// A view of `web` (sid 7) running `text` with `events`, built over
    /// `prev`.
    fn view_of(text: &str, events: &[u8], prev: Option<&ServiceView>) -> ServiceView {
        let spec = Spec::new(manifest::parse(text.as_bytes()).unwrap(), text);
        let (machine, _) = Service::create(Instant::default(), spec.clone());
        let name = ServiceName::new("web").unwrap();
        let events = Arc::new(EventLog::new(events.to_vec()));
        let runtime = |_| None;
        crate::view::build(
            crate::view::Parts {
                sid: 7,
                name: &name,
                machine: &machine,
                history: &[(spec.version, spec.text.clone())],
                events: &events,
                runtime: &runtime,
                traffic: None,
                access: PathBuf::from("/nonexistent/access"),
                failed_log: PathBuf::from("/nonexistent/failed.log"),
                hooks_log: PathBuf::from("/nonexistent/hooks.log"),
            },
            prev,
            SystemTime::now(),
        )
    }

    /// What the kernel is told to drop at a publish: the names of the
    /// cached files whose content changed (each a new inode now) and the
    /// directories when their mtime did. An inode of an older content is
    /// stale; the current one opens and reads that content.
    #[test]
    fn a_changed_file_is_a_new_inode_and_the_old_one_is_stale() {
        let a = view_of("exec app\nreplicas 2\n", b"", None);
        let first = crate::fs::changed(None, &a);
        assert!(first.names.is_empty());
        assert_eq!(first.inodes, [Node::Active.ino()]);
        let same = view_of("exec app\nreplicas 2\n", b"", Some(&a));
        assert_eq!(crate::fs::changed(Some(&a), &same), Default::default());
        let b = view_of("exec app\nreplicas 3\n", b"", Some(&a));
        let changed = crate::fs::changed(Some(&a), &b);
        assert_eq!(changed.names, ["version", "update_progress", "manifest"]);
        let dirs: Vec<u64> = [Node::Service(7), Node::History(7), Node::Instances(7)]
            .into_iter()
            .map(Node::ino)
            .collect();
        assert_eq!(changed.inodes, dirs);
        for n in [
            SvcFile::Events,
            SvcFile::Wait,
            SvcFile::Ctl,
            SvcFile::Traffic,
        ] {
            assert!(!Node::SvcFile(7, n).cached(), "{n:?}");
        }
        let (fs, _rx) = over(a);
        let node = Node::SvcFile(7, SvcFile::UpdateProgress);
        let old = fs.attr(node).unwrap().ino.0;
        assert_eq!(old, node.ino_at(0));
        fs.views.publish(Arc::new(b));
        let new = fs.attr(node).unwrap().ino.0;
        assert_eq!(new, node.ino_at(1));
        let rd = OpenFlags(libc::O_RDONLY);
        // The old inode opens what is there now, past the kernel's cache;
        // the new one, for the kernel to keep.
        for (ino, keep) in [(old, false), (new, true)] {
            let (open, kept) = fs.open_ino(node, ino, rd).unwrap();
            assert_eq!(kept, keep);
            let Reading::Data(d) = fs.read_open(&open, 0, 4096).unwrap() else {
                panic!("a cached file's read waits");
            };
            assert_eq!(d, b"0/3\n");
        }
        assert_eq!(fs.attr_of(INodeNo(old)).err(), Some(Errno::ESTALE));
        // Nodes the kernel does not keep have one number.
        let events = Node::SvcFile(7, SvcFile::Events);
        assert_eq!(events.ino_at(5), events.ino());
    }

    fn read_all(fs: &Fs, node: Node) -> Result<String, Errno> {
        let open = fs.open_node(node, OpenFlags(libc::O_RDONLY))?;
        match fs.read_open(&open, 0, 4096)? {
            Reading::Data(d) => Ok(String::from_utf8(d).unwrap()),
            Reading::Later => Ok("(later)".into()),
        }
    }

    #[test]
    fn each_file_reads_from_its_source() {
        let (fs, _rx) = namespace();
        let web = Node::Service(7);
        let f = |name| fs.lookup_node(web, name).unwrap();
        // A snapshot's.
        assert_eq!(read_all(&fs, f("update_progress")).unwrap(), "0/2\n");
        assert_eq!(
            read_all(&fs, f("manifest")).unwrap(),
            "exec app\nreplicas 2\n"
        );
        // Live.
        assert_eq!(
            read_all(&fs, f("traffic")).unwrap(),
            "no port: deployd routes no traffic to this service\n"
        );
        // On disk, not there yet: empty.
        assert_eq!(read_all(&fs, f("access")).unwrap(), "");
        // The event log.
        assert_eq!(read_all(&fs, f("events")).unwrap(), "t0 one\n");
        // wait, mid-rollout: later.
        assert_eq!(read_all(&fs, f("wait")).unwrap(), "(later)");
        // A ctl file before any write: its commands.
        assert!(
            read_all(&fs, f("ctl"))
                .unwrap()
                .starts_with("commands: apply")
        );
        // The attributes follow the same source.
        let a = fs.attr(f("update_progress")).unwrap();
        assert_eq!((a.size, a.perm), (4, 0o444));
        assert_eq!(fs.attr(f("ctl")).unwrap().perm, 0o644);
        assert_eq!(fs.attr(f("events")).unwrap().size, 7);
        // The table's column and the files agree for every file.
        for (name, file, source) in SVC_FILES {
            assert_eq!(file.source(), source, "{name}");
            assert!(fs.attr(Node::SvcFile(7, file)).is_ok(), "{name}");
        }
        assert_eq!(InstFile::Log.source(), Source::Disk);
        assert_eq!(SvcFile::Wait.source(), Source::Wait);
        assert_eq!(
            fs.attr(Node::SvcFile(8, SvcFile::Version)),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            fs.open_node(f("version"), OpenFlags(libc::O_WRONLY)).err(),
            Some(Errno::EACCES)
        );
    }

    #[test]
    fn a_ctl_write_is_a_command_and_its_answer_is_read_back() {
        let (fs, mut rx) = namespace();
        let ctl = fs.lookup_node(Node::Service(7), "ctl").unwrap();
        let open = fs.open_node(ctl, OpenFlags(libc::O_RDWR)).unwrap();
        // Junk: refused here, the answer on the file, a line for events.
        let r = fs.write_open(&open, 0, b"bogus\n", |_| {});
        assert_eq!(r.err().map(|e| e.0), Some(Errno::EINVAL));
        let Reading::Data(answer) = fs.read_open(&open, 0, 4096).unwrap() else {
            panic!("later");
        };
        assert!(
            String::from_utf8(answer)
                .unwrap()
                .starts_with("error: unknown control message 'bogus'")
        );
        match rx.try_recv() {
            Ok(Msg::Note { service, line }) => {
                assert_eq!(service.as_str(), "web");
                assert!(line.starts_with("refused 'bogus': unknown control message"));
            }
            _ => panic!("no note"),
        }
        // A command: sent to the runtime; its answer comes back through
        // the file, and to the writer with its length or the errno.
        let (tx, written) = std::sync::mpsc::channel();
        let Ok(msg) = fs.write_open(&open, 6, b"pause\n", move |w| {
            let _ = tx.send(w);
        }) else {
            panic!("refused");
        };
        let Msg::Ctl {
            service,
            verb,
            done,
        } = msg
        else {
            panic!("not a ctl message");
        };
        assert_eq!((service.as_str(), verb.name()), ("web", "pause"));
        done(Err(Refusal {
            kind: RefusalKind::Invalid,
            message: "nothing to pause: no rollout in progress".into(),
        }));
        assert_eq!(written.recv().unwrap(), Err(Errno::EINVAL));
        let Reading::Data(answer) = fs.read_open(&open, 6, 4096).unwrap() else {
            panic!("later");
        };
        assert_eq!(
            String::from_utf8(answer).unwrap(),
            "error: nothing to pause: no rollout in progress\n"
        );
        // A file that is not a ctl file takes no write.
        let version = fs.lookup_node(Node::Service(7), "version").unwrap();
        let open = fs.open_node(version, OpenFlags(libc::O_RDONLY)).unwrap();
        let r = fs.write_open(&open, 0, b"x", |_| {});
        assert_eq!(r.err().map(|e| e.0), Some(Errno::EBADF));
    }

    #[test]
    fn directories_list_what_their_lookups_find() {
        let (fs, _rx) = namespace();
        for dir in [Node::Root, Node::Active, Node::Service(7), Node::History(7)] {
            for (name, node) in fs.entries(dir).unwrap() {
                assert_eq!(fs.lookup_node(dir, &name), Ok(node), "{name}");
            }
        }
        assert_eq!(fs.lookup_node(Node::Active, "nope"), Err(Errno::ENOENT));
        assert_eq!(fs.lookup_node(Node::Instances(7), "01"), Err(Errno::ENOENT));
        assert_eq!(fs.entries(Node::Status), Err(Errno::ENOTDIR));
    }
}
