//! Is a client's request head in the lean subset?
//!
//! The lean path serves only plain `GET`/`HEAD` heads that every HTTP/1.1 parser reads the
//! same way. Anything else, malformed heads included, is [`Parsed::Handoff`]: the caller
//! gives the connection, with the bytes exactly as received, to the full HTTP stack, which
//! answers or refuses it itself. So nothing here is an error, and a doubtful head is never
//! "fixed up".

use std::mem::MaybeUninit;

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri, Version};

use super::{STACK_HEADERS, has_bare_lf, list_items};

/// Bounds on a request head.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest head, request line to the empty line included, in bytes.
    pub max_head: usize,
    /// Most header fields.
    pub max_headers: usize,
}

/// A request head the lean path may serve.
#[derive(Debug)]
pub struct LeanRequest {
    /// Method (GET or HEAD), origin-form URI, version HTTP/1.1, headers in arrival order (HeaderMap::append), extensions empty.
    pub parts: http::request::Parts,
    /// Bytes of `buf` the head took, CRLFCRLF included.
    pub head_len: usize,
    /// The client asked to close the connection after this response (`Connection: close`).
    pub close: bool,
}

/// What the start of a client's buffer is.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per request and moved on at once; a Box would cost an allocation"
)]
pub enum Parsed {
    /// No complete head yet, and it may still fit: read more.
    Partial,
    /// A complete head in the lean subset.
    Lean(LeanRequest),
    /// Anything else (other methods, versions, a body, odd or malformed heads, too big, too many headers): hand the connection to the full HTTP stack with the bytes as they are.
    Handoff,
}

/// Parses the head at the start of `buf`.
pub fn parse(buf: &[u8], limits: &Limits) -> Parsed {
    // httparse skips empty lines before the request line; we refuse them so that the head
    // we serve starts where every parser thinks it starts.
    if matches!(buf.first(), Some(b'\r' | b'\n')) {
        return Parsed::Handoff;
    }
    // Nothing past `max_head` can belong to a head we accept, so httparse never scans it.
    let buf = &buf[..buf.len().min(limits.max_head)];
    if limits.max_headers <= STACK_HEADERS {
        let mut slots = [const { MaybeUninit::uninit() }; STACK_HEADERS];
        parse_into(buf, limits, &mut slots[..limits.max_headers])
    } else {
        // A limit above the stack array is a deliberate configuration; honour it exactly.
        let mut slots: Vec<MaybeUninit<httparse::Header<'_>>> =
            std::iter::repeat_with(MaybeUninit::uninit).take(limits.max_headers).collect();
        parse_into(buf, limits, &mut slots)
    }
}

/// [`parse`] with httparse's header slots provided; `buf` is already cut at `max_head`.
fn parse_into<'b>(buf: &'b [u8], limits: &Limits, slots: &mut [MaybeUninit<httparse::Header<'b>>]) -> Parsed {
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(n)) => n,
        // `buf` was cut at max_head, so a full-length partial head can never fit.
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head => return Parsed::Handoff,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        // TooManyHeaders among them: the full stack applies its own limit and answers.
        Err(_) => return Parsed::Handoff,
    };
    match lean(&req, &buf[..head_len]) {
        Some((parts, close)) => Parsed::Lean(LeanRequest { parts, head_len, close }),
        None => Parsed::Handoff,
    }
}

