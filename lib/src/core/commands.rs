//! Commands, across services: what a ctl write asks, checked against every
//! service (ports, `after`), saved before it acts, and answered.

use std::collections::VecDeque;

use super::{Core, Effect, Loaded, ReplyTo, Then, Waiting, after, history};
use crate::ctl::Verb;
use crate::manifest;
use crate::name::ServiceName;
use crate::rollout::{self, Command, Input as MachineInput, Refusal, RefusalKind, Spec, State};
use crate::rollout::{InstanceId, UpdateStatus};

/// `apply` of every manifest, service by service (each saved before the
/// next): what is left, and what was done so far.
#[derive(Debug)]
pub(super) struct ApplyAll {
    queue: VecDeque<(ServiceName, Loaded)>,
    /// Services deployed with these, which their `after` may name.
    coming: Vec<ServiceName>,
    started: Vec<String>,
    unchanged: Vec<String>,
    unlisted: Vec<String>,
    failed: Vec<Refusal>,
    /// The writer to answer; `None` at deployd's first start.
    reply: Option<ReplyTo>,
    /// At deployd's first start: failures go to deployd's own log.
    pub(super) quiet: bool,
    /// The service being applied now.
    current: Option<ServiceName>,
}

impl ApplyAll {
    /// Deploying `specs` as deployd first starts (nobody to answer).
    pub(super) fn starting(specs: Vec<(ServiceName, Spec)>, coming: Vec<ServiceName>) -> ApplyAll {
        ApplyAll {
            queue: specs
                .into_iter()
                .map(|(n, spec)| {
                    (
                        n,
                        Loaded {
                            spec,
                            env_changed: Vec::new(),
                        },
                    )
                })
                .collect(),
            coming,
            started: Vec::new(),
            unchanged: Vec::new(),
            unlisted: Vec::new(),
            failed: Vec::new(),
            reply: None,
            quiet: false,
            current: None,
        }
    }
}

/// A command refused because what it changes could not be saved.
fn storage_refusal(name: &ServiceName, err: &std::io::Error) -> Refusal {
    Refusal {
        kind: RefusalKind::Storage(err.raw_os_error().unwrap_or(libc::EIO)),
        message: format!("cannot save the state of {name} (nothing changed): {err}"),
    }
}

fn invalid(errors: Vec<String>) -> Refusal {
    Refusal {
        kind: RefusalKind::Invalid,
        message: errors.join("\n"),
    }
}

impl Core {
    /// A ctl command for a service.
    pub(super) fn ctl(
        &mut self,
        service: ServiceName,
        verb: Verb,
        manifest: Option<Result<Loaded, Refusal>>,
        reply: ReplyTo,
    ) {
        let then = Then::Reply {
            reply,
            prefix: None,
            service: service.clone(),
        };
        let checked = match verb {
            Verb::Apply => match self.check_apply(&service, manifest) {
                Ok(loaded) => return self.apply_spec(&service, loaded, &[], then),
                Err(r) => Err(r),
            },
            Verb::Plan => {
                let planned = self
                    .check_apply(&service, manifest)
                    .and_then(|loaded| self.plan(&service, loaded));
                return self.finish(then, planned);
            }
            verb => self.command_for(&service, verb),
        };
        match checked {
            Ok((sid, command)) => self.command(sid, command, then),
            Err(r) => self.finish(then, Err(r)),
        }
    }

    /// The manifest of an `apply`, once its `after` and port are checked
    /// against the other services.
    fn check_apply(
        &self,
        service: &ServiceName,
        manifest: Option<Result<Loaded, Refusal>>,
    ) -> Result<Loaded, Refusal> {
        let loaded = manifest.unwrap_or_else(|| {
            Err(Refusal {
                kind: RefusalKind::NotFound,
                message: format!("no manifest for {service}"),
            })
        })?;
        let applied = [(service.clone(), loaded.spec.clone())];
        let mut errors = after::check(self, &applied);
        errors.extend(self.check_ports(&applied));
        if !errors.is_empty() {
            return Err(invalid(errors.into_iter().map(|(_, e)| e).collect()));
        }
        Ok(loaded)
    }

