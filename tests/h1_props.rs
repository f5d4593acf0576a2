//! Property tests (bounded, run by `cargo test`) for the lean path's HTTP/1.1 pieces
//! (`src/h1`): the parsers never panic, whatever they accept satisfies the subset's rules
//! when checked independently, valid heads are found at every split, chunked bodies
//! round-trip and corrupted framing is refused, and the seed corpus in `tests/corpus/h1/`
//! gives the answer its file name promises. Failures found are kept in
//! `tests/h1_props.proptest-regressions`.

use std::path::Path;

use http::{HeaderMap, Method};
use mediaroute::h1::chunked::{self, ChunkedError, Decoder};
use mediaroute::h1::request::{self, LeanRequest, Limits, Parsed};
use mediaroute::h1::response::{self, Framing, ParsedResponse, ResponseHead};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

const LIMITS: Limits = Limits { max_head: 8192, max_headers: 100 };
const MAX_HEAD: usize = 8192;
const MAX_HEADERS: usize = 100;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        // The same cases on every CI run; change the seed by hand to explore others.
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x6d65_6469_6172_6f75),
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel("proptest-regressions"))),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Independent checks of what the parsers accept.

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Every CR is followed by LF and every LF preceded by CR; the only empty line is the last.
fn check_lines(head: &[u8]) {
    assert!(head.ends_with(b"\r\n\r\n"), "head does not end with CRLFCRLF");
    assert_eq!(find(head, b"\r\n\r\n"), Some(head.len() - 4), "an empty line inside the head");
    for (i, &b) in head.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && head[i - 1] == b'\r', "bare LF at {i}");
        }
        if b == b'\r' {
            assert_eq!(head.get(i + 1), Some(&b'\n'), "bare CR at {i}");
        }
    }
    for line in head.split(|&b| b == b'\n') {
        assert!(!line.starts_with(b" ") && !line.starts_with(b"\t"), "obs-fold or leading whitespace");
    }
}

fn values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a [u8]> {
    headers.get_all(name).iter().map(|v| v.as_bytes()).collect()
}

/// A head parsed as Lean obeys every rule of the subset, checked without httparse.
fn check_lean(buf: &[u8], l: &LeanRequest) {
    assert!(l.head_len <= buf.len() && l.head_len <= LIMITS.max_head);
    let head = &buf[..l.head_len];
    check_lines(head);
    assert!(head.iter().all(|&b| matches!(b, b'\r' | b'\n' | b'\t' | 0x20..=0x7e)), "non-ASCII or control byte");
    let request_line = &head[..find(head, b"\r\n").unwrap_or(0)];
    let want_line = format!("{} {} HTTP/1.1", l.parts.method, l.parts.uri);
    assert_eq!(request_line, want_line.as_bytes());
    assert!(l.parts.method == Method::GET || l.parts.method == Method::HEAD);
    assert!(l.parts.uri.scheme().is_none() && l.parts.uri.authority().is_none());
    assert!(l.parts.uri.to_string().starts_with('/') && !l.parts.uri.to_string().contains('#'));
    assert_eq!(l.parts.version, http::Version::HTTP_11);
    let h = &l.parts.headers;
    let lines = head[request_line.len() + 2..head.len() - 2].split(|&b| b == b'\n').filter(|s| !s.is_empty()).count();
    assert_eq!(h.len(), lines, "one header per line");
    assert_eq!(values(h, "host").len(), 1);
    assert!(!values(h, "host")[0].is_empty());
    assert!(values(h, "transfer-encoding").is_empty() && values(h, "expect").is_empty());
    assert!(values(h, "upgrade").is_empty() && values(h, "http2-settings").is_empty());
    let cl = values(h, "content-length");
    assert!(cl.is_empty() || cl == [b"0"]);
    let mut close = false;
    for v in values(h, "connection") {
        for t in v.split(|&b| b == b',') {
            let t = t.trim_ascii().to_ascii_lowercase();
            assert!(t == b"close" || t == b"keep-alive", "connection token {t:?}");
            close |= t == b"close";
        }
    }
    assert_eq!(l.close, close);
}

