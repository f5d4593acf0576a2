//! An upstream's response head and how its body is delimited.
//!
//! The lean path forwards a body by the framing found here, so a head two parsers could
//! read differently (conflicting lengths, unknown codings, bare LF, obs-fold) is an error:
//! forwarding it would let the upstream's bytes be read as a second response.

use std::mem::MaybeUninit;

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};

use super::{STACK_HEADERS, has_bare_lf, list_items};

/// How an upstream response's body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: answer to HEAD, 1xx, 204, 304.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// A parsed final response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status code (100..=999; the caller refuses what it does not serve).
    pub status: StatusCode,
    /// All header fields as received (HeaderMap::append, arrival order), framing headers included.
    pub headers: HeaderMap,
    /// How the body that follows the head is delimited.
    pub framing: Framing,
    /// Bytes the head took, CRLFCRLF included.
    pub head_len: usize,
    /// The connection may carry another request after this body (HTTP/1.1 without `Connection: close`, and framing not Close).
    pub reusable: bool,
}

/// What the start of an upstream's buffer is.
#[derive(Debug)]
pub enum ParsedResponse {
    /// Read more.
    Partial,
    /// A 1xx interim response (not 101) of this many bytes: skip it and parse again after it.
    Interim {
        /// Bytes the interim head took, CRLFCRLF included.
        head_len: usize,
    },
    /// The final head.
    Final(ResponseHead),
}

/// Why an upstream's response head cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not a well-formed HTTP/1.x response head (or one with more fields than allowed).
    #[error("the upstream's response head is malformed")]
    Malformed,
    /// No complete head within the limit.
    #[error("the upstream's response head is larger than {0} bytes")]
    TooLarge(usize),
    /// `Content-Length` values that disagree: the body's end is ambiguous.
    #[error("the upstream's response has conflicting Content-Length values")]
    ConflictingLength,
    /// A `Transfer-Encoding` we cannot decode, so the body's end is unknown.
    #[error("the upstream answered with a transfer coding other than chunked")]
    UnsupportedCoding,
    /// 101 Switching Protocols: the lean path never asks for an upgrade.
    #[error("the upstream answered 101 Switching Protocols to a request that asked for no upgrade")]
    Upgrade,
}

/// Parses the upstream response head at the start of `buf`; `head_request` is whether the request was HEAD (its answer has no body whatever the headers say).
pub fn parse(
    buf: &[u8],
    head_request: bool,
    max_headers: usize,
    max_head: usize,
) -> Result<ParsedResponse, ResponseError> {
    // A response has no business starting with empty lines (httparse would skip them): after
    // a previous response they mean that one's body was longer than its framing said.
    if matches!(buf.first(), Some(b'\r' | b'\n')) {
        return Err(ResponseError::Malformed);
    }
    // Nothing past `max_head` can belong to a head we accept, so httparse never scans it.
    let buf = &buf[..buf.len().min(max_head)];
    if max_headers <= STACK_HEADERS {
        let mut slots = [const { MaybeUninit::uninit() }; STACK_HEADERS];
        parse_into(buf, head_request, max_head, &mut slots[..max_headers])
    } else {
        let mut slots: Vec<MaybeUninit<httparse::Header<'_>>> =
            std::iter::repeat_with(MaybeUninit::uninit).take(max_headers).collect();
        parse_into(buf, head_request, max_head, &mut slots)
    }
}

