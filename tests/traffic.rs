//! Zero-downtime traffic: deployd's public port under continuous load while
//! services are rolled, restarted, rolled back, failed and crashed. The
//! instances are the naive test app: no graceful shutdown of its own.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::load::{Client, Load};
use common::*;

const LONG: Duration = Duration::from_secs(60);

fn web(port: u16, mode: &str, replicas: u32, extra: &str) -> String {
    let drain = if extra.contains("drain ") {
        ""
    } else {
        "drain 5s\n"
    };
    app_manifest(
        replicas,
        &format!("port {port}\nproxy {mode}\n{drain}{extra}"),
    )
}

/// The addresses of the service's instances, as access lines name them.
fn instance_addrs(d: &Deployd, service: &str) -> Vec<String> {
    d.instances(service)
        .iter()
        .filter_map(|i| i.4)
        .map(|p| format!("127.0.0.1:{p}"))
        .collect()
}

/// Runs `f` under load and returns (requests ok during it, failures so far).
fn phase(load: &Load, name: &str, f: impl FnOnce()) -> u64 {
    let before = load.counters.ok();
    f();
    let n = load.counters.ok() - before;
    eprintln!("{name}: {n} requests");
    n
}

fn assert_clean(load: Load, floor: u64) {
    let c = load.finish();
    let errors = c.errors.lock().clone();
    assert_eq!(c.failed(), 0, "failed requests: {errors:#?}");
    assert_eq!(c.reconnects.load(Ordering::SeqCst), 0);
    assert!(c.ok() >= floor, "only {} requests (floor {floor})", c.ok());
    eprintln!("total: {} requests, 0 failed", c.ok());
}

/// Waits until instance 0 of `service` has `n` requests or connections in
/// flight (`what`: what is awaited, for the failure message).
fn wait_inflight(d: &Deployd, service: &str, n: usize, what: &str) {
    let file = format!("active/{service}/instances/0/inflight");
    wait_for(what, LONG, || d.try_read(&file) == format!("{n}\n"));
}

