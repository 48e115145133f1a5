//! The proxy's chunked framing against hyper's: wherever deployd takes a
//! chunked body to end, hyper must take it to end at the same byte, with
//! the same data, and read the next request right after it. deployd may
//! refuse what hyper takes (it is stricter); never the other way round.
//! Split anywhere, the body frames the same.
#![no_main]

use deployd_fuzz::{SENTINEL, serve};
use deployd_lib::http::chunked::{self, Chunked};
use libfuzzer_sys::fuzz_target;

const HEAD: &[u8] = b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let whole = Chunked::default().feed(data);
    // The same verdict however the bytes arrive.
    for cut in [1, data.len() / 2, data.len().saturating_sub(1)] {
        if cut == 0 || cut >= data.len() {
            continue;
        }
        let mut c = Chunked::default();
        let split = match c.feed(&data[..cut]) {
            Ok(None) => c.feed(&data[cut..]).map(|r| r.map(|n| n + cut)),
            other => other,
        };
        assert_eq!(split, whole, "split at {cut}");
    }
    let Ok(Some(end)) = whole else {
        return;
    };
    let (data_bytes, decoded_end) = chunked::decode(data).expect("a body that ends decodes");
    assert_eq!(decoded_end, end);
    let stream = [HEAD, &data[..end], SENTINEL].concat();
    let served = serve(&stream);
    assert!(
        !served.head_error && served.body_error.is_none(),
        "deployd framed a body hyper refuses: {served:?}\n{:?}",
        String::from_utf8_lossy(&data[..end])
    );
    assert_eq!(served.requests.len(), 2, "{served:?}");
    assert_eq!(served.requests[0].body, data_bytes, "{served:?}");
    assert_eq!(served.requests[1].line, "GET /sentinel");
});