/// A Final head obeys the framing rules, checked without httparse.
fn check_final(buf: &[u8], head_request: bool, h: &ResponseHead) {
    assert!(h.head_len <= buf.len() && h.head_len <= MAX_HEAD);
    check_lines(&buf[..h.head_len]);
    let status = h.status.as_u16();
    assert!((200..=999).contains(&status));
    let te = values(&h.headers, "transfer-encoding");
    let cl = values(&h.headers, "content-length");
    let http11 = buf.starts_with(b"HTTP/1.1 ");
    assert!(http11 || buf.starts_with(b"HTTP/1.0 "));
    match h.framing {
        Framing::Empty => assert!(head_request || status == 204 || status == 304),
        Framing::Chunked => {
            assert!(http11);
            assert_eq!(te.len(), 1);
            assert!(te[0].trim_ascii().eq_ignore_ascii_case(b"chunked"));
            assert!(!h.reusable || cl.is_empty());
        }
        Framing::Length(n) => {
            assert!(te.is_empty());
            let all: Vec<u64> =
                cl.iter().flat_map(|v| v.split(|&b| b == b',')).map(|s| parse_digits(s.trim_ascii())).collect();
            assert!(!all.is_empty() && all.iter().all(|&x| x == n));
        }
        Framing::Close => assert!(te.is_empty() && cl.is_empty() && !h.reusable),
    }
    if h.reusable {
        assert!(http11);
        for v in values(&h.headers, "connection") {
            assert!(v.split(|&b| b == b',').all(|t| !t.trim_ascii().eq_ignore_ascii_case(b"close")));
        }
    }
}

fn parse_digits(s: &[u8]) -> u64 {
    assert!(!s.is_empty() && s.iter().all(u8::is_ascii_digit), "content-length {s:?}");
    std::str::from_utf8(s).ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("content-length {s:?}"))
}

// ---------------------------------------------------------------------------------------
// Generators.

/// Bytes that matter to HTTP/1.1 framing, to aim mutations at the interesting places.
fn nasty_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        prop::sample::select(vec![b'\r', b'\n', 0, b' ', b'\t', b':', b',', b';', b'#', b'/', b'0', 0x7f, 0x80, 0xff]),
        any::<u8>(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Replace(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index),
    InsertText(prop::sample::Index, &'static str),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let texts = vec![
        "\r\n",
        "\n",
        "\r\n ",
        "Host: b\r\n",
        "Transfer-Encoding: chunked\r\n",
        "Content-Length: 5\r\n",
        "Content-Length: 0\r\n",
        "Connection: close\r\n",
        "Connection: te\r\n",
        ", 0",
        " ",
        "\r\n\r\n",
        "HTTP/1.1 ",
        "http://a",
    ];
    prop_oneof![
        (any::<prop::sample::Index>(), nasty_byte()).prop_map(|(i, b)| Mutation::Replace(i, b)),
        (any::<prop::sample::Index>(), nasty_byte()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<prop::sample::Index>().prop_map(Mutation::Delete),
        (any::<prop::sample::Index>(), prop::sample::select(texts)).prop_map(|(i, t)| Mutation::InsertText(i, t)),
    ]
}

fn mutate(mut buf: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let len = buf.len();
        match m {
            Mutation::Replace(i, b) if len > 0 => buf[i.index(len)] = *b,
            Mutation::Insert(i, b) => buf.insert(i.index(len + 1), *b),
            Mutation::Delete(i) if len > 0 => {
                buf.remove(i.index(len));
            }
            Mutation::InsertText(i, t) => {
                let at = i.index(len + 1);
                buf.splice(at..at, t.bytes());
            }
            _ => {}
        }
    }
    buf
}

const FORBIDDEN: &[&str] =
    &["host", "transfer-encoding", "content-length", "connection", "expect", "upgrade", "http2-settings"];

