//! Request errors and the one place that turns them into responses.

use http::{Response, StatusCode};

use crate::body::RespBody;
use crate::table::Upstream;
use crate::upstream::SendError;

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request line or headers are not something we can route.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request names a bucket other than the configured one.
    #[error("bucket is not served here")]
    ForeignBucket,
    /// The upstream gave no response head.
    #[error("{} {source}", upstream.as_str())]
    Upstream {
        /// Which upstream.
        upstream: Upstream,
        /// What went wrong.
        #[source]
        source: SendError,
    },
}

impl ProxyError {
    /// The status and S3 error code sent to the client.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "InvalidRequest"),
            ProxyError::ForeignBucket => (StatusCode::FORBIDDEN, "AccessDenied"),
            ProxyError::Upstream { source: SendError::Timeout(_), .. } => {
                (StatusCode::GATEWAY_TIMEOUT, "GatewayTimeout")
            }
            ProxyError::Upstream { .. } => (StatusCode::BAD_GATEWAY, "BadGateway"),
        }
    }

    /// The short S3-style XML error response for this error.
    pub fn to_response(&self, resource: &str) -> Response<RespBody> {
        let (status, code) = self.status_and_code();
        let message = match self {
            ProxyError::BadRequest(why) => (*why).to_string(),
            other => other.to_string(),
        };
        xml_error(status, code, &message, resource)
    }
}

/// Builds an S3-style `<Error>` response.
pub fn xml_error(status: StatusCode, code: &str, message: &str, resource: &str) -> Response<RespBody> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code><Message>{}</Message><Resource>{}</Resource></Error>\n",
        escape(code),
        escape(message),
        escape(resource)
    );
    let mut resp = Response::new(RespBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/xml"));
    resp
}

/// An error and its causes on one line (hyper's top-level messages are terse).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Escapes text for XML element content.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_of(r: Response<RespBody>) -> String {
        let b = r.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn each_error_maps_to_its_status() {
        let r = ProxyError::BadRequest("path must start with /").to_response("*");
        assert_eq!(r.status(), 400);
        assert!(body_of(r).await.contains("<Code>InvalidRequest</Code>"));
        let r = ProxyError::ForeignBucket.to_response("/other/<key>");
        assert_eq!(r.status(), 403);
        let body = body_of(r).await;
        assert!(body.contains("<Code>AccessDenied</Code>"), "{body}");
        assert!(body.contains("<Resource>/other/&lt;key&gt;</Resource>"), "{body}");
    }
}
