//! The request path: admit, decide, rewrite, forward, fall back, stream back.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::access::AccessRecord;
use arc_swap::ArcSwapOption;

use crate::body::{ClientFault, ReqBody, RespBody, drain_write};
use crate::client;
use crate::config::Config;
use crate::error::ProxyError;
use crate::headers::{
    X_MEDIAROUTE_REASON, X_MEDIAROUTE_UPSTREAM, append_forwarded_for, fold_content_length, own_forwarding_headers,
    remove_hop_by_hop,
};
use crate::idle::Activity;
use crate::metrics::{FallbackCause, Metrics, ProbeResult};
use crate::probe::presigned::Presigned;
use crate::probe::{self, FactsCache, Learned, ObjectKey, Writing, Written};
use crate::route::{self, Probed, Reason, RequestFacts};
use crate::sign::{self, SignError, credentials::Keys};
use crate::table::{RoutingTable, Tables, Upstream};
use crate::upstream::{Exchange, ExchangeError, LocalFault, SendError, Upstreams, error_chain};

/// Shared state of the proxy service.
#[derive(Debug)]
pub struct Proxy {
    tables: Arc<Tables>,
    /// One permit per request in flight, held until its response body ends.
    in_flight: Arc<Semaphore>,
    /// Most header fields in a request (hyper counts them for HTTP/1.1 only).
    max_headers: usize,
    upstreams: Arc<Upstreams>,
    facts: Arc<FactsCache>,
    /// Presigned URLs the primary allowed, until they expire (README "The primary probe").
    presigned: Presigned,
    /// mediaroute's own credentials, once the replica is signed (README "Authentication").
    keys: ArcSwapOption<Keys>,
    probe_timeout: Duration,
    idle_timeout: Duration,
    metrics: Arc<Metrics>,
    ready: AtomicBool,
}

/// Where routing sent a request, before anything was sent.
struct Routed<'a> {
    out: Outgoing<'a>,
    reason: Reason,
    /// The replica's request (signed if the replica is), when a download goes there first.
    replica: Option<Request<ReqBody>>,
    kind: Kind,
}

/// A download, or a request with a body for the primary.
enum Kind {
    Read,
    /// `written` is what the request may change.
    Write {
        written: Option<Written>,
    },
}

/// A lean-path answer, with what must live until its body has been sent: its access
/// record (logged when dropped) and its place among the requests in flight.
#[derive(Debug)]
pub struct LeanAnswer<B> {
    /// The response head and body.
    pub resp: Response<Answer<B>>,
    /// The request's access record: the sender fills in how the body went.
    pub record: Box<AccessRecord>,
    /// The request's place among those in flight (`limits.max_requests`).
    pub slot: Option<OwnedSemaphorePermit>,
}

/// The body of a lean-path answer.
#[derive(Debug)]
pub enum Answer<B> {
    /// An upstream's body, to be streamed.
    Upstream(B),
    /// A small answer made here (errors).
    Own(RespBody),
}

/// A request head ready to be sent to either upstream, borrowing the client's URI.
struct Outgoing<'a> {
    method: Method,
    headers: HeaderMap,
    /// The object path as the client sent it (primary bucket).
    path: &'a str,
    /// The query without the user parameter.
    query: Option<Cow<'a, str>>,
    /// The client's `Host` (or HTTP/2 `:authority`), for `preserve_host`.
    host: Option<HeaderValue>,
}

