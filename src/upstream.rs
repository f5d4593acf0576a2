//! Pooled HTTP(S) clients for the two upstreams, and their health.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{ClientFault, Overdue, ReqBody};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::table::{Tables, Upstream};

/// Largest read buffer per upstream connection.
const UPSTREAM_READ_BUF: usize = 64 * 1024;

/// One keep-alive pool shared by both upstreams (connections are keyed by host).
pub type HttpClient = Client<HttpsConnector<HttpConnector>, ReqBody>;

/// Builds the upstream client: keep-alive pool, `TCP_NODELAY`, connect timeout, HTTPS with system roots.
pub fn build_client(cfg: &Config) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.limits.upstream_connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let builder = match hyper_rustls::HttpsConnectorBuilder::new().with_native_roots() {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "no system CA certificates found; https upstreams will fail to verify");
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                rustls::ClientConfig::builder()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            )
        }
    };
    let https = builder.https_or_http().enable_http1().wrap_connector(http);
    Client::builder(TokioExecutor::new())
        // Caps one upstream read (hyper's default is ~408 KiB). Measured with 1,000 slow
        // downloads, caps from 64 KiB up give the same RSS and 1 GiB throughput; smaller caps
        // save memory but cost throughput (BENCHMARKS.md, "Slow downloads").
        .http1_max_buf_size(UPSTREAM_READ_BUF)
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(https)
}

