//! A service's runtime: its event log (in memory and on disk), its public
//! port, its record on disk, its snapshot in the namespace.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deployd_lib::core::Saved;
use deployd_lib::manifest;
use deployd_lib::name::ServiceName;
use deployd_lib::rollout::{InstanceId, Instant, State};

use super::Runtime;
use super::instances::Inst;
use crate::logfile;
use crate::proxy::{self, Router};
use crate::view::{self, EventLog, ServiceView};

/// How often a record that could not be written is tried again.
pub const SAVE_RETRY: Duration = Duration::from_secs(1);

/// How often a shortage of deployd's own is said again in a service's
/// events while it lasts.
pub const SHORT_SAID: Duration = Duration::from_secs(30);

/// The same lines of output again within this are referred to, not shown.
const SHOWN_AGAIN: Duration = Duration::from_secs(3600);

/// What the runtime keeps of a service besides the core's machine.
pub struct Rt {
    pub name: ServiceName,
    /// Its instances' runtime handles.
    pub instances: HashMap<InstanceId, Inst>,
    pub events: Arc<EventLog>,
    /// The record as last written.
    saved: Option<Saved>,
    /// The process groups as last written.
    pids: Vec<(u32, u64)>,
    view: Option<Arc<ServiceView>>,
    /// Its routing table, when it has a port.
    pub router: Option<Arc<Router>>,
    /// The output its events showed last.
    shown: Option<Shown>,
    /// Why its record or pid file could not be written last time, until
    /// a write succeeds; retried every [`SAVE_RETRY`].
    pub unsaved: Option<String>,
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

impl Runtime {
    /// A service's runtime, made the first time the core names it.
    pub(super) fn rt(&mut self, sid: u32) -> Option<&mut Rt> {
        if !self.services.contains_key(&sid) {
            let name = self.core.service(sid)?.name.clone();
            // In a cluster the events are etcd's, replayed at each start.
            let kept = match self.cluster {
                Some(_) => Vec::new(),
                None => self.store.load_events(&name),
            };
            let events = Arc::new(EventLog::new(kept));
            let saved = self.created.remove(&name);
            self.services.insert(
                sid,
                Rt {
                    name,
                    instances: HashMap::new(),
                    events,
                    saved,
                    pids: Vec::new(),
                    view: None,
                    router: None,
                    shown: None,
                    unsaved: None,
                    short_said: None,
                },
            );
        }
        self.services.get_mut(&sid)
    }

    /// Appends a line to a service's event log, in memory and on disk;
    /// returns its time stamp.
    pub(super) fn log(&mut self, sid: u32, msg: &str) -> String {
        self.log_at(sid, msg, SystemTime::now())
    }

    /// [`Runtime::log`] of a line that happened at `at` (in a cluster,
    /// on the leader's clock): every host's events say the same.
    pub(super) fn log_at(&mut self, sid: u32, msg: &str, at: SystemTime) -> String {
        let stamp = deployd_lib::stamp::at(at);
        // One line, as written: what a ctl write, a manifest or a program
        // put in it can neither break the line nor act on a terminal.
        let msg = deployd_lib::printable::printable(msg);
        let line = format!("{stamp} {msg}\n");
        let Some(r) = self.rt(sid) else {
            return stamp;
        };
        tracing::info!(service = %r.name, "{msg}");
        r.events.append(&line);
        let name = r.name.clone();
        if self.cluster.is_none() {
            if let Err(err) = self.store.append_event(&name, &line) {
                tracing::warn!("{name}: event log: {err}");
            }
        }
        self.core.touch(sid);
        stamp
    }

    /// A shortage of deployd's own kept an instance's probe from running:
    /// said, at most every [`SHORT_SAID`], and counted against nobody.
    pub(super) fn short(&mut self, sid: u32, id: InstanceId, why: &str) {
        let now = self.now();
        let Some(number) = self.number(sid, id) else {
            return;
        };
        let Some(r) = self.rt(sid) else { return };
        if r.short_said.is_some_and(|t| now.since(t) < SHORT_SAID) {
            return;
        }
        r.short_said = Some(now);
        let line =
            format!("{why}: a probe of instance {number} could not run; not counted against it");
        tracing::warn!("{line}");
        self.log(sid, &line);
    }