impl Proxy {
    /// Creates the service state.
    pub fn new(cfg: &Config, tables: Arc<Tables>, metrics: Arc<Metrics>, keys: Option<Arc<Keys>>) -> Proxy {
        Proxy {
            upstreams: Arc::new(Upstreams::new(cfg, &metrics, Arc::clone(&tables))),
            tables,
            in_flight: Arc::new(Semaphore::new(cfg.limits.max_requests as usize)),
            max_headers: cfg.limits.max_headers as usize,
            facts: Arc::new(FactsCache::new(cfg.limits.age_cache_entries, Arc::clone(&metrics))),
            presigned: Presigned::new(cfg.limits.age_cache_entries),
            keys: ArcSwapOption::new(keys),
            probe_timeout: cfg.limits.age_probe_timeout,
            idle_timeout: cfg.limits.idle_timeout,
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

    /// The object-facts cache.
    pub fn facts(&self) -> &FactsCache {
        &self.facts
    }

    /// mediaroute's own credentials, if the replica is signed.
    pub fn keys(&self) -> Option<Arc<Keys>> {
        self.keys.load_full()
    }

    /// Sets the credentials used from now on (a reload that turned signing on).
    pub fn set_keys(&self, keys: Arc<Keys>) {
        self.keys.store(Some(keys));
    }

    /// Serves one request from `peer` on the client connection whose activity is
    /// `connection`; never fails (errors become S3-style responses).
    ///
    /// The access record is made at the call, not at the first poll: a request whose
    /// client leaves before the future first runs is still logged, as a 499 (README
    /// "Access log").
    pub fn serve(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        connection: Option<Arc<Activity>>,
    ) -> impl Future<Output = Response<RespBody>> + Send + use<> {
        let (parts, body) = req.into_parts();
        let rec = self.record(&parts, peer);
        let this = Arc::clone(self);
        async move { this.serve_recorded(parts, body, rec, peer, connection).await }
    }

    async fn serve_recorded(
        &self,
        mut parts: Parts,
        body: Incoming,
        mut rec: Box<AccessRecord>,
        peer: SocketAddr,
        connection: Option<Arc<Activity>>,
    ) -> Response<RespBody> {
        let table = self.tables.current();
        let stream = parts.version == http::Version::HTTP_2;
        let mut slot = match self.request_slot(&mut rec) {
            Ok(slot) => Some(slot),
            Err(refused) => return refused.map(|b| b.with_record(rec)),
        };
        let resp = match self.forward(&table, &mut parts, body, peer, &mut rec, &mut slot).await {
            Ok(resp) => {
                // An upstream's answer: how its body ends tells that upstream's health.
                rec.health = Some(Arc::clone(self.upstreams.health_board()));
                // HTTP/2 streams share a connection: one that stalls is not the connection's
                // idleness, so each gets a watchdog of its own.
                if stream { resp.map(|b| b.watch_stream(self.idle_timeout)) } else { resp }
            }
            Err(e) => self.failed(e, &mut rec),
        };
        rec.status = resp.status().as_u16();
        let resp = resp.map(|b| b.on_connection(connection));
        // A write's task holds its slot until the primary has answered, client or not.
        let resp = match slot {
            Some(slot) => resp.map(|b| b.holding_slot(slot)),
            None => resp,
        };
        resp.map(|b| b.with_record(rec))
    }

    /// Serves one download that arrived on the lean path (README "The lean download
    /// path"): the same admission, routing, probe, signing and fallback as
    /// [`Proxy::serve`], sent through `via`. The caller sends the answer, then drops its
    /// record (the access log line) and its slot.
    pub async fn serve_lean<E: Exchange>(&self, via: &E, mut parts: Parts, peer: SocketAddr) -> LeanAnswer<E::Body> {
        let table = self.tables.current();
        let mut rec = self.record(&parts, peer);
        let slot = match self.request_slot(&mut rec) {
            Ok(slot) => slot,
            Err(refused) => return LeanAnswer { resp: refused.map(Answer::Own), record: rec, slot: None },
        };
        let answered = match self.route(&table, &mut parts, peer, &mut rec).await {
            Ok(Routed { out, reason, replica, kind: Kind::Read }) => {
                self.read(via, &table, out, replica, reason, &mut rec).await
            }
            Ok(Routed { kind: Kind::Write { .. }, .. }) => {
                Err(ProxyError::Internal("the lean path took a request that is not a download"))
            }
            Err(e) => Err(e),
        };
        let resp = match answered {
            Ok(resp) => {
                rec.health = Some(Arc::clone(self.upstreams.health_board()));
                resp.map(Answer::Upstream)
            }
            Err(e) => self.failed(e, &mut rec).map(Answer::Own),
        };
        rec.status = resp.status().as_u16();
        LeanAnswer { resp, record: rec, slot: Some(slot) }
    }

    /// The access record of a request that has just arrived; dropped before a status is
    /// decided (the client went away first), it logs a 499.
    fn record(&self, parts: &Parts, peer: SocketAddr) -> Box<AccessRecord> {
        Box::new(AccessRecord {
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
            upstream_stalled: false,
            client_closed: false,
            metrics: Some(Arc::clone(&self.metrics)),
            health: None,
        })
    }

    /// A place among the requests in flight (`limits.max_requests`), or the 503 that says
    /// there is none. HTTP/2 multiplies requests per connection: they are limited on their own.
    fn request_slot(&self, rec: &mut AccessRecord) -> Result<OwnedSemaphorePermit, Box<Response<RespBody>>> {
        Arc::clone(&self.in_flight).try_acquire_owned().map_err(|_| {
            let e = ProxyError::Local(LocalFault::TooManyRequests);
            static REFUSED: crate::throttle::Every = crate::throttle::Every::new(Duration::from_secs(10));
            if let Some(held) = REFUSED.allow() {
                tracing::warn!(error = %e, also_refused_since_last_warning = held, "request refused");
            }
            rec.status = e.status_and_code().0.as_u16();
            Box::new(e.to_response(&rec.path))
        })
    }

    /// The answer to a request that failed, logged by who failed and labelled.
    fn failed(&self, e: ProxyError, rec: &mut AccessRecord) -> Response<RespBody> {
        let mut resp = e.to_response(&rec.path);
        match &e {
            ProxyError::Upstream { upstream, .. } => {
                tracing::warn!(error = %error_chain(&e), path = &*rec.path, "upstream request failed");
                rec.upstream = Some(*upstream);
                label(resp.headers_mut(), *upstream, rec.reason);
            }
            ProxyError::Client(fault) => {
                // The client's doing: no alert-worthy log line, no health failure.
                tracing::debug!(error = %e, path = &*rec.path, "client side of the request failed");
                if *fault == ClientFault::Closed {
                    // Nobody is there to read a body.
                    rec.client_closed = true;
                    *resp.body_mut() = RespBody::empty();
                }
                if let Some(u) = rec.upstream {
                    label(resp.headers_mut(), u, rec.reason);
                }
            }
            ProxyError::Internal(_) => tracing::error!(error = %e, path = &*rec.path, "request failed"),
            ProxyError::Local(_) => {
                // Logged where it happened. The request reached no upstream: it is
                // counted against none of them.
                rec.upstream = None;
            }
            ProxyError::Refused(_)
            | ProxyError::BadRequest(_)
            | ProxyError::TooManyHeaders
            | ProxyError::NotImplemented(_) => {
                tracing::debug!(error = %e, "request refused")
            }
        }
        resp
    }

    async fn forward(
        &self,
        table: &RoutingTable,
        parts: &mut Parts,
        body: Incoming,
        peer: SocketAddr,
        rec: &mut AccessRecord,
        slot: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<Response<RespBody>, ProxyError> {
        match self.route(table, parts, peer, rec).await? {
            Routed { out, reason, replica, kind: Kind::Read } => {
                let resp = self.read(&*self.upstreams, table, out, replica, reason, rec).await?;
                Ok(resp.map(RespBody::upstream))
            }
            Routed { mut out, reason, kind: Kind::Write { written }, .. } => {
                let headers = std::mem::take(&mut out.headers);
                let req =
                    build_request(table, Upstream::Primary, out.method.clone(), &out, headers, ReqBody::stream(body))?;
                self.write(req, reason, written.map(|w| self.facts.begin_write(w)), slot.take()).await
            }
        }
    }

    /// Admits a request and decides where it goes (probing the primary if the rules need
    /// it), with its head rewritten for the upstreams and, for the replica, signed.
    async fn route<'a>(
        &self,
        table: &RoutingTable,
        parts: &'a mut Parts,
        peer: SocketAddr,
        rec: &mut AccessRecord,
    ) -> Result<Routed<'a>, ProxyError> {
        check_head(parts, self.max_headers)?;
        let Parts { method, uri, headers, extensions, .. } = parts;
        let uri: &'a Uri = uri;
        let query = uri.query();
        let ctx = client::context(table, peer.ip(), headers, query);
        rec.client = ctx.ip;
        let admitted = match route::admit(table, *method == Method::CONNECT, uri.path(), query) {
            Ok(a) => a,
            Err(refusal) => {
                rec.user = ctx.user;
                return Err(ProxyError::Refused(refusal));
            }
        };

        if fold_content_length(headers).is_err() {
            // Two lengths for one body: which one frames it is exactly what smuggling exploits.
            return Err(ProxyError::BadRequest("the request has conflicting Content-Length headers"));
        }
        let read = *method == Method::GET || *method == Method::HEAD;
        let facts = RequestFacts {
            read,
            object: admitted.object,
            replica_down: self.upstreams.health(Upstream::Replica).is_down(),
        };
        let proto = if extensions.get::<OverTls>().is_some() { "https" } else { "http" };
        let mut out = outgoing(table, method, uri, headers, peer, proto);
        let probed = if route::needs_probe(table, &ctx, &facts) {
            self.probe(table, &out, ObjectKey::new(uri.path(), query)).await
        } else {
            Probed::NotProbed
        };
        let (mut upstream, mut reason) = route::decide(table, &ctx, &facts, probed);
        let mut replica = None;
        if upstream == Upstream::Replica {
            // Keep a copy of the head only if the primary may still need it.
            let keep = table.fallback || table.signs_replica();
            let headers = if keep { out.headers.clone() } else { std::mem::take(&mut out.headers) };
            match self.replica_request(table, &out, headers) {
                Ok(req) => replica = Some(req),
                Err(e) => {
                    static UNSIGNED: crate::throttle::Every = crate::throttle::Every::new(Duration::from_secs(10));
                    if let Some(held) = UNSIGNED.allow() {
                        tracing::warn!(error = %e, also_since_last_warning = held, "cannot sign for the replica; serving from the primary");
                    }
                    (upstream, reason) = (Upstream::Primary, Reason::ReplicaDown);
                }
            }
        }
        rec.user = ctx.user;
        rec.upstream = Some(upstream);
        rec.reason = Some(reason);
        if read {
            return Ok(Routed { out, reason, replica, kind: Kind::Read });
        }
        let written = if admitted.key {
            Some(Written::Key(out.path.into()))
        } else if names_multi_delete(query) {
            Some(Written::Any)
        } else {
            None
        };
        Ok(Routed { out, reason, replica, kind: Kind::Write { written } })
    }

    /// Sends a download where it was routed: to the replica first when it was routed
    /// there, falling back to the primary on a miss or a failure when `fallback` allows
    /// (README "Fallback"); otherwise to the primary.
    async fn read<E: Exchange>(
        &self,
        via: &E,
        table: &RoutingTable,
        out: Outgoing<'_>,
        replica: Option<Request<ReqBody>>,
        reason: Reason,
        rec: &mut AccessRecord,
    ) -> Result<Response<E::Body>, ProxyError> {
        let Some(req) = replica else { return self.primary(via, table, out, reason).await };
        let cause = match via.send(Upstream::Replica, req).await {
            Ok(resp) => match replica_missed(resp.status()).filter(|_| table.fallback) {
                None => return Ok(to_client(resp, Upstream::Replica, reason)),
                Some(cause) => {
                    tracing::debug!(path = out.path, status = resp.status().as_u16(), "replica missed; falling back");
                    if cause.is_miss() {
                        // A well-formed "not here" is a healthy replica.
                        self.upstreams.health(Upstream::Replica).success();
                    }
                    if cause == FallbackCause::Denied && table.signs_replica() {
                        // mediaroute's own key lacks rights: say so, not only fall back
                        // (README "Authentication").
                        static REFUSED: crate::throttle::Every = crate::throttle::Every::new(Duration::from_secs(10));
                        if let Some(held) = REFUSED.allow() {
                            tracing::warn!(
                                path = out.path,
                                also_since_last_warning = held,
                                "the replica refused mediaroute's own credentials (403): give them s3:GetObject \
                                 and s3:ListBucket on the replica bucket"
                            );
                        }
                    }
                    via.discard(resp).await;
                    cause
                }
            },
            Err(ExchangeError::Upstream(e)) if table.fallback => {
                tracing::debug!(path = out.path, error = %error_chain(&e), "replica failed; falling back");
                failure_cause(&e)
            }
            Err(e) => return Err(ProxyError::exchange(Upstream::Replica, e)),
        };
        self.metrics.fallback(cause);
        rec.upstream = Some(Upstream::Primary);
        rec.reason = Some(Reason::Fallback);
        self.primary(via, table, out, Reason::Fallback).await
    }

    /// Sends a download to the primary.
    async fn primary<E: Exchange>(
        &self,
        via: &E,
        table: &RoutingTable,
        mut out: Outgoing<'_>,
        reason: Reason,
    ) -> Result<Response<E::Body>, ProxyError> {
        let headers = std::mem::take(&mut out.headers);
        let req = build_request(table, Upstream::Primary, out.method.clone(), &out, headers, ReqBody::Empty)?;
        match via.send(Upstream::Primary, req).await {
            Ok(resp) => Ok(to_client(resp, Upstream::Primary, reason)),
            Err(e) => Err(ProxyError::exchange(Upstream::Primary, e)),
        }
    }

    /// Sends a write to the primary. The exchange runs in a task of its own, and the
    /// write's mark in the age cache is held until the primary's answer has ended, even
    /// when the client has gone by then (the primary may still commit the write).
    async fn write(
        &self,
        req: Request<ReqBody>,
        reason: Reason,
        writing: Option<Writing>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<Response<RespBody>, ProxyError> {
        let upstreams = Arc::clone(&self.upstreams);
        let idle = self.idle_timeout;
        let path = Box::<str>::from(req.uri().path());
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            // The task counts among the requests in flight until it ends (limits.max_requests).
            let slot = slot;
            match upstreams.send(Upstream::Primary, req).await {
                Ok(resp) => {
                    if let Err(Ok((resp, writing, _slot))) = answer_tx.send(Ok((resp, writing, slot))) {
                        tracing::debug!(
                            path = &*path,
                            status = resp.status().as_u16(),
                            "a write was answered after its client left"
                        );
                        if let Some(w) = writing {
                            drain_write(resp.into_body(), idle, w).await;
                        }
                    }
                }
                Err(e) => {
                    if let Err(Err(ExchangeError::Upstream(e))) = answer_tx.send(Err(e)) {
                        // Nobody else will say it: the client has gone.
                        tracing::warn!(error = %error_chain(&e), path = &*path, "upstream request failed after its client left");
                    }
                }
            }
        });
        match answer_rx.await {
            Ok(Ok((resp, writing, slot))) => {
                let mut resp = to_client(resp, Upstream::Primary, reason).map(RespBody::upstream);
                if let Some(w) = writing {
                    resp = resp.map(|b| b.holding(w, idle));
                }
                if let Some(s) = slot {
                    resp = resp.map(|b| b.holding_slot(s));
                }
                Ok(resp)
            }
            Ok(Err(e)) => Err(ProxyError::exchange(Upstream::Primary, e)),
            Err(_) => Err(ProxyError::Internal("the write task ended unexpectedly")),
        }
    }

