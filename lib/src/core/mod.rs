//! The decision core: every service's state machine and what is decided
//! across services, sans I/O.
//!
//! [`Core`] owns each service's [`Service`] machine and history, and the
//! rules no single machine can apply: `apply` of every manifest at once
//! (all or nothing), whether `reexec` may go ahead, the `after` order,
//! what a full disk refuses, when a changed `env_file` turns `apply` into
//! a restart, history numbering, the order in which writers are answered.
//! It takes [`Input`]s (a command with what was loaded for it, an
//! instance's event, a timer, the outcome of a save) with the caller's
//! [`Instant`], and returns [`Effect`]s for the caller to carry out, in
//! order. It never reads a file, a clock or a socket; what needs reading
//! (a manifest, the env files, whether the binary is there) the caller
//! reads first and hands in with the input. deployd's runtime is one such
//! caller; the tests in `tests.rs` are another, a simulated world on a
//! simulated clock.
//!
//! A command that would start something is saved before it acts: the core
//! answers it with an [`Effect::SaveFirst`] and waits for
//! [`Input::Saved`] (the caller feeds it before anything else); a failed
//! save puts the machine back and refuses the command with the errno.
//!
//! [`Core::flush`] ends each round: the inputs that effects made (an
//! instance routed out with no port is drained at once), the `after`
//! releases, then a [`Effect::Save`] and [`Effect::Publish`] (or
//! [`Effect::Forget`]) per service that changed, then the stop signals
//! decided on the way (so an instance is never seen dead while the
//! namespace still says it is ready), then the replies.

mod after;
mod commands;
pub mod history;
mod standing;
pub use standing::Standing;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::ctl::Verb;
use crate::manifest::{Signal, Version};
use crate::name::{self, ServiceName};
use crate::rollout::{
    Action, Input as MachineInput, InstanceId, Instant, Refusal, RefusalKind, Running, Service,
    Spec,
};

pub use history::{History, Saved};

/// Who gets the answer to a command: the caller's token for its writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplyTo(pub u64);

/// A save the core waits for before it acts on a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

/// A manifest the caller loaded (from the manifests directory) for an
/// `apply`, and what it found out around it.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The manifest.
    pub spec: Spec,
    /// The instances of the service (if it runs) that started with other
    /// env files' variables than the files say now.
    pub env_changed: Vec<InstanceId>,
}

/// The manifests of the manifests directory as `apply` of every one
/// takes them: each loaded (with its service) or its error; or why there
/// are none.
pub type Manifests = Result<Vec<Result<(ServiceName, Loaded), String>>, Refusal>;

/// A service whose instances ran on while deployd replaced itself, taken
/// back ([`Core::adopt`]).
#[derive(Debug)]
pub struct Adopted {
    /// Its number.
    pub sid: u32,
    /// Each running instance's id, in the order given; `None`: not taken
    /// back (the caller kills it).
    pub ids: Vec<Option<InstanceId>>,
    /// What to do now.
    pub effects: Vec<Effect>,
}

/// What the core is told.
#[derive(Debug)]
pub enum Input {
    /// A ctl command for a service. For `apply`, `manifest` is the
    /// service's manifest as the caller loaded it (or why it could not).
    Ctl {
        /// The service.
        service: ServiceName,
        /// The command.
        verb: Verb,
        /// `apply`: the manifest, or the refusal loading it met.
        manifest: Option<Result<Loaded, Refusal>>,
        /// Whose answer it is.
        reply: ReplyTo,
    },
    /// `apply` on the root ctl: every manifest of the manifests
    /// directory, each loaded or its error; or why there are none.
    ApplyAll {
        /// The manifests, by file name order.
        manifests: Manifests,
        /// Whose answer it is.
        reply: ReplyTo,
    },
    /// `reexec` on the root ctl.
    ReExec {
        /// The binary deployd would run (shown), or why there is none.
        exe: Result<String, Refusal>,
        /// Services with an instance whose process or output pipe the
        /// caller could not hand on.
        unhandable: Vec<u32>,
        /// Whose answer it is.
        reply: ReplyTo,
    },
    /// Something happened to an instance of a service.
    Instance {
        /// The service.
        sid: u32,
        /// What (never a command: those come as [`Input::Ctl`]).
        input: MachineInput,
    },
    /// How the save of an [`Effect::SaveFirst`] went.
    Saved {
        /// The save.
        ticket: Ticket,
        /// Its outcome: the OS's error if it failed.
        result: Result<(), std::io::Error>,
    },
    /// Time passed: deadlines up to now are due.
    Tick,
}

