//! The HTTP/1.1 proxy: clients keep their connections to deployd (keep-alive
//! across every rollout); each request goes to a routed-in instance over a
//! pooled connection of that instance; bodies stream both ways in their own
//! framing.
//!
//! It is a forwarder, not a server and a client glued together: a request's
//! head is parsed (`httparse`), rewritten for the next hop (hop-by-hop
//! headers out, `X-Forwarded-For` in) and sent on; its body, then the
//! response's, pass through a buffer unchanged, the proxy only following
//! where each ends. A request costs two reads and two writes in the common
//! case and allocates nothing.
//!
//! A failed connect is retried on another instance (and the instance is
//! probed at once); an idempotent request without a body that fails before
//! any response byte is retried once on another instance, and besides once
//! on a new connection (to whichever instance balancing picks, the same one
//! included) when the pooled connection it used had been closed by the
//! instance. Upgrades (WebSocket) are tunnelled and count as in flight until
//! closed. A client that closes its connection while its request is with
//! an instance abandons the request (the instance's connection is closed).
//! A connection quiet for [`HOLD`] holds nothing but its socket.

mod body;
#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use deployd_lib::rollout::InstanceId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use body::{BodyError, Buf, Remaining};
use deployd_lib::http::head::{self, Framing, HeadError, RequestHead};

use super::access::Entry;
use super::budget::Permit;
use super::{Accepted, Backend, HOLD, Owed, Router};
use deployd_lib::http::chunked::Chunked;
use deployd_lib::http::head::Xff;

/// Idle connections kept per instance.
const MAX_IDLE: usize = 256;

/// A connection to an instance idle for longer than this is not used
/// again. Servers close idle keep-alive connections after a timeout of
/// their own (gunicorn 2 s, Node, uvicorn and Apache 5 s), and a request
/// sent on one just as its server closes it is lost: a GET is sent again,
/// but a POST may have done its work and gets a 502. Below every common
/// server's timeout, so that race never comes up; a service whose
/// connections wait longer than this between requests pays a loopback
/// connect (tens of µs) per request.
const POOL_IDLE: Duration = Duration::from_secs(1);

/// A request head must arrive whole within this of its first byte (a
/// client that dribbles one, Slowloris-style, holds nothing for long).
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// A request body may not pause longer than this between two reads: a
/// client that stops halfway through an upload does not hold its instance's
/// connection (and its drain) for ever. As nginx's `client_body_timeout`.
const BODY_IDLE: Duration = Duration::from_secs(30);

/// A client connection that has sent nothing at all for this long since it
/// was accepted is closed: a browser's preconnect is used within seconds,
/// and a connection that never sends holds a descriptor and a place among
/// its port's `max_connections` for nothing (a flood of them is how a
/// port is starved). As HAProxy's `timeout http-request`.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// A client connection with no request for this long is closed. Long, so
/// that clients' own pools (which often never time out) rarely send a
/// request on a connection just as deployd closes it; finite, so that
/// clients that vanished without a FIN do not hold connections forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// A connection to an instance.
pub(super) struct Conn {
    io: TcpStream,
    quickack: QuickAck,
    /// It has been in the pool (and so may have been closed since).
    pooled: bool,
    /// When it last went into the pool.
    since: Instant,
    /// Its descriptor of the budget once it has been in the pool: while a
    /// request uses it, its client's connection holds one for it.
    fd: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What a client connection in use keeps between its requests: allocated
/// once, so that a request allocates nothing; given back when the
/// connection goes idle.
struct Session {
    /// Read from the client, not yet passed on.
    cbuf: Buf,
    /// Read from the instance, not yet passed on.
    bbuf: Buf,
    /// The request head for the instance.
    out: Vec<u8>,
    /// The response head for the client.
    rout: Vec<u8>,
    /// Whether any of the current response went to the client.
    answered: bool,
}

/// How an exchange with an instance ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// A whole response went to the client.
    Done {
        status: u16,
        reusable: bool,
        keep_client: bool,
    },
    /// Nothing came from the instance and nothing went to the client.
    NoAnswer,
    /// The instance's answer was not HTTP, or broke off; `sent` if part of
    /// it went to the client.
    Broken { sent: bool },
    /// The client went away.
    ClientGone,
    /// The client's chunked body is malformed.
    BadBody,
    /// The client sent nothing of its request's body for [`BODY_IDLE`].
    Stalled,
    /// A 101 was passed on and the tunnel ran until a side closed.
    Upgraded,
    /// deployd closed the instance (its drain was over).
    Cut,
    /// The instance did not start its response within the manifest's
    /// `response_timeout`; nothing went to the client.
    TimedOut,
}

