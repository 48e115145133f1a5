//! The core against a simulated world: processes that start and get
//! healthy on a simulated clock, routes, drains, a disk that can be made
//! to fail. Each test holds one rule across services to what it promises.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::Duration;

use super::*;
use crate::ctl::Verb;
use crate::manifest;
use crate::rollout;

const MS: Duration = Duration::from_millis(1);

/// What happens to a simulated process.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Started(u32, u64),
    Probe(u32, u64),
    Exited(u32, u64),
    Drained(u32, u64),
}

/// The world the core decides for.
struct World {
    core: Core,
    now: Instant,
    seq: u64,
    queue: BinaryHeap<Reverse<(Instant, u64, Ev)>>,
    /// Live processes, by service and instance.
    alive: HashSet<(u32, u64)>,
    routed: HashSet<(u32, u64)>,
    /// Every effect's kind, in order (`Spawn web`, `Event web: ...`).
    seen: Vec<String>,
    replies: HashMap<u64, Result<String, Refusal>>,
    next_reply: u64,
    /// What SaveFirst meets: the errno a full disk says.
    disk_full: Option<i32>,
    /// Records on the simulated disk.
    disk: HashMap<ServiceName, Saved>,
}

fn name(n: &str) -> ServiceName {
    ServiceName::new(n).unwrap()
}

/// A manifest of `replicas` instances with an http probe and `extra`.
fn spec(exec: &str, replicas: u32, extra: &str) -> Spec {
    let text = format!(
        "exec {exec}\nreplicas {replicas}\nport {}\nhealth http /h\nhealth_interval 100ms\n{extra}",
        8000 + exec.len() as u16 * 7 + replicas as u16
    );
    Spec::new(manifest::parse(text.as_bytes()).unwrap(), text)
}

/// A manifest without a port.
fn worker(exec: &str, extra: &str) -> Spec {
    let text = format!("exec {exec}\nhealth exec true\nhealth_interval 100ms\n{extra}");
    Spec::new(manifest::parse(text.as_bytes()).unwrap(), text)
}

fn loaded(spec: Spec) -> Loaded {
    Loaded {
        spec,
        env_changed: Vec::new(),
    }
}

impl World {
    fn new() -> World {
        World {
            core: Core::new("/m"),
            now: Instant::default(),
            seq: 0,
            queue: BinaryHeap::new(),
            alive: HashSet::new(),
            routed: HashSet::new(),
            seen: Vec::new(),
            replies: HashMap::new(),
            next_reply: 0,
            disk_full: None,
            disk: HashMap::new(),
        }
    }

