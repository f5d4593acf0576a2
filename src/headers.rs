//! Header handling shared by requests and responses (RFC 9110 section 7.6.1).

use std::fmt::Write;

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

/// Added to every proxied response: which upstream answered.
pub static X_MEDIAROUTE_UPSTREAM: HeaderName = HeaderName::from_static("x-mediaroute-upstream");
/// Added to every proxied response: why that upstream was chosen.
pub static X_MEDIAROUTE_REASON: HeaderName = HeaderName::from_static("x-mediaroute-reason");
/// The standard forwarding header: appended to upstream requests, walked from trusted peers.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// The host the client asked for, as a proxy in front saw it.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// The scheme the client used, as the first proxy saw it.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The client address as a proxy in front saw it (nginx's convention).
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// Path overrides some servers honour over the request line.
static URL_OVERRIDES: [HeaderName; 2] =
    [HeaderName::from_static("x-original-url"), HeaderName::from_static("x-rewrite-url")];

/// Keeps the forwarding headers that describe the client only when a trusted proxy set
/// them, and says which scheme the client used when nobody trusted did (an S3 proxy may
/// build URLs or signatures from them; README "Forwarding").
pub fn own_forwarding_headers(headers: &mut HeaderMap, trusted_peer: bool, scheme: &'static str) {
    if !trusted_peer {
        headers.remove(&X_FORWARDED_HOST);
        headers.remove(&X_FORWARDED_PROTO);
        headers.remove(header::FORWARDED);
        headers.remove(&X_REAL_IP);
    }
    // A way out of the bucket, whoever sent it.
    for name in &URL_OVERRIDES {
        headers.remove(name);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(scheme));
    }
}

/// Two `Content-Length` headers that disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("conflicting Content-Length headers")]
pub struct ConflictingLengths;

/// Folds repeated identical `Content-Length` headers into one; `Err` when they differ.
pub fn fold_content_length(headers: &mut HeaderMap) -> Result<(), ConflictingLengths> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = values.next().cloned() else { return Ok(()) };
    let mut repeated = false;
    for v in values {
        if v != first {
            return Err(ConflictingLengths);
        }
        repeated = true;
    }
    if repeated {
        headers.insert(header::CONTENT_LENGTH, first);
    }
    Ok(())
}

/// Headers that describe one connection, never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including any named in `Connection`.
///
/// `Transfer-Encoding` goes too: hyper frames each side's body itself.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names costs less than a lookup for each
    // hop-by-hop name (README "The lean download path", CPU per request).
    let carries = |n: &HeaderName| *n == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(n);
    if !headers.keys().any(carries) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

/// Appends `ip` to `X-Forwarded-For`, joining earlier lines into one.
pub fn append_forwarded_for(headers: &mut HeaderMap, ip: std::net::IpAddr) {
    let name = &X_FORWARDED_FOR;
    let mut joined = String::new();
    for v in headers.get_all(name).iter() {
        if let Ok(v) = v.to_str() {
            joined.push_str(v);
            joined.push_str(", ");
        }
    }
    // Writing into a String cannot fail.
    let _ = write!(joined, "{ip}");
    if let Ok(v) = HeaderValue::from_str(&joined) {
        headers.insert(name.clone(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::RANGE, HeaderValue::from_static("bytes=0-9"));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"abc\""));
        remove_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["if-none-match", "range"]);
    }

    #[test]
    fn forwarding_headers_are_ours_unless_a_trusted_proxy_set_them() {
        let claims = || {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
            h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
            h.insert("forwarded", HeaderValue::from_static("host=evil.example;proto=https"));
            h.insert("x-real-ip", HeaderValue::from_static("10.20.0.1"));
            h
        };
        let mut h = claims();
        own_forwarding_headers(&mut h, false, "http");
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut h = claims();
        own_forwarding_headers(&mut h, true, "http");
        assert_eq!((h.len(), &h["x-forwarded-proto"]), (4, &HeaderValue::from_static("https")));
        let mut h = HeaderMap::new();
        h.insert("x-original-url", HeaderValue::from_static("/other/x"));
        own_forwarding_headers(&mut h, true, "http");
        assert!(h.get("x-original-url").is_none(), "never, whoever sent it");
    }

    #[test]
    fn repeated_content_lengths_fold_or_refuse() {
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert_eq!(fold_content_length(&mut h), Ok(()));
        assert_eq!(h.get_all(header::CONTENT_LENGTH).iter().count(), 1);
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("4"));
        assert_eq!(fold_content_length(&mut h), Err(ConflictingLengths));
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.append("x-forwarded-for", HeaderValue::from_static("5.6.7.8"));
        append_forwarded_for(&mut h, "127.0.0.1".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 5.6.7.8, 127.0.0.1");
    }
}