/// The request's parts and `close` when a complete head is in the lean subset.
fn lean(req: &httparse::Request<'_, '_>, head: &[u8]) -> Option<(http::request::Parts, bool)> {
    if req.version != Some(1) || has_bare_lf(head) {
        return None;
    }
    let method = match req.method? {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        _ => return None,
    };
    let uri = origin_form(req.path?)?;

    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let mut hosts = 0usize;
    let mut close = false;
    let mut content_length = false;
    for h in req.headers.iter() {
        // httparse lets obs-text (0x80..) and nothing else odd through; we want plain ASCII.
        if !h.value.iter().all(|&b| b == b'\t' || (0x20..=0x7e).contains(&b)) {
            return None;
        }
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        if name == header::HOST {
            hosts += 1;
            if !is_host(h.value) {
                return None;
            }
        } else if name == header::CONTENT_LENGTH {
            // One `Content-Length: 0` is a GET with no body; anything else has (or may have) one.
            if content_length || h.value != b"0" {
                return None;
            }
            content_length = true;
        } else if name == header::CONNECTION {
            for token in list_items(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                    // Other tokens name hop-by-hop headers: the full stack strips those.
                    return None;
                }
            }
        } else if name == header::TRANSFER_ENCODING
            || name == header::EXPECT
            || name == header::UPGRADE
            || name.as_str() == "http2-settings"
        {
            return None;
        }
        headers.append(name, value);
    }
    if hosts != 1 {
        return None;
    }

    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    parts.headers = headers;
    Some((parts, close))
}

/// Whether a Host value is `uri-host [ ":" port ]` (RFC 9110 section 7.2): an Authority
/// without the userinfo and non-numeric ports that `http::uri::Authority` lets through.
fn is_host(value: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(value) else { return false };
    let Ok(authority) = s.parse::<http::uri::Authority>() else { return false };
    let port = &s[authority.host().len()..];
    !s.contains('@')
        && !authority.host().is_empty()
        && (port.is_empty()
            || (port.len() > 1 && port[1..].bytes().all(|b| b.is_ascii_digit()) && authority.port_u16().is_some()))
}

