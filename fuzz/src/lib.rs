//! What the fuzz targets share: hyper, a conforming HTTP/1.1 server, as
//! the reference deployd's proxy is held to. [`serve`] feeds it bytes as a
//! client would send them on one connection and says which requests it
//! read, with their bodies whole, and how the connection ended.
//!
//! The property the HTTP targets check is framing agreement: wherever
//! deployd takes a message to end, a server behind it must take it to end
//! at the same byte, or a client could hide a request in a body (or a body
//! in a request) that deployd never parsed. deployd may refuse what hyper
//! accepts (it is stricter on purpose); it must never accept what hyper
//! frames otherwise.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A request as hyper read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Method and target, as in the request line.
    pub line: String,
    /// The body's data, whole (chunks decoded).
    pub body: Vec<u8>,
}

/// What hyper made of one connection's bytes.
#[derive(Debug, Default)]
pub struct Served {
    /// The requests it read whole, in order.
    pub requests: Vec<Seen>,
    /// Whether it failed on a request's head (before any service call for
    /// it), as a server that answers 400 to what it cannot parse.
    pub head_error: bool,
    /// Why a request's body could not be read, if one could not.
    pub body_error: Option<String>,
    /// How the connection ended, if in an error.
    pub error: Option<String>,
}

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
}

/// A request whose head deployd parsed: the next request on the
/// connection, which hyper must find right where deployd's framing ends.
pub const SENTINEL: &[u8] = b"GET /sentinel HTTP/1.1\r\nHost: s\r\n\r\n";

/// Feeds `input` to a hyper HTTP/1.1 server as one connection whose client
/// then half-closes it.
pub fn serve(input: &[u8]) -> Served {
    RT.with(|rt| rt.block_on(serve_async(input)))
}

async fn serve_async(input: &[u8]) -> Served {
    let (client, server) = tokio::io::duplex(input.len() + (1 << 16));
    let (mut from_server, mut to_server) = tokio::io::split(client);
    let seen = Arc::new(std::sync::Mutex::new(Served::default()));
    let input = input.to_vec();
    let writer = tokio::spawn(async move {
        let _ = to_server.write_all(&input).await;
        let _ = to_server.shutdown().await;
    });
    // Responses are read and dropped, so that the server never waits.
    let reader = tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = from_server.read_to_end(&mut sink).await;
    });
    let service = {
        let seen = seen.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let seen = seen.clone();
            async move {
                let line = format!("{} {}", req.method(), req.uri());
                match req.into_body().collect().await {
                    Ok(c) => {
                        let body = c.to_bytes().to_vec();
                        seen.lock().unwrap().requests.push(Seen { line, body });
                        Ok::<_, hyper::Error>(Response::new(Empty::<Bytes>::new()))
                    }
                    Err(e) => {
                        seen.lock().unwrap().body_error = Some(e.to_string());
                        Err(e)
                    }
                }
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // deployd takes up to 128 header lines; hyper's default is 100.
    builder.max_headers(128);
    // The client sends everything, then half-closes: what it sent is
    // still to be answered.
    builder.half_close(true);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(server), service);
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    let _ = writer.await;
    let _ = reader.await;
    let mut out = std::mem::take(&mut *seen.lock().unwrap());
    // An error that is not a body's: on a head, before any service call
    // for it (hyper answers 400 and closes).
    out.head_error = matches!(ended, Ok(Err(_))) && out.body_error.is_none();
    out.error = match ended {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:?}")),
        Err(_) => Some("timed out".into()),
    };
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn two_requests() {
        let s = super::serve(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /sentinel HTTP/1.1\r\nHost: s\r\n\r\n");
        assert_eq!(s.requests.len(), 2, "{s:?}");
    }
}
