//! `after`: the order between services. A service whose manifest says
//! `after db` starts its instances, when it is created, restored at
//! deployd's start or started again, only once `db` is up; when deployd
//! stops, it stops before `db`. The state machine holds the starts
//! ([`MachineInput::Wait`]); the core, which sees every service, says when
//! to go.

use super::Core;
use crate::manifest::{self, Manifest};
use crate::name::ServiceName;
use crate::order::{self, Graph};
use crate::rollout::{Input as MachineInput, Spec, State};

/// Every service's `after`, by name, from its target manifest.
fn graph(core: &Core) -> Graph {
    core.services
        .values()
        .map(|e| (e.name.clone(), e.machine.target().manifest.after.clone()))
        .collect()
}

/// Whether `name` is up for the services that come after it: running,
/// waiting for nothing itself, and with as many ready instances as its
/// `replicas` (of any version: a failed rollout still serves).
fn is_up(core: &Core, name: &ServiceName) -> bool {
    let Some(e) = core.names.get(name).and_then(|sid| core.services.get(sid)) else {
        return false;
    };
    let m = &e.machine;
    let ready = m
        .instances()
        .iter()
        .filter(|i| i.state() == State::Ready)
        .count();
    !m.is_stopped() && m.waiting().is_empty() && ready >= m.target().manifest.replicas as usize
}

/// Says which of the services `sid` waits for are stopped: only a `start`
/// of theirs gets it going, which an operator had better know than find
/// out from a wait that does not end.
pub(super) fn say_stopped(core: &mut Core, sid: u32) {
    let Some(e) = core.services.get(&sid) else {
        return;
    };
    let stopped: Vec<ServiceName> = e
        .machine
        .waiting()
        .iter()
        .filter(|d| {
            let dep = core.names.get(*d).and_then(|s| core.services.get(s));
            dep.is_some_and(|e| e.machine.is_stopped() && !e.machine.is_removing())
        })
        .cloned()
        .collect();
    for dep in stopped {
        core.event(
            sid,
            format!("{dep} is stopped: this waits until it is started (deploy start {dep})"),
        );
    }
}

/// What `name`, whose manifest is `m`, waits for now: each service of its
/// `after` that exists (or is in `coming`, about to) and is not up. One
/// that comes after `name` in turn is left out: a cycle, which `apply`
/// refuses but a rollback to an older manifest can bring back, must not
/// hold both for ever.
pub(super) fn pending(
    core: &Core,
    name: &ServiceName,
    m: &Manifest,
    coming: &[ServiceName],
) -> Vec<ServiceName> {
    let mut g = graph(core);
    g.insert(name.clone(), m.after.clone());
    pending_in(core, &g, name, m, coming)
}

/// [`pending`] with the graph already built (and holding `name`'s edges).
fn pending_in(
    core: &Core,
    graph: &Graph,
    name: &ServiceName,
    m: &Manifest,
    coming: &[ServiceName],
) -> Vec<ServiceName> {
    m.after
        .iter()
        .filter(|d| core.names.contains_key(*d) || coming.contains(d))
        .filter(|d| !is_up(core, d))
        .filter(|d| !order::reaches(graph, d, name))
        .cloned()
        .collect()
}

/// Checks the `after` of manifests about to be applied together (each
/// service with its spec): each names a service that is deployed or among
/// them, and none closes a cycle. Each error is the service's and
/// `FILE:LINE:COL: message`, at the `after` line.
pub(super) fn check(core: &Core, applied: &[(ServiceName, Spec)]) -> Vec<(ServiceName, String)> {
    let mut g = graph(core);
    for (name, spec) in applied {
        g.insert(name.clone(), spec.manifest.after.clone());
    }
    let mut errors = Vec::new();
    for (name, spec) in applied {
        let (m, text) = (&spec.manifest, &spec.text);
        let file = core.manifests_dir.join(format!("{name}.manifest"));
        let at = |dep: &str| {
            let (line, col) = manifest::position_of_after(text, dep).unwrap_or((1, 1));
            format!("{}:{line}:{col}", file.display())
        };
        for dep in &m.after {
            if !g.contains_key(dep) {
                errors.push((
                    name.clone(),
                    format!(
                        "{}: after {dep}: no service {dep} is deployed (deploy it first, or apply every manifest)",
                        at(dep.as_str())
                    ),
                ));
            }
        }
        if let Some((first, message)) = order::cycle_error(&g, name) {
            errors.push((name.clone(), format!("{}: {message}", at(first.as_str()))));
        }
    }
    errors
}

/// Tells each waiting service what it still waits for, once something it
/// waited for is up (or gone). At each flush: a service that goes frees
/// those after it once its instances are ready, which is a later input.
pub(super) fn release_waiting(core: &mut Core) {
    let waiting: Vec<(u32, ServiceName, Vec<ServiceName>)> = core
        .services
        .iter()
        .filter(|(_, e)| !e.machine.waiting().is_empty())
        .map(|(&sid, e)| (sid, e.name.clone(), e.machine.waiting().to_vec()))
        .collect();
    if waiting.is_empty() {
        return;
    }
    // Once for all: a thousand services waiting for one must not build the
    // graph a thousand times at each flush.
    let g = graph(core);
    for (sid, name, was) in waiting {
        let Some(m) = core
            .services
            .get(&sid)
            .map(|e| e.machine.target().manifest.clone())
        else {
            continue;
        };
        let now: Vec<ServiceName> = pending_in(core, &g, &name, &m, &[])
            .into_iter()
            .filter(|d| was.contains(d))
            .collect();
        if now != was {
            let gone: Vec<ServiceName> = was
                .iter()
                .filter(|d| !core.names.contains_key(*d))
                .cloned()
                .collect();
            for g in gone {
                core.event(
                    sid,
                    format!("{g} is no longer deployed; not waiting for it"),
                );
            }
            let _ = core.feed(sid, MachineInput::Wait(now));
        }
    }
}

/// The services' numbers in the order they stop: see
/// [`order::stop_groups`].
pub(super) fn stop_order(core: &Core) -> Vec<Vec<u32>> {
    order::stop_groups(&graph(core))
        .into_iter()
        .map(|group| {
            group
                .iter()
                .filter_map(|n| core.names.get(n).copied())
                .collect()
        })
        .collect()
}