/// The request-target as a URI when it is origin-form (`/path?query`) in visible ASCII with
/// no fragment; absolute-form, authority-form and `*` stay with the full stack.
fn origin_form(target: &str) -> Option<Uri> {
    let bytes = target.as_bytes();
    if bytes.first() != Some(&b'/') || !bytes.iter().all(|&b| (0x21..=0x7e).contains(&b) && b != b'#') {
        return None;
    }
    let uri = Uri::try_from(target).ok()?;
    (uri.scheme().is_none() && uri.authority().is_none()).then_some(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_head: 8192, max_headers: 16 };

    fn parse_str(s: &str) -> Parsed {
        parse(s.as_bytes(), &LIMITS)
    }

    fn lean_of(s: &str) -> LeanRequest {
        match parse_str(s) {
            Parsed::Lean(l) => l,
            other => panic!("expected Lean for {s:?}, got {other:?}"),
        }
    }

    fn is_handoff(s: &[u8]) -> bool {
        matches!(parse(s, &LIMITS), Parsed::Handoff)
    }

    #[track_caller]
    fn assert_handoff(s: &str) {
        assert!(is_handoff(s.as_bytes()), "expected Handoff for {s:?}, got {:?}", parse_str(s));
    }

    const OK: &str = "GET /bucket/key?x=1 HTTP/1.1\r\nHost: s3.example:9000\r\nRange: bytes=0-9\r\n\r\n";

    #[test]
    fn plain_get_is_lean() {
        let l = lean_of(OK);
        assert_eq!(l.head_len, OK.len());
        assert!(!l.close);
        assert_eq!(l.parts.method, Method::GET);
        assert_eq!(l.parts.uri, "/bucket/key?x=1");
        assert_eq!(l.parts.version, Version::HTTP_11);
        assert_eq!(l.parts.headers["host"], "s3.example:9000");
        assert_eq!(l.parts.headers["range"], "bytes=0-9");
        assert!(l.parts.extensions.is_empty());
    }

    #[test]
    fn head_is_lean_and_trailing_bytes_are_not_part_of_the_head() {
        let s = "HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n";
        let l = lean_of(s);
        assert_eq!(l.parts.method, Method::HEAD);
        assert_eq!(l.head_len, "HEAD / HTTP/1.1\r\nHost: a\r\n\r\n".len());
    }

    #[test]
    fn headers_keep_arrival_order_and_duplicates() {
        let l = lean_of("GET / HTTP/1.1\r\nX-A: 1\r\nHost: h\r\nx-a: 2\r\nX-B: 3\r\nX-A: 4\r\n\r\n");
        let xa: Vec<_> = l.parts.headers.get_all("x-a").iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(xa, ["1", "2", "4"]);
        let names: Vec<_> = l.parts.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-a", "host", "x-b"]);
    }

    #[test]
    fn partial_then_complete_at_every_split() {
        for i in 0..OK.len() {
            assert!(matches!(parse(&OK.as_bytes()[..i], &LIMITS), Parsed::Partial), "prefix {i}");
        }
        assert!(matches!(parse(OK.as_bytes(), &LIMITS), Parsed::Lean(_)));
    }

    #[test]
    fn methods_and_versions() {
        assert_handoff("get / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_handoff("Get / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_handoff("POST / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_handoff("PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n");
        assert_handoff("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_handoff("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n");
        assert_handoff("GET / HTTP/1.0\r\nHost: a\r\n\r\n");
        assert_handoff("GET / http/1.1\r\nHost: a\r\n\r\n");
        assert_handoff("GET / HTTP/2.0\r\nHost: a\r\n\r\n");
        assert_handoff("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert_handoff("GET /\r\n\r\n");
    }

    #[test]
    fn request_line_shape() {
        assert_handoff("GET  / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_handoff("GET /  HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_handoff("GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_handoff("GET / HTTP/1.1 \r\nHost: a\r\n\r\n");
        assert_handoff(" GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    #[test]
    fn targets() {
        assert_handoff("GET * HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_handoff("GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_handoff("GET a:80 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_handoff("GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_handoff("GET /a?b#frag HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(is_handoff("GET /caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n".as_bytes()));
        assert!(is_handoff(b"GET /a\x7f HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(is_handoff(b"GET /a\x00 HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert_eq!(lean_of("GET //double/slash HTTP/1.1\r\nHost: a\r\n\r\n").parts.uri.path(), "//double/slash");
        assert_eq!(lean_of("GET /%2e%2e/x?a=%00 HTTP/1.1\r\nHost: a\r\n\r\n").parts.uri.query(), Some("a=%00"));
    }

    #[test]
    fn leading_empty_lines() {
        assert_handoff("\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_handoff("\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(is_handoff(b"\r"));
        assert!(is_handoff(b"\n"));
        assert!(matches!(parse(b"", &LIMITS), Parsed::Partial));
    }

    #[test]
    fn line_endings() {
        assert_handoff("GET / HTTP/1.1\nHost: a\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\n\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nX: b\nY: c\r\n\r\n");
        // Bare CR anywhere.
        assert_handoff("GET / HTTP/1.1\rHost: a\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nX: a\rb\r\nHost: a\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\n\r\r\n");
    }

    #[test]
    fn obs_fold_and_odd_names() {
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\tc\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\n Host: a\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost : a\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHo st: a\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\n: a\r\nHost: a\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nX(y): z\r\n\r\n");
        assert!(matches!(parse_str("GET / HTTP/1.1\r\nHost: a\r\nX-!#$%&'*+.^_`|~: z\r\n\r\n"), Parsed::Lean(_)));
    }

    #[test]
    fn header_values() {
        assert!(is_handoff(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n"));
        assert!(is_handoff(b"GET / HTTP/1.1\r\nHost: a\r\nX: \x80\r\n\r\n"));
        assert!(is_handoff(b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9\r\n\r\n"));
        assert!(is_handoff(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n"));
        assert!(is_handoff(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x0bb\r\n\r\n"));
        let l = lean_of("GET / HTTP/1.1\r\nHost: a\r\nX: \t a \t b \t\r\nY:\r\n\r\n");
        assert_eq!(l.parts.headers["x"], "a \t b");
        assert_eq!(l.parts.headers["y"], "");
    }

    #[test]
    fn host_rules() {
        assert_handoff("GET / HTTP/1.1\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost:\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost:   \r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a b\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a, b\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: user@a\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a:port\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a:\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: :80\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a:+80\r\n\r\n");
        assert_handoff("GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(matches!(parse_str("GET / HTTP/1.1\r\nHOST: [::1]:8080\r\n\r\n"), Parsed::Lean(_)));
        assert!(matches!(parse_str("GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n"), Parsed::Lean(_)));
    }

    #[test]
    fn bodies_and_framing() {
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0, 0\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +0\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 00\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -0\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n");
        // httparse strips whitespace around a value: ` 0 ` is `0`, as for every parser.
        let l = lean_of("GET / HTTP/1.1\r\nHost: a\r\nContent-Length:  0 \r\n\r\n");
        assert_eq!(l.parts.headers["content-length"], "0");
    }

    #[test]
    fn expect_upgrade_h2c() {
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n");
    }

    #[test]
    fn connection_tokens() {
        assert!(!lean_of("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n").close);
        assert!(lean_of("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").close);
        assert!(lean_of("GET / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive , CLOSE\r\n\r\n").close);
        assert!(lean_of("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n").close);
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, TE\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nConnection: x-secret\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nConnection: authorization\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nConnection: close,\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nConnection:\r\n\r\n");
        assert_handoff("GET / HTTP/1.1\r\nHost: a\r\nConnection: closed\r\n\r\n");
    }

    #[test]
    fn size_limits() {
        let small = Limits { max_head: 64, max_headers: 16 };
        let fits = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "v".repeat(32));
        assert_eq!(fits.len(), 64);
        assert!(matches!(parse(fits.as_bytes(), &small), Parsed::Lean(ref l) if l.head_len == 64));
        let over = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "v".repeat(33));
        assert!(matches!(parse(over.as_bytes(), &small), Parsed::Handoff));
        // Incomplete: Partial below the limit, Handoff once the buffer reaches it.
        assert!(matches!(parse(&over.as_bytes()[..63], &small), Parsed::Partial));
        assert!(matches!(parse(&over.as_bytes()[..64], &small), Parsed::Handoff));
        // A huge value near the default limit.
        let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "v".repeat(8192 - 32));
        assert_eq!(big.len(), 8192);
        assert!(matches!(parse_str(&big), Parsed::Lean(_)));
        let bigger = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "v".repeat(8192 - 31));
        assert!(matches!(parse_str(&bigger), Parsed::Handoff));
        assert!(matches!(parse(&bigger.as_bytes()[..8000], &LIMITS), Parsed::Partial));
    }

    #[test]
    fn header_count_limits() {
        let head = |n: usize| {
            let mut s = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
            for i in 1..n {
                s.push_str(&format!("X-{i}: v\r\n"));
            }
            s + "\r\n"
        };
        let four = Limits { max_head: 8192, max_headers: 4 };
        assert!(matches!(parse(head(4).as_bytes(), &four), Parsed::Lean(_)));
        assert!(matches!(parse(head(5).as_bytes(), &four), Parsed::Handoff));
        let zero = Limits { max_head: 8192, max_headers: 0 };
        assert!(matches!(parse(head(1).as_bytes(), &zero), Parsed::Handoff));
        // Above the stack array: the configured limit still holds exactly.
        let many = Limits { max_head: 1 << 16, max_headers: 200 };
        assert!(matches!(parse(head(200).as_bytes(), &many), Parsed::Lean(ref l) if l.parts.headers.len() == 200));
        assert!(matches!(parse(head(201).as_bytes(), &many), Parsed::Handoff));
        let stack = Limits { max_head: 1 << 16, max_headers: 128 };
        assert!(matches!(parse(head(128).as_bytes(), &stack), Parsed::Lean(_)));
        assert!(matches!(parse(head(129).as_bytes(), &stack), Parsed::Handoff));
    }

    #[test]
    fn hostile_bytes_at_every_split_never_panic() {
        let s = b"GET /a HTTP/1.1\r\nHost: a\r\nX: \x00\xff\r\n\r\n\r\n";
        for i in 0..=s.len() {
            let _ = parse(&s[..i], &LIMITS);
            let _ = parse(&s[i..], &LIMITS);
        }
    }
}
