//! Several hosts coordinated through etcd, sans I/O: the keys deployd
//! keeps in etcd and what each holds ([`Keys`], the records), where a new
//! instance goes ([`placement`]), what the leader decides ([`leader`]) and
//! what each host decides about its own instances ([`agent`]).
//!
//! etcd holds the desired state and the coordination; nothing here talks
//! to it. The leader is the one host holding the `leader` key: it runs
//! every service's rollout machine (the same [`crate::core::Core`] as on
//! one host) and turns their actions into keys: an *assignment* per
//! instance for the host that runs it, a *route table* per service that
//! every host's proxy follows, the machine's *snapshot*, the events. Each
//! host carries out its assignments and writes a *status* per instance
//! and an *ack* of the route tables it applied; the leader turns those
//! back into the machine's inputs. Every decision is taken from the whole
//! state, so a repeated or late record changes nothing, and a new leader
//! takes the machines on from their snapshots (see docs/cluster.md).
//!
//! Every value is JSON.

pub mod agent;
pub mod leader;
pub mod placement;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::ctl::Verb;
use crate::manifest::{Signal, Version};
use crate::name::{HostName, ServiceName};
use crate::rollout::{Exit, InstanceId, Instant, Refusal, Service, Spec};

/// What etcd calls a key's place: deployd's keys are all under a prefix
/// (`/deployd/` unless configured), so that one etcd may serve others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

/// One of deployd's keys, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// `hosts/H`: a live host's [`HostRecord`], bound to its lease.
    Host(HostName),
    /// `leader`: the leader's name, bound to its lease.
    Leader,
    /// `services/S`: the leader's [`Snapshot`] of a service.
    Service(ServiceName),
    /// `events/S/N`: the Nth [`EventRecord`] of a service.
    Event(ServiceName, u64),
    /// `assign/H/S/ID`: an [`Assignment`] for host H.
    Assign(HostName, ServiceName, InstanceId),
    /// `status/H/S/ID`: host H's [`Status`] of an instance, bound to its lease.
    Status(HostName, ServiceName, InstanceId),
    /// `routes/S`: a service's [`Routes`].
    Routes(ServiceName),
    /// `acks/H`: host H's [`Ack`], bound to its lease.
    Ack(HostName),
    /// `drain/H`: host H is drained (an operator's `drain`).
    Drain(HostName),
    /// `commands/ID`: a [`Command`] for the leader.
    Command(String),
    /// `replies/H/ID`: the leader's [`Reply`] to host H's command.
    Reply(HostName, String),
}

impl Keys {
    /// Keys under `prefix` (`/deployd` and `/deployd/` are the same).
    pub fn new(prefix: &str) -> Keys {
        let mut prefix = prefix.trim_end_matches('/').to_string();
        if !prefix.starts_with('/') {
            prefix.insert(0, '/');
        }
        prefix.push('/');
        Keys { prefix }
    }

    /// Every key of deployd's starts with this.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A key as etcd stores it.
    pub fn key(&self, k: &Key) -> String {
        let p = &self.prefix;
        match k {
            Key::Host(h) => format!("{p}hosts/{h}"),
            Key::Leader => format!("{p}leader"),
            Key::Service(s) => format!("{p}services/{s}"),
            Key::Event(s, n) => format!("{p}events/{s}/{n:016x}"),
            Key::Assign(h, s, id) => format!("{p}assign/{h}/{s}/{}", id.0),
            Key::Status(h, s, id) => format!("{p}status/{h}/{s}/{}", id.0),
            Key::Routes(s) => format!("{p}routes/{s}"),
            Key::Ack(h) => format!("{p}acks/{h}"),
            Key::Drain(h) => format!("{p}drain/{h}"),
            Key::Command(id) => format!("{p}commands/{id}"),
            Key::Reply(h, id) => format!("{p}replies/{h}/{id}"),
        }
    }

    /// The keys under `dir/` (`events/web/`, say): a range's start.
    pub fn dir(&self, dir: &str) -> String {
        format!("{}{}/", self.prefix, dir.trim_end_matches('/'))
    }

