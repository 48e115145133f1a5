//! Snapshots of the engine's state, which the namespace serves.
//!
//! The engine owns the truth; after each change it builds a [`ServiceView`]
//! with every status file already rendered, and publishes it in [`Views`].
//! The file system only clones `Arc`s out of it, so a read never waits on the
//! engine and never sees a half-updated service: `update_progress` is never
//! torn. A file's mtime is the time its content last changed.
//!
//! The event log is the exception: it is append-only, so the engine appends
//! to a shared [`EventLog`] and readers read it at their own offsets.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use deployd_lib::manifest::Version;
use deployd_lib::name::ServiceName;
use deployd_lib::rollout::{InstanceId, Role, Service, State};
use parking_lot::RwLock;

use crate::process;
use crate::proxy::Router;

/// Event log bytes kept in memory; past it, the older half is dropped.
pub const EVENTS_IN_MEMORY: usize = 1 << 20;

/// A rendered file and when its content last changed.
#[derive(Debug, Clone)]
pub struct FileData {
    /// The bytes.
    pub data: Arc<[u8]>,
    /// When they last changed.
    pub mtime: SystemTime,
    /// How many times they changed (wrapping): a file the kernel caches
    /// is a new inode at each change, as if renamed into place (see
    /// `fs::Node::ino_at`).
    pub generation: u32,
}

impl FileData {
    fn new(text: &str, now: SystemTime, prev: Option<&FileData>) -> FileData {
        match prev {
            Some(p) if &*p.data == text.as_bytes() => p.clone(),
            _ => FileData {
                data: Arc::from(text.as_bytes()),
                mtime: now,
                generation: prev.map_or(0, |p| p.generation.wrapping_add(1)),
            },
        }
    }
}

/// The files of `/deploy/active/SERVICE/` besides directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvcFile {
    /// `ctl`: commands.
    Ctl,
    /// `version`
    Version,
    /// `previous_version`
    PreviousVersion,
    /// `update_status`
    UpdateStatus,
    /// `update_progress`
    UpdateProgress,
    /// `state`: running or stopped.
    State,
    /// `failure`: why the last rollout failed, while `update_status` is
    /// `failed` (empty otherwise).
    Failure,
    /// `events`: the event log.
    Events,
    /// `manifest`: the target manifest's text.
    Manifest,
    /// `wait`: blocks while a rollout is in flight.
    Wait,
    /// `traffic`: what the public port served.
    Traffic,
    /// `access`: the port's access log (`access_log on`).
    Access,
    /// `failed_log`: the output of the last instance whose failure the
    /// events report.
    FailedLog,
    /// `hooks_log`: what the rollout hooks printed.
    HooksLog,
}

/// Where a file's bytes come from: one column of the file tables, which
/// both a file's attributes and its opening follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Rendered into the snapshot when it is published.
    Snapshot,
    /// Computed when it is looked at (live counters, `/proc`).
    Live,
    /// A file deployd writes to disk (a log), read from there.
    Disk,
    /// The service's event log, appended to while it is read.
    Events,
    /// A ctl file: commands written, their answers read back.
    Ctl,
    /// `wait`: answered once the rollout settles.
    Wait,
}

/// The service directory's files, in listing order: name, file, source.
pub const SVC_FILES: [(&str, SvcFile, Source); 14] = [
    ("ctl", SvcFile::Ctl, Source::Ctl),
    ("version", SvcFile::Version, Source::Snapshot),
    (
        "previous_version",
        SvcFile::PreviousVersion,
        Source::Snapshot,
    ),
    ("update_status", SvcFile::UpdateStatus, Source::Snapshot),
    ("update_progress", SvcFile::UpdateProgress, Source::Snapshot),
    ("state", SvcFile::State, Source::Snapshot),
    ("failure", SvcFile::Failure, Source::Snapshot),
    ("events", SvcFile::Events, Source::Events),
    ("manifest", SvcFile::Manifest, Source::Snapshot),
    ("wait", SvcFile::Wait, Source::Wait),
    ("traffic", SvcFile::Traffic, Source::Live),
    ("access", SvcFile::Access, Source::Disk),
    ("failed_log", SvcFile::FailedLog, Source::Disk),
    ("hooks_log", SvcFile::HooksLog, Source::Disk),
];

