//! Incremental chunked decoding (RFC 9112 section 7.1) and the two pieces needed to
//! re-chunk a body towards a client.
//!
//! The decoder is a byte-at-a-time state machine over the framing and a bulk copy-free
//! range over the data, so it keeps no buffer and never allocates. It accepts only the
//! grammar (CRLF everywhere, no whitespace except before `;`, bounded size lines and
//! trailers): a body whose end two decoders could place differently is an error.

use std::ops::Range;

/// Longest chunk-size line, extensions and CRLF included.
const MAX_SIZE_LINE: usize = 4096;
/// Largest trailer section, its final empty line included.
const MAX_TRAILERS: usize = 16 * 1024;
/// Most hex digits in a chunk size: 16 is every u64.
const MAX_SIZE_DIGITS: u8 = 16;

/// Where the decoder is in the chunked grammar.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a chunk-size line, or inside its hex digits.
    #[default]
    Size,
    /// After whitespace that followed the size: only more whitespace or `;` may come.
    SizeWs,
    /// Inside chunk extensions, up to CR.
    Ext,
    /// After the CR that ends the size line.
    SizeLf,
    /// Inside chunk data: `remaining` bytes are left.
    Data,
    /// After chunk data: CR, then LF.
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Inside a trailer field name, up to `:`.
    TrailerName,
    /// Inside a trailer field value, up to CR.
    TrailerValue,
    /// After the CR of a trailer field line.
    TrailerLf,
    /// After the CR of the final empty line.
    EndLf,
    /// The body ended.
    Done,
    /// An error was found; it is returned again by every later call.
    Failed(ChunkedError),
}

/// Incremental decoder of a chunked body (RFC 9112 section 7.1): chunk extensions are skipped, trailers are read and dropped.
#[derive(Debug, Default, Clone)]
pub struct Decoder {
    state: State,
    /// The chunk size being read, then the data bytes left in the chunk.
    remaining: u64,
    /// Hex digits of the size read so far.
    digits: u8,
    /// Bytes of the current size line so far.
    line: usize,
    /// Bytes of the trailer section so far.
    trailers: usize,
}

/// One step of decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fed {
    /// Bytes of the input used by this step.
    pub consumed: usize,
    /// The body data found by this step, as a range of the input (within ..consumed; may be empty).
    pub data: Range<usize>,
}

/// Why a chunked body cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkedError {
    /// The bytes do not follow the chunked grammar (or a line is over its bound).
    #[error("malformed chunked body")]
    Malformed,
    /// A chunk size of more than 16 hex digits.
    #[error("chunk size too large")]
    TooLarge,
}

impl Decoder {
    /// A decoder at the start of a body.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Decodes from `input`; call again with the unconsumed rest (and more input) until `consumed` is 0 with an empty range, or `is_done()`.
    ///
    /// Every framing byte is consumed as soon as it is seen, so `consumed` is 0 only when
    /// `input` is empty or the body has ended; a step stops right after the data it returns.
    pub fn feed(&mut self, input: &[u8]) -> Result<Fed, ChunkedError> {
        let mut pos = 0;
        while pos < input.len() {
            if self.state == State::Data {
                let n = usize::try_from(self.remaining).map_or(input.len() - pos, |r| r.min(input.len() - pos));
                self.remaining -= n as u64;
                if self.remaining == 0 {
                    self.state = State::DataCr;
                }
                return Ok(Fed { consumed: pos + n, data: pos..pos + n });
            }
            if matches!(self.state, State::Done | State::Failed(_)) {
                break;
            }
            if let Err(e) = self.step(input[pos]) {
                self.state = State::Failed(e);
                return Err(e);
            }
            pos += 1;
        }
        match self.state {
            State::Failed(e) => Err(e),
            _ => Ok(Fed { consumed: pos, data: pos..pos }),
        }
    }