/// Health of one upstream: `fall` consecutive failures mark it down, `rise` successes up.
#[derive(Debug)]
pub struct Health {
    upstream: Upstream,
    rise: u32,
    fall: u32,
    successes: AtomicU32,
    failures: AtomicU32,
    down: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Health {
    /// A healthy upstream with the given thresholds.
    pub fn new(upstream: Upstream, rise: u32, fall: u32, metrics: Arc<Metrics>) -> Health {
        Health {
            upstream,
            rise: rise.max(1),
            fall: fall.max(1),
            successes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            down: AtomicBool::new(false),
            metrics,
        }
    }

    /// Whether the upstream is currently marked down.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Forgets everything known: the upstream moved to a new address.
    pub fn reset(&self) {
        self.successes.store(0, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        self.down.store(false, Ordering::Relaxed);
        self.metrics.set_up(self.upstream, true);
    }

    /// Records a good answer; returns true when this one brought the upstream back.
    pub fn success(&self) -> bool {
        self.failures.store(0, Ordering::Relaxed);
        let n = self.successes.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if n >= self.rise && self.down.swap(false, Ordering::Relaxed) {
            tracing::info!(upstream = self.upstream.as_str(), "upstream is up again");
            self.metrics.set_up(self.upstream, true);
            return true;
        }
        false
    }

    /// Records a failure; returns true when this one marked the upstream down.
    pub fn failure(&self, why: &str) -> bool {
        self.successes.store(0, Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if n >= self.fall && !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(upstream = self.upstream.as_str(), failures = n, why, "upstream marked down");
            self.metrics.set_up(self.upstream, false);
            return true;
        }
        false
    }
}

/// Why an upstream exchange produced no response head, on the upstream's side.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The connection could not be made (refused, unreachable, connect timeout, TLS).
    #[error("unreachable")]
    Connect(#[source] hyper_util::client::legacy::Error),
    /// No response head within `limits.upstream_header_timeout` of the request's end.
    #[error("no response within {0:?} of the request's end")]
    Timeout(Duration),
    /// The upstream took no request body bytes for `limits.idle_timeout`.
    #[error("took no request body bytes for {0:?}")]
    Stalled(Duration),
    /// The connection broke before a response head arrived.
    #[error("connection failed")]
    Failed(#[source] hyper_util::client::legacy::Error),
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
}

/// The upstream client plus health state, shared by all requests.
#[derive(Debug)]
pub struct Upstreams {
    client: HttpClient,
    primary: Health,
    replica: Health,
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl Upstreams {
    /// Creates the shared client and health state.
    pub fn new(cfg: &Config, metrics: &Arc<Metrics>) -> Upstreams {
        let h = &cfg.health;
        Upstreams {
            client: build_client(cfg),
            primary: Health::new(Upstream::Primary, h.rise, h.fall, Arc::clone(metrics)),
            replica: Health::new(Upstream::Replica, h.rise, h.fall, Arc::clone(metrics)),
            header_timeout: cfg.limits.upstream_header_timeout,
            idle_timeout: cfg.limits.idle_timeout,
        }
    }

    /// The health of one upstream.
    pub fn health(&self, which: Upstream) -> &Health {
        match which {
            Upstream::Primary => &self.primary,
            Upstream::Replica => &self.replica,
        }
    }

    /// Sends a request (its URI already absolute) and waits for the response head.
    ///
    /// The header timeout starts when the request body has been sent; while the body is
    /// in progress only a lack of progress (`idle_timeout`) ends the exchange (README
    /// "Limits and timeouts"). Connect errors, broken connections, timeouts and 5xx
    /// answers count against the upstream's health, other answers for it; failures on
    /// the client's side count neither way.
    pub async fn send(&self, which: Upstream, req: Request<ReqBody>) -> Result<Response<Incoming>, ExchangeError> {
        let health = self.health(which);
        let progress = req.body().progress().cloned();
        let exchange = self.client.request(req);
        let outcome = match &progress {
            None => tokio::time::timeout(self.header_timeout, exchange).await.map_err(|_| Overdue::NoAnswer),
            Some(p) => tokio::select! {
                r = exchange => Ok(r),
                o = p.overdue(self.idle_timeout, self.header_timeout) => Err(o),
            },
        };
        match outcome {
            Ok(Ok(resp)) => {
                if resp.status().is_server_error() {
                    health.failure("answered 5xx");
                } else {
                    health.success();
                }
                Ok(resp)
            }
            // The client's body broke off: hyper reports it as a failed exchange.
            Ok(Err(_)) if progress.as_ref().is_some_and(|p| p.client_failed()) => Err(ClientFault::Closed.into()),
            Ok(Err(e)) if e.is_connect() => {
                health.failure("connect error");
                Err(SendError::Connect(e).into())
            }
            Ok(Err(e)) => {
                health.failure("connection failed");
                Err(SendError::Failed(e).into())
            }
            Err(Overdue::NoAnswer) => {
                health.failure("response timeout");
                Err(SendError::Timeout(self.header_timeout).into())
            }
            Err(Overdue::Upstream) => {
                health.failure("request body stalled");
                Err(SendError::Stalled(self.idle_timeout).into())
            }
            Err(Overdue::Client) => Err(ClientFault::Stalled(self.idle_timeout).into()),
        }
    }

    /// The raw client, for probes.
    pub fn client(&self) -> &HttpClient {
        &self.client
    }
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

/// Whether an active check's answer says the upstream is down.
///
/// An S3 endpoint that answers at all is up (real ones answer a bare `HEAD` with 403,
/// 404, 405 or 501): only gateway errors mean the S3 behind a proxy is unreachable.
fn check_failed(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
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
                match tokio::time::timeout(health.timeout, upstreams.client.request(req)).await {
                    Ok(Ok(resp)) if check_failed(resp.status()) => {
                        h.failure(&format!("check answered {}", resp.status().as_u16()));
                    }
                    Ok(Ok(_)) => {
                        h.success();
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
mod tests {
    use super::*;

    #[test]
    fn health_falls_and_rises() {
        let m = Arc::new(Metrics::new());
        let h = Health::new(Upstream::Replica, 2, 3, Arc::clone(&m));
        assert!(!h.failure("x"));
        assert!(!h.failure("x"));
        assert!(!h.is_down());
        assert!(h.failure("x"), "the third failure marks it down");
        assert!(h.is_down());
        assert!(m.render().contains("mediaroute_upstream_up{upstream=\"replica\"} 0"));
        assert!(!h.failure("x"), "only the crossing reports");
        assert!(!h.success(), "one success is not enough to rise");
        assert!(h.is_down());
        assert!(h.success());
        assert!(!h.is_down());
        assert!(m.render().contains("mediaroute_upstream_up{upstream=\"replica\"} 1"));
        // A success in between resets the failure count.
        assert!(!h.failure("x"));
        assert!(!h.failure("x"));
        h.success();
        assert!(!h.failure("x"));
        assert!(!h.is_down());
    }
}

#[cfg(test)]
mod check_tests {
    use super::*;

    #[test]
    fn only_gateway_errors_fail_a_check() {
        for ok in [200, 204, 301, 400, 403, 404, 405, 500, 501, 505] {
            assert!(!check_failed(http::StatusCode::from_u16(ok).unwrap()), "{ok}");
        }
        for bad in [502, 503, 504] {
            assert!(check_failed(http::StatusCode::from_u16(bad).unwrap()), "{bad}");
        }
    }
}
