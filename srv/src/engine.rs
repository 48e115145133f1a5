//! The engine: one task that owns the truth.
//!
//! It holds every service's state machine and runtime handles, and runs the
//! loop: take a message (a ctl command from the namespace, a probe result, an
//! exit from the reaper, a drained instance) or a due timer, feed it to the
//! service's machine, execute the actions it returns (spawn, signal, route,
//! log), persist what changed, publish a fresh snapshot for the namespace.
//! Data flows one way: command → machine → actions → effects → events →
//! snapshot → files.
//!
//! A ctl command is acknowledged only after its effects are persisted, so a
//! command that `write(2)` reported as done survives a kill -9.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use deployd_lib::ctl::Verb;
use deployd_lib::host;
use deployd_lib::manifest::{self, Health, LoadError, Version, VersionPrefix};
use deployd_lib::name::{self, ServiceName};
use deployd_lib::rollout::{
    self, Action, Command, Exit, Input, InstanceId, Instant, Refusal, RefusalKind, Role, Running,
    Service, Spec, State, UpdateStatus,
};
use deployd_lib::suggest;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::AbortHandle;

use crate::config::Config;
use crate::handoff::{self, Handoff};
use crate::probe;
use crate::process::{self, Children, Spawn, Waiter};
use crate::proxy::{self, Router};
use crate::store::{HISTORY, Saved, Store};
use crate::view::{self, EventLog, Runtime, ServiceView, Views};

mod after;

/// How a ctl command's result gets back to its writer.
pub type CtlDone = Box<dyn FnOnce(Result<String, Refusal>) + Send>;

/// What the engine is told.
pub enum Msg {
    /// A ctl command for a service.
    Ctl {
        /// The service.
        service: ServiceName,
        /// The command.
        verb: Verb,
        /// Called with the result once it is persisted.
        done: CtlDone,
    },
    /// `apply` on the root ctl: every manifest of the manifests directory.
    ApplyAll {
        /// Called with the result once it is persisted.
        done: CtlDone,
    },
    /// `reexec` on the root ctl: deployd replaces itself, keeping instances.
    ReExec {
        /// Called with the result once it is persisted.
        done: CtlDone,
    },
    /// A line for a service's event log (a ctl write that did not parse,
    /// a port that cannot be listened on).
    Note {
        /// The service.
        service: ServiceName,
        /// The line.
        line: String,
    },
    /// A probe result.
    Probe {
        /// The service's number.
        sid: u32,
        /// The instance.
        id: InstanceId,
        /// The result.
        result: Result<(), String>,
    },
    /// deployd could not do something for an instance for a shortage of
    /// its own (a probe it could not run): said in events, at most once
    /// every [`SHORT_SAID`], and never counted against the instance.
    Short {
        /// The service's number.
        sid: u32,
        /// The instance.
        id: InstanceId,
        /// `deployd is short of WHAT (ERROR)`, and what could not be done.
        why: String,
    },
    /// A sample of an instance's memory above its `memory_max`.
    OverMemory {
        /// The service's number.
        sid: u32,
        /// The instance.
        id: InstanceId,
        /// Resident bytes of its processes.
        rss: u64,
    },
    /// An instance's process was started, or could not be.
    Spawned {
        /// The service's number.
        sid: u32,
        /// The instance.
        id: InstanceId,
        /// Its pid, or why it could not start.
        result: Result<u32, Exit>,
    },
    /// An instance's output comes faster than its `log_rate`: its log's
    /// pump now waits.
    Throttled {
        /// The service's number.
        sid: u32,
        /// The instance.
        id: InstanceId,
    },
    /// An instance's output cannot be written to its log (`Err`: why), or
    /// can again (`Ok`: the bytes dropped meanwhile).
    Unwritable {
        /// The service's number.
        sid: u32,
        /// The instance.
        id: InstanceId,
        /// What its log's pump says.
        result: Result<u64, String>,
    },
    /// An instance routed out has nothing in flight any more.
    Drained {
        /// The service's number.
        sid: u32,
        /// The instance.
        id: InstanceId,
    },
    /// An instance's process ended.
    Exited {
        /// The service's number.
        sid: u32,
        /// The instance.
        id: InstanceId,
        /// How.
        exit: Exit,
    },
}

/// What the namespace must hear about, besides the snapshots it reads.
pub struct Hooks {
    /// Every published snapshot (the namespace answers parked reads).
    pub published: Box<dyn Fn(&ServiceView) + Send + Sync>,
    /// A service forgotten (the namespace drops its name from the kernel's
    /// cache).
    pub removed: Box<dyn Fn(&ServiceName) + Send + Sync>,
}

struct Inst {
    /// `None` until the spawning (main) thread has started the process.
    pid: Option<u32>,
    start_time: u64,
    /// A stop asked for before the process was started.
    stop_asked: Option<(i32, Duration)>,
    port: Option<u16>,
    log: PathBuf,
    /// Another descriptor of the read end of its output pipe, for a
    /// deployd replacing itself to hand on (the log pump owns the first).
    log_read: Option<OwnedFd>,
    prober: Option<AbortHandle>,
    /// Samples its memory, with `memory_max`, once its pid is known.
    memory: Option<AbortHandle>,
    /// Asks the prober for a probe now.
    poke: Arc<Notify>,
    exited: Arc<AtomicBool>,
    /// Hears when its log's pump has copied all the process printed;
    /// taken by the first look at its exit.
    pumped: Option<tokio::sync::oneshot::Receiver<()>>,
    stop_signal: i32,
    stop_timeout: Duration,
    memory_max: Option<u64>,
    /// What its env files said when it started ([`host::env_digest`]).
    env: u64,
}

impl Inst {
    /// Ends its probe and memory sampling tasks.
    fn stop_tasks(&mut self) {
        for task in [self.prober.take(), self.memory.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }

    /// An instance of manifest `m` whose process is not known yet.
    fn new(
        m: &manifest::Manifest,
        port: Option<u16>,
        log: PathBuf,
        log_read: Option<OwnedFd>,
        (prober, poke): (Option<AbortHandle>, Arc<Notify>),
        exited: Arc<AtomicBool>,
        env: u64,
    ) -> Inst {
        Inst {
            pid: None,
            start_time: 0,
            stop_asked: None,
            port,
            log,
            log_read,
            prober,
            memory: None,
            poke,
            exited,
            pumped: None,
            stop_signal: m.stop_signal.number(),
            stop_timeout: m.stop_timeout,
            memory_max: m.memory_max,
            env,
        }
    }
}

struct Entry {
    name: ServiceName,
    machine: Service,
    runtime: HashMap<InstanceId, Inst>,
    /// Manifests of the history, oldest first.
    history: Vec<(Version, Arc<str>)>,
    events: Arc<EventLog>,
    saved: Option<Saved>,
    pids: Vec<(u32, u64)>,
    view: Option<Arc<ServiceView>>,
    /// Its routing table, when it has a port.
    router: Option<Arc<Router>>,
    /// The output its events showed last.
    shown: Option<Shown>,
    /// Why its record or pid file could not be written last time, until
    /// a write succeeds; retried every [`SAVE_RETRY`].
    unsaved: Option<String>,
    /// When a shortage of deployd's was last said in its events.
    short_said: Option<Instant>,
}

/// Lines of an instance's output the events showed, the stamp of their
/// first line and when. The same lines again (a crash loop printing the
/// same error at each restart) are referred to rather than repeated, as
/// Kubernetes counts a repeated event; shown in full again after
/// [`SHOWN_AGAIN`], so the block referred to is never far back.
struct Shown {
    lines: Vec<String>,
    stamp: String,
    at: Instant,
}

const SHOWN_AGAIN: Duration = Duration::from_secs(3600);

/// How often a shortage of deployd's own is said again in a service's
/// events while it lasts.
const SHORT_SAID: Duration = Duration::from_secs(30);

/// How often a record that could not be written is tried again.
const SAVE_RETRY: Duration = Duration::from_secs(1);

/// The engine's state. See the module documentation.
pub struct Engine {
    config: Arc<Config>,
    store: Store,
    views: Views,
    hooks: Hooks,
    children: Children,
    spawner: process::Spawner,
    tx: mpsc::UnboundedSender<Msg>,
    services: HashMap<u32, Entry>,
    names: HashMap<ServiceName, u32>,
    next_sid: u32,
    epoch: tokio::time::Instant,
    /// Distinguishes this run's log files from earlier runs'.
    generation: u64,
    timers: BTreeSet<(Instant, u32)>,
    deadline_of: HashMap<u32, Instant>,
    ports: HashSet<u16>,
    pending: VecDeque<(u32, Input)>,
    dirty: HashSet<u32>,
    replies: Vec<(CtlDone, Result<String, Refusal>)>,
    /// Stop signals decided in this round, sent once the state that says
    /// so is saved and published.
    stops: Vec<Stop>,
    /// The binary `reexec` runs; `None`: `reexec` is refused.
    exe: Option<PathBuf>,
    /// `reexec` was accepted: the loop ends, the instances stay.
    reexec: bool,
    /// When to write again the records that could not be written.
    retry_save: Option<tokio::time::Instant>,
    /// The descriptors the public ports may hold together.
    budget: Arc<proxy::budget::Budget>,
}

/// How [`Engine::run`] ended.
pub enum Outcome {
    /// Told to stop: every instance is stopped.
    Stopped,
    /// Told to replace itself: traffic in flight finished, the instances
    /// run on; what the next deployd needs to take them back.
    ReExec(Handoff),
}

/// A stop signal to send to a process group.
struct Stop {
    pid: u32,
    signal: i32,
    timeout: Duration,
    exited: Arc<AtomicBool>,
}

impl Engine {
    /// An engine on a locked store; `tx` is the sending side of its queue.
    pub fn new(
        config: Arc<Config>,
        store: Store,
        views: Views,
        hooks: Hooks,
        children: Children,
        spawner: process::Spawner,
        tx: mpsc::UnboundedSender<Msg>,
    ) -> Engine {
        let generation = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let budget = proxy::budget::Budget::of_this_process();
        tracing::debug!(
            "public ports may hold {} descriptors together ({} client connections per port by default)",
            budget.total(),
            budget.default_max_connections()
        );
        Engine {
            config,
            store,
            views,
            hooks,
            children,
            spawner,
            tx,
            services: HashMap::new(),
            names: HashMap::new(),
            next_sid: 1,
            epoch: tokio::time::Instant::now(),
            generation,
            timers: BTreeSet::new(),
            deadline_of: HashMap::new(),
            ports: HashSet::new(),
            pending: VecDeque::new(),
            dirty: HashSet::new(),
            replies: Vec::new(),
            stops: Vec::new(),
            exe: None,
            reexec: false,
            retry_save: None,
            budget: Arc::new(budget),
        }
    }

