//! The namespace under ordinary Unix tools: sizes, mtimes, permissions,
//! blocking reads of `wait`.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use common::*;

const LONG: Duration = Duration::from_secs(60);

#[test]
fn unix_tools_see_sizes_and_lines_right() {
    let Some(d) = Deployd::start_settled(&[("web", app_manifest(2, ""))]) else {
        return;
    };
    for f in [
        "version",
        "previous_version",
        "update_status",
        "update_progress",
        "state",
        "manifest",
        "events",
    ] {
        let path = d.path(&format!("active/web/{f}"));
        let meta = std::fs::metadata(&path).unwrap();
        let content = std::fs::read(&path).unwrap();
        assert_eq!(meta.len(), content.len() as u64, "size of {f}");
        assert_eq!(meta.permissions().mode() & 0o777, 0o444, "{f} is read-only");
    }
    assert_eq!(
        std::fs::metadata(d.path("active/web/ctl"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o644
    );
    for f in ["pid", "state", "version", "port"] {
        let path = d.path(&format!("active/web/instances/1/{f}"));
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            std::fs::read(&path).unwrap().len() as u64
        );
    }
    // Status files are one line ending in a newline.
    for f in ["version", "update_status", "update_progress", "state"] {
        let t = d.read(&format!("active/web/{f}"));
        assert!(t.ends_with('\n') && t.lines().count() == 1, "{f}: {t:?}");
    }
    let events = d.read("active/web/events");
    let last2: Vec<&str> = events
        .lines()
        .rev()
        .take(2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let out = d.sh("tail -n 2 $ROOT/active/web/events");
    assert_eq!(stdout(&out), format!("{}\n", last2.join("\n")));
    // Each event is stamped with the UTC date and time, to the millisecond
    // (today's date, or yesterday's for a test run across midnight).
    let days = stdout(&d.sh("date -u +%FT; date -u -d yesterday +%FT"));
    for line in events.lines() {
        let (stamp, what) = line.split_once(' ').unwrap_or_default();
        assert!(
            stamp.len() == 24
                && days.lines().any(|day| stamp.starts_with(day))
                && stamp.ends_with('Z'),
            "{line:?} in {events}"
        );
        assert!(!what.is_empty(), "{line:?}");
    }
    let out = d.sh("grep -c 'started (pid' $ROOT/active/web/events");
    assert_eq!(stdout(&out).trim(), "2");
    let out = d.sh(
        "wc -c < $ROOT/active/web/update_progress; ls $ROOT/active/web/instances; ls $ROOT/active",
    );
    assert_eq!(stdout(&out), "4\n0\n1\nweb\n");
    let out = d.sh("ls -l $ROOT/active/web/ | awk '{print $1, $5, $9}'");
    let ls = stdout(&out);
    assert!(ls.contains("-r--r--r-- 4 update_progress"), "{ls}");
    assert!(ls.contains("-rw-r--r-- 0 ctl"), "{ls}");
    assert!(ls.contains("dr-xr-xr-x 0 instances"), "{ls}");
    // Reading ctl tells the commands.
    assert!(
        d.read("active/web/ctl")
            .starts_with("commands: apply | pause | resume")
    );
    // Nothing can be created or removed.
    let out = d.sh("touch $ROOT/active/web/new; rm $ROOT/active/web/version; mkdir $ROOT/x");
    assert!(!out.status.success());
    assert!(!d.path("active/web/new").exists() && d.path("active/web/version").exists());
}

#[test]
fn mtimes_change_with_content_only() {
    let Some(d) = Deployd::start_settled(&[("web", app_manifest(1, "update_pause 1s\n"))]) else {
        return;
    };
    let mtime = |f: &str| {
        std::fs::metadata(d.path(&format!("active/web/{f}")))
            .unwrap()
            .mtime_nsec()
            + std::fs::metadata(d.path(&format!("active/web/{f}")))
                .unwrap()
                .mtime()
                * 1_000_000_000
    };
    let version_m = mtime("version");
    let status_m = mtime("update_status");
    std::thread::sleep(Duration::from_millis(1100));
    // Probes keep running; nothing visible changed.
    assert_eq!(mtime("version"), version_m);
    assert_eq!(mtime("update_status"), status_m);
    d.write_manifest("web", &app_manifest(1, "update_pause 1s\nenv TAG=x\n"));
    assert!(d.deploy(&["apply", "web"]).status.success());
    assert!(mtime("version") > version_m);
    assert!(mtime("update_status") > status_m);
}

#[test]
fn wait_blocks_until_the_rollout_settles() {
    let Some(d) = Deployd::start_settled(&[("web", app_manifest(2, "update_pause 1s\n"))]) else {
        return;
    };
    // Nothing in flight: wait answers at once.
    let v1 = d.field("active/web/version");
    assert_eq!(d.read("active/web/wait"), format!("none {v1}\n"));
    d.write_manifest("web", &app_manifest(2, "update_pause 1s\nenv TAG=y\n"));
    let mut reader = std::process::Command::new("cat")
        .arg(d.path("active/web/wait"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A read before the rollout answers with the settled state.
    let early = reader.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&early.stdout),
        format!("none {v1}\n")
    );
    let started = Instant::now();
    assert!(d.deploy(&["apply", "web", "--no-wait"]).status.success());
    let line = d.read("active/web/wait");
    let took = started.elapsed();
    let v2 = d.field("active/web/version");
    assert_eq!(line, format!("none {v2}\n"));
    assert_eq!(d.field("active/web/update_status"), "none");
    // Two batches with a 1s pause between: the read blocked through them.
    assert!(took >= Duration::from_secs(1), "{took:?}");

    // A reader that dies while parked is answered (the sweeper), and
    // deployd goes on serving.
    d.write_manifest("web", &app_manifest(2, "update_pause 2s\nenv TAG=z\n"));
    assert!(d.deploy(&["apply", "web", "--no-wait"]).status.success());
    reader = std::process::Command::new("cat")
        .arg(d.path("active/web/wait"))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    reader.kill().unwrap();
    reader.wait().unwrap();
    // The kernel holds a killed reader until its read is answered.
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "{:?}",
        killed.elapsed()
    );
    let status = d.field("active/web/update_status");
    assert_eq!(
        status,
        "rolling",
        "{}\n{}",
        d.read("active/web/events"),
        d.log()
    );
    assert!(d.read("active/web/wait").starts_with("none "));
}

#[test]
fn other_users_cannot_use_the_mount() {
    let Some(d) = Deployd::start_settled(&[("web", "exec sleep 1000\n".to_string())]) else {
        return;
    };
    // setpriv is util-linux's, part of every Debian.
    let out = d.sh("setpriv --reuid=65534 --regid=65534 --clear-groups cat $ROOT/status");
    assert!(!out.status.success(), "user nobody read the namespace");
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
    let out = d.sh("setpriv --reuid=65534 --regid=65534 --clear-groups sh -c 'echo stop > $ROOT/active/web/ctl'");
    assert!(!out.status.success());
    assert_eq!(d.field("active/web/state"), "running");
}

/// Nothing is created, removed, renamed or linked through the mount, and
/// each refusal is `Operation not permitted`, even for root.
#[test]
fn the_namespace_keeps_its_shape() {
    let Some(d) = Deployd::start_settled(&[("web", "exec sleep 1000\n".to_string())]) else {
        return;
    };
    let web = d.mnt.join("active/web");
    let before = d.sh("ls -R $ROOT").stdout;
    let attempts: Vec<(&str, std::io::Result<()>)> = vec![
        ("create", std::fs::File::create(web.join("new")).map(|_| ())),
        ("mkdir", std::fs::create_dir(d.mnt.join("active/other"))),
        ("unlink", std::fs::remove_file(web.join("version"))),
        ("rmdir", std::fs::remove_dir(web.join("instances"))),
        ("rename", std::fs::rename(web.join("ctl"), web.join("ctl2"))),
        ("rename dir", std::fs::rename(&web, d.mnt.join("active/w2"))),
        ("symlink", std::os::unix::fs::symlink("ctl", web.join("l"))),
        (
            "link",
            std::fs::hard_link(web.join("ctl"), web.join("ctl3")),
        ),
    ];
    for (what, r) in attempts {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{what}: {e}");
    }
    let path = std::ffi::CString::new(web.join("ctl").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path, name and a value of the given length.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            c"user.x".as_ptr(),
            c"1".as_ptr().cast(),
            1,
            0,
        )
    };
    let e = std::io::Error::last_os_error();
    assert_eq!(
        (r, e.raw_os_error()),
        (-1, Some(libc::EPERM)),
        "setxattr: {e}"
    );
    assert_eq!(d.sh("ls -R $ROOT").stdout, before);
    assert_eq!(d.field("active/web/state"), "running");
}

