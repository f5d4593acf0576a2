//! SigV4 for the replica (README "Authentication"): a download the primary allowed is
//! signed anew with mediaroute's own credentials for the replica's host, region and bucket.
//!
//! The client's credentials were made for the primary bucket and are worthless at the
//! replica, so they are removed (headers and presign parameters) before signing. The path
//! is encoded once by S3's rules and never normalised: S3 decodes the path it receives
//! and signs the key's canonical encoding, so sending exactly that encoding makes what is
//! signed and what is sent the same bytes, whatever the client's own encoding was.

pub mod credentials;

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings, UriPathNormalizationMode,
    sign,
};
use aws_smithy_runtime_api::client::identity::Identity;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};

/// Why a request could not be signed; never carries a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// No credentials are loaded, or the last ones expired.
    #[error("no AWS credentials to sign with")]
    NoCredentials,
    /// The signer refused the request (a header value it cannot canonicalise, say).
    #[error("the request cannot be signed: {0}")]
    Unsignable(String),
}

/// Client credential headers that go before signing anew.
const CLIENT_CREDENTIALS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-amz-date"),
    HeaderName::from_static("x-amz-security-token"),
    HeaderName::from_static("x-amz-content-sha256"),
];

/// Query parameters of a SigV2 presigned URL, the client's too.
const SIGV2_PRESIGN: [&str; 3] = ["AWSAccessKeyId", "Signature", "Expires"];

/// The replica request's path and query: the path in S3's canonical encoding, the query
/// without the client's presign parameters (`X-Amz-*`, and SigV2's).
pub fn replica_target(path: &str, query: Option<&str>) -> String {
    let mut out = s3_encoded_path(path);
    let mut first = true;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let name = pair.split_once('=').map_or(pair, |(n, _)| n);
        let amz = name.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("x-amz-"));
        if amz || SIGV2_PRESIGN.contains(&name) {
            continue;
        }
        out.push(if first { '?' } else { '&' });
        out.push_str(pair);
        first = false;
    }
    out
}

/// `path` decoded once as S3 decodes it (`%XX`, and a literal `+` is a space: S3's
/// long-standing reading of a path) and encoded again as S3 signs it: every byte but
/// `A-Z a-z 0-9 - . _ ~` and `/` as `%XX`. A broken escape is a literal `%`.
pub fn s3_encoded_path(path: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len() + 16);
    let mut i = 0;
    while i < bytes.len() {
        let (b, used) =
            match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
                (b'%', Some(hi), Some(lo)) => (hi << 4 | lo, 3),
                (b'+', _, _) => (b' ', 1),
                (b, _, _) => (b, 1),
            };
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
        i += used;
    }
    out
}

/// Replaces the client's credentials in a replica request with a SigV4 signature made
/// with `creds` for `host` in `region` (service `s3`, empty payload), at `now`.
///
/// `uri` must already carry the replica target from [`replica_target`]; `Host` becomes
/// `host`. Signed: `host`, `range`, the conditional headers, and every remaining `x-amz-*`
/// header (S3 refuses unsigned ones); others (`X-Forwarded-For`, ...) may be changed by
/// proxies on the way and are not.
pub fn sign_for_replica(
    method: &Method,
    uri: &Uri,
    headers: &mut HeaderMap,
    host: &HeaderValue,
    region: &str,
    creds: &Credentials,
    now: SystemTime,
) -> Result<(), SignError> {
    for name in &CLIENT_CREDENTIALS {
        headers.remove(name);
    }
    headers.insert(header::HOST, host.clone());
    let signable_uri =
        format!("https://{}{}", host.to_str().unwrap_or(""), uri.path_and_query().map_or("/", |p| p.as_str()));
    let covered = headers.iter().filter(|(name, _)| signed(name)).map(|(n, v)| (n.as_str(), v.to_str()));
    let mut pairs = Vec::with_capacity(8);
    for (name, value) in covered {
        pairs.push((name, value.map_err(|_| SignError::Unsignable(format!("the {name} header is not text")))?));
    }
    let request = SignableRequest::new(method.as_str(), signable_uri, pairs.into_iter(), SignableBody::Bytes(&[]))
        .map_err(|e| SignError::Unsignable(e.to_string()))?;
    let mut settings = SigningSettings::default();
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    let identity = Identity::from(creds.clone());
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("s3")
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| SignError::Unsignable(e.to_string()))?
        .into();
    let (instructions, _signature) =
        sign(request, &params).map_err(|e| SignError::Unsignable(e.to_string()))?.into_parts();
    let (signing_headers, _params) = instructions.into_parts();
    for h in signing_headers {
        let mut value =
            HeaderValue::from_str(h.value()).map_err(|_| SignError::Unsignable("a signing header".to_string()))?;
        value.set_sensitive(h.sensitive());
        headers.insert(h.name(), value);
    }
    Ok(())
}

