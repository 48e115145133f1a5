//! The manifest language: one file per service, one directive per line.
//!
//! [`parse`] turns the bytes of a `<service>.manifest` file into a typed
//! [`Manifest`] with every default filled in, or into the list of all its
//! [`Diagnostic`]s (line, column, message). [`Manifest::canonical`] renders a
//! manifest back as text that parses to the same value, and
//! [`Manifest::version`] is a short hash of that canonical text: comments,
//! blank lines, spacing and the order of `env` lines do not change it, any
//! change of meaning does.
//!
//! The canonical text leaves out every directive that holds its default, so a
//! directive added to the language later (with a default) does not change the
//! version of manifests that do not use it.

mod parse;

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::name::ServiceName;

pub(crate) use parse::{col, control_char, raw_lines, utf8_line};
pub use parse::{parse, parse_duration, parse_span, position_of, position_of_after};

/// Largest accepted `replicas`.
pub const MAX_REPLICAS: u32 = 1000;
/// Longest accepted line, in bytes.
pub const MAX_LINE: usize = 4096;
/// Largest accepted manifest file, in bytes.
pub const MAX_SIZE: usize = 1 << 20;
/// Longest accepted duration.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Largest accepted `health_retries`.
pub const MAX_RETRIES: u32 = 100;
/// Environment variables deployd sets itself for every instance, which
/// neither `env` nor an env file may set.
pub const RESERVED_ENV: [&str; 5] = ["HOST", "PORT", "SERVICE", "INSTANCE", "VERSION"];
/// Largest `cpu_max`, in hundredths of a core: 1024 cores.
pub const MAX_CPU: u32 = 102_400;
/// `pids_max`'s range (the kernel's `pid_max` is at most 4194304).
pub const MIN_PIDS: u64 = 1;
pub const MAX_PIDS: u64 = 4_194_304;
/// Smallest accepted `memory_max` or `memory_high`: 1 MiB.
pub const MIN_MEMORY: u64 = 1 << 20;
/// Largest accepted `memory_high`: 1 TiB.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Smallest accepted `log_max`: 64 KiB.
pub const MIN_LOG: u64 = 64 << 10;
/// Largest accepted `log_max`: 1 TiB.
pub const MAX_LOG: u64 = 1 << 40;
/// Shortest accepted `health_interval`: a shorter one would be a busy loop.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(10);

