use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::Strategy as Gen;

use super::Strategy;
use super::*;

fn ok(src: &str) -> Manifest {
    match parse(src.as_bytes()) {
        Ok(m) => m,
        Err(d) => panic!("{src:?} should parse, got {d:?}"),
    }
}

/// The diagnostics of `src` as `line:col: message` strings.
fn errors(src: &str) -> Vec<String> {
    match parse(src.as_bytes()) {
        Ok(m) => panic!("{src:?} should fail, parsed to {m:?}"),
        Err(d) => d
            .iter()
            .map(|d| format!("{}:{}: {}", d.line, d.col, d.message))
            .collect(),
    }
}

fn error(src: &str) -> String {
    let e = errors(src);
    assert_eq!(e.len(), 1, "{src:?} should have one error, got {e:?}");
    e[0].clone()
}

#[test]
fn minimal_manifest_takes_every_default() {
    let m = ok("exec ./app\n");
    assert_eq!(m, Manifest::new("./app"));
    assert_eq!(m.replicas, 1);
    assert_eq!(m.health, Health::None);
    assert_eq!(m.health_interval, Duration::from_secs(1));
    assert_eq!(m.health_timeout, Duration::from_secs(1));
    assert_eq!(m.health_retries, 3);
    assert_eq!(m.health_grace, Duration::ZERO);
    assert_eq!(m.health_deadline, Duration::from_secs(30));
    assert_eq!(m.min_healthy, Duration::ZERO);
    assert_eq!(m.update, Strategy::Rolling);
    assert_eq!(m.update_batch, 1);
    assert_eq!(m.update_pause, Duration::ZERO);
    assert!(!m.auto_rollback);
    assert_eq!(m.restart, RestartPolicy::Always);
    assert_eq!(m.stop_signal, Signal::Term);
    assert_eq!(m.stop_timeout, Duration::from_secs(10));
    assert_eq!(m.drain, Duration::from_secs(5));
    assert_eq!(m.queue_timeout, Duration::from_secs(10));
    assert_eq!(m.proxy, Proxy::Tcp);
}