/// The files of `/deploy/active/SERVICE/instances/N/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstFile {
    /// `pid`
    Pid,
    /// `state`
    State,
    /// `version`
    Version,
    /// `port`
    Port,
    /// `log`: the instance's output.
    Log,
    /// `inflight`: requests or connections in flight on it.
    Inflight,
    /// `usage`: processes, memory and CPU time, read from `/proc`.
    Usage,
    /// `restarts`: how often its slot's instance was restarted.
    Restarts,
    /// `ctl`: `restart`, `signal SIG` for this instance.
    Ctl,
    /// `host`: the host it runs on (in a cluster only).
    Host,
    /// `status`: its last `STATUS=` (`health notify` only).
    Status,
}

/// The instance directory's files, in listing order: name, file, source.
pub const INST_FILES: [(&str, InstFile, Source); 11] = [
    ("pid", InstFile::Pid, Source::Snapshot),
    ("state", InstFile::State, Source::Snapshot),
    ("version", InstFile::Version, Source::Snapshot),
    ("port", InstFile::Port, Source::Snapshot),
    ("log", InstFile::Log, Source::Disk),
    ("inflight", InstFile::Inflight, Source::Live),
    ("usage", InstFile::Usage, Source::Live),
    ("restarts", InstFile::Restarts, Source::Snapshot),
    ("ctl", InstFile::Ctl, Source::Ctl),
    ("host", InstFile::Host, Source::Snapshot),
    ("status", InstFile::Status, Source::Snapshot),
];

impl SvcFile {
    /// Where its bytes come from.
    pub fn source(self) -> Source {
        SVC_FILES
            .iter()
            .find(|(_, f, _)| *f == self)
            .map_or(Source::Snapshot, |(_, _, s)| *s)
    }
}

impl InstFile {
    /// Where its bytes come from.
    pub fn source(self) -> Source {
        INST_FILES
            .iter()
            .find(|(_, f, _)| *f == self)
            .map_or(Source::Snapshot, |(_, _, s)| *s)
    }
}

/// One instance as the namespace shows it.
#[derive(Debug, Clone)]
pub struct InstanceView {
    /// Its identity (not shown).
    pub id: InstanceId,
    /// Its directory name.
    pub number: u32,
    /// `pid`
    pub pid: FileData,
    /// `state`
    pub state: FileData,
    /// `version`
    pub version: FileData,
    /// `port`
    pub port: FileData,
    /// `restarts`
    pub restarts: FileData,
    /// `host`, in a cluster.
    pub host: Option<FileData>,
    /// `status`, with `health notify`.
    pub status: Option<FileData>,
    /// The output file behind `log`.
    pub log: Option<PathBuf>,
    /// Its process group leader, while it runs (behind `usage`).
    pub leader: Option<u32>,
    /// The cgroup file that counts its memory, where one does.
    pub memory_file: Option<PathBuf>,
    /// Its state, for the metrics.
    pub now: State,
    /// Its slot's restarts, for the metrics.
    pub restarts_n: u32,
    /// When the instance appeared.
    pub created: SystemTime,
}

impl InstanceView {
    /// A rendered file.
    pub fn file(&self, f: InstFile) -> Option<&FileData> {
        match f {
            InstFile::Pid => Some(&self.pid),
            InstFile::State => Some(&self.state),
            InstFile::Version => Some(&self.version),
            InstFile::Port => Some(&self.port),
            InstFile::Restarts => Some(&self.restarts),
            InstFile::Host => self.host.as_ref(),
            InstFile::Status => self.status.as_ref(),
            InstFile::Log | InstFile::Inflight | InstFile::Usage | InstFile::Ctl => None,
        }
    }
}