    /// The last chunk and the trailer section have been read: the body ended here.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Takes one framing byte.
    fn step(&mut self, b: u8) -> Result<(), ChunkedError> {
        use ChunkedError::{Malformed, TooLarge};
        match self.state {
            State::Size | State::SizeWs | State::Ext | State::SizeLf => {
                self.line += 1;
                if self.line > MAX_SIZE_LINE {
                    return Err(Malformed);
                }
            }
            State::TrailerStart | State::TrailerName | State::TrailerValue | State::TrailerLf | State::EndLf => {
                self.trailers += 1;
                if self.trailers > MAX_TRAILERS {
                    return Err(Malformed);
                }
            }
            _ => {}
        }
        self.state = match (self.state, b) {
            (State::Size, _) if b.is_ascii_hexdigit() => {
                if self.digits == MAX_SIZE_DIGITS {
                    return Err(TooLarge);
                }
                self.digits += 1;
                // Cannot overflow: at most 16 hex digits were shifted in.
                self.remaining = self.remaining << 4 | u64::from(hex(b));
                State::Size
            }
            // Everything below needs at least one digit first.
            (State::Size, _) if self.digits == 0 => return Err(Malformed),
            (State::Size | State::SizeWs, b' ' | b'\t') => State::SizeWs,
            (State::Size | State::SizeWs, b';') => State::Ext,
            (State::Size, b'\r') => State::SizeLf,
            // Extension bytes are skipped, but they may not hide a line end or a control byte.
            (State::Ext, b'\r') => State::SizeLf,
            (State::Ext, _) if is_field_byte(b) => State::Ext,
            (State::SizeLf, b'\n') => {
                self.digits = 0;
                self.line = 0;
                if self.remaining == 0 { State::TrailerStart } else { State::Data }
            }
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataLf, b'\n') => State::Size,
            (State::TrailerStart, b'\r') => State::EndLf,
            (State::TrailerStart | State::TrailerName, _) if super::is_tchar(b) => State::TrailerName,
            (State::TrailerName, b':') => State::TrailerValue,
            (State::TrailerValue, b'\r') => State::TrailerLf,
            (State::TrailerValue, _) if is_field_byte(b) => State::TrailerValue,
            (State::TrailerLf, b'\n') => State::TrailerStart,
            (State::EndLf, b'\n') => State::Done,
            _ => return Err(Malformed),
        };
        Ok(())
    }
}

/// HTAB, SP, visible ASCII and obs-text: what a field value or a chunk extension may hold.
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

/// The value of an ASCII hex digit (callers check `is_ascii_hexdigit` first).
fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0,
    }
}

