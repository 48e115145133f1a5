//! HTTP/1 heads as deployd's proxy sees them: parsed with `httparse`
//! (hyper's own parser), judged for what the proxy needs (how the body is
//! delimited, whether the connection persists, whether it is an upgrade),
//! and written out again for the next hop: hop-by-hop headers dropped,
//! `X-Forwarded-For` set, `Connection` set for the hop, the framing headers
//! normalised (one `Content-Length`, or `Transfer-Encoding: chunked`).
//! Everything else passes through byte for byte, bodies in their original
//! framing.
//!
//! Requests are held to RFC 9112 wherever two servers could frame one
//! differently: no body both counted and chunked, no coding but `chunked`
//! (applied once), no two lengths that disagree, one `Host`.

use std::io::Write as _;

/// The largest head accepted, request or response.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header lines accepted in one head.
const MAX_HEADERS: usize = 128;
/// The most header lines accepted in a request's head: what deployd adds
/// for the instance (`X-Forwarded-For`, the framing, `Connection`,
/// `Upgrade`, `Host`) keeps it within the 128 lines of any head, and within the 100
/// a hyper server takes by default.
pub const MAX_REQUEST_HEADERS: usize = 96;
/// Bytes of a request's head deployd keeps for what it adds: the head it
/// sends on stays within [`MAX_HEAD`].
const HEAD_SLACK: usize = 1024;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the sender closes (responses only).
    Eof,
}

/// Why a head could not be taken.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadError {
    /// Not all of it is here yet.
    Partial,
    /// Longer than [`MAX_HEAD`] or more than 128 header lines (a request:
    /// 1 KiB less, and [`MAX_REQUEST_HEADERS`]).
    TooLarge,
    /// Not valid HTTP/1, or ambiguous about its body.
    Bad(&'static str),
    /// Valid, but asks for what a reverse proxy does not do (`CONNECT`, a
    /// transfer coding other than chunked).
    Unsupported(&'static str),
}

/// What becomes of the `X-Forwarded-For` a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Xff {
    /// Replaced by the client's address: anyone can write the header, so
    /// what a client says there is only believed from a trusted proxy.
    Replace,
    /// Kept, with the client's address appended: the client is a proxy
    /// the manifest trusts (`trusted_proxies`).
    Append,
}

/// What the proxy knows of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head in the buffer it was parsed from.
    pub len: usize,
    pub body: Framing,
    /// A HEAD request: its response has no body whatever it says.
    pub is_head: bool,
    /// GET, HEAD, OPTIONS, TRACE, PUT or DELETE.
    pub idempotent: bool,
    pub http10: bool,
    /// The client wants its connection kept after the response.
    pub keep_alive: bool,
    /// `Connection: upgrade` with an `Upgrade` header (WebSocket).
    pub upgrade: bool,
}

impl RequestHead {
    /// Whether it may be sent again to another instance after one failed
    /// before answering: idempotent, nothing but the head to send.
    pub fn retryable(&self) -> bool {
        self.idempotent && self.body == Framing::None && !self.upgrade
    }
}

/// What the proxy knows of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub body: Framing,
    /// The instance keeps the connection open after this response.
    pub reusable: bool,
    /// The client's connection stays open after this response.
    pub keep_client: bool,
}

/// The `Connection` header's tokens, as far as the proxy cares.
#[derive(Default)]
struct ConnTokens {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
}

/// The header lines of one head, once scanned.
struct Scan<'h, 'b> {
    headers: &'h [httparse::Header<'b>],
    tokens: ConnTokens,
    /// The last `Transfer-Encoding` coding is chunked.
    chunked: bool,
    te: bool,
    /// `chunked` codings among every `Transfer-Encoding` header's.
    chunked_count: u8,
    /// Codings other than `chunked`.
    other_codings: bool,
    length: Option<u64>,
    upgrade_header: bool,
    /// `Host` headers seen.
    hosts: u8,
}