/// A service's manifest with every default resolved.
///
/// Two manifests are equal exactly when they mean the same thing, and then
/// `hook_timeout` when a manifest does not say.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// they have the same [`version`](Manifest::version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Command line each instance runs through `/bin/sh -c`.
    pub exec: String,
    /// Working directory, relative to the manifest's folder; `None` is the folder itself.
    pub dir: Option<String>,
    /// Extra environment, sorted by key; keys are unique.
    pub env: Vec<(String, String)>,
    /// Files of `KEY=VALUE` lines read at each instance start, in order
    /// (a later file wins; `env` wins over them all); relative to the
    /// manifest's folder. Their content is not part of the version.
    pub env_files: Vec<String>,
    /// Services that must be ready before this one's instances first start
    /// (and that stop after it when deployd stops), in name order.
    pub after: Vec<ServiceName>,
    /// The account instances and `health exec` probes run as; `None`: deployd's own.
    pub user: Option<User>,
    /// Number of instances.
    pub replicas: u32,
    /// Public TCP port deployd serves and routes to healthy instances.
    pub port: Option<u16>,
    /// How deployd forwards traffic on `port`.
    pub proxy: Proxy,
    /// Readiness and health probe.
    pub health: Health,
    /// With `health notify`: the probe that says an instance that said it
    /// was ready is still alive (`http`, `tcp` or `exec`).
    pub liveness: Option<Health>,
    /// With `health notify`: an instance that sends no `WATCHDOG=1` for
    /// this long fails its probes; zero: no watchdog.
    pub watchdog: Duration,
    /// Time between probes.
    pub health_interval: Duration,
    /// Limit of one probe.
    pub health_timeout: Duration,
    /// Consecutive failed probes that make a healthy instance unhealthy.
    pub health_retries: u32,
    /// After start, failed probes don't count for this long.
    pub health_grace: Duration,
    /// A new instance must be ready within this, or the rollout fails.
    pub health_deadline: Duration,
    /// A new instance must stay healthy this long before it counts as ready
    /// (see [`Manifest::ready_after`] for `health none`).
    pub min_healthy: Duration,
    /// How a new version replaces the running one.
    pub update: Strategy,
    /// Instances replaced at a time.
    pub update_batch: u32,
    /// `update rolling`: start or stop first in each batch.
    pub update_order: UpdateOrder,
    /// `update rolling`: instances a new version first replaces before the
    /// rollout holds for `promote` (or `rollback`); 0: no canary.
    pub update_canary: u32,
    /// With `update_canary`: promote the canaries by themselves once they
    /// have been ready this long with no restart; zero: wait for `promote`.
    pub update_canary_auto: Duration,
    /// Wait between batches.
    pub update_pause: Duration,
    /// After a new version's rollout: how long a crash, an unhealthy
    /// instance or a restart still fails it; zero: not watched.
    pub update_watch: Duration,
    /// Run through `/bin/sh -c` once before a new version's first batch.
    pub before_deploy: Option<String>,
    /// Run through `/bin/sh -c` once after a new version's last batch.
    pub after_deploy: Option<String>,
    /// How long a hook may run before it is killed and fails.
    pub hook_timeout: Duration,
    /// After a failed rollout, roll back to the previous version.
    pub auto_rollback: bool,
    /// What happens when an instance exits outside a rollout.
    pub restart: RestartPolicy,
    /// Signal that asks an instance to stop.
    pub stop_signal: Signal,
    /// Time between `stop_signal` and SIGKILL.
    pub stop_timeout: Duration,
    /// Resident memory, in bytes, above which a ready instance is replaced
    /// (sampled by deployd, the instance replaced with surge).
    pub memory_high: Option<u64>,
    /// The memory, in bytes, the kernel lets the instance's processes use
    /// together (its cgroup's `memory.max`): past it they are OOM-killed.
    pub memory_max: Option<u64>,
    /// CPU time the instance's processes may use together, in hundredths
    /// of a core (its cgroup's `cpu.max`).
    pub cpu_max: Option<u32>,
    /// How many processes and threads the instance may have at once (its
    /// cgroup's `pids.max`).
    pub pids_max: Option<u32>,
    /// Size of an instance's log, in bytes, past which it is moved to `.1`.
    pub log_max: u64,
    /// Bytes of output a second an instance may write before its writes
    /// wait for deployd (a burst of as much first).
    pub log_rate: u64,
    /// Time an instance routed out may finish its open requests before it is stopped.
    pub drain: Duration,
    /// How long a request waits for an instance when none is routed in.
    pub queue_timeout: Duration,
    /// `proxy http`: how long an instance may take to start answering a
    /// request (its response head) before the client gets a 504; `None`:
    /// no limit.
    pub response_timeout: Option<Duration>,
    /// Write a line per request (`proxy http`) or per connection (`proxy
    /// tcp`) to the service's `access` file.
    pub access_log: bool,
    /// Client connections the port holds at once; `None`: half of what
    /// deployd's descriptor budget holds (see docs/manifest.md).
    pub max_connections: Option<u32>,
    /// `proxy http`: clients (proxies in front of deployd) whose
    /// `X-Forwarded-For` is kept and extended; every other client's is
    /// replaced by its address. Sorted, no duplicates.
    pub trusted_proxies: Vec<Cidr>,
    /// In a cluster, the hosts its instances may run on; empty: any.
    /// Sorted, no duplicates.
    pub hosts: Vec<crate::name::HostName>,
}

