//! Traffic: deployd listens on each service's public `port` and forwards to
//! the instances that are routed in.
//!
//! The engine changes the routing table through [`Router::route_in`] and
//! [`Router::route_out`] (the state machine's actions). A request or
//! connection counts as *in flight* on its instance from the moment it is
//! given one until its response is fully sent (or its connection closed); an
//! instance routed out gets nothing new, and the engine is told it is
//! drained when its last one ends. After `drain`, [`Router::close`] cuts
//! whatever is still open (tunnels, tcp connections) before the stop signal.
//! When deployd itself stops, [`Router::finish`] does for the whole service
//! what a route-out does for one instance: nothing new comes in, and what is
//! in flight may finish.
//!
//! Balancing is least outstanding requests (http) or least connections
//! (tcp), ties broken round-robin: a slow or overloaded instance gets less,
//! equal ones share evenly, a new one starts taking traffic at once.
//!
//! With no instance routed in, a request waits for one up to
//! `queue_timeout` instead of being refused, so a `replace` rollout or the
//! restart of a single instance loses nothing that fits in that window.

pub mod access;
pub mod activation;
pub mod budget;
mod http;
mod tcp;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use deployd_lib::http::head::Xff;
use deployd_lib::manifest::{Cidr, Proxy as Mode};
use deployd_lib::rollout::InstanceId;
use parking_lot::{Mutex, RwLock};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;

/// A client connection that has been quiet this long gives back its
/// buffers (18 KiB in http mode, 16 KiB in tcp mode) until it is used
/// again: clients keep connections open and idle for minutes (browsers,
/// client pools, database-style sessions), thousands of them, and a burst
/// of them (page loads) then holds buffers only briefly. A connection
/// under load never waits this long; one whose requests come further
/// apart pays a few allocations (0.35 µs) for each, and a busy
/// tcp connection is looked at this often.
const HOLD: Duration = Duration::from_millis(100);

/// How traffic of a service is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Public port.
    pub port: u16,
    /// http or tcp.
    pub mode: Mode,
    /// How long a request waits for an instance.
    pub queue_timeout: Duration,
    /// http: how long an instance may take to start its response.
    pub response_timeout: Option<Duration>,
    /// Client connections held at once; `None`: half of what the
    /// descriptor budget holds ([`budget::Budget::default_max_connections`]).
    pub max_connections: Option<u32>,
}

/// One instance as a target of traffic.
pub struct Backend {
    /// The instance.
    pub id: InstanceId,
    addr: SocketAddr,
    /// Requests (http) or connections (tcp) in flight on it.
    inflight: AtomicUsize,
    counts: Counts,
    routed: AtomicBool,
    /// Fires when deployd cuts what is still open on it.
    closed: watch::Sender<bool>,
    /// Idle HTTP connections to it.
    idle: Mutex<Vec<http::Conn>>,
    /// Asks its prober for a probe now.
    poke: Arc<Notify>,
    /// Tells the engine it has nothing in flight after being routed out.
    on_drained: Box<dyn Fn() + Send + Sync>,
}

impl Backend {
    /// Counts a request or connection as in flight on it; `None` if it was
    /// routed out meanwhile.
    fn acquire(self: &Arc<Self>) -> Option<Guard> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let g = Guard(self.clone());
        // Route-out stores `routed` then reads `inflight`; this stores
        // `inflight` then reads `routed`: one of the two sees the other.
        self.routed.load(Ordering::SeqCst).then_some(g)
    }

    /// Its connection or request failed in a way that says it may be dead:
    /// its prober probes it now.
    fn suspect(&self) {
        self.poke.notify_one();
    }

    /// In flight now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }
}

/// A request or connection in flight on a backend.
pub struct Guard(Arc<Backend>);

impl Guard {
    fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let b = &self.0;
        if b.inflight.fetch_sub(1, Ordering::SeqCst) == 1 && !b.routed.load(Ordering::SeqCst) {
            (b.on_drained)();
        }
    }
}