/// One service as the namespace shows it.
#[derive(Debug, Clone)]
pub struct ServiceView {
    /// Its number in inode numbers.
    pub sid: u32,
    /// Its name.
    pub name: ServiceName,
    /// `version`
    pub version: FileData,
    /// `previous_version`
    pub previous_version: FileData,
    /// `update_status`
    pub update_status: FileData,
    /// `update_progress`
    pub update_progress: FileData,
    /// `state`
    pub state: FileData,
    /// `failure`
    pub failure: FileData,
    /// `manifest`
    pub manifest: FileData,
    /// What `wait` returns; `None` while a rollout is in flight.
    pub wait: Option<Arc<[u8]>>,
    /// `history/VERSION`, oldest first.
    pub history: Vec<(Version, FileData)>,
    /// `instances/N`, by number.
    pub instances: Vec<InstanceView>,
    /// `events`
    pub events: Arc<EventLog>,
    /// The live traffic counters behind `traffic`, when it has a port.
    pub traffic: Option<Arc<Router>>,
    /// The file behind `access`.
    pub access: PathBuf,
    /// The file behind `failed_log`.
    pub failed_log: PathBuf,
    /// The file behind `hooks_log`.
    pub hooks_log: PathBuf,
    /// The line of `/deploy/status`.
    pub summary: String,
    /// Its instances wanted (`replicas`, none while stopped), and how its
    /// rollouts ended: for the metrics.
    pub replicas: u32,
    pub tally: deployd_lib::rollout::Tally,
    /// When the service appeared.
    pub created: SystemTime,
    /// When anything in it last changed.
    pub mtime: SystemTime,
}

impl ServiceView {
    /// A pre-rendered status file; `None` for files rendered elsewhere.
    pub fn file(&self, f: SvcFile) -> Option<&FileData> {
        match f {
            SvcFile::Version => Some(&self.version),
            SvcFile::PreviousVersion => Some(&self.previous_version),
            SvcFile::UpdateStatus => Some(&self.update_status),
            SvcFile::UpdateProgress => Some(&self.update_progress),
            SvcFile::State => Some(&self.state),
            SvcFile::Failure => Some(&self.failure),
            SvcFile::Manifest => Some(&self.manifest),
            SvcFile::Ctl
            | SvcFile::Events
            | SvcFile::Wait
            | SvcFile::Traffic
            | SvcFile::Access
            | SvcFile::FailedLog
            | SvcFile::HooksLog => None,
        }
    }

    /// The instance with this number.
    pub fn instance(&self, number: u32) -> Option<&InstanceView> {
        self.instances.iter().find(|i| i.number == number)
    }

    /// A file computed when it is looked at ([`Source::Live`]).
    pub fn live(&self, f: SvcFile) -> Option<String> {
        match f {
            SvcFile::Traffic => Some(self.traffic()),
            _ => None,
        }
    }

    /// The file on disk behind a [`Source::Disk`] file.
    pub fn disk(&self, f: SvcFile) -> Option<&std::path::Path> {
        match f {
            SvcFile::Access => Some(&self.access),
            SvcFile::FailedLog => Some(&self.failed_log),
            SvcFile::HooksLog => Some(&self.hooks_log),
            _ => None,
        }
    }

    /// An instance's file computed when it is looked at.
    pub fn instance_live(&self, i: &InstanceView, f: InstFile) -> Option<String> {
        match f {
            InstFile::Inflight => Some(self.inflight(i.id)),
            InstFile::Usage => Some(ServiceView::usage(i)),
            _ => None,
        }
    }

    /// The `traffic` file, from the live counters.
    pub fn traffic(&self) -> String {
        match &self.traffic {
            None => "no port: deployd routes no traffic to this service\n".to_string(),
            Some(r) => r.render(|id| self.instances.iter().find(|i| i.id == id).map(|i| i.number)),
        }
    }

    /// An instance's `inflight` file.
    pub fn inflight(&self, id: InstanceId) -> String {
        format!("{}\n", self.traffic.as_ref().map_or(0, |r| r.inflight(id)))
    }

