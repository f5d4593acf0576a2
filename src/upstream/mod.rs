//! Pooled HTTP(S) clients for the two upstreams, how an exchange is timed, and which side
//! a failure is on.

pub mod capped;
pub mod connect;
pub mod lean;

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{ClientFault, Overdue, ReqBody};
use crate::config::Config;
use crate::health::{Health, HealthBoard};
use crate::metrics::Metrics;
use crate::table::{Tables, Upstream};
use capped::{Capped, Caps, QueueFull};
use connect::Connector;

/// An error from a connection's layers, as hyper's and our own connectors give them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest read buffer per upstream connection.
const UPSTREAM_READ_BUF: usize = 64 * 1024;

/// One keep-alive pool shared by both upstreams (connections are keyed by host), each
/// upstream's connections capped.
pub type HttpClient = Client<Capped<Connector>, ReqBody>;

/// The client of active health checks: uncapped, so that a full queue never fails a check.
pub type CheckClient = Client<Connector, ReqBody>;

/// A keep-alive pool over `connector`, keeping at most `max_idle` idle connections per host.
fn pool<C>(connector: C, max_idle: usize) -> Client<C, ReqBody>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
{
    Client::builder(TokioExecutor::new())
        // Caps one upstream read (hyper's default is ~408 KiB). Measured with 1,000 slow
        // downloads, caps from 64 KiB up give the same RSS and 1 GiB throughput; smaller caps
        // save memory but cost throughput (BENCHMARKS.md, "Slow downloads").
        .http1_max_buf_size(UPSTREAM_READ_BUF)
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(max_idle)
        .build(connector)
}

/// A failure on mediaroute's own side: neither the client's nor the upstream's doing, never
/// a health failure (README "Limits and timeouts").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LocalFault {
    /// No connection to the upstream became free in time.
    #[error(transparent)]
    QueueFull(#[from] QueueFull),
    /// The system refused a resource (file descriptors, memory, ports): this errno.
    #[error("out of local resources (os error {0})")]
    Resources(i32),
    /// `limits.max_requests` requests are already in flight.
    #[error("too many requests in flight (limits.max_requests)")]
    TooManyRequests,
}

/// Whether an exchange error is mediaroute running out of something, and what.
pub(crate) fn local_fault(e: &(dyn std::error::Error + 'static)) -> Option<LocalFault> {
    use rustix::io::Errno;
    let local = [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM, Errno::ADDRNOTAVAIL];
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(q) = c.downcast_ref::<QueueFull>() {
            return Some(LocalFault::QueueFull(*q));
        }
        if let Some(errno) = c.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error)
            && local.iter().any(|l| l.raw_os_error() == errno)
        {
            return Some(LocalFault::Resources(errno));
        }
        cause = c.source();
    }
    None
}

/// Says, at most every 10 seconds, that mediaroute ran out of something.
fn local_limit_reached(e: &dyn std::error::Error) {
    static LOCAL: crate::throttle::Every = crate::throttle::Every::new(Duration::from_secs(10));
    if let Some(held) = LOCAL.allow() {
        tracing::warn!(error = %error_chain(e), also_since_last_warning = held, "local limit reached");
    }
}