    /// The binary `reexec` replaces deployd with: deployd's own path, as it
    /// was when it started (an upgrade puts the new one there).
    pub fn set_exe(&mut self, exe: PathBuf) {
        self.exe = Some(exe);
    }

    fn now(&self) -> Instant {
        Instant::from_epoch(self.epoch.elapsed())
    }

    /// Brings back every recorded service, or on a clean start applies every
    /// manifest of the manifests directory. First kills what a previous
    /// deployd left running.
    /// With `handoff` (deployd replaced itself), the instances it names are
    /// taken back rather than killed and started again.
    pub fn start(&mut self, handoff: Option<Handoff>) {
        let mut handed: HashMap<String, Vec<handoff::Instance>> = handoff
            .map(|h| {
                h.services
                    .into_iter()
                    .map(|s| (s.name, s.instances))
                    .collect()
            })
            .unwrap_or_default();
        let kept: HashSet<u32> = handed.values().flatten().map(|i| i.pid).collect();
        // What a deployd that did not stop its instances (killed, crashed)
        // left recorded: a clean stop leaves no pid behind.
        let mut ended: HashMap<String, Vec<u32>> = HashMap::new();
        let mut leftovers: Vec<(u32, u64)> = Vec::new();
        for (service, groups) in self.store.all_pids() {
            for (pid, start) in groups.into_iter().filter(|(p, _)| !kept.contains(p)) {
                ended.entry(service.clone()).or_default().push(pid);
                leftovers.push((pid, start));
            }
        }
        if !leftovers.is_empty() {
            let n = process::kill_leftovers(&leftovers);
            if n > 0 {
                tracing::info!("killed {n} process groups left by a previous deployd");
            }
        }
        let recorded = self.store.services();
        if recorded.is_empty() {
            self.apply_manifests_dir();
        }
        for name in &recorded {
            let name = name.clone();
            let running = handed.remove(name.as_str()).unwrap_or_default();
            let restored = if running.is_empty() {
                let ended = ended.remove(name.as_str()).unwrap_or_default();
                self.restore(&name, &recorded, &ended)
            } else {
                self.restore_adopting(&name, running)
            };
            if let Err(e) = restored {
                tracing::error!("{name}: cannot restore: {e}");
            }
        }
        // Once all are back: a service can wait only for one restored
        // stopped, whichever came first.
        let sids: Vec<u32> = self.services.keys().copied().collect();
        for sid in sids {
            self.say_stopped(sid);
        }
        // Instances of services that are no longer recorded.
        handed
            .into_values()
            .flatten()
            .for_each(handoff::Instance::discard);
        // And what was left of instances not taken back.
        process::cgroup::adopted_all();
        self.flush();
        // Now the root ctl appears: a service not there then is not
        // deployd still coming back, but gone (or never deployed).
        self.views.set_whole();
    }

