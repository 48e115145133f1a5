//! The TCP proxy: each client connection is joined to one routed-in
//! instance and copied byte for byte both ways (one buffer per direction)
//! until both sides are done; a half-close is passed on. A failed connect is
//! retried on another instance. When deployd closes the instance (its drain
//! is over), the connection is closed.
//!
//! The buffers exist only while bytes flow: a connection quiet for
//! [`HOLD`] gives them back and waits for either side with none.
//!
//! With `access_log on`, each connection's line is written once it is over.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use deployd_lib::rollout::InstanceId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::access::{Connection, End};
use super::budget::Permit;
use super::{Accepted, HOLD, Router};

/// Serves one client connection; `_permit` holds its place among its
/// port's connections and its descriptors until it is over.
pub(super) async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    router: Arc<Router>,
    counted: Accepted,
    _permit: Permit,
) {
    // Owed until it is over: a stopping deployd waits for it.
    let _owed = router.accepted(counted);
    let since = Instant::now();
    // Bytes moved: client to instance, instance to client.
    let mut moved = [0u64; 2];
    let (end, upstream) = join(&mut client, &router, &mut moved).await;
    let took = since.elapsed();
    router.took(took);
    if let Some(log) = router.access_log() {
        log.write_connection(&Connection {
            client: peer.ip().to_string().as_bytes(),
            end,
            from_client: moved[0],
            to_client: moved[1],
            took,
            upstream,
        });
    }
}

/// Joins the client to an instance until the connection is over; how it
/// ended, and the instance it went to.
async fn join(
    client: &mut TcpStream,
    router: &Router,
    moved: &mut [u64; 2],
) -> (End, Option<SocketAddr>) {
    let mut tried: Vec<InstanceId> = Vec::new();
    loop {
        let Some(guard) = router.pick(&tried).await else {
            router.count(None, false);
            return (End::Unserved, None);
        };
        let backend = guard.backend().clone();
        let mut upstream = match super::connect(backend.addr).await {
            Ok(s) => s,
            Err(_) => {
                router.retry_elsewhere(&backend, &mut tried);
                continue;
            }
        };
        let _ = upstream.set_nodelay(true);
        let mut closed = backend.closed.subscribe();
        let end = tokio::select! {
            r = relay(client, &mut upstream, moved) => match r {
                Ok(()) => End::Closed,
                Err(_) => End::Error,
            },
            _ = closed.wait_for(|c| *c) => End::Cut,
        };
        router.count(Some(&backend), end != End::Error);
        drop(guard);
        return (end, Some(backend.addr));
    }
}

/// Copies `a` to `b` and `b` to `a` until both directions have ended (each
/// end of stream passed on as a shutdown), or either fails; `moved` counts
/// the bytes written each way as they go.
async fn relay(a: &mut TcpStream, b: &mut TcpStream, moved: &mut [u64; 2]) -> io::Result<()> {
    // Whether each direction has ended: a to b, b to a.
    let mut ended = [false, false];
    loop {
        if busy(a, b, &mut ended, moved).await? {
            return Ok(());
        }
        // Quiet: wait, holding no buffer, until a side has something.
        tokio::select! {
            r = a.readable(), if !ended[0] => r?,
            r = b.readable(), if !ended[1] => r?,
        }
    }
}

/// Copies both ways with a buffer each, until both directions have ended
/// (true) or [`HOLD`] passed without a byte while neither holds any
/// (false).
async fn busy(
    a: &mut TcpStream,
    b: &mut TcpStream,
    ended: &mut [bool; 2],
    moved: &mut [u64; 2],
) -> io::Result<bool> {
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let mut pumps = [Pump::default(), Pump::default()];
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + HOLD, HOLD);
    poll_fn(|cx| {
        let [ab, ba] = &mut pumps;
        let [to_b, to_a] = &mut *moved;
        if !ended[0] && ab.poll(cx, &mut ar, &mut bw, to_b)?.is_ready() {
            ended[0] = true;
        }
        if !ended[1] && ba.poll(cx, &mut br, &mut aw, to_a)?.is_ready() {
            ended[1] = true;
        }
        if ended[0] && ended[1] {
            return Poll::Ready(Ok(true));
        }
        while tick.poll_tick(cx).is_ready() {
            let quiet = !ab.moved && !ba.moved;
            ab.moved = false;
            ba.moved = false;
            if quiet && (ended[0] || ab.is_empty()) && (ended[1] || ba.is_empty()) {
                return Poll::Ready(Ok(false));
            }
        }
        Poll::Pending
    })
    .await
}

/// Bytes read from one side and not yet all written to the other. Its
/// buffer comes with its first read: a direction that has ended (a
/// half-closed connection) takes none.
#[derive(Default)]
struct Pump {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// The source has ended; the sink gets a shutdown once the buffer is
    /// written.
    eof: bool,
    /// Whether a byte moved since the last look.
    moved: bool,
}

/// A direction's buffer, as `tokio::io::copy` has it.
const BUF: usize = 8 * 1024;

impl Pump {
    /// Holds nothing to write, and may be let go.
    fn is_empty(&self) -> bool {
        self.pos == self.end && !self.eof
    }

