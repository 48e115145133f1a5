//! The proxy's request heads against hyper's reading of them. For every
//! request deployd would forward (and whose body it has whole):
//!
//! - hyper, fed what the client sent, finds the same body and the next
//!   request right where deployd's framing ends (or refuses the head,
//!   being stricter about what it parses, never about where it ends);
//! - hyper, fed what deployd sends the instance (the head rewritten, the
//!   body passed through), reads exactly that request with that body,
//!   then the next: an instance can never see a request deployd did not.
#![no_main]

use deployd_fuzz::{SENTINEL, Served, serve};
use deployd_lib::http::chunked;
use deployd_lib::http::head::{self, Framing, Xff};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let Ok(req) = head::request(data, b"10.0.0.1", Xff::Append, &mut out) else {
        return;
    };
    // What deployd sends stays within any head's limits: 128 lines and
    // MAX_HEAD bytes, and is whole.
    assert!(out.len() <= head::MAX_HEAD, "{} bytes", out.len());
    let mut lines = [httparse::EMPTY_HEADER; 128];
    let parsed = httparse::Request::new(&mut lines).parse(&out);
    assert!(
        matches!(parsed, Ok(httparse::Status::Complete(n)) if n == out.len()),
        "{parsed:?}"
    );
    let rest = &data[req.len..];
    let (raw, decoded) = match req.body {
        Framing::None => (&rest[..0], Vec::new()),
        Framing::Length(n) => {
            let Ok(n) = usize::try_from(n) else { return };
            if rest.len() < n {
                return;
            }
            (&rest[..n], rest[..n].to_vec())
        }
        Framing::Chunked => match chunked::decode(rest) {
            Some((d, end)) => (&rest[..end], d),
            // Malformed (deployd answers 400) or not all here yet.
            None => return,
        },
        Framing::Eof => unreachable!("a request's body is never framed by its end"),
    };
    // A tunnel: nothing after it is framed.
    if req.upgrade {
        return;
    }
    let client = serve(
        &[
            &data[..req.len + raw.len()],
            if req.keep_alive { SENTINEL } else { b"" },
        ]
        .concat(),
    );
    let forwarded = serve(&[&out[..], raw, SENTINEL].concat());
    check(
        "what the client sent",
        &client,
        &decoded,
        req.keep_alive,
        data,
    );
    if !client.head_error {
        assert!(
            !forwarded.head_error,
            "hyper refuses the head deployd sends: {:?}",
            String::from_utf8_lossy(&out)
        );
    }
    check("what deployd sends", &forwarded, &decoded, true, data);
});

fn check(what: &str, s: &Served, body: &[u8], next: bool, data: &[u8]) {
    if s.head_error {
        // hyper parses less than httparse lets through (a target the
        // http crate refuses): no framing to compare.
        return;
    }
    let shown = String::from_utf8_lossy(data);
    assert!(
        s.body_error.is_none(),
        "{what}: hyper reads no body where deployd does: {s:?}\n{shown:?}"
    );
    assert!(!s.requests.is_empty(), "{what}: {s:?}\n{shown:?}");
    assert_eq!(s.requests[0].body, body, "{what}: {s:?}\n{shown:?}");
    if next {
        assert_eq!(s.requests.len(), 2, "{what}: {s:?}\n{shown:?}");
        assert_eq!(
            s.requests[1].line, "GET /sentinel",
            "{what}: {s:?}\n{shown:?}"
        );
    } else {
        assert_eq!(s.requests.len(), 1, "{what}: {s:?}\n{shown:?}");
    }
}