/// Runs `deploy ARGS`, checks its exit code, returns its output.
fn run(d: &Deployd, args: &[&str], code: i32) -> String {
    let out = d.deploy(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "deploy {args:?}: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// The count of `deploy`'s "traffic meanwhile" line, which must say that
/// nothing failed: `web: traffic meanwhile: 1200 requests, 0 errors, ...`.
fn served_meanwhile(out: &str, service: &str, what: &str) -> u64 {
    let prefix = format!("{service}: traffic meanwhile: ");
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no traffic line in {out}"));
    let (n, rest) = line.split_once(&format!(" {what}, ")).unwrap();
    assert!(rest.starts_with("0 errors, "), "{out}");
    n.parse().unwrap()
}

/// Acceptance 1: http mode, keep-alive and fresh connections, zero failed
/// requests through a rolling update, a rolling restart, a rollback and a
/// failed rollout.
#[test]
fn http_zero_failures_through_every_kind_of_rollout() {
    let port = free_port();
    let p = "update_pause 300ms\n";
    let Some(d) = Deployd::start_settled(&[("web", web(port, "http", 3, p))]) else {
        return;
    };
    let load = Load::start(port, &[(Client::KeepAlive, 3), (Client::Fresh, 3)], "/");
    std::thread::sleep(Duration::from_millis(500));
    let floor = 500;
    let n = phase(&load, "rolling update", || {
        d.write_manifest("web", &web(port, "http", 3, &format!("{p}env TAG=v2\n")));
        let out = run(&d, &["apply", "web"], 0);
        // deploy says what the port served while it ran: the load's.
        assert!(served_meanwhile(&out, "web", "requests") > 0, "{out}");
    });
    assert!(n >= floor, "{n}");
    let n = phase(&load, "rolling restart", || {
        run(&d, &["restart", "web"], 0);
    });
    assert!(n >= floor, "{n}");
    // One instance alone: a fresh process in its slot serves before the
    // old one is routed out; the other two are not touched.
    let pids = |d: &Deployd| -> Vec<(u32, u32)> {
        d.instances("web").iter().map(|i| (i.0, i.1)).collect()
    };
    let before = pids(&d);
    assert_eq!(before.len(), 3, "{before:?}");
    let n = phase(&load, "restart of one instance", || {
        let out = run(&d, &["restart", "web", "1"], 0);
        assert!(
            out.contains("web: restart of instance 1 started (")
                && out.contains("web: restarted instance 1 ("),
            "{out}"
        );
    });
    assert!(n >= 100, "{n}");
    let after = pids(&d);
    assert_eq!(after.len(), 3, "{after:?}");
    for ((n0, p0), (n1, p1)) in before.iter().zip(&after) {
        assert_eq!(n0, n1);
        assert_eq!(p0 == p1, *n0 != 1, "instance {n0}: {before:?} → {after:?}");
    }
    let n = phase(&load, "rollback", || {
        run(&d, &["rollback", "web"], 0);
    });
    assert!(n >= floor, "{n}");
    let n = phase(&load, "failed rollout", || {
        d.write_manifest(
            "web",
            &web(
                port,
                "http",
                3,
                &format!("{p}env FAIL_HEALTH=1\nhealth_deadline 2s\n"),
            ),
        );
        run(&d, &["apply", "web"], 1);
    });
    assert!(n >= floor, "{n}");
    assert_eq!(d.field("active/web/update_status"), "failed");
    let traffic = d.read("active/web/traffic");
    assert!(
        traffic.starts_with(&format!("port {port} http\nrequests ")),
        "{traffic}"
    );
    assert!(traffic.contains("\nerrors 0\n"), "{traffic}");
    assert_clean(load, 4000);
}

/// Acceptance 2: the same in tcp mode, fresh connections.
#[test]
fn tcp_zero_failures_through_every_kind_of_rollout() {
    let port = free_port();
    let p = "update_pause 300ms\n";
    let Some(d) = Deployd::start_settled(&[("api", web(port, "tcp", 3, p))]) else {
        return;
    };
    let load = Load::start(port, &[(Client::Fresh, 4)], "/");
    std::thread::sleep(Duration::from_millis(500));
    let floor = 500;
    let n = phase(&load, "rolling update", || {
        d.write_manifest("api", &web(port, "tcp", 3, &format!("{p}env TAG=v2\n")));
        run(&d, &["apply", "api"], 0);
    });
    assert!(n >= floor, "{n}");
    let n = phase(&load, "rolling restart", || {
        let out = run(&d, &["restart", "api"], 0);
        assert!(served_meanwhile(&out, "api", "connections") > 0, "{out}");
    });
    assert!(n >= floor, "{n}");
    let n = phase(&load, "rollback", || {
        run(&d, &["rollback", "api"], 0);
    });
    assert!(n >= floor, "{n}");
    let n = phase(&load, "failed rollout", || {
        d.write_manifest(
            "api",
            &web(
                port,
                "tcp",
                3,
                &format!("{p}env FAIL_HEALTH=1\nhealth_deadline 2s\n"),
            ),
        );
        run(&d, &["apply", "api"], 1);
    });
    assert!(n >= floor, "{n}");
    assert!(
        d.read("active/api/traffic")
            .starts_with(&format!("port {port} tcp\nconnections "))
    );
    assert_clean(load, 3000);
}

/// Waits for web's stopping deployd to log that it waits for one request,
/// then checks that its port no longer listens. In that order: a
/// connection made to probe the port, accepted before it closed, would be
/// owed an answer too.
fn stop_waits_for_one_request(d: &Deployd, port: u16) {
    wait_for("the wait to be logged", LONG, || {
        d.try_read("active/web/events")
            .contains("deployd stopping: waiting up to 20s for 1 request in flight")
    });
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the port still listens"
    );
}

/// Acceptance 3 (http): a long request in flight on the old instance when
/// it is routed out completes; the instance is stopped only after.
#[test]
fn a_long_request_finishes_on_the_draining_instance() {
    let port = free_port();
    let Some(d) = Deployd::start_settled(&[("web", web(port, "http", 1, "drain 10s\n"))]) else {
        return;
    };
    let v1 = d.field("active/web/version");
    let old_pid = d.instances("web")[0].1;
    let slow = std::thread::spawn(move || {
        let started = Instant::now();
        let r = http_get(port, "/slow?ms=3000");
        (r, started.elapsed())
    });
    wait_inflight(&d, "web", 1, "the slow request to be in flight");
    d.write_manifest("web", &web(port, "http", 1, "drain 10s\nenv TAG=v2\n"));
    let out = d.deploy(&["apply", "web", "--no-wait"]);
    assert!(out.status.success());
    // Routed out, still serving its request, not stopped.
    wait_for("the old instance to drain", LONG, || {
        d.instances("web")
            .iter()
            .any(|i| i.1 == old_pid && i.2 == "draining")
    });
    assert!(alive(old_pid));
    assert!(
        d.read("active/web/traffic")
            .contains(" inflight 1 errors 0 retried 0 abandoned 0 draining\n")
    );
    let (r, took) = slow.join().unwrap();
    let (status, body) = r.expect("the long request failed");
    assert_eq!(status, 200);
    assert!(
        body.starts_with(&format!("slow {v1} 0 {old_pid}")),
        "{body}"
    );
    assert!(took >= Duration::from_millis(2900), "{took:?}");
    d.settle("web", LONG);
    assert!(!alive(old_pid));
    let events = d.read("active/web/events");
    let stop_line = events
        .lines()
        .position(|l| l.contains("instance 0 stopping"))
        .unwrap();
    let out_line = events
        .lines()
        .position(|l| l.contains("routed out instance 0"))
        .unwrap();
    assert!(out_line < stop_line);
}

/// A long poll whose client went away does not hold up its instance's
/// drain: the request is abandoned when the client closes, so the rollout
/// goes on at once instead of after `drain`.
#[test]
fn a_request_whose_client_left_does_not_hold_up_the_drain() {
    let port = free_port();
    let Some(d) = Deployd::start_settled(&[("web", web(port, "http", 1, "drain 30s\n"))]) else {
        return;
    };
    let old_pid = d.instances("web")[0].1;
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"GET /slow?ms=60000 HTTP/1.1\r\nHost: web\r\n\r\n")
        .unwrap();
    wait_inflight(&d, "web", 1, "the long poll to be in flight");
    drop(conn);
    wait_inflight(&d, "web", 0, "the abandoned request to stop counting");
    let traffic = d.read("active/web/traffic");
    assert!(traffic.contains("\nabandoned 1\n"), "{traffic}");
    d.write_manifest("web", &web(port, "http", 1, "drain 30s\nenv TAG=v2\n"));
    let started = Instant::now();
    run(&d, &["apply", "web"], 0);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "the rollout took {took:?}");
    assert!(!alive(old_pid));
}

/// Acceptance 3 (tcp): a connection still open after `drain` is closed and
/// the instance stopped.
#[test]
fn tcp_connection_still_open_after_drain_is_closed() {
    let port = free_port();
    let o = "drain 1s\naccess_log on\n";
    let Some(d) = Deployd::start_settled(&[("api", web(port, "tcp", 1, o))]) else {
        return;
    };
    let old_pid = d.instances("api")[0].1;
    let old_port = d.instances("api")[0].4.expect("a port");
    // An idle connection: half a request, so the instance waits for more.
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    wait_inflight(&d, "api", 1, "the connection to be counted");
    d.write_manifest("api", &web(port, "tcp", 1, &format!("{o}env TAG=v2\n")));
    let started = Instant::now();
    let apply = std::thread::spawn({
        let out = d.deploy(&["apply", "api", "--no-wait"]);
        move || out
    });
    assert!(apply.join().unwrap().status.success());
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf).unwrap_or(0);
    let took = started.elapsed();
    assert_eq!(n, 0, "expected the connection closed, got {:?}", &buf[..n]);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );
    d.settle("api", LONG);
    assert!(!alive(old_pid));
    // The event log says what the drain's end cut, before the stop.
    let events = d.read("active/api/events");
    let lines: Vec<&str> = events.lines().collect();
    let cut = lines
        .iter()
        .position(|l| {
            l.ends_with("instance 0: drain of 1s over with 1 connection still open; closing")
        })
        .unwrap_or_else(|| panic!("{events}"));
    assert!(
        lines[cut + 1].ends_with("instance 0 stopping (TERM)"),
        "{events}"
    );
    // And its access line says deployd cut it, with the 16 bytes it sent.
    wait_for("the connection's line", LONG, || {
        !d.try_read("active/api/access").is_empty()
    });
    let access = d.read("active/api/access");
    let f: Vec<&str> = access.trim_end().split(' ').collect();
    assert_eq!(f.len(), 7, "{access}");
    assert_eq!(
        [f[1], f[2], f[3], f[4], f[6]],
        [
            "127.0.0.1",
            "cut",
            "16",
            "0",
            &format!("127.0.0.1:{old_port}")
        ],
        "{access}"
    );
    let ms: f64 = f[5].parse().unwrap_or_else(|_| panic!("{access}"));
    assert!(ms >= 900.0, "{access}");
}

