//! The leader's effects: what the machines decide, turned into keys. A
//! `Spawn` is placed and becomes an assignment, route changes change the
//! route table, events become keys; each round ends with the writes of
//! what changed ([`Leader::write_state`]).

use super::*;

impl Leader {
    pub(super) fn translate(&mut self, effect: Effect, queue: &mut VecDeque<Effect>) {
        match effect {
            Effect::Spawn {
                sid,
                id,
                slot,
                spec,
            } => match self.place(sid, slot, &spec) {
                Ok(host) => {
                    if let Some(x) = self.extra.get_mut(&sid) {
                        x.placed.insert(id, host.clone());
                        x.dirty = true;
                    }
                    self.placed_now.insert((sid, slot), host.clone());
                    self.core.defer(
                        sid,
                        MachineInput::Placed {
                            id,
                            host: host.to_string(),
                        },
                    );
                }
                Err(why) => self.core.defer(
                    sid,
                    MachineInput::Exited {
                        id,
                        exit: Exit::SpawnFailed(why),
                    },
                ),
            },
            Effect::Signal { sid, id, signal } => {
                if let Some(x) = self.extra.get_mut(&sid) {
                    let n = x.signals.get(&id).map_or(0, |(n, _)| *n);
                    x.signals.insert(id, (n + 1, signal));
                }
            }
            Effect::RouteIn { sid, id } => self.route_in(sid, id),
            Effect::RouteOut { sid, id } => {
                let routed = self
                    .extra
                    .get_mut(&sid)
                    .and_then(|x| {
                        let b = x.routes.backends.get_mut(&id.0)?;
                        b.routed = false;
                        x.routes_dirty = true;
                        x.out_at.insert(id, None);
                        Some(())
                    })
                    .is_some();
                if !routed {
                    self.core.defer(sid, MachineInput::Drained { id });
                }
            }
            Effect::Cut { sid, id } => {
                if let Some(x) = self.extra.get_mut(&sid) {
                    if x.routes.backends.remove(&id.0).is_some() {
                        x.routes_dirty = true;
                    }
                    x.out_at.remove(&id);
                }
            }
            Effect::Stop { sid, id, .. } => {
                if let Some(x) = self.extra.get_mut(&sid) {
                    x.stopping.insert(id);
                }
            }
            Effect::Event { sid, line } => self.event(sid, &line),
            Effect::ShowOutput { sid, id, prefix } => {
                let name = self.core.service(sid).map(|e| e.name.clone());
                let lines = name
                    .and_then(|n| self.statuses.get(&(n, id)))
                    .map(|(_, st)| st.lines.clone())
                    .unwrap_or_default();
                for line in lines {
                    self.event(sid, &format!("{prefix}: {line}"));
                }
            }
            Effect::Listen { sid } => {
                self.extra.entry(sid).or_default().dirty = true;
            }
            Effect::SaveFirst { ticket, .. } => {
                // The round's transaction is the save: it writes the
                // command's effects with it, or nothing.
                let next = self.core.handle(
                    self.now,
                    CoreInput::Saved {
                        ticket,
                        result: Ok(()),
                    },
                );
                for e in next.into_iter().rev() {
                    queue.push_front(e);
                }
            }
            Effect::PruneHistory { .. } => {}
            Effect::Save { sid } | Effect::Publish { sid } => {
                self.extra.entry(sid).or_default().dirty = true;
            }
            Effect::Forget { sid, name } => {
                if let Some(x) = self.extra.remove(&sid) {
                    for id in x.written.keys() {
                        if let Some(h) = x.placed.get(id) {
                            self.delete(Key::Assign(h.clone(), name.clone(), *id));
                        }
                    }
                }
                self.delete(Key::Service(name.clone()));
                self.delete(Key::Routes(name.clone()));
                self.prefix_deletes
                    .push(self.keys.dir(&format!("events/{name}")));
                self.core.uninstall(&name);
            }
            Effect::Reply { to, result } => {
                if let Some((host, id, warning)) = self.replies.remove(&to.0) {
                    let result = match (result, warning) {
                        (Ok(msg), Some(w)) => Ok(format!("{}\n{w}", msg.trim_end())),
                        (r, _) => r,
                    };
                    let key = self.keys.key(&Key::Reply(host, id));
                    self.puts
                        .insert(key.clone(), Op::Put(key, encode(&Reply { result })));
                }
            }
            Effect::Log { error, message } => self.logs.push((error, message)),
            // `apply` on a cluster host refuses a manifest with hooks; one
            // that got here all the same fails its rollout, saying why.
            Effect::Hook { sid, hook, .. } => self.core.defer(
                sid,
                MachineInput::Hook {
                    hook,
                    result: Err("hooks do not run in a cluster".into()),
                },
            ),
        }
    }