    /// The replica's request: mapped bucket, and with `replica.auth = "sigv4"` the client's
    /// credentials replaced by mediaroute's signature (README "Authentication").
    fn replica_request(
        &self,
        table: &RoutingTable,
        out: &Outgoing<'_>,
        headers: HeaderMap,
    ) -> Result<Request<ReqBody>, SignError> {
        let unbuildable = |_| SignError::Unsignable("the request path cannot be forwarded".to_string());
        let mut req = build_request(table, Upstream::Replica, out.method.clone(), out, headers, ReqBody::Empty)
            .map_err(unbuildable)?;
        let Some(signing) = &table.signing else { return Ok(req) };
        let creds = self.keys().and_then(|k| k.current()).ok_or(SignError::NoCredentials)?;
        let host = signing.host.as_ref().ok_or(SignError::Unsignable("replica.signing_host".to_string()))?;
        let target = sign::replica_target(req.uri().path(), req.uri().query());
        let uri = Uri::builder()
            .scheme(table.replica.scheme.clone())
            .authority(table.replica.authority.clone())
            .path_and_query(target)
            .build()
            .map_err(|_| SignError::Unsignable("the request path cannot be forwarded".to_string()))?;
        let (mut parts, body) = req.into_parts();
        sign::sign_for_replica(
            &parts.method,
            &uri,
            &mut parts.headers,
            host,
            &signing.region,
            &creds,
            SystemTime::now(),
        )?;
        parts.uri = uri;
        req = Request::from_parts(parts, body);
        Ok(req)
    }