/// The root `ctl` appears once every recorded service is back: whoever
/// sees it (a script waiting for deployd, a follower telling a removed
/// service from a deployd restarting) sees them all.
#[test]
fn the_root_ctl_comes_with_every_service() {
    let names: Vec<String> = (0..40).map(|i| format!("s{i:02}")).collect();
    let manifests: Vec<(&str, String)> = names
        .iter()
        .map(|n| (n.as_str(), "exec sleep 1000\n".to_string()))
        .collect();
    let Some(mut d) = Deployd::start(&manifests) else {
        return;
    };
    let listed = |d: &Deployd| {
        std::fs::read_dir(d.mnt.join("active"))
            .map(|r| r.count())
            .unwrap_or(0)
    };
    wait_for("every service", LONG, || listed(&d) == names.len());
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    // launch returns as soon as ctl is there.
    d.launch();
    assert_eq!(listed(&d), names.len());
}

/// A shell reads a command's answer back on the descriptor it wrote
/// through, from where the write left it, whether the command was taken
/// (the offset moved past it) or refused (it did not); again and again.
#[test]
fn a_shell_reads_each_answer_on_its_descriptor() {
    let Some(d) = Deployd::start_settled(&[("web", "exec sleep 1000\n".to_string())]) else {
        return;
    };
    let version = d.field("active/web/version");
    let out = d.sh("exec 3<>$ROOT/active/web/ctl
         echo apply >&3 && cat <&3
         echo pause >&3 || cat <&3
         echo 'apply' >&3 && cat <&3
         exec 4<>$ROOT/ctl
         echo 'pause web' >&4 || cat <&4");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "ok: unchanged: already at {version}\n\
             error: nothing to pause: no rollout in progress\n\
             ok: unchanged: already at {version}\n\
             error: nothing to pause: no rollout in progress\n"
        )
    );
}

