//! Hostile input and exhaustion, end to end: a real deployd on a real
//! mount, attacked as a hostile local user or client would. One port's
//! flood must never take another service down; a file named in a manifest
//! must never block or bloat deployd; nothing of a service's secrets may
//! leak to users who cannot open the mount.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::load::{Client, Load};
use common::{Deployd, app_manifest, free_port, http_get, wait_for};

const LONG: Duration = Duration::from_secs(60);

/// Raises this test process's own open-file limit to its hard limit: the
/// flood needs more descriptors than deployd is given.
fn raise_own_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}

/// deployd with 1024 descriptors; 1,400 idle connections to one service's
/// port (they never send a byte). Meanwhile the other service keeps its
/// three instances ready and serves every request of a client, a ctl
/// command replaces one of its instances, no instance of either service
/// is blamed (same pids), and every event reaches events.log. Once the
/// flood is over, the flooded port serves again.
#[test]
fn a_flood_of_idle_connections_to_one_port_leaves_the_other_services_alone() {
    const NOFILE: u64 = 1024;
    const FLOOD: usize = 1400;
    assert!(
        raise_own_limit() > FLOOD as u64 + 200,
        "this test needs descriptors"
    );
    let (flood_port, web_port) = (free_port(), free_port());
    let manifests = [
        ("flood", app_manifest(1, &format!("port {flood_port}\n"))),
        ("web", app_manifest(3, &format!("port {web_port}\n"))),
    ];
    let Some(d) = Deployd::start_with_nofile(&manifests, NOFILE) else {
        return;
    };
    d.settle("flood", LONG);
    d.settle("web", LONG);
    let pids = |s: &str| -> Vec<u32> { d.instances(s).iter().map(|i| i.1).collect() };
    let (flood_pids, web_pids) = (pids("flood"), pids("web"));

    let load = Load::start(web_port, &[(Client::KeepAlive, 2), (Client::Fresh, 2)], "/");
    let mut conns = Vec::new();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], flood_port));
    for _ in 0..FLOOD {
        // Past the port's max_connections and its backlog, a connect
        // waits for an accept that does not come: not for long.
        if let Ok(c) = TcpStream::connect_timeout(&addr, Duration::from_millis(50)) {
            conns.push(c);
        }
    }
    assert!(
        conns.len() > NOFILE as usize / 2,
        "only {} connected",
        conns.len()
    );
    let traffic = d.read("active/flood/traffic");
    let max: usize = field(&traffic, "max_connections");
    assert!(max < NOFILE as usize / 2, "{traffic}");

    // Under the flood: a ctl command works, and what it starts (a new
    // instance: a port, a pipe, a log, probes) gets its descriptors.
    let out = d.deploy(&["restart", "web", "0", "--timeout", "30s"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        common::stderr(&out),
        d.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(d.field("active/web/update_progress"), "3/3");
    let c = load.finish();
    assert_eq!(c.failed(), 0, "{:?}", c.errors.lock());
    assert!(c.ok() > 100, "only {} requests", c.ok());

    // Nobody was blamed: the flooded service's instance and web's other
    // two still run, never replaced.
    assert_eq!(
        pids("flood"),
        flood_pids,
        "{}",
        d.read("active/flood/events")
    );
    let now = pids("web");
    let kept = web_pids.iter().filter(|p| now.contains(p)).count();
    assert_eq!(kept, 2, "{}", d.read("active/web/events"));

    // No event lost: what the namespace shows is on disk.
    for service in ["flood", "web"] {
        let shown = d.read(&format!("active/{service}/events"));
        let saved = std::fs::read_to_string(d.state.join(format!("services/{service}/events.log")))
            .unwrap();
        for line in shown.lines() {
            assert!(
                saved.contains(line),
                "{service}: {line:?} not in events.log"
            );
        }
    }

    // The flood ends; the port serves again, its instance the same.
    drop(conns);
    wait_for("the flooded port to serve", LONG, || {
        http_get(flood_port, "/").is_ok_and(|(s, _)| s == 200)
    });
    assert_eq!(pids("flood"), flood_pids);
}

/// Writes `cmd` to the ctl file at `path` and reads its answer through the
/// same descriptor, as a script would with `exec 3<>ctl`: whether the
/// write worked (its errno if not), and the answer.
fn ctl(path: &std::path::Path, cmd: &[u8]) -> (Result<(), Option<i32>>, String) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let written = f.write_all(cmd).map_err(|e| e.raw_os_error());
    let mut answer = String::new();
    f.read_to_string(&mut answer).unwrap();
    (written, answer)
}