/// What became of the requests (http) or connections (tcp) of a service,
/// or of those an instance was given.
#[derive(Default)]
struct Counts {
    /// Answered (http) or ended (tcp), errors included.
    served: AtomicU64,
    /// Of those, the ones that failed for the client: a response deployd
    /// made itself (502, 503), an instance's 5xx or a response cut short
    /// (http), a connection that broke (tcp).
    errors: AtomicU64,
    /// Failed on an instance before the client saw anything (refused
    /// connect, no answer) and sent again, to another instance where there
    /// was one. The client never knew.
    retried: AtomicU64,
    /// Given up by their clients, who closed their connections before the
    /// response was through (http).
    abandoned: AtomicU64,
}

/// Upper bounds, in seconds, of the request duration histogram's buckets:
/// from half a millisecond (an answer on loopback) to ten seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How long a service's requests (http: from the head read to the response
/// sent) or connections (tcp) took, in [`LATENCY_BUCKETS`].
#[derive(Default)]
pub struct Latency {
    /// Not cumulative; the last one is past every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Summed, in microseconds.
    micros: AtomicU64,
}

/// A [`Latency`] read at once: each bucket's upper bound and count (not
/// cumulative, as the encoder takes them; the last bound is +Inf), the
/// count, the sum in seconds.
pub struct LatencySnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub seconds: f64,
}

impl Latency {
    fn observe(&self, took: Duration) {
        let s = took.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Its counts now.
    pub fn snapshot(&self) -> LatencySnapshot {
        let buckets: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let bound = LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
                (bound, b.load(Ordering::Relaxed))
            })
            .collect();
        LatencySnapshot {
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
            seconds: self.micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

impl Counts {
    fn add(&self, counter: fn(&Counts) -> &AtomicU64) {
        counter(self).fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self, counter: fn(&Counts) -> &AtomicU64) -> u64 {
        counter(self).load(Ordering::Relaxed)
    }
}

/// A service's routing table and traffic counters.
pub struct Router {
    routed: RwLock<Vec<Arc<Backend>>>,
    /// Every backend not yet closed, routed in or draining.
    known: Mutex<Vec<Arc<Backend>>>,
    changed: Notify,
    next: AtomicUsize,
    settings: RwLock<Settings>,
    totals: Counts,
    latency: Latency,
    listener: Mutex<Option<AbortHandle>>,
    /// The listening socket, once bound: kept open when the accept loop is
    /// stopped, for a deployd replacing itself to hand on.
    socket: Mutex<Option<std::os::fd::OwnedFd>>,
    /// The socket was bound by this deployd (not passed by systemd, nor
    /// handed on by the deployd it replaced).
    bound_here: AtomicBool,
    /// Told to stop listening: the accept loop ends at its next error.
    unlistened: AtomicBool,
    /// Why the port is not listening yet (it is taken), while it is not.
    unbound: Mutex<Option<String>>,
    /// The service is stopped (`deploy stop`): no instance is coming, so
    /// nothing waits for one.
    stopped: AtomicBool,
    /// deployd is stopping: a client connection ends once the request it
    /// has in flight is answered (read on every response).
    finishing: AtomicBool,
    /// The same, for idle connections to wait on.
    finished: watch::Sender<bool>,
    /// With `access_log on`: where each request (http) or connection
    /// (tcp) is logged.
    access: RwLock<Option<Arc<access::AccessLog>>>,
    /// What deployd owes a client an answer for ([`Owed`]), at an instance
    /// or not yet: what a stopping deployd waits for.
    owed: AtomicUsize,
    /// The client connections the port holds, at most `max_connections`.
    admission: Arc<budget::Admission>,
    /// The descriptors every port together may hold.
    budget: Arc<budget::Budget>,
    /// Clients whose `X-Forwarded-For` is believed (`trusted_proxies`).
    trusted: RwLock<Vec<Cidr>>,
}

/// One request (http) or connection (tcp) a client is owed an answer for,
/// from the moment deployd has it (a connection accepted, a request's
/// first byte read) until it is answered or over: also while it is read,
/// and while it waits for an instance. A stopping deployd waits for none
/// left ([`Router::owed`]), so a connection accepted just before it
/// stopped listening is not closed under its first request.
pub(super) struct Owed<'a>(&'a AtomicUsize);

impl<'a> Owed<'a> {
    fn new(count: &'a AtomicUsize) -> Owed<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        Owed(count)
    }
}

impl Drop for Owed<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection counted as owed by the accept loop, before its task runs;
/// the task takes it over ([`Router::accepted`]).
#[must_use]
pub(super) struct Accepted(());

impl Router {
    fn new(settings: Settings, budget: Arc<budget::Budget>) -> Router {
        let max = settings
            .max_connections
            .map_or_else(|| budget.default_max_connections(), |n| n as usize);
        Router {
            admission: Arc::new(budget::Admission::new(max)),
            budget,
            trusted: RwLock::new(Vec::new()),
            routed: RwLock::new(Vec::new()),
            known: Mutex::new(Vec::new()),
            changed: Notify::new(),
            next: AtomicUsize::new(0),
            settings: RwLock::new(settings),
            totals: Counts::default(),
            latency: Latency::default(),
            listener: Mutex::new(None),
            socket: Mutex::new(None),
            bound_here: AtomicBool::new(false),
            unlistened: AtomicBool::new(false),
            unbound: Mutex::new(None),
            stopped: AtomicBool::new(false),
            finishing: AtomicBool::new(false),
            access: RwLock::new(None),
            finished: watch::channel(false).0,
            owed: AtomicUsize::new(0),
        }
    }