    /// The `*.manifest` files of the manifests directory in name order, but
    /// not hidden ones: Emacs's lock file `.#web.manifest` while web is
    /// being edited, or macOS's `._web.manifest` in a copied directory, is
    /// no service.
    fn manifest_files(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.config.manifests)?
            .filter_map(|e| e.ok())
            .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."))
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "manifest"))
            .collect();
        files.sort();
        Ok(files)
    }

    /// Loads a manifest of the manifests directory ([`host::load`]), but
    /// not through a link that leads out of it: deployd runs as root, and a
    /// manifest that is a link to `/etc/shadow` would have its lines shown
    /// in the errors, in events that other users may read.
    fn load_file(&self, path: &std::path::Path) -> Result<manifest::Loaded, LoadError> {
        if path.is_symlink() {
            let dir = self.config.manifests.canonicalize();
            let target = path.canonicalize();
            if let (Ok(dir), Ok(target)) = (dir, target) {
                if !target.starts_with(&dir) {
                    return Err(LoadError::Io {
                        file: path.display().to_string(),
                        error: format!(
                            "a link to {}, outside the manifests directory; refused",
                            target.display()
                        ),
                        not_found: false,
                    });
                }
            }
        }
        host::load(path)
    }

    fn apply_manifests_dir(&mut self) {
        let files = match self.manifest_files() {
            Ok(f) => f,
            Err(e) => {
                let dir = self.config.manifests.display();
                tracing::warn!("manifests directory {dir}: {e}");
                return;
            }
        };
        let mut specs = Vec::new();
        for file in files {
            match self.load_file(&file) {
                Ok(loaded) => specs.push((loaded.service, Spec::new(loaded.manifest, loaded.text))),
                Err(e) => tracing::error!("not applied: {e}"),
            }
        }
        // A manifest whose after names a service that is not here is not
        // applied, as `apply` would refuse it; and then neither is one
        // that comes after it.
        loop {
            let mut bad = self.check_after(&specs);
            bad.extend(self.check_ports(&specs));
            if bad.is_empty() {
                break;
            }
            for (name, e) in bad {
                tracing::error!("not applied: {e}");
                specs.retain(|(n, _)| *n != name);
            }
        }
        let coming: Vec<ServiceName> = specs.iter().map(|(n, _)| n.clone()).collect();
        for (name, spec) in specs {
            if let Err(e) = self.create(name.clone(), spec, &coming) {
                tracing::error!("{name}: {e}");
            }
        }
    }

    /// `apply` on the root ctl: rolls out every manifest of the manifests
    /// directory, or none. Every manifest must parse and every service must
    /// accept its apply (tried first on a copy of its state machine);
    /// otherwise the refusal lists every reason and nothing changes.
    /// Answers `started: a, b; unchanged: c; no manifest: d` (empty parts
    /// left out; `no manifest`: services that run without a manifest file,
    /// left alone), then a `not started: REASON` for each service whose
    /// state could not be saved.
    fn apply_all(&mut self) -> Result<String, Refusal> {
        let dir = self.config.manifests.clone();
        let files = self.manifest_files().map_err(|e| Refusal {
            kind: RefusalKind::NotFound,
            message: format!("manifests directory {}: {e}", dir.display()),
        })?;
        if files.is_empty() {
            return Err(Refusal {
                kind: RefusalKind::NotFound,
                message: format!("no *.manifest file in {}", dir.display()),
            });
        }
        let mut specs = Vec::new();
        let mut errors = Vec::new();
        for file in &files {
            match self.load_file(file) {
                Ok(l) => specs.push((l.service, Spec::new(l.manifest, l.text))),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if errors.is_empty() {
            errors.extend(self.check_after(&specs).into_iter().map(|(_, e)| e));
            errors.extend(self.check_ports(&specs).into_iter().map(|(_, e)| e));
        }
        if !errors.is_empty() {
            return Err(Refusal {
                kind: RefusalKind::Invalid,
                message: errors.join("\n"),
            });
        }
        // Dry run, on copies: a refusal of one service changes nothing.
        let now = self.now();
        let mut refusals: Vec<(RefusalKind, String)> = Vec::new();
        let mut unchanged = Vec::new();
        for (name, spec) in &specs {
            let Some((sid, e)) = self
                .names
                .get(name)
                .and_then(|&s| Some((s, self.services.get(&s)?)))
            else {
                continue;
            };
            let mut copy = e.machine.clone();
            match copy
                .handle(now, Input::Command(Command::Apply(spec.clone())))
                .result
            {
                // Unless its env files changed: then apply_spec restarts it.
                Ok(m) if m.starts_with("unchanged") && self.stale_env(sid, spec).is_none() => {
                    unchanged.push(name.to_string())
                }
                Ok(_) => {}
                Err(r) => refusals.push((r.kind, format!("{name}: {}", r.message))),
            }
        }
        if let Some((kind, _)) = refusals.first() {
            return Err(Refusal {
                kind: *kind,
                message: refusals
                    .into_iter()
                    .map(|(_, m)| m)
                    .collect::<Vec<_>>()
                    .join("\n"),
            });
        }
        // Services that run but whose manifest is gone are left as they
        // are (removing one takes `remove`), and named, as docker compose
        // names its orphans, so the operator knows.
        let mut unlisted: Vec<String> = self
            .names
            .keys()
            .filter(|n| !specs.iter().any(|(s, _)| s == *n))
            .map(|n| n.to_string())
            .collect();
        unlisted.sort();
        let mut started = Vec::new();
        let coming: Vec<ServiceName> = specs
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| !self.names.contains_key(n))
            .collect();
        // What the dry run cannot foresee: the disk. A service whose
        // state cannot be saved is not started; the others are.
        let mut failed: Vec<Refusal> = Vec::new();
        for (name, spec) in specs {
            if unchanged.contains(&name.to_string()) {
                continue;
            }
            match self.apply_spec(&name, spec, &coming) {
                Ok(_) => started.push(name.to_string()),
                Err(r) => failed.push(r),
            }
        }
        if started.is_empty() && unchanged.is_empty() {
            if let Some(first) = failed.first() {
                return Err(Refusal {
                    kind: first.kind,
                    message: failed
                        .iter()
                        .map(|r| r.message.as_str())
                        .collect::<Vec<_>>()
                        .join("\n"),
                });
            }
        }
        let mut parts: Vec<String> = [
            ("started", started),
            ("unchanged", unchanged),
            ("no manifest", unlisted),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}: {}", v.join(", ")))
        .collect();
        parts.extend(failed.iter().map(|r| format!("not started: {}", r.message)));
        Ok(parts.join("; "))
    }

    /// A service's record and the manifests of its history.
    fn load(&self, name: &ServiceName) -> Result<(Saved, History), String> {
        let saved = self.store.load(name)?;
        let mut history = Vec::new();
        for v in &saved.history {
            match self.store.load_manifest(name, *v) {
                Ok(text) => history.push((*v, Arc::<str>::from(text))),
                Err(e) => tracing::warn!("{name}: manifest {v}: {e}"),
            }
        }
        Ok((saved, history))
    }

    /// Brings a recorded service back at its recorded versions; `coming`:
    /// every service being restored with it, which its `after` may name;
    /// `ended`: the pids its instances had when the deployd before ended
    /// without stopping them, which its events then say.
    fn restore(
        &mut self,
        name: &ServiceName,
        coming: &[ServiceName],
        ended: &[u32],
    ) -> Result<(), String> {
        let (saved, history) = self.load(name)?;
        let waiting = resolve(&history, saved.record.version)
            .map(|target| self.pending_after(name, &target.manifest, coming))
            .unwrap_or_default();
        let (machine, actions) =
            Service::restore_waiting(self.now(), &saved.record, |v| resolve(&history, v), waiting)?;
        let sid = self.add_entry(name.clone(), machine, history);
        if let Some(e) = self.services.get_mut(&sid) {
            e.saved = Some(saved);
        }
        let line = match ended {
            [] => "deployd started; starting the instances again".to_string(),
            pids => format!(
                "deployd started after one that ended without stopping its instances \
                 (killed or crashed): they ended with it (pids {}); starting them again",
                pids.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        self.log(sid, &line);
        self.execute(sid, actions);
        Ok(())
    }

    /// Restores a service whose instances ran on while deployd replaced
    /// itself: they are taken back (their output pipes, their exits, their
    /// probes); one that no longer fits its slot is killed.
    fn restore_adopting(
        &mut self,
        name: &ServiceName,
        mut running: Vec<handoff::Instance>,
    ) -> Result<(), String> {
        running.sort_by_key(|i| i.number);
        let list: Vec<Running> = running
            .iter()
            .map(|i| Running {
                slot: i.slot,
                number: i.number,
                version: i.version,
                pid: i.pid,
            })
            .collect();
        let now = self.now();
        let loaded = self.load(name).and_then(|(saved, history)| {
            let adopted = Service::adopt(now, &saved.record, |v| resolve(&history, v), &list)?;
            Ok((saved, history, adopted))
        });
        let (saved, history, adopted) = match loaded {
            Ok(x) => x,
            Err(e) => {
                running.into_iter().for_each(handoff::Instance::discard);
                return Err(e);
            }
        };
        let sid = self.add_entry(name.clone(), adopted.service, history);
        if let Some(e) = self.services.get_mut(&sid) {
            e.saved = Some(saved);
        }
        let mut kept = Vec::new();
        for (h, id) in running.into_iter().zip(adopted.ids) {
            match id {
                Some(id) => {
                    kept.push(h.number);
                    self.adopt_instance(sid, id, h);
                }
                None => h.discard(),
            }
        }
        if !kept.is_empty() {
            let msg = format!(
                "deployd replaced itself; {} kept running",
                rollout::instance_list(&kept)
            );
            self.log(sid, &msg);
        }
        self.execute(sid, adopted.actions);
        Ok(())
    }

    fn add_entry(
        &mut self,
        name: ServiceName,
        machine: Service,
        history: Vec<(Version, Arc<str>)>,
    ) -> u32 {
        let sid = self.next_sid;
        self.next_sid += 1;
        let events = Arc::new(EventLog::new(self.store.load_events(&name)));
        self.names.insert(name.clone(), sid);
        self.services.insert(
            sid,
            Entry {
                name,
                machine,
                runtime: HashMap::new(),
                history,
                events,
                saved: None,
                pids: Vec::new(),
                view: None,
                router: None,
                shown: None,
                unsaved: None,
                short_said: None,
            },
        );
        self.dirty.insert(sid);
        self.sync_proxy(sid);
        sid
    }

    /// Deploys a new service; `coming`: every service being deployed with
    /// it, which its `after` may name.
    fn create(
        &mut self,
        name: ServiceName,
        spec: Spec,
        coming: &[ServiceName],
    ) -> Result<String, Refusal> {
        let (version, text) = (spec.version, spec.text.clone());
        let history = vec![(version, text.clone())];
        let waiting = self.pending_after(&name, &spec.manifest, coming);
        let (machine, actions) = Service::create_waiting(self.now(), spec, waiting);
        // On disk before anything starts, as for any command.
        let saved = saved(&machine, &history);
        let written = self
            .store
            .create(&name)
            .and_then(|()| self.store.save_manifest(&name, version, &text))
            .and_then(|()| self.store.save(&name, &saved));
        if let Err(err) = written {
            let _ = self.store.remove(&name);
            return Err(storage_refusal(&name, &err));
        }
        // The deployment's own line, then what it waits for, if anything.
        let lines = if machine.waiting().is_empty() { 1 } else { 2 };
        let msg = actions
            .iter()
            .filter_map(|a| match a {
                Action::Event(e) => Some(e.as_str()),
                _ => None,
            })
            .take(lines)
            .collect::<Vec<_>>()
            .join("; ");
        let sid = self.add_entry(name, machine, history);
        if let Some(e) = self.services.get_mut(&sid) {
            e.saved = Some(saved);
        }
        self.execute(sid, actions);
        self.say_stopped(sid);
        Ok(msg)
    }

    /// Runs until the queue closes or `signals` (how many stop signals
    /// deployd has had) reaches one, then lets traffic in flight finish and
    /// stops every instance gracefully; a second signal skips the wait.
    pub async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        mut signals: watch::Receiver<u32>,
    ) -> Outcome {
        loop {
            let wake = self
                .timers
                .first()
                .map(|(t, _)| self.epoch + t.as_duration());
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    self.on_msg(msg);
                    // Take what else is queued before flushing once; not
                    // past an accepted `reexec`, which nothing may follow:
                    // what is left is refused while traffic finishes.
                    for _ in 0..1024 {
                        if self.reexec {
                            break;
                        }
                        match rx.try_recv() {
                            Ok(m) => self.on_msg(m),
                            Err(_) => break,
                        }
                    }
                }
                _ = sleep_until(wake) => self.on_timers(),
                _ = sleep_until(self.retry_save) => {
                    self.retry_save = None;
                    let unsaved = self.services.iter().filter(|(_, e)| e.unsaved.is_some());
                    self.dirty.extend(unsaved.map(|(sid, _)| *sid));
                }
                Ok(_) = signals.wait_for(|n| *n >= 1) => break,
            }
            self.flush();
            if self.reexec {
                break;
            }
        }
        // Replacing itself, deployd keeps its ports open through the wait.
        let sockets: Vec<OwnedFd> = match self.reexec {
            true => self
                .services
                .values()
                .filter_map(|e| e.router.as_ref()?.take_socket())
                .collect(),
            false => Vec::new(),
        };
        if self.reexec {
            let all: Vec<u32> = self.services.keys().copied().collect();
            self.finish_traffic(&mut rx, &mut signals, &all).await;
            if *signals.borrow() == 0 {
                return Outcome::ReExec(self.handoff(sockets));
            }
            self.shutdown(&mut rx, &all).await;
            return Outcome::Stopped;
        }
        // Services stop in `after` order: those that come after others
        // first, so that what they need outlives their requests in flight.
        let groups = self.stop_order();
        let many = groups.len() > 1;
        for group in groups {
            if many {
                let names: Vec<String> = group
                    .iter()
                    .filter_map(|sid| self.services.get(sid).map(|e| e.name.to_string()))
                    .collect();
                tracing::info!("stopping {}", names.join(", "));
            }
            self.finish_traffic(&mut rx, &mut signals, &group).await;
            self.shutdown(&mut rx, &group).await;
        }
        tracing::info!("every instance stopped");
        Outcome::Stopped
    }

    fn on_msg(&mut self, msg: Msg) {
        match msg {
            Msg::Ctl {
                service,
                verb,
                done,
            } => {
                let result = self.ctl(&service, verb);
                if let Err(r) = &result {
                    if let Some(&sid) = self.names.get(&service) {
                        let line = format!("refused: {}", r.message.lines().next().unwrap_or(""));
                        self.log(sid, &line);
                    }
                }
                self.replies.push((done, result));
            }
            Msg::ApplyAll { done } => {
                let result = self.apply_all();
                self.replies.push((done, result));
            }
            Msg::ReExec { done } => {
                let result = self.accept_reexec();
                self.replies.push((done, result));
            }
            Msg::Note { service, line } => {
                if let Some(&sid) = self.names.get(&service) {
                    self.log(sid, &line);
                }
            }
            Msg::Probe { sid, id, result } => {
                let _ = self.handle(sid, Input::Probe { id, result });
            }
            Msg::Short { sid, id, why } => {
                let now = self.now();
                let said = self.services.get_mut(&sid).and_then(|e| {
                    if e.short_said.is_some_and(|t| now.since(t) < SHORT_SAID) {
                        return None;
                    }
                    e.short_said = Some(now);
                    let i = e.machine.instances().iter().find(|i| i.id() == id)?;
                    Some(format!(
                        "{why}: a probe of instance {} could not run; not counted against it",
                        i.number()
                    ))
                });
                if let Some(line) = said {
                    tracing::warn!("{line}");
                    self.log(sid, &line);
                }
            }
            Msg::OverMemory { sid, id, rss } => {
                let _ = self.handle(sid, Input::OverMemory { id, rss });
            }
            Msg::Spawned { sid, id, result } => self.spawned(sid, id, result),
            Msg::Drained { sid, id } => {
                let _ = self.handle(sid, Input::Drained { id });
            }
            Msg::Throttled { sid, id } => {
                let said = self.services.get(&sid).and_then(|e| {
                    let i = e.machine.instances().iter().find(|i| i.id() == id)?;
                    let rate = manifest::format_size(i.spec().manifest.log_rate);
                    Some(format!(
                        "instance {} prints more than {rate} a second: its writes now wait for \
                         deployd to keep up (log_rate {rate})",
                        i.number()
                    ))
                });
                if let Some(line) = said {
                    self.log(sid, &line);
                }
            }
            Msg::Unwritable { sid, id, result } => {
                let said = self.services.get(&sid).and_then(|e| {
                    let i = e.machine.instances().iter().find(|i| i.id() == id)?;
                    let n = i.number();
                    Some(match &result {
                        Err(why) => format!(
                            "instance {n}: its output cannot be written to its log ({why}); \
                             dropped until it can be"
                        ),
                        Ok(dropped) => format!(
                            "instance {n}: its output is written to its log again \
                             ({dropped} bytes dropped)"
                        ),
                    })
                });
                if let Some(line) = said {
                    self.log(sid, &line);
                }
            }
            Msg::Exited { sid, id, exit } => {
                if let Some(e) = self.services.get_mut(&sid) {
                    if let Some(r) = &e.router {
                        r.close(id);
                    }
                }
                if self.defer_exit(sid, id, &exit) {
                    return;
                }
                let _ = self.handle(sid, Input::Exited { id, exit });
                // Released once the machine has it: it may ask for the
                // output in the instance's log.
                if let Some(inst) = self
                    .services
                    .get_mut(&sid)
                    .and_then(|e| e.runtime.remove(&id))
                {
                    self.release(inst);
                    self.dirty.insert(sid);
                }
            }
        }
    }

    /// `reexec`: accepted when every service has settled (no rollout in
    /// flight, every instance ready) and the binary is there; the loop then
    /// ends, traffic in flight finishes, and [`Engine::run`] returns the
    /// handoff.
    fn accept_reexec(&mut self) -> Result<String, Refusal> {
        let busy = |message: String| Refusal {
            kind: RefusalKind::Busy,
            message,
        };
        let Some(exe) = self.exe.clone() else {
            return Err(busy("deployd cannot find its own binary".into()));
        };
        if !process::is_executable_file(&exe) {
            return Err(Refusal {
                kind: RefusalKind::NotFound,
                message: format!("{} is not an executable file", exe.display()),
            });
        }
        for e in self.services.values() {
            let m = &e.machine;
            if m.is_stopped() {
                continue;
            }
            if matches!(
                m.update_status(),
                UpdateStatus::Rolling | UpdateStatus::Paused
            ) {
                return Err(busy(format!(
                    "{}: a rollout is in progress; reexec once it is over",
                    e.name
                )));
            }
            let replicas = m.target().manifest.replicas as usize;
            let ready = m
                .instances()
                .iter()
                .filter(|i| i.state() == State::Ready)
                .count();
            let handed = e
                .runtime
                .values()
                .all(|i| i.pid.is_some() && i.log_read.is_some());
            if ready != replicas && m.update_status() == UpdateStatus::Failed {
                // Nothing will bring the missing ones: say what will.
                return Err(busy(format!(
                    "{name}: its last rollout failed and {ready} of {replicas} instances are \
                     ready; apply a manifest that works (or remove {name}), then reexec",
                    name = e.name
                )));
            }
            if ready != replicas || m.instances().len() != replicas || !handed {
                return Err(busy(format!(
                    "{}: {ready} of {replicas} instances ready; reexec once every one is",
                    e.name
                )));
            }
        }
        self.reexec = true;
        let sids: Vec<u32> = self.services.keys().copied().collect();
        for sid in sids {
            self.log(
                sid,
                "deployd replacing itself (reexec); instances keep running",
            );
        }
        Ok(format!(
            "replacing deployd with {}; instances keep running",
            exe.display()
        ))
    }

    /// What the next deployd needs: each instance with its pid and output
    /// pipe, and every listening socket, their descriptors kept open across
    /// execve (and out of the engine's hands).
    fn handoff(&mut self, sockets: Vec<OwnedFd>) -> Handoff {
        let mut h = Handoff {
            pid: std::process::id(),
            ..Handoff::default()
        };
        // One socket per port: the services' own, then passed ones no
        // service listens on (a removed service's, waiting for its return).
        let mut ports = HashSet::new();
        let passed = proxy::activation::all()
            .into_iter()
            .flatten()
            .map(OwnedFd::from);
        for fd in sockets.into_iter().chain(passed) {
            let l = std::net::TcpListener::from(fd);
            let Ok(port) = l.local_addr().map(|a| a.port()) else {
                continue;
            };
            if ports.insert(port) {
                h.listeners.extend(handoff::pass(OwnedFd::from(l)));
            }
        }
        for e in self.services.values_mut() {
            let mut instances = Vec::new();
            for (id, inst) in &mut e.runtime {
                inst.stop_tasks();
                let Some(i) = e.machine.instances().iter().find(|i| i.id() == *id) else {
                    continue;
                };
                let (Some(pid), Some(read)) = (inst.pid, inst.log_read.take()) else {
                    continue;
                };
                let Some(log_fd) = handoff::pass(read) else {
                    continue;
                };
                instances.push(handoff::Instance {
                    slot: i.slot(),
                    number: i.number(),
                    version: i.spec().version,
                    pid,
                    start_time: inst.start_time,
                    port: inst.port,
                    log: inst.log.clone(),
                    log_fd,
                    env: Some(inst.env),
                });
            }
            h.services.push(handoff::Service {
                name: e.name.to_string(),
                instances,
            });
        }
        h
    }

    fn on_timers(&mut self) {
        let now = self.now();
        while let Some(&(t, sid)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.remove(&(t, sid));
            self.deadline_of.remove(&sid);
            let _ = self.handle(sid, Input::Tick);
        }
    }

    /// The refusal for a service that does not exist: with the name of one
    /// that does if it is close.
    fn unknown(&self, service: &ServiceName) -> Refusal {
        Refusal {
            kind: RefusalKind::NotFound,
            message: name::no_such_service(
                service.as_str(),
                self.names.keys().map(ServiceName::as_str),
            ),
        }
    }

    fn ctl(&mut self, service: &ServiceName, verb: Verb) -> Result<String, Refusal> {
        let sid = self.names.get(service).copied();
        let command = match verb {
            Verb::Apply => {
                let spec = self.load_manifest(service)?;
                let applied = [(service.clone(), spec.clone())];
                let mut errors = self.check_after(&applied);
                errors.extend(self.check_ports(&applied));
                if !errors.is_empty() {
                    return Err(Refusal {
                        kind: RefusalKind::Invalid,
                        message: errors
                            .into_iter()
                            .map(|(_, e)| e)
                            .collect::<Vec<_>>()
                            .join("\n"),
                    });
                }
                return self.apply_spec(service, spec, &[]);
            }
            Verb::Rollback(Some(prefix)) => {
                let e = sid
                    .and_then(|s| self.services.get(&s))
                    .ok_or_else(|| self.unknown(service))?;
                let (v, text) = history_version(&e.history, &prefix, service)?;
                let m = manifest::parse(text.as_bytes()).map_err(|_| Refusal {
                    kind: RefusalKind::Invalid,
                    message: format!("the manifest of {v} no longer parses"),
                })?;
                let spec = Spec::new(m, text.clone());
                self.rollback_port(service, &spec)?;
                Command::Rollback(Some(spec))
            }
            Verb::Rollback(None) => {
                let previous = sid
                    .and_then(|s| self.services.get(&s))
                    .and_then(|e| e.machine.previous().cloned());
                if let Some(spec) = previous {
                    self.rollback_port(service, &spec)?;
                }
                Command::Rollback(None)
            }
            Verb::Pause => Command::Pause,
            Verb::Resume => Command::Resume,
            Verb::Restart(n) => Command::Restart(n),
            Verb::Stop => Command::Stop,
            Verb::Start => {
                // Started again, it waits for its `after` as at its creation.
                let stopped = sid.and_then(|s| self.services.get(&s)).and_then(|e| {
                    let m = &e.machine;
                    (m.is_stopped() && !m.is_removing()).then(|| m.target().manifest.clone())
                });
                if let (Some(sid), Some(m)) = (sid, stopped) {
                    let waiting = self.pending_after(service, &m, &[]);
                    let _ = self.handle(sid, Input::Wait(waiting));
                    self.say_stopped(sid);
                }
                Command::Start
            }
            Verb::Remove => Command::Remove,
            Verb::Signal(signal, n) => Command::Signal(signal, n),
        };
        let sid = sid.ok_or_else(|| self.unknown(service))?;
        self.command(sid, command)
    }

    /// Rolls `service` out to `spec`, or deploys it if it is new (with
    /// `coming`, the services deployed with it).
    fn apply_spec(
        &mut self,
        service: &ServiceName,
        spec: Spec,
        coming: &[ServiceName],
    ) -> Result<String, Refusal> {
        let Some(sid) = self.names.get(service).copied() else {
            return self.create(service.clone(), spec, coming);
        };
        if let Some(stale) = self.stale_env(sid, &spec) {
            let why = format!(
                "env_file changed since {} started",
                rollout::instance_list(&stale)
            );
            self.log(sid, &format!("apply: {why}: restarting every instance"));
            return self
                .command(sid, Command::Restart(None))
                .map(|answer| format!("{why}; {answer}"));
        }
        self.command(sid, Command::Apply(spec))
    }

    /// When `spec` is what the service already runs (`apply` would answer
    /// `unchanged`) but its env files say something else now than when
    /// some instances started: their numbers. systemd and Kubernetes leave
    /// such a change for the next start; `apply` means "run what the files
    /// say", so it restarts them, as Compose recreates a container whose
    /// `env_file` changed.
    fn stale_env(&self, sid: u32, spec: &Spec) -> Option<Vec<u32>> {
        let e = self.services.get(&sid)?;
        if e.machine.target() != spec
            || !e.machine.converged()
            || spec.manifest.env_files.is_empty()
        {
            return None;
        }
        let now = host::env_digest(&host::env_files(&self.config.manifests, &spec.manifest).ok()?);
        let mut stale: Vec<u32> = e
            .machine
            .instances()
            .iter()
            .filter(|i| e.runtime.get(&i.id()).is_some_and(|r| r.env != now))
            .map(|i| i.number())
            .collect();
        stale.sort_unstable();
        (!stale.is_empty()).then_some(stale)
    }

    /// Hands `command` to the service's machine; keeps the history and the
    /// routing in step with what it accepted. What an accepted command
    /// changes is on disk before anything is done about it: the manifest
    /// of a new version, then the record. If either cannot be written
    /// (a full disk), a command that would start processes (`apply`,
    /// `rollback`, `restart`, `start`, `resume`) is refused with the OS's
    /// errno and the machine put back as it was: nothing started, nothing
    /// acknowledged that a restart would forget. One that holds or stops
    /// (`pause`, `stop`, `remove`, `signal`) acts all the same, since it
    /// may be what frees the disk; its record is written again until it
    /// can be, as for any change ([`Engine::persist`]).
    fn command(&mut self, sid: u32, command: Command) -> Result<String, Refusal> {
        let now = self.now();
        let Some(e) = self.services.get_mut(&sid) else {
            return Err(Refusal {
                kind: RefusalKind::NotFound,
                message: "no such service".into(),
            });
        };
        let starts = matches!(
            command,
            Command::Apply(_)
                | Command::Rollback(_)
                | Command::Restart(_)
                | Command::Start
                | Command::Resume
        );
        let before = e.machine.clone();
        let handled = e.machine.handle(now, Input::Command(command));
        if handled.result.is_ok() {
            let history = next_history(&e.machine, &e.history);
            match save_first(&self.store, e, &history) {
                Ok(()) => {}
                Err(err) if starts => {
                    e.machine = before;
                    return Err(storage_refusal(&e.name, &err));
                }
                // Written again by persist, which says it cannot.
                Err(_) => {}
            }
            e.history = history;
            let keep: Vec<Version> = e.history.iter().map(|(v, _)| *v).collect();
            self.store.prune_history(&e.name, &keep);
            self.dirty.insert(sid);
        }
        self.act(sid, handled.actions);
        if handled.result.is_ok() {
            self.sync_proxy(sid);
        }
        handled.result
    }

    /// Of `applied` (services with the specs they are about to run), each
    /// whose public port another service has, deployed or applied before
    /// it: the service, its spec, the port and the other service.
    fn taken_ports<'a>(
        &'a self,
        applied: &'a [(ServiceName, Spec)],
    ) -> Vec<(&'a ServiceName, &'a Spec, u16, &'a ServiceName)> {
        let is_applied = |name: &ServiceName| applied.iter().any(|(n, _)| n == name);
        let deployed = self
            .services
            .values()
            .filter(|e| !is_applied(&e.name))
            .map(|e| (&e.name, e.machine.target().manifest.port));
        let new = applied.iter().map(|(n, spec)| (n, spec.manifest.port));
        manifest::shared_ports(deployed.chain(new))
            .into_iter()
            .filter_map(|(name, port, other)| {
                let (_, spec) = applied.iter().find(|(n, _)| n == name)?;
                Some((name, spec, port, other))
            })
            .collect()
    }

    /// Checks that the services about to run `applied` (each with its
    /// spec) share no public port with another deployed service, nor with
    /// each other: one listener per port. Each error is the service's and
    /// `FILE:LINE:COL: message`, at its `port` line. Services applied
    /// together may trade ports: each listens once the other has let go.
    fn check_ports(&self, applied: &[(ServiceName, Spec)]) -> Vec<(ServiceName, String)> {
        self.taken_ports(applied)
            .into_iter()
            .map(|(name, spec, port, other)| {
                let file = self.config.manifests.join(format!("{name}.manifest"));
                let whose = match applied.iter().any(|(n, _)| n == other) {
                    true => format!("also the port of {other}, applied with it"),
                    false => format!("already the port of {other}"),
                };
                let error = manifest::shared_port_error(&spec.text, port, &whose);
                (name.clone(), format!("{}:{error}", file.display()))
            })
            .collect()
    }

    /// A rollback to `spec` is refused if its port is now another
    /// service's.
    fn rollback_port(&self, service: &ServiceName, spec: &Spec) -> Result<(), Refusal> {
        let applied = [(service.clone(), spec.clone())];
        match self.taken_ports(&applied).first() {
            Some((_, _, port, other)) => Err(Refusal {
                kind: RefusalKind::Invalid,
                message: format!(
                    "{} listens on port {port}, which is now the port of {other}; two services cannot share a public port",
                    spec.version
                ),
            }),
            None => Ok(()),
        }
    }

    fn load_manifest(&self, service: &ServiceName) -> Result<Spec, Refusal> {
        let path = self.config.manifests.join(format!("{service}.manifest"));
        match self.load_file(&path) {
            Ok(loaded) => Ok(Spec::new(loaded.manifest, loaded.text)),
            Err(LoadError::Io {
                not_found: true,
                error,
                ..
            }) => Err(Refusal {
                kind: RefusalKind::NotFound,
                message: if path.is_symlink() {
                    format!("no manifest for {service}: {} is {error}", path.display())
                } else {
                    let stems: Vec<String> = self
                        .manifest_files()
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
                        .collect();
                    let close =
                        suggest::closest(service.as_str(), stems.iter().map(String::as_str))
                            .map(|s| format!(" (did you mean {s}? {s}.manifest is there)"))
                            .unwrap_or_default();
                    format!(
                        "no manifest for {service}: {} does not exist{close}",
                        path.display()
                    )
                },
            }),
            Err(e) => Err(Refusal {
                kind: RefusalKind::Invalid,
                message: e.to_string(),
            }),
        }
    }

    fn handle(&mut self, sid: u32, input: Input) -> Result<String, Refusal> {
        let now = self.now();
        let Some(e) = self.services.get_mut(&sid) else {
            return Err(Refusal {
                kind: RefusalKind::NotFound,
                message: "no such service".into(),
            });
        };
        let handled = e.machine.handle(now, input);
        self.act(sid, handled.actions);
        handled.result
    }

    /// Carries out what the machine decided, and sets its next timer.
    fn act(&mut self, sid: u32, actions: Vec<Action>) {
        if !actions.is_empty() {
            self.dirty.insert(sid);
        }
        self.execute(sid, actions);
        self.schedule(sid);
    }

    fn execute(&mut self, sid: u32, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Start { id, slot, spec } => self.start_instance(sid, id, slot, &spec),
                Action::Stop {
                    id,
                    signal,
                    timeout,
                } => self.stop_instance(sid, id, signal.number(), timeout),
                Action::Signal { id, signal } => {
                    let pid = self
                        .services
                        .get(&sid)
                        .and_then(|e| e.runtime.get(&id))
                        .and_then(|inst| inst.pid);
                    if let Some(pid) = pid {
                        process::signal_group(pid, signal.number());
                    }
                }
                Action::RouteIn { id } => self.route_in(sid, id),
                Action::RouteOut { id } => {
                    let routed = self
                        .services
                        .get(&sid)
                        .and_then(|e| e.router.as_ref())
                        .is_some_and(|r| r.route_out(id));
                    // Not routed through deployd: nothing to drain.
                    if !routed {
                        self.pending.push_back((sid, Input::Drained { id }));
                    }
                }
                Action::Event(msg) => {
                    self.log(sid, &msg);
                }
                Action::Output { id, prefix } => self.show_output(sid, id, &prefix),
            }
        }
    }

    /// Whether an exit waits for the rest of its process's output: one the
    /// machine did not ask for (it may show what the process printed last)
    /// while the log's pump is still copying. It comes back once the pump
    /// is done, or after [`PUMP_WAIT`]. Stops deployd made, the many exits
    /// of a rollout's batches, are handled at once, together.
    fn defer_exit(&mut self, sid: u32, id: InstanceId, exit: &Exit) -> bool {
        let Some(e) = self.services.get_mut(&sid) else {
            return false;
        };
        let Some(mut pumped) = e.runtime.get_mut(&id).and_then(|i| i.pumped.take()) else {
            return false;
        };
        let asked = e
            .machine
            .instances()
            .iter()
            .any(|i| i.id() == id && i.role() == Role::Retiring);
        if asked || pumped.try_recv() != Err(tokio::sync::oneshot::error::TryRecvError::Empty) {
            return false;
        }
        let (tx, exit) = (self.tx.clone(), exit.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(PUMP_WAIT, pumped).await;
            let _ = tx.send(Msg::Exited { sid, id, exit });
        });
        true
    }

    /// The last lines an instance printed, as events (`instance 3 printed:
    /// LINE`), and its whole log as the service's `failed_log`. Its exit is
    /// handled once its log has everything.
    fn show_output(&mut self, sid: u32, id: InstanceId, prefix: &str) {
        let Some(e) = self.services.get(&sid) else {
            return;
        };
        let Some(log) = e.runtime.get(&id).map(|i| i.log.clone()) else {
            return;
        };
        if let Err(err) = self.store.link_failed_log(&e.name, &log) {
            tracing::warn!("{}: failed_log: {err}", e.name);
        }
        let lines = process::last_lines(&log, process::SHOWN_LINES);
        if lines.is_empty() {
            return;
        }
        let now = self.now();
        let before = self.services.get(&sid).and_then(|e| e.shown.as_ref());
        if let Some(b) = before.filter(|b| b.lines == lines && now.since(b.at) < SHOWN_AGAIN) {
            let n = lines.len();
            let what = if n == 1 { "line" } else { "lines" };
            let msg = format!("{prefix} the same {n} {what} as at {}", b.stamp);
            self.log(sid, &msg);
            return;
        }
        let mut stamp = None;
        for line in &lines {
            let at = self.log(sid, &format!("{prefix}: {line}"));
            stamp.get_or_insert(at);
        }
        if let (Some(e), Some(stamp)) = (self.services.get_mut(&sid), stamp) {
            e.shown = Some(Shown {
                lines,
                stamp,
                at: now,
            });
        }
    }

    fn start_instance(&mut self, sid: u32, id: InstanceId, slot: u32, spec: &Spec) {
        let Some(e) = self.services.get(&sid) else {
            return;
        };
        let name = e.name.clone();
        let m = spec.manifest.clone();
        // Read at each start, as systemd reads EnvironmentFile=; first, so
        // that a broken file holds nothing yet.
        let files = match host::env_files(&self.config.manifests, &m) {
            Ok(vars) => vars,
            Err(err) => {
                let exit = Exit::SpawnFailed(err);
                self.pending.push_back((sid, Input::Exited { id, exit }));
                return;
            }
        };
        let port = if m.needs_instance_port() {
            match self.alloc_port() {
                Ok(p) => Some(p),
                Err(err) => {
                    let exit = match crate::short::describe(&err) {
                        Some(why) => Exit::Short(why),
                        None => Exit::SpawnFailed(format!("no free port: {err}")),
                    };
                    self.pending.push_back((sid, Input::Exited { id, exit }));
                    return;
                }
            }
        } else {
            None
        };
        let dir = self.instance_dir(&m);
        let env_digest = host::env_digest(&files);
        let env = instance_env(&name, &m, files, port, slot, spec.version);
        let log = self.store.log_path(&name, self.generation, id.0);
        let (read, write) = match process::log_pipe() {
            Ok(p) => p,
            Err(err) => {
                if let Some(p) = port {
                    self.ports.remove(&p);
                }
                let exit = match crate::short::describe(&err) {
                    Some(why) => Exit::Short(why),
                    None => Exit::SpawnFailed(format!("no pipe for its output: {err}")),
                };
                self.pending.push_back((sid, Input::Exited { id, exit }));
                return;
            }
        };
        let log_read = read.try_clone().ok();
        // Reads until every holder of the write end is gone, so also what a
        // process that dies at once printed.
        let pumped =
            process::spawn_pump(read, log.clone(), m.log_max, self.pump_options(sid, id, &m));
        let exited = Arc::new(AtomicBool::new(false));
        let (tx, children, flag) = (self.tx.clone(), self.children.clone(), exited.clone());
        let (command, spawn_dir, spawn_env) = (m.exec.clone(), dir.clone(), env.clone());
        let user = m.user.clone();
        self.spawner.submit(move || {
            // Looked up at each start, as a login would, on the spawning
            // thread (NSS may be slow): the account may have changed since
            // the apply that checked it.
            let spawned = match user.as_ref().map(host::lookup).transpose() {
                Ok(account) => process::spawn_guarded(Spawn {
                    command: &command,
                    dir: &spawn_dir,
                    env: spawn_env,
                    output: Some(write),
                    account: account.as_ref(),
                }),
                Err(e) => Err(std::io::Error::new(std::io::ErrorKind::NotFound, e)),
            };
            let result =
                spawned
                    .as_ref()
                    .map(|pid| *pid)
                    .map_err(|e| match crate::short::describe(e) {
                        Some(why) => Exit::Short(why),
                        None => Exit::SpawnFailed(e.to_string()),
                    });
            // Spawned goes first: an exit the reaper already saw is only
            // delivered by watch(), after it.
            let _ = tx.send(Msg::Spawned { sid, id, result });
            if let Ok(pid) = spawned {
                watch_exit(&children, &tx, flag, sid, id, pid);
            }
        });
        let prober = self.start_prober(sid, id, &m, port, dir, env);
        let mut inst = Inst::new(&m, port, log, log_read, prober, exited, env_digest);
        inst.pumped = Some(pumped);
        if let Some(e) = self.services.get_mut(&sid) {
            e.runtime.insert(id, inst);
        }
    }

    /// How an instance's output is copied: stamped, at most at its
    /// `log_rate`, the first wait said in its service's events.
    fn pump_options(
        &self,
        sid: u32,
        id: InstanceId,
        m: &manifest::Manifest,
    ) -> process::PumpOptions {
        let tx = self.tx.clone();
        let said = self.tx.clone();
        process::PumpOptions {
            stamped: true,
            rate: m.log_rate,
            throttled: Some(Box::new(move || {
                let _ = tx.send(Msg::Throttled { sid, id });
            })),
            unwritable: Some(Box::new(move |result| {
                let _ = said.send(Msg::Unwritable { sid, id, result });
            })),
        }
    }

    /// An instance's working directory.
    fn instance_dir(&self, m: &manifest::Manifest) -> PathBuf {
        match &m.dir {
            Some(d) => self.config.manifests.join(d),
            None => self.config.manifests.clone(),
        }
    }

    /// Starts probing an instance as its manifest says; returns the task
    /// and what pokes it for a probe now.
    fn start_prober(
        &self,
        sid: u32,
        id: InstanceId,
        m: &manifest::Manifest,
        port: Option<u16>,
        dir: PathBuf,
        env: Vec<(String, String)>,
    ) -> (Option<AbortHandle>, Arc<Notify>) {
        let poke = Arc::new(Notify::new());
        if m.health == Health::None {
            return (None, poke);
        }
        let target = probe::Target {
            health: m.health.clone(),
            port,
            interval: m.health_interval,
            timeout: m.health_timeout,
            dir,
            env,
            user: m.user.clone(),
        };
        let tx = self.tx.clone();
        let report = move |result| {
            let _ = tx.send(Msg::Probe { sid, id, result });
        };
        let tx = self.tx.clone();
        let short = move |why| {
            let _ = tx.send(Msg::Short { sid, id, why });
        };
        let task = tokio::spawn(probe::run(
            target,
            self.children.clone(),
            poke.clone(),
            report,
            short,
        ));
        (Some(task.abort_handle()), poke)
    }

    /// Takes back an instance the deployd this one replaced left running.
    fn adopt_instance(&mut self, sid: u32, id: InstanceId, h: handoff::Instance) {
        process::cgroup::adopt(h.pid);
        let read = h.pipe();
        let Some(e) = self.services.get(&sid) else {
            return;
        };
        let Some(i) = e.machine.instances().iter().find(|i| i.id() == id) else {
            return;
        };
        let (name, m) = (e.name.clone(), i.spec().manifest.clone());
        // For its exec probe: what the process was started with, as far as
        // the files still say it.
        let files = host::env_files(&self.config.manifests, &m).unwrap_or_else(|err| {
            tracing::warn!("{name}: instance {}: {err}", h.number);
            Vec::new()
        });
        let env_digest = h.env.unwrap_or_else(|| host::env_digest(&files));
        let env = instance_env(&name, &m, files, h.port, h.slot, h.version);
        if let Some(p) = h.port {
            self.ports.insert(p);
        }
        let log_read = read.try_clone().ok();
        let pumped = process::spawn_pump(
            read,
            h.log.clone(),
            m.log_max,
            self.pump_options(sid, id, &m),
        );
        let exited = Arc::new(AtomicBool::new(false));
        // Known to the guard already, unless the deployd before had none.
        process::guard::watch(h.pid);
        watch_exit(&self.children, &self.tx, exited.clone(), sid, id, h.pid);
        let prober = self.start_prober(sid, id, &m, h.port, self.instance_dir(&m), env);
        let mut inst = Inst::new(&m, h.port, h.log, log_read, prober, exited, env_digest);
        inst.pumped = Some(pumped);
        inst.pid = Some(h.pid);
        inst.memory = memory_watch(&self.tx, sid, id, inst.memory_max, h.pid);
        inst.start_time = h.start_time;
        if let Some(e) = self.services.get_mut(&sid) {
            e.runtime.insert(id, inst);
        }
    }

    /// The spawning thread started (or failed to start) an instance's process.
    fn spawned(&mut self, sid: u32, id: InstanceId, result: Result<u32, Exit>) {
        let Some(inst) = self
            .services
            .get_mut(&sid)
            .and_then(|e| e.runtime.get_mut(&id))
        else {
            return;
        };
        match result {
            Ok(pid) => {
                inst.pid = Some(pid);
                inst.start_time = process::start_time(pid).unwrap_or(0);
                inst.memory = memory_watch(&self.tx, sid, id, inst.memory_max, pid);
                if let Some((signal, timeout)) = inst.stop_asked.take() {
                    self.stops.push(Stop {
                        pid,
                        signal,
                        timeout,
                        exited: inst.exited.clone(),
                    });
                }
                self.dirty.insert(sid);
                let _ = self.handle(sid, Input::Started { id, pid });
            }
            Err(e) => {
                if let Some(inst) = self
                    .services
                    .get_mut(&sid)
                    .and_then(|e| e.runtime.remove(&id))
                {
                    self.release(inst);
                }
                let _ = self.handle(sid, Input::Exited { id, exit: e });
            }
        }
    }

    fn stop_instance(&mut self, sid: u32, id: InstanceId, signal: i32, timeout: Duration) {
        self.cut(sid, id);
        let Some(inst) = self
            .services
            .get_mut(&sid)
            .and_then(|e| e.runtime.get_mut(&id))
        else {
            return;
        };
        match inst.pid {
            Some(pid) => self.stops.push(Stop {
                pid,
                signal,
                timeout,
                exited: inst.exited.clone(),
            }),
            None => inst.stop_asked = Some((signal, timeout)),
        }
    }

    /// Cuts what is still open on an instance about to be stopped, and says
    /// so in the event log: a drain that runs out cuts what its clients
    /// then see fail.
    fn cut(&mut self, sid: u32, id: InstanceId) {
        let Some(e) = self.services.get(&sid) else {
            return;
        };
        if let Some(r) = &e.router {
            let open = r.close(id);
            if open > 0 {
                let what = open_traffic(r, open);
                let who = e.machine.instances().iter().find(|i| i.id() == id);
                let msg = match who {
                    Some(i) => format!(
                        "instance {}: drain of {} over with {what} still open; closing",
                        i.number(),
                        manifest::format_duration(i.spec().manifest.drain)
                    ),
                    None => format!("drain over with {what} still open; closing"),
                };
                self.log(sid, &msg);
            }
        }
    }

    fn route_in(&mut self, sid: u32, id: InstanceId) {
        let Some(e) = self.services.get(&sid) else {
            return;
        };
        let (Some(router), Some(inst)) = (&e.router, e.runtime.get(&id)) else {
            return;
        };
        let Some(port) = inst.port else { return };
        let tx = self.tx.clone();
        router.route_in(
            id,
            port,
            inst.poke.clone(),
            Box::new(move || {
                let _ = tx.send(Msg::Drained { sid, id });
            }),
        );
    }

    /// Makes the service's listener match its target manifest: listen on a
    /// new port or in a new mode (moving the routed-in instances over), stop
    /// listening when it has no port.
    fn sync_proxy(&mut self, sid: u32) {
        let bind = self.config.bind;
        let Some(e) = self.services.get_mut(&sid) else {
            return;
        };
        let m = e.machine.target().manifest.clone();
        let want = m.port.map(|port| proxy::Settings {
            port,
            mode: m.proxy,
            queue_timeout: m.queue_timeout,
            response_timeout: m.response_timeout,
            max_connections: m.max_connections,
        });
        let have = e.router.as_ref().map(|r| r.settings());
        match (have, want) {
            (Some(h), Some(w)) if h.port == w.port && h.mode == w.mode => {
                if let Some(r) = &e.router {
                    r.set_timeouts(w.queue_timeout, w.response_timeout);
                    r.set_max_connections(w.max_connections);
                    r.set_trusted(m.trusted_proxies.clone());
                }
                self.sync_access_log(sid);
                return;
            }
            (None, None) => return,
            _ => {}
        }
        if let Some(old) = e.router.take() {
            old.stop_listening();
        }
        let Some(w) = want else { return };
        let (tx, service) = (self.tx.clone(), e.name.clone());
        let note: proxy::Note = Box::new(move |line| {
            let _ = tx.send(Msg::Note {
                service: service.clone(),
                line,
            });
        });
        let router = proxy::listen(bind, w, e.name.to_string(), note, self.budget.clone());
        router.set_trusted(m.trusted_proxies.clone());
        e.router = Some(router);
        let ready: Vec<InstanceId> = e
            .machine
            .instances()
            .iter()
            .filter(|i| i.state() == deployd_lib::rollout::State::Ready)
            .map(|i| i.id())
            .collect();
        self.sync_access_log(sid);
        for id in ready {
            self.route_in(sid, id);
        }
    }

    /// Opens or closes the service's access log as its manifest says.
    fn sync_access_log(&mut self, sid: u32) {
        let Some(e) = self.services.get(&sid) else {
            return;
        };
        let Some(r) = &e.router else { return };
        let m = &e.machine.target().manifest;
        match (m.access_log, r.has_access_log()) {
            (true, false) => {
                let path = self.store.access_path(&e.name);
                match proxy::access::AccessLog::open(path, m.log_max) {
                    Ok(log) => r.set_access_log(Some(Arc::new(log))),
                    Err(err) => tracing::warn!("{}: access log: {err}", e.name),
                }
            }
            (false, true) => r.set_access_log(None),
            _ => {}
        }
    }

    /// Frees what an exited instance held.
    fn release(&mut self, mut inst: Inst) {
        inst.stop_tasks();
        if let Some(port) = inst.port {
            self.ports.remove(&port);
        }
    }

    /// A free loopback port, not held by another instance, nor any
    /// service's public `port` (which may not be bound yet: its listener
    /// binds it a moment after the manifest is applied, or retries while
    /// it is taken).
    fn alloc_port(&mut self) -> std::io::Result<u16> {
        for _ in 0..64 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let public = self
                .services
                .values()
                .any(|e| e.machine.target().manifest.port == Some(port));
            if !public && self.ports.insert(port) {
                return Ok(port);
            }
        }
        Err(std::io::Error::other("every port tried is taken"))
    }

    /// Appends a line to a service's event log, in memory and on disk;
    /// returns its time stamp.
    fn log(&mut self, sid: u32, msg: &str) -> String {
        let stamp = deployd_lib::stamp::now();
        let Some(e) = self.services.get(&sid) else {
            return stamp;
        };
        // One line, as written: what a ctl write, a manifest or a program
        // put in it can neither break the line nor act on a terminal.
        let msg = deployd_lib::printable::printable(msg);
        tracing::info!(service = %e.name, "{msg}");
        let line = format!("{stamp} {msg}\n");
        e.events.append(&line);
        if let Err(err) = self.store.append_event(&e.name, &line) {
            tracing::warn!("{}: event log: {err}", e.name);
        }
        self.dirty.insert(sid);
        stamp
    }

    /// Feeds the inputs that actions produced, then persists and publishes
    /// every service that changed, then sends the stop signals decided on
    /// the way, then answers ctl writers.
    ///
    /// Signals go last so that an instance is never seen dead while the
    /// namespace still shows it ready (a reader that sees it gone sees its
    /// replacement too), and so that its stopping is on disk before it is
    /// stopped.
    fn flush(&mut self) {
        // What the messages made ready may free a service that waits;
        // what that frees is queued with the rest.
        self.release_waiting();
        while let Some((sid, input)) = self.pending.pop_front() {
            let _ = self.handle(sid, input);
        }
        let dirty: Vec<u32> = self.dirty.drain().collect();
        for sid in dirty {
            self.persist(sid);
            if self
                .services
                .get(&sid)
                .is_some_and(|e| e.machine.is_removed())
            {
                self.forget(sid);
                continue;
            }
            self.publish(sid);
        }
        for s in self.stops.drain(..) {
            stop_group(s.pid, s.signal, s.timeout, s.exited);
        }
        for (done, result) in self.replies.drain(..) {
            done(result);
        }
    }

    fn persist(&mut self, sid: u32) {
        let Some(e) = self.services.get_mut(&sid) else {
            return;
        };
        let mut failed = None;
        let record = saved(&e.machine, &e.history);
        if let Err(err) = save_record(&self.store, e, record) {
            failed = Some(format!("cannot save its state: {err}"));
        }
        let mut pids: Vec<(u32, u64)> = e
            .runtime
            .values()
            .filter_map(|i| Some((i.pid?, i.start_time)))
            .collect();
        pids.sort();
        if pids != e.pids {
            match self.store.save_pids(&e.name, &pids) {
                Ok(()) => e.pids = pids,
                Err(err) => {
                    failed.get_or_insert(format!("cannot save its pid file: {err}"));
                }
            }
            let live: Vec<PathBuf> = e.runtime.values().map(|i| i.log.clone()).collect();
            self.store.prune_logs(&e.name, &live);
        }
        // Said once when it starts failing and once when it works again,
        // in events (kept in memory too): every line of a rollout that
        // goes on meanwhile would otherwise say it.
        let line = match (&e.unsaved, failed) {
            (None, Some(why)) => {
                tracing::error!("{}: {why}", e.name);
                let line = format!(
                    "{why}; retrying every {}s; until it works, a restart of deployd comes back to what was saved before",
                    SAVE_RETRY.as_secs()
                );
                e.unsaved = Some(why);
                Some(line)
            }
            (Some(_), Some(why)) => {
                e.unsaved = Some(why);
                None
            }
            (Some(_), None) => {
                e.unsaved = None;
                Some("state saved again".to_string())
            }
            (None, None) => None,
        };
        if e.unsaved.is_some() && self.retry_save.is_none() {
            self.retry_save = Some(tokio::time::Instant::now() + SAVE_RETRY);
        }
        if let Some(line) = line {
            self.log(sid, &line);
        }
    }

    fn publish(&mut self, sid: u32) {
        let Some(e) = self.services.get_mut(&sid) else {
            return;
        };
        if let Some(r) = &e.router {
            r.set_stopped(e.machine.is_stopped());
        }
        let runtime = |id: InstanceId| {
            e.runtime.get(&id).map(|i| Runtime {
                port: i.port,
                log: Some(i.log.clone()),
            })
        };
        let view = Arc::new(view::build(
            view::Parts {
                sid,
                name: &e.name,
                machine: &e.machine,
                history: &e.history,
                events: &e.events,
                runtime: &runtime,
                traffic: e.router.clone(),
                access: self.store.access_path(&e.name),
                failed_log: self.store.failed_log_path(&e.name),
            },
            e.view.as_deref(),
            SystemTime::now(),
        ));
        e.view = Some(view.clone());
        self.views.publish(view.clone());
        (self.hooks.published)(&view);
    }

    fn schedule(&mut self, sid: u32) {
        if let Some(old) = self.deadline_of.remove(&sid) {
            self.timers.remove(&(old, sid));
        }
        if let Some(t) = self
            .services
            .get(&sid)
            .and_then(|e| e.machine.next_deadline())
        {
            self.timers.insert((t, sid));
            self.deadline_of.insert(sid, t);
        }
    }

    fn forget(&mut self, sid: u32) {
        if let Some(old) = self.deadline_of.remove(&sid) {
            self.timers.remove(&(old, sid));
        }
        let Some(e) = self.services.remove(&sid) else {
            return;
        };
        self.names.remove(&e.name);
        // State first: once the service is gone from the namespace, it is gone.
        if let Err(err) = self.store.remove(&e.name) {
            tracing::warn!("{}: cannot delete its state: {err}", e.name);
        }
        self.views.remove(sid);
        (self.hooks.removed)(&e.name);
        tracing::info!(service = %e.name, "removed");
    }

    /// deployd is stopping the services `only`: none of them takes new
    /// connections, idle ones close, and what is in flight may finish,
    /// each service's requests (http) or connections (tcp) for up to its
    /// `drain`, as when an instance is routed out. Its instances keep running meanwhile; a
    /// second stop signal ends the wait.
    async fn finish_traffic(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Msg>,
        signals: &mut watch::Receiver<u32>,
        only: &[u32],
    ) {
        let now = tokio::time::Instant::now();
        let mut waiting = Vec::new();
        for (&sid, e) in self.services.iter().filter(|(s, _)| only.contains(s)) {
            let Some(r) = &e.router else { continue };
            r.finish();
            let open = r.owed();
            if open == 0 {
                continue;
            }
            let drain = e
                .machine
                .instances()
                .iter()
                .map(|i| i.spec().manifest.drain)
                .max()
                .unwrap_or_default();
            let what = open_traffic(r, open);
            let msg = format!(
                "deployd stopping: waiting up to {} for {what} in flight",
                manifest::format_duration(drain)
            );
            waiting.push((sid, now + drain, msg));
        }
        for (sid, _, msg) in &waiting {
            self.log(*sid, msg);
        }
        let tick = Duration::from_millis(10);
        loop {
            let now = tokio::time::Instant::now();
            waiting.retain(|(sid, until, _)| {
                let open = self
                    .services
                    .get(sid)
                    .and_then(|e| e.router.as_ref())
                    .is_some_and(|r| r.owed() > 0);
                open && now < *until
            });
            if waiting.is_empty() {
                return;
            }
            tokio::select! {
                m = rx.recv() => if !self.while_stopping(m) {
                    return;
                },
                _ = tokio::time::sleep(tick) => {}
                Ok(_) = signals.wait_for(|n| *n >= 2) => {
                    tracing::info!("second stop signal: not waiting for traffic in flight");
                    return;
                }
            }
        }
    }

    /// Stops every instance of the services `only` (stop signal, SIGKILL
    /// after its stop_timeout) and waits for them, refusing commands
    /// meanwhile. Records stay as they are, so a rollout in flight comes
    /// back paused.
    async fn shutdown(&mut self, rx: &mut mpsc::UnboundedReceiver<Msg>, only: &[u32]) {
        let mut longest = Duration::ZERO;
        let mut live = Vec::new();
        for (&sid, e) in self.services.iter_mut().filter(|(s, _)| only.contains(s)) {
            for (&id, inst) in &mut e.runtime {
                inst.stop_tasks();
                live.push((sid, id));
            }
        }
        for (sid, id) in live {
            // What is still open after the wait is cut, and said.
            self.cut(sid, id);
            let Some(inst) = self.services.get(&sid).and_then(|e| e.runtime.get(&id)) else {
                continue;
            };
            if let Some(pid) = inst.pid {
                stop_group(
                    pid,
                    inst.stop_signal,
                    inst.stop_timeout,
                    inst.exited.clone(),
                );
            }
            longest = longest.max(inst.stop_timeout);
        }
        let until = tokio::time::Instant::now() + longest + Duration::from_secs(2);
        let running = |s: &Self| {
            only.iter()
                .any(|sid| s.services.get(sid).is_some_and(|e| !e.runtime.is_empty()))
        };
        while running(self) {
            let msg = tokio::select! {
                m = rx.recv() => m,
                _ = tokio::time::sleep_until(until) => break,
            };
            if !self.while_stopping(msg) {
                break;
            }
        }
        for sid in only {
            if let Some(e) = self.services.get_mut(sid) {
                e.runtime.clear();
                let _ = self.store.save_pids(&e.name, &[]);
            }
        }
    }

    /// Handles a message while deployd stops: an instance that exited is
    /// forgotten, one that started meanwhile is stopped, commands are
    /// refused. False when the queue is closed.
    fn while_stopping(&mut self, msg: Option<Msg>) -> bool {
        match msg {
            Some(Msg::Exited { sid, id, .. }) => {
                if let Some(e) = self.services.get_mut(&sid) {
                    e.runtime.remove(&id);
                    // Died while traffic finishes: no request goes to it.
                    if let Some(r) = &e.router {
                        r.close(id);
                    }
                }
            }
            // Started while stopping: stop it too.
            Some(Msg::Spawned { sid, id, result }) => {
                let inst = self
                    .services
                    .get_mut(&sid)
                    .and_then(|e| e.runtime.get_mut(&id));
                match (result, inst) {
                    (Ok(pid), Some(inst)) => {
                        inst.pid = Some(pid);
                        stop_group(
                            pid,
                            inst.stop_signal,
                            inst.stop_timeout,
                            inst.exited.clone(),
                        );
                    }
                    (_, _) => {
                        if let Some(e) = self.services.get_mut(&sid) {
                            e.runtime.remove(&id);
                        }
                    }
                }
            }
            Some(Msg::Ctl { done, .. } | Msg::ApplyAll { done } | Msg::ReExec { done }) => {
                let message = match self.reexec {
                    true => "deployd is replacing itself (reexec); try again once it is back",
                    false => "deployd is shutting down",
                };
                done(Err(Refusal {
                    kind: RefusalKind::Busy,
                    message: message.into(),
                }))
            }
            Some(_) => {}
            None => return false,
        }
        true
    }
}

