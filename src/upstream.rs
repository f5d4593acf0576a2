//! Pooled HTTP(S) clients for the two upstreams, and the replica's health.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ReqBody;
use crate::config::Config;
use crate::table::Upstream;

/// One keep-alive pool shared by both upstreams (connections are keyed by host).
pub type HttpClient = Client<HttpsConnector<HttpConnector>, ReqBody>;

/// Builds the upstream client: keep-alive pool, `TCP_NODELAY`, connect timeout, HTTPS with system roots.
pub fn build_client(cfg: &Config) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.limits.upstream_connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match builder.with_native_roots() {
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
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(https)
}

/// Passive health of one upstream: consecutive connect failures mark it down.
#[derive(Debug, Default)]
pub struct Health {
    failures: AtomicU32,
    down: AtomicBool,
    retrying: AtomicBool,
}

impl Health {
    /// Whether the upstream is currently marked down.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Records an answer (any HTTP status): the upstream is reachable.
    pub fn record_success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!("replica is reachable again");
        }
    }

    /// Records a connect failure; returns true when this one marked it down.
    pub fn record_failure(&self, fall: u32) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        n >= fall && !self.down.swap(true, Ordering::Relaxed)
    }
}

/// The upstream client plus health state, shared by all requests.
#[derive(Debug)]
pub struct Upstreams {
    client: HttpClient,
    /// Health of the replica (the primary is never routed around).
    pub replica_health: Arc<Health>,
    fall: u32,
    retry_interval: Duration,
    connect_timeout: Duration,
}

/// The outcome of one upstream exchange, before any byte reached the client.
pub type Sent = Result<Response<Incoming>, hyper_util::client::legacy::Error>;

impl Upstreams {
    /// Creates the shared client.
    pub fn new(cfg: &Config) -> Upstreams {
        Upstreams {
            client: build_client(cfg),
            replica_health: Arc::new(Health::default()),
            fall: cfg.health.fall,
            retry_interval: cfg.health.retry_interval,
            connect_timeout: cfg.limits.upstream_connect_timeout,
        }
    }

    /// Sends a request to `which` (its URI is already absolute) and tracks replica health.
    ///
    /// `authority` is the replica's `host:port`, used by the background retry when
    /// this failure marks the replica down.
    pub async fn send(&self, which: Upstream, req: Request<ReqBody>, authority: &str) -> Sent {
        let res = self.client.request(req).await;
        if which == Upstream::Replica {
            match &res {
                Ok(_) => self.replica_health.record_success(),
                Err(e) if e.is_connect() => {
                    if self.replica_health.record_failure(self.fall) {
                        tracing::warn!(replica = authority, error = %e, "replica marked down after {} connect failures", self.fall);
                        self.spawn_retry(authority.to_string());
                    }
                }
                Err(_) => {}
            }
        }
        res
    }

    /// Re-tries a down replica in the background until a TCP connection succeeds.
    fn spawn_retry(&self, authority: String) {
        let health = Arc::clone(&self.replica_health);
        if health.retrying.swap(true, Ordering::Relaxed) {
            return;
        }
        let interval = self.retry_interval;
        let timeout = self.connect_timeout;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let attempt = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&authority)).await;
                if matches!(attempt, Ok(Ok(_))) {
                    health.record_success();
                    break;
                }
            }
            health.retrying.store(false, Ordering::Relaxed);
        });
    }

    /// The raw client, for probes.
    pub fn client(&self) -> &HttpClient {
        &self.client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_goes_down_after_fall_and_up_on_success() {
        let h = Health::default();
        assert!(!h.record_failure(3));
        assert!(!h.record_failure(3));
        assert!(!h.is_down());
        assert!(h.record_failure(3));
        assert!(h.is_down());
        // Only the failure that crossed the line reports it.
        assert!(!h.record_failure(3));
        h.record_success();
        assert!(!h.is_down());
        assert!(!h.record_failure(3));
    }
}