/// Serves one client connection: [`active`] while it is in use; once it
/// has had no request for [`HOLD`], its buffers and request machinery are
/// given back and it waits holding only its socket, until the client sends
/// again or [`IDLE_TIMEOUT`] passes. Clients keep connections open and idle
/// for minutes (browsers, client pools), thousands of them.
///
/// A connection's first request is owed an answer from the moment it is
/// accepted (its client has most likely sent it already): a deployd that
/// stops meanwhile waits for it, up to `drain`, rather than close the
/// connection under it. Idle between later requests, it closes at once,
/// as HTTP allows.
pub(super) async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    router: Arc<Router>,
    counted: Accepted,
    _permit: Permit,
) {
    let ip = peer.ip().to_string().into_bytes();
    let xff = router.xff_for(peer.ip());
    let mut first = Some(router.accepted(counted));
    // Whether the client has sent a byte yet.
    let mut spoke = false;
    loop {
        // Boxed, so that its state (about 5 KiB) exists only while in use.
        if !Box::pin(active(
            &mut client,
            &ip,
            xff,
            &router,
            &mut first,
            &mut spoke,
        ))
        .await
        {
            return;
        }
        let idle = first.is_none();
        if idle && router.finishing() {
            return;
        }
        let wait = match spoke {
            true => IDLE_TIMEOUT - HOLD,
            false => FIRST_BYTE_TIMEOUT - HOLD,
        };
        let mut finished = router.finished.subscribe();
        tokio::select! {
            r = tokio::time::timeout(wait, client.readable()) => match r {
                Ok(Ok(())) => {}
                // Idle too long: closed without a word, as HTTP allows.
                Ok(Err(_)) | Err(_) => return,
            },
            // deployd is stopping.
            Ok(_) = finished.wait_for(|f| *f), if idle => return,
            // The port is at its max_connections and a client waits: an
            // idle connection makes room (closed between requests, as
            // HTTP allows; its client opens another when it needs one).
            () = router.admission.full(), if idle => return,
        }
    }
}

