//! deployd end to end: real deployd, real FUSE mount, real instance
//! processes, driven by the real `deploy` CLI and by `sh`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

const LONG: Duration = Duration::from_secs(60);

/// Acceptance 1: web at v1 with 3 replicas: all healthy; the files say so.
#[test]
fn deploy_three_replicas() {
    let m = app_manifest(3, "");
    let Some(d) = Deployd::start_settled(&[("web", m.clone())]) else {
        return;
    };
    let version = deployd_lib::manifest::parse(m.as_bytes())
        .unwrap()
        .version()
        .to_string();
    assert_eq!(d.read("active/web/version"), format!("{version}\n"));
    assert_eq!(d.read("active/web/update_status"), "none\n");
    assert_eq!(d.read("active/web/update_progress"), "3/3\n");
    assert_eq!(d.read("active/web/previous_version"), "");
    assert_eq!(d.read("active/web/state"), "running\n");
    assert_eq!(d.read("active/web/manifest"), m);
    let inst = d.instances("web");
    assert_eq!(inst.iter().map(|i| i.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    for (n, pid, state, v, port) in &inst {
        assert_eq!(state, "ready");
        assert_eq!(v, &version);
        assert!(alive(*pid));
        let (status, body) = http_get(port.unwrap(), "/").unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, format!("{version} {n} {pid} \n"));
    }
    assert_eq!(
        d.read("status"),
        format!("web {version} none 3/3 3/3 running\n")
    );
    let out = d.deploy(&["status", "web", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["instances"].as_array().unwrap().len(), 3);
    assert_eq!(j["update_status"], "none");
}

/// Samples the instances of `service` until stopped; keeps the fewest
/// healthy instances seen, two ways: counted from the instance files (an
/// instance counts if its state is healthy or ready and its process runs),
/// and as deployd's own count in `/status` (one atomic snapshot).
struct Sampler {
    stop: Arc<AtomicBool>,
    min: Arc<AtomicUsize>,
    min_summary: Arc<AtomicUsize>,
    samples: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// One sample from the instance files, or `None` if an instance changed
/// number or went while it was read (a torn sample is not a sample).
fn sample(dir: &std::path::Path) -> Option<usize> {
    let read = |p: std::path::PathBuf| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let list = || -> Option<Vec<std::path::PathBuf>> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect();
        v.sort();
        Some(v)
    };
    let listed = list()?;
    let mut healthy = 0;
    for path in &listed {
        let pid = read(path.join("pid"))?;
        let state = read(path.join("state"))?;
        if read(path.join("pid"))? != pid {
            return None;
        }
        let pid: u32 = pid.parse().unwrap_or(0);
        if matches!(state.as_str(), "healthy" | "ready") && alive(pid) {
            healthy += 1;
        }
    }
    // An instance that came or went meanwhile makes the sample torn.
    (list()? == listed).then_some(healthy)
}

impl Sampler {
    fn start(mnt: std::path::PathBuf, service: &str) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let min = Arc::new(AtomicUsize::new(usize::MAX));
        let min_summary = Arc::new(AtomicUsize::new(usize::MAX));
        let samples = Arc::new(AtomicUsize::new(0));
        let dir = mnt.join("active").join(service).join("instances");
        let status = mnt.join("status");
        let name = service.to_string();
        let (s, m, ms, n) = (
            stop.clone(),
            min.clone(),
            min_summary.clone(),
            samples.clone(),
        );
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if let Some(h) = sample(&dir) {
                    m.fetch_min(h, Ordering::SeqCst);
                    n.fetch_add(1, Ordering::SeqCst);
                }
                // "web VERSION STATUS k/n healthy/n STATE"
                let summary = std::fs::read_to_string(&status).unwrap_or_default();
                if let Some(h) = summary
                    .lines()
                    .find(|l| l.split(' ').next() == Some(name.as_str()))
                    .and_then(|l| {
                        l.split(' ')
                            .nth(4)?
                            .split('/')
                            .next()?
                            .parse::<usize>()
                            .ok()
                    })
                {
                    ms.fetch_min(h, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Sampler {
            stop,
            min,
            min_summary,
            samples,
            handle: Some(handle),
        }
    }

    /// (fewest healthy by the files, fewest by deployd's count, samples)
    fn finish(mut self) -> (usize, usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        (
            self.min.load(Ordering::SeqCst),
            self.min_summary.load(Ordering::SeqCst),
            self.samples.load(Ordering::SeqCst),
        )
    }
}

/// Acceptance 2: a rolling update goes one batch at a time, never below 3
/// healthy, tells the story in order, and `deploy apply` exits 0.
#[test]
fn rolling_update_never_drops_below_replicas() {
    let extra = "update_batch 1\nupdate_pause 500ms\n";
    let Some(d) = Deployd::start_settled(&[("web", app_manifest(3, extra))]) else {
        return;
    };
    let v1 = d.field("active/web/version");
    let old: Vec<u32> = d.instances("web").iter().map(|i| i.1).collect();
    d.write_manifest("web", &app_manifest(3, &format!("{extra}env TAG=two\n")));
    let sampler = Sampler::start(d.mnt.clone(), "web");
    let out = d.deploy(&["apply", "web"]);
    let (min, min_summary, samples) = sampler.finish();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(samples > 50, "only {samples} samples");
    assert!(min >= 3, "only {min} healthy instances at one point");
    assert!(
        min_summary >= 3,
        "deployd counted only {min_summary} healthy at one point"
    );
    let v2 = d.field("active/web/version");
    assert_ne!(v1, v2);
    assert_eq!(d.field("active/web/previous_version"), v1);
    // Output: each step as it happens, then the final line.
    assert!(
        text.starts_with(&format!("web: rolling update started {v1} → {v2}")),
        "{text}"
    );
    assert!(text.contains("web: instance 3 healthy ("), "{text}");
    assert!(
        text.lines()
            .last()
            .unwrap()
            .starts_with(&format!("web: deployed {v2} (")),
        "{text}"
    );
    // One batch at a time: each batch starts after the previous one is done.
    let events = d.read("active/web/events");
    let order: Vec<&str> = events
        .lines()
        .filter_map(|l| {
            [
                "batch 1/3: starting",
                "batch 1/3 done",
                "batch 2/3: starting",
                "batch 2/3 done",
                "batch 3/3: starting",
                "batch 3/3 done",
                "rolling update complete",
            ]
            .into_iter()
            .find(|p| l.contains(p))
        })
        .collect();
    assert_eq!(
        order,
        [
            "batch 1/3: starting",
            "batch 1/3 done",
            "batch 2/3: starting",
            "batch 2/3 done",
            "batch 3/3: starting",
            "batch 3/3 done",
            "rolling update complete"
        ],
        "{events}"
    );
    // Every instance is new, numbered 0..2 again, and the old ones are gone.
    let now = d.instances("web");
    assert_eq!(now.iter().map(|i| i.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    for i in &now {
        assert_eq!(i.3, v2);
        assert!(!old.contains(&i.1));
        assert!(http_get(i.4.unwrap(), "/").unwrap().1.ends_with(" two\n"));
    }
    for pid in old {
        assert!(!alive(pid), "old instance {pid} still runs");
    }
}

/// Acceptance 3 and 4: a version that never gets healthy fails after
/// health_deadline, the old instances keep serving untouched; rollback
/// swaps the versions.
#[test]
fn bad_version_fails_then_rollback() {
    let Some(d) = Deployd::start_settled(&[("web", app_manifest(3, "health_deadline 2s\n"))])
    else {
        return;
    };
    let v1 = d.field("active/web/version");
    let before = d.instances("web");
    d.write_manifest(
        "web",
        &app_manifest(3, "health_deadline 2s\nenv FAIL_HEALTH=1\n"),
    );
    let started = std::time::Instant::now();
    let out = d.deploy(&["apply", "web"]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(
            "web: failed: instance 3 not healthy within health_deadline 2s (last probe: HTTP 500)"
        ),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(d.field("active/web/update_status"), "failed");
    // The failed new instance is stopped (it may still be on its way out
    // when wait answers); the old ones were never touched.
    wait_for("the failed instance to be gone", LONG, || {
        d.instances("web").len() == 3
    });
    assert_eq!(d.instances("web"), before, "the old instances were touched");
    for (_, pid, _, _, port) in &before {
        assert!(alive(*pid));
        assert_eq!(http_get(port.unwrap(), "/").unwrap().0, 200);
    }
    assert!(
        d.read("active/web/wait")
            .starts_with("failed: instance 3 not healthy")
    );
    let v_bad = d.field("active/web/version");

    // Rollback from the failed rollout.
    let out = d.deploy(&["rollback", "web"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains(&format!("web: rolled back to {v1}")));
    assert_eq!(d.field("active/web/version"), v1);
    assert_eq!(d.field("active/web/previous_version"), v_bad);
    assert_eq!(d.field("active/web/update_status"), "none");
    // Both versions are in the history, readable.
    let history = d.read(&format!("active/web/history/{v_bad}"));
    assert!(history.contains("FAIL_HEALTH=1"));
    // Rolling back to a version from history by name, abbreviated as git
    // takes a commit: the first digits that no other version there shares.
    let n = (4..12).find(|&n| v_bad[..n] != v1[..n]).unwrap_or(12);
    let out = d.deploy(&["rollback", "web", &v_bad[..n], "--no-wait"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(d.field("active/web/version"), v_bad);
    let out = d.deploy(&["rollback", "web", "000000000000"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
}

/// `web` (3 replicas, `extra` in its manifest) deployed, then a rolling
/// update to a new version started and waited for until its first batch
/// is done.
fn after_first_batch(extra: &str) -> Option<Deployd> {
    let d = Deployd::start(&[("web", app_manifest(3, extra))])?;
    d.settle("web", LONG);
    d.write_manifest("web", &app_manifest(3, &format!("{extra}env TAG=b\n")));
    let out = d.deploy(&["apply", "web", "--no-wait"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the first batch", LONG, || {
        d.try_read("active/web/update_progress") == "1/3\n"
    });
    Some(d)
}

/// Acceptance 5: pause holds after the batch in flight; resume completes.
/// A rolling restart replaces every pid, one batch at a time.
#[test]
fn pause_resume_and_restart() {
    let Some(d) = after_first_batch("update_pause 1500ms\n") else {
        return;
    };
    let out = d.deploy(&["pause", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(d.field("active/web/update_status"), "paused");
    // wait returns once the rollout holds.
    assert!(d.read("active/web/wait").starts_with("paused "));
    let held = d.instances("web");
    let progress = d.field("active/web/update_progress");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(d.instances("web"), held, "instances changed while paused");
    assert_eq!(d.field("active/web/update_progress"), progress);
    let out = d.deploy(&["resume", "web"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(d.field("active/web/update_progress"), "3/3");

    let before: Vec<u32> = d.instances("web").iter().map(|i| i.1).collect();
    let sampler = Sampler::start(d.mnt.clone(), "web");
    let out = d.deploy(&["restart", "web"]);
    let (min, min_summary, _) = sampler.finish();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        min >= 3 && min_summary >= 3,
        "{min}/{min_summary} healthy during the restart"
    );
    let after: Vec<u32> = d.instances("web").iter().map(|i| i.1).collect();
    assert_eq!(after.len(), 3);
    for p in &before {
        assert!(!after.contains(p), "{p} was not replaced");
    }
    let events = d.read("active/web/events");
    assert!(events.contains("batch 3/3 done"), "{events}");
}

/// Acceptance 6: bad ctl writes fail with an errno and change nothing; the
/// reason is in events and on the same descriptor.
#[test]
fn bad_ctl_writes_fail_and_change_nothing() {
    let Some(d) = Deployd::start_settled(&[("web", app_manifest(1, ""))]) else {
        return;
    };
    let files = [
        "version",
        "previous_version",
        "update_status",
        "update_progress",
        "state",
    ];
    let snapshot = |d: &Deployd| files.map(|f| d.read(&format!("active/web/{f}")));
    let before = snapshot(&d);
    let pids: Vec<u32> = d.instances("web").iter().map(|i| i.1).collect();

    let out = d.sh("echo bogus > $ROOT/active/web/ctl");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Invalid argument"),
        "{}",
        stderr(&out)
    );
    let out = d.sh("echo pause > $ROOT/active/web/ctl");
    assert!(!out.status.success());
    let out = d.sh("echo 'rollback a b' > $ROOT/active/web/ctl");
    assert!(!out.status.success());
    let out = d.sh("head -c 100000 /dev/zero | tr '\\0' a > $ROOT/active/web/ctl");
    assert!(!out.status.success());
    let out = d.sh("echo apply > $ROOT/active/web/version");
    assert!(!out.status.success(), "a status file took a write");
    let out = d.sh("echo 'apply ../etc' > $ROOT/ctl");
    assert!(!out.status.success());
    let out = d.sh("echo 'apply nothere' > $ROOT/ctl");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("No such file"), "{}", stderr(&out));
    assert!(!d.path("active/nothere").exists());
    assert!(!d.path("active/../etc").join("ctl").exists());
    let out = d.sh("echo 'restart 7' > $ROOT/active/web/ctl");
    assert!(stderr(&out).contains("No such file"), "{}", stderr(&out));
    let out = d.sh("echo 'restart -1' > $ROOT/active/web/ctl");
    assert!(
        stderr(&out).contains("Invalid argument"),
        "{}",
        stderr(&out)
    );
    let out = d.deploy(&["restart", "web", "7"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).ends_with("deploy: web: no instance 7 (instances: 0)\n"),
        "{}",
        stderr(&out)
    );

    assert_eq!(snapshot(&d), before);
    assert_eq!(
        d.instances("web").iter().map(|i| i.1).collect::<Vec<_>>(),
        pids
    );
    let events = d.read("active/web/events");
    assert!(
        events.contains("refused 'bogus': unknown control message 'bogus'"),
        "{events}"
    );
    assert!(
        events.contains("refused: nothing to pause: no rollout in progress"),
        "{events}"
    );

    // The reason is readable on the same descriptor (what the CLI does).
    let out = d.deploy(&["pause", "web"]);
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(
        stderr(&out),
        "deploy: web: refused: nothing to pause: no rollout in progress\n"
    );
    let out = d.deploy(&["status", "nothere"]);
    assert_eq!(
        failed_with(&out, 4),
        "deploy: no service 'nothere'; start it with: deploy apply nothere\n"
    );
    // A typo is answered with the service it is close to, by the CLI and
    // by the root ctl alike.
    let out = d.deploy(&["status", "wbe"]);
    assert_eq!(
        failed_with(&out, 4),
        "deploy: no service 'wbe' (did you mean 'web'?)\n"
    );
    let out = d.sh("exec 3<>$ROOT/ctl; echo 'pause wbe' >&3; cat <&3");
    assert_eq!(
        stdout(&out),
        "error: no service 'wbe' (did you mean 'web'?)\n"
    );
    let missing = |name: &str| {
        format!(
            "deploy: {name}: no manifest for {name}: {} does not exist",
            d.manifests.join(format!("{name}.manifest")).display()
        )
    };
    let out = d.deploy(&["apply", "nothere"]);
    assert_eq!(failed_with(&out, 4), format!("{}\n", missing("nothere")));
    let out = d.deploy(&["apply", "wbe"]);
    assert_eq!(
        failed_with(&out, 4),
        format!(
            "{} (did you mean web? web.manifest is there)\n",
            missing("wbe")
        )
    );
    // An invalid manifest is refused with file:line:col and changes nothing.
    d.write_manifest("web", "exec true\nreplicas 0\nupdate_bach 1\n");
    let out = d.deploy(&["apply", "web"]);
    assert_eq!(out.status.code(), Some(5));
    let err = stderr(&out);
    assert!(
        err.contains("web.manifest:2:10: replicas must be between 1 and 1000, got 0"),
        "{err}"
    );
    assert!(
        err.contains("web.manifest:3:1: unknown directive 'update_bach'"),
        "{err}"
    );
    assert_eq!(snapshot(&d), before);
}

/// The state directory made read-only under deployd (as a full disk would
/// fail its writes), until dropped.
struct ReadOnly(std::path::PathBuf);

impl ReadOnly {
    fn bind(dir: &std::path::Path) -> ReadOnly {
        use nix::mount::{MsFlags, mount};
        let none: Option<&str> = None;
        mount(Some(dir), dir, none, MsFlags::MS_BIND, none).expect("bind mount");
        let guard = ReadOnly(dir.to_path_buf());
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
        mount(none, dir, none, flags, none).expect("remount read-only");
        guard
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A command whose effect cannot be saved is refused with the OS's errno
/// and changes nothing, so a restart cannot come back to less than was
/// acknowledged; what changes on its own meanwhile is saved once the disk
/// takes writes again, and events say both.
#[test]
fn unsaved_changes_are_refused_or_retried() {
    let Some(mut d) = Deployd::start_settled(&[("web", app_manifest(2, ""))]) else {
        return;
    };
    let version = d.field("active/web/version");
    let pids: Vec<u32> = d.instances("web").iter().map(|i| i.1).collect();
    let ro = ReadOnly::bind(&d.state);
    d.write_manifest("web", &app_manifest(2, "env NEW=1\n"));
    d.write_manifest("api", &app_manifest(1, ""));

    let out = d.deploy(&["apply", "web"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "cannot save the state of web (nothing changed): Read-only file system (os error 30)"
        ),
        "{}",
        stderr(&out)
    );
    let out = d.sh("echo apply > $ROOT/active/web/ctl");
    assert!(
        stderr(&out).contains("Read-only file system"),
        "{}",
        stderr(&out)
    );
    let out = d.deploy(&["apply", "api"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let out = d.sh("echo apply > $ROOT/ctl");
    assert!(
        stderr(&out).contains("Read-only file system"),
        "{}",
        stderr(&out)
    );
    assert!(!d.path("active/api").exists());
    assert_eq!(d.field("active/web/version"), version);
    assert_eq!(d.field("active/web/update_status"), "none");
    let now: Vec<u32> = d.instances("web").iter().map(|i| i.1).collect();
    assert_eq!(now, pids);

    // An instance dies and is restarted: its pid cannot be recorded.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill instance 0");
    let events = d.wait_events("web", "retrying every 1s", 1);
    assert!(
        events.contains(
            "cannot save its state: Read-only file system (os error 30); retrying every 1s"
        ),
        "{events}"
    );
    d.settle("web", LONG);
    let restarted = d.instances("web")[0].1;
    assert_ne!(restarted, pids[0]);
    // What only holds or stops acts all the same (it may be what frees
    // the disk), and is saved once it can be.
    let out = d.deploy(&["stop", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(d.instances("web").is_empty());
    assert!(!alive(restarted));

    drop(ro);
    d.wait_events("web", "state saved again", 1);
    let recorded = std::fs::read_to_string(d.state.join("services/web/pids")).expect("pids");
    assert_eq!(recorded, "");
    let record = std::fs::read_to_string(d.state.join("services/web/state.json")).expect("state");
    assert!(record.contains("\"stopped\": true"), "{record}");
    let out = d.deploy(&["start", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.deploy(&["apply", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let new = d.field("active/web/version");
    assert_ne!(new, version);

    // What was acknowledged survives a kill -9.
    d.kill9();
    d.launch();
    d.settle("web", LONG);
    assert_eq!(d.field("active/web/version"), new);
    assert!(!d.path("active/api").exists());
}

/// Acceptance 7: kill -9 mid-rollout; the next deployd brings the service
/// back paused with its events, resume finishes it, nothing of the old
/// deployd survives.
#[test]
fn kill9_mid_rollout_comes_back_paused() {
    let Some(mut d) = after_first_batch("update_pause 2s\n") else {
        return;
    };
    let v2 = d.field("active/web/version");
    let events_before = d.read("active/web/events");
    let pids: Vec<u32> = d.instances("web").iter().map(|i| i.1).collect();
    d.kill9();
    // Instances go with it (PDEATHSIG), and no later than the next start.
    d.launch();
    for p in &pids {
        assert!(!alive(*p), "instance {p} of the killed deployd still runs");
    }
    wait_for("web to come back", LONG, || {
        std::fs::read_to_string(d.path("active/web/update_status")).is_ok_and(|s| s == "paused\n")
    });
    assert_eq!(d.field("active/web/version"), v2);
    let events = d.read("active/web/events");
    assert!(
        events.starts_with(&events_before),
        "events before the crash were lost"
    );
    assert!(
        events.contains("deployd restarted during the rolling update: paused at"),
        "{events}"
    );
    // Which pids: those recorded when it was killed, which the listing
    // above may have seen a moment before or after a batch's change.
    let said = "deployd started after one that ended without stopping its instances (killed or \
                crashed): they ended with it (pids ";
    assert!(events.contains(said), "{events}");
    let out = d.deploy(&["resume", "web"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    d.settle("web", LONG);
    let now = d.instances("web");
    assert!(now.iter().all(|i| i.3 == v2 && i.2 == "ready"), "{now:?}");
}

/// The live processes of a process group.
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                let f: Vec<&str> = s[s.rfind(')').map_or(0, |i| i + 2)..].split(' ').collect();
                f.first() != Some(&"Z") && f.get(2) == Some(&pgid.to_string().as_str())
            })
        })
        .collect()
}

/// deployd's guard: the child of deployd named deployd-guard.
fn guards(deployd: u32) -> Vec<u32> {
    children(deployd)
        .into_iter()
        .filter(|&p| alive(p) && is_guard(p))
        .collect()
}

/// kill -9: what an instance's shell started (PDEATHSIG reaches only the
/// shell) goes too, at once, not at deployd's next start; the guard that
/// sees to it is kept across a reexec and ends after.
#[test]
fn a_killed_deployd_takes_what_its_instances_started_with_it() {
    let Some(mut d) = Deployd::start(&[("kids", "exec sleep 1000; true\nreplicas 2\n".into())])
    else {
        return;
    };
    d.settle("kids", LONG);
    let leaders: Vec<u32> = d.instances("kids").iter().map(|i| i.1).collect();
    assert_eq!(leaders.len(), 2);
    for &g in &leaders {
        assert_eq!(group_members(g).len(), 2, "sh and its sleep in group {g}");
    }
    let guard = guards(d.pid());
    assert_eq!(guard.len(), 1, "{guard:?}");
    let out = d.deploy(&["reexec"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(guards(d.pid()), guard, "the guard was not kept");
    let after: Vec<u32> = d.instances("kids").iter().map(|i| i.1).collect();
    assert_eq!(after, leaders);

    d.kill9();
    wait_for(
        "the instances' groups to end",
        Duration::from_secs(10),
        || leaders.iter().all(|&g| group_members(g).is_empty()),
    );
    wait_for("the guard to end", Duration::from_secs(10), || {
        !alive(guard[0])
    });
    // It says so on deployd's stderr (here its log).
    let mut groups: Vec<String> = leaders.iter().map(u32::to_string).collect();
    groups.sort();
    let said = format!(
        "deployd-guard: deployd ended without stopping its instances; stopping what is \
         left of process groups {}",
        groups.join(", ")
    );
    assert!(d.log().contains(&said), "{}", d.log());
}

/// reexec waits for every service to settle; one whose first rollout
/// failed has no instance and will not settle by itself, so its refusal
/// says what will, and once it is removed reexec goes ahead.
#[test]
fn reexec_says_what_a_failed_service_needs() {
    let never = "exec sleep 1000\nhealth exec false\nhealth_interval 100ms\nhealth_deadline 1s\n";
    let Some(d) = Deployd::start(&[("never", never.into())]) else {
        return;
    };
    d.wait_events("never", "deployment failed", 1);
    wait_for("the failed instance to go", LONG, || {
        d.instances("never").is_empty()
    });
    let out = d.deploy(&["reexec"]);
    let why = failed_with(&out, 5);
    assert!(
        why.contains(
            "never: its last rollout failed and 0 of 1 instances are ready; apply a manifest \
             that works (or remove never), then reexec"
        ),
        "{why}"
    );
    let pid = d.pid();
    let out = d.deploy(&["remove", "never"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.deploy(&["reexec"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(d.pid(), pid);
}

/// The followers go on across a reexec, neither stopping nor printing a
/// line twice, and end (exit 0, saying so) once the service is removed.
/// None holds a file open between its reads: the reexecs are not slowed
/// by the 2 s deployd gives open files before it detaches its mount.
#[test]
fn followers_outlive_a_reexec_and_end_with_their_service() {
    let talk = "exec sh -c 'i=0; while :; do i=$((i+1)); echo line $i; sleep 0.02; done'\n";
    let Some(d) = Deployd::start_settled(&[("talk", talk.into())]) else {
        return;
    };
    let mut logs = Following::start(&d, &["logs", "talk", "-f"]);
    let mut one = Following::start(&d, &["logs", "talk", "0", "-f"]);
    let mut events = Following::start(&d, &["events", "talk", "-f"]);
    for _ in 0..3 {
        let out = d.deploy(&["reexec"]);
        assert!(out.status.success(), "{}", stderr(&out));
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(!d.log().contains("still in use"), "{}", d.log());
    let out = d.deploy(&["remove", "talk"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for f in [&mut logs, &mut one, &mut events] {
        assert_eq!(
            f.wait_exit(Duration::from_secs(10)),
            Some(0),
            "{:?}",
            f.errors()
        );
        assert_eq!(f.errors(), ["deploy: talk: removed"]);
    }
    for f in [&logs, &one] {
        // Every line once, in order, across the three reexecs.
        let numbers: Vec<u64> = f
            .lines()
            .iter()
            .map(|l| {
                let l = l.strip_prefix("[0] ").unwrap_or(l);
                let n = l.strip_prefix("line ").unwrap_or_else(|| panic!("{l:?}"));
                n.parse().unwrap_or_else(|_| panic!("{l:?}"))
            })
            .collect();
        assert!(numbers.len() > 30, "{numbers:?}");
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    }
    let lines = events.lines();
    let kept = lines
        .iter()
        .filter(|l| l.ends_with("deployd replaced itself; instance 0 kept running"))
        .count();
    assert_eq!(kept, 3, "{lines:#?}");
}

/// What an instance starts goes with it even once out of its process group
/// (`setsid`, as a daemonizing program does): each instance has a cgroup,
/// killed when it is stopped (a restart), when its leader dies (after a
/// reexec too), and, by the guard, when deployd is killed.
#[test]
fn what_leaves_an_instances_group_goes_with_it() {
    if !cgroup2_available() {
        return;
    }
    // A sleep no other test runs: its length says which test started it.
    let secs = format!("{}.{}", 5000 + std::process::id() % 1000, free_port());
    let stray = ["sleep", secs.as_str()];
    let m = format!("exec sh -c 'setsid sleep {secs} & exec sleep 1000'\n");
    let Some(mut d) = Deployd::start_settled(&[("strays", m)]) else {
        return;
    };
    wait_for("the stray", LONG, || pids_running(&stray).len() == 1);
    let first = pids_running(&stray);
    let group = |p: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        stat.rsplit(')')
            .next()
            .and_then(|r| r.split(' ').nth(3))
            .map(str::to_owned)
    };
    assert_eq!(
        group(first[0]),
        Some(first[0].to_string()),
        "not in a group of its own"
    );

    // Stopped with its instance (a restart), its replacement's running.
    let out = d.deploy(&["restart", "strays"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the first stray to go", LONG, || !alive(first[0]));
    wait_for("the second stray", LONG, || pids_running(&stray).len() == 1);
    let second = pids_running(&stray);

    // Killed when its leader dies, also after a reexec (the instance
    // taken back with its cgroup).
    let out = d.deploy(&["reexec"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(alive(second[0]));
    let leader = d.instances("strays")[0].1;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(leader as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("the second stray to go", LONG, || !alive(second[0]));
    wait_for("the third stray", LONG, || pids_running(&stray).len() == 1);
    let third = pids_running(&stray);

    // And by the guard when deployd is killed.
    d.kill9();
    wait_for("the third stray to go", Duration::from_secs(15), || {
        !alive(third[0])
    });
    assert!(pids_running(&stray).is_empty());
}

/// SIGTERM stops every instance, unmounts and exits 0.
#[test]
fn sigterm_stops_everything_and_unmounts() {
    let Some(mut d) = Deployd::start(&[
        ("web", app_manifest(2, "")),
        ("idle", "exec sleep 1000\nreplicas 2\n".into()),
    ]) else {
        return;
    };
    d.settle("web", LONG);
    d.settle("idle", LONG);
    let pids: Vec<u32> = d
        .instances("web")
        .iter()
        .chain(d.instances("idle").iter())
        .map(|i| i.1)
        .collect();
    assert_eq!(pids.len(), 4);
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    for p in pids {
        assert!(!alive(p), "{p} survived deployd");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&*d.mnt.to_string_lossy()), "still mounted");
    // Started again, its events tell a clean stop from a crash.
    d.launch();
    let events = d.wait_events("web", "deployd started; starting the instances again", 1);
    assert!(!events.contains("ended without stopping"), "{events}");

    // SIGHUP, as from the terminal a deployd was started in closing, is
    // the same clean stop, not a death that leaves the mount dead.
    d.settle("idle", LONG);
    let pids: Vec<u32> = d.instances("idle").iter().map(|i| i.1).collect();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let ignored = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .unwrap();
    assert_eq!(
        ignored & 1,
        0,
        "run without nohup: deployd keeps an ignored SIGHUP"
    );
    d.signal(nix::sys::signal::Signal::SIGHUP);
    assert_eq!(d.wait_exit(LONG), Some(0), "{}", d.log());
    assert!(d.log().contains("SIGHUP: stopping"), "{}", d.log());
    for p in pids {
        assert!(!alive(p), "{p} survived deployd");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&*d.mnt.to_string_lossy()), "still mounted");
}

/// Steady state: a crashed instance is restarted with backoff, an event
/// says so; restart never leaves it exited.
#[test]
fn crashed_instances_restart_per_policy() {
    let Some(d) = Deployd::start(&[
        ("crashy", app_manifest(1, "env CRASH_AFTER_MS=700\n")),
        (
            "once",
            app_manifest(1, "restart never\nenv CRASH_AFTER_MS=700\n"),
        ),
    ]) else {
        return;
    };
    let events = d.wait_events("crashy", "restarting in", 2);
    assert!(
        events.contains("instance 0 exited unexpectedly (exit status 3); restarting in 0.1s"),
        "{events}"
    );
    // What it printed last, read once its pipe was drained (it printed and
    // exited at once), follows its exit.
    let lines: Vec<&str> = events
        .lines()
        .map(|l| l.split_once(' ').unwrap().1)
        .collect();
    let at = lines
        .iter()
        .position(|l| l.contains("exited unexpectedly"))
        .unwrap();
    assert!(
        lines[at + 1].starts_with("instance 0 printed: app ") && lines[at + 1].contains(" pid "),
        "{events}"
    );
    assert_eq!(
        lines[at + 2],
        "instance 0 printed: crashing on purpose",
        "{events}"
    );
    assert!(events.contains("restarting in 0.2s"), "{events}");
    wait_for("once to exit", LONG, || {
        d.try_read("active/once/events").contains("not restarted")
    });
    assert_eq!(d.field("active/once/instances/0/state"), "exited");
    assert_eq!(d.field("active/once/instances/0/restarts"), "0");
    // Each restart is counted on the slot's instance, and deploy status
    // shows the count, as kubectl's RESTARTS column does.
    let counted = |d: &Deployd| {
        d.try_read("active/crashy/instances/0/restarts")
            .trim()
            .parse::<u32>()
            .unwrap_or(0)
    };
    wait_for("two restarts counted", LONG, || counted(&d) >= 2);
    let out = d.deploy(&["status", "crashy", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(j["instances"][0]["restarts"].as_u64().unwrap() >= 2, "{j}");
    let table = stdout(&d.deploy(&["status", "crashy"]));
    let head = table.lines().find(|l| l.starts_with("INSTANCE")).unwrap();
    let cols: Vec<&str> = head.split_whitespace().collect();
    assert_eq!(
        &cols[..5],
        ["INSTANCE", "PID", "STATE", "RESTARTS", "VERSION"]
    );
    // Its output goes to its log.
    wait_for("output in the log", LONG, || {
        std::fs::read_to_string(d.path("active/crashy/instances/0/log"))
            .is_ok_and(|l| l.contains("app "))
    });
}

/// A version that dies at start says why where the failure is reported:
/// `deploy apply` prints its last lines of output (the last 10, cleaned),
/// which are in the events too.
#[test]
fn a_failed_start_shows_what_the_instance_printed() {
    let Some(mut d) = Deployd::start_settled(&[("web", app_manifest(1, ""))]) else {
        return;
    };
    // A burst of most of a pipe's buffer just before the end: the shown
    // lines are the log's last, after many reads of the pipe.
    let script = "import sys\n\
                  sys.stdout.write(('.' * 99 + '\\n') * 600)\n\
                  for i in range(12): print('loading module', i)\n\
                  print('\\x1b[31mFATAL\\x1b[0m: no DATABASE_URL', file=sys.stderr)\n\
                  sys.exit(2)\n";
    let py = d.dir.path().join("dies.py");
    std::fs::write(&py, script).unwrap();
    d.write_manifest(
        "web",
        &format!("exec exec python3 {}\nhealth http /healthz\n", py.display()),
    );
    let out = d.deploy(&["apply", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let printed = stdout(&out);
    let shown: Vec<&str> = printed
        .lines()
        .filter_map(|l| l.strip_prefix("web: instance 1 printed: "))
        .collect();
    let mut want: Vec<String> = (3..12).map(|i| format!("loading module {i}")).collect();
    want.push("FATAL: no DATABASE_URL".into());
    assert_eq!(shown, want, "{printed}");
    // Between its exit and the failure.
    let exit = printed
        .find("web: instance 1 exited (exit status 2)")
        .unwrap();
    let first = printed.find("web: instance 1 printed: ").unwrap();
    let failed = printed.find("web: rolling update failed: ").unwrap();
    assert!(exit < first && first < failed, "{printed}");
    assert!(
        stderr(&out).contains("web: failed: instance 1 exited while starting (exit status 2"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).ends_with("\nweb: all it printed: deploy logs web --failed\n"),
        "{}",
        stderr(&out)
    );
    let events = d.read("active/web/events");
    assert!(
        events.contains(" instance 1 printed: FATAL: no DATABASE_URL\n"),
        "{events}"
    );
    // The old instance serves on, and what it was never asked for is not
    // shown: no output lines for stops deployd made.
    assert_eq!(d.field("active/web/instances/0/state"), "ready");
    assert_eq!(
        events.matches(" instance 0 printed: ").count(),
        0,
        "{events}"
    );

    // Its whole output is the service's failed_log, each line stamped;
    // `deploy logs --failed` prints it as the program printed it.
    let whole = d.read("active/web/failed_log");
    assert_eq!(whole.lines().count(), 600 + 12 + 1, "{whole}");
    assert!(
        whole
            .lines()
            .all(|l| deployd_lib::stamp::split(l).is_some()),
        "{whole}"
    );
    let failed = |d: &Deployd| stdout(&d.deploy(&["logs", "web", "--failed"]));
    let plain = failed(&d);
    assert!(
        plain.starts_with(&format!("{}\n", ".".repeat(99)))
            && plain.ends_with("loading module 11\n\x1b[31mFATAL\x1b[0m: no DATABASE_URL\n"),
        "{plain}"
    );
    let last = stdout(&d.deploy(&["logs", "web", "--failed", "-n", "1", "-t"]));
    assert_eq!(last, format!("{}\n", whole.lines().last().unwrap()));
    // It outlives a restart of deployd.
    d.terminate();
    d.launch();
    assert_eq!(failed(&d), plain);
}

/// A service with no probe whose program exits at once (a typo in its
/// `exec`) fails its deployment, with what the shell said, rather than
/// being reported deployed and crash-looping.
#[test]
fn a_program_that_exits_at_once_fails_its_deployment() {
    let Some(d) = Deployd::start(&[]) else {
        return;
    };
    d.write_manifest("job", "exec /no/such/program --flag\nreplicas 2\n");
    let out = d.deploy(&["apply", "job"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let said = stdout(&out);
    assert!(
        said.contains("job: deployment failed: instance ")
            && said.contains("exited while starting (exit status 127"),
        "{said}"
    );
    assert!(said.contains("/no/such/program: not found"), "{said}");
    assert_eq!(d.field("active/job/update_status"), "failed");
    // The other instance, stopped by the failure, may still be going.
    wait_for("no instance left", Duration::from_secs(10), || {
        d.instances("job").is_empty()
    });
}

/// A crash loop printing the same error at each restart shows it once; the
/// exits after it refer to it by its time, as Kubernetes counts a repeated
/// event rather than repeating it. (It runs past the second a `health none`
/// instance needs to be ready: sooner, its deployment fails instead.)
#[test]
fn a_crash_loop_shows_its_output_once_then_refers_to_it() {
    let m = "exec sleep 1.2; echo 'FATAL: no DATABASE_URL'; exit 3\n";
    let Some(d) = Deployd::start(&[("api", m.to_string())]) else {
        return;
    };
    let events = d.wait_events("api", "exited unexpectedly", 3);
    let full: Vec<&str> = events
        .lines()
        .filter(|l| l.ends_with(" instance 0 printed: FATAL: no DATABASE_URL"))
        .collect();
    assert_eq!(full.len(), 1, "{events}");
    let stamp = full[0].split(' ').next().unwrap();
    let again = format!(" instance 0 printed the same 1 line as at {stamp}");
    assert!(
        events.lines().filter(|l| l.ends_with(&again)).count() >= 2,
        "{events}"
    );
}

/// `deploy logs SERVICE -f` keeps up with a rollout: the new instances'
/// output appears from their first line, each line once, though the new
/// instances are renumbered into the old ones' numbers (and old logs and
/// new ones are the same size here, so a size alone would not tell).
#[test]
fn logs_follow_the_instances_through_a_rollout() {
    let Some(d) = Deployd::start_settled(&[("web", app_manifest(2, ""))]) else {
        return;
    };
    let v1 = d.field("active/web/version");
    let follow = Following::start(&d, &["logs", "web", "-f"]);
    let first = |lines: &[String], v: &str, slot: u32| {
        let what = format!("] app {v} instance {slot} pid ");
        lines.iter().filter(|l| l.contains(&what)).count()
    };
    wait_for("the old instances' lines", LONG, || {
        let lines = follow.lines();
        first(&lines, &v1, 0) == 1 && first(&lines, &v1, 1) == 1
    });
    d.write_manifest("web", &app_manifest(2, "env TAG=two\n"));
    let out = d.deploy(&["apply", "web"]);
    assert!(out.status.success(), "{}", stdout(&out));
    let v2 = d.field("active/web/version");
    wait_for("the new instances' lines", LONG, || {
        let lines = follow.lines();
        first(&lines, &v2, 0) >= 1 && first(&lines, &v2, 1) >= 1
    });
    // A few polls more: nothing comes twice.
    std::thread::sleep(Duration::from_millis(800));
    let lines = follow.lines();
    for v in [&v1, &v2] {
        for slot in 0..2 {
            assert_eq!(first(&lines, v, slot), 1, "{v} {slot}: {lines:#?}");
        }
    }
    assert!(lines.iter().all(|l| l.starts_with('[')), "{lines:#?}");
}

/// `deploy apply` without a service rolls out every manifest of the
/// directory, or none: a manifest that does not parse, or a service that
/// cannot take its apply, refuses the whole command.
#[test]
fn apply_of_every_manifest_is_all_or_nothing() {
    let worker = "exec sleep 1000\n".to_string();
    let Some(d) = Deployd::start_settled(&[("web", app_manifest(2, "")), ("worker", worker)])
    else {
        return;
    };
    d.settle("worker", LONG);
    let versions = |d: &Deployd| ["web", "worker"].map(|s| d.field(&format!("active/{s}/version")));
    let v1 = versions(&d);
    let pids: Vec<u32> = d.instances("web").iter().map(|i| i.1).collect();

    // web changes, extra is new, bad does not parse: nothing happens.
    d.write_manifest("web", &app_manifest(2, "env ROUND=2\n"));
    d.write_manifest("extra", "exec sleep 1000\n");
    d.write_manifest("bad", "exec sleep 1000\nreplicas lots\n");
    let out = d.deploy(&["apply"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("bad.manifest:2:"), "{}", stderr(&out));
    assert_eq!(versions(&d), v1);
    assert!(!d.path("active/extra").exists());
    assert_eq!(
        d.instances("web").iter().map(|i| i.1).collect::<Vec<_>>(),
        pids
    );

    // Without it: web rolls out, extra is deployed, worker is left alone;
    // both rollouts are followed to their end. An editor's hidden lock
    // file is no service.
    std::fs::remove_file(d.manifests.join("bad.manifest")).unwrap();
    std::fs::write(d.manifests.join(".#web.manifest"), "").unwrap();
    let worker_pid = d.instances("worker")[0].1;
    let out = d.deploy(&["apply"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("worker: unchanged\n"), "{text}");
    assert!(text.contains("web: rolling update started"), "{text}");
    assert!(text.contains("web: deployed "), "{text}");
    assert!(text.contains("extra: deployed "), "{text}");
    let v2 = versions(&d);
    assert_ne!(v2[0], v1[0]);
    assert_eq!(v2[1], v1[1]);
    assert_eq!(d.field("active/web/update_progress"), "2/2");
    assert_eq!(d.field("active/extra/update_progress"), "1/1");
    assert_eq!(d.instances("worker")[0].1, worker_pid);
    assert!(!d.read("active/worker/events").contains("apply"));

    // A service whose manifest is gone is left running, and named.
    let extra_pid = d.instances("extra")[0].1;
    std::fs::remove_file(d.manifests.join("extra.manifest")).unwrap();
    let out = d.deploy(&["apply"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("deploy: extra: runs without a manifest file; left as it is"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "web: unchanged\nworker: unchanged\n");
    assert_eq!(d.instances("extra")[0].1, extra_pid);
    assert_eq!(d.field("active/extra/update_progress"), "1/1");

    // A service that is busy refuses everything, with its reason; but the
    // manifest rolling out, applied again, is told it is under way.
    let round3 = app_manifest(2, "env ROUND=3\nupdate_pause 60s\n");
    d.write_manifest("web", &round3);
    let out = d.deploy(&["apply", "web", "--no-wait"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.deploy(&["apply", "web", "--no-wait"]);
    assert!(
        stdout(&out).starts_with("web: already in progress: a rolling update to "),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    d.write_manifest("web", &app_manifest(2, "env ROUND=4\nupdate_pause 60s\n"));
    d.write_manifest("worker", "exec sleep 999\n");
    let out = d.deploy(&["apply"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("web: a rolling update to ") && stderr(&out).contains("in progress"),
        "{}",
        stderr(&out)
    );
    assert_eq!(d.field("active/worker/version"), v1[1]);
    assert_eq!(d.instances("worker")[0].1, worker_pid);
}

/// `user`: instances and their `health exec` probes run as that account,
/// with its HOME and USER; deployd stays root. An account this machine
/// does not have is refused at apply with its line and column, and changes
/// nothing.
#[test]
fn instances_run_as_the_manifests_user() {
    // nobody: uid 65534 on Debian. `dir /`: the test's own directories
    // are root's alone. The probe fails if it runs as anyone else.
    let m = "\
exec echo \"uid $(id -u) gid $(id -g) groups $(id -G) home $HOME user $USER\"; exec sleep 600
user nobody
dir /
health exec test \"$(id -u)\" = 65534
health_interval 100ms
health_deadline 10s
memory_high 1G
";
    let Some(d) = Deployd::start_settled(&[("svc", m.to_string())]) else {
        return;
    };
    let (_, pid, state, _, _) = d.instances("svc")[0].clone();
    assert_eq!(state, "ready");
    let shown = stdout(&d.deploy(&["status", "svc"]));
    assert!(
        shown.contains("\n  user              nobody\n  memory max        1G\n"),
        "{shown}"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.contains("Uid:\t65534\t65534\t65534\t65534"),
        "{status}"
    );
    let log = d.instance_log("svc", 0);
    assert_eq!(
        log,
        "uid 65534 gid 65534 groups 65534 home /nonexistent user nobody\n"
    );
    // deployd itself, which mounted the namespace, is still root.
    let own = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    assert!(own.contains("Uid:\t0\t0\t0\t0"), "{own}");

    let v1 = d.field("active/svc/version");
    d.write_manifest("svc", &m.replace("user nobody", "user  no-such-user-x"));
    let out = d.deploy(&["apply", "svc"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("svc.manifest:2:7: no user 'no-such-user-x' on this machine"),
        "{}",
        stderr(&out)
    );
    let out = d.deploy(&[
        "check",
        &d.manifests.join("svc.manifest").display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("svc.manifest:2:7: no user"),
        "{}",
        stderr(&out)
    );
    assert_eq!(d.field("active/svc/version"), v1);
    assert_eq!(d.instances("svc")[0].1, pid);
}

/// `memory_high`: an instance that grows over it is replaced with surge (its
/// replacement routed in before it is routed out); the others are left.
#[test]
fn an_instance_over_memory_high_is_replaced_with_surge() {
    // Each instance polls for the flag; the one that takes it grows to
    // about 70 MB of resident memory. Idle, Python holds about 10 MB.
    let script = "\
import os, sys, time
flag = sys.argv[1]
hog = None
while True:
    if hog is None:
        try:
            os.rename(flag, flag + '.' + os.environ['INSTANCE'])
            hog = b'x' * (60 << 20)
            print('grown', flush=True)
        except FileNotFoundError:
            pass
    time.sleep(0.05)
";
    let Some(d) = Deployd::start(&[]) else {
        return;
    };
    std::fs::write(d.manifests.join("hog.py"), script).unwrap();
    let flag = d.dir.path().join("grow");
    let m = format!(
        "exec exec python3 hog.py {}\nreplicas 2\nmemory_high 30M\n",
        flag.display()
    );
    d.write_manifest("hog", &m);
    let out = d.deploy(&["apply", "hog"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.settle("hog", LONG);
    let before = d.instances("hog");
    std::fs::write(&flag, "").unwrap();
    let mut grown = None;
    wait_for("an instance to take the flag", LONG, || {
        grown = (0..2u32).find(|n| d.dir.path().join(format!("grow.{n}")).exists());
        grown.is_some()
    });
    let grown = grown.expect("found");
    let old = before[grown as usize].1;
    // A listing is read file by file, so it is taken from the wait that
    // saw it whole, not read again.
    let mut after = Vec::new();
    wait_for("the grown instance to be replaced and gone", LONG, || {
        after = d.instances("hog");
        !alive(old)
            && d.read("active/hog/events").contains("routed out: replaced")
            && after.len() == 2
            && after.iter().all(|i| i.2 == "ready" && alive(i.1))
    });
    let events = d.read("active/hog/events");
    let over_at = events
        .find("over memory_high 30M; replacing it")
        .unwrap_or_else(|| panic!("{events}"));
    let line_start = events[..over_at].rfind('\n').map_or(0, |i| i + 1);
    assert!(
        events[line_start..].contains(&format!("instance {grown} uses ")),
        "{events}"
    );
    // After that line: the replacement routed in, then the old one out.
    let after_over = &events[over_at..];
    let routed_in = after_over
        .find(" routed in\n")
        .unwrap_or_else(|| panic!("no replacement routed in: {events}"));
    let routed_out = after_over
        .find(&format!("instance {grown} routed out: replaced"))
        .unwrap_or_else(|| panic!("{events}"));
    assert!(
        routed_in < routed_out,
        "routed out before its replacement: {events}"
    );
    assert_eq!(
        events.matches("over memory_high").count(),
        1,
        "replaced more than once: {events}"
    );
    for (n, pid, _, _, _) in &after {
        let old = before[*n as usize].1;
        if *n == grown {
            assert_ne!(*pid, old, "slot {n} still runs the grown process");
            assert!(!alive(old));
        } else {
            assert_eq!(*pid, old, "slot {n} was replaced too");
        }
    }
    assert_eq!(d.field("active/hog/update_progress"), "2/2");
}

/// `env_file`: read at each start, under the manifest's `env`; a change is
/// not in the version (secrets stay out of it) but `apply` sees it and
/// restarts the instances, as Compose recreates a container whose
/// env_file changed; a broken file is refused at apply and fails a
/// restart without touching the instances that run.
#[test]
fn env_files_are_read_at_each_start() {
    let m =
        "exec echo \"A=$A B=$B C=${C-unset}\"; exec sleep 600\nenv_file app.env\nenv B=manifest\n";
    let Some(d) = Deployd::start(&[]) else {
        return;
    };
    let env_file = d.manifests.join("app.env");
    std::fs::write(&env_file, "# app\nA='from file'\nB=file\n").unwrap();
    d.write_manifest("svc", m);
    let out = d.deploy(&["apply", "svc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.settle("svc", LONG);
    assert_eq!(d.instance_log("svc", 0), "A=from file B=manifest C=unset\n");
    let (v1, pid1) = (d.field("active/svc/version"), d.instances("svc")[0].1);

    // A comment is no change; a changed variable is no new version, but
    // apply restarts the instance with it, and then has nothing to do.
    std::fs::write(&env_file, "# app, commented\nA='from file'\nB=file\n").unwrap();
    let out = d.deploy(&["apply", "svc"]);
    assert_eq!(stdout(&out), format!("svc: unchanged: already at {v1}\n"));
    std::fs::write(&env_file, "A=again\nC=new\n").unwrap();
    let out = d.deploy(&["apply", "svc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(
            "svc: apply: env_file changed since instance 0 started: restarting every instance\n\
             svc: rolling restart of "
        ),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains(&format!("svc: deployed {v1} (")),
        "{}",
        stdout(&out)
    );
    assert_eq!(d.field("active/svc/version"), v1);
    assert_ne!(d.instances("svc")[0].1, pid1);
    assert_eq!(d.instance_log("svc", 0), "A=again B=manifest C=new\n");
    let out = d.deploy(&["apply", "svc"]);
    assert_eq!(stdout(&out), format!("svc: unchanged: already at {v1}\n"));
    // And so does an apply of every manifest.
    std::fs::write(&env_file, "A=all\n").unwrap();
    let out = d.deploy(&["apply"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.settle("svc", LONG);
    assert_eq!(d.instance_log("svc", 0), "A=all B=manifest C=unset\n");
    // restart reads it too.
    std::fs::write(&env_file, "A=again\nC=new\n").unwrap();
    let out = d.deploy(&["restart", "svc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.settle("svc", LONG);
    assert_eq!(d.instance_log("svc", 0), "A=again B=manifest C=new\n");

    // Broken: apply is refused at the env_file line; a restart fails at
    // its first new instance, and the running one is left alone.
    std::fs::write(&env_file, "A=1\nPORT=80\n").unwrap();
    d.write_manifest("svc", &format!("{m}env X=1\n"));
    let out = d.deploy(&["apply", "svc"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let expected = format!(
        "svc.manifest:2:10: env_file {}:2:1: PORT is set by deployd for each instance",
        env_file.display()
    );
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
    let pid2 = d.instances("svc")[0].1;
    let out = d.deploy(&["restart", "svc"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("PORT is set by deployd"),
        "{}",
        stdout(&out)
    );
    let now = d.instances("svc");
    assert_eq!((now.len(), now[0].1, now[0].2.as_str()), (1, pid2, "ready"));
    assert_eq!(d.field("active/svc/version"), v1);
}

/// `signal SIG [N]` reaches the processes of every running instance (or of
/// one) and nothing else happens; a signal that ends a process is an exit
/// like any other.
#[test]
fn signals_reach_the_instances_processes() {
    // A shell that says which signal it got; as the leader of its group,
    // with `sleep` in the group too, as a real app's workers would be.
    let worker = "exec trap 'echo got-hup' HUP; trap 'echo got-usr1' USR1; \
                  echo up; while :; do sleep 0.05; done\nreplicas 2\n";
    let Some(d) = Deployd::start_settled(&[("worker", worker.to_string())]) else {
        return;
    };
    let log = |n: u32| d.try_read(&format!("active/worker/instances/{n}/log"));
    wait_for("both shells up", LONG, || {
        log(0).contains("up") && log(1).contains("up")
    });
    let pids: Vec<u32> = d.instances("worker").iter().map(|i| i.1).collect();
    let out = d.deploy(&["signal", "worker", "HUP"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "worker: sent HUP to instances 0, 1\n");
    wait_for("HUP in both logs", LONG, || {
        log(0).contains("got-hup") && log(1).contains("got-hup")
    });
    let out = d.sh("echo 'signal usr1 1' > $ROOT/active/worker/ctl");
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("USR1 in instance 1's log", LONG, || {
        log(1).contains("got-usr1")
    });
    assert!(!log(0).contains("got-usr1"), "{}", log(0));
    assert_eq!(
        d.instances("worker")
            .iter()
            .map(|i| i.1)
            .collect::<Vec<_>>(),
        pids
    );
    assert!(
        d.read("active/worker/events")
            .contains("sent USR1 to instance 1\n")
    );
    // Refused: an unknown signal, an instance that is not there.
    let out = d.deploy(&["signal", "worker", "WINCH"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unknown signal 'WINCH'"),
        "{}",
        stderr(&out)
    );
    let out = d.deploy(&["signal", "worker", "HUP", "9"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    // KILL ends instance 0: restarted by the policy, and counted.
    let out = d.deploy(&["signal", "worker", "KILL", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("instance 0 restarted", LONG, || {
        d.try_read("active/worker/instances/0/restarts") == "1\n"
            && d.try_read("active/worker/instances/0/state") == "ready\n"
    });
    assert!(!alive(pids[0]));
    assert!(alive(pids[1]));
    assert!(
        d.read("active/worker/events")
            .contains("instance 0 exited unexpectedly (killed by SIGKILL)")
    );
    // The same through the instance's own ctl file.
    let ctl = "$ROOT/active/worker/instances/1/ctl";
    let out = d.sh(&format!("cat {ctl}"));
    assert_eq!(stdout(&out), "commands: restart | signal SIG\n");
    let out = d.sh(&format!("echo stop > {ctl}"));
    assert!(
        stderr(&out).contains("Invalid argument"),
        "{}",
        stderr(&out)
    );
    let out = d.sh(&format!("echo 'signal HUP' > {ctl}"));
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("a second HUP in instance 1's log", LONG, || {
        log(1).matches("got-hup").count() == 2
    });
    assert_eq!(
        log(0).matches("got-hup").count(),
        0,
        "instance 0 is a new process"
    );
    let out = d.sh(&format!("echo restart > {ctl}"));
    assert!(out.status.success(), "{}", stderr(&out));
    d.settle("worker", LONG);
    let now: Vec<u32> = d.instances("worker").iter().map(|i| i.1).collect();
    assert_eq!(now.len(), 2);
    assert_ne!(now[1], pids[1], "instance 1 was replaced");
    assert!(!alive(pids[1]));
    assert!(
        d.read("active/worker/events")
            .contains("restart of instance 1 complete")
    );
}

/// `after`: a service starts once what it comes after is ready, at its
/// first deployment and when deployd starts again, and stops before it.
#[test]
fn after_orders_starts_and_stops() {
    // db takes 1.5s to listen; web's shell takes 1s to exit on TERM.
    let db = app_manifest(1, "env START_DELAY_MS=1500\n");
    let web = "exec trap 'sleep 1; exit 0' TERM; while :; do sleep 0.05; done\n\
               after db\nstop_timeout 5s\n";
    let Some(mut d) = Deployd::start(&[("db", db.clone()), ("web", web.to_string())]) else {
        return;
    };
    let starts_after_db = |d: &Deployd| {
        wait_for("web to wait", LONG, || {
            d.try_read("active/web/state") == "waiting\n"
        });
        // Until db is ready, web starts nothing. Both files change in one
        // flush of deployd, web's possibly first: once web has an
        // instance, db must be ready, or be within a moment.
        loop {
            let web_started = !d.instances("web").is_empty();
            let db_ready = || d.try_read("active/db/update_progress") == "1/1\n";
            if web_started {
                let until = Instant::now() + Duration::from_millis(300);
                while !db_ready() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
                assert!(db_ready(), "web started before db was ready");
                break;
            }
            if db_ready() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        d.settle("web", LONG);
        assert_eq!(d.field("active/web/state"), "running");
        let events = d.read("active/web/events");
        assert!(
            events.contains("waiting for db to be ready before starting (after)\n")
                && events.contains("done waiting for db; starting\n"),
            "{events}"
        );
    };
    starts_after_db(&d);
    let status = stdout(&d.deploy(&["status", "web"]));
    assert!(status.contains("\n  after             db\n"), "{status}");
    let out = d.deploy(&["status", "web", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["after"], serde_json::json!(["db"]), "{j}");

    // Refused, changing nothing: a service that is not there, a cycle.
    d.write_manifest("web", &format!("{web}after nothere\n"));
    let out = d.deploy(&["apply", "web"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("web.manifest:4:7: after nothere: no service nothere is deployed"),
        "{}",
        stderr(&out)
    );
    d.write_manifest("web", web);
    d.write_manifest("db", &format!("{db}after web\n"));
    let out = d.deploy(&["apply", "db"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("after web: a cycle (db → web → db)"),
        "{}",
        stderr(&out)
    );
    // deploy check sees the cycle among the files it is given, offline.
    let file = |s: &str| {
        d.manifests
            .join(format!("{s}.manifest"))
            .display()
            .to_string()
    };
    let out = d.deploy(&["check", &file("db")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = d.deploy(&["check", &file("db"), &file("web")]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("web.manifest:2:7: after db: a cycle (web → db → web)"),
        "{}",
        stderr(&out)
    );
    d.write_manifest("db", &db);

    // Stopping: web's instances are gone before db's get their signal.
    let stop_in_order = |d: &mut Deployd| {
        let web_pid = d.instances("web")[0].1;
        let db_pid = d.instances("db")[0].1;
        d.sigterm();
        let until = Instant::now() + LONG;
        while alive(web_pid) && Instant::now() < until {
            assert!(alive(db_pid), "db stopped while web was still stopping");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(d.wait_exit(LONG), Some(0));
        assert!(!alive(db_pid));
    };
    stop_in_order(&mut d);
    // Started again (restored from its records): the same order.
    d.launch();
    starts_after_db(&d);
    stop_in_order(&mut d);
}

/// `update_canary 1`: a new version replaces one instance, then the
/// rollout holds (`update_status` `canary`); `deploy apply` says so and
/// exits 1; `deploy promote` finishes it.
#[test]
fn a_canary_holds_after_its_first_instance_until_promote() {
    let m = |tag: &str| app_manifest(3, &format!("update_canary 1\nenv TAG={tag}\n"));
    let Some(d) = Deployd::start_settled(&[("web", m("v1"))]) else {
        return;
    };
    d.write_manifest("web", &m("v2"));
    let out = d.deploy(&["apply", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("web: canary: 1 of 3 instances at ")
            && stderr(&out).contains(
                "web: held at its canary (1/3); go on with: deploy promote web (or deploy rollback web)"
            ),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(d.field("active/web/update_status"), "canary");
    let versions: Vec<String> = d.instances("web").iter().map(|i| i.3.clone()).collect();
    let new = d.field("active/web/version");
    assert_eq!(
        versions.iter().filter(|v| **v == new).count(),
        1,
        "{versions:?}"
    );
    // Held, it stays held.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(d.field("active/web/update_status"), "canary");
    let out = d.deploy(&["promote", "web"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("web: promoted: rolling out the rest"),
        "{}",
        stdout(&out)
    );
    d.settle("web", LONG);
    assert!(d.instances("web").iter().all(|i| i.3 == new));
    // Nothing holds now: promote is refused, with the reason.
    let out = d.deploy(&["promote", "web"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("nothing to promote"),
        "{}",
        stderr(&out)
    );
}

/// `update_canary_auto 2s`: the canary held, then promoted by itself once
/// it stayed ready that long; `deploy apply` follows it to the end.
#[test]
fn update_canary_auto_promotes_by_itself() {
    let m = |tag: &str| {
        app_manifest(
            3,
            &format!("update_canary 1\nupdate_canary_auto 2s\nenv TAG={tag}\n"),
        )
    };
    let Some(d) = Deployd::start_settled(&[("web", m("v1"))]) else {
        return;
    };
    d.write_manifest("web", &m("v2"));
    let t0 = Instant::now();
    let out = d.deploy(&["apply", "web"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(t0.elapsed() >= Duration::from_secs(2));
    let said = stdout(&out);
    assert!(
        said.contains("promoted by itself in 2s if they stay ready with no restart")
            && said.contains(
                "web: canary ready for 2s with no restart: promoted; rolling out the rest"
            )
            && said.contains("web: deployed "),
        "{said}"
    );
    let new = d.field("active/web/version");
    assert!(d.instances("web").iter().all(|i| i.3 == new));
    assert_eq!(d.field("active/web/update_status"), "none");
}

/// An instance printing as fast as it can is copied at its `log_rate`, no
/// faster (its writes wait), and the events say so once.
#[test]
fn output_past_log_rate_waits_and_is_said() {
    let t0 = Instant::now();
    let m = "exec exec yes flood\nlog_rate 64K\nlog_max 1T\n".to_string();
    let Some(d) = Deployd::start_settled(&[("flood", m)]) else {
        return;
    };
    let events = d.wait_events("flood", "prints more than", 1);
    assert!(
        events.contains(
            "instance 0 prints more than 64K a second: its writes now wait for deployd to keep up \
             (log_rate 64K)"
        ),
        "{events}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let logs = d.state.join("services/flood/logs");
    let copied: u64 = std::fs::read_dir(&logs)
        .expect("logs")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    // Each 6-byte line "flood\n" gets a stamp and a space: ×31/6. At most
    // a second's burst, 64K a second since deployd started, and the read
    // (a pipe's worth at most) whose wait is not over yet.
    let read = copied * 6 / 31;
    let allowed = (64 << 10) as f64 * (2.0 + t0.elapsed().as_secs_f64());
    assert!(
        read as f64 <= allowed,
        "{read} bytes read, {allowed} allowed"
    );
    assert!(read >= 64 << 10, "{read}");
    assert_eq!(events.matches("prints more than").count(), 1, "{events}");
}

/// `deploy plan`: what `apply` would do, step by step, changing nothing;
/// then `apply` does exactly that (its events compared with the plan).
#[test]
fn plan_says_what_apply_then_does() {
    let m = |extra: &str| app_manifest(3, &format!("update_pause 2s\n{extra}"));
    let Some(d) = Deployd::start_settled(&[("web", m("env TAG=v1\n"))]) else {
        return;
    };
    // A step as both say it: no time stamp, no duration, no instance's
    // own news.
    let step = |line: &str| -> Option<String> {
        let line = line.trim();
        if !deployd_lib::rollout::is_step(line) || line.is_empty() {
            return None;
        }
        Some(match line.rfind(" (") {
            Some(at)
                if line.ends_with("s)") && line[at + 2..line.len() - 2].parse::<f64>().is_ok() =>
            {
                line[..at].to_string()
            }
            _ => line.to_string(),
        })
    };
    // Unchanged: nothing to do.
    let out = d.deploy(&["plan", "web"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("web: no-op (unchanged: already at "),
        "{}",
        stdout(&out)
    );
    // Replicas only: a scale.
    d.write_manifest(
        "web",
        &m("env TAG=v1\n").replace("replicas 3", "replicas 4"),
    );
    let out = d.deploy(&["plan", "web"]);
    assert!(
        stdout(&out).starts_with("web: scale-only\n"),
        "{}",
        stdout(&out)
    );
    // A new version: three batches with two pauses.
    d.write_manifest("web", &m("env TAG=v2\n"));
    let events_before = d.read("active/web/events");
    let version = d.field("active/web/version");
    let out = d.deploy(&["plan", "web"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let plan = stdout(&out);
    assert!(plan.starts_with("web: rolling\n"), "{plan}");
    for k in 1..=3 {
        assert!(
            plan.contains(&format!("  batch {k}/3: starting instance 3 (")),
            "{plan}"
        );
        assert!(
            plan.contains(&format!("routed out instance {}\n", k - 1)),
            "{plan}"
        );
    }
    assert!(
        plan.contains("\nweb: takes at least 4.0s (then at "),
        "{plan}"
    );
    // Nothing changed.
    assert_eq!(d.field("active/web/version"), version);
    assert_eq!(d.field("active/web/update_status"), "none");
    assert_eq!(d.read("active/web/events"), events_before);
    // apply does what the plan said.
    let out = d.deploy(&["apply", "web"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let events = d.read("active/web/events");
    let done: Vec<String> = events[events_before.len()..]
        .lines()
        .filter_map(|l| step(l.split_once(' ').map_or(l, |(_, rest)| rest)))
        .collect();
    let planned: Vec<String> = plan
        .lines()
        .filter(|l| l.starts_with("  "))
        .filter_map(step)
        .collect();
    assert_eq!(planned, done);
}

/// `update_watch 3s`: a new version that crashes a second or so after its
/// rollout completed fails in the window, and `auto_rollback` puts the old
/// one back; `deploy apply` follows the window, exits 1 and says why.
/// `--no-watch` returns once the new version is in place.
#[test]
fn a_crash_in_the_watch_window_rolls_back() {
    let m = |extra: &str| {
        app_manifest(
            2,
            &format!("update_batch 2\nupdate_watch 3s\nauto_rollback on\n{extra}"),
        )
    };
    let Some(d) = Deployd::start_settled(&[("web", m("env TAG=v1\n"))]) else {
        return;
    };
    let v1 = d.field("active/web/version");
    d.write_manifest("web", &m("env TAG=v2\nenv CRASH_AFTER_MS=2000\n"));
    let out = d.deploy(&["apply", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        said.contains("; watched for 3s (update_watch)")
            && said.contains("exited (exit status 3) ")
            && said.contains("s after the rollout completed (update_watch 3s); rolled back to ")
            && said.contains(&v1),
        "{said}"
    );
    d.settle("web", LONG);
    assert_eq!(d.field("active/web/version"), v1);
    // The same version with nothing wrong, --no-watch: back at once.
    d.write_manifest("web", &m("env TAG=v3\n"));
    let t0 = Instant::now();
    let out = d.deploy(&["apply", "--no-watch", "web"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("watched for its update_watch still"),
        "{}",
        stdout(&out)
    );
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert_eq!(d.field("active/web/update_status"), "watching");
    // The window passes: none.
    wait_for("the window to pass", Duration::from_secs(10), || {
        d.field("active/web/update_status") == "none"
    });
}