    /// The host for a new instance of service `sid` in `slot`.
    pub(super) fn place(&self, sid: u32, slot: u32, spec: &Spec) -> Result<HostName, String> {
        let allowed = &spec.manifest.hosts;
        let mut totals: BTreeMap<&HostName, usize> = BTreeMap::new();
        let mut of_service: BTreeMap<&HostName, usize> = BTreeMap::new();
        for (s, x) in &self.extra {
            let Some(e) = self.core.service(*s) else {
                continue;
            };
            for i in e.machine.instances() {
                if i.state() == State::Exited {
                    continue;
                }
                let Some(h) = x.placed.get(&i.id()) else {
                    continue;
                };
                *totals.entry(h).or_default() += 1;
                // What the new instance replaces, and what is on its way
                // out anyway, does not count.
                if *s == sid && i.slot() != slot && i.role() != Role::Retiring {
                    *of_service.entry(h).or_default() += 1;
                }
            }
        }
        let loads: Vec<HostLoad> = self
            .hosts
            .keys()
            .map(|h| HostLoad {
                name: h.clone(),
                eligible: !self.drains.contains(h) && (allowed.is_empty() || allowed.contains(h)),
                of_service: of_service.get(h).copied().unwrap_or(0),
                total: totals.get(h).copied().unwrap_or(0),
            })
            .collect();
        placement::choose(&loads).ok_or_else(|| {
            let up: Vec<HostName> = self.hosts.keys().cloned().collect();
            let drained: Vec<HostName> = self.drains.iter().cloned().collect();
            placement::why_none(&up, &drained, allowed)
        })
    }

    pub(super) fn route_in(&mut self, sid: u32, id: InstanceId) {
        let Some(e) = self.core.service(sid) else {
            return;
        };
        if e.machine.target().manifest.port.is_none() {
            return;
        }
        let name = e.name.clone();
        let Some(x) = self.extra.get_mut(&sid) else {
            return;
        };
        let Some(host) = x.placed.get(&id).cloned() else {
            return;
        };
        let port = self
            .statuses
            .get(&(name.clone(), id))
            .and_then(|(_, st)| st.port);
        let address = self.hosts.get(&host).map(|r| r.address);
        match (port, address) {
            (Some(port), Some(ip)) => {
                x.routes.backends.insert(
                    id.0,
                    Backend {
                        host,
                        addr: SocketAddr::new(ip, port),
                        routed: true,
                    },
                );
                x.routes_dirty = true;
                x.out_at.remove(&id);
            }
            _ => self.logs.push((
                true,
                format!("{name}: instance {id} on {host} cannot be routed in: its port or its host's address is not known"),
            )),
        }
    }

    pub(super) fn event(&mut self, sid: u32, line: &str) {
        let Some(name) = self.core.service(sid).map(|e| e.name.clone()) else {
            return;
        };
        let x = self.extra.entry(sid).or_default();
        let n = x.next_event;
        x.next_event += 1;
        x.dirty = true;
        if let Some(old) = n.checked_sub(KEEP_EVENTS) {
            let key = self.keys.key(&Key::Event(name.clone(), old));
            self.puts.insert(key.clone(), Op::Delete(key));
        }
        let key = self.keys.key(&Key::Event(name, n));
        let record = EventRecord {
            ms: self.wall_ms,
            line: line.to_string(),
        };
        self.puts.insert(key.clone(), Op::Put(key, encode(&record)));
    }