/// A request head in the lean subset, its header fields, and whether it asks to close.
fn lean_head() -> impl Strategy<Value = (Vec<u8>, Vec<(String, String)>, bool)> {
    let name = "[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,15}"
        .prop_filter("a header the subset rules on", |n| !FORBIDDEN.contains(&n.to_ascii_lowercase().as_str()));
    let value = "([!-~]([ -~\t]{0,30}[!-~])?)?";
    let connection = prop::option::of(prop::sample::select(vec![
        "close",
        "keep-alive",
        "Keep-Alive, CLOSE",
        "keep-alive ,\tkeep-alive",
    ]));
    (
        prop::sample::select(vec!["GET", "HEAD"]),
        "/[A-Za-z0-9._~%/!$&'()*+,;=:@-]{0,40}(\\?[A-Za-z0-9=&%/?-]{0,20})?",
        "[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?(:[0-9]{1,4})?",
        prop::collection::vec((name, value), 0..8),
        any::<prop::sample::Index>(),
        connection,
        any::<bool>(),
        " {0,2}",
    )
        .prop_map(|(method, target, host, mut fields, at, connection, content_length, ows)| {
            fields.insert(at.index(fields.len() + 1), ("Host".into(), host));
            if let Some(c) = connection {
                fields.push(("Connection".into(), c.into()));
            }
            if content_length {
                fields.push(("Content-Length".into(), "0".into()));
            }
            let close = fields.iter().any(|(n, v)| n == "Connection" && v.to_ascii_lowercase().contains("close"));
            let mut head = format!("{method} {target} HTTP/1.1\r\n");
            for (n, v) in &fields {
                head.push_str(&format!("{n}:{ows}{v}{ows}\r\n"));
            }
            head.push_str("\r\n");
            (head.into_bytes(), fields, close)
        })
}

fn response_head() -> impl Strategy<Value = Vec<u8>> {
    let framing = prop::sample::select(vec![
        "Content-Length: 5\r\n",
        "Content-Length: 5, 5\r\n",
        "Transfer-Encoding: chunked\r\n",
        "",
        "Content-Length: 0\r\nConnection: close\r\n",
    ]);
    (
        prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0"]),
        prop::sample::select(vec![200u16, 204, 206, 304, 404, 503, 100]),
        prop::collection::vec(("[a-z][a-z0-9-]{0,12}", "[!-~]{0,20}"), 0..6),
        framing,
    )
        .prop_map(|(version, status, fields, framing)| {
            let mut head = format!("{version} {status} Reason\r\n");
            for (n, v) in fields {
                head.push_str(&format!("x-{n}: {v}\r\n"));
            }
            head.push_str(framing);
            head.push_str("\r\nhello");
            head.into_bytes()
        })
}

// ---------------------------------------------------------------------------------------
// Chunked encoding with a map of which bytes are framing.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Byte {
    Data,
    /// A hex digit of a chunk size; `first` when it starts its line.
    Digit {
        first: bool,
    },
    /// CR or LF of any framing line.
    LineEnd,
    /// Extension or trailer text.
    Text,
}

#[derive(Debug, Clone)]
struct Encoding {
    uppercase: bool,
    zeros: usize,
    extensions: Vec<Option<String>>,
    trailers: Vec<(String, String)>,
}

fn encoding() -> impl Strategy<Value = Encoding> {
    (
        any::<bool>(),
        0usize..3,
        prop::collection::vec(prop::option::of("[ \t]{0,2};[a-z]{1,5}(=([a-z0-9]{1,5}|\"[a-z ;]{0,6}\"))?"), 1..8),
        prop::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,10}", "[ -~]{0,20}"), 0..3),
    )
        .prop_map(|(uppercase, zeros, extensions, trailers)| Encoding { uppercase, zeros, extensions, trailers })
}

/// An encoded body and what each of its bytes is.
#[derive(Default)]
struct Encoded {
    out: Vec<u8>,
    kinds: Vec<Byte>,
}

impl Encoded {
    fn push(&mut self, bytes: &[u8], kind: Byte) {
        self.out.extend_from_slice(bytes);
        self.kinds.extend(std::iter::repeat_n(kind, bytes.len()));
    }