/// `access_log on` in tcp mode: a line per connection once it is over,
/// with how it ended and the bytes each way.
#[test]
fn a_tcp_access_log_has_a_line_per_connection() {
    let port = free_port();
    let Some(d) = Deployd::start_settled(&[("api", web(port, "tcp", 2, "access_log on\n"))]) else {
        return;
    };
    let ports = instance_addrs(&d, "api");
    let mut sizes = Vec::new();
    for i in 0..4 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let req = format!("GET /?n={i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        c.write_all(req.as_bytes()).unwrap();
        let mut resp = Vec::new();
        c.read_to_end(&mut resp).unwrap();
        assert!(resp.starts_with(b"HTTP/1."), "{resp:?}");
        sizes.push((req.len(), resp.len()));
        drop(c);
        // Its line is written once both sides closed; in order.
        wait_for("its line", LONG, || {
            d.try_read("active/api/access").lines().count() > i
        });
    }
    let access = d.read("active/api/access");
    assert_eq!(access, stdout(&d.deploy(&["logs", "api", "--access"])));
    let lines: Vec<&str> = access.lines().collect();
    assert_eq!(lines.len(), 4, "{access}");
    for (line, (sent, got)) in lines.iter().zip(&sizes) {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 7, "{line}");
        assert_eq!(
            [f[1], f[2], f[3], f[4]],
            ["127.0.0.1", "closed", &sent.to_string(), &got.to_string()],
            "{line}"
        );
        assert!(f[5].parse::<f64>().is_ok(), "{line}");
        assert!(ports.contains(&f[6].to_string()), "{line} {ports:?}");
    }
    assert!(
        d.read("active/api/traffic")
            .contains("\naccess_dropped 0\n"),
        "{}",
        d.read("active/api/traffic")
    );
}

/// Stopping deployd drains too: it stops listening and closes idle
/// keep-alive connections at once, lets the request in flight finish on
/// its instance (its response says `Connection: close`), and only then
/// stops the instances and exits 0.
#[test]
fn stopping_deployd_lets_requests_in_flight_finish() {
    let port = free_port();
    let Some(mut d) = Deployd::start_settled(&[("web", web(port, "http", 1, "drain 20s\n"))])
    else {
        return;
    };
    let pid = d.instances("web")[0].1;
    let keep_alive = move |path: &str| {
        let conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(LONG)).unwrap();
        (&conn)
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: web\r\n\r\n").as_bytes())
            .unwrap();
        BufReader::new(conn)
    };
    // A keep-alive connection, used once and idle since.
    let mut idle = keep_alive("/");
    let (status, _, keep) = common::load::read_response(&mut idle).unwrap();
    assert_eq!((status, keep), (200, true));
    // A long request in flight, on a keep-alive connection.
    let slow = std::thread::spawn(move || {
        let mut conn = keep_alive("/slow?ms=3000");
        let response = common::load::read_response(&mut conn);
        let mut rest = [0u8; 16];
        (response, conn.read(&mut rest))
    });
    wait_inflight(&d, "web", 1, "the slow request to be in flight");
    d.sigterm();
    // The idle connection is closed at once, while the request is still
    // with the instance, which is still running.
    let mut rest = [0u8; 16];
    assert_eq!(
        idle.read(&mut rest)
            .expect("the idle connection stayed open"),
        0
    );
    assert!(!slow.is_finished());
    assert!(alive(pid));
    stop_waits_for_one_request(&d, port);
    let (response, after) = slow.join().unwrap();
    let (status, body, keep) = response.expect("the request in flight failed");
    assert_eq!(status, 200);
    assert!(body.starts_with("slow "), "{body}");
    assert!(!keep, "the last response did not say Connection: close");
    assert_eq!(after.expect("the connection stayed open"), 0);
    assert_eq!(d.wait_exit(LONG), Some(0), "{}", d.log());
    assert!(!alive(pid));
}

/// A connection deployd accepted just before it stopped listening is not
/// closed under its first request, which its client has most likely sent
/// already: deployd counts it in flight from the accept, waits for it (up
/// to `drain`), answers it with `Connection: close`, and only then stops.
#[test]
fn stopping_deployd_answers_a_connection_it_accepted_before_its_request() {
    let port = free_port();
    let Some(mut d) = Deployd::start_settled(&[("web", web(port, "http", 1, "drain 20s\n"))])
    else {
        return;
    };
    let conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(LONG)).unwrap();
    // Accepted, its first request owed and with no instance yet.
    wait_for("the connection to be accepted", LONG, || {
        d.try_read("active/web/traffic").contains("\nwaiting 1\n")
    });
    d.sigterm();
    stop_waits_for_one_request(&d, port);
    (&conn)
        .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .unwrap();
    let mut conn = BufReader::new(conn);
    let (status, body, keep) =
        common::load::read_response(&mut conn).expect("the first request was not answered");
    assert_eq!(status, 200, "{body}");
    assert!(!keep, "the response did not say Connection: close");
    let mut rest = [0u8; 16];
    assert_eq!(conn.read(&mut rest).expect("the connection stayed open"), 0);
    assert_eq!(d.wait_exit(LONG), Some(0), "{}", d.log());
}

