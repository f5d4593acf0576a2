//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/config`. Never proxies.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::duration::format_duration;
use crate::proxy::Proxy;
use crate::table::Upstream;

/// Starts serving the admin endpoints on an already bound listener.
pub fn spawn(listener: TcpListener, proxy: Arc<Proxy>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let proxy = Arc::clone(&proxy);
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let proxy = Arc::clone(&proxy);
                    async move { Ok::<_, Infallible>(handle(&proxy, &req)) }
                });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    })
}

/// Binds the admin address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

fn handle(proxy: &Proxy, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, proxy.metrics().render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if proxy.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/config" => {
            let mut r = text(StatusCode::OK, config_view(proxy));
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics /healthz /readyz /config\n"),
    }
}

/// What is loaded, without secrets: the body of `/config`.
pub fn config_view(proxy: &Proxy) -> String {
    let t = proxy.tables().current();
    let loaded = t.loaded_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let upstream = |u: Upstream| {
        let target = t.target(u);
        serde_json::json!({
            "url": format!("{}://{}", target.scheme, target.authority),
            "bucket": target.bucket.as_deref(),
            "ca_file": target.ca_file.as_ref().map(|p| p.display().to_string()),
            "down": proxy.upstreams().health(u).is_down(),
        })
    };
    // The certificate, never its key (README "TLS").
    let tls = t.server_cert.as_ref().map(|c| {
        let expires = UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(c.not_after).unwrap_or(0));
        serde_json::json!({
            "cert_file": c.cert_file.display().to_string(),
            "subject": c.subject,
            "names": c.names,
            "not_after_unix": c.not_after,
            "not_after": httpdate::fmt_http_date(expires),
        })
    });
    let view = serde_json::json!({
        "generation": t.generation,
        "loaded_at_unix": loaded,
        "loaded_at": httpdate::fmt_http_date(t.loaded_at),
        "config_file": proxy.tables().path().display().to_string(),
        "users": t.user_count(),
        "networks": t.network_count,
        "default_mode": t.default_mode.as_str(),
        "delay": format_duration(t.delay),
        "fallback": t.fallback,
        "primary": upstream(Upstream::Primary),
        "replica": upstream(Upstream::Replica),
        "tls": tls,
    });
    format!("{view:#}\n")
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}