#[test]
fn every_directive_sets_its_field() {
    let m = ok("\
exec exec ./server --port $PORT   # the shell sees this comment
dir  app/current
env GREETING=hello world
env A_1=x=y
replicas 3
port 8080
proxy tcp
health http /healthz?full=1
health_interval 500ms
health_timeout 2s
health_retries 5
health_grace 3
health_deadline 1m
min_healthy 10s
update replace
update_batch 2
update_pause 1h
auto_rollback on
restart on-failure
stop_signal INT
stop_timeout 20s
drain 0
queue_timeout 3s
");
    let c = ok("exec a\nreplicas 3\nupdate_canary 1\n");
    assert_eq!(c.update_canary, 1);
    assert!(c.canonical().contains("update_canary 1\n"));
    assert_eq!(
        error("exec a\nreplicas 2\nupdate_canary 3\n"),
        "3:15: update_canary must be at most replicas (2), got 3"
    );
    assert_eq!(
        error("exec a\nreplicas 2\nupdate replace\nupdate_canary 1\n"),
        "4:15: update_canary is for update rolling (replace replaces every instance at once)"
    );
    assert!(error("exec a\nupdate_canary 0\n").starts_with("2:15: update_canary must be"));
    let h = ok(
        "exec a\nbefore_deploy ./migrate --up\nafter_deploy curl -fs localhost/x\nhook_timeout 1m\n",
    );
    assert_eq!(h.before_deploy.as_deref(), Some("./migrate --up"));
    assert_eq!(h.after_deploy.as_deref(), Some("curl -fs localhost/x"));
    assert_eq!(h.hook_timeout, Duration::from_secs(60));
    assert!(h.canonical().contains(
        "before_deploy ./migrate --up\nafter_deploy curl -fs localhost/x\nhook_timeout 1m\n"
    ));
    assert_eq!(ok("exec a\n").hook_timeout, Duration::from_secs(300));
    assert!(error("exec a\nhook_timeout 0s\n").contains("hook_timeout must be more than 0"));
    let n = ok("exec a\nport 80\nhealth notify\nliveness http /alive\nwatchdog 10s\n");
    assert_eq!(n.health, Health::Notify);
    assert_eq!(
        n.liveness,
        Some(Health::Http {
            path: "/alive".into()
        })
    );
    assert_eq!(n.watchdog, Duration::from_secs(10));
    assert!(
        n.canonical()
            .contains("health notify\nliveness http /alive\nwatchdog 10s\n")
    );
    assert_eq!(
        error("exec a\nport 80\nliveness tcp\n"),
        "3:10: liveness is for health notify (the program says it is ready; liveness says it is still alive)"
    );
    assert!(error("exec a\nhealth notify\nliveness none\n").contains("liveness needs one of"));
    let w = ok("exec a\nupdate_watch 5m\n");
    assert_eq!(w.update_watch, Duration::from_secs(300));
    assert!(w.canonical().contains("update_watch 5m\n"));
    let c = ok("exec a\nreplicas 3\nupdate_canary 1\nupdate_canary_auto 10m\n");
    assert_eq!(c.update_canary_auto, Duration::from_secs(600));
    assert!(
        c.canonical()
            .contains("update_canary 1\nupdate_canary_auto 10m\n")
    );
    assert_eq!(
        error("exec a\nreplicas 3\nupdate_canary_auto 10m\n"),
        "3:20: update_canary_auto needs update_canary N (the canaries it promotes)"
    );
    let o = ok("exec a\nreplicas 3\nupdate_order stop-first\n");
    assert_eq!(o.update_order, UpdateOrder::StopFirst);
    assert!(o.canonical().contains("update_order stop-first\n"));
    assert_eq!(
        ok("exec a\nupdate_order start-first\n"),
        ok("exec a\n"),
        "start-first is the default"
    );
    assert_eq!(
        error("exec a\nupdate replace\nupdate_order stop-first\n"),
        "3:14: update_order is for update rolling (replace stops every old instance first)"
    );
    assert!(
        error("exec a\nupdate_order stopfirst\n").contains("(did you mean 'stop-first'?)"),
        "{}",
        error("exec a\nupdate_order stopfirst\n")
    );
    let a = ok("exec a\nport 80\nproxy http\naccess_log on\n");
    assert!(a.access_log && a.canonical().ends_with("access_log on\n"));
    assert_eq!(ok("exec a\naccess_log off\n"), ok("exec a\n"));
    // A tcp port logs its connections.
    assert!(ok("exec a\nport 80\nproxy tcp\naccess_log on\n").access_log);
    assert_eq!(
        error("exec a\naccess_log on\n"),
        "2:12: access_log needs a port (it logs what deployd routes)"
    );
    let r = ok("exec a\nport 80\nhealth http /\nresponse_timeout 30s\n");
    assert_eq!(r.response_timeout, Some(Duration::from_secs(30)));
    assert!(r.canonical().ends_with("response_timeout 30s\n"));
    assert_eq!(ok("exec a\n").response_timeout, None);
    assert_eq!(
        error("exec a\nport 80\nproxy http\nresponse_timeout 0\n"),
        "4:18: response_timeout must be longer than 0"
    );
    assert_eq!(
        error("exec a\nport 80\nresponse_timeout 5s\n"),
        "3:18: response_timeout is for a port with proxy http (a tcp connection has no response to wait for)"
    );
    assert_eq!(
        m.exec,
        "exec ./server --port $PORT   # the shell sees this comment"
    );
    assert_eq!(m.dir.as_deref(), Some("app/current"));
    assert_eq!(
        m.env,
        vec![
            ("A_1".to_string(), "x=y".to_string()),
            ("GREETING".to_string(), "hello world".to_string())
        ]
    );
    assert_eq!(m.replicas, 3);
    assert_eq!(m.port, Some(8080));
    assert_eq!(m.proxy, Proxy::Tcp);
    assert_eq!(
        m.health,
        Health::Http {
            path: "/healthz?full=1".into()
        }
    );
    assert_eq!(m.health_interval, Duration::from_millis(500));
    assert_eq!(m.health_timeout, Duration::from_secs(2));
    assert_eq!(m.health_retries, 5);
    assert_eq!(m.health_grace, Duration::from_secs(3));
    assert_eq!(m.health_deadline, Duration::from_secs(60));
    assert_eq!(m.min_healthy, Duration::from_secs(10));
    assert_eq!(m.update, Strategy::Replace);
    assert_eq!(m.update_batch, 2);
    assert_eq!(m.update_pause, Duration::from_secs(3600));
    assert!(m.auto_rollback);
    assert_eq!(m.restart, RestartPolicy::OnFailure);
    assert_eq!(m.stop_signal, Signal::Int);
    assert_eq!(m.stop_timeout, Duration::from_secs(20));
    assert_eq!(m.drain, Duration::ZERO);
    assert_eq!(m.queue_timeout, Duration::from_secs(3));
}

#[test]
fn health_forms_and_their_defaults() {
    assert_eq!(ok("exec a\nport 80\n").health, Health::Tcp);
    assert_eq!(ok("exec a\nport 80\nhealth none\n").health, Health::None);
    assert_eq!(ok("exec a\nhealth tcp\n").health, Health::Tcp);
    assert_eq!(
        ok("exec a\nhealth exec  curl -fs localhost:$PORT/ # shell comment \n").health,
        Health::Exec {
            command: "curl -fs localhost:$PORT/ # shell comment".into()
        }
    );
    // The proxy follows the probe unless set.
    assert_eq!(ok("exec a\nport 80\nhealth http /\n").proxy, Proxy::Http);
    assert_eq!(ok("exec a\nport 80\n").proxy, Proxy::Tcp);
    assert_eq!(
        ok("exec a\nport 80\nhealth http /\nproxy tcp\n").proxy,
        Proxy::Tcp
    );
}

/// A probe says when an instance works; without one, having run a second
/// does (less with a short health_deadline, more with min_healthy), and
/// the version is that of the text, as before.
#[test]
fn ready_after_is_min_healthy_or_a_second_of_running() {
    let s = Duration::from_secs;
    let ready = |src: &str| ok(src).ready_after();
    assert_eq!(ready("exec a\nport 80\n"), Duration::ZERO);
    assert_eq!(ready("exec a\nhealth http /\nmin_healthy 3s\n"), s(3));
    assert_eq!(ready("exec a\n"), s(1));
    assert_eq!(ready("exec a\nmin_healthy 0\n"), s(1));
    assert_eq!(ready("exec a\nmin_healthy 5s\n"), s(5));
    assert_eq!(
        ready("exec a\nhealth_deadline 600ms\n"),
        Duration::from_millis(300)
    );
    assert_eq!(ok("exec a\n").canonical(), "exec a\n");
}

#[test]
fn restart_and_signal_spellings() {
    for (word, policy) in [
        ("always", RestartPolicy::Always),
        ("on-failure", RestartPolicy::OnFailure),
        ("never", RestartPolicy::Never),
    ] {
        assert_eq!(ok(&format!("exec a\nrestart {word}\n")).restart, policy);
    }
    for (signal, name) in Signal::ALL {
        assert_eq!(
            ok(&format!("exec a\nstop_signal {name}\n")).stop_signal,
            signal
        );
        assert_eq!(
            ok(&format!("exec a\nstop_signal SIG{name}\n")).stop_signal,
            signal
        );
        assert_eq!(signal.name(), name);
    }
    assert_eq!(Signal::Term.number(), 15);
    assert_eq!(Signal::Kill.number(), 9);
    assert!(!ok("exec a\nauto_rollback off\n").auto_rollback);
}

#[test]
fn duration_forms() {
    for (text, ms) in [
        ("10", 10_000),
        ("10s", 10_000),
        ("500ms", 500),
        ("2m", 120_000),
        ("1h", 3_600_000),
        ("0", 0),
        ("0ms", 0),
        ("86400", 86_400_000),
    ] {
        let m = ok(&format!("exec a\nupdate_pause {text}\n"));
        assert_eq!(m.update_pause, Duration::from_millis(ms), "{text}");
    }
    for (d, text) in [
        (Duration::ZERO, "0s"),
        (Duration::from_millis(1500), "1500ms"),
        (Duration::from_secs(90), "90s"),
        (Duration::from_secs(120), "2m"),
        (Duration::from_secs(7200), "2h"),
    ] {
        assert_eq!(format_duration(d), text);
    }
}

#[test]
fn blank_lines_comments_indentation_and_crlf_are_ignored() {
    let m = ok("\r\n# a comment\n   \n\texec ./app\r\n  replicas   2   # two\r\n#\n");
    assert_eq!(m.exec, "./app");
    assert_eq!(m.replicas, 2);
}

#[test]
fn a_byte_order_mark_first_is_not_part_of_the_text() {
    let src = "\u{feff}exec ./app\r\nreplicas 2\r\nport 80\r\n";
    let m = ok(src);
    assert_eq!((m.exec.as_str(), m.replicas), ("./app", 2));
    assert_eq!(position_of(src, "port"), [(3, 6)]);
    // Only first: anywhere else it is a character like any other.
    assert_eq!(
        error("exec ./app\n\u{feff}replicas 2\n"),
        "2:1: unknown directive '\u{feff}replicas' (did you mean 'replicas'?)"
    );
}

#[test]
fn unknown_directive_suggests_the_closest() {
    assert_eq!(
        error("exec a\n\n\n\n\n\nupdate_bach 1\n"),
        "7:1: unknown directive 'update_bach' (did you mean 'update_batch'?)"
    );
    assert_eq!(
        error("exec a\n  Replicas 2\n"),
        "2:3: unknown directive 'Replicas' (did you mean 'replicas'?)"
    );
    assert_eq!(
        error("exec a\nfrobnicate yes\n"),
        "2:1: unknown directive 'frobnicate'"
    );
}

#[test]
fn number_errors() {
    assert_eq!(
        error("exec a\n\nreplicas 0\n"),
        "3:10: replicas must be between 1 and 1000, got 0"
    );
    assert_eq!(
        error("exec a\nreplicas 1001\n"),
        "2:10: replicas must be between 1 and 1000, got 1001"
    );
    assert_eq!(
        error("exec a\nreplicas 99999999999999999999999\n"),
        "2:10: replicas must be between 1 and 1000, got 99999999999999999999999"
    );
    assert_eq!(
        error("exec a\nreplicas three\n"),
        "2:10: replicas needs a number, got 'three'"
    );
    assert_eq!(
        error("exec a\nreplicas -1\n"),
        "2:10: replicas needs a number, got '-1'"
    );
    assert_eq!(error("exec a\nreplicas\n"), "2:9: replicas needs a number");
    assert_eq!(
        error("exec a\nreplicas # none\n"),
        "2:10: replicas needs a number"
    );
    assert_eq!(
        error("exec a\nreplicas 3 4\n"),
        "2:12: unexpected '4' after the value of replicas"
    );
    assert_eq!(
        error("exec a\nport 65536\n"),
        "2:6: port must be between 1 and 65535, got 65536"
    );
    assert_eq!(
        error("exec a\nhealth_retries 0\n"),
        "2:16: health_retries must be between 1 and 100, got 0"
    );
}

#[test]
fn duration_errors() {
    assert_eq!(
        error("exec a\nupdate_pause 10x\n"),
        "2:14: update_pause needs a duration like 10, 10s, 500ms, 2m, 1h or 1d, got '10x'"
    );
    assert_eq!(
        error("exec a\ndrain 1.5s\n"),
        "2:7: drain needs a duration like 10, 10s, 500ms, 2m, 1h or 1d, got '1.5s'"
    );
    assert_eq!(
        error("exec a\ndrain\n"),
        "2:6: drain needs a duration like 10, 10s, 500ms, 2m, 1h or 1d"
    );
    assert_eq!(
        error("exec a\nstop_timeout 25h\n"),
        "2:14: stop_timeout must be at most 24h, got 25h"
    );
    assert_eq!(
        error("exec a\nstop_timeout 99999999999999999999h\n"),
        "2:14: stop_timeout must be at most 24h, got 99999999999999999999h"
    );
    assert_eq!(
        error("exec a\nhealth_interval 5ms\n"),
        "2:17: health_interval must be at least 10ms, got 5ms"
    );
    assert_eq!(
        error("exec a\nhealth_timeout 0\n"),
        "2:16: health_timeout must be longer than 0"
    );
    assert_eq!(
        error("exec a\nhealth_deadline 0\n"),
        "2:17: health_deadline must be longer than 0"
    );
    assert_eq!(
        error("exec a\nmin_healthy 40s\n"),
        "2:13: min_healthy (40s) must be shorter than health_deadline (30s)"
    );
    // A deadline longer than the default min_healthy (0) is fine.
    assert_eq!(
        ok("exec a\nhealth_deadline 5s\n").health_deadline,
        Duration::from_secs(5)
    );
}

#[test]
fn keyword_errors() {
    assert_eq!(
        error("exec a\nupdate rolin\n"),
        "2:8: update must be 'rolling' or 'replace', got 'rolin' (did you mean 'rolling'?)"
    );
    assert_eq!(
        error("exec a\nauto_rollback yes\n"),
        "2:15: auto_rollback must be 'on' or 'off', got 'yes'"
    );
    assert_eq!(
        error("exec a\nrestart on_failure\n"),
        "2:9: restart must be 'always', 'on-failure' or 'never', got 'on_failure' (did you mean 'on-failure'?)"
    );
    assert_eq!(
        error("exec a\nstop_signal TREM\n"),
        "2:13: unknown stop_signal 'TREM' (did you mean 'TERM'?); expected 'TERM', 'INT', 'QUIT', 'HUP', 'USR1', 'USR2' or 'KILL'"
    );
    assert_eq!(
        error("exec a\nstop_signal 9\n"),
        "2:13: unknown stop_signal '9'; expected 'TERM', 'INT', 'QUIT', 'HUP', 'USR1', 'USR2' or 'KILL'"
    );
    assert_eq!(
        error("exec a\nport 80\nproxy udp\n"),
        "3:7: proxy must be 'http' or 'tcp', got 'udp'"
    );
    assert_eq!(
        error("exec a\nproxy http\n"),
        "2:7: proxy needs a port to serve"
    );
}

#[test]
fn health_errors() {
    assert_eq!(
        error("exec a\nhealth\n"),
        "2:7: health needs one of: http PATH, tcp, exec CMDLINE, notify, none"
    );
    assert_eq!(
        error("exec a\nhealth htp /\n"),
        "2:8: unknown health check 'htp' (did you mean 'http'?); expected one of: http PATH, tcp, exec CMDLINE, notify, none"
    );
    assert_eq!(
        error("exec a\nhealth http\n"),
        "2:8: health http needs a path, e.g. health http /healthz"
    );
    assert_eq!(
        error("exec a\nhealth http healthz\n"),
        "2:13: health http path must start with '/', got 'healthz'"
    );
    assert_eq!(
        error("exec a\nhealth http / extra\n"),
        "2:15: unexpected 'extra' after the value of health"
    );
    assert_eq!(
        error("exec a\nhealth exec   \n"),
        "2:8: health exec needs a command line"
    );
    assert_eq!(
        error("exec a\nhealth tcp now\n"),
        "2:12: unexpected 'now' after the value of health"
    );
}

#[test]
fn hosts_is_a_sorted_list_of_host_names_never_empty() {
    let m = ok("exec a\nhosts h3 h1.example h3 # not h2\n");
    let names: Vec<&str> = m.hosts.iter().map(|h| h.as_str()).collect();
    assert_eq!(names, ["h1.example", "h3"]);
    assert!(m.canonical().contains("hosts h1.example h3\n"));
    assert_eq!(ok(&m.canonical()), m);
    assert!(ok("exec a\n").hosts.is_empty());
    assert_ne!(ok("exec a\nhosts h1\n").version(), ok("exec a\n").version());
    assert_eq!(
        error("exec a\nhosts\n"),
        "2:6: hosts needs one or more host names (leave it out for any host)"
    );
    assert!(
        error("exec a\nhosts h1 ../h2\n").starts_with("2:10: hosts: '../h2' is not a host name"),
        "{}",
        error("exec a\nhosts h1 ../h2\n")
    );
}

#[test]
fn max_connections_and_trusted_proxies() {
    let m = ok("exec a\nport 80\nhealth http /\nmax_connections 500\n\
                trusted_proxies 10.1.2.3/8 ::1 127.0.0.1 10.0.0.0/8 # lb\n");
    assert_eq!(m.max_connections, Some(500));
    let list: Vec<String> = m.trusted_proxies.iter().map(|c| c.to_string()).collect();
    // Sorted, the host bits cleared, duplicates gone.
    assert_eq!(list, ["10.0.0.0/8", "127.0.0.1", "::1"]);
    assert!(
        m.canonical()
            .contains("max_connections 500\ntrusted_proxies 10.0.0.0/8 127.0.0.1 ::1\n")
    );
    assert_eq!(ok(&m.canonical()), m);
    let c = &m.trusted_proxies[0];
    assert!(c.contains("10.200.0.1".parse().unwrap()));
    assert!(c.contains("::ffff:10.200.0.1".parse().unwrap()));
    assert!(!c.contains("11.0.0.1".parse().unwrap()));
    assert!(m.trusted_proxies[2].contains("::1".parse().unwrap()));
    let all: crate::manifest::Cidr = "0.0.0.0/0".parse().unwrap();
    assert!(all.contains("8.8.8.8".parse().unwrap()));
    assert_eq!(
        error("exec a\nport 80\nhealth http /\ntrusted_proxies 10.0.0.0/33\n"),
        "4:17: trusted_proxies: '/33' is not a prefix length from 0 to 32"
    );
    assert_eq!(
        error("exec a\nport 80\nhealth http /\ntrusted_proxies\n"),
        "4:16: trusted_proxies needs one or more addresses or blocks, like 10.0.0.0/8 ::1"
    );
    assert_eq!(
        error("exec a\nport 80\ntrusted_proxies ::1\n"),
        "3:17: trusted_proxies is for a port with proxy http (it says whose X-Forwarded-For to keep)"
    );
    assert_eq!(
        error("exec a\nmax_connections 0\n"),
        "2:17: max_connections must be between 1 and 10000000, got 0"
    );
    assert_eq!(
        error("exec a\nmax_connections 5\n"),
        "2:17: max_connections needs a port (it limits the port's connections)"
    );
}

#[test]
fn control_characters_are_refused_where_they_are() {
    // A NUL passed check and apply, and the instance could never start:
    // execve takes C strings.
    assert_eq!(
        error("exec a\nenv A=x\0y\n"),
        "2:8: control character U+0000 is not allowed"
    );
    assert_eq!(
        error("exec a\nhealth http /a\x1b[31m\n"),
        "2:15: control character U+001B is not allowed"
    );
    // A tab is a blank, as ever.
    assert_eq!(ok("exec\ta\tb\n").exec, "a\tb");
}

#[test]
fn exec_dir_and_env_errors() {
    assert_eq!(error("exec   \n"), "1:5: exec needs a command line");
    assert_eq!(error("exec a\ndir\n"), "2:4: dir needs a path");
    assert_eq!(
        error("exec a\nenv FOO\n"),
        "2:5: env needs KEY=VALUE, got 'FOO'"
    );
    assert_eq!(
        error("exec a\nenv 1X=2\n"),
        "2:5: env key '1X' must be letters, digits and '_', not starting with a digit"
    );
    assert_eq!(
        error("exec a\nenv PORT=80\n"),
        "2:5: env PORT is set by deployd for each instance"
    );
    assert_eq!(
        error("exec a\nenv A=1\nenv A=2\n"),
        "3:1: env A given twice (first on line 2)"
    );
    // An empty value is allowed.
    assert_eq!(
        ok("exec a\nenv A=\n").env,
        vec![("A".into(), String::new())]
    );
}

#[test]
fn user_forms_and_errors() {
    let u = |u: &str, g: Option<&str>| {
        Some(User {
            user: u.into(),
            group: g.map(str::to_string),
        })
    };
    assert_eq!(ok("exec a\n").user, None);
    assert_eq!(ok("exec a\nuser www-data\n").user, u("www-data", None));
    assert_eq!(
        ok("exec a\nuser app:web  # why\n").user,
        u("app", Some("web"))
    );
    assert_eq!(ok("exec a\nuser 1000:1000\n").user, u("1000", Some("1000")));
    assert_eq!(ok("exec a\nuser svc.app_1\n").user, u("svc.app_1", None));
    assert_eq!(
        error("exec a\nuser\n"),
        "2:5: user needs a user, or user:group (names or numeric ids)"
    );
    let both = "needs a name or id on each side of ':'";
    assert_eq!(
        error("exec a\nuser app:\n"),
        format!("2:6: user {both}, got 'app:'")
    );
    assert_eq!(
        error("exec a\nuser :web\n"),
        format!("2:6: user {both}, got ':web'")
    );
    let names = "names are letters, digits, '.', '_' and '-', not starting with '-', at most 32";
    assert_eq!(
        error("exec a\nuser a:b:c\n"),
        format!("2:6: user {names}, got 'a:b:c'")
    );
    assert_eq!(
        error("exec a\nuser -x\n"),
        format!("2:6: user {names}, got '-x'")
    );
    assert_eq!(
        error("exec a\nuser ../x\n"),
        format!("2:6: user {names}, got '../x'")
    );
    assert_eq!(
        error(&format!("exec a\nuser {}\n", "a".repeat(33))),
        format!("2:6: user {names}, got '{}'", "a".repeat(33))
    );
    assert_eq!(
        error("exec a\nuser 4294967295\n"),
        "2:6: user ids must be below 4294967295, got '4294967295'"
    );
    assert_eq!(
        error("exec a\nuser a b\n"),
        "2:8: unexpected 'b' after the value of user"
    );
    assert_eq!(
        error("exec a\nuser a\nuser b\n"),
        "3:1: user given twice (first on line 2)"
    );
}

#[test]
fn env_files_keep_their_order_and_may_not_repeat() {
    let m = ok("exec a\nenv_file common.env\nenv_file /etc/web/secrets.env\n");
    assert_eq!(m.env_files, ["common.env", "/etc/web/secrets.env"]);
    assert!(
        m.canonical()
            .contains("env_file common.env\nenv_file /etc/web/secrets.env\n")
    );
    let swapped = ok("exec a\nenv_file /etc/web/secrets.env\nenv_file common.env\n");
    assert_ne!(
        m.version(),
        swapped.version(),
        "order decides which file wins"
    );
    assert_eq!(error("exec a\nenv_file\n"), "2:9: env_file needs a path");
    assert_eq!(
        error("exec a\nenv_file x.env\nenv_file x.env\n"),
        "3:1: env_file x.env given twice (first on line 2)"
    );
}

#[test]
fn memory_high_forms_and_errors() {
    assert_eq!(ok("exec a\n").memory_high, None);
    assert_eq!(
        ok("exec a\nmemory_high 512M\n").memory_high,
        Some(512 << 20)
    );
    assert_eq!(
        ok("exec a\nmemory_high 1G  # one\n").memory_high,
        Some(1 << 30)
    );
    assert_eq!(
        ok("exec a\nmemory_high 1536K\n").memory_high,
        Some(1536 << 10)
    );
    assert_eq!(ok("exec a\nmemory_high 1T\n").memory_high, Some(1 << 40));
    assert_eq!(
        ok("exec a\nmemory_high 2097152\n").memory_high,
        Some(2 << 20)
    );
    // Canonical: the largest exact unit.
    assert!(
        ok("exec a\nmemory_high 2048M\n")
            .canonical()
            .contains("memory_high 2G\n")
    );
    assert!(
        ok("exec a\nmemory_high 1536K\n")
            .canonical()
            .contains("memory_high 1536K\n")
    );
    assert!(
        ok("exec a\nmemory_high 1048577\n")
            .canonical()
            .contains("memory_high 1048577\n")
    );
    let what = "memory_high needs a size like 512M, 1G or 1536K";
    assert_eq!(error("exec a\nmemory_high\n"), format!("2:12: {what}"));
    assert_eq!(
        error("exec a\nmemory_high 512MB\n"),
        format!("2:13: {what}, got '512MB'")
    );
    assert_eq!(
        error("exec a\nmemory_high 1.5G\n"),
        format!("2:13: {what}, got '1.5G'")
    );
    assert_eq!(
        error("exec a\nmemory_high -1\n"),
        format!("2:13: {what}, got '-1'")
    );
    let range = "memory_high must be between 1M and 1T";
    assert_eq!(
        error("exec a\nmemory_high 1000K\n"),
        format!("2:13: {range}, got 1000K")
    );
    assert_eq!(
        error("exec a\nmemory_high 2T\n"),
        format!("2:13: {range}, got 2T")
    );
    assert_eq!(
        error("exec a\nmemory_high 99999999999999999999G\n"),
        format!("2:13: {range}, got 99999999999999999999G")
    );
}

#[test]
fn log_max_forms_and_errors() {
    assert_eq!(ok("exec a\n").log_max, 1 << 20);
    assert_eq!(ok("exec a\nlog_max 100M\n").log_max, 100 << 20);
    assert!(
        !ok("exec a\nlog_max 1M\n").canonical().contains("log_max"),
        "the default"
    );
    assert_eq!(
        error("exec a\nlog_max 1K\n"),
        "2:9: log_max must be between 64K and 1T, got 1K"
    );
    assert_eq!(ok("exec a\n").log_rate, 8 << 20);
    assert_eq!(ok("exec a\nlog_rate 64K\n").log_rate, 64 << 10);
    assert!(!ok("exec a\nlog_rate 8M\n").canonical().contains("log_rate"));
    assert_eq!(
        ok("exec a\nlog_rate 1G\n").canonical(),
        "exec a\nlog_rate 1G\n"
    );
    assert_eq!(
        error("exec a\nlog_rate 10\n"),
        "2:10: log_rate must be between 64K and 1T, got 10"
    );
}

#[test]
fn position_of_finds_a_directives_value() {
    let src = "# web\nexec a\n\n   user   nobody\r\nreplicas 2\nenv_file a\nenv_file  b\n";
    assert_eq!(position_of(src, "user"), [(4, 11)]);
    assert_eq!(position_of(src, "replicas"), [(5, 10)]);
    assert_eq!(position_of(src, "env_file"), [(6, 10), (7, 11)]);
    assert_eq!(position_of(src, "port"), []);
}

#[test]
fn repeated_directive() {
    assert_eq!(
        error("exec a\nreplicas 2\n\n  replicas 3\n"),
        "4:3: replicas given twice (first on line 2)"
    );
    assert_eq!(
        error("exec a\nexec b\n"),
        "2:1: exec given twice (first on line 1)"
    );
}

#[test]
fn missing_exec() {
    assert_eq!(
        error("replicas 2\n"),
        "1:1: missing exec: every manifest needs an exec line"
    );
    assert_eq!(
        error(""),
        "1:1: missing exec: every manifest needs an exec line"
    );
}

#[test]
fn batch_larger_than_replicas() {
    assert_eq!(
        error("exec a\nreplicas 3\nupdate_batch 5\n"),
        "3:14: update_batch must be at most replicas (3), got 5"
    );
    assert_eq!(
        error("exec a\nupdate_batch 2\n"),
        "2:14: update_batch must be at most replicas (1), got 2"
    );
}

/// `update_batch P%`: of `replicas`, rounded up (at least one), whichever
/// line comes first; the version is that of the number it comes to.
#[test]
fn batch_as_a_percentage_of_replicas() {
    let batch = |src: &str| ok(src).update_batch;
    assert_eq!(batch("exec a\nreplicas 10\nupdate_batch 25%\n"), 3);
    assert_eq!(batch("exec a\nupdate_batch 25%\nreplicas 10\n"), 3);
    assert_eq!(batch("exec a\nreplicas 4\nupdate_batch 50%\n"), 2);
    assert_eq!(batch("exec a\nreplicas 3\nupdate_batch 1%\n"), 1);
    assert_eq!(batch("exec a\nreplicas 3\nupdate_batch 100%\n"), 3);
    assert_eq!(batch("exec a\nupdate_batch 50%\n"), 1);
    assert_eq!(
        ok("exec a\nreplicas 4\nupdate_batch 50%\n").version(),
        ok("exec a\nreplicas 4\nupdate_batch 2\n").version()
    );
    for bad in ["0%", "101%", "%", "5.5%", "-5%", "+5%", "50%%"] {
        assert_eq!(
            error(&format!("exec a\nreplicas 4\nupdate_batch {bad}\n")),
            format!(
                "3:14: update_batch must be a number or a percentage from 1% to 100%, got '{bad}'"
            ),
            "{bad}"
        );
    }
}

#[test]
fn non_utf8_and_long_lines() {
    let mut src = b"exec a\nenv A=caf".to_vec();
    src.extend_from_slice(&[0xff, b'\n']);
    let d = parse(&src).unwrap_err();
    assert_eq!(d.len(), 1);
    assert_eq!(
        (d[0].line, d[0].col, d[0].message.as_str()),
        (2, 10, "invalid UTF-8")
    );

    let long = format!("exec a\nenv A={}\n", "x".repeat(MAX_LINE));
    assert_eq!(
        error(&long),
        format!(
            "2:1: line is {} bytes long; the limit is 4096",
            MAX_LINE + 6
        )
    );

    let huge = vec![b'#'; MAX_SIZE + 1];
    let d = parse(&huge).unwrap_err();
    assert_eq!(
        d[0].message,
        format!(
            "manifest is {} bytes; the limit is {MAX_SIZE}",
            MAX_SIZE + 1
        )
    );
}

#[test]
fn all_errors_of_a_file_are_reported_in_line_order() {
    let e = errors("replicas 0\nupdate_bach 1\nstop_signal TREM\ndrain 5y\n");
    assert_eq!(
        e,
        vec![
            "1:1: missing exec: every manifest needs an exec line",
            "1:10: replicas must be between 1 and 1000, got 0",
            "2:1: unknown directive 'update_bach' (did you mean 'update_batch'?)",
            "3:13: unknown stop_signal 'TREM' (did you mean 'TERM'?); expected 'TERM', 'INT', 'QUIT', 'HUP', 'USR1', 'USR2' or 'KILL'",
            "4:7: drain needs a duration like 10, 10s, 500ms, 2m, 1h or 1d, got '5y'",
        ]
    );
}

#[test]
fn columns_count_characters() {
    assert_eq!(
        error("exec é\n# é\nenv É=1\n"),
        "3:5: env key 'É' must be letters, digits and '_', not starting with a digit"
    );
    assert_eq!(
        error("exec a\n\treplicas\tx\n"),
        "2:11: replicas needs a number, got 'x'"
    );
}

#[test]
fn diagnostics_render_with_the_file_name() {
    let d = parse(b"exec a\nreplicas 0\n").unwrap_err();
    assert_eq!(
        d[0].display("web.manifest").to_string(),
        "web.manifest:2:10: replicas must be between 1 and 1000, got 0"
    );
}

#[test]
fn version_ignores_comments_spacing_order_and_explicit_defaults() {
    let a = ok("exec ./app\nreplicas 3\nenv A=1\nenv B=2\nport 80\n");
    let b = ok("# web\n\n   exec ./app   \nenv B=2\n  env A=1\nport   80 # public\nreplicas 3\n\n");
    let c = ok(
        "exec ./app\nreplicas 3\nenv A=1\nenv B=2\nport 80\nhealth tcp\nupdate rolling\nupdate_batch 1\ndrain 5s\nstop_timeout 10\nhealth_interval 1000ms\nproxy tcp\n",
    );
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_eq!(a.version(), b.version());
    assert_eq!(a.version(), c.version());
    assert_eq!(a.version().to_string().len(), 12);
}

#[test]
fn version_changes_with_every_semantic_change() {
    let base = "exec ./app\nreplicas 3\nport 80\n";
    let v = ok(base).version();
    let changes = [
        "exec ./app2\nreplicas 3\nport 80\n",
        "exec ./app\nreplicas 4\nport 80\n",
        "exec ./app\nreplicas 3\nport 81\n",
        "exec ./app\nreplicas 3\n",
        "exec ./app\nreplicas 3\nport 80\ndir x\n",
        "exec ./app\nreplicas 3\nport 80\nenv A=1\n",
        "exec ./app\nreplicas 3\nport 80\nuser nobody\n",
        "exec ./app\nreplicas 3\nport 80\nmemory_high 512M\n",
        "exec ./app\nreplicas 3\nport 80\nenv_file web.env\n",
        "exec ./app\nreplicas 3\nport 80\nlog_max 10M\n",
        "exec ./app\nreplicas 3\nport 80\nuser nobody:nogroup\n",
        "exec ./app\nreplicas 3\nport 80\nproxy http\n",
        "exec ./app\nreplicas 3\nport 80\nhealth none\n",
        "exec ./app\nreplicas 3\nport 80\nhealth http /\n",
        "exec ./app\nreplicas 3\nport 80\nhealth exec true\n",
        "exec ./app\nreplicas 3\nport 80\nhealth_interval 2s\n",
        "exec ./app\nreplicas 3\nport 80\nhealth_timeout 2s\n",
        "exec ./app\nreplicas 3\nport 80\nhealth_retries 4\n",
        "exec ./app\nreplicas 3\nport 80\nhealth_grace 1s\n",
        "exec ./app\nreplicas 3\nport 80\nhealth_deadline 31s\n",
        "exec ./app\nreplicas 3\nport 80\nmin_healthy 1s\n",
        "exec ./app\nreplicas 3\nport 80\nupdate replace\n",
        "exec ./app\nreplicas 3\nport 80\nupdate_batch 2\n",
        "exec ./app\nreplicas 3\nport 80\nupdate_pause 1s\n",
        "exec ./app\nreplicas 3\nport 80\nauto_rollback on\n",
        "exec ./app\nreplicas 3\nport 80\nrestart never\n",
        "exec ./app\nreplicas 3\nport 80\nstop_signal INT\n",
        "exec ./app\nreplicas 3\nport 80\nstop_timeout 11s\n",
        "exec ./app\nreplicas 3\nport 80\ndrain 6s\n",
        "exec ./app\nreplicas 3\nport 80\nqueue_timeout 6s\n",
    ];
    let mut seen = std::collections::HashSet::new();
    seen.insert(v);
    for c in changes {
        let w = ok(c).version();
        assert!(seen.insert(w), "{c:?} should have a version of its own");
    }
}

#[test]
fn version_text_round_trips() {
    let v = ok("exec a\n").version();
    assert_eq!(v.to_string().parse::<Version>(), Ok(v));
    assert!("xyz".parse::<Version>().is_err());
    assert!("ABCDEF012345".parse::<Version>().is_err());
    assert!("+bcdef012345".parse::<Version>().is_err());
}

#[test]
fn after_names_services_one_per_line_in_any_order() {
    let m = ok("exec a\nafter db\nafter cache\n");
    let names: Vec<&str> = m.after.iter().map(|s| s.as_str()).collect();
    assert_eq!(names, ["cache", "db"]);
    assert!(m.canonical().contains("after cache\nafter db\n"));
    assert_eq!(
        m.version(),
        ok("exec a\nafter cache\nafter db\n").version(),
        "the order of after lines means nothing"
    );
    assert_ne!(m.version(), ok("exec a\nafter db\n").version());
    assert_eq!(
        error("exec a\nafter\n"),
        "2:6: after needs a service (one per line)"
    );
    assert_eq!(
        error("exec a\nafter db cache\n"),
        "2:10: unexpected 'cache' after the value of after"
    );
    assert!(
        error("exec a\nafter ../db\n").starts_with("2:7: after '../db' is not a service name"),
        "{}",
        error("exec a\nafter ../db\n")
    );
    assert_eq!(
        error("exec a\nafter db\nafter db\n"),
        "3:1: after db given twice (first on line 2)"
    );
    assert_eq!(
        error("exec a\naftr db\n"),
        "2:1: unknown directive 'aftr' (did you mean 'after'?)"
    );
}

#[test]
fn a_manifest_cannot_wait_for_itself() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("web.manifest");
    std::fs::write(&path, "exec a\nafter db\n  after   web # no\n").unwrap();
    let e = load(&path).unwrap_err().to_string();
    assert!(
        e.ends_with("web.manifest:3:11: after web: a service cannot wait for itself"),
        "{e}"
    );
    std::fs::write(&path, "exec a\nafter db\n").unwrap();
    assert!(load(&path).is_ok());
}