/// Serves the requests of a client connection (`ip`: its address, as
/// `X-Forwarded-For` gets it) until none has come for [`HOLD`] (true) or
/// the connection is over (false). `first` is the connection's first
/// request, owed since the accept, until it is answered; each later one
/// is owed from its first byte.
async fn active<'r>(
    client: &mut TcpStream,
    ip: &[u8],
    xff: Xff,
    router: &'r Router,
    first: &mut Option<Owed<'r>>,
    spoke: &mut bool,
) -> bool {
    let s = &mut Session {
        cbuf: Buf::new(),
        bbuf: Buf::new(),
        out: Vec::with_capacity(1024),
        rout: Vec::with_capacity(512),
        answered: false,
    };
    // When the head being read must be whole.
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut owed: Option<Owed<'r>> = None;
    loop {
        if first.is_none() && owed.is_none() && !s.cbuf.is_empty() {
            owed = Some(router.owe());
        }
        let req = match head::request(s.cbuf.filled(), ip, xff, &mut s.out) {
            Ok(r) => r,
            Err(HeadError::Partial) if s.cbuf.is_empty() => {
                match tokio::time::timeout(HOLD, s.cbuf.read_from(client)).await {
                    Ok(Ok(0) | Err(_)) => return false,
                    Ok(Ok(_)) => {
                        *spoke = true;
                        continue;
                    }
                    Err(_) => return true,
                }
            }
            Err(HeadError::Partial) => {
                // From a head's first byte, the head timeout.
                let until = *deadline.get_or_insert(tokio::time::Instant::now() + HEAD_TIMEOUT);
                match tokio::time::timeout_at(until, s.cbuf.read_from(client)).await {
                    Ok(Ok(0) | Err(_)) => return false,
                    Ok(Ok(_)) => continue,
                    Err(_) => {
                        let msg = "request head not received in time\n";
                        reply(client, &mut s.rout, 408, msg, None, false).await;
                        return false;
                    }
                }
            }
            Err(HeadError::TooLarge) => {
                let msg = "request head too large\n";
                reply(client, &mut s.rout, 431, msg, None, false).await;
                return false;
            }
            Err(HeadError::Bad(why)) => {
                let msg = format!("bad request: {why}\n");
                reply(client, &mut s.rout, 400, &msg, None, false).await;
                return false;
            }
            Err(HeadError::Unsupported(why)) => {
                let msg = format!("{why}\n");
                reply(client, &mut s.rout, 501, &msg, None, false).await;
                return false;
            }
        };
        deadline = None;
        // With an access log: the request line, kept for its line.
        let log = router.access_log();
        let began = Instant::now();
        let logged = log.as_ref().map(|_| {
            let (method, target) = request_line(&s.cbuf.filled()[..req.len]);
            (method.to_vec(), target.to_vec())
        });
        s.cbuf.consume(req.len);
        let mut served = Served::default();
        // A chunked body that is malformed in what came with its head is
        // refused before any instance is chosen: nothing reaches one.
        let keep =
            if req.body == Framing::Chunked && Chunked::default().feed(s.cbuf.filled()).is_err() {
                bad_body(client, s, &req, router, &mut served).await;
                false
            } else {
                exchange(client, s, &req, router, &mut served).await
            };
        let took = began.elapsed();
        router.took(took);
        if let (Some(log), Some((method, target))) = (log, logged) {
            log.write(&Entry {
                client: ip,
                method: &method,
                target: &target,
                status: served.status,
                took,
                upstream: served.upstream,
            });
        }
        // Answered (or given up on): nothing owed until the next one.
        *first = None;
        owed = None;
        if !keep {
            return false;
        }
    }
}

/// Answers a request whose chunked body is malformed: 400, counted as an
/// error, and the connection closed (where its body ends is unknown).
async fn bad_body(
    client: &mut TcpStream,
    s: &mut Session,
    req: &RequestHead,
    router: &Router,
    served: &mut Served,
) {
    router.count(None, false);
    if !s.answered {
        let msg = "bad request: malformed chunked body\n";
        answer(client, &mut s.rout, served, 400, msg, req, false).await;
    }
}

/// What became of a request, for the access log.
#[derive(Default)]
struct Served {
    /// The status the client got (`None`: no whole response head).
    status: Option<u16>,
    /// The instance that had it last.
    upstream: Option<SocketAddr>,
}

/// The method and target of a request head's first line.
fn request_line(head: &[u8]) -> (&[u8], &[u8]) {
    let line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or(&[]);
    let mut words = line.splitn(3, |&b| b == b' ');
    (words.next().unwrap_or(&[]), words.next().unwrap_or(&[]))
}