/// Largest accepted `max_connections`.
pub const MAX_CONNECTIONS: u32 = 10_000_000;

/// An address block, `ADDRESS/PREFIX` (`10.0.0.0/8`, `::1/128`), or one
/// address (a prefix of its whole length). Its address has no bits past
/// the prefix, so two spellings of one block are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the block; an IPv4 address written as IPv6
    /// (`::ffff:10.1.2.3`, as a socket bound to `::` sees IPv4 clients)
    /// counts as the IPv4 one.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                mask(u128::from(u32::from(a)), 32, self.prefix) == u128::from(u32::from(net))
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                mask(u128::from(a), 128, self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

/// `bits` of `n` (an address of `width` bits) with all but the first
/// `prefix` cleared.
fn mask(n: u128, width: u8, prefix: u8) -> u128 {
    let host = u32::from(width - prefix);
    if host >= 128 { 0 } else { n >> host << host }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        use std::net::IpAddr;
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("'{addr}' is not an IP address"))?;
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= width && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(format!("'/{p}' is not a prefix length from 0 to {width}")),
            },
        };
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4((mask(u128::from(u32::from(a)), 32, prefix) as u32).into()),
            IpAddr::V6(a) => IpAddr::V6(mask(u128::from(a), 128, prefix).into()),
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == width {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

/// The `user` directive: an account, and optionally a group, of this machine,
/// each a name or a numeric id. Checked against the machine's user database
/// when a manifest is loaded ([`crate::host`]), not by [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// A user name or a numeric uid.
    pub user: String,
    /// A group name or a numeric gid; `None`: the user's primary group.
    pub group: Option<String>,
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.group {
            Some(g) => write!(f, "{}:{g}", self.user),
            None => write!(f, "{}", self.user),
        }
    }
}

/// The readiness and health probe of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// No probe: an instance that runs is healthy.
    None,
    /// A TCP connect to the instance's `$PORT`.
    Tcp,
    /// An HTTP GET of this path on the instance's `$PORT`; 2xx is healthy.
    Http {
        /// Request path, starting with `/`.
        path: String,
    },
    /// A command run through `/bin/sh -c`; exit status 0 is healthy.
    Exec {
        /// The command line.
        command: String,
    },
    /// The program says when it is ready: `READY=1` on `$NOTIFY_SOCKET`,
    /// as a systemd `Type=notify` service does (sd_notify).
    Notify,
}

/// How a rollout replaces instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Start new instances first (surge), replace a batch at a time.
    Rolling,
    /// Stop every old instance, then start every new one.
    Replace,
}

/// In a rolling update, what happens first in each batch (Docker Swarm's
/// `update_config.order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateOrder {
    /// The new instances start, and once ready the old ones stop (surge):
    /// capacity never drops.
    StartFirst,
    /// The old instances are drained and stopped, then the new ones start:
    /// never more than `replicas` instances, capacity drops by the batch.
    StopFirst,
}

impl UpdateOrder {
    /// The manifest spelling.
    pub fn name(self) -> &'static str {
        match self {
            UpdateOrder::StartFirst => "start-first",
            UpdateOrder::StopFirst => "stop-first",
        }
    }
}

/// What happens when an instance exits between rollouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Restart it, whatever its exit status.
    Always,
    /// Restart it if it exited with a non-zero status or was killed by a signal.
    OnFailure,
    /// Leave it exited.
    Never,
}

/// How deployd forwards the traffic of a service's public port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    /// HTTP/1.1: each request goes to one routed-in instance.
    Http,
    /// TCP: each connection goes to one routed-in instance.
    Tcp,
}

/// The signals a manifest may name as `stop_signal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Signal {
    /// SIGTERM
    Term,
    /// SIGINT
    Int,
    /// SIGQUIT
    Quit,
    /// SIGHUP
    Hup,
    /// SIGUSR1
    Usr1,
    /// SIGUSR2
    Usr2,
    /// SIGKILL
    Kill,
}