/// Why an upstream exchange produced no response head, on the upstream's side.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The connection could not be made (refused, unreachable, connect timeout, TLS).
    #[error("unreachable")]
    Connect(#[source] BoxError),
    /// No response head within `limits.upstream_header_timeout` of the request's end.
    #[error("no response within {0:?} of the request's end")]
    Timeout(Duration),
    /// The upstream took no request body bytes for `limits.body_timeout`.
    #[error("took no request body bytes for {0:?}")]
    Stalled(Duration),
    /// The connection broke before a response head arrived.
    #[error("connection failed")]
    Failed(#[source] BoxError),
    /// The upstream answered something HTTP does not allow here.
    #[error("{0}")]
    Protocol(&'static str),
}

/// A failed exchange, and which side it failed on (README "Errors"): only upstream
/// failures count against an upstream's health.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The upstream failed.
    #[error(transparent)]
    Upstream(#[from] SendError),
    /// The client failed: it went away or stopped sending its upload.
    #[error(transparent)]
    Client(#[from] ClientFault),
    /// mediaroute ran out of something.
    #[error(transparent)]
    Local(#[from] LocalFault),
}

/// The upstream client plus health state, shared by all requests.
#[derive(Debug)]
pub struct Upstreams {
    /// Swapped for fresh pools when the trust in an upstream changes (README "HTTPS upstreams").
    pools: arc_swap::ArcSwap<Pools>,
    connector: Connector,
    caps: Arc<Caps>,
    max_idle: usize,
    health: Arc<HealthBoard>,
    header_timeout: Duration,
    body_timeout: Duration,
    /// The lean path's own client, under the same caps and health (README "The lean
    /// download path").
    lean: lean::LeanClient,
}

impl Upstreams {
    /// Creates the shared clients and health state.
    pub fn new(cfg: &Config, metrics: &Arc<Metrics>, tables: Arc<Tables>) -> Upstreams {
        let h = &cfg.health;
        let l = &cfg.limits;
        let connector = Connector::new(cfg, Arc::clone(&tables));
        let caps =
            Arc::new(Caps::new(l.max_upstream_connections, l.upstream_queue_timeout, tables, Arc::clone(metrics)));
        let max_idle = 256.min(l.max_upstream_connections as usize);
        let health = Arc::new(HealthBoard::new(h.rise, h.fall, metrics));
        let lean = lean::LeanClient::new(
            Arc::clone(&caps),
            Arc::clone(&health),
            max_idle,
            l.upstream_connect_timeout,
            l.upstream_header_timeout,
        );
        Upstreams {
            pools: arc_swap::ArcSwap::from_pointee(Pools::new(&connector, &caps, max_idle)),
            connector,
            caps,
            max_idle,
            health,
            header_timeout: l.upstream_header_timeout,
            body_timeout: l.body_timeout,
            lean,
        }
    }

    /// Starts new keep-alive pools: connections verified under the old TLS trust are
    /// not reused (they close as their requests end). Called when a reload changes a
    /// `ca_file` (README "HTTPS upstreams").
    pub fn renew_pools(&self) {
        self.pools.store(Arc::new(Pools::new(&self.connector, &self.caps, self.max_idle)));
        self.lean.clear();
    }

    /// The lean path's client (plain-HTTP upstreams only).
    pub fn lean(&self) -> &lean::LeanClient {
        &self.lean
    }

    /// The client of active health checks.
    fn checks(&self) -> CheckClient {
        self.pools.load().checks.clone()
    }

    /// The health of one upstream.
    pub fn health(&self, which: Upstream) -> &Health {
        self.health.of(which)
    }

    /// The health of both upstreams, for those that report failures found later
    /// (a response body that breaks off).
    pub fn health_board(&self) -> &Arc<HealthBoard> {
        &self.health
    }

    /// Sends a request (its URI already absolute) and waits for the response head.
    ///
    /// The header timeout starts when the request body has been sent; while the body is
    /// in progress only a lack of progress (`body_timeout`) ends the exchange (README
    /// "Limits and timeouts"). Connect errors, broken connections, timeouts and 5xx
    /// answers count against the upstream's health here; failures on the client's side
    /// count neither way. Any other answer counts for it when its body has ended
    /// (the caller reports that to [`Upstreams::health`]).
    pub async fn send(&self, which: Upstream, req: Request<ReqBody>) -> Result<Response<Incoming>, ExchangeError> {
        let health = self.health(which);
        let progress = req.body().progress().cloned();
        let exchange = self.pools.load().client.request(req);
        let outcome = match &progress {
            None => tokio::time::timeout(self.header_timeout, exchange).await.map_err(|_| Overdue::NoAnswer),
            Some(p) => tokio::select! {
                r = exchange => Ok(r),
                o = p.overdue(self.body_timeout, self.header_timeout) => Err(o),
            },
        };
        match outcome {
            Ok(Ok(resp)) if let Some(why) = unrelayable(&resp) => {
                health.failure(why);
                Err(SendError::Protocol(why).into())
            }
            Ok(Ok(resp)) => {
                if resp.status().is_server_error() {
                    health.failure("answered 5xx");
                }
                // Any other answer counts for the upstream once its body has ended well,
                // which only the holder of the response sees.
                Ok(resp)
            }
            // The client's body broke off or was malformed: hyper reports it as a failed exchange.
            Ok(Err(e)) if let Some(fault) = progress.as_ref().and_then(|p| p.client_fault()) => {
                tracing::debug!(error = %error_chain(&e), "the client's request body failed");
                Err(fault.into())
            }
            Ok(Err(e)) if let Some(fault) = local_fault(&e) => {
                local_limit_reached(&e);
                Err(fault.into())
            }
            Ok(Err(e)) if e.is_connect() => {
                health.failure("connect error");
                Err(SendError::Connect(e.into()).into())
            }
            Ok(Err(e)) => {
                health.failure("connection failed");
                Err(SendError::Failed(e.into()).into())
            }
            Err(Overdue::NoAnswer) => {
                health.failure("response timeout");
                Err(SendError::Timeout(self.header_timeout).into())
            }
            Err(Overdue::Upstream) => {
                health.failure("request body stalled");
                Err(SendError::Stalled(self.body_timeout).into())
            }
            Err(Overdue::Client) => Err(ClientFault::Stalled(self.body_timeout).into()),
        }
    }

    /// Sends a request as it is, without the timing and health accounting of
    /// [`Upstreams::send`] (probes have their own).
    pub fn send_raw(&self, req: Request<ReqBody>) -> hyper_util::client::legacy::ResponseFuture {
        self.pools.load().client.request(req)
    }
}

/// How a download's request reaches an upstream: hyper's pooled client ([`Upstreams`]),
/// or the lean path's own HTTP/1.1 client (README "The lean download path"). Both time
/// the exchange and count failures against the upstream's health the same way.
pub trait Exchange {
    /// The response body this transport yields.
    type Body: Send;

    /// Sends `req` (its URI absolute) to `which` and waits for the response head.
    fn send(
        &self,
        which: Upstream,
        req: Request<ReqBody>,
    ) -> impl Future<Output = Result<Response<Self::Body>, ExchangeError>> + Send;

    /// Reads a small answer that will not be passed on to its end, so that its connection
    /// can be used again; a large or slow one is dropped with its connection.
    fn discard(&self, resp: Response<Self::Body>) -> impl Future<Output = ()> + Send;
}

impl Exchange for Upstreams {
    type Body = Incoming;

    fn send(
        &self,
        which: Upstream,
        req: Request<ReqBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, ExchangeError>> + Send {
        Upstreams::send(self, which, req)
    }

    fn discard(&self, resp: Response<Incoming>) -> impl Future<Output = ()> + Send {
        drain_small(resp)
    }
}

/// Answers up to this size are read to their end rather than dropped with their connection.
pub const DRAIN_SMALL: u64 = 64 * 1024;

/// How long reading such an answer may take.
pub const DRAIN_WITHIN: Duration = Duration::from_millis(500);

/// Reads a small error body to its end so the upstream connection can be reused.
pub async fn drain_small(resp: Response<Incoming>) {
    use http_body_util::BodyExt;
    let len = resp.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if len.is_some_and(|n| n <= DRAIN_SMALL) {
        let body = http_body_util::Limited::new(resp.into_body(), DRAIN_SMALL as usize);
        let _ = tokio::time::timeout(DRAIN_WITHIN, body.collect()).await;
    }
}

/// The keep-alive pools of requests and of health checks.
#[derive(Debug)]
struct Pools {
    client: HttpClient,
    checks: CheckClient,
}

impl Pools {
    fn new(connector: &Connector, caps: &Arc<Caps>, max_idle: usize) -> Pools {
        Pools {
            client: pool(Capped::new(connector.clone(), Arc::clone(caps)), max_idle),
            checks: pool(connector.clone(), 2),
        }
    }
}

/// An error and its causes on one line (hyper's top-level messages are terse).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // An error that prints its source already says it once.
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

/// Why an answer cannot be passed on, as both clients report it (README "Failure and
/// attack behaviour").
pub(crate) const ODD_STATUS: &str = "answered a status code outside 100-599";
/// mediaroute never asks for an upgrade.
pub(crate) const UNASKED_UPGRADE: &str = "answered 101 Switching Protocols to a request that asked for no upgrade";
/// mediaroute removes chunked framing and would hand on other codings as if uncoded.
pub(crate) const OTHER_CODING: &str = "answered with a transfer coding other than chunked";

/// What makes an upstream's answer one mediaroute cannot pass on faithfully, if anything.
fn unrelayable(resp: &Response<Incoming>) -> Option<&'static str> {
    if resp.status().as_u16() >= 600 {
        Some(ODD_STATUS)
    } else if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        Some(UNASKED_UPGRADE)
    } else if has_other_coding(resp.headers()) {
        Some(OTHER_CODING)
    } else {
        None
    }
}

/// Whether a message uses a transfer coding other than chunked, which mediaroute cannot
/// pass on (it removes chunked framing and would hand on the rest as if uncoded).
pub fn has_other_coding(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|c| !c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Whether an active check's answer says the upstream is down.
///
/// An S3 endpoint that answers at all is up (real ones answer a bare `HEAD` with 403,
/// 404, 405 or 501): only gateway errors, the S3 behind a proxy being unreachable, and
/// 500, S3's own `InternalError`, are failures. Counting 500 keeps checks in step with
/// real requests, whose 5xx are failures: otherwise a replica answering 500 to everything
/// is marked down by traffic and brought back by checks, again and again (README "Health").
fn check_failed(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502..=504)
}

/// Checks both upstreams every `interval` with a `HEAD` of their check path, forever.
pub async fn check_loop(upstreams: Arc<Upstreams>, tables: Arc<Tables>, health: crate::config::Health) {
    // The first check waits one interval: at start-up nothing is known to be wrong.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + health.interval, health.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let table = tables.current();
        let checks = [Upstream::Primary, Upstream::Replica].map(|which| {
            let target = table.target(which);
            let uri = Uri::builder()
                .scheme(target.scheme.clone())
                .authority(target.authority.clone())
                .path_and_query(&*target.health_path)
                .build();
            let upstreams = Arc::clone(&upstreams);
            async move {
                let Ok(uri) = uri else { return };
                let mut req = Request::new(ReqBody::Empty);
                *req.method_mut() = http::Method::HEAD;
                *req.uri_mut() = uri;
                let h = upstreams.health(which);
                match tokio::time::timeout(health.timeout, upstreams.checks().request(req)).await {
                    Ok(Ok(resp)) if check_failed(resp.status()) => {
                        h.failure(&format!("check answered {}", resp.status().as_u16()));
                    }
                    Ok(Ok(_)) => {
                        h.check_passed();
                    }
                    Ok(Err(e)) if local_fault(&e).is_some() => {
                        // Out of descriptors here says nothing about the upstream.
                        tracing::debug!(upstream = which.as_str(), error = %error_chain(&e), "check skipped: local limit");
                    }
                    Ok(Err(e)) => {
                        h.failure(&format!("check failed: {}", error_chain(&e)));
                    }
                    Err(_) => {
                        h.failure("check timed out");
                    }
                }
            }
        });
        let [a, b] = checks;
        tokio::join!(a, b);
    }
}

#[cfg(test)]
mod check_tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_a_local_fault() {
        let emfile = std::io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        let wrapped = WithSource(emfile);
        assert_eq!(local_fault(&wrapped), Some(LocalFault::Resources(rustix::io::Errno::MFILE.raw_os_error())));
        let refused = WithSource(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(local_fault(&refused), None, "a refused connection is the upstream's");
        let queue = QueueFull(Duration::from_secs(1));
        assert_eq!(local_fault(&queue), Some(LocalFault::QueueFull(queue)));
    }

    #[test]
    fn an_error_chain_says_each_cause_once() {
        let e = SendError::Stalled(Duration::from_secs(5));
        let outer = crate::body::ClientFault::Stalled(Duration::from_secs(5));
        assert_eq!(error_chain(&e), "took no request body bytes for 5s");
        assert_eq!(error_chain(&outer), "the client sent no request body bytes for 5s");
        let wrapped = WithSource(std::io::Error::other("refused"));
        assert_eq!(error_chain(&wrapped), "wrapper: refused");
    }

    /// An error that prints its source in its own message, as thiserror's `{source}` does.
    #[derive(Debug)]
    struct WithSource(std::io::Error);
    impl std::fmt::Display for WithSource {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "wrapper: {}", self.0)
        }
    }
    impl std::error::Error for WithSource {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn only_gateway_errors_fail_a_check() {
        for ok in [200, 204, 301, 400, 403, 404, 405, 501, 505] {
            assert!(!check_failed(http::StatusCode::from_u16(ok).unwrap()), "{ok}");
        }
        for bad in [500, 502, 503, 504] {
            assert!(check_failed(http::StatusCode::from_u16(bad).unwrap()), "{bad}");
        }
    }
}