    /// What the primary probe says of this request and its object (README "The primary
    /// probe"). With a signed replica every request has its own probe, but for a presigned
    /// URL the primary already allowed; otherwise probes are shared and their facts cached.
    async fn probe(&self, table: &RoutingTable, out: &Outgoing<'_>, key: ObjectKey<'_>) -> Probed {
        let run = || self.probe_once(table, out);
        let learned = if table.signs_replica() {
            // Only a presigned URL can be remembered: other requests build no target.
            let presigned = out.query.as_deref().filter(|q| q.contains("X-Amz-Signature="));
            let target = presigned.map(|q| format!("{}?{q}", out.path));
            let now = SystemTime::now();
            let remembered = target
                .as_deref()
                .filter(|t| self.presigned.allowed(&out.method, t, now))
                .and_then(|_| self.facts.cached(key, table.delay));
            match remembered {
                Some(known) => known,
                None => {
                    let learned = self.facts.own(key, run).await;
                    if let (Learned::Found { .. }, Some(target)) = (learned, &target) {
                        let authorized = out.headers.contains_key(header::AUTHORIZATION);
                        self.presigned.remember(&out.method, target, presigned, authorized, now);
                    }
                    learned
                }
            }
        } else {
            self.facts.shared(key, table.delay, run).await
        };
        learned.at(SystemTime::now())
    }

