//! Carrying out what the core decided, one effect at a time, in order.

use std::collections::VecDeque;

use deployd_lib::core::{Effect, Input};

use super::Runtime;

impl Runtime {
    /// Carries out `effects` in order. A save the core waits for is done
    /// at once and its outcome fed back; what the core then decides comes
    /// next, before anything else.
    pub(super) fn carry_out(&mut self, effects: Vec<Effect>) {
        let mut queue = VecDeque::from(effects);
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Spawn {
                    sid,
                    id,
                    slot,
                    spec,
                } => self.start_instance(sid, id, slot, &spec),
                Effect::Signal { sid, id, signal } => self.signal(sid, id, signal.number()),
                Effect::RouteIn { sid, id } => self.route_in(sid, id),
                Effect::RouteOut { sid, id } => self.route_out(sid, id),
                Effect::Cut { sid, id } => self.cut(sid, id),
                Effect::Stop {
                    sid,
                    id,
                    signal,
                    timeout,
                } => self.stop_instance(sid, id, signal.number(), timeout),
                Effect::Event { sid, line } => {
                    self.log(sid, &line);
                }
                Effect::ShowOutput { sid, id, prefix } => self.show_output(sid, id, &prefix),
                Effect::Listen { sid } => self.sync_proxy(sid),
                Effect::Hook {
                    sid,
                    hook,
                    command,
                    env,
                    timeout,
                } => self.run_hook(sid, hook, command, env, timeout),
                Effect::SaveFirst {
                    ticket,
                    name,
                    create,
                    manifests,
                    saved,
                } => {
                    let result = self.save_first(&name, create, &manifests, &saved);
                    if result.is_ok() {
                        self.saved_first(&name, saved);
                    }
                    let now = self.now();
                    let next = self.core.handle(now, Input::Saved { ticket, result });
                    for e in next.into_iter().rev() {
                        queue.push_front(e);
                    }
                }
                Effect::PruneHistory { name, keep } => self.store.prune_history(&name, &keep),
                Effect::Save { sid } => self.persist(sid),
                Effect::Publish { sid } => self.publish(sid),
                Effect::Forget { sid, name } => self.forget(sid, &name),
                Effect::Reply { to, result } => {
                    if let Some(done) = self.replies.remove(&to.0) {
                        done(result);
                    }
                }
                Effect::Log { error, message } => match error {
                    true => tracing::error!("{message}"),
                    false => tracing::info!("{message}"),
                },
            }
        }
    }

    /// Writes what a command changes before it acts: for a new service its
    /// directories first (removed again if anything fails), then the new
    /// manifests, then the record.
    fn save_first(
        &self,
        name: &deployd_lib::name::ServiceName,
        create: bool,
        manifests: &[(deployd_lib::manifest::Version, std::sync::Arc<str>)],
        saved: &deployd_lib::core::Saved,
    ) -> std::io::Result<()> {
        let written = (|| {
            if create {
                self.store.create(name)?;
            }
            for (v, text) in manifests {
                self.store.save_manifest(name, *v, text)?;
            }
            self.store.save(name, saved)
        })();
        if written.is_err() && create {
            let _ = self.store.remove(name);
        }
        written
    }
}