    /// An instance's `usage` file, read from `/proc` now.
    pub fn usage(i: &InstanceView) -> String {
        i.leader
            .map(process::procfs::usage)
            .unwrap_or_default()
            .render()
    }
}

/// What the engine knows of an instance beyond the state machine.
pub struct Runtime {
    /// `$PORT`
    pub port: Option<u16>,
    /// Its output file.
    pub log: Option<PathBuf>,
    /// In a cluster: its host.
    pub host: Option<String>,
    /// It runs on another host: its pid is not this host's.
    pub remote: bool,
    /// With `health notify`: its last `STATUS=`.
    pub status: Option<String>,
    /// The cgroup file that counts its memory, where one does.
    pub memory_file: Option<PathBuf>,
}

/// Everything a [`ServiceView`] is built from.
pub struct Parts<'a> {
    /// The service's number.
    pub sid: u32,
    /// Its name.
    pub name: &'a ServiceName,
    /// Its state machine.
    pub machine: &'a Service,
    /// The manifests of its history, oldest first.
    pub history: &'a [(Version, Arc<str>)],
    /// Its event log.
    pub events: &'a Arc<EventLog>,
    /// Per-instance runtime data.
    pub runtime: &'a dyn Fn(InstanceId) -> Option<Runtime>,
    /// Its routing table, when it has a port.
    pub traffic: Option<Arc<Router>>,
    /// Its access log's file.
    pub access: PathBuf,
    /// The file of `failed_log`.
    pub failed_log: PathBuf,
    /// The file of `hooks_log`.
    pub hooks_log: PathBuf,
}

