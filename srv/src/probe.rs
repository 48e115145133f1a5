//! Health probes. One task per instance runs its manifest's probe and sends
//! every result to the engine, which owns what they mean (grace, retries,
//! deadlines: see `deployd_lib::rollout`).
//!
//! A probe that deployd could not run for a shortage of its own (no
//! descriptor for the socket, no memory to fork the command) is no result:
//! it is reported apart ([`Failure::Deployd`]) and never reaches the state
//! machine, so a deployd short of descriptors never replaces a healthy
//! instance.
//!
//! Until an instance is first healthy it is probed every [`STARTING_HTTP`]
//! (every [`FIRST_HTTP`] over its first [`FIRST_FOR`]; [`STARTING_EXEC`]
//! for exec probes), or `health_interval` if shorter, so a rollout learns
//! of a new instance's health within milliseconds instead of waiting out
//! a whole interval.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deployd_lib::host::{self, Account};
use deployd_lib::manifest::{Health, User};
use deployd_lib::rollout::Exit;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};

use crate::process::{self, Children, Spawn, Waiter};

/// Probe period of a starting instance, for http and tcp probes: a refused
/// connect costs microseconds, and a rollout waits for this at every batch.
pub const STARTING_HTTP: Duration = Duration::from_millis(5);
/// Probe period of an http or tcp probe over a starting instance's first
/// [`FIRST_FOR`]: most programs that start fast are ready within it, and
/// a rollout waits half a period on average for each batch (8 ms a batch
/// of one with 5 ms, 4.5 ms with 1 ms, in `bench/run rollout`); a program
/// slower to start is not knocked at a thousand times a second for long.
pub const FIRST_HTTP: Duration = Duration::from_millis(1);
/// How long a starting instance is probed every [`FIRST_HTTP`].
pub const FIRST_FOR: Duration = Duration::from_millis(250);
/// Probe period of a starting instance, for exec probes.
pub const STARTING_EXEC: Duration = Duration::from_millis(100);

/// Why a probe did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The instance failed it (refused, a 503, a non-zero exit, a timeout).
    Instance(String),
    /// deployd could not run it: what it is short of.
    Deployd(String),
}

impl From<&str> for Failure {
    fn from(s: &str) -> Failure {
        Failure::Instance(s.to_string())
    }
}

impl From<String> for Failure {
    fn from(s: String) -> Failure {
        Failure::Instance(s)
    }
}

/// What one instance's prober needs.
pub struct Target {
    /// The probe.
    pub health: Health,
    /// The instance's `$HOST`: where it listens.
    pub ip: std::net::IpAddr,
    /// The instance's `$PORT`.
    pub port: Option<u16>,
    /// Time between probes.
    pub interval: Duration,
    /// Limit of one probe.
    pub timeout: Duration,
    /// For exec probes: working directory and environment of the instance.
    pub dir: PathBuf,
    /// For exec probes.
    pub env: Vec<(String, String)>,
    /// For exec probes: the instance's `user`.
    pub user: Option<User>,
    /// With `health notify`: what the program said, its `liveness` probe
    /// and its `watchdog`.
    pub notify: Option<(Arc<crate::notify::State>, Option<Health>, Duration)>,
}

