//! deployd as one host of several, coordinated through etcd: the I/O
//! around `deployd_lib::cluster`, whose decisions it carries out.
//!
//! [`join`] connects to etcd and registers this host: a key bound to a
//! lease that is kept alive every third of `host_timeout`. Then tasks
//! run beside the runtime, each owning its piece:
//!
//! - [`follow`]: a copy of every deployd key, kept current by a watch
//!   (and a full read again after any break), whose changes go to the
//!   runtime as [`Msg::Cluster`]; the namespace is built from it, so a
//!   read never waits on etcd.
//! - [`keep`]: the lease, registered again if it is lost.
//! - [`write`]: the host's statuses and acks, coalesced per key and
//!   written with the lease; retried while etcd is away.
//! - [`lead`](lead::lead): the campaign for the `leader` key, and while
//!   held, the leader's rounds.
//!
//! Commands written on this host go to the leader as keys
//! ([`Link::command`]); the answer comes back as a key too.

mod lead;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use deployd_lib::cluster::{Command, HostRecord, Key, Keys, Reply, What, decode, encode};
use deployd_lib::name::HostName;
use deployd_lib::rollout::{Refusal, RefusalKind};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, WatchOptions,
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config;
use crate::runtime::Msg;

/// How long a command waits for the leader to take it.
const COMMAND_WAIT: Duration = Duration::from_secs(10);
/// How long a command the leader took waits for its answer.
const ANSWER_WAIT: Duration = Duration::from_secs(30);
/// Pause before etcd is tried again after an error.
const RETRY: Duration = Duration::from_millis(300);

/// What the cluster tells the runtime.
pub enum Event {
    /// Keys changed, in the order etcd changed them; the copy is now at
    /// `rev`.
    Changes {
        /// The changes.
        changes: Vec<Change>,
        /// The revision the copy is at.
        rev: u64,
        /// The leader's answers to this host's commands, for their
        /// writers once the changes are in the namespace
        /// ([`Link::answer`]): a writer who reads after its answer sees
        /// what the command did.
        replies: Vec<(String, Reply)>,
    },
    /// This host has a (new) lease: every status and ack is written again.
    /// `again`: it had one before, which expired (it was taken for lost).
    Registered {
        /// It had a lease before.
        again: bool,
    },
    /// Whether etcd answers changed.
    Health,
    /// A command this host wrote to etcd itself (`drain`): its writer is
    /// answered once the copy has its revision, so that a read after the
    /// answer sees what it did.
    Done {
        /// The revision of its write (0: nothing was written).
        rev: u64,
        /// Its answer.
        result: Result<String, Refusal>,
        /// Its writer.
        done: crate::runtime::CtlDone,
    },
}

/// One key's change.
#[derive(Debug)]
pub struct Change {
    /// The key.
    pub key: Key,
    /// Its new value; `None`: deleted.
    pub value: Option<Vec<u8>>,
    /// The revision that changed it (after a full read, a deletion's is
    /// the read's); `None` from the copy kept on disk.
    pub rev: Option<u64>,
}

/// Whether etcd answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// It does.
    Reachable,
    /// It has not since then, with the last error.
    Unreachable(SystemTime, String),
}

/// A host's write, with its lease.
enum Write {
    Put(String, Vec<u8>),
    Delete(String),
}

/// This host's link to the cluster, shared by the runtime and the tasks.
pub struct Link {
    /// This host's name.
    pub me: HostName,
    /// Where deployd's keys are.
    pub keys: Keys,
    /// Where other hosts reach this host's instances.
    pub address: IpAddr,
    /// When this deployd started (ms since the Unix epoch).
    pub boot: u64,
    /// The lease's TTL.
    pub host_timeout: Duration,
    /// The token that makes this host this host (see [`HostRecord::id`]).
    id: String,
    client: Client,
    lease: Mutex<Option<i64>>,
    health: Mutex<Health>,
    writes: mpsc::UnboundedSender<Write>,
    waiting: Mutex<HashMap<String, oneshot::Sender<Reply>>>,
    next: AtomicU64,
    /// The leader, as the copy says.
    leader: watch::Sender<Option<HostName>>,
    /// Where the copy is kept, and the copy.
    copy: Mutex<Option<(std::path::PathBuf, Arc<Mutex<Copy>>)>>,
    runtime: mpsc::UnboundedSender<Msg>,
}