/// Renders a service; files whose content did not change keep `prev`'s mtime.
pub fn build(p: Parts<'_>, prev: Option<&ServiceView>, now: SystemTime) -> ServiceView {
    let m = p.machine;
    let pf = |f: SvcFile| prev.and_then(|v| v.file(f));
    let (k, n) = m.progress();
    let status = m.update_status().name();
    let state = if m.is_removing() {
        "removing"
    } else if m.is_stopped() {
        "stopped"
    } else if !m.waiting().is_empty() {
        "waiting"
    } else {
        "running"
    };
    let previous = m
        .previous()
        .map(|s| format!("{}\n", s.version))
        .unwrap_or_default();
    let mut instances: Vec<InstanceView> =
        m.instances()
            .iter()
            .map(|i| {
                let pi = prev.and_then(|v| v.instances.iter().find(|x| x.id == i.id()));
                let rt = (p.runtime)(i.id());
                let pid = i.pid().map(|p| format!("{p}\n")).unwrap_or_default();
                let port = rt
                    .as_ref()
                    .and_then(|r| r.port)
                    .map(|p| format!("{p}\n"))
                    .unwrap_or_default();
                let remote = rt.as_ref().is_some_and(|r| r.remote);
                let host = rt.as_ref().and_then(|r| r.host.as_ref()).map(|h| {
                    FileData::new(&format!("{h}\n"), now, pi.and_then(|x| x.host.as_ref()))
                });
                // The slot's count belongs to the instance serving it.
                let restarts = match i.role() {
                    Role::Serving => m.restarts(i.slot()),
                    _ => 0,
                };
                let status = rt.as_ref().and_then(|r| r.status.as_ref()).map(|s| {
                    FileData::new(&format!("{s}\n"), now, pi.and_then(|x| x.status.as_ref()))
                });
                InstanceView {
                    host,
                    status,
                    id: i.id(),
                    number: i.number(),
                    pid: FileData::new(&pid, now, pi.map(|x| &x.pid)),
                    state: FileData::new(
                        &format!("{}\n", i.state().name()),
                        now,
                        pi.map(|x| &x.state),
                    ),
                    version: FileData::new(
                        &format!("{}\n", i.spec().version),
                        now,
                        pi.map(|x| &x.version),
                    ),
                    port: FileData::new(&port, now, pi.map(|x| &x.port)),
                    restarts: FileData::new(&format!("{restarts}\n"), now, pi.map(|x| &x.restarts)),
                    now: i.state(),
                    restarts_n: restarts,
                    memory_file: rt.as_ref().and_then(|r| r.memory_file.clone()),
                    log: rt.and_then(|r| r.log),
                    leader: i.pid().filter(|_| i.state() != State::Exited && !remote),
                    created: pi.map_or(now, |x| x.created),
                }
            })
            .collect();
    instances.sort_by_key(|i| i.number);
    let history = p
        .history
        .iter()
        .map(|(v, text)| {
            let old = prev.and_then(|pv| pv.history.iter().find(|(pv, _)| pv == v));
            (*v, FileData::new(text, now, old.map(|(_, f)| f)))
        })
        .collect();
    let summary = format!(
        "{} {} {status} {k}/{n} {}/{n} {state}\n",
        p.name,
        m.version(),
        m.healthy()
    );
    let mut view = ServiceView {
        sid: p.sid,
        name: p.name.clone(),
        version: FileData::new(&format!("{}\n", m.version()), now, pf(SvcFile::Version)),
        previous_version: FileData::new(&previous, now, pf(SvcFile::PreviousVersion)),
        update_status: FileData::new(&format!("{status}\n"), now, pf(SvcFile::UpdateStatus)),
        update_progress: FileData::new(&format!("{k}/{n}\n"), now, pf(SvcFile::UpdateProgress)),
        state: FileData::new(&format!("{state}\n"), now, pf(SvcFile::State)),
        failure: FileData::new(
            &m.failure().map(|f| format!("{f}\n")).unwrap_or_default(),
            now,
            pf(SvcFile::Failure),
        ),
        manifest: FileData::new(&m.target().text, now, pf(SvcFile::Manifest)),
        wait: m
            .wait_line()
            .map(|l| Arc::from(format!("{l}\n").into_bytes())),
        history,
        instances,
        events: p.events.clone(),
        traffic: p.traffic,
        access: p.access,
        failed_log: p.failed_log,
        hooks_log: p.hooks_log,
        summary,
        replicas: match m.is_stopped() {
            true => 0,
            false => m.target().manifest.replicas,
        },
        tally: m.tally().clone(),
        created: prev.map_or(now, |v| v.created),
        mtime: now,
    };
    let unchanged = prev.is_some_and(|pv| {
        pv.instances.len() == view.instances.len()
            && pv
                .instances
                .iter()
                .zip(&view.instances)
                .all(|(a, b)| a.id == b.id && a.number == b.number)
            && pv.history.len() == view.history.len()
    });
    if let (true, Some(pv)) = (unchanged, prev) {
        view.mtime = pv.mtime;
    }
    view
}

/// The published snapshots, shared by the engine (writer) and the file
/// system (readers).
#[derive(Clone, Default)]
pub struct Views {
    inner: Arc<RwLock<Namespace>>,
}

/// Every service's latest snapshot.
#[derive(Default)]
pub struct Namespace {
    /// Service number by name, in name order.
    pub by_name: BTreeMap<ServiceName, u32>,
    /// Snapshot by service number.
    pub by_sid: HashMap<u32, Arc<ServiceView>>,
    /// When a service last appeared or went.
    pub mtime: Option<SystemTime>,
    /// Every recorded service is back (deployd started or replaced
    /// itself): until then the root `ctl` is not there, so whoever sees it
    /// sees every service.
    pub whole: bool,
    /// In a cluster: `/deploy/cluster` and `/deploy/hosts/`.
    pub cluster: Option<Arc<ClusterView>>,
}

/// The cluster as this host's copy of etcd shows it.
#[derive(Debug)]
pub struct ClusterView {
    /// `/deploy/cluster`.
    pub summary: FileData,
    /// `/deploy/hosts/HOST`, by name.
    pub hosts: Vec<HostView>,
    /// When a host appeared or went.
    pub mtime: SystemTime,
}