/// What the caller must do, in order.
#[derive(Debug)]
pub enum Effect {
    /// Start an instance's process, then report `Started` or `Exited`.
    Spawn {
        /// The service.
        sid: u32,
        /// The instance.
        id: InstanceId,
        /// Its slot (`$INSTANCE`).
        slot: u32,
        /// What it runs.
        spec: Spec,
    },
    /// Send a signal to an instance's process group, nothing more.
    Signal {
        /// The service.
        sid: u32,
        /// The instance.
        id: InstanceId,
        /// The signal.
        signal: Signal,
    },
    /// Route new traffic to an instance.
    RouteIn {
        /// The service.
        sid: u32,
        /// The instance.
        id: InstanceId,
    },
    /// Route nothing new to an instance and report `Drained` once nothing
    /// is in flight on it: at once, through [`Core::defer`], if it was
    /// not routed through deployd at all.
    RouteOut {
        /// The service.
        sid: u32,
        /// The instance.
        id: InstanceId,
    },
    /// Close what is still open on an instance about to be stopped (its
    /// drain is over), saying so in events if anything was: where the
    /// machine decided the stop, before its own events of it.
    Cut {
        /// The service.
        sid: u32,
        /// The instance.
        id: InstanceId,
    },
    /// Stop an instance: its stop signal, SIGKILL after `timeout`; report
    /// `Exited`. Given after the round's saves and publishes, so that it
    /// is on disk and in the namespace as stopping before it is stopped.
    Stop {
        /// The service.
        sid: u32,
        /// The instance.
        id: InstanceId,
        /// Its manifest's `stop_signal`.
        signal: Signal,
        /// Its manifest's `stop_timeout`.
        timeout: Duration,
    },
    /// Append a line to a service's event log.
    Event {
        /// The service.
        sid: u32,
        /// The line, without its time.
        line: String,
    },
    /// Append the last lines an instance printed to the event log, each
    /// as `PREFIX: LINE`, and make its log the service's `failed_log`.
    ShowOutput {
        /// The service.
        sid: u32,
        /// The instance.
        id: InstanceId,
        /// `instance N printed`.
        prefix: String,
    },
    /// Make the service's listener match its target manifest (port, mode,
    /// timeouts, `max_connections`, `trusted_proxies`, access log).
    Listen {
        /// The service.
        sid: u32,
    },
    /// Write what a command changes before it acts: the new manifests of
    /// its history, then its record (for a new service, its directories
    /// first). Feed [`Input::Saved`] with the outcome before anything else.
    SaveFirst {
        /// What to feed back.
        ticket: Ticket,
        /// The service.
        name: ServiceName,
        /// A service being created: its place in the state directory is
        /// made first, and removed again if the save fails.
        create: bool,
        /// Manifests to write, each once.
        manifests: Vec<(Version, Arc<str>)>,
        /// The record.
        saved: Saved,
    },
    /// Keep only these versions' manifests in the history on disk.
    PruneHistory {
        /// The service.
        name: ServiceName,
        /// The versions kept.
        keep: Vec<Version>,
    },
    /// Save the service's record (and its instances' pids) if changed:
    /// [`Core::saved`] says what it is now.
    Save {
        /// The service.
        sid: u32,
    },
    /// Publish a fresh snapshot of the service for the namespace.
    Publish {
        /// The service.
        sid: u32,
    },
    /// The service is gone: delete its state, take it out of the
    /// namespace, close its port.
    Forget {
        /// Its number, no longer valid.
        sid: u32,
        /// Its name.
        name: ServiceName,
    },
    /// Answer a command's writer.
    Reply {
        /// Whose.
        to: ReplyTo,
        /// The answer.
        result: Result<String, Refusal>,
    },
    /// A line for deployd's own log (not a service's events).
    Log {
        /// Whether it is an error (else information).
        error: bool,
        /// The line.
        message: String,
    },
    /// Run a hook of the service's rollout (see [`crate::rollout::Action::Hook`])
    /// and feed [`crate::rollout::Input::Hook`] with how it went.
    Hook {
        /// The service.
        sid: u32,
        /// Which.
        hook: crate::rollout::Hook,
        /// The command line.
        command: String,
        /// Added to the service's environment.
        env: Vec<(String, String)>,
        /// Killed after.
        timeout: std::time::Duration,
    },
}

