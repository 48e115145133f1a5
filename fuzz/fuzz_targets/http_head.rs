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
    // Rewritten, the head reads back the same.
    let mut again = Vec::new();
    let r2 = head::request(&out, b"10.0.0.1", Xff::Replace, &mut again)
        .expect("deployd's own head parses");
    assert_eq!(
        (r2.body, r2.is_head, r2.upgrade),
        (req.body, req.is_head, req.upgrade)
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