impl Signal {
    /// Every signal with its manifest spelling.
    pub const ALL: [(Signal, &'static str); 7] = [
        (Signal::Term, "TERM"),
        (Signal::Int, "INT"),
        (Signal::Quit, "QUIT"),
        (Signal::Hup, "HUP"),
        (Signal::Usr1, "USR1"),
        (Signal::Usr2, "USR2"),
        (Signal::Kill, "KILL"),
    ];

    /// The manifest spelling, e.g. `TERM`.
    pub fn name(self) -> &'static str {
        Signal::ALL
            .iter()
            .find(|(s, _)| *s == self)
            .map_or("TERM", |(_, n)| n)
    }

    /// The signal spelled `name`, with or without the `SIG` prefix
    /// (`HUP`, `SIGHUP`).
    pub fn from_name(name: &str) -> Option<Signal> {
        let bare = name.strip_prefix("SIG").unwrap_or(name);
        Signal::ALL
            .iter()
            .find(|(_, n)| *n == bare)
            .map(|(s, _)| *s)
    }

    /// The Linux signal number.
    pub fn number(self) -> i32 {
        match self {
            Signal::Hup => 1,
            Signal::Int => 2,
            Signal::Quit => 3,
            Signal::Kill => 9,
            Signal::Usr1 => 10,
            Signal::Usr2 => 12,
            Signal::Term => 15,
        }
    }
}

impl Strategy {
    /// The manifest spelling.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Rolling => "rolling",
            Strategy::Replace => "replace",
        }
    }
}

impl RestartPolicy {
    /// The manifest spelling.
    pub fn name(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }
}

impl Proxy {
    /// The manifest spelling.
    pub fn name(self) -> &'static str {
        match self {
            Proxy::Http => "http",
            Proxy::Tcp => "tcp",
        }
    }
}

impl Health {
    /// The default probe: `tcp` when the service has a port, else `none`.
    pub fn default_for(port: Option<u16>) -> Health {
        if port.is_some() {
            Health::Tcp
        } else {
            Health::None
        }
    }

    /// Whether the probe connects to the instance's `$PORT`.
    pub fn needs_port(&self) -> bool {
        matches!(self, Health::Tcp | Health::Http { .. })
    }
}

impl Proxy {
    /// The default proxy mode: `http` when the probe is `health http`, else `tcp`.
    pub fn default_for(health: &Health) -> Proxy {
        match health {
            Health::Http { .. } => Proxy::Http,
            _ => Proxy::Tcp,
        }
    }
}

/// With `health none`, how long a new instance must run to be ready.
pub const RUNNING_FOR: Duration = Duration::from_secs(1);

/// Hundredths of a core as `cpu_max` writes them: `0.5`, `1.25`, `2`.
pub fn format_cores(c: u32) -> String {
    match (c / 100, c % 100) {
        (w, 0) => w.to_string(),
        (w, f) if f % 10 == 0 => format!("{w}.{}", f / 10),
        (w, f) => format!("{w}.{f:02}"),
    }
}

impl Manifest {
    /// Whether it asks the kernel for limits (`memory_max`, `cpu_max`,
    /// `pids_max`).
    pub fn has_limits(&self) -> bool {
        self.memory_max.is_some() || self.cpu_max.is_some() || self.pids_max.is_some()
    }

