//! HTTP/1 framing, sans I/O: what deployd's proxy decides about a message
//! before it passes it on. [`head`] parses and rewrites request and
//! response heads; [`chunked`] finds where a chunked body ends. Both are
//! strict where RFC 9112 is, so that deployd never frames a message
//! otherwise than a conforming server would (the fuzz targets in `fuzz/`
//! hold them to hyper's parser).

pub mod chunked;
pub mod head;