    /// A router with a budget as large as a test needs.
    #[cfg(test)]
    pub(super) fn for_test(settings: Settings) -> Router {
        Router::new(settings, Arc::new(budget::Budget::from_limit(1 << 20)))
    }

    /// What a connection accepted by a test's own loop holds.
    #[cfg(test)]
    pub(super) async fn permit(&self) -> budget::Permit {
        budget::Permit::new(self.admission.admit().await, self.budget.connection().await)
    }

    /// A request now owed an answer.
    pub(super) fn owe(&self) -> Owed<'_> {
        Owed::new(&self.owed)
    }

    /// Counts a connection just accepted, before its task runs: a deployd
    /// stopping meanwhile waits for it.
    pub(super) fn accept(&self) -> Accepted {
        self.owed.fetch_add(1, Ordering::SeqCst);
        Accepted(())
    }

    /// The connection's task takes over what [`Router::accept`] counted.
    pub(super) fn accepted(&self, _: Accepted) -> Owed<'_> {
        Owed(&self.owed)
    }

    /// Requests (http) or connections (tcp) owed an answer now: at an
    /// instance, being read, or waiting for one.
    pub fn owed(&self) -> usize {
        self.owed.load(Ordering::SeqCst)
    }

    /// Sends new traffic to an instance listening on `port` of the
    /// loopback address.
    pub fn route_in(
        &self,
        id: InstanceId,
        port: u16,
        poke: Arc<Notify>,
        on_drained: Box<dyn Fn() + Send + Sync>,
    ) {
        self.route_to(
            id,
            SocketAddr::from(([127, 0, 0, 1], port)),
            poke,
            on_drained,
        );
    }

    /// Sends new traffic to an instance listening on `addr` (in a
    /// cluster, on this host or another).
    pub fn route_to(
        &self,
        id: InstanceId,
        addr: SocketAddr,
        poke: Arc<Notify>,
        on_drained: Box<dyn Fn() + Send + Sync>,
    ) {
        let b = Arc::new(Backend {
            id,
            addr,
            inflight: AtomicUsize::new(0),
            counts: Counts::default(),
            routed: AtomicBool::new(true),
            closed: watch::channel(false).0,
            idle: Mutex::new(Vec::new()),
            poke,
            on_drained,
        });
        self.known.lock().push(b.clone());
        self.routed.write().push(b);
        self.changed.notify_waiters();
    }

    /// Sends an instance nothing new. Its `on_drained` is called once
    /// nothing is in flight on it (now, if nothing is). Returns whether it
    /// was routed in.
    pub fn route_out(&self, id: InstanceId) -> bool {
        let removed = {
            let mut routed = self.routed.write();
            let pos = routed.iter().position(|b| b.id == id);
            pos.map(|p| routed.remove(p))
        };
        let Some(b) = removed else { return false };
        b.routed.store(false, Ordering::SeqCst);
        b.idle.lock().clear();
        if b.inflight.load(Ordering::SeqCst) == 0 {
            (b.on_drained)();
        }
        true
    }

    /// Cuts whatever is still open on an instance (it is being stopped) and
    /// forgets it. Returns how many requests (http) or connections (tcp)
    /// were still in flight on it.
    pub fn close(&self, id: InstanceId) -> usize {
        let _ = self.route_out(id);
        let gone = {
            let mut known = self.known.lock();
            let pos = known.iter().position(|b| b.id == id);
            pos.map(|p| known.remove(p))
        };
        let Some(b) = gone else { return 0 };
        let open = b.inflight();
        b.closed.send_replace(true);
        b.idle.lock().clear();
        open
    }

    /// In flight on an instance now.
    pub fn inflight(&self, id: InstanceId) -> usize {
        self.known
            .lock()
            .iter()
            .find(|b| b.id == id)
            .map_or(0, |b| b.inflight())
    }

    /// The least loaded routed-in backend not in `tried`, counted in flight;
    /// waits for one up to `queue_timeout`, unless the service is stopped.
    async fn pick(&self, tried: &[InstanceId]) -> Option<Guard> {
        // The usual case first: an instance is there, nothing to wait on.
        if let Some(g) = self.try_pick(tried) {
            return Some(g);
        }
        let wait = self.settings.read().queue_timeout;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(g) = self.try_pick(tried) {
                return Some(g);
            }
            if self.is_stopped() {
                return None;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Whether the service is stopped: what `pick` found nothing for is
    /// answered at once.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// The service was stopped or started: once stopped, what waits for an
    /// instance is answered at once, and so is what comes.
    pub fn set_stopped(&self, stopped: bool) {
        if self.stopped.swap(stopped, Ordering::SeqCst) != stopped {
            self.changed.notify_waiters();
        }
    }

    fn try_pick(&self, tried: &[InstanceId]) -> Option<Guard> {
        loop {
            let chosen = {
                let routed = self.routed.read();
                let n = routed.len();
                if n == 0 {
                    return None;
                }
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let mut best: Option<&Arc<Backend>> = None;
                for i in 0..n {
                    let b = &routed[(start + i) % n];
                    if tried.contains(&b.id) {
                        continue;
                    }
                    if best.is_none_or(|x| b.inflight() < x.inflight()) {
                        best = Some(b);
                    }
                }
                best?.clone()
            };
            // Routed out between the choice and the count: choose again.
            if let Some(g) = chosen.acquire() {
                return Some(g);
            }
        }
    }

    /// Records a response or connection that ended well or badly.
    fn count(&self, backend: Option<&Backend>, ok: bool) {
        self.add(backend, |c| &c.served);
        if !ok {
            self.add(backend, |c| &c.errors);
        }
    }

    /// A request or connection failed on `backend` before its client saw
    /// anything and goes again: `backend` is probed now, counted as
    /// retried, and added to `tried` (left out of the next pick).
    fn retry_elsewhere(&self, backend: &Backend, tried: &mut Vec<InstanceId>) {
        backend.suspect();
        self.add(Some(backend), |c| &c.retried);
        tried.push(backend.id);
    }

    /// Records how long a request (http) or connection (tcp) took.
    fn took(&self, took: Duration) {
        self.latency.observe(took);
    }

    /// How long requests (http) or connections (tcp) took.
    pub fn latency(&self) -> LatencySnapshot {
        self.latency.snapshot()
    }

    /// Totals: served, errors, retried, abandoned; in flight now.
    pub fn totals(&self) -> ([u64; 4], usize) {
        let t = &self.totals;
        let inflight = self.known.lock().iter().map(|b| b.inflight()).sum();
        (
            [
                t.get(|c| &c.served),
                t.get(|c| &c.errors),
                t.get(|c| &c.retried),
                t.get(|c| &c.abandoned),
            ],
            inflight,
        )
    }

    /// Each instance's counts: its id, served, errors, retried, in flight.
    pub fn per_instance(&self) -> Vec<(InstanceId, [u64; 3], usize)> {
        self.known
            .lock()
            .iter()
            .map(|b| {
                let c = &b.counts;
                (
                    b.id,
                    [
                        c.get(|c| &c.served),
                        c.get(|c| &c.errors),
                        c.get(|c| &c.retried),
                    ],
                    b.inflight(),
                )
            })
            .collect()
    }

    /// Records a request whose client left before its response was through.
    fn abandoned(&self, backend: &Backend) {
        self.add(Some(backend), |c| &c.abandoned);
    }

    fn add(&self, backend: Option<&Backend>, counter: fn(&Counts) -> &AtomicU64) {
        self.totals.add(counter);
        if let Some(b) = backend {
            b.counts.add(counter);
        }
    }

    /// The `traffic` file; `number` maps an instance to its number.
    pub fn render(&self, number: impl Fn(InstanceId) -> Option<u32>) -> String {
        let s = *self.settings.read();
        let what = match s.mode {
            Mode::Http => "requests",
            Mode::Tcp => "connections",
        };
        let known = self.known.lock().clone();
        let inflight: usize = known.iter().map(|b| b.inflight()).sum();
        let t = &self.totals;
        let mut out = format!(
            "port {} {}\n{what} {}\ninflight {inflight}\nerrors {}\nretried {}\n",
            s.port,
            s.mode.name(),
            t.get(|c| &c.served),
            t.get(|c| &c.errors),
            t.get(|c| &c.retried),
        );
        // Only a request can be abandoned: a tcp connection has no answer
        // to wait for.
        let http = s.mode == Mode::Http;
        if http {
            out.push_str(&format!("abandoned {}\n", t.get(|c| &c.abandoned)));
        }
        // Owed and with no instance yet: being read, or queued. Two
        // counters read apart: never below zero.
        out.push_str(&format!(
            "waiting {}\n",
            self.owed().saturating_sub(inflight)
        ));
        out.push_str(&format!(
            "open {}\nmax_connections {}\n",
            self.admission.open(),
            self.admission.max()
        ));
        if let Some(log) = self.access.read().as_ref() {
            out.push_str(&format!("access_dropped {}\n", log.dropped()));
        }
        if let Some(why) = self.unbound.lock().as_ref() {
            out.push_str(&format!("not_listening {why}\n"));
        }
        let mut rows: Vec<(u32, &Arc<Backend>)> = known
            .iter()
            .filter_map(|b| Some((number(b.id)?, b)))
            .collect();
        rows.sort_by_key(|(n, _)| *n);
        for (n, b) in rows {
            let c = &b.counts;
            out.push_str(&format!(
                "instance {n} {what} {} inflight {} errors {} retried {}",
                c.get(|c| &c.served),
                b.inflight(),
                c.get(|c| &c.errors),
                c.get(|c| &c.retried),
            ));
            if http {
                out.push_str(&format!(" abandoned {}", c.get(|c| &c.abandoned)));
            }
            if !b.routed.load(Ordering::SeqCst) {
                out.push_str(" draining");
            }
            out.push('\n');
        }
        out
    }
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("settings", &self.settings())
            .finish()
    }
}

