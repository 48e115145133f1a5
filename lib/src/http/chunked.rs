//! Where a chunked body ends (RFC 9112 §7.1), found without copying or
//! decoding it: the proxy passes the bytes on as they came, so this only
//! follows sizes, extensions, data and trailers, and is strict wherever
//! the grammar is. A proxy that is lenient where the next hop is strict,
//! or the other way round, lets a client hide a request inside a body
//! (smuggling): a trailer line `GET /smug HTTP/1.1` taken as a trailer
//! here would be a request to an instance that ends the body at `0\r\n`.
//!
//! ```text
//! chunked-body   = *chunk last-chunk trailer-section CRLF
//! chunk          = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
//! chunk-size     = 1*HEXDIG
//! last-chunk     = 1*("0") [ chunk-ext ] CRLF
//! chunk-ext      = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
//! chunk-ext-val  = token / quoted-string
//! trailer-section = *( field-line CRLF )
//! field-line     = field-name ":" OWS field-value OWS
//! ```
//!
//! Lines end in CRLF, never a bare LF; a size has at most 15 hex digits;
//! a size line (with its extensions) at most [`MAX_SIZE_LINE`] bytes, and
//! a body's extensions together at most [`MAX_EXTENSIONS`]; the trailers
//! at most [`MAX_TRAILER_FIELDS`] fields and [`MAX_TRAILERS`] bytes. Each
//! limit is below hyper's (16 KiB of extensions a body, 16 KiB and its
//! `max_headers` fields of trailers), which the fuzz targets hold the
//! decoder to: a body deployd passes on, a hyper server behind it reads.

/// The longest chunk-size line accepted, extensions included.
pub const MAX_SIZE_LINE: usize = 4096;
/// The most bytes of extensions (after the sizes) a whole body may carry.
pub const MAX_EXTENSIONS: usize = 8 * 1024;
/// The most bytes of trailer fields accepted after the last chunk.
pub const MAX_TRAILERS: usize = 8 * 1024;
/// The most trailer fields accepted after the last chunk.
pub const MAX_TRAILER_FIELDS: usize = 64;

/// Follows a chunked body to its end.
#[derive(Debug, Clone, Default)]
pub struct Chunked {
    state: State,
    /// Of the chunk being read: its size as read so far, then what is left.
    size: u64,
    digits: u8,
    /// Bytes of the size line, or of the trailers, so far.
    line: usize,
    /// Bytes of extensions in the body so far.
    extensions: usize,
    /// Trailer fields so far.
    fields: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum State {
    #[default]
    Size,
    /// Blanks after the size, before a `;`.
    SizeBlank,
    /// After a `;` (and blanks): an extension's name must come.
    ExtNameStart,
    ExtName,
    /// Blanks after a name: `=`, `;` or the end of the line.
    ExtAfterName,
    /// After `=` (and blanks): a token or a quoted string.
    ExtValueStart,
    ExtToken,
    ExtQuoted,
    ExtQuotedEscape,
    /// After a value: blanks, then `;` or the end of the line.
    ExtAfterValue,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// The start of a trailer line, or of the blank line that ends it all.
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// A chunked body that is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("malformed chunked body")
    }
}

impl std::error::Error for Malformed {}

/// RFC 9110's `tchar`: what a token (a field or extension name) is made of.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// `qdtext` of a quoted string: anything visible but `"` and `\`, blanks,
/// and obs-text.
fn is_qdtext(b: u8) -> bool {
    is_blank(b)
        || b == 0x21
        || (0x23..=0x5b).contains(&b)
        || (0x5d..=0x7e).contains(&b)
        || b >= 0x80
}

/// What a field value may hold: visible characters, blanks, obs-text.
fn is_field_byte(b: u8) -> bool {
    is_blank(b) || (0x21..=0x7e).contains(&b) || b >= 0x80
}