#[test]
fn a_file_that_is_not_a_manifest_says_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("web.manifest");
    let not_found = |e: &LoadError| {
        matches!(
            e,
            LoadError::Io {
                not_found: true,
                ..
            }
        )
    };
    let e = load(&path).unwrap_err();
    assert!(not_found(&e), "{e}");
    let gone = dir.path().join("gone");
    std::os::unix::fs::symlink(&gone, &path).unwrap();
    let e = load(&path).unwrap_err();
    assert!(not_found(&e), "{e}");
    let says = format!(
        "web.manifest: a link to {}, which does not exist",
        gone.display()
    );
    assert!(e.to_string().ends_with(&says), "{e}");
    let sub = dir.path().join("api.manifest");
    std::fs::create_dir(&sub).unwrap();
    let e = load(&sub).unwrap_err().to_string();
    assert!(e.ends_with("api.manifest: is a directory"), "{e}");
}

#[test]
fn same_but_replicas_is_a_scale() {
    let a = ok("exec a\nreplicas 2\n");
    assert!(a.same_but_replicas(&ok("exec a\nreplicas 5\n")));
    assert!(a.same_but_replicas(&ok("exec a\nreplicas 5\nafter db\n")));
    assert!(!a.same_but_replicas(&ok("exec b\nreplicas 5\n")));
    assert!(!a.same_but_replicas(&ok("exec a\nreplicas 5\nupdate_pause 1\n")));
}

