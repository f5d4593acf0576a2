//! The request path: decide, rewrite, forward, fall back, stream back.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::access::AccessRecord;
use crate::age::{AgeCache, Probe, parse_last_modified};
use crate::body::{ReqBody, RespBody};
use crate::client;
use crate::config::Config;
use crate::error::{ProxyError, error_chain};
use crate::headers::{X_MEDIAROUTE_REASON, X_MEDIAROUTE_UPSTREAM, append_forwarded_for, remove_hop_by_hop};
use crate::metrics::Metrics;
use crate::reload::Tables;
use crate::route::{self, Age, Reason, RequestFacts};
use crate::table::{RoutingTable, Upstream};
use crate::upstream::Upstreams;

/// Shared state of the proxy service.
#[derive(Debug)]
pub struct Proxy {
    tables: Arc<Tables>,
    upstreams: Arc<Upstreams>,
    ages: AgeCache,
    probe_timeout: Duration,
    metrics: Arc<Metrics>,
    ready: AtomicBool,
}

/// A request head ready to be sent to either upstream, borrowing the client's URI.
struct Outgoing<'a> {
    method: Method,
    headers: HeaderMap,
    /// The object path as the client sent it (primary bucket).
    path: &'a str,
    /// The query without the user parameter.
    query: Option<Cow<'a, str>>,
}

impl Proxy {
    /// Creates the service state.
    pub fn new(cfg: &Config, tables: Arc<Tables>, metrics: Arc<Metrics>) -> Proxy {
        Proxy {
            tables,
            upstreams: Arc::new(Upstreams::new(cfg, &metrics)),
            ages: AgeCache::new(cfg.limits.age_cache_entries),
            probe_timeout: cfg.limits.age_probe_timeout,
            metrics,
            ready: AtomicBool::new(false),
        }
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether the config is loaded, the listeners are up, and no shutdown has begun.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Marks the proxy ready (listening) or not (stopping).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The routing table holder.
    pub fn tables(&self) -> &Arc<Tables> {
        &self.tables
    }

    /// The upstream clients and health.
    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.upstreams
    }

    /// The object-age cache.
    pub fn ages(&self) -> &AgeCache {
        &self.ages
    }