/// Sends one request to an instance and its response to the client; returns
/// whether the client's connection goes on.
async fn exchange(
    client: &mut TcpStream,
    s: &mut Session,
    req: &RequestHead,
    router: &Router,
    served: &mut Served,
) -> bool {
    // Whether the client's connection can go on after a response deployd
    // makes itself: only if no body of the request is left unread.
    let keep_own = req.keep_alive && req.body == Framing::None;
    let mut tried: Vec<InstanceId> = Vec::new();
    // An idempotent request is sent again once to another instance, and
    // once more on a new connection when a pooled one turned out closed.
    let mut retried = false;
    let mut stale_retried = false;
    // After a pooled connection failed: the next try takes a new one.
    let mut fresh = false;
    loop {
        let Some(guard) = router.pick(&tried).await else {
            router.count(None, false);
            let msg = if router.is_stopped() {
                "the service is stopped: no instance serves it until it is started again\n"
                    .to_string()
            } else if tried.is_empty() {
                format!(
                    "no instance is ready (waited {})\n",
                    deployd_lib::manifest::format_duration(router.settings().queue_timeout)
                )
            } else {
                "no instance could take the request\n".to_string()
            };
            answer(client, &mut s.rout, served, 503, &msg, req, keep_own).await;
            return keep_own;
        };
        let backend = guard.backend().clone();
        served.upstream = Some(backend.addr);
        let mut conn = match checkout(&backend, fresh).await {
            Ok(c) => c,
            Err(_) => {
                // Died between probes: try another, probe it now.
                router.retry_elsewhere(&backend, &mut tried);
                continue;
            }
        };
        let pooled = conn.pooled;
        let mut closed = backend.closed.subscribe();
        let outcome = tokio::select! {
            o = forward(client, &mut conn, s, req, router) => o,
            _ = closed.wait_for(|c| *c) => Outcome::Cut,
        };
        s.bbuf.clear();
        // Stopped before it answered (crashed, or its drain ran out): as
        // good as no answer, and no use trying it again.
        let stopped = outcome == Outcome::Cut && !s.answered;
        let outcome = if stopped { Outcome::NoAnswer } else { outcome };
        match outcome {
            Outcome::Done {
                status,
                reusable,
                keep_client,
            } => {
                served.status = Some(status);
                router.count(Some(&backend), status < 500);
                if reusable {
                    checkin(router, &backend, conn);
                }
                drop(guard);
                if !keep_client && req.body != Framing::None {
                    // Answered before its body was read whole, maybe.
                    linger(client).await;
                }
                return keep_client;
            }
            Outcome::NoAnswer if req.retryable() && pooled && !stopped && !stale_retried => {
                // A pooled connection the instance had closed (its
                // keep-alive timeout, or it died): the request goes again
                // on a new connection, to whichever instance balancing
                // picks (this one included), and the connections pooled
                // with it go.
                stale_retried = true;
                backend.idle.lock().clear();
                fresh = true;
            }
            Outcome::NoAnswer if req.retryable() && !retried => {
                // Nothing from a new connection, or stopped: the instance
                // is in trouble. Another one gets the request.
                retried = true;
                router.retry_elsewhere(&backend, &mut tried);
                fresh = false;
            }
            Outcome::NoAnswer => {
                backend.suspect();
                router.count(Some(&backend), false);
                let keep = keep_own && !req.upgrade;
                let msg = "the instance failed before answering\n";
                answer(client, &mut s.rout, served, 502, msg, req, keep).await;
                return keep;
            }
            Outcome::Broken { sent } => {
                backend.suspect();
                router.count(Some(&backend), false);
                if !sent {
                    let msg = "the instance sent a response that is not HTTP/1\n";
                    answer(client, &mut s.rout, served, 502, msg, req, false).await;
                }
                return false;
            }
            Outcome::ClientGone => {
                router.abandoned(&backend);
                return false;
            }
            Outcome::BadBody => {
                // The instance's connection, mid-body, is dropped with it.
                drop(guard);
                bad_body(client, s, req, router, served).await;
                return false;
            }
            Outcome::Stalled => {
                router.abandoned(&backend);
                if !s.answered {
                    let msg = "request body not received in time\n";
                    answer(client, &mut s.rout, served, 408, msg, req, false).await;
                }
                return false;
            }
            // Cut at the end of its drain after part of its answer went
            // out: a tunnel ends as a tcp connection would, a response cut
            // short failed its client.
            Outcome::Cut => {
                router.count(Some(&backend), req.upgrade);
                return false;
            }
            Outcome::Upgraded => {
                served.status = Some(101);
                router.count(Some(&backend), true);
                return false;
            }
            Outcome::TimedOut => {
                // Not sent again: a slow request would only load a second
                // instance. The connection, mid-request, is dropped.
                backend.suspect();
                router.count(Some(&backend), false);
                let limit = router.settings().response_timeout.unwrap_or_default();
                let msg = format!(
                    "the instance did not answer within response_timeout {}\n",
                    deployd_lib::manifest::format_duration(limit)
                );
                let keep = keep_own && !req.upgrade;
                answer(client, &mut s.rout, served, 504, &msg, req, keep).await;
                return keep;
            }
        }
    }
}