    fn at(&mut self, delay: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay, self.seq, ev)));
    }

    fn name_of(&self, sid: u32) -> String {
        self.core
            .service(sid)
            .map_or("?".into(), |e| e.name.to_string())
    }

    /// Carries out effects as deployd would, in a world where a process
    /// starts in 10 ms, is healthy from then on, and stops in 20 ms.
    fn run(&mut self, effects: Vec<Effect>) {
        let mut queue = std::collections::VecDeque::from(effects);
        while let Some(e) = queue.pop_front() {
            match e {
                Effect::Spawn { sid, id, .. } => {
                    self.seen.push(format!("Spawn {}", self.name_of(sid)));
                    self.alive.insert((sid, id.0));
                    self.at(10 * MS, Ev::Started(sid, id.0));
                }
                Effect::Stop { sid, id, .. } => {
                    self.seen.push(format!("Stop {}", self.name_of(sid)));
                    assert!(
                        !self.routed.contains(&(sid, id.0)),
                        "stopped while routed in"
                    );
                    self.at(20 * MS, Ev::Exited(sid, id.0));
                }
                Effect::RouteIn { sid, id } => {
                    self.routed.insert((sid, id.0));
                }
                Effect::RouteOut { sid, id } => {
                    self.routed.remove(&(sid, id.0));
                    self.at(5 * MS, Ev::Drained(sid, id.0));
                }
                Effect::Event { sid, line } => self
                    .seen
                    .push(format!("Event {}: {line}", self.name_of(sid))),
                Effect::Hook { .. } => panic!("no manifest here has hooks"),
                Effect::SaveFirst {
                    ticket,
                    name,
                    saved,
                    ..
                } => {
                    self.seen.push(format!("SaveFirst {name}"));
                    let result = match self.disk_full {
                        Some(errno) => Err(std::io::Error::from_raw_os_error(errno)),
                        None => {
                            self.disk.insert(name, saved);
                            Ok(())
                        }
                    };
                    let next = self.core.handle(self.now, Input::Saved { ticket, result });
                    for e in next.into_iter().rev() {
                        queue.push_front(e);
                    }
                }
                Effect::Save { sid } => {
                    if self.disk_full.is_none() {
                        if let (Some(e), Some(saved)) =
                            (self.core.service(sid), self.core.saved(sid))
                        {
                            self.disk.insert(e.name.clone(), saved);
                        }
                    }
                }
                Effect::Reply { to, result } => {
                    self.replies.insert(to.0, result);
                }
                Effect::Log { message, .. } => self.seen.push(format!("Log {message}")),
                Effect::Signal { .. }
                | Effect::Cut { .. }
                | Effect::ShowOutput { .. }
                | Effect::Listen { .. }
                | Effect::PruneHistory { .. }
                | Effect::Publish { .. }
                | Effect::Forget { .. } => {}
            }
        }
    }

    /// Feeds an input and ends the round.
    fn feed(&mut self, input: Input) {
        let effects = self.core.handle(self.now, input);
        self.run(effects);
        self.flush();
    }

    fn flush(&mut self) {
        loop {
            let effects = self.core.flush(self.now);
            self.run(effects);
            if !self.core.has_pending() && !self.core.is_dirty() {
                return;
            }
        }
    }

    /// Advances the simulated clock to the next thing that happens.
    fn step(&mut self) -> bool {
        let next_ev = self.queue.peek().map(|Reverse((t, _, _))| *t);
        let next_tick = self.core.next_deadline();
        let t = match (next_ev, next_tick) {
            (None, None) => return false,
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
        };
        self.now = self.now.max(t);
        if next_ev == Some(t) {
            let Some(Reverse((_, _, ev))) = self.queue.pop() else {
                return false;
            };
            let (sid, input) = match ev {
                Ev::Started(sid, id) if self.alive.contains(&(sid, id)) => {
                    self.at(MS, Ev::Probe(sid, id));
                    let pid = id as u32 + 1000;
                    (
                        sid,
                        rollout::Input::Started {
                            id: InstanceId(id),
                            pid,
                        },
                    )
                }
                Ev::Probe(sid, id) if self.alive.contains(&(sid, id)) => {
                    self.at(100 * MS, Ev::Probe(sid, id));
                    let result = Ok(());
                    (
                        sid,
                        rollout::Input::Probe {
                            id: InstanceId(id),
                            result,
                        },
                    )
                }
                Ev::Exited(sid, id) => {
                    self.alive.remove(&(sid, id));
                    let exit = rollout::Exit::Signal(15);
                    (
                        sid,
                        rollout::Input::Exited {
                            id: InstanceId(id),
                            exit,
                        },
                    )
                }
                Ev::Drained(sid, id) => (sid, rollout::Input::Drained { id: InstanceId(id) }),
                _ => return true,
            };
            self.feed(Input::Instance { sid, input });
            return true;
        }
        self.feed(Input::Tick);
        true
    }

    /// Runs until nothing moves but probes, or a minute of simulated time.
    fn settle(&mut self) {
        let until = self.now + Duration::from_secs(60);
        while self.now < until {
            let busy = self.core.services().any(|(_, e)| {
                e.machine.wait_line().is_none()
                    || e.machine.instances().iter().any(|i| {
                        !matches!(i.state(), rollout::State::Ready | rollout::State::Exited)
                    })
            });
            let waiting = self
                .core
                .services()
                .any(|(_, e)| !e.machine.waiting().is_empty());
            if !busy
                && !waiting
                && self
                    .queue
                    .iter()
                    .all(|Reverse((_, _, e))| matches!(e, Ev::Probe(..)))
            {
                return;
            }
            if !self.step() {
                return;
            }
        }
    }

    fn reply(&mut self) -> ReplyTo {
        self.next_reply += 1;
        ReplyTo(self.next_reply)
    }

    fn answer(&self, to: ReplyTo) -> Result<String, Refusal> {
        self.replies
            .get(&to.0)
            .cloned()
            .unwrap_or_else(|| panic!("no answer yet: {:#?}", self.seen))
    }

    /// `apply` of one service's manifest, through its ctl.
    fn apply(&mut self, service: &str, l: Loaded) -> Result<String, Refusal> {
        let reply = self.reply();
        self.feed(Input::Ctl {
            service: name(service),
            verb: Verb::Apply,
            manifest: Some(Ok(l)),
            reply,
        });
        self.answer(reply)
    }

    fn ctl(&mut self, service: &str, verb: Verb) -> Result<String, Refusal> {
        let reply = self.reply();
        self.feed(Input::Ctl {
            service: name(service),
            verb,
            manifest: None,
            reply,
        });
        self.answer(reply)
    }

    fn apply_all(&mut self, manifests: Manifests) -> Result<String, Refusal> {
        let reply = self.reply();
        self.feed(Input::ApplyAll { manifests, reply });
        self.answer(reply)
    }

    fn svc(&self, n: &str) -> &Svc {
        let sid = self.core.sid(&name(n)).unwrap_or_else(|| panic!("no {n}"));
        self.core.service(sid).unwrap()
    }

    fn ready(&self, n: &str) -> usize {
        self.svc(n)
            .machine
            .instances()
            .iter()
            .filter(|i| i.state() == rollout::State::Ready)
            .count()
    }

    fn spawns(&self, n: &str) -> usize {
        let key = format!("Spawn {n}");
        self.seen.iter().filter(|s| **s == key).count()
    }
}

