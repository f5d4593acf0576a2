//! The metrics registry: names and labels are part of the contract (README "Metrics").

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::route::Reason;
use crate::table::Upstream;

type Labels<const N: usize> = [(&'static str, &'static str); N];

/// Why a replica answer sent a download to the primary (`mediaroute_fallbacks_total{cause}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackCause {
    /// The replica answered 404: a replica miss.
    NotFound,
    /// The replica answered 403 (S3's answer for a missing key to a caller that may not list).
    Denied,
    /// The replica answered 5xx, or broke before a response head.
    Error,
    /// The replica could not be connected to.
    Connect,
    /// The replica sent no response head in time.
    Timeout,
}

impl FallbackCause {
    const ALL: [FallbackCause; 5] = [
        FallbackCause::NotFound,
        FallbackCause::Denied,
        FallbackCause::Error,
        FallbackCause::Connect,
        FallbackCause::Timeout,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackCause::NotFound => "not-found",
            FallbackCause::Denied => "denied",
            FallbackCause::Error => "error",
            FallbackCause::Connect => "connect",
            FallbackCause::Timeout => "timeout",
        }
    }

    /// Whether the replica lacks the key (rather than being broken).
    pub fn is_miss(self) -> bool {
        matches!(self, FallbackCause::NotFound | FallbackCause::Denied)
    }
}

/// What one probe of the primary learned (`mediaroute_probes_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    /// The primary answered with the object's facts.
    Ok,
    /// The primary has no such object (404).
    Missing,
    /// The primary refused the client's credentials (401/403).
    Denied,
    /// Connection error, 5xx, or an answer without the facts asked for.
    Error,
    /// No answer within `limits.age_probe_timeout`.
    Timeout,
}

impl ProbeResult {
    const ALL: [ProbeResult; 5] =
        [ProbeResult::Ok, ProbeResult::Missing, ProbeResult::Denied, ProbeResult::Error, ProbeResult::Timeout];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeResult::Ok => "ok",
            ProbeResult::Missing => "missing",
            ProbeResult::Denied => "denied",
            ProbeResult::Error => "error",
            ProbeResult::Timeout => "timeout",
        }
    }
}

/// How a request ended, for its status class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The response ended as sent, with this status.
    Answered(u16),
    /// The client left before the response ended (`client-closed`).
    ClientClosed,
    /// The upstream broke off the response body: counted with the 5xx, whatever status
    /// line the client got, because the client did not get the object.
    UpstreamBroke,
}

/// Every metric mediaroute exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels<3>, Counter>,
    /// Handles into `requests`, made on first use, so counting is a lookup by index.
    request_handles: Box<[OnceLock<Counter>]>,
    /// Per upstream (primary, replica, none): response bytes and durations.
    per_upstream: [(Counter, Histogram); 3],
    fallbacks: [Counter; FallbackCause::ALL.len()],
    replica_misses: Counter,
    probes: [Counter; ProbeResult::ALL.len()],
    replication_lag: Histogram,
    reloads: Family<Labels<1>, Counter>,
    generation: Gauge,
    upstream_up: Family<Labels<1>, Gauge>,
    /// Per upstream (primary, replica): requests waiting for a connection, and those that gave up.
    queue: [(Gauge, Counter); 2],
    /// Loads of mediaroute's own AWS credentials: [ok, error].
    credential_refreshes: [Counter; 2],
    /// When the AWS credentials in use expire (Unix seconds), 0 for none or static keys.
    credentials_expiry: Gauge,
    /// TLS handshakes that failed, by [`TLS_FAILURES`].
    tls_failures: [Counter; TLS_FAILURES.len()],
    /// Connections closed for their PROXY header, by [`PROXY_REFUSALS`].
    proxy_refusals: [Counter; PROXY_REFUSALS.len()],
    /// When the listener's certificate expires (Unix seconds), 0 without TLS.
    certificate_expiry: Gauge,
}

/// Why a TLS handshake failed (`mediaroute_tls_handshake_failures_total{reason}`):
/// no handshake within `limits.handshake_timeout`, a plain HTTP request on the TLS port,
/// the client closed before finishing, or any TLS error (version, cipher, alert, garbage).
pub const TLS_FAILURES: [&str; 4] = ["timeout", "plain-http", "closed", "error"];