/// Writes the size line of a chunk of `len` bytes (`{len:x}\r\n`) into `out`.
pub fn write_size_line(len: usize, out: &mut Vec<u8>) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 2 * size_of::<usize>()];
    let mut i = buf.len();
    let mut n = len;
    loop {
        i -= 1;
        buf[i] = DIGITS[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk and the empty trailer section.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes (the caller's loop), returning the data
    /// and whether the body ended, or the error.
    fn decode_in(input: &[u8], step: usize) -> Result<(Vec<u8>, bool, usize), ChunkedError> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        let mut pos = 0;
        let mut avail = 0;
        loop {
            avail = (avail + step).min(input.len());
            loop {
                let fed = d.feed(&input[pos..avail])?;
                assert!(fed.data.end <= fed.consumed && fed.data.start <= fed.data.end);
                out.extend_from_slice(&input[pos..avail][fed.data]);
                pos += fed.consumed;
                if fed.consumed == 0 {
                    break;
                }
            }
            if d.is_done() || avail == input.len() {
                return Ok((out, d.is_done(), pos));
            }
        }
    }

    fn decode(input: &[u8]) -> Result<(Vec<u8>, bool, usize), ChunkedError> {
        decode_in(input, input.len().max(1))
    }

    #[track_caller]
    fn ok(input: &[u8], want: &[u8]) {
        for step in 1..=input.len().max(1) {
            let (data, done, used) = decode_in(input, step).unwrap_or_else(|e| panic!("{e} at step {step}"));
            assert_eq!(data, want, "step {step}");
            assert!(done, "step {step}");
            assert_eq!(used, input.len(), "step {step}");
        }
    }

    #[track_caller]
    fn bad(input: &[u8], want: ChunkedError) {
        for step in 1..=input.len().max(1) {
            assert_eq!(decode_in(input, step).err(), Some(want), "{:?} step {step}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn simple_bodies_at_every_split() {
        ok(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world");
        ok(b"0\r\n\r\n", b"");
        ok(b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789");
        ok(b"a\r\n0123456789\r\n000\r\n\r\n", b"0123456789");
        ok(b"0000000000000001\r\nx\r\n0\r\n\r\n", b"x");
        // Data holding framing look-alikes is just data.
        ok(b"7\r\n0\r\n\r\nab\r\n0\r\n\r\n", b"0\r\n\r\nab");
    }

    #[test]
    fn extensions_are_skipped() {
        ok(b"5;a=b\r\nhello\r\n0;last\r\n\r\n", b"hello");
        ok(b"5 ;a=\"q;\\\"x\"\r\nhello\r\n0\t;x\r\n\r\n", b"hello");
        ok(b"5;\xff\r\nhello\r\n0\r\n\r\n", b"hello");
        bad(b"5;a\nhello\r\n0\r\n\r\n", ChunkedError::Malformed);
        bad(b"5;a\x00\r\nhello\r\n0\r\n\r\n", ChunkedError::Malformed);
        bad(b"5;a\rb\r\nhello\r\n0\r\n\r\n", ChunkedError::Malformed);
        let long = [&b"5;"[..], &vec![b'x'; MAX_SIZE_LINE - 4], b"\r\nhello\r\n0\r\n\r\n"].concat();
        ok(&long, b"hello");
        let too_long = [&b"5;"[..], &vec![b'x'; MAX_SIZE_LINE - 3], b"\r\nhello\r\n0\r\n\r\n"].concat();
        assert_eq!(decode(&too_long).err(), Some(ChunkedError::Malformed));
    }

    #[test]
    fn size_lines() {
        bad(b"\r\nhello\r\n0\r\n\r\n", ChunkedError::Malformed);
        bad(b";x\r\nhello\r\n0\r\n\r\n", ChunkedError::Malformed);
        bad(b" 5\r\nhello\r\n0\r\n\r\n", ChunkedError::Malformed);
        bad(b"5 \r\nhello\r\n0\r\n\r\n", ChunkedError::Malformed);
        bad(b"+5\r\nhello\r\n0\r\n\r\n", ChunkedError::Malformed);
        bad(b"0x5\r\nhello\r\n0\r\n\r\n", ChunkedError::Malformed);
        bad(b"5g\r\nhello\r\n0\r\n\r\n", ChunkedError::Malformed);
        bad(b"5\nhello\r\n0\r\n\r\n", ChunkedError::Malformed);
        bad(b"5\rhello\r\n0\r\n\r\n", ChunkedError::Malformed);
        bad(b"5 5\r\nhello\r\n0\r\n\r\n", ChunkedError::Malformed);
        bad(b"-1\r\n", ChunkedError::Malformed);
        // 16 digits fit a u64; the 17th is refused even when it is a leading zero.
        let (data, done, _) = decode(b"ffffffffffffffff\r\nabc").unwrap();
        assert_eq!((data.as_slice(), done), (&b"abc"[..], false));
        bad(b"10000000000000000\r\n", ChunkedError::TooLarge);
        bad(b"00000000000000000\r\n\r\n", ChunkedError::TooLarge);
    }

    #[test]
    fn data_must_end_with_crlf() {
        bad(b"5\r\nhelloX\r\n0\r\n\r\n", ChunkedError::Malformed);
        bad(b"5\r\nhello\n0\r\n\r\n", ChunkedError::Malformed);
        bad(b"5\r\nhello\r0\r\n\r\n", ChunkedError::Malformed);
        bad(b"5\r\nhello\r\r\n0\r\n\r\n", ChunkedError::Malformed);
        bad(b"5\r\nhell\r\n0\r\n\r\n", ChunkedError::Malformed);
    }

    #[test]
    fn trailers_are_read_and_dropped() {
        ok(b"5\r\nhello\r\n0\r\nX-Sum: abc\r\nY:\r\n\r\n", b"hello");
        ok(b"0\r\nx-amz-checksum-crc32: \xe9 a\tb \r\n\r\n", b"");
        bad(b"0\r\nX-Sum: abc\n\r\n", ChunkedError::Malformed);
        bad(b"0\r\nX-Sum: abc\r\n\n", ChunkedError::Malformed);
        bad(b"0\r\n\n", ChunkedError::Malformed);
        bad(b"0\r\n\rx", ChunkedError::Malformed);
        bad(b"0\r\nX-Sum: a\r\n b\r\n\r\n", ChunkedError::Malformed);
        bad(b"0\r\nX Sum: a\r\n\r\n", ChunkedError::Malformed);
        bad(b"0\r\n: a\r\n\r\n", ChunkedError::Malformed);
        bad(b"0\r\nX-Sum\r\n\r\n", ChunkedError::Malformed);
        bad(b"0\r\nX: a\x00\r\n\r\n", ChunkedError::Malformed);
        // Bounded: the final empty line counts.
        let line = |n: usize| [&b"X: "[..], &vec![b'v'; n], b"\r\n"].concat();
        let fits = [&b"0\r\n"[..], &line(MAX_TRAILERS - 7), b"\r\n"].concat();
        assert!(decode(&fits).unwrap().1);
        let over = [&b"0\r\n"[..], &line(MAX_TRAILERS - 6), b"\r\n"].concat();
        assert_eq!(decode(&over).err(), Some(ChunkedError::Malformed));
    }

    #[test]
    fn progress_and_done() {
        let mut d = Decoder::new();
        assert_eq!(d.feed(b""), Ok(Fed { consumed: 0, data: 0..0 }));
        // Framing and data in one go; stops at the end of the data.
        assert_eq!(d.feed(b"3\r\nabcXYZ"), Ok(Fed { consumed: 6, data: 3..6 }));
        assert_eq!(d.feed(b"\r\n0\r\n\r\nGET / HTTP/1.1"), Ok(Fed { consumed: 7, data: 7..7 }));
        assert!(d.is_done());
        assert_eq!(d.feed(b"GET / HTTP/1.1"), Ok(Fed { consumed: 0, data: 0..0 }));
        // Framing only, then the data that follows in a later call.
        let mut d = Decoder::new();
        assert_eq!(d.feed(b"4\r"), Ok(Fed { consumed: 2, data: 2..2 }));
        assert_eq!(d.feed(b"\n"), Ok(Fed { consumed: 1, data: 1..1 }));
        assert_eq!(d.feed(b"ab"), Ok(Fed { consumed: 2, data: 0..2 }));
        assert_eq!(d.feed(b"cd\r\n"), Ok(Fed { consumed: 2, data: 0..2 }));
        assert!(!d.is_done());
    }

    #[test]
    fn errors_stick() {
        let mut d = Decoder::new();
        assert_eq!(d.feed(b"zz"), Err(ChunkedError::Malformed));
        assert_eq!(d.feed(b"0\r\n\r\n"), Err(ChunkedError::Malformed));
        assert_eq!(d.feed(b""), Err(ChunkedError::Malformed));
        assert!(!d.is_done());
    }

    #[test]
    fn huge_chunk_sizes_stream() {
        let mut d = Decoder::new();
        assert_eq!(d.feed(b"FFFFFFFFFFFFFFFF\r\n"), Ok(Fed { consumed: 18, data: 18..18 }));
        let big = vec![0u8; 1 << 16];
        for _ in 0..4 {
            assert_eq!(d.feed(&big), Ok(Fed { consumed: big.len(), data: 0..big.len() }));
        }
    }

    #[test]
    fn size_lines_round_trip() {
        for len in [0usize, 1, 9, 10, 15, 16, 255, 4096, 16384, 1 << 20, usize::MAX] {
            let mut out = Vec::new();
            write_size_line(len, &mut out);
            assert_eq!(out, format!("{len:x}\r\n").as_bytes());
        }
        let mut body = Vec::new();
        write_size_line(5, &mut body);
        body.extend_from_slice(b"hello\r\n");
        body.extend_from_slice(LAST_CHUNK);
        ok(&body, b"hello");
    }

    #[test]
    fn hex_digits() {
        for b in 0u8..=255 {
            if b.is_ascii_hexdigit() {
                let s = [b];
                let want = u8::from_str_radix(std::str::from_utf8(&s).unwrap(), 16).unwrap();
                assert_eq!(hex(b), want);
            }
        }
    }
}
