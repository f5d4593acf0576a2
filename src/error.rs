//! Request errors and the one place that turns them into responses (README "Errors").

use http::{Response, StatusCode};

use crate::body::{ClientFault, RespBody};
use crate::route::Refusal;
use crate::table::Upstream;
use crate::upstream::{ExchangeError, LocalFault, SendError};

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Admission refused the request before any upstream saw it.
    #[error("{}", refusal_message(*.0))]
    Refused(Refusal),
    /// The request cannot be expressed as an upstream request.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// More header fields than `limits.max_headers`.
    #[error("too many header fields (limits.max_headers)")]
    TooManyHeaders,
    /// The request uses something mediaroute does not pass on.
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    /// The upstream gave no response head.
    #[error("{} {source}", upstream.as_str())]
    Upstream {
        /// Which upstream.
        upstream: Upstream,
        /// What went wrong.
        #[source]
        source: SendError,
    },
    /// The client went away or stopped sending: not an upstream failure.
    #[error(transparent)]
    Client(ClientFault),
    /// mediaroute itself failed (a task it depends on ended).
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// mediaroute reached one of its limits or the system's: try again shortly.
    #[error(transparent)]
    Local(LocalFault),
}

impl ProxyError {
    /// The error of an exchange with `upstream`, kept on the side it happened.
    pub fn exchange(upstream: Upstream, e: ExchangeError) -> ProxyError {
        match e {
            ExchangeError::Upstream(source) => ProxyError::Upstream { upstream, source },
            ExchangeError::Client(fault) => ProxyError::Client(fault),
            ExchangeError::Local(fault) => ProxyError::Local(fault),
        }
    }

    /// The status and S3 error code sent to the client.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::Refused(Refusal::ForeignBucket) => (StatusCode::FORBIDDEN, "AccessDenied"),
            ProxyError::Refused(_) | ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "InvalidRequest"),
            ProxyError::TooManyHeaders => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "RequestHeaderSectionTooLarge"),
            ProxyError::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "NotImplemented"),
            ProxyError::Upstream { source: SendError::Timeout(_) | SendError::Stalled(_), .. } => {
                (StatusCode::GATEWAY_TIMEOUT, "GatewayTimeout")
            }
            ProxyError::Upstream { .. } => (StatusCode::BAD_GATEWAY, "BadGateway"),
            ProxyError::Client(ClientFault::Stalled(_)) => (StatusCode::REQUEST_TIMEOUT, "RequestTimeout"),
            ProxyError::Client(ClientFault::Malformed) => (StatusCode::BAD_REQUEST, "InvalidRequest"),
            // Nobody reads this answer; 499 is what the access log records (nginx's convention).
            ProxyError::Client(ClientFault::Closed) => (CLIENT_CLOSED, "ClientClosed"),
            ProxyError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
            // S3's own answer to "too much at once".
            ProxyError::Local(_) => (StatusCode::SERVICE_UNAVAILABLE, "SlowDown"),
        }
    }

    /// The short S3-style XML error response for this error.
    pub fn to_response(&self, resource: &str) -> Response<RespBody> {
        let (status, code) = self.status_and_code();
        let message = match self {
            ProxyError::BadRequest(why) => (*why).to_string(),
            other => other.to_string(),
        };
        let mut resp = xml_error(status, code, &message, resource);
        if matches!(self, ProxyError::Local(_)) {
            resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// nginx's "client closed request": the client left before the response.
pub const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => StatusCode::BAD_REQUEST,
};

fn refusal_message(r: Refusal) -> &'static str {
    match r {
        Refusal::NotAPath => "the request target must be a path starting with /",
        Refusal::DotSegment => "the path must not contain . or .. segments",
        Refusal::ForeignBucket => "bucket is not served here",
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
        let r = ProxyError::Refused(Refusal::NotAPath).to_response("*");
        assert_eq!(r.status(), 400);
        let body = body_of(r).await;
        assert!(body.contains("<Code>InvalidRequest</Code>") && body.contains("must be a path"), "{body}");
        let r = ProxyError::Refused(Refusal::DotSegment).to_response("/b/../x");
        assert_eq!(r.status(), 400);
        let r = ProxyError::Client(ClientFault::Stalled(std::time::Duration::from_secs(1))).to_response("/b/k");
        assert_eq!(r.status(), 408);
        assert!(body_of(r).await.contains("<Code>RequestTimeout</Code>"));
        assert_eq!(ProxyError::Client(ClientFault::Closed).status_and_code().0.as_u16(), 499);
        let timeout = SendError::Timeout(std::time::Duration::from_secs(1));
        let r = ProxyError::Upstream { upstream: Upstream::Primary, source: timeout }.to_response("/b/k");
        assert_eq!(r.status(), 504);
        let r = ProxyError::Refused(Refusal::ForeignBucket).to_response("/other/<key>");
        assert_eq!(r.status(), 403);
        let body = body_of(r).await;
        assert!(body.contains("<Code>AccessDenied</Code>"), "{body}");
        assert!(body.contains("<Resource>/other/&lt;key&gt;</Resource>"), "{body}");
    }
}