/// [`parse`] with httparse's header slots provided; `buf` is already cut at `max_head`.
fn parse_into<'b>(
    buf: &'b [u8],
    head_request: bool,
    max_head: usize,
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<ParsedResponse, ResponseError> {
    let mut res = httparse::Response::new(&mut []);
    // The default config: obs-fold and spaces before the colon are errors.
    let head_len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut res, buf, slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => return Err(ResponseError::TooLarge(max_head)),
        Ok(httparse::Status::Partial) => return Ok(ParsedResponse::Partial),
        Err(_) => return Err(ResponseError::Malformed),
    };
    if has_bare_lf(&buf[..head_len]) {
        return Err(ResponseError::Malformed);
    }
    let code = res.code.ok_or(ResponseError::Malformed)?;
    let status = StatusCode::from_u16(code).map_err(|_| ResponseError::Malformed)?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(ResponseError::Upgrade);
    }
    if status.is_informational() {
        return Ok(ParsedResponse::Interim { head_len });
    }
    let http11 = match res.version {
        Some(1) => true,
        Some(0) => false,
        _ => return Err(ResponseError::Malformed),
    };

    let mut headers = HeaderMap::with_capacity(res.headers.len());
    let mut close = false;
    let mut chunked = 0usize;
    let mut other_coding = false;
    let mut has_te = false;
    let mut length: Option<u64> = None;
    let mut conflicting = false;
    for h in res.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| ResponseError::Malformed)?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| ResponseError::Malformed)?;
        if name == header::TRANSFER_ENCODING {
            has_te = true;
            for coding in list_items(h.value) {
                if coding.eq_ignore_ascii_case(b"chunked") {
                    chunked += 1;
                } else {
                    other_coding = true;
                }
            }
        } else if name == header::CONTENT_LENGTH {
            for item in list_items(h.value) {
                let n = content_length(item)?;
                conflicting |= length.is_some_and(|l| l != n);
                length = Some(n);
            }
        } else if name == header::CONNECTION {
            close |= list_items(h.value).any(|t| t.eq_ignore_ascii_case(b"close"));
        }
        headers.append(name, value);
    }

    let no_body = head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::Empty
    } else if has_te {
        // RFC 9112 section 6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing.
        if !http11 {
            return Err(ResponseError::Malformed);
        }
        // Exactly one `chunked`: `chunked, chunked` would be a body chunked twice, which a
        // single decoding pass reads wrongly.
        if other_coding || chunked != 1 {
            return Err(ResponseError::UnsupportedCoding);
        }
        Framing::Chunked
    } else if conflicting {
        return Err(ResponseError::ConflictingLength);
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    // RFC 9112 section 6.3: Transfer-Encoding beside Content-Length "ought to be handled as an
    // error"; we read the body by the coding but never trust that connection again.
    let smuggling_shape = has_te && length.is_some() && framing == Framing::Chunked;
    let reusable = http11 && !close && framing != Framing::Close && !smuggling_shape;
    Ok(ParsedResponse::Final(ResponseHead { status, headers, framing, head_len, reusable }))
}