    /// An instance's output comes faster than its `log_rate`.
    pub(super) fn throttled(&mut self, sid: u32, id: InstanceId) {
        let said = self.core.service(sid).and_then(|e| {
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

    /// An instance's output cannot be written to its log, or can again.
    pub(super) fn unwritable(&mut self, sid: u32, id: InstanceId, result: Result<u64, String>) {
        let Some(n) = self.number(sid, id) else {
            return;
        };
        let line = match result {
            Err(why) => format!(
                "instance {n}: its output cannot be written to its log ({why}); \
                 dropped until it can be"
            ),
            Ok(dropped) => format!(
                "instance {n}: its output is written to its log again ({dropped} bytes dropped)"
            ),
        };
        self.log(sid, &line);
    }

    /// An instance's number, as the namespace names it.
    pub(super) fn number(&self, sid: u32, id: InstanceId) -> Option<u32> {
        let e = self.core.service(sid)?;
        Some(
            e.machine
                .instances()
                .iter()
                .find(|i| i.id() == id)?
                .number(),
        )
    }

    /// The last lines an instance printed, as events (`instance 3 printed:
    /// LINE`), and its whole log as the service's `failed_log`.
    pub(super) fn show_output(&mut self, sid: u32, id: InstanceId, prefix: &str) {
        let Some(r) = self.services.get(&sid) else {
            return;
        };
        let Some(log) = r.instances.get(&id).map(|i| i.log.clone()) else {
            return;
        };
        if let Err(err) = self.store.link_failed_log(&r.name, &log) {
            tracing::warn!("{}: failed_log: {err}", r.name);
        }
        let lines = logfile::last_lines(&log, logfile::SHOWN_LINES);
        if lines.is_empty() {
            return;
        }
        let now = self.now();
        let before = r.shown.as_ref();
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
        if let (Some(r), Some(stamp)) = (self.services.get_mut(&sid), stamp) {
            r.shown = Some(Shown {
                lines,
                stamp,
                at: now,
            });
        }
    }

    /// Makes the service's listener match its target manifest: listen on a
    /// new port or in a new mode (moving the routed-in instances over), stop
    /// listening when it has no port.
    pub(super) fn sync_proxy(&mut self, sid: u32) {
        let bind = self.config.bind;
        let Some(m) = self
            .core
            .service(sid)
            .map(|e| e.machine.target().manifest.clone())
        else {
            return;
        };
        let ready: Vec<InstanceId> = self
            .core
            .service(sid)
            .map(|e| {
                e.machine
                    .instances()
                    .iter()
                    .filter(|i| i.state() == State::Ready)
                    .map(|i| i.id())
                    .collect()
            })
            .unwrap_or_default();
        let (tx, proxies) = (self.tx.clone(), self.proxies.clone());
        let Some(r) = self.rt(sid) else { return };
        let want = m.port.map(|port| proxy::Settings {
            port,
            mode: m.proxy,
            queue_timeout: m.queue_timeout,
            response_timeout: m.response_timeout,
            max_connections: m.max_connections,
        });
        let have = r.router.as_ref().map(|r| r.settings());
        match (have, want) {
            (Some(h), Some(w)) if h.port == w.port && h.mode == w.mode => {
                if let Some(router) = &r.router {
                    router.set_timeouts(w.queue_timeout, w.response_timeout);
                    router.set_max_connections(w.max_connections);
                    router.set_trusted(m.trusted_proxies.clone());
                }
                self.sync_access_log(sid);
                return;
            }
            (None, None) => return,
            _ => {}
        }
        if let Some(old) = r.router.take() {
            old.stop_listening();
        }
        let Some(w) = want else { return };
        let service = r.name.clone();
        let note: proxy::Note = Box::new(move |line| {
            let _ = tx.send(super::Msg::Note {
                service: service.clone(),
                line,
            });
        });
        let router = proxy::listen(&proxies, bind, w, r.name.to_string(), note);
        router.set_trusted(m.trusted_proxies.clone());
        r.router = Some(router);
        self.sync_access_log(sid);
        if self.cluster.is_some() {
            self.route_all(sid);
            return;
        }
        for id in ready {
            self.route_in(sid, id);
        }
    }

    /// Opens or closes the service's access log as its manifest says.
    fn sync_access_log(&mut self, sid: u32) {
        let Some(e) = self.core.service(sid) else {
            return;
        };
        let m = e.machine.target().manifest.clone();
        let Some(r) = self.services.get(&sid) else {
            return;
        };
        let Some(router) = &r.router else { return };
        match (m.access_log, router.has_access_log()) {
            (true, false) => {
                let path = self.store.access_path(&r.name);
                match proxy::access::AccessLog::open(path, m.log_max) {
                    Ok(log) => router.set_access_log(Some(Arc::new(log))),
                    Err(err) => tracing::warn!("{}: access log: {err}", r.name),
                }
            }
            (false, true) => router.set_access_log(None),
            _ => {}
        }
    }

    /// Saves the service's record and its instances' process groups, each
    /// when it changed. A failure is said once in events (and once when it
    /// works again), and retried every [`SAVE_RETRY`].
    pub(super) fn persist(&mut self, sid: u32) {
        // In a cluster the record is the leader's, in etcd: only the
        // process groups are this host's to keep.
        let saved = match self.cluster {
            Some(_) => None,
            None => match self.core.saved(sid) {
                Some(s) => Some(s),
                None => return,
            },
        };
        if self.rt(sid).is_none() {
            return;
        }
        let Some(r) = self.services.get_mut(&sid) else {
            return;
        };
        let mut failed = None;
        if let Some(saved) = saved.filter(|s| r.saved.as_ref() != Some(s)) {
            match self.store.save(&r.name, &saved) {
                Ok(()) => r.saved = Some(saved),
                Err(err) => failed = Some(format!("cannot save its state: {err}")),
            }
        }
        let mut pids: Vec<(u32, u64)> = r
            .instances
            .values()
            .filter_map(|i| Some((i.pid?, i.start_time)))
            .collect();
        pids.sort();
        if pids != r.pids {
            match self.store.save_pids(&r.name, &pids) {
                Ok(()) => r.pids = pids,
                Err(err) => {
                    failed.get_or_insert(format!("cannot save its pid file: {err}"));
                }
            }
            let live: Vec<PathBuf> = r.instances.values().map(|i| i.log.clone()).collect();
            self.store.prune_logs(&r.name, &live);
        }
        // Said once when it starts failing and once when it works again,
        // in events (kept in memory too): every line of a rollout that
        // goes on meanwhile would otherwise say it.
        let line = match (&r.unsaved, failed) {
            (None, Some(why)) => {
                tracing::error!("{}: {why}", r.name);
                let line = format!(
                    "{why}; retrying every {}s; until it works, a restart of deployd comes back to what was saved before",
                    SAVE_RETRY.as_secs()
                );
                r.unsaved = Some(why);
                Some(line)
            }
            (Some(_), Some(why)) => {
                r.unsaved = Some(why);
                None
            }
            (Some(_), None) => {
                r.unsaved = None;
                Some("state saved again".to_string())
            }
            (None, None) => None,
        };
        if r.unsaved.is_some() && self.retry_save.is_none() {
            self.retry_save = Some(tokio::time::Instant::now() + SAVE_RETRY);
        }
        if let Some(line) = line {
            self.log(sid, &line);
        }
    }

    /// What was written first for a command of the service `name` is its
    /// record now.
    pub(super) fn saved_first(&mut self, name: &ServiceName, saved: Saved) {
        match self.core.sid(name) {
            Some(sid) => {
                if let Some(r) = self.rt(sid) {
                    r.saved = Some(saved);
                }
            }
            None => {
                self.created.insert(name.clone(), saved);
            }
        }
    }

    /// Publishes a fresh snapshot of the service.
    pub(super) fn publish(&mut self, sid: u32) {
        self.standing_stale = true;
        let (access, failed_log, hooks_log) = match self.core.service(sid) {
            Some(e) => (
                self.store.access_path(&e.name),
                self.store.failed_log_path(&e.name),
                self.store.hooks_log_path(&e.name),
            ),
            None => return,
        };
        if self.rt(sid).is_none() {
            return;
        }
        let (Some(e), Some(r)) = (self.core.service(sid), self.services.get_mut(&sid)) else {
            return;
        };
        if let Some(router) = &r.router {
            router.set_stopped(e.machine.is_stopped());
        }
        let host = self.cluster.as_ref();
        let runtime = |id: InstanceId| {
            let on = host
                .and_then(|h| h.host_of(&e.name, id))
                .map(|h| h.to_string());
            match r.instances.get(&id) {
                Some(i) => Some(view::Runtime {
                    port: i.port,
                    log: Some(i.log.clone()),
                    host: on,
                    remote: false,
                    status: i.notify.as_ref().map(|n| n.status.lock().clone()),
                    memory_file: i.memory_file.clone(),
                }),
                None => host.map(|h| view::Runtime {
                    port: h.routed_port(&e.name, id),
                    log: None,
                    remote: on.as_deref() != Some(h.link.me.as_str()),
                    host: on,
                    status: None,
                    memory_file: None,
                }),
            }
        };
        let view = Arc::new(view::build(
            view::Parts {
                sid,
                name: &e.name,
                machine: &e.machine,
                history: &e.history,
                events: &r.events,
                runtime: &runtime,
                traffic: r.router.clone(),
                access,
                failed_log,
                hooks_log,
            },
            r.view.as_deref(),
            SystemTime::now(),
        ));
        let old = r.view.replace(view.clone());
        self.views.publish(view.clone());
        (self.hooks.published)(old.as_deref(), &view);
    }

    /// The service is gone: its state deleted, out of the namespace, its
    /// port closed.
    pub(super) fn forget(&mut self, sid: u32, name: &ServiceName) {
        if let Some(r) = self.services.remove(&sid) {
            if let Some(router) = r.router {
                router.stop_listening();
            }
        }
        // State first: once the service is gone from the namespace, it is gone.
        if let Err(err) = self.store.remove(name) {
            tracing::warn!("{name}: cannot delete its state: {err}");
        }
        self.views.remove(sid);
        self.standing_stale = true;
        (self.hooks.removed)(name);
        tracing::info!(service = %name, "removed");
    }
}