/// Whether a header is covered by mediaroute's signature.
fn signed(name: &HeaderName) -> bool {
    let n = name.as_str();
    name == header::HOST
        || name == header::RANGE
        || name == header::IF_MATCH
        || name == header::IF_NONE_MATCH
        || name == header::IF_MODIFIED_SINCE
        || name == header::IF_UNMODIFIED_SINCE
        || n.starts_with("x-amz-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_encoded_once_as_s3_signs_them() {
        let cases = [
            ("/b/plain/key.mov", "/b/plain/key.mov"),
            ("/b/with space", "/b/with%20space"),
            ("/b/with%20space", "/b/with%20space"),
            ("/b/a+b", "/b/a%20b"),
            ("/b/a%2Bb", "/b/a%2Bb"),
            ("/b/100%25", "/b/100%25"),
            ("/b/50%", "/b/50%25"),
            ("/b/x:y@z$(1)'!*", "/b/x%3Ay%40z%24%281%29%27%21%2A"),
            ("/b/%C3%A9t%C3%A9.mov", "/b/%C3%A9t%C3%A9.mov"),
            ("/b/a//b/./c", "/b/a//b/./c"),
            ("/b/a%2Fb", "/b/a/b"),
            ("/b/~tilde_-.", "/b/~tilde_-."),
        ];
        for (raw, want) in cases {
            assert_eq!(s3_encoded_path(raw), want, "{raw}");
            assert_eq!(s3_encoded_path(want), want, "idempotent for {want}");
        }
    }

    #[test]
    fn presign_parameters_leave_the_replica_query() {
        let q = "versionId=7&X-Amz-Algorithm=AWS4-HMAC-SHA256&x-amz-credential=a%2Fb&X-Amz-Signature=s&x-id=GetObject";
        assert_eq!(replica_target("/b/k", Some(q)), "/b/k?versionId=7&x-id=GetObject");
        assert_eq!(replica_target("/b/k", Some("X-Amz-Expires=60")), "/b/k");
        assert_eq!(replica_target("/b/k k", None), "/b/k%20k");
        let v2 = "AWSAccessKeyId=AKID&Signature=abc&Expires=1&versionId=2";
        assert_eq!(replica_target("/b/k", Some(v2)), "/b/k?versionId=2", "SigV2 presign parameters go too");
        assert_eq!(replica_target("/b/k", Some("x-amzé=1&a=b")), "/b/k?x-amzé=1&a=b", "no panic on UTF-8 names");
    }

    #[test]
    fn the_client_credentials_are_replaced_by_a_signature() {
        let creds = Credentials::new("AKIDREPLICA", "secret", Some("token".into()), None, "test");
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("authorization", "AWS4-HMAC-SHA256 Credential=CLIENT/x"),
            ("x-amz-date", "20200101T000000Z"),
            ("x-amz-security-token", "client-token"),
            ("x-amz-content-sha256", "UNSIGNED-PAYLOAD"),
            ("range", "bytes=0-9"),
            ("x-forwarded-for", "10.0.0.1"),
        ] {
            headers.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let uri: Uri = "http://127.0.0.1:9/rb/k%20k?versionId=1".parse().unwrap();
        let host = HeaderValue::from_static("s3.eu-west-1.amazonaws.com");
        sign_for_replica(&Method::GET, &uri, &mut headers, &host, "eu-west-1", &creds, SystemTime::now()).unwrap();
        let auth = headers[header::AUTHORIZATION].to_str().unwrap();
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDREPLICA/"), "{auth}");
        assert!(auth.contains("/eu-west-1/s3/aws4_request"), "{auth}");
        assert!(
            auth.contains("SignedHeaders=host;range;x-amz-content-sha256;x-amz-date;x-amz-security-token"),
            "{auth}"
        );
        assert_eq!(headers["x-amz-security-token"], "token");
        assert_ne!(headers["x-amz-date"], "20200101T000000Z");
        assert_eq!(
            headers["x-amz-content-sha256"], "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "the empty payload's hash"
        );
        assert_eq!(headers[header::HOST], "s3.eu-west-1.amazonaws.com");
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1", "unsigned headers still go");
        assert!(format!("{headers:?}").contains("Sensitive"), "the signature is marked sensitive");
    }
}
