//! The HTTP/1.1 proxy: clients keep their connections to deployd (keep-alive
//! across every rollout); each request goes to a routed-in instance over a
//! pooled connection of that instance; bodies stream both ways.
//!
//! A failed connect is retried on another instance (and the instance is
//! probed at once); a request on a pooled connection that closed before the
//! request was written is sent again; an idempotent request without a body
//! that fails before any response byte is retried once elsewhere. Upgrades
//! (WebSocket) are tunnelled and count as in flight until closed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use deployd_lib::rollout::InstanceId;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1 as client;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{Backend, Guard, Router};

/// A pooled connection to an instance.
pub(super) type Conn = client::SendRequest<ReqBody>;

/// Idle connections kept per instance.
const MAX_IDLE: usize = 256;

/// Serves one client connection.
pub(super) async fn serve(stream: TcpStream, peer: SocketAddr, router: Arc<Router>) {
    let svc = service_fn(move |req| {
        let router = router.clone();
        async move { Ok::<_, Infallible>(handle(req, peer, &router).await) }
    });
    let _ = server::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades()
        .await;
}

/// The body of a request to an instance: the client's, or none (a retry).
pub(super) enum ReqBody {
    Client(Incoming),
    Empty,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Client(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Client(b) => b.is_end_stream(),
            ReqBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Client(b) => b.size_hint(),
            ReqBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// The body of a response to a client: an instance's, streamed, holding the
/// request in flight until it is sent; or one deployd made.
pub enum RespBody {
    Instance {
        inner: Incoming,
        /// The connection, back to the pool once the body is through.
        conn: Option<Conn>,
        guard: Option<Guard>,
    },
    Full(Option<Bytes>),
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RespBody::Instance { inner, conn, guard } => {
                let r = Pin::new(inner).poll_frame(cx);
                if let Poll::Ready(Some(Err(_))) = &r {
                    // The instance broke off: neither the connection nor
                    // the response is any good.
                    conn.take();
                    if let Some(g) = guard.as_ref() {
                        g.backend().suspect();
                    }
                }
                r
            }
            RespBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Instance { inner, .. } => inner.is_end_stream(),
            RespBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Instance { inner, .. } => inner.size_hint(),
            RespBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        if let RespBody::Instance { inner, conn, guard } = self {
            // Only a connection whose response was read to its end is reusable.
            if let (true, Some(c), Some(g)) = (inner.is_end_stream(), conn.take(), guard.as_ref()) {
                checkin(g.backend(), c);
            }
        }
    }
}

fn text(status: StatusCode, msg: String) -> Response<RespBody> {
    let mut r = Response::new(RespBody::Full(Some(Bytes::from(msg))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// Hop-by-hop headers, which a proxy does not forward (besides those that
/// `Connection` names).
fn hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || *name == header::PROXY_AUTHORIZATION
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Drops hop-by-hop headers; keeps `Connection` and `Upgrade` of an upgrade.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages have none: look before touching the map.
    if !h.keys().any(hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    let drop: Vec<HeaderName> = h
        .keys()
        .filter(|n| hop_by_hop(n))
        .filter(|n| !(keep_upgrade && (*n == header::CONNECTION || *n == header::UPGRADE)))
        .cloned()
        .collect();
    for n in drop {
        h.remove(n);
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Whether the request may be sent twice: idempotent, without a body.
fn retryable(req: &Request<Incoming>) -> bool {
    matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::DELETE | Method::PUT
    ) && req.body().is_end_stream()
}

async fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    router: &Router,
) -> Response<RespBody> {
    let upgrade = is_upgrade(&req);
    strip_hop_by_hop(req.headers_mut(), upgrade);
    forwarded_for(req.headers_mut(), peer);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    // A copy to send again if the first instance fails before answering.
    let mut spare = (!upgrade && retryable(&req)).then(|| {
        let mut r = Request::new(ReqBody::Empty);
        *r.method_mut() = req.method().clone();
        *r.uri_mut() = req.uri().clone();
        *r.version_mut() = req.version();
        *r.headers_mut() = req.headers().clone();
        r
    });
    let mut req = Some(req.map(ReqBody::Client));
    let mut tried: Vec<InstanceId> = Vec::new();
    loop {
        let Some(guard) = router.pick(&tried).await else {
            router.count(None, false);
            let what = if tried.is_empty() {
                format!(
                    "no instance is ready (waited {})\n",
                    deployd_lib::manifest::format_duration(router.settings().queue_timeout)
                )
            } else {
                "no instance could take the request\n".to_string()
            };
            return text(StatusCode::SERVICE_UNAVAILABLE, what);
        };
        let backend = guard.backend().clone();
        let mut conn = match checkout(&backend).await {
            Ok(c) => c,
            Err(_) => {
                // Died between probes: try another, probe it now.
                backend.suspect();
                tried.push(backend.id);
                continue;
            }
        };
        let Some(r) = req.take() else {
            return text(StatusCode::BAD_GATEWAY, "lost the request\n".into());
        };
        match conn.try_send_request(r).await {
            Ok(mut resp) => {
                router.count(Some(&backend), !resp.status().is_server_error());
                if let (Some(on_client), StatusCode::SWITCHING_PROTOCOLS) =
                    (client_upgrade, resp.status())
                {
                    let on_backend = hyper::upgrade::on(&mut resp);
                    tokio::spawn(tunnel(on_client, on_backend, guard));
                    let (parts, _) = resp.into_parts();
                    return Response::from_parts(parts, RespBody::Full(None));
                }
                strip_hop_by_hop(resp.headers_mut(), false);
                return resp.map(|inner| RespBody::Instance {
                    inner,
                    conn: Some(conn),
                    guard: Some(guard),
                });
            }
            Err(mut e) => {
                if let Some(r) = e.take_message() {
                    // Never written: the pooled connection had closed.
                    req = Some(r);
                    continue;
                }
                backend.suspect();
                tried.push(backend.id);
                match spare.take() {
                    Some(copy) => req = Some(copy),
                    None => {
                        router.count(Some(&backend), false);
                        return text(
                            StatusCode::BAD_GATEWAY,
                            format!("the instance failed before answering: {}\n", e.error()),
                        );
                    }
                }
            }
        }
    }
}

/// Appends the client's address to `X-Forwarded-For`.
fn forwarded_for(h: &mut HeaderMap, peer: SocketAddr) {
    use std::io::Write as _;
    let name = HeaderName::from_static("x-forwarded-for");
    // An address fits in 45 bytes: format it on the stack.
    let mut buf = [0u8; 64];
    let len = {
        let mut cur = std::io::Cursor::new(&mut buf[..]);
        let _ = write!(cur, "{}", peer.ip());
        cur.position() as usize
    };
    let ip = &buf[..len];
    let value = match h.get(&name) {
        Some(prev) => {
            let mut v = prev.as_bytes().to_vec();
            v.extend_from_slice(b", ");
            v.extend_from_slice(ip);
            HeaderValue::from_bytes(&v)
        }
        None => HeaderValue::from_bytes(ip),
    };
    if let Ok(v) = value {
        h.insert(name, v);
    }
}

/// An idle connection to the backend, or a new one.
async fn checkout(b: &Backend) -> std::io::Result<Conn> {
    loop {
        let Some(mut c) = b.idle.lock().pop() else {
            break;
        };
        if c.is_closed() {
            continue;
        }
        if c.is_ready() {
            return Ok(c);
        }
        // Checked in just as its previous response ended: ready at once.
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(50), c.ready()).await {
            return Ok(c);
        }
    }
    let stream = TcpStream::connect(b.addr).await?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = client::handshake(TokioIo::new(QuickAck::new(stream)))
        .await
        .map_err(std::io::Error::other)?;
    let mut closed = b.closed.subscribe();
    tokio::spawn(async move {
        let conn = conn.with_upgrades();
        tokio::select! {
            _ = conn => {}
            _ = closed.wait_for(|c| *c) => {}
        }
    });
    Ok(send)
}

/// A connection to an instance that, when the instance needs it,
/// acknowledges every read at once.
///
/// Many servers (Python's http.server among them) write a response's headers
/// and body in two small writes without TCP_NODELAY: Nagle holds the body
/// until the headers are acknowledged, and a delayed ACK makes that 40ms per
/// request on a kept-alive connection. The stall shows as a response read
/// in two parts at least [`STALL`] apart; from the first one on, the
/// connection sets TCP_QUICKACK again after every read (Linux falls back to
/// delayed ACKs after each exchange). Connections to servers that don't
/// need it never pay the extra system call.
struct QuickAck {
    io: TcpStream,
    on: bool,
    /// When the current response's last part was read, since the request.
    last_read: Option<std::time::Instant>,
}

/// A gap between two reads of one response that looks like a delayed ACK.
const STALL: Duration = Duration::from_millis(20);

impl QuickAck {
    fn new(io: TcpStream) -> QuickAck {
        QuickAck {
            io,
            on: false,
            last_read: None,
        }
    }

    fn quickack(&self) {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads an int we own, on a socket we own.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&self.io),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if buf.filled().len() > before {
                let now = std::time::Instant::now();
                if !this.on
                    && this
                        .last_read
                        .is_some_and(|t| now.duration_since(t) >= STALL)
                {
                    this.on = true;
                }
                this.last_read = Some(now);
                if this.on {
                    this.quickack();
                }
            }
        }
        r
    }
}

impl tokio::io::AsyncWrite for QuickAck {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        // A new request: its response's reads start afresh.
        this.last_read = None;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.last_read = None;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

fn checkin(b: &Backend, c: Conn) {
    if c.is_closed() || !b.routed.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let mut idle = b.idle.lock();
    if idle.len() < MAX_IDLE {
        idle.push(c);
    }
}

/// Copies between an upgraded client and instance until either closes, or
/// deployd closes the instance.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
    guard: Guard,
) {
    let (Ok(c), Ok(b)) = (client.await, backend.await) else {
        return;
    };
    let mut closed = guard.backend().closed.subscribe();
    let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut c, &mut b) => {}
        _ = closed.wait_for(|x| *x) => {}
    }
    drop(guard);
}