/// A service as the core holds it.
#[derive(Debug, Clone)]
pub struct Svc {
    /// Its name.
    pub name: ServiceName,
    /// Its state machine.
    pub machine: Service,
    /// The manifests of its history, oldest first.
    pub history: History,
}

/// A command waiting for its save.
#[derive(Debug)]
enum Waiting {
    /// A command of a service: its machine before it, what it did.
    Command {
        sid: u32,
        before: Box<Service>,
        actions: Vec<Action>,
        result: Result<String, Refusal>,
        history: History,
        starts: bool,
        then: Then,
    },
    /// A service being created.
    Create {
        name: ServiceName,
        machine: Box<Service>,
        actions: Vec<Action>,
        history: History,
        then: Then,
    },
}

/// What comes after a command's save: answering its writer, or the next
/// service of an `apply` of every manifest.
#[derive(Debug)]
enum Then {
    /// Answer the writer (`prefix` before the answer), and say a refusal
    /// in the service's events.
    Reply {
        reply: ReplyTo,
        prefix: Option<String>,
        service: ServiceName,
    },
    /// Go on with the next service of an `apply` of every manifest.
    ApplyAll(Box<commands::ApplyAll>),
}

/// The decision core. See the module documentation.
#[derive(Debug)]
pub struct Core {
    services: HashMap<u32, Svc>,
    names: HashMap<ServiceName, u32>,
    next_sid: u32,
    /// Where the manifests are, for the file names errors give.
    manifests_dir: std::path::PathBuf,
    now: Instant,
    /// Immediate effects of the round so far.
    out: Vec<Effect>,
    /// Stop signals, sent after the round's saves and publishes.
    stops: Vec<Effect>,
    /// Answers, sent last.
    replies: Vec<Effect>,
    /// Services whose record or snapshot changed.
    dirty: BTreeSet<u32>,
    /// Inputs the effects of this round made, fed at the flush.
    pending: VecDeque<(u32, MachineInput)>,
    /// The command waiting for its save, if any.
    waiting: Option<(Ticket, Waiting)>,
    next_ticket: u64,
    /// `reexec` was accepted: nothing more is.
    reexec: bool,
}

impl Core {
    /// A core with no service; `manifests_dir` is where `SERVICE.manifest`
    /// files are, as errors name them.
    pub fn new(manifests_dir: impl Into<std::path::PathBuf>) -> Core {
        Core {
            services: HashMap::new(),
            names: HashMap::new(),
            next_sid: 1,
            manifests_dir: manifests_dir.into(),
            now: Instant::default(),
            out: Vec::new(),
            stops: Vec::new(),
            replies: Vec::new(),
            dirty: BTreeSet::new(),
            pending: VecDeque::new(),
            waiting: None,
            next_ticket: 0,
            reexec: false,
        }
    }