/// One host of `/deploy/hosts/`.
#[derive(Debug, Clone)]
pub struct HostView {
    /// Its number in inode numbers.
    pub hid: u32,
    /// Its name.
    pub name: deployd_lib::name::HostName,
    /// `state`: `up`, `down` or `draining`.
    pub state: FileData,
    /// `address`
    pub address: FileData,
    /// `instances`: `SERVICE N` per line.
    pub instances: FileData,
}

/// The files of `/deploy/hosts/HOST/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFile {
    /// `state`
    State,
    /// `address`
    Address,
    /// `instances`
    Instances,
    /// `ctl`: `drain`, `undrain`.
    Ctl,
}

/// A host directory's files, in listing order.
pub const HOST_FILES: [(&str, HostFile); 4] = [
    ("state", HostFile::State),
    ("address", HostFile::Address),
    ("instances", HostFile::Instances),
    ("ctl", HostFile::Ctl),
];

impl HostView {
    /// A rendered file (not `ctl`).
    pub fn file(&self, f: HostFile) -> Option<&FileData> {
        match f {
            HostFile::State => Some(&self.state),
            HostFile::Address => Some(&self.address),
            HostFile::Instances => Some(&self.instances),
            HostFile::Ctl => None,
        }
    }
}

impl ClusterView {
    /// A host by number.
    pub fn host(&self, hid: u32) -> Option<&HostView> {
        self.hosts.iter().find(|h| h.hid == hid)
    }
}

/// Renders a file that keeps `prev`'s mtime if its content did not change.
pub fn file_data(text: &str, now: SystemTime, prev: Option<&FileData>) -> FileData {
    FileData::new(text, now, prev)
}

impl Views {
    /// Publishes a service's new snapshot.
    pub fn publish(&self, view: Arc<ServiceView>) {
        let mut ns = self.inner.write();
        if ns.by_name.insert(view.name.clone(), view.sid).is_none() {
            ns.mtime = Some(SystemTime::now());
        }
        ns.by_sid.insert(view.sid, view);
    }

    /// Publishes the cluster's view.
    pub fn set_cluster(&self, view: Arc<ClusterView>) {
        self.inner.write().cluster = Some(view);
    }

    /// The cluster's view, in a cluster.
    pub fn cluster(&self) -> Option<Arc<ClusterView>> {
        self.inner.read().cluster.clone()
    }

    /// Says that every recorded service is published.
    pub fn set_whole(&self) {
        self.inner.write().whole = true;
    }

    /// Whether every recorded service is published.
    pub fn whole(&self) -> bool {
        self.inner.read().whole
    }

    /// Takes a service out of the namespace.
    pub fn remove(&self, sid: u32) {
        let mut ns = self.inner.write();
        if let Some(v) = ns.by_sid.remove(&sid) {
            ns.by_name.remove(&v.name);
            ns.mtime = Some(SystemTime::now());
        }
    }

    /// A service's snapshot.
    pub fn get(&self, sid: u32) -> Option<Arc<ServiceView>> {
        self.inner.read().by_sid.get(&sid).cloned()
    }

    /// A service's snapshot, by name.
    pub fn by_name(&self, name: &str) -> Option<Arc<ServiceView>> {
        let ns = self.inner.read();
        let sid = ns
            .by_name
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, s)| *s)?;
        ns.by_sid.get(&sid).cloned()
    }

    /// Wakes every follower of every service's `events` (before an
    /// unmount, which a file held open would hold up).
    pub fn wake_followers(&self) {
        let logs: Vec<Arc<EventLog>> =
            self.with(|ns| ns.by_sid.values().map(|v| v.events.clone()).collect());
        for log in logs {
            log.close();
        }
    }

    /// Runs `f` on the whole namespace under the read lock; keep it short.
    pub fn with<T>(&self, f: impl FnOnce(&Namespace) -> T) -> T {
        f(&self.inner.read())
    }
}