/// `apply` of every manifest is all or nothing: one manifest that does not
/// load, or one service that refuses (it is stopped), and nothing changes
/// anywhere; otherwise every changed service rolls out, the unchanged are
/// said so, and services with no manifest are named and left alone.
#[test]
fn apply_of_every_manifest_is_all_or_nothing() {
    let mut w = World::new();
    let first = w.apply_all(Ok(vec![
        Ok((name("web"), loaded(spec("web-v1", 2, "")))),
        Ok((name("api"), loaded(spec("api-v1", 1, "")))),
        Ok((name("old"), loaded(worker("old", "")))),
    ]));
    assert_eq!(first.as_deref(), Ok("started: web, api, old"));
    w.settle();
    assert_eq!((w.ready("web"), w.ready("api")), (2, 1));
    let web_v1 = w.svc("web").machine.version();

    // One manifest does not load: refused, listing why; nothing changes.
    let spawns = w.spawns("web");
    let r = w
        .apply_all(Ok(vec![
            Ok((name("web"), loaded(spec("web-v2", 2, "")))),
            Err("/m/api.manifest:1:1: unknown directive 'bogus'".into()),
        ]))
        .unwrap_err();
    assert_eq!(r.kind, RefusalKind::Invalid);
    assert_eq!(r.message, "/m/api.manifest:1:1: unknown directive 'bogus'");
    w.settle();
    assert_eq!(w.svc("web").machine.version(), web_v1);
    assert_eq!(w.spawns("web"), spawns);

    // One service refuses (stopped): refused, web untouched.
    w.ctl("api", Verb::Stop).unwrap();
    w.settle();
    let r = w
        .apply_all(Ok(vec![
            Ok((name("web"), loaded(spec("web-v2", 2, "")))),
            Ok((name("api"), loaded(spec("api-v2", 1, "")))),
        ]))
        .unwrap_err();
    assert_eq!(r.kind, RefusalKind::Busy);
    assert_eq!(r.message, "api: the service is stopped; start it first");
    w.settle();
    assert_eq!(w.svc("web").machine.version(), web_v1);
    assert_eq!(w.spawns("web"), spawns);
    w.ctl("api", Verb::Start).unwrap();
    w.settle();

    // Both change but one: the changed roll out, the other is unchanged,
    // the one with no manifest is named.
    let answer = w.apply_all(Ok(vec![
        Ok((name("web"), loaded(spec("web-v2", 2, "")))),
        Ok((name("api"), loaded(spec("api-v1", 1, "")))),
    ]));
    assert_eq!(
        answer.as_deref(),
        Ok("started: web; unchanged: api; no manifest: old")
    );
    w.settle();
    assert_ne!(w.svc("web").machine.version(), web_v1);
    assert_eq!(w.ready("web"), 2);
    // No manifest at all: refused as the caller found it.
    let none = Refusal {
        kind: RefusalKind::NotFound,
        message: "no *.manifest file in /m".into(),
    };
    assert_eq!(w.apply_all(Err(none.clone())), Err(none));
}