#[test]
fn service_of_checks_the_file_name() {
    use std::path::Path;
    assert_eq!(
        service_of(Path::new("dir/web.manifest")).unwrap().as_str(),
        "web"
    );
    assert_eq!(
        service_of(Path::new("web.txt")).unwrap_err(),
        "file name 'web.txt' must end in .manifest"
    );
    assert!(
        service_of(Path::new("Web.manifest"))
            .unwrap_err()
            .contains("is not a service name")
    );
}

// ---- properties ----

fn duration_strategy() -> impl Gen<Value = Duration> {
    prop_oneof![
        (0u64..100_000).prop_map(Duration::from_millis),
        (0u64..86_400).prop_map(Duration::from_secs),
        (0u64..1440).prop_map(|m| Duration::from_secs(m * 60)),
    ]
}

fn text_strategy() -> impl Gen<Value = String> {
    // Printable text that does not start or end with a blank and has no newline.
    "[!-~]([ -~]{0,30}[!-~])?"
}

fn manifest_strategy() -> impl Gen<Value = Manifest> {
    let health = prop_oneof![
        Just(Health::None),
        Just(Health::Tcp),
        "/[!-~]{0,20}".prop_map(|path| Health::Http { path }),
        text_strategy().prop_map(|command| Health::Exec { command }),
    ];
    let env = proptest::collection::btree_map("[A-Z_][A-Z0-9_]{0,8}", "[ -~]{0,20}", 0..4)
        .prop_map(|m| {
            m.into_iter()
                .filter(|(k, _)| {
                    !["HOST", "PORT", "SERVICE", "INSTANCE", "VERSION"].contains(&k.as_str())
                })
                .map(|(k, v)| (k, v.trim_end().to_string()))
                .collect::<Vec<_>>()
        });
    (
        (
            text_strategy(),
            proptest::option::of(text_strategy()),
            env,
            1u32..=MAX_REPLICAS,
            proptest::collection::btree_set(text_strategy(), 0..3),
            proptest::option::of((
                "[a-z_][a-z0-9._-]{0,31}|[0-9]{1,9}",
                proptest::option::of("[a-z_][a-z0-9._-]{0,31}|[0-9]{1,9}"),
            )),
        ),
        (
            proptest::option::of(1u16..),
            prop_oneof![Just(Proxy::Http), Just(Proxy::Tcp)],
            health,
        ),
        (
            duration_strategy(),
            duration_strategy(),
            1u32..=MAX_RETRIES,
            duration_strategy(),
        ),
        (
            1u64..86_400_000,
            any::<prop::sample::Index>(),
            any::<bool>(),
            duration_strategy(),
        ),
        (
            any::<bool>(),
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
            duration_strategy(),
            duration_strategy(),
            duration_strategy(),
        ),
        (
            any::<prop::sample::Index>(),
            proptest::option::of(MIN_MEMORY..=MAX_MEMORY),
            MIN_LOG..=MAX_LOG,
            proptest::collection::btree_set("[a-z0-9][a-z0-9-]{0,62}", 0..3),
        ),
    )
        .prop_map(|(a, b, c, d, e, (batch, memory_high, log_max, after))| {
            let (exec, dir, env, replicas, env_files, user) = a;
            let (port, proxy, health) = b;
            let (interval, timeout, retries, grace) = c;
            let (deadline_ms, min_healthy_ix, replace, pause) = d;
            let (rollback, restart_ix, signal_ix, stop_timeout, drain, queue) = e;
            let mut m = Manifest::new(exec);
            m.dir = dir;
            m.env = env;
            m.user = user.map(|(user, group)| User { user, group });
            m.env_files = env_files.into_iter().collect();
            m.after = after
                .iter()
                .filter_map(|s| crate::name::ServiceName::new(s).ok())
                .collect();
            m.replicas = replicas;
            m.port = port;
            // A proxy is only meaningful (and allowed) with a port.
            m.health = health;
            m.proxy = if port.is_some() {
                proxy
            } else {
                Proxy::default_for(&m.health)
            };
            m.health_interval = interval.max(MIN_HEALTH_INTERVAL);
            m.health_timeout = timeout.max(Duration::from_millis(1));
            m.health_retries = retries;
            m.health_grace = grace;
            m.health_deadline = Duration::from_millis(deadline_ms);
            m.min_healthy =
                Duration::from_millis(min_healthy_ix.index(deadline_ms as usize) as u64);
            m.update = if replace {
                Strategy::Replace
            } else {
                Strategy::Rolling
            };
            m.update_batch = batch.index(replicas as usize) as u32 + 1;
            if !replace && rollback {
                m.update_order = UpdateOrder::StopFirst;
                m.update_canary = m.update_batch;
                m.update_canary_auto = pause;
            }
            m.update_pause = pause;
            m.update_watch = pause;
            m.auto_rollback = rollback;
            m.restart = [
                RestartPolicy::Always,
                RestartPolicy::OnFailure,
                RestartPolicy::Never,
            ][restart_ix.index(3)];
            m.stop_signal = Signal::ALL[signal_ix.index(Signal::ALL.len())].0;
            m.stop_timeout = stop_timeout;
            m.drain = drain;
            m.queue_timeout = queue;
            m.memory_high = memory_high;
            m.log_max = log_max;
            // Only with proxy http, and never 0.
            m.response_timeout =
                (m.port.is_some() && m.proxy == Proxy::Http && !queue.is_zero()).then_some(queue);
            m.access_log = m.port.is_some() && rollback;
            m
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn canonical_parses_back_to_the_same_manifest(m in manifest_strategy()) {
        let text = m.canonical();
        let back = parse(text.as_bytes());
        prop_assert_eq!(back.as_ref(), Ok(&m), "canonical text:\n{}", text);
        // Canonical form is a fixed point.
        prop_assert_eq!(back.map(|b| b.canonical()), Ok(text));
    }

    #[test]
    fn arbitrary_bytes_never_panic(src in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse(&src);
    }

    #[test]
    fn arbitrary_directive_soup_never_panics(
        lines in proptest::collection::vec(
            (
                prop::sample::select(vec![
                    "exec", "dir", "env", "env_file", "user", "replicas", "port", "proxy", "health", "health_interval",
                    "health_timeout", "health_retries", "health_grace", "health_deadline",
                    "min_healthy", "update", "update_batch", "update_pause", "auto_rollback",
                    "restart", "stop_signal", "stop_timeout", "memory_high", "log_max", "log_rate", "drain", "queue_timeout", "response_timeout", "after", "update_order", "update_canary", "update_canary_auto", "update_watch", "before_deploy", "after_deploy", "hook_timeout", "access_log", "#", "",
                ]),
                "[ \t]{0,2}",
                "[ -~\t]{0,12}",
            ),
            0..20,
        )
    ) {
        let src: String = lines
            .iter()
            .map(|(d, ws, v)| format!("{ws}{d} {v}\n"))
            .collect();
        match parse(src.as_bytes()) {
            Ok(m) => {
                // Whatever parses has a canonical form that parses back to it.
                prop_assert_eq!(parse(m.canonical().as_bytes()), Ok(m));
            }
            Err(d) => {
                prop_assert!(!d.is_empty());
                for diag in d {
                    prop_assert!(diag.line >= 1 && diag.col >= 1);
                }
            }
        }
    }
}

#[test]
fn a_duration_for_the_command_line() {
    use super::parse_duration;
    assert_eq!(
        parse_duration("--timeout", "5m"),
        Ok(Duration::from_secs(300))
    );
    assert_eq!(
        parse_duration("--timeout", "90"),
        Ok(Duration::from_secs(90))
    );
    assert_eq!(
        parse_duration("--timeout", "1.5s"),
        Err("--timeout needs a duration like 10, 10s, 500ms, 2m, 1h or 1d, got '1.5s'".into())
    );
    assert_eq!(
        parse_duration("--timeout", ""),
        Err("--timeout needs a duration like 10, 10s, 500ms, 2m, 1h or 1d".into())
    );
    assert_eq!(
        parse_duration("--timeout", "25h"),
        Err("--timeout must be at most 24h, got 25h".into())
    );
    // One grammar for every duration: days too, and no bound for a span.
    assert_eq!(
        parse_duration("--timeout", "1d"),
        Ok(Duration::from_secs(86_400))
    );
    assert_eq!(
        parse_span("--since", "30d"),
        Ok(Duration::from_secs(30 * 86_400))
    );
    assert_eq!(
        parse_span("--since", "500ms"),
        Ok(Duration::from_millis(500))
    );
    assert_eq!(parse_span("--since", "45"), Ok(Duration::from_secs(45)));
    assert!(parse_span("--since", "99999999999999999999d").is_err());
    assert!(parse_span("--since", "1w").is_err());
}

#[test]
fn a_port_is_one_services() {
    let n = |s: &str| ServiceName::new(s).unwrap();
    let (web, api, db) = (n("web"), n("api"), n("db"));
    let services = [(&web, Some(8080)), (&db, None), (&api, Some(8080))];
    assert_eq!(super::shared_ports(services), vec![(&api, 8080, &web)]);
    let apart = [(&web, Some(8080)), (&api, Some(8081)), (&db, None)];
    assert!(super::shared_ports(apart).is_empty());
}

/// The kernel's limits: `memory_max` a size, `cpu_max` cores with up to two
/// decimals, `pids_max` a count; each shown back as written and part of
/// the version; errors located and worded.
#[test]
fn hard_limits_forms_and_errors() {
    let m = ok("exec a\nmemory_max 64M\ncpu_max 0.5\npids_max 50\n");
    assert_eq!(
        (m.memory_max, m.cpu_max, m.pids_max),
        (Some(64 << 20), Some(50), Some(50))
    );
    assert!(m.has_limits());
    assert!(!ok("exec a\nmemory_high 64M\n").has_limits());
    for (text, hundredths) in [
        ("1.5", 150),
        ("2", 200),
        ("0.01", 1),
        ("1.25", 125),
        ("1024", 102_400),
    ] {
        assert_eq!(
            ok(&format!("exec a\ncpu_max {text}\n")).cpu_max,
            Some(hundredths)
        );
        assert_eq!(format_cores(hundredths), text);
    }
    let canonical = m.canonical();
    for line in ["memory_max 64M\n", "cpu_max 0.5\n", "pids_max 50\n"] {
        assert!(canonical.contains(line), "{canonical}");
    }
    assert_ne!(
        m.version(),
        ok("exec a\nmemory_max 64M\ncpu_max 0.5\n").version()
    );
    let what = "cpu_max needs a number of cores like 0.5, 1.5 or 2";
    assert_eq!(
        error("exec a\ncpu_max 1.555\n"),
        format!("2:9: {what}, got '1.555'")
    );
    assert_eq!(
        error("exec a\ncpu_max half\n"),
        format!("2:9: {what}, got 'half'")
    );
    assert_eq!(
        error("exec a\ncpu_max .5\n"),
        format!("2:9: {what}, got '.5'")
    );
    assert_eq!(
        error("exec a\ncpu_max 0\n"),
        "2:9: cpu_max must be between 0.01 and 1024 cores, got 0"
    );
    assert_eq!(
        error("exec a\ncpu_max 2000\n"),
        "2:9: cpu_max must be between 0.01 and 1024 cores, got 2000"
    );
    assert_eq!(
        error("exec a\npids_max 0\n"),
        "2:10: pids_max must be between 1 and 4194304, got 0"
    );
    assert_eq!(
        error("exec a\nmemory_max 10K\n"),
        "2:12: memory_max must be between 1M and 1T, got 10K"
    );
}