/// Passes the request (head, then body if any) to the instance while
/// passing its response to the client.
async fn forward(
    client: &mut TcpStream,
    conn: &mut Conn,
    s: &mut Session,
    req: &RequestHead,
    router: &Router,
) -> Outcome {
    let finishing = &router.finishing;
    let deadline = router
        .settings()
        .response_timeout
        .map(|d| tokio::time::Instant::now() + d);
    let Session {
        cbuf,
        bbuf,
        out,
        rout,
        answered,
        ..
    } = s;
    *answered = false;
    conn.quickack.last_read = None;
    let (mut cr, mut cw) = client.split();
    let (br, mut bw) = conn.io.split();
    let mut up = Upstream {
        io: br,
        qa: &mut conn.quickack,
    };
    // Whether the request's body has been passed whole.
    let sent = AtomicBool::new(req.body == Framing::None);
    if req.body == Framing::None && body::write_all(&mut bw, out, &[]).await.is_err() {
        return Outcome::NoAnswer;
    }
    // The client's side: its body goes up (if any) while the response may
    // already come down: a server can answer early (413, 100 Continue),
    // and a client that sent `Expect: 100-continue` waits for the 100
    // before its body. Then the client is watched until the response is
    // through: this future ends only if the client goes away.
    let client_side = async {
        if req.body != Framing::None {
            let mut rem = Remaining::from(req.body);
            match body::pass(out, &mut cr, cbuf, &mut bw, &mut rem, Some(BODY_IDLE)).await {
                Ok(()) => sent.store(true, Ordering::Relaxed),
                // The instance stopped reading; its answer, if any, still
                // counts.
                Err(BodyError::Sink) => {}
                Err(BodyError::Stalled) => return Outcome::Stalled,
                Err(BodyError::Malformed) => return Outcome::BadBody,
                Err(BodyError::Source) => return Outcome::ClientGone,
            }
        }
        if !req.keep_alive {
            // Its last request: a client may well shut down its sending
            // side after it (`nc -N`, socat) and still read the answer.
            return std::future::pending().await;
        }
        watch(&mut cr, cbuf).await;
        Outcome::ClientGone
    };
    let outcome = {
        let keep = || sent.load(Ordering::Relaxed) && !finishing.load(Ordering::Relaxed);
        let down = respond(&mut up, bbuf, rout, &mut cw, req, keep, answered, deadline);
        tokio::pin!(client_side, down);
        tokio::select! {
            // A response that is through counts, even if its client left
            // at the same moment.
            biased;
            o = &mut down => match o {
                // Answered before the request's body was through: neither
                // connection is at a message boundary.
                Outcome::Done { status, .. } if !sent.load(Ordering::Relaxed) => Outcome::Done {
                    status,
                    reusable: false,
                    keep_client: false,
                },
                o => o,
            },
            o = &mut client_side => return o,
        }
    };
    if outcome == Outcome::Upgraded {
        // What the client sent after its upgrade request is the tunnel's.
        if !cbuf.is_empty() {
            if conn.io.write_all(cbuf.filled()).await.is_err() {
                return Outcome::Upgraded;
            }
            cbuf.clear();
        }
        let _ = tokio::io::copy_bidirectional(client, &mut conn.io).await;
    }
    outcome
}