/// `reexec` only when every service has settled: not during a rollout,
/// not after a failed one that left slots without a ready instance, not
/// while an instance cannot be handed on; once accepted, every later
/// command is refused while deployd replaces itself.
#[test]
fn reexec_is_accepted_only_when_everything_has_settled() {
    let mut w = World::new();
    w.apply("web", loaded(spec("web-v1", 2, ""))).unwrap();
    w.settle();
    let reexec = |w: &mut World, unhandable: Vec<u32>| {
        let reply = w.reply();
        w.feed(Input::ReExec {
            exe: Ok("/usr/bin/deployd".into()),
            unhandable,
            reply,
        });
        w.answer(reply)
    };
    // A rollout in flight.
    w.apply("web", loaded(spec("web-v2", 2, ""))).unwrap();
    let r = reexec(&mut w, Vec::new()).unwrap_err();
    assert_eq!(
        (r.kind, r.message.as_str()),
        (
            RefusalKind::Busy,
            "web: a rollout is in progress; reexec once it is over"
        )
    );
    w.settle();
    // An instance the runtime cannot hand on.
    let sid = w.core.sid(&name("web")).unwrap();
    let r = reexec(&mut w, vec![sid]).unwrap_err();
    assert_eq!(
        r.message,
        "web: 2 of 2 instances ready; reexec once every one is"
    );
    // The binary is not there.
    let reply = w.reply();
    let missing = Refusal {
        kind: RefusalKind::NotFound,
        message: "/usr/bin/deployd is not an executable file".into(),
    };
    w.feed(Input::ReExec {
        exe: Err(missing.clone()),
        unhandable: Vec::new(),
        reply,
    });
    assert_eq!(w.answer(reply), Err(missing));
    // Settled: accepted, and said in events.
    assert_eq!(
        reexec(&mut w, Vec::new()).as_deref(),
        Ok("replacing deployd with /usr/bin/deployd; instances keep running")
    );
    assert!(w.core.replacing());
    assert!(
        w.seen
            .iter()
            .any(|s| s == "Event web: deployd replacing itself (reexec); instances keep running")
    );
    let r = w.ctl("web", Verb::Pause).unwrap_err();
    assert_eq!(r.kind, RefusalKind::Busy);
    assert!(
        r.message.starts_with("deployd is replacing itself"),
        "{}",
        r.message
    );
}