    /// The machine's command a verb (other than `apply`) asks for, checked.
    fn command_for(
        &mut self,
        service: &ServiceName,
        verb: Verb,
    ) -> Result<(u32, Command), Refusal> {
        let sid = self.names.get(service).copied();
        let command = match verb {
            Verb::Apply | Verb::Plan => unreachable!("apply and plan are checked by check_apply"),
            Verb::Rollback(Some(prefix)) => {
                let e = sid
                    .and_then(|s| self.services.get(&s))
                    .ok_or_else(|| self.unknown(service))?;
                let (v, text) = history::find(&e.history, &prefix, service)?;
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
            Verb::Promote => Command::Promote,
            Verb::Restart(n) => Command::Restart(n),
            Verb::Stop => Command::Stop,
            Verb::Start => {
                // Started again, it waits for its `after` as at its creation.
                let stopped = sid.and_then(|s| self.services.get(&s)).and_then(|e| {
                    let m = &e.machine;
                    (m.is_stopped() && !m.is_removing()).then(|| m.target().manifest.clone())
                });
                if let (Some(sid), Some(m)) = (sid, stopped) {
                    let waiting = after::pending(self, service, &m, &[]);
                    let _ = self.feed(sid, MachineInput::Wait(waiting));
                    after::say_stopped(self, sid);
                }
                Command::Start
            }
            Verb::Remove => Command::Remove,
            Verb::Signal(signal, n) => Command::Signal(signal, n),
        };
        let sid = sid.ok_or_else(|| self.unknown(service))?;
        Ok((sid, command))
    }

    /// Rolls `service` out to `loaded`, or deploys it if it is new (with
    /// `coming`, the services deployed with it).
    fn apply_spec(
        &mut self,
        service: &ServiceName,
        loaded: Loaded,
        coming: &[ServiceName],
        then: Then,
    ) {
        let Some(sid) = self.names.get(service).copied() else {
            return self.create(service.clone(), loaded.spec, coming, then);
        };
        if let Some(stale) = self.stale_env(sid, &loaded) {
            let why = format!(
                "env_file changed since {} started",
                rollout::instance_list(&stale)
            );
            self.event(sid, format!("apply: {why}: restarting every instance"));
            let then = match then {
                Then::Reply { reply, service, .. } => Then::Reply {
                    reply,
                    prefix: Some(why),
                    service,
                },
                other => other,
            };
            return self.command(sid, Command::Restart(None), then);
        }
        self.command(sid, Command::Apply(loaded.spec), then)
    }

    /// What `apply` of `loaded` would do, as [`rollout::plan`] tells it:
    /// the same choice of command as [`Core::apply_spec`], on a copy.
    fn plan(&self, service: &ServiceName, loaded: Loaded) -> Result<String, Refusal> {
        let Some(sid) = self.names.get(service).copied() else {
            let m = &loaded.spec.manifest;
            return Ok(format!(
                "{service}: create: {} instance{} at {}, all at once (a new service)\n",
                m.replicas,
                if m.replicas == 1 { "" } else { "s" },
                loaded.spec.version
            ));
        };
        let e = self
            .services
            .get(&sid)
            .ok_or_else(|| self.unknown(service))?;
        let (command, first) = match self.stale_env(sid, &loaded) {
            Some(stale) => (
                Command::Restart(None),
                Some(format!(
                    "apply: env_file changed since {} started: restarting every instance",
                    rollout::instance_list(&stale)
                )),
            ),
            None => (Command::Apply(loaded.spec), None),
        };
        let mut plan = rollout::plan(&e.machine, self.now, command)?;
        if let Some(first) = first {
            plan.kind = "env restart";
            plan.steps.insert(0, first);
        }
        Ok(plan.render(service.as_str()))
    }

    /// When `loaded` is what the service already runs (`apply` would
    /// answer `unchanged`) but its env files say something else now than
    /// when some instances started: their numbers. systemd and Kubernetes
    /// leave such a change for the next start; `apply` means "run what the
    /// files say", so it restarts them, as Compose recreates a container
    /// whose `env_file` changed.
    fn stale_env(&self, sid: u32, loaded: &Loaded) -> Option<Vec<u32>> {
        let e = self.services.get(&sid)?;
        let spec = &loaded.spec;
        if e.machine.target() != spec
            || !e.machine.converged()
            || spec.manifest.env_files.is_empty()
        {
            return None;
        }
        let changed = |id: InstanceId| loaded.env_changed.contains(&id);
        let mut stale: Vec<u32> = e
            .machine
            .instances()
            .iter()
            .filter(|i| changed(i.id()))
            .map(|i| i.number())
            .collect();
        stale.sort_unstable();
        (!stale.is_empty()).then_some(stale)
    }

    /// Hands `command` to the service's machine. What an accepted command
    /// changes is saved before anything is done about it (the manifest of a
    /// new version, then the record): the core asks for the save and waits.
    fn command(&mut self, sid: u32, command: Command, then: Then) {
        let now = self.now;
        let Some(e) = self.services.get_mut(&sid) else {
            return self.finish(
                then,
                Err(Refusal {
                    kind: RefusalKind::NotFound,
                    message: "no such service".into(),
                }),
            );
        };
        let starts = matches!(
            command,
            Command::Apply(_)
                | Command::Rollback(_)
                | Command::Restart(_)
                | Command::Start
                | Command::Resume
                | Command::Promote
        );
        let before = Box::new(e.machine.clone());
        let handled = e.machine.handle(now, MachineInput::Command(command));
        if handled.result.is_err() {
            self.act(sid, handled.actions);
            return self.finish(then, handled.result);
        }
        let history = history::next(&e.machine, &e.history);
        let manifests: Vec<_> = history
            .iter()
            .filter(|(v, _)| !e.history.iter().any(|(hv, _)| hv == v))
            .cloned()
            .collect();
        let saved = history::saved(&e.machine, &history);
        let name = e.name.clone();
        let ticket = self.ticket();
        self.out.push(Effect::SaveFirst {
            ticket,
            name,
            create: false,
            manifests,
            saved,
        });
        self.waiting = Some((
            ticket,
            Waiting::Command {
                sid,
                before,
                actions: handled.actions,
                result: handled.result,
                history,
                starts,
                then,
            },
        ));
    }

    /// Deploys a new service: saved first (directories, manifest, record).
    fn create(&mut self, name: ServiceName, spec: Spec, coming: &[ServiceName], then: Then) {
        let (version, text) = (spec.version, spec.text.clone());
        let history = vec![(version, text.clone())];
        let waiting = after::pending(self, &name, &spec.manifest, coming);
        let (machine, actions) = rollout::Service::create_waiting(self.now, spec, waiting);
        let saved = history::saved(&machine, &history);
        let ticket = self.ticket();
        self.out.push(Effect::SaveFirst {
            ticket,
            name: name.clone(),
            create: true,
            manifests: history.clone(),
            saved,
        });
        self.waiting = Some((
            ticket,
            Waiting::Create {
                name,
                machine: Box::new(machine),
                actions,
                history,
                then,
            },
        ));
    }

    /// The save of the command waiting for it went `result`: the command
    /// acts, or (when it would start something) is refused and undone.
    pub(super) fn saved_first(
        &mut self,
        ticket: super::Ticket,
        result: Result<(), std::io::Error>,
    ) {
        let Some((t, waiting)) = self.waiting.take() else {
            return;
        };
        if t != ticket {
            self.waiting = Some((t, waiting));
            return;
        }
        match waiting {
            Waiting::Command {
                sid,
                before,
                actions,
                result: answer,
                history,
                starts,
                then,
            } => {
                let Some(e) = self.services.get_mut(&sid) else {
                    return;
                };
                if let (Err(err), true) = (&result, starts) {
                    e.machine = *before;
                    let refusal = storage_refusal(&e.name, err);
                    return self.finish(then, Err(refusal));
                }
                // Saved, or a command that holds or stops: it acts all the
                // same (it may be what frees the disk), and its record is
                // saved again until it can be.
                e.history = history;
                let keep = e.history.iter().map(|(v, _)| *v).collect();
                let name = e.name.clone();
                self.out.push(Effect::PruneHistory { name, keep });
                self.dirty.insert(sid);
                self.act(sid, actions);
                self.out.push(Effect::Listen { sid });
                self.finish(then, answer);
            }
            Waiting::Create {
                name,
                machine,
                actions,
                history,
                then,
            } => {
                if let Err(err) = &result {
                    let refusal = storage_refusal(&name, err);
                    return self.finish(then, Err(refusal));
                }
                // The deployment's own line, then what it waits for.
                let lines = if machine.waiting().is_empty() { 1 } else { 2 };
                let msg = actions
                    .iter()
                    .filter_map(|a| match a {
                        rollout::Action::Event(e) => Some(e.as_str()),
                        _ => None,
                    })
                    .take(lines)
                    .collect::<Vec<_>>()
                    .join("; ");
                let sid = self.add(name, *machine, history);
                self.act(sid, actions);
                after::say_stopped(self, sid);
                self.finish(then, Ok(msg));
            }
        }
    }

    /// What follows a command's outcome.
    fn finish(&mut self, then: Then, result: Result<String, Refusal>) {
        match then {
            Then::Reply {
                reply,
                prefix,
                service,
            } => {
                let result = result.map(|m| match prefix {
                    Some(p) => format!("{p}; {m}"),
                    None => m,
                });
                if let (Err(r), Some(sid)) = (&result, self.names.get(&service).copied()) {
                    let line = format!("refused: {}", r.message.lines().next().unwrap_or(""));
                    self.event(sid, line);
                }
                self.reply(reply, result);
            }
            Then::ApplyAll(mut all) => {
                let name = all.current.take();
                match result {
                    Ok(_) => all.started.extend(name.map(|n| n.to_string())),
                    Err(r) => {
                        if all.quiet {
                            let who = name.map(|n| format!("{n}: ")).unwrap_or_default();
                            self.log_error(format!("{who}{}", r.message));
                        }
                        all.failed.push(r)
                    }
                }
                self.apply_next(*all);
            }
        }
    }

    /// `apply` on the root ctl: rolls out every manifest of the manifests
    /// directory, or none. Every manifest must load and every service must
    /// accept its apply (tried first on a copy of its state machine);
    /// otherwise the refusal lists every reason and nothing changes.
    /// Answers `started: a, b; unchanged: c; no manifest: d` (empty parts
    /// left out; `no manifest`: services that run without a manifest file,
    /// left alone), then a `not started: REASON` for each service whose
    /// state could not be saved.
    pub(super) fn apply_all(&mut self, manifests: super::Manifests, reply: ReplyTo) {
        match self.plan_all(manifests) {
            Ok(mut all) => {
                all.reply = Some(reply);
                self.apply_next(all);
            }
            Err(r) => self.reply(reply, Err(r)),
        }
    }

    /// The checks of [`Core::apply_all`], on copies: what it will do.
    fn plan_all(&mut self, manifests: super::Manifests) -> Result<ApplyAll, Refusal> {
        let mut loaded = Vec::new();
        let mut errors = Vec::new();
        for m in manifests? {
            match m {
                Ok(l) => loaded.push(l),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            let specs: Vec<(ServiceName, Spec)> = loaded
                .iter()
                .map(|(n, l)| (n.clone(), l.spec.clone()))
                .collect();
            errors.extend(after::check(self, &specs).into_iter().map(|(_, e)| e));
            errors.extend(self.check_ports(&specs).into_iter().map(|(_, e)| e));
        }
        if !errors.is_empty() {
            return Err(invalid(errors));
        }
        // Dry run, on copies: a refusal of one service changes nothing.
        let mut refusals: Vec<(RefusalKind, String)> = Vec::new();
        let mut unchanged = Vec::new();
        for (name, l) in &loaded {
            let Some((sid, e)) = self
                .names
                .get(name)
                .and_then(|&s| Some((s, self.services.get(&s)?)))
            else {
                continue;
            };
            let mut copy = e.machine.clone();
            match copy
                .handle(
                    self.now,
                    MachineInput::Command(Command::Apply(l.spec.clone())),
                )
                .result
            {
                // Unless its env files changed: then it restarts.
                Ok(m) if m.starts_with("unchanged") && self.stale_env(sid, l).is_none() => {
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
            .filter(|n| !loaded.iter().any(|(s, _)| s == *n))
            .map(|n| n.to_string())
            .collect();
        unlisted.sort();
        let coming: Vec<ServiceName> = loaded
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| !self.names.contains_key(n))
            .collect();
        let queue = loaded
            .into_iter()
            .filter(|(n, _)| !unchanged.contains(&n.to_string()))
            .collect();
        Ok(ApplyAll {
            queue,
            coming,
            started: Vec::new(),
            unchanged,
            unlisted,
            failed: Vec::new(),
            reply: None,
            quiet: false,
            current: None,
        })
    }

    /// Applies the next service of an `apply` of every manifest, or
    /// answers once none is left. What the dry run cannot foresee (the
    /// disk) is said per service: one whose state cannot be saved is not
    /// started; the others are.
    pub(super) fn apply_next(&mut self, mut all: ApplyAll) {
        if let Some((name, loaded)) = all.queue.pop_front() {
            all.current = Some(name.clone());
            let coming = all.coming.clone();
            return self.apply_spec(&name, loaded, &coming, Then::ApplyAll(Box::new(all)));
        }
        let Some(reply) = all.reply else {
            return;
        };
        if all.started.is_empty() && all.unchanged.is_empty() {
            if let Some(first) = all.failed.first() {
                let result = Err(Refusal {
                    kind: first.kind,
                    message: all
                        .failed
                        .iter()
                        .map(|r| r.message.as_str())
                        .collect::<Vec<_>>()
                        .join("\n"),
                });
                return self.reply(reply, result);
            }
        }
        let mut parts: Vec<String> = [
            ("started", all.started),
            ("unchanged", all.unchanged),
            ("no manifest", all.unlisted),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}: {}", v.join(", ")))
        .collect();
        parts.extend(
            all.failed
                .iter()
                .map(|r| format!("not started: {}", r.message)),
        );
        self.reply(reply, Ok(parts.join("; ")));
    }

    /// `reexec`: accepted when every service has settled (no rollout in
    /// flight, every instance ready and handable) and the binary is there;
    /// from then on nothing else is accepted.
    pub(super) fn accept_reexec(
        &mut self,
        exe: Result<String, Refusal>,
        unhandable: &[u32],
    ) -> Result<String, Refusal> {
        let busy = |message: String| Refusal {
            kind: RefusalKind::Busy,
            message,
        };
        let exe = exe?;
        for sid in self.sids() {
            let Some(e) = self.services.get(&sid) else {
                continue;
            };
            let m = &e.machine;
            if m.is_stopped() {
                continue;
            }
            if m.update_status().in_rollout() {
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
            if ready != replicas && m.update_status() == UpdateStatus::Failed {
                // Nothing will bring the missing ones: say what will.
                return Err(busy(format!(
                    "{name}: its last rollout failed and {ready} of {replicas} instances are \
                     ready; apply a manifest that works (or remove {name}), then reexec",
                    name = e.name
                )));
            }
            if ready != replicas || m.instances().len() != replicas || unhandable.contains(&sid) {
                return Err(busy(format!(
                    "{}: {ready} of {replicas} instances ready; reexec once every one is",
                    e.name
                )));
            }
        }
        self.reexec = true;
        for sid in self.sids() {
            self.event(
                sid,
                "deployd replacing itself (reexec); instances keep running".into(),
            );
        }
        Ok(format!(
            "replacing deployd with {exe}; instances keep running"
        ))
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
    pub(super) fn check_ports(
        &self,
        applied: &[(ServiceName, Spec)],
    ) -> Vec<(ServiceName, String)> {
        self.taken_ports(applied)
            .into_iter()
            .map(|(name, spec, port, other)| {
                let file = self.manifests_dir.join(format!("{name}.manifest"));
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
}