    /// A manifest running `exec` with every other directive at its default.
    pub fn new(exec: impl Into<String>) -> Manifest {
        Manifest {
            exec: exec.into(),
            dir: None,
            env: Vec::new(),
            env_files: Vec::new(),
            after: Vec::new(),
            user: None,
            replicas: 1,
            port: None,
            proxy: Proxy::Tcp,
            health: Health::None,
            liveness: None,
            watchdog: Duration::ZERO,
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_secs(1),
            health_retries: 3,
            health_grace: Duration::ZERO,
            health_deadline: Duration::from_secs(30),
            min_healthy: Duration::ZERO,
            update: Strategy::Rolling,
            update_batch: 1,
            update_order: UpdateOrder::StartFirst,
            update_canary: 0,
            update_canary_auto: Duration::ZERO,
            update_pause: Duration::ZERO,
            update_watch: Duration::ZERO,
            before_deploy: None,
            after_deploy: None,
            hook_timeout: DEFAULT_HOOK_TIMEOUT,
            auto_rollback: false,
            restart: RestartPolicy::Always,
            stop_signal: Signal::Term,
            stop_timeout: Duration::from_secs(10),
            memory_high: None,
            memory_max: None,
            cpu_max: None,
            pids_max: None,
            log_max: 1 << 20,
            log_rate: 8 << 20,
            drain: Duration::from_secs(5),
            queue_timeout: Duration::from_secs(10),
            response_timeout: None,
            access_log: false,
            max_connections: None,
            trusted_proxies: Vec::new(),
            hosts: Vec::new(),
        }
    }

    /// Whether instances get a `$PORT`: when the service has a public port or
    /// a probe that connects to the instance.
    pub fn needs_instance_port(&self) -> bool {
        self.port.is_some() || self.health.needs_port()
    }

    /// Whether `other` runs the same processes, so that changing from one to
    /// the other only adds or removes instances: they differ in `replicas`
    /// and in `after` (the start order) only.
    pub fn same_but_replicas(&self, other: &Manifest) -> bool {
        let mut o = other.clone();
        o.replicas = self.replicas;
        o.after.clone_from(&self.after);
        *self == o
    }