/// Waits while a request is with its instance for its client to go away
/// (the connection closed or reset), reading into `cbuf` what it sends
/// meanwhile (pipelined requests, an upgraded protocol's first bytes). A
/// client gone means nobody will read the answer: the instance's
/// connection is closed (servers that watch theirs stop the work), and a
/// long poll no longer holds up a drain. Costs nothing until the client
/// sends something: the read only registers for readiness.
async fn watch(cr: &mut ReadHalf<'_>, cbuf: &mut Buf) {
    loop {
        if cbuf.is_full() {
            // A client that pipelines this much waits its turn unwatched:
            // the rest stays in the kernel's buffer, and this one does not
            // grow for it.
            return std::future::pending().await;
        }
        match cbuf.read_from(cr).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Reads the instance's response (any 1xx first) and passes it to the
/// client. `keep` says whether the client's connection may go on after
/// the response as far as deployd goes (the request's body has been passed
/// whole and deployd is not stopping); `answered` is set before anything
/// is written to the client. The head must be whole by `deadline`
/// (`response_timeout`), if any; the body may take its time.
#[allow(clippy::too_many_arguments)]
async fn respond(
    up: &mut Upstream<'_, '_>,
    bbuf: &mut Buf,
    rout: &mut Vec<u8>,
    cw: &mut WriteHalf<'_>,
    req: &RequestHead,
    keep: impl Fn() -> bool,
    answered: &mut bool,
    deadline: Option<tokio::time::Instant>,
) -> Outcome {
    loop {
        let h = loop {
            match head::response(bbuf.filled(), req, keep(), rout) {
                Ok(h) => break h,
                Err(HeadError::Partial) => {
                    let read = match read_by(bbuf, up, deadline).await {
                        None if !*answered => return Outcome::TimedOut,
                        None => return Outcome::Broken { sent: true },
                        Some(r) => r,
                    };
                    match read {
                        Ok(0) | Err(_) if bbuf.is_empty() && !*answered => {
                            return Outcome::NoAnswer;
                        }
                        Ok(0) | Err(_) => return Outcome::Broken { sent: *answered },
                        Ok(_) => {}
                    }
                }
                Err(_) => return Outcome::Broken { sent: *answered },
            }
        };
        bbuf.consume(h.len);
        *answered |= h.status != 101 || req.upgrade;
        match h.status {
            101 if req.upgrade => {
                if body::write_all(cw, rout, bbuf.filled()).await.is_err() {
                    return Outcome::ClientGone;
                }
                bbuf.clear();
                return Outcome::Upgraded;
            }
            101 => return Outcome::Broken { sent: false },
            100..=199 => {
                // Interim (100 Continue, 103 Early Hints): passed on, the
                // final response follows.
                if body::write_all(cw, rout, &[]).await.is_err() {
                    return Outcome::ClientGone;
                }
            }
            status => {
                let mut rem = Remaining::from(h.body);
                // A response may take its time (a stream, a long poll).
                return match body::pass(rout, up, bbuf, cw, &mut rem, None).await {
                    Ok(()) => Outcome::Done {
                        status,
                        reusable: h.reusable && bbuf.is_empty(),
                        keep_client: h.keep_client,
                    },
                    Err(BodyError::Sink) => Outcome::ClientGone,
                    Err(_) => Outcome::Broken { sent: true },
                };
            }
        }
    }
}

/// A read from the instance into `bbuf`; `None` once `deadline` passed.
async fn read_by(
    bbuf: &mut Buf,
    up: &mut Upstream<'_, '_>,
    deadline: Option<tokio::time::Instant>,
) -> Option<io::Result<usize>> {
    match deadline {
        None => Some(bbuf.read_from(up).await),
        Some(t) => tokio::time::timeout_at(t, bbuf.read_from(up)).await.ok(),
    }
}

/// Writes a response deployd makes itself (`req`: the request it answers,
/// if it could be read).
async fn reply(
    client: &mut TcpStream,
    out: &mut Vec<u8>,
    status: u16,
    msg: &str,
    req: Option<&RequestHead>,
    keep: bool,
) {
    head::own_response(
        status,
        msg,
        keep,
        req.is_some_and(|r| r.http10),
        req.is_some_and(|r| r.is_head),
        out,
    );
    if client.write_all(out).await.is_ok() && !keep {
        linger(client).await;
    }
}

/// [`reply`] to a request of a session: what the client got, for the
/// access log.
async fn answer(
    client: &mut TcpStream,
    out: &mut Vec<u8>,
    served: &mut Served,
    status: u16,
    msg: &str,
    req: &RequestHead,
    keep: bool,
) {
    served.status = Some(status);
    reply(client, out, status, msg, Some(req), keep).await;
}

/// Before closing a connection whose request was not read whole: stops
/// writing and reads what the client still sends, for a while. Closing
/// with unread bytes would reset the connection, and the client could lose
/// the response it was just sent.
async fn linger(client: &mut TcpStream) {
    let _ = client.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut left = 1 << 20;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while left > 0 {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left -= n.min(left),
            }
        }
    })
    .await;
}

