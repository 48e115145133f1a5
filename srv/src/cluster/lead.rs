//! The leader task: the campaign for the `leader` key, and while this host
//! holds it, the rounds of `deployd_lib::cluster::leader`: what etcd
//! says in, one guarded transaction out.
//!
//! The `leader` key is created bound to this host's lease, in a
//! transaction that succeeds only if there is none. Every round's writes
//! are compared against that key's creation revision, so a deposed leader
//! (its lease expired, another elected) cannot write: its transaction
//! fails, and it drops what it had and campaigns again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deployd_lib::cluster::leader::{Input, Leader, Op, State0};
use deployd_lib::cluster::{Key, decode};
use deployd_lib::rollout::Instant;
use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};

use super::{Link, wall_ms};

/// Most operations in one transaction (etcd's default limit is 128).
const MAX_OPS: usize = 100;

/// Why leading stopped.
#[derive(Debug)]
enum Stop {
    /// Another host leads (a round's compare failed).
    Deposed,
    /// etcd failed.
    Etcd(String),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Deposed => f.write_str("another host leads"),
            Stop::Etcd(e) => write!(f, "etcd: {e}"),
        }
    }
}

impl From<etcd_client::Error> for Stop {
    fn from(e: etcd_client::Error) -> Stop {
        Stop::Etcd(e.to_string())
    }
}

/// Campaigns while no host leads; leads while this one does.
pub async fn lead(link: Arc<Link>, manifests: PathBuf) {
    let mut leader = link.leader.subscribe();
    let mut client = link.client.clone();
    loop {
        let lease = *link.lease.lock();
        let Some(lease) = lease else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let named = leader.borrow_and_update().clone();
        if named.as_ref().is_some_and(|n| *n != link.me) {
            // Woken when the copy says the key changed, or now and then.
            let _ = tokio::time::timeout(Duration::from_secs(1), leader.changed()).await;
            continue;
        }
        let key = link.keys.key(&Key::Leader);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                link.me.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let won = match client.txn(txn).await {
            Ok(r) if r.succeeded() => r.header().map(|h| h.revision()),
            // The key is this host's still, under its lease: a term cut
            // short by etcd going away (which renews leases when it
            // comes back). This host leads again, from etcd's state.
            Ok(r) => r.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .filter(|kv| kv.value() == link.me.as_str().as_bytes() && kv.lease() == lease)
                    .map(|kv| kv.create_revision()),
                _ => None,
            }),
            Err(_) => {
                tokio::time::sleep(super::RETRY).await;
                continue;
            }
        };
        let Some(rev) = won else {
            // Another host won; the copy will say which.
            let _ = tokio::time::timeout(Duration::from_millis(500), leader.changed()).await;
            continue;
        };
        tracing::info!("{} leads the cluster", link.me);
        let why = run(&link, &mut client, rev, &manifests).await;
        tracing::warn!("{} no longer leads: {why}", link.me);
        // Let the others elect one at once, if the key is still this one's.
        let resign = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, rev)])
            .and_then([TxnOp::delete(key, None)]);
        let _ = client.txn(resign).await;
        tokio::time::sleep(super::RETRY).await;
    }
}

/// One term: the state from etcd, then rounds until a write fails.
async fn run(link: &Link, client: &mut Client, term: i64, manifests: &std::path::Path) -> Stop {
    match lead_term(link, client, term, manifests).await {
        Ok(never) => match never {},
        Err(stop) => stop,
    }
}

enum Never {}