/// Why this host cannot join.
#[derive(Debug)]
pub enum JoinError {
    /// A live host already has this name.
    Taken(HostName, IpAddr),
    /// The configuration cannot be used: what.
    Config(String),
}

impl std::fmt::Display for JoinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JoinError::Taken(h, a) => write!(
                f,
                "[cluster] host: a live host at {a} is named {h} already; give this one another name (it takes over nothing)"
            ),
            JoinError::Config(why) => write!(f, "[cluster] {why}"),
        }
    }
}

impl std::error::Error for JoinError {}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Connects to etcd and registers this host; starts the tasks. With etcd
/// unreachable, says so and goes on: the host serves what it has, and
/// joins once etcd answers. A name a live host holds is refused.
pub async fn join(
    cfg: &config::Cluster,
    state: &Path,
    manifests: &Path,
    runtime: mpsc::UnboundedSender<Msg>,
) -> Result<Arc<Link>, JoinError> {
    let address = match cfg.address {
        Some(a) => a,
        None => default_address().map_err(JoinError::Config)?,
    };
    let id = host_id(state).map_err(|e| JoinError::Config(format!("host id: {e}")))?;
    let client = connect(cfg).await?;
    let (writes, rx) = mpsc::unbounded_channel();
    let link = Arc::new(Link {
        me: cfg.host.clone(),
        keys: Keys::new(&cfg.prefix),
        address,
        boot: wall_ms(),
        host_timeout: cfg.host_timeout,
        id,
        client,
        lease: Mutex::new(None),
        health: Mutex::new(Health::Reachable),
        writes,
        waiting: Mutex::new(HashMap::new()),
        next: AtomicU64::new(0),
        leader: watch::channel(None).0,
        copy: Mutex::new(None),
        runtime,
    });
    let first = tokio::time::timeout(Duration::from_secs(3), register(&link)).await;
    let joined = matches!(first, Ok(Ok(_)));
    match first {
        Ok(Ok(lease)) => {
            *link.lease.lock() = Some(lease);
            tracing::info!(
                "joined the cluster as {} ({}), lease {lease:x}",
                link.me,
                link.address
            );
        }
        Ok(Err(Registration::Taken(rec))) => {
            return Err(JoinError::Taken(link.me.clone(), rec.address));
        }
        Ok(Err(Registration::Etcd(e))) => {
            link.unreachable(&e);
            tracing::warn!(
                "etcd unreachable at start ({e}); serving what this host has, joining once it answers"
            );
        }
        Err(_) => {
            link.unreachable("no answer within 3s");
            tracing::warn!(
                "etcd unreachable at start (no answer within 3s); serving what this host has, joining once it answers"
            );
        }
    }
    tokio::spawn(keep(link.clone()));
    // With etcd away, what this host last knew: it brings back what it
    // ran, and its namespace shows the cluster as it was.
    let copy_file = state.join("copy.json");
    let copy = match joined {
        true => BTreeMap::new(),
        false => load_copy(&copy_file),
    };
    if !copy.is_empty() {
        tracing::info!(
            "etcd unreachable: starting from this host's last copy of the cluster ({} keys)",
            copy.len()
        );
        let all = copy
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone()), None))
            .collect();
        link.tell(all, 0);
    }
    let copy = Arc::new(Mutex::new(copy));
    let (changed, saving) = watch::channel(());
    *link.copy.lock() = Some((copy_file.clone(), copy.clone()));
    tokio::spawn(save_copy(copy_file, copy.clone(), saving));
    tokio::spawn(follow(link.clone(), copy, changed));
    tokio::spawn(write(link.clone(), rx));
    tokio::spawn(lead::lead(link.clone(), manifests.to_path_buf()));
    Ok(link)
}