    /// The canonical text: one directive per line in a fixed order, defaults
    /// left out, durations in their largest exact unit. It parses back to an
    /// equal manifest.
    pub fn canonical(&self) -> String {
        use std::fmt::Write;
        let d = Manifest::new(String::new());
        let mut out = String::new();
        // Writing to a String cannot fail.
        let mut line = |args: fmt::Arguments| {
            let _ = out.write_fmt(args);
            out.push('\n');
        };
        line(format_args!("exec {}", self.exec));
        if let Some(dir) = &self.dir {
            line(format_args!("dir {dir}"));
        }
        for (k, v) in &self.env {
            line(format_args!("env {k}={v}"));
        }
        for f in &self.env_files {
            line(format_args!("env_file {f}"));
        }
        if let Some(user) = &self.user {
            line(format_args!("user {user}"));
        }
        for s in &self.after {
            line(format_args!("after {s}"));
        }
        if self.replicas != d.replicas {
            line(format_args!("replicas {}", self.replicas));
        }
        if let Some(port) = self.port {
            line(format_args!("port {port}"));
        }
        if self.proxy != Proxy::default_for(&self.health) {
            line(format_args!("proxy {}", self.proxy.name()));
        }
        if self.health != Health::default_for(self.port) {
            match &self.health {
                Health::None => line(format_args!("health none")),
                Health::Tcp => line(format_args!("health tcp")),
                Health::Http { path } => line(format_args!("health http {path}")),
                Health::Exec { command } => line(format_args!("health exec {command}")),
                Health::Notify => line(format_args!("health notify")),
            }
        }
        match &self.liveness {
            Some(Health::Tcp) => line(format_args!("liveness tcp")),
            Some(Health::Http { path }) => line(format_args!("liveness http {path}")),
            Some(Health::Exec { command }) => line(format_args!("liveness exec {command}")),
            _ => {}
        }
        if !self.watchdog.is_zero() {
            line(format_args!("watchdog {}", format_duration(self.watchdog)));
        }
        let durations = [
            ("health_interval", self.health_interval, d.health_interval),
            ("health_timeout", self.health_timeout, d.health_timeout),
        ];
        for (name, v, default) in durations {
            if v != default {
                line(format_args!("{name} {}", format_duration(v)));
            }
        }
        if self.health_retries != d.health_retries {
            line(format_args!("health_retries {}", self.health_retries));
        }
        let durations = [
            ("health_grace", self.health_grace, d.health_grace),
            ("health_deadline", self.health_deadline, d.health_deadline),
            ("min_healthy", self.min_healthy, d.min_healthy),
        ];
        for (name, v, default) in durations {
            if v != default {
                line(format_args!("{name} {}", format_duration(v)));
            }
        }
        if self.update != d.update {
            line(format_args!("update {}", self.update.name()));
        }
        if self.update_batch != d.update_batch {
            line(format_args!("update_batch {}", self.update_batch));
        }
        if self.update_order != d.update_order {
            line(format_args!("update_order {}", self.update_order.name()));
        }
        if self.update_canary != d.update_canary {
            line(format_args!("update_canary {}", self.update_canary));
        }
        if self.update_canary_auto != d.update_canary_auto {
            line(format_args!(
                "update_canary_auto {}",
                format_duration(self.update_canary_auto)
            ));
        }
        if self.update_pause != d.update_pause {
            line(format_args!(
                "update_pause {}",
                format_duration(self.update_pause)
            ));
        }
        if let Some(c) = &self.before_deploy {
            line(format_args!("before_deploy {c}"));
        }
        if let Some(c) = &self.after_deploy {
            line(format_args!("after_deploy {c}"));
        }
        if self.hook_timeout != d.hook_timeout {
            line(format_args!(
                "hook_timeout {}",
                format_duration(self.hook_timeout)
            ));
        }
        if self.update_watch != d.update_watch {
            line(format_args!(
                "update_watch {}",
                format_duration(self.update_watch)
            ));
        }
        if self.auto_rollback != d.auto_rollback {
            line(format_args!("auto_rollback on"));
        }
        if self.restart != d.restart {
            line(format_args!("restart {}", self.restart.name()));
        }
        if self.stop_signal != d.stop_signal {
            line(format_args!("stop_signal {}", self.stop_signal.name()));
        }
        if let Some(bytes) = self.memory_high {
            line(format_args!("memory_high {}", format_size(bytes)));
        }
        if let Some(bytes) = self.memory_max {
            line(format_args!("memory_max {}", format_size(bytes)));
        }
        if let Some(c) = self.cpu_max {
            line(format_args!("cpu_max {}", format_cores(c)));
        }
        if let Some(n) = self.pids_max {
            line(format_args!("pids_max {n}"));
        }
        if self.log_max != d.log_max {
            line(format_args!("log_max {}", format_size(self.log_max)));
        }
        if self.log_rate != d.log_rate {
            line(format_args!("log_rate {}", format_size(self.log_rate)));
        }
        let durations = [
            ("stop_timeout", self.stop_timeout, d.stop_timeout),
            ("drain", self.drain, d.drain),
            ("queue_timeout", self.queue_timeout, d.queue_timeout),
        ];
        for (name, v, default) in durations {
            if v != default {
                line(format_args!("{name} {}", format_duration(v)));
            }
        }
        if let Some(d) = self.response_timeout {
            line(format_args!("response_timeout {}", format_duration(d)));
        }
        if self.access_log {
            line(format_args!("access_log on"));
        }
        if let Some(n) = self.max_connections {
            line(format_args!("max_connections {n}"));
        }
        if !self.trusted_proxies.is_empty() {
            let list: Vec<String> = self.trusted_proxies.iter().map(Cidr::to_string).collect();
            line(format_args!("trusted_proxies {}", list.join(" ")));
        }
        if !self.hosts.is_empty() {
            let list: Vec<&str> = self.hosts.iter().map(|h| h.as_str()).collect();
            line(format_args!("hosts {}", list.join(" ")));
        }
        out
    }