/// Probes forever, sending each result through `report`, and each probe
/// deployd could not run through `short`; `poke` asks for a probe now (the
/// proxy failed to connect). Cancelled by aborting the task.
pub async fn run(
    target: Target,
    children: Children,
    poke: Arc<Notify>,
    report: impl Fn(Result<(), String>),
    short: impl Fn(String),
) {
    // An exec probe's account, looked up once per instance (as its process
    // was started), not at every probe.
    let liveness = target.notify.as_ref().and_then(|(_, l, _)| l.as_ref());
    let account = match liveness.unwrap_or(&target.health) {
        Health::Exec { .. } => target.user.as_ref().map(host::lookup),
        _ => None,
    };
    let starting = match target.health {
        Health::Exec { .. } => STARTING_EXEC,
        // READY=1 asks for a probe at once (poke): no need to poll for it.
        Health::Notify => target.interval,
        _ => STARTING_HTTP,
    };
    let fast = matches!(target.health, Health::Http { .. } | Health::Tcp);
    let since = tokio::time::Instant::now();
    let mut healthy_once = false;
    // Before an instance is first healthy, its failures only matter for
    // the reason given if it misses its deadline: a failure like the last
    // one is reported once per health_interval, not at every fast probe.
    let mut last_failure: Option<(String, tokio::time::Instant)> = None;
    loop {
        let result = match probe(&target, account.as_ref(), &children).await {
            Ok(()) => Ok(()),
            Err(Failure::Instance(e)) => Err(e),
            Err(Failure::Deployd(why)) => {
                short(why);
                // Tried again at the instance's interval, not faster.
                tokio::select! {
                    _ = tokio::time::sleep(target.interval) => {}
                    _ = poke.notified() => {}
                }
                continue;
            }
        };
        healthy_once |= result.is_ok();
        let repeat = match (&result, &last_failure) {
            (Err(e), Some((last, at))) => {
                !healthy_once && e == last && at.elapsed() < target.interval
            }
            _ => false,
        };
        if !repeat {
            if let Err(e) = &result {
                last_failure = Some((e.clone(), tokio::time::Instant::now()));
            }
            report(result);
        }
        let period = if healthy_once {
            target.interval
        } else if fast && since.elapsed() < FIRST_FOR {
            FIRST_HTTP.min(target.interval)
        } else {
            starting.min(target.interval)
        };
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = poke.notified() => {}
        }
    }
}

/// Runs one probe; an exec probe runs as `account`, the lookup of the
/// instance's `user` (`None`: deployd's own account).
pub async fn probe(
    target: &Target,
    account: Option<&Result<Account, String>>,
    children: &Children,
) -> Result<(), Failure> {
    if let (Health::Notify, Some((state, liveness, watchdog))) = (&target.health, &target.notify) {
        state.check(*watchdog).map_err(Failure::Instance)?;
        return match liveness {
            Some(h) => check(h, target, account, children).await,
            None => Ok(()),
        };
    }
    check(&target.health, target, account, children).await
}

/// Runs one check of `health` on the instance.
async fn check(
    health: &Health,
    target: &Target,
    account: Option<&Result<Account, String>>,
    children: &Children,
) -> Result<(), Failure> {
    let work = async {
        match (health, target.port) {
            (Health::None | Health::Notify, _) => Ok(()),
            (Health::Tcp, Some(port)) => tcp(target.ip, port).await.map(|_| ()),
            (Health::Http { path }, Some(port)) => http(target.ip, port, path).await,
            (Health::Exec { command }, _) => {
                let account = account
                    .map(Result::as_ref)
                    .transpose()
                    .map_err(|e| Failure::Instance(e.clone()))?;
                exec(command, target, account, children).await
            }
            (_, None) => Err("the instance has no port".into()),
        }
    };
    match tokio::time::timeout(target.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Instance(format!(
            "timed out after {}",
            deployd_lib::manifest::format_duration(target.timeout)
        ))),
    }
}

async fn tcp(ip: std::net::IpAddr, port: u16) -> Result<TcpStream, Failure> {
    TcpStream::connect((ip, port))
        .await
        .map_err(|e| match crate::short::describe(&e) {
            Some(why) => Failure::Deployd(why),
            None if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                "connection refused".into()
            }
            None => e.to_string().into(),
        })
}

/// GET `path`; a 2xx status line is healthy. Only the status line is read.
async fn http(ip: std::net::IpAddr, port: u16, path: &str) -> Result<(), Failure> {
    let mut s = tcp(ip, port).await?;
    let host = std::net::SocketAddr::new(ip, port);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: deployd-probe\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| Failure::Instance(e.to_string()))?;
    let mut buf = [0u8; 256];
    let mut len = 0;
    while len < 12 {
        match s.read(&mut buf[len..]).await {
            Ok(0) => return Err("connection closed before a response".into()),
            Ok(n) => len += n,
            Err(e) => return Err(e.to_string().into()),
        }
    }
    let line = String::from_utf8_lossy(&buf[..len]);
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| Failure::from("not an HTTP response"))?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP {status}").into())
    }
}