    fn size_line(&mut self, enc: &Encoding, len: usize, i: usize) {
        let hex = if enc.uppercase { format!("{len:X}") } else { format!("{len:x}") };
        let digits = format!("{}{hex}", "0".repeat(enc.zeros));
        for (j, d) in digits.bytes().enumerate() {
            self.push(&[d], Byte::Digit { first: j == 0 });
        }
        if let Some(ext) = &enc.extensions[i % enc.extensions.len()] {
            self.push(ext.as_bytes(), Byte::Text);
        }
        self.push(b"\r\n", Byte::LineEnd);
    }
}

fn encode(body: &[u8], sizes: &[usize], enc: &Encoding) -> (Vec<u8>, Vec<Byte>) {
    let mut e = Encoded::default();
    let mut rest = body;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].min(rest.len());
        e.size_line(enc, n, i);
        e.push(&rest[..n], Byte::Data);
        e.push(b"\r\n", Byte::LineEnd);
        rest = &rest[n..];
        i += 1;
    }
    e.size_line(enc, 0, i);
    for (n, v) in &enc.trailers {
        e.push(format!("{n}: {v}").as_bytes(), Byte::Text);
        e.push(b"\r\n", Byte::LineEnd);
    }
    e.push(b"\r\n", Byte::LineEnd);
    (e.out, e.kinds)
}

/// What decoding gave: the data, then either done (and the bytes used) or an error.
type Decoded = (Vec<u8>, Result<(bool, usize), ChunkedError>);