    /// How long a new instance must stay healthy before it counts as
    /// ready: `min_healthy`, and with `health none` at least
    /// [`RUNNING_FOR`] (at most half the `health_deadline`): nothing but
    /// its running says it works, and a program that exits at once (a
    /// typo in `exec`, a missing file) then fails its rollout rather than
    /// crash-looping after `deployed`. PM2 waits its `min_uptime` (1s),
    /// Docker Swarm its `update-monitor` (5s) the same way.
    pub fn ready_after(&self) -> Duration {
        match self.health {
            Health::None => self
                .min_healthy
                .max(RUNNING_FOR.min(self.health_deadline / 2)),
            _ => self.min_healthy,
        }
    }

    /// The version: the first 12 hex digits of the SHA-256 of the canonical text.
    pub fn version(&self) -> Version {
        let digest = Sha256::digest(self.canonical().as_bytes());
        let mut v = 0u64;
        for b in &digest[..6] {
            v = (v << 8) | u64::from(*b);
        }
        Version(v)
    }
}

/// A manifest's version: 48 bits of the hash of its canonical text, written
/// as 12 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version(u64);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:012x}", self.0)
    }
}

impl FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Version, String> {
        let ok = s.len() == 12 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        match u64::from_str_radix(s, 16) {
            Ok(v) if ok => Ok(Version(v)),
            _ => Err(format!("'{s}' is not a version (12 hex digits)")),
        }
    }
}

impl serde::Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Version, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A version as an operator may type it: its first 4 to 12 hex digits,
/// as git takes an abbreviated commit (`rollback web 36c8`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VersionPrefix(String);

impl VersionPrefix {
    /// Whether `v` starts with these digits.
    pub fn matches(&self, v: Version) -> bool {
        v.to_string().starts_with(&self.0)
    }
}

impl fmt::Display for VersionPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for VersionPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<VersionPrefix, String> {
        let hex = s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if hex && (4..=12).contains(&s.len()) {
            Ok(VersionPrefix(s.to_string()))
        } else {
            let shown: String = s.chars().take(40).collect();
            Err(format!(
                "'{}' is not a version (12 hex digits, or at least its first 4)",
                shown.escape_debug()
            ))
        }
    }
}

/// Two services cannot share a public port (one listener per port). Of
/// `services`, each a name and its manifest's `port`, in order: each one
/// whose port an earlier one has, with that port and the earlier one.
pub fn shared_ports<'a>(
    services: impl IntoIterator<Item = (&'a ServiceName, Option<u16>)>,
) -> Vec<(&'a ServiceName, u16, &'a ServiceName)> {
    let mut owner: std::collections::HashMap<u16, &ServiceName> = Default::default();
    let mut shared = Vec::new();
    for (name, port) in services {
        let Some(port) = port else { continue };
        match owner.get(&port) {
            Some(first) if *first != name => shared.push((name, port, *first)),
            Some(_) => {}
            None => {
                owner.insert(port, name);
            }
        }
    }
    shared
}

/// `LINE:COL: port PORT: WHOSE; two services cannot share a public port`,
/// at the `port` line of the manifest text `src`, for a port
/// [`shared_ports`] found taken (`whose`: `already the port of web`).
pub fn shared_port_error(src: &str, port: u16, whose: &str) -> String {
    let (line, col) = position_of(src, "port").last().copied().unwrap_or((1, 1));
    format!("{line}:{col}: port {port}: {whose}; two services cannot share a public port")
}

/// Formats a duration in its largest exact unit: `2m`, `10s`, `500ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".to_string()
    } else if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Formats a size in bytes in its largest exact binary unit: `512M`, `1G`,
/// `1536K`, or bytes.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{}{name}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// One problem in a manifest, at a 1-based line and column (in characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1, counted in characters.
    pub col: usize,
    /// What is wrong, and where it can be said, what would be right.
    pub message: String,
}

impl Diagnostic {
    /// The diagnostic as `file:line:col: message`.
    pub fn display<'a>(&'a self, file: &'a str) -> impl fmt::Display + 'a {
        struct D<'a>(&'a str, &'a Diagnostic);
        impl fmt::Display for D<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "{}:{}:{}: {}",
                    self.0, self.1.line, self.1.col, self.1.message
                )
            }
        }
        D(file, self)
    }
}

