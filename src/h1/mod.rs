//! HTTP/1.1 pieces of the lean download path (README "The lean download path"): deciding
//! whether a client's request head is in the strict subset that path may serve, parsing an
//! upstream's response head and its body framing, and decoding a chunked body.
//!
//! Everything here is pure (no I/O, no tokio, no hyper) so it can be tested byte by byte.
//! Request smuggling and response splitting live in the gaps between two parsers' readings
//! of the same bytes, so every rule is strict: a request outside the subset is handed,
//! untouched, to the full HTTP stack, and an upstream answer we cannot read one way only
//! is an error rather than a guess.

pub mod chunked;
pub mod request;
pub mod response;

/// Writes a head's `name: value` lines, leaving out the fields `skip` names; `http`'s
/// types hold no CR or LF, so no value can split a line.
pub fn write_fields(headers: &http::HeaderMap, skip: impl Fn(&http::HeaderName) -> bool, out: &mut Vec<u8>) {
    for (name, value) in headers {
        if skip(name) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Whether `b` is a `tchar` (RFC 9110 section 5.6.2), the bytes of a token.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `s` without leading and trailing optional whitespace (SP and HTAB, RFC 9110 section 5.6.3).
pub(crate) fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(s.len());
    let end = s.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(start, |i| i + 1);
    &s[start..end]
}

/// The elements of a comma-separated list value (RFC 9110 section 5.6.1), each trimmed of OWS;
/// empty elements are kept so callers can refuse them.
pub(crate) fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(trim_ows)
}

/// Whether some LF in `head` is not preceded by CR: a bare LF ends a line for some parsers
/// (httparse among them) and not for others, the classic smuggling disagreement.
pub(crate) fn has_bare_lf(head: &[u8]) -> bool {
    head.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

/// How many httparse header slots live on the stack; a larger configured limit uses the heap.
pub(crate) const STACK_HEADERS: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ows_trim_and_lists() {
        assert_eq!(trim_ows(b" \t a b \t"), b"a b");
        assert_eq!(trim_ows(b"  "), b"");
        assert_eq!(trim_ows(b""), b"");
        let items: Vec<&[u8]> = list_items(b"a, b ,,c").collect();
        assert_eq!(items, vec![&b"a"[..], b"b", b"", b"c"]);
    }

    #[test]
    fn bare_lf() {
        assert!(!has_bare_lf(b"a\r\nb\r\n\r\n"));
        assert!(has_bare_lf(b"a\nb"));
        assert!(has_bare_lf(b"\n"));
        assert!(has_bare_lf(b"a\r\n\n"));
    }

    #[test]
    fn tchars() {
        assert!(is_tchar(b'a') && is_tchar(b'~') && is_tchar(b'9'));
        assert!(!is_tchar(b':') && !is_tchar(b' ') && !is_tchar(b'"') && !is_tchar(0x80));
    }
}