impl Chunked {
    /// Looks at the body's next bytes: `Some(n)` if it ends after `n` of
    /// them, `None` if all of them belong to it.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, Malformed> {
        use State::*;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if self.state == Data {
                let take = (bytes.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                self.size -= take as u64;
                i += take;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            if self.state == Done {
                return Ok(Some(i));
            }
            if matches!(
                self.state,
                TrailerStart | TrailerName | TrailerValue | TrailerLf
            ) {
                self.line += 1;
                if self.line > MAX_TRAILERS {
                    return Err(Malformed);
                }
            } else if self.state != DataCr && self.state != DataLf && self.state != EndLf {
                self.line += 1;
                if self.line > MAX_SIZE_LINE {
                    return Err(Malformed);
                }
                if !matches!(self.state, Size | SizeLf) {
                    self.extensions += 1;
                    if self.extensions > MAX_EXTENSIONS {
                        return Err(Malformed);
                    }
                }
            }
            self.state = match (self.state, b) {
                (Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                    // 16 hex digits already exceed any real body.
                    if self.digits == 15 {
                        return Err(Malformed);
                    }
                    let d = (b as char).to_digit(16).ok_or(Malformed)?;
                    self.size = self.size * 16 + u64::from(d);
                    self.digits += 1;
                    Size
                }
                (Size, b';') if self.digits > 0 => ExtNameStart,
                (Size, b'\r') if self.digits > 0 => SizeLf,
                (Size, b) if is_blank(b) && self.digits > 0 => SizeBlank,
                (SizeBlank, b) if is_blank(b) => SizeBlank,
                (SizeBlank, b';') => ExtNameStart,
                (ExtNameStart, b) if is_blank(b) => ExtNameStart,
                (ExtNameStart | ExtName, b) if is_tchar(b) => ExtName,
                (ExtName | ExtAfterName, b) if is_blank(b) => ExtAfterName,
                (ExtName | ExtAfterName, b'=') => ExtValueStart,
                (ExtName | ExtAfterName | ExtToken | ExtAfterValue, b';') => ExtNameStart,
                (ExtName | ExtAfterName | ExtToken | ExtAfterValue, b'\r') => SizeLf,
                (ExtValueStart, b) if is_blank(b) => ExtValueStart,
                (ExtValueStart, b'"') => ExtQuoted,
                (ExtValueStart | ExtToken, b) if is_tchar(b) => ExtToken,
                (ExtToken | ExtAfterValue, b) if is_blank(b) => ExtAfterValue,
                (ExtQuoted, b'"') => ExtAfterValue,
                (ExtQuoted, b'\\') => ExtQuotedEscape,
                (ExtQuoted, b) if is_qdtext(b) => ExtQuoted,
                (ExtQuotedEscape, b) if is_field_byte(b) => ExtQuoted,
                (SizeLf, b'\n') => {
                    self.digits = 0;
                    self.line = 0;
                    if self.size == 0 { TrailerStart } else { Data }
                }
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Size,
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart | TrailerName, b) if is_tchar(b) => TrailerName,
                (TrailerName, b':') => {
                    self.fields += 1;
                    if self.fields > MAX_TRAILER_FIELDS {
                        return Err(Malformed);
                    }
                    TrailerValue
                }
                (TrailerValue, b'\r') => TrailerLf,
                (TrailerValue, b) if is_field_byte(b) => TrailerValue,
                (TrailerLf, b'\n') => TrailerStart,
                (EndLf, b'\n') => {
                    self.state = Done;
                    return Ok(Some(i + 1));
                }
                _ => return Err(Malformed),
            };
            i += 1;
        }
        Ok(None)
    }

    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }
}

