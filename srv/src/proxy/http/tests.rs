//! The forwarder's parts on their own (chunked bodies, heads) and whole,
//! over real loopback sockets: a client, deployd's `serve`, and instances
//! scripted byte for byte.

use std::sync::Arc;
use std::time::Duration;

use deployd_lib::manifest::Proxy as Mode;
use deployd_lib::rollout::InstanceId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::body::{Chunked, Malformed};
use super::head::{self, Framing, HeadError};
use crate::proxy::{Router, Settings};

// ---- chunked bodies ----

const CHUNKED: &[u8] =
    b"5;name=value\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Sum: 1\r\nY: 2\r\n\r\n";

#[test]
fn a_chunked_body_ends_where_it_ends_however_it_is_split() {
    let mut body = CHUNKED.to_vec();
    body.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: a\r\n");
    // Whole.
    assert_eq!(Chunked::default().feed(&body), Ok(Some(CHUNKED.len())));
    // Every split into two reads, and byte by byte.
    for cut in 0..body.len() {
        let mut c = Chunked::default();
        let end = match c.feed(&body[..cut]) {
            Ok(Some(n)) => n,
            Ok(None) => cut + c.feed(&body[cut..]).unwrap().unwrap(),
            Err(e) => panic!("{e:?} at {cut}"),
        };
        assert_eq!(end, CHUNKED.len(), "split at {cut}");
    }
    let mut c = Chunked::default();
    let mut end = None;
    for (i, b) in body.iter().enumerate() {
        if let Some(n) = c.feed(std::slice::from_ref(b)).unwrap() {
            assert_eq!(n, 1);
            end = Some(i + 1);
            break;
        }
    }
    assert_eq!(end, Some(CHUNKED.len()));
}

#[test]
fn a_chunked_body_without_trailers_ends_at_the_blank_line() {
    assert_eq!(Chunked::default().feed(b"0\r\n\r\nrest"), Ok(Some(5)));
    assert_eq!(Chunked::default().feed(b"3\r\nabc\r\n0\r\n"), Ok(None));
}