/// An idle connection to the backend (unless `fresh`), or a new one.
async fn checkout(b: &Backend, fresh: bool) -> io::Result<Conn> {
    loop {
        let Some(c) = (!fresh).then(|| b.idle.lock().pop()).flatten() else {
            break;
        };
        if c.since.elapsed() > POOL_IDLE {
            // The newest is too old: so is every other one.
            let stale = std::mem::take(&mut *b.idle.lock());
            drop(stale);
            break;
        }
        // The instance may have closed it since (nothing is to be read on
        // a live idle connection): one non-blocking read tells.
        let mut probe = [0u8; 1];
        if let Err(e) = c.io.try_read(&mut probe) {
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(c);
            }
        }
    }
    let io = super::connect(b.addr).await?;
    let _ = io.set_nodelay(true);
    Ok(Conn {
        io,
        quickack: QuickAck::default(),
        pooled: false,
        since: Instant::now(),
        fd: None,
    })
}

fn checkin(router: &Router, b: &Backend, mut c: Conn) {
    if !b.routed.load(Ordering::SeqCst) {
        return;
    }
    // Pooled, it holds a descriptor of its own; with the budget spent, it
    // is closed rather than kept.
    if c.fd.is_none() {
        match router.budget.pooled() {
            Some(fd) => c.fd = Some(fd),
            None => return,
        }
    }
    c.pooled = true;
    c.since = Instant::now();
    let mut idle = b.idle.lock();
    // Oldest first: the ones past POOL_IDLE are a prefix, closed here
    // rather than left to hold a socket the instance closed long ago.
    let stale = idle.partition_point(|o| c.since.duration_since(o.since) > POOL_IDLE);
    let stale: Vec<Conn> = idle.drain(..stale).collect();
    if idle.len() < MAX_IDLE {
        idle.push(c);
    }
    drop(idle);
    drop(stale);
}

/// Whether a connection acknowledges every read at once.
///
/// Many servers (Python's http.server among them) write a response's headers
/// and body in two small writes without TCP_NODELAY: Nagle holds the body
/// until the headers are acknowledged, and a delayed ACK makes that 40ms per
/// request on a kept-alive connection. The stall shows as a response read
/// in two parts at least [`STALL`] apart; from the first one on, the
/// connection sets TCP_QUICKACK again after every read (Linux falls back to
/// delayed ACKs after each exchange). Connections to servers that don't
/// need it never pay the extra system call.
#[derive(Default)]
struct QuickAck {
    on: bool,
    /// When the current response's last part was read.
    last_read: Option<Instant>,
}

/// A gap between two reads of one response that looks like a delayed ACK.
const STALL: Duration = Duration::from_millis(20);

/// The reading side of a connection to an instance.
struct Upstream<'a, 'q> {
    io: ReadHalf<'a>,
    qa: &'q mut QuickAck,
}

impl AsyncRead for Upstream<'_, '_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if buf.filled().len() > before {
                let now = Instant::now();
                let qa = &mut *this.qa;
                if !qa.on && qa.last_read.is_some_and(|t| now.duration_since(t) >= STALL) {
                    qa.on = true;
                }
                qa.last_read = Some(now);
                if qa.on {
                    quickack(this.io.as_ref());
                }
            }
        }
        r
    }
}

fn quickack(io: &TcpStream) {
    let _ = socket2::SockRef::from(io).set_tcp_quickack(true);
}
