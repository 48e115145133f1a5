//! Bodies, passed through in their own framing: the proxy only finds where
//! each one ends (a length to count down, or chunks to follow), so it never
//! copies more than a read buffer's worth and never re-encodes.

use std::io::{self, IoSlice};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use deployd_lib::http::chunked::{Chunked, Malformed};
use deployd_lib::http::head::{Framing, MAX_HEAD};

/// A read buffer: bytes read and not yet consumed are `data[start..end]`.
pub struct Buf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

/// What a buffer starts with; heads make it grow up to [`MAX_HEAD`].
const BUF: usize = 8 * 1024;

impl Buf {
    pub fn new() -> Buf {
        Buf {
            data: vec![0; BUF],
            start: 0,
            end: 0,
        }
    }

    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Whether it is full at its present size: [`Buf::read_from`] would
    /// have to grow it (or fail).
    pub fn is_full(&self) -> bool {
        self.start == 0 && self.end == self.data.len()
    }

    /// Forgets what is buffered.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads once more from `io`, making room first; `Ok(0)` at end of
    /// stream. Fails when a head would outgrow [`MAX_HEAD`].
    pub async fn read_from(&mut self, io: &mut (impl AsyncRead + Unpin)) -> io::Result<usize> {
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.data.len() < MAX_HEAD {
                self.data.resize((self.data.len() * 2).min(MAX_HEAD), 0);
            } else {
                return Err(io::Error::other("head too large"));
            }
        }
        let n = io.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

/// Where a body stands: how much is left, or how its end will show.
#[derive(Debug, Clone)]
pub enum Remaining {
    Nothing,
    Bytes(u64),
    Chunks(Chunked),
    UntilEof,
}

impl From<Framing> for Remaining {
    fn from(f: Framing) -> Remaining {
        match f {
            Framing::None => Remaining::Nothing,
            Framing::Length(n) => Remaining::Bytes(n),
            Framing::Chunked => Remaining::Chunks(Chunked::default()),
            Framing::Eof => Remaining::UntilEof,
        }
    }
}

impl Remaining {
    /// Takes what of `avail` belongs to the body: (bytes, whether it ended).
    fn take(&mut self, avail: &[u8]) -> Result<(usize, bool), Malformed> {
        Ok(match self {
            Remaining::Nothing => (0, true),
            Remaining::Bytes(left) => {
                let n = avail
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                if *left == 0 {
                    *self = Remaining::Nothing;
                    (n, true)
                } else {
                    (n, false)
                }
            }
            Remaining::Chunks(c) => match c.feed(avail)? {
                Some(n) => {
                    *self = Remaining::Nothing;
                    (n, true)
                }
                None => (avail.len(), false),
            },
            Remaining::UntilEof => (avail.len(), false),
        })
    }
}

/// Why passing a body on stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// The side it came from closed early or failed.
    Source,
    /// The side it came from sent nothing for the time allowed.
    Stalled,
    /// The side it went to failed.
    Sink,
    /// It was not the framing it said.
    Malformed,
}

/// Sends `prefix` (a head, possibly empty) and then the body from `buf` and
/// `src` to `dst` until `body` ends, in as few writes as the bytes allow:
/// a head and the body bytes read with it go in one. Bytes after the body
/// stay in `buf`. With `idle`, `src` may not go longer than that without
/// sending a byte.
pub async fn pass(
    prefix: &[u8],
    src: &mut (impl AsyncRead + Unpin),
    buf: &mut Buf,
    dst: &mut (impl AsyncWrite + Unpin),
    body: &mut Remaining,
    idle: Option<Duration>,
) -> Result<(), BodyError> {
    let mut prefix = prefix;
    loop {
        let (n, done) = body.take(buf.filled()).map_err(|_| BodyError::Malformed)?;
        if !prefix.is_empty() || n > 0 {
            write_all(dst, prefix, &buf.filled()[..n])
                .await
                .map_err(|_| BodyError::Sink)?;
            prefix = &[];
            buf.consume(n);
        }
        if done {
            return Ok(());
        }
        let read = buf.read_from(src);
        let read = match idle {
            Some(limit) => match tokio::time::timeout(limit, read).await {
                Ok(r) => r,
                Err(_) => return Err(BodyError::Stalled),
            },
            None => read.await,
        };
        match read {
            Ok(0) if matches!(body, Remaining::UntilEof) => {
                *body = Remaining::Nothing;
                return Ok(());
            }
            Ok(0) | Err(_) => return Err(BodyError::Source),
            Ok(_) => {}
        }
    }
}

/// Writes `a` then `b`, both whole, with vectored writes (one system call
/// when the socket takes it all).
pub async fn write_all(dst: &mut (impl AsyncWrite + Unpin), a: &[u8], b: &[u8]) -> io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() {
        let n = dst
            .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n < a.len() {
            a = &a[n..];
        } else {
            b = &b[n - a.len()..];
            a = &[];
        }
    }
    if !b.is_empty() {
        dst.write_all(b).await?;
    }
    Ok(())
}