    /// Serves one request from `peer`; never fails (errors become S3-style responses).
    pub async fn serve(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<RespBody> {
        let table = self.tables.current();
        let (mut parts, body) = req.into_parts();
        let mut rec = Box::new(AccessRecord {
            start: Instant::now(),
            user: None,
            client: peer.ip().to_canonical(),
            method: parts.method.clone(),
            path: Box::from(parts.uri.path()),
            status: 0,
            upstream: None,
            reason: None,
            bytes: 0,
            complete: false,
            upstream_error: false,
            metrics: Some(Arc::clone(&self.metrics)),
        });
        let resp = match self.forward(&table, &mut parts, body, peer, &mut rec).await {
            Ok(resp) => resp,
            Err(e) => {
                let mut resp = e.to_response(&rec.path);
                match &e {
                    ProxyError::Upstream { upstream, .. } => {
                        tracing::warn!(error = %error_chain(&e), path = &*rec.path, "upstream request failed");
                        rec.upstream = Some(*upstream);
                        label(resp.headers_mut(), *upstream, rec.reason);
                    }
                    _ => tracing::debug!(error = %e, "request refused"),
                }
                resp
            }
        };
        rec.status = resp.status().as_u16();
        resp.map(|b| b.with_record(rec))
    }

    async fn forward(
        &self,
        table: &RoutingTable,
        parts: &mut Parts,
        body: Incoming,
        peer: SocketAddr,
        rec: &mut AccessRecord,
    ) -> Result<Response<RespBody>, ProxyError> {
        if parts.method == Method::CONNECT || !parts.uri.path().starts_with('/') {
            return Err(ProxyError::BadRequest("the request target must be a path starting with /"));
        }
        if has_dot_segment(parts.uri.path()) {
            // An upstream that normalises paths would let `/bucket/../other` escape the bucket.
            return Err(ProxyError::BadRequest("the path must not contain . or .. segments"));
        }
        let query = parts.uri.query();
        let ctx = client::context(table, peer.ip(), &parts.headers, query);
        rec.client = ctx.ip;
        if let Err(refused) = check_bucket(table, parts.uri.path()) {
            rec.user = ctx.user;
            return Err(refused);
        }

        let read = parts.method == Method::GET || parts.method == Method::HEAD;
        let facts = RequestFacts {
            read,
            object: route::is_object(parts.uri.path(), query),
            replica_down: self.upstreams.health(Upstream::Replica).is_down(),
        };
        let mut out = outgoing(table, &parts.method, &parts.uri, &mut parts.headers, peer);
        let age =
            if route::needs_age(table, &ctx, &facts) { self.probe_age(table, &out).await } else { Age::NotProbed };
        let (upstream, reason) = route::decide(table, &ctx, &facts, age);
        rec.user = ctx.user;
        rec.upstream = Some(upstream);
        rec.reason = Some(reason);

        let body = if read { ReqBody::Empty } else { ReqBody::Stream(body) };
        if upstream == Upstream::Replica {
            // Keep a copy of the head only if the primary may still need it.
            let headers = if table.fallback { out.headers.clone() } else { std::mem::take(&mut out.headers) };
            let req = build_request(table, Upstream::Replica, out.method.clone(), &out, headers, ReqBody::Empty)?;
            match self.upstreams.send(Upstream::Replica, req).await {
                Ok(resp) if !table.fallback || !replica_missed(resp.status()) => {
                    return Ok(to_client(resp, Upstream::Replica, reason));
                }
                Ok(resp) => {
                    tracing::debug!(path = out.path, status = resp.status().as_u16(), "replica missed; falling back");
                    drain_small(resp).await;
                }
                Err(e) if !table.fallback => {
                    return Err(ProxyError::Upstream { upstream: Upstream::Replica, source: e });
                }
                Err(e) => tracing::debug!(path = out.path, error = %error_chain(&e), "replica failed; falling back"),
            }
            rec.upstream = Some(Upstream::Primary);
            rec.reason = Some(Reason::Fallback);
            let headers = std::mem::take(&mut out.headers);
            let req = build_request(table, Upstream::Primary, out.method.clone(), &out, headers, ReqBody::Empty)?;
            return self.send_primary(req, Reason::Fallback).await;
        }
        let headers = std::mem::take(&mut out.headers);
        let req = build_request(table, Upstream::Primary, out.method.clone(), &out, headers, body)?;
        self.send_primary(req, reason).await
    }

    async fn send_primary(&self, req: Request<ReqBody>, reason: Reason) -> Result<Response<RespBody>, ProxyError> {
        match self.upstreams.send(Upstream::Primary, req).await {
            Ok(resp) => Ok(to_client(resp, Upstream::Primary, reason)),
            Err(source) => Err(ProxyError::Upstream { upstream: Upstream::Primary, source }),
        }
    }

    /// Learns the object's age from a `HEAD` to the primary, through the cache.
    async fn probe_age(&self, table: &RoutingTable, out: &Outgoing<'_>) -> Age {
        self.ages
            .age(out.path, table.delay, || async {
                let mut headers = out.headers.clone();
                for h in [
                    header::RANGE,
                    header::IF_MATCH,
                    header::IF_NONE_MATCH,
                    header::IF_MODIFIED_SINCE,
                    header::IF_UNMODIFIED_SINCE,
                ] {
                    headers.remove(h);
                }
                let Ok(req) = build_request(table, Upstream::Primary, Method::HEAD, out, headers, ReqBody::Empty)
                else {
                    return Probe::Failed;
                };
                let sent = tokio::time::timeout(self.probe_timeout, self.upstreams.client().request(req)).await;
                match sent {
                    Ok(Ok(resp)) if resp.status().is_success() => resp
                        .headers()
                        .get(header::LAST_MODIFIED)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_last_modified)
                        .map_or(Probe::Failed, Probe::Modified),
                    Ok(Ok(resp)) if resp.status() == StatusCode::NOT_FOUND => Probe::Missing,
                    Ok(Ok(resp)) => {
                        tracing::debug!(status = resp.status().as_u16(), "age probe refused");
                        Probe::Failed
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %error_chain(&e), "age probe failed");
                        Probe::Failed
                    }
                    Err(_) => {
                        tracing::debug!("age probe timed out");
                        Probe::Failed
                    }
                }
            })
            .await
    }
}

/// With bucket mapping, only the primary bucket may be addressed.
fn check_bucket(table: &RoutingTable, path: &str) -> Result<(), ProxyError> {
    let Some(bucket) = table.primary.bucket.as_deref() else {
        return Ok(());
    };
    let first = path.strip_prefix('/').unwrap_or(path).split('/').next().unwrap_or("");
    if first == bucket { Ok(()) } else { Err(ProxyError::ForeignBucket) }
}

