//! The metrics registry: names and labels are part of the contract (DESIGN.md section 5).

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::route::Reason;
use crate::table::Upstream;

type Labels<const N: usize> = [(&'static str, &'static str); N];

/// Every metric mediaroute exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels<3>, Counter>,
    /// Handles into `requests`, made on first use, so counting is a lookup by index.
    request_handles: Box<[OnceLock<Counter>]>,
    /// Per upstream (primary, replica, none): response bytes and durations.
    per_upstream: [(Counter, Histogram); 3],
    fallbacks: Counter,
    reloads: Family<Labels<1>, Counter>,
    generation: Gauge,
    upstream_up: Family<Labels<1>, Gauge>,
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

impl Metrics {
    /// Registers every metric, with zeroed series for the two upstreams.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mediaroute");
        let requests = Family::<Labels<3>, Counter>::default();
        let response_bytes = Family::<Labels<1>, Counter>::default();
        let upstream_duration =
            Family::<Labels<1>, Histogram>::new_with_constructor(duration_histogram as fn() -> Histogram);
        let fallbacks = Counter::default();
        let reloads = Family::<Labels<1>, Counter>::default();
        let generation = Gauge::default();
        let upstream_up = Family::<Labels<1>, Gauge>::default();
        registry.register("requests", "Requests by upstream, routing reason and status class", requests.clone());
        registry.register("response_bytes", "Response body bytes sent to clients, by upstream", response_bytes.clone());
        registry.register(
            "upstream_duration_seconds",
            "Time from routing to the end of the response body, by upstream",
            upstream_duration.clone(),
        );
        registry.register("fallbacks", "Replica misses or failures retried on the primary", fallbacks.clone());
        registry.register("config_reloads", "Configuration reloads by result", reloads.clone());
        registry.register("config_generation", "Generation of the routing table in use", generation.clone());
        registry.register("upstream_up", "1 when the upstream is considered up", upstream_up.clone());
        let per_upstream = ["primary", "replica", "none"].map(|u| {
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
        let m =
            Metrics { registry, requests, request_handles, per_upstream, fallbacks, reloads, generation, upstream_up };
        for u in [Upstream::Primary, Upstream::Replica] {
            m.set_up(u, true);
        }
        for r in ["ok", "error"] {
            m.reloads.get_or_create(&[("result", r)]).inc_by(0);
        }
        m
    }

    /// Counts one finished request.
    pub fn request(&self, upstream: Option<Upstream>, reason: Option<Reason>, status: u16, bytes: u64, took: Duration) {
        let u = match upstream {
            Some(Upstream::Primary) => 0,
            Some(Upstream::Replica) => 1,
            None => 2,
        };
        // Reason is fieldless and `ALL` lists it in declaration order, so the discriminant is its index.
        let r = reason.map_or(REASONS - 1, |r| r as usize);
        let c = class_index(status);
        let handle = self.request_handles[(u * REASONS + r) * CLASSES + c].get_or_init(|| {
            let labels = [
                ("upstream", ["primary", "replica", "none"][u]),
                ("reason", reason.map_or("refused", Reason::as_str)),
                ("status_class", CLASS_NAMES[c]),
            ];
            self.requests.get_or_create(&labels).clone()
        });
        handle.inc();
        let (bytes_sent, duration) = &self.per_upstream[u];
        bytes_sent.inc_by(bytes);
        if upstream.is_some() {
            duration.observe(took.as_secs_f64());
        }
        if reason == Some(Reason::Fallback) {
            self.fallbacks.inc();
        }
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

    /// The exposition in the OpenMetrics text format (which Prometheus reads).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

const UPSTREAMS: usize = 3;
/// Every reason plus `refused`.
const REASONS: usize = Reason::ALL.len() + 1;
const CLASSES: usize = 5;
const CLASS_NAMES: [&str; CLASSES] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

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
        m.request(Some(Upstream::Replica), Some(Reason::Replica), 206, 1000, Duration::from_millis(20));
        m.request(Some(Upstream::Primary), Some(Reason::Fallback), 200, 10, Duration::from_millis(5));
        m.request(None, None, 403, 100, Duration::ZERO);
        m.reload(Some(2));
        m.reload(None);
        let text = m.render();
        for line in [
            "# TYPE mediaroute_requests counter",
            "mediaroute_requests_total{upstream=\"replica\",reason=\"replica\",status_class=\"2xx\"} 1",
            "mediaroute_requests_total{upstream=\"none\",reason=\"refused\",status_class=\"4xx\"} 1",
            "mediaroute_response_bytes_total{upstream=\"replica\"} 1000",
            "# TYPE mediaroute_upstream_duration_seconds histogram",
            "mediaroute_upstream_duration_seconds_bucket{le=\"0.025\",upstream=\"replica\"} 1",
            "mediaroute_fallbacks_total 1",
            "mediaroute_config_reloads_total{result=\"ok\"} 1",
            "mediaroute_config_reloads_total{result=\"error\"} 1",
            "mediaroute_config_generation 2",
            "mediaroute_upstream_up{upstream=\"replica\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