/// A service's manifests by version, oldest first.
type History = Vec<(Version, Arc<str>)>;

/// The history once `machine` has taken a command: its target and
/// previous manifests added or moved up (the target newest, the previous
/// version just before it), trimmed to [`HISTORY`] but never dropping a
/// version still running.
fn next_history(machine: &Service, history: &[(Version, Arc<str>)]) -> History {
    let mut next = history.to_vec();
    let mut specs = vec![machine.target().clone()];
    specs.extend(machine.previous().cloned());
    for spec in specs {
        match next.iter().position(|(v, _)| *v == spec.version) {
            Some(pos) => {
                let item = next.remove(pos);
                next.push(item);
            }
            None => next.push((spec.version, spec.text.clone())),
        }
    }
    let target = machine.version();
    if let Some(pos) = next.iter().position(|(v, _)| *v == target) {
        let item = next.remove(pos);
        next.push(item);
    }
    let mut in_use = machine.versions_in_use();
    in_use.push(target);
    in_use.extend(machine.previous().map(|p| p.version));
    while next.len() > HISTORY {
        match next.iter().position(|(v, _)| !in_use.contains(v)) {
            Some(pos) => {
                next.remove(pos);
            }
            None => break,
        }
    }
    next
}

/// Writes what a command changed before it is acted on: the manifests
/// `history` has that the service's does not, then its record.
fn save_first(store: &Store, e: &mut Entry, history: &History) -> std::io::Result<()> {
    for (v, text) in history {
        if !e.history.iter().any(|(hv, _)| hv == v) {
            store.save_manifest(&e.name, *v, text)?;
        }
    }
    save_record(store, e, saved(&e.machine, history))
}

