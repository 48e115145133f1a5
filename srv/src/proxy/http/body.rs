//! Bodies, passed through in their own framing: the proxy only finds where
//! each one ends (a length to count down, or chunks to follow), so it never
//! copies more than a read buffer's worth and never re-encodes.

use std::io::{self, IoSlice};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::head::{Framing, MAX_HEAD};

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

/// Follows a chunked body (RFC 9112 §7.1) to its end: sizes, extensions,
/// data, trailers. It only looks; the bytes pass on unchanged.
#[derive(Debug, Clone, Default)]
pub struct Chunked {
    state: State,
    /// Of the chunk being read: its size as read so far, then what is left.
    size: u64,
    digits: u8,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum State {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// A chunked body that is not one.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

impl Chunked {
    /// Looks at the body's next bytes: `Some(n)` if it ends after `n` of
    /// them, `None` if all of them belong to it.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, Malformed> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.state {
                State::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        // 16 hex digits already exceed any real body.
                        if self.digits == 15 {
                            return Err(Malformed);
                        }
                        let d = (b as char).to_digit(16).ok_or(Malformed)?;
                        self.size = self.size * 16 + u64::from(d);
                        self.digits += 1;
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => self.state = State::Ext,
                    b'\r' if self.digits > 0 => self.state = State::SizeLf,
                    _ => return Err(Malformed),
                },
                State::Ext => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(Malformed),
                    _ => {}
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(Malformed);
                    }
                    self.digits = 0;
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let take =
                        (bytes.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr if b == b'\r' => self.state = State::DataLf,
                State::DataLf if b == b'\n' => self.state = State::Size,
                State::DataCr | State::DataLf => return Err(Malformed),
                State::TrailerStart => {
                    self.state = if b == b'\r' {
                        State::EndLf
                    } else {
                        State::Trailer
                    }
                }
                State::Trailer => match b {
                    b'\r' => self.state = State::TrailerLf,
                    b'\n' => return Err(Malformed),
                    _ => {}
                },
                State::TrailerLf if b == b'\n' => self.state = State::TrailerStart,
                State::EndLf if b == b'\n' => {
                    self.state = State::Done;
                    return Ok(Some(i + 1));
                }
                State::TrailerLf | State::EndLf => return Err(Malformed),
                State::Done => return Ok(Some(i)),
            }
            i += 1;
        }
        Ok(None)
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