/// Reads a small error body to its end so the upstream connection can be reused.
async fn drain_small(resp: Response<Incoming>) {
    const SMALL: u64 = 64 * 1024;
    let len = resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if len.is_some_and(|n| n <= SMALL) {
        let body = http_body_util::Limited::new(resp.into_body(), SMALL as usize);
        let _ = tokio::time::timeout(Duration::from_millis(500), body.collect()).await;
    }
}

/// Whether any path segment is `.` or `..`, literally or percent-encoded.
fn has_dot_segment(path: &str) -> bool {
    path.split('/')
        .any(|seg| [".", "..", "%2e", "%2e%2e", ".%2e", "%2e."].iter().any(|dot| seg.eq_ignore_ascii_case(dot)))
}

/// The statuses that mean "the replica does not have it (yet)" or "the replica is broken".
fn replica_missed(status: StatusCode) -> bool {
    status == StatusCode::NOT_FOUND || status == StatusCode::FORBIDDEN || status.is_server_error()
}

/// Strips identity and hop-by-hop headers and keeps what both upstreams get.
fn outgoing<'a>(
    table: &RoutingTable,
    method: &Method,
    uri: &'a Uri,
    client_headers: &mut HeaderMap,
    peer: SocketAddr,
) -> Outgoing<'a> {
    let query = client::strip_identity(table, client_headers, uri.query());
    let mut headers = std::mem::take(client_headers);
    remove_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    // hyper answers `100-continue` itself when the body is first read.
    headers.remove(header::EXPECT);
    append_forwarded_for(&mut headers, peer.ip().to_canonical());
    if method == Method::GET || method == Method::HEAD {
        // GET/HEAD go out without a body so they can be retried on the primary.
        headers.remove(header::CONTENT_LENGTH);
    }
    Outgoing { method: method.clone(), headers, path: uri.path(), query }
}

/// Builds the request for one upstream: its scheme, host and bucket, `out`'s path and query.
fn build_request(
    table: &RoutingTable,
    to: Upstream,
    method: Method,
    out: &Outgoing<'_>,
    headers: HeaderMap,
    body: ReqBody,
) -> Result<Request<ReqBody>, ProxyError> {
    let target = table.target(to);
    let mut pq = String::with_capacity(out.path.len() + out.query.as_deref().map_or(0, |q| q.len() + 1) + 16);
    match (to, table.primary.bucket.as_deref(), target.bucket.as_deref()) {
        (Upstream::Replica, Some(from), Some(to_bucket)) => {
            let rest = out.path.strip_prefix('/').and_then(|p| p.strip_prefix(from)).unwrap_or("");
            pq.push('/');
            pq.push_str(to_bucket);
            pq.push_str(rest);
        }
        _ => pq.push_str(out.path),
    }
    if let Some(q) = &out.query {
        pq.push('?');
        pq.push_str(q);
    }
    let uri = Uri::builder()
        .scheme(target.scheme.clone())
        .authority(target.authority.clone())
        .path_and_query(pq)
        .build()
        .map_err(|_| ProxyError::BadRequest("the request path cannot be forwarded"))?;
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Ok(req)
}

/// The upstream's response, cleaned of hop-by-hop headers and labelled.
fn to_client(resp: Response<Incoming>, upstream: Upstream, reason: Reason) -> Response<RespBody> {
    let (mut parts, body) = resp.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    label(&mut parts.headers, upstream, Some(reason));
    Response::from_parts(parts, RespBody::upstream(body))
}

/// Adds `X-Mediaroute-Upstream` and, when known, `X-Mediaroute-Reason`.
fn label(headers: &mut HeaderMap, upstream: Upstream, reason: Option<Reason>) {
    headers.insert(X_MEDIAROUTE_UPSTREAM.clone(), HeaderValue::from_static(upstream.as_str()));
    if let Some(r) = reason {
        headers.insert(X_MEDIAROUTE_REASON.clone(), HeaderValue::from_static(r.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_found_in_any_spelling() {
        for p in ["/b/../x", "/b/./x", "/b/%2e%2E/x", "/b/.%2e/x", "/b/%2E", "/.."] {
            assert!(has_dot_segment(p), "{p}");
        }
        for p in ["/b/x", "/b/..x", "/b/x.mov", "/b/.hidden", "/b/%2e%2ex"] {
            assert!(!has_dot_segment(p), "{p}");
        }
    }
}