/// A `NAME N` line of a `traffic` file.
fn field(text: &str, name: &str) -> usize {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Runs `f` on a thread and fails if it takes longer than `limit` (a
/// write to a ctl file that hangs must fail the test, not hang it).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("still not done after {limit:?}"))
}

/// A FIFO (which an open for reading waits on for ever), /dev/zero (which
/// never ends) and a 100 MB file as `env_file`: `deploy check` and an
/// apply refuse each within a second with a clear error, and another
/// service's ctl writes are not held up meanwhile.
#[test]
fn env_files_that_would_block_or_bloat_deployd_are_refused_at_once() {
    let web_port = free_port();
    let Some(d) =
        Deployd::start_settled(&[("web", app_manifest(1, &format!("port {web_port}\n")))])
    else {
        return;
    };
    let fifo = d.dir.path().join("secrets.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let big = d.dir.path().join("big.env");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    let cases = [
        (
            fifo.display().to_string(),
            "a FIFO, not a regular file; refused",
        ),
        (
            "/dev/zero".to_string(),
            "a character device, not a regular file; refused",
        ),
        (
            big.display().to_string(),
            "104857600 bytes; the limit is 1048576",
        ),
    ];
    for (path, why) in cases {
        let file = d.manifests.join("bad.manifest");
        std::fs::write(&file, format!("exec sleep 60\nenv_file {path}\n")).unwrap();
        let t = Instant::now();
        let check = within(Duration::from_secs(5), {
            let file = file.clone();
            move || {
                Command::new(common::deploy_bin())
                    .arg("check")
                    .arg(&file)
                    .output()
                    .unwrap()
            }
        });
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "check took {:?}",
            t.elapsed()
        );
        let err = common::failed_with(&check, 1);
        assert!(err.contains(&format!("env_file {path}: {why}")), "{err}");

        let t = Instant::now();
        let root = d.path("ctl");
        let (apply, answer) = within(Duration::from_secs(5), move || ctl(&root, b"apply bad\n"));
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "apply took {:?}",
            t.elapsed()
        );
        assert_eq!(apply, Err(Some(libc::EINVAL)));
        assert!(answer.contains(why), "{answer}");
        // Another service's ctl is answered at once meanwhile.
        let t = Instant::now();
        let pause = d.path("active/web/ctl");
        let r = within(Duration::from_secs(5), move || {
            std::fs::write(pause, "pause\n")
        });
        assert!(r.is_err(), "nothing to pause");
        assert!(t.elapsed() < Duration::from_secs(1));
    }
    assert!(!d.path("active/bad").exists());
}

/// A user other than deployd's (here `nobody`) can read nothing of the
/// state directory: not instances' output, not events, not manifests.
#[test]
fn the_state_directory_is_closed_to_other_users() {
    let Some(d) = Deployd::start_settled(&[(
        "worker",
        "exec sh -c 'echo secret-token; exec sleep 600'\n".to_string(),
    )]) else {
        return;
    };
    let as_nobody = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    // The test's own directory is open to all, as /var/lib is: only the
    // state directory's own modes keep others out.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = d.state.to_str().unwrap().to_string();
    let events = format!("{state}/services/worker/events.log");
    for args in [
        vec!["ls", state.as_str()],
        vec!["cat", events.as_str()],
        vec!["find", state.as_str(), "-type", "f"],
    ] {
        let out = as_nobody(&args);
        let seen = String::from_utf8_lossy(&out.stdout);
        assert!(
            !seen.contains("secret-token") && !seen.contains("events"),
            "{args:?}: {seen}"
        );
        assert!(!out.status.success(), "{args:?} worked as nobody");
    }
    // deployd itself reads them as ever.
    assert!(
        d.read("active/worker/instances/0/log")
            .contains("secret-token")
    );
}