/// Writes `saved` as the service's record, unless it is what was written
/// last.
fn save_record(store: &Store, e: &mut Entry, saved: Saved) -> std::io::Result<()> {
    if e.saved.as_ref() != Some(&saved) {
        store.save(&e.name, &saved)?;
        e.saved = Some(saved);
    }
    Ok(())
}

/// What is saved of a service: its machine's record and its history's
/// versions.
fn saved(machine: &Service, history: &[(Version, Arc<str>)]) -> Saved {
    Saved {
        record: machine.record(),
        history: history.iter().map(|(v, _)| *v).collect(),
    }
}

/// A command refused because what it changes could not be saved.
fn storage_refusal(name: &ServiceName, err: &std::io::Error) -> Refusal {
    Refusal {
        kind: RefusalKind::Storage(err.raw_os_error().unwrap_or(libc::EIO)),
        message: format!("cannot save the state of {name} (nothing changed): {err}"),
    }
}

/// The one version of a service's history that `prefix` names, with its
/// manifest text: none is ENOENT, several EINVAL naming them.
fn history_version<'h>(
    history: &'h [(Version, Arc<str>)],
    prefix: &VersionPrefix,
    service: &ServiceName,
) -> Result<(Version, &'h Arc<str>), Refusal> {
    let mut found = history.iter().filter(|(v, _)| prefix.matches(*v));
    match (found.next(), found.next()) {
        (Some((v, text)), None) => Ok((*v, text)),
        (None, _) => Err(Refusal {
            kind: RefusalKind::NotFound,
            message: format!(
                "version {prefix} is not in the history of {service} (see its history/ directory)"
            ),
        }),
        (Some((a, _)), Some((b, _))) => {
            let mut all = vec![a.to_string(), b.to_string()];
            all.extend(found.map(|(v, _)| v.to_string()));
            Err(Refusal {
                kind: RefusalKind::Invalid,
                message: format!(
                    "version {prefix} is ambiguous in the history of {service}: {}; give more digits",
                    all.join(", ")
                ),
            })
        }
    }
}