    /// Sends one probe: the client's request to the primary with its own credentials.
    async fn probe_once(&self, table: &RoutingTable, out: &Outgoing<'_>) -> Learned {
        let headers = probe::probe_headers(&out.method, &out.headers, out.query.as_deref());
        let Ok(req) = build_request(table, Upstream::Primary, out.method.clone(), out, headers, ReqBody::Empty) else {
            return Learned::Failed;
        };
        let sent = tokio::time::timeout(self.probe_timeout, self.upstreams.send_raw(req)).await;
        let (learned, result) = match sent {
            Ok(Ok(resp)) => {
                let answer = probe::read_answer(resp.status(), resp.headers());
                if answer.1 != ProbeResult::Ok {
                    tracing::debug!(status = resp.status().as_u16(), "probe: no read allowed");
                }
                // The byte asked for, read so that the connection can be used again.
                tokio::spawn(crate::upstream::drain_small(resp));
                answer
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %error_chain(&e), "probe failed");
                (Learned::Failed, ProbeResult::Error)
            }
            Err(_) => {
                tracing::debug!("probe timed out");
                (Learned::Failed, ProbeResult::Timeout)
            }
        };
        self.metrics.probe(result);
        learned
    }
}

/// Checks what hyper leaves to us in a request head: the field count over HTTP/2, `Host`
/// in HTTP/1.1 (RFC 9112 section 3.2), and transfer codings other than chunked, which
/// mediaroute cannot pass on (RFC 9112 section 6.1).
fn check_head(parts: &Parts, max_headers: usize) -> Result<(), ProxyError> {
    if parts.headers.len() > max_headers {
        return Err(ProxyError::TooManyHeaders);
    }
    if parts.version == http::Version::HTTP_11 && !parts.headers.contains_key(header::HOST) {
        return Err(ProxyError::BadRequest("an HTTP/1.1 request needs a Host header"));
    }
    if crate::upstream::has_other_coding(&parts.headers) {
        return Err(ProxyError::NotImplemented("transfer codings other than chunked"));
    }
    Ok(())
}