#[test]
fn stop_start_and_remove_through_the_root_ctl() {
    let Some(d) = Deployd::start_settled(&[("web", app_manifest(2, ""))]) else {
        return;
    };
    let pids: Vec<u32> = d.instances("web").iter().map(|i| i.1).collect();
    let out = d.sh("echo 'stop web' > $ROOT/ctl");
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("instances to stop", LONG, || d.instances("web").is_empty());
    assert_eq!(d.field("active/web/state"), "stopped");
    assert_eq!(d.field("active/web/update_progress"), "0/2");
    for p in &pids {
        assert!(!alive(*p));
    }
    let out = d.deploy(&["apply", "web"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "apply on a stopped service is refused"
    );
    assert!(d.sh("echo 'start web' > $ROOT/ctl").status.success());
    d.settle("web", LONG);
    assert_eq!(d.field("active/web/state"), "running");
    let out = d.deploy(&["remove", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("web to be forgotten", LONG, || {
        !d.path("active/web").exists()
    });
    assert!(!d.state.join("services/web").exists());
    assert_eq!(d.read("status"), "");
    // And it can come back from its manifest.
    let out = d.deploy(&["apply", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `deploy stop`, `start` and `remove` return once done, as `systemctl
/// stop` does: what a script runs next finds no instance running, every
/// instance ready, the service gone.
#[test]
fn stop_start_and_remove_return_once_done() {
    let Some(d) = Deployd::start_settled(&[("web", app_manifest(2, ""))]) else {
        return;
    };
    let pids: Vec<u32> = d.instances("web").iter().map(|i| i.1).collect();
    // Runs the command; its output, which must end with `last...`.
    let done = |verb: &str, last: &str| {
        let out = d.deploy(&[verb, "web"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        let end = text.lines().last().unwrap_or("");
        assert!(end.starts_with(last), "{text}");
        text
    };
    let text = done("stop", "web: stopped (");
    assert!(text.contains("web: instance 0 stopping (TERM)\n"), "{text}");
    // Each line once: deployd's answer is also the first event.
    assert_eq!(
        text.matches("web: stopping 2 instances\n").count(),
        1,
        "{text}"
    );
    for p in &pids {
        assert!(
            !alive(*p),
            "instance {p} still runs after deploy stop returned"
        );
    }
    assert!(d.instances("web").is_empty());
    let text = done("start", "web: started (");
    assert_eq!(
        text.matches("web: starting 2 instances\n").count(),
        1,
        "{text}"
    );
    assert_eq!(d.field("active/web/update_progress"), "2/2");
    let text = done("remove", "web: removed (");
    assert_eq!(
        text.matches("web: removing: stopping 2 instances\n")
            .count(),
        1,
        "{text}"
    );
    assert!(!d.path("active/web").exists());

    // --no-wait returns at once, as before.
    d.write_manifest("web", &app_manifest(1, ""));
    assert!(d.deploy(&["apply", "web"]).status.success());
    let out = d.deploy(&["stop", "web", "--no-wait"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "web: stopping 1 instance\n");

    // A removal under way says so, until the service is gone.
    d.write_manifest(
        "stubborn",
        "exec trap '' TERM; sleep 1000\nstop_timeout 2s\n",
    );
    assert!(d.deploy(&["apply", "stubborn"]).status.success());
    let out = d.deploy(&["remove", "stubborn", "--no-wait"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(d.field("active/stubborn/state"), "removing");
    // Removing again is waiting for the same end; an apply must wait for
    // the service to be gone.
    let out = d.deploy(&["remove", "stubborn", "--no-wait"]);
    assert_eq!(stdout(&out), "stubborn: already being removed\n");
    let err = failed_with(&d.deploy(&["apply", "stubborn"]), 5);
    assert!(
        err.contains("the service is being removed; try again once it is gone"),
        "{err}"
    );
    wait_for("stubborn to be gone", LONG, || {
        !d.path("active/stubborn").exists()
    });
}

/// `--timeout` ends the following, not what is followed: `deploy apply` of
/// a service waiting for a stopped one (`after`) exits 1 once it is up,
/// and the deployment goes on waiting. `deploy start` of a service whose
/// last rollout failed returns once its instances (of the version before
/// the failed one) are ready.
#[test]
fn timeout_ends_the_following_and_start_counts_any_ready_version() {
    let Some(mut d) = Deployd::start_settled(&[("db", app_manifest(1, ""))]) else {
        return;
    };
    d.write_manifest("db", "exec false\n");
    let out = d.deploy(&["apply", "db"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(d.deploy(&["stop", "db"]).status.success());
    let out = d.deploy(&["start", "db"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("db: started ("), "{}", stdout(&out));
    assert_eq!(d.instances("db").len(), 1);

    assert!(d.deploy(&["stop", "db"]).status.success());
    d.write_manifest("api", "exec sleep 1000\nafter db\n");
    // Bounded from outside too: without --timeout it would wait for ever.
    let run = |args: &[&str]| {
        std::process::Command::new("timeout")
            .arg("60")
            .arg(deploy_bin())
            .args(args)
            .env("DEPLOY_ROOT", &d.mnt)
            .output()
            .expect("run deploy")
    };
    let out = run(&["apply", "api", "--timeout", "2s"]);
    let err = failed_with(&out, 1);
    assert!(
        stdout(&out).contains(
            "api: waiting for db to be ready before starting (after)\n\
             api: db is stopped: this waits until it is started (deploy start db)\n"
        ),
        "{}",
        stdout(&out)
    );
    assert!(
        err.starts_with("api: not over after 2s (--timeout): rolling at 0/1; "),
        "{err}"
    );
    assert_eq!(d.field("active/api/state"), "waiting");
    // The same for what stop, start and remove wait for: an instance that
    // ignores its stop signal is not stopped within a second.
    d.write_manifest(
        "stubborn",
        "exec trap '' TERM; sleep 1000\nstop_timeout 3s\n",
    );
    assert!(d.deploy(&["apply", "stubborn"]).status.success());
    let err = failed_with(&run(&["stop", "stubborn", "--timeout", "1s"]), 1);
    assert!(err.starts_with("stubborn: not stopped after 1s ("), "{err}");
    let err = failed_with(&run(&["apply", "api", "--timeout", "soon"]), 2);
    assert!(
        err.contains("--timeout needs a duration like 10, 10s, 500ms, 2m, 1h or 1d, got 'soon'"),
        "{err}"
    );

    // Restored by the next deployd, api waits for db again, and says why.
    d.sigterm();
    assert_eq!(d.wait_exit(LONG), Some(0));
    d.launch();
    let stopped = "db is stopped: this waits until it is started (deploy start db)\n";
    wait_for("api to say db is stopped again", LONG, || {
        d.try_read("active/api/events").matches(stopped).count() == 2
    });
    assert_eq!(d.field("active/api/state"), "waiting");
}

/// The reading commands of the CLI: events, logs (each with -f), status in
/// both forms.
#[test]
fn cli_events_logs_and_status() {
    let port = free_port();
    let m = app_manifest(2, &format!("port {port}\n"));
    let Some(d) = Deployd::start_settled(&[("web", m)]) else {
        return;
    };
    let out = d.deploy(&["events", "web"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), d.read("active/web/events"));

    wait_for("both instances to print", LONG, || {
        let o = stdout(&d.deploy(&["logs", "web"]));
        o.contains("[0] app ") && o.contains("[1] app ")
    });
    let one = stdout(&d.deploy(&["logs", "web", "1"]));
    assert!(
        one.starts_with("app ") && one.contains(" instance 1 "),
        "{one}"
    );
    let out = d.deploy(&["logs", "web", "7"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        stderr(&out),
        "deploy: web: no instance 7 (instances: 0, 1)\n"
    );
    // A name that cannot be a service is a usage error, found before any
    // ctl file is written: 'my svc' would otherwise reach the root ctl as
    // two words, and '../x' name a path outside active/.
    for args in [
        &["apply", "my svc"][..],
        &["events", "../x"],
        &["stop", "Web"],
    ] {
        let err = failed_with(&d.deploy(args), 2);
        let name = args[1];
        assert!(
            err.contains(&format!(
                "'{name}' is not a service name: use 1 to 63 of a-z"
            )),
            "{err}"
        );
    }
    assert_eq!(d.field("active/web/state"), "running");
    // The log file has the time deployd read each line; -t shows it.
    let file = d.read("active/web/instances/1/log");
    let stamped = stdout(&d.deploy(&["logs", "web", "1", "-t"]));
    assert_eq!(stamped, file);
    let (t, line) = deployd_lib::stamp::split(&file).unwrap_or_else(|| panic!("{file}"));
    assert!(
        one.starts_with(line.lines().next().unwrap()),
        "{one}\n{file}"
    );
    let labelled = stdout(&d.deploy(&["logs", "web", "--timestamps"]));
    assert!(labelled.contains(&format!("[1] {t} app ")), "{labelled}");
    // --since: lines from then on, or none if nothing was printed since.
    assert_eq!(stdout(&d.deploy(&["logs", "web", "1", "--since", t])), one);
    let later = stdout(&d.deploy(&["logs", "web", "--since", "2099-01-01"]));
    assert_eq!(later, "");
    assert_eq!(
        stdout(&d.deploy(&["logs", "web", "--since", "1h"])),
        stdout(&d.deploy(&["logs", "web"]))
    );
    let events = stdout(&d.deploy(&["events", "web", "--since", "1h"]));
    assert_eq!(events, d.read("active/web/events"));
    // -n: from the last lines.
    let last3: Vec<&str> = events.lines().rev().take(3).collect();
    let tail = stdout(&d.deploy(&["events", "web", "-n", "3"]));
    assert_eq!(tail.lines().rev().collect::<Vec<_>>(), last3, "{tail}");
    let last = one.lines().last().unwrap_or_default();
    assert_eq!(
        stdout(&d.deploy(&["logs", "web", "1", "--tail", "1"])),
        format!("{last}\n")
    );
    let bad = d.deploy(&["logs", "web", "--since", "yesterday"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("neither a time ago"),
        "{}",
        stderr(&bad)
    );

    let all: serde_json::Value =
        serde_json::from_slice(&d.deploy(&["status", "--json"]).stdout).unwrap();
    assert_eq!(all[0]["service"], "web");
    assert_eq!(all[0]["progress"], "2/2");
    http_get(port, "/").unwrap();
    let detail = stdout(&d.deploy(&["status", "web"]));
    assert!(
        detail.contains(&format!(
            "traffic           port {port} (http): 1 requests, 0 in flight, 0 errors, 0 retried, 0 abandoned\n"
        )),
        "{detail}"
    );
    assert!(detail.contains("INSTANCE  PID"), "{detail}");
    assert!(
        detail.contains("INFLIGHT  REQUESTS  ERRORS  RETRIED"),
        "{detail}"
    );
    // It ends with the service's last events, as `systemctl status` ends
    // with a unit's last log lines.
    let events = d.read("active/web/events");
    let (_, recent) = detail
        .split_once("\nrecent events (deploy events web)\n")
        .unwrap_or_else(|| panic!("{detail}"));
    let recent: Vec<&str> = recent.lines().map(str::trim_start).collect();
    let last: Vec<&str> = events.lines().rev().take(10).collect();
    assert_eq!(recent.len(), last.len(), "{detail}");
    assert!(
        recent.iter().all(|l| events.contains(&format!("{l}\n"))),
        "{detail}"
    );
    let j: serde_json::Value =
        serde_json::from_slice(&d.deploy(&["status", "web", "--json"]).stdout).unwrap();
    assert_eq!(
        j["events"].as_array().map(Vec::len),
        Some(last.len()),
        "{j}"
    );
    assert_eq!(j["traffic"]["served"], 1);
    assert_eq!(j["traffic"]["abandoned"], 0);
    let per_instance: u64 = (0..2)
        .map(|i| j["instances"][i]["traffic"]["served"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(per_instance, 1, "{j}");
    assert_eq!(j["instances"][0]["inflight"], 0);

    // usage: what /proc says of the instance's process, and the CLI's columns.
    let pid = j["instances"][0]["pid"].as_u64().unwrap();
    let usage = d.read("active/web/instances/0/usage");
    let field = |k: &str| -> f64 {
        usage
            .lines()
            .find_map(|l| l.strip_prefix(k)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{k} in {usage:?}"))
    };
    let vm_rss: f64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix(" kB")?
                .parse()
                .ok()
        })
        .unwrap();
    assert_eq!(field("processes"), 1.0, "{usage}");
    let rss = field("rss");
    assert!(
        (rss - vm_rss * 1024.0).abs() < vm_rss * 1024.0 * 0.25,
        "{usage} against VmRSS {vm_rss} kB"
    );
    assert!(field("cpu") > 0.0, "python starting takes CPU: {usage}");
    assert!(
        j["instances"][1]["usage"]["rss"].as_u64().unwrap() > 1 << 20,
        "{j}"
    );
    assert!(
        detail.contains(" MEM ") && detail.contains(" CPU "),
        "{detail}"
    );

    // -f follows: a new event shows up in the running command's output.
    let follow = Following::start(&d, &["events", "web", "-f"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.deploy(&["pause", "web"]).status.code(), Some(5));
    wait_for("the refusal in the followed events", LONG, || {
        follow
            .lines()
            .iter()
            .any(|l| l.ends_with("refused: nothing to pause: no rollout in progress"))
    });
    drop(follow);

    // deployd's own log, written to a file (as to the journal), is plain
    // text: the refusal with its field, and no terminal colour codes.
    let log = d.log();
    assert!(
        log.contains("refused: nothing to pause: no rollout in progress service=web"),
        "{log}"
    );
    assert!(!log.contains('\x1b'), "{log}");
}

/// `deploy diff`: each file against the manifest its service runs, with
/// kubectl's exit codes (0 the same, 1 differs) and 2 for a bad file.
#[test]
fn diff_says_what_apply_would_change() {
    let Some(d) = Deployd::start_settled(&[("web", "exec sleep 1000\nreplicas 2\n".to_string())])
    else {
        return;
    };
    let web = d.manifests.join("web.manifest");
    let web_arg = web.to_str().unwrap();
    let out = d.deploy(&["diff", web_arg]);
    let version = d.field("active/web/version");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("web: unchanged ({version})\n"));

    d.write_manifest("web", "exec sleep 1000\nreplicas 3\n");
    d.write_manifest("extra", "exec sleep 1000\n");
    let extra = d.manifests.join("extra.manifest");
    let out = d.deploy(&["diff", web_arg, extra.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with(&format!("web: {version} → ")), "{text}");
    assert!(
        text.contains(&format!(
            "--- active/web/manifest\n+++ {web_arg}\n@@ -1,2 +1,2 @@\n exec sleep 1000\n-replicas 2\n+replicas 3\n"
        )),
        "{text}"
    );
    assert!(text.contains("extra: new service ("), "{text}");
    assert!(text.contains("+exec sleep 1000\n"), "{text}");
    // Nothing was applied.
    assert_eq!(d.field("active/web/version"), version);
    assert!(!d.path("active/extra").exists());

    d.write_manifest("extra", "exec sleep 1000\nreplicas many\n");
    let out = d.deploy(&["diff", extra.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("extra.manifest:2:"),
        "{}",
        stderr(&out)
    );

    let out = d.deploy(&["apply", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.deploy(&["diff", web_arg]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
}

/// The kernel keeps a service's snapshot files (their attributes and
/// pages) between opens; deployd has it drop each one before it answers
/// the write that changed it. So a fresh `cat` in another process, after
/// each acknowledged change, never shows an older value: 1,500 pauses and
/// resumes, each checked, while another reader keeps the file in the
/// kernel's cache.
#[test]
fn a_read_after_an_acknowledged_change_never_sees_an_older_value() {
    let extra = "update_batch 1\nupdate_pause 1h\n";
    let Some(d) = Deployd::start_settled(&[("web", app_manifest(2, extra))]) else {
        return;
    };
    d.write_manifest("web", &app_manifest(2, &format!("{extra}env TAG=fresh\n")));
    assert!(d.deploy(&["apply", "web", "--no-wait"]).status.success());
    wait_for("the first batch", LONG, || {
        d.try_read("active/web/update_progress") == "1/2\n"
    });
    assert_eq!(d.field("active/web/update_status"), "rolling");
    let status = d.path("active/web/update_status");
    let ctl = d.path("active/web/ctl");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = {
        let (status, stop) = (status.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let s = std::fs::read_to_string(&status).unwrap_or_else(|e| format!("error {e}"));
                assert!(s == "paused\n" || s == "rolling\n", "{s:?}");
                reads += 1;
            }
            reads
        })
    };
    let cat = |path: &std::path::Path| {
        let out = std::process::Command::new("cat")
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    for i in 0..1500 {
        for (command, want) in [("pause", "paused\n"), ("resume", "rolling\n")] {
            std::fs::write(&ctl, format!("{command}\n"))
                .unwrap_or_else(|e| panic!("{command} (round {i}): {e}"));
            assert_eq!(cat(&status), want, "after {command}, round {i}");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = hammer.join().unwrap();
    assert!(reads > 1000, "the other reader read {reads} times");
    // The progress of the rollout held all along.
    assert_eq!(cat(&d.path("active/web/update_progress")), "1/2\n");
}