/// A second stop signal does not wait for traffic: a tcp connection that
/// would hold the stop for its whole `drain` is closed at once.
#[test]
fn a_second_sigterm_stops_deployd_without_waiting_for_traffic() {
    let port = free_port();
    let Some(mut d) = Deployd::start_settled(&[("api", web(port, "tcp", 1, "drain 60s\n"))]) else {
        return;
    };
    let pid = d.instances("api")[0].1;
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    wait_inflight(&d, "api", 1, "the connection to be counted");
    d.sigterm();
    wait_for("the wait to be logged", LONG, || {
        d.try_read("active/api/events")
            .contains("deployd stopping: waiting up to 1m for 1 connection in flight")
    });
    // Held open by the wait: the connection still reaches the instance.
    conn.write_all(b"Host: api\r\n\r\n").unwrap();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    conn.set_read_timeout(Some(LONG)).unwrap();
    let (status, _, _) = common::load::read_response(&mut r).expect("the held connection failed");
    assert_eq!(status, 200);
    assert!(alive(d.pid()), "deployd did not wait: {}", d.log());
    d.sigterm();
    // Well before the minute of drain the first signal waits for.
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut rest = [0u8; 16];
    assert_eq!(r.read(&mut rest).expect("the connection stayed open"), 0);
    assert_eq!(d.wait_exit(Duration::from_secs(30)), Some(0), "{}", d.log());
    assert!(!alive(pid));
    let events = std::fs::read_to_string(d.state.join("services/api/events.log")).unwrap();
    assert!(
        events.contains("instance 0: drain of 1m over with 1 connection still open; closing"),
        "{events}"
    );
}