    // ---- what the caller reads ----

    /// A service.
    pub fn service(&self, sid: u32) -> Option<&Svc> {
        self.services.get(&sid)
    }

    /// A service's number.
    pub fn sid(&self, name: &ServiceName) -> Option<u32> {
        self.names.get(name).copied()
    }

    /// Every service's number.
    pub fn sids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.services.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Every service.
    pub fn services(&self) -> impl Iterator<Item = (u32, &Svc)> {
        self.services.iter().map(|(s, e)| (*s, e))
    }

    /// What is saved of a service now.
    pub fn saved(&self, sid: u32) -> Option<Saved> {
        let e = self.services.get(&sid)?;
        Some(history::saved(&e.machine, &e.history))
    }

    /// Whether `reexec` was accepted: deployd is replacing itself.
    pub fn replacing(&self) -> bool {
        self.reexec
    }

    /// When the core next needs an [`Input::Tick`], if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.services
            .values()
            .filter_map(|e| e.machine.next_deadline())
            .min()
    }

    /// The services in the order they stop, a group at a time: those that
    /// come after others first (see [`crate::order::stop_groups`]).
    pub fn stop_order(&self) -> Vec<Vec<u32>> {
        after::stop_order(self)
    }

    // ---- inputs ----

    /// Takes one input at `now`; returns what to do now. Stops and replies
    /// wait for [`Core::flush`].
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        self.now = self.now.max(now);
        match input {
            Input::Ctl {
                service,
                verb,
                manifest,
                reply,
            } => {
                if self.refuse_while_replacing(reply) {
                    return self.take_out();
                }
                self.ctl(service, verb, manifest, reply);
            }
            Input::ApplyAll { manifests, reply } => {
                if self.refuse_while_replacing(reply) {
                    return self.take_out();
                }
                self.apply_all(manifests, reply);
            }
            Input::ReExec {
                exe,
                unhandable,
                reply,
            } => {
                if self.refuse_while_replacing(reply) {
                    return self.take_out();
                }
                let result = self.accept_reexec(exe, &unhandable);
                self.reply(reply, result);
            }
            Input::Instance { sid, input } => {
                let _ = self.feed(sid, input);
            }
            Input::Saved { ticket, result } => self.saved_first(ticket, result),
            Input::Tick => {
                let due: Vec<u32> = self
                    .services
                    .iter()
                    .filter(|(_, e)| e.machine.next_deadline().is_some_and(|t| t <= self.now))
                    .map(|(s, _)| *s)
                    .collect();
                for sid in due {
                    let _ = self.feed(sid, MachineInput::Tick);
                }
            }
        }
        self.take_out()
    }

    /// An input the caller learnt while carrying out an effect (an
    /// instance routed out that was not routed in: drained at once); fed
    /// at the next [`Core::flush`].
    pub fn defer(&mut self, sid: u32, input: MachineInput) {
        self.pending.push_back((sid, input));
    }

    /// Whether inputs wait for a flush.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether a service changed since the last flush.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Ends a round: the deferred inputs and the `after` releases, then a
    /// save and a publish (or forget) per service that changed, then the
    /// stop signals, then the answers.
    pub fn flush(&mut self, now: Instant) -> Vec<Effect> {
        self.now = self.now.max(now);
        // What the round made ready may free a service that waits.
        after::release_waiting(self);
        while let Some((sid, input)) = self.pending.pop_front() {
            let _ = self.feed(sid, input);
        }
        let mut effects = self.take_out();
        let dirty: Vec<u32> = std::mem::take(&mut self.dirty).into_iter().collect();
        for sid in dirty {
            let Some(e) = self.services.get(&sid) else {
                continue;
            };
            effects.push(Effect::Save { sid });
            if e.machine.is_removed() {
                let name = e.name.clone();
                self.services.remove(&sid);
                self.names.remove(&name);
                effects.push(Effect::Forget { sid, name });
            } else {
                effects.push(Effect::Publish { sid });
            }
        }
        effects.append(&mut self.stops);
        effects.append(&mut self.replies);
        effects
    }

    /// Marks a service changed: saved and published at the flush (the
    /// caller's own events, say).
    pub fn touch(&mut self, sid: u32) {
        if self.services.contains_key(&sid) {
            self.dirty.insert(sid);
        }
    }

    // ---- a cluster's machines ----

    /// Installs a service as another process left it (a cluster leader's
    /// snapshot, taken on by the next leader, or mirrored by a host for
    /// its namespace): nothing is started, no effect is made. Replaces
    /// the machine and history of a service of that name, keeping its
    /// number.
    pub fn install(&mut self, name: ServiceName, machine: Service, history: History) -> u32 {
        if let Some(&sid) = self.names.get(&name) {
            if let Some(e) = self.services.get_mut(&sid) {
                e.machine = machine;
                e.history = history;
            }
            return sid;
        }
        let sid = self.next_sid;
        self.next_sid += 1;
        self.names.insert(name.clone(), sid);
        self.services.insert(
            sid,
            Svc {
                name,
                machine,
                history,
            },
        );
        sid
    }

    /// Forgets an installed service at once, with no effect; its number.
    pub fn uninstall(&mut self, name: &ServiceName) -> Option<u32> {
        let sid = self.names.remove(name)?;
        self.services.remove(&sid);
        self.dirty.remove(&sid);
        Some(sid)
    }

    // ---- starting ----

    /// Brings a recorded service back at its recorded versions, its
    /// instances started afresh; `coming`: every service being restored
    /// with it, which its `after` may name; `ended`: the pids its
    /// instances had when the deployd before ended without stopping them.
    pub fn restore(
        &mut self,
        name: ServiceName,
        saved: &Saved,
        history: History,
        coming: &[ServiceName],
        ended: &[u32],
    ) -> Result<Vec<Effect>, String> {
        let waiting = history::resolve(&history, saved.record.version)
            .map(|target| after::pending(self, &name, &target.manifest, coming))
            .unwrap_or_default();
        let (machine, actions) = Service::restore_waiting(
            self.now,
            &saved.record,
            |v| history::resolve(&history, v),
            waiting,
        )?;
        let sid = self.add(name, machine, history);
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
        self.event(sid, line);
        self.act(sid, actions);
        Ok(self.take_out())
    }

    /// Restores a service whose instances ran on while deployd replaced
    /// itself (`reexec`): each of `running` takes its slot back if it
    /// fits it.
    pub fn adopt(
        &mut self,
        name: ServiceName,
        saved: &Saved,
        history: History,
        running: &[Running],
    ) -> Result<Adopted, String> {
        let adopted = Service::adopt(
            self.now,
            &saved.record,
            |v| history::resolve(&history, v),
            running,
        )?;
        let sid = self.add(name, adopted.service, history);
        let kept: Vec<u32> = running
            .iter()
            .zip(&adopted.ids)
            .filter(|(_, id)| id.is_some())
            .map(|(r, _)| r.number)
            .collect();
        if !kept.is_empty() {
            self.event(
                sid,
                format!(
                    "deployd replaced itself; {} kept running",
                    crate::rollout::instance_list(&kept)
                ),
            );
        }
        self.act(sid, adopted.actions);
        Ok(Adopted {
            sid,
            ids: adopted.ids,
            effects: self.take_out(),
        })
    }

    /// Once every recorded service is back: says, for each that waits for
    /// a stopped one, that only a `start` of it gets it going.
    pub fn restored(&mut self) -> Vec<Effect> {
        for sid in self.sids() {
            after::say_stopped(self, sid);
        }
        self.take_out()
    }

    /// deployd's first start with nothing recorded: deploys each manifest
    /// of the manifests directory (`errors`: those that did not load), but
    /// none whose `after` or port cannot be met, nor one that comes after
    /// such a one. Creation saves first, as any command.
    pub fn deploy_all(
        &mut self,
        loaded: Vec<(ServiceName, Spec)>,
        errors: Vec<String>,
    ) -> Vec<Effect> {
        for e in errors {
            self.log_error(format!("not applied: {e}"));
        }
        let mut specs = loaded;
        loop {
            let mut bad = after::check(self, &specs);
            bad.extend(self.check_ports(&specs));
            if bad.is_empty() {
                break;
            }
            for (name, e) in bad {
                self.log_error(format!("not applied: {e}"));
                specs.retain(|(n, _)| *n != name);
            }
        }
        let coming: Vec<ServiceName> = specs.iter().map(|(n, _)| n.clone()).collect();
        let mut all = commands::ApplyAll::starting(specs, coming);
        all.quiet = true;
        self.apply_next(all);
        self.take_out()
    }

    // ---- within the core ----

    fn take_out(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.out)
    }

    /// A new service in the table.
    fn add(&mut self, name: ServiceName, machine: Service, history: History) -> u32 {
        let sid = self.next_sid;
        self.next_sid += 1;
        self.names.insert(name.clone(), sid);
        self.services.insert(
            sid,
            Svc {
                name,
                machine,
                history,
            },
        );
        self.dirty.insert(sid);
        self.out.push(Effect::Listen { sid });
        sid
    }

    /// Feeds an input to a service's machine and acts on what it decided.
    fn feed(&mut self, sid: u32, input: MachineInput) -> Result<String, Refusal> {
        let now = self.now;
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

    /// Turns a machine's actions into effects.
    fn act(&mut self, sid: u32, actions: Vec<Action>) {
        if !actions.is_empty() {
            self.dirty.insert(sid);
        }
        for action in actions {
            let effect = match action {
                Action::Start { id, slot, spec } => Effect::Spawn {
                    sid,
                    id,
                    slot,
                    spec,
                },
                Action::Stop {
                    id,
                    signal,
                    timeout,
                } => {
                    self.stops.push(Effect::Stop {
                        sid,
                        id,
                        signal,
                        timeout,
                    });
                    Effect::Cut { sid, id }
                }
                Action::Signal { id, signal } => Effect::Signal { sid, id, signal },
                Action::RouteIn { id } => Effect::RouteIn { sid, id },
                Action::RouteOut { id } => Effect::RouteOut { sid, id },
                Action::Event(line) => Effect::Event { sid, line },
                Action::Output { id, prefix } => Effect::ShowOutput { sid, id, prefix },
                Action::Hook {
                    hook,
                    command,
                    env,
                    timeout,
                } => Effect::Hook {
                    sid,
                    hook,
                    command,
                    env,
                    timeout,
                },
            };
            self.out.push(effect);
        }
    }

    fn event(&mut self, sid: u32, line: String) {
        self.dirty.insert(sid);
        self.out.push(Effect::Event { sid, line });
    }

    fn log_error(&mut self, message: String) {
        self.out.push(Effect::Log {
            error: true,
            message,
        });
    }

    fn reply(&mut self, to: ReplyTo, result: Result<String, Refusal>) {
        self.replies.push(Effect::Reply { to, result });
    }

    /// Once `reexec` is accepted, nothing else is: what comes after it is
    /// refused while traffic finishes.
    fn refuse_while_replacing(&mut self, reply: ReplyTo) -> bool {
        if self.reexec {
            self.reply(
                reply,
                Err(Refusal {
                    kind: RefusalKind::Busy,
                    message: "deployd is replacing itself (reexec); try again once it is back"
                        .into(),
                }),
            );
        }
        self.reexec
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

    fn ticket(&mut self) -> Ticket {
        self.next_ticket += 1;
        Ticket(self.next_ticket)
    }
}