async fn lead_term(
    link: &Link,
    client: &mut Client,
    term: i64,
    manifests: &std::path::Path,
) -> Result<Never, Stop> {
    // The leader's clock: far from its epoch, so that instants a snapshot
    // holds from before this process are still after it.
    let epoch = tokio::time::Instant::now();
    let offset = Duration::from_secs(1 << 32);
    let now = || Instant::from_epoch(offset + epoch.elapsed());
    let prefix = link.keys.prefix().to_string();
    let got = client
        .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
        .await?;
    let rev = got.header().map_or(0, |h| h.revision());
    let mut state = State0::default();
    for kv in got.kvs() {
        let Some(key) = link.keys.parse(kv.key()) else {
            continue;
        };
        if let Err(e) = take(&mut state, key, kv.value(), kv.mod_revision() as u64) {
            tracing::warn!("{}: {e}; left out", String::from_utf8_lossy(kv.key()));
        }
    }
    let mut leader = Leader::new(link.me.clone(), link.keys.clone(), manifests);
    leader.take_over(now(), wall_ms(), state);
    let mut held = Held::default();
    commit(link, client, &mut leader, term, now(), &mut held, true).await?;
    let options = etcd_client::WatchOptions::new()
        .with_prefix()
        .with_start_revision(rev + 1);
    let mut stream = client.watch(prefix, Some(options)).await?;
    loop {
        let wake = leader
            .next_deadline()
            .map(|t| epoch + t.as_duration().saturating_sub(offset));
        let flush = held.since.map(|t| t + HOLD);
        tokio::select! {
            _ = sleep_until(flush) => {
                commit(link, client, &mut leader, term, now(), &mut held, true).await?;
                continue;
            }
            msg = stream.message() => {
                let mut resp = msg?.ok_or_else(|| Stop::Etcd("the watch ended".into()))?;
                loop {
                    if resp.canceled() {
                        return Err(Stop::Etcd(format!("watch cancelled: {}", resp.cancel_reason())));
                    }
                    feed(link, &mut leader, &resp, now());
                    // What else has come meanwhile (a batch's hosts report
                    // within a millisecond of each other) makes the same
                    // round: one transaction, not one each.
                    match ready_now(stream.message()) {
                        Some(Ok(Some(more))) => resp = more,
                        Some(Ok(None)) => return Err(Stop::Etcd("the watch ended".into())),
                        Some(Err(e)) => return Err(e.into()),
                        None => break,
                    }
                }
            }
            _ = sleep_until(wake) => leader.handle(now(), wall_ms(), Input::Tick),
        }
        commit(link, client, &mut leader, term, now(), &mut held, false).await?;
    }
}

/// A watch response's changes, as the leader's inputs.
fn feed(link: &Link, leader: &mut Leader, resp: &etcd_client::WatchResponse, now: Instant) {
    for ev in resp.events() {
        let Some(kv) = ev.kv() else { continue };
        let Some(key) = link.keys.parse(kv.key()) else {
            continue;
        };
        let value = match ev.event_type() {
            etcd_client::EventType::Put => Some(kv.value()),
            etcd_client::EventType::Delete => None,
        };
        match input(key, value) {
            Ok(Some(i)) => leader.handle(now, wall_ms(), i),
            Ok(None) => {}
            Err(e) => tracing::warn!("{}: {e}; left out", String::from_utf8_lossy(kv.key())),
        }
    }
}

/// `f`'s output if it has one at its first poll. Not a zero timeout: a
/// tokio timer fires at the driver's next millisecond tick, which made
/// every round wait up to a millisecond for nothing.
fn ready_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// A key read at take-over, into the state.
fn take(state: &mut State0, key: Key, v: &[u8], rev: u64) -> Result<(), String> {
    match key {
        Key::Host(h) => state.hosts.push((h, decode(v)?)),
        Key::Service(s) => state.services.push((s, decode(v)?)),
        Key::Routes(s) => state.routes.push((s, decode(v)?, rev)),
        Key::Assign(h, s, id) => state.assigns.push((h, s, id, decode(v)?)),
        Key::Status(h, s, id) => state.statuses.push((h, s, id, decode(v)?)),
        Key::Ack(h) => state.acks.push((h, decode(v)?)),
        Key::Drain(h) => state.drains.push(h),
        Key::Command(id) => state.commands.push((id, decode(v)?)),
        Key::Leader | Key::Event(..) | Key::Reply(..) => {}
    }
    Ok(())
}