async fn connect(cfg: &config::Cluster) -> Result<Client, JoinError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
        .with_keep_alive_while_idle(true)
        // A member cut off from the others answers nothing rather than
        // stale data.
        .with_require_leader(true);
    if cfg.ca.is_some() || cfg.cert.is_some() {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| JoinError::Config(format!("{}: {e}", p.display())))
        };
        let mut tls = TlsOptions::new();
        if let Some(ca) = &cfg.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    if let Some((user, password)) = &cfg.auth {
        options = options.with_user(user, password);
    }
    Client::connect(&cfg.etcd, Some(options))
        .await
        .map_err(|e| JoinError::Config(format!("etcd: {e}")))
}

/// The token naming this host, kept in its state directory.
fn host_id(state: &Path) -> std::io::Result<String> {
    let path = state.join("host-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => {
            let mut bytes = [0u8; 16];
            getrandom(&mut bytes)?;
            let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            crate::store::write_atomic(&path, id.as_bytes(), true)?;
            Ok(id)
        }
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// The address of the interface with the default route: the source
/// address the kernel picks for a route out.
fn default_address() -> Result<IpAddr, String> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    // No packet is sent: connecting a UDP socket only picks a route.
    s.connect("192.0.2.1:9").map_err(|e| {
        format!("address: no default route to find this host's address by ({e}); set address")
    })?;
    let ip = s.local_addr().map_err(|e| e.to_string())?.ip();
    if ip.is_unspecified() || ip.is_loopback() {
        return Err("address: no address other hosts can reach was found; set address".into());
    }
    Ok(ip)
}

enum Registration {
    Taken(HostRecord),
    Etcd(String),
}

/// Registers this host under a new lease. The same host's earlier lease
/// (a deployd that died, or this one's, lost) is revoked first: its
/// instances ended with it or were moved.
async fn register(link: &Link) -> Result<i64, Registration> {
    let mut client = link.client.clone();
    let etcd = |e: etcd_client::Error| Registration::Etcd(e.to_string());
    let key = link.keys.key(&Key::Host(link.me.clone()));
    let got = client.get(key.clone(), None).await.map_err(etcd)?;
    if let Some(kv) = got.kvs().first() {
        match decode::<HostRecord>(kv.value()) {
            Ok(rec) if rec.id != link.id => return Err(Registration::Taken(rec)),
            Ok(rec) => {
                // This host's, from a deployd that ended (its state
                // directory is locked: no other runs). While its lease
                // lives, this one takes it on: the others never took the
                // host for lost, and its slots stay here, started again.
                let alive = client
                    .lease_time_to_live(rec.lease, None)
                    .await
                    .is_ok_and(|t| t.ttl() > 0);
                if alive {
                    let rec = HostRecord {
                        started_ms: link.boot,
                        address: link.address,
                        ..rec
                    };
                    let put = PutOptions::new().with_lease(rec.lease);
                    client
                        .put(key.clone(), encode(&rec), Some(put))
                        .await
                        .map_err(etcd)?;
                    link.reachable();
                    return Ok(rec.lease);
                }
                let _ = client.lease_revoke(rec.lease).await;
            }
            Err(_) => {
                let _ = client.delete(key.clone(), None).await;
            }
        }
    }
    let ttl = link.host_timeout.as_secs().max(1) as i64;
    let lease = client.lease_grant(ttl, None).await.map_err(etcd)?.id();
    let rec = HostRecord {
        address: link.address,
        id: link.id.clone(),
        lease,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory: memory(),
        started_ms: link.boot,
    };
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key.clone(),
            encode(&rec),
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(key, None)]);
    let r = client.txn(txn).await.map_err(etcd)?;
    if !r.succeeded() {
        let _ = client.lease_revoke(lease).await;
        return Err(Registration::Etcd(
            "another deployd registered this host's name at the same moment".into(),
        ));
    }
    link.reachable();
    Ok(lease)
}

fn memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(0)
}