/// What every public port shares: the runtime the proxies run on, the
/// sockets deployd was given, and the descriptor budget.
#[derive(Clone)]
pub struct Proxies {
    rt: tokio::runtime::Handle,
    passed: Arc<activation::Passed>,
    budget: Arc<budget::Budget>,
}

impl Proxies {
    /// Starts the proxies' runtime (its own threads, one per two cores, so
    /// that traffic never waits for the engine, an fsync or a burst of
    /// spawns, and a connection's tasks are not passed between threads),
    /// with the sockets deployd was given and the budget of its open-file
    /// limit. Without a runtime of its own (its thread could not start),
    /// the proxies run on the current one.
    pub fn start(passed: activation::Passed) -> Proxies {
        let threads = std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1));
        let (tx, rx) = std::sync::mpsc::channel();
        // The multi-thread scheduler even for one worker: its LIFO slot runs
        // the task a forward just woke at once (measured: 81-85% of direct
        // throughput for tcp keep-alive against 74% with current_thread).
        let started = std::thread::Builder::new()
            .name("proxy-rt".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .thread_name("proxy")
                    .enable_all()
                    .build();
                match rt {
                    Ok(rt) => {
                        let _ = tx.send(Some(rt.handle().clone()));
                        rt.block_on(std::future::pending::<()>());
                    }
                    Err(e) => {
                        tracing::error!(
                            "cannot start the proxy runtime: {e}; proxying on the main one"
                        );
                        let _ = tx.send(None);
                    }
                }
            });
        let rt = match started.ok().and_then(|_| rx.recv().ok().flatten()) {
            Some(h) => h,
            None => tokio::runtime::Handle::current(),
        };
        Proxies {
            rt,
            passed: Arc::new(passed),
            budget: Arc::new(budget::Budget::of_this_process()),
        }
    }

    /// Proxies on the current runtime, with no passed socket.
    #[cfg(test)]
    pub fn for_test() -> Proxies {
        Proxies {
            rt: tokio::runtime::Handle::current(),
            passed: Arc::default(),
            budget: Arc::new(budget::Budget::from_limit(1 << 20)),
        }
    }

    /// The sockets deployd was given.
    pub fn passed(&self) -> &activation::Passed {
        &self.passed
    }

    /// The descriptor budget.
    pub fn budget(&self) -> &budget::Budget {
        &self.budget
    }
}