#[test]
fn malformed_chunked_bodies_are_refused() {
    for bad in [
        &b"\r\n"[..],             // no size
        b"g\r\n",                 // not hex
        b"3\r\nabcd\r\n",         // more data than said
        b"3\nabc\r\n",            // bare LF after the size
        b"3\r\nabc\n",            // bare LF after the data
        b"1234567890abcdef0\r\n", // a size no body has
        b"0\r\nX: 1\n",           // bare LF in a trailer
        b"0\r\n\rx",              // not CRLF at the end
        b";ext\r\n",              // an extension without a size
    ] {
        assert_eq!(
            Chunked::default().feed(bad),
            Err(Malformed),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

// ---- heads ----

fn req(text: &str) -> Result<(head::RequestHead, String), HeadError> {
    let mut out = Vec::new();
    let r = head::request(text.as_bytes(), b"10.0.0.9", head::Xff::Append, &mut out)?;
    Ok((r, String::from_utf8(out).unwrap()))
}

#[test]
fn a_request_head_loses_its_hop_by_hop_headers_and_gains_x_forwarded_for() {
    let (r, out) = req(
        "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n\
         Keep-Alive: 5\r\nProxy-Authorization: p\r\nTE: trailers\r\nX-Forwarded-For: 1.2.3.4\r\n\
         Accept: */*\r\n\r\nbody-of-next",
    )
    .unwrap();
    assert_eq!(
        out,
        "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\nX-Forwarded-For: 1.2.3.4, 10.0.0.9\r\n\r\n"
    );
    assert_eq!(r.len, "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nProxy-Authorization: p\r\nTE: trailers\r\nX-Forwarded-For: 1.2.3.4\r\nAccept: */*\r\n\r\n".len());
    assert!(r.keep_alive && r.idempotent && !r.upgrade && !r.http10);
    assert_eq!(r.body, Framing::None);
    assert!(r.retryable());
}

#[test]
fn a_request_body_is_framed_by_its_length_or_its_chunks() {
    let (r, out) = req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n").unwrap();
    assert_eq!(r.body, Framing::Length(12));
    assert!(out.contains("Content-Length: 12\r\n"));
    assert!(!r.retryable());
    let (r, out) = req("PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    assert_eq!(r.body, Framing::Chunked);
    assert!(out.contains("Transfer-Encoding: chunked\r\n"));
    // Idempotent, but with a body that is gone once sent.
    assert!(r.idempotent && !r.retryable());
    // Equal lengths, in a list or in two headers, go on as one.
    for twice in [
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: 3\r\nHost: a\r\ncontent-length: 3\r\n\r\n",
    ] {
        let (r, out) = req(twice).unwrap();
        assert_eq!(r.body, Framing::Length(3));
        assert_eq!(
            out.to_ascii_lowercase().matches("content-length").count(),
            1,
            "{out}"
        );
        assert!(out.contains("\r\nContent-Length: 3\r\n"), "{out}");
    }
    let (_, out) =
        req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  Chunked \r\n\r\n").unwrap();
    assert!(out.contains("\r\nTransfer-Encoding: chunked\r\n"), "{out}");
}

#[test]
fn a_client_x_forwarded_for_is_replaced_unless_the_client_is_trusted() {
    let text = "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n";
    let mut out = Vec::new();
    head::request(text.as_bytes(), b"10.0.0.9", head::Xff::Replace, &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("\r\nX-Forwarded-For: 10.0.0.9\r\n"), "{out}");
    assert!(!out.contains("6.6.6.6"), "{out}");
    let (_, out) = req(text).unwrap();
    assert!(
        out.contains("\r\nX-Forwarded-For: 6.6.6.6, 10.0.0.9\r\n"),
        "{out}"
    );
}

#[test]
fn ambiguous_request_bodies_are_refused() {
    for bad in [
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        // Chunked twice, in one header or two.
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
    ] {
        assert!(matches!(req(bad), Err(HeadError::Bad(_))), "{bad}");
    }
    // Chunked over a coding an instance may not know: 501, as nginx answers.
    for unknown in [
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        assert!(
            matches!(req(unknown), Err(HeadError::Unsupported(_))),
            "{unknown}"
        );
    }
    assert!(matches!(
        req("GET / HTTP/1.1\r\nHost: a\r\nHo st: x\r\n\r\n"),
        Err(HeadError::Bad(_))
    ));
    assert!(matches!(
        req("GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\nhost: b\r\n\r\n"),
        Err(HeadError::Bad("more than one Host header"))
    ));
}

#[test]
fn an_http_1_1_request_names_its_site_once_and_asks_for_no_tunnel() {
    assert_eq!(
        req("GET / HTTP/1.1\r\nAccept: */*\r\n\r\n").err(),
        Some(HeadError::Bad("missing Host header"))
    );
    // HTTP/1.0 had no Host to require.
    assert!(req("GET / HTTP/1.0\r\n\r\n").is_ok());
    assert_eq!(
        req("CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n").err(),
        Some(HeadError::Unsupported(
            "CONNECT is not supported: deployd is a reverse proxy"
        ))
    );
    // Named in Connection, Host still goes on: the next hop needs it.
    let (_, out) =
        req("GET / HTTP/1.1\r\nHost: a\r\nConnection: host, x-a\r\nX-A: 1\r\n\r\n").unwrap();
    assert_eq!(
        out,
        "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.9\r\n\r\n"
    );
}

#[test]
fn an_absolute_target_goes_on_in_origin_form_with_its_host() {
    for (target, path, host) in [
        (
            "http://example.com:8080/a/b?c=1",
            "/a/b?c=1",
            "example.com:8080",
        ),
        ("HTTPS://Example.com", "/", "Example.com"),
        ("http://user:pw@example.com?q", "/?q", "example.com"),
        ("http://[::1]:80/x#frag", "/x", "[::1]:80"),
    ] {
        let (r, out) = req(&format!(
            "GET {target} HTTP/1.1\r\nHost: other.example\r\nAccept: */*\r\n\r\n"
        ))
        .unwrap();
        assert_eq!(
            out,
            format!(
                "GET {path} HTTP/1.1\r\nAccept: */*\r\nHost: {host}\r\nX-Forwarded-For: 10.0.0.9\r\n\r\n"
            ),
            "{target}"
        );
        assert!(r.retryable());
    }
    // HTTP/1.0 without a Host gets the target's.
    let (_, out) = req("GET http://example.com/x HTTP/1.0\r\n\r\n").unwrap();
    assert!(
        out.starts_with("GET /x HTTP/1.0\r\n") && out.contains("Host: example.com\r\n"),
        "{out}"
    );
    // The asterisk form is OPTIONS's own, passed as it is.
    let (_, out) = req("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    assert!(
        out.starts_with("OPTIONS * HTTP/1.1\r\nHost: a\r\n"),
        "{out}"
    );
    for (bad, why) in [
        ("ftp://example.com/x", "request target is not an http URI"),
        ("http:///x", "request target without a host"),
        ("http://user@/x", "request target without a host"),
        ("example.com/x", "malformed request target"),
        ("x", "malformed request target"),
    ] {
        assert_eq!(
            req(&format!("GET {bad} HTTP/1.1\r\nHost: a\r\n\r\n")).err(),
            Some(HeadError::Bad(why)),
            "{bad}"
        );
    }
}

#[test]
fn a_partial_head_waits_and_a_huge_one_is_refused() {
    assert_eq!(
        req("GET / HTTP/1.1\r\nHost: x\r\n").err(),
        Some(HeadError::Partial)
    );
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX: {}",
        "a".repeat(head::MAX_HEAD)
    );
    assert_eq!(req(&huge).err(), Some(HeadError::TooLarge));
    let many = |n: usize| -> String { (0..n).map(|i| format!("X-{i}: 1\r\n")).collect() };
    // A request keeps room for what deployd adds: at most 96 header lines.
    assert!(req(&format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", many(95))).is_ok());
    assert_eq!(
        req(&format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", many(96))).err(),
        Some(HeadError::TooLarge)
    );
    assert_eq!(
        req(&format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", many(200))).err(),
        Some(HeadError::TooLarge)
    );
}

#[test]
fn http_1_0_clients_keep_their_connection_only_when_they_ask() {
    let (r, out) = req("GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(r.http10 && !r.keep_alive);
    // The instance's connection is deployd's to keep either way.
    assert!(out.starts_with("GET / HTTP/1.0\r\n") && out.contains("Connection: keep-alive\r\n"));
    let (r, _) = req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
    assert!(r.keep_alive);
    let (r, _) = req("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").unwrap();
    assert!(!r.keep_alive);
    // A Connection value with bytes past ASCII keeps nothing open, as in
    // hyper (a fuzz finding); its close still closes.
    let (r, _) = req("GET / HTTP/1.0\r\nConnection: \u{e9}, keep-alive\r\n\r\n").unwrap();
    assert!(!r.keep_alive);
    let (r, _) = req("GET / HTTP/1.1\r\nHost: a\r\nConnection: \u{e9}, close\r\n\r\n").unwrap();
    assert!(!r.keep_alive);
}

#[test]
fn an_upgrade_keeps_its_connection_and_upgrade_headers() {
    let (r, out) =
        req("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .unwrap();
    assert!(r.upgrade && !r.retryable());
    assert!(
        out.contains("Connection: Upgrade\r\nUpgrade: websocket\r\n"),
        "{out}"
    );
    // Upgrade without Connection: upgrade is no upgrade.
    let (r, out) = req("GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n").unwrap();
    assert!(!r.upgrade && !out.contains("Upgrade"));
}

fn resp(request: &str, response: &str, keep: bool) -> (head::ResponseHead, String) {
    let (r, _) = req(request).unwrap();
    let mut out = Vec::new();
    let h = head::response(response.as_bytes(), &r, keep, &mut out).unwrap();
    (h, String::from_utf8(out).unwrap())
}

const GET: &str = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";

#[test]
fn a_response_body_is_framed_as_http_says() {
    let (h, out) = resp(
        GET,
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        true,
    );
    assert_eq!(
        (h.status, h.body, h.reusable, h.keep_client),
        (200, Framing::Length(5), true, true)
    );
    assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
    let (h, out) = resp(
        GET,
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        true,
    );
    assert_eq!(h.body, Framing::Chunked);
    assert!(!out.contains("Content-Length"), "{out}");
    for none in [
        "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
        "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        "HTTP/1.1 100 Continue\r\n\r\n",
    ] {
        assert_eq!(resp(GET, none, true).0.body, Framing::None, "{none}");
    }
    let head_req = "HEAD / HTTP/1.1\r\nHost: a\r\n\r\n";
    let (h, out) = resp(
        head_req,
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
        true,
    );
    assert_eq!(h.body, Framing::None);
    assert!(out.contains("Content-Length: 5"));
}

#[test]
fn a_close_delimited_response_closes_both_connections() {
    let (h, out) = resp(GET, "HTTP/1.1 200 OK\r\n\r\nuntil the end", true);
    assert_eq!(
        (h.body, h.reusable, h.keep_client),
        (Framing::Eof, false, false)
    );
    assert!(out.ends_with("Connection: close\r\n\r\n"), "{out}");
    let (h, _) = resp(
        GET,
        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        true,
    );
    assert!(!h.reusable && h.keep_client);
    let (h, _) = resp(GET, "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", true);
    assert!(!h.reusable && h.keep_client);
    // The client's body was not read whole: its connection ends here.
    let (h, out) = resp(
        GET,
        "HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n",
        false,
    );
    assert!(h.reusable && !h.keep_client && out.contains("Connection: close"));
}

#[test]
fn an_http_1_0_client_hears_keep_alive_when_it_stays() {
    let req10 = "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    let (h, out) = resp(req10, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", true);
    assert!(h.keep_client);
    assert!(out.contains("Connection: keep-alive\r\n"), "{out}");
}

#[test]
fn deployds_own_responses_say_whether_the_connection_stays() {
    let mut out = Vec::new();
    head::own_response(503, "none\n", true, false, false, &mut out);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nnone\n"
    );
    head::own_response(502, "x\n", false, false, true, &mut out);
    assert!(out.ends_with(b"Connection: close\r\n\r\n"));
    head::own_response(503, "x\n", true, true, false, &mut out);
    assert!(String::from_utf8_lossy(&out).contains("Connection: keep-alive\r\n"));
}

// ---- the whole forwarder, over loopback ----

/// A router over instances listening on `ports`, serving on a port of its
/// own (returned).
async fn proxy(ports: &[u16], queue: Duration) -> (Arc<Router>, u16) {
    let router = Arc::new(Router::for_test(Settings {
        port: 0,
        mode: Mode::Http,
        queue_timeout: queue,
        response_timeout: None,
        max_connections: None,
    }));
    for (i, p) in ports.iter().enumerate() {
        router.route_in(
            InstanceId(i as u64),
            *p,
            Arc::new(Notify::new()),
            Box::new(|| {}),
        );
    }
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let r = router.clone();
    tokio::spawn(async move {
        while let Ok((s, peer)) = l.accept().await {
            tokio::spawn(super::serve(
                s,
                peer,
                r.clone(),
                r.accept(),
                r.permit().await,
            ));
        }
    });
    (router, port)
}

/// An instance that runs `script` on each connection it accepts.
async fn instance<F, Fut>(script: F) -> u16
where
    F: Fn(TcpStream, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let script = Arc::new(script);
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((s, _)) = l.accept().await {
            let script = script.clone();
            tokio::spawn(async move { script(s, n).await });
            n += 1;
        }
    });
    port
}

/// A client connection to the proxy on `port` that has sent `bytes`.
async fn send(port: u16, bytes: &[u8]) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    c.write_all(bytes).await.unwrap();
    c
}

/// Reads one head (to its blank line) from `s`, byte by byte.
async fn read_head(s: &mut TcpStream) -> String {
    let mut h = Vec::new();
    while !h.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if s.read(&mut b).await.unwrap() == 0 {
            break;
        }
        h.push(b[0]);
    }
    String::from_utf8(h).unwrap()
}

/// Reads a response with a `Content-Length`: its head and its body.
async fn read_response(s: &mut TcpStream) -> (String, String) {
    let h = read_head(s).await;
    let len: usize = h
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length in {h}"));
    let body = read_exact(s, len).await;
    (h, body)
}

async fn read_exact(s: &mut TcpStream, n: usize) -> String {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).await.unwrap();
    String::from_utf8(b).unwrap()
}

/// Reads what is sent until the connection closes (bounded).
async fn read_to_end(s: &mut TcpStream) -> String {
    read_to_end_within(s, Duration::from_secs(5)).await
}

async fn read_to_end_within(s: &mut TcpStream, limit: Duration) -> String {
    let mut v = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut v))
        .await
        .expect("connection not closed")
        .unwrap();
    String::from_utf8(v).unwrap()
}