/// Under socket activation (a socket unit holding the public port),
/// deployd can be restarted, to upgrade it say, without refusing a
/// connection: those that arrive meanwhile wait in the socket's backlog,
/// then for the new instances, and every request succeeds.
#[test]
fn a_restart_of_deployd_under_socket_activation_loses_no_request() {
    use std::os::fd::AsRawFd;
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    let manifest = web(port, "http", 2, "");
    let Some(mut d) = Deployd::start_with_socket(&[("web", manifest)], socket.as_raw_fd()) else {
        return;
    };
    d.settle("web", LONG);
    assert!(
        d.log()
            .contains(&format!("socket activation: ports [{port}] passed")),
        "{}",
        d.log()
    );
    // Its log went to "the journal": each line with its priority, no time.
    let log = d.log();
    assert!(log.lines().all(|l| l.starts_with('<')), "{log}");
    assert!(
        log.contains(&format!(
            "<6>listening on 127.0.0.1:{port} (http) service=web\n"
        )),
        "{log}"
    );
    // Instances do not see what was deployd's.
    let pid = d.instances("web")[0].1;
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(!environ.contains("LISTEN_FDS"), "{environ}");
    assert!(!environ.contains("JOURNAL_STREAM"), "{environ}");
    let load = Load::start(port, &[(Client::Fresh, 3)], "/");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    // deployd is gone and so are its instances; the port still takes a
    // connection and its request.
    assert!(!alive(pid));
    let mut waiting = TcpStream::connect(("127.0.0.1", port)).unwrap();
    waiting
        .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .unwrap();
    waiting.set_read_timeout(Some(LONG)).unwrap();
    let during = load.counters.ok();
    d.launch_with_socket(Some(socket.as_raw_fd()));
    d.settle("web", LONG);
    let (status, body, _) =
        common::load::read_response(&mut BufReader::new(waiting)).expect("the waiting request");
    assert_eq!(status, 200, "{body}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(load.counters.ok() > during, "no request after the restart");
    assert_clean(load, 200);
}

/// Acceptance 4: `update replace` with one replica: requests that arrive
/// while no instance is up wait for the new one and succeed.
#[test]
fn replace_of_a_single_instance_queues_requests() {
    let port = free_port();
    let extra = "update replace\nqueue_timeout 10s\n";
    let Some(d) = Deployd::start_settled(&[("web", web(port, "http", 1, extra))]) else {
        return;
    };
    let load = Load::start(port, &[(Client::KeepAlive, 2), (Client::Fresh, 2)], "/");
    std::thread::sleep(Duration::from_millis(300));
    // The new version takes a second to listen: a real gap.
    d.write_manifest(
        "web",
        &web(
            port,
            "http",
            1,
            &format!("{extra}env START_DELAY_MS=1000\n"),
        ),
    );
    // The requests queued in the gap show in `traffic` as waiting.
    let done = Arc::new(AtomicBool::new(false));
    let most_waiting = std::thread::spawn({
        let (file, done) = (d.path("active/web/traffic"), done.clone());
        move || {
            let mut most = 0u64;
            while !done.load(Ordering::SeqCst) {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                let n = text
                    .lines()
                    .find_map(|l| l.strip_prefix("waiting "))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                most = most.max(n);
                std::thread::sleep(Duration::from_millis(20));
            }
            most
        }
    });
    let started = Instant::now();
    run(&d, &["apply", "web"], 0);
    assert!(started.elapsed() >= Duration::from_secs(1));
    done.store(true, Ordering::SeqCst);
    let most = most_waiting.join().unwrap();
    assert!(most >= 1, "no request was seen waiting");
    let events = d.read("active/web/events");
    let stopped = events
        .lines()
        .position(|l| l.contains("instance 0 stopped"))
        .unwrap();
    let lines: Vec<&str> = events.lines().collect();
    let started_new = lines
        .iter()
        .rposition(|l| l.contains("starting instance"))
        .unwrap();
    assert!(stopped < started_new, "replace stops first:\n{events}");
    std::thread::sleep(Duration::from_millis(300));
    assert_clean(load, 50);
}

/// An instance that dies between probes: requests that had not started
/// being answered are retried on another instance, and the dead one is
/// replaced. Only a response already streaming from the killed process can
/// be cut short (nothing can save it once its head has gone to the client).
#[test]
fn a_crashed_instance_loses_no_request_that_had_not_started_answering() {
    let port = free_port();
    let Some(d) = Deployd::start_settled(&[("web", web(port, "http", 3, ""))]) else {
        return;
    };
    let workers = 6;
    let load = Load::start(port, &[(Client::KeepAlive, 3), (Client::Fresh, 3)], "/");
    std::thread::sleep(Duration::from_millis(500));
    let kills = 3;
    for round in 0..kills {
        let victim = d.instances("web")[round % 3].1;
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(victim as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        wait_for("the replacement", LONG, || {
            let i = d.instances("web");
            i.len() == 3 && i.iter().all(|x| x.1 != victim && x.2 == "ready")
        });
        std::thread::sleep(Duration::from_millis(300));
    }
    // Each crash is noticed, by its exit or (when the proxy's failed
    // connects get it probed first) as unhealthy.
    let events = d.read("active/web/events");
    let noticed =
        events.matches("exited unexpectedly").count() + events.matches("unhealthy after").count();
    assert!(noticed >= kills, "{events}");
    let c = load.finish();
    let errors = c.errors.lock().clone();
    assert!(
        errors.iter().all(|e| e.contains("response body cut short")),
        "a request failed before its response began: {errors:#?}"
    );
    assert!(c.failed() <= (kills * workers) as u64, "{errors:#?}");
    assert!(c.ok() >= 1000, "only {} requests", c.ok());
    eprintln!("total: {} requests, {} cut short", c.ok(), c.failed());
}

#[test]
fn x_forwarded_for_is_added_and_bodies_stream_both_ways() {
    let port = free_port();
    // The client (this test, on loopback) is a proxy the manifest trusts:
    // its X-Forwarded-For is kept and extended.
    let trusted = "trusted_proxies 127.0.0.0/8\n";
    let Some(d) = Deployd::start_settled(&[("web", web(port, "http", 1, trusted))]) else {
        return;
    };
    // A 1 MiB POST is echoed back whole.
    let body = vec![b'x'; 1 << 20];
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(&body).unwrap();
    let mut r = BufReader::new(&mut s);
    let (status, echoed, _) = common::load::read_response(&mut r).unwrap();
    assert_eq!(status, 200);
    assert!(echoed.as_bytes() == body, "the echoed body differs");
    // On the same connection: the instance sees the client's address added
    // to X-Forwarded-For, and none of the hop-by-hop headers.
    write!(
        r.get_mut(),
        "GET /headers HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 203.0.113.7\r\n\
         Connection: X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n\r\n"
    )
    .unwrap();
    let (status, seen, _) = common::load::read_response(&mut r).unwrap();
    assert_eq!(status, 200);
    let seen = seen.to_lowercase();
    assert!(
        seen.contains("x-forwarded-for: 203.0.113.7, 127.0.0.1\n"),
        "{seen}"
    );
    assert!(seen.contains("host: t\n"), "{seen}");
    assert!(
        !seen.contains("x-hop") && !seen.contains("keep-alive: timeout"),
        "{seen}"
    );
    // No instance ready (a new service's only one never gets healthy):
    // after queue_timeout, a 503 that says why.
    let dark = free_port();
    d.write_manifest(
        "dark",
        &web(
            dark,
            "http",
            1,
            "queue_timeout 500ms\nenv FAIL_HEALTH=1\nhealth_deadline 60s\n",
        ),
    );
    run(&d, &["apply", "dark", "--no-wait"], 0);
    wait_for("dark's port", LONG, || {
        TcpStream::connect(("127.0.0.1", dark)).is_ok()
    });
    let started = Instant::now();
    let (status, body) = http_get(dark, "/").unwrap();
    assert_eq!(status, 503);
    assert_eq!(body, "no instance is ready (waited 500ms)\n");
    assert!(started.elapsed() >= Duration::from_millis(450));
}

/// An upgraded connection (what WebSocket does) is tunnelled through, counts
/// as in flight on its instance, keeps working while the instance drains,
/// and is closed when the drain is over.
#[test]
fn upgraded_connections_are_tunnelled_and_drained() {
    let port = free_port();
    let Some(d) = Deployd::start_settled(&[("web", web(port, "http", 1, "drain 2s\n"))]) else {
        return;
    };
    let old_pid = d.instances("web")[0].1;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(
        b"GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed in the 101 head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let echo = |s: &mut TcpStream, msg: &[u8]| {
        s.write_all(msg).unwrap();
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg);
    };
    echo(&mut s, b"ping");
    wait_inflight(&d, "web", 1, "the tunnel to count in flight");
    d.write_manifest("web", &web(port, "http", 1, "drain 2s\nenv TAG=v2\n"));
    assert!(d.deploy(&["apply", "web", "--no-wait"]).status.success());
    wait_for("the old instance to drain", LONG, || {
        d.instances("web")
            .iter()
            .any(|i| i.1 == old_pid && i.2 == "draining")
    });
    // Still tunnelled while its instance drains.
    echo(&mut s, b"pong");
    let draining = Instant::now();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected the tunnel closed");
    let took = draining.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
    d.settle("web", LONG);
    assert!(!alive(old_pid));
}

/// `reexec`: deployd replaces itself (same pid, its binary run again) while
/// a client keeps sending requests on new connections: none fails, every
/// instance keeps running (same pids, output still logged), and what
/// follows works as before: a crash is restarted, a rollout rolls. During a
/// rollout `reexec` is refused.
#[test]
fn reexec_keeps_every_instance_and_loses_no_request() {
    let port = free_port();
    let worker = "exec while true; do echo tick; sleep 0.2; done\n".to_string();
    let Some(d) = Deployd::start_settled(&[("web", web(port, "http", 2, "")), ("worker", worker)])
    else {
        return;
    };
    d.settle("worker", LONG);
    let pids = |s: &str| d.instances(s).iter().map(|i| i.1).collect::<Vec<_>>();
    let (web_pids, worker_pids, deployd_pid) = (pids("web"), pids("worker"), d.pid());
    let load = Load::start(port, &[(Client::Fresh, 3)], "/");
    std::thread::sleep(Duration::from_millis(500));
    let out = d.sh("echo reexec > $ROOT/ctl");
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the namespace to come back", LONG, || {
        d.try_read("active/web/events").contains("kept running")
    });
    let during = load.counters.ok();
    std::thread::sleep(Duration::from_millis(500));
    assert!(load.counters.ok() > during, "no request after the reexec");
    assert_clean(load, 200);
    assert_eq!(d.pid(), deployd_pid);
    assert_eq!(pids("web"), web_pids);
    assert_eq!(pids("worker"), worker_pids);
    assert!(d.log().contains("replacing deployd with"), "{}", d.log());
    let events = d.read("active/web/events");
    assert!(
        events.contains("deployd replaced itself; instances 0, 1 kept running"),
        "{events}"
    );
    // Its output still reaches its log: read through the new deployd.
    let ticks = |d: &Deployd| d.read("active/worker/instances/0/log").lines().count();
    let before = ticks(&d);
    wait_for("more output", LONG, || ticks(&d) > before + 2);

    // A crash of an instance taken back is seen and restarted.
    let victim = web_pids[0];
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    wait_for("a replacement", LONG, || {
        let now = pids("web");
        now.len() == 2 && !now.contains(&victim)
    });
    d.settle("web", LONG);
    assert!(
        d.read("active/web/events")
            .contains("exited unexpectedly (killed by SIGKILL)"),
        "{}",
        d.read("active/web/events")
    );

    // The CLI does the same and waits for the new namespace.
    let out = run(&d, &["reexec"], 0);
    assert!(out.contains("deployd: back in "), "{out}");
    assert_eq!(d.pid(), deployd_pid);
    assert_eq!(pids("worker"), worker_pids);

    // A rollout still works, and reexec waits for its end.
    d.write_manifest(
        "web",
        &web(port, "http", 2, "env ROUND=2\nupdate_pause 30s\n"),
    );
    run(&d, &["apply", "web", "--no-wait"], 0);
    let out = d.sh("exec 3<>$ROOT/ctl; echo reexec >&3; echo \"status $?\"; cat <&3");
    assert_eq!(
        stdout(&out),
        "status 1\nerror: web: a rollout is in progress; reexec once it is over\n",
        "{}",
        stderr(&out)
    );
    assert_eq!(d.field("active/web/update_status"), "rolling");
    run(&d, &["rollback", "web"], 0);
    assert_eq!(d.pid(), deployd_pid);

    // What was deployd's stays deployd's: an instance started by the new
    // deployd does not see the handoff.
    let old = pids("worker")[0];
    unsafe { libc::kill(old as i32, libc::SIGKILL) };
    let mut new = 0;
    wait_for("worker 0 to be replaced", LONG, || {
        new = d
            .try_read("active/worker/instances/0/pid")
            .trim()
            .parse()
            .unwrap_or(0);
        new != 0 && new != old
    });
    let environ = std::fs::read(format!("/proc/{new}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(environ.contains("SERVICE=worker"), "{environ}");
    assert!(!environ.contains("DEPLOYD_HANDOFF"), "{environ}");
    assert!(!environ.contains("DEPLOYD_GUARD"), "{environ}");
}

/// `response_timeout`: a request whose instance does not start answering
/// in time gets a 504 from deployd; other requests are served.
#[test]
fn a_response_that_does_not_start_in_time_gets_a_504() {
    let port = free_port();
    let Some(d) = Deployd::start(&[("web", web(port, "http", 1, "response_timeout 500ms\n"))])
    else {
        return;
    };
    d.settle("web", LONG);
    let started = Instant::now();
    let (status, body) = http_get(port, "/slow?ms=3000").unwrap();
    let took = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert_eq!(
        body,
        "the instance did not answer within response_timeout 500ms\n"
    );
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    let (status, _) = http_get(port, "/slow?ms=100").unwrap();
    assert_eq!(status, 200);
    let traffic = d.read("active/web/traffic");
    assert!(traffic.contains("\nerrors 1\n"), "{traffic}");
}

/// `update_order stop-first` (no surge): under load, a rolling update of 3
/// loses no request, and never runs more than 3 instances, whatever
/// replaces them.
#[test]
fn a_stop_first_rolling_update_loses_nothing_and_never_surges() {
    let port = free_port();
    let o = "update_order stop-first\n";
    let Some(d) = Deployd::start_settled(&[("web", web(port, "http", 3, o))]) else {
        return;
    };
    // The count below sees the instances: three processes now.
    let mut pids: Vec<u32> = d.instances("web").iter().map(|i| i.1).collect();
    let mut children = live_children(d.pid());
    pids.sort_unstable();
    children.sort_unstable();
    assert_eq!(children, pids);
    let load = Load::start(port, &[(Client::KeepAlive, 3), (Client::Fresh, 3)], "/");
    std::thread::sleep(Duration::from_millis(300));
    d.write_manifest("web", &web(port, "http", 3, &format!("{o}env TAG=v2\n")));
    let out = d.deploy(&["apply", "web", "--no-wait"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut most = (0, Vec::new(), Vec::new());
    while d.try_read("active/web/update_status") == "rolling\n" {
        // The processes alive at one moment, as the kernel lists deployd's
        // children (a walk of instances/ reads a file at a time, and a busy
        // machine once stretched one over two batches, mixing them).
        let alive_now = live_children(d.pid());
        if alive_now.len() > most.0 {
            most = (alive_now.len(), alive_now, d.instances("web"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    d.settle("web", LONG);
    let events = d.read("active/web/events");
    // Nothing starts in a slot before what ran there is gone: not in the
    // rollout, nor when the restart policy replaces an instance its probes
    // found unhealthy meanwhile (a busy machine).
    assert!(
        most.0 <= 3,
        "{} instances at once (pids {:?}; then instances/ said {:?})\n{events}",
        most.0,
        most.1,
        most.2
    );
    assert!(
        events.contains("batch 1/3: stopping instance ")
            && events.contains("(3 instances, batch 1, stop first)"),
        "{events}"
    );
    assert_clean(load, 500);
}

/// `access_log on`: a line per request in the service's `access` file,
/// which `deploy logs SERVICE --access` prints.
#[test]
fn an_access_log_has_a_line_per_request() {
    let port = free_port();
    let Some(d) = Deployd::start_settled(&[("web", web(port, "http", 2, "access_log on\n"))])
    else {
        return;
    };
    for i in 0..5 {
        let (status, _) = http_get(port, &format!("/?n={i}")).unwrap();
        assert_eq!(status, 200);
    }
    let ports = instance_addrs(&d, "web");
    wait_for("five lines", LONG, || {
        d.try_read("active/web/access").lines().count() >= 5
    });
    let out = stdout(&d.deploy(&["logs", "web", "--access"]));
    assert_eq!(out, d.read("active/web/access"));
    for (i, line) in out.lines().enumerate() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 7, "{line}");
        assert_eq!(
            &f[1..5],
            ["127.0.0.1", "GET", &format!("/?n={i}"), "200"],
            "{line}"
        );
        assert!(ports.contains(&f[6].to_string()), "{line} {ports:?}");
    }
    assert!(
        d.read("active/web/traffic")
            .contains("\naccess_dropped 0\n")
    );
}

/// A port another program holds (the one deployd takes over from, still
/// running): the instances start, events and `traffic` say the port is
/// not served and why, and deployd takes it once it is let go.
#[test]
fn a_taken_port_is_said_and_taken_once_free() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port();
    let Some(d) = Deployd::start_settled(&[("web", web(port, "http", 1, ""))]) else {
        return;
    };
    let taken = format!("cannot listen on 127.0.0.1:{port}: Address already in use (os error 98)");
    let events = d.wait_events("web", &taken, 1);
    assert!(
        events.contains(&format!(
            "{taken}; trying again every 2s; the instances run, but nothing reaches them through port {port}"
        )),
        "{events}"
    );
    assert!(
        d.read("active/web/traffic")
            .contains(&format!("\nnot_listening {taken}\n")),
        "{}",
        d.read("active/web/traffic")
    );
    let out = d.deploy(&["status", "web"]);
    assert!(
        stdout(&out).contains(&format!("not listening: {taken}")),
        "{}",
        stdout(&out)
    );

    drop(holder);
    d.wait_events(
        "web",
        &format!("listening on 127.0.0.1:{port} (http) at last"),
        1,
    );
    let (status, body) = http_get(port, "/").expect("served once listening");
    assert_eq!(status, 200, "{body}");
    assert!(!d.read("active/web/traffic").contains("not_listening"));
    assert_eq!(d.read("active/web/events").matches(&taken).count(), 1);
}

/// A stopped service has no instance coming: a request is answered 503 at
/// once, saying so, rather than after `queue_timeout`; started again, it
/// is served.
#[test]
fn a_stopped_service_answers_at_once() {
    let port = free_port();
    let m = web(port, "http", 1, "queue_timeout 30s\n");
    let Some(d) = Deployd::start_settled(&[("web", m)]) else {
        return;
    };
    let out = d.deploy(&["stop", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let t0 = Instant::now();
    let (status, body) = http_get(port, "/").expect("answered");
    assert_eq!(
        (status, body.as_str()),
        (
            503,
            "the service is stopped: no instance serves it until it is started again\n"
        )
    );
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    let out = d.deploy(&["start", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.settle("web", LONG);
    let (status, _) = http_get(port, "/").expect("served");
    assert_eq!(status, 200);
}

/// A public port is one service's: `apply` of a second service on the port
/// of a first is refused at its `port` line, and so are `apply` of every
/// manifest with two on one port, `deploy check` of both files, and a
/// rollback to a version whose port another service took meanwhile; none
/// changes anything. Services applied together may trade ports.
#[test]
fn two_services_cannot_share_a_public_port() {
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let svc = |port: u16, tag: &str| web(port, "http", 1, &format!("env TAG={tag}\n"));
    let Some(d) = Deployd::start_settled(&[("web", svc(p1, "web"))]) else {
        return;
    };
    let refused = |out: &std::process::Output, want: &str| {
        let err = failed_with(out, 5);
        assert!(err.contains(want), "{err}");
    };
    let shared = "two services cannot share a public port";
    d.write_manifest("api", &svc(p1, "api"));
    refused(
        &d.deploy(&["apply", "api"]),
        &format!("api.manifest:5:6: port {p1}: already the port of web; {shared}"),
    );
    assert!(!d.path("active/api").exists());
    let out = d.sh("echo apply api > $ROOT/ctl");
    assert!(
        stderr(&out).contains("Invalid argument"),
        "{}",
        stderr(&out)
    );
    refused(
        &d.deploy(&["apply"]),
        &format!("port {p1}: also the port of "),
    );
    assert!(!d.path("active/api").exists());
    let file = |s: &str| {
        d.manifests
            .join(format!("{s}.manifest"))
            .display()
            .to_string()
    };
    let err = failed_with(&d.deploy(&["check", &file("web"), &file("api")]), 1);
    let want = format!("api.manifest:5:6: port {p1}: also the port of web; {shared}");
    assert!(err.contains(&want), "{err}");

    // api on p2, then on p3; web takes p2: api cannot go back to it.
    d.write_manifest("api", &svc(p2, "api"));
    assert!(d.deploy(&["apply", "api"]).status.success());
    d.write_manifest("api", &svc(p3, "api"));
    assert!(d.deploy(&["apply", "api"]).status.success());
    d.write_manifest("web", &svc(p2, "web"));
    assert!(d.deploy(&["apply", "web"]).status.success());
    let version = d.field("active/api/version");
    refused(
        &d.deploy(&["rollback", "api"]),
        &format!("listens on port {p2}, which is now the port of web; {shared}"),
    );
    assert_eq!(d.field("active/api/version"), version);

    // Traded in one apply: each listens once the other has let go.
    d.write_manifest("api", &svc(p2, "api"));
    d.write_manifest("web", &svc(p3, "web"));
    let out = d.deploy(&["apply"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (port, tag) in [(p2, "api"), (p3, "web")] {
        wait_for("the traded ports to serve", LONG, || {
            http_get(port, "/")
                .is_ok_and(|(status, body)| status == 200 && body.ends_with(&format!(" {tag}\n")))
        });
    }
}

/// Hooks: a `before_deploy` that exits 1 changes no instance, the rollout
/// fails and what it printed is readable; an `after_deploy` that exits 1
/// with `auto_rollback on` puts the previous version back, with no request
/// failed under load. Each hook gets the service's env, `VERSION`,
/// `PREVIOUS_VERSION` and `SERVICE`.
#[test]
fn hooks_run_around_a_rollout_and_a_failing_one_fails_it() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let base = |extra: &str| {
        web(
            port,
            "http",
            3,
            &format!("update_pause 200ms\nauto_rollback on\nenv GREETING=hi\n{extra}"),
        )
    };
    let Some(d) = Deployd::start_settled(&[("web", base("env TAG=v1\n"))]) else {
        return;
    };
    let v1 = d.field("active/web/version");
    let pids: Vec<u32> = d.instances("web").iter().map(|i| i.1).collect();
    // A failing migration: nothing changes.
    d.write_manifest(
        "web",
        &base("env TAG=v2\nbefore_deploy echo migrating $SERVICE to $VERSION; echo no database >&2; exit 1\n"),
    );
    let out = d.deploy(&["apply", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        said.contains("web: before_deploy: running echo migrating")
            && said.contains("web: before_deploy printed: no database")
            && said
                .contains("web: failed: before_deploy failed: exit status 1; no instance changed")
            && said.contains("deploy logs web --hooks"),
        "{said}"
    );
    assert_eq!(d.field("active/web/update_status"), "failed");
    let now: Vec<u32> = d.instances("web").iter().map(|i| i.1).collect();
    assert_eq!(now, pids);
    let logs = stdout(&d.deploy(&["logs", "web", "--hooks"]));
    let v2 = d.field("active/web/version");
    assert!(
        logs.contains(&format!("before_deploy of {v2}: echo migrating"))
            && logs.contains(&format!("migrating web to {v2}"))
            && logs.contains("no database"),
        "{logs}"
    );
    // Back to v1 (its manifest again), then a smoke test that fails after
    // the rollout, under load: rolled back, nothing failed.
    d.write_manifest("web", &base("env TAG=v1\n"));
    let out = d.deploy(&["apply", "web"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(d.field("active/web/version"), v1);
    let load = Load::start(port, &[(Client::KeepAlive, 2), (Client::Fresh, 2)], "/");
    std::thread::sleep(Duration::from_millis(300));
    d.write_manifest(
        "web",
        &base(&format!(
            "env TAG=v3\nafter_deploy echo $GREETING $PREVIOUS_VERSION $VERSION > {}; exit 1\n",
            seen.display()
        )),
    );
    let out = d.deploy(&["apply", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        said.contains("web: after_deploy: running echo")
            && said.contains(&format!(
                "after_deploy failed: exit status 1; rolled back to {v1}"
            )),
        "{said}"
    );
    d.settle("web", LONG);
    assert_eq!(d.field("active/web/version"), v1);
    let counters = load.finish();
    assert_eq!(counters.failed(), 0, "{:?}", counters.errors.lock());
    // The hook saw the service's env and both versions.
    let hook_saw = std::fs::read_to_string(&seen).unwrap();
    let words: Vec<&str> = hook_saw.split_whitespace().collect();
    assert!(
        words.len() == 3 && words[0] == "hi" && words[1] == v1 && words[2] != v1,
        "{hook_saw}"
    );
}

/// `health notify`: an instance is ready when it says `READY=1` on
/// `NOTIFY_SOCKET` (sd_notify), not before, with no request failed under
/// load; one that never says it fails the rollout at `health_deadline`;
/// one that stops its `WATCHDOG=1` pings is replaced. `STATUS=` is shown.
#[test]
fn health_notify_readiness_from_the_program_and_its_watchdog() {
    let port = free_port();
    let m = |extra: &str| {
        web(port, "http", 2, &format!("health_deadline 10s\n{extra}"))
            .replace("health http /healthz", "health notify")
    };
    let Some(d) = Deployd::start_settled(&[("web", m("env READY_AFTER_MS=100\n"))]) else {
        return;
    };
    assert_eq!(d.field("active/web/instances/0/status"), "serving");
    // Ready two seconds after it started, and routed in only then.
    let load = Load::start(port, &[(Client::KeepAlive, 2), (Client::Fresh, 2)], "/");
    std::thread::sleep(Duration::from_millis(300));
    d.write_manifest("web", &m("env READY_AFTER_MS=2000\nenv TAG=v2\n"));
    let out = d.deploy(&["apply", "web"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let counters = load.finish();
    assert_eq!(counters.failed(), 0, "{:?}", counters.errors.lock());
    assert!(counters.ok() > 100, "{}", counters.ok());
    let events = d.read("active/web/events");
    let healthy: Vec<f64> = events
        .lines()
        .filter_map(|l| l.split(" healthy (").nth(1))
        .filter_map(|t| t.trim_end_matches("s)").parse().ok())
        .collect();
    // The two new ones (the first two were v1's, after 0.1 s).
    assert!(healthy.len() >= 4, "{events}");
    assert!(
        healthy[healthy.len() - 2..].iter().all(|t| *t >= 2.0),
        "{events}"
    );
    assert_eq!(d.field("active/web/instances/1/status"), "serving");
    // Never ready: fails at health_deadline, saying why.
    d.write_manifest(
        "web",
        &m("env READY_AFTER_MS=never\nenv TAG=v3\n")
            .replace("health_deadline 10s", "health_deadline 2s"),
    );
    let out = d.deploy(&["apply", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("no READY=1 on NOTIFY_SOCKET yet (health notify)"),
        "{}",
        stderr(&out)
    );
    // A watchdog that stops: the instance is replaced.
    d.write_manifest(
        "web",
        &m("env READY_AFTER_MS=100\nenv WATCHDOG_FOR_MS=1500\nwatchdog 1s\nenv TAG=v4\n"),
    );
    let out = d.deploy(&["apply", "web"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let pids: Vec<u32> = d.instances("web").iter().map(|i| i.1).collect();
    let events = d.wait_events("web", "no WATCHDOG=1 within watchdog 1s", 1);
    assert!(events.contains("unhealthy"), "{events}");
    // Replaced: a new process in its slot.
    wait_for("an instance replaced", Duration::from_secs(20), || {
        d.instances("web")
            .iter()
            .any(|i| i.1 != 0 && !pids.contains(&i.1))
    });
    // Readiness from the program, liveness from a probe: a ready program
    // whose liveness probe fails is not healthy.
    d.settle("web", LONG);
    d.write_manifest(
        "web",
        &m("env READY_AFTER_MS=100\nliveness http /healthz\nenv FAIL_HEALTH=1\n")
            .replace("health_deadline 10s", "health_deadline 2s"),
    );
    let out = d.deploy(&["apply", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("HTTP 500"), "{}", stderr(&out));
}