/// Why a connection's PROXY header was refused (`mediaroute_proxy_protocol_refusals_total{reason}`).
pub const PROXY_REFUSALS: [&str; 4] = ["timeout", "closed", "invalid", "io"];

/// A request counted as waiting for an upstream connection until dropped.
#[derive(Debug)]
pub struct Waiting(Gauge);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Download durations span a 1 ms cache hit to a multi-minute movie.
fn duration_histogram() -> Histogram {
    const BUCKETS: [f64; 18] =
        [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];
    Histogram::new(BUCKETS)
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

/// The (upstream, reason) pairs a request can end with, each shown at 0 from the start
/// so dashboards and alerts have a series before the first request.
const KNOWN_ROUTES: [(usize, Option<Reason>); 10] = [
    (0, Some(Reason::Write)),
    (0, Some(Reason::NotObject)),
    (0, Some(Reason::ModeNo)),
    (0, Some(Reason::OutsideNetworks)),
    (0, Some(Reason::ReplicaDown)),
    (0, Some(Reason::TooYoung)),
    (0, Some(Reason::AgeUnknown)),
    (0, Some(Reason::Fallback)),
    (1, Some(Reason::Replica)),
    // Refused before any upstream.
    (2, None),
];

impl Metrics {
    /// Registers every metric family, with the known label sets at 0.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mediaroute");
        let requests = Family::<Labels<3>, Counter>::default();
        let response_bytes = Family::<Labels<1>, Counter>::default();
        let upstream_duration =
            Family::<Labels<1>, Histogram>::new_with_constructor(duration_histogram as fn() -> Histogram);
        let fallbacks = Family::<Labels<1>, Counter>::default();
        let replica_misses = Counter::default();
        let probes = Family::<Labels<1>, Counter>::default();
        // Replication takes seconds to hours.
        let replication_lag = Histogram::new([1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4.0 * 3600.0]);
        let reloads = Family::<Labels<1>, Counter>::default();
        let generation = Gauge::default();
        let upstream_up = Family::<Labels<1>, Gauge>::default();
        registry.register(
            "requests",
            "Requests by upstream, routing reason and status class (or client-closed)",
            requests.clone(),
        );
        registry.register("response_bytes", "Response body bytes sent to clients, by upstream", response_bytes.clone());
        registry.register(
            "upstream_duration_seconds",
            "Time from routing to the end of the response body, by upstream",
            upstream_duration.clone(),
        );
        registry.register(
            "fallbacks",
            "Downloads retried on the primary after the replica, by cause",
            fallbacks.clone(),
        );
        registry.register(
            "replica_misses",
            "Replica answers of 404/403 for a download the primary then served",
            replica_misses.clone(),
        );
        registry.register("probes", "Probes of the primary for an object's facts, by result", probes.clone());
        registry.register(
            "replication_lag_seconds",
            "For objects seen PENDING and later COMPLETED, how long replication took (upper bound)",
            replication_lag.clone(),
        );
        registry.register("config_reloads", "Configuration reloads by result", reloads.clone());
        registry.register("config_generation", "Generation of the routing table in use", generation.clone());
        registry.register("upstream_up", "1 when the upstream is considered up", upstream_up.clone());
        let queue_waiting = Family::<Labels<1>, Gauge>::default();
        let queue_timeouts = Family::<Labels<1>, Counter>::default();
        registry.register(
            "upstream_queue",
            "Requests waiting for a connection to the upstream (limits.max_upstream_connections)",
            queue_waiting.clone(),
        );
        registry.register(
            "upstream_queue_timeouts",
            "Requests that waited limits.upstream_queue_timeout for an upstream connection in vain",
            queue_timeouts.clone(),
        );
        let queue = [Upstream::Primary, Upstream::Replica].map(|u| {
            let label = [("upstream", u.as_str())];
            (queue_waiting.get_or_create(&label).clone(), queue_timeouts.get_or_create(&label).clone())
        });
        let credential_refreshes = Family::<Labels<1>, Counter>::default();
        registry.register(
            "credential_refreshes",
            "Loads of mediaroute's own AWS credentials (first load, refresh, reload) by result",
            credential_refreshes.clone(),
        );
        let credentials_expiry = Gauge::default();
        registry.register(
            "credentials_expiry_timestamp_seconds",
            "When mediaroute's own AWS credentials expire (Unix time), 0 for none or keys that do not expire",
            credentials_expiry.clone(),
        );
        let tls_failures = Family::<Labels<1>, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes on the TLS listener that failed, by reason",
            tls_failures.clone(),
        );
        let proxy_refusals = Family::<Labels<1>, Counter>::default();
        registry.register(
            "proxy_protocol_refusals",
            "Connections closed because they did not start with a valid PROXY header in time, by reason",
            proxy_refusals.clone(),
        );
        let certificate_expiry = Gauge::default();
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the TLS listener's certificate expires (Unix time), 0 without a TLS listener",
            certificate_expiry.clone(),
        );
        // Process-wide, like the log itself: every Metrics shows the same counter.
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the log's sink did not keep up (README \"Access log\")",
            crate::log_writer::ACCESS_LINES_DROPPED.clone(),
        );
        let per_upstream = UPSTREAM_NAMES.map(|u| {
            let bytes = response_bytes.get_or_create(&[("upstream", u)]).clone();
            // Refused requests reached no upstream: their duration is not an upstream's.
            let duration = if u == "none" {
                duration_histogram()
            } else {
                upstream_duration.get_or_create(&[("upstream", u)]).clone()
            };
            (bytes, duration)
        });
        let request_handles = (0..UPSTREAMS * REASONS * CLASSES).map(|_| OnceLock::new()).collect();
        let m = Metrics {
            registry,
            requests,
            request_handles,
            per_upstream,
            fallbacks: FallbackCause::ALL.map(|c| fallbacks.get_or_create(&[("cause", c.as_str())]).clone()),
            replica_misses,
            probes: ProbeResult::ALL.map(|r| probes.get_or_create(&[("result", r.as_str())]).clone()),
            replication_lag,
            reloads,
            generation,
            upstream_up,
            queue,
            credential_refreshes: ["ok", "error"].map(|r| credential_refreshes.get_or_create(&[("result", r)]).clone()),
            credentials_expiry,
            tls_failures: TLS_FAILURES.map(|r| tls_failures.get_or_create(&[("reason", r)]).clone()),
            proxy_refusals: PROXY_REFUSALS.map(|r| proxy_refusals.get_or_create(&[("reason", r)]).clone()),
            certificate_expiry,
        };
        for (u, reason) in KNOWN_ROUTES {
            for c in 0..CLASSES {
                // Refused requests are answered 4xx (or 503, over a limit) by mediaroute itself,
                // or the client left.
                if u == 2 && reason.is_none() && c != 3 && c != 4 && c != CLIENT_CLOSED {
                    continue;
                }
                m.request_counter(u, reason, c);
            }
        }
        for u in [Upstream::Primary, Upstream::Replica] {
            m.set_up(u, true);
        }
        for r in ["ok", "error"] {
            m.reloads.get_or_create(&[("result", r)]).inc_by(0);
        }
        m
    }

    fn request_counter(&self, u: usize, reason: Option<Reason>, c: usize) -> &Counter {
        // Reason is fieldless and `ALL` lists it in declaration order, so the discriminant is its index.
        let r = reason.map_or(REASONS - 1, |r| r as usize);
        self.request_handles[(u * REASONS + r) * CLASSES + c].get_or_init(|| {
            let labels = [
                ("upstream", UPSTREAM_NAMES[u]),
                ("reason", reason.map_or("refused", Reason::as_str)),
                ("status_class", CLASS_NAMES[c]),
            ];
            self.requests.get_or_create(&labels).clone()
        })
    }

    /// Counts one finished request.
    pub fn request(
        &self,
        upstream: Option<Upstream>,
        reason: Option<Reason>,
        ended: Ended,
        bytes: u64,
        took: Duration,
    ) {
        let u = match upstream {
            Some(Upstream::Primary) => 0,
            Some(Upstream::Replica) => 1,
            None => 2,
        };
        let c = match ended {
            Ended::Answered(status) => class_index(status),
            Ended::ClientClosed => CLIENT_CLOSED,
            Ended::UpstreamBroke => class_index(502),
        };
        self.request_counter(u, reason, c).inc();
        let (bytes_sent, duration) = &self.per_upstream[u];
        bytes_sent.inc_by(bytes);
        if upstream.is_some() {
            duration.observe(took.as_secs_f64());
        }
    }

    /// Counts a download sent to the primary after the replica, and a replica miss.
    pub fn fallback(&self, cause: FallbackCause) {
        self.fallbacks[cause as usize].inc();
        if cause.is_miss() {
            self.replica_misses.inc();
        }
    }

    /// Counts one probe of the primary.
    pub fn probe(&self, result: ProbeResult) {
        self.probes[result as usize].inc();
    }

    /// Records how long an object took to replicate.
    pub fn replication_lag(&self, took: Duration) {
        self.replication_lag.observe(took.as_secs_f64());
    }

    /// Counts a request waiting for a connection to `upstream` until the guard is dropped.
    pub fn queue_waiting(&self, upstream: Upstream) -> Waiting {
        let gauge = &self.queue[upstream as usize].0;
        gauge.inc();
        Waiting(gauge.clone())
    }

    /// Counts a request that gave up waiting for a connection to `upstream`.
    pub fn queue_timeout(&self, upstream: Upstream) {
        self.queue[upstream as usize].1.inc();
    }

    /// Counts a reload attempt and, when it worked, the new generation.
    pub fn reload(&self, generation: Option<u64>) {
        let result = if generation.is_some() { "ok" } else { "error" };
        self.reloads.get_or_create(&[("result", result)]).inc();
        if let Some(g) = generation {
            self.set_generation(g);
        }
    }

    /// Sets the generation gauge.
    pub fn set_generation(&self, generation: u64) {
        self.generation.set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    /// Sets `mediaroute_upstream_up{upstream}`.
    pub fn set_up(&self, upstream: Upstream, up: bool) {
        self.upstream_up.get_or_create(&[("upstream", upstream.as_str())]).set(i64::from(up));
    }

    /// Counts one load of mediaroute's own AWS credentials (`mediaroute_credential_refreshes_total{result}`).
    pub fn credential_refresh(&self, ok: bool) {
        self.credential_refreshes[usize::from(!ok)].inc();
    }

    /// Sets `mediaroute_credentials_expiry_timestamp_seconds`: `None` (no credentials, or keys
    /// that do not expire) reads 0.
    pub fn set_credentials_expiry(&self, expiry: Option<SystemTime>) {
        let secs = expiry.and_then(|e| e.duration_since(SystemTime::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
        self.credentials_expiry.set(i64::try_from(secs).unwrap_or(i64::MAX));
    }

    /// Counts a failed TLS handshake; `reason` is one of [`TLS_FAILURES`].
    pub fn tls_handshake_failure(&self, reason: &str) {
        if let Some(i) = TLS_FAILURES.iter().position(|r| *r == reason) {
            self.tls_failures[i].inc();
        }
    }

    /// Counts a connection closed for its PROXY header; `reason` is one of [`PROXY_REFUSALS`].
    pub fn proxy_protocol_refusal(&self, reason: &str) {
        if let Some(i) = PROXY_REFUSALS.iter().position(|r| *r == reason) {
            self.proxy_refusals[i].inc();
        }
    }

    /// Sets `mediaroute_tls_certificate_expiry_timestamp_seconds` (Unix seconds; 0 for none).
    pub fn set_certificate_expiry(&self, not_after: i64) {
        self.certificate_expiry.set(not_after.max(0));
    }

    /// The exposition in the OpenMetrics text format (which Prometheus reads).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

const UPSTREAMS: usize = 3;
const UPSTREAM_NAMES: [&str; UPSTREAMS] = ["primary", "replica", "none"];
/// Every reason plus `refused`.
const REASONS: usize = Reason::ALL.len() + 1;
const CLASSES: usize = 6;
const CLASS_NAMES: [&str; CLASSES] = ["1xx", "2xx", "3xx", "4xx", "5xx", "client-closed"];
const CLIENT_CLOSED: usize = 5;

fn class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_types_follow_the_contract() {
        let m = Metrics::new();
        m.request(
            Some(Upstream::Replica),
            Some(Reason::Replica),
            Ended::Answered(206),
            1000,
            Duration::from_millis(20),
        );
        m.request(Some(Upstream::Primary), Some(Reason::Fallback), Ended::Answered(200), 10, Duration::from_millis(5));
        m.request(Some(Upstream::Primary), Some(Reason::Write), Ended::ClientClosed, 0, Duration::from_millis(5));
        m.request(Some(Upstream::Replica), Some(Reason::Replica), Ended::UpstreamBroke, 10, Duration::from_millis(5));
        m.request(None, None, Ended::Answered(403), 100, Duration::ZERO);
        m.fallback(FallbackCause::NotFound);
        m.probe(ProbeResult::Denied);
        m.reload(Some(2));
        m.reload(None);
        m.credential_refresh(true);
        m.credential_refresh(true);
        m.credential_refresh(false);
        m.set_credentials_expiry(Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)));
        let text = m.render();
        for line in [
            "# TYPE mediaroute_requests counter",
            "mediaroute_requests_total{upstream=\"replica\",reason=\"replica\",status_class=\"2xx\"} 1",
            "mediaroute_requests_total{upstream=\"none\",reason=\"refused\",status_class=\"4xx\"} 1",
            "mediaroute_response_bytes_total{upstream=\"replica\"} 1010",
            "# TYPE mediaroute_upstream_duration_seconds histogram",
            "mediaroute_upstream_duration_seconds_bucket{le=\"0.025\",upstream=\"replica\"} 2",
            "mediaroute_requests_total{upstream=\"primary\",reason=\"write\",status_class=\"client-closed\"} 1",
            "mediaroute_requests_total{upstream=\"replica\",reason=\"replica\",status_class=\"5xx\"} 1",
            "mediaroute_fallbacks_total{cause=\"not-found\"} 1",
            "mediaroute_fallbacks_total{cause=\"timeout\"} 0",
            "mediaroute_replica_misses_total 1",
            "mediaroute_probes_total{result=\"denied\"} 1",
            "mediaroute_config_reloads_total{result=\"ok\"} 1",
            "mediaroute_config_reloads_total{result=\"error\"} 1",
            "mediaroute_config_generation 2",
            "mediaroute_upstream_up{upstream=\"replica\"} 1",
            "# TYPE mediaroute_credential_refreshes counter",
            "mediaroute_credential_refreshes_total{result=\"ok\"} 2",
            "mediaroute_credential_refreshes_total{result=\"error\"} 1",
            "# TYPE mediaroute_credentials_expiry_timestamp_seconds gauge",
            "mediaroute_credentials_expiry_timestamp_seconds 1700000000",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}

#[cfg(test)]
mod from_the_start {
    use super::*;

    #[test]
    fn every_family_is_present_before_the_first_request() {
        let text = Metrics::new().render();
        for line in [
            "mediaroute_requests_total{upstream=\"replica\",reason=\"replica\",status_class=\"2xx\"} 0",
            "mediaroute_requests_total{upstream=\"primary\",reason=\"fallback\",status_class=\"5xx\"} 0",
            "mediaroute_requests_total{upstream=\"primary\",reason=\"write\",status_class=\"client-closed\"} 0",
            "mediaroute_requests_total{upstream=\"none\",reason=\"refused\",status_class=\"4xx\"} 0",
            "mediaroute_response_bytes_total{upstream=\"primary\"} 0",
            "mediaroute_upstream_duration_seconds_count{upstream=\"replica\"} 0",
            "mediaroute_fallbacks_total{cause=\"connect\"} 0",
            "mediaroute_replica_misses_total 0",
            "mediaroute_probes_total{result=\"ok\"} 0",
            "mediaroute_replication_lag_seconds_count 0",
            "mediaroute_config_reloads_total{result=\"ok\"} 0",
            "mediaroute_config_generation 0",
            "mediaroute_upstream_up{upstream=\"primary\"} 1",
            "mediaroute_upstream_queue{upstream=\"replica\"} 0",
            "mediaroute_upstream_queue_timeouts_total{upstream=\"primary\"} 0",
            "mediaroute_credential_refreshes_total{result=\"ok\"} 0",
            "mediaroute_credential_refreshes_total{result=\"error\"} 0",
            "mediaroute_credentials_expiry_timestamp_seconds 0",
            "mediaroute_tls_handshake_failures_total{reason=\"plain-http\"} 0",
            "mediaroute_proxy_protocol_refusals_total{reason=\"invalid\"} 0",
            "mediaroute_tls_certificate_expiry_timestamp_seconds 0",
            "# TYPE mediaroute_access_log_dropped counter",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        let refused_2xx = "reason=\"refused\",status_class=\"2xx\"";
        assert!(!text.contains(refused_2xx), "no impossible series");
    }
}