/// Says a line in the service's events.
pub type Note = Box<dyn Fn(String) + Send + Sync>;

/// How long a connection to an instance may take: on one host a refused
/// or accepted connect is immediate; another host's instance that does not
/// answer by then (its host cut off) is given up, and the request tried on
/// another instance, rather than left to the kernel's minutes of retries.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Connects to an instance, within [`CONNECT_TIMEOUT`].
pub async fn connect(addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no answer from {addr} within {}s",
                CONNECT_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// How long a taken port is left before it is tried again.
const BIND_RETRY: Duration = Duration::from_secs(2);

/// Listens on a service's port and serves it through its router, binding
/// again every 2s while the port is taken (by the program deployd takes
/// over from, say, which lets it go once stopped). That it is taken, and
/// that it is listening at last, go to the service's events through
/// `note`, and its `traffic` file says `not_listening` meanwhile. A socket
/// for the port passed by socket activation ([`activation`]) is used as it
/// is, wherever it is bound.
pub fn listen(
    proxies: &Proxies,
    bind: IpAddr,
    settings: Settings,
    service: String,
    note: Note,
) -> Arc<Router> {
    let router = Arc::new(Router::new(settings, proxies.budget.clone()));
    let r = router.clone();
    let passed = proxies.passed.take(settings.port);
    let task = proxies.rt.spawn(async move {
        let mut addr = SocketAddr::new(bind, settings.port);
        let passed = passed.map(|l| l.and_then(TcpListener::from_std));
        let listener = match passed {
            Some(Ok(l)) => {
                addr = l.local_addr().unwrap_or(addr);
                Some(l)
            }
            Some(Err(e)) => {
                tracing::warn!(service = %service, "the passed socket for port {}: {e}", settings.port);
                None
            }
            None => None,
        };
        let listener = match listener {
            Some(l) => l,
            None => loop {
                match TcpListener::bind(addr).await {
                    Ok(l) => {
                        r.bound_here.store(true, Ordering::SeqCst);
                        if r.unbound.lock().take().is_some() {
                            note(format!("listening on {addr} ({}) at last", settings.mode.name()));
                        }
                        break l;
                    }
                    Err(e) => {
                        let why = format!("cannot listen on {addr}: {e}");
                        // Said again only when the reason changes.
                        let said = r.unbound.lock().replace(why.clone());
                        if said.as_deref() != Some(why.as_str()) {
                            let every = BIND_RETRY.as_secs();
                            tracing::warn!(service = %service, "{why}; trying again every {every}s");
                            note(format!(
                                "{why}; trying again every {}s; the instances run, but nothing reaches them through port {}",
                                BIND_RETRY.as_secs(),
                                settings.port
                            ));
                        }
                        tokio::time::sleep(BIND_RETRY).await;
                    }
                }
            },
        };
        if let Err(e) = tune_listener(&listener) {
            tracing::warn!(service = %service, "socket options on {addr}: {e}");
        }
        {
            use std::os::fd::AsFd;
            *r.socket.lock() = listener.as_fd().try_clone_to_owned().ok();
        }
        tracing::info!(service = %service, "listening on {addr} ({})", settings.mode.name());
        // After a failed accept, how long until the next try.
        let mut backoff: Option<Duration> = None;
        loop {
            // At its max_connections, or with the budget spent, the port
            // takes nothing more until a connection ends: new ones wait
            // in the backlog.
            let admitted = r.admission.admit().await;
            let fds = r.budget.connection().await;
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                // Its socket shut down by stop_listening.
                Err(_) if r.unlistened.load(Ordering::SeqCst) => return,
                Err(e) => {
                    // Out of descriptors or memory (deployd's or the
                    // system's): try again later, each time later, rather
                    // than spin; said once until an accept works again.
                    let wait = backoff.map_or(ACCEPT_BACKOFF_MIN, |b| (b * 2).min(ACCEPT_BACKOFF_MAX));
                    if backoff.is_none() {
                        tracing::warn!(service = %service, "accept on {addr}: {e}; backing off");
                        let whose = match crate::short::shortage(&e) {
                            Some(what) => format!("deployd is short of {what}"),
                            None => "deployd's accept failed".to_string(),
                        };
                        note(format!(
                            "{whose} ({e}): port {} takes no new connection for now; trying again \
                             every {} at most",
                            settings.port,
                            deployd_lib::manifest::format_duration(ACCEPT_BACKOFF_MAX)
                        ));
                    }
                    backoff = Some(wait);
                    drop((admitted, fds));
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            if backoff.take().is_some() {
                note(format!("port {} accepts connections again", settings.port));
            }
            let r = r.clone();
            let counted = r.accept();
            let permit = budget::Permit::new(admitted, fds);
            match settings.mode {
                Mode::Http => tokio::spawn(http::serve(stream, peer, r, counted, permit)),
                Mode::Tcp => tokio::spawn(tcp::serve(stream, peer, r, counted, permit)),
            };
        }
    });
    *router.listener.lock() = Some(task.abort_handle());
    router
}

/// The first wait after a failed accept; it doubles at each failure.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest wait after a failed accept.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Sets what every client socket accepted on `l` inherits (Linux copies a
/// listener's options at accept, so this costs no system call per
/// connection): `TCP_NODELAY`, and keepalive probes after 60 s of silence,
/// every 10 s, 6 of them. A client that vanished without a word (powered
/// off, forgotten by a NAT) is then noticed within two minutes: its
/// connection is closed and stops counting as in flight on its instance,
/// where in tcp mode nothing else would ever close it, and an instance
/// behind deployd cannot probe the client itself.
fn tune_listener(l: &TcpListener) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(l);
    sock.set_tcp_nodelay(true)?;
    sock.set_keepalive(true)?;
    let probes = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    sock.set_tcp_keepalive(&probes)
}

impl Router {
    /// The settings it was started with.
    pub fn settings(&self) -> Settings {
        *self.settings.read()
    }

    /// Changes how long requests wait for an instance, and for its answer.
    pub fn set_timeouts(&self, queue: Duration, response: Option<Duration>) {
        let mut s = self.settings.write();
        s.queue_timeout = queue;
        s.response_timeout = response;
    }

    /// Changes how many client connections the port holds at once.
    pub fn set_max_connections(&self, max: Option<u32>) {
        self.settings.write().max_connections = max;
        let max = max.map_or_else(|| self.budget.default_max_connections(), |n| n as usize);
        self.admission.set_max(max);
    }

    /// Changes which clients' `X-Forwarded-For` is believed.
    pub fn set_trusted(&self, trusted: Vec<Cidr>) {
        *self.trusted.write() = trusted;
    }

    /// What becomes of the `X-Forwarded-For` a client at `ip` sends.
    fn xff_for(&self, ip: IpAddr) -> Xff {
        match self.trusted.read().iter().any(|c| c.contains(ip)) {
            true => Xff::Append,
            false => Xff::Replace,
        }
    }

    /// Logs each request (http) or connection (tcp) to `log` from now on,
    /// or none.
    pub fn set_access_log(&self, log: Option<Arc<access::AccessLog>>) {
        *self.access.write() = log;
    }

    /// Whether there is an access log.
    pub fn has_access_log(&self) -> bool {
        self.access.read().is_some()
    }

    /// The access log, if requests are logged.
    fn access_log(&self) -> Option<Arc<access::AccessLog>> {
        self.access.read().clone()
    }

    /// Stops listening; connections already accepted go on. A port this
    /// deployd bound refuses connections from the moment this returns: the
    /// aborted accept loop drops its listener only when the proxy runtime
    /// next gets to it, and until then the kernel would still queue
    /// connections that nobody accepts (reset at the close), so the socket
    /// is shut down here. One systemd passed stays listening: its
    /// connections wait in the backlog for the next deployd.
    pub fn stop_listening(&self) {
        self.unlistened.store(true, Ordering::SeqCst);
        if let Some(t) = self.listener.lock().take() {
            t.abort();
        }
        if self.bound_here.load(Ordering::SeqCst) {
            if let Some(fd) = self.socket.lock().as_ref() {
                use nix::sys::socket::{Shutdown, shutdown};
                use std::os::fd::AsRawFd;
                let _ = shutdown(fd.as_raw_fd(), Shutdown::Read);
            }
        }
    }

    /// Takes the listening socket, if it is bound, for a deployd replacing
    /// itself to hand on: after [`Router::finish`] it stays open, and
    /// connections wait in its backlog for the next deployd.
    pub fn take_socket(&self) -> Option<std::os::fd::OwnedFd> {
        self.socket.lock().take()
    }

    /// deployd is stopping: it stops listening, idle client connections
    /// close, and the others close once the request in flight is answered
    /// (http; the answer says `Connection: close`). A tcp connection goes
    /// on until it ends or its instance is closed.
    pub fn finish(&self) {
        self.stop_listening();
        // Closed, unless taken first: new connections are refused.
        self.socket.lock().take();
        self.finishing.store(true, Ordering::SeqCst);
        self.finished.send_replace(true);
    }

    fn finishing(&self) -> bool {
        self.finishing.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use tokio::net::{TcpListener, TcpStream};

    fn get_int_opt(fd: std::os::fd::RawFd, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes an int and its length into ours.
        let r = unsafe {
            libc::getsockopt(
                fd,
                level,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        v
    }

    /// A port deployd bound stops listening as stop_listening returns, not
    /// when the proxy runtime gets to drop the aborted accept loop; the
    /// port can be bound again at once (a service's proxy mode changed).
    #[tokio::test]
    async fn a_port_deployd_bound_stops_listening_at_once() {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let settings = super::Settings {
            port,
            mode: super::Mode::Tcp,
            queue_timeout: std::time::Duration::from_secs(1),
            response_timeout: None,
            max_connections: None,
        };
        let r = super::listen(
            &super::Proxies::for_test(),
            [127, 0, 0, 1].into(),
            settings,
            "t".into(),
            Box::new(|_| {}),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while r.socket.lock().is_none() {
            assert!(std::time::Instant::now() < deadline, "never listened");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let fd = r.socket.lock().as_ref().unwrap().as_raw_fd();
        assert_eq!(get_int_opt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN), 1);
        r.stop_listening();
        // No await since: the accept loop may well still hold its listener.
        assert_eq!(get_int_opt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN), 0);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        let again = std::net::TcpListener::bind(("127.0.0.1", port));
        assert!(again.is_ok(), "{again:?}");
    }

    #[tokio::test]
    async fn accepted_client_sockets_inherit_nodelay_and_keepalive() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        super::tune_listener(&l).unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let fd = s.as_raw_fd();
        assert_eq!(get_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY), 1);
        assert_eq!(get_int_opt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 60);
        assert_eq!(get_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 10);
        assert_eq!(get_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 6);
    }
}