/// Decodes `input` as a caller would, the bytes arriving in reads of the given sizes.
fn decode(input: &[u8], reads: &[usize]) -> Decoded {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    let (mut pos, mut avail, mut r) = (0, 0, 0);
    loop {
        avail = (avail + reads[r % reads.len()].max(1)).min(input.len());
        r += 1;
        loop {
            match d.feed(&input[pos..avail]) {
                Ok(fed) => {
                    assert!(fed.data.start <= fed.data.end && fed.data.end <= fed.consumed);
                    assert!(fed.consumed <= avail - pos);
                    out.extend_from_slice(&input[pos..avail][fed.data.clone()]);
                    pos += fed.consumed;
                    // No progress only when the input is used up or the body ended.
                    if fed.consumed == 0 {
                        assert!(fed.data.is_empty() && (pos == avail || d.is_done()));
                        break;
                    }
                }
                Err(e) => return (out, Err(e)),
            }
        }
        if d.is_done() || avail == input.len() {
            return (out, Ok((d.is_done(), pos)));
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn parsers_never_panic_on_arbitrary_bytes(buf in prop::collection::vec(any::<u8>(), 0..600)) {
        if let Parsed::Lean(l) = request::parse(&buf, &LIMITS) {
            check_lean(&buf, &l);
        }
        let _ = request::parse(&buf, &Limits { max_head: 64, max_headers: 2 });
        for head_request in [false, true] {
            if let Ok(ParsedResponse::Final(h)) = response::parse(&buf, head_request, MAX_HEADERS, MAX_HEAD) {
                check_final(&buf, head_request, &h);
            }
            let _ = response::parse(&buf, head_request, 2, 64);
        }
        let mut d = Decoder::new();
        let mut rest = &buf[..];
        while let Ok(fed) = d.feed(rest) {
            if fed.consumed == 0 {
                break;
            }
            rest = &rest[fed.consumed..];
        }
    }

    #[test]
    fn mutated_request_heads_are_lean_only_when_the_rules_hold(
        (head, _, _) in lean_head(),
        muts in prop::collection::vec(mutation(), 1..4),
    ) {
        let buf = mutate(head, &muts);
        match request::parse(&buf, &LIMITS) {
            Parsed::Lean(l) => check_lean(&buf, &l),
            Parsed::Partial => prop_assert!(buf.len() < LIMITS.max_head),
            Parsed::Handoff => {}
        }
    }

    #[test]
    fn mutated_response_heads_keep_the_framing_rules(
        head in response_head(),
        muts in prop::collection::vec(mutation(), 0..4),
        head_request in any::<bool>(),
    ) {
        let buf = mutate(head, &muts);
        match response::parse(&buf, head_request, MAX_HEADERS, MAX_HEAD) {
            Ok(ParsedResponse::Final(h)) => check_final(&buf, head_request, &h),
            Ok(ParsedResponse::Interim { head_len }) => {
                check_lines(&buf[..head_len]);
                prop_assert!(buf[9] == b'1' && &buf[9..12] != b"101");
            }
            Ok(ParsedResponse::Partial) | Err(_) => {}
        }
    }

    #[test]
    fn lean_heads_are_partial_until_their_last_byte(
        (head, fields, close) in lean_head(),
        pipelined in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        for i in 0..head.len() {
            prop_assert!(matches!(request::parse(&head[..i], &LIMITS), Parsed::Partial), "prefix {}", i);
        }
        let mut buf = head.clone();
        buf.extend_from_slice(&pipelined);
        let Parsed::Lean(l) = request::parse(&buf, &LIMITS) else {
            return Err(TestCaseError::fail(format!("not lean: {:?}", String::from_utf8_lossy(&head))));
        };
        prop_assert_eq!(l.head_len, head.len());
        prop_assert_eq!(l.close, close);
        check_lean(&buf, &l);
        let got: Vec<(String, String)> = l.parts.headers.iter().map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("?").to_owned())).collect();
        // HeaderMap iterates by name in first-seen order, each name's values in arrival order.
        let mut want: Vec<(String, String)> = Vec::new();
        let mut names: Vec<String> = Vec::new();
        for (n, _) in &fields {
            let n = n.to_ascii_lowercase();
            if !names.contains(&n) {
                names.push(n);
            }
        }
        for n in &names {
            for (m, v) in &fields {
                if m.eq_ignore_ascii_case(n) {
                    want.push((n.clone(), v.trim_ascii().to_owned()));
                }
            }
        }
        prop_assert_eq!(got, want);
    }

    #[test]
    fn chunked_bodies_round_trip_in_any_reads(
        body in prop::collection::vec(any::<u8>(), 0..3000),
        sizes in prop::collection::vec(1usize..700, 1..10),
        reads in prop::collection::vec(1usize..100, 1..10),
        enc in encoding(),
        after in prop::collection::vec(any::<u8>(), 0..10),
    ) {
        let (mut encoded, _) = encode(&body, &sizes, &enc);
        let len = encoded.len();
        encoded.extend_from_slice(&after);
        let (data, end) = decode(&encoded, &reads);
        prop_assert_eq!(end, Ok((true, len)));
        prop_assert!(data == body);
    }

    #[test]
    fn corrupted_chunk_framing_is_refused(
        body in prop::collection::vec(any::<u8>(), 1..1500),
        sizes in prop::collection::vec(1usize..500, 1..6),
        reads in prop::collection::vec(1usize..100, 1..10),
        enc in encoding(),
        at in any::<prop::sample::Index>(),
        replacement in prop::option::of(nasty_byte()),
    ) {
        let (mut encoded, kinds) = encode(&body, &sizes, &enc);
        let framing: Vec<usize> = (0..kinds.len()).filter(|&i| kinds[i] != Byte::Data).collect();
        let i = framing[at.index(framing.len())];
        // `None` deletes the byte: a parser that took a bare LF or CR as a line end would
        // accept a missing CR or LF.
        let refused = match replacement {
            Some(b) => {
                prop_assume!(encoded[i] != b);
                encoded[i] = b;
                match kinds[i] {
                    Byte::LineEnd => true,
                    Byte::Digit { first: true } => !b.is_ascii_hexdigit(),
                    Byte::Digit { first: false } => !b.is_ascii_hexdigit() && !matches!(b, b';' | b' ' | b'\t'),
                    Byte::Text | Byte::Data => false,
                }
            }
            None => {
                // Deleting a byte that the next one repeats gives the same bytes as deleting
                // that next one: a size line's LF followed by data that starts with LF reads
                // as a whole line and one data byte short, which no decoder can tell.
                let repeated = encoded.get(i + 1) == Some(&encoded[i]);
                encoded.remove(i);
                kinds[i] == Byte::LineEnd && !repeated
            }
        };
        let (data, end) = decode(&encoded, &reads);
        // Where the bytes are split never changes the outcome.
        prop_assert_eq!(&(data.clone(), end), &decode(&encoded, &[encoded.len()]));
        if refused {
            // Deleting the very last LF leaves a body that is merely unfinished.
            let unfinished = replacement.is_none() && i + 1 == kinds.len() && end == Ok((false, encoded.len()));
            prop_assert!(end.is_err() || unfinished, "{:?} at {} ({:?}) was accepted", replacement, i, kinds[i]);
            prop_assert!(body.starts_with(&data), "data before the error is not the body's start");
        } else if let Ok((true, _)) = end {
            // A chunk size changed into another valid size is undetectable in chunked (there
            // is no checksum): the decoder can only insist on CRLF right after the data.
            if data != body {
                let size_changed = matches!(kinds[i], Byte::Digit { .. }) || replacement.is_some_and(|b| b.is_ascii_hexdigit());
                prop_assert!(size_changed, "{:?} at {} changed the data", kinds[i], i);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The seed corpus.

fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/h1").join(dir);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn request_corpus() {
    let files = corpus("requests");
    assert!(files.len() >= 25, "{} request files", files.len());
    for (name, buf) in &files {
        let parsed = request::parse(buf, &LIMITS);
        match (name.split('-').next().unwrap_or(""), &parsed) {
            ("lean", Parsed::Lean(l)) => {
                check_lean(buf, l);
                assert_eq!(l.head_len, buf.len(), "{name}: the file is one head");
            }
            ("handoff", Parsed::Handoff) | ("partial", Parsed::Partial) => {}
            _ => panic!("{name}: {parsed:?}"),
        }
        if !name.starts_with("partial-") {
            assert!(buf.ends_with(b"\r\n\r\n"), "{name} does not end with CRLFCRLF");
        }
        // The whole file split at every byte: prefixes never give a different head.
        for i in 0..buf.len().min(LIMITS.max_head) {
            match request::parse(&buf[..i], &LIMITS) {
                Parsed::Lean(l) => assert!(l.head_len <= i && !name.starts_with("lean-"), "{name} prefix {i}"),
                Parsed::Partial | Parsed::Handoff => {}
            }
        }
    }
}

#[test]
fn response_corpus() {
    let files = corpus("responses");
    assert!(files.len() >= 15, "{} response files", files.len());
    for (name, buf) in &files {
        let parsed = response::parse(buf, false, MAX_HEADERS, MAX_HEAD);
        match (name.split('-').next().unwrap_or(""), &parsed) {
            ("ok", Ok(ParsedResponse::Final(h))) => check_final(buf, false, h),
            ("bad", Err(_)) => {}
            ("interim", Ok(ParsedResponse::Interim { head_len })) => {
                let next = response::parse(&buf[*head_len..], false, MAX_HEADERS, MAX_HEAD);
                assert!(matches!(next, Ok(ParsedResponse::Final(_))), "{name}: after the interim head: {next:?}");
            }
            _ => panic!("{name}: {parsed:?}"),
        }
        for i in 0..buf.len() {
            let _ = response::parse(&buf[..i], false, MAX_HEADERS, MAX_HEAD);
            let _ = response::parse(&buf[..i], true, MAX_HEADERS, MAX_HEAD);
        }
    }
}

#[test]
fn re_chunking_helpers_round_trip() {
    let mut out = Vec::new();
    for piece in [&b"hello"[..], &[0u8; 300], b"x"] {
        chunked::write_size_line(piece.len(), &mut out);
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(chunked::LAST_CHUNK);
    let (data, end) = decode(&out, &[7]);
    assert_eq!(end, Ok((true, out.len())));
    assert_eq!(data, [&b"hello"[..], &[0u8; 300], b"x"].concat());
}