/// The manifest of version `v`, from a service's history.
fn resolve(history: &[(Version, Arc<str>)], v: Version) -> Option<Spec> {
    let (_, text) = history.iter().find(|(hv, _)| *hv == v)?;
    let m = manifest::parse(text.as_bytes()).ok()?;
    Some(Spec::new(m, text.clone()))
}

/// What an instance finds in its environment besides deployd's own: its
/// env files' variables (`files`), then the manifest's `env` (a later name
/// wins when the process is started), then `PORT`, `SERVICE`, `INSTANCE`
/// and `VERSION`.
fn instance_env(
    name: &ServiceName,
    m: &manifest::Manifest,
    files: Vec<(String, String)>,
    port: Option<u16>,
    slot: u32,
    version: Version,
) -> Vec<(String, String)> {
    let mut env = files;
    env.extend(m.env.iter().cloned());
    if let Some(p) = port {
        env.push(("PORT".into(), p.to_string()));
    }
    env.push(("SERVICE".into(), name.to_string()));
    env.push(("INSTANCE".into(), slot.to_string()));
    env.push(("VERSION".into(), version.to_string()));
    env
}

/// With a `limit`, samples the memory of `pid`'s processes and tells the
/// engine of each sample over it; the task is aborted with the instance.
fn memory_watch(
    tx: &mpsc::UnboundedSender<Msg>,
    sid: u32,
    id: InstanceId,
    limit: Option<u64>,
    pid: u32,
) -> Option<AbortHandle> {
    let limit = limit?;
    let tx = tx.clone();
    let task = tokio::spawn(process::watch_memory(pid, limit, move |rss| {
        let _ = tx.send(Msg::OverMemory { sid, id, rss });
    }));
    Some(task.abort_handle())
}