    /// Copies until the source ends and the sink is shut down (ready), or
    /// either side would wait (pending); adds what it wrote to `moved`.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut (impl AsyncRead + Unpin),
        dst: &mut (impl AsyncWrite + Unpin),
        moved: &mut u64,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.pos < self.end {
                let n = ready!(Pin::new(&mut *dst).poll_write(cx, &self.buf[self.pos..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                *moved += n as u64;
                self.moved = true;
                continue;
            }
            if self.eof {
                return Pin::new(&mut *dst).poll_shutdown(cx);
            }
            if self.buf.is_empty() {
                self.buf = vec![0; BUF];
            }
            let mut rb = ReadBuf::new(&mut self.buf);
            ready!(Pin::new(&mut *src).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                self.eof = true;
            } else {
                (self.pos, self.end) = (0, n);
                self.moved = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair of sockets over loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// A client and a server joined by `relay`, which runs until both
    /// directions are done.
    /// It gives whether it ended well, and the bytes it moved each way.
    async fn joined() -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<(bool, [u64; 2])>,
    ) {
        let (client, mut a) = pair().await;
        let (mut b, server) = pair().await;
        let relay = tokio::spawn(async move {
            let mut moved = [0; 2];
            let ok = super::relay(&mut a, &mut b, &mut moved).await.is_ok();
            (ok, moved)
        });
        (client, server, relay)
    }

    /// Fails a read that waits for 10 s.
    async fn within<T>(read: impl std::future::Future<Output = std::io::Result<T>>) {
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("nothing came through")
            .unwrap();
    }

    #[tokio::test]
    async fn a_refused_connect_is_retried_on_another_instance_unseen() {
        use std::sync::Arc;

        use deployd_lib::manifest::Proxy as Mode;
        use deployd_lib::rollout::InstanceId;
        use tokio::sync::Notify;

        use crate::proxy::{Router, Settings};

        // Instance 0 is gone (its port refuses); instance 1 echoes.
        let refusing = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_port = echo.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let router = Arc::new(Router::for_test(Settings {
            response_timeout: None,
            port: 0,
            mode: Mode::Tcp,
            queue_timeout: Duration::from_secs(1),
            max_connections: None,
        }));
        for (i, p) in [refusing, echo_port].into_iter().enumerate() {
            let poke = Arc::new(Notify::new());
            router.route_in(InstanceId(i as u64), p, poke, Box::new(|| {}));
        }
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let r = router.clone();
        tokio::spawn(async move {
            while let Ok((s, peer)) = front.accept().await {
                tokio::spawn(super::serve(
                    s,
                    peer,
                    r.clone(),
                    r.accept(),
                    r.permit().await,
                ));
            }
        });
        for i in 0..4 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"ping").await.unwrap();
            c.shutdown().await.unwrap();
            let mut got = String::new();
            within(c.read_to_string(&mut got)).await;
            assert_eq!(got, "ping", "connection {i}");
        }
        let text = || router.render(|id| Some(id.0 as u32));
        for _ in 0..500 {
            if text().contains("\nconnections 4\n") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let t = text();
        assert!(t.contains("\nconnections 4\ninflight 0\nerrors 0\n"), "{t}");
        assert!(
            t.contains("instance 1 connections 4 inflight 0 errors 0 retried 0\n"),
            "{t}"
        );
        let retried: u64 = t
            .lines()
            .find_map(|l| l.strip_prefix("instance 0 connections 0 inflight 0 errors 0 retried "))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{t}"));
        assert!(retried >= 1, "{t}");
        assert!(t.contains(&format!("\nretried {retried}\n")), "{t}");
        assert!(!t.contains("abandoned"), "{t}");
    }

    #[tokio::test]
    async fn bytes_and_half_closes_pass_both_ways() {
        let (mut client, mut server, relay) = joined().await;
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = String::new();
        server.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "ping");
        // The other direction is still open after the client's half-close.
        server.write_all(b"pong").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "pong");
        assert_eq!(relay.await.unwrap(), (true, [4, 4]));
    }

    #[tokio::test]
    async fn a_connection_quiet_for_a_while_carries_on_both_ways() {
        let (mut client, mut server, relay) = joined().await;
        for round in 0..4 {
            // Either side may be the first to speak after a quiet spell.
            let (first, second) = if round % 2 == 0 {
                (&mut client, &mut server)
            } else {
                (&mut server, &mut client)
            };
            let msg = format!("message {round}");
            first.write_all(msg.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; msg.len()];
            within(second.read_exact(&mut buf)).await;
            assert_eq!(buf, msg.as_bytes());
            second.write_all(b"answer").await.unwrap();
            let mut buf = [0u8; 6];
            within(first.read_exact(&mut buf)).await;
            assert_eq!(&buf, b"answer");
            // Quiet for longer than HOLD: the buffers go, the connection
            // stays.
            tokio::time::sleep(super::HOLD * 3).await;
        }
        drop(client);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        drop(server);
        let (ok, moved) = relay.await.unwrap();
        assert!(ok);
        // Each way: two 9-byte messages and two 6-byte answers.
        assert_eq!(moved, [30, 30]);
    }

    #[tokio::test]
    async fn bytes_held_while_the_receiver_is_slow_are_not_dropped() {
        let (mut client, mut server, relay) = joined().await;
        // More than the socket buffers hold: the relay keeps some in hand
        // while the server does not read, for far longer than HOLD.
        let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        tokio::time::sleep(super::HOLD * 5).await;
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(
            got == data,
            "{} bytes of {} arrived, or changed",
            got.len(),
            data.len()
        );
        drop(server);
        drop(writer.await.unwrap());
        assert_eq!(relay.await.unwrap(), (true, [8 << 20, 0]));
    }
}
