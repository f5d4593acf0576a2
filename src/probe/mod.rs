//! The primary probe (README "The primary probe"): the client's own request, sent to the
//! primary with the client's own credentials, tells whether the primary lets this client
//! read the object, how old the object is, and whether it has replicated.
//!
//! This module builds the probe's request head and reads its answer; the proxy sends it.
//! A SigV4 signature covers the method, the path, the query and the headers it names, so
//! the probe keeps all of those as the client signed them: a GET stays a GET (with one
//! byte asked for, unless the client signed its own `Range`), a HEAD stays a HEAD.

pub mod cache;
pub mod presigned;

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};

use crate::metrics::ProbeResult;
use crate::route::ReplicationStatus;
pub use cache::{FactsCache, Learned, ObjectKey, Writing, Written};

/// The response header that carries S3's replication status.
pub const REPLICATION_STATUS: HeaderName = HeaderName::from_static("x-amz-replication-status");

/// Headers that make a GET conditional: left out of the probe unless signed, so that the
/// probe learns of the object whatever the client's condition says.
const CONDITIONAL: [HeaderName; 4] =
    [header::IF_MATCH, header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE, header::IF_UNMODIFIED_SINCE];

/// The header names a client's SigV4 signature covers: `SignedHeaders=` of the
/// `Authorization` header, or the `X-Amz-SignedHeaders` parameter of a presigned URL.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SignedHeaders(String);

impl SignedHeaders {
    /// Reads the list from a request's headers and query; empty when it is not signed.
    pub fn of(headers: &HeaderMap, query: Option<&str>) -> SignedHeaders {
        let from_header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|auth| {
            let rest = auth.split_once("SignedHeaders=")?.1;
            Some(rest.split([',', ' ']).next().unwrap_or("").to_string())
        });
        let from_query = || {
            query?.split('&').find_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                name.eq_ignore_ascii_case("X-Amz-SignedHeaders").then(|| value.replace("%3B", ";").replace("%3b", ";"))
            })
        };
        SignedHeaders(from_header.or_else(from_query).unwrap_or_default().to_ascii_lowercase())
    }

    /// Whether `name` (lower-case) is signed.
    pub fn contains(&self, name: &str) -> bool {
        self.0.split(';').any(|n| n == name)
    }
}

/// The probe's request head, from the head the client's request goes out with: the same
/// method and credentials, a GET asks for one byte unless its `Range` is signed, and
/// conditional headers are left out unless signed.
pub fn probe_headers(method: &Method, headers: &HeaderMap, query: Option<&str>) -> HeaderMap {
    let signed = SignedHeaders::of(headers, query);
    let mut probe = headers.clone();
    for name in CONDITIONAL {
        if !signed.contains(name.as_str()) {
            probe.remove(name);
        }
    }
    if !signed.contains(header::RANGE.as_str()) {
        if method == Method::GET {
            probe.insert(header::RANGE, HeaderValue::from_static("bytes=0-0"));
        } else {
            probe.remove(header::RANGE);
        }
    }
    probe
}

/// What the primary's answer to a probe says, and its metric label.
pub fn read_answer(status: StatusCode, headers: &HeaderMap) -> (Learned, ProbeResult) {
    let allowed =
        status.is_success() || status == StatusCode::NOT_MODIFIED || status == StatusCode::RANGE_NOT_SATISFIABLE;
    match status {
        _ if allowed => {
            let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
            let modified = text(&header::LAST_MODIFIED).and_then(|v| httpdate::parse_http_date(v).ok());
            let status = text(&REPLICATION_STATUS).and_then(ReplicationStatus::parse);
            (Learned::Found { modified, status }, ProbeResult::Ok)
        }
        StatusCode::NOT_FOUND => (Learned::Missing, ProbeResult::Missing),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => (Learned::Denied, ProbeResult::Denied),
        _ => (Learned::Failed, ProbeResult::Error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (k.parse::<HeaderName>().unwrap(), v.parse().unwrap())).collect()
    }

    const AUTH: &str = "AWS4-HMAC-SHA256 Credential=AKID/20261124/us-east-1/s3/aws4_request, \
                        SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature=abc";

    #[test]
    fn signed_headers_come_from_the_authorization_header_or_the_presigned_query() {
        let signed = SignedHeaders::of(&head(&[("authorization", AUTH)]), None);
        assert!(signed.contains("range") && signed.contains("host") && signed.contains("x-amz-date"));
        assert!(!signed.contains("if-match") && !signed.contains("ran"));
        let q = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-SignedHeaders=host%3Bif-none-match&X-Amz-Signature=x";
        let signed = SignedHeaders::of(&HeaderMap::new(), Some(q));
        assert!(signed.contains("host") && signed.contains("if-none-match") && !signed.contains("range"));
        assert_eq!(SignedHeaders::of(&HeaderMap::new(), Some("versionId=3")), SignedHeaders::default());
    }

    #[test]
    fn a_get_asks_for_one_byte_unless_its_range_is_signed() {
        let plain = head(&[("range", "bytes=100-200"), ("if-none-match", "\"e\""), ("authorization", "x")]);
        let probe = probe_headers(&Method::GET, &plain, None);
        assert_eq!(probe[header::RANGE], "bytes=0-0");
        assert!(!probe.contains_key(header::IF_NONE_MATCH), "unsigned conditions are left out");
        assert_eq!(probe[header::AUTHORIZATION], "x", "the client's own credentials");

        let signed = head(&[("range", "bytes=100-200"), ("authorization", AUTH), ("if-match", "\"e\"")]);
        let probe = probe_headers(&Method::GET, &signed, None);
        assert_eq!(probe[header::RANGE], "bytes=100-200", "a signed Range stays");
        assert!(!probe.contains_key(header::IF_MATCH));

        let q = "X-Amz-SignedHeaders=host%3Bif-match&X-Amz-Signature=x";
        let probe = probe_headers(&Method::HEAD, &head(&[("if-match", "\"e\""), ("range", "bytes=1-2")]), Some(q));
        assert_eq!(probe[header::IF_MATCH], "\"e\"", "a signed condition stays");
        assert!(!probe.contains_key(header::RANGE), "a HEAD gets no Range");
    }

    #[test]
    fn answers_say_who_may_read_and_what_the_object_is() {
        let h = head(&[("last-modified", "Wed, 21 Oct 2015 07:28:00 GMT"), ("x-amz-replication-status", "PENDING")]);
        for ok in [200, 206, 304, 416] {
            let (learned, result) = read_answer(StatusCode::from_u16(ok).unwrap(), &h);
            assert_eq!(result, ProbeResult::Ok, "{ok}");
            let Learned::Found { modified: Some(t), status } = learned else { panic!("{ok}: {learned:?}") };
            assert_eq!(t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(), 1_445_412_480);
            assert_eq!(status, Some(ReplicationStatus::Pending));
        }
        assert_eq!(read_answer(StatusCode::FORBIDDEN, &h), (Learned::Denied, ProbeResult::Denied));
        assert_eq!(read_answer(StatusCode::UNAUTHORIZED, &h), (Learned::Denied, ProbeResult::Denied));
        assert_eq!(read_answer(StatusCode::NOT_FOUND, &h), (Learned::Missing, ProbeResult::Missing));
        assert_eq!(read_answer(StatusCode::SERVICE_UNAVAILABLE, &h), (Learned::Failed, ProbeResult::Error));
        let bare = read_answer(StatusCode::OK, &head(&[("x-amz-replication-status", "REPLICA")])).0;
        assert_eq!(bare, Learned::Found { modified: None, status: None });
    }
}