/// A manifest that is a link to a file outside the manifests directory
/// (`/etc/shadow`, say) is refused without its lines going anywhere.
#[test]
fn a_manifest_linked_out_of_the_manifests_directory_is_never_echoed() {
    let Some(d) = Deployd::start_settled(&[("evil", "exec sleep 600\n".to_string())]) else {
        return;
    };
    let outside = d.dir.path().join("shadow");
    std::fs::write(&outside, "root:$6$SECRETHASH$xyz:19000:0:99999:7:::\n").unwrap();
    let link = d.manifests.join("evil.manifest");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let (r, answer) = ctl(&d.path("active/evil/ctl"), b"apply\n");
    assert!(r.is_err());
    assert!(
        answer.contains("outside the manifests directory; refused"),
        "{answer}"
    );
    let (r, all) = ctl(&d.path("ctl"), b"apply\n");
    assert!(r.is_err());
    for text in [answer, all, d.read("active/evil/events"), d.log()] {
        assert!(!text.contains("SECRETHASH"), "{text}");
    }
}

/// `deploy … | head -1` ends with 0 for every command that prints, however
/// much there was to print.
#[test]
fn every_printing_command_exits_quietly_when_its_reader_stops() {
    let Some(d) = Deployd::start_settled(&[(
        "web",
        "exec sh -c 'seq 1 30000; exec sleep 600'\nreplicas 2\n".to_string(),
    )]) else {
        return;
    };
    // Events enough to overflow a pipe.
    let out = d.sh("for i in $(seq 1500); do echo bogus-command-number-$i > $ROOT/active/web/ctl 2>/dev/null; done; true");
    assert!(out.status.success());
    let bin = common::deploy_bin();
    let mnt = d.mnt.display();
    let manifest = d.manifests.join("web.manifest");
    for cmd in [
        "status".to_string(),
        "status web".to_string(),
        "status --json".to_string(),
        "events web".to_string(),
        "logs web".to_string(),
        "logs web 1 -t".to_string(),
        format!("diff {}", manifest.display()),
        format!("check {}", manifest.display()),
    ] {
        let script = format!(
            "DEPLOY_ROOT={mnt} {} {cmd} 2>&1 | head -1 >/dev/null; echo ${{PIPESTATUS[0]}}",
            bin.display()
        );
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "0",
            "deploy {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Smaller holes: a 1 MiB ctl write is told as too long (not by the size
/// of its first piece); what a ctl write, a manifest or an instance's
/// output puts in events cannot reorder or break its line (U+202E and
/// control characters are escaped).
#[test]
fn long_ctl_writes_and_unsafe_characters_are_told_plainly() {
    let Some(d) = Deployd::start_settled(&[(
        "web",
        "exec sh -c 'printf \"ok\\342\\200\\256txt.exe\\033[31m\\n\"; sleep 3; exit 3'\nrestart never\nhealth none\n"
            .to_string(),
    )]) else {
        return;
    };
    let (r, answer) = ctl(&d.path("active/web/ctl"), &vec![b'a'; 1 << 20]);
    assert!(r.is_err());
    assert_eq!(
        answer,
        "error: control message is longer than the limit of 1024 bytes\n"
    );
    // A manifest whose error holds U+202E, refused.
    d.write_manifest("web", "exec a\nbogus\u{202e}directive 1\n");
    assert!(std::fs::write(d.path("active/web/ctl"), "apply\n").is_err());
    let events = d.wait_events("web", "printed:", 1);
    assert!(
        !events.contains('\u{202e}') && !events.contains('\x1b'),
        "{events}"
    );
    assert!(events.contains("bogus\\u{202e}directive"), "{events}");
    let mut log = String::new();
    std::fs::File::open(d.state.join("services/web/events.log"))
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(!log.contains('\u{202e}'), "{log}");
}