/// A failed rollout that leaves slots without a ready instance refuses
/// `reexec` with what will fix it.
#[test]
fn reexec_after_a_failed_rollout_says_what_is_needed() {
    let mut w = World::new();
    w.apply("web", loaded(spec("web-v1", 1, ""))).unwrap();
    w.settle();
    // The only instance crashes for good: its slot has nothing ready.
    let sid = w.core.sid(&name("web")).unwrap();
    let id = w.svc("web").machine.instances()[0].id();
    // The machine fails a rollout whose candidate exits: make it so.
    w.apply("web", loaded(spec("web-v2", 1, ""))).unwrap();
    let cand = w
        .svc("web")
        .machine
        .instances()
        .iter()
        .find(|i| i.id() != id)
        .map(|i| i.id())
        .unwrap();
    w.alive.remove(&(sid, cand.0));
    w.feed(Input::Instance {
        sid,
        input: rollout::Input::Exited {
            id: cand,
            exit: rollout::Exit::Code(1),
        },
    });
    w.alive.remove(&(sid, id.0));
    w.feed(Input::Instance {
        sid,
        input: rollout::Input::Exited {
            id,
            exit: rollout::Exit::Code(1),
        },
    });
    let reply = w.reply();
    w.feed(Input::ReExec {
        exe: Ok("/d".into()),
        unhandable: Vec::new(),
        reply,
    });
    let r = w.answer(reply).unwrap_err();
    assert_eq!(
        r.message,
        "web: its last rollout failed and 0 of 1 instances are ready; apply a manifest that \
         works (or remove web), then reexec"
    );
}

/// `after`: a service deployed with the one it comes after starts nothing
/// until that one is up (every replica ready), and stops before it.
#[test]
fn after_holds_starts_until_the_dependency_is_up_and_orders_stops() {
    let mut w = World::new();
    let r = w.apply_all(Ok(vec![
        Ok((name("app"), loaded(spec("app-v1", 2, "after db\n")))),
        Ok((name("db"), loaded(spec("db-v1", 2, "")))),
    ]));
    assert_eq!(r.as_deref(), Ok("started: app, db"));
    assert_eq!(w.spawns("app"), 0, "app started before db was up");
    assert_eq!(w.svc("app").machine.waiting(), &[name("db")]);
    // db comes up: only then app starts.
    while w.ready("db") < 2 {
        assert!(w.step());
        if w.ready("db") < 2 {
            assert_eq!(w.spawns("app"), 0, "app started before db was up");
        }
    }
    w.settle();
    assert_eq!((w.ready("db"), w.ready("app")), (2, 2));
    let order: Vec<Vec<String>> = w
        .core
        .stop_order()
        .into_iter()
        .map(|g| g.iter().map(|s| w.name_of(*s)).collect())
        .collect();
    assert_eq!(order, [vec!["app".to_string()], vec!["db".to_string()]]);
    // An after that names nothing deployed, or closes a cycle: refused.
    let r = w
        .apply("lone", loaded(spec("lone", 1, "after ghost\n")))
        .unwrap_err();
    assert!(
        r.message.contains("no service ghost is deployed"),
        "{}",
        r.message
    );
    let r = w
        .apply("db", loaded(spec("db-v2", 2, "after app\n")))
        .unwrap_err();
    assert!(
        r.message.contains("a cycle (db → app → db)"),
        "{}",
        r.message
    );
}

/// What a command that starts something changes is on disk before it
/// acts: with the disk full, it is refused with the errno and nothing
/// starts; a command that holds or stops acts all the same.
#[test]
fn a_full_disk_refuses_what_would_start_and_lets_what_stops_act() {
    let mut w = World::new();
    w.apply("web", loaded(spec("web-v1", 2, "update_pause 5s\n")))
        .unwrap();
    w.settle();
    let v1 = w.svc("web").machine.version();
    let spawns = w.spawns("web");
    w.disk_full = Some(libc::ENOSPC);
    let r = w
        .apply("web", loaded(spec("web-v2", 2, "update_pause 5s\n")))
        .unwrap_err();
    assert_eq!(r.kind, RefusalKind::Storage(libc::ENOSPC));
    assert!(
        r.message
            .starts_with("cannot save the state of web (nothing changed): "),
        "{}",
        r.message
    );
    w.settle();
    assert_eq!(
        w.svc("web").machine.version(),
        v1,
        "the machine was not put back"
    );
    assert_eq!(w.spawns("web"), spawns, "something started");
    // A new service cannot be created either.
    let r = w.apply("api", loaded(spec("api-v1", 1, ""))).unwrap_err();
    assert_eq!(r.kind, RefusalKind::Storage(libc::ENOSPC));
    assert!(w.core.sid(&name("api")).is_none());
    // With room again: it rolls out; paused mid-way with the disk full
    // again, the pause acts all the same.
    w.disk_full = None;
    w.apply("web", loaded(spec("web-v2", 2, "update_pause 5s\n")))
        .unwrap();
    w.disk_full = Some(libc::ENOSPC);
    assert!(w.ctl("web", Verb::Pause).is_ok());
    assert_eq!(
        w.svc("web").machine.update_status(),
        rollout::UpdateStatus::Paused
    );
    // And so does a stop.
    w.disk_full = None;
    w.settle();
    w.disk_full = Some(libc::EROFS);
    assert!(w.ctl("web", Verb::Stop).is_ok());
    assert!(w.svc("web").machine.is_stopped());
}