    /// Which key this is, if it is one of deployd's.
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.prefix)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let host = |s: &str| HostName::new(s).ok();
        let svc = |s: &str| ServiceName::new(s).ok();
        let id = |s: &str| s.parse::<u64>().ok().map(InstanceId);
        let token = |s: &str| {
            (!s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
            .then(|| s.to_string())
        };
        Some(match parts.as_slice() {
            ["hosts", h] => Key::Host(host(h)?),
            ["leader"] => Key::Leader,
            ["services", s] => Key::Service(svc(s)?),
            ["events", s, n] => Key::Event(svc(s)?, u64::from_str_radix(n, 16).ok()?),
            ["assign", h, s, i] => Key::Assign(host(h)?, svc(s)?, id(i)?),
            ["status", h, s, i] => Key::Status(host(h)?, svc(s)?, id(i)?),
            ["routes", s] => Key::Routes(svc(s)?),
            ["acks", h] => Key::Ack(host(h)?),
            ["drain", h] => Key::Drain(host(h)?),
            ["commands", c] => Key::Command(token(c)?),
            ["replies", h, c] => Key::Reply(host(h)?, token(c)?),
            _ => return None,
        })
    }
}

/// `hosts/H`: a live host, as it says itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Where other hosts reach its instances.
    pub address: IpAddr,
    /// Who it is: a token its state directory keeps, so that a deployd
    /// started again on the same host takes its name back, and another
    /// host with the same name is refused.
    pub id: String,
    /// Its lease in etcd (revoked by the same host's next deployd).
    pub lease: i64,
    /// CPUs it has.
    pub cpus: u32,
    /// Memory it has, in bytes.
    pub memory: u64,
    /// When its deployd started (ms since the Unix epoch).
    pub started_ms: u64,
}

/// `services/S`: what the leader keeps of a service between rounds; what
/// the next leader takes on and what every host's namespace shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// The rollout machine.
    pub machine: Service,
    /// The manifests of its history, oldest first.
    pub history: Vec<(Version, String)>,
    /// Each live instance's host.
    pub placed: BTreeMap<u64, HostName>,
    /// What the leader has made of each instance's status so far.
    pub seen: BTreeMap<u64, Seen>,
    /// Signals asked of each instance: a count, and the last signal.
    pub signals: BTreeMap<u64, (u64, Signal)>,
    /// The number of the next event.
    pub next_event: u64,
    /// The machine's instant when saved, and the wall clock then (ms
    /// since the Unix epoch): the next leader moves the machine's instants
    /// to its own clock from these ([`Service::rebase`]).
    pub at: Instant,
    /// See `at`.
    pub wall_ms: u64,
}

/// What the leader has fed its machine of an instance's [`Status`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// The host's deployd it came from ([`Status::boot`]).
    pub boot: u64,
    /// The pid last fed as `Started`.
    pub pid: Option<u32>,
    /// Failed probes fed.
    pub fails: u64,
    /// Whether the last probe fed passed.
    pub ok: bool,
    /// Restarts in place fed.
    pub restarts: u32,
    /// Whether its end was fed.
    pub exited: bool,
    /// Samples over `memory_high` fed.
    #[serde(default)]
    pub over: u64,
}

/// `events/S/N`: one line of a service's events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// When (ms since the Unix epoch, the leader's clock).
    pub ms: u64,
    /// The line.
    pub line: String,
}

/// `assign/H/S/ID`: an instance host H must run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// Its slot (`$INSTANCE`).
    pub slot: u32,
    /// Its number in the namespace.
    pub number: u32,
    /// What it runs.
    pub spec: Spec,
    /// A serving instance (not a candidate of a rollout): its host starts
    /// it again in place when it ends, by its restart policy.
    pub serving: bool,
    /// Stop it (its `stop_signal`, SIGKILL after `stop_timeout`).
    pub stop: bool,
    /// Routed out to be stopped: its host stops it as soon as every host
    /// has let go of it ([`LetGo`]), without waiting for the leader to
    /// hear the acks and write `stop` (which follows all the same, and
    /// alone stops it at the `drain` limit).
    #[serde(default)]
    pub retire: bool,
    /// Signals asked so far and the last one: a host sends it when the
    /// count passes what it has sent.
    pub signal: Option<(u64, Signal)>,
}

/// `status/H/S/ID`: an instance as its host sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Which deployd of the host runs it (its start, ms since the Unix
    /// epoch): a status from another one is of a process that ended with
    /// that deployd.
    pub boot: u64,
    /// Its process, while one runs.
    pub pid: Option<u32>,
    /// Its `$PORT`.
    pub port: Option<u16>,
    /// Whether its last probe passed.
    pub ok: bool,
    /// Probes failed since it was assigned.
    pub fails: u64,
    /// The last failed probe's error.
    pub error: Option<String>,
    /// Times its host started it again in place.
    pub restarts: u32,
    /// How it ended before its last restart in place.
    pub last_exit: Option<Exit>,
    /// How it ended, when it did and is not started again.
    pub exit: Option<Exit>,
    /// The last lines it printed, at its last failure or end.
    pub lines: Vec<String>,
    /// A digest of the env files' variables it started with.
    pub env: String,
    /// Samples of its memory over `memory_high` so far, and the last one
    /// (resident bytes).
    #[serde(default)]
    pub over: Option<(u64, u64)>,
}