/// An instance that answers each request on a connection with its head
/// (request line and headers) as the body, and counts its connections.
async fn echo_heads() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = conns.clone();
    let port = instance(move |mut s, _| {
        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            loop {
                let h = read_head(&mut s).await;
                if h.is_empty() {
                    return;
                }
                let r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{h}", h.len());
                if s.write_all(r.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (port, conns)
}

/// An instance that counts every byte it is sent, and answers nothing.
async fn byte_counter() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let b = bytes.clone();
    let port = instance(move |mut s, _| {
        let b = b.clone();
        async move {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                b.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
            }
        }
    })
    .await;
    (port, bytes)
}

/// Chunk sizes and trailers RFC 9112 does not allow, each sent with its
/// head in one write: a 400, an error counted, and not a byte to the
/// instance (a trailer line that is a request would otherwise reach an
/// instance that ends the body at `0\r\n`, unparsed and uncounted).
#[tokio::test]
async fn malformed_chunked_bodies_get_400_and_reach_no_instance() {
    let (backend, bytes) = byte_counter().await;
    let (r, port) = proxy(&[backend], Duration::from_secs(1)).await;
    let bodies: [&[u8]; 12] = [
        b"5 junk\r\nhello\r\n0\r\n\r\n",
        b"5 \r\nhello\r\n0\r\n\r\n",
        b"5\t\r\nhello\r\n0\r\n\r\n",
        b"5;\r\nhello\r\n0\r\n\r\n",
        b"0\r\nGET /smug HTTP/1.1\r\nHost: x\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"5\nhello\n0\n\n",
        b"5\r\nhelloworld\r\n0\r\n\r\n",
        b"0\r\n X: 1\r\n\r\n",
        b"0\r\nX: a\x00\r\n\r\n",
        b"5;a=\"x\r\nhello\r\n0\r\n\r\n",
    ];
    for body in bodies {
        let mut req =
            b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        req.extend_from_slice(body);
        let mut c = send(port, &req).await;
        let answer = read_to_end(&mut c).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n")
                && answer.ends_with("bad request: malformed chunked body\n"),
            "{}: {answer}",
            String::from_utf8_lossy(body)
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bytes.load(std::sync::atomic::Ordering::SeqCst), 0);
    let traffic = r.render(|_| Some(0));
    assert!(
        traffic.contains("\nrequests 12\ninflight 0\nerrors 12\n"),
        "{traffic}"
    );
}

/// A body that turns out malformed after its first chunks went on: 400 to
/// the client, and the instance's connection closed mid-body, so that it
/// never takes what follows for a request.
#[tokio::test]
async fn a_body_malformed_later_ends_both_connections() {
    let (backend, bytes) = byte_counter().await;
    let (r, port) = proxy(&[backend], Duration::from_secs(1)).await;
    let mut c = send(
        port,
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sent = bytes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(sent > 0, "the valid part went on");
    c.write_all(b"0\r\nGET /smug HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_end(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Only the valid part went on: the instance got "0\r\n" at most
    // before its connection closed, never the request after it.
    let after = bytes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(after - sent <= 3, "{sent} then {after}");
    assert!(r.render(|_| Some(0)).contains("\nerrors 1\n"));
}

/// At its max_connections, a port lets a new client in by closing an
/// idle keep-alive connection (between requests), not by making it wait
/// for one that may idle for minutes.
#[tokio::test]
async fn at_max_connections_an_idle_connection_makes_room() {
    let (backend, _) = echo_heads().await;
    let (r, port) = proxy(&[backend], Duration::from_secs(1)).await;
    r.set_max_connections(Some(2));
    let get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut c = send(port, get).await;
        let (h, _) = read_response(&mut c).await;
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        idle.push(c);
    }
    let t = std::time::Instant::now();
    let mut third = send(port, get).await;
    let (h, _) = tokio::time::timeout(Duration::from_secs(5), read_response(&mut third))
        .await
        .expect("the third client waited");
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert!(t.elapsed() < Duration::from_secs(2));
    // One of the idle two was closed for it.
    let mut closed = 0;
    for c in &mut idle {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(500), c.read(&mut b)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 1);
}

/// A client connection that never sends a byte is closed after
/// FIRST_BYTE_TIMEOUT: a flood of them holds a port's connections only
/// that long.
#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let (backend, _) = echo_heads().await;
    let (_r, port) = proxy(&[backend], Duration::from_secs(1)).await;
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let t = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(
        super::FIRST_BYTE_TIMEOUT + Duration::from_secs(5),
        c.read(&mut buf),
    )
    .await
    .expect("still open long after the first-byte timeout");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(t.elapsed() >= super::FIRST_BYTE_TIMEOUT - Duration::from_millis(200));
}

#[tokio::test]
async fn a_body_is_never_read_as_a_request_whatever_connection_names() {
    // The instance reads each request by its Content-Length, as servers
    // do, and answers with the request lines it has seen so far.
    let seen = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let backend = instance(move |mut s, _| {
        let log = log.clone();
        async move {
            loop {
                let h = read_head(&mut s).await;
                if h.is_empty() {
                    return;
                }
                let len: usize = h
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                let _ = read_exact(&mut s, len).await;
                let body = {
                    let mut log = log.lock();
                    log.push(h.lines().next().unwrap_or("").to_string());
                    log.join("|")
                };
                let r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if s.write_all(r.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let (_r, port) = proxy(&[backend], Duration::from_secs(1)).await;
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // A body that is a request, whose length the client names as hop-by-hop.
    let inner = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let outer = format!(
        "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: keep-alive, Content-Length\r\n\r\n{inner}",
        inner.len()
    );
    c.write_all(outer.as_bytes()).await.unwrap();
    let (_, body) = read_response(&mut c).await;
    assert_eq!(body, "POST /upload HTTP/1.1");
    c.write_all(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = read_response(&mut c).await;
    assert_eq!(body, "POST /upload HTTP/1.1|GET /next HTTP/1.1");
    assert!(!seen.lock().iter().any(|l| l.contains("smuggled")));
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_over_one_instance_connection() {
    let (backend, conns) = echo_heads().await;
    let (r, port) = proxy(&[backend], Duration::from_secs(1)).await;
    // The client is a proxy the manifest trusts: its X-Forwarded-For is kept.
    r.set_trusted(vec!["127.0.0.0/8".parse().unwrap()]);
    let mut c = send(port, b"GET /1 HTTP/1.1\r\nHost: a\r\nConnection: X-Hop\r\nX-Hop: 1\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 9.9.9.9\r\n\r\n",).await;
    for (path, xff) in [("/1", "127.0.0.1"), ("/2", "9.9.9.9, 127.0.0.1")] {
        let (h, body) = read_response(&mut c).await;
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"), "{h}");
        assert!(
            body.starts_with(&format!("GET {path} HTTP/1.1\r\nHost: a\r\n")),
            "{body}"
        );
        assert!(
            body.contains(&format!("X-Forwarded-For: {xff}\r\n")),
            "{body}"
        );
        assert!(
            !body.contains("X-Hop") && !body.contains("Connection"),
            "{body}"
        );
    }
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bodies_pass_in_their_own_framing_both_ways() {
    // The instance reads a chunked request body to its end and answers with
    // it, chunked the same way.
    let backend = instance(|mut s, _| async move {
        let h = read_head(&mut s).await;
        assert!(h.contains("Transfer-Encoding: chunked"), "{h}");
        let mut body = Vec::new();
        let mut c = Chunked::default();
        loop {
            let mut b = [0u8; 7];
            let n = s.read(&mut b).await.unwrap();
            assert!(n > 0, "request body cut short");
            body.extend_from_slice(&b[..n]);
            if c.feed(&b[..n]).unwrap().is_some() {
                break;
            }
        }
        let mut r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        r.extend_from_slice(&body);
        s.write_all(&r).await.unwrap();
        let _ = read_to_end(&mut s).await;
    })
    .await;
    let (_r, port) = proxy(&[backend], Duration::from_secs(1)).await;
    let mut c = send(
        port,
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await;
    // The body in dribs, as a streaming client sends it.
    for part in CHUNKED.chunks(9) {
        c.write_all(part).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let h = read_head(&mut c).await;
    assert!(h.contains("Transfer-Encoding: chunked"), "{h}");
    let body = read_exact(&mut c, CHUNKED.len()).await;
    assert_eq!(body.as_bytes(), CHUNKED);
}

#[tokio::test]
async fn a_close_delimited_response_reaches_the_client_whole_then_closes() {
    let backend = instance(|mut s, _| async move {
        let _ = read_head(&mut s).await;
        s.write_all(b"HTTP/1.1 200 OK\r\n\r\npart one, ")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.write_all(b"part two").await.unwrap();
    })
    .await;
    let (_r, port) = proxy(&[backend], Duration::from_secs(1)).await;
    let mut c = send(port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let all = read_to_end(&mut c).await;
    assert_eq!(
        all,
        "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart one, part two"
    );
}

#[tokio::test]
async fn expect_100_continue_is_passed_on_before_the_body() {
    let backend = instance(|mut s, _| async move {
        let h = read_head(&mut s).await;
        assert!(h.contains("Expect: 100-continue"), "{h}");
        s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
        let body = read_exact(&mut s, 4).await;
        let r = format!("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n{body}");
        s.write_all(r.as_bytes()).await.unwrap();
        let _ = read_to_end(&mut s).await;
    })
    .await;
    let (_r, port) = proxy(&[backend], Duration::from_secs(1)).await;
    let mut c = send(
        port,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    // The client sends its body only after the 100.
    assert_eq!(read_head(&mut c).await, "HTTP/1.1 100 Continue\r\n\r\n");
    c.write_all(b"data").await.unwrap();
    let h = read_head(&mut c).await;
    assert!(h.starts_with("HTTP/1.1 200 OK"), "{h}");
    assert_eq!(read_exact(&mut c, 4).await, "data");
}

/// One GET on a new client connection; the response's head and body.
async fn get(port: u16, path: &str) -> String {
    let mut c = send(
        port,
        format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    read_to_end(&mut c).await
}

async fn futures_join(port: u16) -> [String; 3] {
    let (a, b, c) = tokio::join!(get(port, "/a"), get(port, "/b"), get(port, "/c"));
    [a, b, c]
}

#[tokio::test]
async fn a_pooled_connection_the_instance_closed_is_not_a_failure() {
    // The instance answers one request per connection but claims
    // keep-alive, then closes: the next request finds a dead pooled
    // connection, whether the check before reuse sees it or not.
    let backend = instance(|mut s, n| async move {
        let _ = read_head(&mut s).await;
        let body = format!("conn {n}");
        let r = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(r.as_bytes()).await.unwrap();
    })
    .await;
    let (router, port) = proxy(&[backend], Duration::from_millis(200)).await;
    // Three at once leave three pooled connections, all closed by now.
    let three = futures_join(port).await;
    assert!(
        three.iter().all(|r| r.starts_with("HTTP/1.1 200 OK")),
        "{three:?}"
    );
    for i in 0..5 {
        let r = get(port, "/").await;
        assert!(r.starts_with("HTTP/1.1 200 OK"), "request {i}: {r}");
    }
    assert!(router.render(|_| Some(0)).contains("errors 0"));
}

#[tokio::test]
async fn an_idempotent_request_the_instance_drops_is_retried_on_another() {
    // The first instance closes every connection without a word.
    let mute = instance(|mut s, _| async move {
        let _ = read_head(&mut s).await;
    })
    .await;
    let (good, _) = echo_heads().await;
    let (router, port) = proxy(&[mute, good], Duration::from_millis(200)).await;
    for _ in 0..4 {
        let r = get(port, "/again").await;
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.contains("GET /again HTTP/1.1"), "{r}");
    }
    // Balancing sent some to the mute one; the clients never knew, the
    // traffic file does.
    assert_eq!(counter(&router, "", "requests"), 4);
    assert_eq!(counter(&router, "", "errors"), 0);
    let retried = counter(&router, "", "retried");
    assert!(retried >= 1, "{}", router.render(|id| Some(id.0 as u32)));
    assert_eq!(counter(&router, "instance 0 ", "retried"), retried);
    assert_eq!(counter(&router, "instance 0 ", "requests"), 0);
    assert_eq!(counter(&router, "instance 1 ", "requests"), 4);
    assert_eq!(counter(&router, "instance 1 ", "retried"), 0);
    // A POST has been sent once and may have done its work: it is not sent
    // again, and the client is told.
    let (router, port) = proxy(&[mute], Duration::from_millis(200)).await;
    let mut c = send(
        port,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
    )
    .await;
    let r = read_to_end(&mut c).await;
    assert!(r.starts_with("HTTP/1.1 502 Bad Gateway"), "{r}");
    assert!(
        r.contains("Connection: close") && r.ends_with("the instance failed before answering\n"),
        "{r}"
    );
    // One error, counted once on the instance too.
    assert_eq!(counter(&router, "", "errors"), 1);
    assert_eq!(counter(&router, "instance 0 ", "errors"), 1);
    assert_eq!(counter(&router, "instance 0 ", "retried"), 0);
}

#[tokio::test]
async fn bad_or_unsupported_requests_are_refused_and_reach_no_instance() {
    let (backend, conns) = echo_heads().await;
    let (_r, port) = proxy(&[backend], Duration::from_secs(1)).await;
    for bad in [
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
        "GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n",
        "NOT HTTP AT ALL\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: public.example\r\nHost: admin.internal\r\n\r\n",
        "GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
        "GET ftp://files.example/x HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        let mut c = send(port, bad.as_bytes()).await;
        let r = read_to_end(&mut c).await;
        assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{bad}: {r}");
        assert!(r.contains("Connection: close"), "{r}");
    }
    let mut c = send(
        port,
        b"CONNECT internal.example:22 HTTP/1.1\r\nHost: internal.example:22\r\n\r\n",
    )
    .await;
    let r = read_to_end(&mut c).await;
    assert!(r.starts_with("HTTP/1.1 501 Not Implemented\r\n"), "{r}");
    assert!(
        r.ends_with("\r\n\r\nCONNECT is not supported: deployd is a reverse proxy\n"),
        "{r}"
    );
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let _ = c.write_all(huge.as_bytes()).await;
    let r = read_to_end(&mut c).await;
    assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn with_no_instance_a_request_waits_then_gets_503_and_keeps_its_connection() {
    let (_r, port) = proxy(&[], Duration::from_millis(100)).await;
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let started = std::time::Instant::now();
    c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let h = read_head(&mut c).await;
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert!(h.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{h}");
    assert!(!h.contains("Connection: close"), "{h}");
    let len = "no instance is ready (waited 100ms)\n".len();
    assert_eq!(
        read_exact(&mut c, len).await,
        "no instance is ready (waited 100ms)\n"
    );
    // The same connection asks again once an instance is there.
    let (backend, _) = echo_heads().await;
    _r.route_in(
        InstanceId(7),
        backend,
        Arc::new(Notify::new()),
        Box::new(|| {}),
    );
    c.write_all(b"GET /now HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let h = read_head(&mut c).await;
    assert!(h.starts_with("HTTP/1.1 200 OK"), "{h}");
}

#[tokio::test]
async fn an_upgrade_is_tunnelled_with_the_bytes_sent_along_with_it() {
    let backend = instance(|mut s, _| async move {
        let h = read_head(&mut s).await;
        assert!(h.contains("Upgrade: echo"), "{h}");
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nhello ")
            .await
            .unwrap();
        let mut b = [0u8; 64];
        loop {
            let n = s.read(&mut b).await.unwrap_or(0);
            if n == 0 || s.write_all(&b[..n]).await.is_err() {
                return;
            }
        }
    })
    .await;
    let (router, port) = proxy(&[backend], Duration::from_secs(1)).await;
    // The first tunnel bytes ride with the request.
    let mut c = send(
        port,
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly",
    )
    .await;
    let h = read_head(&mut c).await;
    assert!(h.starts_with("HTTP/1.1 101 "), "{h}");
    assert_eq!(read_exact(&mut c, 11).await, "hello early");
    c.write_all(b"more").await.unwrap();
    assert_eq!(read_exact(&mut c, 4).await, "more");
    assert_eq!(router.inflight(InstanceId(0)), 1);
    // Closing the instance cuts the tunnel, which ends as a tcp connection
    // would: counted, not an error.
    assert_eq!(router.close(InstanceId(0)), 1);
    assert_eq!(read_to_end(&mut c).await, "");
    wait_until(|| router.render(|_| Some(0)).contains("\nrequests 1\n")).await;
    assert_eq!(counter(&router, "", "errors"), 0);
}

#[tokio::test(start_paused = true)]
async fn an_upload_that_stops_halfway_gets_408_and_frees_its_instance() {
    // The instance takes what comes of the body and reports when its
    // connection ends.
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let backend = instance(move |mut s, _| {
        let ended_tx = ended_tx.clone();
        async move {
            let _ = read_head(&mut s).await;
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got).await;
            let _ = ended_tx.send(got);
        }
    })
    .await;
    let (router, port) = proxy(&[backend], Duration::from_secs(1)).await;
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let started = tokio::time::Instant::now();
    c.write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    // Bytes that keep coming, however slowly, keep it going.
    for _ in 0..3 {
        tokio::time::sleep(super::BODY_IDLE / 2).await;
        c.write_all(b"d").await.unwrap();
    }
    assert_eq!(router.inflight(InstanceId(0)), 1);
    // Then nothing.
    let r = read_to_end_within(&mut c, Duration::from_secs(120)).await;
    assert!(r.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{r}");
    assert!(r.contains("Connection: close"), "{r}");
    assert!(r.ends_with("request body not received in time\n"), "{r}");
    let took = started.elapsed();
    let expected = super::BODY_IDLE / 2 * 3 + super::BODY_IDLE;
    assert!(
        took >= expected && took < expected + Duration::from_secs(5),
        "{took:?}"
    );
    let got = tokio::time::timeout(Duration::from_secs(5), ended.recv()).await;
    assert_eq!(
        got.expect("instance connection still open"),
        Some(b"abcddd".to_vec())
    );
    assert_eq!(router.inflight(InstanceId(0)), 0);
    assert_eq!(counter(&router, "", "abandoned"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_head_that_dribbles_in_gets_408_and_an_idle_connection_is_closed() {
    let (backend, conns) = echo_heads().await;
    let (_r, port) = proxy(&[backend], Duration::from_secs(1)).await;
    // One byte every 20 s: each read is in time, the head as a whole is not.
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let started = tokio::time::Instant::now();
    c.write_all(b"G").await.unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    c.write_all(b"E").await.unwrap();
    let r = read_to_end_within(&mut c, Duration::from_secs(60)).await;
    assert!(r.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{r}");
    assert!(r.contains("Connection: close"), "{r}");
    let took = started.elapsed();
    assert!(
        took >= super::HEAD_TIMEOUT && took < super::HEAD_TIMEOUT + Duration::from_secs(5),
        "{took:?}"
    );
    // A kept-alive connection is left alone while it is used, and closed
    // after IDLE_TIMEOUT without a request.
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    for _ in 0..2 {
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let (h, _) = read_response(&mut c).await;
        assert!(h.starts_with("HTTP/1.1 200 OK"), "{h}");
        tokio::time::sleep(super::IDLE_TIMEOUT - Duration::from_secs(1)).await;
    }
    let idle = tokio::time::Instant::now();
    let r = read_to_end(&mut c).await;
    assert_eq!(r, "");
    assert!(
        idle.elapsed() <= Duration::from_secs(2),
        "{:?}",
        idle.elapsed()
    );
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_response_that_is_not_http_becomes_a_502_and_counts_as_an_error() {
    let backend = instance(|mut s, _| async move {
        let _ = read_head(&mut s).await;
        let _ = s.write_all(b"SSH-2.0-OpenSSH\r\n\r\n").await;
    })
    .await;
    let (router, port) = proxy(&[backend], Duration::from_millis(200)).await;
    let r = get(port, "/").await;
    assert!(r.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{r}");
    assert!(
        r.ends_with("the instance sent a response that is not HTTP/1\n"),
        "{r}"
    );
    let traffic = router.render(|_| Some(0));
    assert!(traffic.contains("\nerrors 1\n"), "{traffic}");
    assert_eq!(counter(&router, "instance 0 ", "errors"), 1);
}

#[tokio::test]
async fn a_response_cut_short_at_the_end_of_a_drain_counts_as_an_error() {
    // The instance sends half its body, then nothing.
    let backend = instance(|mut s, _| async move {
        let _ = read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf.")
            .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let (router, port) = proxy(&[backend], Duration::from_secs(1)).await;
    let mut c = send(port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let h = read_head(&mut c).await;
    assert!(h.starts_with("HTTP/1.1 200 OK"), "{h}");
    assert_eq!(read_exact(&mut c, 5).await, "half.");
    assert_eq!(router.close(InstanceId(0)), 1);
    // The client sees its response end early; deployd counts it.
    assert_eq!(read_to_end(&mut c).await, "");
    wait_until(|| router.render(|_| Some(0)).contains("\nerrors 1\n")).await;
    assert_eq!(counter(&router, "", "requests"), 1);
    assert_eq!(counter(&router, "", "abandoned"), 0);
}

#[tokio::test]
async fn an_answer_before_the_upload_is_through_closes_both_connections() {
    // The instance refuses the upload after its head: 413 at once, body
    // unread.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = instance(move |mut s, n| {
        let tx = tx.clone();
        async move {
            let _ = read_head(&mut s).await;
            let _ = s
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!")
                .await;
            // Whether deployd hangs up on this connection (it must: the
            // unsent body would be read as the next request).
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
            let _ = tx.send(n);
        }
    })
    .await;
    let (_r, port) = proxy(&[backend], Duration::from_secs(1)).await;
    let c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut cr, mut cw) = c.into_split();
    // The client goes on sending its body while the answer comes.
    let upload = tokio::spawn(async move {
        let _ = cw
            .write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
            .await;
        let chunk = vec![b'x'; 1000];
        for _ in 0..1000 {
            if cw.write_all(&chunk).await.is_err() {
                break;
            }
        }
        cw
    });
    // Only once the whole upload went out (or failed) does the client read.
    let cw = upload.await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(cr.read(&mut b).await.unwrap(), 1, "closed in the head");
        head.push(b[0]);
    }
    let h = String::from_utf8(head).unwrap();
    assert!(h.starts_with("HTTP/1.1 413 "), "{h}");
    assert!(h.contains("Connection: close"), "{h}");
    let mut body = [0u8; 4];
    cr.read_exact(&mut body).await.unwrap();
    assert_eq!(&body, b"big!");
    let mut c = cr.reunite(cw).unwrap();
    assert_eq!(read_to_end(&mut c).await, "");
    let closed = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
    assert_eq!(
        closed.ok().flatten(),
        Some(0),
        "the instance's connection stayed open"
    );
}

#[tokio::test]
async fn a_get_survives_a_dead_pooled_connection_and_a_mute_new_one() {
    // An instance whose first connection answers once and then closes on
    // the next request, and whose later connections answer nothing: an
    // instance dying. Its pooled connection fails, a new one fails too,
    // and the request still gets its answer from the other instance.
    let dying = instance(|mut s, n| async move {
        let _ = read_head(&mut s).await;
        if n == 0 {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
                .await;
            let _ = read_head(&mut s).await;
        }
    })
    .await;
    // The other instance holds /hold for a while, so that balancing (least
    // outstanding) picks the dying one while it can.
    let good = instance(|mut s, _| async move {
        loop {
            let h = read_head(&mut s).await;
            if h.is_empty() {
                return;
            }
            if h.starts_with("GET /hold") {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{h}", h.len());
            if s.write_all(r.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let (router, port) = proxy(&[dying], Duration::from_millis(500)).await;
    let r = get(port, "/").await;
    assert!(r.ends_with("first"), "{r}");
    router.route_in(
        InstanceId(1),
        good,
        Arc::new(Notify::new()),
        Box::new(|| {}),
    );
    let held = tokio::spawn(get(port, "/hold"));
    wait_until(|| router.inflight(InstanceId(1)) == 1).await;
    let r = get(port, "/again").await;
    assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
    assert!(r.contains("GET /again HTTP/1.1"), "{r}");
    assert!(held.await.unwrap().starts_with("HTTP/1.1 200 OK"));
}

#[tokio::test]
async fn a_post_is_not_sent_on_a_connection_idle_past_the_pool_limit() {
    // An instance with a keep-alive timeout of 1.5 s that notices it only
    // when the next request comes, and drops the connection then: the
    // worst case of a server closing an idle connection just as a request
    // is sent on it. A POST must not be lost to it.
    let ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let e = ended.clone();
    let backend = instance(move |mut s, n| {
        let ended = e.clone();
        async move {
            let mut last: Option<std::time::Instant> = None;
            loop {
                let h = read_head(&mut s).await;
                if h.is_empty() {
                    // deployd closed it.
                    ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                if last.is_some_and(|t| t.elapsed() >= Duration::from_millis(1500)) {
                    return;
                }
                let mut body = [0u8; 2];
                if s.read_exact(&mut body).await.is_err() {
                    return;
                }
                let r = format!("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nconn {n}");
                if s.write_all(r.as_bytes()).await.is_err() {
                    return;
                }
                last = Some(std::time::Instant::now());
            }
        }
    })
    .await;
    let (router, port) = proxy(&[backend], Duration::from_millis(200)).await;
    let post = || async move {
        let req = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi";
        read_to_end(&mut send(port, req).await).await
    };
    let r = post().await;
    assert!(r.ends_with("conn 0"), "{r}");
    // Soon after, its pooled connection serves again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = post().await;
    assert!(r.ends_with("conn 0"), "{r}");
    // Idle past the instance's timeout (and deployd's limit): a new
    // connection takes the POST.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let r = post().await;
    assert!(
        r.starts_with("HTTP/1.1 200 OK") && r.ends_with("conn 1"),
        "{r}"
    );
    assert_eq!(counter(&router, "", "errors"), 0);
    assert_eq!(counter(&router, "", "retried"), 0);
    // The stale connection was closed, not kept.
    wait_until(|| ended.load(std::sync::atomic::Ordering::SeqCst) == 1).await;
}

#[tokio::test]
async fn a_connection_left_in_the_pool_past_its_limit_is_closed() {
    let ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let e = ended.clone();
    let backend = instance(move |mut s, _| {
        let ended = e.clone();
        async move {
            loop {
                let h = read_head(&mut s).await;
                if h.is_empty() {
                    ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                if h.starts_with("GET /hold") {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if s.write_all(ok).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let (_router, port) = proxy(&[backend], Duration::from_millis(200)).await;
    // Two at once leave two connections in the pool.
    let (a, b) = tokio::join!(get(port, "/hold"), get(port, "/hold"));
    assert!(a.ends_with("ok") && b.ends_with("ok"), "{a} {b}");
    // One of them serves a request every 250 ms; the other stays in the
    // pool, and is closed once it has been there past the limit.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(get(port, "/").await.ends_with("ok"));
    }
    let ended = || ended.load(std::sync::atomic::Ordering::SeqCst);
    wait_until(|| ended() >= 1).await;
    // Only that one: the other serves on.
    assert_eq!(ended(), 1);
}

/// A counter of the `traffic` file: `key` on the line that starts with
/// `line` (`""` for the service's totals).
fn counter(router: &Router, line: &str, key: &str) -> u64 {
    let text = router.render(|id| Some(id.0 as u32));
    let found = if line.is_empty() {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
    } else {
        let l = text.lines().find(|l| l.starts_with(line));
        l.and_then(|l| {
            let mut words = l.split(' ');
            words.find(|w| *w == key)?;
            words.next()?.parse().ok()
        })
    };
    found.unwrap_or_else(|| panic!("no {key} for {line:?} in:\n{text}"))
}

async fn wait_until(cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("condition never held");
}

#[tokio::test]
async fn a_client_that_goes_away_frees_its_request_on_the_instance() {
    // The instance never answers; it reports when its connection ends.
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let backend = instance(move |mut s, _| {
        let ended_tx = ended_tx.clone();
        async move {
            let _ = read_head(&mut s).await;
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            let _ = ended_tx.send(rest.len());
        }
    })
    .await;
    let (router, port) = proxy(&[backend], Duration::from_secs(1)).await;
    let c = send(port, b"GET /long-poll HTTP/1.1\r\nHost: a\r\n\r\n").await;
    wait_until(|| router.inflight(InstanceId(0)) == 1).await;
    drop(c);
    // Its connection to the instance is closed, and nothing is in flight
    // any more (a drain would not wait for it).
    let got = tokio::time::timeout(Duration::from_secs(5), ended.recv()).await;
    assert_eq!(got.expect("instance connection still open"), Some(0));
    wait_until(|| router.inflight(InstanceId(0)) == 0).await;
    // Neither served nor an error: abandoned.
    assert_eq!(counter(&router, "", "abandoned"), 1);
    assert_eq!(counter(&router, "instance 0 ", "abandoned"), 1);
    assert_eq!(counter(&router, "", "requests"), 0);
    assert_eq!(counter(&router, "", "errors"), 0);
}

#[tokio::test]
async fn a_client_that_only_stopped_sending_after_its_last_request_gets_the_answer() {
    // `printf 'GET / ...Connection: close' | nc -N`: the client shuts down
    // its sending side at once and reads the answer that comes later.
    let backend = instance(|mut s, _| async move {
        let _ = read_head(&mut s).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlater")
            .await;
    })
    .await;
    let (_router, port) = proxy(&[backend], Duration::from_secs(1)).await;
    let mut c = send(
        port,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    c.shutdown().await.unwrap();
    let r = read_to_end(&mut c).await;
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.ends_with("\r\n\r\nlater"), "{r}");
}

#[tokio::test]
async fn a_request_pipelined_while_one_is_with_its_instance_is_kept_for_after() {
    // The instance holds its first answer until told.
    let go = Arc::new(Notify::new());
    let g = go.clone();
    let backend = instance(move |mut s, _| {
        let g = g.clone();
        async move {
            for i in 0.. {
                let h = read_head(&mut s).await;
                if h.is_empty() {
                    return;
                }
                if i == 0 {
                    g.notified().await;
                }
                let line = h.lines().next().unwrap_or("").to_string();
                let r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{line}",
                    line.len()
                );
                s.write_all(r.as_bytes()).await.unwrap();
            }
        }
    })
    .await;
    let (router, port) = proxy(&[backend], Duration::from_secs(1)).await;
    let mut c = send(port, b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
    wait_until(|| router.inflight(InstanceId(0)) == 1).await;
    // Read by the watch on the client while /1 is with its instance: more
    // than its buffer holds, the rest waiting in the kernel's.
    let more: String = (2..=700)
        .map(|i| format!("GET /{i} HTTP/1.1\r\nHost: a\r\n\r\n"))
        .collect();
    assert!(more.len() > 16 * 1024);
    c.write_all(more.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    go.notify_one();
    for i in 1..=700 {
        let (h, body) = read_response(&mut c).await;
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"), "{h}");
        assert_eq!(body, format!("GET /{i} HTTP/1.1"));
    }
}

#[tokio::test]
async fn a_connection_quiet_for_a_while_serves_its_next_requests() {
    let (backend, conns) = echo_heads().await;
    let (_r, port) = proxy(&[backend], Duration::from_secs(1)).await;
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    for i in 0..3 {
        // Quiet for longer than HOLD before each request: the connection
        // gives back its buffers and takes new ones when it is used again.
        tokio::time::sleep(crate::proxy::HOLD * 3).await;
        c.write_all(format!("GET /{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (h, body) = read_response(&mut c).await;
        assert!(h.starts_with("HTTP/1.1 200 OK"), "{h}");
        assert!(body.starts_with(&format!("GET /{i} HTTP/1.1")), "{body}");
    }
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
}

// ---- generated heads: the next hop frames a message as deployd did ----

mod generated {
    use proptest::prelude::*;

    use super::super::head::{self, Framing, HeadError};

    /// A header name in any case, from those that decide framing and
    /// persistence, those that are hop-by-hop, and plain ones.
    fn name() -> impl Strategy<Value = String> {
        let names = prop::sample::select(vec![
            "Content-Length",
            "Transfer-Encoding",
            "Connection",
            "Upgrade",
            "Keep-Alive",
            "TE",
            "Trailer",
            "Host",
            "X-Forwarded-For",
            "X-A",
        ]);
        (names, any::<u16>()).prop_map(|(n, case)| {
            n.chars()
                .enumerate()
                .map(|(i, c)| {
                    if case & (1 << (i % 16)) != 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    }
                })
                .collect()
        })
    }

    /// A value any of those headers might carry, including the tokens that
    /// name other headers in `Connection`.
    fn value() -> impl Strategy<Value = String> {
        let tokens = prop::sample::select(vec![
            "close",
            "keep-alive",
            "upgrade",
            "content-length",
            "Transfer-Encoding",
            "host",
            "x-a",
            "x-forwarded-for",
            "chunked",
            "gzip",
            "identity",
            "websocket",
            "0",
            "5",
            "12",
            "1.2.3.4",
            "",
        ]);
        prop::collection::vec(tokens, 1..4).prop_map(|t| t.join(", "))
    }

    /// A value such a header usually has.
    fn value_for(name: &str) -> BoxedStrategy<String> {
        let pick = |v: Vec<&'static str>| {
            prop::collection::vec(prop::sample::select(v), 1..3)
                .prop_map(|t| t.join(", "))
                .boxed()
        };
        match name.to_ascii_lowercase().as_str() {
            "content-length" => pick(vec!["0", "5", "12"]),
            "transfer-encoding" => pick(vec!["chunked", "gzip", "identity"]),
            "connection" => pick(vec![
                "close",
                "keep-alive",
                "upgrade",
                "content-length",
                "transfer-encoding",
                "host",
                "x-a",
                "x-forwarded-for",
            ]),
            "upgrade" => Just("websocket".to_string()).boxed(),
            _ => Just("1".to_string()).boxed(),
        }
    }

    fn headers() -> impl Strategy<Value = String> {
        let header = name().prop_flat_map(|n| {
            let v = prop_oneof![4 => value_for(&n), 1 => value()];
            (Just(n), v)
        });
        prop::collection::vec(header, 0..7).prop_map(|hs| {
            hs.iter()
                .map(|(n, v)| format!("{n}: {v}\r\n"))
                .collect::<String>()
        })
    }

    fn request() -> impl Strategy<Value = String> {
        let method = prop::sample::select(vec!["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]);
        let target = prop::sample::select(vec![
            "/p",
            "/p?q=http://x",
            "*",
            "http://h:1/p?q",
            "HTTP://u@h",
            "https://h?q#f",
        ]);
        let version = prop::sample::select(vec!["1.0", "1.1"]);
        // Mostly with a Host first, or most HTTP/1.1 requests would be
        // refused for want of one and test nothing else.
        let host = prop::sample::select(vec!["Host: h\r\n", "Host: h\r\n", "Host: h\r\n", ""]);
        (method, target, version, host, headers())
            .prop_map(|(m, t, v, o, h)| format!("{m} {t} HTTP/{v}\r\n{o}{h}\r\n"))
    }

    fn response() -> impl Strategy<Value = String> {
        let status = prop::sample::select(vec![100u16, 101, 200, 204, 304, 404, 500]);
        let version = prop::sample::select(vec!["1.0", "1.1"]);
        (status, version, headers()).prop_map(|(s, v, h)| format!("HTTP/{v} {s} X\r\n{h}\r\n"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// What deployd sends an instance delimits the body as deployd
        /// read it: otherwise the bytes deployd passes as a body would be
        /// read by the instance as another request (smuggling), on a
        /// connection other clients' requests share.
        #[test]
        fn an_instance_frames_a_request_as_deployd_did(text in request()) {
            let mut out = Vec::new();
            let Ok(r) = head::request(text.as_bytes(), b"10.0.0.9", head::Xff::Append, &mut out) else {
                return Ok(());
            };
            let mut again = Vec::new();
            let r2 = head::request(&out, b"10.0.0.9", head::Xff::Append, &mut again);
            let shown = String::from_utf8_lossy(&out).into_owned();
            prop_assert!(r2.is_ok(), "{text:?} became {shown:?}: {r2:?}");
            let r2 = r2.unwrap();
            prop_assert_eq!(r2.body, r.body, "{:?} became {:?}", text, shown);
            prop_assert_eq!(r2.upgrade, r.upgrade, "{:?} became {:?}", text, shown);
            prop_assert_eq!(r2.len, out.len());
            // Every split is waited on until the head is whole.
            for cut in 0..r.len {
                let partial = head::request(&text.as_bytes()[..cut], b"", head::Xff::Append, &mut again);
                prop_assert_eq!(partial.err(), Some(HeadError::Partial));
            }
        }

        /// What deployd sends a client delimits the response's body as
        /// deployd read it, and says `Connection: close` when the client's
        /// connection will not go on.
        #[test]
        fn a_client_frames_a_response_as_deployd_did(
            req_text in request(),
            text in response(),
            keep in any::<bool>(),
        ) {
            let mut scratch = Vec::new();
            let Ok(req) = head::request(req_text.as_bytes(), b"", head::Xff::Append, &mut scratch) else {
                return Ok(());
            };
            let mut out = Vec::new();
            let Ok(h) = head::response(text.as_bytes(), &req, keep, &mut out) else {
                return Ok(());
            };
            let mut again = Vec::new();
            let h2 = head::response(&out, &req, true, &mut again);
            let shown = String::from_utf8_lossy(&out).into_owned();
            prop_assert!(h2.is_ok(), "{text:?} became {shown:?}: {h2:?}");
            let h2 = h2.unwrap();
            prop_assert_eq!(h2.status, h.status);
            prop_assert_eq!(h2.body, h.body, "{:?} became {:?}", text, shown);
            prop_assert_eq!(h2.len, out.len());
            // The client's connection goes on exactly when the head it
            // gets says it persists (a tunnel's is the tunnel's).
            if !(100..200).contains(&h.status) {
                prop_assert_eq!(h2.reusable, h.keep_client, "{:?} became {:?}", text, shown);
            }
            if h.body == Framing::Eof {
                prop_assert!(!h.keep_client);
            }
        }

        /// A chunked body, however its chunks, extensions and trailers
        /// come and however the reads split it, ends exactly where it
        /// ends: the next request's bytes are never taken as body.
        #[test]
        fn a_chunked_body_ends_where_it_ends(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..6),
            ext in any::<bool>(),
            trailers in prop::collection::vec("[A-Za-z]{1,8}: [ -~]{0,16}", 0..3),
            upper in any::<bool>(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut body = Vec::new();
            for c in &chunks {
                let size = if upper { format!("{:X}", c.len()) } else { format!("{:x}", c.len()) };
                body.extend_from_slice(size.as_bytes());
                if ext {
                    body.extend_from_slice(b";name=\"v\"");
                }
                body.extend_from_slice(b"\r\n");
                body.extend_from_slice(c);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n");
            for t in &trailers {
                body.extend_from_slice(t.as_bytes());
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"\r\n");
            let len = body.len();
            body.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(body.len())).collect();
            points.push(body.len());
            points.sort_unstable();
            let mut c = super::Chunked::default();
            let mut start = 0;
            let mut end = None;
            for p in points {
                if p <= start {
                    continue;
                }
                match c.feed(&body[start..p]) {
                    Ok(Some(n)) => {
                        end = Some(start + n);
                        break;
                    }
                    Ok(None) => start = p,
                    Err(e) => prop_assert!(false, "{e:?} at {start}..{p}"),
                }
            }
            prop_assert_eq!(end, Some(len));
        }

        /// Any bytes at all: an answer, never a panic, and never a head
        /// longer than what was read.
        #[test]
        fn any_bytes_get_a_verdict(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut out = Vec::new();
            if let Ok(r) = head::request(&bytes, b"", head::Xff::Append, &mut out) {
                prop_assert!(r.len <= bytes.len());
            }
            let mut scratch = Vec::new();
            let get = head::request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"", head::Xff::Append, &mut scratch);
            prop_assert!(get.is_ok());
            if let Ok(h) = head::response(&bytes, &get.unwrap(), true, &mut out) {
                prop_assert!(h.len <= bytes.len());
            }
            if let Ok(Some(n)) = super::Chunked::default().feed(&bytes) {
                prop_assert!(n <= bytes.len());
            }
        }
    }
}

#[tokio::test]
async fn an_instance_that_does_not_start_answering_in_time_gets_its_client_a_504() {
    // Its first connection never answers; later ones do, a head at once
    // and the body only after longer than the timeout.
    let backend = instance(|mut s, n| async move {
        let _ = read_head(&mut s).await;
        if n == 0 {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsl")
            .await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        let _ = s.write_all(b"ow\n").await;
        let _ = read_head(&mut s).await;
    })
    .await;
    let (router, port) = proxy(&[backend], Duration::from_secs(1)).await;
    router.set_timeouts(Duration::from_secs(1), Some(Duration::from_millis(300)));
    let started = std::time::Instant::now();
    let mut c = send(port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let (h, body) = read_response(&mut c).await;
    assert!(h.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"), "{h}");
    assert_eq!(
        body,
        "the instance did not answer within response_timeout 300ms\n"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(counter(&router, "instance 0 ", "errors"), 1);
    // The client's connection goes on; the instance's, mid-request, does
    // not. A response whose head came in time may take longer than the
    // limit for its body: only the head is timed.
    c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (h, body) = read_response(&mut c).await;
    assert!(h.starts_with("HTTP/1.1 200 OK\r\n"), "{h}");
    assert_eq!(body, "slow\n");
    assert_eq!(counter(&router, "instance 0 ", "errors"), 1);
}

#[tokio::test]
async fn with_an_access_log_each_request_gets_its_line() {
    let (backend, _) = echo_heads().await;
    let (router, port) = proxy(&[backend], Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let log = crate::proxy::access::AccessLog::open(path.clone(), 1 << 20).unwrap();
    router.set_access_log(Some(Arc::new(log)));
    let mut c = send(port, b"GET /orders?id=7 HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let (h, _) = read_response(&mut c).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    c.write_all(b"DELETE /x HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let _ = read_response(&mut c).await;
    // No instance: a 503, with no instance to name.
    router.route_out(InstanceId(0));
    let r = get(port, "/none").await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    wait_until(|| read().lines().count() == 3).await;
    let text = read();
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 3, "{text}");
    let upstream = format!("127.0.0.1:{backend}");
    assert_eq!(
        &lines[0][1..5],
        ["127.0.0.1", "GET", "/orders?id=7", "200"],
        "{text}"
    );
    assert_eq!(lines[0][6], upstream);
    assert!(lines[0][5].parse::<f64>().is_ok(), "{text}");
    assert_eq!(&lines[1][2..5], ["DELETE", "/x", "200"]);
    assert_eq!(&lines[2][2..5], ["GET", "/none", "503"]);
    assert_eq!(lines[2][6], "-");
    assert!(router.render(|_| Some(0)).contains("\naccess_dropped 0\n"));
    // Off again: nothing more is written.
    router.set_access_log(None);
    let _ = get(port, "/after").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
}

/// Waits (bounded) for the router to owe `n` answers.
async fn owed_becomes(router: &Router, n: usize, what: &str) {
    for _ in 0..500 {
        if router.owed() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("{what}: owed {} (not {n})", router.owed());
}

/// What a stopping deployd waits for: a fresh connection's first request
/// from the accept (even quiet past HOLD), each later one from its first
/// byte, nothing for a connection idle between requests; and every way a
/// request ends gives its count back.
#[tokio::test]
async fn a_request_is_owed_from_its_first_byte_and_a_first_one_from_the_accept() {
    let (port, _) = echo_heads().await;
    let (router, front) = proxy(&[port], Duration::from_secs(5)).await;
    assert_eq!(router.owed(), 0);
    let mut c = TcpStream::connect(("127.0.0.1", front)).await.unwrap();
    owed_becomes(&router, 1, "a fresh connection").await;
    tokio::time::sleep(super::HOLD * 3).await;
    assert_eq!(router.owed(), 1, "a quiet fresh connection still owed");
    c.write_all(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let (h, _) = read_response(&mut c).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    owed_becomes(&router, 0, "answered, idle between requests").await;
    // A later request, from its first byte: half a head is owed.
    c.write_all(b"GET /b HTTP/1.1\r\n").await.unwrap();
    owed_becomes(&router, 1, "half a head").await;
    c.write_all(b"Host: t\r\n\r\n").await.unwrap();
    let (h, _) = read_response(&mut c).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    owed_becomes(&router, 0, "the second answered").await;
    // Refused (a 400, the connection closed), or never sent: given back.
    c.write_all(b"BAD\r\n\r\n").await.unwrap();
    let rest = read_to_end(&mut c).await;
    assert!(rest.starts_with("HTTP/1.1 400"), "{rest}");
    owed_becomes(&router, 0, "a refused request").await;
    let quiet = TcpStream::connect(("127.0.0.1", front)).await.unwrap();
    owed_becomes(&router, 1, "another fresh connection").await;
    drop(quiet);
    owed_becomes(&router, 0, "a connection closed unused").await;
}