/// An `apply` of the manifest a service already runs is `unchanged`,
/// unless the env files say something else now than when an instance
/// started: then every instance is restarted, and the answer says why.
#[test]
fn an_apply_whose_env_files_changed_restarts_every_instance() {
    let mut w = World::new();
    let s = spec("web-v1", 2, "env_file web.env\n");
    w.apply("web", loaded(s.clone())).unwrap();
    w.settle();
    let unchanged = format!("unchanged: already at {}", s.version);
    assert_eq!(w.apply("web", loaded(s.clone())), Ok(unchanged));
    let spawns = w.spawns("web");
    let first = w.svc("web").machine.instances()[0].id();
    let r = w
        .apply(
            "web",
            Loaded {
                spec: s.clone(),
                env_changed: vec![first],
            },
        )
        .unwrap();
    assert!(
        r.starts_with("env_file changed since instance 0 started; "),
        "{r}"
    );
    assert!(
        w.seen.iter().any(|e| e
            == "Event web: apply: env_file changed since instance 0 started: restarting every instance"),
        "{:#?}",
        w.seen
    );
    w.settle();
    assert_eq!(w.spawns("web"), spawns + 2, "every instance restarted");
    assert_eq!(w.svc("web").machine.version(), s.version);
    // A manifest without env files never restarts for them.
    let plain = spec("plain", 1, "");
    w.apply("plain", loaded(plain.clone())).unwrap();
    w.settle();
    let id = w.svc("plain").machine.instances()[0].id();
    let r = w.apply(
        "plain",
        Loaded {
            spec: plain,
            env_changed: vec![id],
        },
    );
    assert!(r.unwrap().starts_with("unchanged"));
}

/// deployd's own readiness: not back while an instance is starting; back
/// once every instance is ready, and once a service is stopped; the line
/// counts ready instances out of replicas and names what is rolling,
/// held or failed.
#[test]
fn the_host_is_back_once_no_instance_is_starting() {
    let mut w = World::new();
    assert_eq!(
        w.core.standing(),
        Standing {
            back: true,
            line: "0 services, 0/0 instances ready".into()
        }
    );
    w.apply_all(Ok(vec![
        Ok((name("web"), loaded(spec("web-v1", 2, "")))),
        Ok((name("api"), loaded(spec("api-v1", 1, "")))),
    ]))
    .unwrap();
    let s = w.core.standing();
    assert!(!s.back, "{s:?}");
    assert_eq!(s.line, "2 services, 0/3 instances ready; rolling: api, web");
    w.settle();
    assert_eq!(
        w.core.standing(),
        Standing {
            back: true,
            line: "2 services, 3/3 instances ready".into()
        }
    );
    // A rollout: starting again, and named; old and new ready at once
    // count once.
    w.apply("web", loaded(spec("web-v2", 2, ""))).unwrap();
    let s = w.core.standing();
    assert!(!s.back, "{s:?}");
    assert_eq!(s.line, "2 services, 3/3 instances ready; rolling: web");
    w.settle();
    w.ctl("api", Verb::Stop).unwrap();
    w.settle();
    assert_eq!(
        w.core.standing(),
        Standing {
            back: true,
            line: "2 services, 2/2 instances ready".into()
        }
    );
}