/// Whether a query is S3's multi-object delete (`POST /bucket?delete`).
fn names_multi_delete(query: Option<&str>) -> bool {
    query.is_some_and(|q| q.split('&').any(|pair| pair == "delete" || pair.starts_with("delete=")))
}

/// The replica answers that send a download to the primary: "the replica does not have
/// it (yet)" or "the replica is broken".
fn replica_missed(status: StatusCode) -> Option<FallbackCause> {
    match status {
        StatusCode::NOT_FOUND => Some(FallbackCause::NotFound),
        StatusCode::FORBIDDEN => Some(FallbackCause::Denied),
        s if s.is_server_error() => Some(FallbackCause::Error),
        _ => None,
    }
}

/// The fallback cause of a replica that gave no answer.
fn failure_cause(e: &SendError) -> FallbackCause {
    match e {
        SendError::Connect(_) => FallbackCause::Connect,
        SendError::Timeout(_) | SendError::Stalled(_) => FallbackCause::Timeout,
        SendError::Failed(_) | SendError::Protocol(_) => FallbackCause::Error,
    }
}

/// A request extension set by the TLS listener: the client connected over TLS, so
/// upstreams get `X-Forwarded-Proto: https` (README "Forwarding").
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

/// Strips identity and hop-by-hop headers and keeps what both upstreams get.
fn outgoing<'a>(
    table: &RoutingTable,
    method: &Method,
    uri: &'a Uri,
    client_headers: &mut HeaderMap,
    peer: SocketAddr,
    proto: &'static str,
) -> Outgoing<'a> {
    let query = client::strip_identity(table, client_headers, uri.query());
    let host = match client_headers.get(header::HOST) {
        Some(h) => Some(h.clone()),
        None => uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    let mut headers = std::mem::take(client_headers);
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // Framed by its transfer coding: a Content-Length beside it must not frame the
        // body again upstream (RFC 9112 section 6.3; the classic request smuggling).
        headers.remove(header::CONTENT_LENGTH);
    }
    remove_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    // hyper answers `100-continue` itself when the body is first read.
    headers.remove(header::EXPECT);
    let peer = peer.ip().to_canonical();
    append_forwarded_for(&mut headers, peer);
    own_forwarding_headers(&mut headers, table.trusted_proxies.contains(peer), proto);
    if method == Method::GET || method == Method::HEAD {
        // GET/HEAD go out without a body so they can be retried on the primary.
        headers.remove(header::CONTENT_LENGTH);
    }
    Outgoing { method: method.clone(), headers, path: uri.path(), query, host }
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
    let (bucket, rest) = route::upstream_path(table, to, out.path);
    if let Some(b) = bucket {
        pq.push('/');
        pq.push_str(b);
    }
    pq.push_str(rest);
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
    if to == Upstream::Primary
        && table.preserve_host
        && let Some(host) = &out.host
    {
        // The client signed for the name it connected to (README "Host").
        req.headers_mut().insert(header::HOST, host.clone());
    }
    Ok(req)
}