/// The data of a whole chunked body (`body` from its first byte), and the
/// bytes it took; `None` if it is malformed or not whole. For tests and
/// fuzzing: the proxy itself never decodes a body.
pub fn decode(body: &[u8]) -> Option<(Vec<u8>, usize)> {
    let end = Chunked::default().feed(body).ok()??;
    let mut data = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + body[at..].windows(2).position(|w| w == b"\r\n")?;
        let size_text = &body[at..line_end];
        let digits = size_text
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        let size =
            usize::from_str_radix(std::str::from_utf8(&size_text[..digits]).ok()?, 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            return Some((data, end));
        }
        data.extend_from_slice(&body[at..at + size]);
        at += size + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(body: &[u8]) -> Result<Option<usize>, Malformed> {
        Chunked::default().feed(body)
    }

    #[test]
    fn extensions_follow_the_grammar() {
        for ok in [
            &b"5;a\r\nhello\r\n0\r\n\r\n"[..],
            b"5 ;a=b\r\nhello\r\n0\r\n\r\n",
            b"5\t; a = \"q\\\"x\" ;b\r\nhello\r\n0\r\n\r\n",
            b"5;a=tok;b=\"\"\r\nhello\r\n0;last\r\n\r\n",
            b"000\r\n\r\n",
        ] {
            assert!(
                matches!(ends(ok), Ok(Some(n)) if n == ok.len()),
                "{}",
                String::from_utf8_lossy(ok)
            );
        }
    }

    #[test]
    fn what_the_grammar_does_not_allow_is_malformed() {
        for bad in [
            &b"5 junk\r\n"[..], // an extension without ';'
            b"5 \r\n",          // blanks and no extension
            b"5\t\r\n",
            b"5;\r\n",      // an empty extension name
            b"5;a=\r\n",    // an empty value
            b"5;a b\r\n",   // two names
            b"5;a=\"x\r\n", // an unclosed quote
            b"-5\r\n",      // a sign
            b"0x5\r\n",     // a prefix
            b"+5\r\n",
            b"5\nhello\n0\n\n",                            // LF-only lines
            b"5\r\nhelloworld\r\n",                        // more data than said
            b"0\r\nGET /smug HTTP/1.1\r\nHost: x\r\n\r\n", // a request as a trailer
            b"0\r\n X: 1\r\n\r\n",                         // an obsolete fold
            b"0\r\nX : 1\r\n\r\n",                         // a blank before the colon
            b"0\r\nX: a\0b\r\n\r\n",                       // a NUL in a value
            b"0\r\n: 1\r\n\r\n",                           // no name
        ] {
            assert_eq!(
                ends(bad),
                Err(Malformed),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_size_line_or_trailers_past_their_limit_are_malformed() {
        let mut long = b"5;".to_vec();
        long.extend(vec![b'a'; MAX_SIZE_LINE]);
        assert_eq!(ends(&long), Err(Malformed));
        let mut trailers = b"0\r\n".to_vec();
        trailers.extend_from_slice(format!("X: {}\r\n", "y".repeat(MAX_TRAILERS)).as_bytes());
        assert_eq!(ends(&trailers), Err(Malformed));
        let fields = |n: usize| {
            let mut t = b"0\r\n".to_vec();
            for i in 0..n {
                t.extend_from_slice(format!("X{i}: 1\r\n").as_bytes());
            }
            t.extend_from_slice(b"\r\n");
            ends(&t)
        };
        assert!(matches!(fields(MAX_TRAILER_FIELDS), Ok(Some(_))));
        assert_eq!(fields(MAX_TRAILER_FIELDS + 1), Err(Malformed));
        // Extensions add up over the body's chunks.
        let chunk = format!("1;{}\r\nx\r\n", "e".repeat(1000));
        let mut body = chunk.repeat(MAX_EXTENSIONS / 1000).into_bytes();
        assert_eq!(ends(&body), Ok(None));
        body.extend_from_slice(chunk.as_bytes());
        assert_eq!(ends(&body), Err(Malformed));
    }

    #[test]
    fn decode_gives_the_data() {
        let body = b"5;a=b\r\nhello\r\n1\r\n!\r\n0\r\nT: 1\r\n\r\nrest";
        assert_eq!(decode(body), Some((b"hello!".to_vec(), body.len() - 4)));
        assert_eq!(decode(b"5\r\nhel"), None);
    }
}