/// Tells the engine when `pid`, instance `id` of service `sid`, exits.
fn watch_exit(
    children: &Children,
    tx: &mpsc::UnboundedSender<Msg>,
    flag: Arc<AtomicBool>,
    sid: u32,
    id: InstanceId,
    pid: u32,
) {
    let tx = tx.clone();
    children.watch(
        pid,
        Waiter::Notify(Box::new(move |exit| {
            flag.store(true, Ordering::SeqCst);
            let _ = tx.send(Msg::Exited { sid, id, exit });
        })),
    );
}

/// How long an unexpected exit waits for its log's pump: the reaper has
/// killed the group, so the pipe's last writer is gone at once, unless a
/// process that left the group (a daemon) still holds it.
const PUMP_WAIT: Duration = Duration::from_millis(50);

/// `open` requests or connections, as the router's mode counts them.
fn open_traffic(r: &Router, open: usize) -> String {
    match (r.settings().mode, open) {
        (manifest::Proxy::Http, 1) => "1 request".to_string(),
        (manifest::Proxy::Tcp, 1) => "1 connection".to_string(),
        (manifest::Proxy::Http, _) => format!("{open} requests"),
        (manifest::Proxy::Tcp, _) => format!("{open} connections"),
    }
}

/// Sends `signal` to a process group, and SIGKILL after `timeout` unless it
/// exited by then.
fn stop_group(pid: u32, signal: i32, timeout: Duration, exited: Arc<AtomicBool>) {
    process::signal_group(pid, signal);
    // What left the group (setsid) but not the instance's cgroup; the
    // rest of the cgroup is killed once the leader is reaped.
    process::cgroup::signal_strays(pid, signal);
    if signal == libc::SIGKILL {
        return;
    }
    tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        if !exited.load(Ordering::SeqCst) {
            process::signal_group(pid, libc::SIGKILL);
        }
    });
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_prefix_names_one_version_of_the_history() {
        let history: Vec<(Version, Arc<str>)> = ["0123456789ab", "0123ffffffff", "abcdef012345"]
            .iter()
            .map(|v| (v.parse().unwrap(), Arc::from(format!("exec {v}\n"))))
            .collect();
        let web = ServiceName::new("web").unwrap();
        let find = |p: &str| history_version(&history, &p.parse().unwrap(), &web);
        let (v, text) = find("abcd").unwrap();
        assert_eq!(
            (v.to_string(), &**text),
            ("abcdef012345".into(), "exec abcdef012345\n")
        );
        assert_eq!(find("01234").unwrap().0.to_string(), "0123456789ab");
        assert_eq!(find("0123ffffffff").unwrap().0.to_string(), "0123ffffffff");
        let err = find("0123").unwrap_err();
        assert!(matches!(err.kind, RefusalKind::Invalid));
        assert_eq!(
            err.message,
            "version 0123 is ambiguous in the history of web: 0123456789ab, 0123ffffffff; give more digits"
        );
        let err = find("fff0").unwrap_err();
        assert!(matches!(err.kind, RefusalKind::NotFound));
        assert!(
            err.message
                .starts_with("version fff0 is not in the history of web")
        );
    }
}