/// The upstream's response, cleaned of hop-by-hop headers and labelled.
fn to_client<B>(resp: Response<B>, upstream: Upstream, reason: Reason) -> Response<B> {
    let (mut parts, body) = resp.into_parts();
    // The upstream's HTTP version is its own; the client gets this server's.
    parts.version = http::Version::HTTP_11;
    let listed = |v: &HeaderValue| !v.as_bytes().iter().all(u8::is_ascii_digit);
    if parts.headers.contains_key(header::TRANSFER_ENCODING)
        || parts.headers.get_all(header::CONTENT_LENGTH).iter().any(listed)
    {
        // The body was framed by its transfer coding, or its length was written as a list
        // (`5, 5`): that header must not frame the body again towards the client, which
        // gets the length hyper read, if any (RFC 9112 section 6.3).
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    remove_hop_by_hop(&mut parts.headers);
    label(&mut parts.headers, upstream, Some(reason));
    Response::from_parts(parts, body)
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
    fn replica_answers_that_fall_back_and_their_causes() {
        let cause = |s: u16| replica_missed(StatusCode::from_u16(s).unwrap());
        assert_eq!(cause(404), Some(FallbackCause::NotFound));
        assert_eq!(cause(403), Some(FallbackCause::Denied));
        assert_eq!(cause(500), Some(FallbackCause::Error));
        assert_eq!(cause(503), Some(FallbackCause::Error));
        for kept in [200, 206, 304, 400, 412, 416] {
            assert_eq!(cause(kept), None, "{kept}");
        }
    }

    #[test]
    fn multi_object_delete_is_recognised() {
        assert!(names_multi_delete(Some("delete")));
        assert!(names_multi_delete(Some("x-id=DeleteObjects&delete=")));
        assert!(!names_multi_delete(Some("deleted=1")));
        assert!(!names_multi_delete(None));
    }
}