/// A manifest file read from disk and parsed.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The service, from the file's stem.
    pub service: ServiceName,
    /// The parsed manifest.
    pub manifest: Manifest,
    /// The file's text as written.
    pub text: String,
}

/// Why a manifest file could not be loaded; `Display` gives one line per problem.
#[derive(Debug, Clone)]
pub enum LoadError {
    /// The file could not be read.
    Io {
        /// The file as named.
        file: String,
        /// The OS error.
        error: String,
        /// Whether the file does not exist.
        not_found: bool,
    },
    /// The file name is not `<service>.manifest` with a valid service name.
    Name {
        /// The file as named.
        file: String,
        /// Why.
        error: String,
    },
    /// The text has errors.
    Invalid {
        /// The file as named.
        file: String,
        /// Every problem found.
        diagnostics: Vec<Diagnostic>,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Io { file, error, .. } => write!(f, "{file}: {error}"),
            LoadError::Name { file, error } => write!(f, "{file}: {error}"),
            LoadError::Invalid { file, diagnostics } => {
                for (i, d) in diagnostics.iter().enumerate() {
                    if i > 0 {
                        writeln!(f)?;
                    }
                    write!(f, "{}", d.display(file))?;
                }
                Ok(())
            }
        }
    }
}

/// Reads and parses a `<service>.manifest` file. Errors name the file as given.
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    let file = path.display().to_string();
    let service = service_of(path).map_err(|error| LoadError::Name {
        file: file.clone(),
        error,
    })?;
    let bytes = crate::readfile::read_regular(path, MAX_SIZE).map_err(|e| match e {
        crate::readfile::ReadError::TooLarge(len, _) => LoadError::Invalid {
            file: file.clone(),
            diagnostics: vec![too_large(len as usize)],
        },
        e => {
            let not_found = e.not_found();
            let error = match std::fs::read_link(path) {
                // A dangling link: say where it points, not "No such file".
                Ok(target) if not_found => {
                    format!("a link to {}, which does not exist", target.display())
                }
                _ => match e {
                    crate::readfile::ReadError::NotRegular("a directory") => {
                        "is a directory".to_string()
                    }
                    e => e.to_string(),
                },
            };
            LoadError::Io {
                file: file.clone(),
                not_found,
                error,
            }
        }
    })?;
    match parse(&bytes) {
        Ok(manifest) if manifest.after.contains(&service) => {
            // parse accepted it, so it is UTF-8.
            let text = String::from_utf8_lossy(&bytes);
            let (line, col) = position_of_after(&text, service.as_str()).unwrap_or((1, 1));
            Err(LoadError::Invalid {
                file: file.clone(),
                diagnostics: vec![Diagnostic {
                    line,
                    col,
                    message: format!("after {service}: a service cannot wait for itself"),
                }],
            })
        }
        Ok(manifest) => Ok(Loaded {
            service,
            manifest,
            // parse accepted it, so it is UTF-8.
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }),
        Err(diagnostics) => Err(LoadError::Invalid {
            file: file.clone(),
            diagnostics,
        }),
    }
}

fn too_large(len: usize) -> Diagnostic {
    Diagnostic {
        line: 1,
        col: 1,
        message: format!("manifest is {len} bytes; the limit is {MAX_SIZE}"),
    }
}

/// The service a manifest file describes: its stem, if the name is
/// `<service>.manifest` and the service name is valid.
pub fn service_of(path: &Path) -> Result<ServiceName, String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| "file name must be SERVICE.manifest".to_string())?;
    let stem = name
        .strip_suffix(".manifest")
        .ok_or_else(|| format!("file name '{name}' must end in .manifest"))?;
    ServiceName::new(stem)
}

#[cfg(test)]
mod tests;