/// `routes/S`: where every host's proxy sends a service's traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routes {
    /// Each instance routed in or still draining, by id.
    pub backends: BTreeMap<u64, Backend>,
}

/// One instance in a [`Routes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// Its host.
    pub host: HostName,
    /// Its host's address and its port.
    pub addr: SocketAddr,
    /// Routed in; `false`: routed out, draining (nothing new is sent).
    pub routed: bool,
}

/// `acks/H`: the route tables host H applied, and what is still in flight.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The etcd revision of the last route tables its proxies follow.
    pub rev: u64,
    /// Instances routed out that still have requests or connections
    /// through this host's proxies.
    pub busy: Vec<(ServiceName, u64)>,
}

/// Whether every host in `hosts` has let go of instance `id` of
/// `service`, routed out at revision `out`: each one's ack is of that
/// route table or a later one, and none has anything in flight on it.
pub fn let_go<'a>(
    hosts: impl IntoIterator<Item = &'a HostName>,
    acks: &BTreeMap<HostName, Ack>,
    out: u64,
    service: &ServiceName,
    id: u64,
) -> bool {
    hosts.into_iter().all(|h| {
        acks.get(h)
            .is_some_and(|a| a.rev >= out && !a.busy.iter().any(|(s, i)| s == service && *i == id))
    })
}

/// What a host knows of the drains under way, from its copy of etcd:
/// the hosts' acks, and the revision at which each instance was routed
/// out. Every host sees the same revisions in the same order, so each
/// reaches the leader's verdict ([`let_go`]) on its own, a watch hop and
/// a transaction sooner.
#[derive(Debug, Default)]
pub struct LetGo {
    acks: BTreeMap<HostName, Ack>,
    out: BTreeMap<(ServiceName, u64), u64>,
}

impl LetGo {
    /// Host `h`'s ack, or its deletion.
    pub fn ack(&mut self, h: &HostName, ack: Option<Ack>) {
        match ack {
            Some(a) => self.acks.insert(h.clone(), a),
            None => self.acks.remove(h),
        };
    }

    /// A service's route table as written at revision `rev`: an instance
    /// routed out keeps the revision it was first seen so.
    pub fn routes(&mut self, service: &ServiceName, routes: &Routes, rev: u64) {
        self.out.retain(|(s, id), _| {
            s != service || routes.backends.get(id).is_some_and(|b| !b.routed)
        });
        for (id, b) in &routes.backends {
            if !b.routed {
                self.out.entry((service.clone(), *id)).or_insert(rev);
            }
        }
    }

    /// Whether every host in `hosts` (those up) has let go of the
    /// instance; false while it is not routed out.
    pub fn released<'a>(
        &self,
        hosts: impl IntoIterator<Item = &'a HostName>,
        service: &ServiceName,
        id: u64,
    ) -> bool {
        self.out
            .get(&(service.clone(), id))
            .is_some_and(|out| let_go(hosts, &self.acks, *out, service, id))
    }
}

/// A manifest as a host loaded it for `apply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loaded {
    /// The manifest's text.
    pub text: String,
    /// A digest of its env files' variables on that host.
    pub env: String,
}

/// `commands/ID`: a ctl command written on a host, for the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Command {
    /// The host it was written on, which waits for the [`Reply`].
    pub from: HostName,
    /// The command.
    pub what: What,
}

/// What a [`Command`] asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum What {
    /// A command of a service; for `apply`, its manifest as loaded.
    Service {
        /// The service.
        service: ServiceName,
        /// The command.
        verb: Verb,
        /// `apply`: the manifest, or why it could not be loaded.
        manifest: Option<Result<Loaded, Refusal>>,
    },
    /// `apply` of every manifest of the host's manifests directory: each
    /// loaded or its error; or why there are none.
    ApplyAll(Result<Vec<LoadedOne>, Refusal>),
}

/// One manifest of an `apply` of every one: loaded, or its error.
pub type LoadedOne = Result<(ServiceName, Loaded), String>;

/// `replies/H/ID`: the leader's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// What was done, or why not.
    pub result: Result<String, Refusal>,
}

/// JSON of a record.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these types cannot fail: every map key is a string or
    // a number.
    serde_json::to_vec(value).unwrap_or_default()
}

/// A record from JSON; the error says what is wrong.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}