fn scan<'h, 'b>(headers: &'h [httparse::Header<'b>]) -> Result<Scan<'h, 'b>, &'static str> {
    let mut s = Scan {
        headers,
        tokens: ConnTokens::default(),
        chunked: false,
        te: false,
        chunked_count: 0,
        other_codings: false,
        length: None,
        upgrade_header: false,
        hosts: 0,
    };
    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("connection") {
            // A value with bytes past ASCII (obs-text) is no list hyper or
            // most servers read: its `keep-alive` keeps nothing open (its
            // `close` still closes: closing is always safe).
            let ascii = h.value.is_ascii();
            for t in tokens(h.value) {
                if t.eq_ignore_ascii_case(b"close") {
                    s.tokens.close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && ascii {
                    s.tokens.keep_alive = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    s.tokens.upgrade = true;
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            s.te = true;
            for t in tokens(h.value) {
                if t.eq_ignore_ascii_case(b"chunked") {
                    s.chunked_count = s.chunked_count.saturating_add(1);
                } else {
                    s.other_codings = true;
                }
            }
            // The last coding of the last header is what delimits the body.
            if let Some(last) = tokens(h.value).last() {
                s.chunked = last.eq_ignore_ascii_case(b"chunked");
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            for t in tokens(h.value) {
                let n = parse_length(t).ok_or("bad Content-Length")?;
                if s.length.is_some_and(|m| m != n) {
                    return Err("conflicting Content-Length values");
                }
                s.length = Some(n);
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            s.upgrade_header = true;
        } else if name.eq_ignore_ascii_case("host") {
            s.hosts = s.hosts.saturating_add(1);
        }
    }
    Ok(s)
}

/// The comma-separated elements of a header value, trimmed, empty ones left out.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

fn parse_length(t: &[u8]) -> Option<u64> {
    if t.is_empty() || t.len() > 19 || !t.iter().all(u8::is_ascii_digit) {
        return None;
    }
    t.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Headers that concern one hop only, never forwarded as they are.
fn hop_by_hop(name: &str) -> bool {
    const HOP: [&str; 7] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

impl Scan<'_, '_> {
    /// Whether `name` is listed in a `Connection` header (and so hop-by-hop).
    fn named_in_connection(&self, name: &str) -> bool {
        self.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| tokens(h.value))
            .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
    }

    /// Writes the end-to-end headers, leaving out `skip` too.
    ///
    /// A header named in `Connection` is the hop's and left out, except
    /// the two that delimit the body (RFC 9110 forbids naming them there;
    /// a sender that does is kept to its word): deployd delimits the body
    /// by them, so the next hop must too. Without them an instance would
    /// read a request's body as the next request on a connection other
    /// clients' requests share (smuggling), and a client a response's.
    /// `Host` stays too: deployd took the request for the site it names,
    /// and an HTTP/1.1 request without one is refused.
    fn write_end_to_end(&self, out: &mut Vec<u8>, skip: impl Fn(&str) -> bool) {
        let any_named = self
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("connection"));
        let end_to_end = |n: &str| {
            n.eq_ignore_ascii_case("content-length")
                || n.eq_ignore_ascii_case("transfer-encoding")
                || n.eq_ignore_ascii_case("host")
        };
        for h in self.headers {
            if hop_by_hop(h.name)
                || skip(h.name)
                || (any_named && !end_to_end(h.name) && self.named_in_connection(h.name))
            {
                continue;
            }
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
    }

    fn upgrade_value(&self) -> &[u8] {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("upgrade"))
            .map_or(&b""[..], |h| h.value)
    }
}

/// The length of a head from httparse's verdict on `buffered` bytes.
fn head_len(
    parsed: httparse::Result<usize>,
    buffered: usize,
    max: usize,
) -> Result<usize, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(n)) if n <= max => Ok(n),
        Ok(httparse::Status::Complete(_)) => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) if buffered >= max => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Err(HeadError::Partial),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(_) => Err(HeadError::Bad("malformed head")),
    }
}