async fn exec(
    command: &str,
    target: &Target,
    account: Option<&Account>,
    children: &Children,
) -> Result<(), Failure> {
    let pid = process::spawn(Spawn {
        command,
        dir: &target.dir,
        env: target.env.clone(),
        output: None,
        account,
        limits: Default::default(),
    })
    .map_err(|e| match crate::short::describe(&e) {
        Some(why) => Failure::Deployd(why),
        None => format!("cannot run the probe: {e}").into(),
    })?;
    let (tx, rx) = oneshot::channel();
    children.watch(pid, Waiter::Channel(tx));
    // Killed with its group if the probe times out (the future is dropped).
    let guard = KillOnDrop(pid);
    let exit = rx.await.map_err(|_| Failure::from("probe lost"))?;
    std::mem::forget(guard);
    match exit {
        Exit::Code(0) => Ok(()),
        other => Err(format!("probe command: {other}").into()),
    }
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        process::signal_group(self.0, libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn target(health: Health, port: Option<u16>) -> Target {
        Target {
            ip: std::net::IpAddr::from([127, 0, 0, 1]),
            health,
            port,
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            dir: PathBuf::from("/"),
            env: vec![],
            user: None,
            notify: None,
        }
    }

    /// A one-shot HTTP server answering `status`.
    async fn server(status: &'static str) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        port
    }

    #[tokio::test]
    async fn notify_passes_once_ready_and_then_asks_its_liveness_probe() {
        let children = Children::default();
        let bad = server("500 Internal Server Error").await;
        let state = Arc::new(crate::notify::State::default());
        let mut t = target(Health::Notify, Some(bad));
        t.notify = Some((state.clone(), None, Duration::ZERO));
        assert_eq!(
            probe(&t, None, &children).await,
            Err("no READY=1 on NOTIFY_SOCKET yet (health notify)".into())
        );
        crate::notify::take(&state, "READY=1");
        assert_eq!(probe(&t, None, &children).await, Ok(()));
        // With a liveness probe, it decides once the program is ready.
        let liveness = Health::Http { path: "/".into() };
        t.notify = Some((state, Some(liveness), Duration::ZERO));
        assert_eq!(probe(&t, None, &children).await, Err("HTTP 500".into()));
    }

    #[tokio::test]
    async fn http_probe_reads_the_status() {
        let children = Children::default();
        let ok = server("204 No Content").await;
        let bad = server("503 Service Unavailable").await;
        let h = Health::Http {
            path: "/healthz".into(),
        };
        assert_eq!(
            probe(&target(h.clone(), Some(ok)), None, &children).await,
            Ok(())
        );
        assert_eq!(
            probe(&target(h.clone(), Some(bad)), None, &children).await,
            Err("HTTP 503".into())
        );
        // Nothing listens on a port we just freed.
        let free = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert_eq!(
            probe(&target(h, Some(free)), None, &children).await,
            Err("connection refused".into())
        );
    }

    #[tokio::test]
    async fn http_probe_times_out_on_a_silent_server() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let _keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let mut t = target(Health::Http { path: "/".into() }, Some(port));
        t.timeout = Duration::from_millis(100);
        assert_eq!(
            probe(&t, None, &Children::default()).await,
            Err("timed out after 100ms".into())
        );
    }

    #[tokio::test]
    async fn tcp_probe() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(
            probe(&target(Health::Tcp, Some(port)), None, &Children::default()).await,
            Ok(())
        );
        // A port bound and not listening: refused. (A port merely let go
        // could be taken by a parallel test, or be connected to itself.)
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = held.local_addr().unwrap().port();
        assert!(
            probe(&target(Health::Tcp, Some(port)), None, &Children::default())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn exec_probe_uses_the_exit_status_and_the_environment() {
        let children = Children::default();
        let reaper = tokio::spawn(children.clone().run_reaper());
        let mut t = target(
            Health::Exec {
                command: "test \"$PORT\" = 4242".into(),
            },
            Some(4242),
        );
        t.env = vec![("PORT".into(), "4242".into())];
        assert_eq!(probe(&t, None, &children).await, Ok(()));
        t.health = Health::Exec {
            command: "exit 3".into(),
        };
        assert_eq!(
            probe(&t, None, &children).await,
            Err("probe command: exit status 3".into())
        );
        t.health = Health::Exec {
            command: "sleep 5".into(),
        };
        t.timeout = Duration::from_millis(100);
        let started = std::time::Instant::now();
        assert_eq!(
            probe(&t, None, &children).await,
            Err("timed out after 100ms".into())
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        reaper.abort();
    }
}