    /// `host h3 lost: instances 2, 5 started again on h1, h2`.
    pub(super) fn say_lost(&mut self) {
        for (host, per) in std::mem::take(&mut self.lost) {
            for (sid, lost) in per {
                let numbers: Vec<u32> = lost.iter().map(|(n, _)| *n).collect();
                let mut to: Vec<String> = lost
                    .iter()
                    .filter_map(|(_, slot)| self.placed_now.get(&(sid, *slot)))
                    .map(|h| h.to_string())
                    .collect();
                to.dedup();
                let what = crate::rollout::instance_list(&numbers);
                let line = if to.is_empty() {
                    format!(
                        "host {host} lost (no word from it within host_timeout): {what} ended with it"
                    )
                } else {
                    format!(
                        "host {host} lost (no word from it within host_timeout): {what} rescheduled on {}",
                        to.join(", ")
                    )
                };
                self.event(sid, &line);
            }
        }
    }

    /// Each service's assignments, routes and snapshot, where changed.
    /// Writes what changed; whether a shown field of a service did (see
    /// [`Round::shown`]).
    pub(super) fn write_state(&mut self) -> bool {
        let mut shown = false;
        for sid in self.core.sids() {
            let Some(e) = self.core.service(sid) else {
                continue;
            };
            let name = e.name.clone();
            let Some(x) = self.extra.get_mut(&sid) else {
                continue;
            };
            let mut live = BTreeSet::new();
            for i in e.machine.instances() {
                if i.state() == State::Exited {
                    continue;
                }
                let id = i.id();
                let Some(host) = x.placed.get(&id).cloned() else {
                    continue;
                };
                live.insert(id);
                let a = Assignment {
                    slot: i.slot(),
                    number: i.number(),
                    spec: i.spec().clone(),
                    serving: i.role() == Role::Serving,
                    stop: x.stopping.contains(&id) || i.state() == State::Stopping,
                    retire: i.role() == Role::Retiring && i.state() == State::Draining,
                    signal: x.signals.get(&id).copied(),
                };
                if x.written.get(&id) != Some(&a) {
                    let key = self.keys.key(&Key::Assign(host, name.clone(), id));
                    self.puts.insert(key.clone(), Op::Put(key, encode(&a)));
                    x.written.insert(id, a);
                }
            }
            let gone: Vec<InstanceId> = x
                .written
                .keys()
                .filter(|id| !live.contains(id))
                .copied()
                .collect();
            for id in gone {
                x.written.remove(&id);
                if let Some(h) = x.placed.remove(&id) {
                    let key = self.keys.key(&Key::Assign(h, name.clone(), id));
                    self.puts.insert(key.clone(), Op::Delete(key));
                }
                x.seen.remove(&id);
                x.signals.remove(&id);
                x.stopping.remove(&id);
                x.dirty = true;
            }
            // Placed but never written (failed at once): forgotten.
            x.placed
                .retain(|id, _| live.contains(id) || x.written.contains_key(id));
            // An instance that ended (lost with its host, say) leaves the
            // routes with its process.
            let before = x.routes.backends.len();
            x.routes
                .backends
                .retain(|id, _| live.contains(&InstanceId(*id)));
            if x.routes.backends.len() != before {
                x.routes_dirty = true;
                x.out_at.retain(|id, _| live.contains(id));
            }
            if x.routes_dirty {
                x.routes_dirty = false;
                let key = self.keys.key(&Key::Routes(name.clone()));
                self.puts
                    .insert(key.clone(), Op::Put(key, encode(&x.routes)));
            }
            if x.dirty {
                x.dirty = false;
                let now_shown = (
                    e.machine.version(),
                    e.machine.update_status(),
                    e.machine.progress(),
                );
                shown |= x.shown.as_ref() != Some(&now_shown);
                x.shown = Some(now_shown);
                let snap = Snapshot {
                    machine: e.machine.clone(),
                    history: e.history.iter().map(|(v, t)| (*v, t.to_string())).collect(),
                    placed: x.placed.iter().map(|(id, h)| (id.0, h.clone())).collect(),
                    seen: x.seen.iter().map(|(id, s)| (id.0, s.clone())).collect(),
                    signals: x.signals.iter().map(|(id, s)| (id.0, *s)).collect(),
                    next_event: x.next_event,
                    at: self.now,
                    wall_ms: self.wall_ms,
                };
                let key = self.keys.key(&Key::Service(name.clone()));
                self.puts.insert(key.clone(), Op::Put(key, encode(&snap)));
            }
        }
        shown
    }

    pub(super) fn delete(&mut self, k: Key) {
        let key = self.keys.key(&k);
        self.puts.insert(key.clone(), Op::Delete(key));
    }
}