/// Keeps the lease alive; registers again when it is lost (etcd away
/// longer than its TTL: the other hosts took this one for lost).
async fn keep(link: Arc<Link>) {
    let mut client = link.client.clone();
    let mut had = link.registered();
    loop {
        let current = *link.lease.lock();
        let lease = match current {
            Some(l) => l,
            None => match register(&link).await {
                Ok(l) => {
                    *link.lease.lock() = Some(l);
                    tracing::info!("registered as {}, lease {l:x}", link.me);
                    let again = std::mem::replace(&mut had, true);
                    let _ = link.runtime.send(Msg::Cluster(Event::Registered { again }));
                    l
                }
                Err(Registration::Taken(rec)) => {
                    tracing::error!(
                        "a host at {} has taken the name {} meanwhile; this one stays out of the cluster",
                        rec.address,
                        link.me
                    );
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
                Err(Registration::Etcd(e)) => {
                    link.unreachable(&e);
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            },
        };
        // Kept alive until etcd itself says the lease is gone (it expired:
        // the others took this host for lost). etcd away is no such word:
        // when it has a leader again it renews every lease, and this host
        // keeps its name and its instances.
        let every = link.host_timeout / 3;
        let gone = |e: &str| e.contains("lease not found");
        'alive: loop {
            if *link.lease.lock() != Some(lease) {
                break 'alive;
            }
            let (mut keeper, mut stream) = match client.lease_keep_alive(lease).await {
                Ok(k) => k,
                Err(e) => {
                    let e = e.to_string();
                    link.unreachable(&e);
                    if gone(&e) {
                        break 'alive;
                    }
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            loop {
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(every, stream.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => link.reachable(),
                    Ok(Ok(Some(_))) => break 'alive,
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => {
                        let e = e.to_string();
                        link.unreachable(&e);
                        if gone(&e) {
                            break 'alive;
                        }
                        break;
                    }
                    Err(_) => {
                        link.unreachable("no answer to the lease's keep-alive");
                        break;
                    }
                }
                if *link.lease.lock() != Some(lease) {
                    break 'alive;
                }
                tokio::time::sleep(every).await;
            }
            tokio::time::sleep(RETRY).await;
        }
        tracing::warn!(
            "this host's lease expired (etcd did not hear from it for {}s): the others took it for lost and moved its instances; registering again",
            link.host_timeout.as_secs()
        );
        let mut held = link.lease.lock();
        if *held == Some(lease) {
            *held = None;
        }
    }
}

/// Keeps the copy of every deployd key current, and tells the runtime
/// what changed: a full read, then a watch from there; after any break,
/// a full read again, compared with the copy.
async fn follow(link: Arc<Link>, copy: Arc<Mutex<Copy>>, changed: watch::Sender<()>) {
    let mut client = link.client.clone();
    let prefix = link.keys.prefix().to_string();
    loop {
        let got = match client
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
        {
            Ok(g) => g,
            Err(e) => {
                link.unreachable(&e.to_string());
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        link.reachable();
        let rev = got.header().map_or(0, |h| h.revision()) as u64;
        let fresh: BTreeMap<Vec<u8>, Vec<u8>> = got
            .kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
            .collect();
        let changes = {
            let mut held = copy.lock();
            let mut changes = Vec::new();
            for kv in got.kvs() {
                if held.get(kv.key()).map(Vec::as_slice) != Some(kv.value()) {
                    let rev = kv.mod_revision() as u64;
                    changes.push((kv.key().to_vec(), Some(kv.value().to_vec()), Some(rev)));
                }
            }
            for k in held.keys() {
                if !fresh.contains_key(k) {
                    changes.push((k.clone(), None, Some(rev)));
                }
            }
            *held = fresh;
            changes
        };
        changed.send_replace(());
        link.tell(changes, rev);
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev as i64 + 1);
        let mut stream = match client.watch(prefix.clone(), Some(options)).await {
            Ok(w) => w,
            Err(e) => {
                link.unreachable(&e.to_string());
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() || resp.compact_revision() > 0 {
                        let why = resp.cancel_reason().to_string();
                        link.unreachable(&format!("watch cancelled: {why}"));
                        break;
                    }
                    let rev = resp.header().map_or(0, |h| h.revision()) as u64;
                    let changes = apply(&mut copy.lock(), &resp);
                    if !changes.is_empty() {
                        // The saver takes the copy when it writes it
                        // (every 200 ms at most), not at every change.
                        changed.send_replace(());
                        link.tell(changes, rev);
                    }
                }
                Ok(None) => {
                    link.unreachable("the watch ended");
                    break;
                }
                Err(e) => {
                    link.unreachable(&e.to_string());
                    break;
                }
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// A watch response's events, applied to the copy; the changes, each
/// with its revision.
fn apply(copy: &mut Copy, resp: &etcd_client::WatchResponse) -> Vec<Raw> {
    let mut changes = Vec::new();
    for ev in resp.events() {
        let Some(kv) = ev.kv() else { continue };
        let key = kv.key().to_vec();
        let at = Some(kv.mod_revision() as u64);
        match ev.event_type() {
            etcd_client::EventType::Put => {
                copy.insert(key.clone(), kv.value().to_vec());
                changes.push((key, Some(kv.value().to_vec()), at));
            }
            etcd_client::EventType::Delete => {
                copy.remove(&key);
                changes.push((key, None, at));
            }
        }
    }
    changes
}

/// A key's change as etcd said it: key, value (`None`: deleted), revision.
type Raw = (Vec<u8>, Option<Vec<u8>>, Option<u64>);

/// A copy of deployd's keys.
type Copy = BTreeMap<Vec<u8>, Vec<u8>>;

/// The copy as `state/cluster/copy.json` keeps it; empty if there is none.
fn load_copy(path: &Path) -> Copy {
    let Ok(bytes) = std::fs::read(path) else {
        return Copy::new();
    };
    match serde_json::from_slice::<BTreeMap<String, String>>(&bytes) {
        Ok(m) => m
            .into_iter()
            .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
            .collect(),
        Err(e) => {
            tracing::warn!("{}: {e}; not used", path.display());
            Copy::new()
        }
    }
}

/// Keeps the copy on disk for a start while etcd is away: at once, then
/// at most every 200 ms (and at a stop, [`Link::keep_copy`]).
async fn save_copy(
    path: std::path::PathBuf,
    copy: Arc<Mutex<Copy>>,
    mut changed: watch::Receiver<()>,
) {
    while changed.changed().await.is_ok() {
        changed.borrow_and_update();
        let now = copy.lock().clone();
        let path = path.clone();
        let written = tokio::task::spawn_blocking(move || write_copy(&path, &now)).await;
        if let Ok(Err(e)) = written {
            tracing::warn!("cannot keep this host's copy of the cluster: {e}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn write_copy(path: &Path, copy: &Copy) -> std::io::Result<()> {
    let text: BTreeMap<String, String> = copy
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect();
    let bytes = serde_json::to_vec(&text).map_err(std::io::Error::other)?;
    crate::store::write_atomic(path, &bytes, false)
}

/// Writes the host's statuses and acks with its lease, the latest value
/// per key, as soon as there is a lease and etcd answers.
async fn write(link: Arc<Link>, mut rx: mpsc::UnboundedReceiver<Write>) {
    let mut client = link.client.clone();
    let mut pending: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(w) => add(&mut pending, w),
                None => return,
            }
        }
        while let Ok(w) = rx.try_recv() {
            add(&mut pending, w);
        }
        let Some(lease) = *link.lease.lock() else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let keys: Vec<String> = pending.keys().take(100).cloned().collect();
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|k| match &pending[k] {
                Some(v) => TxnOp::put(
                    k.clone(),
                    v.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                None => TxnOp::delete(k.clone(), None),
            })
            .collect();
        match client.txn(Txn::new().and_then(ops)).await {
            Ok(_) => {
                link.reachable();
                for k in keys {
                    pending.remove(&k);
                }
            }
            Err(e) => {
                let e = e.to_string();
                link.unreachable(&e);
                if e.contains("requested lease not found") {
                    *link.lease.lock() = None;
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

fn add(pending: &mut BTreeMap<String, Option<Vec<u8>>>, w: Write) {
    match w {
        Write::Put(k, v) => pending.insert(k, Some(v)),
        Write::Delete(k) => pending.insert(k, None),
    };
}

impl Link {
    fn reachable(&self) {
        let mut h = self.health.lock();
        if *h != Health::Reachable {
            *h = Health::Reachable;
            drop(h);
            tracing::info!("etcd answers again");
            let _ = self.runtime.send(Msg::Cluster(Event::Health));
        }
    }

    fn unreachable(&self, why: &str) {
        // gRPC's errors run long: the gist.
        let why = match why.split_once("message: \"") {
            Some((_, rest)) => rest.split('"').next().unwrap_or(rest),
            None => why,
        };
        let why: String = why.chars().take(120).collect();
        let why = why.as_str();
        let mut h = self.health.lock();
        if *h == Health::Reachable {
            *h = Health::Unreachable(SystemTime::now(), why.to_string());
            drop(h);
            tracing::warn!("etcd unreachable: {why}");
            let _ = self.runtime.send(Msg::Cluster(Event::Health));
        } else if let Health::Unreachable(_, last) = &mut *h {
            *last = why.to_string();
        }
    }

    /// Whether etcd answers.
    pub fn health(&self) -> Health {
        self.health.lock().clone()
    }

    /// Whether this host has a lease.
    pub fn registered(&self) -> bool {
        self.lease.lock().is_some()
    }

    /// Why a command cannot go to the leader now, if it cannot.
    fn unavailable(&self) -> Option<String> {
        if let Health::Unreachable(since, why) = self.health() {
            return Some(format!(
                "etcd unreachable since {} ({why}); nothing was changed",
                deployd_lib::stamp::at(since)
            ));
        }
        if !self.registered() {
            return Some("this host has not joined the cluster yet; nothing was changed".into());
        }
        if self.leader.borrow().is_none() {
            return Some(format!(
                "no host leads the cluster now (one is elected within host_timeout, {}s); nothing was changed",
                self.host_timeout.as_secs()
            ));
        }
        None
    }

    /// Hands what a batch of keys changed to the runtime; answers this
    /// host's commands.
    fn tell(&self, raw: Vec<Raw>, rev: u64) {
        let mut changes = Vec::with_capacity(raw.len());
        let mut replies = Vec::new();
        for (k, value, at) in raw {
            let Some(key) = self.keys.parse(&k) else {
                continue;
            };
            match &key {
                Key::Reply(h, id) if *h == self.me => {
                    if let Some(v) = &value {
                        match decode::<Reply>(v) {
                            Ok(r) => replies.push((id.clone(), r)),
                            Err(e) => tracing::warn!("a reply in etcd: {e}"),
                        }
                        let _ = self.writes.send(Write::Delete(self.keys.key(&key)));
                    }
                    continue;
                }
                Key::Leader => {
                    let name = value
                        .as_deref()
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|s| HostName::new(s).ok());
                    self.leader.send_replace(name);
                }
                _ => {}
            }
            changes.push(Change {
                key,
                value,
                rev: at,
            });
        }
        let _ = self.runtime.send(Msg::Cluster(Event::Changes {
            changes,
            rev,
            replies,
        }));
    }

    /// Answers the writer of this host's command `id`.
    pub fn answer(&self, id: &str, reply: Reply) {
        if let Some(tx) = self.waiting.lock().remove(id) {
            let _ = tx.send(reply);
        }
    }

    /// Writes a status or ack of this host (with its lease).
    pub fn put(&self, key: &Key, value: Vec<u8>) {
        let _ = self.writes.send(Write::Put(self.keys.key(key), value));
    }

    /// Deletes a key of this host's.
    pub fn delete(&self, key: &Key) {
        let _ = self.writes.send(Write::Delete(self.keys.key(key)));
    }

    /// Sends a command to the leader and waits for its answer. A command
    /// the leader did not take in time is withdrawn: nothing changed.
    pub async fn command(self: Arc<Self>, what: What) -> Result<String, Refusal> {
        let unavailable = |message: String| Refusal {
            kind: RefusalKind::Unavailable,
            message,
        };
        if let Some(why) = self.unavailable() {
            return Err(unavailable(why));
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{}-{n}", self.me, self.boot);
        let key = self.keys.key(&Key::Command(id.clone()));
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(id.clone(), tx);
        let command = Command {
            from: self.me.clone(),
            what,
        };
        let mut client = self.client.clone();
        if let Err(e) = client.put(key.clone(), encode(&command), None).await {
            self.waiting.lock().remove(&id);
            self.unreachable(&e.to_string());
            return Err(unavailable(format!("etcd: {e}; nothing was changed")));
        }
        let mut rx = rx;
        match tokio::time::timeout(COMMAND_WAIT, &mut rx).await {
            Ok(Ok(reply)) => return reply.result,
            Ok(Err(_)) => return Err(unavailable("deployd is shutting down".into())),
            Err(_) => {}
        }
        // Not answered: withdrawn if the leader has not taken it.
        let withdraw = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Greater, 0)])
            .and_then([TxnOp::delete(key, None)]);
        if let Ok(r) = client.txn(withdraw).await {
            if r.succeeded() {
                self.waiting.lock().remove(&id);
                return Err(unavailable(format!(
                    "no leader took the command within {}s; nothing was changed",
                    COMMAND_WAIT.as_secs()
                )));
            }
        }
        match tokio::time::timeout(ANSWER_WAIT, rx).await {
            Ok(Ok(reply)) => reply.result,
            _ => {
                self.waiting.lock().remove(&id);
                Err(unavailable(
                    "the leader took the command but its answer did not come back; see events for what it did"
                        .into(),
                ))
            }
        }
    }

    /// `drain` (or `undrain`) of a host: its instances move to the others,
    /// and it gets none.
    pub async fn drain(self: Arc<Self>, host: HostName, on: bool, done: crate::runtime::CtlDone) {
        let (rev, result) = match self.clone().write_drain(host, on).await {
            Ok((rev, msg)) => (rev, Ok(msg)),
            Err(r) => (0, Err(r)),
        };
        let _ = self
            .runtime
            .send(Msg::Cluster(Event::Done { rev, result, done }));
    }

    async fn write_drain(
        self: Arc<Self>,
        host: HostName,
        on: bool,
    ) -> Result<(u64, String), Refusal> {
        let refuse = |kind, message: String| Refusal { kind, message };
        if let Health::Unreachable(since, why) = self.health() {
            return Err(refuse(
                RefusalKind::Unavailable,
                format!(
                    "etcd unreachable since {} ({why}); nothing was changed",
                    deployd_lib::stamp::at(since)
                ),
            ));
        }
        let mut client = self.client.clone();
        let drain = self.keys.key(&Key::Drain(host.clone()));
        let etcd = |e: etcd_client::Error| {
            refuse(
                RefusalKind::Unavailable,
                format!("etcd: {e}; nothing was changed"),
            )
        };
        if !on {
            let r = client.delete(drain, None).await.map_err(etcd)?;
            let rev = r.header().map_or(0, |h| h.revision()) as u64;
            return Ok(match r.deleted() {
                0 => (0, format!("{host} was not drained")),
                _ => (
                    rev,
                    format!("{host} undrained: new instances may go on it again"),
                ),
            });
        }
        let known = self.keys.key(&Key::Host(host.clone()));
        let txn = Txn::new()
            .when([Compare::version(known, CompareOp::Greater, 0)])
            .and_then([TxnOp::put(drain, Vec::new(), None)]);
        let r = client.txn(txn).await.map_err(etcd)?;
        if !r.succeeded() {
            return Err(refuse(
                RefusalKind::NotFound,
                format!("no host named {host} is up"),
            ));
        }
        let rev = r.header().map_or(0, |h| h.revision()) as u64;
        Ok((
            rev,
            format!(
                "{host} drained: its instances move to other hosts a slot at a time, health-gated; see each service's events"
            ),
        ))
    }

    /// Writes the copy of the cluster as it is now (deployd stopping).
    pub fn keep_copy(&self) {
        let Some((path, copy)) = self.copy.lock().clone() else {
            return;
        };
        let now = copy.lock().clone();
        if let Err(e) = write_copy(&path, &now) {
            tracing::warn!("cannot keep this host's copy of the cluster: {e}");
        }
    }

    /// Gives up the lease (deployd stopping): the leader moves this host's
    /// instances at once rather than after host_timeout.
    pub async fn leave(&self) {
        let lease = self.lease.lock().take();
        if let Some(l) = lease {
            let mut client = self.client.clone();
            let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(l)).await;
        }
    }
}