/// The host and the rest of a request target in absolute form
/// (`http://host:port/path?query`), which a client may send to any server
/// (RFC 9112 §3.2.2); `None` for the origin form (`/path?query`) and `*`.
///
/// The request goes on in origin form, with the target's host as its
/// `Host` (the received one is ignored, as the RFC says a server must), so
/// an instance never sees a target and a `Host` that disagree.
fn absolute_form(target: &str) -> Result<Option<(&str, &str)>, HeadError> {
    if target.starts_with('/') || target == "*" {
        return Ok(None);
    }
    let Some((scheme, rest)) = target.split_once("://") else {
        return Err(HeadError::Bad("malformed request target"));
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(HeadError::Bad("request target is not an http URI"));
    }
    let (authority, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    // User information is never part of a host (RFC 9110 §4.2.4).
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() {
        return Err(HeadError::Bad("request target without a host"));
    }
    // A fragment is the client's own business (RFC 9110 §4.2.5).
    let path = path.split_once('#').map_or(path, |(p, _)| p);
    Ok(Some((host, path)))
}

/// Parses a request head at the start of `buf` and writes the head to send
/// to an instance into `out` (replacing what was there). `client_ip` is
/// the `X-Forwarded-For` the instance gets, after the client's own if
/// `xff` says to keep it.
pub fn request(
    buf: &[u8],
    client_ip: &[u8],
    xff: Xff,
    out: &mut Vec<u8>,
) -> Result<RequestHead, HeadError> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
    let mut r = httparse::Request::new(&mut hs);
    let len = head_len(r.parse(buf), buf.len(), MAX_HEAD - HEAD_SLACK)?;
    let (Some(method), Some(target), Some(version)) = (r.method, r.path, r.version) else {
        return Err(HeadError::Bad("malformed request line"));
    };
    let s = scan(r.headers).map_err(HeadError::Bad)?;
    if s.hosts > 1 {
        // Which one names the site is for each server to guess, and a
        // cache or an instance that guesses otherwise than another can be
        // fooled: RFC 9112 §3.2 says 400, as nginx does.
        return Err(HeadError::Bad("more than one Host header"));
    }
    let http10 = version == 0;
    if !http10 && s.hosts == 0 {
        // RFC 9112 §3.2 again: an HTTP/1.1 request names its site.
        return Err(HeadError::Bad("missing Host header"));
    }
    if method == "CONNECT" {
        // A tunnel to wherever the client names is a forward proxy's
        // job; passed on, an instance's 2xx would turn the connection
        // into bytes deployd could no longer frame.
        return Err(HeadError::Unsupported(
            "CONNECT is not supported: deployd is a reverse proxy",
        ));
    }
    let absolute = absolute_form(target)?;
    let body = if s.te {
        // A body both counted and chunked is how requests are smuggled past
        // proxies: refuse it, as RFC 9112 §6.1 allows.
        if http10 || s.length.is_some() {
            return Err(HeadError::Bad("unusable Transfer-Encoding"));
        }
        if s.chunked_count > 1 {
            // Chunked twice is not a framing any server agrees on.
            return Err(HeadError::Bad("Transfer-Encoding chunked more than once"));
        }
        if !s.chunked {
            // Not chunked last: where the body ends cannot be known
            // (RFC 9112 §6.3).
            return Err(HeadError::Bad("unusable Transfer-Encoding"));
        }
        if s.other_codings {
            // Chunked over a coding deployd does not know (RFC 9112 §6.1
            // says 501, as nginx answers): an instance that frames it
            // otherwise would see another message than deployd.
            return Err(HeadError::Unsupported(
                "Transfer-Encoding other than chunked is not supported",
            ));
        }
        Framing::Chunked
    } else {
        match s.length {
            Some(0) | None => Framing::None,
            Some(n) => Framing::Length(n),
        }
    };
    let upgrade = s.tokens.upgrade && s.upgrade_header;
    let keep_alive = if http10 {
        s.tokens.keep_alive && !s.tokens.close
    } else {
        !s.tokens.close
    };
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    match absolute {
        Some((_, path)) => {
            if !path.starts_with('/') {
                out.push(b'/');
            }
            out.extend_from_slice(path.as_bytes());
        }
        None => out.extend_from_slice(target.as_bytes()),
    }
    out.extend_from_slice(if http10 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    // The framing goes on as deployd read it, in one header: two equal
    // lengths, or a `Content-Length: 5, 5`, become one, so that no hop
    // after deployd can take them otherwise.
    s.write_end_to_end(out, |n| {
        n.eq_ignore_ascii_case("x-forwarded-for")
            || n.eq_ignore_ascii_case("content-length")
            || n.eq_ignore_ascii_case("transfer-encoding")
            || (absolute.is_some() && n.eq_ignore_ascii_case("host"))
    });
    match (body, s.length) {
        (Framing::Chunked, _) => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        (_, Some(n)) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
        }
        (_, None) => {}
    }
    if let Some((host, _)) = absolute {
        out.extend_from_slice(b"Host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if upgrade {
        out.extend_from_slice(b"Connection: Upgrade\r\nUpgrade: ");
        out.extend_from_slice(s.upgrade_value());
        out.extend_from_slice(b"\r\n");
    } else if http10 {
        // Lets the instance keep this connection for later requests.
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"X-Forwarded-For: ");
    for h in s.headers.iter().filter(|_| xff == Xff::Append) {
        if h.name.eq_ignore_ascii_case("x-forwarded-for") && !h.value.trim_ascii().is_empty() {
            out.extend_from_slice(h.value.trim_ascii());
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(client_ip);
    out.extend_from_slice(b"\r\n\r\n");
    Ok(RequestHead {
        len,
        body,
        is_head: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        http10,
        keep_alive,
        upgrade,
    })
}

/// Parses a response head at the start of `buf` (the answer to `req`) and
/// writes the head to send to the client into `out`. `keep` says whether
/// the client's connection may stay open as far as the request goes (its
/// body was read whole); the response can still close it.
pub fn response(
    buf: &[u8],
    req: &RequestHead,
    keep: bool,
    out: &mut Vec<u8>,
) -> Result<ResponseHead, HeadError> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut hs);
    let len = head_len(r.parse(buf), buf.len(), MAX_HEAD)?;
    let (Some(version), Some(status)) = (r.version, r.code) else {
        return Err(HeadError::Bad("malformed status line"));
    };
    let reason = r.reason.unwrap_or("");
    let s = scan(r.headers).map_err(HeadError::Bad)?;
    let body = if (100..200).contains(&status) || status == 204 || status == 304 || req.is_head {
        Framing::None
    } else if s.te {
        if s.chunked {
            Framing::Chunked
        } else {
            Framing::Eof
        }
    } else {
        match s.length {
            Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
            None => Framing::Eof,
        }
    };
    let persistent = if version == 0 {
        s.tokens.keep_alive && !s.tokens.close
    } else {
        !s.tokens.close
    };
    let interim = (100..200).contains(&status);
    let reusable = interim || (persistent && body != Framing::Eof);
    let keep_client = interim || (keep && req.keep_alive && body != Framing::Eof);
    out.clear();
    let _ = write!(out, "HTTP/1.1 {status} {reason}\r\n");
    // With Transfer-Encoding, Content-Length means nothing and must not be
    // sent; without, equal lengths go on as one.
    s.write_end_to_end(out, |n| n.eq_ignore_ascii_case("content-length"));
    if let (false, Some(n)) = (s.te, s.length) {
        let _ = write!(out, "Content-Length: {n}\r\n");
    }
    if status == 101 {
        out.extend_from_slice(b"Connection: Upgrade\r\nUpgrade: ");
        out.extend_from_slice(s.upgrade_value());
        out.extend_from_slice(b"\r\n");
    } else if !interim {
        if !keep_client {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if req.http10 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(ResponseHead {
        len,
        status,
        body,
        reusable,
        keep_client,
    })
}

/// The reason phrase of a status deployd answers with itself.
fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// A response deployd makes itself (502, 503, 400, …), into `out`: `msg`
/// as its text body (left out for a HEAD request); `keep` says whether the
/// client's connection goes on, `http10` whether the client speaks 1.0.
pub fn own_response(
    status: u16,
    msg: &str,
    keep: bool,
    http10: bool,
    head_only: bool,
    out: &mut Vec<u8>,
) {
    out.clear();
    let connection = match (keep, http10) {
        (false, _) => "Connection: close\r\n",
        (true, true) => "Connection: keep-alive\r\n",
        (true, false) => "",
    };
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n",
        reason(status),
        msg.len(),
    );
    if !head_only {
        out.extend_from_slice(msg.as_bytes());
    }
}