/// A change the leader hears of, as its input.
fn input(key: Key, value: Option<&[u8]>) -> Result<Option<Input>, String> {
    Ok(Some(match key {
        Key::Host(h) => match value {
            Some(v) => Input::HostUp(h, decode(v)?),
            None => Input::HostDown(h),
        },
        Key::Status(host, service, id) => Input::Status {
            host,
            service,
            id,
            status: value.map(decode).transpose()?,
        },
        Key::Ack(h) => Input::Ack(h, value.map(decode).transpose()?),
        Key::Drain(h) => Input::Drain(h, value.is_some()),
        Key::Command(id) => match value {
            Some(v) => Input::Command {
                id,
                command: decode(v)?,
            },
            None => return Ok(None),
        },
        _ => return Ok(None),
    }))
}

/// How long a round that writes only events, snapshots and the deletion
/// of ended instances' assignments, with no service's version, status or
/// progress changed, may wait for the next: nothing waits on those, and
/// the next round writes them with its own (a batch's statuses come one
/// after another, and each transaction held back is one fewer that the
/// next status's round queues behind in etcd).
const HOLD: Duration = Duration::from_millis(50);

/// Writes held back: only events and snapshots, the last value per key.
#[derive(Default)]
struct Held {
    ops: std::collections::BTreeMap<String, Op>,
    since: Option<tokio::time::Instant>,
}

/// Ends a round: its writes, guarded by this term's leader key; held back
/// (up to [`HOLD`]) when they are only events and snapshots, unless
/// `flush`.
async fn commit(
    link: &Link,
    client: &mut Client,
    leader: &mut Leader,
    term: i64,
    now: Instant,
    held: &mut Held,
    flush: bool,
) -> Result<(), Stop> {
    let round = leader.round(now, wall_ms());
    for (error, line) in &round.logs {
        match error {
            true => tracing::error!("leader: {line}"),
            false => tracing::info!("leader: {line}"),
        }
    }
    let (events, services) = (link.keys.dir("events"), link.keys.dir("services"));
    let assign = link.keys.dir("assign");
    let lazy = |op: &Op| match op {
        Op::Put(k, _) => k.starts_with(&events) || k.starts_with(&services),
        // An ended instance's assignment: its host waits for nothing.
        Op::Delete(k) => {
            k.starts_with(&events) || k.starts_with(&services) || k.starts_with(&assign)
        }
        Op::DeletePrefix(_) => false,
    };
    let urgent = round.shown || round.ops.iter().any(|op| !lazy(op));
    for op in round.ops {
        let key = match &op {
            Op::Put(k, _) | Op::Delete(k) | Op::DeletePrefix(k) => k.clone(),
        };
        held.ops.insert(key, op);
    }
    if held.ops.is_empty() {
        return Ok(());
    }
    if !urgent && !flush {
        held.since.get_or_insert_with(tokio::time::Instant::now);
        return Ok(());
    }
    held.since = None;
    let guard = Compare::create_revision(link.keys.key(&Key::Leader), CompareOp::Equal, term);
    let mut last = 0;
    // Snapshots last: a round split in several transactions leaves a
    // snapshot behind its assignments, never ahead.
    let mut ops: Vec<Op> = std::mem::take(&mut held.ops).into_values().collect();
    let services = link.keys.dir("services");
    ops.sort_by_key(|op| matches!(op, Op::Put(k, _) if k.starts_with(&services)));
    for chunk in ops.chunks(MAX_OPS) {
        let txn_ops: Vec<TxnOp> = chunk
            .iter()
            .map(|op| match op {
                Op::Put(k, v) => TxnOp::put(k.clone(), v.clone(), None),
                Op::Delete(k) => TxnOp::delete(k.clone(), None),
                Op::DeletePrefix(p) => {
                    TxnOp::delete(p.clone(), Some(DeleteOptions::new().with_prefix()))
                }
            })
            .collect();
        let r = client
            .txn(Txn::new().when([guard.clone()]).and_then(txn_ops))
            .await?;
        if !r.succeeded() {
            return Err(Stop::Deposed);
        }
        last = r.header().map_or(0, |h| h.revision());
    }
    leader.committed(last as u64);
    Ok(())
}