/// A service's event log in memory: the end of the log on disk plus what
/// was appended since.
pub struct EventLog {
    inner: RwLock<(Vec<u8>, SystemTime)>,
    /// Readers waiting for the next line (a `poll` on an open `events`),
    /// by their handle: each called once, at the next append.
    waiting: parking_lot::Mutex<HashMap<u64, Box<dyn FnOnce() + Send>>>,
    /// deployd is unmounting: no reader is to wait any more.
    closing: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("len", &self.stat().0)
            .finish()
    }
}

/// Readers one log keeps waiting for its next line at most (one per open
/// handle; a later wait of the same handle replaces its earlier one).
const MAX_WAITING: usize = 4096;

impl EventLog {
    /// A log holding `initial`.
    pub fn new(initial: Vec<u8>) -> EventLog {
        EventLog {
            inner: RwLock::new((initial, SystemTime::now())),
            waiting: parking_lot::Mutex::new(HashMap::new()),
            closing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Calls `wake` at the next append, once: the reader with handle
    /// `handle` waits for the next line. `false` if too many wait already
    /// (the reader falls back to reading again later).
    pub fn wake_on_append(&self, handle: u64, wake: Box<dyn FnOnce() + Send>) -> bool {
        let mut w = self.waiting.lock();
        if w.len() >= MAX_WAITING && !w.contains_key(&handle) {
            return false;
        }
        w.insert(handle, wake);
        true
    }

    /// deployd is about to unmount: every reader waiting is woken and
    /// none waits from now on (a follower closes its file, and opens it
    /// again later, on the next deployd's mount).
    pub fn close(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake_all();
    }

    /// Whether readers are to wait no more ([`EventLog::close`]).
    pub fn is_closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wakes every reader waiting for a line now.
    fn wake_all(&self) {
        let woken = std::mem::take(&mut *self.waiting.lock());
        for (_, wake) in woken {
            wake();
        }
    }

    /// A handle closed: it waits no more.
    pub fn forget(&self, handle: u64) {
        self.waiting.lock().remove(&handle);
    }

    /// Appends a complete line. Past [`EVENTS_IN_MEMORY`], the older half is
    /// dropped at a line boundary (readers see the file shrink, as with a
    /// rotated log).
    pub fn append(&self, line: &str) {
        let mut g = self.inner.write();
        let (data, mtime) = &mut *g;
        data.extend_from_slice(line.as_bytes());
        *mtime = SystemTime::now();
        if data.len() > EVENTS_IN_MEMORY {
            let half = data.len() / 2;
            let cut = data[half..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(data.len(), |p| half + p + 1);
            data.drain(..cut);
        }
        drop(g);
        self.wake_all();
    }

    /// Length in bytes and last change.
    pub fn stat(&self) -> (u64, SystemTime) {
        let g = self.inner.read();
        (g.0.len() as u64, g.1)
    }

    /// Up to `size` bytes from `offset`.
    pub fn read(&self, offset: u64, size: usize) -> Vec<u8> {
        let g = self.inner.read();
        let start = (offset as usize).min(g.0.len());
        let end = start.saturating_add(size).min(g.0.len());
        g.0[start..end].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_files_keep_their_mtime() {
        let t0 = SystemTime::UNIX_EPOCH;
        let t1 = t0 + std::time::Duration::from_secs(5);
        let a = FileData::new("2/3\n", t0, None);
        assert_eq!(FileData::new("2/3\n", t1, Some(&a)).mtime, t0);
        assert_eq!(FileData::new("3/3\n", t1, Some(&a)).mtime, t1);
    }

    #[test]
    fn event_log_trims_at_a_line_boundary() {
        let log = EventLog::new(Vec::new());
        let line = format!("{}\n", "x".repeat(99));
        for _ in 0..(EVENTS_IN_MEMORY / 100 + 10) {
            log.append(&line);
        }
        let (len, _) = log.stat();
        assert!(len as usize <= EVENTS_IN_MEMORY);
        assert_eq!(len % 100, 0, "whole lines only");
        assert_eq!(log.read(0, 100), line.as_bytes());
        assert_eq!(log.read(len, 10), b"");
    }
}