/// One `Content-Length` list element: ASCII digits only (no sign, no inner space, not empty).
fn content_length(item: &[u8]) -> Result<u64, ResponseError> {
    if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
        return Err(ResponseError::Malformed);
    }
    item.iter()
        .try_fold(0u64, |n, &d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
        .ok_or(ResponseError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<ParsedResponse, ResponseError> {
        parse(s.as_bytes(), false, 32, 8192)
    }

    #[track_caller]
    fn head(s: &str) -> ResponseHead {
        match p(s) {
            Ok(ParsedResponse::Final(h)) => h,
            other => panic!("expected Final for {s:?}, got {other:?}"),
        }
    }

    #[track_caller]
    fn framing(s: &str) -> Framing {
        head(s).framing
    }

    #[track_caller]
    fn err(s: &str) -> ResponseError {
        match p(s) {
            Err(e) => e,
            other => panic!("expected an error for {s:?}, got {other:?}"),
        }
    }

    const OK: &str =
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: \"x\"\r\nx-amz-meta-a: 1\r\nX-Amz-Meta-A: 2\r\n\r\nhello";

    #[test]
    fn plain_200() {
        let h = head(OK);
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(h.framing, Framing::Length(5));
        assert_eq!(h.head_len, OK.len() - 5);
        assert!(h.reusable);
        assert_eq!(h.headers["etag"], "\"x\"");
        let metas: Vec<_> = h.headers.get_all("x-amz-meta-a").iter().collect();
        assert_eq!(metas, ["1", "2"]);
        let names: Vec<_> = h.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-length", "etag", "x-amz-meta-a"]);
    }

    #[test]
    fn every_split_is_partial_until_complete() {
        let head_len = OK.len() - 5;
        for i in 0..head_len {
            assert!(matches!(parse(&OK.as_bytes()[..i], false, 32, 8192), Ok(ParsedResponse::Partial)), "prefix {i}");
        }
        for i in head_len..=OK.len() {
            assert!(matches!(parse(&OK.as_bytes()[..i], false, 32, 8192), Ok(ParsedResponse::Final(_))), "prefix {i}");
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(err("HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n"), ResponseError::Upgrade);
        assert!(matches!(
            p("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"),
            Ok(ParsedResponse::Interim { head_len: 25 })
        ));
        assert!(matches!(
            p("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"),
            Ok(ParsedResponse::Interim { head_len: 40 })
        ));
        assert_eq!(head("HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n").status.as_u16(), 600);
        assert_eq!(head("HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n").status.as_u16(), 999);
        assert_eq!(err("HTTP/1.1 099 Odd\r\n\r\n"), ResponseError::Malformed);
        assert_eq!(err("HTTP/1.1 000 Odd\r\n\r\n"), ResponseError::Malformed);
        assert_eq!(err("HTTP/1.1 20 OK\r\n\r\n"), ResponseError::Malformed);
        assert_eq!(err("HTTP/1.1 2000 OK\r\n\r\n"), ResponseError::Malformed);
        assert_eq!(head("HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n").status, StatusCode::OK);
    }

    #[test]
    fn versions() {
        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(3));
        assert!(!h.reusable);
        assert_eq!(err("HTTP/2.0 200 OK\r\n\r\n"), ResponseError::Malformed);
        assert_eq!(err("http/1.1 200 OK\r\n\r\n"), ResponseError::Malformed);
        assert_eq!(err("HTTP/1.2 200 OK\r\n\r\n"), ResponseError::Malformed);
        assert_eq!(err("ICY 200 OK\r\n\r\n"), ResponseError::Malformed);
    }

    #[test]
    fn empty_framing() {
        assert_eq!(
            parse(OK.as_bytes(), true, 32, 8192)
                .map(|r| matches!(r, ParsedResponse::Final(h) if h.framing == Framing::Empty && h.reusable)),
            Ok(true)
        );
        let chunked_head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(
            matches!(parse(chunked_head.as_bytes(), true, 32, 8192), Ok(ParsedResponse::Final(h)) if h.framing == Framing::Empty)
        );
        assert_eq!(framing("HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n"), Framing::Empty);
        assert_eq!(framing("HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n"), Framing::Empty);
        assert!(head("HTTP/1.1 304 Not Modified\r\n\r\n").reusable);
    }

    #[test]
    fn content_length_rules() {
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n"), Framing::Length(5));
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n"), Framing::Length(5));
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), Framing::Length(0));
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 007\r\n\r\n"), Framing::Length(7));
        // httparse strips the whitespace around a field value: ` 5 ` is `5`.
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length:  5 \t\r\n\r\n"), Framing::Length(5));
        let max = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", u64::MAX);
        assert_eq!(framing(&max), Framing::Length(u64::MAX));
        assert_eq!(err("HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551616\r\n\r\n"), ResponseError::Malformed);
        assert_eq!(err("HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n"), ResponseError::ConflictingLength);
        assert_eq!(
            err("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            ResponseError::ConflictingLength
        );
        for bad in ["+5", "-5", "5 5", "5,", ",5", "", "0x5", "5;", "５", "5.0", " , "] {
            let s = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
            assert_eq!(err(&s), ResponseError::Malformed, "{bad:?}");
        }
    }

    #[test]
    fn transfer_encoding_rules() {
        assert_eq!(framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"), Framing::Chunked);
        assert_eq!(framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked \r\n\r\n"), Framing::Chunked);
        for bad in [
            "Transfer-Encoding: gzip, chunked",
            "Transfer-Encoding: chunked, gzip",
            "Transfer-Encoding: identity",
            "Transfer-Encoding: chunked, chunked",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked,",
            "Transfer-Encoding:",
            "Transfer-Encoding: xchunked",
            "Transfer-Encoding: \"chunked\"",
        ] {
            let s = format!("HTTP/1.1 200 OK\r\n{bad}\r\n\r\n");
            assert_eq!(err(&s), ResponseError::UnsupportedCoding, "{bad:?}");
        }
        // Transfer-Encoding wins over Content-Length, but the connection is not trusted again.
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.reusable);
        assert_eq!(h.headers["content-length"], "5");
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!((h.framing, h.reusable), (Framing::Chunked, false));
        // A Content-Length that is not even a number is still an error beside a coding.
        assert_eq!(
            err("HTTP/1.1 200 OK\r\nContent-Length: x\r\nTransfer-Encoding: chunked\r\n\r\n"),
            ResponseError::Malformed
        );
        assert_eq!(err("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"), ResponseError::Malformed);
    }

    #[test]
    fn close_framing_and_connection() {
        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(h.framing, Framing::Close);
        assert!(!h.reusable);
        assert!(!head("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive, Close\r\n\r\n").reusable);
        assert!(!head("HTTP/1.1 200 OK\r\nConnection: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\n").reusable);
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: closed, keep-alive\r\n\r\n").reusable);
    }

    #[test]
    fn malformed_heads() {
        for bad in [
            "HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\r\n\tb\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\n Content-Length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\nContent-Length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\n",
            "HTTP/1.1 200 OK\r\nX: a\rContent-Length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\x7fb\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX y: a\r\n\r\n",
            "HTTP/1.1 200 OK\r\n: a\r\n\r\n",
            "\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            "\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            "HTTP/1.1  200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\r\n\r\n",
        ] {
            assert_eq!(err(bad), ResponseError::Malformed, "{bad:?}");
        }
        // obs-text in a value or reason is legal and passed on.
        let h = parse(b"HTTP/1.1 200 \xe9\r\nX: caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n", false, 32, 8192);
        assert!(matches!(h, Ok(ParsedResponse::Final(h)) if h.headers["x"].as_bytes() == b"caf\xc3\xa9"));
    }

    #[test]
    fn limits() {
        let s = "HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert!(matches!(parse(s.as_bytes(), false, 3, 8192), Ok(ParsedResponse::Final(_))));
        assert_eq!(parse(s.as_bytes(), false, 2, 8192).err(), Some(ResponseError::Malformed));
        assert!(matches!(parse(s.as_bytes(), false, 300, 8192), Ok(ParsedResponse::Final(h)) if h.headers.len() == 3));
        let n = s.len();
        assert!(matches!(parse(s.as_bytes(), false, 3, n), Ok(ParsedResponse::Final(h)) if h.head_len == n));
        assert_eq!(parse(s.as_bytes(), false, 3, n - 1).err(), Some(ResponseError::TooLarge(n - 1)));
        assert!(matches!(parse(&s.as_bytes()[..n - 2], false, 3, n - 1), Ok(ParsedResponse::Partial)));
        assert_eq!(parse(&s.as_bytes()[..n - 1], false, 3, n - 1).err(), Some(ResponseError::TooLarge(n - 1)));
        let huge = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "v".repeat(9000));
        assert_eq!(err(&huge), ResponseError::TooLarge(8192));
    }

    #[test]
    fn hostile_bytes_at_every_split_never_panic() {
        let s = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: \x00\xff\r\n\r\nHTTP/1.1 200 OK\r\n\r\n";
        for i in 0..=s.len() {
            let _ = parse(&s[..i], false, 4, 64);
            let _ = parse(&s[i..], true, 4, 64);
        }
    }
}
